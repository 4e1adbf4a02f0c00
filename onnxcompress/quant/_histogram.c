/* Optional compiled kernel of onnxcompress.quant.histogram (module _onnxcompress_histogram).
 *
 * count(values, scale, bins, lanes, weight) adds floor(v * scale) for every value v of a C-contiguous
 * float32 or float64 buffer into the int64 buffer `lanes` (4 * bins counters, the layout of
 * HistogramCollector._add: even positions at offset bins, odd ones at offset 3 * bins), each count
 * weighing `weight`, and returns the number of exact zeros among the values. The caller guarantees
 * that every value is finite and |v * scale| < bins, and that scale is a power of two (so v * scale
 * is exact): the counts are then the same integers numpy's path computes.
 *
 * floor is a truncation corrected by one where the truncation went up (negative non-integers):
 * exact for |y| < 2^24 and vectorisable without SSE4.1. The GIL is released while counting.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

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

static int is_int64(const Py_buffer *b)
{
    return b->itemsize == 8 && b->format != NULL && b->format[1] == '\0' &&
           (b->format[0] == 'q' || b->format[0] == 'l');
}

static PyObject *count(PyObject *self, PyObject *args)
{
    PyObject *values_obj, *lanes_obj;
    double scale;
    Py_ssize_t bins;
    long long weight;
    Py_buffer values, lanes;
    int64_t zeros = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "OdnOL", &values_obj, &scale, &bins, &lanes_obj, &weight))
        return NULL;
    if (PyObject_GetBuffer(values_obj, &values, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return NULL;
    if (PyObject_GetBuffer(lanes_obj, &lanes, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&values);
        return NULL;
    }
    const char *fmt = values.format ? values.format : "B";
    int f32 = values.itemsize == 4 && fmt[0] == 'f' && fmt[1] == '\0';
    int f64 = values.itemsize == 8 && fmt[0] == 'd' && fmt[1] == '\0';
    if (!(f32 || f64) || !is_int64(&lanes) || bins < 1 || bins > (1 << 20) ||
        lanes.len / 8 < 4 * bins) {
        PyBuffer_Release(&values);
        PyBuffer_Release(&lanes);
        PyErr_SetString(PyExc_ValueError, "count: float32/float64 values and 4 * bins int64 lanes expected");
        return NULL;
    }
    Py_ssize_t n = values.len / values.itemsize;
    Py_BEGIN_ALLOW_THREADS
    if (f32)
        zeros = count_f32((const float *)values.buf, n, (float)scale, bins, (int64_t *)lanes.buf, weight);
    else
        zeros = count_f64((const double *)values.buf, n, scale, bins, (int64_t *)lanes.buf, weight);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&values);
    PyBuffer_Release(&lanes);
    return PyLong_FromLongLong(zeros);
}

static PyMethodDef methods[] = {
    {"count", count, METH_VARARGS,
     "count(values, scale, bins, lanes, weight) -> exact zeros: add floor(v * scale) of every value "
     "to the histogram lanes (see onnxcompress.quant.histogram)."},
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
