/* upstream.c - the upstream session state machine. */
#include "upstream.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/dns.h>
#include <event2/event.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <time.h>

#include "auth.h"
#include "imapshim.h"
#include "log.h"
#include "reap.h"
#include "relay.h"
#include "stats.h"
#include "tls.h"
#include "util.h"

#define UP_MAX_CAPS 64
/* How long a closing session waits for the server to answer LOGOUT. */
#define UP_LOGOUT_WAIT_MS 2000

struct upstream {
	uint64_t up_id;
	enum up_state up_state;
	struct event_base *up_base;
	struct bufferevent *up_bev;
	SSL *up_ssl;
	struct event *up_timer;

	char *up_host;
	char *up_port;
	char up_server[300];		/* "host:port" for logs */
	enum config_tls_mode up_tls;
	SSL_CTX *up_ssl_ctx;
	char *up_tls_name;
	bool up_tls_verify;
	char *up_user;
	char *up_password;
	uint64_t up_connect_timeout_ms;
	uint64_t up_login_timeout_ms;

	const struct upstream_cbs *up_cbs;
	void *up_arg;

	struct imap_framer up_framer;
	bool up_logged_in;
	bool up_starttls_done;
	unsigned up_tagno;
	char up_tag[16];		/* tag of the internal command in flight */
	char *up_capbuf;
	const char *up_caps[UP_MAX_CAPS];
	size_t up_ncaps;

	unsigned up_no;			/* tagged NO seen */
	unsigned up_bad;		/* tagged BAD seen */
	bool up_out_full;
	bool up_paused;
	bool up_closing;
	bool up_fail_pending;		/* failure to report from the timer */
	enum up_fail up_fail_why;
	char up_fail_reason[512];
	const char *up_close_reason;
	uint64_t up_started_ms;
	void (*up_on_free)(void *);
	void *up_free_arg;
	/* internal command in flight (upstream_command) */
	void (*up_cmd_done)(void *arg, bool ok);
	void (*up_cmd_line)(void *arg, const char *line, size_t len);
	void *up_cmd_arg;
	struct reap_entry up_reap;
	TAILQ_ENTRY(upstream) up_link;
};

static TAILQ_HEAD(, upstream) up_all = TAILQ_HEAD_INITIALIZER(up_all);
static unsigned up_count;

static const char *const up_state_names[] = {
	"connecting", "handshake", "greeting", "starttls", "capability",
	"login", "ready", "closing",
};
_Static_assert(nitems(up_state_names) == UP_S_COUNT, "state names");

static const char *const up_fail_names[] = {
	"connect", "tls", "certificate", "greeting", "login", "timeout",
	"protocol",
};
_Static_assert(nitems(up_fail_names) == UP_FAIL_COUNT, "fail names");

static uint64_t up_next_id = 1;

static void up_read_cb(struct bufferevent *bev, void *arg);
static void up_close(struct upstream *u, const char *reason, bool logout);
static void up_write_cb(struct bufferevent *bev, void *arg);
static void up_event_cb(struct bufferevent *bev, short what, void *arg);
static void up_fail(struct upstream *u, enum up_fail why, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

const char *
upstream_state_name(enum up_state st)
{
	return st < UP_S_COUNT ? up_state_names[st] : "?";
}

const char *
upstream_fail_name(enum up_fail why)
{
	return why < UP_FAIL_COUNT ? up_fail_names[why] : "?";
}

static void
up_set_state(struct upstream *u, enum up_state to)
{
	log_debug("upstream_state", "up=%llu server=%s from=%s to=%s",
	    (unsigned long long)u->up_id, u->up_server,
	    up_state_names[u->up_state], up_state_names[to]);
	u->up_state = to;
}

static void
up_arm_timer(struct upstream *u, uint64_t ms)
{
	struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000 };

	evtimer_add(u->up_timer, &tv);
}

static void
up_free(void *obj)
{
	struct upstream *u = obj;

	TAILQ_REMOVE(&up_all, u, up_link);
	up_count--;
	if (u->up_bev != NULL) {
		evutil_socket_t fd = bufferevent_getfd(u->up_bev);

		tls_close_notify(u->up_ssl);
		/* libevent closes the socket in a later callback; the budget
		 * slot is given back below, so end the connection now: the
		 * server never sees budget + 1 connections. */
		if (fd >= 0)
			(void)shutdown(fd, SHUT_RDWR);
		bufferevent_free(u->up_bev);
	}
	if (u->up_on_free != NULL)
		u->up_on_free(u->up_free_arg);
	if (u->up_timer != NULL)
		event_free(u->up_timer);
	free(u->up_host);
	free(u->up_port);
	free(u->up_tls_name);
	free(u->up_user);
	util_secret_free(u->up_password);
	free(u->up_capbuf);
	free(u);
}

/* Send an internal command with a fresh tag. */
static void
up_send(struct upstream *u, const char *cmd)
{
	snprintf(u->up_tag, sizeof(u->up_tag), "U%u", ++u->up_tagno);
	evbuffer_add_printf(bufferevent_get_output(u->up_bev), "%s %s\r\n",
	    u->up_tag, cmd);
	relay_write_now(u->up_bev);
}

static void
up_parse_caps(struct upstream *u, const char *s, size_t len)
{
	char *p, *save, *tok;

	free(u->up_capbuf);
	u->up_capbuf = xstrndup(s, len);
	u->up_ncaps = 0;
	for (p = u->up_capbuf; *p; p++)
		if (*p >= 'a' && *p <= 'z')
			*p = (char)(*p - 'a' + 'A');
	for (tok = strtok_r(u->up_capbuf, " ", &save); tok != NULL &&
	    u->up_ncaps < UP_MAX_CAPS; tok = strtok_r(NULL, " ", &save))
		u->up_caps[u->up_ncaps++] = tok;
}

/* "[CAPABILITY a b c]" response code, if any. */
static bool
up_caps_from_code(struct upstream *u, const struct imap_resp *r)
{
	if (r->code == NULL || r->code_len < 10 ||
	    !util_ieqn(r->code, 10, "CAPABILITY"))
		return false;
	if (r->code_len > 11)
		up_parse_caps(u, r->code + 11, r->code_len - 11);
	else
		up_parse_caps(u, "", 0);
	return true;
}

bool
upstream_has_cap(const struct upstream *u, const char *cap)
{
	size_t i;

	for (i = 0; i < u->up_ncaps; i++)
		if (util_ieq(u->up_caps[i], cap))
			return true;
	return false;
}

const char *
upstream_cap(const struct upstream *u, size_t i)
{
	return i < u->up_ncaps ? u->up_caps[i] : NULL;
}

uint64_t
upstream_id(const struct upstream *u)
{
	return u->up_id;
}

enum up_state
upstream_state(const struct upstream *u)
{
	return u->up_state;
}

unsigned
upstream_failed_responses(const struct upstream *u, unsigned *bad_r)
{
	if (bad_r != NULL)
		*bad_r = u->up_bad;
	return u->up_no + u->up_bad;
}

void
upstream_set_lessee(struct upstream *u, const struct upstream_cbs *cbs,
    void *arg)
{
	if (u->up_closing)
		return;
	u->up_cbs = cbs;
	u->up_arg = arg;
	u->up_out_full = false;
	upstream_pause(u, false);
}

int
upstream_command(struct upstream *u, const char *cmd,
    void (*done)(void *arg, bool ok), void *arg)
{
	return upstream_command_lines(u, cmd, NULL, done, arg);
}

int
upstream_command_lines(struct upstream *u, const char *cmd,
    void (*line)(void *arg, const char *text, size_t len),
    void (*done)(void *arg, bool ok), void *arg)
{
	if (u->up_closing || u->up_state != UP_S_READY || u->up_cmd_done != NULL ||
	    !imap_framer_at_boundary(&u->up_framer))
		return -1;
	u->up_cmd_done = done;
	u->up_cmd_line = line;
	u->up_cmd_arg = arg;
	up_arm_timer(u, u->up_login_timeout_ms);
	up_send(u, cmd);
	log_debug("upstream_send", "up=%llu tag=%s command=%s",
	    (unsigned long long)u->up_id, u->up_tag, log_v(cmd));
	return 0;
}

/* End the internal command in flight, if any.  Returns true if there was one. */
static bool
up_cmd_finish(struct upstream *u, bool ok)
{
	void (*done)(void *, bool) = u->up_cmd_done;

	if (done == NULL)
		return false;
	u->up_cmd_done = NULL;
	if (!u->up_closing)
		evtimer_del(u->up_timer);
	done(u->up_cmd_arg, ok);
	return true;
}

struct evbuffer *
upstream_output(struct upstream *u)
{
	return bufferevent_get_output(u->up_bev);
}

void
upstream_flush(struct upstream *u)
{
	if (!u->up_closing)
		relay_write_now(u->up_bev);
}

bool
upstream_output_full(struct upstream *u)
{
	if (relay_output_full(u->up_bev))
		u->up_out_full = true;
	return u->up_out_full;
}

void
upstream_pause(struct upstream *u, bool pause)
{
	if (u->up_closing || u->up_paused == pause)
		return;
	u->up_paused = pause;
	if (pause)
		bufferevent_disable(u->up_bev, EV_READ);
	else {
		bufferevent_enable(u->up_bev, EV_READ);
		/* Bytes already buffered produce no new read event. */
		if (evbuffer_get_length(bufferevent_get_input(u->up_bev)) > 0)
			bufferevent_trigger(u->up_bev, EV_READ,
			    BEV_TRIG_DEFER_CALLBACKS);
		relay_read_pending(u->up_bev);
	}
}

static void
up_fail(struct upstream *u, enum up_fail why, const char *fmt, ...)
{
	va_list ap;

	if (u->up_closing || u->up_fail_pending)
		return;
	va_start(ap, fmt);
	vsnprintf(u->up_fail_reason, sizeof(u->up_fail_reason), fmt, ap);
	va_end(ap);
	u->up_fail_why = why;
	/* Report from the timer so that the lessee never sees a callback
	 * from inside upstream_new() or from deep inside our own parsing. */
	u->up_fail_pending = true;
	bufferevent_disable(u->up_bev, EV_READ);
	evtimer_del(u->up_timer);
	event_active(u->up_timer, EV_TIMEOUT, 0);
}

static void
up_report_failure(struct upstream *u)
{
	const struct upstream_cbs *cbs = u->up_cbs;
	void *arg = u->up_arg;

	log_warn("upstream_fail", "up=%llu server=%s stage=%s class=%s reason=%s",
	    (unsigned long long)u->up_id, u->up_server,
	    up_state_names[u->up_state], up_fail_names[u->up_fail_why],
	    log_v(u->up_fail_reason));
	u->up_cbs = NULL;
	if (cbs != NULL && cbs->failed != NULL)
		cbs->failed(arg, u->up_fail_why, u->up_fail_reason);
	upstream_close(u, up_fail_names[u->up_fail_why]);
}

static void
up_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct upstream *u = arg;

	(void)fd;
	(void)what;
	if (u->up_fail_pending) {
		up_report_failure(u);
		return;
	}
	if (u->up_closing) {
		reap_add(&u->up_reap, up_free, u);
		return;
	}
	if (u->up_state < UP_S_READY) {
		up_fail(u, UP_FAIL_TIMEOUT, "no answer from the server within "
		    "%s", u->up_state <= UP_S_HANDSHAKE ? "connect_timeout" :
		    "login_timeout");
		return;
	}
	if (u->up_cmd_done != NULL) {
		/* Our own NOOP, reset or snapshot got no answer: the
		 * session is stuck; its owner learns of it through done. */
		void (*done)(void *, bool) = u->up_cmd_done;
		void *done_arg = u->up_cmd_arg;

		log_warn("upstream_command_timeout", "up=%llu server=%s tag=%s",
		    (unsigned long long)u->up_id, u->up_server, u->up_tag);
		/* Closing first, so the owner sees a lost session. */
		upstream_abort(u, "command-timeout");
		done(done_arg, false);
	}
}

static void
up_ready(struct upstream *u)
{
	evtimer_del(u->up_timer);
	up_set_state(u, UP_S_READY);
	log_info("upstream_login", "up=%llu server=%s user=%s ms=%llu",
	    (unsigned long long)u->up_id, u->up_server, log_v(u->up_user),
	    (unsigned long long)(util_now_ms() - u->up_started_ms));
	if (u->up_cbs != NULL && u->up_cbs->ready != NULL)
		u->up_cbs->ready(u->up_arg);
}

static void
up_send_login(struct upstream *u)
{
	char cmd[2 * IMAPSHIM_PASSWORD_MAX + 64];
	int n;

	if (upstream_has_cap(u, "LOGINDISABLED")) {
		up_fail(u, UP_FAIL_PROTOCOL, "server announces LOGINDISABLED "
		    "(use tls = implicit or starttls)");
		return;
	}
	snprintf(u->up_tag, sizeof(u->up_tag), "U%u", ++u->up_tagno);
	n = auth_build_login(u->up_tag, u->up_user, u->up_password,
	    upstream_has_cap(u, "LITERAL+"), cmd, sizeof(cmd));
	if (n < 0) {
		up_fail(u, UP_FAIL_PROTOCOL, "login name or password cannot "
		    "be sent to this server");
		return;
	}
	evbuffer_add(bufferevent_get_output(u->up_bev), cmd, (size_t)n);
	OPENSSL_cleanse(cmd, sizeof(cmd));
	up_set_state(u, UP_S_LOGIN);
	log_debug("upstream_send", "up=%llu tag=%s command=LOGIN args=%s",
	    (unsigned long long)u->up_id, u->up_tag, LOG_MASKED);
}

static void
up_start_tls(struct upstream *u)
{
	struct bufferevent *plain = u->up_bev, *tls_bev;
	evutil_socket_t fd = bufferevent_getfd(plain);

	u->up_ssl = tls_client_ssl_new(u->up_ssl_ctx, u->up_tls_name,
	    u->up_tls_verify, u->up_server);
	if (u->up_ssl == NULL) {
		up_fail(u, UP_FAIL_TLS, "cannot set up TLS for %s", u->up_tls_name);
		return;
	}
	/*
	 * The TLS bufferevent takes the socket over from the plain one that
	 * connected it (and, with STARTTLS, read the greeting): OpenSSL then
	 * reads and writes the socket itself, with no filter layer copying
	 * every record through a second pair of buffers.
	 */
	tls_bev = bufferevent_openssl_socket_new(u->up_base, fd, u->up_ssl,
	    BUFFEREVENT_SSL_CONNECTING,
	    BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
	if (tls_bev == NULL) {
		SSL_free(u->up_ssl);
		u->up_ssl = NULL;
		up_fail(u, UP_FAIL_TLS, "cannot set up TLS for %s", u->up_tls_name);
		return;
	}
	bufferevent_disable(plain, EV_READ | EV_WRITE);
	bufferevent_setfd(plain, -1);
	bufferevent_free(plain);
	bufferevent_openssl_set_allow_dirty_shutdown(tls_bev, 1);
	relay_read_ahead(tls_bev);
	u->up_bev = tls_bev;
	bufferevent_setcb(tls_bev, up_read_cb, up_write_cb, up_event_cb, u);
	bufferevent_setwatermark(tls_bev, EV_WRITE, RELAY_LOWAT, 0);
	bufferevent_enable(tls_bev, EV_READ | EV_WRITE);
	up_set_state(u, UP_S_HANDSHAKE);
}

/* The server refused the login (NO or BAD): count it, fail with its words. */
static void
up_login_refused(struct upstream *u, const struct imap_resp *r)
{
	u->up_no += r->status == IMAP_ST_NO;
	u->up_bad += r->status == IMAP_ST_BAD;
	/* The response code stays in: "[AUTHENTICATIONFAILED]" and
	 * "[UNAVAILABLE]" decide how retry.c classifies the refusal. */
	up_fail(u, UP_FAIL_LOGIN, "%s%s%.*s%s%.*s",
	    r->status == IMAP_ST_NO ? "NO" : "BAD", r->code != NULL ? " [" : "",
	    (int)(r->code != NULL ? (r->code_len > 200 ? 200 : r->code_len) : 0),
	    r->code != NULL ? r->code : "", r->code != NULL ? "] " : " ",
	    (int)(r->text_len > 300 ? 300 : r->text_len), r->text);
}

/* One response line while logging in. */
static void
up_login_line(struct upstream *u, const char *line, size_t len)
{
	struct imap_resp r;
	bool mine;

	imap_parse_response(line, len, &r);
	mine = r.kind == IMAP_RESP_TAGGED &&
	    util_ieqn(r.tag.p, r.tag.len, u->up_tag);
	if (r.kind == IMAP_RESP_TAGGED && !mine)
		return;		/* stale tag: ignore */
	switch (u->up_state) {
	case UP_S_GREETING:
		if (r.kind == IMAP_RESP_UNTAGGED && r.status == IMAP_ST_OK) {
			bool known = up_caps_from_code(u, &r);

			if (u->up_tls == CFG_TLS_STARTTLS && !u->up_starttls_done) {
				up_send(u, "STARTTLS");
				up_set_state(u, UP_S_STARTTLS);
			} else if (known)
				up_send_login(u);
			else {
				up_send(u, "CAPABILITY");
				up_set_state(u, UP_S_CAPABILITY);
			}
		} else if (r.kind == IMAP_RESP_UNTAGGED && r.status == IMAP_ST_BYE)
			up_fail(u, UP_FAIL_GREETING, "server greeted with "
			    "\"* BYE %.*s\"", (int)(len > 200 ? 200 : r.text_len),
			    r.text);
		else
			up_fail(u, UP_FAIL_GREETING, "not an IMAP greeting");
		break;
	case UP_S_STARTTLS:
		if (!mine)
			break;
		if (r.status != IMAP_ST_OK) {
			up_fail(u, UP_FAIL_TLS, "server refused STARTTLS: %.*s",
			    (int)(r.text_len > 200 ? 200 : r.text_len), r.text);
			break;
		}
		/* Anything the server sent after its OK came before TLS and
		 * must not be trusted (STARTTLS response injection). */
		evbuffer_drain(bufferevent_get_input(u->up_bev),
		    evbuffer_get_length(bufferevent_get_input(u->up_bev)));
		u->up_starttls_done = true;
		up_start_tls(u);
		break;
	case UP_S_CAPABILITY:
		if (r.kind == IMAP_RESP_UNTAGGED && r.status == IMAP_ST_NONE &&
		    len >= 12 && util_ieqn(line, 12, "* CAPABILITY")) {
			size_t n = len;

			while (n > 0 && (line[n - 1] == '\r' || line[n - 1] == '\n'))
				n--;
			up_parse_caps(u, line + 12, n > 12 ? n - 12 : 0);
			break;
		}
		if (!mine)
			break;
		if (r.status != IMAP_ST_OK && u->up_logged_in) {
			/* Exchange Online says OK to LOGIN and then "BAD User
			 * is authenticated but not connected." to everything:
			 * the login failed after all (DESIGN 3.5). */
			up_login_refused(u, &r);
			break;
		}
		if (r.status != IMAP_ST_OK) {
			up_fail(u, UP_FAIL_PROTOCOL, "CAPABILITY failed");
			break;
		}
		if (u->up_logged_in)
			up_ready(u);
		else
			up_send_login(u);
		break;
	case UP_S_LOGIN:
		if (!mine)
			break;
		if (r.status != IMAP_ST_OK) {
			up_login_refused(u, &r);
			break;
		}
		u->up_logged_in = true;
		if (up_caps_from_code(u, &r))
			up_ready(u);
		else {
			/* Capabilities may change after login. */
			up_send(u, "CAPABILITY");
			up_set_state(u, UP_S_CAPABILITY);
		}
		break;
	default:
		break;
	}
}

/* A frame while ready: count Exchange's failure counters, hand to lessee. */
static void
up_ready_frame(struct upstream *u, const struct imap_frame *fr,
    const char *line)
{
	struct evbuffer *in = bufferevent_get_input(u->up_bev);
	struct imap_resp r, *rp = NULL;

	if (fr->kind == IMAP_FR_LINE && fr->first) {
		imap_parse_response(line, fr->text_len, &r);
		rp = &r;
		if (r.kind == IMAP_RESP_TAGGED) {
			u->up_no += r.status == IMAP_ST_NO;
			u->up_bad += r.status == IMAP_ST_BAD;
		}
	}
	if (u->up_cmd_done != NULL) {
		/* Our own command: nobody sees its responses. */
		bool mine = rp != NULL && r.kind == IMAP_RESP_TAGGED &&
		    util_ieqn(r.tag.p, r.tag.len, u->up_tag);

		if (rp != NULL && r.kind == IMAP_RESP_UNTAGGED &&
		    u->up_cmd_line != NULL)
			u->up_cmd_line(u->up_cmd_arg, line, fr->text_len);
		evbuffer_drain(in, fr->len);
		if (mine)
			up_cmd_finish(u, r.status == IMAP_ST_OK);
		return;
	}
	if (u->up_cbs != NULL && u->up_cbs->frame != NULL)
		u->up_cbs->frame(u->up_arg, fr, rp, in);
	else
		evbuffer_drain(in, fr->len);
}

/*
 * A ready session is gone (closed by the server, broken, unframeable).
 * Closed first, so whoever hears of it sees a lost session; then the owner
 * of the internal command in flight hears of it, else the lessee.
 */
static void
up_lost(struct upstream *u, const char *reason, const char *why)
{
	const struct upstream_cbs *cbs = u->up_cbs;
	void *lessee = u->up_arg;
	void (*done)(void *, bool) = u->up_cmd_done;
	void *done_arg = u->up_cmd_arg;

	up_close(u, reason, false);
	if (done != NULL)
		done(done_arg, false);
	else if (cbs != NULL && cbs->lost != NULL)
		cbs->lost(lessee, why);
}

static void
up_read_cb(struct bufferevent *bev, void *arg)
{
	struct upstream *u = arg;
	struct evbuffer *in = bufferevent_get_input(bev);
	struct imap_frame fr;
	const char *line;

	relay_read_pending(bev);	/* runs after this callback */
	while (!u->up_fail_pending && !u->up_paused &&
	    relay_frame_next(&u->up_framer, in, &fr, &line)) {
		if (fr.kind == IMAP_FR_OVERFLOW ||
		    (fr.kind == IMAP_FR_LINE && fr.lit_toobig)) {
			/* A line past our limit, or a literal length no real
			 * server sends: the stream cannot be framed any more. */
			evbuffer_drain(in, fr.len);
			if (u->up_closing)
				continue;
			if (u->up_state == UP_S_READY) {
				/* Framing is lost: the lessee cannot be served. */
				up_lost(u, "response-too-long",
				    "response line too long");
			} else
				up_fail(u, UP_FAIL_PROTOCOL, "response line too long");
			return;
		}
		if (u->up_closing) {
			if (fr.kind == IMAP_FR_LINE && fr.first &&
			    fr.len > strlen(u->up_tag) &&
			    strncmp(line, u->up_tag, strlen(u->up_tag)) == 0 &&
			    line[strlen(u->up_tag)] == ' ')
				reap_add(&u->up_reap, up_free, u);
			evbuffer_drain(in, fr.len);
			continue;
		}
		if (u->up_state == UP_S_READY) {
			up_ready_frame(u, &fr, line);
			continue;
		}
		if (fr.kind == IMAP_FR_LINE && fr.first)
			up_login_line(u, line, fr.text_len);
		evbuffer_drain(in, fr.len);
	}
	if (u->up_state == UP_S_READY && !u->up_closing && u->up_cbs != NULL &&
	    u->up_cbs->read_done != NULL)
		u->up_cbs->read_done(u->up_arg);
}

static void
up_write_cb(struct bufferevent *bev, void *arg)
{
	struct upstream *u = arg;

	(void)bev;
	if (u->up_closing)
		return;
	if (u->up_out_full) {
		u->up_out_full = false;
		if (u->up_cbs != NULL && u->up_cbs->writable != NULL)
			u->up_cbs->writable(u->up_arg);
	}
}

static void
up_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct upstream *u = arg;
	char reason[512];
	int one = 1;

	if (u->up_closing) {
		if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))
			reap_add(&u->up_reap, up_free, u);
		return;
	}
	if (what & BEV_EVENT_CONNECTED) {
		if (u->up_state == UP_S_CONNECTING) {
			evutil_socket_t fd = bufferevent_getfd(bev);

			setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
			if (u->up_tls == CFG_TLS_IMPLICIT)
				up_start_tls(u);
			else {
				up_arm_timer(u, u->up_login_timeout_ms);
				up_set_state(u, UP_S_GREETING);
				bufferevent_enable(bev, EV_READ);
			}
		} else if (u->up_state == UP_S_HANDSHAKE) {
			stats_upstream_tls(tls_handshake_done(u->up_ssl));
			relay_read_pending(bev);
			tls_cert_seen(u->up_ssl, u->up_server, (int64_t)time(NULL));
			if (!u->up_starttls_done)
				up_arm_timer(u, u->up_login_timeout_ms);
			if (u->up_starttls_done) {
				up_send(u, "CAPABILITY");
				up_set_state(u, UP_S_CAPABILITY);
			} else
				up_set_state(u, UP_S_GREETING);
		}
		return;
	}
	if (!(what & (BEV_EVENT_EOF | BEV_EVENT_ERROR)))
		return;
	switch (u->up_state) {
	case UP_S_CONNECTING: {
		int dnserr = bufferevent_socket_get_dns_error(bev);

		if (dnserr != 0)
			up_fail(u, UP_FAIL_CONNECT, "cannot resolve %s: %s",
			    u->up_host, evutil_gai_strerror(dnserr));
		else
			up_fail(u, UP_FAIL_CONNECT, "cannot connect: %s",
			    evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
		break;
	}
	case UP_S_HANDSHAKE: {
		unsigned long e = bufferevent_get_openssl_error(bev);

		tls_forget_session(u->up_ssl);
		tls_failure_reason(u->up_ssl, e, reason, sizeof(reason));
		up_fail(u, tls_failed_verification(u->up_ssl) ? UP_FAIL_CERT :
		    UP_FAIL_TLS, "%s", reason);
		break;
	}
	case UP_S_READY:
		up_lost(u, (what & BEV_EVENT_EOF) ? "server-eof" :
		    "server-error", (what & BEV_EVENT_EOF) ?
		    "server closed the connection" : "connection error");
		break;
	default:
		/* Whatever the server said last (e.g. "* BYE ...") was read
		 * already; the framer handled complete lines. */
		up_fail(u, UP_FAIL_PROTOCOL, "connection closed by the server "
		    "during %s", up_state_names[u->up_state]);
		break;
	}
}

struct upstream *
upstream_new(struct event_base *base, struct evdns_base *dns,
    const struct upstream_params *p, const struct upstream_cbs *cbs,
    void *arg)
{
	struct upstream *u = xcalloc(1, sizeof(*u));

	u->up_id = up_next_id++;
	u->up_base = base;
	u->up_host = xstrdup(p->host);
	u->up_port = xstrdup(p->port);
	snprintf(u->up_server, sizeof(u->up_server), "%s%s%s:%s",
	    strchr(p->host, ':') ? "[" : "", p->host,
	    strchr(p->host, ':') ? "]" : "", p->port);
	u->up_tls = p->tls;
	u->up_ssl_ctx = p->ssl_ctx;
	u->up_tls_name = xstrdup(p->tls_name ? p->tls_name : p->host);
	u->up_tls_verify = p->tls_verify;
	u->up_user = xstrdup(p->login_user);
	u->up_password = xstrdup(p->password);
	u->up_connect_timeout_ms = p->connect_timeout_ms;
	u->up_login_timeout_ms = p->login_timeout_ms;
	u->up_cbs = cbs;
	u->up_arg = arg;
	u->up_started_ms = util_now_ms();
	u->up_on_free = p->on_free;
	u->up_free_arg = p->free_arg;
	imap_framer_init(&u->up_framer, IMAPSHIM_UPSTREAM_LINE_MAX, UINT64_MAX);
	u->up_timer = evtimer_new(base, up_timer_cb, u);
	u->up_bev = bufferevent_socket_new(base, -1,
	    BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
	if (u->up_timer == NULL || u->up_bev == NULL)
		log_fatal("upstream_new", "reason=out-of-memory");
	bufferevent_setcb(u->up_bev, up_read_cb, up_write_cb, up_event_cb, u);
	bufferevent_setwatermark(u->up_bev, EV_WRITE, RELAY_LOWAT, 0);
	/* No reading until connected: a server that answers at once (a
	 * plaintext "* BYE" to our TLS) must find its words still in the
	 * socket when TLS takes it over, not in this bufferevent's input. */
	bufferevent_enable(u->up_bev, EV_WRITE);
	u->up_state = UP_S_CONNECTING;
	TAILQ_INSERT_TAIL(&up_all, u, up_link);
	up_count++;
	/* connect_timeout covers TCP and TLS; login_timeout the rest. */
	up_arm_timer(u, p->connect_timeout_ms);
	log_debug("upstream_connect", "up=%llu server=%s user=%s",
	    (unsigned long long)u->up_id, u->up_server, log_v(u->up_user));
	if (bufferevent_socket_connect_hostname(u->up_bev, dns, AF_UNSPEC,
	    p->host, atoi(p->port)) != 0)
		up_fail(u, UP_FAIL_CONNECT, "cannot connect to %s", u->up_server);
	return u;
}

static void
up_close(struct upstream *u, const char *reason, bool logout)
{
	if (u->up_closing)
		return;
	u->up_closing = true;
	u->up_close_reason = reason;
	u->up_cbs = NULL;
	u->up_cmd_done = NULL;
	evtimer_del(u->up_timer);
	log_info("upstream_close", "up=%llu server=%s user=%s state=%s "
	    "reason=%s no=%u bad=%u duration_ms=%llu",
	    (unsigned long long)u->up_id, u->up_server, log_v(u->up_user),
	    up_state_names[u->up_state], log_v(reason), u->up_no, u->up_bad,
	    (unsigned long long)(util_now_ms() - u->up_started_ms));
	if (logout && u->up_state == UP_S_READY && !u->up_fail_pending &&
	    imap_framer_at_boundary(&u->up_framer)) {
		/* A polite LOGOUT lets Exchange free the session at once
		 * instead of at its idle timeout. */
		up_send(u, "LOGOUT");
		bufferevent_enable(u->up_bev, EV_READ);
		relay_read_pending(u->up_bev);
		u->up_paused = false;
		up_set_state(u, UP_S_CLOSING);
		up_arm_timer(u, UP_LOGOUT_WAIT_MS);
		return;
	}
	up_set_state(u, UP_S_CLOSING);
	reap_add(&u->up_reap, up_free, u);
}

void
upstream_trim(void)
{
	struct upstream *u;

	TAILQ_FOREACH(u, &up_all, up_link)
		if (!u->up_closing && u->up_state == UP_S_READY)
			tls_release_buffers(u->up_ssl);
}

void
upstream_close(struct upstream *u, const char *reason)
{
	up_close(u, reason, true);
}

void
upstream_abort(struct upstream *u, const char *reason)
{
	up_close(u, reason, false);
}

unsigned
upstream_count(void)
{
	return up_count;
}

void
upstream_free_all(void)
{
	struct upstream *u;

	while ((u = TAILQ_FIRST(&up_all)) != NULL) {
		if (u->up_reap.re_queued)
			reap_run();
		else
			up_free(u);
	}
}

bool
upstream_response_incomplete(const struct upstream *u)
{
	return !imap_framer_at_boundary(&u->up_framer);
}
