/* commands.h - the subcommands of the moecal program. */
#ifndef MOECAL_COMMANDS_H
#define MOECAL_COMMANDS_H

#include "options.h"

/* Each returns the process exit code; MPI is initialised by main. */
int moecal_cmd_calibrate(int argc, char **argv);
int moecal_cmd_synth(int argc, char **argv);
int moecal_cmd_inspect(int argc, char **argv);
int moecal_cmd_topo(int argc, char **argv);
int moecal_cmd_compare(int argc, char **argv);
int moecal_cmd_report(int argc, char **argv);
int moecal_cmd_export(int argc, char **argv);

/* Their option tables (ended by MOECAL_OPT_END; calibrate's without the
 * backends' settings, which moecal_backend_add_options appends), from which
 * --help, --print-config and the man page's option lists are made. */
extern const moecal_optdef moecal_calibrate_options[], moecal_synth_options[],
    moecal_inspect_options[], moecal_topo_options[], moecal_compare_options[],
    moecal_report_options[], moecal_export_options[];

#endif
