//! The fleet's GitLab client (`imagectl::remote::gitlab`) against the stateful GitLab fake:
//! create/get/pause/jobs/delete/list with real HTTP, retries on 5xx for idempotent calls only,
//! typed errors with status, and no token in any error text.

use imagectl::remote::gitlab::{ClientOptions, GitlabClient, GitlabError, NewRunner};
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
        attempts: 3,
        backoff: Duration::from_millis(20),
        request_timeout: Duration::from_secs(10),
        ca_pem: None,
    }
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
        assert!(c.running_jobs(r.id).await.unwrap().is_empty());
        let job = gl.add_running_job(r.id);
        let jobs = c.running_jobs(r.id).await.unwrap();
        assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), [job]);
        gl.finish_jobs(r.id);
        assert!(c.running_jobs(r.id).await.unwrap().is_empty());

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
        // Persistent 5xx on a GET gives up after the attempts with the status kept.
        gl.fault("GET", "/runners/all", 500, 10);
        let e = c.list_runners(&[]).await.unwrap_err();
        assert!(matches!(e, GitlabError::Status { status: 500, .. }), "{e}");
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
            fast(),
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
