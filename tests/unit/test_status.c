/*
 * test_status.c - /metrics and /status rendering, and the HTTP endpoint.
 *
 * status.c only reads other modules, so this file fakes what it reads
 * from pool.c, client.c and retry.c (stats.c, config's struct, addr.c
 * and log.c are the real ones).  Linked against src/libimapshim.a, the
 * fakes here satisfy every pool_/client_/retry_ symbol status.o needs, so
 * the archive's pool.o, client.o and retry.o are never pulled in.
 *
 * The Prometheus output is checked by a strict parser of the text format
 * (HELP/TYPE lines, sample syntax, label escapes, grouping by family,
 * histogram buckets cumulative and ending in +Inf == _count); the JSON by a
 * strict validator (RFC 8259 grammar, UTF-8).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <arpa/inet.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include "client.h"
#include "config.h"
#include "imapshim.h"
#include "pool.h"
#include "retry.h"
#include "stats.h"
#include "status.h"

/* ------------------------------------------------------------- fakes */

#define FAKE_MAX 64

const char *const pool_state_names[] = {
	"login", "idle", "checking", "resetting", "handoff", "leased",
	"closing", NULL
};
const char *const client_kind_names[] = {
	"unauthenticated", "attached", "parked", "waiting",
};

static struct pool_stats fake_ps;
static struct pool_session_info fake_si[FAKE_MAX];
static size_t fake_nsi;
static unsigned fake_admin_used[8];
static unsigned fake_clients[CLIENT_KIND_COUNT];
static bool fake_up[8];
static unsigned fake_failures[8];
static const char *fake_last[8];
static bool fake_quarantined[8];

void
pool_get_stats(struct pool_stats *st)
{
	*st = fake_ps;
}

unsigned
pool_admin_sessions(size_t admin)
{
	return admin < nitems(fake_admin_used) ? fake_admin_used[admin] : 0;
}

void
pool_foreach_session(void (*fn)(const struct pool_session_info *si,
    void *arg), void *arg)
{
	size_t i;

	for (i = 0; i < fake_nsi; i++)
		fn(&fake_si[i], arg);
}

void
client_counts(unsigned counts[CLIENT_KIND_COUNT])
{
	memcpy(counts, fake_clients, sizeof(fake_clients));
}

bool
retry_server_up(size_t server, uint64_t now_ms)
{
	(void)now_ms;
	return server < nitems(fake_up) && fake_up[server];
}

const char *
retry_server_last_failure(size_t server)
{
	return server < nitems(fake_last) && fake_last[server] ? fake_last[server] : "";
}

unsigned
retry_server_failures(size_t server)
{
	return server < nitems(fake_failures) ? fake_failures[server] : 0;
}

unsigned
retry_server_limit(size_t server)
{
	return server == 0 ? 16 : 32;
}

uint64_t
retry_server_overloads(size_t server)
{
	return server == 0 ? 7 : 0;
}

bool
retry_admin_quarantined(size_t admin, uint64_t now_ms)
{
	(void)now_ms;
	return admin < nitems(fake_quarantined) && fake_quarantined[admin];
}

static bool fake_draining[8];
static bool fake_paused;

bool
pool_server_draining(size_t server)
{
	return server < nitems(fake_draining) && fake_draining[server];
}

bool
pool_is_paused(void)
{
	return fake_paused;
}

static bool fake_slowdown;
static size_t fake_negcache;

bool
retry_slowdown(void)
{
	return fake_slowdown;
}

size_t
retry_negcache_size(void)
{
	return fake_negcache;
}

void
retry_negcache_expire(uint64_t now_ms)
{
	(void)now_ms;
}

/* ------------------------------------------------------------ config */

#define PW1 "s3cret-Pa55word-one"
#define PW2 "an0ther\"secret\\two"
/* Names the loader would refuse, to exercise escaping. */
#define ADMIN_Q "Adm\"in\\x\ny"
#define ADMIN_Q_PROM "Adm\\\"in\\\\x\\ny"
#define ADMIN_Q_JSON "Adm\\\"in\\\\x\\u000ay"

static struct config cfg;
static struct config_admin cfg_admins[2];
static struct addr_endpoint cfg_servers[3];

static void
add_session(const char *admin, size_t server, const char *state)
{
	assert_true(fake_nsi < FAKE_MAX);
	fake_si[fake_nsi].admin = admin;
	fake_si[fake_nsi].server = server;
	fake_si[fake_nsi].state = state;
	fake_si[fake_nsi].mailbox = "secret-mailbox-name";
	fake_si[fake_nsi].age_ms = 1000;
	fake_si[fake_nsi].idle_ms = 10;
	fake_nsi++;
}

static int
setup(void **state)
{
	(void)state;
	memset(&cfg, 0, sizeof(cfg));
	memset(cfg_admins, 0, sizeof(cfg_admins));
	memset(cfg_servers, 0, sizeof(cfg_servers));
	cfg_admins[0].name = (char *)"NPUMAdmin1";
	cfg_admins[0].password = (char *)PW1;
	cfg_admins[0].max_sessions = 16;
	cfg_admins[1].name = (char *)ADMIN_Q;
	cfg_admins[1].password = (char *)PW2;
	cfg_admins[1].max_sessions = 7;
	cfg.admins = cfg_admins;
	cfg.n_admins = 2;
	strcpy(cfg_servers[0].host, "cas1.example.com");
	strcpy(cfg_servers[0].port, "993");
	strcpy(cfg_servers[1].host, "::1");
	strcpy(cfg_servers[1].port, "1993");
	cfg.servers = cfg_servers;
	cfg.n_servers = 2;
	cfg.session_budget = 100;
	cfg.pool_mode = CFG_POOL_MULTIPLEX;

	memset(&fake_ps, 0, sizeof(fake_ps));
	fake_nsi = 0;
	memset(fake_admin_used, 0, sizeof(fake_admin_used));
	memset(fake_clients, 0, sizeof(fake_clients));
	memset(fake_up, 0, sizeof(fake_up));
	memset(fake_failures, 0, sizeof(fake_failures));
	memset(fake_last, 0, sizeof(fake_last));
	memset(fake_quarantined, 0, sizeof(fake_quarantined));
	memset(fake_draining, 0, sizeof(fake_draining));
	fake_paused = false;

	/* A busy moment: 6 sessions, one of an admin a reload removed. */
	add_session("NPUMAdmin1", 0, "idle");
	add_session("NPUMAdmin1", 0, "idle");
	add_session("NPUMAdmin1", 0, "leased");
	add_session("NPUMAdmin1", 1, "checking");
	add_session(ADMIN_Q, 1, "login");
	add_session("OldAdmin", 0, "closing");
	fake_admin_used[0] = 4;
	fake_admin_used[1] = 1;
	fake_ps.sessions = 6;
	fake_ps.idle = 2;
	fake_ps.leased = 1;
	fake_ps.connecting = 1;
	fake_ps.waiters = 3;
	fake_ps.oldest_wait_ms = 1250;
	fake_ps.effective_budget = 23;	/* 16 + 7 max_sessions */
	fake_clients[CLIENT_UNAUTHENTICATED] = 2;
	fake_clients[CLIENT_ATTACHED] = 1;
	fake_clients[CLIENT_PARKED] = 5;
	fake_clients[CLIENT_WAITING] = 3;
	fake_up[0] = true;
	fake_up[1] = false;
	fake_failures[1] = 5;
	fake_last[1] = "certificate verify failed: \"expired\"\x01";
	fake_quarantined[1] = true;

	stats_reset();
	stats_upstream_login(STATS_LOGIN_OK);
	stats_upstream_login(STATS_LOGIN_OK);
	stats_upstream_login(STATS_LOGIN_OK);
	stats_upstream_login(STATS_LOGIN_REFUSED);
	stats_upstream_login(STATS_LOGIN_ERROR);
	stats_login_retry(STATS_RETRY_TLS);
	stats_login_retry(STATS_RETRY_LOGIN_TRANSIENT);
	stats_login_retry(STATS_RETRY_LOGIN_TRANSIENT);
	stats_pool_reuse();
	stats_pool_reuse();
	stats_queue_timeout();
	stats_client_refused();
	stats_queue_wait(500);		/* 0.5 ms: le="0.001" */
	stats_queue_wait(1500);		/* le="0.002" */
	stats_queue_wait(40000000);	/* 40 s: +Inf only */
	stats_command(STATS_CMD_FETCH, 3000);
	stats_command(STATS_CMD_FETCH, 7000);
	stats_command(STATS_CMD_UID, 100);
	stats_command(STATS_CMD_OTHER, 2500000);
	status_set_config(&cfg);
	return 0;
}

static int
teardown(void **state)
{
	(void)state;
	status_set_config(NULL);
	stats_reset();
	return 0;
}

static char *
render(void (*fn)(struct evbuffer *))
{
	struct evbuffer *b = evbuffer_new();
	size_t n;
	char *s;

	assert_non_null(b);
	fn(b);
	n = evbuffer_get_length(b);
	s = malloc(n + 1);
	assert_non_null(s);
	evbuffer_remove(b, s, n);
	s[n] = '\0';
	evbuffer_free(b);
	return s;
}

/* -------------------------------------------- strict Prometheus parser */

#define PM_MAX_FAM 64
#define PM_MAX_SAMPLES 2048

struct pm_family {
	char name[128];
	char type[16];
	bool help, typed;
	int n_samples;
};

struct pm_sample {
	char name[128];
	char family[128];
	char labels[512];	/* raw "{...}" content as written, minus le */
	char le[32];		/* "" when none */
	double value;
};

struct pm {
	struct pm_family fam[PM_MAX_FAM];
	int n_fam;
	struct pm_sample s[PM_MAX_SAMPLES];
	int n;
};

static struct pm P;

static bool
pm_name_char(char c, bool first)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
	    c == ':' || (!first && c >= '0' && c <= '9');
}

/* Read a metric (or label, colon=false) name; returns its length or 0. */
static size_t
pm_name(const char *p, char *out, size_t outlen, bool colon)
{
	size_t n = 0;

	while (pm_name_char(p[n], n == 0) && (colon || p[n] != ':')) {
		if (n + 1 >= outlen)
			return 0;
		out[n] = p[n];
		n++;
	}
	out[n] = '\0';
	return n;
}

static struct pm_family *
pm_fam(const char *name)
{
	int i;

	for (i = 0; i < P.n_fam; i++)
		if (strcmp(P.fam[i].name, name) == 0)
			return &P.fam[i];
	return NULL;
}

static bool
pm_value(const char *p, double *v)
{
	char *end;

	if (strcmp(p, "+Inf") == 0) {
		*v = 1e308 * 10;
		return true;
	}
	if (strcmp(p, "-Inf") == 0 || strcmp(p, "NaN") == 0)
		return false;	/* we never emit them */
	if (*p == '\0' || *p == ' ')
		return false;
	*v = strtod(p, &end);
	return *end == '\0';
}

/* Parse one sample line; fails the test on any syntax error. */
static void
pm_sample_line(const char *line, const char **current)
{
	struct pm_sample *s;
	struct pm_family *f;
	const char *p = line;
	char lname[64], base[128];
	size_t n, ll = 0, sl;

	assert_true(P.n < PM_MAX_SAMPLES);
	s = &P.s[P.n];
	memset(s, 0, sizeof(*s));
	n = pm_name(p, s->name, sizeof(s->name), true);
	if (n == 0)
		fail_msg("bad metric name: %s", line);
	p += n;
	if (*p == '{') {
		p++;
		while (*p != '}') {
			char val[256];
			size_t vl = 0;
			bool is_le;

			n = pm_name(p, lname, sizeof(lname), false);
			if (n == 0 || p[n] != '=' || p[n + 1] != '"')
				fail_msg("bad label syntax: %s", line);
			p += n + 2;
			while (*p != '"') {
				if (*p == '\0' || *p == '\n')
					fail_msg("unterminated label value: %s", line);
				if (*p == '\\') {
					if (p[1] != '\\' && p[1] != '"' && p[1] != 'n')
						fail_msg("bad escape in: %s", line);
					if (vl + 2 < sizeof(val)) {
						val[vl++] = p[0];
						val[vl++] = p[1];
					}
					p += 2;
					continue;
				}
				if (vl + 1 < sizeof(val))
					val[vl++] = *p;
				p++;
			}
			val[vl] = '\0';
			p++;
			is_le = strcmp(lname, "le") == 0;
			if (is_le)
				snprintf(s->le, sizeof(s->le), "%.31s", val);
			else
				ll += (size_t)snprintf(s->labels + ll,
				    sizeof(s->labels) - ll, "%s%s=\"%s\"",
				    ll > 0 ? "," : "", lname, val);
			if (*p == ',')
				p++;
			else if (*p != '}')
				fail_msg("expected , or } in: %s", line);
		}
		p++;
	}
	if (*p != ' ')
		fail_msg("no space before value: %s", line);
	p++;
	if (!pm_value(p, &s->value))
		fail_msg("bad value: %s", line);

	/* Which family: the name itself, or a histogram's suffix. */
	snprintf(base, sizeof(base), "%s", s->name);
	f = pm_fam(base);
	if (f == NULL || strcmp(f->type, "histogram") == 0) {
		static const char *const suf[] = { "_bucket", "_sum", "_count" };
		size_t i;

		f = NULL;
		for (i = 0; i < nitems(suf); i++) {
			sl = strlen(suf[i]);
			n = strlen(s->name);
			if (n > sl && strcmp(s->name + n - sl, suf[i]) == 0) {
				snprintf(base, sizeof(base), "%.*s",
				    (int)(n - sl), s->name);
				f = pm_fam(base);
				if (f != NULL && strcmp(f->type, "histogram") != 0)
					f = NULL;
				if (f != NULL && i == 0 && s->le[0] == '\0')
					fail_msg("bucket without le: %s", line);
				if (f != NULL && i != 0 && s->le[0] != '\0')
					fail_msg("le outside _bucket: %s", line);
				break;
			}
		}
	} else if (s->le[0] != '\0')
		fail_msg("le label on a %s: %s", f->type, line);
	if (f == NULL || !f->typed)
		fail_msg("sample of an undeclared family: %s", line);
	if (*current == NULL || strcmp(*current, f->name) != 0)
		fail_msg("sample not grouped under its # TYPE: %s", line);
	snprintf(s->family, sizeof(s->family), "%s", f->name);
	f->n_samples++;
	P.n++;
}

static void
pm_parse(const char *text)
{
	const char *p = text, *nl, *current = NULL;
	char line[2048];

	memset(&P, 0, sizeof(P));
	assert_true(strlen(text) > 0);
	assert_int_equal(text[strlen(text) - 1], '\n');
	while (*p != '\0') {
		nl = strchr(p, '\n');
		assert_non_null(nl);
		assert_true((size_t)(nl - p) < sizeof(line));
		memcpy(line, p, (size_t)(nl - p));
		line[nl - p] = '\0';
		p = nl + 1;
		if (line[0] == '\0')
			fail_msg("empty line in exposition");
		if (strncmp(line, "# HELP ", 7) == 0 ||
		    strncmp(line, "# TYPE ", 7) == 0) {
			bool help = line[2] == 'H';
			char name[128];
			struct pm_family *f;
			size_t n = pm_name(line + 7, name, sizeof(name), true);

			if (n == 0 || line[7 + n] != ' ' || line[8 + n] == '\0')
				fail_msg("bad comment line: %s", line);
			if ((f = pm_fam(name)) == NULL) {
				assert_true(P.n_fam < PM_MAX_FAM);
				f = &P.fam[P.n_fam++];
				snprintf(f->name, sizeof(f->name), "%s", name);
			} else if (f->n_samples > 0)
				fail_msg("HELP/TYPE after samples: %s", line);
			if (help) {
				if (f->help)
					fail_msg("second HELP: %s", line);
				f->help = true;
			} else {
				const char *t = line + 8 + n;

				if (f->typed)
					fail_msg("second TYPE: %s", line);
				if (strcmp(t, "counter") != 0 &&
				    strcmp(t, "gauge") != 0 &&
				    strcmp(t, "histogram") != 0 &&
				    strcmp(t, "summary") != 0 &&
				    strcmp(t, "untyped") != 0)
					fail_msg("bad type: %s", line);
				snprintf(f->type, sizeof(f->type), "%s", t);
				f->typed = true;
			}
			current = f->name;
			continue;
		}
		if (line[0] == '#')
			continue;	/* other comments are allowed */
		pm_sample_line(line, &current);
	}
}

/* The value of name{labels} (labels as written, le excluded); fails when
 * absent or duplicated. */
static double
pm_get(const char *name, const char *labels, const char *le)
{
	int i, found = -1;

	for (i = 0; i < P.n; i++)
		if (strcmp(P.s[i].name, name) == 0 &&
		    strcmp(P.s[i].labels, labels) == 0 &&
		    strcmp(P.s[i].le, le != NULL ? le : "") == 0) {
			if (found >= 0)
				fail_msg("duplicate series %s{%s}", name, labels);
			found = i;
		}
	if (found < 0)
		fail_msg("missing series %s{%s}%s%s", name, labels,
		    le ? " le=" : "", le ? le : "");
	return P.s[found].value;
}

static bool
pm_has(const char *name, const char *labels)
{
	int i;

	for (i = 0; i < P.n; i++)
		if (strcmp(P.s[i].name, name) == 0 &&
		    strcmp(P.s[i].labels, labels) == 0)
			return true;
	return false;
}

/* Every series unique; every histogram's buckets cumulative, ending in
 * +Inf == _count, with ascending le bounds. */
static void
pm_check_consistency(void)
{
	int i, j;

	for (i = 0; i < P.n; i++)
		for (j = i + 1; j < P.n; j++)
			if (strcmp(P.s[i].name, P.s[j].name) == 0 &&
			    strcmp(P.s[i].labels, P.s[j].labels) == 0 &&
			    strcmp(P.s[i].le, P.s[j].le) == 0)
				fail_msg("duplicate series %s{%s}", P.s[i].name,
				    P.s[i].labels);
	for (i = 0; i < P.n; i++) {
		char cname[160];
		double prev_le = -1, prev_v = -1, v;
		bool inf = false;

		if (P.s[i].le[0] == '\0' || (i > 0 &&
		    strcmp(P.s[i - 1].name, P.s[i].name) == 0 &&
		    strcmp(P.s[i - 1].labels, P.s[i].labels) == 0))
			continue;
		/* First bucket of a series: walk its buckets. */
		for (j = i; j < P.n && strcmp(P.s[j].name, P.s[i].name) == 0 &&
		    strcmp(P.s[j].labels, P.s[i].labels) == 0; j++) {
			double le;

			assert_false(inf);
			assert_true(pm_value(P.s[j].le, &le));
			if (strcmp(P.s[j].le, "+Inf") == 0)
				inf = true;
			if (le <= prev_le)
				fail_msg("le not ascending in %s{%s}",
				    P.s[i].name, P.s[i].labels);
			if (P.s[j].value < prev_v)
				fail_msg("buckets not cumulative in %s{%s}",
				    P.s[i].name, P.s[i].labels);
			prev_le = le;
			prev_v = P.s[j].value;
		}
		if (!inf)
			fail_msg("no +Inf bucket in %s{%s}", P.s[i].name,
			    P.s[i].labels);
		snprintf(cname, sizeof(cname), "%s", P.s[i].family);
		strcat(cname, "_count");
		v = pm_get(cname, P.s[i].labels, NULL);
		assert_true(v == prev_v);
		strcpy(cname + strlen(P.s[i].family), "_sum");
		(void)pm_get(cname, P.s[i].labels, NULL);
	}
}

/* ------------------------------------------------- strict JSON checker */

static const char *jv_value(const char *p, int depth);

static const char *
jv_ws(const char *p)
{
	while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
		p++;
	return p;
}

static const char *
jv_string(const char *p)
{
	const unsigned char *u;

	if (*p++ != '"')
		return NULL;
	while (*p != '"') {
		u = (const unsigned char *)p;
		if (*u < 0x20)
			return NULL;
		if (*p == '\\') {
			p++;
			if (*p == 'u') {
				int i;

				for (i = 1; i <= 4; i++)
					if (!((p[i] >= '0' && p[i] <= '9') ||
					    (p[i] >= 'a' && p[i] <= 'f') ||
					    (p[i] >= 'A' && p[i] <= 'F')))
						return NULL;
				p += 5;
			} else if (*p != '\0' && strchr("\"\\/bfnrt", *p) != NULL)
				p++;
			else
				return NULL;
			continue;
		}
		if (*u >= 0x80) {
			/* UTF-8: lead byte, then its continuation bytes. */
			int k = *u >= 0xf0 && *u <= 0xf4 ? 3 : *u >= 0xe0 &&
			    *u <= 0xef ? 2 : *u >= 0xc2 && *u <= 0xdf ? 1 : -1, i;

			if (k < 0)
				return NULL;
			for (i = 1; i <= k; i++)
				if ((u[i] & 0xc0) != 0x80)
					return NULL;
			p += k + 1;
			continue;
		}
		p++;
	}
	return p + 1;
}

static const char *
jv_number(const char *p)
{
	if (*p == '-')
		p++;
	if (*p == '0')
		p++;
	else if (*p >= '1' && *p <= '9')
		while (*p >= '0' && *p <= '9')
			p++;
	else
		return NULL;
	if (*p == '.') {
		p++;
		if (!(*p >= '0' && *p <= '9'))
			return NULL;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	if (*p == 'e' || *p == 'E') {
		p++;
		if (*p == '+' || *p == '-')
			p++;
		if (!(*p >= '0' && *p <= '9'))
			return NULL;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	return p;
}

static const char *
jv_value(const char *p, int depth)
{
	if (depth > 32)
		return NULL;
	p = jv_ws(p);
	switch (*p) {
	case '{':
		p = jv_ws(p + 1);
		if (*p == '}')
			return p + 1;
		for (;;) {
			p = jv_string(jv_ws(p));
			if (p == NULL)
				return NULL;
			p = jv_ws(p);
			if (*p++ != ':')
				return NULL;
			if ((p = jv_value(p, depth + 1)) == NULL)
				return NULL;
			p = jv_ws(p);
			if (*p == '}')
				return p + 1;
			if (*p++ != ',')
				return NULL;
		}
	case '[':
		p = jv_ws(p + 1);
		if (*p == ']')
			return p + 1;
		for (;;) {
			if ((p = jv_value(p, depth + 1)) == NULL)
				return NULL;
			p = jv_ws(p);
			if (*p == ']')
				return p + 1;
			if (*p++ != ',')
				return NULL;
		}
	case '"':
		return jv_string(p);
	case 't':
		return strncmp(p, "true", 4) == 0 ? p + 4 : NULL;
	case 'f':
		return strncmp(p, "false", 5) == 0 ? p + 5 : NULL;
	case 'n':
		return strncmp(p, "null", 4) == 0 ? p + 4 : NULL;
	default:
		return jv_number(p);
	}
}

static void
assert_json(const char *s)
{
	const char *end = jv_value(s, 0);

	if (end == NULL)
		fail_msg("invalid JSON: %s", s);
	if (*jv_ws(end) != '\0')
		fail_msg("trailing bytes after JSON: %s", end);
}

#define assert_contains(hay, needle) do { \
	if (strstr((hay), (needle)) == NULL) \
		fail_msg("missing %s", (needle)); \
} while (0)

/* ------------------------------------------------------------- tests */

static const struct {
	const char *name, *type;
} required[] = {
	{ "imapshim_clients", "gauge" },
	{ "imapshim_upstream_sessions", "gauge" },
	{ "imapshim_session_budget", "gauge" },
	{ "imapshim_admin_max_sessions", "gauge" },
	{ "imapshim_queue_length", "gauge" },
	{ "imapshim_queue_oldest_wait_seconds", "gauge" },
	{ "imapshim_upstream_logins_total", "counter" },
	{ "imapshim_login_retries_total", "counter" },
	{ "imapshim_pool_reuse_total", "counter" },
	{ "imapshim_queue_wait_seconds", "histogram" },
	{ "imapshim_queue_timeouts_total", "counter" },
	{ "imapshim_server_up", "gauge" },
	{ "imapshim_server_draining", "gauge" },
	{ "imapshim_upstream_overload_total", "counter" },
	{ "imapshim_upstream_logins_in_flight_limit", "gauge" },
	{ "imapshim_paused", "gauge" },
	{ "imapshim_admin_quarantined", "gauge" },
	{ "imapshim_command_seconds", "histogram" },
	{ "imapshim_clients_refused_total", "counter" },
	{ "imapshim_build_info", "gauge" },
};

static void
test_metrics_families(void **state)
{
	char *m = render(status_render_metrics);
	size_t i;

	(void)state;
	pm_parse(m);
	pm_check_consistency();
	for (i = 0; i < nitems(required); i++) {
		struct pm_family *f = pm_fam(required[i].name);

		if (f == NULL || !f->help || !f->typed)
			fail_msg("family %s lacks HELP or TYPE", required[i].name);
		if (strcmp(f->type, required[i].type) != 0)
			fail_msg("%s is a %s", required[i].name, f->type);
		if (f->n_samples == 0)
			fail_msg("%s has no samples", required[i].name);
	}
	for (i = 0; i < (size_t)P.n_fam; i++)
		assert_true(strncmp(P.fam[i].name, "imapshim_", 9) == 0);
	assert_null(strstr(m, PW1));
	assert_null(strstr(m, "secret\\\"secret"));
	assert_null(strstr(m, "an0ther"));
	assert_null(strstr(m, "secret-mailbox-name"));
	free(m);
}

static void
test_metrics_values(void **state)
{
	char *m = render(status_render_metrics);
	int i;
	double sum = 0;

	(void)state;
	pm_parse(m);
	assert_true(pm_get("imapshim_clients", "state=\"unauthenticated\"", NULL) == 2);
	assert_true(pm_get("imapshim_clients", "state=\"attached\"", NULL) == 1);
	assert_true(pm_get("imapshim_clients", "state=\"parked\"", NULL) == 5);
	assert_true(pm_get("imapshim_clients", "state=\"waiting\"", NULL) == 3);
	assert_true(pm_get("imapshim_session_budget", "", NULL) == 100);
	assert_true(pm_get("imapshim_pool_effective_budget", "", NULL) == 23);
	assert_true(pm_get("imapshim_queue_length", "", NULL) == 3);
	assert_true(pm_get("imapshim_queue_oldest_wait_seconds", "", NULL) == 1.25);
	assert_true(pm_get("imapshim_upstream_logins_total", "result=\"ok\"", NULL) == 3);
	assert_true(pm_get("imapshim_upstream_logins_total", "result=\"refused\"", NULL) == 1);
	assert_true(pm_get("imapshim_upstream_logins_total", "result=\"error\"", NULL) == 1);
	for (i = 0; i < STATS_RETRY_COUNT; i++) {
		char l[64];

		snprintf(l, sizeof(l), "reason=\"%s\"", stats_retry_reason_names[i]);
		assert_true(pm_get("imapshim_login_retries_total", l, NULL) ==
		    (i == STATS_RETRY_LOGIN_TRANSIENT ? 2 : i == STATS_RETRY_TLS ? 1 : 0));
	}
	assert_true(pm_get("imapshim_pool_reuse_total", "", NULL) == 2);
	assert_true(pm_get("imapshim_queue_timeouts_total", "", NULL) == 1);
	assert_true(pm_get("imapshim_clients_refused_total", "", NULL) == 1);
	assert_true(pm_get("imapshim_build_info", "version=\"" PACKAGE_VERSION "\"", NULL) == 1);

	/* Servers as written: IPv6 literal in brackets. */
	assert_true(pm_get("imapshim_server_up", "server=\"cas1.example.com:993\"", NULL) == 1);
	assert_true(pm_get("imapshim_server_up", "server=\"[::1]:1993\"", NULL) == 0);
	assert_true(pm_get("imapshim_server_draining", "server=\"[::1]:1993\"", NULL) == 0);
	assert_true(pm_get("imapshim_upstream_overload_total",
	    "server=\"cas1.example.com:993\"", NULL) == 7);
	assert_true(pm_get("imapshim_upstream_logins_in_flight_limit",
	    "server=\"[::1]:1993\"", NULL) == 32);
	assert_true(pm_get("imapshim_paused", "", NULL) == 0);
	assert_true(pm_get("imapshim_admin_quarantined", "admin=\"NPUMAdmin1\"", NULL) == 0);
	assert_true(pm_get("imapshim_admin_quarantined", "admin=\"" ADMIN_Q_PROM "\"", NULL) == 1);
	assert_true(pm_get("imapshim_admin_max_sessions", "admin=\"NPUMAdmin1\"", NULL) == 16);
	assert_true(pm_get("imapshim_admin_max_sessions", "admin=\"" ADMIN_Q_PROM "\"", NULL) == 7);
	/* The escaped line itself, byte for byte. */
	assert_contains(m, "imapshim_admin_max_sessions{admin=\"Adm\\\"in\\\\x\\ny\"} 7\n");

	/* Sessions: counted per admin x server x state. */
	assert_true(pm_get("imapshim_upstream_sessions",
	    "admin=\"NPUMAdmin1\",server=\"cas1.example.com:993\",state=\"idle\"", NULL) == 2);
	assert_true(pm_get("imapshim_upstream_sessions",
	    "admin=\"NPUMAdmin1\",server=\"cas1.example.com:993\",state=\"leased\"", NULL) == 1);
	assert_true(pm_get("imapshim_upstream_sessions",
	    "admin=\"NPUMAdmin1\",server=\"[::1]:1993\",state=\"checking\"", NULL) == 1);
	assert_true(pm_get("imapshim_upstream_sessions",
	    "admin=\"" ADMIN_Q_PROM "\",server=\"[::1]:1993\",state=\"login\"", NULL) == 1);
	assert_true(pm_get("imapshim_upstream_sessions",
	    "admin=\"OldAdmin\",server=\"cas1.example.com:993\",state=\"closing\"", NULL) == 1);
	/* Zero series for every configured admin x server x base state. */
	{
		static const char *const admins[] = { "NPUMAdmin1", ADMIN_Q_PROM };
		static const char *const servers[] = { "cas1.example.com:993", "[::1]:1993" };
		static const char *const states[] = { "login", "idle", "leased" };
		size_t a, s, t;
		char l[256];

		for (a = 0; a < 2; a++)
			for (s = 0; s < 2; s++)
				for (t = 0; t < 3; t++) {
					snprintf(l, sizeof(l), "admin=\"%s\",server=\"%s\","
					    "state=\"%s\"", admins[a], servers[s], states[t]);
					(void)pm_get("imapshim_upstream_sessions", l, NULL);
				}
	}
	/* No zero series for the other states, nor for OldAdmin. */
	assert_false(pm_has("imapshim_upstream_sessions",
	    "admin=\"NPUMAdmin1\",server=\"cas1.example.com:993\",state=\"handoff\""));
	assert_false(pm_has("imapshim_upstream_sessions",
	    "admin=\"OldAdmin\",server=\"cas1.example.com:993\",state=\"idle\""));
	for (i = 0; i < P.n; i++)
		if (strcmp(P.s[i].name, "imapshim_upstream_sessions") == 0)
			sum += P.s[i].value;
	assert_true(sum == 6);

	/* Queue wait: 0.5 ms, 1.5 ms, 40 s. */
	assert_true(pm_get("imapshim_queue_wait_seconds_bucket", "", "0.001") == 1);
	assert_true(pm_get("imapshim_queue_wait_seconds_bucket", "", "0.002") == 2);
	assert_true(pm_get("imapshim_queue_wait_seconds_bucket", "", "30") == 2);
	assert_true(pm_get("imapshim_queue_wait_seconds_bucket", "", "+Inf") == 3);
	assert_true(pm_get("imapshim_queue_wait_seconds_count", "", NULL) == 3);
	assert_contains(m, "imapshim_queue_wait_seconds_sum 40.002\n");
	assert_contains(m, "imapshim_queue_wait_seconds_bucket{le=\"2.5\"} 2\n");

	/* Commands: lower-case labels; unused commands have no series. */
	assert_true(pm_get("imapshim_command_seconds_count", "command=\"fetch\"", NULL) == 2);
	assert_true(pm_get("imapshim_command_seconds_bucket", "command=\"fetch\"", "0.005") == 1);
	assert_true(pm_get("imapshim_command_seconds_bucket", "command=\"fetch\"", "0.01") == 2);
	assert_true(pm_get("imapshim_command_seconds_count", "command=\"uid\"", NULL) == 1);
	assert_true(pm_get("imapshim_command_seconds_count", "command=\"other\"", NULL) == 1);
	assert_contains(m, "imapshim_command_seconds_sum{command=\"fetch\"} 0.01\n");
	assert_false(pm_has("imapshim_command_seconds_count", "command=\"append\""));
	assert_null(strstr(m, "command=\"FETCH\""));
	pm_check_consistency();
	free(m);
}

static void
test_metrics_utf8(void **state)
{
	char *m;

	(void)state;
	cfg_admins[0].name = (char *)"Z\xc3\xbcrich";		/* valid UTF-8 */
	cfg_admins[1].name = (char *)"bad\xff\xc3(";		/* invalid */
	fake_nsi = 0;
	m = render(status_render_metrics);
	pm_parse(m);
	assert_true(pm_get("imapshim_admin_max_sessions", "admin=\"Z\xc3\xbcrich\"", NULL) == 16);
	assert_true(pm_get("imapshim_admin_max_sessions",
	    "admin=\"bad\xef\xbf\xbd\xef\xbf\xbd(\"", NULL) == 7);
	free(m);
	m = render(status_render_json);
	assert_json(m);
	assert_contains(m, "\"name\":\"Z\xc3\xbcrich\"");
	assert_contains(m, "\"name\":\"bad\\ufffd\\ufffd(\"");
	free(m);
}

static void
test_metrics_no_config(void **state)
{
	char *m;
	size_t i;

	(void)state;
	status_set_config(NULL);
	fake_nsi = 0;
	m = render(status_render_metrics);
	pm_parse(m);
	pm_check_consistency();
	for (i = 0; i < nitems(required); i++) {
		struct pm_family *f = pm_fam(required[i].name);

		assert_non_null(f);
		assert_true(f->help && f->typed);
	}
	free(m);
	m = render(status_render_json);
	assert_json(m);
	free(m);
}

static char *
render_table(int (*fn)(struct evbuffer *))
{
	struct evbuffer *b = evbuffer_new();
	size_t n;
	char *s;

	assert_non_null(b);
	assert_int_equal(fn(b), 0);
	n = evbuffer_get_length(b);
	s = malloc(n + 1);
	assert_non_null(s);
	evbuffer_remove(b, s, n);
	s[n] = '\0';
	evbuffer_free(b);
	return s;
}

/* The console's "show pools" and "show servers": the same numbers as
 * /status, one key=value line per item. */
static void
test_console_tables(void **state)
{
	char *t;

	(void)state;
	fake_paused = true;
	fake_draining[1] = true;
	t = render_table(status_render_pools);
	assert_contains(t, "budget=100 used=6 free=94 queue=3 "
	    "oldest_wait_seconds=1.25 paused=yes mode=multiplex\n");
	assert_contains(t, "admin=NPUMAdmin1 max_sessions=16 used=4 free=12 "
	    "login=0 idle=2 checking=1 resetting=0 handoff=0 leased=1 "
	    "closing=0 quarantined=no configured=yes\n");
	/* A name with a quote and a line break stays one quoted value. */
	assert_contains(t, "admin=\"Adm\\\"in\\\\x\\x0ay\" max_sessions=7 used=1");
	assert_contains(t, "admin=OldAdmin max_sessions=0 used=1 free=0 login=0 "
	    "idle=0 checking=0 resetting=0 handoff=0 leased=0 closing=1 "
	    "quarantined=no configured=no\n");
	assert_null(strstr(t, "secret-mailbox-name"));
	free(t);
	t = render_table(status_render_servers);
	assert_contains(t, "server=cas1.example.com:993 up=yes draining=no "
	    "sessions=4 consecutive_failures=0 last_failure=\"\"\n");
	assert_contains(t, "server=[::1]:1993 up=no draining=yes sessions=2 "
	    "consecutive_failures=5 last_failure=\"certificate verify failed: "
	    "\\\"expired\\\"\\x01\"\n");
	free(t);
}

static void
test_json(void **state)
{
	char *j = render(status_render_json);

	(void)state;
	assert_json(j);
	assert_contains(j, "{\"version\":\"" PACKAGE_VERSION "\",\"uptime_seconds\":");
	assert_contains(j, "\"mode\":\"multiplex\"");
	assert_contains(j, "\"budget\":{\"total\":100,\"used\":6,\"free\":94,"
	    "\"effective\":23}");
	assert_contains(j, "\"queue\":{\"length\":3,\"oldest_wait_seconds\":1.25}");
	assert_contains(j, "\"clients\":{\"unauthenticated\":2,\"attached\":1,"
	    "\"parked\":5,\"waiting\":3}");
	assert_contains(j, "{\"name\":\"NPUMAdmin1\",\"max_sessions\":16,"
	    "\"sessions\":{\"login\":0,\"idle\":2,\"checking\":1,\"resetting\":0,"
	    "\"handoff\":0,\"leased\":1,\"closing\":0},\"used\":4,\"free\":12,"
	    "\"quarantined\":false,\"configured\":true}");
	assert_contains(j, "{\"name\":\"" ADMIN_Q_JSON "\",\"max_sessions\":7,"
	    "\"sessions\":{\"login\":1,");
	assert_contains(j, "\"used\":1,\"free\":6,\"quarantined\":true");
	assert_contains(j, "{\"name\":\"OldAdmin\",\"max_sessions\":0,");
	assert_contains(j, "\"configured\":false}");
	assert_contains(j, "\"paused\":false,");
	assert_contains(j, "{\"server\":\"cas1.example.com:993\",\"up\":true,"
	    "\"draining\":false,"
	    "\"consecutive_failures\":0,\"last_failure\":null}");
	assert_contains(j, "{\"server\":\"[::1]:1993\",\"up\":false,"
	    "\"draining\":false,\"consecutive_failures\":5,\"last_failure\":\"certificate verify "
	    "failed: \\\"expired\\\"\\u0001\"}");
	assert_contains(j, "\"counters\":{\"logins\":{\"ok\":3,\"refused\":1,"
	    "\"error\":1},\"reuse\":2,\"queue_timeouts\":1");
	assert_contains(j, "\"login_transient\":2");
	assert_null(strstr(j, PW1));
	assert_null(strstr(j, "an0ther"));
	assert_null(strstr(j, "secret-mailbox-name"));
	free(j);

	cfg.pool_mode = CFG_POOL_SESSION;
	cfg.session_budget = 4;		/* a reload lowered it below use */
	fake_paused = true;
	fake_draining[0] = true;
	j = render(status_render_json);
	assert_json(j);
	assert_contains(j, "\"paused\":true,");
	assert_contains(j, "{\"server\":\"cas1.example.com:993\",\"up\":true,"
	    "\"draining\":true,");
	assert_contains(j, "\"mode\":\"session\"");
	assert_contains(j, "\"budget\":{\"total\":4,\"used\":6,\"free\":0,");
	free(j);
}

static void
test_json_validator(void **state)
{
	(void)state;
	/* The checker must itself reject what a sloppy renderer might emit. */
	assert_null(jv_value("{\"a\":1,}", 0));
	assert_null(jv_value("{\"a\":01}", 0));
	assert_null(jv_value("[\"a\x01\"]", 0));
	assert_null(jv_value("[\"\\x\"]", 0));
	assert_null(jv_value("[\"\xff\"]", 0));
	assert_null(jv_value("{a:1}", 0));
	assert_non_null(jv_value("{\"a\":[1,2.5,-3e2,true,null,\"\\u00e9\"]}", 0));
}

/* ------------------------------------------------------------ HTTP */

struct http_result {
	struct event_base *base;
	int code;
	char ctype[128];
	char allow[64];
	char *body;
	size_t len;
	bool done;
};

static void
http_done_cb(struct evhttp_request *req, void *arg)
{
	struct http_result *r = arg;
	struct evbuffer *in;
	const char *h;

	r->done = true;
	event_base_loopbreak(r->base);
	if (req == NULL)
		return;
	r->code = evhttp_request_get_response_code(req);
	h = evhttp_find_header(evhttp_request_get_input_headers(req), "Content-Type");
	snprintf(r->ctype, sizeof(r->ctype), "%s", h != NULL ? h : "");
	h = evhttp_find_header(evhttp_request_get_input_headers(req), "Allow");
	snprintf(r->allow, sizeof(r->allow), "%s", h != NULL ? h : "");
	in = evhttp_request_get_input_buffer(req);
	r->len = evbuffer_get_length(in);
	r->body = malloc(r->len + 1);
	assert_non_null(r->body);
	evbuffer_remove(in, r->body, r->len);
	r->body[r->len] = '\0';
}

static void
http_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	event_base_loopbreak(arg);
}

static void
http_do_host(struct event_base *base, const char *host, int port,
    enum evhttp_cmd_type cmd, const char *path, struct http_result *r)
{
	struct evhttp_connection *c;
	struct evhttp_request *req;
	struct event *to;
	struct timeval tv = { 5, 0 };

	memset(r, 0, sizeof(*r));
	r->base = base;
	c = evhttp_connection_base_new(base, NULL, host, (unsigned short)port);
	assert_non_null(c);
	req = evhttp_request_new(http_done_cb, r);
	assert_non_null(req);
	evhttp_add_header(evhttp_request_get_output_headers(req), "Host", "localhost");
	assert_int_equal(evhttp_make_request(c, req, cmd, path), 0);
	to = evtimer_new(base, http_timeout_cb, base);
	evtimer_add(to, &tv);
	while (!r->done && event_base_dispatch(base) >= 0 && !r->done &&
	    !event_base_got_break(base))
		;
	event_free(to);
	evhttp_connection_free(c);
	if (!r->done)
		fail_msg("no HTTP answer for %s", path);
}

static void
http_do(struct event_base *base, int port, enum evhttp_cmd_type cmd,
    const char *path, struct http_result *r)
{
	http_do_host(base, "127.0.0.1", port, cmd, path, r);
}

static int
free_port(void)
{
	struct sockaddr_in sin;
	socklen_t len = sizeof(sin);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port;

	assert_true(fd >= 0);
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
	assert_int_equal(getsockname(fd, (struct sockaddr *)&sin, &len), 0);
	port = ntohs(sin.sin_port);
	close(fd);
	return port;
}

static void
test_http(void **state)
{
	struct event_base *base = event_base_new();
	struct http_result r;
	char err[256] = "";
	int port = free_port();

	(void)state;
	assert_non_null(base);
	cfg.has_status_listen = true;
	strcpy(cfg.status_listen.host, "127.0.0.1");
	snprintf(cfg.status_listen.port, sizeof(cfg.status_listen.port), "%d", port);
	if (status_start(base, &cfg, err, sizeof(err)) != 0)
		fail_msg("status_start: %s", err);

	http_do(base, port, EVHTTP_REQ_GET, "/metrics", &r);
	assert_int_equal(r.code, 200);
	assert_string_equal(r.ctype, "text/plain; version=0.0.4; charset=utf-8");
	pm_parse(r.body);
	pm_check_consistency();
	assert_true(pm_get("imapshim_session_budget", "", NULL) == 100);
	free(r.body);

	http_do(base, port, EVHTTP_REQ_GET, "/status?pretty=0", &r);
	assert_int_equal(r.code, 200);
	assert_string_equal(r.ctype, "application/json");
	assert_json(r.body);
	assert_contains(r.body, "\"budget\":{\"total\":100,");
	free(r.body);

	http_do(base, port, EVHTTP_REQ_HEAD, "/status", &r);
	assert_int_equal(r.code, 200);
	assert_int_equal(r.len, 0);
	free(r.body);

	http_do(base, port, EVHTTP_REQ_GET, "/", &r);
	assert_int_equal(r.code, 404);
	free(r.body);
	http_do(base, port, EVHTTP_REQ_GET, "/metricsx", &r);
	assert_int_equal(r.code, 404);
	free(r.body);

	http_do(base, port, EVHTTP_REQ_POST, "/metrics", &r);
	assert_int_equal(r.code, 405);
	assert_string_equal(r.allow, "GET, HEAD");
	free(r.body);
	http_do(base, port, EVHTTP_REQ_DELETE, "/status", &r);
	assert_int_equal(r.code, 405);
	free(r.body);
	http_do(base, port, EVHTTP_REQ_PATCH, "/status", &r);
	assert_int_equal(r.code, 405);
	free(r.body);

	/* A second start is refused; stop frees everything (ASan). */
	assert_int_equal(status_start(base, &cfg, err, sizeof(err)), -1);
	status_stop();
	status_stop();
	event_base_free(base);
}

/* IPv6 loopback, where the host has it. */
static void
test_http_ipv6(void **state)
{
	struct event_base *base;
	struct sockaddr_in6 sin6;
	struct http_result r;
	socklen_t len = sizeof(sin6);
	char err[256] = "";
	int fd, port;

	(void)state;
	fd = socket(AF_INET6, SOCK_STREAM, 0);
	memset(&sin6, 0, sizeof(sin6));
	sin6.sin6_family = AF_INET6;
	sin6.sin6_addr = in6addr_loopback;
	if (fd < 0 || bind(fd, (struct sockaddr *)&sin6, sizeof(sin6)) != 0 ||
	    getsockname(fd, (struct sockaddr *)&sin6, &len) != 0) {
		if (fd >= 0)
			close(fd);
		skip();
	}
	port = ntohs(sin6.sin6_port);
	close(fd);
	base = event_base_new();
	assert_non_null(base);
	cfg.has_status_listen = true;
	strcpy(cfg.status_listen.host, "::1");
	snprintf(cfg.status_listen.port, sizeof(cfg.status_listen.port), "%d", port);
	if (status_start(base, &cfg, err, sizeof(err)) != 0)
		fail_msg("status_start: %s", err);
	http_do_host(base, "::1", port, EVHTTP_REQ_GET, "/status", &r);
	assert_int_equal(r.code, 200);
	assert_json(r.body);
	free(r.body);
	status_stop();
	event_base_free(base);
}

static void
test_http_bind_errors(void **state)
{
	struct event_base *base = event_base_new();
	char err[256] = "";
	int fd, port = free_port(), one = 1;
	struct sockaddr_in sin;

	(void)state;
	assert_non_null(base);
	/* Disabled: nothing bound, success. */
	cfg.has_status_listen = false;
	assert_int_equal(status_start(base, &cfg, err, sizeof(err)), 0);
	status_stop();

	/* The port is taken: an error naming the address. */
	fd = socket(AF_INET, SOCK_STREAM, 0);
	assert_true(fd >= 0);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	sin.sin_port = htons((unsigned short)port);
	assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
	assert_int_equal(listen(fd, 1), 0);
	cfg.has_status_listen = true;
	strcpy(cfg.status_listen.host, "127.0.0.1");
	snprintf(cfg.status_listen.port, sizeof(cfg.status_listen.port), "%d", port);
	assert_int_equal(status_start(base, &cfg, err, sizeof(err)), -1);
	assert_non_null(strstr(err, "127.0.0.1"));
	close(fd);
	status_stop();

	/* Unresolvable host. */
	strcpy(cfg.status_listen.host, "no-such-host.invalid");
	assert_int_equal(status_start(base, &cfg, err, sizeof(err)), -1);
	status_stop();
	event_base_free(base);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_json_validator),
		cmocka_unit_test_setup_teardown(test_metrics_families, setup, teardown),
		cmocka_unit_test_setup_teardown(test_metrics_values, setup, teardown),
		cmocka_unit_test_setup_teardown(test_metrics_utf8, setup, teardown),
		cmocka_unit_test_setup_teardown(test_metrics_no_config, setup, teardown),
		cmocka_unit_test_setup_teardown(test_json, setup, teardown),
		cmocka_unit_test_setup_teardown(test_console_tables, setup,
		    teardown),
		cmocka_unit_test_setup_teardown(test_http, setup, teardown),
		cmocka_unit_test_setup_teardown(test_http_ipv6, setup, teardown),
		cmocka_unit_test_setup_teardown(test_http_bind_errors, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
