//! `#[repr(C)]` mirrors of the structs the kernels take (`linear.cu`, `attention.cu`), laid
//! out without padding so their bytes can be uploaded as they are.

use cudarc::driver::DeviceRepr;

/// `LoraDesc` of linear.cu: one adapter's A (`rank x in`) and B (`out x rank`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LoraDesc {
    pub a: u64,
    pub b: u64,
    pub rank: i32,
    pub lda: i32,
    pub ldb: i32,
    pub pad: i32,
}

/// `LoraArgs` of linear.cu, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LoraArgs {
    pub descs: u64,
    pub row_adapter: u64,
    pub t: u64,
    pub ldt: i32,
    pub rmax: i32,
    pub n_entries: i32,
    pub n_adapters: i32,
    pub col0: [i32; 4],
    pub cols: [i32; 4],
    /// Shrink splits of K: `t` holds this many partials, `t_stride` floats apart.
    pub t_splits: i32,
    pub t_stride: i32,
}

/// `SplitArgs` of linear.cu, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SplitArgs {
    pub ws: u64,
    pub counters: u64,
    pub k_chunk: i32,
    pub pad: i32,
}

/// `ShrinkItem` of linear.cu: rows of one loop depth to shrink (every entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ShrinkItem {
    pub row0: i32,
    pub rows: i32,
    pub adapter: i32,
    pub pad: i32,
}

/// `RowDev` of prelude.cuh: one row of a pass as the attention and KV-write kernels read it.
/// Its unrolled layer at shared layer `k` is `depth * shared + k`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RowDev {
    pub pos: i32,
    pub depth: i32,
    /// Offset of its block table in the pass's table array.
    pub table: i32,
    pub pad: i32,
}

/// `HeadTopDev` of select.cu: one row's LM-head reduction (one copy back for all rows).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HeadTopDev {
    pub id: u32,
    pub top: f32,
    pub second: f32,
    pub pad: u32,
    pub sum_exp: f64,
}

// SAFETY: plain `#[repr(C)]` structs of integers, no padding, no pointers the host
// dereferences; their layout matches the CUDA structs of the same names.
unsafe impl DeviceRepr for LoraArgs {}
unsafe impl DeviceRepr for SplitArgs {}
// SAFETY: as above; the host only reads it back as bytes the kernel wrote.
unsafe impl DeviceRepr for HeadTopDev {}

/// Marker for the structs whose bytes may be copied as they are (no padding, no invalid bit
/// patterns).
///
/// # Safety
/// Implementors are `#[repr(C)]`, `Copy`, have no padding bytes and are valid for any bits.
pub unsafe trait Pod: Copy {}
// SAFETY: the structs above and the integer types have no padding.
unsafe impl Pod for LoraDesc {}
unsafe impl Pod for ShrinkItem {}
unsafe impl Pod for RowDev {}
unsafe impl Pod for HeadTopDev {}
unsafe impl Pod for i32 {}
unsafe impl Pod for u32 {}
unsafe impl Pod for i64 {}
unsafe impl Pod for f32 {}

/// The bytes of a slice of plain structs.
pub fn bytes_of<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: `T: Pod` has no padding, so every byte is initialised; the length is exact.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Metadata packed into one upload (per pass, or per call outside a pass): each `push` returns the byte offset of its
/// array (16-byte aligned) in the arena.
#[derive(Default)]
pub struct Arena {
    pub bytes: Vec<u8>,
}

impl Arena {
    pub fn push<T: Pod>(&mut self, v: &[T]) -> usize {
        let off = self.bytes.len().div_ceil(16) * 16;
        self.bytes.resize(off, 0);
        self.bytes.extend_from_slice(bytes_of(v));
        off
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_cuda_layouts() {
        assert_eq!(std::mem::size_of::<LoraDesc>(), 32);
        assert_eq!(std::mem::size_of::<LoraArgs>(), 80);
        assert_eq!(std::mem::size_of::<SplitArgs>(), 24);
        assert_eq!(std::mem::size_of::<ShrinkItem>(), 16);
        assert_eq!(std::mem::size_of::<RowDev>(), 16);
        assert_eq!(std::mem::size_of::<HeadTopDev>(), 24);
    }

    #[test]
    fn arena_aligns_each_array() {
        let mut a = Arena::default();
        assert_eq!(a.push(&[1i32, 2, 3]), 0);
        assert_eq!(a.push(&[7i64]), 16);
        assert_eq!(a.bytes.len(), 24);
        assert_eq!(&a.bytes[16..24], &7i64.to_ne_bytes());
    }
}
