/* Output marks: how the loop learns that its queued output drained or that
 * the kernel refuses it, without a message per write.  Every kind with an
 * output queue on an I/O thread has one (flows, datagram endpoints).
 *
 * The I/O thread counts what left its queue (`flushed`: sent, or dropped);
 * the loop counts what it queued, so the write-buffer size is the
 * difference.  The loop asks for two reports by storing a mark:
 *  - DRAINED once `flushed` reaches `resume_at` (resume_writing());
 *  - BLOCKED once the fd refused output with at least `blocked_mark`
 *    waiting (pause_writing(): asyncio pauses only for output the kernel
 *    would not take, not for output merely on its way to the I/O thread).
 * Each side stores its own field, then loads the other's, both sequentially
 * consistent (Dekker's pattern, as in credit.h): at least one side sees the
 * other's store, and a CAS on the mark makes sure only one of them reports.
 *
 * Ownership: all four fields are atomics; `flushed` and `output_full` are
 * written by the owning I/O thread, the marks by both (the loop stores, the
 * thread takes with a CAS). */
#ifndef MT_OUT_MARKS_H
#define MT_OUT_MARKS_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

/* The protocol is paused when output the kernel refused exceeds the
 * high-water mark.  Only the I/O thread sees the kernel refuse, so the loop
 * asks it (mt_out_arm_blocked) and pauses on its BLOCKED report; it pauses
 * by itself only past the cap, so a writer that never yields stays
 * bounded. */
#define MT_WRITE_CAP_FACTOR 16
#define MT_WRITE_CAP_MIN (4 * 1024 * 1024)

/* The write-buffer size past which the loop pauses without asking. */
static inline uint64_t mt_out_write_cap(uint64_t high_water)
{
    uint64_t cap = high_water * MT_WRITE_CAP_FACTOR;
    return cap < MT_WRITE_CAP_MIN ? MT_WRITE_CAP_MIN : cap;
}

typedef struct mt_out_marks {
    _Atomic uint64_t flushed;      /* output units that left the queue */
    _Atomic uint64_t resume_at;    /* loop: report DRAINED once flushed >= this; 0 none */
    _Atomic uint64_t blocked_mark; /* loop: report BLOCKED once the fd is full with at
                                      least this much waiting; 0 none */
    _Atomic bool output_full;      /* I/O: the fd refused output; cleared when it took
                                      some again */
} mt_out_marks;

static inline void mt_out_marks_init(mt_out_marks *m)
{
    atomic_init(&m->flushed, 0);
    atomic_init(&m->resume_at, 0);
    atomic_init(&m->blocked_mark, 0);
    atomic_init(&m->output_full, false);
}

/* ---- the I/O thread's side ------------------------------------------------ */

/* `n` more units left the queue.  True when `flushed` reached the loop's
 * resume mark and this call took it: report DRAINED. */
static inline bool mt_out_add_flushed(mt_out_marks *m, uint64_t n)
{
    uint64_t flushed = atomic_load_explicit(&m->flushed, memory_order_relaxed) + n;
    atomic_store_explicit(&m->flushed, flushed, memory_order_seq_cst);
    uint64_t mark = atomic_load_explicit(&m->resume_at, memory_order_seq_cst);
    if (mark == 0 || flushed < mark)
        return false;
    return atomic_compare_exchange_strong(&m->resume_at, &mark, 0); /* or the loop took it */
}

/* A DRAINED report could not be queued (out of memory): the next flush
 * tries again. */
static inline void mt_out_rearm_resume(mt_out_marks *m)
{
    atomic_store_explicit(&m->resume_at, atomic_load(&m->flushed), memory_order_relaxed);
}

/* `waiting` units wait behind a full fd.  True when the loop asked about
 * that much and this call took the mark: report BLOCKED. */
static inline bool mt_out_take_blocked(mt_out_marks *m, uint64_t waiting)
{
    uint64_t mark = atomic_load_explicit(&m->blocked_mark, memory_order_seq_cst);
    if (mark == 0 || waiting < mark)
        return false;
    return atomic_compare_exchange_strong(&m->blocked_mark, &mark, 0);
}

/* The fd refused output with `waiting` units queued: as take_blocked. */
static inline bool mt_out_note_full(mt_out_marks *m, uint64_t waiting)
{
    atomic_store_explicit(&m->output_full, true, memory_order_seq_cst);
    return mt_out_take_blocked(m, waiting);
}

/* The fd took output again. */
static inline void mt_out_note_progress(mt_out_marks *m)
{
    if (atomic_load_explicit(&m->output_full, memory_order_relaxed))
        atomic_store_explicit(&m->output_full, false, memory_order_relaxed);
}

/* ---- the loop's side ---------------------------------------------------------- */

/* Asks for DRAINED once `flushed` reaches `mark`.  True when it already
 * has: the caller reports it now, and no DRAINED will come for this mark. */
static inline bool mt_out_arm_resume(mt_out_marks *m, uint64_t mark)
{
    atomic_store_explicit(&m->resume_at, mark, memory_order_seq_cst);
    if (atomic_load_explicit(&m->flushed, memory_order_seq_cst) < mark)
        return false;
    uint64_t expected = mark;
    return atomic_compare_exchange_strong(&m->resume_at, &expected, 0);
}

/* Asks for BLOCKED once the fd refuses output with at least `mark` units
 * waiting.  True when the fd is refusing output already: the caller
 * decides now, and no BLOCKED will come for this mark. */
static inline bool mt_out_arm_blocked(mt_out_marks *m, uint64_t mark)
{
    atomic_store_explicit(&m->blocked_mark, mark, memory_order_seq_cst);
    if (!atomic_load_explicit(&m->output_full, memory_order_seq_cst))
        return false;
    uint64_t expected = mark;
    return atomic_compare_exchange_strong(&m->blocked_mark, &expected, 0);
}

/* ---- the loop half's view (loop thread only) ---------------------------------- */

/* What the loop half of a kind with output marks keeps: asyncio's
 * write-buffer limits and pause flag, and its own count of what it
 * queued. */
typedef struct mt_out_view {
    uint64_t queued;            /* units handed to the I/O thread */
    uint64_t flushed_seen;      /* `flushed` as of the last pause or DRAINED: the size
                                   reported while paused, so that it drops to the low mark
                                   in the same step as resume_writing() */
    ssize_t high_water, low_water;
    bool paused;                /* pause_writing() is in effect */
} mt_out_view;

static inline void mt_out_view_init(mt_out_view *v, ssize_t high_water)
{
    v->queued = v->flushed_seen = 0;
    v->high_water = high_water;
    v->low_water = high_water / 4;
    v->paused = false;
}

/* The write-buffer size: queued and not yet flushed. */
static inline uint64_t mt_out_size(const mt_out_view *v, mt_out_marks *m)
{
    uint64_t flushed = v->paused ? v->flushed_seen
                                 : atomic_load_explicit(&m->flushed, memory_order_acquire);
    return v->queued > flushed ? v->queued - flushed : 0;
}

/* Takes `flushed` as the paused size's base. */
static inline void mt_out_snapshot(mt_out_view *v, mt_out_marks *m)
{
    v->flushed_seen = atomic_load_explicit(&m->flushed, memory_order_acquire);
}

/* While paused, asks for DRAINED once the buffer is down to the low-water
 * mark.  True when it is already: the caller reports DRAINED itself. */
static inline bool mt_out_arm_low(mt_out_view *v, mt_out_marks *m)
{
    uint64_t low = (uint64_t)v->low_water;
    return mt_out_arm_resume(m, v->queued > low ? v->queued - low : 1);
}

/* After queueing output: true when the protocol must be paused now (over
 * the high-water mark, and the kernel refused that much or the cap is
 * passed); otherwise BLOCKED may come for it later. */
static inline bool mt_out_must_pause(mt_out_view *v, mt_out_marks *m)
{
    uint64_t size = mt_out_size(v, m), high = (uint64_t)v->high_water;
    if (v->paused || size <= high)
        return false;
    return size > mt_out_write_cap(high) || mt_out_arm_blocked(m, high + 1);
}

/* BLOCKED came: true when the protocol must be paused. */
static inline bool mt_out_blocked_pauses(mt_out_view *v, mt_out_marks *m)
{
    return !v->paused && mt_out_size(v, m) > (uint64_t)v->high_water;
}

/* DRAINED came while paused: true when the buffer is down to the low mark
 * (resume the protocol); otherwise the mark was moved, and true in
 * *report_now when it was reached meanwhile (the caller reports DRAINED
 * itself). */
static inline bool mt_out_drained_resumes(mt_out_view *v, mt_out_marks *m, bool *report_now)
{
    mt_out_snapshot(v, m);
    *report_now = false;
    if (mt_out_size(v, m) <= (uint64_t)v->low_water)
        return true;
    *report_now = mt_out_arm_low(v, m);
    return false;
}

/* The pause flag set (from asyncio's _maybe_pause/_resume_protocol).  True
 * when the caller must report DRAINED itself. */
static inline bool mt_out_set_paused(mt_out_view *v, mt_out_marks *m, bool paused)
{
    if (paused && !v->paused)
        mt_out_snapshot(v, m);
    v->paused = paused;
    if (paused)
        return mt_out_arm_low(v, m); /* DRAINED tells when to look at the buffer again */
    atomic_store(&m->resume_at, 0);
    return false;
}

/* The queued output was dropped (abort): the size is 0 from now on. */
static inline void mt_out_forget(mt_out_view *v, mt_out_marks *m)
{
    v->queued = v->flushed_seen = atomic_load(&m->flushed);
}

#endif
