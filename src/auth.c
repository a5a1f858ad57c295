/* auth.c - login name formats, mailbox rules, SASL PLAIN, upstream LOGIN. */
#include "auth.h"

#include <assert.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "imap_parse.h"
#include "util.h"

/* Largest decoded SASL PLAIN message we accept (authzid, authcid and
 * password together are far smaller); keeps the decode on the stack. */
#define AUTH_PLAIN_MAX 4096

enum auth_part {
	AUTH_P_DOMAIN,
	AUTH_P_ADMIN,
	AUTH_P_MAILBOX,
	AUTH_P_COUNT
};

static const char *const auth_part_names[] = {
	"{domain}", "{admin}", "{mailbox}"
};
static_assert(sizeof(auth_part_names) / sizeof(auth_part_names[0]) ==
    AUTH_P_COUNT, "auth_part_names out of sync with enum auth_part");

/* The placeholder starting at p, or -1 when p is literal text. */
static int
auth_placeholder(const char *p, size_t *len_r)
{
	size_t i, n;

	if (*p != '{')
		return -1;
	for (i = 0; i < AUTH_P_COUNT; i++) {
		n = strlen(auth_part_names[i]);
		if (strncmp(p, auth_part_names[i], n) == 0) {
			*len_r = n;
			return (int)i;
		}
	}
	return -1;
}

static bool
auth_is_sep(unsigned char c)
{
	return c == '/' || c == '\\';
}

/* Compare a format byte with a name byte: '\' and '/' are the same. */
static bool
auth_char_eq(unsigned char f, unsigned char c)
{
	return f == c || (auth_is_sep(f) && auth_is_sep(c));
}

/* True when c is punctuation that appears in the literal text of fmt
 * (separators equal).  Letters and digits of the text are not counted:
 * a format such as "imap:{admin}/{mailbox}" must allow "adm". */
static bool
auth_fmt_literal_has(const char *fmt, unsigned char c)
{
	size_t n;

	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	    (c >= '0' && c <= '9'))
		return false;
	while (*fmt != '\0') {
		if (auth_placeholder(fmt, &n) >= 0) {
			fmt += n;
			continue;
		}
		if (auth_char_eq((unsigned char)*fmt, c))
			return true;
		fmt++;
	}
	return false;
}

bool
auth_format_valid(const char *fmt)
{
	unsigned count[AUTH_P_COUNT] = { 0 };
	bool prev_placeholder = false;
	unsigned char c;
	size_t n;
	int ph;

	if (fmt == NULL)
		return false;
	while (*fmt != '\0') {
		ph = auth_placeholder(fmt, &n);
		if (ph >= 0) {
			if (prev_placeholder)
				return false;
			count[ph]++;
			prev_placeholder = true;
			fmt += n;
			continue;
		}
		c = (unsigned char)*fmt;
		/* Unknown "{...}" is most likely a typo: refuse it. */
		if (c == '{' || c == '}' || c == '"' || c < 0x20 || c >= 0x7f)
			return false;
		prev_placeholder = false;
		fmt++;
	}
	return count[AUTH_P_ADMIN] == 1 && count[AUTH_P_MAILBOX] == 1 &&
	    count[AUTH_P_DOMAIN] <= 1;
}

bool
auth_mailbox_valid(const char *mb, size_t len)
{
	unsigned char c;
	size_t i;

	if (mb == NULL || len == 0 || len > IMAPSHIM_MAILBOX_MAX)
		return false;
	for (i = 0; i < len; i++) {
		c = (unsigned char)mb[i];
		if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		    (c >= '0' && c <= '9'))
			continue;
		if (c == '.' || c == '_' || c == '-' || c == '+' || c == '@')
			continue;
		return false;
	}
	return true;
}

/* Validate one captured part and copy it into out. */
static int
auth_store_part(const char *fmt, enum auth_part part, const char *p,
    size_t len, struct auth_name *out)
{
	char *dst;
	size_t i, max;

	if (len == 0)
		return -1;
	/* No separator and no punctuation of the format's own literal
	 * text, so that the split is unambiguous ("bob*adm*x" is refused
	 * by "{mailbox}*{admin}"). */
	for (i = 0; i < len; i++) {
		if (auth_is_sep((unsigned char)p[i]) ||
		    auth_fmt_literal_has(fmt, (unsigned char)p[i]))
			return -1;
	}
	switch (part) {
	case AUTH_P_DOMAIN:
		dst = out->domain;
		max = sizeof(out->domain) - 1;
		break;
	case AUTH_P_ADMIN:
		dst = out->admin;
		max = sizeof(out->admin) - 1;
		break;
	case AUTH_P_MAILBOX:
		if (!auth_mailbox_valid(p, len))
			return -1;
		dst = out->mailbox;
		max = sizeof(out->mailbox) - 1;
		break;
	case AUTH_P_COUNT:
	default:
		return -1;
	}
	if (len > max)
		return -1;
	memcpy(dst, p, len);
	dst[len] = '\0';
	return 0;
}

/* First occurrence of lit (litlen bytes, separators equal) in s[0..len). */
static const char *
auth_find_literal(const char *s, size_t len, const char *lit, size_t litlen)
{
	size_t i, j;

	if (litlen > len)
		return NULL;
	for (i = 0; i + litlen <= len; i++) {
		for (j = 0; j < litlen; j++) {
			if (!auth_char_eq((unsigned char)lit[j],
			    (unsigned char)s[i + j]))
				break;
		}
		if (j == litlen)
			return s + i;
	}
	return NULL;
}

int
auth_parse_login(const char *fmt, const char *name, size_t len,
    struct auth_name *out)
{
	struct auth_name tmp;
	const char *fmt0 = fmt;
	const char *lit, *end, *stop;
	size_t i, n, litlen, pos;
	unsigned char c;
	int ph;

	memset(out, 0, sizeof(*out));
	if (fmt == NULL || name == NULL || !auth_format_valid(fmt))
		return -1;
	/* Nothing that could end or break out of an IMAP string. */
	for (i = 0; i < len; i++) {
		c = (unsigned char)name[i];
		if (c < 0x20 || c == 0x7f || c == '"')
			return -1;
	}

	memset(&tmp, 0, sizeof(tmp));
	pos = 0;
	while (*fmt != '\0') {
		ph = auth_placeholder(fmt, &n);
		if (ph < 0) {
			if (pos >= len || !auth_char_eq((unsigned char)*fmt,
			    (unsigned char)name[pos]))
				return -1;
			fmt++;
			pos++;
			continue;
		}
		fmt += n;
		/* The literal text that follows, up to the next placeholder. */
		lit = fmt;
		for (litlen = 0; lit[litlen] != '\0' &&
		    auth_placeholder(lit + litlen, &n) < 0; litlen++)
			;
		end = name + len;
		if (litlen == 0) {
			stop = end;
		} else {
			stop = auth_find_literal(name + pos, len - pos, lit,
			    litlen);
			if (stop == NULL)
				return -1;
		}
		if (auth_store_part(fmt0, (enum auth_part)ph, name + pos,
		    (size_t)(stop - (name + pos)), &tmp) == -1)
			return -1;
		pos = (size_t)(stop - name);
	}
	if (pos != len)
		return -1;
	*out = tmp;
	return 0;
}

int
auth_check_login(const char *fmt, const char *name, size_t len,
    const char *pass, size_t passlen, auth_password_fn password_of,
    const void *arg, struct auth_name *out, enum stats_auth_failure *why)
{
	const char *want;

	if (auth_parse_login(fmt, name, len, out) != 0) {
		*why = STATS_AUTH_FAIL_MALFORMED_NAME;
		return -1;
	}
	if ((want = password_of(arg, out->admin, strlen(out->admin))) == NULL) {
		*why = STATS_AUTH_FAIL_UNKNOWN_ADMIN;
		goto fail;
	}
	if (!util_secret_equal(pass, passlen, want, strlen(want))) {
		*why = STATS_AUTH_FAIL_WRONG_PASSWORD;
		goto fail;
	}
	return 0;
fail:
	memset(out, 0, sizeof(*out));
	return -1;
}

/* Base64 alphabet check; returns the number of '=' pads or -1. */
static int
auth_b64_check(const char *b64, size_t len)
{
	size_t i, pads = 0;
	unsigned char c;

	if (len == 0 || len % 4 != 0)
		return -1;
	for (i = 0; i < len; i++) {
		c = (unsigned char)b64[i];
		if (c == '=') {
			/* Only as the last one or two characters. */
			if (i < len - 2)
				return -1;
			pads++;
			continue;
		}
		if (pads > 0)
			return -1;	/* data after a pad */
		if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
		    (c >= '0' && c <= '9') || c == '+' || c == '/')
			continue;
		return -1;		/* whitespace and anything else */
	}
	return (int)pads;
}

static int
auth_copy_part(char *dst, size_t dstlen, const char *src, size_t len)
{
	if (dst == NULL || len >= dstlen)
		return -1;
	memcpy(dst, src, len);
	dst[len] = '\0';
	return 0;
}

static void
auth_clear(char *dst, size_t dstlen)
{
	if (dst != NULL && dstlen > 0)
		OPENSSL_cleanse(dst, dstlen);
}

int
auth_plain_decode(const char *b64, size_t len,
    char *authzid, size_t authzid_len,
    char *authcid, size_t authcid_len,
    char *passwd, size_t passwd_len)
{
	unsigned char raw[AUTH_PLAIN_MAX + 3];
	const char *msg = (const char *)raw;
	const char *nul1, *nul2;
	size_t dlen, zlen, clen, plen;
	int pads, r, rc = -1;

	if (b64 == NULL || len / 4 * 3 > sizeof(raw) ||
	    (pads = auth_b64_check(b64, len)) < 0)
		goto fail;
	r = EVP_DecodeBlock(raw, (const unsigned char *)b64, (int)len);
	/* EVP_DecodeBlock counts the pad bytes as zero octets. */
	if (r < 0 || (size_t)r != len / 4 * 3)
		goto out;
	dlen = (size_t)r - (size_t)pads;

	nul1 = memchr(msg, '\0', dlen);
	if (nul1 == NULL)
		goto out;
	nul2 = memchr(nul1 + 1, '\0', dlen - (size_t)(nul1 + 1 - msg));
	if (nul2 == NULL)
		goto out;
	/* Exactly two NULs: none in the password. */
	if (memchr(nul2 + 1, '\0', dlen - (size_t)(nul2 + 1 - msg)) != NULL)
		goto out;
	zlen = (size_t)(nul1 - msg);
	clen = (size_t)(nul2 - nul1 - 1);
	plen = dlen - (size_t)(nul2 + 1 - msg);
	if (clen == 0 || plen == 0)
		goto out;
	if (auth_copy_part(authzid, authzid_len, msg, zlen) == -1 ||
	    auth_copy_part(authcid, authcid_len, nul1 + 1, clen) == -1 ||
	    auth_copy_part(passwd, passwd_len, nul2 + 1, plen) == -1)
		goto out;
	rc = 0;
out:
	OPENSSL_cleanse(raw, sizeof(raw));
fail:
	if (rc == -1) {
		auth_clear(authzid, authzid_len);
		auth_clear(authcid, authcid_len);
		auth_clear(passwd, passwd_len);
	}
	return rc;
}

int
auth_format_login(const char *fmt, const char *domain, const char *admin,
    const char *mailbox, char *out, size_t outlen)
{
	const char *vals[AUTH_P_COUNT];
	size_t n, vlen, pos = 0;
	int ph;

	vals[AUTH_P_DOMAIN] = domain;
	vals[AUTH_P_ADMIN] = admin;
	vals[AUTH_P_MAILBOX] = mailbox;
	if (fmt == NULL || out == NULL || outlen == 0)
		return -1;
	while (*fmt != '\0') {
		ph = auth_placeholder(fmt, &n);
		if (ph < 0) {
			if (pos + 1 >= outlen)
				goto fail;
			out[pos++] = *fmt++;
			continue;
		}
		fmt += n;
		if (vals[ph] == NULL)
			goto fail;
		vlen = strlen(vals[ph]);
		if (vlen >= outlen - pos)
			goto fail;
		memcpy(out + pos, vals[ph], vlen);
		pos += vlen;
	}
	out[pos] = '\0';
	if (pos > (size_t)INT_MAX)
		goto fail;
	return (int)pos;
fail:
	out[0] = '\0';
	return -1;
}

/* A tag is an astring without '+' (RFC 3501): no atom-specials. */
static bool
auth_tag_valid(const char *tag)
{
	unsigned char c;

	if (tag == NULL || *tag == '\0' || strlen(tag) > IMAPSHIM_TAG_MAX)
		return false;
	for (; *tag != '\0'; tag++) {
		c = (unsigned char)*tag;
		if (c <= 0x20 || c >= 0x7f || strchr("(){%*\"\\+", c) != NULL)
			return false;
	}
	return true;
}

/* Append s[0..len) to out at *pos (always keeping room for a NUL). */
static int
auth_append(char *out, size_t outlen, size_t *pos, const char *s, size_t len)
{
	if (len >= outlen - *pos)
		return -1;
	memcpy(out + *pos, s, len);
	*pos += len;
	out[*pos] = '\0';
	return 0;
}

/* One LOGIN argument: a quoted string, or a {n+} literal when needed. */
static int
auth_append_arg(const char *s, bool literal_plus, char *out, size_t outlen,
    size_t *pos)
{
	char marker[32];
	size_t len = strlen(s);
	ssize_t q;
	int m;

	q = imap_quote(out + *pos, outlen - *pos, s, len);
	if (q >= 0) {
		if ((size_t)q >= outlen - *pos)
			return -1;
		*pos += (size_t)q;
		out[*pos] = '\0';
		return 0;
	}
	if (q != -1)
		return -1;		/* no room */
	/* strlen() stopped at the first NUL, so s holds none; CR, LF or
	 * 8-bit bytes need a literal, and only LITERAL+ avoids a round
	 * trip. */
	if (!literal_plus)
		return -1;
	m = snprintf(marker, sizeof(marker), "{%zu+}\r\n", len);
	if (m < 0 || (size_t)m >= sizeof(marker))
		return -1;
	if (auth_append(out, outlen, pos, marker, (size_t)m) == -1 ||
	    auth_append(out, outlen, pos, s, len) == -1)
		return -1;
	return 0;
}

int
auth_build_login(const char *tag, const char *user, const char *pass,
    bool literal_plus, char *out, size_t outlen)
{
	size_t pos = 0;

	if (out == NULL || outlen == 0)
		return -1;
	if (!auth_tag_valid(tag) || user == NULL || pass == NULL)
		goto fail;
	if (auth_append(out, outlen, &pos, tag, strlen(tag)) == -1 ||
	    auth_append(out, outlen, &pos, " LOGIN ", 7) == -1 ||
	    auth_append_arg(user, literal_plus, out, outlen, &pos) == -1 ||
	    auth_append(out, outlen, &pos, " ", 1) == -1 ||
	    auth_append_arg(pass, literal_plus, out, outlen, &pos) == -1 ||
	    auth_append(out, outlen, &pos, "\r\n", 2) == -1)
		goto fail;
	if (pos > (size_t)INT_MAX)
		goto fail;
	return (int)pos;
fail:
	/* The buffer may hold part of the password by now. */
	OPENSSL_cleanse(out, outlen);
	return -1;
}
