/* dtype.c - element types, named as the safetensors format spells them. */
#include "config.h"

#include <string.h>

#include "dtype.h"

static const struct {
    const char *name;
    size_t size;
} dtypes[] = {
    [MOECAL_DT_UNKNOWN] = { "unknown", 0 },
    [MOECAL_DT_F8_E4M3] = { "F8_E4M3", 1 },
    [MOECAL_DT_BF16] = { "BF16", 2 },
    [MOECAL_DT_F16] = { "F16", 2 },
    [MOECAL_DT_F32] = { "F32", 4 },
    [MOECAL_DT_F64] = { "F64", 8 },
    [MOECAL_DT_F8_E5M2] = { "F8_E5M2", 1 },
    [MOECAL_DT_I8] = { "I8", 1 },
    [MOECAL_DT_U8] = { "U8", 1 },
    [MOECAL_DT_I16] = { "I16", 2 },
    [MOECAL_DT_U16] = { "U16", 2 },
    [MOECAL_DT_I32] = { "I32", 4 },
    [MOECAL_DT_U32] = { "U32", 4 },
    [MOECAL_DT_I64] = { "I64", 8 },
    [MOECAL_DT_U64] = { "U64", 8 },
    [MOECAL_DT_BOOL] = { "BOOL", 1 },
};

#define N_DTYPES (sizeof dtypes / sizeof dtypes[0])

/* The enum is also read from files and other modules: never index blindly. */
static int valid(moecal_dtype t)
{
    return (unsigned)t < N_DTYPES;
}

size_t moecal_dtype_size(moecal_dtype t)
{
    return valid(t) ? dtypes[t].size : 0;
}

const char *moecal_dtype_name(moecal_dtype t)
{
    return valid(t) ? dtypes[t].name : dtypes[MOECAL_DT_UNKNOWN].name;
}

moecal_dtype moecal_dtype_from_name(const char *name)
{
    if (!name)
        return MOECAL_DT_UNKNOWN;
    /* Case-sensitive, as the format is: "bf16" is not a safetensors dtype. */
    for (size_t i = 1; i < N_DTYPES; i++)
        if (strcmp(name, dtypes[i].name) == 0)
            return (moecal_dtype)i;
    return MOECAL_DT_UNKNOWN;
}
