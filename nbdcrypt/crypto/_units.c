/* The per-data-unit loop of libcrypto.py, in C: one call runs a whole request.
 *
 * Python gives the addresses of libcrypto's EVP_CipherInit_ex and EVP_CipherUpdate (found by
 * ctypes) and of a keyed EVP_CIPHER_CTX, so this module needs only Python.h to build and links
 * against nothing. For each data unit it resets the IV and runs the unit through the context,
 * exactly what UnitEngine.run's Python loop does, with the GIL released for the whole request:
 * the per-unit cost falls from ~3 us of Python and ctypes to OpenSSL's own, and the event loop
 * or another thread runs while the cipher works.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

typedef int (*cipher_init_fn)(void *ctx, const void *cipher, void *engine, const unsigned char *key,
                              const unsigned char *iv, int enc);
typedef int (*cipher_update_fn)(void *ctx, unsigned char *out, int *outl, const unsigned char *in,
                                int inl);

#define IV_BLOCK 16

/* run(init, update, ctx, src, dst, ivs, unit_size) -> None
 * Unit i of src (IV block i of ivs) into dst; raises OSError(EIO) if libcrypto fails. */
static PyObject *units_run(PyObject *self, PyObject *args) {
    unsigned long long init_addr, update_addr, ctx_addr;
    Py_buffer src, dst, ivs;
    Py_ssize_t unit_size;
    if (!PyArg_ParseTuple(args, "KKKy*w*y*n", &init_addr, &update_addr, &ctx_addr, &src, &dst,
                          &ivs, &unit_size))
        return NULL;
    const char *problem = NULL;
    if (unit_size <= 0 || unit_size > INT_MAX || src.len % unit_size != 0)
        problem = "data is not a whole number of units";
    else if (dst.len != src.len)
        problem = "output and input differ in length";
    else if (ivs.len < (src.len / unit_size) * IV_BLOCK)
        problem = "fewer IV blocks than units";
    else if (!init_addr || !update_addr || !ctx_addr)
        problem = "null libcrypto function or context";
    if (problem != NULL) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyBuffer_Release(&ivs);
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    cipher_init_fn init = (cipher_init_fn)(uintptr_t)init_addr;
    cipher_update_fn update = (cipher_update_fn)(uintptr_t)update_addr;
    void *ctx = (void *)(uintptr_t)ctx_addr;
    const unsigned char *in = src.buf;
    unsigned char *out = dst.buf;
    const unsigned char *iv = ivs.buf;
    Py_ssize_t units = src.len / unit_size;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t i = 0; i < units; i++) {
        int written = 0;
        if (init(ctx, NULL, NULL, NULL, iv + i * IV_BLOCK, -1) != 1 ||
            update(ctx, out + i * unit_size, &written, in + i * unit_size, (int)unit_size) != 1) {
            failed = 1;
            break;
        }
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&ivs);
    if (failed) {
        errno = EIO;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyMethodDef units_methods[] = {
    {"run", units_run, METH_VARARGS,
     "run(init, update, ctx, src, dst, ivs, unit_size): every data unit through a keyed "
     "libcrypto context, the IV reset per unit, without the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef units_module = {
    PyModuleDef_HEAD_INIT, "_units", "libcrypto's per-unit loop for whole requests.", -1,
    units_methods,
};

PyMODINIT_FUNC PyInit__units(void) { return PyModule_Create(&units_module); }
