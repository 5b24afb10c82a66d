/* fuzz_safetensors.c - libFuzzer target for the safetensors header parser.
 *
 * The input is a whole file (file_size = its length).  Beyond "no crash, no
 * out-of-bounds access" it checks what the parser promises: every refusal
 * names the file and is a format or unsupported error (never an internal
 * one), and every accepted file is self-consistent: contiguous offsets that
 * cover the file exactly, sizes that match shapes, lookups that find each
 * tensor and metadata key.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "safetensors.h"

/* Beyond safetensors.h (see safetensors.c). */
size_t moecal_st_metadata_count(const moecal_st_file *f);
const char *moecal_st_metadata_key(const moecal_st_file *f, size_t i);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define LABEL "fuzz.safetensors"

static void fail(const char *what)
{
    fprintf(stderr, "fuzz_safetensors: invariant broken: %s\n", what);
    abort();
}

static void check_file(const moecal_st_file *f, uint64_t size)
{
    size_t n = moecal_st_count(f);
    uint64_t data_off = moecal_st_data_offset(f), expect = 0;

    if (data_off < 8 || data_off > size)
        fail("data offset outside the file");
    for (size_t i = 0; i < n; i++) {
        const moecal_st_tensor *t = moecal_st_tensor_at(f, i);
        uint64_t numel = 1;
        if (!t || !t->name || !t->dtype_name)
            fail("tensor_at returned an incomplete tensor");
        if (t->begin != expect || t->end < t->begin)
            fail("offsets not contiguous");
        expect = t->end;
        if (t->ndim < 0 || t->ndim > MOECAL_ST_MAX_DIMS)
            fail("ndim out of range");
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] < 0)
                fail("negative dimension");
            numel *= (uint64_t)t->shape[d];
        }
        if (numel != t->numel)
            fail("numel does not match the shape");
        if (t->dtype != MOECAL_DT_UNKNOWN &&
            t->end - t->begin != t->numel * moecal_dtype_size(t->dtype))
            fail("size does not match shape and dtype");
        if (moecal_st_find(f, t->name) != t)
            fail("find does not return the tensor");
    }
    if (moecal_st_tensor_at(f, n) != NULL)
        fail("tensor_at past the end");
    if (data_off + expect != size)
        fail("data do not end at the end of the file");
    for (size_t i = 0; i < moecal_st_metadata_count(f); i++) {
        const char *k = moecal_st_metadata_key(f, i);
        if (!k || !moecal_st_metadata(f, k))
            fail("metadata key without value");
    }
    if (moecal_st_find(f, "__metadata__") != NULL)
        fail("__metadata__ taken for a tensor");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    moecal_st_file *f = NULL;
    moecal_status st;

    moecal_error_clear();
    st = moecal_st_parse(data, size, size, 0, LABEL, &f);
    if (st == MOECAL_OK) {
        if (!f)
            fail("success without a file");
        check_file(f, size);
        moecal_st_close(f);
        return 0;
    }
    if (f)
        fail("failure with a file");
    if (st != MOECAL_ERR_FORMAT && st != MOECAL_ERR_UNSUPPORTED && st != MOECAL_ERR_NOMEM)
        fail("refusal with an unexpected status");
    if (strncmp(moecal_error_message(), LABEL ": ", strlen(LABEL) + 2) != 0)
        fail("message does not name the file");
    return 0;
}
