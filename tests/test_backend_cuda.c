/* test_backend_cuda.c - the CUDA backend against the CPU backend.
 *
 * Both backends run the same random problems; token counts and amax(x) must
 * be identical, amax(h) within 1e-2 relative (both GEMMs accumulate in
 * float32, in different orders).  A third opinion settles disagreements on
 * routing: a per-token reference with route_math.h's logits (double,
 * ascending h) and router.c's selection.  Shapes: H and I that are not
 * multiples of 8 (scalar paths) and that are (vector paths), E not divisible
 * by the local range, cold and one-token experts, k = 1 and k = E, sigmoid
 * with groups and softmax, exact ties, skipped rows, all-experts mode, many
 * small pipeline steps and pieces (MOECAL_CUDA_STEP, MOECAL_CUDA_PIECE),
 * chunks of odd sizes, chunks submitted ahead (backend_cuda.h) from pageable
 * and from pinned memory; then the errors: the memory limit, a missing
 * device, misuse of the asynchronous calls.  The problems and comparisons
 * are backendlib.h's; test_backends.c runs the cases every backend must
 * pass (against the naive reference, non-finite weights among them) on
 * this backend too.
 *
 * Exits 77 (skipped) when no GPU is usable.  An optional argument is a
 * cmocka test-name filter (for compute-sanitizer runs on one small case).
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime.h>

#include "backendlib.h"
#include "fp8.h"
#include "nvfp4.h"
#include "../cuda/nvfp4_cuda.h"
#include "router.h"
#include "../cuda/backend_cuda.h"
#include "route_math.h"

static void set_env_int(const char *name, int v)
{
    char s[32];
    if (v > 0) {
        snprintf(s, sizeof s, "%d", v);
        setenv(name, s, 1);
    } else {
        unsetenv(name);
    }
}

static void set_step(int step)
{
    set_env_int("MOECAL_CUDA_STEP", step);
    /* pieces of a third of a step: several per step, the last one short */
    set_env_int("MOECAL_CUDA_PIECE", step > 2 ? step / 3 : 0);
}

/* CPU in one chunk; GPU in one chunk, in odd chunks, in small steps, and in
 * chunks submitted ahead, from pageable and from pinned memory. */
static void check_problem(const problem *p, bool all, int odd_chunk, int small_step)
{
    int nloc = p->e1 - p->e0;
    result cpu = result_new(nloc), gpu = result_new(nloc);

    set_step(0);
    run_backend(&moecal_backend_cpu, p, all, 2, p->ntok, false, &cpu);
    run_backend(&moecal_backend_cuda, p, all, 2, p->ntok, false, &gpu);
    compare(p, all, "the GPU", &gpu, "the CPU", &cpu);
    if (odd_chunk > 0) {
        run_backend(&moecal_backend_cuda, p, all, 2, odd_chunk, false, &gpu);
        compare(p, all, "the GPU", &gpu, "the CPU", &cpu);
    }
    if (small_step > 0) {
        set_step(small_step);
        run_backend(&moecal_backend_cuda, p, all, 2, p->ntok, false, &gpu);
        compare(p, all, "the GPU", &gpu, "the CPU", &cpu);
        int chunk = odd_chunk > 0 ? odd_chunk : p->ntok / 3 + 1;
        run_backend(&moecal_backend_cuda, p, all, 2, chunk, true, &gpu);
        compare(p, all, "the GPU", &gpu, "the CPU", &cpu);
        size_t bytes = (size_t)p->ntok * (size_t)p->cfg.hidden_size * sizeof(uint16_t);
        assert_int_equal(cudaHostRegister(p->x, bytes, cudaHostRegisterDefault), cudaSuccess);
        run_backend(&moecal_backend_cuda, p, all, 2, chunk, true, &gpu);
        compare(p, all, "the GPU", &gpu, "the CPU", &cpu);
        assert_int_equal(cudaHostUnregister(p->x), cudaSuccess);
        set_step(0);
    }
    check_cold_and_one(p, all, &cpu);
    result_free(&cpu);
    result_free(&gpu);
}

static void test_deepseek_odd_shapes(void **state)
{
    (void)state;
    problem p;
    /* E 12 in 4 groups, keep 2, k 3; H 37, I 19 (scalar paths); experts [3, 9) */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 3, 9, 301, 11);
    check_problem(&p, false, 77, 50);
    problem_free(&p);
}

static void test_deepseek_h200_i72(void **state)
{
    (void)state;
    problem p;
    /* E 20 (a local range of 8 from 5), 4 groups keep 2, k 4; H 200, I 72:
     * vector paths with row lengths that are not multiples of 128 */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 20, 4, 2, 4, 200, 72, 5, 13, 1500, 21);
    check_problem(&p, false, 700, 64);
    problem_free(&p);
}

static void test_deepseek_wide(void **state)
{
    (void)state;
    problem p;
    /* 256 experts in 8 groups keep 4, k 8 (DeepSeek-V3's router), H 256,
     * I 64; all experts local; hot and cold experts from the skew */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 256, 8, 4, 8, 256, 64, 0, 256, 3000, 31);
    p.one = -1; /* among 256 experts its one token may prefer others */
    check_problem(&p, false, 1024, 512);
    problem_free(&p);
}

static void test_softmax_k1_and_kE(void **state)
{
    (void)state;
    problem p;
    /* E 13 (prime), k 1, experts [4, 11) */
    problem_make(&p, MOECAL_SCORING_SOFTMAX, 13, 1, 1, 1, 45, 23, 4, 11, 257, 13);
    check_problem(&p, false, 100, 32);
    problem_free(&p);
    /* k = E: every token reaches every expert through the router */
    problem_make(&p, MOECAL_SCORING_SOFTMAX, 13, 1, 1, 13, 48, 24, 0, 13, 90, 14);
    p.cold = p.one = -1;
    check_problem(&p, false, 31, 16);
    problem_free(&p);
    /* softmax with groups (DeepSeek's group_limited_greedy: max per group) */
    problem_make(&p, MOECAL_SCORING_SOFTMAX, 16, 4, 2, 2, 64, 32, 2, 14, 400, 15);
    check_problem(&p, false, 0, 128);
    problem_free(&p);
}

static void test_many_slots(void **state)
{
    (void)state;
    problem p;
    /* k > 32: the gather reads each token's destinations 32 slots at a time.
     * k = E = 40 (softmax, every expert local but 3 at each end), 16-byte rows */
    problem_make(&p, MOECAL_SCORING_SOFTMAX, 40, 1, 1, 40, 64, 24, 3, 37, 150, 22);
    p.cold = p.one = -1;
    check_problem(&p, false, 61, 40);
    problem_free(&p);
    /* k 34 of 48 in 4 groups keep 3 (36 candidates), scalar rows (H 37) */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 48, 4, 3, 34, 37, 19, 5, 44, 180, 23);
    p.cold = p.one = -1;
    check_problem(&p, false, 70, 50);
    problem_free(&p);
}

static void test_ties(void **state)
{
    (void)state;
    problem p;
    /* experts 4 and 5 have the same gate row and bias (exact ties: the lower
     * index wins), as do groups 0 and 2 (experts 0-3 and 8-11) */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 16, 4, 2, 3, 64, 16, 0, 16, 600, 16);
    int H = 64;
    memcpy(p.gate + 5 * H, p.gate + 4 * H, (size_t)H * sizeof(float));
    p.bias[5] = p.bias[4];
    for (int e = 0; e < 4; e++) {
        memcpy(p.gate + (size_t)(e + 8) * H, p.gate + (size_t)e * H, (size_t)H * sizeof(float));
        p.bias[e + 8] = p.bias[e];
    }
    p.cold = p.one = -1;
    check_problem(&p, false, 0, 100);
    problem_free(&p);
}

static void test_skip_rows(void **state)
{
    (void)state;
    problem p;
    for (int h = 0; h < 2; h++) {
        int H = h ? 64 : 37, I = h ? 32 : 19;
        problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, H, I, 3, 9, 301, 15 + h);
        /* skipped rows hold NaN and huge values: they must not be read */
        for (int t = 0; t < p.ntok; t += 5) {
            p.skip[t] = 1;
            p.x[(size_t)t * H + 4] = 0x7fc0;
            p.x[(size_t)t * H + 5] = moecal_float_to_bf16(1e30f);
        }
        p.skip[p.one_token] = 1;
        check_problem(&p, false, 100, 40);
        check_problem(&p, true, 100, 40);
        memset(p.skip, 1, (size_t)p.ntok);
        check_problem(&p, false, 0, 0);
        check_problem(&p, true, 0, 0);
        problem_free(&p);
    }
}

static void test_all_experts(void **state)
{
    (void)state;
    problem p;
    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 5, 8, 1100, 16);
    check_problem(&p, true, 333, 256);
    problem_free(&p);
    /* 11 local experts: one group of 8 and one of 3 per GEMM */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 20, 4, 2, 4, 200, 72, 5, 16, 700, 17);
    check_problem(&p, true, 0, 300);
    problem_free(&p);
}

static void test_async_misuse(void **state)
{
    (void)state;
    problem p;
    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 64, 32, 0, 12, 90, 21);
    moecal_backend *b = make_backend(&moecal_backend_cuda, &p, false, 2, 30);
    result r = result_new(12), q = result_new(12), all = result_new(12);
    moecal_chunk_stats st = {r.tokens, r.amax_x, r.amax_h};
    moecal_layer_weights w = {.layer = 3, .gate = p.gate, .bias = p.bias, .w1 = p.w1,
                              .w3 = p.w3};

    assert_int_not_equal(moecal_backend_cuda_finish_chunk(b, &st), MOECAL_OK);
    assert_int_equal(moecal_backend_cuda_submit_chunk(b, p.x, 30, NULL), MOECAL_OK);
    assert_int_equal(moecal_backend_cuda_submit_chunk(b, p.x + 30 * 64, 30, NULL), MOECAL_OK);
    /* a third chunk, run_chunk and load_layer wait for a finish */
    assert_int_not_equal(moecal_backend_cuda_submit_chunk(b, p.x + 60 * 64, 30, NULL),
                         MOECAL_OK);
    assert_int_not_equal(moecal_backend_cuda.run_chunk(b, p.x, 30, NULL, &st), MOECAL_OK);
    assert_int_not_equal(moecal_backend_cuda.load_layer(b, &w), MOECAL_OK);
    assert_int_equal(moecal_backend_cuda_finish_chunk(b, &st), MOECAL_OK);
    merge(12, &all, &r);
    assert_int_equal(moecal_backend_cuda_submit_chunk(b, p.x + 60 * 64, 30, NULL), MOECAL_OK);
    assert_int_equal(moecal_backend_cuda_finish_chunk(b, &st), MOECAL_OK);
    merge(12, &all, &r);
    assert_int_equal(moecal_backend_cuda_finish_chunk(b, &st), MOECAL_OK);
    merge(12, &all, &r);
    assert_int_not_equal(moecal_backend_cuda_finish_chunk(b, &st), MOECAL_OK);
    /* the same as one chunk at a time */
    moecal_chunk_stats sq = {q.tokens, q.amax_x, q.amax_h};
    int64_t sum = 0;
    for (int e = 0; e < 12; e++)
        sum += all.tokens[e];
    assert_int_equal(sum, 90 * 3);
    moecal_backend_cuda.destroy(b);
    b = make_backend(&moecal_backend_cuda, &p, false, 2, 90);
    assert_int_equal(moecal_backend_cuda.run_chunk(b, p.x, 90, NULL, &sq), MOECAL_OK);
    assert_memory_equal(q.tokens, all.tokens, 12 * sizeof(int64_t));
    assert_memory_equal(q.amax_x, all.amax_x, 12 * sizeof(float));
    /* destroy with a chunk in flight */
    assert_int_equal(moecal_backend_cuda_submit_chunk(b, p.x, 90, NULL), MOECAL_OK);
    moecal_backend_cuda.destroy(b);
    result_free(&r);
    result_free(&q);
    result_free(&all);
    problem_free(&p);
}

static void test_memory_limit_and_device(void **state)
{
    (void)state;
    problem p;
    moecal_backend_config bc;
    moecal_backend *b = (moecal_backend *)&bc;

    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 3, 9, 10, 20);
    memset(&bc, 0, sizeof bc);
    bc.model = &p.cfg;
    bc.e0 = 3;
    bc.e1 = 9;
    bc.max_chunk_tokens = 1024;
    bc.rank = 3;
    bc.gpu_mem_limit = 4096;
    assert_int_equal(moecal_backend_cuda.create(&bc, &b), MOECAL_ERR_NOMEM);
    assert_null(b);
    const char *msg = moecal_error_message();
    assert_non_null(strstr(msg, "rank 3 GPU "));
    assert_non_null(strstr(msg, "the shard needs"));
    assert_non_null(strstr(msg, "(weights"));
    assert_non_null(strstr(msg, "(--gpu-mem-limit)"));

    bc.gpu_mem_limit = 0;
    bc.device = 4096;
    assert_int_equal(moecal_backend_cuda.create(&bc, &b), MOECAL_ERR_CUDA);
    assert_null(b);
    bc.device = 0;
    bc.max_chunk_tokens = 0;
    assert_int_not_equal(moecal_backend_cuda.create(&bc, &b), MOECAL_OK);
    bc.max_chunk_tokens = 16;
    bc.e1 = 13;
    assert_int_not_equal(moecal_backend_cuda.create(&bc, &b), MOECAL_OK);
    moecal_backend_cuda.destroy(NULL);
    problem_free(&p);
}

/* FP8 weights: the CUDA backend dequantizes raw e4m3 blocks itself
 * (fp8_weights).  Its results must be bit-identical to the same backend
 * given the host's dequantization (moecal_fp8_dequant_bf16), and agree with
 * the CPU backend as every other case does.  Blocks that do not divide H
 * or I; every finite code; scales over many octaves. */
static void fp8_case(int H, int I, int block, uint64_t seed)
{
    problem p;
    problem_make(&p, MOECAL_SCORING_SIGMOID, 16, 4, 2, 4, H, I, 2, 11, 900, seed);
    p.cfg.weight_block[0] = p.cfg.weight_block[1] = block;
    const int nloc = p.e1 - p.e0;
    const size_t per = (size_t)I * H;
    const size_t nbr = (size_t)(I + block - 1) / block, nbc = (size_t)(H + block - 1) / block;
    uint8_t *q[2];
    float *sc[2];
    for (int half = 0; half < 2; half++) {
        q[half] = bl_calloc((size_t)nloc * per, 1);
        sc[half] = bl_calloc((size_t)nloc * nbr * nbc, sizeof(float));
        for (size_t i = 0; i < (size_t)nloc * per; i++) {
            uint8_t c;
            do
                c = (uint8_t)(bl_urand() * 256.0);
            while ((c & 0x7f) == 0x7f);
            q[half][i] = c;
        }
        for (size_t i = 0; i < (size_t)nloc * nbr * nbc; i++)
            sc[half][i] = (float)(ldexp(1.0 + bl_urand(), -16 + (int)(bl_urand() * 10.0)));
        for (int e = 0; e < nloc; e++) {
            uint16_t *dst = (half ? p.w3 : p.w1) + (size_t)e * per;
            assert_int_equal(moecal_fp8_dequant_bf16(q[half] + (size_t)e * per, (size_t)I,
                                                     (size_t)H, sc[half] + (size_t)e * nbr * nbc,
                                                     (size_t)block, dst, NULL, NULL),
                             MOECAL_OK);
        }
    }

    result cpu = result_new(nloc), gpu = result_new(nloc), gpu8 = result_new(nloc);
    set_step(0);
    run_backend(&moecal_backend_cpu, &p, false, 2, p.ntok, false, &cpu);
    run_backend(&moecal_backend_cuda, &p, false, 2, p.ntok, false, &gpu);
    compare(&p, false, "the GPU", &gpu, "the CPU", &cpu);

    moecal_backend_config bc;
    moecal_backend *b = NULL;
    moecal_layer_weights w;
    memset(&bc, 0, sizeof bc);
    memset(&w, 0, sizeof w);
    bc.model = &p.cfg;
    bc.e0 = p.e0;
    bc.e1 = p.e1;
    bc.max_chunk_tokens = p.ntok;
    bc.router_logits = p.prec;
    bc.device = 0;
    assert_true(moecal_backend_cuda.fp8_weights);
    assert_int_equal(moecal_backend_cuda.create(&bc, &b), MOECAL_OK);
    w.layer = 3;
    w.gate = p.gate;
    w.bias = p.bias;
    w.w1_fp8 = q[0];
    w.w3_fp8 = q[1];
    w.w1_scale = sc[0];
    w.w3_scale = sc[1];
    w.block = block;
    if (moecal_backend_cuda.load_layer(b, &w) != MOECAL_OK)
        fail_msg("load_layer (FP8): %s", moecal_error_message());
    moecal_chunk_stats st = {gpu8.tokens, gpu8.amax_x, gpu8.amax_h};
    if (moecal_backend_cuda.run_chunk(b, p.x, p.ntok, NULL, &st) != MOECAL_OK)
        fail_msg("run_chunk: %s", moecal_error_message());
    moecal_backend_cuda.destroy(b);
    for (int e = 0; e < nloc; e++) {
        assert_int_equal(gpu8.tokens[e], gpu.tokens[e]);
        assert_memory_equal(&gpu8.amax_x[e], &gpu.amax_x[e], sizeof(float));
        if (memcmp(&gpu8.amax_h[e], &gpu.amax_h[e], sizeof(float)) != 0)
            fail_msg("expert %d: amax(h) %.9g from FP8 on the GPU, %.9g from the host's "
                     "dequantization", p.e0 + e, (double)gpu8.amax_h[e], (double)gpu.amax_h[e]);
    }
    result_free(&cpu);
    result_free(&gpu);
    result_free(&gpu8);
    for (int half = 0; half < 2; half++) {
        free(q[half]);
        free(sc[half]);
    }
    problem_free(&p);
}

static void test_fp8_weights(void **state)
{
    (void)state;
    fp8_case(200, 72, 64, 31);   /* partial blocks in both dimensions */
    fp8_case(37, 19, 8, 32);     /* odd sizes, scalar paths */
    fp8_case(256, 128, 128, 33); /* whole blocks */
}

/* The router's logits come from a DGEMM checked against an error bound;
 * logits the bound cannot settle are recomputed in route_math.h's order.
 * Tokens with large cancelling terms (+-512 on two channels every expert
 * weighs equally) and one logit exactly on a float rounding midpoint
 * (1 + 2^-24) force that path; the result must equal the CPU backend's and
 * the exact kernel's (MOECAL_CUDA_ROUTER=exact) bit for bit. */
static void dgemm_router_case(int HH, unsigned seed, int prec)
{
    problem p;
    problem_make(&p, MOECAL_SCORING_SIGMOID, 16, 4, 2, 4, HH, 8, 0, 16, 2000, seed);
    p.cold = p.one = -1;
    p.prec = prec;
    for (int e = 0; e < 16; e++) {
        p.gate[(size_t)e * HH] = (float)(0.1 * bl_nrand());
        p.gate[(size_t)e * HH + 1] = (float)(0.1 * bl_nrand());
        p.gate[(size_t)e * HH + 4] = p.gate[(size_t)e * HH + 5] = 3.0f + (float)e / 64.0f;
    }
    for (int t = 0; t < p.ntok; t++) {
        p.x[(size_t)t * HH + 4] = moecal_float_to_bf16(512.0f);
        p.x[(size_t)t * HH + 5] = moecal_float_to_bf16(-512.0f);
    }
    /* token 7, expert 3: logit exactly 1 + 2^-24 before rounding */
    memset(p.x + 7 * HH, 0, HH * sizeof(uint16_t));
    p.x[7 * HH] = p.x[7 * HH + 1] = moecal_float_to_bf16(1.0f);
    p.gate[3 * HH] = 1.0f;
    p.gate[3 * HH + 1] = ldexpf(1.0f, -24);
    /* token 8, expert 5: exactly on the bf16 midpoint 1 + 2^-8; token 9,
     * expert 6: 2^-30 above it, where float32 rounds to the midpoint (a
     * second rounding to bf16 would then go down, the single rounding up) */
    memset(p.x + 8 * HH, 0, HH * sizeof(uint16_t));
    p.x[8 * HH + 2] = p.x[8 * HH + 3] = moecal_float_to_bf16(1.0f);
    p.gate[5 * HH + 2] = 1.0f;
    p.gate[5 * HH + 3] = ldexpf(1.0f, -8);
    memset(p.x + 9 * HH, 0, HH * sizeof(uint16_t));
    p.x[9 * HH + 2] = p.x[9 * HH + 3] = moecal_float_to_bf16(1.0f);
    p.gate[6 * HH + 2] = 1.0f;
    p.gate[6 * HH + 3] = ldexpf(1.0f, -8) + ldexpf(1.0f, -30);
    setenv("MOECAL_CUDA_ROUTER", "exact", 1);
    check_problem(&p, false, 333, 0);      /* the FP64 kernel */
    setenv("MOECAL_CUDA_ROUTER", "dgemm", 1);
    check_problem(&p, false, 333, 0);

    const int nloc = 16;
    result r[2] = {result_new(nloc), result_new(nloc)};
    unsigned long long fixes[2];
    for (int exact = 0; exact < 2; exact++) {
        setenv("MOECAL_CUDA_ROUTER", exact ? "exact" : "dgemm", 1);
        moecal_backend *b = make_backend(&moecal_backend_cuda, &p, false, 2, p.ntok);
        moecal_chunk_stats st = {r[exact].tokens, r[exact].amax_x, r[exact].amax_h};
        if (moecal_backend_cuda.run_chunk(b, p.x, p.ntok, NULL, &st) != MOECAL_OK)
            fail_msg("run_chunk: %s", moecal_error_message());
        fixes[exact] = moecal_backend_cuda_router_fixups(b);
        moecal_backend_cuda.destroy(b);
        unsetenv("MOECAL_CUDA_ROUTER");
    }
    print_message("DGEMM router (%s logits, H %d): %llu of %d logits recomputed exactly\n",
                  moecal_router_logits_name(prec), HH, fixes[0], p.ntok * 16);
    assert_true(fixes[0] >= 1);
    assert_true(fixes[1] == 0);
    assert_memory_equal(r[0].tokens, r[1].tokens, nloc * sizeof(int64_t));
    assert_memory_equal(r[0].amax_x, r[1].amax_x, nloc * sizeof(float));
    result_free(&r[0]);
    result_free(&r[1]);
    problem_free(&p);
}

static void test_dgemm_router_exactness(void **state)
{
    (void)state;
    /* three blocks of route_math.h's sum, the last partial: H % 8 != 0 (the
     * scalar recomputation) and H % 8 == 0 (16-byte loads) */
    for (int prec = MOECAL_LOGITS_FP32; prec <= MOECAL_LOGITS_BF16; prec++) {
        dgemm_router_case(1100, 41, prec);
        dgemm_router_case(1104, 42, prec);
        /* 34 blocks: more than the 32 lanes that share one recomputed logit */
        dgemm_router_case(33 * MOECAL_RM_BLOCK + 520, 43, prec);
    }
}

/* Every --router-logits precision, GPU against CPU: softmax (k of 64, as
 * Qwen3-MoE) and DeepSeek's grouped sigmoid; equal router rows make exact
 * ties at every precision (the lower expert wins on both).  exact runs the
 * float64 kernel and the double selection. */
static void test_logit_precisions(void **state)
{
    (void)state;
    for (int prec = 0; prec < 3; prec++) {
        problem p;
        problem_make(&p, MOECAL_SCORING_SOFTMAX, 64, 1, 1, 8, 200, 24, 7, 50, 1500, 50 + prec);
        p.cold = p.one = -1;
        p.prec = prec;
        memcpy(p.gate + 21 * 200, p.gate + 20 * 200, 200 * sizeof(float));
        check_problem(&p, false, 333, 400);
        problem_free(&p);
        problem_make(&p, MOECAL_SCORING_SIGMOID, 32, 8, 3, 6, 136, 16, 0, 32, 1500, 60 + prec);
        p.cold = p.one = -1;
        p.prec = prec;
        memcpy(p.gate + 9 * 136, p.gate + 2 * 136, 136 * sizeof(float));
        p.bias[9] = p.bias[2];
        check_problem(&p, false, 333, 400);
        problem_free(&p);
    }
}

/* `moecal export --backend cuda`: the GPU quantizer (nvfp4_cuda.h) against
 * the CPU path (fp8.c dequantization, nvfp4.c quantization) on fresh random
 * weights, FP8 with block scales and BF16, at several shapes: the same
 * packed bytes, block scales, amax and non-finite count. */
static void nvfp4_case(moecal_nvfp4_gpu *g, bool fp8, size_t N, size_t K, size_t B,
                       double s2_factor, uint64_t seed)
{
    const moecal_nvfp4_gpu_host *h = moecal_nvfp4_gpu_buffers(g);
    const size_t n = N * K, nbr = (N + B - 1) / B, nbc = (K + B - 1) / B;
    uint16_t *w = malloc(n * sizeof *w);
    uint8_t *pk = malloc(n / 2), *sc = malloc(n / 16);
    float amax = 0.0f;
    moecal_nvfp4_gpu_result res;

    assert_non_null(w);
    bl_rng_state = seed * 0x9e3779b97f4a7c15ull + 7;
    if (fp8) {
        uint8_t *q = h->w;
        for (size_t i = 0; i < n; i++) {
            uint8_t c = (uint8_t)(bl_urand() * 256.0);
            q[i] = (c & 0x7f) == 0x7f ? (uint8_t)(c - 1) : c;  /* no NaN code */
        }
        for (size_t i = 0; i < nbr * nbc; i++)
            h->scale_inv[i] = (float)ldexp(1.0 + bl_urand(), -12 + (int)(bl_urand() * 12.0));
        uint64_t nan = 1;
        assert_int_equal(moecal_fp8_dequant_bf16(q, N, K, h->scale_inv, B, w, &nan, &amax),
                         MOECAL_OK);
        assert_int_equal(nan, 0);
    } else {
        uint16_t *x = h->w;
        for (size_t i = 0; i < n; i++) {
            double u = bl_urand();
            /* normal values over a wide range, zeros, -0 and subnormals */
            x[i] = u < 0.03 ? (uint16_t)(u < 0.015 ? 0x0000 : 0x8000)
                 : u < 0.05 ? (uint16_t)((bl_urand() < 0.5 ? 0x8000 : 0) | (1 + (int)(bl_urand() * 127)))
                            : moecal_float_to_bf16((float)((bl_urand() - 0.5) *
                                                           ldexp(1.0, (int)(bl_urand() * 20) - 10)));
        }
        if (N > 3 && K >= 32) /* an all-zero block */
            memset(x + 3 * K + 16, 0, 16 * sizeof *x);
        memcpy(w, x, n * sizeof *w);
        for (size_t i = 0; i < n; i++)
            amax = fmaxf(amax, fabsf(moecal_bf16_to_float(w[i])));
    }
    const float s2 = moecal_nvfp4_scale2((float)(amax * s2_factor));
    for (size_t r = 0; r < N; r++)
        moecal_nvfp4_quantize_row_bf16(w + r * K, K, s2, pk + r * (K / 2), sc + r * (K / 16));
    assert_int_equal(moecal_nvfp4_gpu_quantize(g, fp8, N, K, B, s2, &res), MOECAL_OK);
    assert_int_equal(res.nonfinite, 0);
    assert_memory_equal(&res.amax, &amax, sizeof amax);
    for (size_t i = 0; i < n / 2; i++) {
        if (pk[i] != h->packed[i])
            fail_msg("%s [%zu, %zu] B %zu: packed byte %zu (row %zu) is %02x on the GPU, %02x on "
                     "the CPU", fp8 ? "fp8" : "bf16", N, K, B, i, i / (K / 2), h->packed[i],
                     pk[i]);
    }
    assert_memory_equal(sc, h->scales, n / 16);
    free(w);
    free(pk);
    free(sc);
}

static void test_nvfp4_quantizer(void **state)
{
    (void)state;
    moecal_nvfp4_gpu *g = NULL;
    assert_true(moecal_nvfp4_gpu_count() > 0);
    assert_int_equal(moecal_nvfp4_gpu_create(0, 7168 * 2048, 56 * 16, &g), MOECAL_OK);
    const struct { size_t N, K, B; } shp[] = {
        {1, 16, 128}, {7, 48, 128}, {129, 272, 128}, {33, 160, 24}, {2048, 7168, 128},
        {7168, 2048, 128}, {300, 1040, 128},
    };
    uint64_t seed = 1;
    for (size_t i = 0; i < sizeof shp / sizeof shp[0]; i++) {
        for (int fp8 = 0; fp8 < 2; fp8++) {
            nvfp4_case(g, fp8, shp[i].N, shp[i].K, shp[i].B, 1.0, seed++);
            nvfp4_case(g, fp8, shp[i].N, shp[i].K, shp[i].B, 1.75, seed++); /* shared s2 */
        }
    }
    /* non-finite values are counted: a NaN code, an Inf bf16 */
    const moecal_nvfp4_gpu_host *h = moecal_nvfp4_gpu_buffers(g);
    moecal_nvfp4_gpu_result res;
    memset(h->w, 0x38, 64 * 32);
    ((uint8_t *)h->w)[100] = 0xff;
    for (int i = 0; i < 1; i++)
        h->scale_inv[i] = 1.0f;
    assert_int_equal(moecal_nvfp4_gpu_quantize(g, true, 64, 32, 128, 1.0f, &res), MOECAL_OK);
    assert_int_equal(res.nonfinite, 1);
    assert_true(res.amax == 1.0f);
    uint16_t *x = h->w;
    for (int i = 0; i < 64 * 32; i++)
        x[i] = 0x3f80;
    x[7] = 0x7f80;
    x[9] = 0xffc1;
    assert_int_equal(moecal_nvfp4_gpu_quantize(g, false, 64, 32, 1, 1.0f, &res), MOECAL_OK);
    assert_int_equal(res.nonfinite, 2);
    assert_true(res.amax == 1.0f);
    /* what does not fit the buffers is refused, not overrun */
    assert_int_equal(moecal_nvfp4_gpu_quantize(g, false, 7168, 2064, 1, 1.0f, &res),
                     MOECAL_ERR_INTERNAL);
    moecal_nvfp4_gpu_destroy(g);
}

static void test_registry(void **state)
{
    (void)state;
    assert_ptr_equal(moecal_backend_find("cuda"), &moecal_backend_cuda);
    assert_true(moecal_backend_cuda.available());
    assert_ptr_equal(moecal_backend_auto(), &moecal_backend_cuda);
}

int main(int argc, char **argv)
{
    if (!moecal_backend_cuda.available()) {
        printf("no usable CUDA device: skipped\n");
        return 77;
    }
    if (argc > 1)
        cmocka_set_test_filter(argv[1]);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deepseek_odd_shapes),
        cmocka_unit_test(test_deepseek_h200_i72),
        cmocka_unit_test(test_deepseek_wide),
        cmocka_unit_test(test_softmax_k1_and_kE),
        cmocka_unit_test(test_many_slots),
        cmocka_unit_test(test_ties),
        cmocka_unit_test(test_skip_rows),
        cmocka_unit_test(test_all_experts),
        cmocka_unit_test(test_async_misuse),
        cmocka_unit_test(test_memory_limit_and_device),
        cmocka_unit_test(test_fp8_weights),
        cmocka_unit_test(test_dgemm_router_exactness),
        cmocka_unit_test(test_logit_precisions),
        cmocka_unit_test(test_nvfp4_quantizer),
        cmocka_unit_test(test_registry),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
