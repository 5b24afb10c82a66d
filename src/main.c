/* main.c - the moecal program: one binary, several subcommands. */
#include "config.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "commands.h"
#include "runtime.h"

typedef struct command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
    const moecal_optdef *options;
} command;

static const command commands[] = {
    {"calibrate", moecal_cmd_calibrate, "calibrate expert amax over MPI (the main job)",
     moecal_calibrate_options},
    {"synth", moecal_cmd_synth, "write a synthetic DeepSeek-V3-style checkpoint and activations",
     moecal_synth_options},
    {"inspect", moecal_cmd_inspect, "describe a checkpoint, activation or amax file",
     moecal_inspect_options},
    {"topo", moecal_cmd_topo, "show where each rank runs: host, cores, NUMA node, GPU",
     moecal_topo_options},
    {"compare", moecal_cmd_compare, "compare two amax files", moecal_compare_options},
    {"report", moecal_cmd_report, "routing and convergence statistics of an amax file",
     moecal_report_options},
    {"export", moecal_cmd_export, "write an NVFP4 checkpoint from a checkpoint and its amax file",
     moecal_export_options},
    {NULL, NULL, NULL, NULL}
};

/* `moecal --man-options` (the build writes it into the man page): every
 * command's options as groff, from the tables --help prints, calibrate's
 * with the backends' settings.  No MPI. */
static int man_options(void)
{
    for (const command *c = commands; c->name; c++) {
        moecal_optdef *all = strcmp(c->name, "calibrate") == 0
                                 ? moecal_backend_add_options(c->options) : NULL;
        moecal_opts_man(c->name, all ? all : c->options, stdout);
        free(all);
    }
    return fflush(stdout) == 0 && !ferror(stdout) ? 0 : 1;
}

static void usage(FILE *fp)
{
    fprintf(fp, "Usage: moecal COMMAND [OPTION]...\n"
                "Calibrate the quantization amax of Mixture-of-Experts experts with MPI.\n\n"
                "Commands:\n");
    for (const command *c = commands; c->name; c++)
        fprintf(fp, "  %-10s %s\n", c->name, c->summary);
    fprintf(fp, "\nRun 'moecal COMMAND --help' for the options of a command.\n"
                "Options: --help, --version.  See moecal(1).\n");
}

static void version(void)
{
    char lib[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    char *nl;

    printf("moecal %s\n", PACKAGE_VERSION);
    printf("build: %s\n", MOECAL_BUILD_OPTIONS);
    /* Allowed before MPI_Init. */
    if (MPI_Get_library_version(lib, &len) == MPI_SUCCESS) {
        nl = strchr(lib, '\n');
        if (nl)
            *nl = '\0';
        printf("MPI library: %s\n", lib);
    }
}

int main(int argc, char **argv)
{
    const command *cmd = NULL;
    int rc;

    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "--man-options") == 0)
        return man_options();
    if (strcmp(argv[1], "--version") == 0 || strcmp(argv[1], "-V") == 0) {
        version();
        return 0;
    }
    for (const command *c = commands; c->name; c++)
        if (strcmp(argv[1], c->name) == 0)
            cmd = c;
    if (!cmd) {
        fprintf(stderr, "moecal: error: unknown command '%s' (commands: calibrate, synth, "
                        "inspect, topo, compare, report, export; see 'moecal --help')\n", argv[1]);
        return 2;
    }
    moecal_runtime_init(&argc, &argv);
    rc = cmd->run(argc - 1, argv + 1);
    moecal_runtime_finalize();
    return rc;
}
