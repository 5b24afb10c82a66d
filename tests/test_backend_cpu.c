/* test_backend_cpu.c - the CPU backend's own cases; what every backend must
 * do is in test_backends.c.
 *
 * The CPU backend is the reference the others are compared with, so its
 * results must not depend on the number of threads: 1 and 2 threads give
 * the same bits, in one chunk and in odd chunks, also for a hot expert
 * whose rows span several GEMM blocks.  It has no device, so its copy time
 * is zero.  The registry finds it by name and as "auto" without a GPU.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backendlib.h"

static const moecal_backend_ops *const cpu = &moecal_backend_cpu;

/* The reference, then 1 and 2 threads (the same bits) in one chunk and in
 * chunks of 77 (counts and amax(x) the same bits, amax(h) within GEMM
 * rounding). */
static void check_threads(const problem *p, bool all)
{
    int nloc = p->e1 - p->e0;
    result want = result_new(nloc), one = result_new(nloc), two = result_new(nloc);
    result chunked = result_new(nloc);

    reference(p, all, &want);
    run_backend(cpu, p, all, 1, p->ntok, false, &one);
    compare(p, all, "1 thread", &one, "the reference", &want);
    run_backend(cpu, p, all, 2, p->ntok, false, &two);
    same_bits(p, &one, &two);
    run_backend(cpu, p, all, 2, 77, false, &chunked);
    compare(p, all, "chunks of 77", &chunked, "the reference", &want);
    assert_memory_equal(chunked.tokens, one.tokens, (size_t)nloc * sizeof(int64_t));
    assert_memory_equal(chunked.amax_x, one.amax_x, (size_t)nloc * sizeof(float));
    result_free(&want);
    result_free(&one);
    result_free(&two);
    result_free(&chunked);
}

static void test_threads(void **state)
{
    (void)state;
    problem p;
    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 3, 9, 301, 11);
    check_threads(&p, false);
    check_threads(&p, true);
    problem_free(&p);
    problem_make(&p, MOECAL_SCORING_SOFTMAX, 13, 1, 1, 1, 45, 23, 4, 11, 257, 13);
    check_threads(&p, false);
    problem_free(&p);
}

static void test_hot_expert_spans_blocks(void **state)
{
    (void)state;
    problem p;
    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 3, 9, 1100, 12);
    /* expert 5 gets every token through its bias: 1100 rows, 3 GEMM blocks */
    p.bias[5] = 10.0f;
    p.one = -1;   /* the hot group may crowd out the one-token expert's group */
    check_threads(&p, false);
    result r = result_new(6);
    run_backend(cpu, &p, false, 2, p.ntok, false, &r);
    assert_int_equal(r.tokens[5 - 3], 1100);
    result_free(&r);
    problem_free(&p);
}

static void test_no_copy_time(void **state)
{
    (void)state;
    problem p;
    double t[MOECAL_NPHASE];
    moecal_chunk_stats st = {NULL, NULL, NULL};

    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 4, 4, 50, 17);
    moecal_backend *b = make_backend(cpu, &p, false, 2, 64);
    assert_int_equal(cpu->run_chunk(b, p.x, 50, NULL, &st), MOECAL_OK);
    cpu->timings(b, t);
    assert_true(t[MOECAL_PHASE_COPY] == 0.0);
    assert_null(cpu->submit_chunk);
    cpu->destroy(b);
    problem_free(&p);
}

static void test_registry(void **state)
{
    (void)state;
    assert_ptr_equal(moecal_backend_find("cpu"), cpu);
    assert_null(moecal_backend_find("tpu"));
    assert_null(moecal_backend_find(NULL));
    assert_non_null(moecal_backend_auto());
    assert_ptr_equal(moecal_backend_find("auto"), moecal_backend_auto());
    bool found = false;
    for (int i = 0; moecal_backend_at(i); i++)
        found |= moecal_backend_at(i) == cpu;
    assert_true(found);
    assert_null(moecal_backend_at(-1));
#ifdef HAVE_CUDA
    assert_ptr_equal(moecal_backend_find("cuda"), &moecal_backend_cuda);
#else
    assert_null(moecal_backend_find("cuda"));
    assert_ptr_equal(moecal_backend_auto(), cpu);
#endif
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_hot_expert_spans_blocks),
        cmocka_unit_test(test_no_copy_time),
        cmocka_unit_test(test_registry),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
