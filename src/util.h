/*
 * util.h - allocation helpers, allocation counters and the monotonic clock.
 *
 * Owns the process's allocation counters, nothing else.  The x* allocators
 * exit on failure and are used only where running out of memory leaves
 * nothing sensible to do.
 */
#ifndef UTIL_H
#define UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

void *xmalloc(size_t n);
void *xcalloc(size_t nmemb, size_t n);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);

/*
 * Heap allocation calls (malloc, calloc, realloc) by who made them: the
 * x* allocators above, libevent and OpenSSL (their allocators are routed
 * through counting wrappers by util_count_allocations(), which must run
 * before either library allocates anything).  Shown in /metrics, so that
 * "nothing is allocated per relayed command" can be checked on a live
 * daemon.
 */
enum util_alloc_by {
	UTIL_ALLOC_IMAPSHIM,
	UTIL_ALLOC_LIBEVENT,
	UTIL_ALLOC_OPENSSL,
	UTIL_ALLOC_COUNT
};
extern const char *const util_alloc_by_names[UTIL_ALLOC_COUNT];
void util_count_allocations(void);
uint64_t util_allocations(enum util_alloc_by by);

/* Bytes of heap in use (glibc's mallinfo2; 0 elsewhere). */
size_t util_heap_in_use(void);

/* malloc settings for a long-lived, single-threaded server (call first). */
void util_heap_setup(void);

/* Return free heap pages to the system once resident memory exceeds the
 * heap in use by min_slack bytes more than after the last trim: after a
 * burst of TLS handshakes, so that RSS follows live memory. */
void util_heap_trim(size_t min_slack);

/* Milliseconds and microseconds of CLOCK_MONOTONIC. */
uint64_t util_now_ms(void);
uint64_t util_now_us(void);

/* Constant-time equality of two byte strings (length leaks, content not). */
bool util_secret_equal(const char *a, size_t alen, const char *b, size_t blen);

/* Overwrite a secret before freeing it. */
void util_secret_free(char *s);

/*
 * An invariant of the code (a budget counter, a legal state transition).
 * Broken, it is logged as an error; debug and sanitizer builds abort, so
 * the tests catch it where it happens.
 */
#define IMAPSHIM_ASSERT(e) \
	((e) ? (void)0 : util_assert_fail(#e, __FILE__, __LINE__, __func__))
void util_assert_fail(const char *expr, const char *file, int line,
    const char *func);

/* ASCII case-insensitive comparison of n bytes / of NUL-terminated strings. */
bool util_ieq(const char *a, const char *b);
bool util_ieqn(const char *a, size_t alen, const char *b);

#endif
