/* comm.h - the communicators of a moecal job.
 *
 * world   a duplicate of the communicator given to moecal_comm_init
 * node    the ranks of one node (MPI_Comm_split_type SHARED), or of one fake
 *         node when MOECAL_FAKE_NODES is set
 * leader  node rank 0 of every node, ordered by world rank; MPI_COMM_NULL on
 *         the other ranks
 *
 * Nodes are numbered 0..n_nodes-1 in the order of their leaders' world ranks.
 * Every communicator created here returns errors (MPI_ERRORS_RETURN).
 *
 * Environment:
 *   MOECAL_FAKE_NODES=N  split each node's ranks into N fake nodes of
 *                        contiguous node ranks (node rank r of n goes to fake
 *                        node r*N/n), to test multi-node paths on one machine;
 *                        the host of fake node i is reported as "<host>~<i>".
 *   MOECAL_HOSTNAME=NAME report NAME instead of gethostname() (deterministic
 *                        test output; the "~<i>" suffix is still added).
 */
#ifndef MOECAL_COMM_H
#define MOECAL_COMM_H

#include <mpi.h>

#include "error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOECAL_HOST_MAX 256

typedef struct moecal_comm {
    MPI_Comm world, node, leader;
    int rank, size;            /* in world */
    int node_rank, node_size;  /* in node */
    int node_id, n_nodes;      /* index of this rank's node, number of nodes */
    char host[MOECAL_HOST_MAX];
} moecal_comm;

/* Collective over world.  On failure every rank returns an error (the rank
 * that found it its own status, the others MOECAL_ERR_PEER) and *c holds no
 * communicator. */
moecal_status moecal_comm_init(MPI_Comm world, moecal_comm *c);

/* Collective over comm: agree on an error state, so that no rank goes on to
 * a collective that a failed rank skips.  MOECAL_OK when no rank failed;
 * else the lowest failed rank of comm returns its status (and message) and
 * every other rank MOECAL_ERR_PEER naming it, with the largest exit code of
 * the failed ranks: ranks that fail alike report once. */
moecal_status moecal_comm_agree(MPI_Comm comm, moecal_status local);

/* Collective over c->world.  Frees every communicator of *c, even when one
 * of the frees fails; returns the first failure. */
moecal_status moecal_comm_free(moecal_comm *c);

#ifdef __cplusplus
}
#endif
#endif
