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
	/* A sign of load (a timeout, Exchange's connection limit): overload
	 * rather than a failure when the server works otherwise (R14). */
	bool rv_load;
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
/* Addition: the first server in list order that is up and whose bit is
 * not set in avoid (bit i = server i), else such a server whose cooldown
 * has ended (a probe), else (size_t)-1: none of the others is usable at
 * now.
 * Both pickers start a probe when they return a down server whose
 * cooldown has ended: until that probe reports (retry_server_ok or
 * retry_server_failed) or another server_cooldown passes, the server is
 * not offered again, so one probe at a time reaches a down server. */
size_t retry_server_pick_except(uint64_t now_ms, uint64_t avoid);
void retry_server_failed(size_t server, const char *reason, uint64_t now_ms);
void retry_server_ok(size_t server);
bool retry_server_up(size_t server, uint64_t now_ms);
/* Last failure reason ("" if none) and consecutive failures. */
const char *retry_server_last_failure(size_t server);
unsigned retry_server_failures(size_t server);
/*
 * Overload (DESIGN 3.3 P12, 3.5 R14).  Each server has a bound on the
 * logins (connect, TLS handshake, login) in flight at once, between 1 and
 * max_logins_in_flight: additive increase, multiplicative decrease.
 * retry_server_success(): a login to it completed, or it answered one
 * (up, as retry_server_ok, and +1 to the bound).  retry_server_overloaded():
 * a failure with rv_load set; true when it is overload, i.e. the server
 * completed a login less than connect_timeout + login_timeout before now:
 * the bound halves (once per generation of logins: only for a login
 * started after the last halving, as TCP halves once per round trip), it
 * is counted and logged (server_overload), and it counts neither towards
 * server_fail_threshold nor against the server.  false: the caller goes
 * on with retry_server_failed().
 */
void retry_server_success(size_t server, uint64_t now_ms);
bool retry_server_overloaded(size_t server, const char *reason,
    uint64_t started_ms, uint64_t now_ms);
unsigned retry_server_limit(size_t server);
uint64_t retry_server_overloads(size_t server);
/* Addition: true while a probe of this (down) server is under way. */
bool retry_server_probing(size_t server, uint64_t now_ms);
/* True when every server is down at now, none may be probed (each in its
 * cooldown) and no probe is under way: a waiter then fails at once.
 * (retry_server_up() is false from the threshold until a probe succeeds,
 * for imapshim_server_up; this one is false as soon as a probe may go.) */
bool retry_all_servers_down(uint64_t now_ms);

/* ---- attribution: the mailbox, the admin account, the server or Exchange
 * (DESIGN 3.5 R4-R6; admin: index into cfg->admins)
 *
 * Exchange says "NO LOGIN failed." for a missing mailbox, a full or locked
 * admin account and a refusing back end alike, so a refusal is charged by
 * evidence across mailboxes.  The pool reports every refusal by Exchange
 * (transient or final class) with retry_login_refused() and every
 * successful login with retry_login_ok(); server failures (RETRY_SERVER)
 * go to the server's health only.  Mailboxes are told apart by a hash of
 * (domain, mailbox), ASCII case-insensitive, as the negative cache keys
 * them; up to RETRY_MB_TRACK (8) different ones are remembered per
 * account and for Exchange.
 *
 * Admin account: quarantined for admin_cooldown when its refusals since
 * its last success name RETRY_ADMIN_QUARANTINE_FAILS (3) different
 * mailboxes and another account logged in since this run of failures
 * began, less than admin_cooldown ago.  Logged at warn
 * (retry_admin_quarantined, with the evidence) once per quarantine; the
 * cooldown's end and its next success are logged at info
 * (retry_admin_released).  Its run is kept after the cooldown, so one
 * more refusal while others succeed quarantines it again at once.
 *
 * Exchange as a whole (the slowdown): when the refusals since the last
 * successful login of any account name RETRY_SLOW_AFTER (3) different
 * mailboxes and every account refused at least one of them, each refusal
 * sets the earliest next login to refusal time + backoff(k) (k = 1, 2,
 * ...: backoff_initial doubling to backoff_max, with jitter), and each
 * new login moves it a step further, so with every password wrong a few
 * logins go at first, then at most about one per backoff_max/2, however
 * many clients ask.  Logged at warn (retry_login_slowdown) when it
 * starts; the first successful login ends it (retry_login_slowdown_end).
 *
 * The mailbox: when every account refused one mailbox and the pool has
 * evidence that the accounts and Exchange work (pool_attr.c, DESIGN 3.5 R5),
 * retry_mailbox_at_fault() takes its refusals back out of every
 * account's run and Exchange's: a mailbox polled for ever never
 * quarantines an account nor slows the site down.
 */
#define RETRY_ADMIN_QUARANTINE_FAILS 3
#define RETRY_SLOW_AFTER 3
/* A success older than this is no evidence that Exchange works now. */
#define RETRY_EVIDENCE_MS (5 * 60 * 1000)
void retry_login_ok(size_t admin, const char *domain, const char *mailbox,
    uint64_t now_ms);
void retry_login_refused(size_t admin, const char *domain,
    const char *mailbox, uint64_t now_ms);
void retry_mailbox_at_fault(const char *domain, const char *mailbox);
/* Older forms: a result for a mailbox nobody else shares (each refusal a
 * different mailbox); retry_admin_refused() counts towards the slowdown
 * only, never towards the account's quarantine. */
void retry_admin_result(size_t admin, bool ok, uint64_t now_ms);
void retry_admin_refused(size_t admin, uint64_t now_ms);
bool retry_admin_usable(size_t admin, uint64_t now_ms);
bool retry_admin_quarantined(size_t admin, uint64_t now_ms);
/* The account's last successful login (0: none yet). */
uint64_t retry_admin_last_ok(size_t admin);
/* Some login succeeded less than RETRY_EVIDENCE_MS ago. */
bool retry_recent_success(uint64_t now_ms);
/* The slowdown is on (Exchange as a whole refuses). */
bool retry_slowdown(void);
/* During the slowdown, the earliest time the next new login may start
 * (now_ms when there is no slowdown). */
uint64_t retry_login_not_before(uint64_t now_ms);
/* A new login starts now: during the slowdown this moves
 * retry_login_not_before() a backoff step further. */
void retry_login_started(uint64_t now_ms);

/* ---- negative cache of refused mailboxes: keyed by (domain, mailbox),
 * ASCII case-insensitive; entries live negative_cache_ttl (0: no cache);
 * beyond RETRY_NEGCACHE_MAX entries the oldest is dropped. */
#define RETRY_NEGCACHE_MAX 10000
void retry_negcache_add(const char *domain, const char *mailbox, uint64_t now_ms);
bool retry_negcache_hit(const char *domain, const char *mailbox, uint64_t now_ms);

/* Entries in the negative cache (expired ones may still count). */
size_t retry_negcache_size(void);
/* Drop the entries expired at now (before reading the size). */
void retry_negcache_expire(uint64_t now_ms);

/* Addition: a 32-bit random number for retry_backoff_ms() (xorshift,
 * seeded from the clock at the first retry_configure; not for secrets).
 * retry_seed: tests only. */
uint32_t retry_rand(void);
void retry_seed(uint32_t seed);

/* Forget all state (servers, admins, slowdown, negative cache). */
void retry_shutdown(void);

#endif
