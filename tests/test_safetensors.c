/* test_safetensors.c - safetensors reader and writer: round trips through the
 * writer, and one hand-made file for every way a header can be wrong. */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "safetensors.h"

/* Beyond safetensors.h (see safetensors.c). */
size_t moecal_st_metadata_count(const moecal_st_file *f);
const char *moecal_st_metadata_key(const moecal_st_file *f, size_t i);
moecal_status moecal_st_writer_write_at(moecal_st_writer *w, const char *name,
                                        uint64_t off, const void *data, size_t nbytes);

#define EXPERT "model.layers.3.mlp.experts.0.gate_proj.weight"

static char tmpdir[1024];

static int group_setup(void **state)
{
    const char *base = getenv("TMPDIR");
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "%s/test_safetensors.XXXXXX", base && *base ? base : "/tmp");
    return mkdtemp(tmpdir) ? 0 : -1;
}

/* The tests make plain files only, all directly in tmpdir. */
static int group_teardown(void **state)
{
    DIR *d = opendir(tmpdir);
    struct dirent *e;
    char p[PATH_MAX];
    (void)state;
    if (!d)
        return -1;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(p, sizeof p, "%s/%s", tmpdir, e->d_name);
        unlink(p);
    }
    closedir(d);
    return rmdir(tmpdir);
}

static void path_of(char *path, const char *name)
{
    snprintf(path, PATH_MAX, "%s/%s", tmpdir, name);
}

static void write_bytes(const char *path, const void *buf, size_t n)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(buf, 1, n, fp), n);
    assert_int_equal(fclose(fp), 0);
}

static unsigned char pattern(size_t i)
{
    return (unsigned char)(i * 131u + 7u);
}

/* A file whose length field says n_field, then the header text, then
 * data_len bytes of data.  Returns the path in path. */
static void make_file_n(char *path, const char *name, uint64_t n_field, const char *header,
                        size_t data_len)
{
    size_t hl = strlen(header);
    unsigned char *buf = malloc(8 + hl + data_len + 1);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)(n_field >> (8 * i));
    memcpy(buf + 8, header, hl);
    for (size_t i = 0; i < data_len; i++)
        buf[8 + hl + i] = pattern(i);
    path_of(path, name);
    write_bytes(path, buf, 8 + hl + data_len);
    free(buf);
}

static void make_file(char *path, const char *name, const char *header, size_t data_len)
{
    make_file_n(path, name, strlen(header), header, data_len);
}

/* The file must be refused with code, the message naming the file and, when
 * given, containing each of the needles (tensor name, numbers). */
static void expect_refused(const char *path, uint64_t max_header, moecal_status code, ...)
{
    moecal_st_file *f = (moecal_st_file *)1;
    moecal_status st;
    const char *msg, *needle;
    va_list ap;

    moecal_error_clear();
    st = moecal_st_open(path, max_header, &f);
    msg = moecal_error_message();
    if (st != code)
        print_error("status %d (%s), expected %d: %s\n", st, moecal_status_name(st), code, msg);
    assert_int_equal(st, code);
    assert_null(f);
    if (strncmp(msg, path, strlen(path)) != 0)
        print_error("message does not start with the file: %s\n", msg);
    assert_true(strncmp(msg, path, strlen(path)) == 0);
    va_start(ap, code);
    while ((needle = va_arg(ap, const char *)) != NULL) {
        if (!strstr(msg, needle))
            print_error("message lacks \"%s\": %s\n", needle, msg);
        assert_non_null(strstr(msg, needle));
    }
    va_end(ap);
}

static moecal_st_file *open_ok(const char *path)
{
    moecal_st_file *f = NULL;
    moecal_status st = moecal_st_open(path, 0, &f);
    if (st != MOECAL_OK)
        print_error("%s\n", moecal_error_message());
    assert_int_equal(st, MOECAL_OK);
    assert_non_null(f);
    return f;
}

/* ------------------------------------------------------------------ dtype */

static void test_dtype_names(void **state)
{
    static const char *names[] = { "F8_E4M3", "BF16", "F16", "F32", "F64", "F8_E5M2", "I8",
                                   "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL" };
    static const size_t sizes[] = { 1, 2, 2, 4, 8, 1, 1, 1, 2, 2, 4, 4, 8, 8, 1 };
    (void)state;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        moecal_dtype t = moecal_dtype_from_name(names[i]);
        assert_int_not_equal(t, MOECAL_DT_UNKNOWN);
        assert_string_equal(moecal_dtype_name(t), names[i]);
        assert_int_equal(moecal_dtype_size(t), sizes[i]);
    }
    assert_int_equal(moecal_dtype_from_name("bf16"), MOECAL_DT_UNKNOWN);
    assert_int_equal(moecal_dtype_from_name("F7_XYZ"), MOECAL_DT_UNKNOWN);
    assert_int_equal(moecal_dtype_from_name(NULL), MOECAL_DT_UNKNOWN);
    assert_int_equal(moecal_dtype_size(MOECAL_DT_UNKNOWN), 0);
    assert_int_equal(moecal_dtype_size((moecal_dtype)999), 0);
    assert_non_null(moecal_dtype_name((moecal_dtype)999));
}

/* ------------------------------------------------------------------ round trips */

typedef struct spec {
    const char *name;
    moecal_dtype dtype;
    int ndim;
    int64_t shape[4];
} spec;

static size_t spec_bytes(const spec *s)
{
    size_t n = moecal_dtype_size(s->dtype);
    for (int d = 0; d < s->ndim; d++)
        n *= (size_t)s->shape[d];
    return n;
}

static void fill(unsigned char *p, size_t n, size_t seed)
{
    for (size_t i = 0; i < n; i++)
        p[i] = pattern(i + seed * 977);
}

static void test_roundtrip_dtypes(void **state)
{
    /* odd shapes, a scalar and an empty tensor, added in no particular order */
    static const spec specs[] = {
        { "w.f8", MOECAL_DT_F8_E4M3, 2, { 3, 5 } },
        { "w.bf16", MOECAL_DT_BF16, 3, { 7, 1, 3 } },
        { "w.f16", MOECAL_DT_F16, 1, { 13 } },
        { "w.f32", MOECAL_DT_F32, 2, { 5, 3 } },
        { "w.f64", MOECAL_DT_F64, 1, { 3 } },
        { "w.e5m2", MOECAL_DT_F8_E5M2, 4, { 1, 3, 1, 7 } },
        { "scalar", MOECAL_DT_F32, 0, { 0 } },
        { "empty", MOECAL_DT_BF16, 2, { 0, 9 } },
        { "bias.u8", MOECAL_DT_U8, 1, { 1 } },
        { "idx.i64", MOECAL_DT_I64, 1, { 2 } },
    };
    const size_t ns = sizeof specs / sizeof specs[0];
    char path[PATH_MAX], tmp[PATH_MAX + 8];
    moecal_st_writer *w;
    moecal_st_file *f;
    unsigned char buf[256], back[256];
    (void)state;

    path_of(path, "roundtrip.safetensors");
    assert_int_equal(moecal_st_writer_create(path, &w), MOECAL_OK);
    assert_int_equal(moecal_st_writer_metadata(w, "format", "pt"), MOECAL_OK);
    assert_int_equal(moecal_st_writer_metadata(w, "producer", "x"), MOECAL_OK);
    assert_int_equal(moecal_st_writer_metadata(w, "producer", "moecal"), MOECAL_OK);
    for (size_t i = 0; i < ns; i++)
        assert_int_equal(moecal_st_writer_add(w, specs[i].name, specs[i].dtype, specs[i].ndim,
                                              specs[i].shape), MOECAL_OK);
    assert_int_equal(moecal_st_writer_write_header(w), MOECAL_OK);
    /* the file appears under its name only once finished */
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    assert_int_equal(access(tmp, F_OK), 0);
    assert_int_not_equal(access(path, F_OK), 0);
    for (size_t i = ns; i-- > 0;) {
        fill(buf, spec_bytes(&specs[i]), i);
        assert_int_equal(moecal_st_writer_write(w, specs[i].name, buf, spec_bytes(&specs[i])),
                         MOECAL_OK);
    }
    assert_int_equal(moecal_st_writer_finish(w), MOECAL_OK);
    assert_int_not_equal(access(tmp, F_OK), 0);

    f = open_ok(path);
    assert_string_equal(moecal_st_path(f), path);
    assert_int_equal(moecal_st_count(f), ns);
    assert_int_equal(moecal_st_data_offset(f) % 8, 0);
    assert_string_equal(moecal_st_metadata(f, "format"), "pt");
    assert_string_equal(moecal_st_metadata(f, "producer"), "moecal");
    assert_null(moecal_st_metadata(f, "absent"));
    assert_int_equal(moecal_st_metadata_count(f), 2);
    assert_string_equal(moecal_st_metadata_key(f, 0), "format");
    assert_null(moecal_st_find(f, "absent"));
    assert_null(moecal_st_find(f, "__metadata__"));
    for (size_t i = 0; i < ns; i++) {
        const moecal_st_tensor *t = moecal_st_find(f, specs[i].name);
        size_t nb = spec_bytes(&specs[i]);
        uint64_t numel = 1;
        assert_non_null(t);
        assert_string_equal(t->name, specs[i].name);
        assert_int_equal(t->dtype, specs[i].dtype);
        assert_string_equal(t->dtype_name, moecal_dtype_name(specs[i].dtype));
        assert_int_equal(t->ndim, specs[i].ndim);
        for (int d = 0; d < t->ndim; d++) {
            assert_int_equal(t->shape[d], specs[i].shape[d]);
            numel *= (uint64_t)specs[i].shape[d];
        }
        assert_int_equal(t->numel, numel);
        assert_int_equal(t->end - t->begin, nb);
        /* the layout keeps every tensor aligned to its element size */
        assert_int_equal((moecal_st_data_offset(f) + t->begin) % moecal_dtype_size(t->dtype), 0);
        fill(buf, nb, i);
        memset(back, 0xee, sizeof back);
        assert_int_equal(moecal_st_read(f, t, back, sizeof back), MOECAL_OK);
        assert_memory_equal(back, buf, nb);
        if (nb > 2) {
            assert_int_equal(moecal_st_read_range(f, t, 1, back, nb - 2), MOECAL_OK);
            assert_memory_equal(back, buf + 1, nb - 2);
        }
    }
    /* tensor_at walks the data in file order */
    for (size_t i = 1; i < ns; i++)
        assert_true(moecal_st_tensor_at(f, i)->begin >= moecal_st_tensor_at(f, i - 1)->end);
    assert_null(moecal_st_tensor_at(f, ns));
    moecal_st_close(f);
}

/* A tensor written in pieces, out of order, as a many-GB tensor would be. */
static void test_writer_pieces(void **state)
{
    enum { N = 1000003 };
    char path[PATH_MAX];
    moecal_st_writer *w;
    moecal_st_file *f;
    const moecal_st_tensor *t;
    unsigned char *buf = malloc(N), *back = malloc(N);
    const int64_t shape[1] = { N };
    size_t piece = 65536;
    (void)state;

    assert_non_null(buf);
    assert_non_null(back);
    fill(buf, N, 3);
    path_of(path, "pieces.safetensors");
    assert_int_equal(moecal_st_writer_create(path, &w), MOECAL_OK);
    assert_int_equal(moecal_st_writer_add(w, "big", MOECAL_DT_U8, 1, shape), MOECAL_OK);
    assert_int_equal(moecal_st_writer_write_header(w), MOECAL_OK);
    for (size_t off = (N / piece) * piece;; off -= piece) {
        size_t n = N - off < piece ? N - off : piece;
        assert_int_equal(moecal_st_writer_write_at(w, "big", off, buf + off, n), MOECAL_OK);
        if (off == 0)
            break;
    }
    /* a piece past the end is refused */
    assert_int_equal(moecal_st_writer_write_at(w, "big", N - 1, buf, 2), MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_st_writer_finish(w), MOECAL_OK);

    f = open_ok(path);
    t = moecal_st_find(f, "big");
    assert_non_null(t);
    assert_int_equal(moecal_st_read(f, t, back, N), MOECAL_OK);
    assert_memory_equal(back, buf, N);
    /* too small a buffer, a range outside the tensor */
    assert_int_equal(moecal_st_read(f, t, back, N - 1), MOECAL_ERR_INTERNAL);
    assert_non_null(strstr(moecal_error_message(), "'big'"));
    assert_int_equal(moecal_st_read_range(f, t, N - 10, back, 11), MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_st_read_range(f, t, UINT64_MAX, back, 2), MOECAL_ERR_INTERNAL);
    moecal_st_close(f);
    free(buf);
    free(back);
}

static void test_writer_no_tensors(void **state)
{
    char path[PATH_MAX];
    moecal_st_writer *w;
    moecal_st_file *f;
    (void)state;

    path_of(path, "none.safetensors");
    assert_int_equal(moecal_st_writer_create(path, &w), MOECAL_OK);
    assert_int_equal(moecal_st_writer_write_header(w), MOECAL_OK);
    assert_int_equal(moecal_st_writer_finish(w), MOECAL_OK);
    f = open_ok(path);
    assert_int_equal(moecal_st_count(f), 0);
    assert_int_equal(moecal_st_data_offset(f), 16);
    assert_null(moecal_st_metadata(f, "format"));
    moecal_st_close(f);
}

static void test_writer_abort(void **state)
{
    char path[PATH_MAX], tmp[PATH_MAX + 8];
    moecal_st_writer *w;
    const int64_t shape[2] = { 2, 2 };
    (void)state;

    path_of(path, "aborted.safetensors");
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    assert_int_equal(moecal_st_writer_create(path, &w), MOECAL_OK);
    assert_int_equal(moecal_st_writer_add(w, "a", MOECAL_DT_F32, 2, shape), MOECAL_OK);
    assert_int_equal(moecal_st_writer_write_header(w), MOECAL_OK);
    assert_int_equal(access(tmp, F_OK), 0);
    moecal_st_writer_abort(w);
    assert_int_not_equal(access(tmp, F_OK), 0);
    assert_int_not_equal(access(path, F_OK), 0);
    moecal_st_writer_abort(NULL);
}

static void test_writer_misuse(void **state)
{
    char path[PATH_MAX], tmp[PATH_MAX + 8];
    moecal_st_writer *w;
    const int64_t shape[2] = { 2, 2 }, bad[1] = { -1 };
    float data[4] = { 1, 2, 3, 4 };
    (void)state;

    path_of(path, "misuse.safetensors");
    snprintf(tmp, sizeof tmp, "%s.tmp", path);

    /* a tensor never written: finish refuses and leaves nothing behind */
    assert_int_equal(moecal_st_writer_create(path, &w), MOECAL_OK);
    assert_int_equal(moecal_st_writer_add(w, "a", MOECAL_DT_F32, 2, shape), MOECAL_OK);
    assert_int_equal(moecal_st_writer_add(w, "b", MOECAL_DT_F32, 2, shape), MOECAL_OK);
    assert_int_equal(moecal_st_writer_add(w, "c", MOECAL_DT_UNKNOWN, 2, shape),
                     MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_st_writer_add(w, "d", MOECAL_DT_F32, 1, bad), MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_st_writer_add(w, "e", MOECAL_DT_F32, 9, shape),
                     MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_st_writer_add(w, "__metadata__", MOECAL_DT_F32, 2, shape),
                     MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_st_writer_add(w, "\xff\xfe", MOECAL_DT_F32, 2, shape),
                     MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_st_writer_write(w, "a", data, sizeof data), MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_st_writer_write_header(w), MOECAL_OK);
    assert_int_equal(moecal_st_writer_add(w, "late", MOECAL_DT_F32, 2, shape),
                     MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_st_writer_metadata(w, "late", "x"), MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_st_writer_write(w, "a", data, sizeof data - 1), MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_st_writer_write(w, "zz", data, sizeof data), MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_st_writer_write(w, "a", data, sizeof data), MOECAL_OK);
    assert_int_equal(moecal_st_writer_finish(w), MOECAL_ERR_INTERNAL);
    assert_non_null(strstr(moecal_error_message(), "'b'"));
    assert_int_not_equal(access(tmp, F_OK), 0);
    assert_int_not_equal(access(path, F_OK), 0);

    /* the same name twice */
    assert_int_equal(moecal_st_writer_create(path, &w), MOECAL_OK);
    assert_int_equal(moecal_st_writer_add(w, "a", MOECAL_DT_F32, 2, shape), MOECAL_OK);
    assert_int_equal(moecal_st_writer_add(w, "a", MOECAL_DT_F16, 2, shape), MOECAL_OK);
    assert_int_equal(moecal_st_writer_write_header(w), MOECAL_ERR_INTERNAL);
    assert_non_null(strstr(moecal_error_message(), "'a' added twice"));
    moecal_st_writer_abort(w);
    assert_int_not_equal(access(tmp, F_OK), 0);

    /* a directory that does not exist */
    path_of(path, "no/such/dir.safetensors");
    w = (moecal_st_writer *)1;
    assert_int_equal(moecal_st_writer_create(path, &w), MOECAL_ERR_IO);
    assert_null(w);
    assert_non_null(strstr(moecal_error_message(), "dir.safetensors.tmp"));
}

/* ------------------------------------------------------------------ bad files */

static void test_short_file(void **state)
{
    char path[PATH_MAX];
    (void)state;
    path_of(path, "short5.safetensors");
    write_bytes(path, "\x02\0\0\0\0", 5);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "5 bytes", NULL);
    path_of(path, "empty.safetensors");
    write_bytes(path, "", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "0 bytes", NULL);
}

static void test_header_len_max(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file_n(path, "len-max.safetensors", UINT64_MAX, "{}", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "18446744073709551615", NULL);
    /* without the limit, the file size still stops it */
    expect_refused(path, UINT64_MAX, MOECAL_ERR_FORMAT, "18446744073709551615", "10 bytes",
                   NULL);
}

static void test_header_len_beyond_file(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file_n(path, "len-beyond.safetensors", 3, "{}", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "header length 3", "2 bytes", NULL);
}

static void test_header_over_limit(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "over-limit.safetensors",
              "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 2);
    expect_refused(path, 16, MOECAL_ERR_FORMAT, "limit of 16 bytes", NULL);
    moecal_st_close(open_ok(path));
}

static void test_header_not_json(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "not-json.safetensors", "{\"a\": {\"dtype\": BF16}}", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "not valid JSON", NULL);
    make_file(path, "trailing.safetensors", "{} x", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "not valid JSON", NULL);
    make_file(path, "empty-header.safetensors", "", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "not valid JSON", NULL);
    make_file(path, "bad-utf8.safetensors", "{\"\xc3\x28\":{}}", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "not valid JSON", NULL);
    make_file(path, "nul-key.safetensors", "{\"a\\u0000b\":{}}", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "not valid JSON", NULL);
}

static void test_header_not_object(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "array.safetensors", "[1, 2]", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "an array, not a JSON object", NULL);
}

static void test_duplicate_name(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "dup.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
              "\"" EXPERT "\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "tensor '" EXPERT "' appears twice", NULL);
    /* a key with escapes, twice inside one entry, twice in __metadata__ */
    make_file(path, "dup-escaped.safetensors",
              "{\"a\\\"b\\\\\" : {}, \"a\\\"b\\\\\":{}}", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "tensor 'a\"b\\' appears twice", NULL);
    make_file(path, "dup-dtype.safetensors",
              "{\"__metadata__\":{}, \"" EXPERT "\":{\"dtype\":\"U8\",\"dtype\":\"U8\","
              "\"shape\":[1],\"data_offsets\":[0,1]}}", 1);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "tensor '" EXPERT "': key 'dtype' appears twice",
                   NULL);
    make_file(path, "dup-meta.safetensors",
              "{\"__metadata__\":{\"format\":\"pt\",\"format\":\"pt\"}}", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "__metadata__ key 'format' appears twice", NULL);
}

static void test_gap(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "gap.safetensors",
              "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
              "\"" EXPERT "\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[5,9]}}", 9);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "gap of 1 byte", "'a'", NULL);
}

static void test_overlap(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "overlap.safetensors",
              "{\"a\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
              "\"" EXPERT "\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[3,7]}}", 7);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "overlap", "'a'", NULL);
}

static void test_not_from_zero(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "from-two.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"BF16\",\"shape\":[2],\"data_offsets\":[2,6]}}", 6);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "[2, 6)", "begin at 0", NULL);
}

static void test_shape_overflow(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "overflow.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],"
              "\"data_offsets\":[0,0]}}", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "2^64", NULL);
    /* elements fit, bytes do not */
    make_file(path, "overflow-bytes.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],"
              "\"data_offsets\":[0,0]}}", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "2^64", NULL);
}

static void test_size_mismatch(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "model-00001-of-00002.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"F8_E4M3\",\"shape\":[16,16],"
              "\"data_offsets\":[0,100]}}", 100);
    expect_refused(path, 0, MOECAL_ERR_FORMAT,
                   ": tensor '" EXPERT "': data_offsets [0, 100) hold 100 bytes but shape "
                   "[16, 16] of F8_E4M3 needs 256", NULL);
}

#define ONE_F32 "{\"" EXPERT "\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}"

static void test_one_byte_missing(void **state)
{
    char path[PATH_MAX], n[32];
    (void)state;
    make_file(path, "missing.safetensors", ONE_F32, 11);
    snprintf(n, sizeof n, "%zu", 8 + strlen(ONE_F32) + 11);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, n, "1 byte missing", NULL);
}

static void test_one_byte_extra(void **state)
{
    char path[PATH_MAX], n[32];
    (void)state;
    make_file(path, "extra.safetensors", ONE_F32, 13);
    snprintf(n, sizeof n, "%zu", 8 + strlen(ONE_F32) + 13);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, n, "1 byte too many", NULL);
}

static void test_unknown_dtype(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "f7.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"F7_XYZ\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "F7_XYZ", NULL);
    /* control bytes of a name are escaped in the message */
    make_file(path, "esc.safetensors",
              "{\"a\\u001b[2J\":{\"dtype\":\"F7\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'a\\x1b[2J'", NULL);
}

static void test_other_dtypes(void **state)
{
    char path[PATH_MAX];
    moecal_st_file *f;
    const moecal_st_tensor *t;
    (void)state;
    /* dtypes of the format that moecal has no use for are kept by name */
    make_file(path, "e8m0.safetensors",
              "{\"s\":{\"dtype\":\"F8_E8M0\",\"shape\":[3],\"data_offsets\":[0,3]},"
              "\"q\":{\"dtype\":\"F4\",\"shape\":[2,3],\"data_offsets\":[3,6]}}", 6);
    f = open_ok(path);
    t = moecal_st_find(f, "s");
    assert_non_null(t);
    assert_int_equal(t->dtype, MOECAL_DT_UNKNOWN);
    assert_string_equal(t->dtype_name, "F8_E8M0");
    t = moecal_st_find(f, "q");
    assert_string_equal(t->dtype_name, "F4");
    assert_int_equal(t->numel, 6);
    moecal_st_close(f);
    make_file(path, "f4-odd.safetensors",
              "{\"q\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,1]}}", 1);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'q'", "12 bits", NULL);
}

static void test_begin_after_end(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "reversed.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,0]}}", 4);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "[4, 0)", NULL);
}

static void test_negative_shape(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "negative.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"U8\",\"shape\":[2,-2],\"data_offsets\":[0,4]}}", 4);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "-2", NULL);
    make_file(path, "real-shape.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"U8\",\"shape\":[2.0],\"data_offsets\":[0,2]}}", 2);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "real", NULL);
    make_file(path, "negative-offset.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[-1,-1]}}", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "negative", NULL);
}

static void test_bad_entries(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "extra-key.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],"
              "\"x\":1}}", 1);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "'x'", NULL);
    make_file(path, "no-shape.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", 1);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "shape", NULL);
    make_file(path, "entry-string.safetensors", "{\"" EXPERT "\":\"U8\"}", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "a string", NULL);
    make_file(path, "three-offsets.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,2]}}", 1);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "'" EXPERT "'", "data_offsets", NULL);
    make_file(path, "nine-dims.safetensors",
              "{\"" EXPERT "\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],"
              "\"data_offsets\":[0,1]}}", 1);
    expect_refused(path, 0, MOECAL_ERR_UNSUPPORTED, "'" EXPERT "'", "9 dimensions", NULL);
}

static void test_metadata_not_string(void **state)
{
    char path[PATH_MAX];
    (void)state;
    make_file(path, "meta-int.safetensors", "{\"__metadata__\":{\"format\":\"pt\",\"step\":3}}",
              0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "__metadata__", "'step'", "integer", NULL);
    make_file(path, "meta-array.safetensors", "{\"__metadata__\":[\"pt\"]}", 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "__metadata__", "array", NULL);
}

static void test_whitespace_accepted(void **state)
{
    char path[PATH_MAX];
    moecal_st_file *f;
    (void)state;
    make_file(path, "spaces.safetensors",
              " \t\r\n{\"__metadata__\" : {\"format\":\"pt\"},\n \"a\" : {\"dtype\":\"U8\", "
              "\"shape\":[ 2 ],\"data_offsets\":[0, 2]}}\n\t\r   ", 2);
    f = open_ok(path);
    assert_int_equal(moecal_st_count(f), 1);
    assert_string_equal(moecal_st_metadata(f, "format"), "pt");
    moecal_st_close(f);
    /* null metadata is no metadata, as the reference reader has it */
    make_file(path, "meta-null.safetensors", "{\"__metadata__\":null}", 0);
    f = open_ok(path);
    assert_int_equal(moecal_st_metadata_count(f), 0);
    moecal_st_close(f);
}

/* Header of odd length, no padding: the F32 tensor sits at an odd offset. */
static void test_odd_offset(void **state)
{
    static const char hdr[] =
        "{\"b\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]},"
        "\"" EXPERT "\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[3,11]}}";
    char path[PATH_MAX], padded[sizeof hdr + 1];
    moecal_st_file *f;
    const moecal_st_tensor *t;
    unsigned char back[8], want[8];
    float v[2];
    (void)state;

    /* an even header length puts the second tensor at an odd file offset */
    snprintf(padded, sizeof padded, "%s%s", hdr, strlen(hdr) % 2 ? " " : "");
    make_file(path, "odd.safetensors", padded, 11);
    f = open_ok(path);
    t = moecal_st_find(f, EXPERT);
    assert_non_null(t);
    assert_int_equal((moecal_st_data_offset(f) + t->begin) % 2, 1);
    for (int i = 0; i < 8; i++)
        want[i] = pattern(3 + (size_t)i);
    assert_int_equal(moecal_st_read(f, t, back, sizeof back), MOECAL_OK);
    assert_memory_equal(back, want, 8);
    /* and into a float buffer, as the model reader would */
    assert_int_equal(moecal_st_read(f, t, v, sizeof v), MOECAL_OK);
    assert_memory_equal(v, want, 8);
    assert_int_equal(moecal_st_read_range(f, t, 5, back, 3), MOECAL_OK);
    assert_memory_equal(back, want + 5, 3);
    moecal_st_close(f);
}

static void test_zero_size(void **state)
{
    char path[PATH_MAX];
    moecal_st_file *f;
    const moecal_st_tensor *t;
    unsigned char b;
    (void)state;
    /* empty tensors at the start, between, and at the end of the data */
    make_file(path, "zero.safetensors",
              "{\"z1\":{\"dtype\":\"F32\",\"shape\":[0,4],\"data_offsets\":[0,0]},"
              "\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
              "\"z2\":{\"dtype\":\"BF16\",\"shape\":[3,0],\"data_offsets\":[2,2]},"
              "\"z3\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[2,2]}}", 2);
    f = open_ok(path);
    assert_int_equal(moecal_st_count(f), 4);
    t = moecal_st_find(f, "z2");
    assert_non_null(t);
    assert_int_equal(t->numel, 0);
    assert_int_equal(moecal_st_read(f, t, NULL, 0), MOECAL_OK);
    assert_int_equal(moecal_st_read(f, t, &b, 1), MOECAL_OK);
    moecal_st_close(f);
}

static void test_open_errors(void **state)
{
    char path[PATH_MAX];
    (void)state;
    path_of(path, "does-not-exist.safetensors");
    expect_refused(path, 0, MOECAL_ERR_IO, "No such file", NULL);
    expect_refused(tmpdir, 0, MOECAL_ERR_IO, NULL);
    /* a FIFO is refused, not opened (which would wait for a writer) */
    path_of(path, "fifo.safetensors");
    assert_int_equal(mkfifo(path, 0600), 0);
    expect_refused(path, 0, MOECAL_ERR_FORMAT, "not a regular file", NULL);
}

/* A file that shrinks after it was opened: the read says so. */
static void test_truncated_after_open(void **state)
{
    char path[PATH_MAX];
    moecal_st_file *f;
    unsigned char back[12];
    (void)state;
    make_file(path, "shrinks.safetensors", ONE_F32, 12);
    f = open_ok(path);
    assert_int_equal(truncate(path, 8 + (off_t)strlen(ONE_F32) + 4), 0);
    assert_int_equal(moecal_st_read(f, moecal_st_find(f, EXPERT), back, sizeof back),
                     MOECAL_ERR_FORMAT);
    assert_non_null(strstr(moecal_error_message(), path));
    assert_non_null(strstr(moecal_error_message(), "truncated"));
    moecal_st_close(f);
}

/* The parser on bytes in memory, as the fuzz target drives it. */
static void test_parse_memory(void **state)
{
    static const char file[] = "\x02\0\0\0\0\0\0\0{}";
    moecal_st_file *f = NULL;
    unsigned char b;
    (void)state;
    assert_int_equal(moecal_st_parse(file, 10, 10, 0, "mem", &f), MOECAL_OK);
    assert_int_equal(moecal_st_count(f), 0);
    assert_string_equal(moecal_st_path(f), "mem");
    moecal_st_close(f);
    assert_int_equal(moecal_st_parse(file, 10, 11, 0, "mem", &f), MOECAL_ERR_FORMAT);
    assert_null(f);
    /* fewer bytes than the header needs is the caller's mistake */
    assert_int_equal(moecal_st_parse(file, 9, 10, 0, "mem", &f), MOECAL_ERR_INTERNAL);
    (void)b;
}

/* A large header, entries in reverse data order: parse, sort and look up. */
static void test_many_tensors(void **state)
{
    enum { N = 20000 };
    size_t cap = (size_t)N * 160 + 64, o = 8;
    char *buf = malloc(cap);
    moecal_st_file *f;
    struct timespec t0, t1;
    double secs;
    (void)state;

    assert_non_null(buf);
    o += (size_t)snprintf(buf + o, cap - o, "{\"__metadata__\":{\"format\":\"pt\"}");
    /* entries in reverse data order, so the reader has to sort them */
    for (size_t i = N; i-- > 0;)
        o += (size_t)snprintf(buf + o, cap - o,
                              ",\"model.layers.%zu.mlp.experts.%zu.down_proj.weight\":"
                              "{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[%zu,%zu]}",
                              i / 256, i % 256, i * 12, i * 12 + 12);
    buf[o++] = '}';
    for (int i = 0; i < 8; i++)
        buf[i] = (char)(unsigned char)((uint64_t)(o - 8) >> (8 * i));
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(moecal_st_parse(buf, o, o + (uint64_t)N * 12, 0, "many", &f), MOECAL_OK);
    for (size_t i = 0; i < N; i += 7) {
        char name[96];
        const moecal_st_tensor *t;
        snprintf(name, sizeof name, "model.layers.%zu.mlp.experts.%zu.down_proj.weight",
                 i / 256, i % 256);
        t = moecal_st_find(f, name);
        assert_non_null(t);
        assert_int_equal(t->begin, i * 12);
        assert_ptr_equal(moecal_st_tensor_at(f, i), t);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    secs = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    print_message("  %d tensors: parse and lookups in %.3f s\n", N, secs);
    assert_int_equal(moecal_st_count(f), N);
    moecal_st_close(f);
    free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtype_names),
        cmocka_unit_test(test_roundtrip_dtypes),
        cmocka_unit_test(test_writer_pieces),
        cmocka_unit_test(test_writer_no_tensors),
        cmocka_unit_test(test_writer_abort),
        cmocka_unit_test(test_writer_misuse),
        cmocka_unit_test(test_short_file),
        cmocka_unit_test(test_header_len_max),
        cmocka_unit_test(test_header_len_beyond_file),
        cmocka_unit_test(test_header_over_limit),
        cmocka_unit_test(test_header_not_json),
        cmocka_unit_test(test_header_not_object),
        cmocka_unit_test(test_duplicate_name),
        cmocka_unit_test(test_gap),
        cmocka_unit_test(test_overlap),
        cmocka_unit_test(test_not_from_zero),
        cmocka_unit_test(test_shape_overflow),
        cmocka_unit_test(test_size_mismatch),
        cmocka_unit_test(test_one_byte_missing),
        cmocka_unit_test(test_one_byte_extra),
        cmocka_unit_test(test_unknown_dtype),
        cmocka_unit_test(test_other_dtypes),
        cmocka_unit_test(test_begin_after_end),
        cmocka_unit_test(test_negative_shape),
        cmocka_unit_test(test_bad_entries),
        cmocka_unit_test(test_metadata_not_string),
        cmocka_unit_test(test_whitespace_accepted),
        cmocka_unit_test(test_odd_offset),
        cmocka_unit_test(test_zero_size),
        cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_truncated_after_open),
        cmocka_unit_test(test_parse_memory),
        cmocka_unit_test(test_many_tensors),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
