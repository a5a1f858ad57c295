/*
 * imap_parse.c - incremental, allocation-free IMAP framing and tokenizing.
 *
 * See imap_parse.h for the contract.  Nothing here allocates, does I/O or
 * knows about libevent: every function works on slices the caller owns.
 */
#include "imap_parse.h"

#include <string.h>

/* Private framer states (fr_state). */
enum imap_frs {
	IMAP_FRS_LINE,		/* scanning a line of a command */
	IMAP_FRS_LIT,		/* counting an accepted literal */
	IMAP_FRS_DISC_LINE,	/* discarding to the end of a line */
	IMAP_FRS_DISC_LIT,	/* discarding the octets of a {n+} literal */
	IMAP_FRS_COUNT
};

/* Literal lengths above this are absurd whatever lit_max says. */
#define IMAP_LIT_ABSURD	((uint64_t)1 << 63)

/* ------------------------------------------------------------ helpers */

static bool
imap_is_digit(char c)
{
	return c >= '0' && c <= '9';
}

static char
imap_lower(char c)
{
	return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
}

static bool
imap_word_eq(const char *p, size_t len, const char *word)
{
	size_t i;

	for (i = 0; i < len; i++) {
		if (word[i] == '\0' || imap_lower(p[i]) != imap_lower(word[i]))
			return false;
	}
	return word[len] == '\0';
}

/*
 * Decimal digits to uint64.  Returns false when the value is absurd
 * (> 2^63, or does not fit at all); *v is then UINT64_MAX so that a
 * discard of "that many" octets never ends early.
 */
static bool
imap_parse_num(const char *p, size_t len, uint64_t *v)
{
	uint64_t n = 0;
	size_t i;

	for (i = 0; i < len; i++) {
		uint64_t d = (uint64_t)(p[i] - '0');

		if (n > (UINT64_MAX - d) / 10) {
			*v = UINT64_MAX;
			return false;
		}
		n = n * 10 + d;
	}
	if (n > IMAP_LIT_ABSURD) {
		*v = UINT64_MAX;
		return false;
	}
	*v = n;
	return true;
}

/*
 * Literal marker at the end of a line's text: "{n}", "{n+}", "~{n}" or
 * "~{n+}".  Scanning backwards keeps it O(marker) whatever the line length.
 * Returns true when the text ends in a marker; *ok_r is false when its
 * number is absurd.
 */
static bool
imap_marker_back(const char *text, size_t len, size_t *off_r, uint64_t *n_r,
    bool *nonsync_r, bool *ok_r)
{
	size_t i, dend;
	bool nonsync = false;

	if (len < 3 || text[len - 1] != '}')
		return false;
	i = len - 1;
	if (text[i - 1] == '+') {
		nonsync = true;
		i--;
	}
	dend = i;
	while (i > 0 && imap_is_digit(text[i - 1]))
		i--;
	if (i == dend || i == 0 || text[i - 1] != '{')
		return false;
	*ok_r = imap_parse_num(text + i, dend - i, n_r);
	*nonsync_r = nonsync;
	i--;
	if (i > 0 && text[i - 1] == '~')
		i--;
	*off_r = i;
	return true;
}

/*
 * Literal marker starting at p (at '~' or '{') and ending the line: it must
 * be followed by CRLF, LF, a lone CR at the end, or the end of input (the
 * last two then fail as a short literal).  Returns the position after '}'
 * or NULL when p does not start a marker.
 */
static const char *
imap_marker_fwd(const char *p, const char *end, uint64_t *n_r, bool *ok_r)
{
	const char *d;

	if (p < end && *p == '~')
		p++;
	if (p >= end || *p != '{')
		return NULL;
	d = ++p;
	while (p < end && imap_is_digit(*p))
		p++;
	if (p == d)
		return NULL;
	*ok_r = imap_parse_num(d, (size_t)(p - d), n_r);
	if (p < end && *p == '+')
		p++;
	if (p >= end || *p != '}')
		return NULL;
	p++;
	if (p == end || *p == '\n' ||
	    (*p == '\r' && (p + 1 == end || p[1] == '\n')))
		return p;
	return NULL;
}

/* RFC 3501 tag: ASTRING-CHARs except '+', so no CTL, 8-bit or specials. */
static bool
imap_tag_valid(const char *p, size_t len)
{
	size_t i;

	if (len == 0)
		return false;
	for (i = 0; i < len; i++) {
		unsigned char c = (unsigned char)p[i];

		if (c <= 0x20 || c >= 0x7f || strchr("(){%*\"\\+", c) != NULL)
			return false;
	}
	return true;
}

/* ------------------------------------------------------------ framer */

void
imap_framer_init(struct imap_framer *fr, size_t line_max, uint64_t lit_max)
{
	memset(fr, 0, sizeof(*fr));
	fr->fr_state = IMAP_FRS_LINE;
	fr->fr_line_max = line_max;
	fr->fr_lit_max = lit_max;
}

bool
imap_framer_in_literal(const struct imap_framer *fr)
{
	return fr->fr_state == IMAP_FRS_LIT;
}

bool
imap_framer_at_boundary(const struct imap_framer *fr)
{
	return fr->fr_state == IMAP_FRS_LINE && !fr->fr_in_cmd &&
	    fr->fr_scanned == 0;
}

static void
imap_fr_end_cmd(struct imap_framer *fr)
{
	fr->fr_state = IMAP_FRS_LINE;
	fr->fr_in_cmd = false;
	fr->fr_cmd_text = 0;
	fr->fr_scanned = 0;
	fr->fr_lit_left = 0;
	fr->fr_tail_len = 0;
}

/* Discarding a {n+} literal's octets; zero octets go straight on. */
static void
imap_fr_disc_lit(struct imap_framer *fr, uint64_t n)
{
	fr->fr_tail_len = 0;
	fr->fr_lit_left = n;
	fr->fr_state = n > 0 ? IMAP_FRS_DISC_LIT : IMAP_FRS_DISC_LINE;
}

/* Keep the last bytes of a discarded line: enough to see its marker. */
static void
imap_fr_tail_add(struct imap_framer *fr, const char *p, size_t n)
{
	size_t cap = sizeof(fr->fr_tail), keep;

	if (n >= cap) {
		memcpy(fr->fr_tail, p + n - cap, cap);
		fr->fr_tail_len = cap;
		return;
	}
	keep = fr->fr_tail_len;
	if (keep + n > cap)
		keep = cap - n;
	memmove(fr->fr_tail, fr->fr_tail + fr->fr_tail_len - keep, keep);
	memcpy(fr->fr_tail + keep, p, n);
	fr->fr_tail_len = keep + n;
}

/*
 * Swallow as much of the discarded command as buf holds.  A discarded line
 * ending in {n+} means n octets and another line follow; any other ending
 * (including {n}: nobody sent "+") ends the command.  Returns bytes used.
 */
static size_t
imap_fr_discard(struct imap_framer *fr, const char *buf, size_t len)
{
	size_t off = 0, tlen, moff;
	const char *lf;
	uint64_t n, take;
	bool nonsync, ok;

	while (off < len) {
		if (fr->fr_state == IMAP_FRS_DISC_LIT) {
			take = len - off;
			if (take > fr->fr_lit_left)
				take = fr->fr_lit_left;
			off += (size_t)take;
			fr->fr_lit_left -= take;
			if (fr->fr_lit_left == 0)
				fr->fr_state = IMAP_FRS_DISC_LINE;
			continue;
		}
		lf = memchr(buf + off, '\n', len - off);
		if (lf == NULL) {
			imap_fr_tail_add(fr, buf + off, len - off);
			return len;
		}
		imap_fr_tail_add(fr, buf + off, (size_t)(lf - (buf + off)));
		off = (size_t)(lf - buf) + 1;
		tlen = fr->fr_tail_len;
		if (tlen > 0 && fr->fr_tail[tlen - 1] == '\r')
			tlen--;
		if (imap_marker_back(fr->fr_tail, tlen, &moff, &n, &nonsync,
		    &ok) && nonsync) {
			imap_fr_disc_lit(fr, n);
			continue;
		}
		imap_fr_end_cmd(fr);
		break;
	}
	return off;
}

static void
imap_fr_line(struct imap_framer *fr, const char *buf, size_t line_len,
    struct imap_frame *out)
{
	size_t tlen = line_len - 1;
	uint64_t n = 0;
	bool ok = true;

	if (tlen > 0 && buf[tlen - 1] == '\r')
		tlen--;
	out->kind = IMAP_FR_LINE;
	out->len = line_len;
	out->text_len = tlen;
	out->first = !fr->fr_in_cmd;
	fr->fr_scanned = 0;
	fr->fr_cmd_text += line_len;
	out->has_lit = imap_marker_back(buf, tlen, &out->marker_off, &n,
	    &out->lit_nonsync, &ok);
	if (!out->has_lit) {
		out->last = true;
		imap_fr_end_cmd(fr);
		return;
	}
	out->lit_size = n;
	if (!ok || n > fr->fr_lit_max) {
		/* The caller answers NO [TOOBIG]; no LITERAL frames follow. */
		out->lit_toobig = true;
		out->last = true;
		if (out->lit_nonsync) {
			fr->fr_in_cmd = true;
			imap_fr_disc_lit(fr, n);
		} else
			imap_fr_end_cmd(fr);
		return;
	}
	out->last = false;
	fr->fr_in_cmd = true;
	fr->fr_lit_left = n;
	fr->fr_state = IMAP_FRS_LIT;
}

void
imap_framer_next(struct imap_framer *fr, const char *buf, size_t len,
    struct imap_frame *out)
{
	size_t allowed, lim;
	const char *lf;
	uint64_t take;

	memset(out, 0, sizeof(*out));
	out->kind = IMAP_FR_MORE;

	switch (fr->fr_state) {
	case IMAP_FRS_LIT:
		take = len;
		if (take > fr->fr_lit_left)
			take = fr->fr_lit_left;
		/* An empty literal still gets its (empty) lit_end frame. */
		if (take == 0 && fr->fr_lit_left > 0)
			return;
		fr->fr_lit_left -= take;
		out->kind = IMAP_FR_LITERAL;
		out->len = (size_t)take;
		if (fr->fr_lit_left == 0) {
			out->lit_end = true;
			fr->fr_state = IMAP_FRS_LINE;
		}
		return;
	case IMAP_FRS_DISC_LINE:
	case IMAP_FRS_DISC_LIT:
		out->len = imap_fr_discard(fr, buf, len);
		return;
	case IMAP_FRS_LINE:
	default:
		break;
	}

	/* Bytes below fr_scanned were presented before: never scan twice. */
	if (fr->fr_scanned > len)
		fr->fr_scanned = len;
	allowed = fr->fr_line_max > fr->fr_cmd_text ?
	    fr->fr_line_max - fr->fr_cmd_text : 0;
	lim = len < allowed ? len : allowed;
	lf = NULL;
	if (fr->fr_scanned < lim)
		lf = memchr(buf + fr->fr_scanned, '\n', lim - fr->fr_scanned);
	if (lf != NULL) {
		imap_fr_line(fr, buf, (size_t)(lf - buf) + 1, out);
		return;
	}
	if (len > allowed) {
		/* Even with its LF next, this line passes line_max. */
		out->kind = IMAP_FR_OVERFLOW;
		out->overflow_first = !fr->fr_in_cmd;
		fr->fr_in_cmd = true;
		fr->fr_scanned = 0;
		fr->fr_tail_len = 0;
		fr->fr_state = IMAP_FRS_DISC_LINE;
		out->len = imap_fr_discard(fr, buf, len);
		return;
	}
	fr->fr_scanned = len;
}

/* ------------------------------------------------------------- lexer */

void
imap_lexer_init(struct imap_lexer *lx, const char *buf, size_t len)
{
	lx->lx_p = buf;
	lx->lx_end = buf + len;
}

const char *
imap_lex_rest(const struct imap_lexer *lx, size_t *len_r)
{
	*len_r = (size_t)(lx->lx_end - lx->lx_p);
	return lx->lx_p;
}

static int
imap_lex_quoted(struct imap_lexer *lx, const char *p, struct imap_tok *tok)
{
	const char *q;

	for (q = p + 1; q < lx->lx_end; q++) {
		switch (*q) {
		case '"':
			tok->type = IMAP_TOK_QUOTED;
			tok->p = p + 1;
			tok->len = (size_t)(q - (p + 1));
			lx->lx_p = q + 1;
			return 1;
		case '\\':
			if (q + 1 >= lx->lx_end ||
			    (q[1] != '"' && q[1] != '\\'))
				return -1;
			q++;
			break;
		case '\r':
		case '\n':
		case '\0':
			return -1;
		default:
			break;
		}
	}
	return -1;
}

static bool
imap_lex_atom_end(char c)
{
	return c == ' ' || c == '\r' || c == '\n' || c == '(' || c == ')' ||
	    c == '"' || c == '\0';
}

int
imap_lex_next(struct imap_lexer *lx, struct imap_tok *tok)
{
	const char *p = lx->lx_p, *end = lx->lx_end, *q;
	uint64_t n;
	bool ok;

	while (p < end && *p == ' ')
		p++;
	lx->lx_p = p;
	tok->p = p;
	tok->len = 0;
	if (p == end || *p == '\n' ||
	    (*p == '\r' && (p + 1 == end || p[1] == '\n'))) {
		/* Stay put so that EOL repeats and lex_rest shows the CRLF. */
		tok->type = IMAP_TOK_EOL;
		return 1;
	}
	switch (*p) {
	case '(':
	case ')':
		tok->type = *p == '(' ? IMAP_TOK_LPAREN : IMAP_TOK_RPAREN;
		tok->len = 1;
		lx->lx_p = p + 1;
		return 1;
	case '"':
		return imap_lex_quoted(lx, p, tok);
	case '\r':
	case '\0':
		return -1;
	case '{':
	case '~':
		q = imap_marker_fwd(p, end, &n, &ok);
		if (q == NULL)
			break;	/* not a marker: part of an atom */
		if (!ok)
			return -1;
		if (q < end && *q == '\r')
			q++;
		if (q >= end || *q != '\n')
			return -1;
		q++;
		if (n > (uint64_t)(end - q))
			return -1;
		tok->type = IMAP_TOK_LITERAL;
		tok->p = q;
		tok->len = (size_t)n;
		lx->lx_p = q + n;
		return 1;
	default:
		break;
	}
	for (q = p + 1; q < end && !imap_lex_atom_end(*q); q++) {
		if ((*q == '{' || *q == '~') &&
		    imap_marker_fwd(q, end, &n, &ok) != NULL)
			break;
	}
	tok->type = IMAP_TOK_ATOM;
	tok->len = (size_t)(q - p);
	lx->lx_p = q;
	return 1;
}

ssize_t
imap_tok_string(const struct imap_tok *tok, char *dst, size_t dstlen)
{
	size_t i, o = 0;

	if (tok->type != IMAP_TOK_QUOTED) {
		if (tok->len >= dstlen ||
		    memchr(tok->p, '\0', tok->len) != NULL)
			return -1;
		memcpy(dst, tok->p, tok->len);
		dst[tok->len] = '\0';
		return (ssize_t)tok->len;
	}
	for (i = 0; i < tok->len; i++) {
		char c = tok->p[i];

		/* The lexer only lets \" and \\ through. */
		if (c == '\\' && i + 1 < tok->len)
			c = tok->p[++i];
		if (c == '\0' || o + 1 >= dstlen)
			return -1;
		dst[o++] = c;
	}
	if (o >= dstlen)
		return -1;
	dst[o] = '\0';
	return (ssize_t)o;
}

bool
imap_tok_is(const struct imap_tok *tok, const char *word)
{
	return imap_word_eq(tok->p, tok->len, word);
}

int
imap_parse_command_head(const char *line, size_t len, struct imap_tok *tag,
    struct imap_tok *cmd)
{
	struct imap_lexer lx;

	imap_lexer_init(&lx, line, len);
	if (imap_lex_next(&lx, tag) != 1 || tag->type != IMAP_TOK_ATOM ||
	    tag->p != line || !imap_tag_valid(tag->p, tag->len))
		return -1;
	if (lx.lx_p == lx.lx_end || *lx.lx_p != ' ')
		return -1;
	if (imap_lex_next(&lx, cmd) != 1 || cmd->type != IMAP_TOK_ATOM)
		return -1;
	return 0;
}

/* ---------------------------------------------------------- responses */

static const char *
imap_skip_sp(const char *p, const char *end)
{
	while (p < end && *p == ' ')
		p++;
	return p;
}

/* Status word at p, ending at SP or end; sets *p_r past it. */
static enum imap_resp_status
imap_resp_status_word(const char **p_r, const char *end)
{
	static const struct {
		const char *word;
		enum imap_resp_status st;
	} words[] = {
		{ "OK", IMAP_ST_OK }, { "NO", IMAP_ST_NO },
		{ "BAD", IMAP_ST_BAD }, { "BYE", IMAP_ST_BYE },
		{ "PREAUTH", IMAP_ST_PREAUTH },
	};
	const char *p = *p_r, *q = p;
	size_t i;

	while (q < end && *q != ' ')
		q++;
	for (i = 0; i < sizeof(words) / sizeof(words[0]); i++) {
		if (imap_word_eq(p, (size_t)(q - p), words[i].word)) {
			*p_r = q;
			return words[i].st;
		}
	}
	return IMAP_ST_NONE;
}

/* resp-text: optional "[code]" then human text. */
static void
imap_resp_text(struct imap_resp *r, const char *p, const char *end)
{
	const char *q;
	bool inq = false;

	p = imap_skip_sp(p, end);
	if (p < end && *p == '[') {
		/* A ']' in a quoted string (REFERRAL, BADCHARSET) is text. */
		for (q = p + 1; q < end; q++) {
			if (inq && *q == '\\' && q + 1 < end)
				q++;
			else if (*q == '"')
				inq = !inq;
			else if (!inq && *q == ']')
				break;
		}
		if (q < end) {
			r->code = p + 1;
			r->code_len = (size_t)(q - (p + 1));
			p = imap_skip_sp(q + 1, end);
		}
	}
	r->text = p;
	r->text_len = (size_t)(end - p);
}

void
imap_parse_response(const char *line, size_t len, struct imap_resp *r)
{
	const char *end, *p, *q;

	memset(r, 0, sizeof(*r));
	r->kind = IMAP_RESP_INVALID;
	r->status = IMAP_ST_NONE;
	r->text = line;
	if (len > 0 && line[len - 1] == '\n')
		len--;
	if (len > 0 && line[len - 1] == '\r')
		len--;
	end = line + len;
	if (len == 0)
		return;

	if (line[0] == '+') {
		/* Exchange sends a bare "+" for AUTHENTICATE. */
		if (len > 1 && line[1] != ' ')
			return;
		r->kind = IMAP_RESP_CONTINUATION;
		imap_resp_text(r, line + 1, end);
		return;
	}
	if (line[0] == '*') {
		if (len < 2 || line[1] != ' ')
			return;
		r->kind = IMAP_RESP_UNTAGGED;
		p = imap_skip_sp(line + 2, end);
		r->status = imap_resp_status_word(&p, end);
		if (r->status != IMAP_ST_NONE)
			imap_resp_text(r, p, end);
		else {
			r->text = p;
			r->text_len = (size_t)(end - p);
		}
		return;
	}

	for (q = line; q < end && *q != ' '; q++)
		;
	if (q == end || !imap_tag_valid(line, (size_t)(q - line)))
		return;
	p = imap_skip_sp(q, end);
	switch (imap_resp_status_word(&p, end)) {
	case IMAP_ST_OK:
		r->status = IMAP_ST_OK;
		break;
	case IMAP_ST_NO:
		r->status = IMAP_ST_NO;
		break;
	case IMAP_ST_BAD:
		r->status = IMAP_ST_BAD;
		break;
	default:
		return;
	}
	r->kind = IMAP_RESP_TAGGED;
	r->tag.type = IMAP_TOK_ATOM;
	r->tag.p = line;
	r->tag.len = (size_t)(q - line);
	imap_resp_text(r, p, end);
}

/* ------------------------------------------------------------ quoting */

ssize_t
imap_quote(char *dst, size_t dstlen, const char *s, size_t len)
{
	size_t i, need = 2, o = 0;

	for (i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c == '\0' || c == '\r' || c == '\n' || c >= 0x80)
			return -1;
		need += (c == '"' || c == '\\') ? 2 : 1;
	}
	if (need >= dstlen)
		return -2;
	dst[o++] = '"';
	for (i = 0; i < len; i++) {
		if (s[i] == '"' || s[i] == '\\')
			dst[o++] = '\\';
		dst[o++] = s[i];
	}
	dst[o++] = '"';
	dst[o] = '\0';
	return (ssize_t)o;
}
