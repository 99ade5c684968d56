/* mtloop._mtloop: module initialisation and the glue shared by its types. */
#include "pyext/module.h"

#include <stdlib.h>

#include <event2/event.h>
#include <structmember.h>

#include "io_threads/cpu_budget.h"
#include "io_threads/runtime.h"
#include "loop/handle.h"
#include "loop/loop.h"
#include "transport/datagram_core.h"
#include "transport/listener_core.h"
#include "transport/stream_core.h"
#include "transport/tls_core.h"

static PyObject *helpers; /* mtloop._helpers, imported on first use */

PyObject *mt_call_helper(const char *name, PyObject *const *args, size_t nargs)
{
    if (helpers == NULL) {
        helpers = PyImport_ImportModule("mtloop._helpers");
        if (helpers == NULL)
            return NULL;
    }
    PyObject *func = PyObject_GetAttrString(helpers, name);
    if (func == NULL)
        return NULL;
    PyObject *res = PyObject_Vectorcall(func, args, nargs, NULL);
    Py_DECREF(func);
    return res;
}

bool mt_exception_must_propagate(void)
{
    return PyErr_ExceptionMatches(PyExc_SystemExit) ||
           PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
}

int mt_report_failed_call(PyObject *ctx)
{
    if (mt_exception_must_propagate())
        return -1;
    PyErr_WriteUnraisable(ctx);
    return 0;
}

PyObject *mt_count_lost_write(int *conn_lost)
{
    if (*conn_lost >= 5) {
        PyObject *msg = PyUnicode_FromString("socket.send() raised exception.");
        if (msg == NULL)
            return NULL;
        PyObject *res = mt_call_helper("log_warning", &msg, 1);
        Py_DECREF(msg);
        if (res == NULL)
            return NULL;
        Py_DECREF(res);
    }
    ++*conn_lost;
    Py_RETURN_NONE;
}

static Py_ssize_t core_slot_offset(mt_core_slot *cache, PyTypeObject *type)
{
    if (type == cache->type)
        return cache->offset;
    PyObject *descr = PyObject_GetAttrString((PyObject *)type, "_core");
    Py_ssize_t offset = 0;
    if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
        ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX)
        offset = ((PyMemberDescrObject *)descr)->d_member->offset;
    Py_XDECREF(descr);
    PyErr_Clear();
    Py_XSETREF(cache->type, (PyTypeObject *)Py_NewRef((PyObject *)type));
    cache->offset = offset;
    return offset;
}

PyObject *mt_transport_core(mt_core_slot *cache, PyObject *transport, PyTypeObject *core_type)
{
    Py_ssize_t offset = core_slot_offset(cache, Py_TYPE(transport));
    if (offset > 0) {
        PyObject *core = *(PyObject **)((char *)transport + offset);
        if (core != NULL && Py_IS_TYPE(core, core_type))
            return Py_NewRef(core);
    }
    PyObject *core = PyObject_GetAttrString(transport, "_core");
    if (core != NULL && !PyObject_TypeCheck(core, core_type)) {
        PyErr_Format(PyExc_TypeError, "transport has no %s", core_type->tp_name);
        Py_CLEAR(core);
    }
    return core;
}

/* libevent reports problems on stderr by default; every failure that
 * matters to a caller already comes back as an error code, turned into a
 * Python exception, so its messages are dropped. */
static void quiet_libevent_log(int severity, const char *msg)
{
    (void)severity;
    (void)msg;
}

static PyObject *libevent_version(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    return PyUnicode_FromString(event_get_version());
}

static int put_u64(PyObject *d, const char *key, uint64_t v)
{
    PyObject *o = PyLong_FromUnsignedLongLong(v);
    if (o == NULL)
        return -1;
    int rc = PyDict_SetItemString(d, key, o);
    Py_DECREF(o);
    return rc;
}

static PyObject *runtime_stats(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    PyObject *list = PyList_New(0);
    mt_io_snapshot snap;
    for (int i = 0; list != NULL && mt_runtime_snapshot(i, &snap); i++) {
        PyObject *d = PyDict_New();
        if (d == NULL || put_u64(d, "thread", (uint64_t)i) < 0 ||
            put_u64(d, "transports", snap.transports) < 0 ||
            put_u64(d, "listeners", snap.listeners) < 0 ||
            put_u64(d, "bytes_read", snap.bytes_read) < 0 ||
            put_u64(d, "bytes_written", snap.bytes_written) < 0 ||
            put_u64(d, "accepts", snap.accepts) < 0 ||
            put_u64(d, "commands", snap.commands) < 0 ||
            put_u64(d, "completions", snap.completions) < 0 ||
            put_u64(d, "wakeups_sent", snap.wakeups_sent) < 0 ||
            put_u64(d, "wakeups_received", snap.wakeups_received) < 0 ||
            put_u64(d, "native_id", (uint64_t)snap.native_id) < 0 ||
            put_u64(d, "cpu_ns", snap.cpu_ns) < 0 || put_u64(d, "wait_ns", snap.wait_ns) < 0 ||
            put_u64(d, "held_back", snap.held_back) < 0 ||
            PyList_Append(list, d) < 0) {
            Py_XDECREF(d);
            Py_CLEAR(list);
            break;
        }
        Py_DECREF(d);
    }
    return list;
}

static PyObject *shutdown_runtime(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    mt_runtime_stop(); /* under the GIL: no loop can post behind STOP */
    Py_BEGIN_ALLOW_THREADS
    mt_runtime_join();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *shutdown_at_exit(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    /* A loop still running in a daemon thread must not start a new pool
     * while the interpreter goes down. */
    mt_runtime_finalize();
    return shutdown_runtime(NULL, NULL);
}

static PyObject *threads_allocated(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    return PyLong_FromLong(mt_runtime_threads_allocated());
}

static PyObject *default_io_threads(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    return PyLong_FromLong(mt_runtime_default_size());
}

static PyObject *cpus_usable(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(a))
{
    return PyLong_FromLong(mt_cpus_usable());
}

static PyMethodDef module_methods[] = {
    {"libevent_version", libevent_version, METH_NOARGS, "The libevent version in use."},
    {"runtime_stats", runtime_stats, METH_NOARGS,
     "Per-I/O-thread counters of the running pool, as a list of dicts."},
    {"shutdown_runtime", shutdown_runtime, METH_NOARGS,
     "Stop and join the I/O threads; their transports are aborted."},
    {"_shutdown_at_exit", shutdown_at_exit, METH_NOARGS,
     "shutdown_runtime(), and no pool starts again in this process."},
    {"_threads_allocated", threads_allocated, METH_NOARGS,
     "I/O thread records still allocated (running, or kept by a reference)."},
    {"default_io_threads", default_io_threads, METH_NOARGS,
     "The I/O threads a loop uses when it does not ask (0: inline)."},
    {"cpus_usable", cpus_usable, METH_NOARGS,
     "The CPUs of this process's affinity mask, capped by its cgroup's CPU quota."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef mtloop_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mtloop._mtloop",
    .m_doc = "The C core of mtloop.",
    .m_size = -1,
    .m_methods = module_methods,
};

/* glibc's malloc serves requests of at least its mmap threshold (128 KiB
 * when a process starts) with mmap(), and gives the top of its heap back to
 * the kernel whenever more than twice that lies free there.  The first
 * time a block that came from mmap() is freed, it raises the threshold to
 * that block's size, for good (mallopt(3), "dynamic mmap threshold").
 * Until some code happens to do that, a server whose messages are around
 * 100 KiB has its heap's top trimmed and grown again on every message: the
 * kernel then maps and zeroes its pages anew.  Measured on streams echo
 * 100 KiB x1, pinned: 61-64 µs of system time per request against 34-36
 * µs once the threshold had moved (which happened in some runs of the same
 * server and not others, by heap layout alone).  So mtloop frees one block
 * of MTLOOP_MALLOC_THRESHOLD bytes (512 KiB by default; 0 leaves malloc as
 * it is) at import: the process keeps at most about twice that free on its
 * heap, and allocations below it come from the heap.  With the threshold
 * set by mallopt() or the MALLOC_* variables, glibc ignores the free. */
static void raise_malloc_threshold(void)
{
#ifdef __GLIBC__
    size_t n = 512 * 1024;
    const char *env = getenv("MTLOOP_MALLOC_THRESHOLD");
    if (env != NULL && *env) {
        char *end;
        unsigned long long v = strtoull(env, &end, 10);
        if (*end == '\0' && v <= (unsigned long long)32 * 1024 * 1024)
            n = (size_t)v;
    }
    if (n == 0)
        return;
    void *volatile block = malloc(n); /* volatile: the pair must not be elided */
    free(block);
#endif
}

PyMODINIT_FUNC PyInit__mtloop(void)
{
    event_set_log_callback(quiet_libevent_log);
    raise_malloc_threshold();
    PyObject *m = PyModule_Create(&mtloop_module);
    if (m == NULL)
        return NULL;
    mt_runtime_init();
    if (mt_handles_init() < 0 || mt_loop_type_init(m) < 0 ||
        mt_stream_core_type_init(m) < 0 || mt_listener_core_type_init(m) < 0 ||
        mt_datagram_core_type_init(m) < 0 ||
        mt_tls_core_init(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
