//! The fake's own behaviour, exercised over HTTP.

use super::*;
use serde_json::{json, Value};

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent()
}

fn read(mut resp: ureq::http::Response<ureq::Body>) -> (u16, Value) {
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn post(gl: &GitlabFake, path: &str, body: Value) -> (u16, Value) {
    read(
        agent()
            .post(format!("{}/api/v4{path}", gl.url()))
            .send_json(body)
            .unwrap(),
    )
}

fn admin_get(gl: &GitlabFake, path: &str) -> (u16, Value) {
    read(
        agent()
            .get(format!("{}/api/v4{path}", gl.url()))
            .header("PRIVATE-TOKEN", gl.admin_token())
            .call()
            .unwrap(),
    )
}

#[test]
fn create_requires_admin_and_valid_type() {
    let gl = GitlabFake::start();
    let url = format!("{}/api/v4/user/runners", gl.url());
    let (st, _) = read(
        agent()
            .post(&url)
            .send_json(json!({"runner_type": "instance_type"}))
            .unwrap(),
    );
    assert_eq!(st, 401);
    let (st, body) = read(
        agent()
            .post(&url)
            .header("PRIVATE-TOKEN", gl.admin_token())
            .send_json(json!({"runner_type": "group_type"}))
            .unwrap(),
    );
    assert_eq!(
        (st, body["error"].as_str()),
        (400, Some("group_id is missing"))
    );
    // Form body, like curl --form / -d.
    let (st, body) = read(
        agent()
            .post(&url)
            .header("PRIVATE-TOKEN", gl.admin_token())
            .content_type("application/x-www-form-urlencoded")
            .send("runner_type=instance_type&description=vm%201&tag_list[]=docker&tag_list[]=linux&paused=true")
            .unwrap(),
    );
    assert_eq!(st, 201, "{body}");
    assert!(body["token"].as_str().unwrap().starts_with("glrt-"));
    let r = gl.runner(body["id"].as_u64().unwrap()).unwrap();
    assert_eq!(r.description, "vm 1");
    assert_eq!(r.tag_list, vec!["docker", "linux"]);
    assert!(r.paused && r.run_untagged);
}

#[test]
fn verify_heartbeats_the_runner_and_its_manager() {
    let gl = GitlabFake::start();
    let r = gl.create_runner(NewRunnerParams::default());
    // No system_id: GitLab makes a `<legacy>` manager (lib/api/ci/helpers/runner.rb).
    let other = gl.create_runner(NewRunnerParams::default());
    let (st, _) = post(
        &gl,
        "/runners/verify",
        json!({"token": other.token.expose()}),
    );
    assert_eq!(st, 200);
    let managers: Vec<String> = gl.runner(other.id).unwrap().managers.into_keys().collect();
    assert_eq!(managers, ["<legacy>"]);
    let (st, _) = post(
        &gl,
        "/runners/verify",
        json!({"token": "glrt-nope", "system_id": "s_000000000000"}),
    );
    assert_eq!(st, 403);
    let (st, body) = post(
        &gl,
        "/runners/verify",
        json!({"token": r.token.expose(), "system_id": "s_0123456789ab"}),
    );
    assert_eq!(st, 200);
    assert_eq!(body["id"].as_u64(), Some(r.id));
    assert!(gl
        .runner(r.id)
        .unwrap()
        .managers
        .contains_key("s_0123456789ab"));
    // Verify is a heartbeat (`authenticate_runner!`): the runner is online at once, so "online"
    // proves nothing about gitlab-runner polling.
    assert_eq!(gl.status(r.id).as_deref(), Some("online"));
    gl.set_orphaned(r.id, true);
    let (st, _) = post(
        &gl,
        "/runners/verify",
        json!({"token": r.token.expose(), "system_id": "s_0123456789ab"}),
    );
    assert_eq!(st, 422);
    let log = gl.requests_to("/runners/verify");
    assert_eq!(log.len(), 4);
    assert_eq!(log[2].system_id.as_deref(), Some("s_0123456789ab"));
    assert_eq!(
        log[2].token.as_ref().map(|t| t.expose()),
        Some(r.token.expose())
    );
    assert!(
        !format!("{log:?}").contains(r.token.expose()),
        "the log's Debug must redact tokens"
    );
}

#[test]
fn rotation_kills_the_old_token() {
    let gl = GitlabFake::start();
    let r = gl.create_runner(NewRunnerParams::default());
    let (st, body) = post(
        &gl,
        "/runners/reset_authentication_token",
        json!({"token": r.token.expose()}),
    );
    assert_eq!(st, 201);
    let new = body["token"].as_str().unwrap().to_owned();
    assert_ne!(new, r.token.expose());
    let (st, _) = post(
        &gl,
        "/runners/verify",
        json!({"token": r.token.expose(), "system_id": "s_000000000001"}),
    );
    assert_eq!(st, 403);
    let (st, _) = post(
        &gl,
        "/runners/reset_authentication_token",
        json!({"token": r.token.expose()}),
    );
    assert_eq!(st, 403);
    let (st, _) = post(
        &gl,
        "/runners/verify",
        json!({"token": new, "system_id": "s_000000000001"}),
    );
    assert_eq!(st, 200);
    // Admin rotation.
    let resp = agent()
        .post(format!(
            "{}/api/v4/runners/{}/reset_authentication_token",
            gl.url(),
            r.id
        ))
        .header("PRIVATE-TOKEN", gl.admin_token())
        .send_empty()
        .unwrap();
    let (st, body) = read(resp);
    assert_eq!(st, 201);
    assert_ne!(body["token"].as_str(), Some(new.as_str()));
    let (st, _) = post(&gl, "/jobs/request", json!({"token": new}));
    assert_eq!(st, 403);
}

#[test]
fn legacy_registration_is_gone() {
    let gl = GitlabFake::start();
    let (st, _) = post(
        &gl,
        "/runners",
        json!({"token": "GR1348941abc", "description": "x"}),
    );
    assert_eq!(st, 410);
}

#[test]
fn job_requests_make_a_runner_online_then_offline() {
    let gl = GitlabFake::start();
    let r = gl.create_runner(NewRunnerParams {
        tag_list: vec!["docker".into()],
        ..Default::default()
    });
    let (st, _) = post(
        &gl,
        "/jobs/request",
        json!({"token": r.token.expose(), "system_id": "s_aaaaaaaaaaaa", "info": {"name": "gitlab-runner"}}),
    );
    assert_eq!(st, 204);
    let (st, body) = admin_get(&gl, &format!("/runners/{}", r.id));
    assert_eq!((st, body["status"].as_str()), (200, Some("online")));
    assert!(body["contacted_at"].is_string());
    assert!(gl.runner(r.id).unwrap().managers["s_aaaaaaaaaaaa"]
        .contacted_at
        .is_some());
    gl.set_online_threshold(Duration::ZERO);
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(gl.status(r.id).as_deref(), Some("offline"));
    let (_, list) = admin_get(&gl, "/runners/all?status=offline&tag_list=docker");
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (_, list) = admin_get(&gl, "/runners/all?status=online");
    assert_eq!(list.as_array().unwrap().len(), 0);
}

#[test]
fn pause_jobs_and_delete() {
    let gl = GitlabFake::start();
    let a = gl.create_runner(NewRunnerParams::default());
    let b = gl.create_runner(NewRunnerParams::default());
    let resp = agent()
        .put(format!("{}/api/v4/runners/{}", gl.url(), a.id))
        .header("PRIVATE-TOKEN", gl.admin_token())
        .send_json(json!({"paused": true}))
        .unwrap();
    assert_eq!(read(resp).1["paused"], json!(true));
    let (_, list) = admin_get(&gl, "/runners/all?paused=true");
    assert_eq!(list.as_array().unwrap().len(), 1);
    gl.add_running_job(a.id);
    let (_, jobs) = admin_get(&gl, &format!("/runners/{}/jobs?status=running", a.id));
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    gl.finish_jobs(a.id);
    let (_, jobs) = admin_get(&gl, &format!("/runners/{}/jobs?status=running", a.id));
    assert_eq!(jobs, json!([]));
    let resp = agent()
        .delete(format!("{}/api/v4/runners/{}", gl.url(), a.id))
        .header("PRIVATE-TOKEN", gl.admin_token())
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert!(gl.runner(a.id).is_none());
    // Runner-authenticated deletes: one manager, then the runner.
    post(
        &gl,
        "/runners/verify",
        json!({"token": b.token.expose(), "system_id": "s_bbbbbbbbbbbb"}),
    );
    let del = |q: String| {
        agent()
            .delete(format!("{}/api/v4{q}", gl.url()))
            .call()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(
        del(format!(
            "/runners/managers?token={}&system_id=s_bbbbbbbbbbbb",
            b.token.expose()
        )),
        204
    );
    assert!(gl.runner(b.id).unwrap().managers.is_empty());
    assert_eq!(del(format!("/runners?token={}", b.token.expose())), 204);
    assert!(gl.runners().is_empty());
}

#[test]
fn faults_apply_the_given_number_of_times() {
    let gl = GitlabFake::start();
    let r = gl.create_runner(NewRunnerParams::default());
    gl.fault("POST", "/runners/verify", 503, 2);
    let body = json!({"token": r.token.expose(), "system_id": "s_cccccccccccc"});
    assert_eq!(post(&gl, "/runners/verify", body.clone()).0, 503);
    assert_eq!(post(&gl, "/runners/verify", body.clone()).0, 503);
    assert_eq!(post(&gl, "/runners/verify", body.clone()).0, 200);
    let log = gl.requests_to("/runners/verify");
    assert_eq!(log.iter().filter(|r| r.injected).count(), 2);
    assert!(log
        .iter()
        .all(|r| r.system_id.as_deref() == Some("s_cccccccccccc")));
    gl.delay("*", "/runners/verify", Duration::from_millis(200), 1);
    let t0 = std::time::Instant::now();
    assert_eq!(post(&gl, "/runners/verify", body).0, 200);
    assert!(t0.elapsed() >= Duration::from_millis(200));
}

#[test]
fn a_hung_request_does_not_block_drop() {
    let gl = GitlabFake::start();
    gl.hang("*", "/runners/verify", 1);
    let url = format!("{}/api/v4/runners/verify", gl.url());
    let client = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_millis(300)))
        .build()
        .new_agent();
    assert!(client.post(&url).send_json(json!({"token": "x"})).is_err());
    let t0 = std::time::Instant::now();
    drop(gl);
    assert!(t0.elapsed() < Duration::from_secs(5));
}
