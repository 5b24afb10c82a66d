/* safetensors.c - reader and writer of the safetensors format.
 *
 * The reader validates everything before handing out a tensor: the header
 * length before any allocation, the JSON with duplicate keys refused, every
 * entry's dtype, shape and offsets with checked arithmetic, the offsets as one
 * contiguous run from 0, and the file length to the byte.  Tensor data are
 * then read with pread into caller buffers, so a tensor may sit at any byte
 * offset and several threads may read one file at once.
 *
 * The writer lays tensors out as the format's reference writer does (largest
 * element first, then by name, so every tensor is aligned to its element
 * size), pads the header with spaces to a multiple of 8 bytes, and writes the
 * data with pwrite into PATH.tmp, renamed to PATH once everything is on disk.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "safetensors.h"
#include "util.h"

/* Functions beyond safetensors.h; see the comments at their definitions. */
size_t moecal_st_metadata_count(const moecal_st_file *f);
const char *moecal_st_metadata_key(const moecal_st_file *f, size_t i);
moecal_status moecal_st_writer_write_at(moecal_st_writer *w, const char *name,
                                        uint64_t off, const void *data, size_t nbytes);

#define LEN_FIELD 8u             /* the u64 header length in front of the header */
#define IO_CHUNK (1u << 30)      /* Linux moves at most ~2 GiB per read/write call */
#define NAME_SHOW 200            /* longest tensor name quoted whole in a message */

typedef unsigned long long ull;

/* ------------------------------------------------------------------ helpers */

/* Names and dtype strings come from untrusted files: quote them with control
 * bytes escaped (no terminal escapes in error messages) and cut long ones. */
typedef struct shown {
    char s[NAME_SHOW + 8];
} shown;

static const char *show(shown *b, const char *s)
{
    size_t o = 0;
    size_t room = NAME_SHOW;

    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        size_t need = (*p < 0x20 || *p == 0x7f) ? 4 : 1;
        /* keep UTF-8 sequences whole when cutting */
        if (*p >= 0xf0)
            need = 4;
        else if (*p >= 0xe0)
            need = 3;
        else if (*p >= 0xc0)
            need = 2;
        if (o + need > room) {
            memcpy(b->s + o, "...", 3);
            o += 3;
            break;
        }
        if (*p < 0x20 || *p == 0x7f) {
            snprintf(b->s + o, 5, "\\x%02x", *p);
            o += 4;
        } else {
            b->s[o++] = (char)*p;
        }
    }
    b->s[o] = '\0';
    return b->s;
}

static uint64_t load_le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void store_le64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* "[16, 16]" */
static const char *shape_str(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t o = 0;
    buf[o++] = '[';
    for (int d = 0; d < ndim && o < size; d++)
        o += (size_t)snprintf(buf + o, size - o, "%s%" PRId64, d ? ", " : "", shape[d]);
    if (o < size - 1) {
        buf[o++] = ']';
        buf[o] = '\0';
    } else {
        buf[size - 1] = '\0';
    }
    return buf;
}

/* safetensors dtypes that moecal has no enum value for.  They are valid in a
 * checkpoint (a shard may hold MX scales next to the experts moecal needs), so
 * they are accepted with dtype MOECAL_DT_UNKNOWN and their spelling kept in
 * dtype_name; a caller that needs the tensor refuses it. */
static const struct {
    const char *name;
    unsigned bits;
} other_dtypes[] = {
    { "F4", 4 }, { "F6_E2M3", 6 }, { "F6_E3M2", 6 }, { "F8_E8M0", 8 },
    { "F8_E4M3FNUZ", 8 }, { "F8_E5M2FNUZ", 8 }, { "C64", 64 },
};

/* Element size in bits and spelling to keep; 0 when the format has no such dtype. */
static unsigned dtype_lookup(const char *s, moecal_dtype *dt, const char **spelling)
{
    moecal_dtype t = moecal_dtype_from_name(s);
    if (t != MOECAL_DT_UNKNOWN) {
        *dt = t;
        *spelling = moecal_dtype_name(t);
        return (unsigned)moecal_dtype_size(t) * 8;
    }
    for (size_t i = 0; i < sizeof other_dtypes / sizeof other_dtypes[0]; i++) {
        if (strcmp(s, other_dtypes[i].name) == 0) {
            *dt = MOECAL_DT_UNKNOWN;
            *spelling = other_dtypes[i].name;
            return other_dtypes[i].bits;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ reader */

typedef struct st_meta {
    const char *key, *value;
} st_meta;

struct moecal_st_file {
    char *label;
    int fd;
    uint64_t file_size;
    uint64_t header_len;
    size_t n;
    moecal_st_tensor *tensors; /* in data order */
    size_t *by_name;           /* indices into tensors, sorted by name */
    size_t nmeta;
    st_meta *meta;             /* sorted by key */
    char *strings;             /* every name, key and value */
};

/* Record "LABEL: message": the input is malformed. */
#define fmt_err(label, ...) moecal_error_in(MOECAL_ERR_FORMAT, (label), __VA_ARGS__)

static moecal_status check_header_len(const char *label, uint64_t file_size, uint64_t n,
                                      uint64_t max_header)
{
    if (n > max_header)
        return fmt_err(label, "header length %llu exceeds the limit of %llu bytes",
                       (ull)n, (ull)max_header);
    /* file_size >= LEN_FIELD here, so no wrap-around */
    if (n > file_size - LEN_FIELD)
        return fmt_err(label, "header length %llu is larger than the %llu bytes that "
                       "follow the length field (file is %llu bytes)",
                       (ull)n, (ull)(file_size - LEN_FIELD), (ull)file_size);
    return MOECAL_OK;
}

/* Fill t from one header entry; t->name is set by the caller. */
static moecal_status parse_entry(const char *label, const char *name, json_t *v,
                                 moecal_st_tensor *t)
{
    shown sn, sd;
    json_t *jdtype = NULL, *jshape = NULL, *joffs = NULL;
    const char *key;
    json_t *val;
    unsigned bits;
    uint64_t numel = 1, nbytes, off[2];
    char sbuf[8 * 24 + 4];

    if (!json_is_object(v))
        return fmt_err(label, "tensor '%s': entry is %s, not an object with dtype, shape "
                       "and data_offsets", show(&sn, name), moecal_json_kind(v));
    json_object_foreach(v, key, val) {
        if (strcmp(key, "dtype") == 0)
            jdtype = val;
        else if (strcmp(key, "shape") == 0)
            jshape = val;
        else if (strcmp(key, "data_offsets") == 0)
            joffs = val;
        else
            return fmt_err(label, "tensor '%s': unexpected key '%s' (an entry holds only "
                           "dtype, shape and data_offsets)", show(&sn, name), show(&sd, key));
    }
    if (!jdtype || !jshape || !joffs)
        return fmt_err(label, "tensor '%s': entry lacks '%s'", show(&sn, name),
                       !jdtype ? "dtype" : !jshape ? "shape" : "data_offsets");

    if (!json_is_string(jdtype))
        return fmt_err(label, "tensor '%s': dtype is %s, not a string", show(&sn, name),
                       moecal_json_kind(jdtype));
    bits = dtype_lookup(json_string_value(jdtype), &t->dtype, &t->dtype_name);
    if (bits == 0)
        return fmt_err(label, "tensor '%s': unknown dtype '%s'", show(&sn, name),
                       show(&sd, json_string_value(jdtype)));

    if (!json_is_array(jshape))
        return fmt_err(label, "tensor '%s': shape is %s, not an array", show(&sn, name),
                       moecal_json_kind(jshape));
    if (json_array_size(jshape) > MOECAL_ST_MAX_DIMS) {
        moecal_error_set(MOECAL_ERR_UNSUPPORTED, "%s: tensor '%s': shape has %zu dimensions, "
                         "moecal supports at most %d", label, show(&sn, name),
                         json_array_size(jshape), MOECAL_ST_MAX_DIMS);
        return MOECAL_ERR_UNSUPPORTED;
    }
    t->ndim = (int)json_array_size(jshape);
    for (int d = 0; d < t->ndim; d++) {
        json_t *e = json_array_get(jshape, (size_t)d);
        if (!json_is_integer(e))
            return fmt_err(label, "tensor '%s': shape element %d is %s, not a non-negative "
                           "integer", show(&sn, name), d, moecal_json_kind(e));
        if (json_integer_value(e) < 0)
            return fmt_err(label, "tensor '%s': shape element %d is %lld, not a non-negative "
                           "integer", show(&sn, name), d, (long long)json_integer_value(e));
        t->shape[d] = json_integer_value(e);
    }

    if (!json_is_array(joffs) || json_array_size(joffs) != 2)
        return json_is_array(joffs)
                   ? fmt_err(label, "tensor '%s': data_offsets has %zu elements, not [begin, "
                             "end]", show(&sn, name), json_array_size(joffs))
                   : fmt_err(label, "tensor '%s': data_offsets is %s, not [begin, end]",
                             show(&sn, name), moecal_json_kind(joffs));
    for (int i = 0; i < 2; i++) {
        json_t *e = json_array_get(joffs, (size_t)i);
        if (!json_is_integer(e) || json_integer_value(e) < 0)
            return fmt_err(label, "tensor '%s': data_offsets[%d] is %s, not a non-negative "
                           "integer", show(&sn, name), i,
                           json_is_integer(e) ? "negative" : moecal_json_kind(e));
        off[i] = (uint64_t)json_integer_value(e);
    }
    t->begin = off[0];
    t->end = off[1];
    if (t->begin > t->end)
        return fmt_err(label, "tensor '%s': data_offsets [%llu, %llu): begin is after end",
                       show(&sn, name), (ull)t->begin, (ull)t->end);

    /* In shape order, as the reference reader does: a product that overflows
     * before reaching a zero dimension is refused. */
    for (int d = 0; d < t->ndim; d++)
        if (__builtin_mul_overflow(numel, (uint64_t)t->shape[d], &numel))
            return fmt_err(label, "tensor '%s': shape %s has more than 2^64 elements",
                           show(&sn, name), shape_str(sbuf, sizeof sbuf, t->ndim, t->shape));
    t->numel = numel;
    if (__builtin_mul_overflow(numel, (uint64_t)bits, &nbytes))
        return fmt_err(label, "tensor '%s': shape %s of %s needs more than 2^64 bits",
                       show(&sn, name), shape_str(sbuf, sizeof sbuf, t->ndim, t->shape),
                       t->dtype_name);
    if (nbytes % 8 != 0)
        return fmt_err(label, "tensor '%s': shape %s of %s is %llu bits, not a whole number "
                       "of bytes", show(&sn, name),
                       shape_str(sbuf, sizeof sbuf, t->ndim, t->shape), t->dtype_name,
                       (ull)nbytes);
    nbytes /= 8;
    if (t->end - t->begin != nbytes)
        return fmt_err(label, "tensor '%s': data_offsets [%llu, %llu) hold %llu bytes but "
                       "shape %s of %s needs %llu", show(&sn, name), (ull)t->begin,
                       (ull)t->end, (ull)(t->end - t->begin),
                       shape_str(sbuf, sizeof sbuf, t->ndim, t->shape), t->dtype_name,
                       (ull)nbytes);
    return MOECAL_OK;
}

static int cmp_data_order(const void *a, const void *b)
{
    const moecal_st_tensor *x = a, *y = b;
    int c = MOECAL_CMP(x->begin, y->begin);
    /* zero-size tensors first at a shared offset, then by name: deterministic */
    c = c ? c : MOECAL_CMP(x->end, y->end);
    return c ? c : strcmp(x->name, y->name);
}

/* qsort has no context argument: the index sort reads the array from here.
 * Sorting happens inside one call, on the calling thread only. */
static _Thread_local const moecal_st_tensor *sort_base;

static int cmp_index_name(const void *a, const void *b)
{
    return strcmp(sort_base[*(const size_t *)a].name, sort_base[*(const size_t *)b].name);
}

static int cmp_meta(const void *a, const void *b)
{
    return strcmp(((const st_meta *)a)->key, ((const st_meta *)b)->key);
}

static char *copy_str(char **arena, const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = *arena;
    memcpy(d, s, n);
    *arena += n;
    return d;
}

/* Build f's tables from the parsed header. */
static moecal_status build(moecal_st_file *f, json_t *root)
{
    const char *label = f->label;
    const char *key;
    json_t *val, *jmeta = NULL;
    size_t strbytes = 1, ti = 0, mi = 0;
    char *arena;
    uint64_t expect = 0, total;
    shown s1, s2;

    /* Pass 1: sizes, and the shape of __metadata__. */
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) {
            const char *mk;
            json_t *mv;
            /* null is what the reference writer's optional field reads as "none" */
            if (json_is_null(val))
                continue;
            if (!json_is_object(val))
                return fmt_err(label, "__metadata__ is %s, not an object of strings",
                               moecal_json_kind(val));
            json_object_foreach(val, mk, mv) {
                if (!json_is_string(mv))
                    return fmt_err(label, "__metadata__ key '%s' has %s value, not a string",
                                   show(&s1, mk), moecal_json_kind(mv));
                strbytes += strlen(mk) + json_string_length(mv) + 2;
            }
            jmeta = val;
            f->nmeta = json_object_size(val);
        } else {
            strbytes += strlen(key) + 1;
            f->n++;
        }
    }

    f->strings = malloc(strbytes);
    f->tensors = calloc(f->n ? f->n : 1, sizeof *f->tensors);
    f->by_name = malloc((f->n ? f->n : 1) * sizeof *f->by_name);
    f->meta = malloc((f->nmeta ? f->nmeta : 1) * sizeof *f->meta);
    if (!f->strings || !f->tensors || !f->by_name || !f->meta)
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory for a header of %zu tensors",
                                label, f->n);
    arena = f->strings;

    /* Pass 2: entries, in file order so that the first bad one is reported. */
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0)
            continue;
        moecal_st_tensor *t = &f->tensors[ti++];
        MOECAL_TRY(parse_entry(label, key, val, t));
        t->name = copy_str(&arena, key);
    }
    if (jmeta) {
        json_object_foreach(jmeta, key, val) {
            f->meta[mi].key = copy_str(&arena, key);
            f->meta[mi].value = copy_str(&arena, json_string_value(val));
            mi++;
        }
        qsort(f->meta, f->nmeta, sizeof *f->meta, cmp_meta);
    }

    /* Offsets: one contiguous run from 0, whatever the order of the entries. */
    qsort(f->tensors, f->n, sizeof *f->tensors, cmp_data_order);
    for (size_t i = 0; i < f->n; i++) {
        const moecal_st_tensor *t = &f->tensors[i];
        if (t->begin == expect) {
            expect = t->end;
            continue;
        }
        if (i == 0)
            return fmt_err(label, "tensor '%s': data_offsets [%llu, %llu) leave a gap of %llu "
                           "byte%s at the start of the data (the first tensor must begin at 0)",
                           show(&s1, t->name), (ull)t->begin, (ull)t->end, (ull)t->begin,
                           t->begin == 1 ? "" : "s");
        if (t->begin > expect)
            return fmt_err(label, "tensor '%s': data_offsets [%llu, %llu) leave a gap of %llu "
                           "byte%s after tensor '%s', which ends at %llu",
                           show(&s1, t->name), (ull)t->begin, (ull)t->end,
                           (ull)(t->begin - expect), t->begin - expect == 1 ? "" : "s",
                           show(&s2, t[-1].name), (ull)expect);
        return fmt_err(label, "tensor '%s': data_offsets [%llu, %llu) overlap tensor '%s' "
                       "[%llu, %llu)", show(&s1, t->name), (ull)t->begin, (ull)t->end,
                       show(&s2, t[-1].name), (ull)t[-1].begin, (ull)t[-1].end);
    }

    /* The file holds exactly the header and the data: no more, no less. */
    if (__builtin_add_overflow(LEN_FIELD + f->header_len, expect, &total))
        return fmt_err(label, "data section of %llu bytes is larger than any file",
                       (ull)expect);
    if (total != f->file_size) {
        uint64_t diff = total > f->file_size ? total - f->file_size : f->file_size - total;
        return fmt_err(label, "file is %llu bytes but its header describes %llu (8 + %llu "
                       "header + %llu data): %llu byte%s %s", (ull)f->file_size, (ull)total,
                       (ull)f->header_len, (ull)expect, (ull)diff, diff == 1 ? "" : "s",
                       total > f->file_size ? "missing (truncated file?)" : "too many");
    }

    for (size_t i = 0; i < f->n; i++)
        f->by_name[i] = i;
    sort_base = f->tensors;
    qsort(f->by_name, f->n, sizeof *f->by_name, cmp_index_name);
    sort_base = NULL;
    return MOECAL_OK;
}

/* Decode the JSON string token hdr[s, e) (quotes included) into out. */
static const char *token_str(const char *hdr, size_t s, size_t e, shown *out)
{
    json_error_t jerr;
    json_t *j = json_loadb(hdr + s, e - s, JSON_DECODE_ANY, &jerr);
    const char *r = j && json_is_string(j) ? show(out, json_string_value(j)) : NULL;
    json_decref(j);
    return r;
}

/* jansson says "duplicate object key" without the key when the key is long.
 * It stops right after the key, at byte pos: scan the header up to there to
 * find the key and, for a key inside an entry, the entry's name. */
static moecal_status duplicate_key_err(const char *label, const char *hdr, size_t n,
                                       size_t pos)
{
    size_t depth = 0, str_s = 0, top_s = 0, top_e = 0;
    bool in_str = false, esc = false, expect_key = false;
    const char *key, *top;
    shown sk, st;

    if (pos > n)
        pos = n;
    for (size_t i = 0; i < pos; i++) {
        char c = hdr[i];
        if (in_str) {
            if (esc) {
                esc = false;
            } else if (c == '\\') {
                esc = true;
            } else if (c == '"') {
                in_str = false;
                if (depth == 1 && expect_key) {
                    top_s = str_s;
                    top_e = i + 1;
                    expect_key = false;
                }
            }
            continue;
        }
        if (c == '"') {
            in_str = true;
            str_s = i;
        } else if (c == '{' || c == '[') {
            expect_key = ++depth == 1;
        } else if ((c == '}' || c == ']') && depth > 0) {
            depth--;
        } else if (c == ',' && depth == 1) {
            expect_key = true;
        }
    }
    key = in_str || pos == 0 || hdr[pos - 1] != '"' ? NULL : token_str(hdr, str_s, pos, &sk);
    top = top_e > top_s ? token_str(hdr, top_s, top_e, &st) : NULL;
    if (key && depth == 1)
        return strcmp(key, "__metadata__") == 0
                   ? fmt_err(label, "__metadata__ appears twice in the header")
                   : fmt_err(label, "tensor '%s' appears twice in the header", key);
    if (key && depth == 2 && top)
        return strcmp(top, "__metadata__") == 0
                   ? fmt_err(label, "__metadata__ key '%s' appears twice", key)
                   : fmt_err(label, "tensor '%s': key '%s' appears twice", top, key);
    return fmt_err(label, "header is not valid JSON: key '%s' appears twice (header byte %zu)",
                   key ? key : "?", pos);
}

moecal_status moecal_st_parse(const void *buf, size_t len, uint64_t file_size,
                              uint64_t max_header, const char *label, moecal_st_file **out)
{
    moecal_st_file *f;
    json_t *root;
    json_error_t jerr;
    uint64_t n;
    moecal_status st;
    shown sj;

    if (!out)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_st_parse: no result pointer");
    *out = NULL;
    if (!label)
        label = "(memory)";
    if (!max_header)
        max_header = MOECAL_ST_DEFAULT_MAX_HEADER;
    if (file_size < LEN_FIELD)
        return fmt_err(label, "file is %llu bytes, shorter than the 8-byte header length "
                       "that starts a safetensors file", (ull)file_size);
    if (!buf || len < LEN_FIELD)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: parser given %zu bytes, fewer than "
                                "the header length field", label, len);
    n = load_le64(buf);
    MOECAL_TRY(check_header_len(label, file_size, n, max_header));
    if (len - LEN_FIELD < n)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: parser given %zu bytes, fewer than "
                                "the %llu of the header", label, len, (ull)(LEN_FIELD + n));

    /* Without JSON_DISABLE_EOF_CHECK jansson skips trailing whitespace (the
     * writers' padding) and refuses anything else after the object. */
    root = json_loadb((const char *)buf + LEN_FIELD, (size_t)n, JSON_REJECT_DUPLICATES, &jerr);
    if (!root && strncmp(jerr.text, "duplicate object key", 20) == 0 && jerr.position >= 0)
        return duplicate_key_err(label, (const char *)buf + LEN_FIELD, (size_t)n,
                                 (size_t)jerr.position);
    /* jansson quotes the bad token: escape it like any other file content */
    if (!root)
        return fmt_err(label, "header is not valid JSON: %s (header byte %d)",
                       show(&sj, jerr.text), jerr.position);
    if (!json_is_object(root)) {
        st = fmt_err(label, "header is %s, not a JSON object", moecal_json_kind(root));
        json_decref(root);
        return st;
    }

    f = calloc(1, sizeof *f);
    if (!f || !(f->label = strdup(label))) {
        free(f);
        json_decref(root);
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory", label);
    }
    f->fd = -1;
    f->file_size = file_size;
    f->header_len = n;
    st = build(f, root);
    json_decref(root);
    if (st != MOECAL_OK) {
        moecal_st_close(f);
        return st;
    }
    *out = f;
    return MOECAL_OK;
}

/* Read n bytes at off, whatever pread returns at a time.  what names the data
 * in messages ("header", "tensor 'x'"). */
static moecal_status read_full(int fd, const char *label, const char *what, void *dst,
                               size_t n, uint64_t off)
{
    unsigned char *p = dst;
    size_t done = 0;

    while (done < n) {
        size_t want = n - done < IO_CHUNK ? n - done : IO_CHUNK;
        ssize_t r = pread(fd, p + done, want, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return moecal_error_errno(errno, "%s: reading %s (%zu bytes at offset %llu)",
                                      label, what, n, (ull)off);
        }
        if (r == 0)
            return fmt_err(label, "file ends at offset %llu, reading %s (%zu bytes at offset "
                           "%llu): was it truncated after it was opened?",
                           (ull)(off + done), what, n, (ull)off);
        done += (size_t)r;
    }
    return MOECAL_OK;
}

moecal_status moecal_st_open(const char *path, uint64_t max_header, moecal_st_file **out)
{
    unsigned char lenbuf[LEN_FIELD];
    unsigned char *buf;
    struct stat sb;
    uint64_t n;
    moecal_status st;
    int fd;

    if (!out || !path)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_st_open: null argument");
    *out = NULL;
    if (!max_header)
        max_header = MOECAL_ST_DEFAULT_MAX_HEADER;
    /* Refuse a FIFO or device before open, which could block on it. */
    if (stat(path, &sb) == 0 && !S_ISREG(sb.st_mode))
        return S_ISDIR(sb.st_mode) ? moecal_error_errno(EISDIR, "%s: cannot read", path)
                                   : fmt_err(path, "not a regular file");
    fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY); /* never blocks on a FIFO */
    if (fd < 0)
        return moecal_error_errno(errno, "%s: cannot open", path);
    (void)fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    if (fstat(fd, &sb) != 0) {
        st = moecal_error_errno(errno, "%s: cannot stat", path);
        close(fd);
        return st;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = S_ISDIR(sb.st_mode) ? moecal_error_errno(EISDIR, "%s: cannot read", path)
                                 : fmt_err(path, "not a regular file");
        close(fd);
        return st;
    }
    if ((uint64_t)sb.st_size < LEN_FIELD) {
        st = fmt_err(path, "file is %llu bytes, shorter than the 8-byte header length that "
                     "starts a safetensors file", (ull)sb.st_size);
        close(fd);
        return st;
    }
    st = read_full(fd, path, "the header length", lenbuf, sizeof lenbuf, 0);
    if (st != MOECAL_OK) {
        close(fd);
        return st;
    }
    /* Check the length against the limit and the file before allocating it. */
    n = load_le64(lenbuf);
    st = check_header_len(path, (uint64_t)sb.st_size, n, max_header);
    if (st != MOECAL_OK) {
        close(fd);
        return st;
    }
    buf = malloc(LEN_FIELD + (size_t)n);
    if (!buf) {
        close(fd);
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory for a header of %llu bytes",
                                path, (ull)n);
    }
    memcpy(buf, lenbuf, LEN_FIELD);
    st = read_full(fd, path, "the header", buf + LEN_FIELD, (size_t)n, LEN_FIELD);
    if (st == MOECAL_OK)
        st = moecal_st_parse(buf, LEN_FIELD + (size_t)n, (uint64_t)sb.st_size, max_header,
                             path, out);
    free(buf);
    if (st != MOECAL_OK) {
        close(fd);
        return st;
    }
    (*out)->fd = fd;
    return MOECAL_OK;
}

void moecal_st_close(moecal_st_file *f)
{
    if (!f)
        return;
    if (f->fd >= 0)
        close(f->fd);
    free(f->label);
    free(f->tensors);
    free(f->by_name);
    free(f->meta);
    free(f->strings);
    free(f);
}

const char *moecal_st_path(const moecal_st_file *f)
{
    return f ? f->label : NULL;
}

size_t moecal_st_count(const moecal_st_file *f)
{
    return f ? f->n : 0;
}

/* Tensors in the order of their data in the file. */
const moecal_st_tensor *moecal_st_tensor_at(const moecal_st_file *f, size_t i)
{
    return f && i < f->n ? &f->tensors[i] : NULL;
}

const moecal_st_tensor *moecal_st_find(const moecal_st_file *f, const char *name)
{
    size_t lo = 0, hi;

    if (!f || !name)
        return NULL;
    hi = f->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const moecal_st_tensor *t = &f->tensors[f->by_name[mid]];
        int c = strcmp(name, t->name);
        if (c == 0)
            return t;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

const char *moecal_st_metadata(const moecal_st_file *f, const char *key)
{
    st_meta k, *m;

    if (!f || !key || f->nmeta == 0)
        return NULL;
    k.key = key;
    m = bsearch(&k, f->meta, f->nmeta, sizeof *f->meta, cmp_meta);
    return m ? m->value : NULL;
}

/* Number of __metadata__ entries; with moecal_st_metadata_key they can be
 * listed (sorted by key). */
size_t moecal_st_metadata_count(const moecal_st_file *f)
{
    return f ? f->nmeta : 0;
}

const char *moecal_st_metadata_key(const moecal_st_file *f, size_t i)
{
    return f && i < f->nmeta ? f->meta[i].key : NULL;
}

uint64_t moecal_st_data_offset(const moecal_st_file *f)
{
    return f ? LEN_FIELD + f->header_len : 0;
}

/* Check that t is one of f's tensors and [off, off + n) lies within it. */
static moecal_status check_read(const moecal_st_file *f, const moecal_st_tensor *t,
                                uint64_t off, size_t n, const void *dst)
{
    shown sn;
    uint64_t stop;

    if (!f || !t || (!dst && n))
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_st_read: null argument");
    if ((uintptr_t)t < (uintptr_t)f->tensors || (uintptr_t)t >= (uintptr_t)(f->tensors + f->n))
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: tensor '%s' belongs to another file",
                                f->label, show(&sn, t->name));
    if (f->fd < 0)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: header parsed from memory, no file "
                                "to read tensor '%s' from", f->label, show(&sn, t->name));
    if (__builtin_add_overflow(off, (uint64_t)n, &stop) || stop > t->end - t->begin)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: tensor '%s': bytes [%llu, %llu + %zu)"
                                " are outside its %llu bytes", f->label, show(&sn, t->name),
                                (ull)off, (ull)off, n, (ull)(t->end - t->begin));
    return MOECAL_OK;
}

moecal_status moecal_st_read_range(const moecal_st_file *f, const moecal_st_tensor *t,
                                   uint64_t off, void *dst, size_t n)
{
    shown sn;
    char what[sizeof sn.s + 16];

    MOECAL_TRY(check_read(f, t, off, n, dst));
    snprintf(what, sizeof what, "tensor '%s'", show(&sn, t->name));
    return read_full(f->fd, f->label, what, dst, n,
                     LEN_FIELD + f->header_len + t->begin + off);
}

moecal_status moecal_st_read(const moecal_st_file *f, const moecal_st_tensor *t,
                             void *dst, size_t dst_size)
{
    shown sn;
    uint64_t nbytes;

    if (!f || !t)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_st_read: null argument");
    nbytes = t->end - t->begin;
    if (nbytes > dst_size)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: tensor '%s' is %llu bytes, the "
                                "buffer only %zu", f->label, show(&sn, t->name),
                                (ull)nbytes, dst_size);
    return moecal_st_read_range(f, t, 0, dst, (size_t)nbytes);
}

/* ------------------------------------------------------------------ writer */

typedef struct st_wtensor {
    char *name;
    moecal_dtype dtype;
    int ndim;
    int64_t shape[MOECAL_ST_MAX_DIMS];
    uint64_t nbytes;
    uint64_t begin;
    uint64_t written; /* bytes written so far, for the check in finish */
} st_wtensor;

struct moecal_st_writer {
    char *path, *tmp;
    int fd;
    bool header_done;
    size_t n, cap;
    st_wtensor *t;
    size_t *by_name;  /* after the header: indices sorted by name */
    size_t nmeta, capmeta;
    char **meta;      /* key, value, key, value, ... */
    uint64_t data_off;
};

/* Misuse of the writer is a bug in moecal, not in the input. */
#define wr_err(w, ...) moecal_error_in(MOECAL_ERR_INTERNAL, (w)->path, __VA_ARGS__)

/* json_string refuses what is not UTF-8, as readers of the file would. */
static bool utf8_ok(const char *s)
{
    json_t *j = json_string(s);
    json_decref(j);
    return j != NULL;
}

moecal_status moecal_st_writer_create(const char *path, moecal_st_writer **out)
{
    moecal_st_writer *w;
    size_t len;

    if (!out || !path || !*path)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_st_writer_create: no path");
    *out = NULL;
    w = calloc(1, sizeof *w);
    len = strlen(path);
    if (!w || !(w->path = strdup(path)) || !(w->tmp = malloc(len + 5))) {
        if (w)
            free(w->path);
        free(w);
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory", path);
    }
    memcpy(w->tmp, path, len);
    memcpy(w->tmp + len, ".tmp", 5);
    w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (w->fd < 0) {
        moecal_status st = moecal_error_errno(errno, "%s: cannot create", w->tmp);
        free(w->tmp);
        free(w->path);
        free(w);
        return st;
    }
    *out = w;
    return MOECAL_OK;
}

moecal_status moecal_st_writer_metadata(moecal_st_writer *w, const char *key, const char *value)
{
    char *k, *v;

    if (!w || !key || !value)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_st_writer_metadata: null argument");
    if (w->header_done)
        return wr_err(w, "metadata '%s' given after the header was written", key);
    if (!utf8_ok(key) || !utf8_ok(value))
        return wr_err(w, "metadata key or value is not UTF-8");
    for (size_t i = 0; i < w->nmeta; i++) {
        if (strcmp(w->meta[2 * i], key) == 0) {
            /* the last value given wins */
            if (!(v = strdup(value)))
                return moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory", w->path);
            free(w->meta[2 * i + 1]);
            w->meta[2 * i + 1] = v;
            return MOECAL_OK;
        }
    }
    if (w->nmeta == w->capmeta) {
        size_t cap = w->capmeta ? 2 * w->capmeta : 8;
        char **m = realloc(w->meta, 2 * cap * sizeof *m);
        if (!m)
            return moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory", w->path);
        w->meta = m;
        w->capmeta = cap;
    }
    k = strdup(key);
    v = strdup(value);
    if (!k || !v) {
        free(k);
        free(v);
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory", w->path);
    }
    w->meta[2 * w->nmeta] = k;
    w->meta[2 * w->nmeta + 1] = v;
    w->nmeta++;
    return MOECAL_OK;
}

moecal_status moecal_st_writer_add(moecal_st_writer *w, const char *name, moecal_dtype dtype,
                                   int ndim, const int64_t *shape)
{
    st_wtensor *t;
    uint64_t numel = 1;
    shown sn;

    if (!w || !name || (ndim > 0 && !shape))
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_st_writer_add: null argument");
    if (w->header_done)
        return wr_err(w, "tensor '%s' added after the header was written", show(&sn, name));
    if (strcmp(name, "__metadata__") == 0 || !utf8_ok(name))
        return wr_err(w, "'%s' cannot name a tensor", show(&sn, name));
    if (moecal_dtype_size(dtype) == 0)
        return wr_err(w, "tensor '%s': no safetensors dtype given", show(&sn, name));
    if (ndim < 0 || ndim > MOECAL_ST_MAX_DIMS)
        return wr_err(w, "tensor '%s': %d dimensions", show(&sn, name), ndim);
    for (int d = 0; d < ndim; d++) {
        if (shape[d] < 0 || __builtin_mul_overflow(numel, (uint64_t)shape[d], &numel))
            return wr_err(w, "tensor '%s': bad shape", show(&sn, name));
    }
    if (w->n == w->cap) {
        size_t cap = w->cap ? 2 * w->cap : 64;
        st_wtensor *nt = realloc(w->t, cap * sizeof *nt);
        if (!nt)
            return moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory", w->path);
        w->t = nt;
        w->cap = cap;
    }
    t = &w->t[w->n];
    memset(t, 0, sizeof *t);
    if (__builtin_mul_overflow(numel, (uint64_t)moecal_dtype_size(dtype), &t->nbytes) ||
        t->nbytes > INT64_MAX)
        return wr_err(w, "tensor '%s' is larger than any file", show(&sn, name));
    if (!(t->name = strdup(name)))
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory", w->path);
    t->dtype = dtype;
    t->ndim = ndim;
    for (int d = 0; d < ndim; d++)
        t->shape[d] = shape[d];
    w->n++;
    return MOECAL_OK;
}

/* Writer layout order, the reference writer's: dtypes in descending order of
 * its dtype list (which runs by element size, so every tensor starts at a
 * multiple of its element size), then by name.  Same tensors, same bytes. */
static int layout_rank(moecal_dtype t)
{
    switch (t) {
    case MOECAL_DT_BOOL: return 0;
    case MOECAL_DT_U8: return 4;
    case MOECAL_DT_I8: return 5;
    case MOECAL_DT_F8_E5M2: return 6;
    case MOECAL_DT_F8_E4M3: return 7;
    case MOECAL_DT_I16: return 11;
    case MOECAL_DT_U16: return 12;
    case MOECAL_DT_F16: return 13;
    case MOECAL_DT_BF16: return 14;
    case MOECAL_DT_I32: return 15;
    case MOECAL_DT_U32: return 16;
    case MOECAL_DT_F32: return 17;
    case MOECAL_DT_F64: return 19;
    case MOECAL_DT_I64: return 20;
    case MOECAL_DT_U64: return 21;
    case MOECAL_DT_UNKNOWN: break;
    }
    return -1;
}

static _Thread_local const st_wtensor *wsort_base;

static int cmp_layout(const void *a, const void *b)
{
    const st_wtensor *x = &wsort_base[*(const size_t *)a], *y = &wsort_base[*(const size_t *)b];
    int rx = layout_rank(x->dtype), ry = layout_rank(y->dtype);
    if (rx != ry)
        return rx > ry ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int cmp_wname(const void *a, const void *b)
{
    return strcmp(wsort_base[*(const size_t *)a].name, wsort_base[*(const size_t *)b].name);
}

static moecal_status write_full(moecal_st_writer *w, const char *what, const void *src,
                                size_t n, uint64_t off)
{
    const unsigned char *p = src;
    size_t done = 0;

    while (done < n) {
        size_t want = n - done < IO_CHUNK ? n - done : IO_CHUNK;
        ssize_t r = pwrite(w->fd, p + done, want, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return moecal_error_errno(errno, "%s: writing %s (%zu bytes at offset %llu)",
                                      w->tmp, what, n, (ull)off);
        }
        if (r == 0)
            return moecal_error_errno(ENOSPC, "%s: writing %s (%zu bytes at offset %llu)",
                                      w->tmp, what, n, (ull)off);
        done += (size_t)r;
    }
    return MOECAL_OK;
}

/* The header object: __metadata__ first, then the tensors in data order. */
static json_t *header_json(const moecal_st_writer *w, const size_t *order)
{
    json_t *root = json_object(), *meta = NULL;
    bool ok = root != NULL;

    if (ok && w->nmeta) {
        ok = (meta = json_object()) && json_object_set_new(root, "__metadata__", meta) == 0;
        for (size_t i = 0; ok && i < w->nmeta; i++)
            ok = json_object_set_new(meta, w->meta[2 * i], json_string(w->meta[2 * i + 1])) == 0;
    }
    for (size_t i = 0; ok && i < w->n; i++) {
        const st_wtensor *t = &w->t[order[i]];
        json_t *e = json_object(), *shape = json_array();
        ok = e && shape && json_object_set_new(root, t->name, e) == 0;
        if (!ok) {
            json_decref(shape);
            break;
        }
        ok = json_object_set_new(e, "dtype", json_string(moecal_dtype_name(t->dtype))) == 0 &&
             json_object_set_new(e, "shape", shape) == 0;
        for (int d = 0; ok && d < t->ndim; d++)
            ok = json_array_append_new(shape, json_integer(t->shape[d])) == 0;
        ok = ok && json_object_set_new(e, "data_offsets",
                                       json_pack("[II]", (json_int_t)t->begin,
                                                 (json_int_t)(t->begin + t->nbytes))) == 0;
    }
    if (!ok) {
        json_decref(root);
        return NULL;
    }
    return root;
}

moecal_status moecal_st_writer_write_header(moecal_st_writer *w)
{
    size_t *order;
    uint64_t off = 0, n, total;
    json_t *root;
    char *text;
    unsigned char *buf;
    size_t tlen;
    moecal_status st;
    shown sn;

    if (!w)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_st_writer_write_header: no writer");
    if (w->header_done)
        return wr_err(w, "header written twice");
    order = malloc((w->n ? w->n : 1) * sizeof *order);
    free(w->by_name); /* from an earlier attempt that failed */
    w->by_name = malloc((w->n ? w->n : 1) * sizeof *w->by_name);
    if (!order || !w->by_name) {
        free(order);
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory", w->path);
    }
    for (size_t i = 0; i < w->n; i++)
        order[i] = w->by_name[i] = i;
    wsort_base = w->t;
    qsort(order, w->n, sizeof *order, cmp_layout);
    qsort(w->by_name, w->n, sizeof *w->by_name, cmp_wname);
    wsort_base = NULL;
    for (size_t i = 1; i < w->n; i++) {
        if (strcmp(w->t[w->by_name[i]].name, w->t[w->by_name[i - 1]].name) == 0) {
            free(order);
            return wr_err(w, "tensor '%s' added twice", show(&sn, w->t[w->by_name[i]].name));
        }
    }
    for (size_t i = 0; i < w->n; i++) {
        st_wtensor *t = &w->t[order[i]];
        t->begin = off;
        if (__builtin_add_overflow(off, t->nbytes, &off) || off > INT64_MAX) {
            free(order);
            return wr_err(w, "tensors add up to more bytes than a file can hold");
        }
    }

    root = header_json(w, order);
    free(order);
    text = root ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    if (!text)
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory for the header", w->path);
    tlen = strlen(text);
    /* Spaces up to a multiple of 8, so that the data start 8-byte aligned. */
    n = (tlen + 7) & ~(uint64_t)7;
    if (n > MOECAL_ST_DEFAULT_MAX_HEADER) {
        free(text);
        moecal_error_set(MOECAL_ERR_UNSUPPORTED, "%s: header of %llu bytes is larger than the "
                         "%u bytes readers accept", w->path, (ull)n,
                         MOECAL_ST_DEFAULT_MAX_HEADER);
        return MOECAL_ERR_UNSUPPORTED;
    }
    buf = malloc(LEN_FIELD + n);
    if (!buf) {
        free(text);
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory for the header", w->path);
    }
    store_le64(buf, n);
    memcpy(buf + LEN_FIELD, text, tlen);
    memset(buf + LEN_FIELD + tlen, ' ', n - tlen);
    free(text);
    w->data_off = LEN_FIELD + n;
    if (__builtin_add_overflow(w->data_off, off, &total) || total > INT64_MAX) {
        free(buf);
        return wr_err(w, "tensors add up to more bytes than a file can hold");
    }
    st = write_full(w, "the header", buf, LEN_FIELD + n, 0);
    free(buf);
    if (st != MOECAL_OK)
        return st;
    /* The final length now, so that tensors can be written in any order and
     * a tensor never written reads as zeros rather than as a short file. */
    if (ftruncate(w->fd, (off_t)total) != 0)
        return moecal_error_errno(errno, "%s: cannot extend to %llu bytes", w->tmp, (ull)total);
    w->header_done = true;
    return MOECAL_OK;
}

static st_wtensor *writer_find(moecal_st_writer *w, const char *name)
{
    size_t lo = 0, hi = w->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        st_wtensor *t = &w->t[w->by_name[mid]];
        int c = strcmp(name, t->name);
        if (c == 0)
            return t;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

/* Write bytes [off, off + nbytes) of a tensor: lets a tensor larger than
 * memory be written in pieces.  Pieces must not overlap; finish checks that
 * they add up to the tensor's size. */
moecal_status moecal_st_writer_write_at(moecal_st_writer *w, const char *name,
                                        uint64_t off, const void *data, size_t nbytes)
{
    st_wtensor *t;
    uint64_t stop;
    shown sn;
    char what[sizeof sn.s + 16];
    moecal_status st;

    if (!w || !name || (!data && nbytes))
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_st_writer_write: null argument");
    if (!w->header_done)
        return wr_err(w, "tensor '%s' written before the header", show(&sn, name));
    if (!(t = writer_find(w, name)))
        return wr_err(w, "tensor '%s' was never added", show(&sn, name));
    if (__builtin_add_overflow(off, (uint64_t)nbytes, &stop) || stop > t->nbytes)
        return wr_err(w, "tensor '%s': bytes [%llu, %llu + %zu) are outside its %llu bytes",
                      show(&sn, name), (ull)off, (ull)off, nbytes, (ull)t->nbytes);
    snprintf(what, sizeof what, "tensor '%s'", show(&sn, name));
    st = write_full(w, what, data, nbytes, w->data_off + t->begin + off);
    if (st == MOECAL_OK) /* pieces of one tensor may come from several threads */
        __atomic_fetch_add(&t->written, (uint64_t)nbytes, __ATOMIC_RELAXED);
    return st;
}

moecal_status moecal_st_writer_write(moecal_st_writer *w, const char *name,
                                     const void *data, size_t nbytes)
{
    st_wtensor *t;
    shown sn;

    if (!w || !name)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_st_writer_write: null argument");
    /* no header yet or no such tensor: write_at says which */
    if (!w->header_done || !(t = writer_find(w, name)))
        return moecal_st_writer_write_at(w, name, 0, data, nbytes);
    if (t->nbytes != nbytes)
        return wr_err(w, "tensor '%s' is %llu bytes, %zu given", show(&sn, name),
                      (ull)t->nbytes, nbytes);
    MOECAL_TRY(moecal_st_writer_write_at(w, name, 0, data, nbytes));
    /* a whole tensor rewritten replaces what was written before */
    t->written = nbytes;
    return MOECAL_OK;
}

static void writer_free(moecal_st_writer *w)
{
    for (size_t i = 0; i < w->n; i++)
        free(w->t[i].name);
    for (size_t i = 0; i < 2 * w->nmeta; i++)
        free(w->meta[i]);
    free(w->meta);
    free(w->t);
    free(w->by_name);
    free(w->tmp);
    free(w->path);
    free(w);
}

/* Make the rename durable: fsync the directory that holds path. */
static moecal_status sync_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir;
    int fd;
    moecal_status st = MOECAL_OK;

    if (!slash)
        dir = strdup(".");
    else if (slash == path)
        dir = strdup("/");
    else
        dir = strndup(path, (size_t)(slash - path));
    if (!dir)
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory", path);
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        st = moecal_error_errno(errno, "%s: cannot open directory %s to sync it", path, dir);
    } else {
        /* some file systems cannot sync a directory; the rename stands */
        if (fsync(fd) != 0 && errno != EINVAL && errno != ENOTSUP && errno != EROFS)
            st = moecal_error_errno(errno, "%s: cannot sync directory %s", path, dir);
        close(fd);
    }
    free(dir);
    return st;
}

/* Always consumes w: on failure the temporary file is removed. */
moecal_status moecal_st_writer_finish(moecal_st_writer *w)
{
    moecal_status st = MOECAL_OK;
    shown sn;
    int fd;

    if (!w)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_st_writer_finish: no writer");
    if (!w->header_done)
        st = wr_err(w, "finished before the header was written");
    for (size_t i = 0; st == MOECAL_OK && i < w->n; i++)
        if (w->t[i].written != w->t[i].nbytes)
            st = wr_err(w, "tensor '%s': %llu of its %llu bytes written", show(&sn, w->t[i].name),
                        (ull)w->t[i].written, (ull)w->t[i].nbytes);
    if (st == MOECAL_OK && fsync(w->fd) != 0)
        st = moecal_error_errno(errno, "%s: cannot sync", w->tmp);
    /* close reports late write errors on network file systems */
    fd = w->fd;
    w->fd = -1;
    if (close(fd) != 0 && st == MOECAL_OK)
        st = moecal_error_errno(errno, "%s: cannot close", w->tmp);
    if (st == MOECAL_OK && rename(w->tmp, w->path) != 0)
        st = moecal_error_errno(errno, "%s: cannot rename %s to it", w->path, w->tmp);
    if (st != MOECAL_OK) {
        unlink(w->tmp);
        writer_free(w);
        return st;
    }
    st = sync_dir(w->path);
    writer_free(w);
    return st;
}

void moecal_st_writer_abort(moecal_st_writer *w)
{
    if (!w)
        return;
    if (w->fd >= 0)
        close(w->fd);
    unlink(w->tmp);
    writer_free(w);
}
