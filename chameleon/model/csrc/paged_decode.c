/* Paged decode attention on the CPU: one query token per sequence, K/V read in place through the
 * block tables (no gather, no mask, no padding to the longest context).
 *
 * Work item = one sequence: each cached key's row (all KV heads) is loaded once and scored against
 * the H query heads (a KV head serves its G = H / KVH query heads: GQA). Softmax is the exact
 * two-pass form in fp32 (max, then exp and sum), and the output is the p-weighted sum of the
 * values, divided once at the end. fp32 and bf16 caches: bf16 values are widened to fp32 and the
 * output rounded to nearest even. Sequences are spread over `num_threads` OpenMP threads (torch's
 * own libgomp, already loaded in the process). Built and loaded by chameleon/model/cpu_kernels.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16_t;

/* glibc's vector expf (libmvec), so the softmax loop vectorises without -ffast-math (which would
 * also set flush-to-zero for the whole process when GCC links it into a shared library). */
#pragma omp declare simd notinbranch
extern float expf(float);

static inline float bf16_to_float(bf16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    return (bf16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* n values as fp32: fp32 rows are read in place, bf16 rows widened into `tmp`. */
static inline const float *as_f32(const void *base, int bf16, int64_t offset, int64_t n, float *tmp) {
    if (!bf16) return (const float *)base + offset;
    const bf16_t *src = (const bf16_t *)base + offset;
    for (int64_t i = 0; i < n; ++i) tmp[i] = bf16_to_float(src[i]);
    return tmp;
}

/* One sequence, every head: its H query rows against its n keys, each key's row of KVH * D values
 * read once, whole (contiguous: the hardware prefetcher streams a block's slots). Always inlined,
 * so the common head sizes in the dispatch below make D a compile-time constant: whole vectors. */
static inline __attribute__((always_inline)) void decode_seq(const void *q, int64_t q_offset, const void *k_cache, const void *v_cache,
                              const int64_t *table, int64_t n, int64_t block_size, int64_t heads, int64_t kv_heads,
                              const int64_t d, float scale, void *out, int64_t out_offset, int bf16,
                              float *restrict buf, int64_t max_ctx) {
    const int64_t group = heads / kv_heads, row = kv_heads * d;
    if (n <= 0) { /* no keys (never for a decode): zeros, not a read past the scores */
        if (bf16) memset((bf16_t *)out + out_offset, 0, (size_t)(heads * d) * sizeof(bf16_t));
        else memset((float *)out + out_offset, 0, (size_t)(heads * d) * sizeof(float));
        return;
    }
    float *restrict qf = buf, *restrict acc = qf + heads * d, *restrict tmp = acc + heads * d;
    float *restrict sums = tmp + row, *restrict scores = sums + heads;  /* scores: [heads, max_ctx] */
    const float *qs = as_f32(q, bf16, q_offset, heads * d, qf); /* widened in place, or read */
    for (int64_t i = 0; i < heads * d; ++i) qf[i] = qs[i] * scale;
    for (int64_t j0 = 0, blk = 0; j0 < n; j0 += block_size, ++blk) {
        const int64_t first = table[blk] * block_size, count = n - j0 < block_size ? n - j0 : block_size;
        for (int64_t t = 0; t < count; ++t) {
            const float *restrict k = as_f32(k_cache, bf16, (first + t) * row, row, tmp);
            for (int64_t hd = 0; hd < heads; ++hd) {
                const float *restrict qh = qf + hd * d, *restrict kh = k + (hd / group) * d;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t i = 0; i < d; ++i) s += qh[i] * kh[i];
                scores[hd * max_ctx + j0 + t] = s;
            }
        }
    }
    for (int64_t hd = 0; hd < heads; ++hd) {
        float *restrict sh = scores + hd * max_ctx, m = sh[0], sum = 0.0f;
        for (int64_t j = 1; j < n; ++j) m = sh[j] > m ? sh[j] : m;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < n; ++j) {
            sh[j] = expf(sh[j] - m);
            sum += sh[j];
        }
        sums[hd] = sum;
    }
    for (int64_t i = 0; i < heads * d; ++i) acc[i] = 0.0f;
    for (int64_t j0 = 0, blk = 0; j0 < n; j0 += block_size, ++blk) {
        const int64_t first = table[blk] * block_size, count = n - j0 < block_size ? n - j0 : block_size;
        for (int64_t t = 0; t < count; ++t) {
            const float *restrict v = as_f32(v_cache, bf16, (first + t) * row, row, tmp);
            for (int64_t hd = 0; hd < heads; ++hd) {
                const float p = scores[hd * max_ctx + j0 + t];
                const float *restrict vh = v + (hd / group) * d;
                float *restrict ah = acc + hd * d;
#pragma omp simd
                for (int64_t i = 0; i < d; ++i) ah[i] += p * vh[i];
            }
        }
    }
    for (int64_t hd = 0; hd < heads; ++hd) {
        const float inv = 1.0f / sums[hd];
        const int64_t o = out_offset + hd * d;
        if (bf16) {
            for (int64_t i = 0; i < d; ++i) ((bf16_t *)out)[o + i] = float_to_bf16(acc[hd * d + i] * inv);
        } else {
            for (int64_t i = 0; i < d; ++i) ((float *)out)[o + i] = acc[hd * d + i] * inv;
        }
    }
}

/* Returns 0, or -1 if a thread could not allocate its scratch (the caller raises). */
int chameleon_paged_decode(
    const void *q, int64_t q_row_stride, const int64_t *q_rows, /* q[q_rows[b] * stride + h * D + d] */
    const void *k_cache, const void *v_cache,                    /* [slots, KVH, D], contiguous */
    const int64_t *block_tables, int64_t table_stride,           /* [B, >= ceil(ctx / block)] */
    const int64_t *context_lens, int64_t block_size,             /* [B] keys per sequence (>= 1) */
    int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale,
    void *out, /* [B, H * D], contiguous, q's dtype */
    int bf16, int num_threads) {
    const int64_t d = head_dim;
    int64_t max_ctx = 0;
    for (int64_t b = 0; b < num_seqs; ++b) max_ctx = context_lens[b] > max_ctx ? context_lens[b] : max_ctx;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        /* scratch, fp32: H query rows, H output rows, one widened K/V row, H sums, H score rows */
        float *buf = (float *)malloc((size_t)(num_heads * (2 * d + 1 + max_ctx) + num_kv_heads * d) * sizeof(float));
        /* Every thread reaches the worksharing loop (OpenMP requires it); one without scratch only
         * records the failure for its share, and the caller discards the output. */
#pragma omp for schedule(dynamic, 4)
        for (int64_t b = 0; b < num_seqs; ++b) {
            if (buf == NULL) {
                failed = 1;
                continue;
            }
            const int64_t qo = q_rows[b] * q_row_stride, oo = b * num_heads * d, n = context_lens[b];
            const int64_t *table = block_tables + b * table_stride;
            switch (d) { /* the head sizes of common models; any other D takes the generic loop */
#define CASE(D)                                                                                                \
    case D:                                                                                                    \
        decode_seq(q, qo, k_cache, v_cache, table, n, block_size, num_heads, num_kv_heads, D, scale, out, oo, bf16, \
                   buf, max_ctx);                                                                              \
        break;
                CASE(32) CASE(64) CASE(80) CASE(96) CASE(128)
#undef CASE
            default:
                decode_seq(q, qo, k_cache, v_cache, table, n, block_size, num_heads, num_kv_heads, d, scale, out, oo,
                           bf16, buf, max_ctx);
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
