/* report.c - the statistics of `moecal report` (report.h). */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "report.h"
#include "util.h"

/* Chunk in which each quantizer's running max first reached its final value
 * (-1: never non-zero), and whether it still grew in the tail. */
static void conv_layer(moecal_report *r, int l, double tol)
{
    const moecal_amax_data *d = r->d;
    const int C = r->C, E = r->E, pre = r->pre;
    const size_t off = (size_t)l * (size_t)E * 3;

    for (int e = 0; e < E; e++)
        for (int p = 0; p < 3; p++) {
            float run = 0.0f, before = 0.0f;
            int at = -1;

            for (int c = 0; c < C; c++) {
                float h = d->history[(((size_t)l * (size_t)C + (size_t)c) * (size_t)E
                                      + (size_t)e) * 3 + (size_t)p];
                if (h > run) {
                    run = h;
                    at = c;
                }
                if (c + 1 == pre)
                    before = run;
            }
            const size_t i = off + (size_t)e * 3 + (size_t)p;
            r->settled[i] = at;
            r->late[i] = pre > 0 && at >= pre;
            r->late_sig[i] = pre > 0 && at >= pre && (double)run > (double)before * (1.0 + tol);
        }
}

static void conv_summarize(const moecal_report *r, int l, int p, double *scratch,
                           moecal_conv_stats *cs)
{
    const size_t off = (size_t)l * (size_t)r->E * 3;
    size_t n = 0;

    memset(cs, 0, sizeof *cs);
    cs->settled_max = -1;
    for (int e = 0; e < r->E; e++) {
        const size_t i = off + (size_t)e * 3 + (size_t)p;
        int s = r->settled[i];
        if (s < 0)
            continue;
        scratch[n++] = s;
        cs->late += r->late[i];
        cs->late_sig += r->late_sig[i];
        if (s > cs->settled_max)
            cs->settled_max = s;
    }
    cs->calibrated = (long long)n;
    if (n > 0) {
        moecal_sort_doubles(scratch, n);
        cs->settled_median = moecal_percentile_sorted(scratch, n, 0.5);
        cs->settled_p95 = moecal_percentile_sorted(scratch, n, 0.95);
    }
}

/* Tokens per expert summed over chunks, and the layer's statistics. */
static moecal_status routing(moecal_report *r, int l, double cold, double *scratch)
{
    const moecal_amax_data *d = r->d;
    const int E = r->E, C = r->C;
    moecal_route_stats *rs = &r->routing[l];
    int64_t *t = r->tok + (size_t)l * (size_t)E;

    for (int c = 0; c < C; c++)
        for (int e = 0; e < E; e++) {
            int64_t v = d->tokens_per_expert[((size_t)l * (size_t)C + (size_t)c) * (size_t)E +
                                             (size_t)e];
            if (v < 0 || __builtin_add_overflow(t[e], v, &t[e]))
                return moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset 'tokens_per_expert' "
                                        "%s (layer %d, expert %d)", d->path,
                                        v < 0 ? "holds a negative count"
                                              : "overflows when summed",
                                        d->layers[l], e);
        }
    rs->never = r->ids + (size_t)l * 2 * (size_t)E;
    rs->cold = rs->never + E;
    rs->min = rs->max = t[0];
    for (int e = 0; e < E; e++) {
        if (__builtin_add_overflow(rs->total, t[e], &rs->total))
            return moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset 'tokens_per_expert' "
                                    "overflows when summed (layer %d)", d->path, d->layers[l]);
        rs->min = t[e] < rs->min ? t[e] : rs->min;
        rs->max = t[e] > rs->max ? t[e] : rs->max;
        scratch[e] = (double)t[e];
    }
    moecal_sort_doubles(scratch, (size_t)E);
    rs->median = moecal_percentile_sorted(scratch, (size_t)E, 0.5);
    rs->mean = (double)rs->total / (double)E;
    for (int e = 0; e < E; e++) {
        if (t[e] == 0)
            rs->never[rs->n_never++] = e;
        else if ((double)t[e] < cold * rs->mean)
            rs->cold[rs->n_cold++] = e;
    }
    return MOECAL_OK;
}

/* The largest calibrated input and weight amax of (l, p); the lowest expert
 * on a tie. */
static void largest(moecal_report *r, int l, int p)
{
    const moecal_amax_data *d = r->d;
    moecal_largest *g = &r->largest[l * 3 + p];
    int bi = 0, bw = 0;

    for (int x = 1; x < r->E; x++) {
        if (d->input_amax_calibrated[moecal_amax_idx(d, l, x, p)] >
            d->input_amax_calibrated[moecal_amax_idx(d, l, bi, p)])
            bi = x;
        if (d->weight_amax[moecal_amax_idx(d, l, x, p)] >
            d->weight_amax[moecal_amax_idx(d, l, bw, p)])
            bw = x;
    }
    g->input = d->input_amax_calibrated[moecal_amax_idx(d, l, bi, p)];
    g->input_expert = bi;
    g->weight = d->weight_amax[moecal_amax_idx(d, l, bw, p)];
    g->weight_expert = bw;
}

moecal_status moecal_report_compute(const moecal_amax_data *d, const moecal_report_cfg *cfg,
                                    moecal_report *r)
{
    const size_t L = (size_t)d->L, E = (size_t)d->E;
    double *scratch = NULL;
    moecal_status s = MOECAL_OK;

    memset(r, 0, sizeof *r);
    r->d = d;
    r->L = d->L;
    r->E = d->E;
    r->C = d->C;
    if (!d->tokens_per_expert || !d->history || d->E < 1 || d->C < 1)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: report needs token counts and "
                                "histories of at least one expert and chunk", d->path);
    r->tok = calloc(L * E, sizeof *r->tok);
    r->ids = malloc(L * 2 * E * sizeof *r->ids);
    r->routing = calloc(L ? L : 1, sizeof *r->routing);
    r->settled = malloc(L * E * 3 * sizeof *r->settled);
    r->late = malloc(L * E * 3 + 1);
    r->late_sig = malloc(L * E * 3 + 1);
    r->conv = calloc(L * 3 + 1, sizeof *r->conv);
    r->largest = calloc(L * 3 + 1, sizeof *r->largest);
    scratch = malloc(E * sizeof *scratch);
    if (!r->tok || !r->ids || !r->routing || !r->settled || !r->late || !r->late_sig ||
        !r->conv || !r->largest || !scratch) {
        s = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory for the report", d->path);
        goto out;
    }
    for (int l = 0; l < r->L && s == MOECAL_OK; l++)
        s = routing(r, l, cfg->cold, scratch);
    if (s != MOECAL_OK)
        goto out;

    r->tail = (int)ceil(cfg->tail * (double)r->C - 1e-9);
    r->tail = r->tail < 1 ? 1 : r->tail > r->C ? r->C : r->tail;
    r->pre = r->C - r->tail;
    r->total.settled_max = -1;
    for (int l = 0; l < r->L; l++) {
        conv_layer(r, l, cfg->tol);
        for (int p = 0; p < 3; p++) {
            moecal_conv_stats *c = &r->conv[l * 3 + p];
            conv_summarize(r, l, p, scratch, c);
            r->total.calibrated += c->calibrated;
            r->total.late += c->late;
            r->total.late_sig += c->late_sig;
            largest(r, l, p);
        }
    }
    if (r->pre > 0 && r->total.calibrated > 0 &&
        (double)r->total.late_sig > cfg->warn * (double)r->total.calibrated)
        snprintf(r->warning, sizeof r->warning, "%s: %lld of %lld calibrated input quantizers "
                 "(%.1f%%) grew by more than %g%% in the last %d of %d chunks: calibration "
                 "set may be too small", d->path, r->total.late_sig, r->total.calibrated,
                 100.0 * (double)r->total.late_sig / (double)r->total.calibrated,
                 100.0 * cfg->tol, r->tail, r->C);
out:
    free(scratch);
    if (s != MOECAL_OK)
        moecal_report_free(r);
    return s;
}

void moecal_report_free(moecal_report *r)
{
    free(r->tok);
    free(r->ids);
    free(r->routing);
    free(r->settled);
    free(r->late);
    free(r->late_sig);
    free(r->conv);
    free(r->largest);
    memset(r, 0, sizeof *r);
}
