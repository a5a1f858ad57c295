/* test_auth.c - login formats, injection attempts, SASL PLAIN, LOGIN. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <cmocka.h>
#include <openssl/evp.h>

#include "auth.h"

#define DEFAULT_FMT "{domain}/{admin}/{mailbox}"

static int
parse(const char *fmt, const char *name, struct auth_name *out)
{
	return auth_parse_login(fmt, name, strlen(name), out);
}

/* The one admin account of the login tests: "NPUMAdmin" (any case). */
static const char *
one_admin(const void *arg, const char *name, size_t len)
{
	(void)arg;
	return len == 9 && strncasecmp(name, "NPUMAdmin", 9) == 0 ?
	    "s3cret" : NULL;
}

static int
check(const char *name, const char *pass, struct auth_name *out,
    enum stats_auth_failure *why)
{
	return auth_check_login(DEFAULT_FMT, name, strlen(name), pass,
	    strlen(pass), one_admin, NULL, out, why);
}

/* Each refusal says why: the name's form, the account, the password. */
static void
test_check_login_reasons(void **state)
{
	struct auth_name n;
	enum stats_auth_failure why = STATS_AUTH_FAIL_COUNT;

	(void)state;
	assert_int_equal(check("example.com/npumadmin/vm1", "s3cret", &n, &why), 0);
	assert_string_equal(n.admin, "npumadmin");
	assert_string_equal(n.mailbox, "vm1");
	assert_int_equal(why, STATS_AUTH_FAIL_COUNT);
	assert_int_equal(check("vm1@example.com", "s3cret", &n, &why), -1);
	assert_int_equal(why, STATS_AUTH_FAIL_MALFORMED_NAME);
	assert_int_equal(check("example.com/Nobody/vm1", "s3cret", &n, &why), -1);
	assert_int_equal(why, STATS_AUTH_FAIL_UNKNOWN_ADMIN);
	assert_string_equal(n.mailbox, "");
	assert_int_equal(check("example.com/NPUMAdmin/vm1", "s3cre", &n, &why), -1);
	assert_int_equal(why, STATS_AUTH_FAIL_WRONG_PASSWORD);
	assert_string_equal(n.admin, "");
	assert_int_equal(check("example.com/NPUMAdmin/vm1", "", &n, &why), -1);
	assert_int_equal(why, STATS_AUTH_FAIL_WRONG_PASSWORD);
}

static void
test_format_valid(void **state)
{
	(void)state;
	assert_true(auth_format_valid(DEFAULT_FMT));
	assert_true(auth_format_valid("{domain}\\{admin}\\{mailbox}"));
	assert_true(auth_format_valid("{admin}/{mailbox}"));
	assert_true(auth_format_valid("{mailbox}*{admin}"));
	assert_true(auth_format_valid("{mailbox}@{domain}#{admin}"));
	assert_true(auth_format_valid("x-{admin}::{mailbox}-y"));

	assert_false(auth_format_valid(NULL));
	assert_false(auth_format_valid(""));
	assert_false(auth_format_valid("{admin}"));
	assert_false(auth_format_valid("{mailbox}"));
	assert_false(auth_format_valid("{domain}/{mailbox}"));
	/* Adjacent placeholders cannot be split. */
	assert_false(auth_format_valid("{admin}{mailbox}"));
	assert_false(auth_format_valid("{domain}{admin}/{mailbox}"));
	/* Duplicates. */
	assert_false(auth_format_valid("{admin}/{mailbox}/{admin}"));
	assert_false(auth_format_valid("{admin}/{mailbox}/{mailbox}"));
	assert_false(auth_format_valid("{domain}/{domain}/{admin}/{mailbox}"));
	/* Unknown or broken placeholders, quotes, control bytes. */
	assert_false(auth_format_valid("{domian}/{admin}/{mailbox}"));
	assert_false(auth_format_valid("{admin}/{mailbox"));
	assert_false(auth_format_valid("{admin}}/{mailbox}"));
	assert_false(auth_format_valid("{admin}\"{mailbox}"));
	assert_false(auth_format_valid("{admin}\t{mailbox}"));
}

static void
test_parse_default_both_separators(void **state)
{
	struct auth_name n;

	(void)state;
	assert_int_equal(parse(DEFAULT_FMT, "example.com/NPUMAdmin1/bob", &n),
	    0);
	assert_string_equal(n.domain, "example.com");
	assert_string_equal(n.admin, "NPUMAdmin1");
	assert_string_equal(n.mailbox, "bob");

	/* Backslashes, case kept. */
	assert_int_equal(parse(DEFAULT_FMT, "EXAMPLE\\NpumAdmin1\\Bob.Smith",
	    &n), 0);
	assert_string_equal(n.domain, "EXAMPLE");
	assert_string_equal(n.admin, "NpumAdmin1");
	assert_string_equal(n.mailbox, "Bob.Smith");

	/* Mixed separators. */
	assert_int_equal(parse(DEFAULT_FMT, "EXAMPLE\\adm/bob@example.com",
	    &n), 0);
	assert_string_equal(n.domain, "EXAMPLE");
	assert_string_equal(n.admin, "adm");
	assert_string_equal(n.mailbox, "bob@example.com");

	/* A backslash format accepts slashes too. */
	assert_int_equal(parse("{domain}\\{admin}\\{mailbox}", "d/a/m", &n), 0);
	assert_string_equal(n.domain, "d");
	assert_string_equal(n.admin, "a");
	assert_string_equal(n.mailbox, "m");

	/* Only len bytes are read. */
	assert_int_equal(auth_parse_login(DEFAULT_FMT, "d/a/mbox-and-more", 8,
	    &n), 0);
	assert_string_equal(n.mailbox, "mbox");
}

static void
test_parse_other_formats(void **state)
{
	struct auth_name n;

	(void)state;
	assert_int_equal(parse("{admin}/{mailbox}", "NPUMAdmin1/bob", &n), 0);
	assert_string_equal(n.domain, "");
	assert_string_equal(n.admin, "NPUMAdmin1");
	assert_string_equal(n.mailbox, "bob");
	assert_int_equal(parse("{admin}/{mailbox}", "NPUMAdmin1\\bob", &n), 0);
	assert_string_equal(n.mailbox, "bob");
	assert_int_equal(parse("{admin}/{mailbox}", "dom/adm/bob", &n), -1);

	/* Dovecot master-user form. */
	assert_int_equal(parse("{mailbox}*{admin}", "bob@example.com*Master",
	    &n), 0);
	assert_string_equal(n.mailbox, "bob@example.com");
	assert_string_equal(n.admin, "Master");
	assert_string_equal(n.domain, "");
	assert_int_equal(parse("{mailbox}*{admin}", "bob*", &n), -1);
	assert_int_equal(parse("{mailbox}*{admin}", "*Master", &n), -1);
	assert_int_equal(parse("{mailbox}*{admin}", "bob*Master*x", &n), -1);
	assert_int_equal(parse("{mailbox}*{admin}", "bob/Master", &n), -1);

	assert_int_equal(parse("{mailbox}@{domain}#{admin}",
	    "bob.smith@Example.COM#Adm", &n), 0);
	assert_string_equal(n.mailbox, "bob.smith");
	assert_string_equal(n.domain, "Example.COM");
	assert_string_equal(n.admin, "Adm");
	assert_int_equal(parse("{mailbox}@{domain}#{admin}", "bob@ex#", &n),
	    -1);
	assert_int_equal(parse("{mailbox}@{domain}#{admin}", "bob#ex@adm",
	    &n), -1);

	/* Leading and trailing literal text. */
	assert_int_equal(parse("imap:{admin}/{mailbox}!", "imap:adm/bob!", &n),
	    0);
	assert_string_equal(n.admin, "adm");
	assert_string_equal(n.mailbox, "bob");
	assert_int_equal(parse("imap:{admin}/{mailbox}!", "imap:adm/bob", &n),
	    -1);
	assert_int_equal(parse("imap:{admin}/{mailbox}!", "IMAP:adm/bob!",
	    &n), -1);
	assert_int_equal(parse("imap:{admin}/{mailbox}!", "imap:adm/bob!!",
	    &n), -1);

	/* An invalid format never matches. */
	assert_int_equal(parse("{admin}{mailbox}", "adm/bob", &n), -1);
}

static void
test_parse_injection(void **state)
{
	static const char *const bad[] = {
		"example.com/NPUMAdmin1/bob\r\nA LOGOUT",
		"example.com/NPUMAdmin1/bob\" x",
		"example.com/NPUMAdmin1/bob/extra",
		"example.com/NPUMAdmin1/bob\\extra",
		"example.com/NPUMAdmin1/bob*other",
		"example.com/NPUMAdmin1/",
		"example.com//bob",
		"/NPUMAdmin1/bob",
		"example.com/NPUMAdmin1",
		"example.com",
		"",
		"example.com/NPUM\"Admin1/bob",
		"exa\nmple.com/NPUMAdmin1/bob",
		"example.com/NPUMAdmin1/bob\n",
		"example.com/NPUMAdmin1/bob\r",
		"example.com/NPUMAdmin1/bob\t",
		"example.com/NPUM\033Admin1/bob",
		"example.com/NPUMAdmin1\x7f/bob",
		"example.com/NPUMAdmin1/bob{5}",
		"example.com/NPUMAdmin1/bob x",
		"example.com/NPUMAdmin1/bob%",
	};
	struct auth_name n;
	size_t i;

	(void)state;
	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		memset(&n, 'Z', sizeof(n));
		if (parse(DEFAULT_FMT, bad[i], &n) != -1)
			fail_msg("accepted: \"%s\"", bad[i]);
		/* Nothing half-parsed is left behind. */
		assert_string_equal(n.mailbox, "");
		assert_string_equal(n.admin, "");
	}
	/* An embedded NUL (len covers it) is refused. */
	assert_int_equal(auth_parse_login(DEFAULT_FMT,
	    "example.com/NPUMAdmin1/bob\0x", 28, &n), -1);
	assert_int_equal(auth_parse_login(DEFAULT_FMT,
	    "example.com/NPUMAdmin1/bob\0", 27, &n), -1);
}

static void
test_parse_part_lengths(void **state)
{
	char name[2048], part[IMAPSHIM_NAME_MAX + 2];
	struct auth_name n;

	(void)state;
	memset(part, 'a', sizeof(part));
	/* Admin of exactly IMAPSHIM_NAME_MAX bytes is fine... */
	snprintf(name, sizeof(name), "dom/%.*s/bob", IMAPSHIM_NAME_MAX, part);
	assert_int_equal(parse(DEFAULT_FMT, name, &n), 0);
	assert_int_equal(strlen(n.admin), IMAPSHIM_NAME_MAX);
	/* ...one more is not. */
	snprintf(name, sizeof(name), "dom/%.*s/bob", IMAPSHIM_NAME_MAX + 1,
	    part);
	assert_int_equal(parse(DEFAULT_FMT, name, &n), -1);
	snprintf(name, sizeof(name), "%.*s/adm/bob", IMAPSHIM_NAME_MAX + 1,
	    part);
	assert_int_equal(parse(DEFAULT_FMT, name, &n), -1);
	snprintf(name, sizeof(name), "%.*s/adm/bob", IMAPSHIM_NAME_MAX, part);
	assert_int_equal(parse(DEFAULT_FMT, name, &n), 0);
	/* Mailbox at 256 and 257 bytes. */
	snprintf(name, sizeof(name), "dom/adm/%.*s", IMAPSHIM_MAILBOX_MAX,
	    part);
	assert_int_equal(parse(DEFAULT_FMT, name, &n), 0);
	assert_int_equal(strlen(n.mailbox), IMAPSHIM_MAILBOX_MAX);
	snprintf(name, sizeof(name), "dom/adm/%.*s", IMAPSHIM_MAILBOX_MAX + 1,
	    part);
	assert_int_equal(parse(DEFAULT_FMT, name, &n), -1);
}

static void
test_mailbox_valid(void **state)
{
	char mb[IMAPSHIM_MAILBOX_MAX + 2];
	static const char *const good_chars = "azAZ09._-+@";
	static const char *const bad_chars = " *%/\\\"(){}[]!#$&'`~;:,<>?=|^";
	char one[2] = { 0, 0 };
	size_t i;

	(void)state;
	memset(mb, 'x', sizeof(mb));
	assert_true(auth_mailbox_valid(mb, 1));
	assert_true(auth_mailbox_valid(mb, IMAPSHIM_MAILBOX_MAX));
	assert_false(auth_mailbox_valid(mb, IMAPSHIM_MAILBOX_MAX + 1));
	assert_false(auth_mailbox_valid(mb, 0));
	assert_false(auth_mailbox_valid("", 0));
	assert_false(auth_mailbox_valid(NULL, 3));

	assert_true(auth_mailbox_valid("Bob.Smith_2-x+tag@example.com", 29));
	for (i = 0; good_chars[i] != '\0'; i++) {
		one[0] = good_chars[i];
		assert_true(auth_mailbox_valid(one, 1));
		/* Also inside a longer name. */
		snprintf(mb, sizeof(mb), "ab%cc", good_chars[i]);
		assert_true(auth_mailbox_valid(mb, 4));
	}
	for (i = 0; bad_chars[i] != '\0'; i++) {
		snprintf(mb, sizeof(mb), "ab%cc", bad_chars[i]);
		if (auth_mailbox_valid(mb, 4))
			fail_msg("accepted '%c'", bad_chars[i]);
	}
	assert_false(auth_mailbox_valid("b\xc3\xb6rje", 6));
	assert_false(auth_mailbox_valid("bob\x80", 4));
	assert_false(auth_mailbox_valid("bob\r\n", 5));
	assert_false(auth_mailbox_valid("bob\t", 4));
	assert_false(auth_mailbox_valid("bo\0b", 4));
	assert_false(auth_mailbox_valid("bob\x7f", 4));
}

/* base64 of the len bytes at raw into a static buffer. */
static const char *
b64(const char *raw, size_t len)
{
	static char out[1024];

	assert_true(EVP_EncodeBlock((unsigned char *)out,
	    (const unsigned char *)raw, (int)len) >= 0);
	return out;
}

static int
plain(const char *b, char *z, char *c, char *p)
{
	return auth_plain_decode(b, strlen(b), z, 300, c, 300, p, 300);
}

static void
test_plain_decode(void **state)
{
	char z[300], c[300], p[300];
	const char *b;

	(void)state;
	/* Without authzid; 1, 2 and 0 pad characters. */
	b = b64("\0dom/adm/bob\0secret", 19);
	assert_int_equal(plain(b, z, c, p), 0);
	assert_string_equal(z, "");
	assert_string_equal(c, "dom/adm/bob");
	assert_string_equal(p, "secret");

	b = b64("\0a\0p", 4);
	assert_non_null(strstr(b, "=="));
	assert_int_equal(plain(b, z, c, p), 0);
	assert_string_equal(c, "a");
	assert_string_equal(p, "p");

	b = b64("\0a\0pw", 5);
	assert_non_null(strchr(b, '='));
	assert_null(strstr(b, "=="));
	assert_int_equal(plain(b, z, c, p), 0);
	assert_string_equal(c, "a");
	assert_string_equal(p, "pw");

	b = b64("\0ab\0pw", 6);
	assert_null(strchr(b, '='));
	assert_int_equal(plain(b, z, c, p), 0);
	assert_string_equal(c, "ab");
	assert_string_equal(p, "pw");

	/* With authzid. */
	b = b64("bob\0dom/adm\0p a \"ss\\", 20);
	assert_int_equal(plain(b, z, c, p), 0);
	assert_string_equal(z, "bob");
	assert_string_equal(c, "dom/adm");
	assert_string_equal(p, "p a \"ss\\");

	/* A known vector: "\0tim\0tanstaaftanstaaf" (RFC 4616). */
	assert_int_equal(plain("AHRpbQB0YW5zdGFhZnRhbnN0YWFm", z, c, p), 0);
	assert_string_equal(c, "tim");
	assert_string_equal(p, "tanstaaftanstaaf");
}

static void
test_plain_decode_bad(void **state)
{
	char z[300], c[300], p[300];
	char small[4];
	const char *b;

	(void)state;
	/* Bad base64. */
	assert_int_equal(plain("", z, c, p), -1);
	assert_int_equal(plain("=", z, c, p), -1);
	assert_int_equal(plain("AHRpbQB0YW5zdGFhZnRhbnN0YWF", z, c, p), -1);
	assert_int_equal(plain("AHRpbQB0 YW5zdGFhZnRhbnN0YWFm", z, c, p), -1);
	assert_int_equal(plain("AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n", z, c, p),
	    -1);
	assert_int_equal(plain(" AHRpbQB0YW5zdGFhZnRhbnN0YWFm", z, c, p), -1);
	assert_int_equal(plain("AHRpbQB0YW5zdGFhZnRhbnN0YW!m", z, c, p), -1);
	assert_int_equal(plain("AHRp=QB0YW5zdGFhZnRhbnN0YWFm", z, c, p), -1);
	assert_int_equal(plain("AHRpbQB0YW5zdGFhZnRhbnN0Y===", z, c, p), -1);
	assert_int_equal(plain("AHRpbQB0YW5zdGFhZnRhbnN0Y=Fm", z, c, p), -1);
	assert_int_equal(plain("AGEAcHc=AGEAcHc=", z, c, p), -1);
	assert_int_equal(plain("*", z, c, p), -1);

	/* Wrong NUL counts. */
	b = b64("dom/adm/bob secret", 18);
	assert_int_equal(plain(b, z, c, p), -1);
	b = b64("\0dom/adm/bob secret", 19);
	assert_int_equal(plain(b, z, c, p), -1);
	b = b64("\0dom\0adm\0secret", 15);
	assert_int_equal(plain(b, z, c, p), -1);
	b = b64("\0adm\0secret\0", 12);
	assert_int_equal(plain(b, z, c, p), -1);

	/* Empty authcid or password. */
	b = b64("bob\0\0secret", 11);
	assert_int_equal(plain(b, z, c, p), -1);
	b = b64("\0adm\0", 5);
	assert_int_equal(plain(b, z, c, p), -1);
	b = b64("\0\0", 2);
	assert_int_equal(plain(b, z, c, p), -1);

	/* A part too long for its buffer; outputs are wiped. */
	b = b64("\0adm\0secret", 11);
	assert_int_equal(auth_plain_decode(b, strlen(b), z, sizeof(z), c,
	    sizeof(c), small, sizeof(small)), -1);
	assert_string_equal(c, "");
	assert_string_equal(small, "");
	assert_int_equal(auth_plain_decode(b, strlen(b), z, sizeof(z), c,
	    sizeof(c), p, 7), 0);
	assert_int_equal(auth_plain_decode(b, strlen(b), z, sizeof(z), small,
	    3, p, sizeof(p)), -1);
	b = b64("bob\0adm\0secret", 14);
	assert_int_equal(auth_plain_decode(b, strlen(b), small, 3, c,
	    sizeof(c), p, sizeof(p)), -1);
	assert_int_equal(auth_plain_decode(b, strlen(b), small, 4, c,
	    sizeof(c), p, sizeof(p)), 0);
	assert_string_equal(small, "bob");
}

static void
test_plain_decode_huge(void **state)
{
	char z[300], c[300], p[300];
	char *big;

	(void)state;
	big = malloc(20001);
	assert_non_null(big);
	memset(big, 'A', 20000);
	big[20000] = '\0';
	assert_int_equal(plain(big, z, c, p), -1);
	free(big);
}

static void
test_format_login(void **state)
{
	char out[64];

	(void)state;
	assert_int_equal(auth_format_login(DEFAULT_FMT, "example.com",
	    "NPUMAdmin1", "bob", out, sizeof(out)), 26);
	assert_string_equal(out, "example.com/NPUMAdmin1/bob");
	assert_int_equal(auth_format_login("{mailbox}*{admin}", NULL, "master",
	    "bob@ex.com", out, sizeof(out)), 17);
	assert_string_equal(out, "bob@ex.com*master");
	assert_int_equal(auth_format_login("{admin}\\{mailbox}", "", "a", "b",
	    out, sizeof(out)), 3);
	assert_string_equal(out, "a\\b");
	/* A placeholder without a value. */
	assert_int_equal(auth_format_login(DEFAULT_FMT, NULL, "a", "b", out,
	    sizeof(out)), -1);
	/* Room: 5 bytes plus NUL. */
	assert_int_equal(auth_format_login(DEFAULT_FMT, "d", "a", "b", out, 6),
	    5);
	assert_string_equal(out, "d/a/b");
	assert_int_equal(auth_format_login(DEFAULT_FMT, "d", "a", "b", out, 5),
	    -1);
	assert_int_equal(auth_format_login(DEFAULT_FMT, "d", "a", "bb", out, 6),
	    -1);
	assert_int_equal(auth_format_login(DEFAULT_FMT, "d", "a", "b", out, 0),
	    -1);
	/* Round trip through the parser. */
	{
		struct auth_name n;

		assert_int_equal(auth_format_login(DEFAULT_FMT, "dom", "Adm",
		    "Bob", out, sizeof(out)), 11);
		assert_int_equal(parse(DEFAULT_FMT, out, &n), 0);
		assert_string_equal(n.domain, "dom");
		assert_string_equal(n.admin, "Adm");
		assert_string_equal(n.mailbox, "Bob");
	}
}

static void
test_build_login_quoted(void **state)
{
	char out[128];
	int n;

	(void)state;
	n = auth_build_login("A1", "example.com/NPUMAdmin1/bob", "s3cret",
	    false, out, sizeof(out));
	assert_string_equal(out,
	    "A1 LOGIN \"example.com/NPUMAdmin1/bob\" \"s3cret\"\r\n");
	assert_int_equal(n, (int)strlen(out));

	n = auth_build_login("a.2", "dom\\adm\\bob", "pa\"ss\\word", true,
	    out, sizeof(out));
	assert_string_equal(out,
	    "a.2 LOGIN \"dom\\\\adm\\\\bob\" \"pa\\\"ss\\\\word\"\r\n");
	assert_int_equal(n, (int)strlen(out));

	/* Spaces and specials are fine inside quotes; empty is "". */
	n = auth_build_login("T", "a b", "", false, out, sizeof(out));
	assert_string_equal(out, "T LOGIN \"a b\" \"\"\r\n");
	assert_int_equal(n, 18);
}

static void
test_build_login_literal(void **state)
{
	char out[128];
	int n;

	(void)state;
	n = auth_build_login("A1", "dom/adm/bob", "pw\r\nA2 LOGOUT", true,
	    out, sizeof(out));
	assert_string_equal(out,
	    "A1 LOGIN \"dom/adm/bob\" {13+}\r\npw\r\nA2 LOGOUT\r\n");
	assert_int_equal(n, (int)strlen(out));
	/* Without LITERAL+ it is refused, and the buffer holds no secret. */
	memset(out, 'Q', sizeof(out));
	assert_int_equal(auth_build_login("A1", "dom/adm/bob",
	    "pw\r\nA2 LOGOUT", false, out, sizeof(out)), -1);
	assert_null(memchr(out, 'p', sizeof(out)));
	assert_null(memchr(out, 'Q', sizeof(out)));

	/* 8-bit user: literal, then a quoted password. */
	n = auth_build_login("A3", "b\xc3\xb6rje", "x\"y", true, out,
	    sizeof(out));
	assert_string_equal(out,
	    "A3 LOGIN {6+}\r\nb\xc3\xb6rje \"x\\\"y\"\r\n");
	assert_int_equal(n, (int)strlen(out));
	assert_int_equal(auth_build_login("A3", "b\xc3\xb6rje", "x", false, out,
	    sizeof(out)), -1);
	/* A bare LF alone also needs a literal. */
	n = auth_build_login("A4", "u", "a\nb", true, out, sizeof(out));
	assert_string_equal(out, "A4 LOGIN \"u\" {3+}\r\na\nb\r\n");
	assert_int_equal(n, (int)strlen(out));
}

static void
test_build_login_refused(void **state)
{
	char out[64];
	size_t need;
	int n;

	(void)state;
	/* Bad tags. */
	assert_int_equal(auth_build_login("", "u", "p", true, out,
	    sizeof(out)), -1);
	assert_int_equal(auth_build_login(NULL, "u", "p", true, out,
	    sizeof(out)), -1);
	assert_int_equal(auth_build_login("A 1", "u", "p", true, out,
	    sizeof(out)), -1);
	assert_int_equal(auth_build_login("A\r\n", "u", "p", true, out,
	    sizeof(out)), -1);
	assert_int_equal(auth_build_login("A+", "u", "p", true, out,
	    sizeof(out)), -1);
	assert_int_equal(auth_build_login("A1", NULL, "p", true, out,
	    sizeof(out)), -1);
	assert_int_equal(auth_build_login("A1", "u", NULL, true, out,
	    sizeof(out)), -1);

	/* Buffer sizes around the exact fit (length + NUL). */
	n = auth_build_login("A1", "user", "pa\"ss", false, out, sizeof(out));
	assert_true(n > 0);
	need = (size_t)n + 1;
	assert_int_equal(auth_build_login("A1", "user", "pa\"ss", false, out,
	    need), n);
	assert_string_equal(out, "A1 LOGIN \"user\" \"pa\\\"ss\"\r\n");
	for (size_t len = 0; len < need; len++) {
		memset(out, 'Q', sizeof(out));
		if (auth_build_login("A1", "user", "pa\"ss", false, out,
		    len) != -1)
			fail_msg("fit into %zu bytes", len);
		/* No partial password left behind. */
		assert_null(memchr(out, 'Q', len));
		assert_null(memchr(out, 's', len));
	}

	/* Literal at the exact fit and one short. */
	n = auth_build_login("A1", "u", "p\r", true, out, sizeof(out));
	assert_string_equal(out, "A1 LOGIN \"u\" {2+}\r\np\r\r\n");
	assert_int_equal(auth_build_login("A1", "u", "p\r", true, out,
	    (size_t)n + 1), n);
	assert_int_equal(auth_build_login("A1", "u", "p\r", true, out,
	    (size_t)n), -1);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_format_valid),
		cmocka_unit_test(test_parse_default_both_separators),
		cmocka_unit_test(test_parse_other_formats),
		cmocka_unit_test(test_parse_injection),
		cmocka_unit_test(test_parse_part_lengths),
		cmocka_unit_test(test_mailbox_valid),
		cmocka_unit_test(test_plain_decode),
		cmocka_unit_test(test_plain_decode_bad),
		cmocka_unit_test(test_plain_decode_huge),
		cmocka_unit_test(test_format_login),
		cmocka_unit_test(test_build_login_quoted),
		cmocka_unit_test(test_build_login_literal),
		cmocka_unit_test(test_build_login_refused),
		cmocka_unit_test(test_check_login_reasons),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
