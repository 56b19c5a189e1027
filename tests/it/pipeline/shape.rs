//! The pipeline's promised shape: stages in order, what each stage runs, the dotenv hand-over,
//! default-branch rules, the manual rollback, the schedule rule, the runner tag, resource groups.

use super::yaml::{
    default_branch_only, expand, job_lines, jobs, key, parse, rule_if, rule_when, rules_of,
    stage_of, string_of, variables,
};
use super::{imagectl_calls, pipeline_text, RUNNER_TAG, STAGES};
use serde_yaml::{Mapping, Value};

/// The argv of the job's `imagectl` commands.
fn commands_of(doc: &Mapping, job: &str) -> Vec<Vec<String>> {
    imagectl_calls(doc)
        .into_iter()
        .filter(|c| c.job == job && c.argv.get(1).is_some_and(|s| s != "--version"))
        .map(|c| c.argv)
        .collect()
}

fn has(argv: &[String], flag: &str) -> bool {
    argv.iter().any(|w| w == flag)
}

#[test]
fn the_pipeline_has_the_promised_shape() {
    let doc = parse(&pipeline_text());
    let stages: Vec<String> = match key(&doc, "stages") {
        Some(Value::Sequence(s)) => s.iter().filter_map(string_of).collect(),
        other => panic!("stages: {other:?}"),
    };
    assert_eq!(stages, STAGES);
    let vars = variables(&doc);
    let jobs = jobs(&doc);
    let by_stage = |stage: &str| -> Vec<String> {
        jobs.iter()
            .filter(|(_, j)| stage_of(j) == stage)
            .map(|(n, _)| n.clone())
            .collect()
    };

    let mut schedule_rule = false;
    for (name, job) in &jobs {
        assert!(
            STAGES.contains(&stage_of(job).as_str()),
            "{name}: unknown stage"
        );
        // The runner tag, directly or through a variable of the file.
        let tags: Vec<String> = match key(job, "tags") {
            Some(Value::Sequence(t)) => t
                .iter()
                .filter_map(string_of)
                .map(|t| expand(&t, &vars))
                .collect(),
            other => panic!("{name}: tags {other:?}"),
        };
        assert!(
            tags.iter().any(|t| t == RUNNER_TAG),
            "{name}: tags {tags:?}"
        );
        let rules = rules_of(job);
        assert!(
            !rules.is_empty(),
            "{name}: no rules: it would run on every push"
        );
        schedule_rule |= rules.iter().any(|r| {
            rule_if(r).contains("$CI_PIPELINE_SOURCE == \"schedule\"") && rule_when(r) != "never"
        });
        // `needs` name jobs that exist.
        if let Some(Value::Sequence(needs)) = key(job, "needs") {
            for n in needs {
                let need = match n {
                    Value::Mapping(m) => key(m, "job").and_then(string_of),
                    v => string_of(v),
                }
                .unwrap_or_default();
                assert!(
                    jobs.contains_key(&need),
                    "{name}: needs unknown job {need:?}"
                );
            }
        }
    }
    assert!(schedule_rule, "no rule runs the pipeline on a schedule");

    // build: refresh the lock, write the changelog, keep the diff, hand the version on.
    let [build] = by_stage("build").try_into().expect("one build job");
    let b = &jobs[&build];
    let cmd = commands_of(&doc, &build);
    assert!(
        cmd.iter().any(|a| a[1] == "build"
            && has(a, "--refresh-lock")
            && has(a, "--changelog")
            && a.windows(2).any(|w| w == ["--output", "json"])),
        "{cmd:?}"
    );
    let build_text: String = job_lines(b).into_iter().map(|(_, l)| l + "\n").collect();
    assert!(
        build_text.contains("git diff"),
        "no lock diff: {build_text}"
    );
    let artifacts = key(b, "artifacts")
        .and_then(Value::as_mapping)
        .expect("build artifacts");
    let paths: Vec<String> = key(artifacts, "paths")
        .and_then(Value::as_sequence)
        .expect("artifact paths")
        .iter()
        .filter_map(string_of)
        .collect();
    for want in [".qcow2", ".manifest.json", "CHANGELOG.md", "lock.diff"] {
        assert!(
            paths.iter().any(|p| p.ends_with(want)),
            "build artifacts lack {want}: {paths:?}"
        );
    }
    let dotenv_jobs: Vec<&String> = jobs
        .iter()
        .filter(|(_, j)| {
            key(j, "artifacts")
                .and_then(Value::as_mapping)
                .and_then(|a| key(a, "reports"))
                .and_then(Value::as_mapping)
                .is_some_and(|r| key(r, "dotenv").is_some())
        })
        .map(|(n, _)| n)
        .collect();
    assert!(dotenv_jobs.contains(&&build), "build has no dotenv report");
    // Whoever uses the version gets it through `needs` from a job with a dotenv report.
    for (name, job) in &jobs {
        let text: String = job_lines(job).into_iter().map(|(_, l)| l).collect();
        if name == &build || !text.contains("$IMAGE_") {
            continue;
        }
        let needs: Vec<String> = key(job, "needs")
            .and_then(Value::as_sequence)
            .map(|n| {
                n.iter()
                    .filter_map(|n| match n {
                        Value::Mapping(m) => key(m, "job").and_then(string_of),
                        v => string_of(v),
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            needs.iter().any(|n| dotenv_jobs.contains(&n)),
            "{name} uses $IMAGE_… but needs no job with a dotenv report: {needs:?}"
        );
    }

    // test: boot with KVM, falling back to TCG.
    let [test] = by_stage("test").try_into().expect("one test job");
    assert!(
        commands_of(&doc, &test)
            .iter()
            .any(|a| a[1] == "test" && a.windows(2).any(|w| w == ["--accel", "auto"])),
        "test does not boot with --accel auto"
    );
    // publish: upload, or --from-url the build job's artifact.
    let [publish] = by_stage("publish").try_into().expect("one publish job");
    let p = commands_of(&doc, &publish);
    assert!(p.iter().any(|a| a[1] == "publish" && !has(a, "--from-url")));
    assert!(p.iter().any(|a| a[1] == "publish"
        && a.iter()
            .any(|w| w.starts_with("$CI_API_V4_URL/projects/$CI_PROJECT_ID/jobs/"))));

    // canary, rollout, gc, rollback: default branch only, one fleet at a time.
    let [canary] = by_stage("canary").try_into().expect("one canary job");
    let c = commands_of(&doc, &canary);
    assert!(
        c.iter()
            .any(|a| a[1] == "deploy" && has(a, "--canary") && has(a, "--image")),
        "{c:?}"
    );
    let rollout_jobs = by_stage("rollout");
    let rollout = rollout_jobs
        .iter()
        .find(|j| commands_of(&doc, j).iter().any(|a| a[1] == "deploy"))
        .expect("a rollout deploy");
    assert!(commands_of(&doc, rollout)
        .iter()
        .any(|a| a[1] == "deploy" && has(a, "--image") && !has(a, "--canary")));
    let [gc] = by_stage("gc").try_into().expect("one gc job");
    assert!(commands_of(&doc, &gc)
        .iter()
        .any(|a| a[1] == "gc" && has(a, "--keep")));
    let rollback = jobs
        .keys()
        .find(|j| commands_of(&doc, j).iter().any(|a| a[1] == "rollback"))
        .expect("a rollback job");
    let rb = &jobs[rollback];
    let manual = key(rb, "when").and_then(string_of).as_deref() == Some("manual")
        || rules_of(rb)
            .iter()
            .any(|r| rule_when(r) == "manual" && !rule_if(r).is_empty());
    assert!(manual, "{rollback} is not `when: manual`");
    assert!(
        rules_of(rb).iter().all(|r| rule_when(r) != "on_success"),
        "{rollback} must never start by itself"
    );

    let mut groups = Vec::new();
    for name in [&publish, &canary, rollout, &gc, rollback] {
        assert!(
            default_branch_only(&jobs[name.as_str()]),
            "{name} may run on other branches than the default one"
        );
    }
    for name in [&canary, rollout, &gc, rollback] {
        let g = key(&jobs[name.as_str()], "resource_group")
            .and_then(string_of)
            .unwrap_or_else(|| panic!("{name} has no resource_group"));
        assert!(
            g.contains("$FLEET"),
            "{name}: resource_group {g} is not per fleet"
        );
        groups.push(g);
    }
    groups.dedup();
    assert_eq!(
        groups.len(),
        1,
        "fleet jobs use different resource groups: {groups:?}"
    );
    // Build and test run on every branch (a spec change can be tried on a branch).
    assert!(!default_branch_only(b));
}
