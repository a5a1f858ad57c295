/*
 * console.c - the operator's console on control_socket (see console.h).
 *
 * One listener on a Unix stream socket and at most CONSOLE_MAX_CONNS
 * connections, each a bufferevent reading lines.  A command is answered at
 * once and in full (nothing here waits for the pool or a client: a kick
 * only marks sessions, a drain only stops logins), so one answer per line,
 * in order, falls out of handling lines one by one.
 *
 * Who may talk: the peer's uid from SO_PEERCRED must be 0 or our own
 * effective uid (after the privilege drop, the daemon's user).  The
 * socket's mode 0600 already keeps others out; the check is the second
 * lock, for a socket directory or mode someone loosened, since "show
 * clients" names mailboxes and "kick" ends sessions.
 *
 * Every connection ends the same way (con_end): its last answer (a
 * REFUSED line for a refused one) is written, our side is shut, and what
 * the peer still sends is dropped until its EOF or CONSOLE_LINGER_MS, so
 * the peer reads the answer instead of a reset; then it is freed, with
 * one log line saying why.  Peers refused at accept linger too, up to
 * CONSOLE_MAX_CONNS of them at once.
 */
#include "console.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>
#include <errno.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "auth.h"
#include "client.h"
#include "config.h"
#include "log.h"
#include "pool.h"
#include "status.h"
#include "upstream.h"
#include "util.h"

/* A console connection that sends nothing for this long is closed. */
#define CONSOLE_IDLE_S 300
#define CONSOLE_BACKLOG 16
/* An ending connection waits this long at most for the peer's EOF. */
#define CONSOLE_LINGER_MS 2000

#define CON_BYE "Session ended by the operator."

struct con_conn {
	struct bufferevent *cc_bev;
	struct ucred cc_cred;		/* the peer, from SO_PEERCRED */
	bool cc_served;			/* false: refused when accepted */
	const char *cc_end;		/* why it ends; NULL while served */
	bool cc_refused;		/* it ends with a REFUSED line */
	bool cc_eof;			/* the peer has shut its side */
	bool cc_shut;			/* we have shut ours (lingering) */
	uint64_t cc_linger_until;	/* ms: free it then at the latest */
	LIST_ENTRY(con_conn) cc_link;
};

static struct {
	struct evconnlistener *lev;
	const struct config *cfg;
	console_reload_fn reload;
	char *path;			/* the socket file we created */
	dev_t dev;
	ino_t ino;
	LIST_HEAD(, con_conn) conns;
	unsigned n_conns;
	unsigned n_refusing;		/* of n_conns: refused when accepted */
} K;

/* ------------------------------------------------------------- parser */

enum con_arg { ARG_NONE, ARG_ID, ARG_MAILBOX, ARG_SERVER };

static const struct con_syntax {
	const char *w1, *w2;		/* keywords; w2 NULL: one word */
	enum con_arg arg;
	const char *name;		/* for help and logs */
	const char *usage;
} con_syntax[CON_VERB_COUNT] = {
	[CON_SHOW_POOLS] = { "show", "pools", ARG_NONE, "show pools",
	    "show pools" },
	[CON_SHOW_SERVERS] = { "show", "servers", ARG_NONE, "show servers",
	    "show servers" },
	[CON_SHOW_CLIENTS] = { "show", "clients", ARG_NONE, "show clients",
	    "show clients" },
	[CON_SHOW_STATS] = { "show", "stats", ARG_NONE, "show stats",
	    "show stats" },
	[CON_SHOW_STATUS] = { "show", "status", ARG_NONE, "show status",
	    "show status" },
	[CON_KICK_CLIENT] = { "kick", "client", ARG_ID, "kick client",
	    "kick client ID" },
	[CON_KICK_MAILBOX] = { "kick", "mailbox", ARG_MAILBOX, "kick mailbox",
	    "kick mailbox NAME" },
	[CON_DRAIN_SERVER] = { "drain", "server", ARG_SERVER, "drain server",
	    "drain server HOST:PORT" },
	[CON_ENABLE_SERVER] = { "enable", "server", ARG_SERVER,
	    "enable server", "enable server HOST:PORT" },
	[CON_PAUSE] = { "pause", NULL, ARG_NONE, "pause", "pause" },
	[CON_RESUME] = { "resume", NULL, ARG_NONE, "resume", "resume" },
	[CON_RELOAD] = { "reload", NULL, ARG_NONE, "reload", "reload" },
	[CON_HELP] = { "help", NULL, ARG_NONE, "help", "help" },
};

const char *
console_verb_name(enum console_verb v)
{
	return v < CON_VERB_COUNT ? con_syntax[v].name : "?";
}

/* The next blank-separated word of line[*pos..len): its start and length
 * (0 at the end). */
static size_t
con_word(const char *line, size_t len, size_t *pos, const char **w)
{
	size_t i = *pos, start;

	while (i < len && (line[i] == ' ' || line[i] == '\t'))
		i++;
	start = i;
	while (i < len && line[i] != ' ' && line[i] != '\t')
		i++;
	*pos = i;
	*w = line + start;
	return i - start;
}

static int
con_arg(const struct con_syntax *sx, const char *w, size_t n,
    struct console_cmd *cmd, char *err, size_t errlen)
{
	char buf[CONSOLE_LINE_MAX + 1], *end;

	memcpy(buf, w, n);
	buf[n] = '\0';
	switch (sx->arg) {
	case ARG_ID:
		errno = 0;
		cmd->id = strtoull(buf, &end, 10);
		if (buf[0] < '0' || buf[0] > '9' || *end != '\0' ||
		    errno != 0 || cmd->id == 0) {
			snprintf(err, errlen, "not a client id: '%.64s'", buf);
			return -1;
		}
		return 0;
	case ARG_MAILBOX:
		if (!auth_mailbox_valid(buf, n)) {
			snprintf(err, errlen, "not a mailbox name: '%.64s'", buf);
			return -1;
		}
		memcpy(cmd->mailbox, buf, n + 1);
		return 0;
	case ARG_SERVER: {
		char why[128];

		if (addr_parse_endpoint(buf, &cmd->server, why,
		    sizeof(why)) != 0 || cmd->server.host[0] == '\0') {
			snprintf(err, errlen, "not HOST:PORT: '%.64s'", buf);
			return -1;
		}
		return 0;
	}
	case ARG_NONE:
	default:
		return 0;
	}
}

int
console_parse(const char *line, size_t len, struct console_cmd *cmd,
    char *err, size_t errlen)
{
	const struct con_syntax *sx;
	const char *w1, *w2, *w3, *w4, *aw;
	size_t pos = 0, n1, n2, n3, n4, an, i;
	bool more;

	memset(cmd, 0, sizeof(*cmd));
	if (len > CONSOLE_LINE_MAX) {
		snprintf(err, errlen, "line too long");
		return -1;
	}
	if (memchr(line, '\0', len) != NULL) {
		snprintf(err, errlen, "NUL byte in the command");
		return -1;
	}
	n1 = con_word(line, len, &pos, &w1);
	n2 = con_word(line, len, &pos, &w2);
	n3 = con_word(line, len, &pos, &w3);
	n4 = con_word(line, len, &pos, &w4);
	if (n1 == 0) {
		snprintf(err, errlen, "empty command (try help)");
		return -1;
	}
	for (i = 0; i < CON_VERB_COUNT; i++) {
		sx = &con_syntax[i];
		if (!util_ieqn(w1, n1, sx->w1) ||
		    (sx->w2 != NULL && !util_ieqn(w2, n2, sx->w2)))
			continue;
		cmd->verb = (enum console_verb)i;
		/* The word after the keywords (the argument), and whether
		 * anything follows it. */
		if (sx->w2 == NULL) {
			aw = w2;
			an = n2;
			more = n3 > 0;
		} else {
			aw = w3;
			an = n3;
			more = n4 > 0;
		}
		if (sx->arg == ARG_NONE ? an > 0 : (an == 0 || more)) {
			snprintf(err, errlen, "usage: %s", sx->usage);
			return -1;
		}
		return con_arg(sx, aw, an, cmd, err, errlen);
	}
	snprintf(err, errlen, "unknown command '%.*s%s%.*s' (try help)",
	    (int)(n1 > 32 ? 32 : n1), w1, n2 > 0 ? " " : "",
	    (int)(n2 > 32 ? 32 : n2), w2);
	return -1;
}

/* ------------------------------------------------------------ answers */

struct con_clients {
	struct evbuffer *out;
	unsigned n;
	uint64_t now_ms;
	time_t now_s;
};

static void
con_client_cb(const struct client_info *ci, void *arg)
{
	struct con_clients *cc = arg;
	const struct config *cfg = K.cfg;
	char since[32], peer[160], mb[600], ad[160], srv[300];
	time_t t = cc->now_s - (time_t)((cc->now_ms - ci->since_ms) / 1000);
	size_t server = ci->up != NULL ? pool_session_server(ci->up) :
	    (size_t)-1;
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(since, sizeof(since), "%Y-%m-%dT%H:%M:%SZ", &tm);
	if (ci->up == NULL)
		snprintf(srv, sizeof(srv), "-");
	else if (server < cfg->n_servers)
		addr_endpoint_str(&cfg->servers[server], srv, sizeof(srv));
	else
		snprintf(srv, sizeof(srv), "removed");
	/* Mailbox names are shown here (the socket's mode guards them);
	 * the log's quoting keeps every line one record. */
	evbuffer_add_printf(cc->out, "id=%llu peer=%s mailbox=%s admin=%s "
	    "state=%s since=%s age_seconds=%llu upstream=%s",
	    (unsigned long long)ci->id,
	    log_value(peer, sizeof(peer), ci->peer, strlen(ci->peer)),
	    ci->mailbox[0] != '\0' ? log_value(mb, sizeof(mb), ci->mailbox,
	    strlen(ci->mailbox)) : "-",
	    ci->admin[0] != '\0' ? log_value(ad, sizeof(ad), ci->admin,
	    strlen(ci->admin)) : "-", ci->state, since,
	    (unsigned long long)((cc->now_ms - ci->since_ms) / 1000), srv);
	if (ci->up != NULL)
		evbuffer_add_printf(cc->out, " upstream_id=%llu",
		    (unsigned long long)upstream_id(ci->up));
	evbuffer_add(cc->out, "\n", 1);
	cc->n++;
}

/* Every configured server drained: logins wait (pool_server_drain). */
static bool
con_all_drained(void)
{
	size_t i;

	for (i = 0; i < K.cfg->n_servers; i++)
		if (!pool_server_draining(i))
			return false;
	return true;
}

/*
 * Run cmd; data lines into out, the terminator's text into res.  Returns
 * true for OK, false for ERROR.
 */
static bool
con_run(const struct console_cmd *cmd, struct evbuffer *out, char *res,
    size_t reslen)
{
	char srv[300];
	size_t i, server;
	unsigned n;

	res[0] = '\0';
	switch (cmd->verb) {
	case CON_SHOW_POOLS:
		if (status_render_pools(out) != 0)
			goto oom;
		return true;
	case CON_SHOW_SERVERS:
		if (status_render_servers(out) != 0)
			goto oom;
		return true;
	case CON_SHOW_CLIENTS: {
		struct con_clients cc = { out, 0, util_now_ms(), time(NULL) };

		client_foreach(con_client_cb, &cc);
		snprintf(res, reslen, "%u client%s", cc.n, cc.n == 1 ? "" : "s");
		return true;
	}
	case CON_SHOW_STATS:
		status_render_metrics(out);
		return true;
	case CON_SHOW_STATUS:
		status_render_json(out);
		return true;
	case CON_KICK_CLIENT:
		if (client_kick(cmd->id, NULL, CON_BYE) == 0) {
			snprintf(res, reslen, "no client %llu",
			    (unsigned long long)cmd->id);
			return false;
		}
		snprintf(res, reslen, "client %llu kicked",
		    (unsigned long long)cmd->id);
		return true;
	case CON_KICK_MAILBOX:
		if ((n = client_kick(0, cmd->mailbox, CON_BYE)) == 0) {
			snprintf(res, reslen, "no client of mailbox %s",
			    cmd->mailbox);
			return false;
		}
		snprintf(res, reslen, "%u client%s of mailbox %s kicked", n,
		    n == 1 ? "" : "s", cmd->mailbox);
		return true;
	case CON_DRAIN_SERVER:
	case CON_ENABLE_SERVER:
		addr_endpoint_str(&cmd->server, srv, sizeof(srv));
		server = config_find_server(K.cfg, &cmd->server);
		if (server == (size_t)-1) {
			snprintf(res, reslen, "%s is not one of [upstream] "
			    "servers", srv);
			return false;
		}
		if (pool_server_drain(server, cmd->verb ==
		    CON_DRAIN_SERVER) != 0) {
			/* Named above: only a pool that is stopping says no
			 * (the config holds at most CONFIG_MAX_SERVERS). */
			snprintf(res, reslen, "%s cannot be drained now: "
			    "imapshim is stopping", srv);
			return false;
		}
		snprintf(res, reslen, "%s %s%s", srv, cmd->verb ==
		    CON_DRAIN_SERVER ? "draining" : "enabled",
		    con_all_drained() ? "; every server is drained: new "
		    "logins wait" : "");
		return true;
	case CON_PAUSE:
		pool_pause(true);
		snprintf(res, reslen, "paused: new upstream logins wait "
		    "(queue_timeout %llu ms)",
		    (unsigned long long)K.cfg->queue_timeout_ms);
		return true;
	case CON_RESUME:
		pool_pause(false);
		snprintf(res, reslen, "resumed");
		return true;
	case CON_RELOAD:
		if (K.reload(res, reslen) != 0)
			return false;	/* res: why it was rejected */
		snprintf(res, reslen, "reloaded");
		return true;
	case CON_HELP:
		for (i = 0; i < CON_VERB_COUNT; i++)
			evbuffer_add_printf(out, "command=\"%s\"\n",
			    con_syntax[i].usage);
		return true;
	case CON_VERB_COUNT:
	default:
		break;
	}
	IMAPSHIM_ASSERT(!"console verb without a handler");
	snprintf(res, reslen, "internal error");
	return false;
oom:
	evbuffer_drain(out, evbuffer_get_length(out));
	snprintf(res, reslen, "out of memory");
	return false;
}

/* ---------------------------------------------------------- connections */

/* How long an ending connection waits for the peer's EOF (con_linger). */
static const struct timeval con_linger_tv = { CONSOLE_LINGER_MS / 1000,
    (CONSOLE_LINGER_MS % 1000) * 1000 };

/* One line for the end of a console connection (cr NULL: the peer is not
 * known): console_refused for one that got a REFUSED line, else
 * console_close. */
static void
con_log_end(const struct ucred *cr, const char *reason, bool refused)
{
	char who[48] = "uid=- pid=-";

	if (cr != NULL)
		snprintf(who, sizeof(who), "uid=%u pid=%d", (unsigned)cr->uid,
		    (int)cr->pid);
	log_event(refused ? LOG_LVL_WARN : strcmp(reason, "eof") == 0 ?
	    LOG_LVL_DEBUG : LOG_LVL_INFO, refused ? "console_refused" :
	    "console_close", "%s reason=%s", who, reason);
}

/* The one way a console connection is freed: logged, then closed. */
static void
con_free(struct con_conn *c)
{
	con_log_end(&c->cc_cred, c->cc_end != NULL ? c->cc_end : "stop",
	    c->cc_refused);
	LIST_REMOVE(c, cc_link);
	K.n_conns--;
	if (!c->cc_served)
		K.n_refusing--;
	bufferevent_free(c->cc_bev);
	free(c);
}

/*
 * The next step of an ending connection: once its answer is written, shut
 * our side and read (and drop) what the peer still sends until its EOF or
 * CONSOLE_LINGER_MS, then free it.  Closing with unread input would send
 * a reset, which can destroy the answer before the peer has read it.
 * May free c.
 */
static void
con_linger(struct con_conn *c)
{
	if (evbuffer_get_length(bufferevent_get_output(c->cc_bev)) > 0)
		return;			/* con_write_cb comes back */
	if (c->cc_eof || (c->cc_shut && util_now_ms() >= c->cc_linger_until)) {
		con_free(c);
		return;
	}
	if (c->cc_shut)
		return;
	c->cc_shut = true;
	c->cc_linger_until = util_now_ms() + CONSOLE_LINGER_MS;
	if (shutdown(bufferevent_getfd(c->cc_bev), SHUT_WR) != 0) {
		con_free(c);
		return;
	}
	/* A timeout disables reading: enable it again for the EOF. */
	bufferevent_set_timeouts(c->cc_bev, &con_linger_tv, &con_linger_tv);
	bufferevent_enable(c->cc_bev, EV_READ);
}

/* Stop serving c for reason (the log's), with a REFUSED line when refusal
 * is not NULL, after what was answered before.  May free c. */
static void
con_end(struct con_conn *c, const char *reason, const char *refusal)
{
	IMAPSHIM_ASSERT(c->cc_end == NULL);
	c->cc_end = reason;
	if (refusal != NULL) {
		c->cc_refused = true;
		evbuffer_add_printf(bufferevent_get_output(c->cc_bev),
		    "REFUSED %s\n", refusal);
		/* A refused peer that reads nothing is not waited for. */
		bufferevent_set_timeouts(c->cc_bev, &con_linger_tv,
		    &con_linger_tv);
	}
	con_linger(c);
}

static void
con_line(struct con_conn *c, const char *line, size_t len)
{
	struct evbuffer *out = bufferevent_get_output(c->cc_bev);
	struct console_cmd cmd;
	char res[512];
	bool ok;

	if (console_parse(line, len, &cmd, res, sizeof(res)) != 0)
		ok = false;
	else
		ok = con_run(&cmd, out, res, sizeof(res));
	evbuffer_add_printf(out, "%s%s%s\n", ok ? "OK" : "ERROR",
	    res[0] != '\0' ? " " : "", res);
	log_info("console_command", "uid=%u cmd=%s result=%s reason=%s",
	    (unsigned)c->cc_cred.uid, log_vn(line, len), ok ? "ok" : "error",
	    log_v(res));
}

static void
con_read_cb(struct bufferevent *bev, void *arg)
{
	struct con_conn *c = arg;
	struct evbuffer *in = bufferevent_get_input(bev);
	struct evbuffer_ptr eol;
	size_t eol_len, n;
	char line[CONSOLE_LINE_MAX + 2];
	char why[64];

	while (c->cc_end == NULL) {
		eol = evbuffer_search_eol(in, NULL, &eol_len, EVBUFFER_EOL_LF);
		if (eol.pos < 0) {
			if (evbuffer_get_length(in) <= CONSOLE_LINE_MAX)
				return;
			n = CONSOLE_LINE_MAX + 1;	/* no end in sight */
		} else
			n = (size_t)eol.pos;
		if (n > CONSOLE_LINE_MAX) {
			snprintf(why, sizeof(why), "line too long (more than "
			    "%d bytes)", CONSOLE_LINE_MAX);
			evbuffer_drain(in, evbuffer_get_length(in));
			con_end(c, "line-too-long", why);
			return;
		}
		evbuffer_remove(in, line, n);
		evbuffer_drain(in, eol_len);
		if (n > 0 && line[n - 1] == '\r')
			n--;
		line[n] = '\0';
		con_line(c, line, n);
	}
	/* Ending: what the peer still sends is dropped unread. */
	evbuffer_drain(in, evbuffer_get_length(in));
	con_linger(c);
}

static void
con_write_cb(struct bufferevent *bev, void *arg)
{
	struct con_conn *c = arg;

	(void)bev;
	if (c->cc_end != NULL)
		con_linger(c);
}

static void
con_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct con_conn *c = arg;

	(void)bev;
	if (what & BEV_EVENT_EOF)
		c->cc_eof = true;
	if (what & BEV_EVENT_ERROR) {
		/* Nothing more can be sent. */
		if (c->cc_end == NULL)
			c->cc_end = "error";
		con_free(c);
	} else if (c->cc_end == NULL)
		con_end(c, c->cc_eof ? "eof" : "idle-timeout", NULL);
	else if (what & BEV_EVENT_TIMEOUT)
		con_free(c);		/* the linger ran out */
	else
		con_linger(c);		/* the peer's EOF */
}

/* Refuse a peer without a connection of its own (no peer credentials, out
 * of resources, too many refused at once): the line, then close at once. */
static void
con_refuse_now(evutil_socket_t fd, const struct ucred *cr,
    const char *reason, const char *refusal)
{
	char line[256];
	int n = snprintf(line, sizeof(line), "REFUSED %s\n", refusal);

	(void)!send(fd, line, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
	evutil_closesocket(fd);
	con_log_end(cr, reason, true);
}

static void
con_accept_cb(struct evconnlistener *lev, evutil_socket_t fd,
    struct sockaddr *sa, int salen, void *arg)
{
	struct timeval idle = { CONSOLE_IDLE_S, 0 };
	struct ucred cred;
	socklen_t credlen = sizeof(cred);
	const char *reason = NULL;
	struct con_conn *c;
	char why[128];

	(void)lev;
	(void)sa;
	(void)salen;
	(void)arg;
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &credlen) != 0) {
		con_refuse_now(fd, NULL, "no-peer-credentials",
		    "cannot tell who you are");
		return;
	}
	if (cred.uid != 0 && cred.uid != geteuid()) {
		reason = "uid-not-allowed";
		snprintf(why, sizeof(why), "permission denied: uid %u may not "
		    "use the console", (unsigned)cred.uid);
	} else if (K.n_conns - K.n_refusing >= CONSOLE_MAX_CONNS) {
		reason = "too-many-connections";
		snprintf(why, sizeof(why), "busy: too many console "
		    "connections");
	}
	/* Refused ones linger too, but not without bound. */
	if (reason != NULL && K.n_refusing >= CONSOLE_MAX_CONNS) {
		con_refuse_now(fd, &cred, reason, why);
		return;
	}
	c = xcalloc(1, sizeof(*c));
	c->cc_cred = cred;
	c->cc_served = reason == NULL;
	c->cc_bev = bufferevent_socket_new(evconnlistener_get_base(K.lev), fd,
	    BEV_OPT_CLOSE_ON_FREE);
	if (c->cc_bev == NULL) {
		free(c);
		con_refuse_now(fd, &cred, "out-of-resources",
		    "out of resources");
		return;
	}
	LIST_INSERT_HEAD(&K.conns, c, cc_link);
	K.n_conns++;
	if (!c->cc_served)
		K.n_refusing++;
	bufferevent_setcb(c->cc_bev, con_read_cb, con_write_cb, con_event_cb, c);
	bufferevent_set_timeouts(c->cc_bev, &idle, NULL);
	bufferevent_enable(c->cc_bev, EV_READ | EV_WRITE);
	if (reason != NULL)
		con_end(c, reason, why);
	else
		log_debug("console_connect", "uid=%u pid=%d",
		    (unsigned)cred.uid, (int)cred.pid);
}

/* ------------------------------------------------------------ the socket */

/* A socket file at path from an earlier run: removed unless something
 * still answers there (another imapshim with the same control_socket). */
static int
con_clear_stale(const struct sockaddr_un *sun, char *err, size_t errlen)
{
	struct stat sb;
	int fd, rc;

	if (lstat(sun->sun_path, &sb) != 0)
		return 0;
	if (!S_ISSOCK(sb.st_mode)) {
		snprintf(err, errlen, "control_socket: %s exists and is not a "
		    "socket", sun->sun_path);
		return -1;
	}
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0) {
		snprintf(err, errlen, "control_socket: socket: %s",
		    strerror(errno));
		return -1;
	}
	rc = connect(fd, (const struct sockaddr *)sun, sizeof(*sun));
	close(fd);
	if (rc == 0) {
		snprintf(err, errlen, "control_socket: %s is in use (another "
		    "imapshim running?)", sun->sun_path);
		return -1;
	}
	if (unlink(sun->sun_path) != 0 && errno != ENOENT) {
		snprintf(err, errlen, "control_socket: cannot remove the stale "
		    "%s: %s", sun->sun_path, strerror(errno));
		return -1;
	}
	log_info("console_stale_socket", "path=%s removed=yes",
	    log_v(sun->sun_path));
	return 0;
}

int
console_start(struct event_base *base, const struct config *cfg,
    console_reload_fn reload, char *err, size_t errlen)
{
	struct sockaddr_un sun;
	struct passwd *pw;
	struct stat sb;
	mode_t old;
	int fd;

	K.cfg = cfg;
	K.reload = reload;
	LIST_INIT(&K.conns);
	if (cfg->control_socket == NULL) {
		log_info("console_disabled", "reason=\"control_socket is "
		    "empty\"");
		return 0;
	}
	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	/* config.c checked the length. */
	snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", cfg->control_socket);
	if (con_clear_stale(&sun, err, errlen) != 0)
		return -1;
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK,
	    0)) < 0) {
		snprintf(err, errlen, "control_socket: socket: %s",
		    strerror(errno));
		return -1;
	}
	/* Born 0600: no window in which others could connect. */
	old = umask(0177);
	if (bind(fd, (struct sockaddr *)&sun, sizeof(sun)) != 0) {
		umask(old);
		snprintf(err, errlen, "control_socket: cannot create %s: %s "
		    "(its directory must exist and be writable; empty "
		    "control_socket disables the console)", sun.sun_path,
		    strerror(errno));
		close(fd);
		return -1;
	}
	umask(old);
	/* Started as root, about to become "user": the socket is its. */
	if (geteuid() == 0 && cfg->user != NULL &&
	    (pw = getpwnam(cfg->user)) != NULL &&
	    chown(sun.sun_path, pw->pw_uid, pw->pw_gid) != 0) {
		snprintf(err, errlen, "control_socket: chown %s to %s: %s",
		    sun.sun_path, cfg->user, strerror(errno));
		unlink(sun.sun_path);
		close(fd);
		return -1;
	}
	if (lstat(sun.sun_path, &sb) == 0) {
		K.dev = sb.st_dev;
		K.ino = sb.st_ino;
	}
	K.lev = evconnlistener_new(base, con_accept_cb, NULL,
	    LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, CONSOLE_BACKLOG, fd);
	if (K.lev == NULL) {
		snprintf(err, errlen, "control_socket: cannot listen on %s",
		    sun.sun_path);
		unlink(sun.sun_path);
		close(fd);
		return -1;
	}
	K.path = xstrdup(sun.sun_path);
	log_info("console_listening", "path=%s mode=0600", log_v(K.path));
	return 0;
}

void
console_set_config(const struct config *cfg)
{
	const char *now = cfg->control_socket != NULL ? cfg->control_socket :
	    "";

	K.cfg = cfg;
	if (strcmp(now, K.path != NULL ? K.path : "") != 0)
		log_warn("console_restart_needed", "control_socket=%s "
		    "active=%s reason=\"a changed control_socket takes effect "
		    "at the next start\"", log_v(now[0] != '\0' ? now : "-"),
		    log_v(K.path != NULL ? K.path : "-"));
}

void
console_stop(void)
{
	struct stat sb;

	while (!LIST_EMPTY(&K.conns))
		con_free(LIST_FIRST(&K.conns));
	if (K.lev != NULL)
		evconnlistener_free(K.lev);
	K.lev = NULL;
	/* Only our own socket: another instance may have replaced it. */
	if (K.path != NULL && lstat(K.path, &sb) == 0 && sb.st_dev == K.dev &&
	    sb.st_ino == K.ino && unlink(K.path) != 0)
		log_warn("console_unlink", "path=%s reason=%s", log_v(K.path),
		    log_v(strerror(errno)));
	free(K.path);
	K.path = NULL;
}
