/*
 * pool.c - the bounded pool of upstream sessions.
 *
 * Every upstream session is a struct pool_entry from the moment the pool
 * asks ops->open() for it until the upstream's on_free hook fires (the
 * socket is really closed).  The budget counters (pool.total and each admin's
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
 * Waiters are in pool.queue, IDLE polls in pool.polls (FIFOs, PW_QUEUED;
 * polls are served after the queue and never time out) until their result
 * is decided, then in pool.deliver (PW_DELIVER) until pool_tick() calls
 * them back.
 *
 * What a failed login means for its waiter (attribution) is pool_attr.c's,
 * the production pool_ops pool_env.c's; pool_int.h is what they share.
 */
#include "pool_int.h"

#include <event2/buffer.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

/* Exchange disconnects at the 10th tagged NO-or-BAD and at the 3rd BAD:
 * a returned session at or past these is closed instead of pooled. */
#define POOL_RETIRE_FAILED 6
#define POOL_RETIRE_BAD 2

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

const char *const pool_state_names[] = {
	"login", "idle", "checking", "resetting", "handoff", "leased",
	"closing", NULL
};
_Static_assert(nitems(pool_state_names) == PE_COUNT + 1, "entry state names");

static const char *const pool_fail_names[] = {
	"timeout", "unavailable", "auth", "refused",
};
_Static_assert(nitems(pool_fail_names) == POOL_FAIL_COUNT, "fail names");

struct pool_state pool;

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

static char
lower(char c)
{
	return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

unsigned
pool_mb_hash(const char *s)
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

/* Every configured server is drained (the console): no login can start. */
static bool
pool_all_drained(void)
{
	size_t n = pool.cfg->n_servers;

	return n > 0 && pool.draining == UINT64_MAX >> (64 - n);
}

const char *
pool_entry_server(const struct pool_entry *e, char *buf, size_t len)
{
	if (e->pe_server >= pool.cfg->n_servers)
		return "removed";
	return addr_endpoint_str(&pool.cfg->servers[e->pe_server], buf, len);
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

	for (i = 0; old != NULL && i < old->n_servers; i++)
		if (mask & pool_bit(i))
			out |= pool_bit(server_remap(old, cfg, i));
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

const char *
pool_waiter_domain(const struct pool_waiter *w)
{
	return pool.cfg->domain != NULL ? pool.cfg->domain : w->pw_domain;
}

const char *
pool_entry_domain(const struct pool_entry *e)
{
	return pool.cfg->domain != NULL ? pool.cfg->domain : e->pe_domain;
}








/* Inside a tick this only notes that another one is needed (the tick
 * reschedules itself at its end). */
void
pool_kick(void)
{
	uint64_t now;

	if (!pool.init || pool.shut)
		return;
	if (pool.in_tick) {
		pool.rerun = true;
		return;
	}
	now = pool_now();
	if (pool.sched_at <= now)
		return;
	pool.sched_at = now;
	pool.ops->schedule(now);
}

/* ------------------------------------------------------------ budget */

/* Descriptors left for upstream sessions (P13): limit 0 is no limit. */
static uint64_t
fd_room(uint64_t limit, unsigned reserve, unsigned clients)
{
	uint64_t used = (uint64_t)reserve + clients;

	return limit == 0 ? UINT64_MAX : limit > used ? limit - used : 0;
}

unsigned
pool_budget_fit(unsigned session_budget, uint64_t admin_max, uint64_t limit,
    unsigned reserve, unsigned clients)
{
	uint64_t fit = session_budget < admin_max ? session_budget : admin_max;
	uint64_t room = fd_room(limit, reserve, clients);

	if (room < POOL_FD_FLOOR)
		room = POOL_FD_FLOOR;
	return (unsigned)(room < fit ? room : fit);
}

/*
 * Once the descriptors bind, they must leave this many more than the
 * other budgets before the pool says they no longer do: one log line per
 * change of regime, not one per client coming and going at the edge.
 */
#define POOL_FD_HYSTERESIS 32

/* The budget applied now (P13). */
static unsigned
pool_budget(void)
{
	return pool_budget_fit(pool.cfg->session_budget, pool.admin_max,
	    pool.fd_limit, pool.fd_reserve, pool.clients);
}

/* Log when the descriptors start or stop binding; ask for a tick when
 * sessions must close (trim_over_budget) or waiters may log in. */
static void
pool_budget_update(void)
{
	unsigned was = pool.budget, live = pool.total - pool.counts[PE_CLOSING];
	unsigned cap = pool_budget_fit(pool.cfg->session_budget,
	    pool.admin_max, 0, 0, 0);
	uint64_t room = fd_room(pool.fd_limit, pool.fd_reserve, pool.clients);
	bool limited = room < (uint64_t)cap +
	    (pool.fd_limited ? POOL_FD_HYSTERESIS : 0);

	pool.budget = pool_budget();
	if (limited != pool.fd_limited) {
		pool.fd_limited = limited;
		log_event(limited ? LOG_LVL_WARN : LOG_LVL_INFO, limited ?
		    "pool_fd_limited" : "pool_fd_unlimited", "budget=%u "
		    "session_budget=%u clients=%u fd_limit=%llu sessions=%u",
		    pool.budget, pool.cfg->session_budget, pool.clients,
		    (unsigned long long)pool.fd_limit, pool.total);
	}
	if (pool.budget < live || (pool.budget > was &&
	    pool.total < pool.budget && pool.n_queued + pool.n_polls > 0))
		pool_kick();
}

void
pool_set_fd_limit(uint64_t limit, unsigned reserve)
{
	pool.fd_limit = limit;
	pool.fd_reserve = reserve;
	if (pool.init && !pool.shut)
		pool_budget_update();
}

void
pool_set_clients(unsigned clients)
{
	pool.clients = clients;
	/* Without a limit the clients do not matter: no work per accept. */
	if (pool.init && !pool.shut && pool.fd_limit != 0)
		pool_budget_update();
}

/* ------------------------------------------------------------ admins */

static unsigned
admin_burst(void)
{
	return pool.cfg->login_burst > 0 ? pool.cfg->login_burst : 1;
}

static void
admin_refill(struct pool_admin *a, uint64_t now)
{
	uint64_t cap = (uint64_t)admin_burst() * 1000;

	if (pool.cfg->login_rate == 0)
		a->pa_tokens_m = cap;
	else if (now > a->pa_refill_ms) {
		uint64_t add = (now - a->pa_refill_ms) * pool.cfg->login_rate;

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

	if (a->pa_tokens_m >= 1000 || pool.cfg->login_rate == 0)
		return now;
	need = 1000 - a->pa_tokens_m;
	return now + (need + pool.cfg->login_rate - 1) / pool.cfg->login_rate;
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
		TAILQ_INSERT_TAIL(&pool.retired, a, pa_link);
}

/* ------------------------------------------------------------ entries */

/* The by-mailbox list e is on (unless closing). */
static struct pool_entry_list *
entry_mb_list(const struct pool_entry *e)
{
	return e->pe_state == PE_IDLE ?
	    &pool.idle_mb[e->pe_mbhash % POOL_MB_BUCKETS] :
	    &pool.busy_mb[e->pe_mbhash % POOL_MB_BUCKETS];
}

static void
entry_set_state(struct pool_entry *e, enum pe_state to)
{
	enum pe_state from = e->pe_state;

	if (from == to)
		return;
	if (from == PE_CLOSING)		/* terminal until on_free */
		return;
	IMAPSHIM_ASSERT(pool.counts[from] > 0);
	TAILQ_REMOVE(&pool.lists[from], e, pe_link);
	pool.counts[from]--;
	TAILQ_REMOVE(entry_mb_list(e), e, pe_mblink);
	e->pe_state = to;
	TAILQ_INSERT_TAIL(&pool.lists[to], e, pe_link);
	pool.counts[to]++;
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

	LIST_FOREACH(e, &pool.by_up[up_hash(u)], pe_uplink)
		if (e->pe_up == u)
			return e;
	return NULL;
}

/* The FIFO w waits in: an IDLE poll yields to every other waiter (P3). */
static struct pool_waiter_list *
waiter_fifo(const struct pool_waiter *w)
{
	return w->pw_poll ? &pool.polls : &pool.queue;
}

/* Take a PW_QUEUED w out of its FIFO. */
static void
waiter_unqueue(struct pool_waiter *w)
{
	TAILQ_REMOVE(waiter_fifo(w), w, pw_link);
	if (w->pw_poll)
		pool.n_polls--;
	else
		pool.n_queued--;
}

/* Put w back into the queue at its place (by the time it first asked). */
static void
waiter_requeue(struct pool_waiter *w)
{
	struct pool_waiter_list *q = waiter_fifo(w);
	struct pool_waiter *o;

	if (w->pw_state == PW_DELIVER)
		TAILQ_REMOVE(&pool.deliver, w, pw_link);
	else if (w->pw_state == PW_QUEUED)
		return;
	w->pw_state = PW_QUEUED;
	w->pw_queued = true;
	if (w->pw_poll)
		pool.n_polls++;
	else
		pool.n_queued++;
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
	if (e->pe_state == PE_CLOSING)
		return;
	log_debug("pool_close", "entry=%llu mailbox=%s admin=%s state=%s "
	    "reason=%s", (unsigned long long)e->pe_id,
	    log_v(e->pe_mailbox), e->pe_admin->pa_name,
	    pool_state_names[e->pe_state], log_v(reason));
	entry_mark_closing(e);
	if (e->pe_up != NULL)
		pool.ops->close(e->pe_up, reason);
}

/* A healthy, clean session goes into the pool (most recently used). */
static void
entry_to_idle(struct pool_entry *e)
{
	if (e->pe_admin->pa_removed || pool.shut ||
	    (pool.draining & pool_bit(e->pe_server)) != 0) {
		entry_close(e, e->pe_admin->pa_removed ? "admin-removed" :
		    pool.shut ? "shutdown" : "server-drained");
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
	unsigned h = pool_mb_hash(w->pw_mailbox);
	uint64_t until = w->pw_since_ms + POOL_BUSY_WAIT_MS;
	struct pool_entry *e;

	if (now >= until)
		return false;
	TAILQ_FOREACH(e, &pool.busy_mb[h % POOL_MB_BUCKETS], pe_mblink)
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
	unsigned h = pool_mb_hash(w->pw_mailbox);
	struct pool_entry *e;

	TAILQ_FOREACH_REVERSE(e, &pool.idle_mb[h % POOL_MB_BUCKETS],
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
	TAILQ_REMOVE(&pool.lists[PE_CLOSING], e, pe_link);
	pool.counts[PE_CLOSING]--;
	if (e->pe_up != NULL)
		LIST_REMOVE(e, pe_uplink);
	IMAPSHIM_ASSERT(a->pa_closing > 0 && a->pa_sessions > 0 &&
	    pool.total > 0);
	a->pa_closing--;
	a->pa_sessions--;
	pool.total--;
	log_debug("pool_slot_free", "entry=%llu admin=%s sessions=%u "
	    "admin_sessions=%u", (unsigned long long)e->pe_id, a->pa_name,
	    pool.total, a->pa_sessions);
	if (a->pa_removed && a->pa_sessions == 0) {
		TAILQ_REMOVE(&pool.retired, a, pa_link);
		admin_free(a);
	}
	free(e);
	pool_kick();
}

/* ------------------------------------------------------------ waiters */

void
pool_waiter_fail(struct pool_waiter *w, enum pool_fail why, const char *reason)
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
		TAILQ_REMOVE(&pool.deliver, w, pw_link);
	w->pw_state = PW_DELIVER;
	w->pw_fail_why = why;
	pool_waiter_charge(w, why == POOL_FAIL_AUTH ? STATS_ATTR_MAILBOX :
	    STATS_ATTR_EXCHANGE);
	if (reason != w->pw_reason)
		snprintf(w->pw_reason, sizeof(w->pw_reason), "%s", reason);
	TAILQ_INSERT_TAIL(&pool.deliver, w, pw_link);
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
	TAILQ_INSERT_TAIL(&pool.deliver, w, pw_link);
	pool_kick();
}

bool
pool_admin_eligible(const struct pool_waiter *w, size_t j, bool any_usable,
    uint64_t now)
{
	if (w != NULL && (w->pw_admins_refused & pool_bit(j)) != 0)
		return false;
	return !any_usable || retry_admin_usable(j, now);
}

bool
pool_admins_any_usable(uint64_t now)
{
	size_t j;

	for (j = 0; j < pool.n_admins; j++)
		if (retry_admin_usable(j, now))
			return true;
	return false;
}

unsigned
pool_waiter_attempt_cap(void)
{
	return pool.cfg->login_attempts + (unsigned)pool.cfg->n_servers +
	    (unsigned)pool.n_admins;
}







/* ------------------------------------------------------------ upstream callbacks */

static void
pool_up_ready_cb(void *arg)
{
	struct pool_entry *e = arg;
	struct pool_waiter *w, *o;

	if (e->pe_state != PE_LOGIN)
		return;
	pool.logins_ok++;
	stats_upstream_login(STATS_LOGIN_OK);
	retry_server_success(e->pe_server, pool_now());
	/* The evidence (DESIGN 3.5 R5); a probe's success ends its waiter. */
	w = pool_attr_login_ok(e, e->pe_waiter, pool_now());
	if (w == NULL) {
		/* Its waiter left: the first one queued for this mailbox that
		 * has nothing on the way (or only a login) takes it. */
		TAILQ_FOREACH(o, &pool.queue, pw_link)
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
	pool.logins_failed++;
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

	log_debug("pool_lost", "entry=%llu mailbox=%s state=%s reason=%s",
	    (unsigned long long)e->pe_id, log_v(e->pe_mailbox),
	    pool_state_names[e->pe_state],
	    log_v(reason != NULL ? reason : ""));
	entry_mark_closing(e);
}

static void
pool_check_done(void *arg, bool ok)
{
	struct pool_entry *e = arg;

	if (e->pe_state != PE_CHECKING)
		return;
	if (!ok) {
		/* Found dead: replaced, not reported. */
		log_info("pool_dead_session", "entry=%llu mailbox=%s admin=%s",
		    (unsigned long long)e->pe_id,
		    log_v(e->pe_mailbox), e->pe_admin->pa_name);
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
 * times the servers.
 */
static uint64_t
servers_full(void)
{
	unsigned n[CONFIG_MAX_SERVERS] = { 0 };
	struct pool_entry *e;
	uint64_t full = 0;
	size_t i;

	TAILQ_FOREACH(e, &pool.lists[PE_LOGIN], pe_link)
		if (e->pe_server != POOL_SERVER_GONE)
			n[e->pe_server]++;
	for (i = 0; i < pool.cfg->n_servers; i++)
		if (n[i] >= retry_server_limit(i))
			full |= pool_bit(i);
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
		if (pool.ops->command(e->pe_up, "NOOP", pool_check_done,
		    e) == 0)
			return true;
		entry_close(e, "noop-refused");
	}
	return false;
}

/* No server can take w's login, now or soon: w fails, REFUSED when some
 * server answered it with a refusal, else UNAVAILABLE. */
static void
fail_no_server(struct pool_waiter *w)
{
	log_info("pool_no_server", "mailbox=%s attempts=%u reason=%s",
	    log_v(w->pw_mailbox), w->pw_attempts, log_v(w->pw_reason));
	if (w->pw_refusals > 0) {
		/* Refused where it got an answer. */
		if (w->pw_explain[0] == '\0')
			snprintf(w->pw_explain, sizeof(w->pw_explain), "%s",
			    "and no other Exchange server can be used now");
		pool_waiter_fail(w, POOL_FAIL_REFUSED, w->pw_reason);
		return;
	}
	snprintf(w->pw_explain, sizeof(w->pw_explain), "%s",
	    w->pw_server_answered ? "No Exchange server would take a "
	    "session" : "Exchange is not reachable");
	pool_waiter_fail(w, POOL_FAIL_UNAVAILABLE, w->pw_reason[0] != '\0' ?
	    w->pw_reason : "no upstream server is usable");
}

/*
 * The account a login for w may use now (P5), or NULL with *r saying why:
 * OPEN_NO_ROOM, every account it may use is at max_sessions; OPEN_NO_TOKEN,
 * none holds a login token (*next: when one will).  Not quarantined
 * (unless all are), not refused for this mailbox; the account that served
 * it after another refused it first, then an account not yet tried for w,
 * then the most free; ties round-robin.  A probe (R5) takes the account
 * it is for; *probe_r: its subject, or NULL.
 */
static struct pool_admin *
serve_admin(struct pool_waiter *w, uint64_t now, uint64_t *next,
    const struct pool_good **probe_r, enum open_result *r)
{
	struct pool_admin *best = NULL, *a;
	const struct pool_good *probe = NULL;
	uint64_t tok_at = UINT64_MAX;
	bool room = false, any, best_new = false, is_new;
	size_t i, j, pref;

	if (w->pw_probe == PROBE_PENDING &&
	    (w->pw_probe_admin >= pool.n_admins ||
	    (probe = pool_good_pick(w, now)) == NULL))
		w->pw_probe = PROBE_DONE;	/* its subject is gone: none */
	*probe_r = probe;
	pref = w->pw_attempts == 0 ? pool_pref_admin(w->pw_mailbox) :
	    (size_t)-1;
	any = pool_admins_any_usable(now);
	for (i = 0; i < pool.n_admins; i++) {
		j = (pool.rr + i) % pool.n_admins;
		a = pool.admins[j];
		if (probe != NULL ? j != w->pw_probe_admin :
		    !pool_admin_eligible(w, j, any, now))
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
		is_new = (w->pw_admins_tried & pool_bit(j)) == 0;
		if (j == pref && retry_admin_usable(j, now))
			return a;
		if (best == NULL || (is_new && !best_new) ||
		    (is_new == best_new && a->pa_max - a->pa_sessions >
		    best->pa_max - best->pa_sessions)) {
			best = a;
			best_new = is_new;
		}
	}
	if (best == NULL && room && tok_at < *next)
		*next = tok_at;
	*r = room ? OPEN_NO_TOKEN : OPEN_NO_ROOM;
	return best;
}

/*
 * Server i could take a login for w now or soon (P11, P12, R3): i has not
 * failed w, is not drained, and is up (at its bound of logins in flight,
 * the end of one kicks the pool) or under a probe (its answer decides).
 */
static bool
server_takes_logins(const struct pool_waiter *w, size_t i, uint64_t now)
{
	return ((w->pw_servers_failed | pool.draining) & pool_bit(i)) == 0 &&
	    (retry_server_up(i, now) || retry_server_probing(i, now));
}

/*
 * The server for w's login, *server_r: the first one up; on a retry (after
 * overload too: another server may have room), not one that failed w, and
 * not the last one where another will do; never a drained one, nor one at
 * its bound of logins in flight (P12).  None now: w waits in its place
 * (OPEN_NO_TOKEN) while some server takes logins for it; otherwise w fails
 * (OPEN_FAILED).
 */
static enum open_result
serve_server(struct pool_waiter *w, uint64_t now, size_t *server_r)
{
	uint64_t avoid = pool.draining | servers_full();
	size_t i, server = (size_t)-1;

	if (w->pw_attempts == 0 && w->pw_overloads == 0)
		/* retry_server_pick(now, -1) without its last resort (a
		 * server still in its cooldown): wait for the probe then. */
		server = retry_server_pick_except(now, avoid);
	else {
		if (w->pw_last_server != (size_t)-1)
			server = retry_server_pick_except(now, avoid |
			    w->pw_servers_failed | pool_bit(w->pw_last_server));
		if (server == (size_t)-1)
			server = retry_server_pick_except(now, avoid |
			    w->pw_servers_failed);
	}
	if (server < pool.cfg->n_servers) {
		*server_r = server;
		return OPEN_OK;
	}
	for (i = 0; i < pool.cfg->n_servers; i++)
		if (server_takes_logins(w, i, now))
			return OPEN_NO_TOKEN;
	fail_no_server(w);
	return OPEN_FAILED;
}

/* Start a login for w (or its probe) as a on server: the budget slot is
 * taken here until on_free (DESIGN 3.3 P1). */
static enum open_result
serve_login(struct pool_waiter *w, struct pool_admin *a, size_t server,
    const struct pool_good *probe, uint64_t now)
{
	const struct config *cfg = pool.cfg;
	struct pool_entry *e;
	struct upstream *u;

	pool.rr = a->pa_index + 1;
	a->pa_tokens_m -= 1000;
	w->pw_attempts++;
	w->pw_admins_tried |= pool_bit(a->pa_index);
	w->pw_last_server = server;

	e = xcalloc(1, sizeof(*e));
	e->pe_id = ++pool.next_id;
	e->pe_admin = a;
	e->pe_server = server;
	snprintf(e->pe_mailbox, sizeof(e->pe_mailbox), "%s", probe != NULL ?
	    probe->pg_mailbox : w->pw_mailbox);
	snprintf(e->pe_domain, sizeof(e->pe_domain), "%s", probe != NULL ?
	    probe->pg_domain : w->pw_domain);
	if (probe != NULL) {
		e->pe_probe = true;
		w->pw_probe = PROBE_RUNNING;
	}
	e->pe_mbhash = pool_mb_hash(e->pe_mailbox);
	e->pe_started_ms = now;
	e->pe_last_used_ms = now;
	e->pe_state = PE_LOGIN;
	TAILQ_INSERT_TAIL(&pool.lists[PE_LOGIN], e, pe_link);
	TAILQ_INSERT_TAIL(entry_mb_list(e), e, pe_mblink);
	pool.counts[PE_LOGIN]++;
	IMAPSHIM_ASSERT(pool.total < pool_budget() &&
	    pool_budget() <= cfg->session_budget &&
	    a->pa_sessions < a->pa_max);
	a->pa_sessions++;
	pool.total++;
	e->pe_waiter = w;
	w->pw_entry = e;

	retry_login_started(now);
	u = pool.ops->open(cfg, a->pa_index, server, e->pe_domain,
	    e->pe_mailbox, &pool_up_cbs, e, entry_free_cb, e);
	if (u == NULL) {
		TAILQ_REMOVE(&pool.lists[PE_LOGIN], e, pe_link);
		TAILQ_REMOVE(entry_mb_list(e), e, pe_mblink);
		pool.counts[PE_LOGIN]--;
		a->pa_sessions--;
		pool.total--;
		w->pw_entry = NULL;
		free(e);
		pool.logins_failed++;
		snprintf(w->pw_explain, sizeof(w->pw_explain), "imapshim "
		    "could not start an upstream session");
		pool_waiter_fail(w, POOL_FAIL_UNAVAILABLE,
		    "cannot start an upstream session");
		return OPEN_FAILED;
	}
	e->pe_up = u;
	LIST_INSERT_HEAD(&pool.by_up[up_hash(u)], e, pe_uplink);
	log_info("pool_login", "entry=%llu mailbox=%s admin=%s server=%s:%s "
	    "sessions=%u budget=%u admin_sessions=%u admin_max=%u",
	    (unsigned long long)e->pe_id, log_v(e->pe_mailbox), a->pa_name,
	    cfg->servers[server].host, cfg->servers[server].port, pool.total,
	    cfg->session_budget, a->pa_sessions, a->pa_max);
	return OPEN_OK;
}

/* A new login for w: an account (serve_admin), a server (serve_server),
 * then the login (serve_login); or why not now. */
static enum open_result
serve_open(struct pool_waiter *w, uint64_t now, uint64_t *next)
{
	const struct pool_good *probe;
	struct pool_admin *a;
	enum open_result r;
	size_t server;
	uint64_t nb;

	/* Paused, or every server drained: wait (queue_timeout bounds it)
	 * without evicting anybody's idle session. */
	if (pool.paused || pool_all_drained())
		return OPEN_NO_TOKEN;
	if (pool.total >= pool_budget() || pool.n_admins == 0)
		return OPEN_NO_ROOM;
	/* Every account keeps failing: new logins are spaced out. */
	if ((nb = retry_login_not_before(now)) > now) {
		if (nb < *next)
			*next = nb;
		return OPEN_NO_TOKEN;
	}
	if ((a = serve_admin(w, now, next, &probe, &r)) == NULL)
		return r;
	if ((r = serve_server(w, now, &server)) != OPEN_OK)
		return r;
	return serve_login(w, a, server, probe, now);
}

/* Close the least recently used idle session of another mailbox. */
static bool
serve_evict(const struct pool_waiter *w)
{
	struct pool_entry *e;

	TAILQ_FOREACH(e, &pool.lists[PE_IDLE], pe_link)
		if (!entry_fits(e, w))
			break;
	if (e == NULL)
		return false;
	log_info("pool_evict", "entry=%llu mailbox=%s admin=%s idle_ms=%llu "
	    "for=%s", (unsigned long long)e->pe_id,
	    log_v(e->pe_mailbox), e->pe_admin->pa_name,
	    (unsigned long long)(pool_now() - e->pe_last_used_ms),
	    log_v(w->pw_mailbox));
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

	for (i = 0; i < pool.cfg->n_servers; i++)
		if (*(last = retry_server_last_failure(i)) != '\0')
			break;
	snprintf(buf, sizeof(buf), "every upstream server is down (%s)",
	    *last != '\0' ? last : "no reason known");
	snprintf(w->pw_explain, sizeof(w->pw_explain), "Every Exchange server "
	    "is marked down");
	pool_waiter_fail(w, POOL_FAIL_UNAVAILABLE, buf);
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

	TAILQ_FOREACH(e, &pool.lists[PE_RESETTING], pe_link)
		if (e->pe_claimed != pool.pass && entry_fits(e, w)) {
			e->pe_claimed = pool.pass;
			return true;
		}
	return false;
}

static void
serve_queue(uint64_t now, uint64_t *next)
{
	struct pool_waiter_list *const fifos[] = { &pool.queue, &pool.polls };
	struct pool_waiter *w, *wn;
	unsigned live = pool.total - pool.counts[PE_CLOSING];
	unsigned budget = pool_budget(), need = 0, cmd_need = 0;
	/* Slots the sessions closing will free: none of them while the
	 * others still exceed the budget (P13, a reload lowered it). */
	unsigned pending = live >= budget ? 0 : budget - live <
	    pool.counts[PE_CLOSING] ? budget - live : pool.counts[PE_CLOSING];
	bool blocked = false, no_room = false;
	size_t f;

	pool.pass++;

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
	pool.need = need;
}

/* Retire idle sessions past reuse_timeout (before Exchange's autologout). */
static void
retire_idle(uint64_t now, uint64_t *next)
{
	struct pool_entry *e;

	while ((e = TAILQ_FIRST(&pool.lists[PE_IDLE])) != NULL) {
		uint64_t at = e->pe_last_used_ms + pool.cfg->reuse_timeout_ms;

		if (now < at) {
			if (at < *next)
				*next = at;
			break;
		}
		log_info("pool_idle_retire", "entry=%llu mailbox=%s admin=%s "
		    "idle_ms=%llu", (unsigned long long)e->pe_id,
		    log_v(e->pe_mailbox), e->pe_admin->pa_name,
		    (unsigned long long)(now - e->pe_last_used_ms));
		entry_close(e, "idle-timeout");
	}
}

/* A budget fell below the sessions open (a reload lowered it, or clients
 * took the descriptors: P13): close idle sessions (LRU first) until the
 * sessions not already closing fit again. */
static void
trim_over_budget(void)
{
	struct pool_entry *e, *en;
	unsigned live = pool.total - pool.counts[PE_CLOSING];

	TAILQ_FOREACH_SAFE(e, &pool.lists[PE_IDLE], pe_link, en) {
		struct pool_admin *a = e->pe_admin;

		if (live > pool_budget() ||
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

	TAILQ_FOREACH_SAFE(w, &pool.queue, pw_link, wn) {
		if (now < w->pw_deadline_ms) {
			if (w->pw_deadline_ms < *next)
				*next = w->pw_deadline_ms;
			continue;
		}
		pool.queue_timeouts++;
		stats_queue_timeout();
		log_info("pool_queue_timeout", "mailbox=%s wait_ms=%llu "
		    "sessions=%u budget=%u", log_v(w->pw_mailbox),
		    (unsigned long long)(now - w->pw_since_ms), pool.total,
		    pool_budget());
		if (w->pw_entry != NULL &&
		    w->pw_entry->pe_state == PE_LOGIN)
			snprintf(w->pw_explain, sizeof(w->pw_explain),
			    "Exchange did not answer the login in time");
		else if (pool.paused || pool_all_drained())
			snprintf(w->pw_explain, sizeof(w->pw_explain),
			    "new logins are %s by the operator", pool.paused ?
			    "paused" : "held (every server drained)");
		else if (retry_slowdown())
			snprintf(w->pw_explain, sizeof(w->pw_explain),
			    "new logins are slowed down while Exchange "
			    "refuses every admin account");
		else if (pool.fd_limited && pool.total >= pool_budget())
			snprintf(w->pw_explain, sizeof(w->pw_explain),
			    "the open-file limit leaves room for %u upstream "
			    "sessions beside %u clients, all in use",
			    pool_budget(), pool.clients);
		else if (pool.total >= pool.cfg->session_budget)
			snprintf(w->pw_explain, sizeof(w->pw_explain),
			    "the session budget is full (%u of %u sessions "
			    "in use)", pool.total, pool.cfg->session_budget);
		else if (w->pw_reason[0] != '\0') {
			/* Still retrying: the last failure says why. */
			snprintf(w->pw_explain, sizeof(w->pw_explain),
			    "the last login failed (%.100s)", w->pw_reason);
		} else
			snprintf(w->pw_explain, sizeof(w->pw_explain),
			    "every admin account is at max_sessions or its "
			    "login rate");
		pool_waiter_fail(w, POOL_FAIL_TIMEOUT, "no upstream session "
		    "became available within queue_timeout");
	}
}

/* Call the waiters back whose result is decided. */
static void
deliver(void)
{
	struct pool_waiter *w;

	while ((w = TAILQ_FIRST(&pool.deliver)) != NULL) {
		struct pool_entry *e = w->pw_entry;
		uint64_t waited = pool_now() - w->pw_since_ms;

		TAILQ_REMOVE(&pool.deliver, w, pw_link);
		w->pw_state = PW_NONE;
		w->pw_queued = false;
		if (e != NULL) {
			/* Refused by some account, served all the same. */
			pool_waiter_charge(w, STATS_ATTR_ADMIN);
			w->pw_entry = NULL;
			e->pe_waiter = NULL;
			entry_set_state(e, PE_LEASED);
			if (e->pe_reused) {
				pool.reuses++;
				stats_pool_reuse();
			}
			/* A client's wait; a poll's lateness is the
			 * client's poll lag (stats_poll). */
			if (!w->pw_poll)
				stats_queue_wait(waited * 1000);
			log_info("pool_grant", "entry=%llu mailbox=%s admin=%s "
			    "reused=%s wait_ms=%llu",
			    (unsigned long long)e->pe_id,
			    log_v(e->pe_mailbox),
			    e->pe_admin->pa_name, e->pe_reused ? "yes" : "no",
			    (unsigned long long)waited);
			w->pw_granted(w, e->pe_up);
		} else {
			log_info("pool_fail", "mailbox=%s why=%s wait_ms=%llu "
			    "reason=%s", log_v(w->pw_mailbox),
			    pool_fail_names[w->pw_fail_why],
			    (unsigned long long)waited,
			    log_v(w->pw_reason));
			w->pw_failed(w, w->pw_fail_why, w->pw_reason);
		}
	}
}

void
pool_tick(void)
{
	uint64_t now, next = UINT64_MAX;
	size_t i;

	if (!pool.init || pool.shut)
		return;
	if (pool.in_tick) {
		pool.rerun = true;
		return;
	}
	pool.in_tick = true;
	pool.sched_at = UINT64_MAX;	/* the timer fired (or is superseded) */
	now = pool_now();
	for (i = 0; i < pool.n_admins; i++)
		admin_refill(pool.admins[i], now);
	retire_idle(now, &next);
	trim_over_budget();
	expire_waiters(now, &next);
	serve_queue(now, &next);
	/* Only what the callbacks do needs another round. */
	pool.rerun = false;
	/* Nothing idle to close: ask lessees to give sessions back
	 * (multiplex mode parks its longest-idle clients); what they
	 * release asks for the next round. */
	if (pool.need > 0 && pool.pressure != NULL)
		pool.pressure(pool.need);
	deliver();
	pool.in_tick = false;
	if (pool.shut)
		return;
	if (pool.rerun)
		next = pool_now();
	pool.sched_at = next;
	pool.ops->schedule(next);
}

/* ------------------------------------------------------------ public API */

static void
pool_build_admins(const struct config *cfg)
{
	struct pool_admin **na = xcalloc(cfg->n_admins + 1, sizeof(*na));
	uint64_t now = pool_now();
	size_t i, j;

	for (i = 0; i < cfg->n_admins; i++) {
		for (j = 0; j < pool.n_admins; j++)
			if (pool.admins[j] != NULL &&
			    util_ieq(pool.admins[j]->pa_name,
			    cfg->admins[i].name))
				break;
		if (j < pool.n_admins) {
			na[i] = pool.admins[j];
			pool.admins[j] = NULL;
			na[i]->pa_index = i;
			na[i]->pa_max = cfg->admins[i].max_sessions;
		} else
			na[i] = admin_new(&cfg->admins[i], i, now);
	}
	for (j = 0; j < pool.n_admins; j++)
		if (pool.admins[j] != NULL)
			admin_retire(pool.admins[j]);
	free(pool.admins);
	pool.admins = na;
	pool.n_admins = cfg->n_admins;
	if (pool.rr >= pool.n_admins)
		pool.rr = 0;
	pool.admin_max = 0;
	for (i = 0; i < pool.n_admins; i++)
		pool.admin_max += pool.admins[i]->pa_max;
}

void
pool_init(const struct config *cfg, const struct pool_ops *ops)
{
	size_t i;

	if (pool.total != 0)
		log_warn("pool_init", "reason=\"sessions of a previous pool "
		    "still open\" sessions=%u", pool.total);
	memset(&pool, 0, sizeof(pool));
	pool.cfg = cfg;
	pool.ops = ops;
	pool.sched_at = UINT64_MAX;
	TAILQ_INIT(&pool.retired);
	for (i = 0; i < PE_COUNT; i++)
		TAILQ_INIT(&pool.lists[i]);
	for (i = 0; i < POOL_MB_BUCKETS; i++) {
		TAILQ_INIT(&pool.idle_mb[i]);
		TAILQ_INIT(&pool.busy_mb[i]);
	}
	for (i = 0; i < POOL_UP_BUCKETS; i++)
		LIST_INIT(&pool.by_up[i]);
	TAILQ_INIT(&pool.queue);
	TAILQ_INIT(&pool.polls);
	TAILQ_INIT(&pool.deliver);
	pool.init = true;
	pool_attr_reset();
	pool_build_admins(cfg);
	pool_budget_update();
	retry_configure(cfg);
}

void
pool_set_config(const struct config *cfg)
{
	struct pool_entry *e, *en;
	uint64_t cap;
	size_t i;

	if (!pool.init || pool.shut)
		return;
	for (i = 0; i < PE_COUNT; i++)
		TAILQ_FOREACH(e, &pool.lists[i], pe_link)
			e->pe_server = server_remap(pool.cfg, cfg,
			    e->pe_server);
	waiters_remap(&pool.queue, pool.cfg, cfg);
	waiters_remap(&pool.polls, pool.cfg, cfg);
	waiters_remap(&pool.deliver, pool.cfg, cfg);
	pool.draining = server_mask_remap(pool.cfg, cfg, pool.draining);
	pool.cfg = cfg;
	pool_build_admins(cfg);
	pool_budget_update();
	retry_configure(cfg);
	cap = (uint64_t)admin_burst() * 1000;
	for (i = 0; i < pool.n_admins; i++)
		if (pool.admins[i]->pa_tokens_m > cap)
			pool.admins[i]->pa_tokens_m = cap;
	/* Idle sessions of removed admins close now; leased ones at release,
	 * logins in progress when ready (unless a waiter takes them). */
	TAILQ_FOREACH_SAFE(e, &pool.lists[PE_IDLE], pe_link, en)
		if (e->pe_admin->pa_removed)
			entry_close(e, "admin-removed");
	log_info("pool_reload", "budget=%u admins=%zu sessions=%u waiters=%u",
	    cfg->session_budget, cfg->n_admins, pool.total, pool.n_queued);
	/* New budgets apply at the next tick: trim, then serve. */
	pool_kick();
}

void
pool_shutdown(void)
{
	struct pool_waiter *w;
	struct pool_entry *e, *en;
	size_t i;

	if (!pool.init || pool.shut)
		return;
	/* Waiters are dropped: their clients are closing too. */
	while ((w = TAILQ_FIRST(&pool.queue)) != NULL ||
	    (w = TAILQ_FIRST(&pool.polls)) != NULL) {
		waiter_unqueue(w);
		w->pw_state = PW_NONE;
		w->pw_queued = false;
		if (w->pw_entry != NULL)
			w->pw_entry->pe_waiter = NULL;
		w->pw_entry = NULL;
	}
	while ((w = TAILQ_FIRST(&pool.deliver)) != NULL) {
		TAILQ_REMOVE(&pool.deliver, w, pw_link);
		w->pw_state = PW_NONE;
		w->pw_queued = false;
		if (w->pw_entry != NULL)
			w->pw_entry->pe_waiter = NULL;
		w->pw_entry = NULL;
	}
	pool.shut = true;
	for (i = 0; i < PE_COUNT; i++) {
		if (i == PE_CLOSING || i == PE_LEASED)
			continue;
		TAILQ_FOREACH_SAFE(e, &pool.lists[i], pe_link, en)
			entry_close(e, "shutdown");
	}
	/* Leased sessions belong to their clients until released. */
	for (i = 0; i < pool.n_admins; i++)
		admin_retire(pool.admins[i]);
	free(pool.admins);
	pool.admins = NULL;
	pool.n_admins = 0;
	pool.ops->schedule(UINT64_MAX);
	pool.sched_at = UINT64_MAX;
	if (pool.ops == &pool_default_ops)
		pool_env_stop();
	pool_attr_reset();
	retry_shutdown();
	log_info("pool_shutdown", "sessions=%u", pool.total);
}

void
pool_acquire(struct pool_waiter *w)
{
	uint64_t now;

	if (!pool.init || pool.shut || w->pw_state != PW_NONE)
		return;
	now = pool_now();
	w->pw_since_ms = now;
	w->pw_deadline_ms = w->pw_poll ? UINT64_MAX :
	    now + pool.cfg->queue_timeout_ms;
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
		pool.n_polls++;
	else
		pool.n_queued++;
	/* Refused recently: answered from the cache, without a login. */
	if (retry_negcache_hit(pool_waiter_domain(w), w->pw_mailbox, now)) {
		log_info("pool_negcache_hit", "mailbox=%s",
		    log_v(w->pw_mailbox));
		snprintf(w->pw_explain, sizeof(w->pw_explain), "with every "
		    "admin account less than negative_cache_ttl ago");
		pool_waiter_fail(w, POOL_FAIL_AUTH, "answered from the "
		    "negative cache");
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
		TAILQ_REMOVE(&pool.deliver, w, pw_link);
	w->pw_state = PW_NONE;
	w->pw_queued = false;
	w->pw_entry = NULL;
	pool_waiter_charge(w, STATS_ATTR_EXCHANGE);	/* nothing more to learn */
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
	pool.ops->set_lessee(u, &pool_up_cbs, e);
	failed = pool.ops->failed_responses(u, &bad);
	if (how == POOL_RELEASE_DIRTY)
		reason = "dirty-return";
	else if (pool.shut)
		reason = "shutdown";
	else if (e->pe_admin->pa_removed)
		reason = "admin-removed";
	else if ((pool.draining & pool_bit(e->pe_server)) != 0)
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
		const char *cmd = pool.ops->has_cap(u, "UNSELECT") ?
		    "UNSELECT" : "EXAMINE INBOX";

		entry_set_state(e, PE_RESETTING);
		if (pool.ops->command(u, cmd, pool_reset_done, e) != 0)
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
	if (!pool.init)
		return;
	st->sessions = pool.total;
	st->effective_budget = pool_budget();
	st->connecting = pool.counts[PE_LOGIN];
	st->idle = pool.counts[PE_IDLE];
	st->leased = pool.counts[PE_LEASED] + pool.counts[PE_HANDOFF];
	st->waiters = pool.n_queued;
	st->poll_waiters = pool.n_polls;
	st->reuses = pool.reuses;
	st->logins_ok = pool.logins_ok;
	st->logins_failed = pool.logins_failed;
	st->queue_timeouts = pool.queue_timeouts;
	if (!TAILQ_EMPTY(&pool.queue))
		st->oldest_wait_ms = pool_now() -
		    TAILQ_FIRST(&pool.queue)->pw_since_ms;
}

unsigned
pool_admin_sessions(size_t admin)
{
	return admin < pool.n_admins ? pool.admins[admin]->pa_sessions : 0;
}








void
pool_foreach_session(void (*fn)(const struct pool_session_info *si, void *arg),
    void *arg)
{
	struct pool_session_info si;
	struct pool_entry *e;
	uint64_t now = pool_now();
	size_t i;

	if (!pool.init)
		return;
	for (i = 0; i < PE_COUNT; i++)
		TAILQ_FOREACH(e, &pool.lists[i], pe_link) {
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
	pool.pressure = fn;
}

void
pool_note_parkable(void)
{
	if (pool.init && pool.need > 0)
		pool_kick();
}

bool
pool_session_worn(const struct upstream *u)
{
	unsigned bad, failed;

	if (!pool.init)
		return false;
	failed = pool.ops->failed_responses(u, &bad);
	return failed >= POOL_RETIRE_FAILED || bad >= POOL_RETIRE_BAD;
}

void
pool_pause(bool on)
{
	if (!pool.init || pool.paused == on)
		return;
	pool.paused = on;
	log_info(on ? "pool_paused" : "pool_resumed", "waiters=%u sessions=%u",
	    pool.n_queued, pool.total);
	pool_kick();		/* resume: the queue is served now */
}

bool
pool_is_paused(void)
{
	return pool.paused;
}

int
pool_server_drain(size_t server, bool on)
{
	struct pool_entry *e, *en;
	unsigned closed = 0;
	char srv[300];

	if (!pool.init || pool.shut || server >= pool.cfg->n_servers)
		return -1;
	if (((pool.draining & pool_bit(server)) != 0) == on)
		return 0;
	if (on)
		pool.draining |= pool_bit(server);
	else
		pool.draining &= ~pool_bit(server);
	/* Idle sessions there are logged out now; busy ones when their
	 * client gives them back (pool_release, entry_to_idle). */
	if (on)
		TAILQ_FOREACH_SAFE(e, &pool.lists[PE_IDLE], pe_link, en)
			if (e->pe_server == server) {
				entry_close(e, "server-drained");
				closed++;
			}
	log_info(on ? "pool_server_drain" : "pool_server_enable",
	    "server=%s idle_closed=%u", addr_endpoint_str(
	    &pool.cfg->servers[server], srv, sizeof(srv)), closed);
	pool_kick();
	return 0;
}

bool
pool_server_draining(size_t server)
{
	return pool.init && (pool.draining & pool_bit(server)) != 0;
}

size_t
pool_session_server(const struct upstream *u)
{
	const struct pool_entry *e = pool.init ? entry_lookup(u) : NULL;

	return e != NULL ? e->pe_server : (size_t)-1;
}
