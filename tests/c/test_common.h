/* Shared helpers for the CMocka unit tests of the mtloop core. */
#ifndef MT_TEST_COMMON_H
#define MT_TEST_COMMON_H

/* cmocka.h needs these first. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <errno.h>
#include <time.h>

/* ThreadSanitizer slows threaded code down ~10x: the threaded tests scale
 * their iteration counts with MT_TEST_SCALE(). */
#ifndef MT_TEST_TSAN
#  if defined(__SANITIZE_THREAD__)
#    define MT_TEST_TSAN 1
#  elif defined(__has_feature)
#    if __has_feature(thread_sanitizer)
#      define MT_TEST_TSAN 1
#    endif
#  endif
#endif
#ifndef MT_TEST_TSAN
#  define MT_TEST_TSAN 0
#endif

#if MT_TEST_TSAN
#  define MT_TEST_SCALE(normal, tsan) (tsan)
#else
#  define MT_TEST_SCALE(normal, tsan) (normal)
#endif

/* Deterministic xorshift64* PRNG, so failures reproduce. */
typedef struct mt_test_rng {
    uint64_t s;
} mt_test_rng;

static inline void mt_test_rng_seed(mt_test_rng *r, uint64_t seed)
{
    r->s = seed ? seed : 0x9E3779B97F4A7C15ull;
}

static inline uint64_t mt_test_rng_next(mt_test_rng *r)
{
    uint64_t x = r->s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

/* Uniform-ish in [0, n), n > 0. */
static inline uint64_t mt_test_rng_below(mt_test_rng *r, uint64_t n)
{
    return (mt_test_rng_next(r) >> 11) % n;
}

static inline double mt_test_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline void mt_test_sleep_us(long us)
{
    struct timespec ts = {.tv_sec = us / 1000000, .tv_nsec = (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

#endif
