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

static const moecal_optdef defs[] = {
    {"chunk-tokens", 'c', MOECAL_OPT_INT, "4096", NULL, "N", "tokens", 0, 1, 1 << 20},
    {"backend", 'b', MOECAL_OPT_CHOICE, "auto", "cpu|cuda|auto", NULL, "backend", 0, 0, 0},
    {"force", 'f', MOECAL_OPT_FLAG, "0", NULL, NULL, "force", 0, 0, 0},
    {"scale", 0, MOECAL_OPT_FLOAT, "1.5", NULL, NULL, "scale", 0, 0.25, 2.0},
    {"model", 'm', MOECAL_OPT_STRING, NULL, NULL, "DIR", "model", 0, 0, 0},
    {"secret", 0, MOECAL_OPT_STRING, NULL, NULL, NULL, "cli only", MOECAL_OPTF_NOENV | MOECAL_OPTF_NOCONF, 0, 0},
    {NULL, 0, 0, NULL, NULL, NULL, NULL, 0, 0, 0}
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
#endif
    moecal_opts_free(o);
    free(all);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_cli_forms),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test(test_precedence),
        cmocka_unit_test(test_backend_options),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
