/* synth.c - synthetic checkpoints and activations; see synth.h. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "activations.h"
#include "fp8.h"
#include "runtime.h"
#include "safetensors.h"
#include "synth.h"

/* ---------------------------------------------------------------- numbers */

static uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* A stream keyed by (seed, a, b, c, d): independent of evaluation order. */
typedef struct rng {
    uint64_t s;
} rng;

static rng rng_at(uint64_t seed, uint64_t a, uint64_t b, uint64_t c, uint64_t d)
{
    rng r = {mix64(seed ^ mix64(a ^ mix64(b ^ mix64(c ^ mix64(d)))))};
    return r;
}

static double uniform(rng *r)
{
    r->s = mix64(r->s);
    return ((double)(r->s >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static double normal(rng *r)
{
    double u = uniform(r), v = uniform(r);
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

enum { TAG_WEIGHT = 1, TAG_ROWSCALE, TAG_GATE, TAG_BIAS, TAG_ACT, TAG_TOKSCALE, TAG_MODEL };

/* ---------------------------------------------------------------- parameters */

moecal_status moecal_synth_preset_params(const char *preset, moecal_synth_params *p)
{
    memset(p, 0, sizeof *p);
    snprintf(p->preset, sizeof p->preset, "%s", preset);
    p->seed = 1;
    p->fp8 = 1;
    p->act_dtype = MOECAL_DT_BF16;
    p->shard_size = 4ULL << 30;
    p->outliers = 4;
    if (strcmp(preset, "demo") == 0) {
        p->num_layers = 4; p->first_dense = 1;
        p->experts = 32; p->topk = 4; p->n_group = 4; p->topk_group = 2;
        p->hidden = 512; p->intermediate = 256; p->tokens = 4096; p->never_routed = 2;
        p->shard_size = 16ULL << 20;
    } else if (strcmp(preset, "tiny") == 0) {
        p->num_layers = 2; p->first_dense = 1;
        p->experts = 8; p->topk = 2; p->n_group = 2; p->topk_group = 1;
        p->hidden = 160; p->intermediate = 96; p->tokens = 256; p->never_routed = 1;
        p->outliers = 2;
    } else if (strcmp(preset, "deepseek-v3-layer") == 0) {
        p->num_layers = 4; p->first_dense = 3;
        p->experts = 256; p->topk = 8; p->n_group = 8; p->topk_group = 4;
        p->hidden = 7168; p->intermediate = 2048; p->tokens = 32768; p->never_routed = 8;
    } else {
        return moecal_error_set(MOECAL_ERR_USAGE, "option 'preset': unknown preset '%s' "
                                "(demo, tiny, deepseek-v3-layer)", preset);
    }
    return MOECAL_OK;
}

/* Never-routed experts of a layer: spread over the groups, one group after
 * another, deterministic from the seed. */
static int is_never(const moecal_synth_params *p, int layer, int e)
{
    int per = p->experts / p->n_group;
    for (int i = 0; i < p->never_routed; i++) {
        int g = i % p->n_group, slot = i / p->n_group;
        int off = (int)(mix64(p->seed ^ (uint64_t)(layer * 131 + g)) % (uint64_t)per);
        if (e == g * per + (off + slot) % per)
            return 1;
    }
    return 0;
}

moecal_status moecal_synth_check(const moecal_synth_params *p)
{
    int per;
    if (p->num_layers < 1 || p->first_dense < 0 || p->first_dense >= p->num_layers)
        return moecal_error_set(MOECAL_ERR_USAGE, "synth: need 0 <= first-dense (%d) < layers (%d)",
                                p->first_dense, p->num_layers);
    if (p->experts < 1 || p->n_group < 1 || p->experts % p->n_group != 0)
        return moecal_error_set(MOECAL_ERR_USAGE, "synth: experts (%d) must be a positive "
                                "multiple of groups (%d)", p->experts, p->n_group);
    if (p->topk_group < 1 || p->topk_group > p->n_group)
        return moecal_error_set(MOECAL_ERR_USAGE, "synth: topk-groups (%d) must be between 1 "
                                "and groups (%d)", p->topk_group, p->n_group);
    per = p->experts / p->n_group;
    if (p->n_group > 1 && per < 2)
        return moecal_error_set(MOECAL_ERR_USAGE, "synth: groups of DeepSeek-V3 routing need "
                                "at least 2 experts each (experts %d, groups %d)",
                                p->experts, p->n_group);
    if (p->never_routed < 0 || p->never_routed >= p->experts)
        return moecal_error_set(MOECAL_ERR_USAGE, "synth: never-routed (%d) must be between 0 "
                                "and experts - 1", p->never_routed);
    /* The kept groups must hold k routable experts, or never-routed ones
     * would fill the top-k. */
    {
        int worst = per - (p->never_routed + p->n_group - 1) / p->n_group;
        if (p->topk < 1 || p->topk > p->topk_group * worst)
            return moecal_error_set(MOECAL_ERR_USAGE, "synth: topk (%d) must be between 1 and "
                                    "%d (topk-groups x routable experts per group)", p->topk,
                                    p->topk_group * worst);
    }
    if (p->hidden < 1 || p->intermediate < 1 || p->tokens < 1)
        return moecal_error_set(MOECAL_ERR_USAGE, "synth: hidden, intermediate and tokens must "
                                "be positive");
    if (p->outliers < 0 || p->outliers > p->hidden || p->outliers > 64)
        return moecal_error_set(MOECAL_ERR_USAGE, "synth: outliers must be between 0 and "
                                "min(64, hidden)");
    return MOECAL_OK;
}

/* ---------------------------------------------------------------- tensors */

typedef struct tensor_plan {
    char name[160];
    moecal_dtype dtype;
    int ndim;
    int64_t shape[2];
    int kind;                  /* 0 gate, 1 bias, 2 expert weight, 3 expert scale */
    int layer, expert, proj;
    int shard;
    uint64_t bytes;
} tensor_plan;

static const char *const proj_hf[3] = {"gate_proj", "down_proj", "up_proj"};

/* Expert weight as float: N(0, 0.02) with a per-row scale spread and rare
 * larger entries. */
static void gen_weight(const moecal_synth_params *p, int layer, int e, int proj, float *w,
                       int64_t rows, int64_t cols)
{
    for (int64_t r = 0; r < rows; r++) {
        rng g = rng_at(p->seed, TAG_ROWSCALE, (uint64_t)layer, (uint64_t)(e * 3 + proj),
                       (uint64_t)r);
        double rs = 0.02 * exp(0.3 * normal(&g));
        rng x = rng_at(p->seed, TAG_WEIGHT, (uint64_t)layer, (uint64_t)(e * 3 + proj),
                       (uint64_t)r);
        for (int64_t c = 0; c < cols; c++) {
            double v = rs * normal(&x);
            if (uniform(&x) < 1e-3)
                v *= 6.0;
            w[r * cols + c] = (float)v;
        }
    }
}

/* The massive-outlier channels of the model and their magnitudes. */
static void pick_outliers(const moecal_synth_params *p, int *outlier, float *mag)
{
    for (int o = 0; o < p->outliers; o++) {
        rng g = rng_at(p->seed, TAG_MODEL, (uint64_t)o, 0, 0);
        int c, dup;
        do {
            c = (int)(uniform(&g) * p->hidden);
            dup = 0;
            for (int k = 0; k < o; k++)
                dup |= outlier[k] == c;
        } while (dup);
        outlier[o] = c;
        mag[o] = (float)(50.0 + 150.0 * uniform(&g));
    }
}

/* Router: random gate rows; the bias skews popularity (Zipf-like over a
 * seeded order) and shuts never-routed experts out. */
static void gen_gate(const moecal_synth_params *p, int layer, float *gate, float *bias,
                     const int *outlier)
{
    int E = p->experts, H = p->hidden;
    /* Logits of about unit scale; like trained routers, the gate nearly
     * ignores the massive-outlier channels. */
    for (int e = 0; e < E; e++) {
        rng g = rng_at(p->seed, TAG_GATE, (uint64_t)layer, (uint64_t)e, 0);
        for (int c = 0; c < H; c++)
            gate[(size_t)e * H + c] = (float)(0.7 * normal(&g) / sqrt((double)H));
        for (int o = 0; o < p->outliers; o++)
            gate[(size_t)e * H + outlier[o]] *= 0.002f;
    }
    for (int e = 0; e < E; e++) {
        rng b = rng_at(p->seed, TAG_BIAS, (uint64_t)layer, (uint64_t)e, 0);
        double rank = 1.0 + (double)(mix64(p->seed ^ (uint64_t)(layer * 7919 + e)) % (uint64_t)E);
        double v = 0.15 - 0.06 * log(rank) + 0.01 * normal(&b);
        bias[e] = is_never(p, layer, e) ? -4.0f : (float)v;
    }
}

/* Activations of one layer, rows [r0, r0 + n). */
static void gen_act(const moecal_synth_params *p, int layer, int64_t r0, int64_t n, float *x,
                    const int *outlier, const float *outlier_mag)
{
    int H = p->hidden;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        int64_t t = r0 + i;
        rng s = rng_at(p->seed, TAG_TOKSCALE, (uint64_t)layer, (uint64_t)t, 0);
        double scale = exp(0.5 * normal(&s));
        rng g = rng_at(p->seed, TAG_ACT, (uint64_t)layer, (uint64_t)t, 0);
        float *row = x + (size_t)i * (size_t)H;
        for (int c = 0; c < H; c++) {
            double v = scale * normal(&g);
            if (uniform(&g) < 2e-3)
                v *= 8.0;   /* heavy tail */
            row[c] = (float)v;
        }
        for (int o = 0; o < p->outliers; o++)
            row[outlier[o]] = (float)(outlier_mag[o] * scale * (0.8 + 0.4 * uniform(&g)));
    }
}

/* ---------------------------------------------------------------- files */

static moecal_status prepare_dir(const char *dir, int force)
{
    struct stat st;
    DIR *d;
    struct dirent *de;
    int empty = 1;

    if (stat(dir, &st) != 0) {
        if (mkdir(dir, 0755) != 0)
            return moecal_error_errno(errno, "%s: cannot create the output directory", dir);
        return MOECAL_OK;
    }
    if (!S_ISDIR(st.st_mode))
        return moecal_error_set(MOECAL_ERR_EXISTS, "%s exists and is not a directory", dir);
    d = opendir(dir);
    if (!d)
        return moecal_error_errno(errno, "%s: cannot read the directory", dir);
    while ((de = readdir(d)) != NULL)
        if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
            empty = 0;
    closedir(d);
    if (!empty && !force)
        return moecal_error_set(MOECAL_ERR_EXISTS, "%s is not empty; use --force to write "
                                "into it", dir);
    return MOECAL_OK;
}

static moecal_status write_json(const char *path, json_t *j)
{
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    if (json_dump_file(j, tmp, JSON_INDENT(2) | JSON_SORT_KEYS) != 0)
        return moecal_error_set(MOECAL_ERR_IO, "%s: cannot write", tmp);
    if (rename(tmp, path) != 0)
        return moecal_error_errno(errno, "%s: rename failed", path);
    return MOECAL_OK;
}

static json_t *config_json(const moecal_synth_params *p)
{
    json_t *c = json_object(), *arch = json_array(), *q;

    json_array_append_new(arch, json_string("DeepseekV3ForCausalLM"));
    json_object_set_new(c, "architectures", arch);
    json_object_set_new(c, "model_type", json_string("deepseek_v3"));
    json_object_set_new(c, "hidden_size", json_integer(p->hidden));
    json_object_set_new(c, "intermediate_size", json_integer(4 * p->intermediate));
    json_object_set_new(c, "moe_intermediate_size", json_integer(p->intermediate));
    json_object_set_new(c, "num_hidden_layers", json_integer(p->num_layers));
    json_object_set_new(c, "first_k_dense_replace", json_integer(p->first_dense));
    json_object_set_new(c, "moe_layer_freq", json_integer(1));
    json_object_set_new(c, "n_routed_experts", json_integer(p->experts));
    json_object_set_new(c, "n_shared_experts", json_integer(1));
    json_object_set_new(c, "num_experts_per_tok", json_integer(p->topk));
    json_object_set_new(c, "n_group", json_integer(p->n_group));
    json_object_set_new(c, "topk_group", json_integer(p->topk_group));
    json_object_set_new(c, "routed_scaling_factor", json_real(2.5));
    json_object_set_new(c, "norm_topk_prob", json_true());
    json_object_set_new(c, "scoring_func", json_string("sigmoid"));
    json_object_set_new(c, "topk_method", json_string("noaux_tc"));
    json_object_set_new(c, "num_attention_heads", json_integer(8));
    json_object_set_new(c, "vocab_size", json_integer(1024));
    json_object_set_new(c, "torch_dtype", json_string("bfloat16"));
    if (p->fp8) {
        json_t *bs = json_array();
        q = json_object();
        json_object_set_new(q, "activation_scheme", json_string("dynamic"));
        json_object_set_new(q, "fmt", json_string("e4m3"));
        json_object_set_new(q, "quant_method", json_string("fp8"));
        json_array_append_new(bs, json_integer(128));
        json_array_append_new(bs, json_integer(128));
        json_object_set_new(q, "weight_block_size", bs);
        json_object_set_new(c, "quantization_config", q);
    }
    return c;
}

/* Plan every tensor and its shard. */
static moecal_status plan(const moecal_synth_params *p, tensor_plan **out, int *n_out,
                          int *nshards)
{
    int nmoe = p->num_layers - p->first_dense, E = p->experts;
    int per_layer = 2 + E * 3 * (p->fp8 ? 2 : 1), n = 0, shard = 0;
    int64_t H = p->hidden, I = p->intermediate, bi = (I + 127) / 128, bh = (H + 127) / 128;
    uint64_t used = 0;
    tensor_plan *t = calloc((size_t)nmoe * (size_t)per_layer, sizeof *t);

    if (!t)
        return moecal_error_set(MOECAL_ERR_NOMEM, "synth: out of memory");
    for (int l = p->first_dense; l < p->num_layers; l++) {
        tensor_plan *g = &t[n++], *b = &t[n++];
        snprintf(g->name, sizeof g->name, "model.layers.%d.mlp.gate.weight", l);
        g->dtype = MOECAL_DT_BF16; g->ndim = 2; g->shape[0] = E; g->shape[1] = H;
        g->kind = 0; g->layer = l;
        snprintf(b->name, sizeof b->name, "model.layers.%d.mlp.gate.e_score_correction_bias", l);
        b->dtype = MOECAL_DT_F32; b->ndim = 1; b->shape[0] = E; b->kind = 1; b->layer = l;
        for (int e = 0; e < E; e++)
            for (int q = 0; q < 3; q++) {
                tensor_plan *w = &t[n++];
                int64_t rows = q == 1 ? H : I, cols = q == 1 ? I : H;
                snprintf(w->name, sizeof w->name, "model.layers.%d.mlp.experts.%d.%s.weight", l, e,
                         proj_hf[q]);
                w->dtype = p->fp8 ? MOECAL_DT_F8_E4M3 : MOECAL_DT_BF16;
                w->ndim = 2; w->shape[0] = rows; w->shape[1] = cols;
                w->kind = 2; w->layer = l; w->expert = e; w->proj = q;
                if (p->fp8) {
                    tensor_plan *s = &t[n++];
                    snprintf(s->name, sizeof s->name,
                             "model.layers.%d.mlp.experts.%d.%s.weight_scale_inv", l, e, proj_hf[q]);
                    s->dtype = MOECAL_DT_F32; s->ndim = 2;
                    s->shape[0] = q == 1 ? bh : bi; s->shape[1] = q == 1 ? bi : bh;
                    s->kind = 3; s->layer = l; s->expert = e; s->proj = q;
                }
            }
    }
    for (int i = 0; i < n; i++) {
        t[i].bytes = (uint64_t)t[i].shape[0] * (uint64_t)(t[i].ndim > 1 ? t[i].shape[1] : 1) *
                     moecal_dtype_size(t[i].dtype);
        /* An expert's weight and its scale stay in one shard. */
        if (used > 0 && used + t[i].bytes > p->shard_size && t[i].kind != 3) {
            shard++;
            used = 0;
        }
        t[i].shard = shard;
        used += t[i].bytes;
    }
    *out = t;
    *n_out = n;
    *nshards = shard + 1;
    return MOECAL_OK;
}

static moecal_status write_shard(const char *dir, const moecal_synth_params *p,
                                 const tensor_plan *t, int n, int shard, int nshards,
                                 const char *fname)
{
    char path[4200];
    moecal_st_writer *w = NULL;
    moecal_status s = MOECAL_OK;
    int64_t H = p->hidden, I = p->intermediate;
    size_t wmax = (size_t)H * (size_t)I;
    (void)nshards;

    snprintf(path, sizeof path, "%s/%s", dir, fname);
    MOECAL_TRY(moecal_st_writer_create(path, &w));
    s = moecal_st_writer_metadata(w, "format", "pt");
    for (int i = 0; i < n && s == MOECAL_OK; i++)
        if (t[i].shard == shard)
            s = moecal_st_writer_add(w, t[i].name, t[i].dtype, t[i].ndim, t[i].shape);
    if (s == MOECAL_OK)
        s = moecal_st_writer_write_header(w);

    /* Router tensors. */
    for (int i = 0; i < n && s == MOECAL_OK; i++) {
        if (t[i].shard != shard || t[i].kind != 0)
            continue;
        {
            float *gate = malloc((size_t)p->experts * (size_t)H * sizeof *gate);
            float *bias = malloc((size_t)p->experts * sizeof *bias);
            uint16_t *gb = malloc((size_t)p->experts * (size_t)H * sizeof *gb);
            if (!gate || !bias || !gb) {
                s = moecal_error_set(MOECAL_ERR_NOMEM, "synth: out of memory");
            } else {
                int outl[64];
                float mag[64];
                pick_outliers(p, outl, mag);
                gen_gate(p, t[i].layer, gate, bias, outl);
                for (size_t k = 0; k < (size_t)p->experts * (size_t)H; k++)
                    gb[k] = moecal_float_to_bf16(gate[k]);
                s = moecal_st_writer_write(w, t[i].name, gb, t[i].bytes);
                for (int j = 0; j < n && s == MOECAL_OK; j++)
                    if (t[j].kind == 1 && t[j].layer == t[i].layer) {
                        if (t[j].shard != shard)
                            s = moecal_error_set(MOECAL_ERR_INTERNAL, "synth: bias not beside gate");
                        else
                            s = moecal_st_writer_write(w, t[j].name, bias, t[j].bytes);
                    }
            }
            free(gate);
            free(bias);
            free(gb);
        }
    }

    /* Expert weights, in parallel; each task generates, quantizes and writes
     * one weight (and its scale). */
#pragma omp parallel
    {
        float *fw = malloc(wmax * sizeof *fw);
        uint8_t *q8 = malloc(wmax);
        uint16_t *b16 = malloc(wmax * sizeof *b16);
        float *sc = malloc((size_t)((H + 127) / 128) * (size_t)((I + 127) / 128) * sizeof *sc);
        int ok = fw && q8 && b16 && sc;

        if (!ok) {
#pragma omp critical(synth_err)
            s = moecal_error_set(MOECAL_ERR_NOMEM, "synth: out of memory");
        }
#pragma omp for schedule(dynamic)
        for (int i = 0; i < n; i++) {
            moecal_status ls = MOECAL_OK;
            int64_t rows, cols;
            if (!ok || t[i].shard != shard || t[i].kind != 2)
                continue;
            rows = t[i].shape[0];
            cols = t[i].shape[1];
            gen_weight(p, t[i].layer, t[i].expert, t[i].proj, fw, rows, cols);
            if (p->fp8)
                moecal_fp8_quant_block(fw, (size_t)rows, (size_t)cols, 128, q8, sc);
            else
                for (int64_t k = 0; k < rows * cols; k++)
                    b16[k] = moecal_float_to_bf16(fw[k]);
#pragma omp critical(synth_write)
            {
                ls = moecal_st_writer_write(w, t[i].name, p->fp8 ? (void *)q8 : (void *)b16,
                                            t[i].bytes);
                if (ls == MOECAL_OK && p->fp8)
                    ls = moecal_st_writer_write(w, t[i + 1].name, sc, t[i + 1].bytes);
                if (ls != MOECAL_OK && s == MOECAL_OK)
                    s = ls;
            }
        }
        free(fw);
        free(q8);
        free(b16);
        free(sc);
    }
    if (s == MOECAL_OK)
        return moecal_st_writer_finish(w);
    moecal_st_writer_abort(w);
    return s;
}

moecal_status moecal_synth_write(const char *dir, const moecal_synth_params *p, int force,
                                 int progress)
{
    tensor_plan *t = NULL;
    int n = 0, nshards = 0, nmoe = p->num_layers - p->first_dense;
    moecal_status s;
    char path[4200], fname[128];
    json_t *idx, *wm, *meta, *sj, *nv, *oc;
    uint64_t total = 0;
    int *layers = NULL, *outlier = NULL;
    float *outlier_mag = NULL, *x = NULL;
    moecal_act_writer *aw = NULL;
    double t0 = moecal_now();

    MOECAL_TRY(moecal_synth_check(p));
    MOECAL_TRY(prepare_dir(dir, force));
    snprintf(path, sizeof path, "%s/config.json", dir);
    {
        json_t *c = config_json(p);
        s = write_json(path, c);
        json_decref(c);
        MOECAL_TRY(s);
    }
    MOECAL_TRY(plan(p, &t, &n, &nshards));

    idx = json_object();
    wm = json_object();
    for (int sh = 0; sh < nshards; sh++) {
        snprintf(fname, sizeof fname, "model-%05d-of-%05d.safetensors", sh + 1, nshards);
        s = write_shard(dir, p, t, n, sh, nshards, fname);
        if (s != MOECAL_OK) {
            json_decref(idx);
            json_decref(wm);
            free(t);
            return s;
        }
        for (int i = 0; i < n; i++)
            if (t[i].shard == sh) {
                json_object_set_new(wm, t[i].name, json_string(fname));
                total += t[i].bytes;
            }
        if (progress)
            moecal_log(MOECAL_LOG_INFO, "moecal synth: shard %d/%d written (%.1fs)", sh + 1,
                       nshards, moecal_now() - t0);
    }
    meta = json_object();
    json_object_set_new(meta, "total_size", json_integer((json_int_t)total));
    json_object_set_new(idx, "metadata", meta);
    json_object_set_new(idx, "weight_map", wm);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    s = write_json(path, idx);
    json_decref(idx);
    free(t);
    MOECAL_TRY(s);

    /* Activations: the hidden states entering every MoE layer. */
    layers = calloc((size_t)nmoe, sizeof *layers);
    outlier = calloc((size_t)(p->outliers ? p->outliers : 1), sizeof *outlier);
    outlier_mag = calloc((size_t)(p->outliers ? p->outliers : 1), sizeof *outlier_mag);
    if (!layers || !outlier || !outlier_mag) {
        s = moecal_error_set(MOECAL_ERR_NOMEM, "synth: out of memory");
        goto out;
    }
    for (int l = 0; l < nmoe; l++)
        layers[l] = p->first_dense + l;
    pick_outliers(p, outlier, outlier_mag);
    snprintf(path, sizeof path, "%s/activations.h5", dir);
    s = moecal_act_create(path, p->tokens, p->hidden, layers, nmoe, p->act_dtype, &aw);
    if (s != MOECAL_OK)
        goto out;
    {
        int64_t block = 4096;
        x = malloc((size_t)block * (size_t)p->hidden * sizeof *x);
        if (!x) {
            s = moecal_error_set(MOECAL_ERR_NOMEM, "synth: out of memory");
            goto out;
        }
        for (int l = 0; l < nmoe && s == MOECAL_OK; l++) {
            for (int64_t r0 = 0; r0 < p->tokens && s == MOECAL_OK; r0 += block) {
                int64_t nr = r0 + block > p->tokens ? p->tokens - r0 : block;
                gen_act(p, layers[l], r0, nr, x, outlier, outlier_mag);
                s = moecal_act_write_float(aw, layers[l], r0, nr, x);
            }
            if (progress)
                moecal_log(MOECAL_LOG_INFO, "moecal synth: activations of layer %d written (%.1fs)",
                           layers[l], moecal_now() - t0);
        }
    }
    if (s == MOECAL_OK) {
        s = moecal_act_writer_close(aw);
        aw = NULL;
    }
    if (s != MOECAL_OK)
        goto out;

    /* What was made, for tests and `moecal inspect`. */
    sj = json_object();
    json_object_set_new(sj, "preset", json_string(p->preset));
    json_object_set_new(sj, "seed", json_integer((json_int_t)p->seed));
    json_object_set_new(sj, "num_hidden_layers", json_integer(p->num_layers));
    json_object_set_new(sj, "first_k_dense_replace", json_integer(p->first_dense));
    json_object_set_new(sj, "n_routed_experts", json_integer(p->experts));
    json_object_set_new(sj, "num_experts_per_tok", json_integer(p->topk));
    json_object_set_new(sj, "n_group", json_integer(p->n_group));
    json_object_set_new(sj, "topk_group", json_integer(p->topk_group));
    json_object_set_new(sj, "hidden_size", json_integer(p->hidden));
    json_object_set_new(sj, "moe_intermediate_size", json_integer(p->intermediate));
    json_object_set_new(sj, "tokens", json_integer(p->tokens));
    json_object_set_new(sj, "dtype", json_string(p->fp8 ? "fp8" : "bf16"));
    json_object_set_new(sj, "act_dtype", json_string(moecal_dtype_name(p->act_dtype)));
    json_object_set_new(sj, "shards", json_integer(nshards));
    nv = json_object();
    for (int l = 0; l < nmoe; l++) {
        json_t *a = json_array();
        char key[16];
        for (int e = 0; e < p->experts; e++)
            if (is_never(p, layers[l], e))
                json_array_append_new(a, json_integer(e));
        snprintf(key, sizeof key, "%d", layers[l]);
        json_object_set_new(nv, key, a);
    }
    json_object_set_new(sj, "never_routed", nv);
    oc = json_array();
    for (int o = 0; o < p->outliers; o++)
        json_array_append_new(oc, json_integer(outlier[o]));
    json_object_set_new(sj, "outlier_channels", oc);
    snprintf(path, sizeof path, "%s/synth.json", dir);
    s = write_json(path, sj);
    json_decref(sj);

out:
    if (aw)
        moecal_act_writer_abort(aw);
    free(layers);
    free(outlier);
    free(outlier_mag);
    free(x);
    return s;
}

moecal_status moecal_synth_preset(const char *dir, const char *preset)
{
    moecal_synth_params p;
    MOECAL_TRY(moecal_synth_preset_params(preset, &p));
    return moecal_synth_write(dir, &p, 0, 1);
}
