#ifndef QNBD_CLINUX_H
#define QNBD_CLINUX_H
/* Linux-only libc calls and constants that Swift's Glibc module hides behind _GNU_SOURCE. */
#include <stdint.h>
#include <sys/types.h>

int qnbd_fallocate(int fd, int mode, int64_t offset, int64_t length);
int64_t qnbd_seek_data(int fd, int64_t offset);
int64_t qnbd_seek_hole(int fd, int64_t offset);

#endif
