/* placement.c - rank placement with hwloc; see placement.h for the rules.
 *
 * moecal_placement_compute runs in three steps:
 *   1. local: load the topology, list the NVIDIA GPUs, read the rank's start
 *      binding and CUDA_VISIBLE_DEVICES, pick the rank's GPU;
 *   2. collective: agree on errors over the world, then share the start
 *      bindings (union) and the GPU choices over the node;
 *   3. local: every rank plans the whole node the same way, then takes
 *      its own line of the plan and binds to it.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <hwloc.h>
#include <jansson.h>

#include "placement.h"
#include "runtime.h"
#include "util.h"

#define NVIDIA_VENDOR_ID 0x10de
#define GPU_NONE (-1)           /* the rank has no GPU */
#define GPU_UNKNOWN (-2)        /* it has one, but which one is unknown (UUIDs) */

/* One NVIDIA GPU of the topology. */
typedef struct gpu_entry {
    hwloc_obj_t obj;        /* its PCI device, or its OS device when it has none */
    hwloc_obj_t local;      /* first non-I/O ancestor */
    long name_index;        /* N of an OS device named cudaN/nvmlN, -1 none */
    char busid[32];         /* "" without PCI device */
} gpu_entry;

/* The GPUs a rank may use, in CUDA's order. */
typedef struct visible_set {
    int n;
    int *gpu;               /* n indices into the GPU list; NULL when order unknown */
    unsigned flags;         /* MOECAL_PLACE_GPU_ORDER_UNKNOWN, MOECAL_PLACE_VISIBLE_CUT */
} visible_set;

/* What every rank of a node knows when it plans the node. */
typedef struct node_plan {
    hwloc_topology_t topo;
    hwloc_bitmap_t allowed;     /* cores the node's ranks share */
    int core_depth;             /* depth of the objects handed out (cores, else PUs) */
    hwloc_bitmap_t *sets;       /* [node_size] planned cpusets */
    hwloc_bitmap_t tmp;
} node_plan;

/* The topology kept for moecal_placement_alloc after a binding. */
static hwloc_topology_t kept_topology;

static moecal_status nomem(void)
{
    return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory in the placement");
}

/* ------------------------------------------------------------------ topology */

void moecal_placement_topology_source(char *buf, size_t len)
{
    const char *v;

    /* The order in which hwloc reads its variables (hwloc_topology_load). */
    if ((v = getenv("HWLOC_COMPONENTS")) != NULL) {
        snprintf(buf, len, "hwloc components %s", v);
        return;
    }
    if ((v = getenv("HWLOC_FSROOT")) != NULL)
        snprintf(buf, len, "Linux files under %s", v);
    else if ((v = getenv("HWLOC_CPUID_PATH")) != NULL)
        snprintf(buf, len, "x86 CPUID dump %s", v);
    else if ((v = getenv("HWLOC_SYNTHETIC")) != NULL)
        snprintf(buf, len, "synthetic %s", v);
    else if ((v = getenv("HWLOC_XMLFILE")) != NULL)
        snprintf(buf, len, "XML file %s", v);
    else
        snprintf(buf, len, "this system");
}

static moecal_status load_topology(hwloc_topology_t *out)
{
    hwloc_topology_t t;
    const char *synthetic = NULL, *xml = NULL;
    char src[600];
    int err;

    *out = NULL;
    /* hwloc would fall back to this system, silently, when the topology that
     * its variables name cannot be read: read those two here, in hwloc's
     * order, so that a bad one is an error that names it. */
    if (!getenv("HWLOC_COMPONENTS") && !getenv("HWLOC_FSROOT") && !getenv("HWLOC_CPUID_PATH")) {
        synthetic = getenv("HWLOC_SYNTHETIC");
        if (!synthetic)
            xml = getenv("HWLOC_XMLFILE");
    }
    if (hwloc_topology_init(&t) != 0)
        return moecal_error_errno(errno, "hwloc_topology_init");
    if (synthetic && hwloc_topology_set_synthetic(t, synthetic) != 0) {
        hwloc_topology_destroy(t);
        return moecal_error_set(MOECAL_ERR_USAGE, "HWLOC_SYNTHETIC='%s': not a synthetic "
                                "topology description hwloc accepts", synthetic);
    }
    if (xml && hwloc_topology_set_xml(t, xml) != 0) {
        err = errno;
        hwloc_topology_destroy(t);
        return moecal_error_set(MOECAL_ERR_USAGE, "HWLOC_XMLFILE=%s: hwloc cannot read this "
                                "topology: %s", xml, strerror(err));
    }
    /* The whole machine, so that every rank of a node sees the same tree
     * whatever its own cgroup; the allowed cores are applied below. */
    if (hwloc_topology_set_flags(t, HWLOC_TOPOLOGY_FLAG_INCLUDE_DISALLOWED) != 0
        || hwloc_topology_set_io_types_filter(t, HWLOC_TYPE_FILTER_KEEP_IMPORTANT) != 0) {
        err = errno;
        hwloc_topology_destroy(t);
        return moecal_error_errno(err, "hwloc: cannot configure the topology");
    }
    if (hwloc_topology_load(t) != 0) {
        err = errno;
        hwloc_topology_destroy(t);
        moecal_placement_topology_source(src, sizeof src);
        return moecal_error_set(strcmp(src, "this system") == 0 ? MOECAL_ERR_INTERNAL
                                                                : MOECAL_ERR_USAGE,
                                "hwloc cannot load the topology (%s): %s", src, strerror(err));
    }
    *out = t;
    return MOECAL_OK;
}

/* The cores this rank was given at start: its binding within the allowed
 * cpuset when the topology is this system, else the allowed cpuset. */
static moecal_status start_cpuset(hwloc_topology_t t, hwloc_bitmap_t mine)
{
    hwloc_const_cpuset_t allowed = hwloc_topology_get_allowed_cpuset(t);
    hwloc_bitmap_t cur;

    if (hwloc_bitmap_copy(mine, allowed) != 0)
        return nomem();
    if (!hwloc_topology_is_thissystem(t))
        return MOECAL_OK;
    cur = hwloc_bitmap_alloc();
    if (!cur)
        return nomem();
    /* The main thread's binding is the one the launcher set at exec time. */
    if (hwloc_get_cpubind(t, cur, HWLOC_CPUBIND_THREAD) == 0
        && hwloc_bitmap_intersects(cur, allowed)
        && hwloc_bitmap_and(mine, cur, allowed) != 0) {
        hwloc_bitmap_free(cur);
        return nomem();
    }
    hwloc_bitmap_free(cur);
    return MOECAL_OK;
}

/* --------------------------------------------------------------------- GPUs */

static int is_nvidia_gpu_pci(hwloc_obj_t o)
{
    return o->type == HWLOC_OBJ_PCI_DEVICE && o->attr->pcidev.vendor_id == NVIDIA_VENDOR_ID
           && (o->attr->pcidev.class_id == 0x0300 || o->attr->pcidev.class_id == 0x0302);
}

/* N for an OS device named cudaN or nvmlN, else -1. */
static long gpu_name_index(const char *name)
{
    const char *d;
    size_t nd;

    if (!name || (strncmp(name, "cuda", 4) != 0 && strncmp(name, "nvml", 4) != 0))
        return -1;
    d = name + 4;
    nd = strlen(d);
    if (nd == 0 || nd > 6 || strspn(d, "0123456789") != nd)
        return -1;
    return strtol(d, NULL, 10);
}

static moecal_status add_gpu(hwloc_topology_t t, gpu_entry **list, int *n, int *cap,
                             hwloc_obj_t obj, long name_index)
{
    gpu_entry *g;

    for (int i = 0; i < *n; i++) {
        g = &(*list)[i];
        if (g->obj == obj) {
            if (name_index >= 0 && (g->name_index < 0 || name_index < g->name_index))
                g->name_index = name_index;
            return MOECAL_OK;
        }
    }
    if (*n == *cap) {
        int ncap = *cap ? 2 * *cap : 8;
        gpu_entry *nl = realloc(*list, (size_t)ncap * sizeof *nl);
        if (!nl)
            return nomem();
        *list = nl;
        *cap = ncap;
    }
    g = &(*list)[(*n)++];
    memset(g, 0, sizeof *g);
    g->obj = obj;
    g->name_index = name_index;
    g->local = hwloc_get_non_io_ancestor_obj(t, obj);
    if (!g->local)
        g->local = hwloc_get_root_obj(t);
    if (obj->type == HWLOC_OBJ_PCI_DEVICE)
        snprintf(g->busid, sizeof g->busid, "%04x:%02x:%02x.%01x",
                 (unsigned)obj->attr->pcidev.domain, (unsigned)obj->attr->pcidev.bus,
                 (unsigned)obj->attr->pcidev.dev, (unsigned)obj->attr->pcidev.func);
    return MOECAL_OK;
}

/* PCI bus id order (CUDA_DEVICE_ORDER=PCI_BUS_ID); GPUs without a PCI device
 * after them, by the number in their name. */
static int gpu_cmp(const void *a, const void *b)
{
    const gpu_entry *x = a, *y = b;
    int xp = x->obj->type == HWLOC_OBJ_PCI_DEVICE, yp = y->obj->type == HWLOC_OBJ_PCI_DEVICE;

    if (xp != yp)
        return yp - xp;
    int c = 0;
    if (xp) {
        const struct hwloc_pcidev_attr_s *p = &x->obj->attr->pcidev, *q = &y->obj->attr->pcidev;
        c = MOECAL_CMP(p->domain, q->domain);
        c = c ? c : MOECAL_CMP(p->bus, q->bus);
        c = c ? c : MOECAL_CMP(p->dev, q->dev);
        c = c ? c : MOECAL_CMP(p->func, q->func);
    }
    c = c ? c : MOECAL_CMP(x->name_index, y->name_index);
    return c ? c : MOECAL_CMP(x->obj->logical_index, y->obj->logical_index);
}

/* Every NVIDIA GPU of the topology, in PCI bus id order. */
static moecal_status find_gpus(hwloc_topology_t t, gpu_entry **list, int *n)
{
    hwloc_obj_t o = NULL;
    int cap = 0;
    moecal_status s;

    *list = NULL;
    *n = 0;
    while ((o = hwloc_get_next_pcidev(t, o)) != NULL)
        if (is_nvidia_gpu_pci(o)) {
            s = add_gpu(t, list, n, &cap, o, -1);
            if (s != MOECAL_OK)
                return s;
        }
    o = NULL;
    while ((o = hwloc_get_next_osdev(t, o)) != NULL) {
        hwloc_obj_t owner;
        long idx;
        if (o->attr->osdev.type != HWLOC_OBJ_OSDEV_GPU
            && o->attr->osdev.type != HWLOC_OBJ_OSDEV_COPROC)
            continue;
        owner = o->parent && o->parent->type == HWLOC_OBJ_PCI_DEVICE ? o->parent : o;
        idx = gpu_name_index(o->name);
        if (idx < 0 && !(owner != o && is_nvidia_gpu_pci(owner)))
            continue;
        s = add_gpu(t, list, n, &cap, owner, idx);
        if (s != MOECAL_OK)
            return s;
    }
    if (*n > 1)
        qsort(*list, (size_t)*n, sizeof **list, gpu_cmp);
    return MOECAL_OK;
}

/* Whether CUDA in this process can see the GPU at busid (this system only):
 * the NVIDIA driver lists it (a container lists only its own) and its device
 * file opens (a Slurm device cgroup refuses the others).  Without the
 * driver's information, assume it can. */
static int gpu_usable(const char *busid)
{
    char path[128], line[256];
    struct stat st;
    FILE *f;
    int minor = -1, fd;

    if (!busid[0] || stat("/proc/driver/nvidia/gpus", &st) != 0)
        return 1;
    snprintf(path, sizeof path, "/proc/driver/nvidia/gpus/%s/information", busid);
    f = fopen(path, "r");
    if (!f)
        return errno == ENOENT ? 0 : 1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "Device Minor: %d", &minor) == 1)
            break;
    fclose(f);
    if (minor < 0)
        return 1;
    snprintf(path, sizeof path, "/dev/nvidia%d", minor);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        close(fd);
        return 1;
    }
    return errno == EPERM || errno == EACCES ? 0 : 1;
}

static int is_uuid_entry(const char *tok)
{
    return strncmp(tok, "GPU-", 4) == 0 || strncmp(tok, "MIG-", 4) == 0;
}

/* CUDA_VISIBLE_DEVICES over the usable GPUs (indices into the GPU list), as
 * CUDA reads it: integer indices, the list ending at the first entry that is
 * invalid or repeated; an empty value hides every GPU.  UUID or MIG entries
 * leave the order unknown: only their number counts. */
static moecal_status parse_visible(const char *cvd, const int *usable, int n_usable,
                                   visible_set *v)
{
    char *copy, *tok, *save = NULL;
    int ntok = 0, uuid = 0;

    memset(v, 0, sizeof *v);
    v->gpu = malloc(((size_t)n_usable + 1) * sizeof *v->gpu);
    if (!v->gpu)
        return nomem();
    if (!cvd) {
        memcpy(v->gpu, usable, (size_t)n_usable * sizeof *v->gpu);
        v->n = n_usable;
        return MOECAL_OK;
    }
    copy = strdup(cvd);
    if (!copy)
        return nomem();
    for (tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *end, *e;
        long idx;
        int dup = 0;

        while (*tok == ' ' || *tok == '\t')
            tok++;
        for (e = tok + strlen(tok); e > tok && (e[-1] == ' ' || e[-1] == '\t'); e--)
            e[-1] = '\0';
        ntok++;
        if (is_uuid_entry(tok)) {
            uuid = 1;
            continue;
        }
        if (uuid)
            continue;
        errno = 0;
        idx = strtol(tok, &end, 10);
        for (int i = 0; i < v->n && idx >= 0 && idx < n_usable; i++)
            dup |= v->gpu[i] == usable[idx];
        if (errno != 0 || end == tok || *end != '\0' || idx < 0 || idx >= n_usable || dup) {
            v->flags |= MOECAL_PLACE_VISIBLE_CUT;
            break;
        }
        v->gpu[v->n++] = usable[idx];
    }
    free(copy);
    if (uuid) {
        free(v->gpu);
        v->gpu = NULL;
        v->n = ntok;
        v->flags = MOECAL_PLACE_GPU_ORDER_UNKNOWN;
    }
    return MOECAL_OK;
}

/* ----------------------------------------------------------------- planning */

/* Number of objects at the plan's core depth that hold allowed PUs of obj. */
static int core_weight(node_plan *p, hwloc_obj_t obj)
{
    hwloc_obj_t o = NULL;
    int n = 0;

    if (hwloc_bitmap_and(p->tmp, obj->cpuset, p->allowed) != 0)
        return -1;
    while ((o = hwloc_get_next_obj_covering_cpuset_by_depth(p->topo, p->tmp, p->core_depth, o))
           != NULL)
        n++;
    return n;
}

/* Give the n ranks order[0..n) blocks of the allowed cores under obj.  Each
 * child gets a share of the ranks in proportion to its cores, rounded up
 * cumulatively (so no child gets more ranks than cores while there are
 * enough cores); a child left without a rank joins the block of the rank
 * before it, so blocks are contiguous and no core stays idle; a rank alone
 * in a subtree takes all of it; ranks beyond the cores share them. */
static moecal_status distribute(node_plan *p, hwloc_obj_t obj, const int *order, int n)
{
    int total, given = 0, last = -1;
    long long acc = 0;

    if (n <= 0)
        return MOECAL_OK;
    total = core_weight(p, obj);
    if (total < 0)
        return nomem();
    if (n == 1 || total == 0 || obj->arity == 0 || obj->depth >= p->core_depth) {
        for (int i = 0; i < n; i++)
            if (hwloc_bitmap_and(p->sets[order[i]], obj->cpuset, p->allowed) != 0)
                return nomem();
        return MOECAL_OK;
    }
    for (hwloc_obj_t ch = obj->first_child; ch; ch = ch->next_sibling) {
        int w = core_weight(p, ch), upto;
        moecal_status s;
        if (w < 0)
            return nomem();
        if (w == 0)
            continue;
        acc += w;
        upto = (int)((acc * n + total - 1) / total);
        if (upto > given) {
            s = distribute(p, ch, order + given, upto - given);
            if (s != MOECAL_OK)
                return s;
            last = order[upto - 1];
            given = upto;
        } else if (last >= 0) {
            /* The first child with cores always gets a rank: last is set. */
            if (hwloc_bitmap_and(p->tmp, ch->cpuset, p->allowed) != 0
                || hwloc_bitmap_or(p->sets[last], p->sets[last], p->tmp) != 0)
                return nomem();
        }
    }
    return MOECAL_OK;
}

typedef struct rank_key {
    int key, key2, node_rank;
} rank_key;

static int rank_key_cmp(const void *a, const void *b)
{
    const rank_key *x = a, *y = b;
    int c = MOECAL_CMP(x->key, y->key);
    c = c ? c : MOECAL_CMP(x->key2, y->key2);
    return c ? c : MOECAL_CMP(x->node_rank, y->node_rank);
}

/* Sort node ranks by (key, key2, node rank) into order[]. */
static void sort_ranks(rank_key *k, int n, int *order)
{
    qsort(k, (size_t)n, sizeof *k, rank_key_cmp);
    for (int i = 0; i < n; i++)
        order[i] = k[i].node_rank;
}

/* Plan the cpusets of all node ranks into p->sets.  phys[r] is the GPU of
 * node rank r (index into gpus, or GPU_NONE / GPU_UNKNOWN).  Sets *shared when
 * ranks must share cores. */
static moecal_status plan_node(node_plan *p, const gpu_entry *gpus, int ngpus, const int *phys,
                               int nranks, int *shared)
{
    hwloc_obj_t *dom = NULL;
    rank_key *keys = NULL;
    int *order = NULL, local = 1, w;
    moecal_status s = MOECAL_OK;

    *shared = 0;
    keys = malloc((size_t)nranks * sizeof *keys);
    order = malloc((size_t)nranks * sizeof *order);
    dom = calloc((size_t)ngpus + 1, sizeof *dom);
    if (!keys || !order || !dom) {
        s = nomem();
        goto done;
    }
    for (int r = 0; r < nranks; r++)
        if (phys[r] < 0)
            local = 0;

    if (local) {
        /* The place of each GPU in use: its first non-I/O ancestor, or the
         * first ancestor of that holding allowed cores. */
        for (int r = 0; r < nranks; r++) {
            int g = phys[r];
            if (dom[g])
                continue;
            dom[g] = gpus[g].local;
            while ((w = core_weight(p, dom[g])) == 0 && dom[g]->parent)
                dom[g] = dom[g]->parent;
            if (w < 0) {
                s = nomem();
                goto done;
            }
        }
        /* GPUs attached inside another GPU's place share the larger place. */
        for (int changed = 1; changed;) {
            changed = 0;
            for (int g = 0; g < ngpus; g++)
                for (int h = 0; h < ngpus && dom[g]; h++)
                    if (dom[h] && dom[h] != dom[g]
                        && hwloc_bitmap_isincluded(dom[g]->cpuset, dom[h]->cpuset)
                        && (!hwloc_bitmap_isequal(dom[g]->cpuset, dom[h]->cpuset)
                            || dom[h]->depth < dom[g]->depth)) {
                        dom[g] = dom[h];
                        changed = 1;
                    }
        }
        /* Local only when no place has more ranks than cores. */
        for (int g = 0; g < ngpus && local; g++) {
            int k = 0;
            if (!dom[g])
                continue;
            for (int r = 0; r < nranks; r++)
                k += dom[phys[r]] == dom[g];
            w = core_weight(p, dom[g]);
            if (w < 0) {
                s = nomem();
                goto done;
            }
            local = k <= w;
        }
    }

    if (local) {
        for (int g = 0; g < ngpus; g++) {
            int k = 0, first = 1;
            if (!dom[g])
                continue;
            for (int h = 0; h < g; h++)
                if (dom[h] == dom[g])
                    first = 0;
            if (!first)
                continue;
            for (int r = 0; r < nranks; r++)
                if (dom[phys[r]] == dom[g]) {
                    keys[k].key = phys[r];
                    keys[k].key2 = 0;
                    keys[k].node_rank = r;
                    k++;
                }
            sort_ranks(keys, k, order);
            s = distribute(p, dom[g], order, k);
            if (s != MOECAL_OK)
                goto done;
        }
    } else {
        /* Ranks in the tree order of their GPUs' places, so that blocks
         * fall near the GPU where they can; ranks without a known GPU last. */
        hwloc_obj_t root = hwloc_get_root_obj(p->topo);
        for (int r = 0; r < nranks; r++) {
            keys[r].key = phys[r] >= 0 ? hwloc_bitmap_first(gpus[phys[r]].local->cpuset) : INT_MAX;
            keys[r].key2 = phys[r] >= 0 ? phys[r] : INT_MAX;
            keys[r].node_rank = r;
        }
        sort_ranks(keys, nranks, order);
        s = distribute(p, root, order, nranks);
        if (s != MOECAL_OK)
            goto done;
        w = core_weight(p, root);
        *shared = nranks > w;
    }
done:
    free(dom);
    free(keys);
    free(order);
    return s;
}

/* os index of the smallest NUMA node whose cpuset holds set, -1 if none. */
static int numa_of(hwloc_topology_t t, hwloc_const_cpuset_t set)
{
    hwloc_obj_t o = NULL, best = NULL;

    if (hwloc_bitmap_iszero(set))
        return -1;
    while ((o = hwloc_get_next_obj_by_type(t, HWLOC_OBJ_NUMANODE, o)) != NULL)
        if (hwloc_bitmap_isincluded(set, o->cpuset)
            && (!best || hwloc_bitmap_weight(o->cpuset) < hwloc_bitmap_weight(best->cpuset)))
            best = o;
    return best ? (int)best->os_index : -1;
}

/* List form of set into buf; a list too long ends with "..." at a comma. */
static moecal_status cpuset_text(hwloc_const_cpuset_t set, char *buf, size_t len)
{
    char *text = NULL;

    if (hwloc_bitmap_list_asprintf(&text, set) < 0 || !text)
        return nomem();
    if (strlen(text) < len) {
        memcpy(buf, text, strlen(text) + 1);
    } else {
        size_t keep = len - 4;
        while (keep > 0 && text[keep] != ',')
            keep--;
        snprintf(buf, len, "%.*s...", (int)keep, text);
    }
    free(text);
    return MOECAL_OK;
}

/* ------------------------------------------------------------------ compute */

/* This rank's GPU: its CUDA ordinal, how many ranks of the node share it,
 * its bus id and whether the rank's cores are local to it. */
static void gpu_line(const int my_gpu[2], const int *node_gpu, int node_size,
                     const gpu_entry *gpus, hwloc_const_bitmap_t set, moecal_placement *out,
                     unsigned *flags)
{
    if (my_gpu[0] != GPU_NONE) {
        out->gpu = my_gpu[1];
        for (int r = 0; r < node_size; r++)
            out->ranks_per_gpu += node_gpu[2 * r] == my_gpu[0]
                                  && (my_gpu[0] != GPU_UNKNOWN
                                      || node_gpu[2 * r + 1] == my_gpu[1]);
    }
    if (my_gpu[0] >= 0) {
        const gpu_entry *g = &gpus[my_gpu[0]];
        snprintf(out->gpu_busid, sizeof out->gpu_busid, "%s", g->busid);
        if (!hwloc_bitmap_isincluded(set, g->local->cpuset))
            *flags |= MOECAL_PLACE_NOT_LOCAL;
    }
}

/* Bind the process to its cores (strictly if the system allows).  Memory
 * follows the cores by first touch; moecal_placement_alloc binds the large
 * host buffers explicitly, with the topology kept here (*topo taken). */
static void bind_rank(hwloc_topology_t *topo, hwloc_const_bitmap_t set, moecal_placement *out,
                      unsigned *flags)
{
    if (hwloc_set_cpubind(*topo, set, HWLOC_CPUBIND_PROCESS | HWLOC_CPUBIND_STRICT) == 0
        || hwloc_set_cpubind(*topo, set, HWLOC_CPUBIND_PROCESS) == 0) {
        out->bound = 1;
        if (kept_topology)
            hwloc_topology_destroy(kept_topology);
        kept_topology = *topo;
        *topo = NULL;
    } else {
        *flags |= MOECAL_PLACE_BIND_FAILED;
    }
}

moecal_status moecal_placement_compute(const moecal_comm *c, const moecal_place_opts *opt,
                                       moecal_placement *out)
{
    moecal_status s = MOECAL_OK;
    hwloc_topology_t topo = NULL;
    hwloc_bitmap_t mine = NULL;
    gpu_entry *gpus = NULL;
    int ngpus = 0, n_usable = 0, *usable = NULL, nul = 0, nul_max = 0, shared = 0;
    int my_gpu[2] = {GPU_NONE, -1};  /* (index into gpus or GPU_*, CUDA ordinal) */
    int *node_gpu = NULL, *phys = NULL;
    unsigned long *masks = NULL;
    visible_set vis = {0, NULL, 0};
    node_plan p = {NULL, NULL, 0, NULL, NULL};
    const char *cvd, *order;
    unsigned flags = 0;
    int thissystem = 0;

    *out = (moecal_placement){.rank = c->rank, .node_rank = c->node_rank,
                              .node_size = c->node_size, .numa = -1, .gpu = -1};
    snprintf(out->host, sizeof out->host, "%s", c->host);

    /* 1. Local. */
    s = load_topology(&topo);
    if (s != MOECAL_OK)
        goto agree;
    thissystem = hwloc_topology_is_thissystem(topo);
    mine = hwloc_bitmap_alloc();
    if (!mine) {
        s = nomem();
        goto agree;
    }
    s = start_cpuset(topo, mine);
    if (s != MOECAL_OK)
        goto agree;
    nul = hwloc_bitmap_nr_ulongs(mine);
    if (nul < 0) {
        s = moecal_error_set(MOECAL_ERR_INTERNAL, "hwloc: infinite cpuset");
        goto agree;
    }
    s = find_gpus(topo, &gpus, &ngpus);
    if (s != MOECAL_OK)
        goto agree;
    usable = malloc(((size_t)ngpus + 1) * sizeof *usable);
    if (!usable) {
        s = nomem();
        goto agree;
    }
    for (int g = 0; g < ngpus; g++)
        if (!thissystem || gpu_usable(gpus[g].busid))
            usable[n_usable++] = g;
    cvd = opt && opt->cuda_visible ? opt->cuda_visible : getenv("CUDA_VISIBLE_DEVICES");
    s = parse_visible(cvd, usable, n_usable, &vis);
    if (s != MOECAL_OK)
        goto agree;
    flags |= vis.flags;
    if (vis.n > 0) {
        my_gpu[1] = c->node_rank % vis.n;
        my_gpu[0] = vis.gpu ? vis.gpu[my_gpu[1]] : GPU_UNKNOWN;
        /* moecal numbers GPUs in PCI order; CUDA must too. */
        order = getenv("CUDA_DEVICE_ORDER");
        if (!order || strcmp(order, "PCI_BUS_ID") != 0) {
            if (order)
                flags |= MOECAL_PLACE_DEVICE_ORDER_SET;
            if (setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID", 1) != 0) {
                s = moecal_error_errno(errno, "setenv CUDA_DEVICE_ORDER");
                goto agree;
            }
        }
    }

agree:
    /* 2. Collective: no rank goes on when one failed. */
    s = moecal_comm_agree(c->world, s);
    if (s != MOECAL_OK)
        goto done;
    MOECAL_MPI_GOTO(MPI_Allreduce(&nul, &nul_max, 1, MPI_INT, MPI_MAX, c->node), done);
    if (nul_max < 1)
        nul_max = 1;
    masks = calloc((size_t)nul_max, sizeof *masks);
    node_gpu = malloc(2 * (size_t)c->node_size * sizeof *node_gpu);
    phys = malloc((size_t)c->node_size * sizeof *phys);
    p.sets = calloc((size_t)c->node_size, sizeof *p.sets);
    p.allowed = hwloc_bitmap_alloc();
    p.tmp = hwloc_bitmap_alloc();
    if (!masks || !node_gpu || !phys || !p.sets || !p.allowed || !p.tmp
        || hwloc_bitmap_to_ulongs(mine, (unsigned)nul_max, masks) != 0)
        s = nomem();
    s = moecal_comm_agree(c->world, s);
    if (s != MOECAL_OK)
        goto done;
    MOECAL_MPI_GOTO(MPI_Allreduce(MPI_IN_PLACE, masks, nul_max, MPI_UNSIGNED_LONG, MPI_BOR,
                                  c->node), done);
    MOECAL_MPI_GOTO(MPI_Allgather(my_gpu, 2, MPI_INT, node_gpu, 2, MPI_INT, c->node), done);

    /* 3. Local: plan the node, take this rank's line. */
    if (hwloc_bitmap_from_ulongs(p.allowed, (unsigned)nul_max, masks) != 0) {
        s = nomem();
        goto done;
    }
    p.topo = topo;
    p.core_depth = hwloc_get_type_depth(topo, HWLOC_OBJ_CORE);
    if (p.core_depth < 0)
        p.core_depth = hwloc_get_type_depth(topo, HWLOC_OBJ_PU);
    for (int r = 0; r < c->node_size; r++) {
        p.sets[r] = hwloc_bitmap_alloc();
        if (!p.sets[r]) {
            s = nomem();
            goto done;
        }
        phys[r] = node_gpu[2 * r] >= ngpus ? GPU_UNKNOWN : node_gpu[2 * r];
    }
    s = plan_node(&p, gpus, ngpus, phys, c->node_size, &shared);
    if (s != MOECAL_OK)
        goto done;
    if (shared)
        flags |= MOECAL_PLACE_CORES_SHARED;
    if (hwloc_bitmap_iszero(p.sets[c->node_rank])
        && hwloc_bitmap_copy(p.sets[c->node_rank], p.allowed) != 0) {
        s = nomem();
        goto done;
    }

    gpu_line(my_gpu, node_gpu, c->node_size, gpus, p.sets[c->node_rank], out, &flags);
    s = cpuset_text(p.sets[c->node_rank], out->cpuset, sizeof out->cpuset);
    if (s != MOECAL_OK)
        goto done;
    out->numa = numa_of(topo, p.sets[c->node_rank]);

    if (opt && opt->bind && thissystem)
        bind_rank(&topo, p.sets[c->node_rank], out, &flags);
    out->flags = flags;

done:
    if (p.sets)
        for (int r = 0; r < c->node_size; r++)
            hwloc_bitmap_free(p.sets[r]);
    free(p.sets);
    hwloc_bitmap_free(p.allowed);
    hwloc_bitmap_free(p.tmp);
    free(masks);
    free(node_gpu);
    free(phys);
    free(vis.gpu);
    free(usable);
    free(gpus);
    hwloc_bitmap_free(mine);
    if (topo)
        hwloc_topology_destroy(topo);
    return s;
}

/* ------------------------------------------------------------------- report */

moecal_status moecal_placement_gather(const moecal_comm *c, const moecal_placement *mine,
                                      moecal_placement **all)
{
    moecal_status s = MOECAL_OK;
    moecal_placement *buf = NULL;
    int ok = 1;

    *all = NULL;
    if (c->rank == 0) {
        buf = calloc((size_t)c->size, sizeof *buf);
        ok = buf != NULL;
    }
    MOECAL_MPI_GOTO(MPI_Bcast(&ok, 1, MPI_INT, 0, c->world), done);
    if (!ok) {
        if (c->rank == 0)
            return nomem();
        return moecal_error_peer(0, moecal_status_exit_code(MOECAL_ERR_NOMEM));
    }
    MOECAL_MPI_GOTO(MPI_Gather(mine, (int)sizeof *mine, MPI_BYTE, buf, (int)sizeof *mine,
                               MPI_BYTE, 0, c->world), done);
    *all = buf;
    buf = NULL;
done:
    free(buf);
    return s;
}

static const struct {
    unsigned flag;
    const char *key;    /* JSON */
    const char *text;   /* table note */
} flag_notes[] = {
    {MOECAL_PLACE_CORES_SHARED, "cores_shared",
     "more ranks than cores on the node: ranks share cores"},
    {MOECAL_PLACE_NOT_LOCAL, "not_gpu_local",
     "too few allowed cores near the GPU: cores not local to it"},
    {MOECAL_PLACE_GPU_ORDER_UNKNOWN, "gpu_order_unknown",
     "CUDA_VISIBLE_DEVICES names GPUs by UUID: which GPU is unknown, cores not chosen near it"},
    {MOECAL_PLACE_VISIBLE_CUT, "visible_devices_cut",
     "CUDA_VISIBLE_DEVICES holds an entry naming no usable GPU: the list ends there, as in CUDA"},
    {MOECAL_PLACE_DEVICE_ORDER_SET, "device_order_set",
     "CUDA_DEVICE_ORDER was not PCI_BUS_ID: set to PCI_BUS_ID"},
    {MOECAL_PLACE_BIND_FAILED, "bind_failed",
     "binding to the planned cores failed: left as launched"},
};
#define N_FLAG_NOTES (sizeof flag_notes / sizeof flag_notes[0])

enum { COL_RANK, COL_HOST, COL_NODE_RANK, COL_CPUSET, COL_NUMA, COL_GPU, COL_BUSID, COL_SHARED,
       COL_BOUND, N_COLS };

static const char *const col_head[N_COLS] = {
    "rank", "host", "node_rank", "cpuset", "numa", "gpu", "bus_id", "shared", "bound"
};
static const int col_right[N_COLS] = {1, 0, 1, 0, 1, 1, 0, 1, 0};

static void row_cells(const moecal_placement *a, char cell[N_COLS][MOECAL_HOST_MAX])
{
    snprintf(cell[COL_RANK], MOECAL_HOST_MAX, "%d", a->rank);
    snprintf(cell[COL_HOST], MOECAL_HOST_MAX, "%s", a->host);
    snprintf(cell[COL_NODE_RANK], MOECAL_HOST_MAX, "%d", a->node_rank);
    snprintf(cell[COL_CPUSET], MOECAL_HOST_MAX, "%s", a->cpuset);
    if (a->numa >= 0)
        snprintf(cell[COL_NUMA], MOECAL_HOST_MAX, "%d", a->numa);
    else
        snprintf(cell[COL_NUMA], MOECAL_HOST_MAX, "-");
    if (a->gpu >= 0) {
        snprintf(cell[COL_GPU], MOECAL_HOST_MAX, "%d", a->gpu);
        snprintf(cell[COL_SHARED], MOECAL_HOST_MAX, "%d", a->ranks_per_gpu);
    } else {
        snprintf(cell[COL_GPU], MOECAL_HOST_MAX, "-");
        snprintf(cell[COL_SHARED], MOECAL_HOST_MAX, "-");
    }
    snprintf(cell[COL_BUSID], MOECAL_HOST_MAX, "%s", a->gpu_busid[0] ? a->gpu_busid : "-");
    snprintf(cell[COL_BOUND], MOECAL_HOST_MAX, "%s", a->bound ? "yes" : "no");
}

static void print_row(FILE *fp, const int *width, char cell[N_COLS][MOECAL_HOST_MAX])
{
    fputs("#", fp);
    for (int k = 0; k < N_COLS; k++) {
        if (k == N_COLS - 1 && !col_right[k])
            fprintf(fp, "%s%s", k ? "  " : " ", cell[k]);
        else if (col_right[k])
            fprintf(fp, "%s%*s", k ? "  " : " ", width[k], cell[k]);
        else
            fprintf(fp, "%s%-*s", k ? "  " : " ", width[k], cell[k]);
    }
    fputc('\n', fp);
}

void moecal_placement_print(FILE *fp, const moecal_placement *all, int n)
{
    char (*cell)[MOECAL_HOST_MAX] = malloc(N_COLS * MOECAL_HOST_MAX);
    int width[N_COLS];

    if (!cell) {
        fprintf(fp, "# placement: out of memory\n");
        return;
    }
    for (int k = 0; k < N_COLS; k++)
        width[k] = (int)strlen(col_head[k]);
    for (int i = 0; i < n; i++) {
        row_cells(&all[i], cell);
        for (int k = 0; k < N_COLS; k++)
            if ((int)strlen(cell[k]) > width[k])
                width[k] = (int)strlen(cell[k]);
    }
    for (int k = 0; k < N_COLS; k++)
        snprintf(cell[k], MOECAL_HOST_MAX, "%s", col_head[k]);
    print_row(fp, width, cell);
    for (int i = 0; i < n; i++) {
        row_cells(&all[i], cell);
        print_row(fp, width, cell);
    }
    free(cell);

    for (size_t f = 0; f < N_FLAG_NOTES; f++) {
        hwloc_bitmap_t ranks = hwloc_bitmap_alloc();
        char *list = NULL;
        int count = 0;
        if (!ranks)
            return;
        for (int i = 0; i < n; i++)
            if (all[i].flags & flag_notes[f].flag) {
                if (hwloc_bitmap_set(ranks, (unsigned)all[i].rank) != 0)
                    break;
                count++;
            }
        if (count > 0 && hwloc_bitmap_list_asprintf(&list, ranks) >= 0 && list)
            fprintf(fp, "# note: rank%s %s: %s\n", count > 1 ? "s" : "", list,
                    flag_notes[f].text);
        free(list);
        hwloc_bitmap_free(ranks);
    }
}

char *moecal_placement_json(const moecal_placement *all, int n)
{
    json_t *arr = json_array();
    char *text = NULL;

    if (!arr)
        return NULL;
    for (int i = 0; i < n; i++) {
        const moecal_placement *a = &all[i];
        json_t *notes = json_array(), *o;
        if (!notes)
            goto done;
        for (size_t f = 0; f < N_FLAG_NOTES; f++)
            if ((a->flags & flag_notes[f].flag)
                && json_array_append_new(notes, json_string(flag_notes[f].key)) != 0) {
                json_decref(notes);
                goto done;
            }
        o = json_pack("{s:i, s:s, s:i, s:i, s:s, s:o, s:o, s:o, s:i, s:b, s:o}",
                      "rank", a->rank, "host", a->host, "node_rank", a->node_rank,
                      "node_size", a->node_size, "cpuset", a->cpuset,
                      "numa", a->numa >= 0 ? json_integer(a->numa) : json_null(),
                      "gpu", a->gpu >= 0 ? json_integer(a->gpu) : json_null(),
                      "gpu_bus_id", a->gpu_busid[0] ? json_string(a->gpu_busid) : json_null(),
                      "ranks_per_gpu", a->ranks_per_gpu, "bound", a->bound, "notes", notes);
        if (!o || json_array_append_new(arr, o) != 0)
            goto done;
    }
    text = json_dumps(arr, JSON_COMPACT);
done:
    json_decref(arr);
    return text;
}

/* ------------------------------------------------------------------- memory */

void *moecal_placement_alloc(size_t len, const moecal_placement *p)
{
    void *ptr;

    if (len == 0) {
        errno = EINVAL;
        return NULL;
    }
    /* mmap either way, so that moecal_placement_free needs no record. */
    ptr = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ptr == MAP_FAILED)
        return NULL;
    if (p && p->bound && p->numa >= 0 && kept_topology) {
        hwloc_bitmap_t nodes = hwloc_bitmap_alloc();
        if (nodes && hwloc_bitmap_only(nodes, (unsigned)p->numa) == 0
            && hwloc_set_area_membind(kept_topology, ptr, len, nodes, HWLOC_MEMBIND_BIND,
                                      HWLOC_MEMBIND_BYNODESET) != 0) {
            /* Not fatal: the pages then go where the first touch puts them,
             * which is the same node for a rank bound to its cores. */
        }
        hwloc_bitmap_free(nodes);
    }
    return ptr;
}

void moecal_placement_free(void *ptr, size_t len)
{
    if (ptr && len > 0)
        munmap(ptr, len);
}

void moecal_placement_cleanup(void)
{
    if (kept_topology)
        hwloc_topology_destroy(kept_topology);
    kept_topology = NULL;
}
