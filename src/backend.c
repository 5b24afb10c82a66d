/* backend.c - the registry of compute backends.
 *
 * Backends register here by name; the CUDA one exists only in builds
 * configured with CUDA (HAVE_CUDA).  Finding a backend does not say it can
 * run: callers check ops->available (NULL means always).
 */
#include "config.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "options.h"
#include "router.h"

static const moecal_backend_ops *const registry[] = {
#ifdef HAVE_CUDA
    &moecal_backend_cuda,
#endif
    &moecal_backend_cpu,
};

static bool usable(const moecal_backend_ops *ops)
{
    return ops->available == NULL || ops->available();
}

const moecal_backend_ops *moecal_backend_find(const char *name)
{
    if (name == NULL)
        return NULL;
    if (strcmp(name, "auto") == 0)
        return moecal_backend_auto();
    for (size_t i = 0; i < sizeof registry / sizeof registry[0]; i++) {
        if (strcmp(registry[i]->name, name) == 0)
            return registry[i];
    }
    return NULL;
}

const moecal_backend_ops *moecal_backend_at(int i)
{
    return i >= 0 && (size_t)i < sizeof registry / sizeof registry[0] ? registry[i] : NULL;
}

const moecal_backend_ops *moecal_backend_auto(void)
{
#ifdef HAVE_CUDA
    if (usable(&moecal_backend_cuda))
        return &moecal_backend_cuda;
#endif
    return usable(&moecal_backend_cpu) ? &moecal_backend_cpu : NULL;
}

static size_t count(const moecal_optdef *d)
{
    size_t n = 0;
    while (d && d[n].name)
        n++;
    return n;
}

moecal_optdef *moecal_backend_add_options(const moecal_optdef *defs)
{
    size_t n = count(defs), k = n;
    const size_t nreg = sizeof registry / sizeof registry[0];
    moecal_optdef *all;

    for (size_t i = 0; i < nreg; i++)
        n += count(registry[i]->options);
    if (!(all = malloc((n + 1) * sizeof *all)))
        return NULL;
    memcpy(all, defs, k * sizeof *all);
    for (size_t i = 0; i < nreg; i++) {
        size_t m = count(registry[i]->options);
        memcpy(all + k, registry[i]->options, m * sizeof *all);
        /* stored by the backend in its own struct, not in the command's */
        for (size_t j = k; j < k + m; j++)
            all[j].field = MOECAL_FIELD_NONE;
        k += m;
    }
    all[k] = (moecal_optdef)MOECAL_OPT_END;
    return all;
}

char *moecal_backend_settings(const moecal_backend_ops *ops, const moecal_opts *o)
{
    size_t len = 1, used = 0;
    const moecal_optdef *d = ops->options;
    char *out;

    for (size_t i = 0; o && d && d[i].name; i++) {
        const char *v = moecal_opts_str(o, d[i].name);
        len += strlen(d[i].name) + (v ? strlen(v) : 5) + 2;
    }
    if (!(out = malloc(len)))
        return NULL;
    out[0] = '\0';
    for (size_t i = 0; o && d && d[i].name; i++) {
        const char *v = moecal_opts_str(o, d[i].name);
        used += (size_t)snprintf(out + used, len - used, "%s%s=%s", used ? " " : "", d[i].name,
                                 v ? v : "unset");
    }
    return out;
}

moecal_status moecal_backend_check_config(const moecal_backend_config *cfg, const char *name)
{
    const moecal_model_config *m;

    if (cfg == NULL || cfg->model == NULL)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s backend: no configuration", name);
    m = cfg->model;
    MOECAL_TRY(moecal_router_check(m));
    if (m->hidden_size < 1 || m->moe_intermediate_size < 1)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s backend: hidden size %d, "
                                "intermediate size %d", name, m->hidden_size,
                                m->moe_intermediate_size);
    if (cfg->e0 < 0 || cfg->e1 < cfg->e0 || cfg->e1 > m->n_routed_experts)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s backend: expert range [%d, %d) "
                                "outside [0, %d)", name, cfg->e0, cfg->e1,
                                m->n_routed_experts);
    if (cfg->max_chunk_tokens < 1 || cfg->max_chunk_tokens > INT32_MAX)
        return moecal_error_set(MOECAL_ERR_USAGE, "%s backend: chunk of %lld tokens "
                                "(1 to %d)", name, (long long)cfg->max_chunk_tokens, INT32_MAX);
    if (cfg->threads < 0)
        return moecal_error_set(MOECAL_ERR_USAGE, "%s backend: %d threads", name, cfg->threads);
    return MOECAL_OK;
}
