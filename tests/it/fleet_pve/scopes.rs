//! GitLab token scopes, as GitLab enforces them (the fake cites gitlabhq for each rule): every
//! fleet command with a non-administrator token holding `create_runner`, `manage_runner` and
//! `read_api`; a missing scope exits 2 before anything is made; without `read_api`, `destroy`
//! and `gc` finish their work, exit 0 and say what they could not check; a create GitLab refused
//! is not reported as a possible leftover.

use super::{names, stderr, PveFleet};
use imagectl_tests::pve_guest::GuestOptions;
use serde_json::{json, Value};

/// `POST /user/runners` with the environment's token, as a deploy whose answer was lost would
/// have done; returns the runner id.
fn create_runner(env: &PveFleet, description: &str, note: Option<String>) -> u64 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .post(format!("{}/api/v4/user/runners", env.gl.url()))
        .header("PRIVATE-TOKEN", &env.token)
        .send_json(json!({
            "runner_type": "group_type",
            "group_id": 7,
            "description": description,
            "maintenance_note": note,
        }))
        .expect("POST /user/runners");
    assert_eq!(resp.status().as_u16(), 201, "creating the orphan runner");
    let v: Value = resp.body_mut().read_json().expect("runner JSON");
    v["id"].as_u64().expect("runner id")
}

/// `args` for a group runner (a non-administrator may not create instance runners).
fn group<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut a = args.to_vec();
    a.extend(["--runner-type", "group_type", "--group-id", "7"]);
    a
}

#[test]
fn fleet_pve_every_command_with_a_non_admin_token() {
    let mut env = PveFleet::new(0.0, GuestOptions::default());
    env.publish("1.0");
    env.publish("2.0");
    env.token = env.gl.add_token(
        "ci-bot",
        &["create_runner", "manage_runner", "read_api"],
        false,
    );
    let fleet = "scoped";

    let (o, rep) = env.json(&group(&[
        "deploy", "--fleet", fleet, "--count", "2", "--image", "1.0",
    ]));
    assert!(o.status.success(), "deploy: {rep}\n{}", stderr(&o));
    assert_eq!(names(&rep, "created").len(), 2, "{rep}");
    // status reads every runner from GitLab (fakepve's VMs run no node_exporter, so "healthy"
    // is false and the exit code 1 here).
    let (o, rep) = env.json(&["status", "--fleet", fleet]);
    assert_ne!(o.status.code(), Some(2), "status: {rep}\n{}", stderr(&o));
    let vms = rep["vms"].as_array().expect("status lists the VMs");
    assert_eq!(vms.len(), 2, "{rep}");
    assert!(
        vms.iter().all(|v| v["gitlab_status"] == "online"),
        "status could not read the runners: {rep}"
    );
    let victim = env.vms(fleet)[0].name.clone();
    let (o, rep) = env.json(&group(&["replace", "--fleet", fleet, &victim]));
    assert!(o.status.success(), "replace: {rep}\n{}", stderr(&o));
    let (o, rep) = env.json(&group(&["deploy", "--fleet", fleet, "--image", "2.0"]));
    assert!(o.status.success(), "rollout: {rep}\n{}", stderr(&o));
    let (o, rep) = env.json(&group(&["rollback", "--fleet", fleet]));
    assert!(o.status.success(), "rollback: {rep}\n{}", stderr(&o));
    let o = env.run(&["targets", "--fleet", fleet]);
    assert!(o.status.success(), "targets: {}", stderr(&o));
    // An orphan runner of this installation (as a lost create answer leaves one), made with the
    // same token, for gc to find with GET /runners.
    let note = env.runners(fleet)[0].maintenance_note.clone();
    let runner = create_runner(&env, &format!("imagectl/{fleet}/{fleet}-lost01"), note);
    let (o, rep) = env.json(&["gc", "--fleet", fleet]);
    assert!(o.status.success(), "gc: {rep}\n{}", stderr(&o));
    assert!(
        env.gl.runner(runner).is_none(),
        "gc left the orphan runner {runner}: {rep}"
    );
    let (o, rep) = env.json(&["destroy", "--fleet", fleet]);
    assert!(o.status.success(), "destroy: {rep}\n{}", stderr(&o));
    env.assert_nothing_left(fleet);

    let paths: Vec<String> = env.gl.requests().into_iter().map(|r| r.path).collect();
    assert!(
        paths.iter().all(|p| p != "/api/v4/runners/all"),
        "a non-administrator token was sent to GET /runners/all"
    );
    assert!(
        paths.iter().any(|p| p == "/api/v4/runners"),
        "gc listed nothing"
    );
    let preflights = paths
        .iter()
        .filter(|p| *p == "/api/v4/personal_access_tokens/self")
        .count();
    assert!(
        preflights >= 7,
        "{preflights} preflights for 7 GitLab commands"
    );
    let refused: Vec<_> = env
        .gl
        .requests()
        .into_iter()
        // A drained VM's gitlab-runner gets 403 once its runner is deleted, as the real one would.
        .filter(|r| (r.status == 401 || r.status == 403) && r.path != "/api/v4/jobs/request")
        .map(|r| format!("{} {} {}", r.method, r.path, r.status))
        .collect();
    assert!(refused.is_empty(), "GitLab refused: {refused:?}");
    env.assert_no_tokens();
}

#[test]
fn fleet_pve_scopes_are_checked_before_anything_is_made() {
    let mut env = PveFleet::new(0.0, GuestOptions::default());
    env.publish("1.0");
    let fleet = "noscope";

    // No create_runner: deploy exits 2 at once, naming the command and the scope.
    env.token = env
        .gl
        .add_token("ops", &["manage_runner", "read_api"], false);
    let o = env.run(&group(&[
        "deploy", "--fleet", fleet, "--count", "1", "--image", "1.0",
    ]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("imagectl deploy needs") && err.contains("create_runner"),
        "{err}"
    );
    assert!(err.lines().count() <= 3, "a short message: {err}");
    env.assert_nothing_left(fleet);
    assert!(
        env.gl.requests_to("/api/v4/user/runners").is_empty(),
        "deploy called GitLab's create after a failed preflight"
    );

    // status needs to read runners: a create_runner-only token cannot.
    env.token = env.gl.add_token("creator", &["create_runner"], false);
    let o = env.run(&["status", "--fleet", fleet]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("manage_runner"), "{}", stderr(&o));

    // A revoked token: exit 2, nothing made.
    let revoked = env.gl.add_token(
        "old",
        &["create_runner", "manage_runner", "read_api"],
        false,
    );
    env.gl.revoke_token(&revoked);
    env.token = revoked;
    let o = env.run(&group(&[
        "deploy", "--fleet", fleet, "--count", "1", "--image", "1.0",
    ]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));
    env.assert_nothing_left(fleet);

    // The documented minimum without read_api: deploy works; destroy and gc finish, exit 0,
    // and say what they could not check and which scope would let them.
    env.token = env
        .gl
        .add_token("minimal", &["create_runner", "manage_runner"], false);
    let (o, rep) = env.json(&group(&[
        "deploy", "--fleet", fleet, "--count", "1", "--image", "1.0",
    ]));
    assert!(o.status.success(), "deploy: {rep}\n{}", stderr(&o));
    let (o, rep) = env.json(&["gc", "--fleet", fleet]);
    assert!(o.status.success(), "gc: {rep}\n{}", stderr(&o));
    let unchecked = rep["orphans"]["unchecked"].to_string();
    assert!(unchecked.contains("read_api"), "gc: {rep}");
    let (o, rep) = env.json(&["destroy", "--fleet", fleet]);
    assert!(o.status.success(), "destroy: {rep}\n{}", stderr(&o));
    assert!(rep["unchecked"].to_string().contains("read_api"), "{rep}");
    assert!(stderr(&o).contains("warning: the GitLab token has no read_api"));
    env.assert_nothing_left(fleet);
    assert!(
        env.gl
            .requests()
            .iter()
            .all(|r| r.path != "/api/v4/runners" && r.path != "/api/v4/runners/all"),
        "a listing was tried although the token cannot list"
    );

    // A create GitLab refuses (a non-administrator asking for an instance runner: 403) made
    // nothing, so nothing is reported as maybe left behind.
    env.token = env.gl.add_token(
        "grouponly",
        &["create_runner", "manage_runner", "read_api"],
        false,
    );
    let (o, rep) = env.json(&["deploy", "--fleet", fleet, "--count", "1", "--image", "1.0"]);
    assert_eq!(o.status.code(), Some(1), "{rep}\n{}", stderr(&o));
    let text = rep.to_string();
    assert!(text.contains("Insufficient permissions"), "{rep}");
    assert!(!text.contains("maybe a runner"), "{rep}");
    env.assert_nothing_left(fleet);
    env.assert_no_tokens();
}
