/* The caching-allocator model of estimator/allocator.py in C, and whole decode steps looped in C.

   Optional: estimator/program.py uses it when it is built (setup.py, optional=True) and falls back to the
   Python model, which stays the reference, when it is missing or a size passes 2**62 (OverflowError here).
   Every rule is the Python model's (see allocator.py for their sources in CUDACachingAllocator.cpp):
   512-byte rounding, small pool <= 1 MiB in 2 MiB segments, 20 MiB segments under 10 MiB, else rounded
   to 2 MiB; best fit on (size, address); split when the rest is >= 512 (small) or > 1 MiB (large); a
   freed block merges with free neighbours. Addresses, pools and counters match the Python model's
   exactly (tests/estimator/test_replay_accelerator.py). Standard library only. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MIN_BLOCK 512ULL
#define SMALL_SIZE (1ULL << 20)
#define SMALL_BUFFER (2ULL << 20)
#define MIN_LARGE_ALLOC (10ULL << 20)
#define LARGE_BUFFER (20ULL << 20)
#define ROUND_LARGE (2ULL << 20)
#define SEGMENT_GAP (1ULL << 44)
#define LIMIT (1ULL << 62) /* beyond this the Python model answers (its integers have no limit) */

typedef struct {
    uint64_t ptr, size;
    int64_t prev, next; /* block indices, -1: none */
    uint8_t free, small;
} Block;

typedef struct {
    uint64_t size, ptr;
    int64_t blk;
} Key;

typedef struct {
    Key *a;
    Py_ssize_t n, cap;
} Pool;

typedef struct {
    PyObject_HEAD
    Block *b;
    int64_t nb, cap;
    int64_t *spare; /* indices of dropped blocks, reused */
    int64_t nspare, sparecap;
    Pool pools[2]; /* [0]: large, [1]: small */
    uint64_t allocated, reserved, peak_allocated, peak_reserved, next_ptr;
    int64_t segments;
} Alloc;

static int overflow(void) {
    PyErr_SetString(PyExc_OverflowError, "a size beyond 2**62: the Python replay answers");
    return -1;
}

static int64_t new_block(Alloc *s, uint64_t ptr, uint64_t size, int small) {
    int64_t i;
    if (s->nspare) {
        i = s->spare[--s->nspare];
    } else {
        if (s->nb == s->cap) {
            int64_t cap = s->cap ? s->cap * 2 : 256;
            Block *b = PyMem_Realloc(s->b, cap * sizeof(Block));
            if (!b) { PyErr_NoMemory(); return -1; }
            s->b = b;
            s->cap = cap;
        }
        i = s->nb++;
    }
    Block *k = &s->b[i];
    k->ptr = ptr; k->size = size; k->prev = k->next = -1; k->free = 1; k->small = (uint8_t)small;
    return i;
}

static int drop_block(Alloc *s, int64_t i) {
    if (s->nspare == s->sparecap) {
        int64_t cap = s->sparecap ? s->sparecap * 2 : 64;
        int64_t *a = PyMem_Realloc(s->spare, cap * sizeof(int64_t));
        if (!a) { PyErr_NoMemory(); return -1; }
        s->spare = a;
        s->sparecap = cap;
    }
    s->spare[s->nspare++] = i;
    return 0;
}

/* first index whose key is >= (size, ptr) */
static inline Py_ssize_t lower(const Pool *p, uint64_t size, uint64_t ptr) {
    Py_ssize_t lo = 0, hi = p->n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) >> 1;
        const Key *k = &p->a[mid];
        if (k->size < size || (k->size == size && k->ptr < ptr)) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static int pool_insert(Pool *p, uint64_t size, uint64_t ptr, int64_t blk) {
    if (p->n == p->cap) {
        Py_ssize_t cap = p->cap ? p->cap * 2 : 64;
        Key *a = PyMem_Realloc(p->a, cap * sizeof(Key));
        if (!a) { PyErr_NoMemory(); return -1; }
        p->a = a;
        p->cap = cap;
    }
    Py_ssize_t i = lower(p, size, ptr);
    memmove(&p->a[i + 1], &p->a[i], (p->n - i) * sizeof(Key));
    p->a[i].size = size; p->a[i].ptr = ptr; p->a[i].blk = blk;
    p->n++;
    return 0;
}

static inline void pool_remove_at(Pool *p, Py_ssize_t i) {
    memmove(&p->a[i], &p->a[i + 1], (p->n - i - 1) * sizeof(Key));
    p->n--;
}

static inline uint64_t segment_size(uint64_t size) {
    if (size <= SMALL_SIZE) return SMALL_BUFFER;
    if (size < MIN_LARGE_ALLOC) return LARGE_BUFFER;
    return (size + ROUND_LARGE - 1) / ROUND_LARGE * ROUND_LARGE;
}

/* malloc of a rounded size (0 < size <= LIMIT); returns the block's index, -1 with an exception set */
static int64_t do_malloc(Alloc *s, uint64_t size) {
    int small = size <= SMALL_SIZE;
    Pool *pool = &s->pools[small];
    Py_ssize_t j = lower(pool, size, 0);
    int64_t bi;
    if (j < pool->n) {
        bi = pool->a[j].blk;
        pool_remove_at(pool, j);
    } else {
        uint64_t seg = segment_size(size);
        uint64_t step = (seg / SEGMENT_GAP + 1) * SEGMENT_GAP;
        if (seg > LIMIT || s->next_ptr > LIMIT - step || s->reserved > LIMIT - seg) return overflow();
        bi = new_block(s, s->next_ptr, seg, small);
        if (bi < 0) return -1;
        s->next_ptr += step;
        s->reserved += seg;
        s->segments++;
        if (s->reserved > s->peak_reserved) s->peak_reserved = s->reserved;
    }
    Block *blk = &s->b[bi];
    uint64_t rest = blk->size - size;
    if (small ? (rest >= MIN_BLOCK) : (rest > SMALL_SIZE)) {
        int64_t ti = new_block(s, blk->ptr + size, rest, small);
        if (ti < 0) return -1;
        blk = &s->b[bi]; /* new_block may move the array */
        Block *tail = &s->b[ti];
        int64_t nx = blk->next;
        tail->prev = bi;
        tail->next = nx;
        if (nx >= 0) s->b[nx].prev = ti;
        blk->next = ti;
        blk->size = size;
        if (pool_insert(pool, rest, tail->ptr, ti) < 0) return -1;
    }
    blk->free = 0;
    s->allocated += blk->size;
    if (s->allocated > s->peak_allocated) s->peak_allocated = s->allocated;
    return bi;
}

static int do_free(Alloc *s, int64_t bi) {
    Block *blk = &s->b[bi];
    blk->free = 1;
    uint64_t size = blk->size;
    s->allocated -= size;
    Pool *pool = &s->pools[blk->small];
    int64_t pv = blk->prev, nx = blk->next;
    if (pv >= 0 && s->b[pv].free) {
        Block *p = &s->b[pv];
        pool_remove_at(pool, lower(pool, p->size, p->ptr));
        size += p->size;
        blk->ptr = p->ptr;
        int64_t pp = blk->prev = p->prev;
        if (pp >= 0) s->b[pp].next = bi;
        if (drop_block(s, pv) < 0) return -1;
    }
    if (nx >= 0 && s->b[nx].free) {
        Block *n = &s->b[nx];
        pool_remove_at(pool, lower(pool, n->size, n->ptr));
        size += n->size;
        int64_t nn = blk->next = n->next;
        if (nn >= 0) s->b[nn].prev = bi;
        if (drop_block(s, nx) < 0) return -1;
    }
    blk->size = size;
    return pool_insert(pool, size, blk->ptr, bi);
}

/* a Python int size in (0, LIMIT]; 0 for 0; -1 with an exception set */
static int64_t as_size(PyObject *o) {
    int of = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &of);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (of || v < 0 || (unsigned long long)v > LIMIT) return overflow();
    return v;
}

/* the rounded size of a + b * x (a decode step's size), 0 for 0, -1 with an exception set */
static int64_t sym_size(long long a, long long b, long long x) {
    long long bx, v;
    if (__builtin_mul_overflow(b, x, &bx) || __builtin_add_overflow(a, bx, &v)) return overflow();
    if (v < 0 || (unsigned long long)v > LIMIT) return overflow();
    return (int64_t)((v + MIN_BLOCK - 1) / MIN_BLOCK * MIN_BLOCK);
}

static int64_t op_size(PyObject *z, long long x) {
    if (PyTuple_Check(z)) {
        if (PyTuple_GET_SIZE(z) != 2) { PyErr_SetString(PyExc_TypeError, "a size is an int or (a, b)"); return -1; }
        long long a = PyLong_AsLongLong(PyTuple_GET_ITEM(z, 0));
        if (a == -1 && PyErr_Occurred()) return -1;
        long long b = PyLong_AsLongLong(PyTuple_GET_ITEM(z, 1));
        if (b == -1 && PyErr_Occurred()) return -1;
        return sym_size(a, b, x);
    }
    return as_size(z);
}

static int64_t handle_of(PyObject *o) {
    if (o == Py_None) return -1;
    long long h = PyLong_AsLongLong(o);
    return (h == -1 && PyErr_Occurred()) ? -2 : h;
}

static PyObject *handle_obj(int64_t h) {
    if (h < 0) Py_RETURN_NONE;
    return PyLong_FromLongLong(h);
}

/* ---- methods ------------------------------------------------------------------------------------- */
static PyObject *A_malloc(Alloc *s, PyObject *arg) {
    int of = 0;
    long long n = PyLong_AsLongLongAndOverflow(arg, &of);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (of > 0) { overflow(); return NULL; }
    if (of < 0 || n <= 0) Py_RETURN_NONE;
    if ((unsigned long long)n > LIMIT) { overflow(); return NULL; }
    int64_t bi = do_malloc(s, ((uint64_t)n + MIN_BLOCK - 1) / MIN_BLOCK * MIN_BLOCK);
    if (bi < 0) return NULL;
    return PyLong_FromLongLong(bi);
}

static PyObject *A_free(Alloc *s, PyObject *arg) {
    int64_t h = handle_of(arg);
    if (h == -2) return NULL;
    if (h >= 0) {
        if (h >= s->nb) { PyErr_SetString(PyExc_ValueError, "no such block"); return NULL; }
        if (s->b[h].free) { PyErr_SetString(PyExc_ValueError, "block freed twice"); return NULL; }
        if (do_free(s, h) < 0) return NULL;
    }
    Py_RETURN_NONE;
}

/* run(ops, loc, start=0, x=0) -> index: CachingAllocator.run */
static PyObject *A_run(Alloc *s, PyObject *args) {
    PyObject *ops, *loc;
    Py_ssize_t start = 0;
    long long x = 0;
    if (!PyArg_ParseTuple(args, "O!O!|nL", &PyList_Type, &ops, &PyList_Type, &loc, &start, &x)) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(ops), nloc = PyList_GET_SIZE(loc), i = start;
    while (i < n) {
        PyObject *op = PyList_GET_ITEM(ops, i);
        if (!PyTuple_Check(op) || PyTuple_GET_SIZE(op) != 2) { PyErr_SetString(PyExc_TypeError, "an op is (slot, size)"); return NULL; }
        Py_ssize_t slot = PyLong_AsSsize_t(PyTuple_GET_ITEM(op, 0));
        if (slot == -1 && PyErr_Occurred()) return NULL;
        if (slot < 0) break;
        if (slot >= nloc) { PyErr_SetString(PyExc_IndexError, "slot out of range"); return NULL; }
        i++;
        int64_t size = op_size(PyTuple_GET_ITEM(op, 1), x);
        if (size < 0) return NULL;
        if (size) {
            int64_t bi = do_malloc(s, (uint64_t)size);
            if (bi < 0) return NULL;
            PyObject *h = PyLong_FromLongLong(bi);
            if (!h) return NULL;
            PyObject *old = PyList_GET_ITEM(loc, slot);
            PyList_SET_ITEM(loc, slot, h);
            Py_DECREF(old);
        } else {
            int64_t h = handle_of(PyList_GET_ITEM(loc, slot));
            if (h == -2) return NULL;
            if (h >= 0 && do_free(s, h) < 0) return NULL;
        }
    }
    return PyLong_FromSsize_t(i);
}

typedef struct {
    int64_t slot, kind, a, b; /* kind 0: free; 1: malloc a; 2: malloc round(a + b x); 3: slot = slot a */
} Op;

/* decode(ops, loc, keep, x, k) -> j: CachingAllocator.decode, k decode steps at x, x + 1, ...: each sets
   the slots not in ``keep`` to none, runs ``ops`` ((slot, size) malloc, (slot, (a, b)) malloc of
   a + b * x rounded, (slot, 0) free, (-3, (dst, src)) a move, src -1: none) and notes whether the peak
   allocated rose. Returns the last j whose step raised it, or -1. The ops are read once per call. */
static PyObject *A_decode(Alloc *s, PyObject *args) {
    PyObject *ops, *loc, *keep;
    long long x, k;
    if (!PyArg_ParseTuple(args, "O!O!O!LL", &PyList_Type, &ops, &PyList_Type, &loc, &PyList_Type, &keep, &x, &k))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(ops), nloc = PyList_GET_SIZE(loc);
    Op *prog = PyMem_Malloc((n + 1) * sizeof(Op));
    int64_t *slots = PyMem_Malloc((nloc + 1) * sizeof(int64_t));
    uint8_t *kept = PyMem_Calloc(nloc + 1, 1);
    PyObject *result = NULL;
    if (!prog || !slots || !kept) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keep); i++) {
        Py_ssize_t v = PyLong_AsSsize_t(PyList_GET_ITEM(keep, i));
        if (v == -1 && PyErr_Occurred()) goto done;
        if (v < 0 || v >= nloc) { PyErr_SetString(PyExc_IndexError, "slot out of range"); goto done; }
        kept[v] = 1;
    }
    for (Py_ssize_t i = 0; i < nloc; i++) {
        slots[i] = handle_of(PyList_GET_ITEM(loc, i));
        if (slots[i] == -2) goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *op = PyList_GET_ITEM(ops, i);
        if (!PyTuple_Check(op) || PyTuple_GET_SIZE(op) != 2) { PyErr_SetString(PyExc_TypeError, "an op is (slot, size)"); goto done; }
        Op *o = &prog[i];
        o->slot = PyLong_AsLongLong(PyTuple_GET_ITEM(op, 0));
        if (o->slot == -1 && PyErr_Occurred()) goto done;
        PyObject *z = PyTuple_GET_ITEM(op, 1);
        o->a = o->b = 0;
        if (PyTuple_Check(z)) {
            if (PyTuple_GET_SIZE(z) != 2) { PyErr_SetString(PyExc_TypeError, "a size is an int or (a, b)"); goto done; }
            o->a = PyLong_AsLongLong(PyTuple_GET_ITEM(z, 0));
            if (o->a == -1 && PyErr_Occurred()) goto done;
            o->b = PyLong_AsLongLong(PyTuple_GET_ITEM(z, 1));
            if (o->b == -1 && PyErr_Occurred()) goto done;
            o->kind = o->slot == -3 ? 3 : 2;
            if (o->kind == 3) {
                o->slot = o->a;
                o->a = o->b;
            }
        } else {
            int64_t v = as_size(z);
            if (v < 0) goto done;
            o->kind = v ? 1 : 0;
            o->a = v;
        }
        if (o->slot < 0 || o->slot >= nloc || (o->kind == 3 && (o->a < -1 || o->a >= nloc))) {
            PyErr_SetString(PyExc_IndexError, "slot out of range");
            goto done;
        }
    }
    long long last = -1;
    for (long long j = 0; j < k; j++, x++) {
        uint64_t before = s->peak_allocated;
        for (Py_ssize_t i = 0; i < nloc; i++)
            if (!kept[i]) slots[i] = -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            const Op *o = &prog[i];
            switch (o->kind) {
            case 0:
                if (slots[o->slot] >= 0 && do_free(s, slots[o->slot]) < 0) goto done;
                break;
            case 1:
                if ((slots[o->slot] = do_malloc(s, (uint64_t)o->a)) < 0) goto done;
                break;
            case 2: {
                int64_t size = sym_size(o->a, o->b, x);
                if (size < 0) goto done;
                if (size == 0) {
                    if (slots[o->slot] >= 0 && do_free(s, slots[o->slot]) < 0) goto done;
                } else if ((slots[o->slot] = do_malloc(s, (uint64_t)size)) < 0) goto done;
                break;
            }
            default:
                slots[o->slot] = o->a >= 0 ? slots[o->a] : -1;
            }
        }
        if (s->peak_allocated > before) last = j;
    }
    for (Py_ssize_t i = 0; i < nloc; i++) {
        PyObject *h = handle_obj(slots[i]);
        if (!h) goto done;
        PyObject *old = PyList_GET_ITEM(loc, i);
        PyList_SET_ITEM(loc, i, h);
        Py_DECREF(old);
    }
    result = PyLong_FromLongLong(last);
done:
    PyMem_Free(prog);
    PyMem_Free(slots);
    PyMem_Free(kept);
    return result;
}

static PyObject *key_obj(const Key *k) {
    /* size << 96 | ptr, the Python model's pool key */
    PyObject *size = PyLong_FromUnsignedLongLong(k->size), *ptr = PyLong_FromUnsignedLongLong(k->ptr);
    PyObject *shift = PyLong_FromLong(96), *out = NULL, *hi = NULL;
    if (size && ptr && shift && (hi = PyNumber_Lshift(size, shift))) out = PyNumber_Or(hi, ptr);
    Py_XDECREF(size); Py_XDECREF(ptr); Py_XDECREF(shift); Py_XDECREF(hi);
    return out;
}

static PyObject *pool_tuple(const Pool *p) {
    PyObject *t = PyTuple_New(p->n);
    if (!t) return NULL;
    for (Py_ssize_t i = 0; i < p->n; i++) {
        PyObject *k = key_obj(&p->a[i]);
        if (!k) { Py_DECREF(t); return NULL; }
        PyTuple_SET_ITEM(t, i, k);
    }
    return t;
}

static PyObject *A_pools(Alloc *s, PyObject *unused) {
    PyObject *large = pool_tuple(&s->pools[0]), *small = pool_tuple(&s->pools[1]);
    if (!large || !small) { Py_XDECREF(large); Py_XDECREF(small); return NULL; }
    return Py_BuildValue("(NN)", large, small);
}

/* state(blocks): CachingAllocator.state, the same tuple */
static PyObject *A_state(Alloc *s, PyObject *blocks) {
    PyObject *seq = PySequence_Fast(blocks, "blocks must be a sequence");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *live = PyTuple_New(n);
    if (!live) { Py_DECREF(seq); return NULL; }
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t h = handle_of(PySequence_Fast_GET_ITEM(seq, i));
        PyObject *v;
        if (h == -2) { Py_DECREF(seq); Py_DECREF(live); return NULL; }
        if (h < 0) { v = Py_None; Py_INCREF(v); }
        else v = Py_BuildValue("(KK)", (unsigned long long)s->b[h].ptr, (unsigned long long)s->b[h].size);
        if (!v) { Py_DECREF(seq); Py_DECREF(live); return NULL; }
        PyTuple_SET_ITEM(live, i, v);
    }
    Py_DECREF(seq);
    PyObject *large = pool_tuple(&s->pools[0]), *small = pool_tuple(&s->pools[1]);
    if (!large || !small) { Py_XDECREF(large); Py_XDECREF(small); Py_DECREF(live); return NULL; }
    return Py_BuildValue("(KKNNN)", (unsigned long long)s->allocated, (unsigned long long)s->reserved,
                         large, small, live);
}

/* block(h) -> (ptr, size, free, small, prev, next), prev/next handles or None */
static PyObject *A_block(Alloc *s, PyObject *arg) {
    int64_t h = handle_of(arg);
    if (h == -2) return NULL;
    if (h < 0 || h >= s->nb) { PyErr_SetString(PyExc_ValueError, "no such block"); return NULL; }
    Block *b = &s->b[h];
    return Py_BuildValue("(KKOONN)", (unsigned long long)b->ptr, (unsigned long long)b->size,
                         b->free ? Py_True : Py_False, b->small ? Py_True : Py_False,
                         handle_obj(b->prev), handle_obj(b->next));
}

static PyObject *A_reset_peak(Alloc *s, PyObject *unused) {
    s->peak_allocated = s->allocated;
    s->peak_reserved = s->reserved;
    Py_RETURN_NONE;
}

/* a Python int in [0, LIMIT] into *out; 0, or -1 with an exception set (OverflowError past LIMIT) */
static int as_u62(PyObject *o, uint64_t *out) {
    int of = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &of);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (of || v < 0 || (unsigned long long)v > LIMIT) return overflow();
    *out = (uint64_t)v;
    return 0;
}

/* restore(snapshot): CachingAllocator.restore of a CachingAllocator.snapshot() */
static PyObject *A_restore(PyTypeObject *type, PyObject *snap) {
    PyObject *o_alloc, *o_res, *o_seg, *o_next, *tails;
    uint64_t allocated, reserved, segments, next_ptr;
    if (!PyArg_ParseTuple(snap, "OOOOO", &o_alloc, &o_res, &o_seg, &o_next, &tails)) return NULL;
    if (as_u62(o_alloc, &allocated) || as_u62(o_res, &reserved) || as_u62(o_seg, &segments) ||
        as_u62(o_next, &next_ptr))
        return NULL;
    Alloc *s = (Alloc *)type->tp_alloc(type, 0);
    if (!s) return NULL;
    s->allocated = allocated; s->reserved = reserved; s->segments = (int64_t)segments; s->next_ptr = next_ptr;
    PyObject *seq = PySequence_Fast(tails, "tails must be a sequence");
    if (!seq) goto fail;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        int small, held;
        PyObject *o_ptr, *o_size;
        uint64_t ptr, size;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "pOOp", &small, &o_ptr, &o_size, &held) ||
            as_u62(o_ptr, &ptr) || as_u62(o_size, &size)) {
            Py_DECREF(seq);
            goto fail;
        }
        int64_t bi = new_block(s, ptr, size, small);
        if (bi < 0) { Py_DECREF(seq); goto fail; }
        if (held) { /* an allocated neighbour that is never freed: it only stops merges */
            int64_t wi = new_block(s, ptr - MIN_BLOCK, MIN_BLOCK, small);
            if (wi < 0) { Py_DECREF(seq); goto fail; }
            s->b[wi].free = 0;
            s->b[bi].prev = wi;
            s->b[wi].next = bi;
        }
        if (pool_insert(&s->pools[small], size, ptr, bi) < 0) { Py_DECREF(seq); goto fail; }
    }
    Py_DECREF(seq);
    s->peak_allocated = s->allocated;
    s->peak_reserved = s->reserved;
    return (PyObject *)s;
fail:
    Py_DECREF(s);
    return NULL;
}

static void A_dealloc(Alloc *s) {
    PyMem_Free(s->b);
    PyMem_Free(s->spare);
    PyMem_Free(s->pools[0].a);
    PyMem_Free(s->pools[1].a);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

#define GETTER(name, expr)                                                  \
    static PyObject *get_##name(Alloc *s, void *c) { return expr; }
GETTER(allocated, PyLong_FromUnsignedLongLong(s->allocated))
GETTER(reserved, PyLong_FromUnsignedLongLong(s->reserved))
GETTER(peak_allocated, PyLong_FromUnsignedLongLong(s->peak_allocated))
GETTER(peak_reserved, PyLong_FromUnsignedLongLong(s->peak_reserved))
GETTER(next_ptr, PyLong_FromUnsignedLongLong(s->next_ptr))
GETTER(segments, PyLong_FromLongLong(s->segments))

static PyGetSetDef A_getset[] = {
    {"allocated", (getter)get_allocated, NULL, NULL, NULL},
    {"reserved", (getter)get_reserved, NULL, NULL, NULL},
    {"peak_allocated", (getter)get_peak_allocated, NULL, NULL, NULL},
    {"peak_reserved", (getter)get_peak_reserved, NULL, NULL, NULL},
    {"segments", (getter)get_segments, NULL, NULL, NULL},
    {"_next_ptr", (getter)get_next_ptr, NULL, NULL, NULL},
    {NULL},
};

static PyMethodDef A_methods[] = {
    {"malloc", (PyCFunction)A_malloc, METH_O, "malloc(nbytes) -> block handle or None"},
    {"free", (PyCFunction)A_free, METH_O, "free(handle or None)"},
    {"run", (PyCFunction)A_run, METH_VARARGS, "run(ops, loc, start=0, x=0) -> index (CachingAllocator.run)"},
    {"decode", (PyCFunction)A_decode, METH_VARARGS, "decode(ops, loc, keep, x, k) -> last step that raised the peak, or -1"},
    {"state", (PyCFunction)A_state, METH_O, "state(blocks) -> CachingAllocator.state"},
    {"pools", (PyCFunction)A_pools, METH_NOARGS, "(large pool keys, small pool keys), size << 96 | address"},
    {"block", (PyCFunction)A_block, METH_O, "block(handle) -> (ptr, size, free, small, prev, next)"},
    {"reset_peak", (PyCFunction)A_reset_peak, METH_NOARGS, "peaks restart from the current values"},
    {"restore", (PyCFunction)A_restore, METH_O | METH_CLASS, "restore(CachingAllocator.snapshot()) -> Allocator"},
    {NULL},
};

static PyObject *A_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    if ((kw && PyDict_GET_SIZE(kw)) || PyTuple_GET_SIZE(args)) {
        PyErr_SetString(PyExc_TypeError, "Allocator() takes no arguments");
        return NULL;
    }
    Alloc *s = (Alloc *)type->tp_alloc(type, 0);
    if (s) s->next_ptr = SEGMENT_GAP;
    return (PyObject *)s;
}

static PyTypeObject AllocType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "estimator._replay.Allocator",
    .tp_basicsize = sizeof(Alloc),
    .tp_dealloc = (destructor)A_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "estimator.allocator.CachingAllocator in C; blocks are integer handles",
    .tp_methods = A_methods,
    .tp_getset = A_getset,
    .tp_new = A_new,
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_replay", "The allocator model in C.", -1, NULL};

PyMODINIT_FUNC PyInit__replay(void) {
    if (PyType_Ready(&AllocType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&AllocType);
    if (PyModule_AddObject(m, "Allocator", (PyObject *)&AllocType) < 0) { Py_DECREF(&AllocType); Py_DECREF(m); return NULL; }
    PyModule_AddIntConstant(m, "LIMIT_BITS", 62);
    return m;
}
