/* The hooks that run on every loop step, task, audit event and inline request, in C:
 * what their Python versions (steps.hook_asyncio's wrapper, steps.mark_here,
 * leaks.LeakCheck's create_task, traps._audit as a plain audit hook) do, without a Python
 * frame of ours each time.
 *
 * The hot state of a watched loop lives in StepState (the base of steps.LoopState): the
 * Python code reads and writes the same attributes (start, end, seq, ctx, ...) as before.
 * StepHook replaces asyncio.events.Handle._run (one per attached loop, layered through
 * patching.Link like the Python wrapper): it times the step and calls back into Python
 * only when there is more to do than note the times: an observer is set (the request
 * audit, whose common case, audit.observe, is done here too), the step was long, a held
 * finding waits for a later step, or a run-queue reading is due. Anything of ours that
 * fails is handed to the Python ``fail(st, exc)``; the step's own result and exception
 * pass through untouched.
 *
 * Linux only (steps.py falls back to the Python wrapper elsewhere or when this module
 * is not built): the clocks are read as time.perf_counter and time.thread_time_ns do
 * there (CLOCK_MONOTONIC, CLOCK_THREAD_CPUTIME_ID).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <string.h>
#include <time.h>

#define SEC_NS 1000000000LL

/* time.perf_counter(): CLOCK_MONOTONIC as _PyTime_AsSecondsDouble turns it into seconds */
static double
now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    long long t = (long long)ts.tv_sec * SEC_NS + ts.tv_nsec;
    if (t % SEC_NS == 0) {
        return (double)(t / SEC_NS);
    }
    return (double)t / 1e9;
}

static long long
thread_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (long long)ts.tv_sec * SEC_NS + ts.tv_nsec;
}

/* The dealloc of every type here: untrack, clear (its tp_clear), free, drop the heap type. */
static void
dealloc_via_clear(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    (void)tp->tp_clear(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

/* __dict__ of the wrappers (functools.update_wrapper sets __wrapped__ and the rest there) */
static PyGetSetDef dict_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL}
};

/* -- StepState ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    double start;     /* perf_counter at the start of the running step, 0.0 idle */
    double end;       /* at the end of the last step */
    double rq_due;    /* when the next run-queue reading is due */
    double long_s;    /* a step longer than this goes to the Python side */
    /* inline requests in the running step (steps.mark_inline) */
    double mark_step, mark_in, mark_last, mark_lo, mark_hi;
    long long seq;
    long long cpu0;
    Py_ssize_t queued;
    char active;
    char precise;
    PyObject *ctx;
    PyObject *pending;  /* dict */
    PyObject *queue;    /* the loop's ready deque, or None */
} StepState;

static int
state_traverse(StepState *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->ctx);
    Py_VISIT(self->pending);
    Py_VISIT(self->queue);
    return 0;
}

static int
state_clear(StepState *self)
{
    Py_CLEAR(self->ctx);
    Py_CLEAR(self->pending);
    Py_CLEAR(self->queue);
    return 0;
}

static PyMemberDef state_members[] = {
    {"start", T_DOUBLE, offsetof(StepState, start), 0, NULL},
    {"end", T_DOUBLE, offsetof(StepState, end), 0, NULL},
    {"rq_due", T_DOUBLE, offsetof(StepState, rq_due), 0, NULL},
    {"long_s", T_DOUBLE, offsetof(StepState, long_s), 0, NULL},
    {"mark_step", T_DOUBLE, offsetof(StepState, mark_step), 0, NULL},
    {"mark_in", T_DOUBLE, offsetof(StepState, mark_in), 0, NULL},
    {"mark_last", T_DOUBLE, offsetof(StepState, mark_last), 0, NULL},
    {"mark_lo", T_DOUBLE, offsetof(StepState, mark_lo), 0, NULL},
    {"mark_hi", T_DOUBLE, offsetof(StepState, mark_hi), 0, NULL},
    {"seq", T_LONGLONG, offsetof(StepState, seq), 0, NULL},
    {"cpu0", T_LONGLONG, offsetof(StepState, cpu0), 0, NULL},
    {"queued", T_PYSSIZET, offsetof(StepState, queued), 0, NULL},
    {"active", T_BOOL, offsetof(StepState, active), 0, NULL},
    {"precise", T_BOOL, offsetof(StepState, precise), 0, NULL},
    {"ctx", T_OBJECT, offsetof(StepState, ctx), 0, NULL},
    {"pending", T_OBJECT, offsetof(StepState, pending), 0, NULL},
    {"queue", T_OBJECT, offsetof(StepState, queue), 0, NULL},
    {NULL}
};

static PyType_Slot state_slots[] = {
    {Py_tp_doc, "The hot state of one watched loop (the base of steps.LoopState)."},
    {Py_tp_members, state_members},
    {Py_tp_traverse, state_traverse},
    {Py_tp_clear, state_clear},
    {Py_tp_dealloc, dealloc_via_clear},
    {0, NULL}
};

static PyType_Spec state_spec = {
    "pytest_stallguard.loopwatch._cstep.StepState",
    sizeof(StepState),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    state_slots,
};

/* -- inline requests ------------------------------------------------------------------ */

/* MarkHere(on_thread)(entering): steps.mark_here, for the thread's attached loop in
 * ``on_thread`` (thread ident -> LoopState): what steps.mark_inline notes, in C. */
typedef struct {
    PyObject_HEAD
    PyObject *on_thread;
    PyTypeObject *state_type;
    vectorcallfunc vectorcall;
} MarkHere;

/* The thread's attached loop (borrowed), or NULL, with no exception set. */
static StepState *
state_here(MarkHere *self)
{
    PyObject *key = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
    PyObject *found = key == NULL ? NULL : PyDict_GetItemWithError(self->on_thread, key);
    Py_XDECREF(key);
    if (found == NULL || !PyObject_TypeCheck(found, self->state_type)) {
        PyErr_Clear();
        return NULL;
    }
    return (StepState *)found;
}

/* steps.timing_here: whether a loop watch times the step running on this thread */
static PyObject *
mark_timing_here(MarkHere *self, PyObject *unused)
{
    StepState *st = state_here(self);
    return PyBool_FromLong(st != NULL && st->active && st->start != 0.0);
}

static PyMethodDef mark_methods[] = {
    {"timing_here", (PyCFunction)mark_timing_here, METH_NOARGS,
     "steps.timing_here in C: whether a loop watch times the step running on this thread."},
    {NULL}
};

static PyObject *
mark_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    MarkHere *self = (MarkHere *)callable;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_Format(PyExc_TypeError, "mark_here(entering) takes one argument, got %zd",
                     PyVectorcall_NARGS(nargsf));
        return NULL;
    }
    int entering = PyObject_IsTrue(args[0]);
    StepState *st = entering < 0 ? NULL : state_here(self);
    if (st == NULL) {
        PyErr_Clear();  /* never raises into the request */
        Py_RETURN_NONE;
    }
    double start = st->start;
    if (start == 0.0 || !st->active) {
        Py_RETURN_NONE;
    }
    double now = now_s();
    if (st->mark_step != start) {  /* the first mark of this step */
        st->mark_step = start;
        st->mark_in = start;  /* if it is an end: the step began inside that request */
        st->mark_lo = st->mark_hi = 0.0;
    }
    else if (st->mark_in == 0.0) {  /* an end with none running: since the last mark */
        st->mark_in = st->mark_last;
    }
    if (entering) {
        st->mark_in = now;
    }
    else {
        if (now - st->mark_in > st->mark_hi - st->mark_lo) {
            st->mark_lo = st->mark_in;
            st->mark_hi = now;
        }
        st->mark_in = 0.0;
    }
    st->mark_last = now;
    Py_RETURN_NONE;
}

static PyObject *
mark_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *on_thread;
    static char *names[] = {"on_thread", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!:MarkHere", names, &PyDict_Type,
                                     &on_thread)) {
        return NULL;
    }
    PyObject *state_type = PyObject_GetAttrString(PyType_GetModule(type), "StepState");
    if (state_type == NULL) {
        return NULL;
    }
    MarkHere *self = (MarkHere *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(state_type);
        return NULL;
    }
    self->on_thread = Py_NewRef(on_thread);
    self->state_type = (PyTypeObject *)state_type;
    self->vectorcall = mark_vectorcall;
    return (PyObject *)self;
}

static int
mark_traverse(MarkHere *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->on_thread);
    Py_VISIT(self->state_type);
    return 0;
}

static int
mark_clear(MarkHere *self)
{
    Py_CLEAR(self->on_thread);
    Py_CLEAR(self->state_type);
    return 0;
}

static PyMemberDef mark_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(MarkHere, vectorcall), READONLY, NULL},
    {NULL}
};

static PyType_Slot mark_slots[] = {
    {Py_tp_doc, "steps.mark_here in C: an inline request begins or ends now."},
    {Py_tp_new, mark_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_members, mark_members},
    {Py_tp_methods, mark_methods},
    {Py_tp_traverse, mark_traverse},
    {Py_tp_clear, mark_clear},
    {Py_tp_dealloc, dealloc_via_clear},
    {0, NULL}
};

static PyType_Spec mark_spec = {
    "pytest_stallguard.loopwatch._cstep.MarkHere",
    sizeof(MarkHere),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    mark_slots,
};

/* -- the audit's common case ---------------------------------------------------------- */

/* Set by audit_on() while a burst on a BaseEventLoop is audited: the recorder's ready
 * times by handle, its requests that ended in the running step, its flat list, the ledger
 * context variable, and audit.observe (what steps.step_observer holds meanwhile). */
static PyObject *a_sched, *a_closing, *a_flat, *a_var, *a_observe;
static PyTypeObject *ledger_type;  /* audit.Ledger: its ``open`` is read from its slot */
static Py_ssize_t ledger_open = -1;
static PyObject *str_open, *str_loop, *str_context, *str_next, *str_get;
static PyObject *context_get;  /* contextvars.Context.get, called without a lookup */

/* Where a __slots__ attribute of a class lives in its instances: the offset of its member
 * descriptor, or -1 (then it is read with getattr). */
static Py_ssize_t
slot_offset(PyTypeObject *type, const char *name)
{
    PyObject *descr = PyDict_GetItemString(type->tp_dict, name);  /* borrowed */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        return -1;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    return member->type == T_OBJECT_EX ? member->offset : -1;
}

/* obj.name, new reference: straight from the slot at ``offset`` when ``obj`` is of
 * ``type`` (which has it there), else through getattr. NULL with AttributeError when the
 * slot is empty. */
static PyObject *
read_slot(PyObject *obj, PyTypeObject *type, Py_ssize_t offset, PyObject *name)
{
    if (offset >= 0 && type != NULL && PyObject_TypeCheck(obj, type)) {
        PyObject *value = *(PyObject **)((char *)obj + offset);
        if (value != NULL) {
            return Py_NewRef(value);
        }
    }
    return PyObject_GetAttr(obj, name);
}

/* audit.observe, for asyncio handles; 0, or -1 with an exception set */
static int
c_observe(double start, double end, PyObject *ctx, PyObject *owner, PyObject *queue,
          Py_ssize_t scheduled)
{
    PyObject *sched = a_sched, *flat = a_flat, *closing = a_closing;
    if (scheduled > 0) {
        double part = (end - start) / (double)scheduled;
        for (Py_ssize_t k = 0; k < scheduled; k++) {
            PyObject *handle = PySequence_GetItem(queue, k - scheduled);
            if (handle == NULL) {
                return -1;
            }
            PyObject *at = PyFloat_FromDouble(
                scheduled == 1 ? end : start + part * (double)(k + 1));
            int rc = at == NULL ? -1 : PyDict_SetItem(sched, handle, at);
            Py_XDECREF(at);
            Py_DECREF(handle);
            if (rc < 0) {
                return -1;
            }
        }
    }
    PyObject *ready = NULL;
    if (PyDict_GET_SIZE(sched) > 0) {
        ready = PyDict_GetItemWithError(sched, owner);  /* borrowed */
        if (ready != NULL) {
            Py_INCREF(ready);
            if (PyDict_DelItem(sched, owner) < 0) {
                Py_DECREF(ready);
                return -1;
            }
        }
        else if (PyErr_Occurred()) {
            return -1;
        }
    }
    int rc = 0;
    PyObject *pstart = NULL, *ledger = NULL;
    Py_ssize_t nclosing = PyList_GET_SIZE(closing);
    if (ctx != NULL && ctx != Py_None) {
        PyObject *call[2] = {ctx, a_var};
        ledger = PyObject_Vectorcall(context_get, call, 2, NULL);
        if (ledger == NULL) {
            Py_XDECREF(ready);
            return -1;
        }
        if (ledger != Py_None) {
            /* (its own class only: a subclass may make ``open`` a property) */
            PyObject *open = read_slot(ledger, Py_IS_TYPE(ledger, ledger_type) ? ledger_type
                                       : NULL, ledger_open, str_open);
            int is_open = open == NULL ? -1 : PyObject_IsTrue(open);
            Py_XDECREF(open);
            if (is_open < 0) {
                Py_DECREF(ledger);
                Py_XDECREF(ready);
                return -1;
            }
            if (!is_open) {
                Py_CLEAR(ledger);
            }
        }
        else {
            Py_CLEAR(ledger);
        }
    }
    if (ledger == NULL && nclosing == 0) {
        Py_XDECREF(ready);  /* not a step of the burst's requests: nothing to note */
        return 0;
    }
    pstart = PyFloat_FromDouble(start);
    if (pstart == NULL) {
        Py_XDECREF(ledger);
        Py_XDECREF(ready);
        return -1;
    }
    if (ready == NULL) {
        ready = Py_NewRef(pstart);
    }
    if (nclosing > 0) {  /* requests that ended inside this step: their part of it */
        PyObject *done = PyList_GetSlice(closing, 0, nclosing);
        if (done == NULL || PyList_SetSlice(closing, 0, nclosing, NULL) < 0) {
            Py_XDECREF(done);
            rc = -1;
            goto out;
        }
        for (Py_ssize_t i = 0; i < nclosing && rc == 0; i++) {
            PyObject *pair = PyList_GET_ITEM(done, i);
            if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
                PyErr_Format(PyExc_TypeError,
                             "audit: a request's closing entry is %R, not (ledger, at)", pair);
                rc = -1;
                break;
            }
            if (PyList_Append(flat, PyTuple_GET_ITEM(pair, 0)) < 0 ||
                PyList_Append(flat, ready) < 0 || PyList_Append(flat, pstart) < 0 ||
                PyList_Append(flat, PyTuple_GET_ITEM(pair, 1)) < 0) {
                rc = -1;
            }
        }
        Py_DECREF(done);
        if (rc < 0) {
            goto out;
        }
    }
    if (ledger != NULL) {
        PyObject *pend = PyFloat_FromDouble(end);
        if (pend == NULL || PyList_Append(flat, ledger) < 0 ||
            PyList_Append(flat, ready) < 0 || PyList_Append(flat, pstart) < 0 ||
            PyList_Append(flat, pend) < 0) {
            rc = -1;
        }
        Py_XDECREF(pend);
    }
out:
    Py_XDECREF(ledger);
    Py_DECREF(pstart);
    Py_DECREF(ready);
    return rc;
}

static PyObject *
audit_on(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyDict_CheckExact(args[0]) || !PyList_CheckExact(args[1]) ||
        !PyList_CheckExact(args[2]) || !PyType_Check(args[5])) {
        PyErr_Format(PyExc_TypeError,
                     "audit_on(sched: dict, closing: list, flat: list, var, observe, "
                     "ledger: type): got %zd argument(s), the first three of types %s, %s, "
                     "%s", nargs,
                     nargs > 0 ? Py_TYPE(args[0])->tp_name : "-",
                     nargs > 1 ? Py_TYPE(args[1])->tp_name : "-",
                     nargs > 2 ? Py_TYPE(args[2])->tp_name : "-");
        return NULL;
    }
    Py_XSETREF(a_sched, Py_NewRef(args[0]));
    Py_XSETREF(a_closing, Py_NewRef(args[1]));
    Py_XSETREF(a_flat, Py_NewRef(args[2]));
    Py_XSETREF(a_var, Py_NewRef(args[3]));
    Py_XSETREF(a_observe, Py_NewRef(args[4]));
    Py_XSETREF(ledger_type, (PyTypeObject *)Py_NewRef(args[5]));
    ledger_open = slot_offset(ledger_type, "open");
    Py_RETURN_NONE;
}

static PyObject *
audit_off(PyObject *module, PyObject *unused)
{
    Py_CLEAR(a_sched);
    Py_CLEAR(a_closing);
    Py_CLEAR(a_flat);
    Py_CLEAR(a_var);
    Py_CLEAR(a_observe);
    Py_CLEAR(ledger_type);
    Py_RETURN_NONE;
}

/* -- StepHook ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    StepState *st;
    PyObject *loop;
    PyObject *link;       /* patching.Link: .next is what runs the step */
    PyObject *globals;    /* steps' module dict: step_observer is read from it */
    PyObject *observer_key;
    PyObject *after_key;  /* steps._after(st, start, end, ctx, owner): the long-step side */
    PyObject *fail;       /* fail(st, exc): our bookkeeping failed */
    PyTypeObject *handle_type;  /* asyncio.events.Handle: _loop and _context are slots */
    Py_ssize_t loop_offset, context_offset, next_offset;
    PyObject *dict;
    vectorcallfunc vectorcall;
} StepHook;

/* Hand the exception set now to fail(st, exc); never leaves an exception set. */
static void
failed(StepHook *self)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        PyException_SetTraceback(value, tb);
    }
    PyObject *res = NULL;
    if (value != NULL) {
        res = PyObject_CallFunctionObjArgs(self->fail, (PyObject *)self->st, value, NULL);
    }
    Py_XDECREF(res);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    self->st->active = 0;
    self->st->start = 0.0;
    PyErr_Clear();  /* fail() never raises; should it, nothing of ours reaches the app */
}

/* The end of a timed step: the observer, then the Python side if there is more to do.
 * 0, or -1 with an exception set. */
static int
step_end(StepHook *self, double start, PyObject *ctx, PyObject *handle)
{
    StepState *st = self->st;
    double end = st->end = now_s();
    st->start = 0.0;
    PyObject *observer = PyDict_GetItemWithError(self->globals, self->observer_key);
    if (observer == NULL && PyErr_Occurred()) {
        return -1;
    }
    if (observer != NULL && observer != Py_None) {
        PyObject *queue = st->queue;
        Py_ssize_t scheduled = 0;
        if (queue != NULL && queue != Py_None) {
            Py_ssize_t n = PyObject_Size(queue);
            if (n < 0) {
                return -1;
            }
            scheduled = n - st->queued;
        }
        else {
            queue = Py_None;
        }
        /* audit.observe is done here; any other observer, or audit.observe when this
         * fails (it handles its own failure: it stops the audit), is called */
        if (observer != a_observe || a_flat == NULL ||
            c_observe(start, end, ctx, handle, queue, scheduled) < 0) {
            PyErr_Clear();
            Py_INCREF(observer);
            PyObject *res = PyObject_CallFunction(observer, "ddOOOn", start, end,
                                                  ctx ? ctx : Py_None, handle, queue,
                                                  scheduled);
            Py_DECREF(observer);
            if (res == NULL) {
                return -1;
            }
            Py_DECREF(res);
        }
    }
    if ((st->pending != NULL && PyDict_Check(st->pending) && PyDict_GET_SIZE(st->pending)) ||
        (st->active && end - start > st->long_s) || end > st->rq_due) {
        PyObject *after = PyDict_GetItemWithError(self->globals, self->after_key);
        if (after == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_AttributeError, "steps._after is gone");
            }
            return -1;
        }
        Py_INCREF(after);
        PyObject *res = PyObject_CallFunction(after, "OddOO", (PyObject *)st, start, end,
                                              ctx ? ctx : Py_None, handle);
        Py_DECREF(after);
        if (res == NULL) {
            return -1;
        }
        Py_DECREF(res);
    }
    return 0;
}

static PyObject *
hook_call(StepHook *self, PyObject *handle)
{
    StepState *st = self->st;
    PyObject *next = read_slot(self->link, Py_TYPE(self->link), self->next_offset, str_next);
    if (next == NULL) {
        return NULL;  /* the link is ours: this does not happen */
    }
    int ours = 0;
    PyObject *ctx = NULL;
    double start = 0.0;
    if (st->active) {
        PyObject *loop = read_slot(handle, self->handle_type, self->loop_offset, str_loop);
        if (loop == NULL) {
            PyErr_Clear();  /* not a Handle: the step is not ours to time */
        }
        else {
            ours = loop == self->loop;
            Py_DECREF(loop);
        }
    }
    if (ours) {
        ctx = read_slot(handle, self->handle_type, self->context_offset, str_context);
        if (ctx == NULL) {
            failed(self);
            ours = 0;
        }
        else {
            st->seq += 1;
            Py_INCREF(ctx);
            Py_XSETREF(st->ctx, ctx);
            st->cpu0 = st->precise ? thread_ns() : -1;
            start = st->start = now_s();
            if (st->queue != NULL && st->queue != Py_None) {
                Py_ssize_t n = PyObject_Size(st->queue);
                if (n < 0) {
                    failed(self);
                    ours = 0;
                }
                st->queued = n;
            }
        }
    }
    PyObject *res = PyObject_CallOneArg(next, handle);
    Py_DECREF(next);
    if (ours) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (step_end(self, start, ctx, handle) < 0) {
            failed(self);
        }
        PyErr_Restore(type, value, tb);
    }
    Py_XDECREF(ctx);
    return res;
}

static PyObject *
hook_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_Format(PyExc_TypeError,
                     "Handle._run() takes the handle only, got %zd argument(s)", nargs);
        return NULL;
    }
    return hook_call((StepHook *)callable, args[0]);
}

static PyObject *
hook_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *st, *loop, *link, *globals, *fail, *handle_type;
    static char *names[] = {"state", "loop", "link", "globals", "fail", "handle_type", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOO!OO!:StepHook", names, &st, &loop,
                                     &link, &PyDict_Type, &globals, &fail, &PyType_Type,
                                     &handle_type)) {
        return NULL;
    }
    PyObject *state_type = PyObject_GetAttrString(PyType_GetModule(type), "StepState");
    if (state_type == NULL) {
        return NULL;
    }
    int ok = PyObject_TypeCheck(st, (PyTypeObject *)state_type);
    Py_DECREF(state_type);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "StepHook(state=%R): give a StepState", st);
        return NULL;
    }
    StepHook *self = (StepHook *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->st = (StepState *)Py_NewRef(st);
    self->loop = Py_NewRef(loop);
    self->link = Py_NewRef(link);
    self->globals = Py_NewRef(globals);
    self->observer_key = PyUnicode_InternFromString("step_observer");
    self->after_key = PyUnicode_InternFromString("_after");
    self->fail = Py_NewRef(fail);
    self->handle_type = (PyTypeObject *)Py_NewRef(handle_type);
    self->loop_offset = slot_offset(self->handle_type, "_loop");
    self->context_offset = slot_offset(self->handle_type, "_context");
    self->next_offset = slot_offset(Py_TYPE(link), "next");
    self->vectorcall = hook_vectorcall;
    if (self->observer_key == NULL || self->after_key == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int
hook_traverse(StepHook *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->st);
    Py_VISIT(self->loop);
    Py_VISIT(self->link);
    Py_VISIT(self->globals);
    Py_VISIT(self->fail);
    Py_VISIT(self->handle_type);
    Py_VISIT(self->dict);
    return 0;
}

static int
hook_clear(StepHook *self)
{
    Py_CLEAR(self->st);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->link);
    Py_CLEAR(self->globals);
    Py_CLEAR(self->observer_key);
    Py_CLEAR(self->after_key);
    Py_CLEAR(self->fail);
    Py_CLEAR(self->handle_type);
    Py_CLEAR(self->dict);
    return 0;
}

/* A method (StepHook, CreateTask on a class): looked up on an instance, it binds to it,
 * as a function would. */
static PyObject *
method_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) {
        return Py_NewRef(self);
    }
    return PyMethod_New(self, obj);
}

static PyMemberDef hook_members[] = {
    {"__dictoffset__", T_PYSSIZET, offsetof(StepHook, dict), READONLY, NULL},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(StepHook, vectorcall), READONLY, NULL},
    {NULL}
};

static PyType_Slot hook_slots[] = {
    {Py_tp_doc, "asyncio.events.Handle._run, timed (see steps.hook_asyncio)."},
    {Py_tp_new, hook_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_descr_get, method_get},
    {Py_tp_members, hook_members},
    {Py_tp_getset, dict_getset},
    {Py_tp_traverse, hook_traverse},
    {Py_tp_clear, hook_clear},
    {Py_tp_dealloc, dealloc_via_clear},
    {0, NULL}
};

static PyType_Spec hook_spec = {
    "pytest_stallguard.loopwatch._cstep.StepHook",
    sizeof(StepHook),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
        Py_TPFLAGS_METHOD_DESCRIPTOR,
    hook_slots,
};

/* -- the leak check's create_task ---------------------------------------------------- */

/* CreateTask(link, var, note, loop=None): a loop's create_task: calls ``link.next`` (what
 * it stands in for) with the arguments as given, then, only when the context variable
 * ``var`` is set (the task is made for a request), ``note(task, frame)`` with the frame
 * that asked for it. With ``loop``, it is a class attribute (a method: the first argument
 * is the loop it is called on), and the tasks of other loops of that class are not
 * noted; without, an instance attribute of the loop. */
typedef struct {
    PyObject_HEAD
    PyObject *link;
    PyObject *var;
    PyObject *note;
    PyObject *loop;  /* None: an instance attribute */
    Py_ssize_t next_offset;
    PyObject *dict;
    vectorcallfunc vectorcall;
} CreateTask;

static PyObject *
create_task_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                       PyObject *kwnames)
{
    CreateTask *self = (CreateTask *)callable;
    PyObject *next = read_slot(self->link, Py_TYPE(self->link), self->next_offset, str_next);
    if (next == NULL) {
        return NULL;  /* the link is ours: this does not happen */
    }
    PyObject *task = PyObject_Vectorcall(next, args, nargsf, kwnames);
    Py_DECREF(next);
    if (task == NULL) {
        return NULL;
    }
    if (self->loop != Py_None && (PyVectorcall_NARGS(nargsf) < 1 || args[0] != self->loop)) {
        return task;  /* another loop of the class */
    }
    PyObject *value = NULL;
    if (PyContextVar_Get(self->var, Py_None, &value) < 0) {
        PyErr_Clear();  /* (cannot happen: a ContextVar with a default) */
        return task;
    }
    if (value != Py_None) {
        PyObject *frame = (PyObject *)PyEval_GetFrame();  /* borrowed: the caller's */
        PyObject *res = PyObject_CallFunctionObjArgs(self->note, task,
                                                     frame ? frame : Py_None, NULL);
        if (res == NULL) {
            PyErr_Clear();  /* note() never raises (it runs our bookkeeping safely) */
        }
        Py_XDECREF(res);
    }
    Py_XDECREF(value);
    return task;
}

static PyObject *
create_task_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *link, *var, *note, *loop = Py_None;
    static char *names[] = {"link", "var", "note", "loop", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|O:CreateTask", names, &link, &var,
                                     &note, &loop)) {
        return NULL;
    }
    if (!PyContextVar_CheckExact(var)) {
        PyErr_Format(PyExc_TypeError, "CreateTask(var=%R): give a ContextVar", var);
        return NULL;
    }
    CreateTask *self = (CreateTask *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->link = Py_NewRef(link);
    self->var = Py_NewRef(var);
    self->note = Py_NewRef(note);
    self->loop = Py_NewRef(loop);
    self->next_offset = slot_offset(Py_TYPE(link), "next");
    self->vectorcall = create_task_vectorcall;
    return (PyObject *)self;
}

static int
create_task_traverse(CreateTask *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->link);
    Py_VISIT(self->var);
    Py_VISIT(self->note);
    Py_VISIT(self->loop);
    Py_VISIT(self->dict);
    return 0;
}

static int
create_task_clear(CreateTask *self)
{
    Py_CLEAR(self->link);
    Py_CLEAR(self->var);
    Py_CLEAR(self->note);
    Py_CLEAR(self->loop);
    Py_CLEAR(self->dict);
    return 0;
}

static PyMemberDef create_task_members[] = {
    {"__dictoffset__", T_PYSSIZET, offsetof(CreateTask, dict), READONLY, NULL},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(CreateTask, vectorcall), READONLY, NULL},
    {NULL}
};

static PyType_Slot create_task_slots[] = {
    {Py_tp_doc, "A loop's create_task, noting tasks made for a request (see leaks.py)."},
    {Py_tp_new, create_task_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_descr_get, method_get},
    {Py_tp_members, create_task_members},
    {Py_tp_getset, dict_getset},
    {Py_tp_traverse, create_task_traverse},
    {Py_tp_clear, create_task_clear},
    {Py_tp_dealloc, dealloc_via_clear},
    {0, NULL}
};

static PyType_Spec create_task_spec = {
    "pytest_stallguard.loopwatch._cstep.CreateTask",
    sizeof(CreateTask),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
        Py_TPFLAGS_METHOD_DESCRIPTOR,
    create_task_slots,
};

/* -- the traps' audit hook ------------------------------------------------------------ */

/* The events the traps look at, and their Python hook (traps._audit). Set once: an audit
 * hook cannot be removed. A C hook sees the event's name as a C string: the events it does
 * not want (anyio's builtins.id at every task it starts, ...) cost a compare, with no
 * Python string made for the name and no Python call. */
#define MAX_EVENTS 32
static char *audit_events[MAX_EVENTS];
static Py_ssize_t n_audit_events;
static PyObject *audit_callback;
/* the first bytes of those names: any other event is turned away on one load */
static unsigned char audit_first[256];

static int
audit_hook(const char *event, PyObject *args, void *unused)
{
    if (audit_callback == NULL || !audit_first[(unsigned char)event[0]]) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < n_audit_events; i++) {
        if (strcmp(event, audit_events[i]) == 0) {
            PyObject *name = PyUnicode_FromString(event);
            if (name == NULL) {
                return -1;
            }
            PyObject *res = PyObject_CallFunctionObjArgs(audit_callback, name, args, NULL);
            Py_DECREF(name);
            if (res == NULL) {
                return -1;  /* raise mode: BlockingCallError reaches the audited call */
            }
            Py_DECREF(res);
            return 0;
        }
    }
    return 0;
}

static PyObject *
add_audit_hook(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyCallable_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_Format(PyExc_TypeError,
                     "add_audit_hook(hook, events): give a callable and a tuple of event "
                     "names, got %zd argument(s)%s%R", nargs, nargs == 2 ? ": " : "",
                     nargs == 2 ? args[1] : Py_None);
        return NULL;
    }
    if (audit_callback != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "add_audit_hook(): added already");
        return NULL;
    }
    PyObject *events = args[1];
    Py_ssize_t n = PyTuple_GET_SIZE(events);
    if (n > MAX_EVENTS) {
        PyErr_Format(PyExc_ValueError, "add_audit_hook(): %zd events, at most %d", n,
                     MAX_EVENTS);
        return NULL;
    }
    char *copies[MAX_EVENTS];
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *name = PyUnicode_Check(PyTuple_GET_ITEM(events, i))
            ? PyUnicode_AsUTF8(PyTuple_GET_ITEM(events, i)) : NULL;
        if (name == NULL) {
            for (Py_ssize_t j = 0; j < i; j++) {
                PyMem_RawFree(copies[j]);
            }
            if (!PyErr_Occurred()) {
                PyErr_Format(PyExc_TypeError,
                             "add_audit_hook(): event %R is not a str (give event names)",
                             PyTuple_GET_ITEM(events, i));
            }
            return NULL;
        }
        size_t size = strlen(name) + 1;
        copies[i] = PyMem_RawMalloc(size);
        if (copies[i] == NULL) {
            for (Py_ssize_t j = 0; j < i; j++) {
                PyMem_RawFree(copies[j]);
            }
            return PyErr_NoMemory();
        }
        memcpy(copies[i], name, size);
    }
    if (PySys_AddAuditHook(audit_hook, NULL) < 0) {  /* another hook may refuse it */
        for (Py_ssize_t j = 0; j < n; j++) {
            PyMem_RawFree(copies[j]);
        }
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        audit_events[i] = copies[i];
        audit_first[(unsigned char)copies[i][0]] = 1;
    }
    n_audit_events = n;
    audit_callback = Py_NewRef(args[0]);  /* kept for the process's life, as the hook */
    Py_RETURN_NONE;
}

/* -- module --------------------------------------------------------------------------- */

static PyObject *
perf_counter(PyObject *module, PyObject *unused)
{
    return PyFloat_FromDouble(now_s());
}

/* -- the watchdog's nap -------------------------------------------------------------- */

#define MAX_NAP_STATES 64
#define MAX_NAP_DICTS 4

static void
sleep_s(double seconds)
{
    if (seconds <= 0.0) {
        return;
    }
    struct timespec ts;
    ts.tv_sec = (time_t)seconds;
    ts.tv_nsec = (long)((seconds - (double)ts.tv_sec) * 1e9);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* nap(states, interval, early, late, limit, stop, dicts, cpus) -> float
 *
 * The watchdog's sleep (watchdog.py), without the GIL: it looks at the loops in
 * ``states`` (StepStates) every ``interval`` seconds (sooner when a running step would be
 * ``early`` seconds old by then) and returns, with the GIL, only when
 * its Python side has something to do: a loop is running a step that is ``early`` seconds
 * old (it may need a sample: taking the GIL from a loop thread in pure Python takes a
 * switch interval, so the watchdog asks for it well before the step is half the threshold
 * old), a loop ran no step since the last look and runs none now (idle: the watchdog
 * reads its run-queue wait), one of ``dicts`` (the watch's loops, the process's threads)
 * changed size, another thread ran: the CPU clock of one of ``cpus`` (``(clock id, CPU
 * ns at the last look)``: the threads that could hold the GIL) moved ``early`` seconds
 * on, or can no longer be read; a look came more than ``late`` seconds after it was due
 * (the machine is busy: the Python side decides), ``limit`` seconds have passed, or
 * ``stop[0]`` (a bytearray) is set. Returns when its last sleep was due to end.
 *
 * Taking the GIL at every look would take it from a busy loop thread dozens of times a
 * second, and each hand-over costs that thread more than the look itself (measured: a
 * point and a half of a trivial request's time). The fields read here are written by the
 * loop threads meanwhile: doubles and counters, each read whole. */
static PyObject *
watchdog_nap(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 || !PyTuple_Check(args[0]) || !PyByteArray_Check(args[5]) ||
        PyByteArray_GET_SIZE(args[5]) < 1 || !PyTuple_Check(args[6]) ||
        !PyTuple_Check(args[7])) {
        PyErr_Format(PyExc_TypeError,
                     "nap(states: tuple, interval, early, late, limit, stop: bytearray, "
                     "dicts: tuple, cpus: tuple): got %zd argument(s)", nargs);
        return NULL;
    }
    double interval = PyFloat_AsDouble(args[1]);
    double early = PyFloat_AsDouble(args[2]);
    double late = PyFloat_AsDouble(args[3]);
    double limit = PyFloat_AsDouble(args[4]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (!(interval > 0.0)) {
        PyErr_Format(PyExc_ValueError, "nap(): interval %R, give seconds > 0", args[1]);
        return NULL;
    }
    PyObject *states = args[0], *dicts = args[6];
    PyObject *cpus = args[7];
    Py_ssize_t n = PyTuple_GET_SIZE(states), nd = PyTuple_GET_SIZE(dicts);
    Py_ssize_t nc = PyTuple_GET_SIZE(cpus);
    if (n > MAX_NAP_STATES || nd > MAX_NAP_DICTS || nc > MAX_NAP_STATES) {
        PyErr_Format(PyExc_ValueError,
                     "nap(): %zd loops, %zd dicts and %zd threads, at most %d, %d and %d",
                     n, nd, nc, MAX_NAP_STATES, MAX_NAP_DICTS, MAX_NAP_STATES);
        return NULL;
    }
    clockid_t clocks[MAX_NAP_STATES];
    long long cpu0[MAX_NAP_STATES];
    for (Py_ssize_t k = 0; k < nc; k++) {
        PyObject *pair = PyTuple_GET_ITEM(cpus, k);
        long long clock = -1;
        if (PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) == 2) {
            clock = PyLong_AsLongLong(PyTuple_GET_ITEM(pair, 0));
            cpu0[k] = PyLong_AsLongLong(PyTuple_GET_ITEM(pair, 1));
        }
        if (clock == -1 || PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError,
                         "nap(): thread %zd is %R, not (clock id, CPU ns) as ints", k, pair);
            return NULL;
        }
        clocks[k] = (clockid_t)clock;
    }
    long long early_ns = (long long)(early * 1e9);
    PyObject *state_type = PyObject_GetAttrString(module, "StepState");
    if (state_type == NULL) {
        return NULL;
    }
    StepState *st[MAX_NAP_STATES];
    long long seen[MAX_NAP_STATES];
    Py_ssize_t sizes[MAX_NAP_DICTS];
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(states, i);
        if (!PyObject_TypeCheck(item, (PyTypeObject *)state_type)) {
            Py_DECREF(state_type);
            PyErr_Format(PyExc_TypeError, "nap(): loop %zd is %R, not a StepState", i, item);
            return NULL;
        }
        st[i] = (StepState *)item;
        seen[i] = st[i]->seq;
    }
    Py_DECREF(state_type);
    for (Py_ssize_t j = 0; j < nd; j++) {
        PyObject *d = PyTuple_GET_ITEM(dicts, j);
        if (!PyDict_Check(d)) {
            PyErr_Format(PyExc_TypeError, "nap(): %R is not a dict", d);
            return NULL;
        }
        sizes[j] = PyDict_GET_SIZE(d);
    }
    /* The caller holds every object read below until this returns. */
    volatile char *stop = PyByteArray_AS_STRING(args[5]);
    double began = now_s(), planned = began + interval;
    Py_BEGIN_ALLOW_THREADS
    sleep_s(interval);
    for (;;) {
        double now = now_s();
        int wake = stop[0] || now - planned > late || now - began >= limit;
        for (Py_ssize_t j = 0; j < nd && !wake; j++) {
            wake = PyDict_GET_SIZE(PyTuple_GET_ITEM(dicts, j)) != sizes[j];
        }
        for (Py_ssize_t k = 0; k < nc && !wake; k++) {
            struct timespec ts;
            wake = clock_gettime(clocks[k], &ts) != 0 ||
                (long long)ts.tv_sec * SEC_NS + ts.tv_nsec - cpu0[k] >= early_ns;
        }
        double next = now + interval;
        for (Py_ssize_t i = 0; i < n && !wake; i++) {
            volatile StepState *s = st[i];
            if (!s->active) {
                continue;
            }
            double start = s->start;
            long long seq = s->seq;
            if (start != 0.0) {
                wake = now - start >= early;  /* a step that may need a sample */
                if (start + early < next) {
                    next = start + early;  /* look again when it would */
                }
            }
            else {
                wake = seq == seen[i];  /* idle since the last look */
            }
            seen[i] = seq;
        }
        if (wake) {
            break;
        }
        planned = next;
        sleep_s(next - now);
    }
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble(planned);
}

static PyMethodDef module_methods[] = {
    {"audit_on", (PyCFunction)(void (*)(void))audit_on, METH_FASTCALL,
     "audit_on(sched, closing, flat, var, observe, ledger): audit.observe's common case is done "
     "in C while steps.step_observer is observe."},
    {"audit_off", audit_off, METH_NOARGS, "The audit is over."},
    {"perf_counter", perf_counter, METH_NOARGS, "The clock the hook reads (perf_counter)."},
    {"nap", (PyCFunction)(void (*)(void))watchdog_nap, METH_FASTCALL,
     "nap(states, interval, early, late, limit, stop, dicts, cpus): the watchdog's sleep, "
     "without the GIL until its Python side has something to do."},
    {"add_audit_hook", (PyCFunction)(void (*)(void))add_audit_hook, METH_FASTCALL,
     "add_audit_hook(hook, events): an audit hook in C that calls hook(event, args) for "
     "those events only (once per process: it cannot be removed)."},

    {NULL}
};

static int
module_exec(PyObject *module)
{
    str_open = PyUnicode_InternFromString("open");
    str_loop = PyUnicode_InternFromString("_loop");
    str_context = PyUnicode_InternFromString("_context");
    str_next = PyUnicode_InternFromString("next");
    str_get = PyUnicode_InternFromString("get");
    if (!str_open || !str_loop || !str_context || !str_next || !str_get) {
        return -1;
    }
    context_get = PyObject_GetAttr((PyObject *)&PyContext_Type, str_get);
    if (context_get == NULL) {
        return -1;
    }
    PyObject *state = PyType_FromModuleAndSpec(module, &state_spec, NULL);
    if (state == NULL || PyModule_AddObject(module, "StepState", state) < 0) {
        Py_XDECREF(state);
        return -1;
    }
    PyObject *mark = PyType_FromModuleAndSpec(module, &mark_spec, NULL);
    if (mark == NULL || PyModule_AddObject(module, "MarkHere", mark) < 0) {
        Py_XDECREF(mark);
        return -1;
    }
    PyObject *create_task = PyType_FromModuleAndSpec(module, &create_task_spec, NULL);
    if (create_task == NULL || PyModule_AddObject(module, "CreateTask", create_task) < 0) {
        Py_XDECREF(create_task);
        return -1;
    }
    PyObject *hook = PyType_FromModuleAndSpec(module, &hook_spec, NULL);
    if (hook == NULL || PyModule_AddObject(module, "StepHook", hook) < 0) {
        Py_XDECREF(hook);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL}
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "pytest_stallguard.loopwatch._cstep",
    "The asyncio step hook in C (see steps.py).",
    0,
    module_methods,
    module_slots,
};

PyMODINIT_FUNC
PyInit__cstep(void)
{
    return PyModuleDef_Init(&module_def);
}
