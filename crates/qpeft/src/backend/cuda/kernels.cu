// The CUDA backend's kernels: one thread per element for the element-wise ops, one block per row for the row
// reductions (rmsnorm, cross-entropy, attention softmax), and the frozen weights' dequantization and bf16
// conversion. Activations are f32; matrix products are cuBLAS (gemm.rs); the fused attention kernels are in
// flash.cu, appended to this file. Compiled at run time by NVRTC; no headers needed. Semantics mirror the CPU
// backend (backend/cpu/mod.rs), which the parity tests compare against.

// NVRTC has no math.h: +∞ from its bit pattern.
#define INFINITY __int_as_float(0x7f800000)

typedef unsigned int u32;
typedef unsigned long long u64;

#define GRID_STRIDE(i, n) for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)blockDim.x * gridDim.x)

struct Add {
    template <typename T>
    __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Block-wide reduction of one value per thread (blockDim.x a multiple of 32, at most 1024): within each warp by
// shuffles, then across the warps through `scratch` (32 slots). Every thread gets the result.
template <typename T, typename Op>
__device__ T block_reduce(T v, T* scratch, T init, Op op) {
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T t = init;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) t = op(t, scratch[w]);
    return t;
}

template <typename T>
__device__ T block_sum(T v, T* scratch) { return block_reduce(v, scratch, (T)0, Add()); }

__device__ float block_max(float v, float* scratch) { return block_reduce(v, scratch, -INFINITY, Max()); }

typedef unsigned short bf16;

// f32 → bf16 bits, round to nearest even (NaN stays NaN): one instruction from compute capability 8.0 on, which
// matters where conversion is most of a kernel's work (the 4-bit dequantization).
__device__ bf16 to_bf16_bits(float x) {
#if __CUDA_ARCH__ >= 800
    bf16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#else
    u32 u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    return (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

// Two bf16 values in one word, the first at the lower address.
__device__ u32 bf16_pair(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
#else
    return (u32)to_bf16_bits(lo) | ((u32)to_bf16_bits(hi) << 16);
#endif
}

struct MaxBits {
    __device__ u32 operator()(u32 a, u32 b) const { return max(a, b); }
};

// Where value i of a tensor with rows of `cols` values goes in a copy with rows of `ld` (≥ cols): room after each row
// for a product's tail (backend::Tail). A 32-bit division where i fits (a 64-bit one is dozens of instructions).
__device__ long long strided(long long i, int cols, int ld) {
    if (ld == cols) return i;
    if (i < 0xffffffffll) {
        u32 r = (u32)i / (u32)cols;
        return (long long)r * ld + ((u32)i - r * (u32)cols);
    }
    return (i / cols) * ld + i % cols;
}

// A kernel that writes an operand's values may make the operand in the same pass (operand.rs, `Produced`): in bf16 it
// writes the copy (rows of `cols` values at a row stride of `ld`), in f16 the largest magnitude it wrote (f32 bits, as
// `absmax`), through `put` for each value and `finish` once every thread of the block is done.
struct Producing {
    bf16* half;
    int cols, ld;
    u32* amax;
    u32 m;
    __device__ Producing(bf16* half, int cols, int ld, u32* amax) : half(half), cols(cols), ld(ld), amax(amax), m(0) {}
    // Value i of the [rows, cols] output.
    __device__ void put(long long i, float v) {
        if (half) half[strided(i, cols, ld)] = to_bf16_bits(v);
        if (amax) m = max(m, __float_as_uint(fabsf(v)));
    }
    // Values i..i+3 of one row (i a multiple of 4; cols and ld too, which `quads_fit` checks): one 8-byte store.
    __device__ void put4(long long i, float4 v) {
        if (half) {
            reinterpret_cast<uint2*>(half + strided(i, cols, ld))[0] = make_uint2(bf16_pair(v.x, v.y), bf16_pair(v.z, v.w));
        }
        if (amax) m = max(m, max(max(__float_as_uint(fabsf(v.x)), __float_as_uint(fabsf(v.y))), max(__float_as_uint(fabsf(v.z)), __float_as_uint(fabsf(v.w)))));
    }
    // Whether n values go four at a time through put4.
    __device__ bool quads_fit(long long n) const { return n % 4 == 0 && cols % 4 == 0 && ld % 4 == 0; }
    __device__ void finish(u32* scratch) {
        if (!amax) return;
        u32 t = block_reduce(m, scratch, 0u, MaxBits());
        if (threadIdx.x == 0) atomicMax(amax, t);
    }
};

// fp16 bits → f32 (exact).
__device__ float f16_bits_to_float(unsigned short h) {
    float y;
    asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(h));
    return y;
}

// A table of f32 (format 0), bf16 bits (1) or fp16 bits (2).
extern "C" __global__ void embedding(const void* table, int format, const u32* ids, long long rows, int dim, float scale, float* out) {
    const unsigned short* h = (const unsigned short*)table;
    GRID_STRIDE(i, rows * dim) {
        long long at = (long long)ids[i / dim] * dim + i % dim;
        float w = format == 0 ? ((const float*)table)[at] : format == 1 ? __uint_as_float((u32)h[at] << 16) : f16_bits_to_float(h[at]);
        out[i] = w * scale;
    }
}

extern "C" __global__ void add_bias(float* x, const float* bias, long long n, int dim) {
    GRID_STRIDE(i, n) x[i] += bias[i % dim];
}

extern "C" __global__ void add(float* x, const float* y, long long n) {
    GRID_STRIDE(i, n) x[i] += y[i];
}

extern "C" __global__ void scale(float* x, float s, long long n) {
    GRID_STRIDE(i, n) x[i] *= s;
}

extern "C" __global__ void add_scaled_by(float* y, const float* x, const float* s, float factor, long long n) {
    float a = factor * s[0];
    GRID_STRIDE(i, n) y[i] += a * x[i];
}

// (mean x² + eps)^−½ from the row's sum of squares in f64, as the CPU computes it (f32 sqrt of the f32-rounded mean).
__device__ float inv_rms_of(double squares, int dim, float eps) { return 1.0f / sqrtf((float)(squares / dim) + eps); }

// A row of a norm, up to ROW_QUADS float4s per thread in registers, so that it is read from memory once: rows of a
// multiple of 4 values and at most 4·ROW_QUADS·blockDim (4,096 at 256 threads: LLaMA-7B's hidden size); `fits` says
// whether a row does. Quad j of this thread is quad threadIdx.x + j·blockDim of the row.
#define ROW_QUADS 4
struct RowQuads {
    float4 v[ROW_QUADS];
    __device__ static bool fits(int dim) { return dim % 4 == 0 && dim <= 4 * ROW_QUADS * (int)blockDim.x; }
    __device__ static int at(int j) { return threadIdx.x + j * blockDim.x; }
    __device__ void load(const float* row, int dim) {
#pragma unroll
        for (int j = 0; j < ROW_QUADS; j++)
            if (at(j) < dim / 4) v[j] = reinterpret_cast<const float4*>(row)[at(j)];
    }
    // This thread's share of Σ a·b over the row in f64 (as the CPU sums squares).
    __device__ double dot(const RowQuads& b, int dim) const {
        double s = 0.0;
#pragma unroll
        for (int j = 0; j < ROW_QUADS; j++)
            if (at(j) < dim / 4)
                s += (double)v[j].x * b.v[j].x + (double)v[j].y * b.v[j].y + (double)v[j].z * b.v[j].z + (double)v[j].w * b.v[j].w;
        return s;
    }
};

// (mean x² + eps)^−½ with the mean in f64, as the CPU computes it (f32 sqrt of the f32-rounded mean).
__device__ float inv_rms(const float* x, int dim, float eps, double* scratch) {
    double s = 0.0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += (double)x[i] * (double)x[i];
    return inv_rms_of(block_sum(s, scratch), dim, eps);
}

// Also makes out's operand (`Producing`) where half or amax is given. Blocks take rows in turn (at most a few thousand
// blocks: one atomicMax each). A row that `RowQuads` fits is read once, into registers.
extern "C" __global__ void rmsnorm(const float* x, const float* w, int dim, float eps, int plus_one, float* out, long long rows, bf16* half, int ld, u32* amax) {
    __shared__ double scratch[32];
    __shared__ u32 mscratch[32];
    Producing p(half, dim, ld, amax);
    bool quads = p.quads_fit(dim), in_registers = quads && RowQuads::fits(dim);
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
        long long at = row * dim;
        const float* xr = x + at;
        float* o = out + at;
        auto norm = [&](float xi, float wi, float r) { return plus_one ? (xi * r) * (1.0f + wi) : wi * (xi * r); };
        if (in_registers) {
            RowQuads xs;
            xs.load(xr, dim);
            float r = inv_rms_of(block_sum(xs.dot(xs, dim), scratch), dim, eps);
#pragma unroll
            for (int j = 0; j < ROW_QUADS; j++) {
                int i = RowQuads::at(j);
                if (i >= dim / 4) continue;
                float4 a = xs.v[j], b = reinterpret_cast<const float4*>(w)[i];
                float4 v = make_float4(norm(a.x, b.x, r), norm(a.y, b.y, r), norm(a.z, b.z, r), norm(a.w, b.w, r));
                reinterpret_cast<float4*>(o)[i] = v;
                p.put4(at + 4 * i, v);
            }
            continue;
        }
        float r = inv_rms(xr, dim, eps, scratch);
        if (quads) {
            for (int i = 4 * threadIdx.x; i < dim; i += 4 * blockDim.x) {
                float4 a = *reinterpret_cast<const float4*>(xr + i), b = *reinterpret_cast<const float4*>(w + i);
                float4 v = make_float4(norm(a.x, b.x, r), norm(a.y, b.y, r), norm(a.z, b.z, r), norm(a.w, b.w, r));
                *reinterpret_cast<float4*>(o + i) = v;
                p.put4(at + i, v);
            }
        } else {
            for (int i = threadIdx.x; i < dim; i += blockDim.x) {
                o[i] = norm(xr[i], w[i], r);
                p.put(at + i, o[i]);
            }
        }
    }
    p.finish(mscratch);
}

// dx (+)= r·w'⊙dy − x·r³·Σ(w'⊙dy⊙x)/dim, w' = w (or 1 + w), one block per row; x and dy in registers where `RowQuads`
// fits the row.
extern "C" __global__ void rmsnorm_backward(const float* x, const float* w, const float* dy, int dim, float eps, int plus_one, float* dx, int accumulate) {
    __shared__ double scratch[32];
    __shared__ float fscratch[32];
    long long base = (long long)blockIdx.x * dim;
    auto wt = [&](float wi) { return plus_one ? 1.0f + wi : wi; };
    if (RowQuads::fits(dim)) {
        // gs: the gains w' (as the CPU, r·w'·dy rounds r·w' first).
        RowQuads xs, ds, gs;
        xs.load(x + base, dim);
        ds.load(dy + base, dim);
        gs.load(w, dim);
#pragma unroll
        for (int j = 0; j < ROW_QUADS; j++)
            if (RowQuads::at(j) < dim / 4) gs.v[j] = make_float4(wt(gs.v[j].x), wt(gs.v[j].y), wt(gs.v[j].z), wt(gs.v[j].w));
        float p = 0.0f;
#pragma unroll
        for (int j = 0; j < ROW_QUADS; j++) {
            if (RowQuads::at(j) >= dim / 4) continue;
            float4 a = xs.v[j], d = ds.v[j], g = gs.v[j];
            p += g.x * d.x * a.x + g.y * d.y * a.y + g.z * d.z * a.z + g.w * d.w * a.w;
        }
        float r = inv_rms_of(block_sum(xs.dot(xs, dim), scratch), dim, eps);
        float c = r * r * r * block_sum(p, fscratch) / (float)dim;
#pragma unroll
        for (int j = 0; j < ROW_QUADS; j++) {
            int i = RowQuads::at(j);
            if (i >= dim / 4) continue;
            float4 a = xs.v[j], d = ds.v[j], g = gs.v[j];
            float4 v = make_float4(r * g.x * d.x - a.x * c, r * g.y * d.y - a.y * c, r * g.z * d.z - a.z * c, r * g.w * d.w - a.w * c);
            float4* out = reinterpret_cast<float4*>(dx + base) + i;
            if (accumulate) {
                float4 o = *out;
                v = make_float4(o.x + v.x, o.y + v.y, o.z + v.z, o.w + v.w);
            }
            *out = v;
        }
        return;
    }
    float r = inv_rms(x + base, dim, eps, scratch);
    float p = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) p += wt(w[i]) * dy[base + i] * x[base + i];
    float c = r * r * r * block_sum(p, fscratch) / (float)dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float g = r * wt(w[i]) * dy[base + i] - x[base + i] * c;
        dx[base + i] = accumulate ? dx[base + i] + g : g;
    }
}

// Rotates each head's pair (x[j], x[j + half]) by ±positions[r]·inv_freq[j]; one thread per (row, pair) over every
// head, so that the angle's cosine and sine (a few dozen instructions each) are computed once for all the heads.
extern "C" __global__ void rope(float* x, const u32* positions, const float* inv_freq, long long rows, int heads, int head_dim, int inverse) {
    int half = head_dim / 2;
    GRID_STRIDE(i, rows * half) {
        long long r = i / half;
        int j = (int)(i - r * half);
        float a = (float)positions[r] * inv_freq[j];
        float c = cosf(a), s = inverse ? -sinf(a) : sinf(a);
        float* p = x + r * heads * head_dim + j;
#pragma unroll 4
        for (int h = 0; h < heads; h++, p += head_dim) {
            float x1 = p[0], x2 = p[half];
            p[0] = x1 * c - x2 * s;
            p[half] = x2 * c + x1 * s;
        }
    }
}

// act(z) and act'(z): 0 = SiLU (z / (1 + e^−z), as torch), 1 = tanh-approximated GELU.
__device__ void activation(int kind, float z, float* a, float* da) {
    if (kind == 0) {
        float e = 1.0f + expf(-z), s = 1.0f / e;
        *a = z / e;
        *da = s * (1.0f + z * (1.0f - s));
    } else {
        const float c = 0.7978845608028654f, k = 0.044715f;
        float t = tanhf(c * (z + k * z * z * z));
        *a = 0.5f * z * (1.0f + t);
        *da = 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * c * (1.0f + 3.0f * k * z * z);
    }
}

// Also makes out's operand (`Producing`, rows of `cols`) where half or amax is given. Four values per step where the
// rows allow; a capped grid (operand.rs, `producing_grid`), each block ending in one atomicMax.
extern "C" __global__ void glu(const float* gate, const float* up, int kind, float* out, long long n, bf16* half, int cols, int ld, u32* amax) {
    __shared__ u32 mscratch[32];
    Producing p(half, cols, ld, amax);
    auto f = [&](float g, float u) {
        float a, da;
        activation(kind, g, &a, &da);
        return a * u;
    };
    long long quads = p.quads_fit(n) ? n >> 2 : 0;
    GRID_STRIDE(t, quads) {
        float4 g = reinterpret_cast<const float4*>(gate)[t], u = reinterpret_cast<const float4*>(up)[t];
        float4 v = make_float4(f(g.x, u.x), f(g.y, u.y), f(g.z, u.z), f(g.w, u.w));
        reinterpret_cast<float4*>(out)[t] = v;
        p.put4(t << 2, v);
    }
    GRID_STRIDE(r, n - (quads << 2)) {
        long long i = (quads << 2) + r;
        out[i] = f(gate[i], up[i]);
        p.put(i, out[i]);
    }
    p.finish(mscratch);
}

// Also makes the operands of dgate and dup (`Producing`, rows of `cols`; each its own copy or maximum) where given, as
// `glu`.
extern "C" __global__ void glu_backward(const float* gate, const float* up, const float* dy, int kind, float* dgate, float* dup, long long n,
                                        int cols, bf16* half_gate, int ld_gate, u32* amax_gate, bf16* half_up, int ld_up, u32* amax_up) {
    __shared__ u32 mscratch[32];
    Producing pg(half_gate, cols, ld_gate, amax_gate), pu(half_up, cols, ld_up, amax_up);
    // (dgate, dup) of one value.
    auto f = [&](float g, float u, float d) {
        float a, da;
        activation(kind, g, &a, &da);
        return make_float2(d * u * da, d * a);
    };
    long long quads = pg.quads_fit(n) && pu.quads_fit(n) ? n >> 2 : 0;
    GRID_STRIDE(t, quads) {
        float4 g = reinterpret_cast<const float4*>(gate)[t], u = reinterpret_cast<const float4*>(up)[t], d = reinterpret_cast<const float4*>(dy)[t];
        float2 x = f(g.x, u.x, d.x), y = f(g.y, u.y, d.y), z = f(g.z, u.z, d.z), w = f(g.w, u.w, d.w);
        float4 vg = make_float4(x.x, y.x, z.x, w.x), vu = make_float4(x.y, y.y, z.y, w.y);
        reinterpret_cast<float4*>(dgate)[t] = vg;
        reinterpret_cast<float4*>(dup)[t] = vu;
        pg.put4(t << 2, vg);
        pu.put4(t << 2, vu);
    }
    GRID_STRIDE(r, n - (quads << 2)) {
        long long i = (quads << 2) + r;
        float2 v = f(gate[i], up[i], dy[i]);
        dgate[i] = v.x;
        dup[i] = v.y;
        pg.put(i, v.x);
        pu.put(i, v.y);
    }
    pg.finish(mscratch);
    pu.finish(mscratch);
}

extern "C" __global__ void write_rows(const float* src, float* dst, int batch, int rows, int capacity, int start, int width) {
    GRID_STRIDE(i, (long long)batch * rows * width) {
        long long b = i / ((long long)rows * width), rest = i % ((long long)rows * width);
        dst[(b * capacity + start) * width + rest] = src[i];
    }
}

// (max, Σ exp(x − max)) of one row of logits, the sum in f64 as the CPU's softmax_stats.
__device__ void softmax_stats(const float* row, int vocab, float* m_out, double* s_out) {
    __shared__ float fs[32];
    __shared__ double ds[32];
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, row[i]);
    m = block_max(m, fs);
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += exp((double)(row[i] - m));
    *m_out = m;
    *s_out = block_sum(s, ds);
}

// Per row: −log softmax(logits)[target] (0 where target == ignore).
extern "C" __global__ void cross_entropy(const float* logits, const u32* targets, int vocab, u32 ignore, float* out) {
    u32 t = targets[blockIdx.x];
    const float* row = logits + (long long)blockIdx.x * vocab;
    if (t == ignore) {
        if (threadIdx.x == 0) out[blockIdx.x] = 0.0f;
        return;
    }
    float m;
    double s;
    softmax_stats(row, vocab, &m, &s);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)((double)m + log(s) - (double)row[t]);
}

extern "C" __global__ void cross_entropy_backward(const float* logits, const u32* targets, int vocab, u32 ignore, float scale, float* dlogits) {
    u32 t = targets[blockIdx.x];
    const float* row = logits + (long long)blockIdx.x * vocab;
    float* d = dlogits + (long long)blockIdx.x * vocab;
    if (t == ignore) {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) d[i] = 0.0f;
        return;
    }
    float m;
    double s;
    softmax_stats(row, vocab, &m, &s);
    float inv = (float)(1.0 / s);
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) d[i] = scale * expf(row[i] - m) * inv - (i == (int)t ? scale : 0.0f);
}

// Per-block partial sums of a ⊙ b in f64 (a fixed grid, so that the ordered sum of the partials is reproducible).
extern "C" __global__ void dot_partials(const float* a, const float* b, long long n, double* partial) {
    __shared__ double scratch[32];
    double s = 0.0;
    GRID_STRIDE(i, n) s += (double)a[i] * (double)b[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out[0] (+)= factor · Σ partial, in order (one thread).
extern "C" __global__ void dot_finish(const double* partial, int blocks, float factor, float* out, int accumulate) {
    double s = 0.0;
    for (int i = 0; i < blocks; i++) s += partial[i];
    float d = factor * (float)s;
    out[0] = accumulate ? out[0] + d : d;
}

// Feature i of a row of `width` is in group ⌊i·groups/width⌋; group g covers [⌈g·w/G⌉, ⌈(g+1)·w/G⌉).
__device__ long long group_start(long long g, long long width, long long groups) { return (g * width + groups - 1) / groups; }

extern "C" __global__ void group_reduce(const float* x, long long rows, int width, int groups, int mean, float scale, float* out, int accumulate) {
    GRID_STRIDE(i, rows * groups) {
        long long r = i / groups, g = i % groups;
        long long a = group_start(g, width, groups), b = group_start(g + 1, width, groups);
        float s = 0.0f;
        for (long long j = a; j < b; j++) s += x[r * width + j];
        float v = scale * s / (mean ? (float)(b - a) : 1.0f);
        out[i] = accumulate ? out[i] + v : v;
    }
}

extern "C" __global__ void group_expand(const float* h, long long rows, int width, int groups, int mean, float scale, float* y, int accumulate) {
    GRID_STRIDE(i, rows * width) {
        long long r = i / width, j = i % width;
        long long g = j * groups / width;
        long long a = group_start(g, width, groups), b = group_start(g + 1, width, groups);
        float v = scale * h[r * groups + g] / (mean ? (float)(b - a) : 1.0f);
        y[i] = accumulate ? y[i] + v : v;
    }
}

// The CPU's dropout_keeps: SplitMix64 of (seed, i), 24 bits to a uniform in [0, 1).
extern "C" __global__ void dropout(const float* x, float p, u64 seed, u64 first, float* out, long long n) {
    float keep = 1.0f / (1.0f - p);
    GRID_STRIDE(i, n) {
        u64 z = seed ^ ((first + (u64)i) * 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        out[i] = u >= p ? x[i] * keep : 0.0f;
    }
}

// ---- optimizer ----

struct AdamStep {
    float beta1, beta2, eps, weight_decay, lr, c1, c2, grad_coef;
};

// bitsandbytes' 32-bit AdamW, rounded step by step like the CPU's (no FMA contraction).
extern "C" __global__ void adamw(float* p, const float* g, float* m, float* v, AdamStep s, long long n) {
    float step_size = -s.lr * s.c2 / s.c1, eps_c2 = s.eps * s.c2, decay = __fsub_rn(1.0f, __fmul_rn(s.lr, s.weight_decay));
    float one_b1 = 1.0f - s.beta1, one_b2 = 1.0f - s.beta2;
    GRID_STRIDE(i, n) {
        float gi = __fmul_rn(g[i], s.grad_coef);
        float mi = __fadd_rn(__fmul_rn(s.beta1, m[i]), __fmul_rn(one_b1, gi));
        float vi = __fadd_rn(__fmul_rn(s.beta2, v[i]), __fmul_rn(__fmul_rn(one_b2, gi), gi));
        float pi = __fadd_rn(p[i], __fmul_rn(step_size, __fdiv_rn(mi, __fadd_rn(__fsqrt_rn(vi), eps_c2))));
        if (s.weight_decay > 0.0f) pi = __fmul_rn(pi, decay);
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
    }
}

// Nearest entry of the sorted 256-entry `code` to y, a tie going to the even index (the CPU's adam8::nearest).
__device__ unsigned char nearest_code(const float* code, float y) {
    int lo = 0, hi = 256;  // first index whose entry is > y
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (code[mid] <= y) lo = mid + 1; else hi = mid;
    }
    if (lo == 0) return 0;
    if (lo == 256) return 255;
    int a = lo - 1;
    float mid = __fmul_rn(__fadd_rn(code[a], code[lo]), 0.5f);
    return (y < mid || (y == mid && a % 2 == 0)) ? a : lo;
}

// bitsandbytes' block-wise 8-bit AdamW, one thread block per 256-element absmax block, rounded step by step like the
// CPU's (backend/cpu/adam8.rs). `ds`, `du`: the signed and unsigned dynamic maps.
extern "C" __global__ void adamw_8bit(float* p, const float* g, unsigned char* mc, float* ma, unsigned char* vc, float* va,
                                      const float* ds_g, const float* du_g, AdamStep s, long long n) {
    __shared__ float ds[256], du[256], m_red[256], v_red[256];
    int t = threadIdx.x;
    long long b = blockIdx.x, i = b * 256 + t;
    ds[t] = ds_g[t];
    du[t] = du_g[t];
    __syncthreads();
    float step_size = -s.lr * s.c2 / s.c1, eps_c2 = s.eps * s.c2, decay = __fsub_rn(1.0f, __fmul_rn(s.lr, s.weight_decay));
    float m = 0.0f, v = 0.0f;
    if (i < n) {
        float gi = __fmul_rn(g[i], s.grad_coef);
        if (isfinite(gi)) {
            m = __fadd_rn(__fmul_rn(s.beta1, __fmul_rn(ds[mc[i]], ma[b])), __fmul_rn(1.0f - s.beta1, gi));
            v = __fadd_rn(__fmul_rn(s.beta2, __fmul_rn(du[vc[i]], va[b])), __fmul_rn(__fmul_rn(1.0f - s.beta2, gi), gi));
            float pi = __fadd_rn(p[i], __fmul_rn(step_size, __fdiv_rn(m, __fadd_rn(__fsqrt_rn(v), eps_c2))));
            if (s.weight_decay > 0.0f) pi = __fmul_rn(pi, decay);
            p[i] = pi;
        }
    }
    m_red[t] = fabsf(m);
    v_red[t] = fabsf(v);
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
        if (t < w) {
            m_red[t] = fmaxf(m_red[t], m_red[t + w]);
            v_red[t] = fmaxf(v_red[t], v_red[t + w]);
        }
        __syncthreads();
    }
    float m_max = m_red[0], v_max = v_red[0];
    if (i < n) {
        int c = m_max > 0.0f ? nearest_code(ds, __fdiv_rn(m, m_max)) : 127;
        if ((signbit(ds[c]) != 0) != (signbit(m) != 0)) c = m > 0.0f ? min(c + 1, 255) : max(c - 1, 0);
        mc[i] = (unsigned char)c;
        vc[i] = v_max > 0.0f ? nearest_code(du, __fdiv_rn(v, v_max)) : 0;
    }
    if (t == 0) {
        ma[b] = m_max;
        va[b] = v_max;
    }
}

struct Attn {
    int batch, q_len, kv_len, kv_capacity, heads, kv_heads, head_dim;
    float scale;
    int window;  // 0: none
};

// Attention scores → probabilities, in place: one block per row of `cols` scores (already scaled), for queries
// q0..q0 + qn of sequence b; row ρ holds query q0 + ρ % qn, which sees cache indices lo..=ci that the key mask marks
// real. A query that sees no key (padding) gets zeros, as on the CPU.
extern "C" __global__ void attention_softmax(float* p, const u32* key_mask, Attn s, int b, int q0, int qn, int cols) {
    __shared__ float scratch[32];
    float* row = p + (long long)blockIdx.x * cols;
    int ci = s.kv_len - s.q_len + q0 + (int)(blockIdx.x % qn);
    int lo = s.window > 0 ? max(0, ci + 1 - s.window) : 0;
    const u32* mask = key_mask + (long long)b * s.kv_capacity;
    // The key mask holds segments (0 = padding): a real query sees its own segment's keys (packed examples), a
    // padding query every real key.
    u32 seg = ci < s.kv_len ? mask[ci] : 0u;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        if (j >= lo && j <= ci && mask[j] && (seg == 0 || mask[j] == seg)) m = fmaxf(m, row[j]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        float e = (m != -INFINITY && j >= lo && j <= ci && mask[j] && (seg == 0 || mask[j] == seg)) ? expf(row[j] - m) : 0.0f;
        row[j] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) row[j] *= inv;
}

// dS = P ⊙ (dP − rowsum(P ⊙ dP)), in place over dP; one block per row of `cols`.
extern "C" __global__ void attention_softmax_backward(const float* p, float* dp, int cols) {
    __shared__ float scratch[32];
    long long at = (long long)blockIdx.x * cols;
    float local = 0.0f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) local += p[at + j] * dp[at + j];
    float rowdot = block_sum(local, scratch);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) dp[at + j] = p[at + j] * (dp[at + j] - rowdot);
}

// ---- 16-bit operands: bf16 and fp16 conversion, 4-bit dequantization ----

// fp16 bits, as a type of its own so that `put` and `store16` overload on it.
struct f16 {
    unsigned short bits;
};

// f32 → f16 → f32, round to nearest even: AutoGPTQ's fp16 weights.
__device__ float f16_round(float x) {
    unsigned short h;
    float y;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    asm("cvt.f32.f16 %0, %1;" : "=f"(y) : "h"(h));
    return y;
}

// f32 → fp16 bits, round to nearest even (subnormals kept, beyond 65504 infinite).
__device__ unsigned short to_f16_bits(float x) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}

__device__ void put(float* out, long long i, float v) { out[i] = v; }
__device__ void put(bf16* out, long long i, float v) { out[i] = to_bf16_bits(v); }
__device__ void put(f16* out, long long i, float v) { out[i].bits = to_f16_bits(v); }

// Two fp16 values in one word, the first at the lower address (one instruction from compute capability 8.0 on).
__device__ u32 f16_pair(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
#else
    return (u32)to_f16_bits(lo) | ((u32)to_f16_bits(hi) << 16);
#endif
}

// backend::binary_exponent, f16_shift_for and 2^s (|s| ≤ 126): the f16 mode's power-of-two scales, chosen from a
// tensor's largest magnitude exactly as the CPU's emulation chooses them.
__device__ int binary_exponent(float x) {
    int b = (int)((__float_as_uint(x) >> 23) & 255u);
    return b == 255 ? 15 : b == 0 ? -126 : b - 126;
}
__device__ int f16_shift_for(int e) { return min(120, max(-120, 15 - e)); }
__device__ float pow2(int s) { return __uint_as_float((u32)(127 + s) << 23); }

// The largest |x| into *amax as f32 bits (non-negative floats order like their bits; a NaN beats every number).
// *amax must start at 0. Four values per 16-byte load (buffers are 256-byte aligned), then the tail. (Four loads in
// flight per thread measured the same on an H100: 66.6 → 65.0 ms per 7B step.)
extern "C" __global__ void absmax(const float* x, long long n, u32* amax) {
    __shared__ u32 scratch[32];
    u32 m = 0;
    long long quads = n >> 2;
    GRID_STRIDE(t, quads) {
        float4 a = reinterpret_cast<const float4*>(x)[t];
        m = max(max(m, max(__float_as_uint(fabsf(a.x)), __float_as_uint(fabsf(a.y)))), max(__float_as_uint(fabsf(a.z)), __float_as_uint(fabsf(a.w))));
    }
    GRID_STRIDE(i, n - (quads << 2)) m = max(m, __float_as_uint(fabsf(x[(quads << 2) + i])));
    m = block_reduce(m, scratch, 0u, MaxBits());
    if (threadIdx.x == 0) atomicMax(amax, m);
}

// Whether eight consecutive values of a row stay together and 16-byte aligned in the strided copy.
__device__ bool octets_fit(long long n, int cols, int ld) { return ld == cols || (cols % 8 == 0 && ld % 8 == 0); }

// fp16 of x·2^s with s = f16_shift_for(binary_exponent(*amax)), eight values per thread like to_bf16, rows of `cols`
// values written with a row stride of `ld`; a product's alpha goes to *inv_scale unless it is null: 2^−s · factor,
// times *times unless that is null (the other operand's 2^−s).
extern "C" __global__ void to_f16_scaled(const float* x, f16* out, long long n, int cols, int ld, const u32* amax,
                                         float* inv_scale, const float* times, float factor) {
    int s = f16_shift_for(binary_exponent(__uint_as_float(*amax)));
    float k = pow2(s);
    if (inv_scale && blockIdx.x == 0 && threadIdx.x == 0) *inv_scale = pow2(-s) * factor * (times ? *times : 1.0f);
    long long octets = octets_fit(n, cols, ld) ? n >> 3 : 0;
    GRID_STRIDE(t, octets) {
        float4 a = reinterpret_cast<const float4*>(x)[2 * t], b = reinterpret_cast<const float4*>(x)[2 * t + 1];
        reinterpret_cast<uint4*>(out + strided(t << 3, cols, ld))[0] =
            make_uint4(f16_pair(__fmul_rn(a.x, k), __fmul_rn(a.y, k)), f16_pair(__fmul_rn(a.z, k), __fmul_rn(a.w, k)),
                       f16_pair(__fmul_rn(b.x, k), __fmul_rn(b.y, k)), f16_pair(__fmul_rn(b.z, k), __fmul_rn(b.w, k)));
    }
    GRID_STRIDE(r, n - (octets << 3)) {
        long long i = (octets << 3) + r;
        put(out, strided(i, cols, ld), __fmul_rn(x[i], k));
    }
}

// A product's tail (backend::Tail) in 16 bits: the [rows, cols] f32 x into the [rows_out, cols_out] region at `out`
// (row stride ld), zero outside x, each value x·factor·2^(s₊ − s₋) rounded to fp16 (`f16`) or bf16, where s± is the
// f16 shift of *plus (*minus), 0 for a null pointer or in bf16. The two products round separately, as the CPU does.
extern "C" __global__ void to_half_region(const float* x, int rows, int cols, int rows_out, int cols_out, unsigned short* out,
                                          long long ld, int f16, const u32* plus, const u32* minus, float factor) {
    int s = 0;
    if (f16) {
        if (plus) s += f16_shift_for(binary_exponent(__uint_as_float(*plus)));
        if (minus) s -= f16_shift_for(binary_exponent(__uint_as_float(*minus)));
        s = min(120, max(-120, s));
    }
    float k = pow2(s);
    // 32-bit index arithmetic: the host keeps regions below 2^31 values.
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < (u32)rows_out * (u32)cols_out; i += blockDim.x * gridDim.x) {
        int r = (int)(i / (u32)cols_out), c = (int)(i % (u32)cols_out);
        float v = r < rows && c < cols ? __fmul_rn(__fmul_rn(x[(long long)r * cols + c], factor), k) : 0.0f;
        out[r * ld + c] = f16 ? to_f16_bits(v) : to_bf16_bits(v);
    }
}

extern "C" __global__ void from_f16(const f16* x, float* out, long long n) {
    GRID_STRIDE(i, n) out[i] = f16_bits_to_float(x[i].bits);
}

// Eight values per thread (two 16-byte loads, one 16-byte store), then the tail one by one; rows of `cols` values
// written with a row stride of `ld` (to_f16_scaled). Buffers come from the allocator, so they are 256-byte aligned.
extern "C" __global__ void to_bf16(const float* x, bf16* out, long long n, int cols, int ld) {
    long long octets = octets_fit(n, cols, ld) ? n >> 3 : 0;
    GRID_STRIDE(t, octets) {
        float4 a = reinterpret_cast<const float4*>(x)[2 * t], b = reinterpret_cast<const float4*>(x)[2 * t + 1];
        reinterpret_cast<uint4*>(out + strided(t << 3, cols, ld))[0] =
            make_uint4(bf16_pair(a.x, a.y), bf16_pair(a.z, a.w), bf16_pair(b.x, b.y), bf16_pair(b.z, b.w));
    }
    GRID_STRIDE(r, n - (octets << 3)) {
        long long i = (octets << 3) + r;
        out[strided(i, cols, ld)] = to_bf16_bits(x[i]);
    }
}

extern "C" __global__ void from_bf16(const bf16* x, float* out, long long n) {
    GRID_STRIDE(i, n) out[i] = __uint_as_float((u32)x[i] << 16);
}

// A bitsandbytes 4-bit tensor, optionally with IR-QLoRA's per-block shift τ. Every product and sum is rounded
// separately (no FMA contraction) so that the values are bit-exact with the CPU's f32 dequantization.
// All block sizes are powers of two, given as shifts.
struct Bnb4 {
    const unsigned char* packed;  // two codes per byte, even index in the high nibble
    const float* table;           // 16 code values
    long long n;
    int block_shift;
    const float* absmax;          // plain f32 per block, or null when double-quantized:
    const unsigned char* absmax_codes;  // dyn_map[code] · nested[block >> nested_shift] + offset
    const float* nested;
    int nested_shift;
    float offset;
    const unsigned char* tau_codes;  // null, or τ of block t = dyn_map[code] · tau_scales[t >> tau_super_shift]
    const float* tau_scales;
    int tau_shift, tau_super_shift;
    const float* dyn_map;         // bitsandbytes' signed dynamic 8-bit map (256 values)
    int in_dim, ld;               // rows of in_dim values, written with a row stride of ld (room for a tail)
};

__device__ float bnb4_absmax(const Bnb4& q, long long b) {
    return q.absmax_codes ? __fadd_rn(__fmul_rn(q.dyn_map[q.absmax_codes[b]], q.nested[b >> q.nested_shift]), q.offset) : q.absmax[b];
}

// Value i given its code and its block's absmax.
__device__ float bnb4_value(const Bnb4& q, long long i, int code, float absmax) {
    float v = __fmul_rn(q.table[code], absmax);
    if (q.tau_codes) {
        long long s = i >> q.tau_shift;
        v = __fadd_rn(v, __fmul_rn(q.dyn_map[q.tau_codes[s]], q.tau_scales[s >> q.tau_super_shift]));
    }
    return v;
}

__device__ void store16(float* out, long long i, const float* v) {
    float4* o = reinterpret_cast<float4*>(out + i);
    for (int k = 0; k < 4; k++) o[k] = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
}
template <u32 (*PAIR)(float, float)>
__device__ void store16_pairs(void* out, const float* v) {
    uint4* o = reinterpret_cast<uint4*>(out);
    for (int k = 0; k < 2; k++) o[k] = make_uint4(PAIR(v[8 * k], v[8 * k + 1]), PAIR(v[8 * k + 2], v[8 * k + 3]), PAIR(v[8 * k + 4], v[8 * k + 5]), PAIR(v[8 * k + 6], v[8 * k + 7]));
}
__device__ void store16(bf16* out, long long i, const float* v) { store16_pairs<bf16_pair>(out + i, v); }
__device__ void store16(f16* out, long long i, const float* v) { store16_pairs<f16_pair>(out + i, v); }

// Sixteen values (eight packed bytes, one 8-byte load) per thread: blocks are powers of two of at least 32 and τ
// blocks 64, so the sixteen share one absmax and one τ. Then the tail one by one.
template <typename T>
__device__ void dequantize_bnb4(Bnb4 q, T* out) {
    long long groups = q.ld == q.in_dim || (q.in_dim % 16 == 0 && q.ld % 8 == 0) ? q.n >> 4 : 0;
    GRID_STRIDE(t, groups) {
        uint2 raw = reinterpret_cast<const uint2*>(q.packed)[t];
        long long i0 = t << 4;
        float a = bnb4_absmax(q, i0 >> q.block_shift);
        float v[16];
        for (int k = 0; k < 8; k++) {
            u32 byte = ((k < 4 ? raw.x : raw.y) >> (8 * (k & 3))) & 255u;
            v[2 * k] = bnb4_value(q, i0, byte >> 4, a);
            v[2 * k + 1] = bnb4_value(q, i0, byte & 15, a);
        }
        store16(out, strided(i0, q.in_dim, q.ld), v);
    }
    GRID_STRIDE(r, q.n - (groups << 4)) {
        long long i = (groups << 4) + r;
        unsigned char byte = q.packed[i >> 1];
        put(out, strided(i, q.in_dim, q.ld), bnb4_value(q, i, (i & 1) ? (byte & 15) : (byte >> 4), bnb4_absmax(q, i >> q.block_shift)));
    }
}
extern "C" __global__ void dequantize_bnb4_f32(Bnb4 q, float* out) { dequantize_bnb4(q, out); }
extern "C" __global__ void dequantize_bnb4_bf16(Bnb4 q, bf16* out) { dequantize_bnb4(q, out); }
extern "C" __global__ void dequantize_bnb4_f16(Bnb4 q, f16* out) { dequantize_bnb4(q, out); }

// GPTQ int4 [out, in]: fp16(scale[g, j] · (code − zero[g, j])) with g = g_idx[i]; codes packed 8 per u32 along the
// input dimension ([in / 8, out]).
struct Int4 {
    const u32* qweight;
    const float* scales;  // [groups, out], the fp16 scales widened
    const float* zeros;   // [groups, out]
    const u32* g_idx;
    int out_dim, in_dim;
    int ld;  // the output's row stride (≥ in_dim: room for a tail)
};

// 32-bit index arithmetic: the host refuses weights of 2³² values or more.
template <typename T>
__device__ void dequantize_int4(Int4 q, T* out) {
    GRID_STRIDE(t, (long long)q.out_dim * q.in_dim) {
        u32 j = (u32)t / (u32)q.in_dim, i = (u32)t % (u32)q.in_dim;
        u32 g = q.g_idx[i] * (u32)q.out_dim + j;
        int code = (q.qweight[(i / 8) * (u32)q.out_dim + j] >> (4 * (i % 8))) & 15;
        put(out, (long long)j * q.ld + i, f16_round(__fmul_rn(q.scales[g], __fsub_rn((float)code, q.zeros[g]))));
    }
}
extern "C" __global__ void dequantize_int4_f32(Int4 q, float* out) { dequantize_int4(q, out); }
extern "C" __global__ void dequantize_int4_bf16(Int4 q, bf16* out) { dequantize_int4(q, out); }
extern "C" __global__ void dequantize_int4_f16(Int4 q, f16* out) { dequantize_int4(q, out); }
