/* runtime.c - MPI start/stop, fatal errors and logging; see runtime.h. */
#include "config.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "options.h"
#include "runtime.h"

static int world_rank = 0;
static int world_size = 1;
static char host[256] = "localhost";
static int verbosity0 = MOECAL_LOG_INFO;    /* rank 0 */
static int verbosity_all = MOECAL_LOG_QUIET; /* every rank */
static bool mpi_started = false;

void moecal_runtime_init(int *argc, char ***argv)
{
    int provided = 0;
    const char *dbg;

    /* Funneled: only the main thread calls MPI; OpenMP workers never do. */
    if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        fprintf(stderr, "moecal: error: MPI_Init_thread failed\n");
        exit(MOECAL_EXIT_FAILURE);
    }
    mpi_started = true;
    /* Errors come back as return codes so that messages say what failed. */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    if (gethostname(host, sizeof host) != 0)
        snprintf(host, sizeof host, "unknown");
    host[sizeof host - 1] = '\0';
    dbg = getenv("MOECAL_DEBUG");
    if (dbg && *dbg && strcmp(dbg, "0") != 0) {
        verbosity0 = MOECAL_LOG_DEBUG;
        verbosity_all = MOECAL_LOG_DEBUG;
    }
}

void moecal_runtime_finalize(void)
{
    if (mpi_started) {
        MPI_Finalize();
        mpi_started = false;
    }
}

int moecal_world_rank(void) { return world_rank; }
int moecal_world_size(void) { return world_size; }
const char *moecal_hostname(void) { return host; }

static void print_error(moecal_status s)
{
    fprintf(stderr, "moecal: error: rank %d (%s): %s\n", world_rank, host,
            moecal_error_message());
    (void)s;
    fflush(stderr);
}

_Noreturn void moecal_fatal(moecal_status s)
{
    int code = moecal_status_exit_code(s);

    if (code == 0)
        code = MOECAL_EXIT_FAILURE;
    if (s != MOECAL_ERR_PEER)
        print_error(s);
    if (mpi_started && world_size > 1)
        MPI_Abort(MPI_COMM_WORLD, code);
    moecal_runtime_finalize();
    exit(code);
}

_Noreturn void moecal_fatal_all(moecal_status s)
{
    int code = moecal_status_exit_code(s);

    if (code == 0)
        code = MOECAL_EXIT_FAILURE;
    if (world_rank == 0)
        print_error(s);
    moecal_runtime_finalize();
    exit(code);
}

void moecal_check_all(moecal_status local)
{
    /* {failed?, exit code} reduced with MAX, and the lowest failed rank with
     * MIN: when every rank failed (the same deterministic error, as a bad
     * input found by all), only that rank prints; otherwise each failed rank
     * prints its own message. */
    int mine[3], red[3];

    if (!mpi_started || world_size == 1) {
        if (local != MOECAL_OK)
            moecal_fatal(local);
        return;
    }
    mine[0] = local != MOECAL_OK;
    mine[1] = local != MOECAL_OK ? moecal_status_exit_code(local) : 0;
    mine[2] = local != MOECAL_OK && local != MOECAL_ERR_PEER ? 1 : 0;
    if (MPI_Allreduce(mine, red, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD) != MPI_SUCCESS ||
        MPI_Allreduce(&mine[2], &red[2], 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD) != MPI_SUCCESS) {
        if (local == MOECAL_OK)
            moecal_error_set(MOECAL_ERR_MPI, "MPI_Allreduce of the error state failed");
        moecal_fatal(local != MOECAL_OK ? local : MOECAL_ERR_MPI);
    }
    if (red[0] == 0)
        return;
    if (mine[2]) {
        int first = world_rank, lowest;
        if (red[2] < world_size) {
            print_error(local);
        } else {
            MPI_Allreduce(&first, &lowest, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
            if (lowest == world_rank)
                print_error(local);
        }
    }
    moecal_runtime_finalize();
    exit(red[1] ? red[1] : MOECAL_EXIT_FAILURE);
}

void moecal_opts_agree(const moecal_opts *o)
{
    moecal_status s = MOECAL_OK;
    size_t len = 0;
    char *ser = NULL;
    int n = 0;

    if (!mpi_started || world_size == 1)
        return;
    if (world_rank == 0) {
        ser = moecal_opts_serialize(o, &len);
        n = ser && len < (size_t)1 << 30 ? (int)len : -1;
    }
    if (MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD) != MPI_SUCCESS)
        moecal_fatal(moecal_error_set(MOECAL_ERR_MPI, "MPI_Bcast of the settings failed"));
    if (n < 0) {
        free(ser);
        moecal_check_all(moecal_error_set(MOECAL_ERR_NOMEM, "out of memory for the settings"));
        return;
    }
    if (world_rank != 0 && !(ser = malloc((size_t)n + 1)))
        moecal_fatal(moecal_error_set(MOECAL_ERR_NOMEM, "out of memory for the settings"));
    if (MPI_Bcast(ser, n, MPI_CHAR, 0, MPI_COMM_WORLD) != MPI_SUCCESS)
        moecal_fatal(moecal_error_set(MOECAL_ERR_MPI, "MPI_Bcast of the settings failed"));
    if (world_rank != 0)
        s = moecal_opts_compare(o, ser, (size_t)n, "rank 0");
    free(ser);
    moecal_check_all(s);
}

moecal_opts *moecal_cmd_begin(const char *cmd, const moecal_optdef *defs, const char *pos_usage,
                              const char *summary, int npos,
                              void (*extra)(const void *args, FILE *), void *args, int argc,
                              char **argv)
{
    moecal_opts *o = NULL;
    moecal_status s = moecal_opts_parse(cmd, defs, pos_usage, argc, argv, &o);

    /* collective: a conf file or environment that only some ranks find
     * wrong must stop every rank, each failed one saying why */
    moecal_check_all(s);
    if (moecal_opts_help(o)) {
        if (world_rank == 0)
            moecal_opts_usage(cmd, defs, pos_usage, summary, stdout);
        moecal_opts_free(o);
        return NULL;
    }
    /* an environment that differs between nodes must not split the job;
     * --print-config then shows what every rank will use */
    moecal_opts_agree(o);
    if (args)
        moecal_check_all(moecal_opts_bind(o, defs, args));
    if (moecal_opts_print_config(o)) {
        if (world_rank == 0) {
            moecal_opts_dump(o, stdout);
            if (extra)
                extra(args, stdout);
        }
        moecal_opts_free(o);
        return NULL;
    }
    if (moecal_opts_npos(o) != npos) {
        if (npos == 0)
            moecal_error_set(MOECAL_ERR_USAGE, "unexpected argument '%s' (%s takes options "
                             "only; see 'moecal %s --help')", moecal_opts_pos(o, 0), cmd, cmd);
        else
            moecal_error_set(MOECAL_ERR_USAGE, "'moecal %s' takes %s (got %d argument%s; see "
                             "'moecal %s --help')", cmd, pos_usage, moecal_opts_npos(o),
                             moecal_opts_npos(o) == 1 ? "" : "s", cmd);
        moecal_opts_free(o);
        moecal_fatal_all(MOECAL_ERR_USAGE);
    }
    return o;
}

moecal_status moecal_mpi_error(int rc, const char *what)
{
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;

    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS)
        snprintf(msg, sizeof msg, "MPI error code %d", rc);
    return moecal_error_set(MOECAL_ERR_MPI, "%s failed: %s", what, msg);
}

void moecal_set_verbosity_from(const moecal_verbosity_args *v)
{
    moecal_set_verbosity(v->quiet ? MOECAL_LOG_QUIET : (int)v->verbose, (int)v->verbose_ranks);
}

void moecal_set_verbosity(int rank0_level, int all_level)
{
    if (verbosity0 < MOECAL_LOG_DEBUG)
        verbosity0 = rank0_level;
    if (verbosity_all < MOECAL_LOG_DEBUG)
        verbosity_all = all_level;
}

int moecal_verbosity(void)
{
    return world_rank == 0 ? verbosity0 : verbosity_all;
}

void moecal_log(int level, const char *fmt, ...)
{
    va_list ap;

    if (world_rank != 0 || level > verbosity0)
        return;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

void moecal_log_all(int level, const char *fmt, ...)
{
    char buf[2048];
    va_list ap;

    if (level > verbosity_all)
        return;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "[rank %d %s] %s\n", world_rank, host, buf);
}

void moecal_warn(const char *fmt, ...)
{
    char buf[2048];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "moecal: warning: rank %d (%s): %s\n", world_rank, host, buf);
}

static volatile sig_atomic_t pending_signal = 0;

static void on_signal(int sig)
{
    pending_signal = sig;
}

void moecal_signals_install(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
}

int moecal_signal_pending(void)
{
    return pending_signal;
}
