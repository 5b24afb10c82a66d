/* cmd_calibrate.c - `moecal calibrate`: options, placement, then the job. */
#include "config.h"

#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "calibrate.h"
#include "backend.h"
#include "commands.h"
#include "options.h"
#include "placement.h"
#include "router.h"
#include "runtime.h"
#include "synth.h"

/* What the options say (moecal_opts_bind fills it from the table). */
typedef struct calibrate_args {
    const char *model, *activations, *output, *layers, *quant_format, *backend;
    const char *router_logits, *nonfinite, *demo_dir;
    bool force, all_experts, bind, resume, plan;
    long long chunk_tokens, max_tokens, threads, readers, gpu_mem_limit, checkpoint_every;
    long long plan_nodes, plan_ranks_per_node;
    double assume_read_gbps, assume_tokens_per_s;
    moecal_verbosity_args verbosity;
} calibrate_args;

#define CAL(field) MOECAL_AT(calibrate_args, field)

const moecal_optdef moecal_calibrate_options[] = {
    {"model", 'm', MOECAL_OPT_STRING, NULL, NULL, "DIR",
     "Hugging Face checkpoint directory (none: the built-in demo model)", 0, 0, 0, CAL(model)},
    {"activations", 'a', MOECAL_OPT_STRING, NULL, NULL, "FILE",
     "activation HDF5 file (default with --model: DIR/activations.h5)", 0, 0, 0, CAL(activations)},
    {"output", 'o', MOECAL_OPT_STRING, "amax.h5", NULL, "FILE", "amax HDF5 output", 0, 0, 0,
     CAL(output)},
    {"force", 'f', MOECAL_OPT_FLAG, "0", NULL, NULL, "overwrite an existing output", 0, 0, 0,
     CAL(force)},
    {"calib-all-experts", 0, MOECAL_OPT_FLAG, "0", NULL, NULL,
     "send every token to every expert (no peer-max sync)", 0, 0, 0, CAL(all_experts)},
    {"chunk-tokens", 'c', MOECAL_OPT_INT, "4096", NULL, "N", "tokens per chunk", 0, 1,
     1LL << 30, CAL(chunk_tokens)},
    {"max-tokens", 0, MOECAL_OPT_INT, "0", NULL, "N",
     "use only the first N tokens (0: all)", 0, 0, 1LL << 40, CAL(max_tokens)},
    {"layers", 'l', MOECAL_OPT_STRING, "all", NULL, "LIST",
     "model layer indices to calibrate, e.g. 3-10,12", 0, 0, 0, CAL(layers)},
    {"quant-format", 'q', MOECAL_OPT_CHOICE, "nvfp4", "nvfp4|fp8", "FMT",
     "scale format of the outputs", 0, 0, 0, CAL(quant_format)},
    {"backend", 'b', MOECAL_OPT_CHOICE, "auto", "cpu|cuda|auto", "NAME",
     "compute backend (auto: cuda when a GPU is present)", 0, 0, 0, CAL(backend)},
    {"router-logits", 0, MOECAL_OPT_CHOICE, "auto", "auto|bf16|fp32|exact", "PREC",
     "router logit precision (auto: the family's, bf16 for Qwen-MoE and Mixtral, fp32 for "
     "DeepSeek)", 0, 0, 0, CAL(router_logits)},
    {"nonfinite", 0, MOECAL_OPT_CHOICE, "error", "error|skip", "POLICY",
     "what to do with activation rows holding NaN/Inf", 0, 0, 0, CAL(nonfinite)},
    {"threads", 't', MOECAL_OPT_INT, "0", NULL, "N",
     "CPU threads per rank (0: the cores hwloc bound the rank to)", 0, 0, 4096, CAL(threads)},
    {"readers", 0, MOECAL_OPT_INT, "4", NULL, "N",
     "threads of each node's first rank that read its part of every token chunk (one when "
     "the activation file's layout needs HDF5, e.g. compressed)", 0, 1, 64, CAL(readers)},
    {"gpu-mem-limit", 0, MOECAL_OPT_INT, "0", NULL, "BYTES",
     "cap on GPU memory per rank, k/M/G suffixes (0: what the GPU has)", 0, 0, 0,
     CAL(gpu_mem_limit)},
    {"bind", 0, MOECAL_OPT_FLAG, "1", NULL, NULL,
     "bind each rank to cores near its GPU (--no-bind to leave binding alone)", 0, 0, 0, CAL(bind)},
    {"checkpoint-every", 0, MOECAL_OPT_INT, "0", NULL, "N",
     "write a checkpoint every N chunks (0: only on SIGTERM/SIGUSR1)", 0, 0, 1LL << 40,
     CAL(checkpoint_every)},
    {"resume", 0, MOECAL_OPT_FLAG, "0", NULL, NULL,
     "continue from the newest valid checkpoint beside the output, if any", 0, 0, 0, CAL(resume)},
    {"plan", 0, MOECAL_OPT_FLAG, "0", NULL, NULL,
     "print what the job would read, hold, exchange and take (per node and rank), then exit "
     "without reading data or writing anything", 0, 0, 0, CAL(plan)},
    {"plan-nodes", 0, MOECAL_OPT_INT, "0", NULL, "N",
     "--plan: nodes to plan for (0: this launch's)", 0, 0, 1 << 20, CAL(plan_nodes)},
    {"plan-ranks-per-node", 0, MOECAL_OPT_INT, "0", NULL, "N",
     "--plan: ranks per node to plan for (0: this launch's)", 0, 0, 4096,
     CAL(plan_ranks_per_node)},
    {"assume-read-gbps", 0, MOECAL_OPT_FLOAT, "2", NULL, "X",
     "--plan: read bandwidth of a node, GB/s", 0, 1e-3, 1e4, CAL(assume_read_gbps)},
    {"assume-tokens-per-s", 0, MOECAL_OPT_FLOAT, "1000000", NULL, "X",
     "--plan: tokens per second one rank computes for a whole layer of experts (1e6: an H100 "
     "on a DeepSeek-V3 layer, BENCHMARKS.md)", 0, 1, 1e12, CAL(assume_tokens_per_s)},
    {"demo-dir", 0, MOECAL_OPT_STRING, NULL, NULL, "DIR",
     "where to write the demo model when --model is not given (default: a temporary dir)",
     0, 0, 0, CAL(demo_dir)},
    MOECAL_OPTS_VERBOSITY(calibrate_args),
    MOECAL_OPT_END
};

static const char summary[] =
    "Calibrate the input and weight amax of every routed expert of a MoE model.\n"
    "Ranks share the experts of each layer; tokens are routed by the model's router.\n"
    "Without --model, a small demo model is synthesized next to the output and used.";

/* The command line, words shell-quoted where needed, for the output's records. */
static char *join_argv(int argc, char **argv)
{
    size_t len = 16;
    char *buf, *q;

    for (int i = 0; i < argc; i++)
        len += 4 * strlen(argv[i]) + 3;
    buf = malloc(len);
    if (!buf)
        return NULL;
    q = buf + sprintf(buf, "moecal");
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        int plain = *a != '\0' && strspn(a, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                            "0123456789-_=./,:+@%") == strlen(a);
        *q++ = ' ';
        if (plain) {
            q += sprintf(q, "%s", a);
            continue;
        }
        *q++ = '\'';
        for (; *a; a++) {
            if (*a == '\'')
                q += sprintf(q, "'\\''");
            else
                *q++ = *a;
        }
        *q++ = '\'';
        *q = '\0';
    }
    return buf;
}

/* Without --model: the demo model next to the output (reused when present). */
static moecal_status demo_model(const calibrate_args *a, char *dir, size_t len)
{
    struct stat st;
    char path[4200];
    moecal_status s = MOECAL_OK;

    if (a->demo_dir) {
        snprintf(dir, len, "%s", a->demo_dir);
    } else {
        char *copy = strdup(a->output);
        if (!copy)
            return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
        snprintf(dir, len, "%s/moecal-demo", dirname(copy));
        free(copy);
    }
    snprintf(path, sizeof path, "%s/synth.json", dir);
    if (moecal_world_rank() == 0 && stat(path, &st) != 0) {
        moecal_log(MOECAL_LOG_INFO, "# no --model: writing the demo model to %s", dir);
        s = moecal_synth_preset(dir, "demo");
    }
    return s;
}

/* --print-config: what --router-logits will be for this job.  "auto" is
 * resolved from --model's config.json when it can be read (the demo model
 * is DeepSeek-V3). */
static void print_router_logits(const void *args, FILE *fp)
{
    const calibrate_args *a = args;
    const char *v = a->router_logits;
    const char *dir = a->model;
    moecal_model_config cfg;
    char path[4200];

    if (a->all_experts) {
        fprintf(fp, "# router logits: none (--calib-all-experts does not route)\n");
        return;
    }
    if (moecal_router_logits_parse(v) >= 0) {
        fprintf(fp, "# router logits: %s (as given)\n", v);
        return;
    }
    if (dir == NULL) {
        fprintf(fp, "# router logits: fp32 (auto, the demo model is DeepSeek-V3)\n");
        return;
    }
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (moecal_model_config_load(path, &cfg) != MOECAL_OK) {
        fprintf(fp, "# router logits: auto, not resolved: %s\n", moecal_error_message());
        return;
    }
    fprintf(fp, "# router logits: %s (auto, the default of model_type '%s' in %s)\n",
            moecal_router_logits_name(moecal_router_logits_default(&cfg)), cfg.model_type, path);
    moecal_model_config_free(&cfg);
}

int moecal_cmd_calibrate(int argc, char **argv)
{
    moecal_opts *o = NULL;
    calibrate_args a;
    moecal_status s;
    moecal_comm c;
    moecal_placement me, *all = NULL;
    moecal_place_opts po = {0};
    moecal_calib_params p = {0};
    char *cmdline, *pjson = NULL, demo_dir[4096];
    int len = 0;

    /* calibrate's options, then every backend's own (backend.h) */
    moecal_optdef *defs = moecal_backend_add_options(moecal_calibrate_options);
    if (!defs)
        moecal_fatal(moecal_error_set(MOECAL_ERR_NOMEM, "out of memory for the options"));
    o = moecal_cmd_begin("calibrate", defs, NULL, summary, 0, print_router_logits, &a, argc,
                         argv);
    if (!o) {
        free(defs);
        return 0;
    }
    moecal_set_verbosity_from(&a.verbosity);

    s = moecal_comm_init(MPI_COMM_WORLD, &c);
    moecal_check_all(s);
    po.bind = a.bind;
    s = moecal_placement_compute(&c, &po, &me);
    moecal_check_all(s);
    s = moecal_placement_gather(&c, &me, &all);
    moecal_check_all(s);
    cmdline = join_argv(argc, argv);
    if (c.rank == 0) {
        pjson = moecal_placement_json(all, c.size);
        len = pjson ? (int)strlen(pjson) + 1 : 0;
        if (moecal_verbosity() >= MOECAL_LOG_INFO) {
            printf("# moecal %s calibrate\n# build: %s\n# command: %s\n", PACKAGE_VERSION,
                   MOECAL_BUILD_OPTIONS, cmdline ? cmdline : "");
            moecal_placement_print(stdout, all, c.size);
            fflush(stdout);
        }
    }
    if (MPI_Bcast(&len, 1, MPI_INT, 0, c.world) != MPI_SUCCESS)
        moecal_fatal(moecal_error_set(MOECAL_ERR_MPI, "MPI_Bcast of the placement failed"));
    if (c.rank != 0)
        pjson = calloc((size_t)len + 1, 1);
    if (len > 0 && (!pjson || MPI_Bcast(pjson, len, MPI_CHAR, 0, c.world) != MPI_SUCCESS))
        moecal_fatal(moecal_error_set(MOECAL_ERR_MPI, "MPI_Bcast of the placement failed"));

    p.output = a.output;
    p.model_dir = a.model;
    if (a.plan && !p.model_dir) {
        moecal_error_set(MOECAL_ERR_USAGE, "--plan needs --model DIR (a checkpoint, or a "
                         "directory with its config.json alone)");
        moecal_fatal_all(MOECAL_ERR_USAGE);
    }
    if (!p.model_dir) {
        s = demo_model(&a, demo_dir, sizeof demo_dir);
        moecal_check_all(s);
        p.model_dir = demo_dir;
    }
    p.activations = a.activations;
    p.force = a.force;
    p.all_experts = a.all_experts;
    p.chunk_tokens = a.chunk_tokens;
    p.max_tokens = a.max_tokens;
    p.layers = a.layers;
    p.qfmt = strcmp(a.quant_format, "fp8") == 0 ? MOECAL_QFMT_FP8 : MOECAL_QFMT_NVFP4;
    p.backend = a.backend;
    p.router_logits = moecal_router_logits_parse(a.router_logits);
    p.nonfinite = strcmp(a.nonfinite, "skip") == 0 ? MOECAL_NONFINITE_SKIP
                                                   : MOECAL_NONFINITE_ERROR;
    p.threads = (int)a.threads;
    p.readers = (int)a.readers;
    p.gpu_mem_limit = (uint64_t)a.gpu_mem_limit;
    p.gpu = me.gpu;
    p.command_line = cmdline ? cmdline : "moecal calibrate";
    p.placement_json = pjson;
    p.checkpoint_every = a.checkpoint_every;
    p.resume = a.resume;
    p.plan_nodes = (int)a.plan_nodes;
    p.plan_ranks_per_node = (int)a.plan_ranks_per_node;
    p.assume_read_gbps = a.assume_read_gbps;
    p.assume_tokens_per_s = a.assume_tokens_per_s;
    p.opts = o;

    if (a.plan) {
        s = moecal_calibrate_plan(&c, &p);
    } else {
        moecal_signals_install();
        s = moecal_calibrate_run(&c, &p);
    }
    /* After a signal every rank stopped at the same chunk boundary, after
     * the checkpoint. */
    if (s != MOECAL_ERR_INTERRUPTED)
        moecal_check_all(s);
    free(all);
    free(pjson);
    free(cmdline);
    if (s != MOECAL_ERR_INTERRUPTED)
        moecal_placement_cleanup();
    moecal_comm_free(&c);
    moecal_opts_free(o);
    free(defs);
    if (s == MOECAL_ERR_INTERRUPTED) {
        moecal_runtime_finalize();
        exit(MOECAL_EXIT_REQUEUE);
    }
    return 0;
}
