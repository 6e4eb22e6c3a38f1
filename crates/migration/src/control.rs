//! What a migration shares with whoever watches or stops it: the published state
//! (`query-migrate`), and the cancel / commit decision. Both are taken under one lock, so a
//! cancel and the source's commit can never both win: either the migration is cancelled and
//! the source runs on, or the source committed and the cancel is refused.

use crate::info::{MigrationInfo, Status};
use crate::transport::Conn;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Why `migrate-cancel` was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    #[error("no migration is running")]
    NotRunning,
    #[error("too late: the source has committed and the destination owns the guest; nothing was cancelled")]
    Committed,
}

#[derive(Default)]
struct Gate {
    /// `begin` ran and the migration has not started yet: a cancel now is kept for it.
    armed: bool,
    running: bool,
    committed: bool,
    /// Connections to shut down on cancel, so whatever waits on them returns at once.
    sockets: Vec<Conn>,
}

/// Shared with the control socket or the demo.
#[derive(Default)]
pub struct MigrationControl {
    info: Mutex<MigrationInfo>,
    gate: Mutex<Gate>,
    /// Set by cancel; also stops the senders (bandwidth-cap sleeps included).
    stop: Arc<AtomicBool>,
}

impl MigrationControl {
    pub fn snapshot(&self) -> MigrationInfo {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut MigrationInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Announces a migration about to start (call before replying to whoever asked for it):
    /// its state reads `setup` at once, and a cancel from now on applies to it.
    pub fn begin(&self) {
        let mut g = self.gate();
        *g = Gate {
            armed: true,
            running: true,
            ..Default::default()
        };
        self.stop.store(false, Ordering::Release);
        self.update(|i| {
            *i = MigrationInfo {
                status: Status::Setup,
                ..Default::default()
            }
        });
    }

    /// The engine starts: takes over a `begin` if there was one, otherwise begins now.
    pub(crate) fn start(&self) {
        if !std::mem::take(&mut self.gate().armed) {
            self.begin();
            self.gate().armed = false;
        }
    }

    /// `migrate-cancel`: stops a migration that has not committed; every wait on its
    /// connections ends now. Refused once the source committed.
    pub fn cancel(&self) -> Result<(), CancelError> {
        let mut g = self.gate();
        if !g.running {
            return Err(CancelError::NotRunning);
        }
        if g.committed {
            return Err(CancelError::Committed);
        }
        self.stop.store(true, Ordering::Release);
        for s in g.sockets.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        Ok(())
    }

    pub fn is_cancelled(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Whether the source has committed (the destination may run the guest).
    pub fn is_committed(&self) -> bool {
        self.gate().committed
    }

    pub(crate) fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// A connection to shut down if the migration is cancelled (at once if it already is).
    pub(crate) fn watch(&self, s: &Conn) {
        let mut g = self.gate();
        match s.try_clone() {
            Ok(c) if !self.is_cancelled() => g.sockets.push(c),
            _ => {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// The point of no return: true if the source may commit, false if a cancel came first.
    pub(crate) fn commit(&self) -> bool {
        let mut g = self.gate();
        if self.is_cancelled() {
            return false;
        }
        g.committed = true;
        true
    }

    /// A migration that `begin` announced but that never started (its thread could not be
    /// made): it ends failed, the guest untouched, so whoever follows it is not left waiting.
    pub fn abandon(&self, why: &str) {
        self.finish();
        self.update(|i| {
            i.status = Status::Failed;
            i.livemig.outcome = crate::info::Outcome::RolledBack;
            i.livemig.source_vcpus_running = true;
            i.error_desc = Some(why.to_string());
        });
    }

    /// The migration ended, whichever way.
    pub(crate) fn finish(&self) {
        let mut g = self.gate();
        g.running = false;
        g.sockets.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_and_commit_exclude_each_other() {
        let c = MigrationControl::default();
        assert_eq!(c.cancel(), Err(CancelError::NotRunning));
        c.begin();
        c.start();
        assert!(c.commit());
        assert_eq!(c.cancel(), Err(CancelError::Committed));
        assert!(!c.is_cancelled());
        c.finish();

        c.begin();
        assert_eq!(c.cancel(), Ok(()), "a cancel right after begin is kept...");
        c.start();
        assert!(c.is_cancelled(), "...when the engine starts");
        assert!(!c.commit(), "and the commit loses");
        c.finish();
        assert_eq!(c.cancel(), Err(CancelError::NotRunning));
    }

    #[test]
    fn a_fresh_start_clears_an_old_cancel() {
        let c = MigrationControl::default();
        c.begin();
        c.start();
        c.cancel().unwrap();
        c.finish();
        c.start();
        assert!(!c.is_cancelled());
        assert!(c.commit());
    }
}
