/* cmd_analysis.c - `moecal compare` and `moecal report`: post-hoc analysis of
 * amax files.
 *
 * Both are serial tools: rank 0 reads the files and prints, other ranks (when
 * started under mpiexec) only join the final error check.  Input files are
 * read and validated by amaxread.c.
 */
#include "config.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "amaxread.h"
#include "commands.h"
#include "error.h"
#include "options.h"
#include "report.h"
#include "runtime.h"
#include "util.h"


static const char *const proj_name[3] = {"w1", "w2", "w3"};

/* ---------------------------------------------------------------- helpers */

/* "62.5%", never rounding a partial share to 0.0% or 100.0%. */
static void pct_str(long long k, long long n, char *buf, size_t len)
{
    double v = n > 0 ? 100.0 * (double)k / (double)n : 0.0;

    if (k == 0 || n == 0)
        snprintf(buf, len, "0.0%%");
    else if (k == n)
        snprintf(buf, len, "100.0%%");
    else if (v < 0.05)
        snprintf(buf, len, "<0.1%%");
    else if (v > 99.95)
        snprintf(buf, len, ">99.9%%");
    else
        snprintf(buf, len, "%.1f%%", v);
}

static void ratio_str(double r, char *buf, size_t len)
{
    snprintf(buf, len, "%.3gx", r);
}

/* Standard output must reach its reader: a full disk or a closed pipe is an error. */
static moecal_status flush_stdout(void)
{
    if (fflush(stdout) != 0 || ferror(stdout))
        return moecal_error_errno(errno ? errno : EIO, "standard output");
    return MOECAL_OK;
}

/* Building JSON: any failed allocation turns *ok off. */
static void jset(json_t *obj, const char *key, json_t *val, int *ok)
{
    if (!val || json_object_set_new(obj, key, val) != 0)
        *ok = 0;
}

static void jappend(json_t *arr, json_t *val, int *ok)
{
    if (!val || json_array_append_new(arr, val) != 0)
        *ok = 0;
}

static json_t *jlayers(const moecal_amax_data *d, int *ok)
{
    json_t *a = json_array();

    if (!a) {
        *ok = 0;
        return NULL;
    }
    for (int l = 0; l < d->L; l++)
        jappend(a, json_integer(d->layers[l]), ok);
    return a;
}

static moecal_status print_json(json_t *root, int ok)
{
    int rc;

    if (!root || !ok) {
        json_decref(root);
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory building the JSON output");
    }
    rc = json_dumpf(root, stdout, JSON_INDENT(2) | JSON_REAL_PRECISION(9));
    json_decref(root);
    if (rc != 0)
        return moecal_error_errno(errno ? errno : EIO, "standard output");
    fputc('\n', stdout);
    return flush_stdout();
}

/* A serial command: the options in args, then rank 0 runs run(o, args) and
 * every rank ends with its status. */
typedef moecal_status (*serial_fn)(const moecal_opts *o, const void *args);

static int serial_command(const char *cmd, const moecal_optdef *defs, const char *pos_usage,
                          const char *summary, int npos, void *args, serial_fn run, int argc,
                          char **argv)
{
    moecal_opts *o = moecal_cmd_begin(cmd, defs, pos_usage, summary, npos, NULL, args, argc,
                                      argv);
    moecal_status s = MOECAL_OK;

    if (!o)
        return 0;   /* --help or --print-config */
    if (moecal_world_rank() == 0)
        s = run(o, args);
    moecal_opts_free(o);
    moecal_check_all(s);
    return 0;
}

/* ================================================================ compare */

static const char compare_summary[] =
    "Compare two amax files of the same model and layers quantizer by quantizer\n"
    "(layer x expert, per projection w1/w2/w3): how many input and weight amax are\n"
    "identical, larger (A > B) or smaller in A, and the distribution of the ratio\n"
    "A/B over the quantizers where B > 0 (those with B = 0 are counted apart).\n"
    "Typical use: a top-k run (A) against an all-experts run (B).  Serial; runs\n"
    "with or without mpiexec.";

typedef struct compare_args {
    bool json, calibrated;
} compare_args;

const moecal_optdef moecal_compare_options[] = {
    {"json", 0, MOECAL_OPT_FLAG, "0", NULL, NULL, "print the comparison as JSON", 0, 0, 0,
     MOECAL_AT(compare_args, json)},
    {"calibrated", 0, MOECAL_OPT_FLAG, "0", NULL, NULL,
     "compare input_amax_calibrated (before the peer-max sync) instead of input_amax",
     0, 0, 0, MOECAL_AT(compare_args, calibrated)},
    MOECAL_OPT_END
};

typedef struct cmp_stats {
    long long n;            /* quantizers */
    long long identical, larger, smaller;
    long long b_zero;       /* B == 0 (no ratio) */
    long long n_ratio;      /* B > 0 */
    double min, median, p5, p95, max;
} cmp_stats;

/* Compare a[i] with b[i] for projection p of layers [l0, l1). */
static void cmp_compute(const moecal_amax_data *da, const float *a, const float *b, int l0,
                        int l1, int p, double *scratch, cmp_stats *st)
{
    memset(st, 0, sizeof *st);
    for (int l = l0; l < l1; l++) {
        for (int e = 0; e < da->E; e++) {
            size_t i = moecal_amax_idx(da, l, e, p);
            float x = a[i], y = b[i];

            st->n++;
            if (x == y)
                st->identical++;
            else if (x > y)
                st->larger++;
            else
                st->smaller++;
            if (y > 0.0f)
                scratch[st->n_ratio++] = (double)x / (double)y;
            else
                st->b_zero++;
        }
    }
    if (st->n_ratio > 0) {
        size_t n = (size_t)st->n_ratio;

        moecal_sort_doubles(scratch, n);
        st->min = scratch[0];
        st->max = scratch[n - 1];
        st->median = moecal_percentile_sorted(scratch, n, 0.50);
        st->p5 = moecal_percentile_sorted(scratch, n, 0.05);
        st->p95 = moecal_percentile_sorted(scratch, n, 0.95);
    }
}

static json_t *cmp_json(const cmp_stats *st, int *ok)
{
    json_t *o = json_pack("{s:I, s:I, s:I, s:I, s:I}", "n", (json_int_t)st->n,
                          "identical", (json_int_t)st->identical, "larger",
                          (json_int_t)st->larger, "smaller", (json_int_t)st->smaller,
                          "b_zero", (json_int_t)st->b_zero);

    if (!o) {
        *ok = 0;
        return NULL;
    }
    /* a NaN or infinite ratio cannot be packed: the whole JSON fails */
    jset(o, "ratio", st->n_ratio == 0 ? json_null()
                     : json_pack("{s:I, s:f, s:f, s:f, s:f, s:f}", "n",
                                 (json_int_t)st->n_ratio, "min", st->min, "p5", st->p5,
                                 "median", st->median, "p95", st->p95, "max", st->max), ok);
    return o;
}

/* Refuse files of different models or layer sets; the message names both. */
static moecal_status cmp_check(const moecal_amax_data *a, const moecal_amax_data *b)
{
    const char *pa = a->path, *pb = b->path;

    if (strcmp(a->model_type, b->model_type) != 0)
        return moecal_error_set(MOECAL_ERR_MISMATCH, "%s and %s are not from the same model: "
                                "model_type is '%s' in %s but '%s' in %s", pa, pb,
                                a->model_type, pa, b->model_type, pb);
    if (a->hidden_size != b->hidden_size)
        return moecal_error_set(MOECAL_ERR_MISMATCH, "%s and %s are not from the same model: "
                                "hidden_size is %lld in %s but %lld in %s", pa, pb,
                                (long long)a->hidden_size, pa, (long long)b->hidden_size, pb);
    if (a->n_routed_experts != b->n_routed_experts || a->E != b->E)
        return moecal_error_set(MOECAL_ERR_MISMATCH, "%s and %s are not from the same model: "
                                "n_routed_experts is %lld in %s but %lld in %s", pa, pb,
                                (long long)a->n_routed_experts, pa,
                                (long long)b->n_routed_experts, pb);
    if (a->L != b->L || memcmp(a->layers, b->layers, (size_t)a->L * sizeof *a->layers) != 0) {
        char la[256], lb[256];

        moecal_amax_layers_str(a->layers, a->L, la, sizeof la);
        moecal_amax_layers_str(b->layers, b->L, lb, sizeof lb);
        return moecal_error_set(MOECAL_ERR_MISMATCH, "%s and %s cover different MoE layers "
                                "(dataset 'layers'): %s in %s but %s in %s", pa, pb, la, pa, lb,
                                pb);
    }
    return MOECAL_OK;
}

/* One printed row of the comparison table. */
enum { CCOL_LAYER, CCOL_ROW, CCOL_LARGER, CCOL_SMALLER, CCOL_IDENT, CCOL_MEDIAN, CCOL_P5,
       CCOL_P95, CCOL_MAX, CCOL_BZERO, CCOL_N };
typedef struct cmp_row {
    char cell[CCOL_N][40];
} cmp_row;

static void cmp_fill_row(cmp_row *r, const char *layer, const char *row, const cmp_stats *st)
{
    char pct[16];

    snprintf(r->cell[CCOL_LAYER], sizeof r->cell[0], "%s", layer);
    snprintf(r->cell[CCOL_ROW], sizeof r->cell[0], "%s", row);
    pct_str(st->larger, st->n, pct, sizeof pct);
    snprintf(r->cell[CCOL_LARGER], sizeof r->cell[0], "%6s (%lld/%lld)", pct, st->larger, st->n);
    pct_str(st->smaller, st->n, pct, sizeof pct);
    snprintf(r->cell[CCOL_SMALLER], sizeof r->cell[0], "%6s (%lld/%lld)", pct, st->smaller,
             st->n);
    pct_str(st->identical, st->n, pct, sizeof pct);
    snprintf(r->cell[CCOL_IDENT], sizeof r->cell[0], "%6s (%lld/%lld)", pct, st->identical,
             st->n);
    if (st->n_ratio > 0) {
        ratio_str(st->median, r->cell[CCOL_MEDIAN], sizeof r->cell[0]);
        ratio_str(st->p5, r->cell[CCOL_P5], sizeof r->cell[0]);
        ratio_str(st->p95, r->cell[CCOL_P95], sizeof r->cell[0]);
        ratio_str(st->max, r->cell[CCOL_MAX], sizeof r->cell[0]);
    } else {
        for (int c = CCOL_MEDIAN; c <= CCOL_MAX; c++)
            snprintf(r->cell[c], sizeof r->cell[0], "-");
    }
    snprintf(r->cell[CCOL_BZERO], sizeof r->cell[0], "%lld", st->b_zero);
}

static void cmp_print_table(const cmp_row *rows, int n)
{
    static const char *const head[CCOL_N] = {"layer", "amax", "larger (A > B)", "smaller",
                                             "identical", "median", "p5", "p95", "max", "B=0"};
    /* Left-aligned text columns, right-aligned numbers. */
    static const int left[CCOL_N] = {0, 1, 1, 1, 1, 0, 0, 0, 0, 0};
    int w[CCOL_N];

    for (int c = 0; c < CCOL_N; c++) {
        w[c] = (int)strlen(head[c]);
        for (int i = 0; i < n; i++)
            if ((int)strlen(rows[i].cell[c]) > w[c])
                w[c] = (int)strlen(rows[i].cell[c]);
    }
    for (int i = -1; i < n; i++) {
        const char *const *cells;
        const char *line[CCOL_N];

        if (i < 0) {
            cells = head;
        } else {
            for (int c = 0; c < CCOL_N; c++)
                line[c] = rows[i].cell[c];
            cells = line;
        }
        for (int c = 0; c < CCOL_N; c++) {
            const char *sep = c == 0 ? "" : (c == CCOL_MEDIAN ? "   " : "  ");
            if (left[c] && c < CCOL_N - 1)
                printf("%s%-*s", sep, w[c], cells[c]);
            else
                printf("%s%*s", sep, w[c], cells[c]);
        }
        putchar('\n');
        /* A blank line between the all-layers block and each layer. */
        if (i >= 0 && i + 1 < n && i % 6 == 5)
            putchar('\n');
    }
}

static void describe(const char *tag, const moecal_amax_data *d)
{
    printf("#   %s: %s (mode %s, sync %s%s%s%s%s%s%s)\n", tag, d->path, d->mode,
           d->sync[0] ? d->sync : "?", d->router_logits[0] ? ", router logits " : "",
           d->router_logits, d->quant_format[0] ? ", " : "", d->quant_format,
           d->created[0] ? ", created " : "", d->created);
}

static moecal_status compare_run(const moecal_opts *o, const void *opts)
{
    const compare_args *args = opts;
    moecal_amax_data *a = NULL, *b = NULL;
    moecal_status s;
    int calibrated = args->calibrated;
    const char *in_name = calibrated ? "input_amax_calibrated" : "input_amax";
    double *scratch = NULL;
    cmp_stats *st = NULL; /* [L + 1][2][3]: index 0 = all layers */
    cmp_row *rows = NULL;
    int L;
    size_t nst;

    s = moecal_amax_data_read(moecal_opts_pos(o, 0), 0, &a);
    if (s == MOECAL_OK)
        s = moecal_amax_data_read(moecal_opts_pos(o, 1), 0, &b);
    if (s == MOECAL_OK)
        s = cmp_check(a, b);
    if (s != MOECAL_OK)
        goto out;
    L = a->L;
    nst = (size_t)(L + 1) * 6;
    scratch = malloc((size_t)L * (size_t)a->E * sizeof *scratch);
    st = calloc(nst, sizeof *st);
    rows = calloc(nst, sizeof *rows);
    if (!scratch || !st || !rows) {
        s = moecal_error_set(MOECAL_ERR_NOMEM, "out of memory comparing %s and %s", a->path,
                             b->path);
        goto out;
    }
    for (int k = 0; k < 2; k++) {
        const float *ta = k == 0 ? (calibrated ? a->input_amax_calibrated : a->input_amax)
                                 : a->weight_amax;
        const float *tb = k == 0 ? (calibrated ? b->input_amax_calibrated : b->input_amax)
                                 : b->weight_amax;
        for (int p = 0; p < 3; p++) {
            cmp_compute(a, ta, tb, 0, L, p, scratch, &st[k * 3 + p]);
            for (int l = 0; l < L; l++)
                cmp_compute(a, ta, tb, l, l + 1, p, scratch, &st[(size_t)(l + 1) * 6 + k * 3 + p]);
        }
    }

    if (args->json) {
        int ok = 1;
        json_t *root = json_object(), *fa = json_object(), *fb = json_object();
        json_t *all = json_object(), *per = json_array();
        const moecal_amax_data *fs[2] = {a, b};
        json_t *fo[2] = {fa, fb};

        if (!root || !fa || !fb || !all || !per)
            ok = 0;
        for (int i = 0; i < 2 && ok; i++) {
            jset(fo[i], "path", json_string(fs[i]->path), &ok);
            jset(fo[i], "mode", json_string(fs[i]->mode), &ok);
            jset(fo[i], "sync", json_string(fs[i]->sync), &ok);
            jset(fo[i], "router_logits", fs[i]->router_logits[0] ?
                 json_string(fs[i]->router_logits) : json_null(), &ok);
            jset(fo[i], "quant_format", json_string(fs[i]->quant_format), &ok);
            jset(fo[i], "created", json_string(fs[i]->created), &ok);
        }
        if (ok) {
            jset(root, "a", fa, &ok);
            jset(root, "b", fb, &ok);
            fa = fb = NULL;
            jset(root, "model_type", json_string(a->model_type), &ok);
            jset(root, "hidden_size", json_integer(a->hidden_size), &ok);
            jset(root, "n_routed_experts", json_integer(a->E), &ok);
            jset(root, "layers", jlayers(a, &ok), &ok);
            jset(root, "input_dataset", json_string(in_name), &ok);
        }
        for (int l = -1; l < L && ok; l++) {
            json_t *ent = l < 0 ? all : json_object();
            const cmp_stats *base = &st[(size_t)(l + 1) * 6];

            if (!ent) {
                ok = 0;
                break;
            }
            if (l >= 0)
                jset(ent, "layer", json_integer(a->layers[l]), &ok);
            for (int k = 0; k < 2; k++) {
                json_t *kind = json_object();
                if (!kind) {
                    ok = 0;
                    break;
                }
                for (int p = 0; p < 3; p++)
                    jset(kind, proj_name[p], cmp_json(&base[k * 3 + p], &ok), &ok);
                jset(ent, k == 0 ? "input" : "weight", kind, &ok);
            }
            if (l >= 0)
                jappend(per, ent, &ok);
        }
        if (ok) {
            jset(root, "all_layers", all, &ok);
            jset(root, "per_layer", per, &ok);
            all = per = NULL;
        }
        json_decref(fa);
        json_decref(fb);
        json_decref(all);
        json_decref(per);
        s = print_json(root, ok);
        goto out;
    }

    {
        char ls[256];
        int n = 0;

        moecal_amax_layers_str(a->layers, L, ls, sizeof ls);
        printf("# moecal compare\n");
        describe("A", a);
        describe("B", b);
        printf("# model %s, hidden %lld, %d experts, %d MoE layer%s (%s): %lld quantizers per "
               "row\n", a->model_type, (long long)a->hidden_size, a->E, L, L == 1 ? "" : "s",
               ls, (long long)L * a->E);
        printf("# input: %s%s; ratio A/B over quantizers with B > 0 (median, p5, p95, max); "
               "B=0: quantizers where B is 0\n\n", in_name,
               calibrated ? " (before sync)" : "");
        for (int l = -1; l < L; l++) {
            char lab[32];

            if (l < 0)
                snprintf(lab, sizeof lab, "all");
            else
                snprintf(lab, sizeof lab, "%d", a->layers[l]);
            for (int k = 0; k < 2; k++)
                for (int p = 0; p < 3; p++) {
                    char row[32];
                    snprintf(row, sizeof row, "%s %s", proj_name[p], k == 0 ? "input" : "weight");
                    cmp_fill_row(&rows[n], lab, row, &st[(size_t)(l + 1) * 6 + k * 3 + p]);
                    n++;
                }
        }
        cmp_print_table(rows, n);
        s = flush_stdout();
    }
out:
    free(scratch);
    free(st);
    free(rows);
    moecal_amax_data_free(a);
    moecal_amax_data_free(b);
    return s;
}

int moecal_cmd_compare(int argc, char **argv)
{
    compare_args a;

    return serial_command("compare", moecal_compare_options, "A.h5 B.h5", compare_summary, 2, &a,
                          compare_run, argc, argv);
}

/* ================================================================ report */

static const char report_summary[] =
    "Routing and convergence statistics of one amax file: tokens per expert per\n"
    "layer (min/median/max, never-routed and cold experts), the chunk after which\n"
    "each quantizer's running input amax stopped growing, the share of quantizers\n"
    "still growing in the last chunks (a warning says when the calibration set may\n"
    "be too small), and the largest input and weight amax per layer and projection.\n"
    "Serial; runs with or without mpiexec.";

/* The thresholds go straight into the computation's configuration. */
typedef struct report_args {
    bool json;
    moecal_report_cfg cfg;
} report_args;

#define REP(field) MOECAL_AT(report_args, field)

const moecal_optdef moecal_report_options[] = {
    {"json", 0, MOECAL_OPT_FLAG, "0", NULL, NULL, "print the report as JSON", 0, 0, 0,
     REP(json)},
    {"cold-fraction", 0, MOECAL_OPT_FLOAT, "0.1", NULL, "F",
     "an expert is cold when routed fewer than F x the layer's mean tokens per expert",
     0, 0.0, 1.0, REP(cfg.cold)},
    {"tail-fraction", 0, MOECAL_OPT_FLOAT, "0.1", NULL, "F",
     "the last F of the chunks (at least one) are the tail checked for late growth", 0,
     1e-9, 1.0, REP(cfg.tail)},
    {"growth-tolerance", 0, MOECAL_OPT_FLOAT, "0.05", NULL, "R",
     "growth in the tail counts as significant above this relative amount", 0, 0.0, 1e9,
     REP(cfg.tol)},
    {"warn-share", 0, MOECAL_OPT_FLOAT, "0.05", NULL, "F",
     "warn when more than this share of calibrated quantizers grew significantly in the tail",
     0, 0.0, 1.0, REP(cfg.warn)},
    MOECAL_OPT_END
};

static json_t *ids_json(const int *ids, int n, int *ok)
{
    json_t *a = json_array();

    if (!a) {
        *ok = 0;
        return NULL;
    }
    for (int i = 0; i < n; i++)
        jappend(a, json_integer(ids[i]), ok);
    return a;
}

/* "never routed (2): 3 7" or, with token counts, "cold (2): 5 (12 tokens), 9 (40 tokens)". */
static void print_ids(const char *what, const int *ids, int n, const int64_t *tok)
{
    printf("    %s (%d):", what, n);
    for (int i = 0; i < n; i++) {
        if (tok)
            printf("%s %d (%lld token%s)", i ? "," : "", ids[i], (long long)tok[ids[i]],
                   tok[ids[i]] == 1 ? "" : "s");
        else
            printf(" %d", ids[i]);
    }
    putchar('\n');
}

/* ---------------------------------------------------------------- report: JSON */

static json_t *json_routing(const moecal_report *r, int *ok)
{
    json_t *routing = json_array();

    if (!routing)
        *ok = 0;
    for (int l = 0; l < r->L && *ok; l++) {
        const moecal_route_stats *rs = &r->routing[l];
        json_t *e = json_object(), *t = json_array();
        if (!e || !t) {
            json_decref(e);
            json_decref(t);
            *ok = 0;
            break;
        }
        for (int x = 0; x < r->E; x++)
            jappend(t, json_integer(r->tok[(size_t)l * (size_t)r->E + (size_t)x]), ok);
        jset(e, "layer", json_integer(r->d->layers[l]), ok);
        jset(e, "total", json_integer(rs->total), ok);
        jset(e, "min", json_integer(rs->min), ok);
        jset(e, "median", json_real(rs->median), ok);
        jset(e, "max", json_integer(rs->max), ok);
        jset(e, "mean", json_real(rs->mean), ok);
        jset(e, "never_routed", ids_json(rs->never, rs->n_never, ok), ok);
        jset(e, "cold", ids_json(rs->cold, rs->n_cold, ok), ok);
        jset(e, "tokens_per_expert", t, ok);
        jappend(routing, e, ok);
    }
    return routing;
}

static json_t *json_conv_layer(const moecal_report *r, int l, int *ok)
{
    json_t *e = json_object(), *g = json_object();

    if (!e || !g) {
        json_decref(e);
        json_decref(g);
        *ok = 0;
        return NULL;
    }
    jset(e, "layer", json_integer(r->d->layers[l]), ok);
    for (int p = 0; p < 3 && *ok; p++) {
        const moecal_conv_stats *c = &r->conv[l * 3 + p];
        json_t *pj = json_object(), *sa = json_array();
        if (!pj || !sa) {
            json_decref(pj);
            json_decref(sa);
            *ok = 0;
            break;
        }
        for (int x = 0; x < r->E; x++) {
            int v = r->settled[((size_t)l * (size_t)r->E + (size_t)x) * 3 + (size_t)p];
            jappend(sa, v >= 0 ? json_integer(v) : json_null(), ok);
        }
        jset(pj, "calibrated", json_integer(c->calibrated), ok);
        jset(pj, "settled_chunk", sa, ok);
        jset(pj, "settled_median", c->calibrated ? json_real(c->settled_median) : json_null(),
             ok);
        jset(pj, "settled_p95", c->calibrated ? json_real(c->settled_p95) : json_null(), ok);
        jset(pj, "settled_max", c->calibrated ? json_integer(c->settled_max) : json_null(), ok);
        jset(pj, "late_growing", r->pre > 0 ? json_integer(c->late) : json_null(), ok);
        jset(pj, "late_significant", r->pre > 0 ? json_integer(c->late_sig) : json_null(), ok);
        jset(g, proj_name[p], pj, ok);
    }
    jset(e, "projections", g, ok);
    return e;
}

static json_t *json_conv(const moecal_report *r, const moecal_report_cfg *rc, int *ok)
{
    json_t *conv = json_object(), *layers = json_array();
    const moecal_conv_stats *t = &r->total;
    const int pre = r->pre > 0;

    if (!conv || !layers) {
        json_decref(conv);
        json_decref(layers);
        *ok = 0;
        return NULL;
    }
    if (json_object_update_new(conv, json_pack("{s:I, s:I, s:f, s:f, s:I}", "chunks",
                                               (json_int_t)r->C, "tail_chunks",
                                               (json_int_t)r->tail, "growth_tolerance", rc->tol,
                                               "warn_share", rc->warn, "calibrated",
                                               (json_int_t)t->calibrated)) != 0)
        *ok = 0;
    jset(conv, "late_growing", pre ? json_integer(t->late) : json_null(), ok);
    jset(conv, "late_growing_share", pre && t->calibrated > 0 ?
         json_real((double)t->late / (double)t->calibrated) : json_null(), ok);
    jset(conv, "late_significant", pre ? json_integer(t->late_sig) : json_null(), ok);
    jset(conv, "late_significant_share", pre && t->calibrated > 0 ?
         json_real((double)t->late_sig / (double)t->calibrated) : json_null(), ok);
    jset(conv, "warning", json_boolean(r->warning[0] != '\0'), ok);
    for (int l = 0; l < r->L && *ok; l++)
        jappend(layers, json_conv_layer(r, l, ok), ok);
    jset(conv, "layers", layers, ok);
    return conv;
}

static json_t *json_largest(const moecal_report *r, int *ok)
{
    json_t *largest = json_array();

    if (!largest)
        *ok = 0;
    for (int l = 0; l < r->L && *ok; l++) {
        json_t *e = json_object();
        if (!e) {
            *ok = 0;
            break;
        }
        jset(e, "layer", json_integer(r->d->layers[l]), ok);
        for (int p = 0; p < 3; p++) {
            const moecal_largest *g = &r->largest[l * 3 + p];
            json_t *pj = json_object();
            if (!pj) {
                *ok = 0;
                break;
            }
            jset(pj, "input", json_real(g->input), ok);
            jset(pj, "input_expert", json_integer(g->input_expert), ok);
            jset(pj, "weight", json_real(g->weight), ok);
            jset(pj, "weight_expert", json_integer(g->weight_expert), ok);
            jset(e, proj_name[p], pj, ok);
        }
        jappend(largest, e, ok);
    }
    return largest;
}

static moecal_status report_json(const moecal_report *r, const moecal_report_cfg *rc)
{
    const moecal_amax_data *d = r->d;
    int ok = 1;
    json_t *root = json_object(), *warns = json_array();

    if (!root || !warns) {
        json_decref(warns);
        return print_json(root, 0);
    }
    jset(root, "file", json_string(d->path), &ok);
    jset(root, "model_type", json_string(d->model_type), &ok);
    jset(root, "mode", json_string(d->mode), &ok);
    jset(root, "sync", json_string(d->sync), &ok);
    jset(root, "router_logits", d->router_logits[0] ? json_string(d->router_logits)
                                                    : json_null(), &ok);
    jset(root, "quant_format", json_string(d->quant_format), &ok);
    jset(root, "hidden_size", json_integer(d->hidden_size), &ok);
    jset(root, "n_routed_experts", json_integer(r->E), &ok);
    jset(root, "num_experts_per_tok", d->num_experts_per_tok >= 0 ?
         json_integer(d->num_experts_per_tok) : json_null(), &ok);
    jset(root, "layers", jlayers(d, &ok), &ok);
    jset(root, "chunks", json_integer(r->C), &ok);
    jset(root, "tokens", d->tokens >= 0 ? json_integer(d->tokens) : json_null(), &ok);
    jset(root, "cold_fraction", json_real(rc->cold), &ok);
    jset(root, "routing", json_routing(r, &ok), &ok);
    jset(root, "convergence", json_conv(r, rc, &ok), &ok);
    jset(root, "largest", json_largest(r, &ok), &ok);
    if (r->warning[0])
        jappend(warns, json_string(r->warning), &ok);
    jset(root, "warnings", warns, &ok);
    return print_json(root, ok);
}

/* ---------------------------------------------------------------- report: text */

static void text_routing(const moecal_report *r, const moecal_report_cfg *rc)
{
    const moecal_amax_data *d = r->d;

    printf("Routing: tokens per expert, summed over chunks (cold: routed, but fewer than "
           "%g x the layer mean)\n", rc->cold);
    printf("  %6s  %12s  %10s  %12s  %10s  %12s  %5s  %5s\n", "layer", "total", "min",
           "median", "max", "mean", "never", "cold");
    for (int l = 0; l < r->L; l++) {
        const moecal_route_stats *rs = &r->routing[l];
        printf("  %6d  %12lld  %10lld  %12.1f  %10lld  %12.1f  %5d  %5d\n", d->layers[l],
               (long long)rs->total, (long long)rs->min, rs->median, (long long)rs->max,
               rs->mean, rs->n_never, rs->n_cold);
    }
    for (int l = 0; l < r->L; l++) {
        const moecal_route_stats *rs = &r->routing[l];
        if (rs->n_never == 0 && rs->n_cold == 0)
            continue;
        printf("  layer %d:\n", d->layers[l]);
        if (rs->n_never)
            print_ids("never routed", rs->never, rs->n_never, NULL);
        if (rs->n_cold)
            print_ids("cold", rs->cold, rs->n_cold, r->tok + (size_t)l * (size_t)r->E);
    }
}

static void text_conv(const moecal_report *r, const moecal_report_cfg *rc)
{
    const int C = r->C, tail = r->tail, pre = r->pre;
    char tolh[32];

    printf("\nConvergence of the input amax over %d chunk%s (settled: the chunk in which the "
           "running max reached its final value;\n", C, C == 1 ? "" : "s");
    if (pre > 0)
        printf("late: still grew in the last %d chunk%s; >%g%%: grew by more than that)\n",
               tail, tail == 1 ? "" : "s", 100.0 * rc->tol);
    else
        printf("a single chunk shows no convergence: rerun with smaller --chunk-tokens)\n");
    snprintf(tolh, sizeof tolh, ">%g%%", 100.0 * rc->tol);
    printf("  %6s  %4s  %10s  %14s  %11s  %11s  %8s  %8s\n", "layer", "proj", "calibrated",
           "settled median", "settled p95", "settled max", "late", tolh);
    for (int l = 0; l < r->L; l++)
        for (int p = 0; p < 3; p++) {
            const moecal_conv_stats *c = &r->conv[l * 3 + p];
            char late_s[32] = "-", sig_s[32] = "-";
            if (pre > 0) {
                snprintf(late_s, sizeof late_s, "%lld", c->late);
                snprintf(sig_s, sizeof sig_s, "%lld", c->late_sig);
            }
            if (c->calibrated)
                printf("  %6d  %4s  %10lld  %14.1f  %11.1f  %11d  %8s  %8s\n",
                       r->d->layers[l], proj_name[p], c->calibrated, c->settled_median,
                       c->settled_p95, c->settled_max, late_s, sig_s);
            else
                printf("  %6d  %4s  %10lld  %14s  %11s  %11s  %8s  %8s\n", r->d->layers[l],
                       proj_name[p], 0LL, "-", "-", "-", late_s, sig_s);
        }
    if (pre > 0 && r->total.calibrated > 0) {
        char a1[16], a2[16];
        pct_str(r->total.late, r->total.calibrated, a1, sizeof a1);
        pct_str(r->total.late_sig, r->total.calibrated, a2, sizeof a2);
        printf("  all: %lld calibrated quantizers, %s still grew in the last %d chunk%s, "
               "%s by more than %g%%\n", r->total.calibrated, a1, tail, tail == 1 ? "" : "s",
               a2, 100.0 * rc->tol);
    }
}

static moecal_status report_text(const moecal_report *r, const moecal_report_cfg *rc)
{
    const moecal_amax_data *d = r->d;
    char ls[256];

    moecal_amax_layers_str(d->layers, r->L, ls, sizeof ls);
    printf("# moecal report: %s\n", d->path);
    printf("# model %s, hidden %lld, %d experts", d->model_type, (long long)d->hidden_size,
           r->E);
    if (d->num_experts_per_tok >= 0)
        printf(", top-%lld", (long long)d->num_experts_per_tok);
    printf("; mode %s, sync %s%s%s%s%s\n", d->mode, d->sync[0] ? d->sync : "?",
           d->router_logits[0] ? ", router logits " : "", d->router_logits,
           d->quant_format[0] ? ", " : "", d->quant_format);
    printf("# %d MoE layer%s (%s), %d chunk%s", r->L, r->L == 1 ? "" : "s", ls, r->C,
           r->C == 1 ? "" : "s");
    if (d->tokens >= 0)
        printf(", %lld tokens per layer", (long long)d->tokens);
    printf("\n\n");
    text_routing(r, rc);
    text_conv(r, rc);
    printf("\nLargest amax per layer and projection (input: per expert before any sync; "
           "expert in parentheses)\n");
    printf("  %6s  %4s  %14s  %8s  %14s  %8s\n", "layer", "proj", "input", "(expert)",
           "weight", "(expert)");
    for (int l = 0; l < r->L; l++)
        for (int p = 0; p < 3; p++) {
            const moecal_largest *g = &r->largest[l * 3 + p];
            char ei[16], ew[16];
            snprintf(ei, sizeof ei, "(%d)", g->input_expert);
            snprintf(ew, sizeof ew, "(%d)", g->weight_expert);
            printf("  %6d  %4s  %14.6g  %8s  %14.6g  %8s\n", d->layers[l], proj_name[p],
                   (double)g->input, ei, (double)g->weight, ew);
        }
    return flush_stdout();
}

static moecal_status report_run(const moecal_opts *o, const void *opts)
{
    const report_args *a = opts;
    const moecal_report_cfg *rc = &a->cfg;
    moecal_amax_data *d = NULL;
    moecal_report r;
    moecal_status s;

    s = moecal_amax_data_read(moecal_opts_pos(o, 0),
                              MOECAL_AMAXREAD_TOKENS | MOECAL_AMAXREAD_HISTORY, &d);
    if (s == MOECAL_OK)
        s = moecal_report_compute(d, rc, &r);
    if (s != MOECAL_OK) {
        moecal_amax_data_free(d);
        return s;
    }
    s = a->json ? report_json(&r, rc) : report_text(&r, rc);
    if (r.warning[0])
        moecal_warn("%s", r.warning);
    moecal_report_free(&r);
    moecal_amax_data_free(d);
    return s;
}

int moecal_cmd_report(int argc, char **argv)
{
    report_args a;

    /* the thresholds' ranges are checked by the option table */
    return serial_command("report", moecal_report_options, "OUT.h5", report_summary, 1, &a,
                          report_run, argc, argv);
}
