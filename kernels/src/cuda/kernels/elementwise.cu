// Element-wise kernels: SwiGLU, embedding lookup, the KV write of a pass's rows (slots computed
// here from the rows' positions, depths and block tables: no per-layer metadata), and one
// gather/scatter of vectors by offset lists that serves copy_rows, KV writes outside a pass,
// KV export and import.

// out[i, c] = silu(gu[i, c]) * gu[i, inter + c] over `n` rows.
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gu, int n, int inter, float* __restrict__ out) {
    const size_t total = (size_t)n * inter;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        const size_t i = idx / inter, c = idx % inter;
        const float g = gu[i * 2 * inter + c];
        const float u = gu[i * 2 * inter + inter + c];
        out[idx] = g / (1.0f + expf(-g)) * u;
    }
}

// out[i] = table[tokens[i]] (f32 rows from 16-bit weight rows of stride ld). One block per row.
template <class W>
__device__ __forceinline__ void embed_body(const u16* __restrict__ table, int ld, const unsigned* __restrict__ tokens,
                                           float* __restrict__ out, int width) {
    const u16* src = table + (size_t)tokens[blockIdx.x] * ld;
    float* dst = out + (size_t)blockIdx.x * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = W::load(src[i]);
}

extern "C" __global__ void embed_bf16(const u16* __restrict__ table, int ld, const unsigned* __restrict__ tokens,
                                      float* __restrict__ out, int width) {
    embed_body<WBf16>(table, ld, tokens, out, width);
}

extern "C" __global__ void embed_f16(const u16* __restrict__ table, int ld, const unsigned* __restrict__ tokens,
                                     float* __restrict__ out, int width) {
    embed_body<WF16>(table, ld, tokens, out, width);
}

// dst[dst_off[v] .. + len] = src[src_off[v] .. + len] for every vector v (one block each).
// Offsets are in floats. Source and destination ranges of one launch never overlap.
extern "C" __global__ void copy_vecs_f32(float* __restrict__ dst, const i64* __restrict__ dst_off,
                                         const float* __restrict__ src, const i64* __restrict__ src_off, int len) {
    const float* s = src + src_off[blockIdx.x];
    float* d = dst + dst_off[blockIdx.x];
    for (int i = threadIdx.x; i < len; i += blockDim.x) d[i] = s[i];
}

// The keys and values of a pass's rows at shared layer k: row i's key (kvd floats from column
// k_col0 of src, row stride ld) and value (from v_col0) go to its slot of unrolled layer
// depth * shared + k. Pool layout [block][layer][k|v][slot][kvd]. One block per row.
extern "C" __global__ void kv_write_rows_f32(float* __restrict__ pool, const RowDev* __restrict__ rows,
                                             const unsigned* __restrict__ tables, int shared, int k, int n_layers,
                                             int block_size, int kvd, const float* __restrict__ src, int ld,
                                             int k_col0, int v_col0) {
    const RowDev r = rows[blockIdx.x];
    const i64 blk = tables[r.table + r.pos / block_size];
    const i64 layer = (i64)r.depth * shared + k;
    const i64 base = ((blk * n_layers + layer) * 2 * block_size + r.pos % block_size) * (i64)kvd;
    const float* s = src + (size_t)blockIdx.x * ld;
    for (int i = threadIdx.x; i < kvd; i += blockDim.x) {
        pool[base + i] = s[k_col0 + i];
        pool[base + (i64)block_size * kvd + i] = s[v_col0 + i];
    }
}
