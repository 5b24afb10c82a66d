/* dtype.h - element types moecal reads and writes. */
#ifndef MOECAL_DTYPE_H
#define MOECAL_DTYPE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moecal_dtype {
    MOECAL_DT_UNKNOWN = 0,
    MOECAL_DT_F8_E4M3, /* safetensors "F8_E4M3" (OCP e4m3fn: no Inf, NaN = S.1111.111) */
    MOECAL_DT_BF16,    /* "BF16" */
    MOECAL_DT_F16,     /* "F16" */
    MOECAL_DT_F32,     /* "F32" */
    /* recognised by name, refused where a float type is needed */
    MOECAL_DT_F64, MOECAL_DT_F8_E5M2, MOECAL_DT_I8, MOECAL_DT_U8, MOECAL_DT_I16,
    MOECAL_DT_U16, MOECAL_DT_I32, MOECAL_DT_U32, MOECAL_DT_I64, MOECAL_DT_U64,
    MOECAL_DT_BOOL
} moecal_dtype;

/* Bytes per element, 0 for MOECAL_DT_UNKNOWN. */
size_t moecal_dtype_size(moecal_dtype t);
/* safetensors spelling ("F8_E4M3", "BF16", ...). */
const char *moecal_dtype_name(moecal_dtype t);
/* Inverse of moecal_dtype_name; MOECAL_DT_UNKNOWN if not a safetensors dtype. */
moecal_dtype moecal_dtype_from_name(const char *name);

#ifdef __cplusplus
}
#endif
#endif
