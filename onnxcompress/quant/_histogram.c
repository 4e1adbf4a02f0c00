/* Optional compiled kernel of onnxcompress.quant.histogram (module _onnxcompress_histogram): count
 * below, and grid_terms further down (the MSE range search's inner loop).
 *
 * count(values, scale, bins, pos, neg, weight) bins the values of a C-contiguous float32 or float64
 * buffer at floor(v * scale) into the two int64 |x| histograms of HistogramCollector (bins counters
 * each: x >= 0 at pos[k], x < 0 at neg[-k - 1]), each count weighing `weight`, exact zeros left out,
 * and returns the number of exact zeros. The caller guarantees that every value is finite and
 * inside the covered range (|v * scale| < bins) and that scale is a power of two (so v * scale is
 * exact): the counts are then the same integers as numpy's path.
 *
 * Per block of BLOCK values, the indices (and zeros) while in cache, then the counting,
 * alternately into two lanes (runs of equal values, the zeros of a Relu output, would
 * otherwise make one chain of dependent increments), folded into pos/neg at the end. floor is a
 * truncation corrected by one where the truncation went up (negative non-integers): exact for
 * |y| < 2^24 and vectorisable without SSE4.1. The GIL is released while counting.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 1024

#define DEFINE_COUNT(NAME, T)                                                               \
    static int64_t NAME(const T *x, Py_ssize_t n, T scale, Py_ssize_t bins, int64_t *lanes, \
                        int64_t weight)                                                     \
    {                                                                                       \
        int32_t idx[BLOCK];                                                                 \
        int64_t zeros = 0;                                                                  \
        int64_t *even = lanes + bins, *odd = lanes + 3 * bins;                              \
        for (Py_ssize_t start = 0; start < n; start += BLOCK) {                             \
            Py_ssize_t m = n - start < BLOCK ? n - start : BLOCK, j;                        \
            const T *p = x + start;                                                         \
            int32_t z = 0;                                                                  \
            for (j = 0; j < m; j++) {                                                       \
                T y = p[j] * scale;                                                         \
                int32_t t = (int32_t)y;                                                     \
                idx[j] = t - (y < (T)t);                                                    \
                z += p[j] == (T)0;                                                          \
            }                                                                               \
            zeros += z;                                                                     \
            for (j = 0; j + 1 < m; j += 2) {                                                \
                even[idx[j]] += weight;                                                     \
                odd[idx[j + 1]] += weight;                                                  \
            }                                                                               \
            if (j < m)                                                                      \
                even[idx[j]] += weight;                                                     \
        }                                                                                   \
        return zeros;                                                                       \
    }

DEFINE_COUNT(count_f32, float)
DEFINE_COUNT(count_f64, double)

/* Whether the buffer's items are `itemsize` bytes of one of the struct format characters `codes`. */
static int is_type(const Py_buffer *b, Py_ssize_t itemsize, const char *codes)
{
    return b->itemsize == itemsize && b->format != NULL && b->format[0] != '\0' && b->format[1] == '\0' &&
           strchr(codes, b->format[0]) != NULL;
}

static int get(PyObject *obj, Py_buffer *view, int flags, Py_buffer **held, int *n)
{
    if (PyObject_GetBuffer(obj, view, flags | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    held[(*n)++] = view;
    return 0;
}

/* The lanes (4 * bins counters, see DEFINE_COUNT) added to pos/neg, the zeros taken out of pos[0]. */
static void fold(const int64_t *lanes, Py_ssize_t bins, int64_t *pos, int64_t *neg, int64_t zeros)
{
    for (Py_ssize_t k = 0; k < bins; k++) {
        pos[k] += lanes[bins + k] + lanes[3 * bins + k];
        neg[k] += lanes[bins - 1 - k] + lanes[3 * bins - 1 - k];
    }
    pos[0] -= zeros;
}

static PyObject *count(PyObject *self, PyObject *args)
{
    PyObject *values_obj, *pos_obj, *neg_obj;
    double scale;
    Py_ssize_t bins;
    long long weight;
    int held_n = 0;
    int64_t zeros = 0;
    Py_buffer values, pos, neg, *held[3];
    PyObject *out = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "OdnOOL", &values_obj, &scale, &bins, &pos_obj, &neg_obj, &weight))
        return NULL;
    if (get(values_obj, &values, PyBUF_SIMPLE, held, &held_n) < 0 ||
        get(pos_obj, &pos, PyBUF_WRITABLE, held, &held_n) < 0 ||
        get(neg_obj, &neg, PyBUF_WRITABLE, held, &held_n) < 0)
        goto done;
    int f32 = is_type(&values, 4, "f"), f64 = is_type(&values, 8, "d");
    if (!(f32 || f64) || bins < 1 || bins > (1 << 20) || !is_type(&pos, 8, "ql") || !is_type(&neg, 8, "ql") ||
        pos.len != 8 * bins || neg.len != 8 * bins) {
        PyErr_SetString(PyExc_ValueError, "count: float32/float64 values and two int64 histograms of bins counters expected");
        goto done;
    }
    int64_t *lanes = calloc((size_t)(4 * bins), sizeof(int64_t));
    if (lanes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t n = values.len / values.itemsize;
    Py_BEGIN_ALLOW_THREADS
    if (f32)
        zeros = count_f32((const float *)values.buf, n, (float)scale, bins, lanes, weight);
    else
        zeros = count_f64((const double *)values.buf, n, scale, bins, lanes, weight);
    fold(lanes, bins, (int64_t *)pos.buf, (int64_t *)neg.buf, zeros * weight);
    Py_END_ALLOW_THREADS
    free(lanes);
    out = PyLong_FromLongLong(zeros);
done:
    while (held_n > 0)
        PyBuffer_Release(held[--held_n]);
    return out;
}

/* grid_terms(x, n, step, low, high, out): out[r, j] = (x[j] - clip(rint(x[j] / step[r]), low[r], high[r])
 * * step[r])^2 * n[j] for float64 buffers (out C-contiguous, len(step) rows of len(x) values): the
 * terms of onnxcompress.quant.observers._grid_error, which numpy computes in seven passes, in one, with
 * the same IEEE operations in the same order (numpy then sums the rows, as before), so the same bits.
 * rint (round half to even) is (|t| + 2^52) - 2^52 with t's sign: exact for |t| < 2^52 (larger values
 * are integers already) and vectorisable anywhere; clip is numpy's max-then-min. Build with
 * -ffp-contract=off: a fused multiply-add would round differently. */
static void grid_rows(const double *x, const double *n, Py_ssize_t cols, const double *step,
                      const double *low, const double *high, Py_ssize_t rows, double *out)
{
    const double big = 4503599627370496.0; /* 2^52 */
    for (Py_ssize_t r = 0; r < rows; r++) {
        const double s = step[r], lo = low[r], hi = high[r];
        double *o = out + r * cols;
        for (Py_ssize_t j = 0; j < cols; j++) {
            double t = x[j] / s;
            double a = fabs(t);
            double q = copysign(a < big ? (a + big) - big : a, t);
            q = q > lo ? q : lo;
            q = q < hi ? q : hi;
            double d = x[j] - q * s;
            o[j] = d * d * n[j];
        }
    }
}

static PyObject *grid_terms(PyObject *self, PyObject *args)
{
    PyObject *objs[6];
    Py_buffer views[6], *held[6];
    int held_n = 0;
    PyObject *out = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOO", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &objs[5]))
        return NULL;
    for (int i = 0; i < 6; i++)
        if (get(objs[i], &views[i], i == 5 ? PyBUF_WRITABLE : PyBUF_SIMPLE, held, &held_n) < 0)
            goto done;
    Py_ssize_t cols = views[0].len / 8, rows = views[2].len / 8;
    int ok = 1;
    for (int i = 0; i < 6; i++)
        ok = ok && is_type(&views[i], 8, "d");
    if (!ok || views[1].len != views[0].len || views[3].len != views[2].len || views[4].len != views[2].len ||
        views[5].len != 8 * rows * cols) {
        PyErr_SetString(PyExc_ValueError, "grid_terms: float64 x, n (same length), step, low, high (same length) "
                                          "and a C-contiguous out of len(step) x len(x) expected");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    grid_rows((const double *)views[0].buf, (const double *)views[1].buf, cols, (const double *)views[2].buf,
              (const double *)views[3].buf, (const double *)views[4].buf, rows, (double *)views[5].buf);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    out = Py_None;
done:
    while (held_n > 0)
        PyBuffer_Release(held[--held_n]);
    return out;
}

static PyMethodDef methods[] = {
    {"count", count, METH_VARARGS,
     "count(values, scale, bins, pos, neg, weight) -> exact zeros: bin "
     "floor(v * scale) of every value into the |x| histograms (see onnxcompress.quant.histogram)."},
    {"grid_terms", grid_terms, METH_VARARGS,
     "grid_terms(x, n, step, low, high, out): the squared rounding errors of onnxcompress.quant.observers."
     "_grid_error, per candidate row (float64 buffers)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_onnxcompress_histogram",
    "Compiled loops of onnxcompress.quant (optional): histogram counting and the MSE grid's terms.", -1, methods,
};

PyMODINIT_FUNC PyInit__onnxcompress_histogram(void)
{
    return PyModule_Create(&module);
}
