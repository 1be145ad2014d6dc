// Fused (flash-style) causal GQA attention for the 16-bit modes (flash.rs): scores never reach global memory. One
// block owns 128 queries (forward, dQ) or 128 keys (dK, dV) of one head and walks the other side in tiles of 64,
// multiplying 16-bit operands on the tensor cores (mma.sync m16n8k16, f32 accumulation): in the backward 8 warps of
// 16 rows, in the forward 4 warps of 32 (FWD_TILES). D is the head size rounded up to 16, 32, 64 or 128 (the padding
// is zeros). Appended to kernels.cu (it uses `Attn`, the conversions and the f16 scale helpers from there).
// scripts/gpu/flash_bench.py times the kernels alone against torch's FlashAttention and other versions of this file;
// scripts/gpu/ptx_check.py shows registers and spills without a GPU.
//
// The operand format is the backend's: bf16, or fp16 when compiled with QPEFT_F16 (the f16 mode). Numerics, mirrored
// by the CPU's emulations (backend/cpu/attention.rs, `Operands::Bf16` / `Operands::F16`): q, k, v and dO arrive
// rounded (flash.rs converts them once per call; in the f16 mode scaled by 2^s per tensor, `Shifts`), the
// probabilities are rounded before P·V and Pᵀ·dO, the score gradients (f16: scaled by 2^ds) before dS·K and dSᵀ·Q;
// softmax statistics, rowsum(dO ⊙ O) and every sum are f32, in the tensors' own units. The softmax runs in base 2: the
// attention scale times log2 e goes into one fma per score before `ex2.approx` (`exp2_fast`; expf is a dozen
// instructions); the log-sum-exp the kernels pass on (`stats`) is in log2 units too.
//
// Backward runs in two kernels, neither needing atomics: `flash_dq` walks keys per query tile, writes dQ and each
// query's log-sum-exp and rowsum(dO ⊙ O); `flash_dkv` walks queries (of every head sharing the KV head) per key tile.

#if __CUDA_ARCH__ >= 800

#define TILE 64
#define ROWS 128
#define THREADS 256
// The forward's warps own 32 query rows each: two 16-row tiles share every K and V fragment they load, which halves
// the shared-memory reads per product (the backward kernels hold more per row and stay at one tile per warp).
#define FWD_TILES 2
#define FWD_THREADS (ROWS / (16 * FWD_TILES) * 32)

typedef unsigned short h16;  // a 16-bit operand's bits: bf16, or fp16 with QPEFT_F16
#ifdef QPEFT_F16
#define MMA_HALF "f16"
#define half_pair f16_pair
#else
#define MMA_HALF "bf16"
#define half_pair bf16_pair
#endif

// The power-of-two exponents the f16 mode scaled the operands by (kernels.cu, to_f16_scaled): q, k, v and dO by the
// f16_shift of their tensors' largest magnitudes (amax[0..4], f32 bits), dS by that of its bound
// 2^(1 + ⌈log2 head_dim⌉ + e(dO) + e(V)) (backend/cpu/attention.rs, `dscore_shift`). All 0 when amax is null (bf16).
struct Shifts {
    int q, k, v, dout, ds;
    __device__ Shifts(const u32* amax, int head_dim) {
        if (!amax) {
            q = k = v = dout = ds = 0;
            return;
        }
        int e[4];
        for (int i = 0; i < 4; i++) e[i] = binary_exponent(__uint_as_float(amax[i]));
        q = f16_shift_for(e[0]);
        k = f16_shift_for(e[1]);
        v = f16_shift_for(e[2]);
        dout = f16_shift_for(e[3]);
        ds = f16_shift_for(1 + (32 - __clz(head_dim - 1)) + e[3] + e[2]);
    }
};

extern __shared__ float4 flash_smem[];

#define LOG2E 1.4426950408889634f

// 2^x on the special function unit (≈ 2 ulp; results below 2^−126 flush to 0, 2^−∞ = 0).
__device__ __forceinline__ float exp2_fast(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// c += a·b on the tensor cores. Fragment layouts (PTX ISA, m16n8k16 with .bf16/.f16), g = lane / 4, t = lane % 4, two
// 16-bit values per register, the lower index in the low half:
//   a (16×16, row-major): a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..];
//   b (16×8):             b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g];
//   c (16×8, f32):        c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1].
__device__ __forceinline__ void mma_half(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_HALF "." MMA_HALF ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Shared-memory address of p, for ldmatrix.
__device__ __forceinline__ u32 smem_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// The a fragment of rows r0..r0+15, columns k0..k0+15 of the row-major tile x (row stride ld elements; rows 16-byte
// aligned): ldmatrix.x4's lanes 0-15 address rows r0.. at column k0, lanes 16-31 the same rows at k0 + 8.
__device__ __forceinline__ void frag_a(u32* a, const h16* x, int ld, int r0, int k0, int lane) {
    u32 at = smem_addr(x + (r0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(at));
}

// The b fragments of columns n0..n0+7 (b[0], b[1]) and n0+8..n0+15 (b[2], b[3]), rows k0..k0+15, of B[k][n] =
// y[n][k0 + k] (B stored transposed, as K in Q·Kᵀ): lanes 0-7 address rows n0.. at k0, 8-15 the same at k0 + 8, 16-31
// rows n0+8.. likewise.
__device__ __forceinline__ void frag_bt(u32* b, const h16* y, int ld, int n0, int k0, int lane) {
    u32 at = smem_addr(y + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(at));
}

// The same for B[k][n] = x[k0 + k][n] (B stored row-major, as V in P·V), through transposing loads: lanes 0-15
// address rows k0.. at column n0, lanes 16-31 at n0 + 8.
__device__ __forceinline__ void frag_b(u32* b, const h16* x, int ld, int k0, int n0, int lane) {
    u32 at = smem_addr(x + (k0 + (lane & 15)) * ld + n0 + (lane >> 4) * 8);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(at));
}

// The a fragment of 16 rows × keys 16j..16j+15 from accumulator tiles s[2j], s[2j+1] (the c layout of a 16×64 block),
// rounded to 16 bits: how P and dS feed the next product without leaving registers.
__device__ __forceinline__ void frag_from_acc(u32* a, float (*s)[4], int j) {
    a[0] = half_pair(s[2 * j][0], s[2 * j][1]);
    a[1] = half_pair(s[2 * j][2], s[2 * j][3]);
    a[2] = half_pair(s[2 * j + 1][0], s[2 * j + 1][1]);
    a[3] = half_pair(s[2 * j + 1][2], s[2 * j + 1][3]);
}

// Asynchronous 16-byte copies global → shared (cp.async, compute capability 8.0+); a copy with `valid` false writes
// zeros and reads nothing.
__device__ __forceinline__ void copy16_async(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(valid ? 16 : 0));
}
// The same for one value of N = 4 or 8 bytes (cp.async.ca: .cg copies 16 only). The small per-tile loads (key
// segments, log-sum-exp) go this way too: as plain loads, the threads storing them to shared memory waited for global
// memory before every tile, and with them the whole block at the next barrier.
template <int N>
__device__ __forceinline__ void copy_small_async(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(dst)), "l"(src), "n"(N), "r"(valid ? N : 0));
}
__device__ __forceinline__ void copies_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void copies_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Starts copying rows row0..row0+N-1 of a [rows, hd] 16-bit view (row i at src + i·stride; hd a multiple of 8, so rows
// are 16-byte aligned) into a row-major tile (stride ld); rows at or past `valid` and columns past hd become zeros.
template <int D, int N>
__device__ void load_rows(h16* tile, int ld, const h16* src, long long stride, int row0, int valid, int hd) {
#pragma unroll
    for (int c = threadIdx.x; c < N * D / 8; c += blockDim.x) {
        int i = c / (D / 8), d = c % (D / 8) * 8;
        bool ok = row0 + i < valid && d < hd;
        copy16_async(tile + i * ld + d, ok ? src + (row0 + i) * stride + d : src, ok);
    }
}

// Whether the query at cache index ci, of segment q_seg, sees key j of segment k_seg: causality, the sliding window,
// the cache length, and the key mask read as segments (0 = padding; a real query sees only its own segment's keys,
// which is how packed examples stay apart; a padding query, segment 0, sees every real key before it).
__device__ __forceinline__ bool sees(const Attn& s, int ci, int j, u32 k_seg, u32 q_seg) {
    return k_seg && (q_seg == 0 || k_seg == q_seg) && j <= ci && j < s.kv_len && (s.window <= 0 || j > ci - s.window);
}

// The maximum and the sum over the 4 threads (t = 0..3) that share a row of a c fragment.
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Where one (sequence, query head) lives: its query-side rows (q, out, dq, dout) and its KV head's cache rows.
struct Head {
    long long q_at, q_stride, kv_at, kv_stride;
    const u32* mask;
    int first;  // cache index of query 0
    __device__ Head(const Attn& s, const u32* key_mask, int b, int h) {
        int kvh = h / (s.heads / s.kv_heads);
        q_at = ((long long)b * s.q_len * s.heads + h) * s.head_dim;
        q_stride = (long long)s.heads * s.head_dim;
        kv_at = ((long long)b * s.kv_capacity * s.kv_heads + kvh) * s.head_dim;
        kv_stride = (long long)s.kv_heads * s.head_dim;
        mask = key_mask + (long long)b * s.kv_capacity;
        first = s.kv_len - s.q_len;
    }
    // The segment of the query at cache index ci (0 beyond the cache).
    __device__ u32 segment(const Attn& s, int ci) const { return ci < s.kv_len ? mask[ci] : 0u; }
};

// c[m] (16 × 64, the c layout) = X[r0 + 16m..r0 + 16m + 16]·Yᵀ for m < M, the row-major tiles x (≥ r0 + 16M rows) and
// y (64 rows) both D wide: each fragment of y is loaded once for the M row tiles.
template <int D, int M>
__device__ __forceinline__ void rows_times_tile_t(float (*c)[8][4], const h16* x, const h16* y, int r0, int lane) {
    const int LD = D + 8;
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int n = 0; n < 8; n++) c[m][n][0] = c[m][n][1] = c[m][n][2] = c[m][n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
        u32 a[M][4];
#pragma unroll
        for (int m = 0; m < M; m++) frag_a(a[m], x, LD, r0 + 16 * m, kk, lane);
#pragma unroll
        for (int n = 0; n < 8; n += 2) {
            u32 b[4];
            frag_bt(b, y, LD, n * 8, kk, lane);
#pragma unroll
            for (int m = 0; m < M; m++) {
                mma_half(c[m][n], a[m], b[0], b[1]);
                mma_half(c[m][n + 1], a[m], b[2], b[3]);
            }
        }
    }
}

// The segment all 16M rows of this warp share (each thread holds rows g and g + 8 of each 16-row tile m, of segments
// seg[m][0] and seg[m][1]), or 0 when they differ or are padding: what `tile_mask` compares the other side with.
template <int M>
__device__ __forceinline__ u32 warp_segment(const u32 (*seg)[2]) {
    u32 first = __shfl_sync(0xffffffffu, seg[0][0], 0);
    bool same = true;
#pragma unroll
    for (int m = 0; m < M; m++) same = same && seg[m][0] == first && seg[m][1] == first;
    return __all_sync(0xffffffffu, same) ? first : 0u;
}

// How much masking a tile's scores need (warp-uniform): none when each of `rows` consecutive queries from cache index
// ci0, all of segment wseg (0: not all alike), sees each of the 64 keys from k0 whose segments are km[0..64]; causality
// alone where all those keys are of wseg and inside the cache and the window, so that only keys after a query hide from
// it (the tile on the diagonal of an unpacked batch); else the full test of `sees`.
enum { MASK_FULL, MASK_CAUSAL, MASK_NONE };
__device__ __forceinline__ int tile_mask(const Attn& s, int ci0, int rows, u32 wseg, int k0, const u32* km, int lane) {
    bool one_segment = wseg != 0 && k0 + TILE <= s.kv_len && (s.window <= 0 || k0 > ci0 + rows - 1 - s.window);
    if (!__all_sync(0xffffffffu, one_segment && km[lane] == wseg && km[lane + 32] == wseg)) return MASK_FULL;
    return k0 + TILE - 1 <= ci0 ? MASK_NONE : MASK_CAUSAL;
}

// sc[m] (query rows r0 + 16m.. of this warp × 64 keys from k0) = Q·Kᵀ, unscaled (the softmax folds the scale into
// its exponentials), with invisible keys at −∞ as `mask` (`tile_mask`) says; this thread's rows of tile m are cache
// indices ci + 16m and ci + 16m + 8, of segments qseg[m][0] and qseg[m][1].
template <int D, int M>
__device__ void masked_scores(float (*sc)[8][4], const h16* qs, const h16* ks, const u32* km, const Attn& s, int k0, int ci, const u32 (*qseg)[2], int mask, int r0, int lane) {
    int t = lane & 3;
    rows_times_tile_t<D, M>(sc, qs, ks, r0, lane);
    // One branch per tile (warp-uniform), not one per score: the compiler does not hoist `mask` out of the loop.
    if (mask == MASK_NONE) return;
    if (mask == MASK_CAUSAL) {
        // Score (m, n, e) is key k0 + 8n + 2t + (e & 1) for query ci + 16m + 8(e >> 1): one comparison with constants.
        int d = ci - k0 - 2 * t;
#pragma unroll
        for (int m = 0; m < M; m++)
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) sc[m][n][e] = 8 * n + (e & 1) <= d + 16 * m + 8 * (e >> 1) ? sc[m][n][e] : -INFINITY;
        return;
    }
    // The visibility of score (m, n, e) as bit 32m + 4n + e, found in a loop that is not unrolled: unrolled, its index
    // arithmetic for all 32M scores at once costs more registers than the accumulators leave (spills).
    unsigned long long seen = 0;
#pragma unroll 1
    for (int i = 0; i < 32 * M; i++) {
        int m = i >> 5, n = (i >> 2) & 7, e = i & 3, j = k0 + n * 8 + 2 * t + (e & 1);
        u32 seg = 0;
#pragma unroll
        for (int mm = 0; mm < M; mm++) seg = mm == m ? qseg[mm][e >> 1] : seg;
        if (sees(s, ci + 16 * m + (e >> 1) * 8, j, km[j - k0], seg)) seen |= 1ull << i;
    }
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) sc[m][n][e] = (seen >> (32 * m + 4 * n + e)) & 1 ? sc[m][n][e] : -INFINITY;
}

// One tile of the online softmax (base 2) for this thread's two rows (c layout) of unscaled scores: raises the running
// maxima m (unscaled) to include the tile's scores sc, replaces sc by 2^(scale·(sc − m)) (one fma and one ex2 each),
// sets alpha = 2^(scale·(m_old − m)) (what earlier sums must be scaled by) and
// updates the running sums l (this thread's share of each row; `quad_sum` completes them). A row that has seen no
// visible key yet keeps m = −∞, l = 0 and gets zeros.
__device__ __forceinline__ void online_softmax(float (*sc)[4], float scale, float* m, float* l, float* alpha) {
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < 8; n++) mx = fmaxf(mx, fmaxf(sc[n][2 * r], sc[n][2 * r + 1]));
        // ms and the old maximum's shift are rounded the same way (no contraction into an fma), so that alpha is
        // exactly 1 when the maximum did not move and the caller can skip rescaling.
        float mn = fmaxf(m[r], quad_max(mx)), ms = __fmul_rn(mn, scale);
        alpha[r] = mn == -INFINITY ? 1.0f : exp2_fast(__fsub_rn(__fmul_rn(m[r], scale), ms));
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 2 * r; e < 2 * r + 2; e++) {
                sc[n][e] = mn == -INFINITY ? 0.0f : exp2_fast(fmaf(sc[n][e], scale, -ms));
                sum += sc[n][e];
            }
        // Rounded step by step (no fma contraction, which the compiler may choose differently in each kernel), so
        // that the forward's log-sum-exp is flash_dq's to the bit (`log_sum_exp`).
        l[r] = __fadd_rn(__fmul_rn(l[r], alpha[r]), sum);
        m[r] = mn;
    }
}

// A row's log-sum-exp in log2 units from its running maximum m (unscaled) and its complete sum of exponentials; ∞ for
// a row that saw no key. One function for the forward and flash_dq, rounded step by step, so that both give the same.
__device__ __forceinline__ float log_sum_exp(float m, float total, float scale) {
    return total > 0.0f ? __fadd_rn(__fmul_rn(m, scale), log2f(total)) : INFINITY;
}

// Keys k0 of the tiles queries q0..q0+ROWS-1 (q0 < q_len) can see: from the first query's window start to the last
// query. In a packed row the tiles wholly of earlier examples are skipped: segments never decrease along a row, so a
// tile before the first query whose last key is real and of an earlier segment than the first query's holds only keys
// that no query of the block sees (padding queries, segment 0, see all: nothing is skipped for them).
__device__ __forceinline__ int key_start(const Attn& s, const Head& hd, int q0) {
    int lo = s.window > 0 ? max(0, hd.first + q0 + 1 - s.window) : 0;
    int k0 = lo / TILE * TILE;
    u32 first = hd.segment(s, hd.first + q0);
    while (first > 1 && k0 + TILE <= hd.first + q0) {
        u32 last = hd.mask[k0 + TILE - 1];
        if (last == 0 || last >= first) break;
        k0 += TILE;
    }
    return k0;
}
__device__ __forceinline__ int key_end(const Attn& s, const Head& hd, int q0) {
    return min(hd.first + min(q0 + ROWS, s.q_len), s.kv_len);
}

// Starts loading key tile k0 into stage buffers: k into `ks`, v into `vs` unless null, and the key mask into `km`.
template <int D>
__device__ void load_keys(const Attn& s, const Head& hd, const h16* k, const h16* v, int k0, h16* ks, h16* vs, u32* km) {
    const int LD = D + 8;
    load_rows<D, TILE>(ks, LD, k + hd.kv_at, hd.kv_stride, k0, s.kv_len, s.head_dim);
    if (vs) load_rows<D, TILE>(vs, LD, v + hd.kv_at, hd.kv_stride, k0, s.kv_len, s.head_dim);
    for (int i = threadIdx.x; i < TILE; i += blockDim.x) copy_small_async<4>(km + i, hd.mask + min(k0 + i, s.kv_len - 1), k0 + i < s.kv_len);
    copies_commit();
}

// The walk over key tiles k_lo..k_hi with two stages: tile i + 1 loads while tile i is used. `body(k0, ks, vs, km)`
// sees a complete tile; `v` null loads keys only.
template <int D, typename F>
__device__ void walk_keys(const Attn& s, const Head& hd, const h16* k, const h16* v, int k_lo, int k_hi, h16* kbuf, h16* vbuf, u32* kmbuf, F body) {
    const int TS = TILE * (D + 8);
    if (k_lo < k_hi) load_keys<D>(s, hd, k, v, k_lo, kbuf, v ? vbuf : nullptr, kmbuf);
    for (int k0 = k_lo, st = 0; k0 < k_hi; k0 += TILE, st ^= 1) {
        if (k0 + TILE < k_hi) {
            load_keys<D>(s, hd, k, v, k0 + TILE, kbuf + (st ^ 1) * TS, v ? vbuf + (st ^ 1) * TS : nullptr, kmbuf + (st ^ 1) * TILE);
            copies_wait<1>();
        } else {
            copies_wait<0>();
        }
        __syncthreads();
        body(k0, kbuf + st * TS, vbuf + st * TS, kmbuf + st * TILE);
        // The next iteration's loads overwrite this stage.
        __syncthreads();
    }
}

// acc[m] (16 rows × D) += A·X for m < M, A = the 16×64 block p[m] (c layout, rounded to 16 bits) and X = the row-major
// 64 × D tile x, each fragment of x loaded once for the M row tiles.
template <int D, int M>
__device__ __forceinline__ void mma_acc_rows(float (*acc)[D / 8][4], float (*p)[8][4], const h16* x, int lane) {
    const int LD = D + 8;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        u32 a[M][4];
#pragma unroll
        for (int m = 0; m < M; m++) frag_from_acc(a[m], p[m], j);
#pragma unroll
        for (int n = 0; n < D / 8; n += 2) {
            u32 b[4];
            frag_b(b, x, LD, j * 16, n * 8, lane);
#pragma unroll
            for (int m = 0; m < M; m++) {
                mma_half(acc[m][n], a[m], b[0], b[1]);
                mma_half(acc[m][n + 1], a[m], b[2], b[3]);
            }
        }
    }
}

// Writes rows (16 per warp, two per thread) of a [16, D] accumulator times `scale` to rows `row0 + r` of a [rows, hd]
// view (row at dst + i·stride) for r < valid.
template <int D>
__device__ void store_rows(float (*acc)[4], float scale, float* dst, long long stride, int row0, int valid, int hd, int lane) {
    int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int i = row0 + g + 8 * r;
        if (i >= valid) continue;
        float* row = dst + i * stride;
#pragma unroll
        for (int n = 0; n < D / 8; n++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                int d = n * 8 + 2 * t + e;
                if (d < hd) row[d] = scale * acc[n][2 * r + e];
            }
    }
}

// Forward. Grid (query blocks of ROWS, heads, batch), FWD_THREADS threads (warps of FWD_TILES 16-row tiles); q, k, v
// as 16-bit operands. Unless `stats` is null, each query's log-sum-exp goes to stats[2·row] as `flash_dq` computes it
// (the same tiles in the same order: a tile the warp's 32 rows see and a 16-row warp of flash_dq would skip has only
// masked scores for those 16, which leave their maximum and sum as they are).
template <int D>
__device__ void flash_forward(const h16* q, const h16* k, const h16* v, const u32* key_mask, Attn s, float* out, const u32* amax, float* stats) {
    const int M = FWD_TILES;
    Shifts sh(amax, s.head_dim);
    s.scale *= pow2(-(sh.q + sh.k)) * LOG2E;  // scores from the scaled q and k, in log2 units
    const int LD = D + 8;
    h16* qs = (h16*)flash_smem;
    h16* kbuf = qs + ROWS * LD;
    h16* vbuf = kbuf + 2 * TILE * LD;
    u32* kmbuf = (u32*)(vbuf + 2 * TILE * LD);
    // Query blocks in reverse: the longest (last, seeing the most keys) start first, so that the last wave is short.
    int q0 = (gridDim.x - 1 - blockIdx.x) * ROWS, r0 = (threadIdx.x >> 5) * 16 * M, lane = threadIdx.x & 31, g = lane >> 2;
    Head hd(s, key_mask, blockIdx.z, blockIdx.y);
    load_rows<D, ROWS>(qs, LD, q + hd.q_at, hd.q_stride, q0, s.q_len, s.head_dim);
    copies_commit();
    int ci0 = hd.first + q0 + r0, ci = ci0 + g;
    u32 qseg[M][2];
#pragma unroll
    for (int m = 0; m < M; m++) qseg[m][0] = hd.segment(s, ci + 16 * m), qseg[m][1] = hd.segment(s, ci + 16 * m + 8);
    const u32 wseg = warp_segment<M>(qseg);
    float o[M][D / 8][4], mx[M][2], l[M][2];
#pragma unroll
    for (int m = 0; m < M; m++) {
#pragma unroll
        for (int n = 0; n < D / 8; n++) o[m][n][0] = o[m][n][1] = o[m][n][2] = o[m][n][3] = 0.0f;
        mx[m][0] = mx[m][1] = -INFINITY;
        l[m][0] = l[m][1] = 0.0f;
    }
    walk_keys<D>(s, hd, k, v, key_start(s, hd, q0), key_end(s, hd, q0), kbuf, vbuf, kmbuf, [&](int k0, const h16* ks, const h16* vs, const u32* km) {
        // A tile wholly after this warp's queries changes nothing (its probabilities are 0).
        if (k0 > ci0 + 16 * M - 1) return;
        float sc[M][8][4];
        masked_scores<D, M>(sc, qs, ks, km, s, k0, ci, qseg, tile_mask(s, ci0, 16 * M, wseg, k0, km, lane), r0, lane);
        float alpha[M][2];
        bool unchanged = true;
#pragma unroll
        for (int m = 0; m < M; m++) {
            online_softmax(sc[m], s.scale, mx[m], l[m], alpha[m]);
            unchanged = unchanged && alpha[m][0] == 1.0f && alpha[m][1] == 1.0f;
        }
        // Rescale what was summed under the old row maxima, unless no maximum of the warp's rows moved (most tiles).
        if (!__all_sync(0xffffffffu, unchanged)) {
#pragma unroll
            for (int m = 0; m < M; m++)
#pragma unroll
                for (int n = 0; n < D / 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) o[m][n][e] *= alpha[m][e >> 1];
        }
        mma_acc_rows<D, M>(o, sc, vs, lane);
    });
#pragma unroll
    for (int m = 0; m < M; m++) {
        // 1/l per row (0 for a query that sees no key).
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float total = quad_sum(l[m][r]), inv = total > 0.0f ? 1.0f / total : 0.0f;
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                o[m][n][2 * r] *= inv;
                o[m][n][2 * r + 1] *= inv;
            }
            int qi = q0 + r0 + 16 * m + g + 8 * r;
            if (stats && (lane & 3) == 0 && qi < s.q_len)
                stats[2 * (((long long)blockIdx.z * s.heads + blockIdx.y) * s.q_len + qi)] = log_sum_exp(mx[m][r], total, s.scale);
        }
        store_rows<D>(o[m], pow2(-sh.v), out + hd.q_at, hd.q_stride, q0 + r0 + 16 * m, s.q_len, s.head_dim, lane);
    }
}

// dQ = scale·dS·K per query block, with dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O)); first, unless `have_lse` (the forward left
// it there), a pass over the keys for each query's log-sum-exp in log2 units (∞ when it sees no key), which goes to
// stats[2·row]; rowsum(dO ⊙ O) goes to stats[2·row + 1], row = (b·heads + h)·q_len + qi. Grid (query blocks of ROWS, heads,
// batch), THREADS threads; q, k, v, dout as 16-bit operands, and out and dout32 (the f32 dO) for the row sums.
template <int D>
__device__ void flash_dq(const h16* q, const h16* k, const h16* v, const u32* key_mask, Attn s, const float* out, const float* dout32, const h16* dout, float* dq, float* stats, const u32* amax, int have_lse) {
    Shifts sh(amax, s.head_dim);
    const float scale = s.scale, dp_unscale = pow2(-(sh.dout + sh.v)), ds_scale = pow2(sh.ds);
    s.scale *= pow2(-(sh.q + sh.k)) * LOG2E;  // scores in log2 units
    const int LD = D + 8;
    h16* qs = (h16*)flash_smem;
    h16* dos = qs + ROWS * LD;
    h16* kbuf = dos + ROWS * LD;
    h16* vbuf = kbuf + 2 * TILE * LD;
    u32* kmbuf = (u32*)(vbuf + 2 * TILE * LD);
    int q0 = (gridDim.x - 1 - blockIdx.x) * ROWS, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    Head hd(s, key_mask, blockIdx.z, blockIdx.y);
    load_rows<D, ROWS>(qs, LD, q + hd.q_at, hd.q_stride, q0, s.q_len, s.head_dim);
    load_rows<D, ROWS>(dos, LD, dout + hd.q_at, hd.q_stride, q0, s.q_len, s.head_dim);
    copies_commit();
    int ci0 = hd.first + q0 + warp * 16, ci = ci0 + g;
    const u32 qseg[1][2] = {{hd.segment(s, ci), hd.segment(s, ci + 8)}};
    const u32 wseg = warp_segment<1>(qseg);
    int k_lo = key_start(s, hd, q0), k_hi = key_end(s, hd, q0);
    // Pass 1: each row's maximum and sum of exponentials.
    float lse[2], dot[2];
    if (have_lse) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            int qi = q0 + warp * 16 + g + 8 * r;
            lse[r] = qi < s.q_len ? stats[2 * (((long long)blockIdx.z * s.heads + blockIdx.y) * s.q_len + qi)] : INFINITY;
        }
    } else {
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
        walk_keys<D>(s, hd, k, nullptr, k_lo, k_hi, kbuf, vbuf, kmbuf, [&](int k0, const h16* ks, const h16*, const u32* km) {
            if (k0 > ci0 + 15) return;
            float sc[1][8][4], alpha[2];
            masked_scores<D, 1>(sc, qs, ks, km, s, k0, ci, qseg, tile_mask(s, ci0, 16, wseg, k0, km, lane), warp * 16, lane);
            online_softmax(sc[0], s.scale, m, l, alpha);
        });
#pragma unroll
        for (int r = 0; r < 2; r++) lse[r] = log_sum_exp(m[r], quad_sum(l[r]), s.scale);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        int qi = q0 + warp * 16 + g + 8 * r;
        // rowsum(dO ⊙ O) in f32 from the unrounded rows, split over the row's 4 threads.
        float part = 0.0f;
        if (qi < s.q_len)
            for (int d = t; d < s.head_dim; d += 4) part += dout32[hd.q_at + qi * hd.q_stride + d] * out[hd.q_at + qi * hd.q_stride + d];
        dot[r] = quad_sum(part);
        if (t == 0 && qi < s.q_len) {
            long long row = ((long long)blockIdx.z * s.heads + blockIdx.y) * s.q_len + qi;
            if (!have_lse) stats[2 * row] = lse[r];
            stats[2 * row + 1] = dot[r];
        }
    }
    // Pass 2: dS and dQ.
    float acc[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    walk_keys<D>(s, hd, k, v, k_lo, k_hi, kbuf, vbuf, kmbuf, [&](int k0, const h16* ks, const h16* vs, const u32* km) {
        if (k0 > ci0 + 15) return;
        float p[1][8][4], dp[1][8][4];
        masked_scores<D, 1>(p, qs, ks, km, s, k0, ci, qseg, tile_mask(s, ci0, 16, wseg, k0, km, lane), warp * 16, lane);
        rows_times_tile_t<D, 1>(dp, dos, vs, warp * 16, lane);
#pragma unroll
        for (int n = 0; n < 8; n++)
#pragma unroll
            for (int e = 0; e < 4; e++) dp[0][n][e] = exp2_fast(fmaf(p[0][n][e], s.scale, -lse[e >> 1])) * (dp[0][n][e] * dp_unscale - dot[e >> 1]) * ds_scale;
        mma_acc_rows<D, 1>(&acc, dp, ks, lane);
    });
    store_rows<D>(acc, scale * pow2(-(sh.ds + sh.k)), dq + hd.q_at, hd.q_stride, q0 + warp * 16, s.q_len, s.head_dim, lane);
}

// dV = Σ Pᵀ·dO and dK = scale·Σ dSᵀ·Q per key block, over every query head of the KV head and every query tile that
// sees the keys; `stats` from `flash_dq`. Works on Sᵀ = K·Qᵀ (keys as rows) so that Pᵀ and dSᵀ feed the products
// from registers. Grid (key blocks of ROWS, KV heads, batch), THREADS threads; q, k, v, dout as 16-bit operands.
template <int D>
// Grid (key blocks, kv_heads × split, batch): block y handles KV head y / split and the part y % split of the query
// heads sharing it (rep / split of them), writing its dK, dV at dk + part · part_stride (split 1: dk itself; more
// parts, as grouped-query attention at batch 1 needs to fill the GPU, are summed by flash_sum_parts).
__device__ void flash_dkv(const h16* q, const h16* k, const h16* v, const u32* key_mask, Attn s, const h16* dout, const float* stats, float* dk, float* dv, const u32* amax, int split, long long part_stride) {
    Shifts sh(amax, s.head_dim);
    const float score_scale = s.scale * pow2(-(sh.q + sh.k)) * LOG2E, dp_unscale = pow2(-(sh.dout + sh.v)), ds_scale = pow2(sh.ds);
    const int LD = D + 8, TS = TILE * LD;
    h16* ks = (h16*)flash_smem;
    h16* vs = ks + ROWS * LD;
    h16* qbuf = vs + ROWS * LD;
    h16* dobuf = qbuf + 2 * TS;
    float2* statbuf = (float2*)(dobuf + 2 * TS);  // each query's (log-sum-exp, rowsum(dO ⊙ O)) as in `stats`
    u32* qsegbuf = (u32*)(statbuf + 2 * TILE);
    int k0 = blockIdx.x * ROWS, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int rep = s.heads / s.kv_heads, b = blockIdx.z, kvh = blockIdx.y / split, part = blockIdx.y % split;
    int per = rep / split, h0 = kvh * rep + part * per;
    Head hk(s, key_mask, b, h0);
    load_rows<D, ROWS>(ks, LD, k + hk.kv_at, hk.kv_stride, k0, s.kv_len, s.head_dim);
    load_rows<D, ROWS>(vs, LD, v + hk.kv_at, hk.kv_stride, k0, s.kv_len, s.head_dim);
    copies_commit();
    int key0 = k0 + warp * 16, key = key0 + g;  // this warp's keys from key0; this thread's rows: key and key + 8
    const u32 real[1][2] = {{key < s.kv_len ? hk.mask[key] : 0u, key + 8 < s.kv_len ? hk.mask[key + 8] : 0u}};
    const u32 kseg = warp_segment<1>(real);
    // Queries whose cache index ci satisfies k0 <= ci < k0 + ROWS - 1 + window see some of the block's keys.
    int q_lo = max(0, k0 - hk.first);
    int q_hi = s.window > 0 ? min(s.q_len, k0 + ROWS - 1 + s.window - hk.first) : s.q_len;
    int tiles = q_lo < q_hi ? (q_hi - q_lo + TILE - 1) / TILE : 0;
    // A packed row: query tiles of later examples than the block's last key see none of its keys (see key_start).
    u32 last_key = hk.mask[min(k0 + ROWS, s.kv_len) - 1];
    while (last_key != 0 && tiles > 0) {
        u32 seg = hk.segment(s, hk.first + q_lo + (tiles - 1) * TILE);
        if (seg == 0 || seg <= last_key) break;
        tiles--;
    }
    int steps = per * tiles;
    // Step i: query head h0 + i / tiles, query tile q_lo + (i % tiles)·TILE, into stage i % 2.
    auto load = [&](int i) {
        int h = h0 + i / tiles, q0 = q_lo + i % tiles * TILE, st = i & 1;
        Head hd(s, key_mask, b, h);
        load_rows<D, TILE>(qbuf + st * TS, LD, q + hd.q_at, hd.q_stride, q0, s.q_len, s.head_dim);
        load_rows<D, TILE>(dobuf + st * TS, LD, dout + hd.q_at, hd.q_stride, q0, s.q_len, s.head_dim);
        // Rows past q_len read as zeros: no score of theirs is seen (the full mask tests q0 + c < q_len; `clear` and
        // the causal-only mask need the whole tile inside).
        for (int j = threadIdx.x; j < TILE; j += THREADS) {
            int qi = min(q0 + j, s.q_len - 1), ci = hd.first + qi;
            bool ok = q0 + j < s.q_len;
            copy_small_async<8>(statbuf + st * TILE + j, stats + 2 * (((long long)b * s.heads + h) * s.q_len + qi), ok);
            copy_small_async<4>(qsegbuf + st * TILE + j, hd.mask + min(ci, s.kv_len - 1), ok && ci < s.kv_len);
        }
        copies_commit();
    };
    float ak[D / 8][4], av[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) ak[n][e] = av[n][e] = 0.0f;
    if (steps > 0) load(0);
    for (int i = 0; i < steps; i++) {
        if (i + 1 < steps) {
            load(i + 1);
            copies_wait<1>();
        } else {
            copies_wait<0>();
        }
        __syncthreads();
        int q0 = q_lo + i % tiles * TILE, st = i & 1;
        const h16 *qs = qbuf + st * TS, *dos = dobuf + st * TS;
        const float2* stat = statbuf + st * TILE;
        const u32* qseg = qsegbuf + st * TILE;
        // Keys wholly after the tile's last query get nothing from it.
        int cq0 = hk.first + q0;  // cache index of the tile's first query
        if (key0 <= cq0 + TILE - 1) {
            // Whether the tile's queries and this warp's keys are all of one segment, inside the cache and the
            // window (then causality alone hides keys), and whether every query sees every key (no mask): the
            // transpose of tile_mask's tests.
            bool one_segment = __all_sync(0xffffffffu, kseg != 0 && q0 + TILE <= s.q_len && key0 + 16 <= s.kv_len &&
                                                           (s.window <= 0 || key0 > cq0 + TILE - 1 - s.window) && qseg[lane] == kseg && qseg[lane + 32] == kseg);
            bool clear = one_segment && key0 + 15 <= cq0;
            // Sᵀ (16 keys × 64 queries) = K·Qᵀ and dPᵀ = V·dOᵀ.
            float p[1][8][4], dp[1][8][4];
            rows_times_tile_t<D, 1>(p, ks, qs, warp * 16, lane);
            rows_times_tile_t<D, 1>(dp, vs, dos, warp * 16, lane);
            // Visibility of (n, e) as bit 4n + e, in a loop that is not unrolled (see masked_scores).
            unsigned long long seen = ~0ull;
            if (!clear && one_segment) {
                // (n, e) is key `key` + 8(e >> 1) for the query at cache index cq0 + 8n + 2t + (e & 1).
                int d = cq0 + 2 * t - key;
                seen = 0;
#pragma unroll
                for (int n = 0; n < 8; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++) seen |= (unsigned long long)(8 * (e >> 1) <= d + 8 * n + (e & 1)) << (4 * n + e);
            } else if (!clear) {
                seen = 0;
#pragma unroll 1
                for (int i = 0; i < 32; i++) {
                    int n = i >> 2, e = i & 3, c = n * 8 + 2 * t + (e & 1);
                    if (q0 + c < s.q_len && sees(s, cq0 + c, key + (e >> 1) * 8, e >> 1 ? real[0][1] : real[0][0], qseg[c])) seen |= 1ull << i;
                }
            }
#pragma unroll
            for (int n = 0; n < 8; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int c = n * 8 + 2 * t + (e & 1);
                    float pe = (seen >> (4 * n + e)) & 1 ? exp2_fast(p[0][n][e] * score_scale - stat[c].x) : 0.0f;
                    p[0][n][e] = pe;
                    dp[0][n][e] = pe * (dp[0][n][e] * dp_unscale - stat[c].y) * ds_scale;
                }
            mma_acc_rows<D, 1>(&av, p, dos, lane);
            mma_acc_rows<D, 1>(&ak, dp, qs, lane);
        }
        // The next step's loads overwrite this stage.
        __syncthreads();
    }
    store_rows<D>(ak, s.scale * pow2(-(sh.ds + sh.q)), dk + part * part_stride + hk.kv_at, hk.kv_stride, k0 + warp * 16, s.kv_len, s.head_dim, lane);
    store_rows<D>(av, pow2(-sh.dout), dv + part * part_stride + hk.kv_at, hk.kv_stride, k0 + warp * 16, s.kv_len, s.head_dim, lane);
}

// out[i] = Σ_p parts[p·n + i], the parts in order (deterministic).
extern "C" __global__ void flash_sum_parts(const float* parts, int split, long long n, float* out) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float acc = parts[i];
        for (int p = 1; p < split; p++) acc += parts[p * n + i];
        out[i] = acc;
    }
}

#define FLASH_KERNELS(D)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(FWD_THREADS) flash_forward_##D(const h16* q, const h16* k, const h16* v,     \
                                                                             const u32* m, Attn s, float* out,            \
                                                                             const u32* amax, float* stats) {             \
        flash_forward<D>(q, k, v, m, s, out, amax, stats);                                                                \
    }                                                                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_dq_##D(const h16* q, const h16* k, const h16* v,          \
                                                                        const u32* m, Attn s, const float* out,           \
                                                                        const float* dout32, const h16* dout, float* dq,  \
                                                                        float* stats, const u32* amax, int have_lse) {    \
        flash_dq<D>(q, k, v, m, s, out, dout32, dout, dq, stats, amax, have_lse);                                         \
    }                                                                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_dkv_##D(const h16* q, const h16* k, const h16* v,         \
                                                                         const u32* m, Attn s, const h16* dout,           \
                                                                         const float* stats, float* dk, float* dv,        \
                                                                         const u32* amax, int split, long long stride) {  \
        flash_dkv<D>(q, k, v, m, s, dout, stats, dk, dv, amax, split, stride);                                            \
    }

FLASH_KERNELS(16)
FLASH_KERNELS(32)
FLASH_KERNELS(64)
FLASH_KERNELS(128)

#endif
