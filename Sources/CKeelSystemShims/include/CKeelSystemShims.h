// The few POSIX and Linux calls that Swift's Glibc module does not expose cleanly.
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

#ifdef __cplusplus
}
#endif

#endif
