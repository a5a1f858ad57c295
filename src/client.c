/* client.c - the client session state machine. */
#include "client.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <unistd.h>

#include "addr.h"
#include "auth.h"
#include "config.h"
#include "imap_parse.h"
#include "imapshim.h"
#include "log.h"
#include "pool.h"
#include "protolog.h"
#include "reap.h"
#include "stats.h"
#include "relay.h"
#include "resync.h"
#include "tls.h"
#include "upstream.h"
#include "util.h"

/* Failed authentications on one connection before it is closed. */
#define CL_MAX_AUTH_FAILURES 5
/* First failure delay; it doubles with each failure. */
#define CL_AUTH_DELAY_MS 500
/* BAD answers in a row before a client is called hostile and closed. */
#define CL_MAX_BAD_IN_ROW 10
/* Largest literal accepted before login (LOGIN arguments). */
#define CL_PREAUTH_LITERAL_MAX 4096
/* Largest whole command (text and literals) accepted before login. */
#define CL_PREAUTH_COMMAND_MAX (16 * 1024)
/* How long a closing session may take to flush its last bytes. */
#define CL_CLOSE_FLUSH_MS 5000
/* Commands in flight per session; beyond it we stop reading (backpressure). */
#define CL_MAX_PENDING 256
/* Client input held, unread, while its previous command is upstream. */
#define CL_INPUT_HOLD (64 * 1024)

enum cl_state {
	CL_S_HANDSHAKE,		/* implicit TLS handshake */
	CL_S_NOTAUTH,		/* reading commands before login */
	CL_S_STARTTLS,		/* STARTTLS handshake */
	CL_S_SASL,		/* waiting for the AUTHENTICATE PLAIN response */
	CL_S_AUTHDELAY,		/* failed login: waiting before the NO */
	CL_S_LOGGING_IN,	/* credentials good: upstream login running */
	CL_S_AUTH,		/* logged in: relaying */
	CL_S_PARKING,		/* multiplex: taking the mailbox snapshot */
	CL_S_PARKED,		/* multiplex: no upstream session held */
	CL_S_ATTACHING,		/* multiplex: getting one back, resyncing */
	CL_S_CLOSING,		/* flushing, then reaped */
	CL_S_COUNT
};

static const char *const cl_state_names[] = {
	"handshake", "notauth", "starttls", "sasl", "authdelay", "logging-in",
	"auth", "parking", "parked", "attaching", "closing",
};
_Static_assert(nitems(cl_state_names) == CL_S_COUNT, "state names");

/* What happens to the rest of the command being read (after login). */
enum cl_cur {
	CL_CUR_NONE,		/* between commands */
	CL_CUR_RELAY,		/* lines and literals go upstream */
	CL_CUR_SWALLOW,		/* answered locally: drop the rest */
};

/* What may be done with a relayed command when its upstream is lost
 * before its tagged reply (DESIGN 3.5). */
enum cl_rerun {
	CL_RERUN_NO,		/* answer NO [UNAVAILABLE] */
	CL_RERUN_READONLY,	/* run it again if no reply byte reached the client */
	CL_RERUN_APPEND,	/* exactly once: run again unless it provably landed */
	CL_RERUN_IDLE,		/* IDLE again, silently */
};

/* Steps of a resync after attaching again (multiplex). */
enum cl_rs {
	CL_RS_SELECT,		/* select the mailbox as before */
	CL_RS_FETCH,		/* read its UIDs and flags */
	CL_RS_EMIT,		/* tell the client what changed */
};

/* Steps of a recovery once a new session is there. */
enum cl_redo {
	CL_REDO_NONE,		/* only select the mailbox again */
	CL_REDO_SEND,		/* send the kept command again */
	CL_REDO_IDLE,		/* IDLE again, hiding its "+" */
	CL_REDO_APPEND_EXAMINE,	/* APPEND: look in its mailbox... */
	CL_REDO_APPEND_SEARCH,	/* ...for its Message-ID... */
	CL_REDO_APPEND_DECIDE,	/* ...then answer OK or send it again */
};

/* One command whose reply has not been sent yet, in client order. */
struct cl_pend {
	char tag[IMAPSHIM_TAG_MAX + 1];
	bool relayed;		/* sent upstream; done when its tagged reply is */
	bool done;
	bool logout;		/* close the session once this reply is out */
	int8_t selects;		/* OK selects (1) or deselects (-1) a mailbox */
	uint8_t stat_cmd;	/* enum stats_command */
	uint64_t started_us;	/* relayed: when its first line went upstream */
	uint64_t rq, rp;	/* bytes of command and replies (protocol_log) */
	uint8_t rerun;		/* enum cl_rerun */
	bool replied;		/* some reply byte went to the client */
	char *select_cmd;	/* SELECT/EXAMINE: "SELECT args" to redo later */
	char *pl_params;	/* its arguments, only with protocol_log */
	char *reply;		/* local reply, or a replacement for the upstream's */
};

struct client {
	uint64_t cl_id;
	enum cl_state cl_state;
	enum client_listener cl_kind;
	struct bufferevent *cl_bev;
	SSL *cl_ssl;
	bool cl_tls;
	struct event *cl_timer;
	char cl_peer[64];
	struct imap_framer cl_framer;

	/* before login */
	struct evbuffer *cl_cmd;	/* the command being assembled */
	char cl_tag[IMAPSHIM_TAG_MAX + 1];	/* of LOGIN/AUTHENTICATE in progress */
	unsigned cl_auth_failures;
	unsigned cl_bad_in_row;
	bool cl_auth_ok;		/* the delayed answer is a success */
	struct auth_name cl_name;
	char cl_admin[IMAPSHIM_NAME_MAX + 1];	/* configured spelling */
	struct pool_waiter cl_waiter;	/* asking the pool for a session */
	uint64_t cl_login_us;		/* credentials checked at */
	bool cl_waiting;

	/* after login */
	struct upstream *cl_up;
	enum cl_cur cl_cur;
	bool cl_in_idle;		/* IDLE relayed: the next line is DONE */
	bool cl_relay_sync_lit;		/* upstream lacks LITERAL+: pass its "+" */
	struct cl_pend *cl_pend;	/* ring of pending commands */
	size_t cl_pend_cap, cl_pend_head, cl_pend_len;
	struct cl_pend *cl_cur_pend;	/* the relayed command being read */
	bool cl_read_blocked;		/* upstream output full or too many pending */
	bool cl_logout;			/* LOGOUT read: nothing after it is */
	unsigned cl_inflight;		/* relayed commands without their reply */
	bool cl_selected;		/* a mailbox is selected upstream */
	bool cl_select_opaque;		/* selected by a command we cannot redo */

	/* Recovery after an upstream loss (DESIGN 3.5). */
	char *cl_select_cmd;		/* what selected the current mailbox */
	char *cl_replay;		/* the in-flight command's bytes */
	size_t cl_replay_len, cl_replay_cap;
	bool cl_replay_on;		/* cl_replay holds all of them */
	size_t cl_replay_max;
	char *cl_append_mbox;		/* APPEND in flight: its mailbox, as sent */
	enum cl_redo cl_recover;	/* what to do once a session is back */
	unsigned cl_recover_tries;
	bool cl_swallow_cont;		/* hide the "+" of a silently repeated IDLE */
	uint32_t cl_found_uidvalidity, cl_found_uid;
	unsigned cl_append_tries;	/* sessions sought to settle an APPEND */
	char *cl_auth_caps;		/* capabilities shown after login */
	bool cl_in_lru;
	TAILQ_ENTRY(client) cl_lru_link;

	/* Multiplex mode (DESIGN 3.4). */
	struct event *cl_park_ev;	/* park_after, IDLE poll and refresh */
	uint32_t cl_uidvalidity;	/* of the selected mailbox */
	uint32_t cl_exists;		/* messages the client knows of */
	struct resync_snap cl_snap;	/* the client's view, while parked */
	bool cl_snap_ok;
	struct evbuffer *cl_pending_ev;	/* EXISTS seen while taking it */
	struct resync_snap cl_now;	/* the mailbox at attach time */
	struct evbuffer *cl_flagtext;	/* "msn flags\0" of changed messages */
	uint32_t cl_new_uidvalidity, cl_new_exists;
	enum cl_rs cl_rs;		/* resync step */
	char cl_attach_tag[IMAPSHIM_TAG_MAX + 1];	/* command waiting on attach */
	bool cl_unread;			/* leave the current frame unread */
	bool cl_drop_next;		/* next command was answered already */
	bool cl_attach_poll;		/* attaching for an IDLE poll */
	bool cl_idle_ending;		/* DONE sent to park an IDLE client */
	bool cl_idle_refresh;		/* DONE sent to renew a long IDLE */
	uint64_t cl_active_ms;		/* last command, for longest-idle */
	uint64_t cl_up_active_ms;	/* last command sent or reply byte */

	uint64_t cl_started_ms;
	uint64_t cl_bytes_in, cl_bytes_out;
	char *cl_sip;			/* local address, only with protocol_log */
	unsigned cl_pl_seq;
	const char *cl_close_reason;
	struct reap_entry cl_reap;
	TAILQ_ENTRY(client) cl_link;
	struct cl_ipq *cl_ipq;		/* while unauthenticated */
	TAILQ_ENTRY(client) cl_ip_link;
};

/*
 * Unauthenticated sessions per source address.  When one more arrives over
 * max_unauth_per_ip, the oldest is closed (as Dovecot's login processes
 * do): a flood of slow connections then never locks out the voice
 * platform, which reconnects in a burst from that same address.
 */
#define CL_IP_BUCKETS 1024
struct cl_ipq {
	uint8_t iq_addr[16];		/* IPv6, or IPv4 as v4-mapped */
	unsigned iq_count;
	TAILQ_HEAD(, client) iq_clients;	/* oldest first */
	LIST_ENTRY(cl_ipq) iq_link;
};
static LIST_HEAD(, cl_ipq) cl_ipq_hash[CL_IP_BUCKETS];

const char *const client_kind_names[] = {
	"unauthenticated", "attached", "parked", "waiting",
};
_Static_assert(nitems(client_kind_names) == CLIENT_KIND_COUNT, "kind names");

/* The kind each state counts as (CLIENT_KIND_COUNT: not counted). */
static const enum client_kind cl_state_kind[] = {
	[CL_S_HANDSHAKE] = CLIENT_UNAUTHENTICATED,
	[CL_S_NOTAUTH] = CLIENT_UNAUTHENTICATED,
	[CL_S_STARTTLS] = CLIENT_UNAUTHENTICATED,
	[CL_S_SASL] = CLIENT_UNAUTHENTICATED,
	[CL_S_AUTHDELAY] = CLIENT_UNAUTHENTICATED,
	[CL_S_LOGGING_IN] = CLIENT_WAITING,
	[CL_S_AUTH] = CLIENT_ATTACHED,
	[CL_S_PARKING] = CLIENT_ATTACHED,
	[CL_S_PARKED] = CLIENT_PARKED,
	[CL_S_ATTACHING] = CLIENT_WAITING,
	[CL_S_CLOSING] = CLIENT_KIND_COUNT,
};
_Static_assert(nitems(cl_state_kind) == CL_S_COUNT, "state kinds");
static unsigned cl_kind_count[CLIENT_KIND_COUNT + 1];

static const struct client_env *cl_env;
static const char *cl_drain_bye;	/* set once shutting down */
/* Attached clients, least recently active first: who parks under pressure. */
static TAILQ_HEAD(, client) cl_lru = TAILQ_HEAD_INITIALIZER(cl_lru);
/* Clients taking their snapshot now (pressure already on its way). */
static unsigned cl_parking;
static TAILQ_HEAD(, client) cl_all = TAILQ_HEAD_INITIALIZER(cl_all);
static unsigned cl_count;
static uint64_t cl_next_id = 1;

static void cl_read_cb(struct bufferevent *bev, void *arg);
static void cl_write_cb(struct bufferevent *bev, void *arg);
static void cl_event_cb(struct bufferevent *bev, short what, void *arg);
static void cl_close(struct client *c, const char *reason, const char *bye);
static void cl_park_timer_cb(evutil_socket_t fd, short what, void *arg);
static void cl_up_lost(void *arg, const char *reason);
static void cl_lru_remove(struct client *c);
static void cl_touch(struct client *c);
static void cl_park(struct client *c);
static void cl_attach(struct client *c, bool poll);
static void cl_attach_failed(struct client *c, const char *text);
static void cl_resync_step(struct client *c);
static void cl_track_untagged(struct client *c, const struct imap_frame *fr,
    struct evbuffer *in);
static void cl_ask_pool(struct client *c);
static void cl_unblock(struct client *c);

/* Extensions of the upstream that imapshim relays faithfully: they change
 * neither framing nor session state that imapshim must track. */
static const char *const cl_relayed_caps[] = {
	"NAMESPACE", "CHILDREN", "UIDPLUS", "MOVE", "UNSELECT", "SPECIAL-USE",
	"LIST-EXTENDED", "LIST-STATUS", "ESEARCH", "SORT", "SORT=DISPLAY",
	"THREAD=REFERENCES", "THREAD=REFS", "THREAD=ORDEREDSUBJECT",
	"MULTIAPPEND", "QUOTA", "WITHIN", "ACL", "I18NLEVEL=1",
};

static const struct config *
cl_cfg(void)
{
	return cl_env->cfg;
}

static void
cl_set_state(struct client *c, enum cl_state to)
{
	log_debug("client_state", "id=%llu from=%s to=%s",
	    (unsigned long long)c->cl_id, cl_state_names[c->cl_state],
	    cl_state_names[to]);
	cl_kind_count[cl_state_kind[c->cl_state]]--;
	cl_kind_count[cl_state_kind[to]]++;
	c->cl_state = to;
}

static void
cl_arm_timer(struct client *c, uint64_t ms)
{
	struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000 };

	evtimer_add(c->cl_timer, &tv);
}

/*
 * What one upstream read relays to a client goes out as one TLS record and
 * one write(), not one per response line: frames collect in cl_stage and
 * move to the client's output when the read is done (cl_up_read_done),
 * when 64 KiB have collected, or before anything else is written to that
 * client.  One client owns the stage at a time.
 */
static struct evbuffer *cl_stage;
static struct client *cl_stage_owner;

static void
cl_stage_flush(void)
{
	struct client *c = cl_stage_owner;

	if (c == NULL)
		return;
	cl_stage_owner = NULL;
	evbuffer_add_buffer(bufferevent_get_output(c->cl_bev), cl_stage);
	relay_write_now(c->cl_bev);
}

static struct evbuffer *
cl_stage_for(struct client *c)
{
	if (cl_stage_owner != c) {
		cl_stage_flush();
		cl_stage_owner = c;
	}
	return cl_stage;
}

/* The client's output, with whatever is staged for it queued first. */
static struct evbuffer *
cl_output(struct client *c)
{
	if (cl_stage_owner == c)
		cl_stage_flush();
	return bufferevent_get_output(c->cl_bev);
}

static void
cl_write(struct client *c, const char *s, size_t len)
{
	c->cl_bytes_out += len;
	evbuffer_add(cl_output(c), s, len);
	relay_write_now(c->cl_bev);
}

static void
cl_printf(struct client *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
cl_printf(struct client *c, const char *fmt, ...)
{
	char buf[2048];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof(buf))
		n = sizeof(buf) - 1;
	cl_write(c, buf, (size_t)n);
}

/* One protocol_log line for this session (no-op when the log is off). */
static void
cl_plog(struct client *c, const char *command, const char *params,
    uint64_t rq, uint64_t rp, uint64_t started_us, const char *context)
{
	struct protolog_rec r;
	char user[IMAPSHIM_NAME_MAX * 3 + 8] = "";
	char cmd[32];
	size_t i;

	if (!protolog_enabled())
		return;
	if (c->cl_name.mailbox[0] != '\0')
		snprintf(user, sizeof(user), "%s%s%s/%s", c->cl_name.domain,
		    c->cl_name.domain[0] ? "/" : "", c->cl_admin,
		    c->cl_name.mailbox);
	/* Exchange writes command names in lower case. */
	for (i = 0; i + 1 < sizeof(cmd) && command[i] != '\0'; i++)
		cmd[i] = (char)(command[i] >= 'A' && command[i] <= 'Z' ?
		    command[i] - 'A' + 'a' : command[i]);
	cmd[i] = '\0';
	memset(&r, 0, sizeof(r));
	r.session_id = c->cl_id;
	r.seq = c->cl_pl_seq++;
	r.sip = c->cl_sip != NULL ? c->cl_sip : "";
	r.cip = c->cl_peer;
	r.user = user;
	r.duration_ms = started_us ? (util_now_us() - started_us) / 1000 : 0;
	r.rqsize = rq;
	r.rpsize = rp;
	/* The session pseudo-commands keep Exchange's spelling. */
	r.command = strcmp(command, "OpenSession") == 0 ||
	    strcmp(command, "CloseSession") == 0 ? command : cmd;
	r.params = params != NULL ? params : "";
	r.context = context != NULL ? context : "";
	protolog_write(&r);
}

/* A command imapshim answered itself, for the protocol log. */
static void
cl_plog_local(struct client *c, const struct imap_tok *cmd, size_t rq)
{
	char name[32];

	snprintf(name, sizeof(name), "%.*s", (int)cmd->len, cmd->p);
	cl_plog(c, name, "", rq, 0, 0, "R=ok;Msg=imapshim");
}

/* The arguments of a command's first line for the protocol log, with
 * LOGIN's and AUTHENTICATE's secrets masked.  NULL when the log is off. */
static char *
cl_plog_params(const char *line, size_t len, const struct imap_tok *cmd)
{
	const char *args;
	size_t n;

	if (!protolog_enabled())
		return NULL;
	args = cmd->p + cmd->len;
	n = len - (size_t)(args - line);
	while (n > 0 && *args == ' ') {
		args++;
		n--;
	}
	while (n > 0 && (args[n - 1] == '\r' || args[n - 1] == '\n'))
		n--;
	if (imap_tok_is(cmd, "LOGIN") || imap_tok_is(cmd, "AUTHENTICATE"))
		return xstrdup(LOG_MASKED);
	return xstrndup(args, n > 2048 ? 2048 : n);
}

/* Read again; input that arrived while reading was off gets no new read
 * event, so trigger one (deferred: never re-entered from our caller). */
static void
cl_resume_reading(struct client *c)
{
	bufferevent_enable(c->cl_bev, EV_READ);
	if (evbuffer_get_length(bufferevent_get_input(c->cl_bev)) > 0)
		bufferevent_trigger(c->cl_bev, EV_READ, BEV_TRIG_DEFER_CALLBACKS);
}

/* ------------------------------------------------------------ capability */

static bool
cl_login_allowed(const struct client *c)
{
	return c->cl_tls || cl_cfg()->allow_plaintext_login;
}

static void
cl_caps(const struct client *c, char *buf, size_t len)
{
	size_t i, j, n;
	const char *cap;

	if (c->cl_auth_caps != NULL) {
		snprintf(buf, len, "%s", c->cl_auth_caps);
		return;
	}
	n = (size_t)snprintf(buf, len, "IMAP4rev1 LITERAL+ ID IDLE");
	if (c->cl_state == CL_S_AUTH && c->cl_up != NULL) {
		for (i = 0; (cap = upstream_cap(c->cl_up, i)) != NULL; i++)
			for (j = 0; j < nitems(cl_relayed_caps); j++)
				if (util_ieq(cap, cl_relayed_caps[j]) && n < len)
					n += (size_t)snprintf(buf + n, len - n,
					    " %s", cl_relayed_caps[j]);
		return;
	}
	if (cl_login_allowed(c) && n < len)
		n += (size_t)snprintf(buf + n, len - n, " AUTH=PLAIN SASL-IR");
	if (c->cl_kind == CLIENT_LISTEN_STARTTLS && !c->cl_tls && n < len)
		n += (size_t)snprintf(buf + n, len - n, " STARTTLS");
	if (!cl_login_allowed(c) && n < len)
		snprintf(buf + n, len - n, " LOGINDISABLED");
}

/* --------------------------------------------------------- reply ordering */

static struct cl_pend *
cl_pend_at(struct client *c, size_t i)
{
	return &c->cl_pend[(c->cl_pend_head + i) % c->cl_pend_cap];
}

static struct cl_pend *
cl_pend_push(struct client *c, const char *tag, size_t taglen)
{
	struct cl_pend *p, *n;
	size_t i;

	if (c->cl_pend_len == c->cl_pend_cap) {
		size_t cap = c->cl_pend_cap ? c->cl_pend_cap * 2 : 4;

		n = xcalloc(cap, sizeof(*n));
		for (i = 0; i < c->cl_pend_len; i++)
			n[i] = *cl_pend_at(c, i);
		free(c->cl_pend);
		c->cl_pend = n;
		c->cl_pend_cap = cap;
		c->cl_pend_head = 0;
	}
	p = cl_pend_at(c, c->cl_pend_len++);
	memset(p, 0, sizeof(*p));
	if (taglen > IMAPSHIM_TAG_MAX)
		taglen = IMAPSHIM_TAG_MAX;
	memcpy(p->tag, tag, taglen);
	p->tag[taglen] = '\0';
	return p;
}

/* Send the replies whose turn has come; close after a LOGOUT reply. */
static void
cl_pend_flush(struct client *c)
{
	struct cl_pend *p;
	bool logout = false;

	while (c->cl_pend_len > 0 && (p = cl_pend_at(c, 0))->done) {
		if (p->reply != NULL) {
			cl_write(c, p->reply, strlen(p->reply));
			free(p->reply);
			p->reply = NULL;
		}
		free(p->pl_params);
		p->pl_params = NULL;
		free(p->select_cmd);
		p->select_cmd = NULL;
		logout |= p->logout;
		c->cl_pend_head = (c->cl_pend_head + 1) % c->cl_pend_cap;
		c->cl_pend_len--;
		if (c->cl_cur_pend == p)
			c->cl_cur_pend = NULL;
	}
	if (logout)
		cl_close(c, "logout", NULL);
}

static void
cl_pend_clear(struct client *c)
{
	size_t i;

	for (i = 0; i < c->cl_pend_len; i++) {
		free(cl_pend_at(c, i)->reply);
		free(cl_pend_at(c, i)->pl_params);
		free(cl_pend_at(c, i)->select_cmd);
	}
	free(c->cl_pend);
	c->cl_pend = NULL;
	c->cl_pend_cap = c->cl_pend_len = c->cl_pend_head = 0;
	c->cl_cur_pend = NULL;
}

/* A reply imapshim makes itself: now, or after earlier commands' replies. */
static void
cl_reply(struct client *c, const char *tag, size_t taglen, bool logout,
    const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void
cl_reply(struct client *c, const char *tag, size_t taglen, bool logout,
    const char *fmt, ...)
{
	char buf[4096];
	va_list ap;
	struct cl_pend *p;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (c->cl_pend_len == 0) {
		cl_write(c, buf, strlen(buf));
		if (logout)
			cl_close(c, "logout", NULL);
		return;
	}
	p = cl_pend_push(c, tag, taglen);
	p->done = true;
	p->logout = logout;
	p->reply = xstrdup(buf);
}

/* ------------------------------------------------ unauthenticated per IP */

static void
cl_ip_key(const struct sockaddr *sa, uint8_t key[16])
{
	memset(key, 0, 16);
	if (sa->sa_family == AF_INET) {
		key[10] = key[11] = 0xff;
		memcpy(key + 12, &((const struct sockaddr_in *)(const void *)sa)->sin_addr, 4);
	} else if (sa->sa_family == AF_INET6)
		memcpy(key, &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr, 16);
}

static void
cl_unauth_remove(struct client *c)
{
	struct cl_ipq *q = c->cl_ipq;

	if (q == NULL)
		return;
	TAILQ_REMOVE(&q->iq_clients, c, cl_ip_link);
	c->cl_ipq = NULL;
	if (--q->iq_count == 0) {
		LIST_REMOVE(q, iq_link);
		free(q);
	}
}

static void
cl_unauth_add(struct client *c, const struct sockaddr *sa)
{
	uint8_t key[16];
	uint32_t h = 2166136261u;
	struct cl_ipq *q;
	size_t i;

	cl_ip_key(sa, key);
	for (i = 0; i < sizeof(key); i++)
		h = (h ^ key[i]) * 16777619u;
	LIST_FOREACH(q, &cl_ipq_hash[h % CL_IP_BUCKETS], iq_link)
		if (memcmp(q->iq_addr, key, sizeof(key)) == 0)
			break;
	if (q == NULL) {
		q = xcalloc(1, sizeof(*q));
		memcpy(q->iq_addr, key, sizeof(key));
		TAILQ_INIT(&q->iq_clients);
		LIST_INSERT_HEAD(&cl_ipq_hash[h % CL_IP_BUCKETS], q, iq_link);
	}
	/* c joins before the oldest leave, so q never empties here. */
	q->iq_count++;
	TAILQ_INSERT_TAIL(&q->iq_clients, c, cl_ip_link);
	c->cl_ipq = q;
	while (q->iq_count > cl_cfg()->max_unauth_per_ip) {
		struct client *old = TAILQ_FIRST(&q->iq_clients);

		log_warn("client_unauth_limit", "peer=%s closed_id=%llu "
		    "max_unauth_per_ip=%u", c->cl_peer,
		    (unsigned long long)old->cl_id, cl_cfg()->max_unauth_per_ip);
		cl_close(old, "max_unauth_per_ip", "Too many unauthenticated "
		    "connections from your address.");
	}
}

/* --------------------------------------------------------------- closing */

static void
cl_free(void *obj)
{
	struct client *c = obj;

	/* Last line of the session: after every reply it flushed. */
	cl_plog(c, "CloseSession", "", 0, 0, 0, c->cl_close_reason);
	if (cl_stage_owner == c) {
		cl_stage_owner = NULL;
		evbuffer_drain(cl_stage, evbuffer_get_length(cl_stage));
	}
	TAILQ_REMOVE(&cl_all, c, cl_link);
	cl_count--;
	cl_kind_count[cl_state_kind[c->cl_state]]--;
	if (c->cl_bev != NULL) {
		tls_close_notify(c->cl_ssl);
		bufferevent_free(c->cl_bev);
	}
	if (c->cl_timer != NULL)
		event_free(c->cl_timer);
	if (c->cl_cmd != NULL)
		evbuffer_free(c->cl_cmd);
	cl_pend_clear(c);
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

static void
cl_release_upstream(struct client *c)
{
	struct upstream *u = c->cl_up;

	if (c->cl_waiting) {
		pool_cancel(&c->cl_waiter);
		c->cl_waiting = false;
	}
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
	if (c->cl_in_idle || c->cl_inflight > 0) {
		if (c->cl_in_idle)
			evbuffer_add(upstream_output(u), "DONE\r\n", 6);
		pool_release(u, POOL_RELEASE_DIRTY);
		return;
	}
	pool_release(u, c->cl_selected ? POOL_RELEASE_SELECTED :
	    POOL_RELEASE_CLEAN);
}

static void
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
	    c->cl_name.mailbox[0] ? c->cl_name.mailbox : "-",
	    c->cl_admin[0] ? c->cl_admin : "-", cl_state_names[c->cl_state],
	    reason, (unsigned long long)c->cl_bytes_in,
	    (unsigned long long)c->cl_bytes_out,
	    (unsigned long long)(util_now_ms() - c->cl_started_ms));
	c->cl_close_reason = reason;
	cl_unauth_remove(c);
	cl_lru_remove(c);
	if (c->cl_state == CL_S_PARKING)
		cl_parking--;
	evtimer_del(c->cl_park_ev);
	cl_release_upstream(c);
	cl_set_state(c, CL_S_CLOSING);
	bufferevent_disable(c->cl_bev, EV_READ);
	evtimer_del(c->cl_timer);
	if (evbuffer_get_length(cl_output(c)) == 0) {
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
	memcpy(counts, cl_kind_count, CLIENT_KIND_COUNT * sizeof(counts[0]));
}

/* A BAD answer; a client that sends nothing but garbage is closed. */
static void
cl_bad(struct client *c, const char *tag, size_t taglen, const char *text)
{
	if (taglen == 0) {
		tag = "*";
		taglen = 1;
	}
	cl_reply(c, tag, taglen, false, "%.*s BAD %s\r\n", (int)taglen, tag, text);
	if (++c->cl_bad_in_row >= CL_MAX_BAD_IN_ROW)
		cl_close(c, "too-many-bad-commands", "Too many invalid commands.");
}

/* ------------------------------------------------------------ pre-login */

static void
cl_send_greeting(struct client *c)
{
	char caps[512];

	cl_caps(c, caps, sizeof(caps));
	cl_printf(c, "* OK [CAPABILITY %s] imapshim ready.\r\n", caps);
}

static void
cl_auth_failed(struct client *c)
{
	uint64_t delay = (uint64_t)CL_AUTH_DELAY_MS << (c->cl_auth_failures < 8 ?
	    c->cl_auth_failures : 8);

	c->cl_auth_failures++;
	c->cl_auth_ok = false;
	log_info("client_auth_fail", "id=%llu peer=%s failures=%u delay_ms=%llu",
	    (unsigned long long)c->cl_id, c->cl_peer, c->cl_auth_failures,
	    (unsigned long long)delay);
	cl_set_state(c, CL_S_AUTHDELAY);
	bufferevent_disable(c->cl_bev, EV_READ);
	cl_arm_timer(c, delay);
}

/* Answer a finished login attempt, then read on. */
static void
cl_auth_answer(struct client *c, const char *text)
{
	char ctx[600];

	cl_printf(c, "%s %s\r\n", c->cl_tag, text);
	if (protolog_enabled()) {
		snprintf(ctx, sizeof(ctx), "R=\"%s %s\"", c->cl_tag, text);
		cl_plog(c, "login", LOG_MASKED, 0, strlen(c->cl_tag) + strlen(text) + 3,
		    c->cl_login_us, ctx);
	}
	if (c->cl_state == CL_S_AUTHDELAY &&
	    c->cl_auth_failures >= CL_MAX_AUTH_FAILURES) {
		cl_close(c, "too-many-auth-failures",
		    "Too many authentication failures.");
		return;
	}
	cl_set_state(c, CL_S_NOTAUTH);
	cl_arm_timer(c, cl_cfg()->client_login_timeout_ms);
	cl_resume_reading(c);
}

/* Check credentials locally; a wrong password never reaches Exchange. */
static void
cl_check_credentials(struct client *c, const char *user, size_t userlen,
    const char *pass, size_t passlen)
{
	const struct config *cfg = cl_cfg();
	const struct config_admin *admin;

	memset(&c->cl_name, 0, sizeof(c->cl_name));
	if (auth_parse_login(cfg->client_login_format, user, userlen,
	    &c->cl_name) != 0 ||
	    (admin = config_find_admin(cfg, c->cl_name.admin,
	    strlen(c->cl_name.admin))) == NULL ||
	    !util_secret_equal(pass, passlen, admin->password,
	    strlen(admin->password))) {
		memset(&c->cl_name, 0, sizeof(c->cl_name));
		cl_auth_failed(c);
		return;
	}
	snprintf(c->cl_admin, sizeof(c->cl_admin), "%s", admin->name);
	log_info("client_auth", "id=%llu peer=%s mailbox=%s admin=%s password=%s",
	    (unsigned long long)c->cl_id, c->cl_peer, c->cl_name.mailbox,
	    c->cl_admin, LOG_MASKED);
	cl_unauth_remove(c);
	c->cl_login_us = util_now_us();
	cl_set_state(c, CL_S_LOGGING_IN);
	bufferevent_disable(c->cl_bev, EV_READ);
	evtimer_del(c->cl_timer);
	cl_ask_pool(c);
}

static bool
cl_save_tag(struct client *c, const struct imap_tok *tag)
{
	if (tag->len > IMAPSHIM_TAG_MAX)
		return false;
	memcpy(c->cl_tag, tag->p, tag->len);
	c->cl_tag[tag->len] = '\0';
	return true;
}

static void
cl_cmd_login(struct client *c, const struct imap_tok *tag, struct imap_lexer *lx)
{
	struct imap_tok a, b, eol;
	char user[IMAPSHIM_NAME_MAX * 3 + 8];
	char pass[IMAPSHIM_PASSWORD_MAX + 1];
	ssize_t ul, pl;

	if (imap_lex_next(lx, &a) != 1 || imap_lex_next(lx, &b) != 1 ||
	    imap_lex_next(lx, &eol) != 1 || eol.type != IMAP_TOK_EOL ||
	    (a.type != IMAP_TOK_ATOM && a.type != IMAP_TOK_QUOTED &&
	    a.type != IMAP_TOK_LITERAL) ||
	    (b.type != IMAP_TOK_ATOM && b.type != IMAP_TOK_QUOTED &&
	    b.type != IMAP_TOK_LITERAL)) {
		cl_bad(c, tag->p, tag->len, "LOGIN expects a user name and a password.");
		return;
	}
	ul = imap_tok_string(&a, user, sizeof(user));
	pl = imap_tok_string(&b, pass, sizeof(pass));
	if (ul < 0 || pl < 0) {
		OPENSSL_cleanse(pass, sizeof(pass));
		cl_auth_failed(c);
		return;
	}
	cl_check_credentials(c, user, (size_t)ul, pass, (size_t)pl);
	OPENSSL_cleanse(pass, sizeof(pass));
}

static void
cl_sasl_response(struct client *c, const char *b64, size_t len)
{
	char authzid[IMAPSHIM_NAME_MAX * 3 + 8], authcid[IMAPSHIM_NAME_MAX * 3 + 8];
	char pass[IMAPSHIM_PASSWORD_MAX + 1];

	if (len == 1 && b64[0] == '=')
		len = 0;
	if (auth_plain_decode(b64, len, authzid, sizeof(authzid), authcid,
	    sizeof(authcid), pass, sizeof(pass)) != 0 ||
	    (authzid[0] != '\0' && strcmp(authzid, authcid) != 0)) {
		/* A different authzid would be a second way to name the
		 * mailbox; the login name already carries it. */
		OPENSSL_cleanse(pass, sizeof(pass));
		cl_auth_failed(c);
		return;
	}
	cl_check_credentials(c, authcid, strlen(authcid), pass, strlen(pass));
	OPENSSL_cleanse(pass, sizeof(pass));
}

static void
cl_cmd_authenticate(struct client *c, const struct imap_tok *tag,
    struct imap_lexer *lx)
{
	struct imap_tok mech, ir, eol;

	if (imap_lex_next(lx, &mech) != 1 || mech.type != IMAP_TOK_ATOM) {
		cl_bad(c, tag->p, tag->len, "AUTHENTICATE expects a mechanism.");
		return;
	}
	if (!imap_tok_is(&mech, "PLAIN")) {
		cl_printf(c, "%s NO Unsupported authentication mechanism.\r\n",
		    c->cl_tag);
		return;
	}
	if (imap_lex_next(lx, &ir) != 1) {
		cl_bad(c, tag->p, tag->len, "Invalid AUTHENTICATE arguments.");
		return;
	}
	if (ir.type == IMAP_TOK_EOL) {
		cl_set_state(c, CL_S_SASL);
		cl_printf(c, "+ \r\n");
		return;
	}
	if (ir.type != IMAP_TOK_ATOM || imap_lex_next(lx, &eol) != 1 ||
	    eol.type != IMAP_TOK_EOL) {
		cl_bad(c, tag->p, tag->len, "Invalid AUTHENTICATE arguments.");
		return;
	}
	cl_sasl_response(c, ir.p, ir.len);
}

static void
cl_start_tls(struct client *c)
{
	struct bufferevent *tls_bev;
	struct evbuffer *in = bufferevent_get_input(c->cl_bev);

	/* Bytes pipelined after STARTTLS arrived in cleartext: drop them
	 * (CVE-2011-0411 style command injection). */
	evbuffer_drain(in, evbuffer_get_length(in));
	imap_framer_init(&c->cl_framer, cl_cfg()->max_command_bytes,
	    CL_PREAUTH_LITERAL_MAX);
	c->cl_ssl = tls_server_ssl_new(cl_env->server_ctx);
	tls_bev = c->cl_ssl == NULL ? NULL : bufferevent_openssl_filter_new(
	    cl_env->base, c->cl_bev, c->cl_ssl, BUFFEREVENT_SSL_ACCEPTING,
	    BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
	if (tls_bev == NULL) {
		if (c->cl_ssl != NULL)
			SSL_free(c->cl_ssl);
		c->cl_ssl = NULL;
		cl_close(c, "tls-setup-failed", NULL);
		return;
	}
	bufferevent_openssl_set_allow_dirty_shutdown(tls_bev, 1);
	c->cl_bev = tls_bev;
	c->cl_tls = true;
	bufferevent_setcb(tls_bev, cl_read_cb, cl_write_cb, cl_event_cb, c);
	bufferevent_setwatermark(tls_bev, EV_WRITE, RELAY_LOWAT, 0);
	bufferevent_enable(tls_bev, EV_READ | EV_WRITE);
	cl_set_state(c, CL_S_STARTTLS);
}

/* One complete command before login, assembled in cl_cmd. */
static void
cl_preauth_command(struct client *c)
{
	size_t len = evbuffer_get_length(c->cl_cmd);
	const char *buf = (const char *)evbuffer_pullup(c->cl_cmd, -1);
	struct imap_lexer lx;
	struct imap_tok tag, cmd, eol;
	char caps[512];

	if (c->cl_state == CL_S_SASL) {
		size_t n = len;

		while (n > 0 && (buf[n - 1] == '\r' || buf[n - 1] == '\n'))
			n--;
		cl_set_state(c, CL_S_NOTAUTH);
		if (n == 1 && buf[0] == '*')
			cl_printf(c, "%s BAD AUTHENTICATE cancelled.\r\n", c->cl_tag);
		else
			cl_sasl_response(c, buf, n);
		return;
	}
	if (imap_parse_command_head(buf, len, &tag, &cmd) != 0 ||
	    tag.len > IMAPSHIM_TAG_MAX) {
		cl_bad(c, NULL, 0, "Invalid command: expected a tag and a command.");
		return;
	}
	imap_lexer_init(&lx, buf, len);
	/* Skip tag and command name; the head parser validated them. */
	imap_lex_next(&lx, &eol);
	imap_lex_next(&lx, &eol);
	if (imap_tok_is(&cmd, "CAPABILITY") || imap_tok_is(&cmd, "NOOP") ||
	    imap_tok_is(&cmd, "LOGOUT") || imap_tok_is(&cmd, "STARTTLS")) {
		if (imap_lex_next(&lx, &eol) != 1 || eol.type != IMAP_TOK_EOL) {
			cl_bad(c, tag.p, tag.len, "This command takes no arguments.");
			return;
		}
	}
	c->cl_bad_in_row = 0;
	if (protolog_enabled() && !imap_tok_is(&cmd, "LOGIN") &&
	    !imap_tok_is(&cmd, "AUTHENTICATE"))
		cl_plog_local(c, &cmd, len);
	if (imap_tok_is(&cmd, "CAPABILITY")) {
		cl_caps(c, caps, sizeof(caps));
		cl_printf(c, "* CAPABILITY %s\r\n%.*s OK CAPABILITY completed.\r\n",
		    caps, (int)tag.len, tag.p);
	} else if (imap_tok_is(&cmd, "NOOP")) {
		cl_printf(c, "%.*s OK NOOP completed.\r\n", (int)tag.len, tag.p);
	} else if (imap_tok_is(&cmd, "LOGOUT")) {
		cl_printf(c, "* BYE imapshim logging out.\r\n"
		    "%.*s OK LOGOUT completed.\r\n", (int)tag.len, tag.p);
		cl_close(c, "logout", NULL);
	} else if (imap_tok_is(&cmd, "ID")) {
		cl_printf(c, "* ID (\"name\" \"imapshim\" \"version\" \"%s\")\r\n"
		    "%.*s OK ID completed.\r\n", PACKAGE_VERSION, (int)tag.len,
		    tag.p);
	} else if (imap_tok_is(&cmd, "STARTTLS")) {
		if (c->cl_kind != CLIENT_LISTEN_STARTTLS || c->cl_tls) {
			cl_bad(c, tag.p, tag.len, "STARTTLS is not available here.");
			return;
		}
		cl_printf(c, "%.*s OK Begin TLS negotiation now.\r\n",
		    (int)tag.len, tag.p);
		cl_start_tls(c);
	} else if (imap_tok_is(&cmd, "LOGIN") ||
	    imap_tok_is(&cmd, "AUTHENTICATE")) {
		if (!cl_login_allowed(c)) {
			cl_printf(c, "%.*s NO [PRIVACYREQUIRED] Log in only after "
			    "STARTTLS.\r\n", (int)tag.len, tag.p);
			return;
		}
		if (!cl_save_tag(c, &tag))
			return;
		if (imap_tok_is(&cmd, "LOGIN"))
			cl_cmd_login(c, &tag, &lx);
		else
			cl_cmd_authenticate(c, &tag, &lx);
	} else
		cl_bad(c, tag.p, tag.len, "Command not valid before login.");
}

/* Copy the tag at the start of a command line into tag (for an error
 * reply once the line is gone), or "*" when it has none.  Returns tag. */
static const char *
cl_line_tag(const char *line, size_t len, char tag[IMAPSHIM_TAG_MAX + 1])
{
	size_t n = 0;

	while (n < len && n <= IMAPSHIM_TAG_MAX && line[n] != ' ' &&
	    line[n] > 0x20 && line[n] < 0x7f && line[n] != '+' &&
	    line[n] != '*' && line[n] != '{' && line[n] != '"')
		n++;
	if (n == 0 || n > IMAPSHIM_TAG_MAX || n >= len || line[n] != ' ')
		n = 0;
	memcpy(tag, n ? line : "*", n ? n : 1);
	tag[n ? n : 1] = '\0';
	return tag;
}

static void
cl_preauth_frame(struct client *c, const struct imap_frame *fr,
    const char *line, struct evbuffer *in)
{
	char tag[IMAPSHIM_TAG_MAX + 1];

	switch (fr->kind) {
	case IMAP_FR_OVERFLOW:
		if (fr->overflow_first)
			cl_line_tag(line, fr->len, tag);
		else
			cl_line_tag((const char *)evbuffer_pullup(c->cl_cmd, -1),
			    evbuffer_get_length(c->cl_cmd), tag);
		evbuffer_drain(in, fr->len);
		evbuffer_drain(c->cl_cmd, evbuffer_get_length(c->cl_cmd));
		cl_bad(c, tag, strlen(tag), "Command line too long.");
		return;
	case IMAP_FR_LITERAL:
		evbuffer_remove_buffer(in, c->cl_cmd, fr->len);
		if (evbuffer_get_length(c->cl_cmd) > CL_PREAUTH_COMMAND_MAX)
			cl_close(c, "command-too-large",
			    "Command too large before login.");
		return;
	case IMAP_FR_LINE:
		break;
	default:
		return;
	}
	evbuffer_remove_buffer(in, c->cl_cmd, fr->len);
	if (evbuffer_get_length(c->cl_cmd) > CL_PREAUTH_COMMAND_MAX) {
		/* Many small literals add up; nothing before login needs this. */
		cl_close(c, "command-too-large", "Command too large before login.");
		return;
	}
	if (fr->lit_toobig) {
		cl_line_tag((const char *)evbuffer_pullup(c->cl_cmd, -1),
		    evbuffer_get_length(c->cl_cmd), tag);
		evbuffer_drain(c->cl_cmd, evbuffer_get_length(c->cl_cmd));
		cl_printf(c, "%s NO [TOOBIG] Literal too big before login.\r\n",
		    tag);
		return;
	}
	if (fr->has_lit && !fr->lit_nonsync)
		cl_printf(c, "+ Ready for literal data.\r\n");
	if (!fr->last)
		return;
	cl_preauth_command(c);
	evbuffer_drain(c->cl_cmd, evbuffer_get_length(c->cl_cmd));
}

/* ------------------------------------------------------------- recovery */

/* Commands that change nothing on the server: safe to run twice. */
static const char *const cl_readonly_cmds[] = {
	"FETCH", "SEARCH", "STATUS", "NOOP", "SELECT", "EXAMINE", "LIST",
	"LSUB", "CHECK", "NAMESPACE", "GETQUOTA", "GETQUOTAROOT", "GETACL",
	"MYRIGHTS", "LISTRIGHTS", "XLIST", "SORT", "THREAD",
};

/* Largest read-only command kept for a re-run. */
#define CL_REPLAY_MAX (64 * 1024)
/* Replay memory kept between commands. */
#define CL_REPLAY_KEEP 4096

static void
cl_replay_release(struct client *c)
{
	free(c->cl_replay);
	c->cl_replay = NULL;
	c->cl_replay_len = c->cl_replay_cap = 0;
}

/* Upstream losses in a row one command may survive. */
#define CL_RECOVER_TRIES 3
/* Failed attempts to get a session to settle an APPEND's fate (backoff
 * 0.5 s doubling to 8 s: about a minute in all). */
#define CL_APPEND_RECOVER_TRIES 10

static bool
cl_cmd_readonly(const struct imap_tok *cmd)
{
	size_t i;

	for (i = 0; i < nitems(cl_readonly_cmds); i++)
		if (imap_tok_is(cmd, cl_readonly_cmds[i]))
			return true;
	return false;
}

/* Decide, as a command starts, what a lost upstream would let us do with
 * it, and start keeping its bytes when it may be sent again. */
static void
cl_prepare_rerun(struct client *c, struct cl_pend *p, const char *line,
    size_t len, const struct imap_tok *cmd)
{
	struct imap_lexer lx;
	struct imap_tok t, sub;
	const struct config *cfg = cl_cfg();

	imap_lexer_init(&lx, line, len);
	imap_lex_next(&lx, &t);		/* tag */
	imap_lex_next(&lx, &t);		/* command */
	if (imap_tok_is(cmd, "UID")) {
		if (imap_lex_next(&lx, &sub) == 1 && sub.type == IMAP_TOK_ATOM &&
		    (imap_tok_is(&sub, "FETCH") || imap_tok_is(&sub, "SEARCH") ||
		    imap_tok_is(&sub, "SORT") || imap_tok_is(&sub, "THREAD")))
			p->rerun = CL_RERUN_READONLY;
	} else if (imap_tok_is(cmd, "APPEND")) {
		/* The mailbox as the client wrote it, to look for the message
		 * there; a literal name is not kept (never seen in practice). */
		if (imap_lex_next(&lx, &t) == 1 && (t.type == IMAP_TOK_ATOM ||
		    t.type == IMAP_TOK_QUOTED)) {
			free(c->cl_append_mbox);
			c->cl_append_mbox = t.type == IMAP_TOK_QUOTED ?
			    xstrndup(t.p - 1, t.len + 2) : xstrndup(t.p, t.len);
			p->rerun = CL_RERUN_APPEND;
		}
	} else if (imap_tok_is(cmd, "IDLE"))
		p->rerun = CL_RERUN_IDLE;
	else if (cl_cmd_readonly(cmd))
		p->rerun = CL_RERUN_READONLY;
	if (p->selects > 0 && len > 0 && line[len - 1] != '}')
		p->select_cmd = xstrndup(cmd->p, len - (size_t)(cmd->p - line));
	/* The copy's memory is kept from command to command (no allocation
	 * per command), unless an APPEND made it big. */
	if (c->cl_replay_cap > CL_REPLAY_KEEP)
		cl_replay_release(c);
	c->cl_replay_len = 0;
	c->cl_replay_on = p->rerun != CL_RERUN_NO;
	c->cl_replay_max = p->rerun == CL_RERUN_APPEND ?
	    cfg->max_literal_bytes + 2 * cfg->max_command_bytes : CL_REPLAY_MAX;
}

/* The relayed command not answered yet (one at a time), or NULL. */
static struct cl_pend *
cl_inflight_pend(struct client *c)
{
	size_t i;

	for (i = 0; i < c->cl_pend_len; i++)
		if (cl_pend_at(c, i)->relayed && !cl_pend_at(c, i)->done)
			return cl_pend_at(c, i);
	return NULL;
}

/* Answer an in-flight command ourselves. */
static void
cl_pend_answer(struct client *c, struct cl_pend *p, const char *text)
{
	char buf[IMAPSHIM_TAG_MAX + 1100];

	snprintf(buf, sizeof(buf), "%s %s\r\n", p->tag, text);
	free(p->reply);
	p->reply = xstrdup(buf);
	p->done = true;
	c->cl_inflight--;
	c->cl_replay_on = false;
	cl_pend_flush(c);
}

static void
cl_pend_unavailable(struct client *c, struct cl_pend *p)
{
	cl_pend_answer(c, p, "NO [UNAVAILABLE] The connection to Exchange was "
	    "lost; the command may not have completed.");
}

/* Get a session for this mailbox again; cl_recover says what to redo. */
static void
cl_reattach(struct client *c)
{
	if (c->cl_waiting || c->cl_state != CL_S_AUTH)
		return;
	log_info("client_reattach", "id=%llu mailbox=%s redo=%d try=%u",
	    (unsigned long long)c->cl_id, c->cl_name.mailbox, c->cl_recover,
	    c->cl_recover_tries);
	cl_ask_pool(c);
}

/*
 * The session has collected nearly as many NO/BAD answers as Exchange
 * allows on one connection: continue on a fresh one (the pool retires this
 * one), with the mailbox selected again as before.
 */
static void
cl_swap_upstream(struct client *c)
{
	struct upstream *u = c->cl_up;

	log_info("client_upstream_worn", "id=%llu mailbox=%s up=%llu",
	    (unsigned long long)c->cl_id, c->cl_name.mailbox,
	    (unsigned long long)upstream_id(u));
	c->cl_up = NULL;
	upstream_set_lessee(u, NULL, NULL);
	pool_release(u, c->cl_selected ? POOL_RELEASE_SELECTED :
	    POOL_RELEASE_CLEAN);
	c->cl_selected = false;
	c->cl_recover = CL_REDO_NONE;
	cl_reattach(c);
}

/* The whole command has been read. */
static void
cl_command_sent(struct client *c)
{
	struct cl_pend *p = c->cl_cur_pend;

	c->cl_cur = CL_CUR_NONE;
	c->cl_up_active_ms = util_now_ms();
	if (c->cl_up != NULL)
		upstream_flush(c->cl_up);
	if (c->cl_up != NULL && cl_cfg()->command_timeout_ms <
	    cl_cfg()->client_idle_timeout_ms)
		cl_arm_timer(c, cl_cfg()->command_timeout_ms);
	if (c->cl_up != NULL || p == NULL || p->done)
		return;
	/* The upstream was lost while the client was still sending: the
	 * server never had the whole command, so sending it again is safe
	 * even for APPEND. */
	if (!c->cl_replay_on) {
		cl_pend_unavailable(c, p);
		return;
	}
	c->cl_recover = p->rerun == CL_RERUN_IDLE ? CL_REDO_IDLE : CL_REDO_SEND;
	cl_reattach(c);
}

static void cl_recover_step(struct client *c);

static void
cl_recover_done_cb(void *arg, bool ok)
{
	struct client *c = arg;

	if (!ok && c->cl_up != NULL && upstream_state(c->cl_up) == UP_S_CLOSING) {
		/* Lost again while recovering: start over (bounded).  The
		 * new session has nothing selected, and an APPEND check
		 * must look again from the start: an unanswered SEARCH
		 * proves nothing. */
		pool_forget(c->cl_up);
		c->cl_up = NULL;
		c->cl_selected = false;
		if (c->cl_recover == CL_REDO_APPEND_SEARCH ||
		    c->cl_recover == CL_REDO_APPEND_DECIDE)
			c->cl_recover = CL_REDO_APPEND_EXAMINE;
		if (++c->cl_recover_tries < CL_RECOVER_TRIES) {
			cl_reattach(c);
			return;
		}
		cl_close(c, "upstream-lost", "The connection to Exchange "
		    "was lost.");
		return;
	}
	if (!ok) {
		cl_close(c, "reselect-failed", "The selected mailbox cannot "
		    "be opened again.");
		return;
	}
	cl_recover_step(c);
}

/* "* SEARCH 12" and "* OK [UIDVALIDITY 3]" during the APPEND check. */
static void
cl_recover_line_cb(void *arg, const char *line, size_t len)
{
	struct client *c = arg;
	char buf[128];
	unsigned long v;

	snprintf(buf, sizeof(buf), "%.*s", (int)(len < 127 ? len : 127), line);
	if (sscanf(buf, "* OK [UIDVALIDITY %lu]", &v) == 1)
		c->cl_found_uidvalidity = (uint32_t)v;
	else if (sscanf(buf, "* SEARCH %lu", &v) == 1)
		c->cl_found_uid = (uint32_t)v;
}

/* The Message-ID header of the kept APPEND, quoted for SEARCH, or -1. */
static int
cl_append_msgid(struct client *c, char *out, size_t outlen)
{
	size_t len = c->cl_replay_len;
	const char *buf = c->cl_replay;
	const char *hdr, *end, *v;
	size_t n;

	if (buf == NULL)
		return -1;
	/* The message starts after the literal marker's CRLF. */
	if ((hdr = memmem(buf, len, "}\r\n", 3)) == NULL)
		return -1;
	hdr += 3;
	end = memmem(hdr, len - (size_t)(hdr - buf), "\r\n\r\n", 4);
	if (end == NULL)
		end = buf + len;
	for (v = hdr; v < end; v++) {
		if ((v == hdr || v[-1] == '\n') && (size_t)(end - v) > 11 &&
		    strncasecmp(v, "Message-ID:", 11) == 0)
			break;
	}
	if (v >= end)
		return -1;
	v += 11;
	while (v < end && (*v == ' ' || *v == '\t'))
		v++;
	for (n = 0; v + n < end && v[n] != '\r' && v[n] != '\n'; n++)
		if (v[n] == '"' || v[n] == '\\')
			return -1;
	if (n == 0 || imap_quote(out, outlen, v, n) < 0)
		return -1;
	return 0;
}

/*
 * Back on a session after a loss: select the mailbox again, then redo what
 * cl_recover says.  Each step is one internal command; its callback calls
 * this again until nothing is left.
 */
static void
cl_recover_step(struct client *c)
{
	struct cl_pend *p = cl_inflight_pend(c);
	struct evbuffer *up = upstream_output(c->cl_up);
	char cmd[1024], msgid[600];
	enum cl_redo what = c->cl_recover;

	if (c->cl_select_cmd != NULL && !c->cl_selected) {
		c->cl_selected = true;
		if (upstream_command(c->cl_up, c->cl_select_cmd,
		    cl_recover_done_cb, c) == 0)
			return;
	}
	c->cl_recover = CL_REDO_NONE;
	if (p == NULL || what == CL_REDO_NONE)
		goto resume;
	switch (what) {
	case CL_REDO_APPEND_EXAMINE:
		if (cl_append_msgid(c, msgid, sizeof(msgid)) != 0 ||
		    c->cl_append_mbox == NULL) {
			cl_pend_unavailable(c, p);
			break;
		}
		/* First look whether the message landed before the loss. */
		c->cl_recover = CL_REDO_APPEND_SEARCH;
		c->cl_found_uid = c->cl_found_uidvalidity = 0;
		snprintf(cmd, sizeof(cmd), "EXAMINE %s", c->cl_append_mbox);
		c->cl_selected = true;
		if (upstream_command_lines(c->cl_up, cmd, cl_recover_line_cb,
		    cl_recover_done_cb, c) != 0)
			cl_pend_unavailable(c, p);
		return;
	case CL_REDO_APPEND_SEARCH:
		cl_append_msgid(c, msgid, sizeof(msgid));
		snprintf(cmd, sizeof(cmd), "UID SEARCH HEADER Message-ID %s", msgid);
		c->cl_recover = CL_REDO_APPEND_DECIDE;
		if (upstream_command_lines(c->cl_up, cmd, cl_recover_line_cb,
		    cl_recover_done_cb, c) != 0)
			cl_pend_unavailable(c, p);
		return;
	case CL_REDO_APPEND_DECIDE:
		/* The client's own mailbox must be selected again after our
		 * EXAMINE, found or not. */
		if (c->cl_found_uid != 0) {
			log_info("client_append_recovered", "id=%llu mailbox=%s "
			    "result=already-stored uid=%u", (unsigned long long)
			    c->cl_id, c->cl_name.mailbox, c->cl_found_uid);
			if (upstream_has_cap(c->cl_up, "UIDPLUS") &&
			    c->cl_found_uidvalidity != 0) {
				snprintf(cmd, sizeof(cmd), "OK [APPENDUID %u %u] "
				    "APPEND completed.", c->cl_found_uidvalidity,
				    c->cl_found_uid);
				cl_pend_answer(c, p, cmd);
			} else
				cl_pend_answer(c, p, "OK APPEND completed.");
		} else {
			log_info("client_append_recovered", "id=%llu mailbox=%s "
			    "result=sent-again", (unsigned long long)c->cl_id,
			    c->cl_name.mailbox);
			c->cl_recover = CL_REDO_SEND;
		}
		/* cl_selected stays true: our EXAMINE selected something. */
		if (c->cl_select_cmd != NULL && upstream_command(c->cl_up,
		    c->cl_select_cmd, cl_recover_done_cb, c) == 0)
			return;
		cl_recover_step(c);
		return;
	case CL_REDO_SEND:
		/* The same bytes, tag and all, on the new session. */
		evbuffer_add(up, c->cl_replay, c->cl_replay_len);
		break;
	case CL_REDO_IDLE:
		if (!c->cl_in_idle) {
			/* DONE had gone out: the IDLE is over. */
			cl_pend_answer(c, p, "OK IDLE terminated.");
			break;
		}
		c->cl_swallow_cont = true;
		evbuffer_add_printf(up, "%s IDLE\r\n", p->tag);
		break;
	default:
		break;
	}
resume:
	c->cl_recover_tries = 0;
	/* Reading may have been stopped by whatever came before the loss
	 * (a park, backpressure): start it again whatever the reason. */
	if (c->cl_state == CL_S_AUTH && !c->cl_logout) {
		c->cl_read_blocked = false;
		cl_resume_reading(c);
	}
}

/* ------------------------------------------------------------ multiplex */


static bool
cl_multiplex(void)
{
	return cl_cfg()->pool_mode == CFG_POOL_MULTIPLEX;
}

/* Keep cl_lru and the park timer right after activity or attach. */
static void
cl_touch(struct client *c)
{
	struct timeval tv;
	uint64_t ms;

	c->cl_active_ms = util_now_ms();
	/* Session mode has only IDLE renewal to time. */
	if (!cl_multiplex() && !c->cl_in_idle) {
		evtimer_del(c->cl_park_ev);
		return;
	}
	if (c->cl_in_lru)
		TAILQ_REMOVE(&cl_lru, c, cl_lru_link);
	c->cl_in_lru = cl_multiplex() && c->cl_state == CL_S_AUTH &&
	    c->cl_up != NULL;
	if (c->cl_in_lru)
		TAILQ_INSERT_TAIL(&cl_lru, c, cl_lru_link);
	/* An idling client only parks under pressure; its timer renews
	 * the real IDLE before Exchange's 30-minute autologout. */
	ms = c->cl_in_idle ? cl_cfg()->idle_refresh_ms : cl_cfg()->park_after_ms;
	tv.tv_sec = (time_t)(ms / 1000);
	tv.tv_usec = (suseconds_t)(ms % 1000) * 1000;
	evtimer_add(c->cl_park_ev, &tv);
	if (c->cl_in_lru)
		pool_note_parkable();
}

static void
cl_lru_remove(struct client *c)
{
	if (c->cl_in_lru)
		TAILQ_REMOVE(&cl_lru, c, cl_lru_link);
	c->cl_in_lru = false;
}

/* Between commands with nothing half-read or unanswered (an IDLE waiting
 * for DONE counts as nothing: it may be parked too). */
static bool
cl_parkable(struct client *c)
{
	if (c->cl_state != CL_S_AUTH || c->cl_up == NULL || c->cl_logout ||
	    c->cl_select_opaque ||
	    c->cl_waiting || c->cl_recover != CL_REDO_NONE ||
	    c->cl_cur != CL_CUR_NONE || !imap_framer_at_boundary(&c->cl_framer) ||
	    c->cl_swallow_cont || c->cl_idle_refresh ||
	    evbuffer_get_length(bufferevent_get_input(c->cl_bev)) > 0)
		return false;
	if (c->cl_pend_len == 0)
		return true;
	return c->cl_in_idle && c->cl_pend_len == 1 && c->cl_inflight == 1;
}

void
client_pool_pressure(unsigned need)
{
	struct client *c, *next;

	for (c = TAILQ_FIRST(&cl_lru); c != NULL && cl_parking < need; c = next) {
		next = TAILQ_NEXT(c, cl_lru_link);
		if (cl_parkable(c))
			cl_park(c);
	}
}

/* Poll for a parked idling client, spread out with jitter. */
static void
cl_arm_idle_poll(struct client *c)
{
	uint64_t ms = cl_cfg()->idle_poll_interval_ms;
	struct timeval tv;

	ms = ms / 2 + (uint64_t)arc4random_uniform((uint32_t)(ms / 2 + 1));
	tv.tv_sec = (time_t)(ms / 1000);
	tv.tv_usec = (suseconds_t)(ms % 1000) * 1000;
	evtimer_add(c->cl_park_ev, &tv);
}

/* First lines of the responses to our FETCH 1:* (UID FLAGS). */
static void
cl_snap_line_cb(void *arg, const char *line, size_t len)
{
	struct client *c = arg;
	struct resync_snap *s = c->cl_state == CL_S_PARKING ? &c->cl_snap :
	    &c->cl_now;
	const char *flags;
	size_t flen, old;
	uint32_t msn, uid, n, digest;

	if (resync_parse_fetch(line, len, &msn, &uid, &flags, &flen) == 0) {
		digest = resync_flags_digest(flags, flen);
		if (msn != s->rs_n + 1 || resync_snap_append(s, uid, digest) != 0) {
			c->cl_snap_ok = false;
			return;
		}
		/* Keep the text of flags the client has to be told about. */
		if (s == &c->cl_now && ((old = resync_snap_find(&c->cl_snap,
		    uid)) == 0 || c->cl_snap.rs_msgs[old - 1].rm_flags != digest))
			evbuffer_add_printf(c->cl_flagtext, "%u %.*s%c", msn,
			    (int)flen, flags, '\0');
		return;
	}
	if (resync_parse_count(line, len, "EXISTS", &n) == 0) {
		if (s == &c->cl_snap)
			/* New mail while we looked: the client hears of it
			 * first thing after it is attached again. */
			evbuffer_add_printf(c->cl_pending_ev, "* %u EXISTS\r\n", n);
		else
			c->cl_new_exists = n;
		return;
	}
	if (resync_parse_uidvalidity(line, len, &n) == 0)
		c->cl_new_uidvalidity = n;
}

static void
cl_park_done_cb(void *arg, bool ok)
{
	struct client *c = arg;
	struct upstream *u = c->cl_up;

	cl_parking--;
	if (!ok || !c->cl_snap_ok) {
		if (upstream_state(u) == UP_S_CLOSING) {
			/* Lost while looking: go on attached, on another
			 * session with the mailbox selected again, as after
			 * any loss between commands. */
			pool_forget(u);
			c->cl_up = NULL;
			c->cl_selected = false;
			c->cl_recover = CL_REDO_NONE;
			cl_set_state(c, CL_S_AUTH);
			cl_reattach(c);
			return;
		}
		/* Could not take the snapshot: stay attached. */
		cl_set_state(c, CL_S_AUTH);
		cl_touch(c);
		cl_resume_reading(c);
		return;
	}
	c->cl_up = NULL;
	upstream_set_lessee(u, NULL, NULL);
	pool_release(u, c->cl_selected ? POOL_RELEASE_SELECTED :
	    POOL_RELEASE_CLEAN);
	cl_set_state(c, CL_S_PARKED);
	log_debug("client_parked", "id=%llu mailbox=%s messages=%zu idle=%s",
	    (unsigned long long)c->cl_id, c->cl_name.mailbox, c->cl_snap.rs_n,
	    c->cl_in_idle ? "yes" : "no");
	if (c->cl_in_idle)
		cl_arm_idle_poll(c);
	cl_resume_reading(c);
}

/* Give the upstream session back, keeping what the client knows. */
static void
cl_park(struct client *c)
{
	if (c->cl_state != CL_S_PARKING) {
		cl_lru_remove(c);
		cl_set_state(c, CL_S_PARKING);
		cl_parking++;
		bufferevent_disable(c->cl_bev, EV_READ);
	}
	if (c->cl_in_idle && !c->cl_idle_ending) {
		/* End the real IDLE; its tagged OK (hidden) continues this.
		 * The client's own IDLE goes on. */
		c->cl_idle_ending = true;
		evbuffer_add(upstream_output(c->cl_up), "DONE\r\n", 6);
		return;
	}
	c->cl_idle_ending = false;
	resync_snap_clear(&c->cl_snap);
	c->cl_snap.rs_uidvalidity = c->cl_uidvalidity;
	c->cl_snap_ok = true;
	if (c->cl_pending_ev == NULL)
		c->cl_pending_ev = evbuffer_new();
	evbuffer_drain(c->cl_pending_ev, evbuffer_get_length(c->cl_pending_ev));
	if (c->cl_select_cmd == NULL || c->cl_exists == 0 ||
	    upstream_command_lines(c->cl_up, "FETCH 1:* (UID FLAGS)",
	    cl_snap_line_cb, cl_park_done_cb, c) != 0)
		cl_park_done_cb(c, true);
}

/* Get a session back: for the command waiting in the input (its tag
 * saved), or for an IDLE poll. */
static void
cl_attach(struct client *c, bool poll)
{
	evtimer_del(c->cl_park_ev);
	c->cl_attach_poll = poll;
	cl_set_state(c, CL_S_ATTACHING);
	bufferevent_disable(c->cl_bev, EV_READ);
	cl_ask_pool(c);
}

/* The pool could not give one back in time. */
static void
cl_attach_failed(struct client *c, const char *text)
{
	cl_set_state(c, CL_S_PARKED);
	if (c->cl_attach_poll) {
		cl_arm_idle_poll(c);	/* try again at the next poll */
		return;
	}
	cl_printf(c, "%s %s\r\n", c->cl_attach_tag, text);
	c->cl_drop_next = true;
	cl_resume_reading(c);
}

static void
cl_resync_fail(struct client *c, const char *bye)
{
	if (c->cl_up != NULL && upstream_state(c->cl_up) == UP_S_CLOSING) {
		/* Lost under us: start the attach over on another session. */
		pool_forget(c->cl_up);
		c->cl_up = NULL;
		c->cl_rs = CL_RS_SELECT;
		if (++c->cl_recover_tries < CL_RECOVER_TRIES) {
			cl_ask_pool(c);
			return;
		}
		bye = "The connection to Exchange was lost.";
	}
	cl_close(c, "resync-failed", bye);
}

static void
cl_resync_cb(void *arg, bool ok)
{
	struct client *c = arg;

	if (!ok || !c->cl_snap_ok) {
		cl_resync_fail(c, "The mailbox cannot be opened again.");
		return;
	}
	cl_resync_step(c);
}

/* One untagged response of the resync, in IMAP's order. */
static void
cl_resync_emit(void *arg, enum resync_ev ev, size_t n)
{
	struct client *c = arg;
	size_t len, off;
	const char *t;

	switch (ev) {
	case RESYNC_EXPUNGE:
		cl_printf(c, "* %zu EXPUNGE\r\n", n);
		break;
	case RESYNC_EXISTS:
		cl_printf(c, "* %zu EXISTS\r\n", n);
		break;
	case RESYNC_FLAGS:
		len = evbuffer_get_length(c->cl_flagtext);
		t = (const char *)evbuffer_pullup(c->cl_flagtext, -1);
		for (off = 0; off < len; off += strlen(t + off) + 1)
			if ((size_t)strtoul(t + off, NULL, 10) == n) {
				cl_printf(c, "* %zu FETCH (FLAGS (%s))\r\n", n,
				    strchr(t + off, ' ') + 1);
				break;
			}
		break;
	}
}

/*
 * Attached again: select the mailbox as before, read it, and tell the
 * client what changed while it was parked, before anything else.
 */
static void
cl_resync_step(struct client *c)
{
	switch (c->cl_select_cmd != NULL ? c->cl_rs : CL_RS_EMIT) {
	case CL_RS_SELECT:
		c->cl_rs = CL_RS_FETCH;
		c->cl_selected = true;
		c->cl_new_uidvalidity = c->cl_new_exists = 0;
		c->cl_snap_ok = true;
		if (upstream_command_lines(c->cl_up, c->cl_select_cmd,
		    cl_snap_line_cb, cl_resync_cb, c) != 0)
			cl_resync_fail(c, "The mailbox cannot be opened again.");
		return;
	case CL_RS_FETCH:
		if (c->cl_new_uidvalidity != c->cl_uidvalidity) {
			cl_close(c, "uidvalidity-changed", "UIDVALIDITY of the "
			    "selected mailbox changed; please reconnect.");
			return;
		}
		c->cl_rs = CL_RS_EMIT;
		resync_snap_clear(&c->cl_now);
		c->cl_now.rs_uidvalidity = c->cl_new_uidvalidity;
		if (c->cl_flagtext == NULL)
			c->cl_flagtext = evbuffer_new();
		evbuffer_drain(c->cl_flagtext, evbuffer_get_length(c->cl_flagtext));
		if (c->cl_new_exists > 0) {
			if (upstream_command_lines(c->cl_up,
			    "FETCH 1:* (UID FLAGS)", cl_snap_line_cb, cl_resync_cb,
			    c) != 0)
				cl_resync_fail(c, "The mailbox cannot be read again.");
			return;
		}
		/* FALLTHROUGH */
	case CL_RS_EMIT:
		if (c->cl_select_cmd == NULL)
			break;
		/* What the client missed while we looked, then the rest. */
		if (c->cl_pending_ev != NULL)
			evbuffer_add_buffer(cl_output(c),
			    c->cl_pending_ev);
		if (resync_diff(&c->cl_snap, &c->cl_now, cl_resync_emit, c) != 0) {
			cl_close(c, "resync-failed", "The mailbox changed in a "
			    "way imapshim cannot replay; please reconnect.");
			return;
		}
		c->cl_exists = (uint32_t)c->cl_now.rs_n;
		break;
	}
	c->cl_rs = CL_RS_SELECT;
	resync_snap_clear(&c->cl_snap);
	cl_set_state(c, CL_S_AUTH);
	if (c->cl_in_idle) {
		/* Back into a real IDLE; the client had its "+" long ago. */
		struct cl_pend *p = cl_inflight_pend(c);

		if (p != NULL) {
			c->cl_swallow_cont = true;
			evbuffer_add_printf(upstream_output(c->cl_up), "%s IDLE\r\n",
			    p->tag);
		}
	}
	cl_touch(c);
	if (c->cl_attach_poll && c->cl_in_idle) {
		/* An IDLE poll: park again at once under pressure only. */
		struct pool_stats st;

		pool_get_stats(&st);
		if (st.waiters > 0 && cl_parkable(c))
			cl_park(c);
		return;
	}
	cl_resume_reading(c);
}

static void
cl_park_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct client *c = arg;

	(void)fd;
	(void)what;
	if (c->cl_state == CL_S_AUTH && c->cl_up == NULL && !c->cl_waiting &&
	    c->cl_recover != CL_REDO_NONE) {
		cl_reattach(c);		/* an APPEND check waiting to retry */
		return;
	}
	if (c->cl_state == CL_S_PARKED && c->cl_in_idle) {
		cl_attach(c, true);
		return;
	}
	if (c->cl_state != CL_S_AUTH || c->cl_up == NULL)
		return;
	if (c->cl_in_idle) {
		/* Renew the real IDLE (Exchange logs idle sessions out after
		 * 30 minutes); DONE's hidden OK re-issues it. */
		if (!c->cl_idle_refresh && !c->cl_swallow_cont) {
			c->cl_idle_refresh = true;
			evbuffer_add(upstream_output(c->cl_up), "DONE\r\n", 6);
		}
		cl_touch(c);
		return;
	}
	if (cl_multiplex() && cl_parkable(c))
		cl_park(c);
	else
		cl_touch(c);
}

/* ------------------------------------------------------------ upstream */

static void cl_up_ready(void *arg);
static void cl_up_frame(void *arg, const struct imap_frame *fr,
    const struct imap_resp *resp, struct evbuffer *in);
static void cl_up_lost(void *arg, const char *reason);
static void cl_up_writable(void *arg);
static void cl_up_read_done(void *arg);

static const struct upstream_cbs cl_up_cbs = {
	.ready = cl_up_ready,
	.frame = cl_up_frame,
	.lost = cl_up_lost,
	.writable = cl_up_writable,
	.read_done = cl_up_read_done,
};

static void
cl_pool_granted(struct pool_waiter *w, struct upstream *u)
{
	struct client *c = w->pw_arg;

	c->cl_waiting = false;
	c->cl_up = u;
	upstream_set_lessee(u, &cl_up_cbs, c);
	c->cl_relay_sync_lit = !upstream_has_cap(u, "LITERAL+");
	if (c->cl_state == CL_S_ATTACHING) {
		c->cl_selected = false;	/* a fresh session: nothing yet */
		cl_resync_step(c);	/* back from parking */
	}
	else if (c->cl_state == CL_S_AUTH)
		cl_recover_step(c);	/* back after a loss */
	else
		cl_up_ready(c);
}

static void
cl_pool_failed(struct pool_waiter *w, enum pool_fail why, const char *reason)
{
	struct client *c = w->pw_arg;
	char msg[700];

	c->cl_waiting = false;
	if (c->cl_state == CL_S_ATTACHING) {
		cl_attach_failed(c, why == POOL_FAIL_TIMEOUT ?
		    "NO [UNAVAILABLE] All Exchange sessions are busy "
		    "(queue_timeout); try again later." :
		    "NO [UNAVAILABLE] Exchange is not reachable; try again later.");
		return;
	}
	if (c->cl_state == CL_S_AUTH) {
		/* No session to go on with after a loss. */
		struct cl_pend *p = cl_inflight_pend(c);

		if (c->cl_recover >= CL_REDO_APPEND_EXAMINE &&
		    c->cl_append_tries < CL_APPEND_RECOVER_TRIES) {
			/* Whether the voice message landed is not known yet;
			 * answering now could store it twice: keep trying,
			 * with backoff, for about a minute. */
			struct timeval tv;
			uint64_t ms = 500ULL << (c->cl_append_tries < 4 ?
			    c->cl_append_tries : 4);

			c->cl_append_tries++;
			tv.tv_sec = (time_t)(ms / 1000);
			tv.tv_usec = (suseconds_t)(ms % 1000) * 1000;
			evtimer_add(c->cl_park_ev, &tv);
			return;
		}
		if (p != NULL)
			cl_pend_unavailable(c, p);
		cl_close(c, "upstream-lost", "Exchange is not reachable; log "
		    "in again later.");
		return;
	}
	switch (why) {
	case POOL_FAIL_AUTH:
		cl_auth_answer(c, "NO [AUTHENTICATIONFAILED] Exchange refused "
		    "the login for this mailbox.");
		return;
	case POOL_FAIL_TIMEOUT:
		cl_auth_answer(c, "NO [UNAVAILABLE] All Exchange sessions are "
		    "busy (queue_timeout); try again later.");
		return;
	default:
		snprintf(msg, sizeof(msg), "NO [UNAVAILABLE] Exchange is not "
		    "reachable (%s); try again later.", reason);
		/* The reason is ours or OpenSSL's text: keep it one line. */
		for (char *q = msg; *q; q++)
			if (*q == '\r' || *q == '\n')
				*q = ' ';
		cl_auth_answer(c, msg);
		return;
	}
}

/* Credentials are good: wait for an upstream session of this mailbox. */
static void
cl_ask_pool(struct client *c)
{
	struct pool_waiter *w = &c->cl_waiter;

	memset(w, 0, sizeof(*w));
	snprintf(w->pw_mailbox, sizeof(w->pw_mailbox), "%s", c->cl_name.mailbox);
	snprintf(w->pw_domain, sizeof(w->pw_domain), "%s",
	    cl_cfg()->domain != NULL ? "" : c->cl_name.domain);
	w->pw_granted = cl_pool_granted;
	w->pw_failed = cl_pool_failed;
	w->pw_arg = c;
	c->cl_waiting = true;
	pool_acquire(w);
}

static void
cl_up_ready(void *arg)
{
	struct client *c = arg;
	char caps[1024];
	const struct config *cfg = cl_cfg();

	stats_command(STATS_CMD_LOGIN, util_now_us() - c->cl_login_us);
	cl_set_state(c, CL_S_AUTH);
	c->cl_bad_in_row = 0;
	imap_framer_init(&c->cl_framer, cfg->max_command_bytes,
	    cfg->max_literal_bytes);
	cl_caps(c, caps, sizeof(caps));
	/* Kept: a parked session has no upstream to ask. */
	c->cl_auth_caps = xstrdup(caps);
	cl_printf(c, "%s OK [CAPABILITY %s] Logged in.\r\n", c->cl_tag, caps);
	if (protolog_enabled()) {
		char ctx[128];

		snprintf(ctx, sizeof(ctx), "R=\"%s OK Logged in.\"", c->cl_tag);
		cl_plog(c, "login", LOG_MASKED, 0, 0, c->cl_login_us, ctx);
	}
	cl_arm_timer(c, cfg->client_idle_timeout_ms);
	cl_touch(c);
	cl_resume_reading(c);
}

static void
cl_up_lost(void *arg, const char *reason)
{
	struct client *c = arg;
	struct cl_pend *p = cl_inflight_pend(c);
	bool cut = upstream_response_incomplete(c->cl_up);

	if (cl_stage_owner == c)
		cl_stage_flush();	/* lines relayed before the loss */
	pool_forget(c->cl_up);
	c->cl_up = NULL;
	c->cl_selected = false;
	stats_login_retry(STATS_RETRY_LOST);
	if (cut) {
		/* The client has part of a response (half a FETCH literal):
		 * nothing more can be said on that stream, not even BYE. */
		log_info("client_upstream_lost", "id=%llu mailbox=%s reason=\"%s\" "
		    "in_flight=%s cut=yes", (unsigned long long)c->cl_id,
		    c->cl_name.mailbox, reason, p != NULL ? p->tag : "-");
		cl_close(c, "upstream-lost-mid-response", NULL);
		return;
	}
	log_info("client_upstream_lost", "id=%llu mailbox=%s reason=\"%s\" "
	    "in_flight=%s", (unsigned long long)c->cl_id, c->cl_name.mailbox,
	    reason, p != NULL ? p->tag : "-");
	if (++c->cl_recover_tries > CL_RECOVER_TRIES) {
		cl_close(c, "upstream-lost", "The connection to Exchange was lost.");
		return;
	}
	if (c->cl_cur == CL_CUR_RELAY) {
		/* The client is still sending this command: keep reading it
		 * (cl_command_sent takes over), or drop the rest. */
		if (!c->cl_replay_on) {
			c->cl_cur = CL_CUR_SWALLOW;
			if (p != NULL)
				cl_pend_unavailable(c, p);
			cl_reattach(c);
		}
		return;
	}
	c->cl_recover = CL_REDO_NONE;
	if (p != NULL) {
		if (p->rerun == CL_RERUN_IDLE)
			c->cl_recover = CL_REDO_IDLE;
		else if (c->cl_replay_on && p->rerun == CL_RERUN_APPEND)
			c->cl_recover = CL_REDO_APPEND_EXAMINE;
		else if (c->cl_replay_on && p->rerun == CL_RERUN_READONLY &&
		    !p->replied)
			c->cl_recover = CL_REDO_SEND;
		else
			cl_pend_unavailable(c, p);
	}
	if (c->cl_state == CL_S_AUTH)
		cl_reattach(c);
}

/* Read on once whatever blocked reading is gone (see cl_read_cb). */
static void
cl_unblock(struct client *c)
{
	if (c->cl_read_blocked && c->cl_state == CL_S_AUTH && !c->cl_logout &&
	    c->cl_up != NULL && !upstream_output_full(c->cl_up) &&
	    c->cl_pend_len < CL_MAX_PENDING) {
		c->cl_read_blocked = false;
		cl_resume_reading(c);
	}
}

static void
cl_up_writable(void *arg)
{
	cl_unblock(arg);
}

/* Count reply bytes for the protocol log; log the command at its tagged
 * reply (before the reply's bytes leave the input buffer). */
static void
cl_plog_response(struct client *c, struct cl_pend *done,
    const struct imap_resp *resp, const struct imap_frame *fr)
{
	struct cl_pend *p = done;
	char ctx[600];
	size_t i;

	for (i = 0; p == NULL && i < c->cl_pend_len; i++)
		if (cl_pend_at(c, i)->relayed && !cl_pend_at(c, i)->done)
			p = cl_pend_at(c, i);
	if (p == NULL)
		return;
	p->rp += fr->len;
	if (done == NULL)
		return;
	snprintf(ctx, sizeof(ctx), "R=\"%s %s %.*s\"", p->tag,
	    resp->status == IMAP_ST_OK ? "OK" : resp->status == IMAP_ST_NO ?
	    "NO" : "BAD", (int)(resp->text_len > 400 ? 400 : resp->text_len),
	    resp->text);
	cl_plog(c, stats_command_names[p->stat_cmd], p->pl_params, p->rq,
	    p->rp, p->started_us, ctx);
}

/* Keep count of messages and UIDVALIDITY as the client is told them. */
static void
cl_track_untagged(struct client *c, const struct imap_frame *fr,
    struct evbuffer *in)
{
	const char *line = (const char *)evbuffer_pullup(in, (ev_ssize_t)fr->len);
	uint32_t n;

	if (!cl_multiplex() || line == NULL)
		return;
	if (resync_parse_count(line, fr->text_len, "EXISTS", &n) == 0)
		c->cl_exists = n;
	else if (resync_parse_count(line, fr->text_len, "EXPUNGE", &n) == 0) {
		if (c->cl_exists > 0)
			c->cl_exists--;
	} else if (resync_parse_uidvalidity(line, fr->text_len, &n) == 0)
		c->cl_uidvalidity = n;
}

/* Find the relayed command a tagged reply answers. */
static struct cl_pend *
cl_pend_find(struct client *c, const struct imap_tok *tag)
{
	size_t i;
	struct cl_pend *p;

	for (i = 0; i < c->cl_pend_len; i++) {
		p = cl_pend_at(c, i);
		if (p->relayed && !p->done && strlen(p->tag) == tag->len &&
		    memcmp(p->tag, tag->p, tag->len) == 0)
			return p;
	}
	return NULL;
}

static void
cl_up_frame(void *arg, const struct imap_frame *fr,
    const struct imap_resp *resp, struct evbuffer *in)
{
	struct client *c = arg;
	struct evbuffer *out = cl_stage_for(c);
	struct cl_pend *p = NULL;

	if (resp != NULL && resp->kind == IMAP_RESP_CONTINUATION &&
	    ((!c->cl_in_idle && !c->cl_relay_sync_lit) || c->cl_swallow_cont)) {
		/* Nobody asked for it (literals go upstream as LITERAL+), or
		 * the client had its "+" before we had to IDLE again. */
		if (c->cl_swallow_cont) {
			c->cl_swallow_cont = false;
			pool_note_parkable();
		}
		evbuffer_drain(in, fr->len);
		return;
	}
	c->cl_up_active_ms = util_now_ms();
	if (resp != NULL && resp->kind == IMAP_RESP_UNTAGGED &&
	    resp->status == IMAP_ST_BYE) {
		/* The upstream session ends, not the client's: the loss that
		 * follows is handled (and hidden) like any other. */
		evbuffer_drain(in, fr->len);
		return;
	}
	if (resp != NULL && resp->kind == IMAP_RESP_UNTAGGED)
		cl_track_untagged(c, fr, in);
	if (resp != NULL && resp->kind == IMAP_RESP_TAGGED) {
		p = cl_pend_find(c, &resp->tag);
		if (p != NULL && p->rerun == CL_RERUN_IDLE &&
		    (c->cl_idle_ending || c->cl_idle_refresh)) {
			/* Our DONE ended the real IDLE; the client's goes on. */
			evbuffer_drain(in, fr->len);
			if (c->cl_idle_refresh) {
				c->cl_idle_refresh = false;
				c->cl_swallow_cont = true;
				evbuffer_add_printf(upstream_output(c->cl_up),
				    "%s IDLE\r\n", p->tag);
			} else
				cl_park(c);
			return;
		}
		if (p != NULL && p->reply != NULL) {
			/* We answered this one ourselves (a command we had to
			 * cut short upstream); hide the server's answer. */
			evbuffer_drain(in, fr->len);
			p->done = true;
			c->cl_inflight--;
			cl_pend_flush(c);
			cl_unblock(c);
			return;
		}
	}
	c->cl_bytes_out += fr->len;
	if (p == NULL && c->cl_inflight > 0)
		cl_inflight_pend(c)->replied = true;
	if (protolog_enabled())
		cl_plog_response(c, p, resp, fr);
	if (fr->kind == IMAP_FR_LINE) {
		/* Copied, so that the lines of one reply share one chain (one
		 * TLS record); a line lies in in's first chain already. */
		evbuffer_add(out, evbuffer_pullup(in, (ev_ssize_t)fr->len),
		    fr->len);
		evbuffer_drain(in, fr->len);
	} else
		relay_move(in, out, fr->len);
	if (p != NULL) {
		/* The reply is complete: send it before anything can take
		 * the upstream (and its read_done callback) away. */
		cl_stage_flush();
		/* A failed SELECT leaves no mailbox selected (RFC 3501 6.3.1). */
		if (p->selects > 0) {
			c->cl_selected = resp->status == IMAP_ST_OK;
			free(c->cl_select_cmd);
			c->cl_select_cmd = NULL;
			if (c->cl_selected) {
				c->cl_select_cmd = p->select_cmd;
				p->select_cmd = NULL;
			}
			c->cl_select_opaque = c->cl_selected &&
			    c->cl_select_cmd == NULL;
		} else if (p->selects < 0 && resp->status == IMAP_ST_OK) {
			c->cl_selected = false;
			c->cl_select_opaque = false;
			free(c->cl_select_cmd);
			c->cl_select_cmd = NULL;
		}
		c->cl_replay_on = false;
		c->cl_recover_tries = 0;
		c->cl_append_tries = 0;
		stats_command(p->stat_cmd, util_now_us() - p->started_us);
		p->done = true;
		c->cl_inflight--;
		cl_pend_flush(c);
		if (c->cl_state == CL_S_CLOSING)
			return;
		if (cl_drain_bye != NULL && c->cl_inflight == 0) {
			cl_close(c, "shutdown", cl_drain_bye);
			return;
		}
		if (c->cl_inflight == 0 && c->cl_cur == CL_CUR_NONE &&
		    c->cl_up != NULL && pool_session_worn(c->cl_up)) {
			cl_swap_upstream(c);
			return;
		}
		cl_touch(c);
		cl_unblock(c);
	}
	if (cl_stage_owner == c && evbuffer_get_length(cl_stage) >= RELAY_LOWAT)
		cl_stage_flush();
	if (c->cl_up != NULL && relay_output_full(c->cl_bev))
		upstream_pause(c->cl_up, true);
}

static void
cl_up_read_done(void *arg)
{
	struct client *c = arg;

	/* Part of a literal (a voice message being fetched) arrived: more
	 * of it follows at once, so collect a whole record's worth before
	 * writing (servers send 4 KiB records); a loss or the end of the
	 * response flushes the rest. */
	if (cl_stage_owner == c && c->cl_up != NULL &&
	    upstream_response_incomplete(c->cl_up) &&
	    evbuffer_get_length(cl_stage) < RELAY_RECORD)
		return;
	if (cl_stage_owner == c)
		cl_stage_flush();
}

/* ------------------------------------------------------------- relaying */

/* Room for len more bytes of the in-flight command's copy, kept while it
 * may have to be sent again; NULL when there is no copy (any more: past
 * cl_replay_max it cannot be sent again, and the copy is dropped). */
static char *
cl_keep_room(struct client *c, size_t len)
{
	size_t cap;
	char *p;

	if (!c->cl_replay_on)
		return NULL;
	if (c->cl_replay_len + len > c->cl_replay_max) {
		c->cl_replay_on = false;
		c->cl_replay_len = 0;
		return NULL;
	}
	if (c->cl_replay_len + len > c->cl_replay_cap) {
		cap = c->cl_replay_cap ? c->cl_replay_cap : 256;
		while (cap < c->cl_replay_len + len)
			cap *= 2;
		c->cl_replay = xrealloc(c->cl_replay, cap);
		c->cl_replay_cap = cap;
	}
	p = c->cl_replay + c->cl_replay_len;
	c->cl_replay_len += len;
	return p;
}

static void
cl_keep(struct client *c, const char *data, size_t len)
{
	char *p = cl_keep_room(c, len);

	if (p != NULL)
		memcpy(p, data, len);
}

/* Move len bytes of the command being read from in to the upstream (or,
 * while detached, only to the copy kept for a re-run). */
static void
cl_emit(struct client *c, struct evbuffer *in, size_t len)
{
	char *keep;

	c->cl_bytes_in += len;
	if (c->cl_cur_pend != NULL)
		c->cl_cur_pend->rq += len;
	if ((keep = cl_keep_room(c, len)) != NULL)
		evbuffer_copyout(in, keep, len);
	if (c->cl_up != NULL)
		relay_move(in, upstream_output(c->cl_up), len);
	else
		evbuffer_drain(in, len);
}

static void
cl_emit_text(struct client *c, const char *s, size_t len)
{
	cl_keep(c, s, len);
	if (c->cl_up != NULL)
		evbuffer_add(upstream_output(c->cl_up), s, len);
}

/* Forward one command line, turning a synchronizing literal into LITERAL+
 * (imapshim sent the client its "+" already). */
static void
cl_forward_line(struct client *c, const struct imap_frame *fr,
    const char *line, struct evbuffer *in)
{
	char marker[32];
	int n;

	if (fr->has_lit && !fr->lit_nonsync && !c->cl_relay_sync_lit &&
	    line[fr->marker_off] == '{') {
		n = snprintf(marker, sizeof(marker), "{%llu+}\r\n",
		    (unsigned long long)fr->lit_size);
		cl_emit_text(c, line, fr->marker_off);
		cl_emit_text(c, marker, (size_t)n);
		c->cl_bytes_in += fr->len;
		if (c->cl_cur_pend != NULL)
			c->cl_cur_pend->rq += fr->len;
		evbuffer_drain(in, fr->len);
		cl_printf(c, "+ Ready for literal data.\r\n");
		return;
	}
	cl_emit(c, in, fr->len);
}

/*
 * Part of this command went upstream already and the rest cannot follow:
 * end it with bytes no IMAP server accepts, so the server answers BAD, and
 * give the client our own answer in its place.
 */
static void
cl_poison_current(struct client *c, const char *reply)
{
	char buf[512];

	if (c->cl_up != NULL)
		evbuffer_add(upstream_output(c->cl_up), " \"\r\n", 4);
	c->cl_replay_on = false;
	if (c->cl_cur_pend != NULL) {
		snprintf(buf, sizeof(buf), "%s %s\r\n", c->cl_cur_pend->tag, reply);
		free(c->cl_cur_pend->reply);
		c->cl_cur_pend->reply = xstrdup(buf);
	}
	c->cl_cur = CL_CUR_NONE;
}

/* Commands imapshim answers itself after login. */
static bool
cl_auth_local(struct client *c, const struct imap_tok *tag,
    const struct imap_tok *cmd, bool single_line)
{
	char caps[1024];

	if (imap_tok_is(cmd, "CAPABILITY") && single_line) {
		cl_caps(c, caps, sizeof(caps));
		cl_reply(c, tag->p, tag->len, false, "* CAPABILITY %s\r\n"
		    "%.*s OK CAPABILITY completed.\r\n", caps, (int)tag->len,
		    tag->p);
	} else if (imap_tok_is(cmd, "ID")) {
		cl_reply(c, tag->p, tag->len, false, "* ID (\"name\" \"imapshim\" "
		    "\"version\" \"%s\")\r\n%.*s OK ID completed.\r\n",
		    PACKAGE_VERSION, (int)tag->len, tag->p);
	} else if (imap_tok_is(cmd, "LOGOUT") && single_line) {
		/* Commands pipelined after LOGOUT are never run. */
		c->cl_logout = true;
		bufferevent_disable(c->cl_bev, EV_READ);
		cl_reply(c, tag->p, tag->len, true, "* BYE imapshim logging out."
		    "\r\n%.*s OK LOGOUT completed.\r\n", (int)tag->len, tag->p);
	} else if (imap_tok_is(cmd, "LOGIN") || imap_tok_is(cmd, "AUTHENTICATE")) {
		cl_reply(c, tag->p, tag->len, false, "%.*s BAD Already logged "
		    "in.\r\n", (int)tag->len, tag->p);
	} else if (imap_tok_is(cmd, "STARTTLS") || imap_tok_is(cmd, "COMPRESS") ||
	    imap_tok_is(cmd, "ENABLE")) {
		cl_reply(c, tag->p, tag->len, false, "%.*s BAD %.*s is not "
		    "supported by imapshim.\r\n", (int)tag->len, tag->p,
		    (int)cmd->len, cmd->p);
	} else
		return false;
	return true;
}

static void
cl_auth_first_line(struct client *c, const struct imap_frame *fr,
    const char *line, struct evbuffer *in)
{
	struct imap_tok tag, cmd;
	char t[IMAPSHIM_TAG_MAX + 1];

	if (c->cl_drop_next) {
		/* Answered NO [UNAVAILABLE] while waiting for a session. */
		c->cl_drop_next = false;
		evbuffer_drain(in, fr->len);
		if (fr->has_lit && !fr->lit_nonsync) {
			/* Nobody sent "+": the client sends no literal, its
			 * next bytes are a new command. */
			imap_framer_init(&c->cl_framer,
			    cl_cfg()->max_command_bytes,
			    cl_cfg()->max_literal_bytes);
			c->cl_cur = CL_CUR_NONE;
			return;
		}
		c->cl_cur = fr->last ? CL_CUR_NONE : CL_CUR_SWALLOW;
		return;
	}
	if (c->cl_in_idle && c->cl_up == NULL) {
		/* Parked while idling: DONE ends the IDLE right here. */
		struct cl_pend *p = cl_inflight_pend(c);

		c->cl_in_idle = false;
		evtimer_del(c->cl_park_ev);
		evbuffer_drain(in, fr->len);
		if (p != NULL)
			cl_pend_answer(c, p, "OK IDLE terminated.");
		return;
	}
	if (c->cl_in_idle) {
		/* The only thing a client may send while idling is DONE;
		 * the server judges it. */
		c->cl_in_idle = false;
		c->cl_bytes_in += fr->len;
		evbuffer_remove_buffer(in, upstream_output(c->cl_up), fr->len);
		c->cl_replay_on = false;
		return;
	}
	if (imap_parse_command_head(line, fr->text_len, &tag, &cmd) != 0 ||
	    tag.len > IMAPSHIM_TAG_MAX) {
		cl_line_tag(line, fr->text_len, t);
		evbuffer_drain(in, fr->len);
		c->cl_cur = fr->last ? CL_CUR_NONE : CL_CUR_SWALLOW;
		cl_bad(c, t, strlen(t), "Invalid command: expected a tag and a "
		    "command.");
		return;
	}
	if (fr->lit_toobig) {
		cl_reply(c, tag.p, tag.len, false, "%.*s NO [TOOBIG] Literal "
		    "larger than max_literal_bytes.\r\n", (int)tag.len, tag.p);
		evbuffer_drain(in, fr->len);
		return;
	}
	if (cl_auth_local(c, &tag, &cmd, fr->last)) {
		if (protolog_enabled())
			cl_plog_local(c, &cmd, fr->len);
		evbuffer_drain(in, fr->len);
		c->cl_cur = fr->last ? CL_CUR_NONE : CL_CUR_SWALLOW;
		c->cl_bad_in_row = 0;
		return;
	}
	c->cl_bad_in_row = 0;
	if (c->cl_state == CL_S_PARKED) {
		/* Read it again once attached and resynced. */
		snprintf(c->cl_attach_tag, sizeof(c->cl_attach_tag), "%.*s",
		    (int)tag.len, tag.p);
		c->cl_unread = true;
		cl_attach(c, false);
		return;
	}
	c->cl_cur_pend = cl_pend_push(c, tag.p, tag.len);
	c->cl_cur_pend->relayed = true;
	c->cl_inflight++;
	c->cl_cur_pend->stat_cmd = stats_command_from(cmd.p, cmd.len);
	c->cl_cur_pend->started_us = util_now_us();
	c->cl_cur_pend->pl_params = cl_plog_params(line, fr->text_len, &cmd);
	if (imap_tok_is(&cmd, "SELECT") || imap_tok_is(&cmd, "EXAMINE"))
		c->cl_cur_pend->selects = 1;
	else if (imap_tok_is(&cmd, "CLOSE") || imap_tok_is(&cmd, "UNSELECT"))
		c->cl_cur_pend->selects = -1;
	log_debug("client_command", "id=%llu tag=%s command=%.*s",
	    (unsigned long long)c->cl_id, c->cl_cur_pend->tag, (int)cmd.len,
	    cmd.p);
	if (imap_tok_is(&cmd, "IDLE") && fr->last) {
		c->cl_in_idle = true;
		cl_touch(c);	/* times the renewal of a long IDLE */
	}
	cl_prepare_rerun(c, c->cl_cur_pend, line, fr->text_len, &cmd);
	c->cl_cur = CL_CUR_RELAY;
	cl_forward_line(c, fr, line, in);
	if (fr->last)
		cl_command_sent(c);
}

static void
cl_auth_frame(struct client *c, const struct imap_frame *fr, const char *line,
    struct evbuffer *in)
{
	char t[IMAPSHIM_TAG_MAX + 1];

	switch (fr->kind) {
	case IMAP_FR_OVERFLOW:
		cl_line_tag(line, fr->len, t);
		evbuffer_drain(in, fr->len);
		if (fr->overflow_first) {
			c->cl_cur = CL_CUR_NONE;
			cl_bad(c, t, strlen(t), "Command line too long "
			    "(max_command_bytes).");
		} else if (c->cl_cur == CL_CUR_RELAY)
			cl_poison_current(c, "BAD Command line too long "
			    "(max_command_bytes).");
		else
			c->cl_cur = CL_CUR_NONE;
		return;
	case IMAP_FR_LITERAL:
		if (c->cl_cur == CL_CUR_RELAY)
			cl_emit(c, in, fr->len);
		else
			evbuffer_drain(in, fr->len);
		return;
	case IMAP_FR_LINE:
		break;
	default:
		return;
	}
	if (fr->first) {
		cl_auth_first_line(c, fr, line, in);
		return;
	}
	/* A continuation line of a command (after a literal). */
	if (c->cl_cur == CL_CUR_SWALLOW) {
		evbuffer_drain(in, fr->len);
		if (fr->last)
			c->cl_cur = CL_CUR_NONE;
		return;
	}
	if (fr->lit_toobig) {
		evbuffer_drain(in, fr->len);
		cl_poison_current(c, "NO [TOOBIG] Literal larger than "
		    "max_literal_bytes.");
		return;
	}
	cl_forward_line(c, fr, line, in);
	if (fr->last)
		cl_command_sent(c);
}

/* ------------------------------------------------------------ callbacks */

static void
cl_read_cb(struct bufferevent *bev, void *arg)
{
	struct client *c = arg;
	struct evbuffer *in = bufferevent_get_input(bev);
	struct imap_framer saved;
	struct imap_frame fr;
	const char *line;
	size_t before;
	bool authed;

	if (c->cl_state == CL_S_AUTH || c->cl_state == CL_S_PARKED)
		cl_arm_timer(c, cl_cfg()->client_idle_timeout_ms);
	for (;;) {
		authed = c->cl_state == CL_S_AUTH || c->cl_state == CL_S_PARKED;
		if ((c->cl_state != CL_S_NOTAUTH && c->cl_state != CL_S_SASL &&
		    !authed) || c->cl_logout || cl_drain_bye != NULL)
			return;
		if (c->cl_state == CL_S_PARKED ||
		    (c->cl_up == NULL && c->cl_cur == CL_CUR_RELAY)) {
			/* Parked (a command attaches it), or detached while
			 * the client sends a command we keep: read on. */
		} else if (authed && (c->cl_up == NULL ||
		    upstream_output_full(c->cl_up) ||
		    c->cl_pend_len >= CL_MAX_PENDING ||
		    (c->cl_inflight > 0 && c->cl_cur == CL_CUR_NONE &&
		    !c->cl_in_idle && imap_framer_at_boundary(&c->cl_framer)))) {
			/* Backpressure, and one command upstream at a time:
			 * servers may answer pipelined commands out of order
			 * (Dovecot does), and the client must get its replies
			 * in the order it sent the commands.  Resume from the
			 * upstream's writable callback or its tagged reply.
			 * Reading stays on (switching it off and on for every
			 * command costs two epoll_ctl calls) until a pipelining
			 * client has CL_INPUT_HOLD bytes waiting. */
			c->cl_read_blocked = true;
			if (evbuffer_get_length(in) >= CL_INPUT_HOLD)
				bufferevent_disable(bev, EV_READ);
			return;
		}
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

static void
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

static void
cl_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct client *c = arg;
	char reason[300];

	(void)bev;
	if (c->cl_state == CL_S_CLOSING) {
		if (what & (BEV_EVENT_EOF | BEV_EVENT_ERROR))
			reap_add(&c->cl_reap, cl_free, c);
		return;
	}
	if (what & BEV_EVENT_CONNECTED) {
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
			tls_failure_reason(c->cl_ssl, bufferevent_get_openssl_error(bev),
			    reason, sizeof(reason));
			log_info("client_tls_fail", "id=%llu peer=%s reason=%s",
			    (unsigned long long)c->cl_id, c->cl_peer,
			    log_value(reason + 0, sizeof(reason), reason,
			    strlen(reason)));
			cl_close(c, "tls-handshake-failed", NULL);
		} else
			cl_close(c, "client-error", NULL);
	}
}

/*
 * A relayed command has waited command_timeout for its reply: the upstream
 * is stuck.  Treat it as lost (read-only commands run again elsewhere).
 * Returns true when it acted; otherwise re-arms the timer for whichever
 * comes first, this deadline or the idle timeout.
 */
static bool
cl_command_overdue(struct client *c)
{
	const struct config *cfg = cl_cfg();
	uint64_t now = util_now_ms(), due = c->cl_up_active_ms +
	    cfg->command_timeout_ms;
	struct upstream *u = c->cl_up;

	if (now < due) {
		cl_arm_timer(c, due - now < cfg->client_idle_timeout_ms ?
		    due - now : cfg->client_idle_timeout_ms);
		return true;
	}
	log_warn("client_command_timeout", "id=%llu mailbox=%s timeout_ms=%llu",
	    (unsigned long long)c->cl_id, c->cl_name.mailbox,
	    (unsigned long long)cfg->command_timeout_ms);
	upstream_abort(u, "command-timeout");
	cl_up_lost(c, "no reply within command_timeout");
	if (c->cl_state != CL_S_CLOSING)
		cl_arm_timer(c, cfg->client_idle_timeout_ms);
	return true;
}

static void
cl_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct client *c = arg;

	(void)fd;
	(void)what;
	switch (c->cl_state) {
	case CL_S_CLOSING:
		reap_add(&c->cl_reap, cl_free, c);
		break;
	case CL_S_AUTHDELAY:
		cl_auth_answer(c, "NO [AUTHENTICATIONFAILED] Authentication failed.");
		break;
	case CL_S_AUTH:
	case CL_S_PARKED:
	case CL_S_PARKING:
	case CL_S_ATTACHING:
		if (c->cl_state == CL_S_AUTH && c->cl_up != NULL &&
		    c->cl_inflight > 0 && !c->cl_in_idle &&
		    c->cl_cur == CL_CUR_NONE && cl_command_overdue(c))
			break;
		if (c->cl_cur == CL_CUR_NONE && (c->cl_pend_len > 0 ||
		    c->cl_state == CL_S_PARKING ||
		    c->cl_state == CL_S_ATTACHING)) {
			/* The server is working (a long FETCH) or the client
			 * idles in IDLE: that is not idleness.  A client that
			 * stopped half way through its own command is. */
			cl_arm_timer(c, cl_cfg()->client_idle_timeout_ms);
			break;
		}
		cl_close(c, "idle-timeout", "Autologout; idle for too long.");
		break;
	case CL_S_LOGGING_IN:
		break;
	default:
		cl_close(c, "login-timeout", "Login timeout.");
		break;
	}
}

void
client_init(const struct client_env *env)
{
	cl_env = env;
	if (cl_stage == NULL && (cl_stage = evbuffer_new()) == NULL)
		log_fatal("client_init", "reason=out-of-memory");
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
	c->cl_started_ms = util_now_ms();
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
	if (c->cl_tls)
		bufferevent_openssl_set_allow_dirty_shutdown(c->cl_bev, 1);
	TAILQ_INSERT_TAIL(&cl_all, c, cl_link);
	cl_count++;
	cl_kind_count[cl_state_kind[c->cl_state]]++;
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
		    c->cl_recover == CL_REDO_NONE)
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
	if (cl_stage != NULL)
		evbuffer_free(cl_stage);
	cl_stage = NULL;
}

void
client_drain(const char *bye)
{
	struct client *c, *next;

	cl_drain_bye = bye;
	for (c = TAILQ_FIRST(&cl_all); c != NULL; c = next) {
		next = TAILQ_NEXT(c, cl_link);
		/* A command in flight finishes first (cl_up_frame closes the
		 * session after its reply); an IDLE is not such a command. */
		if (c->cl_state == CL_S_AUTH && c->cl_inflight > 0 &&
		    !c->cl_in_idle)
			continue;
		cl_close(c, "shutdown", bye);
	}
}
