// Row-wise reductions: RMSNorm (optionally over selected rows, optionally fused with the
// residual add), a normed residual branch (sandwich norms), the cosine similarity of the
// saturation exit test and the dot product of the exit gate. One block per row.

#define NORM_THREADS 256

// Sum over the block; every thread gets the result. `red` holds NORM_THREADS / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // `red` may still be read by a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < NORM_THREADS / 32; ++i) s += red[i];
    return s;
}

__device__ __forceinline__ void rmsnorm_row(const float* __restrict__ xr, const float* __restrict__ w, float eps,
                                            float* __restrict__ outr, int dim) {
    __shared__ float red[NORM_THREADS / 32];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += NORM_THREADS) ss = fmaf(xr[i], xr[i], ss);
    const float total = block_sum(ss, red);
    const float scale = 1.0f / sqrtf(total / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += NORM_THREADS) outr[i] = (xr[i] * scale) * w[i];
}

// out[i] = rmsnorm(x[rows ? rows[i] : i]) * w.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    rmsnorm_f32(const float* __restrict__ x, const unsigned* __restrict__ rows, const float* __restrict__ w,
                float eps, float* __restrict__ out, int dim) {
    const size_t src = rows != nullptr ? rows[blockIdx.x] : blockIdx.x;
    rmsnorm_row(x + src * dim, w, eps, out + (size_t)blockIdx.x * dim, dim);
}

// x += r, then out = rmsnorm(x) * w (the residual add fused with the next layer's norm).
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    add_rmsnorm_f32(float* __restrict__ x, const float* __restrict__ r, const float* __restrict__ w, float eps,
                    float* __restrict__ out, int dim) {
    float* xr = x + (size_t)blockIdx.x * dim;
    const float* rr = r + (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += NORM_THREADS) xr[i] += rr[i];
    __syncthreads();
    rmsnorm_row(xr, w, eps, out + (size_t)blockIdx.x * dim, dim);
}

// x[i] += rmsnorm(t[i]) * w: a residual branch normed before it is added (Ouro's second norms).
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    add_normed_branch_f32(float* __restrict__ x, const float* __restrict__ t, const float* __restrict__ w,
                          float eps, int dim) {
    __shared__ float red[NORM_THREADS / 32];
    const float* tr = t + (size_t)blockIdx.x * dim;
    float* xr = x + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += NORM_THREADS) ss = fmaf(tr[i], tr[i], ss);
    const float total = block_sum(ss, red);
    const float scale = 1.0f / sqrtf(total / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += NORM_THREADS) xr[i] += (tr[i] * scale) * w[i];
}

// out[i] = sum_j x[rows[i], j] * w[j], accumulated in f64 like the CPU oracle.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    dot_rows_f32(const float* __restrict__ x, const unsigned* __restrict__ rows, const float* __restrict__ w,
                 int width, float* __restrict__ out) {
    __shared__ double red[NORM_THREADS / 32];
    const float* xr = x + (size_t)rows[blockIdx.x] * width;
    double s = 0.0;
    for (int i = threadIdx.x; i < width; i += NORM_THREADS) s += (double)xr[i] * (double)w[i];
    s = warp_sum_f64(s);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0.0;
        for (int i = 0; i < NORM_THREADS / 32; ++i) t += red[i];
        out[blockIdx.x] = (float)t;
    }
}

// out[i] = cos(a[rows[i]], b[rows[i]]), accumulated in f64 like the CPU oracle.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
    cosine_rows_f32(const float* __restrict__ a, const float* __restrict__ b, const unsigned* __restrict__ rows,
                    int width, float* __restrict__ out) {
    __shared__ double red[3][NORM_THREADS / 32];
    const size_t r = rows[blockIdx.x];
    const float* ar = a + r * width;
    const float* br = b + r * width;
    double ab = 0.0, aa = 0.0, bb = 0.0;
    for (int i = threadIdx.x; i < width; i += NORM_THREADS) {
        const double x = ar[i], y = br[i];
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab = warp_sum_f64(ab);
    aa = warp_sum_f64(aa);
    bb = warp_sum_f64(bb);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        red[0][warp] = ab;
        red[1][warp] = aa;
        red[2][warp] = bb;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double s[3] = {0.0, 0.0, 0.0};
        for (int k = 0; k < 3; ++k)
            for (int i = 0; i < NORM_THREADS / 32; ++i) s[k] += red[k][i];
        out[blockIdx.x] = (float)(s[0] / fmax(sqrt(s[1]) * sqrt(s[2]), 1e-30));
    }
}
