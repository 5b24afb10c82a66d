/* pcopy.c - the read bound and the copy bound of a set of files: THREADS
 * threads read the files in 16 MiB pieces (piece i to thread i mod THREADS)
 * with pread, and with -o also write each piece at the same offset of a file
 * of the same name in OUTDIR (pwrite, fsync at the end), as `moecal export`
 * reads and writes.  Prints bytes, seconds and GB/s of bytes read plus
 * bytes written.
 *   pcopy [-t THREADS] [-o OUTDIR] FILE... */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PIECE ((size_t)16 << 20)

typedef struct { int in, out; uint64_t size; } file;
typedef struct { size_t f; uint64_t off; } piece;

static file *files;
static piece *pieces;
static size_t npieces, next;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t nread, nwritten;
static int failed;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void *run(void *arg)
{
    char *buf = malloc(PIECE);
    uint64_t r = 0, w = 0;
    (void)arg;
    if (!buf)
        return NULL;
    for (;;) {
        pthread_mutex_lock(&mu);
        size_t i = next < npieces && !failed ? next++ : (size_t)-1;
        pthread_mutex_unlock(&mu);
        if (i == (size_t)-1)
            break;
        const file *f = &files[pieces[i].f];
        uint64_t off = pieces[i].off;
        size_t n = f->size - off < PIECE ? (size_t)(f->size - off) : PIECE;
        for (size_t d = 0; d < n;) {
            ssize_t k = pread(f->in, buf + d, n - d, (off_t)(off + d));
            if (k <= 0) {
                perror("pread");
                failed = 1;
                break;
            }
            d += (size_t)k;
        }
        r += n;
        if (f->out >= 0) {
            for (size_t d = 0; d < n;) {
                ssize_t k = pwrite(f->out, buf + d, n - d, (off_t)(off + d));
                if (k <= 0) {
                    perror("pwrite");
                    failed = 1;
                    break;
                }
                d += (size_t)k;
            }
            w += n;
        }
    }
    pthread_mutex_lock(&mu);
    nread += r;
    nwritten += w;
    pthread_mutex_unlock(&mu);
    free(buf);
    return NULL;
}

int main(int argc, char **argv)
{
    int nt = 8, c;
    const char *outdir = NULL;

    while ((c = getopt(argc, argv, "t:o:")) != -1) {
        if (c == 't')
            nt = atoi(optarg);
        else if (c == 'o')
            outdir = optarg;
        else
            return 2;
    }
    int nf = argc - optind;
    if (nf < 1 || nt < 1) {
        fprintf(stderr, "usage: pcopy [-t THREADS] [-o OUTDIR] FILE...\n");
        return 2;
    }
    files = calloc((size_t)nf, sizeof *files);
    size_t cap = 0;
    double t0 = now();
    for (int i = 0; i < nf; i++) {
        const char *p = argv[optind + i];
        struct stat st;
        files[i].out = -1;
        if ((files[i].in = open(p, O_RDONLY)) < 0 || fstat(files[i].in, &st) != 0) {
            fprintf(stderr, "pcopy: %s: %s\n", p, strerror(errno));
            return 1;
        }
        files[i].size = (uint64_t)st.st_size;
        if (outdir) {
            char q[4096];
            const char *b = strrchr(p, '/');
            snprintf(q, sizeof q, "%s/%s", outdir, b ? b + 1 : p);
            files[i].out = open(q, O_WRONLY | O_CREAT | O_TRUNC, 0666);
            if (files[i].out < 0 || ftruncate(files[i].out, (off_t)st.st_size) != 0) {
                fprintf(stderr, "pcopy: %s: %s\n", q, strerror(errno));
                return 1;
            }
        }
        for (uint64_t off = 0; off < files[i].size; off += PIECE) {
            if (npieces == cap) {
                cap = cap ? 2 * cap : 1024;
                pieces = realloc(pieces, cap * sizeof *pieces);
            }
            pieces[npieces++] = (piece){(size_t)i, off};
        }
    }
    pthread_t *tid = calloc((size_t)nt, sizeof *tid);
    for (int t = 0; t < nt; t++)
        pthread_create(&tid[t], NULL, run, NULL);
    for (int t = 0; t < nt; t++)
        pthread_join(tid[t], NULL);
    for (int i = 0; i < nf; i++) {
        if (files[i].out >= 0 && (fsync(files[i].out) != 0 || close(files[i].out) != 0)) {
            perror("fsync");
            failed = 1;
        }
        close(files[i].in);
    }
    double dt = now() - t0;
    printf("pcopy: %d threads, %d files: read %.3f GB, wrote %.3f GB in %.3f s: %.2f GB/s "
           "in+out\n", nt, nf, nread / 1e9, nwritten / 1e9, dt, (nread + nwritten) / 1e9 / dt);
    return failed;
}
