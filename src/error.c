/* error.c - error recording; see error.h for the convention. */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "error.h"

#define MSG_MAX 2048

static _Thread_local char err_msg[MSG_MAX];
static _Thread_local moecal_status err_code = MOECAL_OK;
static int peer_exit_code = 1;
#ifdef MOECAL_DEBUG
static _Thread_local const char *where_file; /* the next message's call site */
static _Thread_local int where_line;

void moecal_error_where(const char *file, int line)
{
    where_file = file;
    where_line = line;
}

_Noreturn void moecal_assert_fail(const char *cond, const char *file, int line)
{
    fprintf(stderr, "moecal: internal error: assertion '%s' failed at %s:%d\n", cond, file,
            line);
    fflush(stderr);
    abort();
}
#endif

/* Keep a message whole when it fits; else its start and its end, where the
 * reason is (paths near PATH_MAX must not cut it off). */
static void store(const char *msg)
{
    const char *full = msg;
#ifdef MOECAL_DEBUG
    char located[4 * MSG_MAX + 8192 + 300];
    if (where_file) {
        snprintf(located, sizeof located, "%s [%s:%d]", msg, where_file, where_line);
        full = located;
        where_file = NULL;
    }
#endif
    size_t n = strlen(full);
    const char *gap = " [...] ";

    if (n < MSG_MAX) {
        memcpy(err_msg, full, n + 1);
        return;
    }
    size_t head = MSG_MAX / 4, tail = MSG_MAX - 1 - head - strlen(gap);
    memcpy(err_msg, full, head);
    memcpy(err_msg + head, gap, strlen(gap));
    memcpy(err_msg + head + strlen(gap), full + n - tail, tail + 1);
}

moecal_status moecal_error_vset(moecal_status code, const char *fmt, va_list ap)
{
    char full[4 * MSG_MAX + 8192];
    vsnprintf(full, sizeof full, fmt, ap);
    store(full);
    err_code = code;
    return code;
}

/* Names in parentheses: not the --enable-debug macros of error.h. */
moecal_status (moecal_error_set)(moecal_status code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    moecal_error_vset(code, fmt, ap);
    va_end(ap);
    return code;
}

moecal_status (moecal_error_in)(moecal_status code, const char *where, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    moecal_error_vset(code, fmt, ap);
    va_end(ap);
    moecal_error_prefix("%s: ", where);
    return code;
}

moecal_status (moecal_error_errno)(int errnum, const char *fmt, ...)
{
    va_list ap;
    size_t n;
    moecal_status code = MOECAL_ERR_IO;

    char full[4 * MSG_MAX + 8192];

    va_start(ap, fmt);
    vsnprintf(full, sizeof full - 256, fmt, ap);
    va_end(ap);
    n = strlen(full);
    snprintf(full + n, sizeof full - n, ": %s", strerror(errnum));
    store(full);
    if (errnum == ENOMEM)
        code = MOECAL_ERR_NOMEM;
    err_code = code;
    return code;
}

void moecal_error_prefix(const char *fmt, ...)
{
    char head[MSG_MAX];
    size_t hl, ml;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(head, sizeof head, fmt, ap);
    va_end(ap);
    hl = strlen(head);
    ml = strlen(err_msg);
    if (hl + ml >= MSG_MAX)
        ml = MSG_MAX - 1 - hl;
    memmove(err_msg + hl, err_msg, ml);
    memcpy(err_msg, head, hl);
    err_msg[hl + ml] = '\0';
}

moecal_status moecal_error_peer(int rank, int exit_code)
{
    peer_exit_code = exit_code > 0 ? exit_code : MOECAL_EXIT_FAILURE;
    return moecal_error_set(MOECAL_ERR_PEER, "stopped because rank %d failed", rank);
}

const char *moecal_error_message(void)
{
    return err_msg[0] ? err_msg : "unknown error";
}

moecal_status moecal_error_code(void)
{
    return err_code;
}

void moecal_error_clear(void)
{
    err_msg[0] = '\0';
    err_code = MOECAL_OK;
}

const char *moecal_status_name(moecal_status s)
{
    switch (s) {
    case MOECAL_OK: return "success";
    case MOECAL_ERR_USAGE: return "usage error";
    case MOECAL_ERR_IO: return "I/O error";
    case MOECAL_ERR_FORMAT: return "format error";
    case MOECAL_ERR_UNSUPPORTED: return "unsupported";
    case MOECAL_ERR_MISMATCH: return "inputs disagree";
    case MOECAL_ERR_NONFINITE: return "non-finite input";
    case MOECAL_ERR_EXISTS: return "output exists";
    case MOECAL_ERR_NOMEM: return "out of memory";
    case MOECAL_ERR_MPI: return "MPI error";
    case MOECAL_ERR_HDF5: return "HDF5 error";
    case MOECAL_ERR_CUDA: return "CUDA error";
    case MOECAL_ERR_INTERRUPTED: return "interrupted";
    case MOECAL_ERR_PEER: return "stopped by another rank's error";
    case MOECAL_ERR_INTERNAL: return "internal error";
    }
    return "error";
}

int moecal_status_exit_code(moecal_status s)
{
    switch (s) {
    case MOECAL_OK: return MOECAL_EXIT_OK;
    case MOECAL_ERR_USAGE: return MOECAL_EXIT_USAGE;
    case MOECAL_ERR_FORMAT:
    case MOECAL_ERR_UNSUPPORTED:
    case MOECAL_ERR_MISMATCH:
    case MOECAL_ERR_NONFINITE: return MOECAL_EXIT_INPUT;
    case MOECAL_ERR_IO:
    case MOECAL_ERR_EXISTS: return MOECAL_EXIT_OUTPUT;
    case MOECAL_ERR_NOMEM: return MOECAL_EXIT_RESOURCE;
    case MOECAL_ERR_INTERRUPTED: return MOECAL_EXIT_REQUEUE;
    case MOECAL_ERR_PEER: return peer_exit_code;
    default: return MOECAL_EXIT_FAILURE;
    }
}
