/* GGUF block matmul for potluck's CPU workers (built by workers/native_kernel.py).

   y[m, n] = sum_k x[m, k] * w[n, k] with x float32 [M, K] and w the GGUF file's blocks, row n
   being `row_bytes` bytes of blocks of one type. Each weight row is dequantized into a float32
   buffer exactly as the format defines it (float32 scale * integer code - float32 offset), then
   dotted with up to 4 activation rows at a time in float32: the only difference from a float32
   matmul on the dequantized weight is the order of the float32 sums. Output rows are split
   among OpenMP threads (torch's libgomp, already loaded in the process).

   Types (ggml's numbers): Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12, Q5_K 13, Q6_K 14. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef FAST_MAX_ROWS
#define FAST_MAX_ROWS 4 /* activation rows up to which the fused AVX2 dot runs */
#endif

typedef float v8 __attribute__((vector_size(32), aligned(4)));

#ifdef __F16C__
#include <immintrin.h>
static inline float half_to_float(const uint8_t *p) { return _cvtsh_ss((unsigned short)(p[0] | (p[1] << 8))); }
#else
static inline float half_to_float(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 113;
            while (!(man & 1024)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 1023) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
#endif

static inline void deq_q8_0(const uint8_t *b, float *y) {
    float d = half_to_float(b);
    const int8_t *q = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = d * q[j];
}

static inline void deq_q4_0(const uint8_t *b, float *y) {
    float d = half_to_float(b);
    const uint8_t *q = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = d * ((q[j] & 15) - 8);
        y[j + 16] = d * ((q[j] >> 4) - 8);
    }
}

static inline void deq_q4_1(const uint8_t *b, float *y) {
    float d = half_to_float(b), m = half_to_float(b + 2);
    const uint8_t *q = b + 4;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (q[j] & 15) + m;
        y[j + 16] = d * (q[j] >> 4) + m;
    }
}

static inline void deq_q5_0(const uint8_t *b, float *y) {
    float d = half_to_float(b);
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    const uint8_t *q = b + 6;
    for (int j = 0; j < 16; j++) {
        int h0 = ((qh >> j) << 4) & 16, h1 = (qh >> (j + 12)) & 16;
        y[j] = d * (((q[j] & 15) | h0) - 16);
        y[j + 16] = d * (((q[j] >> 4) | h1) - 16);
    }
}

static inline void deq_q5_1(const uint8_t *b, float *y) {
    float d = half_to_float(b), m = half_to_float(b + 2);
    uint32_t qh;
    memcpy(&qh, b + 4, 4);
    const uint8_t *q = b + 8;
    for (int j = 0; j < 16; j++) {
        int h0 = ((qh >> j) << 4) & 16, h1 = (qh >> (j + 12)) & 16;
        y[j] = d * ((q[j] & 15) | h0) + m;
        y[j + 16] = d * ((q[j] >> 4) | h1) + m;
    }
}

/* the 6-bit scale and min of sub-block j of a Q4_K / Q5_K block's 12 scale bytes */
static inline void scale_min_k4(int j, const uint8_t *q, int *sc, int *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static inline void deq_q4_k(const uint8_t *b, float *y) {
    float d = half_to_float(b), dmin = half_to_float(b + 2);
    const uint8_t *scales = b + 4, *q = b + 16;
    for (int j = 0; j < 4; j++) {
        int sc, mn;
        scale_min_k4(2 * j, scales, &sc, &mn);
        float d1 = d * sc, m1 = dmin * mn;
        scale_min_k4(2 * j + 1, scales, &sc, &mn);
        float d2 = d * sc, m2 = dmin * mn;
        for (int l = 0; l < 32; l++) y[l] = d1 * (q[l] & 15) - m1;
        for (int l = 0; l < 32; l++) y[l + 32] = d2 * (q[l] >> 4) - m2;
        q += 32;
        y += 64;
    }
}

static inline void deq_q5_k(const uint8_t *b, float *y) {
    float d = half_to_float(b), dmin = half_to_float(b + 2);
    const uint8_t *scales = b + 4, *qh = b + 16, *ql = b + 48;
    for (int j = 0; j < 4; j++) {
        int sc, mn;
        scale_min_k4(2 * j, scales, &sc, &mn);
        float d1 = d * sc, m1 = dmin * mn;
        scale_min_k4(2 * j + 1, scales, &sc, &mn);
        float d2 = d * sc, m2 = dmin * mn;
        int u1 = 1 << (2 * j), u2 = 2 << (2 * j);
        for (int l = 0; l < 32; l++) y[l] = d1 * ((ql[l] & 15) + ((qh[l] & u1) ? 16 : 0)) - m1;
        for (int l = 0; l < 32; l++) y[l + 32] = d2 * ((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
        ql += 32;
        y += 64;
    }
}

static inline void deq_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = half_to_float(b + 208);
    for (int n = 0; n < 2; n++) {
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            int q1 = ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
            int q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is] * q1;
            y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3;
            y[l + 96] = d * sc[is + 6] * q4;
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

/* one dequantizer per type, inlined into its own row loop (so the compiler vectorizes it) */
#define DEQ_ROW(NAME, ELEMS, BYTES) \
    static void row_##NAME(const uint8_t *row, int64_t k, float *out) { \
        for (int64_t i = 0; i < k / ELEMS; i++) deq_##NAME(row + i * BYTES, out + i * ELEMS); \
    }
DEQ_ROW(q4_0, 32, 18)
DEQ_ROW(q4_1, 32, 20)
DEQ_ROW(q5_0, 32, 22)
DEQ_ROW(q5_1, 32, 24)
DEQ_ROW(q8_0, 32, 34)
DEQ_ROW(q4_k, 256, 144)
DEQ_ROW(q5_k, 256, 176)
DEQ_ROW(q6_k, 256, 210)

typedef void (*row_fn)(const uint8_t *, int64_t, float *);

/* type -> row dequantizer, elements and bytes per block; 0 when the type is not one of ours */
static int block_of(int type, row_fn *fn, int *elems, int *bytes) {
    switch (type) {
    case 2: *fn = row_q4_0; *elems = 32; *bytes = 18; return 1;
    case 3: *fn = row_q4_1; *elems = 32; *bytes = 20; return 1;
    case 6: *fn = row_q5_0; *elems = 32; *bytes = 22; return 1;
    case 7: *fn = row_q5_1; *elems = 32; *bytes = 24; return 1;
    case 8: *fn = row_q8_0; *elems = 32; *bytes = 34; return 1;
    case 12: *fn = row_q4_k; *elems = 256; *bytes = 144; return 1;
    case 13: *fn = row_q5_k; *elems = 256; *bytes = 176; return 1;
    case 14: *fn = row_q6_k; *elems = 256; *bytes = 210; return 1;
    }
    return 0;
}

static inline float hsum(v8 a) {
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

/* x rows m..m+r (r <= 4) dotted with one dequantized weight row w [k] (k a multiple of 32) */
static inline void dot_rows(const float *x, int64_t k, int r, const float *w, float *out) {
    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    const float *x0 = x, *x1 = x + k, *x2 = x + 2 * k, *x3 = x + 3 * k;
    switch (r) {
    case 4:
        for (int64_t i = 0; i < k; i += 8) {
            v8 wv = *(const v8 *)(w + i);
            a0 += *(const v8 *)(x0 + i) * wv;
            a1 += *(const v8 *)(x1 + i) * wv;
            a2 += *(const v8 *)(x2 + i) * wv;
            a3 += *(const v8 *)(x3 + i) * wv;
        }
        out[0] = hsum(a0); out[1] = hsum(a1); out[2] = hsum(a2); out[3] = hsum(a3);
        return;
    case 3:
        for (int64_t i = 0; i < k; i += 8) {
            v8 wv = *(const v8 *)(w + i);
            a0 += *(const v8 *)(x0 + i) * wv;
            a1 += *(const v8 *)(x1 + i) * wv;
            a2 += *(const v8 *)(x2 + i) * wv;
        }
        out[0] = hsum(a0); out[1] = hsum(a1); out[2] = hsum(a2);
        return;
    case 2:
        for (int64_t i = 0; i < k; i += 8) {
            v8 wv = *(const v8 *)(w + i);
            a0 += *(const v8 *)(x0 + i) * wv;
            a1 += *(const v8 *)(x1 + i) * wv;
        }
        out[0] = hsum(a0); out[1] = hsum(a1);
        return;
    default:
        for (int64_t i = 0; i < k; i += 16) {
            a0 += *(const v8 *)(x0 + i) * *(const v8 *)(w + i);
            a1 += *(const v8 *)(x0 + i + 8) * *(const v8 *)(w + i + 8);
        }
        out[0] = hsum(a0 + a1);
    }
}


#if defined(__AVX2__) && defined(__FMA__)
/* AVX2 path: each group of 32 weights is decoded in registers to 32 signed 8-bit codes and
   w = d0 * code (elements 0-15) / d1 * code (16-31) + m; x . w = d0 * (x . code)_lo +
   d1 * (x . code)_hi + m * sum(x): float32 products of the same numbers, summed in another order. */
#include <immintrin.h>
#define HAVE_FAST 1

typedef struct {
    __m256i q;
    float d0, d1, m;
} group32;

static inline __m256i bits_to_bytes(uint32_t x) { /* byte e = 0xFF where bit e of x is set */
    const __m256i shuf = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

static inline __m256i nibbles32(const uint8_t *qs) { /* 16 bytes -> 32 codes: low nibbles, then high */
    __m128i v = _mm_loadu_si128((const __m128i *)qs), f = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), f), _mm_and_si128(v, f));
}

static inline group32 grp_q8_0(const uint8_t *b, int g) {
    (void)g;
    float d = half_to_float(b);
    return (group32){_mm256_loadu_si256((const __m256i *)(b + 2)), d, d, 0.0f};
}

static inline group32 grp_q4_0(const uint8_t *b, int g) {
    (void)g;
    float d = half_to_float(b);
    return (group32){_mm256_sub_epi8(nibbles32(b + 2), _mm256_set1_epi8(8)), d, d, 0.0f};
}

static inline group32 grp_q4_1(const uint8_t *b, int g) {
    (void)g;
    float d = half_to_float(b);
    return (group32){nibbles32(b + 4), d, d, half_to_float(b + 2)};
}

static inline group32 grp_q5_0(const uint8_t *b, int g) {
    (void)g;
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    float d = half_to_float(b);
    __m256i q = _mm256_or_si256(nibbles32(b + 6), _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(16)));
    return (group32){_mm256_sub_epi8(q, _mm256_set1_epi8(16)), d, d, 0.0f};
}

static inline group32 grp_q5_1(const uint8_t *b, int g) {
    (void)g;
    uint32_t qh;
    memcpy(&qh, b + 4, 4);
    float d = half_to_float(b);
    __m256i q = _mm256_or_si256(nibbles32(b + 8), _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(16)));
    return (group32){q, d, d, half_to_float(b + 2)};
}

static inline __m256i k_nibbles(const uint8_t *b, int g) { /* Q4_K / Q5_K: sub-block g's low 4 bits */
    __m256i v = _mm256_loadu_si256((const __m256i *)b), f = _mm256_set1_epi8(15);
    return _mm256_and_si256(g & 1 ? _mm256_srli_epi16(v, 4) : v, f);
}

static inline group32 grp_q4_k(const uint8_t *b, int g) {
    int sc, mn;
    scale_min_k4(g, b + 4, &sc, &mn);
    float d = half_to_float(b) * sc;
    return (group32){k_nibbles(b + 16 + 32 * (g / 2), g), d, d, -(half_to_float(b + 2) * mn)};
}

static inline group32 grp_q5_k(const uint8_t *b, int g) {
    int sc, mn;
    scale_min_k4(g, b + 4, &sc, &mn);
    float d = half_to_float(b) * sc;
    __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16)), u = _mm256_set1_epi8((char)(1 << g));
    __m256i fifth = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, u), u), _mm256_set1_epi8(16));
    return (group32){_mm256_or_si256(k_nibbles(b + 48 + 32 * (g / 2), g), fifth), d, d, -(half_to_float(b + 2) * mn)};
}

static inline group32 grp_q6_k(const uint8_t *b, int g) {
    int n = g / 4, s = g % 4;
    const uint8_t *ql = b + 64 * n + 32 * (s & 1), *qh = b + 128 + 32 * n;
    const int8_t *sc = (const int8_t *)(b + 192 + 8 * n);
    __m256i lo = _mm256_loadu_si256((const __m256i *)ql), f = _mm256_set1_epi8(15);
    lo = _mm256_and_si256(s < 2 ? lo : _mm256_srli_epi16(lo, 4), f);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i *)qh), 2 * s), _mm256_set1_epi8(3));
    __m256i q = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
    float d = half_to_float(b + 208);
    return (group32){_mm256_sub_epi8(q, _mm256_set1_epi8(32)), d * sc[2 * s], d * sc[2 * s + 1], 0.0f};
}

static inline float hsum256(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

/* rows x [R, k] (row stride k) . one weight row; xsum [R, k / 32] the activations' group sums */
#define FAST_ROW(NAME, ELEMS, BYTES)                                                                    \
    static inline __attribute__((always_inline)) void fast_##NAME##_r(const uint8_t *row, const float *x, \
                                                                      const float *xsum, int64_t k,     \
                                                                      const int R, float *out) {        \
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
        float macc[4] = {0, 0, 0, 0};                                                                  \
        for (int64_t blk = 0; blk < k / ELEMS; blk++) {                                                \
            const uint8_t *bp = row + blk * BYTES;                                                     \
            for (int g = 0; g < ELEMS / 32; g++) {                                                     \
                group32 gr = grp_##NAME(bp, g);                                                        \
                int64_t at = blk * ELEMS + g * 32;                                                     \
                __m128i lo = _mm256_castsi256_si128(gr.q), hi = _mm256_extracti128_si256(gr.q, 1);    \
                __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));                              \
                __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));           \
                __m256 f2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));                              \
                __m256 f3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));           \
                __m256 d0 = _mm256_set1_ps(gr.d0), d1 = _mm256_set1_ps(gr.d1);                         \
                for (int t = 0; t < R; t++) {                                                          \
                    const float *xp = x + t * k + at;                                                  \
                    __m256 s0 = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xp + 8), _mm256_mul_ps(f0, _mm256_loadu_ps(xp))); \
                    __m256 s1 = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xp + 24), _mm256_mul_ps(f2, _mm256_loadu_ps(xp + 16))); \
                    if (HAS_MIN_##NAME) {                                                              \
                        acc[t] = _mm256_fmadd_ps(d1, s1, _mm256_fmadd_ps(d0, s0, acc[t]));             \
                        macc[t] += gr.m * xsum[t * (k / 32) + at / 32];                                \
                    } else if (TWO_SCALES_##NAME) {                                                    \
                        acc[t] = _mm256_fmadd_ps(d1, s1, _mm256_fmadd_ps(d0, s0, acc[t]));             \
                    } else {                                                                           \
                        acc[t] = _mm256_fmadd_ps(d0, _mm256_add_ps(s0, s1), acc[t]);                   \
                    }                                                                                  \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
        for (int t = 0; t < R; t++) out[t] = hsum256(acc[t]) + macc[t];                               \
    }                                                                                                  \
    static void fastdeq_##NAME(const uint8_t *row, int64_t k, float *out) {                           \
        for (int64_t blk = 0; blk < k / ELEMS; blk++) {                                                \
            for (int g = 0; g < ELEMS / 32; g++) {                                                     \
                group32 gr = grp_##NAME(row + blk * BYTES, g);                                         \
                float *o = out + blk * ELEMS + g * 32;                                                 \
                __m128i lo = _mm256_castsi256_si128(gr.q), hi = _mm256_extracti128_si256(gr.q, 1);    \
                __m256 d0 = _mm256_set1_ps(gr.d0), d1 = _mm256_set1_ps(gr.d1), mv = _mm256_set1_ps(gr.m); \
                _mm256_storeu_ps(o, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), d0), mv)); \
                _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), d0), mv)); \
                _mm256_storeu_ps(o + 16, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), d1), mv)); \
                _mm256_storeu_ps(o + 24, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), d1), mv)); \
            }                                                                                          \
        }                                                                                              \
    }                                                                                                  \
    static void fast_##NAME(const uint8_t *row, const float *x, const float *xsum, int64_t k, int r, float *out) { \
        switch (r) {                                                                                   \
        case 4: fast_##NAME##_r(row, x, xsum, k, 4, out); return;                                      \
        case 3: fast_##NAME##_r(row, x, xsum, k, 3, out); return;                                      \
        case 2: fast_##NAME##_r(row, x, xsum, k, 2, out); return;                                      \
        default: fast_##NAME##_r(row, x, xsum, k, 1, out);                                            \
        }                                                                                              \
    }
/* whether a type has an additive offset per group, and two scales per group (Q6_K's 16s) */
enum { HAS_MIN_q4_0 = 0, HAS_MIN_q4_1 = 1, HAS_MIN_q5_0 = 0, HAS_MIN_q5_1 = 1, HAS_MIN_q8_0 = 0,
       HAS_MIN_q4_k = 1, HAS_MIN_q5_k = 1, HAS_MIN_q6_k = 0 };
enum { TWO_SCALES_q4_0 = 0, TWO_SCALES_q4_1 = 0, TWO_SCALES_q5_0 = 0, TWO_SCALES_q5_1 = 0, TWO_SCALES_q8_0 = 0,
       TWO_SCALES_q4_k = 0, TWO_SCALES_q5_k = 0, TWO_SCALES_q6_k = 1 };
FAST_ROW(q4_0, 32, 18)
FAST_ROW(q4_1, 32, 20)
FAST_ROW(q5_0, 32, 22)
FAST_ROW(q5_1, 32, 24)
FAST_ROW(q8_0, 32, 34)
FAST_ROW(q4_k, 256, 144)
FAST_ROW(q5_k, 256, 176)
FAST_ROW(q6_k, 256, 210)

typedef void (*fast_fn)(const uint8_t *, const float *, const float *, int64_t, int, float *);

/* type -> (fused dot for up to 4 activation rows, row dequantizer) */
static fast_fn fast_of(int type, row_fn *deq) {
    switch (type) {
    case 2: *deq = fastdeq_q4_0; return fast_q4_0;
    case 3: *deq = fastdeq_q4_1; return fast_q4_1;
    case 6: *deq = fastdeq_q5_0; return fast_q5_0;
    case 7: *deq = fastdeq_q5_1; return fast_q5_1;
    case 8: *deq = fastdeq_q8_0; return fast_q8_0;
    case 12: *deq = fastdeq_q4_k; return fast_q4_k;
    case 13: *deq = fastdeq_q5_k; return fast_q5_k;
    case 14: *deq = fastdeq_q6_k; return fast_q6_k;
    }
    return 0;
}
#endif

/* y [m, ldy] (columns [0, n)) = x [m, k] @ dequantize(w [n, row_bytes])^T; returns 0, or -1 for an
   unknown type or a k the blocks do not divide. */
int gguf_matmul(const float *x, int64_t m, int64_t k, const uint8_t *w, int64_t n, int64_t row_bytes,
                int type, float *y, int64_t ldy, int threads) {
    row_fn fn;
    int elems, bytes;
    if (!block_of(type, &fn, &elems, &bytes) || k % elems || (k / elems) * bytes != row_bytes) return -1;
#ifdef HAVE_FAST
    row_fn fast_deq = fn;
    fast_fn fast = fast_of(type, &fast_deq);
    fn = fast_deq; /* more rows: one register-decoded row into a buffer, dotted with every row */
    if (m <= FAST_MAX_ROWS) {
        int64_t groups = k / 32;
        float *xsum = malloc(sizeof(float) * (size_t)(m * groups));
        for (int64_t i = 0; i < m * groups; i++) {
            float t = 0;
            for (int e = 0; e < 32; e++) t += x[i * 32 + e];
            xsum[i] = t;
        }
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t j = 0; j < n; j++) {
            float out[4];
            for (int64_t i = 0; i < m; i += 4) {
                int r = m - i < 4 ? (int)(m - i) : 4;
                fast(w + j * row_bytes, x + i * k, xsum + i * groups, k, r, out);
                for (int t = 0; t < r; t++) y[(i + t) * ldy + j] = out[t];
            }
        }
        free(xsum);
        return 0;
    }
#endif
#pragma omp parallel num_threads(threads)
    {
        float *buf = aligned_alloc(64, (size_t)((k * 4 + 63) / 64 * 64));
        float out[4];
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++) {
            fn(w + j * row_bytes, k, buf);
            for (int64_t i = 0; i < m; i += 4) {
                int r = m - i < 4 ? (int)(m - i) : 4;
                dot_rows(x + i * k, k, r, buf, out);
                for (int t = 0; t < r; t++) y[(i + t) * ldy + j] = out[t];
            }
        }
        free(buf);
    }
    return 0;
}

/* out [count, k] float32 = the dequantized rows ids[0..count) of w [rows, row_bytes] */
int gguf_dequantize_rows(const uint8_t *w, int64_t row_bytes, int type, int64_t k, const int64_t *ids,
                         int64_t count, float *out) {
    row_fn fn;
    int elems, bytes;
    if (!block_of(type, &fn, &elems, &bytes) || k % elems || (k / elems) * bytes != row_bytes) return -1;
    for (int64_t i = 0; i < count; i++) fn(w + ids[i] * row_bytes, k, out + i * k);
    return 0;
}
