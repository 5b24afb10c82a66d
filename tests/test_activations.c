/* test_activations.c - unit tests of activation files (activations.c).
 *
 * Round trips through the writer for bf16, float16 and float32 at odd
 * shapes; reads of row ranges; bad files built directly with the HDF5 API,
 * each refused with a message that names the file and the dataset; the
 * non-finite scan; and after every call, success or failure, the same HDF5
 * ids open as before (no leaks on error paths).
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <hdf5.h>
#include <mpi.h>

#include "activations.h"
#include "fp8.h"
#include "h5util.h"

static char tmpdir[256];

static const char *tpath(const char *name)
{
    static char buf[8][512];
    static int k;
    char *p = buf[k++ & 7];
    snprintf(p, 512, "%s/%s", tmpdir, name);
    return p;
}

/* ------------------------------------------------------------------ HDF5 ids */

typedef struct idcount {
    hsize_t n[6];
} idcount;

static idcount ids_open(void)
{
    static const H5I_type_t types[6] = {H5I_FILE, H5I_GROUP, H5I_DATATYPE, H5I_DATASPACE,
                                        H5I_DATASET, H5I_ATTR};
    idcount c;
    for (int i = 0; i < 6; i++) {
        c.n[i] = 0;
        H5Inmembers(types[i], &c.n[i]);
    }
    return c;
}

static idcount base_ids;

static void check_no_leak(void)
{
    idcount now = ids_open();
    static const char *names[6] = {"files", "groups", "datatypes", "dataspaces", "datasets",
                                   "attributes"};
    for (int i = 0; i < 6; i++) {
        if (now.n[i] != base_ids.n[i])
            fail_msg("HDF5 %s open: %llu, before: %llu", names[i], (unsigned long long)now.n[i],
                     (unsigned long long)base_ids.n[i]);
    }
    assert_int_equal(H5Fget_obj_count((hid_t)H5F_OBJ_ALL, H5F_OBJ_ALL), 0);
}

/* ------------------------------------------------------------------ data */

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Values across many binades, some subnormal in f16, negative zeros. */
static float value(int layer, int64_t t, int h)
{
    uint64_t z = mix(((uint64_t)layer << 40) ^ ((uint64_t)t << 20) ^ (uint64_t)h);
    float v = ldexpf((float)(z & 0xffffff) / 16777216.0f + 0.5f, (int)((z >> 24) % 40) - 25);
    if ((z >> 63) & 1)
        v = -v;
    if ((z >> 32) % 97 == 0)
        v = -0.0f;
    return v;
}

static float *make_rows(int layer, int64_t t0, int64_t n, int H)
{
    float *x = malloc((size_t)n * (size_t)H * sizeof *x);
    assert_non_null(x);
    for (int64_t t = 0; t < n; t++)
        for (int h = 0; h < H; h++)
            x[t * H + h] = value(layer, t0 + t, h);
    return x;
}

/* What the file holds for x when stored as dt, as float. */
static float stored(float x, moecal_dtype dt)
{
    if (dt == MOECAL_DT_BF16)
        return moecal_bf16_to_float(moecal_float_to_bf16(x));
    if (dt == MOECAL_DT_F16)
        return moecal_f16_to_float(moecal_float_to_f16(x));
    return x;
}

static int same_float(float a, float b)
{
    uint32_t x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    return x == y || (isnan(a) && isnan(b));
}

/* ------------------------------------------------------------------ round trips */

static void round_trip(moecal_dtype dt, int64_t T, int H)
{
    const int layers[3] = {12, 3, 5};
    const char *path = tpath("rt.h5");
    moecal_act_writer *w = NULL;
    moecal_act *a = NULL;
    float *got = malloc((size_t)T * (size_t)H * sizeof *got);
    uint16_t *b = malloc((size_t)T * (size_t)H * sizeof *b);
    struct stat st;

    assert_non_null(got);
    assert_non_null(b);
    unlink(path);
    assert_int_equal(moecal_act_create(path, T, H, layers, 3, dt, &w), MOECAL_OK);
    assert_true(moecal_act_writer_chunk_rows(w) >= 1);
    assert_true(moecal_act_writer_chunk_rows(w) <= T);
    /* not visible under its name before the close */
    assert_int_not_equal(stat(path, &st), 0);
    assert_int_equal(moecal_act_writer_attr(w, "source", "test"), MOECAL_OK);
    for (int l = 0; l < 3; l++) {
        int64_t cut = T / 3;
        float *x0 = make_rows(layers[l], 0, cut, H), *x1 = make_rows(layers[l], cut, T - cut, H);
        /* second half first: rows may come in any order */
        assert_int_equal(moecal_act_write_float(w, layers[l], cut, T - cut, x1), MOECAL_OK);
        assert_int_equal(moecal_act_write_float(w, layers[l], 0, cut, x0), MOECAL_OK);
        free(x0);
        free(x1);
    }
    assert_int_equal(moecal_act_write_float(w, 4, 0, 1, got), MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_act_write_float(w, 3, T, 1, got), MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_act_writer_close(w), MOECAL_OK);
    assert_int_equal(stat(path, &st), 0);
    assert_int_not_equal(access(tpath("rt.h5.tmp"), F_OK), 0);
    check_no_leak();

    assert_int_equal(moecal_act_open(path, MPI_COMM_NULL, &a), MOECAL_OK);
    assert_int_equal(moecal_act_tokens(a), T);
    assert_int_equal(moecal_act_hidden(a), H);
    assert_int_equal(moecal_act_n_layers(a), 3);
    assert_int_equal(moecal_act_layers(a)[0], 3);
    assert_int_equal(moecal_act_layers(a)[1], 5);
    assert_int_equal(moecal_act_layers(a)[2], 12);
    assert_int_equal(moecal_act_dtype(a), dt);
    assert_true(moecal_act_chunk_rows(a) >= 1);
    assert_true(moecal_act_has_layer(a, 5));
    assert_false(moecal_act_has_layer(a, 4));
    assert_string_equal(moecal_act_path(a), path);
    for (int l = 0; l < 3; l++) {
        float *x = make_rows(layers[l], 0, T, H);
        assert_int_equal(moecal_act_read_float(a, layers[l], 0, T, got), MOECAL_OK);
        for (int64_t i = 0; i < T * H; i++)
            if (!same_float(got[i], stored(x[i], dt)))
                fail_msg("%s layer %d element %lld: %a read, %a stored from %a",
                         moecal_dtype_name(dt), layers[l], (long long)i, got[i],
                         stored(x[i], dt), x[i]);
        /* bf16: bit for bit what was written; f16/f32: nearest even of the stored value */
        assert_int_equal(moecal_act_read_bf16(a, layers[l], 0, T, b), MOECAL_OK);
        for (int64_t i = 0; i < T * H; i++)
            assert_int_equal(b[i], moecal_float_to_bf16(stored(x[i], dt)));
        /* a row range in the middle */
        if (T > 9) {
            assert_int_equal(moecal_act_read_float(a, layers[l], 4, 5, got), MOECAL_OK);
            for (int64_t i = 0; i < 5 * H; i++)
                assert_true(same_float(got[i], stored(x[4 * H + i], dt)));
            assert_int_equal(moecal_act_read_bf16(a, layers[l], T - 3, 3, b), MOECAL_OK);
            for (int64_t i = 0; i < 3 * H; i++)
                assert_int_equal(b[i], moecal_float_to_bf16(stored(x[(T - 3) * H + i], dt)));
        }
        free(x);
    }
    /* empty ranges, including at the end */
    assert_int_equal(moecal_act_read_float(a, 3, T, 0, got), MOECAL_OK);
    assert_int_equal(moecal_act_read_bf16(a, 3, 0, 0, b), MOECAL_OK);
    moecal_act_close(a);
    check_no_leak();
    free(got);
    free(b);
    unlink(path);
}

static void test_round_trip_bf16(void **state) { (void)state; round_trip(MOECAL_DT_BF16, 37, 13); }
static void test_round_trip_f16(void **state) { (void)state; round_trip(MOECAL_DT_F16, 37, 13); }
static void test_round_trip_f32(void **state) { (void)state; round_trip(MOECAL_DT_F32, 37, 13); }

/* Rows wider than a chunk's 1 MiB: one row per chunk. */
static void test_round_trip_wide(void **state)
{
    (void)state;
    round_trip(MOECAL_DT_F32, 3, 300001);
}

/* More rows than one conversion buffer (8 MiB) holds. */
static void test_round_trip_long(void **state)
{
    (void)state;
    round_trip(MOECAL_DT_F16, 70001, 33);
}

/* NaN, Inf, subnormal and extreme values survive bf16 bit for bit. */
static void test_bf16_special(void **state)
{
    const int layer = 0;
    const float sp[8] = {NAN, -INFINITY, INFINITY, 1e-40f, -3.0e38f, 0.0f, -0.0f, 1.0f};
    const char *path = tpath("special.h5");
    moecal_act_writer *w = NULL;
    moecal_act *a = NULL;
    uint16_t b[8];
    float f[8];

    (void)state;
    assert_int_equal(moecal_act_create(path, 1, 8, &layer, 1, MOECAL_DT_BF16, &w), MOECAL_OK);
    assert_int_equal(moecal_act_write_float(w, 0, 0, 1, sp), MOECAL_OK);
    assert_int_equal(moecal_act_writer_close(w), MOECAL_OK);
    assert_int_equal(moecal_act_open(path, MPI_COMM_NULL, &a), MOECAL_OK);
    assert_int_equal(moecal_act_read_bf16(a, 0, 0, 1, b), MOECAL_OK);
    assert_int_equal(moecal_act_read_float(a, 0, 0, 1, f), MOECAL_OK);
    for (int i = 0; i < 8; i++) {
        assert_int_equal(b[i], moecal_float_to_bf16(sp[i]));
        assert_true(same_float(f[i], moecal_bf16_to_float(b[i])));
    }
    moecal_act_close(a);
    check_no_leak();
    unlink(path);
}

/* Opened through MPI-IO (one rank here): the same reads. */
static void test_mpi_open(void **state)
{
    const int layers[2] = {7, 8};
    const char *path = tpath("mpi.h5");
    moecal_act_writer *w = NULL;
    moecal_act *a = NULL;
    float *x = make_rows(8, 0, 50, 21), got[5 * 21];

    (void)state;
    assert_int_equal(moecal_act_create(path, 50, 21, layers, 2, MOECAL_DT_BF16, &w), MOECAL_OK);
    assert_int_equal(moecal_act_write_float(w, 8, 0, 50, x), MOECAL_OK);
    assert_int_equal(moecal_act_write_float(w, 7, 0, 50, x), MOECAL_OK);
    assert_int_equal(moecal_act_writer_close(w), MOECAL_OK);
    assert_int_equal(moecal_act_open(path, MPI_COMM_WORLD, &a), MOECAL_OK);
    assert_int_equal(moecal_act_read_float(a, 8, 10, 5, got), MOECAL_OK);
    for (int i = 0; i < 5 * 21; i++)
        assert_true(same_float(got[i], stored(x[10 * 21 + i], MOECAL_DT_BF16)));
    assert_int_equal(moecal_act_read_float(a, 8, 48, 5, got), MOECAL_ERR_MISMATCH);
    moecal_act_close(a);
    check_no_leak();
    free(x);
    unlink(path);
}

static void test_rows_out_of_range(void **state)
{
    const int layer = 3;
    const char *path = tpath("range.h5");
    moecal_act_writer *w = NULL;
    moecal_act *a = NULL;
    float *x = make_rows(3, 0, 10, 4), got[64];
    uint16_t b[64];

    (void)state;
    assert_int_equal(moecal_act_create(path, 10, 4, &layer, 1, MOECAL_DT_F32, &w), MOECAL_OK);
    assert_int_equal(moecal_act_write_float(w, 3, 0, 10, x), MOECAL_OK);
    assert_int_equal(moecal_act_writer_close(w), MOECAL_OK);
    assert_int_equal(moecal_act_open(path, MPI_COMM_NULL, &a), MOECAL_OK);
    assert_int_equal(moecal_act_read_float(a, 3, 8, 3, got), MOECAL_ERR_MISMATCH);
    assert_non_null(strstr(moecal_error_message(), path));
    assert_non_null(strstr(moecal_error_message(), "/layers/3/hidden"));
    assert_non_null(strstr(moecal_error_message(), "[8, 11)"));
    assert_non_null(strstr(moecal_error_message(), "[0, 10)"));
    assert_int_equal(moecal_act_read_bf16(a, 3, -1, 2, b), MOECAL_ERR_MISMATCH);
    assert_int_equal(moecal_act_read_float(a, 3, 11, 0, got), MOECAL_ERR_MISMATCH);
    assert_int_equal(moecal_act_read_float(a, 3, 0, -1, got), MOECAL_ERR_MISMATCH);
    assert_int_equal(moecal_act_read_float(a, 3, INT64_MAX, 2, got), MOECAL_ERR_MISMATCH);
    assert_int_equal(moecal_act_read_float(a, 4, 0, 1, got), MOECAL_ERR_MISMATCH);
    assert_non_null(strstr(moecal_error_message(), "/layers/4/hidden"));
    moecal_act_close(a);
    check_no_leak();
    free(x);
    unlink(path);
}

/* The writer: abort leaves nothing, an existing file survives until close. */
static void test_writer_abort(void **state)
{
    const int layer = 1;
    const char *path = tpath("abort.h5");
    moecal_act_writer *w = NULL;
    FILE *fp;
    struct stat st;

    (void)state;
    fp = fopen(path, "w");
    assert_non_null(fp);
    fputs("old", fp);
    fclose(fp);
    assert_int_equal(moecal_act_create(path, 5, 5, &layer, 1, MOECAL_DT_BF16, &w), MOECAL_OK);
    assert_int_equal(access(tpath("abort.h5.tmp"), F_OK), 0);
    moecal_act_writer_abort(w);
    assert_int_not_equal(access(tpath("abort.h5.tmp"), F_OK), 0);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_size, 3);
    check_no_leak();
    /* bad arguments */
    assert_int_equal(moecal_act_create(path, 0, 5, &layer, 1, MOECAL_DT_BF16, &w),
                     MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_act_create(path, 5, 5, &layer, 1, MOECAL_DT_F8_E4M3, &w),
                     MOECAL_ERR_UNSUPPORTED);
    {
        const int twice[2] = {2, 2};
        assert_int_equal(moecal_act_create(path, 5, 5, twice, 2, MOECAL_DT_F32, &w),
                         MOECAL_ERR_INTERNAL);
    }
    assert_int_equal(moecal_act_create(tpath("no/such/dir.h5"), 5, 5, &layer, 1,
                                       MOECAL_DT_F32, &w), MOECAL_ERR_IO);
    assert_non_null(strstr(moecal_error_message(), "no/such/dir.h5.tmp"));
    check_no_leak();
    unlink(path);
}

/* ------------------------------------------------------------------ bad files */

/* A file built by hand.  fmt/version NULL/-1: attribute left out; vlen: the
 * format attribute as a variable-length string (as h5py writes it). */
typedef struct spec {
    const char *fmt;
    int64_t version;
    int vlen;
    int no_layers;
    int nl;
    const char *name[3];
    int rank[3];
    hsize_t dims[3][3];
    hid_t type[3];        /* 0: float32 */
    int no_hidden[3];
} spec;

static void attr_str(hid_t obj, const char *name, const char *v, int vlen)
{
    hid_t t = H5Tcopy(H5T_C_S1), s = H5Screate(H5S_SCALAR), a;
    if (vlen) {
        H5Tset_size(t, H5T_VARIABLE);
        a = H5Acreate2(obj, name, t, s, H5P_DEFAULT, H5P_DEFAULT);
        assert_true(H5Awrite(a, t, &v) >= 0);
    } else {
        H5Tset_size(t, strlen(v));
        H5Tset_strpad(t, H5T_STR_NULLPAD);
        a = H5Acreate2(obj, name, t, s, H5P_DEFAULT, H5P_DEFAULT);
        assert_true(H5Awrite(a, t, v) >= 0);
    }
    H5Aclose(a);
    H5Sclose(s);
    H5Tclose(t);
}

static const char *build(const char *file, const spec *sp)
{
    const char *path = tpath(file);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), lg, g, s, d;

    assert_true(f >= 0);
    if (sp->fmt)
        attr_str(f, "format", sp->fmt, sp->vlen);
    if (sp->version >= 0) {
        hid_t as = H5Screate(H5S_SCALAR);
        hid_t a = H5Acreate2(f, "format_version", H5T_STD_I32LE, as, H5P_DEFAULT, H5P_DEFAULT);
        int v = (int)sp->version;
        H5Awrite(a, H5T_NATIVE_INT, &v);
        H5Aclose(a);
        H5Sclose(as);
    }
    if (!sp->no_layers) {
        lg = H5Gcreate2(f, "layers", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        for (int i = 0; i < sp->nl; i++) {
            g = H5Gcreate2(lg, sp->name[i], H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
            assert_true(g >= 0);
            if (!sp->no_hidden[i]) {
                s = H5Screate_simple(sp->rank[i], sp->dims[i], NULL);
                d = H5Dcreate2(g, "hidden", sp->type[i] ? sp->type[i] : H5T_IEEE_F32LE, s,
                               H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
                assert_true(d >= 0);
                H5Dclose(d);
                H5Sclose(s);
            }
            H5Gclose(g);
        }
        H5Gclose(lg);
    }
    H5Fclose(f);
    return path;
}

static spec good_spec(void)
{
    spec s = {.fmt = "moecal-activations", .version = 1, .nl = 2, .name = {"3", "4"},
              .rank = {2, 2}, .dims = {{16, 8}, {16, 8}}};
    return s;
}

/* Open must fail with code and a message holding every needle. */
static void expect_bad(const char *path, moecal_status code, const char *n1, const char *n2,
                       const char *n3)
{
    moecal_act *a = NULL;
    moecal_status s = moecal_act_open(path, MPI_COMM_NULL, &a);
    const char *m = moecal_error_message();

    if (s != code)
        fail_msg("%s: status %d, expected %d: %s", path, (int)s, (int)code, m);
    assert_null(a);
    assert_non_null(strstr(m, path));
    if (n1 && !strstr(m, n1))
        fail_msg("message lacks '%s': %s", n1, m);
    if (n2 && !strstr(m, n2))
        fail_msg("message lacks '%s': %s", n2, m);
    if (n3 && !strstr(m, n3))
        fail_msg("message lacks '%s': %s", n3, m);
    check_no_leak();
}

static void test_good_handmade(void **state)
{
    spec s = good_spec();
    moecal_act *a = NULL;
    const char *p;

    (void)state;
    /* variable-length format string, 32-bit version, contiguous dataset */
    s.vlen = 1;
    p = build("good.h5", &s);
    assert_int_equal(moecal_act_open(p, MPI_COMM_NULL, &a), MOECAL_OK);
    assert_int_equal(moecal_act_tokens(a), 16);
    assert_int_equal(moecal_act_hidden(a), 8);
    assert_int_equal(moecal_act_chunk_rows(a), 0);
    assert_int_equal(moecal_act_dtype(a), MOECAL_DT_F32);
    moecal_act_close(a);
    check_no_leak();
}

static void test_bad_format(void **state)
{
    spec s = good_spec();
    (void)state;
    s.fmt = "moecal-amax";
    expect_bad(build("fmt.h5", &s), MOECAL_ERR_FORMAT, "format", "moecal-amax",
               "\"moecal-activations\"");
    s.fmt = NULL;
    expect_bad(build("nofmt.h5", &s), MOECAL_ERR_FORMAT, "'format' missing",
               "moecal-activations", NULL);
}

static void test_bad_version(void **state)
{
    spec s = good_spec();
    (void)state;
    s.version = 2;
    expect_bad(build("ver.h5", &s), MOECAL_ERR_UNSUPPORTED, "format_version = 2",
               "format_version 1", NULL);
    s.version = -1;
    expect_bad(build("nover.h5", &s), MOECAL_ERR_FORMAT, "format_version", "missing", NULL);
}

static void test_no_layers(void **state)
{
    spec s = good_spec();
    (void)state;
    s.no_layers = 1;
    expect_bad(build("nolayers.h5", &s), MOECAL_ERR_FORMAT, "/layers", NULL, NULL);
    s.no_layers = 0;
    s.nl = 0;
    expect_bad(build("empty.h5", &s), MOECAL_ERR_FORMAT, "/layers is empty", NULL, NULL);
}

static void test_bad_rank(void **state)
{
    spec s = good_spec();
    (void)state;
    s.rank[1] = 3;
    s.dims[1][2] = 2;
    expect_bad(build("rank.h5", &s), MOECAL_ERR_FORMAT, "/layers/4/hidden", "3 dimension",
               "expected 2");
    s.rank[1] = 1;
    expect_bad(build("rank1.h5", &s), MOECAL_ERR_FORMAT, "/layers/4/hidden", "1 dimension",
               NULL);
}

static void test_mismatched_shapes(void **state)
{
    spec s = good_spec();
    (void)state;
    s.dims[1][0] = 15;
    expect_bad(build("tok.h5", &s), MOECAL_ERR_FORMAT, "/layers/4/hidden has shape [15, 8]",
               "/layers/3/hidden has [16, 8]", NULL);
    s = good_spec();
    s.dims[0][1] = 9;
    expect_bad(build("hid.h5", &s), MOECAL_ERR_FORMAT, "/layers/4/hidden has shape [16, 8]",
               "[16, 9]", NULL);
}

static void test_bad_dtype(void **state)
{
    spec s = good_spec();
    (void)state;
    s.type[1] = H5T_STD_I32LE;
    expect_bad(build("int.h5", &s), MOECAL_ERR_FORMAT, "/layers/4/hidden",
               "32-bit signed integer", "expected bf16");
    s.type[1] = H5T_IEEE_F64LE;
    expect_bad(build("f64.h5", &s), MOECAL_ERR_UNSUPPORTED, "/layers/4/hidden", "64-bit float",
               "float16 or float32");
    s.type[1] = 0;
    s.type[0] = H5T_IEEE_F32BE; /* big-endian float32 converts: fine */
    {
        moecal_act *a = NULL;
        assert_int_equal(moecal_act_open(build("be.h5", &s), MPI_COMM_NULL, &a), MOECAL_OK);
        moecal_act_close(a);
    }
    s.type[0] = H5T_NATIVE_FLOAT;
    s.type[1] = H5T_STD_I16LE;
    expect_bad(build("i16.h5", &s), MOECAL_ERR_FORMAT, "16-bit signed integer", NULL, NULL);
    check_no_leak();
}

static void test_bad_names(void **state)
{
    spec s = good_spec();
    (void)state;
    s.name[1] = "x4";
    expect_bad(build("name.h5", &s), MOECAL_ERR_FORMAT, "/layers/x4", "decimal", NULL);
    s.name[1] = "03";
    expect_bad(build("zero.h5", &s), MOECAL_ERR_FORMAT, "/layers/03", NULL, NULL);
    s = good_spec();
    s.no_hidden[0] = 1;
    expect_bad(build("nohidden.h5", &s), MOECAL_ERR_FORMAT, "/layers/3", "'hidden'", NULL);
}

static void test_not_hdf5(void **state)
{
    const char *p = tpath("text.h5");
    FILE *fp = fopen(p, "w");

    (void)state;
    assert_non_null(fp);
    fputs("not an HDF5 file\n", fp);
    fclose(fp);
    expect_bad(p, MOECAL_ERR_FORMAT, "not an HDF5 file", NULL, NULL);
    expect_bad(tpath("missing.h5"), MOECAL_ERR_IO, "No such file", NULL, NULL);
}

/* ------------------------------------------------------------------ non-finite */

static void test_nonfinite(void **state)
{
    enum { N = 12, H = 9 };
    uint16_t rows[N * H];
    uint8_t skip[N];
    int64_t bad = -1;
    const char *m;

    (void)state;
    for (int i = 0; i < N * H; i++)
        rows[i] = moecal_float_to_bf16((float)(i % 17) - 8.0f);
    /* largest finite bf16 (0x7f7f) is fine */
    rows[1 * H + 3] = 0x7f7f;
    rows[4 * H + 2] = 0x7fc1;  /* NaN */
    rows[9 * H + 8] = 0xff80;  /* -Inf */
    rows[9 * H + 0] = 0x7f80;  /* +Inf */
    assert_int_equal(moecal_act_scan_nonfinite(NULL, rows, N, H, 7, 100, MOECAL_NONFINITE_SKIP,
                                               skip, &bad), MOECAL_OK);
    assert_int_equal(bad, 2);
    for (int r = 0; r < N; r++)
        assert_int_equal(skip[r], r == 4 || r == 9);
    assert_int_equal(moecal_act_scan_nonfinite(NULL, rows, N, H, 7, 100, MOECAL_NONFINITE_ERROR,
                                               NULL, &bad), MOECAL_ERR_NONFINITE);
    m = moecal_error_message();
    assert_non_null(strstr(m, "layer 7"));
    assert_non_null(strstr(m, "token 104"));
    assert_non_null(strstr(m, "/layers/7/hidden"));
    /* no bad rows: OK under either policy */
    assert_int_equal(moecal_act_scan_nonfinite(NULL, rows, 4, H, 7, 0, MOECAL_NONFINITE_ERROR,
                                               skip, &bad), MOECAL_OK);
    assert_int_equal(bad, 0);
    assert_int_equal(moecal_act_scan_nonfinite(NULL, rows, 0, H, 7, 0, MOECAL_NONFINITE_ERROR,
                                               NULL, NULL), MOECAL_OK);
}

/* The file's name is in the message when the scan has the file. */
static void test_nonfinite_names_file(void **state)
{
    const int layer = 2;
    const char *path = tpath("nan.h5");
    moecal_act_writer *w = NULL;
    moecal_act *a = NULL;
    float x[3 * 4] = {0};
    uint16_t b[3 * 4];
    int64_t bad = 0;

    (void)state;
    x[2 * 4 + 1] = NAN;
    assert_int_equal(moecal_act_create(path, 3, 4, &layer, 1, MOECAL_DT_BF16, &w), MOECAL_OK);
    assert_int_equal(moecal_act_write_float(w, 2, 0, 3, x), MOECAL_OK);
    assert_int_equal(moecal_act_writer_close(w), MOECAL_OK);
    assert_int_equal(moecal_act_open(path, MPI_COMM_NULL, &a), MOECAL_OK);
    assert_int_equal(moecal_act_read_bf16(a, 2, 0, 3, b), MOECAL_OK);
    assert_int_equal(moecal_act_scan_nonfinite(a, b, 3, 4, 2, 0, MOECAL_NONFINITE_ERROR, NULL,
                                               &bad), MOECAL_ERR_NONFINITE);
    assert_non_null(strstr(moecal_error_message(), path));
    assert_non_null(strstr(moecal_error_message(), "token 2"));
    moecal_act_close(a);
    check_no_leak();
}

/* ------------------------------------------------------------------ main */

static int rmtree(const char *dir)
{
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    return system(cmd);
}

/* moecal_h5_fail and MOECAL_H5_CHECK: HDF5's own reason in the message. */
static moecal_status open_missing(const char *path)
{
    hid_t f;
    MOECAL_H5_CHECK(path, f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT));
    H5Fclose(f);
    return MOECAL_OK;
}

static void test_h5_attr_int(void **state)
{
    (void)state;
    char path[] = "/tmp/moecal-attr-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t a = H5Acreate2(f, "n", H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    int32_t seven = 7;
    H5Awrite(a, H5T_NATIVE_INT32, &seven);
    H5Aclose(a);
    a = H5Acreate2(f, "x", H5T_IEEE_F64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    double half = 0.5;
    H5Awrite(a, H5T_NATIVE_DOUBLE, &half);
    H5Aclose(a);
    H5Sclose(sp);
    int64_t v = -1;
    bool found = false;
    assert_int_equal(moecal_h5_attr_int(f, path, "n", true, &v, &found), MOECAL_OK);
    assert_true(found);
    assert_int_equal(v, 7);
    v = 42;
    assert_int_equal(moecal_h5_attr_int(f, path, "absent", false, &v, &found), MOECAL_OK);
    assert_false(found);
    assert_int_equal(v, 42);   /* unchanged: the caller's default */
    assert_int_equal(moecal_h5_attr_int(f, path, "absent", true, &v, NULL), MOECAL_ERR_FORMAT);
    assert_non_null(strstr(moecal_error_message(), "attribute 'absent' missing"));
    assert_int_equal(moecal_h5_attr_int(f, path, "x", true, &v, NULL), MOECAL_ERR_FORMAT);
    assert_non_null(strstr(moecal_error_message(), "attribute 'x' is a float with 1 element(s)"));
    H5Fclose(f);
    unlink(path);
}

static void test_h5_fail(void **state)
{
    (void)state;
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    assert_int_equal(open_missing("/nonexistent/moecal.h5"), MOECAL_ERR_HDF5);
    const char *m = moecal_error_message();
    assert_non_null(strstr(m, "/nonexistent/moecal.h5: f = H5Fopen(path, H5F_ACC_RDONLY, "
                              "H5P_DEFAULT) failed (HDF5: "));
    assert_int_equal(moecal_h5_fail("a.h5", "reading dataset '%s'", "x"), MOECAL_ERR_HDF5);
    assert_non_null(strstr(moecal_error_message(), "a.h5: reading dataset 'x' failed"));
}

/* ------------------------------------------------------------------ direct reads */

/* The map's rows against HDF5's (moecal_act_read_bf16) over ranges across
 * chunk edges, with scratch of one row, three rows and 1 MiB. */
static void same_as_hdf5(moecal_act *a, const moecal_act_map *m, int layer)
{
    int64_t T = moecal_act_tokens(a), H = moecal_act_hidden(a);
    uint16_t *want = malloc((size_t)T * (size_t)H * 2), *got = malloc((size_t)T * (size_t)H * 2);
    size_t rowb = (size_t)H * 4, sizes[3] = {rowb, 3 * rowb, 1u << 20};
    char *scratch = malloc(1u << 20);
    int64_t cr = moecal_act_chunk_rows(a) > 0 ? moecal_act_chunk_rows(a) : 7;
    int64_t ranges[][2] = {{0, T}, {0, 1}, {cr - 1, 2}, {cr, cr}, {T - 5, 5}, {T, 0},
                           {1, T - 2}, {3 * cr + 1, cr + 3}};

    assert_non_null(want);
    assert_non_null(got);
    assert_non_null(scratch);
    assert_int_equal(moecal_act_read_bf16(a, layer, 0, T, want), MOECAL_OK);
    for (size_t k = 0; k < sizeof ranges / sizeof ranges[0]; k++) {
        int64_t r0 = ranges[k][0], n = ranges[k][1];
        if (r0 < 0 || n < 0 || r0 + n > T)
            continue;
        for (int z = 0; z < 3; z++) {
            memset(got, 0xee, (size_t)T * (size_t)H * 2);
            if (moecal_act_map_read_bf16(m, layer, r0, n, got, scratch, sizes[z]) != MOECAL_OK)
                fail_msg("rows [%lld, +%lld): %s", (long long)r0, (long long)n,
                         moecal_error_message());
            for (size_t i = 0; i < (size_t)n * (size_t)H; i++)
                if (got[i] != want[(size_t)r0 * (size_t)H + i])
                    fail_msg("%s, rows [%lld, +%lld), scratch %zu: element %zu is %#x, HDF5 "
                             "read %#x", moecal_dtype_name(moecal_act_dtype(a)), (long long)r0,
                             (long long)n, sizes[z], i, got[i],
                             want[(size_t)r0 * (size_t)H + i]);
        }
    }
    free(want);
    free(got);
    free(scratch);
}

static void test_direct_reads(void **state)
{
    (void)state;
    const moecal_dtype dts[3] = {MOECAL_DT_BF16, MOECAL_DT_F16, MOECAL_DT_F32};
    const int layers[2] = {3, 9};
    const int64_t T = 1000;
    const int H = 4096;   /* chunks of 128 (bf16, f16) or 64 (f32) rows: the last one partial */

    for (int d = 0; d < 3; d++) {
        const char *path = tpath("direct.h5");
        moecal_act_writer *w = NULL;
        moecal_act *a = NULL;
        moecal_act_map *m = NULL;

        unlink(path);
        assert_int_equal(moecal_act_create(path, T, H, layers, 2, dts[d], &w), MOECAL_OK);
        for (int l = 0; l < 2; l++) {
            float *x = make_rows(layers[l], 0, T, H);
            x[5 * H + 7] = NAN;      /* non-finite values read as they are */
            x[6 * H + 2] = -NAN;
            x[999 * H] = -INFINITY;
            assert_int_equal(moecal_act_write_float(w, layers[l], 0, T, x), MOECAL_OK);
            free(x);
        }
        assert_int_equal(moecal_act_writer_close(w), MOECAL_OK);
        assert_int_equal(moecal_act_open(path, MPI_COMM_NULL, &a), MOECAL_OK);
        assert_int_equal(moecal_act_map_create(a, &m), MOECAL_OK);
        assert_non_null(m);
        for (int l = 0; l < 2; l++)
            same_as_hdf5(a, m, layers[l]);
        /* a layer the file lacks, rows past the end */
        uint16_t row[H];
        char sc[4 * H];
        assert_int_equal(moecal_act_map_read_bf16(m, 4, 0, 1, row, sc, sizeof sc),
                         MOECAL_ERR_INTERNAL);
        assert_int_equal(moecal_act_map_read_bf16(m, 3, T, 1, row, sc, sizeof sc),
                         MOECAL_ERR_INTERNAL);
        /* the file cut short after the map was made: an error naming it */
        assert_int_equal(truncate(path, 200000), 0);
        moecal_status s = moecal_act_map_read_bf16(m, 9, T - 1, 1, row, sc, sizeof sc);
        assert_int_equal(s, MOECAL_ERR_IO);
        assert_non_null(strstr(moecal_error_message(), path));
        assert_non_null(strstr(moecal_error_message(), "truncated"));
        moecal_act_map_free(m);
        moecal_act_close(a);
        check_no_leak();
        unlink(path);
    }
}

/* A file of one float32 layer [16, 8] (written: storage allocated), laid
 * out by dcpl, of the given file type. */
static const char *layout_file(const char *name, hid_t dcpl, hid_t ftype)
{
    spec sp = good_spec();
    const char *path;
    hid_t f, d, s;
    float v[16 * 8];

    sp.nl = 0;
    path = build(name, &sp);
    for (int i = 0; i < 16 * 8; i++)
        v[i] = (float)i * 0.25f - 3.0f;
    f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    hsize_t dims[2] = {16, 8};
    s = H5Screate_simple(2, dims, NULL);
    d = H5Dcreate2(f, "layers/3/hidden", ftype, s, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    if (d < 0) {
        hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
        H5Pset_create_intermediate_group(lcpl, 1);
        d = H5Dcreate2(f, "layers/3/hidden", ftype, s, lcpl, dcpl, H5P_DEFAULT);
        H5Pclose(lcpl);
    }
    assert_true(d >= 0);
    assert_true(H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v) >= 0);
    H5Dclose(d);
    H5Sclose(s);
    H5Fclose(f);
    return path;
}

static void test_direct_layouts(void **state)
{
    (void)state;
    struct {
        const char *what;
        int chunk_rows, chunk_cols, gzip;
        hid_t type;
        bool mapped;
    } cases[] = {
        {"contiguous", 0, 0, 0, H5T_IEEE_F32LE, true},
        {"chunks of 5 rows", 5, 8, 0, H5T_IEEE_F32LE, true},
        {"big-endian", 0, 0, 0, H5T_IEEE_F32BE, false},
        {"chunks of 4 columns", 5, 4, 0, H5T_IEEE_F32LE, false},
        {"gzip", 5, 8, 1, H5T_IEEE_F32LE, false},
    };

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
        moecal_act *a = NULL;
        moecal_act_map *m = (moecal_act_map *)&dcpl;
        if (cases[i].chunk_rows) {
            hsize_t cd[2] = {(hsize_t)cases[i].chunk_rows, (hsize_t)cases[i].chunk_cols};
            assert_true(H5Pset_chunk(dcpl, 2, cd) >= 0);
        }
        if (cases[i].gzip)
            assert_true(H5Pset_deflate(dcpl, 1) >= 0);
        const char *path = layout_file("layout.h5", dcpl, cases[i].type);
        H5Pclose(dcpl);
        if (moecal_act_open(path, MPI_COMM_NULL, &a) != MOECAL_OK)
            fail_msg("%s: %s", cases[i].what, moecal_error_message());
        if (moecal_act_map_create(a, &m) != MOECAL_OK)
            fail_msg("%s: %s", cases[i].what, moecal_error_message());
        if ((m != NULL) != cases[i].mapped)
            fail_msg("%s: %s", cases[i].what, m ? "mapped" : "not mapped");
        if (m)
            same_as_hdf5(a, m, 3);
        moecal_act_map_free(m);
        moecal_act_close(a);
        check_no_leak();
        unlink(path);
    }
}

/* What moecal-capture adds to a layer: kind and o_proj_input_amax. */
static void test_layer_attrs(void **state)
{
    (void)state;
    const char *path = tpath("kinds.h5");
    const int layers[2] = {0, 3};
    moecal_act_writer *w = NULL;
    moecal_act *a = NULL;
    float x[4 * 8];

    for (int i = 0; i < 32; i++)
        x[i] = (float)i;
    unlink(path);
    assert_int_equal(moecal_act_create(path, 4, 8, layers, 2, MOECAL_DT_BF16, &w), MOECAL_OK);
    for (int l = 0; l < 2; l++)
        assert_int_equal(moecal_act_write_float(w, layers[l], 0, 4, x), MOECAL_OK);
    assert_int_equal(moecal_act_writer_close(w), MOECAL_OK);
    /* without the attributes: MoE, nothing recorded */
    assert_int_equal(moecal_act_open(path, MPI_COMM_NULL, &a), MOECAL_OK);
    assert_false(moecal_act_layer_dense(a, 0));
    assert_true(isnan(moecal_act_o_proj_amax(a, 1)));
    moecal_act_close(a);

    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT), g = H5Gopen2(f, "layers/0", H5P_DEFAULT);
    attr_str(g, "kind", "dense", 0);
    hid_t sp = H5Screate(H5S_SCALAR);
    hid_t at = H5Acreate2(g, "o_proj_input_amax", H5T_IEEE_F32LE, sp, H5P_DEFAULT, H5P_DEFAULT);
    float v = 1.5f;
    assert_true(H5Awrite(at, H5T_NATIVE_FLOAT, &v) >= 0);
    H5Aclose(at);
    H5Gclose(g);
    g = H5Gopen2(f, "layers/3", H5P_DEFAULT);
    attr_str(g, "kind", "moe", 1);
    H5Gclose(g);
    H5Sclose(sp);
    H5Fclose(f);
    assert_int_equal(moecal_act_open(path, MPI_COMM_NULL, &a), MOECAL_OK);
    assert_true(moecal_act_layer_dense(a, 0));
    assert_false(moecal_act_layer_dense(a, 1));
    assert_true(moecal_act_o_proj_amax(a, 0) == 1.5);
    assert_true(isnan(moecal_act_o_proj_amax(a, 1)));
    moecal_act_close(a);

    /* a kind moecal does not know is refused, naming the layer */
    f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    g = H5Gopen2(f, "layers/3", H5P_DEFAULT);
    H5Adelete(g, "kind");
    attr_str(g, "kind", "sparse", 0);
    H5Gclose(g);
    H5Fclose(f);
    assert_int_equal(moecal_act_open(path, MPI_COMM_NULL, &a), MOECAL_ERR_FORMAT);
    assert_non_null(strstr(moecal_error_message(), "/layers/3"));
    assert_non_null(strstr(moecal_error_message(), "'sparse'"));
    check_no_leak();
    unlink(path);
}

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_bf16),
        cmocka_unit_test(test_round_trip_f16),
        cmocka_unit_test(test_round_trip_f32),
        cmocka_unit_test(test_round_trip_wide),
        cmocka_unit_test(test_round_trip_long),
        cmocka_unit_test(test_bf16_special),
        cmocka_unit_test(test_mpi_open),
        cmocka_unit_test(test_rows_out_of_range),
        cmocka_unit_test(test_writer_abort),
        cmocka_unit_test(test_good_handmade),
        cmocka_unit_test(test_bad_format),
        cmocka_unit_test(test_bad_version),
        cmocka_unit_test(test_no_layers),
        cmocka_unit_test(test_bad_rank),
        cmocka_unit_test(test_mismatched_shapes),
        cmocka_unit_test(test_h5_fail),
        cmocka_unit_test(test_h5_attr_int),
        cmocka_unit_test(test_bad_dtype),
        cmocka_unit_test(test_bad_names),
        cmocka_unit_test(test_not_hdf5),
        cmocka_unit_test(test_nonfinite),
        cmocka_unit_test(test_nonfinite_names_file),
        cmocka_unit_test(test_direct_reads),
        cmocka_unit_test(test_direct_layouts),
        cmocka_unit_test(test_layer_attrs),
    };
    const char *base = getenv("TMPDIR");
    int rc;

    if (MPI_Init(&argc, &argv) != MPI_SUCCESS)
        return 1;
    snprintf(tmpdir, sizeof tmpdir, "%s/moecal-test-act-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        MPI_Finalize();
        return 1;
    }
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    base_ids = ids_open();
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    if (rc == 0)
        rmtree(tmpdir);
    MPI_Finalize();
    return rc;
}
