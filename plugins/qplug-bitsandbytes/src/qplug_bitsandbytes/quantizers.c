/*
 * qplug-bitsandbytes' CPU quantizers: each writes, byte for byte, what bitsandbytes' own CPU code
 * writes for the same input, several times faster. Built at first use by qplug.native (declared in
 * qplug_bitsandbytes._native) with the system C compiler (cached on disk) and called through
 * ctypes, one call per range of rows/blocks and thread. (The inference kernels are qplug's own,
 * qplug/cpu_kernels.c, shared with the GPTQ and AWQ backends.) The float operations are the same IEEE
 * operations in the same order as bitsandbytes' (eager torch), so nothing here may be compiled
 * with -ffast-math.
 *
 * qplug_quantize_4bit -- bitsandbytes' CPU `quantize_4bit` computes, per block of `blocksize`:
 *   absmax = max |x|                         (float32; NaN if the block holds a NaN)
 *   s      = x * (1.0f / max(absmax, 1e-38f)) (float32; NaN absmax stays NaN)
 *   k      = bucketize(s, bounds)            (# of the 15 sorted midpoints strictly below s;
 *                                             NaN -> 15)
 *   code   = order[k]                        (index into the 16-entry code book)
 * and packs two codes per byte, the even element in the high nibble. Here k is counted as
 * 15 - #(s <= bound), which is the same number and sends NaN to 15 as bucketize does, and
 * order[k] is formed as order[15] - sum over {j : s <= bound[j]} of (order[j+1] - order[j]) so
 * that the loop has no table lookup and vectorizes. A NaN absmax is written as a quiet NaN; the
 * caller copies bitsandbytes' own NaN bits for such blocks.
 *
 * qplug_int8_rowwise -- bitsandbytes' `Int8Params` quantization (LLM.int8 weights) converts the
 * weight to float16, then per row: row_stat = max |h| (float32), q = round(h * ((1.0f / row_stat) *
 * 127.0f)) to int8, rounding half to even (bitsandbytes writes `127.0 / row_stat`, which torch
 * evaluates as a reciprocal times 127). Rows whose maximum is 0, inf or NaN are not
 * computed (the result would rest on float-to-int conversion of NaN); the function returns how
 * many there were and the caller leaves such tensors to bitsandbytes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define QPLUG_MAX_BLOCKSIZE 4096

enum { QPLUG_FLOAT32 = 0, QPLUG_BFLOAT16 = 1, QPLUG_FLOAT16 = 2 };

/* float16 -> float32 (exact). gcc 12 does not vectorize _Float16 casts, so the F16C / AVX-512
 * conversion instructions are used where compiled in. */
static void widen_float16(const uint16_t *in, float *out, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(in + i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i))));
#endif
    for (; i < n; i++) {
        _Float16 h;
        memcpy(&h, in + i, sizeof(h));
        out[i] = (float)h;
    }
}

int qplug_quantize_4bit(const void *src, int dtype, int64_t first_block, int64_t n_blocks, int64_t blocksize,
                        const float *bounds, const int32_t *deltas, int32_t top, uint8_t *packed, float *absmax) {
    float values[QPLUG_MAX_BLOCKSIZE];
    uint8_t codes[QPLUG_MAX_BLOCKSIZE];
    float bound[15];
    int32_t delta[15];

    if (blocksize <= 0 || blocksize > QPLUG_MAX_BLOCKSIZE || blocksize % 2 != 0) return -1;
    if (dtype != QPLUG_FLOAT32 && dtype != QPLUG_BFLOAT16 && dtype != QPLUG_FLOAT16) return -2;
    for (int j = 0; j < 15; j++) {
        bound[j] = bounds[j];
        delta[j] = deltas[j];
    }

    for (int64_t block = first_block; block < first_block + n_blocks; block++) {
        const int64_t start = block * blocksize;

        /* Widen to float32 (exact for all three input types). */
        if (dtype == QPLUG_BFLOAT16) {
            const uint16_t *in = (const uint16_t *)src + start;
            uint32_t *bits = (uint32_t *)values;
            for (int64_t i = 0; i < blocksize; i++) bits[i] = (uint32_t)in[i] << 16;
        } else if (dtype == QPLUG_FLOAT16) {
            widen_float16((const uint16_t *)src + start, values, blocksize);
        } else {
            memcpy(values, (const float *)src + start, (size_t)blocksize * sizeof(float));
        }

        /* max |x| on the bit patterns: with the sign cleared, unsigned order is |x| order for
         * every non-NaN float, and every NaN pattern lies above +inf (0x7f800000). */
        const uint32_t *bits = (const uint32_t *)values;
        uint32_t max_bits = 0;
        for (int64_t i = 0; i < blocksize; i++) {
            const uint32_t magnitude = bits[i] & 0x7fffffffu;
            max_bits = magnitude > max_bits ? magnitude : max_bits;
        }
        if (max_bits > 0x7f800000u) max_bits = 0x7fc00000u;
        float block_max;
        memcpy(&block_max, &max_bits, sizeof(float));
        absmax[block] = block_max;

        const float clamped = block_max < 1e-38f ? 1e-38f : block_max; /* NaN stays NaN */
        const float scale = 1.0f / clamped;
        for (int64_t i = 0; i < blocksize; i++) {
            const float s = values[i] * scale;
            int32_t code = top;
            for (int j = 0; j < 15; j++) code -= (s <= bound[j]) ? delta[j] : 0;
            codes[i] = (uint8_t)code;
        }

        uint8_t *out = packed + start / 2;
        for (int64_t i = 0; i < blocksize / 2; i++) out[i] = (uint8_t)((codes[2 * i] << 4) | codes[2 * i + 1]);
    }
    return 0;
}


/* float32 -> float16 (round to nearest even) -> float32, in place; vectorized as widen_float16. */
static void round_through_float16(float *values, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        const __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(values + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm512_storeu_ps(values + i, _mm512_cvtph_ps(h));
    }
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(values + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_ps(values + i, _mm256_cvtph_ps(h));
    }
#endif
    for (; i < n; i++) values[i] = (float)(_Float16)values[i];
}

/* One row, widened exactly as bitsandbytes sees it: rounded to float16, then held as float32. */
static void load_row_as_float16(const void *src, int dtype, int64_t start, int64_t cols, float *values) {
    if (dtype == QPLUG_FLOAT16) {
        widen_float16((const uint16_t *)src + start, values, cols);
        return;
    }
    if (dtype == QPLUG_BFLOAT16) {
        const uint16_t *in = (const uint16_t *)src + start;
        uint32_t *bits = (uint32_t *)values;
        for (int64_t i = 0; i < cols; i++) bits[i] = (uint32_t)in[i] << 16;
    } else {
        memcpy(values, (const float *)src + start, (size_t)cols * sizeof(float));
    }
    round_through_float16(values, cols);
}

int64_t qplug_int8_rowwise(const void *src, int dtype, int64_t first_row, int64_t n_rows, int64_t cols,
                           int8_t *out, float *row_stats) {
    if (dtype != QPLUG_FLOAT32 && dtype != QPLUG_BFLOAT16 && dtype != QPLUG_FLOAT16) return -1;
    float *values = malloc((size_t)cols * sizeof(float));
    if (values == NULL) return -2;
    int64_t special = 0;
    for (int64_t row = first_row; row < first_row + n_rows; row++) {
        const int64_t start = row * cols;
        load_row_as_float16(src, dtype, start, cols, values);

        /* max |h| on the bit patterns, as in qplug_quantize_4bit: NaN patterns lie above +inf. */
        const uint32_t *bits = (const uint32_t *)values;
        uint32_t max_bits = 0;
        for (int64_t i = 0; i < cols; i++) {
            const uint32_t magnitude = bits[i] & 0x7fffffffu;
            max_bits = magnitude > max_bits ? magnitude : max_bits;
        }
        float max_abs;
        memcpy(&max_abs, &max_bits, sizeof(float));
        row_stats[row] = max_abs;
        if (max_bits == 0 || max_bits >= 0x7f800000u) { /* all zero, inf or NaN: left to bitsandbytes */
            special++;
            continue;
        }

        const float scale = (1.0f / max_abs) * 127.0f; /* torch evaluates `127.0 / t` as t.reciprocal() * 127 */
        int8_t *q = out + start;
        for (int64_t i = 0; i < cols; i++) q[i] = (int8_t)__builtin_nearbyintf(values[i] * scale);
    }
    free(values);
    return special;
}
