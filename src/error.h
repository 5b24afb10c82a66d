/* error.h - moecal's one error convention.
 *
 * Library-level functions return a moecal_status and, on failure, record a
 * message with moecal_error_set().  The message says what was wrong and where
 * (file, tensor, option, line); it never says which rank: the top level adds
 * "moecal: error: rank R (host): " when it reports the error and brings the
 * whole job down (moecal_fatal and moecal_check_all in runtime.c).
 *
 * The message buffer is thread-local, so OpenMP workers may set errors.
 */
#ifndef MOECAL_ERROR_H
#define MOECAL_ERROR_H

#include <stdarg.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moecal_status {
    MOECAL_OK = 0,
    MOECAL_ERR_USAGE,       /* bad option, conf key or value */
    MOECAL_ERR_IO,          /* open/read/write/rename failed (errno) */
    MOECAL_ERR_FORMAT,      /* an input file is malformed */
    MOECAL_ERR_UNSUPPORTED, /* recognised but not supported (dtype, model) */
    MOECAL_ERR_MISMATCH,    /* inputs disagree (config vs tensors vs activations) */
    MOECAL_ERR_NONFINITE,   /* NaN/Inf in input data under --nonfinite=error */
    MOECAL_ERR_EXISTS,      /* output exists and --force not given */
    MOECAL_ERR_NOMEM,       /* host or device memory */
    MOECAL_ERR_MPI,
    MOECAL_ERR_HDF5,
    MOECAL_ERR_CUDA,
    MOECAL_ERR_INTERRUPTED, /* stopped by a signal after writing a checkpoint */
    MOECAL_ERR_PEER,        /* another rank failed and reports it; stop quietly */
    MOECAL_ERR_INTERNAL
} moecal_status;

/* Record an error; returns code so that `return moecal_error_set(...)` works. */
moecal_status moecal_error_set(moecal_status code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
moecal_status moecal_error_vset(moecal_status code, const char *fmt, va_list ap);
/* Record "WHERE: message" (a file or object the message is about). */
moecal_status moecal_error_in(moecal_status code, const char *where, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* errno-flavoured: appends ": strerror(errnum)". */
moecal_status moecal_error_errno(int errnum, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* This rank stops because rank `rank` failed with exit code exit_code (which
 * that rank reports); moecal_status_exit_code(MOECAL_ERR_PEER) returns it. */
moecal_status moecal_error_peer(int rank, int exit_code);

/* Prepend context ("model.safetensors: ") to the recorded message. */
void moecal_error_prefix(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

const char *moecal_error_message(void);
moecal_status moecal_error_code(void);
void moecal_error_clear(void);

#ifdef MOECAL_DEBUG
/* --enable-debug: every message recorded through moecal_error_set or
 * moecal_error_errno ends with " [file:line]" of the call, and
 * MOECAL_ASSERT checks internal invariants (a failure aborts the rank with
 * the condition and its place). */
void moecal_error_where(const char *file, int line);
_Noreturn void moecal_assert_fail(const char *cond, const char *file, int line);
#define moecal_error_set(...) (moecal_error_where(__FILE__, __LINE__), moecal_error_set(__VA_ARGS__))
#define moecal_error_errno(...) \
    (moecal_error_where(__FILE__, __LINE__), moecal_error_errno(__VA_ARGS__))
#define moecal_error_in(...) (moecal_error_where(__FILE__, __LINE__), moecal_error_in(__VA_ARGS__))
#define MOECAL_ASSERT(cond) ((cond) ? (void)0 : moecal_assert_fail(#cond, __FILE__, __LINE__))
#else
#define MOECAL_ASSERT(cond) ((void)0)
#endif

/* Short name of a status ("format error"). */
const char *moecal_status_name(moecal_status s);
/* Process exit code for a status; documented in moecal(1), EXIT STATUS. */
int moecal_status_exit_code(moecal_status s);

/* Exit codes. */
enum {
    MOECAL_EXIT_OK = 0,
    MOECAL_EXIT_FAILURE = 1,    /* runtime failure: MPI, HDF5, CUDA, internal */
    MOECAL_EXIT_USAGE = 2,      /* bad command line, environment or conf file */
    MOECAL_EXIT_INPUT = 3,      /* bad or inconsistent input files */
    MOECAL_EXIT_OUTPUT = 4,     /* cannot write output (exists, I/O, disk full) */
    MOECAL_EXIT_RESOURCE = 5,   /* out of host or GPU memory */
    MOECAL_EXIT_REQUEUE = 75    /* interrupted by SIGTERM/SIGUSR1, checkpoint written */
};

/* Evaluate a moecal_status expression once; return it on failure. */
#define MOECAL_TRY(expr)                                 \
    do {                                                 \
        moecal_status moecal_try_s_ = (expr);            \
        if (moecal_try_s_ != MOECAL_OK)                  \
            return moecal_try_s_;                        \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
