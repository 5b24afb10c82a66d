/* tokens.h - calibration tokens, once per node, streamed chunk by chunk.
 *
 * Every chunk lives once per node in an MPI_Win_allocate_shared window of
 * nslots (2 or 3) slots.  The node leaders each read a disjoint part of the chunk from the
 * activation file (in an I/O thread, so reading chunk s+1 overlaps computing
 * chunk s), scan it for non-finite rows, and exchange the parts with
 * MPI_Allgatherv on the leader communicator; the ranks of a node then read the
 * chunk in place.
 */
#ifndef MOECAL_TOKENS_H
#define MOECAL_TOKENS_H

#include <stdint.h>

#include "activations.h"
#include "comm.h"
#include "error.h"

typedef struct moecal_tokens moecal_tokens;

/* One step of the stream: a chunk of one layer's tokens. */
typedef struct moecal_chunk {
    int layer;              /* model layer index */
    int chunk;              /* chunk index within the layer */
    int64_t row0, nrows;    /* token range [row0, row0 + nrows) */
    const uint16_t *rows;   /* [nrows][H] bf16, read-only, node-shared */
    const uint8_t *skip;    /* [nrows] 1 = non-finite row, skipped */
    int64_t nskipped;
} moecal_chunk;

/* The most reader threads a leader may use. */
#define MOECAL_MAX_READERS 64

/* Collective over c->world.  path is opened by the node leaders only, each
 * reading its part of every chunk with `readers` threads (1 to
 * MOECAL_MAX_READERS; one when the file's layout needs HDF5).
 * Steps run over layers[0..nlayers) x chunks of chunk_tokens rows of
 * [0, ntokens), starting at step first_step (a resumed run).  nslots (2 or
 * 3) chunks live in the window: with 3, a rank may keep chunk s in use while
 * it takes chunk s + 1. */
moecal_status moecal_tokens_create(const moecal_comm *c, const char *path, int hidden,
                                   const int *layers, int nlayers, int64_t ntokens,
                                   int64_t chunk_tokens, moecal_nonfinite policy,
                                   int64_t first_step, int nslots, int readers,
                                   moecal_tokens **out);
/* Collective: the next chunk, step s.  The memory of step s + 1 - nslots is
 * reused, so call this only when done with that step.  A read or non-finite error on any leader is
 * returned on every rank: the rank that found it returns its status and
 * message; the others return MOECAL_ERR_PEER. */
moecal_status moecal_tokens_next(moecal_tokens *t, moecal_chunk *out);
/* The node-shared window holding every slot (to page-lock it for a GPU). */
void moecal_tokens_window(const moecal_tokens *t, void **base, size_t *bytes);
/* Wait until the I/O thread is idle (its read of the next chunk is done), so
 * that the calling thread may use HDF5 (which is not thread-safe here). */
void moecal_tokens_quiesce(moecal_tokens *t);
/* Seconds the main thread waited for reads (not overlapped) and spent in the
 * exchange. */
void moecal_tokens_times(const moecal_tokens *t, double *wait_s, double *exchange_s);
/* Leaders: the bytes of the file read so far, the seconds spent reading and
 * scanning them, and the readers used (direct reads) or 1 (HDF5); 0s on
 * the other ranks. */
void moecal_tokens_reads(const moecal_tokens *t, uint64_t *bytes, double *read_s,
                         int *readers);
/* Collective. */
void moecal_tokens_destroy(moecal_tokens *t);

#endif
