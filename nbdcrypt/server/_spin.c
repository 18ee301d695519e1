/* Busy-polling a connection's socket for its next request, the GIL released (server/poll.py).
 *
 * recv_spin(fd, buffer, budget_ns): recv(MSG_DONTWAIT) into the writable buffer until bytes
 * come (returns their count), the peer shuts down (0), or budget_ns pass (-1). Other errors
 * raise OSError.
 *
 * Why C: a Python loop takes the GIL back after every receive. A thread that waits for the GIL
 * behind such a loop is woken, finds it taken again, and waits out the switch interval (5 ms):
 * four clients at queue depth 1 lost a third of their IOPS to one polling thread that way.
 * Here the GIL is let go for the whole poll, as for a blocking recv().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sched.h>
#include <sys/socket.h>
#include <time.h>

static long long monotonic_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static PyObject *spin_recv_spin(PyObject *self, PyObject *args) {
    int fd;
    Py_buffer buf;
    long long budget;
    if (!PyArg_ParseTuple(args, "iw*L", &fd, &buf, &budget)) {
        return NULL;
    }
    ssize_t n;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS;
    long long end = monotonic_ns() + budget;
    for (;;) {
        n = recv(fd, buf.buf, (size_t)buf.len, MSG_DONTWAIT);
        if (n >= 0) {
            break;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            err = errno;
            break;
        }
        if (monotonic_ns() >= end) {
            n = -1;
            break;
        }
        sched_yield(); /* a task waiting for this CPU (a client, on a busy machine) goes first */
    }
    Py_END_ALLOW_THREADS;
    PyBuffer_Release(&buf);
    if (err != 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromSsize_t(n);
}

static PyMethodDef spin_methods[] = {
    {"recv_spin", spin_recv_spin, METH_VARARGS,
     "recv_spin(fd, buffer, budget_ns) -> bytes received, 0 at EOF, -1 if none came in time"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef spin_module = {
    PyModuleDef_HEAD_INIT, "_spin", "Busy-polling a socket without the GIL.", -1, spin_methods,
};

PyMODINIT_FUNC PyInit__spin(void) { return PyModule_Create(&spin_module); }
