/* test_modelcfg.c - unit tests of config.json parsing (modelcfg.c).
 *
 * Fixtures: $srcdir/tests/data/configs/ (srcdir defaults to ".").
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "modelcfg.h"

static const char *fixture(const char *name)
{
    static char path[4096];
    const char *srcdir = getenv("srcdir");
    snprintf(path, sizeof path, "%s/tests/data/configs/%s", srcdir ? srcdir : ".", name);
    return path;
}

static void assert_msg_has(const char *needle)
{
    if (strstr(moecal_error_message(), needle) == NULL)
        fail_msg("message '%s' lacks '%s'", moecal_error_message(), needle);
}

/* Build a config from per-family defaults, dropping a default whenever
 * `extra` sets the same key (duplicates would be refused), then parse it. */
typedef struct {
    const char *key, *value;
} kv;

static const kv ds_defaults[] = {
    {"model_type", "\"deepseek_v3\""}, {"hidden_size", "64"}, {"num_hidden_layers", "6"},
    {"moe_intermediate_size", "32"}, {"n_routed_experts", "16"}, {"num_experts_per_tok", "4"},
    {"n_group", "4"}, {"topk_group", "2"}, {"first_k_dense_replace", "1"},
    {"topk_method", "\"noaux_tc\""}, {"scoring_func", "\"sigmoid\""}, {NULL, NULL}};

static const kv qwen_defaults[] = {
    {"model_type", "\"qwen3_moe\""}, {"hidden_size", "64"}, {"num_hidden_layers", "8"},
    {"moe_intermediate_size", "32"}, {"num_experts", "16"}, {"num_experts_per_tok", "4"},
    {NULL, NULL}};

static moecal_status parse_with(const kv *defaults, const char *extra, moecal_model_config *cfg)
{
    char buf[8192], key[80];
    size_t n = 0;
    int first = 1;

    n += (size_t)snprintf(buf + n, sizeof buf - n, "{");
    for (const kv *d = defaults; d->key; d++) {
        snprintf(key, sizeof key, "\"%s\"", d->key);
        if (strstr(extra, key))
            continue;
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%s: %s", first ? "" : ", ", key,
                              d->value);
        first = 0;
    }
    if (*extra)
        n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%s", first ? "" : ", ", extra);
    n += (size_t)snprintf(buf + n, sizeof buf - n, "}");
    assert_true(n < sizeof buf);
    return moecal_model_config_parse(buf, n, "cfg.json", cfg);
}

static void expect_fail(const kv *defaults, const char *extra, moecal_status code,
                        const char *needle)
{
    moecal_model_config cfg;
    moecal_status rc = parse_with(defaults, extra, &cfg);
    if (rc != code)
        fail_msg("{%s}: status %d, want %d (%s)", extra, rc, code, moecal_error_message());
    assert_msg_has("cfg.json: ");
    assert_msg_has(needle);
    assert_null(cfg.moe_layers);
    moecal_model_config_free(&cfg);
}

/* ------------------------------------------------------------------ key spellings */

/* The expert count under each spelling transformers accepts (attribute_map):
 * alone, both equal, both different (refused), neither (refused). */
static void spellings(const char *model_type, const char *base, const char *key,
                      const char *alias, int n_moe)
{
    char extra[512], want[160];
    moecal_model_config cfg;
    const char *names[2] = {key, alias};
    kv defaults[] = {{NULL, NULL}};

    for (int i = 0; i < 2; i++) {
        snprintf(extra, sizeof extra, "\"model_type\": \"%s\", %s, \"%s\": 16", model_type,
                 base, names[i]);
        if (parse_with(defaults, extra, &cfg) != MOECAL_OK)
            fail_msg("{%s}: %s", extra, moecal_error_message());
        assert_int_equal(cfg.n_routed_experts, 16);
        assert_int_equal(cfg.n_moe_layers, n_moe);
        moecal_model_config_free(&cfg);
    }
    snprintf(extra, sizeof extra, "\"model_type\": \"%s\", %s, \"%s\": 16, \"%s\": 16",
             model_type, base, key, alias);
    assert_int_equal(parse_with(defaults, extra, &cfg), MOECAL_OK);
    assert_int_equal(cfg.n_routed_experts, 16);
    moecal_model_config_free(&cfg);

    snprintf(extra, sizeof extra, "\"model_type\": \"%s\", %s, \"%s\": 16, \"%s\": 8",
             model_type, base, key, alias);
    snprintf(want, sizeof want, "'%s' is 16 but its alias '%s' is 8", key, alias);
    expect_fail(defaults, extra, MOECAL_ERR_FORMAT, want);

    snprintf(extra, sizeof extra, "\"model_type\": \"%s\", %s", model_type, base);
    snprintf(want, sizeof want, "missing key '%s' (or its alias '%s'", key, alias);
    expect_fail(defaults, extra, MOECAL_ERR_FORMAT, want);

    /* the bound on num_experts_per_tok names the key that was read */
    snprintf(extra, sizeof extra, "\"model_type\": \"%s\", %s, \"%s\": 3", model_type,
             base, alias);
    snprintf(want, sizeof want, "between 1 and %s (3)", alias);
    expect_fail(defaults, extra, MOECAL_ERR_FORMAT, want);
}

static void test_key_spellings(void **state)
{
    const char *common = "\"hidden_size\": 64, \"num_hidden_layers\": 4, "
                         "\"num_experts_per_tok\": 4";
    char base[256];

    (void)state;
    /* Qwen3-MoE: num_experts (transformers 4) or num_local_experts (5) */
    snprintf(base, sizeof base, "%s, \"moe_intermediate_size\": 32", common);
    spellings("qwen3_moe", base, "num_local_experts", "num_experts", 4);
    /* Mixtral: num_local_experts, or num_experts through MixtralConfig's map */
    snprintf(base, sizeof base, "%s, \"intermediate_size\": 32", common);
    spellings("mixtral", base, "num_local_experts", "num_experts", 4);
    /* DeepSeek-V3: n_routed_experts or num_local_experts; V2: num_experts */
    snprintf(base, sizeof base, "%s, \"moe_intermediate_size\": 32, \"n_group\": 4, "
             "\"topk_group\": 2, \"first_k_dense_replace\": 1", common);
    spellings("deepseek_v3", base, "n_routed_experts", "num_local_experts", 3);
    snprintf(base, sizeof base, "%s, \"moe_intermediate_size\": 32", common);
    spellings("deepseek_v2", base, "n_routed_experts", "num_experts", 4);

    /* qwen2_moe has no alias: num_local_experts is not its key */
    kv none[] = {{NULL, NULL}};
    expect_fail(none, "\"model_type\": \"qwen2_moe\", \"hidden_size\": 64, "
                "\"num_hidden_layers\": 4, \"moe_intermediate_size\": 32, "
                "\"num_experts_per_tok\": 4, \"num_local_experts\": 16", MOECAL_ERR_FORMAT,
                "missing key 'num_experts'");
}

/* ------------------------------------------------------------------ fixtures */

static void test_deepseek_v3(void **state)
{
    moecal_model_config cfg;

    (void)state;
    assert_int_equal(moecal_model_config_load(fixture("deepseek-v3.json"), &cfg), MOECAL_OK);
    assert_int_equal(cfg.family, MOECAL_FAMILY_DEEPSEEK_V3);
    assert_string_equal(cfg.model_type, "deepseek_v3");
    assert_string_equal(moecal_family_name(cfg.family), "deepseek_v3");
    assert_int_equal(cfg.hidden_size, 7168);
    assert_int_equal(cfg.moe_intermediate_size, 2048);
    assert_int_equal(cfg.num_hidden_layers, 61);
    assert_int_equal(cfg.n_routed_experts, 256);
    assert_int_equal(cfg.num_experts_per_tok, 8);
    assert_int_equal(cfg.n_group, 8);
    assert_int_equal(cfg.topk_group, 4);
    assert_true(cfg.routed_scaling_factor == 2.5);
    assert_true(cfg.norm_topk_prob);
    assert_int_equal(cfg.scoring, MOECAL_SCORING_SIGMOID);
    assert_string_equal(cfg.topk_method, "noaux_tc");
    assert_true(cfg.has_correction_bias);
    assert_int_equal(cfg.first_k_dense_replace, 3);
    assert_int_equal(cfg.moe_layer_freq, 1);
    assert_true(cfg.fp8);
    assert_int_equal(cfg.weight_block[0], 128);
    assert_int_equal(cfg.weight_block[1], 128);
    assert_int_equal(cfg.n_moe_layers, 58);
    for (int i = 0; i < 58; i++)
        assert_int_equal(cfg.moe_layers[i], 3 + i);
    moecal_model_config_free(&cfg);
    assert_null(cfg.moe_layers);
    moecal_model_config_free(&cfg); /* twice is harmless */
}

static void test_deepseek_v2_lite(void **state)
{
    moecal_model_config cfg;

    (void)state;
    assert_int_equal(moecal_model_config_load(fixture("deepseek-v2-lite.json"), &cfg),
                     MOECAL_OK);
    assert_int_equal(cfg.family, MOECAL_FAMILY_DEEPSEEK_V3);
    assert_string_equal(cfg.model_type, "deepseek_v2");
    assert_int_equal(cfg.scoring, MOECAL_SCORING_SOFTMAX);
    assert_string_equal(cfg.topk_method, "greedy");
    assert_false(cfg.has_correction_bias);
    assert_false(cfg.norm_topk_prob);
    assert_int_equal(cfg.n_routed_experts, 64);
    assert_int_equal(cfg.num_experts_per_tok, 6);
    assert_int_equal(cfg.n_group, 1);
    assert_int_equal(cfg.topk_group, 1);
    assert_false(cfg.fp8);
    assert_int_equal(cfg.n_moe_layers, 26);
    assert_int_equal(cfg.moe_layers[0], 1);
    assert_int_equal(cfg.moe_layers[25], 26);
    moecal_model_config_free(&cfg);
}

static void test_qwen3(void **state)
{
    moecal_model_config cfg;

    (void)state;
    assert_int_equal(moecal_model_config_load(fixture("qwen3-30b-a3b.json"), &cfg), MOECAL_OK);
    assert_int_equal(cfg.family, MOECAL_FAMILY_QWEN3_MOE);
    assert_string_equal(moecal_family_name(cfg.family), "qwen3_moe");
    assert_int_equal(cfg.hidden_size, 2048);
    assert_int_equal(cfg.moe_intermediate_size, 768);
    assert_int_equal(cfg.n_routed_experts, 128);
    assert_int_equal(cfg.num_experts_per_tok, 8);
    assert_int_equal(cfg.n_group, 1);
    assert_int_equal(cfg.topk_group, 1);
    assert_true(cfg.norm_topk_prob);
    assert_int_equal(cfg.scoring, MOECAL_SCORING_SOFTMAX);
    assert_false(cfg.has_correction_bias);
    assert_string_equal(cfg.topk_method, "");
    assert_true(cfg.routed_scaling_factor == 1.0);
    assert_false(cfg.fp8);
    assert_int_equal(cfg.n_moe_layers, 48);
    for (int i = 0; i < 48; i++)
        assert_int_equal(cfg.moe_layers[i], i);
    moecal_model_config_free(&cfg);
}

static void test_mixtral(void **state)
{
    moecal_model_config cfg;

    (void)state;
    assert_int_equal(moecal_model_config_load(fixture("mixtral-8x7b.json"), &cfg), MOECAL_OK);
    assert_int_equal(cfg.family, MOECAL_FAMILY_MIXTRAL);
    assert_string_equal(moecal_family_name(cfg.family), "mixtral");
    assert_int_equal(cfg.hidden_size, 4096);
    assert_int_equal(cfg.moe_intermediate_size, 14336);
    assert_int_equal(cfg.n_routed_experts, 8);
    assert_int_equal(cfg.num_experts_per_tok, 2);
    assert_true(cfg.norm_topk_prob);
    assert_int_equal(cfg.scoring, MOECAL_SCORING_SOFTMAX);
    assert_int_equal(cfg.n_moe_layers, 32);
    assert_int_equal(cfg.moe_layers[31], 31);
    moecal_model_config_free(&cfg);
}

static void expect_fixture_fail(const char *name, moecal_status code, const char *needle)
{
    moecal_model_config cfg;
    const char *path = fixture(name);
    moecal_status rc = moecal_model_config_load(path, &cfg);

    if (rc != code)
        fail_msg("%s: status %d, want %d (%s)", name, rc, code, moecal_error_message());
    assert_msg_has(path);
    assert_msg_has(needle);
    assert_null(cfg.moe_layers);
}

static void test_bad_fixtures(void **state)
{
    (void)state;
    expect_fixture_fail("bad-type.json", MOECAL_ERR_FORMAT,
                        "'hidden_size' is a string but must be an integer");
    expect_fixture_fail("bad-k.json", MOECAL_ERR_FORMAT,
                        "'num_experts_per_tok' is 300 but must be between 1 and "
                        "n_routed_experts (256)");
    expect_fixture_fail("bad-ngroup.json", MOECAL_ERR_FORMAT,
                        "'n_group' is 7 but must divide n_routed_experts (256)");
    expect_fixture_fail("bad-missing.json", MOECAL_ERR_FORMAT,
                        "missing key 'n_routed_experts'");
    expect_fixture_fail("bad-negative.json", MOECAL_ERR_FORMAT,
                        "'moe_intermediate_size' is -2048 but must be between 1 and");
    expect_fixture_fail("bad-model-type.json", MOECAL_ERR_UNSUPPORTED,
                        "model_type 'llama' is not supported");
    expect_fixture_fail("bad-block.json", MOECAL_ERR_FORMAT,
                        "'quantization_config.weight_block_size' has 1 entries but must have 2");
    expect_fixture_fail("bad-notjson.json", MOECAL_ERR_FORMAT, "not valid JSON");
    expect_fixture_fail("does-not-exist.json", MOECAL_ERR_IO, "cannot open");
}

/* ------------------------------------------------------------------ layer rules */

static void test_layer_rules(void **state)
{
    moecal_model_config cfg;

    (void)state;
    /* DeepSeek: i >= first_k_dense_replace && i % moe_layer_freq == 0 */
    assert_int_equal(parse_with(ds_defaults, "\"num_hidden_layers\": 10, "
                                "\"first_k_dense_replace\": 3, \"moe_layer_freq\": 2", &cfg),
                     MOECAL_OK);
    assert_int_equal(cfg.n_moe_layers, 3);
    assert_int_equal(cfg.moe_layers[0], 4);
    assert_int_equal(cfg.moe_layers[1], 6);
    assert_int_equal(cfg.moe_layers[2], 8);
    moecal_model_config_free(&cfg);

    /* Qwen: not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0 */
    assert_int_equal(parse_with(qwen_defaults, "\"decoder_sparse_step\": 2, "
                                "\"mlp_only_layers\": [1, 5, 5]", &cfg), MOECAL_OK);
    assert_int_equal(cfg.n_moe_layers, 2);
    assert_int_equal(cfg.moe_layers[0], 3);
    assert_int_equal(cfg.moe_layers[1], 7);
    moecal_model_config_free(&cfg);

    /* qwen2_moe is the same family; nulls count as absent */
    assert_int_equal(parse_with(qwen_defaults, "\"model_type\": \"qwen2_moe\", "
                                "\"decoder_sparse_step\": null, \"mlp_only_layers\": null, "
                                "\"norm_topk_prob\": null", &cfg), MOECAL_OK);
    assert_int_equal(cfg.family, MOECAL_FAMILY_QWEN3_MOE);
    assert_int_equal(cfg.n_moe_layers, 8);
    assert_false(cfg.norm_topk_prob);
    moecal_model_config_free(&cfg);

    /* defaults for an old-style DeepSeek config */
    assert_int_equal(parse_with(ds_defaults, "\"first_k_dense_replace\": null, "
                                "\"moe_layer_freq\": null, \"routed_scaling_factor\": 1", &cfg),
                     MOECAL_OK);
    assert_int_equal(cfg.n_moe_layers, 6);
    assert_int_equal(cfg.moe_layer_freq, 1);
    assert_true(cfg.routed_scaling_factor == 1.0);
    assert_true(cfg.norm_topk_prob);
    assert_true(cfg.weight_block[0] == 128 && cfg.weight_block[1] == 128);
    moecal_model_config_free(&cfg);

    /* group_limited_greedy keeps its groups; kimi_k2 is DeepSeek-V3 style */
    assert_int_equal(parse_with(ds_defaults, "\"model_type\": \"deepseek_v2\", "
                                "\"topk_method\": \"group_limited_greedy\", "
                                "\"scoring_func\": \"softmax\"", &cfg), MOECAL_OK);
    assert_int_equal(cfg.n_group, 4);
    assert_int_equal(cfg.topk_group, 2);
    assert_false(cfg.has_correction_bias);
    moecal_model_config_free(&cfg);
    assert_int_equal(parse_with(ds_defaults, "\"model_type\": \"kimi_k2\", \"n_group\": 1, "
                                "\"topk_group\": 1", &cfg), MOECAL_OK);
    assert_true(cfg.has_correction_bias);
    moecal_model_config_free(&cfg);

    /* unused keys and FP8 block variants */
    assert_int_equal(parse_with(ds_defaults, "\"vocab_size\": \"whatever\", "
                                "\"quantization_config\": {\"quant_method\": \"fp8\", "
                                "\"weight_block_size\": [64, 64], \"activation_scheme\": 3}",
                                &cfg), MOECAL_OK);
    assert_true(cfg.fp8);
    assert_int_equal(cfg.weight_block[0], 64);
    moecal_model_config_free(&cfg);
    assert_int_equal(parse_with(ds_defaults, "\"quantization_config\": null", &cfg), MOECAL_OK);
    assert_false(cfg.fp8);
    moecal_model_config_free(&cfg);
}

/* ------------------------------------------------------------------ bad values */

static void test_bad_values(void **state)
{
    (void)state;
    expect_fail(ds_defaults, "\"num_experts_per_tok\": 0", MOECAL_ERR_FORMAT,
                "'num_experts_per_tok' is 0 but must be between 1 and n_routed_experts (16)");
    expect_fail(ds_defaults, "\"topk_group\": 5", MOECAL_ERR_FORMAT,
                "'topk_group' is 5 but must be between 1 and n_group (4)");
    expect_fail(ds_defaults, "\"n_group\": 16", MOECAL_ERR_FORMAT, "at least 2 per group");
    expect_fail(ds_defaults, "\"num_experts_per_tok\": 9", MOECAL_ERR_FORMAT,
                "kept groups");
    expect_fail(ds_defaults, "\"n_group\": null", MOECAL_ERR_FORMAT, "missing key 'n_group'");
    expect_fail(ds_defaults, "\"hidden_size\": 7168.0", MOECAL_ERR_FORMAT,
                "'hidden_size' is a real number but must be an integer");
    expect_fail(ds_defaults, "\"hidden_size\": 1e30", MOECAL_ERR_FORMAT, "'hidden_size'");
    expect_fail(ds_defaults, "\"hidden_size\": 99999999999", MOECAL_ERR_FORMAT,
                "'hidden_size' is 99999999999 but must be between 1 and");
    expect_fail(ds_defaults, "\"num_hidden_layers\": true", MOECAL_ERR_FORMAT,
                "'num_hidden_layers' is true but must be an integer");
    expect_fail(ds_defaults, "\"norm_topk_prob\": 1", MOECAL_ERR_FORMAT,
                "'norm_topk_prob' is an integer but must be true or false");
    expect_fail(ds_defaults, "\"routed_scaling_factor\": \"2.5\"", MOECAL_ERR_FORMAT,
                "'routed_scaling_factor' is a string but must be a number");
    expect_fail(ds_defaults, "\"routed_scaling_factor\": -1.0", MOECAL_ERR_FORMAT,
                "'routed_scaling_factor' is -1 but must be > 0");
    expect_fail(ds_defaults, "\"first_k_dense_replace\": 6", MOECAL_ERR_FORMAT,
                "no layer of the 6 is a MoE layer");
    expect_fail(ds_defaults, "\"first_k_dense_replace\": 7", MOECAL_ERR_FORMAT,
                "between 0 and num_hidden_layers (6)");
    expect_fail(ds_defaults, "\"moe_layer_freq\": 0", MOECAL_ERR_FORMAT, "'moe_layer_freq'");
    expect_fail(ds_defaults, "\"scoring_func\": \"softmax\"", MOECAL_ERR_UNSUPPORTED,
                "'noaux_tc' needs 'scoring_func' 'sigmoid'");
    expect_fail(ds_defaults, "\"scoring_func\": \"relu\"", MOECAL_ERR_UNSUPPORTED,
                "'scoring_func' is 'relu'");
    expect_fail(ds_defaults, "\"topk_method\": \"random\"", MOECAL_ERR_UNSUPPORTED,
                "'topk_method' is 'random'");
    expect_fail(ds_defaults, "\"topk_method\": 3", MOECAL_ERR_FORMAT,
                "'topk_method' is an integer but must be a string");
    expect_fail(ds_defaults, "\"model_type\": \"bert\"", MOECAL_ERR_UNSUPPORTED,
                "model_type 'bert' is not supported");
    expect_fail(ds_defaults, "\"model_type\": 3", MOECAL_ERR_FORMAT,
                "'model_type' is an integer but must be a string");
    expect_fail(ds_defaults, "\"model_type\": null", MOECAL_ERR_FORMAT,
                "missing key 'model_type'");
    expect_fail(ds_defaults, "\"vocab_size\": 1, \"vocab_size\": 2", MOECAL_ERR_FORMAT,
                "duplicate");
    expect_fail(ds_defaults, "\"model_type\": \"deepseek\\u0000_v3\"", MOECAL_ERR_FORMAT,
                "not valid JSON");
    expect_fail(ds_defaults, "\"quantization_config\": []", MOECAL_ERR_FORMAT,
                "'quantization_config' is an array but must be an object");
    expect_fail(ds_defaults, "\"quantization_config\": {}", MOECAL_ERR_FORMAT,
                "missing key 'quantization_config.quant_method'");
    expect_fail(ds_defaults, "\"quantization_config\": {\"quant_method\": \"gptq\"}",
                MOECAL_ERR_UNSUPPORTED,
                "'quantization_config.quant_method' is 'gptq', which is not supported");
    expect_fail(ds_defaults, "\"quantization_config\": {\"quant_method\": \"fp8\", "
                "\"fmt\": \"e5m2\"}", MOECAL_ERR_UNSUPPORTED, "only 'e4m3'");
    expect_fail(ds_defaults, "\"quantization_config\": {\"quant_method\": \"fp8\", "
                "\"weight_block_size\": [128, 64]}", MOECAL_ERR_UNSUPPORTED, "square");
    expect_fail(ds_defaults, "\"quantization_config\": {\"quant_method\": \"fp8\", "
                "\"weight_block_size\": [0, 128]}", MOECAL_ERR_FORMAT,
                "'quantization_config.weight_block_size'[0] is 0 but must be between 1 and");
    expect_fail(ds_defaults, "\"quantization_config\": {\"quant_method\": \"fp8\", "
                "\"weight_block_size\": [\"128\", 128]}", MOECAL_ERR_FORMAT,
                "weight_block_size'[0] is a string");
    expect_fail(ds_defaults, "\"quantization_config\": {\"quant_method\": \"fp8\", "
                "\"weight_block_size\": null}", MOECAL_ERR_UNSUPPORTED, "per-tensor");
    expect_fail(qwen_defaults, "\"num_experts\": 0", MOECAL_ERR_FORMAT,
                "'num_experts' is 0 but must be between 1 and");
    expect_fail(qwen_defaults, "\"num_experts_per_tok\": 17", MOECAL_ERR_FORMAT,
                "between 1 and num_experts (16)");
    expect_fail(qwen_defaults, "\"mlp_only_layers\": [8]", MOECAL_ERR_FORMAT,
                "'mlp_only_layers' entry 0 is 8 but must be between 0 and");
    expect_fail(qwen_defaults, "\"mlp_only_layers\": [0, \"1\"]", MOECAL_ERR_FORMAT,
                "'mlp_only_layers' entry 1 is a string");
    expect_fail(qwen_defaults, "\"mlp_only_layers\": 3", MOECAL_ERR_FORMAT,
                "'mlp_only_layers' is an integer but must be an array");
    expect_fail(qwen_defaults, "\"mlp_only_layers\": [0,1,2,3,4,5,6,7]", MOECAL_ERR_FORMAT,
                "no layer of the 8 is a MoE layer");
    expect_fail(qwen_defaults, "\"decoder_sparse_step\": 9", MOECAL_ERR_FORMAT,
                "no layer of the 8");
}

static void test_bad_documents(void **state)
{
    moecal_model_config cfg;
    const char *mix = "{\"model_type\": \"mixtral\", \"hidden_size\": 8, "
                      "\"num_hidden_layers\": 2, \"intermediate_size\": 4, "
                      "\"num_local_experts\": 4, \"num_experts_per_tok\": 2}";

    (void)state;
    assert_int_equal(moecal_model_config_parse("[1, 2]", 6, "c.json", &cfg), MOECAL_ERR_FORMAT);
    assert_msg_has("c.json: the top level is an array but must be an object");
    assert_int_equal(moecal_model_config_parse("", 0, "c.json", &cfg), MOECAL_ERR_FORMAT);
    assert_msg_has("c.json: not valid JSON");
    assert_int_equal(moecal_model_config_parse("{} {}", 5, NULL, &cfg), MOECAL_ERR_FORMAT);
    assert_msg_has("config.json: not valid JSON");
    /* the length is honoured: the document is not NUL-terminated */
    assert_int_equal(moecal_model_config_parse(mix, strlen(mix), "m.json", &cfg), MOECAL_OK);
    assert_int_equal(cfg.n_moe_layers, 2);
    moecal_model_config_free(&cfg);
    assert_int_equal(moecal_model_config_parse(mix, strlen(mix) - 1, "m.json", &cfg),
                     MOECAL_ERR_FORMAT);
    assert_int_equal(moecal_model_config_parse("{\"hidden_size\": 8}", 18, "c.json", &cfg),
                     MOECAL_ERR_FORMAT);
    assert_msg_has("c.json: missing key 'model_type'");
    assert_string_equal(moecal_family_name((moecal_family)0), "unknown");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deepseek_v3),
        cmocka_unit_test(test_key_spellings),
        cmocka_unit_test(test_deepseek_v2_lite),
        cmocka_unit_test(test_qwen3),
        cmocka_unit_test(test_mixtral),
        cmocka_unit_test(test_bad_fixtures),
        cmocka_unit_test(test_layer_rules),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test(test_bad_documents),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
