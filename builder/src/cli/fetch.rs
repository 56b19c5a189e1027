//! `imagectl fetch`: download every locked .deb and artifact into a directory for an air-gapped
//! rebuild (`imagectl build --locked --cache-dir DIR`).

use super::Global;
use std::path::PathBuf;

/// Arguments of `imagectl fetch`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image spec (YAML), e.g. image-specs/gitlab-runner.yaml.
    pub spec: PathBuf,
    /// Profiles to apply, by name (profiles/NAME.yaml beside the spec) or path; repeatable.
    #[arg(long = "profile", short = 'p')]
    pub profiles: Vec<String>,
    /// Lock file (default: the spec's name with .lock).
    #[arg(long)]
    pub lock: Option<PathBuf>,
    /// Follow the lock as it is (always so: fetch never resolves or rewrites a lock; the flag
    /// says so in scripts).
    #[arg(long)]
    pub locked: bool,
    /// The directory to fill, laid out as an imagectl cache (give it to `build --cache-dir`).
    #[arg(long, value_name = "DIR")]
    pub into: PathBuf,
}

/// Runs `imagectl fetch`.
pub fn run(g: &Global, a: Args) -> anyhow::Result<i32> {
    let loaded = crate::spec::load(&a.spec, &a.profiles)?;
    let f = crate::bake::fetch::fetch(&loaded, a.lock, &a.into, &g.progress())?;
    g.emit(&f, |f| {
        format!(
            "fetched {} packages ({} already there, {} from the mirror, {} from the snapshot \
             archive; {}) and {} artifacts into {} in {:.1}s\nrebuild anywhere with: imagectl \
             build SPEC --locked --cache-dir {}\n",
            f.packages,
            f.already_there,
            f.from_mirror,
            f.from_snapshot,
            crate::util::human_size(f.bytes),
            f.artifacts,
            f.into.display(),
            f.seconds,
            f.into.display()
        )
    })?;
    Ok(0)
}
