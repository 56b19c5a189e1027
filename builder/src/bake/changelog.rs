//! The package changelog of a build (`imagectl build --changelog FILE`): what changed between the
//! previous lock and the one this build resolved, as Markdown a reviewer reads in a pipeline
//! artifact — packages added, removed, upgraded and downgraded (old → new version), packages
//! rebuilt under the same version, and artifacts.
//!
//! The comparison itself is [`Lock::diff`]; this module only sorts its lines into sections and
//! orders versions the way dpkg does, so "upgraded" means what `apt` would call an upgrade.

use crate::spec::lock::Lock;
use std::cmp::Ordering;
use std::fmt::Write as _;

/// One line of [`Lock::diff`], classified.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Change {
    Added {
        name: String,
        version: String,
    },
    Removed {
        name: String,
        version: String,
    },
    Changed {
        name: String,
        old: String,
        new: String,
    },
    Rebuilt {
        name: String,
        version: String,
    },
    ArtifactAdded(String),
    ArtifactRemoved(String),
    ArtifactChanged(String),
    /// A line this module does not know: shown as it is.
    Other(String),
}

fn classify(line: &str) -> Change {
    let other = || Change::Other(line.to_owned());
    let Some((sign, rest)) = line.split_once(' ') else {
        return other();
    };
    if let Some(name) = rest.strip_prefix("artifact ") {
        let name = name.to_owned();
        return match sign {
            "+" => Change::ArtifactAdded(name),
            "-" => Change::ArtifactRemoved(name),
            "~" => Change::ArtifactChanged(name),
            _ => other(),
        };
    }
    let words: Vec<&str> = rest.split(' ').collect();
    match (sign, words.as_slice()) {
        ("+", [name, version]) => Change::Added {
            name: (*name).into(),
            version: (*version).into(),
        },
        ("-", [name, version]) => Change::Removed {
            name: (*name).into(),
            version: (*version).into(),
        },
        ("~", [name, old, "->", new]) => Change::Changed {
            name: (*name).into(),
            old: (*old).into(),
            new: (*new).into(),
        },
        ("~", [name, version, "(sha256", "changed)"]) => Change::Rebuilt {
            name: (*name).into(),
            version: (*version).into(),
        },
        _ => other(),
    }
}

/// Orders two Debian versions as `dpkg --compare-versions` does (epoch, upstream, revision;
/// `~` sorts before everything, letters before other characters).
pub fn compare_debian_versions(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) if e.chars().all(|c| c.is_ascii_digit()) => (e.parse().unwrap_or(0), r),
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((up, rev)) => (epoch, up, rev),
            None => (epoch, rest, ""),
        }
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua, ub))
        .then_with(|| verrevcmp(ra, rb))
}

/// dpkg's weight of a character in the non-digit part of a version.
fn weight(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

fn verrevcmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let (wa, wb) = (weight(a.get(i).copied()), weight(b.get(j).copied()));
            if wa != wb {
                return wa.cmp(&wb);
            }
            i += 1;
            j += 1;
        }
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while i < a.len() && a[i].is_ascii_digit() && j < b.len() && b[j].is_ascii_digit() {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if i < a.len() && a[i].is_ascii_digit() {
            return Ordering::Greater;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

fn date(epoch: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(epoch)
        .map(|t| format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()))
        .unwrap_or_else(|_| epoch.to_string())
}

fn table(out: &mut String, title: &str, header: &[&str], rows: &[Vec<String>]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n## {title} ({})\n", rows.len());
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", " --- |".repeat(header.len()));
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
}

fn short(sha: &str) -> String {
    format!("`{}`", &sha[..sha.len().min(12)])
}

/// The changelog of image `name` `version`: `old` is the lock before the build (`None`: there
/// was none), `new` the one the build resolved.
pub fn render(name: &str, version: &str, old: Option<&Lock>, new: &Lock) -> String {
    render_with_drift(name, version, old, new, &[])
}

/// [`render`], with the pins that were re-resolved because no source served them any more (one
/// line each, as the build printed them).
pub fn render_with_drift(
    name: &str,
    version: &str,
    old: Option<&Lock>,
    new: &Lock,
    drift: &[String],
) -> String {
    let empty = Lock {
        packages: vec![],
        artifacts: vec![],
        ..new.clone()
    };
    let base = old.unwrap_or(&empty);
    let changes: Vec<Change> = base.diff(new).iter().map(|l| classify(l)).collect();

    let mut out = format!("# {name} {version}: package changes\n\n");
    match old {
        None => {
            let _ = writeln!(
                out,
                "No previous lock: this build resolved the first package set ({} packages, \
                 resolved {}).",
                new.packages.len(),
                date(new.source_date_epoch)
            );
        }
        Some(o) => {
            let _ = writeln!(
                out,
                "Compared with the previous lock (resolved {}); this build resolved {} packages \
                 on {}.",
                date(o.source_date_epoch),
                new.packages.len(),
                date(new.source_date_epoch)
            );
        }
    }
    if !drift.is_empty() {
        out.push_str(
            "\n## Pinned versions no longer served\n\nNo source (the .deb cache, the mirror, the \
             snapshot archive) served these pinned versions any more, so the build re-resolved \
             them:\n\n",
        );
        for d in drift {
            let _ = writeln!(out, "- {d}");
        }
    }
    if changes.is_empty() {
        out.push_str("\nNo package changes.\n");
        if old.is_some_and(|o| o.inputs != new.inputs) {
            out.push_str(
                "\nThe spec's package inputs changed (packages, repositories or users), but they \
                 resolve to the same packages.\n",
            );
        }
        return out;
    }

    let (mut up, mut down, mut added, mut removed, mut rebuilt, mut arts, mut other) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let art = |lock: &Lock, n: &str| lock.artifacts.iter().find(|a| a.name == n).cloned();
    for c in changes {
        match c {
            Change::Changed { name, old, new } => {
                let row = vec![format!("`{name}`"), old.clone(), new.clone()];
                if compare_debian_versions(&new, &old) == Ordering::Less {
                    down.push(row);
                } else {
                    up.push(row);
                }
            }
            Change::Added { name, version } => added.push(vec![format!("`{name}`"), version]),
            Change::Removed { name, version } => removed.push(vec![format!("`{name}`"), version]),
            Change::Rebuilt { name, version } => rebuilt.push(vec![format!("`{name}`"), version]),
            Change::ArtifactAdded(n) => {
                let a = art(new, &n);
                arts.push(vec![
                    format!("`{n}`"),
                    "added".into(),
                    "—".into(),
                    a.map(|a| format!("{} ({})", a.url, short(&a.sha256)))
                        .unwrap_or_default(),
                ]);
            }
            Change::ArtifactRemoved(n) => {
                let a = art(base, &n);
                arts.push(vec![
                    format!("`{n}`"),
                    "removed".into(),
                    a.map(|a| format!("{} ({})", a.url, short(&a.sha256)))
                        .unwrap_or_default(),
                    "—".into(),
                ]);
            }
            Change::ArtifactChanged(n) => {
                let (o, w) = (art(base, &n), art(new, &n));
                let show = |a: Option<crate::spec::lock::LockedArtifact>| {
                    a.map(|a| format!("{} ({})", a.url, short(&a.sha256)))
                        .unwrap_or_default()
                };
                arts.push(vec![format!("`{n}`"), "changed".into(), show(o), show(w)]);
            }
            Change::Other(l) => other.push(l),
        }
    }
    let _ = writeln!(
        out,
        "\n{} upgraded, {} downgraded, {} added, {} removed, {} rebuilt, {} artifacts changed.",
        up.len(),
        down.len(),
        added.len(),
        removed.len(),
        rebuilt.len(),
        arts.len()
    );
    table(&mut out, "Upgraded", &["package", "old", "new"], &up);
    table(&mut out, "Downgraded", &["package", "old", "new"], &down);
    table(&mut out, "Added", &["package", "version"], &added);
    table(&mut out, "Removed", &["package", "version"], &removed);
    table(
        &mut out,
        "Rebuilt (same version, different .deb)",
        &["package", "version"],
        &rebuilt,
    );
    table(
        &mut out,
        "Artifacts",
        &["artifact", "change", "old", "new"],
        &arts,
    );
    if !other.is_empty() {
        let _ = writeln!(out, "\n## Other changes\n");
        for l in other {
            let _ = writeln!(out, "- `{l}`");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::lock::{LockedArtifact, LockedPackage, LOCK_VERSION};

    fn pkg(name: &str, v: &str, sha: &str) -> LockedPackage {
        LockedPackage {
            name: name.into(),
            version: v.into(),
            arch: "amd64".into(),
            sha256: sha.into(),
        }
    }

    fn lock(packages: Vec<LockedPackage>, artifacts: Vec<LockedArtifact>) -> Lock {
        Lock {
            version: LOCK_VERSION,
            spec: "gitlab-runner".into(),
            inputs: "i".into(),
            source_date_epoch: 1_748_736_000, // 2025-06-01
            snapshot: None,
            packages,
            artifacts,
        }
    }

    fn artifact(url: &str, sha: &str) -> LockedArtifact {
        LockedArtifact {
            name: "cadvisor".into(),
            url: url.into(),
            sha256: sha.into(),
        }
    }

    #[test]
    fn drift_is_recorded() {
        let l = lock(vec![pkg("a", "1", "x")], vec![]);
        let md = render_with_drift(
            "img",
            "1",
            Some(&l),
            &lock(vec![pkg("a", "2", "y")], vec![]),
            &["a 1 → 2 (pinned version no longer served)".into()],
        );
        assert!(md.contains("## Pinned versions no longer served"), "{md}");
        assert!(
            md.contains("- a 1 → 2 (pinned version no longer served)"),
            "{md}"
        );
    }

    #[test]
    fn debian_versions_order_like_dpkg() {
        use Ordering::*;
        for (a, b, want) in [
            ("1.0", "1.0", Equal),
            ("1.0~rc1", "1.0", Less),
            ("1.0", "1.0a", Less),
            ("1.0", "1.0+b1", Less),
            ("1:0.9", "2.0", Greater),
            ("2.10", "2.9", Greater),
            ("1.01", "1.1", Equal),
            ("1.0-1", "1.0", Greater),
            ("20.10.24+dfsg1-1+b3", "20.10.24+dfsg1-1+deb12u1", Less),
            ("6.1.0-28", "6.1.0-31", Less),
            ("252.30-1~deb12u2", "252.30-1", Less),
        ] {
            assert_eq!(compare_debian_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_debian_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn diff_lines_are_classified() {
        assert_eq!(
            classify("~ a 1 -> 2"),
            Change::Changed {
                name: "a".into(),
                old: "1".into(),
                new: "2".into()
            }
        );
        assert_eq!(
            classify("~ a 1 (sha256 changed)"),
            Change::Rebuilt {
                name: "a".into(),
                version: "1".into()
            }
        );
        assert_eq!(
            classify("- artifact x"),
            Change::ArtifactRemoved("x".into())
        );
        assert_eq!(classify("? what"), Change::Other("? what".into()));
    }

    #[test]
    fn renders_every_kind_of_change_as_markdown() {
        let old = lock(
            vec![
                pkg("docker.io", "20.10.24+dfsg1-1+b3", "d1"),
                pkg("libfoo1", "1.2-1", "f1"),
                pkg("openssl", "3.0.15-1~deb12u1", "o1"),
                pkg("tzdata", "2025a-0+deb12u1", "t1"),
                pkg("zlib1g", "1:1.2.13.dfsg-1", "z1"),
            ],
            vec![artifact(
                "https://example.org/cadvisor-v0.49.1",
                "aaaaaaaaaaaaaaaa",
            )],
        );
        let new = lock(
            vec![
                pkg("docker.io", "20.10.24+dfsg1-1+deb12u1", "d2"),
                pkg("libbar2", "2.0-3", "b1"),
                pkg("openssl", "3.0.15-1~deb12u1", "o2"),
                pkg("tzdata", "2024b-0+deb12u1", "t2"),
                pkg("zlib1g", "1:1.2.13.dfsg-1", "z1"),
            ],
            vec![artifact(
                "https://example.org/cadvisor-v0.52.1",
                "bbbbbbbbbbbbbbbb",
            )],
        );
        let md = render("gitlab-runner", "1.0-20250601-3f2a9c1e", Some(&old), &new);
        assert!(
            md.starts_with("# gitlab-runner 1.0-20250601-3f2a9c1e: package changes\n"),
            "{md}"
        );
        for want in [
            "1 upgraded, 1 downgraded, 1 added, 1 removed, 1 rebuilt, 1 artifacts changed.",
            "## Upgraded (1)\n\n| package | old | new |\n| --- | --- | --- |\n\
             | `docker.io` | 20.10.24+dfsg1-1+b3 | 20.10.24+dfsg1-1+deb12u1 |\n",
            "## Downgraded (1)",
            "| `tzdata` | 2025a-0+deb12u1 | 2024b-0+deb12u1 |",
            "## Added (1)\n\n| package | version |\n| --- | --- |\n| `libbar2` | 2.0-3 |\n",
            "## Removed (1)",
            "| `libfoo1` | 1.2-1 |",
            "## Rebuilt (same version, different .deb) (1)",
            "| `openssl` | 3.0.15-1~deb12u1 |",
            "| `cadvisor` | changed | https://example.org/cadvisor-v0.49.1 (`aaaaaaaaaaaa`) | \
             https://example.org/cadvisor-v0.52.1 (`bbbbbbbbbbbb`) |",
        ] {
            assert!(md.contains(want), "missing {want:?} in:\n{md}");
        }
        assert!(!md.contains("zlib1g"), "unchanged packages are not listed");
        assert!(!md.contains("No package changes"));
    }

    #[test]
    fn equal_locks_say_no_package_changes() {
        let l = lock(vec![pkg("a", "1", "x")], vec![]);
        let md = render("img", "1", Some(&l), &l);
        assert!(md.contains("\nNo package changes.\n"), "{md}");
        assert!(!md.contains("## "), "{md}");
        let mut other_inputs = l.clone();
        other_inputs.inputs = "j".into();
        let md = render("img", "1", Some(&l), &other_inputs);
        assert!(md.contains("No package changes.") && md.contains("inputs changed"));
    }

    #[test]
    fn a_first_lock_lists_every_package_as_added() {
        let new = lock(
            vec![pkg("a", "1", "x"), pkg("b", "2", "y")],
            vec![artifact("https://example.org/c", "cccc")],
        );
        let md = render("img", "1", None, &new);
        assert!(md.contains("No previous lock"), "{md}");
        assert!(md.contains("## Added (2)"), "{md}");
        assert!(md.contains("| `cadvisor` | added | — |"), "{md}");
    }
}
