//! Back-off against the GitLab fake: a 429 with `Retry-After` (answered as GitLab's Rack::Attack
//! answers it) is waited out, a burst of 503s is ridden out under the budget, and a wait that does
//! not fit in the budget ends the run at once, cleanly.

use super::Env;
use imagectl_proto::AgentState;
use std::time::{Duration, Instant};

fn statuses(env: &Env, path: &str) -> Vec<u16> {
    env.gl.requests_to(path).iter().map(|r| r.status).collect()
}

#[test]
fn a_429_with_retry_after_is_waited_out() {
    let env = Env::new();
    env.gl
        .fault_retry_after("POST", "/runners/verify", 429, 2, 1);
    let t0 = Instant::now();
    imagectl_agent::run(&env.opts()).unwrap();
    // The agent's own back-off starts at 20 ms: only Retry-After explains two seconds.
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    assert_eq!(statuses(&env, "/runners/verify"), vec![429, 200]);
    assert_eq!(
        statuses(&env, "/runners/reset_authentication_token"),
        vec![201]
    );
    assert_eq!(env.status().state, AgentState::Registered);
}

#[test]
fn a_burst_of_503s_is_ridden_out_under_the_budget() {
    let env = Env::new();
    env.gl.fault("POST", "/runners/verify", 503, 4);
    // And the rotation is told to come back in a second.
    env.gl
        .fault_retry_after("POST", "/runners/reset_authentication_token", 503, 1, 1);
    let mut opts = env.opts();
    opts.budget = Some(Duration::from_secs(8));
    let t0 = Instant::now();
    imagectl_agent::run(&opts).unwrap();
    assert_eq!(
        statuses(&env, "/runners/verify"),
        vec![503, 503, 503, 503, 200]
    );
    assert_eq!(
        statuses(&env, "/runners/reset_authentication_token"),
        vec![503, 201]
    );
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(env.status().state, AgentState::Registered);
    // Still one runner and one manager: retries register nothing twice.
    assert_eq!(env.gl.runners().len(), 1);
    assert_eq!(env.gl.runner(env.runner.id).unwrap().managers.len(), 1);
}

#[test]
fn a_retry_after_beyond_the_budget_fails_at_once_and_cleanly() {
    let env = Env::new();
    env.gl
        .fault_retry_after("POST", "/runners/verify", 429, 30, 1);
    let mut opts = env.opts();
    opts.budget = Some(Duration::from_secs(5));
    let t0 = Instant::now();
    let err = imagectl_agent::run(&opts).unwrap_err();
    let text = format!("{err:#}");
    // No point sleeping 5 s to fail anyway: it gives up on the first answer.
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(
        text.contains("HTTP 429 (Retry-After 30 s)")
            && text.contains("asked to wait 30 s")
            && text.contains("budget"),
        "{text}"
    );
    assert_eq!(statuses(&env, "/runners/verify"), vec![429]);
    assert!(env
        .gl
        .requests_to("/runners/reset_authentication_token")
        .is_empty());
    env.assert_failed_cleanly();
    assert!(!text.contains(env.runner.token.expose()));
    // Nothing left at GitLab: no manager was made, the seed's token was not rotated.
    assert_eq!(env.gl.runners().len(), 1);
    assert!(env.gl.runner(env.runner.id).unwrap().managers.is_empty());
    assert_eq!(env.gl.token(env.runner.id).unwrap(), env.runner.token);
    let st = env.status();
    assert!(
        st.error
            .as_deref()
            .unwrap_or("")
            .contains("asked to wait 30 s"),
        "{st:?}"
    );
}

#[test]
fn exhausted_503s_without_retry_after_name_the_budget() {
    let env = Env::new();
    env.gl
        .fault("POST", "/runners/reset_authentication_token", 503, 10_000);
    let mut opts = env.opts();
    opts.budget = Some(Duration::from_millis(500));
    let err = imagectl_agent::run(&opts).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("retry time budget is used up") && text.contains("HTTP 503"),
        "{text}"
    );
    assert!(
        env.gl
            .requests_to("/runners/reset_authentication_token")
            .len()
            >= 2
    );
    env.assert_failed_cleanly();
}
