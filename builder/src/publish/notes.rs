//! The notes (VM description) of a published template: readable Markdown in the PVE UI, and
//! `- imagectl-KEY: value` lines that imagectl reads back.

use super::Firmware;
use crate::manifest::Manifest;
use serde::Serialize;

/// Seconds after which another run's half-made template counts as abandoned.
pub const STALE_AFTER_SECS: u64 = 3600;

/// The facts imagectl keeps in a template's notes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Notes {
    /// Image name.
    pub image: Option<String>,
    /// Image version.
    pub version: Option<String>,
    /// Image sha256.
    pub sha256: Option<String>,
    /// Spec hash.
    pub spec_hash: Option<String>,
    /// Lock hash.
    pub lock_hash: Option<String>,
    /// Build date (RFC 3339).
    pub built_at: Option<String>,
    /// Firmware.
    pub firmware: Option<String>,
    /// The VM id of the template these notes were written for.
    pub template_vmid: Option<u32>,
    /// Set while the template is being made: the unix time the publish started.
    pub publishing: Option<u64>,
}

impl Notes {
    /// The notes of a template of `m` with id `vmid`; `publishing` marks it unfinished.
    pub fn for_image(m: &Manifest, vmid: u32, firmware: Firmware, publishing: Option<u64>) -> Self {
        Self {
            image: Some(m.name.clone()),
            version: Some(m.version.clone()),
            sha256: Some(m.sha256.clone()),
            spec_hash: Some(m.spec_hash.clone()),
            lock_hash: Some(m.lock_hash.clone()),
            built_at: Some(m.built_at.clone()),
            firmware: Some(match firmware {
                Firmware::Bios => "bios".into(),
                Firmware::Uefi => "uefi".into(),
            }),
            template_vmid: Some(vmid),
            publishing,
        }
    }

    /// Markdown for the PVE description field.
    pub fn render(&self) -> String {
        let mut s = format!(
            "imagectl template of **{}** `{}`{}\n\n",
            self.image.as_deref().unwrap_or("?"),
            self.version.as_deref().unwrap_or("?"),
            if self.publishing.is_some() {
                " (being published)"
            } else {
                ""
            }
        );
        let mut line = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                s.push_str(&format!("- imagectl-{k}: {v}\n"));
            }
        };
        line("image", self.image.clone());
        line("version", self.version.clone());
        line("sha256", self.sha256.clone());
        line("spec-hash", self.spec_hash.clone());
        line("lock-hash", self.lock_hash.clone());
        line("built-at", self.built_at.clone());
        line("firmware", self.firmware.clone());
        line("template", self.template_vmid.map(|v| v.to_string()));
        line("publishing", self.publishing.map(|v| v.to_string()));
        s
    }

    /// Reads the `imagectl-KEY: value` lines of a description (anything else is ignored).
    pub fn parse(text: &str) -> Self {
        let mut n = Notes::default();
        for l in text.lines() {
            let l = l.trim().trim_start_matches(['-', '*']).trim();
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let Some(k) = k.trim().strip_prefix("imagectl-") else {
                continue;
            };
            let v = v.trim().trim_matches('`').to_string();
            match k {
                "image" => n.image = Some(v),
                "version" => n.version = Some(v),
                "sha256" => n.sha256 = Some(v.to_ascii_lowercase()),
                "spec-hash" => n.spec_hash = Some(v),
                "lock-hash" => n.lock_hash = Some(v),
                "built-at" => n.built_at = Some(v),
                "firmware" => n.firmware = Some(v),
                "template" => n.template_vmid = v.parse().ok(),
                "publishing" => n.publishing = v.parse().ok().or(Some(0)),
                _ => {}
            }
        }
        n
    }

    /// A template left unfinished: still marked publishing, or never converted to a template.
    pub fn half_made(&self, is_template: bool) -> bool {
        self.publishing.is_some() || !is_template
    }

    /// True when the publishing marker is older than [`STALE_AFTER_SECS`].
    pub fn stale(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.publishing
            .is_some_and(|t| now.saturating_sub(t) > STALE_AFTER_SECS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_round_trip_and_survive_markdown_edits() {
        let n = Notes {
            image: Some("gitlab-runner".into()),
            version: Some("1.2".into()),
            sha256: Some("ab".repeat(32)),
            spec_hash: Some("s".into()),
            lock_hash: Some("l".into()),
            built_at: Some("2025-01-01T00:00:00Z".into()),
            firmware: Some("bios".into()),
            template_vmid: Some(9000),
            publishing: Some(5),
        };
        let text = n.render();
        assert_eq!(Notes::parse(&text), n);
        let edited = format!("Team note: do not touch\n\n{}", text.replace("- ", "* "));
        assert_eq!(Notes::parse(&edited), n);
        assert!(n.half_made(true) && n.stale());
        let done = Notes {
            publishing: None,
            ..n
        };
        assert!(!done.half_made(true) && done.half_made(false));
        assert_eq!(Notes::parse("some user text: 1"), Notes::default());
    }
}
