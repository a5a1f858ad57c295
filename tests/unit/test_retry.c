/* test_retry.c - failure classes, backoff, server health, quarantine,
 * the all-accounts slowdown and the negative cache, on a fake clock. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <fcntl.h>

#include "config.h"
#include "imapshim.h"
#include "log.h"
#include "retry.h"
#include "stats.h"
#include "upstream.h"

/* ------------------------------------------------------------ config */

static struct config C;
static struct config_admin admins[4];
static struct addr_endpoint servers[4];
static char *patterns[] = {
	"LOGIN failed", "ProxyNotAuthenticated", "[UNAVAILABLE]",
	"Server Unavailable", "User is authenticated but not connected",
};
static char logpath[64];

static void
set_server(size_t i, const char *host)
{
	snprintf(servers[i].host, sizeof(servers[i].host), "%s", host);
	snprintf(servers[i].port, sizeof(servers[i].port), "993");
}

static int
setup(void **state)
{
	static char *names[] = { "NPUMAdmin1", "NPUMAdmin2", "NPUMAdmin3",
	    "NPUMAdmin4" };
	size_t i;
	int fd;

	(void)state;
	memset(&C, 0, sizeof(C));
	memset(admins, 0, sizeof(admins));
	for (i = 0; i < 4; i++) {
		admins[i].name = names[i];
		admins[i].password = "s3cret";
		admins[i].max_sessions = 16;
	}
	set_server(0, "cas1.example.com");
	set_server(1, "cas2.example.com");
	set_server(2, "cas3.example.com");
	set_server(3, "cas4.example.com");
	C.servers = servers;
	C.n_servers = 2;
	C.admins = admins;
	C.n_admins = 2;
	C.transient_login_patterns = patterns;
	C.n_transient_login_patterns = nitems(patterns);
	C.login_attempts = 3;
	C.backoff_initial_ms = 250;
	C.backoff_max_ms = 8000;
	C.server_fail_threshold = 3;
	C.server_cooldown_ms = 30000;
	C.admin_cooldown_ms = 300000;
	C.negative_cache_ttl_ms = 60000;
	retry_shutdown();
	retry_seed(7);
	retry_configure(&C);

	/* Log lines go to a file the tests count in. */
	snprintf(logpath, sizeof(logpath), "/tmp/test_retry.%d.log",
	    (int)getpid());
	fd = open(logpath, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd >= 0)
		close(fd);
	{
		char err[256];

		assert_int_equal(log_open(logpath, err, sizeof(err)), 0);
	}
	log_set_level(LOG_LVL_INFO);
	return 0;
}

static int
teardown(void **state)
{
	(void)state;
	retry_shutdown();
	log_close();
	unlink(logpath);
	return 0;
}

/* Lines of the log holding "event=<ev>" (followed by a space or EOL). */
static int
log_count(const char *ev)
{
	char line[2048], key[128];
	int n = 0;
	FILE *f;

	snprintf(key, sizeof(key), "event=%s", ev);
	f = fopen(logpath, "r");
	if (f == NULL)
		return 0;
	while (fgets(line, sizeof(line), f) != NULL) {
		const char *p = strstr(line, key);

		if (p != NULL && (p[strlen(key)] == ' ' ||
		    p[strlen(key)] == '\n' || p[strlen(key)] == '\0'))
			n++;
	}
	fclose(f);
	return n;
}

/* ------------------------------------------------------------ classification */

struct class_case {
	enum up_fail why;
	const char *text;
	enum retry_class cls;
	enum stats_retry_reason reason;
	const char *label;
};

#define TRANSIENT STATS_RETRY_LOGIN_TRANSIENT
#define REFUSED STATS_RETRY_LOGIN_REFUSED

static const struct class_case class_cases[] = {
	/* Exchange's login refusals (reference §1.3, §1.8): transient. */
	{ UP_FAIL_LOGIN, "NO LOGIN failed.", RETRY_LOGIN, TRANSIENT,
	  "login-failed" },
	{ UP_FAIL_LOGIN, "no login FAILED.", RETRY_LOGIN, TRANSIENT,
	  "login-failed" },
	{ UP_FAIL_LOGIN, "NO [Error=ProxyNotAuthenticated "
	  "Proxy=mbx1.example.com:1993:SSL] LOGIN failed.", RETRY_LOGIN,
	  TRANSIENT, "proxy-not-authenticated" },
	{ UP_FAIL_LOGIN, "NO [UNAVAILABLE] try again later", RETRY_LOGIN,
	  TRANSIENT, "unavailable" },
	{ UP_FAIL_LOGIN, "NO Server Unavailable. 15", RETRY_LOGIN, TRANSIENT,
	  "server-unavailable" },
	{ UP_FAIL_LOGIN, "BAD User is authenticated but not connected.",
	  RETRY_LOGIN, TRANSIENT, "authenticated-not-connected" },
	/* After a LOGIN that said OK, on the following CAPABILITY. */
	{ UP_FAIL_PROTOCOL, "BAD User is authenticated but not connected.",
	  RETRY_LOGIN, TRANSIENT, "authenticated-not-connected" },
	{ UP_FAIL_LOGIN, "NO AUTHENTICATE failed.", RETRY_FINAL, REFUSED,
	  "login-refused" },
	/* Final refusals. */
	{ UP_FAIL_LOGIN, "NO [AUTHENTICATIONFAILED] Authentication failed.",
	  RETRY_FINAL, REFUSED, "authentication-failed" },
	{ UP_FAIL_LOGIN, "NO [AUTHENTICATIONFAILED] LOGIN failed.",
	  RETRY_FINAL, REFUSED, "authentication-failed" },
	{ UP_FAIL_LOGIN, "NO [authenticationfailed] nope", RETRY_FINAL,
	  REFUSED, "authentication-failed" },
	{ UP_FAIL_LOGIN, "NO no such user", RETRY_FINAL, REFUSED,
	  "login-refused" },
	{ UP_FAIL_LOGIN, "BAD Command Argument Error. 11", RETRY_FINAL,
	  REFUSED, "login-refused" },
	{ UP_FAIL_LOGIN, "", RETRY_FINAL, REFUSED, "login-refused" },
	/* Greetings. */
	{ UP_FAIL_GREETING,
	  "server greeted with \"* BYE Connection is closed. 14\"",
	  RETRY_SERVER, STATS_RETRY_GREETING, "no-certificate-bound" },
	{ UP_FAIL_GREETING,
	  "server greeted with \"* BYE Connection is closed. 10\"",
	  RETRY_SERVER, STATS_RETRY_GREETING, "connection-limit" },
	{ UP_FAIL_GREETING,
	  "server greeted with \"* BYE Connection is closed. 12\"",
	  RETRY_SERVER, STATS_RETRY_GREETING, "service-stopping" },
	{ UP_FAIL_GREETING, "server greeted with \"* BYE Connection closed. 14\"",
	  RETRY_SERVER, STATS_RETRY_GREETING, "bye-greeting" },
	{ UP_FAIL_GREETING, "not an IMAP greeting", RETRY_SERVER,
	  STATS_RETRY_GREETING, "bye-greeting" },
	/* TLS and certificates: server failures, never retried unverified. */
	{ UP_FAIL_TLS, "server answered in plaintext \"* BYE\" instead of a "
	  "TLS handshake (Exchange: no certificate bound to IMAP, event 1102, "
	  "\"BYE Connection is closed. 14\")", RETRY_SERVER,
	  STATS_RETRY_CERTIFICATE, "no-certificate-bound" },
	{ UP_FAIL_TLS, "tls: wrong version number", RETRY_SERVER,
	  STATS_RETRY_TLS, "tls-handshake" },
	{ UP_FAIL_TLS, "server refused STARTTLS: BAD Could not establish TLS "
	  "connection.", RETRY_SERVER, STATS_RETRY_TLS, "tls-handshake" },
	{ UP_FAIL_CERT, "certificate verify failed: certificate has expired",
	  RETRY_SERVER, STATS_RETRY_CERTIFICATE, "certificate" },
	{ UP_FAIL_CERT, "certificate verify failed: LOGIN failed",
	  RETRY_SERVER, STATS_RETRY_CERTIFICATE, "certificate" },
	/* Connect, timeout, protocol. */
	{ UP_FAIL_CONNECT, "cannot connect: Connection refused", RETRY_SERVER,
	  STATS_RETRY_CONNECT, "connect" },
	{ UP_FAIL_CONNECT, "cannot resolve cas9: Name or service not known",
	  RETRY_SERVER, STATS_RETRY_CONNECT, "connect" },
	{ UP_FAIL_TIMEOUT, "no answer from the server within 20s",
	  RETRY_SERVER, STATS_RETRY_TIMEOUT, "timeout" },
	{ UP_FAIL_PROTOCOL, "server announces LOGINDISABLED", RETRY_SERVER,
	  STATS_RETRY_PROTOCOL, "protocol" },
	{ UP_FAIL_PROTOCOL, "connection closed by the server during login",
	  RETRY_SERVER, STATS_RETRY_PROTOCOL, "protocol" },
};

static void
test_classify_table(void **state)
{
	struct retry_verdict v;
	size_t i;

	(void)state;
	for (i = 0; i < nitems(class_cases); i++) {
		const struct class_case *c = &class_cases[i];

		memset(&v, 0xff, sizeof(v));
		retry_classify(&C, c->why, c->text, &v);
		if (v.rv_class != c->cls || v.rv_reason != c->reason ||
		    strcmp(v.rv_label, c->label) != 0)
			fail_msg("case %zu (why %d \"%s\"): class %d reason %d "
			    "label %s", i, (int)c->why, c->text,
			    (int)v.rv_class, (int)v.rv_reason, v.rv_label);
	}
	/* No text at all. */
	retry_classify(&C, UP_FAIL_LOGIN, NULL, &v);
	assert_int_equal(v.rv_class, RETRY_FINAL);
	retry_classify(&C, UP_FAIL_CONNECT, NULL, &v);
	assert_int_equal(v.rv_class, RETRY_SERVER);
}

/* transient_login_patterns decides what is transient. */
static void
test_classify_patterns_from_config(void **state)
{
	static char *only[] = { "try later" };
	struct retry_verdict v;

	(void)state;
	C.transient_login_patterns = only;
	C.n_transient_login_patterns = 1;
	retry_classify(&C, UP_FAIL_LOGIN, "NO LOGIN failed.", &v);
	assert_int_equal(v.rv_class, RETRY_FINAL);
	retry_classify(&C, UP_FAIL_LOGIN, "NO please TRY LATER", &v);
	assert_int_equal(v.rv_class, RETRY_LOGIN);
	assert_string_equal(v.rv_label, "login-transient");
	/* "[AUTHENTICATIONFAILED]" stays final whatever the patterns. */
	retry_classify(&C, UP_FAIL_LOGIN,
	    "NO [AUTHENTICATIONFAILED] try later", &v);
	assert_int_equal(v.rv_class, RETRY_FINAL);
	C.n_transient_login_patterns = 0;
	retry_classify(&C, UP_FAIL_LOGIN, "NO please try later", &v);
	assert_int_equal(v.rv_class, RETRY_FINAL);
}

/* ------------------------------------------------------------ backoff */

static void
test_backoff_bounds(void **state)
{
	uint64_t base = 250, lo, hi, d, min_seen, max_seen;
	unsigned n, k;

	(void)state;
	for (n = 1; n <= 12; n++) {
		hi = base < C.backoff_max_ms ? base : C.backoff_max_ms;
		lo = hi / 2;
		min_seen = UINT64_MAX;
		max_seen = 0;
		for (k = 0; k < 5000; k++) {
			d = retry_backoff_ms(&C, n, retry_rand());
			assert_true(d >= lo && d <= hi);
			if (d < min_seen)
				min_seen = d;
			if (d > max_seen)
				max_seen = d;
		}
		/* The jitter covers its range (not a constant). */
		assert_true(min_seen < lo + (hi - lo) / 10);
		assert_true(max_seen > hi - (hi - lo) / 10);
		assert_int_equal(retry_backoff_ms(&C, n, 0), lo);
		base *= 2;
	}
	/* Exact edges: [half, all]. */
	assert_int_equal(retry_backoff_ms(&C, 1, 0), 125);
	assert_int_equal(retry_backoff_ms(&C, 1, 125), 250);
	assert_int_equal(retry_backoff_ms(&C, 1, 126), 125);
	/* n = 0 counts as the first retry. */
	assert_true(retry_backoff_ms(&C, 0, 0) == 125);
	/* Capped, without overflow, however large n is. */
	for (n = 6; n < 1000; n += 37) {
		d = retry_backoff_ms(&C, n, retry_rand());
		assert_true(d >= 4000 && d <= 8000);
	}
	C.backoff_initial_ms = 1;
	C.backoff_max_ms = UINT64_MAX / 2;
	d = retry_backoff_ms(&C, 4000000000u, UINT32_MAX);
	assert_true(d <= UINT64_MAX / 2 && d >= UINT64_MAX / 8);
}

/* ------------------------------------------------------------ servers */

static void
test_server_down_cooldown_probe(void **state)
{
	uint64_t t = 1000000;

	(void)state;
	assert_int_equal(retry_server_pick(t, (size_t)-1), 0);
	assert_int_equal(retry_server_pick(t, 0), 1);	/* skip */
	retry_server_failed(0, "cannot connect: Connection refused", t);
	retry_server_failed(0, "cannot connect: Connection refused", t);
	assert_true(retry_server_up(0, t));
	assert_int_equal(retry_server_failures(0), 2);
	/* A success in between resets the run. */
	retry_server_ok(0);
	assert_int_equal(retry_server_failures(0), 0);
	retry_server_failed(0, "a", t);
	retry_server_failed(0, "b", t);
	retry_server_failed(0, "certificate verify failed: expired", t);
	assert_false(retry_server_up(0, t));
	assert_string_equal(retry_server_last_failure(0),
	    "certificate verify failed: expired");
	assert_string_equal(retry_server_last_failure(1), "");
	assert_int_equal(log_count("retry_server_down"), 1);
	/* Down: new connections go to the next one. */
	assert_int_equal(retry_server_pick(t, (size_t)-1), 1);
	assert_int_equal(retry_server_pick_except(t, 0), 1);
	assert_int_equal(retry_server_pick_except(t, 2), (size_t)-1);
	assert_false(retry_all_servers_down(t));
	/* More failures while down: logged once. */
	retry_server_failed(0, "again", t + 10);
	assert_int_equal(log_count("retry_server_down"), 1);
	t += 10;

	/* Cooldown: restarted by that failure. */
	assert_int_equal(retry_server_pick_except(t + C.server_cooldown_ms - 1,
	    2), (size_t)-1);
	t += C.server_cooldown_ms;
	assert_false(retry_server_up(0, t));		/* until a probe works */
	assert_int_equal(retry_server_pick_except(t, 2), 0);	/* the probe */
	assert_true(retry_server_probing(0, t));
	/* One probe at a time. */
	assert_int_equal(retry_server_pick_except(t + 1, 2), (size_t)-1);
	/* The probe fails: the cooldown starts over. */
	retry_server_failed(0, "cannot connect: Connection refused", t + 100);
	assert_false(retry_server_probing(0, t + 100));
	assert_int_equal(retry_server_pick_except(t + 100 +
	    C.server_cooldown_ms - 1, 2), (size_t)-1);
	t += 100 + C.server_cooldown_ms;
	assert_int_equal(retry_server_pick(t, 1), 0);	/* probe again */
	retry_server_ok(0);
	assert_true(retry_server_up(0, t));
	assert_int_equal(retry_server_failures(0), 0);
	assert_int_equal(log_count("retry_server_up"), 1);
	assert_int_equal(log_count("retry_server_down"), 1);
	assert_int_equal(retry_server_pick(t, (size_t)-1), 0);
}

/* DESIGN 3.5 R14: a timeout while the server works is overload (the
 * bound halves, once per generation; +1 per success); with no recent
 * success it counts towards the threshold as before. */
static void
test_server_overload_aimd(void **state)
{
	struct retry_verdict v;
	uint64_t t = 1000000;
	int k;

	(void)state;
	C.max_logins_in_flight = 32;
	C.connect_timeout_ms = 10000;
	C.login_timeout_ms = 20000;
	retry_configure(&C);
	assert_int_equal(retry_server_limit(0), 32);

	/* Only a timeout and Exchange's connection limit are signs of load. */
	retry_classify(&C, UP_FAIL_TIMEOUT, "no answer from the server "
	    "within connect_timeout", &v);
	assert_int_equal(v.rv_class, RETRY_SERVER);
	assert_true(v.rv_load);
	retry_classify(&C, UP_FAIL_GREETING, "* BYE Connection is closed. 10",
	    &v);
	assert_true(v.rv_load);
	retry_classify(&C, UP_FAIL_CONNECT, "cannot connect: Connection "
	    "refused", &v);
	assert_false(v.rv_load);
	retry_classify(&C, UP_FAIL_TLS, "unexpected eof", &v);
	assert_false(v.rv_load);

	/* Never a success: not overload; down after the threshold. */
	for (k = 0; k < 3; k++) {
		assert_false(retry_server_overloaded(1, "timeout", t, t));
		retry_server_failed(1, "timeout", t);
	}
	assert_false(retry_server_up(1, t));
	assert_int_equal(retry_server_overloads(1), 0);

	/* Server 0 logs in: timeouts now are overload, never down. */
	retry_server_success(0, t);
	assert_int_equal(retry_server_limit(0), 32);	/* capped */
	assert_true(retry_server_overloaded(0, "timeout", t - 5000, t + 1));
	assert_int_equal(retry_server_limit(0), 16);
	/* Logins started before that halving: counted, no second halving. */
	for (k = 0; k < 10; k++)
		assert_true(retry_server_overloaded(0, "timeout", t, t + 2));
	assert_int_equal(retry_server_limit(0), 16);
	assert_int_equal(retry_server_overloads(0), 11);
	assert_int_equal(log_count("server_overload"), 11);
	/* One started after it halves again, down to 1 at least. */
	for (k = 0; k < 10; k++)
		assert_true(retry_server_overloaded(0, "timeout", t + 3 + k,
		    t + 3 + k));
	assert_int_equal(retry_server_limit(0), 1);
	assert_true(retry_server_up(0, t + 20));
	assert_int_equal(retry_server_failures(0), 0);
	assert_int_equal(log_count("retry_server_down"), 1);	/* server 1 */
	/* Additive increase, up to the setting. */
	for (k = 0; k < 5; k++)
		retry_server_success(0, t + 100);
	assert_int_equal(retry_server_limit(0), 6);
	for (k = 0; k < 100; k++)
		retry_server_success(0, t + 100);
	assert_int_equal(retry_server_limit(0), 32);
	/* The success is older than connect_timeout + login_timeout: a
	 * timeout counts against the server again. */
	assert_false(retry_server_overloaded(0, "timeout", t + 100,
	    t + 100 + 30001));
	/* A reload to a lower setting lowers the bound. */
	C.max_logins_in_flight = 8;
	retry_configure(&C);
	assert_int_equal(retry_server_limit(0), 8);
}

static void
test_all_servers_down(void **state)
{
	uint64_t t = 5000;
	int k;

	(void)state;
	for (k = 0; k < 3; k++) {
		retry_server_failed(0, "refused", t);
		retry_server_failed(1, "timeout", t + 1000);
	}
	assert_true(retry_all_servers_down(t + 1000));
	/* The last resort of retry_server_pick: the first to come back. */
	assert_int_equal(retry_server_pick(t + 1000, (size_t)-1), 0);
	assert_int_equal(retry_server_pick_except(t + 1000, 0), (size_t)-1);
	/* Server 0's cooldown ends first: a probe may go, so not all down. */
	assert_false(retry_all_servers_down(t + C.server_cooldown_ms));
	assert_int_equal(retry_server_pick_except(t + C.server_cooldown_ms, 0),
	    0);
	/* A probe under way: not "all down" either. */
	assert_false(retry_all_servers_down(t + C.server_cooldown_ms + 1));
	retry_server_failed(0, "refused", t + C.server_cooldown_ms + 2);
	assert_true(retry_all_servers_down(t + C.server_cooldown_ms + 2));
}

/* ------------------------------------------------------------ admins */

static void
test_admin_quarantine(void **state)
{
	uint64_t t = 10000;

	(void)state;
	retry_admin_result(1, true, t);
	retry_admin_result(0, false, t + 1);
	retry_admin_result(1, true, t + 2);
	retry_admin_result(0, false, t + 3);
	assert_false(retry_admin_quarantined(0, t + 3));
	retry_admin_result(0, false, t + 4);
	assert_true(retry_admin_quarantined(0, t + 4));
	assert_false(retry_admin_usable(0, t + 4));
	assert_true(retry_admin_usable(1, t + 4));
	assert_int_equal(log_count("retry_admin_quarantined"), 1);
	/* More failures while quarantined: no new line. */
	retry_admin_result(0, false, t + 5);
	assert_int_equal(log_count("retry_admin_quarantined"), 1);
	/* The cooldown ends: usable again... */
	t += 5 + C.admin_cooldown_ms;
	assert_true(retry_admin_usable(0, t));
	/* ...and one more failure while the other works quarantines it. */
	retry_admin_result(1, true, t);
	retry_admin_result(0, false, t + 1);
	assert_true(retry_admin_quarantined(0, t + 1));
	assert_int_equal(log_count("retry_admin_quarantined"), 2);
	/* A success ends it; the cooldown's end and the success are
	 * each logged once. */
	retry_admin_result(0, true, t + 2);
	assert_false(retry_admin_quarantined(0, t + 2));
	assert_int_equal(log_count("retry_admin_released"), 2);
}

static void
test_admin_no_quarantine_cases(void **state)
{
	uint64_t t = 10000;
	int k;

	(void)state;
	/* Everyone fails: nobody is quarantined (the slowdown acts). */
	for (k = 0; k < 10; k++) {
		retry_admin_result(0, false, t + (uint64_t)k);
		retry_admin_result(1, false, t + (uint64_t)k);
	}
	assert_false(retry_admin_quarantined(0, t + 10));
	assert_false(retry_admin_quarantined(1, t + 10));
	/* The other's success came before this run of failures. */
	retry_admin_result(0, true, t + 20);
	retry_admin_result(1, true, t + 21);
	retry_admin_result(0, false, t + 30);
	retry_admin_result(0, false, t + 31);
	retry_admin_result(0, false, t + 32);
	assert_false(retry_admin_quarantined(0, t + 32));
	/* Final refusals (the mailbox's fault) never quarantine. */
	retry_admin_result(0, true, t + 40);
	for (k = 0; k < 10; k++) {
		retry_admin_refused(0, t + 41 + (uint64_t)k);
		retry_admin_result(1, true, t + 41 + (uint64_t)k);
	}
	assert_false(retry_admin_quarantined(0, t + 60));
	/* admin_cooldown = 0 turns quarantine off. */
	C.admin_cooldown_ms = 0;
	retry_configure(&C);
	for (k = 0; k < 5; k++) {
		retry_admin_result(1, true, t + 100 + (uint64_t)k);
		retry_admin_result(0, false, t + 100 + (uint64_t)k);
	}
	assert_false(retry_admin_quarantined(0, t + 200));
	assert_int_equal(log_count("retry_admin_quarantined"), 0);
}

/*
 * A wrong password for every account and a storm of clients: 1000 login
 * requests over one minute.  Only those retry_login_not_before() lets
 * through reach Exchange, and they must stay a handful.
 */
static void
test_slowdown_bounds_storm(void **state)
{
	uint64_t t0 = 1000000, t;
	unsigned allowed = 0, k;
	size_t admin = 0;

	(void)state;
	for (k = 0; k < 1000; k++) {
		t = t0 + (uint64_t)k * 60;	/* 1000 requests in 60 s */
		if (retry_login_not_before(t) > t)
			continue;
		allowed++;
		/* Exchange: "NO LOGIN failed." for every account. */
		retry_admin_result(admin, false, t);
		admin = (admin + 1) % C.n_admins;
	}
	/* 3 at once, then 125..250, 250..500, ... up to 4..8 s apart. */
	assert_true(allowed >= 8);
	assert_true(allowed <= 25);
	assert_int_equal(log_count("retry_login_slowdown"), 1);
	/* Nobody was quarantined: nobody succeeded. */
	assert_false(retry_admin_quarantined(0, t0 + 60000));
	assert_false(retry_admin_quarantined(1, t0 + 60000));

	/* The password is fixed: the first success ends the slowdown. */
	t = t0 + 60000;
	while (retry_login_not_before(t) > t)
		t++;
	retry_admin_result(0, true, t);
	assert_int_equal(retry_login_not_before(t), t);
	assert_int_equal(log_count("retry_login_slowdown_end"), 1);
	/* Three mailboxes refused by one account only: that account's
	 * trouble, not Exchange's: no slowdown (DESIGN 3.5 R6). */
	retry_admin_result(1, false, t + 1);
	retry_admin_result(1, false, t + 2);
	retry_admin_result(1, false, t + 3);
	assert_int_equal(retry_login_not_before(t + 3), t + 3);
	/* The other account refuses too: every account, 4 mailboxes. */
	retry_admin_result(0, false, t + 4);
	assert_true(retry_login_not_before(t + 4) > t + 4);
	assert_true(retry_login_not_before(t + 4) <= t + 4 + 250);
}

/* Final refusals count towards the slowdown too (a Dovecot-style
 * "[AUTHENTICATIONFAILED]" for a wrong admin password). */
static void
test_slowdown_from_refusals(void **state)
{
	uint64_t t0 = 0, t;
	unsigned allowed = 0, k;

	(void)state;
	C.n_admins = 1;
	retry_configure(&C);
	for (k = 0; k < 6000; k++) {
		t = t0 + (uint64_t)k * 10;
		if (retry_login_not_before(t) > t)
			continue;
		allowed++;
		retry_admin_refused(0, t);
	}
	assert_true(allowed <= 25);
}

/*
 * Attribution (DESIGN 3.5 R5, R6; issue 13): refusals are told apart by
 * mailbox.  One missing mailbox refused by every account over and over,
 * while other mailboxes log in: no quarantine, no slowdown.
 */
static void
test_attribution_one_mailbox(void **state)
{
	uint64_t t = 10000;
	int k;

	(void)state;
	retry_login_ok(0, "example.com", "alice", t);
	for (k = 0; k < 50; k++) {
		retry_login_refused(0, "example.com", "Gone", t + 1);
		retry_login_refused(1, "EXAMPLE.com", "gone", t + 2);
		retry_login_ok(1, "example.com", "bob", t + 3);
		t += 10;
	}
	assert_false(retry_admin_quarantined(0, t));
	assert_false(retry_admin_quarantined(1, t));
	assert_false(retry_slowdown());
	assert_int_equal(retry_login_not_before(t), t);
	assert_int_equal(log_count("retry_admin_quarantined"), 0);
	assert_int_equal(log_count("retry_login_slowdown"), 0);
}

/* An account failing for three different mailboxes while the other
 * succeeds is quarantined; a mailbox found at fault is taken back out of
 * its run. */
static void
test_attribution_admin(void **state)
{
	uint64_t t = 10000;

	(void)state;
	retry_login_ok(1, "example.com", "x", t);
	retry_login_refused(0, "example.com", "m1", t + 1);
	retry_login_refused(0, "example.com", "m2", t + 2);
	retry_mailbox_at_fault("example.com", "M2");	/* m2 was missing */
	retry_login_refused(0, "example.com", "m3", t + 3);
	assert_false(retry_admin_quarantined(0, t + 3));	/* m1, m3 */
	retry_login_refused(0, "example.com", "m1", t + 4);	/* again */
	assert_false(retry_admin_quarantined(0, t + 4));
	retry_login_ok(1, "example.com", "y", t + 5);
	retry_login_refused(0, "example.com", "m4", t + 6);
	assert_true(retry_admin_quarantined(0, t + 6));
	assert_false(retry_slowdown());		/* the other works */
	assert_int_equal(log_count("retry_admin_quarantined"), 1);
}

/* The slowdown needs different mailboxes refused by every account with
 * no success; the first success ends it. */
static void
test_attribution_exchange(void **state)
{
	uint64_t t = 10000;

	(void)state;
	retry_login_refused(0, "example.com", "a", t);
	retry_login_refused(1, "example.com", "a", t);
	retry_login_refused(0, "example.com", "b", t);
	retry_login_refused(1, "example.com", "b", t);
	assert_false(retry_slowdown());			/* two mailboxes */
	retry_login_refused(0, "example.com", "c", t + 1);
	assert_true(retry_slowdown());
	assert_true(retry_login_not_before(t + 1) > t + 1);
	assert_int_equal(log_count("retry_login_slowdown"), 1);
	retry_login_ok(1, "example.com", "d", t + 2);
	assert_false(retry_slowdown());
	assert_int_equal(retry_login_not_before(t + 2), t + 2);
	assert_int_equal(log_count("retry_login_slowdown_end"), 1);
	assert_true(retry_recent_success(t + 2));
	assert_false(retry_recent_success(t + 2 + RETRY_EVIDENCE_MS));
	assert_int_equal(retry_admin_last_ok(1), t + 2);
	assert_int_equal(retry_admin_last_ok(0), 0);
}

/* ------------------------------------------------------------ negative cache */

static void
test_negcache(void **state)
{
	uint64_t t = 1000;

	(void)state;
	assert_false(retry_negcache_hit("example.com", "ghost", t));
	retry_negcache_add("Example.COM", "Ghost", t);
	assert_true(retry_negcache_hit("example.com", "ghost", t));
	assert_true(retry_negcache_hit("EXAMPLE.com", "GHOST", t + 59999));
	assert_false(retry_negcache_hit("example.org", "ghost", t));
	assert_false(retry_negcache_hit("example.com", "ghost2", t));
	assert_false(retry_negcache_hit("example.co", "mghost", t));
	/* TTL. */
	assert_false(retry_negcache_hit("example.com", "ghost", t + 60000));
	assert_int_equal(retry_negcache_size(), 0);
	/* Refreshed by a new refusal. */
	retry_negcache_add("example.com", "a", t);
	retry_negcache_add("example.com", "A", t + 30000);
	assert_int_equal(retry_negcache_size(), 1);
	assert_true(retry_negcache_hit("example.com", "a", t + 89999));
	assert_false(retry_negcache_hit("example.com", "a", t + 90000));
	/* NULL or empty domain. */
	retry_negcache_add(NULL, "b", t);
	assert_true(retry_negcache_hit("", "b", t));
	/* TTL 0: no cache. */
	C.negative_cache_ttl_ms = 0;
	retry_configure(&C);
	retry_negcache_add("example.com", "c", t);
	assert_false(retry_negcache_hit("example.com", "c", t));
}

static void
test_negcache_eviction(void **state)
{
	char mb[32];
	unsigned k;

	(void)state;
	for (k = 0; k < RETRY_NEGCACHE_MAX + 500; k++) {
		snprintf(mb, sizeof(mb), "user%u", k);
		retry_negcache_add("example.com", mb, 1000 + k / 100);
	}
	assert_int_equal(retry_negcache_size(), RETRY_NEGCACHE_MAX);
	/* The oldest went first. */
	assert_false(retry_negcache_hit("example.com", "user0", 2000));
	assert_false(retry_negcache_hit("example.com", "user499", 2000));
	assert_true(retry_negcache_hit("example.com", "user500", 2000));
	snprintf(mb, sizeof(mb), "user%u", RETRY_NEGCACHE_MAX + 499);
	assert_true(retry_negcache_hit("example.com", mb, 2000));
	/* Expired ones make room as new ones come. */
	retry_negcache_add("example.com", "late", 1000 + 60000 + 200);
	assert_true(retry_negcache_size() < RETRY_NEGCACHE_MAX);
}

/* ------------------------------------------------------------ reload */

static void
test_reload_keeps_state_by_name(void **state)
{
	static struct config_admin na[3];
	static struct addr_endpoint ns[3];
	uint64_t t = 1000;
	int k;

	(void)state;
	/* cas2 down, NPUMAdmin1 quarantined, a mailbox cached. */
	for (k = 0; k < 3; k++)
		retry_server_failed(1, "refused", t);
	retry_server_failed(0, "refused", t);
	retry_admin_result(0, false, t + 1);
	retry_admin_result(1, true, t + 1);
	retry_admin_result(0, false, t + 1);
	retry_admin_result(0, false, t + 1);
	assert_true(retry_admin_quarantined(0, t + 1));
	retry_negcache_add("example.com", "ghost", t);

	/* New order, a new server and admin, names spelled differently. */
	ns[0] = servers[2];			/* cas3: new */
	ns[1] = servers[1];			/* cas2 */
	snprintf(ns[1].host, sizeof(ns[1].host), "CAS2.example.com");
	ns[2] = servers[0];			/* cas1 */
	na[0] = admins[2];			/* NPUMAdmin3: new */
	na[1] = admins[0];
	na[1].name = "npumadmin1";
	na[2] = admins[1];
	C.servers = ns;
	C.n_servers = 3;
	C.admins = na;
	C.n_admins = 3;
	retry_configure(&C);
	assert_true(retry_server_up(0, t + 2));
	assert_false(retry_server_up(1, t + 2));	/* cas2, still down */
	assert_string_equal(retry_server_last_failure(1), "refused");
	assert_int_equal(retry_server_failures(2), 1);	/* cas1's run */
	assert_int_equal(retry_server_failures(0), 0);
	assert_false(retry_admin_quarantined(0, t + 2));
	assert_true(retry_admin_quarantined(1, t + 2));	/* NPUMAdmin1 */
	assert_false(retry_admin_quarantined(2, t + 2));
	assert_true(retry_negcache_hit("example.com", "ghost", t + 2));

	/* A removed server or admin is forgotten. */
	C.servers = servers;
	C.n_servers = 1;			/* cas1 only */
	C.admins = admins + 1;
	C.n_admins = 1;				/* NPUMAdmin2 only */
	retry_configure(&C);
	assert_int_equal(retry_server_failures(0), 1);
	assert_false(retry_admin_quarantined(0, t + 2));
	assert_true(retry_server_up(1, t + 2));		/* out of range */
	C.admins = admins;
	C.n_admins = 2;
	retry_configure(&C);
	assert_false(retry_admin_quarantined(0, t + 2));	/* fresh */
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_classify_table, setup, teardown),
		cmocka_unit_test_setup_teardown(test_classify_patterns_from_config, setup, teardown),
		cmocka_unit_test_setup_teardown(test_backoff_bounds, setup, teardown),
		cmocka_unit_test_setup_teardown(test_server_down_cooldown_probe, setup, teardown),
		cmocka_unit_test_setup_teardown(test_server_overload_aimd, setup, teardown),
		cmocka_unit_test_setup_teardown(test_all_servers_down, setup, teardown),
		cmocka_unit_test_setup_teardown(test_admin_quarantine, setup, teardown),
		cmocka_unit_test_setup_teardown(test_admin_no_quarantine_cases, setup, teardown),
		cmocka_unit_test_setup_teardown(test_slowdown_bounds_storm, setup, teardown),
		cmocka_unit_test_setup_teardown(test_slowdown_from_refusals, setup, teardown),
		cmocka_unit_test_setup_teardown(test_negcache, setup, teardown),
		cmocka_unit_test_setup_teardown(test_negcache_eviction, setup, teardown),
		cmocka_unit_test_setup_teardown(test_reload_keeps_state_by_name, setup, teardown),
		cmocka_unit_test_setup_teardown(test_attribution_one_mailbox, setup, teardown),
		cmocka_unit_test_setup_teardown(test_attribution_admin, setup, teardown),
		cmocka_unit_test_setup_teardown(test_attribution_exchange, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
