/*
 * qplug's CPU inference kernels for 4-bit code-book weights (bitsandbytes' NF4/FP4; affine integer
 * weights such as GPTQ's and AWQ's as the code book 0..15 with a zero point) and int8 row-wise weights.
 * Built at first use by qplug.native with the system C compiler (cached on disk) and called through
 * ctypes, one call per range of output rows and thread. The float operations are plain IEEE float32
 * operations (no -ffast-math, no contraction), so a dequantized weight is the very value the
 * reference computes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

enum { QPLUG_FLOAT32 = 0, QPLUG_BFLOAT16 = 1, QPLUG_FLOAT16 = 2 };

/* ==========================================================================================
 * y = x @ W^T for 4-bit code-book weights and LLM.int8 weights, reading the weights as stored
 * (no float copy of the weight is ever kept).
 *
 * One build holds three instruction-set paths -- AVX-512, AVX2+FMA and portable C -- chosen
 * per call by `isa` (QPLUG_ISA_*; the caller checks qplug_cpu_isa() first), so a machine with
 * AVX-512 also runs, and tests, the other two. The SIMD paths are GCC/clang target-attribute
 * functions: they need no -march flag, which is why the build's fallback "-O3" still has them.
 *
 * 4-bit layout (bitsandbytes' canonical one): the [N, K] codes row-major, flattened, two per
 * byte, element 2j in the high nibble of byte j; block b of `blocksize` consecutive flattened
 * elements has scale absmax[b] (blocks may straddle rows). With double quantization the
 * scale is code2[qabsmax[b]] * absmax2[b / nested_blocksize] + offset, the float32 operations
 * bitsandbytes' dequantize_4bit does (built without contraction: -ffp-contract=off), decoded
 * here once per block instead of being stored as float32 (that would cost 4 bytes a block).
 * A weight's value is (code[nibble] - zero) * scale in float32: bitsandbytes' code[nibble] * scale
 * exactly when there are no zero points (zero = 0); with per-block zero points (`zeros`, float32
 * holding integers) and the code book 0..15, an affine integer weight (q - zero) * scale, the very
 * float32 value qplug.int_kernels.dequantize computes. The dequantizers (and the AVX-512 GEMV) form the
 * products once per block, as a 16-entry table; the AVX2 GEMVs, for CPUs whose 8-lane float permute is
 * slow, scale each block's sum instead (the same products up to float32 rounding of the sums).
 * ========================================================================================== */

#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

enum { QPLUG_ISA_PORTABLE = 0, QPLUG_ISA_AVX2 = 1, QPLUG_ISA_AVX512 = 2 };

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define QPLUG_X86 1
#include <immintrin.h>
#define QPLUG_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define QPLUG_AVX2 __attribute__((target("avx2,fma,f16c")))
/* The GEMVs stream each weight once; the hardware prefetcher alone left them at a third of the memory bandwidth
 * torch's own reductions reach on the same buffers (Zen 3, measured), so they ask for the bytes this far ahead. */
#ifndef QPLUG_PREFETCH_BYTES
#define QPLUG_PREFETCH_BYTES 1024
#endif
#else
#define QPLUG_X86 0
#endif
#define QPLUG_INLINE static inline __attribute__((always_inline))

/* The best path this CPU (and OS) runs. */
int qplug_cpu_isa(void) {
#if QPLUG_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return QPLUG_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return QPLUG_ISA_AVX2;
#endif
    return QPLUG_ISA_PORTABLE;
}

typedef struct {
    const float *absmax;   /* float32 scales, or NULL when double-quantized */
    const float *zeros;    /* float32 zero points per block, or NULL (none) */
    const uint8_t *qabsmax; /* double quantization: the 8-bit scales ... */
    const float *code2;    /* ... their 256-entry code book ... */
    const float *absmax2;  /* ... its per-block scales ... */
    int64_t nested_blocksize;
    float offset;          /* ... and the mean added back */
    int nested_shift;      /* log2(nested_blocksize) when a power of two (always, from bitsandbytes), else -1 */
} qplug_scales;

static int log2_exact(int64_t v) {
    for (int i = 0; i < 63; i++)
        if (((int64_t)1 << i) == v) return i;
    return -1;
}

static qplug_scales make_scales(const float *absmax, const float *zeros, const uint8_t *qabsmax, const float *code2,
                                const float *absmax2, int64_t nested_blocksize, float offset) {
    const qplug_scales s = {absmax, zeros, qabsmax, code2, absmax2, nested_blocksize, offset,
                            log2_exact(nested_blocksize)};
    return s;
}

/* Block b's scale. (A 64-bit division per block costs more than the block's 64 multiply-adds: shifts.) */
QPLUG_INLINE float block_scale(const qplug_scales *s, int64_t b) {
    if (s->qabsmax == NULL) return s->absmax[b];
    const int64_t nb = s->nested_shift >= 0 ? b >> s->nested_shift : b / s->nested_blocksize;
    const float t = s->code2[s->qabsmax[b]] * s->absmax2[nb];
    return t + s->offset;
}

/* Block b's weights by code: lut[j] = (code[j] - zero) * scale (code[j] itself when zero is 0). */
QPLUG_INLINE void block_lut(const qplug_scales *s, const float *code, int64_t b, float *lut) {
    const float scale = block_scale(s, b), zero = s->zeros == NULL ? 0.0f : s->zeros[b];
    for (int j = 0; j < 16; j++) lut[j] = (code[j] - zero) * scale;
}

static uint16_t float_to_bf16(float f) { /* round to nearest even, NaN kept quiet: torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float load_float(const void *src, int dtype, int64_t i) {
    if (dtype == QPLUG_FLOAT32) return ((const float *)src)[i];
    uint16_t h = ((const uint16_t *)src)[i];
    if (dtype == QPLUG_BFLOAT16) {
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, sizeof(f));
        return f;
    }
    _Float16 v;
    memcpy(&v, &h, sizeof(v));
    return (float)v;
}

#if QPLUG_X86
QPLUG_AVX2 QPLUG_INLINE __m256 lookup16_avx2(__m256i idx, __m256 lo, __m256 hi) {
    /* two 8-entry lookups (low 3 bits of idx), then bit 3 picks the table: moved to the sign bit for blendv */
    const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
    const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

QPLUG_AVX2 QPLUG_INLINE float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif

/* ---- Dequantization: flattened elements [first, first + count) of a 4-bit weight into out[i - base], float32,
 * bfloat16 or float16 (the float32 value code[q] * scale rounded to nearest even, as torch's .to() does), i.e.
 * bitsandbytes' dequantize_4bit for those elements. The blocked (prefill) matmul's producer. */

QPLUG_INLINE void store_scalar(float v, int dtype, void *out, int64_t o) {
    if (dtype == QPLUG_FLOAT32) ((float *)out)[o] = v;
    else if (dtype == QPLUG_BFLOAT16) ((uint16_t *)out)[o] = float_to_bf16(v);
    else ((_Float16 *)out)[o] = (_Float16)v;
}

#if QPLUG_X86
/* 16 floats to bfloat16, rounded as torch's .to(bfloat16) does (nearest even, NaN kept quiet). Built for a CPU
 * with AVX512-BF16 (-march=native), the conversion instruction does it in one step for every value but NaN and
 * denormals (it flushes those to zero): they are checked for and rare, and take the integer rounding. The
 * tiles of a bfloat16 prefill are dequantized through here; the integer rounding took half the time. */
QPLUG_AVX512 QPLUG_INLINE void store16_bf16_avx512(__m512 f, uint16_t *out) {
#ifdef __AVX512BF16__
    if (!_mm512_fpclass_ps_mask(f, 0xa1)) { /* 0x01 quiet NaN, 0x20 denormal, 0x80 signalling NaN */
        _mm256_storeu_si256((__m256i *)out, (__m256i)_mm512_cvtneps_pbh(f));
        return;
    }
#endif
    const __m512i u = _mm512_castps_si512(f);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i *)out, _mm512_cvtepi32_epi16(r));
}

/* 32 elements (16 bytes of codes) from element e (a multiple of 32), AVX-512. */
QPLUG_AVX512 QPLUG_INLINE void dequant32_avx512(const uint8_t *p, __m512 lut, int dtype, void *out, int64_t o) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    /* each byte twice, then the even copy shifted right by 4: element order, high nibble first */
    const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    const __m512i i0 = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes)), shifts);
    const __m512i i1 = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(bytes, bytes)), shifts);
    const __m512 f[2] = {_mm512_permutexvar_ps(i0, lut), _mm512_permutexvar_ps(i1, lut)};
    for (int h = 0; h < 2; h++) {
        if (dtype == QPLUG_FLOAT32) {
            _mm512_storeu_ps((float *)out + o + 16 * h, f[h]);
        } else if (dtype == QPLUG_BFLOAT16) {
            store16_bf16_avx512(f[h], (uint16_t *)out + o + 16 * h);
        } else {
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + o + 16 * h),
                                _mm512_cvtps_ph(f[h], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
    }
}

QPLUG_AVX2 QPLUG_INLINE void dequant32_avx2(const uint8_t *p, __m256 lo, __m256 hi, int dtype, void *out, int64_t o) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    const __m256i shifts = _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    for (int g = 0; g < 4; g++) {
        __m128i part = bytes;
        if (g == 1) part = _mm_srli_si128(bytes, 4);
        if (g == 2) part = _mm_srli_si128(bytes, 8);
        if (g == 3) part = _mm_srli_si128(bytes, 12);
        const __m256i idx = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(part, part)), shifts);
        const __m256 f = lookup16_avx2(idx, lo, hi);
        const int64_t at = o + 8 * g;
        if (dtype == QPLUG_FLOAT32) {
            _mm256_storeu_ps((float *)out + at, f);
        } else if (dtype == QPLUG_BFLOAT16) {
            const __m256i u = _mm256_castps_si256(f);
            const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
            const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
            const __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
            const __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
            const __m256i v = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(q), nan));
            const __m256i packed16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08);
            _mm_storeu_si128((__m128i *)((uint16_t *)out + at), _mm256_castsi256_si128(packed16));
        } else {
            _mm_storeu_si128((__m128i *)((uint16_t *)out + at),
                             _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
    }
}

/* Elements [from, to) (multiples of 32, one block). */
QPLUG_AVX512 static void dequant_run_avx512(const uint8_t *packed, int64_t from, int64_t to, const float *lut, int dtype,
                                            void *out, int64_t base) {
    const __m512 l = _mm512_loadu_ps(lut);
    for (int64_t i = from; i < to; i += 32) dequant32_avx512(packed + (i >> 1), l, dtype, out, i - base);
}

QPLUG_AVX2 static void dequant_run_avx2(const uint8_t *packed, int64_t from, int64_t to, const float *lut, int dtype,
                                        void *out, int64_t base) {
    const __m256 lo = _mm256_loadu_ps(lut), hi = _mm256_loadu_ps(lut + 8);
    for (int64_t i = from; i < to; i += 32) dequant32_avx2(packed + (i >> 1), lo, hi, dtype, out, i - base);
}
#endif

int qplug_dequant_4bit(int isa, const uint8_t *packed, int64_t first, int64_t count, int64_t blocksize,
                       const float *code, const float *absmax, const float *zeros, const uint8_t *qabsmax,
                       const float *code2, const float *absmax2, int64_t nested_blocksize, float offset, int dtype,
                       void *out, int64_t base) {
    if (blocksize <= 0 || (qabsmax != NULL && nested_blocksize <= 0)) return -1;
    if (dtype != QPLUG_FLOAT32 && dtype != QPLUG_BFLOAT16 && dtype != QPLUG_FLOAT16) return -2;
    if (isa > qplug_cpu_isa()) return -3;
    const qplug_scales s = make_scales(absmax, zeros, qabsmax, code2, absmax2, nested_blocksize, offset);
    int64_t i = first;
    const int64_t end = first + count;
    for (int64_t b = first / blocksize; i < end; b++) {
        int64_t stop = (b + 1) * blocksize;
        if (stop > end) stop = end;
        float lut[16];
        block_lut(&s, code, b, lut);
        /* scalar up to a multiple of 32, 32 at a time with SIMD, scalar tail */
        int64_t simd_from = (i + 31) & ~(int64_t)31, simd_to = stop & ~(int64_t)31;
        if (isa == QPLUG_ISA_PORTABLE || simd_from >= simd_to) simd_from = simd_to = stop;
        for (; i < simd_from; i++) {
            const uint8_t byte = packed[i >> 1];
            store_scalar(lut[(i & 1) ? (byte & 15) : (byte >> 4)], dtype, out, i - base);
        }
#if QPLUG_X86
        if (isa == QPLUG_ISA_AVX512) dequant_run_avx512(packed, i, simd_to, lut, dtype, out, base);
        else if (isa == QPLUG_ISA_AVX2) dequant_run_avx2(packed, i, simd_to, lut, dtype, out, base);
        if (isa != QPLUG_ISA_PORTABLE) i = simd_to;
#endif
        for (; i < stop; i++) {
            const uint8_t byte = packed[i >> 1];
            store_scalar(lut[(i & 1) ? (byte & 15) : (byte >> 4)], dtype, out, i - base);
        }
    }
    return 0;
}

/* The GEMV's input layout: x [M, K] (K a multiple of 32) as float32, each 32-element chunk
 * reordered to its 16 even elements then its 16 odd ones, so that one 16-byte load of packed
 * codes gives the even elements' weights (high nibbles) and the odd ones' (low nibbles) with no
 * shuffle back to element order. */
#if QPLUG_X86
/* The same for float32 and bfloat16 without a permutation, 32 elements at a time (the scalar loop took
 * 5-15 us a call, per layer and token). */
QPLUG_AVX2 static void gemv_input_avx2(const void *x, int dtype, int64_t count, float *xr) {
    for (int64_t c = 0; c < count; c += 32) {
        __m256 even[2], odd[2];
        if (dtype == QPLUG_BFLOAT16) { /* 32-bit lane i holds elements 2i (low half) and 2i + 1 (high half) */
            const __m256i mask = _mm256_set1_epi32((int)0xffff0000u);
            for (int h = 0; h < 2; h++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + c + 16 * h));
                even[h] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                odd[h] = _mm256_castsi256_ps(_mm256_and_si256(v, mask));
            }
        } else {
            for (int h = 0; h < 2; h++) {
                const float *f = (const float *)x + c + 16 * h;
                const __m256 a = _mm256_loadu_ps(f), b = _mm256_loadu_ps(f + 8);
                /* per 128-bit lane: a's even (odd) elements then b's; the 64-bit permute puts a's first */
                even[h] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xd8));
                odd[h] = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xdd)), 0xd8));
            }
        }
        _mm256_storeu_ps(xr + c, even[0]);
        _mm256_storeu_ps(xr + c + 8, even[1]);
        _mm256_storeu_ps(xr + c + 16, odd[0]);
        _mm256_storeu_ps(xr + c + 24, odd[1]);
    }
}
#endif

#if QPLUG_X86
/* bfloat16 to float32 in element order, count a multiple of 8 taken. */
QPLUG_AVX2 static void plain_bf16_avx2(const void *x, int64_t count, float *xf) {
    for (int64_t i = 0; i + 8 <= count; i += 8) {
        const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)));
        _mm256_storeu_ps(xf + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
    }
}
#endif

static int gemv_input(int isa, const void *x, int dtype, int64_t M, int64_t K, const int64_t *perm, float *xr) {
    if (K % 32 != 0) return -1;
#if QPLUG_X86
    if (perm == NULL && dtype != QPLUG_FLOAT16 && isa >= QPLUG_ISA_AVX2) {
        gemv_input_avx2(x, dtype, M * K, xr);
        return 0;
    }
#endif
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < K; c += 32)
            for (int j = 0; j < 16; j++) {
                const int64_t even = c + 2 * j, odd = even + 1;
                xr[m * K + c + j] = load_float(x, dtype, m * K + (perm == NULL ? even : perm[even]));
                xr[m * K + c + 16 + j] = load_float(x, dtype, m * K + (perm == NULL ? odd : perm[odd]));
            }
    return 0;
}

int qplug_gemv_4bit_input(const void *x, int dtype, int64_t M, int64_t K, const int64_t *perm, float *xr) {
    return gemv_input(qplug_cpu_isa(), x, dtype, M, K, perm, xr);
}

/* ---- 4-bit GEMV: out[m, n] = sum_k x[m, k] * code[q(n, k)] * scale(n, k), rows [first, first + count),
 * for MR (1..4) input rows at a time; float32 accumulation, per-block scaled code book (16 multiplies a
 * block instead of one a weight: the same float32 products). */

QPLUG_INLINE void gemv4_portable_rows(const float *xr, int MR, int64_t K, const uint8_t *packed, int64_t first,
                                      int64_t count, int64_t blocksize, const float *code, const qplug_scales *s,
                                      float *out, int64_t N) {
    for (int64_t n = first; n < first + count; n++) {
        const uint8_t *p = packed + n * (K / 2);
        const int64_t flat = n * K;
        float acc[4] = {0, 0, 0, 0};
        int64_t c = 0;
        for (int64_t b = flat / blocksize; c < K; b++) {
            int64_t end = (b + 1) * blocksize - flat;
            if (end > K) end = K;
            float lut[16];
            block_lut(s, code, b, lut);
            for (; c < end; c += 32) {
                for (int m = 0; m < MR; m++) {
                    const float *xe = xr + m * K + c;
                    float a = 0.0f;
                    for (int j = 0; j < 16; j++) {
                        const uint8_t byte = p[c / 2 + j];
                        a += lut[byte >> 4] * xe[j] + lut[byte & 15] * xe[16 + j];
                    }
                    acc[m] += a;
                }
            }
        }
        for (int m = 0; m < MR; m++) out[m * N + n] = acc[m];
    }
}

#if QPLUG_X86
QPLUG_AVX2 QPLUG_INLINE void gemv4_avx2_rows(const float *xr, const int MR, int64_t K, const uint8_t *packed,
                                             int64_t first, int64_t count, int64_t blocksize, const float *code,
                                             const qplug_scales *s, float *out, int64_t N) {
    const __m256 code_lo = _mm256_loadu_ps(code), code_hi = _mm256_loadu_ps(code + 8);
    for (int64_t n = first; n < first + count; n++) {
        const uint8_t *p = packed + n * (K / 2);
        const int64_t flat = n * K;
        __m256 acc[2][4]; /* per row: even/odd elements x the two halves of a chunk (four FMA chains in flight) */
        for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm256_setzero_ps();
        int64_t c = 0;
        for (int64_t b = flat / blocksize; c < K; b++) {
            int64_t end = (b + 1) * blocksize - flat;
            if (end > K) end = K;
            const __m256 sc = _mm256_set1_ps(block_scale(s, b));
            const __m256 z = _mm256_set1_ps(s->zeros == NULL ? 0.0f : s->zeros[b]);
            const __m256 lo = _mm256_mul_ps(_mm256_sub_ps(code_lo, z), sc);
            const __m256 hi = _mm256_mul_ps(_mm256_sub_ps(code_hi, z), sc);
            for (; c < end; c += 32) {
                for (int half = 0; half < 2; half++) {
                    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + c / 2 + 8 * half)));
                    const __m256 w_odd = lookup16_avx2(idx, lo, hi);
                    const __m256 w_even = lookup16_avx2(_mm256_srli_epi32(idx, 4), lo, hi);
                    for (int m = 0; m < MR; m++) {
                        const float *xe = xr + m * K + c + 8 * half;
                        acc[m][2 * half] = _mm256_fmadd_ps(w_even, _mm256_loadu_ps(xe), acc[m][2 * half]);
                        acc[m][2 * half + 1] = _mm256_fmadd_ps(w_odd, _mm256_loadu_ps(xe + 16), acc[m][2 * half + 1]);
                    }
                }
            }
        }
        for (int m = 0; m < MR; m++)
            out[m * N + n] = hsum_avx2(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]),
                                                     _mm256_add_ps(acc[m][2], acc[m][3])));
    }
}

QPLUG_AVX512 QPLUG_INLINE void gemv4_avx512_rows(const float *xr, const int MR, int64_t K, const uint8_t *packed,
                                                 int64_t first, int64_t count, int64_t blocksize, const float *code,
                                                 const qplug_scales *s, float *out, int64_t N) {
    const __m512 code16 = _mm512_loadu_ps(code);
    for (int64_t n = first; n < first + count; n++) {
        const uint8_t *p = packed + n * (K / 2);
        const int64_t flat = n * K;
        __m512 acc[4][4]; /* per row: even/odd elements x two chunks in flight (FMA latency) */
        for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_ps();
        int64_t c = 0;
        for (int64_t b = flat / blocksize; c < K; b++) {
            int64_t end = (b + 1) * blocksize - flat;
            if (end > K) end = K;
            const __m512 z = _mm512_set1_ps(s->zeros == NULL ? 0.0f : s->zeros[b]);
            const __m512 lut = _mm512_mul_ps(_mm512_sub_ps(code16, z), _mm512_set1_ps(block_scale(s, b)));
            for (; c + 64 <= end; c += 64) {
                const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + c / 2)));
                const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + c / 2 + 16)));
                const __m512 o0 = _mm512_permutexvar_ps(i0, lut), e0 = _mm512_permutexvar_ps(_mm512_srli_epi32(i0, 4), lut);
                const __m512 o1 = _mm512_permutexvar_ps(i1, lut), e1 = _mm512_permutexvar_ps(_mm512_srli_epi32(i1, 4), lut);
                for (int m = 0; m < MR; m++) {
                    const float *xe = xr + m * K + c;
                    acc[m][0] = _mm512_fmadd_ps(e0, _mm512_loadu_ps(xe), acc[m][0]);
                    acc[m][1] = _mm512_fmadd_ps(o0, _mm512_loadu_ps(xe + 16), acc[m][1]);
                    acc[m][2] = _mm512_fmadd_ps(e1, _mm512_loadu_ps(xe + 32), acc[m][2]);
                    acc[m][3] = _mm512_fmadd_ps(o1, _mm512_loadu_ps(xe + 48), acc[m][3]);
                }
            }
            for (; c < end; c += 32) {
                const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + c / 2)));
                const __m512 o0 = _mm512_permutexvar_ps(i0, lut), e0 = _mm512_permutexvar_ps(_mm512_srli_epi32(i0, 4), lut);
                for (int m = 0; m < MR; m++) {
                    const float *xe = xr + m * K + c;
                    acc[m][0] = _mm512_fmadd_ps(e0, _mm512_loadu_ps(xe), acc[m][0]);
                    acc[m][1] = _mm512_fmadd_ps(o0, _mm512_loadu_ps(xe + 16), acc[m][1]);
                }
            }
        }
        for (int m = 0; m < MR; m++)
            out[m * N + n] = _mm512_reduce_add_ps(
                _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
    }
}

/* AVX2 without a fast 8-lane float permute (Zen 2/3 take several cycles a vpermps; the table lookups above
 * bound decode at about one cycle a weight): the code book's 16 float32 values are split into four byte
 * planes, and two vpshufb-free steps per 32 weights rebuild the floats from four byte lookups (vpshufb, one
 * cycle, two a cycle). The block's scale is applied once to the block's sum and its zero point through the
 * block's sum of x, so the tables are built once per call: sum_k (code[q_k] - z) s x_k = s (sum_k code[q_k] x_k
 * - z sum_k x_k), the same products up to float32 rounding of the sums. Rows must hold whole blocks
 * (K % blocksize == 0). */
QPLUG_AVX2 QPLUG_INLINE void gemv4_avx2_planes_rows(const float *xr, const int MR, int64_t K, const uint8_t *packed,
                                                    int64_t first, int64_t count, int64_t blocksize,
                                                    const __m256i planes[4], const float *xsum,
                                                    const qplug_scales *s, float *out, int64_t N) {
    /* a 16-byte chunk of codes, broadcast to both lanes, becomes 32 indexes ordered so that the four floats
     * vectors come out as xr's elements 0-7, 16-23, 8-15 and 24-31 (xr: 16 even elements, then 16 odd) */
    const __m256i ctrl = _mm256_setr_epi8(0, 1, 2, 3, 0, 1, 2, 3, 8, 9, 10, 11, 8, 9, 10, 11,
                                          4, 5, 6, 7, 4, 5, 6, 7, 12, 13, 14, 15, 12, 13, 14, 15);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const int64_t per_row = K / blocksize;
    for (int64_t n = first; n < first + count; n++) {
        const uint8_t *p = packed + n * (K / 2);
        __m256 total[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        float shift[2] = {0.0f, 0.0f};
        for (int64_t bb = 0; bb < per_row; bb++) {
            const int64_t b = n * per_row + bb;
            __m256 acc[2][4]; /* four FMA chains a row: one chain would wait on the FMA latency */
            for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm256_setzero_ps();
            for (int64_t c = bb * blocksize; c < (bb + 1) * blocksize; c += 32) {
                _mm_prefetch((const char *)(p + c / 2 + QPLUG_PREFETCH_BYTES), _MM_HINT_T0);
                const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p + c / 2)));
                const __m256i d = _mm256_shuffle_epi8(bytes, ctrl);
                const __m256i idx = _mm256_blend_epi32(_mm256_and_si256(d, low4),
                                                       _mm256_and_si256(_mm256_srli_epi16(d, 4), low4), 0x55);
                const __m256i b0 = _mm256_shuffle_epi8(planes[0], idx), b1 = _mm256_shuffle_epi8(planes[1], idx);
                const __m256i b2 = _mm256_shuffle_epi8(planes[2], idx), b3 = _mm256_shuffle_epi8(planes[3], idx);
                const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
                const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
                const __m256 w0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));  /* xr 0-7 */
                const __m256 w2 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));  /* xr 16-23 */
                const __m256 w1 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));  /* xr 8-15 */
                const __m256 w3 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));  /* xr 24-31 */
                for (int m = 0; m < MR; m++) {
                    const float *xe = xr + m * K + c;
                    acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xe), acc[m][0]);
                    acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xe + 8), acc[m][1]);
                    acc[m][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xe + 16), acc[m][2]);
                    acc[m][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xe + 24), acc[m][3]);
                }
            }
            const float scale = block_scale(s, b);
            const __m256 sc = _mm256_set1_ps(scale);
            for (int m = 0; m < MR; m++) {
                const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]));
                total[m] = _mm256_fmadd_ps(sc, sum, total[m]);
                if (xsum != NULL) shift[m] += s->zeros[b] * scale * xsum[m * per_row + bb];
            }
        }
        for (int m = 0; m < MR; m++) out[m * N + n] = hsum_avx2(total[m]) - shift[m];
    }
}

/* The affine case (code book 0..15, a zero point a block: GPTQ's, AWQ's, compressed-tensors' integers) needs no
 * table at all: the nibbles become float32 through an integer conversion, sum_k (q_k - z) s x_k =
 * s (sum_k q_k x_k - z sum_k x_k), and 32 weights take 2 byte shuffles, 2 shifts, 2 ands, 4 conversions and 4 FMAs. */
QPLUG_AVX2 QPLUG_INLINE void gemv4_avx2_affine_rows(const float *xr, const int MR, int64_t K, const uint8_t *packed,
                                                    int64_t first, int64_t count, int64_t blocksize, const float *xsum,
                                                    const qplug_scales *s, float *out, int64_t N) {
    /* a 16-byte chunk of codes broadcast to both lanes: bytes 0-7 (then 8-15) zero-extended to eight dwords */
    const __m256i lo8 = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1,
                                         4, -1, -1, -1, 5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
    const __m256i hi8 = _mm256_setr_epi8(8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1,
                                         12, -1, -1, -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1, -1);
    const __m256i low4 = _mm256_set1_epi32(0x0f);
    const int64_t per_row = K / blocksize;
    for (int64_t n = first; n < first + count; n++) {
        const uint8_t *p = packed + n * (K / 2);
        __m256 total[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        float shift[2] = {0.0f, 0.0f};
        for (int64_t bb = 0; bb < per_row; bb++) {
            const int64_t b = n * per_row + bb;
            __m256 acc[2][4];
            for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm256_setzero_ps();
            for (int64_t c = bb * blocksize; c < (bb + 1) * blocksize; c += 32) {
                _mm_prefetch((const char *)(p + c / 2 + QPLUG_PREFETCH_BYTES), _MM_HINT_T0);
                const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p + c / 2)));
                const __m256i e0 = _mm256_shuffle_epi8(bytes, lo8), e1 = _mm256_shuffle_epi8(bytes, hi8);
                /* high nibbles: the even elements, xr 0-15; low nibbles: the odd ones, xr 16-31 */
                const __m256 w0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(e0, 4));
                const __m256 w1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(e1, 4));
                const __m256 w2 = _mm256_cvtepi32_ps(_mm256_and_si256(e0, low4));
                const __m256 w3 = _mm256_cvtepi32_ps(_mm256_and_si256(e1, low4));
                for (int m = 0; m < MR; m++) {
                    const float *xe = xr + m * K + c;
                    acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xe), acc[m][0]);
                    acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xe + 8), acc[m][1]);
                    acc[m][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xe + 16), acc[m][2]);
                    acc[m][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xe + 24), acc[m][3]);
                }
            }
            const float scale = s->absmax[b];
            const __m256 sc = _mm256_set1_ps(scale);
            for (int m = 0; m < MR; m++) {
                const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]));
                total[m] = _mm256_fmadd_ps(sc, sum, total[m]);
                shift[m] += s->zeros[b] * scale * xsum[m * per_row + bb];
            }
        }
        for (int m = 0; m < MR; m++) out[m * N + n] = hsum_avx2(total[m]) - shift[m];
    }
}

QPLUG_AVX2 static int gemv4_avx2_planes(const float *xr, int64_t M, int64_t K, const uint8_t *packed, int64_t first,
                                         int64_t count, int64_t blocksize, const float *code, const qplug_scales *s,
                                         float *out, int64_t N) {
    uint8_t bytes[4][32];
    for (int j = 0; j < 16; j++) {
        uint32_t u;
        memcpy(&u, &code[j], sizeof(u));
        for (int k = 0; k < 4; k++) bytes[k][j] = bytes[k][16 + j] = (uint8_t)(u >> (8 * k));
    }
    __m256i planes[4];
    for (int k = 0; k < 4; k++) planes[k] = _mm256_loadu_si256((const __m256i *)bytes[k]);
    const int64_t per_row = K / blocksize;
    float *xsum = NULL;
    if (s->zeros != NULL) { /* each row's sum of x over each block: the zero points' share */
        xsum = (float *)malloc(sizeof(float) * (size_t)(M * per_row));
        if (xsum == NULL) return -2;
        for (int64_t m = 0; m < M; m++)
            for (int64_t bb = 0; bb < per_row; bb++) {
                __m256 a = _mm256_setzero_ps();
                for (int64_t c = bb * blocksize; c < (bb + 1) * blocksize; c += 8)
                    a = _mm256_add_ps(a, _mm256_loadu_ps(xr + m * K + c));
                xsum[m * per_row + bb] = hsum_avx2(a);
            }
    }
    int affine = xsum != NULL && s->qabsmax == NULL;
    for (int j = 0; j < 16; j++) affine = affine && code[j] == (float)j;
    for (int64_t m = 0; m < M; m += 2) {
        const float *xs = xsum == NULL ? NULL : xsum + m * per_row;
        if (affine && M - m >= 2) gemv4_avx2_affine_rows(xr + m * K, 2, K, packed, first, count, blocksize, xs, s,
                                                          out + m * N, N);
        else if (affine) gemv4_avx2_affine_rows(xr + m * K, 1, K, packed, first, count, blocksize, xs, s, out + m * N, N);
        else if (M - m >= 2) gemv4_avx2_planes_rows(xr + m * K, 2, K, packed, first, count, blocksize, planes, xs, s,
                                               out + m * N, N);
        else gemv4_avx2_planes_rows(xr + m * K, 1, K, packed, first, count, blocksize, planes, xs, s, out + m * N, N);
    }
    free(xsum);
    return 0;
}

QPLUG_AVX2 static void gemv4_avx2(const float *xr, int64_t M, int64_t K, const uint8_t *packed, int64_t first,
                                  int64_t count, int64_t blocksize, const float *code, const qplug_scales *s,
                                  float *out, int64_t N) {
    for (int64_t m = 0; m < M; m += 2) {
        if (M - m >= 2) gemv4_avx2_rows(xr + m * K, 2, K, packed, first, count, blocksize, code, s, out + m * N, N);
        else gemv4_avx2_rows(xr + m * K, 1, K, packed, first, count, blocksize, code, s, out + m * N, N);
    }
}

QPLUG_AVX512 static void gemv4_avx512(const float *xr, int64_t M, int64_t K, const uint8_t *packed, int64_t first,
                                      int64_t count, int64_t blocksize, const float *code, const qplug_scales *s,
                                      float *out, int64_t N) {
    for (int64_t m = 0; m < M; m += 4) {
        const float *x = xr + m * K;
        float *o = out + m * N;
        switch (M - m >= 4 ? 4 : M - m) {
        case 4: gemv4_avx512_rows(x, 4, K, packed, first, count, blocksize, code, s, o, N); break;
        case 3: gemv4_avx512_rows(x, 3, K, packed, first, count, blocksize, code, s, o, N); break;
        case 2: gemv4_avx512_rows(x, 2, K, packed, first, count, blocksize, code, s, o, N); break;
        default: gemv4_avx512_rows(x, 1, K, packed, first, count, blocksize, code, s, o, N); break;
        }
    }
}
#endif

static void gemv4_portable(const float *xr, int64_t M, int64_t K, const uint8_t *packed, int64_t first, int64_t count,
                           int64_t blocksize, const float *code, const qplug_scales *s, float *out, int64_t N) {
    for (int64_t m = 0; m < M; m += 4) {
        const int mr = M - m >= 4 ? 4 : (int)(M - m);
        gemv4_portable_rows(xr + m * K, mr, K, packed, first, count, blocksize, code, s, out + m * N, N);
    }
}

/* Output rows [first, first + count) of y [M, N] (float32) from xr (qplug_gemv_4bit_input's layout). */
int qplug_gemv_4bit(int isa, int64_t first, int64_t count, const float *xr, int64_t M, int64_t K,
                    const uint8_t *packed, int64_t blocksize, const float *code, const float *absmax,
                    const float *zeros, const uint8_t *qabsmax, const float *code2, const float *absmax2,
                    int64_t nested_blocksize, float offset, float *out, int64_t N) {
    if (K % 32 != 0 || blocksize % 32 != 0 || blocksize <= 0 || (qabsmax != NULL && nested_blocksize <= 0)) return -1;
    if (isa > qplug_cpu_isa()) return -3;
    const qplug_scales s = make_scales(absmax, zeros, qabsmax, code2, absmax2, nested_blocksize, offset);
#if QPLUG_X86
    if (isa == QPLUG_ISA_AVX512) {
        gemv4_avx512(xr, M, K, packed, first, count, blocksize, code, &s, out, N);
        return 0;
    }
    if (isa == QPLUG_ISA_AVX2) {
        if (K % blocksize == 0) return gemv4_avx2_planes(xr, M, K, packed, first, count, blocksize, code, &s, out, N);
        gemv4_avx2(xr, M, K, packed, first, count, blocksize, code, &s, out, N);
        return 0;
    }
#endif
    gemv4_portable(xr, M, K, packed, first, count, blocksize, code, &s, out, N);
    return 0;
}

/* ---- LLM.int8 GEMV: out[m, n] = (sum_k x[m, k] * CB[n, k]) * scale[n], x float32 [M, K], rows [first, first + count). */

static void gemv8_portable(const float *x, int64_t M, int64_t K, const int8_t *cb, const float *scale,
                           int64_t first, int64_t count, float *out, int64_t N) {
    for (int64_t n = first; n < first + count; n++) {
        const int8_t *w = cb + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float *xm = x + m * K;
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc += (float)w[k] * xm[k];
            out[m * N + n] = acc * scale[n];
        }
    }
}

#if QPLUG_X86
/* The int8 GEMVs' inner product: sum_k w[k] x_m[k] for k in [k0, k1), MR (1, 2) rows of x at a time, four FMA
 * chains a row (one or two chains wait on the FMA latency: 8-bit decode ran at half speed on Zen 3), left as
 * eight lanes in vec[m] plus the scalar tail (k1 - k0 not a multiple of 8) in tail[m]: a grouped GEMV scales
 * the lanes, and sums them horizontally once a row rather than once a group. */
QPLUG_AVX2 QPLUG_INLINE void dot8_avx2(const int MR, const int8_t *w, const float *x, int64_t K, int64_t k0, int64_t k1,
                                       __m256 *vec, float *tail) {
    __m256 acc[2][4];
    for (int m = 0; m < MR; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
        _mm_prefetch((const char *)(w + k + 2 * QPLUG_PREFETCH_BYTES), _MM_HINT_T0); /* twice the bytes a weight */
        __m256 wv[4];
        for (int j = 0; j < 4; j++)
            wv[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k + 8 * j))));
        for (int m = 0; m < MR; m++)
            for (int j = 0; j < 4; j++)
                acc[m][j] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(x + m * K + k + 8 * j), acc[m][j]);
    }
    for (; k + 8 <= k1; k += 8) {
        const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(w + k))));
        for (int m = 0; m < MR; m++) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
    }
    for (int m = 0; m < MR; m++) {
        vec[m] = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]));
        float a = 0.0f;
        for (int64_t j = k; j < k1; j++) a += (float)w[j] * x[m * K + j];
        tail[m] = a;
    }
}

QPLUG_AVX2 static void gemv8_avx2(const float *x, int64_t M, int64_t K, const int8_t *cb, const float *scale,
                                  int64_t first, int64_t count, float *out, int64_t N) {
    for (int64_t m0 = 0; m0 < M; m0 += 2) {
        const int mr = M - m0 >= 2 ? 2 : 1;
        for (int64_t n = first; n < first + count; n++) {
            __m256 vec[2];
            float tail[2];
            if (mr == 2) dot8_avx2(2, cb + n * K, x + m0 * K, K, 0, K, vec, tail);
            else dot8_avx2(1, cb + n * K, x + m0 * K, K, 0, K, vec, tail);
            for (int m = 0; m < mr; m++) out[(m0 + m) * N + n] = (hsum_avx2(vec[m]) + tail[m]) * scale[n];
        }
    }
}

QPLUG_AVX512 static void gemv8_avx512(const float *x, int64_t M, int64_t K, const int8_t *cb, const float *scale,
                                      int64_t first, int64_t count, float *out, int64_t N) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mr = M - m0 >= 4 ? 4 : (int)(M - m0);
        for (int64_t n = first; n < first + count; n++) {
            const int8_t *w = cb + n * K;
            __m512 acc[4][2];
            for (int m = 0; m < 4; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
            int64_t k = 0;
            for (; k + 32 <= K; k += 32) {
                const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
                const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 16))));
                for (int m = 0; m < mr; m++) {
                    const float *xm = x + (m0 + m) * K + k;
                    acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m][0]);
                    acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[m][1]);
                }
            }
            for (int m = 0; m < mr; m++) {
                float a = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
                const float *xm = x + (m0 + m) * K;
                for (int64_t j = k; j < K; j++) a += (float)w[j] * xm[j];
                out[(m0 + m) * N + n] = a * scale[n];
            }
        }
    }
}
#endif

int qplug_gemv_int8(int isa, int64_t first, int64_t count, const float *x, int64_t M, int64_t K, const int8_t *cb,
                    const float *scale, float *out, int64_t N) {
    if (isa > qplug_cpu_isa()) return -3;
#if QPLUG_X86
    if (isa == QPLUG_ISA_AVX512) {
        gemv8_avx512(x, M, K, cb, scale, first, count, out, N);
        return 0;
    }
    if (isa == QPLUG_ISA_AVX2) {
        gemv8_avx2(x, M, K, cb, scale, first, count, out, N);
        return 0;
    }
#endif
    gemv8_portable(x, M, K, cb, scale, first, count, out, N);
    return 0;
}

/* ---- Grouped int8 GEMV (affine 8-bit weights: GPTQ's, ...): out[m, n] = sum_g scale[n, g] *
 * (sum_{k in g} x[m, k] * q[n, k] - zero[n, g] * xsum[m, g]), with q int8 [N, K], groups of `group`
 * consecutive columns (K a multiple of it), scale and zero float32 [N, K / group], xsum[m, g] the sum of x
 * over group g (zero may be NULL: no zero points). float32 throughout, rows [first, first + count). */

static void gemv8g_portable(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t group,
                            const float *scale, const float *zero, const float *xsum, int64_t first, int64_t count,
                            float *out, int64_t N) {
    const int64_t G = K / group;
    for (int64_t n = first; n < first + count; n++)
        for (int64_t m = 0; m < M; m++) {
            float total = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                float a = 0.0f;
                for (int64_t k = g * group; k < (g + 1) * group; k++) a += (float)q[n * K + k] * x[m * K + k];
                if (zero != NULL) a -= zero[n * G + g] * xsum[m * G + g];
                total += scale[n * G + g] * a;
            }
            out[m * N + n] = total;
        }
}

#if QPLUG_X86
QPLUG_AVX2 static void gemv8g_avx2(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t group,
                                   const float *scale, const float *zero, const float *xsum, int64_t first,
                                   int64_t count, float *out, int64_t N) {
    const int64_t G = K / group;
    for (int64_t m0 = 0; m0 < M; m0 += 2) {
        const int mr = M - m0 >= 2 ? 2 : 1;
        for (int64_t n = first; n < first + count; n++) {
            const int8_t *w = q + n * K;
            __m256 total[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            float rest[2] = {0.0f, 0.0f}; /* the groups' scalar tails, less their zero points' share */
            for (int64_t g = 0; g < G; g++) {
                __m256 vec[2];
                float tail[2];
                if (mr == 2) dot8_avx2(2, w, x + m0 * K, K, g * group, (g + 1) * group, vec, tail);
                else dot8_avx2(1, w, x + m0 * K, K, g * group, (g + 1) * group, vec, tail);
                const float sc = scale[n * G + g];
                for (int m = 0; m < mr; m++) {
                    total[m] = _mm256_fmadd_ps(_mm256_set1_ps(sc), vec[m], total[m]);
                    float a = tail[m];
                    if (zero != NULL) a -= zero[n * G + g] * xsum[(m0 + m) * G + g];
                    rest[m] += sc * a;
                }
            }
            for (int m = 0; m < mr; m++) out[(m0 + m) * N + n] = hsum_avx2(total[m]) + rest[m];
        }
    }
}

QPLUG_AVX512 static void gemv8g_avx512(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t group,
                                       const float *scale, const float *zero, const float *xsum, int64_t first,
                                       int64_t count, float *out, int64_t N) {
    const int64_t G = K / group;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mr = M - m0 >= 4 ? 4 : (int)(M - m0);
        for (int64_t n = first; n < first + count; n++) {
            const int8_t *w = q + n * K;
            float total[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t g = 0; g < G; g++) {
                __m512 acc[4][2];
                for (int m = 0; m < 4; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
                int64_t k = g * group;
                const int64_t end = k + group;
                for (; k + 32 <= end; k += 32) {
                    const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
                    const __m512 w1 =
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 16))));
                    for (int m = 0; m < mr; m++) {
                        const float *xm = x + (m0 + m) * K + k;
                        acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm), acc[m][0]);
                        acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + 16), acc[m][1]);
                    }
                }
                for (int m = 0; m < mr; m++) {
                    float a = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
                    const float *xm = x + (m0 + m) * K;
                    for (int64_t j = k; j < end; j++) a += (float)w[j] * xm[j];
                    if (zero != NULL) a -= zero[n * G + g] * xsum[(m0 + m) * G + g];
                    total[m] += scale[n * G + g] * a;
                }
            }
            for (int m = 0; m < mr; m++) out[(m0 + m) * N + n] = total[m];
        }
    }
}
#endif

int qplug_gemv_int8_grouped(int isa, int64_t first, int64_t count, const float *x, int64_t M, int64_t K,
                            const int8_t *q, int64_t group, const float *scale, const float *zero, const float *xsum,
                            float *out, int64_t N) {
    if (group <= 0 || K % group != 0) return -1;
    if (isa > qplug_cpu_isa()) return -3;
#if QPLUG_X86
    if (isa == QPLUG_ISA_AVX512) {
        gemv8g_avx512(x, M, K, q, group, scale, zero, xsum, first, count, out, N);
        return 0;
    }
    if (isa == QPLUG_ISA_AVX2) {
        gemv8g_avx2(x, M, K, q, group, scale, zero, xsum, first, count, out, N);
        return 0;
    }
#endif
    gemv8g_portable(x, M, K, q, group, scale, zero, xsum, first, count, out, N);
    return 0;
}

/* ---- Dequantization of int8 weights: rows [first, first + count) of codes q [N, K] (int8, row-major) with
 * per-group float32 scales [N, K / group] and zero points (NULL: none), w = (q - zero) * scale in float32 --
 * LLM.int8's CB * (SCB / 127) with group = K and no zero, or a GPTQ 8-bit layer's codes -- into
 * out[(r - base) * K + c] as float32, bfloat16 or float16. The blocked (prefill) matmul's producer. */
#if QPLUG_X86
QPLUG_AVX512 QPLUG_INLINE void store16_avx512(__m512 f, int dtype, void *out, int64_t o) {
    if (dtype == QPLUG_FLOAT32) {
        _mm512_storeu_ps((float *)out + o, f);
    } else if (dtype == QPLUG_BFLOAT16) {
        store16_bf16_avx512(f, (uint16_t *)out + o);
    } else {
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + o),
                            _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}

QPLUG_AVX512 static void dequant8_row_avx512(const int8_t *q, int64_t K, int64_t group, const float *scale,
                                             const float *zero, int dtype, void *out, int64_t o) {
    for (int64_t g0 = 0; g0 < K; g0 += group) {
        const __m512 s = _mm512_set1_ps(scale[g0 / group]), z = _mm512_set1_ps(zero == NULL ? 0.0f : zero[g0 / group]);
        int64_t c = g0;
        for (; c + 16 <= g0 + group; c += 16) {
            const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + c))));
            store16_avx512(_mm512_mul_ps(_mm512_sub_ps(v, z), s), dtype, out, o + c);
        }
        for (; c < g0 + group; c++)
            store_scalar(((float)q[c] - (zero == NULL ? 0.0f : zero[g0 / group])) * scale[g0 / group], dtype, out, o + c);
    }
}

#endif

#if QPLUG_X86
QPLUG_AVX2 static void dequant8_row_avx2(const int8_t *q, int64_t K, int64_t group, const float *scale,
                                         const float *zero, int dtype, void *out, int64_t o) {
    for (int64_t g0 = 0; g0 < K; g0 += group) {
        const float sg = scale[g0 / group], zg = zero == NULL ? 0.0f : zero[g0 / group];
        const __m256 s = _mm256_set1_ps(sg), z = _mm256_set1_ps(zg);
        int64_t c = g0;
        for (; c + 8 <= g0 + group; c += 8) {
            const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + c))));
            const __m256 f = _mm256_mul_ps(_mm256_sub_ps(v, z), s);
            if (dtype == QPLUG_FLOAT32) {
                _mm256_storeu_ps((float *)out + o + c, f);
            } else if (dtype == QPLUG_FLOAT16) {
                _mm_storeu_si128((__m128i *)((uint16_t *)out + o + c),
                                 _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            } else {
                float tmp[8];
                _mm256_storeu_ps(tmp, f);
                for (int j = 0; j < 8; j++) store_scalar(tmp[j], dtype, out, o + c + j);
            }
        }
        for (; c < g0 + group; c++) store_scalar(((float)q[c] - zg) * sg, dtype, out, o + c);
    }
}
#endif

int qplug_dequant_int8(int isa, int64_t first, int64_t count, const int8_t *q, int64_t K, int64_t group,
                       const float *scale, const float *zero, int dtype, void *out, int64_t base) {
    if (group <= 0 || K % group != 0) return -1;
    if (dtype != QPLUG_FLOAT32 && dtype != QPLUG_BFLOAT16 && dtype != QPLUG_FLOAT16) return -2;
    if (isa > qplug_cpu_isa()) return -3;
    const int64_t groups = K / group;
    for (int64_t r = first; r < first + count; r++) {
        const int8_t *qr = q + r * K;
        const float *sr = scale + r * groups, *zr = zero == NULL ? NULL : zero + r * groups;
        const int64_t o = (r - base) * K;
#if QPLUG_X86
        if (isa == QPLUG_ISA_AVX512) {
            dequant8_row_avx512(qr, K, group, sr, zr, dtype, out, o);
            continue;
        }
        if (isa == QPLUG_ISA_AVX2) {
            dequant8_row_avx2(qr, K, group, sr, zr, dtype, out, o);
            continue;
        }
#endif
        for (int64_t c = 0; c < K; c++)
            store_scalar(((float)qr[c] - (zr == NULL ? 0.0f : zr[c / group])) * sr[c / group], dtype, out, o + c);
    }
    return 0;
}

/* ---- Dequantization of torch's CPU int4 packing (aten._convert_weight_to_int4pack_for_cpu), transposed:
 * blocks [first, first + count) of `block` (32 or 64) output rows; block b holds, for each input column k,
 * block / 2 bytes whose low nibbles are rows b * block + j and high nibbles rows b * block + block / 2 + j
 * (the layout qplug.int_kernels reads off the packer before calling this). scales_zeros is torch's bfloat16
 * [K / group, N, 2] (scale, zero): w = (q - 8) * scale + zero, in float32. Written as W^T: out[k * ld +
 * (b - base) * block + j], so that a tile of rows is the right operand of one matmul. */
QPLUG_INLINE float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

#if QPLUG_X86
/* One input column of a 64-row block: 32 bytes, low nibbles rows 0..31, high nibbles rows 32..63. */
QPLUG_AVX512 static void int4pack_column64_avx512(const uint8_t *p, const float *s, const float *z, int dtype,
                                                  void *out, int64_t o) {
    const __m256i bytes = _mm256_loadu_si256((const __m256i *)p);
    const __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi8(15));
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(15));
    const __m128i parts[4] = {_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1),
                              _mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)};
    for (int h = 0; h < 4; h++) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(parts[h]));
        store16_avx512(_mm512_fmadd_ps(v, _mm512_loadu_ps(s + 16 * h), _mm512_loadu_ps(z + 16 * h)), dtype, out,
                       o + 16 * h);
    }
}
#endif

int qplug_dequant_int4pack(int isa, int64_t first, int64_t count, const uint8_t *packed, int64_t K, int64_t block,
                           const uint16_t *scales_zeros, int64_t N, int64_t group, int dtype, void *out, int64_t ld,
                           int64_t base) {
    if ((block != 32 && block != 64) || group <= 0 || K % group != 0 || ld < (first + count - base) * block) return -1;
    if (dtype != QPLUG_FLOAT32 && dtype != QPLUG_BFLOAT16 && dtype != QPLUG_FLOAT16) return -2;
    if (isa > qplug_cpu_isa()) return -3;
    const int64_t half = block / 2;
    for (int64_t b = first; b < first + count; b++) {
        const uint8_t *pb = packed + b * block * K / 2;
        float s[64], z[64];
        for (int64_t k = 0; k < K; k++) {
            if (k % group == 0) { /* this group's scales and zero terms, z - 8 * s, for the block's rows */
                const uint16_t *sz = scales_zeros + ((k / group) * N + b * block) * 2;
                for (int64_t j = 0; j < block; j++) {
                    s[j] = bf16_to_float(sz[2 * j]);
                    z[j] = bf16_to_float(sz[2 * j + 1]) - 8.0f * s[j];
                }
            }
            const uint8_t *p = pb + k * half;
            const int64_t o = k * ld + (b - base) * block;
#if QPLUG_X86
            if (isa == QPLUG_ISA_AVX512 && block == 64) {
                int4pack_column64_avx512(p, s, z, dtype, out, o);
                continue;
            }
#endif
            for (int64_t j = 0; j < half; j++) {
                store_scalar(fmaf((float)(p[j] & 15), s[j], z[j]), dtype, out, o + j);
                store_scalar(fmaf((float)(p[j] >> 4), s[half + j], z[half + j]), dtype, out, o + half + j);
            }
        }
    }
    return 0;
}

/* ---- W4A8 GEMV (opt-in): affine 4-bit weights times activations rounded to int8.
 *
 * The float GEMVs above convert every weight to float32 and spend four FMAs on 32 weights; on an AVX2 core
 * that shares its vector pipes between two hyperthreads they are compute-bound below the memory bandwidth.
 * Here the activations are rounded to int8 once per call, per block of 64 inputs (scale max|x| / 127), and
 * 64 weights take one load, two ands, a shift, two vpmaddubsw (u8 code x s8 input, pairwise sums in int16:
 * at most 2 * 15 * 127 each), an add, a vpmaddwd into int32, one conversion and one FMA by the block's scale.
 * The result is exactly sum_k (q_k - z) s x^_k with x^ = round(x / sx) sx, up to float32 summation order: the
 * weights are unchanged, the activations carry int8 rounding (relative error up to 1/254 of the block's
 * largest input). */
#define QPLUG_W4A8_BLOCK 64

/* xr (qplug_gemv_4bit_input's layout) [M, K] -> xq int8 [M, K]: per 64 inputs, the even elements of both
 * 32-element chunks, then their odd ones (the nibble order of one 32-byte load of codes); sx [M, K / 64], each
 * block's scale; xs [M, K / 64], sx times the block's sum of xq (the zero points' share). */
int qplug_w4a8_input(const float *xr, int64_t M, int64_t K, int8_t *xq, float *sx, float *xs) {
    if (K % QPLUG_W4A8_BLOCK != 0) return -1;
    const int64_t blocks = K / QPLUG_W4A8_BLOCK;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < blocks; b++) {
            const float *src = xr + m * K + b * QPLUG_W4A8_BLOCK;
            int8_t *dst = xq + m * K + b * QPLUG_W4A8_BLOCK;
            float amax = 0.0f;
            for (int j = 0; j < QPLUG_W4A8_BLOCK; j++) amax = fmaxf(amax, fabsf(src[j]));
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            /* destination j takes source from[j / 16] + j % 16 (chunk 0 evens, chunk 1 evens, chunk 0 odds, ...) */
            static const int from[4] = {0, 32, 16, 48};
            int32_t sum = 0;
            for (int j = 0; j < QPLUG_W4A8_BLOCK; j++) {
                float r = nearbyintf(src[from[j / 16] + j % 16] * inv);
                r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
                dst[j] = (int8_t)r;
                sum += dst[j];
            }
            sx[m * blocks + b] = amax / 127.0f;
            xs[m * blocks + b] = (amax / 127.0f) * (float)sum;
        }
    return 0;
}

static void gemv_w4a8_portable(const int8_t *xq, const float *sx, const float *xs, int64_t M, int64_t K,
                               const uint8_t *packed, int64_t blocksize, const float *scale, const float *zero,
                               int64_t first, int64_t count, float *out, int64_t N) {
    const int64_t blocks = K / QPLUG_W4A8_BLOCK, groups = K / blocksize, per_group = blocksize / QPLUG_W4A8_BLOCK;
    for (int64_t n = first; n < first + count; n++) {
        const uint8_t *p = packed + n * (K / 2);
        for (int64_t m = 0; m < M; m++) {
            float total = 0.0f, shift = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                float acc = 0.0f, xsum = 0.0f;
                for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
                    const uint8_t *w = p + b * (QPLUG_W4A8_BLOCK / 2);
                    const int8_t *x = xq + m * K + b * QPLUG_W4A8_BLOCK;
                    int32_t dot = 0;
                    for (int j = 0; j < 32; j++) dot += (w[j] >> 4) * x[j] + (w[j] & 15) * x[32 + j];
                    acc += (float)dot * sx[m * blocks + b];
                    xsum += xs[m * blocks + b];
                }
                total += scale[n * groups + g] * acc;
                if (zero != NULL) shift += zero[n * groups + g] * scale[n * groups + g] * xsum;
            }
            out[m * N + n] = total - shift;
        }
    }
}

#if QPLUG_X86
/* one 64-weight block: the int32 lane sums of q * xq (32 bytes of codes, see qplug_w4a8_input) */
QPLUG_AVX2 QPLUG_INLINE __m256i w4a8_block_avx2(const uint8_t *w, const int8_t *x) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m256i codes = _mm256_loadu_si256((const __m256i *)w);
    const __m256i even = _mm256_and_si256(_mm256_srli_epi16(codes, 4), low4), odd = _mm256_and_si256(codes, low4);
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(even, _mm256_loadu_si256((const __m256i *)x)),
                                           _mm256_maddubs_epi16(odd, _mm256_loadu_si256((const __m256i *)(x + 32))));
    return _mm256_madd_epi16(pairs, ones);
}

QPLUG_AVX2 static void gemv_w4a8_avx2(const int8_t *xq, const float *sx, const float *xs, int64_t M, int64_t K,
                                      const uint8_t *packed, int64_t blocksize, const float *scale, const float *zero,
                                      int64_t first, int64_t count, float *out, int64_t N) {
    const int64_t blocks = K / QPLUG_W4A8_BLOCK, groups = K / blocksize, per_group = blocksize / QPLUG_W4A8_BLOCK;
    float *xg = (float *)malloc(sizeof(float) * (size_t)(M * groups)); /* each row's sum of x^ per group */
    if (xg == NULL) {
        gemv_w4a8_portable(xq, sx, xs, M, K, packed, blocksize, scale, zero, first, count, out, N);
        return;
    }
    for (int64_t i = 0; i < M * groups; i++) {
        float sum = 0.0f;
        for (int64_t b = i * per_group; b < (i + 1) * per_group; b++) sum += xs[b];
        xg[i] = sum;
    }
    for (int64_t n = first; n < first + count; n++) {
        const uint8_t *p = packed + n * (K / 2);
        const float *sn = scale + n * groups;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *xm = xq + m * K;
            const float *sxm = sx + m * blocks;
            __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}; /* two FMA chains: latency */
            /* each block's int32 sums times its input scale and its group's weight scale, straight into the row's
             * float32 sum */
            for (int64_t b = 0; b < blocks; b++) {
                _mm_prefetch((const char *)(p + b * (QPLUG_W4A8_BLOCK / 2) + QPLUG_PREFETCH_BYTES), _MM_HINT_T0);
                const __m256i dot = w4a8_block_avx2(p + b * (QPLUG_W4A8_BLOCK / 2), xm + b * QPLUG_W4A8_BLOCK);
                acc[b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(sxm[b] * sn[b / per_group]),
                                             acc[b & 1]);
            }
            float shift = 0.0f;
            if (zero != NULL)
                for (int64_t g = 0; g < groups; g++) shift += zero[n * groups + g] * sn[g] * xg[m * groups + g];
            out[m * N + n] = hsum_avx2(_mm256_add_ps(acc[0], acc[1])) - shift;
        }
    }
    free(xg);
}
#endif

/* Output rows [first, first + count) of y [M, N] (float32) from qplug_w4a8_input's xq, sx, xs; codes as the
 * 4-bit GEMV's (two a byte, element 2j high), a float32 scale (and zero point, or NULL) per group of
 * `blocksize` (a multiple of 64 dividing K) along each row. */
int qplug_gemv_w4a8(int isa, int64_t first, int64_t count, const int8_t *xq, const float *sx, const float *xs,
                    int64_t M, int64_t K, const uint8_t *packed, int64_t blocksize, const float *scale,
                    const float *zero, float *out, int64_t N) {
    if (blocksize <= 0 || blocksize % QPLUG_W4A8_BLOCK != 0 || K % blocksize != 0) return -1;
    if (isa > qplug_cpu_isa()) return -3;
#if QPLUG_X86
    if (isa >= QPLUG_ISA_AVX2) { /* AVX-512 machines run the AVX2 code too (no VNNI path yet) */
        gemv_w4a8_avx2(xq, sx, xs, M, K, packed, blocksize, scale, zero, first, count, out, N);
        return 0;
    }
#endif
    gemv_w4a8_portable(xq, sx, xs, M, K, packed, blocksize, scale, zero, first, count, out, N);
    return 0;
}

/* ---- LLM.int8 inference arithmetic (opt-in): bitsandbytes' MatMul8bitLt forward, int8 inputs times int8 rows.
 *
 * bitsandbytes' inference forward rounds the input to float16, zeroes the elements at or above the threshold
 * (their columns are multiplied in float by the caller), quantizes each row to int8 by its largest remaining
 * magnitude (round(x * (127 * (1 / absmax)))), zeroes whole outlier columns when there are several rows, multiplies
 * in integers and scales: dot * (absmax * SCB) * 6.200124e-05 (1 / 127^2). The same steps here, in the same float32
 * operations; the integer dot products are exact (bitsandbytes' default CPU backend sums them in float32).
 * 32 weights take one vpmaddubsw on |w| and x signed by w (at most 2 * 128 * 127 a pair), a vpmaddwd and an add. */

/* x [M, K] (any float dtype) -> xq int8 [M, K], absmax [M] (float32), outlier [K] set to 1 for a column with an
 * element at or above `threshold` (threshold > 0). Returns the number of outlier columns. */
int qplug_llm_int8_input(const void *x, int dtype, int64_t M, int64_t K, float threshold, int8_t *xq, float *absmax,
                         uint8_t *outlier) {
    int64_t columns = 0;
    threshold = (float)(_Float16)threshold; /* bitsandbytes compares the float16 input with a float16 threshold */
    for (int64_t m = 0; m < M; m++) {
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) {
            const float a = fabsf((float)(_Float16)load_float(x, dtype, m * K + k));
            if (threshold > 0.0f && a >= threshold) {
                columns += outlier[k] == 0;
                outlier[k] = 1;
            } else if (a > amax) {
                amax = a;
            }
        }
        absmax[m] = amax;
        const float inv = 127.0f * (1.0f / amax);
        for (int64_t k = 0; k < K; k++) {
            const float v = (float)(_Float16)load_float(x, dtype, m * K + k);
            const int out = threshold > 0.0f && fabsf(v) >= threshold;
            xq[m * K + k] = (out || amax == 0.0f) ? 0 : (int8_t)nearbyintf(v * inv);
        }
    }
    if (M > 1 && columns > 0) /* several rows: an outlier column is left out of every row's int8 product */
        for (int64_t k = 0; k < K; k++)
            if (outlier[k])
                for (int64_t m = 0; m < M; m++) xq[m * K + k] = 0;
    return (int)columns;
}

static void gemv_llm_int8_portable(const int8_t *xq, const float *absmax, int64_t M, int64_t K, const int8_t *cb,
                                   const float *scb, int64_t first, int64_t count, float *out, int64_t N) {
    for (int64_t n = first; n < first + count; n++)
        for (int64_t m = 0; m < M; m++) {
            int32_t dot = 0;
            for (int64_t k = 0; k < K; k++) dot += (int32_t)xq[m * K + k] * cb[n * K + k];
            out[m * N + n] = (float)dot * (absmax[m] * scb[n]) * 6.200124e-05f;
        }
}

#if QPLUG_X86
QPLUG_AVX2 static void gemv_llm_int8_avx2(const int8_t *xq, const float *absmax, int64_t M, int64_t K,
                                          const int8_t *cb, const float *scb, int64_t first, int64_t count, float *out,
                                          int64_t N) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t n = first; n < first + count; n++) {
        const int8_t *w = cb + n * K;
        for (int64_t m = 0; m < M; m++) {
            const int8_t *x = xq + m * K;
            __m256i acc = _mm256_setzero_si256();
            int64_t k = 0;
            for (; k + 32 <= K; k += 32) {
                _mm_prefetch((const char *)(w + k + 2 * QPLUG_PREFETCH_BYTES), _MM_HINT_T0);
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k));
                const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
            }
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
            int32_t dot = _mm_cvtsi128_si32(s);
            for (; k < K; k++) dot += (int32_t)x[k] * w[k];
            out[m * N + n] = (float)dot * (absmax[m] * scb[n]) * 6.200124e-05f;
        }
    }
}
#endif

/* Output rows [first, first + count) of y [M, N] (float32) from qplug_llm_int8_input's xq and absmax, the int8
 * rows cb [N, K] and their float32 SCB [N]. */
int qplug_gemv_llm_int8(int isa, int64_t first, int64_t count, const int8_t *xq, const float *absmax, int64_t M,
                        int64_t K, const int8_t *cb, const float *scb, float *out, int64_t N) {
    if (isa > qplug_cpu_isa()) return -3;
#if QPLUG_X86
    if (isa >= QPLUG_ISA_AVX2) {
        gemv_llm_int8_avx2(xq, absmax, M, K, cb, scb, first, count, out, N);
        return 0;
    }
#endif
    gemv_llm_int8_portable(xq, absmax, M, K, cb, scb, first, count, out, N);
    return 0;
}

/* ---- Transposing 32-bit words: dst [cols, rows] = src [rows, cols]^T, src rows `ld` words apart.
 * GPTQ stores its packed codes as the transpose of the words compressed-tensors and AWQ GEMV store, so
 * converting between them transposes every layer's words. torch's strided copy of int32 walks one of the
 * two tensors a word at a time (about ten times slower than a plain copy here); this goes by tiles, each
 * moved as 8x8 blocks of AVX2 registers. Bits are moved, never interpreted. */
/* Tiles of 64 source rows by 16 columns: 16 destination rows written at once. Wider tiles lose to cache-set
 * conflicts, the destination rows being a power of two of bytes apart (measured on AVX2: 64x16 0.47 ms for a
 * 5632x256 matrix, 32x32 0.92 ms, a plain copy 0.23 ms). */
#define QPLUG_TRANSPOSE_ROWS 64
#define QPLUG_TRANSPOSE_COLS 16

static void transpose32_portable(const uint32_t *src, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t ld,
                                 uint32_t *dst, int64_t rows) {
    for (int64_t c = c0; c < c1; c++)
        for (int64_t r = r0; r < r1; r++) dst[c * rows + r] = src[r * ld + c];
}

#if QPLUG_X86
QPLUG_AVX2 QPLUG_INLINE void transpose32_8x8(const uint32_t *s, int64_t ld, uint32_t *d, int64_t rows) {
    __m256i r0 = _mm256_loadu_si256((const __m256i *)(s + 0 * ld)), r1 = _mm256_loadu_si256((const __m256i *)(s + 1 * ld));
    __m256i r2 = _mm256_loadu_si256((const __m256i *)(s + 2 * ld)), r3 = _mm256_loadu_si256((const __m256i *)(s + 3 * ld));
    __m256i r4 = _mm256_loadu_si256((const __m256i *)(s + 4 * ld)), r5 = _mm256_loadu_si256((const __m256i *)(s + 5 * ld));
    __m256i r6 = _mm256_loadu_si256((const __m256i *)(s + 6 * ld)), r7 = _mm256_loadu_si256((const __m256i *)(s + 7 * ld));
    /* pairs of rows interleaved by words, then by 64-bit pairs, then the 128-bit halves swapped across */
    __m256i t0 = _mm256_unpacklo_epi32(r0, r1), t1 = _mm256_unpackhi_epi32(r0, r1);
    __m256i t2 = _mm256_unpacklo_epi32(r2, r3), t3 = _mm256_unpackhi_epi32(r2, r3);
    __m256i t4 = _mm256_unpacklo_epi32(r4, r5), t5 = _mm256_unpackhi_epi32(r4, r5);
    __m256i t6 = _mm256_unpacklo_epi32(r6, r7), t7 = _mm256_unpackhi_epi32(r6, r7);
    __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    _mm256_storeu_si256((__m256i *)(d + 0 * rows), _mm256_permute2x128_si256(u0, u4, 0x20));
    _mm256_storeu_si256((__m256i *)(d + 1 * rows), _mm256_permute2x128_si256(u1, u5, 0x20));
    _mm256_storeu_si256((__m256i *)(d + 2 * rows), _mm256_permute2x128_si256(u2, u6, 0x20));
    _mm256_storeu_si256((__m256i *)(d + 3 * rows), _mm256_permute2x128_si256(u3, u7, 0x20));
    _mm256_storeu_si256((__m256i *)(d + 4 * rows), _mm256_permute2x128_si256(u0, u4, 0x31));
    _mm256_storeu_si256((__m256i *)(d + 5 * rows), _mm256_permute2x128_si256(u1, u5, 0x31));
    _mm256_storeu_si256((__m256i *)(d + 6 * rows), _mm256_permute2x128_si256(u2, u6, 0x31));
    _mm256_storeu_si256((__m256i *)(d + 7 * rows), _mm256_permute2x128_si256(u3, u7, 0x31));
}

QPLUG_AVX2 static void transpose32_avx2(const uint32_t *src, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
                                        int64_t ld, uint32_t *dst, int64_t rows) {
    int64_t r = r0;
    for (; r + 8 <= r1; r += 8) {
        int64_t c = c0;
        for (; c + 8 <= c1; c += 8) transpose32_8x8(src + r * ld + c, ld, dst + c * rows + r, rows);
        transpose32_portable(src, r, r + 8, c, c1, ld, dst, rows); /* the tile's last columns */
    }
    transpose32_portable(src, r, r1, c0, c1, ld, dst, rows); /* its last rows */
}
#endif

int qplug_transpose32(int isa, const uint32_t *src, int64_t rows, int64_t cols, int64_t ld, uint32_t *dst) {
    if (rows < 0 || cols < 0 || ld < cols) return 1;
    for (int64_t c0 = 0; c0 < cols; c0 += QPLUG_TRANSPOSE_COLS) {
        const int64_t c1 = cols - c0 < QPLUG_TRANSPOSE_COLS ? cols : c0 + QPLUG_TRANSPOSE_COLS;
        for (int64_t r0 = 0; r0 < rows; r0 += QPLUG_TRANSPOSE_ROWS) {
            const int64_t r1 = rows - r0 < QPLUG_TRANSPOSE_ROWS ? rows : r0 + QPLUG_TRANSPOSE_ROWS;
#if QPLUG_X86
            if (isa >= QPLUG_ISA_AVX2) {
                transpose32_avx2(src, r0, r1, c0, c1, ld, dst, rows);
                continue;
            }
#endif
            transpose32_portable(src, r0, r1, c0, c1, ld, dst, rows);
        }
    }
    return 0;
}

/* ---- Nibbles to bytes: dst[2i] = src[i] & 15, dst[2i + 1] = src[i] >> 4 (low nibble first, the order GPTQ,
 * compressed-tensors and torch's codes use). Unpacking a 4-bit layer's codes for its kernel layout with torch
 * (two masks and an interleaving stack) took most of a GPTQ layout's build. */
#if QPLUG_X86
QPLUG_AVX2 static int64_t unpack_nibbles_avx2(const uint8_t *src, int64_t n, uint8_t *dst) {
    const __m256i mask = _mm256_set1_epi8(15);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256i b = _mm256_loadu_si256((const __m256i *)(src + i));
        const __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
        /* per 128-bit lane: bytes 0-7 (unpacklo) and 8-15 (unpackhi) with their nibbles interleaved */
        const __m256i a = _mm256_unpacklo_epi8(lo, hi), c = _mm256_unpackhi_epi8(lo, hi);
        _mm256_storeu_si256((__m256i *)(dst + 2 * i), _mm256_permute2x128_si256(a, c, 0x20));
        _mm256_storeu_si256((__m256i *)(dst + 2 * i + 32), _mm256_permute2x128_si256(a, c, 0x31));
    }
    return i;
}
#endif

int qplug_unpack_nibbles(int isa, const uint8_t *src, int64_t n, uint8_t *dst) {
    if (n < 0) return 1;
    int64_t i = 0;
#if QPLUG_X86
    if (isa >= QPLUG_ISA_AVX2) i = unpack_nibbles_avx2(src, n, dst);
#endif
    for (; i < n; i++) {
        dst[2 * i] = src[i] & 15;
        dst[2 * i + 1] = src[i] >> 4;
    }
    return 0;
}

/* The same for `rows` rows of `row_bytes` bytes, each row's codes taken in the order `perm` gives (k of them, each
 * an index below 2 * row_bytes): dst[r * k + j] = code perm[j] of row r. Act-order layers' codes in their
 * run-time column order, in one pass (torch's index_select of single bytes took 3.1 s for the 1.1B model). */
int qplug_unpack_nibbles_permuted(const uint8_t *src, int64_t rows, int64_t row_bytes, const int64_t *perm,
                                  int64_t k, uint8_t *dst) {
    for (int64_t j = 0; j < k; j++)
        if (perm[j] < 0 || perm[j] >= 2 * row_bytes) return 1;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *row = src + r * row_bytes;
        uint8_t *out = dst + r * k;
        for (int64_t j = 0; j < k; j++) {
            const int64_t p = perm[j];
            out[j] = (uint8_t)((row[p >> 1] >> ((p & 1) << 2)) & 15);
        }
    }
    return 0;
}

/* ---- Parallel entry points: the same kernels over `threads` contiguous ranges of output rows (or
 * elements), on the process's OpenMP pool. Built with -fopenmp, this library resolves libgomp to the
 * copy torch has already loaded, so the ranges run on torch's own worker threads, which are still
 * spinning after torch's last operation; a pool of our own had to wait for them (measured: a
 * 5632x2048 4-bit GEMV between torch operations, 1.29 ms on our pool vs 0.57 ms alone). Without
 * OpenMP they run one after another and qplug_openmp() says so, so callers use their own threads. */
#ifdef _OPENMP
#include <omp.h>
#endif

int qplug_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#define QPLUG_RANGE(t, threads, total, first, count)                               \
    const int64_t per_ = ((total) + (threads) - 1) / (threads);                    \
    const int64_t first = (int64_t)(t) * per_;                                     \
    const int64_t count = (total) - first < per_ ? (total) - first : per_;

int qplug_gemv_4bit_parallel(int isa, int threads, const float *xr, int64_t M, int64_t K, const uint8_t *packed,
                             int64_t blocksize, const float *code, const float *absmax, const float *zeros,
                             const uint8_t *qabsmax, const float *code2, const float *absmax2,
                             int64_t nested_blocksize, float offset, float *out, int64_t N) {
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
    for (int t = 0; t < threads; t++) {
        QPLUG_RANGE(t, threads, N, first, count)
        if (count > 0)
            status |= qplug_gemv_4bit(isa, first, count, xr, M, K, packed, blocksize, code, absmax, zeros, qabsmax,
                                      code2, absmax2, nested_blocksize, offset, out, N);
    }
    return status;
}

/* ---- One decode call of a 4-bit layer: y = x[:, perm] @ W^T (+ bias), rounded to out_dtype.
 * A decode step runs a GEMV per layer per token, each a few hundred microseconds, and the Python around
 * the pieces (two buffers, three ctypes calls, a cast, a bias add) cost 50-80 us a layer: a tenth of a
 * token. Here the input conversion and gather, the GEMV on `threads` OpenMP threads, the bias (float32,
 * added before the single rounding) and the rounding to out_dtype (as torch's .to() rounds) happen in
 * one call. `weight` holds the layer's constant arguments (QPLUG_W4_* slots, built once per layer). */
enum {
    QPLUG_W4_PACKED, QPLUG_W4_N, QPLUG_W4_K, QPLUG_W4_BLOCKSIZE, QPLUG_W4_CODE, QPLUG_W4_ABSMAX, QPLUG_W4_ZEROS,
    QPLUG_W4_QABSMAX, QPLUG_W4_CODE2, QPLUG_W4_ABSMAX2, QPLUG_W4_NESTED_BLOCKSIZE, QPLUG_W4_OFFSET_BITS,
    QPLUG_W4_SLOTS
};

int qplug_w4_slots(void) { return QPLUG_W4_SLOTS; }

static void round_rows(const float *y, const float *bias, int64_t M, int64_t N, int64_t first, int64_t count,
                       int dtype, void *out) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = first; n < first + count; n++)
            store_scalar(bias == NULL ? y[m * N + n] : y[m * N + n] + bias[n], dtype, out, m * N + n);
}

int qplug_linear_4bit(int isa, int threads, const int64_t *weight, const void *x, int dtype, int64_t M,
                      const int64_t *perm, const float *bias, void *out, int out_dtype) {
#define QPLUG_W4_PTR(type, slot) ((const type *)(intptr_t)weight[slot])
    const int64_t N = weight[QPLUG_W4_N], K = weight[QPLUG_W4_K];
    float offset;
    const int32_t offset_bits = (int32_t)weight[QPLUG_W4_OFFSET_BITS];
    memcpy(&offset, &offset_bits, sizeof(offset));
    if (out_dtype != QPLUG_FLOAT32 && out_dtype != QPLUG_BFLOAT16 && out_dtype != QPLUG_FLOAT16) return -2;
    if (isa > qplug_cpu_isa()) return -3;
    float *xr = (float *)malloc(sizeof(float) * (size_t)(M * K));
    /* float32 output with no bias: the GEMV writes it directly */
    float *y = out_dtype == QPLUG_FLOAT32 && bias == NULL ? (float *)out : (float *)malloc(sizeof(float) * (size_t)(M * N));
    int status = xr == NULL || y == NULL ? -2 : gemv_input(isa, x, dtype, M, K, perm, xr);
    if (status == 0) {
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
        for (int t = 0; t < threads; t++) {
            QPLUG_RANGE(t, threads, N, first, count)
            if (count > 0) {
                status |= qplug_gemv_4bit(isa, first, count, xr, M, K, QPLUG_W4_PTR(uint8_t, QPLUG_W4_PACKED),
                                          weight[QPLUG_W4_BLOCKSIZE], QPLUG_W4_PTR(float, QPLUG_W4_CODE),
                                          QPLUG_W4_PTR(float, QPLUG_W4_ABSMAX), QPLUG_W4_PTR(float, QPLUG_W4_ZEROS),
                                          QPLUG_W4_PTR(uint8_t, QPLUG_W4_QABSMAX), QPLUG_W4_PTR(float, QPLUG_W4_CODE2),
                                          QPLUG_W4_PTR(float, QPLUG_W4_ABSMAX2), weight[QPLUG_W4_NESTED_BLOCKSIZE],
                                          offset, y, N);
                if (y != out) round_rows(y, bias, M, N, first, count, out_dtype, out);
            }
        }
    }
#undef QPLUG_W4_PTR
    free(xr);
    if (y != out) free(y);
    return status;
}

/* The opt-in W4A8 decode in one call, as qplug_linear_4bit: the input converted (and gathered), rounded to int8
 * per 64 inputs (qplug_w4a8_input), the integer GEMV (qplug_gemv_w4a8) on `threads` OpenMP threads, the float32
 * bias and the one rounding to out_dtype. `weight` as qplug_linear_4bit's; the code book must be 0..15 with
 * plain float32 scales (the caller checks), the group a multiple of 64 dividing K. */
int qplug_linear_w4a8(int isa, int threads, const int64_t *weight, const void *x, int dtype, int64_t M,
                      const int64_t *perm, const float *bias, void *out, int out_dtype) {
    const int64_t N = weight[QPLUG_W4_N], K = weight[QPLUG_W4_K], blocksize = weight[QPLUG_W4_BLOCKSIZE];
    const uint8_t *packed = (const uint8_t *)(intptr_t)weight[QPLUG_W4_PACKED];
    const float *scale = (const float *)(intptr_t)weight[QPLUG_W4_ABSMAX];
    const float *zero = (const float *)(intptr_t)weight[QPLUG_W4_ZEROS];
    if (out_dtype != QPLUG_FLOAT32 && out_dtype != QPLUG_BFLOAT16 && out_dtype != QPLUG_FLOAT16) return -2;
    if (blocksize <= 0 || blocksize % QPLUG_W4A8_BLOCK != 0 || K % blocksize != 0) return -1;
    if (weight[QPLUG_W4_QABSMAX] != 0) return -1; /* double-quantized scales: not an affine layer */
    if (isa > qplug_cpu_isa()) return -3;
    const int64_t blocks = K / QPLUG_W4A8_BLOCK;
    /* one allocation for the float32 input, its int8 rounding and the two per-block float32 arrays */
    char *scratch = (char *)malloc(sizeof(float) * (size_t)(M * K + 2 * M * blocks) + (size_t)(M * K));
    float *y = out_dtype == QPLUG_FLOAT32 && bias == NULL ? (float *)out : (float *)malloc(sizeof(float) * (size_t)(M * N));
    int status = scratch == NULL || y == NULL ? -2 : 0;
    if (status == 0) {
        float *xr = (float *)scratch, *sx = xr + M * K, *xs = sx + M * blocks;
        int8_t *xq = (int8_t *)(xs + M * blocks);
        status = gemv_input(isa, x, dtype, M, K, perm, xr);
        if (status == 0) status = qplug_w4a8_input(xr, M, K, xq, sx, xs);
        if (status == 0) {
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
            for (int t = 0; t < threads; t++) {
                QPLUG_RANGE(t, threads, N, first, count)
                if (count > 0) {
                    status |= qplug_gemv_w4a8(isa, first, count, xq, sx, xs, M, K, packed, blocksize, scale, zero, y, N);
                    if (y != out) round_rows(y, bias, M, N, first, count, out_dtype, out);
                }
            }
        }
    }
    free(scratch);
    if (y != out) free(y);
    return status;
}

/* The int8 GEMVs' input: x [M, K] (gathered by perm when given) as float32 in element order. */
static void plain_input(int isa, const void *x, int dtype, int64_t M, int64_t K, const int64_t *perm, float *xf) {
    int64_t i = 0;
#if QPLUG_X86
    if (perm == NULL && dtype == QPLUG_BFLOAT16 && isa >= QPLUG_ISA_AVX2) {
        plain_bf16_avx2(x, M * K, xf);
        i = M * K / 8 * 8;
    }
#endif
    for (; i < M * K; i++) xf[i] = load_float(x, dtype, perm == NULL ? i : (i / K) * K + perm[i % K]);
}

/* One decode call of an LLM.int8 layer (bitsandbytes' CB and SCB / 127): y = x @ (CB * scale)^T rounded to
 * out_dtype, the GEMV on `threads` OpenMP threads (see qplug_linear_4bit). */
int qplug_linear_int8(int isa, int threads, const int8_t *cb, const float *scale, int64_t N, int64_t K, const void *x,
                      int dtype, int64_t M, void *out, int out_dtype) {
    if (out_dtype != QPLUG_FLOAT32 && out_dtype != QPLUG_BFLOAT16 && out_dtype != QPLUG_FLOAT16) return -2;
    if (isa > qplug_cpu_isa()) return -3;
    float *xf = (float *)malloc(sizeof(float) * (size_t)(M * K));
    float *y = out_dtype == QPLUG_FLOAT32 ? (float *)out : (float *)malloc(sizeof(float) * (size_t)(M * N));
    int status = xf == NULL || y == NULL ? -2 : 0;
    if (status == 0) {
        plain_input(isa, x, dtype, M, K, NULL, xf);
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
        for (int t = 0; t < threads; t++) {
            QPLUG_RANGE(t, threads, N, first, count)
            if (count > 0) {
                status |= qplug_gemv_int8(isa, first, count, xf, M, K, cb, scale, y, N);
                if (y != out) round_rows(y, NULL, M, N, first, count, out_dtype, out);
            }
        }
    }
    free(xf);
    if (y != out) free(y);
    return status;
}

/* One decode call of a grouped int8 layer (GPTQ's 8-bit codes - 128): y = x[:, perm] @ W^T + bias, rounded once to
 * out_dtype; the input gather and conversion, the group sums of x (for the zero points), the GEMV on `threads`
 * threads, the float32 bias and the rounding in one call (see qplug_linear_4bit). */
int qplug_linear_int8_grouped(int isa, int threads, const int8_t *q, const float *scale, const float *zero,
                              int64_t group, int64_t N, int64_t K, const void *x, int dtype, int64_t M,
                              const int64_t *perm, const float *bias, void *out, int out_dtype) {
    if (group <= 0 || K % group != 0) return -1;
    if (out_dtype != QPLUG_FLOAT32 && out_dtype != QPLUG_BFLOAT16 && out_dtype != QPLUG_FLOAT16) return -2;
    if (isa > qplug_cpu_isa()) return -3;
    const int64_t G = K / group;
    float *xf = (float *)malloc(sizeof(float) * (size_t)(M * K + M * G));
    float *y = out_dtype == QPLUG_FLOAT32 && bias == NULL ? (float *)out : (float *)malloc(sizeof(float) * (size_t)(M * N));
    int status = xf == NULL || y == NULL ? -2 : 0;
    if (status == 0) {
        float *xsum = xf + M * K;
        plain_input(isa, x, dtype, M, K, perm, xf);
        for (int64_t m = 0; m < M; m++)
            for (int64_t g = 0; g < G; g++) {
                float a = 0.0f;
                for (int64_t k = g * group; k < (g + 1) * group; k++) a += xf[m * K + k];
                xsum[m * G + g] = a;
            }
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
        for (int t = 0; t < threads; t++) {
            QPLUG_RANGE(t, threads, N, first, count)
            if (count > 0) {
                status |= qplug_gemv_int8_grouped(isa, first, count, xf, M, K, q, group, scale, zero, xsum, y, N);
                if (y != out) round_rows(y, bias, M, N, first, count, out_dtype, out);
            }
        }
    }
    free(xf);
    if (y != out) free(y);
    return status;
}

int qplug_dequant_4bit_parallel(int isa, int threads, const uint8_t *packed, int64_t first, int64_t count,
                                int64_t blocksize, const float *code, const float *absmax, const float *zeros,
                                const uint8_t *qabsmax, const float *code2, const float *absmax2,
                                int64_t nested_blocksize, float offset, int dtype, void *out, int64_t base) {
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
    for (int t = 0; t < threads; t++) {
        QPLUG_RANGE(t, threads, count, start, n)
        if (n > 0)
            status |= qplug_dequant_4bit(isa, packed, first + start, n, blocksize, code, absmax, zeros, qabsmax, code2,
                                         absmax2, nested_blocksize, offset, dtype, out, base);
    }
    return status;
}

int qplug_gemv_int8_parallel(int isa, int threads, const float *x, int64_t M, int64_t K, const int8_t *cb,
                             const float *scale, float *out, int64_t N) {
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
    for (int t = 0; t < threads; t++) {
        QPLUG_RANGE(t, threads, N, first, count)
        if (count > 0) status |= qplug_gemv_int8(isa, first, count, x, M, K, cb, scale, out, N);
    }
    return status;
}

int qplug_gemv_int8_grouped_parallel(int isa, int threads, const float *x, int64_t M, int64_t K, const int8_t *q,
                                     int64_t group, const float *scale, const float *zero, const float *xsum,
                                     float *out, int64_t N) {
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
    for (int t = 0; t < threads; t++) {
        QPLUG_RANGE(t, threads, N, first, count)
        if (count > 0) status |= qplug_gemv_int8_grouped(isa, first, count, x, M, K, q, group, scale, zero, xsum, out, N);
    }
    return status;
}

int qplug_dequant_int8_parallel(int isa, int threads, int64_t first, int64_t count, const int8_t *q, int64_t K,
                                int64_t group, const float *scale, const float *zero, int dtype, void *out,
                                int64_t base) {
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
    for (int t = 0; t < threads; t++) {
        QPLUG_RANGE(t, threads, count, start, n)
        if (n > 0) status |= qplug_dequant_int8(isa, first + start, n, q, K, group, scale, zero, dtype, out, base);
    }
    return status;
}

int qplug_dequant_int4pack_parallel(int isa, int threads, int64_t first, int64_t count, const uint8_t *packed,
                                    int64_t K, int64_t block, const uint16_t *scales_zeros, int64_t N, int64_t group,
                                    int dtype, void *out, int64_t ld, int64_t base) {
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
    for (int t = 0; t < threads; t++) {
        QPLUG_RANGE(t, threads, count, start, n)
        if (n > 0)
            status |= qplug_dequant_int4pack(isa, first + start, n, packed, K, block, scales_zeros, N, group, dtype,
                                             out, ld, base);
    }
    return status;
}

int qplug_gemv_w4a8_parallel(int isa, int threads, const int8_t *xq, const float *sx, const float *xs, int64_t M,
                             int64_t K, const uint8_t *packed, int64_t blocksize, const float *scale,
                             const float *zero, float *out, int64_t N) {
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
    for (int t = 0; t < threads; t++) {
        QPLUG_RANGE(t, threads, N, first, count)
        if (count > 0)
            status |= qplug_gemv_w4a8(isa, first, count, xq, sx, xs, M, K, packed, blocksize, scale, zero, out, N);
    }
    return status;
}

int qplug_gemv_llm_int8_parallel(int isa, int threads, const int8_t *xq, const float *absmax, int64_t M, int64_t K,
                                 const int8_t *cb, const float *scb, float *out, int64_t N) {
    int status = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
    for (int t = 0; t < threads; t++) {
        QPLUG_RANGE(t, threads, N, first, count)
        if (count > 0) status |= qplug_gemv_llm_int8(isa, first, count, xq, absmax, M, K, cb, scb, out, N);
    }
    return status;
}
