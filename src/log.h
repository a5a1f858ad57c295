/*
 * log.h - one key=value line per event, to stderr, syslog or a file.
 *
 * Owns the log level, the log target and its file descriptor.  Every line
 * starts with a timestamp (stderr/file), "level=" and "event=", followed by
 * the caller's key=value pairs.  Secrets never reach this module unmasked:
 * callers pass LOG_MASKED ("*****") where a password or LOGIN argument would
 * go, and log_value() quotes any value that holds spaces or quotes.
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

/* Parse "error", "warn", "info", "debug".  Returns 0 or -1. */
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

/* Render s as a log value into buf: bare when it is a plain token, else in
 * double quotes with \" and \\ escaped and control bytes as \xNN.  Returns
 * buf.  Output is cut (with "...") to fit buflen. */
const char *log_value(char *buf, size_t buflen, const char *s, size_t len);

/* Print a fatal start-up error and exit(1). */
void log_fatal(const char *event, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), noreturn));

#endif
