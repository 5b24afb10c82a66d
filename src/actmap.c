/* actmap.c - direct reads of an activation file's rows; see activations.h
 * (moecal_act_map).
 *
 * HDF5 is not thread-safe here, so one thread asks HDF5 where every layer's
 * rows lie in the file (the dataset's address when contiguous, each chunk's
 * when chunked by whole rows) and any number of threads then pread them.
 * Only what needs no HDF5 conversion is mapped: no filter, little-endian
 * bf16, float16 or float32, every chunk allocated and of its full size.
 * Within a chunk of [cr, H] the rows are row-major, so rows [a, b) of a chunk
 * are one contiguous byte range, also in the last, partial chunk (HDF5 stores
 * every chunk whole).
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hdf5.h>

#include "activations.h"
#include "fp8.h"
#include "nvfp4_math.h"
#include "h5util.h"
#include "util.h"

typedef long long ll;

typedef struct layer_map {
    int layer;
    int64_t chunk_rows;   /* 0: contiguous at addr[0] */
    int64_t nchunks;
    uint64_t *addr;       /* file offset of each chunk (or of the data) */
} layer_map;

struct moecal_act_map {
    char *path;
    int fd;
    int64_t T;
    int H;
    moecal_dtype dtype;
    size_t esz;           /* bytes per stored element */
    int n_layers;
    layer_map *lm;
};

void moecal_act_map_free(moecal_act_map *m)
{
    if (!m)
        return;
    if (m->fd >= 0)
        close(m->fd);
    for (int i = 0; i < m->n_layers; i++)
        free(m->lm[i].addr);
    free(m->lm);
    free(m->path);
    free(m);
}

/* Where the dataset's rows lie; *ok false (no error) when they cannot be
 * read directly. */
static moecal_status map_layer(const moecal_act_map *m, hid_t d, uint64_t base, layer_map *lm,
                               bool *ok)
{
    hid_t dcpl = H5Dget_create_plist(d), type = H5Dget_type(d);
    size_t rowbytes = (size_t)m->H * m->esz;
    moecal_status s = MOECAL_OK;

    *ok = false;
    if (dcpl < 0 || type < 0) {
        s = moecal_h5_fail(m->path, "the layout of /layers/%d/hidden", lm->layer);
        goto out;
    }
    if (H5Tget_order(type) != H5T_ORDER_LE || H5Pget_nfilters(dcpl) != 0)
        goto out;
    if (H5Pget_layout(dcpl) == H5D_CONTIGUOUS) {
        haddr_t a = H5Dget_offset(d);
        if (a == HADDR_UNDEF) {
            H5Eclear2(H5E_DEFAULT);
            goto out;
        }
        lm->chunk_rows = 0;
        lm->nchunks = 1;
        if (!(lm->addr = malloc(sizeof *lm->addr)))
            goto nomem;
        lm->addr[0] = base + (uint64_t)a;
        *ok = true;
        goto out;
    }
    hsize_t cd[2];
    if (H5Pget_layout(dcpl) != H5D_CHUNKED || H5Pget_chunk(dcpl, 2, cd) != 2 ||
        cd[1] != (hsize_t)m->H || cd[0] < 1)
        goto out;
    lm->chunk_rows = (int64_t)cd[0];
    lm->nchunks = (m->T + lm->chunk_rows - 1) / lm->chunk_rows;
    if (!(lm->addr = calloc((size_t)lm->nchunks + 1, sizeof *lm->addr)))
        goto nomem;
    for (int64_t c = 0; c < lm->nchunks; c++) {
        hsize_t off[2] = {(hsize_t)(c * lm->chunk_rows), 0}, size = 0;
        haddr_t a = HADDR_UNDEF;
        unsigned mask = 0;
        if (H5Dget_chunk_info_by_coord(d, off, &mask, &a, &size) < 0) {
            s = moecal_h5_fail(m->path, "the address of chunk %lld of /layers/%d/hidden",
                               (ll)c, lm->layer);
            goto out;
        }
        if (a == HADDR_UNDEF || mask != 0 || size != (hsize_t)cd[0] * rowbytes)
            goto out;   /* never written, or not stored as is */
        lm->addr[c] = base + (uint64_t)a;
    }
    *ok = true;
    goto out;
nomem:
    s = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of memory mapping /layers/%d/hidden",
                         m->path, lm->layer);
out:
    if (dcpl >= 0)
        H5Pclose(dcpl);
    if (type >= 0)
        H5Tclose(type);
    return s;
}

moecal_status moecal_act_map_create(moecal_act *a, moecal_act_map **out)
{
    moecal_act_map *m;
    hid_t fcpl;
    hsize_t ub = 0;
    bool ok = true;
    moecal_status s = MOECAL_OK;

    *out = NULL;
    if (!(m = calloc(1, sizeof *m)) || !(m->path = strdup(moecal_act_path(a)))) {
        free(m);
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory mapping an activation file");
    }
    m->fd = -1;
    m->T = moecal_act_tokens(a);
    m->H = moecal_act_hidden(a);
    m->dtype = moecal_act_dtype(a);
    m->esz = m->dtype == MOECAL_DT_F32 ? 4 : 2;
    m->n_layers = moecal_act_n_layers(a);
    if (!(m->lm = calloc((size_t)m->n_layers, sizeof *m->lm))) {
        moecal_act_map_free(m);
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory mapping %s", m->path);
    }
    /* HDF5 addresses count from the end of the user block */
    fcpl = H5Fget_create_plist(moecal_act_file(a));
    if (fcpl < 0 || H5Pget_userblock(fcpl, &ub) < 0)
        s = moecal_h5_fail(m->path, "the user block size");
    if (fcpl >= 0)
        H5Pclose(fcpl);
    for (int i = 0; s == MOECAL_OK && ok && i < m->n_layers; i++) {
        m->lm[i].layer = moecal_act_layers(a)[i];
        s = map_layer(m, moecal_act_dataset(a, i), (uint64_t)ub, &m->lm[i], &ok);
    }
    if (s == MOECAL_OK && ok) {
        if ((m->fd = open(m->path, O_RDONLY | O_CLOEXEC)) < 0)
            s = moecal_error_errno(errno, "%s: cannot open for reading", m->path);
    }
    if (s != MOECAL_OK || !ok) {
        moecal_act_map_free(m);
        return s;     /* MOECAL_OK with *out NULL: not mappable */
    }
    *out = m;
    return MOECAL_OK;
}

/* Every byte of [off, off + n) into dst. */
static moecal_status pread_all(const moecal_act_map *m, void *dst, size_t n, uint64_t off,
                               const layer_map *lm, int64_t row0)
{
    char *p = dst;

    while (n > 0) {
        ssize_t r = pread(m->fd, p, n, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return moecal_error_errno(errno, "%s: cannot read /layers/%d/hidden from row %lld "
                                      "(offset %llu)", m->path, lm->layer, (ll)row0,
                                      (unsigned long long)off);
        if (r == 0)
            return moecal_error_set(MOECAL_ERR_IO, "%s: the file ends at offset %llu, inside "
                                    "/layers/%d/hidden (row %lld): truncated while in use?",
                                    m->path, (unsigned long long)off, lm->layer, (ll)row0);
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return MOECAL_OK;
}

/* Stored f16 or f32 in buf[cnt] to bf16 in place of dst, the bits
 * moecal_act_read_bf16 gives: HDF5 widens f16 to float32 (exactly; a NaN
 * becomes one with every mantissa bit set), then nearest even. */
static void to_bf16(const moecal_act_map *m, const void *buf, size_t cnt, uint16_t *dst)
{
    if (m->dtype == MOECAL_DT_F32) {
        const float *f = buf;
        for (size_t i = 0; i < cnt; i++)
            dst[i] = moecal_float_to_bf16(f[i]);
    } else {
        const uint16_t *h = buf;
        for (size_t i = 0; i < cnt; i++) {
            bool nan = (h[i] & 0x7c00) == 0x7c00 && (h[i] & 0x03ff) != 0;
            float x = nan ? moecal_nv_u2f(((uint32_t)(h[i] & 0x8000) << 16) | 0x7fffffffu)
                          : moecal_f16_to_float(h[i]);
            dst[i] = moecal_float_to_bf16(x);
        }
    }
}

moecal_status moecal_act_map_read_bf16(const moecal_act_map *m, int layer, int64_t row0,
                                       int64_t nrows, uint16_t *dst, void *scratch,
                                       size_t scratch_bytes)
{
    const layer_map *lm = NULL;
    size_t rowbytes = (size_t)m->H * m->esz;

    for (int i = 0; i < m->n_layers; i++)
        if (m->lm[i].layer == layer)
            lm = &m->lm[i];
    if (!lm || row0 < 0 || nrows < 0 || row0 > m->T || nrows > m->T - row0)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: direct read of rows [%lld, %lld) of "
                                "layer %d outside the file", m->path, (ll)row0,
                                (ll)(row0 + nrows), layer);
    if (m->dtype != MOECAL_DT_BF16 && scratch_bytes < rowbytes)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: no room to convert a row", m->path);
    for (int64_t r = row0; r < row0 + nrows;) {
        int64_t c = lm->chunk_rows ? r / lm->chunk_rows : 0;
        int64_t in = lm->chunk_rows ? r - c * lm->chunk_rows : r;   /* row within the piece */
        int64_t n = lm->chunk_rows ? lm->chunk_rows - in : m->T - r;
        uint16_t *o = dst + (size_t)(r - row0) * (size_t)m->H;

        if (n > row0 + nrows - r)
            n = row0 + nrows - r;
        if (m->dtype != MOECAL_DT_BF16 && (size_t)n * rowbytes > scratch_bytes)
            n = (int64_t)(scratch_bytes / rowbytes);
        void *buf = m->dtype == MOECAL_DT_BF16 ? (void *)o : scratch;
        MOECAL_TRY(pread_all(m, buf, (size_t)n * rowbytes,
                             lm->addr[c] + (uint64_t)in * rowbytes, lm, r));
        if (m->dtype != MOECAL_DT_BF16)
            to_bf16(m, scratch, (size_t)n * (size_t)m->H, o);
        r += n;
    }
    return MOECAL_OK;
}
