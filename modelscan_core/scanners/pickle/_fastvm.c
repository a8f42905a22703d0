/*
 * The data-only opcodes of the pickle VM in C: an optional accelerator for vm.py.
 *
 * vm.py is the reference implementation and handles every opcode. This module runs only the
 * happy path of the opcodes that build plain data (ints, short strings, lists, dicts,
 * tuples, memo puts and gets), on the same Python objects vm.py uses (its stack, mark list
 * and memo list). Whenever anything is unusual (an operand past the buffer, an underflow,
 * a target of an unexpected type, any other opcode) it returns *before touching that
 * opcode*, and vm.py executes it, raising the precise error where there is one. So error
 * semantics live in one place, and the two implementations are tested against each other.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static double
unpack_double_be(const unsigned char *p)
{
    unsigned char b[8];
    double d;
#if PY_LITTLE_ENDIAN
    for (int i = 0; i < 8; i++) b[i] = p[7 - i];
#else
    memcpy(b, p, 8);
#endif
    memcpy(&d, b, 8);
    return d;
}

static int
push(PyObject *stack, PyObject *value)
{
    if (value == NULL) return -1;
    int rc = PyList_Append(stack, value);
    Py_DECREF(value);
    return rc;
}

static Py_ssize_t
last_mark(PyObject *marks)
{
    Py_ssize_t n = PyList_GET_SIZE(marks);
    return n ? PyLong_AsSsize_t(PyList_GET_ITEM(marks, n - 1)) : -1;
}

static int
pop_mark(PyObject *marks, Py_ssize_t *fence)
{
    Py_ssize_t n = PyList_GET_SIZE(marks);
    if (PyList_SetSlice(marks, n - 1, n, NULL) < 0) return -1;
    *fence = n > 1 ? PyLong_AsSsize_t(PyList_GET_ITEM(marks, n - 2)) : 0;
    return 0;
}

/* What vm.py's memo_put keeps once the memo budget is spent: names (ASCII identifiers, dotted,
 * up to 256 characters), ints, and the types in `keep`; anything else becomes `evicted`. */
static PyObject *
memo_value(PyObject *value, Py_ssize_t memo_left, PyObject *keep, PyObject *evicted)
{
    if (memo_left > 0) return value;
    if (PyUnicode_CheckExact(value)) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(value);
        if (n < 1 || n > 256) return evicted;
        int kind = PyUnicode_KIND(value);
        const void *data = PyUnicode_DATA(value);
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_UCS4 c = PyUnicode_READ(kind, data, i);
            int ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_' ||
                     (i > 0 && ((c >= '0' && c <= '9') || c == '.'));
            if (!ok) return evicted;
        }
        return value;
    }
    if (PyLong_CheckExact(value)) return value;
    Py_ssize_t k = PyTuple_GET_SIZE(keep);
    for (Py_ssize_t i = 0; i < k; i++)
        if ((PyObject *)Py_TYPE(value) == PyTuple_GET_ITEM(keep, i)) return value;
    return evicted;
}

/* A key CPython may refuse to hash (a list, a dict, a tuple that could hold one): vm.py
 * decides, raising the unpickler's TypeError where it would. */
static int
hash_in_doubt(PyObject *key, PyObject *pdict)
{
    return PyList_CheckExact(key) || (PyObject *)Py_TYPE(key) == pdict || PyTuple_CheckExact(key);
}

/* A key BUILD can plant as something the loader calls later (vm.py's _LATE_CALLED). */
static int
late_key(PyObject *key)
{
    if (!PyUnicode_CheckExact(key)) return 0;
    return PyUnicode_CompareWithASCIIString(key, "__setstate__") == 0 ||
           PyUnicode_CompareWithASCIIString(key, "append") == 0 ||
           PyUnicode_CompareWithASCIIString(key, "extend") == 0 ||
           PyUnicode_CompareWithASCIIString(key, "add") == 0 ||
           PyUnicode_CompareWithASCIIString(key, "keys") == 0 ||
           PyUnicode_CompareWithASCIIString(key, "default_factory") == 0 ||
           PyUnicode_CompareWithASCIIString(key, "__class__") == 0 ||
           PyUnicode_CompareWithASCIIString(key, "__dict__") == 0;
}

/* A key of plain data (vm.py's _PLAIN_KEYS): past the cap a pair keyed by anything else (a key
 * computed at load time, which may spell a late-called name) is kept by vm.py, not dropped. */
static int
plain_key(PyObject *key)
{
    return PyUnicode_CheckExact(key) || PyLong_CheckExact(key) || PyFloat_CheckExact(key) || PyBool_Check(key) ||
           PyBytes_CheckExact(key) || key == Py_None;
}

/* True when some of the pairs stack[k:len] would pass the cap with a key that is not plain, or
 * with a value the load made or imported (vm.py's _STORED_TYPES: kept under any string key). */
static int
needs_reference(PyObject *stack, PyObject *target, Py_ssize_t k, Py_ssize_t len, Py_ssize_t cap, PyObject *pdict)
{
    if (PyList_GET_SIZE(target) + (len - k) / 2 <= cap) return 0;
    for (Py_ssize_t i = k; i < len; i += 2) {
        PyObject *value = PyList_GET_ITEM(stack, i + 1);
        if (!plain_key(PyList_GET_ITEM(stack, i))) return 1;
        if (!plain_key(value) && !PyList_CheckExact(value) && !PyTuple_CheckExact(value) &&
            (PyObject *)Py_TYPE(value) != pdict)
            return 1;
    }
    return 0;
}

/* vm.py's _set_items for one pair: the first `cap` pairs, then only late-called keys, the
 * last value of each. */
static int
keep_pair(PyObject *target, PyObject *key, PyObject *value, Py_ssize_t cap)
{
    Py_ssize_t n = PyList_GET_SIZE(target);
    if (n >= cap) {
        if (!late_key(key)) return 0;
        for (Py_ssize_t j = cap; j < n; j++) {
            PyObject *old = PyTuple_GET_ITEM(PyList_GET_ITEM(target, j), 0);
            if (PyUnicode_CheckExact(old) && PyUnicode_Compare(old, key) == 0) {
                PyObject *pair = PyTuple_Pack(2, key, value);
                if (pair == NULL) return -1;
                return PyList_SetItem(target, j, pair);
            }
        }
    }
    PyObject *pair = PyTuple_Pack(2, key, value);
    if (pair == NULL) return -1;
    return push(target, pair);
}

/* Sizes as a walk over a value meets them (repr, deepcopy, the hash of a key): a container
 * weighs 1 + its items' weights, a shared one counted each time it is met; depth is the
 * nesting. vm.py keeps the size of every container of weight HEAVY_WEIGHT or depth
 * HEAVY_DEPTH and more in `heavy` (id -> [value, weight, depth]); the others are tiny and are
 * weighed by walking them. Anything past the limits goes back to vm.py, which reports it.
 *
 * Most containers are tiny, and asking `heavy` about each (an int made of its address, a dict
 * lookup) cost more than the rest of the opcode. `bits` is a bitmap of addresses that both
 * sides set for every container they put in `heavy` (bit (id >> 4) % HEAVY_BITS, as vm.py's
 * `sized`): a clear bit means "not in the table" without asking it. A set bit may be another
 * container's; the table then says.
 *
 * `leaves` remembers, for one run, containers C made or grew whose items are all scalars and
 * that are not in `heavy`, with the weight a walk gives them (1 + the items they keep). The
 * APPENDS of a list of a thousand small lists then weighs each without reading it and its
 * items again. An entry holds a reference, so its address is never another object's; every
 * change C makes to a container updates or drops its entry, and vm.py changes nothing while a
 * run lasts (the table is emptied when the run ends). */
#define HEAVY_WEIGHT 16
#define HEAVY_DEPTH 4
#define HEAVY_BITS (1 << 16)
#define LEAF_SLOTS 2048

typedef struct {
    PyObject *v;  /* a reference, or NULL */
    long long w;  /* the weight a walk gives it; its depth is 1 */
} Leaf;

typedef struct {
    PyObject *table;     /* vm.py's `heavy` dict, or NULL when sizes are no longer counted */
    unsigned char *bits; /* HEAVY_BITS bits, or NULL: ask the table every time */
    Leaf *leaves;        /* LEAF_SLOTS slots, or NULL: no leaves are remembered */
} Heavy;

/* One table for the module: a run holds the GIL from start to end, except where it calls
 * vm.py's PDict (Python code may switch threads there); a run that finds it in use goes
 * without. */
static Leaf leaf_table[LEAF_SLOTS];
static int leaf_table_busy;

static inline Leaf *
leaf_slot(const Heavy *h, PyObject *v)
{
    return &h->leaves[((uintptr_t)v >> 4) & (LEAF_SLOTS - 1)];
}

/* The weight of a remembered leaf, or 0. */
static inline long long
leaf_weight(const Heavy *h, PyObject *v)
{
    if (h->leaves == NULL) return 0;
    Leaf *e = leaf_slot(h, v);
    return e->v == v ? e->w : 0;
}

static inline void
leaf_set(const Heavy *h, PyObject *v, long long w)
{
    if (h->leaves == NULL) return;
    Leaf *e = leaf_slot(h, v);
    if (e->v != v) {
        PyObject *old = e->v;
        Py_INCREF(v);
        e->v = v;
        Py_XDECREF(old); /* a list or tuple of scalars: freeing it runs no code of ours */
    }
    e->w = w;
}

static inline void
leaf_drop(const Heavy *h, PyObject *v)
{
    if (h->leaves == NULL) return;
    Leaf *e = leaf_slot(h, v);
    if (e->v == v) {
        e->v = NULL;
        Py_DECREF(v); /* the caller holds another reference */
    }
}

static void
leaves_release(Heavy *h)
{
    if (h->leaves == NULL) return;
    for (Py_ssize_t i = 0; i < LEAF_SLOTS; i++) {
        PyObject *v = h->leaves[i].v;
        if (v != NULL) {
            h->leaves[i].v = NULL;
            Py_DECREF(v);
        }
    }
    h->leaves = NULL;
    leaf_table_busy = 0;
}

static inline size_t
heavy_bit(PyObject *v)
{
    return ((size_t)(uintptr_t)v >> 4) & (HEAVY_BITS - 1);
}

static inline int
maybe_heavy(const Heavy *h, PyObject *v)
{
    if (h->bits == NULL) return 1;
    size_t b = heavy_bit(v);
    return (h->bits[b >> 3] >> (b & 7)) & 1;
}

/* A value a walk goes into (a tuple, a list, or vm.py's PDict and PSet, which are lists);
 * anything else weighs 1 and has depth 0. */
static inline int
container(PyObject *v)
{
    return PyTuple_CheckExact(v) || PyList_Check(v);
}

/* The items of a tuple or a list (or a list subclass), and how many. */
static inline PyObject **
items_of(PyObject *v, Py_ssize_t *n)
{
    *n = Py_SIZE(v);
    return PyTuple_CheckExact(v) ? ((PyTupleObject *)v)->ob_item : ((PyListObject *)v)->ob_item;
}

/* No item is a container: a tiny container of these weighs 1 + n at depth 1, which a walk
 * finds too, without a call per container (most containers are such leaves). */
static inline int
all_scalars(PyObject **items, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (container(items[i])) return 0;
    return 1;
}

static int
weigh_at(PyObject *v, const Heavy *heavy, long long *w, long long *d, int *budget)
{
    if (maybe_heavy(heavy, v)) {
        PyObject *key = PyLong_FromVoidPtr(v);
        if (key == NULL) return -1;
        PyObject *e = PyDict_GetItemWithError(heavy->table, key);
        Py_DECREF(key);
        if (e != NULL && PyList_GET_ITEM(e, 0) == v) {
            *w = PyLong_AsLongLong(PyList_GET_ITEM(e, 1));
            *d = PyLong_AsLongLong(PyList_GET_ITEM(e, 2));
            return PyErr_Occurred() ? -1 : 0;
        }
        if (e == NULL && PyErr_Occurred()) return -1;
    }
    /* tiny: walk it (a few nodes; the budget only guards against stale sizes) */
    Py_ssize_t n;
    PyObject **items = items_of(v, &n);
    *w = 1;
    *d = 1;
    if (--*budget <= 0) {
        *w += n;
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long iw, id;
        PyObject *item = items[i];
        long long lw = leaf_weight(heavy, item);
        if (lw) {
            --*budget;
            *w += lw;
            if (*d < 2) *d = 2;
            continue;
        }
        if (!container(item)) {
            *w += 1;
            continue;
        }
        Py_ssize_t m;
        PyObject **leaf = items_of(item, &m);
        if (!maybe_heavy(heavy, item) && all_scalars(leaf, m)) {
            /* what weigh_at(item) gives, budget spent or not */
            --*budget;
            *w += 1 + m;
            if (*d < 2) *d = 2;
            continue;
        }
        if (weigh_at(item, heavy, &iw, &id, budget) < 0) return -1;
        *w += iw;
        if (id + 1 > *d) *d = id + 1;
    }
    return 0;
}

#define WALK_BUDGET 64

static inline int
weigh(PyObject *v, const Heavy *heavy, long long *w, long long *d)
{
    long long lw = leaf_weight(heavy, v);
    if (lw) {
        *w = lw;
        *d = 1;
        return 0;
    }
    if (!container(v)) {
        *w = 1;
        *d = 0;
        return 0;
    }
    if (!maybe_heavy(heavy, v)) {
        Py_ssize_t n;
        PyObject **items = items_of(v, &n);
        if (all_scalars(items, n)) {
            *w = 1 + n;
            *d = 1;
            return 0;
        }
    }
    int budget = WALK_BUDGET;
    return weigh_at(v, heavy, w, d, &budget);
}

/* The weight of items[i:i+n] and the deepest of them. */
static int
weigh_items(PyObject *stack, Py_ssize_t i, Py_ssize_t n, const Heavy *heavy, long long *w, long long *d)
{
    *w = 0;
    *d = 0;
    for (Py_ssize_t j = i; j < i + n; j++) {
        long long iw, id;
        PyObject *item = PyList_GET_ITEM(stack, j);
        long long lw = leaf_weight(heavy, item);
        if (lw) {
            *w += lw;
            if (*d < 1) *d = 1;
            continue;
        }
        if (!container(item)) {
            *w += 1;
            continue;
        }
        if (weigh(item, heavy, &iw, &id) < 0) return -1;
        *w += iw;
        if (id > *d) *d = id;
    }
    return 0;
}

static int remember(const Heavy *heavy, PyObject *v, long long w, long long d);

/* `target` takes stack[i:i+n] (APPEND(S), SETITEM(S)): its new size. 0 when counted (or not
 * counting), 1 when it goes past a limit (vm.py handles the opcode and reports it), -1 on error.
 * `*leaf` says whether it is a leaf afterwards (see `leaves`): its items scalars, not in `heavy`. */
static int
grow(const Heavy *heavy, PyObject *target, PyObject *stack, Py_ssize_t i, Py_ssize_t n, long long max_weight,
     long long max_depth, int *leaf)
{
    long long tw, td, w, d;
    *leaf = 0;
    if (heavy->table == NULL) return 0;
    if (weigh(target, heavy, &tw, &td) < 0 || weigh_items(stack, i, n, heavy, &w, &d) < 0) return -1;
    w += tw;
    d = d + 1 > td ? d + 1 : td;
    if (w > max_weight || d > max_depth) return 1;
    *leaf = d == 1 && w < HEAVY_WEIGHT;
    return remember(heavy, target, w, d) < 0 ? -1 : 0;
}

/* After a list took items: remember it as a leaf, with what a walk finds in it, or forget it. */
static inline void
leaf_after_grow(const Heavy *heavy, PyObject *target, int leaf)
{
    if (leaf)
        leaf_set(heavy, target, 1 + PyList_GET_SIZE(target));
    else
        leaf_drop(heavy, target);
}

static int
remember(const Heavy *heavy, PyObject *v, long long w, long long d)
{
    if (w < HEAVY_WEIGHT && d < HEAVY_DEPTH) return 0;
    if (heavy->bits != NULL) {
        size_t b = heavy_bit(v);
        heavy->bits[b >> 3] |= (unsigned char)(1u << (b & 7));
    }
    PyObject *key = PyLong_FromVoidPtr(v);
    if (key == NULL) return -1;
    PyObject *entry = Py_BuildValue("[OLL]", v, w, d);
    int rc = entry == NULL ? -1 : PyDict_SetItem(heavy->table, key, entry);
    Py_DECREF(key);
    Py_XDECREF(entry);
    return rc;
}

/* run(buf, pos, limit, stack, marks, mseq, memo_left, fence, sparse_empty, pdict, cap, keep, evicted[, stop,
 *     heavy, max_weight, max_depth, heavy_bits])
 *   -> (pos, fence, memo_left, ops)
 * Opcodes start before `limit`; no operand is read at or past `stop` (a frame end, where the
 * readers disagree: vm.py handles what comes near it). FRAME itself is left to vm.py. */
static PyObject *
fast_run(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos, limit, memo_left, fence, cap;
    PyObject *stack, *marks, *mseq, *pdict, *keep, *evicted;
    int sparse_empty;
    Py_ssize_t stop = PY_SSIZE_T_MAX;
    PyObject *table = NULL, *bits = NULL;
    long long max_weight = 1LL << 32, max_depth = 10000;
    if (!PyArg_ParseTuple(args, "y*nnO!O!O!nnpOnO!O|nOLLO", &view, &pos, &limit, &PyList_Type, &stack, &PyList_Type,
                          &marks, &PyList_Type, &mseq, &memo_left, &fence, &sparse_empty, &pdict, &cap, &PyTuple_Type,
                          &keep, &evicted, &stop, &table, &max_weight, &max_depth, &bits))
        return NULL;
    /* no table (None): sizes are no longer counted (vm.py has reported a bomb already) */
    Heavy heavy_ = {table != NULL && PyDict_Check(table) ? table : NULL, NULL, NULL};
    if (bits != NULL && PyByteArray_CheckExact(bits) && PyByteArray_GET_SIZE(bits) == HEAVY_BITS / 8)
        heavy_.bits = (unsigned char *)PyByteArray_AS_STRING(bits);
    if (heavy_.table != NULL && !leaf_table_busy) {
        leaf_table_busy = 1;
        heavy_.leaves = leaf_table;
    }
    const Heavy *heavy = &heavy_;
    int leaf;
    long long w, d;
    const unsigned char *buf = view.buf;
    Py_ssize_t end = view.len < stop ? view.len : stop;
    Py_ssize_t ops = 0;
    if (limit > end) limit = end;

    while (pos < limit) {
        unsigned char op = buf[pos];
        Py_ssize_t p = pos + 1;
        Py_ssize_t len = PyList_GET_SIZE(stack);
        switch (op) {
        case 0x94: /* MEMOIZE */
            if (len <= fence || !sparse_empty) goto done;
            if (PyList_Append(mseq, memo_value(PyList_GET_ITEM(stack, len - 1), memo_left, keep, evicted)) < 0)
                goto error;
            if (memo_left > 0) memo_left--;
            break;
        case 0x8C: { /* SHORT_BINUNICODE */
            if (p >= end) goto done;
            Py_ssize_t n = buf[p];
            if (p + 1 + n > end) goto done;
            PyObject *s = PyUnicode_DecodeUTF8((const char *)buf + p + 1, n, "surrogatepass");
            if (s == NULL) { PyErr_Clear(); goto done; }
            if (push(stack, s) < 0) goto error;
            p += 1 + n;
            break;
        }
        case 0x4B: /* BININT1 */
            if (p + 1 > end) goto done;
            if (push(stack, PyLong_FromLong(buf[p])) < 0) goto error;
            p += 1;
            break;
        case 0x4D: /* BININT2 */
            if (p + 2 > end) goto done;
            if (push(stack, PyLong_FromLong(buf[p] | (buf[p + 1] << 8))) < 0) goto error;
            p += 2;
            break;
        case 0x4A: { /* BININT */
            if (p + 4 > end) goto done;
            int32_t v = (int32_t)((uint32_t)buf[p] | ((uint32_t)buf[p + 1] << 8) | ((uint32_t)buf[p + 2] << 16) |
                                  ((uint32_t)buf[p + 3] << 24));
            if (push(stack, PyLong_FromLong(v)) < 0) goto error;
            p += 4;
            break;
        }
        case 0x5D: { /* EMPTY_LIST */
            PyObject *list = PyList_New(0);
            if (list != NULL) leaf_set(heavy, list, 1);
            if (push(stack, list) < 0) goto error;
            break;
        }
        case 0x7D: /* EMPTY_DICT */
            if (push(stack, PyObject_CallNoArgs(pdict)) < 0) goto error;
            break;
        case 0x29: /* EMPTY_TUPLE */
            if (push(stack, PyTuple_New(0)) < 0) goto error;
            break;
        case 0x4E: /* NONE */
            Py_INCREF(Py_None);
            if (push(stack, Py_None) < 0) goto error;
            break;
        case 0x88: /* NEWTRUE */
        case 0x89: /* NEWFALSE */
            if (push(stack, PyBool_FromLong(op == 0x88)) < 0) goto error;
            break;
        case 0x47: /* BINFLOAT */
            if (p + 8 > end) goto done;
            if (push(stack, PyFloat_FromDouble(unpack_double_be(buf + p))) < 0) goto error;
            p += 8;
            break;
        case 0x28: /* MARK */
            fence = len;
            if (push(marks, PyLong_FromSsize_t(len)) < 0) goto error;
            break;
        case 0x65: { /* APPENDS */
            Py_ssize_t k = last_mark(marks);
            if (k <= 0 || k > len) goto done;
            if (k < len) {
                PyObject *target = PyList_GET_ITEM(stack, k - 1);
                if (!PyList_CheckExact(target)) goto done;
                switch (grow(heavy, target, stack, k, len - k, max_weight, max_depth, &leaf)) {
                case -1: goto error;
                case 1: goto done;
                }
                Py_ssize_t room = cap - PyList_GET_SIZE(target);
                if (room > len - k) room = len - k;
                for (Py_ssize_t i = 0; i < room; i++)
                    if (PyList_Append(target, PyList_GET_ITEM(stack, k + i)) < 0) goto error;
                leaf_after_grow(heavy, target, leaf);
                if (PyList_SetSlice(stack, k, len, NULL) < 0) goto error;
            }
            if (pop_mark(marks, &fence) < 0) goto error;
            break;
        }
        case 0x75: { /* SETITEMS */
            Py_ssize_t k = last_mark(marks);
            if (k <= 0 || k > len || (len - k) % 2) goto done;
            if (k < len) {
                PyObject *target = PyList_GET_ITEM(stack, k - 1);
                if ((PyObject *)Py_TYPE(target) != pdict || needs_reference(stack, target, k, len, cap, pdict)) goto done;
                for (Py_ssize_t i = k; i < len; i += 2)
                    if (hash_in_doubt(PyList_GET_ITEM(stack, i), pdict)) goto done;
                switch (grow(heavy, target, stack, k, len - k, max_weight, max_depth, &leaf)) {
                case -1: goto error;
                case 1: goto done;
                }
                for (Py_ssize_t i = k; i < len; i += 2) {
                    if (keep_pair(target, PyList_GET_ITEM(stack, i), PyList_GET_ITEM(stack, i + 1), cap) < 0)
                        goto error;
                }
                if (PyList_SetSlice(stack, k, len, NULL) < 0) goto error;
            }
            if (pop_mark(marks, &fence) < 0) goto error;
            break;
        }
        case 0x73: { /* SETITEM */
            Py_ssize_t k = len - 2;
            if (k <= 0) goto done;
            PyObject *target = PyList_GET_ITEM(stack, k - 1);
            if ((PyObject *)Py_TYPE(target) != pdict || hash_in_doubt(PyList_GET_ITEM(stack, k), pdict) ||
                needs_reference(stack, target, k, len, cap, pdict))
                goto done;
            switch (grow(heavy, target, stack, k, 2, max_weight, max_depth, &leaf)) {
            case -1: goto error;
            case 1: goto done;
            }
            if (keep_pair(target, PyList_GET_ITEM(stack, k), PyList_GET_ITEM(stack, k + 1), cap) < 0) goto error;
            if (PyList_SetSlice(stack, k, len, NULL) < 0) goto error;
            break;
        }
        case 0x61: { /* APPEND */
            if (len < 2) goto done;
            PyObject *target = PyList_GET_ITEM(stack, len - 2);
            if (!PyList_CheckExact(target)) goto done;
            switch (grow(heavy, target, stack, len - 1, 1, max_weight, max_depth, &leaf)) {
            case -1: goto error;
            case 1: goto done;
            }
            if (PyList_GET_SIZE(target) < cap && PyList_Append(target, PyList_GET_ITEM(stack, len - 1)) < 0) goto error;
            leaf_after_grow(heavy, target, leaf);
            if (PyList_SetSlice(stack, len - 1, len, NULL) < 0) goto error;
            break;
        }
        case 0x85: /* TUPLE1 */
        case 0x86: /* TUPLE2 */
        case 0x87: { /* TUPLE3 */
            Py_ssize_t n = op - 0x84;
            if (len - fence < n) goto done;
            w = d = 0;
            if (heavy->table != NULL && weigh_items(stack, len - n, n, heavy, &w, &d) < 0) goto error;
            if (w + 1 > max_weight || d + 1 > max_depth) goto done;
            PyObject *t = PyList_GetSlice(stack, len - n, len);
            if (t == NULL) goto error;
            PyObject *tuple = PyList_AsTuple(t);
            Py_DECREF(t);
            if (tuple == NULL || (heavy->table != NULL && remember(heavy, tuple, w + 1, d + 1) < 0)) {
                Py_XDECREF(tuple);
                goto error;
            }
            if (heavy->table != NULL && d == 0 && w + 1 < HEAVY_WEIGHT) leaf_set(heavy, tuple, w + 1);
            if (PyList_SetSlice(stack, len - n, len, NULL) < 0 || push(stack, tuple) < 0) goto error;
            break;
        }
        case 0x74: { /* TUPLE */
            Py_ssize_t k = last_mark(marks);
            if (k < 0 || k > len) goto done;
            w = d = 0;
            if (heavy->table != NULL && weigh_items(stack, k, len - k, heavy, &w, &d) < 0) goto error;
            if (w + 1 > max_weight || d + 1 > max_depth) goto done;
            PyObject *t = PyList_GetSlice(stack, k, len);
            if (t == NULL) goto error;
            PyObject *tuple = PyList_AsTuple(t);
            Py_DECREF(t);
            if (tuple == NULL || (heavy->table != NULL && remember(heavy, tuple, w + 1, d + 1) < 0)) {
                Py_XDECREF(tuple);
                goto error;
            }
            if (heavy->table != NULL && d == 0 && w + 1 < HEAVY_WEIGHT) leaf_set(heavy, tuple, w + 1);
            if (PyList_SetSlice(stack, k, len, NULL) < 0 || push(stack, tuple) < 0) goto error;
            if (pop_mark(marks, &fence) < 0) goto error;
            break;
        }
        case 0x71: /* BINPUT */
        case 0x72: { /* LONG_BINPUT */
            Py_ssize_t w = op == 0x71 ? 1 : 4;
            if (p + w > end || len <= fence || !sparse_empty) goto done;
            Py_ssize_t idx = op == 0x71 ? buf[p]
                : (Py_ssize_t)((uint32_t)buf[p] | ((uint32_t)buf[p + 1] << 8) | ((uint32_t)buf[p + 2] << 16) |
                               ((uint32_t)buf[p + 3] << 24));
            Py_ssize_t mlen = PyList_GET_SIZE(mseq);
            PyObject *top = memo_value(PyList_GET_ITEM(stack, len - 1), memo_left, keep, evicted);
            if (idx == mlen) {
                if (PyList_Append(mseq, top) < 0) goto error;
            } else if (idx < mlen) {
                Py_INCREF(top);
                if (PyList_SetItem(mseq, idx, top) < 0) goto error;
            } else {
                goto done;
            }
            if (memo_left > 0) memo_left--;
            p += w;
            break;
        }
        case 0x68: /* BINGET */
        case 0x6A: { /* LONG_BINGET */
            Py_ssize_t w = op == 0x68 ? 1 : 4;
            if (p + w > end) goto done;
            Py_ssize_t idx = op == 0x68 ? buf[p]
                : (Py_ssize_t)((uint32_t)buf[p] | ((uint32_t)buf[p + 1] << 8) | ((uint32_t)buf[p + 2] << 16) |
                               ((uint32_t)buf[p + 3] << 24));
            if (idx >= PyList_GET_SIZE(mseq)) goto done;
            PyObject *value = PyList_GET_ITEM(mseq, idx);
            Py_INCREF(value);
            if (push(stack, value) < 0) goto error;
            p += w;
            break;
        }
        default:
            goto done;
        }
        pos = p;
        ops++;
    }
done:
    leaves_release(&heavy_);
    PyBuffer_Release(&view);
    return Py_BuildValue("nnnn", pos, fence, memo_left, ops);
error:
    leaves_release(&heavy_);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"run", fast_run, METH_VARARGS, "Run data-only pickle opcodes; stop before anything else."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastvm", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__fastvm(void)
{
    return PyModule_Create(&module);
}
