/*
 * config.c - the ini file: keys, defaults, validation.
 *
 * One table (cfg_keys[]) names every key: its section, setter, offset and
 * default.  Defaults go through the same setters as the file's values.
 *
 * Debian's libinih gives the handler no line number, cuts lines at 200 bytes
 * and treats " ;" as a comment.  So we feed it through our own reader
 * (cfg_reader), which counts lines, refuses over-long ones, mirrors inih's
 * classification of each line (comment, continuation, [section], key) and
 * warns about an inline password holding ';'.  The handler runs right after
 * the reader returned its line, so st->line is the handler's line.
 *
 * Errors are collected, never just the first: "FILE:LINE: [sect] key: what".
 * A value given for a password never appears in any message.
 *
 * check_files: password_file is ALWAYS read when it can be (the daemon needs
 * the password to run); check_files only adds the filesystem checks: mode of
 * the config file and of every password_file (no group/other access), that
 * password_file could be read at all, that the TLS certificate, key and CA
 * files are readable, and that "user" exists.  With check_files false (unit
 * tests, example files) an unreadable password_file leaves password NULL.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1	/* getline(), strcasecmp() under -std=c11 */
#endif
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <ini.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/prov_ssl.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include "imapshim.h"
#include "util.h"

#define MS_S	1000ULL
#define MS_M	(60 * MS_S)
#define MS_H	(60 * MS_M)

enum cfg_sect {
	CFG_S_NONE,		/* before any [section] */
	CFG_S_SHIM,
	CFG_S_UPSTREAM,
	CFG_S_POOL,
	CFG_S_RETRY,
	CFG_S_ADMIN,
	CFG_S_SKIP,		/* unknown or broken section: keys ignored */
	CFG_S_COUNT
};

static const char *const cfg_sect_names[] = {
	"", "shim", "upstream", "pool", "retry", "admin", "?"
};
_Static_assert(nitems(cfg_sect_names) == CFG_S_COUNT, "names out of sync");

#define CFG_F_LIST	0x1	/* indented continuation lines append */
#define CFG_F_CLIENT	0x2	/* format: the client's, placeholders apart */

struct cfg_key;
/* Set one value.  base is a struct config, or a struct config_admin for
 * [admin] keys.  append: a continuation line of a list.  Returns 0, or -1
 * with a reason in err (never holding a secret). */
typedef int (*cfg_setter)(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen);

struct cfg_key {
	enum cfg_sect sect;
	const char *name;
	cfg_setter set;
	size_t off;		/* the value */
	const char *def;	/* NULL: no default (admin password keys) */
	uint64_t min, max;	/* numbers, sizes and durations */
	size_t aux;		/* has_ flag or element count offset */
	unsigned flags;
	const char *why;	/* replaces the generic range message */
};

static int cfg_set_endpoint_opt(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_servers(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_cidrs(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_strlist(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_str(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_str_opt(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_log_target(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_socket_path(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_secret(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_format(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_bool(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_uint(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_size64(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_duration(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_tls_version(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_tls_mode(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_pool_mode(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);
static int cfg_set_log_level(const struct cfg_key *, void *, const char *,
    bool, char *, size_t);

#define C(f)	offsetof(struct config, f)
#define A(f)	offsetof(struct config_admin, f)

#define K_EP(s, n, f, d) \
	{ .sect = s, .name = n, .set = cfg_set_endpoint_opt, .off = C(f), \
	  .def = d, .aux = C(has_##f) }
#define K_SET(s, n, fn, f, d) \
	{ .sect = s, .name = n, .set = fn, .off = C(f), .def = d }
#define K_NUM(s, n, fn, f, d, lo, hi) \
	{ .sect = s, .name = n, .set = fn, .off = C(f), .def = d, \
	  .min = lo, .max = hi }

static const struct cfg_key cfg_keys[] = {
	/* [shim] */
	K_EP(CFG_S_SHIM, "listen", listen, "0.0.0.0:993"),
	K_EP(CFG_S_SHIM, "listen_starttls", listen_starttls, ""),
	K_SET(CFG_S_SHIM, "tls_cert_file", cfg_set_str, tls_cert_file,
	    "/etc/imapshim/tls/cert.pem"),
	K_SET(CFG_S_SHIM, "tls_key_file", cfg_set_str, tls_key_file,
	    "/etc/imapshim/tls/key.pem"),
	K_SET(CFG_S_SHIM, "tls_min_version", cfg_set_tls_version,
	    tls_min_version, "1.2"),
	{ .sect = CFG_S_SHIM, .name = "allow_from", .set = cfg_set_cidrs,
	  .off = C(allow_from), .aux = C(n_allow_from),
	  .def = "127.0.0.0/8", .flags = CFG_F_LIST },
	K_SET(CFG_S_SHIM, "allow_plaintext_login", cfg_set_bool,
	    allow_plaintext_login, "no"),
	{ .sect = CFG_S_SHIM, .name = "client_login_format",
	  .set = cfg_set_format, .off = C(client_login_format),
	  .def = "{domain}/{admin}/{mailbox}", .flags = CFG_F_CLIENT },
	K_NUM(CFG_S_SHIM, "max_clients", cfg_set_uint, max_clients, "20000",
	    1, UINT_MAX),
	K_NUM(CFG_S_SHIM, "max_unauth_per_ip", cfg_set_uint,
	    max_unauth_per_ip, "256", 1, UINT_MAX),
	K_NUM(CFG_S_SHIM, "max_command_bytes", cfg_set_size64,
	    max_command_bytes, "10240", 1024, 1048576),
	K_NUM(CFG_S_SHIM, "max_literal_bytes", cfg_set_size64,
	    max_literal_bytes, "52428800", 1, 4ULL << 30),
	K_NUM(CFG_S_SHIM, "client_login_timeout", cfg_set_duration,
	    client_login_timeout_ms, "60s", 1 * MS_S, UINT64_MAX),
	K_NUM(CFG_S_SHIM, "client_idle_timeout", cfg_set_duration,
	    client_idle_timeout_ms, "30m", 1 * MS_S, UINT64_MAX),
	K_EP(CFG_S_SHIM, "status_listen", status_listen, "127.0.0.1:9143"),
	K_NUM(CFG_S_SHIM, "drain_timeout", cfg_set_duration,
	    drain_timeout_ms, "30s", 0, UINT64_MAX),
	K_SET(CFG_S_SHIM, "protocol_log", cfg_set_str_opt, protocol_log, ""),
	K_SET(CFG_S_SHIM, "control_socket", cfg_set_socket_path,
	    control_socket, CONFIG_CONTROL_SOCKET),
	K_SET(CFG_S_SHIM, "user", cfg_set_str_opt, user, ""),
	K_SET(CFG_S_SHIM, "log_level", cfg_set_log_level, log_level, "info"),
	K_SET(CFG_S_SHIM, "log_target", cfg_set_log_target, log_target,
	    "stderr"),

	/* [upstream] */
	{ .sect = CFG_S_UPSTREAM, .name = "servers", .set = cfg_set_servers,
	  .off = C(servers), .aux = C(n_servers), .def = "",
	  .flags = CFG_F_LIST },
	K_SET(CFG_S_UPSTREAM, "tls", cfg_set_tls_mode, up_tls, "implicit"),
	K_SET(CFG_S_UPSTREAM, "tls_verify", cfg_set_bool, tls_verify, "yes"),
	K_SET(CFG_S_UPSTREAM, "tls_ca_file", cfg_set_str, tls_ca_file,
	    "/etc/ssl/certs/ca-certificates.crt"),
	K_SET(CFG_S_UPSTREAM, "tls_server_name", cfg_set_str_opt,
	    tls_server_name, ""),
	K_SET(CFG_S_UPSTREAM, "domain", cfg_set_str_opt, domain, ""),
	K_SET(CFG_S_UPSTREAM, "login_format", cfg_set_format, login_format,
	    "{domain}/{admin}/{mailbox}"),
	K_NUM(CFG_S_UPSTREAM, "connect_timeout", cfg_set_duration,
	    connect_timeout_ms, "10s", 1, UINT64_MAX),
	K_NUM(CFG_S_UPSTREAM, "login_timeout", cfg_set_duration,
	    login_timeout_ms, "20s", 1, UINT64_MAX),
	K_NUM(CFG_S_UPSTREAM, "command_timeout", cfg_set_duration,
	    command_timeout_ms, "120s", 1, UINT64_MAX),

	/* [pool] */
	K_SET(CFG_S_POOL, "mode", cfg_set_pool_mode, pool_mode, "multiplex"),
	K_NUM(CFG_S_POOL, "session_budget", cfg_set_uint, session_budget,
	    "2048", 1, 1000000),
	K_NUM(CFG_S_POOL, "queue_timeout", cfg_set_duration, queue_timeout_ms,
	    "30s", 1, UINT64_MAX),
	K_NUM(CFG_S_POOL, "park_after", cfg_set_duration, park_after_ms,
	    "10s", 0, UINT64_MAX),
	{ .sect = CFG_S_POOL, .name = "reuse_timeout", .set = cfg_set_duration,
	  .off = C(reuse_timeout_ms), .def = "5m", .min = 0,
	  .max = 25 * MS_M - 1,
	  .why = "must be less than 25m: Exchange logs an idle IMAP session "
	      "out after 30 minutes (autologout), so a longer reuse would "
	      "hand out dead sessions" },
	K_NUM(CFG_S_POOL, "idle_poll_interval", cfg_set_duration,
	    idle_poll_interval_ms, "30s", 1 * MS_S, UINT64_MAX),
	{ .sect = CFG_S_POOL, .name = "idle_refresh", .set = cfg_set_duration,
	  .off = C(idle_refresh_ms), .def = "25m", .min = 1 * MS_M,
	  .max = 29 * MS_M,
	  .why = "must be between 1m and 29m: Exchange ends an IDLE after "
	      "30 minutes" },
	K_NUM(CFG_S_POOL, "login_rate", cfg_set_uint, login_rate, "20",
	    1, UINT_MAX),
	K_NUM(CFG_S_POOL, "login_burst", cfg_set_uint, login_burst, "40",
	    1, UINT_MAX),
	/* Per server: connects, TLS handshakes and logins under way at
	 * once (DESIGN 3.3 P12); the pool lowers it while a server is
	 * overloaded (3.5 R14). */
	K_NUM(CFG_S_POOL, "max_logins_in_flight", cfg_set_uint,
	    max_logins_in_flight, "32", 1, 100000),

	/* [retry] */
	K_NUM(CFG_S_RETRY, "login_attempts", cfg_set_uint, login_attempts, "3",
	    1, 10),
	K_NUM(CFG_S_RETRY, "backoff_initial", cfg_set_duration,
	    backoff_initial_ms, "250ms", 1, UINT64_MAX),
	K_NUM(CFG_S_RETRY, "backoff_max", cfg_set_duration, backoff_max_ms,
	    "8s", 1, UINT64_MAX),
	K_NUM(CFG_S_RETRY, "server_fail_threshold", cfg_set_uint,
	    server_fail_threshold, "5", 1, UINT_MAX),
	K_NUM(CFG_S_RETRY, "server_cooldown", cfg_set_duration,
	    server_cooldown_ms, "30s", 0, UINT64_MAX),
	K_NUM(CFG_S_RETRY, "admin_cooldown", cfg_set_duration,
	    admin_cooldown_ms, "5m", 0, UINT64_MAX),
	K_NUM(CFG_S_RETRY, "negative_cache_ttl", cfg_set_duration,
	    negative_cache_ttl_ms, "60s", 0, UINT64_MAX),
	{ .sect = CFG_S_RETRY, .name = "transient_login_patterns",
	  .set = cfg_set_strlist, .off = C(transient_login_patterns),
	  .aux = C(n_transient_login_patterns), .flags = CFG_F_LIST,
	  .def = "LOGIN failed, ProxyNotAuthenticated, [UNAVAILABLE], "
	      "Server Unavailable, User is authenticated but not connected" },

	/* [admin NAME] (base: struct config_admin) */
	{ .sect = CFG_S_ADMIN, .name = "password", .set = cfg_set_secret,
	  .off = A(password) },
	{ .sect = CFG_S_ADMIN, .name = "password_file", .set = cfg_set_str_opt,
	  .off = A(password_file) },
	{ .sect = CFG_S_ADMIN, .name = "max_sessions", .set = cfg_set_uint,
	  .off = A(max_sessions), .def = "16", .min = 1, .max = 100000 },
};

#define CFG_NKEYS nitems(cfg_keys)

struct cfg_state {
	struct config *cfg;
	struct config_diag *diag;
	const char *path;
	FILE *fp;
	char *buf;		/* getline() buffer, wiped after each line */
	size_t bufsz;
	int line;

	enum cfg_sect sect;
	char sect_disp[IMAPSHIM_NAME_MAX + 16];	/* "shim", "admin NAME" */
	size_t admin;		/* index when sect == CFG_S_ADMIN */
	bool prev_name;		/* inih has a key to continue (mirrored) */
	bool cont;		/* this line is an indented continuation */
	bool ignore_cont;	/* the key being continued was refused */

	int key_line[CFG_NKEYS];	/* where each key was set, 0: default */
	int (*admin_line)[CFG_NKEYS];	/* the same, per admin */
};

/* ---- diagnostics ---- */

static void
cfg_diag_add(char *buf, size_t bufsz, const char *msg)
{
	size_t used = strlen(buf), len = strlen(msg);
	static const char more[] = "...\n";

	if (used + len + sizeof(more) <= bufsz) {
		memcpy(buf + used, msg, len + 1);
	} else if (used + sizeof(more) <= bufsz &&
	    (used < sizeof(more) - 1 ||
	    strcmp(buf + used - (sizeof(more) - 1), more) != 0)) {
		memcpy(buf + used, more, sizeof(more));
	}
}

static void cfg_vmsg(struct cfg_state *, bool, int, const char *,
    const char *, const char *, va_list) __attribute__((format(printf, 6, 0)));

static void
cfg_vmsg(struct cfg_state *st, bool warning, int line, const char *sect,
    const char *key, const char *fmt, va_list ap)
{
	char msg[1024];
	size_t n;

	if (line > 0)
		n = (size_t)snprintf(msg, sizeof(msg), "%s:%d: ", st->path,
		    line);
	else
		n = (size_t)snprintf(msg, sizeof(msg), "%s: ", st->path);
	if (n < sizeof(msg) && sect != NULL)
		n += (size_t)snprintf(msg + n, sizeof(msg) - n, "[%s]%s%s: ",
		    sect, key != NULL ? " " : "", key != NULL ? key : "");
	if (n < sizeof(msg))
		n += (size_t)vsnprintf(msg + n, sizeof(msg) - n, fmt, ap);
	if (n >= sizeof(msg) - 1)
		n = sizeof(msg) - 2;
	msg[n] = '\n';
	msg[n + 1] = '\0';
	if (warning) {
		st->diag->n_warnings++;
		cfg_diag_add(st->diag->warnings, sizeof(st->diag->warnings),
		    msg);
	} else {
		st->diag->n_errors++;
		cfg_diag_add(st->diag->errors, sizeof(st->diag->errors), msg);
	}
}

static void cfg_err(struct cfg_state *, int, const char *, const char *,
    const char *, ...) __attribute__((format(printf, 5, 6)));
static void cfg_warn(struct cfg_state *, int, const char *, const char *,
    const char *, ...) __attribute__((format(printf, 5, 6)));

/* "FILE:LINE: [sect] key: what"; line 0 drops ":LINE", NULL sect/key drop
 * "[sect] key". */
static void
cfg_err(struct cfg_state *st, int line, const char *sect, const char *key,
    const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	cfg_vmsg(st, false, line, sect, key, fmt, ap);
	va_end(ap);
}

static void
cfg_warn(struct cfg_state *st, int line, const char *sect, const char *key,
    const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	cfg_vmsg(st, true, line, sect, key, fmt, ap);
	va_end(ap);
}

static void
cfg_errmsg(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
cfg_errmsg(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* ---- value parsers ---- */

static int
cfg_parse_u64(const char **sp, uint64_t *v_r)
{
	const char *s = *sp;
	uint64_t v = 0;

	if (*s < '0' || *s > '9')
		return -1;
	for (; *s >= '0' && *s <= '9'; s++) {
		unsigned d = (unsigned)(*s - '0');

		if (v > (UINT64_MAX - d) / 10)
			return -1;
		v = v * 10 + d;
	}
	*sp = s;
	*v_r = v;
	return 0;
}

int
config_parse_duration(const char *s, uint64_t *ms_r)
{
	static const struct { const char *unit; uint64_t ms; } units[] = {
		{ "", MS_S }, { "ms", 1 }, { "s", MS_S }, { "m", MS_M },
		{ "h", MS_H },
	};
	uint64_t v;
	size_t i;

	if (s == NULL || cfg_parse_u64(&s, &v) == -1)
		return -1;
	for (i = 0; i < nitems(units); i++) {
		if (strcmp(s, units[i].unit) != 0)
			continue;
		if (v > UINT64_MAX / units[i].ms)
			return -1;
		*ms_r = v * units[i].ms;
		return 0;
	}
	return -1;
}

int
config_parse_size(const char *s, uint64_t *bytes_r)
{
	uint64_t v;
	unsigned shift;

	if (s == NULL || cfg_parse_u64(&s, &v) == -1)
		return -1;
	switch (*s) {
	case '\0':
		shift = 0;
		break;
	case 'k': case 'K':
		shift = 10;
		break;
	case 'm': case 'M':
		shift = 20;
		break;
	case 'g': case 'G':
		shift = 30;
		break;
	default:
		return -1;
	}
	if (*s != '\0' && s[1] != '\0')
		return -1;
	if (v > (UINT64_MAX >> shift))
		return -1;
	*bytes_r = v << shift;
	return 0;
}

int
config_parse_bool(const char *s, bool *b_r)
{
	static const char *const yes[] = { "yes", "true", "on", "1" };
	static const char *const no[] = { "no", "false", "off", "0" };
	size_t i;

	if (s == NULL)
		return -1;
	for (i = 0; i < nitems(yes); i++) {
		if (util_ieq(s, yes[i])) {
			*b_r = true;
			return 0;
		}
		if (util_ieq(s, no[i])) {
			*b_r = false;
			return 0;
		}
	}
	return -1;
}

/* "1500ms" -> "1500ms", 90000 -> "90s", 1800000 -> "30m". */
static const char *
cfg_dur_str(uint64_t ms, char *buf, size_t len)
{
	if (ms != 0 && ms % MS_H == 0)
		snprintf(buf, len, "%lluh", (unsigned long long)(ms / MS_H));
	else if (ms != 0 && ms % MS_M == 0)
		snprintf(buf, len, "%llum", (unsigned long long)(ms / MS_M));
	else if (ms != 0 && ms % MS_S == 0)
		snprintf(buf, len, "%llus", (unsigned long long)(ms / MS_S));
	else
		snprintf(buf, len, "%llums", (unsigned long long)ms);
	return buf;
}

/* Range check; dur: render the bounds as durations (else plain numbers). */
static int
cfg_range(const struct cfg_key *k, uint64_t v, bool dur, char *err,
    size_t errlen)
{
	char lo[32], hi[32];

	if (v >= k->min && v <= k->max)
		return 0;
	if (k->why != NULL) {
		cfg_errmsg(err, errlen, "%s", k->why);
		return -1;
	}
	if (dur) {
		cfg_dur_str(k->min, lo, sizeof(lo));
		cfg_dur_str(k->max, hi, sizeof(hi));
	} else {
		snprintf(lo, sizeof(lo), "%llu", (unsigned long long)k->min);
		snprintf(hi, sizeof(hi), "%llu", (unsigned long long)k->max);
	}
	if (k->max == UINT64_MAX || (!dur && k->max == UINT_MAX))
		cfg_errmsg(err, errlen, "must be at least %s", lo);
	else
		cfg_errmsg(err, errlen, "must be between %s and %s", lo, hi);
	return -1;
}

/* ---- setters ---- */

#define FIELD(base, off, type) ((type *)(void *)((char *)(base) + (off)))

static int
cfg_set_uint(const struct cfg_key *k, void *base, const char *v, bool append,
    char *err, size_t errlen)
{
	const char *s = v;
	uint64_t n;

	(void)append;
	if (cfg_parse_u64(&s, &n) == -1 || *s != '\0') {
		cfg_errmsg(err, errlen, "'%s' is not a number", v);
		return -1;
	}
	if (cfg_range(k, n, false, err, errlen) == -1)
		return -1;
	*FIELD(base, k->off, unsigned) = (unsigned)n;
	return 0;
}

static int
cfg_set_size64(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	uint64_t n;

	(void)append;
	if (config_parse_size(v, &n) == -1) {
		cfg_errmsg(err, errlen,
		    "'%s' is not a size (bytes, or a number with k, M or G)",
		    v);
		return -1;
	}
	if (cfg_range(k, n, false, err, errlen) == -1)
		return -1;
	*FIELD(base, k->off, uint64_t) = n;
	return 0;
}

static int
cfg_set_duration(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	uint64_t ms;

	(void)append;
	if (config_parse_duration(v, &ms) == -1) {
		cfg_errmsg(err, errlen, "'%s' is not a duration "
		    "(a number with ms, s, m or h; a bare number is seconds)",
		    v);
		return -1;
	}
	if (cfg_range(k, ms, true, err, errlen) == -1)
		return -1;
	*FIELD(base, k->off, uint64_t) = ms;
	return 0;
}

static int
cfg_set_bool(const struct cfg_key *k, void *base, const char *v, bool append,
    char *err, size_t errlen)
{
	(void)append;
	if (config_parse_bool(v, FIELD(base, k->off, bool)) == -1) {
		cfg_errmsg(err, errlen, "'%s' is not yes or no", v);
		return -1;
	}
	return 0;
}

static int
cfg_set_str(const struct cfg_key *k, void *base, const char *v, bool append,
    char *err, size_t errlen)
{
	char **p = FIELD(base, k->off, char *);

	(void)append;
	if (*v == '\0') {
		cfg_errmsg(err, errlen, "must not be empty");
		return -1;
	}
	free(*p);
	*p = xstrdup(v);
	return 0;
}

static int
cfg_set_str_opt(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	char **p = FIELD(base, k->off, char *);

	(void)append;
	(void)err;
	(void)errlen;
	free(*p);
	*p = *v != '\0' ? xstrdup(v) : NULL;
	return 0;
}

/* A Unix socket's path: absolute, and short enough for sun_path. */
static int
cfg_set_socket_path(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	if (*v != '\0' && (v[0] != '/' ||
	    strlen(v) >= sizeof(((struct sockaddr_un *)NULL)->sun_path))) {
		cfg_errmsg(err, errlen, "'%s': must be an absolute path of at "
		    "most %zu bytes, or empty", v,
		    sizeof(((struct sockaddr_un *)NULL)->sun_path) - 1);
		return -1;
	}
	return cfg_set_str_opt(k, base, v, append, err, errlen);
}

static int
cfg_set_log_target(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	if (strcmp(v, "stderr") != 0 && strcmp(v, "syslog") != 0 &&
	    v[0] != '/') {
		cfg_errmsg(err, errlen,
		    "'%s': must be stderr, syslog or an absolute file path", v);
		return -1;
	}
	return cfg_set_str(k, base, v, append, err, errlen);
}

static int
cfg_set_secret(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	char **p = FIELD(base, k->off, char *);

	(void)append;
	if (*v == '\0') {
		cfg_errmsg(err, errlen, "must not be empty");
		return -1;
	}
	util_secret_free(*p);
	*p = xstrdup(v);
	return 0;
}

static int
cfg_set_tls_version(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	int *p = FIELD(base, k->off, int);

	(void)append;
	if (strcmp(v, "1.2") == 0)
		*p = TLS1_2_VERSION;
	else if (strcmp(v, "1.3") == 0)
		*p = TLS1_3_VERSION;
	else {
		cfg_errmsg(err, errlen, "'%s': must be 1.2 or 1.3", v);
		return -1;
	}
	return 0;
}

static int
cfg_set_tls_mode(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	enum config_tls_mode *p = FIELD(base, k->off, enum config_tls_mode);

	(void)append;
	if (util_ieq(v, "implicit"))
		*p = CFG_TLS_IMPLICIT;
	else if (util_ieq(v, "starttls"))
		*p = CFG_TLS_STARTTLS;
	else if (util_ieq(v, "none"))
		*p = CFG_TLS_NONE;
	else {
		cfg_errmsg(err, errlen,
		    "'%s': must be implicit, starttls or none", v);
		return -1;
	}
	return 0;
}

static int
cfg_set_pool_mode(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	enum config_pool_mode *p = FIELD(base, k->off, enum config_pool_mode);

	(void)append;
	if (util_ieq(v, "multiplex"))
		*p = CFG_POOL_MULTIPLEX;
	else if (util_ieq(v, "session"))
		*p = CFG_POOL_SESSION;
	else {
		cfg_errmsg(err, errlen, "'%s': must be multiplex or session",
		    v);
		return -1;
	}
	return 0;
}

static int
cfg_set_log_level(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	(void)append;
	if (log_level_parse(v, FIELD(base, k->off, enum log_level)) == -1) {
		cfg_errmsg(err, errlen,
		    "'%s': must be error, warn, info or debug", v);
		return -1;
	}
	return 0;
}

static int
cfg_set_endpoint_opt(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	struct addr_endpoint ep;
	bool *has = FIELD(base, k->aux, bool);

	(void)append;
	if (*v == '\0') {
		*has = false;
		memset(FIELD(base, k->off, struct addr_endpoint), 0, sizeof(ep));
		return 0;
	}
	if (addr_parse_endpoint(v, &ep, err, errlen) == -1)
		return -1;
	*FIELD(base, k->off, struct addr_endpoint) = ep;
	*has = true;
	return 0;
}

/*
 * Next comma-separated item of *sp, trimmed, into out.  Returns 1 with an
 * item (possibly empty), 0 at the end.
 */
static int
cfg_next_item(const char **sp, char *out, size_t outlen)
{
	const char *s = *sp, *e, *end;
	size_t len;

	if (s == NULL)
		return 0;
	end = strchr(s, ',');
	e = end != NULL ? end : s + strlen(s);
	while (s < e && isspace((unsigned char)*s))
		s++;
	while (e > s && isspace((unsigned char)e[-1]))
		e--;
	len = (size_t)(e - s);
	if (len >= outlen)
		len = outlen - 1;
	memcpy(out, s, len);
	out[len] = '\0';
	*sp = end != NULL ? end + 1 : NULL;
	return 1;
}

static int
cfg_set_servers(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	struct addr_endpoint **arr = FIELD(base, k->off,
	    struct addr_endpoint *);
	size_t *n = FIELD(base, k->aux, size_t), i;
	char item[512];
	struct addr_endpoint ep;

	if (!append) {
		free(*arr);
		*arr = NULL;
		*n = 0;
	}
	while (cfg_next_item(&v, item, sizeof(item)) == 1) {
		if (item[0] == '\0')
			continue;
		if (addr_parse_endpoint(item, &ep, err, errlen) == -1)
			return -1;
		if (ep.host[0] == '\0') {
			cfg_errmsg(err, errlen,
			    "'%s': a server needs a host name", item);
			return -1;
		}
		for (i = 0; i < *n; i++) {
			if (addr_endpoint_same(&(*arr)[i], &ep)) {
				cfg_errmsg(err, errlen, "'%s' listed twice",
				    item);
				return -1;
			}
		}
		*arr = xrealloc(*arr, (*n + 1) * sizeof(**arr));
		(*arr)[(*n)++] = ep;
	}
	return 0;
}

static int
cfg_set_cidrs(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	struct addr_cidr **arr = FIELD(base, k->off, struct addr_cidr *);
	size_t *n = FIELD(base, k->aux, size_t);
	char item[512];
	struct addr_cidr c;

	if (!append) {
		free(*arr);
		*arr = NULL;
		*n = 0;
	}
	while (cfg_next_item(&v, item, sizeof(item)) == 1) {
		if (item[0] == '\0')
			continue;
		if (addr_parse_cidr(item, &c, err, errlen) == -1)
			return -1;
		*arr = xrealloc(*arr, (*n + 1) * sizeof(**arr));
		(*arr)[(*n)++] = c;
	}
	return 0;
}

static int
cfg_set_strlist(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	char ***arr = FIELD(base, k->off, char **);
	size_t *n = FIELD(base, k->aux, size_t), i;
	char item[512];

	(void)err;
	(void)errlen;
	if (!append) {
		for (i = 0; i < *n; i++)
			free((*arr)[i]);
		free(*arr);
		*arr = NULL;
		*n = 0;
	}
	while (cfg_next_item(&v, item, sizeof(item)) == 1) {
		if (item[0] == '\0')
			continue;
		*arr = xrealloc(*arr, (*n + 1) * sizeof(**arr));
		(*arr)[(*n)++] = xstrdup(item);
	}
	return 0;
}

/*
 * A login format: literal text and the placeholders {domain}, {admin},
 * {mailbox}, each at most once; {admin} and {mailbox} required.  The
 * client's format is matched against what clients send, so there every two
 * placeholders must be separated by literal text.
 */
static int
cfg_check_format(const char *v, bool client, char *err, size_t errlen)
{
	static const char *const names[] = { "domain", "admin", "mailbox" };
	bool seen[nitems(names)] = { false };
	const char *p = v, *last_end = NULL;
	size_t i;

	while ((p = strchr(p, '{')) != NULL) {
		const char *e = strchr(p, '}');
		size_t len;

		if (e == NULL) {
			cfg_errmsg(err, errlen, "'%s': '{' without '}'", v);
			return -1;
		}
		len = (size_t)(e - p - 1);
		for (i = 0; i < nitems(names); i++)
			if (strlen(names[i]) == len &&
			    strncmp(p + 1, names[i], len) == 0)
				break;
		if (i == nitems(names)) {
			cfg_errmsg(err, errlen, "'%s': unknown placeholder "
			    "'%.*s' (use {domain}, {admin}, {mailbox})", v,
			    (int)(e - p + 1), p);
			return -1;
		}
		if (seen[i]) {
			cfg_errmsg(err, errlen, "'%s': {%s} given twice", v,
			    names[i]);
			return -1;
		}
		if (client && last_end == p) {
			cfg_errmsg(err, errlen, "'%s': placeholders must be "
			    "separated by literal text such as '/'", v);
			return -1;
		}
		seen[i] = true;
		last_end = e + 1;
		p = e + 1;
	}
	if (!seen[1] || !seen[2]) {
		cfg_errmsg(err, errlen, "'%s': must contain {admin} and "
		    "{mailbox}", v);
		return -1;
	}
	return 0;
}

static int
cfg_set_format(const struct cfg_key *k, void *base, const char *v,
    bool append, char *err, size_t errlen)
{
	if (cfg_check_format(v, (k->flags & CFG_F_CLIENT) != 0, err,
	    errlen) == -1)
		return -1;
	return cfg_set_str(k, base, v, append, err, errlen);
}

/* ---- sections and lines ---- */

static const struct cfg_key *
cfg_find(enum cfg_sect sect, const char *name)
{
	size_t i;

	for (i = 0; i < CFG_NKEYS; i++)
		if (cfg_keys[i].sect == sect && util_ieq(cfg_keys[i].name, name))
			return &cfg_keys[i];
	return NULL;
}

static void
cfg_apply_defaults(struct cfg_state *st, enum cfg_sect sect, void *base)
{
	char err[256];
	size_t i;

	for (i = 0; i < CFG_NKEYS; i++) {
		const struct cfg_key *k = &cfg_keys[i];

		if (k->sect != sect || k->def == NULL)
			continue;
		if (k->set(k, base, k->def, false, err, sizeof(err)) == -1)
			cfg_err(st, 0, cfg_sect_names[sect], k->name,
			    "bad built-in default: %s", err);
	}
}

/* An admin name goes between '/' in logins: no space, separator or quote;
 * no '=' either (Exchange allows none in an account name), so that the name
 * is a plain token in logs and metric labels. */
static bool
cfg_admin_name_ok(const char *s)
{
	if (*s == '\0' || strlen(s) > IMAPSHIM_NAME_MAX)
		return false;
	for (; *s != '\0'; s++) {
		unsigned char c = (unsigned char)*s;

		if (c <= ' ' || c >= 0x7f || c == '/' || c == '\\' ||
		    c == '"' || c == ';' || c == '[' || c == ']' || c == '{' ||
		    c == '}' || c == '=')
			return false;
	}
	return true;
}

static void
cfg_enter_admin(struct cfg_state *st, const char *name)
{
	struct config *cfg = st->cfg;
	struct config_admin *a;
	size_t i;

	st->sect = CFG_S_SKIP;
	if (!cfg_admin_name_ok(name)) {
		if (*name == '\0')
			cfg_err(st, st->line, NULL, NULL,
			    "[admin] needs a name: [admin NAME]");
		else
			cfg_err(st, st->line, NULL, NULL, "[admin %s]: bad "
			    "admin name (no spaces, '/', '\\', quotes, '=' "
			    "or brackets)", name);
		return;
	}
	for (i = 0; i < cfg->n_admins; i++) {
		if (util_ieq(cfg->admins[i].name, name)) {
			cfg_err(st, st->line, NULL, NULL, "[admin %s]: "
			    "duplicate admin, same as [admin %s] on line %d "
			    "(names are case-insensitive)", name,
			    cfg->admins[i].name, cfg->admins[i].line);
			return;
		}
	}
	cfg->admins = xrealloc(cfg->admins,
	    (cfg->n_admins + 1) * sizeof(*cfg->admins));
	st->admin_line = xrealloc(st->admin_line,
	    (cfg->n_admins + 1) * sizeof(*st->admin_line));
	a = &cfg->admins[cfg->n_admins];
	memset(a, 0, sizeof(*a));
	memset(st->admin_line[cfg->n_admins], 0,
	    sizeof(st->admin_line[cfg->n_admins]));
	a->name = xstrdup(name);
	a->line = st->line;
	st->admin = cfg->n_admins++;
	st->sect = CFG_S_ADMIN;
	snprintf(st->sect_disp, sizeof(st->sect_disp), "admin %s", name);
	cfg_apply_defaults(st, CFG_S_ADMIN, a);
}

static void
cfg_enter_section(struct cfg_state *st, const char *name)
{
	enum cfg_sect s;

	for (s = CFG_S_SHIM; s < CFG_S_ADMIN; s++) {
		if (strcmp(name, cfg_sect_names[s]) == 0) {
			st->sect = s;
			snprintf(st->sect_disp, sizeof(st->sect_disp), "%s",
			    name);
			return;
		}
	}
	if (strncmp(name, "admin", 5) == 0 &&
	    (name[5] == '\0' || isspace((unsigned char)name[5]))) {
		name += 5;
		while (isspace((unsigned char)*name))
			name++;
		cfg_enter_admin(st, name);
		return;
	}
	st->sect = CFG_S_SKIP;
	cfg_err(st, st->line, NULL, NULL, "unknown section [%s]", name);
}

/* inih's find_chars_or_comment(): first of chars, or a ';' after a space. */
static char *
cfg_find_chars_or_comment(char *s, const char *chars)
{
	bool was_space = false;

	while (*s != '\0' && (chars == NULL || strchr(chars, *s) == NULL) &&
	    !(was_space && *s == ';')) {
		was_space = isspace((unsigned char)*s);
		s++;
	}
	return s;
}

static void
cfg_trim(char *s)
{
	char *p = s, *e;

	while (isspace((unsigned char)*p))
		p++;
	e = p + strlen(p);
	while (e > p && isspace((unsigned char)e[-1]))
		e--;
	memmove(s, p, (size_t)(e - p));
	s[e - p] = '\0';
}

/*
 * Classify line the way inih will: comment or blank, continuation, section
 * header, key line.  Returns false when inih must not see the line (a
 * syntax error we already reported).
 */
static bool
cfg_scan_line(struct cfg_state *st, char *line)
{
	char *p = line, *q;
	char name[256];
	size_t len;

	st->cont = false;
	while (isspace((unsigned char)*p))
		p++;
	if (*p == '\0' || *p == ';' || *p == '#')
		return true;
	if (st->prev_name && p > line) {
		/* r55 keeps " ; comment" in continuation lines: cut it here,
		 * as for first lines (and as later inih releases do). */
		q = cfg_find_chars_or_comment(p, NULL);
		while (q > p && isspace((unsigned char)q[-1]))
			q--;
		*q = '\0';
		st->cont = true;
		return true;
	}
	st->ignore_cont = false;
	if (*p == '[') {
		q = cfg_find_chars_or_comment(p + 1, "]");
		if (*q != ']') {
			cfg_err(st, st->line, NULL, NULL,
			    "section header without ']'");
			st->sect = CFG_S_SKIP;
			st->prev_name = false;
			return false;
		}
		len = (size_t)(q - p - 1);
		if (len >= sizeof(name))
			len = sizeof(name) - 1;
		memcpy(name, p + 1, len);
		name[len] = '\0';
		cfg_trim(name);
		st->prev_name = false;
		cfg_enter_section(st, name);
		return true;
	}
	q = cfg_find_chars_or_comment(p, "=:");
	if (*q != '=' && *q != ':') {
		cfg_err(st, st->line, NULL, NULL, "expected 'key = value'");
		return false;
	}
	len = (size_t)(q - p);
	if (len >= sizeof(name))
		len = sizeof(name) - 1;
	memcpy(name, p, len);
	name[len] = '\0';
	cfg_trim(name);
	if (st->sect == CFG_S_ADMIN && util_ieq(name, "password") &&
	    strchr(q + 1, ';') != NULL)
		cfg_warn(st, st->line, st->sect_disp, "password",
		    "contains ';': inih cuts a value at \" ;\", so the password "
		    "may be cut short; use password_file instead");
	st->prev_name = true;
	return true;
}

/* fgets()-like reader for ini_parse_stream(): one physical line per call. */
static char *
cfg_reader(char *str, int num, void *stream)
{
	struct cfg_state *st = stream;
	ssize_t n;
	size_t len;
	char *p;

	if (st->buf != NULL)
		OPENSSL_cleanse(st->buf, st->bufsz);
	if ((n = getline(&st->buf, &st->bufsz, st->fp)) < 0)
		return NULL;
	st->line++;
	len = (size_t)n;
	while (len > 0 && (st->buf[len - 1] == '\n' ||
	    st->buf[len - 1] == '\r'))
		len--;
	st->buf[len] = '\0';
	p = st->buf;
	if (st->line == 1 && len >= 3 && memcmp(p, "\xEF\xBB\xBF", 3) == 0) {
		p += 3;
		len -= 3;
	}
	str[0] = '\0';
	if (strlen(p) != len) {
		cfg_err(st, st->line, NULL, NULL, "NUL byte in line");
		return str;
	}
	if (num < 1 || len > (size_t)num - 1) {
		cfg_err(st, st->line, NULL, NULL, "line too long (%zu bytes, "
		    "at most %d): libinih cannot read it", len, num - 1);
		return str;
	}
	if (cfg_scan_line(st, p))
		memcpy(str, p, len + 1);
	return str;
}

static int
cfg_ini_cb(void *user, const char *section, const char *name,
    const char *value)
{
	struct cfg_state *st = user;
	const struct cfg_key *k;
	char err[512];
	int *lines;
	void *base;
	bool append = false;

	(void)section;		/* ours is tracked by the reader */
	if (st->sect == CFG_S_SKIP)
		return 1;
	if (st->sect == CFG_S_NONE) {
		cfg_err(st, st->line, NULL, NULL,
		    "key '%s' before any [section]", name);
		return 1;
	}
	if ((k = cfg_find(st->sect, name)) == NULL) {
		if (!st->cont)
			cfg_err(st, st->line, NULL, NULL,
			    "unknown key '%s' in [%s]", name, st->sect_disp);
		return 1;
	}
	if (st->sect == CFG_S_ADMIN) {
		lines = st->admin_line[st->admin];
		base = &st->cfg->admins[st->admin];
	} else {
		lines = st->key_line;
		base = st->cfg;
	}
	if (st->cont) {
		if (st->ignore_cont)
			return 1;
		if ((k->flags & CFG_F_LIST) == 0) {
			cfg_err(st, st->line, st->sect_disp, k->name,
			    "indented line continues this key, which takes "
			    "one value (remove the indentation?)");
			st->ignore_cont = true;
			return 1;
		}
		if (strchr(value, '=') != NULL) {
			cfg_err(st, st->line, st->sect_disp, k->name,
			    "indented line continues this list; if '%s' is "
			    "a key, remove the indentation", value);
			st->ignore_cont = true;
			return 1;
		}
		append = true;
	} else {
		if (lines[k - cfg_keys] != 0) {
			cfg_err(st, st->line, st->sect_disp, k->name,
			    "given twice (first on line %d)",
			    lines[k - cfg_keys]);
			st->ignore_cont = true;
			return 1;
		}
		lines[k - cfg_keys] = st->line;
	}
	if (k->set(k, base, value, append, err, sizeof(err)) == -1) {
		cfg_err(st, st->line, st->sect_disp, k->name, "%s", err);
		st->ignore_cont = true;
	}
	return 1;
}

/* ---- checks after parsing ---- */

static int
cfg_line(const struct cfg_state *st, const char *name)
{
	const struct cfg_key *k;
	size_t i;

	for (i = 0; i < CFG_NKEYS; i++) {
		k = &cfg_keys[i];
		if (k->sect != CFG_S_ADMIN && strcmp(k->name, name) == 0)
			return st->key_line[i];
	}
	return 0;
}

static int
cfg_admin_key_line(const struct cfg_state *st, size_t a, const char *name)
{
	size_t i;

	for (i = 0; i < CFG_NKEYS; i++)
		if (cfg_keys[i].sect == CFG_S_ADMIN &&
		    strcmp(cfg_keys[i].name, name) == 0)
			return st->admin_line[a][i];
	return 0;
}

/* No read or write bits for group and others. */
static void
cfg_check_mode(struct cfg_state *st, int line, const char *sect,
    const char *key, const char *file, mode_t mode)
{
	if ((mode & (S_IRGRP | S_IWGRP | S_IROTH | S_IWOTH)) == 0)
		return;
	cfg_err(st, line, sect, key, "'%s' is readable or writable by group "
	    "or others (mode %04o) and holds admin passwords; "
	    "\"chmod 600 %s\" fixes it", file, (unsigned)(mode & 07777), file);
}

static void
cfg_check_readable(struct cfg_state *st, const char *key, const char *file)
{
	const char *sect = cfg_sect_names[cfg_find(CFG_S_SHIM, key) != NULL ?
	    CFG_S_SHIM : CFG_S_UPSTREAM];
	int fd;

	if ((fd = open(file, O_RDONLY | O_CLOEXEC | O_NOCTTY)) == -1) {
		cfg_err(st, cfg_line(st, key), sect, key, "cannot read '%s': %s",
		    file, strerror(errno));
		return;
	}
	close(fd);
}

/*
 * Read the first line of a password file into a->password.  Reports errors
 * only when check_files (see the comment at the top).
 */
static void
cfg_read_password(struct cfg_state *st, bool check_files, size_t ai)
{
	struct config_admin *a = &st->cfg->admins[ai];
	int line = cfg_admin_key_line(st, ai, "password_file");
	char buf[IMAPSHIM_PASSWORD_MAX + 2];
	struct stat sb;
	size_t len = 0, plen;
	ssize_t n;
	char *nl;
	int fd;

	/* O_NONBLOCK: a FIFO named by mistake must not hang a reload. */
	if ((fd = open(a->password_file, O_RDONLY | O_CLOEXEC | O_NOCTTY |
	    O_NONBLOCK)) ==
	    -1) {
		if (check_files)
			cfg_err(st, line, st->sect_disp, "password_file",
			    "cannot read '%s': %s", a->password_file,
			    strerror(errno));
		return;
	}
	if (fstat(fd, &sb) == -1 || !S_ISREG(sb.st_mode)) {
		if (check_files)
			cfg_err(st, line, st->sect_disp, "password_file",
			    "'%s' is not a regular file", a->password_file);
		close(fd);
		return;
	}
	if (check_files)
		cfg_check_mode(st, line, st->sect_disp, "password_file",
		    a->password_file, sb.st_mode);
	while (len < sizeof(buf) - 1) {
		n = read(fd, buf + len, sizeof(buf) - 1 - len);
		if (n == -1 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	buf[len] = '\0';
	if ((nl = memchr(buf, '\n', len)) != NULL)
		plen = (size_t)(nl - buf);
	else
		plen = len;
	if (plen > 0 && buf[plen - 1] == '\r')
		plen--;
	if (plen > IMAPSHIM_PASSWORD_MAX)
		cfg_err(st, line, st->sect_disp, "password_file",
		    "'%s': password longer than %d bytes", a->password_file,
		    IMAPSHIM_PASSWORD_MAX);
	else if (memchr(buf, '\0', plen) != NULL)
		cfg_err(st, line, st->sect_disp, "password_file",
		    "'%s': NUL byte in the password", a->password_file);
	else if (plen == 0)
		cfg_err(st, line, st->sect_disp, "password_file",
		    "'%s': the first line (the password) is empty",
		    a->password_file);
	else
		a->password = xstrndup(buf, plen);
	OPENSSL_cleanse(buf, sizeof(buf));
}

/*
 * Settings that work but expose a password or promise what cannot be had:
 * warnings, so -t and the start (config_warning) tell the operator.
 */
static void
cfg_warn_settings(struct cfg_state *st)
{
	const struct config *cfg = st->cfg;
	unsigned long long sum = 0;
	char ep[300];
	size_t i;

	if (cfg->up_tls == CFG_TLS_NONE)
		cfg_warn(st, cfg_line(st, "tls"), "upstream", "tls", "none "
		    "sends the admin accounts' passwords to Exchange in clear "
		    "(implicit or starttls encrypts them)");
	/* LOGIN before STARTTLS is possible only on the cleartext listener,
	 * and only with allow_plaintext_login (client_login.c). */
	if (cfg->allow_plaintext_login && cfg->has_listen_starttls &&
	    !addr_host_is_loopback(cfg->listen_starttls.host))
		cfg_warn(st, cfg_line(st, "allow_plaintext_login"), "shim",
		    "allow_plaintext_login", "yes while listen_starttls = %s "
		    "is not a loopback address: clients may send LOGIN, with "
		    "an admin account's password, over the network in clear",
		    addr_endpoint_str(&cfg->listen_starttls, ep, sizeof(ep)));
	/* Only a budget written in the file promises something: the default
	 * is no more than a ceiling over whatever the accounts allow. */
	if (cfg->n_admins == 0 || cfg_line(st, "session_budget") == 0)
		return;
	for (i = 0; i < cfg->n_admins; i++)
		sum += cfg->admins[i].max_sessions;
	if (cfg->session_budget > sum)
		cfg_warn(st, cfg_line(st, "session_budget"), "pool",
		    "session_budget", "session_budget %u is more than the "
		    "admin accounts allow together (%llu); imapshim will use "
		    "at most %llu", cfg->session_budget, sum, sum);
}

static void
cfg_validate(struct cfg_state *st, bool check_files)
{
	struct config *cfg = st->cfg;
	char a[32], b[32];
	size_t i;

	if (!cfg->has_listen && !cfg->has_listen_starttls)
		cfg_err(st, cfg_line(st, "listen"), "shim", "listen",
		    "no listener: set listen and/or listen_starttls");
	if (cfg->n_servers == 0)
		cfg_err(st, cfg_line(st, "servers"), "upstream", "servers",
		    "at least one server is required");
	else if (cfg->n_servers > CONFIG_MAX_SERVERS)
		cfg_err(st, cfg_line(st, "servers"), "upstream", "servers",
		    "%zu servers: at most %d are supported", cfg->n_servers,
		    CONFIG_MAX_SERVERS);
	if (cfg->n_allow_from == 0)
		cfg_err(st, cfg_line(st, "allow_from"), "shim", "allow_from",
		    "empty: no client could connect (0.0.0.0/0, ::/0 allows "
		    "everyone)");
	if (cfg->backoff_initial_ms > cfg->backoff_max_ms) {
		const char *key = cfg_line(st, "backoff_initial") != 0 ?
		    "backoff_initial" : "backoff_max";

		cfg_err(st, cfg_line(st, key), "retry", key,
		    "backoff_initial (%s) is more than backoff_max (%s)",
		    cfg_dur_str(cfg->backoff_initial_ms, a, sizeof(a)),
		    cfg_dur_str(cfg->backoff_max_ms, b, sizeof(b)));
	}
	if (cfg->domain == NULL && strstr(cfg->login_format, "{domain}") &&
	    !strstr(cfg->client_login_format, "{domain}"))
		cfg_err(st, cfg_line(st, "login_format"), "upstream",
		    "login_format", "uses {domain}, but neither [upstream] "
		    "domain nor client_login_format gives one");
	if (!cfg->tls_verify)
		cfg_warn(st, cfg_line(st, "tls_verify"), "upstream",
		    "tls_verify", "upstream certificates are NOT verified");

	if (cfg->n_admins == 0)
		cfg_err(st, 0, NULL, NULL, "no [admin NAME] section: at least "
		    "one admin account is required");
	else if (cfg->n_admins > CONFIG_MAX_ADMINS)
		cfg_err(st, cfg->admins[CONFIG_MAX_ADMINS].line, NULL, NULL,
		    "[admin %s]: %zu admin accounts: at most %d are supported",
		    cfg->admins[CONFIG_MAX_ADMINS].name, cfg->n_admins,
		    CONFIG_MAX_ADMINS);
	for (i = 0; i < cfg->n_admins; i++) {
		struct config_admin *ad = &cfg->admins[i];

		snprintf(st->sect_disp, sizeof(st->sect_disp), "admin %s",
		    ad->name);
		if (ad->password == NULL && ad->password_file == NULL)
			cfg_err(st, ad->line, st->sect_disp, NULL, "set one of "
			    "password_file or password");
		else if (ad->password != NULL && ad->password_file != NULL)
			cfg_err(st, ad->line, st->sect_disp, NULL, "set only one "
			    "of password_file and password");
		else if (ad->password_file != NULL)
			cfg_read_password(st, check_files, i);
	}
	cfg_warn_settings(st);

	if (!check_files)
		return;
	if (cfg->has_listen || cfg->has_listen_starttls) {
		cfg_check_readable(st, "tls_cert_file", cfg->tls_cert_file);
		cfg_check_readable(st, "tls_key_file", cfg->tls_key_file);
	}
	if (cfg->tls_verify && cfg->up_tls != CFG_TLS_NONE)
		cfg_check_readable(st, "tls_ca_file", cfg->tls_ca_file);
	if (cfg->user != NULL && getpwnam(cfg->user) == NULL)
		cfg_err(st, cfg_line(st, "user"), "shim", "user",
		    "no such user '%s'", cfg->user);
}

/* ---- public ---- */

struct config *
config_load(const char *path, bool check_files, struct config_diag *diag)
{
	struct config_diag localdiag;
	struct cfg_state st;
	struct stat sb;
	int rc;

	if (diag == NULL)
		diag = &localdiag;
	memset(diag, 0, sizeof(*diag));
	memset(&st, 0, sizeof(st));
	st.diag = diag;
	st.path = path;

	if ((st.fp = fopen(path, "re")) == NULL) {
		cfg_err(&st, 0, NULL, NULL, "cannot open: %s", strerror(errno));
		return NULL;
	}
	if (check_files && fstat(fileno(st.fp), &sb) == 0)
		cfg_check_mode(&st, 0, NULL, NULL, path, sb.st_mode);

	st.cfg = xcalloc(1, sizeof(*st.cfg));
	st.cfg->path = xstrdup(path);
	for (enum cfg_sect s = CFG_S_SHIM; s < CFG_S_ADMIN; s++)
		cfg_apply_defaults(&st, s, st.cfg);

	rc = ini_parse_stream(cfg_reader, &st, cfg_ini_cb, &st);
	if (ferror(st.fp))
		cfg_err(&st, st.line, NULL, NULL, "read error");
	fclose(st.fp);
	if (st.buf != NULL)
		OPENSSL_cleanse(st.buf, st.bufsz);
	free(st.buf);
	if (rc < 0)
		cfg_err(&st, 0, NULL, NULL, "libinih failed (%d)", rc);
	else if (rc > 0 && diag->n_errors == 0)
		cfg_err(&st, rc, NULL, NULL, "syntax error");

	cfg_validate(&st, check_files);
	free(st.admin_line);
	if (diag->n_errors > 0) {
		config_free(st.cfg);
		return NULL;
	}
	return st.cfg;
}

void
config_free(struct config *cfg)
{
	size_t i;

	if (cfg == NULL)
		return;
	free(cfg->path);
	free(cfg->tls_cert_file);
	free(cfg->tls_key_file);
	free(cfg->allow_from);
	free(cfg->client_login_format);
	free(cfg->protocol_log);
	free(cfg->control_socket);
	free(cfg->user);
	free(cfg->log_target);
	free(cfg->servers);
	free(cfg->tls_ca_file);
	free(cfg->tls_server_name);
	free(cfg->domain);
	free(cfg->login_format);
	for (i = 0; i < cfg->n_transient_login_patterns; i++)
		free(cfg->transient_login_patterns[i]);
	free(cfg->transient_login_patterns);
	for (i = 0; i < cfg->n_admins; i++) {
		free(cfg->admins[i].name);
		util_secret_free(cfg->admins[i].password);
		free(cfg->admins[i].password_file);
	}
	free(cfg->admins);
	free(cfg);
}

size_t
config_find_server(const struct config *cfg, const struct addr_endpoint *ep)
{
	size_t i;

	for (i = 0; cfg != NULL && i < cfg->n_servers; i++)
		if (addr_endpoint_same(&cfg->servers[i], ep))
			return i;
	return (size_t)-1;
}

const struct config_admin *
config_find_admin(const struct config *cfg, const char *name, size_t len)
{
	size_t i;

	if (cfg == NULL || name == NULL)
		return NULL;
	for (i = 0; i < cfg->n_admins; i++)
		if (util_ieqn(name, len, cfg->admins[i].name))
			return &cfg->admins[i];
	return NULL;
}
