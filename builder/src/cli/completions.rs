//! `imagectl completions SHELL`: a shell completion script generated from the clap definition.
//!
//! The script goes to stdout, so it can be installed with a redirect, e.g.
//! `imagectl completions bash > /etc/bash_completion.d/imagectl`.

use super::Global;
use clap::CommandFactory;
use clap_complete::Shell;
use std::io::Write;

/// Arguments of `imagectl completions`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Shell to generate the completion script for.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Writes the completion script for `shell` to `out`.
pub fn generate(shell: Shell, out: &mut dyn Write) {
    let mut cmd = super::Cli::command();
    let name = cmd.get_name().to_owned();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// Runs `imagectl completions`. The script is made in memory first (clap_complete panics when
/// its writer fails), then written; a closed stdout ends the command quietly.
pub fn run(_g: &Global, a: Args) -> anyhow::Result<i32> {
    let mut script = Vec::new();
    generate(a.shell, &mut script);
    let mut out = std::io::stdout().lock();
    out.write_all(&script)?;
    out.flush()?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_binary() {
        for shell in [
            Shell::Bash,
            Shell::Zsh,
            Shell::Fish,
            Shell::Elvish,
            Shell::PowerShell,
        ] {
            let mut buf = Vec::new();
            generate(shell, &mut buf);
            let text = String::from_utf8(buf).unwrap();
            assert!(text.contains("imagectl"), "{shell}: {text}");
            for sub in super::super::command().get_subcommands() {
                assert!(
                    text.contains(sub.get_name()),
                    "{shell} script lacks subcommand {}",
                    sub.get_name()
                );
            }
        }
    }
}
