//! `imagectl man [--out-dir DIR]`: the roff man page, generated from the clap definition.
//!
//! Without `--out-dir`, `imagectl(1)` is printed to stdout (`imagectl man | man -l -`). With it,
//! `imagectl.1` and one page per subcommand (`imagectl-build.1`, …) are written into DIR, ready for
//! `/usr/local/share/man/man1`.

use super::Global;
use anyhow::Context;
use clap::CommandFactory;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Arguments of `imagectl man`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Write imagectl.1 and one page per subcommand (imagectl-SUBCOMMAND.1) into this directory
    /// instead of printing imagectl.1 to stdout.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// The `.TH` source field: `imagectl <version>` on every page.
fn source() -> String {
    format!("imagectl {}", env!("CARGO_PKG_VERSION"))
}

/// Renders the top-level page, `imagectl(1)`.
pub fn render_main() -> anyhow::Result<Vec<u8>> {
    let cmd = super::Cli::command();
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd)
        .source(source())
        .render(&mut buf)
        .context("rendering the imagectl man page")?;
    Ok(buf)
}

/// Writes `imagectl.1` and `imagectl-<sub>.1` for every subcommand into `dir`; returns the files.
pub fn write_pages(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fs_err::create_dir_all(dir)?;
    let mut cmd = super::Cli::command();
    // Propagates global flags and versions into subcommands, so their pages list them.
    cmd.build();
    let mut written = Vec::new();
    let main = dir.join("imagectl.1");
    fs_err::write(&main, render_main()?)?;
    written.push(main);
    for sub in cmd.get_subcommands() {
        // `help` is clap's own subcommand; `imagectl(1)` covers it.
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        // After `build()`, a subcommand's display name is `imagectl-<sub>` and its bin name
        // `imagectl <sub>`: the page title and synopsis follow them.
        let page_name = sub
            .get_display_name()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("imagectl-{}", sub.get_name()));
        let sub = sub.clone();
        let mut buf = Vec::new();
        clap_mangen::Man::new(sub)
            .source(source())
            .render(&mut buf)
            .with_context(|| format!("rendering the {page_name} man page"))?;
        let path = dir.join(format!("{page_name}.1"));
        fs_err::write(&path, buf)?;
        written.push(path);
    }
    Ok(written)
}

/// Runs `imagectl man`.
pub fn run(g: &Global, a: Args) -> anyhow::Result<i32> {
    match a.out_dir {
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(&render_main()?)?;
            out.flush()?;
        }
        Some(dir) => {
            let files = write_pages(&dir)?;
            let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
            g.emit(&names, |n| {
                n.iter().map(|l| format!("{l}\n")).collect::<String>()
            })?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn main_page_is_roff_with_a_title() {
        let page = String::from_utf8(render_main().unwrap()).unwrap();
        assert!(
            page.starts_with(".ie") || page.contains("\n.TH imagectl 1"),
            "{page}"
        );
        assert!(page.contains(".TH imagectl"));
        assert!(page.contains(".SH SUBCOMMANDS") || page.contains("SUBCOMMANDS"));
    }

    #[test]
    fn out_dir_gets_one_page_per_subcommand() {
        let d = tempfile::tempdir().unwrap();
        let files = write_pages(d.path()).unwrap();
        let build = d.path().join("imagectl-build.1");
        assert!(files.contains(&build), "{files:?}");
        let text = std::fs::read_to_string(build).unwrap();
        assert!(text.contains(".TH imagectl-build 1"), "{text}");
        assert!(
            text.contains(concat!("\"imagectl ", env!("CARGO_PKG_VERSION"), "\"")),
            "{text}"
        );
        assert!(!d.path().join("imagectl-help.1").exists());
        assert!(
            text.contains("locked"),
            "build's --locked flag is missing: {text}"
        );
    }
}
