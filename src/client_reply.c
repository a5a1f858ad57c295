/* client_reply.c - what goes to a client: staging, reply order, protocol log. */
#include "client_int.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "protolog.h"
#include "relay.h"
#include "util.h"

/* BAD answers in a row before a client is called hostile and closed. */
#define CL_MAX_BAD_IN_ROW 10

/*
 * What one upstream read relays to a client goes out as one TLS record and
 * one write(), not one per response line: frames collect in cl_stage and
 * move to the client's output when the read is done, when 64 KiB have
 * collected, or before anything else is written to that client.  One
 * client owns the stage at a time.
 */
static struct evbuffer *cl_stage;
static struct client *cl_stage_owner;

void
cl_stage_init(void)
{
	if (cl_stage == NULL && (cl_stage = evbuffer_new()) == NULL)
		log_fatal("client_init", "reason=out-of-memory");
}

void
cl_stage_free(void)
{
	if (cl_stage != NULL)
		evbuffer_free(cl_stage);
	cl_stage = NULL;
	cl_stage_owner = NULL;
}

void
cl_stage_flush(void)
{
	struct client *c = cl_stage_owner;

	if (c == NULL)
		return;
	cl_stage_owner = NULL;
	evbuffer_add_buffer(bufferevent_get_output(c->cl_bev), cl_stage);
	relay_write_now(c->cl_bev);
}

void
cl_stage_flush_for(struct client *c)
{
	if (cl_stage_owner == c)
		cl_stage_flush();
}

void
cl_stage_flush_if_full(struct client *c)
{
	if (cl_stage_owner == c && evbuffer_get_length(cl_stage) >= RELAY_LOWAT)
		cl_stage_flush();
}

/* The stage holds this client's bytes, fewer than below. */
bool
cl_stage_holds(const struct client *c, size_t below)
{
	return cl_stage_owner == c && evbuffer_get_length(cl_stage) < below;
}

/* A client being freed: what is staged for it goes nowhere. */
void
cl_stage_forget(struct client *c)
{
	if (cl_stage_owner == c) {
		cl_stage_owner = NULL;
		evbuffer_drain(cl_stage, evbuffer_get_length(cl_stage));
	}
}

struct evbuffer *
cl_stage_for(struct client *c)
{
	if (cl_stage_owner != c) {
		cl_stage_flush();
		cl_stage_owner = c;
	}
	return cl_stage;
}

/* The client's output, with whatever is staged for it queued first. */
struct evbuffer *
cl_output(struct client *c)
{
	cl_stage_flush_for(c);
	return bufferevent_get_output(c->cl_bev);
}

void
cl_write(struct client *c, const char *s, size_t len)
{
	c->cl_bytes_out += len;
	evbuffer_add(cl_output(c), s, len);
	relay_write_now(c->cl_bev);
}

void
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

/* --------------------------------------------------------- reply ordering */

struct cl_pend *
cl_ring_at(struct cl_ring *r, size_t i)
{
	return &r->r_pend[(r->r_head + i) % r->r_cap];
}

struct cl_pend *
cl_ring_push(struct cl_ring *r, const char *tag, size_t taglen)
{
	struct cl_pend *p, *n;
	size_t i;

	if (r->r_len == r->r_cap) {
		size_t cap = r->r_cap ? r->r_cap * 2 : 4;

		n = xcalloc(cap, sizeof(*n));
		for (i = 0; i < r->r_len; i++)
			n[i] = *cl_ring_at(r, i);
		free(r->r_pend);
		r->r_pend = n;
		r->r_cap = cap;
		r->r_head = 0;
	}
	p = cl_ring_at(r, r->r_len++);
	memset(p, 0, sizeof(*p));
	if (taglen > IMAPSHIM_TAG_MAX)
		taglen = IMAPSHIM_TAG_MAX;
	memcpy(p->tag, tag, taglen);
	p->tag[taglen] = '\0';
	return p;
}

static void
cl_pend_free(struct cl_pend *p)
{
	free(p->reply);
	free(p->pl_params);
	free(p->select_cmd);
	p->reply = p->pl_params = p->select_cmd = NULL;
}

/* Take the oldest entry off (its strings freed; valid until the next push). */
struct cl_pend *
cl_ring_pop(struct cl_ring *r)
{
	struct cl_pend *p;

	IMAPSHIM_ASSERT(r->r_len > 0);
	p = cl_ring_at(r, 0);
	cl_pend_free(p);
	r->r_head = (r->r_head + 1) % r->r_cap;
	r->r_len--;
	return p;
}

void
cl_ring_clear(struct cl_ring *r)
{
	size_t i;

	for (i = 0; i < r->r_len; i++)
		cl_pend_free(cl_ring_at(r, i));
	free(r->r_pend);
	memset(r, 0, sizeof(*r));
}

/* The relayed, unanswered command with this tag, or NULL. */
struct cl_pend *
cl_ring_find(struct cl_ring *r, const char *tag, size_t taglen)
{
	struct cl_pend *p;
	size_t i;

	for (i = 0; i < r->r_len; i++) {
		p = cl_ring_at(r, i);
		if (p->relayed && !p->done && strlen(p->tag) == taglen &&
		    memcmp(p->tag, tag, taglen) == 0)
			return p;
	}
	return NULL;
}

/* The relayed command not answered yet (one at a time), or NULL. */
struct cl_pend *
cl_ring_inflight(struct cl_ring *r)
{
	size_t i;

	for (i = 0; i < r->r_len; i++)
		if (cl_ring_at(r, i)->relayed && !cl_ring_at(r, i)->done)
			return cl_ring_at(r, i);
	return NULL;
}

/* Send the replies whose turn has come; close after a LOGOUT reply. */
void
cl_pend_flush(struct client *c)
{
	struct cl_ring *r = &c->cl_ring;
	struct cl_pend *p;
	bool logout = false;

	while (r->r_len > 0 && (p = cl_ring_at(r, 0))->done) {
		if (p->reply != NULL)
			cl_write(c, p->reply, strlen(p->reply));
		logout |= p->logout;
		if (c->cl_cur_pend == p)
			c->cl_cur_pend = NULL;
		cl_ring_pop(r);
	}
	if (logout)
		cl_close(c, "logout", NULL);
}

/* A reply imapshim makes itself: now, or after earlier commands' replies. */
void
cl_reply(struct client *c, const char *tag, size_t taglen, bool logout,
    const char *fmt, ...)
{
	char buf[4096];
	va_list ap;
	struct cl_pend *p;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (c->cl_ring.r_len == 0) {
		cl_write(c, buf, strlen(buf));
		if (logout)
			cl_close(c, "logout", NULL);
		return;
	}
	p = cl_ring_push(&c->cl_ring, tag, taglen);
	p->done = true;
	p->logout = logout;
	p->reply = xstrdup(buf);
}

/* A BAD answer; a client that sends nothing but garbage is closed. */
void
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

/* Answer an in-flight relayed command ourselves. */
void
cl_pend_answer(struct client *c, struct cl_pend *p, const char *text)
{
	char buf[IMAPSHIM_TAG_MAX + 1100];

	IMAPSHIM_ASSERT(p->relayed && !p->done && c->cl_inflight > 0);
	snprintf(buf, sizeof(buf), "%s %s\r\n", p->tag, text);
	free(p->reply);
	p->reply = xstrdup(buf);
	p->done = true;
	c->cl_inflight--;
	c->cl_replay_on = false;
	cl_pend_flush(c);
}

void
cl_pend_unavailable(struct client *c, struct cl_pend *p)
{
	cl_pend_answer(c, p, "NO [UNAVAILABLE] The connection to Exchange was "
	    "lost; the command may not have completed.");
}

/* Copy the tag at the start of a command line into tag (for an error
 * reply once the line is gone), or "*" when it has none.  Returns tag. */
const char *
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

/* ---------------------------------------------------------- protocol log */

/* One protocol_log line for this session (no-op when the log is off). */
void
cl_plog(struct client *c, const char *command, const char *params,
    uint64_t rq, uint64_t rp, uint64_t started_us, const char *context)
{
	struct protolog_rec r;
	char user[IMAPSHIM_NAME_MAX * 3 + 8] = "";
	char cmd[32];
	size_t i;

	if (!protolog_enabled())
		return;
	if (c->cl_who != NULL)
		snprintf(user, sizeof(user), "%s%s%s/%s", c->cl_who->domain,
		    c->cl_who->domain[0] ? "/" : "", c->cl_who->admin,
		    c->cl_who->mailbox);
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
void
cl_plog_local(struct client *c, const struct imap_tok *cmd, size_t rq)
{
	char name[32];

	snprintf(name, sizeof(name), "%.*s", (int)cmd->len, cmd->p);
	cl_plog(c, name, "", rq, 0, 0, "R=ok;Msg=imapshim");
}

/* The arguments of a command's first line for the protocol log, with
 * LOGIN's and AUTHENTICATE's secrets masked.  NULL when the log is off. */
char *
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
