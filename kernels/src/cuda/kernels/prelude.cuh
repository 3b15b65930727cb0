// Shared by every kernel family of the CUDA backend (prepended to each family's source before
// NVRTC compiles it). No system headers: NVRTC needs none, and the bf16/f16 conversions and
// the tensor-core instruction are written as inline PTX so the sources compile anywhere.
//
// Weight element types are 16-bit storage words (`u16`); `WBf16` and `WF16` say how to read
// them. Activations are f32 in global memory; accumulation is always f32.

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#define WARP 32

// One row of a pass (the attention and KV-write kernels): its unrolled layer at shared layer
// k is depth * shared + k; its block table starts at `table` in the pass's table array.
struct RowDev {
    int pos;
    int depth;
    int table;
    int pad_;
};
#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Two f32 to a packed pair: `lo` in bits 0..15, `hi` in bits 16..31 (the order the mma
// fragments expect: the lower column in the lower half).
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// How to read and write one weight word, and the tensor-core product of that type.
struct WBf16 {
    static __device__ __forceinline__ float load(u16 h) { return bf16_to_f32(h); }
    static __device__ __forceinline__ u32 pack(float lo, float hi) { return pack_bf16x2(lo, hi); }
    // d += a * b for one m16n8k16 tile (row-major A, column-major B, f32 accumulators).
    static __device__ __forceinline__ void mma(float* d, const u32* a, const u32* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

struct WF16 {
    static __device__ __forceinline__ float load(u16 h) { return f16_to_f32(h); }
    static __device__ __forceinline__ u32 pack(float lo, float hi) { return pack_f16x2(lo, hi); }
    static __device__ __forceinline__ void mma(float* d, const u32* a, const u32* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

// Eight weights of a 16-byte word, unpacked to f32.
template <class W>
__device__ __forceinline__ void unpack8(uint4 v, float* out) {
    const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = W::load((u16)(words[i] & 0xffffu));
        out[2 * i + 1] = W::load((u16)(words[i] >> 16));
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// `n` (<= 8) f32 of row `xr` from column `kk`, zero past column `k`. Vector loads when the
// row stride allows them (`vec`: row starts 16-byte aligned) and the 8 values are inside.
__device__ __forceinline__ void load_x8(const float* xr, int kk, int k, bool vec, float* v) {
    if (vec && kk + 8 <= k) {
        const float4 a = __ldg(reinterpret_cast<const float4*>(xr + kk));
        const float4 b = __ldg(reinterpret_cast<const float4*>(xr + kk + 4));
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = (kk + i < k) ? __ldg(xr + kk + i) : 0.0f;
    }
}

__device__ __forceinline__ float4 load_x4(const float* xr, int kk, int k, bool vec) {
    if (vec && kk + 4 <= k) return __ldg(reinterpret_cast<const float4*>(xr + kk));
    float4 r;
    r.x = (kk + 0 < k) ? __ldg(xr + kk + 0) : 0.0f;
    r.y = (kk + 1 < k) ? __ldg(xr + kk + 1) : 0.0f;
    r.z = (kk + 2 < k) ? __ldg(xr + kk + 2) : 0.0f;
    r.w = (kk + 3 < k) ? __ldg(xr + kk + 3) : 0.0f;
    return r;
}
