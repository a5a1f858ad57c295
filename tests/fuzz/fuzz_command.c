/*
 * fuzz_command.c - libFuzzer harness for the client command framer and lexer.
 *
 * Input: 4 header bytes (line_max, lit_max, chunking seed), then the byte
 * stream a client sends.  The stream is framed three times with the same
 * small limits: all at once, one byte at a time, and in pseudo-random
 * chunks (the way relay_frame_next presents an evbuffer's first chunk).
 * Properties checked:
 *
 *   - every frame covers bytes it was given; a LINE ends at its first LF,
 *     a command's text never passes line_max, LITERAL frames never pass
 *     the announced size and end exactly at it, nothing follows lit_toobig;
 *   - the three feedings give the same lines, literal octets, overflows
 *     and leftover (framing does not depend on how bytes arrive);
 *   - each complete command (lines with literal octets inline, as the
 *     daemon assembles it) lexes in bounded steps with tokens inside the
 *     buffer, literal tokens exactly the announced octets, and
 *     imap_parse_command_head() only accepts a valid tag;
 *   - imap_quote() output lexes back to the original string.
 *
 * Any violated property aborts, so libFuzzer keeps the input.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "imap_parse.h"

#define CHECK(cond) do { \
	if (!(cond)) { \
		fprintf(stderr, "%s:%d: property failed: %s\n", __FILE__, \
		    __LINE__, #cond); \
		abort(); \
	} \
} while (0)

/* Framing is quadratic-free, but byte-at-a-time feeding of a huge input
 * is slow under ASan: keep inputs that size. */
#define FZ_MAX_INPUT 16384

/* ------------------------------------------------------------ event log */

enum ev_kind { EV_LINE, EV_LIT, EV_OVERFLOW };

struct ev {
	enum ev_kind kind;
	bool first, last, has_lit, nonsync, toobig, lit_end, ovf_first;
	uint64_t lit_size;
	size_t off, len;	/* bytes in the log's arena */
};

struct evlog {
	struct ev *ev;
	size_t n, cap;
	char *arena;
	size_t alen, acap;
	size_t consumed;	/* bytes the framer consumed in all */
};

static void
log_free(struct evlog *l)
{
	free(l->ev);
	free(l->arena);
	memset(l, 0, sizeof(*l));
}

static size_t
arena_add(struct evlog *l, const char *p, size_t n)
{
	size_t off = l->alen;

	if (l->alen + n > l->acap) {
		l->acap = (l->alen + n) * 2 + 64;
		l->arena = realloc(l->arena, l->acap);
		CHECK(l->arena != NULL);
	}
	if (n > 0)
		memcpy(l->arena + l->alen, p, n);
	l->alen += n;
	return off;
}

static struct ev *
log_push(struct evlog *l)
{
	if (l->n == l->cap) {
		l->cap = l->cap * 2 + 16;
		l->ev = realloc(l->ev, l->cap * sizeof(*l->ev));
		CHECK(l->ev != NULL);
	}
	memset(&l->ev[l->n], 0, sizeof(l->ev[0]));
	return &l->ev[l->n++];
}

/* ----------------------------------------------------- command assembly */

struct cmd {
	char *buf;
	size_t len, cap;
	size_t first_line_len;	/* with CRLF */
	size_t first_text_len;
	bool active;
};

static void
cmd_add(struct cmd *c, const char *p, size_t n)
{
	if (c->len + n > c->cap) {
		c->cap = (c->len + n) * 2 + 64;
		c->buf = realloc(c->buf, c->cap);
		CHECK(c->buf != NULL);
	}
	if (n > 0)
		memcpy(c->buf + c->len, p, n);
	c->len += n;
}

static bool
tag_char_ok(unsigned char c)
{
	return c > 0x20 && c < 0x7f && strchr("(){%*\"\\+", c) == NULL;
}

/* Walk a command with the lexer and check every token. */
static void
lex_check(const char *buf, size_t len)
{
	struct imap_lexer lx;
	struct imap_tok tok;
	const char *prev, *rest;
	char small[8], big[512];
	size_t steps = 0, rlen;
	ssize_t sl;
	int r;

	imap_lexer_init(&lx, buf, len);
	for (;;) {
		CHECK(steps++ <= len + 1);	/* every token eats a byte */
		prev = lx.lx_p;
		r = imap_lex_next(&lx, &tok);
		CHECK(r == 1 || r == -1);
		if (r == -1)
			break;
		CHECK(tok.p >= buf && tok.p <= buf + len);
		CHECK(tok.len <= (size_t)(buf + len - tok.p));
		CHECK(lx.lx_p >= prev && lx.lx_p <= buf + len);
		rest = imap_lex_rest(&lx, &rlen);
		CHECK(rest == lx.lx_p && rest + rlen == buf + len);
		if (tok.type == IMAP_TOK_EOL) {
			/* EOL repeats and does not move. */
			struct imap_tok t2;

			CHECK(imap_lex_next(&lx, &t2) == 1);
			CHECK(t2.type == IMAP_TOK_EOL && lx.lx_p == tok.p);
			break;
		}
		CHECK(lx.lx_p > prev);
		switch (tok.type) {
		case IMAP_TOK_ATOM:
			CHECK(tok.len > 0);
			CHECK(memchr(tok.p, ' ', tok.len) == NULL);
			CHECK(memchr(tok.p, '\n', tok.len) == NULL);
			break;
		case IMAP_TOK_QUOTED:
			CHECK(tok.p > buf && tok.p[-1] == '"');
			CHECK(tok.p + tok.len < buf + len && tok.p[tok.len] == '"');
			CHECK(memchr(tok.p, '\n', tok.len) == NULL);
			CHECK(memchr(tok.p, '\r', tok.len) == NULL);
			CHECK(memchr(tok.p, '\0', tok.len) == NULL);
			break;
		case IMAP_TOK_LITERAL:
			/* The octets follow "}\r\n" or "}\n". */
			CHECK(tok.p > buf && tok.p[-1] == '\n');
			CHECK(lx.lx_p == tok.p + tok.len);
			break;
		case IMAP_TOK_LPAREN:
		case IMAP_TOK_RPAREN:
			CHECK(tok.len == 1);
			CHECK(*tok.p == (tok.type == IMAP_TOK_LPAREN ? '(' : ')'));
			break;
		default:
			CHECK(!"unknown token type");
		}
		sl = imap_tok_string(&tok, small, sizeof(small));
		CHECK(sl == -1 || ((size_t)sl < sizeof(small) &&
		    small[sl] == '\0' && (size_t)sl <= tok.len));
		sl = imap_tok_string(&tok, big, sizeof(big));
		CHECK(sl == -1 || ((size_t)sl < sizeof(big) &&
		    big[sl] == '\0' && (size_t)sl <= tok.len));
		if (sl >= 0)
			CHECK(strlen(big) == (size_t)sl);
		if (tok.type != IMAP_TOK_QUOTED && sl >= 0)
			CHECK(memcmp(big, tok.p, tok.len) == 0);
	}
}

static void
cmd_done(struct cmd *c)
{
	struct imap_tok tag, name;
	size_t i;

	lex_check(c->buf, c->len);
	if (imap_parse_command_head(c->buf, c->first_text_len, &tag,
	    &name) == 0) {
		CHECK(tag.p == c->buf && tag.len > 0);
		CHECK(tag.len < c->first_text_len);
		for (i = 0; i < tag.len; i++)
			CHECK(tag_char_ok((unsigned char)tag.p[i]));
		CHECK(c->buf[tag.len] == ' ');
		CHECK(name.type == IMAP_TOK_ATOM && name.len > 0);
		CHECK(name.p > tag.p + tag.len);
		CHECK(name.p + name.len <= c->buf + c->first_text_len);
		(void)imap_tok_is(&name, "LOGIN");
		(void)imap_tok_is(&name, "APPEND");
	}
	c->len = 0;
	c->active = false;
}

/* ------------------------------------------------------------- feeding */

struct feed {
	struct imap_framer fr;
	size_t line_max;
	uint64_t lit_max;
	/* literal accounting of the current command */
	bool in_lit;
	uint64_t lit_size, lit_got;
	size_t cmd_text;	/* text bytes of the current command */
	bool in_cmd;
	struct cmd cmd;
	bool assemble;
};

/* One frame: check it against our model, log it, return bytes consumed. */
static size_t
on_frame(struct feed *f, struct evlog *l, const char *buf, size_t have,
    const struct imap_frame *fr)
{
	struct ev *e;

	CHECK(fr->len <= have);
	switch (fr->kind) {
	case IMAP_FR_MORE:
		/* Only discarding consumes without a frame. */
		return fr->len;
	case IMAP_FR_LINE: {
		const char *lf;

		CHECK(!f->in_lit);
		CHECK(fr->len > 0 && buf[fr->len - 1] == '\n');
		lf = memchr(buf, '\n', fr->len);
		CHECK(lf == buf + fr->len - 1);
		CHECK(fr->text_len == fr->len - 1 ||
		    (fr->text_len == fr->len - 2 && buf[fr->len - 2] == '\r'));
		CHECK(fr->first == !f->in_cmd);
		if (fr->first)
			f->cmd_text = 0;
		f->cmd_text += fr->len;
		CHECK(f->cmd_text <= f->line_max);
		if (fr->has_lit) {
			CHECK(fr->marker_off < fr->text_len);
			CHECK(buf[fr->text_len - 1] == '}');
			CHECK(buf[fr->marker_off] == '{' ||
			    (buf[fr->marker_off] == '~' &&
			    buf[fr->marker_off + 1] == '{'));
			CHECK(fr->lit_nonsync == (buf[fr->text_len - 2] == '+'));
		} else {
			CHECK(fr->last && !fr->lit_toobig);
		}
		if (fr->lit_toobig) {
			CHECK(fr->has_lit && fr->last);
			CHECK(fr->lit_size > f->lit_max);
		}
		if (fr->has_lit && !fr->lit_toobig) {
			CHECK(!fr->last && fr->lit_size <= f->lit_max);
			f->in_lit = true;
			f->lit_size = fr->lit_size;
			f->lit_got = 0;
		}
		/* After a toobig literal ({n+} octets are discarded by the
		 * framer) the next frame starts a new command. */
		f->in_cmd = !fr->last;
		e = log_push(l);
		e->kind = EV_LINE;
		e->first = fr->first;
		e->last = fr->last;
		e->has_lit = fr->has_lit;
		e->nonsync = fr->lit_nonsync;
		e->toobig = fr->lit_toobig;
		e->lit_size = fr->lit_size;
		e->len = fr->len;
		e->off = arena_add(l, buf, fr->len);
		if (f->assemble) {
			if (fr->first) {
				f->cmd.len = 0;
				f->cmd.active = true;
				f->cmd.first_line_len = fr->len;
				f->cmd.first_text_len = fr->text_len;
			}
			if (f->cmd.active)
				cmd_add(&f->cmd, buf, fr->len);
			if (fr->lit_toobig)
				f->cmd.active = false;
			else if (fr->last && f->cmd.active)
				cmd_done(&f->cmd);
		}
		return fr->len;
	}
	case IMAP_FR_LITERAL:
		CHECK(f->in_lit);
		CHECK(fr->len <= f->lit_size - f->lit_got);
		f->lit_got += fr->len;
		CHECK(fr->lit_end == (f->lit_got == f->lit_size));
		if (fr->lit_end)
			f->in_lit = false;
		/* Merge with the previous literal piece: chunking must not
		 * show. */
		if (l->n > 0 && l->ev[l->n - 1].kind == EV_LIT &&
		    !l->ev[l->n - 1].lit_end) {
			e = &l->ev[l->n - 1];
			arena_add(l, buf, fr->len);
			e->len += fr->len;
		} else {
			e = log_push(l);
			e->kind = EV_LIT;
			e->len = fr->len;
			e->off = arena_add(l, buf, fr->len);
		}
		e->lit_end = fr->lit_end;
		if (f->assemble && f->cmd.active)
			cmd_add(&f->cmd, buf, fr->len);
		return fr->len;
	case IMAP_FR_OVERFLOW:
		CHECK(!f->in_lit);
		CHECK(fr->len > 0);
		CHECK(fr->overflow_first == !f->in_cmd);
		/* The rest of the command is discarded: what comes next
		 * is a new command. */
		f->in_cmd = false;
		e = log_push(l);
		e->kind = EV_OVERFLOW;
		e->ovf_first = fr->overflow_first;
		if (f->assemble)
			f->cmd.active = false;
		return fr->len;
	default:
		CHECK(!"unknown frame kind");
	}
	return 0;
}

/*
 * Feed data in chunks: chunk(i) says how many more bytes arrive next.
 * pend holds unconsumed bytes (re-presented at the start, as required).
 */
static void
feed_run(struct feed *f, struct evlog *l, const uint8_t *data, size_t size,
    uint32_t seed, int mode)
{
	char *pend = malloc(size + 1);
	size_t have = 0, pos = 0, n, used;
	struct imap_frame fr;
	uint32_t rnd = seed | 1;

	CHECK(pend != NULL);
	while (pos < size) {
		if (mode == 0)
			n = size - pos;
		else if (mode == 1)
			n = 1;
		else {
			rnd ^= rnd << 13; rnd ^= rnd >> 17; rnd ^= rnd << 5;
			n = 1 + rnd % 97;
			if (n > size - pos)
				n = size - pos;
		}
		memcpy(pend + have, data + pos, n);
		have += n;
		pos += n;
		for (;;) {
			/* At a boundary no literal is open in our model. */
			if (imap_framer_at_boundary(&f->fr))
				CHECK(!f->in_lit && !f->in_cmd);
			imap_framer_next(&f->fr, pend, have, &fr);
			used = on_frame(f, l, pend, have, &fr);
			if (used > 0) {
				memmove(pend, pend + used, have - used);
				have -= used;
				l->consumed += used;
			}
			if (fr.kind == IMAP_FR_MORE && used == 0)
				break;		/* needs more bytes */
			/* Only an empty literal may be a 0-byte frame. */
			if (used == 0)
				CHECK(fr.kind == IMAP_FR_LITERAL && fr.lit_end);
		}
	}
	free(pend);
}

static void
logs_equal(const struct evlog *a, const struct evlog *b)
{
	size_t i;

	CHECK(a->consumed == b->consumed);
	CHECK(a->n == b->n);
	for (i = 0; i < a->n; i++) {
		const struct ev *x = &a->ev[i], *y = &b->ev[i];

		CHECK(x->kind == y->kind);
		CHECK(x->len == y->len);
		CHECK(x->len == 0 ||
		    memcmp(a->arena + x->off, b->arena + y->off, x->len) == 0);
		CHECK(x->first == y->first && x->last == y->last);
		CHECK(x->has_lit == y->has_lit && x->nonsync == y->nonsync);
		CHECK(x->toobig == y->toobig && x->lit_size == y->lit_size);
		CHECK(x->lit_end == y->lit_end && x->ovf_first == y->ovf_first);
	}
}

/* imap_quote() output must lex back to the original bytes. */
static void
quote_roundtrip(const char *s, size_t len)
{
	char q[600], back[300];
	struct imap_lexer lx;
	struct imap_tok tok;
	ssize_t n, m;

	if (len > 256)
		len = 256;
	n = imap_quote(q, sizeof(q), s, len);
	if (n == -1) {
		size_t i;
		bool bad = false;

		for (i = 0; i < len; i++) {
			unsigned char c = (unsigned char)s[i];

			if (c == 0 || c == '\r' || c == '\n' || c >= 0x80)
				bad = true;
		}
		CHECK(bad);
		return;
	}
	CHECK(n >= 2 && (size_t)n < sizeof(q) && q[n] == '\0');
	imap_lexer_init(&lx, q, (size_t)n);
	CHECK(imap_lex_next(&lx, &tok) == 1);
	CHECK(tok.type == IMAP_TOK_QUOTED);
	m = imap_tok_string(&tok, back, sizeof(back));
	CHECK(m == (ssize_t)len && memcmp(back, s, len) == 0);
	CHECK(imap_lex_next(&lx, &tok) == 1 && tok.type == IMAP_TOK_EOL);
	/* Too small a buffer is -2, never an overflow. */
	CHECK(imap_quote(q, (size_t)n, s, len) == -2);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct feed f[3];
	struct evlog l[3];
	size_t line_max;
	uint64_t lit_max;
	uint32_t seed;
	int i;

	if (size < 4 || size > FZ_MAX_INPUT)
		return 0;
	/* Small limits so that overflow and TOOBIG paths are reached. */
	line_max = 8 + (size_t)data[0] * 4;		/* 8 .. 1028 */
	lit_max = data[1] & 0x80 ? (uint64_t)(data[1] & 0x7f) * 16 :
	    (uint64_t)(data[1] & 0x7f);			/* 0 .. 2032 */
	seed = (uint32_t)data[2] << 8 | data[3];
	data += 4;
	size -= 4;

	memset(f, 0, sizeof(f));
	memset(l, 0, sizeof(l));
	for (i = 0; i < 3; i++) {
		imap_framer_init(&f[i].fr, line_max, lit_max);
		f[i].line_max = line_max;
		f[i].lit_max = lit_max;
		f[i].assemble = i == 0;
		feed_run(&f[i], &l[i], data, size, seed, i);
	}
	logs_equal(&l[0], &l[1]);
	logs_equal(&l[0], &l[2]);
	for (i = 0; i < 3; i++) {
		log_free(&l[i]);
		free(f[i].cmd.buf);
	}

	/* The lexer must also survive raw, unframed input. */
	lex_check((const char *)data, size);
	quote_roundtrip((const char *)data, size);
	return 0;
}
