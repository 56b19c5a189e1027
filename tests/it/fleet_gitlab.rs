//! The fleet's GitLab client (`imagectl::remote::gitlab`) against the stateful GitLab fake:
//! create/get/pause/jobs/delete/list with real HTTP, retries on 5xx for idempotent calls only,
//! 429/503 with `Retry-After` under a time budget, scopes and administrators as GitLab decides
//! them, typed errors with status, and no token in any error text.

use imagectl::remote::gitlab::{ClientOptions, GitlabClient, GitlabError, NewRunner};
use imagectl_proto::retry::Policy;
use imagectl_proto::Secret;
use imagectl_tests::gitlab_fake::GitlabFake;
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

fn fast() -> ClientOptions {
    ClientOptions {
        retry: Policy {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            budget: Duration::from_secs(10),
        },
        request_timeout: Duration::from_secs(10),
        ca_pem: None,
    }
}

/// [`fast`] with a total retry budget of `budget`.
fn budget(budget: Duration) -> ClientOptions {
    let mut o = fast();
    o.retry.budget = budget;
    o
}

/// The admin's client with a 1 s retry budget.
fn short_client(gl: &GitlabFake) -> GitlabClient {
    GitlabClient::new(
        &gl.url(),
        Secret::new(gl.admin_token()),
        budget(Duration::from_secs(1)),
    )
    .unwrap()
}

fn client(gl: &GitlabFake) -> GitlabClient {
    GitlabClient::new(
        &format!("{}/api/v4/", gl.url()),
        Secret::new(gl.admin_token()),
        fast(),
    )
    .expect("client")
}

fn new_runner(desc: &str) -> NewRunner {
    NewRunner {
        runner_type: "instance_type".into(),
        group_id: None,
        project_id: None,
        description: desc.into(),
        tag_list: vec!["docker".into(), "fleet".into()],
        run_untagged: false,
        locked: true,
        access_level: "ref_protected".into(),
        maximum_timeout: Some(3600),
        maintenance_note: Some("managed by imagectl; scope=test".into()),
    }
}

#[test]
fn runner_lifecycle_against_the_fake() {
    let gl = GitlabFake::start();
    let c = client(&gl);
    rt().block_on(async {
        let me = c
            .whoami()
            .await
            .unwrap()
            .expect("an api token may read /user");
        assert!(
            me.is_admin && c.is_admin(),
            "the fake's admin token is an administrator's"
        );
        let r = c
            .create_runner(&new_runner("imagectl/ci/ci-aaaaaa"))
            .await
            .expect("create");
        assert!(r.token.expose().starts_with("glrt-"));
        assert!(
            !format!("{r:?}").contains(r.token.expose()),
            "Debug shows the runner token"
        );
        let at_fake = gl.runner(r.id).expect("runner exists at the fake");
        assert_eq!(at_fake.description, "imagectl/ci/ci-aaaaaa");
        assert_eq!(at_fake.tag_list, ["docker", "fleet"]);
        assert!(!at_fake.run_untagged && at_fake.locked);
        assert_eq!(at_fake.access_level, "ref_protected");
        assert_eq!(at_fake.maximum_timeout, Some(3600));
        assert_eq!(at_fake.token.expose(), r.token.expose());

        let info = c.runner(r.id).await.expect("get");
        assert_eq!(info.status.as_deref(), Some("never_contacted"));
        assert_eq!(info.paused, Some(false));
        assert_eq!(
            info.maintenance_note.as_deref(),
            Some("managed by imagectl; scope=test")
        );

        c.pause(r.id).await.expect("pause");
        assert!(gl.runner(r.id).unwrap().paused);
        assert!(c.executing_jobs(r.id).await.unwrap().is_empty());
        // A drain waits for running and canceling jobs (GitLab's EXECUTING_STATUSES).
        let job = gl.add_running_job(r.id);
        let canceling = gl.add_job_with_status(r.id, "canceling");
        gl.add_job_with_status(r.id, "pending");
        let mut jobs: Vec<u64> = c
            .executing_jobs(r.id)
            .await
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect();
        jobs.sort();
        assert_eq!(jobs, [job, canceling]);
        gl.finish_jobs(r.id);
        assert!(c.executing_jobs(r.id).await.unwrap().is_empty());

        // Listing: prefix filter, across pages (the fake pages by 100 at most).
        for i in 0..105 {
            gl.create_runner(imagectl_tests::gitlab_fake::NewRunnerParams {
                description: format!("imagectl/other/o-{i:03}"),
                ..Default::default()
            });
        }
        let second = c
            .create_runner(&new_runner("imagectl/ci/ci-bbbbbb"))
            .await
            .unwrap();
        let all = c.list_runners(&[]).await.unwrap();
        assert_eq!(all.len(), 107, "all pages");
        let ci: Vec<u64> = c
            .runners_with_prefix("imagectl/ci/")
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ci, [r.id, second.id]);
        let tagged = c.list_runners(&["fleet".into()]).await.unwrap();
        assert_eq!(tagged.len(), 2);

        assert!(c.delete_runner(r.id).await.unwrap());
        assert!(gl.runner(r.id).is_none());
        assert!(
            !c.delete_runner(r.id).await.unwrap(),
            "deleting twice is fine"
        );
        let e = c.runner(r.id).await.unwrap_err();
        assert!(e.is_not_found(), "{e}");
    });
}

#[test]
fn idempotent_calls_retry_5xx_but_create_does_not() {
    let gl = GitlabFake::start();
    let c = client(&gl);
    rt().block_on(async {
        c.whoami().await.unwrap();
        let r = c
            .create_runner(&new_runner("imagectl/ci/ci-cccccc"))
            .await
            .unwrap();
        gl.fault("GET", &format!("/runners/{}", r.id), 502, 2);
        let info = c.runner(r.id).await.expect("third attempt succeeds");
        assert_eq!(info.id, r.id);
        let gets = gl.requests_to(&format!("/runners/{}", r.id));
        assert_eq!(gets.iter().filter(|q| q.method == "GET").count(), 3);

        gl.fault("DELETE", &format!("/runners/{}", r.id), 503, 1);
        assert!(c.delete_runner(r.id).await.unwrap());

        // A 500 on create may have happened after GitLab made the runner: never retried.
        gl.fault("POST", "/user/runners", 500, 1);
        let before = gl.requests_to("/user/runners").len();
        let e = c
            .create_runner(&new_runner("imagectl/ci/ci-dddddd"))
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(500), "{e}");
        assert_eq!(
            gl.requests_to("/user/runners").len(),
            before + 1,
            "create was retried"
        );
        // Persistent 5xx on a GET gives up when the budget is spent, with the status kept.
        let short = short_client(&gl);
        gl.fault("GET", "/runners", 500, 1000);
        let t = Instant::now();
        let e = short.list_runners(&[]).await.unwrap_err();
        assert!(matches!(e, GitlabError::Status { status: 500, .. }), "{e}");
        assert!(e.to_string().contains("not retried"), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "the budget was not kept"
        );
        gl.clear_faults();
    });
}

#[test]
fn auth_and_transport_errors_are_typed_and_never_show_the_token() {
    let gl = GitlabFake::start();
    let bad = GitlabClient::new(&gl.url(), Secret::new("glpat-wrongwrongwrong"), fast()).unwrap();
    rt().block_on(async {
        let e = bad
            .create_runner(&new_runner("imagectl/ci/x"))
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(401));
        let text = format!("{e} {e:?}");
        assert!(!text.contains("wrongwrongwrong"), "{text}");
        assert!(!text.contains(gl.admin_token()));
        // Nothing listens: a connect error, retried for create (nothing can have been made).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dead = GitlabClient::new(
            &format!("http://127.0.0.1:{port}"),
            Secret::new("glpat-x"),
            budget(Duration::from_secs(1)),
        )
        .unwrap();
        let t = Instant::now();
        let e = dead
            .create_runner(&new_runner("imagectl/ci/x"))
            .await
            .unwrap_err();
        assert!(
            matches!(e, GitlabError::Transport { connect: true, .. }),
            "{e}"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(60),
            "no backoff between attempts"
        );
    });
    let e = GitlabClient::new("gitlab.example.com", Secret::new("t"), fast()).unwrap_err();
    assert_eq!(imagectl::error::exit_code(&e), 2);
}

#[test]
fn throttling_and_unavailability_honour_retry_after_within_the_budget() {
    let gl = GitlabFake::start();
    let c = client(&gl);
    rt().block_on(async {
        let r = c
            .create_runner(&new_runner("imagectl/ci/ci-eeeeee"))
            .await
            .unwrap();
        // 429 Retry-After: 2 (as GitLab's throttle answers): the next try comes no sooner.
        let path = format!("/runners/{}", r.id);
        gl.fault_retry_after("GET", &path, 429, 2, 1);
        let t = Instant::now();
        c.runner(r.id)
            .await
            .expect("the retry after the wait succeeds");
        assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
        let gets: Vec<u16> = gl
            .requests_to(&path)
            .iter()
            .filter(|q| q.method == "GET")
            .map(|q| q.status)
            .collect();
        assert_eq!(gets, [429, 200]);
        // A burst of 503s: jittered back-off, then success.
        gl.fault("PUT", &path, 503, 4);
        c.pause(r.id).await.expect("pause after the 503 burst");
        assert!(gl.runner(r.id).unwrap().paused);
        // A throttled create was not processed: retried once the wait is over, one runner made.
        gl.fault_retry_after("POST", "/user/runners", 429, 1, 1);
        let before = gl.runners().len();
        c.create_runner(&new_runner("imagectl/ci/ci-ffffff"))
            .await
            .expect("create after the throttle");
        assert_eq!(gl.runners().len(), before + 1);
        // A wait that does not fit in the budget: no sleeping first, a clear error at once.
        let short = short_client(&gl);
        gl.fault_retry_after("GET", &path, 429, 30, 1);
        let t = Instant::now();
        let e = short.runner(r.id).await.unwrap_err();
        assert_eq!(e.status(), Some(429));
        assert!(e.to_string().contains("asked to wait 30 s"), "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "slept before giving up"
        );
    });
}

#[test]
fn listing_follows_the_token_not_a_guess() {
    let gl = GitlabFake::start();
    let token = gl.add_token(
        "ci-bot",
        &["create_runner", "manage_runner", "read_api"],
        false,
    );
    let c = GitlabClient::new(&gl.url(), Secret::new(&token), fast()).unwrap();
    rt().block_on(async {
        let info = c.token_info().await.unwrap();
        assert_eq!(info.scopes, ["create_runner", "manage_runner", "read_api"]);
        assert!(!c.whoami().await.unwrap().unwrap().is_admin);
        let mut group = new_runner("imagectl/ci/ci-gggggg");
        group.runner_type = "group_type".into();
        group.group_id = Some(7);
        let mine = c.create_runner(&group).await.unwrap();
        // Someone else's instance runner is not in a non-administrator's GET /runners.
        gl.create_runner(imagectl_tests::gitlab_fake::NewRunnerParams {
            description: "imagectl/ci/ci-hhhhhh".into(),
            ..Default::default()
        });
        let listed: Vec<u64> = c
            .runners_with_prefix("imagectl/ci/")
            .await
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(listed, [mine.id]);
        assert!(gl.requests_to("/api/v4/runners/all").is_empty());
        // An instance runner is refused with 403: nothing was made.
        let e = c
            .create_runner(&new_runner("imagectl/ci/x"))
            .await
            .unwrap_err();
        assert!(e.made_nothing(), "{e}");
        assert!(e.to_string().contains("Insufficient permissions"), "{e}");
    });
    // Without read_api the listing is refused with GitLab's insufficient_scope, naming the scopes.
    let narrow = gl.add_token("ci-bot", &["create_runner", "manage_runner"], false);
    let c = GitlabClient::new(&gl.url(), Secret::new(&narrow), fast()).unwrap();
    rt().block_on(async {
        let e = c.list_runners(&[]).await.unwrap_err();
        assert!(e.is_insufficient_scope(), "{e}");
        assert!(
            e.to_string().contains("GitLab accepts: api read_api"),
            "{e}"
        );
        assert!(!e.to_string().contains(&narrow));
    });
}
