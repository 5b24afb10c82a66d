/* test_fixup.c - the peer-max fixup (moecal_peer_max_fixup) without an end
 * to end run: on every rank count (tests/fixup.sh runs it on 1 to 4 ranks,
 * ranks holding 0 to 3 experts), top-k mode gives every expert of a layer
 * the layer's maximum per projection over all experts of all ranks, and
 * all-experts mode leaves each expert's own amax. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "calibrate.h"

static int rank, size;

/* The calibrated amax of expert e (global index) of layer l, projection q:
 * a value every rank can compute for every expert; some are 0 (never
 * routed). */
static float cal_value(int l, int e, int q)
{
    if ((e + l) % 4 == 3)
        return 0.0f;
    return (float)((e * 37 + l * 11 + q * 5) % 23) / 4.0f + (float)q;
}

/* experts [e0, e0 + n) of E on this rank: 0 to 3 per rank, some with none */
static void my_experts(int *e0, int *n, int *E)
{
    *E = 0;
    for (int r = 0; r < size; r++) {
        int c = (r * 2 + 1) % 4;
        if (r == rank) {
            *e0 = *E;
            *n = c;
        }
        *E += c;
    }
}

static void check(bool all)
{
    enum { L = 3 };
    int e0 = 0, n = 0, E;
    my_experts(&e0, &n, &E);
    float *cal = calloc((size_t)L * (size_t)(n ? n : 1) * 3, sizeof *cal);
    float *fin = calloc((size_t)L * (size_t)(n ? n : 1) * 3, sizeof *fin);
    long long raised = -1, want_raised = 0;
    assert_non_null(cal);
    assert_non_null(fin);
    for (int l = 0; l < L; l++)
        for (int k = 0; k < n; k++)
            for (int q = 0; q < 3; q++)
                cal[((size_t)l * n + k) * 3 + q] = cal_value(l, e0 + k, q);
    assert_int_equal(moecal_peer_max_fixup(MPI_COMM_WORLD, cal, L, n, all, fin, &raised),
                     MOECAL_OK);
    for (int l = 0; l < L; l++)
        for (int q = 0; q < 3; q++) {
            float m = 0.0f;
            for (int e = 0; e < E; e++)
                m = fmaxf(m, cal_value(l, e, q));
            for (int k = 0; k < n; k++) {
                float c = cal[((size_t)l * n + k) * 3 + q], f = fin[((size_t)l * n + k) * 3 + q];
                float want = all ? c : m;
                if (f != want)
                    fail_msg("rank %d layer %d expert %d proj %d: %g, want %g", rank, l, e0 + k,
                             q, (double)f, (double)want);
                want_raised += f != c;
            }
        }
    assert_int_equal(raised, want_raised);
    if (all)
        assert_int_equal(raised, 0);
    free(cal);
    free(fin);
}

static void test_topk(void **state)
{
    (void)state;
    check(false);
}

static void test_all_experts(void **state)
{
    (void)state;
    check(true);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_topk),
        cmocka_unit_test(test_all_experts),
    };
    int rc;
    if (MPI_Init(&argc, &argv) != MPI_SUCCESS)
        return 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    /* every rank's verdict: a failure anywhere fails the run */
    MPI_Allreduce(MPI_IN_PLACE, &rc, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return rc;
}
