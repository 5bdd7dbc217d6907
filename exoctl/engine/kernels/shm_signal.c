/* Signalling between processes through a word of shared memory: the tensor-parallel ranks that
 * share a host exchange partials through /dev/shm (exoctl/worker/shm_exchange.py), and a rank
 * announces "my partial of step s is written" by storing s + 1 in its word.
 *
 * Through ZeroMQ each partial crossed four threads (the sender, its I/O thread, the receiver's I/O
 * thread, the receiver): 200-290 us an all-reduce on the 2-core test machine, 44 of them a token.
 * Here the writer stores and wakes, and the reader spins briefly (the other rank usually finishes
 * within microseconds of this one) and then sleeps on the word (a futex), so a rank that waits
 * long leaves its core to the ranks still computing. Linux only; the Python side checks. */
#include <time.h>

#include "exoctl_kernels.h"
#ifdef __linux__
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* *word = value, visible after every store before it (release), and wake whoever sleeps on it. */
void shm_publish(uint32_t *word, uint32_t value) {
    __atomic_store_n(word, value, __ATOMIC_RELEASE);
#ifdef __linux__
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
#endif
}

/* Wait until *word has reached value (counting modulo 2^32): spin for spin_ns, then sleep on the
 * word, for at most timeout_ns in all. Returns 0 once reached, 1 on timeout. */
int shm_wait(const uint32_t *word, uint32_t value, int64_t spin_ns, int64_t timeout_ns) {
    const int64_t start = now_ns();
    for (;;) {
        const uint32_t seen = __atomic_load_n(word, __ATOMIC_ACQUIRE);
        if ((int32_t)(seen - value) >= 0) return 0;
        const int64_t waited = now_ns() - start;
        if (waited >= timeout_ns) return 1;
        if (waited < spin_ns) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            continue;
        }
#ifdef __linux__
        const int64_t left = timeout_ns - waited;
        struct timespec limit = {(time_t)(left / 1000000000LL), (long)(left % 1000000000LL)};
        /* sleeps only while the word still holds `seen`: a store in between returns at once */
        syscall(SYS_futex, word, FUTEX_WAIT, seen, &limit, NULL, 0);
#endif
    }
}
