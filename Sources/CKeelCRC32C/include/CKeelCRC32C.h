// CRC32C (Castagnoli, polynomial 0x1EDC6F41, reflected 0x82F63B78), as used by iSCSI (RFC 3720),
// ext4 and LevelDB. Keel checksums every log record and checkpoint with it.
#ifndef CKEEL_CRC32C_H
#define CKEEL_CRC32C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Extends `crc` (the value returned for the bytes before, or 0 to start) over `length` bytes.
/// The result is the finished CRC32C of everything so far; pass it back in to continue.
uint32_t ckeel_crc32c_extend(uint32_t crc, const void *bytes, size_t length);

/// 1 when the hardware instruction (SSE4.2 `crc32`) is in use, 0 when the table fallback is.
int ckeel_crc32c_uses_hardware(void);

/// The table implementation alone, so tests can check both paths agree.
uint32_t ckeel_crc32c_extend_table(uint32_t crc, const void *bytes, size_t length);

#ifdef __cplusplus
}
#endif

#endif
