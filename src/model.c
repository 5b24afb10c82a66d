/* model.c - a Hugging Face MoE checkpoint directory.
 *
 * Opening reads config.json and the tensor -> shard map, checks that every
 * shard exists and that every expert and router tensor the config implies is
 * listed, so a broken download fails at start-up, not hours into a run.
 * Shards are opened lazily (a rank touches only the shards of its experts)
 * and kept open; a mutex guards the lazy opening, so loads may run from
 * several threads (say, a prefetch thread and the compute thread).
 */
#include "config.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "fp8.h"
#include "model.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data are little-endian; moecal reads them in place on little-endian hosts only"
#endif

#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"
/* A DeepSeek-V3 index is ~9 MB; anything beyond this is not an index. */
#define MAX_INDEX_BYTES (256u << 20)
/* Conversions go through a scratch buffer of about this size. */
#define CHUNK_BYTES ((size_t)8 << 20)
#define NAME_MAX_LEN 256

const char *const moecal_proj_name[MOECAL_NPROJ] = {"w1", "w2", "w3"};

/* Hugging Face module names of the projections, by family. */
static const char *const hf_proj[MOECAL_NPROJ] = {"gate_proj", "down_proj", "up_proj"};

typedef struct shard {
    char *name;             /* basename as listed in the index */
    char *path;             /* dir/name */
    moecal_st_file *file;   /* NULL until first use; guarded by lock */
} shard;

typedef struct entry {
    const char *name;       /* tensor name, in names arena */
    uint32_t shard;
} entry;

struct moecal_model {
    char *dir;
    char *cfg_path;
    moecal_model_config cfg;
    shard *shards;
    size_t nshards;
    entry *map;             /* sorted by name; NULL for a single model.safetensors */
    size_t nmap;
    char *names;
    pthread_mutex_t lock;
};

typedef unsigned long long ull;

/* ------------------------------------------------------------------ helpers */

static char *path_join(const char *dir, const char *name)
{
    size_t dl = strlen(dir), nl = strlen(name);
    int slash = dl > 0 && dir[dl - 1] != '/';
    char *p = malloc(dl + (size_t)slash + nl + 1);

    if (p == NULL)
        return NULL;
    memcpy(p, dir, dl);
    if (slash)
        p[dl] = '/';
    memcpy(p + dl + (size_t)slash, name, nl + 1);
    return p;
}

static void fmt_shape(char *buf, size_t n, const moecal_st_tensor *t)
{
    size_t o = (size_t)snprintf(buf, n, "[");

    for (int i = 0; i < t->ndim && o < n; i++)
        o += (size_t)snprintf(buf + o, n - o, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (o < n)
        snprintf(buf + o, n - o, "]");
}

static bool is_moe_layer(const moecal_model_config *cfg, int layer)
{
    int lo = 0, hi = cfg->n_moe_layers - 1;

    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        if (cfg->moe_layers[mid] == layer)
            return true;
        if (cfg->moe_layers[mid] < layer)
            lo = mid + 1;
        else
            hi = mid - 1;
    }
    return false;
}

static moecal_status check_layer(const moecal_model *m, int layer, const char *what)
{
    if (!is_moe_layer(&m->cfg, layer))
        return moecal_error_set(MOECAL_ERR_USAGE,
                                "%s: layer %d is not a MoE layer of this %s model (its %d MoE "
                                "layers run from %d to %d), asked for its %s", m->dir, layer,
                                m->cfg.model_type, m->cfg.n_moe_layers, m->cfg.moe_layers[0],
                                m->cfg.moe_layers[m->cfg.n_moe_layers - 1], what);
    return MOECAL_OK;
}

static void gate_name(const moecal_model *m, int layer, const char *leaf, char *buf, size_t len)
{
    snprintf(buf, len, "model.layers.%d.%s.gate.%s", layer,
             m->cfg.family == MOECAL_FAMILY_MIXTRAL ? "block_sparse_moe" : "mlp", leaf);
}

/* ------------------------------------------------------------------ names */

void moecal_model_expert_module(const moecal_model *m, int layer, int expert, int proj,
                                char *buf, size_t len)
{
    if (len == 0)
        return;
    if (proj < 0 || proj >= MOECAL_NPROJ) {
        snprintf(buf, len, "(invalid projection %d)", proj);
        return;
    }
    if (m->cfg.family == MOECAL_FAMILY_MIXTRAL)
        snprintf(buf, len, "model.layers.%d.block_sparse_moe.experts.%d.%s", layer, expert,
                 moecal_proj_name[proj]);
    else
        snprintf(buf, len, "model.layers.%d.mlp.experts.%d.%s", layer, expert, hf_proj[proj]);
}

void moecal_model_expert_name(const moecal_model *m, int layer, int expert, int proj,
                              char *buf, size_t len)
{
    size_t n;

    moecal_model_expert_module(m, layer, expert, proj, buf, len);
    n = strlen(buf);
    if (n < len)
        snprintf(buf + n, len - n, ".weight");
}

/* ------------------------------------------------------------------ open */

static int entry_cmp(const void *a, const void *b)
{
    return strcmp(((const entry *)a)->name, ((const entry *)b)->name);
}

typedef struct pending {
    const char *tensor;
    const char *shard;
} pending;

static int pending_shard_cmp(const void *a, const void *b)
{
    return strcmp((*(const pending *const *)a)->shard, (*(const pending *const *)b)->shard);
}

/* A shard name must be a plain file name inside the directory. */
static moecal_status check_shard_name(const char *ipath, const char *tensor, const json_t *v)
{
    char sb[NAME_MAX_LEN], tb[NAME_MAX_LEN];
    const char *s;

    if (!json_is_string(v))
        return moecal_error_set(MOECAL_ERR_FORMAT,
                                "%s: weight_map entry '%s' is not a string",
                                ipath, moecal_printable(tb, sizeof tb, tensor));
    s = json_string_value(v);
    if (strlen(s) != json_string_length(v) || s[0] == '\0' || strchr(s, '/') != NULL ||
        strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
        return moecal_error_set(MOECAL_ERR_FORMAT,
                                "%s: tensor '%s' is mapped to '%s', which is not a plain file "
                                "name in the model directory", ipath,
                                moecal_printable(tb, sizeof tb, tensor), moecal_printable(sb, sizeof sb, s));
    return MOECAL_OK;
}

/* Parse model.safetensors.index.json into m->shards and m->map. */
static moecal_status load_index(moecal_model *m, const char *ipath)
{
    json_error_t jerr;
    json_t *root = NULL;
    const json_t *wm;
    char *text = NULL;
    size_t len = 0, n, i, arena = 0, off = 0;
    pending *pend = NULL, **order = NULL;
    const char *key;
    json_t *v;
    moecal_status rc;

    MOECAL_TRY(moecal_read_file(ipath, "the index", MAX_INDEX_BYTES, &text, &len));
    /* A name listed twice would be ambiguous: refuse duplicates. */
    root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    free(text);
    if (root == NULL)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: not valid JSON: %s (line %d, column %d)",
                                ipath, jerr.text, jerr.line, jerr.column);
    wm = json_is_object(root) ? json_object_get(root, "weight_map") : NULL;
    if (!json_is_object(wm)) {
        rc = moecal_error_set(MOECAL_ERR_FORMAT, "%s: no 'weight_map' object", ipath);
        goto out;
    }
    n = json_object_size(wm);
    if (n == 0 || n > UINT32_MAX) {
        rc = moecal_error_set(MOECAL_ERR_FORMAT, "%s: 'weight_map' lists %zu tensors", ipath, n);
        goto out;
    }
    pend = malloc(n * sizeof *pend);
    order = malloc(n * sizeof *order);
    m->map = malloc(n * sizeof *m->map);
    if (pend == NULL || order == NULL || m->map == NULL) {
        rc = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory for %zu tensors", ipath, n);
        goto out;
    }
    i = 0;
    json_object_foreach((json_t *)wm, key, v) {
        rc = check_shard_name(ipath, key, v);
        if (rc != MOECAL_OK)
            goto out;
        pend[i].tensor = key;
        pend[i].shard = json_string_value(v);
        order[i] = &pend[i];
        arena += strlen(key) + 1; /* bounded by the file size: cannot overflow */
        i++;
    }
    m->names = malloc(arena);
    if (m->names == NULL) {
        rc = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", ipath);
        goto out;
    }

    /* Distinct shards: sort by shard name, then one pass. */
    qsort(order, n, sizeof *order, pending_shard_cmp);
    m->shards = calloc(n, sizeof *m->shards); /* at most n distinct */
    if (m->shards == NULL) {
        rc = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", ipath);
        goto out;
    }
    for (i = 0; i < n; i++) {
        size_t tl = strlen(order[i]->tensor) + 1;
        if (i == 0 || strcmp(order[i]->shard, order[i - 1]->shard) != 0) {
            shard *s = &m->shards[m->nshards++];
            s->name = strdup(order[i]->shard);
            s->path = path_join(m->dir, order[i]->shard);
            if (s->name == NULL || s->path == NULL) {
                rc = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", ipath);
                goto out;
            }
        }
        memcpy(m->names + off, order[i]->tensor, tl);
        m->map[i].name = m->names + off;
        m->map[i].shard = (uint32_t)(m->nshards - 1);
        off += tl;
    }
    m->nmap = n;
    qsort(m->map, n, sizeof *m->map, entry_cmp);

    /* Every shard must be there now, not when a rank first needs it. */
    for (i = 0; i < m->nshards; i++) {
        struct stat st;
        char sb[NAME_MAX_LEN];
        if (stat(m->shards[i].path, &st) != 0) {
            rc = moecal_error_errno(errno, "%s: shard '%s' listed in %s is missing", m->dir,
                                    moecal_printable(sb, sizeof sb, m->shards[i].name), INDEX_NAME);
            goto out;
        }
        if (!S_ISREG(st.st_mode)) {
            rc = moecal_error_set(MOECAL_ERR_FORMAT, "%s: shard '%s' listed in %s is not a "
                                  "regular file", m->dir,
                                  moecal_printable(sb, sizeof sb, m->shards[i].name), INDEX_NAME);
            goto out;
        }
    }
    rc = MOECAL_OK;
out:
    free(pend);
    free(order);
    json_decref(root);
    return rc;
}

/* The shard holding a tensor, opened on first use; NULL file with an error
 * set when the tensor is not in the checkpoint. */
static moecal_status lookup(moecal_model *m, const char *name, size_t *shard_out)
{
    if (m->map == NULL) {
        *shard_out = 0;
        return MOECAL_OK;
    }
    entry key = {name, 0};
    const entry *e = bsearch(&key, m->map, m->nmap, sizeof *m->map, entry_cmp);
    if (e == NULL)
        return moecal_error_set(MOECAL_ERR_MISMATCH, "%s: tensor '%s' is not in %s", m->dir,
                                name, INDEX_NAME);
    *shard_out = e->shard;
    return MOECAL_OK;
}

static moecal_status shard_file(moecal_model *m, size_t i, const moecal_st_file **out)
{
    moecal_status rc = MOECAL_OK;

    pthread_mutex_lock(&m->lock);
    if (m->shards[i].file == NULL)
        rc = moecal_st_open(m->shards[i].path, 0, &m->shards[i].file);
    *out = m->shards[i].file;
    pthread_mutex_unlock(&m->lock);
    return rc;
}

size_t moecal_model_shard_count(const moecal_model *m)
{
    return m->nshards;
}

const char *moecal_model_shard_name(const moecal_model *m, size_t i)
{
    return i < m->nshards ? m->shards[i].name : NULL;
}

moecal_status moecal_model_shard_open(moecal_model *m, size_t i, const moecal_st_file **out)
{
    if (i >= m->nshards)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "shard %zu of %zu", i, m->nshards);
    return shard_file(m, i, out);
}

int moecal_model_has_index(const moecal_model *m)
{
    return m->map != NULL;
}

/* Is name in the checkpoint?  (Index lookup, or the single file's header.) */
static bool has_tensor(moecal_model *m, const char *name)
{
    if (m->map != NULL) {
        entry key = {name, 0};
        return bsearch(&key, m->map, m->nmap, sizeof *m->map, entry_cmp) != NULL;
    }
    return moecal_st_find(m->shards[0].file, name) != NULL;
}

/* Every tensor the config implies must be listed (dtypes and shapes are
 * checked when the tensors are loaded). */
static moecal_status check_listed(moecal_model *m)
{
    const char *where = m->map ? INDEX_NAME : m->shards[0].path;
    char name[NAME_MAX_LEN];

    for (int li = 0; li < m->cfg.n_moe_layers; li++) {
        int L = m->cfg.moe_layers[li];
        gate_name(m, L, "weight", name, sizeof name);
        if (!has_tensor(m, name))
            return moecal_error_set(MOECAL_ERR_MISMATCH, "%s: router tensor '%s' is not in %s, "
                                    "though %s makes layer %d a MoE layer", m->dir, name,
                                    where, m->cfg_path, L);
        if (m->cfg.has_correction_bias) {
            gate_name(m, L, "e_score_correction_bias", name, sizeof name);
            if (!has_tensor(m, name))
                return moecal_error_set(MOECAL_ERR_MISMATCH, "%s: router tensor '%s' is not "
                                        "in %s, though %s asks for it (topk_method '%s')",
                                        m->dir, name, where, m->cfg_path, m->cfg.topk_method);
        }
        for (int e = 0; e < m->cfg.n_routed_experts; e++) {
            for (int p = 0; p < MOECAL_NPROJ; p++) {
                moecal_model_expert_name(m, L, e, p, name, sizeof name);
                if (!has_tensor(m, name))
                    return moecal_error_set(MOECAL_ERR_MISMATCH,
                                            "%s: expert tensor '%s' is not in %s, though %s "
                                            "gives layer %d %d routed experts", m->dir, name,
                                            where, m->cfg_path, L, m->cfg.n_routed_experts);
            }
        }
    }
    return MOECAL_OK;
}

/* An exported NVFP4 checkpoint (hf_quant_config.json, Model-Optimizer's
 * layout) is not a source moecal can calibrate or export from. */
static moecal_status refuse_quantized(const char *dir)
{
    char *path = path_join(dir, "hf_quant_config.json"), *text = NULL;
    size_t len = 0;
    json_t *root;
    const char *algo = NULL;
    moecal_status rc = MOECAL_OK;
    struct stat st;

    if (path == NULL)
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", dir);
    if (stat(path, &st) != 0) {
        free(path);
        return MOECAL_OK;
    }
    rc = moecal_read_file(path, "the file", 64u << 20, &text, &len);
    if (rc == MOECAL_OK) {
        root = json_loadb(text, len, 0, NULL);
        json_t *q = root ? json_object_get(root, "quantization") : NULL;
        algo = q ? json_string_value(json_object_get(q, "quant_algo")) : NULL;
        if (algo != NULL)
            rc = moecal_error_set(MOECAL_ERR_UNSUPPORTED,
                                  "%s is a quantized checkpoint (%s: quant_algo %.32s), not a "
                                  "source moecal reads: give the BF16 or FP8 checkpoint it was "
                                  "made from", dir, path, algo);
        json_decref(root);
    }
    free(text);
    free(path);
    return rc;
}

moecal_status moecal_model_open(const char *dir, moecal_model **out)
{
    moecal_model *m;
    struct stat st;
    char *single = NULL, *ipath = NULL;
    moecal_status rc;

    if (dir == NULL || out == NULL)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_model_open: null argument");
    *out = NULL;
    if (stat(dir, &st) != 0)
        return moecal_error_errno(errno, "%s: cannot open model directory", dir);
    if (!S_ISDIR(st.st_mode))
        return moecal_error_set(MOECAL_ERR_USAGE, "%s: not a directory (the model is a Hugging "
                                "Face checkpoint directory)", dir);
    m = calloc(1, sizeof *m);
    if (m == NULL)
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", dir);
    pthread_mutex_init(&m->lock, NULL);
    m->dir = strdup(dir);
    m->cfg_path = path_join(dir, "config.json");
    single = path_join(dir, SINGLE_NAME);
    ipath = path_join(dir, INDEX_NAME);
    if (m->dir == NULL || m->cfg_path == NULL || single == NULL || ipath == NULL) {
        rc = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", dir);
        goto fail;
    }
    rc = moecal_model_config_load(m->cfg_path, &m->cfg);
    if (rc != MOECAL_OK)
        goto fail;
    rc = refuse_quantized(dir);
    if (rc != MOECAL_OK)
        goto fail;

    /* As transformers does: one model.safetensors wins over an index. */
    if (stat(single, &st) == 0) {
        m->shards = calloc(1, sizeof *m->shards);
        if (m->shards == NULL) {
            rc = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", dir);
            goto fail;
        }
        m->nshards = 1;
        m->shards[0].name = strdup(SINGLE_NAME);
        m->shards[0].path = single;
        single = NULL;
        if (m->shards[0].name == NULL) {
            rc = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", dir);
            goto fail;
        }
        rc = moecal_st_open(m->shards[0].path, 0, &m->shards[0].file);
    } else if (errno != ENOENT) {
        rc = moecal_error_errno(errno, "%s: cannot stat", single);
    } else if (stat(ipath, &st) == 0 || errno != ENOENT) {
        rc = load_index(m, ipath);
    } else {
        rc = moecal_error_set(MOECAL_ERR_FORMAT, "%s: neither %s nor %s found", dir,
                              SINGLE_NAME, INDEX_NAME);
    }
    if (rc == MOECAL_OK)
        rc = check_listed(m);
    if (rc != MOECAL_OK)
        goto fail;
    free(single);
    free(ipath);
    *out = m;
    return MOECAL_OK;
fail:
    free(single);
    free(ipath);
    moecal_model_close(m);
    return rc;
}

void moecal_model_close(moecal_model *m)
{
    if (m == NULL)
        return;
    for (size_t i = 0; i < m->nshards; i++) {
        moecal_st_close(m->shards[i].file);
        free(m->shards[i].name);
        free(m->shards[i].path);
    }
    free(m->shards);
    free(m->map);
    free(m->names);
    moecal_model_config_free(&m->cfg);
    free(m->cfg_path);
    free(m->dir);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

const moecal_model_config *moecal_model_cfg(const moecal_model *m)
{
    return &m->cfg;
}

const char *moecal_model_dir(const moecal_model *m)
{
    return m->dir;
}

moecal_status moecal_model_find(moecal_model *m, const char *name,
                                const moecal_st_file **file, const moecal_st_tensor **t)
{
    const moecal_st_file *f;
    const moecal_st_tensor *tt;
    size_t si = 0;

    MOECAL_TRY(lookup(m, name, &si));
    MOECAL_TRY(shard_file(m, si, &f));
    tt = moecal_st_find(f, name);
    if (tt == NULL) {
        if (m->map != NULL)
            return moecal_error_set(MOECAL_ERR_MISMATCH, "%s: tensor '%s' is listed in %s but "
                                    "the shard does not hold it", moecal_st_path(f), name,
                                    INDEX_NAME);
        return moecal_error_set(MOECAL_ERR_MISMATCH, "%s: no tensor '%s'", moecal_st_path(f),
                                name);
    }
    if (file)
        *file = f;
    if (t)
        *t = tt;
    return MOECAL_OK;
}

/* ------------------------------------------------------------------ loading */

/* Magnitude bits of the largest finite bf16 in p[n]; counts non-finite. */
static uint16_t bf16_scan(const uint16_t *p, size_t n, uint64_t *nonfinite)
{
    uint16_t mx = 0;
    uint64_t bad = 0;

    for (size_t i = 0; i < n; i++) {
        uint16_t a = p[i] & 0x7fff;
        bool fin = a < 0x7f80;
        bad += !fin;
        a = fin ? a : 0;
        mx = a > mx ? a : mx;
    }
    *nonfinite += bad;
    return mx;
}

/* The largest finite |p[i]| of float p[n], max'ed into *mx; counts
 * non-finite. */
static void f32_scan(const float *p, size_t n, float *mx, uint64_t *nonfinite)
{
    for (size_t i = 0; i < n; i++) {
        float a = fabsf(p[i]);
        if (!isfinite(a))
            (*nonfinite)++;
        else if (a > *mx)
            *mx = a;
    }
}

typedef enum { OUT_BF16, OUT_F32 } out_kind;

/* A 2-D weight found and checked: shape [rows, cols] (expect names where it
 * comes from), dtype F8_E4M3 with its weight_scale_inv (read and checked),
 * BF16, F16 or F32. */
typedef struct tensor_2d {
    const moecal_st_file *f;
    const moecal_st_tensor *t;
    float *scale;              /* FP8: [nbr][nbc], malloc'd */
    size_t nbr, nbc, block;
} tensor_2d;

static moecal_status open_2d(moecal_model *m, const char *name, size_t rows, size_t cols,
                             const char *expect, tensor_2d *w)
{
    const moecal_st_file *sf;
    const moecal_st_tensor *st;
    char shp[96], sname[NAME_MAX_LEN];
    moecal_status rc;

    memset(w, 0, sizeof *w);
    w->block = (size_t)m->cfg.weight_block[0];
    MOECAL_TRY(moecal_model_find(m, name, &w->f, &w->t));
    if (w->t->ndim != 2 || (uint64_t)w->t->shape[0] != rows ||
        (uint64_t)w->t->shape[1] != cols) {
        fmt_shape(shp, sizeof shp, w->t);
        return moecal_error_set(MOECAL_ERR_MISMATCH, "%s: tensor '%s' has shape %s but "
                                "[%zu, %zu] was expected (%s)", moecal_st_path(w->f), name, shp,
                                rows, cols, expect);
    }
    switch (w->t->dtype) {
    case MOECAL_DT_F8_E4M3:
    case MOECAL_DT_BF16:
    case MOECAL_DT_F16:
    case MOECAL_DT_F32:
        break;
    default:
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s; it must "
                                "be F8_E4M3 (with weight_scale_inv), BF16, F16 or F32",
                                moecal_st_path(w->f), name, w->t->dtype_name);
    }
    if (w->t->dtype != MOECAL_DT_F8_E4M3)
        return MOECAL_OK;

    size_t block = w->block;
    size_t nbr = rows / block + (rows % block != 0), nbc = cols / block + (cols % block != 0);
    size_t nl = strlen(name);
    /* "<module>.weight" -> "<module>.weight_scale_inv" */
    if (nl + sizeof "_scale_inv" > sizeof sname)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "tensor name '%s' too long", name);
    snprintf(sname, sizeof sname, "%s_scale_inv", name);
    if (!has_tensor(m, sname))
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: FP8 tensor '%s' has no '%s' in "
                                "the checkpoint", moecal_st_path(w->f), name, sname);
    MOECAL_TRY(moecal_model_find(m, sname, &sf, &st));
    if (st->ndim != 2 || (uint64_t)st->shape[0] != nbr || (uint64_t)st->shape[1] != nbc) {
        fmt_shape(shp, sizeof shp, st);
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: tensor '%s' has shape %s but "
                                "[%zu, %zu] was expected for weight [%zu, %zu] with "
                                "%zux%zu blocks", moecal_st_path(sf), sname, shp, nbr, nbc,
                                rows, cols, block, block);
    }
    if (st->dtype != MOECAL_DT_F32)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: tensor '%s' has dtype %s but F32 "
                                "was expected", moecal_st_path(sf), sname, st->dtype_name);
    w->scale = malloc(nbr * nbc * sizeof *w->scale);
    if (w->scale == NULL)
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory for '%s'",
                                moecal_st_path(sf), sname);
    rc = moecal_st_read(sf, st, w->scale, nbr * nbc * sizeof *w->scale);
    if (rc == MOECAL_OK && (rc = moecal_fp8_check_scales(w->scale, nbr, nbc)) != MOECAL_OK)
        moecal_error_prefix("%s: tensor '%s': ", moecal_st_path(sf), sname);
    if (rc != MOECAL_OK) {
        free(w->scale);
        w->scale = NULL;
        return rc;
    }
    w->nbr = nbr;
    w->nbc = nbc;
    return MOECAL_OK;
}

static moecal_status nan_error(const tensor_2d *w, const char *name, uint64_t n, bool rounded)
{
    return moecal_error_set(MOECAL_ERR_NONFINITE, "%s: tensor '%s' holds %llu NaN or Inf "
                            "values%s", moecal_st_path(w->f), name, (unsigned long long)n,
                            rounded ? " (after rounding to bf16)" : "");
}

/* Load a 2-D tensor `name` of shape [rows, cols] (F8_E4M3 with its
 * weight_scale_inv, BF16, F16 or F32) into dst as bf16 or float32.  Rejects
 * non-finite values.  expect names where the shape comes from. */
static moecal_status load_2d(moecal_model *m, const char *name, size_t rows, size_t cols,
                             const char *expect, out_kind kind, void *dst, float *amax)
{
    tensor_2d w;
    const moecal_st_file *f;
    const moecal_st_tensor *t;
    size_t n = rows * cols, esz, chunk_rows;
    uint64_t nonfinite = 0;
    uint16_t mx = 0;
    float fmx = 0.0f;
    void *scratch = NULL;
    float *scale = NULL;
    size_t block = (size_t)m->cfg.weight_block[0];
    moecal_status rc = MOECAL_OK;

    MOECAL_TRY(open_2d(m, name, rows, cols, expect, &w));
    f = w.f;
    t = w.t;
    scale = w.scale;
    esz = moecal_dtype_size(t->dtype);
    if (t->dtype == MOECAL_DT_F8_E4M3) {
        /* whole block rows per chunk, so chunks share the scale layout */
        chunk_rows = CHUNK_BYTES / (block * cols) * block;
        if (chunk_rows == 0)
            chunk_rows = block;
    } else {
        chunk_rows = CHUNK_BYTES / (cols * esz);
        if (chunk_rows == 0)
            chunk_rows = 1;
    }
    if (chunk_rows > rows)
        chunk_rows = rows;

    /* BF16 -> bf16 and F32 -> float32 read straight into dst. */
    if ((t->dtype == MOECAL_DT_BF16 && kind == OUT_BF16) ||
        (t->dtype == MOECAL_DT_F32 && kind == OUT_F32)) {
        rc = moecal_st_read(f, t, dst, n * esz);
        if (rc != MOECAL_OK)
            goto out;
        if (kind == OUT_BF16)
            mx = bf16_scan(dst, n, &nonfinite);
        else
            f32_scan(dst, n, &fmx, &nonfinite);
        goto check;
    }

    /* Everything else through a scratch chunk: raw bytes, plus a bf16 staging
     * area when FP8 goes to float32. */
    {
        size_t raw = chunk_rows * cols * esz;
        size_t stage = (t->dtype == MOECAL_DT_F8_E4M3 && kind == OUT_F32)
                           ? chunk_rows * cols * sizeof(uint16_t) : 0;
        scratch = malloc(raw + stage);
        if (scratch == NULL) {
            rc = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory for '%s'",
                                  moecal_st_path(f), name);
            goto out;
        }
        for (size_t r0 = 0; r0 < rows; r0 += chunk_rows) {
            size_t nr = rows - r0 < chunk_rows ? rows - r0 : chunk_rows, cn = nr * cols;
            uint16_t *ob = kind == OUT_BF16 ? (uint16_t *)dst + r0 * cols : NULL;
            float *of = kind == OUT_F32 ? (float *)dst + r0 * cols : NULL;
            rc = moecal_st_read_range(f, t, (uint64_t)r0 * cols * esz, scratch, cn * esz);
            if (rc != MOECAL_OK)
                goto out;
            switch (t->dtype) {
            case MOECAL_DT_F8_E4M3: {
                size_t nbc = cols / block + (cols % block != 0);
                uint16_t *b = ob ? ob : (uint16_t *)((char *)scratch + raw);
                uint64_t nn = 0;
                float ca = 0.0f;
                /* every code but NaN dequantizes to a finite value */
                rc = moecal_fp8_dequant_bf16(scratch, nr, cols, scale + (r0 / block) * nbc,
                                             block, b, &nn, &ca);
                if (rc != MOECAL_OK)
                    goto out;
                nonfinite += nn;
                fmx = ca > fmx ? ca : fmx;
                if (of)
                    for (size_t i = 0; i < cn; i++)
                        of[i] = moecal_bf16_to_float(b[i]);
                break;
            }
            case MOECAL_DT_BF16: { /* to float32 */
                const uint16_t *s = scratch;
                uint16_t cm = bf16_scan(s, cn, &nonfinite);
                mx = cm > mx ? cm : mx;
                for (size_t i = 0; i < cn; i++)
                    of[i] = moecal_bf16_to_float(s[i]);
                break;
            }
            case MOECAL_DT_F16: {
                const uint16_t *s = scratch;
                for (size_t i = 0; i < cn; i++) {
                    float x = moecal_f16_to_float(s[i]);
                    if (ob)
                        ob[i] = moecal_float_to_bf16(x);
                    else
                        of[i] = x;
                }
                if (ob) {
                    uint16_t cm = bf16_scan(ob, cn, &nonfinite);
                    mx = cm > mx ? cm : mx;
                } else {
                    f32_scan(of, cn, &fmx, &nonfinite);
                }
                break;
            }
            default: { /* F32 to bf16 */
                const float *s = scratch;
                for (size_t i = 0; i < cn; i++)
                    ob[i] = moecal_float_to_bf16(s[i]);
                uint16_t cm = bf16_scan(ob, cn, &nonfinite);
                mx = cm > mx ? cm : mx;
                break;
            }
            }
        }
    }
check:
    if (nonfinite > 0) {
        rc = nan_error(&w, name, nonfinite, t->dtype == MOECAL_DT_F32 && kind == OUT_BF16);
        goto out;
    }
    if (amax)
        *amax = fmx > moecal_bf16_to_float(mx) ? fmx : moecal_bf16_to_float(mx);
out:
    free(scratch);
    free(scale);
    return rc;
}

static moecal_status expert_2d(moecal_model *m, int layer, int expert, int proj, char *name,
                               size_t *rows, size_t *cols, char *expect, size_t elen);

moecal_status moecal_model_load_expert(moecal_model *m, int layer, int expert, int proj,
                                       uint16_t *dst, float *amax)
{
    char name[NAME_MAX_LEN], expect[160];
    size_t rows, cols;

    MOECAL_TRY(expert_2d(m, layer, expert, proj, name, &rows, &cols, expect, sizeof expect));
    return load_2d(m, name, rows, cols, expect, OUT_BF16, dst, amax);
}

/* Name, shape and expectation text of an expert projection; checks indices. */
static moecal_status expert_2d(moecal_model *m, int layer, int expert, int proj, char *name,
                               size_t *rows, size_t *cols, char *expect, size_t elen)
{
    size_t H = (size_t)m->cfg.hidden_size, I = (size_t)m->cfg.moe_intermediate_size;
    bool down = proj == MOECAL_W2;

    if (proj < 0 || proj >= MOECAL_NPROJ)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: projection index %d", m->dir, proj);
    if (expert < 0 || expert >= m->cfg.n_routed_experts)
        return moecal_error_set(MOECAL_ERR_USAGE, "%s: expert %d of layer %d does not exist "
                                "(the model has %d routed experts)", m->dir, expert, layer,
                                m->cfg.n_routed_experts);
    MOECAL_TRY(check_layer(m, layer, "expert weights"));
    moecal_model_expert_name(m, layer, expert, proj, name, NAME_MAX_LEN);
    snprintf(expect, elen, "%s from %s: %s %zu, %s %zu",
             down ? "[hidden_size, moe_intermediate_size]"
                  : "[moe_intermediate_size, hidden_size]",
             m->cfg_path, down ? "hidden_size" : "moe_intermediate_size", down ? H : I,
             down ? "moe_intermediate_size" : "hidden_size", down ? I : H);
    *rows = down ? H : I;
    *cols = down ? I : H;
    return MOECAL_OK;
}

/* An expert projection opened: name, shape, expectation text and the tensor
 * with its checked block scales (x->w.scale: free() it). */
typedef struct expert_tensor {
    char name[NAME_MAX_LEN], expect[160];
    size_t rows, cols;
    tensor_2d w;
} expert_tensor;

static moecal_status open_expert(moecal_model *m, int layer, int expert, int proj,
                                 expert_tensor *x)
{
    MOECAL_TRY(expert_2d(m, layer, expert, proj, x->name, &x->rows, &x->cols, x->expect,
                         sizeof x->expect));
    return open_2d(m, x->name, x->rows, x->cols, x->expect, &x->w);
}

moecal_status moecal_model_load_expert_fp8(moecal_model *m, int layer, int expert, int proj,
                                           uint8_t *q, float *scale_inv, float *amax)
{
    expert_tensor x;
    const tensor_2d *w = &x.w;
    uint64_t nn = 0;
    moecal_status rc;

    MOECAL_TRY(open_expert(m, layer, expert, proj, &x));
    if (w->t->dtype != MOECAL_DT_F8_E4M3)
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED, "%s: tensor '%s' is %s, not F8_E4M3",
                                moecal_st_path(w->f), x.name, w->t->dtype_name);
    rc = moecal_st_read(w->f, w->t, q, x.rows * x.cols);
    if (rc == MOECAL_OK)
        rc = moecal_fp8_block_amax(q, x.rows, x.cols, w->scale, w->block, &nn, amax);
    if (rc == MOECAL_OK && nn > 0)
        rc = nan_error(w, x.name, nn, false);
    if (rc == MOECAL_OK)
        memcpy(scale_inv, w->scale, w->nbr * w->nbc * sizeof *scale_inv);
    free(w->scale);
    return rc;
}

moecal_status moecal_model_read_expert_raw(moecal_model *m, int layer, int expert, int proj,
                                           void *q, float *scale_inv, moecal_dtype *dtype)
{
    expert_tensor x;
    const tensor_2d *w = &x.w;
    moecal_status rc = MOECAL_OK;

    MOECAL_TRY(open_expert(m, layer, expert, proj, &x));
    *dtype = w->t->dtype;
    if (w->t->dtype == MOECAL_DT_F8_E4M3 || w->t->dtype == MOECAL_DT_BF16)
        rc = moecal_st_read(w->f, w->t, q, x.rows * x.cols * moecal_dtype_size(w->t->dtype));
    if (rc == MOECAL_OK && w->scale)
        memcpy(scale_inv, w->scale, w->nbr * w->nbc * sizeof *scale_inv);
    free(w->scale);
    return rc;
}

moecal_status moecal_model_expert_amax(moecal_model *m, int layer, int expert, int proj,
                                       float *amax)
{
    expert_tensor x;
    moecal_status rc = MOECAL_OK;

    MOECAL_TRY(open_expert(m, layer, expert, proj, &x));
    const char *name = x.name, *expect = x.expect;
    const size_t rows = x.rows, cols = x.cols;
    tensor_2d w = x.w;
    if (w.t->dtype != MOECAL_DT_F8_E4M3) {
        /* other dtypes: convert as for the backend, then scan */
        uint16_t *tmp = malloc((rows * cols > 0 ? rows * cols : 1) * sizeof *tmp);
        if (tmp == NULL)
            return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory for '%s'",
                                    moecal_st_path(w.f), name);
        rc = load_2d(m, name, rows, cols, expect, OUT_BF16, tmp, amax);
        free(tmp);
        return rc;
    }
    /* FP8: the codes only, in chunks of whole block rows */
    size_t chunk_rows = CHUNK_BYTES / (w.block * cols) * w.block;
    uint64_t nn = 0;
    float mx = 0.0f;
    uint8_t *scratch;
    if (chunk_rows == 0)
        chunk_rows = w.block;
    if (chunk_rows > rows)
        chunk_rows = rows;
    scratch = malloc(chunk_rows * cols > 0 ? chunk_rows * cols : 1);
    if (scratch == NULL) {
        free(w.scale);
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory for '%s'",
                                moecal_st_path(w.f), name);
    }
    for (size_t r0 = 0; r0 < rows && rc == MOECAL_OK; r0 += chunk_rows) {
        size_t nr = rows - r0 < chunk_rows ? rows - r0 : chunk_rows;
        uint64_t cn = 0;
        float ca = 0.0f;
        rc = moecal_st_read_range(w.f, w.t, (uint64_t)r0 * cols, scratch, nr * cols);
        if (rc == MOECAL_OK)
            rc = moecal_fp8_block_amax(scratch, nr, cols, w.scale + (r0 / w.block) * w.nbc,
                                       w.block, &cn, &ca);
        nn += cn;
        mx = ca > mx ? ca : mx;
    }
    if (rc == MOECAL_OK && nn > 0)
        rc = nan_error(&w, name, nn, false);
    if (rc == MOECAL_OK && amax)
        *amax = mx;
    free(scratch);
    free(w.scale);
    return rc;
}

moecal_status moecal_model_load_gate(moecal_model *m, int layer, float *weight, float *bias)
{
    char name[NAME_MAX_LEN], expect[160];
    size_t E = (size_t)m->cfg.n_routed_experts, H = (size_t)m->cfg.hidden_size;
    const moecal_st_file *f;
    const moecal_st_tensor *t;
    moecal_status rc;

    if ((bias != NULL) != m->cfg.has_correction_bias)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: router bias buffer %s, but the "
                                "model %s e_score_correction_bias", m->dir,
                                bias ? "given" : "missing",
                                m->cfg.has_correction_bias ? "has" : "has no");
    MOECAL_TRY(check_layer(m, layer, "router"));
    gate_name(m, layer, "weight", name, sizeof name);
    snprintf(expect, sizeof expect, "[n_routed_experts, hidden_size] from %s: %zu, %zu",
             m->cfg_path, E, H);
    MOECAL_TRY(load_2d(m, name, E, H, expect, OUT_F32, weight, NULL));
    if (bias == NULL)
        return MOECAL_OK;

    gate_name(m, layer, "e_score_correction_bias", name, sizeof name);
    MOECAL_TRY(moecal_model_find(m, name, &f, &t));
    if (t->ndim != 1 || (uint64_t)t->shape[0] != E) {
        char shp[96];
        fmt_shape(shp, sizeof shp, t);
        return moecal_error_set(MOECAL_ERR_MISMATCH, "%s: tensor '%s' has shape %s but [%zu] "
                                "was expected (n_routed_experts from %s)", moecal_st_path(f),
                                name, shp, E, m->cfg_path);
    }
    if (t->dtype == MOECAL_DT_F32) {
        rc = moecal_st_read(f, t, bias, E * sizeof *bias);
    } else if (t->dtype == MOECAL_DT_BF16 || t->dtype == MOECAL_DT_F16) {
        uint16_t *tmp = malloc(E * sizeof *tmp);
        if (tmp == NULL)
            return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", m->dir);
        rc = moecal_st_read(f, t, tmp, E * sizeof *tmp);
        for (size_t i = 0; rc == MOECAL_OK && i < E; i++)
            bias[i] = t->dtype == MOECAL_DT_BF16 ? moecal_bf16_to_float(tmp[i])
                                                 : moecal_f16_to_float(tmp[i]);
        free(tmp);
    } else {
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s; it must "
                                "be F32, BF16 or F16", moecal_st_path(f), name, t->dtype_name);
    }
    if (rc != MOECAL_OK)
        return rc;
    for (size_t i = 0; i < E; i++)
        if (!isfinite(bias[i]))
            return moecal_error_set(MOECAL_ERR_NONFINITE, "%s: tensor '%s' holds a NaN or Inf "
                                    "at expert %zu", moecal_st_path(f), name, i);
    return MOECAL_OK;
}

/* The bytes of tensor name, plus those of name_scale_inv when it exists. */
static moecal_status tensor_bytes(moecal_model *m, const char *name, bool with_scale,
                                  uint64_t *bytes)
{
    const moecal_st_file *f;
    const moecal_st_tensor *t;
    char sname[NAME_MAX_LEN];

    MOECAL_TRY(moecal_model_find(m, name, &f, &t));
    *bytes += t->end - t->begin;
    if (!with_scale || t->dtype != MOECAL_DT_F8_E4M3)
        return MOECAL_OK;
    snprintf(sname, sizeof sname, "%s_scale_inv", name);
    MOECAL_TRY(moecal_model_find(m, sname, &f, &t));
    *bytes += t->end - t->begin;
    return MOECAL_OK;
}

moecal_status moecal_model_layer_bytes(moecal_model *m, int layer, int e0, int e1,
                                       uint64_t *router, uint64_t *experts)
{
    char name[NAME_MAX_LEN];
    static const int projs[3] = {MOECAL_W1, MOECAL_W2, MOECAL_W3};

    *router = *experts = 0;
    gate_name(m, layer, "weight", name, sizeof name);
    MOECAL_TRY(tensor_bytes(m, name, false, router));
    if (m->cfg.has_correction_bias) {
        gate_name(m, layer, "e_score_correction_bias", name, sizeof name);
        MOECAL_TRY(tensor_bytes(m, name, false, router));
    }
    for (int e = e0; e < e1; e++)
        for (int p = 0; p < 3; p++) {
            moecal_model_expert_name(m, layer, e, projs[p], name, sizeof name);
            MOECAL_TRY(tensor_bytes(m, name, true, experts));
        }
    return MOECAL_OK;
}
