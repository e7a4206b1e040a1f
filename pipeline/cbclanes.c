/*
 * AES-128-CBC encryption of several independent streams at once, interleaved on one core.
 *
 * CBC encryption is serial within a stream: each block's input is the previous block's
 * ciphertext, so one stream runs at the latency of ten AES rounds per block, which is what
 * `openssl speed -evp aes-128-cbc` measures. A core with AES-NI can start a round every
 * half or whole cycle while each round takes several cycles to finish, so a single chain leaves
 * most of the unit idle. HLS segments are independent CBC streams (each its own IV, often its
 * own key): this library runs up to LANES of them side by side, one block of each per step, so
 * the rounds of one stream fill the gaps left by the others. Every stream's bytes are exactly
 * those a single-stream CBC would produce; only the order in which the core computes them
 * changes.
 *
 * The caller (pipeline/aes.py, through ctypes) hands whole 16-byte blocks only; PKCS#7 padding
 * is written by the caller before the last piece. Key schedules live on this function's stack
 * for one call and are wiped before it returns.
 *
 * Built by scripts/setup.sh:  cc -O2 -shared -fPIC -o pipeline/libcbclanes.so pipeline/cbclanes.c
 * No instruction beyond SSE2 runs before hlsv_cbclanes_supported() has said yes: the AES-NI
 * code is compiled for its own target, not for the whole file.
 */
#include <immintrin.h>
#include <stddef.h>
#include <string.h>

/* Streams interleaved per step: eight keeps a core whose AES unit takes ~4 cycles per round
 * and accepts two rounds a cycle busy, and needs only eight of the sixteen xmm registers for
 * the chains. */
#define LANES 8
#define ROUNDS 10
#define ABI_VERSION 1

#define AESNI __attribute__((target("aes,sse2")))

struct lane {
    unsigned char *data;
    size_t blocks;
    size_t stream;
    __m128i chain;
};

int hlsv_cbclanes_abi(void) { return ABI_VERSION; }

int hlsv_cbclanes_supported(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("aes") && __builtin_cpu_supports("sse2");
}

static void wipe(void *p, size_t n)
{
    memset(p, 0, n);
    /* The compiler must assume the zeros are read, so the memset is not dropped as dead. */
    __asm__ __volatile__("" : : "r"(p) : "memory");
}

AESNI static inline __m128i expand_round(__m128i key, __m128i assist)
{
    assist = _mm_shuffle_epi32(assist, 0xff);
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    key = _mm_xor_si128(key, _mm_slli_si128(key, 4));
    return _mm_xor_si128(key, assist);
}

/* aeskeygenassist takes its round constant as an immediate: one line per round. */
#define EXPAND(i, rcon) rk[i] = expand_round(rk[i - 1], _mm_aeskeygenassist_si128(rk[i - 1], rcon))

AESNI static void expand_key(const unsigned char *key, __m128i rk[ROUNDS + 1])
{
    rk[0] = _mm_loadu_si128((const __m128i *)key);
    EXPAND(1, 0x01);
    EXPAND(2, 0x02);
    EXPAND(3, 0x04);
    EXPAND(4, 0x08);
    EXPAND(5, 0x10);
    EXPAND(6, 0x20);
    EXPAND(7, 0x40);
    EXPAND(8, 0x80);
    EXPAND(9, 0x1b);
    EXPAND(10, 0x36);
}

/* `steps` blocks of each of the first `width` lanes. The loops over lanes have a constant
 * bound in each instance below, so the compiler unrolls them and keeps every chain in a
 * register; the round keys are read from memory by the AES instructions themselves. */
AESNI static inline __attribute__((always_inline)) void
run(const int width, struct lane *lane, __m128i rk[][ROUNDS + 1], size_t steps)
{
    __m128i c[LANES];
    unsigned char *p[LANES];
#pragma GCC unroll 8
    for (int j = 0; j < width; j++) {
        c[j] = lane[j].chain;
        p[j] = lane[j].data;
    }
    for (size_t s = 0; s < steps; s++) {
#pragma GCC unroll 8
        for (int j = 0; j < width; j++) {
            /* The load and the first round key are off the chain's critical path. */
            __m128i in = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p[j]), rk[j][0]);
            c[j] = _mm_xor_si128(c[j], in);
        }
#pragma GCC unroll 9
        for (int r = 1; r < ROUNDS; r++) {
#pragma GCC unroll 8
            for (int j = 0; j < width; j++)
                c[j] = _mm_aesenc_si128(c[j], rk[j][r]);
        }
#pragma GCC unroll 8
        for (int j = 0; j < width; j++) {
            c[j] = _mm_aesenclast_si128(c[j], rk[j][ROUNDS]);
            _mm_storeu_si128((__m128i *)p[j], c[j]);
            p[j] += 16;
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < width; j++) {
        lane[j].chain = c[j];
        lane[j].data = p[j];
        lane[j].blocks -= steps;
    }
}

#define RUN(w) \
    AESNI static void run_##w(struct lane *lane, __m128i rk[][ROUNDS + 1], size_t steps) \
    { run(w, lane, rk, steps); }
RUN(1) RUN(2) RUN(3) RUN(4) RUN(5) RUN(6) RUN(7) RUN(8)

typedef void (*runner)(struct lane *, __m128i (*)[ROUNDS + 1], size_t);
static const runner runners[LANES + 1] = {
    NULL, run_1, run_2, run_3, run_4, run_5, run_6, run_7, run_8,
};

/*
 * hlsv_cbc_encrypt: encrypt `count` pieces in place, each of its own stream: piece i is `blocks[i]` whole blocks
 * at `data[i]`, under the 16-byte key at `keys[i]`, chained from the 16 bytes at `chains[i]`
 * (the IV for a stream's first piece), which are replaced by the piece's last ciphertext block
 * (the chain value the stream's next piece starts from). Pieces must not overlap each other.
 * Any count: up to LANES run side by side, and a lane that finishes takes the next piece.
 * Returns 0, or -1 when this CPU has no AES-NI (nothing is written then).
 */
AESNI static void encrypt_lanes(size_t count, unsigned char *const *data, const size_t *blocks,
                                const unsigned char *const *keys, unsigned char *const *chains)
{
    struct lane lane[LANES];
    __m128i rk[LANES][ROUNDS + 1];
    size_t next = 0;
    int active = 0;
    for (;;) {
        while (active < LANES && next < count) {
            if (blocks[next] != 0) {
                lane[active].data = data[next];
                lane[active].blocks = blocks[next];
                lane[active].stream = next;
                lane[active].chain = _mm_loadu_si128((const __m128i *)chains[next]);
                expand_key(keys[next], rk[active]);
                active++;
            }
            next++;
        }
        if (active == 0)
            break;
        size_t steps = lane[0].blocks;
        for (int j = 1; j < active; j++)
            if (lane[j].blocks < steps)
                steps = lane[j].blocks;
        runners[active](lane, rk, steps);
        for (int j = 0; j < active;) {
            if (lane[j].blocks != 0) {
                j++;
                continue;
            }
            _mm_storeu_si128((__m128i *)chains[lane[j].stream], lane[j].chain);
            active--;
            if (j != active) {
                lane[j] = lane[active];
                memcpy(rk[j], rk[active], sizeof rk[j]);
            }
        }
    }
    wipe(rk, sizeof rk);
    wipe(lane, sizeof lane);
}

int hlsv_cbc_encrypt(size_t count, unsigned char *const *data, const size_t *blocks,
                     const unsigned char *const *keys, unsigned char *const *chains)
{
    if (!hlsv_cbclanes_supported())
        return -1;
    encrypt_lanes(count, data, blocks, keys, chains);
    return 0;
}
