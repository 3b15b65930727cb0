//! Keys/values on their way out of a node (`Node/Export`).
//!
//! An export is destructive in the engine (the request's rows and blocks are freed when it
//! hands the state over), but the transfer can still break: a connection cut mid-stream
//! leaves the peer with nothing. So the node keeps each exported state for a while
//! ([`Outbound`]): the coordinator can ask for the same request again and get the same bytes,
//! instead of replaying its prompt on the peer. And a draining node does not start closing
//! its connections while an export is still being streamed ([`Outbound::streams_done`]).

use crate::engine::KvState;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long an exported state can be asked for again.
pub const RETAIN_FOR: Duration = Duration::from_secs(30);

/// Exported states by coordinator request id, and the export streams still being sent.
pub struct Outbound {
    retained: Mutex<HashMap<String, (Arc<KvState>, Instant)>>,
    max_bytes: usize,
    streams: Arc<Streams>,
}

#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    changed: Notify,
}

/// One export stream being sent; dropped with the stream (when its last chunk has gone, or
/// the client went away).
pub struct StreamGuard(Arc<Streams>);

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
            retained: Mutex::new(HashMap::new()),
            max_bytes,
            streams: Arc::default(),
        }
    }

    /// Keeps `state`, exported for request `rid`, for [`RETAIN_FOR`]; returns it shared.
    pub fn retain(&self, rid: &str, state: KvState) -> Arc<KvState> {
        let state = Arc::new(state);
        let bytes = |s: &KvState| s.data.len() * 4;
        if bytes(&state) > self.max_bytes {
            return state;
        }
        let mut m = self.retained.lock().expect("outbound lock");
        m.retain(|_, (_, at)| at.elapsed() < RETAIN_FOR);
        let mut held: usize = m.values().map(|(s, _)| bytes(s)).sum();
        while held + bytes(&state) > self.max_bytes {
            let Some(oldest) = m.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone()) else {
                break;
            };
            if let Some((s, _)) = m.remove(&oldest) {
                held -= bytes(&s);
            }
        }
        m.insert(rid.to_string(), (state.clone(), Instant::now()));
        state
    }

    /// The state exported for `rid` within [`RETAIN_FOR`], if still held.
    pub fn again(&self, rid: &str) -> Option<Arc<KvState>> {
        let m = self.retained.lock().expect("outbound lock");
        m.get(rid)
            .filter(|(_, at)| at.elapsed() < RETAIN_FOR)
            .map(|(s, _)| s.clone())
    }

    /// Counts one more export stream until the guard drops.
    pub fn stream(&self) -> StreamGuard {
        self.streams.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.streams.clone())
    }

    /// Export streams being sent now.
    pub fn open_streams(&self) -> usize {
        self.streams.open.load(Ordering::Acquire)
    }

    /// Resolves once no export stream is being sent.
    pub async fn streams_done(&self) {
        loop {
            let changed = self.streams.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open_streams() == 0 {
                return;
            }
            changed.await;
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

    #[test]
    fn a_retained_state_comes_back_the_same_and_the_oldest_go_over_budget() {
        let o = Outbound::new(4 * 100);
        o.retain("a", state(60));
        assert_eq!(o.again("a").unwrap().data.len(), 60);
        assert!(o.again("b").is_none());
        // 60 + 60 floats do not fit in 100: "a" goes.
        o.retain("b", state(60));
        assert!(o.again("a").is_none());
        assert_eq!(o.again("b").unwrap().tokens, vec![1, 2]);
        // Bigger than the whole budget: handed back, not kept, nothing else evicted.
        let big = o.retain("c", state(200));
        assert_eq!(big.data.len(), 200);
        assert!(o.again("c").is_none());
        assert!(o.again("b").is_some());
    }

    #[tokio::test]
    async fn streams_done_waits_for_every_guard() {
        let o = Arc::new(Outbound::new(0));
        o.streams_done().await;
        let g1 = o.stream();
        let g2 = o.stream();
        let waiter = {
            let o = o.clone();
            tokio::spawn(async move { o.streams_done().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(g1);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one stream is still open");
        drop(g2);
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(o.open_streams(), 0);
    }
}
