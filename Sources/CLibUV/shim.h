#ifndef CLIBUV_SHIM_H
#define CLIBUV_SHIM_H
/* libuv only. Every other C call qnbd makes is declared in the CSystem module. */
#include <uv.h>
#endif
