/*
 * reap.h - free connection objects after the current callback chain.
 *
 * Owns the list of objects waiting to be freed.  A callback never frees the
 * object whose callback is running: closing marks it, flushes its output,
 * then hands it here; the reaper runs once the loop has finished the
 * current batch of callbacks (PgBouncer's justfree, Redis' CLOSE_ASAP).
 */
#ifndef REAP_H
#define REAP_H

#include <stdbool.h>
#include <sys/queue.h>

struct event_base;

struct reap_entry {
	void (*re_free)(void *obj);
	void *re_obj;
	bool re_queued;
	TAILQ_ENTRY(reap_entry) re_link;
};

int reap_init(struct event_base *base);
/* Queue obj for re_free at the end of this loop iteration (once). */
void reap_add(struct reap_entry *re, void (*free_fn)(void *), void *obj);
/* Free everything queued now (shutdown). */
void reap_run(void);
void reap_shutdown(void);

#endif
