/* activations.c - calibration activation files (HDF5); see activations.h.
 *
 * Reader: validates the whole layout while opening (root attributes, one
 * group per layer named by its decimal index, a 2-D float dataset `hidden` in
 * each, the same [T, H] everywhere) and keeps the datasets open; reads select
 * a hyperslab of rows and let HDF5 convert to the memory type.  bf16 is an
 * HDF5 float type (8 exponent bits, bias 127, 7 mantissa bits), so HDF5
 * converts it exactly; read_bf16 of bf16 data reads the raw bits.
 *
 * Every HDF5 call is checked.  HDF5 keeps the failing call's error stack until
 * the next call, so a failure is recorded (with the stack's innermost message)
 * before anything is cleaned up.
 */
#include "config.h"
#include "h5util.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <hdf5.h>

#include "activations.h"
#include "fp8.h"

#define ACT_FORMAT "moecal-activations"
#define ACT_FORMAT_VERSION 1
#define CHUNK_BYTES (1u << 20)          /* target bytes per chunk when writing */
#define SCRATCH_BYTES (8u << 20)        /* conversion buffers are at most this */
#define MAX_LAYER_NAME 16

typedef long long ll;

/* ------------------------------------------------------------------ HDF5 errors */

typedef struct h5_inner {
    char msg[512];
    bool found;
} h5_inner;

/* Upward walks start at the innermost function, where HDF5 found the error. */
static herr_t inner_cb(unsigned n, const H5E_error2_t *e, void *data)
{
    h5_inner *in = data;

    if (n == 0 && e && e->desc) {
        snprintf(in->msg, sizeof in->msg, "%s", e->desc);
        in->found = true;
    }
    return 0;
}

/* Record an error: the formatted text, then ": HDF5: <innermost message>" when
 * the current HDF5 error stack has one.  Clears the stack. */
static moecal_status h5_fail(moecal_status code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static moecal_status h5_fail(moecal_status code, const char *fmt, ...)
{
    char head[1024];
    h5_inner in = {.found = false};
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(head, sizeof head, fmt, ap);
    va_end(ap);
    if (H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, inner_cb, &in) < 0)
        in.found = false;
    H5Eclear2(H5E_DEFAULT);
    if (in.found && in.msg[0])
        return moecal_error_set(code, "%s (HDF5: %s)", head, in.msg);
    return moecal_error_set(code, "%s", head);
}

static void h5_quiet(void)
{
    /* Errors are reported through moecal's messages, never printed by HDF5. */
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

/* ------------------------------------------------------------------ types */

/* A 16-bit HDF5 float with the given fields, in the given byte order. */
static hid_t float16_type(hid_t base32, size_t epos, size_t esize, size_t msize, size_t ebias)
{
    hid_t t = H5Tcopy(base32);

    if (t < 0)
        return -1;
    /* Fields first (they fit in the 32-bit type), then shrink to 2 bytes. */
    if (H5Tset_fields(t, 15, epos, esize, 0, msize) < 0 || H5Tset_size(t, 2) < 0 ||
        H5Tset_ebias(t, ebias) < 0 || H5Tset_precision(t, 16) < 0) {
        H5Tclose(t);
        return -1;
    }
    return t;
}

static hid_t bf16_type(hid_t base32) { return float16_type(base32, 7, 8, 7, 127); }
static hid_t f16_type(hid_t base32) { return float16_type(base32, 10, 5, 10, 15); }

static const char *dtype_word(moecal_dtype t)
{
    switch (t) {
    case MOECAL_DT_BF16: return "bf16";
    case MOECAL_DT_F16: return "float16";
    case MOECAL_DT_F32: return "float32";
    default: return "?";
    }
}

/* What an HDF5 datatype is, in words, for messages ("a 32-bit signed integer"). */
static void describe_type(hid_t t, char *buf, size_t len)
{
    H5T_class_t c = H5Tget_class(t);
    size_t size = H5Tget_size(t);

    switch (c) {
    case H5T_INTEGER:
        snprintf(buf, len, "a %zu-bit %s integer", 8 * size,
                 H5Tget_sign(t) == H5T_SGN_NONE ? "unsigned" : "signed");
        break;
    case H5T_FLOAT: {
        size_t sp = 0, ep = 0, es = 0, mp = 0, ms = 0;
        H5Tget_fields(t, &sp, &ep, &es, &mp, &ms);
        snprintf(buf, len, "a %zu-bit float with %zu exponent and %zu mantissa bits",
                 8 * size, es, ms);
        break;
    }
    case H5T_STRING: snprintf(buf, len, "strings"); break;
    case H5T_COMPOUND: snprintf(buf, len, "a compound type"); break;
    case H5T_ENUM: snprintf(buf, len, "an enumeration"); break;
    case H5T_ARRAY: snprintf(buf, len, "an array type"); break;
    case H5T_VLEN: snprintf(buf, len, "a variable-length type"); break;
    case H5T_REFERENCE: snprintf(buf, len, "references"); break;
    case H5T_OPAQUE: snprintf(buf, len, "an opaque type"); break;
    case H5T_BITFIELD: snprintf(buf, len, "a bit field"); break;
    case H5T_TIME: snprintf(buf, len, "a time type"); break;
    default: snprintf(buf, len, "an unknown type"); break;
    }
}

/* Which of bf16, float16, float32 an HDF5 float type is; MOECAL_DT_UNKNOWN
 * for any other layout. */
static moecal_dtype classify_float(hid_t t)
{
    size_t sp, ep, es, mp, ms, size, bias;

    if (H5Tget_class(t) != H5T_FLOAT)
        return MOECAL_DT_UNKNOWN;
    size = H5Tget_size(t);
    if (H5Tget_fields(t, &sp, &ep, &es, &mp, &ms) < 0)
        return MOECAL_DT_UNKNOWN;
    bias = H5Tget_ebias(t);
    if (H5Tget_offset(t) != 0 || H5Tget_precision(t) != 8 * size ||
        H5Tget_norm(t) != H5T_NORM_IMPLIED)
        return MOECAL_DT_UNKNOWN;
    if (size == 2 && sp == 15 && ep == 7 && es == 8 && mp == 0 && ms == 7 && bias == 127)
        return MOECAL_DT_BF16;
    if (size == 2 && sp == 15 && ep == 10 && es == 5 && mp == 0 && ms == 10 && bias == 15)
        return MOECAL_DT_F16;
    if (size == 4 && sp == 31 && ep == 23 && es == 8 && mp == 0 && ms == 23 && bias == 127)
        return MOECAL_DT_F32;
    return MOECAL_DT_UNKNOWN;
}

/* ------------------------------------------------------------------ reader */

struct moecal_act {
    char *path;
    hid_t file, dxpl, mem_bf16;
    int n_layers;
    int *layers;          /* ascending */
    hid_t *dsets;         /* same order */
    int64_t T;
    int H;
    moecal_dtype dtype;
    int64_t chunk_rows;
    bool *dense;          /* [n_layers] kind "dense" (moecal-capture) */
    double *o_amax;       /* [n_layers] o_proj_input_amax, NaN when not recorded */
    float *scratch;       /* read_bf16 of f16/f32 data */
    size_t scratch_n;     /* floats */
};

/* A string attribute of obj into buf; *found = false when it does not exist. */
static moecal_status read_str_attr(const char *path, hid_t obj, const char *name, char *buf,
                                   size_t len, bool *found)
{
    return moecal_h5_attr_str(obj, path, name, false, buf, len, found);
}

/* "17" -> 17; leading zeros, signs, spaces and overflow refused. */
static bool parse_layer_name(const char *s, int *out)
{
    long v = 0;

    if (!*s || (s[0] == '0' && s[1]) || strlen(s) > 9)
        return false;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9')
            return false;
        v = v * 10 + (*p - '0');
    }
    *out = (int)v;
    return true;
}

static int cmp_int(const void *a, const void *b)
{
    return MOECAL_CMP(*(const int *)a, *(const int *)b);
}

/* The attributes moecal-capture gives /layers/<name>: kind and the o_proj
 * input amax, both optional. */
static moecal_status layer_attrs(moecal_act *a, hid_t layers_g, const char *name, int i)
{
    hid_t g = H5Gopen2(layers_g, name, H5P_DEFAULT);
    char where[512], kind[16];
    bool found = false;
    moecal_status st;

    if (g < 0)
        return h5_fail(MOECAL_ERR_FORMAT, "%s: cannot open group /layers/%s", a->path, name);
    snprintf(where, sizeof where, "%s: /layers/%s", a->path, name);
    a->o_amax[i] = NAN;
    st = moecal_h5_attr_str(g, where, "kind", false, kind, sizeof kind, &found);
    if (st == MOECAL_OK && found && strcmp(kind, "moe") != 0 && strcmp(kind, "dense") != 0)
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: attribute 'kind' is '%s'; expected "
                              "'moe' or 'dense'", where, kind);
    a->dense[i] = st == MOECAL_OK && found && strcmp(kind, "dense") == 0;
    if (st == MOECAL_OK)
        st = moecal_h5_attr_float(g, where, "o_proj_input_amax", false, &a->o_amax[i], NULL);
    H5Gclose(g);
    return st;
}

/* Open /layers/<name>/hidden of the file and check it; fills dims and dtype. */
static moecal_status open_layer(moecal_act *a, hid_t layers_g, hid_t lapl,
                                const char *name, hid_t *dset_out, hsize_t dims[2],
                                moecal_dtype *dt, int64_t *chunk_rows)
{
    hid_t g = -1, d = -1, space = -1, type = -1, dcpl = -1;
    H5L_info_t li;
    htri_t ex;
    int ndims, nfilt;
    moecal_status st = MOECAL_OK;
    char what[256];

    *dset_out = -1;
    if (H5Lget_info(layers_g, name, &li, lapl) < 0) {
        st = h5_fail(MOECAL_ERR_FORMAT, "%s: cannot look up /layers/%s", a->path, name);
        goto out;
    }
    if (li.type == H5L_TYPE_EXTERNAL) {
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: /layers/%s is a link to another file; "
                              "expected a group holding dataset 'hidden'", a->path, name);
        goto out;
    }
    if ((g = H5Oopen(layers_g, name, lapl)) < 0) {
        st = h5_fail(MOECAL_ERR_FORMAT, "%s: cannot open /layers/%s", a->path, name);
        goto out;
    }
    if (H5Iget_type(g) != H5I_GROUP) {
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: /layers/%s is not a group; expected a "
                              "group holding dataset 'hidden'", a->path, name);
        goto out;
    }
    ex = H5Lexists(g, "hidden", lapl);
    if (ex < 0) {
        st = h5_fail(MOECAL_ERR_FORMAT, "%s: cannot look up /layers/%s/hidden", a->path, name);
        goto out;
    }
    if (ex == 0) {
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: group /layers/%s has no dataset "
                              "'hidden'", a->path, name);
        goto out;
    }
    if ((d = H5Oopen(g, "hidden", lapl)) < 0) {
        st = h5_fail(MOECAL_ERR_FORMAT, "%s: cannot open /layers/%s/hidden", a->path, name);
        goto out;
    }
    if (H5Iget_type(d) != H5I_DATASET) {
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: /layers/%s/hidden is not a dataset",
                              a->path, name);
        goto out;
    }
    if ((space = H5Dget_space(d)) < 0 || (type = H5Dget_type(d)) < 0 ||
        (dcpl = H5Dget_create_plist(d)) < 0) {
        st = h5_fail(MOECAL_ERR_FORMAT, "%s: cannot query dataset /layers/%s/hidden",
                     a->path, name);
        goto out;
    }
    ndims = H5Sget_simple_extent_ndims(space);
    if (ndims != 2) {
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset /layers/%s/hidden has %d "
                              "dimension(s); expected 2 ([tokens, hidden])", a->path, name,
                              ndims);
        goto out;
    }
    if (H5Sget_simple_extent_dims(space, dims, NULL) < 0) {
        st = h5_fail(MOECAL_ERR_FORMAT, "%s: cannot read the shape of /layers/%s/hidden",
                     a->path, name);
        goto out;
    }
    if (dims[0] < 1 || dims[1] < 1 || dims[0] > (hsize_t)INT64_MAX / 2 ||
        dims[1] > (hsize_t)INT_MAX) {
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset /layers/%s/hidden has shape "
                              "[%llu, %llu]; expected at least one token and 1 <= hidden <= %d",
                              a->path, name, (unsigned long long)dims[0],
                              (unsigned long long)dims[1], INT_MAX);
        goto out;
    }
    /* A chunked dataset whose chunks were never written (a capture that
     * died after creating it) reads as zeros: input amax 0, scale 0. */
#ifdef HAVE_H5DGET_NUM_CHUNKS /* HDF5 >= 1.10.5 */
    {
        hsize_t cd[2], nch = 0;
        if (H5Pget_layout(dcpl) == H5D_CHUNKED && H5Pget_chunk(dcpl, 2, cd) == 2 && cd[0] &&
            cd[1] && H5Dget_num_chunks(d, space, &nch) >= 0) {
            hsize_t want = ((dims[0] + cd[0] - 1) / cd[0]) * ((dims[1] + cd[1] - 1) / cd[1]);
            if (nch < want) {
                st = moecal_error_set(MOECAL_ERR_FORMAT,
                                      "%s: dataset /layers/%s/hidden has %llu rows of which %s "
                                      "written (a capture that stopped early?); unwritten rows "
                                      "would read as zeros", a->path, name,
                                      (unsigned long long)dims[0],
                                      nch == 0 ? "none were" : "only some were");
                goto out;
            }
        }
    }
#endif
    *dt = classify_float(type);
    if (*dt == MOECAL_DT_UNKNOWN) {
        describe_type(type, what, sizeof what);
        st = moecal_error_set(H5Tget_class(type) == H5T_FLOAT ? MOECAL_ERR_UNSUPPORTED
                                                               : MOECAL_ERR_FORMAT,
                              "%s: dataset /layers/%s/hidden holds %s; expected bf16 (8 exponent, "
                              "7 mantissa bits), float16 or float32", a->path, name, what);
        goto out;
    }
    /* Compression this HDF5 cannot undo would fail at the first read. */
    nfilt = H5Pget_nfilters(dcpl);
    for (int i = 0; i < nfilt; i++) {
        unsigned flags = 0, cd[8];
        size_t ncd = 8;
        char fname[128] = "";
        H5Z_filter_t fid = H5Pget_filter2(dcpl, (unsigned)i, &flags, &ncd, cd, sizeof fname,
                                          fname, NULL);
        if (fid < 0) {
            st = h5_fail(MOECAL_ERR_FORMAT, "%s: cannot query the filters of /layers/%s/hidden",
                         a->path, name);
            goto out;
        }
        if (H5Zfilter_avail(fid) <= 0) {
            H5Eclear2(H5E_DEFAULT);
            st = moecal_error_set(MOECAL_ERR_UNSUPPORTED, "%s: dataset /layers/%s/hidden is "
                                  "compressed with HDF5 filter %d (%s), which this HDF5 "
                                  "library does not have", a->path, name, (int)fid,
                                  fname[0] ? fname : "unnamed");
            goto out;
        }
    }
    *chunk_rows = 0;
    if (H5Pget_layout(dcpl) == H5D_CHUNKED) {
        hsize_t cd[2];
        if (H5Pget_chunk(dcpl, 2, cd) == 2)
            *chunk_rows = (int64_t)cd[0];
        else
            H5Eclear2(H5E_DEFAULT);
    }
    *dset_out = d;
    d = -1;
out:
    moecal_h5_close(&dcpl);
    moecal_h5_close(&type);
    moecal_h5_close(&space);
    moecal_h5_close(&d);
    moecal_h5_close(&g);
    return st;
}

/* Validate the layers group and open every layer's dataset. */
static moecal_status open_layers(moecal_act *a, hid_t lapl)
{
    hid_t g = -1;
    H5G_info_t gi;
    htri_t ex;
    char **names = NULL;
    moecal_status st = MOECAL_OK;
    hsize_t dims[2], dims0[2] = {0, 0};
    int first = -1;
    char shown[64];

    ex = H5Lexists(a->file, "layers", lapl);
    if (ex < 0)
        return h5_fail(MOECAL_ERR_FORMAT, "%s: cannot look up group /layers", a->path);
    if (ex == 0)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: no group /layers (expected "
                                "/layers/<L>/hidden for each MoE layer L)", a->path);
    if ((g = H5Oopen(a->file, "layers", lapl)) < 0)
        return h5_fail(MOECAL_ERR_FORMAT, "%s: cannot open /layers", a->path);
    if (H5Iget_type(g) != H5I_GROUP) {
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: /layers is not a group (expected "
                              "/layers/<L>/hidden for each MoE layer L)", a->path);
        goto out;
    }
    if (H5Gget_info(g, &gi) < 0) {
        st = h5_fail(MOECAL_ERR_FORMAT, "%s: cannot list /layers", a->path);
        goto out;
    }
    if (gi.nlinks == 0) {
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: group /layers is empty (expected "
                              "/layers/<L>/hidden for each MoE layer L)", a->path);
        goto out;
    }
    if (gi.nlinks > 1000000) {
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: group /layers has %llu members",
                              a->path, (unsigned long long)gi.nlinks);
        goto out;
    }
    a->n_layers = (int)gi.nlinks;
    names = calloc(gi.nlinks, sizeof *names);
    a->layers = calloc(gi.nlinks, sizeof *a->layers);
    a->dsets = malloc(gi.nlinks * sizeof *a->dsets);
    a->dense = calloc(gi.nlinks, sizeof *a->dense);
    a->o_amax = calloc(gi.nlinks, sizeof *a->o_amax);
    if (!names || !a->layers || !a->dsets || !a->dense || !a->o_amax) {
        st = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", a->path);
        goto out;
    }
    for (int i = 0; i < a->n_layers; i++)
        a->dsets[i] = -1;
    for (int i = 0; i < a->n_layers; i++) {
        ssize_t n = H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, (hsize_t)i, NULL, 0,
                                       lapl);
        if (n < 0) {
            st = h5_fail(MOECAL_ERR_FORMAT, "%s: cannot list /layers", a->path);
            goto out;
        }
        if (!(names[i] = malloc((size_t)n + 1))) {
            st = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", a->path);
            goto out;
        }
        if (H5Lget_name_by_idx(g, ".", H5_INDEX_NAME, H5_ITER_INC, (hsize_t)i, names[i],
                               (size_t)n + 1, lapl) < 0) {
            st = h5_fail(MOECAL_ERR_FORMAT, "%s: cannot list /layers", a->path);
            goto out;
        }
        if (!parse_layer_name(names[i], &a->layers[i])) {
            moecal_printable(shown, sizeof shown, names[i]);
            st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: /layers/%s: expected groups named "
                                  "by decimal model layer index (/layers/3, /layers/4, ...)",
                                  a->path, shown);
            goto out;
        }
    }
    /* Sort by layer index (names sort as text); names follow their layers. */
    for (int i = 1; i < a->n_layers; i++) {
        for (int j = i; j > 0 && a->layers[j - 1] > a->layers[j]; j--) {
            int t = a->layers[j];
            char *tn = names[j];
            a->layers[j] = a->layers[j - 1];
            names[j] = names[j - 1];
            a->layers[j - 1] = t;
            names[j - 1] = tn;
        }
    }
    for (int i = 0; i < a->n_layers; i++) {
        moecal_dtype dt = MOECAL_DT_UNKNOWN;
        int64_t crow = 0;
        st = open_layer(a, g, lapl, names[i], &a->dsets[i], dims, &dt, &crow);
        if (st == MOECAL_OK)
            st = layer_attrs(a, g, names[i], i);
        if (st != MOECAL_OK)
            goto out;
        if (first < 0) {
            first = i;
            dims0[0] = dims[0];
            dims0[1] = dims[1];
            a->dtype = dt;
            a->chunk_rows = crow;
            continue;
        }
        if (dims[0] != dims0[0] || dims[1] != dims0[1]) {
            st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset /layers/%s/hidden has shape "
                                  "[%llu, %llu] but /layers/%s/hidden has [%llu, %llu]; every "
                                  "layer must hold the same tokens and hidden size", a->path,
                                  names[i], (unsigned long long)dims[0],
                                  (unsigned long long)dims[1], names[first],
                                  (unsigned long long)dims0[0], (unsigned long long)dims0[1]);
            goto out;
        }
        if (dt != a->dtype) {
            st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset /layers/%s/hidden holds %s "
                                  "but /layers/%s/hidden holds %s; every layer must have the "
                                  "same element type", a->path, names[i], dtype_word(dt),
                                  names[first], dtype_word(a->dtype));
            goto out;
        }
    }
    a->T = (int64_t)dims0[0];
    a->H = (int)dims0[1];
out:
    if (names)
        for (size_t i = 0; i < gi.nlinks; i++)
            free(names[i]);
    free(names);
    moecal_h5_close(&g);
    return st;
}

moecal_status moecal_act_open(const char *path, MPI_Comm comm, moecal_act **out)
{
    moecal_act *a;
    hid_t fapl = -1, lapl = -1;
    moecal_status st = MOECAL_OK;
    struct stat sb;
    htri_t is;
    char fmt[256];
    int64_t version = 0;
    bool found;

    if (!path || !out)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_act_open: null argument");
    *out = NULL;
    h5_quiet();
    if (stat(path, &sb) != 0)
        return moecal_error_errno(errno, "%s: cannot open the activation file", path);
    if (!S_ISREG(sb.st_mode))
        return moecal_error_set(MOECAL_ERR_IO, "%s: not a regular file (expected an HDF5 "
                                "activation file)", path);
    if (!(a = calloc(1, sizeof *a)) || !(a->path = strdup(path))) {
        free(a);
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", path);
    }
    a->file = a->dxpl = a->mem_bf16 = -1;
    if ((st = moecal_check_regular(path, "the activation file")) != MOECAL_OK)
        goto fail;
    is = H5Fis_hdf5(path);
    if (is <= 0) {
        if (is < 0)
            st = h5_fail(MOECAL_ERR_IO, "%s: cannot read the activation file", path);
        else
            st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: not an HDF5 file (expected an "
                                  "activation file with format \"%s\")", path, ACT_FORMAT);
        goto fail;
    }
    if ((fapl = H5Pcreate(H5P_FILE_ACCESS)) < 0 || (lapl = H5Pcreate(H5P_LINK_ACCESS)) < 0 ||
        (a->dxpl = H5Pcreate(H5P_DATASET_XFER)) < 0) {
        st = h5_fail(MOECAL_ERR_HDF5, "%s: cannot create HDF5 property lists", path);
        goto fail;
    }
    if (comm != MPI_COMM_NULL) {
        if (H5Pset_fapl_mpio(fapl, comm, MPI_INFO_NULL) < 0 ||
            H5Pset_dxpl_mpio(a->dxpl, H5FD_MPIO_INDEPENDENT) < 0) {
            st = h5_fail(MOECAL_ERR_HDF5, "%s: cannot set up MPI-IO access", path);
            goto fail;
        }
        /* Metadata read collectively while every rank opens the same objects;
         * set on the link access list used by the opens only, not on the
         * file's, so that the later independent reads (which look up chunk
         * indices) need no other rank. */
#ifdef HAVE_H5PSET_ALL_COLL_METADATA_OPS
        if (H5Pset_all_coll_metadata_ops(lapl, 1) < 0) {
            st = h5_fail(MOECAL_ERR_HDF5, "%s: cannot set collective metadata reads", path);
            goto fail;
        }
#endif
#ifdef HAVE_H5PSET_COLL_METADATA_WRITE
        /* Read-only here; set so that no metadata is ever written independently. */
        if (H5Pset_coll_metadata_write(fapl, 1) < 0) {
            st = h5_fail(MOECAL_ERR_HDF5, "%s: cannot set collective metadata writes", path);
            goto fail;
        }
#endif
    }
    a->file = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    if (a->file < 0) {
        st = h5_fail(MOECAL_ERR_IO, "%s: cannot open the activation file", path);
        goto fail;
    }
    moecal_h5_close(&fapl);
    if ((a->mem_bf16 = bf16_type(H5T_NATIVE_FLOAT)) < 0) {
        st = h5_fail(MOECAL_ERR_HDF5, "%s: cannot build the bf16 memory type", path);
        goto fail;
    }

    if ((st = read_str_attr(path, a->file, "format", fmt, sizeof fmt, &found)) != MOECAL_OK)
        goto fail;
    if (!found) {
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: root attribute 'format' missing; expected "
                              "format = \"%s\" (is this an activation file?)", path, ACT_FORMAT);
        goto fail;
    }
    if (strcmp(fmt, ACT_FORMAT) != 0) {
        char shown[96];
        moecal_printable(shown, sizeof shown, fmt);
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: root attribute format = \"%s\"; expected "
                              "\"%s\"", path, shown, ACT_FORMAT);
        goto fail;
    }
    if ((st = moecal_h5_attr_int(a->file, path, "format_version", false, &version, &found)) != MOECAL_OK)
        goto fail;
    if (!found) {
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: root attribute 'format_version' missing; "
                              "expected format_version = %d", path, ACT_FORMAT_VERSION);
        goto fail;
    }
    if (version != ACT_FORMAT_VERSION) {
        st = moecal_error_set(MOECAL_ERR_UNSUPPORTED, "%s: format_version = %lld; this moecal "
                              "reads format_version %d", path, (ll)version, ACT_FORMAT_VERSION);
        goto fail;
    }
    if ((st = open_layers(a, lapl)) != MOECAL_OK)
        goto fail;
    moecal_h5_close(&lapl);
    *out = a;
    return MOECAL_OK;
fail:
    moecal_h5_close(&fapl);
    moecal_h5_close(&lapl);
    moecal_act_close(a);
    return st;
}

void moecal_act_close(moecal_act *a)
{
    if (!a)
        return;
    moecal_h5_close_array(a->dsets, a->n_layers);
    free(a->dense);
    free(a->o_amax);
    moecal_h5_close(&a->mem_bf16);
    moecal_h5_close(&a->dxpl);
    moecal_h5_close(&a->file);
    H5Eclear2(H5E_DEFAULT);
    free(a->layers);
    free(a->scratch);
    free(a->path);
    free(a);
}

const char *moecal_act_path(const moecal_act *a) { return a->path; }
int64_t moecal_act_tokens(const moecal_act *a) { return a->T; }
int moecal_act_hidden(const moecal_act *a) { return a->H; }
int moecal_act_n_layers(const moecal_act *a) { return a->n_layers; }
const int *moecal_act_layers(const moecal_act *a) { return a->layers; }
moecal_dtype moecal_act_dtype(const moecal_act *a) { return a->dtype; }
int64_t moecal_act_chunk_rows(const moecal_act *a) { return a->chunk_rows; }
int64_t moecal_act_file(const moecal_act *a) { return a->file; }
bool moecal_act_layer_dense(const moecal_act *a, int i) { return a->dense[i]; }
double moecal_act_o_proj_amax(const moecal_act *a, int i) { return a->o_amax[i]; }
int64_t moecal_act_dataset(const moecal_act *a, int i) { return a->dsets[i]; }

static int layer_index(const moecal_act *a, int layer)
{
    const int *p = bsearch(&layer, a->layers, (size_t)a->n_layers, sizeof *a->layers, cmp_int);
    return p ? (int)(p - a->layers) : -1;
}

int moecal_act_has_layer(const moecal_act *a, int layer)
{
    return layer_index(a, layer) >= 0;
}

/* Check a read request; *li receives the layer's position. */
static moecal_status check_rows(const moecal_act *a, int layer, int64_t row0, int64_t nrows,
                                const void *dst, int *li)
{
    if (!dst && nrows > 0)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: read into a null buffer", a->path);
    *li = layer_index(a, layer);
    if (*li < 0)
        return moecal_error_set(MOECAL_ERR_MISMATCH, "%s: no dataset /layers/%d/hidden (the "
                                "file holds %d layer(s), %d to %d)", a->path, layer,
                                a->n_layers, a->layers[0], a->layers[a->n_layers - 1]);
    if (row0 < 0 || nrows < 0 || row0 > a->T || nrows > a->T - row0)
        return moecal_error_set(MOECAL_ERR_MISMATCH, "%s: rows [%lld, %lld) of dataset "
                                "/layers/%d/hidden requested; it holds rows [0, %lld)",
                                a->path, (ll)row0, (ll)row0 + (ll)nrows, layer, (ll)a->T);
    return MOECAL_OK;
}

/* Read rows into dst in memory type mt (no checks). */
static moecal_status read_rows(moecal_act *a, int li, int64_t row0, int64_t nrows, hid_t mt,
                               void *dst)
{
    hid_t fs = -1, ms = -1;
    hsize_t start[2] = {(hsize_t)row0, 0}, count[2] = {(hsize_t)nrows, (hsize_t)a->H};
    moecal_status st = MOECAL_OK;

    if (nrows == 0)
        return MOECAL_OK;
    if ((fs = H5Dget_space(a->dsets[li])) < 0 ||
        H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL) < 0 ||
        (ms = H5Screate_simple(2, count, NULL)) < 0 ||
        H5Dread(a->dsets[li], mt, ms, fs, a->dxpl, dst) < 0)
        st = h5_fail(MOECAL_ERR_IO, "%s: cannot read rows [%lld, %lld) of dataset "
                     "/layers/%d/hidden", a->path, (ll)row0, (ll)(row0 + nrows),
                     a->layers[li]);
    moecal_h5_close(&ms);
    moecal_h5_close(&fs);
    return st;
}

moecal_status moecal_act_read_float(moecal_act *a, int layer, int64_t row0, int64_t nrows,
                                    float *dst)
{
    int li;

    if (!a)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_act_read_float: no file");
    MOECAL_TRY(check_rows(a, layer, row0, nrows, dst, &li));
    return read_rows(a, li, row0, nrows, H5T_NATIVE_FLOAT, dst);
}

moecal_status moecal_act_read_bf16(moecal_act *a, int layer, int64_t row0, int64_t nrows,
                                   uint16_t *dst)
{
    int li;
    int64_t step;

    if (!a)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_act_read_bf16: no file");
    MOECAL_TRY(check_rows(a, layer, row0, nrows, dst, &li));
    if (a->dtype == MOECAL_DT_BF16)
        return read_rows(a, li, row0, nrows, a->mem_bf16, dst);
    /* f16/f32: float32 through a bounded buffer, then nearest-even bf16. */
    step = (int64_t)(SCRATCH_BYTES / (sizeof(float) * (size_t)a->H));
    if (step < 1)
        step = 1;
    if (step > nrows)
        step = nrows;
    if (step > 0 && a->scratch_n < (size_t)step * (size_t)a->H) {
        float *p = realloc(a->scratch, (size_t)step * (size_t)a->H * sizeof *p);
        if (!p)
            return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory reading %lld rows",
                                    a->path, (ll)step);
        a->scratch = p;
        a->scratch_n = (size_t)step * (size_t)a->H;
    }
    for (int64_t r = 0; r < nrows; r += step) {
        int64_t n = nrows - r < step ? nrows - r : step;
        size_t cnt = (size_t)n * (size_t)a->H;
        uint16_t *o = dst + (size_t)r * (size_t)a->H;
        const float *in = a->scratch;
        MOECAL_TRY(read_rows(a, li, row0 + r, n, H5T_NATIVE_FLOAT, a->scratch));
#pragma omp parallel for schedule(static) if (cnt > (1u << 18))
        for (size_t i = 0; i < cnt; i++)
            o[i] = moecal_float_to_bf16(in[i]);
    }
    return MOECAL_OK;
}

moecal_status moecal_act_scan_nonfinite(const moecal_act *a, const uint16_t *rows,
                                        int64_t nrows, int H, int layer,
                                        int64_t first_token, moecal_nonfinite policy,
                                        uint8_t *skip, int64_t *n_bad)
{
    int64_t bad = 0, first_bad = -1;
    int first_count = 0;

    if (n_bad)
        *n_bad = 0;
    if (nrows <= 0)
        return MOECAL_OK;
    if (!rows || H <= 0)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_act_scan_nonfinite: bad arguments");
    /* A bf16 is NaN or Inf exactly when its 8 exponent bits are all ones. */
#pragma omp parallel for schedule(static) reduction(+:bad) \
    if ((size_t)nrows * (size_t)H > (1u << 20))
    for (int64_t r = 0; r < nrows; r++) {
        const uint16_t *p = rows + (size_t)r * (size_t)H;
        int hit = 0;
        for (int h = 0; h < H; h++)
            hit |= (p[h] & 0x7f80) == 0x7f80;
        if (skip)
            skip[r] = (uint8_t)hit;
        bad += hit;
    }
    if (n_bad)
        *n_bad = bad;
    if (bad == 0 || policy == MOECAL_NONFINITE_SKIP)
        return MOECAL_OK;
    for (int64_t r = 0; r < nrows && first_bad < 0; r++) {
        const uint16_t *p = rows + (size_t)r * (size_t)H;
        for (int h = 0; h < H; h++)
            first_count += (p[h] & 0x7f80) == 0x7f80;
        if (first_count)
            first_bad = r;
    }
    return moecal_error_set(MOECAL_ERR_NONFINITE, "%s: layer %d, token %lld: %d NaN/Inf "
                            "value(s) in /layers/%d/hidden (%lld of the %lld rows scanned are "
                            "affected; --nonfinite skip leaves such tokens out)",
                            a ? a->path : "activations", layer, (ll)(first_token + first_bad),
                            first_count, layer, (ll)bad, (ll)nrows);
}

/* ------------------------------------------------------------------ writer */

struct moecal_act_writer {
    char *path, *tmp;
    hid_t file, ftype, mtype;   /* mtype: 16-bit memory type (bf16/f16), or float */
    hid_t gcpl;                 /* groups: no modification times */
    int n_layers;
    int *layers;
    hid_t *dsets;
    int64_t T, chunk_rows;
    int H;
    moecal_dtype dtype;
    uint16_t *scratch;
    size_t scratch_n;
};

static moecal_status write_attr(const char *path, hid_t obj, const char *name, hid_t mt,
                                const void *val, hid_t ft)
{
    hid_t space = -1, attr = -1;
    moecal_status st = MOECAL_OK;

    if ((space = H5Screate(H5S_SCALAR)) < 0 ||
        (attr = H5Acreate2(obj, name, ft, space, H5P_DEFAULT, H5P_DEFAULT)) < 0 ||
        H5Awrite(attr, mt, val) < 0)
        st = h5_fail(MOECAL_ERR_IO, "%s: cannot write root attribute '%s'", path, name);
    moecal_h5_close(&attr);
    moecal_h5_close(&space);
    return st;
}

static moecal_status write_str_attr(const char *path, hid_t obj, const char *name,
                                    const char *value)
{
    hid_t t = -1;
    moecal_status st;
    size_t n = strlen(value);

    if ((t = H5Tcopy(H5T_C_S1)) < 0 || H5Tset_size(t, n ? n + 1 : 1) < 0 ||
        H5Tset_strpad(t, H5T_STR_NULLTERM) < 0 || H5Tset_cset(t, H5T_CSET_UTF8) < 0) {
        st = h5_fail(MOECAL_ERR_HDF5, "%s: cannot build a string type", path);
        moecal_h5_close(&t);
        return st;
    }
    st = write_attr(path, obj, name, t, value, t);
    moecal_h5_close(&t);
    return st;
}

static moecal_status write_i64_attr(const char *path, hid_t obj, const char *name, int64_t v)
{
    return write_attr(path, obj, name, H5T_NATIVE_INT64, &v, H5T_STD_I64LE);
}

static void writer_free(moecal_act_writer *w)
{
    moecal_h5_close_array(w->dsets, w->n_layers);
    moecal_h5_close(&w->ftype);
    moecal_h5_close(&w->gcpl);
    if (w->mtype >= 0 && w->mtype != H5T_NATIVE_FLOAT)
        moecal_h5_close(&w->mtype);
    moecal_h5_close(&w->file);
    H5Eclear2(H5E_DEFAULT);
    free(w->layers);
    free(w->scratch);
    free(w->tmp);
    free(w->path);
    free(w);
}

void moecal_act_writer_abort(moecal_act_writer *w)
{
    if (!w)
        return;
    h5_quiet();
    if (w->tmp)
        unlink(w->tmp);
    writer_free(w);
}

static moecal_status create_layer(moecal_act_writer *w, int i)
{
    hid_t g = -1, space = -1, dcpl = -1;
    char name[MAX_LAYER_NAME + 8];
    hsize_t dims[2] = {(hsize_t)w->T, (hsize_t)w->H};
    hsize_t chunk[2] = {(hsize_t)w->chunk_rows, (hsize_t)w->H};
    moecal_status st = MOECAL_OK;

    snprintf(name, sizeof name, "/layers/%d", w->layers[i]);
    /* No modification times in object headers: same data, same bytes. */
    if ((g = H5Gcreate2(w->file, name, H5P_DEFAULT, w->gcpl, H5P_DEFAULT)) < 0 ||
        (space = H5Screate_simple(2, dims, NULL)) < 0 ||
        (dcpl = H5Pcreate(H5P_DATASET_CREATE)) < 0 || H5Pset_chunk(dcpl, 2, chunk) < 0 ||
        H5Pset_fill_time(dcpl, H5D_FILL_TIME_NEVER) < 0 ||
        H5Pset_obj_track_times(dcpl, 0) < 0 ||
        (w->dsets[i] = H5Dcreate2(g, "hidden", w->ftype, space, H5P_DEFAULT, dcpl,
                                  H5P_DEFAULT)) < 0)
        st = h5_fail(MOECAL_ERR_IO, "%s: cannot create dataset %s/hidden [%lld, %d]", w->tmp,
                     name, (ll)w->T, w->H);
    moecal_h5_close(&dcpl);
    moecal_h5_close(&space);
    moecal_h5_close(&g);
    return st;
}

moecal_status moecal_act_create(const char *path, int64_t tokens, int hidden,
                                const int *layers, int n_layers, moecal_dtype dtype,
                                moecal_act_writer **out)
{
    moecal_act_writer *w;
    moecal_status st = MOECAL_OK;
    hid_t lg = -1;
    size_t len, rowbytes;

    if (!path || !out || (n_layers > 0 && !layers))
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_act_create: null argument");
    *out = NULL;
    if (tokens < 1 || hidden < 1 || n_layers < 1)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: cannot create an activation file "
                                "of %lld tokens, hidden size %d, %d layers", path,
                                (ll)tokens, hidden, n_layers);
    if (dtype != MOECAL_DT_BF16 && dtype != MOECAL_DT_F16 && dtype != MOECAL_DT_F32)
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED, "%s: activation files hold bf16, "
                                "float16 or float32, not %s", path, moecal_dtype_name(dtype));
    for (int i = 0; i < n_layers; i++) {
        if (layers[i] < 0)
            return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: layer index %d", path,
                                    layers[i]);
        for (int j = 0; j < i; j++)
            if (layers[j] == layers[i])
                return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: layer %d given twice", path,
                                        layers[i]);
    }
    h5_quiet();
    if (!(w = calloc(1, sizeof *w)))
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", path);
    w->file = w->ftype = w->mtype = w->gcpl = -1;
    w->T = tokens;
    w->H = hidden;
    w->dtype = dtype;
    w->n_layers = n_layers;
    len = strlen(path);
    w->path = strdup(path);
    w->tmp = malloc(len + 5);
    w->layers = malloc((size_t)n_layers * sizeof *w->layers);
    w->dsets = malloc((size_t)n_layers * sizeof *w->dsets);
    if (!w->path || !w->tmp || !w->layers || !w->dsets) {
        free(w->tmp);
        w->tmp = NULL; /* nothing created yet: abort must not unlink */
        writer_free(w);
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", path);
    }
    memcpy(w->tmp, path, len);
    memcpy(w->tmp + len, ".tmp", 5);
    memcpy(w->layers, layers, (size_t)n_layers * sizeof *w->layers);
    for (int i = 0; i < n_layers; i++)
        w->dsets[i] = -1;
    rowbytes = (size_t)hidden * moecal_dtype_size(dtype);
    w->chunk_rows = (int64_t)(CHUNK_BYTES / rowbytes);
    if (w->chunk_rows < 1)
        w->chunk_rows = 1;
    if (w->chunk_rows > tokens)
        w->chunk_rows = tokens;

    if (dtype == MOECAL_DT_BF16) {
        w->ftype = bf16_type(H5T_IEEE_F32LE);
        w->mtype = bf16_type(H5T_NATIVE_FLOAT);
    } else if (dtype == MOECAL_DT_F16) {
        w->ftype = f16_type(H5T_IEEE_F32LE);
        w->mtype = f16_type(H5T_NATIVE_FLOAT);
    } else {
        w->ftype = H5Tcopy(H5T_IEEE_F32LE);
        w->mtype = H5T_NATIVE_FLOAT;
    }
    if (w->ftype < 0 || w->mtype < 0) {
        st = h5_fail(MOECAL_ERR_HDF5, "%s: cannot build the %s HDF5 type", path,
                     dtype_word(dtype));
        free(w->tmp);
        w->tmp = NULL;
        writer_free(w);
        return st;
    }
    if ((w->gcpl = H5Pcreate(H5P_GROUP_CREATE)) < 0 || H5Pset_obj_track_times(w->gcpl, 0) < 0) {
        st = h5_fail(MOECAL_ERR_HDF5, "%s: cannot create a property list", path);
        free(w->tmp);
        w->tmp = NULL;
        writer_free(w);
        return st;
    }
    w->file = H5Fcreate(w->tmp, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (w->file < 0) {
        st = h5_fail(MOECAL_ERR_IO, "%s: cannot create the activation file", w->tmp);
        free(w->tmp);
        w->tmp = NULL;
        writer_free(w);
        return st;
    }
    if ((st = write_str_attr(w->tmp, w->file, "format", ACT_FORMAT)) != MOECAL_OK ||
        (st = write_i64_attr(w->tmp, w->file, "format_version", ACT_FORMAT_VERSION)) !=
            MOECAL_OK ||
        (st = write_i64_attr(w->tmp, w->file, "tokens", tokens)) != MOECAL_OK ||
        (st = write_i64_attr(w->tmp, w->file, "hidden_size", hidden)) != MOECAL_OK ||
        (st = write_str_attr(w->tmp, w->file, "dtype", dtype_word(dtype))) != MOECAL_OK)
        goto fail;
    if ((lg = H5Gcreate2(w->file, "layers", H5P_DEFAULT, w->gcpl, H5P_DEFAULT)) < 0) {
        st = h5_fail(MOECAL_ERR_IO, "%s: cannot create group /layers", w->tmp);
        goto fail;
    }
    moecal_h5_close(&lg);
    for (int i = 0; i < n_layers; i++)
        if ((st = create_layer(w, i)) != MOECAL_OK)
            goto fail;
    *out = w;
    return MOECAL_OK;
fail:
    moecal_h5_close(&lg);
    moecal_act_writer_abort(w);
    return st;
}

int64_t moecal_act_writer_chunk_rows(const moecal_act_writer *w)
{
    return w->chunk_rows;
}

moecal_status moecal_act_writer_attr(moecal_act_writer *w, const char *name, const char *value)
{
    if (!w || !name || !value)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_act_writer_attr: null argument");
    if (strcmp(name, "format") == 0 || strcmp(name, "format_version") == 0)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: attribute '%s' is the writer's",
                                w->path, name);
    return write_str_attr(w->tmp, w->file, name, value);
}

static moecal_status write_rows(moecal_act_writer *w, int li, int64_t row0, int64_t nrows,
                                hid_t mt, const void *src)
{
    hid_t fs = -1, ms = -1;
    hsize_t start[2] = {(hsize_t)row0, 0}, count[2] = {(hsize_t)nrows, (hsize_t)w->H};
    moecal_status st = MOECAL_OK;

    if ((fs = H5Dget_space(w->dsets[li])) < 0 ||
        H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL) < 0 ||
        (ms = H5Screate_simple(2, count, NULL)) < 0 ||
        H5Dwrite(w->dsets[li], mt, ms, fs, H5P_DEFAULT, src) < 0)
        st = h5_fail(MOECAL_ERR_IO, "%s: cannot write rows [%lld, %lld) of dataset "
                     "/layers/%d/hidden", w->tmp, (ll)row0, (ll)(row0 + nrows), w->layers[li]);
    moecal_h5_close(&ms);
    moecal_h5_close(&fs);
    return st;
}

moecal_status moecal_act_write_float(moecal_act_writer *w, int layer, int64_t row0,
                                     int64_t nrows, const float *src)
{
    int li = -1;
    int64_t step;

    if (!w || (!src && nrows > 0))
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_act_write_float: null argument");
    for (int i = 0; i < w->n_layers; i++)
        if (w->layers[i] == layer)
            li = i;
    if (li < 0)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: layer %d was not declared", w->path,
                                layer);
    if (row0 < 0 || nrows < 0 || row0 > w->T || nrows > w->T - row0)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: rows [%lld, %lld) written to "
                                "/layers/%d/hidden of %lld rows", w->path, (ll)row0,
                                (ll)(row0 + nrows), layer, (ll)w->T);
    if (nrows == 0)
        return MOECAL_OK;
    if (w->dtype == MOECAL_DT_F32)
        return write_rows(w, li, row0, nrows, H5T_NATIVE_FLOAT, src);
    /* 16-bit: round here (nearest even), then HDF5 stores the bits as given. */
    step = (int64_t)(SCRATCH_BYTES / (2 * (size_t)w->H));
    if (step < 1)
        step = 1;
    if (step > nrows)
        step = nrows;
    if (w->scratch_n < (size_t)step * (size_t)w->H) {
        uint16_t *p = realloc(w->scratch, (size_t)step * (size_t)w->H * sizeof *p);
        if (!p)
            return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", w->path);
        w->scratch = p;
        w->scratch_n = (size_t)step * (size_t)w->H;
    }
    for (int64_t r = 0; r < nrows; r += step) {
        int64_t n = nrows - r < step ? nrows - r : step;
        size_t cnt = (size_t)n * (size_t)w->H;
        const float *in = src + (size_t)r * (size_t)w->H;
        uint16_t *o = w->scratch;
        if (w->dtype == MOECAL_DT_BF16) {
#pragma omp parallel for schedule(static) if (cnt > (1u << 18))
            for (size_t i = 0; i < cnt; i++)
                o[i] = moecal_float_to_bf16(in[i]);
        } else {
#pragma omp parallel for schedule(static) if (cnt > (1u << 18))
            for (size_t i = 0; i < cnt; i++)
                o[i] = moecal_float_to_f16(in[i]);
        }
        MOECAL_TRY(write_rows(w, li, row0 + r, n, w->mtype, o));
    }
    return MOECAL_OK;
}

moecal_status moecal_act_writer_close(moecal_act_writer *w)
{
    moecal_status st = MOECAL_OK;
    int fd;

    if (!w)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_act_writer_close: no writer");
    h5_quiet();
    for (int i = 0; i < w->n_layers; i++) {
        if (w->dsets[i] >= 0 && H5Dclose(w->dsets[i]) < 0 && st == MOECAL_OK)
            st = h5_fail(MOECAL_ERR_IO, "%s: cannot close dataset /layers/%d/hidden", w->tmp,
                         w->layers[i]);
        w->dsets[i] = -1;
    }
    if (st == MOECAL_OK && H5Fflush(w->file, H5F_SCOPE_GLOBAL) < 0)
        st = h5_fail(MOECAL_ERR_IO, "%s: cannot flush", w->tmp);
    if (st == MOECAL_OK && H5Fclose(w->file) < 0)
        st = h5_fail(MOECAL_ERR_IO, "%s: cannot close", w->tmp);
    w->file = -1;
    if (st == MOECAL_OK) {
        /* On disk before the name says the file is complete. */
        fd = open(w->tmp, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || fsync(fd) != 0)
            st = moecal_error_errno(errno, "%s: cannot sync", w->tmp);
        if (fd >= 0)
            close(fd);
    }
    if (st == MOECAL_OK && rename(w->tmp, w->path) != 0)
        st = moecal_error_errno(errno, "%s: cannot rename %s to it", w->path, w->tmp);
    if (st != MOECAL_OK) {
        moecal_act_writer_abort(w);
        return st;
    }
    writer_free(w);
    return MOECAL_OK;
}
