//! Cooperative cancellation for Ctrl-C / SIGTERM.
//!
//! The first signal cancels: every VM step stops at its next safe point (never in the middle of
//! a GitLab create, whose answer carries the id needed to clean up) and rolls back what it made.
//! A second signal exits at once (130) and says that `imagectl gc` finds what was left.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// A cancellation flag shared by all steps of one command.
#[derive(Clone, Default, Debug)]
pub struct Cancel(Arc<Inner>);

#[derive(Default, Debug)]
struct Inner {
    flag: AtomicBool,
    notify: Notify,
}

impl Cancel {
    /// Not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels.
    pub fn cancel(&self) {
        self.0.flag.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.flag.load(Ordering::SeqCst)
    }

    /// An error when cancelled (for `?` at safe points).
    pub fn check(&self) -> anyhow::Result<()> {
        if self.is_cancelled() {
            anyhow::bail!("interrupted");
        }
        Ok(())
    }

    /// Sleeps `d`, waking early on cancellation; an error if cancelled.
    pub async fn sleep(&self, d: Duration) -> anyhow::Result<()> {
        let notified = self.0.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.check()?;
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = notified => {}
        }
        self.check()
    }

    /// Cancels on the first SIGINT/SIGTERM, exits (130) on the second. Call inside a runtime.
    pub fn on_signals(&self) {
        let c = self.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("cannot watch SIGTERM: {e}");
                        return;
                    }
                };
            for n in 0.. {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                if n == 0 {
                    eprintln!("\nimagectl: interrupted; rolling back what is in flight (again to abort at once)");
                    c.cancel();
                } else {
                    eprintln!(
                        "\nimagectl: aborted; run `imagectl gc` to remove what was left behind"
                    );
                    std::process::exit(130);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn sleep_wakes_on_cancel() {
        let c = Cancel::new();
        c.sleep(Duration::from_millis(1)).await.unwrap();
        let c2 = c.clone();
        let t = tokio::spawn(async move { c2.sleep(Duration::from_secs(60)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.cancel();
        let r = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .unwrap()
            .unwrap();
        assert!(r.is_err());
        assert!(c.check().is_err());
    }
}
