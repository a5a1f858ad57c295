/*
 * retry.c - failure classes, backoff, server health, admin quarantine and
 * the negative cache.
 *
 * Classification is a table of rules, first match wins: which upstream
 * failure (enum up_fail, as a bitmask), which words in the failure text
 * (ASCII case-insensitive substring; or "any of the configured
 * transient_login_patterns"), and what follows: the retry class, the
 * metrics reason and a short label for logs.  Exchange sends no RFC 5530
 * codes (reference §0.6, §1.8), so the words are all there is.
 *
 * Servers and admin accounts are tables parallel to cfg->servers and
 * cfg->admins, rebuilt by retry_configure() and matched by name across
 * reloads.  Everything runs on the caller's clock; nothing here arms a
 * timer or touches a socket.
 */
#include "retry.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <unistd.h>

#include "addr.h"
#include "config.h"
#include "imapshim.h"
#include "log.h"
#include "util.h"

/* ------------------------------------------------------------ classification */

#define W(f) (1u << (f))
#define W_ANY (~0u)

enum rr_match {
	RR_ANY,		/* any text */
	RR_TEXT,	/* rr_text occurs in the text */
	RR_TRANSIENT,	/* one of cfg->transient_login_patterns occurs */
};

struct retry_rule {
	unsigned rr_whys;		/* W(UP_FAIL_...) bits */
	enum rr_match rr_match;
	const char *rr_text;
	enum retry_class rr_class;
	enum stats_retry_reason rr_reason;
	const char *rr_label;		/* NULL: from retry_transient_labels */
	bool rr_load;			/* a sign of load (R14) */
};

/*
 * The table.  Order matters: the certificate cases come before the
 * generic TLS one, "[AUTHENTICATIONFAILED]" before the transient
 * patterns (a Dovecot-style "NO [AUTHENTICATIONFAILED] LOGIN failed"
 * would match "LOGIN failed"), and the catch-alls come last.
 * The pool counts a final refusal as a retry only when it tries the
 * mailbox again with another admin account.
 */
static const struct retry_rule retry_rules[] = {
	/* Certificate verification: never retried unverified. */
	{ W(UP_FAIL_CERT), RR_ANY, NULL,
	  RETRY_SERVER, STATS_RETRY_CERTIFICATE, "certificate", false },
	/* Plaintext "* BYE Connection is closed. 14" where a TLS handshake
	 * was expected: no certificate bound to IMAP (event 1102).  tls.c
	 * words it with both markers. */
	{ W(UP_FAIL_TLS) | W(UP_FAIL_PROTOCOL), RR_TEXT, "event 1102",
	  RETRY_SERVER, STATS_RETRY_CERTIFICATE, "no-certificate-bound",
	  false },
	{ W(UP_FAIL_TLS), RR_TEXT, "Connection is closed. 14",
	  RETRY_SERVER, STATS_RETRY_CERTIFICATE, "no-certificate-bound",
	  false },
	{ W(UP_FAIL_TLS), RR_ANY, NULL,
	  RETRY_SERVER, STATS_RETRY_TLS, "tls-handshake", false },
	{ W(UP_FAIL_CONNECT), RR_ANY, NULL,
	  RETRY_SERVER, STATS_RETRY_CONNECT, "connect", false },
	/* A timeout at any stage: a dead server, or one too busy to answer
	 * in time; a refused or reset connection is no sign of load (nothing
	 * listens, or the server is restarting). */
	{ W(UP_FAIL_TIMEOUT), RR_ANY, NULL,
	  RETRY_SERVER, STATS_RETRY_TIMEOUT, "timeout", true },
	/* BYE greetings (reference §1.8). */
	{ W(UP_FAIL_GREETING), RR_TEXT, "Connection is closed. 14",
	  RETRY_SERVER, STATS_RETRY_GREETING, "no-certificate-bound", false },
	{ W(UP_FAIL_GREETING), RR_TEXT, "Connection is closed. 10",
	  RETRY_SERVER, STATS_RETRY_GREETING, "connection-limit", true },
	{ W(UP_FAIL_GREETING), RR_TEXT, "Connection is closed. 12",
	  RETRY_SERVER, STATS_RETRY_GREETING, "service-stopping", false },
	{ W(UP_FAIL_GREETING), RR_ANY, NULL,
	  RETRY_SERVER, STATS_RETRY_GREETING, "bye-greeting", false },
	/* LOGIN refusals. */
	{ W(UP_FAIL_LOGIN), RR_TEXT, "[AUTHENTICATIONFAILED]",
	  RETRY_FINAL, STATS_RETRY_LOGIN_REFUSED, "authentication-failed",
	  false },
	/* "NO LOGIN failed.", ProxyNotAuthenticated, "[UNAVAILABLE]",
	 * "NO Server Unavailable. 15", and "BAD User is authenticated but
	 * not connected." (which may also end a post-LOGIN CAPABILITY, a
	 * protocol failure). */
	{ W(UP_FAIL_LOGIN) | W(UP_FAIL_PROTOCOL), RR_TRANSIENT, NULL,
	  RETRY_LOGIN, STATS_RETRY_LOGIN_TRANSIENT, NULL, false },
	{ W(UP_FAIL_LOGIN), RR_ANY, NULL,
	  RETRY_FINAL, STATS_RETRY_LOGIN_REFUSED, "login-refused", false },
	/* Unparseable replies, LOGINDISABLED, closed mid-login. */
	{ W(UP_FAIL_PROTOCOL), RR_ANY, NULL,
	  RETRY_SERVER, STATS_RETRY_PROTOCOL, "protocol", false },
	{ W_ANY, RR_ANY, NULL,
	  RETRY_SERVER, STATS_RETRY_CONNECT, "upstream-failure", false },
};

/* Labels for the transient refusals, most specific first. */
static const struct {
	const char *text, *label;
} retry_transient_labels[] = {
	{ "ProxyNotAuthenticated", "proxy-not-authenticated" },
	{ "User is authenticated but not connected",
	  "authenticated-not-connected" },
	{ "Server Unavailable", "server-unavailable" },
	{ "[UNAVAILABLE]", "unavailable" },
	{ "LOGIN failed", "login-failed" },
};

/* upstream.c has the same table; retry.c stays free of upstream.c. */
static const char *const retry_fail_names[] = {
	"connect", "tls", "certificate", "greeting", "login", "timeout",
	"protocol",
};
_Static_assert(nitems(retry_fail_names) == UP_FAIL_COUNT, "fail names");

static const char *const retry_class_names[] = { "server", "login", "final" };
_Static_assert(nitems(retry_class_names) == RETRY_CLASS_COUNT,
    "retry class names");

static char
lower(char c)
{
	return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

/* ASCII case-insensitive substring test; an empty needle never matches. */
static bool
contains_ci(const char *hay, const char *needle)
{
	size_t n = strlen(needle), i;

	if (n == 0)
		return false;
	for (; *hay != '\0'; hay++) {
		for (i = 0; i < n && hay[i] != '\0' &&
		    lower(hay[i]) == lower(needle[i]); i++)
			;
		if (i == n)
			return true;
	}
	return false;
}

static bool
retry_rule_matches(const struct retry_rule *r, const struct config *cfg,
    enum up_fail why, const char *text)
{
	size_t i;

	if ((unsigned)why >= 32 || (r->rr_whys & W(why)) == 0)
		return false;
	switch (r->rr_match) {
	case RR_ANY:
		return true;
	case RR_TEXT:
		return contains_ci(text, r->rr_text);
	case RR_TRANSIENT:
		if (cfg == NULL)
			return false;
		for (i = 0; i < cfg->n_transient_login_patterns; i++)
			if (contains_ci(text, cfg->transient_login_patterns[i]))
				return true;
		return false;
	}
	return false;
}

void
retry_classify(const struct config *cfg, enum up_fail why, const char *text,
    struct retry_verdict *v)
{
	const struct retry_rule *r = NULL;
	size_t i;

	if (text == NULL)
		text = "";
	for (i = 0; i < nitems(retry_rules); i++)
		if (retry_rule_matches(&retry_rules[i], cfg, why, text)) {
			r = &retry_rules[i];
			break;
		}
	if (r == NULL)			/* the last rule matches anything */
		r = &retry_rules[nitems(retry_rules) - 1];
	v->rv_class = r->rr_class;
	v->rv_reason = r->rr_reason;
	v->rv_label = r->rr_label;
	v->rv_load = r->rr_load;
	if (v->rv_label == NULL) {
		v->rv_label = "login-transient";
		for (i = 0; i < nitems(retry_transient_labels); i++)
			if (contains_ci(text, retry_transient_labels[i].text)) {
				v->rv_label = retry_transient_labels[i].label;
				break;
			}
	}
	log_debug("retry_classify", "why=%s class=%s label=%s",
	    (unsigned)why < UP_FAIL_COUNT ? retry_fail_names[why] : "?",
	    retry_class_names[v->rv_class],
	    v->rv_label);
}

/* ------------------------------------------------------------ backoff */

static uint32_t rng_state;

void
retry_seed(uint32_t seed)
{
	rng_state = seed != 0 ? seed : 0x9e3779b9u;
}

uint32_t
retry_rand(void)
{
	uint32_t x;

	if (rng_state == 0)
		retry_seed((uint32_t)util_now_us() ^ ((uint32_t)getpid() << 16));
	x = rng_state;
	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	rng_state = x;
	return x;
}

static uint64_t
backoff(uint64_t initial, uint64_t max, unsigned n, uint32_t rnd)
{
	uint64_t b = initial, lo;
	unsigned i;

	if (max < initial)
		max = initial;
	for (i = 1; i < n && b < max; i++)
		b = b > max / 2 ? max : b * 2;
	if (b > max)
		b = max;
	lo = b / 2;
	return lo + (uint64_t)rnd % (b - lo + 1);
}

uint64_t
retry_backoff_ms(const struct config *cfg, unsigned n, uint32_t rnd)
{
	return backoff(cfg->backoff_initial_ms, cfg->backoff_max_ms, n, rnd);
}

/* ------------------------------------------------------------ state */

struct retry_server {
	char rs_name[IMAPSHIM_NAME_MAX + 16];	/* "host:port" */
	unsigned rs_fails;		/* consecutive */
	bool rs_down;
	uint64_t rs_until;		/* cooldown (or probe window) end */
	bool rs_probing;
	char rs_last[256];		/* last failure reason */
	uint64_t rs_last_ok_ms;		/* last login it completed (0: none) */
	unsigned rs_limit;		/* logins in flight (AIMD, R14) */
	uint64_t rs_halved_ms;		/* when rs_limit last halved */
	uint64_t rs_overloads;		/* for imapshim_upstream_overload_total */
};

/* Mailboxes refused since a success, by key hash (see mb_key_hash);
 * oldest first, the oldest dropped beyond RETRY_MB_TRACK. */
#define RETRY_MB_TRACK 8

struct retry_mbset {
	uint32_t ms_hash[RETRY_MB_TRACK];
	uint64_t ms_admins[RETRY_MB_TRACK];	/* accounts that refused it */
	unsigned ms_n;
};

struct retry_admin {
	char *ra_name;
	unsigned ra_fails;		/* refusals since its last success */
	uint64_t ra_streak_ms;		/* first failure of the run */
	struct retry_mbset ra_mb;	/* different mailboxes among them */
	bool ra_has_ok;
	uint64_t ra_last_ok_ms;
	bool ra_quarantined;		/* set until its next success */
	bool ra_release_logged;		/* its cooldown's end was logged */
	uint64_t ra_until;
};

struct retry_neg {
	char *rn_key;			/* lower-case "domain\nmailbox" */
	unsigned rn_hash;
	uint64_t rn_expires;
	TAILQ_ENTRY(retry_neg) rn_age;	/* oldest first */
	LIST_ENTRY(retry_neg) rn_link;	/* bucket */
};

#define RETRY_NEG_BUCKETS 4096

TAILQ_HEAD(retry_neg_list, retry_neg);
LIST_HEAD(retry_neg_bucket, retry_neg);

static struct {
	bool init;
	struct retry_server *servers;
	size_t n_servers;
	struct retry_admin *admins;
	size_t n_admins;

	/* Copied from the config: the caller may free it on reload. */
	unsigned fail_threshold;
	uint64_t server_cooldown_ms;
	uint64_t admin_cooldown_ms;
	uint64_t negcache_ttl_ms;
	uint64_t backoff_initial_ms;
	uint64_t backoff_max_ms;
	unsigned max_in_flight;		/* max_logins_in_flight */
	uint64_t overload_window_ms;	/* connect_timeout + login_timeout */

	/* Exchange as a whole (the all-accounts slowdown): refusals since
	 * the last successful login of any account, and of which mailboxes
	 * by which accounts. */
	unsigned g_fails;
	unsigned g_fails_at_slow;	/* g_fails when the slowdown began */
	struct retry_mbset g_mb;
	uint64_t g_not_before;
	bool g_slow;
	uint64_t g_slow_since;
	bool g_has_ok;
	uint64_t g_last_ok_ms;
	uint32_t g_anon;		/* next key for a refusal of no mailbox */

	struct retry_neg_list neg_age;
	struct retry_neg_bucket neg[RETRY_NEG_BUCKETS];
	size_t n_neg;
} R;

static void
retry_init_once(void)
{
	size_t i;

	if (R.init)
		return;
	TAILQ_INIT(&R.neg_age);
	for (i = 0; i < RETRY_NEG_BUCKETS; i++)
		LIST_INIT(&R.neg[i]);
	R.init = true;
}

void
retry_configure(const struct config *cfg)
{
	struct retry_server *ns;
	struct retry_admin *na;
	char name[sizeof(ns->rs_name)];
	unsigned old_max;
	size_t i, j;

	retry_init_once();
	if (rng_state == 0)
		(void)retry_rand();
	R.fail_threshold = cfg->server_fail_threshold > 0 ?
	    cfg->server_fail_threshold : 1;
	R.server_cooldown_ms = cfg->server_cooldown_ms;
	R.admin_cooldown_ms = cfg->admin_cooldown_ms;
	R.negcache_ttl_ms = cfg->negative_cache_ttl_ms;
	R.backoff_initial_ms = cfg->backoff_initial_ms;
	R.backoff_max_ms = cfg->backoff_max_ms;
	old_max = R.max_in_flight;
	R.max_in_flight = cfg->max_logins_in_flight > 0 ?
	    cfg->max_logins_in_flight : 1;
	R.overload_window_ms = cfg->connect_timeout_ms + cfg->login_timeout_ms;

	ns = xcalloc(cfg->n_servers + 1, sizeof(*ns));
	for (i = 0; i < cfg->n_servers; i++) {
		addr_endpoint_str(&cfg->servers[i], name, sizeof(name));
		for (j = 0; j < R.n_servers; j++)
			if (util_ieq(R.servers[j].rs_name, name))
				break;
		if (j < R.n_servers)
			ns[i] = R.servers[j];
		snprintf(ns[i].rs_name, sizeof(ns[i].rs_name), "%s", name);
		/* A new server starts at the setting, and so does every
		 * server when a reload changes it. */
		if (ns[i].rs_limit == 0 || R.max_in_flight != old_max)
			ns[i].rs_limit = R.max_in_flight;
	}
	free(R.servers);
	R.servers = ns;
	R.n_servers = cfg->n_servers;

	na = xcalloc(cfg->n_admins + 1, sizeof(*na));
	for (i = 0; i < cfg->n_admins; i++) {
		for (j = 0; j < R.n_admins; j++)
			if (R.admins[j].ra_name != NULL &&
			    util_ieq(R.admins[j].ra_name, cfg->admins[i].name))
				break;
		if (j < R.n_admins) {
			na[i] = R.admins[j];
			R.admins[j].ra_name = NULL;	/* moved */
			free(na[i].ra_name);
		}
		na[i].ra_name = xstrdup(cfg->admins[i].name);
	}
	for (j = 0; j < R.n_admins; j++)
		free(R.admins[j].ra_name);
	free(R.admins);
	R.admins = na;
	R.n_admins = cfg->n_admins;
}

/* ------------------------------------------------------------ servers */

static bool
server_probe_ready(const struct retry_server *s, uint64_t now)
{
	return s->rs_down && now >= s->rs_until;
}

static size_t
server_probe_start(size_t i, uint64_t now)
{
	struct retry_server *s = &R.servers[i];

	s->rs_probing = true;
	s->rs_until = now + R.server_cooldown_ms;
	log_info("retry_server_probe", "server=%s failures=%u", s->rs_name,
	    s->rs_fails);
	return i;
}

size_t
retry_server_pick(uint64_t now_ms, size_t skip)
{
	size_t i, best = (size_t)-1;

	if (R.n_servers == 0)
		return 0;
	for (i = 0; i < R.n_servers; i++)
		if (i != skip && !R.servers[i].rs_down)
			return i;
	for (i = 0; i < R.n_servers; i++)
		if (i != skip && server_probe_ready(&R.servers[i], now_ms))
			return server_probe_start(i, now_ms);
	if (skip < R.n_servers) {
		if (!R.servers[skip].rs_down)
			return skip;
		if (server_probe_ready(&R.servers[skip], now_ms))
			return server_probe_start(skip, now_ms);
	}
	/* Every one in its cooldown: the one that ends first. */
	for (i = 0; i < R.n_servers; i++)
		if (best == (size_t)-1 ||
		    R.servers[i].rs_until < R.servers[best].rs_until)
			best = i;
	return best;
}

static bool
avoided(size_t i, uint64_t avoid)
{
	IMAPSHIM_ASSERT(i < CONFIG_MAX_SERVERS);
	return (avoid & ((uint64_t)1 << i)) != 0;
}

size_t
retry_server_pick_except(uint64_t now_ms, uint64_t avoid)
{
	size_t i;

	/* A down server whose cooldown has ended gets the next login as
	 * its probe, even while others work: otherwise the first server of
	 * the list would never be used again. */
	for (i = 0; i < R.n_servers; i++)
		if (!avoided(i, avoid) &&
		    server_probe_ready(&R.servers[i], now_ms))
			return server_probe_start(i, now_ms);
	for (i = 0; i < R.n_servers; i++)
		if (!avoided(i, avoid) && !R.servers[i].rs_down)
			return i;
	return (size_t)-1;
}

void
retry_server_failed(size_t server, const char *reason, uint64_t now_ms)
{
	struct retry_server *s;

	if (server >= R.n_servers)
		return;
	s = &R.servers[server];
	if (s->rs_fails < UINT32_MAX)
		s->rs_fails++;
	snprintf(s->rs_last, sizeof(s->rs_last), "%s",
	    reason != NULL ? reason : "");
	if (s->rs_down) {
		/* A probe (or a login started before it went down) failed:
		 * the cooldown starts over. */
		s->rs_probing = false;
		s->rs_until = now_ms + R.server_cooldown_ms;
		log_debug("retry_server_still_down", "server=%s failures=%u "
		    "reason=%s", s->rs_name, s->rs_fails, log_v(s->rs_last));
		return;
	}
	if (s->rs_fails < R.fail_threshold)
		return;
	s->rs_down = true;
	s->rs_probing = false;
	s->rs_until = now_ms + R.server_cooldown_ms;
	log_warn("retry_server_down", "server=%s failures=%u cooldown_ms=%llu "
	    "reason=%s", s->rs_name, s->rs_fails,
	    (unsigned long long)R.server_cooldown_ms, log_v(s->rs_last));
}

void
retry_server_ok(size_t server)
{
	struct retry_server *s;

	if (server >= R.n_servers)
		return;
	s = &R.servers[server];
	if (s->rs_down)
		log_info("retry_server_up", "server=%s failures=%u "
		    "last_failure=%s", s->rs_name, s->rs_fails,
		    log_v(s->rs_last));
	s->rs_down = false;
	s->rs_probing = false;
	s->rs_fails = 0;
}

void
retry_server_success(size_t server, uint64_t now_ms)
{
	struct retry_server *s;

	if (server >= R.n_servers)
		return;
	retry_server_ok(server);
	s = &R.servers[server];
	s->rs_last_ok_ms = now_ms;
	if (s->rs_limit < R.max_in_flight)
		s->rs_limit++;
}

bool
retry_server_overloaded(size_t server, const char *reason,
    uint64_t started_ms, uint64_t now_ms)
{
	struct retry_server *s;

	if (server >= R.n_servers)
		return false;
	s = &R.servers[server];
	/* No recent success: nothing tells a busy server from a dead one,
	 * so the failure counts as before (down after the threshold). */
	if (s->rs_down || s->rs_last_ok_ms == 0 ||
	    now_ms - s->rs_last_ok_ms > R.overload_window_ms)
		return false;
	s->rs_overloads++;
	/* Logins started before the last halving saw the old bound: their
	 * failures are the same congestion, already answered. */
	if (started_ms >= s->rs_halved_ms && s->rs_limit > 1) {
		s->rs_limit = s->rs_limit / 2;
		s->rs_halved_ms = now_ms;
	}
	log_warn("server_overload", "server=%s limit=%u max=%u "
	    "last_ok_ms_ago=%llu overloads=%llu reason=%s", s->rs_name,
	    s->rs_limit, R.max_in_flight,
	    (unsigned long long)(now_ms - s->rs_last_ok_ms),
	    (unsigned long long)s->rs_overloads, log_v(reason));
	return true;
}

unsigned
retry_server_limit(size_t server)
{
	return server < R.n_servers ? R.servers[server].rs_limit :
	    R.max_in_flight;
}

uint64_t
retry_server_overloads(size_t server)
{
	return server < R.n_servers ? R.servers[server].rs_overloads : 0;
}

bool
retry_server_up(size_t server, uint64_t now_ms)
{
	(void)now_ms;
	return server >= R.n_servers || !R.servers[server].rs_down;
}

const char *
retry_server_last_failure(size_t server)
{
	return server < R.n_servers ? R.servers[server].rs_last : "";
}

unsigned
retry_server_failures(size_t server)
{
	return server < R.n_servers ? R.servers[server].rs_fails : 0;
}

bool
retry_server_probing(size_t server, uint64_t now_ms)
{
	return server < R.n_servers && R.servers[server].rs_down &&
	    R.servers[server].rs_probing && now_ms < R.servers[server].rs_until;
}

bool
retry_all_servers_down(uint64_t now_ms)
{
	size_t i;

	if (R.n_servers == 0)
		return false;
	for (i = 0; i < R.n_servers; i++)
		if (!R.servers[i].rs_down ||
		    server_probe_ready(&R.servers[i], now_ms) ||
		    retry_server_probing(i, now_ms))
			return false;
	return true;
}

/* ------------------------------------------------------------ attribution */

/* The mailbox key's hash, as the negative cache spells it; NULL mailbox:
 * a refusal whose mailbox is not known (old callers, tests), a key of its
 * own each time. */
static uint32_t
mb_key_hash(const char *domain, const char *mailbox)
{
	uint32_t h = 2166136261u;
	const char *p;

	if (mailbox == NULL)
		return 0x80000000u | (R.g_anon++ & 0x7fffffffu);
	for (p = domain != NULL ? domain : ""; *p != '\0'; p++)
		h = (h ^ (uint8_t)lower(*p)) * 16777619u;
	h = (h ^ (uint8_t)'\n') * 16777619u;
	for (p = mailbox; *p != '\0'; p++)
		h = (h ^ (uint8_t)lower(*p)) * 16777619u;
	return h & 0x7fffffffu;		/* never an anonymous key */
}

/* Bit admin of a set of accounts; (size_t)-1 (an account a reload
 * removed) is in none. */
static uint64_t
admin_bit(size_t admin)
{
	if (admin == (size_t)-1)
		return 0;
	IMAPSHIM_ASSERT(admin < CONFIG_MAX_ADMINS);
	return (uint64_t)1 << admin;
}

/* Note that admin refused mailbox h. */
static void
mbset_add(struct retry_mbset *s, uint32_t h, size_t admin)
{
	unsigned i;

	for (i = 0; i < s->ms_n; i++)
		if (s->ms_hash[i] == h) {
			s->ms_admins[i] |= admin_bit(admin);
			return;
		}
	if (s->ms_n == RETRY_MB_TRACK) {
		memmove(&s->ms_hash[0], &s->ms_hash[1],
		    (RETRY_MB_TRACK - 1) * sizeof(s->ms_hash[0]));
		memmove(&s->ms_admins[0], &s->ms_admins[1],
		    (RETRY_MB_TRACK - 1) * sizeof(s->ms_admins[0]));
		s->ms_n--;
	}
	s->ms_hash[s->ms_n] = h;
	s->ms_admins[s->ms_n] = admin_bit(admin);
	s->ms_n++;
}

static void
mbset_remove(struct retry_mbset *s, uint32_t h)
{
	unsigned i;

	for (i = 0; i < s->ms_n; i++)
		if (s->ms_hash[i] == h) {
			memmove(&s->ms_hash[i], &s->ms_hash[i + 1],
			    (s->ms_n - i - 1) * sizeof(s->ms_hash[0]));
			memmove(&s->ms_admins[i], &s->ms_admins[i + 1],
			    (s->ms_n - i - 1) * sizeof(s->ms_admins[0]));
			s->ms_n--;
			return;
		}
}

static uint64_t
mbset_admins(const struct retry_mbset *s)
{
	uint64_t m = 0;
	unsigned i;

	for (i = 0; i < s->ms_n; i++)
		m |= s->ms_admins[i];
	return m;
}

/* Every configured account is in mask. */
static bool
all_admins_in(uint64_t mask)
{
	size_t j;

	for (j = 0; j < R.n_admins; j++)
		if ((mask & admin_bit(j)) == 0)
			return false;
	return R.n_admins > 0;
}

/* One more refusal; the slowdown starts when the refusals since the last
 * success name RETRY_SLOW_AFTER different mailboxes and every account
 * refused some of them (DESIGN 3.5 R6). */
static void
global_failed(uint32_t h, size_t admin, uint64_t now)
{
	uint64_t d;

	if (R.g_fails < UINT32_MAX)
		R.g_fails++;
	mbset_add(&R.g_mb, h, admin);
	if (!R.g_slow) {
		if (R.g_mb.ms_n < RETRY_SLOW_AFTER ||
		    !all_admins_in(mbset_admins(&R.g_mb)))
			return;
		R.g_slow = true;
		R.g_slow_since = now;
		R.g_fails_at_slow = R.g_fails;
	}
	d = backoff(R.backoff_initial_ms, R.backoff_max_ms,
	    R.g_fails - R.g_fails_at_slow + 1, retry_rand());
	R.g_not_before = now + d;
	if (R.g_fails == R.g_fails_at_slow) {
		char last[40];

		if (R.g_has_ok)
			snprintf(last, sizeof(last), "%llu",
			    (unsigned long long)(now - R.g_last_ok_ms));
		else
			snprintf(last, sizeof(last), "none");
		log_warn("retry_login_slowdown", "attribution=exchange "
		    "failures=%u mailboxes=%u accounts=%zu "
		    "last_success_ms_ago=%s next_in_ms=%llu reason=\"logins "
		    "of different mailboxes are refused with every admin "
		    "account and none succeeds\"", R.g_fails, R.g_mb.ms_n,
		    R.n_admins, last, (unsigned long long)d);
	}
}

static void
global_ok(uint64_t now)
{
	if (R.g_slow)
		log_info("retry_login_slowdown_end", "attribution=exchange "
		    "failures=%u mailboxes=%u duration_ms=%llu "
		    "reason=\"a login succeeded\"", R.g_fails, R.g_mb.ms_n,
		    (unsigned long long)(now - R.g_slow_since));
	R.g_slow = false;
	R.g_fails = 0;
	R.g_fails_at_slow = 0;
	R.g_mb.ms_n = 0;
	R.g_not_before = 0;
	R.g_has_ok = true;
	R.g_last_ok_ms = now;
}

/* Another account logged in since a's run of failures began, recently;
 * its index in *other_r. */
static bool
other_admin_ok(size_t admin, uint64_t now, size_t *other_r)
{
	const struct retry_admin *a = &R.admins[admin];
	size_t j;

	for (j = 0; j < R.n_admins; j++) {
		const struct retry_admin *o = &R.admins[j];

		if (j == admin || !o->ra_has_ok)
			continue;
		if (o->ra_last_ok_ms >= a->ra_streak_ms &&
		    now - o->ra_last_ok_ms < R.admin_cooldown_ms) {
			*other_r = j;
			return true;
		}
	}
	return false;
}

void
retry_login_ok(size_t admin, const char *domain, const char *mailbox,
    uint64_t now_ms)
{
	struct retry_admin *a;

	(void)domain;
	(void)mailbox;
	global_ok(now_ms);
	if (admin >= R.n_admins)
		return;
	a = &R.admins[admin];
	if (a->ra_quarantined)
		log_info("retry_admin_released", "admin=%s attribution=admin "
		    "failures=%u mailboxes=%u reason=\"it logged in again\"",
		    a->ra_name, a->ra_fails, a->ra_mb.ms_n);
	a->ra_quarantined = false;
	a->ra_fails = 0;
	a->ra_mb.ms_n = 0;
	a->ra_has_ok = true;
	a->ra_last_ok_ms = now_ms;
}

void
retry_login_refused(size_t admin, const char *domain, const char *mailbox,
    uint64_t now_ms)
{
	uint32_t h = mb_key_hash(domain, mailbox);
	struct retry_admin *a;
	size_t other = 0;

	global_failed(h, admin, now_ms);
	if (admin >= R.n_admins)
		return;
	a = &R.admins[admin];
	if (a->ra_fails == 0)
		a->ra_streak_ms = now_ms;
	if (a->ra_fails < UINT32_MAX)
		a->ra_fails++;
	mbset_add(&a->ra_mb, h, admin);
	if (a->ra_mb.ms_n < RETRY_ADMIN_QUARANTINE_FAILS ||
	    R.admin_cooldown_ms == 0 || retry_admin_quarantined(admin, now_ms) ||
	    !other_admin_ok(admin, now_ms, &other))
		return;
	a->ra_quarantined = true;
	a->ra_release_logged = false;
	a->ra_until = now_ms + R.admin_cooldown_ms;
	log_warn("retry_admin_quarantined", "admin=%s attribution=admin "
	    "failures=%u mailboxes=%u succeeding=%s success_ms_ago=%llu "
	    "cooldown_ms=%llu reason=\"logins of different mailboxes keep "
	    "failing while other admin accounts succeed (wrong password, "
	    "locked or disabled account, MaxConnectionsPerUser?)\"",
	    a->ra_name, a->ra_fails, a->ra_mb.ms_n, R.admins[other].ra_name,
	    (unsigned long long)(now_ms - R.admins[other].ra_last_ok_ms),
	    (unsigned long long)R.admin_cooldown_ms);
}

void
retry_mailbox_at_fault(const char *domain, const char *mailbox)
{
	uint32_t h = mb_key_hash(domain, mailbox);
	size_t j;

	/* Its refusals were the mailbox's, not the accounts' nor Exchange's. */
	mbset_remove(&R.g_mb, h);
	for (j = 0; j < R.n_admins; j++)
		mbset_remove(&R.admins[j].ra_mb, h);
}

void
retry_admin_result(size_t admin, bool ok, uint64_t now_ms)
{
	if (ok)
		retry_login_ok(admin, NULL, NULL, now_ms);
	else
		retry_login_refused(admin, NULL, NULL, now_ms);
}

void
retry_admin_refused(size_t admin, uint64_t now_ms)
{
	global_failed(mb_key_hash(NULL, NULL), admin, now_ms);
}

bool
retry_admin_quarantined(size_t admin, uint64_t now_ms)
{
	return admin < R.n_admins && R.admins[admin].ra_quarantined &&
	    now_ms < R.admins[admin].ra_until;
}

bool
retry_admin_usable(size_t admin, uint64_t now_ms)
{
	struct retry_admin *a;

	if (admin >= R.n_admins)
		return true;
	a = &R.admins[admin];
	if (a->ra_quarantined && now_ms >= a->ra_until &&
	    !a->ra_release_logged) {
		a->ra_release_logged = true;
		log_info("retry_admin_released", "admin=%s attribution=admin "
		    "failures=%u mailboxes=%u reason=\"admin_cooldown is over: "
		    "one more failure while others succeed quarantines it "
		    "again\"", a->ra_name, a->ra_fails, a->ra_mb.ms_n);
	}
	return !retry_admin_quarantined(admin, now_ms);
}

uint64_t
retry_admin_last_ok(size_t admin)
{
	return admin < R.n_admins && R.admins[admin].ra_has_ok ?
	    R.admins[admin].ra_last_ok_ms : 0;
}

bool
retry_recent_success(uint64_t now_ms)
{
	return R.g_has_ok && now_ms - R.g_last_ok_ms < RETRY_EVIDENCE_MS;
}

bool
retry_slowdown(void)
{
	return R.g_slow;
}

uint64_t
retry_login_not_before(uint64_t now_ms)
{
	return R.g_not_before > now_ms ? R.g_not_before : now_ms;
}

/* ------------------------------------------------------------ negative cache */

static char *
neg_key(const char *domain, const char *mailbox, unsigned *hash_r)
{
	size_t dl = strlen(domain), ml = strlen(mailbox), i;
	char *k = xmalloc(dl + ml + 2);
	uint32_t h = 2166136261u;

	memcpy(k, domain, dl);
	k[dl] = '\n';
	memcpy(k + dl + 1, mailbox, ml + 1);
	for (i = 0; k[i] != '\0'; i++) {
		k[i] = lower(k[i]);
		h = (h ^ (uint8_t)k[i]) * 16777619u;
	}
	*hash_r = h;
	return k;
}

static struct retry_neg *
neg_find(const char *key, unsigned h)
{
	struct retry_neg *n;

	LIST_FOREACH(n, &R.neg[h % RETRY_NEG_BUCKETS], rn_link)
		if (n->rn_hash == h && strcmp(n->rn_key, key) == 0)
			return n;
	return NULL;
}

static void
neg_remove(struct retry_neg *n)
{
	LIST_REMOVE(n, rn_link);
	TAILQ_REMOVE(&R.neg_age, n, rn_age);
	R.n_neg--;
	free(n->rn_key);
	free(n);
}

void
retry_negcache_add(const char *domain, const char *mailbox, uint64_t now_ms)
{
	struct retry_neg *n;
	unsigned h;
	char *key;

	retry_init_once();
	if (R.negcache_ttl_ms == 0)
		return;
	/* Entries expire in the order they were added (or refreshed). */
	while ((n = TAILQ_FIRST(&R.neg_age)) != NULL &&
	    n->rn_expires <= now_ms)
		neg_remove(n);
	key = neg_key(domain != NULL ? domain : "", mailbox, &h);
	if ((n = neg_find(key, h)) != NULL) {
		free(key);
		TAILQ_REMOVE(&R.neg_age, n, rn_age);
	} else {
		n = xcalloc(1, sizeof(*n));
		n->rn_key = key;
		n->rn_hash = h;
		LIST_INSERT_HEAD(&R.neg[h % RETRY_NEG_BUCKETS], n, rn_link);
		R.n_neg++;
	}
	n->rn_expires = now_ms + R.negcache_ttl_ms;
	TAILQ_INSERT_TAIL(&R.neg_age, n, rn_age);
	while (R.n_neg > RETRY_NEGCACHE_MAX)
		neg_remove(TAILQ_FIRST(&R.neg_age));
}

bool
retry_negcache_hit(const char *domain, const char *mailbox, uint64_t now_ms)
{
	struct retry_neg *n;
	unsigned h;
	char *key;

	if (!R.init || R.n_neg == 0)
		return false;
	key = neg_key(domain != NULL ? domain : "", mailbox, &h);
	n = neg_find(key, h);
	free(key);
	if (n == NULL)
		return false;
	if (n->rn_expires <= now_ms) {
		neg_remove(n);
		return false;
	}
	return true;
}

size_t
retry_negcache_size(void)
{
	return R.n_neg;
}

void
retry_negcache_expire(uint64_t now_ms)
{
	struct retry_neg *n;

	if (!R.init)
		return;
	/* Entries expire in the order they were added (or refreshed). */
	while ((n = TAILQ_FIRST(&R.neg_age)) != NULL &&
	    n->rn_expires <= now_ms)
		neg_remove(n);
}

/* ------------------------------------------------------------ shutdown */

void
retry_shutdown(void)
{
	struct retry_neg *n;
	size_t j;

	if (R.init)
		while ((n = TAILQ_FIRST(&R.neg_age)) != NULL)
			neg_remove(n);
	for (j = 0; j < R.n_admins; j++)
		free(R.admins[j].ra_name);
	free(R.admins);
	free(R.servers);
	memset(&R, 0, sizeof(R));
	retry_init_once();
}

void
retry_login_started(uint64_t now_ms)
{
	/* While every account fails, one new login per backoff step: the
	 * queue must not burst a login per waiter each time it opens. */
	if (R.g_slow)
		R.g_not_before = now_ms + backoff(R.backoff_initial_ms,
		    R.backoff_max_ms, R.g_fails - R.g_fails_at_slow + 1,
		    retry_rand());
}
