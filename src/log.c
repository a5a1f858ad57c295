/* log.c - key=value event lines to stderr, syslog or an appended file. */
#include "log.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

#include "imapshim.h"

/* Longest line written, newline included; longer ones end in "...". */
#define LOG_LINE_MAX 4096
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

static enum log_level log_level = LOG_LVL_INFO;
static enum log_target log_target = LOG_T_STDERR;
static int log_fd = -1;			/* LOG_T_FILE only */
static char log_path[LOG_PATH_MAX];	/* LOG_T_FILE only */

int
log_level_parse(const char *s, enum log_level *lvl_r)
{
	size_t i;

	if (s == NULL)
		return -1;
	for (i = 0; i < LOG_LVL_COUNT; i++) {
		if (strcmp(s, log_level_names[i]) == 0) {
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
		log_warn("log_reopen_failed", "path=%s error=\"%s\"",
		    log_path, strerror(saved));
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

/* "2026-11-27T21:30:00.123Z " into buf; returns its length. */
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

/* Format and emit one line; to_stderr forces a copy to stderr as well. */
static void
log_emit(enum log_level lvl, const char *event, const char *fmt, va_list ap,
    bool to_stderr)
{
	char line[LOG_LINE_MAX];
	size_t ts_len, n, room;
	int m;

	/* The timestamp is written first, and skipped for syslog. */
	ts_len = log_timestamp(line, sizeof(line));
	n = ts_len;
	m = snprintf(line + n, sizeof(line) - n, "level=%s event=%s",
	    log_level_name(lvl), event != NULL ? event : "-");
	if (m < 0)
		return;
	n += (size_t)m;
	/* Keep one byte for the newline. */
	room = sizeof(line) - 1;
	if (n < room && fmt != NULL && *fmt != '\0') {
		line[n++] = ' ';
		m = vsnprintf(line + n, room - n + 1, fmt, ap);
		if (m <= 0)
			n--;	/* pairs expanded to nothing: no trailing space */
		else
			n += (size_t)m;
	}
	if (n >= room) {
		/* Cut: vsnprintf left the text NUL-terminated at room - 1. */
		n = room;
		memcpy(line + n - 3, "...", 3);
	}
	line[n++] = '\n';

	switch (log_target) {
	case LOG_T_SYSLOG:
		syslog(log_syslog_prio[lvl], "%.*s", (int)(n - 1 - ts_len),
		    line + ts_len);
		break;
	case LOG_T_FILE:
		log_write(log_fd, line, n);
		break;
	case LOG_T_STDERR:
	case LOG_T_COUNT:
		log_write(STDERR_FILENO, line, n);
		to_stderr = false;
		break;
	}
	if (to_stderr)
		log_write(STDERR_FILENO, line, n);
}

void
log_eventv(enum log_level lvl, const char *event, const char *fmt, va_list ap)
{
	int saved = errno;

	if ((unsigned)lvl >= LOG_LVL_COUNT)
		lvl = LOG_LVL_ERROR;
	if (log_enabled(lvl))
		log_emit(lvl, event, fmt, ap, false);
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
	return c != '\0' && strchr("._:/@+-=,*[]()", c) != NULL;
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
