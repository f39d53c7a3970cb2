#ifndef QNBD_CSYSTEM_H
#define QNBD_CSYSTEM_H
/* Every C call qnbd makes outside libuv, in one place.
 *
 * Swift's Glibc module is built without _GNU_SOURCE, so the Linux calls below are invisible to Swift.
 * Defining _GNU_SOURCE in a module header is not an option: it gives this module different struct
 * layouts from Swift's own Glibc module, and any file importing both stops compiling. So the calls are
 * declared here under our own names, bound to glibc's symbols with asm labels (no wrapper call on the
 * hot path), and the constants are spelled out. Swift code reaches them through the SystemCalls
 * module, which adds the EINTR and short-transfer loops. */
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

extern ssize_t csystem_preadv2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags) __asm__("preadv2");
extern ssize_t csystem_pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags) __asm__("pwritev2");
extern int csystem_fallocate(int fd, int mode, off_t offset, off_t len) __asm__("fallocate");

/* preadv2/pwritev2 flags (linux/fs.h). */
static const int csystem_rwf_dsync = 0x00000002;
static const int csystem_rwf_nowait = 0x00000008;

/* fallocate modes (linux/falloc.h). */
static const int csystem_falloc_keep_size = 0x01;
static const int csystem_falloc_punch_hole = 0x02;
static const int csystem_falloc_zero_range = 0x10;

/* lseek whence values (unistd.h under _GNU_SOURCE). */
static const int csystem_seek_data = 3;
static const int csystem_seek_hole = 4;

/* BLKGETSIZE64 (linux/fs.h): the size of a block device in bytes. */
int csystem_block_device_size(int fd, uint64_t *bytes);

#endif
