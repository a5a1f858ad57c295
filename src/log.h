/*
 * log.h - one logfmt line per event, to stderr, syslog or a file.
 *
 * Owns the log level, the log target and its file descriptor, and the one
 * escaping rule for values.  Every line starts with a timestamp (stderr and
 * file), "level=" and "event=", followed by the caller's key=value pairs.
 * When stderr is the systemd journal (JOURNAL_STREAM names it), lines start
 * with the priority "<N>" instead of the timestamp, for journalctl -p.
 * Secrets never reach this module unmasked: callers pass LOG_MASKED
 * ("*****") where a password or LOGIN argument would go.
 *
 * A value is written as-is only when it is a known-safe token (a number, a
 * fixed enum name, host:port from the config); anything else goes through
 * log_v() (or log_value()), which quotes it when needed.
 */
#ifndef LOG_H
#define LOG_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>

enum log_level {
	LOG_LVL_ERROR,
	LOG_LVL_WARN,
	LOG_LVL_INFO,
	LOG_LVL_DEBUG,
	LOG_LVL_COUNT
};

#define LOG_MASKED "*****"

/* Parse "error", "warn", "info", "debug" (ASCII case-insensitive).
 * Returns 0 or -1. */
int log_level_parse(const char *s, enum log_level *lvl_r);
const char *log_level_name(enum log_level lvl);

/* Open a target: "stderr", "syslog" or a file path (appended to).
 * Returns 0, or -1 with a reason in err. */
int log_open(const char *target, char *err, size_t errlen);
/* Reopen the file target (SIGUSR1, after logrotate).  No-op otherwise. */
int log_reopen(void);
void log_close(void);
void log_set_level(enum log_level lvl);
bool log_enabled(enum log_level lvl);

/* event: a short snake_case name; fmt: "key=%s key2=%d" pairs. */
void log_event(enum log_level lvl, const char *event, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void log_eventv(enum log_level lvl, const char *event, const char *fmt,
    va_list ap) __attribute__((format(printf, 3, 0)));

#define log_error(ev, ...) log_event(LOG_LVL_ERROR, ev, __VA_ARGS__)
#define log_warn(ev, ...) log_event(LOG_LVL_WARN, ev, __VA_ARGS__)
#define log_info(ev, ...) log_event(LOG_LVL_INFO, ev, __VA_ARGS__)
#define log_debug(ev, ...) \
	do { \
		if (log_enabled(LOG_LVL_DEBUG)) \
			log_event(LOG_LVL_DEBUG, ev, __VA_ARGS__); \
	} while (0)

/* Render s as a log value into buf: bare when it is a plain token (letters,
 * digits and ._:/@+-,*[]()), else in double quotes with \" and \\ escaped
 * and control and non-ASCII bytes as \xNN.  Returns buf.  Output is cut
 * (with "...") to fit buflen. */
const char *log_value(char *buf, size_t buflen, const char *s, size_t len);

/* How many log_v()/log_vn() results one log line may use; values longer
 * than LOG_V_MAX - 1 bytes (escaped) are cut. */
#define LOG_V_SLOTS 8
#define LOG_V_MAX 1024

/*
 * log_value() into one of LOG_V_SLOTS static buffers, for use ONLY as an
 * argument of a log call: log_info("ev", "why=%s", log_v(why)).  The
 * buffers are reused by the next log line (single-threaded daemon).  A line
 * asking for more than LOG_V_SLOTS values gets a visible placeholder for
 * the extra ones instead of another argument's text.  NULL logs as "".
 */
const char *log_v(const char *s);
/* The same for len bytes of s (not NUL-terminated). */
const char *log_vn(const char *s, size_t len);

/* Print a fatal start-up error and exit(1). */
void log_fatal(const char *event, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), noreturn));

#endif
