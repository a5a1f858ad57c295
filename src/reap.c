/* reap.c - deferred freeing of connection objects. */
#include "reap.h"

#include <event2/event.h>

static TAILQ_HEAD(, reap_entry) reap_list = TAILQ_HEAD_INITIALIZER(reap_list);
static struct event *reap_ev;

static void
reap_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	reap_run();
}

int
reap_init(struct event_base *base)
{
	reap_ev = event_new(base, -1, 0, reap_cb, NULL);
	return reap_ev == NULL ? -1 : 0;
}

void
reap_add(struct reap_entry *re, void (*free_fn)(void *), void *obj)
{
	if (re->re_queued)
		return;
	re->re_free = free_fn;
	re->re_obj = obj;
	re->re_queued = true;
	TAILQ_INSERT_TAIL(&reap_list, re, re_link);
	if (reap_ev != NULL)
		event_active(reap_ev, 0, 0);
}

void
reap_run(void)
{
	struct reap_entry *re;

	/* A free function may queue further objects; they are taken too. */
	while ((re = TAILQ_FIRST(&reap_list)) != NULL) {
		TAILQ_REMOVE(&reap_list, re, re_link);
		re->re_queued = false;
		re->re_free(re->re_obj);
	}
}

void
reap_shutdown(void)
{
	reap_run();
	if (reap_ev != NULL)
		event_free(reap_ev);
	reap_ev = NULL;
}
