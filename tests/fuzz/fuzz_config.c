/*
 * fuzz_config.c - libFuzzer harness for the ini loader.
 *
 * The input is written to a memfd and loaded with
 * config_load("/proc/self/fd/N", false, &diag), the way the daemon loads
 * its file (fopen, getline, libinih).  Properties checked:
 *
 *   - NULL comes with at least one error, a config with none, and the diag
 *     buffers are NUL-terminated;
 *   - a loaded config satisfies what the rest of the daemon relies on: a
 *     listener, at least one server and admin, every admin with a password,
 *     usable login formats, limits inside their documented ranges, each
 *     admin found by name;
 *   - the value of an inline "password =" line never appears in an error
 *     or warning (DESIGN.md 3.6: passwords are never logged);
 *   - config_free() releases everything (LeakSanitizer checks).
 *
 * The value parsers shared with tests run on the input's first line too.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1	/* memfd_create */
#endif
#include <ctype.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "auth.h"
#include "config.h"

#define CHECK(cond) do { \
	if (!(cond)) { \
		fprintf(stderr, "%s:%d: property failed: %s\n", __FILE__, \
		    __LINE__, #cond); \
		abort(); \
	} \
} while (0)

static int memfd = -1;

static size_t
count_occurrences(const char *hay, size_t hlen, const char *needle, size_t nlen)
{
	size_t i, n = 0;

	if (nlen == 0 || nlen > hlen)
		return 0;
	for (i = 0; i + nlen <= hlen; i++)
		if (memcmp(hay + i, needle, nlen) == 0)
			n++;
	return n;
}

static int memfd2 = -1;

/* Load text with len bytes at off replaced by a token; true when the token
 * appears in an error or warning. */
static bool
leaks_value(const char *text, size_t len, size_t off, size_t vlen)
{
	static const char *const alpha[] = { "Qz7Wk", "Jx3Vq", "Kp9Zb", "Wm4Xj" };
	static struct config_diag d2;
	struct config *cfg;
	char path[64], *copy, tok[256];
	size_t i, k;

	/* A token the input does not already hold (the fuzzer learns). */
	for (k = 0; k < sizeof(alpha) / sizeof(alpha[0]); k++) {
		for (i = 0; i < vlen; i++)
			tok[i] = alpha[k][i % 5];
		tok[vlen] = '\0';
		if (count_occurrences(text, len, tok, 5) == 0)
			break;
	}
	if (k == sizeof(alpha) / sizeof(alpha[0]))
		return false;
	copy = malloc(len);
	CHECK(copy != NULL);
	memcpy(copy, text, len);
	memcpy(copy + off, tok, vlen);
	if (memfd2 == -1) {
		memfd2 = memfd_create("fuzz_config2.ini", MFD_CLOEXEC);
		CHECK(memfd2 != -1);
	}
	CHECK(ftruncate(memfd2, 0) == 0);
	CHECK(pwrite(memfd2, copy, len, 0) == (ssize_t)len);
	free(copy);
	snprintf(path, sizeof(path), "/proc/self/fd/%d", memfd2);
	cfg = config_load(path, false, &d2);
	config_free(cfg);
	return strstr(d2.errors, tok) != NULL || strstr(d2.warnings, tok) != NULL;
}

/*
 * Inline passwords of the input that must never show in diag: the value of
 * a "password = VALUE" line (before any " ;" comment), at least 8 bytes,
 * found nowhere else in the file.
 */
static void
check_no_password_leak(const char *text, size_t len,
    const struct config_diag *diag)
{
	const char *line = text, *end = text + len, *eol, *p, *v, *ve;
	char val[256];
	size_t vl;

	for (; line < end; line = eol + 1) {
		eol = memchr(line, '\n', (size_t)(end - line));
		if (eol == NULL)
			eol = end;
		p = line;
		while (p < eol && isspace((unsigned char)*p))
			p++;
		if ((size_t)(eol - p) < 8 || strncasecmp(p, "password", 8) != 0)
			continue;
		p += 8;
		while (p < eol && (*p == ' ' || *p == '\t'))
			p++;
		if (p >= eol || (*p != '=' && *p != ':'))
			continue;
		v = p + 1;
		while (v < eol && isspace((unsigned char)*v))
			v++;
		for (ve = v; ve < eol && *ve != '\r'; ve++)
			if (*ve == ';' && ve > v && isspace((unsigned char)ve[-1]))
				break;
		while (ve > v && isspace((unsigned char)ve[-1]))
			ve--;
		vl = (size_t)(ve - v);
		if (vl < 8 || vl >= sizeof(val) || memchr(v, '\0', vl) != NULL)
			continue;
		if (count_occurrences(text, len, v, vl) != 1)
			continue;
		memcpy(val, v, vl);
		val[vl] = '\0';
		if (strstr(diag->errors, val) == NULL &&
		    strstr(diag->warnings, val) == NULL)
			continue;
		/* The same text may come from the loader itself ("[upstream]
		 * ..."): load again with the value replaced by a token found
		 * nowhere else; only when the token shows is it a leak. */
		if (!leaks_value(text, len, (size_t)(v - text), vl))
			continue;
		fprintf(stderr, "password value %s leaked:\n%s\n%s\n", val,
		    diag->errors, diag->warnings);
		CHECK(!"password value in a config diagnostic");
	}
}

static void
check_config(const struct config *cfg)
{
	size_t i;

	CHECK(cfg->has_listen || cfg->has_listen_starttls);
	CHECK(cfg->n_servers >= 1 && cfg->servers != NULL);
	CHECK(cfg->n_admins >= 1 && cfg->admins != NULL);
	CHECK(cfg->n_allow_from >= 1 && cfg->allow_from != NULL);
	CHECK(cfg->client_login_format != NULL &&
	    auth_format_valid(cfg->client_login_format));
	CHECK(cfg->login_format != NULL);
	CHECK(cfg->max_command_bytes > 0);
	CHECK(cfg->reuse_timeout_ms < 25ull * 60 * 1000);
	CHECK(cfg->backoff_initial_ms <= cfg->backoff_max_ms);
	CHECK(cfg->log_target != NULL);
	for (i = 0; i < cfg->n_admins; i++) {
		const struct config_admin *a = &cfg->admins[i];

		CHECK(a->name != NULL && a->name[0] != '\0');
		/* check_files = false: an unreadable password_file leaves
		 * the password NULL (config.c's contract). */
		CHECK(a->password != NULL || a->password_file != NULL);
		if (a->password != NULL)
			CHECK(a->password[0] != '\0' &&
			    strlen(a->password) <= IMAPSHIM_PASSWORD_MAX);
		CHECK(config_find_admin(cfg, a->name, strlen(a->name)) != NULL);
	}
	for (i = 0; i < cfg->n_transient_login_patterns; i++)
		CHECK(cfg->transient_login_patterns[i] != NULL);
	CHECK(config_find_admin(cfg, "", 0) == NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct config_diag diag;
	struct config *cfg;
	char path[64], first[128];
	const char *nl;
	uint64_t u;
	bool b;
	size_t n;

	if (size > 65536)
		return 0;
	if (memfd == -1) {
		memfd = memfd_create("fuzz_config.ini", MFD_CLOEXEC);
		CHECK(memfd != -1);
	}
	CHECK(ftruncate(memfd, 0) == 0);
	CHECK(pwrite(memfd, data, size, 0) == (ssize_t)size);
	snprintf(path, sizeof(path), "/proc/self/fd/%d", memfd);

	cfg = config_load(path, false, &diag);
	CHECK(memchr(diag.errors, '\0', sizeof(diag.errors)) != NULL);
	CHECK(memchr(diag.warnings, '\0', sizeof(diag.warnings)) != NULL);
	if (cfg == NULL) {
		CHECK(diag.n_errors > 0 && diag.errors[0] != '\0');
	} else {
		CHECK(diag.n_errors == 0);
		check_config(cfg);
		config_free(cfg);
	}
	check_no_password_leak((const char *)data, size, &diag);

	/* The value parsers, on the first line as a C string. */
	nl = memchr(data, '\n', size);
	n = nl != NULL ? (size_t)(nl - (const char *)data) : size;
	if (n >= sizeof(first))
		n = sizeof(first) - 1;
	memcpy(first, data, n);
	first[n] = '\0';
	if (config_parse_duration(first, &u) == 0)
		(void)u;
	if (config_parse_size(first, &u) == 0)
		(void)u;
	if (config_parse_bool(first, &b) == 0)
		(void)b;
	return 0;
}
