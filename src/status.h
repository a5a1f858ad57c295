/*
 * status.h - the HTTP status endpoint (libevent's evhttp).
 *
 * Owns the evhttp server on status_listen and the rendering of
 * GET /metrics (Prometheus text exposition format 0.0.4) and GET /status
 * (JSON).  It only reads: stats.c's counters and the gauges of pool.c,
 * client.c, retry.c and the current config.  Passwords never appear.
 */
#ifndef STATUS_H
#define STATUS_H

#include <stddef.h>

struct event_base;
struct config;
struct evbuffer;

/* Bind status_listen (if set).  Returns 0, or -1 with a reason in err. */
int status_start(struct event_base *base, const struct config *cfg,
    char *err, size_t errlen);
/* New settings after a reload (status_listen itself is not re-bound). */
void status_set_config(const struct config *cfg);
void status_stop(void);

/* Renderers, exposed for unit tests. */
void status_render_metrics(struct evbuffer *out);
void status_render_json(struct evbuffer *out);

/*
 * The operator's console's tables, one line per item of key=value pairs
 * (values quoted as in the log where needed), from the same counters as
 * /status.  pools: a first line with the budget, queue, paused and mode,
 * then one per admin account (sessions per pool state); servers: one per
 * configured server (up, draining, sessions, failures).  Return 0, or -1
 * when out of memory.
 */
int status_render_pools(struct evbuffer *out);
int status_render_servers(struct evbuffer *out);

#endif
