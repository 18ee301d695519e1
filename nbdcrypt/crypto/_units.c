/* Whole requests of data units through libcrypto, in C, the GIL released for the whole call.
 *
 * run(): the per-data-unit loop of libcrypto.UnitEngine (AES-XTS of big units, AES-CBC): per
 *        unit the IV is reset and the unit runs through the context, exactly what the Python
 *        loop does, but ~0.1 us a unit instead of ~3 us of Python and ctypes.
 * xts(): AES-XTS from two ECB contexts, for small units (libcrypto.XtsEngine).
 * land(): a sealed write (server/threaded.py): its payload received and encrypted in place
 *         as it arrives, the ciphertext written, the reply sent and the next header read.
 * ivs(): a request's IV blocks.
 *
 * Python gives the addresses of libcrypto's EVP_CipherInit_ex and EVP_CipherUpdate (found by
 * ctypes) and of keyed EVP_CIPHER_CTXs, so this module needs only Python.h to build and links
 * against nothing (land() adds only libc's recv, poll, pwrite and send). The event loop or
 * another thread runs while the cipher works.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <errno.h>
#include <string.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef int (*cipher_init_fn)(void *ctx, const void *cipher, void *engine, const unsigned char *key,
                              const unsigned char *iv, int enc);
typedef int (*cipher_update_fn)(void *ctx, unsigned char *out, int *outl, const unsigned char *in,
                                int inl);

#define IV_BLOCK 16

/* OSError(EIO, ...), as UnitEngine's Python loop raises it: the server answers the request EIO. */
static PyObject *cipher_failed(void) {
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", EIO, "libcrypto: the cipher failed");
    if (exc != NULL) {
        PyErr_SetObject(PyExc_OSError, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static void release(Py_buffer *src, Py_buffer *dst, Py_buffer *ivs) {
    PyBuffer_Release(src);
    PyBuffer_Release(dst);
    PyBuffer_Release(ivs);
}

/* What is wrong with a request's buffers (NULL: nothing), for both entry points. `max_unit`
 * keeps every length passed to libcrypto within an int. */
static const char *check_request(const Py_buffer *src, const Py_buffer *dst, const Py_buffer *ivs,
                                 Py_ssize_t unit_size, Py_ssize_t max_unit, int whole_blocks) {
    if (unit_size <= 0 || unit_size > max_unit || src->len % unit_size != 0 ||
        (whole_blocks && unit_size % IV_BLOCK != 0))
        return "data is not a whole number of units";
    if (dst->len != src->len)
        return "output and input differ in length";
    if (ivs->len < (src->len / unit_size) * IV_BLOCK)
        return "fewer IV blocks than units";
    return NULL;
}

/* Unit i of `in` (IV block i of `iv`) into `out` with one keyed context, the IV reset per
 * unit; nonzero if libcrypto failed. Needs no GIL. */
static int loop_units(cipher_init_fn init, cipher_update_fn update, void *ctx,
                      const unsigned char *in, unsigned char *out, const unsigned char *iv,
                      Py_ssize_t units, Py_ssize_t unit_size) {
    for (Py_ssize_t i = 0; i < units; i++) {
        int written = 0;
        if (init(ctx, NULL, NULL, NULL, iv + i * IV_BLOCK, -1) != 1 ||
            update(ctx, out + i * unit_size, &written, in + i * unit_size, (int)unit_size) != 1)
            return 1;
    }
    return 0;
}

/* run(init, update, ctx, src, dst, ivs, unit_size) -> None
 * Unit i of src (IV block i of ivs) into dst; OSError(EIO) if libcrypto fails. */
static PyObject *units_run(PyObject *self, PyObject *args) {
    unsigned long long init_addr, update_addr, ctx_addr;
    Py_buffer src, dst, ivs;
    Py_ssize_t unit_size;
    if (!PyArg_ParseTuple(args, "KKKy*w*y*n", &init_addr, &update_addr, &ctx_addr, &src, &dst,
                          &ivs, &unit_size))
        return NULL;
    const char *problem = check_request(&src, &dst, &ivs, unit_size, INT_MAX, 0);
    if (problem == NULL && (!init_addr || !update_addr || !ctx_addr))
        problem = "null libcrypto function or context";
    if (problem != NULL) {
        release(&src, &dst, &ivs);
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS;
    failed = loop_units((cipher_init_fn)(uintptr_t)init_addr,
                        (cipher_update_fn)(uintptr_t)update_addr, (void *)(uintptr_t)ctx_addr,
                        src.buf, dst.buf, ivs.buf, src.len / unit_size, unit_size);
    Py_END_ALLOW_THREADS;
    release(&src, &dst, &ivs);
    if (failed)
        return cipher_failed();
    Py_RETURN_NONE;
}

/* XTS from ECB: T = AES_K2(IV) per unit, then T * x^j for block j (GF(2^128), little-endian
 * as IEEE 1619), C = AES_K1(P ^ T) ^ T. Two EVP calls per chunk instead of two per data unit:
 * OpenSSL 3's IV reset looks its parameters up by name, which costs more than AES on a
 * 512-byte unit. */

#define XTS_CHUNK (32 * 1024) /* tweaks for this many bytes stay in the cache between passes */

static inline void mul_x(uint64_t *lo, uint64_t *hi) {
    uint64_t carry = *hi >> 63;
    *hi = (*hi << 1) | (*lo >> 63);
    *lo = (*lo << 1) ^ (carry * 0x87);
}

static inline uint64_t load64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v; /* x86-64 and every little-endian machine: the byte order IEEE 1619 uses */
}

static inline void store64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }

#if defined(__SSE2__)
#include <emmintrin.h>

/* T times x in GF(2^128), IEEE 1619's little-endian order: each 32-bit lane shifts left by
 * one and takes the top bit of the lane below; the top bit of the last lane comes back as
 * 0x87 into the first. */
static inline __m128i mul_x128(__m128i t) {
    __m128i carries = _mm_shuffle_epi32(_mm_srai_epi32(t, 31), 0x93);
    carries = _mm_and_si128(carries, _mm_set_epi32(1, 1, 1, 0x87));
    return _mm_xor_si128(_mm_slli_epi32(t, 1), carries);
}

/* dst = src ^ T over the blocks of one unit from its first tweak t, keeping each block's T
 * in `tweaks` for the second pass. */
static inline void whiten_unit(const unsigned char *src, unsigned char *dst, unsigned char *tweaks,
                               __m128i t, Py_ssize_t blocks) {
    for (Py_ssize_t j = 0; j < blocks; j++, src += IV_BLOCK, dst += IV_BLOCK, tweaks += IV_BLOCK) {
        _mm_storeu_si128((__m128i *)tweaks, t);
        _mm_storeu_si128((__m128i *)dst, _mm_xor_si128(_mm_loadu_si128((const __m128i *)src), t));
        t = mul_x128(t);
    }
}

/* dst = src ^ T over the blocks of `units` whole units whose first tweaks are t0[0..units),
 * keeping each block's T in `tweaks` for the second pass. SSE2 (every x86-64): one 16-byte
 * operation a block, where 64-bit halves took as long as the AES itself for 512-byte units.
 * A unit's tweaks are a chain (each is the one before times x); four units at a time keep
 * four chains in flight, where one chain waited on each multiplication. */
static void xts_whiten(const unsigned char *src, unsigned char *dst, unsigned char *tweaks,
                       const unsigned char *t0, Py_ssize_t units, Py_ssize_t unit_size) {
    Py_ssize_t blocks = unit_size / IV_BLOCK, u = 0;
    for (; u + 4 <= units; u += 4) {
        __m128i t[4];
        const unsigned char *s[4];
        unsigned char *d[4], *k[4];
        for (int i = 0; i < 4; i++) {
            t[i] = _mm_loadu_si128((const __m128i *)(t0 + (u + i) * IV_BLOCK));
            s[i] = src + (u + i) * unit_size;
            d[i] = dst + (u + i) * unit_size;
            k[i] = tweaks + (u + i) * unit_size;
        }
        for (Py_ssize_t at = 0; at < unit_size; at += IV_BLOCK) {
            for (int i = 0; i < 4; i++) {
                _mm_storeu_si128((__m128i *)(k[i] + at), t[i]);
                __m128i v = _mm_loadu_si128((const __m128i *)(s[i] + at));
                _mm_storeu_si128((__m128i *)(d[i] + at), _mm_xor_si128(v, t[i]));
                t[i] = mul_x128(t[i]);
            }
        }
    }
    for (; u < units; u++)
        whiten_unit(src + u * unit_size, dst + u * unit_size, tweaks + u * unit_size,
                    _mm_loadu_si128((const __m128i *)(t0 + u * IV_BLOCK)), blocks);
}

/* dst ^= tweaks over `len` bytes: the second whitening, after the ECB pass. */
static void xts_unwhiten(unsigned char *dst, const unsigned char *tweaks, Py_ssize_t len) {
    for (Py_ssize_t at = 0; at < len; at += IV_BLOCK) {
        __m128i d = _mm_loadu_si128((const __m128i *)(dst + at));
        __m128i t = _mm_loadu_si128((const __m128i *)(tweaks + at));
        _mm_storeu_si128((__m128i *)(dst + at), _mm_xor_si128(d, t));
    }
}

#else /* portable: 64-bit halves */

/* dst = src ^ T over the blocks of `units` whole units whose first tweaks are t0[0..units),
 * keeping each block's T in `tweaks` for the second pass. */
static void xts_whiten(const unsigned char *src, unsigned char *dst, unsigned char *tweaks,
                       const unsigned char *t0, Py_ssize_t units, Py_ssize_t unit_size) {
    Py_ssize_t blocks = unit_size / IV_BLOCK;
    for (Py_ssize_t u = 0; u < units; u++) {
        uint64_t lo = load64(t0 + u * IV_BLOCK), hi = load64(t0 + u * IV_BLOCK + 8);
        for (Py_ssize_t j = 0; j < blocks; j++) {
            Py_ssize_t at = (u * blocks + j) * IV_BLOCK;
            store64(tweaks + at, lo);
            store64(tweaks + at + 8, hi);
            store64(dst + at, load64(src + at) ^ lo);
            store64(dst + at + 8, load64(src + at + 8) ^ hi);
            mul_x(&lo, &hi);
        }
    }
}

/* dst ^= tweaks over `len` bytes: the second whitening, after the ECB pass. */
static void xts_unwhiten(unsigned char *dst, const unsigned char *tweaks, Py_ssize_t len) {
    for (Py_ssize_t at = 0; at < len; at += IV_BLOCK) {
        store64(dst + at, load64(dst + at) ^ load64(tweaks + at));
        store64(dst + at + 8, load64(dst + at + 8) ^ load64(tweaks + at + 8));
    }
}

#endif

/* AES-XTS of `units` whole units from `in` (IV block i of `iv`) into `out`: tweak_ctx is
 * AES-ECB encryption with K2, data_ctx AES-ECB with K1 either way (that alone decides the
 * direction). Nonzero if libcrypto failed, -1 if out of memory. Needs no GIL. */
static int xts_units(cipher_update_fn update, void *tweak_ctx, void *data_ctx,
                     const unsigned char *in, unsigned char *out, const unsigned char *iv,
                     Py_ssize_t units, Py_ssize_t unit_size) {
    if (units == 0)
        return 0;
    Py_ssize_t per_chunk = unit_size >= XTS_CHUNK ? 1 : XTS_CHUNK / unit_size;
    unsigned char *t0 = PyMem_RawMalloc((size_t)units * IV_BLOCK);
    unsigned char *tweaks = PyMem_RawMalloc((size_t)(per_chunk * unit_size));
    int failed = t0 == NULL || tweaks == NULL ? -1 : 0, written = 0;
    /* the IV blocks, encrypted in pieces that fit an int */
    for (Py_ssize_t u = 0; u < units && !failed; u += 1 << 20) {
        Py_ssize_t n = units - u < (1 << 20) ? units - u : (1 << 20);
        failed = update(tweak_ctx, t0 + u * IV_BLOCK, &written, iv + u * IV_BLOCK,
                        (int)(n * IV_BLOCK)) != 1;
    }
    for (Py_ssize_t u = 0; u < units && !failed; u += per_chunk) {
        Py_ssize_t n = units - u < per_chunk ? units - u : per_chunk;
        Py_ssize_t at = u * unit_size, len = n * unit_size;
        xts_whiten(in + at, out + at, tweaks, t0 + u * IV_BLOCK, n, unit_size);
        failed = update(data_ctx, out + at, &written, out + at, (int)len) != 1;
        xts_unwhiten(out + at, tweaks, len);
    }
    PyMem_RawFree(t0);
    PyMem_RawFree(tweaks);
    return failed;
}

/* xts(update, tweak_ctx, data_ctx, src, dst, ivs, unit_size) -> None
 * xts_units over whole buffers; OSError(EIO) if libcrypto fails. Padding off on both. */
static PyObject *units_xts(PyObject *self, PyObject *args) {
    unsigned long long update_addr, tweak_addr, data_addr;
    Py_buffer src, dst, ivs;
    Py_ssize_t unit_size;
    if (!PyArg_ParseTuple(args, "KKKy*w*y*n", &update_addr, &tweak_addr, &data_addr, &src, &dst,
                          &ivs, &unit_size))
        return NULL;
    const char *problem = check_request(&src, &dst, &ivs, unit_size, INT_MAX / 2, 1);
    if (problem == NULL && (!update_addr || !tweak_addr || !data_addr))
        problem = "null libcrypto function or context";
    if (problem != NULL) {
        release(&src, &dst, &ivs);
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS;
    failed = xts_units((cipher_update_fn)(uintptr_t)update_addr, (void *)(uintptr_t)tweak_addr,
                       (void *)(uintptr_t)data_addr, src.buf, dst.buf, ivs.buf,
                       src.len / unit_size, unit_size);
    Py_END_ALLOW_THREADS;
    release(&src, &dst, &ivs);
    if (failed < 0)
        return PyErr_NoMemory();
    if (failed)
        return cipher_failed();
    Py_RETURN_NONE;
}

/* A prepared request's cipher call over units [first, first + units) of p, in place. */
typedef struct {
    int xts;
    unsigned long long a, b, c;
    const unsigned char *ivs;
    Py_ssize_t unit_size;
} prepared;

static int run_prepared(const prepared *r, unsigned char *p, Py_ssize_t first, Py_ssize_t units) {
    unsigned char *at = p + first * r->unit_size;
    const unsigned char *iv = r->ivs + first * IV_BLOCK;
    if (r->xts)
        return xts_units((cipher_update_fn)(uintptr_t)r->a, (void *)(uintptr_t)r->b,
                         (void *)(uintptr_t)r->c, at, at, iv, units, r->unit_size);
    return loop_units((cipher_init_fn)(uintptr_t)r->a, (cipher_update_fn)(uintptr_t)r->b,
                      (void *)(uintptr_t)r->c, at, at, iv, units, r->unit_size);
}

/* What is wrong with a prepared request over buf (NULL: nothing); sets r->ivs. */
static const char *check_prepared(prepared *r, const Py_buffer *buf, const Py_buffer *ivs) {
    const char *problem =
        check_request(buf, buf, ivs, r->unit_size, r->xts ? INT_MAX / 2 : INT_MAX, r->xts);
    if (problem == NULL && (!r->a || !r->b || !r->c))
        problem = "null libcrypto function or context";
    r->ivs = ivs->buf;
    return problem;
}

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Receive buf[got:] from `sock`, encrypting whole units in place as they arrive (and the
 * whole units of buf[:got] first): what the socket holds is taken at once (MSG_DONTWAIT) and
 * poll() waits only when there is nothing to encrypt, at most stall_ms at a time and
 * within_ms in all. Sets *got; returns a land() code (0, 1, 2, 3 or -errno). */
static int receive_sealing(const prepared *r, unsigned char *p, Py_ssize_t len, Py_ssize_t *got,
                           int sock, int stall_ms, long long within_ms) {
    Py_ssize_t have = *got, done = 0, unit = r->unit_size;
    long long start = now_ms();
    int code = 0;
    while (done < len) {
        if (have < len) { /* first take what is there: the client writes on meanwhile */
            ssize_t n = recv(sock, p + have, (size_t)(len - have), MSG_DONTWAIT);
            if (n > 0)
                have += n;
            else if (n == 0) {
                code = 2;
                break;
            } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                code = -errno;
                break;
            }
        }
        if (have / unit > done / unit) {
            if (run_prepared(r, p, done / unit, have / unit - done / unit)) {
                code = 3;
                break;
            }
            done = have / unit * unit;
            continue;
        }
        long long left = within_ms - (now_ms() - start);
        struct pollfd wait = {.fd = sock, .events = POLLIN};
        int n = left <= 0 ? 0 : poll(&wait, 1, left < stall_ms ? (int)left : stall_ms);
        if (n == 0) {
            code = 1;
            break;
        }
        if (n < 0 && errno != EINTR) {
            code = -errno;
            break;
        }
    }
    *got = have;
    return code;
}

/* Write all of p to fd at offset: 0, or the errno (EIO for a write that writes nothing, which
 * would spin, as backends/file.py pwrite_all). */
static int write_whole(int fd, const unsigned char *p, Py_ssize_t len, long long offset) {
    for (Py_ssize_t done = 0; done < len;) {
        ssize_t n = pwrite(fd, p + done, (size_t)(len - done), (off_t)(offset + done));
        if (n > 0)
            done += n;
        else if (n == 0)
            return EIO;
        else if (errno != EINTR)
            return errno;
    }
    return 0;
}

/* Send what of out[0:len] goes without waiting: the bytes sent, or -errno. */
static Py_ssize_t send_now(int sock, const char *out, Py_ssize_t len) {
    Py_ssize_t sent = 0;
    while (sent < len) {
        ssize_t n = send(sock, out + sent, (size_t)(len - sent), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0)
            sent += n;
        else if (n == 0 || errno == EAGAIN || errno == EWOULDBLOCK)
            break; /* the client reads no replies: the caller sends the rest, holding nothing */
        else if (errno != EINTR)
            return -errno;
    }
    return sent;
}

/* land(xts, a, b, c, buf, ivs, unit_size, got, sock, stall_ms, within_ms, fd, offset, reply,
 *      header) -> (got, code, errno, sent, header_bytes)
 * A sealed write (server/threaded.py) in one call, the GIL let go once. xts false: run()'s
 * loop with init a, update b, context c; true: xts() with update a, tweak context b, data
 * context c. buf holds `got` bytes of the payload; the rest is received from `sock` and
 * encrypted in place as it arrives, so the cipher runs while the client refills the socket
 * (whose buffer holds less than one large payload); never waiting longer than stall_ms for
 * the next bytes, nor than within_ms in all. Codes: 0 all received and encrypted; 1 the
 * client stalled or was too slow (got // unit_size units encrypted); 2 it closed; 3 the
 * cipher failed; -E the socket failed with errno E. On 0 the ciphertext is written whole to
 * fd at offset (errno: 0, or why not); once it landed, what of `reply` goes without waiting
 * is sent (sent: bytes, or -errno), and once all of it went, what there is (without waiting)
 * of the next request's header is received into `header` (header_bytes). */
static PyObject *units_land(PyObject *self, PyObject *args) {
    prepared r;
    Py_buffer buf, ivs, reply, header;
    Py_ssize_t got;
    int sock, stall_ms, fd;
    long long within_ms, offset;
    if (!PyArg_ParseTuple(args, "pKKKw*y*nniiLiLy*w*", &r.xts, &r.a, &r.b, &r.c, &buf, &ivs,
                          &r.unit_size, &got, &sock, &stall_ms, &within_ms, &fd, &offset,
                          &reply, &header))
        return NULL;
    const char *problem = check_prepared(&r, &buf, &ivs);
    if (problem == NULL && (offset < 0 || got < 0 || got > buf.len || stall_ms < 0))
        problem = "bad offset, count or wait";
    if (problem != NULL) {
        release(&buf, &ivs, &reply);
        PyBuffer_Release(&header);
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    unsigned char *p = buf.buf;
    Py_ssize_t sent = 0, header_bytes = 0;
    int code, failed = 0;
    Py_BEGIN_ALLOW_THREADS;
    code = receive_sealing(&r, p, buf.len, &got, sock, stall_ms, within_ms);
    if (code == 0)
        failed = write_whole(fd, p, buf.len, offset);
    if (code == 0 && !failed)
        sent = send_now(sock, reply.buf, reply.len);
    if (code == 0 && !failed && sent == reply.len && header.len > 0) {
        ssize_t n = recv(sock, header.buf, (size_t)header.len, MSG_DONTWAIT);
        header_bytes = n > 0 ? n : 0; /* nothing there, or the socket's news: the caller reads */
    }
    Py_END_ALLOW_THREADS;
    release(&buf, &ivs, &reply);
    PyBuffer_Release(&header);
    return Py_BuildValue("(nnini)", got, (Py_ssize_t)code, failed, sent, header_bytes);
}

/* ivs(first_lo, first_hi, step, bits, count) -> bytes
 * The 16-byte little-endian IV blocks (first + i * step) mod 2^bits, i < count: what the
 * Python side would build with ~10 us of numpy calls a request. */
static PyObject *units_ivs(PyObject *self, PyObject *args) {
    unsigned long long lo, hi, step;
    int bits;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "KKKin", &lo, &hi, &step, &bits, &count))
        return NULL;
    if (count < 0 || count > PY_SSIZE_T_MAX / IV_BLOCK || (bits != 32 && bits != 64 && bits != 128)) {
        PyErr_SetString(PyExc_ValueError, "bad IV count or width");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, count * IV_BLOCK);
    if (out == NULL)
        return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned __int128 v = ((unsigned __int128)hi << 64) | lo;
    for (Py_ssize_t i = 0; i < count; i++, v += step) {
        uint64_t low = (uint64_t)v, high = bits == 128 ? (uint64_t)(v >> 64) : 0;
        if (bits == 32)
            low &= 0xffffffffu;
        store64(p + i * IV_BLOCK, low);
        store64(p + i * IV_BLOCK + 8, high);
    }
    return out;
}

static PyMethodDef units_methods[] = {
    {"run", units_run, METH_VARARGS,
     "run(init, update, ctx, src, dst, ivs, unit_size): every data unit through a keyed "
     "libcrypto context, the IV reset per unit, without the GIL."},
    {"xts", units_xts, METH_VARARGS,
     "xts(update, tweak_ctx, data_ctx, src, dst, ivs, unit_size): AES-XTS of whole data units "
     "from two keyed ECB contexts, without the GIL."},
    {"land", units_land, METH_VARARGS,
     "land(xts, a, b, c, buf, ivs, unit_size, got, sock, stall_ms, within_ms, fd, offset, reply, "
     "header) -> (got, code, errno, sent, header_bytes): a sealed write received and encrypted "
     "as it arrives, written, answered, and the next header read, without the GIL."},
    {"ivs", units_ivs, METH_VARARGS,
     "ivs(first_lo, first_hi, step, bits, count) -> bytes: little-endian IV blocks."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef units_module = {
    PyModuleDef_HEAD_INIT, "_units", "Whole requests of data units through libcrypto, without the GIL.", -1,
    units_methods,
};

PyMODINIT_FUNC PyInit__units(void) { return PyModule_Create(&units_module); }
