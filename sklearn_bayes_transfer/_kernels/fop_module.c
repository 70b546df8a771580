/* The FOP kernel (fop.c) as a CPython extension module, built when the package is installed.
 *
 * setup.py compiles this file once per instruction-set level (BT_MODULE names the module:
 * _fop_generic, and on x86-64 also _fop_x86_64_v3 and _fop_x86_64_v4); sklearn_bayes_transfer/_kernel.py
 * imports the best one the running CPU supports (cpu_level() below, from the compiler's cpuid
 * checks). Arguments are tensors' addresses and sizes as Python ints; their C types are declared
 * here, once, in the PyArg_ParseTuple formats. The GIL is released while a kernel runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "fop.c"

#define BT_STR2(x) #x
#define BT_STR(x) BT_STR2(x)
#define BT_CAT2(a, b) a##b
#define BT_CAT(a, b) BT_CAT2(a, b)

#define PTR(x) ((void *)(intptr_t)(x))

static PyObject *py_gram(PyObject *self, PyObject *args) {
    long long s0, s1, nthreads, layer, r0, r1, u, g, dims, partial;
    if (!PyArg_ParseTuple(args, "LLLLLLLLLL:gram", &s0, &s1, &nthreads, &layer, &r0, &r1, &u, &g, &dims, &partial))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    bt_fop_gram(s0, s1, nthreads, PTR(layer), PTR(r0), PTR(r1), PTR(u), PTR(g), PTR(dims), PTR(partial));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_update(PyObject *self, PyObject *args) {
    long long s0, s1, nthreads, layer, r0, r1, u, g, p, dims, pmat, lr, mom;
    if (!PyArg_ParseTuple(args, "LLLLLLLLLLLLL:update", &s0, &s1, &nthreads, &layer, &r0, &r1, &u, &g, &p, &dims,
                          &pmat, &lr, &mom))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    bt_fop_update(s0, s1, nthreads, PTR(layer), PTR(r0), PTR(r1), PTR(u), PTR(g), PTR(p), PTR(dims), PTR(pmat),
                  PTR(lr), PTR(mom));
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_openmp(PyObject *self, PyObject *args) { return PyBool_FromLong(bt_openmp()); }

/* 4: x86-64-v4 (AVX-512), 3: x86-64-v3 (AVX2, FMA), 1: other x86-64, 0: another architecture. */
static PyObject *py_cpu_level(PyObject *self, PyObject *args) {
    long level = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    level = 1;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
        level = 3;
    if (level == 3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd"))
        level = 4;
#endif
    return PyLong_FromLong(level);
}

static PyMethodDef methods[] = {
    {"gram", py_gram, METH_VARARGS, "FOP's Gram products U^T G over a table of row segments."},
    {"update", py_update, METH_VARARGS, "FOP's momentum and preconditioned weight update over row segments."},
    {"openmp", py_openmp, METH_NOARGS, "Whether the loops run on OpenMP threads."},
    {"cpu_level", py_cpu_level, METH_NOARGS, "The instruction-set level of the running CPU (4, 3, 1 or 0)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, BT_STR(BT_MODULE), NULL, -1, methods};

PyMODINIT_FUNC BT_CAT(PyInit_, BT_MODULE)(void) { return PyModule_Create(&module); }
