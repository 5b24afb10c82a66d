/* cmd_inspect.c - `moecal inspect PATH [--json]`: what moecal makes of a
 * checkpoint directory, an activation file or an amax file.
 *
 * A checkpoint is described from config.json and the safetensors headers,
 * and every router and expert tensor the config implies is looked up on its
 * own, so that an incomplete checkpoint is described too, with each missing
 * shard and tensor named (exit status 3).  Whether `moecal calibrate` accepts
 * the directory is what moecal_model_open says.  HDF5 files are told apart
 * by their root attribute `format`.
 */
#include "config.h"
#include "h5util.h"
#include "util.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <hdf5.h>
#include <jansson.h>

#include "activations.h"
#include "amaxread.h"
#include "commands.h"
#include "model.h"
#include "options.h"
#include "runtime.h"
#include "safetensors.h"

#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"
#define MAX_INDEX_BYTES (256u << 20)
#define SHOW_MISSING 10

typedef struct inspect_args {
    bool json;
} inspect_args;

const moecal_optdef moecal_inspect_options[] = {
    {"json", 'j', MOECAL_OPT_FLAG, "0", NULL, NULL, "print one JSON object instead of text", 0,
     0, 0, MOECAL_AT(inspect_args, json)},
    MOECAL_OPT_END
};

static const char summary[] =
    "Describe PATH: a Hugging Face checkpoint directory (config, MoE layers, experts,\n"
    "routing, expert dtypes, shards, and every expected router/expert tensor that is\n"
    "missing), an activation file (tokens, hidden size, layers, dtype, chunking) or an\n"
    "amax file (root attributes, datasets).  Exit status 0 when PATH is complete and\n"
    "usable, 3 when it is incomplete or not one of these.";

/* ------------------------------------------------------------------ helpers */

static void jset(json_t *o, const char *k, json_t *v)
{
    json_object_set_new(o, k, v ? v : json_null());
}

static json_t *int_array(const int *v, int n)
{
    json_t *a = json_array();
    for (int i = 0; a && i < n; i++)
        json_array_append_new(a, json_integer(v[i]));
    return a;
}

static void human_bytes(double b, char *buf, size_t len)
{
    const char *u[] = {"B", "kB", "MB", "GB", "TB", "PB"};
    int i = 0;
    while (b >= 1000.0 && i < 5) {
        b /= 1000.0;
        i++;
    }
    snprintf(buf, len, i ? "%.1f %s" : "%.0f %s", b, u[i]);
}

static void layers_str(const int *l, int n, char *buf, size_t len)
{
    moecal_amax_layers_str(l, n, buf, len);
}

/* ------------------------------------------------------------------ checkpoints */

typedef struct shard {
    char *name;
    bool exists;
    uint64_t size;
    moecal_st_file *f;  /* NULL when missing or unreadable */
    char *problem;      /* why f is NULL */
} shard;

typedef struct ckpt {
    const char *dir;
    moecal_model_config cfg;
    bool have_cfg, single;
    json_t *index;        /* model.safetensors.index.json, or NULL */
    json_t *wmap;         /* its weight_map (borrowed) */
    shard *sh;
    int nsh;
    json_t *missing;      /* [{"tensor":..., "problem":...}] */
    json_t *missing_shards;
    int expected;
    json_t *dtypes;       /* dtype name -> count of expert weights */
} ckpt;

static char *path_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static int add_shard(ckpt *c, const char *name)
{
    struct stat st;
    shard *s, *n;
    char *path;

    for (int i = 0; i < c->nsh; i++)
        if (strcmp(c->sh[i].name, name) == 0)
            return i;
    n = realloc(c->sh, (size_t)(c->nsh + 1) * sizeof *n);
    if (!n)
        return -1;
    c->sh = n;
    s = &c->sh[c->nsh];
    memset(s, 0, sizeof *s);
    if (!(s->name = strdup(name)))
        return -1;
    c->nsh++;
    /* plain basenames only: anything else is not opened */
    if (strchr(name, '/') || strcmp(name, "..") == 0 || strcmp(name, ".") == 0 || !*name) {
        s->problem = strdup("not a plain file name inside the directory");
        return c->nsh - 1;
    }
    if (!(path = path_join(c->dir, name)))
        return -1;
    if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
        s->exists = true;
        s->size = (uint64_t)st.st_size;
        if (moecal_st_open(path, 0, &s->f) != MOECAL_OK) {
            s->f = NULL;
            s->problem = strdup(moecal_error_message());
        }
    } else {
        s->problem = strdup("missing");
        json_array_append_new(c->missing_shards, json_string(name));
    }
    free(path);
    return c->nsh - 1;
}

static void note_missing(ckpt *c, const char *tensor, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void note_missing(ckpt *c, const char *tensor, const char *fmt, ...)
{
    char why[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    json_array_append_new(c->missing, json_pack("{s:s, s:s}", "tensor", tensor, "problem", why));
}

/* Look a tensor up as a reader would; NULL (and a note) when it cannot be had. */
static const moecal_st_tensor *expect(ckpt *c, const char *name)
{
    int si = 0;
    const moecal_st_tensor *t;

    c->expected++;
    if (!c->single) {
        json_t *v = c->wmap ? json_object_get(c->wmap, name) : NULL;
        if (!v || !json_is_string(v)) {
            note_missing(c, name, "not listed in %s", INDEX_NAME);
            return NULL;
        }
        si = add_shard(c, json_string_value(v));
        if (si < 0) {
            note_missing(c, name, "out of memory");
            return NULL;
        }
    }
    if (!c->sh[si].f) {
        note_missing(c, name, "its shard %s is %s", c->sh[si].name,
                     c->sh[si].exists ? "unreadable" : "missing");
        return NULL;
    }
    if (!(t = moecal_st_find(c->sh[si].f, name))) {
        note_missing(c, name, "listed in %s but not in %s", c->single ? SINGLE_NAME : INDEX_NAME,
                     c->sh[si].name);
        return NULL;
    }
    return t;
}

static moecal_status load_index(ckpt *c)
{
    char *ipath = path_join(c->dir, INDEX_NAME), *spath = path_join(c->dir, SINGLE_NAME);
    struct stat st;
    json_error_t jerr;
    moecal_status s = MOECAL_OK;

    if (!ipath || !spath) {
        s = moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
        goto out;
    }
    /* model.safetensors wins when both exist, as in transformers */
    if (stat(spath, &st) == 0) {
        c->single = true;
        if (add_shard(c, SINGLE_NAME) < 0)
            s = moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
        goto out;
    }
    if (stat(ipath, &st) != 0) {
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: neither %s nor %s (not a safetensors "
                             "checkpoint)", c->dir, INDEX_NAME, SINGLE_NAME);
        goto out;
    }
    if ((uint64_t)st.st_size > MAX_INDEX_BYTES) {
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: %lld bytes is too large for an index",
                             ipath, (long long)st.st_size);
        goto out;
    }
    if ((s = moecal_check_regular(ipath, "the index")) != MOECAL_OK)
        goto out;
    c->index = json_load_file(ipath, JSON_REJECT_DUPLICATES, &jerr);
    if (!c->index) {
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: line %d: %s", ipath, jerr.line, jerr.text);
        goto out;
    }
    c->wmap = json_object_get(c->index, "weight_map");
    if (!json_is_object(c->wmap)) {
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: no \"weight_map\" object", ipath);
        goto out;
    }
    /* every shard the index names, in name order */
    {
        const char *k;
        json_t *v;
        json_object_foreach(c->wmap, k, v) {
            if (json_is_string(v) && add_shard(c, json_string_value(v)) < 0) {
                s = moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
                goto out;
            }
        }
    }
out:
    free(ipath);
    free(spath);
    return s;
}

static void ckpt_free(ckpt *c)
{
    for (int i = 0; i < c->nsh; i++) {
        free(c->sh[i].name);
        free(c->sh[i].problem);
        moecal_st_close(c->sh[i].f);
    }
    free(c->sh);
    json_decref(c->index);
    json_decref(c->missing);
    json_decref(c->missing_shards);
    json_decref(c->dtypes);
    if (c->have_cfg)
        moecal_model_config_free(&c->cfg);
}

static const char *const hf_leaf[3] = {"gate_proj", "down_proj", "up_proj"};
static const char *const mx_leaf[3] = {"w1", "w2", "w3"};

static void check_tensors(ckpt *c)
{
    const moecal_model_config *cfg = &c->cfg;
    bool mixtral = cfg->family == MOECAL_FAMILY_MIXTRAL;
    const char *mod = mixtral ? "block_sparse_moe" : "mlp";
    char name[512];

    for (int li = 0; li < cfg->n_moe_layers; li++) {
        int L = cfg->moe_layers[li];
        snprintf(name, sizeof name, "model.layers.%d.%s.gate.weight", L, mod);
        expect(c, name);
        if (cfg->has_correction_bias) {
            snprintf(name, sizeof name, "model.layers.%d.%s.gate.e_score_correction_bias", L,
                     mod);
            expect(c, name);
        }
        for (int e = 0; e < cfg->n_routed_experts; e++) {
            for (int p = 0; p < 3; p++) {
                const moecal_st_tensor *t;
                json_t *n;
                snprintf(name, sizeof name, "model.layers.%d.%s.experts.%d.%s.weight", L, mod, e,
                         mixtral ? mx_leaf[p] : hf_leaf[p]);
                if ((t = expect(c, name)) != NULL) {
                    n = json_object_get(c->dtypes, t->dtype_name);
                    json_object_set_new(c->dtypes, t->dtype_name,
                                        json_integer(n ? json_integer_value(n) + 1 : 1));
                }
                /* FP8 weights need their block scales (a missing weight of an
                 * FP8 checkpoint is taken to be FP8) */
                if (t ? t->dtype == MOECAL_DT_F8_E4M3 : cfg->fp8) {
                    strncat(name, "_scale_inv", sizeof name - strlen(name) - 1);
                    expect(c, name);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ NVFP4 */

typedef struct qlin {
    char *mod;            /* module name, "model.layers.3.mlp.experts.7.gate_proj" */
    float ws2, is;        /* weight_scale_2, input_scale (NaN if unreadable) */
} qlin;

static int qlin_cmp(const void *a, const void *b)
{
    return strcmp(((const qlin *)a)->mod, ((const qlin *)b)->mod);
}

static void nv_problem(json_t *problems, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void nv_problem(json_t *problems, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    json_array_append_new(problems, json_string(buf));
}

static float scalar_f32(const moecal_st_file *f, const moecal_st_tensor *t)
{
    float v = NAN;
    if (t && t->dtype == MOECAL_DT_F32 && t->numel == 1 && moecal_st_read(f, t, &v, 4) != MOECAL_OK)
        v = NAN;
    return v;
}

/* An NVFP4 checkpoint (hf_quant_config.json, as `moecal export` writes it):
 * every quantized linear has its four tensors with consistent shapes and
 * dtypes and positive finite scales; gate and up of an MLP or expert share
 * weight_scale_2 and input_scale (engines fuse them); nothing quantized is
 * also excluded.  Adds "nvfp4" to j; false when something is wrong. */
static bool inspect_nvfp4(const ckpt *c, json_t *j)
{
    char *path = path_join(c->dir, "hf_quant_config.json"), tn[1200];
    json_error_t jerr;
    struct stat st;
    json_t *root, *q, *ex, *nv = json_object(), *problems = json_array();
    qlin *ql = NULL;
    size_t nq = 0, cap = 0;
    bool ok = true;

    if (!path || stat(path, &st) != 0 || !S_ISREG(st.st_mode) || !nv || !problems) {
        free(path);
        json_decref(nv);
        json_decref(problems);
        return true;
    }
    root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    q = root ? json_object_get(root, "quantization") : NULL;
    ex = q ? json_object_get(q, "exclude_modules") : NULL;
    if (!json_is_object(q)) {
        nv_problem(problems, "%s: %s", path, root ? "no \"quantization\" object" : jerr.text);
    } else {
        jset(nv, "quant_algo", json_incref(json_object_get(q, "quant_algo")));
        jset(nv, "group_size", json_incref(json_object_get(q, "group_size")));
        jset(nv, "kv_cache_quant_algo", json_incref(json_object_get(q, "kv_cache_quant_algo")));
        jset(nv, "excluded_modules", json_integer((json_int_t)json_array_size(ex)));
        if (!json_is_array(ex))
            nv_problem(problems, "%s: exclude_modules is not a list (vLLM refuses it)", path);
        if (!json_is_integer(json_object_get(q, "group_size")))
            nv_problem(problems, "%s: no group_size (vLLM and SGLang need it)", path);
        if (!json_object_get(q, "kv_cache_quant_algo"))
            nv_problem(problems, "%s: no kv_cache_quant_algo key (vLLM needs it, null allowed)",
                       path);
    }
    for (int i = 0; i < c->nsh; i++) {
        const moecal_st_file *f = c->sh[i].f;
        for (size_t k = 0; f && k < moecal_st_count(f); k++) {
            const moecal_st_tensor *t = moecal_st_tensor_at(f, k), *w, *ws, *is;
            size_t n = strlen(t->name);
            if (n < 15 || strcmp(t->name + n - 15, ".weight_scale_2") != 0)
                continue;
            if (nq == cap) {
                cap = cap ? 2 * cap : 256;
                qlin *nql = realloc(ql, cap * sizeof *ql);
                if (!nql)
                    break;
                ql = nql;
            }
            qlin *x = &ql[nq];
            if (!(x->mod = strndup(t->name, n - 15)))
                break;
            nq++;
            snprintf(tn, sizeof tn, "%s.weight", x->mod);
            w = moecal_st_find(f, tn);
            snprintf(tn, sizeof tn, "%s.weight_scale", x->mod);
            ws = moecal_st_find(f, tn);
            snprintf(tn, sizeof tn, "%s.input_scale", x->mod);
            is = moecal_st_find(f, tn);
            x->ws2 = scalar_f32(f, t);
            x->is = scalar_f32(f, is);
            if (!w || w->dtype != MOECAL_DT_U8 || w->ndim != 2)
                nv_problem(problems, "%s: %s.weight is not a U8 matrix next to its "
                           "weight_scale_2", c->sh[i].name, x->mod);
            else if (!ws || ws->dtype != MOECAL_DT_F8_E4M3 || ws->ndim != 2 ||
                     ws->shape[0] != w->shape[0] || ws->shape[1] * 8 != w->shape[1])
                nv_problem(problems, "%s: %s.weight_scale is not F8_E4M3 [%lld, %lld]",
                           c->sh[i].name, x->mod, (long long)w->shape[0],
                           (long long)w->shape[1] / 8);
            if (!(x->ws2 > 0.0f) || !isfinite(x->ws2) || !(x->is > 0.0f) || !isfinite(x->is))
                nv_problem(problems, "%s: %s: weight_scale_2 %g and input_scale %g must be "
                           "positive F32 scalars", c->sh[i].name, x->mod, (double)x->ws2,
                           (double)x->is);
        }
    }
    qsort(ql, nq, sizeof *ql, qlin_cmp);
    for (size_t i = 0; i < nq; i++) {
        /* gate_proj with up_proj, w1 with w3 */
        const char *m = ql[i].mod;
        size_t n = strlen(m);
        const char *from = NULL, *to = NULL;
        if (n > 10 && strcmp(m + n - 10, ".gate_proj") == 0)
            from = ".gate_proj", to = ".up_proj";
        else if (n > 3 && strcmp(m + n - 3, ".w1") == 0)
            from = ".w1", to = ".w3";
        if (from) {
            snprintf(tn, sizeof tn, "%.*s%s", (int)(n - strlen(from)), m, to);
            qlin key = {tn, 0, 0};
            const qlin *up = bsearch(&key, ql, nq, sizeof *ql, qlin_cmp);
            if (!up)
                nv_problem(problems, "%s is NVFP4 but %s is not", m, tn);
            else if (up->ws2 != ql[i].ws2 || up->is != ql[i].is)
                nv_problem(problems, "%s and %s differ in weight_scale_2 (%g, %g) or "
                           "input_scale (%g, %g): engines fuse them into one GEMM", m, tn,
                           (double)ql[i].ws2, (double)up->ws2, (double)ql[i].is,
                           (double)up->is);
        }
        size_t e;
        json_t *v;
        json_array_foreach(ex, e, v) {
            if (json_is_string(v) && strcmp(json_string_value(v), m) == 0)
                nv_problem(problems, "%s is NVFP4 and also in exclude_modules", m);
        }
    }
    jset(nv, "quantized_linears", json_integer((json_int_t)nq));
    ok = json_array_size(problems) == 0;
    jset(nv, "problems", problems);
    jset(j, "nvfp4", nv);
    for (size_t i = 0; i < nq; i++)
        free(ql[i].mod);
    free(ql);
    json_decref(root);
    free(path);
    return ok;
}

static moecal_status inspect_ckpt(const char *dir, json_t *j, bool *complete)
{
    ckpt c = {.dir = dir};
    char *cpath = path_join(dir, "config.json");
    moecal_model *m = NULL;
    moecal_status s;
    uint64_t disk = 0;
    json_t *shards;
    const moecal_model_config *cfg = &c.cfg;

    c.missing = json_array();
    c.missing_shards = json_array();
    c.dtypes = json_object();
    if (!cpath || !c.missing || !c.missing_shards || !c.dtypes) {
        free(cpath);
        ckpt_free(&c);
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
    }
    s = moecal_model_config_load(cpath, &c.cfg);
    free(cpath);
    if (s != MOECAL_OK) {
        moecal_error_prefix("%s is not a checkpoint moecal can read: ", dir);
        ckpt_free(&c);
        return s;
    }
    c.have_cfg = true;
    if ((s = load_index(&c)) != MOECAL_OK) {
        ckpt_free(&c);
        return s;
    }
    check_tensors(&c);

    jset(j, "kind", json_string("checkpoint"));
    jset(j, "path", json_string(dir));
    jset(j, "model_type", json_string(cfg->model_type));
    jset(j, "family", json_string(moecal_family_name(cfg->family)));
    jset(j, "num_hidden_layers", json_integer(cfg->num_hidden_layers));
    jset(j, "moe_layers", int_array(cfg->moe_layers, cfg->n_moe_layers));
    jset(j, "n_moe_layers", json_integer(cfg->n_moe_layers));
    jset(j, "first_k_dense_replace", json_integer(cfg->first_k_dense_replace));
    jset(j, "n_routed_experts", json_integer(cfg->n_routed_experts));
    jset(j, "num_experts_per_tok", json_integer(cfg->num_experts_per_tok));
    jset(j, "n_group", json_integer(cfg->n_group));
    jset(j, "topk_group", json_integer(cfg->topk_group));
    jset(j, "hidden_size", json_integer(cfg->hidden_size));
    jset(j, "moe_intermediate_size", json_integer(cfg->moe_intermediate_size));
    jset(j, "scoring_func", json_string(cfg->scoring == MOECAL_SCORING_SIGMOID ? "sigmoid"
                                                                                : "softmax"));
    jset(j, "topk_method", json_string(cfg->topk_method));
    jset(j, "routed_scaling_factor", json_real(cfg->routed_scaling_factor));
    jset(j, "norm_topk_prob", json_boolean(cfg->norm_topk_prob));
    jset(j, "correction_bias", json_boolean(cfg->has_correction_bias));
    jset(j, "expert_dtypes", json_incref(c.dtypes));
    jset(j, "fp8_block", cfg->fp8 ? json_pack("[i,i]", cfg->weight_block[0],
                                              cfg->weight_block[1]) : json_null());
    shards = json_array();
    for (int i = 0; i < c.nsh; i++) {
        json_array_append_new(shards, json_string(c.sh[i].name));
        disk += c.sh[i].size;
    }
    jset(j, "layout", json_string(c.single ? "single file" : "sharded"));
    jset(j, "shards", json_integer(c.nsh));
    jset(j, "shard_files", shards);
    jset(j, "missing_shards", json_incref(c.missing_shards));
    {
        json_t *meta = c.index ? json_object_get(c.index, "metadata") : NULL;
        json_t *ts = meta ? json_object_get(meta, "total_size") : NULL;
        jset(j, "total_size", json_is_integer(ts) ? json_integer(json_integer_value(ts))
                                                   : json_null());
    }
    jset(j, "file_bytes", json_integer((json_int_t)disk));
    jset(j, "expected_tensors", json_integer(c.expected));
    jset(j, "missing_tensors", json_incref(c.missing));
    /* What `moecal calibrate` would say. */
    s = moecal_model_open(dir, &m);
    jset(j, "usable", json_boolean(s == MOECAL_OK));
    jset(j, "problem", s == MOECAL_OK ? json_null() : json_string(moecal_error_message()));
    moecal_model_close(m);
    *complete = s == MOECAL_OK && json_array_size(c.missing) == 0 &&
                json_array_size(c.missing_shards) == 0;
    (void)inspect_nvfp4(&c, j);
    if (json_object_get(j, "nvfp4")) {
        /* an NVFP4 checkpoint is complete when it is consistent, though
         * calibrate does not read it */
        *complete = json_array_size(c.missing) == 0 && json_array_size(c.missing_shards) == 0 &&
                    json_array_size(json_object_get(json_object_get(j, "nvfp4"), "problems")) ==
                        0;
    }
    ckpt_free(&c);
    return MOECAL_OK;
}

static void print_ckpt(const json_t *j)
{
    char lay[256], b1[32], b2[32];
    const json_t *ml = json_object_get(j, "moe_layers"), *miss = json_object_get(j, "missing_tensors");
    const json_t *ms = json_object_get(j, "missing_shards"), *dt = json_object_get(j, "expert_dtypes");
    const json_t *fb = json_object_get(j, "fp8_block"), *ts = json_object_get(j, "total_size");
    int n = (int)json_array_size(ml), *l = malloc((size_t)(n ? n : 1) * sizeof *l);
    const char *k;
    json_t *v;
    size_t i;

    for (int x = 0; l && x < n; x++)
        l[x] = (int)json_integer_value(json_array_get(ml, (size_t)x));
    lay[0] = '\0';
    if (l)
        layers_str(l, n, lay, sizeof lay);
    free(l);
#define I(key) ((long long)json_integer_value(json_object_get(j, key)))
#define S(key) json_string_value(json_object_get(j, key))
    printf("checkpoint %s\n", S("path"));
    printf("  %-22s %s (family %s)\n", "model_type", S("model_type"), S("family"));
    printf("  %-22s %lld, MoE layers %s (%d)\n", "layers", I("num_hidden_layers"), lay, n);
    printf("  %-22s %lld per layer, top-%lld", "routed experts", I("n_routed_experts"),
           I("num_experts_per_tok"));
    if (I("n_group") > 1)
        printf(", %lld groups / %lld kept", I("n_group"), I("topk_group"));
    printf(", %s scoring%s%s\n", S("scoring_func"), *S("topk_method") ? ", " : "",
           S("topk_method"));
    printf("  %-22s %lld\n", "hidden_size", I("hidden_size"));
    printf("  %-22s %lld\n", "moe_intermediate_size", I("moe_intermediate_size"));
    printf("  %-22s", "expert weights");
    if (json_object_size(dt) == 0)
        printf(" none found");
    json_object_foreach((json_t *)dt, k, v)
        printf(" %s (%lld tensors)", k, (long long)json_integer_value(v));
    if (json_is_array(fb))
        printf(", FP8 blocks %lldx%lld (weight_scale_inv)",
               (long long)json_integer_value(json_array_get(fb, 0)),
               (long long)json_integer_value(json_array_get(fb, 1)));
    printf("\n");
    human_bytes((double)I("file_bytes"), b1, sizeof b1);
    printf("  %-22s %lld file(s)%s, %s on disk", "shards", I("shards"),
           strcmp(S("layout"), "sharded") ? " (one model.safetensors)" : "", b1);
    if (json_is_integer(ts)) {
        human_bytes((double)json_integer_value(ts), b2, sizeof b2);
        printf(", index total_size %lld (%s)", (long long)json_integer_value(ts), b2);
    }
    printf("\n");
    json_array_foreach((json_t *)ms, i, v)
        printf("  %-22s %s\n", "MISSING shard", json_string_value(v));
    if (json_array_size(miss) == 0) {
        printf("  %-22s %lld, all present\n", "expected tensors", I("expected_tensors"));
    } else {
        printf("  %-22s %lld, %zu MISSING:\n", "expected tensors", I("expected_tensors"),
               json_array_size(miss));
        json_array_foreach((json_t *)miss, i, v) {
            if (i == SHOW_MISSING) {
                printf("    ... and %zu more (--json lists all)\n", json_array_size(miss) - i);
                break;
            }
            printf("    %s: %s\n", json_string_value(json_object_get(v, "tensor")),
                   json_string_value(json_object_get(v, "problem")));
        }
    }
    {
        const json_t *nv = json_object_get(j, "nvfp4"), *pr;
        if (nv) {
            printf("  %-22s %s, %lld quantized linears, group %lld, %lld excluded modules, "
                   "KV cache %s\n", "quantization", json_string_value(json_object_get(nv,
                   "quant_algo")) ? json_string_value(json_object_get(nv, "quant_algo")) : "?",
                   (long long)json_integer_value(json_object_get(nv, "quantized_linears")),
                   (long long)json_integer_value(json_object_get(nv, "group_size")),
                   (long long)json_integer_value(json_object_get(nv, "excluded_modules")),
                   json_string_value(json_object_get(nv, "kv_cache_quant_algo"))
                       ? json_string_value(json_object_get(nv, "kv_cache_quant_algo"))
                       : "not quantized");
            pr = json_object_get(nv, "problems");
            json_array_foreach((json_t *)pr, i, v) {
                if (i == SHOW_MISSING) {
                    printf("    ... and %zu more (--json lists all)\n", json_array_size(pr) - i);
                    break;
                }
                printf("  %-22s %s\n", "PROBLEM", json_string_value(v));
            }
        }
    }
    if (json_is_true(json_object_get(j, "usable")))
        printf("  %-22s yes\n", "usable by calibrate");
    else
        printf("  %-22s no: %s\n", "usable by calibrate", S("problem"));
#undef I
#undef S
}

/* ------------------------------------------------------------------ HDF5 files */

/* The root attribute `format` as text ("" when absent or not a string). */
static moecal_status h5_format(const char *path, char *buf, size_t len)
{
    hid_t f;
    moecal_status s = MOECAL_OK;

    buf[0] = '\0';
    if ((f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT)) < 0)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: HDF5 cannot open it", path);
    /* a format attribute that is not a string reads as none */
    if (moecal_h5_attr_str(f, path, "format", false, buf, len, NULL) != MOECAL_OK)
        buf[0] = '\0';
    if (H5Fclose(f) < 0)
        s = moecal_error_set(MOECAL_ERR_IO, "%s: HDF5 cannot close it", path);
    H5Eclear2(H5E_DEFAULT);
    return s;
}

static moecal_status inspect_act(const char *path, json_t *j)
{
    moecal_act *a = NULL;
    const char *dn;
    struct stat st;

    MOECAL_TRY(moecal_act_open(path, MPI_COMM_NULL, &a));
    switch (moecal_act_dtype(a)) {
    case MOECAL_DT_BF16: dn = "bf16"; break;
    case MOECAL_DT_F16: dn = "float16"; break;
    default: dn = "float32"; break;
    }
    jset(j, "kind", json_string("activations"));
    jset(j, "path", json_string(path));
    jset(j, "format", json_string("moecal-activations"));
    jset(j, "format_version", json_integer(1));
    jset(j, "tokens", json_integer(moecal_act_tokens(a)));
    jset(j, "hidden_size", json_integer(moecal_act_hidden(a)));
    jset(j, "layers", int_array(moecal_act_layers(a), moecal_act_n_layers(a)));
    jset(j, "n_layers", json_integer(moecal_act_n_layers(a)));
    jset(j, "dtype", json_string(dn));
    jset(j, "chunk_rows", json_integer(moecal_act_chunk_rows(a)));
    jset(j, "file_bytes", json_integer(stat(path, &st) == 0 ? (json_int_t)st.st_size : 0));
    /* what moecal-capture adds: which layers hold dense MLP inputs, and the
     * o_proj input amax of each layer */
    json_t *dense = json_array(), *oa = json_object();
    for (int i = 0; dense && oa && i < moecal_act_n_layers(a); i++) {
        char key[16];
        if (moecal_act_layer_dense(a, i))
            json_array_append_new(dense, json_integer(moecal_act_layers(a)[i]));
        if (!isnan(moecal_act_o_proj_amax(a, i))) {
            snprintf(key, sizeof key, "%d", moecal_act_layers(a)[i]);
            json_object_set_new(oa, key, json_real(moecal_act_o_proj_amax(a, i)));
        }
    }
    jset(j, "dense_layers", dense);
    jset(j, "o_proj_input_amax", oa);
    moecal_act_close(a);
    return MOECAL_OK;
}

static void print_act(const json_t *j)
{
    const json_t *ml = json_object_get(j, "layers");
    int n = (int)json_array_size(ml), *l = malloc((size_t)(n ? n : 1) * sizeof *l);
    char lay[256] = "", b[32];
    long long cr = (long long)json_integer_value(json_object_get(j, "chunk_rows"));

    for (int x = 0; l && x < n; x++)
        l[x] = (int)json_integer_value(json_array_get(ml, (size_t)x));
    if (l)
        layers_str(l, n, lay, sizeof lay);
    free(l);
    human_bytes((double)json_integer_value(json_object_get(j, "file_bytes")), b, sizeof b);
    printf("activations %s\n", json_string_value(json_object_get(j, "path")));
    printf("  %-14s moecal-activations, version 1\n", "format");
    printf("  %-14s %lld per layer\n", "tokens",
           (long long)json_integer_value(json_object_get(j, "tokens")));
    printf("  %-14s %lld\n", "hidden_size",
           (long long)json_integer_value(json_object_get(j, "hidden_size")));
    printf("  %-14s %s (%d)\n", "layers", lay, n);
    {
        const json_t *dl = json_object_get(j, "dense_layers");
        const json_t *oa = json_object_get(j, "o_proj_input_amax");
        if (json_array_size(dl) > 0) {
            printf("  %-14s", "dense layers");
            for (size_t x = 0; x < json_array_size(dl); x++)
                printf("%s%lld", x ? ", " : " ",
                       (long long)json_integer_value(json_array_get(dl, x)));
            printf(" (MLP inputs; the others are MoE inputs)\n");
        }
        if (json_object_size(oa) > 0)
            printf("  %-14s o_proj input amax of %zu layer(s)\n", "recorded",
                   json_object_size(oa));
    }
    printf("  %-14s %s\n", "dtype", json_string_value(json_object_get(j, "dtype")));
    if (cr > 0)
        printf("  %-14s %lld rows per chunk\n", "chunking", cr);
    else
        printf("  %-14s contiguous (not chunked)\n", "chunking");
    printf("  %-14s %s\n", "file size", b);
}

/* One attribute's value as JSON: numbers and strings (scalars or short
 * arrays); anything else as a description. */
static json_t *attr_value(hid_t a)
{
    hid_t t = H5Aget_type(a), sp = H5Aget_space(a), mt = -1;
    hssize_t n = sp >= 0 ? H5Sget_simple_extent_npoints(sp) : -1;
    H5T_class_t cls = t >= 0 ? H5Tget_class(t) : H5T_NO_CLASS;
    json_t *v = NULL;

    if (n == 1 && cls == H5T_STRING) {
        if (H5Tis_variable_str(t) > 0) {
            char *s = NULL;
            if ((mt = H5Tcopy(H5T_C_S1)) >= 0 && H5Tset_size(mt, H5T_VARIABLE) >= 0 &&
                H5Aread(a, mt, &s) >= 0 && s) {
                v = json_string(s);
                H5free_memory(s);
            }
        } else {
            size_t sz = H5Tget_size(t);
            char *s = sz < (1u << 20) ? calloc(sz + 1, 1) : NULL;
            if (s && (mt = H5Tcopy(H5T_C_S1)) >= 0 && H5Tset_size(mt, sz) >= 0 &&
                H5Tset_strpad(mt, H5T_STR_NULLPAD) >= 0 && H5Aread(a, mt, s) >= 0)
                v = json_string(s);
            free(s);
        }
        if (!v)
            v = json_string("(unreadable string)");
    } else if (n >= 1 && n <= 64 && (cls == H5T_INTEGER || cls == H5T_FLOAT)) {
        double d[64];
        long long ll[64];
        bool isint = cls == H5T_INTEGER;
        if (H5Aread(a, isint ? H5T_NATIVE_LLONG : H5T_NATIVE_DOUBLE, isint ? (void *)ll
                                                                           : (void *)d) >= 0) {
            json_t *arr = n > 1 ? json_array() : NULL;
            for (hssize_t i = 0; i < n; i++) {
                json_t *x = isint ? json_integer(ll[i]) : json_real(d[i]);
                if (arr)
                    json_array_append_new(arr, x);
                else
                    v = x;
            }
            if (arr)
                v = arr;
        }
    }
    if (!v)
        v = json_string("(not shown)");
    moecal_h5_close(&mt);
    moecal_h5_close(&sp);
    moecal_h5_close(&t);
    H5Eclear2(H5E_DEFAULT);
    return v;
}

static const char *type_word(hid_t t, char *buf, size_t len)
{
    size_t sz = H5Tget_size(t);
    switch (H5Tget_class(t)) {
    case H5T_INTEGER:
        snprintf(buf, len, "%sint%zu", H5Tget_sign(t) == H5T_SGN_NONE ? "u" : "", 8 * sz);
        break;
    case H5T_FLOAT: snprintf(buf, len, "float%zu", 8 * sz); break;
    case H5T_STRING: snprintf(buf, len, "string"); break;
    default: snprintf(buf, len, "other"); break;
    }
    return buf;
}

static moecal_status inspect_amax(const char *path, json_t *j)
{
    hid_t f;
    H5G_info_t gi;
    H5O_info_t oi;
    json_t *attrs = json_object(), *dsets = json_object();
    moecal_amax_data *d = NULL;
    moecal_status vs;

    if ((f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT)) < 0) {
        json_decref(attrs);
        json_decref(dsets);
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: HDF5 cannot open it", path);
    }
    if (H5Oget_info(f, &oi) >= 0) {
        for (hsize_t i = 0; i < oi.num_attrs; i++) {
            char name[256];
            hid_t a = H5Aopen_by_idx(f, ".", H5_INDEX_NAME, H5_ITER_INC, i, H5P_DEFAULT,
                                     H5P_DEFAULT);
            if (a < 0)
                continue;
            if (H5Aget_name(a, sizeof name, name) > 0)
                json_object_set_new(attrs, name, attr_value(a));
            H5Aclose(a);
        }
    }
    if (H5Gget_info(f, &gi) >= 0) {
        for (hsize_t i = 0; i < gi.nlinks; i++) {
            char name[256], tw[32];
            hid_t o, sp, t;
            hsize_t dims[16];
            int nd;
            json_t *shape;
            if (H5Lget_name_by_idx(f, ".", H5_INDEX_NAME, H5_ITER_INC, i, name, sizeof name,
                                   H5P_DEFAULT) < 0)
                continue;
            if ((o = H5Oopen(f, name, H5P_DEFAULT)) < 0)
                continue;
            if (H5Iget_type(o) == H5I_DATASET && (sp = H5Dget_space(o)) >= 0) {
                if ((t = H5Dget_type(o)) >= 0) {
                    nd = H5Sget_simple_extent_ndims(sp);
                    shape = json_array();
                    if (nd > 0 && nd <= 16 && H5Sget_simple_extent_dims(sp, dims, NULL) >= 0)
                        for (int k = 0; k < nd; k++)
                            json_array_append_new(shape, json_integer((json_int_t)dims[k]));
                    json_object_set_new(dsets, name, json_pack("{s:o, s:s}", "shape", shape,
                                                               "dtype", type_word(t, tw,
                                                                                  sizeof tw)));
                    H5Tclose(t);
                }
                H5Sclose(sp);
            }
            H5Oclose(o);
        }
    }
    H5Fclose(f);
    H5Eclear2(H5E_DEFAULT);
    jset(j, "kind", json_string("amax"));
    jset(j, "path", json_string(path));
    jset(j, "attributes", attrs);
    jset(j, "datasets", dsets);
    vs = moecal_amax_data_read(path, 0, &d);
    jset(j, "valid", json_boolean(vs == MOECAL_OK));
    jset(j, "problem", vs == MOECAL_OK ? json_null() : json_string(moecal_error_message()));
    moecal_amax_data_free(d);
    return MOECAL_OK;
}

static void print_amax(const json_t *j)
{
    const char *k;
    json_t *v;

    printf("amax file %s\n  root attributes:\n", json_string_value(json_object_get(j, "path")));
    json_object_foreach(json_object_get(j, "attributes"), k, v) {
        char *s = json_is_string(v) ? NULL : json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
        const char *txt = s ? s : json_string_value(v);
        /* long values (placement JSON) on one line, cut */
        printf("    %-24s %.*s%s\n", k, 100, txt, strlen(txt) > 100 ? " ..." : "");
        free(s);
    }
    printf("  datasets:\n");
    json_object_foreach(json_object_get(j, "datasets"), k, v) {
        json_t *sh = json_object_get(v, "shape"), *x;
        size_t i;
        printf("    %-24s %-8s [", k, json_string_value(json_object_get(v, "dtype")));
        json_array_foreach(sh, i, x)
            printf("%s%lld", i ? ", " : "", (long long)json_integer_value(x));
        printf("]\n");
    }
    if (json_is_true(json_object_get(j, "valid")))
        printf("  valid format-1 amax file: yes\n");
    else
        printf("  valid format-1 amax file: no: %s\n",
               json_string_value(json_object_get(j, "problem")));
}

/* ------------------------------------------------------------------ the command */

static moecal_status inspect(const char *path, bool as_json, bool *complete)
{
    struct stat st;
    json_t *j = json_object();
    char fmt[128];
    moecal_status s;
    htri_t h5;

    *complete = true;
    if (!j)
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
    if (stat(path, &st) != 0) {
        json_decref(j);
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: %s", path, strerror(errno));
    }
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    if (S_ISDIR(st.st_mode)) {
        s = inspect_ckpt(path, j, complete);
    } else if (S_ISREG(st.st_mode) && (h5 = H5Fis_hdf5(path)) > 0) {
        s = h5_format(path, fmt, sizeof fmt);
        if (s == MOECAL_OK && strcmp(fmt, "moecal-activations") == 0)
            s = inspect_act(path, j);
        else if (s == MOECAL_OK && strcmp(fmt, "moecal-amax") == 0)
            s = inspect_amax(path, j);
        else if (s == MOECAL_OK)
            s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: an HDF5 file, but neither a moecal "
                                 "activation file nor an amax file (root attribute format %s%s%s;"
                                 " expected \"moecal-activations\" or \"moecal-amax\")", path,
                                 fmt[0] ? "= \"" : "missing", fmt, fmt[0] ? "\"" : "");
    } else {
        H5Eclear2(H5E_DEFAULT);
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s is neither a checkpoint directory nor an "
                             "HDF5 file (activations or amax)", path);
    }
    if (s == MOECAL_OK) {
        if (as_json) {
            char *txt = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
            if (!txt)
                s = moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
            else
                printf("%s\n", txt);
            free(txt);
        } else {
            const char *kind = json_string_value(json_object_get(j, "kind"));
            if (strcmp(kind, "checkpoint") == 0)
                print_ckpt(j);
            else if (strcmp(kind, "activations") == 0)
                print_act(j);
            else
                print_amax(j);
        }
        if (strcmp(json_string_value(json_object_get(j, "kind")), "amax") == 0 &&
            !json_is_true(json_object_get(j, "valid")))
            *complete = false;
    }
    json_decref(j);
    return s;
}

int moecal_cmd_inspect(int argc, char **argv)
{
    moecal_opts *o = NULL;
    inspect_args a;
    moecal_status s = MOECAL_OK;
    bool complete = true;
    int rc = 0;

    o = moecal_cmd_begin("inspect", moecal_inspect_options, "PATH", summary, 1, NULL, &a, argc,
                         argv);
    if (!o)
        return 0;
    /* Rank 0 reads and prints; the others wait for its status. */
    if (moecal_world_rank() == 0) {
        s = inspect(moecal_opts_pos(o, 0), a.json, &complete);
        fflush(stdout);
    }
    if (moecal_world_size() > 1) {
        int c = complete;
        MPI_Bcast(&c, 1, MPI_INT, 0, MPI_COMM_WORLD);
        complete = c;
    }
    moecal_check_all(s);
    if (!complete) {
        if (moecal_world_rank() == 0)
            fprintf(stderr, "moecal: inspect: %s is incomplete or not usable (see above)\n",
                    moecal_opts_pos(o, 0));
        rc = MOECAL_EXIT_INPUT;
    }
    moecal_opts_free(o);
    return rc;
}
