/* log.c - logfmt event lines to stderr, syslog or an appended file. */
#include "log.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "imapshim.h"

/* Longest line written, newline included; longer ones end in "...". */
#define LOG_LINE_MAX 4096
/* "2026-11-27T21:30:00.123Z " */
#define LOG_TS_LEN 25
/* Room before a line's text for its head: the timestamp or "<N>". */
#define LOG_HEAD_MAX 32
#define LOG_PATH_MAX 4096
#define LOG_FILE_MODE 0640

enum log_target {
	LOG_T_STDERR,
	LOG_T_SYSLOG,
	LOG_T_FILE,
	LOG_T_COUNT
};

static const char *const log_level_names[] = {
	"error", "warn", "info", "debug"
};
static_assert(nitems(log_level_names) == LOG_LVL_COUNT,
    "log_level_names out of sync with enum log_level");

static const int log_syslog_prio[] = {
	LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG
};
static_assert(nitems(log_syslog_prio) == LOG_LVL_COUNT,
    "log_syslog_prio out of sync with enum log_level");

/* sd-daemon.h's SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG: the journal reads
 * them at the start of a line (no libsystemd needed). */
static const char *const log_journal_prio[] = {
	"<3>", "<4>", "<6>", "<7>"
};
static_assert(nitems(log_journal_prio) == LOG_LVL_COUNT,
    "log_journal_prio out of sync with enum log_level");

static enum log_level log_level = LOG_LVL_INFO;
static enum log_target log_target = LOG_T_STDERR;
static int log_fd = -1;			/* LOG_T_FILE only */
static char log_path[LOG_PATH_MAX];	/* LOG_T_FILE only */
static int log_journal = -1;		/* stderr is the journal? -1: unknown */

static char log_v_buf[LOG_V_SLOTS][LOG_V_MAX];
static unsigned log_v_used;		/* log_v() results since last line */

int
log_level_parse(const char *s, enum log_level *lvl_r)
{
	size_t i;

	if (s == NULL)
		return -1;
	for (i = 0; i < LOG_LVL_COUNT; i++) {
		if (strcasecmp(s, log_level_names[i]) == 0) {
			*lvl_r = (enum log_level)i;
			return 0;
		}
	}
	return -1;
}

const char *
log_level_name(enum log_level lvl)
{
	if ((unsigned)lvl >= LOG_LVL_COUNT)
		return "unknown";
	return log_level_names[lvl];
}

static int
log_open_file(const char *path)
{
	return open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC,
	    LOG_FILE_MODE);
}

/*
 * True when stderr is the journal's stream: systemd sets JOURNAL_STREAM to
 * "DEV:INODE" of the socket it connected; a child whose stderr was
 * redirected inherits the variable but not the socket, hence the fstat().
 */
static bool
log_stderr_is_journal(void)
{
	const char *js = getenv("JOURNAL_STREAM");
	unsigned long long dev, ino;
	struct stat sb;
	int end = 0;

	if (js == NULL || sscanf(js, "%llu:%llu%n", &dev, &ino, &end) != 2 ||
	    js[end] != '\0')
		return false;
	if (fstat(STDERR_FILENO, &sb) == -1)
		return false;
	return (unsigned long long)sb.st_dev == dev &&
	    (unsigned long long)sb.st_ino == ino;
}

/* Drop the current target (back to stderr). */
static void
log_release(void)
{
	switch (log_target) {
	case LOG_T_FILE:
		if (log_fd != -1)
			close(log_fd);
		log_fd = -1;
		log_path[0] = '\0';
		break;
	case LOG_T_SYSLOG:
		closelog();
		break;
	case LOG_T_STDERR:
	case LOG_T_COUNT:
		break;
	}
	log_target = LOG_T_STDERR;
}

int
log_open(const char *target, char *err, size_t errlen)
{
	size_t len;
	int fd;

	if (target == NULL || *target == '\0') {
		snprintf(err, errlen, "empty log target");
		return -1;
	}
	if (strcmp(target, "stderr") == 0) {
		log_release();
		log_journal = log_stderr_is_journal();
		return 0;
	}
	if (strcmp(target, "syslog") == 0) {
		log_release();
		openlog("imapshim", LOG_PID | LOG_NDELAY, LOG_DAEMON);
		log_target = LOG_T_SYSLOG;
		return 0;
	}
	len = strlen(target);
	if (len >= sizeof(log_path)) {
		snprintf(err, errlen, "log file path too long");
		return -1;
	}
	fd = log_open_file(target);
	if (fd == -1) {
		snprintf(err, errlen, "%s: %s", target, strerror(errno));
		return -1;
	}
	log_release();
	memcpy(log_path, target, len + 1);
	log_fd = fd;
	log_target = LOG_T_FILE;
	return 0;
}

int
log_reopen(void)
{
	int fd, saved;

	if (log_target != LOG_T_FILE)
		return 0;
	fd = log_open_file(log_path);
	if (fd == -1) {
		/* Keep writing to the old file rather than to nowhere. */
		saved = errno;
		log_warn("log_reopen_failed", "path=%s error=%s",
		    log_v(log_path), log_v(strerror(saved)));
		errno = saved;
		return -1;
	}
	close(log_fd);
	log_fd = fd;
	return 0;
}

void
log_close(void)
{
	log_release();
}

void
log_set_level(enum log_level lvl)
{
	if ((unsigned)lvl < LOG_LVL_COUNT)
		log_level = lvl;
}

bool
log_enabled(enum log_level lvl)
{
	return lvl <= log_level;
}

/* "2026-11-27T21:30:00.123Z " (LOG_TS_LEN bytes) into buf; returns its
 * length, 0 when the clock cannot be read. */
static size_t
log_timestamp(char *buf, size_t buflen)
{
	struct timespec ts;
	struct tm tm;
	size_t n;
	int m;

	clock_gettime(CLOCK_REALTIME, &ts);
	if (gmtime_r(&ts.tv_sec, &tm) == NULL)
		return 0;
	n = strftime(buf, buflen, "%Y-%m-%dT%H:%M:%S", &tm);
	if (n == 0)
		return 0;
	m = snprintf(buf + n, buflen - n, ".%03ldZ ", ts.tv_nsec / 1000000);
	if (m < 0 || (size_t)m >= buflen - n)
		return 0;
	return n + (size_t)m;
}

static void
log_write(int fd, const char *line, size_t len)
{
	ssize_t n;

	/* One write(2): O_APPEND keeps concurrent lines whole. */
	do {
		n = write(fd, line, len);
	} while (n == -1 && errno == EINTR);
}

/* Write head, then the line's text (at line) in one write(2). */
static void
log_put(int fd, char *line, size_t len, const char *head, size_t head_len)
{
	memcpy(line - head_len, head, head_len);
	log_write(fd, line - head_len, len + head_len);
}

/*
 * Cut text to at most room bytes so that it stays logfmt: the value being
 * written at the cut ends in "..." (inside its quotes when quoted); an
 * escape sequence is never split; a key cut before its '=' is dropped and
 * the previous value gets the "...".  Returns the new length.
 */
static size_t
log_cut(char *text, size_t room)
{
	size_t i = 0, step, space = 0, n = room - 4;	/* 4: ..." */
	bool quoted = false, in_key = false;

	while (i < n) {
		step = 1;
		if (quoted && text[i] == '\\')
			step = text[i + 1] == 'x' ? 4 : 2;
		if (i + step > n)
			break;
		if (quoted) {
			if (text[i] == '"')
				quoted = false;
		} else if (text[i] == ' ') {
			in_key = true;
			space = i;
		} else if (in_key && text[i] == '=') {
			in_key = false;
		} else if (!in_key && text[i] == '"') {
			quoted = true;
		}
		i += step;
	}
	if (in_key)
		i = space;	/* "level=... event=..." always precedes */
	/* Just after a closing quote: reopen the value for its "...". */
	if (!quoted && i > 0 && text[i - 1] == '"') {
		i--;
		quoted = true;
	}
	memcpy(text + i, "...\"", 4);
	return i + (quoted ? 4 : 3);
}

/* Format and emit one line; to_stderr forces a copy to stderr as well. */
static void
log_emit(enum log_level lvl, const char *event, const char *fmt, va_list ap,
    bool to_stderr)
{
	char buf[LOG_HEAD_MAX + LOG_LINE_MAX];
	char *line = buf + LOG_HEAD_MAX;	/* the text after the head */
	char ts[LOG_HEAD_MAX];
	size_t ts_len, n, room;
	int m;

	ts_len = log_timestamp(ts, sizeof(ts));
	m = snprintf(line, LOG_LINE_MAX, "level=%s event=%s",
	    log_level_name(lvl), event != NULL ? event : "-");
	if (m < 0)
		return;
	n = (size_t)m;
	/* The whole line, timestamp and newline included, fits LOG_LINE_MAX. */
	room = LOG_LINE_MAX - LOG_TS_LEN - 1;
	if (n < room && fmt != NULL && *fmt != '\0') {
		line[n++] = ' ';
		m = vsnprintf(line + n, room - n + 1, fmt, ap);
		if (m <= 0)
			n--;	/* pairs expanded to nothing: no trailing space */
		else
			n += (size_t)m;
	}
	if (n >= room)
		n = log_cut(line, room);
	line[n++] = '\n';

	switch (log_target) {
	case LOG_T_SYSLOG:
		syslog(log_syslog_prio[lvl], "%.*s", (int)(n - 1), line);
		break;
	case LOG_T_FILE:
		log_put(log_fd, line, n, ts, ts_len);
		break;
	case LOG_T_STDERR:
	case LOG_T_COUNT:
		to_stderr = true;
		break;
	}
	if (!to_stderr)
		return;
	if (log_journal == -1)
		log_journal = log_stderr_is_journal();
	if (log_journal)
		log_put(STDERR_FILENO, line, n, log_journal_prio[lvl], 3);
	else
		log_put(STDERR_FILENO, line, n, ts, ts_len);
}

void
log_eventv(enum log_level lvl, const char *event, const char *fmt, va_list ap)
{
	int saved = errno;

	if ((unsigned)lvl >= LOG_LVL_COUNT)
		lvl = LOG_LVL_ERROR;
	if (log_enabled(lvl))
		log_emit(lvl, event, fmt, ap, false);
	log_v_used = 0;
	errno = saved;
}

void
log_event(enum log_level lvl, const char *event, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_eventv(lvl, event, fmt, ap);
	va_end(ap);
}

void
log_fatal(const char *event, const char *fmt, ...)
{
	va_list ap;

	/* Start-up errors also go to stderr, where the operator looks. */
	va_start(ap, fmt);
	log_emit(LOG_LVL_ERROR, event, fmt, ap, true);
	va_end(ap);
	exit(1);
}

static bool
log_bare_char(unsigned char c)
{
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	    (c >= '0' && c <= '9'))
		return true;
	/* No '=' and no quote: a logfmt reader would split the pair there. */
	return c != '\0' && strchr("._:/@+-,*[]()", c) != NULL;
}

static bool
log_bare(const char *s, size_t len)
{
	size_t i;

	if (len == 0)
		return false;
	for (i = 0; i < len; i++)
		if (!log_bare_char((unsigned char)s[i]))
			return false;
	return true;
}

/* Write tail (as much as fits before the NUL) at buf[n]. */
static void
log_value_cut(char *buf, size_t buflen, size_t n, const char *tail)
{
	size_t tl = strlen(tail);

	if (n + tl + 1 > buflen)
		tl = buflen - 1 - n;
	memcpy(buf + n, tail, tl);
	buf[n + tl] = '\0';
}

/* The escaped form of c into esc (4 bytes); returns its length. */
static size_t
log_value_escape(unsigned char c, char *esc)
{
	static const char hex[] = "0123456789abcdef";

	if (c == '"' || c == '\\') {
		esc[0] = '\\';
		esc[1] = (char)c;
		return 2;
	}
	if (c < 0x20 || c >= 0x7f) {
		esc[0] = '\\';
		esc[1] = 'x';
		esc[2] = hex[c >> 4];
		esc[3] = hex[c & 0xf];
		return 4;
	}
	esc[0] = (char)c;
	return 1;
}

const char *
log_value(char *buf, size_t buflen, const char *s, size_t len)
{
	char esc[4];
	size_t i, n, el, total;

	if (buflen == 0)
		return buf;
	if (s == NULL)
		len = 0;
	if (log_bare(s, len)) {
		if (len < buflen) {
			memcpy(buf, s, len);
			buf[len] = '\0';
			return buf;
		}
		n = buflen > 4 ? buflen - 4 : 0;
		memcpy(buf, s, n);
		log_value_cut(buf, buflen, n, "...");
		return buf;
	}

	/* Quoted: "...", escapes never split; cut as "abc..." to fit. */
	total = 2;
	for (i = 0; i < len; i++)
		total += log_value_escape((unsigned char)s[i], esc);
	n = 0;
	buf[n++] = '"';
	if (total < buflen) {
		for (i = 0; i < len; i++) {
			el = log_value_escape((unsigned char)s[i], esc);
			memcpy(buf + n, esc, el);
			n += el;
		}
		buf[n++] = '"';
		buf[n] = '\0';
		return buf;
	}
	if (buflen == 1) {
		buf[0] = '\0';
		return buf;
	}
	for (i = 0; i < len; i++) {
		el = log_value_escape((unsigned char)s[i], esc);
		/* Keep room for ..." and the NUL. */
		if (n + el + 5 > buflen)
			break;
		memcpy(buf + n, esc, el);
		n += el;
	}
	log_value_cut(buf, buflen, n, "...\"");
	return buf;
}

const char *
log_vn(const char *s, size_t len)
{
	/* Past the slots: a marker, rather than overwrite another value of
	 * the same line. */
	if (log_v_used >= LOG_V_SLOTS)
		return "\"(too many log_v values)\"";
	return log_value(log_v_buf[log_v_used++], LOG_V_MAX, s, len);
}

const char *
log_v(const char *s)
{
	return log_vn(s, s != NULL ? strlen(s) : 0);
}
