//! Supervision of the engine thread: a small watcher thread joins it and publishes how it
//! ended, so a node whose engine died (a backend error: a GPU allocation or launch that
//! failed; or a panic: a bug) stops
//! reporting SERVING, fails its in-flight requests with an error the coordinator migrates,
//! and exits non-zero, instead of looking alive with nothing behind it.

use crate::engine_actor::EngineThread;
use tokio::sync::watch;

/// The engine thread's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineExit {
    Running,
    /// It returned (after a shutdown, or when every handle was dropped).
    Stopped,
    /// It panicked, or its backend failed; the panic's message or the error.
    Died(String),
}

/// Watches one engine thread (cloneable: every clone sees the same state).
#[derive(Clone)]
pub struct EngineWatch {
    rx: watch::Receiver<EngineExit>,
}

impl EngineWatch {
    /// Joins `thread` on a watcher thread; `on_exit` runs there once it ended.
    pub fn spawn(thread: EngineThread, on_exit: impl FnOnce(&EngineExit) + Send + 'static) -> Self {
        let (tx, rx) = watch::channel(EngineExit::Running);
        std::thread::Builder::new()
            .name("rrt-engine-watch".into())
            .spawn(move || {
                let exit = match thread.join() {
                    Ok(Ok(())) => EngineExit::Stopped,
                    Ok(Err(e)) => EngineExit::Died(e.to_string()),
                    Err(payload) => EngineExit::Died(panic_message(payload.as_ref())),
                };
                if let EngineExit::Died(m) = &exit {
                    tracing::error!(cause = %m, "the engine thread died");
                }
                on_exit(&exit);
                let _ = tx.send(exit);
            })
            .expect("spawning the engine watcher");
        Self { rx }
    }

    /// The state now.
    pub fn state(&self) -> EngineExit {
        self.rx.borrow().clone()
    }

    /// Waits until the engine thread ended; how it ended.
    pub async fn ended(&self) -> EngineExit {
        let mut rx = self.rx.clone();
        loop {
            let s = rx.borrow_and_update().clone();
            if s != EngineExit::Running {
                return s;
            }
            if rx.changed().await.is_err() {
                return rx.borrow().clone();
            }
        }
    }

    /// Blocks the calling (non-async) thread until the engine thread ended.
    pub fn wait_blocking(&self) -> EngineExit {
        loop {
            let s = self.state();
            if s != EngineExit::Running {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_reported_with_its_message() {
        let t = std::thread::spawn(|| panic!("GPU allocation of 9 GiB failed"));
        let (tx, rx) = std::sync::mpsc::channel();
        let w = EngineWatch::spawn(t, move |e| tx.send(e.clone()).unwrap());
        let e = w.wait_blocking();
        assert_eq!(e, EngineExit::Died("GPU allocation of 9 GiB failed".into()));
        assert_eq!(rx.recv().unwrap(), e);
        let ok = EngineWatch::spawn(std::thread::spawn(|| Ok(())), |_| {});
        assert_eq!(ok.wait_blocking(), EngineExit::Stopped);
    }

    #[test]
    fn a_backend_failure_is_reported_with_its_error() {
        use crate::engine::EngineError;
        use rrt_kernels::BackendError;
        let t = std::thread::spawn(|| {
            Err(EngineError::Backend(BackendError::Alloc {
                what: "a KV pool of 9 GiB".into(),
                detail: "CUDA_ERROR_OUT_OF_MEMORY".into(),
            }))
        });
        let e = EngineWatch::spawn(t, |_| {}).wait_blocking();
        assert_eq!(
            e,
            EngineExit::Died(
                "compute backend fault: cannot allocate a KV pool of 9 GiB: CUDA_ERROR_OUT_OF_MEMORY".into()
            )
        );
    }
}
