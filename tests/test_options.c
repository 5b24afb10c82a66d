/* test_options.c - unit tests of the option tables (options.c) and of the
 * backends' own settings added to a command's table (backend.c). */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "options.h"
#ifdef HAVE_CUDA
#include "backend_cuda.h"
#endif

static const moecal_optdef defs[] = {
    {"chunk-tokens", 'c', MOECAL_OPT_INT, "4096", NULL, "N", "tokens", 0, 1, 1 << 20,
     MOECAL_UNBOUND},
    {"backend", 'b', MOECAL_OPT_CHOICE, "auto", "cpu|cuda|auto", NULL, "backend", 0, 0, 0,
     MOECAL_UNBOUND},
    {"force", 'f', MOECAL_OPT_FLAG, "0", NULL, NULL, "force", 0, 0, 0, MOECAL_UNBOUND},
    {"scale", 0, MOECAL_OPT_FLOAT, "1.5", NULL, NULL, "scale", 0, 0.25, 2.0, MOECAL_UNBOUND},
    {"model", 'm', MOECAL_OPT_STRING, NULL, NULL, "DIR", "model", 0, 0, 0, MOECAL_UNBOUND},
    {"secret", 0, MOECAL_OPT_STRING, NULL, NULL, NULL, "cli only",
     MOECAL_OPTF_NOENV | MOECAL_OPTF_NOCONF, 0, 0, MOECAL_UNBOUND},
    MOECAL_OPT_END
};

static moecal_status parse(int argc, char **argv, moecal_opts **o)
{
    return moecal_opts_parse("calibrate", defs, "[FILE]", argc, argv, o);
}

static void test_defaults(void **state)
{
    char *argv[] = {"calibrate", NULL};
    moecal_opts *o;
    (void)state;
    assert_int_equal(parse(1, argv, &o), MOECAL_OK);
    assert_int_equal(moecal_opts_int(o, "chunk-tokens"), 4096);
    assert_string_equal(moecal_opts_str(o, "backend"), "auto");
    assert_false(moecal_opts_flag(o, "force"));
    assert_true(moecal_opts_float(o, "scale") == 1.5);
    assert_null(moecal_opts_str(o, "model"));
    assert_false(moecal_opts_isset(o, "model"));
    assert_string_equal(moecal_opts_source(o, "chunk-tokens"), "default");
    assert_string_equal(moecal_opts_source(o, "model"), "unset");
    moecal_opts_free(o);
}

static void test_cli_forms(void **state)
{
    char *argv[] = {"calibrate", "-c", "8k", "--backend=cpu", "-f", "--model", "m", "pos1",
                    "--", "--not-an-option", NULL};
    moecal_opts *o;
    (void)state;
    assert_int_equal(parse(10, argv, &o), MOECAL_OK);
    assert_int_equal(moecal_opts_int(o, "chunk-tokens"), 8192);
    assert_string_equal(moecal_opts_str(o, "backend"), "cpu");
    assert_true(moecal_opts_flag(o, "force"));
    assert_string_equal(moecal_opts_str(o, "model"), "m");
    assert_int_equal(moecal_opts_npos(o), 2);
    assert_string_equal(moecal_opts_pos(o, 0), "pos1");
    assert_string_equal(moecal_opts_pos(o, 1), "--not-an-option");
    assert_string_equal(moecal_opts_source(o, "backend"), "command line");
    moecal_opts_free(o);
}

static void test_bad_values(void **state)
{
    char *a1[] = {"calibrate", "--chunk-tokens", "0", NULL};
    char *a2[] = {"calibrate", "--backend", "tpu", NULL};
    char *a3[] = {"calibrate", "--force=maybe", NULL};
    char *a4[] = {"calibrate", "--scale", "x1", NULL};
    char *a5[] = {"calibrate", "--nope", NULL};
    char *a6[] = {"calibrate", "--chunk-tokens", "99999999999999999999", NULL};
    char *a7[] = {"calibrate", "--scale", "2.5", NULL};
    char *a8[] = {"calibrate", "--scale", "nan", NULL};
    char *a9[] = {"calibrate", "--scale", "0.25", NULL};
    moecal_opts *o;
    (void)state;
    assert_int_equal(parse(3, a1, &o), MOECAL_ERR_USAGE);
    assert_non_null(strstr(moecal_error_message(), "between 1 and"));
    assert_int_equal(parse(3, a2, &o), MOECAL_ERR_USAGE);
    assert_non_null(strstr(moecal_error_message(), "cpu|cuda|auto"));
    assert_int_equal(parse(2, a3, &o), MOECAL_ERR_USAGE);
    assert_int_equal(parse(3, a4, &o), MOECAL_ERR_USAGE);
    assert_int_equal(parse(2, a5, &o), MOECAL_ERR_USAGE);
    assert_non_null(strstr(moecal_error_message(), "'--nope'"));
    assert_int_equal(parse(3, a6, &o), MOECAL_ERR_USAGE);
    /* a float range in the table: out of it, NaN refused; the bounds allowed */
    assert_int_equal(parse(3, a7, &o), MOECAL_ERR_USAGE);
    assert_non_null(strstr(moecal_error_message(),
                           "'scale' is 2.5 but must be between 0.25 and 2"));
    assert_int_equal(parse(3, a8, &o), MOECAL_ERR_USAGE);
    assert_int_equal(parse(3, a9, &o), MOECAL_OK);
    assert_true(moecal_opts_float(o, "scale") == 0.25);
    moecal_opts_free(o);
}

static void test_precedence(void **state)
{
    char path[] = "/tmp/moecal-test-options-XXXXXX";
    int fd = mkstemp(path);
    FILE *fp;
    moecal_opts *o;
    char cfg[600];
    (void)state;
    assert_true(fd >= 0);
    fp = fdopen(fd, "w");
    fprintf(fp, "model = from-file\n[calibrate]\nchunk_tokens = 100\nbackend = cpu\n"
                "[synth]\nwhatever = 1\n");
    fclose(fp);
    snprintf(cfg, sizeof cfg, "--config=%s", path);
    setenv("MOECAL_CHUNK_TOKENS", "200", 1);
    {
        char *argv[] = {"calibrate", cfg, NULL};
        assert_int_equal(parse(2, argv, &o), MOECAL_OK);
        assert_int_equal(moecal_opts_int(o, "chunk-tokens"), 200);   /* env > file */
        assert_string_equal(moecal_opts_str(o, "backend"), "cpu");   /* file > default */
        assert_string_equal(moecal_opts_str(o, "model"), "from-file");
        assert_non_null(strstr(moecal_opts_source(o, "backend"), ":4"));
        moecal_opts_free(o);
    }
    {
        char *argv[] = {"calibrate", cfg, "-c", "300", NULL};
        assert_int_equal(parse(4, argv, &o), MOECAL_OK);
        assert_int_equal(moecal_opts_int(o, "chunk-tokens"), 300);   /* cli > env */
        moecal_opts_free(o);
    }
    unsetenv("MOECAL_CHUNK_TOKENS");
    /* A key that is not an option, and one that may not come from a file. */
    fp = fopen(path, "w");
    fprintf(fp, "[calibrate]\n\nsecret = x\n");
    fclose(fp);
    {
        char *argv[] = {"calibrate", cfg, NULL};
        assert_int_equal(parse(2, argv, &o), MOECAL_ERR_USAGE);
        assert_non_null(strstr(moecal_error_message(), ":3: unknown key 'secret'"));
    }
    setenv("MOECAL_SECRET", "y", 1);
    {
        char *argv[] = {"calibrate", NULL};
        assert_int_equal(parse(1, argv, &o), MOECAL_OK);
        assert_null(moecal_opts_str(o, "secret"));
        moecal_opts_free(o);
    }
    unsetenv("MOECAL_SECRET");
    unlink(path);
}

static void test_backend_options(void **state)
{
    (void)state;
    size_t n = 0, k = 0;
    moecal_optdef *all = moecal_backend_add_options(defs);
    assert_non_null(all);
    while (defs[n].name)
        n++;
    while (all[k].name)
        k++;
#ifdef HAVE_CUDA
    assert_int_equal(k, n + 5);   /* cuda-step, -piece, -streams, -prio, -router */
    assert_string_equal(all[n].name, "cuda-step");
#else
    assert_int_equal(k, n);       /* the CPU backend has no settings of its own */
#endif
    assert_string_equal(all[0].name, defs[0].name);

    char *argv[] = {"calibrate", NULL, NULL, NULL};
    int argc = 1;
#ifdef HAVE_CUDA
    argv[argc++] = "--cuda-streams";
    argv[argc++] = "2";
#endif
    moecal_opts *o;
    assert_int_equal(moecal_opts_parse("calibrate", all, "[FILE]", argc, argv, &o), MOECAL_OK);
    char *cpu = moecal_backend_settings(&moecal_backend_cpu, o);
    assert_string_equal(cpu, "");
    free(cpu);
#ifdef HAVE_CUDA
    char *cuda = moecal_backend_settings(&moecal_backend_cuda, o);
    assert_string_equal(cuda, "cuda-step=0 cuda-piece=0 cuda-streams=2 cuda-prio=0 "
                              "cuda-router=dgemm");
    free(cuda);
    /* the backend's rows are stored in its own struct, not the command's */
    for (size_t i = n; i < k; i++)
        assert_int_equal(all[i].field, MOECAL_FIELD_NONE);
    moecal_cuda_settings st = {0};
    assert_int_equal(moecal_opts_bind(o, moecal_backend_cuda.options, &st), MOECAL_OK);
    assert_int_equal(st.streams, 2);
    assert_int_equal(st.prio, 0);
    assert_string_equal(st.router, "dgemm");
#endif
    moecal_opts_free(o);
    free(all);
}

/* Values stored in the fields the table names. */
typedef struct bound_args {
    long long chunk;
    const char *backend, *model;
    bool force;
    double scale;
    struct { long long verbose; } inner;
} bound_args;

#define B(f) MOECAL_AT(bound_args, f)

static const moecal_optdef bound_defs[] = {
    {"chunk-tokens", 'c', MOECAL_OPT_INT, "4096", NULL, "N", "tokens", 0, 1, 1 << 20, B(chunk)},
    {"backend", 'b', MOECAL_OPT_CHOICE, "auto", "cpu|cuda|auto", NULL, "backend", 0, 0, 0,
     B(backend)},
    {"force", 'f', MOECAL_OPT_FLAG, "0", NULL, NULL, "force", 0, 0, 0, B(force)},
    {"scale", 0, MOECAL_OPT_FLOAT, "1.5", NULL, NULL, "scale", 0, 0.25, 2.0, B(scale)},
    {"model", 'm', MOECAL_OPT_STRING, NULL, NULL, "DIR", "model", 0, 0, 0, B(model)},
    {"verbose", 'v', MOECAL_OPT_INT, "1", NULL, NULL, "level", 0, 0, 3, B(inner.verbose)},
    {"unbound", 0, MOECAL_OPT_INT, "7", NULL, NULL, "read by name", 0, 0, 0, MOECAL_UNBOUND},
    MOECAL_OPT_END
};

static void test_bind(void **state)
{
    (void)state;
    char *argv[] = {"calibrate", "-c", "2k", "--force", "--scale=0.5", "-v", "3", "-b", "cpu",
                    NULL};
    moecal_opts *o;
    bound_args a;

    memset(&a, 0xa5, sizeof a);
    assert_int_equal(moecal_opts_parse("calibrate", bound_defs, NULL, 9, argv, &o), MOECAL_OK);
    assert_int_equal(moecal_opts_bind(o, bound_defs, &a), MOECAL_OK);
    assert_int_equal(a.chunk, 2048);
    assert_string_equal(a.backend, "cpu");
    assert_true(a.force);
    assert_true(a.scale == 0.5);
    assert_null(a.model);               /* unset: NULL */
    assert_int_equal(a.inner.verbose, 3);
    assert_int_equal(moecal_opts_int(o, "unbound"), 7);
    moecal_opts_free(o);

    /* defaults */
    assert_int_equal(moecal_opts_parse("calibrate", bound_defs, NULL, 1, argv, &o), MOECAL_OK);
    assert_int_equal(moecal_opts_bind(o, bound_defs, &a), MOECAL_OK);
    assert_int_equal(a.chunk, 4096);
    assert_false(a.force);
    assert_true(a.scale == 1.5);
    /* a table with an option o was not parsed with */
    assert_int_equal(moecal_opts_bind(o, (moecal_optdef[]){
                         {"other", 0, MOECAL_OPT_FLAG, "0", NULL, NULL, "x", 0, 0, 0, B(force)},
                         MOECAL_OPT_END}, &a), MOECAL_ERR_INTERNAL);
    moecal_opts_free(o);

    /* a field whose C type does not suit the option is refused by the parser */
    moecal_optdef wrong[] = {
        {"force", 'f', MOECAL_OPT_FLAG, "0", NULL, NULL, "force", 0, 0, 0, B(chunk)},
        MOECAL_OPT_END
    };
    assert_int_equal(moecal_opts_parse("calibrate", wrong, NULL, 1, argv, &o),
                     MOECAL_ERR_INTERNAL);
    assert_null(o);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_cli_forms),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test(test_precedence),
        cmocka_unit_test(test_backend_options),
        cmocka_unit_test(test_bind),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
