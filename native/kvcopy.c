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
#define ALWAYS_INLINE __forceinline
#else
#define EXPORT __attribute__((visibility("default")))
#define ALWAYS_INLINE inline __attribute__((always_inline))
#endif

/* Length of the run starting at i where source and destination rows both advance by one. */
static inline int64_t run_len(const int64_t *src_rows, const int64_t *dst_rows, int64_t i, int64_t count) {
    int64_t r = 1;
    while (i + r < count && src_rows[i + r] == src_rows[i] + r && dst_rows[i + r] == dst_rows[i] + r) ++r;
    return r;
}

/* Rows of `size` bytes, `count` of them, row i from src + src_rows[i] * ss to dst + dst_rows[i] * ds. Where both
 * strides equal the row size (blobs, not store slots), consecutive rows move as one memcpy: same bytes. */
static inline void copy_strided(const uint8_t *src, int64_t ss, uint8_t *dst, int64_t ds, int64_t size,
                                const int64_t *src_rows, const int64_t *dst_rows, int64_t count) {
    const int packed = ss == size && ds == size;
    for (int64_t i = 0, r; i < count; i += r) {
        r = packed ? run_len(src_rows, dst_rows, i, count) : 1;
        memcpy(dst + dst_rows[i] * ds, src + src_rows[i] * ss, (size_t)(r * size));
    }
}

/* Rows moved together through the transposed V: the block's row-side rows stay in L1 and its TLB while every
 * element of them moves. Row by row over all `count` rows for each element instead, each element went to another
 * store slot (a slot apart, 23 KB on the default model), so every row of a 400-token freeze was touched once per
 * element: 9.3 us a token of copy out of 14 (docs/RESULTS.md, eleventh session). */
#define V_BLOCK 16

/* V between a transposed side ([n_e][n] elements) and a row side (row r at r * stride, element e at e * el),
 * element by element, V_BLOCK rows at a time. A memcpy of el bytes whose size the compiler does not know is a
 * library call per element: inlined with 2-byte elements (f16 V, the usual case) or 4-byte ones (f32), the size
 * is a constant and each copy one load and one store (alignment-safe). Measured on 2 Xeon cores (default model,
 * flash attention off; benchmarks/freeze_thaw.py --repeat 30, median): freeze 48-49 -> 37-39 us per token, thaw
 * 51 -> 37 (docs/RESULTS.md, fifth session). */
static ALWAYS_INLINE void copy_v_elems(const uint8_t *src, int64_t src_n, int64_t src_vs, int32_t src_vt,
                                       uint8_t *dst, int64_t dst_n, int64_t dst_vs, const int64_t *src_rows,
                                       const int64_t *dst_rows, int64_t count, int64_t n_e, size_t el) {
    for (int64_t i0 = 0; i0 < count; i0 += V_BLOCK) {
        const int64_t i1 = i0 + V_BLOCK < count ? i0 + V_BLOCK : count;
        for (int64_t e = 0; e < n_e; ++e) {
            for (int64_t i = i0; i < i1; ++i) {
                const int64_t s_at = src_vt ? (e * src_n + src_rows[i]) * (int64_t)el : src_rows[i] * src_vs + e * (int64_t)el;
                const int64_t d_at = src_vt ? dst_rows[i] * dst_vs + e * (int64_t)el : (e * dst_n + dst_rows[i]) * (int64_t)el;
                memcpy(dst + d_at, src + s_at, el);
            }
        }
    }
}

static void copy_v_mixed(const uint8_t *src, int64_t src_n, int64_t src_vs, int32_t src_vt, uint8_t *dst,
                         int64_t dst_n, int64_t dst_vs, const int64_t *src_rows, const int64_t *dst_rows,
                         int64_t count, int64_t n_e, int64_t v_el) {
    if (v_el == 2) {
        copy_v_elems(src, src_n, src_vs, src_vt, dst, dst_n, dst_vs, src_rows, dst_rows, count, n_e, 2);
    } else if (v_el == 4) {
        copy_v_elems(src, src_n, src_vs, src_vt, dst, dst_n, dst_vs, src_rows, dst_rows, count, n_e, 4);
    } else {
        copy_v_elems(src, src_n, src_vs, src_vt, dst, dst_n, dst_vs, src_rows, dst_rows, count, n_e, (size_t)v_el);
    }
}

/* K and V of rows src_rows of one side into rows dst_rows of the other, every layer. A side is a buffer with
 * per-layer offsets of K and of V, the bytes between consecutive rows of a layer (ks, vs: the row size in a
 * blob, the slot size in the store) and whether V is transposed (llama.cpp with flash attention off stores V
 * as [n_embd_v][n_cells] elements; the store never does). */
EXPORT void asrkf_copy_rows_strided(
    const uint8_t *src, const int64_t *src_k, const int64_t *src_v, int64_t src_n, int64_t src_ks, int64_t src_vs,
    int32_t src_vt, uint8_t *dst, const int64_t *dst_k, const int64_t *dst_v, int64_t dst_n, int64_t dst_ks,
    int64_t dst_vs, int32_t dst_vt, const int64_t *src_rows, const int64_t *dst_rows, int64_t count,
    int32_t n_layer, int64_t k_row, int64_t v_row, int64_t v_el) {
    const int64_t n_e = v_el > 0 ? v_row / v_el : 0;
    for (int32_t l = 0; l < n_layer; ++l) {
        copy_strided(src + src_k[l], src_ks, dst + dst_k[l], dst_ks, k_row, src_rows, dst_rows, count);
        if (!src_vt && !dst_vt) {
            copy_strided(src + src_v[l], src_vs, dst + dst_v[l], dst_vs, v_row, src_rows, dst_rows, count);
        } else if (src_vt && dst_vt) {  /* runs are contiguous in both transposed layouts */
            for (int64_t e = 0; e < n_e; ++e) {
                for (int64_t i = 0, r; i < count; i += r) {
                    r = run_len(src_rows, dst_rows, i, count);
                    memcpy(dst + dst_v[l] + (e * dst_n + dst_rows[i]) * v_el,
                           src + src_v[l] + (e * src_n + src_rows[i]) * v_el, (size_t)(r * v_el));
                }
            }
        } else {
            copy_v_mixed(src + src_v[l], src_n, src_vs, src_vt, dst + dst_v[l], dst_n, dst_vs, src_rows, dst_rows,
                         count, n_e, v_el);
        }
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "asrkf-edge native KV copy (used via ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
