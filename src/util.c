/* util.c - small helpers shared by every module (see util.h). */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "util.h"

uint64_t moecal_fnv1a(uint64_t h, const void *data, size_t n)
{
    const unsigned char *b = data;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 1099511628211ULL;
    }
    return h;
}

moecal_status moecal_fnv1a_file(uint64_t *h, const char *path, uint64_t limit)
{
    unsigned char buf[65536];
    uint64_t done = 0;
    int fd;

    MOECAL_TRY(moecal_open_regular(path, "the file", &fd));
    while (done < limit) {
        size_t want = limit - done < sizeof buf ? (size_t)(limit - done) : sizeof buf;
        ssize_t n = read(fd, buf, want);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            close(fd);
            return moecal_error_errno(e, "%s: read failed", path);
        }
        if (n == 0)
            break;
        *h = moecal_fnv1a(*h, buf, (size_t)n);
        done += (uint64_t)n;
    }
    close(fd);
    return MOECAL_OK;
}

const char *moecal_file_kind(mode_t mode)
{
    static const struct {
        mode_t type;
        const char *name;
    } kinds[] = {
        {S_IFREG, "a regular file"}, {S_IFDIR, "a directory"}, {S_IFIFO, "a FIFO"},
        {S_IFCHR, "a character device"}, {S_IFBLK, "a block device"},
        {S_IFSOCK, "a socket"}, {S_IFLNK, "a symbolic link"},
    };

    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        if ((mode & S_IFMT) == kinds[i].type)
            return kinds[i].name;
    }
    return "not a file";
}

moecal_status moecal_check_regular(const char *path, const char *role)
{
    struct stat st;

    if (stat(path, &st) != 0)
        return moecal_error_errno(errno, "%s: cannot open %s", path, role);
    if (!S_ISREG(st.st_mode))
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: %s is %s, not a regular file", path,
                                role, moecal_file_kind(st.st_mode));
    return MOECAL_OK;
}

moecal_status moecal_open_regular(const char *path, const char *role, int *fd)
{
    struct stat st;
    int f = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);

    *fd = -1;
    if (f < 0) {
        int e = errno;
        moecal_status s = moecal_error_errno(e, "%s: cannot open %s", path, role);
        errno = e; /* for callers that word the message themselves */
        return s;
    }
    if (fstat(f, &st) != 0) {
        int e = errno;
        close(f);
        return moecal_error_errno(e, "%s: cannot stat %s", path, role);
    }
    if (!S_ISREG(st.st_mode)) {
        close(f);
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: %s is %s, not a regular file", path,
                                role, moecal_file_kind(st.st_mode));
    }
    (void)fcntl(f, F_SETFL, fcntl(f, F_GETFL) & ~O_NONBLOCK);
    *fd = f;
    return MOECAL_OK;
}

double moecal_percentile_sorted(const double *x, size_t n, double q)
{
    if (n == 0)
        return 0.0;
    double pos = q * (double)(n - 1);
    size_t lo = (size_t)floor(pos);
    if (lo + 1 >= n)
        return x[n - 1];
    double frac = pos - (double)lo;
    return x[lo] + frac * (x[lo + 1] - x[lo]);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

void moecal_sort_doubles(double *x, size_t n)
{
    qsort(x, n, sizeof *x, cmp_double);
}

moecal_status moecal_read_file(const char *path, const char *role, size_t limit, char **out,
                               size_t *len)
{
    struct stat st;
    size_t got = 0;
    char *buf;
    int fd;

    *out = NULL;
    *len = 0;
    MOECAL_TRY(moecal_open_regular(path, role, &fd));
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return moecal_error_errno(e, "%s: cannot stat", path);
    }
    if ((uint64_t)st.st_size > limit) {
        close(fd);
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: %llu bytes is more than the %zu "
                                "allowed for %s", path, (unsigned long long)st.st_size, limit,
                                role);
    }
    if (!(buf = malloc((size_t)st.st_size + 1))) {
        close(fd);
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", path);
    }
    while (got < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            free(buf);
            close(fd);
            return moecal_error_errno(e, "%s: read failed", path);
        }
        if (n == 0)
            break; /* shrank under us: what is there */
        got += (size_t)n;
    }
    close(fd);
    buf[got] = '\0';
    *out = buf;
    *len = got;
    return MOECAL_OK;
}

const char *moecal_json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE: return "true";
    case JSON_FALSE: return "false";
    case JSON_NULL: return "null";
    }
    return "a JSON value";
}

double moecal_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

moecal_status moecal_path_join(char *buf, size_t n, const char *dir, const char *name)
{
    int len = snprintf(buf, n, "%s/%s", dir, name);

    if (len < 0 || (size_t)len >= n) {
        if (n)
            buf[0] = '\0';
        return moecal_error_set(MOECAL_ERR_USAGE, "%s/%s: a path of %d bytes, more than the %zu "
                                "this build allows", dir, name, len, n ? n - 1 : 0);
    }
    return MOECAL_OK;
}

const char *moecal_printable(char *buf, size_t n, const char *s)
{
    size_t o = 0;

    if (n == 0)
        return buf;
    for (; *s && o + 5 < n; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c == 0x7f)
            o += (size_t)snprintf(buf + o, n - o, "\\x%02x", c);
        else
            buf[o++] = (char)c;
    }
    if (*s && o + 4 < n) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o] = '\0';
    return buf;
}

void *moecal_carve_take(moecal_carve *c, size_t n, size_t size)
{
    size_t bytes;
    void *p = c->block ? c->block + c->used : NULL;

    if (__builtin_mul_overflow(n, size, &bytes) ||
        __builtin_add_overflow(bytes, MOECAL_CARVE_ALIGN - 1, &bytes))
        c->overflow = true;
    bytes = bytes / MOECAL_CARVE_ALIGN * MOECAL_CARVE_ALIGN;
    if (bytes == 0)
        bytes = MOECAL_CARVE_ALIGN;
    if (__builtin_add_overflow(c->used, bytes, &c->used))
        c->overflow = true;
    return p;
}

bool moecal_carve_alloc(moecal_carve *c)
{
    void *p = NULL;

    if (c->overflow || posix_memalign(&p, MOECAL_CARVE_ALIGN, c->used ? c->used : 1) != 0)
        return false;
    c->block = p;
    c->used = 0;
    return true;
}
