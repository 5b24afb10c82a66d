/* sgemm_rate.c - the CPU backend's GEMM ceiling: OpenBLAS sgemm GFLOP/s for
 * [m x k] x [k x n] (the fused w1|w3 GEMM of one expert: k = hidden,
 * n = 2 * intermediate), median of several runs.
 *   sgemm_rate M K N [REPS] */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    int m, k, n, reps;
    float *a, *b, *c;
    double *t;

    if (argc < 4) {
        fprintf(stderr, "usage: sgemm_rate M K N [REPS]\n");
        return 2;
    }
    m = atoi(argv[1]);
    k = atoi(argv[2]);
    n = atoi(argv[3]);
    reps = argc > 4 ? atoi(argv[4]) : 7;
    a = malloc((size_t)m * k * sizeof *a);
    b = malloc((size_t)k * n * sizeof *b);
    c = malloc((size_t)m * n * sizeof *c);
    t = malloc((size_t)reps * sizeof *t);
    if (!a || !b || !c || !t)
        return 1;
    srand(1);
    for (size_t i = 0; i < (size_t)m * k; i++)
        a[i] = (float)rand() / RAND_MAX - 0.5f;
    for (size_t i = 0; i < (size_t)k * n; i++)
        b[i] = (float)rand() / RAND_MAX - 0.5f;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a, k, b, k, 0.0f, c, n);
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, a, k, b, k, 0.0f, c,
                    n);
        t[r] = now() - t0;
    }
    qsort(t, (size_t)reps, sizeof *t, cmp);
    printf("sgemm %d x %d x %d: median %.4f s, %.1f GFLOP/s\n", m, k, n, t[reps / 2],
           2.0 * m * k * n / t[reps / 2] / 1e9);
    free(a);
    free(b);
    free(c);
    free(t);
    return 0;
}
