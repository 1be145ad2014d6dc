// The CUDA backend's kernels, f32 throughout (the correct-first version): one thread per element for the
// element-wise ops, one block per row for the row reductions (rmsnorm, cross-entropy), one block per (query,
// head, sequence) for attention. Compiled at run time by NVRTC; no headers needed. Semantics mirror the CPU
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

extern "C" __global__ void embedding(const float* table, const u32* ids, long long rows, int dim, float scale, float* out) {
    GRID_STRIDE(i, rows * dim) {
        long long r = i / dim;
        out[i] = table[(long long)ids[r] * dim + i % dim] * scale;
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

// (mean x² + eps)^−½ with the mean in f64, as the CPU computes it (f32 sqrt of the f32-rounded mean).
__device__ float inv_rms(const float* x, int dim, float eps, double* scratch) {
    double s = 0.0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += (double)x[i] * (double)x[i];
    double ms = block_sum(s, scratch) / dim;
    return 1.0f / sqrtf((float)ms + eps);
}

extern "C" __global__ void rmsnorm(const float* x, const float* w, int dim, float eps, int plus_one, float* out) {
    __shared__ double scratch[32];
    const float* xr = x + (long long)blockIdx.x * dim;
    float* o = out + (long long)blockIdx.x * dim;
    float r = inv_rms(xr, dim, eps, scratch);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = plus_one ? (xr[i] * r) * (1.0f + w[i]) : w[i] * (xr[i] * r);
}

extern "C" __global__ void rmsnorm_backward(const float* x, const float* w, const float* dy, int dim, float eps, int plus_one, float* dx, int accumulate) {
    __shared__ double scratch[32];
    __shared__ float fscratch[32];
    long long base = (long long)blockIdx.x * dim;
    float r = inv_rms(x + base, dim, eps, scratch);
    float p = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) p += (plus_one ? 1.0f + w[i] : w[i]) * dy[base + i] * x[base + i];
    float proj = block_sum(p, fscratch);
    float c = r * r * r * proj / (float)dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float g = r * (plus_one ? 1.0f + w[i] : w[i]) * dy[base + i] - x[base + i] * c;
        dx[base + i] = accumulate ? dx[base + i] + g : g;
    }
}

// Rotates each head's pair (x[j], x[j + half]) by ±positions[r]·inv_freq[j]; one thread per pair.
extern "C" __global__ void rope(float* x, const u32* positions, const float* inv_freq, long long rows, int heads, int head_dim, int inverse) {
    int half = head_dim / 2;
    GRID_STRIDE(i, rows * heads * half) {
        long long r = i / (heads * half);
        int h = (i / half) % heads, j = i % half;
        float a = (float)positions[r] * inv_freq[j];
        float c = cosf(a), s = inverse ? -sinf(a) : sinf(a);
        float* p = x + r * heads * head_dim + (long long)h * head_dim;
        float x1 = p[j], x2 = p[j + half];
        p[j] = x1 * c - x2 * s;
        p[j + half] = x2 * c + x1 * s;
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

extern "C" __global__ void glu(const float* gate, const float* up, int kind, float* out, long long n) {
    GRID_STRIDE(i, n) {
        float a, da;
        activation(kind, gate[i], &a, &da);
        out[i] = a * up[i];
    }
}

extern "C" __global__ void glu_backward(const float* gate, const float* up, const float* dy, int kind, float* dgate, float* dup, long long n) {
    GRID_STRIDE(i, n) {
        float a, da;
        activation(kind, gate[i], &a, &da);
        dgate[i] = dy[i] * up[i] * da;
        dup[i] = dy[i] * a;
    }
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

// out[0] (+)= factor · Σ a ⊙ b: block partial sums added atomically (out zeroed by the host when not accumulating).
extern "C" __global__ void dot(const float* a, const float* b, float factor, float* out, long long n) {
    __shared__ float fs[32];
    float p = 0.0f;
    GRID_STRIDE(i, n) p += a[i] * b[i];
    p = block_sum(p, fs);
    if (threadIdx.x == 0) atomicAdd(out, factor * p);
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
extern "C" __global__ void dropout(const float* x, float p, u64 seed, float* out, long long n) {
    float keep = 1.0f / (1.0f - p);
    GRID_STRIDE(i, n) {
        u64 z = seed ^ ((u64)i * 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        out[i] = u >= p ? x[i] * keep : 0.0f;
    }
}

struct Attn {
    int batch, q_len, kv_len, kv_capacity, heads, kv_heads, head_dim;
    float scale;
    int window;  // 0: none
};

// Probabilities of query (b, qi, h) over keys 0..keys into p (shared, `keys` floats); returns false when the
// query sees no key (a padding query: all zeros, as the CPU).
__device__ bool attention_probs(const float* q, const float* k, const u32* key_mask, Attn s, int b, int qi, int h, int keys, float* p, float* scratch) {
    int ci = s.kv_len - s.q_len + qi;
    int lo = s.window > 0 ? max(0, ci + 1 - s.window) : 0;
    int kvh = h / (s.heads / s.kv_heads);
    const float* qr = q + (((long long)b * s.q_len + qi) * s.heads + h) * s.head_dim;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < keys; j += blockDim.x) {
        float v = -INFINITY;
        if (j >= lo && key_mask[(long long)b * s.kv_capacity + j]) {
            const float* kr = k + (((long long)b * s.kv_capacity + j) * s.kv_heads + kvh) * s.head_dim;
            float d = 0.0f;
            for (int e = 0; e < s.head_dim; e++) d += qr[e] * kr[e];
            v = d * s.scale;
        }
        p[j] = v;
        m = fmaxf(m, v);
    }
    m = block_max(m, scratch);
    if (m == -INFINITY) {
        for (int j = threadIdx.x; j < keys; j += blockDim.x) p[j] = 0.0f;
        __syncthreads();
        return false;
    }
    float sum = 0.0f;
    for (int j = threadIdx.x; j < keys; j += blockDim.x) {
        float e = p[j] == -INFINITY ? 0.0f : expf(p[j] - m);
        p[j] = e;
        sum += e;
    }
    float inv = 1.0f / block_sum(sum, scratch);
    for (int j = threadIdx.x; j < keys; j += blockDim.x) p[j] *= inv;
    __syncthreads();
    return true;
}

// grid (q_len, heads, batch); dynamic shared memory: kv_len floats.
extern "C" __global__ void attention(const float* q, const float* k, const float* v, const u32* key_mask, Attn s, float* out) {
    extern __shared__ float p[];
    __shared__ float scratch[32];
    int qi = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    int keys = s.kv_len - s.q_len + qi + 1;
    attention_probs(q, k, key_mask, s, b, qi, h, keys, p, scratch);
    int kvh = h / (s.heads / s.kv_heads);
    float* o = out + (((long long)b * s.q_len + qi) * s.heads + h) * s.head_dim;
    for (int e = threadIdx.x; e < s.head_dim; e += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < keys; j++) acc += p[j] * v[(((long long)b * s.kv_capacity + j) * s.kv_heads + kvh) * s.head_dim + e];
        o[e] = acc;
    }
}

// dQ directly; dK and dV (zeroed by the host) by atomic adds over the queries and heads sharing a KV head.
// Dynamic shared memory: 2·kv_len floats (P and dS).
extern "C" __global__ void attention_backward(const float* q, const float* k, const float* v, const u32* key_mask, Attn s, const float* dout, float* dq, float* dk, float* dv) {
    extern __shared__ float sh[];
    __shared__ float scratch[32];
    int qi = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    int keys = s.kv_len - s.q_len + qi + 1;
    float* p = sh;
    float* ds = sh + s.kv_len;
    attention_probs(q, k, key_mask, s, b, qi, h, keys, p, scratch);
    int kvh = h / (s.heads / s.kv_heads);
    long long qoff = (((long long)b * s.q_len + qi) * s.heads + h) * s.head_dim;
    const float* dor = dout + qoff;
    const float* qr = q + qoff;
    float local = 0.0f;
    for (int j = threadIdx.x; j < keys; j += blockDim.x) {
        const float* vr = v + (((long long)b * s.kv_capacity + j) * s.kv_heads + kvh) * s.head_dim;
        float d = 0.0f;
        for (int e = 0; e < s.head_dim; e++) d += dor[e] * vr[e];
        ds[j] = d;
        local += d * p[j];
    }
    float rowdot = block_sum(local, scratch);
    for (int j = threadIdx.x; j < keys; j += blockDim.x) ds[j] = p[j] * (ds[j] - rowdot);
    __syncthreads();
    for (int e = threadIdx.x; e < s.head_dim; e += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < keys; j++) acc += ds[j] * k[(((long long)b * s.kv_capacity + j) * s.kv_heads + kvh) * s.head_dim + e];
        dq[qoff + e] = s.scale * acc;
    }
    for (long long t = threadIdx.x; t < (long long)keys * s.head_dim; t += blockDim.x) {
        int j = t / s.head_dim, e = t % s.head_dim;
        if (p[j] == 0.0f && ds[j] == 0.0f) continue;
        long long at = (((long long)b * s.kv_capacity + j) * s.kv_heads + kvh) * s.head_dim + e;
        atomicAdd(dv + at, p[j] * dor[e]);
        atomicAdd(dk + at, s.scale * ds[j] * qr[e]);
    }
}
