/* edge_ms hidden-state tap: a llama.cpp cb_eval callback in plain C.
 *
 * llama.cpp calls cb_eval twice for every node of every graph it computes: once
 * with ask=true ("do you want this tensor?") and, for the nodes we said yes to,
 * once more with ask=false once the tensor holds data. Answering in C keeps the
 * ~1000 ask-calls per decode out of Python.
 *
 * Ownership: the caller owns both the edge_ms_tap struct and its `data` buffer
 * and keeps them alive for as long as the llama_context that was created with
 * cb_eval = edge_ms_tap_cb and cb_eval_user_data = &tap.
 *
 * Link with ggml (ggml-base): the tap calls ggml_get_name, ggml_nelements,
 * ggml_nrows, ggml_nbytes and ggml_backend_tensor_get, so it works whatever
 * backend (CPU, CUDA, Metal) holds the tensor.
 */
#ifndef EDGE_MS_TAP_H
#define EDGE_MS_TAP_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_tensor;

#define EDGE_MS_TAP_NAME_MAX 64
#define EDGE_MS_TAP_MAX_LAYERS 8

enum edge_ms_tap_status {
    EDGE_MS_TAP_OK = 0,
    EDGE_MS_TAP_OVERFLOW = 1,   /* more rows than capacity_rows: extra rows dropped */
    EDGE_MS_TAP_BAD_SHAPE = 2,  /* tensor row width != n_embd */
    EDGE_MS_TAP_NOT_F32 = 3,    /* tensor is not contiguous float32 */
};

/* With several layers, token r's row of layer slot k sits at data[(r * n_layers + k) * n_embd]:
 * one token's rows of every layer are contiguous, so a kept row is one slice. */
typedef struct edge_ms_tap {
    char name[EDGE_MS_TAP_NAME_MAX]; /* first graph tensor to copy, e.g. "l_out-26" (for messages) */
    int32_t enabled;                 /* 0: answer no to every ask (tap off) */
    int32_t n_embd;                  /* floats per row of one layer */
    int32_t capacity_rows;           /* tokens that fit in data */
    int32_t n_rows;                  /* tokens written since the last reset (of layer slot 0) */
    int32_t n_calls;                 /* data calls (micro-batches) of layer slot 0 since the last reset */
    int32_t status;                  /* enum edge_ms_tap_status, sticky until reset */
    float *data;                     /* caller-owned, capacity_rows * n_layers * n_embd floats */
    int32_t n_layers;                /* layers tapped, 1..EDGE_MS_TAP_MAX_LAYERS */
    int32_t layers[EDGE_MS_TAP_MAX_LAYERS];     /* their indices, in slot order */
    int32_t layer_rows[EDGE_MS_TAP_MAX_LAYERS]; /* tokens written per slot since the last reset */
} edge_ms_tap;

/* Fill tap for layer `layer` (tensor "l_out-<layer>"). Returns 0, or -1 on bad arguments. */
int edge_ms_tap_init(edge_ms_tap *tap, int32_t layer, int32_t n_embd, float *data, int32_t capacity_rows);

/* The same for n_layers distinct layers read in one pass (a head's layer and candidates for
 * another, while sampling training data). Returns 0, or -1 on bad arguments. */
int edge_ms_tap_init_layers(edge_ms_tap *tap, const int32_t *layers, int32_t n_layers, int32_t n_embd, float *data,
                            int32_t capacity_rows);

/* Forget the rows of the previous llama_decode; call before each llama_decode. */
void edge_ms_tap_reset(edge_ms_tap *tap);

/* The cb_eval callback: pass as llama_context_params.cb_eval with cb_eval_user_data = tap. */
bool edge_ms_tap_cb(struct ggml_tensor *t, bool ask, void *user_data);

/* An abort callback for llama_set_abort_callback: aborts llama_decode once *flag != 0.
 * ggml checks it between graph nodes, so it too must not call into Python. */
bool edge_ms_abort_cb(void *flag);

#ifdef __cplusplus
}
#endif

#endif
