/* Credit: how far an I/O thread may run ahead of its loop.
 *
 * The I/O thread adds what it delivers (bytes read, connections accepted)
 * and stops producing once `used` reaches the limit; the loop subtracts
 * what it consumed and restarts a stopped producer once `used` is down to
 * half the limit.  The stop and the restart race: the producer announces
 * that it stops (`starved`) and then looks at `used` again; the loop
 * returns credit and then looks at `starved`.  With a full fence between
 * each side's store and load (Dekker's pattern) at least one of them sees
 * the other, so a producer never stays stopped with credit available.
 * Here the fences are those of sequentially consistent operations: on x86
 * the consumer's fetch_sub is a locked instruction anyway and its load a
 * plain one, so returning credit costs nothing more than the subtraction.
 *
 * Ownership: both fields are atomics shared by the producer (the owning
 * I/O thread) and the consumer (the loop thread). */
#ifndef MT_CREDIT_H
#define MT_CREDIT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct mt_credit {
    _Atomic int64_t used;
    _Atomic bool starved;
} mt_credit;

static inline void mt_credit_init(mt_credit *c)
{
    atomic_init(&c->used, 0);
    atomic_init(&c->starved, false);
}

/* Producer: may it deliver more?  When not, it is marked starved and must
 * stop until the consumer's restart (mt_credit_return returned true). */
static inline bool mt_credit_available(mt_credit *c, int64_t limit)
{
    if (atomic_load_explicit(&c->used, memory_order_relaxed) < limit)
        return true;
    atomic_store_explicit(&c->starved, true, memory_order_seq_cst);
    if (atomic_load_explicit(&c->used, memory_order_seq_cst) < limit) {
        /* Credit came back meanwhile.  If the consumer took the flag too,
         * its restart finds the producer running: harmless. */
        atomic_store_explicit(&c->starved, false, memory_order_relaxed);
        return true;
    }
    return false;
}

/* Producer: `n` more delivered. */
static inline void mt_credit_take(mt_credit *c, int64_t n)
{
    atomic_fetch_add_explicit(&c->used, n, memory_order_relaxed);
}

/* Consumer: `n` consumed.  True when the caller must restart the
 * producer (it stopped, and this call is the one that saw it). */
static inline bool mt_credit_return(mt_credit *c, int64_t n, int64_t limit)
{
    int64_t left = atomic_fetch_sub_explicit(&c->used, n, memory_order_seq_cst) - n;
    if (left >= limit / 2)
        return false;
    return atomic_load_explicit(&c->starved, memory_order_seq_cst) &&
           atomic_exchange_explicit(&c->starved, false, memory_order_relaxed);
}

#endif
