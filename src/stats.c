/* stats.c - counters and histograms for /metrics. */
#include "stats.h"

#include <string.h>
#include <strings.h>

#include "imapshim.h"

/* From a fast NOOP on loopback to a slow APPEND through a busy CAS. */
const uint64_t stats_hist_bounds_ms[STATS_HIST_BUCKETS] = {
	1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
};

const char *const stats_command_names[STATS_CMD_COUNT] = {
#define X(n) #n,
	STATS_COMMANDS
#undef X
};

const char *const stats_login_result_names[STATS_LOGIN_COUNT] = {
	"ok", "refused", "error",
};

const char *const stats_retry_reason_names[STATS_RETRY_COUNT] = {
	"connect", "tls", "certificate", "greeting", "timeout",
	"login_transient", "login_refused", "protocol", "lost",
};

const char *const stats_attribution_names[STATS_ATTR_COUNT] = {
	"mailbox", "admin", "server", "exchange",
};

const char *const stats_tls_failure_names[STATS_TLS_FAIL_COUNT] = {
	"protocol_version", "no_shared_cipher", "certificate", "plaintext",
	"other",
};

const char *const stats_auth_failure_names[STATS_AUTH_FAIL_COUNT] = {
	"malformed_name", "unknown_admin", "wrong_password", "malformed_request",
};

const char *const stats_reload_result_names[STATS_RELOAD_COUNT] = {
	"ok", "rejected",
};

static struct stats_snapshot st;

static void
stats_hist_add(struct stats_hist *h, uint64_t us)
{
	size_t i;

	for (i = 0; i < STATS_HIST_BUCKETS; i++)
		if (us <= stats_hist_bounds_ms[i] * 1000)
			break;
	h->h_bucket[i]++;
	h->h_count++;
	h->h_sum_us += us;
}

enum stats_command
stats_command_from(const char *name, size_t len)
{
	size_t i;

	for (i = 0; i + 1 < STATS_CMD_COUNT; i++)
		if (strlen(stats_command_names[i]) == len &&
		    strncasecmp(stats_command_names[i], name, len) == 0)
			return (enum stats_command)i;
	return STATS_CMD_OTHER;
}

void
stats_upstream_login(enum stats_login_result r)
{
	st.logins[r]++;
}

void
stats_login_retry(enum stats_retry_reason r)
{
	st.retries[r]++;
}

void
stats_login_failure(enum stats_attribution a, unsigned n)
{
	st.login_failures[a] += n;
}

void
stats_pool_reuse(void)
{
	st.pool_reuse++;
}

void
stats_queue_wait(uint64_t us)
{
	stats_hist_add(&st.queue_wait, us);
}

void
stats_queue_timeout(void)
{
	st.queue_timeouts++;
}

/* Poll sums of one minute; [0] the current one, [1] the one before. */
static struct poll_minute {
	uint64_t pm_start_ms;
	uint64_t pm_polls, pm_lag_sum_ms, pm_lag_max_ms;
	uint64_t pm_ivals, pm_ival_sum_ms;
} poll_min[2];

static void
stats_poll_roll(uint64_t now_ms)
{
	if (now_ms - poll_min[0].pm_start_ms < 60000)
		return;
	/* The minute before is kept only if it was the last one. */
	if (now_ms - poll_min[0].pm_start_ms < 120000)
		poll_min[1] = poll_min[0];
	else
		memset(&poll_min[1], 0, sizeof(poll_min[1]));
	memset(&poll_min[0], 0, sizeof(poll_min[0]));
	poll_min[0].pm_start_ms = now_ms;
}

void
stats_poll(uint64_t now_ms, uint64_t lag_ms, uint64_t interval_ms)
{
	struct poll_minute *m = &poll_min[0];

	stats_hist_add(&st.poll_lag, lag_ms * 1000);
	stats_poll_roll(now_ms);
	m->pm_polls++;
	m->pm_lag_sum_ms += lag_ms;
	if (lag_ms > m->pm_lag_max_ms)
		m->pm_lag_max_ms = lag_ms;
	if (interval_ms > 0) {
		m->pm_ivals++;
		m->pm_ival_sum_ms += interval_ms;
	}
}

void
stats_poll_window(uint64_t now_ms, struct stats_poll_window *pw)
{
	const struct poll_minute *a = &poll_min[0], *b = &poll_min[1];
	uint64_t ivals;

	stats_poll_roll(now_ms);
	pw->polls = a->pm_polls + b->pm_polls;
	pw->lag_max_ms = a->pm_lag_max_ms > b->pm_lag_max_ms ?
	    a->pm_lag_max_ms : b->pm_lag_max_ms;
	pw->lag_avg_ms = pw->polls == 0 ? 0 :
	    (a->pm_lag_sum_ms + b->pm_lag_sum_ms) / pw->polls;
	ivals = a->pm_ivals + b->pm_ivals;
	pw->interval_avg_ms = ivals == 0 ? 0 :
	    (a->pm_ival_sum_ms + b->pm_ival_sum_ms) / ivals;
}

void
stats_command(enum stats_command c, uint64_t us)
{
	stats_hist_add(&st.command[c], us);
}

void
stats_client_refused(void)
{
	st.clients_refused++;
}

void
stats_client_tls_failure(enum stats_tls_failure r)
{
	st.client_tls_failures[r]++;
}

void
stats_client_auth_failure(enum stats_auth_failure r)
{
	st.client_auth_failures[r]++;
}

void
stats_upstream_tls(int resumed)
{
	st.tls_handshakes[resumed != 0]++;
}

void
stats_client_tls(int resumed)
{
	st.client_tls_handshakes[resumed != 0]++;
}

void
stats_started(int64_t unix_s)
{
	st.last_reload_ok = 1;
	st.last_reload_unix_s = unix_s;
}

void
stats_reload(enum stats_reload_result r, int64_t unix_s)
{
	st.reloads[r]++;
	st.last_reload_ok = r == STATS_RELOAD_OK;
	st.last_reload_unix_s = unix_s;
}

const struct stats_snapshot *
stats_get(void)
{
	return &st;
}

void
stats_reset(void)
{
	memset(&st, 0, sizeof(st));
	memset(poll_min, 0, sizeof(poll_min));
}
