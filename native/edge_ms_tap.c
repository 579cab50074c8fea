#include "edge_ms_tap.h"

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
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

int edge_ms_tap_init_layers(edge_ms_tap *tap, const int32_t *layers, int32_t n_layers, int32_t n_embd, float *data,
                            int32_t capacity_rows) {
    if (tap == NULL || layers == NULL || n_layers < 1 || n_layers > EDGE_MS_TAP_MAX_LAYERS || n_embd <= 0 ||
        capacity_rows < 0 || (data == NULL && capacity_rows > 0)) {
        return -1;
    }
    for (int32_t k = 0; k < n_layers; k++) {
        if (layers[k] < 0) {
            return -1;
        }
        for (int32_t j = 0; j < k; j++) {
            if (layers[j] == layers[k]) {
                return -1;
            }
        }
    }
    memset(tap, 0, sizeof(*tap));
    snprintf(tap->name, sizeof(tap->name), "l_out-%d", (int) layers[0]);
    tap->enabled = 1;
    tap->n_embd = n_embd;
    tap->capacity_rows = capacity_rows;
    tap->data = data;
    tap->n_layers = n_layers;
    memcpy(tap->layers, layers, (size_t) n_layers * sizeof(int32_t));
    return 0;
}

int edge_ms_tap_init(edge_ms_tap *tap, int32_t layer, int32_t n_embd, float *data, int32_t capacity_rows) {
    return edge_ms_tap_init_layers(tap, &layer, 1, n_embd, data, capacity_rows);
}

void edge_ms_tap_reset(edge_ms_tap *tap) {
    tap->n_rows = 0;
    tap->n_calls = 0;
    tap->status = EDGE_MS_TAP_OK;
    memset(tap->layer_rows, 0, sizeof(tap->layer_rows));
}

/* The layer slot of graph tensor `name` ("l_out-<i>" for a tapped i), or -1. */
static int slot_of(const edge_ms_tap *tap, const char *name) {
    static const char prefix[] = "l_out-";
    if (strncmp(name, prefix, sizeof(prefix) - 1) != 0) {
        return -1;
    }
    const char *digits = name + sizeof(prefix) - 1;
    if (*digits < '0' || *digits > '9') {
        return -1;
    }
    char *end = NULL;
    const long layer = strtol(digits, &end, 10);
    if (*end != '\0') {
        return -1;
    }
    for (int k = 0; k < tap->n_layers; k++) {
        if (tap->layers[k] == layer) {
            return k;
        }
    }
    return -1;
}

bool edge_ms_tap_cb(struct ggml_tensor *t, bool ask, void *user_data) {
    edge_ms_tap *tap = (edge_ms_tap *) user_data;
    const int k = tap->enabled ? slot_of(tap, ggml_get_name(t)) : -1;
    if (k < 0) {
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
    const int32_t done = tap->layer_rows[k];
    int64_t take = n_rows;
    if ((int64_t) done + take > tap->capacity_rows) {
        take = tap->capacity_rows - done;
        tap->status = EDGE_MS_TAP_OVERFLOW;
    }
    const size_t row_bytes = (size_t) tap->n_embd * sizeof(float);
    if (take > 0 && tap->n_layers == 1) {
        ggml_backend_tensor_get(t, tap->data + (size_t) done * tap->n_embd, 0, (size_t) take * row_bytes);
    } else {
        for (int64_t r = 0; r < take; r++) {
            float *dst = tap->data + ((size_t) (done + r) * tap->n_layers + k) * tap->n_embd;
            ggml_backend_tensor_get(t, dst, (size_t) r * row_bytes, row_bytes);
        }
    }
    tap->layer_rows[k] = done + (int32_t) (take > 0 ? take : 0);
    if (k == 0) {
        tap->n_rows = tap->layer_rows[0];
        tap->n_calls += 1;
    }
    return true;
}

bool edge_ms_abort_cb(void *flag) {
    return __atomic_load_n((int32_t *) flag, __ATOMIC_RELAXED) != 0;
}
