// Paged causal attention with grouped-query heads and an optional sliding window, for
// decode rows and prefill chunks alike (every row is independent: it reads the keys/values
// already in the pool, its own included). One block per (row, KV head): the `group` query
// heads that share the KV head are computed together, so each key/value vector is read once
// for all of them. Four warps take 32-position chunks in turn; in a chunk each lane scores
// one position (its key read with 16-byte loads), the warp keeps an online softmax per query
// head, then accumulates the values with lanes over the head dimension. The warps' partial
// states are merged at the end. Pool layout: [block][layer][k|v][slot][kv_heads * head_dim].

#define ATT_WARPS 4
#define ATT_MAXG 8

// A row attends to positions start..=pos of unrolled layer depth * shared + k, start = pos + 1 -
// window when a window is set (window < 0: none); window 0 leaves nothing to attend to, and
// the output is then 0 (as on the CPU).
template <int DPL>  // head dimensions per lane: head_dim <= 32 * DPL
__device__ __forceinline__ void attention_body(const float* __restrict__ qkv, int ld,
                                               const RowDev* __restrict__ rows,
                                               const unsigned* __restrict__ tables, int shared, int k,
                                               int window, const float* __restrict__ pool, int n_layers,
                                               int block_size, int n_kv_heads, int head_dim, int group,
                                               float scale, float* __restrict__ out) {
    extern __shared__ float smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const RowDev rd = rows[blockIdx.x];
    struct {
        int pos, start, layer;
    } row;
    row.pos = rd.pos;
    row.start = (window >= 0 && rd.pos + 1 > window) ? rd.pos + 1 - window : 0;
    row.layer = rd.depth * shared + k;
    const int kvh = blockIdx.y;
    const int kvd = n_kv_heads * head_dim;
    const int qd = n_kv_heads * group * head_dim;
    float* qs = smem;                                  // group * head_dim
    float* pm = qs + group * head_dim;                 // ATT_WARPS * group
    float* pl = pm + ATT_WARPS * group;                // ATT_WARPS * group
    float* pacc = pl + ATT_WARPS * group;              // ATT_WARPS * group * head_dim
    const float* q = qkv + (size_t)blockIdx.x * ld + (size_t)kvh * group * head_dim;
    for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x) qs[i] = q[i] * scale;
    __syncthreads();

    const unsigned* table = tables + rd.table;
    const bool vec = (head_dim & 3) == 0;
    float m[ATT_MAXG], l[ATT_MAXG], acc[ATT_MAXG][DPL];
#pragma unroll
    for (int g = 0; g < ATT_MAXG; ++g) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int d = 0; d < DPL; ++d) acc[g][d] = 0.0f;
    }

    for (int c0 = row.start + warp * WARP; c0 <= row.pos; c0 += ATT_WARPS * WARP) {
        const int p = c0 + lane;
        const bool valid = p <= row.pos;
        i64 koff = 0;
        if (valid) {
            const i64 blk = table[p / block_size];
            koff = (((blk * n_layers + row.layer) * 2) * block_size + p % block_size) * (i64)kvd +
                   (i64)kvh * head_dim;
        }
        const i64 voff = koff + (i64)block_size * kvd;  // the value vector of the same slot
        float s[ATT_MAXG];
#pragma unroll
        for (int g = 0; g < ATT_MAXG; ++g) s[g] = 0.0f;
        if (valid) {
            const float* key = pool + koff;
            if (vec) {
                for (int d = 0; d < head_dim; d += 4) {
                    const float4 kv4 = __ldg(reinterpret_cast<const float4*>(key + d));
#pragma unroll
                    for (int g = 0; g < ATT_MAXG; ++g) {
                        if (g < group) {
                            const float* qg = qs + g * head_dim + d;
                            s[g] = fmaf(qg[0], kv4.x, fmaf(qg[1], kv4.y, fmaf(qg[2], kv4.z, fmaf(qg[3], kv4.w, s[g]))));
                        }
                    }
                }
            } else {
                for (int d = 0; d < head_dim; ++d) {
                    const float kd = __ldg(key + d);
#pragma unroll
                    for (int g = 0; g < ATT_MAXG; ++g)
                        if (g < group) s[g] = fmaf(qs[g * head_dim + d], kd, s[g]);
                }
            }
        }
        float pr[ATT_MAXG];
#pragma unroll
        for (int g = 0; g < ATT_MAXG; ++g) {
            if (g < group) {
                const float sg = valid ? s[g] : NEG_INF;
                const float mn = fmaxf(m[g], warp_max(sg));
                const float corr = expf(m[g] - mn);  // 0 on the first chunk (m = -inf)
                pr[g] = valid ? expf(sg - mn) : 0.0f;
                l[g] = l[g] * corr + warp_sum(pr[g]);
                m[g] = mn;
#pragma unroll
                for (int d = 0; d < DPL; ++d) acc[g][d] *= corr;
            } else {
                pr[g] = 0.0f;
            }
        }
        const int last = min(WARP, row.pos - c0 + 1);
        for (int j = 0; j < last; ++j) {
            const i64 vo = __shfl_sync(0xffffffffu, voff, j);
            const float* val = pool + vo;
            float vv[DPL];
#pragma unroll
            for (int d = 0; d < DPL; ++d) {
                const int dd = lane + WARP * d;
                vv[d] = dd < head_dim ? __ldg(val + dd) : 0.0f;
            }
#pragma unroll
            for (int g = 0; g < ATT_MAXG; ++g) {
                if (g < group) {
                    const float pj = __shfl_sync(0xffffffffu, pr[g], j);
#pragma unroll
                    for (int d = 0; d < DPL; ++d) acc[g][d] = fmaf(pj, vv[d], acc[g][d]);
                }
            }
        }
    }

    // Merge the warps' states.
#pragma unroll
    for (int g = 0; g < ATT_MAXG; ++g) {
        if (g < group) {
            if (lane == 0) {
                pm[warp * group + g] = m[g];
                pl[warp * group + g] = l[g];
            }
#pragma unroll
            for (int d = 0; d < DPL; ++d) {
                const int dd = lane + WARP * d;
                if (dd < head_dim) pacc[(warp * group + g) * head_dim + dd] = acc[g][d];
            }
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x) {
        const int g = i / head_dim, d = i % head_dim;
        float mx = NEG_INF;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; ++w) mx = fmaxf(mx, pm[w * group + g]);
        float num = 0.0f, den = 0.0f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; ++w) {
            const float mw = pm[w * group + g];
            const float f = mw == NEG_INF ? 0.0f : expf(mw - mx);
            num = fmaf(f, pacc[(w * group + g) * head_dim + d], num);
            den = fmaf(f, pl[w * group + g], den);
        }
        out[(size_t)blockIdx.x * qd + (size_t)(kvh * group + g) * head_dim + d] = den > 0.0f ? num / den : 0.0f;
    }
}

#define ATTN_PARAMS                                                                                   \
    const float* __restrict__ qkv, int ld, const RowDev* __restrict__ rows,                          \
        const unsigned* __restrict__ tables, int shared, int k, int window, const float* __restrict__ pool, \
        int n_layers, int block_size, int n_kv_heads, int head_dim, int group, float scale,             \
        float* __restrict__ out
#define ATTN_ARGS \
    qkv, ld, rows, tables, shared, k, window, pool, n_layers, block_size, n_kv_heads, head_dim, group, scale, out

extern "C" __global__ void __launch_bounds__(ATT_WARPS * WARP) attention_f32_d2(ATTN_PARAMS) {
    attention_body<2>(ATTN_ARGS);
}
extern "C" __global__ void __launch_bounds__(ATT_WARPS * WARP) attention_f32_d4(ATTN_PARAMS) {
    attention_body<4>(ATTN_ARGS);
}
extern "C" __global__ void __launch_bounds__(ATT_WARPS * WARP) attention_f32_d8(ATTN_PARAMS) {
    attention_body<8>(ATTN_ARGS);
}
