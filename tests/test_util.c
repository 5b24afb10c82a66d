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
#include <sys/stat.h>
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

static void test_printable(void **state)
{
    char buf[16];
    (void)state;
    assert_string_equal(moecal_printable(buf, sizeof buf, "layers"), "layers");
    assert_string_equal(moecal_printable(buf, sizeof buf, "a\nb\x7f"), "a\\x0ab\\x7f");
    /* cut with "..." when it does not fit, the NUL always inside */
    assert_string_equal(moecal_printable(buf, sizeof buf, "0123456789abcdefghij"),
                        "0123456789a...");
    assert_string_equal(moecal_printable(buf, 4, "abcdef"), "");
    assert_string_equal(moecal_printable(buf, sizeof buf, ""), "");
}

static void test_file_kind(void **state)
{
    (void)state;
    assert_string_equal(moecal_file_kind(S_IFREG | 0644), "a regular file");
    assert_string_equal(moecal_file_kind(S_IFDIR | 0755), "a directory");
    assert_string_equal(moecal_file_kind(S_IFIFO), "a FIFO");
    assert_string_equal(moecal_file_kind(S_IFLNK), "a symbolic link");
    assert_string_equal(moecal_file_kind(0), "not a file");
}

static void test_carve(void **state)
{
    (void)state;
    moecal_carve c = {0};
    float *a = moecal_carve_take(&c, 3, sizeof(float));
    double *b = moecal_carve_take(&c, 0, sizeof(double));
    int64_t *d = moecal_carve_take(&c, 100, sizeof(int64_t));

    /* sizing: no places yet; each array rounded up to the alignment */
    assert_null(a);
    assert_null(d);
    assert_int_equal(c.used, 64 + 64 + 832);
    assert_true(moecal_carve_alloc(&c));
    a = moecal_carve_take(&c, 3, sizeof(float));
    b = moecal_carve_take(&c, 0, sizeof(double));
    d = moecal_carve_take(&c, 100, sizeof(int64_t));
    assert_ptr_equal(a, c.block);
    assert_true((char *)b == c.block + 64 && (char *)d == c.block + 128);
    assert_int_equal((uintptr_t)c.block % MOECAL_CARVE_ALIGN, 0);
    d[99] = 7;   /* the last element is inside the block (ASan would say) */
    free(c.block);

    moecal_carve o = {0};
    (void)moecal_carve_take(&o, SIZE_MAX / 2, 4);
    assert_false(moecal_carve_alloc(&o));
    assert_null(o.block);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_read_file),
        cmocka_unit_test(test_path_join),
        cmocka_unit_test(test_json_kind),
        cmocka_unit_test(test_percentile_and_clock),
        cmocka_unit_test(test_printable),
        cmocka_unit_test(test_file_kind),
        cmocka_unit_test(test_carve),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
