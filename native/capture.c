/* asrkf-edge native hot path: copy attention tensors out of llama.cpp's graph while it runs.
 *
 * asrkf_capture_cb is a ggml_backend_sched_eval_callback (llama_context_params.cb_eval). The
 * scheduler asks it about every graph node; it answers "yes" only for the nodes the caller enabled
 * (kq_soft_max-<il>, post-RoPE Qcur-<il> and Kcur-<il>) and, once a node is computed, copies the
 * rows of the newest tokens into caller-owned buffers through ggml_backend_tensor_get (host or device
 * memory alike). A node it asks for ends a graph view there. In split mode it asks for the nodes marked
 * SPLIT whether or not it copies: every decode is then cut into the same views, so a CUDA backend keeps
 * one graph per view instead of capturing the whole decode's graph again after each captured one
 * (ggml-cuda keys its graphs by a view's first node). Deciding by name in C keeps the per-node cost to a
 * few nanoseconds; a Python callback costs about a microsecond per node and there are about a thousand
 * nodes per decode.
 * The Python twin is asrkf_edge.capture._python_callback: both must copy identical bytes.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

/* The leading fields of ggml.h's struct ggml_tensor, in order (stable across ggml versions). */
struct tensor_head {
    int32_t type;
    void *buffer;
    int64_t ne[4];
    size_t nb[4];
    int32_t op;
};

/* ggml.h's struct ggml_tensor up to its name (GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10): the sources of a node lead
 * to the KV cache's tensors. The layout is checked against ggml_get_name before any source is read. */
struct tensor_full {
    int32_t type;
    void *buffer;
    int64_t ne[4];
    size_t nb[4];
    int32_t op;
    int32_t op_params[16];
    int32_t flags;
    void *src[10];
    void *view_src;
    size_t view_offs;
    void *data;
    char name[64];
};

typedef const char *(*name_fn)(const void *tensor);
typedef void (*get_fn)(const void *tensor, void *data, size_t offset, size_t size);
/* Per-layer recall (asrkf_edge.recall): called once a layer's post-RoPE queries are computed, before its attention,
 * with the caller's recall_user. */
typedef void (*recall_fn)(int32_t layer, const void *tensor, void *user);

enum { KIND_PROBS = 0, KIND_Q = 1, KIND_K = 2, N_KINDS = 3 };
enum { ERR_NONE = 0, ERR_CAPACITY = 1, ERR_LAYOUT = 2 };
enum { WANT = 1, SPLIT = 2 }; /* bits of want[slot]: copied when enabled; asked for in split mode */

/* Mirrored by asrkf_edge.capture._State (ctypes); slot = kind * n_layer + layer. find_cache: while set, every
 * SET_ROWS node asked about is looked at: where it writes into a tensor named cache_k_l<layer> or cache_v_l<layer>
 * (llama.cpp's K and V caches of the layer, one row per cell), that tensor goes to cache_kv[layer] or
 * cache_kv[n_layer + layer]; cleared once all are known, or on a layout that does not match (layout_ok 0). */
typedef struct {
    name_fn get_name;
    get_fn tensor_get;
    int32_t rope_op;
    int32_t n_layer;
    int32_t enabled;  /* copy the nodes asked for */
    int32_t split;    /* ask for the SPLIT nodes (instead of the WANT nodes), copying them only when enabled */
    int32_t window;   /* rows kept from the end of the batch for probabilities and queries */
    int32_t error;    /* first error since the last reset */
    int32_t err_slot;
    uint8_t *want;    /* [N_KINDS * n_layer] WANT | SPLIT bits */
    uint8_t **buf;    /* [N_KINDS * n_layer] destinations */
    int64_t *cap;     /* [N_KINDS * n_layer] capacity in bytes */
    int64_t *shape;   /* [N_KINDS * n_layer * 3] shape of what was copied */
    int32_t *hits;    /* [N_KINDS * n_layer] copies since the last reset */
    int32_t set_rows_op;
    int32_t find_cache;
    int32_t layout_ok; /* -1 unchecked, 0 mismatch, 1 checked */
    int32_t n_found;
    void **cache_kv;  /* [2 * n_layer]: every layer's K cache, then every layer's V cache */
    recall_fn recall; /* while set, every layer's post-RoPE Qcur is asked for and handed to it */
    void *recall_user;
    int64_t recall_ns; /* nanoseconds spent in recall since the caller last cleared it */
} asrkf_capture;

static int64_t now_ns(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int parse(const char *name, int32_t n_layer, int *kind) {
    const char *dash = strrchr(name, '-');
    if (!dash || dash[1] < '0' || dash[1] > '9') return -1;
    size_t len = (size_t)(dash - name);
    if (len == 11 && memcmp(name, "kq_soft_max", 11) == 0) *kind = KIND_PROBS;
    else if (len == 4 && memcmp(name, "Qcur", 4) == 0) *kind = KIND_Q;
    else if (len == 4 && memcmp(name, "Kcur", 4) == 0) *kind = KIND_K;
    else return -1;
    int layer = atoi(dash + 1);
    return layer < n_layer ? layer : -1;
}

/* The capture slot of a node parsed as (kind, layer), else -1. */
static int slot_of(const asrkf_capture *s, const struct tensor_head *t, int kind, int layer) {
    if (layer < 0) return -1;
    if (kind != KIND_PROBS && t->op != s->rope_op) return -1;  /* Qcur/Kcur: only the post-RoPE node */
    int slot = kind * s->n_layer + layer;
    return (s->want[slot] & (s->split ? SPLIT : WANT)) ? slot : -1;
}

static void fail(asrkf_capture *s, int err, int slot) {
    if (!s->error) {
        s->error = err;
        s->err_slot = slot;
    }
}

static void copy_node(asrkf_capture *s, const struct tensor_head *t, int slot) {
    const int kind = slot / s->n_layer;
    const int64_t *ne = t->ne;
    const size_t *nb = t->nb;
    if (t->type != 0 || nb[0] != 4 || nb[1] != nb[0] * (size_t)ne[0] || nb[2] != nb[1] * (size_t)ne[1]) {
        fail(s, ERR_LAYOUT, slot);
        return;
    }
    uint8_t *dst = s->buf[slot];
    int64_t *shape = s->shape + 3 * slot;
    if (kind == KIND_PROBS) { /* ne = [n_kv, n_tokens, n_head] -> [n_head, rows, n_kv] */
        int64_t rows = ne[1] < s->window ? ne[1] : s->window;
        size_t part = (size_t)rows * nb[1];
        if ((int64_t)(part * (size_t)ne[2]) > s->cap[slot]) {
            fail(s, ERR_CAPACITY, slot);
            return;
        }
        for (int64_t h = 0; h < ne[2]; ++h) {
            s->tensor_get(t, dst + h * part, (size_t)h * nb[2] + (size_t)(ne[1] - rows) * nb[1], part);
        }
        shape[0] = ne[2], shape[1] = rows, shape[2] = ne[0];
    } else { /* ne = [head_dim, n_head, n_tokens] -> [rows, n_head, head_dim] */
        int64_t rows = (kind == KIND_K || ne[2] < s->window) ? ne[2] : s->window;
        size_t size = (size_t)rows * nb[2];
        if ((int64_t)size > s->cap[slot]) {
            fail(s, ERR_CAPACITY, slot);
            return;
        }
        s->tensor_get(t, dst, (size_t)(ne[2] - rows) * nb[2], size);
        shape[0] = rows, shape[1] = ne[1], shape[2] = ne[0];
    }
    s->hits[slot] += 1;
}

/* The layer whose post-RoPE Qcur a node parsed as (kind, layer) is, else -1 (recall). */
static int recall_layer(const asrkf_capture *s, const struct tensor_head *t, int kind, int layer) {
    return kind == KIND_Q && t->op == s->rope_op ? layer : -1;
}

/* Slot of a KV cache tensor named exactly cache_k_l<layer> (layer) or cache_v_l<layer> (n_layer + layer), else -1. */
static int cache_slot(const char *name, int32_t n_layer) {
    if (strncmp(name, "cache_", 6) != 0 || (name[6] != 'k' && name[6] != 'v') || strncmp(name + 7, "_l", 2) != 0) return -1;
    const char *p = name + 9;
    if (*p < '0' || *p > '9') return -1;
    int layer = 0;
    for (; *p >= '0' && *p <= '9' && layer < n_layer; ++p) layer = layer * 10 + (*p - '0');
    if (*p || layer >= n_layer) return -1;
    return (name[6] == 'v' ? n_layer : 0) + layer;
}

/* Where a SET_ROWS node writes a layer's K or V cache (the node is a view whose root is that tensor, itself no
 * view), remember the tensor. */
static void find_cache(asrkf_capture *s, const struct tensor_head *t) {
    const struct tensor_full *f = (const struct tensor_full *)t;
    if (s->layout_ok < 0) s->layout_ok = s->get_name(t) == f->name;
    if (!s->layout_ok) {
        s->find_cache = 0;
        return;
    }
    const struct tensor_full *dst = (const struct tensor_full *)f->view_src;
    if (!dst || dst->view_src) return;
    int slot = cache_slot(dst->name, s->n_layer);
    if (slot >= 0 && !s->cache_kv[slot]) {
        s->cache_kv[slot] = (void *)dst;
        if (++s->n_found == 2 * s->n_layer) s->find_cache = 0;
    }
}

EXPORT bool asrkf_capture_cb(void *tensor, bool ask, void *user) {
    asrkf_capture *s = (asrkf_capture *)user;
    if (ask && s->find_cache && ((const struct tensor_head *)tensor)->op == s->set_rows_op) {
        find_cache(s, (const struct tensor_head *)tensor);
    }
    const struct tensor_head *t = (const struct tensor_head *)tensor;
    if (!s->enabled && !s->split && !s->recall) return false;
    int kind = -1;
    const int parsed = parse(s->get_name(t), s->n_layer, &kind);  /* once for both uses */
    int layer = s->recall ? recall_layer(s, t, kind, parsed) : -1;
    if (!s->enabled && !s->split && layer < 0) return false;
    int slot = (s->enabled || s->split) ? slot_of(s, t, kind, parsed) : -1;
    if (ask) return slot >= 0 || layer >= 0;
    if (slot >= 0 && s->enabled) copy_node(s, t, slot);
    if (layer >= 0) {
        const int64_t t0 = now_ns();
        s->recall(layer, tensor, s->recall_user);
        s->recall_ns += now_ns() - t0;
    }
    return true;
}
