/* addr.c - "host:port" endpoints and CIDR allow-lists (no sockets, no DNS). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1	/* inet_pton() under -std=c11 */
#endif
#include "addr.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

static void addr_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
addr_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (err == NULL || errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* Decimal digits only, no sign, no spaces.  Returns 0 or -1. */
static int
addr_parse_uint(const char *s, size_t len, unsigned long max,
    unsigned long *v_r)
{
	unsigned long v = 0;
	size_t i;

	if (len == 0)
		return -1;
	for (i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		v = v * 10 + (unsigned long)(s[i] - '0');
		if (v > max)
			return -1;
	}
	*v_r = v;
	return 0;
}

/* Letters, digits, '-', '.', '_': a host name or an IPv4 literal. */
static bool
addr_host_chars_ok(const char *s, size_t len)
{
	size_t i;

	for (i = 0; i < len; i++) {
		char c = s[i];

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		    (c >= '0' && c <= '9') || c == '-' || c == '.' || c == '_'))
			return false;
	}
	return true;
}

int
addr_parse_endpoint(const char *s, struct addr_endpoint *ep,
    char *err, size_t errlen)
{
	const char *host, *port, *colon;
	size_t hostlen;
	unsigned long pv;
	char v6[INET6_ADDRSTRLEN + 1];
	struct in6_addr a6;

	memset(ep, 0, sizeof(*ep));
	if (s == NULL || *s == '\0') {
		addr_err(err, errlen, "empty address");
		return -1;
	}
	if (s[0] == '[') {
		const char *rb = strchr(s, ']');

		if (rb == NULL) {
			addr_err(err, errlen, "'%s': missing ']'", s);
			return -1;
		}
		host = s + 1;
		hostlen = (size_t)(rb - host);
		if (hostlen == 0 || hostlen >= sizeof(v6)) {
			addr_err(err, errlen, "'%s': bad IPv6 address", s);
			return -1;
		}
		memcpy(v6, host, hostlen);
		v6[hostlen] = '\0';
		if (inet_pton(AF_INET6, v6, &a6) != 1) {
			addr_err(err, errlen, "'%s': bad IPv6 address", s);
			return -1;
		}
		if (rb[1] != ':') {
			addr_err(err, errlen, "'%s': missing ':port' after ']'", s);
			return -1;
		}
		port = rb + 2;
	} else {
		colon = strrchr(s, ':');
		if (colon == NULL) {
			addr_err(err, errlen, "'%s': missing ':port'", s);
			return -1;
		}
		if (memchr(s, ':', (size_t)(colon - s)) != NULL) {
			addr_err(err, errlen,
			    "'%s': an IPv6 address needs brackets, as in [::1]:993",
			    s);
			return -1;
		}
		host = s;
		hostlen = (size_t)(colon - s);
		port = colon + 1;
		if (hostlen == 1 && host[0] == '*')
			hostlen = 0;
		if (!addr_host_chars_ok(host, hostlen)) {
			addr_err(err, errlen, "'%s': bad host name", s);
			return -1;
		}
	}
	if (hostlen >= sizeof(ep->host)) {
		addr_err(err, errlen, "'%s': host name too long", s);
		return -1;
	}
	if (addr_parse_uint(port, strlen(port), 65535, &pv) == -1 || pv == 0) {
		addr_err(err, errlen, "'%s': port must be a number 1..65535", s);
		return -1;
	}
	memcpy(ep->host, host, hostlen);
	ep->host[hostlen] = '\0';
	snprintf(ep->port, sizeof(ep->port), "%lu", pv);
	return 0;
}

int
addr_parse_cidr(const char *s, struct addr_cidr *c, char *err, size_t errlen)
{
	char buf[INET6_ADDRSTRLEN + 1];
	const char *slash;
	size_t alen, nbytes, i;
	unsigned long prefix, max;

	memset(c, 0, sizeof(*c));
	if (s == NULL || *s == '\0') {
		addr_err(err, errlen, "empty network");
		return -1;
	}
	slash = strchr(s, '/');
	alen = slash != NULL ? (size_t)(slash - s) : strlen(s);
	if (alen == 0 || alen >= sizeof(buf)) {
		addr_err(err, errlen, "'%s': bad network address", s);
		return -1;
	}
	memcpy(buf, s, alen);
	buf[alen] = '\0';
	if (inet_pton(AF_INET, buf, c->net) == 1) {
		c->family = AF_INET;
		max = 32;
	} else if (inet_pton(AF_INET6, buf, c->net) == 1) {
		c->family = AF_INET6;
		max = 128;
	} else {
		memset(c, 0, sizeof(*c));
		addr_err(err, errlen, "'%s': bad network address", s);
		return -1;
	}
	prefix = max;
	if (slash != NULL &&
	    addr_parse_uint(slash + 1, strlen(slash + 1), max, &prefix) == -1) {
		memset(c, 0, sizeof(*c));
		addr_err(err, errlen, "'%s': prefix length must be 0..%lu", s,
		    max);
		return -1;
	}
	c->prefix = (unsigned)prefix;
	/* Clear the host bits. */
	nbytes = max / 8;
	for (i = 0; i < nbytes; i++) {
		unsigned bit = (unsigned)i * 8;

		if (bit >= c->prefix)
			c->net[i] = 0;
		else if (c->prefix - bit < 8)
			c->net[i] &= (uint8_t)(0xff << (8 - (c->prefix - bit)));
	}
	return 0;
}

static bool
addr_prefix_eq(const uint8_t *a, const uint8_t *b, unsigned prefix)
{
	unsigned full = prefix / 8, rest = prefix % 8;

	if (memcmp(a, b, full) != 0)
		return false;
	if (rest == 0)
		return true;
	return ((a[full] ^ b[full]) & (uint8_t)(0xff << (8 - rest))) == 0;
}

bool
addr_cidr_match(const struct addr_cidr *c, const struct sockaddr *sa)
{
	static const uint8_t mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
	    0xff, 0xff };
	uint8_t b[16];

	if (c == NULL || sa == NULL)
		return false;
	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;

		if (c->family == AF_INET)
			return addr_prefix_eq(c->net,
			    (const uint8_t *)&sin->sin_addr, c->prefix);
		if (c->family != AF_INET6)
			return false;
		/* A v6 net such as ::ffff:0:0/96 sees v4 peers as mapped. */
		memcpy(b, mapped, 12);
		memcpy(b + 12, &sin->sin_addr, 4);
		return addr_prefix_eq(c->net, b, c->prefix);
	}
	if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *sin6 =
		    (const struct sockaddr_in6 *)sa;

		memcpy(b, &sin6->sin6_addr, 16);
		if (c->family == AF_INET6)
			return addr_prefix_eq(c->net, b, c->prefix);
		if (c->family == AF_INET && memcmp(b, mapped, 12) == 0)
			return addr_prefix_eq(c->net, b + 12, c->prefix);
	}
	return false;
}

/*
 * A v4-mapped IPv6 peer (dual-stack listener) is rendered as plain IPv4, so
 * the same client reads the same in logs and per-address counters.
 */
const char *
addr_sockaddr_str(const struct sockaddr *sa, char *buf, size_t buflen)
{
	char a[INET6_ADDRSTRLEN];

	if (buflen == 0)
		return buf;
	if (sa == NULL) {
		snprintf(buf, buflen, "-");
	} else if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;

		inet_ntop(AF_INET, &sin->sin_addr, a, sizeof(a));
		snprintf(buf, buflen, "%s:%u", a, ntohs(sin->sin_port));
	} else if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *sin6 =
		    (const struct sockaddr_in6 *)sa;

		if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
			inet_ntop(AF_INET, &sin6->sin6_addr.s6_addr[12], a,
			    sizeof(a));
			snprintf(buf, buflen, "%s:%u", a,
			    ntohs(sin6->sin6_port));
		} else {
			inet_ntop(AF_INET6, &sin6->sin6_addr, a, sizeof(a));
			snprintf(buf, buflen, "[%s]:%u", a,
			    ntohs(sin6->sin6_port));
		}
	} else {
		snprintf(buf, buflen, "?");
	}
	return buf;
}

const char *
addr_endpoint_str(const struct addr_endpoint *ep, char *buf, size_t buflen)
{
	if (buflen == 0)
		return buf;
	if (ep->host[0] == '\0')
		snprintf(buf, buflen, "*:%s", ep->port);
	else if (strchr(ep->host, ':') != NULL)
		snprintf(buf, buflen, "[%s]:%s", ep->host, ep->port);
	else
		snprintf(buf, buflen, "%s:%s", ep->host, ep->port);
	return buf;
}

bool
addr_endpoint_same(const struct addr_endpoint *a, const struct addr_endpoint *b)
{
	return util_ieq(a->host, b->host) && strcmp(a->port, b->port) == 0;
}

bool
addr_is_ip_literal(const char *host)
{
	unsigned char b[16];

	if (host == NULL)
		return false;
	return inet_pton(AF_INET, host, b) == 1 ||
	    inet_pton(AF_INET6, host, b) == 1;
}

bool
addr_host_is_loopback(const char *host)
{
	static const uint8_t v4mapped[12] = { [10] = 0xff, [11] = 0xff };
	struct in6_addr a6;
	struct in_addr a4;

	if (host == NULL)
		return false;
	if (util_ieq(host, "localhost"))
		return true;
	if (inet_pton(AF_INET, host, &a4) == 1)
		return (ntohl(a4.s_addr) >> 24) == 127;
	if (inet_pton(AF_INET6, host, &a6) != 1)
		return false;
	if (memcmp(a6.s6_addr, v4mapped, sizeof(v4mapped)) == 0)
		return a6.s6_addr[12] == 127;
	return IN6_IS_ADDR_LOOPBACK(&a6);
}
