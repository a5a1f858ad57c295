/*
 * pool_int.h - what the files of the pool module share.
 *
 * The pool module is one object, the pool (struct pool_state), split by
 * concern:
 *
 *   pool.c       the budget and its counters, entries and their states,
 *                the wait queue, serving it (admin, server, login), the
 *                tick, the public API
 *   pool_attr.c  attribution (DESIGN 3.5 R5): the evidence logins give,
 *                probes, the account that serves a mailbox, and what a
 *                failed login means for its waiter (pool_login_failed)
 *   pool_env.c   pool_default_ops: sessions through upstream.c, the
 *                timer through libevent
 *
 * Nothing outside these files includes this header.  The state machines
 * and the rules cited as "DESIGN 3.x" are in DESIGN.md beside them.
 */
#ifndef POOL_INT_H
#define POOL_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>

#include "config.h"
#include "imapshim.h"
#include "pool.h"
#include "retry.h"
#include "stats.h"
#include "util.h"

#ifndef TAILQ_FOREACH_SAFE
#define TAILQ_FOREACH_SAFE(var, head, field, tvar)			\
	for ((var) = TAILQ_FIRST(head);					\
	    (var) != NULL && ((tvar) = TAILQ_NEXT(var, field), 1);	\
	    (var) = (tvar))
#endif

#define POOL_MB_BUCKETS 1024	/* idle, and busy, sessions by mailbox */
#define POOL_UP_BUCKETS 4096	/* upstream pointer -> entry */

enum pe_state {
	PE_LOGIN,
	PE_IDLE,
	PE_CHECKING,
	PE_RESETTING,
	PE_HANDOFF,
	PE_LEASED,
	PE_CLOSING,
	PE_COUNT
};

enum pw_state { PW_NONE, PW_QUEUED, PW_DELIVER };

/* pw_probe: a login of another mailbox to tell a missing mailbox from a
 * failing account (DESIGN 3.5 R5). */
enum { PROBE_NONE, PROBE_PENDING, PROBE_RUNNING, PROBE_DONE };

/* One admin account, matched by name across reloads. */
struct pool_admin {
	char *pa_name;
	size_t pa_index;		/* into pool.cfg->admins unless removed */
	unsigned pa_max;
	unsigned pa_sessions;		/* every state, until on_free */
	unsigned pa_closing;
	bool pa_removed;		/* gone from the config: no new logins */
	uint64_t pa_tokens_m;		/* login tokens, in 1/1000 */
	uint64_t pa_refill_ms;
	TAILQ_ENTRY(pool_admin) pa_link;	/* pool.retired */
};

struct pool_entry {
	uint64_t pe_id;
	struct upstream *pe_up;
	enum pe_state pe_state;
	struct pool_admin *pe_admin;
	size_t pe_server;
	char pe_mailbox[IMAPSHIM_MAILBOX_MAX + 1];
	char pe_domain[IMAPSHIM_NAME_MAX + 1];
	unsigned pe_mbhash;
	uint64_t pe_started_ms;
	uint64_t pe_last_used_ms;
	struct pool_waiter *pe_waiter;	/* login, check or handoff for it */
	bool pe_reused;			/* HANDOFF of a pooled session */
	bool pe_probe;			/* a probe login for pe_waiter (R5) */
	uint64_t pe_claimed;		/* serve pass that counted on it */
	TAILQ_ENTRY(pool_entry) pe_link;	/* pool.lists[pe_state] */
	TAILQ_ENTRY(pool_entry) pe_mblink;	/* pool.idle_mb[] or busy_mb[] */
	LIST_ENTRY(pool_entry) pe_uplink;	/* pool.by_up[] */
};

/* pe_server of a session whose server a reload removed; also "none" for
 * a server or admin index (pw_last_server, an admin a reload removed). */
#define POOL_SERVER_GONE	((size_t)-1)

TAILQ_HEAD(pool_entry_list, pool_entry);
TAILQ_HEAD(pool_waiter_list, pool_waiter);
TAILQ_HEAD(pool_admin_list, pool_admin);
LIST_HEAD(pool_entry_hlist, pool_entry);

struct pool_state {
	bool init;
	bool shut;
	const struct config *cfg;
	const struct pool_ops *ops;
	struct pool_admin **admins;	/* parallel to cfg->admins */
	size_t n_admins;
	struct pool_admin_list retired;	/* removed, sessions still open */
	size_t rr;			/* round-robin cursor for ties */

	struct pool_entry_list lists[PE_COUNT];
	unsigned counts[PE_COUNT];
	unsigned total;			/* the budget counter */
	/* The budget applied (P13, pool_budget()): session_budget, the
	 * admins' max_sessions added up (admin_max) and the descriptors
	 * clients leave.  budget: as pool_budget_update() last saw it. */
	unsigned budget;
	uint64_t admin_max;
	uint64_t fd_limit;		/* 0: none */
	unsigned fd_reserve, clients;
	bool fd_limited;		/* the descriptors bind (logged) */
	struct pool_entry_list idle_mb[POOL_MB_BUCKETS];
	struct pool_entry_list busy_mb[POOL_MB_BUCKETS];	/* neither
					 * idle nor closing */
	struct pool_entry_hlist by_up[POOL_UP_BUCKETS];

	struct pool_waiter_list queue;
	struct pool_waiter_list polls;	/* IDLE polls: served after queue */
	struct pool_waiter_list deliver;
	unsigned n_queued, n_polls;

	bool in_tick;
	bool rerun;
	uint64_t sched_at;
	uint64_t next_id;

	uint64_t reuses, logins_ok, logins_failed, queue_timeouts;
	/* The operator's console (DESIGN 3.6): paused, no new logins at all;
	 * draining, bit i = server i, no new logins there and its sessions
	 * logged out as they become free.  Neither is configuration: both
	 * survive a reload (drain by server name). */
	bool paused;
	uint64_t draining;
	void (*pressure)(unsigned need);
	uint64_t pass;			/* serve_queue passes, for pe_claimed */
	unsigned need;			/* waiters short of a slot, last pass */
};

/* The pool (pool.c). */
extern struct pool_state pool;

/* Sets of servers and admin accounts (a waiter's, the drained servers)
 * are 64-bit masks: config.c refuses more of either. */
_Static_assert(CONFIG_MAX_SERVERS <= 64 && CONFIG_MAX_ADMINS <= 64,
    "server and admin sets are uint64_t");

/* Bit i of such a set; POOL_SERVER_GONE is in none. */
static inline uint64_t
pool_bit(size_t i)
{
	if (i == POOL_SERVER_GONE)
		return 0;
	IMAPSHIM_ASSERT(i < 64);
	return (uint64_t)1 << i;
}

static inline uint64_t
pool_now(void)
{
	return pool.ops->now_ms();
}

/* ---- pool.c, for the other files */
unsigned pool_mb_hash(const char *mailbox);
/* Ask for a tick as soon as possible (a no-op's worth inside one). */
void pool_kick(void);
/* "host:port" of e's server, or "removed" once a reload dropped it. */
const char *pool_entry_server(const struct pool_entry *e, char *buf,
    size_t len);
/* The {domain} a login for w uses upstream (and the negative cache key),
 * and the one e logged in with (the evidence key, with its mailbox). */
const char *pool_waiter_domain(const struct pool_waiter *w);
const char *pool_entry_domain(const struct pool_entry *e);
/* Decide w's failure now; it is reported from pool_tick(). */
void pool_waiter_fail(struct pool_waiter *w, enum pool_fail why,
    const char *reason);
/* Admin j may log in for w (not refused its mailbox, not quarantined
 * unless every account is: any_usable = pool_admins_any_usable()). */
bool pool_admin_eligible(const struct pool_waiter *w, size_t j,
    bool any_usable, uint64_t now);
bool pool_admins_any_usable(uint64_t now);
/* Most logins one request may cost, whatever the mix of failures. */
unsigned pool_waiter_attempt_cap(void);

/* ---- pool_attr.c */
/* A mailbox that logged in: a probe's subject (R5). */
struct pool_good {
	char pg_domain[IMAPSHIM_NAME_MAX + 1];
	char pg_mailbox[IMAPSHIM_MAILBOX_MAX + 1];
	uint64_t pg_ms;			/* 0: none */
};
/* A mailbox other than w's that logged in less than RETRY_EVIDENCE_MS
 * ago, or NULL. */
const struct pool_good *pool_good_pick(const struct pool_waiter *w,
    uint64_t now);
/* The account to try first for mailbox, or (size_t)-1. */
size_t pool_pref_admin(const char *mailbox);
/* Refusals of w not yet charged go to a. */
void pool_waiter_charge(struct pool_waiter *w, enum stats_attribution a);
/* A login for e succeeded; w: the waiter it was for, or NULL.  Returns
 * the waiter e may be handed to (w, or NULL once a probe's success
 * decided w's fate). */
struct pool_waiter *pool_attr_login_ok(struct pool_entry *e,
    struct pool_waiter *w, uint64_t now);
/* A new login failed before ready (w: its waiter, or NULL). */
void pool_login_failed(struct pool_waiter *w, const struct pool_entry *e,
    enum up_fail why, const char *reason);
/* Forget the evidence (pool_init, pool_shutdown). */
void pool_attr_reset(void);

/* ---- pool_env.c */
/* Free pool_default_ops' timer (pool_shutdown). */
void pool_env_stop(void);

#endif
