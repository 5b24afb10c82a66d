/* activations.h - calibration activation files (HDF5).
 *
 * Root attributes format = "moecal-activations", format_version = 1;
 * /layers/<L>/hidden [T, H] per MoE layer L (model layer index), same T for
 * all layers, chunked by rows; element type bf16 (16-bit HDF5 float, 8
 * exponent bits, bias 127, 7 mantissa bits), float16 or float32.
 * moecal-capture also stores the dense layers' MLP inputs this way, and
 * gives each /layers/<L> the attributes kind ("moe" or "dense") and
 * o_proj_input_amax (float32); calibration reads the layers it needs.
 *
 * Every HDF5 failure becomes a moecal error whose message names the file, the
 * dataset, what was expected and what was found, followed by the innermost
 * message of HDF5's error stack; HDF5's own printing of errors is switched off
 * (H5Eset_auto2) by the open and create functions.  HDF5 ids are never leaked,
 * on success or on error.  One moecal_act (or writer) must be used by one
 * thread at a time (HDF5 builds for MPI are not thread-safe).
 */
#ifndef MOECAL_ACTIVATIONS_H
#define MOECAL_ACTIVATIONS_H

#include <stdbool.h>
#include <stdint.h>
#include <mpi.h>

#include "dtype.h"
#include "error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moecal_act moecal_act;

/* Open for reading.  comm == MPI_COMM_NULL: serial (sec2) access; otherwise
 * the file is opened with MPI-IO on comm (collective over comm, metadata read
 * collectively while opening) and reads are independent, so any subset of
 * the ranks may read; moecal_act_close is then collective over comm too.
 * Validates format attributes, layer groups, shapes and dtypes: errors are
 * MOECAL_ERR_IO (cannot open), MOECAL_ERR_FORMAT (not an activation file, or
 * malformed) or MOECAL_ERR_UNSUPPORTED (a float type other than bf16, f16,
 * f32, a compression filter this HDF5 lacks). */
moecal_status moecal_act_open(const char *path, MPI_Comm comm, moecal_act **out);
void moecal_act_close(moecal_act *a);
const char *moecal_act_path(const moecal_act *a);
int64_t moecal_act_tokens(const moecal_act *a);
int moecal_act_hidden(const moecal_act *a);
int moecal_act_n_layers(const moecal_act *a);
const int *moecal_act_layers(const moecal_act *a);     /* ascending model layer indices */
moecal_dtype moecal_act_dtype(const moecal_act *a);    /* stored element type */
int moecal_act_has_layer(const moecal_act *a, int layer);
/* Of the i-th layer (ascending): stored as a dense layer's MLP input
 * (attribute kind = "dense"; MoE otherwise), and the largest |x| that
 * entered its o_proj (attribute o_proj_input_amax; NaN when not recorded). */
bool moecal_act_layer_dense(const moecal_act *a, int i);
double moecal_act_o_proj_amax(const moecal_act *a, int i);
/* Rows per HDF5 chunk of the first layer's dataset, 0 when not chunked. */
int64_t moecal_act_chunk_rows(const moecal_act *a);

/* Rows [row0, row0 + nrows) of /layers/<layer>/hidden, converted by HDF5 to
 * float32 (exact for bf16/f16 data) into dst[nrows * H].  A layer the file
 * lacks or rows outside [0, T) are MOECAL_ERR_MISMATCH naming the file,
 * dataset and range. */
moecal_status moecal_act_read_float(moecal_act *a, int layer, int64_t row0, int64_t nrows,
                                    float *dst);
/* The same rows as bf16: stored bf16 is returned bit for bit, f16/f32 are
 * rounded to nearest even (the dtype the model computes in). */
moecal_status moecal_act_read_bf16(moecal_act *a, int layer, int64_t row0, int64_t nrows,
                                   uint16_t *dst);

/* Direct reads (actmap.c): where every layer's rows lie in the file, found
 * once through HDF5, so that any number of threads can then read rows with
 * pread, without HDF5 (which is not thread-safe here).  moecal_act_map_create
 * returns MOECAL_OK with *out NULL when the file's layout does not allow it
 * (a compression filter, big-endian data, chunks that are not whole rows or
 * were never written): the caller reads through moecal_act_read_bf16.  A map
 * is read-only after creation and may be used by any threads at once. */
typedef struct moecal_act_map moecal_act_map;
moecal_status moecal_act_map_create(moecal_act *a, moecal_act_map **out);
void moecal_act_map_free(moecal_act_map *m);
/* Rows [row0, row0 + nrows) of a layer as bf16, the same bits as
 * moecal_act_read_bf16; f16 and f32 data are converted through scratch,
 * which must hold at least one row (the more, the fewer reads).  A file
 * that ends early (truncated while in use) is MOECAL_ERR_IO naming it. */
moecal_status moecal_act_map_read_bf16(const moecal_act_map *m, int layer, int64_t row0,
                                       int64_t nrows, uint16_t *dst, void *scratch,
                                       size_t scratch_bytes);

/* For actmap.c: the file and the dataset of the i-th layer (ascending). */
int64_t moecal_act_file(const moecal_act *a);
int64_t moecal_act_dataset(const moecal_act *a, int i);

/* Non-finite policy for rows holding NaN or Inf. */
typedef enum { MOECAL_NONFINITE_ERROR = 0, MOECAL_NONFINITE_SKIP } moecal_nonfinite;
/* Scan nrows bf16 rows of width H whose first row is token first_token of
 * layer `layer`; mark bad rows in skip[] (1 = skip; may be NULL) and count them
 * in *n_bad.  Under MOECAL_NONFINITE_ERROR the first bad row is an error that
 * names the file, layer and token index. */
moecal_status moecal_act_scan_nonfinite(const moecal_act *a, const uint16_t *rows,
                                        int64_t nrows, int H, int layer,
                                        int64_t first_token, moecal_nonfinite policy,
                                        uint8_t *skip, int64_t *n_bad);

/* Writer (serial), used by `moecal synth` and tests.  Writes PATH.tmp (an
 * existing PATH is left alone until the close renames over it): root
 * attributes format, format_version, tokens, hidden_size, dtype; one dataset
 * /layers/<L>/hidden per layer (layers distinct, >= 0, in any order), chunked
 * by ~1 MiB of rows (moecal_act_writer_chunk_rows).  dtype: MOECAL_DT_BF16,
 * MOECAL_DT_F16 or MOECAL_DT_F32. */
typedef struct moecal_act_writer moecal_act_writer;
moecal_status moecal_act_create(const char *path, int64_t tokens, int hidden,
                                const int *layers, int n_layers, moecal_dtype dtype,
                                moecal_act_writer **out);
/* Rows per chunk of the datasets; writes of whole chunks are the fastest. */
int64_t moecal_act_writer_chunk_rows(const moecal_act_writer *w);
/* An extra string attribute on the root group (provenance, e.g. "source"). */
moecal_status moecal_act_writer_attr(moecal_act_writer *w, const char *name, const char *value);
/* Rows given as float32, converted to the file's type (bf16: nearest even). */
moecal_status moecal_act_write_float(moecal_act_writer *w, int layer, int64_t row0,
                                     int64_t nrows, const float *src);
/* Flush, close, fsync and rename PATH.tmp to PATH.  Always consumes w; on
 * failure the temporary file is removed. */
moecal_status moecal_act_writer_close(moecal_act_writer *w);
/* Abandon: close and remove the temporary file. */
void moecal_act_writer_abort(moecal_act_writer *w);

#ifdef __cplusplus
}
#endif
#endif
