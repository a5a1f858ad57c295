/* listener.c - accept, allow-list, max_clients. */
#include "listener.h"

#include <event2/event.h>
#include <event2/listener.h>
#include <errno.h>
#include <netdb.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "addr.h"
#include "client.h"
#include "config.h"
#include "log.h"
#include "stats.h"

/* After EMFILE/ENFILE, accepting pauses this long instead of spinning. */
#define LISTENER_PAUSE_MS 200

struct listener {
	struct evconnlistener *ls_ev;
	enum client_listener ls_kind;
	char ls_addr[300];
};

static struct listener ls_all[2];
static size_t ls_n;
static const struct config *ls_cfg;
static uint64_t ls_refused;
static struct event *ls_resume_ev;

static bool
listener_allowed(const struct sockaddr *sa)
{
	size_t i;

	for (i = 0; i < ls_cfg->n_allow_from; i++)
		if (addr_cidr_match(&ls_cfg->allow_from[i], sa))
			return true;
	return false;
}

static void
listener_accept_cb(struct evconnlistener *ev, evutil_socket_t fd,
    struct sockaddr *sa, int salen, void *arg)
{
	struct listener *ls = arg;
	char peer[64];

	(void)ev;
	addr_sockaddr_str(sa, peer, sizeof(peer));
	if (!listener_allowed(sa)) {
		ls_refused++;
		stats_client_refused();
		log_warn("client_refused", "peer=%s listener=%s reason=not-in-allow_from",
		    peer, ls->ls_addr);
		close(fd);
		return;
	}
	if (client_count() >= ls_cfg->max_clients) {
		ls_refused++;
		stats_client_refused();
		log_warn("client_refused", "peer=%s listener=%s reason=max_clients "
		    "clients=%u", peer, ls->ls_addr, client_count());
		close(fd);
		return;
	}
	client_new(fd, sa, (socklen_t)salen, ls->ls_kind);
}

static void
listener_resume_cb(evutil_socket_t fd, short what, void *arg)
{
	size_t i;

	(void)fd;
	(void)what;
	(void)arg;
	for (i = 0; i < ls_n; i++)
		evconnlistener_enable(ls_all[i].ls_ev);
}

static void
listener_error_cb(struct evconnlistener *ev, void *arg)
{
	struct listener *ls = arg;
	int err = EVUTIL_SOCKET_ERROR();
	struct timeval tv = { 0, LISTENER_PAUSE_MS * 1000 };
	size_t i;

	(void)ev;
	log_warn("accept_error", "listener=%s reason=%s", ls->ls_addr,
	    log_v(evutil_socket_error_to_string(err)));
	/* Out of descriptors: back off instead of busy-looping. */
	for (i = 0; i < ls_n; i++)
		evconnlistener_disable(ls_all[i].ls_ev);
	evtimer_add(ls_resume_ev, &tv);
}

static int
listener_bind(struct event_base *base, const struct addr_endpoint *ep,
    enum client_listener kind, char *err, size_t errlen)
{
	struct addrinfo hints, *res = NULL;
	struct listener *ls = &ls_all[ls_n];
	int rc;

	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
	rc = getaddrinfo(ep->host[0] ? ep->host : NULL, ep->port, &hints, &res);
	if (rc != 0) {
		snprintf(err, errlen, "cannot resolve %s: %s", ep->host,
		    gai_strerror(rc));
		return -1;
	}
	addr_endpoint_str(ep, ls->ls_addr, sizeof(ls->ls_addr));
	ls->ls_kind = kind;
	ls->ls_ev = evconnlistener_new_bind(base, listener_accept_cb, ls,
	    LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE | LEV_OPT_CLOSE_ON_EXEC,
	    1024, res->ai_addr, (int)res->ai_addrlen);
	freeaddrinfo(res);
	if (ls->ls_ev == NULL) {
		snprintf(err, errlen, "cannot listen on %s: %s", ls->ls_addr,
		    strerror(errno));
		return -1;
	}
	evconnlistener_set_error_cb(ls->ls_ev, listener_error_cb);
	ls_n++;
	log_info("listening", "addr=%s kind=%s", ls->ls_addr,
	    kind == CLIENT_LISTEN_IMPLICIT_TLS ? "tls" : "starttls");
	return 0;
}

int
listener_start(struct event_base *base, const struct config *cfg, char *err,
    size_t errlen)
{
	ls_cfg = cfg;
	ls_resume_ev = evtimer_new(base, listener_resume_cb, NULL);
	if (ls_resume_ev == NULL) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	if (cfg->has_listen && listener_bind(base, &cfg->listen,
	    CLIENT_LISTEN_IMPLICIT_TLS, err, errlen) != 0)
		return -1;
	if (cfg->has_listen_starttls && listener_bind(base,
	    &cfg->listen_starttls, CLIENT_LISTEN_STARTTLS, err, errlen) != 0)
		return -1;
	return 0;
}

void
listener_set_config(const struct config *cfg)
{
	ls_cfg = cfg;
}

void
listener_stop(void)
{
	size_t i;

	for (i = 0; i < ls_n; i++)
		evconnlistener_free(ls_all[i].ls_ev);
	ls_n = 0;
	if (ls_resume_ev != NULL)
		event_free(ls_resume_ev);
	ls_resume_ev = NULL;
}

uint64_t
listener_refused(void)
{
	return ls_refused;
}
