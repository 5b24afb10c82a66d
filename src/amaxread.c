/* amaxread.c - read and validate a finished amax.h5 (serial HDF5); see amaxread.h. */
#include "config.h"
#include "h5util.h"
#include "util.h"

#include <errno.h>
#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "amaxfile.h"
#include "amaxread.h"

/* Sanity bounds on what a file may declare, so that a damaged header cannot
 * make us allocate absurd amounts before the reads fail. */
#define MAX_EXPERTS (1 << 20)
#define MAX_LAYERS (1 << 20)
#define MAX_CHUNKS (1LL << 31)

/* ---------------------------------------------------------------- attributes */

/* A string attribute, fixed-length or variable-length (h5py writes the
 * latter).  required == 0: an absent attribute leaves buf empty. */
static moecal_status attr_str(hid_t f, const char *path, const char *name, int required,
                              char *buf, size_t len)
{
    return moecal_h5_attr_str(f, path, name, required != 0, buf, len, NULL);
}

/* An integer attribute; required == 0: absent gives *v = dflt. */
static moecal_status attr_int(hid_t f, const char *path, const char *name, int required,
                              int64_t dflt, int64_t *v)
{
    *v = dflt;
    return moecal_h5_attr_int(f, path, name, required != 0, v, NULL);
}

/* ---------------------------------------------------------------- datasets */

static const char *class_name(H5T_class_t c)
{
    switch (c) {
    case H5T_INTEGER: return "integer";
    case H5T_FLOAT: return "floating-point";
    case H5T_STRING: return "string";
    default: return "other";
    }
}

static void shape_str(int nd, const hsize_t *dims, char *buf, size_t len)
{
    size_t n = 0;

    n += (size_t)snprintf(buf + n, len - n, "[");
    for (int i = 0; i < nd && n < len; i++)
        n += (size_t)snprintf(buf + n, len - n, "%s%llu", i ? ", " : "",
                              (unsigned long long)dims[i]);
    if (n < len)
        snprintf(buf + n, len - n, "]");
}

/* Open dataset name, check its type class and rank, return its extent in
 * dims.  want != NULL: the extent must equal want (shape_desc explains it). */
static moecal_status dset_open(hid_t f, const char *path, const char *name, H5T_class_t cls,
                               int nd, const hsize_t *want, const char *shape_desc,
                               hsize_t *dims, hid_t *out)
{
    hid_t d, t, sp;
    htri_t ex = H5Lexists(f, name, H5P_DEFAULT);
    H5T_class_t got;
    int rank;
    moecal_status s = MOECAL_OK;

    *out = -1;
    if (ex <= 0)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset '%s' missing", path, name);
    /* Open as an object first: a group or a dangling link of that name is
     * a format error, not an HDF5 failure. */
    d = H5Oopen(f, name, H5P_DEFAULT);
    if (d < 0)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset '%s' cannot be opened "
                                "(dangling link or damaged file?)", path, name);
    if (H5Iget_type(d) != H5I_DATASET) {
        H5Oclose(d);
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: '%s' is not a dataset", path, name);
    }
    t = H5Dget_type(d);
    got = t >= 0 ? H5Tget_class(t) : H5T_NO_CLASS;
    if (t >= 0)
        H5Tclose(t);
    if (got != cls) {
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset '%s' holds %s values, expected %s",
                             path, name, class_name(got), class_name(cls));
        goto fail;
    }
    sp = H5Dget_space(d);
    rank = sp >= 0 ? H5Sget_simple_extent_ndims(sp) : -1;
    if (rank != nd) {
        if (sp >= 0)
            H5Sclose(sp);
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset '%s' has %d dimensions, expected "
                             "%d (%s)", path, name, rank, nd, shape_desc);
        goto fail;
    }
    H5Sget_simple_extent_dims(sp, dims, NULL);
    H5Sclose(sp);
    if (want) {
        for (int i = 0; i < nd; i++) {
            if (dims[i] != want[i]) {
                char g[96], w[96];

                shape_str(nd, dims, g, sizeof g);
                shape_str(nd, want, w, sizeof w);
                s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset '%s' has shape %s, "
                                     "expected %s (%s)", path, name, g, w, shape_desc);
                goto fail;
            }
        }
    }
    *out = d;
    return MOECAL_OK;
fail:
    H5Dclose(d);
    return s;
}

/* Allocate n elements of size el for dataset name; NOMEM names it. */
static moecal_status alloc_for(const char *path, const char *name, size_t n, size_t el,
                               void **out)
{
    size_t bytes;

    *out = NULL;
    if (__builtin_mul_overflow(n, el, &bytes))
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset '%s' is too large", path, name);
    *out = malloc(bytes ? bytes : 1);
    if (!*out)
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory reading dataset '%s' "
                                "(%zu bytes)", path, name, bytes);
    return MOECAL_OK;
}

/* Read the whole dataset (extent exactly want) into a new buffer. */
static moecal_status dset_read(hid_t f, const char *path, const char *name, H5T_class_t cls,
                               hid_t mtype, int nd, const hsize_t *want, const char *shape_desc,
                               void **out)
{
    hsize_t dims[4];
    size_t n = 1;
    hid_t d;
    moecal_status s;

    *out = NULL;
    for (int i = 0; i < nd; i++)
        if (__builtin_mul_overflow(n, (size_t)want[i], &n))
            return moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset '%s' is too large", path,
                                    name);
    MOECAL_TRY(dset_open(f, path, name, cls, nd, want, shape_desc, dims, &d));
    s = alloc_for(path, name, n, H5Tget_size(mtype), out);
    if (s == MOECAL_OK && n > 0 && H5Dread(d, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, *out) < 0)
        s = moecal_h5_fail(path, "reading dataset '%s'", name);
    H5Dclose(d);
    if (s != MOECAL_OK) {
        free(*out);
        *out = NULL;
    }
    return s;
}

/* The extent of a 1-D dataset. */
static moecal_status dset_len(hid_t f, const char *path, const char *name, H5T_class_t cls,
                              const char *shape_desc, hsize_t *len)
{
    hid_t d;

    MOECAL_TRY(dset_open(f, path, name, cls, 1, NULL, shape_desc, len, &d));
    H5Dclose(d);
    return MOECAL_OK;
}

/* projections must be the strings w1, w2, w3 in this order. */
static moecal_status check_projections(hid_t f, const char *path)
{
    static const char *const want[3] = {"w1", "w2", "w3"};
    static const hsize_t three = 3;
    hsize_t dims[1];
    hid_t d, t, mt = -1, sp = -1;
    char fixed[3][16], *vl[3] = {NULL, NULL, NULL};
    int is_vl;
    moecal_status s = MOECAL_OK;

    MOECAL_TRY(dset_open(f, path, "projections", H5T_STRING, 1, &three,
                         "the strings w1, w2, w3", dims, &d));
    t = H5Dget_type(d);
    is_vl = t >= 0 && H5Tis_variable_str(t) > 0;
    mt = H5Tcopy(H5T_C_S1);
    if (is_vl) {
        H5Tset_size(mt, H5T_VARIABLE);
        if (H5Dread(d, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, vl) < 0)
            s = moecal_h5_fail(path, "reading dataset 'projections'");
    } else if (t < 0 || H5Tget_size(t) >= sizeof fixed[0]) {
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset 'projections' holds strings "
                             "longer than expected (w1, w2, w3)", path);
    } else {
        H5Tset_size(mt, sizeof fixed[0]);
        H5Tset_strpad(mt, H5T_STR_NULLTERM);
        memset(fixed, 0, sizeof fixed);
        if (H5Dread(d, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, fixed) < 0)
            s = moecal_h5_fail(path, "reading dataset 'projections'");
    }
    for (int p = 0; p < 3 && s == MOECAL_OK; p++) {
        const char *got = is_vl ? (vl[p] ? vl[p] : "") : fixed[p];
        if (strcmp(got, want[p]) != 0)
            s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset 'projections' element %d is "
                                 "'%.15s', expected '%s' (order w1, w2, w3)", path, p, got,
                                 want[p]);
    }
    if (is_vl) {
        sp = H5Dget_space(d);
        if (sp >= 0) {
            H5Dvlen_reclaim(mt, sp, H5P_DEFAULT, vl);
            H5Sclose(sp);
        }
    }
    moecal_h5_close(&mt);
    moecal_h5_close(&t);
    H5Dclose(d);
    return s;
}

/* ---------------------------------------------------------------- values */

static moecal_status check_amax_values(const char *path, const char *name, const float *v,
                                       size_t n, int nd, const hsize_t *dims)
{
    for (size_t i = 0; i < n; i++) {
        if (!(v[i] >= 0.0f) || isinf(v[i])) {
            char at[96];
            size_t r = i, idx[4] = {0, 0, 0, 0}, k = 0;

            for (int j = nd - 1; j >= 0; j--) {
                idx[j] = r % (size_t)dims[j];
                r /= (size_t)dims[j];
            }
            k += (size_t)snprintf(at + k, sizeof at - k, "[");
            for (int j = 0; j < nd && k < sizeof at; j++)
                k += (size_t)snprintf(at + k, sizeof at - k, "%s%zu", j ? ", " : "", idx[j]);
            if (k < sizeof at)
                snprintf(at + k, sizeof at - k, "]");
            return moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset '%s' holds %g at %s "
                                    "(an amax must be finite and >= 0)", path, name,
                                    (double)v[i], at);
        }
    }
    return MOECAL_OK;
}

static moecal_status check_nonneg(const char *path, const char *name, const int64_t *v,
                                  size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (v[i] < 0)
            return moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset '%s' holds a negative "
                                    "count (%lld at element %zu)", path, name,
                                    (long long)v[i], i);
    return MOECAL_OK;
}

/* ---------------------------------------------------------------- reader */

void moecal_amax_data_free(moecal_amax_data *d)
{
    if (!d)
        return;
    free(d->path);
    free(d->layers);
    free(d->chunk_start);
    free(d->chunk_count);
    free(d->input_amax);
    free(d->input_amax_calibrated);
    free(d->weight_amax);
    free(d->tokens_per_expert);
    free(d->history);
    free(d);
}

static moecal_status read_all(hid_t f, const char *path, unsigned what, moecal_amax_data *d)
{
    char fmt[64];
    int64_t version, next;
    hsize_t L, C, E;
    int *layers32 = NULL;
    size_t n3;

    MOECAL_TRY(attr_str(f, path, "format", 1, fmt, sizeof fmt));
    if (strcmp(fmt, MOECAL_AMAX_FORMAT) != 0)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: root attribute 'format' is '%s', not "
                                "'%s' (not an amax file)", path, fmt, MOECAL_AMAX_FORMAT);
    MOECAL_TRY(attr_int(f, path, "format_version", 1, 0, &version));
    if (version != MOECAL_AMAX_FORMAT_VERSION)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: format_version %lld is not supported "
                                "(this moecal reads version %d)", path, (long long)version,
                                MOECAL_AMAX_FORMAT_VERSION);
    MOECAL_TRY(attr_int(f, path, "checkpoint_next_step", 0, -1, &next));
    if (next >= 0)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s is a checkpoint of an unfinished run, "
                                "not a result (resume the run with --resume)", path);
    MOECAL_TRY(attr_str(f, path, "model_type", 1, d->model_type, sizeof d->model_type));
    MOECAL_TRY(attr_str(f, path, "mode", 1, d->mode, sizeof d->mode));
    MOECAL_TRY(attr_str(f, path, "sync", 0, d->sync, sizeof d->sync));
    MOECAL_TRY(attr_str(f, path, "router_logits", 0, d->router_logits,
                        sizeof d->router_logits));
    MOECAL_TRY(attr_str(f, path, "checkpoint_fingerprint", 0, d->checkpoint_fingerprint,
                        sizeof d->checkpoint_fingerprint));
    MOECAL_TRY(attr_str(f, path, "quant_format", 0, d->quant_format, sizeof d->quant_format));
    MOECAL_TRY(attr_str(f, path, "created", 0, d->created, sizeof d->created));
    MOECAL_TRY(attr_str(f, path, "moecal_version", 0, d->moecal_version,
                        sizeof d->moecal_version));
    MOECAL_TRY(attr_int(f, path, "hidden_size", 1, 0, &d->hidden_size));
    MOECAL_TRY(attr_int(f, path, "n_routed_experts", 1, 0, &d->n_routed_experts));
    MOECAL_TRY(attr_int(f, path, "num_experts_per_tok", 0, -1, &d->num_experts_per_tok));
    MOECAL_TRY(attr_int(f, path, "tokens", 0, -1, &d->tokens));
    if (strcmp(d->mode, "topk") != 0 && strcmp(d->mode, "all_experts") != 0)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: root attribute 'mode' is '%s' "
                                "(expected topk or all_experts)", path, d->mode);
    if (d->n_routed_experts < 1 || d->n_routed_experts > MAX_EXPERTS)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: root attribute 'n_routed_experts' is "
                                "%lld (expected 1 to %d)", path,
                                (long long)d->n_routed_experts, MAX_EXPERTS);
    if (d->hidden_size < 1)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: root attribute 'hidden_size' is %lld",
                                path, (long long)d->hidden_size);

    MOECAL_TRY(dset_len(f, path, "layers", H5T_INTEGER, "one model layer index per MoE layer",
                        &L));
    MOECAL_TRY(dset_len(f, path, "chunk_token_start", H5T_INTEGER, "one entry per chunk", &C));
    if (L < 1 || L > MAX_LAYERS)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset 'layers' has %llu entries "
                                "(expected 1 to %d)", path, (unsigned long long)L, MAX_LAYERS);
    if (C < 1 || C > (hsize_t)MAX_CHUNKS)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset 'chunk_token_start' has %llu "
                                "entries (expected at least one chunk)", path,
                                (unsigned long long)C);
    E = (hsize_t)d->n_routed_experts;
    d->L = (int)L;
    d->E = (int)E;
    d->C = (int)C;

    MOECAL_TRY(check_projections(f, path));
    MOECAL_TRY(dset_read(f, path, "layers", H5T_INTEGER, H5T_NATIVE_INT, 1, &L,
                         "one model layer index per MoE layer", (void **)&layers32));
    d->layers = layers32;
    for (int l = 0; l < d->L; l++)
        if (d->layers[l] < 0 || (l > 0 && d->layers[l] <= d->layers[l - 1]))
            return moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset 'layers' is not a strictly "
                                    "ascending list of layer indices (element %d is %d)", path,
                                    l, d->layers[l]);
    MOECAL_TRY(dset_read(f, path, "chunk_token_start", H5T_INTEGER, H5T_NATIVE_INT64, 1, &C,
                         "one entry per chunk", (void **)&d->chunk_start));
    MOECAL_TRY(dset_read(f, path, "chunk_token_count", H5T_INTEGER, H5T_NATIVE_INT64, 1, &C,
                         "one entry per chunk, as chunk_token_start", (void **)&d->chunk_count));
    MOECAL_TRY(check_nonneg(path, "chunk_token_start", d->chunk_start, (size_t)C));
    MOECAL_TRY(check_nonneg(path, "chunk_token_count", d->chunk_count, (size_t)C));

    {
        hsize_t dim3[3] = {L, E, 3};
        static const char *const desc3 = "layers x n_routed_experts x 3 projections";
        static const char *const names[3] = {"input_amax", "input_amax_calibrated",
                                             "weight_amax"};
        float **dst[3] = {&d->input_amax, &d->input_amax_calibrated, &d->weight_amax};

        n3 = (size_t)L * (size_t)E * 3;
        for (int i = 0; i < 3; i++) {
            MOECAL_TRY(dset_read(f, path, names[i], H5T_FLOAT, H5T_NATIVE_FLOAT, 3, dim3, desc3,
                                 (void **)dst[i]));
            MOECAL_TRY(check_amax_values(path, names[i], *dst[i], n3, 3, dim3));
        }
    }
    if (what & MOECAL_AMAXREAD_TOKENS) {
        hsize_t dimt[3] = {L, C, E};
        size_t n = (size_t)L * (size_t)C * (size_t)E;

        MOECAL_TRY(dset_read(f, path, "tokens_per_expert", H5T_INTEGER, H5T_NATIVE_INT64, 3, dimt,
                             "layers x chunks x n_routed_experts",
                             (void **)&d->tokens_per_expert));
        MOECAL_TRY(check_nonneg(path, "tokens_per_expert", d->tokens_per_expert, n));
    }
    if (what & MOECAL_AMAXREAD_HISTORY) {
        hsize_t dim4[4] = {L, C, E, 3};
        size_t n;

        if (__builtin_mul_overflow(n3, (size_t)C, &n))
            return moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset 'input_amax_history' is "
                                    "too large", path);
        MOECAL_TRY(dset_read(f, path, "input_amax_history", H5T_FLOAT, H5T_NATIVE_FLOAT, 4, dim4,
                             "layers x chunks x n_routed_experts x 3 projections",
                             (void **)&d->history));
        MOECAL_TRY(check_amax_values(path, "input_amax_history", d->history, n, 4, dim4));
    }
    return MOECAL_OK;
}

moecal_status moecal_amax_data_read(const char *path, unsigned what, moecal_amax_data **out)
{
    moecal_amax_data *d;
    H5E_auto2_t old_func = NULL;
    void *old_data = NULL;
    hid_t f;
    htri_t is;
    moecal_status s;

    *out = NULL;
    if (access(path, R_OK) != 0)
        return moecal_error_errno(errno, "%s: cannot open", path);
    d = calloc(1, sizeof *d);
    if (!d || !(d->path = strdup(path))) {
        free(d);
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", path);
    }
    /* HDF5's own error stack printing is off while we read: every failure
     * becomes one message that names the file and the dataset. */
    H5Eget_auto2(H5E_DEFAULT, &old_func, &old_data);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    if ((s = moecal_check_regular(path, "the amax file")) != MOECAL_OK)
        goto out;
    is = H5Fis_hdf5(path);
    if (is <= 0) {
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: not an HDF5 file", path);
        goto out;
    }
    f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0) {
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: HDF5 cannot open it (damaged file?)", path);
        goto out;
    }
    s = read_all(f, path, what, d);
    if (H5Fclose(f) < 0 && s == MOECAL_OK)
        s = moecal_error_set(MOECAL_ERR_HDF5, "%s: closing the file failed", path);
out:
    H5Eset_auto2(H5E_DEFAULT, old_func, old_data);
    if (s != MOECAL_OK) {
        moecal_amax_data_free(d);
        return s;
    }
    *out = d;
    return MOECAL_OK;
}

void moecal_amax_layers_str(const int *layers, int n, char *buf, size_t len)
{
    size_t k = 0;
    int i = 0;

    if (len == 0)
        return;
    buf[0] = '\0';
    while (i < n) {
        int j = i;
        int w;

        while (j + 1 < n && layers[j + 1] == layers[j] + 1)
            j++;
        if (j == i + 1)   /* two in a row: "1,2", not "1-2" */
            j = i;
        if (j == i)
            w = snprintf(buf + k, len - k, "%s%d", i ? "," : "", layers[i]);
        else
            w = snprintf(buf + k, len - k, "%s%d-%d", i ? "," : "", layers[i], layers[j]);
        if (w < 0 || (size_t)w >= len - k) {
            /* Cut: end with "..." when there is room. */
            if (len >= 4)
                memcpy(buf + len - 4, "...", 4);
            return;
        }
        k += (size_t)w;
        i = j + 1;
    }
}
