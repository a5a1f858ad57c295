/* client.c - the client session's lifecycle: states, timers, accept, close. */
#include "client_int.h"

#include <event2/bufferevent_ssl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "addr.h"
#include "config.h"
#include "log.h"
#include "protolog.h"
#include "relay.h"
#include "tls.h"
#include "upstream.h"
#include "util.h"

/* How long a closing session may take to flush its last bytes. */
#define CL_CLOSE_FLUSH_MS 5000
/* Largest literal accepted before login (LOGIN arguments). */
#define CL_PREAUTH_LITERAL_MAX 4096

/* Which cl_timer runs in a state. */
enum cl_tmr {
	CL_T_NONE,		/* none: the pool's queue_timeout bounds it */
	CL_T_LOGIN,		/* client_login_timeout, from the first state */
	CL_T_ACTIVITY,		/* client_idle_timeout, or command_timeout
				 * while the upstream owes an answer */
	CL_T_CALLER,		/* armed by whoever enters (delay, flush) */
};

#define B(s) (1u << (s))

/* DESIGN.md "Client session": one row per state. */
static const struct cl_state_info {
	const char *name;
	enum client_kind kind;	/* imapshim_clients{state} */
	bool reading;		/* client reading on (backpressure aside) */
	enum cl_tmr timer;
	enum cl_ptmr park;
	uint32_t to;		/* legal successors (CLOSING from anywhere) */
} cl_states[CL_S_COUNT] = {
	[CL_S_HANDSHAKE] = { "handshake", CLIENT_UNAUTHENTICATED, true,
	    CL_T_LOGIN, CL_P_NONE, B(CL_S_NOTAUTH) },
	[CL_S_NOTAUTH] = { "notauth", CLIENT_UNAUTHENTICATED, true,
	    CL_T_LOGIN, CL_P_NONE, B(CL_S_STARTTLS) | B(CL_S_SASL) |
	    B(CL_S_AUTHDELAY) | B(CL_S_LOGGING_IN) },
	[CL_S_STARTTLS] = { "starttls", CLIENT_UNAUTHENTICATED, true,
	    CL_T_LOGIN, CL_P_NONE, B(CL_S_NOTAUTH) },
	[CL_S_SASL] = { "sasl", CLIENT_UNAUTHENTICATED, true,
	    CL_T_LOGIN, CL_P_NONE, B(CL_S_NOTAUTH) | B(CL_S_AUTHDELAY) |
	    B(CL_S_LOGGING_IN) },
	[CL_S_AUTHDELAY] = { "authdelay", CLIENT_UNAUTHENTICATED, false,
	    CL_T_CALLER, CL_P_NONE, B(CL_S_NOTAUTH) },
	[CL_S_LOGGING_IN] = { "logging-in", CLIENT_WAITING, false,
	    CL_T_NONE, CL_P_NONE, B(CL_S_ATTACHED) | B(CL_S_NOTAUTH) },
	[CL_S_ATTACHED] = { "attached", CLIENT_ATTACHED, true,
	    CL_T_ACTIVITY, CL_P_PARK, B(CL_S_IDLE) | B(CL_S_PARKING) |
	    B(CL_S_RECOVERING) },
	[CL_S_IDLE] = { "idle", CLIENT_ATTACHED, true,
	    CL_T_ACTIVITY, CL_P_REFRESH, B(CL_S_ATTACHED) |
	    B(CL_S_IDLE_RENEW) | B(CL_S_IDLE_ENDING) | B(CL_S_RECOVERING) },
	[CL_S_IDLE_RENEW] = { "idle-renew", CLIENT_ATTACHED, false,
	    CL_T_ACTIVITY, CL_P_NONE, B(CL_S_IDLE_RESUME) |
	    B(CL_S_RECOVERING) },
	[CL_S_IDLE_RESUME] = { "idle-resume", CLIENT_ATTACHED, false,
	    CL_T_ACTIVITY, CL_P_NONE, B(CL_S_IDLE) | B(CL_S_ATTACHED) |
	    B(CL_S_RECOVERING) },
	[CL_S_IDLE_ENDING] = { "idle-ending", CLIENT_ATTACHED, false,
	    CL_T_ACTIVITY, CL_P_NONE, B(CL_S_PARKING_IDLE) |
	    B(CL_S_RECOVERING) },
	[CL_S_PARKING] = { "parking", CLIENT_ATTACHED, false,
	    CL_T_ACTIVITY, CL_P_NONE, B(CL_S_PARKED) | B(CL_S_ATTACHED) |
	    B(CL_S_RECOVERING) },
	[CL_S_PARKING_IDLE] = { "parking-idle", CLIENT_ATTACHED, false,
	    CL_T_ACTIVITY, CL_P_NONE, B(CL_S_PARKED_IDLE) |
	    B(CL_S_IDLE_RESUME) | B(CL_S_RECOVERING) },
	[CL_S_PARKED] = { "parked", CLIENT_PARKED, true,
	    CL_T_ACTIVITY, CL_P_NONE, B(CL_S_ATTACHING) },
	[CL_S_PARKED_IDLE] = { "parked-idle", CLIENT_PARKED, true,
	    CL_T_ACTIVITY, CL_P_POLL, B(CL_S_PARKED) | B(CL_S_POLLING) },
	[CL_S_ATTACHING] = { "attaching", CLIENT_WAITING, false,
	    CL_T_ACTIVITY, CL_P_NONE, B(CL_S_ATTACHED) | B(CL_S_PARKED) },
	[CL_S_POLLING] = { "polling", CLIENT_WAITING, false,
	    CL_T_ACTIVITY, CL_P_NONE, B(CL_S_IDLE_RESUME) |
	    B(CL_S_PARKED_IDLE) },
	[CL_S_RECOVERING] = { "recovering", CLIENT_WAITING, true,
	    CL_T_ACTIVITY, CL_P_NONE, B(CL_S_ATTACHED) | B(CL_S_IDLE_RESUME) },
	[CL_S_CLOSING] = { "closing", CLIENT_KIND_COUNT, false,
	    CL_T_CALLER, CL_P_NONE, 0 },
};

const char *const client_kind_names[] = {
	"unauthenticated", "attached", "parked", "waiting",
};
_Static_assert(nitems(client_kind_names) == CLIENT_KIND_COUNT, "kind names");

static unsigned cl_state_counts[CL_S_COUNT];
const struct client_env *cl_env;
static TAILQ_HEAD(, client) cl_all = TAILQ_HEAD_INITIALIZER(cl_all);
static unsigned cl_count;
static uint64_t cl_next_id = 1;

static void cl_timer_cb(evutil_socket_t fd, short what, void *arg);

const struct config *
cl_cfg(void)
{
	return cl_env->cfg;
}

bool
cl_multiplex(void)
{
	return cl_cfg()->pool_mode == CFG_POOL_MULTIPLEX;
}

const char *
cl_state_name(enum cl_state st)
{
	return cl_states[st].name;
}

unsigned
cl_state_count(enum cl_state st)
{
	return cl_state_counts[st];
}

/* The client is inside an IDLE whose DONE it has not sent yet. */
bool
cl_state_idling(enum cl_state st)
{
	return st == CL_S_IDLE || st == CL_S_IDLE_RENEW ||
	    st == CL_S_IDLE_RESUME || st == CL_S_IDLE_ENDING ||
	    st == CL_S_PARKING_IDLE || st == CL_S_PARKED_IDLE ||
	    st == CL_S_POLLING;
}

void
cl_arm_timer(struct client *c, uint64_t ms)
{
	struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000 };

	evtimer_add(c->cl_timer, &tv);
}

/* The upstream owes this client an answer: command_timeout applies. */
static bool
cl_awaits_upstream(const struct client *c)
{
	if (c->cl_up == NULL)
		return false;
	switch (c->cl_state) {
	case CL_S_ATTACHED:
		return c->cl_inflight > 0 && c->cl_cur == CL_CUR_NONE;
	case CL_S_IDLE_RENEW:
	case CL_S_IDLE_RESUME:
	case CL_S_IDLE_ENDING:
		return true;
	default:
		return false;
	}
}

/* Arm cl_timer for the activity deadline that comes first (DESIGN 3.6):
 * command_timeout after the last upstream activity while the upstream owes
 * an answer, else client_idle_timeout after the client's last byte.  Client
 * bytes never push a command's deadline back. */
void
cl_timer_update(struct client *c)
{
	const struct config *cfg = cl_cfg();
	uint64_t now = util_now_ms(), due;

	due = cl_awaits_upstream(c) ? c->cl_up_active_ms +
	    cfg->command_timeout_ms : c->cl_active_ms +
	    cfg->client_idle_timeout_ms;
	cl_arm_timer(c, due > now ? due - now : 0);
}

/* Read again; input that arrived while reading was off gets no new read
 * event, so trigger one (deferred: never re-entered from our caller). */
void
cl_resume_reading(struct client *c)
{
	c->cl_read_blocked = false;
	bufferevent_enable(c->cl_bev, EV_READ);
	if (evbuffer_get_length(bufferevent_get_input(c->cl_bev)) > 0)
		bufferevent_trigger(c->cl_bev, EV_READ, BEV_TRIG_DEFER_CALLBACKS);
	relay_read_pending(c->cl_bev);
}

/*
 * The one way a client changes state.  An illegal transition is a bug:
 * logged, and fatal in debug and sanitizer builds.  The new state's row
 * decides reading, cl_timer and the park timer, so no path can forget to
 * turn reading back on or leave a timer of the old state running.
 */
bool
cl_state_legal(enum cl_state from, enum cl_state to)
{
	return from != CL_S_CLOSING && (to == CL_S_CLOSING ||
	    (cl_states[from].to & B(to)) != 0);
}

bool
cl_state_reads(enum cl_state st)
{
	return cl_states[st].reading;
}

enum client_kind
cl_state_kind(enum cl_state st)
{
	return cl_states[st].kind;
}

void
cl_set_state(struct client *c, enum cl_state to)
{
	const struct cl_state_info *from = &cl_states[c->cl_state];
	const struct cl_state_info *next = &cl_states[to];
	bool legal = cl_state_legal(c->cl_state, to);

	if (!legal)
		log_error("client_state_illegal", "id=%llu from=%s to=%s",
		    (unsigned long long)c->cl_id, from->name, next->name);
	IMAPSHIM_ASSERT(legal);
	log_debug("client_state", "id=%llu from=%s to=%s",
	    (unsigned long long)c->cl_id, from->name, next->name);
	IMAPSHIM_ASSERT(cl_state_counts[c->cl_state] > 0);
	cl_state_counts[c->cl_state]--;
	cl_state_counts[to]++;
	if ((c->cl_state == CL_S_ATTACHED || c->cl_state == CL_S_IDLE) &&
	    to != CL_S_ATTACHED && to != CL_S_IDLE)
		cl_lru_remove(c);
	c->cl_state = to;
	if (next->reading && !c->cl_logout)
		cl_resume_reading(c);
	else if (!next->reading)
		bufferevent_disable(c->cl_bev, EV_READ);
	if (next->timer == CL_T_ACTIVITY)
		cl_timer_update(c);
	else if (next->timer == CL_T_LOGIN && from->timer != CL_T_LOGIN)
		cl_arm_timer(c, cl_cfg()->client_login_timeout_ms);
	else if (next->timer == CL_T_NONE)
		evtimer_del(c->cl_timer);
	cl_park_timer_apply(c);
}

/* The park timer a state runs, for client_park.c. */
enum cl_ptmr
cl_park_timer_kind(const struct client *c)
{
	return cl_states[c->cl_state].park;
}

/* ------------------------------------------------------------- closing */

static void
cl_free(void *obj)
{
	struct client *c = obj;

	/* Last line of the session: after every reply it flushed. */
	cl_plog(c, "CloseSession", "", 0, 0, 0, c->cl_close_reason);
	cl_stage_forget(c);
	TAILQ_REMOVE(&cl_all, c, cl_link);
	cl_count--;
	pool_set_clients(cl_count);	/* its descriptor closes below */
	cl_state_counts[c->cl_state]--;
	if (c->cl_bev != NULL) {
		tls_close_notify(c->cl_ssl);
		bufferevent_free(c->cl_bev);
	}
	if (c->cl_timer != NULL)
		event_free(c->cl_timer);
	if (c->cl_cmd != NULL)
		evbuffer_free(c->cl_cmd);
	cl_ring_clear(&c->cl_ring);
	IMAPSHIM_ASSERT(c->cl_waiter == NULL);	/* ended by cl_close */
	free(c->cl_who);
	free(c->cl_sip);
	free(c->cl_select_cmd);
	free(c->cl_append_mbox);
	free(c->cl_auth_caps);
	if (c->cl_park_ev != NULL)
		event_free(c->cl_park_ev);
	resync_snap_free(&c->cl_snap);
	resync_snap_free(&c->cl_now);
	if (c->cl_pending_ev != NULL)
		evbuffer_free(c->cl_pending_ev);
	if (c->cl_flagtext != NULL)
		evbuffer_free(c->cl_flagtext);
	free(c->cl_replay);
	free(c);
}

/* The upstream died under us: the pool drops it, we hold none. */
void
cl_forget_upstream(struct client *c)
{
	if (c->cl_up == NULL)
		return;
	pool_forget(c->cl_up);
	c->cl_up = NULL;
	c->cl_selected = false;
}

/* Closing: give the upstream back in a state the pool can judge. */
static void
cl_release_upstream(struct client *c)
{
	struct upstream *u = c->cl_up;

	cl_waiter_end(c);
	if (u == NULL)
		return;
	c->cl_up = NULL;
	upstream_set_lessee(u, NULL, NULL);
	if (c->cl_cur != CL_CUR_NONE || !imap_framer_at_boundary(&c->cl_framer)) {
		/* Half a command went upstream: no LOGOUT can follow it. */
		upstream_abort(u, "client-gone-mid-command");
		pool_forget(u);
		return;
	}
	switch (c->cl_state) {
	case CL_S_ATTACHED:
		break;
	case CL_S_IDLE:
	case CL_S_IDLE_RESUME:
		/* The upstream idles (or is about to): end it first. */
		evbuffer_add(upstream_output(u), "DONE\r\n", 6);
		pool_release(u, POOL_RELEASE_DIRTY);
		return;
	default:
		/* Our DONE or an internal command is on its way: the pool
		 * waits for the stream to settle. */
		pool_release(u, POOL_RELEASE_DIRTY);
		return;
	}
	if (c->cl_inflight > 0) {
		pool_release(u, POOL_RELEASE_DIRTY);
		return;
	}
	pool_release(u, c->cl_selected ? POOL_RELEASE_SELECTED :
	    POOL_RELEASE_CLEAN);
}

void
cl_close(struct client *c, const char *reason, const char *bye)
{
	if (c->cl_state == CL_S_CLOSING)
		return;
	if (bye != NULL && c->cl_state != CL_S_HANDSHAKE &&
	    c->cl_state != CL_S_STARTTLS)
		cl_printf(c, "* BYE %s\r\n", bye);
	log_info("client_close", "id=%llu peer=%s mailbox=%s admin=%s state=%s "
	    "reason=%s bytes_in=%llu bytes_out=%llu duration_ms=%llu",
	    (unsigned long long)c->cl_id, c->cl_peer,
	    c->cl_who != NULL ? log_v(c->cl_who->mailbox) : "-",
	    c->cl_who != NULL ? log_v(c->cl_who->admin) : "-",
	    cl_state_name(c->cl_state), log_v(reason),
	    (unsigned long long)c->cl_bytes_in,
	    (unsigned long long)c->cl_bytes_out,
	    (unsigned long long)(util_now_ms() - c->cl_started_ms));
	c->cl_close_reason = reason;
	cl_unauth_remove(c);
	cl_release_upstream(c);
	cl_set_state(c, CL_S_CLOSING);
	if (evbuffer_get_length(cl_output(c)) == 0) {
		evtimer_del(c->cl_timer);
		reap_add(&c->cl_reap, cl_free, c);
		return;
	}
	/* Flush first; the write callback reaps once the output is empty. */
	bufferevent_setwatermark(c->cl_bev, EV_WRITE, 0, 0);
	cl_arm_timer(c, CL_CLOSE_FLUSH_MS);
}

void
client_close_all(const char *bye)
{
	struct client *c, *next;

	for (c = TAILQ_FIRST(&cl_all); c != NULL; c = next) {
		next = TAILQ_NEXT(c, cl_link);
		cl_close(c, "shutdown", bye);
	}
}

unsigned
client_count(void)
{
	return cl_count;
}

void
client_counts(unsigned counts[CLIENT_KIND_COUNT])
{
	size_t i;

	memset(counts, 0, CLIENT_KIND_COUNT * sizeof(counts[0]));
	for (i = 0; i < CL_S_COUNT; i++)
		if (cl_states[i].kind < CLIENT_KIND_COUNT)
			counts[cl_states[i].kind] += cl_state_counts[i];
}

/* ------------------------------------------------------------- the pool */

static void
cl_pool_granted(struct pool_waiter *w, struct upstream *u)
{
	struct client *c = w->pw_arg;

	IMAPSHIM_ASSERT(c->cl_waiter == w);
	cl_waiter_end(c);
	cl_lease(c, u);
	switch (c->cl_state) {
	case CL_S_ATTACHING:
	case CL_S_POLLING:
		cl_attach_granted(c);
		break;
	case CL_S_PARKED_IDLE:
		cl_poll_granted(c);
		break;
	case CL_S_RECOVERING:
		cl_recover_granted(c);
		break;
	default:
		IMAPSHIM_ASSERT(c->cl_state == CL_S_LOGGING_IN);
		cl_login_done(c);
		break;
	}
}

static void
cl_pool_failed(struct pool_waiter *w, enum pool_fail why, const char *reason)
{
	struct client *c = w->pw_arg;
	char r[sizeof(w->pw_reason)], x[sizeof(w->pw_explain)];

	/* The waiter ends before its answer is acted on (which may ask the
	 * pool again): its words go on in copies. */
	IMAPSHIM_ASSERT(c->cl_waiter == w);
	snprintf(r, sizeof(r), "%s", reason);
	snprintf(x, sizeof(x), "%s", w->pw_explain);
	cl_waiter_end(c);
	switch (c->cl_state) {
	case CL_S_ATTACHING:
	case CL_S_POLLING:
		cl_attach_failed(c, why, x);
		break;
	case CL_S_PARKED_IDLE:
		cl_poll_failed(c);
		break;
	case CL_S_RECOVERING:
		cl_recover_failed(c);
		break;
	default:
		IMAPSHIM_ASSERT(c->cl_state == CL_S_LOGGING_IN);
		cl_login_failed(c, why, r, x);
		break;
	}
}

/* Wait for an upstream session of this mailbox. */
void
cl_ask_pool(struct client *c)
{
	struct pool_waiter *w;

	IMAPSHIM_ASSERT(c->cl_waiter == NULL && c->cl_up == NULL &&
	    c->cl_who != NULL);
	w = xcalloc(1, sizeof(*w));
	snprintf(w->pw_mailbox, sizeof(w->pw_mailbox), "%s", c->cl_who->mailbox);
	snprintf(w->pw_domain, sizeof(w->pw_domain), "%s",
	    cl_cfg()->domain != NULL ? "" : c->cl_who->domain);
	w->pw_granted = cl_pool_granted;
	w->pw_failed = cl_pool_failed;
	w->pw_arg = c;
	/* Parked and idling, the only reason to ask is an IDLE poll. */
	w->pw_poll = c->cl_state == CL_S_PARKED_IDLE;
	c->cl_waiter = w;
	pool_acquire(w);
}

void
cl_waiter_end(struct client *c)
{
	struct pool_waiter *w = c->cl_waiter;

	if (w == NULL)
		return;
	c->cl_waiter = NULL;
	pool_cancel(w);		/* a no-op once the pool has called back */
	free(w);
}

/* ------------------------------------------------------------ callbacks */

void
cl_read_cb(struct bufferevent *bev, void *arg)
{
	struct client *c = arg;
	struct evbuffer *in = bufferevent_get_input(bev);
	struct imap_framer saved;
	struct imap_frame fr;
	const char *line;
	size_t before;
	bool authed;

	c->cl_active_ms = util_now_ms();
	relay_read_pending(bev);	/* runs after this callback */
	for (;;) {
		if (c->cl_logout || c->cl_end_bye != NULL ||
		    !cl_state_reads(c->cl_state))
			return;
		authed = cl_state_kind(c->cl_state) != CLIENT_UNAUTHENTICATED;
		if (c->cl_state == CL_S_HANDSHAKE || c->cl_state == CL_S_STARTTLS)
			return;		/* the TLS layer reads */
		if (authed && !cl_read_allowed(c, in))
			return;
		before = evbuffer_get_length(in);
		saved = c->cl_framer;
		if (!relay_frame_next(&c->cl_framer, in, &fr, &line)) {
			/* Bytes the framer discarded count as read too. */
			c->cl_bytes_in += before - evbuffer_get_length(in);
			return;
		}
		if (!authed) {
			c->cl_bytes_in += fr.len;
			cl_preauth_frame(c, &fr, line, in);
			continue;
		}
		cl_auth_frame(c, &fr, line, in);
		if (c->cl_unread) {
			/* The command waits in the input until attached. */
			c->cl_unread = false;
			c->cl_framer = saved;
			return;
		}
	}
}

void
cl_write_cb(struct bufferevent *bev, void *arg)
{
	struct client *c = arg;

	if (c->cl_state == CL_S_CLOSING) {
		if (evbuffer_get_length(bufferevent_get_output(bev)) == 0)
			reap_add(&c->cl_reap, cl_free, c);
		return;
	}
	if (c->cl_up != NULL)
		upstream_pause(c->cl_up, false);
}

void
cl_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct client *c = arg;

	if (c->cl_state == CL_S_CLOSING) {
		if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))
			reap_add(&c->cl_reap, cl_free, c);
		return;
	}
	if (what & BEV_EVENT_CONNECTED) {
		/* Stop watching records for tls_client_failure(). */
		if (c->cl_ssl != NULL)
			stats_client_tls(tls_handshake_done(c->cl_ssl));
		relay_read_pending(bev);
		if (c->cl_state == CL_S_HANDSHAKE) {
			cl_set_state(c, CL_S_NOTAUTH);
			cl_send_greeting(c);
		} else if (c->cl_state == CL_S_STARTTLS)
			cl_set_state(c, CL_S_NOTAUTH);
		return;
	}
	if (what & BEV_EVENT_EOF) {
		cl_close(c, "client-eof", NULL);
		return;
	}
	if (what & BEV_EVENT_ERROR) {
		if (c->cl_state == CL_S_HANDSHAKE || c->cl_state == CL_S_STARTTLS) {
			cl_log_tls_failure(c, bufferevent_get_openssl_error(bev));
			cl_close(c, "tls-handshake-failed", NULL);
		} else
			cl_close(c, "client-error", NULL);
	}
}

/* Waiting on the pool or on imapshim's own commands: not idleness. */
static bool
cl_busy(const struct client *c)
{
	if (c->cl_cur != CL_CUR_NONE)
		return false;	/* the client stopped half way: idle */
	return c->cl_ring.r_len > 0 || cl_states[c->cl_state].reading == false;
}

static void
cl_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct client *c = arg;
	const struct config *cfg = cl_cfg();
	uint64_t now = util_now_ms();

	(void)fd;
	(void)what;
	switch (cl_states[c->cl_state].timer) {
	case CL_T_CALLER:
		if (c->cl_state == CL_S_CLOSING)
			reap_add(&c->cl_reap, cl_free, c);
		else
			cl_auth_delay_over(c);
		return;
	case CL_T_LOGIN:
		cl_close(c, "login-timeout", "Login timeout.");
		return;
	case CL_T_NONE:
		return;
	case CL_T_ACTIVITY:
		break;
	}
	if (cl_awaits_upstream(c)) {
		if (now < c->cl_up_active_ms + cfg->command_timeout_ms) {
			cl_timer_update(c);
			return;
		}
		cl_command_overdue(c);
		return;
	}
	if (now < c->cl_active_ms + cfg->client_idle_timeout_ms) {
		cl_timer_update(c);
		return;
	}
	if (cl_busy(c)) {
		/* The server is working (a long FETCH), the client idles in
		 * IDLE, or imapshim is busy for it: not idleness. */
		cl_arm_timer(c, cfg->client_idle_timeout_ms);
		return;
	}
	cl_close(c, "idle-timeout", "Autologout; idle for too long.");
}

void
client_init(const struct client_env *env)
{
	cl_env = env;
	cl_stage_init();
}

void
client_new(evutil_socket_t fd, const struct sockaddr *sa, socklen_t salen,
    enum client_listener kind)
{
	struct client *c;
	int one = 1;

	(void)salen;
	c = xcalloc(1, sizeof(*c));
	c->cl_id = cl_next_id++;
	c->cl_kind = kind;
	c->cl_started_ms = c->cl_active_ms = util_now_ms();
	addr_sockaddr_str(sa, c->cl_peer, sizeof(c->cl_peer));
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (kind == CLIENT_LISTEN_IMPLICIT_TLS) {
		c->cl_ssl = tls_server_ssl_new(cl_env->server_ctx);
		if (c->cl_ssl != NULL)
			c->cl_bev = bufferevent_openssl_socket_new(cl_env->base,
			    fd, c->cl_ssl, BUFFEREVENT_SSL_ACCEPTING,
			    BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
		c->cl_tls = true;
		c->cl_state = CL_S_HANDSHAKE;
	} else {
		c->cl_bev = bufferevent_socket_new(cl_env->base, fd,
		    BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
		c->cl_state = CL_S_NOTAUTH;
	}
	c->cl_timer = evtimer_new(cl_env->base, cl_timer_cb, c);
	c->cl_park_ev = evtimer_new(cl_env->base, cl_park_timer_cb, c);
	c->cl_cmd = evbuffer_new();
	resync_snap_init(&c->cl_snap);
	resync_snap_init(&c->cl_now);
	if (c->cl_bev == NULL || c->cl_timer == NULL || c->cl_cmd == NULL ||
	    c->cl_park_ev == NULL) {
		log_error("client_new", "peer=%s reason=out-of-resources", c->cl_peer);
		if (c->cl_bev != NULL)
			bufferevent_free(c->cl_bev);
		else {
			if (c->cl_ssl != NULL)
				SSL_free(c->cl_ssl);
			close(fd);
		}
		if (c->cl_timer != NULL)
			event_free(c->cl_timer);
		if (c->cl_park_ev != NULL)
			event_free(c->cl_park_ev);
		if (c->cl_cmd != NULL)
			evbuffer_free(c->cl_cmd);
		free(c);
		return;
	}
	if (c->cl_tls) {
		bufferevent_openssl_set_allow_dirty_shutdown(c->cl_bev, 1);
		relay_read_ahead(c->cl_bev);
	}
	TAILQ_INSERT_TAIL(&cl_all, c, cl_link);
	cl_count++;
	/* Descriptors are shared with the pool's sessions (DESIGN 3.3 P13). */
	pool_set_clients(cl_count);
	cl_state_counts[c->cl_state]++;
	cl_unauth_add(c, sa);
	imap_framer_init(&c->cl_framer, cl_cfg()->max_command_bytes,
	    CL_PREAUTH_LITERAL_MAX);
	bufferevent_setcb(c->cl_bev, cl_read_cb, cl_write_cb, cl_event_cb, c);
	bufferevent_setwatermark(c->cl_bev, EV_WRITE, RELAY_LOWAT, 0);
	bufferevent_enable(c->cl_bev, EV_READ | EV_WRITE);
	cl_arm_timer(c, cl_cfg()->client_login_timeout_ms);
	log_info("client_accept", "id=%llu peer=%s listener=%s",
	    (unsigned long long)c->cl_id, c->cl_peer,
	    kind == CLIENT_LISTEN_IMPLICIT_TLS ? "tls" : "starttls");
	if (protolog_enabled()) {
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);
		char sip[64];

		if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0)
			c->cl_sip = xstrdup(addr_sockaddr_str(
			    (struct sockaddr *)&ss, sip, sizeof(sip)));
		cl_plog(c, "OpenSession", "", 0, 0, 0, "");
	}
	if (kind == CLIENT_LISTEN_STARTTLS)
		cl_send_greeting(c);
}

void
client_trim(uint64_t quiet_ms)
{
	struct client *c;
	uint64_t now = util_now_ms();

	TAILQ_FOREACH(c, &cl_all, cl_link) {
		if (now - c->cl_active_ms < quiet_ms ||
		    now - c->cl_up_active_ms < quiet_ms)
			continue;
		tls_release_buffers(c->cl_ssl);
		if (c->cl_inflight == 0 && c->cl_cur == CL_CUR_NONE &&
		    c->cl_state != CL_S_RECOVERING)
			cl_replay_release(c);
	}
}

void
client_free_all(void)
{
	struct client *c;

	client_close_all("imapshim shutting down.");
	while ((c = TAILQ_FIRST(&cl_all)) != NULL) {
		if (c->cl_reap.re_queued)
			reap_run();
		else
			cl_free(c);
	}
	cl_stage_free();
}

/*
 * End c with "* BYE bye": now, unless a relayed command is in flight (an
 * IDLE is not such a command): that one gets its tagged reply first (3.6
 * L2), nothing more is read meanwhile, and the reply closes the session
 * (client_relay.c).
 */
void
cl_end(struct client *c, const char *reason, const char *bye)
{
	if (c->cl_state == CL_S_CLOSING)
		return;
	if ((c->cl_state == CL_S_ATTACHED ||
	    c->cl_state == CL_S_RECOVERING) && c->cl_inflight > 0 &&
	    !cl_state_idling(c->cl_state) &&
	    (cl_ring_inflight(&c->cl_ring) == NULL ||
	    cl_ring_inflight(&c->cl_ring)->rerun != CL_RERUN_IDLE)) {
		c->cl_end_reason = reason;
		c->cl_end_bye = bye;
		return;
	}
	cl_close(c, reason, bye);
}

void
client_drain(const char *bye)
{
	struct client *c, *next;

	for (c = TAILQ_FIRST(&cl_all); c != NULL; c = next) {
		next = TAILQ_NEXT(c, cl_link);
		cl_end(c, "shutdown", bye);
	}
}

void
client_foreach(void (*fn)(const struct client_info *ci, void *arg), void *arg)
{
	struct client_info ci;
	struct client *c;

	TAILQ_FOREACH(c, &cl_all, cl_link) {
		if (c->cl_state == CL_S_CLOSING)
			continue;
		ci.id = c->cl_id;
		ci.peer = c->cl_peer;
		ci.mailbox = c->cl_who != NULL ? c->cl_who->mailbox : "";
		ci.admin = c->cl_who != NULL ? c->cl_who->admin : "";
		ci.state = cl_state_name(c->cl_state);
		ci.kind = cl_state_kind(c->cl_state);
		ci.since_ms = c->cl_started_ms;
		ci.up = c->cl_up;
		fn(&ci, arg);
	}
}

unsigned
client_kick(uint64_t id, const char *mailbox, const char *bye)
{
	struct client *c, *next;
	unsigned n = 0;

	for (c = TAILQ_FIRST(&cl_all); c != NULL; c = next) {
		next = TAILQ_NEXT(c, cl_link);
		if (c->cl_state == CL_S_CLOSING || (mailbox != NULL ?
		    (c->cl_who == NULL || !util_ieq(c->cl_who->mailbox,
		    mailbox)) : c->cl_id != id))
			continue;
		cl_end(c, "kicked", bye);
		n++;
	}
	return n;
}
