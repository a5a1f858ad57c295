/* client_relay.c - a logged-in client's commands and the upstream's replies. */
#include "client_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "protolog.h"
#include "relay.h"
#include "stats.h"
#include "upstream.h"
#include "util.h"

/* Client input held, unread, while its previous command is upstream. */
#define CL_INPUT_HOLD (64 * 1024)

static void cl_up_frame(void *arg, const struct imap_frame *fr,
    const struct imap_resp *resp, struct evbuffer *in);
static void cl_up_writable(void *arg);
static void cl_up_read_done(void *arg);

static const struct upstream_cbs cl_up_cbs = {
	.frame = cl_up_frame,
	.lost = cl_up_lost,
	.writable = cl_up_writable,
	.read_done = cl_up_read_done,
};

/* Take a session the pool granted. */
void
cl_lease(struct client *c, struct upstream *u)
{
	c->cl_up = u;
	upstream_set_lessee(u, &cl_up_cbs, c);
	c->cl_relay_sync_lit = !upstream_has_cap(u, "LITERAL+");
}

/*
 * May the next client frame be read now?  Relaying, one command goes
 * upstream at a time: servers may answer pipelined commands out of order
 * (Dovecot does), and the client must get its replies in the order it sent
 * them.  Otherwise reading stops for backpressure, or because there is no
 * session to send to; the tagged reply, the upstream's writable callback
 * or the next state turns it back on.  Reading stays enabled (switching it
 * off and on per command costs two epoll_ctl calls) until CL_INPUT_HOLD
 * bytes wait.
 */
bool
cl_read_allowed(struct client *c, struct evbuffer *in)
{
	switch (c->cl_state) {
	case CL_S_IDLE:
	case CL_S_PARKED:
	case CL_S_PARKED_IDLE:
		return true;
	case CL_S_RECOVERING:
		/* The rest of a command being kept or dropped, or the DONE
		 * of an IDLE that is redone. */
		if (c->cl_cur != CL_CUR_NONE || c->cl_recover == CL_REDO_IDLE)
			return true;
		break;
	case CL_S_ATTACHED:
		if (!upstream_output_full(c->cl_up) &&
		    c->cl_ring.r_len < CL_MAX_PENDING &&
		    (c->cl_inflight == 0 || c->cl_cur != CL_CUR_NONE ||
		    !imap_framer_at_boundary(&c->cl_framer)))
			return true;
		break;
	default:
		return false;
	}
	c->cl_read_blocked = true;
	if (evbuffer_get_length(in) >= CL_INPUT_HOLD)
		bufferevent_disable(c->cl_bev, EV_READ);
	return false;
}

/* Read on once whatever blocked reading is gone. */
void
cl_unblock(struct client *c)
{
	if (c->cl_read_blocked && c->cl_state == CL_S_ATTACHED &&
	    !c->cl_logout && !upstream_output_full(c->cl_up) &&
	    c->cl_ring.r_len < CL_MAX_PENDING)
		cl_resume_reading(c);
}

static void
cl_up_writable(void *arg)
{
	cl_unblock(arg);
}

/* Send the in-flight IDLE upstream again, hiding its "+". */
void
cl_idle_send(struct client *c)
{
	struct cl_pend *p = cl_ring_inflight(&c->cl_ring);

	IMAPSHIM_ASSERT(p != NULL && p->rerun == CL_RERUN_IDLE);
	c->cl_up_active_ms = util_now_ms();
	cl_set_state(c, CL_S_IDLE_RESUME);
	evbuffer_add_printf(upstream_output(c->cl_up), "%s IDLE\r\n", p->tag);
	upstream_flush(c->cl_up);
}

/* ------------------------------------------------------- client commands */

/* Room for len more bytes of the command being read, moved from in to the
 * upstream (or, while detached, only to the copy kept for a re-run). */
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

/*
 * A command answered (or dropped) at one of its lines: the rest of it is
 * not relayed.  A client that got no "+" for a synchronizing literal sends
 * no literal (RFC 3501 7.5): its next bytes are a new command.
 */
static void
cl_answered_early(struct client *c, const struct imap_frame *fr)
{
	const struct config *cfg = cl_cfg();

	if (fr->last)
		c->cl_cur = CL_CUR_NONE;
	else if (fr->has_lit && !fr->lit_nonsync) {
		imap_framer_init(&c->cl_framer, cfg->max_command_bytes,
		    cfg->max_literal_bytes);
		c->cl_cur = CL_CUR_NONE;
	} else
		c->cl_cur = CL_CUR_SWALLOW;
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

/* The whole command has been read. */
static void
cl_command_sent(struct client *c)
{
	struct cl_pend *p = c->cl_cur_pend;
	enum cl_redo what = c->cl_recover;

	/* A later push may move the ring: no pointer into it is kept. */
	c->cl_cur_pend = NULL;
	c->cl_cur = CL_CUR_NONE;
	c->cl_up_active_ms = util_now_ms();
	if (c->cl_up != NULL) {
		upstream_flush(c->cl_up);
		cl_timer_update(c);	/* command_timeout runs from now */
		return;
	}
	/* The upstream was lost while the client was still sending: the
	 * server never had the whole command, so sending it again is safe
	 * even for APPEND. */
	if (p != NULL && !p->done) {
		if (c->cl_replay_on)
			what = CL_REDO_SEND;
		else
			cl_pend_unavailable(c, p);
	}
	if (c->cl_state != CL_S_CLOSING)
		cl_recover(c, what);
}

/* The line a client sends to end its IDLE, while no upstream idles for it:
 * the IDLE ends right here. */
static void
cl_idle_done_locally(struct client *c, const struct imap_frame *fr,
    struct evbuffer *in)
{
	struct cl_pend *p = cl_ring_inflight(&c->cl_ring);

	c->cl_bytes_in += fr->len;
	evbuffer_drain(in, fr->len);
	if (c->cl_state == CL_S_PARKED_IDLE) {
		cl_waiter_end(c);	/* a poll waiting for its session */
		cl_set_state(c, CL_S_PARKED);
	} else
		cl_recover_done_idle(c);
	if (p != NULL)
		cl_pend_answer(c, p, "OK IDLE terminated.");
}

static void
cl_auth_first_line(struct client *c, const struct imap_frame *fr,
    const char *line, struct evbuffer *in)
{
	struct imap_tok tag, cmd;
	char t[IMAPSHIM_TAG_MAX + 1];
	struct cl_pend *p;

	if (c->cl_drop_next) {
		/* Answered NO [UNAVAILABLE] while waiting for a session. */
		c->cl_drop_next = false;
		evbuffer_drain(in, fr->len);
		cl_answered_early(c, fr);
		return;
	}
	if (c->cl_state == CL_S_PARKED_IDLE || (c->cl_state ==
	    CL_S_RECOVERING && c->cl_recover == CL_REDO_IDLE)) {
		cl_idle_done_locally(c, fr, in);
		return;
	}
	if (c->cl_state == CL_S_IDLE) {
		/* The only thing a client may send while idling is DONE;
		 * the server judges it. */
		c->cl_bytes_in += fr->len;
		evbuffer_remove_buffer(in, upstream_output(c->cl_up), fr->len);
		upstream_flush(c->cl_up);
		c->cl_replay_on = false;
		c->cl_up_active_ms = util_now_ms();
		cl_set_state(c, CL_S_ATTACHED);
		return;
	}
	if (imap_parse_command_head(line, fr->text_len, &tag, &cmd) != 0 ||
	    tag.len > IMAPSHIM_TAG_MAX) {
		cl_line_tag(line, fr->text_len, t);
		evbuffer_drain(in, fr->len);
		cl_answered_early(c, fr);
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
		cl_answered_early(c, fr);
		c->cl_bad_in_row = 0;
		return;
	}
	c->cl_bad_in_row = 0;
	if (c->cl_state == CL_S_PARKED) {
		/* Read it again once attached and resynced. */
		snprintf(c->cl_tag, sizeof(c->cl_tag), "%.*s",
		    (int)tag.len, tag.p);
		c->cl_unread = true;
		cl_attach(c, CL_S_ATTACHING);
		return;
	}
	IMAPSHIM_ASSERT(c->cl_state == CL_S_ATTACHED);
	p = c->cl_cur_pend = cl_ring_push(&c->cl_ring, tag.p, tag.len);
	p->relayed = true;
	c->cl_inflight++;
	p->stat_cmd = stats_command_from(cmd.p, cmd.len);
	p->started_us = util_now_us();
	p->pl_params = cl_plog_params(line, fr->text_len, &cmd);
	if (imap_tok_is(&cmd, "SELECT") || imap_tok_is(&cmd, "EXAMINE"))
		p->selects = 1;
	else if (imap_tok_is(&cmd, "CLOSE") || imap_tok_is(&cmd, "UNSELECT"))
		p->selects = -1;
	log_debug("client_command", "id=%llu tag=%s command=%s",
	    (unsigned long long)c->cl_id, log_v(p->tag),
	    log_vn(cmd.p, cmd.len));
	cl_prepare_rerun(c, p, line, fr->text_len, &cmd);
	c->cl_cur = CL_CUR_RELAY;
	cl_forward_line(c, fr, line, in);
	if (fr->last)
		cl_command_sent(c);
}

void
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
		cl_answered_early(c, fr);
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

/* ------------------------------------------------------ upstream replies */

/* Count reply bytes for the protocol log; log the command at its tagged
 * reply (before the reply's bytes leave the input buffer). */
static void
cl_plog_response(struct client *c, struct cl_pend *done,
    const struct imap_resp *resp, const struct imap_frame *fr)
{
	struct cl_pend *p = done != NULL ? done : cl_ring_inflight(&c->cl_ring);
	char ctx[600];

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

/*
 * A "+" from the upstream.  Relayed only where the client waits for one:
 * its own IDLE (then both idle), or a literal when the upstream lacks
 * LITERAL+.  The "+" of an IDLE imapshim sent again is hidden.  Returns
 * true when it was consumed here.
 */
static bool
cl_up_continuation(struct client *c, const struct imap_frame *fr,
    struct evbuffer *in)
{
	struct cl_pend *p = cl_ring_inflight(&c->cl_ring);

	if (c->cl_state == CL_S_IDLE_RESUME) {
		evbuffer_drain(in, fr->len);
		cl_set_state(c, CL_S_IDLE);
		cl_touch(c);
		return true;
	}
	if (c->cl_state == CL_S_ATTACHED && p != NULL &&
	    p->rerun == CL_RERUN_IDLE && !p->cont_sent)
		return false;		/* relayed, then IDLE */
	if (c->cl_state == CL_S_ATTACHED && c->cl_relay_sync_lit)
		return false;
	/* Nobody asked for it (literals go upstream as LITERAL+). */
	evbuffer_drain(in, fr->len);
	return true;
}

/* A tagged reply to an IDLE: imapshim's own DONE may have caused it.
 * Returns true when it was consumed here. */
static bool
cl_up_idle_tagged(struct client *c, const struct imap_frame *fr,
    struct evbuffer *in)
{
	switch (c->cl_state) {
	case CL_S_IDLE_RENEW:
		/* Our DONE renewed the IDLE; the client's goes on. */
		evbuffer_drain(in, fr->len);
		cl_idle_send(c);
		return true;
	case CL_S_IDLE_ENDING:
		/* Our DONE ended it to park; the client's goes on. */
		evbuffer_drain(in, fr->len);
		cl_set_state(c, CL_S_PARKING_IDLE);
		cl_snapshot(c);
		return true;
	case CL_S_IDLE:
	case CL_S_IDLE_RESUME:
		/* The server ended or refused the IDLE itself: that is the
		 * client's answer. */
		cl_set_state(c, CL_S_ATTACHED);
		return false;
	default:
		return false;
	}
}

/* The tagged reply of p went to the client. */
static void
cl_up_completed(struct client *c, struct cl_pend *p,
    const struct imap_resp *resp)
{
	/* A failed SELECT leaves no mailbox selected (RFC 3501 6.3.1). */
	if (p->selects > 0) {
		c->cl_selected = resp->status == IMAP_ST_OK;
		free(c->cl_select_cmd);
		c->cl_select_cmd = NULL;
		if (c->cl_selected) {
			c->cl_select_cmd = p->select_cmd;
			p->select_cmd = NULL;
		}
		c->cl_select_opaque = c->cl_selected && c->cl_select_cmd == NULL;
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
	if (c->cl_end_bye != NULL && c->cl_inflight == 0) {
		cl_close(c, c->cl_end_reason, c->cl_end_bye);
		return;
	}
	if (c->cl_state == CL_S_ATTACHED && c->cl_inflight == 0 &&
	    c->cl_cur == CL_CUR_NONE && pool_session_worn(c->cl_up)) {
		cl_swap_upstream(c);
		return;
	}
	cl_touch(c);
	cl_timer_update(c);
	cl_unblock(c);
}

static void
cl_up_frame(void *arg, const struct imap_frame *fr,
    const struct imap_resp *resp, struct evbuffer *in)
{
	struct client *c = arg;
	struct evbuffer *out;
	struct cl_pend *p = NULL, *inflight;

	c->cl_up_active_ms = util_now_ms();
	if (resp != NULL && resp->kind == IMAP_RESP_CONTINUATION &&
	    cl_up_continuation(c, fr, in))
		return;
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
		p = cl_ring_find(&c->cl_ring, resp->tag.p, resp->tag.len);
		if (p != NULL && p->rerun == CL_RERUN_IDLE &&
		    cl_up_idle_tagged(c, fr, in))
			return;
		if (p != NULL && p->reply != NULL) {
			/* We answered this one ourselves (a command we had to
			 * cut short upstream); hide the server's answer. */
			evbuffer_drain(in, fr->len);
			p->done = true;
			c->cl_inflight--;
			cl_pend_flush(c);
			if (c->cl_state != CL_S_CLOSING)
				cl_unblock(c);
			return;
		}
	}
	c->cl_bytes_out += fr->len;
	inflight = p == NULL ? cl_ring_inflight(&c->cl_ring) : NULL;
	if (inflight != NULL)
		inflight->replied = true;
	if (protolog_enabled())
		cl_plog_response(c, p, resp, fr);
	out = cl_stage_for(c);
	/* A line with a literal to follow, or a literal, leaves the client
	 * holding part of a response until its last line (3.5 R10). */
	c->cl_partial = fr->kind != IMAP_FR_LINE || !fr->last;
	if (fr->kind == IMAP_FR_LINE) {
		/* Copied, so that the lines of one reply share one chain (one
		 * TLS record); a line lies in in's first chain already. */
		evbuffer_add(out, evbuffer_pullup(in, (ev_ssize_t)fr->len),
		    fr->len);
		evbuffer_drain(in, fr->len);
	} else
		relay_move(in, out, fr->len);
	if (resp != NULL && resp->kind == IMAP_RESP_CONTINUATION &&
	    inflight != NULL && inflight->rerun == CL_RERUN_IDLE) {
		/* The client has its "+": both idle now. */
		inflight->cont_sent = true;
		cl_stage_flush();
		cl_set_state(c, CL_S_IDLE);
		cl_touch(c);
		return;
	}
	if (p != NULL) {
		/* The reply is complete: send it before anything can take
		 * the upstream (and its read_done callback) away. */
		cl_stage_flush();
		cl_up_completed(c, p, resp);
		if (c->cl_state == CL_S_CLOSING || c->cl_up == NULL)
			return;
	}
	cl_stage_flush_if_full(c);
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
	if (c->cl_up != NULL && upstream_response_incomplete(c->cl_up) &&
	    cl_stage_holds(c, RELAY_RECORD))
		return;
	cl_stage_flush_for(c);
}
