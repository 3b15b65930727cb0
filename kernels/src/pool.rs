//! Where CPU work is issued from.
//!
//! Every product and most element-wise kernels are parallel regions on rayon's global pool.
//! Issued from a thread outside the pool (the engine's thread, a CLI's main thread), each
//! region is injected into the pool and the caller blocks on a latch until it ends: a futex
//! wake-up and a sleep per region, about 121 regions per decode step of SmolLM2 (a quarter of
//! the time of a one-row step in system calls, `perf`). Issued from a worker of the pool, a
//! region is a `join` on the worker's own deque: the other workers steal its halves, and the
//! caller computes instead of sleeping. [`on_compute_pool`] moves a whole pass onto a worker,
//! so the cross-thread hand-off is paid once per pass.

/// Runs `f` on a worker thread of rayon's global pool (in place when the caller is one
/// already) and returns its result. The calling thread blocks until `f` returns. `f` sees none
/// of the caller's thread-local state: a caller that traces carries its span in.
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    // `scope` runs its closure on a worker of the global pool when called from outside it.
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_a_pool_worker_and_returns_its_result() {
        assert!(rayon::current_thread_index().is_none());
        let (inside, v) = on_compute_pool(|| (rayon::current_thread_index().is_some(), 6 * 7));
        assert!(inside);
        assert_eq!(v, 42);
        // Nested calls run in place.
        let same = on_compute_pool(|| {
            let outer = rayon::current_thread_index();
            on_compute_pool(|| rayon::current_thread_index() == outer)
        });
        assert!(same);
    }
}
