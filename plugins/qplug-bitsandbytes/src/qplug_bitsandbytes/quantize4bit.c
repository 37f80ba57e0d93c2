/*
 * Blockwise NF4/FP4 quantization of a CPU tensor, byte for byte what bitsandbytes' CPU
 * `quantize_4bit` writes. Built at first use by qplug_bitsandbytes.fast4bit with the system C
 * compiler (cached on disk), called through ctypes, one call per range of blocks and thread.
 *
 * bitsandbytes' CPU kernel (eager torch) computes, per block of `blocksize` elements:
 *   absmax = max |x|                         (float32; NaN if the block holds a NaN)
 *   s      = x * (1.0f / max(absmax, 1e-38f)) (float32; NaN absmax stays NaN)
 *   k      = bucketize(s, bounds)            (# of the 15 sorted midpoints strictly below s;
 *                                             NaN -> 15)
 *   code   = order[k]                        (index into the 16-entry code book)
 * and packs two codes per byte, the even element in the high nibble.
 *
 * Here k is counted as 15 - #(s <= bound), which is the same number and sends NaN to 15 as
 * bucketize does, and order[k] is formed as order[15] - sum over {j : s <= bound[j]} of
 * (order[j+1] - order[j]) so that the loop has no table lookup and vectorizes. The float
 * operations are the same IEEE operations in the same order, so nothing may be compiled with
 * -ffast-math. A NaN absmax is written as a quiet NaN; the caller copies bitsandbytes' own NaN
 * bits for such blocks.
 */
#include <stdint.h>
#include <string.h>

#define QPLUG_MAX_BLOCKSIZE 4096

enum { QPLUG_FLOAT32 = 0, QPLUG_BFLOAT16 = 1, QPLUG_FLOAT16 = 2 };

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
            const _Float16 *in = (const _Float16 *)src + start;
            for (int64_t i = 0; i < blocksize; i++) values[i] = (float)in[i];
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
