/* Decode products over several cores: y[r, :] = x[r, :] @ w, with w the [n_in, n_out]
 * (transposed, row-major) weight a FastLinear holds. Built and loaded by native.py.
 *
 * Why: numpy's OpenBLAS streams a batch-1 product at one core's memory speed, but its own
 * thread pool spins on its peers and collapsed when cores are shared, so kernels.py pins it
 * to one thread; a box with more cores than ranks (a Jetson's 6-12, a workstation) then
 * decodes at one core's bandwidth. Here each thread owns a slice of the output columns
 * (16-column multiples: no cache line of y is written by two threads) and streams its part
 * of every weight row; the hand-off is one atomic counter, workers spin up to 300 us (a
 * decode step's products follow each other by 5-100 us; at 50 us they slept inside steps
 * and each wake-up came late) and then sleep on a futex, so a rank waiting for its next
 * message costs no core.
 *
 * Bits: every output is the same chain of fused multiply-adds over the inputs in order
 * (fmaf, contraction otherwise off), whatever the number of threads, the column split, the
 * vector width or the CPU, so 1 and N threads give the same bits, and so do two hosts. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>

#define MAXT 64
#define SPIN_NS 300000L /* a worker's busy wait before it sleeps (see above) */

#if defined(__FMA__) || defined(__ARM_FEATURE_FMA) || defined(__aarch64__)
int es_hw_fma(void) { return 1; }
#else
int es_hw_fma(void) { return 0; } /* fmaf would be a slow library call: native.py declines */
#endif

/* Columns [c0, c1) of every row. y blocks of at most 16 KiB (all rows) stay in L1 while
 * eight weight rows at a time stream through once (four: 5% slower on one thread). */
static void part(const float *x, const float *w, float *y, int rows, int n_in, int n_out,
                 int c0, int c1) {
    int nb = (4096 / (rows > 0 ? rows : 1)) & ~15;
    if (nb < 64) nb = 64;
    for (int cb = c0; cb < c1; cb += nb) {
        int ce = cb + nb < c1 ? cb + nb : c1;
        for (int r = 0; r < rows; r++)
            memset(y + (size_t)r * n_out + cb, 0, (size_t)(ce - cb) * sizeof(float));
        int j = 0;
        for (; j + 8 <= n_in; j += 8) { /* eight weight rows per pass: y read/written once */
            const float *w0 = w + (size_t)j * n_out, *w1 = w0 + n_out, *w2 = w1 + n_out,
                        *w3 = w2 + n_out, *w4 = w3 + n_out, *w5 = w4 + n_out,
                        *w6 = w5 + n_out, *w7 = w6 + n_out;
            for (int r = 0; r < rows; r++) {
                const float *a = x + (size_t)r * n_in + j;
                float *restrict yr = y + (size_t)r * n_out;
                for (int c = cb; c < ce; c++) {
                    float v = fmaf(a[0], w0[c], yr[c]);
                    v = fmaf(a[1], w1[c], v);
                    v = fmaf(a[2], w2[c], v);
                    v = fmaf(a[3], w3[c], v);
                    v = fmaf(a[4], w4[c], v);
                    v = fmaf(a[5], w5[c], v);
                    v = fmaf(a[6], w6[c], v);
                    yr[c] = fmaf(a[7], w7[c], v);
                }
            }
        }
        for (; j < n_in; j++) {
            const float *w0 = w + (size_t)j * n_out;
            for (int r = 0; r < rows; r++) {
                float a0 = x[(size_t)r * n_in + j];
                float *restrict yr = y + (size_t)r * n_out;
                for (int c = cb; c < ce; c++) yr[c] = fmaf(a0, w0[c], yr[c]);
            }
        }
    }
}

/* Thread k of nt: its 16-column blocks. */
static void slice(int n_out, int nt, int k, int *c0, int *c1) {
    long blocks = (n_out + 15) / 16;
    long b0 = blocks * k / nt, b1 = blocks * (k + 1) / nt;
    *c0 = (int)(b0 * 16);
    *c1 = b1 * 16 < n_out ? (int)(b1 * 16) : n_out;
}

struct job {
    const float *x, *w;
    float *y;
    int rows, n_in, n_out, nt, caller_cpu;
};
static struct job job;
static atomic_uint gen;      /* bumped once per posted job */
static atomic_uint finished; /* workers done with the current job */
static atomic_int sleepers;  /* workers in futex wait */
static int nworkers;
static pthread_mutex_t grow = PTHREAD_MUTEX_INITIALIZER;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* A worker woken onto the caller's CPU (the scheduler places a futex wakee beside its
 * waker) would share that core with it: the split then runs one half after the other and
 * the caller's own work between products slows too (measured: a decode step 5.9 ms
 * instead of 4.8 on 2 cores, in runs of tens of steps). Such a worker moves itself off
 * that CPU, to any other the process may use; the caller is never pinned. */
static void step_aside(int caller_cpu) {
    cpu_set_t set;
    if (caller_cpu < 0 || sched_getcpu() != caller_cpu) return;
    if (sched_getaffinity(0, sizeof set, &set) || CPU_COUNT(&set) < 2) {
        /* pinned to the caller's CPU alone: widen to the process's CPUs first */
        if (sched_getaffinity(getpid(), sizeof set, &set)) return;
    }
    CPU_CLR(caller_cpu, &set);
    if (CPU_COUNT(&set) > 0) sched_setaffinity(0, sizeof set, &set);
}

static void *worker(void *arg) {
    uintptr_t a = (uintptr_t)arg;
    int k = (int)(a & 0xff);
    unsigned seen = (unsigned)(a >> 8); /* gen at creation: a job posted before this thread
                                           first runs is still new to it */
    for (;;) {
        unsigned g;
        long t0 = 0;
        int n = 0;
        while ((g = atomic_load_explicit(&gen, memory_order_acquire)) == seen) {
            cpu_relax();
            if (++n & 63) continue;
            long t = now_ns();
            if (!t0) t0 = t;
            else if (t - t0 > SPIN_NS) {
                atomic_fetch_add(&sleepers, 1);
                syscall(SYS_futex, &gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                atomic_fetch_sub(&sleepers, 1);
                t0 = 0;
            }
        }
        seen = g;
        struct job j = job;
        step_aside(j.caller_cpu);
        if (k < j.nt) {
            int c0, c1;
            slice(j.n_out, j.nt, k, &c0, &c1);
            if (c1 > c0) part(j.x, j.w, j.y, j.rows, j.n_in, j.n_out, c0, c1);
        }
        atomic_fetch_add_explicit(&finished, 1, memory_order_release);
    }
    return NULL;
}

/* y = x @ w on up to nt threads (the caller's and nt - 1 workers). One caller at a time
 * (a rank's compute thread); returns the threads used. */
int es_gemv(const float *x, const float *w, float *y, int rows, int n_in, int n_out, int nt) {
    if (nt > MAXT) nt = MAXT;
    if (nt > (n_out + 63) / 64) nt = (n_out + 63) / 64; /* >= 64 columns per thread */
    /* >= 256 KiB of weights per thread: a smaller slice streams in less time than a
     * hand-off costs (stories260K's products, 44-128 KiB, ran 0.2 ms/token slower split) */
    long per = (long)n_in * n_out * (long)sizeof(float) / (256L << 10);
    if (nt > per) nt = per > 1 ? (int)per : 1;
    if (nt <= 1) {
        part(x, w, y, rows, n_in, n_out, 0, n_out);
        return 1;
    }
    pthread_mutex_lock(&grow);
    while (nworkers < nt - 1) {
        pthread_t t;
        uintptr_t a = ((uintptr_t)atomic_load(&gen) << 8) | (uintptr_t)(nworkers + 1);
        if (pthread_create(&t, NULL, worker, (void *)a)) break;
        pthread_detach(t);
        nworkers++;
    }
    pthread_mutex_unlock(&grow);
    if (nt > nworkers + 1) nt = nworkers + 1;
    job = (struct job){x, w, y, rows, n_in, n_out, nt, sched_getcpu()};
    atomic_store_explicit(&finished, 0, memory_order_relaxed);
    atomic_fetch_add(&gen, 1); /* seq_cst: ordered before the sleepers load (futex handshake) */
    if (atomic_load(&sleepers)) syscall(SYS_futex, &gen, FUTEX_WAKE_PRIVATE, MAXT, NULL, NULL, 0);
    int c0, c1;
    slice(n_out, nt, 0, &c0, &c1);
    part(x, w, y, rows, n_in, n_out, c0, c1);
    /* Every worker reports, those without a slice too, so the next job can reuse `job`. */
    for (int n = 0; atomic_load_explicit(&finished, memory_order_acquire) < (unsigned)nworkers;)
        if (++n < 4096) cpu_relax();
        else sched_yield(); /* a worker was preempted: let it run */
    return nt;
}
