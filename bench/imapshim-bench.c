/*
 * imapshim-bench.c - an event-driven IMAP load generator for imapshim.
 *
 * One process, one libevent loop, no threads.  Every simulated client is a
 * session: a small state machine over one bufferevent (an OpenSSL one for
 * implicit TLS).  A session runs one scenario's script of commands, one
 * command in flight at a time, and records each command's latency (send to
 * tagged completion) into a fixed log-linear histogram: nothing is
 * allocated per command.
 *
 * Server responses are framed by a tiny parser: it finds lines with
 * evbuffer_search_eol() and skips a server literal "{n}" by counting n
 * octets, so literal bytes are never scanned for CRLF.  The only literal
 * whose bytes are looked at is the BODY[] of the append scenario's
 * verification FETCH, compared chunk by chunk against what was appended.
 *
 * Scenarios (see usage()):
 *   churn   connect, LOGIN, SELECT INBOX, STATUS or UID FETCH, LOGOUT, again
 *   poll    each session keeps its mailbox and polls it every P seconds:
 *           NOOP, UID SEARCH UNSEEN, STATUS INBOX
 *   steady  closed loop of NOOP, UID FETCH 1:* (FLAGS), STATUS INBOX
 *   append  ~60 KB voice messages by synchronizing literal, each verified
 *           afterwards (UID SEARCH HEADER Message-ID, UID FETCH BODY.PEEK[],
 *           byte-exact), then deleted (UID STORE \Deleted, UID EXPUNGE)
 *   idle    LOGIN, SELECT, IDLE and hold; with --pid, the target's VmRSS
 *           and Pss before the first connect and --settle seconds after
 *           the last session went idle (or at the end)
 *   storm   idle as a platform restart does it: every session at once,
 *           --connect-concurrency (default 128) of them between connect
 *           and IDLE at a time; reports how many reached IDLE and when
 *           the last one did
 *
 * idle and storm with --probe N: once settled, N sessions spread over the
 * set each end their IDLE (DONE), send NOOP and IDLE again, --probe-rounds
 * times, a random 0-1 s apart: the latency of a command while every other
 * session idles ("idle_done": DONE to the IDLE's tagged OK; "noop").
 *
 * Output: one JSON line on stdout.  Exit status 0; 1 when a verification
 * failed or errors exceeded 1% of operations; 2 on bad usage or set-up.
 *
 * Only loopback targets are accepted, and every run is bounded in time:
 * the measurement ends after --duration (or --ops), teardown gets a grace
 * period, and the loop is stopped unconditionally at duration + 30 s.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#define nitems(a)	(sizeof(a) / sizeof((a)[0]))

#define LINE_HEAD	2048		/* bytes of a response line kept */
#define LINE_TAIL	64		/* last bytes kept, for "{n}" and BODY[] */
#define LINE_LIMIT	(1024 * 1024)	/* longest response line accepted */
#define TEARDOWN_GRACE	10		/* seconds for LOGOUTs after the end */
#define HARD_EXTRA	30		/* hard stop: duration + this */
#define SETTLE_HOLD	2		/* idle: seconds held after measuring */
#define PROBE_GAP	1.0		/* --probe: rounds up to this far apart */
#define RECONNECT_MS	200		/* after an error */
#define AUDIO_RAW	44000		/* -> ~60 KB of base64 with headers */

/* ------------------------------------------------------------ commands */

enum cmd {
	C_CONNECT, C_LOGIN, C_SELECT, C_STATUS, C_FETCH, C_NOOP, C_SEARCH,
	C_APPEND, C_VSEARCH, C_VFETCH, C_STORE, C_EXPUNGE, C_IDLE, C_DONE,
	C_LOGOUT, C_COUNT
};
static const char *const cmd_names[] = {
	"connect", "login", "select", "status", "fetch", "noop", "search",
	"append", "verify_search", "verify_fetch", "store", "expunge", "idle",
	"idle_done", "logout"
};
_Static_assert(nitems(cmd_names) == C_COUNT, "cmd names out of sync");

/* ------------------------------------------------------------ errors */

enum err {
	E_CONNECT, E_TLS, E_IO, E_EOF, E_TIMEOUT, E_BYE, E_PROTOCOL, E_VERIFY,
	E_NO, E_BAD, E_UNFINISHED, E_COUNT
};
static const char *const err_names[] = {
	"connect", "tls", "io", "eof", "timeout", "bye", "protocol", "verify",
	"no", "bad", "unfinished"
};
_Static_assert(nitems(err_names) == E_COUNT, "err names out of sync");

/* ------------------------------------------------------------ histogram */

/*
 * Log-linear over microseconds: values below 2^HSUB are exact; above, each
 * power of two is split into 2^HSUB buckets (about 3% wide).
 */
#define HSUB		5
#define HSUBN		(1u << HSUB)
#define HBUCKETS	((64 - HSUB + 1) * HSUBN)

struct hist {
	uint64_t	 h_n;
	uint64_t	 h_max;
	uint64_t	 h_b[HBUCKETS];
};

static unsigned
hist_index(uint64_t v)
{
	unsigned e;

	if (v < HSUBN)
		return (unsigned)v;
	e = 63u - (unsigned)__builtin_clzll(v) - HSUB + 1;	/* v >> e in [32,64) */
	return (e + 1) * HSUBN + (unsigned)((v >> e) - HSUBN);
}

static uint64_t
hist_value(unsigned idx)		/* middle of the bucket */
{
	unsigned e;
	uint64_t lo;

	if (idx < HSUBN)
		return idx;
	e = idx / HSUBN - 1;
	lo = ((uint64_t)(idx % HSUBN) + HSUBN) << e;
	return lo + (((uint64_t)1 << e) >> 1);
}

static void
hist_add(struct hist *h, uint64_t us)
{
	h->h_b[hist_index(us)]++;
	h->h_n++;
	if (us > h->h_max)
		h->h_max = us;
}

static uint64_t
hist_pct(const struct hist *h, double p)
{
	uint64_t want, seen = 0;
	unsigned i;

	if (h->h_n == 0)
		return 0;
	want = (uint64_t)ceil(p * (double)h->h_n);
	if (want == 0)
		want = 1;
	for (i = 0; i < HBUCKETS; i++) {
		seen += h->h_b[i];
		if (seen >= want) {
			uint64_t v = hist_value(i);
			return v > h->h_max ? h->h_max : v;
		}
	}
	return h->h_max;
}

/* ------------------------------------------------------------ state */

enum scen { SC_CHURN, SC_POLL, SC_STEADY, SC_APPEND, SC_IDLE, SC_COUNT };
static const char *const scen_names[] = {
	"churn", "poll", "steady", "append", "idle"
};
_Static_assert(nitems(scen_names) == SC_COUNT, "scenario names out of sync");

enum ses_state {
	SES_S_OFF,		/* no connection; maybe a reconnect timer */
	SES_S_CONNECTING,	/* TCP connect and TLS handshake */
	SES_S_GREETING,
	SES_S_BUSY,		/* a command in flight */
	SES_S_WAITING,		/* logged in, waiting for the poll timer */
	SES_S_IDLING,		/* in IDLE after "+" */
	SES_S_DONE,		/* finished for good */
	SES_S_COUNT
};
static const char *const ses_state_names[] = {
	"off", "connecting", "greeting", "busy", "waiting", "idling", "done"
};
_Static_assert(nitems(ses_state_names) == SES_S_COUNT, "state names out of sync");

enum ses_timer { T_NONE, T_RECONNECT, T_POLL, T_PROBE };

enum again { AG_NO, AG_NOW, AG_LATER };	/* reconnect after a close? */

struct session {
	unsigned		 ses_id;
	enum ses_state		 ses_state;
	struct bufferevent	*ses_bev;
	struct event		*ses_timer;
	enum ses_timer		 ses_timer_why;
	bool			 ses_dead;	/* close queued (reaper timer) */
	bool			 ses_authed;
	bool			 ses_bye;	/* untagged BYE seen */
	bool			 ses_timeouts;	/* read/write timeouts armed */
	bool			 ses_slot;	/* holds a connect slot */
	bool			 ses_idled;	/* reached IDLE at least once */
	unsigned		 ses_mbox;
	char			 ses_user[256];
	unsigned		 ses_cycle;	/* scenario iterations begun */

	/* the command in flight */
	enum cmd		 ses_cmd;
	char			 ses_tag[16];
	size_t			 ses_taglen;
	unsigned		 ses_tagn;
	struct timespec		 ses_t0;
	bool			 ses_measured;	/* started before the end */
	bool			 ses_want_plus;	/* APPEND literal / IDLE */

	/* response framing */
	size_t			 ses_lit_left;	/* literal octets still to skip */
	bool			 ses_lit_body;	/* ... and compare to ses_msg */
	bool			 ses_cont;	/* next line continues an item */
	char			 ses_line[LINE_HEAD + 1];
	size_t			 ses_linelen;	/* bytes kept in ses_line */
	char			 ses_tail[LINE_TAIL + 1];
	size_t			 ses_taillen;

	/* append scenario */
	char			*ses_msg;	/* one buffer per session */
	size_t			 ses_msglen;
	size_t			 ses_body_off;
	bool			 ses_body_bad;
	unsigned		 ses_body_seen;
	unsigned		 ses_hits;
	uint32_t		 ses_uid;	/* from APPENDUID or SEARCH */
	uint32_t		 ses_appenduid;
	bool			 ses_skip;	/* rest of this append cycle: skip */
	struct timespec		 ses_poll_t;	/* last poll start */
	unsigned		 ses_probe;	/* --probe rounds still to go */
	SSL_SESSION		*ses_tls_sess;	/* --resume: offered next */
};

/* The target's memory as the OS sees it, KiB; -1: unknown. */
struct mem {
	long rss;	/* VmRSS */
	long pss;	/* Pss: shared pages divided between their sharers */
};

static struct {
	/* options */
	const char		*host;
	int			 port;
	bool			 tls;
	const char		*cafile;
	bool			 insecure;
	const char		*servername;
	unsigned		 sessions;
	unsigned		 mailboxes;
	unsigned		 mailbox_base;
	const char		*user_format;
	char			 password[512];
	enum scen		 scenario;
	double			 duration;
	bool			 duration_set;
	uint64_t		 ops_limit;
	double			 poll_interval;
	long			 pid;
	const char		*label;
	double			 timeout;
	double			 ramp;
	double			 settle;
	bool			 keep;
	bool			 resume;
	bool			 storm;		/* --scenario storm (idle) */
	unsigned		 conc;		/* --connect-concurrency; 0: all */
	unsigned		 probe;		/* --probe sessions */
	unsigned		 probe_rounds;
	double			 hold;		/* --hold: after the measurement */

	/* run */
	struct event_base	*base;
	SSL_CTX			*ctx;
	struct sockaddr_storage	 sa;
	socklen_t		 salen;
	struct session		*ses;
	struct timespec		 t_start, t_end;
	bool			 stopping;
	bool			 hard;
	struct event		*ev_stop, *ev_hard, *ev_grace, *ev_sig;
	struct event		*ev_settle;
	unsigned		 live;		/* sessions not DONE */
	unsigned		 idling;
	unsigned		 idling_at_end;
	unsigned		 connecting;	/* connect slots held */
	unsigned		*waitq;		/* sessions waiting for a slot */
	unsigned		 wq_head, wq_n;
	unsigned		 reached_idle;	/* sessions that idled once */
	unsigned		 probing;	/* probe sessions not finished */
	double			 all_idle_s;	/* when all first idled; <0: never */
	uint32_t		 rng;
	char			*audio;		/* shared base64 body part */
	size_t			 audio_len;

	/* results */
	uint64_t		 ops;
	uint64_t		 logins;
	uint64_t		 cycles;
	uint64_t		 appends_verified;
	uint64_t		 errors[E_COUNT];
	uint64_t		 cmd_errors[C_COUNT][2];	/* NO, BAD */
	struct hist		 hist[C_COUNT];
	struct hist		 hist_all;	/* every command but connect */
	struct mem		 mem_before, mem_after;
	uint64_t		 tls_hs[2];	/* handshakes: full, resumed */
	bool			 measured;
} B;

static void ses_connect(struct session *);
static void ses_next(struct session *);
static void ses_close(struct session *, enum err, enum again);
static void bench_stop(void);
static void probe_finished(void);
static void ses_timer_in(struct session *, enum ses_timer, double);

/* ------------------------------------------------------------ utilities */

static void
die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void
die(const char *fmt, ...)
{
	va_list ap;

	fputs("imapshim-bench: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(2);
}

static void
now(struct timespec *ts)
{
	clock_gettime(CLOCK_MONOTONIC, ts);
}

static uint64_t
elapsed_us(const struct timespec *a, const struct timespec *b)
{
	int64_t d = (int64_t)(b->tv_sec - a->tv_sec) * 1000000 +
	    (b->tv_nsec - a->tv_nsec) / 1000;
	return d < 0 ? 0 : (uint64_t)d;
}

static uint32_t
rng_next(void)				/* xorshift32 */
{
	uint32_t x = B.rng;

	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	return B.rng = x;
}

static double
rng_frac(void)				/* in [0, 1) */
{
	return (double)(rng_next() % 10000) / 10000.0;
}

static struct timeval
tv_of(double s)
{
	struct timeval tv;

	if (s < 0)
		s = 0;
	tv.tv_sec = (time_t)s;
	tv.tv_usec = (suseconds_t)((s - (double)tv.tv_sec) * 1e6);
	return tv;
}

/* The "key: N kB" line of a /proc file, -1 when absent. */
static long
proc_kib(long pid, const char *file, const char *key)
{
	char path[64], line[256];
	size_t klen = strlen(key);
	FILE *f;
	long v = -1;

	if (pid <= 0)
		return -1;
	snprintf(path, sizeof(path), "/proc/%ld/%s", pid, file);
	if ((f = fopen(path, "r")) == NULL)
		return -1;
	while (fgets(line, sizeof(line), f) != NULL)
		if (strncmp(line, key, klen) == 0) {
			v = strtol(line + klen, NULL, 10);
			break;
		}
	fclose(f);
	return v;
}

static struct mem
read_mem(long pid)
{
	struct mem m;

	m.rss = proc_kib(pid, "status", "VmRSS:");
	m.pss = proc_kib(pid, "smaps_rollup", "Pss:");
	return m;
}

/* s as an IMAP quoted string into out (2 * strlen(s) + 3 bytes); s holds
 * no CR or LF (checked when the options are read). */
static void
quote(char *out, const char *s)
{
	*out++ = '"';
	for (; *s != '\0'; s++) {
		if (*s == '"' || *s == '\\')
			*out++ = '\\';
		*out++ = *s;
	}
	*out++ = '"';
	*out = '\0';
}

/* The login name for mailbox number n: user_format with %s replaced. */
static void
make_user(char *out, size_t outlen, unsigned n)
{
	char mb[32];
	const char *p = strstr(B.user_format, "%s");
	int r;

	snprintf(mb, sizeof(mb), "mbox%05u", n);
	r = snprintf(out, outlen, "%.*s%s%s", (int)(p - B.user_format),
	    B.user_format, mb, p + 2);
	if (r < 0 || (size_t)r >= outlen)
		die("login name too long");
}

/* ------------------------------------------------------------ messages */

/* The shared audio part: base64 of pseudo-random "audio", 76-char lines. */
static void
make_audio(void)
{
	static const char b64[] =
	    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	unsigned char raw[AUDIO_RAW];
	size_t i, o = 0, col = 0;
	uint32_t x = 0x2545f491;

	memcpy(raw, "RIFF\x24\xab\x00\x00WAVEfmt ", 16);
	for (i = 16; i < sizeof(raw); i++) {
		x ^= x << 13; x ^= x >> 17; x ^= x << 5;
		raw[i] = (unsigned char)(x >> 11);
	}
	B.audio = malloc(sizeof(raw) * 2);
	if (B.audio == NULL)
		die("out of memory");
	for (i = 0; i < sizeof(raw); i += 3) {
		uint32_t v = (uint32_t)raw[i] << 16;
		size_t n = sizeof(raw) - i;

		if (n > 1)
			v |= (uint32_t)raw[i + 1] << 8;
		if (n > 2)
			v |= raw[i + 2];
		B.audio[o++] = b64[(v >> 18) & 63];
		B.audio[o++] = b64[(v >> 12) & 63];
		B.audio[o++] = n > 1 ? b64[(v >> 6) & 63] : '=';
		B.audio[o++] = n > 2 ? b64[v & 63] : '=';
		if ((col += 4) == 76) {
			B.audio[o++] = '\r';
			B.audio[o++] = '\n';
			col = 0;
		}
	}
	if (col != 0) {
		B.audio[o++] = '\r';
		B.audio[o++] = '\n';
	}
	B.audio_len = o;
}

/* Build this session's next voice message into ses_msg. */
static void
make_message(struct session *s)
{
	static const char boundary[] = "=_NuPointVM_7d1e4c2a";
	size_t cap = B.audio_len + 4096;
	int n, m;

	if (s->ses_msg == NULL && (s->ses_msg = malloc(cap)) == NULL)
		die("out of memory");
	n = snprintf(s->ses_msg, cap,
	    "From: \"NuPoint Voice Mail\" <vm@example.com>\r\n"
	    "To: <mbox%05u@example.com>\r\n"
	    "Subject: Voice Message from 555%04u (42 secs)\r\n"
	    "Date: Mon, 6 Jan 2025 10:00:00 +0000\r\n"
	    "Message-ID: <bench.%ld.%u.%u@imapshim.bench>\r\n"
	    "X-Mailer: imapshim-bench\r\n"
	    "MIME-Version: 1.0\r\n"
	    "Content-Type: multipart/mixed; boundary=\"%s\"\r\n"
	    "\r\n"
	    "This is a multi-part message in MIME format.\r\n"
	    "\r\n"
	    "--%s\r\n"
	    "Content-Type: text/plain; charset=us-ascii\r\n"
	    "\r\n"
	    "You have a new voice message (session %u, message %u).\r\n"
	    "\r\n"
	    "--%s\r\n"
	    "Content-Type: audio/wav; name=\"VoiceMessage.wav\"\r\n"
	    "Content-Transfer-Encoding: base64\r\n"
	    "Content-Disposition: attachment; filename=\"VoiceMessage.wav\"\r\n"
	    "\r\n",
	    s->ses_mbox, s->ses_cycle % 10000, (long)getpid(), s->ses_id,
	    s->ses_cycle, boundary, boundary, s->ses_id, s->ses_cycle,
	    boundary);
	if (n < 0 || (size_t)n + B.audio_len + 64 > cap)
		die("message buffer too small");
	memcpy(s->ses_msg + n, B.audio, B.audio_len);
	n += (int)B.audio_len;
	m = snprintf(s->ses_msg + n, cap - (size_t)n, "\r\n--%s--\r\n\r\n",
	    boundary);
	s->ses_msglen = (size_t)n + (size_t)m - 2;	/* + CRLF ending APPEND */
}

/* ------------------------------------------------------------ sessions */

/*
 * --connect-concurrency: a session holds one of B.conc slots from its
 * connect until it first idles or its connection closes, as a platform
 * reconnecting its mailboxes N at a time does; the others wait in order.
 */
static bool
slot_take(struct session *s)
{
	if (B.conc == 0 || s->ses_slot)
		return true;
	if (B.connecting < B.conc) {
		B.connecting++;
		s->ses_slot = true;
		return true;
	}
	B.waitq[(B.wq_head + B.wq_n++) % B.sessions] = s->ses_id;
	return false;
}

static void
slot_give(struct session *s)
{
	struct session *n;

	if (!s->ses_slot)
		return;
	s->ses_slot = false;
	if (B.wq_n == 0 || B.stopping) {
		B.connecting--;
		return;
	}
	n = &B.ses[B.waitq[B.wq_head]];
	B.wq_head = (B.wq_head + 1) % B.sessions;
	B.wq_n--;
	n->ses_slot = true;		/* handed over: connects at once */
	ses_timer_in(n, T_RECONNECT, 0);
}

static void
ses_set_state(struct session *s, enum ses_state to)
{
	if (s->ses_state == SES_S_IDLING && to != SES_S_IDLING)
		B.idling--;
	if (to == SES_S_IDLING && s->ses_state != SES_S_IDLING) {
		B.idling++;
		slot_give(s);
		if (!s->ses_idled) {
			s->ses_idled = true;
			B.reached_idle++;
		}
		if (B.idling == B.sessions && B.all_idle_s < 0) {
			struct timespec t;

			now(&t);
			B.all_idle_s = (double)elapsed_us(&B.t_start, &t) / 1e6;
		}
		/* The last one is idle: measure once the target has had
		 * --settle seconds to give its burst memory back. */
		if (B.idling == B.sessions && B.settle > 0 && !B.stopping &&
		    !B.measured) {
			struct timeval tv = tv_of(B.settle);

			evtimer_add(B.ev_settle, &tv);
		}
	}
	if (to == SES_S_DONE && s->ses_state != SES_S_DONE)
		B.live--;
	s->ses_state = to;
}

static void
ses_timeouts(struct session *s, bool on)
{
	struct timeval tv = tv_of(B.timeout);

	if (s->ses_bev == NULL || s->ses_timeouts == on)
		return;
	s->ses_timeouts = on;
	if (on)
		bufferevent_set_timeouts(s->ses_bev, &tv, &tv);
	else
		bufferevent_set_timeouts(s->ses_bev, NULL, NULL);
}

static void
ses_timer_in(struct session *s, enum ses_timer why, double secs)
{
	struct timeval tv = tv_of(secs);

	s->ses_timer_why = why;
	evtimer_add(s->ses_timer, &tv);
}

static void
count_error(enum err e)
{
	B.errors[e]++;
}

/* Send "TAG <text>" for cmd; text is built by the caller's printf. */
static void
ses_send(struct session *s, enum cmd cmd, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
ses_send(struct session *s, enum cmd cmd, const char *fmt, ...)
{
	char buf[1024];
	va_list ap;
	int n;

	s->ses_cmd = cmd;
	s->ses_taglen = (size_t)snprintf(s->ses_tag, sizeof(s->ses_tag), "b%u",
	    ++s->ses_tagn);
	s->ses_want_plus = false;
	s->ses_measured = !B.stopping;
	ses_set_state(s, SES_S_BUSY);
	ses_timeouts(s, true);
	memcpy(buf, s->ses_tag, s->ses_taglen);
	buf[s->ses_taglen] = ' ';
	va_start(ap, fmt);
	n = vsnprintf(buf + s->ses_taglen + 1, sizeof(buf) - s->ses_taglen - 1,
	    fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(buf) - s->ses_taglen - 1)
		die("command too long");
	now(&s->ses_t0);
	/* one write per command: one TLS record, one segment */
	bufferevent_write(s->ses_bev, buf, s->ses_taglen + 1 + (size_t)n);
}

static void
ses_send_login(struct session *s)
{
	char u[2 * sizeof(s->ses_user) + 3], p[2 * sizeof(B.password) + 3];

	quote(u, s->ses_user);
	quote(p, B.password);
	ses_send(s, C_LOGIN, "LOGIN %s %s\r\n", u, p);
}

static void
ses_send_append(struct session *s)
{
	s->ses_cycle++;
	make_message(s);
	s->ses_appenduid = 0;
	s->ses_uid = 0;
	s->ses_skip = false;
	ses_send(s, C_APPEND, "APPEND INBOX (\\Seen) {%zu}\r\n", s->ses_msglen);
	s->ses_want_plus = true;
}

static void
ses_logout(struct session *s)
{
	ses_send(s, C_LOGOUT, "LOGOUT\r\n");
}

/* End the IDLE in progress: its tagged OK completes "idle_done". */
static void
ses_send_done(struct session *s)
{
	s->ses_cmd = C_DONE;
	ses_set_state(s, SES_S_BUSY);
	ses_timeouts(s, true);
	now(&s->ses_t0);
	evbuffer_add(bufferevent_get_output(s->ses_bev), "DONE\r\n", 6);
}

/* The first command of a poll round (or LOGOUT when the run is over). */
static void
ses_poll_round(struct session *s)
{
	if (B.stopping) {
		ses_logout(s);
		return;
	}
	now(&s->ses_poll_t);
	s->ses_cycle++;
	ses_send(s, C_NOOP, "NOOP\r\n");
}

/* Pick the command after s->ses_cmd completed (status already handled). */
static void
ses_next(struct session *s)
{
	enum cmd done = s->ses_cmd;

	if (s->ses_dead)
		return;
	if (done == C_LOGOUT) {
		if (B.scenario == SC_CHURN && !B.stopping)
			B.cycles++;
		ses_close(s, E_COUNT, AG_NOW);
		return;
	}
	if (!s->ses_authed) {			/* after the greeting */
		if (B.stopping)
			ses_close(s, E_COUNT, AG_NO);
		else
			ses_send_login(s);
		return;
	}
	if (B.stopping) {
		ses_logout(s);
		return;
	}
	if (done == C_LOGIN) {
		ses_send(s, C_SELECT, "SELECT INBOX\r\n");
		return;
	}
	switch (B.scenario) {
	case SC_CHURN:
		if (done == C_SELECT) {
			s->ses_cycle++;
			if (s->ses_cycle % 2)
				ses_send(s, C_STATUS, "STATUS INBOX (MESSAGES "
				    "UNSEEN UIDNEXT)\r\n");
			else
				ses_send(s, C_FETCH, "UID FETCH 1:* (FLAGS)\r\n");
		} else
			ses_logout(s);
		break;
	case SC_POLL:
		switch (done) {
		case C_SELECT: {
			/* spread the first rounds over one interval */
			ses_set_state(s, SES_S_WAITING);
			ses_timeouts(s, false);
			ses_timer_in(s, T_POLL, B.poll_interval * rng_frac());
			break;
		}
		case C_NOOP:
			ses_send(s, C_SEARCH, "UID SEARCH UNSEEN\r\n");
			break;
		case C_SEARCH:
			ses_send(s, C_STATUS, "STATUS INBOX (MESSAGES UNSEEN "
			    "UIDNEXT)\r\n");
			break;
		default: {
			struct timespec t;
			double left;

			B.cycles++;
			now(&t);
			left = B.poll_interval -
			    (double)elapsed_us(&s->ses_poll_t, &t) / 1e6;
			ses_set_state(s, SES_S_WAITING);
			ses_timeouts(s, false);
			ses_timer_in(s, T_POLL, left);
			break;
		}
		}
		break;
	case SC_STEADY:
		switch (done) {
		case C_NOOP:
			ses_send(s, C_FETCH, "UID FETCH 1:* (FLAGS)\r\n");
			break;
		case C_FETCH:
			ses_send(s, C_STATUS, "STATUS INBOX (MESSAGES UNSEEN "
			    "UIDNEXT)\r\n");
			break;
		default:
			if (done == C_STATUS)
				B.cycles++;
			s->ses_cycle++;
			ses_send(s, C_NOOP, "NOOP\r\n");
			break;
		}
		break;
	case SC_APPEND:
		switch (done) {
		case C_APPEND:
			if (s->ses_skip) {	/* APPEND failed */
				ses_send_append(s);
				break;
			}
			s->ses_hits = 0;
			ses_send(s, C_VSEARCH, "UID SEARCH HEADER Message-ID "
			    "\"<bench.%ld.%u.%u@imapshim.bench>\"\r\n",
			    (long)getpid(), s->ses_id, s->ses_cycle);
			break;
		case C_VSEARCH:
			if (s->ses_skip) {
				ses_send_append(s);
				break;
			}
			s->ses_body_seen = 0;
			s->ses_body_bad = false;
			ses_send(s, C_VFETCH, "UID FETCH %" PRIu32
			    " (BODY.PEEK[])\r\n", s->ses_uid);
			break;
		case C_VFETCH:
			if (!s->ses_skip)
				B.appends_verified++;
			B.cycles++;
			if (B.keep || s->ses_skip) {
				ses_send_append(s);
				break;
			}
			ses_send(s, C_STORE, "UID STORE %" PRIu32
			    " +FLAGS.SILENT (\\Deleted)\r\n", s->ses_uid);
			break;
		case C_STORE:
			ses_send(s, C_EXPUNGE, "UID EXPUNGE %" PRIu32 "\r\n",
			    s->ses_uid);
			break;
		default:			/* SELECT, EXPUNGE */
			ses_send_append(s);
			break;
		}
		break;
	case SC_IDLE:
		/* --probe rounds (after settling): DONE, NOOP, IDLE again */
		if (done == C_SELECT || done == C_NOOP) {
			ses_send(s, C_IDLE, "IDLE\r\n");
			s->ses_want_plus = true;
		} else if (done == C_DONE && B.measured)
			ses_send(s, C_NOOP, "NOOP\r\n");
		else				/* IDLE ended early (BYE?) */
			ses_logout(s);
		break;
	case SC_COUNT:
		abort();
	}
}

static void
verify_fail(struct session *s, const char *what)
{
	if (!s->ses_skip) {
		count_error(E_VERIFY);
		fprintf(stderr, "imapshim-bench: session %u mbox%05u message %u: "
		    "verification failed: %s\n", s->ses_id, s->ses_mbox,
		    s->ses_cycle, what);
	}
	s->ses_skip = true;
}

/* A tagged completion for the command in flight. */
static void
ses_tagged(struct session *s, const char *rest)
{
	struct timespec t;
	bool ok = strncasecmp(rest, "OK", 2) == 0;
	bool no = strncasecmp(rest, "NO", 2) == 0;
	enum cmd c = s->ses_cmd;

	now(&t);
	/* IDLE was measured at its "+"; a DONE before the end is a probe's */
	if (s->ses_measured && !B.stopping && c != C_IDLE &&
	    (c != C_DONE || B.measured)) {
		B.ops++;
		hist_add(&B.hist[c], elapsed_us(&s->ses_t0, &t));
		hist_add(&B.hist_all, elapsed_us(&s->ses_t0, &t));
		if (B.ops_limit > 0 && B.ops >= B.ops_limit)
			bench_stop();
	}
	if (!ok) {
		B.cmd_errors[c][no ? 0 : 1]++;
		count_error(no ? E_NO : E_BAD);
		if (c == C_LOGIN || c == C_SELECT) {
			fprintf(stderr, "imapshim-bench: session %u %s: %s %s\n",
			    s->ses_id, s->ses_user, cmd_names[c], rest);
			ses_close(s, E_COUNT, AG_LATER);
			return;
		}
		if (c == C_APPEND || c == C_VSEARCH || c == C_VFETCH)
			s->ses_skip = true;
	}
	switch (c) {
	case C_LOGIN:
		if (ok) {
			s->ses_authed = true;
			if (!B.stopping)
				B.logins++;
		}
		break;
	case C_APPEND:
		if (ok) {
			const char *p = strstr(rest, "[APPENDUID ");
			unsigned long v, u;

			if (p != NULL && sscanf(p, "[APPENDUID %lu %lu]", &v,
			    &u) == 2)
				s->ses_appenduid = (uint32_t)u;
		}
		break;
	case C_VSEARCH:
		if (ok && s->ses_hits != 1)
			verify_fail(s, s->ses_hits == 0 ? "Message-ID not found" :
			    "Message-ID found more than once");
		else if (ok && s->ses_appenduid != 0 &&
		    s->ses_appenduid != s->ses_uid)
			verify_fail(s, "APPENDUID differs from SEARCH");
		break;
	case C_VFETCH:
		if (!ok)
			break;
		if (s->ses_body_seen != 1)
			verify_fail(s, "no single BODY[] in FETCH reply");
		else if (s->ses_body_bad || s->ses_body_off != s->ses_msglen)
			verify_fail(s, "BODY[] differs from the appended "
			    "message");
		break;
	default:
		break;
	}
	ses_next(s);
}

/* "+" continuation request. */
static void
ses_plus(struct session *s)
{
	struct evbuffer *out = bufferevent_get_output(s->ses_bev);
	struct timespec t;

	if (!s->ses_want_plus) {
		count_error(E_PROTOCOL);
		ses_close(s, E_COUNT, AG_LATER);
		return;
	}
	s->ses_want_plus = false;
	if (s->ses_cmd == C_APPEND) {
		/* make_message() left "\r\n" after the message */
		evbuffer_add(out, s->ses_msg, s->ses_msglen + 2);
		return;
	}
	/* IDLE: the "idle" latency is the time to the continuation (the
	 * probes' IDLEs after settling are not the figure) */
	now(&t);
	if (s->ses_measured && !B.stopping && !B.measured) {
		B.ops++;
		hist_add(&B.hist[C_IDLE], elapsed_us(&s->ses_t0, &t));
		hist_add(&B.hist_all, elapsed_us(&s->ses_t0, &t));
	}
	B.cycles++;
	ses_set_state(s, SES_S_IDLING);
	ses_timeouts(s, false);
	if (B.stopping)
		ses_send_done(s);
	else if (B.measured && s->ses_probe > 0) {
		if (--s->ses_probe > 0)
			ses_timer_in(s, T_PROBE, PROBE_GAP * rng_frac());
		else
			probe_finished();
	}
}

static void
ses_untagged(struct session *s, const char *line, size_t len, bool literal)
{
	const char *p = line + 2;

	if (len >= 5 && strncasecmp(p, "BYE", 3) == 0) {
		s->ses_bye = true;
		if (s->ses_cmd != C_LOGOUT) {
			count_error(E_BYE);
			fprintf(stderr, "imapshim-bench: session %u: %s\n",
			    s->ses_id, line);
		}
		return;
	}
	if (s->ses_state == SES_S_GREETING) {
		struct timespec t;

		if (strncasecmp(p, "OK", 2) != 0) {
			count_error(E_PROTOCOL);
			ses_close(s, E_COUNT, AG_LATER);
			return;
		}
		now(&t);
		if (!B.stopping)
			hist_add(&B.hist[C_CONNECT], elapsed_us(&s->ses_t0, &t));
		s->ses_cmd = C_CONNECT;
		ses_next(s);
		return;
	}
	if (s->ses_cmd == C_VSEARCH && strncasecmp(p, "SEARCH", 6) == 0) {
		const char *q = p + 6;
		char *end;

		for (;;) {
			unsigned long v;

			while (*q == ' ')
				q++;
			if (*q < '0' || *q > '9')
				break;
			v = strtoul(q, &end, 10);
			if (s->ses_hits++ == 0)
				s->ses_uid = (uint32_t)v;
			q = end;
		}
		return;
	}
	if (s->ses_cmd == C_VFETCH && literal) {
		/* "* n FETCH (UID u BODY[] {len}": the tail holds the end */
		const char *b = strstr(s->ses_tail, "BODY[] {");

		if (b != NULL) {
			s->ses_lit_body = true;
			s->ses_body_off = 0;
			s->ses_body_seen++;
		}
	}
}

/*
 * One line of a response item.  "{n}" at its end announces a literal that
 * the framer skips (or compares) before the item's next line.
 */
static void
ses_line(struct session *s)
{
	const char *line = s->ses_line;
	size_t len = s->ses_linelen;
	const char *t = s->ses_tail, *q;
	size_t tl = s->ses_taillen;
	bool first = !s->ses_cont;
	size_t lit = 0;
	bool literal = false;

	/* a literal announcement at the end: "{digits}" or "{digits+}" */
	if (tl >= 3 && t[tl - 1] == '}' && line[0] != '+') {
		q = t + tl - 2;
		if (*q == '+')
			q--;
		while (q > t && *q >= '0' && *q <= '9')
			q--;
		if (*q == '{' && q + 1 < t + tl - 1 && q[1] != '+') {
			lit = strtoul(q + 1, NULL, 10);
			literal = true;
		}
	}
	s->ses_cont = literal;
	s->ses_lit_left = lit;
	s->ses_lit_body = false;
	if (!first) {
		if (literal && s->ses_cmd == C_VFETCH &&
		    strstr(s->ses_tail, "BODY[] {") != NULL) {
			s->ses_lit_body = true;
			s->ses_body_off = 0;
			s->ses_body_seen++;
		}
		return;
	}
	if (len >= 1 && line[0] == '+') {
		ses_plus(s);
	} else if (len >= 2 && line[0] == '*' && line[1] == ' ') {
		ses_untagged(s, line, len, literal);
	} else if (s->ses_state == SES_S_BUSY && len > s->ses_taglen &&
	    memcmp(line, s->ses_tag, s->ses_taglen) == 0 &&
	    line[s->ses_taglen] == ' ') {
		if (s->ses_want_plus) {		/* e.g. APPEND refused */
			s->ses_want_plus = false;
			if (s->ses_cmd == C_APPEND)
				s->ses_skip = true;
		}
		ses_tagged(s, line + s->ses_taglen + 1);
	} else {
		count_error(E_PROTOCOL);
		fprintf(stderr, "imapshim-bench: session %u: unexpected: %.80s\n",
		    s->ses_id, line);
		ses_close(s, E_COUNT, AG_LATER);
	}
}

/* Compare n literal octets at the head of in with the appended message. */
static void
ses_compare(struct session *s, struct evbuffer *in, size_t n)
{
	static char scratch[16384];

	while (n > 0 && !s->ses_body_bad) {
		size_t k = n < sizeof(scratch) ? n : sizeof(scratch);

		if (evbuffer_copyout(in, scratch, k) != (ev_ssize_t)k ||
		    s->ses_body_off + k > s->ses_msglen ||
		    memcmp(scratch, s->ses_msg + s->ses_body_off, k) != 0) {
			s->ses_body_bad = true;
			break;
		}
		s->ses_body_off += k;
		evbuffer_drain(in, k);
		n -= k;
	}
	if (n > 0) {
		s->ses_body_off += n;
		evbuffer_drain(in, n);
	}
}

static void
ses_read_cb(struct bufferevent *bev, void *arg)
{
	struct session *s = arg;
	struct evbuffer *in = bufferevent_get_input(bev);

	while (!s->ses_dead) {
		struct evbuffer_ptr eol;
		size_t eol_len = 0, avail = evbuffer_get_length(in);

		if (avail == 0)
			break;
		if (s->ses_lit_left > 0) {
			size_t n = avail < s->ses_lit_left ? avail :
			    s->ses_lit_left;

			if (s->ses_lit_body)
				ses_compare(s, in, n);
			else
				evbuffer_drain(in, n);
			s->ses_lit_left -= n;
			continue;
		}
		eol = evbuffer_search_eol(in, NULL, &eol_len, EVBUFFER_EOL_CRLF);
		if (eol.pos < 0) {
			if (avail > LINE_LIMIT) {
				count_error(E_PROTOCOL);
				ses_close(s, E_COUNT, AG_LATER);
			}
			break;
		}
		s->ses_linelen = (size_t)eol.pos < LINE_HEAD ? (size_t)eol.pos :
		    LINE_HEAD;
		evbuffer_copyout(in, s->ses_line, s->ses_linelen);
		s->ses_line[s->ses_linelen] = '\0';
		s->ses_taillen = (size_t)eol.pos < LINE_TAIL ? (size_t)eol.pos :
		    LINE_TAIL;
		if ((size_t)eol.pos <= LINE_HEAD) {
			memcpy(s->ses_tail, s->ses_line + s->ses_linelen -
			    s->ses_taillen, s->ses_taillen);
		} else {
			struct evbuffer_ptr tp;

			evbuffer_ptr_set(in, &tp, (size_t)eol.pos -
			    s->ses_taillen, EVBUFFER_PTR_SET);
			evbuffer_copyout_from(in, &tp, s->ses_tail,
			    s->ses_taillen);
		}
		s->ses_tail[s->ses_taillen] = '\0';
		evbuffer_drain(in, (size_t)eol.pos + eol_len);
		ses_line(s);
	}
}

static enum err
classify_error(struct session *s, short what)
{
	unsigned long e;

	if (what & BEV_EVENT_TIMEOUT)
		return E_TIMEOUT;
	if (what & BEV_EVENT_EOF)
		return E_EOF;
	e = bufferevent_get_openssl_error(s->ses_bev);
	if (e != 0) {
		char buf[256];

		ERR_error_string_n(e, buf, sizeof(buf));
		fprintf(stderr, "imapshim-bench: session %u: tls: %s\n",
		    s->ses_id, buf);
		while (bufferevent_get_openssl_error(s->ses_bev) != 0)
			;
		return E_TLS;
	}
	return s->ses_state == SES_S_CONNECTING ? E_CONNECT : E_IO;
}

static void
ses_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct session *s = arg;
	enum err e;

	(void)bev;
	if (s->ses_dead)
		return;
	if (what & BEV_EVENT_CONNECTED) {
		int one = 1;

		setsockopt(bufferevent_getfd(bev), IPPROTO_TCP, TCP_NODELAY,
		    &one, sizeof(one));
		if (B.tls)
			B.tls_hs[SSL_session_reused(
			    bufferevent_openssl_get_ssl(bev)) == 1]++;
		ses_set_state(s, SES_S_GREETING);
		return;
	}
	e = classify_error(s, what);
	/* EOF after "* BYE" (LOGOUT or server shutdown) is no extra error */
	if (e == E_EOF && s->ses_bye)
		e = E_COUNT;
	if (e != E_COUNT)
		fprintf(stderr, "imapshim-bench: session %u (%s, %s): %s\n",
		    s->ses_id, ses_state_names[s->ses_state], cmd_names[s->ses_cmd],
		    err_names[e]);
	ses_close(s, e, AG_LATER);
}

/*
 * Close the connection (counting why, unless why is E_COUNT).  The bev is
 * freed from the session's timer, never inside its own callbacks.  A new
 * connection follows at once (AG_NOW, a clean LOGOUT in churn), after
 * RECONNECT_MS (AG_LATER, after an error) or never (AG_NO, or stopping).
 */
static void
ses_close(struct session *s, enum err why, enum again again)
{
	if (s->ses_dead)
		return;
	if (why != E_COUNT)
		count_error(why);
	s->ses_dead = true;
	slot_give(s);
	if (s->ses_bev != NULL)
		bufferevent_disable(s->ses_bev, EV_READ | EV_WRITE);
	evtimer_del(s->ses_timer);
	if (again != AG_NO && !B.stopping)
		ses_timer_in(s, T_RECONNECT, again == AG_NOW ? 0 :
		    RECONNECT_MS / 1000.0);
	else
		ses_timer_in(s, T_NONE, 0);
	if (s->ses_state == SES_S_IDLING)
		ses_set_state(s, SES_S_OFF);
}

static void
ses_free_bev(struct session *s)
{
	if (s->ses_bev == NULL)
		return;
	if (B.tls) {
		SSL *ssl = bufferevent_openssl_get_ssl(s->ses_bev);

		if (ssl != NULL) {
			SSL_set_quiet_shutdown(ssl, 0);
			(void)SSL_shutdown(ssl);
			/* TLS 1.3: the session of the last ticket read */
			if (B.resume && SSL_is_init_finished(ssl)) {
				SSL_SESSION_free(s->ses_tls_sess);
				s->ses_tls_sess = SSL_get1_session(ssl);
			}
		}
		ERR_clear_error();
	}
	bufferevent_free(s->ses_bev);
	s->ses_bev = NULL;
}

static void
ses_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct session *s = arg;

	(void)fd;
	(void)what;
	if (s->ses_dead) {
		ses_free_bev(s);
		s->ses_dead = false;
		if (s->ses_timer_why == T_RECONNECT && !B.stopping) {
			ses_set_state(s, SES_S_OFF);
			ses_connect(s);
		} else {
			ses_set_state(s, SES_S_DONE);
			if (B.live == 0)
				event_base_loopexit(B.base, NULL);
		}
		return;
	}
	switch (s->ses_timer_why) {
	case T_POLL:
		ses_poll_round(s);
		break;
	case T_RECONNECT:
		ses_connect(s);
		break;
	case T_PROBE:
		if (s->ses_state == SES_S_IDLING && !B.stopping)
			ses_send_done(s);
		break;
	case T_NONE:
		break;
	}
}

static void
ses_connect(struct session *s)
{
	struct bufferevent *bev;

	if (B.stopping) {
		ses_set_state(s, SES_S_DONE);
		if (B.live == 0)
			event_base_loopexit(B.base, NULL);
		return;
	}
	if (!slot_take(s))
		return;			/* slot_give() starts it */
	s->ses_authed = false;
	s->ses_bye = false;
	s->ses_cont = false;
	s->ses_lit_left = 0;
	s->ses_lit_body = false;
	s->ses_want_plus = false;
	s->ses_timeouts = false;
	s->ses_cmd = C_CONNECT;
	if (B.scenario == SC_CHURN)
		s->ses_mbox = B.mailbox_base + rng_next() % B.mailboxes;
	make_user(s->ses_user, sizeof(s->ses_user), s->ses_mbox);

	if (B.tls) {
		SSL *ssl = SSL_new(B.ctx);

		if (ssl == NULL)
			die("SSL_new failed");
		if (B.servername != NULL)
			SSL_set_tlsext_host_name(ssl, B.servername);
		if (s->ses_tls_sess != NULL)
			SSL_set_session(ssl, s->ses_tls_sess);
		if (!B.insecure) {
			X509_VERIFY_PARAM *vp = SSL_get0_param(ssl);
			const char *name = B.servername != NULL ? B.servername :
			    B.host;

			if (B.servername == NULL)
				X509_VERIFY_PARAM_set1_ip_asc(vp, name);
			else
				SSL_set1_host(ssl, name);
		}
		bev = bufferevent_openssl_socket_new(B.base, -1, ssl,
		    BUFFEREVENT_SSL_CONNECTING,
		    BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
		if (bev != NULL)
			bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
	} else
		bev = bufferevent_socket_new(B.base, -1,
		    BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
	if (bev == NULL)
		die("cannot create a bufferevent");
	s->ses_bev = bev;
	bufferevent_setcb(bev, ses_read_cb, NULL, ses_event_cb, s);
	ses_timeouts(s, true);
	ses_set_state(s, SES_S_CONNECTING);
	now(&s->ses_t0);
	s->ses_measured = !B.stopping;
	if (bufferevent_socket_connect(bev, (struct sockaddr *)&B.sa,
	    (int)B.salen) != 0) {
		ses_close(s, E_CONNECT, AG_LATER);
		return;
	}
	bufferevent_enable(bev, EV_READ | EV_WRITE);
}

/* ------------------------------------------------------------ run control */

/* The measurement is over: every session winds down (LOGOUT / DONE). */
static void
bench_stop(void)
{
	struct timeval grace = tv_of(TEARDOWN_GRACE);
	unsigned i;

	if (B.stopping)
		return;
	B.stopping = true;
	now(&B.t_end);
	if (!B.measured) {
		B.idling_at_end = B.idling;
		B.mem_after = read_mem(B.pid);
	}
	evtimer_add(B.ev_grace, &grace);
	for (i = 0; i < B.sessions; i++) {
		struct session *s = &B.ses[i];

		if (s->ses_dead)
			continue;
		/* A storm measures the way in; the way out (thousands of
		 * LOGOUTs) is no part of it: hang up. */
		if (B.storm && s->ses_state != SES_S_OFF) {
			ses_close(s, E_COUNT, AG_NO);
			continue;
		}
		switch (s->ses_state) {
		case SES_S_OFF:
			evtimer_del(s->ses_timer);
			ses_set_state(s, SES_S_DONE);
			break;
		case SES_S_WAITING:
			evtimer_del(s->ses_timer);
			ses_logout(s);
			break;
		case SES_S_IDLING:
			ses_send_done(s);
			break;
		case SES_S_CONNECTING:
		case SES_S_GREETING:
			ses_close(s, E_COUNT, AG_NO);
			break;
		default:			/* BUSY: ses_next sends LOGOUT */
			break;
		}
	}
	if (B.live == 0)
		event_base_loopexit(B.base, NULL);
}

static void
stop_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd; (void)what; (void)arg;
	bench_stop();
}

/* The measurement is done: the sessions hold --hold seconds more for a
 * driver's own samples (it may end the run sooner with SIGINT). */
static void
hold_then_stop(void)
{
	struct timeval hold = tv_of(B.hold);

	evtimer_del(B.ev_stop);
	evtimer_add(B.ev_stop, &hold);
}

/* A probe session has done its rounds; after the last, a line on stderr
 * tells a driver that every session is idle again. */
static void
probe_finished(void)
{
	if (--B.probing > 0)
		return;
	fprintf(stderr, "imapshim-bench: probed: %u sessions, %u rounds each\n",
	    B.probe < B.sessions ? B.probe : B.sessions, B.probe_rounds);
	fflush(stderr);
	hold_then_stop();
}

/* --probe sessions, spread evenly over the set, start their rounds. */
static void
probe_start(void)
{
	unsigned k;

	B.probing = B.probe < B.sessions ? B.probe : B.sessions;
	for (k = 0; k < B.probing; k++) {
		struct session *s = &B.ses[(size_t)k * B.sessions / B.probing];

		s->ses_probe = B.probe_rounds;
		ses_timer_in(s, T_PROBE, PROBE_GAP * rng_frac());
	}
}

/* Every session has idled for --settle seconds: the memory figure, then
 * the probes (--probe) or the end of the run.  A line on stderr tells a
 * driver to take its own samples now. */
static void
settle_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd; (void)what; (void)arg;
	if (B.idling != B.sessions || B.stopping)
		return;
	B.measured = true;
	B.idling_at_end = B.idling;
	B.mem_after = read_mem(B.pid);
	fprintf(stderr, "imapshim-bench: settled: %u sessions idle\n", B.idling);
	fflush(stderr);
	if (B.probe > 0)
		probe_start();		/* the duration still bounds them */
	else
		hold_then_stop();
}

static void
grace_cb(evutil_socket_t fd, short what, void *arg)
{
	unsigned i;

	(void)fd; (void)what; (void)arg;
	for (i = 0; i < B.sessions; i++)
		if (B.ses[i].ses_state != SES_S_DONE) {
			count_error(E_UNFINISHED);
			ses_free_bev(&B.ses[i]);
		}
	event_base_loopexit(B.base, NULL);
}

static void
hard_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd; (void)what; (void)arg;
	B.hard = true;
	if (!B.stopping)
		now(&B.t_end);
	event_base_loopbreak(B.base);
}

static void
sig_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd; (void)what; (void)arg;
	if (B.stopping)
		event_base_loopbreak(B.base);
	else
		bench_stop();
}

/* ------------------------------------------------------------ output */

static void
print_ms(const char *name, uint64_t us, bool comma)
{
	printf("\"%s\":%.3f%s", name, (double)us / 1000.0, comma ? "," : "");
}

/* ,"name_kib_before":..,"name_kib_after":..,"name_per_session_kib":.. */
static void
print_mem(const char *name, long before, long after)
{
	unsigned n = B.scenario == SC_IDLE ? B.idling_at_end : B.sessions;

	printf(",\"%s_kib_before\":", name);
	if (before >= 0)
		printf("%ld", before);
	else
		printf("null");
	printf(",\"%s_kib_after\":", name);
	if (after >= 0)
		printf("%ld", after);
	else
		printf("null");
	printf(",\"%s_per_session_kib\":", name);
	if (before >= 0 && after >= 0 && n > 0)
		printf("%.2f", (double)(after - before) / n);
	else
		printf("null");
}

static void
print_report(void)
{
	double secs = (double)elapsed_us(&B.t_start, &B.t_end) / 1e6;
	uint64_t nerr = 0;
	unsigned i;
	bool first;

	if (secs <= 0)
		secs = 1e-6;
	for (i = 0; i < E_COUNT; i++)
		nerr += B.errors[i];
	printf("{\"label\":\"");
	for (const char *p = B.label; *p != '\0'; p++)
		if (*p == '"' || *p == '\\')
			printf("\\%c", *p);
		else if ((unsigned char)*p >= 0x20)
			putchar(*p);
	printf("\",\"scenario\":\"%s\",\"tls\":%s,\"sessions\":%u,"
	    "\"mailboxes\":%u,\"duration_s\":%.3f,\"ops\":%" PRIu64
	    ",\"ops_per_s\":%.1f,\"logins\":%" PRIu64 ",\"logins_per_s\":%.1f,"
	    "\"cycles\":%" PRIu64 ",\"cycles_per_s\":%.1f,",
	    B.storm ? "storm" : scen_names[B.scenario],
	    B.tls ? "true" : "false", B.sessions,
	    B.mailboxes, secs, B.ops, (double)B.ops / secs, B.logins,
	    (double)B.logins / secs, B.cycles, (double)B.cycles / secs);
	if (B.scenario == SC_APPEND)
		printf("\"appends_verified\":%" PRIu64 ",", B.appends_verified);
	if (B.scenario == SC_IDLE) {
		printf("\"idling\":%u,\"reached_idle\":%u,"
		    "\"connect_concurrency\":%u,\"all_idle_s\":", B.idling_at_end,
		    B.reached_idle, B.conc);
		if (B.all_idle_s >= 0)
			printf("%.3f,", B.all_idle_s);
		else
			printf("null,");
		if (B.probe > 0)
			printf("\"probe_sessions\":%u,\"probe_rounds\":%u,"
			    "\"probe_unfinished\":%u,", B.probe < B.sessions ?
			    B.probe : B.sessions, B.probe_rounds, B.probing);
	}
	printf("\"handshakes_full\":%" PRIu64 ",\"handshakes_resumed\":%"
	    PRIu64 ",",
	    B.tls_hs[0], B.tls_hs[1]);
	printf("\"errors_total\":%" PRIu64 ",\"errors\":{", nerr);
	first = true;
	for (i = 0; i < E_COUNT; i++) {
		if (B.errors[i] == 0 || i == E_NO || i == E_BAD)
			continue;
		printf("%s\"%s\":%" PRIu64, first ? "" : ",", err_names[i],
		    B.errors[i]);
		first = false;
	}
	for (i = 0; i < C_COUNT; i++)
		for (unsigned k = 0; k < 2; k++) {
			if (B.cmd_errors[i][k] == 0)
				continue;
			printf("%s\"%s_%s\":%" PRIu64, first ? "" : ",",
			    k == 0 ? "no" : "bad", cmd_names[i],
			    B.cmd_errors[i][k]);
			first = false;
		}
	printf("},\"latency_ms\":{");
	first = true;
	for (i = 0; i <= C_COUNT; i++) {
		const struct hist *h = i == C_COUNT ? &B.hist_all : &B.hist[i];

		if (h->h_n == 0)
			continue;
		printf("%s\"%s\":{", first ? "" : ",",
		    i == C_COUNT ? "all" : cmd_names[i]);
		print_ms("p50", hist_pct(h, 0.50), true);
		print_ms("p90", hist_pct(h, 0.90), true);
		print_ms("p99", hist_pct(h, 0.99), true);
		print_ms("max", h->h_max, true);
		printf("\"n\":%" PRIu64 "}", h->h_n);
		first = false;
	}
	printf("}");
	print_mem("rss", B.mem_before.rss, B.mem_after.rss);
	print_mem("pss", B.mem_before.pss, B.mem_after.pss);
	printf(",\"settled\":%s,\"hard_stop\":%s}\n",
	    B.measured ? "true" : "false", B.hard ? "true" : "false");
	fflush(stdout);
}

/* ------------------------------------------------------------ setup */

static void
usage(void)
{
	fprintf(stderr,
"usage: imapshim-bench --port N [options]\n"
"  --host ADDR          127.0.0.1 (default) or ::1; nothing else is accepted\n"
"  --port N             target port\n"
"  --tls | --plain      implicit TLS (default) or cleartext\n"
"  --cafile FILE        CA to verify the server against (TLS)\n"
"  --servername NAME    SNI and the name to verify (default: the address)\n"
"  --insecure           do not verify the server certificate\n"
"  --sessions N         concurrent sessions (default 10)\n"
"  --mailboxes M        mailboxes mbox%%05d used (default: sessions)\n"
"  --mailbox-base N     first mailbox number (default 0)\n"
"  --user-format FMT    login name, %%s = mailbox (default example.com/NPUMAdmin1/%%s)\n"
"  --password-file F    the password (first line)\n"
"  --scenario S         churn, poll, steady, append, idle or storm\n"
"                       (default steady)\n"
"  --duration S         measured seconds (default 10; 120 cap with --ops)\n"
"  --ops N              stop after N operations\n"
"  --poll-interval S    poll scenario interval (default 5)\n"
"  --timeout S          per-command timeout (default 30)\n"
"  --ramp S             spread session starts over S seconds (default 0)\n"
"  --connect-concurrency N  at most N sessions between connect and their\n"
"                       first IDLE (or close) at once (storm: 128; 0: all)\n"
"  --keep               append: keep messages (default: delete after check)\n"
"  --resume             offer each session's last TLS session on reconnect\n"
"  --pid PID            report this process's VmRSS and Pss before and after\n"
"  --settle S           idle: measure and stop S s after the last session idles\n"
"  --hold S             idle: hold S s after that (default 2; SIGINT ends it)\n"
"  --probe N            idle: after settling, N sessions each DONE, NOOP, IDLE\n"
"  --probe-rounds R     ... R times, a random 0-1 s apart (default 5)\n"
"  --label STR          copied into the JSON line\n"
"Prints one JSON line.  Exit 1: a verification failed or errors > 1%% of ops.\n");
	exit(2);
}

static double
opt_num(const char *name, const char *v, double lo, double hi)
{
	char *end;
	double d;

	errno = 0;
	d = strtod(v, &end);
	if (errno != 0 || end == v || *end != '\0' || d < lo || d > hi)
		die("--%s: '%s' is not a number in [%g, %g]", name, v, lo, hi);
	return d;
}

static void
read_password(const char *path)
{
	FILE *f = fopen(path, "r");
	size_t n;

	if (f == NULL)
		die("%s: %s", path, strerror(errno));
	if (fgets(B.password, sizeof(B.password), f) == NULL)
		B.password[0] = '\0';
	fclose(f);
	n = strcspn(B.password, "\r\n");
	B.password[n] = '\0';
}

static void
parse_args(int argc, char **argv)
{
	enum { O_HOST = 256, O_PORT, O_TLS, O_PLAIN, O_CAFILE, O_INSECURE,
	    O_SNI, O_SESSIONS, O_MAILBOXES, O_MBASE, O_USERFMT, O_PWFILE,
	    O_SCEN, O_DURATION, O_OPS, O_POLL, O_PID, O_LABEL, O_TIMEOUT,
	    O_RAMP, O_SETTLE, O_KEEP, O_RESUME, O_CONC, O_HOLD, O_PROBE,
	    O_PROBE_ROUNDS, O_HELP };
	static const struct option opts[] = {
		{ "host", required_argument, NULL, O_HOST },
		{ "port", required_argument, NULL, O_PORT },
		{ "tls", no_argument, NULL, O_TLS },
		{ "plain", no_argument, NULL, O_PLAIN },
		{ "cafile", required_argument, NULL, O_CAFILE },
		{ "insecure", no_argument, NULL, O_INSECURE },
		{ "servername", required_argument, NULL, O_SNI },
		{ "sessions", required_argument, NULL, O_SESSIONS },
		{ "mailboxes", required_argument, NULL, O_MAILBOXES },
		{ "mailbox-base", required_argument, NULL, O_MBASE },
		{ "user-format", required_argument, NULL, O_USERFMT },
		{ "password-file", required_argument, NULL, O_PWFILE },
		{ "scenario", required_argument, NULL, O_SCEN },
		{ "duration", required_argument, NULL, O_DURATION },
		{ "ops", required_argument, NULL, O_OPS },
		{ "poll-interval", required_argument, NULL, O_POLL },
		{ "pid", required_argument, NULL, O_PID },
		{ "label", required_argument, NULL, O_LABEL },
		{ "timeout", required_argument, NULL, O_TIMEOUT },
		{ "ramp", required_argument, NULL, O_RAMP },
		{ "settle", required_argument, NULL, O_SETTLE },
		{ "keep", no_argument, NULL, O_KEEP },
		{ "resume", no_argument, NULL, O_RESUME },
		{ "connect-concurrency", required_argument, NULL, O_CONC },
		{ "hold", required_argument, NULL, O_HOLD },
		{ "probe", required_argument, NULL, O_PROBE },
		{ "probe-rounds", required_argument, NULL, O_PROBE_ROUNDS },
		{ "help", no_argument, NULL, O_HELP },
		{ NULL, 0, NULL, 0 }
	};
	const char *pwfile = NULL;
	bool conc_set = false;
	int c;
	unsigned i;
	const char *p;

	B.host = "127.0.0.1";
	B.tls = true;
	B.sessions = 10;
	B.user_format = "example.com/NPUMAdmin1/%s";
	B.scenario = SC_STEADY;
	B.duration = 10;
	B.poll_interval = 5;
	B.label = "";
	B.timeout = 30;
	B.pid = -1;
	B.hold = SETTLE_HOLD;
	B.probe_rounds = 5;
	while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (c) {
		case O_HOST: B.host = optarg; break;
		case O_PORT: B.port = (int)opt_num("port", optarg, 1, 65535); break;
		case O_TLS: B.tls = true; break;
		case O_PLAIN: B.tls = false; break;
		case O_CAFILE: B.cafile = optarg; break;
		case O_INSECURE: B.insecure = true; break;
		case O_SNI: B.servername = optarg; break;
		case O_SESSIONS:
			B.sessions = (unsigned)opt_num("sessions", optarg, 1, 50000);
			break;
		case O_MAILBOXES:
			B.mailboxes = (unsigned)opt_num("mailboxes", optarg, 1, 99999);
			break;
		case O_MBASE:
			B.mailbox_base = (unsigned)opt_num("mailbox-base", optarg, 0,
			    99999);
			break;
		case O_USERFMT: B.user_format = optarg; break;
		case O_PWFILE: pwfile = optarg; break;
		case O_SCEN:
			if (strcmp(optarg, "storm") == 0) {
				/* The idle script, started as a storm. */
				B.storm = true;
				B.scenario = SC_IDLE;
				if (!conc_set)
					B.conc = 128;
				break;
			}
			for (i = 0; i < SC_COUNT; i++)
				if (strcmp(optarg, scen_names[i]) == 0)
					break;
			if (i == SC_COUNT)
				die("--scenario: unknown '%s'", optarg);
			B.scenario = (enum scen)i;
			break;
		case O_DURATION:
			B.duration = opt_num("duration", optarg, 0.1, 3600);
			B.duration_set = true;
			break;
		case O_OPS:
			B.ops_limit = (uint64_t)opt_num("ops", optarg, 1, 1e12);
			break;
		case O_POLL:
			B.poll_interval = opt_num("poll-interval", optarg, 0.01, 3600);
			break;
		case O_PID: B.pid = (long)opt_num("pid", optarg, 1, 1e9); break;
		case O_LABEL: B.label = optarg; break;
		case O_TIMEOUT:
			B.timeout = opt_num("timeout", optarg, 0.1, 600);
			break;
		case O_RAMP: B.ramp = opt_num("ramp", optarg, 0, 600); break;
		case O_SETTLE: B.settle = opt_num("settle", optarg, 0, 600); break;
		case O_KEEP: B.keep = true; break;
		case O_RESUME: B.resume = true; break;
		case O_CONC:
			B.conc = (unsigned)opt_num("connect-concurrency", optarg,
			    0, 50000);
			conc_set = true;
			break;
		case O_HOLD: B.hold = opt_num("hold", optarg, 0, 3600); break;
		case O_PROBE:
			B.probe = (unsigned)opt_num("probe", optarg, 0, 50000);
			break;
		case O_PROBE_ROUNDS:
			B.probe_rounds = (unsigned)opt_num("probe-rounds", optarg, 1,
			    1000);
			break;
		default: usage();
		}
	}
	if (optind != argc || B.port == 0)
		usage();
	if (B.ops_limit > 0 && !B.duration_set)
		B.duration = 120;
	if (B.mailboxes == 0)
		B.mailboxes = B.sessions;
	if (B.mailbox_base + B.mailboxes > 100000)
		die("--mailbox-base + --mailboxes exceeds mbox99999");
	if ((p = strstr(B.user_format, "%s")) == NULL ||
	    strchr(p + 2, '%') != NULL || strchr(B.user_format, '%') != p)
		die("--user-format must hold exactly one %%s and no other %%");
	if (strpbrk(B.user_format, "\r\n") != NULL)
		die("--user-format must not hold CR or LF");
	if (pwfile == NULL)
		die("--password-file is required");
	read_password(pwfile);
	if (B.tls && !B.insecure && B.cafile == NULL)
		die("--tls needs --cafile (or --insecure)");
	if (B.servername != NULL && strchr(B.servername, '%') != NULL)
		die("--servername: bad name");
}

/* Only loopback: this tool must not become a load tool against others. */
static void
resolve_target(void)
{
	struct sockaddr_in *sin = (struct sockaddr_in *)&B.sa;
	struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&B.sa;

	memset(&B.sa, 0, sizeof(B.sa));
	if (strcmp(B.host, "localhost") == 0)
		B.host = "127.0.0.1";
	if (inet_pton(AF_INET, B.host, &sin->sin_addr) == 1) {
		if (ntohl(sin->sin_addr.s_addr) != INADDR_LOOPBACK)
			die("refusing target %s: only 127.0.0.1 and ::1", B.host);
		sin->sin_family = AF_INET;
		sin->sin_port = htons((uint16_t)B.port);
		B.salen = sizeof(*sin);
	} else if (inet_pton(AF_INET6, B.host, &sin6->sin6_addr) == 1) {
		if (!IN6_IS_ADDR_LOOPBACK(&sin6->sin6_addr))
			die("refusing target %s: only 127.0.0.1 and ::1", B.host);
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = htons((uint16_t)B.port);
		B.salen = sizeof(*sin6);
	} else
		die("refusing target %s: only 127.0.0.1 and ::1", B.host);
}

static void
setup_tls(void)
{
	if (!B.tls)
		return;
	B.ctx = SSL_CTX_new(TLS_client_method());
	if (B.ctx == NULL)
		die("SSL_CTX_new failed");
	SSL_CTX_set_min_proto_version(B.ctx, TLS1_2_VERSION);
	SSL_CTX_set_options(B.ctx, SSL_OP_IGNORE_UNEXPECTED_EOF);
	/* Every connection is a full handshake, as NuPoint's are, unless
	 * --resume (each session keeps its own: no shared cache). */
	SSL_CTX_set_session_cache_mode(B.ctx, SSL_SESS_CACHE_OFF);
	if (B.insecure) {
		SSL_CTX_set_verify(B.ctx, SSL_VERIFY_NONE, NULL);
		return;
	}
	if (SSL_CTX_load_verify_locations(B.ctx, B.cafile, NULL) != 1)
		die("%s: cannot load CA file", B.cafile);
	SSL_CTX_set_verify(B.ctx, SSL_VERIFY_PEER, NULL);
}

int
main(int argc, char **argv)
{
	struct timeval tv;
	uint64_t nerr = 0;
	unsigned i;

	parse_args(argc, argv);
	resolve_target();
	setup_tls();
	signal(SIGPIPE, SIG_IGN);
	if (B.scenario == SC_APPEND)
		make_audio();
	B.rng = (uint32_t)getpid() * 2654435761u | 1;

	B.base = event_base_new();
	if (B.base == NULL)
		die("event_base_new failed");
	B.ses = calloc(B.sessions, sizeof(*B.ses));
	B.waitq = calloc(B.sessions, sizeof(*B.waitq));
	if (B.ses == NULL || B.waitq == NULL)
		die("out of memory");
	B.all_idle_s = -1;
	B.ev_stop = evtimer_new(B.base, stop_cb, NULL);
	B.ev_hard = evtimer_new(B.base, hard_cb, NULL);
	B.ev_grace = evtimer_new(B.base, grace_cb, NULL);
	B.ev_sig = evsignal_new(B.base, SIGINT, sig_cb, NULL);
	B.ev_settle = evtimer_new(B.base, settle_cb, NULL);
	if (B.ev_stop == NULL || B.ev_hard == NULL || B.ev_grace == NULL ||
	    B.ev_sig == NULL || B.ev_settle == NULL)
		die("cannot create events");
	evsignal_add(B.ev_sig, NULL);
	B.mem_before = read_mem(B.pid);
	B.mem_after.rss = B.mem_after.pss = -1;
	if (B.pid > 0 && (B.mem_before.rss < 0 || B.mem_before.pss < 0))
		die("--pid %ld: cannot read /proc/%ld/status and smaps_rollup",
		    B.pid, B.pid);

	B.live = B.sessions;
	for (i = 0; i < B.sessions; i++) {
		struct session *s = &B.ses[i];

		s->ses_id = i;
		s->ses_mbox = B.mailbox_base + i % B.mailboxes;
		s->ses_timer = evtimer_new(B.base, ses_timer_cb, s);
		if (s->ses_timer == NULL)
			die("cannot create events");
		if (B.ramp > 0)
			ses_timer_in(s, T_RECONNECT, B.ramp * i / B.sessions);
		else
			ses_timer_in(s, T_RECONNECT, 0);
	}
	now(&B.t_start);
	tv = tv_of(B.duration);
	evtimer_add(B.ev_stop, &tv);
	tv = tv_of(B.duration + HARD_EXTRA);
	evtimer_add(B.ev_hard, &tv);

	event_base_dispatch(B.base);
	if (!B.stopping)
		now(&B.t_end);
	if (B.hard)
		for (i = 0; i < B.sessions; i++)
			if (B.ses[i].ses_state != SES_S_DONE)
				count_error(E_UNFINISHED);

	print_report();

	for (i = 0; i < E_COUNT; i++)
		nerr += B.errors[i];
	/* cleanup (valgrind-friendly) */
	for (i = 0; i < B.sessions; i++) {
		ses_free_bev(&B.ses[i]);
		event_free(B.ses[i].ses_timer);
		free(B.ses[i].ses_msg);
		SSL_SESSION_free(B.ses[i].ses_tls_sess);
	}
	free(B.ses);
	free(B.waitq);
	free(B.audio);
	event_free(B.ev_stop);
	event_free(B.ev_hard);
	event_free(B.ev_grace);
	event_free(B.ev_sig);
	event_free(B.ev_settle);
	event_base_free(B.base);
	if (B.ctx != NULL)
		SSL_CTX_free(B.ctx);

	if (B.errors[E_VERIFY] > 0)
		return 1;
	if ((double)nerr > 0.01 * (double)(B.ops > 0 ? B.ops : 1))
		return 1;
	return 0;
}
