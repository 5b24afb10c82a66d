/* backend.c - the registry of compute backends.
 *
 * Backends register here by name; the CUDA one exists only in builds
 * configured with CUDA (HAVE_CUDA).  Finding a backend does not say it can
 * run: callers check ops->available (NULL means always).
 */
#include "config.h"

#include <stddef.h>
#include <string.h>

#include "backend.h"

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

const moecal_backend_ops *moecal_backend_auto(void)
{
#ifdef HAVE_CUDA
    if (usable(&moecal_backend_cuda))
        return &moecal_backend_cuda;
#endif
    return usable(&moecal_backend_cpu) ? &moecal_backend_cpu : NULL;
}
