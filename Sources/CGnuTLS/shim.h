// GnuTLS for Swift. The inline helpers exist because the library's allocator and a few constants
// are C globals or macros that Swift cannot use directly (a global function pointer is shared
// mutable state to Swift 6; a function-like macro does not import).
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <errno.h>

/// Allocates memory GnuTLS will free itself (the PSK key a server callback returns).
static inline void *cgnutls_malloc(size_t size) { return gnutls_malloc(size); }

/// The errno a push/pull function reports through gnutls_transport_set_errno for "try again later".
static inline int cgnutls_eagain(void) { return EAGAIN; }

/// Frees memory GnuTLS allocated for the caller (gnutls_free is a macro over a global pointer).
static inline void cgnutls_free(void *pointer) { gnutls_free(pointer); }
