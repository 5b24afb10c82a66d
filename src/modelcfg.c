/* modelcfg.c - what moecal needs from a Hugging Face config.json.
 *
 * config.json is untrusted input: every key moecal uses is checked for its
 * JSON type and range, and messages name the file, the key and what was
 * expected.  Keys moecal does not use are ignored.  A JSON null counts as an
 * absent key, as transformers treats it.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "modelcfg.h"
#include "util.h"

/* Sanity limits: far above any released model, low enough that products of
 * two sizes (a weight's element count) cannot overflow 64 bits. */
#define MAX_HIDDEN (1 << 20)
#define MAX_INTER (1 << 20)
#define MAX_LAYERS (1 << 16)
#define MAX_EXPERTS (1 << 16)
#define MAX_BLOCK (1 << 16)
/* config.json is a few kB; refuse to slurp anything absurd. */
#define MAX_CONFIG_BYTES (64u << 20)

typedef struct ctx {
    const char *label;
    const json_t *obj;   /* object the keys are looked up in */
    const char *prefix;  /* "" or "quantization_config." for messages */
    const char *model_type;
} ctx;

/* The value of key, or NULL when absent or null. */
static const json_t *get(const ctx *c, const char *key)
{
    const json_t *v = json_object_get(c->obj, key);
    return v == NULL || json_is_null(v) ? NULL : v;
}

static moecal_status missing(const ctx *c, const char *key)
{
    return moecal_error_set(MOECAL_ERR_FORMAT,
                            "%s: missing key '%s%s' (needed for model_type '%s')",
                            c->label, c->prefix, key, c->model_type);
}

static moecal_status wrong_type(const ctx *c, const char *key, const json_t *v,
                                const char *want)
{
    return moecal_error_set(MOECAL_ERR_FORMAT, "%s: '%s%s' is %s but must be %s",
                            c->label, c->prefix, key, moecal_json_kind(v), want);
}

/* Integer key in [lo, hi]; hi_name (may be NULL) names the bound in messages,
 * e.g. "n_routed_experts".  required == 0: absent gives def. */
static moecal_status get_int(const ctx *c, const char *key, int required, int def,
                             int lo, int hi, const char *hi_name, int *out)
{
    const json_t *v = get(c, key);
    json_int_t x;

    if (v == NULL) {
        if (required)
            return missing(c, key);
        *out = def;
        return MOECAL_OK;
    }
    if (!json_is_integer(v))
        return wrong_type(c, key, v, "an integer");
    x = json_integer_value(v);
    if (x < lo || x > hi) {
        if (hi_name)
            return moecal_error_set(MOECAL_ERR_FORMAT,
                                    "%s: '%s%s' is %" JSON_INTEGER_FORMAT
                                    " but must be between %d and %s (%d)",
                                    c->label, c->prefix, key, x, lo, hi_name, hi);
        return moecal_error_set(MOECAL_ERR_FORMAT,
                                "%s: '%s%s' is %" JSON_INTEGER_FORMAT
                                " but must be between %d and %d",
                                c->label, c->prefix, key, x, lo, hi);
    }
    *out = (int)x;
    return MOECAL_OK;
}

/* A required integer that config.json may spell two ways (transformers'
 * attribute_map aliases, e.g. Qwen3-MoE's num_experts, written as
 * num_local_experts since transformers 5).  Either key works; both are
 * accepted when equal.  *used names the key read, for later messages. */
static moecal_status get_int_alias(const ctx *c, const char *key, const char *alias, int lo,
                                   int hi, int *out, const char **used)
{
    const json_t *a = get(c, key), *b = get(c, alias);

    if (a == NULL && b == NULL)
        return moecal_error_set(MOECAL_ERR_FORMAT,
                                "%s: missing key '%s%s' (or its alias '%s%s'; needed for "
                                "model_type '%s')", c->label, c->prefix, key, c->prefix, alias,
                                c->model_type);
    if (a != NULL && b != NULL) {
        int x, y;
        MOECAL_TRY(get_int(c, key, 1, 0, lo, hi, NULL, &x));
        MOECAL_TRY(get_int(c, alias, 1, 0, lo, hi, NULL, &y));
        if (x != y)
            return moecal_error_set(MOECAL_ERR_FORMAT,
                                    "%s: '%s%s' is %d but its alias '%s%s' is %d", c->label,
                                    c->prefix, key, x, c->prefix, alias, y);
        *out = x;
        *used = key;
        return MOECAL_OK;
    }
    *used = a != NULL ? key : alias;
    return get_int(c, *used, 1, 0, lo, hi, NULL, out);
}

static moecal_status get_bool(const ctx *c, const char *key, bool def, bool *out)
{
    const json_t *v = get(c, key);

    if (v == NULL) {
        *out = def;
        return MOECAL_OK;
    }
    if (!json_is_boolean(v))
        return wrong_type(c, key, v, "true or false");
    *out = json_is_true(v);
    return MOECAL_OK;
}

/* String key; absent gives def (NULL def: required). */
static moecal_status get_str(const ctx *c, const char *key, const char *def, const char **out)
{
    const json_t *v = get(c, key);

    if (v == NULL) {
        if (def == NULL)
            return missing(c, key);
        *out = def;
        return MOECAL_OK;
    }
    if (!json_is_string(v))
        return wrong_type(c, key, v, "a string");
    *out = json_string_value(v);
    /* An embedded NUL would make the C string disagree with the JSON one. */
    if (strlen(*out) != json_string_length(v))
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: '%s%s' contains a NUL character",
                                c->label, c->prefix, key);
    return MOECAL_OK;
}

/* Copy a string for messages: printable ASCII only, truncated. */
static void safe_copy(char *dst, size_t n, const char *src)
{
    size_t i = 0;

    for (; src[i] != '\0' && i + 1 < n; i++)
        dst[i] = (src[i] >= 0x20 && src[i] < 0x7f) ? src[i] : '?';
    dst[i] = '\0';
    if (src[i] != '\0' && n > 4)
        memcpy(dst + n - 4, "...", 4);
}

/* ------------------------------------------------------------------ families */

static moecal_status parse_deepseek(const ctx *c, moecal_model_config *cfg)
{
    bool v2 = strcmp(c->model_type, "deepseek_v2") == 0;
    const char *method, *scoring, *ekey;
    int E, G = 1, TG = 1;

    MOECAL_TRY(get_int(c, "moe_intermediate_size", 1, 0, 1, MAX_INTER, NULL,
                       &cfg->moe_intermediate_size));
    /* transformers' attribute_map: DeepseekV3Config num_local_experts,
     * DeepseekV2Config num_experts */
    MOECAL_TRY(get_int_alias(c, "n_routed_experts", v2 ? "num_experts" : "num_local_experts", 1,
                             MAX_EXPERTS, &cfg->n_routed_experts, &ekey));
    E = cfg->n_routed_experts;
    MOECAL_TRY(get_int(c, "num_experts_per_tok", 1, 0, 1, E, ekey,
                       &cfg->num_experts_per_tok));
    /* transformers' defaults: DeepseekV2Config greedy/softmax, V3 noaux_tc/sigmoid */
    MOECAL_TRY(get_str(c, "topk_method", v2 ? "greedy" : "noaux_tc", &method));
    MOECAL_TRY(get_str(c, "scoring_func", v2 ? "softmax" : "sigmoid", &scoring));
    if (strcmp(scoring, "sigmoid") == 0) {
        cfg->scoring = MOECAL_SCORING_SIGMOID;
    } else if (strcmp(scoring, "softmax") == 0) {
        cfg->scoring = MOECAL_SCORING_SOFTMAX;
    } else {
        char s[40];
        safe_copy(s, sizeof s, scoring);
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED,
                                "%s: 'scoring_func' is '%s' but must be 'sigmoid' or 'softmax'",
                                c->label, s);
    }
    if (strcmp(method, "noaux_tc") == 0) {
        /* DeepSeek-V3's gate: sigmoid scores plus the correction bias. */
        if (cfg->scoring != MOECAL_SCORING_SIGMOID)
            return moecal_error_set(MOECAL_ERR_UNSUPPORTED,
                                    "%s: 'topk_method' 'noaux_tc' needs 'scoring_func' "
                                    "'sigmoid', not '%s'", c->label, scoring);
        cfg->has_correction_bias = true;
    } else if (strcmp(method, "greedy") == 0 || strcmp(method, "group_limited_greedy") == 0) {
        /* DeepSeek-V2's gate: softmax scores, no bias. */
        if (cfg->scoring != MOECAL_SCORING_SOFTMAX)
            return moecal_error_set(MOECAL_ERR_UNSUPPORTED,
                                    "%s: 'topk_method' '%s' needs 'scoring_func' "
                                    "'softmax', not '%s'", c->label, method, scoring);
    } else {
        char s[40];
        safe_copy(s, sizeof s, method);
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED,
                                "%s: 'topk_method' is '%s' but must be 'noaux_tc', 'greedy' "
                                "or 'group_limited_greedy'", c->label, s);
    }
    snprintf(cfg->topk_method, sizeof cfg->topk_method, "%s", method);

    if (strcmp(method, "greedy") == 0) {
        /* Plain top-k: the group keys, if any, play no part; still type-check. */
        int unused;
        MOECAL_TRY(get_int(c, "n_group", 0, 1, 1, E, "n_routed_experts", &unused));
        MOECAL_TRY(get_int(c, "topk_group", 0, 1, 1, E, "n_routed_experts", &unused));
    } else {
        MOECAL_TRY(get_int(c, "n_group", 1, 0, 1, E, "n_routed_experts", &G));
        if (E % G != 0)
            return moecal_error_set(MOECAL_ERR_FORMAT,
                                    "%s: 'n_group' is %d but must divide n_routed_experts (%d)",
                                    c->label, G, E);
        MOECAL_TRY(get_int(c, "topk_group", 1, 0, 1, G, "n_group", &TG));
        /* noaux_tc scores a group by its two best experts. */
        if (cfg->has_correction_bias && G > 1 && E / G < 2)
            return moecal_error_set(MOECAL_ERR_FORMAT,
                                    "%s: 'n_group' is %d, leaving %d expert per group, but "
                                    "'noaux_tc' needs at least 2 per group",
                                    c->label, G, E / G);
        if (cfg->num_experts_per_tok > TG * (E / G))
            return moecal_error_set(MOECAL_ERR_FORMAT,
                                    "%s: 'num_experts_per_tok' is %d but the %d kept groups "
                                    "(topk_group) of %d experts hold only %d",
                                    c->label, cfg->num_experts_per_tok, TG, E / G, TG * (E / G));
    }
    cfg->n_group = G;
    cfg->topk_group = TG;

    {
        const json_t *v = get(c, "routed_scaling_factor");
        cfg->routed_scaling_factor = 1.0;
        if (v != NULL) {
            if (!json_is_number(v))
                return wrong_type(c, "routed_scaling_factor", v, "a number");
            cfg->routed_scaling_factor = json_number_value(v);
            if (!(cfg->routed_scaling_factor > 0.0) || !isfinite(cfg->routed_scaling_factor))
                return moecal_error_set(MOECAL_ERR_FORMAT,
                                        "%s: 'routed_scaling_factor' is %g but must be > 0",
                                        c->label, cfg->routed_scaling_factor);
        }
    }
    MOECAL_TRY(get_bool(c, "norm_topk_prob", !v2, &cfg->norm_topk_prob));
    MOECAL_TRY(get_int(c, "first_k_dense_replace", 0, 0, 0, cfg->num_hidden_layers,
                       "num_hidden_layers", &cfg->first_k_dense_replace));
    MOECAL_TRY(get_int(c, "moe_layer_freq", 0, 1, 1, MAX_LAYERS, NULL, &cfg->moe_layer_freq));
    return MOECAL_OK;
}

static moecal_status parse_qwen(const ctx *c, moecal_model_config *cfg, bool **mlp_only)
{
    const json_t *v;
    const char *ekey = "num_experts";
    int L = cfg->num_hidden_layers;

    MOECAL_TRY(get_int(c, "moe_intermediate_size", 1, 0, 1, MAX_INTER, NULL,
                       &cfg->moe_intermediate_size));
    /* Qwen3MoeConfig maps num_experts to num_local_experts, which is what
     * transformers 5 writes; Qwen2MoeConfig knows num_experts only */
    if (strcmp(c->model_type, "qwen3_moe") == 0)
        MOECAL_TRY(get_int_alias(c, "num_local_experts", "num_experts", 1, MAX_EXPERTS,
                                 &cfg->n_routed_experts, &ekey));
    else
        MOECAL_TRY(get_int(c, "num_experts", 1, 0, 1, MAX_EXPERTS, NULL,
                           &cfg->n_routed_experts));
    MOECAL_TRY(get_int(c, "num_experts_per_tok", 1, 0, 1, cfg->n_routed_experts, ekey,
                       &cfg->num_experts_per_tok));
    MOECAL_TRY(get_int(c, "decoder_sparse_step", 0, 1, 1, MAX_LAYERS, NULL,
                       &cfg->decoder_sparse_step));
    MOECAL_TRY(get_bool(c, "norm_topk_prob", false, &cfg->norm_topk_prob));
    cfg->scoring = MOECAL_SCORING_SOFTMAX;

    *mlp_only = calloc((size_t)L, sizeof **mlp_only);
    if (*mlp_only == NULL)
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", c->label);
    v = get(c, "mlp_only_layers");
    if (v != NULL) {
        size_t i;
        const json_t *x;
        if (!json_is_array(v))
            return wrong_type(c, "mlp_only_layers", v, "an array of layer indices");
        json_array_foreach(v, i, x) {
            json_int_t l;
            if (!json_is_integer(x))
                return moecal_error_set(MOECAL_ERR_FORMAT,
                                        "%s: 'mlp_only_layers' entry %zu is %s but must be "
                                        "an integer", c->label, i, moecal_json_kind(x));
            l = json_integer_value(x);
            if (l < 0 || l >= L)
                return moecal_error_set(MOECAL_ERR_FORMAT,
                                        "%s: 'mlp_only_layers' entry %zu is %" JSON_INTEGER_FORMAT
                                        " but must be between 0 and num_hidden_layers - 1 (%d)",
                                        c->label, i, l, L - 1);
            (*mlp_only)[l] = true;
        }
    }
    return MOECAL_OK;
}

static moecal_status parse_mixtral(const ctx *c, moecal_model_config *cfg)
{
    const char *ekey;

    MOECAL_TRY(get_int(c, "intermediate_size", 1, 0, 1, MAX_INTER, NULL,
                       &cfg->moe_intermediate_size));
    /* MixtralConfig maps num_experts to num_local_experts */
    MOECAL_TRY(get_int_alias(c, "num_local_experts", "num_experts", 1, MAX_EXPERTS,
                             &cfg->n_routed_experts, &ekey));
    MOECAL_TRY(get_int(c, "num_experts_per_tok", 1, 0, 1, cfg->n_routed_experts, ekey,
                       &cfg->num_experts_per_tok));
    cfg->scoring = MOECAL_SCORING_SOFTMAX;
    cfg->norm_topk_prob = true; /* Mixtral renormalizes its top-k softmax weights */
    return MOECAL_OK;
}

static moecal_status parse_quant(const ctx *top, moecal_model_config *cfg)
{
    const json_t *q = get(top, "quantization_config");
    ctx c = *top;
    const char *method, *fmt;
    const json_t *bs;

    cfg->weight_block[0] = cfg->weight_block[1] = 128;
    if (q == NULL)
        return MOECAL_OK;
    if (!json_is_object(q))
        return wrong_type(top, "quantization_config", q, "an object");
    c.obj = q;
    c.prefix = "quantization_config.";
    MOECAL_TRY(get_str(&c, "quant_method", NULL, &method));
    if (strcmp(method, "fp8") != 0) {
        char s[40];
        safe_copy(s, sizeof s, method);
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED,
                                "%s: 'quantization_config.quant_method' is '%s', which is not "
                                "supported (moecal reads unquantized or 'fp8' block-quantized "
                                "checkpoints)",
                                c.label, s);
    }
    cfg->fp8 = true;
    MOECAL_TRY(get_str(&c, "fmt", "e4m3", &fmt));
    if (strcmp(fmt, "e4m3") != 0) {
        char s[40];
        safe_copy(s, sizeof s, fmt);
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED,
                                "%s: 'quantization_config.fmt' is '%s' but only 'e4m3' is "
                                "supported", c.label, s);
    }
    /* Absent: transformers' FP8 default of 128x128 blocks.  Explicit null
     * would mean per-tensor scales, which these checkpoints do not use. */
    bs = json_object_get(q, "weight_block_size");
    if (bs == NULL)
        return MOECAL_OK;
    if (json_is_null(bs))
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED,
                                "%s: 'quantization_config.weight_block_size' is null: per-tensor "
                                "FP8 scales are not supported", c.label);
    if (!json_is_array(bs))
        return wrong_type(&c, "weight_block_size", bs, "an array of 2 integers");
    if (json_array_size(bs) != 2)
        return moecal_error_set(MOECAL_ERR_FORMAT,
                                "%s: 'quantization_config.weight_block_size' has %zu entries but "
                                "must have 2", c.label, json_array_size(bs));
    for (int i = 0; i < 2; i++) {
        const json_t *x = json_array_get(bs, (size_t)i);
        json_int_t b;
        if (!json_is_integer(x))
            return moecal_error_set(MOECAL_ERR_FORMAT,
                                    "%s: 'quantization_config.weight_block_size'[%d] is %s but "
                                    "must be an integer", c.label, i, moecal_json_kind(x));
        b = json_integer_value(x);
        if (b < 1 || b > MAX_BLOCK)
            return moecal_error_set(MOECAL_ERR_FORMAT,
                                    "%s: 'quantization_config.weight_block_size'[%d] is %"
                                    JSON_INTEGER_FORMAT " but must be between 1 and %d",
                                    c.label, i, b, MAX_BLOCK);
        cfg->weight_block[i] = (int)b;
    }
    if (cfg->weight_block[0] != cfg->weight_block[1])
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED,
                                "%s: 'quantization_config.weight_block_size' is [%d, %d]; only "
                                "square blocks are supported", c.label,
                                cfg->weight_block[0], cfg->weight_block[1]);
    return MOECAL_OK;
}

/* ------------------------------------------------------------------ MoE layers */

static moecal_status moe_layers(const ctx *c, moecal_model_config *cfg, const bool *mlp_only)
{
    int L = cfg->num_hidden_layers, n = 0;

    cfg->moe_layers = malloc((size_t)L * sizeof *cfg->moe_layers);
    if (cfg->moe_layers == NULL)
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", c->label);
    for (int i = 0; i < L; i++) {
        bool moe;
        switch (cfg->family) {
        case MOECAL_FAMILY_DEEPSEEK_V3:
            /* DeepSeek's decoder layer: dense below first_k_dense_replace */
            moe = i >= cfg->first_k_dense_replace && i % cfg->moe_layer_freq == 0;
            break;
        case MOECAL_FAMILY_QWEN3_MOE:
            /* Qwen's decoder layer: sparse every decoder_sparse_step-th layer,
             * counting from 1, unless listed in mlp_only_layers */
            moe = !mlp_only[i] && (i + 1) % cfg->decoder_sparse_step == 0;
            break;
        default:
            moe = true;
            break;
        }
        if (moe)
            cfg->moe_layers[n++] = i;
    }
    cfg->n_moe_layers = n;
    if (n == 0)
        return moecal_error_set(MOECAL_ERR_FORMAT,
                                "%s: no layer of the %d is a MoE layer (check "
                                "first_k_dense_replace, moe_layer_freq, decoder_sparse_step, "
                                "mlp_only_layers)", c->label, L);
    return MOECAL_OK;
}

/* ------------------------------------------------------------------ entry points */

static const struct {
    const char *name;
    moecal_family family;
} model_types[] = {
    {"deepseek_v3", MOECAL_FAMILY_DEEPSEEK_V3},
    {"deepseek_v2", MOECAL_FAMILY_DEEPSEEK_V3},
    {"kimi_k2", MOECAL_FAMILY_DEEPSEEK_V3},
    {"qwen3_moe", MOECAL_FAMILY_QWEN3_MOE},
    {"qwen2_moe", MOECAL_FAMILY_QWEN3_MOE},
    {"mixtral", MOECAL_FAMILY_MIXTRAL},
};

static moecal_status parse_root(const json_t *root, const char *label, moecal_model_config *cfg)
{
    ctx c = {label, root, "", ""};
    const char *mt;
    bool *mlp_only = NULL;
    moecal_status rc;
    size_t i;

    if (!json_is_object(root))
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: the top level is %s but must be "
                                "an object", label, moecal_json_kind(root));
    if (get(&c, "model_type") == NULL)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: missing key 'model_type'", label);
    MOECAL_TRY(get_str(&c, "model_type", NULL, &mt));
    for (i = 0; i < sizeof model_types / sizeof model_types[0]; i++)
        if (strcmp(mt, model_types[i].name) == 0)
            break;
    if (i == sizeof model_types / sizeof model_types[0]) {
        char s[64];
        safe_copy(s, sizeof s, mt);
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED,
                                "%s: model_type '%s' is not supported (supported: deepseek_v3, "
                                "deepseek_v2, kimi_k2, qwen3_moe, qwen2_moe, mixtral)", label, s);
    }
    c.model_type = model_types[i].name;
    cfg->family = model_types[i].family;
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", model_types[i].name);
    cfg->n_group = cfg->topk_group = 1;
    cfg->routed_scaling_factor = 1.0;
    cfg->moe_layer_freq = 1;
    cfg->decoder_sparse_step = 1;

    MOECAL_TRY(get_int(&c, "hidden_size", 1, 0, 1, MAX_HIDDEN, NULL, &cfg->hidden_size));
    MOECAL_TRY(get_int(&c, "num_hidden_layers", 1, 0, 1, MAX_LAYERS, NULL,
                       &cfg->num_hidden_layers));
    switch (cfg->family) {
    case MOECAL_FAMILY_DEEPSEEK_V3:
        rc = parse_deepseek(&c, cfg);
        break;
    case MOECAL_FAMILY_QWEN3_MOE:
        rc = parse_qwen(&c, cfg, &mlp_only);
        break;
    default:
        rc = parse_mixtral(&c, cfg);
        break;
    }
    if (rc == MOECAL_OK)
        rc = parse_quant(&c, cfg);
    if (rc == MOECAL_OK)
        rc = moe_layers(&c, cfg, mlp_only);
    free(mlp_only);
    return rc;
}

moecal_status moecal_model_config_parse(const char *json, size_t len, const char *label,
                                        moecal_model_config *cfg)
{
    json_error_t jerr;
    json_t *root;
    moecal_status rc;

    memset(cfg, 0, sizeof *cfg);
    if (label == NULL)
        label = "config.json";
    /* Duplicate keys are refused: which one wins would be a guess. */
    root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: not valid JSON: %s (line %d, column %d)",
                                label, jerr.text, jerr.line, jerr.column);
    rc = parse_root(root, label, cfg);
    json_decref(root);
    if (rc != MOECAL_OK)
        moecal_model_config_free(cfg);
    return rc;
}

moecal_status moecal_model_config_load(const char *path, moecal_model_config *cfg)
{
    char *buf;
    size_t got;
    moecal_status rc;

    memset(cfg, 0, sizeof *cfg);
    /* never blocks on a FIFO or reads a device */
    MOECAL_TRY(moecal_read_file(path, "config.json", MAX_CONFIG_BYTES, &buf, &got));
    rc = moecal_model_config_parse(buf, got, path, cfg);
    free(buf);
    return rc;
}

void moecal_model_config_free(moecal_model_config *cfg)
{
    if (cfg == NULL)
        return;
    free(cfg->moe_layers);
    memset(cfg, 0, sizeof *cfg);
}

const char *moecal_family_name(moecal_family f)
{
    switch (f) {
    case MOECAL_FAMILY_DEEPSEEK_V3: return "deepseek_v3";
    case MOECAL_FAMILY_QWEN3_MOE: return "qwen3_moe";
    case MOECAL_FAMILY_MIXTRAL: return "mixtral";
    }
    return "unknown";
}
