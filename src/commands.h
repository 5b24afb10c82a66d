/* commands.h - the subcommands of the moecal program. */
#ifndef MOECAL_COMMANDS_H
#define MOECAL_COMMANDS_H

/* Each returns the process exit code; MPI is initialised by main. */
int moecal_cmd_calibrate(int argc, char **argv);
int moecal_cmd_synth(int argc, char **argv);
int moecal_cmd_inspect(int argc, char **argv);
int moecal_cmd_topo(int argc, char **argv);
int moecal_cmd_compare(int argc, char **argv);
int moecal_cmd_report(int argc, char **argv);
int moecal_cmd_export(int argc, char **argv);

#endif
