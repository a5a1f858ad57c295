/*
 * addr.h - "host:port" endpoints and CIDR allow-lists.
 *
 * Owns nothing but the parsing and matching rules; no sockets, no DNS.
 * Accepted endpoint forms: "host:port", "1.2.3.4:port", "[::1]:port",
 * ":port" and "*:port" (any address).  CIDR forms: "10.0.0.0/8",
 * "192.0.2.7" (a /32), "::1", "2001:db8::/32".
 */
#ifndef ADDR_H
#define ADDR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct addr_endpoint {
	char host[256];		/* as written, brackets removed; "" = any */
	char port[8];		/* decimal, 1..65535 */
};

struct addr_cidr {
	int family;		/* AF_INET or AF_INET6 */
	uint8_t net[16];	/* network bytes, host bits cleared */
	unsigned prefix;	/* 0..32 or 0..128 */
};

/* Returns 0, or -1 with a reason in err. */
int addr_parse_endpoint(const char *s, struct addr_endpoint *ep,
    char *err, size_t errlen);
int addr_parse_cidr(const char *s, struct addr_cidr *c, char *err, size_t errlen);

/* True when sa (AF_INET or AF_INET6; v4-mapped v6 matches v4 nets) is in c. */
bool addr_cidr_match(const struct addr_cidr *c, const struct sockaddr *sa);

/* Render sa as "1.2.3.4:5" or "[::1]:5" into buf.  Returns buf. */
const char *addr_sockaddr_str(const struct sockaddr *sa, char *buf, size_t buflen);

/* "host:port" of an endpoint, with brackets for IPv6 literals.  Returns buf. */
const char *addr_endpoint_str(const struct addr_endpoint *ep, char *buf,
    size_t buflen);

/* True when a and b name the same endpoint: host ASCII case-insensitive,
 * port as written. */
bool addr_endpoint_same(const struct addr_endpoint *a,
    const struct addr_endpoint *b);

/* True when host is an IPv4 or IPv6 literal (no SNI is sent for those). */
bool addr_is_ip_literal(const char *host);

/* True when host names this machine only: 127.0.0.0/8, ::1 (also
 * v4-mapped) or "localhost".  "" (any address) is not loopback. */
bool addr_host_is_loopback(const char *host);

#endif
