/*
 * pool.h - the bounded pool of upstream sessions.
 *
 * Owns the budget: every upstream session counts, from the moment its
 * connect starts until it is freed, against the global session_budget and
 * against its admin account's max_sessions; nothing else changes those
 * counters.  Also owns the choice of admin account for a new login (most
 * free capacity, not rate-limited, ties round-robin), the idle sessions
 * kept logged in per mailbox (LRU, retired after reuse_timeout or before
 * Exchange's failure counters run out), the FIFO queue of waiters, and the
 * login pacing (a token bucket of login_rate/login_burst per admin, and per
 * server at most retry_server_limit() logins in flight: DESIGN 3.3 P12).
 *
 * A client asks for a session for its mailbox with pool_acquire(); the pool
 * answers later, never from inside pool_acquire(), through the waiter's
 * granted or failed callback.  The granted session is leased: the client
 * installs its own upstream callbacks and gives it back with pool_release().
 *
 * The pool reaches sockets only through struct pool_ops, so unit tests run
 * it with fake upstreams and a fake clock.
 */
#ifndef POOL_H
#define POOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "imapshim.h"
#include "upstream.h"

struct config;
struct event_base;
struct evdns_base;

/* Why a waiter failed; pw_explain says more in words (DESIGN 3.5 R5,
 * the client's texts). */
enum pool_fail {
	POOL_FAIL_TIMEOUT,	/* queue_timeout passed: "NO [UNAVAILABLE]" */
	POOL_FAIL_UNAVAILABLE,	/* no server could be used: "NO [UNAVAILABLE]" */
	POOL_FAIL_AUTH,		/* Exchange refused this mailbox: "NO [AUTHENTICATIONFAILED]" */
	POOL_FAIL_REFUSED,	/* Exchange answered but refused the login, not
				 * (provably) for this mailbox's sake:
				 * "NO [UNAVAILABLE]" */
	POOL_FAIL_COUNT
};

enum pool_release {
	POOL_RELEASE_CLEAN,	/* at a boundary, nothing selected: keep as is */
	POOL_RELEASE_SELECTED,	/* at a boundary, a mailbox selected: reset first */
	POOL_RELEASE_DIRTY,	/* mid-command, IDLE, literal: close it */
};

struct pool_waiter;
typedef void (*pool_granted_cb)(struct pool_waiter *w, struct upstream *u);
typedef void (*pool_failed_cb)(struct pool_waiter *w, enum pool_fail why,
    const char *reason);

/* Owned by the caller (the client allocates one per request and frees it
 * after the pool's answer or pool_cancel()); it fills the first six
 * fields. */
struct pool_waiter {
	char pw_mailbox[IMAPSHIM_MAILBOX_MAX + 1];
	/* The client's {domain}: used upstream when [upstream] domain is
	 * unset, and then part of what a pooled session is kept for. */
	char pw_domain[IMAPSHIM_NAME_MAX + 1];
	pool_granted_cb pw_granted;
	pool_failed_cb pw_failed;
	void *pw_arg;
	/* An IDLE poll (DESIGN 3.4 M10): it yields to every other waiter,
	 * in a FIFO of its own, and has no queue_timeout (nobody waits for
	 * its answer; it runs when a session is free). */
	bool pw_poll;
	/* private to the pool (pool_int.h) */
	bool pw_queued;
	uint64_t pw_since_ms;
	uint64_t pw_deadline_ms;
	struct pool_entry *pw_entry;	/* a login started for this waiter */
	TAILQ_ENTRY(pool_waiter) pw_link;
	int pw_state;			/* idle, queued, or result pending */
	enum pool_fail pw_fail_why;	/* result pending: the failure */
	char pw_reason[256];		/* its reason: Exchange's words or the
					 * last server failure */
	/* Read by the failed callback: what happened, in words for the
	 * client ("with every admin account while other mailboxes log
	 * in", "the session budget is full" ...); "" if nothing to add. */
	char pw_explain[160];
	/* Retries (retry.c), for this pool_acquire() only.  Bit i stands
	 * for index i of cfg->servers / cfg->admins (CONFIG_MAX_SERVERS,
	 * CONFIG_MAX_ADMINS: at most 64 each). */
	unsigned pw_attempts;		/* logins started for it */
	uint64_t pw_servers_failed;	/* servers that failed it (RETRY_SERVER) */
	uint64_t pw_admins_tried;	/* admins a login was started with */
	uint64_t pw_admins_refused;	/* admins that refused it (RETRY_FINAL) */
	size_t pw_last_server;		/* of its last login, or (size_t)-1 */
	uint64_t pw_not_before_ms;	/* backoff: no new login before */
	unsigned pw_overloads;		/* its logins that met overload (R14) */
	/* Attribution (DESIGN 3.5 R5). */
	uint64_t pw_admins_declined;	/* admins that refused it transiently */
	uint64_t pw_first_refusal_ms;	/* 0: none yet */
	unsigned pw_refusals;		/* refusals not yet charged (metrics) */
	bool pw_server_answered;	/* a server failure past TCP connect */
	int pw_probe;			/* none, pending, running, done */
	size_t pw_probe_admin;
};

/*
 * What the pool needs from the outside world.  Production uses
 * pool_default_ops (upstream.c and libevent); tests pass fakes.
 */
struct pool_ops {
	uint64_t (*now_ms)(void);
	/* Start a login as admin (index into cfg->admins) for mailbox on
	 * server (index into cfg->servers); report through cbs/arg exactly
	 * like upstream_new().  on_free(free_arg) must be called once when
	 * the session is finally freed (upstream_params.on_free): the budget
	 * slot ends there.  Never calls back from inside open().  NULL:
	 * could not start (no on_free follows). */
	struct upstream *(*open)(const struct config *cfg, size_t admin,
	    size_t server, const char *domain, const char *mailbox, const struct upstream_cbs *cbs,
	    void *arg, void (*on_free)(void *), void *free_arg);
	void (*close)(struct upstream *u, const char *reason);
	void (*set_lessee)(struct upstream *u, const struct upstream_cbs *cbs,
	    void *arg);
	/* Internal command on an unleased session; done(arg, ok) later. */
	int (*command)(struct upstream *u, const char *cmd,
	    void (*done)(void *arg, bool ok), void *arg);
	bool (*has_cap)(const struct upstream *u, const char *cap);
	/* Tagged NO+BAD so far; *bad_r gets the BADs alone. */
	unsigned (*failed_responses)(const struct upstream *u, unsigned *bad_r);
	/* Run pool_tick() at or after at_ms (one timer; later calls replace
	 * it; UINT64_MAX cancels it). */
	void (*schedule)(uint64_t at_ms);
};

extern const struct pool_ops pool_default_ops;
/* What pool_default_ops needs to open sessions; upstream_ctx is replaced
 * on reload. */
void pool_default_env(struct event_base *base, struct evdns_base *dns,
    SSL_CTX *upstream_ctx);

/* cfg may be replaced later by pool_set_config (reload).  Both call
 * retry_configure(cfg); pool_shutdown() calls retry_shutdown(). */
void pool_init(const struct config *cfg, const struct pool_ops *ops);
void pool_set_config(const struct config *cfg);
/* Drop the waiters (no callbacks), close every session not leased (a leased
 * one closes at its release), stop the timer (pool_default_ops: freed, so
 * call this before event_base_free).  Entries live until their on_free, so
 * upstream_free_all() may run after this. */
void pool_shutdown(void);

/*
 * Queue w for a session of w->pw_mailbox.  Never calls back synchronously.
 * A mailbox in retry.c's negative cache fails with POOL_FAIL_AUTH (from
 * the next tick).  Failed logins are retried per DESIGN.md 3.5 (see
 * pool_login_failed in pool_attr.c): w fails with POOL_FAIL_UNAVAILABLE when
 * every server failed for it or every server is down; with
 * POOL_FAIL_REFUSED when login_attempts refusals are spent and the
 * mailbox is not shown to be at fault; with POOL_FAIL_AUTH when every
 * usable admin account refused the mailbox and the evidence charges the
 * mailbox (R5); with POOL_FAIL_TIMEOUT at queue_timeout.
 */
void pool_acquire(struct pool_waiter *w);
/* Forget a queued waiter (client gone); a login started for it is kept
 * for the pool if it succeeds. */
void pool_cancel(struct pool_waiter *w);
/* Give a leased session back. */
void pool_release(struct upstream *u, enum pool_release how);
/* True when a session has seen so many tagged NO/BAD that Exchange would
 * soon close it (10th NO-or-BAD, 3rd BAD): its lessee should change to a
 * fresh one at the next boundary (pool_release retires it then). */
bool pool_session_worn(const struct upstream *u);
/* A leased session died; the lessee saw "lost".  The pool forgets it. */
void pool_forget(struct upstream *u);

/*
 * Called from pool_tick when need waiters find the budget full and no idle
 * session to close: the lessees should give sessions back (multiplex mode
 * parks its longest-idle clients).  Repeated on later ticks while the
 * shortage lasts, so the callee counts what it is already doing.
 */
void pool_set_pressure(void (*fn)(unsigned need));
/* A lessee could now give its session back: if waiters are short of
 * slots, run the pressure callback again soon. */
void pool_note_parkable(void);

/* Timers: queue timeouts, idle retirement, token refill. */
void pool_tick(void);

/*
 * Descriptors (DESIGN 3.3 P13): upstream sessions and client connections
 * share one open-file limit, and a client must never be refused at accept
 * because the pool holds idle upstream sockets.  The budget the pool
 * applies is pool_budget_fit() of session_budget, the admins' max_sessions
 * added up, and the descriptors left: limit - reserve - clients.
 *
 * pool_set_fd_limit(): the soft RLIMIT_NOFILE (0: none, the default) and
 * the descriptors kept for everything else (listeners, status, console,
 * DNS, log files).  pool_set_clients(): the client connections open now,
 * from their owner, at every change.  When the budget falls below the
 * sessions open, idle ones are logged out (LRU first) and busy ones as
 * they come back; logins wait in the queue as when the budget is full.
 */
void pool_set_fd_limit(uint64_t limit, unsigned reserve);
void pool_set_clients(unsigned clients);
/* Never fewer sessions than this for want of descriptors (unless a budget
 * is lower): a nearly full appliance still serves, and the few it takes
 * come out of a reserve sized for the worst case. */
#define POOL_FD_FLOOR 8
/* min(session_budget, admin_max, max(limit - reserve - clients,
 * POOL_FD_FLOOR)); limit 0: no limit. */
unsigned pool_budget_fit(unsigned session_budget, uint64_t admin_max,
    uint64_t limit, unsigned reserve, unsigned clients);

/* Counters for status and tests. */
struct pool_stats {
	unsigned sessions;		/* all upstream sessions, any state */
	unsigned effective_budget;	/* the budget applied (P13) */
	unsigned connecting;		/* connect, TLS, login */
	unsigned idle;			/* in the pool */
	unsigned leased;
	unsigned waiters;		/* commands and logins */
	unsigned poll_waiters;		/* IDLE polls (pw_poll) */
	uint64_t reuses;		/* grants served by a pooled session */
	uint64_t logins_ok, logins_failed;
	uint64_t queue_timeouts;
	uint64_t oldest_wait_ms;
};
void pool_get_stats(struct pool_stats *st);
/* Sessions of one admin account (index into cfg->admins). */
unsigned pool_admin_sessions(size_t admin);

/* One upstream session as /metrics and /status show it. */
struct pool_session_info {
	const char *admin;	/* admin account name */
	size_t server;		/* index into cfg->servers; (size_t)-1 once a
				 * reload removed that server */
	const char *state;	/* "login", "idle", "checking", "resetting",
				 * "handoff", "leased", "closing" */
	const char *mailbox;
	uint64_t age_ms;	/* since the connect started */
	uint64_t idle_ms;	/* since last use */
};
/* Call fn for every session the pool counts (all states). */
void pool_foreach_session(void (*fn)(const struct pool_session_info *si,
    void *arg), void *arg);
/* State names pool_session_info.state takes, in order, NULL-terminated. */
extern const char *const pool_state_names[];

/*
 * The operator's console (DESIGN.md 3.6).  Neither setting is
 * configuration: both last until changed back or the process ends, and
 * survive a reload (a drained server by its name).
 *
 * pool_pause(true): no new upstream login starts (like PgBouncer's PAUSE);
 * waiters stay queued, bounded by queue_timeout as always, and are still
 * served by pooled sessions of their mailbox; sessions already logged in
 * keep working.  pool_pause(false) serves the queue at once.
 *
 * pool_server_drain(i, true): no new login on server i (index into
 * cfg->servers); its idle sessions are logged out now, the
 * others when their lessee releases them, so clients move to the other
 * servers as their sessions become free.  While every server is drained
 * logins wait as if paused.  false: enabled again.  Returns 0, or -1 for
 * a server it cannot name.
 */
void pool_pause(bool on);
bool pool_is_paused(void);
int pool_server_drain(size_t server, bool on);
bool pool_server_draining(size_t server);
/* The server (index into cfg->servers) of a session the pool counts, or
 * (size_t)-1 (unknown session, or its server removed by a reload). */
size_t pool_session_server(const struct upstream *u);

#endif
