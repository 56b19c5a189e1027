//! The grammar of spec fields that reach a shell, apt, GRUB or the image.
//!
//! Every such field is checked at load time, on the spec as written and on each profile as
//! written (before it is applied), so a value that would become an option, a pattern, a second
//! line of a config file or a shell word never gets that far. The checks are whitelists: what is
//! not described here is refused.

use crate::error::input;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// How many alias uses (`*name`) a spec or profile may hold. A spec needs none; a few are handy.
/// Every alias is expanded by the YAML loader, so many aliases to one big value multiply it.
pub const MAX_ALIASES: usize = 100;
/// The most an alias may expand to, in total: uses × the text's size stays below this.
const MAX_EXPANDED: usize = 16 << 20;

/// Shells a user may get: absolute paths the Debian packages that provide them install. The bake
/// also checks that the shell exists (executable) in the built root filesystem.
pub const SHELLS: &[&str] = &[
    "/bin/sh",
    "/bin/bash",
    "/bin/dash",
    "/bin/rbash",
    "/bin/zsh",
    "/bin/false",
    "/usr/bin/sh",
    "/usr/bin/bash",
    "/usr/bin/dash",
    "/usr/bin/rbash",
    "/usr/bin/zsh",
    "/usr/bin/fish",
    "/usr/bin/false",
    "/usr/sbin/nologin",
    "/sbin/nologin",
];

fn name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '.' | '-')
}

/// A Debian package name (policy 5.6.1): `[a-z0-9][a-z0-9+.-]+`.
pub fn is_package_name(s: &str) -> bool {
    s.len() >= 2
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars().all(name_char)
}

/// A Debian version (policy 5.6.12): optional `epoch:` (digits), an upstream version starting
/// with a digit, then `[A-Za-z0-9.+~:-]`.
pub fn is_debian_version(s: &str) -> bool {
    let rest = match s.split_once(':') {
        Some((epoch, rest)) if !epoch.is_empty() && epoch.chars().all(|c| c.is_ascii_digit()) => {
            rest
        }
        Some(_) => return false,
        None => s,
    };
    rest.starts_with(|c: char| c.is_ascii_digit())
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '~' | ':' | '-'))
}

/// A package request: `name`, `name=version` or `name/suite`. Never an option (`-…`), a path
/// (`./x.deb`, `/x.deb`), a pattern (`?true`, `!udev`, `linux-*`) or two words.
pub fn is_package(s: &str) -> bool {
    if let Some((name, version)) = s.split_once('=') {
        return is_package_name(name) && is_debian_version(version);
    }
    if let Some((name, suite)) = s.split_once('/') {
        return is_package_name(name) && is_suite(suite) && !suite.contains('/');
    }
    is_package_name(s)
}

/// A suite: `[A-Za-z0-9][A-Za-z0-9._+~/-]*` (e.g. `bookworm-backports`, `stable/updates`), or a
/// flat repository's `./` or `/`.
pub fn is_suite(s: &str) -> bool {
    s == "./"
        || s == "/"
        || (s.len() <= 64
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '~' | '/' | '-')
            })
            && !s.split('/').any(|c| c == ".."))
}

/// An archive component: `[A-Za-z0-9][A-Za-z0-9._+/-]*` (e.g. `main`, `non-free-firmware`).
pub fn is_component(s: &str) -> bool {
    s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '/' | '-'))
        && !s.split('/').any(|c| c == "..")
}

/// A URL with one of `schemes` and nothing a config line could be split at: printable ASCII
/// without whitespace, quotes, backslash, `<>[]{}|^` or backtick.
pub fn is_url(s: &str, schemes: &[&str]) -> bool {
    schemes.iter().any(|p| s.starts_with(p))
        && s.len() <= 2048
        && s.chars().all(|c| {
            c.is_ascii_graphic()
                && !matches!(
                    c,
                    '"' | '\'' | '\\' | '<' | '>' | '[' | ']' | '{' | '}' | '|' | '^' | '`'
                )
        })
}

/// A user or group name: Debian `adduser`'s `NAME_REGEX` `^[a-z][-a-z0-9_]*$`, plus a leading
/// `_` for system names such as `_ssh`; at most 32 characters.
pub fn is_account_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// A login shell: an absolute path of `[A-Za-z0-9/._+-]` that is one of [`SHELLS`].
pub fn check_shell(s: &str, what: &str) -> Result<()> {
    let chars_ok = s.starts_with('/')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '+' | '-'));
    if !chars_ok {
        return Err(input(format!(
            "{what} {s:?}: a shell is an absolute path of letters, digits and /._+- (e.g. /bin/bash)"
        )));
    }
    if !SHELLS.contains(&s) {
        return Err(input(format!(
            "{what} {s:?} is not a known shell; use one of {}",
            SHELLS.join(", ")
        )));
    }
    Ok(())
}

/// The kernel command line: at most 1024 characters of `[A-Za-z0-9 ._,:=/+@%~-]` (no newline,
/// quote, backslash, brace, `;`, `$`, `#` or backtick, which would end GRUB's `linux` line).
pub fn is_cmdline(s: &str) -> bool {
    s.len() <= 1024
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    ' ' | '.' | '_' | ',' | ':' | '=' | '/' | '+' | '@' | '%' | '~' | '-'
                )
        })
}

/// A destination in the image, normalised: `//`, `.` and a trailing `/` removed. `None` for a
/// path that is not absolute, has a `..` component, or names the root or a control character.
pub fn normalize_dest(dest: &str) -> Option<String> {
    if !dest.starts_with('/') || dest.chars().any(|c| c.is_control()) {
        return None;
    }
    let mut parts = Vec::new();
    for c in dest.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return None;
    }
    Some(format!("/{}", parts.join("/")))
}

/// The tree a spec's host files must come from: the repository holding the spec (the nearest
/// directory above it with a `.git`, or with an `.imagectl-root` file for a tree exported without
/// its `.git`), else the spec's own directory; canonical.
pub fn confinement_root(spec_dir: &Path) -> Result<PathBuf> {
    let dir = std::fs::canonicalize(spec_dir).map_err(|e| {
        input(format!(
            "spec directory {}: {}",
            spec_dir.display(),
            e.kind()
        ))
    })?;
    Ok(dir
        .ancestors()
        .find(|a| a.join(".git").exists() || a.join(".imagectl-root").is_file())
        .map(Path::to_path_buf)
        .unwrap_or(dir))
}

/// Checks that `path` (already resolved against the spec directory) exists and, with symlinks
/// resolved, lies inside `root`.
pub fn check_confined(path: &Path, root: &Path, what: &str) -> Result<()> {
    let real = std::fs::canonicalize(path)
        .map_err(|_| input(format!("{what} {} not found", path.display())))?;
    if !real.starts_with(root) {
        return Err(input(format!(
            "{what} {} resolves to {}, outside {}: a spec may only bake in files of its own repository",
            path.display(),
            real.display(),
            root.display()
        )));
    }
    Ok(())
}

/// Refuses YAML whose aliases could multiply its size: more than [`MAX_ALIASES`] uses of an
/// anchor, or uses × text size above 16 MiB. yaml_serde has no alias budget of its own for
/// scalars (it already refuses recursive collection bombs), so this counts `*name` tokens whose
/// name some `&name` defines; text without anchors has no aliases at all.
pub fn check_aliases(text: &str, path: &Path) -> Result<()> {
    let token = |rest: &str| -> String {
        rest.chars()
            .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | '[' | ']' | '{' | '}'))
            .collect()
    };
    let mut anchors = std::collections::BTreeSet::new();
    for (i, _) in text.match_indices('&') {
        let name = token(&text[i + 1..]);
        if !name.is_empty() {
            anchors.insert(name);
        }
    }
    if anchors.is_empty() {
        return Ok(());
    }
    let uses = text
        .match_indices('*')
        .filter(|(i, _)| anchors.contains(&token(&text[i + 1..])))
        .count();
    let cap = MAX_ALIASES.min(MAX_EXPANDED / text.len().max(1));
    if uses > cap {
        return Err(input(format!(
            "{}: {uses} YAML alias uses (*name); at most {cap} are accepted in a file of this size",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages() {
        for ok in [
            "vim",
            "linux-image-cloud-amd64",
            "g++",
            "libc6=2.36-9+deb12u4",
            "tzdata=1:2024a-0",
            "cadvisor/bullseye",
            "a0",
        ] {
            assert!(is_package(ok), "{ok}");
        }
        for bad in [
            "--allow-unauthenticated",
            "-oAPT::Get::AllowUnauthenticated=true",
            "/path/evil.deb",
            "./evil.deb",
            "?true",
            "!udev",
            "linux-image-*",
            "Vim",
            "a",
            "",
            "x=",
            "x=abc",
            "x=1 y",
            "x/../y",
            "x\ny",
        ] {
            assert!(!is_package(bad), "{bad}");
        }
    }

    #[test]
    fn urls_suites_components() {
        assert!(is_url(
            "https://deb.debian.org/debian",
            &["https://", "http://"]
        ));
        assert!(!is_url(
            "http://x/ bookworm main\ndeb [trusted=yes] http://e/evil",
            &["http://"]
        ));
        assert!(!is_url("http://x/[", &["http://"]));
        assert!(!is_url("ftp://x", &["https://"]));
        assert!(is_suite("bookworm-backports") && is_suite("./"));
        assert!(!is_suite("bookworm main") && !is_suite("-x") && !is_suite("a\nb"));
        assert!(is_component("non-free-firmware"));
        assert!(!is_component("main\ndeb") && !is_component(""));
    }

    #[test]
    fn accounts_shells_cmdline() {
        assert!(
            is_account_name("docker")
                && is_account_name("_ssh")
                && is_account_name("systemd-journal")
        );
        assert!(
            !is_account_name("a,b")
                && !is_account_name("Root")
                && !is_account_name("1x")
                && !is_account_name("a b")
        );
        assert!(check_shell("/bin/bash", "s").is_ok());
        for bad in [
            "/bin/sh; rm -rf /",
            "$(id)",
            "/bin/sh\n",
            "bash",
            "/opt/evil",
        ] {
            assert!(check_shell(bad, "s").is_err(), "{bad}");
        }
        assert!(is_cmdline(
            "console=tty0 console=ttyS0,115200n8 net.ifnames=0"
        ));
        for bad in [
            "a\nb",
            "}\nmenuentry evil {",
            "a\"b",
            "a'b",
            "a\\b",
            "a;b",
            "a$b",
            "a`b",
        ] {
            assert!(!is_cmdline(bad), "{bad}");
        }
    }

    #[test]
    fn dests_normalise() {
        assert_eq!(
            normalize_dest("/etc//machine-id").as_deref(),
            Some("/etc/machine-id")
        );
        assert_eq!(
            normalize_dest("/etc/./ssh//x/").as_deref(),
            Some("/etc/ssh/x")
        );
        assert_eq!(normalize_dest("/etc/../x"), None);
        assert_eq!(normalize_dest("etc/x"), None);
        assert_eq!(normalize_dest("//"), None);
    }

    #[test]
    fn alias_uses_are_capped() {
        let p = Path::new("s.yaml");
        assert!(check_aliases("a: 1\nb: '*x'\n", p).is_ok());
        let few = format!("x: &s hello\ny: [{}]\n", ["*s"; 10].join(", "));
        assert!(check_aliases(&few, p).is_ok());
        let many = format!("x: &s hello\ny: [{}]\n", ["*s"; 101].join(", "));
        assert!(check_aliases(&many, p).is_err());
    }
}
