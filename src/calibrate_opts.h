/* calibrate_opts.h - the option table of `moecal calibrate`. */
#ifndef MOECAL_CALIBRATE_OPTS_H
#define MOECAL_CALIBRATE_OPTS_H

#include "options.h"

static const moecal_optdef moecal_calibrate_optdefs[] = {
    {"model", 'm', MOECAL_OPT_STRING, NULL, NULL, "DIR",
     "Hugging Face checkpoint directory (none: the built-in demo model)", 0, 0, 0},
    {"activations", 'a', MOECAL_OPT_STRING, NULL, NULL, "FILE",
     "activation HDF5 file (default with --model: DIR/activations.h5)", 0, 0, 0},
    {"output", 'o', MOECAL_OPT_STRING, "amax.h5", NULL, "FILE", "amax HDF5 output", 0, 0, 0},
    {"force", 'f', MOECAL_OPT_FLAG, "0", NULL, NULL, "overwrite an existing output", 0, 0, 0},
    {"calib-all-experts", 0, MOECAL_OPT_FLAG, "0", NULL, NULL,
     "send every token to every expert (no peer-max sync)", 0, 0, 0},
    {"chunk-tokens", 'c', MOECAL_OPT_INT, "4096", NULL, "N", "tokens per chunk", 0, 1,
     1LL << 30},
    {"max-tokens", 0, MOECAL_OPT_INT, "0", NULL, "N",
     "use only the first N tokens (0: all)", 0, 0, 1LL << 40},
    {"layers", 'l', MOECAL_OPT_STRING, "all", NULL, "LIST",
     "model layer indices to calibrate, e.g. 3-10,12", 0, 0, 0},
    {"quant-format", 'q', MOECAL_OPT_CHOICE, "nvfp4", "nvfp4|fp8", "FMT",
     "scale format of the outputs", 0, 0, 0},
    {"backend", 'b', MOECAL_OPT_CHOICE, "auto", "cpu|cuda|auto", "NAME",
     "compute backend (auto: cuda when a GPU is present)", 0, 0, 0},
    {"router-logits", 0, MOECAL_OPT_CHOICE, "auto", "auto|bf16|fp32|exact", "PREC",
     "router logit precision (auto: the family's, bf16 for Qwen-MoE and Mixtral, fp32 for "
     "DeepSeek)", 0, 0, 0},
    {"nonfinite", 0, MOECAL_OPT_CHOICE, "error", "error|skip", "POLICY",
     "what to do with activation rows holding NaN/Inf", 0, 0, 0},
    {"threads", 't', MOECAL_OPT_INT, "0", NULL, "N",
     "CPU threads per rank (0: the cores hwloc bound the rank to)", 0, 0, 4096},
    {"gpu-mem-limit", 0, MOECAL_OPT_INT, "0", NULL, "BYTES",
     "cap on GPU memory per rank, k/M/G suffixes (0: what the GPU has)", 0, 0, 0},
    {"bind", 0, MOECAL_OPT_FLAG, "1", NULL, NULL,
     "bind each rank to cores near its GPU (--no-bind to leave binding alone)", 0, 0, 0},
    {"checkpoint-every", 0, MOECAL_OPT_INT, "0", NULL, "N",
     "write a checkpoint every N chunks (0: only on SIGTERM/SIGUSR1)", 0, 0, 1LL << 40},
    {"resume", 0, MOECAL_OPT_FLAG, "0", NULL, NULL,
     "continue from the newest valid checkpoint beside the output, if any", 0, 0, 0},
    {"demo-dir", 0, MOECAL_OPT_STRING, NULL, NULL, "DIR",
     "where to write the demo model when --model is not given (default: a temporary dir)",
     0, 0, 0},
    MOECAL_OPTS_VERBOSITY,
    MOECAL_OPT_END
};

#endif
