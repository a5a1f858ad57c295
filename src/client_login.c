/* client_login.c - a client session before login: TLS, CAPABILITY, LOGIN. */
#include "client_int.h"

#include <event2/bufferevent_ssl.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "protolog.h"
#include "relay.h"
#include "stats.h"
#include "tls.h"
#include "upstream.h"
#include "util.h"

/* Failed authentications on one connection before it is closed. */
#define CL_MAX_AUTH_FAILURES 5
/* First failure delay; it doubles with each failure. */
#define CL_AUTH_DELAY_MS 500
/* Largest literal accepted before login (LOGIN arguments). */
#define CL_PREAUTH_LITERAL_MAX 4096
/* Largest whole command (text and literals) accepted before login. */
#define CL_PREAUTH_COMMAND_MAX (16 * 1024)

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

/* Extensions of the upstream that imapshim relays faithfully: they change
 * neither framing nor session state that imapshim must track. */
static const char *const cl_relayed_caps[] = {
	"NAMESPACE", "CHILDREN", "UIDPLUS", "MOVE", "UNSELECT", "SPECIAL-USE",
	"LIST-EXTENDED", "LIST-STATUS", "ESEARCH", "SORT", "SORT=DISPLAY",
	"THREAD=REFERENCES", "THREAD=REFS", "THREAD=ORDEREDSUBJECT",
	"MULTIAPPEND", "QUOTA", "WITHIN", "ACL", "I18NLEVEL=1",
};

/* ------------------------------------------------------------ capability */

static bool
cl_login_allowed(const struct client *c)
{
	return c->cl_tls || cl_cfg()->allow_plaintext_login;
}

void
cl_caps(const struct client *c, char *buf, size_t len)
{
	size_t i, j, n;
	const char *cap;

	if (c->cl_auth_caps != NULL) {
		snprintf(buf, len, "%s", c->cl_auth_caps);
		return;
	}
	n = (size_t)snprintf(buf, len, "IMAP4rev1 LITERAL+ ID IDLE");
	if (c->cl_up != NULL) {
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

void
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

void
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

/* ------------------------------------------------------------ pre-login */

void
cl_send_greeting(struct client *c)
{
	char caps[512];

	cl_caps(c, caps, sizeof(caps));
	cl_printf(c, "* OK [CAPABILITY %s] imapshim ready.\r\n", caps);
}

/* A login refused here: login is the name as the client sent it (never
 * the password), NULL when the request did not get as far as a name. */
static void
cl_auth_failed(struct client *c, enum stats_auth_failure why,
    const char *login, size_t loginlen)
{
	uint64_t delay = (uint64_t)CL_AUTH_DELAY_MS << (c->cl_auth_failures < 8 ?
	    c->cl_auth_failures : 8);

	c->cl_auth_failures++;
	stats_client_auth_failure(why);
	log_warn("client_auth_fail", "id=%llu peer=%s login=%s reason=%s "
	    "failures=%u delay_ms=%llu", (unsigned long long)c->cl_id,
	    c->cl_peer, log_vn(login != NULL ? login : "", loginlen),
	    stats_auth_failure_names[why], c->cl_auth_failures,
	    (unsigned long long)delay);
	cl_set_state(c, CL_S_AUTHDELAY);
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
}

static const char *
cl_admin_password(const void *arg, const char *name, size_t len)
{
	const struct config_admin *admin = config_find_admin(arg, name, len);

	return admin != NULL ? admin->password : NULL;
}

/* Who logged in, sized to fit: the parsed mailbox and domain (auth.c
 * bounds them) and the admin account's configured spelling. */
static struct cl_who *
cl_who_new(const struct auth_name *n, const char *admin)
{
	size_t mlen = strlen(n->mailbox) + 1, dlen = strlen(n->domain) + 1;
	size_t alen = strlen(admin) + 1;
	struct cl_who *w = xmalloc(sizeof(*w) + mlen + dlen + alen);
	char *d = w->mailbox + mlen, *a = d + dlen;

	memcpy(w->mailbox, n->mailbox, mlen);
	memcpy(d, n->domain, dlen);
	memcpy(a, admin, alen);
	w->domain = d;
	w->admin = a;
	return w;
}

/* Check credentials locally; a wrong password never reaches Exchange. */
static void
cl_check_credentials(struct client *c, const char *user, size_t userlen,
    const char *pass, size_t passlen)
{
	const struct config *cfg = cl_cfg();
	const struct config_admin *admin;
	enum stats_auth_failure why;
	struct auth_name name;

	/* A login the pool failed may be followed by another. */
	free(c->cl_who);
	c->cl_who = NULL;
	if (auth_check_login(cfg->client_login_format, user, userlen, pass,
	    passlen, cl_admin_password, cfg, &name, &why) != 0) {
		cl_auth_failed(c, why, user, userlen);
		return;
	}
	admin = config_find_admin(cfg, name.admin, strlen(name.admin));
	IMAPSHIM_ASSERT(admin != NULL);
	c->cl_who = cl_who_new(&name, admin->name);
	log_info("client_auth", "id=%llu peer=%s mailbox=%s admin=%s password=%s",
	    (unsigned long long)c->cl_id, c->cl_peer, log_v(c->cl_who->mailbox),
	    log_v(c->cl_who->admin), LOG_MASKED);
	cl_unauth_remove(c);
	c->cl_login_us = util_now_us();
	cl_set_state(c, CL_S_LOGGING_IN);
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
		cl_auth_failed(c, STATS_AUTH_FAIL_MALFORMED_REQUEST,
		    ul < 0 ? NULL : user, ul < 0 ? 0 : (size_t)ul);
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
		cl_auth_failed(c, STATS_AUTH_FAIL_MALFORMED_REQUEST, authcid,
		    strlen(authcid));
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
void
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


/* The failure delay is over: the NO goes out. */
void
cl_auth_delay_over(struct client *c)
{
	cl_auth_answer(c, "NO [AUTHENTICATIONFAILED] Authentication failed.");
}

/* The pool holds a session for this mailbox: the LOGIN succeeded. */
void
cl_login_done(struct client *c)
{
	char caps[1024];
	const struct config *cfg = cl_cfg();

	stats_command(STATS_CMD_LOGIN, util_now_us() - c->cl_login_us);
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
	c->cl_active_ms = util_now_ms();
	cl_set_state(c, CL_S_ATTACHED);
	cl_touch(c);
}

/* The pool could not give this mailbox a session. */
void
cl_login_failed(struct client *c, enum pool_fail why, const char *reason,
    const char *x)
{
	char msg[700];

	/* The table of these texts: README "Failure texts", imapshim.ini(5).
	 * reason is Exchange's words (or ours, or OpenSSL's); x is the
	 * pool's explanation (DESIGN 3.5 R5). */
	switch (why) {
	case POOL_FAIL_AUTH:
		snprintf(msg, sizeof(msg), "NO [AUTHENTICATIONFAILED] Exchange "
		    "refused the login for this mailbox %s (%s).",
		    *x != '\0' ? x : "with every admin account", reason);
		break;
	case POOL_FAIL_REFUSED:
		snprintf(msg, sizeof(msg), "NO [UNAVAILABLE] Exchange refused "
		    "the login%s%s (%s); try again later.", *x != '\0' ? " " :
		    "", x, reason);
		break;
	case POOL_FAIL_TIMEOUT:
		snprintf(msg, sizeof(msg), "NO [UNAVAILABLE] No Exchange "
		    "session within queue_timeout: %s; try again later.",
		    *x != '\0' ? x : "the session budget is full");
		break;
	case POOL_FAIL_UNAVAILABLE:
	default:
		snprintf(msg, sizeof(msg), "NO [UNAVAILABLE] %s (%s); try "
		    "again later.", *x != '\0' ? x : "Exchange is not "
		    "reachable", reason);
		break;
	}
	/* Keep it one line whatever the words. */
	for (char *q = msg; *q; q++)
		if (*q == '\r' || *q == '\n')
			*q = ' ';
	cl_auth_answer(c, msg);
}

/* A TLS handshake with the client failed: count it and say why, readably. */
void
cl_log_tls_failure(struct client *c, unsigned long err)
{
	char detail[256], offered[16];
	enum stats_tls_failure r;

	r = tls_client_failure(c->cl_ssl, err, detail, sizeof(detail), offered,
	    sizeof(offered));
	stats_client_tls_failure(r);
	log_warn("client_tls_failed", "id=%llu peer=%s reason=%s offered=%s "
	    "detail=%s", (unsigned long long)c->cl_id, c->cl_peer,
	    stats_tls_failure_names[r], offered, log_v(detail));
}
