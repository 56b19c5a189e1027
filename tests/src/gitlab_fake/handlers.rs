//! The GitLab fake's HTTP surface (axum 0.8): routes under `/api/v4`, parameter parsing (JSON,
//! form and query, as GitLab's Grape API accepts), the request log and fault injection.

use super::state::{iso, NewRunnerParams, RequestRecord, State};
use axum::body::Body;
use axum::extract::{Extension, Path, Request, State as Ax};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use imagectl_proto::Secret;
use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

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
        .route("/api/v4/runners/all", get(list_runners))
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
    key: &'static str,
    text: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert(self.key.to_owned(), Value::String(self.text));
        (self.status, Json(Value::Object(body))).into_response()
    }
}

fn msg(status: StatusCode, text: &str) -> ApiError {
    ApiError {
        status,
        key: "message",
        text: text.to_owned(),
    }
}
fn param_error(text: &str) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        key: "error",
        text: text.to_owned(),
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
            return msg(code, &format!("{} (injected fault)", code.as_u16())).into_response();
        }
    }
    parts.extensions.insert(params);
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    lock(&st).requests[idx].status = resp.status().as_u16();
    resp
}

fn admin(st: &State, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get("private-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned)
        });
    match given {
        Some(t) if t == st.admin_token => Ok(()),
        _ => Err(msg(StatusCode::UNAUTHORIZED, "401 Unauthorized")),
    }
}

type R = Result<Response, ApiError>;

async fn create_runner(
    Ax(st): Ax<Shared>,
    headers: HeaderMap,
    Extension(p): Extension<Params>,
) -> R {
    let mut s = lock(&st);
    admin(&s, &headers)?;
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
    let r = s.create(params);
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
    if token.starts_with("glrt-") && system_id.is_none() {
        return Err(param_error("system_id is missing"));
    }
    if r.orphaned {
        return Err(msg(StatusCode::UNPROCESSABLE_ENTITY, "Runner is orphaned"));
    }
    if let Some(sid) = system_id {
        r.managers
            .entry(sid.clone())
            .or_insert(super::state::Manager {
                system_id: sid,
                created_at: SystemTime::now(),
                contacted_at: None,
            });
    }
    let body =
        json!({ "id": r.id, "token": r.token.expose(), "token_expires_at": r.token_expires_at });
    Ok((StatusCode::OK, Json(body)).into_response())
}

async fn reset_token(Ax(st): Ax<Shared>, Extension(p): Extension<Params>) -> R {
    let token = p
        .nonempty("token")
        .ok_or_else(|| param_error("token is missing"))?;
    let mut s = lock(&st);
    let id = s.by_token(&token).ok_or_else(forbidden)?.id;
    rotated(&mut s, id)
}

async fn admin_reset_token(Ax(st): Ax<Shared>, headers: HeaderMap, Path(id): Path<u64>) -> R {
    let mut s = lock(&st);
    admin(&s, &headers)?;
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
    let now = SystemTime::now();
    r.contacted_at = Some(now);
    if let Some(sid) = system_id {
        let m = r
            .managers
            .entry(sid.clone())
            .or_insert(super::state::Manager {
                system_id: sid,
                created_at: now,
                contacted_at: None,
            });
        m.contacted_at = Some(now);
    }
    // The fake never hands out jobs.
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_runner(Ax(st): Ax<Shared>, headers: HeaderMap, Path(id): Path<u64>) -> R {
    let s = lock(&st);
    admin(&s, &headers)?;
    let r = s.runners.get(&id).ok_or_else(not_found)?;
    Ok(Json(s.runner_json(r)).into_response())
}

async fn update_runner(
    Ax(st): Ax<Shared>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Extension(p): Extension<Params>,
) -> R {
    let mut s = lock(&st);
    admin(&s, &headers)?;
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
    admin(&s, &headers)?;
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
    admin(&s, &headers)?;
    let r = s.runners.get(&id).ok_or_else(not_found)?;
    let want = p.nonempty("status");
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
    admin(&s, &headers)?;
    let r = s.runners.get(&id).ok_or_else(not_found)?;
    let list: Vec<Value> = r
        .managers
        .values()
        .map(|m| json!({ "system_id": m.system_id, "created_at": iso(m.created_at), "contacted_at": m.contacted_at.map(iso) }))
        .collect();
    Ok(Json(list).into_response())
}

async fn list_runners(
    Ax(st): Ax<Shared>,
    headers: HeaderMap,
    Extension(p): Extension<Params>,
) -> R {
    let s = lock(&st);
    admin(&s, &headers)?;
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
