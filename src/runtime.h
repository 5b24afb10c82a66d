/* runtime.h - process-wide services: MPI start/stop, fatal errors, logging.
 *
 * Two axes of verbosity: what rank 0 prints (moecal_log) and what every rank
 * prints (moecal_log_all), set separately.  MOECAL_DEBUG=1 in the environment
 * turns on debug traces on every rank.
 */
#ifndef MOECAL_RUNTIME_H
#define MOECAL_RUNTIME_H

#include <mpi.h>
#include <stdbool.h>

#include "error.h"
#include "util.h" /* moecal_now */

#ifdef __cplusplus
extern "C" {
#endif

enum { MOECAL_LOG_QUIET = 0, MOECAL_LOG_INFO = 1, MOECAL_LOG_VERBOSE = 2, MOECAL_LOG_DEBUG = 3 };

void moecal_runtime_init(int *argc, char ***argv);
void moecal_runtime_finalize(void);

int moecal_world_rank(void);
int moecal_world_size(void);
const char *moecal_hostname(void);

/* This rank failed: print "moecal: error: rank R (host): <message>" and bring
 * every rank down (MPI_Abort with the status's exit code). */
_Noreturn void moecal_fatal(moecal_status s);
/* Every rank reached the same error (a bad option, found identically by all
 * ranks): rank 0 prints it, every rank finalizes MPI and exits. */
_Noreturn void moecal_fatal_all(moecal_status s);
/* Collective over MPI_COMM_WORLD: if any rank's status is not OK, the failed
 * ranks print their messages and every rank exits with the first failed
 * rank's exit code, without MPI_Abort.  Returns only when all ranks are OK. */
void moecal_check_all(moecal_status local);

/* Collective over MPI_COMM_WORLD: every rank resolved the same settings
 * (rank 0's are the reference); if not, the ranks that differ name the
 * option and every rank exits with status 2. */
struct moecal_opts;
void moecal_opts_agree(const struct moecal_opts *o);

/* The start of every command: parse argv against defs and store the values
 * of its bound options (MOECAL_AT) in args; --help (rank 0 prints the
 * usage) and --print-config (rank 0 prints the settings, then
 * extra(args, stdout) when extra is not NULL) end the command: NULL is
 * returned and the command returns 0.  Otherwise the number of positional
 * arguments must be npos (pos_usage names them; NULL and 0 for commands
 * that take options only) and every rank must have resolved the same
 * settings; a usage error ends every rank with status 2. */
struct moecal_optdef;
struct moecal_opts *moecal_cmd_begin(const char *cmd, const struct moecal_optdef *defs,
                                     const char *pos_usage, const char *summary, int npos,
                                     void (*extra)(const void *args, FILE *), void *args,
                                     int argc, char **argv);

void moecal_set_verbosity(int rank0_level, int all_level);
/* From the options of MOECAL_OPTS_VERBOSITY (options.h). */
struct moecal_verbosity_args;
void moecal_set_verbosity_from(const struct moecal_verbosity_args *v);
int moecal_verbosity(void);
void moecal_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void moecal_log_all(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Warnings are printed by the rank that has them, whatever the verbosity. */
void moecal_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));


/* SIGTERM and SIGUSR1 set a flag (the job checkpoints and exits with
 * MOECAL_EXIT_REQUEUE at the next chunk boundary); returns the signal or 0. */
void moecal_signals_install(void);
int moecal_signal_pending(void);

/* MOECAL_ERR_MPI: "<what> failed: <MPI's string for rc>". */
moecal_status moecal_mpi_error(int rc, const char *what);

/* Evaluate an MPI call once; on failure record its error and return
 * MOECAL_ERR_MPI from the calling function ... */
#define MOECAL_MPI_CHECK(call)                                              \
    do {                                                                    \
        int moecal_mpi_rc_ = (call);                                        \
        if (moecal_mpi_rc_ != MPI_SUCCESS)                                  \
            return moecal_mpi_error(moecal_mpi_rc_, #call);                 \
    } while (0)

/* ... or store it in the caller's `s` and go to label. */
#define MOECAL_MPI_GOTO(call, label)                                        \
    do {                                                                    \
        int moecal_mpi_rc_ = (call);                                        \
        if (moecal_mpi_rc_ != MPI_SUCCESS) {                                \
            s = moecal_mpi_error(moecal_mpi_rc_, #call);                    \
            goto label;                                                     \
        }                                                                   \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif
