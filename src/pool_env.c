/*
 * pool_env.c - pool_default_ops: what the pool does in production.
 *
 * Owns the environment the default ops need (event base, DNS, the
 * upstream SSL_CTX, replaced on reload) and the pool's one timer, which
 * runs pool_tick().  Sessions are opened through upstream.c with the
 * login name built from login_format.  Unit tests pass their own ops and
 * never reach this file.
 */
#include "pool_int.h"

#include <event2/event.h>
#include <string.h>
#include <sys/time.h>

#include "auth.h"
#include "log.h"

/* What pool_default_ops needs (pool_default_env). */
static struct {
	struct event_base *base;
	struct evdns_base *dns;
	SSL_CTX *ctx;
	struct event *timer;
} D;

static void
def_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	pool_tick();
}

void
pool_default_env(struct event_base *base, struct evdns_base *dns,
    SSL_CTX *upstream_ctx)
{
	if (base != D.base)
		pool_env_stop();
	D.base = base;
	D.dns = dns;
	D.ctx = upstream_ctx;
	if (D.timer == NULL && base != NULL) {
		D.timer = evtimer_new(base, def_timer_cb, NULL);
		if (D.timer == NULL)
			log_fatal("pool_default_env", "reason=out-of-memory");
	}
}

static void
def_schedule(uint64_t at_ms)
{
	struct timeval tv;
	uint64_t now, delay;

	if (D.timer == NULL)
		return;
	if (at_ms == UINT64_MAX) {
		evtimer_del(D.timer);
		return;
	}
	now = util_now_ms();
	delay = at_ms > now ? at_ms - now : 0;
	tv.tv_sec = (time_t)(delay / 1000);
	tv.tv_usec = (suseconds_t)(delay % 1000) * 1000;
	evtimer_add(D.timer, &tv);
}

static struct upstream *
def_open(const struct config *cfg, size_t admin, size_t server,
    const char *domain, const char *mailbox, const struct upstream_cbs *cbs, void *arg,
    void (*on_free)(void *), void *free_arg)
{
	const struct addr_endpoint *ep = &cfg->servers[server];
	struct upstream_params p;
	char user[2 * IMAPSHIM_NAME_MAX + IMAPSHIM_MAILBOX_MAX + 512];

	if (auth_format_login(cfg->login_format,
	    cfg->domain != NULL ? cfg->domain : domain, cfg->admins[admin].name,
	    mailbox, user, sizeof(user)) < 0) {
		log_warn("pool_open", "reason=\"login name too long\" admin=%s",
		    cfg->admins[admin].name);
		return NULL;
	}
	memset(&p, 0, sizeof(p));
	p.host = ep->host;
	p.port = ep->port;
	p.tls = cfg->up_tls;
	p.ssl_ctx = cfg->up_tls == CFG_TLS_NONE ? NULL : D.ctx;
	p.tls_name = cfg->tls_server_name != NULL ? cfg->tls_server_name :
	    ep->host;
	p.tls_verify = cfg->tls_verify;
	p.login_user = user;
	p.password = cfg->admins[admin].password;
	p.connect_timeout_ms = cfg->connect_timeout_ms;
	p.login_timeout_ms = cfg->login_timeout_ms;
	p.on_free = on_free;
	p.free_arg = free_arg;
	return upstream_new(D.base, D.dns, &p, cbs, arg);
}

const struct pool_ops pool_default_ops = {
	.now_ms = util_now_ms,
	.open = def_open,
	.close = upstream_close,
	.set_lessee = upstream_set_lessee,
	.command = upstream_command,
	.has_cap = upstream_has_cap,
	.failed_responses = upstream_failed_responses,
	.schedule = def_schedule,
};

void
pool_env_stop(void)
{
	if (D.timer != NULL) {
		event_free(D.timer);
		D.timer = NULL;
	}
}
