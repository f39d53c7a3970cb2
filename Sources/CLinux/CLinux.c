#define _GNU_SOURCE
#include <fcntl.h>
#include <unistd.h>
#include "CLinux.h"

int qnbd_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    return fallocate(fd, mode, (off_t)offset, (off_t)length);
}

int64_t qnbd_seek_data(int fd, int64_t offset) { return lseek(fd, (off_t)offset, SEEK_DATA); }

int64_t qnbd_seek_hole(int fd, int64_t offset) { return lseek(fd, (off_t)offset, SEEK_HOLE); }
