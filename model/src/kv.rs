//! The paged KV cache: a pool of fixed-size blocks and per-sequence block tables.
//!
//! **Invariant:** a block is either on the free list or in exactly one sequence's table;
//! `reserve` is all-or-nothing, so a failed reservation leaks nothing.

use crate::error::{ModelError, Result};
use rrt_kernels::KvLayout;

/// Default positions per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The storage of all keys and values, in blocks.
pub struct KvPool {
    layout: KvLayout,
    data: Vec<f32>,
    free: Vec<u32>,
    n_blocks: usize,
}

/// One sequence's view of the cache: its blocks in position order and how many positions
/// hold keys/values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqKv {
    pub blocks: Vec<u32>,
    /// Positions `0..len` are written.
    pub len: usize,
}

impl KvPool {
    /// A pool of `n_blocks` blocks. Memory is zero-initialised lazily by the OS.
    pub fn new(layout: KvLayout, n_blocks: usize) -> Self {
        let data = vec![0f32; n_blocks * layout.block_floats()];
        let free = (0..n_blocks as u32).rev().collect();
        Self {
            layout,
            data,
            free,
            n_blocks,
        }
    }

    /// A pool holding as many blocks as fit in `bytes`.
    pub fn with_budget(layout: KvLayout, bytes: usize) -> Self {
        let per_block = layout.block_floats() * 4;
        Self::new(layout, (bytes / per_block).max(1))
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Bytes of one block.
    pub fn block_bytes(&self) -> usize {
        self.layout.block_floats() * 4
    }

    /// Blocks needed to hold `len` positions.
    pub fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.layout.block_size)
    }

    /// Makes room for positions `0..new_len` in `seq` (all or nothing).
    pub fn reserve(&mut self, seq: &mut SeqKv, new_len: usize) -> Result<()> {
        let need = self.blocks_for(new_len).saturating_sub(seq.blocks.len());
        if need > self.free.len() {
            return Err(ModelError::KvFull {
                needed: need,
                free: self.free.len(),
            });
        }
        for _ in 0..need {
            seq.blocks.push(self.free.pop().expect("checked above"));
        }
        Ok(())
    }

    /// Returns all of the sequence's blocks to the pool.
    pub fn release(&mut self, seq: &mut SeqKv) {
        self.free.extend(seq.blocks.drain(..).rev());
        seq.len = 0;
    }

    /// Drops positions `len..` (e.g. to rewind), returning blocks no longer needed.
    pub fn truncate(&mut self, seq: &mut SeqKv, len: usize) {
        let keep = self.blocks_for(len);
        while seq.blocks.len() > keep {
            self.free.push(seq.blocks.pop().expect("len checked"));
        }
        seq.len = seq.len.min(len);
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Writes the key and value of one position of one layer.
    pub fn write(&mut self, blocks: &[u32], layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let bs = self.layout.block_size;
        let b = blocks[pos / bs];
        let kd = self.layout.kv_dim();
        let ko = self.layout.offset(b, layer, 0, pos % bs);
        self.data[ko..ko + kd].copy_from_slice(k);
        let vo = self.layout.offset(b, layer, 1, pos % bs);
        self.data[vo..vo + kd].copy_from_slice(v);
    }
}

/// A pool sized for exactly one sequence of `len` positions, with that sequence reserved
/// (evaluation and calibration passes over one window).
pub fn single_sequence(layout: KvLayout, len: usize) -> Result<(KvPool, SeqKv)> {
    let mut pool = KvPool::new(layout, len.div_ceil(layout.block_size).max(1));
    let mut seq = SeqKv::default();
    pool.reserve(&mut seq, len)?;
    Ok((pool, seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout() -> KvLayout {
        KvLayout {
            n_layers: 2,
            block_size: 4,
            n_kv_heads: 1,
            head_dim: 2,
        }
    }

    #[test]
    fn reserve_is_all_or_nothing() {
        let mut pool = KvPool::new(layout(), 3);
        let mut a = SeqKv::default();
        pool.reserve(&mut a, 9).unwrap();
        assert_eq!(a.blocks.len(), 3);
        let mut b = SeqKv::default();
        let err = pool.reserve(&mut b, 1).unwrap_err();
        assert!(matches!(err, ModelError::KvFull { needed: 1, free: 0 }));
        assert!(b.blocks.is_empty());
        pool.release(&mut a);
        assert_eq!(pool.free_blocks(), 3);
    }

    proptest! {
        /// Under any sequence of reserve / truncate / release, every block is either free or
        /// owned by exactly one sequence.
        #[test]
        fn blocks_are_never_leaked_or_shared(ops in proptest::collection::vec((0usize..4, 0usize..3, 0usize..40), 1..200)) {
            let mut pool = KvPool::new(layout(), 12);
            let mut seqs = vec![SeqKv::default(); 4];
            for (s, op, len) in ops {
                match op {
                    0 => { let _ = pool.reserve(&mut seqs[s], len); }
                    1 => pool.truncate(&mut seqs[s], len),
                    _ => pool.release(&mut seqs[s]),
                }
                let mut owned: Vec<u32> = seqs.iter().flat_map(|q| q.blocks.iter().copied()).collect();
                owned.extend(pool.free.iter().copied());
                owned.sort_unstable();
                prop_assert_eq!(owned, (0..12u32).collect::<Vec<_>>());
            }
        }
    }
}
