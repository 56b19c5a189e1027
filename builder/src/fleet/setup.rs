//! What the fleet subcommands share: their flags, and turning flags + environment + settings
//! file into a provider, a GitLab client and [`FleetOptions`].

use super::settings::{self, FileSettings, FleetOptions, GitlabFlags, GitlabSettings};
use super::{Cancel, Fleet, ImageChoice, Reporter};
use crate::error::input;
use crate::provider::local::{state::default_state_dir, LocalOptions, LocalProvider};
use crate::remote::gitlab::{self, GitlabClient};
use crate::vm::{Accel, Firmware, NetPolicy};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the fleet runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// QEMU VMs on this machine.
    Local,
    /// Proxmox VE (not available yet in this build).
    Proxmox,
}

/// Flags every fleet command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct FleetArgs {
    /// Fleet name (a-z, 0-9, '-'; prefixes VM names and runner descriptions).
    #[arg(long, value_name = "NAME")]
    pub fleet: String,
    /// Where the VMs run (default: [fleet.NAME] provider, else local).
    #[arg(long, value_enum)]
    pub provider: Option<ProviderKind>,
    /// Settings file (default: $IMAGECTL_CONFIG, ./imagectl.toml, $XDG_CONFIG_HOME/imagectl/imagectl.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// GitLab settings.
    #[command(flatten)]
    pub gitlab: GitlabFlags,
    /// Local provider: state directory (env IMAGECTL_STATE_DIR; default ~/.local/share/imagectl).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Local provider: image store, the directory `imagectl build --out` wrote to (default ./out).
    #[arg(long, value_name = "DIR")]
    pub images_dir: Option<PathBuf>,
}

/// Flags of the commands that create or drain VMs.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TuneArgs {
    /// Memory per VM in MiB (default 1024 for local).
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u32>,
    /// vCPUs per VM (default 2).
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// VMs created or drained at once (default 4).
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Seconds per VM from clone to registered and online before it is rolled back (default 900).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Seconds to wait for running jobs when draining a runner (default 3600).
    #[arg(long, value_name = "SECS")]
    pub drain_timeout: Option<u64>,
    /// After the drain timeout, delete the VM anyway (its running jobs fail); default: leave it running, paused.
    #[arg(long)]
    pub force: bool,
    /// New VMs brought online before as many old ones are drained, in a rollout (default 1).
    #[arg(long, value_name = "N")]
    pub max_surge: Option<usize>,
    /// Local provider: let guests open outbound connections (so jobs can pull images); default restricted.
    #[arg(long)]
    pub open_network: bool,
    /// Local provider: CPU accelerator tcg, kvm or auto (env IMAGECTL_ACCEL overrides; default auto).
    #[arg(long, value_name = "ACCEL")]
    pub accel: Option<String>,
    /// Full clones instead of linked clones (Proxmox).
    #[arg(long)]
    pub full: bool,
}

/// The provider chosen for a command.
pub enum AnyProvider {
    /// Local QEMU.
    Local(LocalProvider),
}

/// Everything a fleet command needs, resolved.
pub struct Setup {
    /// The settings file's view.
    pub file: FileSettings,
    /// The provider.
    pub provider: AnyProvider,
    /// GitLab client and settings (when available).
    pub gitlab: Option<(GitlabClient, GitlabSettings)>,
    /// Options.
    pub opts: FleetOptions,
    /// Private seed staging directory.
    pub seed_dir: PathBuf,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// A tokio runtime for one command.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The GitLab client for settings.
pub fn gitlab_client(g: &GitlabSettings) -> Result<GitlabClient> {
    GitlabClient::new(
        &g.url,
        g.token.clone(),
        gitlab::ClientOptions {
            ca_pem: g.ca_pem.clone(),
            ..Default::default()
        },
    )
}

/// Resolves flags, environment and file. `need_gitlab`: fail without GitLab settings (else the
/// GitLab side is optional, as for `status` and `targets`). `image` is `--image` (a path to a
/// qcow2 points the local image store at its directory).
pub fn setup(
    a: &FleetArgs,
    t: &TuneArgs,
    need_gitlab: bool,
    image: Option<&str>,
) -> Result<(Setup, ImageChoice)> {
    settings::validate_fleet_name(&a.fleet)?;
    let file = settings::read_file(a.config.as_deref(), &a.fleet, &env)?;
    let fs = &file.fleet;
    let gl = match settings::resolve_gitlab(&a.gitlab, &file, &env) {
        Ok(g) => Some(g),
        Err(e) if need_gitlab => return Err(e),
        Err(e) => {
            tracing::info!("no GitLab settings ({e:#}); GitLab status will be unknown");
            None
        }
    };
    let gitlab = match gl {
        Some(g) => Some((gitlab_client(&g)?, g)),
        None => None,
    };
    let kind = match (a.provider, fs.provider.as_deref()) {
        (Some(k), _) => k,
        (None, None | Some("local")) => ProviderKind::Local,
        (None, Some("proxmox")) => ProviderKind::Proxmox,
        (None, Some(other)) => {
            return Err(input(format!(
                "[fleet.{}] provider {other:?}: use local or proxmox",
                a.fleet
            )))
        }
    };
    if kind == ProviderKind::Proxmox {
        return Err(input(
            "the Proxmox provider is not available in this build yet; use --provider local",
        ));
    }
    let mut images_dir = a
        .images_dir
        .clone()
        .or_else(|| fs.images_dir.clone())
        .unwrap_or_else(|| PathBuf::from("out"));
    let mut choice = ImageChoice::parse(image.or(fs.image.as_deref()));
    if let ImageChoice::Version(v) = &choice {
        let p = Path::new(v);
        if v.ends_with(".qcow2") || p.is_file() {
            let m = crate::manifest::Manifest::read(&crate::manifest::Manifest::path_for(p))
                .map_err(|e| {
                    input(format!(
                        "--image {v}: no readable manifest beside it: {e:#}"
                    ))
                })?;
            images_dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
            choice = ImageChoice::Version(m.version);
        }
    }
    let net = match (t.open_network, fs.network.as_deref()) {
        (true, _) | (false, Some("open")) => NetPolicy::Open,
        (false, None | Some("restricted")) => NetPolicy::Restricted,
        (false, Some(o)) => {
            return Err(input(format!(
                "[fleet.{}] network {o:?}: use restricted or open",
                a.fleet
            )))
        }
    };
    let accel: Accel = t
        .accel
        .as_deref()
        .or(fs.accel.as_deref())
        .unwrap_or("auto")
        .parse()?;
    let state_dir = a
        .state_dir
        .clone()
        .or_else(|| fs.state_dir.clone())
        .unwrap_or_else(default_state_dir);
    let gitlab_url = gitlab
        .as_ref()
        .map(|(_, g)| g.url.clone())
        .unwrap_or_default();
    let local = LocalProvider::new(LocalOptions {
        state_dir,
        images_dir,
        image_name: fs.image_name.clone(),
        net,
        gitlab_url,
        accel,
        firmware: Firmware::Bios,
        qemu: "qemu-system-x86_64".into(),
    })?;
    let seed_dir = local.seeds_dir();
    let mut opts = FleetOptions::new(&a.fleet);
    opts.memory_mib = t.memory.or(fs.memory).unwrap_or(opts.memory_mib);
    opts.cpus = t.cpus.or(fs.cpus).unwrap_or(opts.cpus);
    opts.concurrency = t.concurrency.or(fs.concurrency).unwrap_or(opts.concurrency);
    if let Some(s) = t.timeout.or(fs.timeout) {
        opts.timeout = Duration::from_secs(s);
    }
    if let Some(s) = t.drain_timeout.or(fs.drain_timeout) {
        opts.drain_timeout = Duration::from_secs(s);
    }
    opts.max_surge = t.max_surge.or(fs.max_surge).unwrap_or(opts.max_surge);
    opts.force = t.force;
    opts.full_clone = t.full;
    if opts.memory_mib < 256 {
        return Err(input("--memory must be at least 256 MiB"));
    }
    if opts.concurrency == 0 || opts.max_surge == 0 || opts.cpus == 0 {
        return Err(input(
            "--concurrency, --max-surge and --cpus must be at least 1",
        ));
    }
    if opts.timeout.is_zero() {
        return Err(input("--timeout must be at least 1 second"));
    }
    Ok((
        Setup {
            file,
            provider: AnyProvider::Local(local),
            gitlab,
            opts,
            seed_dir,
        },
        choice,
    ))
}

impl Setup {
    /// A [`Fleet`] over the local provider, with Ctrl-C handling installed (call inside the runtime).
    pub fn fleet<'a>(
        &'a self,
        local: &'a LocalProvider,
        quiet: bool,
    ) -> Result<Fleet<'a, LocalProvider>> {
        let (gitlab, gl) = self.gitlab.as_ref().map(|(c, g)| (c, g)).ok_or_else(|| {
            input("this command needs GitLab settings (GITLAB_URL, GITLAB_TOKEN)")
        })?;
        let cancel = Cancel::new();
        cancel.on_signals();
        Ok(Fleet {
            provider: local,
            gitlab,
            gl,
            opts: &self.opts,
            seed_dir: self.seed_dir.clone(),
            cancel,
            progress: Reporter::new(quiet),
        })
    }
}
