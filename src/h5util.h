/* h5util.h - HDF5 helpers shared by the readers of moecal's files. */
#ifndef MOECAL_H5UTIL_H
#define MOECAL_H5UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <hdf5.h>

#include "error.h"

/* The one string attribute `name` of obj (a file or an object) into buf of
 * len bytes: fixed or variable length, ASCII or UTF-8 (HDF5 converts
 * neither into the other, so the file's character set is used), scalar or
 * one element, NUL- or space-padded.  *found (may be NULL) tells whether it
 * exists; when it does not: MOECAL_OK and "" unless required, then
 * MOECAL_ERR_FORMAT "PATH: attribute 'NAME' missing".  Not one string, or
 * longer than len - 1: MOECAL_ERR_FORMAT naming path and attribute. */
moecal_status moecal_h5_attr_str(hid_t obj, const char *path, const char *name, bool required,
                                 char *buf, size_t len, bool *found);

/* The integer attribute `name` of obj (any integer type, scalar or one
 * element) into *v.  *found (may be NULL) tells whether it exists; when it
 * does not: MOECAL_OK with *v unchanged unless required, then
 * MOECAL_ERR_FORMAT "PATH: attribute 'NAME' missing".  Another type or
 * count: MOECAL_ERR_FORMAT naming what it is. */
moecal_status moecal_h5_attr_int(hid_t obj, const char *path, const char *name, bool required,
                                 int64_t *v, bool *found);
/* The same for one float (any float type), as a double. */
moecal_status moecal_h5_attr_float(hid_t obj, const char *path, const char *name,
                                   bool required, double *v, bool *found);

/* Record MOECAL_ERR_HDF5 "WHERE: WHAT failed" (WHAT formatted from fmt),
 * with the innermost message of HDF5's error stack when it has one ("...
 * (HDF5: H5Dread: can't read data)"), and return it.  moecal turns HDF5's
 * printing of the stack off. */
/* Close *id, whatever kind of id it is, if it is valid, and set it to -1;
 * errors while cleaning up are ignored (the first error is the one
 * reported). */
void moecal_h5_close(hid_t *id);
/* moecal_h5_close of ids[0..n), then free(ids); ids may be NULL. */
void moecal_h5_close_array(hid_t *ids, int n);

moecal_status moecal_h5_fail(const char *where, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Evaluate an HDF5 call once; a negative result returns moecal_h5_fail(where,
 * "the call") from the enclosing function (as CUDA_CHECK does for CUDA). */
#define MOECAL_H5_CHECK(where, call)                    \
    do {                                                \
        if ((call) < 0)                                 \
            return moecal_h5_fail((where), "%s", #call); \
    } while (0)

#endif
