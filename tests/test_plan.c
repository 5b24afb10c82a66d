/* test_plan.c - the arithmetic of `moecal calibrate --plan` (plan.c): how
 * ranks fall on nodes, what each leader reads and receives, the window, the
 * collectives and the predicted time. */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <string.h>

#include "plan.h"

static moecal_model_config model(void)
{
    moecal_model_config m;
    memset(&m, 0, sizeof m);
    m.family = MOECAL_FAMILY_DEEPSEEK_V3;
    m.scoring = MOECAL_SCORING_SIGMOID;
    m.hidden_size = 64;
    m.moe_intermediate_size = 32;
    m.n_routed_experts = 10;
    m.num_experts_per_tok = 2;
    m.n_group = 1;
    m.topk_group = 1;
    m.has_correction_bias = true;
    return m;
}

static void test_split_and_bytes(void **state)
{
    (void)state;
    moecal_model_config m = model();
    uint64_t wb[7], fb[7];
    moecal_plan_job job = {.cfg = &m, .ops = &moecal_backend_cpu, .L = 3, .T = 1001,
                           .chunk = 300, .act_elem = 2, .nodes = 3, .ranks = 7, .nslots = 2,
                           .threads = 1, .weight_bytes = wb, .first_layer_bytes = fb,
                           .read_gbps = 1.0, .tokens_per_s = 1e9};
    moecal_plan p;
    uint64_t tokens = 0, exchange = 0;

    for (int r = 0; r < 7; r++) {
        wb[r] = 3000000 * (uint64_t)(r + 1);
        fb[r] = 1000000 * (uint64_t)(r + 1);
    }
    assert_int_equal(moecal_plan_compute(&job, &p), MOECAL_OK);
    /* 7 ranks on 3 nodes: 3, 2, 2 */
    const int node_of[7] = {0, 0, 0, 1, 1, 2, 2};
    for (int r = 0; r < 7; r++)
        assert_int_equal(p.rank[r].node, node_of[r]);
    assert_int_equal(p.node[0].ranks, 3);
    assert_int_equal(p.node[2].ranks, 2);
    /* experts split as the job does: 10 over 7 */
    assert_int_equal(p.rank[0].e0, 0);
    assert_int_equal(p.rank[6].e1, 10);
    for (int r = 0; r < 7; r++) {
        tokens += p.rank[r].token_bytes;
        exchange += p.rank[r].exchange_bytes;
        /* only leaders read tokens */
        if (r != 0 && r != 3 && r != 5)
            assert_int_equal(p.rank[r].token_bytes, 0);
    }
    /* every row of every layer read once, at 2 bytes an element */
    assert_int_equal(tokens, 3ull * 1001 * 64 * 2);
    /* each leader receives the rows it did not read (and their skip bytes) */
    assert_int_equal(exchange, 3ull * 1001 * 2 * (64 * 2 + 1));
    assert_int_equal(p.steps, 3 * 4);
    assert_int_equal(p.coll_world, 2 * 12 + 3);
    assert_int_equal(p.coll_node, 12);
    assert_int_equal(p.coll_leaders, 12 * 4);
    /* the window: 2 slots of header, 300 rows and 300 skip bytes, 64-aligned */
    assert_int_equal(p.node[1].window_bytes, 2 * ((64 + 300 * 128 + 300 + 63) / 64 * 64));
    /* node 0 reads its leader's tokens and three ranks' weights at 1 GB/s */
    uint64_t rb = p.rank[0].token_bytes + wb[0] + wb[1] + wb[2];
    assert_int_equal(p.node[0].read_bytes, rb);
    assert_true(p.node[0].read_s > (double)rb / 1e9 * 0.999 &&
                p.node[0].read_s < (double)rb / 1e9 * 1.001);
    /* compute: T x L x n / E / rate for the rank with the most experts */
    assert_true(p.rank[0].compute_s > 1001.0 * 3 * 1 / 10 / 1e9 * 0.999 &&
                p.rank[0].compute_s < 1001.0 * 3 * 1 / 10 / 1e9 * 1.001);
    /* the slowest node sets the time: the first layer's weights, then the
     * larger of the rest of the reads and the compute */
    for (int i = 0; i < 3; i++)
        assert_true(p.time_s >= p.node[i].time_s);
    assert_true(p.read_bound);
    moecal_plan_free(&p);

    /* nothing to plan */
    job.T = 0;
    assert_int_equal(moecal_plan_compute(&job, &p), MOECAL_ERR_USAGE);
    job.T = 10;
    job.ranks = 2;
    assert_int_equal(moecal_plan_compute(&job, &p), MOECAL_ERR_USAGE);
}

static void test_one_node(void **state)
{
    (void)state;
    moecal_model_config m = model();
    uint64_t wb[2] = {0, 0}, fb[2] = {0, 0};
    moecal_plan_job job = {.cfg = &m, .ops = &moecal_backend_cpu, .L = 1, .T = 100,
                           .chunk = 100, .act_elem = 4, .nodes = 1, .ranks = 2, .nslots = 3,
                           .threads = 1, .weight_bytes = wb, .first_layer_bytes = fb,
                           .read_gbps = 1.0, .tokens_per_s = 1.0};
    moecal_plan p;

    assert_int_equal(moecal_plan_compute(&job, &p), MOECAL_OK);
    assert_int_equal(p.rank[0].token_bytes, 100ull * 64 * 4);   /* float32 file */
    assert_int_equal(p.rank[0].exchange_bytes, 0);
    assert_int_equal(p.coll_leaders, 1);
    /* compute-bound: 100 tokens at 1 token/s for half the experts */
    assert_false(p.read_bound);
    assert_true(p.time_s > 49.9 && p.time_s < 50.1);
    /* the CPU backend's own buffers are in each rank's host memory */
    assert_true(p.rank[0].host_bytes > 10ull * 64 * 4 * 3);
    assert_int_equal(p.rank[1].gpu_bytes, 0);
    moecal_plan_free(&p);
}

/* Each backend sizes itself without allocating; a CUDA rank needs no GPU
 * to be planned. */
static void test_backend_memory(void **state)
{
    (void)state;
    moecal_model_config m = model();
    moecal_backend_config bc = {.model = &m, .e0 = 2, .e1 = 7, .max_chunk_tokens = 1000,
                                .device = -1, .threads = 2};
    uint64_t host = 0, dev = 1;
    const uint64_t w13 = 5ull * 2 * 32 * 64;   /* 5 experts' w1|w3 elements */

    assert_int_equal(moecal_backend_cpu.memory(&bc, &host, &dev), MOECAL_OK);
    assert_int_equal(dev, 0);
    assert_true(host > w13 * 4 + 1000ull * 64 * 4);   /* float weights and chunk rows */
    bc.max_chunk_tokens = 0;
    assert_int_not_equal(moecal_backend_cpu.memory(&bc, &host, &dev), MOECAL_OK);
#ifdef HAVE_CUDA
    bc.max_chunk_tokens = 1000;
    assert_non_null(moecal_backend_cuda.memory);
    assert_int_equal(moecal_backend_cuda.memory(&bc, &host, &dev), MOECAL_OK);
    assert_true(dev > w13 * 2 + 1000ull * 64 * 2);    /* bf16 weights and chunk rows */
    bc.e1 = 2;                                        /* no expert: nothing on the GPU */
    assert_int_equal(moecal_backend_cuda.memory(&bc, &host, &dev), MOECAL_OK);
    assert_int_equal(dev, 0);
#endif
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_split_and_bytes),
        cmocka_unit_test(test_one_node),
        cmocka_unit_test(test_backend_memory),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
