/*
 * status.c - GET /metrics and GET /status over libevent's evhttp.
 *
 * One evhttp server on status_listen.  Every scrape renders into a fresh
 * evbuffer from what the owning modules report at that instant (stats.c's
 * counters, pool.c's sessions and queue, client.c's client kinds, retry.c's
 * server health and admin quarantine, the current config) and hands it to
 * evhttp_send_reply(); nothing is cached, nothing is written.  The cost is
 * one walk over the pool's sessions (bounded by session_budget).
 *
 * /metrics: Prometheus text exposition format 0.0.4 (DESIGN.md 3.6 names).
 * /status: one JSON object:
 *   {"version", "uptime_seconds", "mode", "paused",
 *    "budget": {"total", "used", "free"},
 *    "queue": {"length", "oldest_wait_seconds"},
 *    "polls": {"waiting", "last_minute", "lag_max_seconds",
 *              "lag_avg_seconds", "interval_seconds",
 *              "interval_target_seconds"},
 *    "clients": {"unauthenticated", "attached", "parked", "waiting"},
 *    "admins": [{"name", "max_sessions", "sessions": {state: n, ...},
 *                "used", "free", "quarantined", "configured"}],
 *    "servers": [{"server": "host:port", "up", "draining",
 *                 "consecutive_failures",
 *                 "last_failure": string or null}],
 *    "counters": {"logins": {"ok", "refused", "error"}, "reuse",
 *                 "queue_timeouts", "clients_refused",
 *                 "tls_handshakes": {"full", "resumed"},
 *                 "login_retries": {reason: n, ...}},
 *    "reload": {"last_success", "last_timestamp_seconds", "ok", "rejected"}}
 * "admins" lists the configured accounts in file order, then any account
 * removed by a reload that still has sessions ("configured": false).
 *
 * Only GET (and HEAD, which HTTP requires wherever GET works) are served:
 * other methods get 405, other paths 404.  No password, mailbox name or
 * client address is ever rendered.
 */
#include "status.h"

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "addr.h"
#include "client.h"
#include "config.h"
#include "imapshim.h"
#include "log.h"
#include "pool.h"
#include "retry.h"
#include "stats.h"
#include "tls.h"
#include "util.h"

#ifndef PACKAGE_VERSION
#define PACKAGE_VERSION "unknown"
#endif

/* A scraper that stalls is cut off; a request is a few hundred bytes. */
#define STATUS_TIMEOUT_S 10
#define STATUS_MAX_HEADERS 8192
#define STATUS_MAX_BODY 4096
#define STATUS_BACKLOG 64

#define CT_METRICS "text/plain; version=0.0.4; charset=utf-8"
#define CT_JSON "application/json"
#define CT_TEXT "text/plain; charset=utf-8"

/* The states that always have a series per admin and server. */
static const char *const status_base_states[] = { "login", "idle", "leased" };

/* The label values of stats' tls_handshakes[2] pairs: [0] full, [1] resumed. */
static const char *const status_resumed[2] = { "no", "yes" };

static struct evhttp *st_http;
static const struct config *st_cfg;
static uint64_t st_started_ms;

/* ---------------------------------------------------------------- text */

/*
 * Length of the valid UTF-8 sequence at s (1..4), or 0 when the bytes
 * there are not one (stray continuation, overlong form, surrogate, past
 * U+10FFFF, cut short).  Both formats must be valid UTF-8, and names and
 * failure reasons come from files and from servers.
 */
static size_t
utf8_seq_len(const unsigned char *s, size_t n)
{
	size_t len, i;
	uint32_t cp;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xc2 && s[0] <= 0xdf) {
		len = 2;
		cp = s[0] & 0x1f;
	} else if (s[0] >= 0xe0 && s[0] <= 0xef) {
		len = 3;
		cp = s[0] & 0x0f;
	} else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
		len = 4;
		cp = s[0] & 0x07;
	} else
		return 0;
	if (n < len)
		return 0;
	for (i = 1; i < len; i++) {
		if ((s[i] & 0xc0) != 0x80)
			return 0;
		cp = (cp << 6) | (s[i] & 0x3f);
	}
	if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
	    (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff)
		return 0;
	return len;
}

/* A Prometheus label value: \ " and newline escaped, bad UTF-8 as U+FFFD. */
static void
prom_escape(struct evbuffer *out, const char *s)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t n = strlen(s), i = 0, run = 0, k;

	while (i < n) {
		k = utf8_seq_len(p + i, n - i);
		if (k > 0 && p[i] != '\\' && p[i] != '"' && p[i] != '\n') {
			i += k;
			run += k;
			continue;
		}
		evbuffer_add(out, p + i - run, run);
		run = 0;
		if (k == 0)
			evbuffer_add(out, "\xef\xbf\xbd", 3);
		else if (p[i] == '\n')
			evbuffer_add(out, "\\n", 2);
		else if (p[i] == '\\')
			evbuffer_add(out, "\\\\", 2);
		else
			evbuffer_add(out, "\\\"", 2);
		i++;
	}
	evbuffer_add(out, p + i - run, run);
}

/* A JSON string, quoted: control bytes as \u00XX, bad UTF-8 as \ufffd. */
static void
json_str(struct evbuffer *out, const char *s)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t n = s != NULL ? strlen(s) : 0, i = 0, run = 0, k;

	evbuffer_add(out, "\"", 1);
	while (i < n) {
		k = utf8_seq_len(p + i, n - i);
		if (k > 0 && p[i] >= 0x20 && p[i] != '"' && p[i] != '\\' &&
		    p[i] != 0x7f) {
			i += k;
			run += k;
			continue;
		}
		evbuffer_add(out, p + i - run, run);
		run = 0;
		if (k == 0)
			evbuffer_add(out, "\\ufffd", 6);
		else if (p[i] == '"')
			evbuffer_add(out, "\\\"", 2);
		else if (p[i] == '\\')
			evbuffer_add(out, "\\\\", 2);
		else
			evbuffer_add_printf(out, "\\u%04x", p[i]);
		i++;
	}
	evbuffer_add(out, p + i - run, run);
	evbuffer_add(out, "\"", 1);
}

/* Fixed-point decimals without floating point: 1500 ms -> "1.5". */
static const char *
fmt_fixed(char *buf, size_t len, uint64_t v, unsigned places)
{
	uint64_t div = 1;
	unsigned i;
	char *e;

	for (i = 0; i < places; i++)
		div *= 10;
	snprintf(buf, len, "%llu.%0*llu", (unsigned long long)(v / div),
	    (int)places, (unsigned long long)(v % div));
	e = buf + strlen(buf) - 1;
	while (*e == '0')
		*e-- = '\0';
	if (*e == '.')
		*e = '\0';
	return buf;
}

static const char *
fmt_u64(char *buf, size_t len, uint64_t v)
{
	snprintf(buf, len, "%llu", (unsigned long long)v);
	return buf;
}

/* ------------------------------------------------------- prometheus text */

static void
prom_family(struct evbuffer *out, const char *name, const char *type,
    const char *help)
{
	evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help,
	    name, type);
}

/* name{k0="v0",k1="v1",...} value */
static void
prom_sample(struct evbuffer *out, const char *name, const char *const *keys,
    const char *const *vals, size_t n, const char *value)
{
	size_t i;

	evbuffer_add_printf(out, "%s", name);
	for (i = 0; i < n; i++) {
		evbuffer_add_printf(out, "%s%s=\"", i == 0 ? "{" : ",", keys[i]);
		prom_escape(out, vals[i]);
		evbuffer_add(out, "\"", 1);
	}
	evbuffer_add_printf(out, "%s %s\n", n > 0 ? "}" : "", value);
}

static void
prom_u64(struct evbuffer *out, const char *name, const char *key,
    const char *val, uint64_t v)
{
	char num[32];

	prom_sample(out, name, &key, &val, key != NULL ? 1 : 0,
	    fmt_u64(num, sizeof(num), v));
}

/* A family with one sample per name of an enum, every one (0 included):
 * name{key="names[i]"} vals[i]. */
static void
prom_enum(struct evbuffer *out, const char *name, const char *type,
    const char *help, const char *key, const char *const *names,
    const uint64_t *vals, size_t n)
{
	size_t i;

	prom_family(out, name, type, help);
	for (i = 0; i < n; i++)
		prom_u64(out, name, key, names[i], vals[i]);
}

/* One histogram series: cumulative buckets in seconds, +Inf == _count. */
static void
prom_hist(struct evbuffer *out, const char *name, const char *key,
    const char *val, const struct stats_hist *h)
{
	const char *keys[2] = { key, "le" }, *vals[2] = { val, NULL };
	size_t nl = key != NULL ? 1 : 0, i;
	char series[96], le[32], num[32];
	uint64_t cum = 0;

	snprintf(series, sizeof(series), "%s_bucket", name);
	if (key == NULL) {
		keys[0] = "le";
		nl = 0;
	}
	for (i = 0; i <= STATS_HIST_BUCKETS; i++) {
		cum += h->h_bucket[i];
		vals[nl] = i < STATS_HIST_BUCKETS ? fmt_fixed(le, sizeof(le),
		    stats_hist_bounds_ms[i], 3) : "+Inf";
		prom_sample(out, series, keys, vals, nl + 1,
		    fmt_u64(num, sizeof(num), cum));
	}
	snprintf(series, sizeof(series), "%s_sum", name);
	prom_sample(out, series, keys, vals, nl,
	    fmt_fixed(num, sizeof(num), h->h_sum_us, 6));
	snprintf(series, sizeof(series), "%s_count", name);
	/* The cumulative total, so that +Inf and _count can never differ. */
	prom_sample(out, series, keys, vals, nl, fmt_u64(num, sizeof(num), cum));
}

/* ------------------------------------------------- session aggregation */

/* Sessions of one admin name, by server and state. */
struct st_row {
	const char *sr_name;
	bool sr_configured;
	size_t sr_admin;	/* index into cfg->admins when configured */
	unsigned *sr_cnt;	/* [n_srv][n_states] */
	unsigned sr_total;
};

/*
 * Columns: servers 0..n_servers-1, then one for sessions whose server a
 * reload removed ("removed").  States: pool_state_names in order, then "other"
 * for a name the table does not know (never expected).
 */
struct st_agg {
	const struct config *cfg;
	size_t n_srv;
	size_t n_states;
	struct st_row *rows;
	size_t n_rows;
	size_t cap_rows;
	bool oom;
};

static size_t
agg_n_pool_states(void)
{
	size_t n = 0;

	while (pool_state_names[n] != NULL)
		n++;
	return n;
}

static const char *
agg_state_name(size_t i)
{
	return pool_state_names[i] != NULL ? pool_state_names[i] : "other";
}

static size_t
agg_state_index(const char *state)
{
	size_t i;

	for (i = 0; pool_state_names[i] != NULL; i++)
		if (state == pool_state_names[i] ||
		    strcmp(state, pool_state_names[i]) == 0)
			return i;
	return i;
}

static struct st_row *
agg_add_row(struct st_agg *a, const char *name, bool configured, size_t admin)
{
	struct st_row *r;

	if (a->n_rows == a->cap_rows) {
		size_t cap = a->cap_rows ? 2 * a->cap_rows : 8;

		r = realloc(a->rows, cap * sizeof(*r));
		if (r == NULL)
			return NULL;
		a->rows = r;
		a->cap_rows = cap;
	}
	r = &a->rows[a->n_rows];
	r->sr_cnt = calloc(a->n_srv * a->n_states, sizeof(*r->sr_cnt));
	if (r->sr_cnt == NULL)
		return NULL;
	r->sr_name = name;
	r->sr_configured = configured;
	r->sr_admin = admin;
	r->sr_total = 0;
	a->n_rows++;
	return r;
}

static void
agg_session_cb(const struct pool_session_info *si, void *arg)
{
	struct st_agg *a = arg;
	struct st_row *r = NULL;
	size_t i, srv;

	if (a->oom)
		return;
	for (i = 0; i < a->n_rows; i++)
		if (a->rows[i].sr_name == si->admin ||
		    util_ieq(a->rows[i].sr_name, si->admin)) {
			r = &a->rows[i];
			break;
		}
	/* An account a reload removed, still closing its sessions: the
	 * pool owns the name and keeps it until this walk is over. */
	if (r == NULL && (r = agg_add_row(a, si->admin, false, 0)) == NULL) {
		a->oom = true;
		return;
	}
	srv = si->server < a->n_srv - 1 ? si->server : a->n_srv - 1;
	r->sr_cnt[srv * a->n_states + agg_state_index(si->state)]++;
	r->sr_total++;
}

static void
agg_free(struct st_agg *a)
{
	size_t i;

	for (i = 0; i < a->n_rows; i++)
		free(a->rows[i].sr_cnt);
	free(a->rows);
	memset(a, 0, sizeof(*a));
}

/* Walk the pool once.  Returns 0, or -1 when out of memory. */
static int
agg_collect(struct st_agg *a, const struct config *cfg)
{
	size_t i;

	memset(a, 0, sizeof(*a));
	a->cfg = cfg;
	a->n_srv = (cfg != NULL ? cfg->n_servers : 0) + 1;
	a->n_states = agg_n_pool_states() + 1;
	for (i = 0; cfg != NULL && i < cfg->n_admins; i++)
		if (agg_add_row(a, cfg->admins[i].name, true, i) == NULL) {
			agg_free(a);
			return -1;
		}
	pool_foreach_session(agg_session_cb, a);
	if (a->oom) {
		agg_free(a);
		return -1;
	}
	return 0;
}

static const char *
agg_server_label(const struct st_agg *a, size_t srv, char *buf, size_t len)
{
	if (srv + 1 >= a->n_srv)
		return "removed";
	return addr_endpoint_str(&a->cfg->servers[srv], buf, len);
}

static bool
agg_is_base_state(const char *name)
{
	size_t i;

	for (i = 0; i < nitems(status_base_states); i++)
		if (strcmp(name, status_base_states[i]) == 0)
			return true;
	return false;
}

/* --------------------------------------------------------------- /metrics */

static void
metrics_clients(struct evbuffer *out, const struct stats_snapshot *s)
{
	unsigned counts[CLIENT_KIND_COUNT];
	uint64_t kinds[CLIENT_KIND_COUNT], allocs[UTIL_ALLOC_COUNT];
	size_t i;

	client_counts(counts);
	for (i = 0; i < CLIENT_KIND_COUNT; i++)
		kinds[i] = counts[i];
	prom_enum(out, "imapshim_clients", "gauge",
	    "Client sessions by state (closing ones excluded).", "state",
	    client_kind_names, kinds, CLIENT_KIND_COUNT);
	prom_family(out, "imapshim_clients_refused_total", "counter",
	    "Client connections closed at accept (allow_from, max_clients).");
	prom_u64(out, "imapshim_clients_refused_total", NULL, NULL,
	    s->clients_refused);
	prom_family(out, "imapshim_heap_in_use_bytes", "gauge",
	    "Heap memory in use (sessions, TLS state, buffers).");
	prom_u64(out, "imapshim_heap_in_use_bytes", NULL, NULL,
	    util_heap_in_use());
	for (i = 0; i < UTIL_ALLOC_COUNT; i++)
		allocs[i] = util_allocations(i);
	prom_enum(out, "imapshim_heap_allocations_total", "counter",
	    "Heap allocation calls by imapshim's own code, libevent and "
	    "OpenSSL.", "by", util_alloc_by_names, allocs, UTIL_ALLOC_COUNT);
}

static void
metrics_sessions(struct evbuffer *out, const struct st_agg *a)
{
	static const char *const keys[3] = { "admin", "server", "state" };
	const char *vals[3];
	char srv[300], num[32];
	size_t r, i, k;
	unsigned n;

	prom_family(out, "imapshim_upstream_sessions", "gauge",
	    "Upstream sessions by admin account, server and state.");
	for (r = 0; r < a->n_rows; r++) {
		const struct st_row *row = &a->rows[r];

		for (i = 0; i < a->n_srv; i++) {
			for (k = 0; k < a->n_states; k++) {
				n = row->sr_cnt[i * a->n_states + k];
				/* Zero series only for configured admin x
				 * configured server x the base states. */
				if (n == 0 && (!row->sr_configured ||
				    i + 1 >= a->n_srv ||
				    !agg_is_base_state(agg_state_name(k))))
					continue;
				vals[0] = row->sr_name;
				vals[1] = agg_server_label(a, i, srv, sizeof(srv));
				vals[2] = agg_state_name(k);
				prom_sample(out, "imapshim_upstream_sessions",
				    keys, vals, 3, fmt_u64(num, sizeof(num), n));
			}
		}
	}
}

/* The configured things that have a series each: what labels them. */
enum item_kind { ITEM_ADMIN, ITEM_SERVER };
static const char *const item_keys[] = { "admin", "server" };

/* One per-item gauge or counter: its value for item i at now. */
struct item_metric {
	const char *im_name;
	const char *im_type;
	const char *im_help;
	uint64_t (*im_value)(const struct config *cfg, size_t i, uint64_t now);
};

/* The families m[0..nm-1], each with one sample per configured item. */
static void
metrics_items(struct evbuffer *out, const struct config *cfg, uint64_t now,
    enum item_kind kind, const struct item_metric *m, size_t nm)
{
	size_t n = 0, i;
	char srv[300];

	if (cfg != NULL)
		n = kind == ITEM_ADMIN ? cfg->n_admins : cfg->n_servers;
	for (; nm > 0; m++, nm--) {
		prom_family(out, m->im_name, m->im_type, m->im_help);
		for (i = 0; i < n; i++)
			prom_u64(out, m->im_name, item_keys[kind],
			    kind == ITEM_ADMIN ? cfg->admins[i].name :
			    addr_endpoint_str(&cfg->servers[i], srv, sizeof(srv)),
			    m->im_value(cfg, i, now));
	}
}

static uint64_t
ad_max_sessions(const struct config *cfg, size_t i, uint64_t now)
{
	(void)now;
	return cfg->admins[i].max_sessions;
}

static uint64_t
ad_sessions(const struct config *cfg, size_t i, uint64_t now)
{
	(void)cfg;
	(void)now;
	return pool_admin_sessions(i);
}

static uint64_t
ad_quarantined(const struct config *cfg, size_t i, uint64_t now)
{
	(void)cfg;
	return retry_admin_quarantined(i, now) ? 1 : 0;
}

static const struct item_metric admin_metrics[] = {
	{ "imapshim_admin_max_sessions", "gauge",
	  "Most upstream sessions an admin account may hold (max_sessions).",
	  ad_max_sessions },
	{ "imapshim_admin_sessions", "gauge",
	  "Upstream sessions counted against an admin account, any state.",
	  ad_sessions },
	{ "imapshim_admin_quarantined", "gauge",
	  "1 while an admin account is quarantined by the lockout guard.",
	  ad_quarantined },
};

static void
metrics_admins(struct evbuffer *out, const struct config *cfg, uint64_t now)
{
	metrics_items(out, cfg, now, ITEM_ADMIN, admin_metrics,
	    nitems(admin_metrics));
	prom_family(out, "imapshim_login_slowdown", "gauge",
	    "1 while new logins are slowed down because Exchange refuses "
	    "different mailboxes with every admin account.");
	prom_u64(out, "imapshim_login_slowdown", NULL, NULL,
	    retry_slowdown() ? 1 : 0);
	prom_family(out, "imapshim_negative_cache_entries", "gauge",
	    "Mailboxes answered NO [AUTHENTICATIONFAILED] from the negative "
	    "cache without asking Exchange.");
	retry_negcache_expire(now);
	prom_u64(out, "imapshim_negative_cache_entries", NULL, NULL,
	    retry_negcache_size());
}

static uint64_t
sv_up(const struct config *cfg, size_t i, uint64_t now)
{
	(void)cfg;
	return retry_server_up(i, now) ? 1 : 0;
}

static uint64_t
sv_failures(const struct config *cfg, size_t i, uint64_t now)
{
	(void)cfg;
	(void)now;
	return retry_server_failures(i);
}

static uint64_t
sv_overloads(const struct config *cfg, size_t i, uint64_t now)
{
	(void)cfg;
	(void)now;
	return retry_server_overloads(i);
}

static uint64_t
sv_limit(const struct config *cfg, size_t i, uint64_t now)
{
	(void)cfg;
	(void)now;
	return retry_server_limit(i);
}

static uint64_t
sv_draining(const struct config *cfg, size_t i, uint64_t now)
{
	(void)cfg;
	(void)now;
	return pool_server_draining(i) ? 1 : 0;
}

static const struct item_metric server_metrics[] = {
	{ "imapshim_server_up", "gauge",
	  "1 when an upstream server is usable, 0 while it is marked down.",
	  sv_up },
	{ "imapshim_server_consecutive_failures", "gauge",
	  "Failures in a row of an upstream server.", sv_failures },
	{ "imapshim_upstream_overload_total", "counter",
	  "Upstream logins that timed out (or met the connection limit) "
	  "while the server worked otherwise: overload, not down.",
	  sv_overloads },
	{ "imapshim_upstream_logins_in_flight_limit", "gauge",
	  "Current bound on connects, TLS handshakes and logins in flight "
	  "to a server (max_logins_in_flight, halved on overload).", sv_limit },
	{ "imapshim_server_draining", "gauge",
	  "1 while an operator drains an upstream server (imapshim-ctl "
	  "drain server): no new logins there.", sv_draining },
};

static void
metrics_servers(struct evbuffer *out, const struct config *cfg, uint64_t now)
{
	metrics_items(out, cfg, now, ITEM_SERVER, server_metrics,
	    nitems(server_metrics));
	prom_family(out, "imapshim_paused", "gauge",
	    "1 while an operator has paused new upstream logins "
	    "(imapshim-ctl pause).");
	prom_u64(out, "imapshim_paused", NULL, NULL, pool_is_paused() ? 1 : 0);
}

/* Client handshake and login failures by reason (every reason, 0
 * included) and the expiry of the certificates in use. */
static void
metrics_tls_auth(struct evbuffer *out, const struct config *cfg,
    const struct stats_snapshot *s)
{
	static const char *const keys[2] = { "side", "server" };
	const char *vals[2];
	char srv[300], num[32];
	int64_t na;
	size_t i;

	prom_enum(out, "imapshim_client_tls_handshakes_total", "counter",
	    "Completed client TLS handshakes, full or resumed (session ticket "
	    "or session ID).", "resumed", status_resumed,
	    s->client_tls_handshakes, nitems(status_resumed));
	prom_enum(out, "imapshim_client_tls_failures_total", "counter",
	    "Client TLS handshakes that failed, by reason.", "reason",
	    stats_tls_failure_names, s->client_tls_failures,
	    STATS_TLS_FAIL_COUNT);
	prom_enum(out, "imapshim_client_auth_failures_total", "counter",
	    "Client logins refused by imapshim itself, by reason.", "reason",
	    stats_auth_failure_names, s->client_auth_failures,
	    STATS_AUTH_FAIL_COUNT);
	prom_family(out, "imapshim_tls_certificate_expiry_timestamp_seconds",
	    "gauge", "Unix time when a certificate expires: side=\"client\" "
	    "the one clients see, side=\"upstream\" each server's as its last "
	    "handshake showed.");
	vals[0] = tls_side_names[TLS_SIDE_CLIENT];
	vals[1] = "";
	if (cfg != NULL && (cfg->has_listen || cfg->has_listen_starttls) &&
	    tls_cert_expiry(TLS_SIDE_CLIENT, "", &na))
		prom_sample(out, "imapshim_tls_certificate_expiry_timestamp_seconds",
		    keys, vals, 2, fmt_u64(num, sizeof(num), (uint64_t)na));
	vals[0] = tls_side_names[TLS_SIDE_UPSTREAM];
	for (i = 0; cfg != NULL && i < cfg->n_servers; i++) {
		vals[1] = addr_endpoint_str(&cfg->servers[i], srv, sizeof(srv));
		if (tls_cert_expiry(TLS_SIDE_UPSTREAM, srv, &na))
			prom_sample(out,
			    "imapshim_tls_certificate_expiry_timestamp_seconds",
			    keys, vals, 2, fmt_u64(num, sizeof(num), (uint64_t)na));
	}
}

static void
metrics_counters(struct evbuffer *out, const struct stats_snapshot *s)
{
	char name[64];
	size_t i;

	prom_enum(out, "imapshim_upstream_logins_total", "counter",
	    "Upstream LOGINs by result (ok, refused by the server, error "
	    "before an answer).", "result", stats_login_result_names,
	    s->logins, STATS_LOGIN_COUNT);
	prom_enum(out, "imapshim_upstream_tls_handshakes_total", "counter",
	    "Completed upstream TLS handshakes, full or resumed from a cached "
	    "session.", "resumed", status_resumed, s->tls_handshakes,
	    nitems(status_resumed));
	prom_enum(out, "imapshim_login_retries_total", "counter",
	    "Upstream login retries by the failure that caused them.", "reason",
	    stats_retry_reason_names, s->retries, STATS_RETRY_COUNT);
	prom_enum(out, "imapshim_login_failures_total", "counter",
	    "Failed upstream logins by what they were charged to: the "
	    "mailbox, the admin account, the server or Exchange as a whole.",
	    "attribution", stats_attribution_names, s->login_failures,
	    STATS_ATTR_COUNT);
	prom_family(out, "imapshim_pool_reuse_total", "counter",
	    "Clients served by a pooled upstream session without a new LOGIN.");
	prom_u64(out, "imapshim_pool_reuse_total", NULL, NULL, s->pool_reuse);
	prom_family(out, "imapshim_queue_timeouts_total", "counter",
	    "Waiters answered NO [UNAVAILABLE] after queue_timeout.");
	prom_u64(out, "imapshim_queue_timeouts_total", NULL, NULL,
	    s->queue_timeouts);
	prom_family(out, "imapshim_queue_wait_seconds", "histogram",
	    "Time a client waited in the queue before it was served.");
	prom_hist(out, "imapshim_queue_wait_seconds", NULL, NULL, &s->queue_wait);
	prom_family(out, "imapshim_command_seconds", "histogram",
	    "Time from a client command to its tagged reply, by command.");
	for (i = 0; i < STATS_CMD_COUNT; i++) {
		size_t k;

		/* Like a client library: a series appears at first use. */
		if (s->command[i].h_count == 0)
			continue;
		for (k = 0; stats_command_names[i][k] != '\0' &&
		    k + 1 < sizeof(name); k++) {
			char c = stats_command_names[i][k];

			name[k] = (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c;
		}
		name[k] = '\0';
		prom_hist(out, "imapshim_command_seconds", "command", name,
		    &s->command[i]);
	}
}

static void
metrics_reload(struct evbuffer *out, const struct stats_snapshot *s)
{
	prom_family(out, "imapshim_last_reload_success", "gauge",
	    "1 when the last reload took effect (or none was tried since the "
	    "start), 0 when it was rejected and the old settings stayed.");
	prom_u64(out, "imapshim_last_reload_success", NULL, NULL,
	    (uint64_t)s->last_reload_ok);
	prom_family(out, "imapshim_last_reload_timestamp_seconds", "gauge",
	    "Unix time of the last reload attempt (the start time before any).");
	prom_u64(out, "imapshim_last_reload_timestamp_seconds", NULL, NULL,
	    (uint64_t)s->last_reload_unix_s);
	prom_enum(out, "imapshim_reloads_total", "counter",
	    "Reloads (SIGHUP, the console's reload) by result.", "result",
	    stats_reload_result_names, s->reloads, STATS_RELOAD_COUNT);
}

/* Parked IDLE clients' polls (DESIGN 3.4 M10): the polls waiting, how
 * late they ran, and the interval achieved. */
static void
metrics_polls(struct evbuffer *out, const struct stats_snapshot *s,
    const struct pool_stats *ps, uint64_t now)
{
	struct stats_poll_window pw;
	char num[32];

	stats_poll_window(now, &pw);
	prom_family(out, "imapshim_poll_queue_length", "gauge",
	    "IDLE polls waiting for an upstream session (after every client).");
	prom_u64(out, "imapshim_poll_queue_length", NULL, NULL,
	    ps->poll_waiters);
	prom_family(out, "imapshim_poll_lag_seconds", "histogram",
	    "How late a parked IDLE client's poll got its session.");
	prom_hist(out, "imapshim_poll_lag_seconds", NULL, NULL, &s->poll_lag);
	prom_family(out, "imapshim_poll_lag_max_seconds", "gauge",
	    "Largest poll lag over the last minute or two.");
	prom_sample(out, "imapshim_poll_lag_max_seconds", NULL, NULL, 0,
	    fmt_fixed(num, sizeof(num), pw.lag_max_ms, 3));
	prom_family(out, "imapshim_poll_lag_avg_seconds", "gauge",
	    "Average poll lag over the last minute or two.");
	prom_sample(out, "imapshim_poll_lag_avg_seconds", NULL, NULL, 0,
	    fmt_fixed(num, sizeof(num), pw.lag_avg_ms, 3));
	prom_family(out, "imapshim_poll_interval_seconds", "gauge",
	    "Achieved time between a client's polls, averaged over the last "
	    "minute or two (0: none repeated).");
	prom_sample(out, "imapshim_poll_interval_seconds", NULL, NULL, 0,
	    fmt_fixed(num, sizeof(num), pw.interval_avg_ms, 3));
}

static int
status_metrics(struct evbuffer *out)
{
	const struct config *cfg = st_cfg;
	const struct stats_snapshot *s = stats_get();
	struct pool_stats ps;
	struct st_agg agg;
	uint64_t now = util_now_ms();
	char num[32];

	if (agg_collect(&agg, cfg) != 0)
		return -1;
	pool_get_stats(&ps);
	prom_family(out, "imapshim_build_info", "gauge",
	    "Always 1; the version is in the label.");
	prom_u64(out, "imapshim_build_info", "version", PACKAGE_VERSION, 1);
	prom_family(out, "imapshim_uptime_seconds", "gauge",
	    "Seconds since the status endpoint started.");
	prom_sample(out, "imapshim_uptime_seconds", NULL, NULL, 0,
	    fmt_fixed(num, sizeof(num), st_started_ms != 0 ?
	    now - st_started_ms : 0, 3));
	metrics_clients(out, s);
	prom_family(out, "imapshim_session_budget", "gauge",
	    "Most upstream sessions that may exist at once (session_budget).");
	if (cfg != NULL)
		prom_u64(out, "imapshim_session_budget", NULL, NULL,
		    cfg->session_budget);
	prom_family(out, "imapshim_session_budget_used", "gauge",
	    "Upstream sessions counted against the budget, any state.");
	prom_u64(out, "imapshim_session_budget_used", NULL, NULL, ps.sessions);
	prom_family(out, "imapshim_pool_effective_budget", "gauge",
	    "Most upstream sessions the pool may hold now: session_budget, "
	    "the admins' max_sessions and the descriptors clients leave.");
	prom_u64(out, "imapshim_pool_effective_budget", NULL, NULL,
	    ps.effective_budget);
	metrics_sessions(out, &agg);
	metrics_admins(out, cfg, now);
	metrics_servers(out, cfg, now);
	metrics_tls_auth(out, cfg, s);
	prom_family(out, "imapshim_queue_length", "gauge",
	    "Clients waiting for an upstream session.");
	prom_u64(out, "imapshim_queue_length", NULL, NULL, ps.waiters);
	prom_family(out, "imapshim_queue_oldest_wait_seconds", "gauge",
	    "How long the oldest waiter has waited (0 when none).");
	prom_sample(out, "imapshim_queue_oldest_wait_seconds", NULL, NULL, 0,
	    fmt_fixed(num, sizeof(num), ps.oldest_wait_ms, 3));
	metrics_polls(out, s, &ps, now);
	metrics_counters(out, s);
	metrics_reload(out, s);
	agg_free(&agg);
	return 0;
}

void
status_render_metrics(struct evbuffer *out)
{
	if (status_metrics(out) != 0)
		evbuffer_add_printf(out, "# error: out of memory\n");
}

/* ----------------------------------------------------------------- /status */

/* An admin row's cap, sessions and quarantine (a removed account: no cap,
 * the sessions it still has, never quarantined). */
static void
agg_admin_totals(const struct st_agg *a, const struct st_row *row,
    uint64_t now, unsigned *max, unsigned *used, bool *quarantined)
{
	*max = 0;
	*used = row->sr_total;
	*quarantined = false;
	if (row->sr_configured) {
		*max = a->cfg->admins[row->sr_admin].max_sessions;
		*used = pool_admin_sessions(row->sr_admin);
		*quarantined = retry_admin_quarantined(row->sr_admin, now);
	}
}

/* Sessions of a row in state k, over all servers. */
static unsigned
agg_row_state(const struct st_agg *a, const struct st_row *row, size_t k)
{
	unsigned n = 0;
	size_t i;

	for (i = 0; i < a->n_srv; i++)
		n += row->sr_cnt[i * a->n_states + k];
	return n;
}

static void
json_admin(struct evbuffer *out, const struct st_agg *a,
    const struct st_row *row, uint64_t now)
{
	unsigned max, used, n;
	bool quarantined;
	size_t k;

	agg_admin_totals(a, row, now, &max, &used, &quarantined);
	evbuffer_add_printf(out, "{\"name\":");
	json_str(out, row->sr_name);
	evbuffer_add_printf(out, ",\"max_sessions\":%u,\"sessions\":{", max);
	for (k = 0; k < a->n_states; k++) {
		n = agg_row_state(a, row, k);
		if (n == 0 && pool_state_names[k] == NULL)
			continue;	/* "other": only when it happens */
		evbuffer_add_printf(out, "%s", k > 0 ? "," : "");
		json_str(out, agg_state_name(k));
		evbuffer_add_printf(out, ":%u", n);
	}
	evbuffer_add_printf(out, "},\"used\":%u,\"free\":%u,\"quarantined\":%s,"
	    "\"configured\":%s}", used, max > used ? max - used : 0,
	    quarantined ? "true" : "false",
	    row->sr_configured ? "true" : "false");
}

static void
json_servers(struct evbuffer *out, const struct config *cfg, uint64_t now)
{
	const char *last;
	char srv[300];
	size_t i;

	evbuffer_add_printf(out, "\"servers\":[");
	for (i = 0; cfg != NULL && i < cfg->n_servers; i++) {
		evbuffer_add_printf(out, "%s{\"server\":", i > 0 ? "," : "");
		json_str(out, addr_endpoint_str(&cfg->servers[i], srv,
		    sizeof(srv)));
		evbuffer_add_printf(out, ",\"up\":%s,\"draining\":%s,"
		    "\"consecutive_failures\":%u,\"last_failure\":",
		    retry_server_up(i, now) ? "true" : "false",
		    pool_server_draining(i) ? "true" : "false",
		    retry_server_failures(i));
		last = retry_server_last_failure(i);
		if (last == NULL || last[0] == '\0')
			evbuffer_add_printf(out, "null");
		else
			json_str(out, last);
		evbuffer_add_printf(out, "}");
	}
	evbuffer_add_printf(out, "]");
}

static void
json_counters(struct evbuffer *out, const struct stats_snapshot *s)
{
	size_t i;

	evbuffer_add_printf(out, "\"counters\":{\"logins\":{");
	for (i = 0; i < STATS_LOGIN_COUNT; i++) {
		evbuffer_add_printf(out, "%s", i > 0 ? "," : "");
		json_str(out, stats_login_result_names[i]);
		evbuffer_add_printf(out, ":%llu", (unsigned long long)s->logins[i]);
	}
	evbuffer_add_printf(out, "},\"reuse\":%llu,\"queue_timeouts\":%llu,"
	    "\"clients_refused\":%llu,\"tls_handshakes\":{\"full\":%llu,"
	    "\"resumed\":%llu},\"login_retries\":{",
	    (unsigned long long)s->pool_reuse,
	    (unsigned long long)s->queue_timeouts,
	    (unsigned long long)s->clients_refused,
	    (unsigned long long)s->tls_handshakes[0],
	    (unsigned long long)s->tls_handshakes[1]);
	for (i = 0; i < STATS_RETRY_COUNT; i++) {
		evbuffer_add_printf(out, "%s", i > 0 ? "," : "");
		json_str(out, stats_retry_reason_names[i]);
		evbuffer_add_printf(out, ":%llu", (unsigned long long)s->retries[i]);
	}
	evbuffer_add_printf(out, "}}");
}

static void
json_reload(struct evbuffer *out, const struct stats_snapshot *s)
{
	evbuffer_add_printf(out, "\"reload\":{\"last_success\":%s,"
	    "\"last_timestamp_seconds\":%lld,\"ok\":%llu,\"rejected\":%llu}",
	    s->last_reload_ok ? "true" : "false",
	    (long long)s->last_reload_unix_s,
	    (unsigned long long)s->reloads[STATS_RELOAD_OK],
	    (unsigned long long)s->reloads[STATS_RELOAD_REJECTED]);
}

static int
status_json(struct evbuffer *out)
{
	const struct config *cfg = st_cfg;
	unsigned counts[CLIENT_KIND_COUNT], budget;
	struct stats_poll_window pw;
	struct pool_stats ps;
	struct st_agg agg;
	uint64_t now = util_now_ms();
	char num[32];
	size_t i;

	if (agg_collect(&agg, cfg) != 0)
		return -1;
	pool_get_stats(&ps);
	client_counts(counts);
	budget = cfg != NULL ? cfg->session_budget : 0;
	evbuffer_add_printf(out, "{\"version\":");
	json_str(out, PACKAGE_VERSION);
	evbuffer_add_printf(out, ",\"uptime_seconds\":%s,\"mode\":",
	    fmt_fixed(num, sizeof(num), st_started_ms != 0 ?
	    now - st_started_ms : 0, 3));
	if (cfg == NULL)
		evbuffer_add_printf(out, "null");
	else
		json_str(out, cfg->pool_mode == CFG_POOL_SESSION ? "session" :
		    "multiplex");
	evbuffer_add_printf(out, ",\"paused\":%s,\"budget\":{\"total\":%u,"
	    "\"used\":%u,\"free\":%u,\"effective\":%u}", pool_is_paused() ?
	    "true" : "false", budget, ps.sessions,
	    budget > ps.sessions ? budget - ps.sessions : 0,
	    ps.effective_budget);
	evbuffer_add_printf(out, ",\"queue\":{\"length\":%u,"
	    "\"oldest_wait_seconds\":%s}", ps.waiters,
	    fmt_fixed(num, sizeof(num), ps.oldest_wait_ms, 3));
	stats_poll_window(now, &pw);
	evbuffer_add_printf(out, ",\"polls\":{\"waiting\":%u,"
	    "\"last_minute\":%llu,\"lag_max_seconds\":%s,", ps.poll_waiters,
	    (unsigned long long)pw.polls,
	    fmt_fixed(num, sizeof(num), pw.lag_max_ms, 3));
	evbuffer_add_printf(out, "\"lag_avg_seconds\":%s,",
	    fmt_fixed(num, sizeof(num), pw.lag_avg_ms, 3));
	evbuffer_add_printf(out, "\"interval_seconds\":%s,",
	    fmt_fixed(num, sizeof(num), pw.interval_avg_ms, 3));
	evbuffer_add_printf(out, "\"interval_target_seconds\":%s}",
	    fmt_fixed(num, sizeof(num), cfg != NULL ?
	    cfg->idle_poll_interval_ms : 0, 3));
	evbuffer_add_printf(out, ",\"clients\":{");
	for (i = 0; i < CLIENT_KIND_COUNT; i++) {
		evbuffer_add_printf(out, "%s", i > 0 ? "," : "");
		json_str(out, client_kind_names[i]);
		evbuffer_add_printf(out, ":%u", counts[i]);
	}
	evbuffer_add_printf(out, "},\"admins\":[");
	for (i = 0; i < agg.n_rows; i++) {
		if (i > 0)
			evbuffer_add(out, ",", 1);
		json_admin(out, &agg, &agg.rows[i], now);
	}
	evbuffer_add_printf(out, "],");
	json_servers(out, cfg, now);
	evbuffer_add(out, ",", 1);
	json_counters(out, stats_get());
	evbuffer_add(out, ",", 1);
	json_reload(out, stats_get());
	evbuffer_add_printf(out, "}\n");
	agg_free(&agg);
	return 0;
}

void
status_render_json(struct evbuffer *out)
{
	if (status_json(out) != 0)
		evbuffer_add_printf(out, "{\"error\":\"out of memory\"}\n");
}

/* ------------------------------------------------ the console's tables */

/* key=value for the console (after sep): the value bare, or quoted as in
 * the log. */
static void
text_kv(struct evbuffer *out, const char *sep, const char *key,
    const char *val)
{
	char buf[600];

	evbuffer_add_printf(out, "%s%s=%s", sep, key, log_value(buf,
	    sizeof(buf), val, strlen(val)));
}

int
status_render_pools(struct evbuffer *out)
{
	const struct config *cfg = st_cfg;
	unsigned max, used, budget = cfg != NULL ? cfg->session_budget : 0;
	struct pool_stats ps;
	struct st_agg agg;
	uint64_t now = util_now_ms();
	bool quarantined;
	char num[32];
	size_t r, k;

	if (agg_collect(&agg, cfg) != 0)
		return -1;
	pool_get_stats(&ps);
	evbuffer_add_printf(out, "budget=%u used=%u free=%u queue=%u "
	    "oldest_wait_seconds=%s paused=%s mode=%s\n", budget, ps.sessions,
	    budget > ps.sessions ? budget - ps.sessions : 0, ps.waiters,
	    fmt_fixed(num, sizeof(num), ps.oldest_wait_ms, 3),
	    pool_is_paused() ? "yes" : "no", cfg != NULL &&
	    cfg->pool_mode == CFG_POOL_SESSION ? "session" : "multiplex");
	for (r = 0; r < agg.n_rows; r++) {
		const struct st_row *row = &agg.rows[r];

		agg_admin_totals(&agg, row, now, &max, &used, &quarantined);
		text_kv(out, "", "admin", row->sr_name);
		evbuffer_add_printf(out, " max_sessions=%u used=%u free=%u", max,
		    used, max > used ? max - used : 0);
		for (k = 0; k < agg.n_states; k++) {
			unsigned n = agg_row_state(&agg, row, k);

			if (n > 0 || pool_state_names[k] != NULL)
				evbuffer_add_printf(out, " %s=%u",
				    agg_state_name(k), n);
		}
		evbuffer_add_printf(out, " quarantined=%s configured=%s\n",
		    quarantined ? "yes" : "no",
		    row->sr_configured ? "yes" : "no");
	}
	agg_free(&agg);
	return 0;
}

int
status_render_servers(struct evbuffer *out)
{
	const struct config *cfg = st_cfg;
	struct st_agg agg;
	uint64_t now = util_now_ms();
	char srv[300];
	size_t i, r, k;

	if (agg_collect(&agg, cfg) != 0)
		return -1;
	for (i = 0; cfg != NULL && i < cfg->n_servers; i++) {
		unsigned n = 0;

		for (r = 0; r < agg.n_rows; r++)
			for (k = 0; k < agg.n_states; k++)
				n += agg.rows[r].sr_cnt[i * agg.n_states + k];
		text_kv(out, "", "server", agg_server_label(&agg, i, srv,
		    sizeof(srv)));
		evbuffer_add_printf(out, " up=%s draining=%s sessions=%u "
		    "consecutive_failures=%u", retry_server_up(i, now) ? "yes" :
		    "no", pool_server_draining(i) ? "yes" : "no", n,
		    retry_server_failures(i));
		text_kv(out, " ", "last_failure", retry_server_last_failure(i));
		evbuffer_add(out, "\n", 1);
	}
	agg_free(&agg);
	return 0;
}

/* -------------------------------------------------------------------- http */

static void
status_reply(struct evhttp_request *req, int code, const char *reason,
    const char *ctype, struct evbuffer *body)
{
	struct evkeyvalq *h = evhttp_request_get_output_headers(req);

	evhttp_add_header(h, "Content-Type", ctype);
	evhttp_add_header(h, "Cache-Control", "no-store");
	evhttp_send_reply(req, code, reason, body);
}

static void
status_request_cb(struct evhttp_request *req, void *arg)
{
	enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
	const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
	const char *path = uri != NULL ? evhttp_uri_get_path(uri) : NULL;
	struct evbuffer *body;
	bool metrics;
	int code = 200, rc;
	char pv[96];

	(void)arg;
	if ((body = evbuffer_new()) == NULL) {
		evhttp_send_error(req, HTTP_INTERNAL, NULL);
		return;
	}
	if (path == NULL || (strcmp(path, "/metrics") != 0 &&
	    strcmp(path, "/status") != 0)) {
		code = HTTP_NOTFOUND;
		evbuffer_add_printf(body, "not found; try /metrics or /status\n");
		status_reply(req, code, "Not Found", CT_TEXT, body);
	} else if (cmd != EVHTTP_REQ_GET && cmd != EVHTTP_REQ_HEAD) {
		code = HTTP_BADMETHOD;
		evhttp_add_header(evhttp_request_get_output_headers(req),
		    "Allow", "GET, HEAD");
		evbuffer_add_printf(body, "method not allowed\n");
		status_reply(req, code, "Method Not Allowed", CT_TEXT, body);
	} else {
		metrics = strcmp(path, "/metrics") == 0;
		rc = metrics ? status_metrics(body) : status_json(body);
		if (rc != 0) {
			code = HTTP_INTERNAL;
			evbuffer_drain(body, evbuffer_get_length(body));
			evbuffer_add_printf(body, "out of memory\n");
			status_reply(req, code, "Internal Server Error",
			    CT_TEXT, body);
		} else
			status_reply(req, code, "OK", metrics ? CT_METRICS :
			    CT_JSON, body);
	}
	evbuffer_free(body);
	log_debug("status_request", "path=%s code=%d",
	    log_value(pv, sizeof(pv), path != NULL ? path : "",
	    path != NULL ? strlen(path) : 0), code);
}

static bool
status_is_loopback(const struct sockaddr *sa)
{
	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;

		return (ntohl(sin->sin_addr.s_addr) >> 24) == 127;
	}
	if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;

		if (IN6_IS_ADDR_LOOPBACK(&s6->sin6_addr))
			return true;
		return IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr) &&
		    s6->sin6_addr.s6_addr[12] == 127;
	}
	return false;
}

int
status_start(struct event_base *base, const struct config *cfg, char *err,
    size_t errlen)
{
	struct addrinfo hints, *res = NULL;
	struct evconnlistener *lev;
	struct sockaddr_storage ss;
	socklen_t sslen = sizeof(ss);
	char want[300], bound[300];
	int rc;

	st_cfg = cfg;
	st_started_ms = util_now_ms();
	if (!cfg->has_status_listen) {
		log_info("status_disabled", "reason=\"status_listen is empty\"");
		return 0;
	}
	if (st_http != NULL) {
		snprintf(err, errlen, "status endpoint already started");
		return -1;
	}
	addr_endpoint_str(&cfg->status_listen, want, sizeof(want));
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
	rc = getaddrinfo(cfg->status_listen.host[0] ? cfg->status_listen.host :
	    NULL, cfg->status_listen.port, &hints, &res);
	if (rc != 0) {
		snprintf(err, errlen, "status_listen: cannot resolve %s: %s",
		    want, gai_strerror(rc));
		return -1;
	}
	if ((st_http = evhttp_new(base)) == NULL) {
		freeaddrinfo(res);
		snprintf(err, errlen, "status_listen: out of memory");
		return -1;
	}
	/* Let every method through to the callback, which answers 405
	 * itself (libevent would say 501 for the ones it filters). */
	evhttp_set_allowed_methods(st_http, EVHTTP_REQ_GET | EVHTTP_REQ_POST |
	    EVHTTP_REQ_HEAD | EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
	    EVHTTP_REQ_OPTIONS | EVHTTP_REQ_TRACE | EVHTTP_REQ_CONNECT |
	    EVHTTP_REQ_PATCH);
	evhttp_set_timeout(st_http, STATUS_TIMEOUT_S);
	evhttp_set_max_headers_size(st_http, STATUS_MAX_HEADERS);
	evhttp_set_max_body_size(st_http, STATUS_MAX_BODY);
	evhttp_set_gencb(st_http, status_request_cb, NULL);
	/* No callback yet: evhttp_bind_listener installs (and enables) it. */
	lev = evconnlistener_new_bind(base, NULL, NULL, LEV_OPT_CLOSE_ON_FREE |
	    LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_EXEC, STATUS_BACKLOG,
	    res->ai_addr, (int)res->ai_addrlen);
	freeaddrinfo(res);
	if (lev == NULL) {
		snprintf(err, errlen, "status_listen: cannot listen on %s: %s",
		    want, strerror(errno));
		evhttp_free(st_http);
		st_http = NULL;
		return -1;
	}
	if (evhttp_bind_listener(st_http, lev) == NULL) {
		evconnlistener_free(lev);
		evhttp_free(st_http);
		st_http = NULL;
		snprintf(err, errlen, "status_listen: out of memory");
		return -1;
	}
	if (getsockname(evconnlistener_get_fd(lev), (struct sockaddr *)&ss,
	    &sslen) != 0) {
		ss.ss_family = AF_UNSPEC;
		snprintf(bound, sizeof(bound), "%s", want);
	} else
		addr_sockaddr_str((struct sockaddr *)&ss, bound, sizeof(bound));
	log_info("status_listening", "addr=%s paths=/metrics,/status", bound);
	if (!status_is_loopback((struct sockaddr *)&ss))
		log_warn("status_not_loopback", "addr=%s reason=\"status_listen "
		    "is not a loopback address: /metrics and /status are "
		    "reachable from other hosts without authentication\"", bound);
	return 0;
}

void
status_set_config(const struct config *cfg)
{
	st_cfg = cfg;
}

void
status_stop(void)
{
	/* Frees the bound listener and any open scrape connection. */
	if (st_http != NULL)
		evhttp_free(st_http);
	st_http = NULL;
}
