/*
 * test_upstream.c - the upstream connection's first bytes.
 *
 * A server's first words can already be waiting, with its FIN, when
 * imapshim learns that its TCP connect completed (a busy appliance, or a
 * server that answers at once).  Each test connects an upstream to a
 * loopback listener, accepts and answers before the event loop runs once,
 * and checks that the answer was read and named: Exchange's plaintext
 * "* BYE ... 14" to a TLS ClientHello (no certificate bound to IMAP, event
 * 1102), or a BYE greeting on a plaintext connection.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <arpa/inet.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "config.h"
#include "reap.h"
#include "tls.h"
#include "upstream.h"

struct outcome {
	bool failed;
	enum up_fail why;
	char reason[512];
	bool freed;
};

static void
on_failed(void *arg, enum up_fail why, const char *reason)
{
	struct outcome *o = arg;

	o->failed = true;
	o->why = why;
	snprintf(o->reason, sizeof(o->reason), "%s", reason);
}

static void
on_free(void *arg)
{
	((struct outcome *)arg)->freed = true;
}

static const struct upstream_cbs cbs = { .failed = on_failed };

static int
listener(char *port, size_t portlen)
{
	struct sockaddr_in sin = { .sin_family = AF_INET };
	socklen_t len = sizeof(sin);
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	assert_true(fd >= 0);
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
	assert_int_equal(listen(fd, 4), 0);
	assert_int_equal(getsockname(fd, (struct sockaddr *)&sin, &len), 0);
	snprintf(port, portlen, "%u", ntohs(sin.sin_port));
	return fd;
}

/* Connect, let the server say `answer` and close before imapshim's loop
 * runs once, then run the loop until the upstream is gone. */
static void
answer_before_loop(enum config_tls_mode tls, const char *answer,
    struct outcome *o)
{
	struct event_base *base = event_base_new();
	SSL_CTX *ctx = NULL;
	struct upstream_params p;
	char port[16], err[256];
	int lfd, sfd;

	assert_non_null(base);
	assert_int_equal(reap_init(base), 0);
	if (tls != CFG_TLS_NONE) {
		ctx = tls_client_ctx_new(false, NULL, err, sizeof(err));
		assert_non_null(ctx);
	}
	lfd = listener(port, sizeof(port));
	memset(&p, 0, sizeof(p));
	p.host = "127.0.0.1";
	p.port = port;
	p.tls = tls;
	p.ssl_ctx = ctx;
	p.tls_name = "127.0.0.1";
	p.login_user = "example.com/NPUMAdmin/vm1";
	p.password = "secret";
	p.connect_timeout_ms = 5000;
	p.login_timeout_ms = 5000;
	p.on_free = on_free;
	p.free_arg = o;
	memset(o, 0, sizeof(*o));
	/* A numeric host needs no resolver: connect() is under way when
	 * upstream_new returns, and loopback completes it at once. */
	assert_non_null(upstream_new(base, NULL, &p, &cbs, o));
	sfd = accept(lfd, NULL, NULL);
	assert_true(sfd >= 0);
	assert_int_equal(write(sfd, answer, strlen(answer)), (ssize_t)strlen(answer));
	close(sfd);
	while (!o->freed)
		assert_int_equal(event_base_loop(base, EVLOOP_ONCE), 0);
	close(lfd);
	reap_shutdown();
	tls_ctx_free(ctx);
	event_base_free(base);
}

static void
test_plaintext_bye_to_client_hello(void **state)
{
	struct outcome o;

	(void)state;
	answer_before_loop(CFG_TLS_IMPLICIT,
	    "* BYE Connection is closed. 14\r\n", &o);
	assert_true(o.failed);
	assert_int_equal(o.why, UP_FAIL_TLS);
	assert_non_null(strstr(o.reason, "plaintext \"* BYE\""));
	assert_non_null(strstr(o.reason, "event 1102"));
}

static void
test_bye_greeting_in_plaintext(void **state)
{
	struct outcome o;

	(void)state;
	answer_before_loop(CFG_TLS_NONE, "* BYE Connection is closed. 10\r\n", &o);
	assert_true(o.failed);
	assert_int_equal(o.why, UP_FAIL_GREETING);
	assert_non_null(strstr(o.reason, "Connection is closed. 10"));
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_plaintext_bye_to_client_hello),
		cmocka_unit_test(test_bye_greeting_in_plaintext),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
