#include "edge_ms_tap.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

/* Declared here rather than included so that the library builds without
 * llama.cpp's headers (pip builds it in an isolated environment). The
 * symbols are resolved at load time from ggml-base, which every program
 * that runs llama.cpp has already loaded. */
const char *ggml_get_name(const struct ggml_tensor *tensor);
int64_t ggml_nelements(const struct ggml_tensor *tensor);
int64_t ggml_nrows(const struct ggml_tensor *tensor);
size_t ggml_nbytes(const struct ggml_tensor *tensor);
void ggml_backend_tensor_get(const struct ggml_tensor *tensor, void *data, size_t offset, size_t size);

int edge_ms_tap_init(edge_ms_tap *tap, int32_t layer, int32_t n_embd, float *data, int32_t capacity_rows) {
    if (tap == NULL || layer < 0 || n_embd <= 0 || capacity_rows < 0 || (data == NULL && capacity_rows > 0)) {
        return -1;
    }
    memset(tap, 0, sizeof(*tap));
    snprintf(tap->name, sizeof(tap->name), "l_out-%d", (int) layer);
    tap->enabled = 1;
    tap->n_embd = n_embd;
    tap->capacity_rows = capacity_rows;
    tap->data = data;
    return 0;
}

void edge_ms_tap_reset(edge_ms_tap *tap) {
    tap->n_rows = 0;
    tap->n_calls = 0;
    tap->status = EDGE_MS_TAP_OK;
}

bool edge_ms_tap_cb(struct ggml_tensor *t, bool ask, void *user_data) {
    edge_ms_tap *tap = (edge_ms_tap *) user_data;
    if (!tap->enabled || strcmp(ggml_get_name(t), tap->name) != 0) {
        /* ask: we do not need this node; data: keep computing. */
        return !ask;
    }
    if (ask) {
        return true;
    }
    const int64_t n_el = ggml_nelements(t);
    const int64_t n_rows = ggml_nrows(t);
    if (n_rows <= 0) {
        return true;
    }
    if (n_el / n_rows != tap->n_embd || n_el % n_rows != 0) {
        tap->status = EDGE_MS_TAP_BAD_SHAPE;
        return true;
    }
    if (ggml_nbytes(t) != (size_t) n_el * sizeof(float)) {
        tap->status = EDGE_MS_TAP_NOT_F32;
        return true;
    }
    int64_t take = n_rows;
    if ((int64_t) tap->n_rows + take > tap->capacity_rows) {
        take = tap->capacity_rows - tap->n_rows;
        tap->status = EDGE_MS_TAP_OVERFLOW;
    }
    if (take > 0) {
        const size_t row_bytes = (size_t) tap->n_embd * sizeof(float);
        ggml_backend_tensor_get(t, tap->data + (size_t) tap->n_rows * tap->n_embd, 0, (size_t) take * row_bytes);
        tap->n_rows += (int32_t) take;
    }
    tap->n_calls += 1;
    return true;
}

bool edge_ms_abort_cb(void *flag) {
    return __atomic_load_n((int32_t *) flag, __ATOMIC_RELAXED) != 0;
}
