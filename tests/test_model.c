/* test_model.c - unit tests of checkpoint directories (model.c).
 *
 * Each test writes a small checkpoint into a fresh temporary directory with
 * the safetensors writer and a config.json, then opens it.  Tensor contents
 * come from a hash of (name, index), so expected values are recomputed here
 * from the definitions (e4m3 fields, round-to-nearest-even by rint) rather
 * than taken from fp8.c.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fp8.h"
#include "model.h"

/* ------------------------------------------------------------------ data */

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint64_t hash(const char *name, uint64_t i)
{
    uint64_t h = 1469598103934665603ull;
    for (const char *p = name; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ull;
    return mix(h + i);
}

/* e4m3fn code i of tensor `name`, never NaN */
static uint8_t gen_code(const char *name, uint64_t i)
{
    uint8_t c = (uint8_t)hash(name, i);
    return (c & 0x7f) == 0x7f ? c ^ 1 : c;
}

static float gen_scale(const char *name, uint64_t i)
{
    uint64_t h = hash(name, i);
    return ldexpf(1.0f + (float)(h % 1000) / 1000.0f, (int)((h >> 10) % 8) - 10);
}

/* A value exact in bf16 and f16: k * 2^-j, |k| < 128. */
static float gen_exact(const char *name, uint64_t i)
{
    uint64_t h = hash(name, i);
    return ldexpf((float)((int)(h % 255) - 127), -(int)((h >> 8) % 8));
}

/* Any finite float of moderate size. */
static float gen_f32(const char *name, uint64_t i)
{
    uint64_t h = hash(name, i);
    return ((float)(h % 2000001) - 1000000.0f) / 7919.0f;
}

static double ref_e4m3(uint8_t q)
{
    unsigned e = (q >> 3) & 15, m = q & 7;
    double v = e == 0 ? ldexp(m / 8.0, -6) : ldexp(1.0 + m / 8.0, (int)e - 7);
    return (q & 0x80) ? -v : v;
}

/* Nearest bf16 of a normal float, ties to even, by rint on 8 significant bits. */
static float ref_bf16(float x)
{
    int e;
    double m;
    if (x == 0.0f)
        return x;
    m = frexp((double)x, &e);
    return (float)ldexp(rint(ldexp(m, 8)), e - 8);
}

static float bf16f(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint16_t bf16_of_exact(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    assert_true((u & 0xffff) == 0);
    return (uint16_t)(u >> 16);
}

/* f16 bits of a value k * 2^-j as gen_exact makes them. */
static uint16_t f16_of_exact(float f)
{
    uint16_t s = signbit(f) ? 0x8000 : 0;
    int e;
    double m;
    if (f == 0.0f)
        return s;
    m = frexp(fabs((double)f), &e);            /* f = m * 2^e, m in [0.5, 1) */
    return (uint16_t)(s | ((uint16_t)(e - 1 + 15) << 10) |
                      (uint16_t)((uint32_t)ldexp(m * 2.0 - 1.0, 10) & 0x3ff));
}

/* ------------------------------------------------------------------ checkpoints */

typedef struct spec {
    char name[128];
    moecal_dtype dt;
    int ndim;
    int64_t shape[2];
    int shard;
} spec;

typedef struct ckpt {
    spec t[160];
    int n;
} ckpt;

static spec *add(ckpt *c, const char *name, moecal_dtype dt, int ndim, int64_t r, int64_t k,
                 int shard)
{
    spec *s = &c->t[c->n++];
    assert_true(c->n <= (int)(sizeof c->t / sizeof c->t[0]));
    snprintf(s->name, sizeof s->name, "%s", name);
    s->dt = dt;
    s->ndim = ndim;
    s->shape[0] = r;
    s->shape[1] = k;
    s->shard = shard;
    return s;
}

static spec *find_spec(ckpt *c, const char *name)
{
    for (int i = 0; i < c->n; i++)
        if (strcmp(c->t[i].name, name) == 0)
            return &c->t[i];
    fail_msg("no spec '%s'", name);
    return NULL;
}

static void drop_spec(ckpt *c, const char *name)
{
    spec *s = find_spec(c, name);
    *s = c->t[--c->n];
}

/* Bytes of a tensor as the generators define them. */
static void *fill(const spec *s, size_t *nbytes)
{
    size_t n = (size_t)s->shape[0] * (s->ndim == 2 ? (size_t)s->shape[1] : 1);
    size_t es = moecal_dtype_size(s->dt);
    unsigned char *p = malloc(n * es + 1);

    assert_non_null(p);
    *nbytes = n * es;
    for (size_t i = 0; i < n; i++) {
        switch (s->dt) {
        case MOECAL_DT_F8_E4M3:
            p[i] = gen_code(s->name, i);
            break;
        case MOECAL_DT_BF16: {
            uint16_t b = bf16_of_exact(gen_exact(s->name, i));
            memcpy(p + 2 * i, &b, 2);
            break;
        }
        case MOECAL_DT_F16: {
            uint16_t h = f16_of_exact(gen_exact(s->name, i));
            memcpy(p + 2 * i, &h, 2);
            break;
        }
        case MOECAL_DT_F32: {
            float f = strstr(s->name, "scale_inv") ? gen_scale(s->name, i) : gen_f32(s->name, i);
            memcpy(p + 4 * i, &f, 4);
            break;
        }
        default:
            memset(p + es * i, 0, es);
            break;
        }
    }
    return p;
}

static char tmpdir[4096];

static void make_tmpdir(void)
{
    const char *base = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/moecal-test-model-XXXXXX", base ? base : "/tmp");
    assert_non_null(mkdtemp(tmpdir));
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static void remove_tmpdir(void)
{
    nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

static void write_text(const char *name, const char *text)
{
    char path[4200];
    FILE *f;
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
}

static void shard_file_name(int s, int nshards, char *buf, size_t n)
{
    if (nshards == 0)
        snprintf(buf, n, "model.safetensors");
    else
        snprintf(buf, n, "model-%05d-of-%05d.safetensors", s + 1, nshards);
}

/* Write the shards (nshards 0: one model.safetensors) and, when sharded, an
 * index listing every tensor plus `extra` raw weight_map entries. */
static void write_ckpt(const ckpt *c, int nshards, const char *extra)
{
    int ns = nshards ? nshards : 1;
    char fname[64], path[4200];

    for (int s = 0; s < ns; s++) {
        moecal_st_writer *w;
        shard_file_name(s, nshards, fname, sizeof fname);
        snprintf(path, sizeof path, "%s/%s", tmpdir, fname);
        assert_int_equal(moecal_st_writer_create(path, &w), MOECAL_OK);
        for (int i = 0; i < c->n; i++)
            if (nshards == 0 || c->t[i].shard == s)
                assert_int_equal(moecal_st_writer_add(w, c->t[i].name, c->t[i].dt,
                                                      c->t[i].ndim, c->t[i].shape), MOECAL_OK);
        assert_int_equal(moecal_st_writer_write_header(w), MOECAL_OK);
        for (int i = 0; i < c->n; i++) {
            if (nshards != 0 && c->t[i].shard != s)
                continue;
            size_t nb;
            void *d = fill(&c->t[i], &nb);
            assert_int_equal(moecal_st_writer_write(w, c->t[i].name, d, nb), MOECAL_OK);
            free(d);
        }
        assert_int_equal(moecal_st_writer_finish(w), MOECAL_OK);
    }
    if (nshards) {
        size_t cap = 256 + (size_t)c->n * 200 + (extra ? strlen(extra) : 0), o = 0;
        char *idx = malloc(cap);
        assert_non_null(idx);
        o += (size_t)snprintf(idx + o, cap - o, "{\"metadata\": {\"total_size\": 1},\n"
                              " \"weight_map\": {");
        for (int i = 0; i < c->n; i++) {
            shard_file_name(c->t[i].shard, nshards, fname, sizeof fname);
            o += (size_t)snprintf(idx + o, cap - o, "%s\n  \"%s\": \"%s\"", i ? "," : "",
                                  c->t[i].name, fname);
        }
        if (extra)
            o += (size_t)snprintf(idx + o, cap - o, ",\n  %s", extra);
        snprintf(idx + o, cap - o, "\n }\n}\n");
        write_text("model.safetensors.index.json", idx);
        free(idx);
    }
}

/* DeepSeek-V3 style: H = 150, I = 100, MoE layers 1 and 2, 4 experts, FP8
 * with 32x32 blocks (edge blocks both ways), router in BF16, bias in F32. */
static const char ds_config[] =
    "{\"model_type\": \"deepseek_v3\", \"hidden_size\": 150, \"num_hidden_layers\": 3,\n"
    " \"moe_intermediate_size\": 100, \"n_routed_experts\": 4, \"num_experts_per_tok\": 2,\n"
    " \"n_group\": 2, \"topk_group\": 1, \"first_k_dense_replace\": 1,\n"
    " \"topk_method\": \"noaux_tc\", \"scoring_func\": \"sigmoid\",\n"
    " \"quantization_config\": {\"quant_method\": \"fp8\", \"fmt\": \"e4m3\",\n"
    "                         \"weight_block_size\": [32, 32]}}\n";

enum { DS_H = 150, DS_I = 100, DS_E = 4, DS_B = 32 };

static const char *const ds_proj[3] = {"gate_proj", "down_proj", "up_proj"};

static void ds_ckpt(ckpt *c)
{
    char n[128];
    c->n = 0;
    for (int L = 1; L <= 2; L++) {
        int sh = L - 1;
        snprintf(n, sizeof n, "model.layers.%d.mlp.gate.weight", L);
        add(c, n, MOECAL_DT_BF16, 2, DS_E, DS_H, 0);
        snprintf(n, sizeof n, "model.layers.%d.mlp.gate.e_score_correction_bias", L);
        add(c, n, MOECAL_DT_F32, 1, DS_E, 0, 0);
        for (int e = 0; e < DS_E; e++) {
            for (int p = 0; p < 3; p++) {
                int64_t r = p == 1 ? DS_H : DS_I, k = p == 1 ? DS_I : DS_H;
                snprintf(n, sizeof n, "model.layers.%d.mlp.experts.%d.%s.weight", L, e,
                         ds_proj[p]);
                add(c, n, MOECAL_DT_F8_E4M3, 2, r, k, sh);
                snprintf(n, sizeof n, "model.layers.%d.mlp.experts.%d.%s.weight_scale_inv",
                         L, e, ds_proj[p]);
                /* one scale lives in another shard than its weight */
                add(c, n, MOECAL_DT_F32, 2, (r + DS_B - 1) / DS_B, (k + DS_B - 1) / DS_B,
                    (L == 2 && e == 3 && p == 1) ? 0 : sh);
            }
        }
    }
    /* a dense layer's tensors and others moecal does not use */
    add(c, "model.layers.0.mlp.gate_proj.weight", MOECAL_DT_BF16, 2, 8, DS_H, 0);
    add(c, "model.embed_tokens.weight", MOECAL_DT_BF16, 2, 16, DS_H, 1);
}

static moecal_model *open_ok(void)
{
    moecal_model *m = NULL;
    moecal_status rc = moecal_model_open(tmpdir, &m);
    if (rc != MOECAL_OK)
        fail_msg("open: %s", moecal_error_message());
    return m;
}

static void assert_msg_has(const char *needle)
{
    if (strstr(moecal_error_message(), needle) == NULL)
        fail_msg("message '%s' lacks '%s'", moecal_error_message(), needle);
}

static void expect_open_fails(moecal_status code, const char *needle)
{
    moecal_model *m = (moecal_model *)1;
    moecal_status rc = moecal_model_open(tmpdir, &m);
    if (rc != code)
        fail_msg("open: status %d, want %d (%s)", rc, code, moecal_error_message());
    assert_null(m);
    assert_msg_has(needle);
}

/* ------------------------------------------------------------------ happy paths */

static void check_fp8_expert(moecal_model *m, int L, int e, int p)
{
    size_t rows = p == 1 ? DS_H : DS_I, cols = p == 1 ? DS_I : DS_H;
    size_t nbc = (cols + DS_B - 1) / DS_B;
    uint16_t *w = malloc(rows * cols * sizeof *w);
    char wn[128], sn[160];
    float amax = -1.0f, want_amax = 0.0f;

    assert_non_null(w);
    snprintf(wn, sizeof wn, "model.layers.%d.mlp.experts.%d.%s.weight", L, e, ds_proj[p]);
    snprintf(sn, sizeof sn, "%s_scale_inv", wn);
    if (moecal_model_load_expert(m, L, e, p, w, &amax) != MOECAL_OK)
        fail_msg("load %s: %s", wn, moecal_error_message());
    for (size_t r = 0; r < rows; r++) {
        for (size_t k = 0; k < cols; k++) {
            float s = gen_scale(sn, (r / DS_B) * nbc + k / DS_B);
            float prod = (float)ref_e4m3(gen_code(wn, r * cols + k)) * s; /* float32 product */
            float want = ref_bf16(prod);
            if (bf16f(w[r * cols + k]) != want)
                fail_msg("%s [%zu, %zu] = %a, want %a", wn, r, k,
                         (double)bf16f(w[r * cols + k]), (double)want);
            if (fabsf(want) > want_amax)
                want_amax = fabsf(want);
        }
    }
    assert_true(amax == want_amax);
    /* the amax alone, and the raw codes with their scales */
    {
        size_t nbr = (rows + DS_B - 1) / DS_B;
        uint8_t *q = malloc(rows * cols);
        float *sc = malloc(nbr * nbc * sizeof *sc), a2 = -1.0f, a3 = -1.0f;
        assert_non_null(q);
        assert_non_null(sc);
        if (moecal_model_expert_amax(m, L, e, p, &a2) != MOECAL_OK)
            fail_msg("amax %s: %s", wn, moecal_error_message());
        assert_memory_equal(&a2, &amax, sizeof a2);
        if (moecal_model_load_expert_fp8(m, L, e, p, q, sc, &a3) != MOECAL_OK)
            fail_msg("load raw %s: %s", wn, moecal_error_message());
        assert_memory_equal(&a3, &amax, sizeof a3);
        for (size_t i = 0; i < rows * cols; i++)
            assert_int_equal(q[i], gen_code(wn, i));
        for (size_t i = 0; i < nbr * nbc; i++)
            assert_true(sc[i] == gen_scale(sn, i));
        free(q);
        free(sc);
    }
    free(w);
}

static void test_sharded_fp8(void **state)
{
    ckpt c;
    moecal_model *m;
    const moecal_model_config *cfg;
    char buf[128];
    float gate[DS_E * DS_H], bias[DS_E];
    const moecal_st_file *f;
    const moecal_st_tensor *t;

    (void)state;
    make_tmpdir();
    ds_ckpt(&c);
    write_ckpt(&c, 2, NULL);
    write_text("config.json", ds_config);
    m = open_ok();
    cfg = moecal_model_cfg(m);
    assert_int_equal(cfg->n_moe_layers, 2);
    assert_string_equal(moecal_model_dir(m), tmpdir);

    moecal_model_expert_module(m, 2, 3, MOECAL_W1, buf, sizeof buf);
    assert_string_equal(buf, "model.layers.2.mlp.experts.3.gate_proj");
    moecal_model_expert_module(m, 2, 3, MOECAL_W2, buf, sizeof buf);
    assert_string_equal(buf, "model.layers.2.mlp.experts.3.down_proj");
    moecal_model_expert_name(m, 2, 3, MOECAL_W3, buf, sizeof buf);
    assert_string_equal(buf, "model.layers.2.mlp.experts.3.up_proj.weight");
    moecal_model_expert_name(m, 2, 3, MOECAL_W3, buf, 10); /* truncates safely */
    assert_string_equal(buf, "model.lay");
    assert_string_equal(moecal_proj_name[MOECAL_W1], "w1");
    assert_string_equal(moecal_proj_name[MOECAL_W2], "w2");
    assert_string_equal(moecal_proj_name[MOECAL_W3], "w3");

    for (int L = 1; L <= 2; L++)
        for (int e = 0; e < DS_E; e++)
            for (int p = 0; p < 3; p++)
                check_fp8_expert(m, L, e, p);
    /* NULL amax is allowed */
    {
        uint16_t *w = malloc(DS_I * DS_H * sizeof *w);
        assert_non_null(w);
        assert_int_equal(moecal_model_load_expert(m, 1, 0, MOECAL_W1, w, NULL), MOECAL_OK);
        free(w);
    }

    assert_int_equal(moecal_model_load_gate(m, 2, gate, bias), MOECAL_OK);
    for (size_t i = 0; i < DS_E * DS_H; i++)
        assert_true(gate[i] == gen_exact("model.layers.2.mlp.gate.weight", i));
    for (size_t i = 0; i < DS_E; i++)
        assert_true(bias[i] == gen_f32("model.layers.2.mlp.gate.e_score_correction_bias", i));
    assert_int_equal(moecal_model_load_gate(m, 2, gate, NULL), MOECAL_ERR_INTERNAL);

    assert_int_equal(moecal_model_find(m, "model.layers.2.mlp.experts.3.down_proj.weight",
                                       &f, &t), MOECAL_OK);
    assert_non_null(strstr(moecal_st_path(f), "model-00002-of-00002.safetensors"));
    assert_int_equal(t->dtype, MOECAL_DT_F8_E4M3);
    assert_int_equal(moecal_model_find(m, "lm_head.weight", &f, &t), MOECAL_ERR_MISMATCH);
    assert_msg_has("'lm_head.weight' is not in model.safetensors.index.json");

    /* out of range requests */
    uint16_t one[DS_I * DS_H];
    assert_int_equal(moecal_model_load_expert(m, 0, 0, MOECAL_W1, one, NULL), MOECAL_ERR_USAGE);
    assert_msg_has("layer 0 is not a MoE layer");
    assert_int_equal(moecal_model_load_expert(m, 3, 0, MOECAL_W1, one, NULL), MOECAL_ERR_USAGE);
    assert_int_equal(moecal_model_load_expert(m, 1, 4, MOECAL_W1, one, NULL), MOECAL_ERR_USAGE);
    assert_msg_has("expert 4 of layer 1 does not exist");
    assert_int_equal(moecal_model_load_expert(m, 1, -1, MOECAL_W1, one, NULL), MOECAL_ERR_USAGE);
    assert_int_equal(moecal_model_load_expert(m, 1, 0, 3, one, NULL), MOECAL_ERR_INTERNAL);
    assert_int_equal(moecal_model_load_gate(m, 0, gate, bias), MOECAL_ERR_USAGE);
    moecal_model_close(m);
    remove_tmpdir();
}

/* Qwen3-MoE style in one model.safetensors: BF16 experts, one F32 and one F16
 * expert projection, an F16 router. */
static const char qwen_config[] =
    "{\"model_type\": \"qwen3_moe\", \"hidden_size\": 24, \"num_hidden_layers\": 2,\n"
    " \"moe_intermediate_size\": 16, \"num_experts\": 3, \"num_experts_per_tok\": 2,\n"
    " \"decoder_sparse_step\": 1, \"mlp_only_layers\": [0], \"norm_topk_prob\": true}\n";

static int same_float(float a, float b)
{
    return memcmp(&a, &b, sizeof a) == 0;
}

static void check_expert_apis(moecal_model *m, int L, int e, int p, moecal_dtype dt)
{
    const moecal_model_config *cfg = moecal_model_cfg(m);
    size_t H = (size_t)cfg->hidden_size, I = (size_t)cfg->moe_intermediate_size;
    size_t rows = p == MOECAL_W2 ? H : I, cols = p == MOECAL_W2 ? I : H;
    size_t B = (size_t)cfg->weight_block[0], nbr = (rows + B - 1) / B, nbc = (cols + B - 1) / B;
    uint16_t *w = malloc(rows * cols * sizeof *w), *d = malloc(rows * cols * sizeof *d);
    uint8_t *q = malloc(rows * cols);
    float *s = malloc(nbr * nbc * sizeof *s), amax = -1.0f, amax2 = -2.0f, amax3 = -3.0f;
    char wn[128], sn[160];

    moecal_model_expert_name(m, L, e, p, wn, sizeof wn);
    snprintf(sn, sizeof sn, "%s_scale_inv", wn);
    if (moecal_model_load_expert(m, L, e, p, w, &amax) != MOECAL_OK)
        fail_msg("load %s: %s", wn, moecal_error_message());
    if (moecal_model_expert_amax(m, L, e, p, &amax2) != MOECAL_OK)
        fail_msg("amax %s: %s", wn, moecal_error_message());
    if (!same_float(amax, amax2))
        fail_msg("%s: expert_amax %a, load_expert %a", wn, (double)amax2, (double)amax);
    if (dt != MOECAL_DT_F8_E4M3) {
        assert_int_equal(moecal_model_load_expert_fp8(m, L, e, p, q, s, &amax3),
                         MOECAL_ERR_UNSUPPORTED);
        goto out;
    }
    memset(q, 0x7f, rows * cols);
    if (moecal_model_load_expert_fp8(m, L, e, p, q, s, &amax3) != MOECAL_OK)
        fail_msg("load fp8 %s: %s", wn, moecal_error_message());
    assert_true(same_float(amax, amax3));
    for (size_t i = 0; i < rows * cols; i++)
        if (q[i] != gen_code(wn, i))
            fail_msg("%s: byte %zu is 0x%02x, want 0x%02x", wn, i, q[i], gen_code(wn, i));
    for (size_t i = 0; i < nbr * nbc; i++)
        assert_true(same_float(s[i], gen_scale(sn, i)));
    assert_int_equal(moecal_fp8_dequant_bf16(q, rows, cols, s, B, d, NULL, NULL), MOECAL_OK);
    assert_memory_equal(d, w, rows * cols * sizeof *w);
out:
    free(w);
    free(d);
    free(q);
    free(s);
}

static void test_single_bf16(void **state)
{
    ckpt c;
    char n[128];
    moecal_model *m;
    uint16_t w[24 * 16];
    float gate[3 * 24], amax;

    (void)state;
    make_tmpdir();
    c.n = 0;
    add(&c, "model.layers.1.mlp.gate.weight", MOECAL_DT_F16, 2, 3, 24, 0);
    for (int e = 0; e < 3; e++) {
        for (int p = 0; p < 3; p++) {
            snprintf(n, sizeof n, "model.layers.1.mlp.experts.%d.%s.weight", e, ds_proj[p]);
            moecal_dtype dt = (e == 1 && p == 1) ? MOECAL_DT_F32
                              : (e == 2 && p == 0) ? MOECAL_DT_F16 : MOECAL_DT_BF16;
            add(&c, n, dt, 2, p == 1 ? 24 : 16, p == 1 ? 16 : 24, 0);
        }
    }
    write_ckpt(&c, 0, NULL);
    write_text("config.json", qwen_config);
    m = open_ok();
    assert_int_equal(moecal_model_cfg(m)->family, MOECAL_FAMILY_QWEN3_MOE);
    for (int e = 0; e < 3; e++) {
        for (int p = 0; p < 3; p++) {
            float want_amax = 0.0f;
            snprintf(n, sizeof n, "model.layers.1.mlp.experts.%d.%s.weight", e, ds_proj[p]);
            assert_int_equal(moecal_model_load_expert(m, 1, e, p, w, &amax), MOECAL_OK);
            for (size_t i = 0; i < 24 * 16; i++) {
                float want = (e == 1 && p == 1) ? ref_bf16(gen_f32(n, i)) : gen_exact(n, i);
                if (bf16f(w[i]) != want)
                    fail_msg("%s[%zu] = %a, want %a", n, i, (double)bf16f(w[i]), (double)want);
                want_amax = fmaxf(want_amax, fabsf(want));
            }
            assert_true(amax == want_amax);
            check_expert_apis(m, 1, e, p, (e == 1 && p == 1) ? MOECAL_DT_F32
                                          : (e == 2 && p == 0) ? MOECAL_DT_F16
                                                               : MOECAL_DT_BF16);
        }
    }
    assert_int_equal(moecal_model_load_gate(m, 1, gate, NULL), MOECAL_OK);
    for (size_t i = 0; i < 3 * 24; i++)
        assert_true(gate[i] == gen_exact("model.layers.1.mlp.gate.weight", i));
    assert_int_equal(moecal_model_load_gate(m, 0, gate, NULL), MOECAL_ERR_USAGE);
    assert_int_equal(moecal_model_load_gate(m, 1, gate, gate), MOECAL_ERR_INTERNAL);
    moecal_model_close(m);
    remove_tmpdir();
}

static const char mixtral_config[] =
    "{\"model_type\": \"mixtral\", \"hidden_size\": 16, \"num_hidden_layers\": 2,\n"
    " \"intermediate_size\": 8, \"num_local_experts\": 2, \"num_experts_per_tok\": 1}\n";

static void test_mixtral_names(void **state)
{
    ckpt c;
    char n[128];
    moecal_model *m;
    uint16_t w[16 * 8];
    float gate[2 * 16];

    (void)state;
    make_tmpdir();
    c.n = 0;
    for (int L = 0; L < 2; L++) {
        snprintf(n, sizeof n, "model.layers.%d.block_sparse_moe.gate.weight", L);
        add(&c, n, MOECAL_DT_BF16, 2, 2, 16, L);
        for (int e = 0; e < 2; e++) {
            for (int p = 0; p < 3; p++) {
                snprintf(n, sizeof n, "model.layers.%d.block_sparse_moe.experts.%d.w%d.weight",
                         L, e, p + 1);
                add(&c, n, MOECAL_DT_BF16, 2, p == 1 ? 16 : 8, p == 1 ? 8 : 16, L);
            }
        }
    }
    write_ckpt(&c, 2, NULL);
    write_text("config.json", mixtral_config);
    m = open_ok();
    moecal_model_expert_module(m, 1, 1, MOECAL_W2, n, sizeof n);
    assert_string_equal(n, "model.layers.1.block_sparse_moe.experts.1.w2");
    moecal_model_expert_name(m, 0, 1, MOECAL_W3, n, sizeof n);
    assert_string_equal(n, "model.layers.0.block_sparse_moe.experts.1.w3.weight");
    assert_int_equal(moecal_model_load_expert(m, 1, 1, MOECAL_W2, w, NULL), MOECAL_OK);
    for (size_t i = 0; i < 16 * 8; i++)
        assert_true(bf16f(w[i]) ==
                    gen_exact("model.layers.1.block_sparse_moe.experts.1.w2.weight", i));
    assert_int_equal(moecal_model_load_gate(m, 0, gate, NULL), MOECAL_OK);
    assert_true(gate[5] == gen_exact("model.layers.0.block_sparse_moe.gate.weight", 5));
    moecal_model_close(m);
    remove_tmpdir();
}

static const char big_config[] =
    "{\"model_type\": \"qwen3_moe\", \"hidden_size\": 4096, \"num_hidden_layers\": 2,\n"
    " \"moe_intermediate_size\": 2100, \"num_experts\": 1, \"num_experts_per_tok\": 1,\n"
    " \"decoder_sparse_step\": 1, \"mlp_only_layers\": [0],\n"
    " \"quantization_config\": {\"quant_method\": \"fp8\", \"fmt\": \"e4m3\",\n"
    "                         \"weight_block_size\": [128, 128]}}\n";

static void test_chunked(void **state)
{
    const int64_t H = 4096, I = 2100, B = 128;

    (void)state;
    for (int variant = 0; variant < 2; variant++) {
        const moecal_dtype dts[3] = {variant ? MOECAL_DT_BF16 : MOECAL_DT_F8_E4M3,
                                     variant ? MOECAL_DT_F16 : MOECAL_DT_F8_E4M3,
                                     variant ? MOECAL_DT_F32 : MOECAL_DT_F8_E4M3};
        ckpt c;
        char n[128];
        moecal_model *m;

        make_tmpdir();
        c.n = 0;
        add(&c, "model.layers.1.mlp.gate.weight", MOECAL_DT_BF16, 2, 1, H, 0);
        for (int p = 0; p < 3; p++) {
            int64_t r = p == 1 ? H : I, k = p == 1 ? I : H;
            snprintf(n, sizeof n, "model.layers.1.mlp.experts.0.%s.weight", ds_proj[p]);
            add(&c, n, dts[p], 2, r, k, 0);
            if (dts[p] == MOECAL_DT_F8_E4M3) {
                snprintf(n, sizeof n, "model.layers.1.mlp.experts.0.%s.weight_scale_inv",
                         ds_proj[p]);
                add(&c, n, MOECAL_DT_F32, 2, (r + B - 1) / B, (k + B - 1) / B, 0);
            }
        }
        write_ckpt(&c, 0, NULL);
        write_text("config.json", big_config);
        m = open_ok();
        for (int p = 0; p < 3; p++)
            check_expert_apis(m, 1, 0, p, dts[p]);
        moecal_model_close(m);
        remove_tmpdir();
    }
}

/* ------------------------------------------------------------------ bad checkpoints */

static void bad_index(const char *extra, moecal_status code, const char *needle)
{
    ckpt c;
    make_tmpdir();
    ds_ckpt(&c);
    write_ckpt(&c, 2, extra);
    write_text("config.json", ds_config);
    expect_open_fails(code, needle);
    remove_tmpdir();
}

static void test_bad_index(void **state)
{
    (void)state;
    bad_index("\"x.weight\": \"../../etc/passwd\"", MOECAL_ERR_FORMAT,
              "'x.weight' is mapped to '../../etc/passwd', which is not a plain file name");
    bad_index("\"x.weight\": \"sub/x.safetensors\"", MOECAL_ERR_FORMAT, "'sub/x.safetensors'");
    bad_index("\"x.weight\": \"\"", MOECAL_ERR_FORMAT, "not a plain file name");
    bad_index("\"x.weight\": \"..\"", MOECAL_ERR_FORMAT, "not a plain file name");
    bad_index("\"x.weight\": 3", MOECAL_ERR_FORMAT, "weight_map entry 'x.weight' is not a string");
    bad_index("\"x.weight\": \"a\\u0000b\"", MOECAL_ERR_FORMAT, "not valid JSON");
    bad_index("\"model.embed_tokens.weight\": \"model-00001-of-00002.safetensors\"",
              MOECAL_ERR_FORMAT, "duplicate");
    bad_index("\"x.weight\": \"model-00003-of-00003.safetensors\"", MOECAL_ERR_IO,
              "shard 'model-00003-of-00003.safetensors' listed in "
              "model.safetensors.index.json is missing");
}

static void test_bad_layouts(void **state)
{
    ckpt c;

    (void)state;
    /* neither index nor single file */
    make_tmpdir();
    write_text("config.json", ds_config);
    expect_open_fails(MOECAL_ERR_FORMAT, "neither model.safetensors nor "
                      "model.safetensors.index.json found");
    remove_tmpdir();

    /* no config.json */
    make_tmpdir();
    ds_ckpt(&c);
    write_ckpt(&c, 2, NULL);
    expect_open_fails(MOECAL_ERR_IO, "config.json: cannot open");
    remove_tmpdir();

    /* index without weight_map, and not JSON */
    make_tmpdir();
    write_text("config.json", ds_config);
    write_text("model.safetensors.index.json", "{\"metadata\": {}}");
    expect_open_fails(MOECAL_ERR_FORMAT, "no 'weight_map' object");
    write_text("model.safetensors.index.json", "{\"weight_map\": {\"a\": \"b\"");
    expect_open_fails(MOECAL_ERR_FORMAT, "not valid JSON");
    remove_tmpdir();

    /* not a directory */
    {
        moecal_model *m;
        assert_int_equal(moecal_model_open("/nonexistent/moecal", &m), MOECAL_ERR_IO);
        assert_msg_has("/nonexistent/moecal: cannot open model directory");
    }

    /* a shard the index names is gone */
    make_tmpdir();
    ds_ckpt(&c);
    write_ckpt(&c, 2, NULL);
    write_text("config.json", ds_config);
    {
        char p[4200];
        snprintf(p, sizeof p, "%s/model-00002-of-00002.safetensors", tmpdir);
        assert_int_equal(unlink(p), 0);
    }
    expect_open_fails(MOECAL_ERR_IO, "shard 'model-00002-of-00002.safetensors'");
    remove_tmpdir();

    /* the router bias noaux_tc needs is missing */
    make_tmpdir();
    ds_ckpt(&c);
    drop_spec(&c, "model.layers.2.mlp.gate.e_score_correction_bias");
    write_ckpt(&c, 2, NULL);
    write_text("config.json", ds_config);
    expect_open_fails(MOECAL_ERR_MISMATCH, "router tensor "
                      "'model.layers.2.mlp.gate.e_score_correction_bias' is not in "
                      "model.safetensors.index.json");
    remove_tmpdir();

    /* an expert is missing (single file) */
    make_tmpdir();
    ds_ckpt(&c);
    drop_spec(&c, "model.layers.1.mlp.experts.2.up_proj.weight");
    write_ckpt(&c, 0, NULL);
    write_text("config.json", ds_config);
    expect_open_fails(MOECAL_ERR_MISMATCH,
                      "expert tensor 'model.layers.1.mlp.experts.2.up_proj.weight' is not in");
    remove_tmpdir();
}

/* Open a DeepSeek checkpoint altered by `edit`, then load one expert. */
static void bad_expert(void (*edit)(ckpt *), int nshards, int L, int e, int p,
                       moecal_status code, const char *n1, const char *n2)
{
    ckpt c;
    moecal_model *m;
    uint16_t *w = malloc(DS_H * DS_I * sizeof *w);

    assert_non_null(w);
    make_tmpdir();
    ds_ckpt(&c);
    edit(&c);
    write_ckpt(&c, nshards, NULL);
    write_text("config.json", ds_config);
    m = open_ok();
    moecal_status rc = moecal_model_load_expert(m, L, e, p, w, NULL);
    if (rc != code)
        fail_msg("load: status %d, want %d (%s)", rc, code, moecal_error_message());
    assert_msg_has(n1);
    if (n2)
        assert_msg_has(n2);
    /* the amax alone and the raw FP8 load fail the same way (an FP8 load of a
     * tensor of another dtype is refused as unsupported) */
    {
        float a;
        uint8_t *q = malloc(DS_H * DS_I);
        float *sc = malloc(DS_H * DS_I * sizeof *sc);
        assert_non_null(q);
        assert_non_null(sc);
        rc = moecal_model_expert_amax(m, L, e, p, &a);
        if (rc != code)
            fail_msg("amax: status %d, want %d (%s)", rc, code, moecal_error_message());
        assert_msg_has(n1);
        rc = moecal_model_load_expert_fp8(m, L, e, p, q, sc, &a);
        if (rc != code)
            fail_msg("raw load: status %d, want %d (%s)", rc, code, moecal_error_message());
        assert_msg_has(n1);
        free(q);
        free(sc);
    }
    /* the model stays usable after a failed load */
    assert_int_equal(moecal_model_load_expert(m, 1, 0, MOECAL_W1, w, NULL), MOECAL_OK);
    moecal_model_close(m);
    remove_tmpdir();
    free(w);
}

static void edit_no_scale(ckpt *c)
{
    drop_spec(c, "model.layers.1.mlp.experts.1.gate_proj.weight_scale_inv");
}

static void edit_scale_shape(ckpt *c)
{
    find_spec(c, "model.layers.2.mlp.experts.0.up_proj.weight_scale_inv")->shape[1] = 4;
}

static void edit_scale_dtype(ckpt *c)
{
    find_spec(c, "model.layers.2.mlp.experts.0.up_proj.weight_scale_inv")->dt = MOECAL_DT_BF16;
}

static void edit_weight_shape(ckpt *c)
{
    spec *s = find_spec(c, "model.layers.1.mlp.experts.3.down_proj.weight");
    s->shape[0] = DS_I;
    s->shape[1] = DS_H;
}

static void edit_weight_i32(ckpt *c)
{
    find_spec(c, "model.layers.1.mlp.experts.0.down_proj.weight")->dt = MOECAL_DT_I32;
}

static void edit_weight_1d(ckpt *c)
{
    spec *s = find_spec(c, "model.layers.1.mlp.experts.0.down_proj.weight");
    s->ndim = 1;
    s->shape[0] = DS_H * DS_I;
}

static void test_bad_experts(void **state)
{
    (void)state;
    bad_expert(edit_no_scale, 2, 1, 1, MOECAL_W1, MOECAL_ERR_FORMAT,
               "model-00001-of-00002.safetensors: FP8 tensor "
               "'model.layers.1.mlp.experts.1.gate_proj.weight' has no "
               "'model.layers.1.mlp.experts.1.gate_proj.weight_scale_inv'", NULL);
    bad_expert(edit_no_scale, 0, 1, 1, MOECAL_W1, MOECAL_ERR_FORMAT,
               "model.safetensors: FP8 tensor", "weight_scale_inv");
    bad_expert(edit_scale_shape, 2, 2, 0, MOECAL_W3, MOECAL_ERR_FORMAT,
               "model-00002-of-00002.safetensors: tensor "
               "'model.layers.2.mlp.experts.0.up_proj.weight_scale_inv' has shape [4, 4] but "
               "[4, 5] was expected for weight [100, 150] with 32x32 blocks", NULL);
    bad_expert(edit_scale_dtype, 2, 2, 0, MOECAL_W3, MOECAL_ERR_FORMAT,
               "'model.layers.2.mlp.experts.0.up_proj.weight_scale_inv' has dtype BF16 but F32 "
               "was expected", NULL);
    bad_expert(edit_weight_shape, 2, 1, 3, MOECAL_W2, MOECAL_ERR_MISMATCH,
               "model-00001-of-00002.safetensors: tensor "
               "'model.layers.1.mlp.experts.3.down_proj.weight' has shape [100, 150] but "
               "[150, 100] was expected", "hidden_size 150");
    bad_expert(edit_weight_i32, 2, 1, 0, MOECAL_W2, MOECAL_ERR_UNSUPPORTED,
               "'model.layers.1.mlp.experts.0.down_proj.weight' has dtype I32", NULL);
    bad_expert(edit_weight_1d, 2, 1, 0, MOECAL_W2, MOECAL_ERR_MISMATCH,
               "has shape [15000] but [150, 100] was expected", NULL);
}

/* Values that must be refused: a NaN code, a negative scale, an F32 weight
 * that overflows bf16, a NaN bias.  Written by hand (the generators make
 * only good values). */
static void write_one(const char *file, const char *name, moecal_dtype dt, int ndim,
                      const int64_t *shape, const void *data, size_t nb)
{
    char path[4200];
    moecal_st_writer *w;
    snprintf(path, sizeof path, "%s/%s", tmpdir, file);
    assert_int_equal(moecal_st_writer_create(path, &w), MOECAL_OK);
    assert_int_equal(moecal_st_writer_add(w, name, dt, ndim, shape), MOECAL_OK);
    assert_int_equal(moecal_st_writer_write_header(w), MOECAL_OK);
    assert_int_equal(moecal_st_writer_write(w, name, data, nb), MOECAL_OK);
    assert_int_equal(moecal_st_writer_finish(w), MOECAL_OK);
}

static void test_bad_values(void **state)
{
    ckpt c;
    moecal_model *m;
    uint16_t *w = malloc(DS_H * DS_I * sizeof *w);
    float gate[DS_E * DS_H], bias[DS_E];
    uint8_t *q = malloc(DS_H * DS_I);
    const char *extra =
        "\"model.layers.1.mlp.experts.0.gate_proj.weight\": \"bad-q.safetensors\",\n"
        "  \"model.layers.1.mlp.experts.0.up_proj.weight_scale_inv\": \"bad-s.safetensors\",\n"
        "  \"model.layers.1.mlp.gate.e_score_correction_bias\": \"bad-b.safetensors\"";

    (void)state;
    assert_non_null(w);
    assert_non_null(q);
    make_tmpdir();
    ds_ckpt(&c);
    drop_spec(&c, "model.layers.1.mlp.experts.0.gate_proj.weight");
    drop_spec(&c, "model.layers.1.mlp.experts.0.up_proj.weight_scale_inv");
    drop_spec(&c, "model.layers.1.mlp.gate.e_score_correction_bias");
    write_ckpt(&c, 2, extra);
    write_text("config.json", ds_config);
    {
        int64_t wshape[2] = {DS_I, DS_H}, sshape[2] = {4, 5}, bshape[1] = {DS_E};
        float s[20], b[DS_E] = {0.0f, NAN, 1.0f, 2.0f};
        memset(q, 0x38, DS_I * DS_H);
        q[7] = 0xff;
        q[DS_I * DS_H - 1] = 0x7f;
        write_one("bad-q.safetensors", "model.layers.1.mlp.experts.0.gate_proj.weight",
                  MOECAL_DT_F8_E4M3, 2, wshape, q, DS_I * DS_H);
        for (int i = 0; i < 20; i++)
            s[i] = 1.0f;
        s[2 * 5 + 3] = -0.5f;
        write_one("bad-s.safetensors", "model.layers.1.mlp.experts.0.up_proj.weight_scale_inv",
                  MOECAL_DT_F32, 2, sshape, s, sizeof s);
        write_one("bad-b.safetensors", "model.layers.1.mlp.gate.e_score_correction_bias",
                  MOECAL_DT_F32, 1, bshape, b, sizeof b);
    }
    m = open_ok();
    /* gate_proj.weight in bad-q has no scale there but its scale is in a shard */
    assert_int_equal(moecal_model_load_expert(m, 1, 0, MOECAL_W1, w, NULL), MOECAL_ERR_NONFINITE);
    assert_msg_has("bad-q.safetensors: tensor 'model.layers.1.mlp.experts.0.gate_proj.weight' "
                   "holds 2 NaN or Inf values");
    assert_int_equal(moecal_model_load_expert(m, 1, 0, MOECAL_W3, w, NULL), MOECAL_ERR_FORMAT);
    assert_msg_has("bad-s.safetensors: tensor "
                   "'model.layers.1.mlp.experts.0.up_proj.weight_scale_inv': weight_scale_inv "
                   "block [2, 3] is -0.5");
    /* the same refusals without dequantizing (amax alone, raw FP8) */
    {
        float a, *sc = malloc(DS_H * DS_I * sizeof *sc);
        uint8_t *codes = malloc(DS_H * DS_I);
        assert_non_null(sc);
        assert_non_null(codes);
        assert_int_equal(moecal_model_expert_amax(m, 1, 0, MOECAL_W1, &a), MOECAL_ERR_NONFINITE);
        assert_msg_has("tensor 'model.layers.1.mlp.experts.0.gate_proj.weight' holds 2 NaN");
        assert_int_equal(moecal_model_load_expert_fp8(m, 1, 0, MOECAL_W1, codes, sc, &a),
                         MOECAL_ERR_NONFINITE);
        assert_msg_has("tensor 'model.layers.1.mlp.experts.0.gate_proj.weight' holds 2 NaN");
        assert_int_equal(moecal_model_expert_amax(m, 1, 0, MOECAL_W3, &a), MOECAL_ERR_FORMAT);
        assert_msg_has("weight_scale_inv block [2, 3] is -0.5");
        assert_int_equal(moecal_model_load_expert_fp8(m, 1, 0, MOECAL_W3, codes, sc, &a),
                         MOECAL_ERR_FORMAT);
        assert_msg_has("weight_scale_inv block [2, 3] is -0.5");
        free(sc);
        free(codes);
    }
    assert_int_equal(moecal_model_load_gate(m, 1, gate, bias), MOECAL_ERR_NONFINITE);
    assert_msg_has("'model.layers.1.mlp.gate.e_score_correction_bias' holds a NaN or Inf at "
                   "expert 1");
    assert_int_equal(moecal_model_load_gate(m, 2, gate, bias), MOECAL_OK);
    moecal_model_close(m);
    remove_tmpdir();

    /* F32 expert too large for bf16 */
    make_tmpdir();
    {
        float *f = malloc(24 * 16 * sizeof *f);
        int64_t sh[2] = {16, 24};
        char n[128];
        assert_non_null(f);
        c.n = 0;
        add(&c, "model.layers.1.mlp.gate.weight", MOECAL_DT_BF16, 2, 3, 24, 0);
        for (int e = 0; e < 3; e++)
            for (int p = 0; p < 3; p++) {
                if (e == 0 && p == 0)
                    continue;
                snprintf(n, sizeof n, "model.layers.1.mlp.experts.%d.%s.weight", e, ds_proj[p]);
                add(&c, n, MOECAL_DT_BF16, 2, p == 1 ? 24 : 16, p == 1 ? 16 : 24, 0);
            }
        write_ckpt(&c, 1,
                   "\"model.layers.1.mlp.experts.0.gate_proj.weight\": \"big.safetensors\"");
        for (int i = 0; i < 24 * 16; i++)
            f[i] = i == 5 ? 3.4e38f : 1.0f;
        write_one("big.safetensors", "model.layers.1.mlp.experts.0.gate_proj.weight",
                  MOECAL_DT_F32, 2, sh, f, 24 * 16 * sizeof *f);
        write_text("config.json", qwen_config);
        free(f);
    }
    m = open_ok();
    assert_int_equal(moecal_model_load_expert(m, 1, 0, MOECAL_W1, w, NULL), MOECAL_ERR_NONFINITE);
    assert_msg_has("holds 1 NaN or Inf values (after rounding to bf16)");
    moecal_model_close(m);
    remove_tmpdir();
    free(w);
    free(q);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sharded_fp8),
        cmocka_unit_test(test_single_bf16),
        cmocka_unit_test(test_mixtral_names),
        cmocka_unit_test(test_chunked),
        cmocka_unit_test(test_bad_index),
        cmocka_unit_test(test_bad_layouts),
        cmocka_unit_test(test_bad_experts),
        cmocka_unit_test(test_bad_values),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
