/* Streaming passes of the prior penalty over the precomputed factor W (K rows of length D).
 *
 * Built on first use by sklearn_bayes_transfer._kernel with the system C compiler; the pure torch
 * path is used when no compiler is available. Each pass walks a table of segments (a piece of one
 * parameter tensor, at most a few hundred KiB) in blocks that stay in L1, so every element of W,
 * of the weights, of the prior mean and of 1/d is read from memory once per pass. bfloat16 rows
 * are widened to float32 in registers. Per-block sums are added into float64 accumulators.
 *
 * The passes are bound by memory traffic, so the value pass writes r / d straight into the
 * gradient buffer (the gradient pass then updates it in place) and, with AVX-512, writes it with
 * non-temporal stores: a buffer that is only written need not be read into the cache first.
 */
#include <stdint.h>
#include <string.h>
#include "parallel.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef BLOCK
#define BLOCK 512
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define LOAD_F32(row, j) ((row)[j])
#define LOAD_BF16(row, j) bf16_to_f32((row)[j])

/* rv = w - mean and q = rv * scale (scale is 1/d for the value, the prox's shrink factors for
 * the proximal step): q into out (when not NULL), rv (or q with keep_q) into r[];
 * returns sum rv * q. */
static float residuals(const float *w, const float *mean, const float *inv_d, float *out, float *r, int64_t n,
                       int keep_q) {
    float sum = 0.0f;
    int64_t j = 0;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    const int stream = out != NULL && ((uintptr_t)out & 63) == 0;
    for (; j + 16 <= n; j += 16) {
        const __m512 rv = _mm512_sub_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(mean + j));
        const __m512 q = _mm512_mul_ps(rv, _mm512_loadu_ps(inv_d + j));
        _mm512_storeu_ps(r + j, keep_q ? q : rv);
        if (stream) _mm512_stream_ps(out + j, q);
        else if (out) _mm512_storeu_ps(out + j, q);
        acc = _mm512_fmadd_ps(rv, q, acc);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; j < n; ++j) {
        const float rv = w[j] - mean[j];
        const float q = rv * inv_d[j];
        if (out) out[j] = q;
        r[j] = keep_q ? q : rv;
        sum += rv * q;
    }
    return sum;
}

static inline void fence(void) {
#if defined(__AVX512F__)
    _mm_sfence(); /* order the non-temporal stores before the threads join */
#endif
}

/* value pass over segments [s0, s1):
 *   r = w - mean,  out = r / d (skipped when out_ptr is NULL),
 *   diag[s] = sum r * r / d,  z[s, k] = sum W[k] * r   (sum W[k] * r / d with dot_q).
 * With inv_d replaced by the shrink factors and dot_q, it is the first pass of the proximal step. */
#define DEFINE_VALUE(NAME, T, LOAD)                                                               \
void NAME(int64_t s0, int64_t s1, int64_t nthreads, const int64_t *w_ptr, const int64_t *out_ptr, \
          const int64_t *off, const int64_t *len, const float *mean, const float *inv_d, const T *W, \
          int64_t D, int64_t K, int64_t dot_q, double *z, double *diag) {                         \
    PARALLEL_FOR(nthreads)                                                                        \
    for (int64_t s = s0; s < s1; ++s) {                                                           \
        float r[BLOCK] __attribute__((aligned(64)));                                              \
        const float *w = (const float *)(intptr_t)w_ptr[s];                                       \
        float *out = out_ptr ? (float *)(intptr_t)out_ptr[s] : NULL;                              \
        double dsum = 0.0;                                                                        \
        double *zs = z + s * K;                                                                   \
        for (int64_t k = 0; k < K; ++k) zs[k] = 0.0;                                              \
        for (int64_t j0 = 0; j0 < len[s]; j0 += BLOCK) {                                          \
            const int64_t n = len[s] - j0 < BLOCK ? len[s] - j0 : BLOCK;                          \
            const int64_t o = off[s] + j0;                                                        \
            dsum += residuals(w + j0, mean + o, inv_d + o, out ? out + j0 : NULL, r, n, (int)dot_q); \
            int64_t k = 0;                                                                        \
            for (; k + 4 <= K; k += 4) {                                                          \
                const T *a = W + k * D + o, *b = a + D, *c = b + D, *e = c + D;                   \
                float sa = 0.0f, sb = 0.0f, sc = 0.0f, se = 0.0f;                                 \
                for (int64_t j = 0; j < n; ++j) {                                                 \
                    sa += LOAD(a, j) * r[j];                                                      \
                    sb += LOAD(b, j) * r[j];                                                      \
                    sc += LOAD(c, j) * r[j];                                                      \
                    se += LOAD(e, j) * r[j];                                                      \
                }                                                                                 \
                zs[k] += sa; zs[k + 1] += sb; zs[k + 2] += sc; zs[k + 3] += se;                   \
            }                                                                                     \
            for (; k < K; ++k) {                                                                  \
                const T *a = W + k * D + o;                                                       \
                float sa = 0.0f;                                                                  \
                for (int64_t j = 0; j < n; ++j) sa += LOAD(a, j) * r[j];                          \
                zs[k] += sa;                                                                      \
            }                                                                                     \
        }                                                                                         \
        diag[s] = dsum;                                                                           \
        fence();                                                                                  \
    }                                                                                             \
}

/* gradient pass over segments [s0, s1), in place on the value pass's r / d:
 *   g = go * g - sum_k zg[k] W[k].                                                             */
#define DEFINE_GRAD(NAME, T, LOAD)                                                                \
void NAME(int64_t s0, int64_t s1, int64_t nthreads, const int64_t *g_ptr, const int64_t *off,    \
          const int64_t *len, float go, const float *zg, const T *W, int64_t D, int64_t K) {      \
    PARALLEL_FOR(nthreads)                                                                        \
    for (int64_t s = s0; s < s1; ++s) {                                                           \
        float *g = (float *)(intptr_t)g_ptr[s];                                                   \
        for (int64_t j0 = 0; j0 < len[s]; j0 += BLOCK) {                                          \
            const int64_t n = len[s] - j0 < BLOCK ? len[s] - j0 : BLOCK;                          \
            const int64_t o = off[s] + j0;                                                        \
            float *gb = g + j0;                                                                   \
            int64_t k = 0;                                                                        \
            if (K % 4 == 1) { /* fold the odd row into the scaling sweep */                      \
                const T *a = W + o;                                                               \
                const float ca = zg[0];                                                           \
                for (int64_t j = 0; j < n; ++j) gb[j] = go * gb[j] - ca * LOAD(a, j);             \
                k = 1;                                                                            \
            } else {                                                                              \
                for (int64_t j = 0; j < n; ++j) gb[j] *= go;                                      \
            }                                                                                     \
            for (; k + 4 <= K; k += 4) {                                                          \
                const T *a = W + k * D + o, *b = a + D, *c = b + D, *e = c + D;                   \
                const float ca = zg[k], cb = zg[k + 1], cc = zg[k + 2], ce = zg[k + 3];           \
                for (int64_t j = 0; j < n; ++j)                                                   \
                    gb[j] -= ca * LOAD(a, j) + cb * LOAD(b, j) + cc * LOAD(c, j) + ce * LOAD(e, j); \
            }                                                                                     \
            for (; k < K; ++k) {                                                                  \
                const T *a = W + k * D + o;                                                       \
                const float ca = zg[k];                                                           \
                for (int64_t j = 0; j < n; ++j) gb[j] -= ca * LOAD(a, j);                         \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
}

/* second pass of the proximal step over segments [s0, s1), from u (the first pass's out):
 *   v = u + b_inv * sum_k c[k] W[k],   diag[s] = sum v * v / d,   w = v + mean (in place).    */
#define DEFINE_PROX(NAME, T, LOAD)                                                                \
void NAME(int64_t s0, int64_t s1, int64_t nthreads, const int64_t *u_ptr, const int64_t *w_ptr,  \
          const int64_t *off, const int64_t *len, const float *c, const float *b_inv,             \
          const float *inv_d, const float *mean, const T *W, int64_t D, int64_t K, double *diag) { \
    PARALLEL_FOR(nthreads)                                                                        \
    for (int64_t s = s0; s < s1; ++s) {                                                           \
        float acc[BLOCK] __attribute__((aligned(64)));                                            \
        const float *u = (const float *)(intptr_t)u_ptr[s];                                       \
        float *w = (float *)(intptr_t)w_ptr[s];                                                   \
        double dsum = 0.0;                                                                        \
        for (int64_t j0 = 0; j0 < len[s]; j0 += BLOCK) {                                          \
            const int64_t n = len[s] - j0 < BLOCK ? len[s] - j0 : BLOCK;                          \
            const int64_t o = off[s] + j0;                                                        \
            for (int64_t j = 0; j < n; ++j) acc[j] = 0.0f;                                        \
            int64_t k = 0;                                                                        \
            for (; k + 4 <= K; k += 4) {                                                          \
                const T *a = W + k * D + o, *b = a + D, *cc = b + D, *e = cc + D;                 \
                const float ca = c[k], cb = c[k + 1], ccc = c[k + 2], ce = c[k + 3];              \
                for (int64_t j = 0; j < n; ++j)                                                   \
                    acc[j] += ca * LOAD(a, j) + cb * LOAD(b, j) + ccc * LOAD(cc, j) + ce * LOAD(e, j); \
            }                                                                                     \
            for (; k < K; ++k) {                                                                  \
                const T *a = W + k * D + o;                                                       \
                const float ca = c[k];                                                            \
                for (int64_t j = 0; j < n; ++j) acc[j] += ca * LOAD(a, j);                        \
            }                                                                                     \
            float bsum = 0.0f;                                                                    \
            for (int64_t j = 0; j < n; ++j) {                                                     \
                const float v = u[j0 + j] + b_inv[o + j] * acc[j];                                \
                bsum += v * v * inv_d[o + j];                                                     \
                w[j0 + j] = v + mean[o + j];                                                      \
            }                                                                                     \
            dsum += bsum;                                                                         \
        }                                                                                         \
        diag[s] = dsum;                                                                           \
    }                                                                                             \
}

DEFINE_VALUE(bt_value_f32, float, LOAD_F32)
DEFINE_VALUE(bt_value_bf16, uint16_t, LOAD_BF16)
DEFINE_GRAD(bt_grad_f32, float, LOAD_F32)
DEFINE_GRAD(bt_grad_bf16, uint16_t, LOAD_BF16)
DEFINE_PROX(bt_prox_f32, float, LOAD_F32)
DEFINE_PROX(bt_prox_bf16, uint16_t, LOAD_BF16)
