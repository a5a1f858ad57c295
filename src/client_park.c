/* client_park.c - multiplex mode: park, attach again, resync, IDLE polls. */
#include "client_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "stats.h"
#include "upstream.h"
#include "util.h"

/* Attached clients, least recently active first: who parks under pressure. */
static TAILQ_HEAD(, client) cl_lru = TAILQ_HEAD_INITIALIZER(cl_lru);

static void
cl_arm_park_ev(struct client *c, uint64_t ms)
{
	struct timeval tv = { (time_t)(ms / 1000), (suseconds_t)(ms % 1000) * 1000 };

	evtimer_add(c->cl_park_ev, &tv);
}

/* Run the park timer the client's state calls for (cl_set_state). */
void
cl_park_timer_apply(struct client *c)
{
	uint64_t ms, now;

	switch (cl_park_timer_kind(c)) {
	case CL_P_PARK:
		if (cl_multiplex())
			cl_arm_park_ev(c, cl_cfg()->park_after_ms);
		else
			evtimer_del(c->cl_park_ev);
		break;
	case CL_P_REFRESH:
		cl_arm_park_ev(c, cl_cfg()->idle_refresh_ms);
		break;
	case CL_P_POLL:
		ms = cl_cfg()->idle_poll_interval_ms;
		now = util_now_ms();
		c->cl_poll_due_ms = cl_poll_due(now, c->cl_poll_ran_ms, ms,
		    arc4random_uniform((uint32_t)(ms < UINT32_MAX ? ms :
		    UINT32_MAX)));
		cl_arm_park_ev(c, c->cl_poll_due_ms - now);
		break;
	case CL_P_NONE:
		evtimer_del(c->cl_park_ev);
		break;
	}
}

/* After activity or attach: last in cl_lru, park timer from now. */
void
cl_touch(struct client *c)
{
	c->cl_active_ms = util_now_ms();
	if (c->cl_in_lru)
		TAILQ_REMOVE(&cl_lru, c, cl_lru_link);
	c->cl_in_lru = cl_multiplex() && (c->cl_state == CL_S_ATTACHED ||
	    c->cl_state == CL_S_IDLE);
	if (c->cl_in_lru)
		TAILQ_INSERT_TAIL(&cl_lru, c, cl_lru_link);
	cl_park_timer_apply(c);
	if (c->cl_in_lru)
		pool_note_parkable();
}

void
cl_lru_remove(struct client *c)
{
	if (c->cl_in_lru)
		TAILQ_REMOVE(&cl_lru, c, cl_lru_link);
	c->cl_in_lru = false;
}

/* Between commands with nothing half-read or unanswered (an IDLE waiting
 * for DONE counts as nothing: it may be parked too). */
bool
cl_parkable(struct client *c)
{
	if ((c->cl_state != CL_S_ATTACHED && c->cl_state != CL_S_IDLE) ||
	    c->cl_up == NULL || c->cl_logout || c->cl_select_opaque ||
	    c->cl_waiter != NULL || c->cl_cur != CL_CUR_NONE ||
	    !imap_framer_at_boundary(&c->cl_framer) ||
	    evbuffer_get_length(bufferevent_get_input(c->cl_bev)) > 0)
		return false;
	if (c->cl_state == CL_S_ATTACHED)
		return c->cl_ring.r_len == 0;
	return c->cl_ring.r_len == 1 && c->cl_inflight == 1;
}

/* Clients taking their snapshot now (pressure already on its way). */
static unsigned
cl_parking(void)
{
	return cl_state_count(CL_S_IDLE_ENDING) + cl_state_count(CL_S_PARKING) +
	    cl_state_count(CL_S_PARKING_IDLE);
}

void
client_pool_pressure(unsigned need)
{
	struct client *c, *next;

	for (c = TAILQ_FIRST(&cl_lru); c != NULL && cl_parking() < need;
	    c = next) {
		next = TAILQ_NEXT(c, cl_lru_link);
		if (cl_parkable(c))
			cl_park(c);
	}
}

/* First lines of the responses to our FETCH 1:* (UID FLAGS). */
static void
cl_snap_line_cb(void *arg, const char *line, size_t len)
{
	struct client *c = arg;
	bool parking = c->cl_state == CL_S_PARKING ||
	    c->cl_state == CL_S_PARKING_IDLE;
	struct resync_snap *s = parking ? &c->cl_snap : &c->cl_now;
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
		if (parking)
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
	bool idling = c->cl_state == CL_S_PARKING_IDLE;

	if (!ok || !c->cl_snap_ok) {
		if (upstream_state(u) == UP_S_CLOSING) {
			/* Lost while looking: go on attached, on another
			 * session with the mailbox selected again, as after
			 * any loss between commands. */
			cl_forget_upstream(c);
			cl_recover(c, idling ? CL_REDO_IDLE : CL_REDO_NONE);
			return;
		}
		/* Could not take the snapshot: stay attached (and idling:
		 * our DONE ended the server's IDLE). */
		if (idling)
			cl_idle_send(c);
		else {
			cl_set_state(c, CL_S_ATTACHED);
			cl_touch(c);
		}
		return;
	}
	c->cl_up = NULL;
	upstream_set_lessee(u, NULL, NULL);
	pool_release(u, c->cl_selected ? POOL_RELEASE_SELECTED :
	    POOL_RELEASE_CLEAN);
	c->cl_selected = false;
	cl_set_state(c, idling ? CL_S_PARKED_IDLE : CL_S_PARKED);
	log_debug("client_parked", "id=%llu mailbox=%s messages=%zu idle=%s",
	    (unsigned long long)c->cl_id, log_v(c->cl_who->mailbox),
	    c->cl_snap.rs_n, idling ? "yes" : "no");
}

/* PARKING or PARKING_IDLE: record what the client knows, then let go. */
void
cl_snapshot(struct client *c)
{
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

/* Give the upstream session back, keeping what the client knows. */
void
cl_park(struct client *c)
{
	if (c->cl_state == CL_S_IDLE) {
		/* End the real IDLE; its tagged OK (hidden) continues this.
		 * The client's own IDLE goes on. */
		c->cl_up_active_ms = util_now_ms();
		cl_set_state(c, CL_S_IDLE_ENDING);
		evbuffer_add(upstream_output(c->cl_up), "DONE\r\n", 6);
		upstream_flush(c->cl_up);
		return;
	}
	cl_set_state(c, CL_S_PARKING);
	cl_snapshot(c);
}

/* Get a session back: ATTACHING for the command waiting in the input (its
 * tag saved), POLLING for an IDLE poll. */
void
cl_attach(struct client *c, enum cl_state how)
{
	c->cl_recover_tries = 0;
	c->cl_rs = CL_RS_SELECT;
	cl_set_state(c, how);
	cl_ask_pool(c);
}

/* No session back: the waiting command (ATTACHING) is answered with
 * text, a poll (POLLING) tries again at the next one; either way the
 * client stays parked with its snapshot. */
static void
cl_attach_give_up(struct client *c, const char *text)
{
	if (c->cl_state == CL_S_POLLING) {
		cl_set_state(c, CL_S_PARKED_IDLE);
		return;
	}
	cl_printf(c, "%s %s\r\n", c->cl_tag, text);
	c->cl_drop_next = true;
	cl_set_state(c, CL_S_PARKED);
}

/* The pool could not give one back in time. */
void
cl_attach_failed(struct client *c, enum pool_fail why, const char *explain)
{
	char text[400];

	/* The table of these texts: README "Failure texts". */
	switch (why) {
	case POOL_FAIL_TIMEOUT:
		snprintf(text, sizeof(text), "NO [UNAVAILABLE] No Exchange "
		    "session within queue_timeout: %s; try again later.",
		    explain[0] != '\0' ? explain : "the session budget is full");
		break;
	case POOL_FAIL_AUTH:
	case POOL_FAIL_REFUSED:
		snprintf(text, sizeof(text), "NO [UNAVAILABLE] Exchange refused "
		    "a new session for this mailbox; try again later.");
		break;
	case POOL_FAIL_UNAVAILABLE:
	default:
		snprintf(text, sizeof(text), "NO [UNAVAILABLE] %s; try again "
		    "later.", explain[0] != '\0' ? explain :
		    "Exchange is not reachable");
		break;
	}
	cl_attach_give_up(c, text);
}

/* The resync could not go on: lost under us, it starts over on another
 * session (bounded); refused (NO or BAD to our SELECT or FETCH), the
 * session goes back and the client stays parked. */
static void
cl_resync_fail(struct client *c, const char *text)
{
	struct upstream *u = c->cl_up;

	c->cl_rs = CL_RS_SELECT;
	if (u != NULL && upstream_state(u) == UP_S_CLOSING) {
		if (cl_lost_again(c, "resync-failed"))
			cl_ask_pool(c);
		return;
	}
	log_info("client_resync_refused", "id=%llu mailbox=%s state=%s",
	    (unsigned long long)c->cl_id, log_v(c->cl_who->mailbox),
	    cl_state_name(c->cl_state));
	if (u != NULL) {
		c->cl_up = NULL;
		upstream_set_lessee(u, NULL, NULL);
		pool_release(u, POOL_RELEASE_SELECTED);
	}
	c->cl_selected = false;
	cl_attach_give_up(c, text);
}

static void cl_resync_step(struct client *c);

static void
cl_resync_cb(void *arg, bool ok)
{
	struct client *c = arg;

	if (!ok || !c->cl_snap_ok) {
		cl_resync_fail(c, "NO [UNAVAILABLE] The mailbox could not "
		    "be opened again; try again later.");
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

/* Attached again (DESIGN 3.4): select the mailbox as before, read it, and
 * tell the client what changed while it was parked, before anything else. */
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
			cl_resync_fail(c, "NO [UNAVAILABLE] The mailbox cannot "
			    "be opened again; try again later.");
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
				cl_resync_fail(c, "NO [UNAVAILABLE] The mailbox "
				    "cannot be read again; try again later.");
			return;
		}
		/* FALLTHROUGH */
	case CL_RS_EMIT:
		if (c->cl_select_cmd == NULL)
			break;
		/* What the client missed while we looked, then the rest. */
		if (c->cl_pending_ev != NULL)
			evbuffer_add_buffer(cl_output(c), c->cl_pending_ev);
		if (resync_diff(&c->cl_snap, &c->cl_now, cl_resync_emit, c) != 0) {
			cl_close(c, "resync-failed", "The mailbox changed in a "
			    "way imapshim cannot replay; please reconnect.");
			return;
		}
		c->cl_exists = (uint32_t)c->cl_now.rs_n;
		break;
	}
	c->cl_rs = CL_RS_SELECT;
	c->cl_recover_tries = 0;
	resync_snap_clear(&c->cl_snap);
	if (c->cl_state == CL_S_POLLING) {
		/* Back into a real IDLE; the client had its "+" long ago.
		 * Its "+" makes the client parkable again. */
		cl_idle_send(c);
		return;
	}
	cl_set_state(c, CL_S_ATTACHED);
	cl_touch(c);
}

/* The pool gave a session back for ATTACHING or POLLING. */
void
cl_attach_granted(struct client *c)
{
	c->cl_selected = false;	/* a fresh session: nothing yet */
	cl_resync_step(c);
}

void
cl_park_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct client *c = arg;

	(void)fd;
	(void)what;
	switch (c->cl_state) {
	case CL_S_RECOVERING:
		cl_reattach(c);		/* an APPEND check waiting to retry */
		break;
	case CL_S_PARKED_IDLE:
		/* Due: the poll waits in the pool's FIFO of polls, behind
		 * every command (DESIGN 3.3 P3), while the client stays
		 * parked with reading on, so its DONE is answered at once
		 * and withdraws the poll (cl_waiter_end). */
		c->cl_recover_tries = 0;
		c->cl_rs = CL_RS_SELECT;
		cl_ask_pool(c);
		break;
	case CL_S_IDLE:
		/* Renew the real IDLE (Exchange logs idle sessions out after
		 * 30 minutes); DONE's hidden OK sends it again. */
		c->cl_up_active_ms = util_now_ms();
		cl_set_state(c, CL_S_IDLE_RENEW);
		evbuffer_add(upstream_output(c->cl_up), "DONE\r\n", 6);
		upstream_flush(c->cl_up);
		break;
	case CL_S_ATTACHED:
		if (cl_multiplex() && cl_parkable(c))
			cl_park(c);
		else
			cl_touch(c);
		break;
	default:
		break;
	}
}

uint64_t
cl_poll_due(uint64_t now_ms, uint64_t last_ran_ms, uint64_t interval_ms,
    uint64_t r)
{
	if (last_ran_ms != 0 && last_ran_ms + interval_ms > now_ms)
		return last_ran_ms + interval_ms;
	return now_ms + r;
}

/* The poll has its session: how late it runs is the poll lag. */
void
cl_poll_granted(struct client *c)
{
	uint64_t now = util_now_ms(), ival = cl_cfg()->idle_poll_interval_ms;
	uint64_t lag = now > c->cl_poll_due_ms ? now - c->cl_poll_due_ms : 0;

	/* Polled one interval after the last one: the achieved interval. */
	stats_poll(now, lag, c->cl_poll_ran_ms != 0 &&
	    c->cl_poll_due_ms == c->cl_poll_ran_ms + ival ?
	    now - c->cl_poll_ran_ms : 0);
	c->cl_poll_ran_ms = now;
	cl_set_state(c, CL_S_POLLING);
	cl_attach_granted(c);
}

/* No session for the poll (every server down, refused): the next one is
 * due one interval from now, not at once. */
void
cl_poll_failed(struct client *c)
{
	c->cl_poll_ran_ms = util_now_ms();
	cl_park_timer_apply(c);
}
