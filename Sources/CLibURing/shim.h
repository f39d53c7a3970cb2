// liburing (Debian's liburing-dev) for FileRing. liburing's hot helpers are static inline C; these
// wrappers give Swift plain functions with the exact arguments FileRing uses, and keep the macros
// (RWF_*, IORING_FSYNC_DATASYNC) on the C side.
#ifndef CLIBURING_SHIM_H
#define CLIBURING_SHIM_H
// liburing.h defines _XOPEN_SOURCE and _GNU_SOURCE before its includes, which would give glibc's
// types (fd_set's fields) different definitions here than in CLibUV and Glibc; including the system
// headers first fixes glibc's feature set to the default one both of them use.
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <signal.h>
#include <fcntl.h>
#include <inttypes.h>
#include <string.h>
#include <time.h>
#include <liburing.h>
#include <linux/fs.h>
#include <stdint.h>

/// A free submission queue entry, or NULL when the queue is full.
static inline struct io_uring_sqe *qnbd_uring_get_sqe(struct io_uring *ring) {
    return io_uring_get_sqe(ring);
}

static inline void qnbd_uring_prep_read(struct io_uring_sqe *sqe, int fd, void *buffer, unsigned length,
                                        uint64_t offset, uint64_t token) {
    io_uring_prep_read(sqe, fd, buffer, length, offset);
    io_uring_sqe_set_data64(sqe, token);
}

/// `dsync` != 0 asks for RWF_DSYNC (the data is durable when the write completes).
static inline void qnbd_uring_prep_write(struct io_uring_sqe *sqe, int fd, const void *buffer, unsigned length,
                                         uint64_t offset, int dsync, uint64_t token) {
    io_uring_prep_write(sqe, fd, buffer, length, offset);
    sqe->rw_flags = dsync ? RWF_DSYNC : 0;
    io_uring_sqe_set_data64(sqe, token);
}

static inline void qnbd_uring_prep_fdatasync(struct io_uring_sqe *sqe, int fd, uint64_t token) {
    io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
    io_uring_sqe_set_data64(sqe, token);
}

static inline void qnbd_uring_prep_fallocate(struct io_uring_sqe *sqe, int fd, int mode, uint64_t offset,
                                             uint64_t length, uint64_t token) {
    io_uring_prep_fallocate(sqe, fd, mode, offset, length);
    io_uring_sqe_set_data64(sqe, token);
}

/// Copies up to `count` completions into `tokens`/`results` and marks them seen; returns how many.
/// No system call: it only reads the shared completion queue.
static inline unsigned qnbd_uring_reap(struct io_uring *ring, uint64_t *tokens, int32_t *results, unsigned count) {
    unsigned head, n = 0;
    struct io_uring_cqe *cqe;
    io_uring_for_each_cqe(ring, head, cqe) {
        if (n == count) break;
        tokens[n] = cqe->user_data;
        results[n] = cqe->res;
        n++;
    }
    io_uring_cq_advance(ring, n);
    return n;
}

/// Whether the kernel implements each opcode FileRing uses; bit 0 read, 1 write, 2 fsync, 3 fallocate.
/// Returns -errno when the probe itself fails.
static inline int qnbd_uring_supported_ops(struct io_uring *ring) {
    struct io_uring_probe *probe = io_uring_get_probe_ring(ring);
    if (!probe) return -1;
    int bits = 0;
    if (io_uring_opcode_supported(probe, IORING_OP_READ)) bits |= 1;
    if (io_uring_opcode_supported(probe, IORING_OP_WRITE)) bits |= 2;
    if (io_uring_opcode_supported(probe, IORING_OP_FSYNC)) bits |= 4;
    if (io_uring_opcode_supported(probe, IORING_OP_FALLOCATE)) bits |= 8;
    io_uring_free_probe(probe);
    return bits;
}

/// Makes the entry's successor wait for it (even if it fails), and posts no completion if it succeeds.
static inline void qnbd_uring_link_silently(struct io_uring_sqe *sqe) {
    sqe->flags |= IOSQE_IO_HARDLINK | IOSQE_CQE_SKIP_SUCCESS;
}

/// Whether the kernel honours IOSQE_CQE_SKIP_SUCCESS (5.17).
static inline int qnbd_uring_can_skip_completions(const struct io_uring *ring) {
    return (ring->features & IORING_FEAT_CQE_SKIP) != 0;
}

static inline unsigned qnbd_uring_sq_space(const struct io_uring *ring) { return io_uring_sq_space_left(ring); }
static inline unsigned qnbd_uring_sq_entries(const struct io_uring *ring) { return ring->sq.ring_entries; }
static inline int qnbd_uring_fd(const struct io_uring *ring) { return ring->ring_fd; }
static inline unsigned qnbd_uring_cq_entries(const struct io_uring *ring) { return ring->cq.ring_entries; }
#endif
