/*
 * stats.h - the counters and histograms behind /metrics.
 *
 * Owns every cumulative metric value of the process (monotonic counters
 * and fixed-bucket histograms); gauges (clients by state, sessions by
 * admin/server/state, queue length, server health) are read from their
 * owning modules at scrape time instead (except the last reload's result
 * and time, recorded here with the reload counters).  Modules record
 * events through these functions only; recording is a few integer
 * operations, no allocation, so it is fine on the relay path.
 */
#ifndef STATS_H
#define STATS_H

#include <stddef.h>
#include <stdint.h>

/* imapshim_upstream_logins_total{result} */
enum stats_login_result {
	STATS_LOGIN_OK,
	STATS_LOGIN_REFUSED,	/* tagged NO/BAD to LOGIN */
	STATS_LOGIN_ERROR,	/* connect, TLS, certificate, greeting, timeout */
	STATS_LOGIN_COUNT
};

/* imapshim_login_retries_total{reason} and failures by reason */
enum stats_retry_reason {
	STATS_RETRY_CONNECT,
	STATS_RETRY_TLS,
	STATS_RETRY_CERTIFICATE,
	STATS_RETRY_GREETING,	/* BYE greeting, "Connection is closed. NN" */
	STATS_RETRY_TIMEOUT,
	STATS_RETRY_LOGIN_TRANSIENT,	/* NO LOGIN failed, ProxyNotAuthenticated... */
	STATS_RETRY_LOGIN_REFUSED,	/* final refusal, tried with another admin */
	STATS_RETRY_PROTOCOL,	/* unparseable or unexpected reply */
	STATS_RETRY_LOST,	/* upstream lost mid-session, command re-run */
	STATS_RETRY_COUNT
};

/* imapshim_login_failures_total{attribution}: every failed upstream
 * login, charged to what was at fault (DESIGN 3.5 R5, R6). */
enum stats_attribution {
	STATS_ATTR_MAILBOX,	/* the mailbox: refused with every account */
	STATS_ATTR_ADMIN,	/* the account: another one served the mailbox */
	STATS_ATTR_SERVER,	/* connect, TLS, certificate, greeting, timeout */
	STATS_ATTR_EXCHANGE,	/* refused, and nothing shows the mailbox or
				 * the account at fault */
	STATS_ATTR_COUNT
};

/* Fixed histogram buckets, upper bounds in milliseconds (+Inf implied). */
#define STATS_HIST_BUCKETS 14
extern const uint64_t stats_hist_bounds_ms[STATS_HIST_BUCKETS];

struct stats_hist {
	uint64_t h_bucket[STATS_HIST_BUCKETS + 1];	/* last: +Inf */
	uint64_t h_count;
	uint64_t h_sum_us;
};

/* Commands with their own imapshim_command_seconds series; the rest go
 * to "other". */
#define STATS_COMMANDS \
	X(APPEND) X(CAPABILITY) X(CHECK) X(CLOSE) X(COPY) X(CREATE) \
	X(DELETE) X(EXAMINE) X(EXPUNGE) X(FETCH) X(ID) X(IDLE) X(LIST) \
	X(LOGIN) X(LOGOUT) X(LSUB) X(MOVE) X(NAMESPACE) X(NOOP) X(RENAME) \
	X(SEARCH) X(SELECT) X(STATUS) X(STORE) X(SUBSCRIBE) X(UID) \
	X(UNSELECT) X(UNSUBSCRIBE) X(OTHER)

enum stats_command {
#define X(n) STATS_CMD_##n,
	STATS_COMMANDS
#undef X
	STATS_CMD_COUNT
};
/* Upper case as in IMAP ("APPEND", "OTHER"); /metrics shows them lower case. */
extern const char *const stats_command_names[STATS_CMD_COUNT];

/* Map a command name (any case) to its series.  "UID FETCH" counts as UID. */
enum stats_command stats_command_from(const char *name, size_t len);

void stats_upstream_login(enum stats_login_result r);
void stats_login_retry(enum stats_retry_reason r);
void stats_login_failure(enum stats_attribution a, unsigned n);
void stats_pool_reuse(void);
void stats_queue_wait(uint64_t us);	/* a waiter was served after us */
void stats_queue_timeout(void);
/* A parked IDLE client's poll ran (got its session) lag_ms after it was
 * due; interval_ms since that client's previous poll, 0 when there was
 * none to compare with.  now_ms drives stats_poll_window()'s minute. */
void stats_poll(uint64_t now_ms, uint64_t lag_ms, uint64_t interval_ms);
/* The polls of the last minute (the current minute and the one before):
 * /metrics' and /status' poll lag and achieved interval gauges. */
struct stats_poll_window {
	uint64_t polls;
	uint64_t lag_max_ms, lag_avg_ms;
	uint64_t interval_avg_ms;	/* 0: no poll repeated a poll */
};
void stats_poll_window(uint64_t now_ms, struct stats_poll_window *pw);
void stats_command(enum stats_command c, uint64_t us);
void stats_client_refused(void);	/* closed at accept */
void stats_upstream_tls(int resumed);	/* an upstream TLS handshake completed */
void stats_client_tls(int resumed);	/* a client's TLS handshake completed */

/* imapshim_client_tls_failures_total{reason}: why a client's TLS handshake
 * failed (tls_client_failure() decides). */
enum stats_tls_failure {
	STATS_TLS_FAIL_PROTOCOL_VERSION,	/* no TLS version in common */
	STATS_TLS_FAIL_NO_SHARED_CIPHER,	/* no cipher suite or group in common */
	STATS_TLS_FAIL_CERTIFICATE,	/* the client rejected our certificate */
	STATS_TLS_FAIL_PLAINTEXT,	/* cleartext (IMAP, HTTP) on the TLS port */
	STATS_TLS_FAIL_OTHER,
	STATS_TLS_FAIL_COUNT
};
void stats_client_tls_failure(enum stats_tls_failure r);

/* imapshim_client_auth_failures_total{reason}: a client's LOGIN or
 * AUTHENTICATE refused by imapshim itself (auth_check_login() decides). */
enum stats_auth_failure {
	STATS_AUTH_FAIL_MALFORMED_NAME,	/* does not fit client_login_format */
	STATS_AUTH_FAIL_UNKNOWN_ADMIN,	/* no [admin NAME] of that name */
	STATS_AUTH_FAIL_WRONG_PASSWORD,	/* not that admin account's password */
	STATS_AUTH_FAIL_MALFORMED_REQUEST,	/* undecodable SASL PLAIN, an
					 * argument too long, another authzid */
	STATS_AUTH_FAIL_COUNT
};
void stats_client_auth_failure(enum stats_auth_failure r);

/* imapshim_reloads_total{result} and the last reload's gauges. */
enum stats_reload_result {
	STATS_RELOAD_OK,
	STATS_RELOAD_REJECTED,	/* the old settings stayed */
	STATS_RELOAD_COUNT
};
/* The start counts as a successful load for the "last reload" gauges
 * (success 1, time = start time) but not as a reload. */
void stats_started(int64_t unix_s);
void stats_reload(enum stats_reload_result r, int64_t unix_s);

/* Read-only view for status.c. */
struct stats_snapshot {
	uint64_t logins[STATS_LOGIN_COUNT];
	uint64_t retries[STATS_RETRY_COUNT];
	uint64_t login_failures[STATS_ATTR_COUNT];
	uint64_t pool_reuse;
	uint64_t queue_timeouts;
	uint64_t clients_refused;
	uint64_t tls_handshakes[2];	/* [0] full, [1] resumed */
	uint64_t client_tls_handshakes[2];	/* the same, clients' */
	uint64_t client_tls_failures[STATS_TLS_FAIL_COUNT];
	uint64_t client_auth_failures[STATS_AUTH_FAIL_COUNT];
	uint64_t reloads[STATS_RELOAD_COUNT];
	int last_reload_ok;		/* 1 or 0 */
	int64_t last_reload_unix_s;	/* last attempt, or the start */
	struct stats_hist queue_wait;
	struct stats_hist poll_lag;	/* imapshim_poll_lag_seconds */
	struct stats_hist command[STATS_CMD_COUNT];
};
const struct stats_snapshot *stats_get(void);
extern const char *const stats_login_result_names[STATS_LOGIN_COUNT];	/* "ok", "refused", "error" */
extern const char *const stats_retry_reason_names[STATS_RETRY_COUNT];	/* "connect", ... */
extern const char *const stats_attribution_names[STATS_ATTR_COUNT];	/* "mailbox", ... */
extern const char *const stats_tls_failure_names[STATS_TLS_FAIL_COUNT];	/* "protocol_version", ... */
extern const char *const stats_auth_failure_names[STATS_AUTH_FAIL_COUNT];	/* "malformed_name", ... */
extern const char *const stats_reload_result_names[STATS_RELOAD_COUNT];	/* "ok", "rejected" */

/* Tests only: back to zero. */
void stats_reset(void);

#endif
