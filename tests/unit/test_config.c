/*
 * test_config.c - config_load(): defaults, every error class with its line,
 * file checks, warnings, and the example conf/imapshim.ini.
 *
 * Files are written into a fresh mkdtemp() directory per test, with the
 * modes each test needs.  The example file is found via $top_srcdir.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <ftw.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/prov_ssl.h>

#include "config.h"

struct fx {
	char dir[64];
	char conf[128];
	struct config_diag diag;
	struct config *cfg;
};

static int
rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	return remove(p);
}

static int
setup(void **state)
{
	struct fx *fx = calloc(1, sizeof(*fx));

	if (fx == NULL)
		return -1;
	snprintf(fx->dir, sizeof(fx->dir), "/tmp/test_config.XXXXXX");
	if (mkdtemp(fx->dir) == NULL)
		return -1;
	snprintf(fx->conf, sizeof(fx->conf), "%s/imapshim.ini", fx->dir);
	*state = fx;
	return 0;
}

static int
teardown(void **state)
{
	struct fx *fx = *state;

	config_free(fx->cfg);
	nftw(fx->dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
	free(fx);
	return 0;
}

/* Write text to dir/name with mode; "@D@" in text becomes the directory. */
static void
put(struct fx *fx, const char *name, const char *text, mode_t mode)
{
	char path[256];
	FILE *f;
	const char *p;

	snprintf(path, sizeof(path), "%s/%s", fx->dir, name);
	f = fopen(path, "w");
	assert_non_null(f);
	for (p = text; *p != '\0'; p++) {
		if (strncmp(p, "@D@", 3) == 0) {
			fputs(fx->dir, f);
			p += 2;
		} else {
			fputc(*p, f);
		}
	}
	assert_int_equal(fclose(f), 0);
	assert_int_equal(chmod(path, mode), 0);
}

static struct config *
load(struct fx *fx, const char *text, bool check_files)
{
	config_free(fx->cfg);
	put(fx, "imapshim.ini", text, 0600);
	fx->cfg = config_load(fx->conf, check_files, &fx->diag);
	return fx->cfg;
}

/* The error (or warning) text holds "CONF:LINE: what" (LINE 0: "CONF: "). */
static void
expect_in(const struct fx *fx, const char *buf, int line, const char *what)
{
	char want[512];

	if (line > 0)
		snprintf(want, sizeof(want), "%s:%d: %s", fx->conf, line, what);
	else
		snprintf(want, sizeof(want), "%s: %s", fx->conf, what);
	if (strstr(buf, want) == NULL)
		fail_msg("expected \"%s\" in:\n%s", want, buf);
}

static void
expect_err(const struct fx *fx, int line, const char *what)
{
	assert_null(fx->cfg);
	expect_in(fx, fx->diag.errors, line, what);
}

#define MIN_UPSTREAM "[upstream]\nservers = cas1.example.com:993\n"
#define MIN_ADMIN "[admin A1]\npassword = s3cret\n"
#define MINIMAL MIN_UPSTREAM MIN_ADMIN

/* Files a check_files load needs; the config refers to them by @D@. */
static void
put_tls_files(struct fx *fx)
{
	put(fx, "cert.pem", "cert\n", 0644);
	put(fx, "key.pem", "key\n", 0600);
	put(fx, "ca.pem", "ca\n", 0644);
}

#define TLS_FILES_NOCA \
	"[shim]\ntls_cert_file = @D@/cert.pem\ntls_key_file = @D@/key.pem\n"
#define TLS_FILES TLS_FILES_NOCA "[upstream]\ntls_ca_file = @D@/ca.pem\n"

/* ---- parsers ---- */

static void
test_parse_duration(void **state)
{
	uint64_t ms;

	(void)state;
	assert_int_equal(config_parse_duration("250ms", &ms), 0);
	assert_int_equal(ms, 250);
	assert_int_equal(config_parse_duration("30s", &ms), 0);
	assert_int_equal(ms, 30000);
	assert_int_equal(config_parse_duration("30", &ms), 0);
	assert_int_equal(ms, 30000);
	assert_int_equal(config_parse_duration("5m", &ms), 0);
	assert_int_equal(ms, 300000);
	assert_int_equal(config_parse_duration("2h", &ms), 0);
	assert_int_equal(ms, 7200000);
	assert_int_equal(config_parse_duration("0", &ms), 0);
	assert_int_equal(ms, 0);
	assert_int_equal(config_parse_duration("-5s", &ms), -1);
	assert_int_equal(config_parse_duration("", &ms), -1);
	assert_int_equal(config_parse_duration("s", &ms), -1);
	assert_int_equal(config_parse_duration("5x", &ms), -1);
	assert_int_equal(config_parse_duration("5 s", &ms), -1);
	assert_int_equal(config_parse_duration("1.5s", &ms), -1);
	assert_int_equal(config_parse_duration("5sec", &ms), -1);
	assert_int_equal(config_parse_duration("18446744073709551615ms", &ms), 0);
	assert_int_equal(config_parse_duration("18446744073709551616ms", &ms), -1);
	assert_int_equal(config_parse_duration("18446744073709551615", &ms), -1);
	assert_int_equal(config_parse_duration("5124095576030432h", &ms), -1);
	assert_int_equal(config_parse_duration(NULL, &ms), -1);
}

static void
test_parse_size_bool(void **state)
{
	uint64_t n;
	bool b = false;

	(void)state;
	assert_int_equal(config_parse_size("10240", &n), 0);
	assert_int_equal(n, 10240);
	assert_int_equal(config_parse_size("10k", &n), 0);
	assert_int_equal(n, 10240);
	assert_int_equal(config_parse_size("10K", &n), 0);
	assert_int_equal(n, 10240);
	assert_int_equal(config_parse_size("50M", &n), 0);
	assert_int_equal(n, 52428800);
	assert_int_equal(config_parse_size("4G", &n), 0);
	assert_int_equal(n, 4ULL << 30);
	assert_int_equal(config_parse_size("-1", &n), -1);
	assert_int_equal(config_parse_size("1KB", &n), -1);
	assert_int_equal(config_parse_size("1T", &n), -1);
	assert_int_equal(config_parse_size("", &n), -1);
	assert_int_equal(config_parse_size("17179869184G", &n), -1);

	assert_int_equal(config_parse_bool("yes", &b), 0);
	assert_true(b);
	assert_int_equal(config_parse_bool("off", &b), 0);
	assert_false(b);
	assert_int_equal(config_parse_bool("TRUE", &b), 0);
	assert_true(b);
	assert_int_equal(config_parse_bool("0", &b), 0);
	assert_false(b);
	assert_int_equal(config_parse_bool("1", &b), 0);
	assert_true(b);
	assert_int_equal(config_parse_bool("nope", &b), -1);
	assert_int_equal(config_parse_bool("", &b), -1);
}

/* ---- defaults and the example file ---- */

static void
test_defaults(void **state)
{
	struct fx *fx = *state;
	struct config *c = load(fx, MINIMAL, false);
	char buf[300];

	if (c == NULL)
		fail_msg("%s", fx->diag.errors);
	assert_int_equal(fx->diag.n_errors, 0);
	assert_int_equal(fx->diag.n_warnings, 0);
	assert_string_equal(c->path, fx->conf);

	assert_true(c->has_listen);
	assert_string_equal(addr_endpoint_str(&c->listen, buf, sizeof(buf)),
	    "0.0.0.0:993");
	assert_false(c->has_listen_starttls);
	assert_string_equal(c->tls_cert_file, "/etc/imapshim/tls/cert.pem");
	assert_string_equal(c->tls_key_file, "/etc/imapshim/tls/key.pem");
	assert_int_equal(c->tls_min_version, TLS1_2_VERSION);
	assert_int_equal(c->n_allow_from, 1);
	assert_int_equal(c->allow_from[0].family, AF_INET);
	assert_int_equal(c->allow_from[0].prefix, 8);
	assert_int_equal(c->allow_from[0].net[0], 127);
	assert_false(c->allow_plaintext_login);
	assert_string_equal(c->client_login_format,
	    "{domain}/{admin}/{mailbox}");
	assert_int_equal(c->max_clients, 20000);
	assert_int_equal(c->max_unauth_per_ip, 256);
	assert_int_equal(c->max_command_bytes, 10240);
	assert_int_equal(c->max_literal_bytes, 52428800);
	assert_int_equal(c->client_login_timeout_ms, 60000);
	assert_int_equal(c->client_idle_timeout_ms, 30 * 60000);
	assert_true(c->has_status_listen);
	assert_string_equal(addr_endpoint_str(&c->status_listen, buf,
	    sizeof(buf)), "127.0.0.1:9143");
	assert_int_equal(c->drain_timeout_ms, 30000);
	assert_null(c->protocol_log);
	assert_string_equal(c->control_socket, "/run/imapshim/control");
	assert_null(c->user);
	assert_int_equal(c->log_level, LOG_LVL_INFO);
	assert_string_equal(c->log_target, "stderr");

	assert_int_equal(c->n_servers, 1);
	assert_string_equal(c->servers[0].host, "cas1.example.com");
	assert_string_equal(c->servers[0].port, "993");
	assert_int_equal(c->up_tls, CFG_TLS_IMPLICIT);
	assert_true(c->tls_verify);
	assert_string_equal(c->tls_ca_file,
	    "/etc/ssl/certs/ca-certificates.crt");
	assert_null(c->tls_server_name);
	assert_null(c->domain);
	assert_string_equal(c->login_format, "{domain}/{admin}/{mailbox}");
	assert_int_equal(c->connect_timeout_ms, 10000);
	assert_int_equal(c->login_timeout_ms, 20000);
	assert_int_equal(c->command_timeout_ms, 120000);

	assert_int_equal(c->pool_mode, CFG_POOL_MULTIPLEX);
	assert_int_equal(c->session_budget, 2048);
	assert_int_equal(c->queue_timeout_ms, 30000);
	assert_int_equal(c->park_after_ms, 10000);
	assert_int_equal(c->reuse_timeout_ms, 5 * 60000);
	assert_int_equal(c->idle_poll_interval_ms, 30000);
	assert_int_equal(c->idle_refresh_ms, 25 * 60000);
	assert_int_equal(c->login_rate, 20);
	assert_int_equal(c->login_burst, 40);

	assert_int_equal(c->login_attempts, 3);
	assert_int_equal(c->backoff_initial_ms, 250);
	assert_int_equal(c->backoff_max_ms, 8000);
	assert_int_equal(c->server_fail_threshold, 5);
	assert_int_equal(c->server_cooldown_ms, 30000);
	assert_int_equal(c->admin_cooldown_ms, 5 * 60000);
	assert_int_equal(c->negative_cache_ttl_ms, 60000);
	assert_int_equal(c->n_transient_login_patterns, 5);
	assert_string_equal(c->transient_login_patterns[0], "LOGIN failed");
	assert_string_equal(c->transient_login_patterns[1],
	    "ProxyNotAuthenticated");
	assert_string_equal(c->transient_login_patterns[2], "[UNAVAILABLE]");
	assert_string_equal(c->transient_login_patterns[3],
	    "Server Unavailable");
	assert_string_equal(c->transient_login_patterns[4],
	    "User is authenticated but not connected");

	assert_int_equal(c->n_admins, 1);
	assert_string_equal(c->admins[0].name, "A1");
	assert_string_equal(c->admins[0].password, "s3cret");
	assert_null(c->admins[0].password_file);
	assert_int_equal(c->admins[0].max_sessions, 16);
	assert_int_equal(c->admins[0].line, 3);
}

static void
test_example_file(void **state)
{
	struct fx *fx = *state;
	const char *top = getenv("top_srcdir");
	char path[1024];
	struct config_diag diag;
	struct config *c;

	(void)fx;
	snprintf(path, sizeof(path), "%s/conf/imapshim.ini",
	    top != NULL && *top != '\0' ? top : ".");
	c = config_load(path, false, &diag);
	if (c == NULL)
		fail_msg("%s", diag.errors);
	/* Only the budget one admin account cannot use: a site adds accounts
	 * or lowers session_budget (contrib/test-package.sh expects it). */
	assert_int_equal(diag.n_warnings, 1);
	assert_non_null(strstr(diag.warnings, "[pool] session_budget: "
	    "session_budget 2048 is more than the admin accounts allow "
	    "together (16); imapshim will use at most 16\n"));
	assert_int_equal(c->n_servers, 2);
	assert_string_equal(c->servers[1].host, "cas2.example.com");
	assert_string_equal(c->domain, "example.com");
	assert_false(c->has_listen_starttls);
	assert_int_equal(c->n_transient_login_patterns, 5);
	assert_string_equal(c->transient_login_patterns[2], "[UNAVAILABLE]");
	assert_string_equal(c->transient_login_patterns[4],
	    "User is authenticated but not connected");
	assert_int_equal(c->n_admins, 1);
	assert_string_equal(c->admins[0].name, "NPUMAdmin1");
	assert_string_equal(c->admins[0].password_file,
	    "/etc/imapshim/NPUMAdmin1.secret");
	assert_int_equal(c->admins[0].max_sessions, 16);
	assert_int_equal(c->session_budget, 2048);
	assert_int_equal(c->backoff_initial_ms, 250);
	config_free(c);
}

/* ---- error classes, each with its line ---- */

static void
test_unknown_section_and_key(void **state)
{
	struct fx *fx = *state;

	load(fx, MINIMAL
	    "[shim]\n"				/* 5 */
	    "listen = 0.0.0.0:993\n"
	    "colour = blue\n"			/* 7 */
	    "[pools]\n"				/* 8 */
	    "mode = session\n"			/* ignored: section unknown */
	    "[pool]\n"
	    "\n"
	    "; comment\n"
	    "bogus = 1\n",			/* 13 */
	    false);
	expect_err(fx, 7, "unknown key 'colour' in [shim]");
	expect_err(fx, 8, "unknown section [pools]");
	expect_err(fx, 13, "unknown key 'bogus' in [pool]");
	assert_int_equal(fx->diag.n_errors, 3);
}

static void
test_bad_values(void **state)
{
	struct fx *fx = *state;

	load(fx,
	    "[shim]\n"
	    "client_login_timeout = 5x\n"	/* 2 */
	    "max_clients = many\n"		/* 3 */
	    "max_command_bytes = 512\n"		/* 4 */
	    "listen = 1.2.3.4\n"		/* 5 */
	    "allow_from = 10.0.0.0/8, 10.0.0.0/33\n"	/* 6 */
	    "drain_timeout = -1s\n"		/* 7 */
	    "max_literal_bytes = 5G\n"		/* 8 */
	    "allow_plaintext_login = maybe\n"	/* 9 */
	    "tls_min_version = 1.1\n"		/* 10 */
	    "log_level = loud\n"		/* 11 */
	    "status_listen = host:70000\n"	/* 12 */
	    MIN_UPSTREAM			/* 13-14 */
	    "tls = maybe\n"			/* 15 */
	    "[pool]\n"
	    "mode = pooled\n"			/* 17 */
	    "session_budget = 0\n"		/* 18 */
	    "idle_refresh = 30m\n"		/* 19 */
	    "[retry]\n"
	    "login_attempts = 11\n"		/* 21 */
	    MIN_ADMIN, false);
	expect_err(fx, 2, "[shim] client_login_timeout: '5x' is not a duration");
	expect_err(fx, 3, "[shim] max_clients: 'many' is not a number");
	expect_err(fx, 4, "[shim] max_command_bytes: must be between 1024 and "
	    "1048576");
	expect_err(fx, 5, "[shim] listen: '1.2.3.4': missing ':port'");
	expect_err(fx, 6, "[shim] allow_from: '10.0.0.0/33'");
	expect_err(fx, 7, "[shim] drain_timeout: '-1s' is not a duration");
	expect_err(fx, 8, "[shim] max_literal_bytes: must be between 1 and "
	    "4294967296");
	expect_err(fx, 9, "[shim] allow_plaintext_login: 'maybe'");
	expect_err(fx, 10, "[shim] tls_min_version: '1.1': must be 1.2 or 1.3");
	expect_err(fx, 11, "[shim] log_level: 'loud'");
	expect_err(fx, 12, "[shim] status_listen: 'host:70000': port");
	expect_err(fx, 15, "[upstream] tls: 'maybe'");
	expect_err(fx, 17, "[pool] mode: 'pooled'");
	expect_err(fx, 18, "[pool] session_budget: must be between 1 and "
	    "1000000");
	expect_err(fx, 19, "[pool] idle_refresh: must be between 1m and 29m");
	expect_err(fx, 21, "[retry] login_attempts: must be between 1 and 10");
	assert_int_equal(fx->diag.n_errors, 16);
}

static void
test_good_values(void **state)
{
	struct fx *fx = *state;
	struct config *c;

	c = load(fx,
	    "[shim]\n"
	    "listen =\n"
	    "listen_starttls = [::1]:143\n"
	    "tls_min_version = 1.3\n"
	    "allow_from = 10.0.0.0/8, ::1, 2001:db8::/32\n"
	    "max_command_bytes = 64k\n"
	    "max_literal_bytes = 4G\n"
	    "status_listen =\n"
	    "log_level = debug\n"
	    "log_target = /var/log/imapshim.log\n"
	    "protocol_log = /var/log/imapshim-proto.csv\n"
	    "control_socket =\n"
	    "client_login_format = {admin}\\{mailbox}\n"
	    MIN_UPSTREAM
	    "tls = starttls\n"
	    "domain = corp.example\n"
	    "tls_server_name = mail.corp.example\n"
	    "[pool]\nmode = session\nreuse_timeout = 24m\n"
	    "[retry]\ntransient_login_patterns =\n"
	    "backoff_initial = 1s\nbackoff_max = 1s\n"
	    MIN_ADMIN "max_sessions = 100000\n", false);
	if (c == NULL)
		fail_msg("%s", fx->diag.errors);
	assert_false(c->has_listen);
	assert_true(c->has_listen_starttls);
	assert_string_equal(c->listen_starttls.host, "::1");
	assert_int_equal(c->tls_min_version, TLS1_3_VERSION);
	assert_int_equal(c->n_allow_from, 3);
	assert_int_equal(c->allow_from[2].family, AF_INET6);
	assert_int_equal(c->max_command_bytes, 65536);
	assert_int_equal(c->max_literal_bytes, 4ULL << 30);
	assert_false(c->has_status_listen);
	assert_null(c->control_socket);
	assert_int_equal(c->log_level, LOG_LVL_DEBUG);
	assert_string_equal(c->log_target, "/var/log/imapshim.log");
	assert_string_equal(c->client_login_format, "{admin}\\{mailbox}");
	assert_int_equal(c->up_tls, CFG_TLS_STARTTLS);
	assert_string_equal(c->domain, "corp.example");
	assert_string_equal(c->tls_server_name, "mail.corp.example");
	assert_int_equal(c->pool_mode, CFG_POOL_SESSION);
	assert_int_equal(c->reuse_timeout_ms, 24 * 60000);
	assert_int_equal(c->n_transient_login_patterns, 0);
	assert_int_equal(c->admins[0].max_sessions, 100000);
}

static void
test_reuse_timeout(void **state)
{
	struct fx *fx = *state;

	load(fx, MINIMAL "[pool]\nreuse_timeout = 25m\n", false);
	expect_err(fx, 6, "[pool] reuse_timeout: must be less than 25m");
	assert_non_null(strstr(fx->diag.errors, "30 minutes"));
	load(fx, MINIMAL "[pool]\nreuse_timeout = 1499999ms\n", false);
	assert_non_null(fx->cfg);
}

static void
test_backoff_order(void **state)
{
	struct fx *fx = *state;

	load(fx, MINIMAL "[retry]\nbackoff_initial = 10s\n", false);
	expect_err(fx, 6, "[retry] backoff_initial: backoff_initial (10s) is "
	    "more than backoff_max (8s)");
}

static void
test_formats(void **state)
{
	struct fx *fx = *state;

	load(fx, MINIMAL
	    "[shim]\n"
	    "client_login_format = {admin}{mailbox}\n"		/* 6 */
	    "[upstream]\n"
	    "login_format = {domain}/{mailbox}\n",		/* 8 */
	    false);
	expect_err(fx, 6, "[shim] client_login_format: '{admin}{mailbox}': "
	    "placeholders must be separated");
	expect_err(fx, 8, "[upstream] login_format: '{domain}/{mailbox}': "
	    "must contain {admin} and {mailbox}");

	load(fx, MINIMAL "[shim]\nclient_login_format = {user}/{admin}/"
	    "{mailbox}\n", false);
	expect_err(fx, 6, "[shim] client_login_format: '{user}/{admin}/"
	    "{mailbox}': unknown placeholder '{user}'");

	/* Upstream {admin}{mailbox} is fine; {domain} needs a source. */
	load(fx, MINIMAL "[shim]\nclient_login_format = {admin}/{mailbox}\n"
	    "[upstream]\nlogin_format = {domain}\\{admin}{mailbox}\n", false);
	expect_err(fx, 8, "[upstream] login_format: uses {domain}, but "
	    "neither");
	load(fx, MINIMAL "[shim]\nclient_login_format = {admin}/{mailbox}\n"
	    "[upstream]\ndomain = x.example\n", false);
	assert_non_null(fx->cfg);
}

static void
test_servers_multiline(void **state)
{
	struct fx *fx = *state;
	struct config *c;

	c = load(fx,
	    "[upstream]\n"
	    "servers = cas1.example.com:993,\n"
	    "    cas2.example.com:993, 192.0.2.10:993\n"
	    "\t[2001:db8::10]:993 ; comment\n"
	    "tls = implicit\n"
	    MIN_ADMIN, false);
	if (c == NULL)
		fail_msg("%s", fx->diag.errors);
	assert_int_equal(c->n_servers, 4);
	assert_string_equal(c->servers[0].host, "cas1.example.com");
	assert_string_equal(c->servers[1].host, "cas2.example.com");
	assert_string_equal(c->servers[2].host, "192.0.2.10");
	assert_string_equal(c->servers[3].host, "2001:db8::10");

	/* A bad item on a continuation line is named by that line. */
	load(fx, "[upstream]\nservers = a.example:993,\n  b.example\n"
	    MIN_ADMIN, false);
	expect_err(fx, 3, "[upstream] servers: 'b.example': missing ':port'");
	load(fx, "[upstream]\nservers = a.example:993, *:993\n" MIN_ADMIN,
	    false);
	expect_err(fx, 2, "[upstream] servers: '*:993': a server needs a host");
	load(fx, "[upstream]\nservers = a.example:993, A.example:993\n"
	    MIN_ADMIN, false);
	expect_err(fx, 2, "[upstream] servers: 'A.example:993' listed twice");
}

static void
test_duplicate_and_continued_keys(void **state)
{
	struct fx *fx = *state;

	load(fx, MINIMAL
	    "[shim]\n"
	    "max_clients = 10\n"		/* 6 */
	    "  max_unauth_per_ip = 5\n"		/* 7: continues max_clients */
	    "max_clients = 11\n",		/* 8 */
	    false);
	expect_err(fx, 7, "[shim] max_clients: indented line continues this "
	    "key");
	expect_err(fx, 8, "[shim] max_clients: given twice (first on line 6)");
	assert_int_equal(fx->diag.n_errors, 2);

	load(fx, "[upstream]\nservers = a.example:993\n"
	    " tls = none\n"			/* 3 */
	    MIN_ADMIN, false);
	expect_err(fx, 3, "[upstream] servers: indented line continues this "
	    "list; if 'tls = none' is a key, remove the indentation");
}

static void
test_syntax_errors(void **state)
{
	struct fx *fx = *state;

	load(fx, "listen = 1.2.3.4:1\n"		/* 1 */
	    MINIMAL				/* 2-5 */
	    "[shim\n"				/* 6 */
	    "junk = 1\n"			/* 7: ignored */
	    "[upstream]\n"
	    "no value here\n",			/* 9 */
	    false);
	expect_err(fx, 1, "key 'listen' before any [section]");
	expect_err(fx, 6, "section header without ']'");
	expect_err(fx, 9, "expected 'key = value'");
	assert_int_equal(fx->diag.n_errors, 3);
}

static void
test_line_too_long(void **state)
{
	struct fx *fx = *state;
	char text[1024], longv[300];

	memset(longv, 'a', 190);
	longv[190] = '\0';
	/* "domain = " + 190 = 199 bytes: the longest line inih takes. */
	snprintf(text, sizeof(text), MINIMAL "[upstream]\ndomain = %s\n",
	    longv);
	load(fx, text, false);
	if (fx->cfg == NULL)
		fail_msg("%s", fx->diag.errors);
	assert_int_equal(strlen(fx->cfg->domain), 190);

	longv[190] = 'a';
	longv[191] = '\0';
	snprintf(text, sizeof(text), MINIMAL "[upstream]\ndomain = %s\n"
	    "bogus = 1\n", longv);
	load(fx, text, false);
	expect_err(fx, 6, "line too long (200 bytes, at most 199)");
	/* Line counting goes on after it. */
	expect_err(fx, 7, "unknown key 'bogus' in [upstream]");
}

static void
test_no_servers_no_admin(void **state)
{
	struct fx *fx = *state;

	load(fx, "[shim]\nlisten = *:993\n", false);
	expect_err(fx, 0, "[upstream] servers: at least one server is "
	    "required");
	expect_err(fx, 0, "no [admin NAME] section");

	load(fx, "[upstream]\nservers =\n" MIN_ADMIN, false);
	expect_err(fx, 2, "[upstream] servers: at least one server");
}

/* n servers (continuation lines of 4) and n_admins [admin] sections. */
static struct config *
load_many(struct fx *fx, size_t n, size_t n_admins)
{
	static char text[16384];
	size_t i, len;

	len = (size_t)snprintf(text, sizeof(text), "[upstream]\nservers =");
	for (i = 0; i < n; i++)
		len += (size_t)snprintf(text + len, sizeof(text) - len, "%s"
		    "cas%zu.example.com:993%s", i % 4 == 0 ? "\n  " : " ", i,
		    i + 1 < n ? "," : "");
	len += (size_t)snprintf(text + len, sizeof(text) - len, "\n");
	for (i = 0; i < n_admins; i++)
		len += (size_t)snprintf(text + len, sizeof(text) - len,
		    "[admin A%zu]\npassword = s3cret\n", i);
	assert_true(len < sizeof(text));
	return load(fx, text, false);
}

/* The servers and admin accounts a request's 64-bit sets can name. */
static void
test_max_servers_admins(void **state)
{
	struct fx *fx = *state;

	assert_non_null(load_many(fx, CONFIG_MAX_SERVERS, CONFIG_MAX_ADMINS));
	assert_int_equal(fx->cfg->n_servers, CONFIG_MAX_SERVERS);
	assert_int_equal(fx->cfg->n_admins, CONFIG_MAX_ADMINS);

	load_many(fx, CONFIG_MAX_SERVERS + 1, 1);
	expect_err(fx, 2, "[upstream] servers: 65 servers: at most 64 are "
	    "supported");

	/* Three lines of [upstream], then two per [admin]. */
	load_many(fx, 1, CONFIG_MAX_ADMINS + 1);
	expect_err(fx, 4 + 2 * CONFIG_MAX_ADMINS, "[admin A64]: 65 admin "
	    "accounts: at most 64 are supported");
}

static void
test_listeners(void **state)
{
	struct fx *fx = *state;

	load(fx, MINIMAL "[shim]\nlisten =\n", false);
	expect_err(fx, 6, "[shim] listen: no listener");
	load(fx, MINIMAL "[shim]\nallow_from =\n", false);
	expect_err(fx, 6, "[shim] allow_from: empty");
	load(fx, MINIMAL "[shim]\nlog_target = relative.log\n", false);
	expect_err(fx, 6, "[shim] log_target: 'relative.log': must be stderr, "
	    "syslog or an absolute file path");
	load(fx, MINIMAL "[shim]\ncontrol_socket = run/control\n", false);
	expect_err(fx, 6, "[shim] control_socket: 'run/control': must be an "
	    "absolute path of at most 107 bytes, or empty");
	/* sun_path holds 108 bytes with the NUL: 107 is the longest. */
	load(fx, MINIMAL "[shim]\ncontrol_socket = /"
	    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n", false);
	expect_err(fx, 6, "[shim] control_socket: '/aaaa");
	load(fx, MINIMAL "[shim]\ncontrol_socket = /"
	    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n", false);
	if (fx->cfg == NULL)
		fail_msg("a 107-byte control_socket refused: %s",
		    fx->diag.errors);
	assert_int_equal(strlen(fx->cfg->control_socket), 107);
}

static void
test_admins(void **state)
{
	struct fx *fx = *state;
	const struct config_admin *a;

	load(fx, MIN_UPSTREAM
	    "[admin NPUMAdmin1]\npassword = a\n"	/* 3 */
	    "[admin npumadmin1]\npassword = b\n"	/* 5 */
	    "max_sessions = 0\n",			/* 7: skipped */
	    false);
	expect_err(fx, 5, "[admin npumadmin1]: duplicate admin, same as "
	    "[admin NPUMAdmin1] on line 3 (names are case-insensitive)");
	assert_int_equal(fx->diag.n_errors, 1);

	load(fx, MIN_UPSTREAM
	    "[admin A]\n"				/* 3 */
	    "max_sessions = 100001\n"			/* 4 */
	    "[admin B]\npassword = x\npassword_file = /nonexistent\n"
	    "[admin]\n"					/* 8 */
	    "[admin a/b]\n"				/* 9 */
	    "[admin C]\npassword =\n",			/* 11 */
	    false);
	expect_err(fx, 3, "[admin A]: set one of password_file or password");
	expect_err(fx, 4, "[admin A] max_sessions: must be between 1 and "
	    "100000");
	expect_err(fx, 5, "[admin B]: set only one of password_file and "
	    "password");
	expect_err(fx, 8, "[admin] needs a name");
	expect_err(fx, 9, "[admin a/b]: bad admin name");
	expect_err(fx, 11, "[admin C] password: must not be empty");
	/* '=' would split a log pair or a metric label. */
	load(fx, MIN_UPSTREAM "[admin a=b]\npassword = x\n", false);
	expect_err(fx, 3, "[admin a=b]: bad admin name (no spaces, '/', '\\', "
	    "quotes, '=' or brackets)");

	load(fx, MIN_UPSTREAM "[admin First]\npassword = p1\nmax_sessions = 4\n"
	    "[admin Second]\npassword = p2\n", false);
	assert_non_null(fx->cfg);
	a = config_find_admin(fx->cfg, "SECONDxyz", 6);
	assert_non_null(a);
	assert_string_equal(a->name, "Second");
	assert_string_equal(a->password, "p2");
	a = config_find_admin(fx->cfg, "first", 5);
	assert_non_null(a);
	assert_int_equal(a->max_sessions, 4);
	assert_null(config_find_admin(fx->cfg, "firs", 4));
	assert_null(config_find_admin(fx->cfg, "third", 5));
}

static void
test_inline_password_semicolon(void **state)
{
	struct fx *fx = *state;

	load(fx, MIN_UPSTREAM "[admin A1]\npassword = abc ;def\n", false);
	if (fx->cfg == NULL)
		fail_msg("%s", fx->diag.errors);
	assert_int_equal(fx->diag.n_warnings, 1);
	expect_in(fx, fx->diag.warnings, 4, "[admin A1] password: contains ';'");
	/* What inih makes of it: cut at " ;". */
	assert_string_equal(fx->cfg->admins[0].password, "abc");
	assert_null(strstr(fx->diag.warnings, "abc"));
	assert_null(strstr(fx->diag.warnings, "def"));

	load(fx, MIN_UPSTREAM "[admin A1]\npassword = abc;def\n", false);
	assert_non_null(fx->cfg);
	assert_int_equal(fx->diag.n_warnings, 1);
	assert_string_equal(fx->cfg->admins[0].password, "abc;def");
}

static void
test_password_never_in_diag(void **state)
{
	struct fx *fx = *state;

	load(fx, MIN_UPSTREAM "[admin A1]\npassword = hunter2;x\n"
	    "password = hunter3\n"
	    "  hunter4\n"
	    "[shim]\nmax_clients = 0\n", false);
	assert_null(fx->cfg);
	assert_true(fx->diag.n_errors >= 2);
	assert_null(strstr(fx->diag.errors, "hunter"));
	assert_null(strstr(fx->diag.warnings, "hunter"));
}

static void
test_tls_verify_warning(void **state)
{
	struct fx *fx = *state;

	load(fx, MINIMAL "[upstream]\ntls_verify = no\n", false);
	assert_non_null(fx->cfg);
	assert_false(fx->cfg->tls_verify);
	expect_in(fx, fx->diag.warnings, 6, "[upstream] tls_verify: upstream "
	    "certificates are NOT verified");
}

/* Settings that work but expose passwords or cannot be used: warnings. */
static void
test_setting_warnings(void **state)
{
	struct fx *fx = *state;
	static const char *const loopback[] = {
		"127.0.0.1:143", "127.1.2.3:143", "[::1]:143",
		"[::ffff:127.0.0.1]:143", "localhost:143", "LocalHost:143",
	};
	static const char *const exposed[] = {
		"0.0.0.0:143", ":143", "*:143", "192.0.2.7:143", "[::]:143",
		"[::ffff:192.0.2.7]:143", "imap.example.com:143",
	};
	char ini[512];
	size_t i;

	/* [upstream] tls = none: the admin passwords travel in clear. */
	load(fx, MINIMAL "[upstream]\ntls = none\n", false);
	assert_non_null(fx->cfg);
	assert_int_equal(fx->diag.n_warnings, 1);
	expect_in(fx, fx->diag.warnings, 6, "[upstream] tls: none sends the "
	    "admin accounts' passwords to Exchange in clear");
	load(fx, MINIMAL "[upstream]\ntls = STARTTLS\n", false);
	assert_non_null(fx->cfg);
	assert_int_equal(fx->diag.n_warnings, 0);

	/* Plaintext LOGIN on a listener other hosts reach. */
	for (i = 0; i < sizeof(exposed) / sizeof(exposed[0]); i++) {
		snprintf(ini, sizeof(ini), MINIMAL "[shim]\nlisten_starttls = "
		    "%s\nallow_plaintext_login = yes\n", exposed[i]);
		load(fx, ini, false);
		if (fx->cfg == NULL)
			fail_msg("%s: %s", exposed[i], fx->diag.errors);
		if (fx->diag.n_warnings != 1)
			fail_msg("%s: %u warnings", exposed[i],
			    fx->diag.n_warnings);
		expect_in(fx, fx->diag.warnings, 7, "[shim] "
		    "allow_plaintext_login: yes while listen_starttls = ");
		assert_non_null(strstr(fx->diag.warnings, " is not a loopback "
		    "address: clients may send LOGIN, with an admin account's "
		    "password, over the network in clear\n"));
	}
	for (i = 0; i < sizeof(loopback) / sizeof(loopback[0]); i++) {
		snprintf(ini, sizeof(ini), MINIMAL "[shim]\nlisten_starttls = "
		    "%s\nallow_plaintext_login = yes\n", loopback[i]);
		load(fx, ini, false);
		assert_non_null(fx->cfg);
		if (fx->diag.n_warnings != 0)
			fail_msg("%s: %s", loopback[i], fx->diag.warnings);
	}
	/* No cleartext listener, or LOGIN only after STARTTLS: no warning. */
	load(fx, MINIMAL "[shim]\nallow_plaintext_login = yes\n", false);
	assert_int_equal(fx->diag.n_warnings, 0);
	load(fx, MINIMAL "[shim]\nlisten_starttls = 0.0.0.0:143\n", false);
	assert_non_null(fx->cfg);
	assert_int_equal(fx->diag.n_warnings, 0);

	/* A session_budget the admin accounts cannot fill, with what will
	 * be used; the default budget is only a ceiling. */
	load(fx, MINIMAL "[pool]\nsession_budget = 2048\n", false);
	assert_non_null(fx->cfg);
	assert_int_equal(fx->diag.n_warnings, 1);
	expect_in(fx, fx->diag.warnings, 6, "[pool] session_budget: "
	    "session_budget 2048 is more than the admin accounts allow "
	    "together (16); imapshim will use at most 16\n");
	load(fx, MIN_UPSTREAM "[admin A1]\npassword = a\nmax_sessions = 8\n"
	    "[admin A2]\npassword = b\n[pool]\nsession_budget = 25\n", false);
	assert_int_equal(fx->diag.n_warnings, 1);
	expect_in(fx, fx->diag.warnings, 9, "[pool] session_budget: "
	    "session_budget 25 is more than the admin accounts allow "
	    "together (24); imapshim will use at most 24\n");
	load(fx, MIN_UPSTREAM "[admin A1]\npassword = a\nmax_sessions = 8\n"
	    "[admin A2]\npassword = b\n[pool]\nsession_budget = 24\n", false);
	assert_non_null(fx->cfg);
	assert_int_equal(fx->diag.n_warnings, 0);
	load(fx, MINIMAL, false);
	assert_int_equal(fx->diag.n_warnings, 0);

	/* All three at once, each reported. */
	load(fx, MINIMAL "[upstream]\ntls = none\n[pool]\nsession_budget = 17\n"
	    "[shim]\nlisten_starttls = :143\nallow_plaintext_login = on\n",
	    false);
	assert_non_null(fx->cfg);
	assert_int_equal(fx->diag.n_warnings, 3);
}

/* log_level takes any case, like the other enumerated values. */
static void
test_log_level_case(void **state)
{
	struct fx *fx = *state;

	load(fx, MINIMAL "[shim]\nlog_level = INFO\n", false);
	if (fx->cfg == NULL)
		fail_msg("%s", fx->diag.errors);
	assert_int_equal(fx->cfg->log_level, LOG_LVL_INFO);
	load(fx, MINIMAL "[shim]\nlog_level = Debug\n", false);
	assert_non_null(fx->cfg);
	assert_int_equal(fx->cfg->log_level, LOG_LVL_DEBUG);
	load(fx, MINIMAL "[shim]\nlog_level = WARN\n", false);
	assert_non_null(fx->cfg);
	assert_int_equal(fx->cfg->log_level, LOG_LVL_WARN);
	load(fx, MINIMAL "[shim]\nlog_level = WARNING\n", false);
	expect_err(fx, 6, "[shim] log_level: 'WARNING': must be error, warn, "
	    "info or debug");
}

/* ---- file checks ---- */

static void
test_password_file(void **state)
{
	struct fx *fx = *state;

	put_tls_files(fx);
	put(fx, "a1.secret", "pw with spaces ;x\r\nsecond line\n", 0600);
	load(fx, TLS_FILES MIN_UPSTREAM
	    "[admin A1]\npassword_file = @D@/a1.secret\n", true);
	if (fx->cfg == NULL)
		fail_msg("%s", fx->diag.errors);
	assert_string_equal(fx->cfg->admins[0].password, "pw with spaces ;x");
	assert_int_equal(fx->diag.n_warnings, 0);

	/* Without check_files too: the daemon needs the password. */
	load(fx, MIN_UPSTREAM "[admin A1]\npassword_file = @D@/a1.secret\n",
	    false);
	assert_non_null(fx->cfg);
	assert_string_equal(fx->cfg->admins[0].password, "pw with spaces ;x");

	/* No final newline. */
	put(fx, "a2.secret", "x", 0400);
	load(fx, TLS_FILES MIN_UPSTREAM
	    "[admin A1]\npassword_file = @D@/a2.secret\n", true);
	assert_non_null(fx->cfg);
	assert_string_equal(fx->cfg->admins[0].password, "x");

	put(fx, "empty.secret", "\nx\n", 0600);
	load(fx, TLS_FILES MIN_UPSTREAM
	    "[admin A1]\npassword_file = @D@/empty.secret\n", true);
	expect_err(fx, 9, "[admin A1] password_file: ");
	assert_non_null(strstr(fx->diag.errors, "empty.secret': the first "
	    "line (the password) is empty"));
}

static void
test_password_file_unreadable(void **state)
{
	struct fx *fx = *state;

	put_tls_files(fx);
	load(fx, TLS_FILES MIN_UPSTREAM
	    "[admin A1]\n"
	    "password_file = @D@/missing.secret\n", true);	/* 9 */
	expect_err(fx, 9, "[admin A1] password_file: cannot read '");
	assert_non_null(strstr(fx->diag.errors,
	    "missing.secret': No such file or directory"));

	/* A directory is not a password file. */
	load(fx, TLS_FILES MIN_UPSTREAM
	    "[admin A1]\npassword_file = @D@\n", true);
	expect_err(fx, 9, "[admin A1] password_file: '");
	assert_non_null(strstr(fx->diag.errors, "is not a regular file"));

	/* Without check_files a missing file is no error (example files). */
	load(fx, MIN_UPSTREAM "[admin A1]\npassword_file = @D@/missing\n",
	    false);
	assert_non_null(fx->cfg);
	assert_null(fx->cfg->admins[0].password);
}

static void
test_file_modes(void **state)
{
	struct fx *fx = *state;
	char want[512];

	put_tls_files(fx);
	put(fx, "a1.secret", "pw\n", 0644);
	put(fx, "imapshim.ini", TLS_FILES MIN_UPSTREAM
	    "[admin A1]\npassword_file = @D@/a1.secret\n", 0640);
	fx->cfg = config_load(fx->conf, true, &fx->diag);
	assert_null(fx->cfg);
	snprintf(want, sizeof(want), "%s: '%s' is readable or writable by "
	    "group or others (mode 0640) and holds admin passwords; "
	    "\"chmod 600 %s\" fixes it", fx->conf, fx->conf, fx->conf);
	if (strstr(fx->diag.errors, want) == NULL)
		fail_msg("expected \"%s\" in:\n%s", want, fx->diag.errors);
	snprintf(want, sizeof(want), "%s:9: [admin A1] password_file: "
	    "'%s/a1.secret' is readable or writable by group or others "
	    "(mode 0644) and holds admin passwords; \"chmod 600 %s/a1.secret\" "
	    "fixes it", fx->conf, fx->dir, fx->dir);
	if (strstr(fx->diag.errors, want) == NULL)
		fail_msg("expected \"%s\" in:\n%s", want, fx->diag.errors);
	assert_int_equal(fx->diag.n_errors, 2);

	/* Group-writable alone is refused too; 0600/0400 pass. */
	put(fx, "a1.secret", "pw\n", 0620);
	put(fx, "imapshim.ini", TLS_FILES MIN_UPSTREAM
	    "[admin A1]\npassword_file = @D@/a1.secret\n", 0400);
	fx->cfg = config_load(fx->conf, true, &fx->diag);
	assert_null(fx->cfg);
	assert_int_equal(fx->diag.n_errors, 1);
	assert_non_null(strstr(fx->diag.errors, "(mode 0620)"));

	/* check_files = false skips the mode checks. */
	put(fx, "imapshim.ini", MIN_UPSTREAM
	    "[admin A1]\npassword_file = @D@/a1.secret\n", 0644);
	fx->cfg = config_load(fx->conf, false, &fx->diag);
	assert_non_null(fx->cfg);
}

static void
test_tls_files(void **state)
{
	struct fx *fx = *state;

	put_tls_files(fx);
	load(fx, "[shim]\n"
	    "tls_cert_file = @D@/nocert.pem\n"		/* 2 */
	    "tls_key_file = @D@/key.pem\n"
	    "[upstream]\n"
	    "tls_ca_file = @D@/noca.pem\n"		/* 5 */
	    "servers = cas1.example.com:993\n"
	    MIN_ADMIN, true);
	expect_err(fx, 2, "[shim] tls_cert_file: cannot read '");
	expect_err(fx, 5, "[upstream] tls_ca_file: cannot read '");
	assert_int_equal(fx->diag.n_errors, 2);

	/* Defaults name /etc/imapshim/tls/...: no line, still the key. */
	load(fx, "[upstream]\ntls_ca_file = @D@/ca.pem\n"
	    "servers = cas1.example.com:993\n" MIN_ADMIN, true);
	expect_err(fx, 0, "[shim] tls_cert_file: cannot read "
	    "'/etc/imapshim/tls/cert.pem'");
	expect_err(fx, 0, "[shim] tls_key_file: cannot read "
	    "'/etc/imapshim/tls/key.pem'");

	/* No CA needed without verification or without TLS. */
	load(fx, TLS_FILES_NOCA MINIMAL
	    "[upstream]\ntls_ca_file = @D@/noca.pem\ntls = none\n", true);
	if (fx->cfg == NULL)
		fail_msg("%s", fx->diag.errors);
	load(fx, TLS_FILES_NOCA MINIMAL
	    "[upstream]\ntls_ca_file = @D@/noca.pem\ntls_verify = no\n", true);
	assert_non_null(fx->cfg);
	assert_int_equal(fx->diag.n_warnings, 1);

	/* Without check_files nothing is looked at. */
	load(fx, MINIMAL "[shim]\ntls_cert_file = @D@/nocert.pem\n", false);
	assert_non_null(fx->cfg);
}

static void
test_missing_file(void **state)
{
	struct fx *fx = *state;
	struct config_diag diag;
	char path[256];

	snprintf(path, sizeof(path), "%s/nothere.ini", fx->dir);
	assert_null(config_load(path, false, &diag));
	assert_int_equal(diag.n_errors, 1);
	assert_non_null(strstr(diag.errors, "nothere.ini: cannot open: "));
	assert_null(config_load(path, false, NULL));
}

#define T(f) cmocka_unit_test_setup_teardown(f, setup, teardown)

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse_duration),
		cmocka_unit_test(test_parse_size_bool),
		T(test_defaults),
		T(test_example_file),
		T(test_unknown_section_and_key),
		T(test_bad_values),
		T(test_good_values),
		T(test_reuse_timeout),
		T(test_backoff_order),
		T(test_formats),
		T(test_servers_multiline),
		T(test_duplicate_and_continued_keys),
		T(test_syntax_errors),
		T(test_line_too_long),
		T(test_no_servers_no_admin),
		T(test_max_servers_admins),
		T(test_listeners),
		T(test_admins),
		T(test_inline_password_semicolon),
		T(test_password_never_in_diag),
		T(test_tls_verify_warning),
		T(test_setting_warnings),
		T(test_log_level_case),
		T(test_password_file),
		T(test_password_file_unreadable),
		T(test_file_modes),
		T(test_tls_files),
		T(test_missing_file),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
