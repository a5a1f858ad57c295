/*
 * fuzz_response.c - libFuzzer harness for the upstream response framer and
 * imap_parse_response().
 *
 * Input: 2 header bytes (chunking seed), then the byte stream an upstream
 * server sends.  It is framed with the daemon's upstream limits
 * (IMAPSHIM_UPSTREAM_LINE_MAX, no literal limit) twice, all at once and in
 * pseudo-random chunks; each response's first line goes through
 * imap_parse_response().  Properties checked:
 *
 *   - frames cover given bytes, LINE frames end at their first LF, literal
 *     frames add up to the announced size, and both feedings agree;
 *   - the classification of a line does not depend on its CRLF, every
 *     pointer it returns lies inside the line, a TAGGED response has a
 *     valid tag at the start and OK/NO/BAD, a continuation has no status,
 *     and a response code lies between '[' and ']'.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imap_parse.h"
#include "imapshim.h"

#define CHECK(cond) do { \
	if (!(cond)) { \
		fprintf(stderr, "%s:%d: property failed: %s\n", __FILE__, \
		    __LINE__, #cond); \
		abort(); \
	} \
} while (0)

#define FZ_MAX_INPUT 65536

static bool
in_line(const char *p, size_t n, const char *line, size_t len)
{
	return p >= line && p <= line + len && n <= (size_t)(line + len - p);
}

static bool
tag_char_ok(unsigned char c)
{
	return c > 0x20 && c < 0x7f && strchr("(){%*\"\\+", c) == NULL;
}

/* Classify one line and check the result; returns a digest of it. */
static uint64_t
resp_check(const char *line, size_t len)
{
	struct imap_resp r, r2;
	char *dup;
	size_t tlen = len, i;

	imap_parse_response(line, len, &r);
	CHECK(r.kind >= IMAP_RESP_UNTAGGED && r.kind <= IMAP_RESP_INVALID);
	CHECK(r.status >= IMAP_ST_NONE && r.status <= IMAP_ST_PREAUTH);
	if (tlen > 0 && line[tlen - 1] == '\n')
		tlen--;
	if (tlen > 0 && line[tlen - 1] == '\r')
		tlen--;
	if (r.text != NULL)
		CHECK(in_line(r.text, r.text_len, line, tlen));
	if (r.code != NULL) {
		CHECK(in_line(r.code, r.code_len, line, tlen));
		CHECK(r.code > line && r.code[-1] == '[');
		CHECK(r.code + r.code_len < line + tlen &&
		    r.code[r.code_len] == ']');
	}
	switch (r.kind) {
	case IMAP_RESP_TAGGED:
		CHECK(r.status == IMAP_ST_OK || r.status == IMAP_ST_NO ||
		    r.status == IMAP_ST_BAD);
		CHECK(r.tag.p == line && r.tag.len > 0 && r.tag.len < tlen);
		for (i = 0; i < r.tag.len; i++)
			CHECK(tag_char_ok((unsigned char)line[i]));
		CHECK(line[r.tag.len] == ' ');
		break;
	case IMAP_RESP_CONTINUATION:
		CHECK(line[0] == '+');
		CHECK(r.status == IMAP_ST_NONE);
		break;
	case IMAP_RESP_UNTAGGED:
		CHECK(tlen >= 2 && line[0] == '*' && line[1] == ' ');
		break;
	case IMAP_RESP_INVALID:
		CHECK(r.code == NULL);
		break;
	}

	/* The same line without its line ending: the same answer, at the
	 * same offsets (a heap copy, so reads past the end are caught).
	 * Text ending in CR is itself stripped once more: skip those. */
	if (tlen > 0 && line[tlen - 1] == '\r')
		goto out;
	dup = malloc(tlen + 1);
	CHECK(dup != NULL);
	memcpy(dup, line, tlen);
	imap_parse_response(dup, tlen, &r2);
	CHECK(r2.kind == r.kind && r2.status == r.status);
	CHECK((r2.code == NULL) == (r.code == NULL));
	if (r.code != NULL)
		CHECK(r2.code - dup == r.code - line && r2.code_len == r.code_len);
	if (r.text != NULL && r2.text != NULL)
		CHECK(r2.text - dup == r.text - line && r2.text_len == r.text_len);
	CHECK(r2.tag.len == r.tag.len);
	free(dup);
out:
	return (uint64_t)r.kind * 1000003u + (uint64_t)r.status * 7919u +
	    r.code_len * 31u + r.text_len + r.tag.len * 131u;
}

struct run {
	struct imap_framer fr;
	bool in_cmd, in_lit;
	bool discarding;	/* after an absurd {n+} */
	uint64_t lit_size, lit_got;
	uint64_t digest;	/* over the frame contents, order sensitive */
	size_t consumed;
	size_t lines, lits;
};

static void
mix(uint64_t *d, const void *p, size_t n)
{
	const unsigned char *c = p;
	size_t i;

	for (i = 0; i < n; i++)
		*d = (*d ^ c[i]) * 1099511628211ull;
}

static size_t
on_frame(struct run *r, const char *buf, size_t have,
    const struct imap_frame *fr)
{
	uint64_t x;

	CHECK(fr->len <= have);
	switch (fr->kind) {
	case IMAP_FR_MORE:
		/* Only the octets of an absurd {n+} are ever discarded. */
		CHECK(fr->len == 0 || r->discarding);
		return fr->len;
	case IMAP_FR_LINE:
		CHECK(!r->in_lit);
		CHECK(fr->len > 0 && memchr(buf, '\n', fr->len) ==
		    buf + fr->len - 1);
		CHECK(fr->first == !r->in_cmd);
		/* With no literal limit only an absurd count (> 2^63) is
		 * "too big"; the framer then ends the response there.  The
		 * daemon's upstream reader must treat that as a protocol
		 * failure (see the fuzz README in run-fuzz.sh). */
		if (fr->lit_toobig)
			CHECK(fr->last && fr->lit_size > ((uint64_t)1 << 63));
		r->discarding = fr->lit_toobig && fr->lit_nonsync;
		if (fr->has_lit && !fr->lit_toobig) {
			CHECK(!fr->last);
			r->in_lit = true;
			r->lit_size = fr->lit_size;
			r->lit_got = 0;
		}
		r->in_cmd = !fr->last;
		if (fr->first) {
			x = resp_check(buf, fr->len);
			mix(&r->digest, &x, sizeof(x));
		}
		mix(&r->digest, "L", 1);
		mix(&r->digest, buf, fr->len);
		r->lines++;
		return fr->len;
	case IMAP_FR_LITERAL:
		CHECK(r->in_lit);
		CHECK(fr->len <= r->lit_size - r->lit_got);
		r->lit_got += fr->len;
		CHECK(fr->lit_end == (r->lit_got == r->lit_size));
		if (fr->lit_end)
			r->in_lit = false;
		/* Pieces are mixed without a separator: chunking must not
		 * change the digest. */
		mix(&r->digest, buf, fr->len);
		if (fr->lit_end)
			mix(&r->digest, "E", 1);
		r->lits++;
		return fr->len;
	case IMAP_FR_OVERFLOW:
		/* A 1 MiB line cannot be in a 64 KiB input. */
		CHECK(!"overflow below the line limit");
		return fr->len;
	default:
		CHECK(!"unknown frame kind");
	}
	return 0;
}

static void
feed(struct run *r, const uint8_t *data, size_t size, uint32_t seed, bool whole)
{
	char *pend = malloc(size + 1);
	size_t have = 0, pos = 0, n, used;
	struct imap_frame fr;
	uint32_t rnd = seed | 1;

	CHECK(pend != NULL);
	imap_framer_init(&r->fr, IMAPSHIM_UPSTREAM_LINE_MAX, UINT64_MAX);
	r->digest = 14695981039346656037ull;
	while (pos < size) {
		if (whole)
			n = size - pos;
		else {
			rnd ^= rnd << 13; rnd ^= rnd >> 17; rnd ^= rnd << 5;
			n = 1 + rnd % 61;
			if (n > size - pos)
				n = size - pos;
		}
		memcpy(pend + have, data + pos, n);
		have += n;
		pos += n;
		for (;;) {
			imap_framer_next(&r->fr, pend, have, &fr);
			used = on_frame(r, pend, have, &fr);
			if (used > 0) {
				memmove(pend, pend + used, have - used);
				have -= used;
				r->consumed += used;
			}
			if (fr.kind == IMAP_FR_MORE && used == 0)
				break;
			if (used == 0)
				CHECK(fr.kind == IMAP_FR_LITERAL && fr.lit_end);
		}
	}
	free(pend);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct run a, b;
	uint32_t seed;
	const char *p, *end, *lf;

	if (size < 2 || size > FZ_MAX_INPUT)
		return 0;
	seed = (uint32_t)data[0] << 8 | data[1];
	data += 2;
	size -= 2;

	memset(&a, 0, sizeof(a));
	memset(&b, 0, sizeof(b));
	feed(&a, data, size, seed, true);
	feed(&b, data, size, seed, false);
	CHECK(a.consumed == b.consumed);
	CHECK(a.lines == b.lines);
	CHECK(a.digest == b.digest);

	/* Every raw line, framed or not, classifies safely. */
	p = (const char *)data;
	end = p + size;
	while (p < end) {
		lf = memchr(p, '\n', (size_t)(end - p));
		if (lf == NULL) {
			(void)resp_check(p, (size_t)(end - p));
			break;
		}
		(void)resp_check(p, (size_t)(lf + 1 - p));
		p = lf + 1;
	}
	return 0;
}
