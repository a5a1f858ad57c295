/*
 * notify.c - the service manager's notify protocol (sd_notify(3)).
 *
 * Everything here but the three back-end functions in the one #ifdef
 * region is the same with and without libsystemd: without it the back end
 * says "not under a service manager", so notify_start() arms nothing and
 * every message is dropped before it is formatted.
 */
#include "notify.h"

#include <event2/event.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "log.h"
#include "util.h"

/* A STATUS line: one line of "systemctl status", so short. */
#define NOTIFY_MSG_MAX 512

static bool nt_on;		/* NOTIFY_SOCKET set and libsystemd built in */
static bool nt_stopping;
static bool nt_send_failed;	/* logged once, not at every ping */
static notify_load_fn nt_load;
static struct event *nt_watchdog_ev;
static struct event *nt_status_ev;

#ifdef HAVE_SYSTEMD
#include <systemd/sd-daemon.h>

bool
notify_supported(void)
{
	return true;
}

static bool
notify_backend_on(void)
{
	return getenv("NOTIFY_SOCKET") != NULL;
}

/* Returns > 0 when sent, 0 when there is nowhere to send, < 0 on error. */
static int
notify_backend_send(const char *msg)
{
	return sd_notify(0, msg);
}

/* The watchdog interval systemd asked this process for, 0 for none.
 * sd_watchdog_enabled() honours WATCHDOG_PID (another process's watchdog
 * is not ours) and treats a missing WATCHDOG_PID as ours. */
static uint64_t
notify_backend_watchdog_usec(void)
{
	uint64_t usec = 0;
	int rc = sd_watchdog_enabled(0, &usec);

	if (rc < 0)
		log_warn("systemd_watchdog", "result=ignored reason=\"WATCHDOG_USEC "
		    "or WATCHDOG_PID is malformed\"");
	return rc > 0 ? usec : 0;
}
#else
bool
notify_supported(void)
{
	return false;
}

static bool
notify_backend_on(void)
{
	return false;
}

static int
notify_backend_send(const char *msg)
{
	(void)msg;
	return 0;
}

static uint64_t
notify_backend_watchdog_usec(void)
{
	return 0;
}
#endif

static void
notify_send(const char *msg)
{
	if (notify_backend_send(msg) < 0 && !nt_send_failed) {
		nt_send_failed = true;
		log_warn("systemd_notify", "result=failed reason=\"cannot send "
		    "to NOTIFY_SOCKET\"");
	}
}

/*
 * head (e.g. "READY=1\n") then STATUS= with the formatted text.  A newline
 * would start another assignment and a control byte garbles "systemctl
 * status": both become spaces (the text may hold a file name).
 */
static void notify_sendv(const char *head, const char *fmt, va_list ap)
    __attribute__((format(printf, 2, 0)));

static void
notify_sendv(const char *head, const char *fmt, va_list ap)
{
	char msg[NOTIFY_MSG_MAX];
	int n = snprintf(msg, sizeof(msg), "%sSTATUS=", head);
	size_t i;

	IMAPSHIM_ASSERT(n > 0 && (size_t)n < sizeof(msg));
	vsnprintf(msg + n, sizeof(msg) - (size_t)n, fmt, ap);
	for (i = (size_t)n; msg[i] != '\0'; i++)
		if ((unsigned char)msg[i] < 0x20 || msg[i] == 0x7f)
			msg[i] = ' ';
	notify_send(msg);
}

void
notify_ready(const char *fmt, ...)
{
	va_list ap;

	if (!nt_on)
		return;
	va_start(ap, fmt);
	notify_sendv("READY=1\n", fmt, ap);
	va_end(ap);
}

void
notify_status(const char *fmt, ...)
{
	va_list ap;

	if (!nt_on)
		return;
	va_start(ap, fmt);
	notify_sendv("", fmt, ap);
	va_end(ap);
}

void
notify_reloading(void)
{
	char msg[96];
	struct timespec ts;

	if (!nt_on)
		return;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	snprintf(msg, sizeof(msg), "RELOADING=1\nMONOTONIC_USEC=%llu\n"
	    "STATUS=reloading", (unsigned long long)ts.tv_sec * 1000000ULL +
	    (unsigned long long)ts.tv_nsec / 1000);
	notify_send(msg);
}

void
notify_stopping(void)
{
	if (!nt_on)
		return;
	nt_stopping = true;
	notify_send("STOPPING=1\nSTATUS=draining");
}

const char *
notify_load_text(char *buf, size_t len, const struct notify_load *l,
    bool stopping)
{
	snprintf(buf, len, "%sclients %u (attached %u, parked %u, waiting %u); "
	    "upstream %u/%u", stopping ? "draining; " : "",
	    l->nl_unauthenticated + l->nl_attached + l->nl_parked +
	    l->nl_waiting, l->nl_attached, l->nl_parked, l->nl_waiting,
	    l->nl_sessions, l->nl_budget);
	return buf;
}

static void
notify_status_cb(evutil_socket_t fd, short what, void *arg)
{
	struct notify_load l;
	char text[NOTIFY_MSG_MAX - 16];

	(void)fd;
	(void)what;
	(void)arg;
	nt_load(&l);
	notify_status("%s", notify_load_text(text, sizeof(text), &l,
	    nt_stopping));
}

/* From the loop: a loop that no longer turns sends no more pings. */
static void
notify_watchdog_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	notify_send("WATCHDOG=1");
}

int
notify_start(struct event_base *base, notify_load_fn load)
{
	static const struct timeval status_tv = {
		NOTIFY_STATUS_INTERVAL_MS / 1000,
		(NOTIFY_STATUS_INTERVAL_MS % 1000) * 1000
	};
	struct timeval wd_tv;
	uint64_t wd_usec;

	IMAPSHIM_ASSERT(nt_status_ev == NULL && nt_watchdog_ev == NULL);
	if (!(nt_on = notify_backend_on()))
		return 0;
	nt_load = load;
	nt_status_ev = event_new(base, -1, EV_PERSIST, notify_status_cb, NULL);
	if (nt_status_ev == NULL || event_add(nt_status_ev, &status_tv) != 0)
		return -1;
	/* Half the interval, as sd_watchdog_enabled(3) advises: one late
	 * loop pass does not cost the process its life. */
	if ((wd_usec = notify_backend_watchdog_usec() / 2) > 0) {
		wd_tv.tv_sec = (time_t)(wd_usec / 1000000);
		wd_tv.tv_usec = (suseconds_t)(wd_usec % 1000000);
		nt_watchdog_ev = event_new(base, -1, EV_PERSIST,
		    notify_watchdog_cb, NULL);
		if (nt_watchdog_ev == NULL ||
		    event_add(nt_watchdog_ev, &wd_tv) != 0)
			return -1;
		notify_send("WATCHDOG=1");
	}
	log_info("systemd_notify", "watchdog_ms=%llu status_interval_ms=%u",
	    (unsigned long long)(wd_usec * 2 / 1000),
	    (unsigned)NOTIFY_STATUS_INTERVAL_MS);
	return 0;
}

void
notify_stop(void)
{
	if (nt_watchdog_ev != NULL)
		event_free(nt_watchdog_ev);
	if (nt_status_ev != NULL)
		event_free(nt_status_ev);
	nt_watchdog_ev = nt_status_ev = NULL;
	nt_on = false;
}
