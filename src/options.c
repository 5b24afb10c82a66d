/* options.c - command line, environment and conf-file options; see options.h. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "options.h"
#include "util.h"

/* Subcommands whose sections a conf file may hold. */
static const char *const known_sections[] = {
    "calibrate", "synth", "inspect", "topo", "compare", "report", "export", NULL
};

typedef enum { SRC_UNSET = 0, SRC_DEFAULT, SRC_FILE, SRC_ENV, SRC_CLI } opt_source;

typedef struct opt_value {
    char *text;          /* NULL when unset */
    opt_source source;
    char where[512];     /* "FILE:LINE" or "environment (MOECAL_X)" */
} opt_value;

struct moecal_opts {
    const char *cmd;
    const moecal_optdef *defs;
    int ndefs;
    opt_value *val;
    bool help, print_config;
    char *config_path;
    int npos;
    char **pos;
};

static int find_def(const moecal_optdef *defs, int n, const char *name, size_t len)
{
    for (int i = 0; i < n; i++) {
        const char *d = defs[i].name;
        size_t j;
        if (strlen(d) != len)
            continue;
        /* '-' and '_' are the same in option names (conf keys use either). */
        for (j = 0; j < len; j++) {
            char a = d[j] == '_' ? '-' : d[j];
            char b = name[j] == '_' ? '-' : name[j];
            if (a != b)
                break;
        }
        if (j == len)
            return i;
    }
    return -1;
}

static int find_short(const moecal_optdef *defs, int n, int c)
{
    for (int i = 0; i < n; i++)
        if (defs[i].short_name == c)
            return i;
    return -1;
}

static void env_name(const char *opt, char *buf, size_t len)
{
    size_t j = snprintf(buf, len, "MOECAL_");
    for (const char *p = opt; *p && j + 1 < len; p++)
        buf[j++] = *p == '-' ? '_' : (char)toupper((unsigned char)*p);
    buf[j] = '\0';
}

static int parse_bool(const char *s, bool *out)
{
    static const char *const t[] = {"1", "true", "yes", "on", NULL};
    static const char *const f[] = {"0", "false", "no", "off", NULL};
    for (int i = 0; t[i]; i++)
        if (strcasecmp(s, t[i]) == 0)
            return *out = true, 0;
    for (int i = 0; f[i]; i++)
        if (strcasecmp(s, f[i]) == 0)
            return *out = false, 0;
    return -1;
}

static int parse_int(const char *s, long long *out)
{
    char *end;
    long long v, mul = 1;

    errno = 0;
    v = strtoll(s, &end, 0);
    if (end == s || errno)
        return -1;
    switch (*end) {
    case 'k': case 'K': mul = 1024LL; end++; break;
    case 'm': case 'M': mul = 1024LL * 1024; end++; break;
    case 'g': case 'G': mul = 1024LL * 1024 * 1024; end++; break;
    case 't': case 'T': mul = 1024LL * 1024 * 1024 * 1024; end++; break;
    default: break;
    }
    if (*end != '\0')
        return -1;
    if (__builtin_mul_overflow(v, mul, out))
        return -1;
    return 0;
}

static bool choice_ok(const char *choices, const char *v)
{
    size_t n = strlen(v);
    const char *p = choices;

    while (p && *p) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && strncmp(p, v, n) == 0)
            return true;
        p = bar ? bar + 1 : NULL;
    }
    return false;
}

/* Check a value against its definition; where says where it came from. */
static moecal_status validate(const moecal_optdef *d, const char *v, const char *where)
{
    long long i;
    double x;
    bool b;
    char *end;

    switch (d->type) {
    case MOECAL_OPT_FLAG:
        if (parse_bool(v, &b) != 0)
            return moecal_error_set(MOECAL_ERR_USAGE,
                                    "%s: option '%s' takes a boolean (1/0, true/false, "
                                    "yes/no, on/off), not '%s'", where, d->name, v);
        break;
    case MOECAL_OPT_INT:
        if (parse_int(v, &i) != 0)
            return moecal_error_set(MOECAL_ERR_USAGE,
                                    "%s: option '%s' takes an integer (k/M/G suffixes "
                                    "allowed), not '%s'", where, d->name, v);
        if (d->min < d->max && ((double)i < d->min || (double)i > d->max))
            return moecal_error_set(MOECAL_ERR_USAGE,
                                    "%s: option '%s' is %lld but must be between %.0f "
                                    "and %.0f", where, d->name, i, d->min, d->max);
        break;
    case MOECAL_OPT_FLOAT:
        errno = 0;
        x = strtod(v, &end);
        if (end == v || *end != '\0' || errno || x != x)
            return moecal_error_set(MOECAL_ERR_USAGE,
                                    "%s: option '%s' takes a number, not '%s'", where,
                                    d->name, v);
        if (d->min < d->max && (x < d->min || x > d->max))
            return moecal_error_set(MOECAL_ERR_USAGE,
                                    "%s: option '%s' is %g but must be between %g and %g",
                                    where, d->name, x, d->min, d->max);
        break;
    case MOECAL_OPT_CHOICE:
        if (!choice_ok(d->choices, v))
            return moecal_error_set(MOECAL_ERR_USAGE,
                                    "%s: option '%s' must be one of %s, not '%s'", where,
                                    d->name, d->choices, v);
        break;
    case MOECAL_OPT_STRING:
        break;
    }
    return MOECAL_OK;
}

static moecal_status set_value(moecal_opts *o, int idx, const char *v, opt_source src,
                               const char *where)
{
    opt_value *ov = &o->val[idx];
    char *copy;

    MOECAL_TRY(validate(&o->defs[idx], v, where));
    /* A lower-precedence source never overrides a higher one. */
    if (ov->source > src)
        return MOECAL_OK;
    copy = strdup(v);
    if (!copy)
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory parsing options");
    free(ov->text);
    ov->text = copy;
    ov->source = src;
    snprintf(ov->where, sizeof ov->where, "%s", where);
    return MOECAL_OK;
}

/* ---------------------------------------------------------------- conf file */

typedef struct conf_ctx {
    moecal_opts *o;
    const char *path;
    int line;            /* line being parsed */
} conf_ctx;

/* One "key = value" of section (empty before any section). */
static moecal_status conf_entry(conf_ctx *c, const char *section, const char *name,
                                const char *value)
{
    moecal_opts *o = c->o;
    char where[4200];
    int idx;
    bool known = false;

    if (section[0] != '\0' && strcmp(section, o->cmd) != 0) {
        for (int i = 0; known_sections[i]; i++)
            known = known || strcmp(section, known_sections[i]) == 0;
        if (!known)
            return moecal_error_set(MOECAL_ERR_USAGE,
                                    "%s:%d: unknown section [%s] (sections are named after "
                                    "subcommands: [calibrate], [synth], ...)",
                                    c->path, c->line, section);
        return MOECAL_OK; /* another subcommand's settings */
    }
    idx = find_def(o->defs, o->ndefs, name, strlen(name));
    if (idx < 0 || (o->defs[idx].flags & MOECAL_OPTF_NOCONF))
        return moecal_error_set(MOECAL_ERR_USAGE,
                                "%s:%d: unknown key '%s' for 'moecal %s' (see 'moecal %s "
                                "--help')", c->path, c->line, name, o->cmd, o->cmd);
    snprintf(where, sizeof where, "%s:%d", c->path, c->line);
    return set_value(o, idx, value, SRC_FILE, where);
}

static char *trim(char *a)
{
    char *e;
    while (isspace((unsigned char)*a))
        a++;
    e = a + strlen(a);
    while (e > a && isspace((unsigned char)e[-1]))
        *--e = '\0';
    return a;
}

/* The INI files moecal reads: "[section]", "key = value" (or "key: value"),
 * comment lines starting with ';' or '#', inline comments after " ;".
 * Lines of any length (HPC paths are long).  The file must be a regular
 * file (a FIFO or a device would block or never end) of at most 1 MB. */
static moecal_status read_conf(moecal_opts *o, const char *path)
{
    conf_ctx c = {.o = o, .path = path, .line = 0};
    char section[256] = "", *buf = NULL;
    size_t cap = 0;
    ssize_t n;
    moecal_status st = MOECAL_OK;
    struct stat sb;
    int fd;
    FILE *fp;

    /* a bad conf file is a usage error (exit 2), whatever its kind */
    if ((st = moecal_open_regular(path, "the conf file", &fd)) != MOECAL_OK) {
        if (st == MOECAL_ERR_FORMAT) /* a FIFO, a device, a directory */
            return moecal_error_set(MOECAL_ERR_USAGE, "%s", moecal_error_message());
        return moecal_error_set(MOECAL_ERR_USAGE, "%s: cannot open conf file: %s", path,
                                strerror(errno));
    }
    if (fstat(fd, &sb) != 0) {
        st = moecal_error_set(MOECAL_ERR_USAGE, "%s: cannot stat conf file: %s", path,
                              strerror(errno));
    } else if (sb.st_size > (1 << 20)) {
        st = moecal_error_set(MOECAL_ERR_USAGE, "%s: conf file of %lld bytes (at most 1 MB)",
                              path, (long long)sb.st_size);
    }
    if (st != MOECAL_OK) {
        close(fd);
        return st;
    }
    if (!(fp = fdopen(fd, "r"))) {
        close(fd);
        return moecal_error_set(MOECAL_ERR_USAGE, "%s: cannot read conf file: %s", path,
                                strerror(errno));
    }
    while (st == MOECAL_OK && (n = getline(&buf, &cap, fp)) >= 0) {
        char *l = buf, *eq, *sc;
        c.line++;
        if ((size_t)n != strlen(buf)) {
            st = moecal_error_set(MOECAL_ERR_USAGE, "%s:%d: a NUL byte (not a text file?)",
                                  path, c.line);
            break;
        }
        if (c.line == 1 && strncmp(l, "\xEF\xBB\xBF", 3) == 0)
            l += 3; /* UTF-8 byte order mark */
        l = trim(l);
        if (*l == '\0' || *l == ';' || *l == '#')
            continue;
        /* inline comment: ';' after whitespace */
        for (sc = l + 1; *sc; sc++)
            if (*sc == ';' && isspace((unsigned char)sc[-1])) {
                *sc = '\0';
                break;
            }
        l = trim(l);
        if (*l == '[') {
            char *close = strchr(l, ']');
            if (!close || trim(close + 1)[0] != '\0') {
                st = moecal_error_set(MOECAL_ERR_USAGE, "%s:%d: syntax error (a section is "
                                      "'[name]')", path, c.line);
                break;
            }
            *close = '\0';
            snprintf(section, sizeof section, "%s", trim(l + 1));
            continue;
        }
        eq = l + strcspn(l, "=:");
        if (*eq == '\0' || eq == l) {
            st = moecal_error_set(MOECAL_ERR_USAGE, "%s:%d: syntax error (expected 'key = "
                                  "value' or '[section]')", path, c.line);
            break;
        }
        *eq = '\0';
        st = conf_entry(&c, section, trim(l), trim(eq + 1));
    }
    if (st == MOECAL_OK && ferror(fp))
        st = moecal_error_set(MOECAL_ERR_USAGE, "%s: read error: %s", path, strerror(errno));
    free(buf);
    fclose(fp);
    return st;
}

/* ---------------------------------------------------------------- parsing */

static moecal_status add_pos(moecal_opts *o, const char *a)
{
    char **p = realloc(o->pos, (size_t)(o->npos + 1) * sizeof *p);
    if (!p)
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory parsing options");
    o->pos = p;
    o->pos[o->npos] = strdup(a);
    if (!o->pos[o->npos])
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory parsing options");
    o->npos++;
    return MOECAL_OK;
}

static moecal_status parse_cli(moecal_opts *o, int argc, char **argv)
{
    bool only_pos = false;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = NULL;
        char where[64];
        int idx;

        if (only_pos || a[0] != '-' || a[1] == '\0') {
            MOECAL_TRY(add_pos(o, a));
            continue;
        }
        if (strcmp(a, "--") == 0) {
            only_pos = true;
            continue;
        }
        if (a[1] == '-') {
            const char *name = a + 2, *eq = strchr(name, '=');
            size_t len = eq ? (size_t)(eq - name) : strlen(name);
            bool negated = false;

            if (len == 4 && strncmp(name, "help", 4) == 0) {
                o->help = true;
                continue;
            }
            if (len == 12 && strncmp(name, "print-config", 12) == 0) {
                o->print_config = true;
                continue;
            }
            if (len == 6 && strncmp(name, "config", 6) == 0) {
                const char *p = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
                if (!p)
                    return moecal_error_set(MOECAL_ERR_USAGE, "option '--config' needs a FILE");
                free(o->config_path);
                o->config_path = strdup(p);
                continue;
            }
            idx = find_def(o->defs, o->ndefs, name, len);
            if (idx < 0 && len > 3 && strncmp(name, "no-", 3) == 0) {
                idx = find_def(o->defs, o->ndefs, name + 3, len - 3);
                if (idx >= 0 && o->defs[idx].type != MOECAL_OPT_FLAG)
                    idx = -1;
                negated = idx >= 0;
            }
            if (idx < 0)
                return moecal_error_set(MOECAL_ERR_USAGE,
                                        "unknown option '--%.*s' for 'moecal %s' (see 'moecal "
                                        "%s --help')", (int)len, name, o->cmd, o->cmd);
            if (o->defs[idx].type == MOECAL_OPT_FLAG) {
                val = eq ? eq + 1 : (negated ? "0" : "1");
                if (negated && eq)
                    return moecal_error_set(MOECAL_ERR_USAGE,
                                            "option '--%.*s' takes no value", (int)len, name);
            } else if (eq) {
                val = eq + 1;
            } else if (i + 1 < argc) {
                val = argv[++i];
            } else {
                return moecal_error_set(MOECAL_ERR_USAGE, "option '--%s' needs a value (%s)",
                                        o->defs[idx].name,
                                        o->defs[idx].metavar ? o->defs[idx].metavar : "VALUE");
            }
        } else {
            if (a[1] == 'h' && a[2] == '\0') {
                o->help = true;
                continue;
            }
            idx = find_short(o->defs, o->ndefs, (unsigned char)a[1]);
            if (idx < 0)
                return moecal_error_set(MOECAL_ERR_USAGE,
                                        "unknown option '-%c' for 'moecal %s' (see 'moecal %s "
                                        "--help')", a[1], o->cmd, o->cmd);
            if (o->defs[idx].type == MOECAL_OPT_FLAG) {
                if (a[2] != '\0')
                    return moecal_error_set(MOECAL_ERR_USAGE, "option '-%c' takes no value",
                                            a[1]);
                val = "1";
            } else if (a[2] != '\0') {
                val = a + 2;
            } else if (i + 1 < argc) {
                val = argv[++i];
            } else {
                return moecal_error_set(MOECAL_ERR_USAGE, "option '-%c' needs a value (%s)",
                                        a[1],
                                        o->defs[idx].metavar ? o->defs[idx].metavar : "VALUE");
            }
        }
        snprintf(where, sizeof where, "command line");
        MOECAL_TRY(set_value(o, idx, val, SRC_CLI, where));
    }
    return MOECAL_OK;
}

/* The C type a value of this option type is stored in. */
static moecal_field_kind field_kind(moecal_opt_type t)
{
    switch (t) {
    case MOECAL_OPT_FLAG: return MOECAL_FIELD_BOOL;
    case MOECAL_OPT_INT: return MOECAL_FIELD_LLONG;
    case MOECAL_OPT_FLOAT: return MOECAL_FIELD_DOUBLE;
    default: return MOECAL_FIELD_STR;
    }
}

moecal_status moecal_opts_parse(const char *cmd, const moecal_optdef *defs,
                                const char *positional_usage, int argc, char **argv,
                                moecal_opts **out)
{
    moecal_opts *o = calloc(1, sizeof *o);
    moecal_status s;
    const char *cfg;

    (void)positional_usage;
    *out = NULL;
    if (!o)
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory parsing options");
    o->cmd = cmd;
    o->defs = defs;
    for (; defs[o->ndefs].name; o->ndefs++) {
        const moecal_optdef *d = &defs[o->ndefs];
        if (d->field != MOECAL_FIELD_NONE && d->field != field_kind(d->type)) {
            moecal_opts_free(o);
            return moecal_error_set(MOECAL_ERR_INTERNAL, "option --%s of '%s' is stored in a "
                                    "field of the wrong C type", d->name, cmd);
        }
    }
    o->val = calloc((size_t)o->ndefs + 1, sizeof *o->val);
    if (!o->val) {
        moecal_opts_free(o);
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory parsing options");
    }
    /* Highest precedence first: later, lower sources fill only what is unset. */
    s = parse_cli(o, argc, argv);
    if (s == MOECAL_OK && !o->help) {
        for (int i = 0; i < o->ndefs && s == MOECAL_OK; i++) {
            char name[128], where[160];
            const char *v;
            if (defs[i].flags & MOECAL_OPTF_NOENV)
                continue;
            env_name(defs[i].name, name, sizeof name);
            v = getenv(name);
            if (!v)
                continue;
            snprintf(where, sizeof where, "environment (%s)", name);
            s = set_value(o, i, v, SRC_ENV, where);
        }
    }
    cfg = o->config_path ? o->config_path : getenv("MOECAL_CONFIG");
    if (s == MOECAL_OK && !o->help && cfg && *cfg)
        s = read_conf(o, cfg);
    for (int i = 0; s == MOECAL_OK && i < o->ndefs; i++) {
        if (defs[i].def && o->val[i].source == SRC_UNSET) {
            s = set_value(o, i, defs[i].def, SRC_DEFAULT, "default");
            if (s != MOECAL_OK)
                moecal_error_prefix("built-in default: ");
        }
    }
    if (s != MOECAL_OK) {
        moecal_opts_free(o);
        return s;
    }
    *out = o;
    return MOECAL_OK;
}

void moecal_opts_free(moecal_opts *o)
{
    if (!o)
        return;
    for (int i = 0; o->val && i < o->ndefs; i++)
        free(o->val[i].text);
    for (int i = 0; i < o->npos; i++)
        free(o->pos[i]);
    free(o->pos);
    free(o->val);
    free(o->config_path);
    free(o);
}

static const opt_value *lookup(const moecal_opts *o, const char *name)
{
    int idx = find_def(o->defs, o->ndefs, name, strlen(name));
    if (idx < 0) {
        /* A name missing from the table is a programming error. */
        fprintf(stderr, "moecal: internal error: option '%s' is not defined for '%s'\n",
                name, o->cmd);
        abort();
    }
    return &o->val[idx];
}

moecal_status moecal_opts_bind(const moecal_opts *o, const moecal_optdef *defs, void *args)
{
    for (const moecal_optdef *d = defs; d->name; d++) {
        int idx = find_def(o->defs, o->ndefs, d->name, strlen(d->name));
        const char *t;
        char *f = (char *)args + d->at;

        if (d->field == MOECAL_FIELD_NONE)
            continue;
        if (idx < 0)
            return moecal_error_set(MOECAL_ERR_INTERNAL, "option --%s is not an option of "
                                    "'%s'", d->name, o->cmd);
        t = o->val[idx].text;
        switch (d->field) {
        case MOECAL_FIELD_BOOL: {
            bool b = false;
            if (t)
                (void)parse_bool(t, &b);
            memcpy(f, &b, sizeof b);
            break;
        }
        case MOECAL_FIELD_LLONG: {
            long long v = 0;
            if (t)
                (void)parse_int(t, &v);
            memcpy(f, &v, sizeof v);
            break;
        }
        case MOECAL_FIELD_DOUBLE: {
            double v = t ? strtod(t, NULL) : 0.0;
            memcpy(f, &v, sizeof v);
            break;
        }
        default:
            memcpy(f, &t, sizeof t);
            break;
        }
    }
    return MOECAL_OK;
}

bool moecal_opts_help(const moecal_opts *o) { return o->help; }
bool moecal_opts_print_config(const moecal_opts *o) { return o->print_config; }
bool moecal_opts_isset(const moecal_opts *o, const char *name) { return lookup(o, name)->text != NULL; }
const char *moecal_opts_str(const moecal_opts *o, const char *name) { return lookup(o, name)->text; }

long long moecal_opts_int(const moecal_opts *o, const char *name)
{
    const char *t = lookup(o, name)->text;
    long long v = 0;
    if (t)
        (void)parse_int(t, &v);
    return v;
}

double moecal_opts_float(const moecal_opts *o, const char *name)
{
    const char *t = lookup(o, name)->text;
    return t ? strtod(t, NULL) : 0.0;
}

bool moecal_opts_flag(const moecal_opts *o, const char *name)
{
    const char *t = lookup(o, name)->text;
    bool b = false;
    if (t)
        (void)parse_bool(t, &b);
    return b;
}

const char *moecal_opts_source(const moecal_opts *o, const char *name)
{
    const opt_value *v = lookup(o, name);
    return v->source == SRC_UNSET ? "unset" : v->where;
}

int moecal_opts_npos(const moecal_opts *o) { return o->npos; }
const char *moecal_opts_pos(const moecal_opts *o, int i) { return i >= 0 && i < o->npos ? o->pos[i] : NULL; }

void moecal_opts_usage(const char *cmd, const moecal_optdef *defs, const char *positional_usage,
                       const char *summary, FILE *fp)
{
    fprintf(fp, "Usage: moecal %s [OPTION]...%s%s\n", cmd, positional_usage ? " " : "",
            positional_usage ? positional_usage : "");
    if (summary)
        fprintf(fp, "%s\n", summary);
    fprintf(fp, "\nOptions (command line > MOECAL_* environment > --config FILE > default):\n");
    for (int i = 0; defs[i].name; i++) {
        const moecal_optdef *d = &defs[i];
        char left[96], env[128];
        const char *mv = d->type == MOECAL_OPT_FLAG ? "" :
                         d->metavar ? d->metavar :
                         d->type == MOECAL_OPT_CHOICE ? d->choices : "VALUE";
        if (d->short_name)
            snprintf(left, sizeof left, "-%c, --%s%s%s", d->short_name, d->name, *mv ? " " : "", mv);
        else
            snprintf(left, sizeof left, "    --%s%s%s", d->name, *mv ? " " : "", mv);
        fprintf(fp, "  %-34s %s", left, d->help ? d->help : "");
        if (d->type == MOECAL_OPT_CHOICE && d->metavar)
            fprintf(fp, " (%s)", d->choices);
        if (d->def)
            fprintf(fp, " [default: %s]", d->type == MOECAL_OPT_FLAG ?
                    (strcmp(d->def, "1") == 0 ? "on" : "off") : d->def);
        else if (d->type == MOECAL_OPT_FLAG)
            fprintf(fp, " [default: off]");
        else
            fprintf(fp, " [default: none]");
        if (!(d->flags & MOECAL_OPTF_NOENV)) {
            env_name(d->name, env, sizeof env);
            fprintf(fp, " {%s}", env);
        }
        fputc('\n', fp);
    }
    fprintf(fp, "  %-34s read settings from an INI file (keys in section [%s] or before any "
            "section) {MOECAL_CONFIG}\n", "    --config FILE", cmd);
    fprintf(fp, "  %-34s %s\n", "    --print-config", "print the effective settings and their sources, then exit");
    fprintf(fp, "  %-34s %s\n", "-h, --help", "print this help and exit");
}

/* Text for groff: backslashes doubled as \e, a leading dot or quote
 * protected; dashes in option names are minus signs (\-). */
static void man_text(FILE *fp, const char *t, bool minus)
{
    if (*t == '.' || *t == '\'')
        fputs("\\&", fp);
    for (; *t; t++) {
        if (*t == '\\')
            fputs("\\e", fp);
        else if (*t == '-' && minus)
            fputs("\\-", fp);
        else
            fputc(*t, fp);
    }
}

void moecal_opts_man(const char *cmd, const moecal_optdef *defs, FILE *fp)
{
    fprintf(fp, ".SS \"moecal %s\"\n", cmd);
    for (int i = 0; defs[i].name; i++) {
        const moecal_optdef *d = &defs[i];
        const char *mv = d->type == MOECAL_OPT_FLAG ? "" :
                         d->metavar ? d->metavar :
                         d->type == MOECAL_OPT_CHOICE ? d->choices : "VALUE";
        char env[128];

        fputs(".TP\n", fp);
        if (d->short_name)
            fprintf(fp, "\\fB\\-%c\\fR, ", d->short_name);
        fputs("\\fB\\-\\-", fp);
        man_text(fp, d->name, true);
        fputs("\\fR", fp);
        if (*mv) {
            fputs(" \\fI", fp);
            man_text(fp, mv, false);
            fputs("\\fR", fp);
        }
        fputc('\n', fp);
        man_text(fp, d->help ? d->help : "", false);
        if (d->type == MOECAL_OPT_CHOICE && d->metavar) {
            fputs(" (", fp);
            man_text(fp, d->choices, false);
            fputc(')', fp);
        }
        if (d->def && d->type != MOECAL_OPT_FLAG) {
            fputs("; default ", fp);
            man_text(fp, d->def, false);
        }
        if (!(d->flags & MOECAL_OPTF_NOENV)) {
            env_name(d->name, env, sizeof env);
            fprintf(fp, "; environment \\fB%s\\fR", env);
        }
        if (d->flags & MOECAL_OPTF_NOCONF)
            fputs("; not read from a conf file", fp);
        fputs(".\n", fp);
    }
}

char *moecal_opts_serialize(const moecal_opts *o, size_t *len)
{
    size_t n = 0;
    char *buf, *p;

    for (int i = 0; i < o->ndefs; i++)
        n += strlen(o->defs[i].name) + 1 + (o->val[i].text ? strlen(o->val[i].text) : 1) + 1;
    if (!(buf = malloc(n ? n : 1)))
        return NULL;
    p = buf;
    for (int i = 0; i < o->ndefs; i++) {
        const char *v = o->val[i].text ? o->val[i].text : "\1";
        size_t a = strlen(o->defs[i].name) + 1, b = strlen(v) + 1;
        memcpy(p, o->defs[i].name, a);
        memcpy(p + a, v, b);
        p += a + b;
    }
    *len = n;
    return buf;
}

moecal_status moecal_opts_compare(const moecal_opts *o, const char *ser, size_t len,
                                  const char *who)
{
    size_t off = 0;

    for (int i = 0; i < o->ndefs; i++) {
        const char *name = ser + off, *v;
        size_t a, b;
        if (off >= len || !memchr(ser + off, '\0', len - off))
            break;
        a = strlen(name) + 1;
        if (off + a >= len || !memchr(ser + off + a, '\0', len - off - a))
            break;
        v = ser + off + a;
        b = strlen(v) + 1;
        off += a + b;
        if (strcmp(name, o->defs[i].name) != 0)
            break;
        const char *mine = o->val[i].text ? o->val[i].text : "\1";
        if (strcmp(mine, v) != 0)
            return moecal_error_set(MOECAL_ERR_USAGE,
                                    "option '%s' is '%s' here (%s) but '%s' on %s: every rank "
                                    "must see the same settings (environment, conf file)",
                                    name, o->val[i].text ? o->val[i].text : "unset",
                                    o->val[i].source == SRC_UNSET ? "unset" : o->val[i].where,
                                    v[0] == '\1' ? "unset" : v, who);
    }
    if (off != len)
        return moecal_error_set(MOECAL_ERR_USAGE, "the options differ from %s's (another "
                                "moecal version?)", who);
    return MOECAL_OK;
}

void moecal_opts_dump(const moecal_opts *o, FILE *fp)
{
    fprintf(fp, "# moecal %s: effective settings\n", o->cmd);
    for (int i = 0; i < o->ndefs; i++) {
        const opt_value *v = &o->val[i];
        fprintf(fp, "%-24s = %-24s # %s\n", o->defs[i].name, v->text ? v->text : "",
                v->source == SRC_UNSET ? "unset" : v->where);
    }
}
