//! Keys/values on their way out of a node (`Node/Export`).
//!
//! An export is destructive in the engine (the request's rows and blocks are freed when it
//! hands the state over), but the transfer can still break: a connection cut mid-stream
//! leaves the peer with nothing. So the node keeps each exported state for a while
//! ([`Outbound`]): the coordinator can ask for the same request again and get the same bytes,
//! instead of replaying its prompt on the peer.
//!
//! An export is done when the coordinator says so, not when its last chunk left this process:
//! written bytes can still be lost in the kernel when the process exits (a socket closed with
//! unread input is reset, and what it had not sent yet goes with it). The coordinator releases
//! each export it asked for (`Node/Cancel` of the moved request, [`Outbound::release`]) once
//! the peer holds the state or it gave up and replays; a draining node closes its connections
//! only after every export is released or [`RETAIN_FOR`] has passed ([`Outbound::settled`]).

use crate::engine::KvState;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long an exported state can be asked for again (and a draining node waits for its
/// release at most).
pub const RETAIN_FOR: Duration = Duration::from_secs(30);

/// One export not yet released: its bytes when the budget kept them.
struct Exported {
    state: Option<Arc<KvState>>,
    at: Instant,
}

impl Exported {
    fn live(&self) -> bool {
        self.at.elapsed() < RETAIN_FOR
    }

    fn bytes(&self) -> usize {
        self.state.as_ref().map_or(0, |s| s.data.len() * 4)
    }
}

/// Exported states by coordinator request id, and the export streams still being sent.
pub struct Outbound {
    exported: Mutex<HashMap<String, Exported>>,
    max_bytes: usize,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    open: AtomicUsize,
    changed: Notify,
}

/// One export stream being sent; dropped with the stream (when its last chunk has gone, or
/// the client went away).
pub struct StreamGuard(Arc<Shared>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

impl Outbound {
    /// Keeps at most `max_bytes` of exported keys/values (the oldest go first).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            exported: Mutex::new(HashMap::new()),
            max_bytes,
            shared: Arc::default(),
        }
    }

    /// Keeps `state`, exported for request `rid` (reserved with [`Outbound::reserve`]), for
    /// [`RETAIN_FOR`] within the budget; returns it shared. An export released (or expired)
    /// since its reservation is not kept.
    pub fn retain(&self, rid: &str, state: KvState) -> Arc<KvState> {
        let state = Arc::new(state);
        let bytes = state.data.len() * 4;
        let mut m = self.exported.lock().expect("outbound lock");
        m.retain(|_, e| e.live());
        if bytes > self.max_bytes || !m.contains_key(rid) {
            return state;
        }
        let mut held: usize = m.values().map(Exported::bytes).sum();
        while held + bytes > self.max_bytes {
            let Some(oldest) = m.values_mut().filter(|e| e.state.is_some()).min_by_key(|e| e.at) else {
                break;
            };
            held -= oldest.bytes();
            oldest.state = None;
        }
        if let Some(e) = m.get_mut(rid) {
            e.state = Some(state.clone());
        }
        state
    }

    /// Counts an export of `rid` about to be taken from the engine as unreleased (its bytes
    /// follow with [`Outbound::retain`]; [`Outbound::release`] when the engine had nothing).
    pub fn reserve(&self, rid: &str) {
        let mut m = self.exported.lock().expect("outbound lock");
        m.insert(
            rid.to_string(),
            Exported {
                state: None,
                at: Instant::now(),
            },
        );
    }

    /// The state exported for `rid` within [`RETAIN_FOR`], if still held.
    pub fn again(&self, rid: &str) -> Option<Arc<KvState>> {
        let m = self.exported.lock().expect("outbound lock");
        m.get(rid).filter(|e| e.live()).and_then(|e| e.state.clone())
    }

    /// The coordinator is done with the export of `rid` (the peer holds it, or the request
    /// replays): its bytes go. False when `rid` was not exported (or not within
    /// [`RETAIN_FOR`]).
    pub fn release(&self, rid: &str) -> bool {
        let gone = self.exported.lock().expect("outbound lock").remove(rid);
        self.shared.changed.notify_waiters();
        gone.is_some_and(|e| e.live())
    }

    /// Exports not released yet (within [`RETAIN_FOR`]).
    pub fn unreleased(&self) -> usize {
        self.exported
            .lock()
            .expect("outbound lock")
            .values()
            .filter(|e| e.live())
            .count()
    }

    /// Counts one more export stream until the guard drops.
    pub fn stream(&self) -> StreamGuard {
        self.shared.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.shared.clone())
    }

    /// Export streams being sent now.
    pub fn open_streams(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// When the oldest unreleased export stops counting.
    fn next_expiry(&self) -> Option<Instant> {
        let m = self.exported.lock().expect("outbound lock");
        m.values().filter(|e| e.live()).map(|e| e.at + RETAIN_FOR).min()
    }

    /// Resolves once no export stream is being sent and every export was released (or is
    /// older than [`RETAIN_FOR`]).
    pub async fn settled(&self) {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // No expiry ahead: nothing is unreleased.
            match (self.next_expiry(), self.open_streams()) {
                (None, 0) => return,
                (None, _) => changed.await,
                (Some(at), _) => {
                    let _ = tokio::time::timeout_at(at.into(), changed).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(floats: usize) -> KvState {
        KvState {
            tokens: vec![1, 2],
            prompt_tokens: 1,
            positions: 2,
            data: vec![0.5; floats],
        }
    }

    fn export(o: &Outbound, rid: &str, floats: usize) -> Arc<KvState> {
        o.reserve(rid);
        o.retain(rid, state(floats))
    }

    #[test]
    fn a_retained_state_comes_back_the_same_and_the_oldest_go_over_budget() {
        let o = Outbound::new(4 * 100);
        export(&o, "a", 60);
        assert_eq!(o.again("a").unwrap().data.len(), 60);
        assert!(o.again("b").is_none());
        // 60 + 60 floats do not fit in 100: "a"'s bytes go (it still awaits its release).
        export(&o, "b", 60);
        assert!(o.again("a").is_none());
        assert_eq!(o.again("b").unwrap().tokens, vec![1, 2]);
        // Bigger than the whole budget: handed back, not kept, nothing else evicted.
        let big = export(&o, "c", 200);
        assert_eq!(big.data.len(), 200);
        assert!(o.again("c").is_none());
        assert!(o.again("b").is_some());
        assert_eq!(o.unreleased(), 3);
        assert!(o.release("a") && o.release("c"));
        assert!(!o.release("a"), "released once");
        assert!(!o.release("never"));
        assert_eq!(o.unreleased(), 1);
        assert!(o.release("b"));
        assert!(o.again("b").is_none(), "a released export's bytes go");
        // Released while the engine was still letting go (the client went away): not kept.
        o.reserve("d");
        assert!(o.release("d"));
        o.retain("d", state(10));
        assert!(o.again("d").is_none());
        assert_eq!(o.unreleased(), 0);
    }

    #[tokio::test]
    async fn settled_waits_for_every_stream_and_every_release() {
        let o = Arc::new(Outbound::new(1 << 20));
        o.settled().await;
        o.reserve("r");
        assert_eq!(o.unreleased(), 1, "reserved before the engine let go");
        assert!(o.again("r").is_none(), "no bytes yet");
        assert!(o.release("r"));
        let g1 = o.stream();
        let g2 = o.stream();
        export(&o, "x", 10);
        let waiter = {
            let o = o.clone();
            tokio::spawn(async move { o.settled().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(g1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one stream is still open");
        drop(g2);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "sent, but not released");
        assert!(o.release("x"));
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o.open_streams(), 0);
    }
}
