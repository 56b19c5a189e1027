//! The GitLab token preflight every fleet command runs before it changes anything:
//! `GET /personal_access_tokens/self` for the token's scopes, then `GET /user` to learn whether
//! its user is an administrator (only then is `GET /runners/all` used).
//!
//! A scope a command cannot work without is bad input (exit 2, nothing made), and the message
//! names the command, the scope and what it is for. A scope that only lets a command look for
//! leftovers (`read_api`, for listing runners) is optional: without it `destroy` and `gc` do
//! everything else and say what they could not check. Which scope GitLab accepts for which call
//! is in [`crate::remote::gitlab::token`], with the gitlabhq files behind each rule.

use crate::error::input;
use crate::remote::gitlab::token::{Access, TokenInfo};
use crate::remote::gitlab::GitlabClient;
use anyhow::{Context, Result};

/// A command that talks to GitLab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `imagectl deploy`.
    Deploy,
    /// `imagectl replace`.
    Replace,
    /// `imagectl rollback`.
    Rollback,
    /// `imagectl destroy`.
    Destroy,
    /// `imagectl status`.
    Status,
    /// `imagectl gc`.
    Gc,
}

impl Command {
    /// The command's name.
    pub fn name(self) -> &'static str {
        match self {
            Command::Deploy => "deploy",
            Command::Replace => "replace",
            Command::Rollback => "rollback",
            Command::Destroy => "destroy",
            Command::Status => "status",
            Command::Gc => "gc",
        }
    }

    /// What the command cannot work without, and what only lets it look for leftovers.
    pub fn needs(self) -> (&'static [Access], &'static [Access]) {
        use Access::*;
        match self {
            Command::Deploy | Command::Replace | Command::Rollback => {
                (&[CreateRunner, ReadRunner, ManageRunner], &[ListRunners])
            }
            Command::Destroy | Command::Gc => (&[ReadRunner, ManageRunner], &[ListRunners]),
            Command::Status => (&[ReadRunner], &[]),
        }
    }
}

/// What the preflight found.
#[derive(Debug, Clone)]
pub struct Preflight {
    /// The token as GitLab describes it.
    pub token: TokenInfo,
    /// Its user is an administrator.
    pub admin: bool,
    /// Optional scopes the token lacks, as warnings.
    pub warnings: Vec<String>,
}

/// Checks the token for `cmd`. Bad or insufficient tokens are input errors (exit 2); GitLab not
/// answering is an ordinary error.
pub async fn check(gitlab: &GitlabClient, cmd: Command) -> Result<Preflight> {
    let name = cmd.name();
    let token = match gitlab.token_info().await {
        Ok(t) => t,
        Err(e) if e.status() == Some(401) => {
            return Err(input(format!(
                "imagectl {name}: GitLab does not accept GITLAB_TOKEN (HTTP 401): it is wrong, revoked or expired"
            )))
        }
        Err(e) if e.status() == Some(400) => {
            return Err(input(format!(
                "imagectl {name}: GITLAB_TOKEN must be a personal, group or project access token \
                 (GitLab: {e})"
            )))
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("imagectl {name}: checking the GitLab token's scopes")
            })
        }
    };
    if !token.active {
        return Err(input(format!(
            "imagectl {name}: the GitLab token {:?} is no longer active (revoked or expired{})",
            token.name,
            token
                .expires_at
                .as_deref()
                .map(|d| format!(", expires_at {d}"))
                .unwrap_or_default()
        )));
    }
    let (required, optional) = cmd.needs();
    let missing: Vec<String> = required
        .iter()
        .filter(|a| !token.allows(**a))
        .map(|a| format!("{} (to {})", scope_choice(*a), a.purpose()))
        .collect();
    if !missing.is_empty() {
        return Err(input(format!(
            "imagectl {name} needs a GitLab token with {}; the token {:?} has: {}",
            missing.join(" and "),
            token.name,
            token.scope_list()
        )));
    }
    let warnings = optional
        .iter()
        .filter(|a| !token.allows(**a))
        .map(|a| {
            format!(
                "the GitLab token has no {} scope: imagectl {name} cannot {}; it does the rest and \
                 says what it could not check",
                scope_choice(*a),
                a.purpose()
            )
        })
        .collect();
    let admin = gitlab
        .whoami()
        .await
        .with_context(|| format!("imagectl {name}: asking GitLab who owns the token"))?
        .is_some_and(|u| u.is_admin);
    Ok(Preflight {
        token,
        admin,
        warnings,
    })
}

/// `manage_runner` (or `api`): the narrowest scope, then the alternatives.
fn scope_choice(a: Access) -> String {
    let s = a.scopes();
    format!("{} (or {})", s[0], s[1..].join(" or "))
}

/// Why a listing was not done, for reports: `None` when the token may list runners.
pub fn listing_refused(gitlab: &GitlabClient) -> Option<String> {
    (gitlab.may(Access::ListRunners) == Some(false)).then(|| {
        format!(
            "the token has no {} scope, so runners could not be listed",
            scope_choice(Access::ListRunners)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_need_what_their_calls_need() {
        let (req, opt) = Command::Destroy.needs();
        assert!(req.contains(&Access::ManageRunner) && !req.contains(&Access::ListRunners));
        assert_eq!(opt, &[Access::ListRunners]);
        assert!(Command::Deploy.needs().0.contains(&Access::CreateRunner));
        assert!(!Command::Status.needs().0.contains(&Access::ManageRunner));
        assert_eq!(scope_choice(Access::ManageRunner), "manage_runner (or api)");
    }
}
