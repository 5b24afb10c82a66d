/* h5util.h - HDF5 helpers shared by the readers of moecal's files. */
#ifndef MOECAL_H5UTIL_H
#define MOECAL_H5UTIL_H

#include <stdbool.h>
#include <stddef.h>

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

#endif
