/* report.h - what `moecal report` says about an amax file, computed once
 * into plain structs (no I/O): routing statistics per layer, convergence of
 * the input amax over the chunks, and the largest amax per layer and
 * projection.  cmd_analysis.c prints them as text or JSON; tests/test_report.c
 * checks them on tables built by hand.
 */
#ifndef MOECAL_REPORT_H
#define MOECAL_REPORT_H

#include <stdint.h>

#include "amaxread.h"
#include "error.h"

typedef struct moecal_report_cfg {
    double cold;   /* cold: routed, but fewer than cold x the layer mean */
    double tail;   /* the last ceil(tail x C) chunks are the tail (at least one) */
    double tol;    /* growth in the tail by more than tol (relative) is significant */
    double warn;   /* warn when more than this share of quantizers grew significantly */
} moecal_report_cfg;

typedef struct moecal_route_stats {
    int64_t total, min, max;    /* tokens per expert, summed over chunks */
    double median, mean;
    int n_never, n_cold;
    int *never, *cold;          /* expert ids, ascending */
} moecal_route_stats;

typedef struct moecal_conv_stats {
    long long calibrated;       /* quantizers with a non-zero final amax */
    long long late;             /* grew at all in the tail */
    long long late_sig;         /* grew by more than tol in the tail */
    double settled_median, settled_p95;
    int settled_max;            /* -1 when none is calibrated */
} moecal_conv_stats;

typedef struct moecal_largest {
    float input, weight;        /* the layer's largest calibrated input / weight amax */
    int input_expert, weight_expert; /* the lowest expert holding it */
} moecal_largest;

typedef struct moecal_report {
    const moecal_amax_data *d;  /* read with tokens and history */
    int L, E, C;
    int tail, pre;              /* chunks in the tail and before it */
    int64_t *tok;               /* [L][E] tokens per expert, summed over chunks */
    moecal_route_stats *routing; /* [L] */
    int *settled;               /* [L][E][3] chunk the running max reached its final
                                 * value in, -1: never non-zero */
    moecal_conv_stats *conv;    /* [L][3] */
    moecal_conv_stats total;    /* over all layers and projections (counts only) */
    moecal_largest *largest;    /* [L][3] */
    char warning[512];          /* "" or the convergence warning */
    /* internal */
    int *ids;
    unsigned char *late, *late_sig;
} moecal_report;

/* Fill *r from d (which must outlive r).  MOECAL_ERR_FORMAT when token
 * counts overflow, MOECAL_ERR_NOMEM. */
moecal_status moecal_report_compute(const moecal_amax_data *d, const moecal_report_cfg *cfg,
                                    moecal_report *r);
void moecal_report_free(moecal_report *r);

#endif
