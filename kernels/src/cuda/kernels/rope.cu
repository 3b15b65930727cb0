// Rotary embeddings, rotate-half convention: within each head, element i pairs with
// i + half. Angles in f64 (`pos * inv_freq`, the frequencies already scaled on the host) so
// long positions lose no precision; the rotation itself in f32 like the CPU oracle.

extern "C" __global__ void rope_f32(float* __restrict__ qkv, int ld, const unsigned* __restrict__ positions,
                                    const double* __restrict__ inv_freq, int half, int head_dim, int q_cols,
                                    int k_col0, int k_cols) {
    float* row = qkv + (size_t)blockIdx.x * ld;
    const double pos = (double)positions[blockIdx.x];
    const int q_heads = q_cols / head_dim;
    const int heads = q_heads + k_cols / head_dim;
    for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
        const int h = idx / half, i = idx % half;
        float* head = h < q_heads ? row + h * head_dim : row + k_col0 + (h - q_heads) * head_dim;
        double s, c;
        sincos(pos * inv_freq[i], &s, &c);
        const float cf = (float)c, sf = (float)s;
        const float x0 = head[i], x1 = head[i + half];
        head[i] = x0 * cf - x1 * sf;
        head[i + half] = x1 * cf + x0 * sf;
    }
}
