/*
 * fuzz_login.c - libFuzzer harness for auth.c: client login names, SASL
 * PLAIN decoding and the upstream LOGIN command.
 *
 * Input: one selector byte, then up to six parts separated by NUL bytes:
 *   fmt, name, b64, tag, user, pass
 * (fmt is used when auth_format_valid() accepts it, else one of the
 * built-in formats chosen by the selector).  Properties checked:
 *
 *   auth_parse_login   on success every part is non-empty, holds no
 *                      separator, the mailbox is valid, and expanding the
 *                      format with the parts (auth_format_login) gives the
 *                      name back ('/' and '\' equal) and parses to the same
 *                      parts; on failure the output is all zero.
 *   auth_plain_decode  on success the parts re-encode and decode to
 *                      themselves; on failure the caller's buffers are
 *                      wiped; tag/user/pass encoded as PLAIN decode back.
 *   auth_build_login   the command is one NUL-free string ending in CRLF
 *                      that the daemon's own framer and lexer read back as
 *                      TAG LOGIN user pass; it only fails for a bad tag,
 *                      too small a buffer, or bytes that need a literal
 *                      without LITERAL+; on failure out is wiped.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "auth.h"
#include "imap_parse.h"
#include "imapshim.h"

#define CHECK(cond) do { \
	if (!(cond)) { \
		fprintf(stderr, "%s:%d: property failed: %s\n", __FILE__, \
		    __LINE__, #cond); \
		abort(); \
	} \
} while (0)

static const char *const formats[] = {
	"{domain}/{admin}/{mailbox}",
	"{mailbox}*{admin}",
	"{admin}\\{mailbox}",
	"imap:{admin}/{mailbox}@{domain}",
	"{mailbox}@{domain}#{admin}",
	"{domain}/{admin}/{mailbox}/",
	"x{admin}.{mailbox}",
	"{admin}+{mailbox}",
};

static bool
all_zero(const void *p, size_t n)
{
	const unsigned char *c = p;
	size_t i;

	for (i = 0; i < n; i++)
		if (c[i] != 0)
			return false;
	return true;
}

static bool
is_sep(char c)
{
	return c == '/' || c == '\\';
}

/* Equal, with '/' and '\' the same character. */
static bool
sep_equal(const char *a, size_t alen, const char *b, size_t blen)
{
	size_t i;

	if (alen != blen)
		return false;
	for (i = 0; i < alen; i++)
		if (a[i] != b[i] && !(is_sep(a[i]) && is_sep(b[i])))
			return false;
	return true;
}

static void
check_parse(const char *fmt, const char *name, size_t len)
{
	struct auth_name an, an2;
	char back[1024];
	int r, n;

	r = auth_parse_login(fmt, name, len, &an);
	CHECK(r == 0 || r == -1);
	if (r == -1) {
		CHECK(all_zero(&an, sizeof(an)));
		return;
	}
	CHECK(an.admin[0] != '\0' && an.mailbox[0] != '\0');
	CHECK((an.domain[0] != '\0') == (strstr(fmt, "{domain}") != NULL));
	CHECK(auth_mailbox_valid(an.mailbox, strlen(an.mailbox)));
	CHECK(strpbrk(an.admin, "/\\") == NULL);
	CHECK(strpbrk(an.domain, "/\\") == NULL);
	CHECK(strlen(an.admin) <= IMAPSHIM_NAME_MAX);
	CHECK(strlen(an.domain) <= IMAPSHIM_NAME_MAX);
	CHECK(memchr(name, '\0', len) == NULL);
	n = auth_format_login(fmt, an.domain, an.admin, an.mailbox, back,
	    sizeof(back));
	CHECK(n >= 0 && (size_t)n == strlen(back));
	CHECK(sep_equal(back, (size_t)n, name, len));
	CHECK(auth_parse_login(fmt, back, (size_t)n, &an2) == 0);
	CHECK(strcmp(an.domain, an2.domain) == 0);
	CHECK(strcmp(an.admin, an2.admin) == 0);
	CHECK(strcmp(an.mailbox, an2.mailbox) == 0);
	/* Too small a buffer fails cleanly. */
	if (n > 0)
		CHECK(auth_format_login(fmt, an.domain, an.admin, an.mailbox,
		    back, (size_t)n) == -1);
}

static void
check_plain(const char *b64, size_t len, unsigned sel)
{
	char z[300], c[300], p[IMAPSHIM_PASSWORD_MAX + 1];
	size_t zl = (sel & 1) ? 8 : sizeof(z);
	size_t cl = (sel & 2) ? 16 : sizeof(c);
	unsigned char raw[1500];
	char enc[2100], z2[300], c2[300], p2[IMAPSHIM_PASSWORD_MAX + 1];
	size_t rl, a, b, d;
	int r, n;

	memset(z, 'Z', sizeof(z));
	memset(c, 'C', sizeof(c));
	memset(p, 'P', sizeof(p));
	r = auth_plain_decode(b64, len, z, zl, c, cl, p, sizeof(p));
	CHECK(r == 0 || r == -1);
	if (r == -1) {
		CHECK(all_zero(z, zl) && all_zero(c, cl) && all_zero(p, sizeof(p)));
		return;
	}
	a = strnlen(z, zl);
	b = strnlen(c, cl);
	d = strnlen(p, sizeof(p));
	CHECK(a < zl && b < cl && d < sizeof(p));
	CHECK(b > 0 && d > 0);
	CHECK(a + b + d + 2 <= len / 4 * 3);
	/* Encode the parts again: they decode to themselves. */
	memcpy(raw, z, a);
	raw[a] = '\0';
	memcpy(raw + a + 1, c, b);
	raw[a + 1 + b] = '\0';
	memcpy(raw + a + 2 + b, p, d);
	rl = a + b + d + 2;
	CHECK(rl <= sizeof(raw));
	n = EVP_EncodeBlock((unsigned char *)enc, raw, (int)rl);
	CHECK(n > 0 && (size_t)n < sizeof(enc));
	CHECK(auth_plain_decode(enc, (size_t)n, z2, sizeof(z2), c2, sizeof(c2),
	    p2, sizeof(p2)) == 0);
	CHECK(strcmp(z, z2) == 0 && strcmp(c, c2) == 0 && strcmp(p, p2) == 0);
}

/* authzid, authcid, password as PLAIN: must decode back when well formed. */
static void
check_plain_encode(const char *zid, const char *cid, const char *pw)
{
	unsigned char raw[1500];
	char enc[2100], z[300], c[300], p[IMAPSHIM_PASSWORD_MAX + 1];
	size_t a = strlen(zid), b = strlen(cid), d = strlen(pw);
	int n, r;

	if (a >= sizeof(z) || b >= sizeof(c) || d >= sizeof(p) ||
	    a + b + d + 2 > sizeof(raw))
		return;
	memcpy(raw, zid, a);
	raw[a] = '\0';
	memcpy(raw + a + 1, cid, b);
	raw[a + 1 + b] = '\0';
	memcpy(raw + a + 2 + b, pw, d);
	n = EVP_EncodeBlock((unsigned char *)enc, raw, (int)(a + b + d + 2));
	CHECK(n > 0);
	r = auth_plain_decode(enc, (size_t)n, z, sizeof(z), c, sizeof(c), p,
	    sizeof(p));
	if (b == 0 || d == 0) {
		CHECK(r == -1);
		return;
	}
	CHECK(r == 0);
	CHECK(strcmp(z, zid) == 0 && strcmp(c, cid) == 0 && strcmp(p, pw) == 0);
}

static bool
tag_ok(const char *t)
{
	size_t i, n = strlen(t);

	if (n == 0 || n > IMAPSHIM_TAG_MAX)
		return false;
	for (i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)t[i];

		if (ch <= 0x20 || ch >= 0x7f || strchr("(){%*\"\\+", ch) != NULL)
			return false;
	}
	return true;
}

static bool
quotable(const char *s)
{
	for (; *s != '\0'; s++) {
		unsigned char ch = (unsigned char)*s;

		if (ch == '\r' || ch == '\n' || ch >= 0x80)
			return false;
	}
	return true;
}

/* Frame the built command with the daemon's framer, assemble it with its
 * literal octets inline, and lex it back. */
static void
reread_login(const char *cmd, size_t len, const char *tag, const char *user,
    const char *pass)
{
	struct imap_framer fr;
	struct imap_frame f;
	struct imap_lexer lx;
	struct imap_tok t;
	char *asm_buf = malloc(len + 1), val[4096];
	size_t off = 0, alen = 0;
	bool done = false;
	ssize_t n;

	CHECK(asm_buf != NULL);
	imap_framer_init(&fr, len + 1, len + 1);
	while (!done) {
		imap_framer_next(&fr, cmd + off, len - off, &f);
		CHECK(f.kind == IMAP_FR_LINE || f.kind == IMAP_FR_LITERAL);
		CHECK(!f.lit_toobig);
		memcpy(asm_buf + alen, cmd + off, f.len);
		alen += f.len;
		off += f.len;
		if (f.kind == IMAP_FR_LINE) {
			CHECK(f.first == (off == f.len));
			if (f.has_lit)
				CHECK(f.lit_nonsync);
			done = f.last;
		}
	}
	CHECK(off == len);
	imap_lexer_init(&lx, asm_buf, alen);
	CHECK(imap_lex_next(&lx, &t) == 1 && t.type == IMAP_TOK_ATOM);
	CHECK(t.len == strlen(tag) && memcmp(t.p, tag, t.len) == 0);
	CHECK(imap_lex_next(&lx, &t) == 1 && imap_tok_is(&t, "LOGIN"));
	CHECK(imap_lex_next(&lx, &t) == 1);
	CHECK(t.type == IMAP_TOK_QUOTED || t.type == IMAP_TOK_LITERAL);
	n = imap_tok_string(&t, val, sizeof(val));
	CHECK(n >= 0 && strcmp(val, user) == 0);
	CHECK(imap_lex_next(&lx, &t) == 1);
	CHECK(t.type == IMAP_TOK_QUOTED || t.type == IMAP_TOK_LITERAL);
	n = imap_tok_string(&t, val, sizeof(val));
	CHECK(n >= 0 && strcmp(val, pass) == 0);
	CHECK(imap_lex_next(&lx, &t) == 1 && t.type == IMAP_TOK_EOL);
	free(asm_buf);
}

static void
check_build(const char *tag, const char *user, const char *pass, unsigned sel)
{
	bool lp = (sel & 4) != 0;
	size_t outlen = (sel & 8) ? 24 + (sel >> 4) : 8192;
	char *out = malloc(outlen);
	int r;

	CHECK(out != NULL);
	memset(out, 'X', outlen);
	r = auth_build_login(tag, user, pass, lp, out, outlen);
	CHECK(r >= -1);
	if (r == -1) {
		CHECK(all_zero(out, outlen));
		/* Fails only for a reason the header names. */
		if (outlen == 8192 && strlen(user) < 1000 && strlen(pass) < 1000)
			CHECK(!tag_ok(tag) || (!lp && (!quotable(user) ||
			    !quotable(pass))));
		free(out);
		return;
	}
	CHECK(tag_ok(tag));
	CHECK((size_t)r < outlen && out[r] == '\0' && strlen(out) == (size_t)r);
	CHECK(r >= 2 && out[r - 2] == '\r' && out[r - 1] == '\n');
	if (!lp)
		CHECK(quotable(user) && quotable(pass));
	reread_login(out, (size_t)r, tag, user, pass);
	free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *part[6];
	size_t plen[6];
	const char *p, *end, *nul, *fmt;
	unsigned sel;
	int i;

	if (size < 1 || size > 8192)
		return 0;
	sel = data[0];
	p = (const char *)data + 1;
	end = (const char *)data + size;
	for (i = 0; i < 6; i++) {
		nul = p < end ? memchr(p, '\0', (size_t)(end - p)) : NULL;
		plen[i] = nul != NULL ? (size_t)(nul - p) :
		    (p < end ? (size_t)(end - p) : 0);
		part[i] = malloc(plen[i] + 1);
		CHECK(part[i] != NULL);
		if (plen[i] > 0)
			memcpy(part[i], p, plen[i]);
		part[i][plen[i]] = '\0';
		p += plen[i] + (nul != NULL ? 1 : 0);
		if (p > end)
			p = end;
	}

	fmt = auth_format_valid(part[0]) ? part[0] :
	    formats[sel % (sizeof(formats) / sizeof(formats[0]))];
	CHECK(auth_format_valid(fmt));
	/* The name as the client sent it: bytes, not a C string. */
	check_parse(fmt, part[1], plen[1]);
	check_parse(formats[(sel >> 3) % (sizeof(formats) / sizeof(formats[0]))],
	    part[1], plen[1]);
	(void)auth_mailbox_valid(part[1], plen[1]);

	check_plain(part[2], plen[2], sel);
	check_plain_encode(part[3], part[4], part[5]);
	check_build(part[3], part[4], part[5], sel);

	for (i = 0; i < 6; i++)
		free(part[i]);
	return 0;
}
