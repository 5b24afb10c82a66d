/* cmd_export.c - `moecal export`: options, then the job (export.c). */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>

#include "commands.h"
#include "comm.h"
#include "export.h"
#include "options.h"
#include "runtime.h"


/* What the options say: the job's parameters and the verbosity. */
typedef struct export_args {
    const char *model_dir, *amax_path, *output, *backend;
    bool force;
    long long threads;
    moecal_verbosity_args verbosity;
} export_args;

#define EXP(field) MOECAL_AT(export_args, field)

const moecal_optdef moecal_export_options[] = {
    {"model", 'm', MOECAL_OPT_STRING, NULL, NULL, "DIR",
     "the Hugging Face checkpoint that was calibrated (FP8 or BF16)", 0, 0, 0, EXP(model_dir)},
    {"amax", 0, MOECAL_OPT_STRING, NULL, NULL, "FILE",
     "the amax file `moecal calibrate` wrote for it", 0, 0, 0, EXP(amax_path)},
    /* not from MOECAL_OUTPUT: that names calibrate's amax file in job scripts */
    {"output", 'o', MOECAL_OPT_STRING, NULL, NULL, "DIR", "the NVFP4 checkpoint to write",
     MOECAL_OPTF_NOENV, 0, 0, EXP(output)},
    {"force", 'f', MOECAL_OPT_FLAG, "0", NULL, NULL, "replace an existing output", 0, 0, 0,
     EXP(force)},
    {"threads", 't', MOECAL_OPT_INT, "0", NULL, "N",
     "workers per rank that read, quantize and write (0: OpenMP's default)", 0, 0, 4096,
     EXP(threads)},
    {"backend", 'b', MOECAL_OPT_CHOICE, "auto", "cpu|cuda|auto", "NAME",
     "where to quantize (auto: the GPU when one is present; the bytes are the same)", 0, 0, 0,
     EXP(backend)},
    MOECAL_OPTS_VERBOSITY(export_args),
    MOECAL_OPT_END
};

static const char summary[] =
    "Write an NVFP4 checkpoint (Model-Optimizer's \"modelopt\" format, served by vLLM,\n"
    "SGLang and TensorRT-LLM) from a checkpoint and its amax file: every routed expert\n"
    "projection becomes NVFP4 with the calibrated scales; other FP8 weights become\n"
    "BF16; everything else is copied.  Ranks split the shard files, threads the\n"
    "tensors; the output is the same bytes for any number of ranks and threads and\n"
    "either backend.";

int moecal_cmd_export(int argc, char **argv)
{
    moecal_opts *o = NULL;
    moecal_comm c;
    export_args a;
    moecal_export_params p;
    moecal_status s;

    o = moecal_cmd_begin("export", moecal_export_options, NULL, summary, 0, NULL, &a, argc,
                         argv);
    if (!o)
        return 0;
    moecal_set_verbosity_from(&a.verbosity);
    p = (moecal_export_params){.model_dir = a.model_dir, .amax_path = a.amax_path,
                               .output = a.output, .force = a.force, .threads = (int)a.threads,
                               .backend = a.backend};

    s = moecal_comm_init(MPI_COMM_WORLD, &c);
    moecal_check_all(s);
    s = moecal_export_run(&c, &p);
    moecal_check_all(s);
    moecal_comm_free(&c);
    moecal_opts_free(o);
    return 0;
}
