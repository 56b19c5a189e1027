//! What a GitLab personal access token may do, as GitLab decides it, so that commands can refuse
//! before they change anything.
//!
//! Rules, from GitLab's own source (gitlabhq):
//! * `lib/api/api.rb`: every API route accepts `api`, and `read_api` for `GET`/`HEAD` only.
//! * `lib/api/user_runners.rb`: `POST /user/runners` also accepts `create_runner`.
//! * `lib/api/ci/runners.rb`: requests below `/runners/:id` (the path has an `:id`) also accept
//!   `manage_runner`; `GET /runners` does not, so listing needs `read_api` (or `api`);
//!   `GET /runners/all` is `authenticated_as_admin!` whatever the scopes.
//! * `lib/api/personal_access_tokens/self_information.rb`: `GET /personal_access_tokens/self`
//!   accepts every scope and describes the token itself (its `scopes`, `active`, `expires_at`).
//! * `lib/api/users.rb`: `GET /user` answers with `is_admin` only to administrators
//!   (`Entities::UserWithAdmin`); it needs `read_user`, `read_api` or `api`.
//! * `lib/api/api_guard.rb`: a token without an accepted scope gets `403` with
//!   `{"error":"insufficient_scope", …, "scope": "<accepted scopes>"}`.

use serde::{Deserialize, Serialize};

/// One kind of GitLab call imagectl makes, with the scopes GitLab accepts for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// `POST /user/runners`.
    CreateRunner,
    /// `GET /runners/:id`, `GET /runners/:id/jobs`.
    ReadRunner,
    /// `PUT /runners/:id` (pause) and `DELETE /runners/:id`.
    ManageRunner,
    /// `GET /runners` (finding a fleet's runners by description).
    ListRunners,
}

impl Access {
    /// Scopes any one of which GitLab accepts for this call.
    pub fn scopes(self) -> &'static [&'static str] {
        match self {
            Access::CreateRunner => &["create_runner", "api"],
            Access::ReadRunner => &["manage_runner", "read_api", "api"],
            Access::ManageRunner => &["manage_runner", "api"],
            Access::ListRunners => &["read_api", "api"],
        }
    }

    /// What the call is for, in words.
    pub fn purpose(self) -> &'static str {
        match self {
            Access::CreateRunner => "create runners (POST /user/runners)",
            Access::ReadRunner => "read runners and their jobs (GET /runners/:id)",
            Access::ManageRunner => "pause and delete runners (PUT/DELETE /runners/:id)",
            Access::ListRunners => "list runners to find leftovers (GET /runners)",
        }
    }

    /// The scope to suggest: the narrowest one that grants it.
    pub fn suggested(self) -> &'static str {
        self.scopes()[0]
    }
}

/// `GET /personal_access_tokens/self` (`Entities::PersonalAccessToken`), the fields imagectl uses.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct TokenInfo {
    /// The token's name.
    #[serde(default)]
    pub name: String,
    /// Its scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// False once revoked or expired.
    #[serde(default = "yes")]
    pub active: bool,
    /// `YYYY-MM-DD` or none.
    #[serde(default)]
    pub expires_at: Option<String>,
}

fn yes() -> bool {
    true
}

impl TokenInfo {
    /// True when one of the token's scopes grants `access`.
    pub fn allows(&self, access: Access) -> bool {
        access
            .scopes()
            .iter()
            .any(|s| self.scopes.iter().any(|t| t == s))
    }

    /// The token's scopes for a message (`none` when it has none).
    pub fn scope_list(&self) -> String {
        if self.scopes.is_empty() {
            "none".into()
        } else {
            self.scopes.join(", ")
        }
    }
}

/// `GET /user`: `is_admin` is only present for administrators.
#[derive(Debug, Clone, Deserialize)]
pub struct UserInfo {
    /// The user's name.
    #[serde(default)]
    pub username: String,
    /// Present (true) for administrators only.
    #[serde(default)]
    pub is_admin: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(scopes: &[&str]) -> TokenInfo {
        TokenInfo {
            name: "t".into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            active: true,
            expires_at: None,
        }
    }

    #[test]
    fn scopes_grant_what_gitlab_grants() {
        let t = token(&["create_runner", "manage_runner"]);
        assert!(t.allows(Access::CreateRunner) && t.allows(Access::ManageRunner));
        assert!(t.allows(Access::ReadRunner));
        assert!(
            !t.allows(Access::ListRunners),
            "GET /runners needs read_api"
        );
        let r = token(&["read_api"]);
        assert!(r.allows(Access::ListRunners) && r.allows(Access::ReadRunner));
        assert!(!r.allows(Access::ManageRunner) && !r.allows(Access::CreateRunner));
        let api = token(&["api"]);
        for a in [
            Access::CreateRunner,
            Access::ReadRunner,
            Access::ManageRunner,
            Access::ListRunners,
        ] {
            assert!(api.allows(a), "{a:?}");
        }
        assert_eq!(token(&[]).scope_list(), "none");
    }

    #[test]
    fn token_info_reads_gitlabs_entity() {
        let t: TokenInfo = serde_json::from_str(
            r#"{"id":4,"name":"fleet","revoked":false,"created_at":"2026-01-01T00:00:00Z",
                "scopes":["create_runner","manage_runner"],"user_id":2,"active":true,
                "expires_at":"2027-01-01","last_used_at":null}"#,
        )
        .unwrap();
        assert_eq!(t.scopes, ["create_runner", "manage_runner"]);
        assert!(t.active);
        let u: UserInfo = serde_json::from_str(r#"{"id":2,"username":"ci"}"#).unwrap();
        assert!(!u.is_admin);
    }
}
