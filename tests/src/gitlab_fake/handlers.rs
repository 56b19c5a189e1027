//! The GitLab fake's HTTP surface (axum 0.8): routes under `/api/v4`, parameter parsing (JSON,
//! form and query, as GitLab's Grape API accepts), the request log and fault injection.

use super::auth::{authorize, ApiToken, Class, Refusal};
use super::state::{iso, Manager, NewRunnerParams, RequestRecord, Runner, State};
use axum::body::Body;
use axum::extract::{Extension, Path, Request, State as Ax};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use imagectl_proto::Secret;
use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The state shared by all handlers.
pub type Shared = Arc<Mutex<State>>;

/// Locks the state, ignoring poisoning (a panicking handler must not wedge the fake).
pub fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// All routes.
pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/api/v4/user/runners", post(create_runner))
        .route("/api/v4/user", get(current_user))
        .route("/api/v4/personal_access_tokens/self", get(token_self))
        .route("/api/v4/runners/verify", post(verify))
        .route(
            "/api/v4/runners/reset_authentication_token",
            post(reset_token),
        )
        .route(
            "/api/v4/runners/{id}/reset_authentication_token",
            post(admin_reset_token),
        )
        .route("/api/v4/jobs/request", post(job_request))
        .route("/api/v4/runners/all", get(list_all_runners))
        .route("/api/v4/runners/managers", delete(delete_manager))
        .route(
            "/api/v4/runners",
            get(list_runners)
                .post(legacy_register)
                .delete(delete_by_token),
        )
        .route(
            "/api/v4/runners/{id}",
            get(get_runner).put(update_runner).delete(delete_runner),
        )
        .route("/api/v4/runners/{id}/jobs", get(runner_jobs))
        .route("/api/v4/runners/{id}/managers", get(runner_managers))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            log_and_faults,
        ))
        .with_state(state)
}

/// Request parameters: query string merged with a JSON or form body (the body wins).
#[derive(Debug, Clone, Default)]
pub struct Params(pub Map<String, Value>);

impl Params {
    fn str(&self, k: &str) -> Option<String> {
        match self.0.get(k)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }
    fn nonempty(&self, k: &str) -> Option<String> {
        self.str(k).filter(|s| !s.is_empty())
    }
    fn bool(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) if s == "true" || s == "1" => Ok(Some(true)),
            Some(Value::String(s)) if s == "false" || s == "0" => Ok(Some(false)),
            Some(_) => Err(param_error(&format!("{k} is invalid"))),
        }
    }
    fn u64(&self, k: &str) -> Result<Option<u64>, ApiError> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| param_error(&format!("{k} is invalid"))),
            Some(Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| param_error(&format!("{k} is invalid"))),
            Some(_) => Err(param_error(&format!("{k} is invalid"))),
        }
    }
    fn list(&self, k: &str) -> Option<Vec<String>> {
        match self.0.get(k)? {
            Value::Array(a) => Some(
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
            ),
            Value::String(s) => Some(
                s.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            _ => None,
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `a=1&tag_list[]=x&tag_list[]=y` into a JSON object.
pub fn parse_form(text: &str, into: &mut Map<String, Value>) {
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k), percent_decode(v));
        if let Some(base) = k.strip_suffix("[]") {
            let entry = into
                .entry(base.to_owned())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(a) = entry {
                a.push(Value::String(v));
            } else {
                *entry = Value::Array(vec![Value::String(v)]);
            }
        } else {
            into.insert(k, Value::String(v));
        }
    }
}

/// An error answer: GitLab uses `message` for auth/not-found errors and `error` for bad parameters.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: Value,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

fn msg(status: StatusCode, text: &str) -> ApiError {
    ApiError {
        status,
        body: json!({ "message": text }),
    }
}
fn param_error(text: &str) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        body: json!({ "error": text }),
    }
}
/// `403 Forbidden - <why>` (`lib/api/helpers.rb`, `forbidden!(reason)`).
fn forbidden_because(why: &str) -> ApiError {
    msg(StatusCode::FORBIDDEN, &format!("403 Forbidden - {why}"))
}
/// `400 Bad request - <why>` (`lib/api/helpers.rb`, `bad_request!(reason)`).
fn bad_request(why: &str) -> ApiError {
    msg(StatusCode::BAD_REQUEST, &format!("400 Bad request - {why}"))
}
/// Errors joined as Rails' `Array#to_sentence` does.
fn to_sentence(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [a, b] => format!("{a} and {b}"),
        [rest @ .., last] => format!("{}, and {last}", rest.join(", ")),
    }
}
fn forbidden() -> ApiError {
    msg(StatusCode::FORBIDDEN, "403 Forbidden")
}
fn not_found() -> ApiError {
    msg(StatusCode::NOT_FOUND, "404 Runner Not Found")
}

/// Logs every request (with the token and system_id it carried), applies injected faults and
/// delays, and turns the query + body into [`Params`] for the handlers.
async fn log_and_faults(Ax(st): Ax<Shared>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(b) => b,
        Err(_) => return param_error("body too large").into_response(),
    };
    let mut params = Map::new();
    if let Some(q) = parts.uri.query() {
        parse_form(q, &mut params);
    }
    let ctype = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !bytes.is_empty() {
        if ctype.starts_with("application/json") {
            match serde_json::from_slice::<Value>(&bytes) {
                Ok(Value::Object(m)) => params.extend(m),
                _ => return param_error("body is not a JSON object").into_response(),
            }
        } else if ctype.starts_with("application/x-www-form-urlencoded") || ctype.is_empty() {
            parse_form(&String::from_utf8_lossy(&bytes), &mut params);
        }
    }
    let params = Params(params);
    let method = parts.method.to_string();
    let path = parts.uri.path().to_owned();
    let (idx, fault) = {
        let mut s = lock(&st);
        s.requests.push(RequestRecord {
            method: method.clone(),
            path: path.clone(),
            status: 0,
            system_id: params.str("system_id"),
            token: params.str("token").map(Secret::new),
            injected: false,
        });
        (s.requests.len() - 1, s.take_fault(&method, &path))
    };
    if let Some(f) = fault {
        if !f.delay.is_zero() {
            tokio::time::sleep(f.delay).await;
        }
        if let Some(code) = f.status {
            let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut s = lock(&st);
            s.requests[idx].status = code.as_u16();
            s.requests[idx].injected = true;
            return injected(code, f.retry_after);
        }
    }
    parts.extensions.insert(params);
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    lock(&st).requests[idx].status = resp.status().as_u16();
    resp
}

/// An injected answer. A 429 looks like GitLab's throttle (gitlabhq `lib/gitlab/rack_attack.rb`,
/// `throttled_responder` and `throttled_response_headers`): plain text "Retry later" with
/// `Retry-After` and `RateLimit-*`; other statuses carry a JSON message.
fn injected(code: StatusCode, retry_after: Option<u64>) -> Response {
    let mut resp = if code == StatusCode::TOO_MANY_REQUESTS {
        (
            code,
            [(header::CONTENT_TYPE, "text/plain")],
            "Retry later\n",
        )
            .into_response()
    } else {
        msg(code, &format!("{} (injected fault)", code.as_u16())).into_response()
    };
    if let Some(secs) = retry_after {
        let h = resp.headers_mut();
        h.insert(header::RETRY_AFTER, secs.into());
        if code == StatusCode::TOO_MANY_REQUESTS {
            let reset = SystemTime::now() + Duration::from_secs(secs);
            let unix = reset
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            h.insert(
                "RateLimit-Name",
                HeaderValue::from_static("throttle_authenticated_api"),
            );
            h.insert("RateLimit-Limit", 60u64.into());
            h.insert("RateLimit-Observed", 61u64.into());
            h.insert("RateLimit-Remaining", 0u64.into());
            h.insert("RateLimit-Reset", unix.into());
            if let Ok(v) = HeaderValue::from_str(&httpdate(reset)) {
                h.insert("RateLimit-ResetTime", v);
            }
        }
    }
    resp
}

/// An HTTP date (RFC 7231 IMF-fixdate).
fn httpdate(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.format(&fmt).unwrap_or_default()
}

/// The token behind a request to `class` with `method`, or GitLab's 401/403 (see [`super::auth`]).
fn who(
    st: &State,
    headers: &HeaderMap,
    class: Class,
    method: Method,
) -> Result<ApiToken, ApiError> {
    authorize(st, headers, class, &method).map_err(|r| match r {
        Refusal::Unauthorized => msg(StatusCode::UNAUTHORIZED, "401 Unauthorized"),
        Refusal::InsufficientScope(ok) => ApiError {
            status: StatusCode::FORBIDDEN,
            body: json!({
                "error": "insufficient_scope",
                "error_description": "The request requires higher privileges than provided by the access token.",
                "scope": ok.join(" "),
            }),
        },
    })
}

/// What a caller wants to do with one runner (`lib/api/ci/runners.rb`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Act {
    /// `authenticate_show_runner!`: instance runners are readable by every signed-in user.
    Show,
    /// `authenticate_update_runner!`, `authenticate_delete_runner!`,
    /// `authenticate_list_runners_jobs!`: administrators, or rights on the runner's group or
    /// project (in the fake: the runner was created with one of the user's tokens).
    Manage,
}

fn may(t: &ApiToken, r: &Runner, act: Act) -> Result<(), ApiError> {
    let owner = r.creator.as_deref() == Some(t.user.as_str()) && r.runner_type != "instance_type";
    if t.admin || owner || (act == Act::Show && r.runner_type == "instance_type") {
        Ok(())
    } else {
        Err(forbidden_because("No access granted"))
    }
}

/// `GET /personal_access_tokens/self` (`lib/api/personal_access_tokens/self_information.rb`,
/// `Entities::PersonalAccessToken`): any scope may ask.
async fn token_self(Ax(st): Ax<Shared>, headers: HeaderMap) -> R {
    let s = lock(&st);
    let t = who(&s, &headers, Class::TokenSelf, Method::GET)?;
    Ok(Json(json!({
        "id": t.id, "name": t.name, "revoked": !t.active, "active": t.active,
        "scopes": t.scopes, "user_id": t.id, "created_at": "2026-01-01T00:00:00.000Z",
        "expires_at": null, "last_used_at": null, "description": null,
    }))
    .into_response())
}

/// `GET /user` (`lib/api/users.rb`): `Entities::UserWithAdmin` (with `is_admin`) only for
/// administrators.
async fn current_user(Ax(st): Ax<Shared>, headers: HeaderMap) -> R {
    let s = lock(&st);
    let t = who(&s, &headers, Class::User, Method::GET)?;
    let mut body = json!({ "id": t.id, "username": t.user, "name": t.user, "state": "active" });
    if t.admin {
        body["is_admin"] = json!(true);
    }
    Ok(Json(body).into_response())
}

type R = Result<Response, ApiError>;

async fn create_runner(
    Ax(st): Ax<Shared>,
    headers: HeaderMap,
    Extension(p): Extension<Params>,
) -> R {
    let mut s = lock(&st);
    let t = who(&s, &headers, Class::UserRunners, Method::POST)?;
    let runner_type = p
        .nonempty("runner_type")
        .ok_or_else(|| param_error("runner_type is missing"))?;
    let d = NewRunnerParams::default();
    let params = NewRunnerParams {
        runner_type,
        group_id: p.u64("group_id")?,
        project_id: p.u64("project_id")?,
        description: p.str("description").unwrap_or_default(),
        paused: p.bool("paused")?.unwrap_or(d.paused),
        locked: p.bool("locked")?.unwrap_or(d.locked),
        run_untagged: p.bool("run_untagged")?.unwrap_or(d.run_untagged),
        tag_list: p.list("tag_list").unwrap_or_default(),
        access_level: p.nonempty("access_level").unwrap_or(d.access_level),
        maximum_timeout: p.u64("maximum_timeout")?,
        maintenance_note: p.str("maintenance_note"),
    };
    params.validate().map_err(|e| param_error(&e))?;
    // `Ci::Runners::RunnerCreationStrategies::InstanceRunnerStrategy`: only administrators.
    if params.runner_type == "instance_type" && !t.admin {
        return Err(forbidden_because("Insufficient permissions"));
    }
    let errs = params.model_errors();
    if !errs.is_empty() {
        return Err(bad_request(&to_sentence(&errs)));
    }
    let id = s.create(params).id;
    let r = s.runners.get_mut(&id).expect("just created");
    r.creator = Some(t.user.clone());
    let r = &s.runners[&id];
    let body =
        json!({ "id": r.id, "token": r.token.expose(), "token_expires_at": r.token_expires_at });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn verify(Ax(st): Ax<Shared>, Extension(p): Extension<Params>) -> R {
    let token = p
        .nonempty("token")
        .ok_or_else(|| param_error("token is missing"))?;
    let system_id = p.nonempty("system_id");
    let mut s = lock(&st);
    let r = s.by_token(&token).ok_or_else(forbidden)?;
    if r.orphaned {
        return Err(msg(StatusCode::UNPROCESSABLE_ENTITY, "Runner is orphaned"));
    }
    // `lib/api/ci/runner.rb` `post '/verify'` → `authenticate_runner!`
    // (`lib/api/ci/helpers/runner.rb`): heartbeats the runner and its manager.
    heartbeat(r, system_id);
    let body =
        json!({ "id": r.id, "token": r.token.expose(), "token_expires_at": r.token_expires_at });
    Ok((StatusCode::OK, Json(body)).into_response())
}

async fn reset_token(Ax(st): Ax<Shared>, Extension(p): Extension<Params>) -> R {
    let token = p
        .nonempty("token")
        .ok_or_else(|| param_error("token is missing"))?;
    let system_id = p.nonempty("system_id");
    let mut s = lock(&st);
    let r = s.by_token(&token).ok_or_else(forbidden)?;
    // `post '/reset_authentication_token'` → `authenticate_runner!` too: a heartbeat, for the
    // manager named by `system_id` or, without one, `<legacy>` (`LEGACY_SYSTEM_XID`).
    heartbeat(r, system_id);
    let id = r.id;
    rotated(&mut s, id)
}

/// `Ci::Runner#heartbeat` and `Ci::RunnerManager#heartbeat`: contacted now; the manager is
/// `system_id`, or `<legacy>` when the request named none (`current_runner_manager` in
/// `lib/api/ci/helpers/runner.rb`).
fn heartbeat(r: &mut Runner, system_id: Option<String>) {
    let now = SystemTime::now();
    r.contacted_at = Some(now);
    let sid = system_id.unwrap_or_else(|| "<legacy>".to_string());
    let m = r.managers.entry(sid.clone()).or_insert(Manager {
        system_id: sid,
        created_at: now,
        contacted_at: None,
    });
    m.contacted_at = Some(now);
}

async fn admin_reset_token(Ax(st): Ax<Shared>, headers: HeaderMap, Path(id): Path<u64>) -> R {
    let mut s = lock(&st);
    let t = who(&s, &headers, Class::Runners { with_id: true }, Method::POST)?;
    may(&t, s.runners.get(&id).ok_or_else(not_found)?, Act::Manage)?;
    rotated(&mut s, id)
}

fn rotated(s: &mut State, id: u64) -> R {
    let new = s.rotate(id).ok_or_else(not_found)?;
    let expires = s.runners[&id].token_expires_at.clone();
    Ok((
        StatusCode::CREATED,
        Json(json!({ "token": new.expose(), "token_expires_at": expires })),
    )
        .into_response())
}

async fn job_request(Ax(st): Ax<Shared>, Extension(p): Extension<Params>) -> R {
    let token = p
        .nonempty("token")
        .ok_or_else(|| param_error("token is missing"))?;
    let system_id = p.nonempty("system_id");
    let mut s = lock(&st);
    let r = s.by_token(&token).ok_or_else(forbidden)?;
    heartbeat(r, system_id);
    // The fake never hands out jobs.
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_runner(Ax(st): Ax<Shared>, headers: HeaderMap, Path(id): Path<u64>) -> R {
    let s = lock(&st);
    let t = who(&s, &headers, Class::Runners { with_id: true }, Method::GET)?;
    let r = s.runners.get(&id).ok_or_else(not_found)?;
    may(&t, r, Act::Show)?;
    Ok(Json(s.runner_json(r)).into_response())
}

async fn update_runner(
    Ax(st): Ax<Shared>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Extension(p): Extension<Params>,
) -> R {
    let mut s = lock(&st);
    let t = who(&s, &headers, Class::Runners { with_id: true }, Method::PUT)?;
    may(&t, s.runners.get(&id).ok_or_else(not_found)?, Act::Manage)?;
    let paused = match (p.bool("paused")?, p.bool("active")?) {
        (Some(pz), _) => Some(pz),
        (None, Some(active)) => Some(!active),
        (None, None) => None,
    };
    let (locked, run_untagged, max) = (
        p.bool("locked")?,
        p.bool("run_untagged")?,
        p.u64("maximum_timeout")?,
    );
    let access = p.nonempty("access_level");
    if access
        .as_deref()
        .is_some_and(|a| a != "not_protected" && a != "ref_protected")
    {
        return Err(param_error("access_level does not have a valid value"));
    }
    // `Ci::Runners::UpdateRunnerService` → `render_validation_error!` (400, errors by field).
    if max.is_some_and(|m| m < 600) {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            body: json!({ "message": { "maximum_timeout": ["needs to be at least 10 minutes"] } }),
        });
    }
    let r = s.runners.get_mut(&id).ok_or_else(not_found)?;
    if let Some(v) = paused {
        r.paused = v;
    }
    if let Some(v) = p.str("description") {
        r.description = v;
    }
    if let Some(v) = p.list("tag_list") {
        r.tag_list = v;
    }
    if let Some(v) = locked {
        r.locked = v;
    }
    if let Some(v) = run_untagged {
        r.run_untagged = v;
    }
    if let Some(v) = access {
        r.access_level = v;
    }
    if max.is_some() {
        r.maximum_timeout = max;
    }
    if let Some(v) = p.str("maintenance_note") {
        r.maintenance_note = Some(v);
    }
    let r = &s.runners[&id];
    Ok(Json(s.runner_json(r)).into_response())
}

async fn delete_runner(Ax(st): Ax<Shared>, headers: HeaderMap, Path(id): Path<u64>) -> R {
    let mut s = lock(&st);
    let t = who(
        &s,
        &headers,
        Class::Runners { with_id: true },
        Method::DELETE,
    )?;
    may(&t, s.runners.get(&id).ok_or_else(not_found)?, Act::Manage)?;
    s.runners.remove(&id).ok_or_else(not_found)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_by_token(Ax(st): Ax<Shared>, Extension(p): Extension<Params>) -> R {
    let token = p
        .nonempty("token")
        .ok_or_else(|| param_error("token is missing"))?;
    let mut s = lock(&st);
    let id = s.by_token(&token).ok_or_else(forbidden)?.id;
    s.runners.remove(&id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_manager(Ax(st): Ax<Shared>, Extension(p): Extension<Params>) -> R {
    let token = p
        .nonempty("token")
        .ok_or_else(|| param_error("token is missing"))?;
    let sid = p
        .nonempty("system_id")
        .ok_or_else(|| param_error("system_id is missing"))?;
    let mut s = lock(&st);
    let r = s.by_token(&token).ok_or_else(forbidden)?;
    r.managers
        .remove(&sid)
        .ok_or_else(|| msg(StatusCode::NOT_FOUND, "404 Runner Manager Not Found"))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn runner_jobs(
    Ax(st): Ax<Shared>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Extension(p): Extension<Params>,
) -> R {
    let s = lock(&st);
    let t = who(&s, &headers, Class::Runners { with_id: true }, Method::GET)?;
    let r = s.runners.get(&id).ok_or_else(not_found)?;
    may(&t, r, Act::Manage)?;
    let want = p.nonempty("status");
    // `values: ::Ci::Build::AVAILABLE_STATUSES` (`app/models/concerns/ci/has_status.rb`).
    if want
        .as_deref()
        .is_some_and(|w| !super::state::JOB_STATUSES.contains(&w))
    {
        return Err(param_error("status does not have a valid value"));
    }
    let jobs: Vec<Value> = r
        .jobs
        .iter()
        .filter(|j| want.as_deref().is_none_or(|w| j.status == w))
        .map(|j| json!({ "id": j.id, "status": j.status, "name": "job", "stage": "test" }))
        .collect();
    Ok(Json(jobs).into_response())
}

async fn runner_managers(Ax(st): Ax<Shared>, headers: HeaderMap, Path(id): Path<u64>) -> R {
    let s = lock(&st);
    let t = who(&s, &headers, Class::Runners { with_id: true }, Method::GET)?;
    let r = s.runners.get(&id).ok_or_else(not_found)?;
    may(&t, r, Act::Show)?;
    let list: Vec<Value> = r
        .managers
        .values()
        .map(|m| json!({ "system_id": m.system_id, "created_at": iso(m.created_at), "contacted_at": m.contacted_at.map(iso) }))
        .collect();
    Ok(Json(list).into_response())
}

/// `GET /runners/all`: `authenticated_as_admin!`, then every runner.
async fn list_all_runners(
    Ax(st): Ax<Shared>,
    headers: HeaderMap,
    Extension(p): Extension<Params>,
) -> R {
    let s = lock(&st);
    let t = who(&s, &headers, Class::Runners { with_id: false }, Method::GET)?;
    if !t.admin {
        return Err(msg(StatusCode::FORBIDDEN, "403 Forbidden"));
    }
    listing(&s, &p, |_| true)
}

/// `GET /runners`: `current_user.ci_owned_runners` — the runners of the user's groups and
/// projects, for administrators too (no instance runners).
async fn list_runners(
    Ax(st): Ax<Shared>,
    headers: HeaderMap,
    Extension(p): Extension<Params>,
) -> R {
    let s = lock(&st);
    let t = who(&s, &headers, Class::Runners { with_id: false }, Method::GET)?;
    listing(&s, &p, |r| {
        r.runner_type != "instance_type" && r.creator.as_deref() == Some(t.user.as_str())
    })
}

/// One page of the runners `visible` keeps, filtered as `apply_filter` in `lib/api/ci/runners.rb`.
fn listing(s: &State, p: &Params, visible: impl Fn(&Runner) -> bool) -> R {
    let want_type = p.nonempty("type");
    if want_type
        .as_deref()
        .is_some_and(|t| !super::state::RUNNER_TYPES.contains(&t))
    {
        return Err(param_error("type does not have a valid value"));
    }
    let want_status = p.nonempty("status");
    let statuses = [
        "online",
        "offline",
        "stale",
        "never_contacted",
        "active",
        "paused",
    ];
    if want_status
        .as_deref()
        .is_some_and(|st| !statuses.contains(&st))
    {
        return Err(param_error("status does not have a valid value"));
    }
    let want_paused = p.bool("paused")?;
    let want_tags = p.list("tag_list").unwrap_or_default();
    let all: Vec<Value> = s
        .runners
        .values()
        .filter(|r| visible(r))
        .filter(|r| want_type.as_deref().is_none_or(|t| r.runner_type == t))
        .filter(|r| want_paused.is_none_or(|pz| r.paused == pz))
        .filter(|r| want_tags.iter().all(|t| r.tag_list.contains(t)))
        .filter(|r| match want_status.as_deref() {
            None => true,
            Some("active") => !r.paused,
            Some("paused") => r.paused,
            Some(st) => s.status(r) == st,
        })
        .map(|r| s.runner_brief(r))
        .collect();
    let per_page = p.u64("per_page")?.unwrap_or(20).clamp(1, 100) as usize;
    let page = p.u64("page")?.unwrap_or(1).max(1) as usize;
    let total = all.len();
    let pages = total.div_ceil(per_page).max(1);
    let items: Vec<Value> = all
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    let mut resp = Json(items).into_response();
    let h = resp.headers_mut();
    let num = |n: usize| HeaderValue::from_str(&n.to_string()).expect("digits are a valid header");
    h.insert("x-total", num(total));
    h.insert("x-total-pages", num(pages));
    h.insert("x-page", num(page));
    h.insert("x-per-page", num(per_page));
    if page < pages {
        h.insert("x-next-page", num(page + 1));
    }
    Ok(resp)
}

async fn legacy_register() -> Response {
    // Registration tokens are disabled by default since GitLab 17.0.
    msg(StatusCode::GONE, "410 Gone").into_response()
}
