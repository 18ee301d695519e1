/* Splicing a write payload from a socket to a file, the GIL released (server/splice.py).
 *
 * splice_payload(sock, pipe_r, pipe_w, pipe_size, null_fd, fd, offset, length): moves the next
 * `length` bytes of `sock` through the pipe to `fd` at `offset`. Returns 0; or the errno of the
 * file's first failure, after taking the rest of the payload off the socket anyway (into
 * null_fd, /dev/null) so that the next request is read where it begins; or -1 if the socket
 * ended first. The socket's own errors raise OSError.
 *
 * Why C: a payload takes two to four splice calls (it arrives in pieces); from Python each
 * call lets go of the GIL and takes it back, and with a thread per connection each take can
 * wait behind another connection's Python. Here the GIL is let go once per payload.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <fcntl.h>

/* Write the `left` bytes the pipe holds to fd at *offset; on failure return its errno (the
 * bytes are still in the pipe). */
static int pipe_to_file(int pipe_r, int fd, long long *offset, ssize_t left, ssize_t *moved) {
    *moved = 0;
    while (left > 0) {
        loff_t off = (loff_t)*offset;
        ssize_t m = splice(pipe_r, NULL, fd, &off, (size_t)left, 0);
        if (m > 0) {
            left -= m;
            *moved += m;
            *offset += m;
        } else if (m < 0 && errno == EINTR) {
            continue;
        } else {
            return m < 0 ? errno : EIO; /* 0: nothing written though the pipe holds bytes */
        }
    }
    return 0;
}

/* Throw away `left` bytes the pipe holds; 0 or an errno. */
static int pipe_to_null(int pipe_r, int null_fd, ssize_t left) {
    while (left > 0) {
        ssize_t m = splice(pipe_r, NULL, null_fd, NULL, (size_t)left, 0);
        if (m > 0) {
            left -= m;
        } else if (m < 0 && errno == EINTR) {
            continue;
        } else {
            return m < 0 ? errno : EIO;
        }
    }
    return 0;
}

static PyObject *splice_payload(PyObject *self, PyObject *args) {
    int sock, pipe_r, pipe_w, null_fd, fd;
    Py_ssize_t pipe_size;
    long long offset, length;
    if (!PyArg_ParseTuple(args, "iiiniiLL", &sock, &pipe_r, &pipe_w, &pipe_size, &null_fd, &fd,
                          &offset, &length)) {
        return NULL;
    }
    if (pipe_size <= 0 || length < 0) {
        PyErr_SetString(PyExc_ValueError, "pipe_size must be positive and length not negative");
        return NULL;
    }
    int file_err = 0, sock_err = 0, eof = 0;
    Py_BEGIN_ALLOW_THREADS;
    while (length > 0) {
        size_t want = length < (long long)pipe_size ? (size_t)length : (size_t)pipe_size;
        ssize_t n = splice(sock, NULL, pipe_w, NULL, want, 0);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            sock_err = errno;
            break;
        }
        if (n == 0) {
            eof = 1;
            break;
        }
        length -= n;
        ssize_t moved = 0;
        if (file_err == 0) {
            file_err = pipe_to_file(pipe_r, fd, &offset, n, &moved);
        }
        if (moved < n) { /* the file refused some: the rest of this piece goes nowhere */
            int err = pipe_to_null(pipe_r, null_fd, n - moved);
            if (err != 0) {
                sock_err = err; /* the pipe is stuck: the connection cannot go on */
                break;
            }
        }
    }
    Py_END_ALLOW_THREADS;
    if (sock_err != 0) {
        errno = sock_err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(eof ? -1 : file_err);
}

static PyMethodDef splice_methods[] = {
    {"splice_payload", splice_payload, METH_VARARGS,
     "splice_payload(sock, pipe_r, pipe_w, pipe_size, null_fd, fd, offset, length) -> 0, the "
     "file's errno, or -1 at the socket's end"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef splice_module = {
    PyModuleDef_HEAD_INIT, "_splice", "Splicing a payload from a socket to a file without the GIL.",
    -1, splice_methods,
};

PyMODINIT_FUNC PyInit__splice(void) { return PyModule_Create(&splice_module); }
