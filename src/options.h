/* options.h - one option table per subcommand, three sources.
 *
 * Every option of a subcommand is described once (name, type, default, help)
 * and can be given on the command line (--name VALUE, --name=VALUE, -x),
 * through the environment (MOECAL_NAME, dashes as underscores, upper case) or
 * in a conf file (--config FILE, INI: key = value, key spelled as the option
 * or with underscores, in [moecal] or [<subcommand>] sections).  Precedence:
 * command line, environment, conf file, built-in default.  The usage text
 * (--help) and --print-config come from the same table.
 */
#ifndef MOECAL_OPTIONS_H
#define MOECAL_OPTIONS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moecal_opt_type {
    MOECAL_OPT_FLAG,    /* boolean: --x sets true; env/conf: 1/0/true/false/yes/no */
    MOECAL_OPT_INT,     /* signed integer, optional k/M/G suffix (x1024) */
    MOECAL_OPT_FLOAT,
    MOECAL_OPT_STRING,
    MOECAL_OPT_CHOICE   /* one of choices "a|b|c" */
} moecal_opt_type;

enum {
    MOECAL_OPTF_NOENV = 1u << 0,   /* not read from the environment */
    MOECAL_OPTF_NOCONF = 1u << 1   /* not read from a conf file */
};

/* The C type of the field an option's value is stored in (moecal_opts_bind):
 * FLAG in bool, INT in long long, FLOAT in double, STRING and CHOICE in
 * const char * (the parsed text, valid until moecal_opts_free; NULL when
 * unset). */
typedef enum moecal_field_kind {
    MOECAL_FIELD_NONE = 0,  /* not bound: read by name (moecal_opts_str and others) */
    MOECAL_FIELD_BOOL,
    MOECAL_FIELD_LLONG,
    MOECAL_FIELD_DOUBLE,
    MOECAL_FIELD_STR
} moecal_field_kind;

/* The last two members of a table row: the option is stored in field F of
 * the struct T.  A misspelt field fails to compile; a field whose C type does
 * not suit the option's type is refused by moecal_opts_parse. */
#define MOECAL_AT(T, F)                                                                     \
    offsetof(T, F), _Generic(((T *)0)->F, bool: MOECAL_FIELD_BOOL,                          \
                             long long: MOECAL_FIELD_LLONG, double: MOECAL_FIELD_DOUBLE,    \
                             const char *: MOECAL_FIELD_STR)

/* The last two members of a row whose value is read by name
 * (moecal_opts_int and the others) rather than stored in a field. */
#define MOECAL_UNBOUND 0, MOECAL_FIELD_NONE

typedef struct moecal_optdef {
    const char *name;      /* long name: "chunk-tokens" */
    int short_name;        /* 'o' or 0 */
    moecal_opt_type type;
    const char *def;       /* default as text, NULL = unset */
    const char *choices;   /* MOECAL_OPT_CHOICE: "cpu|cuda|auto" */
    const char *metavar;   /* "N", "DIR" */
    const char *help;
    unsigned flags;
    double min, max;       /* MOECAL_OPT_INT and MOECAL_OPT_FLOAT: the allowed range,
                            * when min < max (integers are exact up to 2^53) */
    size_t at;             /* MOECAL_AT: the offset of the field ... */
    moecal_field_kind field;   /* ... and its C type (NONE: not bound) */
} moecal_optdef;

/* --quiet, -v/--verbose and --verbose-ranks, for the commands of long jobs,
 * stored in the member `verbosity` of T (moecal_set_verbosity_from in
 * runtime.h applies them). */
typedef struct moecal_verbosity_args {
    bool quiet;
    long long verbose, verbose_ranks;
} moecal_verbosity_args;

#define MOECAL_OPTS_VERBOSITY(T)                                                            \
    {"quiet", 0, MOECAL_OPT_FLAG, "0", NULL, NULL, "print errors only", 0, 0, 0,            \
     MOECAL_AT(T, verbosity.quiet)},                                                        \
    {"verbose", 'v', MOECAL_OPT_INT, "1", NULL, "LEVEL",                                    \
     "what rank 0 prints: 0 errors, 1 progress, 2 details, 3 debug", 0, 0, 3,               \
     MOECAL_AT(T, verbosity.verbose)},                                                      \
    {"verbose-ranks", 0, MOECAL_OPT_INT, "0", NULL, "LEVEL",                                \
     "what every rank prints (same levels)", 0, 0, 3, MOECAL_AT(T, verbosity.verbose_ranks)}

/* The entry that ends every table. */
#define MOECAL_OPT_END {NULL, 0, MOECAL_OPT_FLAG, NULL, NULL, NULL, NULL, 0, 0, 0, 0, 0}

typedef struct moecal_opts moecal_opts;

/* Parse argv[1..] for subcommand cmd ("calibrate").  The table ends with an
 * entry whose name is NULL.  --help, --config FILE and --print-config are
 * always known.  Errors (unknown option, bad value, unknown conf key,
 * missing conf file) return MOECAL_ERR_USAGE with a message naming the
 * option, or the file, line and key. */
moecal_status moecal_opts_parse(const char *cmd, const moecal_optdef *defs,
                                const char *positional_usage,
                                int argc, char **argv, moecal_opts **out);
void moecal_opts_free(moecal_opts *o);

/* Store the value of every bound option of defs (a table, or the part of
 * one, that o was parsed with) in its field of args.  Strings point into o.
 * MOECAL_ERR_INTERNAL when an option of defs is not in o's table. */
moecal_status moecal_opts_bind(const moecal_opts *o, const moecal_optdef *defs, void *args);

bool moecal_opts_help(const moecal_opts *o);          /* --help given */
bool moecal_opts_print_config(const moecal_opts *o);  /* --print-config given */
bool moecal_opts_isset(const moecal_opts *o, const char *name);
const char *moecal_opts_str(const moecal_opts *o, const char *name); /* NULL if unset */
long long moecal_opts_int(const moecal_opts *o, const char *name);
double moecal_opts_float(const moecal_opts *o, const char *name);
bool moecal_opts_flag(const moecal_opts *o, const char *name);
/* "command line", "environment (MOECAL_X)", "FILE:LINE", "default", "unset" */
const char *moecal_opts_source(const moecal_opts *o, const char *name);
int moecal_opts_npos(const moecal_opts *o);
const char *moecal_opts_pos(const moecal_opts *o, int i);

void moecal_opts_usage(const char *cmd, const moecal_optdef *defs,
                       const char *positional_usage, const char *summary, FILE *fp);
void moecal_opts_dump(const moecal_opts *o, FILE *fp);   /* --print-config */
/* The table as a groff section of the man page (.SS "moecal CMD", .TP per
 * option): what --help says, for `moecal --man-options`. */
void moecal_opts_man(const char *cmd, const moecal_optdef *defs, FILE *fp);

/* The effective values as one buffer ("name\0value\0" per option, unset
 * as "\1"), to compare what ranks resolved; free() it. */
char *moecal_opts_serialize(const moecal_opts *o, size_t *len);
/* MOECAL_OK when ser (another rank's serialization) holds the same values;
 * else MOECAL_ERR_USAGE naming the first option that differs, this rank's
 * value and source and the other's value (who names the other rank). */
moecal_status moecal_opts_compare(const moecal_opts *o, const char *ser, size_t len,
                                  const char *who);

#ifdef __cplusplus
}
#endif
#endif
