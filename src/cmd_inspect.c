/* cmd_inspect.c - `moecal inspect PATH`: what moecal understands of a
 * checkpoint directory, an activation file or an amax file. */
#include "config.h"

#include <dirent.h>
#include <hdf5.h>
#include <jansson.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "activations.h"
#include "amaxread.h"
#include "calibrate_opts.h"
#include "commands.h"
#include "model.h"
#include "runtime.h"

static const moecal_optdef defs[] = {
    {"json", 'j', MOECAL_OPT_FLAG, "0", NULL, NULL, "print JSON instead of text", 0, 0, 0},
    MOECAL_OPT_END
};

static json_t *layers_json(const int *l, int n)
{
    json_t *a = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(a, json_integer(l[i]));
    return a;
}

static moecal_status inspect_model(const char *dir, json_t *j)
{
    moecal_model *m = NULL;
    const moecal_model_config *c;
    const moecal_st_file *f;
    const moecal_st_tensor *t;
    char name[256];
    const char *wdtype = "?";
    unsigned long long bytes = 0;
    int shards = 0;
    DIR *d;
    struct dirent *de;

    MOECAL_TRY(moecal_model_open(dir, &m));
    c = moecal_model_cfg(m);
    if (c->n_moe_layers > 0) {
        moecal_model_expert_name(m, c->moe_layers[0], 0, MOECAL_W1, name, sizeof name);
        if (moecal_model_find(m, name, &f, &t) == MOECAL_OK)
            wdtype = t->dtype_name;
    }
    d = opendir(dir);
    while (d && (de = readdir(d)) != NULL) {
        size_t n = strlen(de->d_name);
        char path[4200];
        struct stat st;
        if (n > 12 && strcmp(de->d_name + n - 12, ".safetensors") == 0) {
            snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
            if (stat(path, &st) == 0) {
                bytes += (unsigned long long)st.st_size;
                shards++;
            }
        }
    }
    if (d)
        closedir(d);
    json_object_set_new(j, "kind", json_string("checkpoint"));
    json_object_set_new(j, "path", json_string(dir));
    json_object_set_new(j, "model_type", json_string(c->model_type));
    json_object_set_new(j, "family", json_string(moecal_family_name(c->family)));
    json_object_set_new(j, "num_hidden_layers", json_integer(c->num_hidden_layers));
    json_object_set_new(j, "moe_layers", layers_json(c->moe_layers, c->n_moe_layers));
    json_object_set_new(j, "n_routed_experts", json_integer(c->n_routed_experts));
    json_object_set_new(j, "num_experts_per_tok", json_integer(c->num_experts_per_tok));
    json_object_set_new(j, "n_group", json_integer(c->n_group));
    json_object_set_new(j, "topk_group", json_integer(c->topk_group));
    json_object_set_new(j, "hidden_size", json_integer(c->hidden_size));
    json_object_set_new(j, "moe_intermediate_size", json_integer(c->moe_intermediate_size));
    json_object_set_new(j, "scoring_func", json_string(c->scoring == MOECAL_SCORING_SIGMOID ?
                                                       "sigmoid" : "softmax"));
    json_object_set_new(j, "topk_method", json_string(c->topk_method));
    json_object_set_new(j, "expert_dtype", json_string(wdtype));
    if (c->fp8) {
        json_t *b = json_array();
        json_array_append_new(b, json_integer(c->weight_block[0]));
        json_array_append_new(b, json_integer(c->weight_block[1]));
        json_object_set_new(j, "fp8_block", b);
    }
    json_object_set_new(j, "shards", json_integer(shards));
    json_object_set_new(j, "total_bytes", json_integer((json_int_t)bytes));
    /* moecal_model_open has checked that every router and expert tensor the
     * config implies is listed and that every shard exists. */
    json_object_set_new(j, "missing_tensors", json_array());
    moecal_model_close(m);
    return MOECAL_OK;
}

static moecal_status h5_format(const char *path, char *buf, size_t len)
{
    hid_t f, a, t, mt;
    moecal_status s = MOECAL_OK;

    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
    if (H5Fis_hdf5(path) <= 0)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s is neither a checkpoint directory nor an "
                                "HDF5 file", path);
    f = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    if (f < 0)
        return moecal_error_set(MOECAL_ERR_IO, "%s: cannot open", path);
    buf[0] = '\0';
    if (H5Aexists(f, "format") > 0) {
        a = H5Aopen(f, "format", H5P_DEFAULT);
        t = H5Aget_type(a);
        if (H5Tget_class(t) == H5T_STRING && H5Tis_variable_str(t) > 0) {
            char *v = NULL;
            mt = H5Tcopy(H5T_C_S1);
            H5Tset_size(mt, H5T_VARIABLE);
            H5Tset_cset(mt, H5Tget_cset(t));
            if (H5Aread(a, mt, &v) >= 0 && v) {
                snprintf(buf, len, "%s", v);
                H5free_memory(v);
            }
            H5Tclose(mt);
        } else if (H5Tget_class(t) == H5T_STRING && H5Tget_size(t) < len) {
            mt = H5Tcopy(H5T_C_S1);
            H5Tset_size(mt, H5Tget_size(t) + 1);
            H5Tset_cset(mt, H5Tget_cset(t));
            memset(buf, 0, len);
            H5Aread(a, mt, buf);
            H5Tclose(mt);
        }
        H5Tclose(t);
        H5Aclose(a);
    }
    H5Fclose(f);
    if (strcmp(buf, "moecal-activations") != 0 && strcmp(buf, "moecal-amax") != 0)
        s = moecal_error_set(MOECAL_ERR_FORMAT, "%s: an HDF5 file but neither a moecal "
                             "activation file nor an amax file (root attribute format is "
                             "'%s')", path, buf);
    return s;
}

static moecal_status inspect_h5(const char *path, json_t *j)
{
    char fmt[64];

    MOECAL_TRY(h5_format(path, fmt, sizeof fmt));
    json_object_set_new(j, "path", json_string(path));
    if (strcmp(fmt, "moecal-activations") == 0) {
        moecal_act *a = NULL;
        MOECAL_TRY(moecal_act_open(path, MPI_COMM_NULL, &a));
        json_object_set_new(j, "kind", json_string("activations"));
        json_object_set_new(j, "tokens", json_integer(moecal_act_tokens(a)));
        json_object_set_new(j, "hidden_size", json_integer(moecal_act_hidden(a)));
        json_object_set_new(j, "layers", layers_json(moecal_act_layers(a), moecal_act_n_layers(a)));
        json_object_set_new(j, "dtype", json_string(moecal_dtype_name(moecal_act_dtype(a))));
        json_object_set_new(j, "chunk_rows", json_integer(moecal_act_chunk_rows(a)));
        moecal_act_close(a);
    } else {
        moecal_amax_data *d = NULL;
        MOECAL_TRY(moecal_amax_data_read(path, MOECAL_AMAXREAD_TOKENS, &d));
        json_object_set_new(j, "kind", json_string("amax"));
        json_object_set_new(j, "model_type", json_string(d->model_type));
        json_object_set_new(j, "mode", json_string(d->mode));
        json_object_set_new(j, "sync", json_string(d->sync));
        json_object_set_new(j, "quant_format", json_string(d->quant_format));
        json_object_set_new(j, "created", json_string(d->created));
        json_object_set_new(j, "moecal_version", json_string(d->moecal_version));
        json_object_set_new(j, "layers", layers_json(d->layers, d->L));
        json_object_set_new(j, "n_routed_experts", json_integer(d->E));
        json_object_set_new(j, "chunks", json_integer(d->C));
        json_object_set_new(j, "tokens", json_integer(d->tokens));
        {
            int64_t never = 0;
            for (int l = 0; l < d->L; l++)
                for (int e = 0; e < d->E; e++) {
                    int64_t t = 0;
                    for (int c = 0; c < d->C; c++)
                        t += d->tokens_per_expert[((size_t)l * d->C + c) * d->E + e];
                    never += t == 0;
                }
            json_object_set_new(j, "never_routed_experts", json_integer(never));
        }
        moecal_amax_data_free(d);
    }
    return MOECAL_OK;
}

static void print_text(json_t *j)
{
    const char *key;
    json_t *v;

    json_object_foreach(j, key, v) {
        char *txt = json_is_string(v) ? NULL : json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
        printf("%-22s %s\n", key, txt ? txt : json_string_value(v));
        free(txt);
    }
}

int moecal_cmd_inspect(int argc, char **argv)
{
    moecal_opts *o = NULL;
    moecal_status s;
    struct stat st;
    const char *path;
    json_t *j;

    s = moecal_opts_parse("inspect", defs, "PATH", argc, argv, &o);
    if (s != MOECAL_OK)
        moecal_fatal_all(s);
    if (moecal_opts_help(o)) {
        if (moecal_world_rank() == 0)
            moecal_opts_usage("inspect", defs, "PATH",
                              "Describe a checkpoint directory, an activation file or an amax "
                              "file.", stdout);
        moecal_opts_free(o);
        return 0;
    }
    if (moecal_opts_npos(o) != 1) {
        moecal_error_set(MOECAL_ERR_USAGE, "moecal inspect takes one PATH (see --help)");
        moecal_fatal_all(MOECAL_ERR_USAGE);
    }
    path = moecal_opts_pos(o, 0);
    j = json_object();
    if (moecal_world_rank() == 0) {
        if (stat(path, &st) != 0)
            s = moecal_error_set(MOECAL_ERR_IO, "%s: no such file or directory", path);
        else if (S_ISDIR(st.st_mode))
            s = inspect_model(path, j);
        else
            s = inspect_h5(path, j);
        if (s == MOECAL_OK) {
            if (moecal_opts_flag(o, "json")) {
                json_dumpf(j, stdout, JSON_INDENT(2));
                putchar('\n');
            } else {
                print_text(j);
            }
        }
    }
    json_decref(j);
    moecal_check_all(s);
    moecal_opts_free(o);
    return 0;
}
