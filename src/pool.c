/*
 * pool.c - the bounded pool of upstream sessions.
 *
 * Every upstream session is a struct pool_entry from the moment the pool
 * asks ops->open() for it until the upstream's on_free hook fires (the
 * socket is really closed).  The budget counters (P.total and each admin's
 * pa_sessions) change in exactly two places: open_entry() and
 * entry_free_cb().  Every decision that may call back into a client
 * (grant, failure, timeout) is taken in pool_tick(), never inside
 * pool_acquire(), pool_release() or pool_cancel(), and never from inside
 * an upstream callback: those only change state and ask for a tick.
 *
 * Entry states (one TAILQ each, list length is the count):
 *
 *   LOGIN      connect, TLS, greeting, LOGIN        pool is the lessee
 *   IDLE       logged in, pooled (list order: LRU)  pool is the lessee
 *   CHECKING   NOOP before reuse                    pool is the lessee
 *   RESETTING  UNSELECT / EXAMINE INBOX after use   pool is the lessee
 *   HANDOFF    promised to a waiter, granted at the next tick
 *   LEASED     a client is the lessee
 *   CLOSING    closed or lost; waiting for on_free (still counted)
 *
 * Waiters are in P.queue, IDLE polls in P.polls (FIFOs, PW_QUEUED; polls
 * are served after the queue and never time out) until their result is
 * decided, then in P.deliver (PW_DELIVER) until pool_tick() calls them back.
 */
#include "pool.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include "auth.h"
#include "config.h"
#include "log.h"
#include "retry.h"
#include "stats.h"
#include "util.h"

#ifndef TAILQ_FOREACH_SAFE
#define TAILQ_FOREACH_SAFE(var, head, field, tvar)			\
	for ((var) = TAILQ_FIRST(head);					\
	    (var) != NULL && ((tvar) = TAILQ_NEXT(var, field), 1);	\
	    (var) = (tvar))
#endif

/* Exchange disconnects at the 10th tagged NO-or-BAD and at the 3rd BAD:
 * a returned session at or past these is closed instead of pooled. */
#define POOL_RETIRE_FAILED 6
#define POOL_RETIRE_BAD 2

#define POOL_MB_BUCKETS 1024	/* idle, and busy, sessions by mailbox */
/*
 * How long a waiter waits for a busy session of its own mailbox (logging
 * in, or leased to another client) before a second one is logged in: a
 * voice-mail check holds its session for tens of milliseconds, a login
 * costs more, and a second copy would only be evicted again later.
 */
#define POOL_BUSY_WAIT_MS 500
/*
 * A pass looks no further down the IDLE polls once they are blocked and
 * this many of them ask for room: the pressure they cause is bounded (a
 * poll backlog is worked off as sessions come free, not by parking every
 * attached client at once), and a pass costs the same with 20 or 20,000
 * polls waiting.
 */
#define POOL_POLL_PRESSURE 64
#define POOL_UP_BUCKETS 4096	/* upstream pointer -> entry */
#define POOL_PREF_SLOTS 1024	/* mailbox -> the account that serves it */

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
const char *const pool_state_names[] = {
	"login", "idle", "checking", "resetting", "handoff", "leased",
	"closing", NULL
};
_Static_assert(nitems(pool_state_names) == PE_COUNT + 1, "entry state names");

enum pw_state { PW_NONE, PW_QUEUED, PW_DELIVER };

static const char *const pool_fail_names[] = {
	"timeout", "unavailable", "auth", "refused",
};
_Static_assert(nitems(pool_fail_names) == POOL_FAIL_COUNT, "fail names");

/* pw_probe: a login of another mailbox to tell a missing mailbox from a
 * failing account (DESIGN 3.5 R5). */
enum { PROBE_NONE, PROBE_PENDING, PROBE_RUNNING, PROBE_DONE };

/* One admin account, matched by name across reloads. */
struct pool_admin {
	char *pa_name;
	size_t pa_index;		/* into P.cfg->admins unless removed */
	unsigned pa_max;
	unsigned pa_sessions;		/* every state, until on_free */
	unsigned pa_closing;
	bool pa_removed;		/* gone from the config: no new logins */
	uint64_t pa_tokens_m;		/* login tokens, in 1/1000 */
	uint64_t pa_refill_ms;
	TAILQ_ENTRY(pool_admin) pa_link;	/* P.retired */
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
	TAILQ_ENTRY(pool_entry) pe_link;	/* P.lists[pe_state] */
	TAILQ_ENTRY(pool_entry) pe_mblink;	/* P.idle_mb[] or P.busy_mb[] */
	LIST_ENTRY(pool_entry) pe_uplink;	/* P.by_up[] */
};

/* pe_server of a session whose server a reload removed. */
#define POOL_SERVER_GONE	((size_t)-1)

TAILQ_HEAD(pool_entry_list, pool_entry);
TAILQ_HEAD(pool_waiter_list, pool_waiter);
TAILQ_HEAD(pool_admin_list, pool_admin);
LIST_HEAD(pool_entry_hlist, pool_entry);

static struct {
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

	/* The last two different mailboxes that logged in: a probe's
	 * subject (R5). */
	struct pool_good {
		char pg_domain[IMAPSHIM_NAME_MAX + 1];
		char pg_mailbox[IMAPSHIM_MAILBOX_MAX + 1];
		uint64_t pg_ms;			/* 0: none */
	} good[2];
	/* A mailbox one account refused and another served: that one
	 * first for it afterwards.  Direct-mapped by mailbox hash. */
	struct pool_pref {
		unsigned pp_hash;
		char *pp_admin;			/* name (reloads); NULL: empty */
	} pref[POOL_PREF_SLOTS];
} P;

/* What pool_default_ops needs (pool_default_env). */
static struct {
	struct event_base *base;
	struct evdns_base *dns;
	SSL_CTX *ctx;
	struct event *timer;
} D;

static void pool_up_ready_cb(void *arg);
static void pool_up_failed_cb(void *arg, enum up_fail why, const char *reason);
static void pool_up_frame_cb(void *arg, const struct imap_frame *fr,
    const struct imap_resp *resp, struct evbuffer *in);
static void pool_up_lost_cb(void *arg, const char *reason);

/* The pool's own callbacks while it is the lessee. */
static const struct upstream_cbs pool_up_cbs = {
	.ready = pool_up_ready_cb,
	.failed = pool_up_failed_cb,
	.frame = pool_up_frame_cb,
	.lost = pool_up_lost_cb,
	.writable = NULL,
};

/* ------------------------------------------------------------ helpers */

static uint64_t
pool_now(void)
{
	return P.ops->now_ms();
}

static char
lower(char c)
{
	return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

static unsigned
mb_hash(const char *s)
{
	uint32_t h = 2166136261u;

	for (; *s != '\0'; s++)
		h = (h ^ (uint8_t)lower(*s)) * 16777619u;
	return h;
}

static unsigned
up_hash(const struct upstream *u)
{
	uintptr_t p = (uintptr_t)u;

	return (unsigned)((p >> 4) ^ (p >> 16)) % POOL_UP_BUCKETS;
}

static uint64_t
bit(size_t i)
{
	return i < 64 ? (uint64_t)1 << i : 0;
}

/* Every configured server is drained (the console): no login can start. */
static bool
pool_all_drained(void)
{
	size_t n = P.cfg->n_servers < 64 ? P.cfg->n_servers : 64;

	return n > 0 && P.draining == (n == 64 ? UINT64_MAX :
	    (((uint64_t)1 << n) - 1));
}

/* "host:port" of e's server, or "removed" once a reload dropped it. */
static const char *
entry_server(const struct pool_entry *e, char *buf, size_t len)
{
	if (e->pe_server >= P.cfg->n_servers)
		return "removed";
	return addr_endpoint_str(&P.cfg->servers[e->pe_server], buf, len);
}

/*
 * Index i of old's servers as an index of cfg's: a reload may reorder or
 * drop servers while sessions and waiters still hold indices of the old
 * list, and a failure must count against the server that failed (and a
 * session be shown under its own server).  POOL_SERVER_GONE when cfg no
 * longer lists it.
 */
static size_t
server_remap(const struct config *old, const struct config *cfg, size_t i)
{
	if (old == NULL || i >= old->n_servers)
		return POOL_SERVER_GONE;
	return config_find_server(cfg, &old->servers[i]);
}

static uint64_t
server_mask_remap(const struct config *old, const struct config *cfg,
    uint64_t mask)
{
	uint64_t out = 0;
	size_t i;

	for (i = 0; i < 64; i++)
		if (mask & bit(i))
			out |= bit(server_remap(old, cfg, i));
	return out;
}

static void
waiters_remap(struct pool_waiter_list *q, const struct config *old,
    const struct config *cfg)
{
	struct pool_waiter *w;

	TAILQ_FOREACH(w, q, pw_link) {
		w->pw_servers_failed = server_mask_remap(old, cfg,
		    w->pw_servers_failed);
		if (w->pw_last_server != (size_t)-1)
			w->pw_last_server = server_remap(old, cfg,
			    w->pw_last_server);
	}
}

/* The {domain} a login for w uses upstream (and the negative cache key). */
static const char *
waiter_domain(const struct pool_waiter *w)
{
	return P.cfg->domain != NULL ? P.cfg->domain : w->pw_domain;
}

static const char *
lv(char *buf, size_t len, const char *mb)
{
	return log_value(buf, len, mb, strlen(mb));
}

/* The {domain} e logs in with (the evidence key, with its mailbox). */
static const char *
entry_domain(const struct pool_entry *e)
{
	return P.cfg->domain != NULL ? P.cfg->domain : e->pe_domain;
}

/* ---- attribution helpers (DESIGN 3.5 R5) */

/* e's mailbox logged in: a subject for later probes. */
static void
good_note(const struct pool_entry *e, uint64_t now)
{
	struct pool_good *g = &P.good[0];

	if (g->pg_ms == 0 || !util_ieq(g->pg_mailbox, e->pe_mailbox) ||
	    strcmp(g->pg_domain, e->pe_domain) != 0)
		P.good[1] = P.good[0];
	snprintf(g->pg_domain, sizeof(g->pg_domain), "%s", e->pe_domain);
	snprintf(g->pg_mailbox, sizeof(g->pg_mailbox), "%s", e->pe_mailbox);
	g->pg_ms = now;
}

/* A mailbox other than w's that logged in less than RETRY_EVIDENCE_MS
 * ago, or NULL. */
static const struct pool_good *
good_pick(const struct pool_waiter *w, uint64_t now)
{
	size_t i;

	for (i = 0; i < nitems(P.good); i++) {
		const struct pool_good *g = &P.good[i];

		if (g->pg_ms != 0 && now - g->pg_ms < RETRY_EVIDENCE_MS &&
		    !util_ieq(g->pg_mailbox, w->pw_mailbox))
			return g;
	}
	return NULL;
}

static struct pool_pref *
pref_slot(const char *mailbox)
{
	return &P.pref[mb_hash(mailbox) % POOL_PREF_SLOTS];
}

/* The account to try first for mailbox, or (size_t)-1. */
static size_t
pref_admin(const char *mailbox)
{
	const struct pool_pref *p = pref_slot(mailbox);
	size_t j;

	if (p->pp_admin == NULL || p->pp_hash != mb_hash(mailbox))
		return (size_t)-1;
	for (j = 0; j < P.n_admins; j++)
		if (util_ieq(P.admins[j]->pa_name, p->pp_admin))
			return j;
	return (size_t)-1;
}

static void
pref_set(const char *mailbox, const char *admin)
{
	struct pool_pref *p = pref_slot(mailbox);

	free(p->pp_admin);
	p->pp_admin = admin != NULL ? xstrdup(admin) : NULL;
	p->pp_hash = mb_hash(mailbox);
}

/* Refusals of w not yet charged go to a: the mailbox when w ends with
 * AUTH, the account when another served it, else Exchange. */
static void
waiter_charge(struct pool_waiter *w, enum stats_attribution a)
{
	if (w->pw_refusals > 0)
		stats_login_failure(a, w->pw_refusals);
	w->pw_refusals = 0;
}

/*
 * Ask for a tick as soon as possible.  Inside a tick this only notes that
 * another one is needed (the tick reschedules itself at its end).
 */
static void
pool_kick(void)
{
	uint64_t now;

	if (!P.init || P.shut)
		return;
	if (P.in_tick) {
		P.rerun = true;
		return;
	}
	now = pool_now();
	if (P.sched_at <= now)
		return;
	P.sched_at = now;
	P.ops->schedule(now);
}

/* ------------------------------------------------------------ admins */

static unsigned
admin_burst(void)
{
	return P.cfg->login_burst > 0 ? P.cfg->login_burst : 1;
}

static void
admin_refill(struct pool_admin *a, uint64_t now)
{
	uint64_t cap = (uint64_t)admin_burst() * 1000;

	if (P.cfg->login_rate == 0)
		a->pa_tokens_m = cap;
	else if (now > a->pa_refill_ms) {
		uint64_t add = (now - a->pa_refill_ms) * P.cfg->login_rate;

		a->pa_tokens_m = a->pa_tokens_m + add > cap ? cap :
		    a->pa_tokens_m + add;
	}
	if (a->pa_tokens_m > cap)
		a->pa_tokens_m = cap;
	a->pa_refill_ms = now;
}

/* When admin a will have a whole token (after admin_refill at now). */
static uint64_t
admin_token_at(const struct pool_admin *a, uint64_t now)
{
	uint64_t need;

	if (a->pa_tokens_m >= 1000 || P.cfg->login_rate == 0)
		return now;
	need = 1000 - a->pa_tokens_m;
	return now + (need + P.cfg->login_rate - 1) / P.cfg->login_rate;
}

static struct pool_admin *
admin_new(const struct config_admin *ca, size_t idx, uint64_t now)
{
	struct pool_admin *a = xcalloc(1, sizeof(*a));

	a->pa_name = xstrdup(ca->name);
	a->pa_index = idx;
	a->pa_max = ca->max_sessions;
	a->pa_tokens_m = (uint64_t)admin_burst() * 1000;
	a->pa_refill_ms = now;
	return a;
}

static void
admin_free(struct pool_admin *a)
{
	free(a->pa_name);
	free(a);
}

/* An admin gone from the config: freed once its last session is. */
static void
admin_retire(struct pool_admin *a)
{
	a->pa_removed = true;
	if (a->pa_sessions == 0)
		admin_free(a);
	else
		TAILQ_INSERT_TAIL(&P.retired, a, pa_link);
}

/* ------------------------------------------------------------ entries */

/* The by-mailbox list e is on (unless closing). */
static struct pool_entry_list *
entry_mb_list(const struct pool_entry *e)
{
	return e->pe_state == PE_IDLE ?
	    &P.idle_mb[e->pe_mbhash % POOL_MB_BUCKETS] :
	    &P.busy_mb[e->pe_mbhash % POOL_MB_BUCKETS];
}

static void
entry_set_state(struct pool_entry *e, enum pe_state to)
{
	enum pe_state from = e->pe_state;

	if (from == to)
		return;
	if (from == PE_CLOSING)		/* terminal until on_free */
		return;
	IMAPSHIM_ASSERT(P.counts[from] > 0);
	TAILQ_REMOVE(&P.lists[from], e, pe_link);
	P.counts[from]--;
	TAILQ_REMOVE(entry_mb_list(e), e, pe_mblink);
	e->pe_state = to;
	TAILQ_INSERT_TAIL(&P.lists[to], e, pe_link);
	P.counts[to]++;
	if (to != PE_CLOSING)
		TAILQ_INSERT_TAIL(entry_mb_list(e), e, pe_mblink);
	if (to == PE_CLOSING)
		e->pe_admin->pa_closing++;
	log_debug("pool_entry_state", "entry=%llu from=%s to=%s",
	    (unsigned long long)e->pe_id, pool_state_names[from],
	    pool_state_names[to]);
}

static struct pool_entry *
entry_lookup(const struct upstream *u)
{
	struct pool_entry *e;

	LIST_FOREACH(e, &P.by_up[up_hash(u)], pe_uplink)
		if (e->pe_up == u)
			return e;
	return NULL;
}

/* The FIFO w waits in: an IDLE poll yields to every other waiter (P3). */
static struct pool_waiter_list *
waiter_fifo(const struct pool_waiter *w)
{
	return w->pw_poll ? &P.polls : &P.queue;
}

/* Take a PW_QUEUED w out of its FIFO. */
static void
waiter_unqueue(struct pool_waiter *w)
{
	TAILQ_REMOVE(waiter_fifo(w), w, pw_link);
	if (w->pw_poll)
		P.n_polls--;
	else
		P.n_queued--;
}

/* Put w back into the queue at its place (by the time it first asked). */
static void
waiter_requeue(struct pool_waiter *w)
{
	struct pool_waiter_list *q = waiter_fifo(w);
	struct pool_waiter *o;

	if (w->pw_state == PW_DELIVER)
		TAILQ_REMOVE(&P.deliver, w, pw_link);
	else if (w->pw_state == PW_QUEUED)
		return;
	w->pw_state = PW_QUEUED;
	w->pw_queued = true;
	if (w->pw_poll)
		P.n_polls++;
	else
		P.n_queued++;
	TAILQ_FOREACH_REVERSE(o, q, pool_waiter_list, pw_link)
		if (o->pw_since_ms <= w->pw_since_ms)
			break;
	if (o == NULL)
		TAILQ_INSERT_HEAD(q, w, pw_link);
	else
		TAILQ_INSERT_AFTER(q, o, w, pw_link);
}

/* Break the link between e and the waiter it was working for; a waiter
 * already promised this entry goes back into the queue. */
static void
entry_detach_waiter(struct pool_entry *e)
{
	struct pool_waiter *w = e->pe_waiter;

	if (w == NULL)
		return;
	e->pe_waiter = NULL;
	if (w->pw_entry == e)
		w->pw_entry = NULL;
	if (w->pw_state == PW_DELIVER && w->pw_entry == NULL)
		waiter_requeue(w);
}

/* The upstream is closing on its own (failed, lost): wait for on_free. */
static void
entry_mark_closing(struct pool_entry *e)
{
	if (e->pe_state == PE_CLOSING)
		return;
	entry_detach_waiter(e);
	entry_set_state(e, PE_CLOSING);
	pool_kick();
}

/* Close (LOGOUT) an entry the pool holds; its slot ends at on_free. */
static void
entry_close(struct pool_entry *e, const char *reason)
{
	char mb[80];

	if (e->pe_state == PE_CLOSING)
		return;
	log_debug("pool_close", "entry=%llu mailbox=%s admin=%s state=%s "
	    "reason=%s", (unsigned long long)e->pe_id,
	    lv(mb, sizeof(mb), e->pe_mailbox), e->pe_admin->pa_name,
	    pool_state_names[e->pe_state], log_v(reason));
	entry_mark_closing(e);
	if (e->pe_up != NULL)
		P.ops->close(e->pe_up, reason);
}

/* A healthy, clean session goes into the pool (most recently used). */
static void
entry_to_idle(struct pool_entry *e)
{
	if (e->pe_admin->pa_removed || P.shut ||
	    (P.draining & bit(e->pe_server)) != 0) {
		entry_close(e, e->pe_admin->pa_removed ? "admin-removed" :
		    P.shut ? "shutdown" : "server-drained");
		return;
	}
	entry_detach_waiter(e);
	e->pe_last_used_ms = pool_now();
	entry_set_state(e, PE_IDLE);	/* tail of the LRU */
	pool_kick();
}

/* True when e is logged in for what w asks for. */
static bool
entry_fits(const struct pool_entry *e, const struct pool_waiter *w)
{
	return util_ieq(e->pe_mailbox, w->pw_mailbox) &&
	    util_ieq(e->pe_domain, w->pw_domain);
}

/*
 * A session of w's mailbox is busy (logging in, checked, reset or leased)
 * for someone else, and w has waited less than POOL_BUSY_WAIT_MS: w waits
 * for it instead of a login of its own.  *next: when to look again.
 */
static bool
busy_wait(const struct pool_waiter *w, uint64_t now, uint64_t *next)
{
	unsigned h = mb_hash(w->pw_mailbox);
	uint64_t until = w->pw_since_ms + POOL_BUSY_WAIT_MS;
	struct pool_entry *e;

	if (now >= until)
		return false;
	TAILQ_FOREACH(e, &P.busy_mb[h % POOL_MB_BUCKETS], pe_mblink)
		if (e->pe_mbhash == h && e->pe_waiter != w && entry_fits(e, w)) {
			if (until < *next)
				*next = until;
			return true;
		}
	return false;
}

/* The most recently used idle session for w's mailbox, or NULL. */
static struct pool_entry *
idle_find(const struct pool_waiter *w)
{
	unsigned h = mb_hash(w->pw_mailbox);
	struct pool_entry *e;

	TAILQ_FOREACH_REVERSE(e, &P.idle_mb[h % POOL_MB_BUCKETS],
	    pool_entry_list, pe_mblink)
		if (e->pe_mbhash == h && entry_fits(e, w))
			return e;
	return NULL;
}

/* The upstream's on_free hook: the socket is gone, the slot is free. */
static void
entry_free_cb(void *arg)
{
	struct pool_entry *e = arg;
	struct pool_admin *a = e->pe_admin;

	if (e->pe_state != PE_CLOSING) {
		/* Freed without a close through us (exit). */
		entry_detach_waiter(e);
		entry_set_state(e, PE_CLOSING);
	}
	TAILQ_REMOVE(&P.lists[PE_CLOSING], e, pe_link);
	P.counts[PE_CLOSING]--;
	if (e->pe_up != NULL)
		LIST_REMOVE(e, pe_uplink);
	IMAPSHIM_ASSERT(a->pa_closing > 0 && a->pa_sessions > 0 && P.total > 0);
	a->pa_closing--;
	a->pa_sessions--;
	P.total--;
	log_debug("pool_slot_free", "entry=%llu admin=%s sessions=%u "
	    "admin_sessions=%u", (unsigned long long)e->pe_id, a->pa_name,
	    P.total, a->pa_sessions);
	if (a->pa_removed && a->pa_sessions == 0) {
		TAILQ_REMOVE(&P.retired, a, pa_link);
		admin_free(a);
	}
	free(e);
	pool_kick();
}

/* ------------------------------------------------------------ waiters */

/* Decide w's failure now; it is reported from pool_tick(). */
static void
waiter_fail(struct pool_waiter *w, enum pool_fail why, const char *reason)
{
	if (w->pw_entry != NULL) {
		struct pool_entry *e = w->pw_entry;

		e->pe_waiter = NULL;
		w->pw_entry = NULL;
		/* A session being checked for w goes back to the pool. */
		if (e->pe_state == PE_HANDOFF)
			entry_to_idle(e);
	}
	if (w->pw_state == PW_QUEUED)
		waiter_unqueue(w);
	else if (w->pw_state == PW_DELIVER)
		TAILQ_REMOVE(&P.deliver, w, pw_link);
	w->pw_state = PW_DELIVER;
	w->pw_fail_why = why;
	waiter_charge(w, why == POOL_FAIL_AUTH ? STATS_ATTR_MAILBOX :
	    STATS_ATTR_EXCHANGE);
	if (reason != w->pw_reason)
		snprintf(w->pw_reason, sizeof(w->pw_reason), "%s", reason);
	TAILQ_INSERT_TAIL(&P.deliver, w, pw_link);
	pool_kick();
}

/* Promise e (ready, clean) to w; granted from pool_tick(). */
static void
entry_handoff(struct pool_entry *e, struct pool_waiter *w, bool reused)
{
	if (w->pw_entry != NULL && w->pw_entry != e)
		w->pw_entry->pe_waiter = NULL;	/* its own login: pooled later */
	e->pe_waiter = w;
	e->pe_reused = reused;
	w->pw_entry = e;
	entry_set_state(e, PE_HANDOFF);
	if (w->pw_state == PW_QUEUED)
		waiter_unqueue(w);
	w->pw_state = PW_DELIVER;
	TAILQ_INSERT_TAIL(&P.deliver, w, pw_link);
	pool_kick();
}

/* Admin j may log in for w: it has not refused w's mailbox, and it is
 * not quarantined unless every admin account is. */
static bool
admin_eligible(const struct pool_waiter *w, size_t j, bool any_usable,
    uint64_t now)
{
	if (w != NULL && (w->pw_admins_refused & bit(j)) != 0)
		return false;
	return !any_usable || retry_admin_usable(j, now);
}

static bool
admins_any_usable(uint64_t now)
{
	size_t j;

	for (j = 0; j < P.n_admins; j++)
		if (retry_admin_usable(j, now))
			return true;
	return false;
}

/* Most logins one request may cost, whatever the mix of failures. */
static unsigned
waiter_attempt_cap(void)
{
	return P.cfg->login_attempts + (unsigned)P.cfg->n_servers +
	    (unsigned)(P.n_admins < 64 ? P.n_admins : 64);
}

/* Every account that may log in for w refused its mailbox (transient or
 * final); quarantined ones are skipped while another is usable. */
static bool
admins_all_refused(const struct pool_waiter *w, uint64_t now)
{
	uint64_t no = w->pw_admins_declined | w->pw_admins_refused;
	bool any = admins_any_usable(now);
	size_t i;

	for (i = 0; i < P.n_admins && i < 64; i++) {
		if ((no & bit(i)) != 0)
			continue;
		if (any && !retry_admin_usable(i, now))
			continue;
		return false;
	}
	return P.n_admins > 0;
}

enum attribution { ATTR_MAILBOX, ATTR_PROBE, ATTR_EXCHANGE, ATTR_UNKNOWN };

#define POOL_EXPLAIN_MAILBOX \
	"with every admin account while other mailboxes log in"

/*
 * Every account refused w's mailbox: whose fault is it (DESIGN 3.5 R5)?
 * The mailbox's when every account that refused it has logged in another
 * mailbox since (the accounts and Exchange work); Exchange's while the
 * slowdown is on; otherwise, if some mailbox logged in less than
 * RETRY_EVIDENCE_MS ago, one probe (a login of that mailbox with an
 * account that refused w) decides; with no such evidence, unknown.
 */
static enum attribution
attribute(struct pool_waiter *w, uint64_t now)
{
	uint64_t no = w->pw_admins_declined | w->pw_admins_refused;
	bool after = true;
	size_t i, first = (size_t)-1;

	if (retry_slowdown())
		return ATTR_EXCHANGE;
	for (i = 0; i < P.n_admins && i < 64; i++) {
		if ((no & bit(i)) == 0)
			continue;
		if (retry_admin_last_ok(i) == 0 ||
		    retry_admin_last_ok(i) < w->pw_first_refusal_ms) {
			after = false;
			if (first == (size_t)-1)
				first = i;
		}
	}
	if (after)
		return ATTR_MAILBOX;
	if (!retry_recent_success(now))
		return ATTR_UNKNOWN;
	if (w->pw_probe == PROBE_NONE && good_pick(w, now) != NULL &&
	    first != (size_t)-1) {
		w->pw_probe_admin = first;
		return ATTR_PROBE;
	}
	return ATTR_UNKNOWN;
}

/* w's mailbox is at fault: AUTH, cached, its refusals taken back out of
 * the accounts' and Exchange's records. */
static void
waiter_final(struct pool_waiter *w, const char *why, const char *explain)
{
	uint64_t now = pool_now();
	char mb[80];

	retry_negcache_add(waiter_domain(w), w->pw_mailbox, now);
	retry_mailbox_at_fault(waiter_domain(w), w->pw_mailbox);
	log_info("pool_mailbox_refused", "mailbox=%s attribution=mailbox "
	    "refusals=%u attempts=%u evidence=%s cached_ms=%llu",
	    lv(mb, sizeof(mb), w->pw_mailbox), w->pw_refusals,
	    w->pw_attempts, log_v(why),
	    (unsigned long long)P.cfg->negative_cache_ttl_ms);
	snprintf(w->pw_explain, sizeof(w->pw_explain), "%s", explain);
	waiter_fail(w, POOL_FAIL_AUTH, w->pw_reason);
}

static const char *
class_name(enum retry_class c)
{
	return c == RETRY_SERVER ? "server" : c == RETRY_LOGIN ? "login" :
	    "final";
}

/*
 * A new login failed before ready (w: the waiter it was for, or NULL when
 * that one left).  Kept in one function: retry.c classifies and keeps the
 * evidence, this applies it (DESIGN 3.5 R2-R5).
 *
 *   RETRY_SERVER  the server is at fault: its health counts the failure;
 *                 w retries on a server that has not failed it, after a
 *                 backoff, until every server failed it (or those left
 *                 are down): POOL_FAIL_UNAVAILABLE with the last reason.
 *   RETRY_LOGIN   transient refusal ("NO LOGIN failed." ...): evidence
 *                 against the account and the mailbox; w retries on a
 *                 fresh connection, another server and admin where
 *                 possible, after a backoff.  Once every account refused
 *                 it, attribute() decides: the mailbox (POOL_FAIL_AUTH,
 *                 cached), a probe, or go on: login_attempts tries in all,
 *                 then POOL_FAIL_REFUSED.
 *   RETRY_FINAL   "[AUTHENTICATIONFAILED]" or another refusal: w retries
 *                 at once with an admin that has not refused it; none
 *                 left: POOL_FAIL_AUTH and the negative cache.
 *   a probe       (e->pe_probe: another mailbox, for w) failed: nothing
 *                 shows w's mailbox at fault; w goes on as RETRY_LOGIN
 *                 with no further probe.
 *
 * Only changes state and asks for a tick: we are inside an upstream
 * callback.
 */
static void
pool_login_failed(struct pool_waiter *w, const struct pool_entry *e,
    enum up_fail why, const char *reason)
{
	const struct config *cfg = P.cfg;
	const struct pool_admin *a = e->pe_admin;
	size_t ai = a->pa_removed ? (size_t)-1 : a->pa_index;
	struct retry_verdict v;
	uint64_t now = pool_now(), delay = 0;
	const char *end = NULL;
	enum pool_fail fail = POOL_FAIL_REFUSED;
	enum retry_class cls;
	char mb[80], rv[300], srv[300];
	size_t i;

	retry_classify(cfg, why, reason, &v);
	cls = v.rv_class;
	if (cls == RETRY_SERVER && v.rv_load &&
	    retry_server_overloaded(e->pe_server, reason, e->pe_started_ms,
	    now)) {
		/* Busy, not down (R14): the bound is lower now; w waits. */
		stats_login_failure(STATS_ATTR_SERVER, 1);
		if (w == NULL)
			return;
		if (e->pe_probe)
			w->pw_probe = PROBE_PENDING;	/* no answer yet */
		/* Not one of its attempts (R7): queue_timeout bounds it. */
		if (w->pw_attempts > 0)
			w->pw_attempts--;
		w->pw_overloads++;
		snprintf(w->pw_reason, sizeof(w->pw_reason), "%s", reason);
		delay = retry_backoff_ms(cfg, w->pw_overloads, retry_rand());
		w->pw_not_before_ms = now + delay;
		stats_login_retry(v.rv_reason);
		log_info("pool_retry", "entry=%llu mailbox=%s admin=%s "
		    "server=%s class=overload label=%s attempt=%u "
		    "backoff_ms=%llu reason=%s", (unsigned long long)e->pe_id,
		    lv(mb, sizeof(mb), w->pw_mailbox), a->pa_name,
		    entry_server(e, srv, sizeof(srv)), v.rv_label,
		    w->pw_overloads, (unsigned long long)delay,
		    lv(rv, sizeof(rv), reason));
		pool_kick();
		return;
	}
	if (cls == RETRY_SERVER) {
		retry_server_failed(e->pe_server, reason, now);
		stats_login_failure(STATS_ATTR_SERVER, 1);
	} else {
		/* The server answered: as an endpoint it works. */
		retry_server_success(e->pe_server, now);
		retry_login_refused(ai, entry_domain(e), e->pe_mailbox, now);
		if (pref_admin(e->pe_mailbox) == ai)
			pref_set(e->pe_mailbox, NULL);
		if (w == NULL)
			stats_login_failure(STATS_ATTR_EXCHANGE, 1);
	}
	if (w == NULL)
		return;
	if (cls != RETRY_SERVER)
		w->pw_refusals++;
	if (e->pe_probe) {
		/* Its mailbox worked a moment ago and fails now: the
		 * account or Exchange, not (provably) w's mailbox. */
		w->pw_probe = PROBE_DONE;
		log_info("pool_probe_failed", "entry=%llu mailbox=%s for=%s "
		    "admin=%s class=%s reason=%s", (unsigned long long)e->pe_id,
		    lv(srv, sizeof(srv), e->pe_mailbox),
		    lv(mb, sizeof(mb), w->pw_mailbox), a->pa_name,
		    class_name(cls), lv(rv, sizeof(rv), reason));
		if (cls == RETRY_SERVER)
			w->pw_servers_failed |= bit(e->pe_server);
		if (w->pw_attempts >= cfg->login_attempts) {
			snprintf(w->pw_explain, sizeof(w->pw_explain), "with "
			    "every admin account, and a mailbox that logged "
			    "in recently failed too");
			waiter_fail(w, cls == RETRY_SERVER ?
			    POOL_FAIL_UNAVAILABLE : POOL_FAIL_REFUSED,
			    w->pw_reason);
			return;
		}
		w->pw_not_before_ms = now + retry_backoff_ms(cfg,
		    w->pw_attempts, retry_rand());
		pool_kick();
		return;
	}
	snprintf(w->pw_reason, sizeof(w->pw_reason), "%s", reason);
	if (cls != RETRY_SERVER && w->pw_first_refusal_ms == 0)
		w->pw_first_refusal_ms = now;
	switch (cls) {
	case RETRY_SERVER:
		if (why != UP_FAIL_CONNECT && why != UP_FAIL_TIMEOUT)
			w->pw_server_answered = true;
		w->pw_servers_failed |= bit(e->pe_server);
		for (i = 0; i < cfg->n_servers && i < 64; i++)
			if ((w->pw_servers_failed & bit(i)) == 0)
				break;
		if (i == cfg->n_servers || i == 64) {
			end = "every server failed";
			fail = POOL_FAIL_UNAVAILABLE;
			snprintf(w->pw_explain, sizeof(w->pw_explain), "%s",
			    w->pw_server_answered ? "No Exchange server would "
			    "take a session" : "Exchange is not reachable");
		}
		delay = retry_backoff_ms(cfg, w->pw_attempts, retry_rand());
		break;
	case RETRY_LOGIN:
		w->pw_admins_declined |= bit(ai);
		delay = retry_backoff_ms(cfg, w->pw_attempts, retry_rand());
		if (admins_all_refused(w, now))
			switch (attribute(w, now)) {
			case ATTR_MAILBOX:
				waiter_final(w, "every account that refused "
				    "it logged in another mailbox since",
				    POOL_EXPLAIN_MAILBOX);
				return;
			case ATTR_PROBE:
				w->pw_probe = PROBE_PENDING;
				delay = 0;
				log_info("pool_probe", "mailbox=%s admin=%s "
				    "reason=\"refused with every admin "
				    "account: a mailbox that logged in "
				    "recently tells whose fault it is\"",
				    lv(mb, sizeof(mb), w->pw_mailbox),
				    P.admins[w->pw_probe_admin]->pa_name);
				break;
			case ATTR_EXCHANGE:
				snprintf(w->pw_explain, sizeof(w->pw_explain),
				    "with every admin account, as other "
				    "mailboxes are");
				break;
			case ATTR_UNKNOWN:
			default:
				snprintf(w->pw_explain, sizeof(w->pw_explain),
				    "with every admin account, and no login "
				    "succeeded recently to tell a missing "
				    "mailbox from an Exchange problem");
				break;
			}
		if (w->pw_probe != PROBE_PENDING &&
		    w->pw_attempts >= cfg->login_attempts) {
			end = "login attempts spent";
			if (w->pw_explain[0] == '\0')
				snprintf(w->pw_explain, sizeof(w->pw_explain),
				    "%u times", w->pw_attempts);
		}
		break;
	case RETRY_FINAL:
	default: {
		bool any = admins_any_usable(now);

		w->pw_admins_refused |= bit(ai);
		for (i = 0; i < P.n_admins; i++)
			if (admin_eligible(w, i, any, now))
				break;
		if (i == P.n_admins) {
			/* Exchange's own words say the mailbox: no evidence
			 * needed (one try per account). */
			waiter_final(w, "refused with every admin account, "
			    "not as a transient failure", "with every admin "
			    "account");
			return;
		}
		break;
	}
	}
	if (end == NULL && w->pw_attempts >= waiter_attempt_cap())
		end = "too many attempts";
	if (end != NULL) {
		log_info("pool_login_failed", "entry=%llu mailbox=%s admin=%s "
		    "server=%s class=%s label=%s attempts=%u end=%s "
		    "attribution=%s reason=%s", (unsigned long long)e->pe_id,
		    lv(mb, sizeof(mb), w->pw_mailbox), a->pa_name,
		    entry_server(e, srv, sizeof(srv)), class_name(cls),
		    v.rv_label, w->pw_attempts, log_v(end),
		    fail == POOL_FAIL_UNAVAILABLE ? "server" : "exchange",
		    lv(rv, sizeof(rv), reason));
		waiter_fail(w, fail, w->pw_reason);
		return;
	}
	stats_login_retry(v.rv_reason);
	w->pw_not_before_ms = now + delay;
	log_info("pool_retry", "entry=%llu mailbox=%s admin=%s server=%s "
	    "class=%s label=%s attempt=%u backoff_ms=%llu reason=%s",
	    (unsigned long long)e->pe_id, lv(mb, sizeof(mb), w->pw_mailbox),
	    a->pa_name, entry_server(e, srv, sizeof(srv)), class_name(cls),
	    v.rv_label, w->pw_attempts, (unsigned long long)delay,
	    lv(rv, sizeof(rv), reason));
	pool_kick();		/* stays queued; serve_open opens the next */
}

/* ------------------------------------------------------------ upstream callbacks */

static void
pool_up_ready_cb(void *arg)
{
	struct pool_entry *e = arg;
	struct pool_waiter *w, *o;

	if (e->pe_state != PE_LOGIN)
		return;
	P.logins_ok++;
	stats_upstream_login(STATS_LOGIN_OK);
	w = e->pe_waiter;
	retry_server_success(e->pe_server, pool_now());
	good_note(e, pool_now());
	retry_login_ok(e->pe_admin->pa_removed ? (size_t)-1 :
	    e->pe_admin->pa_index, entry_domain(e), e->pe_mailbox, pool_now());
	if (w != NULL && e->pe_probe) {
		char mb[80], mb2[80];

		/* The probe's mailbox logs in with an account that refused
		 * w's: the accounts and Exchange work, w's mailbox does
		 * not (DESIGN 3.5 R5).  The session stays in the pool. */
		log_info("pool_probe_ok", "entry=%llu mailbox=%s for=%s "
		    "admin=%s", (unsigned long long)e->pe_id,
		    lv(mb, sizeof(mb), e->pe_mailbox),
		    lv(mb2, sizeof(mb2), w->pw_mailbox), e->pe_admin->pa_name);
		w->pw_probe = PROBE_DONE;
		e->pe_waiter = NULL;
		w->pw_entry = NULL;
		waiter_final(w, "a mailbox that logged in recently logs in "
		    "with an account that refused this one",
		    POOL_EXPLAIN_MAILBOX);
		w = NULL;
	} else if (w != NULL && !e->pe_admin->pa_removed &&
	    ((w->pw_admins_declined | w->pw_admins_refused) &
	    ~bit(e->pe_admin->pa_index)) != 0) {
		/* Another account refused this mailbox and this one
		 * serves it (no FullAccess for the other?): this one
		 * first for it from now on; those refusals were the
		 * other account's. */
		pref_set(e->pe_mailbox, e->pe_admin->pa_name);
		waiter_charge(w, STATS_ATTR_ADMIN);
	}
	if (w == NULL) {
		/* Its waiter left: the first one queued for this mailbox that
		 * has nothing on the way (or only a login) takes it. */
		TAILQ_FOREACH(o, &P.queue, pw_link)
			if (entry_fits(e, o) &&
			    (o->pw_entry == NULL ||
			    o->pw_entry->pe_state == PE_LOGIN)) {
				w = o;
				break;
			}
	}
	if (w != NULL)
		entry_handoff(e, w, false);
	else
		entry_to_idle(e);
}

static void
pool_up_failed_cb(void *arg, enum up_fail why, const char *reason)
{
	struct pool_entry *e = arg;
	struct pool_waiter *w = e->pe_waiter;

	if (e->pe_state != PE_LOGIN) {
		entry_mark_closing(e);
		return;
	}
	P.logins_failed++;
	stats_upstream_login(why == UP_FAIL_LOGIN ? STATS_LOGIN_REFUSED :
	    STATS_LOGIN_ERROR);
	entry_mark_closing(e);		/* the upstream closes itself */
	/* Without a waiter too: the evidence counts (R5, R6). */
	pool_login_failed(w, e, why, reason != NULL ? reason : "");
}

static void
pool_up_frame_cb(void *arg, const struct imap_frame *fr,
    const struct imap_resp *resp, struct evbuffer *in)
{
	(void)arg;
	(void)resp;
	/* Untagged data on an idle session: nobody wants it. */
	evbuffer_drain(in, fr->len);
}

static void
pool_up_lost_cb(void *arg, const char *reason)
{
	struct pool_entry *e = arg;
	char mb[80], rv[300];

	log_debug("pool_lost", "entry=%llu mailbox=%s state=%s reason=%s",
	    (unsigned long long)e->pe_id, lv(mb, sizeof(mb), e->pe_mailbox),
	    pool_state_names[e->pe_state],
	    lv(rv, sizeof(rv), reason != NULL ? reason : ""));
	entry_mark_closing(e);
}

static void
pool_check_done(void *arg, bool ok)
{
	struct pool_entry *e = arg;
	char mb[80];

	if (e->pe_state != PE_CHECKING)
		return;
	if (!ok) {
		/* Found dead: replaced, not reported. */
		log_info("pool_dead_session", "entry=%llu mailbox=%s admin=%s",
		    (unsigned long long)e->pe_id,
		    lv(mb, sizeof(mb), e->pe_mailbox), e->pe_admin->pa_name);
		entry_close(e, "dead-on-reuse");
		return;
	}
	if (e->pe_waiter != NULL)
		entry_handoff(e, e->pe_waiter, true);
	else
		entry_to_idle(e);
}

static void
pool_reset_done(void *arg, bool ok)
{
	struct pool_entry *e = arg;

	if (e->pe_state != PE_RESETTING)
		return;
	if (ok)
		entry_to_idle(e);
	else
		entry_close(e, "reset-failed");
}

/* ------------------------------------------------------------ serving */

enum open_result { OPEN_OK, OPEN_NO_TOKEN, OPEN_NO_ROOM, OPEN_FAILED };

/*
 * Servers whose logins in flight (connect, TLS, login: entries in LOGIN)
 * reached their current bound, as a mask (DESIGN 3.3 P12).  Counted, not
 * kept: a reload remaps servers, and the walk is over at most the bound
 * times the servers.  Servers from index 64 on have no bound.
 */
static uint64_t
servers_full(void)
{
	unsigned n[64] = { 0 };
	struct pool_entry *e;
	uint64_t full = 0;
	size_t i;

	TAILQ_FOREACH(e, &P.lists[PE_LOGIN], pe_link)
		if (e->pe_server < 64)
			n[e->pe_server]++;
	for (i = 0; i < P.cfg->n_servers && i < 64; i++)
		if (n[i] >= retry_server_limit(i))
			full |= bit(i);
	return full;
}

/* Take a pooled session for w: NOOP first, granted when it answers. */
static bool
serve_from_idle(struct pool_waiter *w)
{
	struct pool_entry *e;

	while ((e = idle_find(w)) != NULL) {
		if (w->pw_entry != NULL)	/* its login goes on for the pool */
			w->pw_entry->pe_waiter = NULL;
		entry_set_state(e, PE_CHECKING);
		e->pe_waiter = w;
		w->pw_entry = e;
		if (P.ops->command(e->pe_up, "NOOP", pool_check_done, e) == 0)
			return true;
		entry_close(e, "noop-refused");
	}
	return false;
}

static enum open_result
serve_open(struct pool_waiter *w, uint64_t now, uint64_t *next)
{
	const struct config *cfg = P.cfg;
	struct pool_admin *best = NULL, *a;
	struct pool_entry *e;
	struct upstream *u;
	uint64_t tok_at = UINT64_MAX, nb, full;
	bool room = false, any, best_new = false, is_new;
	size_t i, j, bi = 0, server, pref;
	const struct pool_good *probe = NULL;
	char mb[80];

	/* Paused, or every server drained: wait (queue_timeout bounds it)
	 * without evicting anybody's idle session. */
	if (P.paused || pool_all_drained())
		return OPEN_NO_TOKEN;
	if (P.total >= cfg->session_budget || P.n_admins == 0)
		return OPEN_NO_ROOM;
	/* Every account keeps failing: new logins are spaced out. */
	if ((nb = retry_login_not_before(now)) > now) {
		if (nb < *next)
			*next = nb;
		return OPEN_NO_TOKEN;
	}
	/* A probe (R5): the account it is for, a mailbox that worked. */
	if (w->pw_probe == PROBE_PENDING &&
	    (w->pw_probe_admin >= P.n_admins ||
	    (probe = good_pick(w, now)) == NULL))
		w->pw_probe = PROBE_DONE;	/* its subject is gone: none */
	/* Not quarantined (unless all are), not refused for this mailbox;
	 * the account that served it after another refused it first, then
	 * an account not yet tried for w, then the most free. */
	pref = w->pw_attempts == 0 ? pref_admin(w->pw_mailbox) : (size_t)-1;
	any = admins_any_usable(now);
	for (i = 0; i < P.n_admins; i++) {
		j = (P.rr + i) % P.n_admins;
		a = P.admins[j];
		if (probe != NULL ? j != w->pw_probe_admin :
		    !admin_eligible(w, j, any, now))
			continue;
		if (a->pa_sessions >= a->pa_max)
			continue;
		room = true;
		if (a->pa_tokens_m < 1000) {
			uint64_t t = admin_token_at(a, now);

			if (t < tok_at)
				tok_at = t;
			continue;
		}
		is_new = (w->pw_admins_tried & bit(j)) == 0;
		if (j == pref && retry_admin_usable(j, now)) {
			best = a;
			bi = j;
			break;
		}
		if (best == NULL || (is_new && !best_new) ||
		    (is_new == best_new && a->pa_max - a->pa_sessions >
		    best->pa_max - best->pa_sessions)) {
			best = a;
			bi = j;
			best_new = is_new;
		}
	}
	if (!room)
		return OPEN_NO_ROOM;
	if (best == NULL) {
		if (tok_at < *next)
			*next = tok_at;
		return OPEN_NO_TOKEN;
	}
	/* The server: the first one up; on a retry (after overload too:
	 * another server may have room), not one that failed w, and not
	 * the last one where another will do; never one with its bound of
	 * logins in flight reached (P12). */
	full = servers_full();
	if (w->pw_attempts == 0 && w->pw_overloads == 0)
		/* retry_server_pick(now, -1) without its last resort (a
		 * server still in its cooldown): wait for the probe then. */
		server = retry_server_pick_except(now, P.draining | full);
	else {
		server = (size_t)-1;
		if (w->pw_last_server != (size_t)-1)
			server = retry_server_pick_except(now, P.draining |
			    full | w->pw_servers_failed |
			    bit(w->pw_last_server));
		if (server == (size_t)-1)
			server = retry_server_pick_except(now, P.draining |
			    full | w->pw_servers_failed);
	}
	if (server >= cfg->n_servers) {
		char rv[300];

		/* A server w may use is busy with logins: wait for one of
		 * them to end (it kicks the pool), in w's place. */
		for (i = 0; i < cfg->n_servers && i < 64; i++)
			if ((full & ~P.draining & ~w->pw_servers_failed &
			    bit(i)) != 0 && (retry_server_up(i, now) ||
			    retry_server_probing(i, now)))
				return OPEN_NO_TOKEN;

		/* A probe is under way: its answer decides. */
		for (i = 0; i < cfg->n_servers; i++)
			if ((w->pw_servers_failed & bit(i)) == 0 &&
			    retry_server_probing(i, now))
				return OPEN_NO_TOKEN;

		log_info("pool_no_server", "mailbox=%s attempts=%u reason=%s",
		    lv(mb, sizeof(mb), w->pw_mailbox), w->pw_attempts,
		    lv(rv, sizeof(rv), w->pw_reason));
		if (w->pw_refusals > 0) {
			/* Refused where it got an answer. */
			if (w->pw_explain[0] == '\0')
				snprintf(w->pw_explain, sizeof(w->pw_explain),
				    "%s", "and no other Exchange server can be "
				    "used now");
			waiter_fail(w, POOL_FAIL_REFUSED, w->pw_reason);
			return OPEN_FAILED;
		}
		snprintf(w->pw_explain, sizeof(w->pw_explain), "%s",
		    w->pw_server_answered ? "No Exchange server would take a "
		    "session" : "Exchange is not reachable");
		waiter_fail(w, POOL_FAIL_UNAVAILABLE, w->pw_reason[0] != '\0' ?
		    w->pw_reason : "no upstream server is usable");
		return OPEN_FAILED;
	}
	P.rr = bi + 1;
	best->pa_tokens_m -= 1000;
	w->pw_attempts++;
	w->pw_admins_tried |= bit(bi);
	w->pw_last_server = server;

	e = xcalloc(1, sizeof(*e));
	e->pe_id = ++P.next_id;
	e->pe_admin = best;
	e->pe_server = server;
	snprintf(e->pe_mailbox, sizeof(e->pe_mailbox), "%s", probe != NULL ?
	    probe->pg_mailbox : w->pw_mailbox);
	snprintf(e->pe_domain, sizeof(e->pe_domain), "%s", probe != NULL ?
	    probe->pg_domain : w->pw_domain);
	if (probe != NULL) {
		e->pe_probe = true;
		w->pw_probe = PROBE_RUNNING;
	}
	e->pe_mbhash = mb_hash(e->pe_mailbox);
	e->pe_started_ms = now;
	e->pe_last_used_ms = now;
	e->pe_state = PE_LOGIN;
	TAILQ_INSERT_TAIL(&P.lists[PE_LOGIN], e, pe_link);
	TAILQ_INSERT_TAIL(entry_mb_list(e), e, pe_mblink);
	P.counts[PE_LOGIN]++;
	/* The slot is taken from here until on_free (DESIGN 3.3 P1). */
	IMAPSHIM_ASSERT(P.total < cfg->session_budget &&
	    best->pa_sessions < best->pa_max);
	best->pa_sessions++;
	P.total++;
	e->pe_waiter = w;
	w->pw_entry = e;

	retry_login_started(now);
	u = P.ops->open(cfg, best->pa_index, server, e->pe_domain, e->pe_mailbox,
	    &pool_up_cbs, e, entry_free_cb, e);
	if (u == NULL) {
		TAILQ_REMOVE(&P.lists[PE_LOGIN], e, pe_link);
		TAILQ_REMOVE(entry_mb_list(e), e, pe_mblink);
		P.counts[PE_LOGIN]--;
		best->pa_sessions--;
		P.total--;
		w->pw_entry = NULL;
		free(e);
		P.logins_failed++;
		snprintf(w->pw_explain, sizeof(w->pw_explain), "imapshim "
		    "could not start an upstream session");
		waiter_fail(w, POOL_FAIL_UNAVAILABLE,
		    "cannot start an upstream session");
		return OPEN_FAILED;
	}
	e->pe_up = u;
	LIST_INSERT_HEAD(&P.by_up[up_hash(u)], e, pe_uplink);
	log_info("pool_login", "entry=%llu mailbox=%s admin=%s server=%s:%s "
	    "sessions=%u budget=%u admin_sessions=%u admin_max=%u",
	    (unsigned long long)e->pe_id, lv(mb, sizeof(mb), e->pe_mailbox),
	    best->pa_name, cfg->servers[server].host, cfg->servers[server].port,
	    P.total, cfg->session_budget, best->pa_sessions, best->pa_max);
	return OPEN_OK;
}

/* Close the least recently used idle session of another mailbox. */
static bool
serve_evict(const struct pool_waiter *w)
{
	struct pool_entry *e;
	char mb[80], mb2[80];

	TAILQ_FOREACH(e, &P.lists[PE_IDLE], pe_link)
		if (!entry_fits(e, w))
			break;
	if (e == NULL)
		return false;
	log_info("pool_evict", "entry=%llu mailbox=%s admin=%s idle_ms=%llu "
	    "for=%s", (unsigned long long)e->pe_id,
	    lv(mb, sizeof(mb), e->pe_mailbox), e->pe_admin->pa_name,
	    (unsigned long long)(pool_now() - e->pe_last_used_ms),
	    lv(mb2, sizeof(mb2), w->pw_mailbox));
	entry_close(e, "evicted");
	return true;
}

/* Every server is down: w fails at once, with the most recent reason. */
static void
fail_all_down(struct pool_waiter *w)
{
	const char *last = "";
	char buf[sizeof(w->pw_reason)];
	size_t i;

	for (i = 0; i < P.cfg->n_servers; i++)
		if (*(last = retry_server_last_failure(i)) != '\0')
			break;
	snprintf(buf, sizeof(buf), "every upstream server is down (%s)",
	    *last != '\0' ? last : "no reason known");
	snprintf(w->pw_explain, sizeof(w->pw_explain), "Every Exchange server "
	    "is marked down");
	waiter_fail(w, POOL_FAIL_UNAVAILABLE, buf);
}

/*
 * Serve the queue in order: a pooled session of the waiter's mailbox, else
 * a new login (strictly FIFO: none for a later waiter while an earlier one
 * waits for one), else make room by closing an idle session of another
 * mailbox (one per waiter not already covered by a slot being freed).
 */
/* True when a session of w's mailbox is being reset and no waiter ahead
 * of w in this pass counts on it already. */
static bool
claim_resetting(const struct pool_waiter *w)
{
	struct pool_entry *e;

	TAILQ_FOREACH(e, &P.lists[PE_RESETTING], pe_link)
		if (e->pe_claimed != P.pass && entry_fits(e, w)) {
			e->pe_claimed = P.pass;
			return true;
		}
	return false;
}

static void
serve_queue(uint64_t now, uint64_t *next)
{
	struct pool_waiter_list *const fifos[] = { &P.queue, &P.polls };
	struct pool_waiter *w, *wn;
	unsigned pending = P.counts[PE_CLOSING], need = 0, cmd_need = 0;
	bool blocked = false, no_room = false;
	size_t f;

	P.pass++;

	/* Commands first, then IDLE polls: a poll starts no login while a
	 * command waiter cannot (P3), and makes room only after them. */
	for (f = 0; f < nitems(fifos); f++, cmd_need = need)
	TAILQ_FOREACH_SAFE(w, fifos[f], pw_link, wn) {
		if (w->pw_poll && blocked &&
		    need - cmd_need >= POOL_POLL_PRESSURE)
			break;
		/* A waiter whose login is under way still takes a pooled
		 * session of its mailbox that turns up first. */
		if (w->pw_entry != NULL && w->pw_entry->pe_state != PE_LOGIN)
			continue;
		if (serve_from_idle(w) || w->pw_entry != NULL)
			continue;
		/* A session of its mailbox is being reset after its last
		 * client: wait for it rather than log in again. */
		if (claim_resetting(w))
			continue;
		/* Or one is busy with another client (for a moment). */
		if (busy_wait(w, now, next))
			continue;
		if (retry_all_servers_down(now)) {
			fail_all_down(w);
			continue;
		}
		/* Backing off after a failed login: not in anyone's way. */
		if (w->pw_not_before_ms > now) {
			if (w->pw_not_before_ms < *next)
				*next = w->pw_not_before_ms;
			continue;
		}
		if (!blocked) {
			enum open_result r = serve_open(w, now, next);

			if (r == OPEN_OK || r == OPEN_FAILED)
				continue;
			blocked = true;
			no_room = r == OPEN_NO_ROOM;
		}
		if (no_room) {
			if (pending > 0)
				pending--;
			else if (!serve_evict(w))
				need++;
		}
	}
	P.need = need;
}

/* Retire idle sessions past reuse_timeout (before Exchange's autologout). */
static void
retire_idle(uint64_t now, uint64_t *next)
{
	struct pool_entry *e;
	char mb[80];

	while ((e = TAILQ_FIRST(&P.lists[PE_IDLE])) != NULL) {
		uint64_t at = e->pe_last_used_ms + P.cfg->reuse_timeout_ms;

		if (now < at) {
			if (at < *next)
				*next = at;
			break;
		}
		log_info("pool_idle_retire", "entry=%llu mailbox=%s admin=%s "
		    "idle_ms=%llu", (unsigned long long)e->pe_id,
		    lv(mb, sizeof(mb), e->pe_mailbox), e->pe_admin->pa_name,
		    (unsigned long long)(now - e->pe_last_used_ms));
		entry_close(e, "idle-timeout");
	}
}

/* After a reload lowered a budget: close idle sessions (LRU first) until
 * the sessions not already closing fit again. */
static void
trim_over_budget(void)
{
	struct pool_entry *e, *en;
	unsigned live = P.total - P.counts[PE_CLOSING];

	TAILQ_FOREACH_SAFE(e, &P.lists[PE_IDLE], pe_link, en) {
		struct pool_admin *a = e->pe_admin;

		if (live > P.cfg->session_budget ||
		    a->pa_sessions - a->pa_closing > a->pa_max) {
			entry_close(e, "over-budget");
			live--;
		}
	}
}

static void
expire_waiters(uint64_t now, uint64_t *next)
{
	struct pool_waiter *w, *wn;
	char mb[80];

	TAILQ_FOREACH_SAFE(w, &P.queue, pw_link, wn) {
		if (now < w->pw_deadline_ms) {
			if (w->pw_deadline_ms < *next)
				*next = w->pw_deadline_ms;
			continue;
		}
		P.queue_timeouts++;
		stats_queue_timeout();
		log_info("pool_queue_timeout", "mailbox=%s wait_ms=%llu "
		    "sessions=%u budget=%u", lv(mb, sizeof(mb), w->pw_mailbox),
		    (unsigned long long)(now - w->pw_since_ms), P.total,
		    P.cfg->session_budget);
		if (w->pw_entry != NULL &&
		    w->pw_entry->pe_state == PE_LOGIN)
			snprintf(w->pw_explain, sizeof(w->pw_explain),
			    "Exchange did not answer the login in time");
		else if (P.paused || pool_all_drained())
			snprintf(w->pw_explain, sizeof(w->pw_explain),
			    "new logins are %s by the operator", P.paused ?
			    "paused" : "held (every server drained)");
		else if (retry_slowdown())
			snprintf(w->pw_explain, sizeof(w->pw_explain),
			    "new logins are slowed down while Exchange "
			    "refuses every admin account");
		else if (P.total >= P.cfg->session_budget)
			snprintf(w->pw_explain, sizeof(w->pw_explain),
			    "the session budget is full (%u of %u sessions "
			    "in use)", P.total, P.cfg->session_budget);
		else if (w->pw_reason[0] != '\0') {
			/* Still retrying: the last failure says why. */
			snprintf(w->pw_explain, sizeof(w->pw_explain),
			    "the last login failed (%.100s)", w->pw_reason);
		} else
			snprintf(w->pw_explain, sizeof(w->pw_explain),
			    "every admin account is at max_sessions or its "
			    "login rate");
		waiter_fail(w, POOL_FAIL_TIMEOUT, "no upstream session became "
		    "available within queue_timeout");
	}
}

/* Call the waiters back whose result is decided. */
static void
deliver(void)
{
	struct pool_waiter *w;
	char mb[80];

	while ((w = TAILQ_FIRST(&P.deliver)) != NULL) {
		struct pool_entry *e = w->pw_entry;
		uint64_t waited = pool_now() - w->pw_since_ms;

		TAILQ_REMOVE(&P.deliver, w, pw_link);
		w->pw_state = PW_NONE;
		w->pw_queued = false;
		if (e != NULL) {
			/* Refused by some account, served all the same. */
			waiter_charge(w, STATS_ATTR_ADMIN);
			w->pw_entry = NULL;
			e->pe_waiter = NULL;
			entry_set_state(e, PE_LEASED);
			if (e->pe_reused) {
				P.reuses++;
				stats_pool_reuse();
			}
			/* A client's wait; a poll's lateness is the
			 * client's poll lag (stats_poll). */
			if (!w->pw_poll)
				stats_queue_wait(waited * 1000);
			log_info("pool_grant", "entry=%llu mailbox=%s admin=%s "
			    "reused=%s wait_ms=%llu",
			    (unsigned long long)e->pe_id,
			    lv(mb, sizeof(mb), e->pe_mailbox),
			    e->pe_admin->pa_name, e->pe_reused ? "yes" : "no",
			    (unsigned long long)waited);
			w->pw_granted(w, e->pe_up);
		} else {
			char rv[300];

			log_info("pool_fail", "mailbox=%s why=%s wait_ms=%llu "
			    "reason=%s", lv(mb, sizeof(mb), w->pw_mailbox),
			    pool_fail_names[w->pw_fail_why],
			    (unsigned long long)waited,
			    lv(rv, sizeof(rv), w->pw_reason));
			w->pw_failed(w, w->pw_fail_why, w->pw_reason);
		}
	}
}

void
pool_tick(void)
{
	uint64_t now, next = UINT64_MAX;
	size_t i;

	if (!P.init || P.shut)
		return;
	if (P.in_tick) {
		P.rerun = true;
		return;
	}
	P.in_tick = true;
	P.sched_at = UINT64_MAX;	/* the timer fired (or is superseded) */
	now = pool_now();
	for (i = 0; i < P.n_admins; i++)
		admin_refill(P.admins[i], now);
	retire_idle(now, &next);
	trim_over_budget();
	expire_waiters(now, &next);
	serve_queue(now, &next);
	/* Only what the callbacks do needs another round. */
	P.rerun = false;
	/* Nothing idle to close: ask lessees to give sessions back
	 * (multiplex mode parks its longest-idle clients); what they
	 * release asks for the next round. */
	if (P.need > 0 && P.pressure != NULL)
		P.pressure(P.need);
	deliver();
	P.in_tick = false;
	if (P.shut)
		return;
	if (P.rerun)
		next = pool_now();
	P.sched_at = next;
	P.ops->schedule(next);
}

/* ------------------------------------------------------------ public API */

static void
pool_build_admins(const struct config *cfg)
{
	struct pool_admin **na = xcalloc(cfg->n_admins + 1, sizeof(*na));
	uint64_t now = pool_now();
	size_t i, j;

	for (i = 0; i < cfg->n_admins; i++) {
		for (j = 0; j < P.n_admins; j++)
			if (P.admins[j] != NULL &&
			    util_ieq(P.admins[j]->pa_name, cfg->admins[i].name))
				break;
		if (j < P.n_admins) {
			na[i] = P.admins[j];
			P.admins[j] = NULL;
			na[i]->pa_index = i;
			na[i]->pa_max = cfg->admins[i].max_sessions;
		} else
			na[i] = admin_new(&cfg->admins[i], i, now);
	}
	for (j = 0; j < P.n_admins; j++)
		if (P.admins[j] != NULL)
			admin_retire(P.admins[j]);
	free(P.admins);
	P.admins = na;
	P.n_admins = cfg->n_admins;
	if (P.rr >= P.n_admins)
		P.rr = 0;
}

void
pool_init(const struct config *cfg, const struct pool_ops *ops)
{
	size_t i;

	if (P.total != 0)
		log_warn("pool_init", "reason=\"sessions of a previous pool "
		    "still open\" sessions=%u", P.total);
	memset(&P, 0, sizeof(P));
	P.cfg = cfg;
	P.ops = ops;
	P.sched_at = UINT64_MAX;
	TAILQ_INIT(&P.retired);
	for (i = 0; i < PE_COUNT; i++)
		TAILQ_INIT(&P.lists[i]);
	for (i = 0; i < POOL_MB_BUCKETS; i++) {
		TAILQ_INIT(&P.idle_mb[i]);
		TAILQ_INIT(&P.busy_mb[i]);
	}
	for (i = 0; i < POOL_UP_BUCKETS; i++)
		LIST_INIT(&P.by_up[i]);
	TAILQ_INIT(&P.queue);
	TAILQ_INIT(&P.polls);
	TAILQ_INIT(&P.deliver);
	P.init = true;
	pool_build_admins(cfg);
	retry_configure(cfg);
}

void
pool_set_config(const struct config *cfg)
{
	struct pool_entry *e, *en;
	uint64_t cap;
	size_t i;

	if (!P.init || P.shut)
		return;
	for (i = 0; i < PE_COUNT; i++)
		TAILQ_FOREACH(e, &P.lists[i], pe_link)
			e->pe_server = server_remap(P.cfg, cfg, e->pe_server);
	waiters_remap(&P.queue, P.cfg, cfg);
	waiters_remap(&P.polls, P.cfg, cfg);
	waiters_remap(&P.deliver, P.cfg, cfg);
	P.draining = server_mask_remap(P.cfg, cfg, P.draining);
	P.cfg = cfg;
	pool_build_admins(cfg);
	retry_configure(cfg);
	cap = (uint64_t)admin_burst() * 1000;
	for (i = 0; i < P.n_admins; i++)
		if (P.admins[i]->pa_tokens_m > cap)
			P.admins[i]->pa_tokens_m = cap;
	/* Idle sessions of removed admins close now; leased ones at release,
	 * logins in progress when ready (unless a waiter takes them). */
	TAILQ_FOREACH_SAFE(e, &P.lists[PE_IDLE], pe_link, en)
		if (e->pe_admin->pa_removed)
			entry_close(e, "admin-removed");
	log_info("pool_reload", "budget=%u admins=%zu sessions=%u waiters=%u",
	    cfg->session_budget, cfg->n_admins, P.total, P.n_queued);
	/* New budgets apply at the next tick: trim, then serve. */
	pool_kick();
}

void
pool_shutdown(void)
{
	struct pool_waiter *w;
	struct pool_entry *e, *en;
	size_t i;

	if (!P.init || P.shut)
		return;
	/* Waiters are dropped: their clients are closing too. */
	while ((w = TAILQ_FIRST(&P.queue)) != NULL ||
	    (w = TAILQ_FIRST(&P.polls)) != NULL) {
		waiter_unqueue(w);
		w->pw_state = PW_NONE;
		w->pw_queued = false;
		if (w->pw_entry != NULL)
			w->pw_entry->pe_waiter = NULL;
		w->pw_entry = NULL;
	}
	while ((w = TAILQ_FIRST(&P.deliver)) != NULL) {
		TAILQ_REMOVE(&P.deliver, w, pw_link);
		w->pw_state = PW_NONE;
		w->pw_queued = false;
		if (w->pw_entry != NULL)
			w->pw_entry->pe_waiter = NULL;
		w->pw_entry = NULL;
	}
	P.shut = true;
	for (i = 0; i < PE_COUNT; i++) {
		if (i == PE_CLOSING || i == PE_LEASED)
			continue;
		TAILQ_FOREACH_SAFE(e, &P.lists[i], pe_link, en)
			entry_close(e, "shutdown");
	}
	/* Leased sessions belong to their clients until released. */
	for (i = 0; i < P.n_admins; i++)
		admin_retire(P.admins[i]);
	free(P.admins);
	P.admins = NULL;
	P.n_admins = 0;
	P.ops->schedule(UINT64_MAX);
	P.sched_at = UINT64_MAX;
	if (P.ops == &pool_default_ops && D.timer != NULL) {
		event_free(D.timer);
		D.timer = NULL;
	}
	for (i = 0; i < POOL_PREF_SLOTS; i++) {
		free(P.pref[i].pp_admin);
		P.pref[i].pp_admin = NULL;
	}
	memset(P.good, 0, sizeof(P.good));
	retry_shutdown();
	log_info("pool_shutdown", "sessions=%u", P.total);
}

void
pool_acquire(struct pool_waiter *w)
{
	uint64_t now;

	if (!P.init || P.shut || w->pw_state != PW_NONE)
		return;
	now = pool_now();
	w->pw_since_ms = now;
	w->pw_deadline_ms = w->pw_poll ? UINT64_MAX :
	    now + P.cfg->queue_timeout_ms;
	w->pw_entry = NULL;
	w->pw_reason[0] = '\0';
	w->pw_attempts = 0;
	w->pw_servers_failed = 0;
	w->pw_admins_tried = 0;
	w->pw_admins_refused = 0;
	w->pw_last_server = (size_t)-1;
	w->pw_not_before_ms = 0;
	w->pw_overloads = 0;
	w->pw_explain[0] = '\0';
	w->pw_admins_declined = 0;
	w->pw_first_refusal_ms = 0;
	w->pw_refusals = 0;
	w->pw_server_answered = false;
	w->pw_probe = PROBE_NONE;
	w->pw_probe_admin = (size_t)-1;
	w->pw_state = PW_QUEUED;
	w->pw_queued = true;
	TAILQ_INSERT_TAIL(waiter_fifo(w), w, pw_link);
	if (w->pw_poll)
		P.n_polls++;
	else
		P.n_queued++;
	/* Refused recently: answered from the cache, without a login. */
	if (retry_negcache_hit(waiter_domain(w), w->pw_mailbox, now)) {
		char mb[80];

		log_info("pool_negcache_hit", "mailbox=%s",
		    lv(mb, sizeof(mb), w->pw_mailbox));
		snprintf(w->pw_explain, sizeof(w->pw_explain), "with every "
		    "admin account less than negative_cache_ttl ago");
		waiter_fail(w, POOL_FAIL_AUTH, "answered from the negative "
		    "cache");
		return;
	}
	pool_kick();
}

void
pool_cancel(struct pool_waiter *w)
{
	struct pool_entry *e = w->pw_entry;

	if (w->pw_state == PW_NONE)
		return;
	if (w->pw_state == PW_QUEUED)
		waiter_unqueue(w);
	else
		TAILQ_REMOVE(&P.deliver, w, pw_link);
	w->pw_state = PW_NONE;
	w->pw_queued = false;
	w->pw_entry = NULL;
	waiter_charge(w, STATS_ATTR_EXCHANGE);	/* nothing more to learn */
	if (e != NULL) {
		/* A login or check goes on for the pool. */
		e->pe_waiter = NULL;
		if (e->pe_state == PE_HANDOFF)
			entry_to_idle(e);
	}
	pool_kick();
}

void
pool_release(struct upstream *u, enum pool_release how)
{
	struct pool_entry *e = entry_lookup(u);
	const char *reason = NULL;
	unsigned failed, bad = 0;

	if (e == NULL || e->pe_state != PE_LEASED) {
		log_warn("pool_release", "reason=\"not a leased session\" "
		    "state=%s", e != NULL ? pool_state_names[e->pe_state] : "none");
		return;
	}
	P.ops->set_lessee(u, &pool_up_cbs, e);
	failed = P.ops->failed_responses(u, &bad);
	if (how == POOL_RELEASE_DIRTY)
		reason = "dirty-return";
	else if (P.shut)
		reason = "shutdown";
	else if (e->pe_admin->pa_removed)
		reason = "admin-removed";
	else if ((P.draining & bit(e->pe_server)) != 0)
		reason = "server-drained";
	else if (failed >= POOL_RETIRE_FAILED || bad >= POOL_RETIRE_BAD)
		reason = "retire-counters";
	if (reason != NULL) {
		log_debug("pool_release", "entry=%llu how=close reason=%s "
		    "failed=%u bad=%u", (unsigned long long)e->pe_id,
		    log_v(reason), failed, bad);
		entry_close(e, reason);
		return;
	}
	if (how == POOL_RELEASE_SELECTED) {
		/* Never CLOSE: it would expunge messages marked \Deleted. */
		const char *cmd = P.ops->has_cap(u, "UNSELECT") ? "UNSELECT" :
		    "EXAMINE INBOX";

		entry_set_state(e, PE_RESETTING);
		if (P.ops->command(u, cmd, pool_reset_done, e) != 0)
			entry_close(e, "reset-failed");
		return;
	}
	entry_to_idle(e);
}

void
pool_forget(struct upstream *u)
{
	struct pool_entry *e = entry_lookup(u);

	if (e == NULL)
		return;
	/* The upstream is closing by itself; the slot ends at on_free. */
	entry_mark_closing(e);
}

void
pool_get_stats(struct pool_stats *st)
{
	memset(st, 0, sizeof(*st));
	if (!P.init)
		return;
	st->sessions = P.total;
	st->connecting = P.counts[PE_LOGIN];
	st->idle = P.counts[PE_IDLE];
	st->leased = P.counts[PE_LEASED] + P.counts[PE_HANDOFF];
	st->waiters = P.n_queued;
	st->poll_waiters = P.n_polls;
	st->reuses = P.reuses;
	st->logins_ok = P.logins_ok;
	st->logins_failed = P.logins_failed;
	st->queue_timeouts = P.queue_timeouts;
	if (!TAILQ_EMPTY(&P.queue))
		st->oldest_wait_ms = pool_now() -
		    TAILQ_FIRST(&P.queue)->pw_since_ms;
}

unsigned
pool_admin_sessions(size_t admin)
{
	return admin < P.n_admins ? P.admins[admin]->pa_sessions : 0;
}

/* ------------------------------------------------------------ default ops */


static void
def_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	pool_tick();
}

void
pool_default_env(struct event_base *base, struct evdns_base *dns,
    SSL_CTX *upstream_ctx)
{
	if (D.timer != NULL && base != D.base) {
		event_free(D.timer);
		D.timer = NULL;
	}
	D.base = base;
	D.dns = dns;
	D.ctx = upstream_ctx;
	if (D.timer == NULL && base != NULL) {
		D.timer = evtimer_new(base, def_timer_cb, NULL);
		if (D.timer == NULL)
			log_fatal("pool_default_env", "reason=out-of-memory");
	}
}

static void
def_schedule(uint64_t at_ms)
{
	struct timeval tv;
	uint64_t now, delay;

	if (D.timer == NULL)
		return;
	if (at_ms == UINT64_MAX) {
		evtimer_del(D.timer);
		return;
	}
	now = util_now_ms();
	delay = at_ms > now ? at_ms - now : 0;
	tv.tv_sec = (time_t)(delay / 1000);
	tv.tv_usec = (suseconds_t)(delay % 1000) * 1000;
	evtimer_add(D.timer, &tv);
}

static struct upstream *
def_open(const struct config *cfg, size_t admin, size_t server,
    const char *domain, const char *mailbox, const struct upstream_cbs *cbs, void *arg,
    void (*on_free)(void *), void *free_arg)
{
	const struct addr_endpoint *ep = &cfg->servers[server];
	struct upstream_params p;
	char user[2 * IMAPSHIM_NAME_MAX + IMAPSHIM_MAILBOX_MAX + 512];

	if (auth_format_login(cfg->login_format,
	    cfg->domain != NULL ? cfg->domain : domain, cfg->admins[admin].name,
	    mailbox, user, sizeof(user)) < 0) {
		log_warn("pool_open", "reason=\"login name too long\" admin=%s",
		    cfg->admins[admin].name);
		return NULL;
	}
	memset(&p, 0, sizeof(p));
	p.host = ep->host;
	p.port = ep->port;
	p.tls = cfg->up_tls;
	p.ssl_ctx = cfg->up_tls == CFG_TLS_NONE ? NULL : D.ctx;
	p.tls_name = cfg->tls_server_name != NULL ? cfg->tls_server_name :
	    ep->host;
	p.tls_verify = cfg->tls_verify;
	p.login_user = user;
	p.password = cfg->admins[admin].password;
	p.connect_timeout_ms = cfg->connect_timeout_ms;
	p.login_timeout_ms = cfg->login_timeout_ms;
	p.on_free = on_free;
	p.free_arg = free_arg;
	return upstream_new(D.base, D.dns, &p, cbs, arg);
}

const struct pool_ops pool_default_ops = {
	.now_ms = util_now_ms,
	.open = def_open,
	.close = upstream_close,
	.set_lessee = upstream_set_lessee,
	.command = upstream_command,
	.has_cap = upstream_has_cap,
	.failed_responses = upstream_failed_responses,
	.schedule = def_schedule,
};

void
pool_foreach_session(void (*fn)(const struct pool_session_info *si, void *arg),
    void *arg)
{
	struct pool_session_info si;
	struct pool_entry *e;
	uint64_t now = pool_now();
	size_t i;

	if (!P.init)
		return;
	for (i = 0; i < PE_COUNT; i++)
		TAILQ_FOREACH(e, &P.lists[i], pe_link) {
			si.admin = e->pe_admin->pa_name;
			si.server = e->pe_server;
			si.state = pool_state_names[e->pe_state];
			si.mailbox = e->pe_mailbox;
			si.age_ms = now - e->pe_started_ms;
			si.idle_ms = now - e->pe_last_used_ms;
			fn(&si, arg);
		}
}

void
pool_set_pressure(void (*fn)(unsigned need))
{
	P.pressure = fn;
}

void
pool_note_parkable(void)
{
	if (P.init && P.need > 0)
		pool_kick();
}

bool
pool_session_worn(const struct upstream *u)
{
	unsigned bad, failed;

	if (!P.init)
		return false;
	failed = P.ops->failed_responses(u, &bad);
	return failed >= POOL_RETIRE_FAILED || bad >= POOL_RETIRE_BAD;
}

void
pool_pause(bool on)
{
	if (!P.init || P.paused == on)
		return;
	P.paused = on;
	log_info(on ? "pool_paused" : "pool_resumed", "waiters=%u sessions=%u",
	    P.n_queued, P.total);
	pool_kick();		/* resume: the queue is served now */
}

bool
pool_is_paused(void)
{
	return P.paused;
}

int
pool_server_drain(size_t server, bool on)
{
	struct pool_entry *e, *en;
	unsigned closed = 0;
	char srv[300];

	if (!P.init || P.shut || server >= P.cfg->n_servers || server >= 64)
		return -1;
	if (((P.draining & bit(server)) != 0) == on)
		return 0;
	if (on)
		P.draining |= bit(server);
	else
		P.draining &= ~bit(server);
	/* Idle sessions there are logged out now; busy ones when their
	 * client gives them back (pool_release, entry_to_idle). */
	if (on)
		TAILQ_FOREACH_SAFE(e, &P.lists[PE_IDLE], pe_link, en)
			if (e->pe_server == server) {
				entry_close(e, "server-drained");
				closed++;
			}
	log_info(on ? "pool_server_drain" : "pool_server_enable",
	    "server=%s idle_closed=%u", addr_endpoint_str(
	    &P.cfg->servers[server], srv, sizeof(srv)), closed);
	pool_kick();
	return 0;
}

bool
pool_server_draining(size_t server)
{
	return P.init && (P.draining & bit(server)) != 0;
}

size_t
pool_session_server(const struct upstream *u)
{
	const struct pool_entry *e = P.init ? entry_lookup(u) : NULL;

	return e != NULL ? e->pe_server : (size_t)-1;
}
