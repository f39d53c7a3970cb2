#ifndef CLIBUV_SHIM_H
#define CLIBUV_SHIM_H
#define _GNU_SOURCE
/* Added by UVCore: defining _GNU_SOURCE here gives this module different glibc
 * struct layouts from Swift's own Glibc module ('fd_set' from 'SwiftGlibc' is
 * not present in 'CLibUV'), which breaks any file that imports both. The GNU
 * calls UVCore needs are declared below under their own names instead. */
#undef _GNU_SOURCE
#include <uv.h>
#include <sys/uio.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>

/* preadv2/pwritev2 flags are not always exposed by glibc headers to Swift. */
#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif
#ifndef RWF_DSYNC
#define RWF_DSYNC 0x00000002
#endif
static const int clibuv_rwf_nowait = RWF_NOWAIT;
static const int clibuv_rwf_dsync = RWF_DSYNC;

/* Added by UVCore: glibc declares these only under _GNU_SOURCE (see above);
 * the asm labels bind straight to glibc's symbols. */
extern ssize_t clibuv_preadv2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags) __asm__("preadv2");
extern ssize_t clibuv_pwritev2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags) __asm__("pwritev2");
extern int clibuv_fallocate(int fd, int mode, off_t offset, off_t len) __asm__("fallocate");
static const int clibuv_seek_data = 3; /* SEEK_DATA */
static const int clibuv_seek_hole = 4; /* SEEK_HOLE */
#endif
