/* h5util.c - HDF5 helpers shared by the readers of moecal's files. */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "h5util.h"

/* The innermost (last walked, most specific) description on the stack. */
static herr_t last_desc(unsigned n, const H5E_error2_t *e, void *data)
{
    (void)n;
    if (e && e->desc && *e->desc)
        snprintf((char *)data, 256, "%s: %s", e->func_name ? e->func_name : "?", e->desc);
    return 0;
}

moecal_status moecal_h5_fail(const char *where, const char *fmt, ...)
{
    char desc[256] = "", what[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, last_desc, desc);
    if (desc[0])
        return moecal_error_set(MOECAL_ERR_HDF5, "%s: %s failed (HDF5: %s)", where, what, desc);
    return moecal_error_set(MOECAL_ERR_HDF5, "%s: %s failed", where, what);
}

/* An attribute opened with its type and space; all -1 when it does not
 * exist (*found false: MOECAL_OK unless required). */
typedef struct h5attr {
    hid_t attr, type, space;
} h5attr;

static void attr_close(h5attr *a)
{
    moecal_h5_close(&a->space);
    moecal_h5_close(&a->type);
    moecal_h5_close(&a->attr);
}

static moecal_status attr_open(hid_t obj, const char *path, const char *name, bool required,
                               bool *found, h5attr *a)
{
    htri_t ex = H5Aexists(obj, name);

    a->attr = a->type = a->space = -1;
    if (found)
        *found = false;
    if (ex < 0)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: cannot look up attribute '%s'", path,
                                name);
    if (ex == 0)
        return required ? moecal_error_set(MOECAL_ERR_FORMAT, "%s: attribute '%s' missing",
                                           path, name)
                        : MOECAL_OK;
    if (found)
        *found = true;
    if ((a->attr = H5Aopen(obj, name, H5P_DEFAULT)) < 0 ||
        (a->type = H5Aget_type(a->attr)) < 0 || (a->space = H5Aget_space(a->attr)) < 0) {
        attr_close(a);
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: cannot open attribute '%s'", path, name);
    }
    return MOECAL_OK;
}

moecal_status moecal_h5_attr_str(hid_t obj, const char *path, const char *name, bool required,
                                 char *buf, size_t len, bool *found)
{
    h5attr a;
    hid_t attr, type, mt = -1;
    moecal_status st = MOECAL_OK;
    bool here = false;
    char *v = NULL;
    bool vlen = false;

    buf[0] = '\0';
    MOECAL_TRY(attr_open(obj, path, name, required, &here, &a));
    if (found)
        *found = here;
    if (!here)
        return MOECAL_OK;
    attr = a.attr;
    type = a.type;
    if (H5Tget_class(type) != H5T_STRING || H5Sget_simple_extent_npoints(a.space) != 1) {
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: attribute '%s' is not one string", path,
                              name);
        goto out;
    }
    vlen = H5Tis_variable_str(type) > 0;
    if ((mt = H5Tcopy(H5T_C_S1)) < 0 || H5Tset_cset(mt, H5Tget_cset(type)) < 0) {
        st = moecal_error_set(MOECAL_ERR_HDF5, "%s: attribute '%s': no memory type", path, name);
        goto out;
    }
    if (vlen) {
        if (H5Tset_size(mt, H5T_VARIABLE) < 0 || H5Aread(attr, mt, &v) < 0) {
            st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: cannot read attribute '%s'", path,
                                  name);
            goto out;
        }
    } else {
        size_t n = H5Tget_size(type);
        if (n == 0 || n > (1u << 20)) {
            st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: attribute '%s' is a string of %zu "
                                  "bytes", path, name, n);
            goto out;
        }
        if (!(v = calloc(n + 1, 1))) {
            st = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory", path);
            goto out;
        }
        if (H5Tset_size(mt, n) < 0 || H5Tset_strpad(mt, H5T_STR_NULLPAD) < 0 ||
            H5Aread(attr, mt, v) < 0) {
            st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: cannot read attribute '%s'", path,
                                  name);
            goto out;
        }
        /* space-padded strings (Fortran writers) */
        for (size_t i = strlen(v); i > 0 && v[i - 1] == ' '; i--)
            v[i - 1] = '\0';
    }
    if (v && strlen(v) >= len)
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: attribute '%s' is too long (%zu "
                              "characters, at most %zu)", path, name, strlen(v), len - 1);
    else if (v)
        memcpy(buf, v, strlen(v) + 1);
out:
    if (vlen && v)
        H5free_memory(v);
    else
        free(v);
    if (mt >= 0)
        H5Tclose(mt);
    attr_close(&a);
    return st;
}

/* One number of class want, read as mt into v (attr_int, attr_float). */
static moecal_status attr_number(hid_t obj, const char *path, const char *name, bool required,
                                 H5T_class_t want, hid_t mt, void *v, bool *found)
{
    h5attr a;
    moecal_status st = MOECAL_OK;
    bool here = false;

    MOECAL_TRY(attr_open(obj, path, name, required, &here, &a));
    if (found)
        *found = here;
    if (!here)
        return MOECAL_OK;
    hssize_t n = H5Sget_simple_extent_npoints(a.space);
    H5T_class_t cls = H5Tget_class(a.type);
    if (cls != want || n != 1)
        st = moecal_error_set(MOECAL_ERR_FORMAT, "%s: attribute '%s' is %s with %lld "
                              "element(s); expected one %s", path, name,
                              cls == H5T_INTEGER ? "an integer"
                              : cls == H5T_STRING ? "a string"
                              : cls == H5T_FLOAT ? "a float" : "not a number",
                              (long long)n, want == H5T_INTEGER ? "integer" : "float");
    else if (H5Aread(a.attr, mt, v) < 0)
        st = moecal_h5_fail(path, "reading attribute '%s'", name);
    attr_close(&a);
    return st;
}

moecal_status moecal_h5_attr_int(hid_t obj, const char *path, const char *name, bool required,
                                 int64_t *v, bool *found)
{
    return attr_number(obj, path, name, required, H5T_INTEGER, H5T_NATIVE_INT64, v, found);
}

moecal_status moecal_h5_attr_float(hid_t obj, const char *path, const char *name,
                                   bool required, double *v, bool *found)
{
    return attr_number(obj, path, name, required, H5T_FLOAT, H5T_NATIVE_DOUBLE, v, found);
}

/* Close an id of any kind if it is valid; errors while cleaning up are
 * ignored (the first error is the one reported). */
void moecal_h5_close(hid_t *id)
{
    if (*id < 0)
        return;
    switch (H5Iget_type(*id)) {
    case H5I_FILE: H5Fclose(*id); break;
    case H5I_GROUP: H5Gclose(*id); break;
    case H5I_DATATYPE: H5Tclose(*id); break;
    case H5I_DATASPACE: H5Sclose(*id); break;
    case H5I_DATASET: H5Dclose(*id); break;
    case H5I_ATTR: H5Aclose(*id); break;
    case H5I_GENPROP_LST: H5Pclose(*id); break;
    default: H5Idec_ref(*id); break;
    }
    *id = -1;
}

void moecal_h5_close_array(hid_t *ids, int n)
{
    for (int i = 0; ids && i < n; i++)
        moecal_h5_close(&ids[i]);
    free(ids);
}
