/*
 * client_int.h - what the files of the client module share.
 *
 * The client module is one object, struct client, split by concern:
 *
 *   client.c          lifecycle: the state table and its transition
 *                     function, timers, accept, close and reap, the
 *                     bufferevent callbacks that dispatch by state
 *   client_login.c    before login: greeting, CAPABILITY, LOGIN,
 *                     AUTHENTICATE, STARTTLS, the per-address limit
 *   client_reply.c    what goes to the client: output staging, the ring
 *                     that keeps replies in command order, protocol log
 *   client_relay.c    after login: framing client commands, answering
 *                     some locally, relaying the rest and the upstream's
 *                     responses, IDLE
 *   client_park.c     multiplex mode: park, attach, resync, IDLE polls
 *   client_recover.c  an upstream lost under a session: re-run, APPEND
 *                     exactly once, IDLE again
 *
 * Nothing outside these files includes this header.  The state diagram
 * and the rules cited as "DESIGN 3.x" are in DESIGN.md beside them.
 */
#ifndef CLIENT_INT_H
#define CLIENT_INT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/queue.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <openssl/ssl.h>

#include "auth.h"
#include "client.h"
#include "imap_parse.h"
#include "imapshim.h"
#include "pool.h"
#include "reap.h"
#include "resync.h"

/* Commands in flight per session; beyond it we stop reading (backpressure). */
#define CL_MAX_PENDING 256
/* Upstream losses in a row one command may survive. */
#define CL_RECOVER_TRIES 3

/*
 * Every situation a client can be in (DESIGN.md "Client session").  The
 * table in client.c gives each state's legal successors, whether client
 * reading is on and which timers run; cl_set_state() applies it.
 */
enum cl_state {
	CL_S_HANDSHAKE,		/* implicit TLS handshake */
	CL_S_NOTAUTH,		/* reading commands before login */
	CL_S_STARTTLS,		/* STARTTLS handshake */
	CL_S_SASL,		/* waiting for the AUTHENTICATE PLAIN response */
	CL_S_AUTHDELAY,		/* failed login: waiting before the NO */
	CL_S_LOGGING_IN,	/* credentials good: waiting for a session */
	CL_S_ATTACHED,		/* holding an upstream session: relaying */
	CL_S_IDLE,		/* client and upstream idling: next is DONE */
	CL_S_IDLE_RENEW,	/* our DONE renews the upstream IDLE */
	CL_S_IDLE_RESUME,	/* our IDLE sent again: its "+" is hidden */
	CL_S_IDLE_ENDING,	/* our DONE ends the upstream IDLE to park */
	CL_S_PARKING,		/* taking the snapshot, between commands */
	CL_S_PARKING_IDLE,	/* taking the snapshot of an idling client */
	CL_S_PARKED,		/* no upstream session held */
	CL_S_PARKED_IDLE,	/* no upstream session, client idling */
	CL_S_ATTACHING,		/* getting one back for a command, resyncing */
	CL_S_POLLING,		/* getting one back for an IDLE poll */
	CL_S_RECOVERING,	/* upstream lost: getting another, redoing */
	CL_S_CLOSING,		/* flushing, then reaped */
	CL_S_COUNT
};

/* Which park timer (cl_park_ev) a state runs; client_park.c arms it. */
enum cl_ptmr {
	CL_P_NONE,
	CL_P_PARK,		/* park_after (multiplex) */
	CL_P_REFRESH,		/* idle_refresh: renew the upstream IDLE */
	CL_P_POLL,		/* idle_poll_interval, jittered */
};

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

/* What RECOVERING redoes once a new session is there. */
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
	bool cont_sent;		/* IDLE: the client has its "+" */
	char *select_cmd;	/* SELECT/EXAMINE: "SELECT args" to redo later */
	char *pl_params;	/* its arguments, only with protocol_log */
	char *reply;		/* local reply, or a replacement for the upstream's */
};

/* The replies still owed, oldest first (a ring that grows). */
struct cl_ring {
	struct cl_pend *r_pend;
	size_t r_cap, r_head, r_len;
};

/* Who a client logged in as, in one allocation sized to fit (auth.c's
 * limits bound each part): a parked client keeps only this much of it. */
struct cl_who {
	const char *domain;	/* "" when the format has none */
	const char *admin;	/* the admin account, configured spelling */
	char mailbox[];		/* then the domain's and the admin's bytes */
};

struct client {
	uint64_t cl_id;
	enum cl_state cl_state;
	enum client_listener cl_kind;
	struct bufferevent *cl_bev;
	SSL *cl_ssl;
	struct event *cl_timer;		/* login, delay, idle, command, flush */
	char cl_peer[64];
	struct imap_framer cl_framer;

	/* The command a session is sought for: LOGIN or AUTHENTICATE
	 * before login, the one waiting on attach after (ATTACHING). */
	char cl_tag[IMAPSHIM_TAG_MAX + 1];
	bool cl_tls;			/* in cl_tag's padding */

	/* before login */
	struct evbuffer *cl_cmd;	/* the command being assembled */
	unsigned cl_auth_failures;
	unsigned cl_bad_in_row;
	struct cl_who *cl_who;		/* NULL until the login is accepted */
	/* Only while the pool owes an answer (cl_ask_pool to its callback
	 * or cl_waiter_end): a parked client holds none. */
	struct pool_waiter *cl_waiter;
	uint64_t cl_login_us;		/* credentials checked at */

	/* after login */
	struct upstream *cl_up;
	enum cl_cur cl_cur;
	bool cl_relay_sync_lit;		/* upstream lacks LITERAL+: pass its "+" */
	bool cl_partial;		/* the client has part of a response */
	struct cl_ring cl_ring;		/* replies owed, in command order */
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
	enum cl_redo cl_recover;	/* what RECOVERING redoes */
	unsigned cl_recover_tries;
	uint32_t cl_found_uidvalidity, cl_found_uid;
	unsigned cl_append_tries;	/* sessions sought to settle an APPEND */
	char *cl_auth_caps;		/* capabilities shown after login */
	bool cl_in_lru;
	TAILQ_ENTRY(client) cl_lru_link;

	/* Multiplex mode (DESIGN 3.4). */
	struct event *cl_park_ev;	/* park_after, IDLE renewal and poll */
	uint32_t cl_uidvalidity;	/* of the selected mailbox */
	uint32_t cl_exists;		/* messages the client knows of */
	struct resync_snap cl_snap;	/* the client's view, while parked */
	bool cl_snap_ok;
	struct evbuffer *cl_pending_ev;	/* EXISTS seen while taking it */
	struct resync_snap cl_now;	/* the mailbox at attach time */
	struct evbuffer *cl_flagtext;	/* "msn flags\0" of changed messages */
	uint32_t cl_new_uidvalidity, cl_new_exists;
	enum cl_rs cl_rs;		/* resync step */
	bool cl_unread;			/* leave the current frame unread */
	bool cl_drop_next;		/* next command was answered already */
	uint64_t cl_active_ms;		/* last client byte or command */
	uint64_t cl_up_active_ms;	/* last command sent or reply byte */
	uint64_t cl_poll_due_ms;	/* PARKED_IDLE: the next poll is due */
	uint64_t cl_poll_ran_ms;	/* the last poll got its session */

	uint64_t cl_started_ms;
	uint64_t cl_bytes_in, cl_bytes_out;
	char *cl_sip;			/* local address, only with protocol_log */
	unsigned cl_pl_seq;
	const char *cl_close_reason;
	/* Ending (drain, the console's kick): closed with "* BYE cl_end_bye"
	 * once the command in flight has its reply; nothing more is read. */
	const char *cl_end_bye;
	const char *cl_end_reason;
	struct reap_entry cl_reap;
	TAILQ_ENTRY(client) cl_link;
	struct cl_ipq *cl_ipq;		/* while unauthenticated */
	TAILQ_ENTRY(client) cl_ip_link;
};

/* client.c: lifecycle and state */
extern const struct client_env *cl_env;
const struct config *cl_cfg(void);
bool cl_multiplex(void);
const char *cl_state_name(enum cl_state st);
bool cl_state_legal(enum cl_state from, enum cl_state to);
bool cl_state_reads(enum cl_state st);
enum client_kind cl_state_kind(enum cl_state st);
void cl_set_state(struct client *c, enum cl_state to);
bool cl_state_idling(enum cl_state st);
enum cl_ptmr cl_park_timer_kind(const struct client *c);
unsigned cl_state_count(enum cl_state st);
void cl_arm_timer(struct client *c, uint64_t ms);
void cl_timer_update(struct client *c);
void cl_resume_reading(struct client *c);
void cl_close(struct client *c, const char *reason, const char *bye);
void cl_end(struct client *c, const char *reason, const char *bye);
void cl_ask_pool(struct client *c);
/* Withdraw the client's waiter, if any, and free it: the one way a
 * waiter ends, whether the pool has called back or not. */
void cl_waiter_end(struct client *c);
void cl_forget_upstream(struct client *c);
void cl_read_cb(struct bufferevent *bev, void *arg);
void cl_write_cb(struct bufferevent *bev, void *arg);
void cl_event_cb(struct bufferevent *bev, short what, void *arg);

/* client_login.c: before login */
void cl_caps(const struct client *c, char *buf, size_t len);
void cl_send_greeting(struct client *c);
void cl_unauth_add(struct client *c, const struct sockaddr *sa);
void cl_unauth_remove(struct client *c);
void cl_preauth_frame(struct client *c, const struct imap_frame *fr,
    const char *line, struct evbuffer *in);
void cl_auth_delay_over(struct client *c);
/* The pool's failure: reason and explain (pw_reason, pw_explain) are
 * copies, the waiter has ended. */
void cl_login_failed(struct client *c, enum pool_fail why, const char *reason,
    const char *explain);
void cl_login_done(struct client *c);
void cl_log_tls_failure(struct client *c, unsigned long err);

/* client_reply.c: output, reply order, protocol log */
struct evbuffer *cl_output(struct client *c);
void cl_stage_init(void);
void cl_stage_free(void);
struct evbuffer *cl_stage_for(struct client *c);
void cl_stage_flush(void);
void cl_stage_flush_if_full(struct client *c);
void cl_stage_flush_for(struct client *c);
void cl_stage_forget(struct client *c);
bool cl_stage_holds(const struct client *c, size_t below);
void cl_write(struct client *c, const char *s, size_t len);
void cl_printf(struct client *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void cl_reply(struct client *c, const char *tag, size_t taglen, bool logout,
    const char *fmt, ...) __attribute__((format(printf, 5, 6)));
void cl_bad(struct client *c, const char *tag, size_t taglen, const char *text);
struct cl_pend *cl_ring_at(struct cl_ring *r, size_t i);
struct cl_pend *cl_ring_push(struct cl_ring *r, const char *tag, size_t taglen);
struct cl_pend *cl_ring_pop(struct cl_ring *r);
void cl_ring_clear(struct cl_ring *r);
struct cl_pend *cl_ring_find(struct cl_ring *r, const char *tag, size_t taglen);
struct cl_pend *cl_ring_inflight(struct cl_ring *r);
void cl_pend_flush(struct client *c);
void cl_pend_answer(struct client *c, struct cl_pend *p, const char *text);
void cl_pend_unavailable(struct client *c, struct cl_pend *p);
void cl_plog(struct client *c, const char *command, const char *params,
    uint64_t rq, uint64_t rp, uint64_t started_us, const char *context);
void cl_plog_local(struct client *c, const struct imap_tok *cmd, size_t rq);
char *cl_plog_params(const char *line, size_t len, const struct imap_tok *cmd);
const char *cl_line_tag(const char *line, size_t len,
    char tag[IMAPSHIM_TAG_MAX + 1]);

/* client_relay.c: after login */
void cl_auth_frame(struct client *c, const struct imap_frame *fr,
    const char *line, struct evbuffer *in);
bool cl_read_allowed(struct client *c, struct evbuffer *in);
void cl_lease(struct client *c, struct upstream *u);
void cl_unblock(struct client *c);
void cl_idle_send(struct client *c);

/* client_park.c: multiplex */
void cl_touch(struct client *c);
void cl_lru_remove(struct client *c);
bool cl_parkable(struct client *c);
void cl_park(struct client *c);
void cl_snapshot(struct client *c);
void cl_attach(struct client *c, enum cl_state how);
void cl_attach_granted(struct client *c);
void cl_attach_failed(struct client *c, enum pool_fail why,
    const char *explain);
void cl_park_timer_apply(struct client *c);
void cl_park_timer_cb(evutil_socket_t fd, short what, void *arg);
/* IDLE polls (DESIGN 3.4 M10): the pool's answer to a poll asked while
 * PARKED_IDLE (the client's DONE withdraws it: cl_waiter_end). */
void cl_poll_granted(struct client *c);
void cl_poll_failed(struct client *c);
/* When the next poll is due: one interval after the last one ran
 * (last_ran_ms, 0: none) if that is still ahead, else now + r, r drawn
 * uniformly from [0, interval): clients that parked together poll spread
 * over the whole interval, and a late poll moves the next one back. */
uint64_t cl_poll_due(uint64_t now_ms, uint64_t last_ran_ms,
    uint64_t interval_ms, uint64_t r);

/* client_recover.c: after an upstream loss */
void cl_replay_release(struct client *c);
void cl_prepare_rerun(struct client *c, struct cl_pend *p, const char *line,
    size_t len, const struct imap_tok *cmd);
char *cl_keep_room(struct client *c, size_t len);
void cl_keep(struct client *c, const char *data, size_t len);
int cl_append_msgid(const char *buf, size_t len, char *out, size_t outlen);
void cl_up_lost(void *arg, const char *reason);
void cl_command_overdue(struct client *c);
void cl_recover(struct client *c, enum cl_redo what);
void cl_reattach(struct client *c);
void cl_recover_granted(struct client *c);
void cl_recover_failed(struct client *c);
void cl_recover_done_idle(struct client *c);
void cl_swap_upstream(struct client *c);
/* Lost again while getting back on a session (attach, resync, recovery):
 * forget the upstream; true while another try is allowed (fewer than
 * CL_RECOVER_TRIES in a row), else the client is closed for reason with
 * "The connection to Exchange was lost." */
bool cl_lost_again(struct client *c, const char *reason);

#endif
