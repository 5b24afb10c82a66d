/* placement.h - where each rank runs: cores, NUMA node, GPU (hwloc).
 *
 * The topology is the machine's, or the one that hwloc's own environment
 * variables name (HWLOC_SYNTHETIC, HWLOC_XMLFILE, ...); binding is applied
 * only when the topology is this system and the caller asks for it, so a
 * synthetic or XML topology gives a plan that can be printed and tested.
 *
 * Cores.  The ranks of a node share the cores that the launcher gave them:
 * the union of the bindings the node's ranks had at start, within the
 * topology's allowed cpuset (a Slurm cgroup).  Launchers that bind each
 * rank to a few cores therefore limit moecal to those cores; launch with
 * binding off (srun --cpu-bind=none, mpiexec --bind-to none) to let moecal
 * choose among all the cores of the allocation.
 *
 * GPUs.  NVIDIA GPUs are the PCI devices of vendor 0x10de and class 0x0300
 * or 0x0302, and the OS devices named cudaN/nvmlN, ordered by PCI bus id:
 * this is CUDA's order under CUDA_DEVICE_ORDER=PCI_BUS_ID, which
 * moecal_placement_compute sets in the environment (moecal assumes it; CUDA
 * must not have been initialised before).  On this system, GPUs that the
 * process cannot open (a Slurm device cgroup) or that the NVIDIA driver does
 * not list are left out, as CUDA leaves them out.  CUDA_VISIBLE_DEVICES
 * (integer indices) then selects and orders them; UUID/MIG entries leave the
 * order unknown.  The GPU of a rank is visible[node_rank % n_visible].
 *
 * The ranks that share a GPU, and the GPUs attached to the same place,
 * split the allowed cores local to that place (the GPU's first non-I/O
 * ancestor: package, die, NUMA group) into distinct blocks, balanced over
 * the hierarchy.  When some place has more ranks than cores, every rank of
 * the node takes distinct cores anywhere; when the node has more ranks than
 * cores, ranks share cores.  Without GPUs, ranks spread over all allowed
 * cores the same way (NUMA balanced).  Each case is reported in flags.
 */
#ifndef MOECAL_PLACEMENT_H
#define MOECAL_PLACEMENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "comm.h"
#include "error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* moecal_placement.flags: what a reader of the placement should know. */
enum {
    MOECAL_PLACE_CORES_SHARED = 1u << 0,   /* more ranks than cores on the node */
    MOECAL_PLACE_NOT_LOCAL = 1u << 1,      /* cores not local to the rank's GPU */
    MOECAL_PLACE_GPU_ORDER_UNKNOWN = 1u << 2, /* CUDA_VISIBLE_DEVICES holds UUIDs */
    MOECAL_PLACE_VISIBLE_CUT = 1u << 3,    /* CUDA_VISIBLE_DEVICES cut at a bad entry */
    MOECAL_PLACE_DEVICE_ORDER_SET = 1u << 4, /* CUDA_DEVICE_ORDER was replaced */
    MOECAL_PLACE_BIND_FAILED = 1u << 5     /* binding failed; left as launched */
};

typedef struct moecal_placement {
    int rank, node_rank, node_size;
    char host[MOECAL_HOST_MAX];
    char cpuset[128];     /* PU os indexes, list form "0-3,8"; "..." ends a cut list */
    int numa;             /* os index of the NUMA node holding the cpuset, -1 none/several */
    int gpu;              /* CUDA ordinal among the rank's visible GPUs, -1 none */
    char gpu_busid[32];   /* "0000:3b:00.0", "" unknown or none */
    int ranks_per_gpu;    /* node ranks sharing this GPU, 0 without GPU */
    int bound;            /* 1 binding applied, 0 only planned */
    unsigned flags;       /* MOECAL_PLACE_* */
} moecal_placement;

typedef struct moecal_place_opts {
    bool bind;                 /* apply the binding (this system only) */
    const char *cuda_visible;  /* CUDA_VISIBLE_DEVICES value; NULL = read env */
} moecal_place_opts;

/* Collective over c->world: compute this rank's placement and, when
 * opt->bind and the topology is this system, bind the process to it.  On a
 * failure every rank returns an error (the failing rank its status, the
 * others MOECAL_ERR_PEER). */
moecal_status moecal_placement_compute(const moecal_comm *c, const moecal_place_opts *opt,
                                       moecal_placement *out);

/* Collective over c->world: the placements of all ranks, in world rank
 * order, into *all (malloc'd) on rank 0; *all = NULL on the other ranks. */
moecal_status moecal_placement_gather(const moecal_comm *c, const moecal_placement *mine,
                                      moecal_placement **all);

/* The placement table, '#'-prefixed aligned lines, then one note line per
 * flag that some rank has. */
void moecal_placement_print(FILE *fp, const moecal_placement *all, int n);

/* JSON array text of the placements (compact, one line), malloc'd; NULL if
 * out of memory. */
char *moecal_placement_json(const moecal_placement *all, int n);

/* What the topology comes from, as hwloc chooses it from its environment:
 * "this system", "XML file PATH", "synthetic DESCRIPTION", ... */
void moecal_placement_topology_source(char *buf, size_t len);

/* Host memory of len bytes (page aligned, zero-filled) on the rank's NUMA node
 * when the placement was applied (p->bound), plain otherwise; NULL on
 * failure.  Release with moecal_placement_free(ptr, len). */
void *moecal_placement_alloc(size_t len, const moecal_placement *p);
void moecal_placement_free(void *ptr, size_t len);

/* Drop the topology kept for moecal_placement_alloc (at the end of a run;
 * memory already allocated stays valid). */
void moecal_placement_cleanup(void);

#ifdef __cplusplus
}
#endif
#endif
