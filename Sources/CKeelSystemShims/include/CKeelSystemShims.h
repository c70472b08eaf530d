// The few POSIX and Linux calls that Swift's Glibc module does not expose cleanly, and the CPU's
// prefetch hint.
#ifndef CKEEL_SYSTEM_SHIMS_H
#define CKEEL_SYSTEM_SHIMS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// Reserves `length` bytes at `offset` without changing what reads return (fallocate with mode 0
/// on Linux, `posix_fallocate` elsewhere). Returns 0 or an errno value.
int ckeel_fallocate(int fd, int64_t offset, int64_t length);

/// Takes an exclusive, non-blocking advisory lock on `fd` (flock LOCK_EX|LOCK_NB).
/// Returns 0 or an errno value (EWOULDBLOCK when another process holds it).
int ckeel_flock_exclusive(int fd);

/// Opens `path` as a directory for fsync. Returns the descriptor or -1 with errno set.
int ckeel_open_directory(const char *path);

/// The current thread's errno.
int ckeel_errno(void);

/// Asks the CPU to start loading the cache line at `address` (a hint: it never faults, whatever
/// the address, and changes nothing a program can see but timing).
static inline void ckeel_prefetch(const void *address) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(address);
#else
    (void)address;
#endif
}

#ifdef __cplusplus
}
#endif

#endif
