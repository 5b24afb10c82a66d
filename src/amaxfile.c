/* amaxfile.c - write amax.h5 with parallel HDF5, and the files beside it. */
#include "config.h"
#include "h5util.h"
#include "util.h"

#include <errno.h>
#include <hdf5.h>
#include <hdf5_hl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "amaxfile.h"
#include "router.h"
#include "safetensors.h"

float moecal_amax_scale(moecal_qfmt f, float amax)
{
    return f == MOECAL_QFMT_NVFP4 ? amax / (6.0f * 448.0f) : amax / 448.0f;
}

const char *moecal_qfmt_name(moecal_qfmt f)
{
    return f == MOECAL_QFMT_NVFP4 ? "nvfp4" : "fp8";
}

/* ---------------------------------------------------------------- HDF5 helpers */

typedef struct h5w {
    hid_t file, dxpl;
    const char *path;
    MPI_Comm comm;
    moecal_status status;
} h5w;

/* The directory that holds path ("." for a bare name, "/" for a name in
 * the root). */
static void parent_dir(const char *path, char *dir, size_t n)
{
    const char *slash = strrchr(path, '/');

    if (slash)
        snprintf(dir, n, "%.*s", (int)(slash - path), path);
    else
        snprintf(dir, n, ".");
    if (dir[0] == '\0')
        snprintf(dir, n, "/");
}

/* A full file system shows up in MPI-IO without errno: look at the space
 * left where the file lives. */
static int disk_full(const char *path)
{
    char dir[4096];
    struct statvfs v;

    parent_dir(path, dir, sizeof dir);
    return statvfs(dir, &v) == 0 && (unsigned long long)v.f_bavail * v.f_bsize < 256 * 1024;
}

static moecal_status h5fail(h5w *w, const char *what)
{
    int e = errno;
    if (w->status == MOECAL_OK) {
        if (e == ENOSPC || e == EDQUOT || disk_full(w->path))
            w->status = moecal_error_errno(e == EDQUOT ? EDQUOT : ENOSPC,
                                           "%s: HDF5 could not %s", w->path, what);
        else if (e == EIO)
            w->status = moecal_error_errno(e, "%s: HDF5 could not %s", w->path, what);
        else
            w->status = moecal_error_set(MOECAL_ERR_HDF5, "%s: HDF5 could not %s", w->path, what);
    }
    return w->status;
}

/* Every rank must make the same sequence of collective HDF5 calls: after each
 * step the ranks agree on whether all succeeded, and all stop together. */
static void agree(h5w *w)
{
    int ok = w->status == MOECAL_OK, all = 0;

    if (MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, w->comm) != MPI_SUCCESS)
        all = 0;
    if (!all && w->status == MOECAL_OK)
        w->status = disk_full(w->path)
                        ? moecal_error_errno(ENOSPC, "%s: another rank could not write", w->path)
                        : moecal_error_set(MOECAL_ERR_PEER, "%s: another rank could not write",
                                           w->path);
}

static void attr_str(h5w *w, hid_t obj, const char *name, const char *val)
{
    hid_t t, sp, a;

    if (w->status != MOECAL_OK)
        return;
    t = H5Tcopy(H5T_C_S1);
    H5Tset_size(t, strlen(val) > 0 ? strlen(val) : 1);
    H5Tset_strpad(t, H5T_STR_NULLTERM);
    sp = H5Screate(H5S_SCALAR);
    a = H5Acreate2(obj, name, t, sp, H5P_DEFAULT, H5P_DEFAULT);
    if (a < 0 || H5Awrite(a, t, strlen(val) > 0 ? val : "") < 0)
        h5fail(w, "write a string attribute");
    if (a >= 0)
        H5Aclose(a);
    H5Sclose(sp);
    H5Tclose(t);
}

static void attr_num(h5w *w, hid_t obj, const char *name, hid_t type, const void *val)
{
    hid_t sp, a;

    if (w->status != MOECAL_OK)
        return;
    sp = H5Screate(H5S_SCALAR);
    a = H5Acreate2(obj, name, type, sp, H5P_DEFAULT, H5P_DEFAULT);
    if (a < 0 || H5Awrite(a, type, val) < 0)
        h5fail(w, "write a numeric attribute");
    if (a >= 0)
        H5Aclose(a);
    H5Sclose(sp);
}

static void attr_int(h5w *w, hid_t obj, const char *name, long long v)
{
    int64_t x = v;
    attr_num(w, obj, name, H5T_NATIVE_INT64, &x);
}

static void attr_dbl(h5w *w, hid_t obj, const char *name, double v)
{
    attr_num(w, obj, name, H5T_NATIVE_DOUBLE, &v);
}

/* Create dataset name of rank nd (dims) and write the block starting at
 * start with extent count from buf (count NULL: write nothing from this rank). */
static hid_t dset_write(h5w *w, const char *name, hid_t ftype, hid_t mtype, int nd,
                        const hsize_t *dims, const hsize_t *start, const hsize_t *count,
                        const void *buf, const char *desc)
{
    hid_t sp, d, ms, fs;
    hsize_t one = 1;
    int empty = count == NULL;

    if (w->status != MOECAL_OK)
        return -1;
    for (int i = 0; !empty && i < nd; i++)
        empty = count[i] == 0;
    sp = H5Screate_simple(nd, dims, NULL);
    d = H5Dcreate2(w->file, name, ftype, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Sclose(sp);
    if (d < 0) {
        h5fail(w, "create a dataset");
        agree(w);
        return -1;
    }
    fs = H5Dget_space(d);
    if (empty) {
        H5Sselect_none(fs);
        ms = H5Screate_simple(1, &one, NULL);
        H5Sselect_none(ms);
    } else {
        H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL);
        ms = H5Screate_simple(nd, count, NULL);
    }
    /* Collective even for ranks with nothing to write. */
    if (H5Dwrite(d, mtype, ms, fs, w->dxpl, empty ? NULL : buf) < 0)
        h5fail(w, "write a dataset");
    H5Sclose(ms);
    H5Sclose(fs);
    if (desc)
        attr_str(w, d, "description", desc);
    agree(w);
    return d;
}

static void scale(h5w *w, hid_t d, const char *label)
{
    if (w->status == MOECAL_OK && d >= 0 && H5DSset_scale(d, label) < 0)
        h5fail(w, "make a dimension scale");
}

static void attach(h5w *w, hid_t d, hid_t s, unsigned idx)
{
    if (w->status == MOECAL_OK && d >= 0 && s >= 0 && H5DSattach_scale(d, s, idx) < 0)
        h5fail(w, "attach a dimension scale");
}

static void close_d(hid_t *d)
{
    if (*d >= 0)
        H5Dclose(*d);
    *d = -1;
}

/* Bytes the file will take: its datasets plus room for metadata. */
static unsigned long long size_estimate(const moecal_amax_meta *m)
{
    unsigned long long LE3 = (unsigned long long)m->L * (unsigned long long)m->E * 3;
    unsigned long long C = (unsigned long long)m->C;
    return (LE3 * 4 * 5 + LE3 * C * 4 + LE3 / 3 * C * 8 + C * 16 + (unsigned long long)m->E * 4 +
           strlen(m->placement_json) + strlen(m->command_line)) * 5 / 4 + 48 * 1024;
}

/* Collective: refuse before any HDF5 call when the file system lacks room.
 * A collective write that runs out of space half way can leave the ranks in
 * different MPI-IO calls (a hang), so it must not start. */
static moecal_status check_space(MPI_Comm comm, const char *path, const moecal_amax_meta *m)
{
    char dir[4096];
    struct statvfs v;
    unsigned long long need = size_estimate(m), have = 0;
    int rank, ok = 1;

    MPI_Comm_rank(comm, &rank);
    if (rank == 0) {
        parent_dir(path, dir, sizeof dir);
        if (statvfs(dir, &v) == 0) {
            have = (unsigned long long)v.f_bavail * v.f_bsize;
            ok = have >= need;
        }
    }
    MPI_Bcast(&ok, 1, MPI_INT, 0, comm);
    if (ok)
        return MOECAL_OK;
    if (rank != 0)
        return moecal_error_peer(0, MOECAL_EXIT_OUTPUT);
    return moecal_error_errno(ENOSPC, "%s: needs about %llu KiB but the file system has %llu KiB "
                              "free", path, need / 1024, have / 1024);
}

/* Root attributes: identical values on every rank (collective). */
static void root_attrs(h5w *w, const moecal_amax_meta *m)
{
    const moecal_model_config *cfg = m->cfg;

    attr_str(w, w->file, "format", MOECAL_AMAX_FORMAT);
    attr_int(w, w->file, "format_version", MOECAL_AMAX_FORMAT_VERSION);
    attr_str(w, w->file, "moecal_version", PACKAGE_VERSION);
    attr_str(w, w->file, "created", m->created);
    attr_str(w, w->file, "command_line", m->command_line);
    attr_str(w, w->file, "mode", m->all_experts ? "all_experts" : "topk");
    attr_str(w, w->file, "sync", m->all_experts ? "none" : "peer_max");
    attr_str(w, w->file, "router_logits",
             m->all_experts ? "none" : moecal_router_logits_name(m->router_logits));
    attr_str(w, w->file, "quant_format", moecal_qfmt_name(m->qfmt));
    attr_str(w, w->file, "model_path", m->model_path);
    attr_str(w, w->file, "model_type", cfg->model_type);
    if (m->checkpoint_fingerprint)
        attr_str(w, w->file, "checkpoint_fingerprint", m->checkpoint_fingerprint);
    attr_str(w, w->file, "activations_path", m->activations_path);
    attr_int(w, w->file, "n_ranks", m->n_ranks);
    attr_int(w, w->file, "n_nodes", m->n_nodes);
    attr_str(w, w->file, "placement", m->placement_json);
    if (m->backend) {
        attr_str(w, w->file, "backend", m->backend);
        attr_str(w, w->file, "backend_settings", m->backend_settings ? m->backend_settings : "");
    }
    attr_int(w, w->file, "tokens", m->tokens);
    attr_int(w, w->file, "chunk_tokens", m->chunk_tokens);
    attr_int(w, w->file, "hidden_size", cfg->hidden_size);
    attr_int(w, w->file, "moe_intermediate_size", cfg->moe_intermediate_size);
    attr_int(w, w->file, "num_hidden_layers", cfg->num_hidden_layers);
    attr_int(w, w->file, "n_routed_experts", cfg->n_routed_experts);
    attr_int(w, w->file, "num_experts_per_tok", cfg->num_experts_per_tok);
    attr_int(w, w->file, "n_group", cfg->n_group);
    attr_int(w, w->file, "topk_group", cfg->topk_group);
    attr_dbl(w, w->file, "routed_scaling_factor", cfg->routed_scaling_factor);
    attr_int(w, w->file, "norm_topk_prob", cfg->norm_topk_prob);
    attr_str(w, w->file, "scoring_func",
             cfg->scoring == MOECAL_SCORING_SIGMOID ? "sigmoid" : "softmax");
    attr_str(w, w->file, "topk_method", cfg->topk_method);
    attr_int(w, w->file, "first_k_dense_replace", cfg->first_k_dense_replace);
    {
        char hash[32];
        snprintf(hash, sizeof hash, "%016llx", (unsigned long long)m->input_hash);
        attr_str(w, w->file, "input_hash", hash);
    }
    if (m->checkpoint)
        attr_int(w, w->file, "checkpoint_next_step", m->next_step);
}

moecal_status moecal_amax_write_h5(MPI_Comm comm, const char *path, const moecal_amax_meta *m,
                                   const moecal_amax_slab *s)
{
    h5w w = {.file = -1, .dxpl = -1, .path = path, .comm = comm, .status = MOECAL_OK};
    hid_t fapl, d_layers = -1, d_proj = -1, d_exp = -1, d_chunk = -1, d_cnt = -1;
    hid_t d[8] = {-1, -1, -1, -1, -1, -1, -1, -1};
    int rank, n = s->e1 - s->e0;
    size_t nslab = (size_t)m->L * (size_t)n * 3;
    float *in_scale = NULL, *w_scale = NULL;
    char proj[3][3] = {"w1", "w2", "w3"};
    hid_t strt;
    int *experts = NULL;

    MPI_Comm_rank(comm, &rank);
    MOECAL_TRY(check_space(comm, path, m));
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_fapl_mpio(fapl, comm, MPI_INFO_NULL);
#ifdef HAVE_H5PSET_ALL_COLL_METADATA_OPS
    H5Pset_all_coll_metadata_ops(fapl, 1);
#endif
#ifdef HAVE_H5PSET_COLL_METADATA_WRITE
    H5Pset_coll_metadata_write(fapl, 1);
#endif
    w.file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (w.file < 0)
        return moecal_error_set(MOECAL_ERR_IO, "%s: cannot create the output file "
                                "(directory missing or not writable?)", path);
    /* H5Fcreate is collective: it failed everywhere or nowhere. */
    w.dxpl = H5Pcreate(H5P_DATASET_XFER);
    H5Pset_dxpl_mpio(w.dxpl, H5FD_MPIO_COLLECTIVE);

    in_scale = malloc((nslab ? nslab : 1) * sizeof *in_scale);
    w_scale = malloc((nslab ? nslab : 1) * sizeof *w_scale);
    experts = malloc((size_t)(m->E ? m->E : 1) * sizeof *experts);
    if (!in_scale || !w_scale || !experts) {
        w.status = moecal_error_set(MOECAL_ERR_NOMEM, "out of memory writing %s", path);
        goto done;
    }
    for (size_t i = 0; i < nslab; i += 3) {
        float w13 = fmaxf(s->weight_amax[i], s->weight_amax[i + 2]);
        for (int p = 0; p < 3; p++)
            in_scale[i + p] = moecal_amax_scale(m->qfmt, s->input_amax[i + p]);
        /* gate and up share one weight scale: engines fuse them into one GEMM */
        w_scale[i + 0] = moecal_amax_scale(m->qfmt, w13);
        w_scale[i + 1] = moecal_amax_scale(m->qfmt, s->weight_amax[i + 1]);
        w_scale[i + 2] = w_scale[i];
    }
    for (int e = 0; e < m->E; e++)
        experts[e] = e;
    agree(&w);

    root_attrs(&w, m);
    agree(&w);

    {
        hsize_t L = (hsize_t)m->L, E = (hsize_t)m->E, C = (hsize_t)m->C, three = 3;
        hsize_t n_ = (hsize_t)n, e0 = (hsize_t)s->e0, z = 0;
        hsize_t dim3[3] = {L, E, 3}, st3[3] = {0, e0, 0}, ct3[3] = {L, n_, 3};
        hsize_t dim4[4] = {L, C, E, 3}, st4[4] = {0, 0, e0, 0}, ct4[4] = {L, C, n_, 3};
        hsize_t dimt[3] = {L, C, E}, stt[3] = {0, 0, e0}, ctt[3] = {L, C, n_};
        int root = rank == 0;

        d_layers = dset_write(&w, "layers", H5T_STD_I32LE, H5T_NATIVE_INT, 1, &L, &z,
                              root ? &L : NULL, m->layers, "model layer index of each MoE layer");
        strt = H5Tcopy(H5T_C_S1);
        H5Tset_size(strt, 3);
        d_proj = dset_write(&w, "projections", strt, strt, 1, &three, &z, root ? &three : NULL,
                            proj, "w1 = gate_proj, w2 = down_proj, w3 = up_proj");
        H5Tclose(strt);
        d_exp = dset_write(&w, "experts", H5T_STD_I32LE, H5T_NATIVE_INT, 1, &E, &z,
                           root ? &E : NULL, experts, "routed expert index");
        d_chunk = dset_write(&w, "chunk_token_start", H5T_STD_I64LE, H5T_NATIVE_INT64, 1, &C,
                             &z, root ? &C : NULL, m->chunk_start, "first token of each chunk");
        d_cnt = dset_write(&w, "chunk_token_count", H5T_STD_I64LE, H5T_NATIVE_INT64, 1, &C, &z,
                           root ? &C : NULL, m->chunk_count, "tokens in each chunk");
        scale(&w, d_layers, "layer");
        scale(&w, d_exp, "expert");
        scale(&w, d_proj, "projection");
        scale(&w, d_chunk, "chunk");
        agree(&w);

        d[0] = dset_write(&w, "input_amax", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 3, dim3, st3, ct3,
                          s->input_amax, m->all_experts ? "input amax (all-experts mode, no sync)"
                          : "input amax after the peer-max sync");
        d[1] = dset_write(&w, "input_amax_calibrated", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 3, dim3,
                          st3, ct3, s->input_amax_calibrated,
                          "per-expert input amax before sync, 0 = never routed");
        d[2] = dset_write(&w, "weight_amax", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 3, dim3, st3, ct3,
                          s->weight_amax, "per-tensor amax of the dequantized bf16 weight");
        d[3] = dset_write(&w, "input_scale", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 3, dim3, st3, ct3,
                          in_scale, "input_amax / (6*448) for nvfp4, / 448 for fp8");
        d[4] = dset_write(&w, "weight_scale_2", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 3, dim3, st3,
                          ct3, w_scale, "weight scale; w1 and w3 share max(w1, w3)");
        d[5] = dset_write(&w, "input_amax_history", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, 4, dim4,
                          st4, ct4, s->history, "input amax per chunk, 0 = no token");
        d[6] = dset_write(&w, "tokens_per_expert", H5T_STD_I64LE, H5T_NATIVE_INT64, 3, dimt, stt,
                          ctt, s->tokens, "tokens routed to each expert per chunk");
        for (int i = 0; i < 5; i++) {
            attach(&w, d[i], d_layers, 0);
            attach(&w, d[i], d_exp, 1);
            attach(&w, d[i], d_proj, 2);
        }
        attach(&w, d[5], d_layers, 0);
        attach(&w, d[5], d_chunk, 1);
        attach(&w, d[5], d_exp, 2);
        attach(&w, d[5], d_proj, 3);
        attach(&w, d[6], d_layers, 0);
        attach(&w, d[6], d_chunk, 1);
        attach(&w, d[6], d_exp, 2);
        agree(&w);
    }

done:
    for (int i = 0; i < 8; i++)
        close_d(&d[i]);
    close_d(&d_layers);
    close_d(&d_proj);
    close_d(&d_exp);
    close_d(&d_chunk);
    close_d(&d_cnt);
    if (w.dxpl >= 0)
        H5Pclose(w.dxpl);
    errno = 0;
    if (w.file >= 0 && H5Fclose(w.file) < 0 && w.status == MOECAL_OK)
        w.status = errno ? moecal_error_errno(errno, "%s: closing the output failed", path)
                         : moecal_error_set(MOECAL_ERR_IO, "%s: closing the output failed", path);
    free(in_scale);
    free(w_scale);
    free(experts);
    return w.status;
}

/* ---------------------------------------------------------------- checkpoints */

static moecal_status read_slab(hid_t f, const char *path, const char *name, hid_t mtype,
                               int nd, const hsize_t *want, const hsize_t *start,
                               const hsize_t *count, void *buf)
{
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT), fs, ms;
    hsize_t dims[4];
    moecal_status s = MOECAL_OK;
    int empty = 0;

    if (d < 0)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset '%s' missing", path, name);
    fs = H5Dget_space(d);
    if (H5Sget_simple_extent_ndims(fs) != nd) {
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: dataset '%s' has the wrong rank", path, name);
        goto out;
    }
    H5Sget_simple_extent_dims(fs, dims, NULL);
    for (int i = 0; i < nd; i++) {
        if (dims[i] != want[i]) {
            s = moecal_error_set(MOECAL_ERR_MISMATCH, "%s: dataset '%s' dimension %d is %llu, "
                                 "expected %llu", path, name, i, (unsigned long long)dims[i],
                                 (unsigned long long)want[i]);
            goto out;
        }
        empty |= count[i] == 0;
    }
    if (!empty) {
        H5Sselect_hyperslab(fs, H5S_SELECT_SET, start, NULL, count, NULL);
        ms = H5Screate_simple(nd, count, NULL);
        if (H5Dread(d, mtype, ms, fs, H5P_DEFAULT, buf) < 0)
            s = moecal_error_set(MOECAL_ERR_HDF5, "%s: cannot read '%s'", path, name);
        H5Sclose(ms);
    }
out:
    H5Sclose(fs);
    H5Dclose(d);
    return s;
}

static moecal_status read_attr_str(hid_t f, const char *path, const char *name, char *buf,
                                   size_t len)
{
    return moecal_h5_attr_str(f, path, name, true, buf, len, NULL);
}

moecal_status moecal_amax_read_checkpoint(const char *path, uint64_t input_hash,
                                          const moecal_amax_meta *m, int e0, int e1,
                                          float *amax_cal, float *weight_amax, float *history,
                                          int64_t *tokens, int64_t *next_step)
{
    hid_t f;
    char buf[64], want[32];
    moecal_status s;
    hsize_t L = (hsize_t)m->L, E = (hsize_t)m->E, C = (hsize_t)m->C, n = (hsize_t)(e1 - e0);
    hsize_t x0 = (hsize_t)e0;
    hsize_t dim3[3] = {L, E, 3}, st3[3] = {0, x0, 0}, ct3[3] = {L, n, 3};
    hsize_t dim4[4] = {L, C, E, 3}, st4[4] = {0, 0, x0, 0}, ct4[4] = {L, C, n, 3};
    hsize_t dimt[3] = {L, C, E}, stt[3] = {0, 0, x0}, ctt[3] = {L, C, n};

    MOECAL_TRY(moecal_check_regular(path, "the checkpoint"));
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: not a readable HDF5 checkpoint", path);
    s = read_attr_str(f, path, "format", buf, sizeof buf);
    if (s == MOECAL_OK && strcmp(buf, MOECAL_AMAX_FORMAT) != 0)
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: format is '%s', not a moecal checkpoint",
                             path, buf);
    if (s == MOECAL_OK)
        s = read_attr_str(f, path, "input_hash", buf, sizeof buf);
    snprintf(want, sizeof want, "%016llx", (unsigned long long)input_hash);
    if (s == MOECAL_OK && strcmp(buf, want) != 0)
        s = moecal_error_set(MOECAL_ERR_MISMATCH, "%s was made from other inputs or options "
                             "(input hash %s, this run %s): refusing to resume from it",
                             path, buf, want);
    if (s == MOECAL_OK) {
        bool here = false;
        s = moecal_h5_attr_int(f, path, "checkpoint_next_step", false, next_step, &here);
        if (s == MOECAL_OK && !here)
            s = moecal_error_set(MOECAL_ERR_FORMAT, "%s is not a checkpoint "
                                 "(no checkpoint_next_step)", path);
    }
    if (s == MOECAL_OK && (*next_step < 0 || *next_step > (int64_t)(L * C)))
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: checkpoint position %lld out of range",
                             path, (long long)*next_step);
    if (s == MOECAL_OK)
        s = read_slab(f, path, "input_amax_calibrated", H5T_NATIVE_FLOAT, 3, dim3, st3, ct3,
                      amax_cal);
    if (s == MOECAL_OK)
        s = read_slab(f, path, "weight_amax", H5T_NATIVE_FLOAT, 3, dim3, st3, ct3, weight_amax);
    if (s == MOECAL_OK)
        s = read_slab(f, path, "input_amax_history", H5T_NATIVE_FLOAT, 4, dim4, st4, ct4,
                      history);
    if (s == MOECAL_OK)
        s = read_slab(f, path, "tokens_per_expert", H5T_NATIVE_INT64, 3, dimt, stt, ctt, tokens);
    H5Fclose(f);
    return s;
}

/* ---------------------------------------------------------------- side files */

static moecal_status commit_file(FILE *fp, const char *tmp, const char *path)
{
    int bad = ferror(fp);
    bad |= fflush(fp) != 0;
    bad |= fsync(fileno(fp)) != 0;
    bad |= fclose(fp) != 0;
    if (bad) {
        int e = errno;
        unlink(tmp);
        return moecal_error_errno(e, "%s: write failed", path);
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return moecal_error_errno(e, "%s: rename from %s failed", path, tmp);
    }
    return MOECAL_OK;
}

static FILE *open_tmp(const char *path, char *tmp, size_t len)
{
    snprintf(tmp, len, "%s.tmp", path);
    return fopen(tmp, "w");
}

static const char *const quantizer_proj[3] = {"gate_proj", "down_proj", "up_proj"};

/* Model-Optimizer's print_quant_summary: f"{name:80} {quantizer!r}" for every
 * TensorQuantizer in named_modules() order (per linear: input, output
 * (disabled), weight; the linears of an expert in their module order: gate,
 * up, down, or Mixtral's w1, w2, w3), then "<n> TensorQuantizers found in
 * model".  The repr is the one of a calibrated max quantizer, amax printed
 * as "%.2e". */
moecal_status moecal_amax_write_summary(const char *path, const moecal_amax_meta *m,
                                        const moecal_model *model, const moecal_amax_tables *t)
{
    static const int hf_order[3] = {0, 2, 1}, mixtral_order[3] = {0, 1, 2};
    const int *order = moecal_model_cfg(model)->family == MOECAL_FAMILY_MIXTRAL ? mixtral_order
                                                                                : hf_order;
    const char *fmt = m->qfmt == MOECAL_QFMT_FP8
                          ? "(4, 3) bit fake per-tensor"
                          : "(2, 1) bit fake block_sizes={-1: 16, 'type': 'dynamic', "
                            "'scale_bits': (4, 3)},";
    char tmp[4096], mod[256], name[300];
    FILE *fp = open_tmp(path, tmp, sizeof tmp);
    long long nq = 0;

    if (!fp)
        return moecal_error_errno(errno, "%s: cannot create", tmp);
    for (int l = 0; l < m->L; l++)
        for (int e = 0; e < m->E; e++) {
            size_t i = ((size_t)l * (size_t)m->E + (size_t)e) * 3;
            for (int k = 0; k < 3; k++) {
                int p = order[k];
                moecal_model_expert_module(model, m->layers[l], e, p, mod, sizeof mod);
                snprintf(name, sizeof name, "%s.input_quantizer", mod);
                fprintf(fp, "%-80s TensorQuantizer(%s amax=%.2e calibrator=MaxCalibrator quant)\n",
                        name, fmt, (double)t->input_amax[i + p]);
                snprintf(name, sizeof name, "%s.output_quantizer", mod);
                fprintf(fp, "%-80s TensorQuantizer(disabled)\n", name);
                snprintf(name, sizeof name, "%s.weight_quantizer", mod);
                fprintf(fp, "%-80s TensorQuantizer(%s amax=%.2e calibrator=MaxCalibrator quant)\n",
                        name, fmt, (double)t->weight_amax[i + p]);
                nq += 3;
            }
        }
    fprintf(fp, "%lld TensorQuantizers found in model\n", nq);
    return commit_file(fp, tmp, path);
}

/* moecal's own table: every quantizer's final and calibrated amax, scale and
 * the expert's token count. */
moecal_status moecal_amax_write_table(const char *path, const moecal_amax_meta *m,
                                      const moecal_model *model, const moecal_amax_tables *t)
{
    char tmp[4096], mod[256];
    FILE *fp = open_tmp(path, tmp, sizeof tmp);
    long long nq = 0, uncal = 0;

    if (!fp)
        return moecal_error_errno(errno, "%s: cannot create", tmp);
    fprintf(fp, "# moecal %s amax table: %s, %s, %s mode%s%s\n", PACKAGE_VERSION,
            m->model_path, moecal_qfmt_name(m->qfmt), m->all_experts ? "all-experts" : "top-k",
            m->all_experts ? "" : " with peer-max input sync, router logits ",
            m->all_experts ? "" : moecal_router_logits_name(m->router_logits));
    for (int l = 0; l < m->L; l++)
        for (int e = 0; e < m->E; e++) {
            size_t i = ((size_t)l * (size_t)m->E + (size_t)e) * 3;
            int64_t tok = t->tokens[(size_t)l * (size_t)m->E + (size_t)e];
            for (int p = 0; p < 3; p++) {
                float wa = t->weight_amax[i + p];
                float ws = moecal_amax_scale(m->qfmt, p == 1 ? wa :
                                             fmaxf(t->weight_amax[i], t->weight_amax[i + 2]));
                moecal_model_expert_module(model, m->layers[l], e, p, mod, sizeof mod);
                fprintf(fp, "%s.input_quantizer  amax=%.6g calibrated=%.6g scale=%.6g tokens=%lld%s\n",
                        mod, t->input_amax[i + p], t->input_amax_calibrated[i + p],
                        moecal_amax_scale(m->qfmt, t->input_amax[i + p]), (long long)tok,
                        tok == 0 ? " uncalibrated" : "");
                fprintf(fp, "%s.weight_quantizer  amax=%.6g scale_2=%.6g\n", mod, wa, ws);
                nq += 2;
            }
            uncal += tok == 0;
        }
    fprintf(fp, "# %lld quantizers, %lld experts never routed (uncalibrated)\n", nq, uncal);
    return commit_file(fp, tmp, path);
}

moecal_status moecal_amax_write_hf_config(const char *path, const moecal_amax_meta *m,
                                          const moecal_amax_tables *t)
{
    char tmp[4096];
    json_t *root = json_object(), *prod = json_object(), *q = json_object(), *ex = json_array();
    FILE *fp;
    int rc;
    char pat[128];
    (void)t;

    json_object_set_new(prod, "name", json_string("moecal"));
    json_object_set_new(prod, "version", json_string(PACKAGE_VERSION));
    json_object_set_new(root, "producer", prod);
    json_object_set_new(q, "quant_algo", json_string(m->qfmt == MOECAL_QFMT_NVFP4 ? "NVFP4" : "FP8"));
    json_object_set_new(q, "kv_cache_quant_algo", json_null());
    if (m->qfmt == MOECAL_QFMT_NVFP4)
        json_object_set_new(q, "group_size", json_integer(16));
    /* Only the routed experts of the calibrated layers are quantized. */
    json_array_append_new(ex, json_string("lm_head"));
    json_array_append_new(ex, json_string("model.embed_tokens"));
    json_array_append_new(ex, json_string("model.layers.*.self_attn*"));
    json_array_append_new(ex, json_string("model.layers.*.mlp.gate"));
    json_array_append_new(ex, json_string("model.layers.*.mlp.shared_experts*"));
    for (int l = 0, j = 0; l < m->cfg->num_hidden_layers; l++) {
        while (j < m->L && m->layers[j] < l)
            j++;
        if (j < m->L && m->layers[j] == l)
            continue;
        snprintf(pat, sizeof pat, "model.layers.%d.mlp*", l);
        json_array_append_new(ex, json_string(pat));
    }
    json_object_set_new(q, "exclude_modules", ex);
    json_object_set_new(root, "quantization", q);
    fp = open_tmp(path, tmp, sizeof tmp);
    if (!fp) {
        json_decref(root);
        return moecal_error_errno(errno, "%s: cannot create", tmp);
    }
    rc = json_dumpf(root, fp, JSON_INDENT(2));
    fputc('\n', fp);
    json_decref(root);
    if (rc != 0) {
        fclose(fp);
        unlink(tmp);
        return moecal_error_set(MOECAL_ERR_IO, "%s: cannot write JSON", tmp);
    }
    return commit_file(fp, tmp, path);
}

moecal_status moecal_amax_write_safetensors(const char *path, const moecal_amax_meta *m,
                                            const moecal_model *model,
                                            const moecal_amax_tables *t)
{
    moecal_st_writer *w = NULL;
    char mod[256], name[320];
    static const char *const kinds[4] = {"input_quantizer._amax", "weight_quantizer._amax",
                                         "input_scale", "weight_scale_2"};
    moecal_status s;

    MOECAL_TRY(moecal_st_writer_create(path, &w));
    s = moecal_st_writer_metadata(w, "format", "pt");
    if (s == MOECAL_OK)
        s = moecal_st_writer_metadata(w, "producer", "moecal " PACKAGE_VERSION);
    /* Declare every tensor (scalars), then write them. */
    for (int pass = 0; pass < 2 && s == MOECAL_OK; pass++) {
        if (pass == 1)
            s = moecal_st_writer_write_header(w);
        for (int l = 0; l < m->L && s == MOECAL_OK; l++)
            for (int e = 0; e < m->E && s == MOECAL_OK; e++) {
                size_t i = ((size_t)l * (size_t)m->E + (size_t)e) * 3;
                for (int p = 0; p < 3 && s == MOECAL_OK; p++) {
                    float w13 = fmaxf(t->weight_amax[i], t->weight_amax[i + 2]);
                    float v[4] = {t->input_amax[i + p], t->weight_amax[i + p],
                                  moecal_amax_scale(m->qfmt, t->input_amax[i + p]),
                                  moecal_amax_scale(m->qfmt, p == 1 ? t->weight_amax[i + 1] : w13)};
                    moecal_model_expert_module(model, m->layers[l], e, p, mod, sizeof mod);
                    for (int k = 0; k < 4 && s == MOECAL_OK; k++) {
                        snprintf(name, sizeof name, "%s.%s", mod, kinds[k]);
                        if (pass == 0)
                            s = moecal_st_writer_add(w, name, MOECAL_DT_F32, 0, NULL);
                        else
                            s = moecal_st_writer_write(w, name, &v[k], sizeof v[k]);
                    }
                }
            }
    }
    (void)quantizer_proj;
    if (s == MOECAL_OK)
        return moecal_st_writer_finish(w);
    moecal_st_writer_abort(w);
    return s;
}
