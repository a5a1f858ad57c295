/*
 * util.h - allocation helpers and the monotonic clock.
 *
 * Owns nothing.  The x* allocators exit on failure and are used only where
 * running out of memory leaves nothing sensible to do.
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

/* Milliseconds and microseconds of CLOCK_MONOTONIC. */
uint64_t util_now_ms(void);
uint64_t util_now_us(void);

/* Constant-time equality of two byte strings (length leaks, content not). */
bool util_secret_equal(const char *a, size_t alen, const char *b, size_t blen);

/* Overwrite a secret before freeing it. */
void util_secret_free(char *s);

/* ASCII case-insensitive comparison of n bytes / of NUL-terminated strings. */
bool util_ieq(const char *a, const char *b);
bool util_ieqn(const char *a, size_t alen, const char *b);

#endif
