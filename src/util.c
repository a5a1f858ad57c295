/* util.c - allocation helpers and counters, heap figures, clock, secrets. */
#include "util.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif
#ifdef __SANITIZE_ADDRESS__
/* From the sanitizer runtime (GCC ships no header declaring it). */
size_t __sanitizer_get_current_allocated_bytes(void);
#endif
#include <event2/event.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

const char *const util_alloc_by_names[UTIL_ALLOC_COUNT] = {
	"imapshim", "libevent", "openssl",
};

static uint64_t util_nalloc[UTIL_ALLOC_COUNT];

uint64_t
util_allocations(enum util_alloc_by by)
{
	return util_nalloc[by];
}

static void *
util_ev_malloc(size_t n)
{
	util_nalloc[UTIL_ALLOC_LIBEVENT]++;
	return malloc(n);
}

static void *
util_ev_realloc(void *p, size_t n)
{
	util_nalloc[UTIL_ALLOC_LIBEVENT]++;
	return realloc(p, n);
}

static void *
util_ssl_malloc(size_t n, const char *file, int line)
{
	(void)file;
	(void)line;
	util_nalloc[UTIL_ALLOC_OPENSSL]++;
	return malloc(n);
}

static void *
util_ssl_realloc(void *p, size_t n, const char *file, int line)
{
	(void)file;
	(void)line;
	util_nalloc[UTIL_ALLOC_OPENSSL]++;
	return realloc(p, n);
}

static void
util_ssl_free(void *p, const char *file, int line)
{
	(void)file;
	(void)line;
	free(p);
}

void
util_count_allocations(void)
{
	event_set_mem_functions(util_ev_malloc, util_ev_realloc, free);
	/* Refused (0) once OpenSSL has allocated: then it goes uncounted. */
	(void)CRYPTO_set_mem_functions(util_ssl_malloc, util_ssl_realloc,
	    util_ssl_free);
}

size_t
util_heap_in_use(void)
{
#if defined(__SANITIZE_ADDRESS__)
	/* AddressSanitizer's allocator replaces glibc's. */
	return __sanitizer_get_current_allocated_bytes();
#elif defined(__GLIBC__)
	return mallinfo2().uordblks;
#else
	return 0;
#endif
}

void
util_heap_setup(void)
{
#ifdef __GLIBC__
	/* Fixed thresholds turn off glibc's sliding ones: after one large
	 * buffer (a literal, a replay copy) is freed, glibc would serve every
	 * later buffer up to that size from the heap and keep up to twice it
	 * free at the heap's top; RSS would then follow the biggest burst
	 * seen, not what the clients hold.  Buffers over 256 KiB stay
	 * mmap()ed (given back on free; smaller ones, such as a 60 KB
	 * message's, cost no system call); a free heap top over 512 KiB is
	 * returned at once.  One arena: imapshim allocates from one thread. */
	(void)mallopt(M_MMAP_THRESHOLD, 256 * 1024);
	(void)mallopt(M_TRIM_THRESHOLD, 512 * 1024);
	(void)mallopt(M_ARENA_MAX, 1);
#endif
}

#ifdef __GLIBC__
/* Resident bytes of the process (/proc/self/statm), 0 if unknown. */
static size_t
util_rss(void)
{
	unsigned long size, resident;
	FILE *f = fopen("/proc/self/statm", "r");
	int n;

	if (f == NULL)
		return 0;
	n = fscanf(f, "%lu %lu", &size, &resident);
	fclose(f);
	return n == 2 ? (size_t)resident * (size_t)sysconf(_SC_PAGESIZE) : 0;
}
#endif

void
util_heap_trim(size_t min_slack)
{
#ifdef __GLIBC__
	/* Resident memory the heap does not use: after a trim, what could
	 * not be given back (code, libraries, partly used pages). */
	static size_t trim_floor;
	size_t rss = util_rss(), used = mallinfo2().uordblks;
	size_t slack = rss > used ? rss - used : 0;

	/* Freed memory stays on malloc's free lists after malloc_trim()
	 * (only its pages go back), so "free bytes" cannot say whether a
	 * trim is due; pages that became resident again can. */
	if (rss == 0 || slack < trim_floor + min_slack) {
		if (slack < trim_floor)
			trim_floor = slack;
		return;
	}
	(void)malloc_trim(0);
	rss = util_rss();
	trim_floor = rss > used ? rss - used : 0;
#else
	(void)min_slack;
#endif
}

static void
util_oom(void)
{
	fputs("imapshim: out of memory\n", stderr);
	abort();
}

void *
xmalloc(size_t n)
{
	void *p;

	util_nalloc[UTIL_ALLOC_IMAPSHIM]++;
	p = malloc(n ? n : 1);

	if (p == NULL)
		util_oom();
	return p;
}

void *
xcalloc(size_t nmemb, size_t n)
{
	void *p;

	util_nalloc[UTIL_ALLOC_IMAPSHIM]++;
	p = calloc(nmemb ? nmemb : 1, n ? n : 1);

	if (p == NULL)
		util_oom();
	return p;
}

void *
xrealloc(void *p, size_t n)
{
	util_nalloc[UTIL_ALLOC_IMAPSHIM]++;
	p = realloc(p, n ? n : 1);
	if (p == NULL)
		util_oom();
	return p;
}

char *
xstrdup(const char *s)
{
	return xstrndup(s, strlen(s));
}

char *
xstrndup(const char *s, size_t n)
{
	char *p = xmalloc(n + 1);

	memcpy(p, s, n);
	p[n] = '\0';
	return p;
}

uint64_t
util_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

uint64_t
util_now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

bool
util_secret_equal(const char *a, size_t alen, const char *b, size_t blen)
{
	if (alen != blen)
		return false;
	return CRYPTO_memcmp(a, b, alen) == 0;
}

void
util_secret_free(char *s)
{
	if (s == NULL)
		return;
	OPENSSL_cleanse(s, strlen(s));
	free(s);
}

bool
util_ieq(const char *a, const char *b)
{
	return strcasecmp(a, b) == 0;
}

bool
util_ieqn(const char *a, size_t alen, const char *b)
{
	return strlen(b) == alen && strncasecmp(a, b, alen) == 0;
}

void
util_assert_fail(const char *expr, const char *file, int line, const char *func)
{
	log_error("assertion_failed", "expr=%s file=%s line=%d func=%s",
	    log_v(expr), file, line, func);
#ifdef IMAPSHIM_DEBUG
	abort();
#endif
}
