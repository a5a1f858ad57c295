/* test_addr.c - endpoints, CIDRs, matching (incl. v4-mapped), rendering. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <arpa/inet.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "addr.h"

static void
ep_ok(const char *s, const char *host, const char *port)
{
	struct addr_endpoint ep;
	char err[128] = "";

	if (addr_parse_endpoint(s, &ep, err, sizeof(err)) != 0)
		fail_msg("'%s' refused: %s", s, err);
	assert_string_equal(ep.host, host);
	assert_string_equal(ep.port, port);
}

static void
ep_bad(const char *s, const char *errpart)
{
	struct addr_endpoint ep;
	char err[128] = "";

	if (addr_parse_endpoint(s, &ep, err, sizeof(err)) != -1)
		fail_msg("'%s' accepted", s);
	if (strstr(err, errpart) == NULL)
		fail_msg("'%s': error '%s' lacks '%s'", s, err, errpart);
}

static void
test_endpoint_forms(void **state)
{
	(void)state;
	ep_ok("cas1.example.com:993", "cas1.example.com", "993");
	ep_ok("192.0.2.7:143", "192.0.2.7", "143");
	ep_ok("[::1]:993", "::1", "993");
	ep_ok("[2001:db8::1]:1", "2001:db8::1", "1");
	ep_ok("*:993", "", "993");
	ep_ok(":993", "", "993");
	ep_ok("host:65535", "host", "65535");
	ep_ok("host:0993", "host", "993");
}

static void
test_endpoint_errors(void **state)
{
	(void)state;
	ep_bad("", "empty");
	ep_bad("host", "missing ':port'");
	ep_bad("host:", "port");
	ep_bad("host:0", "port");
	ep_bad("host:65536", "port");
	ep_bad("host:99999999999999999999", "port");
	ep_bad("host:imaps", "port");
	ep_bad("host:-1", "port");
	ep_bad("::1:993", "brackets");
	ep_bad("[::1:993", "']'");
	ep_bad("[::1]993", "':port'");
	ep_bad("[nothost]:993", "IPv6");
	ep_bad("[]:993", "IPv6");
	ep_bad("bad host:993", "host");
	ep_bad("a/b:993", "host");
}

static void
test_endpoint_str(void **state)
{
	struct addr_endpoint ep;
	char buf[300];

	(void)state;
	assert_int_equal(addr_parse_endpoint("[::1]:993", &ep, NULL, 0), 0);
	assert_string_equal(addr_endpoint_str(&ep, buf, sizeof(buf)),
	    "[::1]:993");
	assert_int_equal(addr_parse_endpoint("h.example:143", &ep, NULL, 0), 0);
	assert_string_equal(addr_endpoint_str(&ep, buf, sizeof(buf)),
	    "h.example:143");
	assert_int_equal(addr_parse_endpoint("*:1", &ep, NULL, 0), 0);
	assert_string_equal(addr_endpoint_str(&ep, buf, sizeof(buf)), "*:1");
	/* Cut, still terminated. */
	assert_int_equal(addr_parse_endpoint("h.example:143", &ep, NULL, 0), 0);
	assert_string_equal(addr_endpoint_str(&ep, buf, 4), "h.e");
}

static void
test_endpoint_same(void **state)
{
	struct addr_endpoint a, b;

	(void)state;
	assert_int_equal(addr_parse_endpoint("CAS1.example.com:993", &a, NULL, 0), 0);
	assert_int_equal(addr_parse_endpoint("cas1.EXAMPLE.com:993", &b, NULL, 0), 0);
	assert_true(addr_endpoint_same(&a, &b));
	assert_int_equal(addr_parse_endpoint("cas1.example.com:143", &b, NULL, 0), 0);
	assert_false(addr_endpoint_same(&a, &b));
	assert_int_equal(addr_parse_endpoint("cas2.example.com:993", &b, NULL, 0), 0);
	assert_false(addr_endpoint_same(&a, &b));
}

static void
test_cidr_parse(void **state)
{
	struct addr_cidr c;
	char err[128];
	static const uint8_t v4net[4] = { 10, 0, 0, 0 };
	static const uint8_t v4host[4] = { 192, 0, 2, 7 };
	static const uint8_t odd[4] = { 172, 16, 0, 0 };

	(void)state;
	assert_int_equal(addr_parse_cidr("10.0.0.0/8", &c, err, sizeof(err)), 0);
	assert_int_equal(c.family, AF_INET);
	assert_int_equal(c.prefix, 8);
	assert_memory_equal(c.net, v4net, 4);

	assert_int_equal(addr_parse_cidr("192.0.2.7", &c, err, sizeof(err)), 0);
	assert_int_equal(c.prefix, 32);
	assert_memory_equal(c.net, v4host, 4);

	/* Host bits are cleared. */
	assert_int_equal(addr_parse_cidr("10.1.2.3/8", &c, err, sizeof(err)), 0);
	assert_memory_equal(c.net, v4net, 4);
	assert_int_equal(addr_parse_cidr("172.31.255.255/12", &c, err,
	    sizeof(err)), 0);
	assert_memory_equal(c.net, odd, 4);

	assert_int_equal(addr_parse_cidr("::1", &c, err, sizeof(err)), 0);
	assert_int_equal(c.family, AF_INET6);
	assert_int_equal(c.prefix, 128);
	assert_int_equal(c.net[15], 1);

	assert_int_equal(addr_parse_cidr("2001:db8:ffff::1/32", &c, err,
	    sizeof(err)), 0);
	assert_int_equal(c.prefix, 32);
	assert_int_equal(c.net[0], 0x20);
	assert_int_equal(c.net[3], 0xb8);
	assert_int_equal(c.net[4], 0);
	assert_int_equal(c.net[15], 0);

	assert_int_equal(addr_parse_cidr("0.0.0.0/0", &c, err, sizeof(err)), 0);
	assert_int_equal(c.prefix, 0);
}

static void
cidr_bad(const char *s)
{
	struct addr_cidr c;
	char err[128] = "";

	if (addr_parse_cidr(s, &c, err, sizeof(err)) != -1)
		fail_msg("'%s' accepted", s);
	assert_true(err[0] != '\0');
}

static void
test_cidr_errors(void **state)
{
	(void)state;
	cidr_bad("");
	cidr_bad("10.0.0.0/33");
	cidr_bad("::/129");
	cidr_bad("10.0.0.0/");
	cidr_bad("10.0.0.0/-1");
	cidr_bad("10.0.0.0/8x");
	cidr_bad("10.0.0/8");
	cidr_bad("host.example/8");
	cidr_bad("/8");
	cidr_bad("10.0.0.0/8/8");
}

static struct sockaddr_in
sin4(const char *a)
{
	struct sockaddr_in s;

	memset(&s, 0, sizeof(s));
	s.sin_family = AF_INET;
	s.sin_port = htons(1234);
	assert_int_equal(inet_pton(AF_INET, a, &s.sin_addr), 1);
	return s;
}

static struct sockaddr_in6
sin6(const char *a)
{
	struct sockaddr_in6 s;

	memset(&s, 0, sizeof(s));
	s.sin6_family = AF_INET6;
	s.sin6_port = htons(993);
	assert_int_equal(inet_pton(AF_INET6, a, &s.sin6_addr), 1);
	return s;
}

static bool
match(const char *cidr, const struct sockaddr *sa)
{
	struct addr_cidr c;

	assert_int_equal(addr_parse_cidr(cidr, &c, NULL, 0), 0);
	return addr_cidr_match(&c, sa);
}

static void
test_cidr_match(void **state)
{
	struct sockaddr_in a = sin4("127.0.0.1"), b = sin4("10.200.3.4");
	struct sockaddr_in6 l6 = sin6("::1"), m = sin6("::ffff:127.0.0.9");
	struct sockaddr_in6 d = sin6("2001:db8:1::5");
	struct sockaddr_un_like { sa_family_t f; char pad[30]; } other;

	(void)state;
	assert_true(match("127.0.0.0/8", (struct sockaddr *)&a));
	assert_false(match("127.0.0.0/8", (struct sockaddr *)&b));
	assert_true(match("10.192.0.0/10", (struct sockaddr *)&b));
	assert_false(match("10.128.0.0/10", (struct sockaddr *)&b));
	assert_true(match("10.200.3.4", (struct sockaddr *)&b));
	assert_false(match("10.200.3.5", (struct sockaddr *)&b));
	assert_true(match("0.0.0.0/0", (struct sockaddr *)&b));

	/* IPv6 */
	assert_true(match("::1", (struct sockaddr *)&l6));
	assert_false(match("127.0.0.0/8", (struct sockaddr *)&l6));
	assert_true(match("2001:db8::/32", (struct sockaddr *)&d));
	assert_false(match("2001:db9::/32", (struct sockaddr *)&d));
	assert_true(match("2001:db8:1::/49", (struct sockaddr *)&d));
	assert_false(match("::1", (struct sockaddr *)&a));
	assert_true(match("::/0", (struct sockaddr *)&d));
	assert_false(match("0.0.0.0/0", (struct sockaddr *)&d));

	/* v4-mapped v6 peers match v4 nets, and the other way round. */
	assert_true(match("127.0.0.0/8", (struct sockaddr *)&m));
	assert_false(match("10.0.0.0/8", (struct sockaddr *)&m));
	assert_true(match("::ffff:127.0.0.0/104", (struct sockaddr *)&a));
	assert_true(match("0.0.0.0/0", (struct sockaddr *)&m));

	memset(&other, 0, sizeof(other));
	other.f = AF_UNIX;
	assert_false(match("0.0.0.0/0", (struct sockaddr *)&other));
	assert_false(addr_cidr_match(NULL, (struct sockaddr *)&a));
}

static void
test_sockaddr_str(void **state)
{
	struct sockaddr_in a = sin4("192.0.2.1");
	struct sockaddr_in6 b = sin6("2001:db8::2"), m = sin6("::ffff:10.1.2.3");
	char buf[64];

	(void)state;
	assert_string_equal(addr_sockaddr_str((struct sockaddr *)&a, buf,
	    sizeof(buf)), "192.0.2.1:1234");
	assert_string_equal(addr_sockaddr_str((struct sockaddr *)&b, buf,
	    sizeof(buf)), "[2001:db8::2]:993");
	assert_string_equal(addr_sockaddr_str((struct sockaddr *)&m, buf,
	    sizeof(buf)), "10.1.2.3:993");
	assert_string_equal(addr_sockaddr_str(NULL, buf, sizeof(buf)), "-");
	assert_string_equal(addr_sockaddr_str((struct sockaddr *)&a, buf, 6),
	    "192.0");
}

static void
test_ip_literal(void **state)
{
	(void)state;
	assert_true(addr_is_ip_literal("192.0.2.1"));
	assert_true(addr_is_ip_literal("::1"));
	assert_true(addr_is_ip_literal("2001:db8::2"));
	assert_false(addr_is_ip_literal("cas1.example.com"));
	assert_false(addr_is_ip_literal("192.0.2"));
	assert_false(addr_is_ip_literal(""));
	assert_false(addr_is_ip_literal(NULL));
}

/* Loopback listeners are the ones a cleartext LOGIN may stay on. */
static void
test_host_loopback(void **state)
{
	(void)state;
	assert_true(addr_host_is_loopback("127.0.0.1"));
	assert_true(addr_host_is_loopback("127.255.0.9"));
	assert_true(addr_host_is_loopback("::1"));
	assert_true(addr_host_is_loopback("::ffff:127.0.0.1"));
	assert_true(addr_host_is_loopback("localhost"));
	assert_true(addr_host_is_loopback("LOCALHOST"));
	assert_false(addr_host_is_loopback(""));	/* any address */
	assert_false(addr_host_is_loopback("0.0.0.0"));
	assert_false(addr_host_is_loopback("::"));
	assert_false(addr_host_is_loopback("128.0.0.1"));
	assert_false(addr_host_is_loopback("::ffff:192.0.2.1"));
	assert_false(addr_host_is_loopback("::2"));
	assert_false(addr_host_is_loopback("localhost.example.com"));
	assert_false(addr_host_is_loopback(NULL));
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_endpoint_forms),
		cmocka_unit_test(test_endpoint_errors),
		cmocka_unit_test(test_endpoint_str),
		cmocka_unit_test(test_endpoint_same),
		cmocka_unit_test(test_cidr_parse),
		cmocka_unit_test(test_cidr_errors),
		cmocka_unit_test(test_cidr_match),
		cmocka_unit_test(test_sockaddr_str),
		cmocka_unit_test(test_ip_literal),
		cmocka_unit_test(test_host_loopback),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
