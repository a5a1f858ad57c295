/*
 * upstream.h - one IMAP connection from imapshim to an Exchange CAS.
 *
 * Owns the upstream session: its bufferevent (and SSL), its state machine
 * (connect, TLS, greeting, STARTTLS, CAPABILITY, LOGIN, ready, LOGOUT), the
 * capabilities the server announced, and Exchange's per-connection
 * counters (tagged NO and BAD responses).  It never calls into client.c by
 * name: its lessee registers callbacks and receives readiness, failures and
 * response frames through them.
 *
 * Lifetime: upstream_new() starts connecting; the object lives until
 * upstream_close(), after which it flushes, sends LOGOUT when it can, and is
 * freed by the reaper.  Callbacks never fire after upstream_close().
 */
#ifndef UPSTREAM_H
#define UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

#include "config.h"
#include "imap_parse.h"

struct event_base;
struct evdns_base;
struct evbuffer;
struct upstream;

enum up_state {
	UP_S_CONNECTING,	/* name lookup and TCP connect */
	UP_S_HANDSHAKE,		/* TLS handshake */
	UP_S_GREETING,		/* waiting for "* OK" */
	UP_S_STARTTLS,		/* STARTTLS sent */
	UP_S_CAPABILITY,	/* CAPABILITY sent (before or after LOGIN) */
	UP_S_LOGIN,		/* LOGIN sent */
	UP_S_READY,		/* logged in: relaying for its lessee */
	UP_S_CLOSING,		/* LOGOUT sent or flushing; then reaped */
	UP_S_COUNT
};

/* Why a session failed before it was ready. */
enum up_fail {
	UP_FAIL_CONNECT,	/* lookup, refused, unreachable, connect timeout */
	UP_FAIL_TLS,		/* handshake failed */
	UP_FAIL_CERT,		/* certificate verification failed */
	UP_FAIL_GREETING,	/* BYE greeting, or not IMAP */
	UP_FAIL_LOGIN,		/* tagged NO/BAD to LOGIN; text in reason */
	UP_FAIL_TIMEOUT,	/* greeting or login took too long */
	UP_FAIL_PROTOCOL,	/* unparseable reply, LOGINDISABLED, lost mid-login */
	UP_FAIL_COUNT
};

struct upstream_params {
	const char *host;		/* endpoint as written in servers */
	const char *port;
	enum config_tls_mode tls;
	SSL_CTX *ssl_ctx;		/* NULL with CFG_TLS_NONE */
	const char *tls_name;		/* SNI and host-name check */
	bool tls_verify;
	const char *login_user;		/* expanded login_format */
	const char *password;
	uint64_t connect_timeout_ms;	/* connect + TLS + greeting */
	uint64_t login_timeout_ms;	/* CAPABILITY + LOGIN */
	/* Called once when the socket is finally closed and the object freed
	 * (the pool's budget slot ends there), whoever the lessee was. */
	void (*on_free)(void *free_arg);
	void *free_arg;
};

struct upstream_cbs {
	/* Logged in; the lessee may now write commands. */
	void (*ready)(void *arg);
	/* Failed before ready; the upstream is closed after this returns. */
	void (*failed)(void *arg, enum up_fail why, const char *reason);
	/*
	 * One response frame arrived while ready.  resp describes the first
	 * line of a response (NULL for continuation lines and literal
	 * octets).  The callee must consume exactly fr->len bytes from the
	 * head of in (evbuffer_remove_buffer to relay, evbuffer_drain to
	 * hide).
	 */
	void (*frame)(void *arg, const struct imap_frame *fr,
	    const struct imap_resp *resp, struct evbuffer *in);
	/* Lost after ready (server BYE, reset, EOF); closed after this. */
	void (*lost)(void *arg, const char *reason);
	/* Output fell below RELAY_LOWAT after having been above RELAY_HIWAT. */
	void (*writable)(void *arg);
	/* Every frame of one read has gone to frame (optional): the moment
	 * to send on what they produced, in one piece. */
	void (*read_done)(void *arg);
};

struct upstream *upstream_new(struct event_base *base, struct evdns_base *dns,
    const struct upstream_params *p, const struct upstream_cbs *cbs,
    void *arg);

/* Stop delivering callbacks, LOGOUT when at a clean boundary, flush, reap.
 * The lessee must have ended any command it was sending (no literal half
 * sent, DONE written after IDLE); otherwise it calls upstream_abort(). */
void upstream_close(struct upstream *u, const char *reason);
/* Close without LOGOUT: the command stream is not at a boundary. */
void upstream_abort(struct upstream *u, const char *reason);

/* Where the lessee writes command bytes (state READY only). */
struct evbuffer *upstream_output(struct upstream *u);
/* What has been queued on upstream_output() goes out now (one command). */
void upstream_flush(struct upstream *u);
/* True when the output passed RELAY_HIWAT (the lessee should stop reading
 * its client until the writable callback). */
bool upstream_output_full(struct upstream *u);
/* Stop or resume reading responses (the client's output is full). */
void upstream_pause(struct upstream *u, bool pause);

/* True when the last response was cut off part way (a line or a literal
 * half relayed): whoever received its first bytes has a broken stream. */
bool upstream_response_incomplete(const struct upstream *u);

/* Capability atoms the server announced after login, upper case. */
bool upstream_has_cap(const struct upstream *u, const char *cap);
/* Iterate announced capabilities: returns the i-th, or NULL past the end. */
const char *upstream_cap(const struct upstream *u, size_t i);

uint64_t upstream_id(const struct upstream *u);
/* Upstream sessions alive, in any state (not yet reaped). */
unsigned upstream_count(void);
/* Free every upstream at exit, LOGOUT sent or not. */
void upstream_free_all(void);
enum up_state upstream_state(const struct upstream *u);
const char *upstream_state_name(enum up_state st);
const char *upstream_fail_name(enum up_fail why);
/* Tagged NO and BAD responses seen on this connection (Exchange counts);
 * *bad_r (when not NULL) gets the BADs alone. */
unsigned upstream_failed_responses(const struct upstream *u, unsigned *bad_r);

/* Hand a ready session to a new lessee: callbacks from now on go to cbs and
 * arg.  (NULL: nobody; responses are dropped and a loss is reported only
 * through on_free.) */
void upstream_set_lessee(struct upstream *u, const struct upstream_cbs *cbs,
    void *arg);

/*
 * Run an internal command ("NOOP", "EXAMINE INBOX", "UNSELECT") on a ready
 * session nobody is relaying on; every response to it is hidden.
 * done(arg, ok) is called once, later: ok when the server answered OK,
 * false on NO/BAD or when the session was lost first (the session is then
 * closing).  Returns 0, or -1 when the session is not ready or busy.
 */
int upstream_command(struct upstream *u, const char *cmd,
    void (*done)(void *arg, bool ok), void *arg);
/* The same, with line(arg, text, len) called for the first line of each
 * untagged response to it (e.g. "* SEARCH 4 7", "* OK [UIDVALIDITY 3]"). */
int upstream_command_lines(struct upstream *u, const char *cmd,
    void (*line)(void *arg, const char *text, size_t len),
    void (*done)(void *arg, bool ok), void *arg);

/* Free the TLS record buffers of every upstream connection not in the
 * middle of a record (OpenSSL allocates them again at the next one).
 * Called every few seconds, never per command. */
void upstream_trim(void);

#endif
