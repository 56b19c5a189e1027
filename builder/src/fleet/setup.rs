//! What the fleet subcommands share: their flags, and turning flags + environment + settings
//! file into a provider, a GitLab client and [`FleetOptions`].

use super::settings::{self, FileSettings, FleetOptions, GitlabFlags, GitlabSettings};
use super::{Cancel, Fleet, ImageChoice, Reporter};
use crate::config::ProxmoxFlags;
use crate::error::input;
use crate::provider::local::{state::default_state_dir, LocalOptions, LocalProvider};
use crate::provider::proxmox::{ProxmoxOptions, ProxmoxProvider};
pub use crate::provider::AnyProvider;
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
    /// Proxmox VE: clones of the templates `imagectl publish` made.
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
    /// GitLab settings.
    #[command(flatten)]
    pub gitlab: GitlabFlags,
    /// Local provider: state directory (env IMAGECTL_STATE_DIR; default ~/.local/share/imagectl).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Local provider: image store, the directory `imagectl build --out` wrote to (default ./out).
    #[arg(long, value_name = "DIR")]
    pub images_dir: Option<PathBuf>,
    /// Proxmox connection and settings file (--config).
    #[command(flatten)]
    pub pve: ProxmoxFlags,
    /// Proxmox fleet settings.
    #[command(flatten)]
    pub pve_fleet: PveArgs,
}

/// Proxmox settings of the fleet commands beyond the connection.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PveArgs {
    /// Proxmox: file storage with iso content for the per-VM seeds (default: [fleet.NAME] seed_storage, else local).
    #[arg(long, value_name = "STORAGE")]
    pub seed_storage: Option<String>,
    /// Proxmox: resource pool the VMs join (default: [fleet.NAME] pool, else none).
    #[arg(long, value_name = "POOL")]
    pub pool: Option<String>,
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
    /// Old VMs drained before their replacements are online, in a rollout (default 0; for full nodes).
    #[arg(long, value_name = "N")]
    pub max_unavailable: Option<usize>,
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
    /// Proxmox: (VM pool, lock pool, seed storage) for the privilege preflight; pools are
    /// `None` for commands over every fleet.
    pub pve_scope: Option<(Option<String>, Option<String>, String, bool)>,
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
    resolve(a, t, need_gitlab, image)
}

/// [`setup`] for commands over every fleet (`gc` without `--fleet`): `a.fleet` may be empty.
pub fn setup_all_fleets(a: &FleetArgs, need_gitlab: bool) -> Result<Setup> {
    if !a.fleet.is_empty() {
        settings::validate_fleet_name(&a.fleet)?;
    }
    Ok(resolve(a, &TuneArgs::default(), need_gitlab, None)?.0)
}

fn resolve(
    a: &FleetArgs,
    t: &TuneArgs,
    need_gitlab: bool,
    image: Option<&str>,
) -> Result<(Setup, ImageChoice)> {
    let file = settings::read_file(a.pve.config.as_deref(), &a.fleet, &env)?;
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
    let provider = match kind {
        ProviderKind::Local => {
            // IMAGECTL_ACCEL is checked now, not when the first VM boots (after its runner exists).
            crate::vm::Accel::from_env_or(accel)?;
            let local = LocalProvider::new(LocalOptions {
                state_dir: state_dir.clone(),
                images_dir,
                image_name: fs.image_name.clone(),
                net,
                gitlab_url,
                accel,
                firmware: Firmware::Bios,
                qemu: "qemu-system-x86_64".into(),
            })?;
            AnyProvider::Local(local)
        }
        ProviderKind::Proxmox => {
            let pve = crate::config::resolve_from_env(&a.pve)?;
            let client = crate::remote::pve::PveClient::new(pve.client.clone())?;
            AnyProvider::Proxmox(ProxmoxProvider::new(
                client,
                ProxmoxOptions {
                    seed_storage: a
                        .pve_fleet
                        .seed_storage
                        .clone()
                        .or_else(|| fs.seed_storage.clone())
                        .unwrap_or_else(|| "local".into()),
                    pool: a.pve_fleet.pool.clone().or_else(|| fs.pool.clone()),
                    full_storage: fs.full_storage.clone(),
                    vmid_range: pve.vmid_range,
                    image_name: fs.image_name.clone(),
                },
            ))
        }
    };
    let pve_scope = match &provider {
        AnyProvider::Proxmox(_) => {
            let fleet = (!a.fleet.is_empty()).then(|| a.fleet.clone());
            let named = a.pve_fleet.pool.clone().or_else(|| fs.pool.clone());
            let user_pool = named.is_some();
            let pool = named.or_else(|| fleet.as_ref().map(|f| format!("imagectl-{f}")));
            let seed_storage = a
                .pve_fleet
                .seed_storage
                .clone()
                .or_else(|| fs.seed_storage.clone())
                .unwrap_or_else(|| "local".into());
            Some((
                pool,
                fleet.map(|f| format!("imagectl-lock-{f}")),
                seed_storage,
                user_pool,
            ))
        }
        AnyProvider::Local(_) => None,
    };
    let seed_dir = match &provider {
        AnyProvider::Local(l) => l.seeds_dir(),
        AnyProvider::Proxmox(_) => private_dir(&state_dir.join("seeds"))?,
    };
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
    opts.max_unavailable = t
        .max_unavailable
        .or(fs.max_unavailable)
        .unwrap_or(opts.max_unavailable);
    opts.force = t.force;
    opts.full_clone = t.full;
    if opts.memory_mib < 256 {
        return Err(input("--memory must be at least 256 MiB"));
    }
    if opts.concurrency == 0 || opts.cpus == 0 {
        return Err(input("--concurrency and --cpus must be at least 1"));
    }
    if opts.max_surge + opts.max_unavailable == 0 {
        return Err(input(
            "--max-surge and --max-unavailable cannot both be 0: a rollout could never start",
        ));
    }
    if opts.timeout.is_zero() {
        return Err(input("--timeout must be at least 1 second"));
    }
    Ok((
        Setup {
            file,
            provider,
            gitlab,
            opts,
            seed_dir,
            pve_scope,
        },
        choice,
    ))
}

impl Setup {
    /// The GitLab token preflight for `cmd` ([`super::preflight`]), when GitLab is configured:
    /// exits 2 before anything is made when a needed scope is missing; warns about optional ones.
    pub async fn preflight(&self, cmd: super::preflight::Command) -> Result<()> {
        if let (AnyProvider::Proxmox(p), Some((pool, lock, seeds, user_pool))) =
            (&self.provider, &self.pve_scope)
        {
            use crate::remote::pve::access::{fleet_needs, pool_exists, preflight, Feature};
            let mutating = cmd != super::preflight::Command::Status;
            let exists = match pool {
                Some(id) if mutating => pool_exists(p.client(), id).await,
                _ => true,
            };
            preflight(p.client(), cmd.name(), &[Feature::PoolById], |v| {
                if !mutating {
                    return Vec::new();
                }
                fleet_needs(
                    v,
                    pool.as_deref(),
                    lock.as_deref(),
                    seeds,
                    !exists || !user_pool,
                )
            })
            .await?;
        }
        if let Some((gitlab, _)) = &self.gitlab {
            let p = super::preflight::check(gitlab, cmd).await?;
            for w in &p.warnings {
                eprintln!("warning: {w}");
            }
            tracing::debug!(
                "GitLab token {:?}: scopes {}, administrator: {}",
                p.token.name,
                p.token.scope_list(),
                p.admin
            );
        }
        Ok(())
    }

    /// A [`Fleet`] over the chosen provider, with Ctrl-C handling installed (call inside the
    /// runtime).
    pub fn fleet(&self, quiet: bool) -> Result<Fleet<'_, AnyProvider>> {
        let (gitlab, gl) = self.gitlab.as_ref().map(|(c, g)| (c, g)).ok_or_else(|| {
            input("this command needs GitLab settings (GITLAB_URL, GITLAB_TOKEN)")
        })?;
        let cancel = Cancel::new();
        cancel.on_signals();
        Ok(Fleet {
            provider: &self.provider,
            gitlab,
            gl,
            opts: &self.opts,
            seed_dir: self.seed_dir.clone(),
            cancel,
            progress: Reporter::new(quiet),
            slots: tokio::sync::Semaphore::new(self.opts.concurrency.max(1)),
        })
    }
}

/// Creates `dir` (and parents) with mode 0700 and returns it.
fn private_dir(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))?;
    Ok(dir.to_path_buf())
}
