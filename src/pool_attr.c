/*
 * pool_attr.c - whose fault a refused login is (DESIGN 3.5 R5).
 *
 * Owns the evidence the pool keeps beyond one request: the last two
 * mailboxes that logged in (a probe's subject) and, per mailbox, the
 * account that served it after another refused it.  Applies what retry.c
 * classifies to the waiter a failed login was for (pool_login_failed):
 * retry elsewhere, probe, or fail it, and charges its refusals to the
 * mailbox, the account or Exchange.  Only changes state and asks for a
 * tick: it runs inside upstream callbacks.
 */
#include "pool_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

#define POOL_PREF_SLOTS 1024	/* mailbox -> the account that serves it */

static struct {
	/* The last two different mailboxes that logged in. */
	struct pool_good good[2];
	/* A mailbox one account refused and another served: that one
	 * first for it afterwards.  Direct-mapped by mailbox hash. */
	struct pool_pref {
		unsigned pp_hash;
		char *pp_admin;			/* name (reloads); NULL: empty */
	} pref[POOL_PREF_SLOTS];
} A;

enum attribution { ATTR_MAILBOX, ATTR_PROBE, ATTR_EXCHANGE, ATTR_UNKNOWN };

#define POOL_EXPLAIN_MAILBOX \
	"with every admin account while other mailboxes log in"

/* e's mailbox logged in: a subject for later probes. */
static void
good_note(const struct pool_entry *e, uint64_t now)
{
	struct pool_good *g = &A.good[0];

	if (g->pg_ms == 0 || !util_ieq(g->pg_mailbox, e->pe_mailbox) ||
	    strcmp(g->pg_domain, e->pe_domain) != 0)
		A.good[1] = A.good[0];
	snprintf(g->pg_domain, sizeof(g->pg_domain), "%s", e->pe_domain);
	snprintf(g->pg_mailbox, sizeof(g->pg_mailbox), "%s", e->pe_mailbox);
	g->pg_ms = now;
}

const struct pool_good *
pool_good_pick(const struct pool_waiter *w, uint64_t now)
{
	size_t i;

	for (i = 0; i < nitems(A.good); i++) {
		const struct pool_good *g = &A.good[i];

		if (g->pg_ms != 0 && now - g->pg_ms < RETRY_EVIDENCE_MS &&
		    !util_ieq(g->pg_mailbox, w->pw_mailbox))
			return g;
	}
	return NULL;
}

static struct pool_pref *
pref_slot(const char *mailbox)
{
	return &A.pref[pool_mb_hash(mailbox) % POOL_PREF_SLOTS];
}

size_t
pool_pref_admin(const char *mailbox)
{
	const struct pool_pref *p = pref_slot(mailbox);
	size_t j;

	if (p->pp_admin == NULL || p->pp_hash != pool_mb_hash(mailbox))
		return (size_t)-1;
	for (j = 0; j < pool.n_admins; j++)
		if (util_ieq(pool.admins[j]->pa_name, p->pp_admin))
			return j;
	return (size_t)-1;
}

static void
pref_set(const char *mailbox, const char *admin)
{
	struct pool_pref *p = pref_slot(mailbox);

	free(p->pp_admin);
	p->pp_admin = admin != NULL ? xstrdup(admin) : NULL;
	p->pp_hash = pool_mb_hash(mailbox);
}

/* Refusals of w not yet charged go to a: the mailbox when w ends with
 * AUTH, the account when another served it, else Exchange. */
void
pool_waiter_charge(struct pool_waiter *w, enum stats_attribution a)
{
	if (w->pw_refusals > 0)
		stats_login_failure(a, w->pw_refusals);
	w->pw_refusals = 0;
}

/* Every account that may log in for w refused its mailbox (transient or
 * final); quarantined ones are skipped while another is usable. */
static bool
admins_all_refused(const struct pool_waiter *w, uint64_t now)
{
	uint64_t no = w->pw_admins_declined | w->pw_admins_refused;
	bool any = pool_admins_any_usable(now);
	size_t i;

	for (i = 0; i < pool.n_admins; i++) {
		if ((no & pool_bit(i)) != 0)
			continue;
		if (any && !retry_admin_usable(i, now))
			continue;
		return false;
	}
	return pool.n_admins > 0;
}

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
	for (i = 0; i < pool.n_admins; i++) {
		if ((no & pool_bit(i)) == 0)
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
	if (w->pw_probe == PROBE_NONE && pool_good_pick(w, now) != NULL &&
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

	retry_negcache_add(pool_waiter_domain(w), w->pw_mailbox, now);
	retry_mailbox_at_fault(pool_waiter_domain(w), w->pw_mailbox);
	log_info("pool_mailbox_refused", "mailbox=%s attribution=mailbox "
	    "refusals=%u attempts=%u evidence=%s cached_ms=%llu",
	    log_v(w->pw_mailbox), w->pw_refusals,
	    w->pw_attempts, log_v(why),
	    (unsigned long long)pool.cfg->negative_cache_ttl_ms);
	snprintf(w->pw_explain, sizeof(w->pw_explain), "%s", explain);
	pool_waiter_fail(w, POOL_FAIL_AUTH, w->pw_reason);
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
void
pool_login_failed(struct pool_waiter *w, const struct pool_entry *e,
    enum up_fail why, const char *reason)
{
	const struct config *cfg = pool.cfg;
	const struct pool_admin *a = e->pe_admin;
	size_t ai = a->pa_removed ? (size_t)-1 : a->pa_index;
	struct retry_verdict v;
	uint64_t now = pool_now(), delay = 0;
	const char *end = NULL;
	enum pool_fail fail = POOL_FAIL_REFUSED;
	enum retry_class cls;
	char srv[300];
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
		    log_v(w->pw_mailbox), a->pa_name,
		    pool_entry_server(e, srv, sizeof(srv)), v.rv_label,
		    w->pw_overloads, (unsigned long long)delay,
		    log_v(reason));
		pool_kick();
		return;
	}
	if (cls == RETRY_SERVER) {
		retry_server_failed(e->pe_server, reason, now);
		stats_login_failure(STATS_ATTR_SERVER, 1);
	} else {
		/* The server answered: as an endpoint it works. */
		retry_server_success(e->pe_server, now);
		retry_login_refused(ai, pool_entry_domain(e), e->pe_mailbox,
		    now);
		if (pool_pref_admin(e->pe_mailbox) == ai)
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
		    log_v(e->pe_mailbox),
		    log_v(w->pw_mailbox), a->pa_name,
		    class_name(cls), log_v(reason));
		if (cls == RETRY_SERVER)
			w->pw_servers_failed |= pool_bit(e->pe_server);
		if (w->pw_attempts >= cfg->login_attempts) {
			snprintf(w->pw_explain, sizeof(w->pw_explain), "with "
			    "every admin account, and a mailbox that logged "
			    "in recently failed too");
			pool_waiter_fail(w, cls == RETRY_SERVER ?
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
		w->pw_servers_failed |= pool_bit(e->pe_server);
		for (i = 0; i < cfg->n_servers; i++)
			if ((w->pw_servers_failed & pool_bit(i)) == 0)
				break;
		if (i == cfg->n_servers) {
			end = "every server failed";
			fail = POOL_FAIL_UNAVAILABLE;
			snprintf(w->pw_explain, sizeof(w->pw_explain), "%s",
			    w->pw_server_answered ? "No Exchange server would "
			    "take a session" : "Exchange is not reachable");
		}
		delay = retry_backoff_ms(cfg, w->pw_attempts, retry_rand());
		break;
	case RETRY_LOGIN:
		w->pw_admins_declined |= pool_bit(ai);
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
				    log_v(w->pw_mailbox),
				    pool.admins[w->pw_probe_admin]->pa_name);
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
		bool any = pool_admins_any_usable(now);

		w->pw_admins_refused |= pool_bit(ai);
		for (i = 0; i < pool.n_admins; i++)
			if (pool_admin_eligible(w, i, any, now))
				break;
		if (i == pool.n_admins) {
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
	if (end == NULL && w->pw_attempts >= pool_waiter_attempt_cap())
		end = "too many attempts";
	if (end != NULL) {
		log_info("pool_login_failed", "entry=%llu mailbox=%s admin=%s "
		    "server=%s class=%s label=%s attempts=%u end=%s "
		    "attribution=%s reason=%s", (unsigned long long)e->pe_id,
		    log_v(w->pw_mailbox), a->pa_name,
		    pool_entry_server(e, srv, sizeof(srv)), class_name(cls),
		    v.rv_label, w->pw_attempts, log_v(end),
		    fail == POOL_FAIL_UNAVAILABLE ? "server" : "exchange",
		    log_v(reason));
		pool_waiter_fail(w, fail, w->pw_reason);
		return;
	}
	stats_login_retry(v.rv_reason);
	w->pw_not_before_ms = now + delay;
	log_info("pool_retry", "entry=%llu mailbox=%s admin=%s server=%s "
	    "class=%s label=%s attempt=%u backoff_ms=%llu reason=%s",
	    (unsigned long long)e->pe_id, log_v(w->pw_mailbox),
	    a->pa_name, pool_entry_server(e, srv, sizeof(srv)), class_name(cls),
	    v.rv_label, w->pw_attempts, (unsigned long long)delay,
	    log_v(reason));
	pool_kick();		/* stays queued; serve_open opens the next */
}

struct pool_waiter *
pool_attr_login_ok(struct pool_entry *e, struct pool_waiter *w, uint64_t now)
{
	good_note(e, now);
	retry_login_ok(e->pe_admin->pa_removed ? (size_t)-1 :
	    e->pe_admin->pa_index, pool_entry_domain(e), e->pe_mailbox, now);
	if (w != NULL && e->pe_probe) {
		/* The probe's mailbox logs in with an account that refused
		 * w's: the accounts and Exchange work, w's mailbox does
		 * not.  The session stays in the pool. */
		log_info("pool_probe_ok", "entry=%llu mailbox=%s for=%s "
		    "admin=%s", (unsigned long long)e->pe_id,
		    log_v(e->pe_mailbox), log_v(w->pw_mailbox),
		    e->pe_admin->pa_name);
		w->pw_probe = PROBE_DONE;
		e->pe_waiter = NULL;
		w->pw_entry = NULL;
		waiter_final(w, "a mailbox that logged in recently logs in "
		    "with an account that refused this one",
		    POOL_EXPLAIN_MAILBOX);
		return NULL;
	}
	if (w != NULL && !e->pe_admin->pa_removed &&
	    ((w->pw_admins_declined | w->pw_admins_refused) &
	    ~pool_bit(e->pe_admin->pa_index)) != 0) {
		/* Another account refused this mailbox and this one
		 * serves it (no FullAccess for the other?): this one
		 * first for it from now on; those refusals were the
		 * other account's. */
		pref_set(e->pe_mailbox, e->pe_admin->pa_name);
		pool_waiter_charge(w, STATS_ATTR_ADMIN);
	}
	return w;
}

void
pool_attr_reset(void)
{
	size_t i;

	for (i = 0; i < POOL_PREF_SLOTS; i++)
		free(A.pref[i].pp_admin);
	memset(&A, 0, sizeof(A));
}
