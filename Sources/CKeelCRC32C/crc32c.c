// CRC32C with a hardware path and a portable path.
//
// The hardware path uses the SSE4.2 `crc32` instruction (8 bytes per instruction) and is chosen at
// run time with `cpuid`, so one binary runs on any x86-64 CPU. Everything else (other CPUs, or x86
// without SSE4.2) uses a slicing-by-8 table built once. Both compute the same function; the tests
// check them against the RFC 3720 vectors and against each other.

#include "CKeelCRC32C.h"

#include <string.h>

#define CKEEL_POLY 0x82F63B78u

static uint32_t table[8][256];
static int table_ready = 0;

static void build_table(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) {
            c = (c & 1) ? (c >> 1) ^ CKEEL_POLY : c >> 1;
        }
        table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = table[0][n];
        for (int k = 1; k < 8; k++) {
            c = table[0][c & 0xff] ^ (c >> 8);
            table[k][n] = c;
        }
    }
    __atomic_store_n(&table_ready, 1, __ATOMIC_RELEASE);
}

uint32_t ckeel_crc32c_extend_table(uint32_t crc, const void *bytes, size_t length) {
    if (!__atomic_load_n(&table_ready, __ATOMIC_ACQUIRE)) {
        build_table(); // idempotent: racing builders write the same values
    }
    const uint8_t *p = (const uint8_t *)bytes;
    uint32_t c = ~crc;
    while (length >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        word = __builtin_bswap64(word);
#endif
        uint32_t lo = (uint32_t)word ^ c;
        uint32_t hi = (uint32_t)(word >> 32);
        c = table[7][lo & 0xff] ^ table[6][(lo >> 8) & 0xff] ^ table[5][(lo >> 16) & 0xff] ^
            table[4][lo >> 24] ^ table[3][hi & 0xff] ^ table[2][(hi >> 8) & 0xff] ^
            table[1][(hi >> 16) & 0xff] ^ table[0][hi >> 24];
        p += 8;
        length -= 8;
    }
    while (length--) {
        c = table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
    }
    return ~c;
}

#if defined(__x86_64__)
#include <cpuid.h>

__attribute__((target("sse4.2")))
static uint32_t extend_hardware(uint32_t crc, const void *bytes, size_t length) {
    const uint8_t *p = (const uint8_t *)bytes;
    uint64_t c = ~crc;
    while (length >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        length -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (length--) {
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    }
    return ~c32;
}

static int detect_hardware(void) {
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) {
        return 0;
    }
    return (ecx & bit_SSE4_2) != 0;
}
#endif

// -1 unknown, 0 table, 1 hardware.
static int hardware_state = -1;

int ckeel_crc32c_uses_hardware(void) {
    int state = __atomic_load_n(&hardware_state, __ATOMIC_ACQUIRE);
    if (state < 0) {
#if defined(__x86_64__)
        state = detect_hardware();
#else
        state = 0;
#endif
        __atomic_store_n(&hardware_state, state, __ATOMIC_RELEASE);
    }
    return state;
}

uint32_t ckeel_crc32c_extend(uint32_t crc, const void *bytes, size_t length) {
#if defined(__x86_64__)
    if (ckeel_crc32c_uses_hardware()) {
        return extend_hardware(crc, bytes, length);
    }
#endif
    return ckeel_crc32c_extend_table(crc, bytes, length);
}
