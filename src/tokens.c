/* tokens.c - node-shared, multi-buffered token chunks; see tokens.h.
 *
 * A leader's part of a chunk is read by `readers` threads, each a disjoint
 * row range straight into the window with pread (moecal_act_map), and
 * scanned for non-finite rows by the same thread; a file whose layout needs
 * HDF5 to read it (compressed, ...) is read by the I/O thread alone.
 *
 * Window layout (allocated by node rank 0, nslots slots, 2 or 3):
 *   slot = [slot_header][rows: chunk_tokens x H bf16][skip: chunk_tokens bytes]
 * Step s uses slot s % nslots.  A step on the leader: wait for the I/O
 * thread's read of its part of step s, exchange parts with the other
 * leaders, publish the slot header, node barrier (after which every node
 * rank is done with step s + 1 - nslots, whose slot is free), then start
 * reading step s + 1 into it.
 */
#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime.h"
#include "tokens.h"

typedef struct slot_header {
    int32_t status;       /* moecal_status of the step (first failing leader's) */
    int32_t exit_code;
    int32_t failed_rank;  /* world rank that reported the failure, -1 if none */
    int32_t pad;
    int64_t nskipped;
} slot_header;

#define HEADER_BYTES 64

typedef struct step {
    int layer, chunk;
    int64_t row0, nrows;
} step;

/* What the I/O thread is asked to do and what it reports. */
typedef struct io_job {
    int pending;          /* a job is queued or running */
    int done;
    int quit;
    int64_t step;
    moecal_status status;
    char msg[1024];
    int64_t nbad;
} io_job;

struct moecal_tokens {
    const moecal_comm *c;
    int hidden;
    int64_t chunk_tokens;
    moecal_nonfinite policy;
    step *steps;
    int64_t nsteps, next;
    MPI_Win win;
    char *base;            /* slot 0 */
    size_t slot_bytes;
    int nslots;
    MPI_Datatype row_type; /* one row of H bf16 */
    int *counts, *displs;  /* per leader, in rows */
    moecal_act *act;       /* leaders only */
    moecal_act_map *map;   /* leaders, when the file can be read directly */
    int readers;           /* threads reading a leader's part (map) */
    void **scratch;        /* [readers] f16/f32 conversion buffers */
    double read_s;         /* seconds the I/O thread spent reading and scanning */
    uint64_t read_bytes;   /* bytes of the file this leader read */
    pthread_t thread;
    int thread_started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    io_job job;
    double wait_s, exch_s;
};

static slot_header *slot_hdr(moecal_tokens *t, int64_t s)
{
    return (slot_header *)(t->base + (size_t)(s % t->nslots) * t->slot_bytes);
}

static uint16_t *slot_rows(moecal_tokens *t, int64_t s)
{
    return (uint16_t *)(t->base + (size_t)(s % t->nslots) * t->slot_bytes + HEADER_BYTES);
}

static uint8_t *slot_skip(moecal_tokens *t, int64_t s)
{
    return (uint8_t *)(slot_rows(t, s) + (size_t)t->chunk_tokens * (size_t)t->hidden);
}

/* This leader's part of a step: rows [lo, lo + n) of the chunk. */
static void leader_part(const moecal_tokens *t, int64_t nrows, int leader, int64_t *lo,
                        int64_t *n)
{
    int64_t L = t->c->n_nodes;
    *lo = nrows * leader / L;
    *n = nrows * (leader + 1) / L - *lo;
}

#define SCRATCH_BYTES ((size_t)4 << 20)

/* One reader's rows of a step: read, then scan. */
typedef struct piece {
    moecal_tokens *t;
    int64_t s, lo, n;     /* rows [lo, lo + n) of the chunk */
    void *scratch;
    moecal_status status;
    char msg[1024];
    int64_t nbad;
    pthread_t thread;
} piece;

static void *read_piece(void *arg)
{
    piece *p = arg;
    moecal_tokens *t = p->t;
    const step *st = &t->steps[p->s];
    uint16_t *rows = slot_rows(t, p->s) + (size_t)p->lo * (size_t)t->hidden;

    p->nbad = 0;
    p->status = moecal_act_map_read_bf16(t->map, st->layer, st->row0 + p->lo, p->n, rows,
                                         p->scratch, p->scratch ? SCRATCH_BYTES : 0);
    if (p->status == MOECAL_OK)
        p->status = moecal_act_scan_nonfinite(t->act, rows, p->n, t->hidden, st->layer,
                                              st->row0 + p->lo, t->policy,
                                              slot_skip(t, p->s) + p->lo, &p->nbad);
    if (p->status != MOECAL_OK)
        snprintf(p->msg, sizeof p->msg, "%s", moecal_error_message());
    return NULL;
}

/* Rows [lo, lo + n) of step s by the readers; the first failing piece (in
 * row order) gives the status, so the message is the serial read's. */
static void read_direct(moecal_tokens *t, int64_t s, int64_t lo, int64_t n, io_job *j)
{
    piece ps[MOECAL_MAX_READERS];
    int R = t->readers < n ? t->readers : (int)n, started = 0;

    for (int r = 0; r < R; r++)
        ps[r] = (piece){.t = t, .s = s, .lo = lo + n * r / R, .n = n * (r + 1) / R - n * r / R,
                        .scratch = t->scratch ? t->scratch[r] : NULL};
    for (int r = 1; r < R; r++, started++)
        if (pthread_create(&ps[r].thread, NULL, read_piece, &ps[r]) != 0)
            break;
    for (int r = 1 + started; r < R; r++)
        read_piece(&ps[r]);      /* no thread to be had: read here */
    read_piece(&ps[0]);
    for (int r = 1; r <= started; r++)
        pthread_join(ps[r].thread, NULL);
    j->status = MOECAL_OK;
    j->nbad = 0;
    for (int r = 0; r < R; r++) {
        j->nbad += ps[r].nbad;
        if (j->status == MOECAL_OK && ps[r].status != MOECAL_OK) {
            j->status = ps[r].status;
            memcpy(j->msg, ps[r].msg, sizeof j->msg);
        }
    }
}

static void read_step(moecal_tokens *t, int64_t s, io_job *j)
{
    const step *st = &t->steps[s];
    int64_t lo, n;
    moecal_status rc;

    leader_part(t, st->nrows, t->c->node_id, &lo, &n);
    j->nbad = 0;
    if (n == 0) {
        j->status = MOECAL_OK;
        return;
    }
    t->read_bytes += (uint64_t)n * (uint64_t)t->hidden *
                     moecal_dtype_size(moecal_act_dtype(t->act));
    if (t->map) {
        read_direct(t, s, lo, n, j);
        return;
    }
    rc = moecal_act_read_bf16(t->act, st->layer, st->row0 + lo, n,
                              slot_rows(t, s) + (size_t)lo * (size_t)t->hidden);
    if (rc == MOECAL_OK)
        rc = moecal_act_scan_nonfinite(t->act, slot_rows(t, s) + (size_t)lo * (size_t)t->hidden,
                                       n, t->hidden, st->layer, st->row0 + lo, t->policy,
                                       slot_skip(t, s) + lo, &j->nbad);
    j->status = rc;
    if (rc != MOECAL_OK)
        snprintf(j->msg, sizeof j->msg, "%s", moecal_error_message());
}

static void *io_main(void *arg)
{
    moecal_tokens *t = arg;

    pthread_mutex_lock(&t->mu);
    for (;;) {
        while (!t->job.quit && !(t->job.pending && !t->job.done))
            pthread_cond_wait(&t->cv, &t->mu);
        if (t->job.quit)
            break;
        {
            io_job j = t->job;
            double t0;
            pthread_mutex_unlock(&t->mu);
            t0 = moecal_now();
            read_step(t, j.step, &j);
            t->read_s += moecal_now() - t0;
            pthread_mutex_lock(&t->mu);
            t->job.status = j.status;
            t->job.nbad = j.nbad;
            memcpy(t->job.msg, j.msg, sizeof j.msg);
            t->job.done = 1;
            pthread_cond_broadcast(&t->cv);
        }
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

static void io_start(moecal_tokens *t, int64_t s)
{
    pthread_mutex_lock(&t->mu);
    t->job.step = s;
    t->job.pending = 1;
    t->job.done = 0;
    t->job.status = MOECAL_OK;
    t->job.msg[0] = '\0';
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

static void io_wait(moecal_tokens *t, io_job *out)
{
    pthread_mutex_lock(&t->mu);
    while (!t->job.done)
        pthread_cond_wait(&t->cv, &t->mu);
    *out = t->job;
    t->job.pending = 0;
    pthread_mutex_unlock(&t->mu);
}

/* The direct reads, when the file allows them, and their scratch. */
static moecal_status open_readers(moecal_tokens *t, int readers)
{
    t->readers = readers < 1 ? 1 : readers > MOECAL_MAX_READERS ? MOECAL_MAX_READERS : readers;
    MOECAL_TRY(moecal_act_map_create(t->act, &t->map));
    if (!t->map) {
        moecal_log(MOECAL_LOG_VERBOSE, "# %s: its layout needs HDF5 to read it: one reader "
                   "per node", moecal_act_path(t->act));
        t->readers = 1;
        return MOECAL_OK;
    }
    if (moecal_act_dtype(t->act) == MOECAL_DT_BF16)
        return MOECAL_OK;
    if (!(t->scratch = calloc((size_t)t->readers, sizeof *t->scratch)))
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory (token readers)");
    for (int r = 0; r < t->readers; r++)
        if (!(t->scratch[r] = malloc(SCRATCH_BYTES)))
            return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory (token readers)");
    return MOECAL_OK;
}

moecal_status moecal_tokens_create(const moecal_comm *c, const char *path, int hidden,
                                   const int *layers, int nlayers, int64_t ntokens,
                                   int64_t chunk_tokens, moecal_nonfinite policy,
                                   int64_t first_step, int nslots, int readers,
                                   moecal_tokens **out)
{
    moecal_tokens *t;
    int64_t nchunks, s = 0;
    size_t rows_bytes;
    MPI_Aint size = 0;
    int disp_unit;
    moecal_status st = MOECAL_OK;

    *out = NULL;
    if (chunk_tokens > ntokens)
        chunk_tokens = ntokens > 0 ? ntokens : 1;
    t = calloc(1, sizeof *t);
    if (!t)
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory (token stream)");
    t->c = c;
    t->nslots = nslots == 3 ? 3 : 2;
    t->hidden = hidden;
    t->chunk_tokens = chunk_tokens;
    t->policy = policy;
    t->win = MPI_WIN_NULL;
    t->next = first_step;
    t->row_type = MPI_DATATYPE_NULL;
    nchunks = (ntokens + chunk_tokens - 1) / chunk_tokens;
    t->nsteps = nchunks * nlayers;
    t->steps = calloc((size_t)(t->nsteps ? t->nsteps : 1), sizeof *t->steps);
    t->counts = calloc((size_t)c->n_nodes, sizeof *t->counts);
    t->displs = calloc((size_t)c->n_nodes, sizeof *t->displs);
    if (!t->steps || !t->counts || !t->displs) {
        moecal_tokens_destroy(t);
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory (token stream)");
    }
    for (int l = 0; l < nlayers; l++)
        for (int64_t k = 0; k < nchunks; k++, s++) {
            t->steps[s].layer = layers[l];
            t->steps[s].chunk = (int)k;
            t->steps[s].row0 = k * chunk_tokens;
            t->steps[s].nrows = (k + 1) * chunk_tokens > ntokens ? ntokens - k * chunk_tokens
                                                                 : chunk_tokens;
        }

    rows_bytes = (size_t)chunk_tokens * (size_t)hidden * sizeof(uint16_t);
    t->slot_bytes = (HEADER_BYTES + rows_bytes + (size_t)chunk_tokens + 63) & ~(size_t)63;
    if (c->node_rank == 0)
        size = (MPI_Aint)((size_t)t->nslots * t->slot_bytes);
    MOECAL_MPI_CHECK(MPI_Win_allocate_shared(size, 1, MPI_INFO_NULL, c->node, &t->base,
                                             &t->win));
    MOECAL_MPI_CHECK(MPI_Win_shared_query(t->win, 0, &size, &disp_unit, &t->base));
    MOECAL_MPI_CHECK(MPI_Win_lock_all(MPI_MODE_NOCHECK, t->win));
    MOECAL_MPI_CHECK(MPI_Type_contiguous(hidden * (int)sizeof(uint16_t), MPI_BYTE,
                                         &t->row_type));
    MOECAL_MPI_CHECK(MPI_Type_commit(&t->row_type));

    if (c->node_rank == 0) {
        st = moecal_act_open(path, MPI_COMM_NULL, &t->act);
        if (st == MOECAL_OK)
            st = open_readers(t, readers);
        if (st == MOECAL_OK) {
            pthread_mutex_init(&t->mu, NULL);
            pthread_cond_init(&t->cv, NULL);
            if (pthread_create(&t->thread, NULL, io_main, t) != 0)
                st = moecal_error_set(MOECAL_ERR_INTERNAL, "cannot start the I/O thread");
            else
                t->thread_started = 1;
        }
        if (st == MOECAL_OK && first_step < t->nsteps)
            io_start(t, first_step);
    }
    *out = t;
    return st;
}

/* Leaders: exchange the parts of step s and agree on its status. */
static moecal_status exchange(moecal_tokens *t, int64_t s, const io_job *j)
{
    const moecal_comm *c = t->c;
    const step *st = &t->steps[s];
    int32_t mine[3], *all;
    int64_t bad = j->nbad, allbad = 0;
    slot_header *h = slot_hdr(t, s);
    double t0 = moecal_now();

    for (int i = 0; i < c->n_nodes; i++) {
        int64_t lo, n;
        leader_part(t, st->nrows, i, &lo, &n);
        t->displs[i] = (int)lo;
        t->counts[i] = (int)n;
    }
    mine[0] = j->status;
    mine[1] = j->status == MOECAL_OK ? 0 : moecal_status_exit_code(j->status);
    mine[2] = c->rank;
    all = malloc((size_t)c->n_nodes * 3 * sizeof *all);
    if (!all)
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory (token exchange)");
    MOECAL_MPI_CHECK(MPI_Allgather(mine, 3, MPI_INT32_T, all, 3, MPI_INT32_T, c->leader));
    h->status = MOECAL_OK;
    h->exit_code = 0;
    h->failed_rank = -1;
    for (int i = 0; i < c->n_nodes; i++)
        if (all[3 * i] != MOECAL_OK) {
            h->status = all[3 * i];
            h->exit_code = all[3 * i + 1];
            h->failed_rank = all[3 * i + 2];
            break;
        }
    free(all);
    if (h->status == MOECAL_OK && c->n_nodes > 1) {
        MOECAL_MPI_CHECK(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, slot_rows(t, s),
                                        t->counts, t->displs, t->row_type, c->leader));
        MOECAL_MPI_CHECK(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, slot_skip(t, s),
                                        t->counts, t->displs, MPI_BYTE, c->leader));
        MOECAL_MPI_CHECK(MPI_Allreduce(&bad, &allbad, 1, MPI_INT64_T, MPI_SUM, c->leader));
    } else {
        allbad = bad;
    }
    h->nskipped = allbad;
    t->exch_s += moecal_now() - t0;
    return MOECAL_OK;
}

moecal_status moecal_tokens_next(moecal_tokens *t, moecal_chunk *out)
{
    const moecal_comm *c = t->c;
    int64_t s = t->next;
    slot_header *h;
    io_job j;

    if (s >= t->nsteps)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "token stream read past its end");
    if (c->node_rank == 0) {
        double t0 = moecal_now();
        io_wait(t, &j);
        t->wait_s += moecal_now() - t0;
        MOECAL_TRY(exchange(t, s, &j));
    }
    /* Publish the slot to the node; afterwards nobody uses step s + 1 - nslots. */
    MOECAL_MPI_CHECK(MPI_Win_sync(t->win));
    MOECAL_MPI_CHECK(MPI_Barrier(c->node));
    MOECAL_MPI_CHECK(MPI_Win_sync(t->win));
    h = slot_hdr(t, s);
    if (h->status != MOECAL_OK) {
        if (c->node_rank == 0 && h->failed_rank == c->rank)
            return moecal_error_set((moecal_status)h->status, "%s", j.msg);
        return moecal_error_peer(h->failed_rank, h->exit_code);
    }
    if (c->node_rank == 0 && s + 1 < t->nsteps)
        io_start(t, s + 1);
    out->layer = t->steps[s].layer;
    out->chunk = t->steps[s].chunk;
    out->row0 = t->steps[s].row0;
    out->nrows = t->steps[s].nrows;
    out->rows = slot_rows(t, s);
    out->skip = slot_skip(t, s);
    out->nskipped = h->nskipped;
    t->next++;
    return MOECAL_OK;
}

void moecal_tokens_window(const moecal_tokens *t, void **base, size_t *bytes)
{
    *base = t->base;
    *bytes = (size_t)t->nslots * t->slot_bytes;
}

void moecal_tokens_quiesce(moecal_tokens *t)
{
    if (!t->thread_started)
        return;
    pthread_mutex_lock(&t->mu);
    while (t->job.pending && !t->job.done)
        pthread_cond_wait(&t->cv, &t->mu);
    pthread_mutex_unlock(&t->mu);
}

void moecal_tokens_times(const moecal_tokens *t, double *wait_s, double *exchange_s)
{
    *wait_s = t->wait_s;
    *exchange_s = t->exch_s;
}

void moecal_tokens_reads(const moecal_tokens *t, uint64_t *bytes, double *read_s, int *readers)
{
    *bytes = t->read_bytes;
    *read_s = t->read_s;
    *readers = t->map ? t->readers : t->act ? 1 : 0;
}

void moecal_tokens_destroy(moecal_tokens *t)
{
    if (!t)
        return;
    if (t->thread_started) {
        pthread_mutex_lock(&t->mu);
        t->job.quit = 1;
        pthread_cond_broadcast(&t->cv);
        pthread_mutex_unlock(&t->mu);
        pthread_join(t->thread, NULL);
        pthread_mutex_destroy(&t->mu);
        pthread_cond_destroy(&t->cv);
    }
    moecal_act_map_free(t->map);
    for (int r = 0; t->scratch && r < t->readers; r++)
        free(t->scratch[r]);
    free(t->scratch);
    if (t->act)
        moecal_act_close(t->act);
    if (t->row_type != MPI_DATATYPE_NULL)
        MPI_Type_free(&t->row_type);
    if (t->win != MPI_WIN_NULL) {
        MPI_Win_unlock_all(t->win);
        MPI_Win_free(&t->win);
    }
    free(t->steps);
    free(t->counts);
    free(t->displs);
    free(t);
}
