/* client_recover.c - a session whose upstream was lost: re-run, APPEND once. */
#include "client_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "config.h"
#include "log.h"
#include "stats.h"
#include "upstream.h"
#include "util.h"

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
/* Failed attempts to get a session to settle an APPEND's fate (backoff
 * 0.5 s doubling to 8 s: about a minute in all). */
#define CL_APPEND_RECOVER_TRIES 10

void
cl_replay_release(struct client *c)
{
	free(c->cl_replay);
	c->cl_replay = NULL;
	c->cl_replay_len = c->cl_replay_cap = 0;
}

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
 * it (DESIGN 3.5), and start keeping its bytes when it may be sent again. */
void
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

/* Room for len more bytes of the in-flight command's copy, kept while it
 * may have to be sent again; NULL when there is no copy (any more: past
 * cl_replay_max it cannot be sent again, and the copy is dropped). */
char *
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

void
cl_keep(struct client *c, const char *data, size_t len)
{
	char *p = cl_keep_room(c, len);

	if (p != NULL)
		memcpy(p, data, len);
}

/* The Message-ID header of a kept APPEND command (its bytes in buf),
 * quoted for SEARCH into out; -1 when it has none we can search for. */
int
cl_append_msgid(const char *buf, size_t len, char *out, size_t outlen)
{
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

/* ------------------------------------------------------------ recovering */

/* Get a session for this mailbox again, once no command is half-read
 * (its rest would otherwise go to the new session twice). */
void
cl_reattach(struct client *c)
{
	if (c->cl_state != CL_S_RECOVERING || c->cl_waiter != NULL ||
	    c->cl_up != NULL || c->cl_cur == CL_CUR_RELAY)
		return;
	log_info("client_reattach", "id=%llu mailbox=%s redo=%d try=%u",
	    (unsigned long long)c->cl_id, log_v(c->cl_who->mailbox),
	    c->cl_recover, c->cl_recover_tries);
	cl_ask_pool(c);
}

bool
cl_lost_again(struct client *c, const char *reason)
{
	cl_forget_upstream(c);
	if (++c->cl_recover_tries < CL_RECOVER_TRIES)
		return true;
	cl_close(c, reason, "The connection to Exchange was lost.");
	return false;
}

/* Into RECOVERING (or on in it) with what to redo. */
void
cl_recover(struct client *c, enum cl_redo what)
{
	c->cl_recover = what;
	if (c->cl_state != CL_S_RECOVERING)
		cl_set_state(c, CL_S_RECOVERING);
	cl_reattach(c);
}

/* The client sent DONE while its IDLE waits to be redone: it is over. */
void
cl_recover_done_idle(struct client *c)
{
	c->cl_recover = CL_REDO_NONE;
}

/*
 * The session has collected nearly as many NO/BAD answers as Exchange
 * allows on one connection: continue on a fresh one (the pool retires this
 * one), with the mailbox selected again as before.
 */
void
cl_swap_upstream(struct client *c)
{
	struct upstream *u = c->cl_up;

	log_info("client_upstream_worn", "id=%llu mailbox=%s up=%llu",
	    (unsigned long long)c->cl_id, log_v(c->cl_who->mailbox),
	    (unsigned long long)upstream_id(u));
	c->cl_up = NULL;
	upstream_set_lessee(u, NULL, NULL);
	pool_release(u, c->cl_selected ? POOL_RELEASE_SELECTED :
	    POOL_RELEASE_CLEAN);
	c->cl_selected = false;
	cl_recover(c, CL_REDO_NONE);
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
		if (c->cl_recover == CL_REDO_APPEND_SEARCH ||
		    c->cl_recover == CL_REDO_APPEND_DECIDE)
			c->cl_recover = CL_REDO_APPEND_EXAMINE;
		if (cl_lost_again(c, "upstream-lost"))
			cl_reattach(c);
		return;
	}
	if (!ok && (c->cl_recover == CL_REDO_APPEND_SEARCH ||
	    c->cl_recover == CL_REDO_APPEND_DECIDE)) {
		/* The APPEND check was refused: whether the voice message
		 * landed cannot be told, and no answer is safe (3.5 R12). */
		cl_close(c, "append-check-refused", "Whether the message was "
		    "stored cannot be checked; please reconnect.");
		return;
	}
	if (!ok) {
		/* The mailbox cannot be selected again: the session goes on
		 * with none selected, and the client is told so (its commands
		 * that need one get the server's own answer). */
		log_info("client_reselect_refused", "id=%llu mailbox=%s",
		    (unsigned long long)c->cl_id, log_v(c->cl_who->mailbox));
		free(c->cl_select_cmd);
		c->cl_select_cmd = NULL;
		c->cl_selected = c->cl_select_opaque = false;
		cl_printf(c, "* NO The selected mailbox could not be opened "
		    "again after the connection to Exchange was lost; no "
		    "mailbox is selected now.\r\n");
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

/* APPEND recovery, DECIDE: the search said whether it landed. */
static void
cl_append_decide(struct client *c, struct cl_pend *p)
{
	char text[128];

	if (c->cl_found_uid == 0) {
		log_info("client_append_recovered", "id=%llu mailbox=%s "
		    "result=sent-again", (unsigned long long)c->cl_id,
		    log_v(c->cl_who->mailbox));
		c->cl_recover = CL_REDO_SEND;
		return;
	}
	log_info("client_append_recovered", "id=%llu mailbox=%s "
	    "result=already-stored uid=%u", (unsigned long long)c->cl_id,
	    log_v(c->cl_who->mailbox), c->cl_found_uid);
	if (upstream_has_cap(c->cl_up, "UIDPLUS") && c->cl_found_uidvalidity != 0) {
		snprintf(text, sizeof(text), "OK [APPENDUID %u %u] APPEND "
		    "completed.", c->cl_found_uidvalidity, c->cl_found_uid);
		cl_pend_answer(c, p, text);
	} else
		cl_pend_answer(c, p, "OK APPEND completed.");
}

/* One internal command of the APPEND check; next is the step after it.
 * Returns 0, or -1 when it could not be sent (p answered). */
static int
cl_append_check(struct client *c, struct cl_pend *p, const char *cmd,
    enum cl_redo next)
{
	c->cl_recover = next;
	if (upstream_command_lines(c->cl_up, cmd, cl_recover_line_cb,
	    cl_recover_done_cb, c) == 0)
		return 0;
	c->cl_recover = CL_REDO_NONE;
	cl_pend_unavailable(c, p);
	return -1;
}

/*
 * Back on a session after a loss: select the mailbox again, then redo what
 * cl_recover says.  Each step is one internal command; its callback calls
 * this again until nothing is left, then the client goes on attached.
 */
static void
cl_recover_step(struct client *c)
{
	struct cl_pend *p = cl_ring_inflight(&c->cl_ring);
	char cmd[1024], msgid[600];
	enum cl_redo what = c->cl_recover;

	if (c->cl_select_cmd != NULL && !c->cl_selected) {
		c->cl_selected = true;
		if (upstream_command(c->cl_up, c->cl_select_cmd,
		    cl_recover_done_cb, c) == 0)
			return;
	}
	c->cl_recover = CL_REDO_NONE;
	if (p == NULL)
		what = CL_REDO_NONE;
	switch (what) {
	case CL_REDO_APPEND_EXAMINE:
		if (cl_append_msgid(c->cl_replay, c->cl_replay_len, msgid,
		    sizeof(msgid)) != 0 || c->cl_append_mbox == NULL) {
			cl_pend_unavailable(c, p);
			break;
		}
		/* First look whether the message landed before the loss. */
		c->cl_found_uid = c->cl_found_uidvalidity = 0;
		snprintf(cmd, sizeof(cmd), "EXAMINE %s", c->cl_append_mbox);
		c->cl_selected = true;
		if (cl_append_check(c, p, cmd, CL_REDO_APPEND_SEARCH) == 0)
			return;
		break;
	case CL_REDO_APPEND_SEARCH:
		cl_append_msgid(c->cl_replay, c->cl_replay_len, msgid,
		    sizeof(msgid));
		snprintf(cmd, sizeof(cmd), "UID SEARCH HEADER Message-ID %s", msgid);
		if (cl_append_check(c, p, cmd, CL_REDO_APPEND_DECIDE) == 0)
			return;
		break;
	case CL_REDO_APPEND_DECIDE:
		cl_append_decide(c, p);
		/* The client's own mailbox must be selected again after our
		 * EXAMINE, found or not (cl_selected stays true: our EXAMINE
		 * selected something). */
		if (c->cl_select_cmd != NULL && upstream_command(c->cl_up,
		    c->cl_select_cmd, cl_recover_done_cb, c) == 0)
			return;
		cl_recover_step(c);
		return;
	case CL_REDO_SEND:
		/* The same bytes, tag and all, on the new session. */
		evbuffer_add(upstream_output(c->cl_up), c->cl_replay,
		    c->cl_replay_len);
		upstream_flush(c->cl_up);
		break;
	case CL_REDO_IDLE:
		c->cl_recover_tries = 0;
		cl_idle_send(c);
		return;
	case CL_REDO_NONE:
		break;
	}
	if (c->cl_state == CL_S_CLOSING)
		return;
	/* A command sent again counts its losses on until its reply (R13):
	 * one that kills the server each time must not be sent for ever. */
	if (what != CL_REDO_SEND)
		c->cl_recover_tries = 0;
	c->cl_up_active_ms = util_now_ms();
	cl_set_state(c, CL_S_ATTACHED);
	cl_touch(c);
}

/* The pool gave a session for RECOVERING. */
void
cl_recover_granted(struct client *c)
{
	cl_recover_step(c);
}

/* No session to go on with after a loss. */
void
cl_recover_failed(struct client *c)
{
	struct cl_pend *p = cl_ring_inflight(&c->cl_ring);
	struct timeval tv;
	uint64_t ms;

	if (c->cl_recover >= CL_REDO_APPEND_EXAMINE &&
	    c->cl_append_tries < CL_APPEND_RECOVER_TRIES) {
		/* Whether the voice message landed is not known yet;
		 * answering now could store it twice: keep trying, with
		 * backoff, for about a minute. */
		ms = 500ULL << (c->cl_append_tries < 4 ? c->cl_append_tries : 4);
		c->cl_append_tries++;
		tv.tv_sec = (time_t)(ms / 1000);
		tv.tv_usec = (suseconds_t)(ms % 1000) * 1000;
		evtimer_add(c->cl_park_ev, &tv);
		return;
	}
	if (p != NULL && c->cl_recover == CL_REDO_IDLE) {
		/* Nothing was lost but the wait: the IDLE ends. */
		cl_pend_answer(c, p, "OK IDLE terminated.");
		p = NULL;
	}
	if (p != NULL)
		cl_pend_unavailable(c, p);
	/* Which failure is not known here: say what is. */
	cl_close(c, "upstream-lost", "The connection to Exchange was lost and "
	    "no new session could be had; log in again later.");
}

void
cl_up_lost(void *arg, const char *reason)
{
	struct client *c = arg;
	struct cl_pend *p = cl_ring_inflight(&c->cl_ring);
	bool cut = c->cl_partial;
	bool idling = cl_state_idling(c->cl_state);
	enum cl_redo what = CL_REDO_NONE;

	cl_stage_flush_for(c);		/* lines relayed before the loss */
	cl_forget_upstream(c);
	stats_login_retry(STATS_RETRY_LOST);
	log_info("client_upstream_lost", "id=%llu mailbox=%s reason=%s "
	    "state=%s in_flight=%s cut=%s", (unsigned long long)c->cl_id,
	    log_v(c->cl_who->mailbox), log_v(reason),
	    cl_state_name(c->cl_state), p != NULL ? log_v(p->tag) : "-",
	    cut ? "yes" : "no");
	if (cut) {
		/* The client has part of a response (half a FETCH literal):
		 * nothing more can be said on that stream, not even BYE. */
		cl_close(c, "upstream-lost-mid-response", NULL);
		return;
	}
	if (!cl_lost_again(c, "upstream-lost"))
		return;
	if (c->cl_cur == CL_CUR_RELAY && !c->cl_replay_on) {
		/* The client is still sending a command that cannot be sent
		 * again: drop its rest. */
		c->cl_cur = CL_CUR_SWALLOW;
		if (p != NULL)
			cl_pend_unavailable(c, p);
		p = NULL;
	}
	if (idling)
		what = CL_REDO_IDLE;
	else if (p != NULL && c->cl_cur == CL_CUR_NONE) {
		if (p->rerun == CL_RERUN_IDLE && p->cont_sent)
			/* DONE had gone out: the IDLE is over. */
			cl_pend_answer(c, p, "OK IDLE terminated.");
		else if (p->rerun == CL_RERUN_IDLE && c->cl_replay_on)
			what = CL_REDO_SEND;	/* its "+" is still owed */
		else if (c->cl_replay_on && p->rerun == CL_RERUN_APPEND)
			what = CL_REDO_APPEND_EXAMINE;
		else if (c->cl_replay_on && p->rerun == CL_RERUN_READONLY &&
		    !p->replied)
			what = CL_REDO_SEND;
		else
			cl_pend_unavailable(c, p);
	}
	/* With the command still being read (cl_cur RELAY) cl_command_sent
	 * decides once it is whole. */
	if (c->cl_state != CL_S_CLOSING)
		cl_recover(c, what);
}

/*
 * The upstream has owed this client an answer for command_timeout: it is
 * stuck.  Treat it as lost (read-only commands run again elsewhere).
 */
void
cl_command_overdue(struct client *c)
{
	log_warn("client_command_timeout", "id=%llu mailbox=%s state=%s "
	    "timeout_ms=%llu", (unsigned long long)c->cl_id,
	    log_v(c->cl_who->mailbox), cl_state_name(c->cl_state),
	    (unsigned long long)cl_cfg()->command_timeout_ms);
	upstream_abort(c->cl_up, "command-timeout");
	cl_up_lost(c, "no reply within command_timeout");
}
