/* cmd_topo.c - `moecal topo`: where each rank runs (host, cores, NUMA node, GPU). */
#include "config.h"

#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "commands.h"
#include "options.h"
#include "placement.h"
#include "runtime.h"

static const char summary[] =
    "Show the placement that 'moecal calibrate' gives each rank: host, node rank, cores,\n"
    "NUMA node and GPU, then exit.  Launch it as the calibration job would be launched.\n"
    "HWLOC_XMLFILE or HWLOC_SYNTHETIC plan the placement on another topology (nothing\n"
    "is bound then); MOECAL_FAKE_NODES=N splits each node into N fake nodes.";

typedef struct topo_args {
    bool bind, json;
} topo_args;

#define TOPO(field) MOECAL_AT(topo_args, field)

const moecal_optdef moecal_topo_options[] = {
    {"bind", 0, MOECAL_OPT_FLAG, "1", NULL, NULL,
     "bind each rank as calibrate would (--no-bind: plan only)", 0, 0, 0, TOPO(bind)},
    {"json", 0, MOECAL_OPT_FLAG, "0", NULL, NULL,
     "print the placement as JSON (one object per rank) instead of the table", 0, 0, 0, TOPO(json)},
    MOECAL_OPT_END
};

/* The JSON array with one rank per line. */
static moecal_status print_json(FILE *fp, const moecal_placement *all, int n)
{
    char *text = moecal_placement_json(all, n);
    json_t *arr;
    json_error_t jerr;
    size_t i;

    if (!text)
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory writing the placement JSON");
    arr = json_loads(text, 0, &jerr);
    free(text);
    if (!arr)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "placement JSON: %s", jerr.text);
    fputs("[\n", fp);
    for (i = 0; i < json_array_size(arr); i++) {
        char *line = json_dumps(json_array_get(arr, i), JSON_COMPACT);
        if (!line) {
            json_decref(arr);
            return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory writing the placement JSON");
        }
        fprintf(fp, "  %s%s\n", line, i + 1 < json_array_size(arr) ? "," : "");
        free(line);
    }
    fputs("]\n", fp);
    json_decref(arr);
    return MOECAL_OK;
}

int moecal_cmd_topo(int argc, char **argv)
{
    moecal_opts *o = NULL;
    topo_args a;
    moecal_status s;
    moecal_comm c;
    moecal_placement me, *all = NULL;
    moecal_place_opts po = {0};
    char source[600];

    o = moecal_cmd_begin("topo", moecal_topo_options, NULL, summary, 0, NULL, &a, argc, argv);
    if (!o)
        return 0;

    s = moecal_comm_init(MPI_COMM_WORLD, &c);
    moecal_check_all(s);
    po.bind = a.bind;
    po.cuda_visible = NULL;
    s = moecal_placement_compute(&c, &po, &me);
    moecal_check_all(s);
    s = moecal_placement_gather(&c, &me, &all);
    moecal_check_all(s);

    if (c.rank == 0) {
        if (a.json) {
            s = print_json(stdout, all, c.size);
        } else {
            moecal_placement_topology_source(source, sizeof source);
            printf("# moecal topo: %d rank%s on %d node%s, topology: %s\n", c.size,
                   c.size == 1 ? "" : "s", c.n_nodes, c.n_nodes == 1 ? "" : "s", source);
            moecal_placement_print(stdout, all, c.size);
        }
        if (fflush(stdout) != 0 && s == MOECAL_OK)
            s = moecal_error_errno(errno, "standard output");
    }
    moecal_check_all(s);

    free(all);
    moecal_placement_cleanup();
    s = moecal_comm_free(&c);
    moecal_check_all(s);
    moecal_opts_free(o);
    return 0;
}
