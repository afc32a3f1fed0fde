/*
 * prunet's call into its sparse kernel without ctypes: a Python extension module, `_fastcall`, with one
 * function that calls `prunet_chain` (csrc/spmm.c) through the address ctypes found for it.
 *
 * A ctypes call converts its arguments through libffi: with the caches cold (the first call after other
 * work), that machinery alone cost about 90 us a call on a 2-core Xeon, against about 45 us through this
 * module, and a whole pruned LeNet-300-100 at batch 1 takes about 250 us. Built by `make native` beside
 * the kernel, with the headers of the Python that runs prunet; where it is missing, prunet calls the
 * kernel through ctypes (prunet.sparse.native.status() says which).
 *
 * Private to prunet.sparse.native.Chain, which passes only addresses it holds and has checked: the
 * arguments are integers turned into pointers, as they are for ctypes.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define PRUNET_FASTCALL_ABI 1

typedef int (*chain_fn)(const void *layers, int64_t count, const float *x, float *y, int64_t batch,
                        int64_t threads);

/* chain(function, layers, count, x, y, batch, threads) -> the kernel's return code. The GIL is released
   during the product, as ctypes releases it. */
static PyObject *chain(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long long v[7];
    (void)self;
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "chain takes 7 integers (%zd given)", nargs);
        return NULL;
    }
    for (int i = 0; i < 7; i++) {
        v[i] = PyLong_AsLongLong(args[i]);
        if (v[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    if (!v[0]) {
        PyErr_SetString(PyExc_ValueError, "chain: no function");
        return NULL;
    }
    chain_fn f = (chain_fn)(intptr_t)v[0];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = f((const void *)(intptr_t)v[1], v[2], (const float *)(intptr_t)v[3], (float *)(intptr_t)v[4], v[5], v[6]);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyMethodDef methods[] = {
    {"chain", (PyCFunction)(void (*)(void))chain, METH_FASTCALL,
     "chain(function, layers, count, x, y, batch, threads) -> int: prunet_chain at `function`."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastcall", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastcall(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "ABI", PRUNET_FASTCALL_ABI) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
