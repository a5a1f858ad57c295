/*
 * retry.h - failure classes, backoff, server health, admin quarantine and
 * the negative cache.
 *
 * Owns what imapshim knows about failing: which Exchange answers are worth
 * another try and which are final (a table, since Exchange sends no RFC
 * 5530 codes and must be classified by text), how long to wait before the
 * next try, which CAS servers are down and until when, which admin
 * accounts are quarantined (a lockout guard: an account whose logins keep
 * failing while others succeed), and which mailboxes were refused recently.
 * Pure logic over a clock the caller passes in: no sockets, no timers.
 */
#ifndef RETRY_H
#define RETRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "stats.h"
#include "upstream.h"

struct config;

enum retry_class {
	RETRY_SERVER,		/* the server failed: next server, backoff, health */
	RETRY_LOGIN,		/* transient login refusal: retry, another admin */
	RETRY_FINAL,		/* this mailbox is refused: NO [AUTHENTICATIONFAILED] */
	RETRY_CLASS_COUNT
};

struct retry_verdict {
	enum retry_class rv_class;
	enum stats_retry_reason rv_reason;	/* for metrics */
	const char *rv_label;	/* short reason for logs: "proxy-not-authenticated" ... */
};

/*
 * Classify a failed upstream login.  why and text come from upstream.c's
 * failed callback (text: the server's words after NO/BAD, or the
 * connection/TLS reason).  Login refusals matching one of cfg's
 * transient_login_patterns (case-insensitive substring) are RETRY_LOGIN;
 * "[AUTHENTICATIONFAILED]" and other refusals are RETRY_FINAL; every other
 * failure (connect, TLS, certificate, BYE greeting such as "Connection is
 * closed. 14" or ". 10", timeout, protocol) is RETRY_SERVER.
 */
void retry_classify(const struct config *cfg, enum up_fail why,
    const char *text, struct retry_verdict *v);

/* Exponential backoff with jitter for the n-th retry (n >= 1):
 * min(backoff_max, backoff_initial * 2^(n-1)), then a random value in
 * [half of it, all of it].  rnd: any 32-bit random number. */
uint64_t retry_backoff_ms(const struct config *cfg, unsigned n, uint32_t rnd);

/* (Re)size the tables for cfg: servers and admins keep their state when
 * their name is unchanged (reload).  Call once at start and on reload. */
void retry_configure(const struct config *cfg);

/* ---- server health (index into cfg->servers) */
/* The server a new connection should try first at now: the first server
 * in list order that is up, else the one whose cooldown ends first (a
 * probe).  skip: a server to avoid if any other is usable (the one that
 * just failed), or (size_t)-1. */
size_t retry_server_pick(uint64_t now_ms, size_t skip);
void retry_server_failed(size_t server, const char *reason, uint64_t now_ms);
void retry_server_ok(size_t server);
bool retry_server_up(size_t server, uint64_t now_ms);
/* Last failure reason ("" if none) and consecutive failures. */
const char *retry_server_last_failure(size_t server);
unsigned retry_server_failures(size_t server);
/* True when every server is down at now (a waiter then fails at once). */
bool retry_all_servers_down(uint64_t now_ms);

/* ---- admin quarantine (index into cfg->admins) */
void retry_admin_result(size_t admin, bool ok, uint64_t now_ms);
bool retry_admin_usable(size_t admin, uint64_t now_ms);
bool retry_admin_quarantined(size_t admin, uint64_t now_ms);
/* When every admin keeps failing, new logins slow down: the earliest time
 * the next new login may start (now_ms when there is no slowdown). */
uint64_t retry_login_not_before(uint64_t now_ms);

/* ---- negative cache of refused mailboxes */
void retry_negcache_add(const char *domain, const char *mailbox, uint64_t now_ms);
bool retry_negcache_hit(const char *domain, const char *mailbox, uint64_t now_ms);

void retry_shutdown(void);

#endif
