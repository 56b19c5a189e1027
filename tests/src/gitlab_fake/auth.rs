//! Who a `PRIVATE-TOKEN` belongs to and what it may do, as GitLab decides it. Every rule names
//! the gitlabhq file it comes from:
//!
//! * Scopes per route class (`lib/api/api_guard.rb`, `allow_access_with_scope`, checked in
//!   `find_user_from_access_token` → `validate_and_save_access_token!`): a token passes when one
//!   of its scopes is accepted by the route.
//!   - `lib/api/api.rb`: every route accepts `api`, and `read_api` for `GET`/`HEAD`.
//!   - `lib/api/ci/runners.rb`: also `manage_runner`, only when the request has an `:id` and its
//!     path is below `/api/v4/runners/` (so `GET /runners` needs `read_api` or `api`).
//!   - `lib/api/user_runners.rb`: also `create_runner` for `POST`.
//!   - `lib/api/users.rb`: also `read_user` for `GET`/`HEAD`.
//!   - `lib/api/personal_access_tokens/self_information.rb`: every scope
//!     (`Gitlab::Auth.all_available_scopes`).
//! * A missing or unknown token, or a revoked or expired one, is 401 `{"message":"401 Unauthorized"}`
//!   (`lib/api/helpers.rb` `unauthorized!`; `api_guard.rb` raises `RevokedError`/`ExpiredError`).
//! * A token whose scopes the route does not accept is 403
//!   `{"error":"insufficient_scope","error_description":…,"scope":"<accepted scopes>"}`
//!   (`api_guard.rb`, `InsufficientScopeError` handled by `handle_return_value!`/`Rack::OAuth2`).
//! * Administrator-only routes answer `403 Forbidden` to others (`lib/api/helpers.rb`
//!   `authenticated_as_admin!`): `GET /runners/all`.
//! * Per runner (`lib/api/ci/runners.rb`, `authenticate_show_runner!`,
//!   `authenticate_update_runner!`, `authenticate_delete_runner!`,
//!   `authenticate_list_runners_jobs!`): administrators may do everything; any signed-in user may
//!   read an instance runner; others need rights on the runner's group or project
//!   (`403 No access granted`). The fake has no groups or projects: a non-administrator owns the
//!   group and project runners created with one of its tokens. `GET /runners` lists those
//!   (`current_user.ci_owned_runners`).

use super::state::State;
use axum::http::{header, HeaderMap, Method};

/// A personal access token the fake knows.
#[derive(Debug, Clone)]
pub struct ApiToken {
    /// Token id (`GET /personal_access_tokens/self` → `id`).
    pub id: u64,
    /// Token name.
    pub name: String,
    /// The user it belongs to.
    pub user: String,
    /// Its scopes.
    pub scopes: Vec<String>,
    /// The user is an administrator.
    pub admin: bool,
    /// False once revoked.
    pub active: bool,
}

/// Which API class a route belongs to (each declares its own extra scopes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `lib/api/ci/runners.rb`; `with_id`: the path has a runner `:id`.
    Runners {
        /// The request names a runner (`/runners/:id…`).
        with_id: bool,
    },
    /// `lib/api/user_runners.rb`.
    UserRunners,
    /// `lib/api/users.rb` (`GET /user`).
    User,
    /// `lib/api/personal_access_tokens/self_information.rb`.
    TokenSelf,
}

/// Every scope GitLab knows (`lib/gitlab/auth.rb`, the ones a personal access token can have).
pub const ALL_SCOPES: [&str; 12] = [
    "api",
    "read_api",
    "read_user",
    "create_runner",
    "manage_runner",
    "k8s_proxy",
    "read_repository",
    "write_repository",
    "read_registry",
    "write_registry",
    "sudo",
    "admin_mode",
];

/// The scopes `class` accepts for `method`, in GitLab's order (`api` first).
pub fn accepted(class: Class, method: &Method) -> Vec<&'static str> {
    let read = method == Method::GET || method == Method::HEAD;
    if class == Class::TokenSelf {
        return ALL_SCOPES.to_vec();
    }
    let mut out = vec!["api"];
    if read {
        out.push("read_api");
    }
    match class {
        Class::Runners { with_id: true } => out.push("manage_runner"),
        Class::UserRunners if method == Method::POST => out.push("create_runner"),
        Class::User if read => out.push("read_user"),
        _ => {}
    }
    out
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No, an unknown, or a revoked token: 401.
    Unauthorized,
    /// The token's scopes do not include one the route accepts: 403 with these accepted scopes.
    InsufficientScope(Vec<&'static str>),
}

/// The token sent as `PRIVATE-TOKEN` or `Authorization: Bearer` (`lib/gitlab/auth/auth_finders.rb`).
pub fn sent_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get("private-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned)
        })
}

/// The token behind the request, if its scopes let it use `class` with `method`.
pub fn authorize(
    st: &State,
    headers: &HeaderMap,
    class: Class,
    method: &Method,
) -> Result<ApiToken, Refusal> {
    let sent = sent_token(headers).ok_or(Refusal::Unauthorized)?;
    let token = st
        .tokens
        .get(&sent)
        .filter(|t| t.active)
        .ok_or(Refusal::Unauthorized)?;
    let ok = accepted(class, method);
    if token.scopes.iter().any(|s| ok.contains(&s.as_str())) {
        Ok(token.clone())
    } else {
        Err(Refusal::InsufficientScope(ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manage_runner_reaches_only_runner_ids() {
        let get = Method::GET;
        assert!(accepted(Class::Runners { with_id: true }, &get).contains(&"manage_runner"));
        assert!(!accepted(Class::Runners { with_id: false }, &get).contains(&"manage_runner"));
        assert!(accepted(Class::Runners { with_id: false }, &get).contains(&"read_api"));
        assert!(!accepted(Class::Runners { with_id: true }, &Method::DELETE).contains(&"read_api"));
        assert!(accepted(Class::UserRunners, &Method::POST).contains(&"create_runner"));
        assert!(accepted(Class::TokenSelf, &get).contains(&"create_runner"));
        assert!(accepted(Class::User, &get).contains(&"read_user"));
    }
}
