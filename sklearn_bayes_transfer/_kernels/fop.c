/* FOP's two sweeps over preconditioned parameters with few columns (d <= 16: convolution kernels
 * up to 4 x 4 taps, mostly 3 x 3), for the CPU.
 *
 * A parameter is a row-major (rows, d) matrix. torch computes U^T G and U P for such tall, thin
 * matrices with GEMMs that run far below memory speed, and needs separate passes for momentum
 * and for adding the step to the weights. Here each product is one sweep, with the momentum
 * update and the weight update fused into the second:
 *
 *   gram:    H  = U^T G                                  (partial H per segment of rows)
 *   update:  U <- mom U + G  (U <- G when mom = 0);  W <- W - U (lr P)
 *
 * Two layouts of the arithmetic, both on 16-float vectors (GCC/Clang vector extensions; one
 * AVX-512 register, or several narrower ones elsewhere):
 *
 * - rows (d = 3, 5, 6, 7, 9 .. 16): one row of G or W is loaded as a 16-float vector whose lanes
 *   past d belong to the following rows; H's rows accumulate u[r, i] * g_row, and the new W row
 *   is w_row - sum_i u[r, i] (lr P)[i, :] with (lr P) padded by zeros, so the lanes past d are
 *   written back unchanged. The last rows of a segment, whose vectors would reach past it, take
 *   a scalar path, so no thread writes into another's rows and no read leaves the tensor.
 * - shifts (d = 1, 2, 4, 8: d divides 16): with k = r d + j,
 *       (U P)[k] = sum_{s=-(d-1)}^{d-1} u[k + s] P[j + s, j]        (0 <= j + s < d),
 *       H[i, i+s] = sum_{k = i mod d} u[k] g[k + s]                 (0 <= i + s < d),
 *   element-wise over whole vectors with coefficients that repeat every 16 elements.
 *
 * A table of segments (layer, first row, end row) lets one call cover all layers; the segments are
 * spread over threads (see parallel.h).
 */
#include <stdint.h>
#include <string.h>
#include "parallel.h"

#define MAXD 16
#define CHUNK 4096 /* elements per momentum chunk, so the weight update finds U in L1 */

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}

static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

static void momentum_range(float *u, const float *g, int64_t lo, int64_t hi, float mom) {
    if (mom == 0.0f) {
        for (int64_t k = lo; k < hi; ++k) u[k] = g[k];
    } else {
        for (int64_t k = lo; k < hi; ++k) u[k] = mom * u[k] + g[k];
    }
}

static void gram_rows_scalar(const float *u, const float *g, int d, int64_t r0, int64_t r1, float *h) {
    for (int64_t r = r0; r < r1; ++r)
        for (int i = 0; i < d; ++i)
            for (int j = 0; j < d; ++j) h[i * d + j] += u[r * d + i] * g[r * d + j];
}

static void update_rows_scalar(float *p, const float *u, const float *lp, int d, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
        for (int j = 0; j < d; ++j) {
            float out = 0.0f;
            for (int i = 0; i < d; ++i) out += u[r * d + i] * lp[i * d + j];
            p[r * d + j] -= out;
        }
}

/* rows whose 16-float loads stay inside [r0, r1): r0 .. r1 - tail */
#define TAIL(D) (((16 + (D) - 1) / (D)) - 1)

#define DEFINE_ROWS(D)                                                                            \
static void gram_##D(const float *u, const float *g, int64_t r0, int64_t r1, float *h) {         \
    v16 acc[D];                                                                                   \
    for (int i = 0; i < (D); ++i) acc[i] = (v16){0};                                              \
    const int64_t rv = r1 - TAIL(D) > r0 ? r1 - TAIL(D) : r0;                                     \
    for (int64_t r = r0; r < rv; ++r) {                                                           \
        const v16 gr = load16(g + r * (D));                                                       \
        const float *ur = u + r * (D);                                                            \
        for (int i = 0; i < (D); ++i) acc[i] += gr * ur[i];                                       \
    }                                                                                             \
    for (int i = 0; i < (D); ++i)                                                                 \
        for (int j = 0; j < (D); ++j) h[i * (D) + j] += acc[i][j];                                \
    gram_rows_scalar(u, g, (D), rv, r1, h);                                                       \
}                                                                                                 \
                                                                                                  \
static void update_##D(float *u, const float *g, float *p, int64_t r0, int64_t r1, const float *lp, \
                       float mom) {                                                               \
    v16 prow[D];                                                                                  \
    float tmp[16 * (D) + 16];                                                                     \
    for (int i = 0; i < (D); ++i) {                                                               \
        prow[i] = (v16){0};                                                                       \
        for (int j = 0; j < (D); ++j) prow[i][j] = lp[i * (D) + j];                               \
    }                                                                                             \
    int64_t r = r0;                                                                               \
    for (int64_t lo = r0 * (D); lo < r1 * (D); lo += CHUNK) {                                     \
        const int64_t hi = lo + CHUNK < r1 * (D) ? lo + CHUNK : r1 * (D);                         \
        momentum_range(u, g, lo, hi, mom);                                                        \
        /* 16 rows = D whole vectors: the rows' products go to tmp (each store's lanes past d   \
           are overwritten by the next row's), then W's vectors are updated without overlap */    \
        for (; (r + 16) * (D) <= hi; r += 16) {                                                   \
            for (int q = 0; q < 16; ++q) {                                                        \
                const float *ur = u + (r + q) * (D);                                              \
                v16 o = prow[0] * ur[0];                                                          \
                for (int i = 1; i < (D); ++i) o += prow[i] * ur[i];                               \
                store16(tmp + q * (D), o);                                                        \
            }                                                                                     \
            float *pr = p + r * (D);                                                              \
            for (int m = 0; m < (D); ++m) store16(pr + 16 * m, load16(pr + 16 * m) - load16(tmp + 16 * m)); \
        }                                                                                         \
        if (hi == r1 * (D)) update_rows_scalar(p, u, lp, (D), r, r1);                             \
    }                                                                                             \
}

#define DEFINE_SHIFTS(D)                                                                          \
static void gram_##D(const float *u, const float *g, int64_t r0, int64_t r1, float *h) {         \
    enum { S = 2 * (D) - 1 };                                                                     \
    v16 acc[S];                                                                                   \
    for (int s = 0; s < S; ++s) acc[s] = (v16){0};                                                \
    /* whole vectors [v0, v1) whose shifted reads stay inside the segment */                      \
    const int64_t a = r0 * (D), b = r1 * (D), v0 = a + 16 <= b ? a + 16 : b;                      \
    const int64_t v1 = b - 16 >= v0 ? v0 + (b - 16 - v0) / 16 * 16 : v0;                          \
    for (int64_t k = v0; k < v1; k += 16) {                                                       \
        const v16 uk = load16(u + k);                                                             \
        for (int s = 0; s < S; ++s) acc[s] += uk * load16(g + k + s - ((D) - 1));                 \
    }                                                                                             \
    for (int i = 0; i < (D); ++i)                                                                 \
        for (int j = 0; j < (D); ++j) {                                                           \
            float sum = 0.0f;                                                                     \
            for (int t = i; t < 16; t += (D)) sum += acc[j - i + (D) - 1][t];                     \
            h[i * (D) + j] += sum;                                                                \
        }                                                                                         \
    gram_rows_scalar(u, g, (D), r0, v0 / (D), h);                                                 \
    gram_rows_scalar(u, g, (D), v1 / (D), r1, h);                                                 \
}                                                                                                 \
                                                                                                  \
static void update_##D(float *u, const float *g, float *p, int64_t r0, int64_t r1, const float *lp, \
                       float mom) {                                                               \
    enum { S = 2 * (D) - 1 };                                                                     \
    v16 coef[S];                                                                                  \
    for (int s = 0; s < S; ++s) {                                                                 \
        float c[16];                                                                              \
        for (int t = 0; t < 16; ++t) {                                                            \
            const int j = t % (D), i = j + s - ((D) - 1);                                         \
            c[t] = (i >= 0 && i < (D)) ? lp[i * (D) + j] : 0.0f;                                  \
        }                                                                                         \
        coef[s] = load16(c);                                                                      \
    }                                                                                             \
    const int64_t a = r0 * (D), b = r1 * (D), v0 = a + 16 <= b ? a + 16 : b;                      \
    const int64_t v1 = b - 16 >= v0 ? v0 + (b - 16 - v0) / 16 * 16 : v0;                          \
    int64_t k = v0;                                                                               \
    for (int64_t lo = a; lo < b; lo += CHUNK) {                                                   \
        const int64_t hi = lo + CHUNK < b ? lo + CHUNK : b;                                       \
        momentum_range(u, g, lo, hi, mom);                                                        \
        for (; k < v1 && k + 16 + (D) - 1 <= hi; k += 16) {                                       \
            v16 out = load16(p + k);                                                              \
            for (int s = 0; s < S; ++s) out -= load16(u + k + s - ((D) - 1)) * coef[s];           \
            store16(p + k, out);                                                                  \
        }                                                                                         \
    }                                                                                             \
    for (; k < v1; k += 16) { /* blocks that waited for the last chunk's momentum */              \
        v16 out = load16(p + k);                                                                  \
        for (int s = 0; s < S; ++s) out -= load16(u + k + s - ((D) - 1)) * coef[s];               \
        store16(p + k, out);                                                                      \
    }                                                                                             \
    update_rows_scalar(p, u, lp, (D), r0, v0 / (D));                                              \
    update_rows_scalar(p, u, lp, (D), v1 / (D), r1);                                              \
}

DEFINE_SHIFTS(1) DEFINE_SHIFTS(2) DEFINE_ROWS(3) DEFINE_SHIFTS(4) DEFINE_ROWS(5) DEFINE_ROWS(6)
DEFINE_ROWS(7) DEFINE_SHIFTS(8) DEFINE_ROWS(9) DEFINE_ROWS(10) DEFINE_ROWS(11) DEFINE_ROWS(12)
DEFINE_ROWS(13) DEFINE_ROWS(14) DEFINE_ROWS(15) DEFINE_ROWS(16)

#define CASES(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15) X(16)

/* Segment table: seg_layer[s], seg_r0[s], seg_r1[s]; per layer: data pointers and d (1 .. 16). */
void bt_fop_gram(int64_t s0, int64_t s1, int64_t nthreads, const int64_t *seg_layer, const int64_t *seg_r0,
                 const int64_t *seg_r1, const int64_t *u_ptr, const int64_t *g_ptr, const int64_t *dims,
                 float *partial) {
    PARALLEL_FOR(nthreads)
    for (int64_t s = s0; s < s1; ++s) {
        const int64_t l = seg_layer[s];
        const float *u = (const float *)(intptr_t)u_ptr[l], *g = (const float *)(intptr_t)g_ptr[l];
        float *h = partial + s * MAXD * MAXD;
        memset(h, 0, MAXD * MAXD * sizeof(float));
        switch (dims[l]) {
#define GRAM_CASE(D) case D: gram_##D(u, g, seg_r0[s], seg_r1[s], h); break;
            CASES(GRAM_CASE)
            default: break;
        }
    }
}

void bt_fop_update(int64_t s0, int64_t s1, int64_t nthreads, const int64_t *seg_layer, const int64_t *seg_r0,
                   const int64_t *seg_r1, const int64_t *u_ptr, const int64_t *g_ptr, const int64_t *p_ptr,
                   const int64_t *dims, const float *pmat, const float *lr, const float *mom) {
    PARALLEL_FOR(nthreads)
    for (int64_t s = s0; s < s1; ++s) {
        const int64_t l = seg_layer[s], d = dims[l];
        float lp[MAXD * MAXD];
        for (int64_t i = 0; i < d * d; ++i) lp[i] = lr[l] * pmat[l * MAXD * MAXD + i];
        float *u = (float *)(intptr_t)u_ptr[l], *p = (float *)(intptr_t)p_ptr[l];
        const float *g = (const float *)(intptr_t)g_ptr[l];
        switch (d) {
#define UPDATE_CASE(D) case D: update_##D(u, g, p, seg_r0[s], seg_r1[s], lp, mom[l]); break;
            CASES(UPDATE_CASE)
            default: break;
        }
    }
}
