/* Optional compiled kernel of onnxcompress.quant.histogram (module _onnxcompress_histogram).
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
#include <stdint.h>
#include <stdlib.h>

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

static int is_int64(const Py_buffer *b, Py_ssize_t size)
{
    return b->itemsize == 8 && b->format != NULL && b->format[1] == '\0' &&
           (b->format[0] == 'q' || b->format[0] == 'l') && b->len == 8 * size;
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
    const char *fmt = values.format ? values.format : "B";
    int f32 = values.itemsize == 4 && fmt[0] == 'f' && fmt[1] == '\0';
    int f64 = values.itemsize == 8 && fmt[0] == 'd' && fmt[1] == '\0';
    if (!(f32 || f64) || bins < 1 || bins > (1 << 20) || !is_int64(&pos, bins) || !is_int64(&neg, bins)) {
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

static PyMethodDef methods[] = {
    {"count", count, METH_VARARGS,
     "count(values, scale, bins, pos, neg, weight) -> exact zeros: bin "
     "floor(v * scale) of every value into the |x| histograms (see onnxcompress.quant.histogram)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_onnxcompress_histogram",
    "Compiled counting loop of onnxcompress.quant.histogram (optional).", -1, methods,
};

PyMODINIT_FUNC PyInit__onnxcompress_histogram(void)
{
    return PyModule_Create(&module);
}
