// Token selection on the GPU so only ids cross to the host: greedy argmax and top-k per row
// of logits. Order: larger value first, lower index first among equal values; NaN counts as
// -inf. One block per row.

#define SEL_THREADS 256

__device__ __forceinline__ bool better(float v, unsigned i, float bv, unsigned bi) {
    return v > bv || (v == bv && i < bi);
}

// The best element of row `x` strictly after (prev_v, prev_i) in the order above (all of
// them when `first`). Every thread gets the result.
__device__ __forceinline__ void block_best(const float* __restrict__ x, int vocab, bool first, float prev_v,
                                           unsigned prev_i, float* out_v, unsigned* out_i) {
    __shared__ float sv[SEL_THREADS / 32];
    __shared__ unsigned si[SEL_THREADS / 32];
    float bv = NEG_INF;
    unsigned bi = 0xffffffffu;
    for (int j = threadIdx.x; j < vocab; j += SEL_THREADS) {
        float v = x[j];
        if (v != v) v = NEG_INF;
        const bool eligible = first || better(prev_v, prev_i, v, (unsigned)j);
        if (eligible && better(v, (unsigned)j, bv, bi)) {
            bv = v;
            bi = (unsigned)j;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const unsigned oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        sv[warp] = bv;
        si[warp] = bi;
    }
    __syncthreads();
    bv = sv[0];
    bi = si[0];
#pragma unroll
    for (int w = 1; w < SEL_THREADS / 32; ++w)
        if (better(sv[w], si[w], bv, bi)) {
            bv = sv[w];
            bi = si[w];
        }
    *out_v = bv;
    *out_i = bi;
}

extern "C" __global__ void __launch_bounds__(SEL_THREADS)
    argmax_rows_f32(const float* __restrict__ logits, int vocab, unsigned* __restrict__ ids) {
    float v;
    unsigned i;
    block_best(logits + (size_t)blockIdx.x * vocab, vocab, true, 0.0f, 0u, &v, &i);
    if (threadIdx.x == 0) ids[blockIdx.x] = i;
}

// The k best (value, id) of each row, best first: k rounds of a block argmax, each round
// restricted to the elements after the previous pick in the order, so no list is kept.
extern "C" __global__ void __launch_bounds__(SEL_THREADS)
    topk_rows_f32(const float* __restrict__ logits, int vocab, int k, unsigned* __restrict__ ids,
                  float* __restrict__ vals) {
    const float* x = logits + (size_t)blockIdx.x * vocab;
    float v = 0.0f;
    unsigned i = 0;
    for (int r = 0; r < k; ++r) {
        block_best(x, vocab, r == 0, v, i, &v, &i);
        if (threadIdx.x == 0) {
            ids[(size_t)blockIdx.x * k + r] = i;
            vals[(size_t)blockIdx.x * k + r] = v;
        }
    }
}

// What greedy decoding and the softmax exit tests need of each row, so the logits stay here:
// the argmax id, the largest and second-largest values (the same order as above: a repeated
// maximum is its own second) and sum_j exp(x_j - max) accumulated in double (NaN counts as
// -inf, contributing 0).
struct HeadTopDev {
    unsigned id;
    float top;
    float second;
    unsigned pad_;
    double sum_exp;
};

extern "C" __global__ void __launch_bounds__(SEL_THREADS)
    head_top_rows_f32(const float* __restrict__ logits, int vocab, HeadTopDev* __restrict__ out) {
    const float* x = logits + (size_t)blockIdx.x * vocab;
    float v1, v2;
    unsigned i1, i2;
    block_best(x, vocab, true, 0.0f, 0u, &v1, &i1);
    block_best(x, vocab, false, v1, i1, &v2, &i2);
    double s = 0.0;
    for (int j = threadIdx.x; j < vocab; j += SEL_THREADS) {
        const float v = x[j];
        if (v == v) s += exp((double)(v - v1));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    __shared__ double ss[SEL_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) ss[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
#pragma unroll
        for (int w = 0; w < SEL_THREADS / 32; ++w) t += ss[w];
        HeadTopDev h;
        h.id = i1;
        h.top = v1;
        h.second = v2;
        h.pad_ = 0u;
        h.sum_exp = t;
        out[blockIdx.x] = h;
    }
}
