// The fused shared + per-depth LoRA product (kernels/NOTES.md has the design):
//   y (+)= x W^T + bias, then y[rows of depth d, entry columns] += (x A_d^T) B_d^T.
// - lora_shrink_*: t[row, entry, 0..rank) = x_row A_{entry, adapter(row)}^T, every depth group
//   and entry in one launch: items of up to 8 rows of one adapter on the warp path (each warp
//   streams one row of A once for all rows of its item), tiles of up to 64 rows of long groups
//   on the tensor cores (the same mma tile as the product, with W = A).
// - linear_gemv_*_rN: decode-sized products (n <= N <= 16 rows). Each warp streams 2 rows of W
//   with 16-byte loads and serves every row of x; the LoRA expand of each row's own adapter is
//   added before the warp reduction; split-K over gridDim.y with a deterministic fix-up.
// - linear_mma_*: tensor-core (mma.sync m16n8k16, f32 accumulators) tiles of 64 rows x 128
//   columns; the LoRA expand runs as extra K steps [T | B_d] per adapter present in the tile
//   (rows of other adapters masked to zero), so it goes through the tensor cores too.
// Split-K: every split writes its partial tile to `ws`, the last block to arrive (counter per
// tile, reset by that block) sums the partials in split order and writes y: deterministic.

#define MAX_ENTRIES 4

struct LoraDesc {
    u64 a;     // const u16*: rank x in, row stride lda (0: no adapter)
    u64 b;     // const u16*: out x rank, row stride ldb
    int rank;
    int lda;
    int ldb;
    int pad_;
};

struct LoraArgs {
    u64 descs;        // const LoraDesc*: [entry * n_adapters + adapter]
    u64 row_adapter;  // const int*: adapter of each row (-1: none)
    u64 t;            // float*: shrink results, t[row * ldt + entry * rmax + q]
    int ldt;
    int rmax;
    int n_entries;
    int n_adapters;
    int col0[MAX_ENTRIES];
    int cols[MAX_ENTRIES];
    int t_splits;  // the shrink's K splits: t holds this many partials ...
    int t_stride;  // ... this many floats apart; readers sum them in split order
};

// t[row, entry, q] as the expand reads it: the sum of the shrink's partials in split order.
__device__ __forceinline__ float t_value(const float* t, const LoraArgs& la, size_t idx) {
    float v = t[idx];
    for (int z = 1; z < la.t_splits; ++z) v += t[idx + (size_t)z * la.t_stride];
    return v;
}

__device__ __forceinline__ float4 t_value4(const float* t, int splits, int stride, size_t idx, int q, int rank) {
    float4 v = load_x4(t + idx, q, rank, true);
    for (int z = 1; z < splits; ++z) {
        const float4 w = load_x4(t + idx + (size_t)z * stride, q, rank, true);
        v.x += w.x;
        v.y += w.y;
        v.z += w.z;
        v.w += w.w;
    }
    return v;
}

struct SplitArgs {
    u64 ws;        // float*: splits x n x m partial sums
    u64 counters;  // int*: one arrival counter per output tile, zero between launches
    int k_chunk;   // K elements per split (multiple of 256)
    int pad_;
};

struct ShrinkItem {
    int row0;
    int rows;
    int adapter;
    int pad_;
};

// The descriptor of (entry, row adapter `a`), or null when the row has none there.
__device__ __forceinline__ const LoraDesc* lora_desc(const LoraArgs& la, int e, int a) {
    if (a < 0 || a >= la.n_adapters) return nullptr;
    const LoraDesc* d = reinterpret_cast<const LoraDesc*>(la.descs) + e * la.n_adapters + a;
    return d->a == 0 ? nullptr : d;
}

// ---------------------------------------------------------------------------------------------
// LoRA shrink for decode-sized groups.

#define SHRINK_ROWS 8
#define SHRINK_WARPS 8
#define SHRINK_K_UNIT 256

// The warp path: block (item, entry * rank_blocks + rb), warp w computes rank row
// rb * SHRINK_WARPS + w for the item's rows.
template <class W>
__device__ __forceinline__ void lora_shrink_warps(const float* __restrict__ x, int ldx, int kb, int ke,
                                                  const ShrinkItem item, int e, int rb, const LoraArgs& la) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const LoraDesc* dp = lora_desc(la, e, item.adapter);
    if (dp == nullptr) return;
    const LoraDesc d = *dp;
    const int q = rb * SHRINK_WARPS + warp;
    if (q >= d.rank) return;
    const u16* ar = reinterpret_cast<const u16*>(d.a) + (size_t)q * d.lda;
    const bool vec = (ldx & 3) == 0;
    float acc[SHRINK_ROWS];
#pragma unroll
    for (int i = 0; i < SHRINK_ROWS; ++i) acc[i] = 0.0f;
    for (int kk = kb + lane * 8; kk < ke; kk += WARP * 8) {
        float wf[8];
        unpack8<W>(__ldg(reinterpret_cast<const uint4*>(ar + kk)), wf);
#pragma unroll
        for (int i = 0; i < SHRINK_ROWS; ++i) {
            if (i < item.rows) {
                float xv[8];
                load_x8(x + (size_t)(item.row0 + i) * ldx, kk, ke, vec, xv);
#pragma unroll
                for (int el = 0; el < 8; ++el) acc[i] = fmaf(xv[el], wf[el], acc[i]);
            }
        }
    }
    float mine = 0.0f;
#pragma unroll
    for (int i = 0; i < SHRINK_ROWS; ++i) {
        const float sum = warp_sum(acc[i]);
        if (lane == i) mine = sum;
    }
    if (lane < item.rows) {
        float* t = reinterpret_cast<float*>(la.t) + (size_t)blockIdx.z * la.t_stride;
        t[(size_t)(item.row0 + lane) * la.ldt + e * la.rmax + q] = mine;
    }
}

// ---------------------------------------------------------------------------------------------
// Decode GEMV.

#define GEMV_WARPS 4
#define GEMV_RPW 2
#define GEMV_COLS (GEMV_WARPS * GEMV_RPW)

template <class W, int NR>
__device__ __forceinline__ void linear_gemv_body(const float* __restrict__ x, int ldx, int n,
                                                 const u16* __restrict__ w, int ldw, int k, int m,
                                                 const float* __restrict__ bias, float* y, int ldy,
                                                 int accumulate, const LoraArgs& la,
                                                 const SplitArgs& sp) {
    __shared__ int s_last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int j0 = (blockIdx.x * GEMV_WARPS + warp) * GEMV_RPW;
    const int z = blockIdx.y, splits = gridDim.y;
    const int kb = z * sp.k_chunk;
    const int ke = min(k, kb + sp.k_chunk);
    const bool vec = (ldx & 3) == 0;
    float acc[NR][GEMV_RPW];
#pragma unroll
    for (int i = 0; i < NR; ++i)
#pragma unroll
        for (int r = 0; r < GEMV_RPW; ++r) acc[i][r] = 0.0f;

    for (int kk = kb + lane * 8; kk < ke; kk += WARP * 8) {
        float wf[GEMV_RPW][8];
#pragma unroll
        for (int r = 0; r < GEMV_RPW; ++r) {
            if (j0 + r < m) {
                unpack8<W>(__ldg(reinterpret_cast<const uint4*>(w + (size_t)(j0 + r) * ldw + kk)), wf[r]);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) wf[r][e] = 0.0f;
            }
        }
#pragma unroll
        for (int i = 0; i < NR; ++i) {
            if (i < n) {
                float xv[8];
                load_x8(x + (size_t)i * ldx, kk, ke, vec, xv);
#pragma unroll
                for (int r = 0; r < GEMV_RPW; ++r)
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[i][r] = fmaf(xv[e], wf[r][e], acc[i][r]);
            }
        }
    }

    // LoRA expand of each row's own adapter (the first split only).
    if (z == 0) {
        const int* row_adapter = reinterpret_cast<const int*>(la.row_adapter);
        const float* t = reinterpret_cast<const float*>(la.t);
#pragma unroll
        for (int e = 0; e < MAX_ENTRIES; ++e) {
            if (e < la.n_entries) {
#pragma unroll
                for (int r = 0; r < GEMV_RPW; ++r) {
                    const int jj = j0 + r - la.col0[e];
                    if (j0 + r < m && jj >= 0 && jj < la.cols[e]) {
#pragma unroll
                        for (int i = 0; i < NR; ++i) {
                            if (i < n) {
                                const LoraDesc* dp = lora_desc(la, e, row_adapter[i]);
                                if (dp != nullptr) {
                                    const LoraDesc d = *dp;
                                    const size_t tr = (size_t)i * la.ldt + e * la.rmax;
                                    const u16* br = reinterpret_cast<const u16*>(d.b) + (size_t)jj * d.ldb;
                                    float s = 0.0f;
                                    for (int q = lane; q < d.rank; q += WARP)
                                        s = fmaf(t_value(t, la, tr + q), W::load(br[q]), s);
                                    acc[i][r] += s;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    // Lane i * RPW + r ends with output (row i, column j0 + r).
    float v = 0.0f;
#pragma unroll
    for (int i = 0; i < NR; ++i)
#pragma unroll
        for (int r = 0; r < GEMV_RPW; ++r) {
            const float s = warp_sum(acc[i][r]);
            if (lane == i * GEMV_RPW + r) v = s;
        }
    const int i = lane / GEMV_RPW;
    const int j = j0 + lane % GEMV_RPW;
    const bool have = lane < NR * GEMV_RPW && i < n && j < m;

    if (splits > 1) {
        float* ws = reinterpret_cast<float*>(sp.ws);
        int* counters = reinterpret_cast<int*>(sp.counters);
        if (have) ws[((size_t)z * n + i) * m + j] = v;
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) s_last = atomicAdd(counters + blockIdx.x, 1) == splits - 1;
        __syncthreads();
        if (!s_last) return;
        __threadfence();
        if (have) {
            v = 0.0f;
            for (int zz = 0; zz < splits; ++zz) v += __ldcg(ws + ((size_t)zz * n + i) * m + j);
        }
        if (threadIdx.x == 0) counters[blockIdx.x] = 0;
    }
    if (have) {
        if (bias != nullptr) v += bias[j];
        float* dst = y + (size_t)i * ldy + j;
        *dst = accumulate ? *dst + v : v;
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core tiles.

#define MMA_BM 64
#define MMA_BN 128
#define MMA_BK 32
#define MMA_LDS (MMA_BK + 8)
#define MMA_THREADS 256

struct MmaSmem {
    u16 xs[2][MMA_BM][MMA_LDS];
    u16 ws[2][MMA_BN][MMA_LDS];
};

// One K step of the main product: 32 columns of 64 rows of x and of 128 rows of W.
struct MainLoader {
    const float* x;
    int ldx, n;
    const u16* w;
    int ldw, m, kb, ke, row0, col0;
    bool vec;
    __device__ __forceinline__ void load(int step, float4* xr, uint4* wr) const {
        const int k0 = kb + step * MMA_BK;
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            const int idx = threadIdx.x + MMA_THREADS * s;
            const int r = row0 + (idx >> 3), kk = k0 + (idx & 7) * 4;
            xr[s] = (r < n) ? load_x4(x + (size_t)r * ldx, kk, ke, vec) : make_float4(0.f, 0.f, 0.f, 0.f);
            const int j = col0 + (idx >> 2), kw = k0 + (idx & 3) * 8;
            wr[s] = (j < m && kw < ke) ? __ldg(reinterpret_cast<const uint4*>(w + (size_t)j * ldw + kw))
                                       : make_uint4(0u, 0u, 0u, 0u);
        }
    }
};

// One K step of a LoRA expand: 32 of the shrink results of the tile's rows of `adapter`
// (other rows zero) and the same 32 columns of B for the tile's columns inside the entry.
struct LoraLoader {
    const float* t;
    int t_splits, t_stride;
    int ldt, toff;
    const int* row_adapter;
    int adapter, n, row0;
    const u16* b;
    int ldb, rank, jlo, jhi, col0;
    __device__ __forceinline__ void load(int step, float4* xr, uint4* wr) const {
        const int q0 = step * MMA_BK;
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            const int idx = threadIdx.x + MMA_THREADS * s;
            const int r = row0 + (idx >> 3), qq = q0 + (idx & 7) * 4;
            xr[s] = (r < n && row_adapter[r] == adapter) ? t_value4(t, t_splits, t_stride, (size_t)r * ldt + toff, qq, rank)
                                                          : make_float4(0.f, 0.f, 0.f, 0.f);
            const int j = col0 + (idx >> 2), qw = q0 + (idx & 3) * 8;
            wr[s] = (j >= jlo && j < jhi && qw < rank)
                        ? __ldg(reinterpret_cast<const uint4*>(b + (size_t)(j - jlo) * ldb + qw))
                        : make_uint4(0u, 0u, 0u, 0u);
        }
    }
};

template <class W>
__device__ __forceinline__ void mma_store(MmaSmem& sm, int buf, const float4* xr, const uint4* wr) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
        const int idx = threadIdx.x + MMA_THREADS * s;
        *reinterpret_cast<uint2*>(&sm.xs[buf][idx >> 3][(idx & 7) * 4]) =
            make_uint2(W::pack(xr[s].x, xr[s].y), W::pack(xr[s].z, xr[s].w));
        *reinterpret_cast<uint4*>(&sm.ws[buf][idx >> 2][(idx & 3) * 8]) = wr[s];
    }
}

template <class W>
__device__ __forceinline__ void mma_compute(const MmaSmem& sm, int buf, float (&acc)[2][4][4]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t2 = (lane & 3) * 2;
    const int wm = warp & 1, wn = warp >> 1;
#pragma unroll
    for (int ks = 0; ks < MMA_BK / 16; ++ks) {
        const int c = ks * 16 + t2;
        u32 af[2][4], bf[4][2];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
            const int r = wm * 32 + mt * 16 + g;
            af[mt][0] = *reinterpret_cast<const u32*>(&sm.xs[buf][r][c]);
            af[mt][1] = *reinterpret_cast<const u32*>(&sm.xs[buf][r + 8][c]);
            af[mt][2] = *reinterpret_cast<const u32*>(&sm.xs[buf][r][c + 8]);
            af[mt][3] = *reinterpret_cast<const u32*>(&sm.xs[buf][r + 8][c + 8]);
        }
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int r = wn * 32 + nt * 8 + g;
            bf[nt][0] = *reinterpret_cast<const u32*>(&sm.ws[buf][r][c]);
            bf[nt][1] = *reinterpret_cast<const u32*>(&sm.ws[buf][r][c + 8]);
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) W::mma(acc[mt][nt], af[mt], bf[nt]);
    }
}

// `nsteps` K steps from `ld`, double-buffered through shared memory (the next step's global
// loads are in flight while the current one is multiplied).
template <class W, class L>
__device__ __forceinline__ void mma_phase(const L& ld, int nsteps, MmaSmem& sm, float (&acc)[2][4][4]) {
    if (nsteps <= 0) return;
    float4 xr[2];
    uint4 wr[2];
    ld.load(0, xr, wr);
    __syncthreads();  // the previous phase is done reading both buffers
    mma_store<W>(sm, 0, xr, wr);
    __syncthreads();
    for (int s = 0; s < nsteps; ++s) {
        const int cur = s & 1;
        if (s + 1 < nsteps) ld.load(s + 1, xr, wr);
        mma_compute<W>(sm, cur, acc);
        if (s + 1 < nsteps) mma_store<W>(sm, cur ^ 1, xr, wr);
        __syncthreads();
    }
}

template <class W>
__device__ __forceinline__ void linear_mma_body(const float* __restrict__ x, int ldx, int n,
                                                const u16* __restrict__ w, int ldw, int k, int m,
                                                const float* __restrict__ bias, float* y, int ldy,
                                                int accumulate, const LoraArgs& la,
                                                const SplitArgs& sp) {
    __shared__ __align__(16) MmaSmem sm;
    __shared__ unsigned long long s_mask;
    __shared__ int s_last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t2 = (lane & 3) * 2;
    const int wm = warp & 1, wn = warp >> 1;
    const int row0 = blockIdx.y * MMA_BM, col0 = blockIdx.x * MMA_BN;
    const int z = blockIdx.z, splits = gridDim.z;
    float acc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.0f;

    const int kb = z * sp.k_chunk;
    const int ke = min(k, kb + sp.k_chunk);
    MainLoader ml{x, ldx, n, w, ldw, m, kb, ke, row0, col0, (ldx & 3) == 0};
    mma_phase<W>(ml, (ke - kb + MMA_BK - 1) / MMA_BK, sm, acc);

    if (z == splits - 1 && la.n_entries > 0) {
        const int* row_adapter = reinterpret_cast<const int*>(la.row_adapter);
        if (threadIdx.x == 0) s_mask = 0ull;
        __syncthreads();
        if (threadIdx.x < MMA_BM && row0 + (int)threadIdx.x < n) {
            const int a = row_adapter[row0 + threadIdx.x];
            if (a >= 0 && a < la.n_adapters && a < 64) atomicOr(&s_mask, 1ull << a);
        }
        __syncthreads();
        const unsigned long long mask = s_mask;
#pragma unroll
        for (int e = 0; e < MAX_ENTRIES; ++e) {
            if (e >= la.n_entries) break;
            const int jlo = la.col0[e], jhi = la.col0[e] + la.cols[e];
            if (jhi <= col0 || jlo >= col0 + MMA_BN) continue;
            for (unsigned long long mm = mask; mm != 0ull; mm &= mm - 1ull) {
                const int a = __ffsll((long long)mm) - 1;
                const LoraDesc* dp = lora_desc(la, e, a);
                if (dp == nullptr) continue;
                const LoraDesc d = *dp;
                LoraLoader ll{reinterpret_cast<const float*>(la.t), la.t_splits, la.t_stride, la.ldt, e * la.rmax, row_adapter, a, n, row0,
                              reinterpret_cast<const u16*>(d.b), d.ldb, d.rank, jlo, jhi, col0};
                mma_phase<W>(ll, (d.rank + MMA_BK - 1) / MMA_BK, sm, acc);
            }
        }
    }

    if (splits > 1) {
        float* ws = reinterpret_cast<float*>(sp.ws);
        int* counters = reinterpret_cast<int*>(sp.counters);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = row0 + wm * 32 + mt * 16 + g + 8 * h;
                    const int c = col0 + wn * 32 + nt * 8 + t2;
                    if (r < n) {
                        float* p = ws + ((size_t)z * n + r) * m + c;
                        if (c < m) p[0] = acc[mt][nt][2 * h];
                        if (c + 1 < m) p[1] = acc[mt][nt][2 * h + 1];
                    }
                }
        __threadfence();
        __syncthreads();
        const int tile = blockIdx.y * gridDim.x + blockIdx.x;
        if (threadIdx.x == 0) s_last = atomicAdd(counters + tile, 1) == splits - 1;
        __syncthreads();
        if (!s_last) return;
        __threadfence();
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int r = row0 + wm * 32 + mt * 16 + g + 8 * h;
                    const int c = col0 + wn * 32 + nt * 8 + t2;
                    float s0 = 0.0f, s1 = 0.0f;
                    if (r < n) {
                        for (int zz = 0; zz < splits; ++zz) {
                            const float* p = ws + ((size_t)zz * n + r) * m + c;
                            if (c < m) s0 += __ldcg(p);
                            if (c + 1 < m) s1 += __ldcg(p + 1);
                        }
                    }
                    acc[mt][nt][2 * h] = s0;
                    acc[mt][nt][2 * h + 1] = s1;
                }
        if (threadIdx.x == 0) counters[tile] = 0;
    }

#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = row0 + wm * 32 + mt * 16 + g + 8 * h;
                if (r >= n) continue;
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    const int c = col0 + wn * 32 + nt * 8 + t2 + u;
                    if (c >= m) continue;
                    float v = acc[mt][nt][2 * h + u];
                    if (bias != nullptr) v += bias[c];
                    float* dst = y + (size_t)r * ldy + c;
                    *dst = accumulate ? *dst + v : v;
                }
            }
}

// ---------------------------------------------------------------------------------------------
// LoRA shrink, one launch for every group and entry. Blocks [0, n_small) take the warp items,
// the rest the tensor-core tiles; blockIdx.y = entry * per_entry + (rank block or column tile).
// Every early return below is uniform across the block (it depends on block indices and the
// descriptor only), so the tile path's barriers are reached by all threads or none.

template <class W>
__device__ __forceinline__ void lora_shrink_tile(const float* __restrict__ x, int ldx, int kb, int ke,
                                                 const ShrinkItem tile, int e, int ct, const LoraArgs& la,
                                                 MmaSmem& sm) {
    const LoraDesc* dp = lora_desc(la, e, tile.adapter);
    if (dp == nullptr) return;
    const LoraDesc d = *dp;
    if (ct * MMA_BN >= d.rank) return;
    float acc[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.0f;
    const float* xt = x + (size_t)tile.row0 * ldx;
    MainLoader ml{xt, ldx, tile.rows, reinterpret_cast<const u16*>(d.a), d.lda, d.rank, kb, ke, 0, ct * MMA_BN,
                  (ldx & 3) == 0};
    mma_phase<W>(ml, (ke - kb + MMA_BK - 1) / MMA_BK, sm, acc);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t2 = (lane & 3) * 2;
    const int wm = warp & 1, wn = warp >> 1;
    float* t = reinterpret_cast<float*>(la.t) + (size_t)blockIdx.z * la.t_stride;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = wm * 32 + mt * 16 + g + 8 * h;
                if (r >= tile.rows) continue;
#pragma unroll
                for (int u = 0; u < 2; ++u) {
                    const int q = ct * MMA_BN + wn * 32 + nt * 8 + t2 + u;
                    if (q < d.rank) t[(size_t)(tile.row0 + r) * la.ldt + e * la.rmax + q] = acc[mt][nt][2 * h + u];
                }
            }
}

// blockIdx.z is the split of K: inputs [z * k_chunk, min(k, (z + 1) * k_chunk)), written to
// partial z of t.
template <class W>
__device__ __forceinline__ void lora_shrink_body(const float* __restrict__ x, int ldx, int k, int k_chunk,
                                                 const ShrinkItem* __restrict__ small, int n_small,
                                                 const ShrinkItem* __restrict__ tiles, int rank_blocks,
                                                 int col_tiles, const LoraArgs& la) {
    __shared__ __align__(16) MmaSmem sm;
    const int kb = blockIdx.z * k_chunk, ke = min(k, kb + k_chunk);
    if ((int)blockIdx.x < n_small) {
        const int e = blockIdx.y / rank_blocks, rb = blockIdx.y % rank_blocks;
        if (e >= la.n_entries) return;
        lora_shrink_warps<W>(x, ldx, kb, ke, small[blockIdx.x], e, rb, la);
    } else {
        const int e = blockIdx.y / col_tiles, ct = blockIdx.y % col_tiles;
        if (e >= la.n_entries) return;
        lora_shrink_tile<W>(x, ldx, kb, ke, tiles[blockIdx.x - n_small], e, ct, la, sm);
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points: {op}_{weight type}[_r{rows}].

#define LINEAR_PARAMS                                                                          \
    const float* __restrict__ x, int ldx, int n, const u16* __restrict__ w, int ldw, int k, int m, \
        const float* __restrict__ bias, float* y, int ldy, int accumulate, LoraArgs la, SplitArgs sp
#define LINEAR_ARGS x, ldx, n, w, ldw, k, m, bias, y, ldy, accumulate, la, sp

#define GEMV_INSTANCE(NAME, W, NR)                                                                 \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * WARP) NAME(LINEAR_PARAMS) {          \
        linear_gemv_body<W, NR>(LINEAR_ARGS);                                                      \
    }

GEMV_INSTANCE(linear_gemv_bf16_r1, WBf16, 1)
GEMV_INSTANCE(linear_gemv_bf16_r2, WBf16, 2)
GEMV_INSTANCE(linear_gemv_bf16_r4, WBf16, 4)
GEMV_INSTANCE(linear_gemv_bf16_r8, WBf16, 8)
GEMV_INSTANCE(linear_gemv_bf16_r16, WBf16, 16)
GEMV_INSTANCE(linear_gemv_f16_r1, WF16, 1)
GEMV_INSTANCE(linear_gemv_f16_r2, WF16, 2)
GEMV_INSTANCE(linear_gemv_f16_r4, WF16, 4)
GEMV_INSTANCE(linear_gemv_f16_r8, WF16, 8)
GEMV_INSTANCE(linear_gemv_f16_r16, WF16, 16)

extern "C" __global__ void __launch_bounds__(MMA_THREADS) linear_mma_bf16(LINEAR_PARAMS) {
    linear_mma_body<WBf16>(LINEAR_ARGS);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS) linear_mma_f16(LINEAR_PARAMS) {
    linear_mma_body<WF16>(LINEAR_ARGS);
}

#define SHRINK_PARAMS                                                                                  \
    const float* __restrict__ x, int ldx, int k, int k_chunk, const ShrinkItem* __restrict__ small, int n_small, \
        const ShrinkItem* __restrict__ tiles, int rank_blocks, int col_tiles, LoraArgs la
#define SHRINK_ARGS x, ldx, k, k_chunk, small, n_small, tiles, rank_blocks, col_tiles, la

extern "C" __global__ void __launch_bounds__(MMA_THREADS) lora_shrink_bf16(SHRINK_PARAMS) {
    lora_shrink_body<WBf16>(SHRINK_ARGS);
}
extern "C" __global__ void __launch_bounds__(MMA_THREADS) lora_shrink_f16(SHRINK_PARAMS) {
    lora_shrink_body<WF16>(SHRINK_ARGS);
}
