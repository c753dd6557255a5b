/* asrkf-edge native hot path: copy KV rows between llama.cpp state blobs and the frozen store.
 *
 * One side may hold V transposed (llama.cpp with flash attention off stores V as
 * [n_embd_v][n_cells] elements); the store always holds V as one row per token.
 * The Python twin is asrkf_edge.kvcopy._copy_rows_numpy: both must give identical bytes.
 * The file is built as a CPython extension only so that setuptools compiles it with the
 * normal install; Python calls it through ctypes.
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

static inline int64_t v_addr(int64_t off, int64_t n, int32_t vt, int64_t r, int64_t e,
                             int64_t v_row, int64_t v_el) {
    return vt ? off + (e * n + r) * v_el : off + r * v_row + e * v_el;
}

EXPORT void asrkf_copy_rows(
    const uint8_t *src, const int64_t *src_k, const int64_t *src_v, int64_t src_n, int32_t src_vt,
    uint8_t *dst, const int64_t *dst_k, const int64_t *dst_v, int64_t dst_n, int32_t dst_vt,
    const int64_t *src_rows, const int64_t *dst_rows, int64_t count,
    int32_t n_layer, int64_t k_row, int64_t v_row, int64_t v_el) {
    const int64_t n_e = v_el > 0 ? v_row / v_el : 0;
    for (int32_t l = 0; l < n_layer; ++l) {
        for (int64_t i = 0; i < count; ++i) {
            memcpy(dst + dst_k[l] + dst_rows[i] * k_row, src + src_k[l] + src_rows[i] * k_row, (size_t)k_row);
        }
        if (!src_vt && !dst_vt) {
            for (int64_t i = 0; i < count; ++i) {
                memcpy(dst + dst_v[l] + dst_rows[i] * v_row, src + src_v[l] + src_rows[i] * v_row, (size_t)v_row);
            }
            continue;
        }
        for (int64_t e = 0; e < n_e; ++e) {
            for (int64_t i = 0; i < count; ++i) {
                memcpy(dst + v_addr(dst_v[l], dst_n, dst_vt, dst_rows[i], e, v_row, v_el),
                       src + v_addr(src_v[l], src_n, src_vt, src_rows[i], e, v_row, v_el), (size_t)v_el);
            }
        }
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "asrkf-edge native KV copy (used via ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
