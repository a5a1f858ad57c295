/*
 * console.h - the operator's console: a Unix socket for imapshim-ctl.
 *
 * Owns control_socket (DESIGN.md 3.6): the socket file (mode 0600, owned
 * by the daemon's user), its connections, the command parser and the
 * answers.  Only root and the daemon's own uid are served (SO_PEERCRED).
 *
 * Protocol: one command per line; every answer is zero or more data lines
 * (key=value pairs, or the JSON of /status on one line, or the /metrics
 * text), then exactly one terminator line:
 *
 *     OK [text]           the command took effect (text: what it did)
 *     ERROR reason        it did not (unknown client, reload rejected...)
 *     REFUSED reason      the connection is not served and is closed
 *                         (wrong uid, too many connections, line too long)
 *
 * Data lines never start with those three words.  The console reads and
 * changes the daemon only through the headers of client, pool and status;
 * "reload" calls the function main.c passed to console_start().
 */
#ifndef CONSOLE_H
#define CONSOLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "addr.h"
#include "imapshim.h"

struct config;
struct event_base;

/* Longest command line; a longer one is REFUSED and the connection closed. */
#define CONSOLE_LINE_MAX 1024
/* Console connections at once; one more is REFUSED. */
#define CONSOLE_MAX_CONNS 8

enum console_verb {
	CON_SHOW_POOLS,
	CON_SHOW_SERVERS,
	CON_SHOW_CLIENTS,
	CON_SHOW_STATS,
	CON_SHOW_STATUS,
	CON_KICK_CLIENT,
	CON_KICK_MAILBOX,
	CON_DRAIN_SERVER,
	CON_ENABLE_SERVER,
	CON_PAUSE,
	CON_RESUME,
	CON_RELOAD,
	CON_HELP,
	CON_VERB_COUNT
};

/* One parsed command line. */
struct console_cmd {
	enum console_verb verb;
	uint64_t id;					/* kick client */
	char mailbox[IMAPSHIM_MAILBOX_MAX + 1];		/* kick mailbox */
	struct addr_endpoint server;			/* drain/enable server */
};

/*
 * Parse one command line (no line ending; words separated by blanks,
 * keywords ASCII case-insensitive).  Returns 0, or -1 with a reason in
 * err.  No I/O: the unit tests call it directly.
 */
int console_parse(const char *line, size_t len, struct console_cmd *cmd,
    char *err, size_t errlen);
/* The command's words, e.g. "show pools". */
const char *console_verb_name(enum console_verb v);

/* Re-read the ini; 0 when it took effect, -1 when rejected; why says
 * which either way (main.c's reload). */
typedef int (*console_reload_fn)(char *why, size_t whylen);

/*
 * Create cfg->control_socket (nothing when it is unset): a stale socket
 * file is removed first, a live one (another imapshim answering there) or
 * a file that is no socket is an error.  Call before dropping privileges:
 * started as root with "user" set, the socket is given to that user.
 * Returns 0, or -1 with a reason in err.
 */
int console_start(struct event_base *base, const struct config *cfg,
    console_reload_fn reload, char *err, size_t errlen);
/* After a reload: a changed control_socket only takes effect at the next
 * start, which is logged. */
void console_set_config(const struct config *cfg);
/* Close every console connection and remove the socket file. */
void console_stop(void);

#endif
