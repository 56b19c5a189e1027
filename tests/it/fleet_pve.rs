//! Fleet commands on the Proxmox provider against fakepve and the GitLab fake, through the
//! `imagectl` binary. fakepve boots nothing, so `imagectl_tests::pve_guest::GuestEmulator` (a
//! labelled test seam) plays each started VM's guest: it runs the real `imagectl-agent` on the
//! seed ISO the fleet uploaded, publishes its status.json through fakepve's guest-agent
//! emulation, and polls GitLab as gitlab-runner would.
//!
//! * `fleet_pve_lifecycle`: deploy 3 (spread over 3 nodes) → re-deploy is a no-op → scale
//!   3→5→2 → replace → canary + rollout to a new image → rollback → status / targets → gc of an
//!   orphan runner, VM and seed → destroy leaves nothing; no token anywhere.
//! * `scopes`: a non-administrator token with `create_runner`, `manage_runner`, `read_api` runs
//!   every command; a missing scope exits 2 before anything is made; without `read_api`,
//!   destroy and gc finish and say what they could not check; a refused create is no leftover.
//! * `faults`: PVE lock timeout, clone TASK ERROR, start failure, GitLab 5xx, agent `failed`,
//!   timeout, a failed rollout, the fleet lock — each asserting 0 orphan VMs, runners and seeds.

pub(crate) use crate::fleet_local::names;
use crate::fleet_local::{run_logged, stdout_json};
pub(crate) use crate::publish::stderr;
use crate::publish::{command, image, publish};
use crate::support::agent_bin;
use imagectl_proto::Secret;
use imagectl_tests::fakepve::{FakePve, Vm};
use imagectl_tests::gitlab_fake::GitlabFake;
use imagectl_tests::pve_guest::{GuestEmulator, GuestOptions};
use serde_json::Value;
use std::process::{Command, Output};

mod bench;
mod faults;
mod races;
mod scopes;

/// fakepve + GitLab fake + emulated guests + a working directory.
pub(crate) struct PveFleet {
    pub pve: FakePve,
    pub gl: GitlabFake,
    pub guests: GuestEmulator,
    pub dir: tempfile::TempDir,
    pub outputs: Vec<u8>,
    /// The `GITLAB_TOKEN` commands get (the fake's administrator token unless a test changes it).
    pub token: String,
}

impl PveFleet {
    pub fn new(time_scale: f64, opts: GuestOptions) -> Self {
        let pve = FakePve::start_with(time_scale);
        let guests = GuestEmulator::start(&pve, agent_bin(), opts);
        let gl = GitlabFake::start();
        Self {
            token: gl.admin_token().to_string(),
            pve,
            gl,
            guests,
            dir: tempfile::tempdir().expect("tempdir"),
            outputs: Vec::new(),
        }
    }

    /// Publishes image `version` on the shared storage; returns the template's VM id.
    pub fn publish(&self, version: &str) -> u32 {
        let img = image(self.dir.path(), version, &["bios"]);
        let o = publish(&self.pve, self.dir.path(), &img, &["--storage", "ceph-vm"]);
        assert!(o.status.success(), "publish {version}: {}", stderr(&o));
        self.pve
            .vms()
            .into_iter()
            .find(|v| {
                v.template
                    && v.description
                        .contains(&format!("imagectl-version: {version}"))
            })
            .expect("the published template")
            .vmid
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut env = self.pve.env();
        env.push(("GITLAB_URL", self.gl.url()));
        env.push(("GITLAB_TOKEN", self.token.clone()));
        env.push((
            "IMAGECTL_STATE_DIR",
            self.dir.path().join("state").display().to_string(),
        ));
        let mut c = command(self.dir.path(), &env, args);
        c.args(["--provider", "proxmox"]);
        c
    }

    pub fn run(&mut self, args: &[&str]) -> Output {
        run_logged(
            &mut self.command(args),
            "fleet_pve",
            args,
            &mut self.outputs,
        )
    }

    pub fn json(&mut self, args: &[&str]) -> (Output, Value) {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let o = self.run(&a);
        let v = stdout_json(args, &o);
        (o, v)
    }

    /// The VMs of `fleet` in fakepve.
    pub fn vms(&self, fleet: &str) -> Vec<Vm> {
        let tag = format!("fleet-{fleet}");
        self.pve
            .vms()
            .into_iter()
            .filter(|v| !v.template && v.tags.split([';', ',', ' ']).any(|t| t == tag))
            .collect()
    }

    pub fn runners(&self, fleet: &str) -> Vec<imagectl_tests::gitlab_fake::Runner> {
        let prefix = format!("imagectl/{fleet}/");
        self.gl
            .runners()
            .into_iter()
            .filter(|r| r.description.starts_with(&prefix))
            .collect()
    }

    /// Seed ISOs of `fleet` on any storage.
    pub fn seeds(&self, fleet: &str) -> Vec<String> {
        let prefix = format!("iso/imagectl-seed-{fleet}-");
        self.pve
            .volumes()
            .into_iter()
            .map(|v| v.volid)
            .filter(|v| {
                v.split_once(':')
                    .is_some_and(|(_, n)| n.starts_with(&prefix))
            })
            .collect()
    }

    /// 0 VMs, 0 runners, 0 seeds of `fleet`, no fleet lock, no staged seed file.
    pub fn assert_nothing_left(&self, fleet: &str) {
        let vms: Vec<u32> = self.vms(fleet).iter().map(|v| v.vmid).collect();
        assert!(vms.is_empty(), "VMs of {fleet} left: {vms:?}");
        let runners: Vec<u64> = self.runners(fleet).iter().map(|r| r.id).collect();
        assert!(runners.is_empty(), "runners of {fleet} left: {runners:?}");
        let seeds = self.seeds(fleet);
        assert!(seeds.is_empty(), "seeds of {fleet} left: {seeds:?}");
        let staged: Vec<_> = std::fs::read_dir(self.dir.path().join("state/seeds"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(staged.is_empty(), "staged seeds left: {staged:?}");
        let pools = self.pve.state().pools;
        assert!(
            !pools.contains(&format!("imagectl-lock-{fleet}"))
                && !pools.contains(&format!("imagectl-{fleet}")),
            "a pool of {fleet} was left behind: {pools:?}"
        );
    }

    /// No runner token, GitLab admin token or PVE secret in any imagectl output, in fakepve's
    /// state (VM configs, task logs, requests) or in the emulator's log.
    pub fn assert_no_tokens(&self) {
        let mut tokens = vec![
            Secret::new(self.gl.admin_token()),
            Secret::new(&self.token),
            Secret::new(self.pve.secret()),
        ];
        for r in self.gl.runners() {
            tokens.push(r.token.clone());
            tokens.extend(r.dead_tokens.iter().cloned());
        }
        tokens.extend(self.gl.requests().into_iter().filter_map(|r| r.token));
        tokens.retain(|s| s.expose().len() >= 12);
        let hay = [
            (
                "imagectl output",
                String::from_utf8_lossy(&self.outputs).into_owned(),
            ),
            ("fakepve state", self.pve.state_text()),
            ("guest emulator log", self.guests.log()),
        ];
        for (what, text) in &hay {
            for t in &tokens {
                assert!(
                    !text.contains(t.expose()),
                    "a token ({}…) occurs in the {what}",
                    &t.expose()[..5]
                );
            }
        }
    }
}

fn versions(env: &PveFleet, fleet: &str) -> Vec<String> {
    let mut v: Vec<String> = env
        .vms(fleet)
        .iter()
        .filter_map(|v| {
            v.tags
                .split(';')
                .find_map(|t| t.strip_prefix("image-"))
                .map(str::to_string)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn fleet_pve_lifecycle() {
    let mut env = PveFleet::new(0.0, GuestOptions::default());
    let t1 = env.publish("1.0");
    env.publish("2.0");
    let fleet = "ci";

    // --- deploy 3 of 1.0: spread over the 3 nodes, registered, online, seeds gone -------------
    let (o, rep) = env.json(&["deploy", "--fleet", fleet, "--count", "3", "--image", "1.0"]);
    assert!(o.status.success(), "{rep}\n{}", stderr(&o));
    assert_eq!(names(&rep, "created").len(), 3, "{rep}");
    let vms = env.vms(fleet);
    assert_eq!(vms.len(), 3);
    let mut nodes: Vec<&str> = vms.iter().map(|v| v.node.as_str()).collect();
    nodes.sort();
    assert_eq!(
        nodes,
        ["pve1", "pve2", "pve3"],
        "anti-affinity spreads the VMs"
    );
    for v in &vms {
        assert_eq!(v.status, "running");
        assert!(v
            .description
            .contains(&format!("imagectl-cloned-from: {t1}")));
        let ide2 = v.config.get("ide2").map(String::as_str).unwrap_or("none");
        assert!(
            !ide2.contains("imagectl-seed"),
            "seed still attached: {ide2}"
        );
    }
    assert!(
        env.pve.state().pools.contains(&"imagectl-ci".to_string()),
        "the fleet's pool"
    );
    let runners = env.runners(fleet);
    assert_eq!(runners.len(), 3);
    for r in &runners {
        assert_eq!(
            env.gl.status(r.id).as_deref(),
            Some("online"),
            "runner {}",
            r.id
        );
        assert!(
            !r.dead_tokens.is_empty(),
            "runner {}: the agent rotated its token",
            r.id
        );
    }
    assert!(env.seeds(fleet).is_empty(), "seeds deleted once online");
    let runs = env.guests.runs();
    assert!(
        runs.iter().filter(|r| r.exit_code == Some(0)).count() >= 3,
        "{runs:?}"
    );

    // --- re-deploy: nothing to do, no clone ----------------------------------------------------
    let clones = |env: &PveFleet| {
        env.pve
            .state()
            .tasks
            .iter()
            .filter(|t| t.kind == "qmclone")
            .count()
    };
    let before = clones(&env);
    let (o, rep) = env.json(&["deploy", "--fleet", fleet, "--count", "3", "--image", "1.0"]);
    assert!(o.status.success(), "{rep}");
    assert!(names(&rep, "created").is_empty(), "{rep}");
    assert_eq!(clones(&env), before, "a no-op deploy cloned");

    // --- scale 3 → 5 → 2 ----------------------------------------------------------------------
    let (o, rep) = env.json(&["deploy", "--fleet", fleet, "--count", "5"]);
    assert!(o.status.success(), "{rep}");
    assert_eq!(env.vms(fleet).len(), 5);
    assert_eq!(env.runners(fleet).len(), 5);
    let (o, rep) = env.json(&["deploy", "--fleet", fleet, "--count", "2"]);
    assert!(o.status.success(), "{rep}");
    assert_eq!(rep["removed"].as_array().map(Vec::len), Some(3), "{rep}");
    assert_eq!(env.vms(fleet).len(), 2);
    assert_eq!(env.runners(fleet).len(), 2);

    // --- replace one VM ------------------------------------------------------------------------
    let victim = env.vms(fleet)[0].name.clone();
    let (o, rep) = env.json(&["replace", "--fleet", fleet, &victim]);
    assert!(o.status.success(), "{rep}");
    let now: Vec<String> = env.vms(fleet).iter().map(|v| v.name.clone()).collect();
    assert_eq!(now.len(), 2);
    assert!(!now.contains(&victim), "{victim} still there: {now:?}");

    // --- canary, then rollout to 2.0, then rollback to 1.0 --------------------------------------
    let (o, rep) = env.json(&["deploy", "--fleet", fleet, "--image", "2.0", "--canary"]);
    assert!(o.status.success(), "{rep}");
    assert_eq!(versions(&env, fleet), ["1.0", "2.0"], "one canary VM");
    let (o, rep) = env.json(&["deploy", "--fleet", fleet, "--image", "2.0"]);
    assert!(o.status.success(), "{rep}");
    assert_eq!(versions(&env, fleet), ["2.0", "2.0"]);
    let (o, rep) = env.json(&["rollback", "--fleet", fleet]);
    assert!(o.status.success(), "{rep}");
    assert_eq!(rep["image_version"], "1.0", "{rep}");
    assert_eq!(versions(&env, fleet), ["1.0", "1.0"]);
    assert_eq!(env.runners(fleet).len(), 2, "old runners deleted");

    // --- status and targets ----------------------------------------------------------------------
    let (_o, st) = env.json(&["status", "--fleet", fleet]);
    let rows = st["vms"].as_array().expect("vms");
    assert_eq!(rows.len(), 2, "{st}");
    for r in rows {
        assert_eq!(r["gitlab_status"], "online", "{st}");
        assert_eq!(r["agent_state"], "registered", "{st}");
        assert_eq!(r["image_version"], "1.0", "{st}");
        assert!(
            r["node"].as_str().is_some_and(|n| n.starts_with("pve")),
            "{st}"
        );
    }
    let o = env.run(&["targets", "--fleet", fleet]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains(":9100") && t.contains(":8080") && t.contains(":9252"),
        "{t}"
    );

    // --- gc: an orphan runner and an orphan VM (its runner is gone) ------------------------------
    let (o, rep) = env.json(&["gc", "--fleet", fleet]);
    assert!(o.status.success(), "{rep}");
    assert!(
        rep["orphans"]["runners_deleted"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "{rep}"
    );
    let orphan_vm = env.vms(fleet)[0].clone();
    let orphan_runner = env
        .runners(fleet)
        .into_iter()
        .find(|r| r.description.ends_with(&orphan_vm.name))
        .expect("runner of the VM");
    let other = env
        .runners(fleet)
        .into_iter()
        .find(|r| r.id != orphan_runner.id)
        .expect("the other runner");
    // Its runner is deleted behind imagectl's back: the VM becomes an orphan.
    assert!(env.gl.delete_runner(orphan_runner.id));
    let (o, rep) = env.json(&["gc", "--fleet", fleet]);
    assert!(o.status.success(), "{rep}\n{}", stderr(&o));
    assert_eq!(
        rep["orphans"]["vms_destroyed"].as_array().map(Vec::len),
        Some(1),
        "{rep}"
    );
    assert_eq!(env.vms(fleet).len(), 1);
    assert!(
        env.runners(fleet).iter().any(|r| r.id == other.id),
        "gc kept the healthy runner"
    );

    // --- destroy: nothing left; the templates stay -----------------------------------------------
    let (o, rep) = env.json(&["destroy", "--fleet", fleet]);
    assert!(o.status.success(), "{rep}");
    env.assert_nothing_left(fleet);
    assert_eq!(env.pve.vms().iter().filter(|v| v.template).count(), 2);
    env.assert_no_tokens();
}

#[test]
fn gc_picks_proxmox_when_the_settings_file_names_an_endpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("imagectl.toml"),
        "[proxmox]\nendpoint = \"https://127.0.0.1:9\"\n",
    )
    .unwrap();
    // No token anywhere: only the Proxmox provider needs one, so the error proves the choice.
    let o = command(dir.path(), &[], &["gc", "--dry-run"])
        .output()
        .expect("running imagectl");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("no PVE API token"), "{}", stderr(&o));
    // Without the file, the local provider is used and needs none.
    std::fs::remove_file(dir.path().join("imagectl.toml")).unwrap();
    let o = command(
        dir.path(),
        &[(
            "IMAGECTL_STATE_DIR",
            dir.path().join("st").display().to_string(),
        )],
        &["gc", "--dry-run"],
    )
    .output()
    .expect("running imagectl");
    assert!(o.status.success(), "{}", stderr(&o));
}
