/*
 * client.h - one IMAP session from the voice platform to imapshim.
 *
 * Owns the client session: its bufferevent (and SSL), its state machine
 * (src/DESIGN.md "Client session": before login, attached, idling, parking,
 * parked, attaching, recovering, closing), the commands it has in flight
 * and the order their replies must keep, and the upstream session it
 * leases while attached.  imapshim answers greeting, CAPABILITY, ID, NOOP,
 * LOGOUT, STARTTLS, LOGIN and AUTHENTICATE itself; after login it relays
 * every other command, parsed, to the upstream.  The module's files share
 * client_int.h; nothing else sees struct client.
 */
#ifndef CLIENT_H
#define CLIENT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include <event2/util.h>
#include <openssl/ssl.h>

struct event_base;
struct evdns_base;
struct config;
struct client;
struct upstream;

/* What every client session shares; owned by main.c. */
struct client_env {
	struct event_base *base;
	struct evdns_base *dns;
	const struct config *cfg;	/* replaced on reload */
	SSL_CTX *server_ctx;		/* NULL when no listener uses TLS */
	SSL_CTX *upstream_ctx;		/* NULL with [upstream] tls = none */
};

enum client_listener {
	CLIENT_LISTEN_IMPLICIT_TLS,	/* listen: TLS from the first byte */
	CLIENT_LISTEN_STARTTLS,		/* listen_starttls: cleartext + STARTTLS */
};

void client_init(const struct client_env *env);

/* Take over an accepted socket.  Never fails: on error the fd is closed. */
void client_new(evutil_socket_t fd, const struct sockaddr *sa, socklen_t salen,
    enum client_listener kind);

/* Sessions alive (not yet reaped). */
unsigned client_count(void);

/* What /metrics calls imapshim_clients{state}. */
enum client_kind {
	CLIENT_UNAUTHENTICATED,	/* before login (TLS, commands, auth delay) */
	CLIENT_ATTACHED,	/* logged in, holding an upstream session */
	CLIENT_PARKED,		/* logged in, holding none (multiplex mode) */
	CLIENT_WAITING,		/* waiting for an upstream session */
	CLIENT_KIND_COUNT
};
extern const char *const client_kind_names[];	/* "unauthenticated", ... */
/* Sessions of each kind, closing ones excluded. */
void client_counts(unsigned counts[CLIENT_KIND_COUNT]);

/* Close every session with "* BYE reason" (shutdown). */
void client_close_all(const char *bye);
/* At exit: close and free every session now, flushed or not. */
void client_free_all(void);

/* Give back the memory of sessions quiet for quiet_ms: TLS record buffers
 * (about 34 KiB a connection) and the copy kept for re-running a command.
 * Called every few seconds, never per command. */
void client_trim(uint64_t quiet_ms);
/* Shutting down: close sessions with no command in flight at once (with
 * "* BYE bye"), the others as soon as their command has its reply. */
void client_drain(const char *bye);
/* One session as the operator's console shows it. */
struct client_info {
	uint64_t id;
	const char *peer;		/* "address:port" */
	const char *mailbox;		/* "" before login */
	const char *admin;		/* admin account, "" before login */
	const char *state;		/* DESIGN.md A.3's state name */
	enum client_kind kind;
	uint64_t since_ms;		/* accepted at (util_now_ms clock) */
	const struct upstream *up;	/* the leased session, or NULL */
};
/* Call fn for every session not closing, oldest first. */
void client_foreach(void (*fn)(const struct client_info *ci, void *arg),
    void *arg);
/* The console's kick: end the session with this id (mailbox NULL), or
 * every session of mailbox (ASCII case-insensitive; id ignored), the way
 * client_drain() ends each: "* BYE bye" now, or once the command in
 * flight has its reply.  Returns how many sessions it ends. */
unsigned client_kick(uint64_t id, const char *mailbox, const char *bye);
/* For pool_set_pressure(): park need of the longest-idle clients. */
void client_pool_pressure(unsigned need);

#endif
