/* test_notify.c - the STATUS text, and what reaches NOTIFY_SOCKET (only
 * with NOTIFY_SOCKET set, newlines and control bytes kept out of STATUS). */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmocka.h>
#include <event2/event.h>

#include "notify.h"

static unsigned load_calls;

static void
load_cb(struct notify_load *l_r)
{
	memset(l_r, 0, sizeof(*l_r));
	load_calls++;
}

static void
test_load_text(void **state)
{
	struct notify_load l = {
		.nl_unauthenticated = 3, .nl_attached = 10, .nl_parked = 1200,
		.nl_waiting = 24, .nl_sessions = 16, .nl_budget = 16,
	};
	char buf[128];

	(void)state;
	assert_string_equal(notify_load_text(buf, sizeof(buf), &l, false),
	    "clients 1237 (attached 10, parked 1200, waiting 24); upstream 16/16");
	assert_string_equal(notify_load_text(buf, sizeof(buf), &l, true),
	    "draining; clients 1237 (attached 10, parked 1200, waiting 24); "
	    "upstream 16/16");
	/* Cut to the buffer, still a string. */
	assert_string_equal(notify_load_text(buf, 11, &l, false), "clients 12");
}

static void
test_no_socket_no_timers(void **state)
{
	struct event_base *base = event_base_new();

	(void)state;
	unsetenv("NOTIFY_SOCKET");
	setenv("WATCHDOG_USEC", "1000", 1);
	load_calls = 0;
	assert_int_equal(notify_start(base, load_cb), 0);
	notify_ready("x");
	notify_stopping();
	/* No timer armed: the loop has nothing to wait for. */
	assert_int_equal(event_base_loop(base, EVLOOP_ONCE), 1);
	assert_int_equal(load_calls, 0);
	notify_stop();
	unsetenv("WATCHDOG_USEC");
	event_base_free(base);
}

static void
recv_msg(int fd, char *buf, size_t len)
{
	ssize_t n = recv(fd, buf, len - 1, 0);

	assert_true(n > 0);
	buf[n] = '\0';
}

static void
test_messages(void **state)
{
	struct sockaddr_un sun;
	struct event_base *base;
	char dir[] = "/tmp/test_notify.XXXXXX", msg[600];
	int fd;

	(void)state;
	if (!notify_supported())
		skip();
	assert_non_null(mkdtemp(dir));
	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	snprintf(sun.sun_path, sizeof(sun.sun_path), "%s/sock", dir);
	fd = socket(AF_UNIX, SOCK_DGRAM, 0);
	assert_true(fd >= 0);
	assert_int_equal(bind(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
	setenv("NOTIFY_SOCKET", sun.sun_path, 1);
	unsetenv("WATCHDOG_USEC");
	base = event_base_new();
	assert_int_equal(notify_start(base, load_cb), 0);

	notify_ready("reload rejected: %s", "bad\nfile\x01name");
	recv_msg(fd, msg, sizeof(msg));
	assert_string_equal(msg, "READY=1\nSTATUS=reload rejected: bad file name");
	notify_reloading();
	recv_msg(fd, msg, sizeof(msg));
	assert_true(strncmp(msg, "RELOADING=1\nMONOTONIC_USEC=", 27) == 0);
	notify_status("%s", "clients 0");
	recv_msg(fd, msg, sizeof(msg));
	assert_string_equal(msg, "STATUS=clients 0");
	notify_stopping();
	recv_msg(fd, msg, sizeof(msg));
	assert_string_equal(msg, "STOPPING=1\nSTATUS=draining");

	notify_stop();
	unsetenv("NOTIFY_SOCKET");
	event_base_free(base);
	close(fd);
	unlink(sun.sun_path);
	rmdir(dir);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_load_text),
		cmocka_unit_test(test_no_socket_no_timers),
		cmocka_unit_test(test_messages),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
