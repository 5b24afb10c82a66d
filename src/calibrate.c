/* calibrate.c - the calibration job: shard experts over ranks, stream layers
 * and token chunks, peer-max fixup, parallel-HDF5 output.  DESIGN.md §2, §5. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_getaffinity */
#endif
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "calibrate.h"
#include "export.h"
#include "model.h"
#include "prefetch.h"
#include "router.h"
#include "runtime.h"
#include "tokens.h"
#include "util.h"

moecal_status moecal_calib_parse_layers(const char *spec, const int *moe_layers, int n_moe,
                                        int **out, int *n_out)
{
    int *sel = calloc((size_t)(n_moe ? n_moe : 1), sizeof *sel);
    int n = 0;
    const char *p = spec;

    *out = NULL;
    *n_out = 0;
    if (!sel)
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
    if (!spec || strcmp(spec, "all") == 0) {
        memcpy(sel, moe_layers, (size_t)n_moe * sizeof *sel);
        *out = sel;
        *n_out = n_moe;
        return MOECAL_OK;
    }
    {
        unsigned char *want = calloc((size_t)(n_moe ? n_moe : 1), 1);
        if (!want) {
            free(sel);
            return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
        }
        while (*p) {
            char *end;
            long a, b;
            errno = 0;
            a = strtol(p, &end, 10);
            if (end == p || errno || a < 0)
                goto bad;
            b = a;
            if (*end == '-') {
                p = end + 1;
                b = strtol(p, &end, 10);
                if (end == p || errno || b < a)
                    goto bad;
            }
            for (long l = a; l <= b; l++) {
                int found = -1;
                for (int i = 0; i < n_moe; i++)
                    if (moe_layers[i] == l)
                        found = i;
                if (found < 0) {
                    /* Name the layer: a dense layer or one past the end. */
                    free(want);
                    free(sel);
                    return moecal_error_set(MOECAL_ERR_USAGE,
                                            "option 'layers': layer %ld is not a MoE layer of "
                                            "this model (MoE layers: %d-%d)", l,
                                            n_moe ? moe_layers[0] : -1,
                                            n_moe ? moe_layers[n_moe - 1] : -1);
                }
                want[found] = 1;
            }
            if (*end == ',')
                end++;
            else if (*end != '\0')
                goto bad;
            p = end;
        }
        for (int i = 0; i < n_moe; i++)
            if (want[i])
                sel[n++] = moe_layers[i];
        free(want);
        if (n == 0)
            goto bad;
        *out = sel;
        *n_out = n;
        return MOECAL_OK;
    bad:
        free(want);
        free(sel);
        return moecal_error_set(MOECAL_ERR_USAGE, "option 'layers': '%s' is not a layer list "
                                "(expected 'all' or e.g. '3-10,12')", spec);
    }
}

/* ---------------------------------------------------------------- progress */

typedef struct progress {
    int tty;
    double t0, tlayer;
    int64_t tokens_done, tokens_total;
} progress;

static void fmt_hms(double s, char *buf, size_t len)
{
    long t = s > 0 && s < 1e9 ? (long)(s + 0.5) : 0;
    snprintf(buf, len, "%02ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
}

static void progress_chunk(progress *pg, int li, int L, int ci, int C, int64_t ntok)
{
    double now = moecal_now(), el = now - pg->t0, rate;
    char eta[32];

    pg->tokens_done += ntok;
    rate = el > 0 ? (double)pg->tokens_done / el : 0;
    fmt_hms(rate > 0 ? (double)(pg->tokens_total - pg->tokens_done) / rate : 0, eta, sizeof eta);
    if (moecal_world_rank() != 0 || moecal_verbosity() < MOECAL_LOG_INFO)
        return;
    if (pg->tty) {
        int width = 30, fill = (int)(width * (double)pg->tokens_done / (double)pg->tokens_total);
        fprintf(stderr, "\r[%.*s%*s] layer %d/%d chunk %d/%d %10.0f tokens/s ETA %s ",
                fill, "##############################", width - fill, "", li + 1, L, ci + 1, C,
                rate, eta);
        if (li + 1 == L && ci + 1 == C)
            fputc('\n', stderr);
        fflush(stderr);
    } else if (ci + 1 == C) {
        fprintf(stderr, "moecal: layer %d/%d done: %d chunks, %.0f tokens/s, %.1fs, ETA %s\n",
                li + 1, L, C, rate, now - pg->tlayer, eta);
        pg->tlayer = now;
    }
}

/* ---------------------------------------------------------------- the job */

typedef struct job {
    const moecal_comm *c;
    const moecal_calib_params *p;
    moecal_model *model;
    const moecal_model_config *cfg;
    int *layers, L;
    int E, H, I, e0, e1, n;
    int64_t T, C, chunk;
    int prec;                    /* router logit precision (moecal_logit_prec) */
    /* this rank's slab */
    float *amax_cal, *weight_amax, *amax_final, *hist;
    int64_t *tok;
} job;

static void job_free(job *j)
{
    free(j->layers);
    free(j->amax_cal);
    free(j->weight_amax);
    free(j->amax_final);
    free(j->hist);
    free(j->tok);
    if (j->model)
        moecal_model_close(j->model);
}

static moecal_status check_inputs(job *j, const char *act_path)
{
    moecal_act *a = NULL;
    moecal_status s = moecal_act_open(act_path, MPI_COMM_NULL, &a);
    const moecal_model_config *cfg = j->cfg;

    if (s != MOECAL_OK)
        return s;
    if (moecal_act_hidden(a) != cfg->hidden_size) {
        s = moecal_error_set(MOECAL_ERR_MISMATCH,
                             "%s has hidden size %d but the model %s/config.json has "
                             "hidden_size %d", act_path, moecal_act_hidden(a),
                             moecal_model_dir(j->model), cfg->hidden_size);
        goto out;
    }
    for (int i = 0; i < j->L; i++)
        if (!moecal_act_has_layer(a, j->layers[i])) {
            s = moecal_error_set(MOECAL_ERR_MISMATCH,
                                 "%s has no /layers/%d/hidden but MoE layer %d of the model "
                                 "%s is to be calibrated (use --layers to choose layers)",
                                 act_path, j->layers[i], j->layers[i], moecal_model_dir(j->model));
            goto out;
        }
    j->T = moecal_act_tokens(a);
    if (j->p->max_tokens > 0 && j->p->max_tokens < j->T)
        j->T = j->p->max_tokens;
    if (j->T <= 0)
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s holds no tokens", act_path);
out:
    moecal_act_close(a);
    return s;
}

static void *xcalloc(size_t n, size_t size, moecal_status *s)
{
    void *p;
    if (*s != MOECAL_OK)
        return NULL;
    p = calloc(n ? n : 1, size);
    if (!p)
        *s = moecal_error_set(MOECAL_ERR_NOMEM, "out of memory: %zu x %zu bytes", n, size);
    return p;
}

static moecal_status file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? MOECAL_ERR_EXISTS : MOECAL_OK;
}

static void side_path(const char *out, const char *suffix, char *buf, size_t len)
{
    size_t n = strlen(out);
    if (n > 3 && strcmp(out + n - 3, ".h5") == 0)
        n -= 3;
    snprintf(buf, len, "%.*s%s", (int)n, out, suffix);
}

/* FNV-1a 64 over the inputs and the options that change results: a
 * checkpoint is only resumed by a run that would compute the same thing. */

static uint64_t fnv_file(uint64_t h, const char *path)
{
    /* a missing file (the index of a single-file model) hashes its name */
    if (moecal_fnv1a_file(&h, path, UINT64_MAX) != MOECAL_OK) {
        moecal_error_clear();
        return moecal_fnv1a(h, path, strlen(path));
    }
    return h;
}

static uint64_t input_hash(const job *j, const char *act_path)
{
    const moecal_calib_params *p = j->p;
    char path[4200], opts[512];
    struct stat st;
    uint64_t h = MOECAL_FNV_BASIS;

    snprintf(path, sizeof path, "%s/config.json", moecal_model_dir(j->model));
    h = fnv_file(h, path);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", moecal_model_dir(j->model));
    h = fnv_file(h, path);
    if (stat(act_path, &st) == 0)
        h = moecal_fnv1a(h, &st.st_size, sizeof st.st_size);
    snprintf(opts, sizeof opts, "T=%lld chunk=%lld all=%d q=%d nf=%d rl=%d", (long long)j->T,
             (long long)j->chunk, (int)p->all_experts, (int)p->qfmt, (int)p->nonfinite,
             j->prec);
    h = moecal_fnv1a(h, opts, strlen(opts));
    h = moecal_fnv1a(h, j->layers, (size_t)j->L * sizeof *j->layers);
    return h;
}

/* The lock file of this process, removed at exit whatever the way out (a
 * failed run leaves none behind; the kernel drops the lock itself). */
static char held_lock[4200];

static void drop_lock(void)
{
    if (held_lock[0])
        unlink(held_lock);
}

/* One job per output: a POSIX lock on OUT.lock, held by rank 0 until exit
 * (the kernel drops it when the process dies, so no stale locks). */
static moecal_status lock_output(const char *out, int *fd_out)
{
    static int registered;
    char path[4200];
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET};
    int fd;

    snprintf(path, sizeof path, "%s.lock", out);
    fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return moecal_error_errno(errno, "%s: cannot create the output lock", path);
    if (fcntl(fd, F_SETLK, &fl) != 0) {
        close(fd);
        return moecal_error_set(MOECAL_ERR_EXISTS, "%s is being written by another moecal job "
                                "(%s is locked)", out, path);
    }
    *fd_out = fd;
    snprintf(held_lock, sizeof held_lock, "%s", path);
    if (!registered)
        registered = atexit(drop_lock) == 0;
    return MOECAL_OK;
}

static void unlock_output(const char *out, int fd)
{
    char path[4200];
    if (fd < 0)
        return;
    snprintf(path, sizeof path, "%s.lock", out);
    unlink(path);
    held_lock[0] = '\0';
    close(fd);
}

/* The files beside OUT, in the order they are written and renamed. */
static const char *const side_suffix[] = {".quant_summary.txt", ".amax_table.txt",
                                          ".hf_quant_config.json", ".safetensors"};
enum { N_SIDE = 4, LONGEST_SUFFIX = 26 /* ".quant_summary.txt.tmp.tmp" */ };

/* Rank 0, before anything is read: the output names are usable, and no
 * output or side file is one of the inputs. */
static moecal_status check_output(const moecal_calib_params *p, const char *act)
{
    const char *out = p->output, *base;
    char path[4200], dir[4200];
    struct stat so, si;
    size_t n = strlen(out);

    if (n == 0)
        return moecal_error_set(MOECAL_ERR_USAGE, "command line: -o/--output is empty");
    if (n + LONGEST_SUFFIX >= 4096)
        return moecal_error_set(MOECAL_ERR_USAGE, "command line: the output path has %zu "
                                "characters; with the side files' suffixes it must stay under "
                                "4096 (at most %d)", n, 4095 - LONGEST_SUFFIX);
    base = strrchr(out, '/') ? strrchr(out, '/') + 1 : out;
    if (strlen(base) + LONGEST_SUFFIX > 255)
        return moecal_error_set(MOECAL_ERR_USAGE, "command line: the output file name has %zu "
                                "characters; with the side files' suffixes it must stay within "
                                "255 (at most %d)", strlen(base), 255 - LONGEST_SUFFIX);
    if (stat(out, &so) == 0 && S_ISDIR(so.st_mode))
        return moecal_error_set(MOECAL_ERR_EXISTS, "%s is a directory; the output is a file",
                                out);
    snprintf(dir, sizeof dir, "%.*s", base == out ? 1 : (int)(base - out), base == out ? "." : out);
    if (stat(dir, &si) != 0)
        return moecal_error_errno(errno, "%s: the output's directory %s", out, dir);
    if (!S_ISDIR(si.st_mode))
        return moecal_error_errno(ENOTDIR, "%s: the output's directory %s", out, dir);
    if (access(dir, W_OK) != 0)
        return moecal_error_errno(errno, "%s: cannot write in %s", out, dir);
    /* OUT.safetensors named model.safetensors in the model's directory
     * would become the model (a single file wins over the index) */
    {
        char st_side[4200];
        struct stat sd, sm;
        side_path(out, ".safetensors", st_side, sizeof st_side);
        const char *sb = strrchr(st_side, '/') ? strrchr(st_side, '/') + 1 : st_side;
        if (p->model_dir && strcmp(sb, "model.safetensors") == 0 && stat(dir, &sd) == 0 &&
            stat(p->model_dir, &sm) == 0 && sd.st_dev == sm.st_dev && sd.st_ino == sm.st_ino)
            return moecal_error_set(MOECAL_ERR_USAGE, "command line: -o %s would write %s in "
                                    "the model's directory, where it would be read as the "
                                    "model's weights", out, st_side);
    }
    /* every file this run writes against every input file */
    for (int k = -2; k < N_SIDE; k++) {
        if (k == -2)
            snprintf(path, sizeof path, "%s", out);
        else if (k == -1)
            snprintf(path, sizeof path, "%s.lock", out);
        else
            side_path(out, side_suffix[k], path, sizeof path);
        if (stat(path, &so) != 0)
            continue;
        if (stat(act, &si) == 0 && si.st_dev == so.st_dev && si.st_ino == so.st_ino)
            return moecal_error_set(MOECAL_ERR_USAGE, "command line: -o %s would overwrite "
                                    "%s, the activation file", out, path);
        DIR *d = p->model_dir ? opendir(p->model_dir) : NULL;
        struct dirent *de;
        while (d && (de = readdir(d)) != NULL) {
            char in[4200];
            snprintf(in, sizeof in, "%s/%s", p->model_dir, de->d_name);
            if (stat(in, &si) == 0 && S_ISREG(si.st_mode) && si.st_dev == so.st_dev &&
                si.st_ino == so.st_ino) {
                closedir(d);
                return moecal_error_set(MOECAL_ERR_USAGE, "command line: -o %s would overwrite "
                                        "%s of the model", out, in);
            }
        }
        if (d)
            closedir(d);
    }
    return MOECAL_OK;
}

static moecal_status write_checkpoint(const job *j, moecal_amax_meta *m, int64_t next_step)
{
    moecal_amax_slab sl = {j->e0, j->e1, j->amax_cal, j->amax_cal, j->weight_amax, j->hist,
                           j->tok};
    char cur[4200], prev[4200], tmp[4300];
    moecal_status s;

    side_path(j->p->output, ".ckpt.h5", cur, sizeof cur);
    side_path(j->p->output, ".ckpt.prev.h5", prev, sizeof prev);
    snprintf(tmp, sizeof tmp, "%s.tmp", cur);
    m->checkpoint = 1;
    m->next_step = next_step;
    s = moecal_amax_write_h5(j->c->world, tmp, m, &sl);
    m->checkpoint = 0;
    /* Every rank must know whether all wrote their part before the rename. */
    {
        int ok = s == MOECAL_OK, all_ok = 0;
        MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, j->c->world);
        if (j->c->rank == 0) {
            if (!all_ok) {
                unlink(tmp);
            } else {
                int fd = open(tmp, O_RDONLY);
                if (fd >= 0) {
                    fsync(fd);
                    close(fd);
                }
                /* keep the previous checkpoint until the new one is in place */
                if (access(cur, F_OK) == 0 && rename(cur, prev) != 0)
                    s = moecal_error_errno(errno, "%s: cannot keep the previous checkpoint", cur);
                else if (rename(tmp, cur) != 0)
                    s = moecal_error_errno(errno, "%s: rename from %s failed", cur, tmp);
            }
        }
        if (s == MOECAL_OK && !all_ok)
            s = moecal_error_set(MOECAL_ERR_PEER, "checkpoint failed on another rank");
    }
    return s;
}

static void remove_checkpoints(const char *out)
{
    char path[4200];
    side_path(out, ".ckpt.h5", path, sizeof path);
    unlink(path);
    side_path(out, ".ckpt.prev.h5", path, sizeof path);
    unlink(path);
    /* left by a job killed while writing a checkpoint */
    side_path(out, ".ckpt.h5.tmp", path, sizeof path);
    unlink(path);
}

/* Threads reading the next layer: --threads, else the cores this rank is
 * bound to, at most 8 (reads from the page cache or a parallel file system
 * gain little beyond that). */
static int read_threads(const moecal_calib_params *p)
{
    cpu_set_t set;
    int n;

    if (p->threads > 0)
        return p->threads;
    CPU_ZERO(&set);
    n = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
    return n < 1 ? 1 : n > 8 ? 8 : n;
}

/* ---------------------------------------------------------------- chunks */

/* Chunks to the backend: submitted one ahead when it has submit_chunk and
 * finish_chunk, else computed at submission (run_chunk) and handed back in
 * order, so the driver has one code path.  Test hook: MOECAL_TEST_DEFER_CHUNKS=1
 * makes the synchronous form compute at finish instead, so that a backend
 * without the asynchronous calls exercises the asynchronous contract (a
 * chunk's rows stay valid until its finish). */
typedef struct chunk_pipe {
    const moecal_backend_ops *ops;
    moecal_backend *be;
    bool async, defer;
    moecal_chunk pending[2];      /* deferred chunks */
    moecal_chunk_stats done[2];   /* synchronous results not yet finished */
    int64_t nsub, nfin;
    int nloc;
    void *pinned[8];
    int npinned;
} chunk_pipe;

static void chunk_submit(chunk_pipe *pp, const moecal_chunk *ch, double *t)
{
    double t0 = moecal_now();
    const uint8_t *skip = ch->nskipped ? ch->skip : NULL;
    moecal_status s;

    if (pp->async) {
        s = pp->ops->submit_chunk(pp->be, ch->rows, ch->nrows, skip);
    } else if (pp->defer) {
        s = MOECAL_OK;
        pp->pending[pp->nsub % 2] = *ch;
    } else {
        s = pp->nsub - pp->nfin < 2 ? pp->ops->run_chunk(pp->be, ch->rows, ch->nrows, skip,
                                                         &pp->done[pp->nsub % 2])
                                    : moecal_error_set(MOECAL_ERR_INTERNAL, "three chunks "
                                                       "submitted");
    }
    /* a compute error is this rank's alone: the others may be in a
     * collective, so it ends the job */
    if (s != MOECAL_OK)
        moecal_fatal(s);
    pp->nsub++;
    *t += moecal_now() - t0;
}

static void chunk_finish(chunk_pipe *pp, moecal_chunk_stats *out, double *t)
{
    double t0 = moecal_now();
    moecal_status s = MOECAL_OK;

    if (pp->nfin >= pp->nsub) {
        s = moecal_error_set(MOECAL_ERR_INTERNAL, "no chunk submitted");
    } else if (pp->async) {
        s = pp->ops->finish_chunk(pp->be, out);
    } else if (pp->defer) {
        const moecal_chunk *ch = &pp->pending[pp->nfin % 2];
        s = pp->ops->run_chunk(pp->be, ch->rows, ch->nrows, ch->nskipped ? ch->skip : NULL,
                               out);
    } else {
        const moecal_chunk_stats *d = &pp->done[pp->nfin % 2];
        /* the driver's n is the backend's n_local */
        memcpy(out->tokens, d->tokens, (size_t)pp->nloc * sizeof *out->tokens);
        memcpy(out->amax_x, d->amax_x, (size_t)pp->nloc * sizeof *out->amax_x);
        memcpy(out->amax_h, d->amax_h, (size_t)pp->nloc * sizeof *out->amax_h);
    }
    if (s != MOECAL_OK)
        moecal_fatal(s);
    pp->nfin++;
    *t += moecal_now() - t0;
}

/* Page-lock a long-lived host buffer for the backend; a failure only costs
 * speed (the backend stages pageable memory). */
static void pin(chunk_pipe *pp, void *p, size_t bytes)
{
    moecal_status s;

    if (!pp->ops->pin_host || p == NULL || bytes == 0 || pp->npinned == 8)
        return;
    for (int i = 0; i < pp->npinned; i++)
        if (pp->pinned[i] == p)
            return;
    s = pp->ops->pin_host(pp->be, p, bytes);
    if (s == MOECAL_OK)
        pp->pinned[pp->npinned++] = p;
    else
        moecal_log(MOECAL_LOG_VERBOSE, "# could not page-lock %zu bytes of host memory (%s); "
                   "copies will be staged", bytes, moecal_error_message());
}

static void pin_prefetch(chunk_pipe *pp, const moecal_prefetch *pf)
{
    void *ptr[4];
    size_t bytes[4];
    int n = moecal_prefetch_buffers(pf, ptr, bytes);
    for (int i = 0; i < n; i++)
        pin(pp, ptr[i], bytes[i]);
}

static void pipe_free(chunk_pipe *pp)
{
    for (int q = 0; q < 2; q++) {
        free(pp->done[q].tokens);
        free(pp->done[q].amax_x);
        free(pp->done[q].amax_h);
    }
}

static void unpin_all(chunk_pipe *pp)
{
    for (int i = 0; i < pp->npinned; i++)
        pp->ops->unpin_host(pp->be, pp->pinned[i]);
    pp->npinned = 0;
}

moecal_status moecal_peer_max_fixup(MPI_Comm comm, const float *cal, int L, int n,
                                    bool all_experts, float *final, long long *raised)
{
    const size_t L3 = (size_t)L * 3;
    long long up = 0;

    if (all_experts) {
        /* every expert saw every token: its own amax stands */
        memcpy(final, cal, L3 * (size_t)n * sizeof *final);
    } else {
        /* the layer maximum per projection over this rank's experts, then
         * over every rank: one collective for the whole [L][3] table */
        float *peer = calloc(L3 ? L3 : 1, sizeof *peer);
        if (!peer)
            return moecal_error_set(MOECAL_ERR_NOMEM, "peer-max fixup: out of memory");
        for (int li = 0; li < L; li++)
            for (int k = 0; k < n; k++)
                for (int q = 0; q < 3; q++) {
                    float *m = &peer[(size_t)li * 3 + (size_t)q];
                    *m = fmaxf(*m, cal[((size_t)li * (size_t)n + (size_t)k) * 3 + (size_t)q]);
                }
        if (MPI_Allreduce(MPI_IN_PLACE, peer, (int)L3, MPI_FLOAT, MPI_MAX, comm) != MPI_SUCCESS) {
            free(peer);
            return moecal_error_set(MOECAL_ERR_MPI, "peer-max fixup: MPI_Allreduce failed");
        }
        for (int li = 0; li < L; li++)
            for (int k = 0; k < n; k++)
                for (int q = 0; q < 3; q++) {
                    size_t i = ((size_t)li * (size_t)n + (size_t)k) * 3 + (size_t)q;
                    final[i] = peer[(size_t)li * 3 + (size_t)q];
                    up += final[i] != cal[i];
                }
        free(peer);
    }
    if (raised)
        *raised = up;
    return MOECAL_OK;
}

/* Collective: say which layers end with experts whose input amax is 0 (no
 * token reached them: every row of the layer skipped as non-finite, or all
 * zero).  Their input scale is 0, which no engine can serve (export refuses
 * it), so it is never written silently. */
static void warn_zero_amax(const job *j, const int64_t *skipped)
{
    int64_t *zero = calloc((size_t)j->L, sizeof *zero), *tot = calloc((size_t)j->L, sizeof *tot);

    if (!zero || !tot) /* every rank must reach the reduction: none goes on */
        moecal_fatal(moecal_error_set(MOECAL_ERR_NOMEM, "out of memory"));
    {
        for (int li = 0; li < j->L; li++)
            for (int k = 0; k < j->n; k++) {
                const float *a = &j->amax_final[((size_t)li * (size_t)j->n + (size_t)k) * 3];
                zero[li] += a[0] == 0.0f || a[1] == 0.0f || a[2] == 0.0f;
            }
        if (MPI_Reduce(zero, tot, j->L, MPI_INT64_T, MPI_SUM, 0, j->c->world) == MPI_SUCCESS &&
            j->c->rank == 0)
            for (int li = 0; li < j->L; li++)
                if (tot[li] > 0)
                    moecal_warn("layer %d: %lld of %d experts have input amax 0 (no token reached "
                                "them; %lld of %lld rows were skipped as non-finite): their "
                                "input scale is 0, which no engine can serve, and `moecal "
                                "export` refuses it", j->layers[li], (long long)tot[li], j->E,
                                skipped ? (long long)skipped[li] : 0LL, (long long)j->T);
    }
    free(zero);
    free(tot);
}

/* ---------------------------------------------------------------- the phases */

/* Index helpers over the rank's slabs (experts k of [0, n)) and the whole
 * tables (experts e of [0, E)). */
static size_t ix_amax(const job *j, int li, int k)        /* [L][n][3] */
{
    MOECAL_ASSERT(li >= 0 && li < j->L && k >= 0 && k <= j->n);
    return ((size_t)li * (size_t)j->n + (size_t)k) * 3;
}

static size_t ix_tok(const job *j, int li, int ci, int k) /* [L][C][n] */
{
    MOECAL_ASSERT(li >= 0 && li < j->L && ci >= 0 && ci < j->C && k >= 0 && k < j->n);
    return ((size_t)li * (size_t)j->C + (size_t)ci) * (size_t)j->n + (size_t)k;
}

static size_t ix_hist(const job *j, int li, int ci, int k) /* [L][C][n][3] */
{
    return ix_tok(j, li, ci, k) * 3;
}

static size_t ix_full(const job *j, int li, int e)        /* [L][E] */
{
    MOECAL_ASSERT(li >= 0 && li < j->L && e >= 0 && e < j->E);
    return (size_t)li * (size_t)j->E + (size_t)e;
}

/* What one run holds besides the job's tables. */
typedef struct calib {
    job j;
    const moecal_backend_ops *ops;
    moecal_backend *be;
    moecal_tokens *tk;
    moecal_prefetch *pf;
    chunk_pipe pp;
    moecal_chunk_stats cs;
    moecal_amax_meta m;
    char act_path[4096], created[64], fingerprint[17];
    int64_t *cstart, *ccount;    /* chunk rows */
    int64_t *layer_skipped;      /* non-finite rows skipped per layer */
    char *backend_settings;      /* the backend's own options, for the amax file */
    int64_t first_step, nsteps, nskipped;
    uint64_t hash;
    int lock_fd;
    double t_start, t_compute, t_load;
    progress pg;
    long test_stop_at, test_delay_ms;
} calib;

/* Stop the compute: the weight reader, pinned memory, token reader and
 * backend, on the normal end and after a signal alike. */
static void close_compute(calib *r)
{
    moecal_prefetch_destroy(r->pf);
    r->pf = NULL;
    unpin_all(&r->pp);
    moecal_tokens_destroy(r->tk);
    r->tk = NULL;
    if (r->be)
        r->ops->destroy(r->be);
    r->be = NULL;
}

static void calib_free(calib *r)
{
    close_compute(r);
    free(r->cs.tokens);
    free(r->cs.amax_x);
    free(r->cs.amax_h);
    pipe_free(&r->pp);
    free(r->cstart);
    free(r->ccount);
    free(r->layer_skipped);
    free(r->backend_settings);
    job_free(&r->j);
    unlock_output(r->j.p->output, r->lock_fd);
}

/* Claim the output: checked, locked, and either free, replaced with --force,
 * or complete with --resume (*done: nothing to do). */
static moecal_status claim_output(calib *r, bool *done)
{
    const moecal_comm *c = r->j.c;
    const moecal_calib_params *p = r->j.p;
    moecal_status s = MOECAL_OK;
    int state = 0; /* 1 exists, 2 complete-and-resume */

    *done = false;
    if (c->rank == 0)
        s = check_output(p, r->act_path);
    moecal_check_all(s);
    if (c->rank == 0) {
        s = lock_output(p->output, &r->lock_fd);
        if (s == MOECAL_OK && file_exists(p->output) != MOECAL_OK && !p->force) {
            char ck[4200];
            side_path(p->output, ".ckpt.h5", ck, sizeof ck);
            state = p->resume && access(ck, F_OK) != 0 ? 2 : 1;
        }
    }
    moecal_check_all(s);
    MOECAL_MPI_CHECK(MPI_Bcast(&state, 1, MPI_INT, 0, c->world));
    if (state == 2) {
        moecal_log(MOECAL_LOG_INFO, "# %s is complete: nothing to resume", p->output);
        *done = true;
    } else if (state == 1) {
        moecal_error_set(MOECAL_ERR_EXISTS, "%s exists; use --force to overwrite it", p->output);
        moecal_fatal_all(MOECAL_ERR_EXISTS);
    }
    return MOECAL_OK;
}

/* Inputs: every rank reads the config and index; rank 0 checks the
 * activation file against them before any compute.  Then the rank's experts
 * (contiguous balanced blocks; none when ranks > experts) and the chunks. */
static moecal_status open_inputs(calib *r)
{
    job *j = &r->j;
    const moecal_comm *c = j->c;
    const moecal_calib_params *p = j->p;
    moecal_status s = moecal_model_open(p->model_dir, &j->model);

    moecal_check_all(s);
    j->cfg = moecal_model_cfg(j->model);
    j->prec = p->router_logits >= 0 ? p->router_logits : moecal_router_logits_default(j->cfg);
    s = moecal_calib_parse_layers(p->layers, j->cfg->moe_layers, j->cfg->n_moe_layers,
                                  &j->layers, &j->L);
    if (s != MOECAL_OK)
        moecal_fatal_all(s);
    r->layer_skipped = calloc((size_t)j->L, sizeof *r->layer_skipped);
    if (c->rank == 0)
        s = check_inputs(j, r->act_path);
    moecal_check_all(s);
    MOECAL_MPI_CHECK(MPI_Bcast(&j->T, 1, MPI_INT64_T, 0, c->world));
    j->E = j->cfg->n_routed_experts;
    j->H = j->cfg->hidden_size;
    j->I = j->cfg->moe_intermediate_size;
    j->e0 = (int)((int64_t)j->E * c->rank / c->size);
    j->e1 = (int)((int64_t)j->E * (c->rank + 1) / c->size);
    j->n = j->e1 - j->e0;
    j->chunk = p->chunk_tokens < j->T ? p->chunk_tokens : j->T;
    j->C = (j->T + j->chunk - 1) / j->chunk;
    return MOECAL_OK;
}

/* The rank's slabs, the per-chunk statistics and the chunk table. */
static void alloc_tables(calib *r)
{
    job *j = &r->j;
    moecal_status s = MOECAL_OK;
    size_t L = (size_t)j->L, n = (size_t)j->n, C = (size_t)j->C;

    j->amax_cal = xcalloc(L * n * 3, sizeof(float), &s);
    j->weight_amax = xcalloc(L * n * 3, sizeof(float), &s);
    j->amax_final = xcalloc(L * n * 3, sizeof(float), &s);
    j->hist = xcalloc(L * C * n * 3, sizeof(float), &s);
    j->tok = xcalloc(L * C * n, sizeof(int64_t), &s);
    r->cs.tokens = xcalloc(n, sizeof(int64_t), &s);
    r->cs.amax_x = xcalloc(n, sizeof(float), &s);
    r->cs.amax_h = xcalloc(n, sizeof(float), &s);
    for (int q = 0; q < 2; q++) {
        r->pp.done[q].tokens = xcalloc(n, sizeof(int64_t), &s);
        r->pp.done[q].amax_x = xcalloc(n, sizeof(float), &s);
        r->pp.done[q].amax_h = xcalloc(n, sizeof(float), &s);
    }
    r->pp.nloc = j->n;
    r->cstart = xcalloc(C, sizeof *r->cstart, &s);
    r->ccount = xcalloc(C, sizeof *r->ccount, &s);
    moecal_check_all(s);
    for (int ci = 0; ci < j->C; ci++) {
        r->cstart[ci] = (int64_t)ci * j->chunk;
        r->ccount[ci] = (ci + 1) * j->chunk > j->T ? j->T - r->cstart[ci] : j->chunk;
    }
}

/* The provenance every rank writes: rank 0's hash of the inputs, time and
 * checkpoint fingerprint, and the run's settings. */
static moecal_status describe(calib *r)
{
    job *j = &r->j;
    const moecal_comm *c = j->c;
    const moecal_calib_params *p = j->p;
    moecal_amax_meta *m = &r->m;
    moecal_status s = MOECAL_OK;

    if (c->rank == 0)
        r->hash = input_hash(j, r->act_path);
    MOECAL_MPI_CHECK(MPI_Bcast(&r->hash, 1, MPI_UINT64_T, 0, c->world));
    {
        time_t now = time(NULL);
        struct tm tmv;
        gmtime_r(&now, &tmv);
        strftime(r->created, sizeof r->created, "%Y-%m-%dT%H:%M:%SZ", &tmv);
        MOECAL_MPI_CHECK(MPI_Bcast(r->created, sizeof r->created, MPI_CHAR, 0, c->world));
    }
    if (c->rank == 0)
        s = moecal_checkpoint_fingerprint(j->model, r->fingerprint);
    moecal_check_all(s);
    MOECAL_MPI_CHECK(MPI_Bcast(r->fingerprint, sizeof r->fingerprint, MPI_CHAR, 0, c->world));
    *m = (moecal_amax_meta){
        /* what was run, by whom, where */
        .created = r->created, .command_line = p->command_line,
        .placement_json = p->placement_json ? p->placement_json : "[]",
        .n_ranks = c->size, .n_nodes = c->n_nodes,
        /* on what */
        .model_path = p->model_dir, .checkpoint_fingerprint = r->fingerprint,
        .activations_path = r->act_path, .input_hash = r->hash, .cfg = j->cfg,
        /* how */
        .all_experts = p->all_experts, .router_logits = j->prec, .qfmt = p->qfmt,
        /* the shape of the results */
        .tokens = j->T, .chunk_tokens = j->chunk, .L = j->L, .E = j->E, .C = (int)j->C,
        .layers = j->layers, .chunk_start = r->cstart, .chunk_count = r->ccount,
    };
    r->nsteps = (int64_t)j->L * j->C;
    return MOECAL_OK;
}

/* Resume: the newest checkpoint that validates; one from other inputs or
 * options is refused. */
static moecal_status resume(calib *r)
{
    job *j = &r->j;
    const moecal_comm *c = j->c;
    moecal_status s = MOECAL_OK;
    char paths[2][4200];
    int found = 0;

    side_path(j->p->output, ".ckpt.h5", paths[0], sizeof paths[0]);
    side_path(j->p->output, ".ckpt.prev.h5", paths[1], sizeof paths[1]);
    for (int k = 0; k < 2 && !found; k++) {
        int ok;
        if (access(paths[k], F_OK) != 0)
            continue;
        s = moecal_amax_read_checkpoint(paths[k], r->hash, &r->m, j->e0, j->e1, j->amax_cal,
                                        j->weight_amax, j->hist, j->tok, &r->first_step);
        if (s == MOECAL_ERR_MISMATCH) {
            if (c->rank != 0) /* rank 0 reports it */
                s = moecal_error_peer(0, moecal_status_exit_code(s));
            break;
        }
        ok = s == MOECAL_OK;
        MOECAL_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, c->world));
        if (ok) {
            found = 1;
            moecal_log(MOECAL_LOG_INFO, "# resuming from %s at layer %lld/%d chunk %lld/%lld",
                       paths[k], (long long)(r->first_step / j->C) + 1, j->L,
                       (long long)(r->first_step % j->C) + 1, (long long)j->C);
        } else {
            moecal_warn("%s", moecal_error_message());
            s = MOECAL_OK;
            r->first_step = 0;
        }
    }
    moecal_check_all(s);
    if (!found) {
        memset(j->amax_cal, 0, (size_t)j->L * (size_t)j->n * 3 * sizeof(float));
        memset(j->hist, 0, (size_t)j->L * (size_t)j->C * (size_t)j->n * 3 * sizeof(float));
        memset(j->tok, 0, (size_t)j->L * (size_t)j->C * (size_t)j->n * sizeof(int64_t));
        r->first_step = 0;
        moecal_log(MOECAL_LOG_INFO, "# no checkpoint to resume from: starting at the beginning");
    }
    return MOECAL_OK;
}

/* The backend, the token reader and the weight reader (the first layer's
 * read started). */
static void open_compute(calib *r)
{
    job *j = &r->j;
    const moecal_comm *c = j->c;
    const moecal_calib_params *p = j->p;
    moecal_backend_config bc = {0};
    moecal_status s;

    r->ops = strcmp(p->backend, "auto") == 0 ? moecal_backend_auto()
                                             : moecal_backend_find(p->backend);
    if (!r->ops || (r->ops->available && !r->ops->available())) {
        moecal_error_set(MOECAL_ERR_UNSUPPORTED, "backend '%s' is not available in this build or "
                         "on this machine (%s)", p->backend, MOECAL_BUILD_OPTIONS);
        moecal_fatal_all(MOECAL_ERR_UNSUPPORTED);
    }
    bc = (moecal_backend_config){
        .model = j->cfg, .e0 = j->e0, .e1 = j->e1, .max_chunk_tokens = j->chunk,
        .all_experts = p->all_experts, .router_logits = j->prec, .device = p->gpu,
        .gpu_mem_limit = p->gpu_mem_limit, .threads = p->threads, .rank = c->rank,
        .opts = p->opts,
    };
    if (!(r->backend_settings = moecal_backend_settings(r->ops, p->opts)))
        moecal_fatal(moecal_error_set(MOECAL_ERR_NOMEM, "out of memory"));
    r->m.backend = r->ops->name;
    r->m.backend_settings = r->backend_settings;
    s = r->ops->create(&bc, &r->be);
    moecal_check_all(s);
    moecal_log(MOECAL_LOG_INFO, "# backend %s, %d MoE layers x %d experts (%d-%d per rank), "
               "%lld tokens in %lld chunks of %lld, mode %s%s%s", r->ops->name, j->L, j->E,
               j->E / c->size, (j->E + c->size - 1) / c->size, (long long)j->T,
               (long long)j->C, (long long)j->chunk,
               p->all_experts ? "all-experts" : "top-k + peer-max sync",
               p->all_experts ? "" : ", router logits ",
               p->all_experts ? "" : moecal_router_logits_name(j->prec));

    /* Chunks overlap when the backend can take one ahead: then the token
     * window holds three chunks (the one computing, the next, the one read). */
    r->pp.ops = r->ops;
    r->pp.be = r->be;
    r->pp.async = r->ops->submit_chunk != NULL && r->ops->finish_chunk != NULL;
    {
        const char *ev = getenv("MOECAL_TEST_DEFER_CHUNKS");
        r->pp.defer = !r->pp.async && ev && strcmp(ev, "1") == 0;
    }
    s = moecal_tokens_create(c, r->act_path, j->H, j->layers, j->L, j->T, j->chunk,
                             p->nonfinite, r->first_step, r->pp.async || r->pp.defer ? 3 : 2,
                             p->readers > 0 ? p->readers : 1, &r->tk);
    moecal_check_all(s);
    if (r->ops->pin_host) {
        void *base;
        size_t bytes;
        moecal_tokens_window(r->tk, &base, &bytes);
        pin(&r->pp, base, bytes);
    }
    s = moecal_prefetch_create(j->model, j->e0, j->n, r->ops->fp8_weights, read_threads(p),
                               &r->pf);
    if (s == MOECAL_OK)
        s = moecal_prefetch_start(r->pf, j->layers[r->first_step / j->C]);
    moecal_check_all(s);
}

/* A finished chunk's statistics into the history, counts and running amax. */
static void record_chunk(calib *r, int li, int ci)
{
    job *j = &r->j;
    const moecal_chunk_stats *cs = &r->cs;

    for (int k = 0; k < j->n; k++)
        if (isnan(cs->amax_h[k]) || isinf(cs->amax_h[k]))
            moecal_fatal(moecal_error_set(MOECAL_ERR_NONFINITE,
                "layer %d expert %d: the w2 input (silu(x W1^T) * x W3^T) overflowed to "
                "%g in chunk %d; the expert's weights are too large for bf16",
                j->layers[li], j->e0 + k, (double)cs->amax_h[k], ci));
    for (int k = 0; k < j->n; k++) {
        float *h = &j->hist[ix_hist(j, li, ci, k)], *a = &j->amax_cal[ix_amax(j, li, k)];
        h[0] = cs->amax_x[k];
        h[1] = cs->amax_h[k];
        h[2] = cs->amax_x[k];
        j->tok[ix_tok(j, li, ci, k)] = cs->tokens[k];
        for (int q = 0; q < 3; q++)
            a[q] = fmaxf(a[q], h[q]);
    }
}

/* Every rank agrees on a pending SIGTERM/SIGUSR1 at this chunk boundary and
 * on a checkpoint; returns the signal (0: go on).  Test hooks:
 * MOECAL_TEST_STOP_AT_STEP=N acts as a signal after step N;
 * MOECAL_TEST_CHUNK_DELAY_MS slows each chunk down. */
static int chunk_boundary(calib *r, int li, int ci)
{
    job *j = &r->j;
    const int64_t step = (int64_t)li * j->C + ci;
    int stop = moecal_signal_pending();

    if (r->test_stop_at >= 0 && step + 1 == r->test_stop_at)
        stop = 10;
    if (r->test_delay_ms > 0)
        usleep((useconds_t)r->test_delay_ms * 1000);
    if (MPI_Allreduce(MPI_IN_PLACE, &stop, 1, MPI_INT, MPI_MAX, j->c->world) != MPI_SUCCESS)
        moecal_fatal(moecal_error_set(MOECAL_ERR_MPI, "agreeing on a stop after layer %d "
                                      "chunk %d failed", li + 1, ci + 1));
    if (step + 1 >= r->nsteps)
        return 0; /* the last step: the output follows */
    if (stop || (j->p->checkpoint_every > 0 && (step + 1) % j->p->checkpoint_every == 0)) {
        moecal_tokens_quiesce(r->tk);
        moecal_check_all(write_checkpoint(j, &r->m, step + 1));
        moecal_log(MOECAL_LOG_VERBOSE, "# checkpoint after layer %d chunk %d", li + 1, ci + 1);
    }
    if (stop) {
        char ck[4200];
        side_path(j->p->output, ".ckpt.h5", ck, sizeof ck);
        moecal_log(MOECAL_LOG_QUIET, "moecal: signal %d: stopped after layer %d/%d chunk "
                   "%d/%lld; checkpoint %s written; rerun with --resume to continue",
                   stop, li + 1, j->L, ci + 1, (long long)j->C, ck);
    }
    return stop;
}

/* The layer x chunk loop.  Returns MOECAL_ERR_INTERRUPTED after a signal
 * (the checkpoint written), MOECAL_OK at the end. */
static moecal_status run_layers(calib *r)
{
    job *j = &r->j;
    moecal_status s;
    moecal_chunk ch, next;

    r->pg.tty = isatty(STDERR_FILENO);
    r->pg.t0 = r->pg.tlayer = moecal_now();
    r->pg.tokens_total = j->T * j->L - (r->first_step / j->C) * j->T -
                         (r->first_step % j->C) * j->chunk;
    for (int li = (int)(r->first_step / j->C); li < j->L; li++) {
        moecal_layer_weights lw;
        int ci0 = li == r->first_step / j->C ? (int)(r->first_step % j->C) : 0;
        double t0 = moecal_now();

        /* This layer's weights (read during the previous layer), then the
         * next layer's read in the background.  A missing tensor on one rank
         * stops every rank with its message. */
        s = moecal_prefetch_wait(r->pf, &lw, &j->weight_amax[ix_amax(j, li, 0)]);
        if (s == MOECAL_OK)
            pin_prefetch(&r->pp, r->pf);
        if (s == MOECAL_OK)
            s = r->ops->load_layer(r->be, &lw);
        if (s == MOECAL_OK && li + 1 < j->L)
            s = moecal_prefetch_start(r->pf, j->layers[li + 1]);
        moecal_check_all(s);
        r->t_load += moecal_now() - t0;

        moecal_check_all(moecal_tokens_next(r->tk, &ch));
        chunk_submit(&r->pp, &ch, &r->t_compute);
        for (int ci = ci0; ci < j->C; ci++) {
            const int ahead = ci + 1 < j->C;
            /* the next chunk of this layer goes in before this one's results
             * are asked for */
            if (ahead) {
                moecal_check_all(moecal_tokens_next(r->tk, &next));
                chunk_submit(&r->pp, &next, &r->t_compute);
            }
            chunk_finish(&r->pp, &r->cs, &r->t_compute);
            r->nskipped += ch.nskipped;
            if (r->layer_skipped)
                r->layer_skipped[li] += ch.nskipped;
            record_chunk(r, li, ci);
            progress_chunk(&r->pg, li, j->L, ci, (int)j->C, ch.nrows);
            /* the chunk in flight, if any, does not enter the checkpoint */
            int stop = chunk_boundary(r, li, ci);
            if (stop) {
                if (ahead)
                    chunk_finish(&r->pp, &r->cs, &r->t_compute); /* drained, not recorded */
                return moecal_error_set(MOECAL_ERR_INTERRUPTED, "interrupted by signal %d",
                                        stop);
            }
            if (ahead)
                ch = next;
        }
    }
    return MOECAL_OK;
}

static void log_times(calib *r)
{
    double wait_s = 0, exch_s = 0, tb[MOECAL_NPHASE] = {0}, rd_s = 0, rdw_s = 0, tr_s = 0;
    uint64_t tr_bytes = 0, wb;
    struct rusage ru;
    int readers = 0;

    moecal_tokens_times(r->tk, &wait_s, &exch_s);
    moecal_tokens_reads(r->tk, &tr_bytes, &tr_s, &readers);
    moecal_prefetch_times(r->pf, &rd_s, &rdw_s);
    wb = moecal_prefetch_bytes(r->pf);
    getrusage(RUSAGE_SELF, &ru);
    /* the figures --plan predicts (plan.h) */
    moecal_log(MOECAL_LOG_VERBOSE, "# rank 0 reads: tokens %llu bytes in %.3fs (%.2f GB/s, %d "
               "reader%s; compute waited %.3fs), weights %llu bytes in %.3fs (%.2f GB/s); peak "
               "host memory %llu bytes", (unsigned long long)tr_bytes, tr_s,
               tr_s > 0 ? (double)tr_bytes / 1e9 / tr_s : 0.0, readers, readers == 1 ? "" : "s",
               wait_s, (unsigned long long)wb, rd_s, rd_s > 0 ? (double)wb / 1e9 / rd_s : 0.0,
               (unsigned long long)ru.ru_maxrss * 1024);
    if (r->ops->timings)
        r->ops->timings(r->be, tb);
    moecal_log(MOECAL_LOG_VERBOSE, "# rank 0 time: load %.3fs (weights read %.3fs in the "
               "background, waited for %.3fs), compute %.3fs (route %.3f, gather %.3f, gemm "
               "%.3f, act %.3f, copy %.3f), read wait %.3fs, exchange %.3fs",
               r->t_load, rd_s, rdw_s, r->t_compute, tb[MOECAL_PHASE_ROUTE],
               tb[MOECAL_PHASE_GATHER], tb[MOECAL_PHASE_GEMM], tb[MOECAL_PHASE_ACT],
               tb[MOECAL_PHASE_COPY], wait_s, exch_s);
}

/* The peer-max fixup (one MPI_Allreduce(MPI_MAX)) and what it did. */
static moecal_status fixup(calib *r)
{
    job *j = &r->j;
    const moecal_comm *c = j->c;
    long long counts[2] = {0, 0}, total[2];
    moecal_status s = moecal_peer_max_fixup(c->world, j->amax_cal, j->L, j->n,
                                            j->p->all_experts, j->amax_final, &counts[0]);

    if (s != MOECAL_OK)
        moecal_fatal(s);
    for (int li = 0; li < j->L; li++)
        for (int k = 0; k < j->n; k++) {
            int64_t t = 0;
            for (int ci = 0; ci < j->C; ci++)
                t += j->tok[ix_tok(j, li, ci, k)];
            counts[1] += t == 0;
        }
    MOECAL_MPI_CHECK(MPI_Reduce(counts, total, 2, MPI_LONG_LONG, MPI_SUM, 0, c->world));
    warn_zero_amax(j, r->layer_skipped);
    if (j->p->all_experts)
        moecal_log(MOECAL_LOG_INFO, "# all-experts mode: no peer-max sync; %lld experts "
                   "never saw a token", total[1]);
    else
        moecal_log(MOECAL_LOG_INFO, "# peer-max sync: %lld of %lld input quantizers raised to "
                   "their layer's maximum; %lld experts never routed (uncalibrated, their "
                   "input amax comes from the sync)", total[0], (long long)j->L * j->E * 3,
                   total[1]);
    return MOECAL_OK;
}

/* Rank 0: the side files under staging names, renamed, then the amax file
 * from tmp_path, last: a failure anywhere leaves nothing that looks
 * complete. */
static moecal_status write_side_files(calib *r, const moecal_amax_tables *t,
                                      const char *tmp_path)
{
    const char *out = r->j.p->output;
    char fin[N_SIDE][4200], stage[N_SIDE][4300];
    int renamed = 0;
    moecal_status s;

    for (int k = 0; k < N_SIDE; k++) {
        side_path(out, side_suffix[k], fin[k], sizeof fin[k]);
        side_path(out, side_suffix[k], stage[k], sizeof stage[k] - 4);
        strcat(stage[k], ".tmp"); /* lengths checked by check_output */
    }
    s = moecal_amax_write_summary(stage[0], &r->m, r->j.model, t);
    if (s == MOECAL_OK)
        s = moecal_amax_write_table(stage[1], &r->m, r->j.model, t);
    if (s == MOECAL_OK)
        s = moecal_amax_write_hf_config(stage[2], &r->m, t);
    if (s == MOECAL_OK)
        s = moecal_amax_write_safetensors(stage[3], &r->m, r->j.model, t);
    for (int k = 0; s == MOECAL_OK && k < N_SIDE; k++) {
        if (rename(stage[k], fin[k]) != 0)
            s = moecal_error_errno(errno, "%s: rename from %s failed", fin[k], stage[k]);
        else
            renamed++;
    }
    if (s == MOECAL_OK && rename(tmp_path, out) != 0)
        s = moecal_error_errno(errno, "%s: rename from %s failed", out, tmp_path);
    if (s != MOECAL_OK) {
        unlink(tmp_path);
        for (int k = 0; k < N_SIDE; k++) {
            unlink(stage[k]);
            if (k < renamed)
                unlink(fin[k]);
        }
    }
    return s;
}

/* Output: HDF5 under a temporary name (every rank its slab), the whole
 * tables on rank 0 for the side files (slabs are disjoint and amax >= 0, so
 * MAX, and SUM for counts, assembles them), then the renames. */
static moecal_status write_outputs(calib *r)
{
    job *j = &r->j;
    const moecal_comm *c = j->c;
    moecal_amax_slab sl = {0};
    char tmp_path[4200];
    moecal_status s;
    const size_t LE = (size_t)j->L * (size_t)j->E, L3 = LE * 3;

    sl = (moecal_amax_slab){.e0 = j->e0, .e1 = j->e1, .input_amax = j->amax_final,
                            .input_amax_calibrated = j->amax_cal,
                            .weight_amax = j->weight_amax, .history = j->hist,
                            .tokens = j->tok};
    snprintf(tmp_path, sizeof tmp_path, "%s.tmp", j->p->output);
    s = moecal_amax_write_h5(c->world, tmp_path, &r->m, &sl);
    moecal_check_all(s);

    float *full = calloc(3 * L3, sizeof *full), *res = NULL;
    int64_t *tk_full = calloc(LE, sizeof *tk_full), *tk_res = NULL;
    if (c->rank == 0) {
        res = calloc(3 * L3, sizeof *res);
        tk_res = calloc(LE, sizeof *tk_res);
    }
    if (!full || !tk_full || (c->rank == 0 && (!res || !tk_res)))
        moecal_fatal(moecal_error_set(MOECAL_ERR_NOMEM, "out of memory"));
    for (int li = 0; li < j->L; li++)
        for (int k = 0; k < j->n; k++) {
            size_t src = ix_amax(j, li, k), e = ix_full(j, li, j->e0 + k);
            memcpy(&full[e * 3], &j->amax_final[src], 3 * sizeof(float));
            memcpy(&full[L3 + e * 3], &j->amax_cal[src], 3 * sizeof(float));
            memcpy(&full[2 * L3 + e * 3], &j->weight_amax[src], 3 * sizeof(float));
            for (int ci = 0; ci < j->C; ci++)
                tk_full[e] += j->tok[ix_tok(j, li, ci, k)];
        }
    s = MOECAL_OK;
    if (MPI_Reduce(full, res, (int)(3 * L3), MPI_FLOAT, MPI_MAX, 0, c->world) != MPI_SUCCESS ||
        MPI_Reduce(tk_full, tk_res, (int)LE, MPI_INT64_T, MPI_SUM, 0, c->world) != MPI_SUCCESS)
        s = moecal_error_set(MOECAL_ERR_MPI, "gathering the amax tables on rank 0 failed");
    if (s == MOECAL_OK && c->rank == 0) {
        moecal_amax_tables t = {res, res + L3, res + 2 * L3, tk_res};
        s = write_side_files(r, &t, tmp_path);
    }
    free(full);
    free(res);
    free(tk_full);
    free(tk_res);
    return s;
}

moecal_status moecal_calibrate_run(const moecal_comm *c, const moecal_calib_params *p)
{
    calib r;
    moecal_status s;
    bool done;
    const char *ev_stop = getenv("MOECAL_TEST_STOP_AT_STEP");
    const char *ev_delay = getenv("MOECAL_TEST_CHUNK_DELAY_MS");

    memset(&r, 0, sizeof r);
    r.j.c = c;
    r.j.p = p;
    r.lock_fd = -1;
    r.t_start = moecal_now();
    r.test_stop_at = ev_stop && *ev_stop ? strtol(ev_stop, NULL, 10) : -1;
    r.test_delay_ms = ev_delay && *ev_delay ? strtol(ev_delay, NULL, 10) : 0;
    if (p->activations)
        snprintf(r.act_path, sizeof r.act_path, "%s", p->activations);
    else
        snprintf(r.act_path, sizeof r.act_path, "%s/activations.h5", p->model_dir);

    /* One job per output; an existing output is kept unless --force (a
     * requeued --resume run whose output is complete has nothing to do). */
    MOECAL_TRY(claim_output(&r, &done));
    if (done) {
        unlock_output(p->output, r.lock_fd);
        return MOECAL_OK;
    }
    MOECAL_TRY(open_inputs(&r));
    alloc_tables(&r);
    MOECAL_TRY(describe(&r));
    if (p->resume)
        MOECAL_TRY(resume(&r));
    open_compute(&r);
    s = run_layers(&r);
    if (s == MOECAL_OK)
        log_times(&r);
    close_compute(&r);
    if (s == MOECAL_OK)
        s = fixup(&r);
    if (s == MOECAL_OK) {
        s = write_outputs(&r);
        moecal_check_all(s);
        if (c->rank == 0)
            remove_checkpoints(p->output);
        double el = moecal_now() - r.t_start;
        moecal_log(MOECAL_LOG_INFO, "# wrote %s in %.1fs: %lld tokens x %d layers, compute "
                   "%.0f tokens/s per rank%s", p->output, el, (long long)r.j.T, r.j.L,
                   r.t_compute > 0 ? (double)r.j.T * r.j.L / r.t_compute : 0.0,
                   r.nskipped ? " (non-finite rows skipped)" : "");
    }
    calib_free(&r);
    return s;
}
