/* test_util.c - the helpers of src/util.c: whole-file reads and their
 * limit, path joins that refuse to truncate, JSON kind names, percentiles
 * and the clock. */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "util.h"

static void test_read_file(void **state)
{
    (void)state;
    char path[] = "/tmp/moecal-test-util-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "{\"a\": 1}", 8), 8);
    close(fd);
    char *buf;
    size_t len;
    assert_int_equal(moecal_read_file(path, "the file", 64, &buf, &len), MOECAL_OK);
    assert_int_equal(len, 8);
    assert_string_equal(buf, "{\"a\": 1}");   /* NUL-terminated */
    free(buf);
    assert_int_equal(moecal_read_file(path, "config.json", 7, &buf, &len), MOECAL_ERR_FORMAT);
    assert_non_null(strstr(moecal_error_message(), "8 bytes is more than the 7 allowed for "
                                                   "config.json"));
    assert_null(buf);
    unlink(path);
    assert_int_equal(moecal_read_file(path, "the file", 64, &buf, &len), MOECAL_ERR_IO);
    assert_int_equal(moecal_read_file("/tmp", "the index", 64, &buf, &len), MOECAL_ERR_FORMAT);
    assert_non_null(strstr(moecal_error_message(), "the index is a directory"));
}

static void test_path_join(void **state)
{
    (void)state;
    char buf[12];
    assert_int_equal(moecal_path_join(buf, sizeof buf, "dir", "name"), MOECAL_OK);
    assert_string_equal(buf, "dir/name");
    assert_int_equal(moecal_path_join(buf, sizeof buf, "dir", "name.json"), MOECAL_ERR_USAGE);
    assert_string_equal(buf, "");               /* never a truncated path */
    assert_non_null(strstr(moecal_error_message(), "dir/name.json: a path of 13 bytes, more "
                                                   "than the 11"));
}

static void test_json_kind(void **state)
{
    (void)state;
    json_t *v[] = {json_object(), json_array(), json_string("x"), json_integer(1),
                   json_real(0.5), json_true(), json_false(), json_null()};
    const char *want[] = {"an object", "an array", "a string", "an integer", "a real number",
                          "true", "false", "null"};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        assert_string_equal(moecal_json_kind(v[i]), want[i]);
        json_decref(v[i]);
    }
}

static void test_percentile_and_clock(void **state)
{
    (void)state;
    double x[] = {4, 1, 3, 2};
    moecal_sort_doubles(x, 4);
    assert_true(x[0] == 1 && x[3] == 4);
    assert_true(moecal_percentile_sorted(x, 4, 0.5) == 2.5);   /* numpy's linear */
    assert_true(moecal_percentile_sorted(x, 4, 1.0) == 4.0);
    assert_true(moecal_percentile_sorted(x, 0, 0.5) == 0.0);
    double t0 = moecal_now(), t1 = moecal_now();
    assert_true(t0 > 0 && t1 >= t0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_read_file),
        cmocka_unit_test(test_path_join),
        cmocka_unit_test(test_json_kind),
        cmocka_unit_test(test_percentile_and_clock),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
