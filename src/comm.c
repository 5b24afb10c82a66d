/* comm.c - world, node and leader communicators; see comm.h. */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm.h"
#include "runtime.h"

/* Longest host name taken from MOECAL_HOSTNAME or gethostname(), leaving room
 * for the "~<fake node>" suffix. */
#define HOST_NAME_KEEP 200

moecal_status moecal_comm_agree(MPI_Comm comm, moecal_status local)
{
    int rank, size, rc;
    int mine[2], all[2];

    rc = MPI_Comm_rank(comm, &rank);
    if (rc == MPI_SUCCESS)
        rc = MPI_Comm_size(comm, &size);
    if (rc != MPI_SUCCESS)
        return local != MOECAL_OK ? local : moecal_mpi_error(rc, "MPI_Comm_rank/size");
    /* (largest exit code of a failed rank, size - lowest failed rank) */
    mine[0] = local != MOECAL_OK ? moecal_status_exit_code(local) : 0;
    if (local != MOECAL_OK && mine[0] == 0)
        mine[0] = MOECAL_EXIT_FAILURE;
    mine[1] = local != MOECAL_OK ? size - rank : 0;
    rc = MPI_Allreduce(mine, all, 2, MPI_INT, MPI_MAX, comm);
    if (rc != MPI_SUCCESS)
        return local != MOECAL_OK ? local : moecal_mpi_error(rc, "MPI_Allreduce (error state)");
    if (all[1] == 0)
        return MOECAL_OK;
    /* One message, from the lowest failed rank: ranks often fail alike. */
    if (local != MOECAL_OK && size - all[1] == rank)
        return local;
    return moecal_error_peer(size - all[1], all[0]);
}

/* A host name that prints and goes into JSON unchanged: printable ASCII
 * without blanks; other bytes become '?'. */
static void clean_host(char *h)
{
    for (; *h; h++)
        if (*h <= ' ' || *h > '~')
            *h = '?';
}

static moecal_status host_name(char *host, size_t len)
{
    const char *env = getenv("MOECAL_HOSTNAME");

    if (env && *env) {
        size_t n = strlen(env);
        if (n > HOST_NAME_KEEP)
            return moecal_error_set(MOECAL_ERR_USAGE, "MOECAL_HOSTNAME is %zu characters long "
                                    "(at most %d)", n, HOST_NAME_KEEP);
        for (const char *p = env; *p; p++)
            if (*p <= ' ' || *p > '~')
                return moecal_error_set(MOECAL_ERR_USAGE, "MOECAL_HOSTNAME='%s': only printable "
                                        "ASCII without blanks is allowed", env);
        snprintf(host, len, "%s", env);
        return MOECAL_OK;
    }
    if (gethostname(host, len) != 0)
        snprintf(host, len, "unknown");
    host[len - 1] = '\0';
    if (strlen(host) > HOST_NAME_KEEP)
        host[HOST_NAME_KEEP] = '\0';
    clean_host(host);
    return MOECAL_OK;
}

/* MOECAL_FAKE_NODES: 0 when unset or empty, else N in [1, node_size]. */
static moecal_status fake_nodes(int node_size, int *n)
{
    const char *env = getenv("MOECAL_FAKE_NODES");
    char *end;
    long v;

    *n = 0;
    if (!env || !*env)
        return MOECAL_OK;
    errno = 0;
    v = strtol(env, &end, 10);
    if (errno != 0 || end == env || *end != '\0' || v < 1 || v > node_size)
        return moecal_error_set(MOECAL_ERR_USAGE, "MOECAL_FAKE_NODES='%s': expected a positive "
                                "integer no larger than the %d rank%s on this node", env,
                                node_size, node_size == 1 ? "" : "s");
    *n = (int)v;
    return MOECAL_OK;
}

static void free_comm(MPI_Comm *comm)
{
    if (*comm != MPI_COMM_NULL)
        MPI_Comm_free(comm);
    *comm = MPI_COMM_NULL;
}

moecal_status moecal_comm_init(MPI_Comm world, moecal_comm *c)
{
    moecal_status s = MOECAL_OK;
    MPI_Comm real = MPI_COMM_NULL;
    int real_rank = 0, real_size = 1, nfake = 0, fake_id = 0;
    int info[2] = {0, 0};

    memset(c, 0, sizeof *c);
    c->world = c->node = c->leader = MPI_COMM_NULL;

    MOECAL_MPI_GOTO(MPI_Comm_dup(world, &c->world), fail);
    MOECAL_MPI_GOTO(MPI_Comm_set_errhandler(c->world, MPI_ERRORS_RETURN), fail);
    MOECAL_MPI_GOTO(MPI_Comm_set_name(c->world, "moecal world"), fail);
    MOECAL_MPI_GOTO(MPI_Comm_rank(c->world, &c->rank), fail);
    MOECAL_MPI_GOTO(MPI_Comm_size(c->world, &c->size), fail);

    MOECAL_MPI_GOTO(MPI_Comm_split_type(c->world, MPI_COMM_TYPE_SHARED, c->rank, MPI_INFO_NULL,
                                        &real), fail);
    MOECAL_MPI_GOTO(MPI_Comm_set_errhandler(real, MPI_ERRORS_RETURN), fail);
    MOECAL_MPI_GOTO(MPI_Comm_rank(real, &real_rank), fail);
    MOECAL_MPI_GOTO(MPI_Comm_size(real, &real_size), fail);

    /* Checks of the environment may fail on some ranks only (node sizes
     * differ): agree before the next collective. */
    s = host_name(c->host, sizeof c->host);
    if (s == MOECAL_OK)
        s = fake_nodes(real_size, &nfake);
    s = moecal_comm_agree(c->world, s);
    if (s != MOECAL_OK)
        goto fail;

    if (nfake > 1) {
        fake_id = (int)((long long)real_rank * nfake / real_size);
        MOECAL_MPI_GOTO(MPI_Comm_split(real, fake_id, real_rank, &c->node), fail);
        free_comm(&real);
        MOECAL_MPI_GOTO(MPI_Comm_set_errhandler(c->node, MPI_ERRORS_RETURN), fail);
        /* host is at most HOST_NAME_KEEP long: the suffix fits. */
        snprintf(c->host + strlen(c->host), sizeof c->host - strlen(c->host), "~%d", fake_id);
    } else {
        c->node = real;
        real = MPI_COMM_NULL;
    }
    MOECAL_MPI_GOTO(MPI_Comm_set_name(c->node, "moecal node"), fail);
    MOECAL_MPI_GOTO(MPI_Comm_rank(c->node, &c->node_rank), fail);
    MOECAL_MPI_GOTO(MPI_Comm_size(c->node, &c->node_size), fail);

    MOECAL_MPI_GOTO(MPI_Comm_split(c->world, c->node_rank == 0 ? 0 : MPI_UNDEFINED, c->rank,
                                   &c->leader), fail);
    if (c->leader != MPI_COMM_NULL) {
        MOECAL_MPI_GOTO(MPI_Comm_set_errhandler(c->leader, MPI_ERRORS_RETURN), fail);
        MOECAL_MPI_GOTO(MPI_Comm_set_name(c->leader, "moecal leaders"), fail);
        MOECAL_MPI_GOTO(MPI_Comm_rank(c->leader, &info[0]), fail);
        MOECAL_MPI_GOTO(MPI_Comm_size(c->leader, &info[1]), fail);
    }
    MOECAL_MPI_GOTO(MPI_Bcast(info, 2, MPI_INT, 0, c->node), fail);
    c->node_id = info[0];
    c->n_nodes = info[1];
    return MOECAL_OK;

fail:
    free_comm(&real);
    free_comm(&c->leader);
    free_comm(&c->node);
    free_comm(&c->world);
    return s;
}

moecal_status moecal_comm_free(moecal_comm *c)
{
    moecal_status s = MOECAL_OK;
    MPI_Comm *comms[3] = {&c->leader, &c->node, &c->world};

    for (int i = 0; i < 3; i++) {
        int rc;
        if (*comms[i] == MPI_COMM_NULL)
            continue;
        rc = MPI_Comm_free(comms[i]);
        if (rc != MPI_SUCCESS && s == MOECAL_OK)
            s = moecal_mpi_error(rc, "MPI_Comm_free");
        *comms[i] = MPI_COMM_NULL;
    }
    return s;
}
