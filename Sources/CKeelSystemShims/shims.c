#define _GNU_SOURCE
#include "CKeelSystemShims.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

int ckeel_fallocate(int fd, int64_t offset, int64_t length) {
#if defined(__linux__)
    if (fallocate(fd, 0, (off_t)offset, (off_t)length) == 0) {
        return 0;
    }
    int error = errno;
    if (error == EOPNOTSUPP || error == ENOSYS) {
        // Some file systems (tmpfs on old kernels, overlay) lack it: fall back to the portable call.
        return posix_fallocate(fd, (off_t)offset, (off_t)length);
    }
    return error;
#else
    return posix_fallocate(fd, (off_t)offset, (off_t)length);
#endif
}

int ckeel_flock_exclusive(int fd) {
    if (flock(fd, LOCK_EX | LOCK_NB) == 0) {
        return 0;
    }
    return errno;
}

int ckeel_open_directory(const char *path) {
    return open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
}

int ckeel_errno(void) {
    return errno;
}
