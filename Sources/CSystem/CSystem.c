/* The one call that needs a real C body: the ioctl request number is a macro of macros. */
#include <sys/ioctl.h>
#include <linux/fs.h>
#include "CSystem.h"

int csystem_block_device_size(int fd, uint64_t *bytes) { return ioctl(fd, BLKGETSIZE64, bytes); }
