/* backendlib.h - what the backend tests share (test_backends, the
 * conformance suite every registered backend runs; test_backend_cpu and
 * test_backend_cuda, each backend's own cases).
 *
 * A problem is one layer's router and local experts plus a batch of tokens,
 * random but with structure: channel 0 of x is 1 for every token and
 * channel 1 marks one token, so gate rows make an expert cold (never
 * chosen) or chosen by that token only.  The reference routes each token
 * with route_math.h's logits and router.c's selection, then computes a and
 * b of every selected local expert in double, rounds to bf16 and forms h as
 * the model does.  Token counts and amax(x) must match it exactly; amax(h)
 * within 1e-2 relative (backends accumulate the GEMMs in float32, each in
 * its own order).  Failures go through cmocka (include cmocka.h first).
 */
#ifndef MOECAL_TESTS_BACKENDLIB_H
#define MOECAL_TESTS_BACKENDLIB_H

#include <stdbool.h>
#include <stdint.h>

#include "backend.h"
#include "modelcfg.h"

extern uint64_t bl_rng_state;
double bl_urand(void);   /* [0, 1) */
double bl_nrand(void);   /* standard normal */
void *bl_calloc(size_t n, size_t sz);   /* fails the test when out of memory */

typedef struct problem {
    moecal_model_config cfg;
    int e0, e1, ntok;
    float *gate, *bias;        /* [E][H]; [E] or NULL (softmax) */
    uint16_t *w1, *w3;         /* [nloc][I][H] bf16 */
    uint16_t *x;               /* [ntok][H] bf16 */
    uint8_t *skip;             /* [ntok] rows to ignore */
    int cold, one, one_token;  /* global expert ids (-1: none) and the marked token */
    int prec;                  /* --router-logits (moecal_logit_prec); 0 = fp32 */
} problem;

typedef struct result {
    int64_t *tokens;
    float *amax_x, *amax_h;
} result;

result result_new(int n);
void result_free(result *r);

/* E experts in G groups keeping TG, k per token, hidden H, intermediate I,
 * local experts [e0, e1), ntok tokens; the same arguments give the same
 * problem. */
void problem_make(problem *p, moecal_scoring sc, int E, int G, int TG, int k, int H, int I,
                  int e0, int e1, int ntok, uint64_t seed);
void problem_free(problem *p);

/* The naive reference (all: every token to every expert); with amax_h NULL
 * in r, the token counts only. */
void reference(const problem *p, bool all, result *r);

/* A backend of ops for p, its layer loaded (threads 0: the backend's
 * choice; device 0 for a GPU backend). */
moecal_backend *make_backend(const moecal_backend_ops *ops, const problem *p, bool all,
                             int threads, int64_t max_chunk);
/* Sum of counts, max of amax: how the driver merges chunks. */
void merge(int nloc, result *r, const result *part);
/* Run p through a fresh backend in chunks of `chunk` tokens and merge; with
 * ahead (backends with submit_chunk), each chunk is submitted before the
 * previous one is finished. */
void run_backend(const moecal_backend_ops *ops, const problem *p, bool all, int threads,
                 int chunk, bool ahead, result *r);
/* got (from `what`) against want (from `ref`) within the tolerances above;
 * a count that differs is reported with the reference's count too. */
void compare(const problem *p, bool all, const char *what, const result *got, const char *ref,
             const result *want);
/* The same bits. */
void same_bits(const problem *p, const result *a, const result *b);
/* In top-k mode the cold expert got no token and the one-token expert its
 * one token (none when that token is skipped). */
void check_cold_and_one(const problem *p, bool all, const result *r);

#endif
