//! The nightly image pipeline users include, `ci/.gitlab-ci.yml`, is checked against GitLab's
//! schema, the real CLI and the rules it promises:
//!
//! - **Schema.** GitLab's published CI JSON schema accepts it (`check-jsonschema --builtin-schema
//!   vendor.gitlab-ci`, which `tools/setup-host.sh` installs into `.venv`; the test fails when the
//!   tool is missing), also with every job's `extends` applied (the schema lets hidden templates
//!   hold anything), and rejects deliberately broken copies, so the check can fail.
//! - **Commands.** Every `imagectl …` command in every job's `before_script`, `script` and
//!   `after_script` (after `extends`, with line continuations joined and the file's own
//!   `variables:` defaults substituted; other `$VAR`s stay as they are) parses with the real clap
//!   definition, through the same extractor as the docs check (`docs.rs`). A wrong flag fails.
//! - **Structure.** Stages in order; build refreshes the lock, writes the changelog and the lock
//!   diff and hands the version on as a dotenv report; test uses `--accel auto`; canary deploys
//!   with `--canary`; deploying jobs run on the default branch only and share a resource group per
//!   fleet; rollback is manual; a schedule rule exists; every job runs on the image-build tag.
//! - **Secrets.** No job defines a secret-named variable, carries a secret-looking literal, or
//!   passes a secret variable (`$GITLAB_TOKEN`, `$PROXMOX_VE_API_TOKEN`, …) as a command argument;
//!   assignments (`export X="$SECRET"`) are fine, they stay in the job's environment.
//! - **Shell.** The build job's dotenv step and the PVE-token assembly run under bash.

mod secrets;
mod shape;
mod yaml;

use crate::docs::{imagectl_commands, parse_with_cli};
use crate::support::workspace;
use serde_yaml::{Mapping, Value};
use std::path::PathBuf;
use std::process::Command;
use yaml::{expand, job_lines, jobs, key, parse, resolve, string_of, variables};

const PIPELINE: &str = "ci/.gitlab-ci.yml";
const STAGES: [&str; 6] = ["build", "test", "publish", "canary", "rollout", "gc"];
const RUNNER_TAG: &str = "imagectl-image-build";

fn pipeline_text() -> String {
    std::fs::read_to_string(workspace().join(PIPELINE)).expect("reading ci/.gitlab-ci.yml")
}

/// One `imagectl` command of the pipeline.
#[derive(Debug, Clone)]
struct PipelineCommand {
    job: String,
    argv: Vec<String>,
}

/// Every `imagectl` command of every job, with the file's variables substituted.
fn imagectl_calls(doc: &Mapping) -> Vec<PipelineCommand> {
    let vars = variables(doc);
    let mut out = Vec::new();
    for (name, job) in jobs(doc) {
        for (_, line) in job_lines(&job) {
            for argv in imagectl_commands(&line) {
                out.push(PipelineCommand {
                    job: name.clone(),
                    argv: argv.iter().map(|w| expand(w, &vars)).collect(),
                });
            }
        }
    }
    out
}

/// The commands the CLI rejects, as `job: command: clap's message`.
fn cli_failures(doc: &Mapping) -> Vec<String> {
    imagectl_calls(doc)
        .into_iter()
        .filter_map(|c| {
            parse_with_cli(&c.argv)
                .err()
                .map(|e| format!("{}: `{}`: {e}", c.job, c.argv.join(" ")))
        })
        .collect()
}

fn check_jsonschema() -> PathBuf {
    let venv = workspace().join(".venv/bin/check-jsonschema");
    if venv.is_file() {
        return venv;
    }
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("check-jsonschema"))
            .find(|c| c.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "check-jsonschema is missing: run tools/setup-host.sh (it installs it into .venv) \
             or `pip install check-jsonschema`"
        )
    })
}

/// Runs GitLab's CI schema over a file: `Ok` or the tool's output.
fn validate_with_gitlab_schema(path: &std::path::Path) -> Result<(), String> {
    let out = Command::new(check_jsonschema())
        .args(["--builtin-schema", "vendor.gitlab-ci"])
        .args(["--data-transform", "gitlab-ci"])
        .arg(path)
        .output()
        .expect("running check-jsonschema");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(text)
    }
}

/// The pipeline with every job's `extends` applied and the templates dropped.
fn resolved_pipeline(text: &str) -> String {
    let doc = parse(text);
    let mut out = Mapping::new();
    for (k, v) in &doc {
        let name = string_of(k).unwrap_or_default();
        if !name.starts_with('.') && !jobs(&doc).contains_key(&name) {
            out.insert(k.clone(), v.clone());
        }
    }
    for (name, job) in jobs(&doc) {
        out.insert(Value::String(name), Value::Mapping(job));
    }
    serde_yaml::to_string(&out).expect("serialising the resolved pipeline")
}

#[test]
fn gitlab_ci_schema_accepts_the_pipeline_and_rejects_a_broken_copy() {
    let path = workspace().join(PIPELINE);
    if let Err(e) = validate_with_gitlab_schema(&path) {
        panic!("GitLab's CI schema rejects {PIPELINE}:\n{e}");
    }

    // The schema accepts anything in hidden jobs (`.name`), so validate the jobs once more with
    // their `extends` applied: a typo in a template must fail too.
    let d = tempfile::tempdir().expect("tempdir");
    let resolved = d.path().join("resolved.gitlab-ci.yml");
    std::fs::write(&resolved, resolved_pipeline(&pipeline_text())).expect("write resolved copy");
    if let Err(e) = validate_with_gitlab_schema(&resolved) {
        panic!("GitLab's CI schema rejects {PIPELINE} with `extends` applied:\n{e}");
    }
    let typo = pipeline_text().replace("  interruptible: false", "  interruptable: false");
    assert_ne!(
        typo,
        pipeline_text(),
        "the template has no `interruptible` to misspell"
    );
    std::fs::write(&resolved, resolved_pipeline(&typo)).expect("write resolved copy");
    let err = validate_with_gitlab_schema(&resolved)
        .expect_err("the schema check accepted a misspelled key inherited from a template");
    assert!(err.contains("interruptable"), "{err}");

    let broken = d.path().join("broken.gitlab-ci.yml");
    let text = format!(
        "{}\nbroken-job:\n  stage: build\n  tags: [{RUNNER_TAG}]\n  scirpt: [imagectl gc]\n  \
         when: sometimes\n",
        pipeline_text()
    );
    std::fs::write(&broken, text).expect("write broken copy");
    let err = validate_with_gitlab_schema(&broken)
        .expect_err("the schema check accepted a job with an unknown key and a bad `when`");
    assert!(
        err.contains("broken-job") || err.contains("scirpt"),
        "the schema error does not point at the broken job:\n{err}"
    );
}

#[test]
fn every_imagectl_command_in_the_pipeline_parses_with_the_cli() {
    let doc = parse(&pipeline_text());
    let calls = imagectl_calls(&doc);
    let failures = cli_failures(&doc);
    assert!(
        failures.is_empty(),
        "pipeline commands the CLI rejects:\n  {}",
        failures.join("\n  ")
    );
    // The extractor sees the commands it must see: one per stage, and more.
    let subcommands: Vec<&str> = calls
        .iter()
        .filter_map(|c| c.argv.get(1).map(String::as_str))
        .collect();
    for sub in [
        "build",
        "test",
        "publish",
        "deploy",
        "gc",
        "rollback",
        "--version",
    ] {
        assert!(
            subcommands.contains(&sub),
            "no `imagectl {sub}` found in the pipeline: {subcommands:?}"
        );
    }
    assert!(calls.len() >= 9, "only {} commands: {calls:?}", calls.len());
    // Variables of the file are substituted (gc's `--keep "$GC_KEEP"` parses as a number); the
    // pipeline's own runtime variables stay as they are.
    let gc = calls.iter().find(|c| c.argv[1] == "gc").expect("gc");
    assert_eq!(
        gc.argv,
        [
            "imagectl",
            "gc",
            "--provider",
            "proxmox",
            "--fleet",
            "ci",
            "--keep",
            "3"
        ]
    );
    let canary = calls
        .iter()
        .find(|c| c.argv.iter().any(|w| w == "--canary"))
        .expect("a canary deploy");
    assert!(canary.argv.contains(&"$IMAGE_VERSION".to_owned()));
}

#[test]
fn the_command_check_catches_unknown_flags_and_missing_arguments() {
    let yaml = r#"
stages: [build]
variables:
  KEEP: "3"
  SPEC: image-specs/gitlab-runner.yaml
.base:
  before_script:
    - imagectl --version
good:
  extends: .base
  stage: build
  script:
    - |
      imagectl build "$SPEC" \
        --refresh-lock --output json > out/build.json
    - imagectl gc --keep "$KEEP"
bad-flag:
  extends: .base
  stage: build
  script:
    - echo start && imagectl build spec.yaml --no-such-flag
bad-value:
  stage: build
  script: [imagectl gc --keep "$UNKNOWN_AT_PARSE_TIME"]
missing-arg:
  stage: build
  after_script: [imagectl deploy --count 3]
"#;
    let doc = parse(yaml);
    let calls = imagectl_calls(&doc);
    let good: Vec<_> = calls.iter().filter(|c| c.job == "good").collect();
    assert_eq!(good.len(), 3, "{good:?}");
    assert_eq!(good[0].argv, ["imagectl", "--version"], "extends applied");
    assert_eq!(
        good[1].argv,
        [
            "imagectl",
            "build",
            "image-specs/gitlab-runner.yaml",
            "--refresh-lock",
            "--output",
            "json"
        ],
        "continuation joined, redirection dropped, variable substituted"
    );
    let failures = cli_failures(&doc);
    assert_eq!(failures.len(), 3, "{failures:#?}");
    assert!(failures[0].starts_with("bad-flag: ") && failures[0].contains("--no-such-flag"));
    assert!(failures[1].starts_with("bad-value: "), "{failures:?}");
    assert!(
        failures[2].starts_with("missing-arg: ") && failures[2].contains("required"),
        "{failures:?}"
    );
}

/// The first script item of a job section that contains `needle`.
fn script_item(doc: &Mapping, job: &str, section: &str, needle: &str) -> String {
    let job = resolve(doc, job, 0);
    let items = key(&job, section)
        .and_then(Value::as_sequence)
        .unwrap_or_else(|| panic!("{section} is not a list"));
    items
        .iter()
        .filter_map(string_of)
        .find(|i| i.contains(needle))
        .unwrap_or_else(|| panic!("no {section} item with {needle:?}"))
}

fn bash(script: &str, dir: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("set -eo pipefail\n{script}"))
        .current_dir(dir)
        .env_remove("PROXMOX_VE_API_TOKEN")
        .env_remove("PROXMOX_VE_API_TOKEN_ID")
        .env_remove("PROXMOX_VE_API_TOKEN_SECRET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("running bash")
}

#[test]
fn the_build_jobs_dotenv_step_reads_the_cli_json() {
    let doc = parse(&pipeline_text());
    let step = script_item(&doc, "imagectl-build", "script", "build.env");
    let d = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(d.path().join("out")).expect("out/");
    let version = "1.0-20250601-3f2a9c1e";
    let image = format!("out/gitlab-runner-{version}.qcow2");
    let manifest = format!("out/gitlab-runner-{version}.manifest.json");
    std::fs::write(d.path().join(&image), b"qcow2").expect("image");
    std::fs::write(d.path().join(&manifest), b"{}").expect("manifest");
    // The shape `imagectl build --output json` prints (cli/build.rs, pretty JSON).
    let value = serde_json::json!({
        "image": image, "manifest": manifest, "lock": "image-specs/gitlab-runner.lock",
        "lock_changes": ["~ docker.io 1 -> 2", "+ \"version\": trap"], "changelog": "out/CHANGELOG.md",
        "name": "gitlab-runner", "version": version, "sha256": "ab".repeat(32), "size": 1,
        "layer_cached": true, "layer_key": "cd".repeat(32), "build_seconds": 1.5,
    });
    std::fs::write(
        d.path().join("out/build.json"),
        serde_json::to_string_pretty(&value).expect("json") + "\n",
    )
    .expect("build.json");
    let out = bash(&step, d.path(), &[("CI_JOB_ID", "4242")]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let env = std::fs::read_to_string(d.path().join("build.env")).expect("build.env");
    assert_eq!(
        env,
        format!(
            "IMAGE_VERSION={version}\nIMAGE_FILE={image}\nIMAGE_MANIFEST={manifest}\n\
             BUILD_JOB_ID=4242\n"
        )
    );

    // No image: the step fails instead of handing on an empty version.
    std::fs::remove_file(d.path().join(&image)).expect("rm image");
    assert!(!bash(&step, d.path(), &[("CI_JOB_ID", "1")])
        .status
        .success());
}

#[test]
fn the_pve_token_is_assembled_in_the_environment_from_its_halves() {
    let doc = parse(&pipeline_text());
    let step = script_item(&doc, ".imagectl", "before_script", "PROXMOX_VE_API_TOKEN");
    let d = tempfile::tempdir().expect("tempdir");
    let probe = format!("{step}\nprintf '%s' \"${{PROXMOX_VE_API_TOKEN:-unset}}\"");
    let out = bash(
        &probe,
        d.path(),
        &[
            ("PROXMOX_VE_API_TOKEN_ID", "imagectl@pve!ci"),
            ("PROXMOX_VE_API_TOKEN_SECRET", "s3cr3t-value"),
        ],
    );
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "imagectl@pve!ci=s3cr3t-value"
    );
    // A whole token in PROXMOX_VE_API_TOKEN is left alone.
    let out = bash(&probe, d.path(), &[("PROXMOX_VE_API_TOKEN", "u@pve!t=x")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "u@pve!t=x");
    // The id without the secret is an error, not a half token.
    let out = bash(
        &probe,
        d.path(),
        &[("PROXMOX_VE_API_TOKEN_ID", "imagectl@pve!ci")],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PROXMOX_VE_API_TOKEN_SECRET"));
}
