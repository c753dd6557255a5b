/* asrkf-edge native decode thread: llama_decode on a thread of its own, so that the caller's host work runs beside it.
 *
 * With a cb_eval set (asrkf's capture), llama.cpp runs every graph split as views and synchronises after each, so its
 * llama_decode returns only when the GPU is done, and the host work after it (bookkeeping, the policy's hooks) is on
 * every token's path; without a callback (full) llama_decode returns once the graph is queued and that work runs
 * while the GPU computes. A Python thread cannot give the same: it must take the GIL to start the call, which the
 * busy main thread hands over only at Python's switch interval (5 ms). Here the caller's thread only signals.
 *
 * One decoder per llama context: asrkf_decoder_launch hands it a batch (copied: llama_batch's arrays must stay valid
 * until the wait), asrkf_decoder_wait returns llama_decode's code. The caller makes no other llama.cpp call on that
 * context between the two (asrkf_edge.llama.Context waits first in every call). POSIX threads only; elsewhere the
 * symbols are absent and the Python side decodes in its own thread (the same results, no overlap).
 */
#if !defined(_WIN32)
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#define EXPORT __attribute__((visibility("default")))

/* include/llama.h's struct llama_batch (passed by value to llama_decode). */
typedef struct {
    int32_t n_tokens;
    int32_t *token;
    float *embd;
    int32_t *pos;
    int32_t *n_seq_id;
    int32_t **seq_id;
    int8_t *logits;
} llama_batch;

typedef int32_t (*decode_fn)(void *ctx, llama_batch batch);

typedef struct {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    decode_fn decode;
    void *ctx;
    llama_batch batch;
    int64_t spin_ns; /* how long either side spins on the state before it sleeps */
    int32_t rc;
    int64_t started, done; /* CLOCK_MONOTONIC ns around the last llama_decode (benchmarks' timelines) */
    int state;       /* IDLE, POSTED (a batch handed over) or DONE (rc set); changed under the lock, read spinning */
    int quit;
} decoder;

enum { IDLE = 0, POSTED = 1, DONE = 2 };

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Spin until the state leaves ``from`` or ``spin_ns`` pass; whether it left. A thread woken from a sleep cost about
 * 0.35 ms a token on an H100's VM host (LLaMA-3-8B shape, 16k: 126 against 132 tok/s), so the caller spins longer
 * than a decode (asrkf_edge.llama.DECODE_SPIN_NS); the spin is bounded so an idle decoder sleeps. */
static int spin_while(decoder *d, int from) {
    if (d->spin_ns <= 0) return __atomic_load_n(&d->state, __ATOMIC_ACQUIRE) != from;
    int64_t until = now_ns() + d->spin_ns;
    for (unsigned i = 1;; i++) {
        if (__atomic_load_n(&d->state, __ATOMIC_ACQUIRE) != from) return 1;
        relax();
        if ((i & 255) == 0 && now_ns() > until) return 0;
    }
}

static void *run(void *arg) {
    decoder *d = (decoder *)arg;
    for (;;) {
        spin_while(d, IDLE);
        pthread_mutex_lock(&d->lock);
        while (d->state != POSTED && !d->quit) pthread_cond_wait(&d->cond, &d->lock);
        if (d->quit) {
            pthread_mutex_unlock(&d->lock);
            return NULL;
        }
        pthread_mutex_unlock(&d->lock);
        int64_t started = now_ns();
        int32_t rc = d->decode(d->ctx, d->batch);
        int64_t done = now_ns();
        pthread_mutex_lock(&d->lock);
        d->rc = rc;
        d->started = started;
        d->done = done;
        __atomic_store_n(&d->state, DONE, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&d->cond);
        pthread_mutex_unlock(&d->lock);
        spin_while(d, DONE); /* the next batch usually comes within a token's host work */
    }
}

/* A decoder calling ``decode`` (llama_decode) on ``ctx``; ``spin_ns``: how long each side spins before it sleeps (0 on
 * a CPU-only host, where a spinning thread would take a core from llama.cpp's own). */
EXPORT decoder *asrkf_decoder_new(decode_fn decode, void *ctx, int64_t spin_ns) {
    decoder *d = (decoder *)calloc(1, sizeof(decoder));
    if (!d) return NULL;
    d->decode = decode;
    d->ctx = ctx;
    d->spin_ns = spin_ns;
    pthread_mutex_init(&d->lock, NULL);
    pthread_cond_init(&d->cond, NULL);
    if (pthread_create(&d->thread, NULL, run, d) != 0) {
        pthread_mutex_destroy(&d->lock);
        pthread_cond_destroy(&d->cond);
        free(d);
        return NULL;
    }
    return d;
}

/* Start decoding ``batch`` (its arrays are read by the decode: unchanged until the wait). Returns 0, or -1 when a
 * decode is in flight or its code not yet taken. */
EXPORT int32_t asrkf_decoder_launch(decoder *d, const llama_batch *batch) {
    pthread_mutex_lock(&d->lock);
    if (d->state != IDLE) {
        pthread_mutex_unlock(&d->lock);
        return -1;
    }
    d->batch = *batch;
    __atomic_store_n(&d->state, POSTED, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
    return 0;
}

/* Wait for the decode in flight and take llama_decode's return code (0 when none was in flight). */
EXPORT int32_t asrkf_decoder_wait(decoder *d) {
    spin_while(d, POSTED);
    pthread_mutex_lock(&d->lock);
    while (d->state == POSTED) pthread_cond_wait(&d->cond, &d->lock);
    int32_t rc = d->state == DONE ? d->rc : 0;
    __atomic_store_n(&d->state, IDLE, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&d->lock);
    return rc;
}

/* When the last decode began and ended (CLOCK_MONOTONIC ns) into span[0] and span[1]; read after its wait. */
EXPORT void asrkf_decoder_span(decoder *d, int64_t *span) {
    pthread_mutex_lock(&d->lock);
    span[0] = d->started;
    span[1] = d->done;
    pthread_mutex_unlock(&d->lock);
}

/* Finish what is in flight, stop the thread, free the decoder. */
EXPORT void asrkf_decoder_free(decoder *d) {
    if (!d) return;
    asrkf_decoder_wait(d);
    pthread_mutex_lock(&d->lock);
    d->quit = 1;
    pthread_cond_broadcast(&d->cond);
    pthread_mutex_unlock(&d->lock);
    pthread_join(d->thread, NULL);
    pthread_mutex_destroy(&d->lock);
    pthread_cond_destroy(&d->cond);
    free(d);
}
#else
typedef int asrkf_decoder_unavailable; /* ISO C wants a declaration in every translation unit */
#endif
