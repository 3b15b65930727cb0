//! The prefix cache: keys/values of full KV blocks of prompts already computed, kept in host
//! memory under a byte budget (least recently used out first) and copied into the blocks of
//! a later request whose prompt starts with the same tokens, which then prefills only the
//! rest.
//!
//! Blocks are keyed by a chained hash (block `i`'s key hashes block `i - 1`'s key and its own
//! tokens), so a lookup walks the prompt block by block and stops at the first miss; each
//! entry also keeps its tokens and its parent's key, and a hit compares them, so a hash
//! collision can never hand out another prompt's keys/values.
//!
//! Exactness: an entry holds every unrolled layer of every position of its block (only
//! positions before a prompt's last token are cached, and only once none of them is still in
//! flight), and keys/values of a position depend only on the tokens up to it and on how deep
//! the prompt's rows ran: every loop, or the gate's prompt exits under one threshold
//! ([`PromptDepth`]). Each depth policy chains from its own root, so keys/values computed
//! under one never serve a request under another. With batch-invariant kernels a request
//! served from the cache therefore produces the tokens it would have produced without it
//! (tested).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Key of the first block's parent.
const ROOT: u64 = 0x5252_5450_5245_4649;

/// How deep a prompt's rows ran, which its keys/values depend on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PromptDepth {
    /// Every prompt row ran every loop.
    Full,
    /// Prompt rows took the gate's exit test (`EngineConfig::prompt_exits` or the request's
    /// own switch) under the request's threshold override (`None`: the calibrated ones).
    GateExits { threshold: Option<f32> },
}

impl PromptDepth {
    /// Key of the first block's parent under this policy.
    fn root(self) -> u64 {
        match self {
            PromptDepth::Full => ROOT,
            PromptDepth::GateExits { threshold } => chain(
                ROOT,
                &[
                    0x4741_5445,
                    threshold.is_some() as u32,
                    threshold.map_or(0, f32::to_bits),
                ],
            ),
        }
    }
}

/// Chained key of a block of `tokens` after the block keyed `parent`.
fn chain(parent: u64, tokens: &[u32]) -> u64 {
    // SipHash with fixed keys: the same on every run and every node.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

struct Entry {
    parent: u64,
    tokens: Vec<u32>,
    data: Vec<f32>,
    last_used: u64,
}

/// What the cache holds, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCacheUsage {
    pub blocks: usize,
    pub bytes: usize,
    pub budget: usize,
}

/// Prefix blocks of keys/values (see the module doc).
pub struct PrefixCache {
    budget: usize,
    used: usize,
    block_size: usize,
    entries: HashMap<u64, Entry>,
    clock: u64,
}

impl PrefixCache {
    /// A cache of at most `budget` bytes of keys/values for blocks of `block_size` positions.
    pub fn new(budget: usize, block_size: usize) -> Self {
        Self {
            budget,
            used: 0,
            block_size: block_size.max(1),
            entries: HashMap::new(),
            clock: 0,
        }
    }

    pub fn usage(&self) -> PrefixCacheUsage {
        PrefixCacheUsage {
            blocks: self.entries.len(),
            bytes: self.used,
            budget: self.budget,
        }
    }

    /// The keys/values of the longest cached prefix of `tokens` of at most `max_positions`
    /// positions (whole blocks) computed under `depth`, position-major as [`rrt_kernels::Backend::kv_import`] takes
    /// them; `None` when not even the first block is cached.
    pub fn lookup(&mut self, depth: PromptDepth, tokens: &[u32], max_positions: usize) -> Option<(usize, Vec<f32>)> {
        let bs = self.block_size;
        let blocks = max_positions.min(tokens.len()) / bs;
        let mut parent = depth.root();
        let mut keys = Vec::new();
        for b in 0..blocks {
            let t = &tokens[b * bs..(b + 1) * bs];
            let key = chain(parent, t);
            match self.entries.get(&key) {
                Some(e) if e.parent == parent && e.tokens == t => keys.push(key),
                _ => break,
            }
            parent = key;
        }
        if keys.is_empty() {
            return None;
        }
        self.clock += 1;
        let mut data = Vec::with_capacity(keys.len() * self.entries[&keys[0]].data.len());
        for k in &keys {
            let e = self.entries.get_mut(k).expect("found above");
            e.last_used = self.clock;
            data.extend_from_slice(&e.data);
        }
        Some((keys.len() * bs, data))
    }

    /// Caches the whole blocks of `tokens[..positions]` (computed under `depth`) that are not
    /// cached yet; `export(b)`
    /// gives block `b`'s keys/values. Least recently used blocks leave when over budget (a
    /// block larger than the whole budget is not kept).
    pub fn insert<E>(
        &mut self,
        depth: PromptDepth,
        tokens: &[u32],
        positions: usize,
        mut export: impl FnMut(usize) -> Result<Vec<f32>, E>,
    ) -> Result<(), E> {
        let bs = self.block_size;
        let blocks = positions.min(tokens.len()) / bs;
        self.clock += 1;
        let mut parent = depth.root();
        for b in 0..blocks {
            let t = &tokens[b * bs..(b + 1) * bs];
            let key = chain(parent, t);
            match self.entries.get_mut(&key) {
                Some(e) if e.parent == parent && e.tokens == t => e.last_used = self.clock,
                Some(_) => return Ok(()), // a colliding key: keep the entry there, cache no deeper
                None => {
                    let data = match export(b) {
                        Ok(d) => d,
                        Err(e) => {
                            self.evict();
                            return Err(e);
                        }
                    };
                    let bytes = data.len() * 4;
                    if bytes > self.budget {
                        return Ok(());
                    }
                    self.used += bytes;
                    self.entries.insert(
                        key,
                        Entry {
                            parent,
                            tokens: t.to_vec(),
                            data,
                            last_used: self.clock,
                        },
                    );
                }
            }
            parent = key;
        }
        self.evict();
        Ok(())
    }

    /// Drops least recently used blocks until the cache fits its budget. Blocks touched
    /// together (one prompt) share a time; among them the deepest goes first, so a prefix is
    /// never cut in front of blocks that stay.
    fn evict(&mut self) {
        while self.used > self.budget {
            let Some((&key, _)) = self
                .entries
                .iter()
                .min_by_key(|(k, e)| (e.last_used, !self.depth_of(**k, e.parent)))
            else {
                break;
            };
            if let Some(e) = self.entries.remove(&key) {
                self.used -= e.data.len() * 4;
            }
        }
    }

    /// How many ancestors of a block are cached (its depth in the prefix chain).
    fn depth_of(&self, _key: u64, mut parent: u64) -> usize {
        let mut d = 0;
        while parent != ROOT {
            match self.entries.get(&parent) {
                Some(e) => {
                    d += 1;
                    parent = e.parent;
                }
                None => break,
            }
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_data(b: usize, tokens: &[u32]) -> Vec<f32> {
        vec![tokens[0] as f32 + b as f32 * 0.5; 8]
    }

    fn ok(v: Vec<f32>) -> Result<Vec<f32>, std::convert::Infallible> {
        Ok(v)
    }

    #[test]
    fn longest_cached_prefix_by_whole_blocks() {
        let mut c = PrefixCache::new(1 << 20, 4);
        let a: Vec<u32> = (0..13).collect();
        c.insert(PromptDepth::Full, &a, 12, |b| ok(block_data(b, &a[b * 4..])))
            .unwrap();
        assert_eq!(c.usage().blocks, 3);
        // Same first 9 tokens: two whole blocks match.
        let mut q = a[..9].to_vec();
        q.extend([100, 101, 102, 103]);
        let (n, data) = c.lookup(PromptDepth::Full, &q, q.len() - 1).expect("hit");
        assert_eq!(n, 8);
        assert_eq!(data, [block_data(0, &a[0..]), block_data(1, &a[4..])].concat());
        // At most max_positions: a prompt equal to the cached one keeps its last block back.
        assert_eq!(c.lookup(PromptDepth::Full, &a[..12], 11).map(|h| h.0), Some(8));
        // A different first block: no hit, even though later blocks are equal.
        let mut other = a.clone();
        other[0] = 99;
        assert!(c.lookup(PromptDepth::Full, &other, 12).is_none());
    }

    #[test]
    fn least_recently_used_blocks_leave_first_and_deepest_first() {
        // Each block is 8 floats = 32 bytes; room for 3.
        let mut c = PrefixCache::new(96, 2);
        let a = [1u32, 2, 3, 4];
        let b = [5u32, 6, 7, 8];
        c.insert(PromptDepth::Full, &a, 4, |i| ok(block_data(i, &a[i * 2..])))
            .unwrap();
        c.insert(PromptDepth::Full, &b, 4, |i| ok(block_data(i, &b[i * 2..])))
            .unwrap();
        // 4 blocks over a 3-block budget: a's deeper block went (a is the least recent).
        assert_eq!(c.usage().blocks, 3);
        assert_eq!(c.lookup(PromptDepth::Full, &a, 4).map(|h| h.0), Some(2));
        assert_eq!(c.lookup(PromptDepth::Full, &b, 4).map(|h| h.0), Some(4));
        assert!(c.usage().bytes <= 96);
        // A block larger than the budget is never kept.
        let mut tiny = PrefixCache::new(16, 2);
        tiny.insert(PromptDepth::Full, &a, 4, |i| ok(block_data(i, &a[i * 2..])))
            .unwrap();
        assert_eq!(tiny.usage().blocks, 0);
    }

    #[test]
    fn a_colliding_entry_is_never_handed_out() {
        let mut c = PrefixCache::new(1 << 20, 2);
        let a = [1u32, 2];
        c.insert(PromptDepth::Full, &a, 2, |i| ok(block_data(i, &a))).unwrap();
        // Forge a collision: the entry under a's key claims other tokens.
        let key = chain(ROOT, &a);
        c.entries.get_mut(&key).unwrap().tokens = vec![9, 9];
        assert!(c.lookup(PromptDepth::Full, &a, 2).is_none());
    }

    #[test]
    fn keys_values_of_one_prompt_depth_never_serve_another() {
        let mut c = PrefixCache::new(1 << 20, 4);
        let a: Vec<u32> = (0..13).collect();
        let gate = PromptDepth::GateExits { threshold: None };
        let gate_half = PromptDepth::GateExits { threshold: Some(0.5) };
        c.insert(gate, &a, 12, |b| ok(block_data(b, &a[b * 4..]))).unwrap();
        assert!(c.lookup(PromptDepth::Full, &a, 12).is_none());
        assert!(c.lookup(gate_half, &a, 12).is_none());
        assert_eq!(c.lookup(gate, &a, 12).map(|h| h.0), Some(12));
        c.insert(PromptDepth::Full, &a, 8, |b| ok(vec![-1.0; 8 + b])).unwrap();
        let (n, data) = c.lookup(PromptDepth::Full, &a, 12).unwrap();
        assert_eq!((n, data.len()), (8, 17), "its own blocks, not the gate's");
        assert_eq!(c.usage().blocks, 5);
    }
}
