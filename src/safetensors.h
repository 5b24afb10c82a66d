/* safetensors.h - reader and writer of the safetensors format.
 *
 * No MPI in here, so the parser can be fuzzed alone.  Reader rules follow the
 * format's reference implementation: 8-byte little-endian header length N
 * (at most max_header bytes, 100 MB by default), a JSON object header whose
 * entries give dtype, shape and data_offsets [begin, end) relative to the end
 * of the header; offsets sorted, contiguous from 0, non-overlapping,
 * end - begin == prod(shape) * dtype size (checked arithmetic), and
 * 8 + N + last_end == file size exactly.  Duplicate names are refused.
 * "__metadata__" is an object of string values.  Tensors are read with pread
 * into caller buffers (data may sit at any byte offset).
 */
#ifndef MOECAL_SAFETENSORS_H
#define MOECAL_SAFETENSORS_H

#include <stdint.h>
#include <stddef.h>

#include "dtype.h"
#include "error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define MOECAL_ST_MAX_DIMS 8
#define MOECAL_ST_DEFAULT_MAX_HEADER (100u * 1000u * 1000u)

typedef struct moecal_st_tensor {
    const char *name;
    moecal_dtype dtype;
    const char *dtype_name;        /* as spelled in the file */
    int ndim;
    int64_t shape[MOECAL_ST_MAX_DIMS];
    uint64_t begin, end;           /* relative to the start of the data */
    uint64_t numel;
} moecal_st_tensor;

typedef struct moecal_st_file moecal_st_file;

/* Open and validate; max_header 0 means MOECAL_ST_DEFAULT_MAX_HEADER.
 * Messages name the file and the tensor. */
moecal_status moecal_st_open(const char *path, uint64_t max_header, moecal_st_file **out);
/* Validate a header held in memory: buf = the whole file's first 8 + N bytes
 * (or more); file_size = the file's total size.  Used by moecal_st_open and the
 * fuzz target; label names the file in messages.  fd is set to -1. */
moecal_status moecal_st_parse(const void *buf, size_t len, uint64_t file_size,
                              uint64_t max_header, const char *label,
                              moecal_st_file **out);
void moecal_st_close(moecal_st_file *f);

const char *moecal_st_path(const moecal_st_file *f);
size_t moecal_st_count(const moecal_st_file *f);
const moecal_st_tensor *moecal_st_tensor_at(const moecal_st_file *f, size_t i);
const moecal_st_tensor *moecal_st_find(const moecal_st_file *f, const char *name);
/* Value of a __metadata__ key, NULL if absent. */
const char *moecal_st_metadata(const moecal_st_file *f, const char *key);
/* Offset of the data section in the file (8 + N). */
uint64_t moecal_st_data_offset(const moecal_st_file *f);

/* __metadata__ keys, sorted. */
size_t moecal_st_metadata_count(const moecal_st_file *f);
const char *moecal_st_metadata_key(const moecal_st_file *f, size_t i);

/* moecal_st_tensor_at() returns tensors in data order (by offset); dtypes the
 * format defines that moecal has no enum for come back as MOECAL_DT_UNKNOWN
 * with their spelling in dtype_name (callers refuse them where needed). */

/* Read the whole tensor (its raw little-endian bytes) into dst of dst_size
 * bytes (must be >= end - begin). */
moecal_status moecal_st_read(const moecal_st_file *f, const moecal_st_tensor *t,
                             void *dst, size_t dst_size);
/* Read bytes [off, off+n) of a tensor's data. */
moecal_status moecal_st_read_range(const moecal_st_file *f, const moecal_st_tensor *t,
                                   uint64_t off, void *dst, size_t n);

/* Writer: declare every tensor, then write the header, then the data of each
 * tensor in any order; finish fsyncs and renames PATH.tmp to PATH. */
typedef struct moecal_st_writer moecal_st_writer;
moecal_status moecal_st_writer_create(const char *path, moecal_st_writer **out);
moecal_status moecal_st_writer_metadata(moecal_st_writer *w, const char *key, const char *value);
moecal_status moecal_st_writer_add(moecal_st_writer *w, const char *name, moecal_dtype dtype,
                                   int ndim, const int64_t *shape);
moecal_status moecal_st_writer_write_header(moecal_st_writer *w);
moecal_status moecal_st_writer_write(moecal_st_writer *w, const char *name,
                                     const void *data, size_t nbytes);
/* Write nbytes at byte offset off of a tensor's data (tensors of many GB
 * are written in pieces).  Once the header is written, several threads may
 * write different tensors, or disjoint pieces of one, at the same time. */
moecal_status moecal_st_writer_write_at(moecal_st_writer *w, const char *name, uint64_t off,
                                        const void *data, size_t nbytes);
moecal_status moecal_st_writer_finish(moecal_st_writer *w);
/* Abandon: close and remove the temporary file. */
void moecal_st_writer_abort(moecal_st_writer *w);

#ifdef __cplusplus
}
#endif
#endif
