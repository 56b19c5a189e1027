//! The fake's GitLab rules, each as GitLab's source states it: scopes per token, the token's
//! self-description, administrators, heartbeats and managers, the runner model's validations,
//! job statuses, and throttling.

use super::*;
use serde_json::{json, Value};

fn call(
    method: &str,
    gl: &GitlabFake,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}/api/v4{path}", gl.url());
    let with = |r: ureq::RequestBuilder<ureq::typestate::WithoutBody>| match token {
        Some(t) => r.header("PRIVATE-TOKEN", t),
        None => r,
    };
    let withb = |r: ureq::RequestBuilder<ureq::typestate::WithBody>| match token {
        Some(t) => r.header("PRIVATE-TOKEN", t),
        None => r,
    };
    let resp = match method {
        "GET" => with(agent.get(&url)).call(),
        "DELETE" => with(agent.delete(&url)).call(),
        "PUT" => withb(agent.put(&url)).send_json(body.unwrap_or(json!({}))),
        _ => withb(agent.post(&url)).send_json(body.unwrap_or(json!({}))),
    };
    let mut resp = resp.expect("an HTTP answer");
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        retry,
    )
}

fn group_runner() -> Value {
    json!({"runner_type": "group_type", "group_id": 7, "tag_list": ["docker"]})
}

#[test]
fn scopes_decide_what_a_token_may_call() {
    let gl = GitlabFake::start();
    let minimal = gl.add_token("ci", &["create_runner", "manage_runner"], false);
    let reader = gl.add_token("ci", &["read_api"], false);
    // create_runner creates (lib/api/user_runners.rb) …
    let (st, body, _) = call(
        "POST",
        &gl,
        "/user/runners",
        Some(&minimal),
        Some(group_runner()),
    );
    assert_eq!(st, 201, "{body}");
    let id = body["id"].as_u64().unwrap();
    // … manage_runner reaches /runners/:id (lib/api/ci/runners.rb) …
    let (st, _, _) = call("GET", &gl, &format!("/runners/{id}"), Some(&minimal), None);
    assert_eq!(st, 200);
    let (st, _, _) = call(
        "GET",
        &gl,
        &format!("/runners/{id}/jobs"),
        Some(&minimal),
        None,
    );
    assert_eq!(st, 200);
    // … but not GET /runners: that needs read_api (lib/api/api.rb).
    let (st, body, _) = call("GET", &gl, "/runners", Some(&minimal), None);
    assert_eq!(st, 403);
    assert_eq!(body["error"], "insufficient_scope");
    assert_eq!(body["scope"], "api read_api");
    // read_api lists, and reads, but cannot pause, delete or create.
    let (st, list, _) = call("GET", &gl, "/runners", Some(&reader), None);
    assert_eq!(st, 200);
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "the user's own runner"
    );
    let (st, body, _) = call(
        "PUT",
        &gl,
        &format!("/runners/{id}"),
        Some(&reader),
        Some(json!({"paused": true})),
    );
    assert_eq!(
        (st, body["scope"].as_str()),
        (403, Some("api manage_runner"))
    );
    let (st, _, _) = call(
        "POST",
        &gl,
        "/user/runners",
        Some(&reader),
        Some(group_runner()),
    );
    assert_eq!(st, 403);
    // Unknown and revoked tokens: 401.
    let (st, _, _) = call("GET", &gl, "/runners", Some("glpat-nope"), None);
    assert_eq!(st, 401);
    gl.revoke_token(&reader);
    let (st, _, _) = call("GET", &gl, "/runners", Some(&reader), None);
    assert_eq!(st, 401);
}

#[test]
fn token_self_user_and_admin_routes() {
    let gl = GitlabFake::start();
    let t = gl.add_token("ci", &["create_runner"], false);
    // Any scope may read the token itself (self_information.rb).
    let (st, body, _) = call("GET", &gl, "/personal_access_tokens/self", Some(&t), None);
    assert_eq!(st, 200);
    assert_eq!(body["scopes"], json!(["create_runner"]));
    assert_eq!(body["active"], true);
    // GET /user needs read_user/read_api/api (users.rb): create_runner alone cannot.
    let (st, _, _) = call("GET", &gl, "/user", Some(&t), None);
    assert_eq!(st, 403);
    let r = gl.add_token("ci", &["read_api"], false);
    let (st, body, _) = call("GET", &gl, "/user", Some(&r), None);
    assert_eq!(st, 200);
    assert!(
        body.get("is_admin").is_none(),
        "is_admin only for administrators: {body}"
    );
    let (_, body, _) = call("GET", &gl, "/user", Some(gl.admin_token()), None);
    assert_eq!(body["is_admin"], true);
    // /runners/all: administrators only, whatever the scopes.
    let api = gl.add_token("ci", &["api"], false);
    let (st, _, _) = call("GET", &gl, "/runners/all", Some(&api), None);
    assert_eq!(st, 403);
    let (st, _, _) = call("GET", &gl, "/runners/all", Some(gl.admin_token()), None);
    assert_eq!(st, 200);
    // Instance runners: administrators only (InstanceRunnerStrategy).
    let (st, body, _) = call(
        "POST",
        &gl,
        "/user/runners",
        Some(&api),
        Some(json!({"runner_type": "instance_type"})),
    );
    assert_eq!(
        (st, body["message"].as_str()),
        (403, Some("403 Forbidden - Insufficient permissions"))
    );
    // Another user's group runner: no access (authenticate_update_runner!).
    let (_, body, _) = call(
        "POST",
        &gl,
        "/user/runners",
        Some(gl.admin_token()),
        Some(group_runner()),
    );
    let id = body["id"].as_u64().unwrap();
    let (st, body, _) = call("DELETE", &gl, &format!("/runners/{id}"), Some(&api), None);
    assert_eq!(
        (st, body["message"].as_str()),
        (403, Some("403 Forbidden - No access granted"))
    );
}

#[test]
fn runner_model_validations() {
    let gl = GitlabFake::start();
    let admin = Some(gl.admin_token());
    let (st, body, _) = call(
        "POST",
        &gl,
        "/user/runners",
        admin,
        Some(
            json!({"runner_type": "instance_type", "maximum_timeout": 599, "run_untagged": false}),
        ),
    );
    assert_eq!(st, 400);
    assert_eq!(
        body["message"],
        "400 Bad request - Maximum timeout needs to be at least 10 minutes and Tags list can not be \
         empty when runner is not allowed to pick untagged jobs"
    );
    let tags: Vec<String> = (0..51).map(|i| format!("t{i}")).collect();
    let (st, body, _) = call(
        "POST",
        &gl,
        "/user/runners",
        admin,
        Some(json!({"runner_type": "instance_type", "tag_list": tags})),
    );
    assert_eq!(st, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("maximum is 50 tags"),
        "{body}"
    );
    let (st, body, _) = call(
        "POST",
        &gl,
        "/user/runners",
        admin,
        Some(json!({"runner_type": "instance_type", "group_id": 7})),
    );
    assert_eq!(st, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("cannot have groups"),
        "{body}"
    );
    assert!(gl.runners().is_empty(), "a refused create made a runner");
}

#[test]
fn reset_heartbeats_and_without_system_id_makes_a_legacy_manager() {
    let gl = GitlabFake::start();
    let r = gl.create_runner(NewRunnerParams::default());
    let (st, body, _) = call(
        "POST",
        &gl,
        "/runners/reset_authentication_token",
        None,
        Some(json!({"token": r.token.expose(), "system_id": "s_0123456789ab"})),
    );
    assert_eq!(st, 201);
    let managers: Vec<String> = gl.runner(r.id).unwrap().managers.into_keys().collect();
    assert_eq!(
        managers,
        ["s_0123456789ab"],
        "one manager when system_id is sent"
    );
    assert_eq!(
        gl.status(r.id).as_deref(),
        Some("online"),
        "reset is a heartbeat"
    );
    let token = body["token"].as_str().unwrap().to_owned();
    let (st, _, _) = call(
        "POST",
        &gl,
        "/runners/reset_authentication_token",
        None,
        Some(json!({"token": token})),
    );
    assert_eq!(st, 201);
    let managers: Vec<String> = gl.runner(r.id).unwrap().managers.into_keys().collect();
    assert_eq!(managers, ["<legacy>", "s_0123456789ab"]);
}

#[test]
fn job_statuses_and_canceling_jobs() {
    let gl = GitlabFake::start();
    let r = gl.create_runner(NewRunnerParams::default());
    gl.add_job_with_status(r.id, "canceling");
    gl.add_running_job(r.id);
    gl.add_job_with_status(r.id, "success");
    let admin = Some(gl.admin_token());
    let (st, jobs, _) = call(
        "GET",
        &gl,
        &format!("/runners/{}/jobs?status=canceling", r.id),
        admin,
        None,
    );
    assert_eq!((st, jobs.as_array().map(Vec::len)), (200, Some(1)));
    let (st, body, _) = call(
        "GET",
        &gl,
        &format!("/runners/{}/jobs?status=cancelling", r.id),
        admin,
        None,
    );
    assert_eq!(
        (st, body["error"].as_str()),
        (400, Some("status does not have a valid value"))
    );
    gl.finish_jobs(r.id);
    let (_, jobs, _) = call(
        "GET",
        &gl,
        &format!("/runners/{}/jobs?status=canceled", r.id),
        admin,
        None,
    );
    assert_eq!(
        jobs.as_array().map(Vec::len),
        Some(1),
        "canceling ends as canceled"
    );
}

#[test]
fn throttling_answers_like_rack_attack() {
    let gl = GitlabFake::start();
    gl.fault_retry_after("GET", "/runners/all", 429, 2, 1);
    let (st, body, retry) = call("GET", &gl, "/runners/all", Some(gl.admin_token()), None);
    assert_eq!(st, 429);
    assert_eq!(body, Value::String("Retry later\n".into()));
    assert_eq!(retry.as_deref(), Some("2"));
    let (st, _, retry) = call("GET", &gl, "/runners/all", Some(gl.admin_token()), None);
    assert_eq!(
        (st, retry),
        (200, None),
        "one throttled answer, then normal service"
    );
}
