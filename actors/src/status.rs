//! The state of a submodel as readiness and listings report it, shared without locks.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};

/// Where a submodel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmodelState {
    /// No replica is serving yet.
    Starting,
    /// Every replica serves.
    Ready,
    /// Some replicas serve; others are restarting or have failed.
    Degraded,
    /// No replica serves and none will: the restart budget is spent.
    Failed,
    /// Stopped (shutdown or removed).
    Stopped,
}

impl SubmodelState {
    /// The name used in listings (`ready`, `degraded`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SubmodelState::Starting => "starting",
            SubmodelState::Ready => "ready",
            SubmodelState::Degraded => "degraded",
            SubmodelState::Failed => "failed",
            SubmodelState::Stopped => "stopped",
        }
    }

    /// Whether requests can be served.
    pub fn serving(self) -> bool {
        matches!(self, SubmodelState::Ready | SubmodelState::Degraded)
    }
}

/// Shared, lock-free view of a submodel's health.
#[derive(Debug)]
pub struct SubmodelStatus {
    state: AtomicU8,
    ready: AtomicUsize,
    last_error: Mutex<Option<String>>,
}

impl Default for SubmodelStatus {
    fn default() -> Self {
        Self { state: AtomicU8::new(0), ready: AtomicUsize::new(0), last_error: Mutex::new(None) }
    }
}

impl SubmodelStatus {
    /// The current state.
    pub fn state(&self) -> SubmodelState {
        match self.state.load(Relaxed) {
            0 => SubmodelState::Starting,
            1 => SubmodelState::Ready,
            2 => SubmodelState::Degraded,
            3 => SubmodelState::Failed,
            _ => SubmodelState::Stopped,
        }
    }

    /// Replicas serving now.
    pub fn ready_replicas(&self) -> usize {
        self.ready.load(Relaxed)
    }

    /// The last failure, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    pub(crate) fn set(&self, state: SubmodelState, ready: usize) {
        let code = match state {
            SubmodelState::Starting => 0,
            SubmodelState::Ready => 1,
            SubmodelState::Degraded => 2,
            SubmodelState::Failed => 3,
            SubmodelState::Stopped => 4,
        };
        self.ready.store(ready, Relaxed);
        self.state.store(code, Relaxed);
    }

    /// Marks a submodel that runs inline (no replicas to start): always ready.
    pub fn set_inline(&self) {
        self.set(SubmodelState::Ready, 1);
    }

    /// Marks a submodel stopped.
    pub fn set_stopped(&self) {
        self.set(SubmodelState::Stopped, 0);
    }

    pub(crate) fn set_error(&self, error: String) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error);
        }
    }
}
