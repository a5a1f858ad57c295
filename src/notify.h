/*
 * notify.h - what imapshim tells the service manager (sd_notify(3)).
 *
 * Owns the notify protocol: READY, RELOADING, STOPPING, STATUS and the
 * watchdog ping, and the two timers that send the periodic ones (STATUS
 * with the load, WATCHDOG=1 from the event loop, so a stuck loop stops the
 * pings and systemd restarts the process).  Nothing is sent unless
 * NOTIFY_SOCKET is set (systemd sets it for a Type=notify unit).  Built
 * without libsystemd (configure --without-systemd) every call is a no-op.
 */
#ifndef NOTIFY_H
#define NOTIFY_H

#include <stdbool.h>
#include <stddef.h>

struct event_base;

/* The load the periodic STATUS shows; filled by the caller's callback. */
struct notify_load {
	unsigned nl_unauthenticated;	/* clients by state (imapshim_clients) */
	unsigned nl_attached;
	unsigned nl_parked;
	unsigned nl_waiting;
	unsigned nl_sessions;		/* upstream sessions, any state */
	unsigned nl_budget;		/* session_budget */
};
typedef void (*notify_load_fn)(struct notify_load *l_r);

/* Refresh the load STATUS this often. */
#define NOTIFY_STATUS_INTERVAL_MS 5000

/* True when built with libsystemd ("imapshim -V" lists it). */
bool notify_supported(void);

/* Start the watchdog timer (when systemd asked for one: WATCHDOG_USEC,
 * WATCHDOG_PID) and the periodic load STATUS, which calls load.  Returns
 * 0, or -1 when a timer cannot be created.  No-op without NOTIFY_SOCKET. */
int notify_start(struct event_base *base, notify_load_fn load);
/* Free the timers (before the event base goes). */
void notify_stop(void);

/* READY=1 with a STATUS line (start-up done, or a reload's result). */
void notify_ready(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* RELOADING=1 (with MONOTONIC_USEC, as systemd 253's notify-reload wants). */
void notify_reloading(void);
/* STOPPING=1: the drain began; later load STATUS lines say "draining". */
void notify_stopping(void);
void notify_status(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * The load STATUS text: "clients 1234 (attached 10, parked 1200, waiting
 * 24); upstream 16/16", prefixed "draining; " once stopping.  "clients"
 * counts every state, the unauthenticated ones included.  Returns buf.
 */
const char *notify_load_text(char *buf, size_t len,
    const struct notify_load *l, bool stopping);

#endif
