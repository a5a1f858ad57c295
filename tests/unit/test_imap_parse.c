/*
 * test_imap_parse.c - unit tests for the IMAP framer, lexer and helpers.
 *
 * The framer is checked by rendering every frame sequence as text and
 * comparing it with the expected rendering, for the input fed whole, one
 * byte at a time, split at every offset and in pseudo-random chunks: the
 * frames must not depend on how the bytes arrive (as in Dovecot's tests).
 */
#include "imap_parse.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define S(lit)	lit, sizeof(lit) - 1

/* ------------------------------------------------------ framer harness */

struct fr_run {
	char out[16384];
	size_t olen;
	char lit[8192];
	size_t litlen;
	bool in_lit;
	size_t disc;
	bool in_disc;
};

static void
run_printf(struct fr_run *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
run_printf(struct fr_run *r, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(r->out + r->olen, sizeof(r->out) - r->olen, fmt, ap);
	va_end(ap);
	assert_true(n >= 0 && (size_t)n < sizeof(r->out) - r->olen);
	r->olen += (size_t)n;
}

static void
run_flush_disc(struct fr_run *r)
{
	if (r->in_disc)
		run_printf(r, "X%zu\n", r->disc);
	r->in_disc = false;
	r->disc = 0;
}

/*
 * Render one frame.  LINE: "L[flags] n=.. m=.. <text> eN" where flags are
 * f(irst) l(ast) y(has_lit) +(nonsync) !(toobig).  LITERAL octets are
 * gathered into one "D<...>" per literal; OVERFLOW is "Of"/"On" and the
 * bytes swallowed with it and after it are summed into one "X<n>".
 */
static void
run_record(struct fr_run *r, const struct imap_frame *f, const char *p)
{
	switch (f->kind) {
	case IMAP_FR_LINE:
		run_flush_disc(r);
		assert_false(r->in_lit);
		assert_true(f->text_len < f->len);
		assert_true(f->len - f->text_len <= 2);
		assert_int_equal(p[f->len - 1], '\n');
		if (f->has_lit) {
			assert_true(f->marker_off < f->text_len);
			assert_true(p[f->marker_off] == '{' ||
			    p[f->marker_off] == '~');
			assert_int_equal(p[f->text_len - 1], '}');
		}
		run_printf(r, "L[%s%s%s%s%s]", f->first ? "f" : "",
		    f->last ? "l" : "", f->has_lit ? "y" : "",
		    f->lit_nonsync ? "+" : "", f->lit_toobig ? "!" : "");
		if (f->has_lit)
			run_printf(r, " n=%llu m=%zu",
			    (unsigned long long)f->lit_size, f->marker_off);
		run_printf(r, " <%.*s> e%zu\n", (int)f->text_len, p,
		    f->len - f->text_len);
		r->in_lit = f->has_lit && !f->lit_toobig;
		r->in_disc = f->lit_toobig && f->lit_nonsync;
		break;
	case IMAP_FR_LITERAL:
		run_flush_disc(r);
		assert_true(r->in_lit);
		assert_true(r->litlen + f->len <= sizeof(r->lit));
		memcpy(r->lit + r->litlen, p, f->len);
		r->litlen += f->len;
		if (f->lit_end) {
			run_printf(r, "D<%.*s>\n", (int)r->litlen, r->lit);
			r->litlen = 0;
			r->in_lit = false;
		}
		break;
	case IMAP_FR_OVERFLOW:
		run_flush_disc(r);
		assert_false(r->in_lit);
		run_printf(r, "O%s\n", f->overflow_first ? "f" : "n");
		r->in_disc = true;
		r->disc = f->len;
		break;
	case IMAP_FR_MORE:
		/* Only a discard may consume bytes without a frame. */
		assert_true(f->len > 0);
		assert_true(r->in_disc);
		r->disc += f->len;
		break;
	}
}

/*
 * Feed in[0..n) in chunks (first chunk `first`, then `step`, or random
 * sizes 1..7 when step is 0 and seed is set) and render the frames.
 */
static const char *
fr_feed(size_t line_max, uint64_t lit_max, const char *in, size_t n,
    size_t first, size_t step, unsigned seed)
{
	static struct fr_run r;
	struct imap_framer fr;
	struct imap_frame f;
	size_t start = 0, avail, idle = 0;

	memset(&r, 0, sizeof(r));
	imap_framer_init(&fr, line_max, lit_max);
	avail = first < n ? first : n;
	for (;;) {
		size_t have = avail - start;

		imap_framer_next(&fr, in + start, have, &f);
		if (f.kind == IMAP_FR_MORE && f.len == 0) {
			/* A partial line is remembered as scanned: linear.
			 * (State 0 is the framer's private "scanning a line".) */
			if (fr.fr_state == 0)
				assert_int_equal(fr.fr_scanned, have);
			if (avail == n)
				break;
			if (step == 0) {
				seed = seed * 1103515245u + 12345u;
				avail += 1 + (seed >> 16) % 7;
			} else
				avail += step;
			if (avail > n)
				avail = n;
			continue;
		}
		assert_true(f.len <= have);
		/* Zero-length frames (an empty literal) cannot repeat. */
		idle = f.len == 0 ? idle + 1 : 0;
		assert_true(idle < 2);
		run_record(&r, &f, in + start);
		start += f.len;
	}
	run_flush_disc(&r);
	if (r.in_lit)
		run_printf(&r, "D~<%.*s>\n", (int)r.litlen, r.lit);
	if (!imap_framer_at_boundary(&fr))
		run_printf(&r, "P\n");
	if (start != n)
		run_printf(&r, "R%zu\n", n - start);
	return r.out;
}

/* The same rendering whatever the chunking. */
static void
check_frames(size_t line_max, uint64_t lit_max, const char *in, size_t n,
    const char *want)
{
	char whole[sizeof(((struct fr_run *)0)->out)];
	size_t k;
	unsigned seed;

	snprintf(whole, sizeof(whole), "%s",
	    fr_feed(line_max, lit_max, in, n, n, n, 0));
	assert_string_equal(whole, want);
	assert_string_equal(fr_feed(line_max, lit_max, in, n, 1, 1, 0), want);
	for (k = 1; k < n; k++)
		assert_string_equal(fr_feed(line_max, lit_max, in, n, k, n, 0),
		    want);
	for (seed = 1; seed <= 8; seed++)
		assert_string_equal(fr_feed(line_max, lit_max, in, n, 1, 0,
		    seed), want);
}

#define BIG	((uint64_t)1 << 40)
#define CHECK(lm, lx, input, want) \
	check_frames((lm), (lx), S(input), (want))

/* ----------------------------------------------------------- framing */

static void
test_fr_simple_line(void **state)
{
	(void)state;
	CHECK(1000, BIG, "A1 NOOP\r\n", "L[fl] <A1 NOOP> e2\n");
	/* Bare LF ends a line too. */
	CHECK(1000, BIG, "A1 NOOP\n", "L[fl] <A1 NOOP> e1\n");
	/* A CR not before LF is text. */
	CHECK(1000, BIG, "A1 X\rY\r\n", "L[fl] <A1 X\rY> e2\n");
	CHECK(1000, BIG, "\r\n", "L[fl] <> e2\n");
	CHECK(1000, BIG, "\n\n", "L[fl] <> e1\nL[fl] <> e1\n");
}

static void
test_fr_partial_line(void **state)
{
	(void)state;
	/* No LF yet: nothing consumed, bytes stay pending. */
	CHECK(1000, BIG, "A1 NOOP", "P\nR7\n");
	CHECK(1000, BIG, "A1 NOOP\r", "P\nR8\n");
	CHECK(1000, BIG, "A1 NOOP\r\nA2 NO", "L[fl] <A1 NOOP> e2\nP\nR5\n");
}

static void
test_fr_pipelined(void **state)
{
	(void)state;
	CHECK(1000, BIG, "A1 NOOP\r\nA2 CAPABILITY\nA3 LOGOUT\r\n",
	    "L[fl] <A1 NOOP> e2\n"
	    "L[fl] <A2 CAPABILITY> e1\n"
	    "L[fl] <A3 LOGOUT> e2\n");
	CHECK(1000, BIG,
	    "A1 LOGIN {4+}\r\nuser pw\r\nA2 SELECT {5+}\r\nINBOX\r\nA3 NOOP\r\n",
	    "L[fy+] n=4 m=9 <A1 LOGIN {4+}> e2\n"
	    "D<user>\n"
	    "L[l] < pw> e2\n"
	    "L[fy+] n=5 m=10 <A2 SELECT {5+}> e2\n"
	    "D<INBOX>\n"
	    "L[l] <> e2\n"
	    "L[fl] <A3 NOOP> e2\n");
}

static void
test_fr_sync_literal(void **state)
{
	(void)state;
	CHECK(1000, BIG, "A1 LOGIN {4}\r\nuser {6}\r\nsecret\r\n",
	    "L[fy] n=4 m=9 <A1 LOGIN {4}> e2\n"
	    "D<user>\n"
	    "L[y] n=6 m=1 < {6}> e2\n"
	    "D<secret>\n"
	    "L[l] <> e2\n");
	/* Octets are counted, never scanned for CRLF or markers. */
	CHECK(1000, BIG, "A1 APPEND box {12}\r\nA2 NOOP\r\n{1}\r\nA3 NOOP\r\n",
	    "L[fy] n=12 m=14 <A1 APPEND box {12}> e2\n"
	    "D<A2 NOOP\r\n{1}>\n"
	    "L[l] <> e2\n"
	    "L[fl] <A3 NOOP> e2\n");
	/* Bare LF after the marker. */
	CHECK(1000, BIG, "A1 LOGIN {1}\nu {1}\np\n",
	    "L[fy] n=1 m=9 <A1 LOGIN {1}> e1\n"
	    "D<u>\n"
	    "L[y] n=1 m=1 < {1}> e1\n"
	    "D<p>\n"
	    "L[l] <> e1\n");
	/* Leading zeros are still digits. */
	CHECK(1000, BIG, "A1 X {003}\r\nabc\r\n",
	    "L[fy] n=3 m=5 <A1 X {003}> e2\nD<abc>\nL[l] <> e2\n");
}

static void
test_fr_nonsync_and_literal8(void **state)
{
	(void)state;
	CHECK(1000, BIG, "A1 APPEND box (\\Seen) {5+}\r\nhello\r\n",
	    "L[fy+] n=5 m=22 <A1 APPEND box (\\Seen) {5+}> e2\n"
	    "D<hello>\n"
	    "L[l] <> e2\n");
	CHECK(1000, BIG, "A1 APPEND box ~{3}\r\na\0b\r\n",
	    "L[fy] n=3 m=14 <A1 APPEND box ~{3}> e2\n"
	    "D<a>\n"		/* %.*s stops at the NUL */
	    "L[l] <> e2\n");
	CHECK(1000, BIG, "A1 APPEND box ~{2+}\r\nhi\r\n",
	    "L[fy+] n=2 m=14 <A1 APPEND box ~{2+}> e2\n"
	    "D<hi>\n"
	    "L[l] <> e2\n");
	/* Only the last '~' belongs to the marker. */
	CHECK(1000, BIG, "A1 X ~~{1}\r\nz\r\n",
	    "L[fy] n=1 m=6 <A1 X ~~{1}> e2\nD<z>\nL[l] <> e2\n");
}

static void
test_fr_literal8_nul_octets(void **state)
{
	static const char in[] = "A1 APPEND b ~{3}\r\na\0b\r\n";
	struct imap_framer fr;
	struct imap_frame f;
	size_t off;

	(void)state;
	imap_framer_init(&fr, 1000, BIG);
	imap_framer_next(&fr, in, sizeof(in) - 1, &f);
	assert_int_equal(f.kind, IMAP_FR_LINE);
	off = f.len;
	imap_framer_next(&fr, in + off, sizeof(in) - 1 - off, &f);
	assert_int_equal(f.kind, IMAP_FR_LITERAL);
	assert_int_equal(f.len, 3);
	assert_true(f.lit_end);
	assert_memory_equal(in + off, "a\0b", 3);
}

static void
test_fr_zero_literal(void **state)
{
	struct imap_framer fr;
	struct imap_frame f;

	(void)state;
	CHECK(1000, BIG, "A1 X {0}\r\n\r\nA2 NOOP\r\n",
	    "L[fy] n=0 m=5 <A1 X {0}> e2\n"
	    "D<>\n"
	    "L[l] <> e2\n"
	    "L[fl] <A2 NOOP> e2\n");
	CHECK(1000, BIG, "A1 X {0+}\r\n Y\r\n",
	    "L[fy+] n=0 m=5 <A1 X {0+}> e2\nD<>\nL[l] < Y> e2\n");

	/* The empty literal's frame needs no bytes at all. */
	imap_framer_init(&fr, 1000, BIG);
	imap_framer_next(&fr, S("A1 X {0}\r\n"), &f);
	assert_int_equal(f.kind, IMAP_FR_LINE);
	assert_false(f.last);
	imap_framer_next(&fr, "", 0, &f);
	assert_int_equal(f.kind, IMAP_FR_LITERAL);
	assert_int_equal(f.len, 0);
	assert_true(f.lit_end);
	assert_false(imap_framer_at_boundary(&fr));
	imap_framer_next(&fr, S("\r\n"), &f);
	assert_int_equal(f.kind, IMAP_FR_LINE);
	assert_true(f.last);
	assert_false(f.first);
	assert_true(imap_framer_at_boundary(&fr));
}

static void
test_fr_malformed_markers(void **state)
{
	(void)state;
	CHECK(1000, BIG, "A1 X {}\r\n", "L[fl] <A1 X {}> e2\n");
	CHECK(1000, BIG, "A1 X {12a}\r\n", "L[fl] <A1 X {12a}> e2\n");
	CHECK(1000, BIG, "A1 X { 5}\r\n", "L[fl] <A1 X { 5}> e2\n");
	CHECK(1000, BIG, "A1 X {+}\r\n", "L[fl] <A1 X {+}> e2\n");
	CHECK(1000, BIG, "A1 X {5++}\r\n", "L[fl] <A1 X {5++}> e2\n");
	CHECK(1000, BIG, "A1 X {-5}\r\n", "L[fl] <A1 X {-5}> e2\n");
	CHECK(1000, BIG, "A1 X 5}\r\n", "L[fl] <A1 X 5}> e2\n");
	CHECK(1000, BIG, "A1 X {5\r\n", "L[fl] <A1 X {5> e2\n");
	CHECK(1000, BIG, "}\r\n", "L[fl] <}> e2\n");
	/* Not at the end of the line: not a literal. */
	CHECK(1000, BIG, "A1 X {5} Y\r\n", "L[fl] <A1 X {5} Y> e2\n");
	CHECK(1000, BIG, "A1 X {5} \r\n", "L[fl] <A1 X {5} > e2\n");
	/* A line that is only a marker is one. */
	CHECK(1000, BIG, "{1}\r\nx\r\n", "L[fy] n=1 m=0 <{1}> e2\nD<x>\nL[l] <> e2\n");
}

static void
test_fr_server_fetch_literal(void **state)
{
	(void)state;
	CHECK(1000, BIG,
	    "* 1 FETCH (BODY[] {5}\r\nhello)\r\n"
	    "* 2 FETCH (UID 7 BODY[HEADER] {8}\r\nA: b\r\n\r\n FLAGS (\\Seen))\r\n"
	    "A3 OK FETCH completed.\r\n",
	    "L[fy] n=5 m=18 <* 1 FETCH (BODY[] {5}> e2\n"
	    "D<hello>\n"
	    "L[l] <)> e2\n"
	    "L[fy] n=8 m=30 <* 2 FETCH (UID 7 BODY[HEADER] {8}> e2\n"
	    "D<A: b\r\n\r\n>\n"
	    "L[l] < FLAGS (\\Seen))> e2\n"
	    "L[fl] <A3 OK FETCH completed.> e2\n");
	/* Bare "+" continuation from Exchange. */
	CHECK(1000, BIG, "+\r\n", "L[fl] <+> e2\n");
}

static void
test_fr_literal_chunks(void **state)
{
	struct imap_framer fr;
	struct imap_frame f;

	(void)state;
	imap_framer_init(&fr, 1000, BIG);
	assert_true(imap_framer_at_boundary(&fr));
	imap_framer_next(&fr, S("A1 X {10}\r\nabc"), &f);
	assert_int_equal(f.kind, IMAP_FR_LINE);
	assert_int_equal(f.len, 11);
	assert_int_equal(f.text_len, 9);
	assert_true(f.first);
	assert_false(f.last);
	assert_true(f.has_lit);
	assert_false(f.lit_nonsync);
	assert_false(f.lit_toobig);
	assert_int_equal(f.lit_size, 10);
	assert_int_equal(f.marker_off, 5);
	assert_false(imap_framer_at_boundary(&fr));
	imap_framer_next(&fr, S("abc"), &f);
	assert_int_equal(f.kind, IMAP_FR_LITERAL);
	assert_int_equal(f.len, 3);
	assert_false(f.lit_end);
	/* Nothing buffered in a literal: just wait. */
	imap_framer_next(&fr, "", 0, &f);
	assert_int_equal(f.kind, IMAP_FR_MORE);
	assert_int_equal(f.len, 0);
	/* Only the literal's remaining 7 octets are taken. */
	imap_framer_next(&fr, S("defghij)\r\n"), &f);
	assert_int_equal(f.kind, IMAP_FR_LITERAL);
	assert_int_equal(f.len, 7);
	assert_true(f.lit_end);
	assert_false(imap_framer_at_boundary(&fr));
	imap_framer_next(&fr, S(")\r\n"), &f);
	assert_int_equal(f.kind, IMAP_FR_LINE);
	assert_false(f.first);
	assert_true(f.last);
	assert_false(f.has_lit);
	assert_true(imap_framer_at_boundary(&fr));
}

static void
test_fr_more_semantics(void **state)
{
	struct imap_framer fr;
	struct imap_frame f;

	(void)state;
	imap_framer_init(&fr, 1000, BIG);
	imap_framer_next(&fr, S("A1 NO"), &f);
	assert_int_equal(f.kind, IMAP_FR_MORE);
	assert_int_equal(f.len, 0);
	assert_int_equal(fr.fr_scanned, 5);
	assert_false(imap_framer_at_boundary(&fr));
	/* Same bytes again plus more. */
	imap_framer_next(&fr, S("A1 NOOP\r\nA2"), &f);
	assert_int_equal(f.kind, IMAP_FR_LINE);
	assert_int_equal(f.len, 9);
	assert_true(f.first && f.last);
	assert_true(imap_framer_at_boundary(&fr));
	imap_framer_next(&fr, S("A2"), &f);
	assert_int_equal(f.kind, IMAP_FR_MORE);
	assert_int_equal(f.len, 0);
}

static void
test_fr_byte_feed_linear(void **state)
{
	enum { N = 1 << 20 };
	static char line[N];
	struct imap_framer fr;
	struct imap_frame f;
	size_t i;

	(void)state;
	memset(line, 'a', N - 2);
	line[N - 2] = '\r';
	line[N - 1] = '\n';
	imap_framer_init(&fr, N, BIG);
	/* A rescan from 0 each call would be ~5e11 byte reads: hangs. */
	for (i = 1; i < N; i++) {
		imap_framer_next(&fr, line, i, &f);
		assert_int_equal(f.kind, IMAP_FR_MORE);
		assert_int_equal(f.len, 0);
		assert_int_equal(fr.fr_scanned, i);
	}
	imap_framer_next(&fr, line, N, &f);
	assert_int_equal(f.kind, IMAP_FR_LINE);
	assert_int_equal(f.len, N);
	assert_int_equal(f.text_len, N - 2);
}

/*
 * Random streams built from IMAP-ish pieces, with small limits so that
 * overflows, toobig literals and discards all happen: the frames must be
 * the same however the bytes arrive, and the lexer must terminate.
 */
static void
test_fr_random_equivalence(void **state)
{
	static const char *const pieces[] = {
		"A1 ", "x", " ", "{3}\r\n", "{2+}\r\n", "~{1}\r\n", "{9}\r\n",
		"{0}\r\n", "{5+}\r\n", "\r\n", "\n", "\r", "{", "}", "+", "~",
		"0", "7", "\"", "\\", "(", ")",
	};
	char in[160], whole[sizeof(((struct fr_run *)0)->out)];
	unsigned seed = 12345, iter, i;
	size_t n, k, len;
	struct imap_lexer lx;
	struct imap_tok tok;
	int rc;

	(void)state;
	for (iter = 0; iter < 400; iter++) {
		n = 0;
		for (i = 0; i < 24; i++) {
			seed = seed * 1103515245u + 12345u;
			k = (seed >> 16) % (sizeof(pieces) / sizeof(pieces[0]));
			len = strlen(pieces[k]);
			if (n + len > sizeof(in))
				break;
			memcpy(in + n, pieces[k], len);
			n += len;
		}
		snprintf(whole, sizeof(whole), "%s",
		    fr_feed(20, 4, in, n, n, n, 0));
		assert_string_equal(fr_feed(20, 4, in, n, 1, 1, 0), whole);
		for (k = 1; k < n; k++)
			assert_string_equal(fr_feed(20, 4, in, n, k, n, 0),
			    whole);
		assert_string_equal(fr_feed(20, 4, in, n, 1, 0, iter + 1),
		    whole);

		/* Every token makes progress, so at most n + 1 of them. */
		imap_lexer_init(&lx, in, n);
		for (i = 0; i <= n + 1; i++) {
			rc = imap_lex_next(&lx, &tok);
			if (rc == -1 || tok.type == IMAP_TOK_EOL)
				break;
			assert_true(tok.p >= in && tok.p + tok.len <= in + n);
		}
		assert_true(i <= n);
	}
}

/* ------------------------------------------------------------ limits */

static void
test_fr_line_limit_exact(void **state)
{
	(void)state;
	/* "A1 NOOP\r\n" is 9 bytes: 9 fits, 8 does not. */
	CHECK(9, BIG, "A1 NOOP\r\nA2 X\r\n",
	    "L[fl] <A1 NOOP> e2\nL[fl] <A2 X> e2\n");
	CHECK(8, BIG, "A1 NOOP\r\nA2 X\r\n", "Of\nX9\nL[fl] <A2 X> e2\n");
	CHECK(8, BIG, "A1 NOOP\nA2 X\r\n", "L[fl] <A1 NOOP> e1\nL[fl] <A2 X> e2\n");
	/* The limit counts the whole command: 10 + 2 bytes of text. */
	CHECK(12, BIG, "A1 X {1}\r\na\r\nA2 Y\r\n",
	    "L[fy] n=1 m=5 <A1 X {1}> e2\nD<a>\nL[l] <> e2\nL[fl] <A2 Y> e2\n");
	CHECK(11, BIG, "A1 X {1}\r\na\r\nA2 Y\r\n",
	    "L[fy] n=1 m=5 <A1 X {1}> e2\nD<a>\nOn\nX2\nL[fl] <A2 Y> e2\n");
}

static void
test_fr_overflow_first_line(void **state)
{
	(void)state;
	CHECK(16, BIG, "A1 SEARCH TEXT aaaaaaaaaaaaaaaaaa\r\nA2 NOOP\r\n",
	    "Of\nX35\nL[fl] <A2 NOOP> e2\n");
	/* Bare LF. */
	CHECK(16, BIG, "A1 SEARCH TEXT aaaaaaaaaaaaaaaaaa\nA2 NOOP\n",
	    "Of\nX34\nL[fl] <A2 NOOP> e1\n");
	/* Still unfinished: the framer is discarding, not at a boundary. */
	CHECK(16, BIG, "A1 SEARCH TEXT aaaaaaaaaaaaaaaaaa", "Of\nX33\nP\n");
}

static void
test_fr_overflow_later_line(void **state)
{
	(void)state;
	/* 14 + 5 + 2 = 21 fits in 30 ... */
	CHECK(30, BIG, "A1 LOGIN {4}\r\nuser pass\r\nA2 NOOP\r\n",
	    "L[fy] n=4 m=9 <A1 LOGIN {4}> e2\n"
	    "D<user>\n"
	    "L[l] < pass> e2\n"
	    "L[fl] <A2 NOOP> e2\n");
	/* ... and 14 + 27 does not. */
	CHECK(30, BIG,
	    "A1 LOGIN {4}\r\nuser aaaaaaaaaaaaaaaaaaaaaaaa\r\nA2 NOOP\r\n",
	    "L[fy] n=4 m=9 <A1 LOGIN {4}> e2\n"
	    "D<user>\n"
	    "On\n"
	    "X27\n"
	    "L[fl] <A2 NOOP> e2\n");
}

static void
test_fr_overflow_discards_nonsync(void **state)
{
	(void)state;
	/* The discarded line ends in {5+}: its octets and the following
	 * lines (another {3+}) belong to the same command. */
	CHECK(20, BIG,
	    "A1 APPEND box (\\Seen) xxxxxxxxxxxxxxx {5+}\r\n"
	    "hello more {3+}\r\n"
	    "a\r\n"
	    "\r\n"
	    "A2 NOOP\r\n",
	    "Of\nX66\nL[fl] <A2 NOOP> e2\n");
	/* Literal octets that look like lines are skipped by count. */
	CHECK(20, BIG,
	    "A1 APPEND box (\\Seen) xxxxxxxxxxxxxxx ~{9+}\r\n"
	    "A2 NOOP\r\n"
	    "\r\n"
	    "A3 NOOP\r\n",
	    "Of\nX56\nL[fl] <A3 NOOP> e2\n");
	/* A zero-length {0+} literal. */
	CHECK(10, BIG, "A1 APPEND box {0+}\r\n\r\nA2 NOOP\r\n",
	    "Of\nX22\nL[fl] <A2 NOOP> e2\n");
	/* A 23-byte marker (the most the kept tail holds) is recognized. */
	CHECK(10, BIG, "A1 APPEND box {00000000000000000003+}\r\nabc\r\nA2 NOOP\r\n",
	    "Of\nX44\nL[fl] <A2 NOOP> e2\n");
}

static void
test_fr_overflow_discard_sync(void **state)
{
	(void)state;
	/* {5} after an overflow: nobody sends "+", the client sends no
	 * octets, the next bytes are a new command. */
	CHECK(20, BIG,
	    "A1 APPEND box (\\Seen) xxxxxxxxxxxxxxx {5}\r\nA2 NOOP\r\n",
	    "Of\nX43\nL[fl] <A2 NOOP> e2\n");
	/* Overflow on a later line ending in {n}: same. */
	CHECK(20, BIG,
	    "A1 X {1}\r\na yyyyyyyyyyyyyyyyyyyy {3}\r\nA2 NOOP\r\n",
	    "L[fy] n=1 m=5 <A1 X {1}> e2\nD<a>\nOn\nX27\nL[fl] <A2 NOOP> e2\n");
}

static void
test_fr_overflow_frame(void **state)
{
	struct imap_framer fr;
	struct imap_frame f;

	(void)state;
	/* Everything available is consumed with the OVERFLOW frame. */
	imap_framer_init(&fr, 8, BIG);
	imap_framer_next(&fr, S("A1 NOOP12"), &f);
	assert_int_equal(f.kind, IMAP_FR_OVERFLOW);
	assert_int_equal(f.len, 9);
	assert_true(f.overflow_first);
	assert_false(imap_framer_at_boundary(&fr));
	imap_framer_next(&fr, S("34"), &f);
	assert_int_equal(f.kind, IMAP_FR_MORE);
	assert_int_equal(f.len, 2);
	imap_framer_next(&fr, S("\r\nA2"), &f);
	assert_int_equal(f.kind, IMAP_FR_MORE);
	assert_int_equal(f.len, 2);
	assert_true(imap_framer_at_boundary(&fr));
	imap_framer_next(&fr, S("A2"), &f);
	assert_int_equal(f.kind, IMAP_FR_MORE);
	assert_int_equal(f.len, 0);
	/* The overflow is reported once, and only up to the line end. */
	imap_framer_init(&fr, 8, BIG);
	imap_framer_next(&fr, S("A1 NOOP1\r\nA2 X\r\n"), &f);
	assert_int_equal(f.kind, IMAP_FR_OVERFLOW);
	assert_int_equal(f.len, 10);
	assert_true(imap_framer_at_boundary(&fr));
	imap_framer_next(&fr, S("A2 X\r\n"), &f);
	assert_int_equal(f.kind, IMAP_FR_LINE);
	assert_true(f.first);
}

static void
test_fr_toobig_sync(void **state)
{
	struct imap_framer fr;
	struct imap_frame f;

	(void)state;
	CHECK(1000, 10, "A1 APPEND box {11}\r\nA2 NOOP\r\n",
	    "L[fly!] n=11 m=14 <A1 APPEND box {11}> e2\n"
	    "L[fl] <A2 NOOP> e2\n");
	/* Exactly lit_max is fine. */
	CHECK(1000, 10, "A1 APPEND box {10}\r\n0123456789\r\n",
	    "L[fy] n=10 m=14 <A1 APPEND box {10}> e2\nD<0123456789>\nL[l] <> e2\n");
	/* On a later line. */
	CHECK(1000, 10, "A1 LOGIN {1}\r\nu {11}\r\nA2 NOOP\r\n",
	    "L[fy] n=1 m=9 <A1 LOGIN {1}> e2\nD<u>\n"
	    "L[ly!] n=11 m=1 < {11}> e2\n"
	    "L[fl] <A2 NOOP> e2\n");

	imap_framer_init(&fr, 1000, 10);
	imap_framer_next(&fr, S("A1 APPEND box {11}\r\n"), &f);
	assert_true(f.lit_toobig);
	assert_true(imap_framer_at_boundary(&fr));
}

static void
test_fr_toobig_nonsync(void **state)
{
	struct imap_framer fr;
	struct imap_frame f;

	(void)state;
	/* The 11 octets, the rest of the line and the next {2+} go. */
	CHECK(1000, 10,
	    "A1 APPEND box {11+}\r\nhello world more {2+}\r\nab\r\nA2 NOOP\r\n",
	    "L[fly+!] n=11 m=14 <A1 APPEND box {11+}> e2\n"
	    "X27\n"
	    "L[fl] <A2 NOOP> e2\n");
	CHECK(1000, 10,
	    "A1 APPEND box ~{11+}\r\nhello world\r\nA2 NOOP\r\n",
	    "L[fly+!] n=11 m=14 <A1 APPEND box ~{11+}> e2\n"
	    "X13\n"
	    "L[fl] <A2 NOOP> e2\n");

	imap_framer_init(&fr, 1000, 10);
	imap_framer_next(&fr, S("A1 APPEND box {11+}\r\n"), &f);
	assert_true(f.lit_toobig);
	assert_true(f.last);
	assert_false(imap_framer_at_boundary(&fr));
	imap_framer_next(&fr, S("hello world\r\n"), &f);
	assert_int_equal(f.kind, IMAP_FR_MORE);
	assert_int_equal(f.len, 13);
	assert_true(imap_framer_at_boundary(&fr));
}

static void
test_fr_absurd_literal(void **state)
{
	struct imap_framer fr;
	struct imap_frame f;

	(void)state;
	/* More than 2^63: too big whatever lit_max says. */
	imap_framer_init(&fr, 1000, UINT64_MAX);
	imap_framer_next(&fr, S("A1 X {99999999999999999999999}\r\n"), &f);
	assert_int_equal(f.kind, IMAP_FR_LINE);
	assert_true(f.has_lit);
	assert_true(f.lit_toobig);
	assert_true(f.last);
	assert_true(imap_framer_at_boundary(&fr));
	imap_framer_next(&fr, S("A1 X {9223372036854775809}\r\n"), &f);
	assert_true(f.lit_toobig);
	/* 2^63 itself is within reach of a huge lit_max. */
	imap_framer_next(&fr, S("A1 X {9223372036854775808}\r\n"), &f);
	assert_true(f.has_lit);
	assert_false(f.lit_toobig);
	assert_true(f.lit_size == (uint64_t)1 << 63);
	assert_false(imap_framer_at_boundary(&fr));
}

/* ------------------------------------------------------------- lexer */

static void
expect_tok(struct imap_lexer *lx, enum imap_tok_type type, const char *val,
    size_t len)
{
	struct imap_tok tok;

	assert_int_equal(imap_lex_next(lx, &tok), 1);
	assert_int_equal(tok.type, type);
	if (val != NULL) {
		assert_int_equal(tok.len, len);
		assert_memory_equal(tok.p, val, len);
	}
}

#define TOK(lx, type, s)	expect_tok((lx), (type), S(s))
#define TOKEOL(lx)		expect_tok((lx), IMAP_TOK_EOL, NULL, 0)

static void
test_lex_login_quoted(void **state)
{
	static const char in[] =
	    "A1 LOGIN \"dom\\\\adm/box\" \"p\\\"w\\\\d\"\r\n";
	struct imap_lexer lx;
	struct imap_tok tok;
	char buf[64];

	(void)state;
	imap_lexer_init(&lx, S(in));
	TOK(&lx, IMAP_TOK_ATOM, "A1");
	TOK(&lx, IMAP_TOK_ATOM, "LOGIN");
	assert_int_equal(imap_lex_next(&lx, &tok), 1);
	assert_int_equal(tok.type, IMAP_TOK_QUOTED);
	assert_int_equal(tok.len, 12);
	assert_memory_equal(tok.p, "dom\\\\adm/box", 12);
	assert_int_equal(imap_tok_string(&tok, buf, sizeof(buf)), 11);
	assert_string_equal(buf, "dom\\adm/box");
	assert_int_equal(imap_lex_next(&lx, &tok), 1);
	assert_int_equal(tok.type, IMAP_TOK_QUOTED);
	assert_int_equal(imap_tok_string(&tok, buf, sizeof(buf)), 5);
	assert_string_equal(buf, "p\"w\\d");
	TOKEOL(&lx);
	/* EOL repeats. */
	TOKEOL(&lx);
	TOKEOL(&lx);
}

static void
test_lex_login_literals(void **state)
{
	static const char in[] = "A1 LOGIN {4}\r\nus r {6+}\r\n\"a\r\nb\r\n";
	struct imap_lexer lx;
	struct imap_tok tok;
	char buf[16];

	(void)state;
	imap_lexer_init(&lx, S(in));
	TOK(&lx, IMAP_TOK_ATOM, "A1");
	TOK(&lx, IMAP_TOK_ATOM, "LOGIN");
	assert_int_equal(imap_lex_next(&lx, &tok), 1);
	assert_int_equal(tok.type, IMAP_TOK_LITERAL);
	assert_int_equal(imap_tok_string(&tok, buf, sizeof(buf)), 4);
	assert_string_equal(buf, "us r");
	TOK(&lx, IMAP_TOK_LITERAL, "\"a\r\nb\r");
	TOK(&lx, IMAP_TOK_EOL, "");
	/* Literal8 and a bare LF after the marker. */
	imap_lexer_init(&lx, S("A1 APPEND x ~{3}\nabc\r\n"));
	TOK(&lx, IMAP_TOK_ATOM, "A1");
	TOK(&lx, IMAP_TOK_ATOM, "APPEND");
	TOK(&lx, IMAP_TOK_ATOM, "x");
	TOK(&lx, IMAP_TOK_LITERAL, "abc");
	TOKEOL(&lx);
	/* Zero-length literal. */
	imap_lexer_init(&lx, S("A1 X {0}\r\n Y\r\n"));
	TOK(&lx, IMAP_TOK_ATOM, "A1");
	TOK(&lx, IMAP_TOK_ATOM, "X");
	TOK(&lx, IMAP_TOK_LITERAL, "");
	TOK(&lx, IMAP_TOK_ATOM, "Y");
	TOKEOL(&lx);
}

static void
test_lex_fetch_response(void **state)
{
	struct imap_lexer lx;

	(void)state;
	imap_lexer_init(&lx, S("* 1 FETCH (BODY[] {5}\r\nhello)\r\n"));
	TOK(&lx, IMAP_TOK_ATOM, "*");
	TOK(&lx, IMAP_TOK_ATOM, "1");
	TOK(&lx, IMAP_TOK_ATOM, "FETCH");
	TOK(&lx, IMAP_TOK_LPAREN, "(");
	TOK(&lx, IMAP_TOK_ATOM, "BODY[]");
	TOK(&lx, IMAP_TOK_LITERAL, "hello");
	TOK(&lx, IMAP_TOK_RPAREN, ")");
	TOKEOL(&lx);

	imap_lexer_init(&lx, S("A1 FETCH 1:* (FLAGS BODY[HEADER.FIELDS (A B)])"));
	TOK(&lx, IMAP_TOK_ATOM, "A1");
	TOK(&lx, IMAP_TOK_ATOM, "FETCH");
	TOK(&lx, IMAP_TOK_ATOM, "1:*");
	TOK(&lx, IMAP_TOK_LPAREN, "(");
	TOK(&lx, IMAP_TOK_ATOM, "FLAGS");
	TOK(&lx, IMAP_TOK_ATOM, "BODY[HEADER.FIELDS");
	TOK(&lx, IMAP_TOK_LPAREN, "(");
	TOK(&lx, IMAP_TOK_ATOM, "A");
	TOK(&lx, IMAP_TOK_ATOM, "B");
	TOK(&lx, IMAP_TOK_RPAREN, ")");
	TOK(&lx, IMAP_TOK_ATOM, "]");
	TOK(&lx, IMAP_TOK_RPAREN, ")");
	TOKEOL(&lx);
}

static void
test_lex_spacing_and_atoms(void **state)
{
	struct imap_lexer lx;
	struct imap_tok tok;
	const char *rest;
	size_t rlen;

	(void)state;
	/* Lenient on runs of spaces, leading and trailing. */
	imap_lexer_init(&lx, S("  A1   STORE  1 +FLAGS (\\Seen  \\Deleted)  \r\n"));
	TOK(&lx, IMAP_TOK_ATOM, "A1");
	TOK(&lx, IMAP_TOK_ATOM, "STORE");
	TOK(&lx, IMAP_TOK_ATOM, "1");
	TOK(&lx, IMAP_TOK_ATOM, "+FLAGS");
	TOK(&lx, IMAP_TOK_LPAREN, "(");
	TOK(&lx, IMAP_TOK_ATOM, "\\Seen");
	TOK(&lx, IMAP_TOK_ATOM, "\\Deleted");
	TOK(&lx, IMAP_TOK_RPAREN, ")");
	TOKEOL(&lx);
	rest = imap_lex_rest(&lx, &rlen);
	assert_int_equal(rlen, 2);
	assert_memory_equal(rest, "\r\n", 2);
	/* Quotes split atoms; 8-bit bytes are atom bytes. */
	imap_lexer_init(&lx, S("a\"b\"c \xc3\xa9t\xc3\xa9"));
	TOK(&lx, IMAP_TOK_ATOM, "a");
	TOK(&lx, IMAP_TOK_QUOTED, "b");
	TOK(&lx, IMAP_TOK_ATOM, "c");
	TOK(&lx, IMAP_TOK_ATOM, "\xc3\xa9t\xc3\xa9");
	TOKEOL(&lx);
	/* Empty quoted string and empty input. */
	imap_lexer_init(&lx, S("\"\""));
	assert_int_equal(imap_lex_next(&lx, &tok), 1);
	assert_int_equal(tok.type, IMAP_TOK_QUOTED);
	assert_int_equal(tok.len, 0);
	TOKEOL(&lx);
	imap_lexer_init(&lx, "", 0);
	TOKEOL(&lx);
	/* Lone CR at the very end counts as the line end. */
	imap_lexer_init(&lx, S("A1 NOOP\r"));
	TOK(&lx, IMAP_TOK_ATOM, "A1");
	TOK(&lx, IMAP_TOK_ATOM, "NOOP");
	TOKEOL(&lx);
}

static void
test_lex_malformed_markers_are_atoms(void **state)
{
	struct imap_lexer lx;

	(void)state;
	imap_lexer_init(&lx, S("A1 X {} {12a} { 5}\r\n"));
	TOK(&lx, IMAP_TOK_ATOM, "A1");
	TOK(&lx, IMAP_TOK_ATOM, "X");
	TOK(&lx, IMAP_TOK_ATOM, "{}");
	TOK(&lx, IMAP_TOK_ATOM, "{12a}");
	TOK(&lx, IMAP_TOK_ATOM, "{");
	TOK(&lx, IMAP_TOK_ATOM, "5}");
	TOKEOL(&lx);
	/* A marker not at the end of the line is no literal. */
	imap_lexer_init(&lx, S("A1 X {5} ~{2} Y\r\n"));
	TOK(&lx, IMAP_TOK_ATOM, "A1");
	TOK(&lx, IMAP_TOK_ATOM, "X");
	TOK(&lx, IMAP_TOK_ATOM, "{5}");
	TOK(&lx, IMAP_TOK_ATOM, "~{2}");
	TOK(&lx, IMAP_TOK_ATOM, "Y");
	TOKEOL(&lx);
	/* A marker glued to an atom ends it, as the framer sees it. */
	imap_lexer_init(&lx, S("A1 X foo{3}\r\nabc bar~~{1+}\r\nz\r\n"));
	TOK(&lx, IMAP_TOK_ATOM, "A1");
	TOK(&lx, IMAP_TOK_ATOM, "X");
	TOK(&lx, IMAP_TOK_ATOM, "foo");
	TOK(&lx, IMAP_TOK_LITERAL, "abc");
	TOK(&lx, IMAP_TOK_ATOM, "bar~");
	TOK(&lx, IMAP_TOK_LITERAL, "z");
	TOKEOL(&lx);
}

static void
expect_lex_error(const char *in, size_t len, int ntok)
{
	struct imap_lexer lx;
	struct imap_tok tok;
	int i;

	imap_lexer_init(&lx, in, len);
	for (i = 0; i < ntok; i++) {
		assert_int_equal(imap_lex_next(&lx, &tok), 1);
		assert_int_not_equal(tok.type, IMAP_TOK_EOL);
	}
	assert_int_equal(imap_lex_next(&lx, &tok), -1);
}

static void
test_lex_errors(void **state)
{
	(void)state;
	expect_lex_error(S("A1 LOGIN \"user"), 2);
	expect_lex_error(S("A1 LOGIN \"us\rer\" x\r\n"), 2);
	expect_lex_error(S("A1 LOGIN \"us\ner\" x\r\n"), 2);
	expect_lex_error(S("A1 LOGIN \"us\0er\" x\r\n"), 2);
	expect_lex_error(S("A1 LOGIN \"us\\er\" x\r\n"), 2);
	expect_lex_error(S("A1 LOGIN \"user\\"), 2);
	/* Short literal, missing CRLF, absurd length. */
	expect_lex_error(S("A1 LOGIN {5}\r\nabc"), 2);
	expect_lex_error(S("A1 LOGIN {5}"), 2);
	expect_lex_error(S("A1 LOGIN {5}\r"), 2);
	expect_lex_error(S("A1 LOGIN {99999999999999999999}\r\n"), 2);
	expect_lex_error(S("A1 LOGIN {9223372036854775809}\r\n"), 2);
	/* NUL and lone CR outside quotes. */
	expect_lex_error(S("A1 \0 x"), 1);
	expect_lex_error(S("A1 \rB\r\n"), 1);
	expect_lex_error(S("A1 X\rB\r\n"), 2);
}

static void
test_tok_string(void **state)
{
	struct imap_tok tok;
	char buf[8];

	(void)state;
	tok.type = IMAP_TOK_ATOM;
	tok.p = "INBOX";
	tok.len = 5;
	assert_int_equal(imap_tok_string(&tok, buf, 6), 5);
	assert_string_equal(buf, "INBOX");
	assert_int_equal(imap_tok_string(&tok, buf, 5), -1);
	tok.type = IMAP_TOK_LITERAL;
	tok.p = "a\0b";
	tok.len = 3;
	assert_int_equal(imap_tok_string(&tok, buf, sizeof(buf)), -1);
	tok.type = IMAP_TOK_QUOTED;
	tok.p = "a\\\"b\\\\";		/* a\"b\\ -> a"b\ */
	tok.len = 6;
	assert_int_equal(imap_tok_string(&tok, buf, 5), 4);
	assert_string_equal(buf, "a\"b\\");
	assert_int_equal(imap_tok_string(&tok, buf, 4), -1);
	tok.len = 0;
	assert_int_equal(imap_tok_string(&tok, buf, 1), 0);
	assert_string_equal(buf, "");
	assert_int_equal(imap_tok_string(&tok, buf, 0), -1);
}

static void
test_tok_is(void **state)
{
	struct imap_tok tok = { IMAP_TOK_ATOM, "Login", 5 };

	(void)state;
	assert_true(imap_tok_is(&tok, "LOGIN"));
	assert_true(imap_tok_is(&tok, "login"));
	assert_false(imap_tok_is(&tok, "LOGI"));
	assert_false(imap_tok_is(&tok, "LOGINX"));
	tok.len = 4;
	assert_true(imap_tok_is(&tok, "logi"));
}

/* ------------------------------------------------------ command head */

static void
expect_head(const char *line, size_t len, const char *tag, const char *cmd)
{
	struct imap_tok t, c;

	assert_int_equal(imap_parse_command_head(line, len, &t, &c), 0);
	assert_int_equal(t.len, strlen(tag));
	assert_memory_equal(t.p, tag, t.len);
	assert_int_equal(c.len, strlen(cmd));
	assert_memory_equal(c.p, cmd, c.len);
}

static void
expect_head_fail(const char *line, size_t len)
{
	struct imap_tok t, c;

	assert_int_equal(imap_parse_command_head(line, len, &t, &c), -1);
}

static void
test_command_head(void **state)
{
	(void)state;
	expect_head(S("A1 NOOP\r\n"), "A1", "NOOP");
	expect_head(S("A1 NOOP"), "A1", "NOOP");
	expect_head(S("a.b-c]9 login \"x\" {3}\r\n"), "a.b-c]9", "login");
	expect_head(S("A1 UID FETCH 1:* FLAGS\r\n"), "A1", "UID");
	expect_head(S("A1 LOGIN {4}\r\n"), "A1", "LOGIN");
	expect_head(S("A1  NOOP\r\n"), "A1", "NOOP");
	expect_head_fail(S("+ NOOP\r\n"));
	expect_head_fail(S("A+1 NOOP\r\n"));
	expect_head_fail(S("* NOOP\r\n"));
	expect_head_fail(S("A*1 NOOP\r\n"));
	expect_head_fail(S("A%1 NOOP\r\n"));
	expect_head_fail(S("A\\1 NOOP\r\n"));
	expect_head_fail(S("A\x01 NOOP\r\n"));
	expect_head_fail(S("\xc3\xa9 NOOP\r\n"));
	expect_head_fail(S("A1\r\n"));
	expect_head_fail(S("A1"));
	expect_head_fail(S("A1 \r\n"));
	expect_head_fail(S(" A1 NOOP\r\n"));
	expect_head_fail(S("\"A1\" NOOP\r\n"));
	expect_head_fail(S("A1 (NOOP)\r\n"));
	expect_head_fail(S("A1 \"NOOP\"\r\n"));
	expect_head_fail(S("A1 {4}\r\n"));
	expect_head_fail(S("A1(NOOP)\r\n"));
	expect_head_fail(S("\r\n"));
	expect_head_fail("", 0);
}

/* --------------------------------------------------------- responses */

static void
expect_resp(const char *line, size_t len, enum imap_resp_kind kind,
    enum imap_resp_status st, const char *tag, const char *code,
    const char *text)
{
	struct imap_resp r;

	imap_parse_response(line, len, &r);
	assert_int_equal(r.kind, kind);
	assert_int_equal(r.status, st);
	if (tag != NULL) {
		assert_int_equal(r.tag.len, strlen(tag));
		assert_memory_equal(r.tag.p, tag, r.tag.len);
	}
	if (code == NULL)
		assert_null(r.code);
	else {
		assert_non_null(r.code);
		assert_int_equal(r.code_len, strlen(code));
		assert_memory_equal(r.code, code, r.code_len);
	}
	if (text != NULL) {
		assert_int_equal(r.text_len, strlen(text));
		assert_memory_equal(r.text, text, r.text_len);
	}
}

#define RESP(line, kind, st, tag, code, text) \
	expect_resp(S(line), IMAP_RESP_##kind, IMAP_ST_##st, tag, code, text)

static void
test_resp_continuation(void **state)
{
	(void)state;
	RESP("+\r\n", CONTINUATION, NONE, NULL, NULL, "");
	RESP("+", CONTINUATION, NONE, NULL, NULL, "");
	RESP("+\n", CONTINUATION, NONE, NULL, NULL, "");
	RESP("+ idling\r\n", CONTINUATION, NONE, NULL, NULL, "idling");
	RESP("+ \r\n", CONTINUATION, NONE, NULL, NULL, "");
	RESP("+ dXNlcg==\r\n", CONTINUATION, NONE, NULL, NULL, "dXNlcg==");
	RESP("+ Ready for additional command text.\r\n", CONTINUATION, NONE,
	    NULL, NULL, "Ready for additional command text.");
	RESP("+ [ALERT] go on\r\n", CONTINUATION, NONE, NULL, "ALERT", "go on");
}

static void
test_resp_tagged(void **state)
{
	(void)state;
	RESP("A1 OK [READ-WRITE] SELECT completed.\r\n", TAGGED, OK, "A1",
	    "READ-WRITE", "SELECT completed.");
	RESP("A2 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
	    TAGGED, NO, "A2", "AUTHENTICATIONFAILED", "Authentication failed.");
	RESP("a3 bad Command Error. 10\r\n", TAGGED, BAD, "a3", NULL,
	    "Command Error. 10");
	RESP("A4 OK\r\n", TAGGED, OK, "A4", NULL, "");
	RESP("A4 Ok", TAGGED, OK, "A4", NULL, "");
	RESP("A5 OK [ALERT]\r\n", TAGGED, OK, "A5", "ALERT", "");
	RESP("A6 OK [APPENDUID 38505 3955] APPEND completed.\r\n", TAGGED, OK,
	    "A6", "APPENDUID 38505 3955", "APPEND completed.");
	/* An unterminated code is text. */
	RESP("A7 NO [TOOBIG oops\r\n", TAGGED, NO, "A7", NULL, "[TOOBIG oops");
	RESP("A8 OK [] empty\r\n", TAGGED, OK, "A8", "", "empty");
}

static void
test_resp_untagged(void **state)
{
	(void)state;
	RESP("* BYE Connection is closed. 14\r\n", UNTAGGED, BYE, NULL, NULL,
	    "Connection is closed. 14");
	RESP("* OK [CAPABILITY IMAP4rev1] hi", UNTAGGED, OK, NULL,
	    "CAPABILITY IMAP4rev1", "hi");
	RESP("* OK The Microsoft Exchange IMAP4 service is ready.\r\n",
	    UNTAGGED, OK, NULL, NULL,
	    "The Microsoft Exchange IMAP4 service is ready.");
	RESP("* 3 EXISTS\r\n", UNTAGGED, NONE, NULL, NULL, "3 EXISTS");
	RESP("* CAPABILITY IMAP4rev1 IDLE LITERAL+\r\n", UNTAGGED, NONE, NULL,
	    NULL, "CAPABILITY IMAP4rev1 IDLE LITERAL+");
	RESP("* 1 FETCH (BODY[] {5}\r\n", UNTAGGED, NONE, NULL, NULL,
	    "1 FETCH (BODY[] {5}");
	RESP("* ok lower\r\n", UNTAGGED, OK, NULL, NULL, "lower");
	RESP("* no\r\n", UNTAGGED, NO, NULL, NULL, "");
	RESP("* BAD [PARSE] x\r\n", UNTAGGED, BAD, NULL, "PARSE", "x");
	RESP("* PREAUTH [CAPABILITY IMAP4rev1] Logged in\r\n", UNTAGGED,
	    PREAUTH, NULL, "CAPABILITY IMAP4rev1", "Logged in");
	RESP("* OKAY then\r\n", UNTAGGED, NONE, NULL, NULL, "OKAY then");
	/* A quoted ']' stays inside the code. */
	RESP("* NO [BADCHARSET (\"a]b\")] x\r\n", UNTAGGED, NO, NULL,
	    "BADCHARSET (\"a]b\")", "x");
}

static void
test_resp_invalid(void **state)
{
	(void)state;
	RESP("", INVALID, NONE, NULL, NULL, NULL);
	RESP("\r\n", INVALID, NONE, NULL, NULL, NULL);
	RESP("*", INVALID, NONE, NULL, NULL, NULL);
	RESP("*\r\n", INVALID, NONE, NULL, NULL, NULL);
	RESP("*3 EXISTS\r\n", INVALID, NONE, NULL, NULL, NULL);
	RESP("A1\r\n", INVALID, NONE, NULL, NULL, NULL);
	RESP("A1 FOO bar\r\n", INVALID, NONE, NULL, NULL, NULL);
	RESP("A1 BYE x\r\n", INVALID, NONE, NULL, NULL, NULL);
	RESP("A1 PREAUTH x\r\n", INVALID, NONE, NULL, NULL, NULL);
	RESP("A1 OKAY\r\n", INVALID, NONE, NULL, NULL, NULL);
	RESP("A+1 OK x\r\n", INVALID, NONE, NULL, NULL, NULL);
	RESP("\"A1\" OK x\r\n", INVALID, NONE, NULL, NULL, NULL);
	RESP(" A1 OK x\r\n", INVALID, NONE, NULL, NULL, NULL);
	RESP("+idling\r\n", INVALID, NONE, NULL, NULL, NULL);
}

/* ----------------------------------------------------------- quoting */

static void
test_quote(void **state)
{
	char buf[32];
	struct imap_lexer lx;
	struct imap_tok tok;
	char back[32];
	static const char tricky[] = "dom\\adm/\"box\" x";

	(void)state;
	assert_int_equal(imap_quote(buf, sizeof(buf), S("abc")), 5);
	assert_string_equal(buf, "\"abc\"");
	assert_int_equal(imap_quote(buf, sizeof(buf), S("a\"b\\c")), 9);
	assert_string_equal(buf, "\"a\\\"b\\\\c\"");
	assert_int_equal(imap_quote(buf, sizeof(buf), "", 0), 2);
	assert_string_equal(buf, "\"\"");
	assert_int_equal(imap_quote(buf, sizeof(buf), S("a\rb")), -1);
	assert_int_equal(imap_quote(buf, sizeof(buf), S("a\nb")), -1);
	assert_int_equal(imap_quote(buf, sizeof(buf), S("a\0b")), -1);
	assert_int_equal(imap_quote(buf, sizeof(buf), S("caf\xc3\xa9")), -1);
	/* Room for the NUL is needed; -1 wins over -2. */
	assert_int_equal(imap_quote(buf, 6, S("abc")), 5);
	assert_int_equal(imap_quote(buf, 5, S("abc")), -2);
	assert_int_equal(imap_quote(buf, 9, S("a\"b\\c")), -2);
	assert_int_equal(imap_quote(buf, 0, "", 0), -2);
	assert_int_equal(imap_quote(buf, 2, S("a\n")), -1);
	/* Round trip through the lexer. */
	assert_true(imap_quote(buf, sizeof(buf), S(tricky)) > 0);
	imap_lexer_init(&lx, buf, strlen(buf));
	assert_int_equal(imap_lex_next(&lx, &tok), 1);
	assert_int_equal(tok.type, IMAP_TOK_QUOTED);
	assert_int_equal(imap_tok_string(&tok, back, sizeof(back)),
	    (ssize_t)strlen(tricky));
	assert_string_equal(back, tricky);
	assert_int_equal(imap_lex_next(&lx, &tok), 1);
	assert_int_equal(tok.type, IMAP_TOK_EOL);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_fr_simple_line),
		cmocka_unit_test(test_fr_partial_line),
		cmocka_unit_test(test_fr_pipelined),
		cmocka_unit_test(test_fr_sync_literal),
		cmocka_unit_test(test_fr_nonsync_and_literal8),
		cmocka_unit_test(test_fr_literal8_nul_octets),
		cmocka_unit_test(test_fr_zero_literal),
		cmocka_unit_test(test_fr_malformed_markers),
		cmocka_unit_test(test_fr_server_fetch_literal),
		cmocka_unit_test(test_fr_literal_chunks),
		cmocka_unit_test(test_fr_more_semantics),
		cmocka_unit_test(test_fr_byte_feed_linear),
		cmocka_unit_test(test_fr_random_equivalence),
		cmocka_unit_test(test_fr_line_limit_exact),
		cmocka_unit_test(test_fr_overflow_first_line),
		cmocka_unit_test(test_fr_overflow_later_line),
		cmocka_unit_test(test_fr_overflow_discards_nonsync),
		cmocka_unit_test(test_fr_overflow_discard_sync),
		cmocka_unit_test(test_fr_overflow_frame),
		cmocka_unit_test(test_fr_toobig_sync),
		cmocka_unit_test(test_fr_toobig_nonsync),
		cmocka_unit_test(test_fr_absurd_literal),
		cmocka_unit_test(test_lex_login_quoted),
		cmocka_unit_test(test_lex_login_literals),
		cmocka_unit_test(test_lex_fetch_response),
		cmocka_unit_test(test_lex_spacing_and_atoms),
		cmocka_unit_test(test_lex_malformed_markers_are_atoms),
		cmocka_unit_test(test_lex_errors),
		cmocka_unit_test(test_tok_string),
		cmocka_unit_test(test_tok_is),
		cmocka_unit_test(test_command_head),
		cmocka_unit_test(test_resp_continuation),
		cmocka_unit_test(test_resp_tagged),
		cmocka_unit_test(test_resp_untagged),
		cmocka_unit_test(test_resp_invalid),
		cmocka_unit_test(test_quote),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
