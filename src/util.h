/* util.h - small helpers shared by every module (no MPI). */
#ifndef MOECAL_UTIL_H
#define MOECAL_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "error.h"

/* "a directory", "a FIFO", "a character device", ... for a stat mode. */
const char *moecal_file_kind(mode_t mode);

/* Every file moecal reads goes through these, so that a FIFO, a device or a
 * directory never blocks a rank or reads forever.  path must name a regular
 * file (symbolic links followed); otherwise MOECAL_ERR_FORMAT "PATH: ROLE is
 * a FIFO, not a regular file" (exit 3), or MOECAL_ERR_IO with errno's reason
 * (missing, a symbolic link loop, no permission: exit 4). */
moecal_status moecal_check_regular(const char *path, const char *role);
/* The same, race-free: open read-only without blocking (a FIFO with no
 * writer), check with fstat, then clear O_NONBLOCK.  *fd on success; when
 * the open itself fails, errno is left as open set it. */
moecal_status moecal_open_regular(const char *path, const char *role, int *fd);

/* The whole regular file path (opened as moecal_open_regular does, role
 * naming it in messages) into *out, NUL-terminated, *len bytes; a file over
 * limit bytes is MOECAL_ERR_FORMAT.  A file that shrinks while read gives
 * what was there.  free() *out. */
moecal_status moecal_read_file(const char *path, const char *role, size_t limit, char **out,
                               size_t *len);

/* "an object", "a string", ... for a JSON value (jansson's json_t), in
 * messages about what a file holds where something else was expected. */
struct json_t;
const char *moecal_json_kind(const struct json_t *v);

/* -1, 0 or 1 as a < b, a == b, a > b: the steps of qsort comparators. */
#define MOECAL_CMP(a, b) (((a) > (b)) - ((a) < (b)))

/* Arrays carved out of one aligned allocation.  Describe them twice with
 * moecal_carve_take: over a carve without a block (the sizes add up), then,
 * after moecal_carve_alloc, over the block (each call returns its array,
 * aligned to MOECAL_CARVE_ALIGN, never NULL even for no elements).
 * moecal_carve_alloc fails (false) on a size that overflowed or ENOMEM;
 * free(c.block) releases every array. */
#define MOECAL_CARVE_ALIGN 64
typedef struct moecal_carve {
    char *block;     /* NULL while sizing */
    size_t used;
    bool overflow;
} moecal_carve;
void *moecal_carve_take(moecal_carve *c, size_t n, size_t size);
bool moecal_carve_alloc(moecal_carve *c);

/* s as it may be quoted in a message (names from files are untrusted):
 * control bytes as \xNN, cut with "..." when it does not fit buf; returns
 * buf. */
const char *moecal_printable(char *buf, size_t n, const char *s);

/* "DIR/NAME" into buf[n]; a path that does not fit is MOECAL_ERR_USAGE
 * naming both parts and the limit, never a truncated path. */
moecal_status moecal_path_join(char *buf, size_t n, const char *dir, const char *name);

/* Seconds on the monotonic clock (the one clock of every timing). */
double moecal_now(void);

/* FNV-1a, 64 bits: h (start with MOECAL_FNV_BASIS) updated with n bytes. */
#define MOECAL_FNV_BASIS 1469598103934665603ULL
uint64_t moecal_fnv1a(uint64_t h, const void *data, size_t n);
/* *h updated with the first limit bytes of the regular file path (all of it
 * for UINT64_MAX), read without blocking on a special file. */
moecal_status moecal_fnv1a_file(uint64_t *h, const char *path, uint64_t limit);

/* Percentile q (0..1) of ascending x[0..n-1], linear between closest ranks
 * (numpy's default method); 0 for n == 0. */
double moecal_percentile_sorted(const double *x, size_t n, double q);
/* Sort x[0..n-1] ascending (qsort with a total order on non-NaN values). */
void moecal_sort_doubles(double *x, size_t n);

#endif
