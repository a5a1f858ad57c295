/*
 * main.c - command line, signals, start-up order, privilege drop.
 *
 * Owns the event loop, the process-wide SSL contexts and the current
 * configuration.  No protocol code lives here.
 */
#include "config.h"

#include <event2/dns.h>
#include <event2/event.h>
#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "client.h"
#include "console.h"
#include "imapshim.h"
#include "listener.h"
#include "log.h"
#include "notify.h"
#include "pool.h"
#include "protolog.h"
#include "reap.h"
#include "stats.h"
#include "status.h"
#include "tls.h"
#include "upstream.h"
#include "util.h"

/* How often a draining process checks whether its clients are gone. */
#define MAIN_DRAIN_POLL_MS 100

static struct client_env main_env;
static struct config *main_cfg;
static struct event_base *main_base;
static struct event *main_drain_ev;
static struct event *main_trim_ev;
static struct event *main_cert_ev;
static const struct timeval main_cert_tv = { 86400, 0 };

/* How often, and after how long a quiet spell, idle sessions give their
 * TLS buffers back (see client_trim). */
#define MAIN_TRIM_MS 2000
static const struct timeval main_trim_tv = { MAIN_TRIM_MS / 1000, 0 };
/* Resident but unused heap above which it goes back to the system. */
#define MAIN_TRIM_HEAP_FREE (1u << 20)
static bool main_draining;
static uint64_t main_drain_deadline_ms;

static void
main_usage(FILE *f)
{
	fprintf(f,
	    "usage: imapshim -c FILE [-t]\n"
	    "       imapshim -V | -h\n"
	    "\n"
	    "  -c FILE  run in the foreground with this configuration\n"
	    "  -t       check the configuration, print what is wrong, exit 0 or 1\n"
	    "  -V       print the version\n"
	    "  -h       this help\n");
}

static void
main_print_diag(const struct config_diag *d)
{
	if (d->n_errors > 0)
		fputs(d->errors, stderr);
	if (d->n_warnings > 0)
		fputs(d->warnings, stderr);
}

/*
 * Descriptors: one per client, one per upstream session (at most
 * session_budget), and a few more: listeners, the status and console
 * sockets and their connections, log and protocol log files, DNS, the
 * event loop's own.  The pool keeps its sessions within what the clients
 * leave of the limit less this (DESIGN 3.3 P13).
 */
#define MAIN_FD_HEADROOM 64

/*
 * Lift the soft RLIMIT_NOFILE to the hard limit (-t: only say what the
 * start would get; *limit_r: the soft limit then, 0 for none), and warn
 * when that cannot hold max_clients beside the sessions the pool may
 * open: the pool then shrinks to fit (P13) at the worst moment, a
 * platform restart, and past its floor new clients wait for a descriptor
 * at accept.  Returns the warning, or NULL.
 */
static const char *
main_fd_limit(const struct config *cfg, bool check, uint64_t *limit_r,
    char *buf, size_t len)
{
	uint64_t sessions = 0, need, was, lim;
	struct rlimit rl;
	size_t i, n;

	*limit_r = 0;
	for (i = 0; i < cfg->n_admins; i++)
		sessions += cfg->admins[i].max_sessions;
	if (sessions > cfg->session_budget)
		sessions = cfg->session_budget;
	need = (uint64_t)cfg->max_clients + sessions + MAIN_FD_HEADROOM;
	if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
		return NULL;
	was = rl.rlim_cur;
	if (rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		if (!check && setrlimit(RLIMIT_NOFILE, &rl) != 0)
			rl.rlim_cur = was;	/* above the kernel's nr_open */
		else if (!check)
			log_info("fd_limit_raised", "from=%llu to=%llu",
			    (unsigned long long)was,
			    (unsigned long long)rl.rlim_cur);
	}
	if (rl.rlim_cur == RLIM_INFINITY)
		return NULL;
	lim = *limit_r = rl.rlim_cur;
	if (lim >= need)
		return NULL;
	n = (size_t)snprintf(buf, len, "the open-file limit is %llu: about "
	    "%llu clients fit beside every upstream session, not max_clients "
	    "= %u (it needs %llu: one per client, %llu sessions "
	    "(session_budget or the admins' max_sessions), %u more); beyond "
	    "that the pool shrinks to fit (clients are not refused, sessions "
	    "are)", (unsigned long long)lim,
	    (unsigned long long)(lim > sessions + MAIN_FD_HEADROOM ? lim -
	    sessions - MAIN_FD_HEADROOM : 0), cfg->max_clients,
	    (unsigned long long)need, (unsigned long long)sessions,
	    MAIN_FD_HEADROOM);
	if (n < len && lim < (uint64_t)cfg->max_clients + MAIN_FD_HEADROOM +
	    POOL_FD_FLOOR)
		n += (size_t)snprintf(buf + n, len - n, ", to %u sessions at "
		    "about %llu clients, past which new clients wait for a "
		    "descriptor", POOL_FD_FLOOR, (unsigned long long)(lim >
		    MAIN_FD_HEADROOM + POOL_FD_FLOOR ? lim - MAIN_FD_HEADROOM -
		    POOL_FD_FLOOR : 0));
	if (n < len)
		snprintf(buf + n, len - n, "; raise LimitNOFILE= in the systemd "
		    "unit (or ulimit -n) to at least %llu, or lower max_clients",
		    (unsigned long long)need);
	return buf;
}

static SSL_CTX *
main_server_ctx(const struct config *cfg)
{
	char err[512];
	SSL_CTX *ctx;

	if (!cfg->has_listen && !cfg->has_listen_starttls)
		return NULL;
	ctx = tls_server_ctx_new(cfg->tls_cert_file, cfg->tls_key_file,
	    cfg->tls_min_version, err, sizeof(err));
	if (ctx == NULL)
		log_error("tls_setup", "side=client reason=%s", log_v(err));
	/* The expiry metric and warnings (start and reload). */
	tls_cert_in_use(ctx, (int64_t)time(NULL));
	return ctx;
}

/* imapshim -t: the listener's certificate and key as the start loads them
 * (key matching, not expired), and a warning when it expires soon.
 * Returns -1 when the start would fail. */
static int
main_check_tls(const struct config *cfg)
{
	char msg[600];
	int rc;

	if (!cfg->has_listen && !cfg->has_listen_starttls)
		return 0;
	rc = tls_check_server_files(cfg->tls_cert_file, cfg->tls_key_file,
	    cfg->tls_min_version, (int64_t)time(NULL), msg, sizeof(msg));
	if (rc != 0)
		fprintf(stderr, "%s: [shim] tls_cert_file: %s\n", cfg->path, msg);
	return rc < 0 ? -1 : 0;
}

/* Daily: a warning when the listener's certificate (or a server's, between
 * handshakes) comes within 30 or 7 days of its expiry. */
static void
main_cert_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	tls_cert_recheck((int64_t)time(NULL));
}

static SSL_CTX *
main_upstream_ctx(const struct config *cfg, bool *ok)
{
	char err[512];
	SSL_CTX *ctx;

	*ok = true;
	if (cfg->up_tls == CFG_TLS_NONE)
		return NULL;
	ctx = tls_client_ctx_new(cfg->tls_verify, cfg->tls_ca_file, err,
	    sizeof(err));
	if (ctx == NULL) {
		log_error("tls_setup", "side=upstream reason=%s", log_v(err));
		*ok = false;
	}
	return ctx;
}

/* One log line per line of text (config_load's errors or warnings). */
static void
main_log_diag(enum log_level lvl, const char *event, const char *path,
    const char *text)
{
	char *s = strdup(text), *save, *line;

	for (line = s ? strtok_r(s, "\n", &save) : NULL; line != NULL;
	    line = strtok_r(NULL, "\n", &save))
		log_event(lvl, event, "file=%s what=%s", log_v(path),
		    log_v(line));
	free(s);
}

/* main_reload's work: load, check and apply the file, or keep the old. */
static int
main_reload_config(char *why, size_t whylen)
{
	struct config_diag diag;
	struct config *cfg;
	SSL_CTX *sctx, *uctx;
	bool ok;
	enum log_level lvl;

	memset(&diag, 0, sizeof(diag));
	cfg = config_load(main_cfg->path, true, &diag);
	if (cfg == NULL) {
		main_log_diag(LOG_LVL_ERROR, "reload_rejected", main_cfg->path,
		    diag.errors);
		/* The first error names the line; the log has them all. */
		snprintf(why, whylen, "%.*s; old settings kept",
		    (int)strcspn(diag.errors, "\n"), diag.errors);
		log_warn("reload", "result=rejected reason=%s", log_v(why));
		return -1;
	}
	sctx = main_server_ctx(cfg);
	uctx = main_upstream_ctx(cfg, &ok);
	if ((main_env.server_ctx != NULL && sctx == NULL) || !ok) {
		tls_ctx_free(sctx);
		tls_ctx_free(uctx);
		config_free(cfg);
		snprintf(why, whylen, "TLS set-up failed; old settings kept");
		log_warn("reload", "result=rejected reason=%s", log_v(why));
		return -1;
	}
	main_log_diag(LOG_LVL_WARN, "config_warning", cfg->path, diag.warnings);
	/* Sessions hold their own SSL objects; the contexts are reference
	 * counted by OpenSSL, so freeing our reference is safe. */
	tls_ctx_free(main_env.server_ctx);
	tls_ctx_free(main_env.upstream_ctx);
	main_env.server_ctx = sctx;
	main_env.upstream_ctx = uctx;
	if ((cfg->protocol_log == NULL) != (main_cfg->protocol_log == NULL) ||
	    (cfg->protocol_log != NULL &&
	    strcmp(cfg->protocol_log, main_cfg->protocol_log) != 0)) {
		char err[512];

		if (protolog_open(cfg->protocol_log, err, sizeof(err)) != 0)
			log_warn("protocol_log", "reason=%s", log_v(err));
	}
	main_env.cfg = cfg;
	listener_set_config(cfg);
	pool_default_env(main_base, main_env.dns, uctx);
	pool_set_config(cfg);
	status_set_config(cfg);
	console_set_config(cfg);
	config_free(main_cfg);
	main_cfg = cfg;
	lvl = cfg->log_level;
	log_set_level(lvl);
	log_info("reload", "result=ok file=%s", log_v(cfg->path));
	snprintf(why, whylen, "ok");
	return 0;
}

/*
 * Re-read the ini (SIGHUP, the console's "reload").  Returns 0 when the new
 * settings took effect, or -1 with why the file was rejected in why (the old
 * settings stay).  Callers that answer somebody (imapshim-ctl) report the
 * result; the log has the detail.  systemd and the reload gauges learn it
 * here, whoever asked.
 */
static int
main_reload(char *why, size_t whylen)
{
	int rc;

	notify_reloading();
	rc = main_reload_config(why, whylen);
	stats_reload(rc == 0 ? STATS_RELOAD_OK : STATS_RELOAD_REJECTED,
	    (int64_t)time(NULL));
	notify_ready("reload %s%s", rc == 0 ? "" : "rejected: ", why);
	return rc;
}

static void
main_drain_cb(evutil_socket_t fd, short what, void *arg)
{
	struct timeval tv = { 0, MAIN_DRAIN_POLL_MS * 1000 };

	(void)fd;
	(void)what;
	(void)arg;
	if (util_now_ms() >= main_drain_deadline_ms)
		client_close_all("imapshim shutting down.");
	/* Clients first; then the pool logs its sessions out, each bounded
	 * by its own short LOGOUT timer. */
	if (client_count() == 0) {
		pool_shutdown();
		if (upstream_count() == 0) {
			event_base_loopexit(main_base, NULL);
			return;
		}
	}
	evtimer_add(main_drain_ev, &tv);
}

static void
main_trim_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	client_trim(MAIN_TRIM_MS);
	upstream_trim();
	util_heap_trim(MAIN_TRIM_HEAP_FREE);
	/* On time even when no client gets a ticket: an old key erased. */
	(void)tls_ticket_rotate((int64_t)time(NULL));
}

static void
main_signal_cb(evutil_socket_t sig, short what, void *arg)
{
	(void)what;
	(void)arg;
	switch (sig) {
	case SIGHUP: {
		char why[256];

		(void)main_reload(why, sizeof(why));
		break;
	}
	case SIGUSR1:
		if (log_reopen() != 0)
			log_warn("log_reopen", "result=failed");
		if (protolog_reopen() != 0)
			log_warn("protocol_log_reopen", "result=failed");
		break;
	case SIGTERM:
	case SIGINT:
		if (main_draining) {
			event_base_loopexit(main_base, NULL);
			break;
		}
		main_draining = true;
		notify_stopping();
		status_stop();
		/* Idle sessions go now, busy ones after their reply. */
		client_drain("imapshim shutting down.");
		log_info("shutdown", "signal=%d clients=%u drain_timeout_ms=%llu",
		    (int)sig, client_count(),
		    (unsigned long long)main_cfg->drain_timeout_ms);
		listener_stop();
		main_drain_deadline_ms = util_now_ms() + main_cfg->drain_timeout_ms;
		main_drain_cb(-1, 0, NULL);
		break;
	default:
		break;
	}
}

/* The periodic systemd STATUS: counters the modules keep, no walk. */
static void
main_load_cb(struct notify_load *l_r)
{
	unsigned counts[CLIENT_KIND_COUNT];
	struct pool_stats ps;

	client_counts(counts);
	pool_get_stats(&ps);
	l_r->nl_unauthenticated = counts[CLIENT_UNAUTHENTICATED];
	l_r->nl_attached = counts[CLIENT_ATTACHED];
	l_r->nl_parked = counts[CLIENT_PARKED];
	l_r->nl_waiting = counts[CLIENT_WAITING];
	l_r->nl_sessions = ps.sessions;
	l_r->nl_budget = main_cfg->session_budget;
}

static int
main_drop_privileges(const char *user)
{
	struct passwd *pw;

	errno = 0;
	if ((pw = getpwnam(user)) == NULL) {
		log_error("privileges", "user=%s reason=\"no such user\"",
		    log_v(user));
		return -1;
	}
	if (getuid() == pw->pw_uid && geteuid() == pw->pw_uid) {
		log_info("privileges", "user=%s result=already", log_v(user));
		return 0;
	}
	if (setgroups(1, &pw->pw_gid) != 0 || setgid(pw->pw_gid) != 0 ||
	    setuid(pw->pw_uid) != 0) {
		log_error("privileges", "user=%s reason=%s", log_v(user),
		    log_v(strerror(errno)));
		return -1;
	}
	/* Prove it: regaining root must now fail. */
	if (pw->pw_uid != 0 && setuid(0) == 0) {
		log_error("privileges", "user=%s reason=\"could regain root\"",
		    log_v(user));
		return -1;
	}
	log_info("privileges", "user=%s uid=%u gid=%u", log_v(user),
	    (unsigned)pw->pw_uid, (unsigned)pw->pw_gid);
	return 0;
}

/*
 * epoll's changelist folds the event changes of one loop pass into one
 * epoll_ctl per descriptor, or none: a TLS bufferevent adds its write event
 * when a reply is queued and deletes it once SSL_write() has sent it, in the
 * same pass, so on the relay path most of those calls disappear.  (Its one
 * caveat, dup()ed descriptors, does not apply: imapshim never dups.)
 */
static struct event_base *
main_event_base(void)
{
	struct event_config *ec = event_config_new();
	struct event_base *b;

	if (ec == NULL)
		return NULL;
	event_config_set_flag(ec, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
	b = event_base_new_with_config(ec);
	event_config_free(ec);
	return b;
}

int
main(int argc, char **argv)
{
	const char *path = NULL;
	bool check = false;
	struct config_diag diag;
	struct event *sigs[4];
	const int signums[4] = { SIGHUP, SIGTERM, SIGINT, SIGUSR1 };
	char err[512];
	uint64_t fd_limit;
	bool ok;
	int ch;
	size_t i;

	util_heap_setup();
	util_count_allocations();	/* before libevent or OpenSSL allocate */
	while ((ch = getopt(argc, argv, "c:tVh")) != -1) {
		switch (ch) {
		case 'c':
			path = optarg;
			break;
		case 't':
			check = true;
			break;
		case 'V':
			/* The features line tells tests and operators
			 * whether Type=notify can work with this binary. */
			printf("imapshim %s\nfeatures: %s\n", PACKAGE_VERSION,
			    notify_supported() ? "systemd" : "none");
			return 0;
		case 'h':
			main_usage(stdout);
			return 0;
		default:
			main_usage(stderr);
			return 1;
		}
	}
	if (path == NULL || optind != argc) {
		main_usage(stderr);
		return 1;
	}
	memset(&diag, 0, sizeof(diag));
	main_cfg = config_load(path, true, &diag);
	if (check) {
		main_print_diag(&diag);
		if (main_cfg == NULL)
			return 1;
		if (main_check_tls(main_cfg) != 0) {
			config_free(main_cfg);
			return 1;
		}
		if (main_fd_limit(main_cfg, true, &fd_limit, err,
		    sizeof(err)) != NULL)
			fprintf(stderr, "%s: warning: %s\n", path, err);
		printf("%s: configuration is valid\n", path);
		config_free(main_cfg);
		return 0;
	}
	if (main_cfg == NULL) {
		/* Running, not checking: what is wrong goes to the log, as
		 * logfmt lines like everything else (the journal's priority). */
		main_log_diag(LOG_LVL_ERROR, "config_error", path, diag.errors);
		main_log_diag(LOG_LVL_WARN, "config_warning", path,
		    diag.warnings);
		log_fatal("start", "reason=\"errors in the configuration\"");
	}
	log_set_level(main_cfg->log_level);
	if (log_open(main_cfg->log_target, err, sizeof(err)) != 0)
		log_fatal("start", "reason=%s", log_v(err));
	main_log_diag(LOG_LVL_WARN, "config_warning", main_cfg->path,
	    diag.warnings);
	if (protolog_open(main_cfg->protocol_log, err, sizeof(err)) != 0)
		log_fatal("start", "reason=%s", log_v(err));
	if (main_fd_limit(main_cfg, false, &fd_limit, err, sizeof(err)) != NULL)
		log_warn("fd_limit_low", "max_clients=%u reason=%s",
		    main_cfg->max_clients, log_v(err));
	if (!main_cfg->tls_verify)
		log_warn("tls_verify_off", "reason=\"[upstream] tls_verify = no: "
		    "Exchange certificates are NOT verified\"");
	signal(SIGPIPE, SIG_IGN);

	main_base = main_event_base();
	if (main_base == NULL || reap_init(main_base) != 0)
		log_fatal("start", "reason=\"cannot create the event loop\"");
	main_env.base = main_base;
	main_env.dns = evdns_base_new(main_base, EVDNS_BASE_INITIALIZE_NAMESERVERS);
	if (main_env.dns == NULL)
		main_env.dns = evdns_base_new(main_base, 0);
	main_env.cfg = main_cfg;
	main_env.server_ctx = main_server_ctx(main_cfg);
	main_env.upstream_ctx = main_upstream_ctx(main_cfg, &ok);
	if ((main_env.server_ctx == NULL && (main_cfg->has_listen ||
	    main_cfg->has_listen_starttls)) || !ok)
		log_fatal("start", "reason=\"TLS set-up failed\"");
	client_init(&main_env);
	pool_default_env(main_base, main_env.dns, main_env.upstream_ctx);
	pool_init(main_cfg, &pool_default_ops);
	pool_set_fd_limit(fd_limit, MAIN_FD_HEADROOM);
	pool_set_pressure(client_pool_pressure);
	if (listener_start(main_base, main_cfg, err, sizeof(err)) != 0)
		log_fatal("start", "reason=%s", log_v(err));
	stats_started((int64_t)time(NULL));
	if (status_start(main_base, main_cfg, err, sizeof(err)) != 0)
		log_fatal("start", "reason=%s", log_v(err));
	/* Before the privilege drop: the socket's directory may be root's. */
	if (console_start(main_base, main_cfg, main_reload, err,
	    sizeof(err)) != 0)
		log_fatal("start", "reason=%s", log_v(err));
	if (main_cfg->user != NULL && main_drop_privileges(main_cfg->user) != 0)
		log_fatal("start", "reason=\"cannot switch to user\" user=%s",
		    log_v(main_cfg->user));
	for (i = 0; i < nitems(sigs); i++) {
		sigs[i] = evsignal_new(main_base, signums[i], main_signal_cb, NULL);
		if (sigs[i] == NULL || evsignal_add(sigs[i], NULL) != 0)
			log_fatal("start", "reason=\"cannot install signal handlers\"");
	}
	main_drain_ev = evtimer_new(main_base, main_drain_cb, NULL);
	main_trim_ev = event_new(main_base, -1, EV_PERSIST, main_trim_cb, NULL);
	main_cert_ev = event_new(main_base, -1, EV_PERSIST, main_cert_cb, NULL);
	if (main_drain_ev == NULL || main_trim_ev == NULL || main_cert_ev == NULL)
		log_fatal("start", "reason=\"cannot create timers\"");
	event_add(main_trim_ev, &main_trim_tv);
	event_add(main_cert_ev, &main_cert_tv);
	if (notify_start(main_base, main_load_cb) != 0)
		log_fatal("start", "reason=\"cannot create the systemd timers\"");
	log_info("ready", "version=%s config=%s servers=%zu admins=%zu",
	    PACKAGE_VERSION, log_v(main_cfg->path), main_cfg->n_servers,
	    main_cfg->n_admins);
	notify_ready("ready; servers %zu, admin accounts %zu, session budget %u",
	    main_cfg->n_servers, main_cfg->n_admins, main_cfg->session_budget);

	event_base_dispatch(main_base);

	log_info("exit", "status=0");
	client_free_all();
	pool_shutdown();
	upstream_free_all();
	/* bufferevent_free() finishes in deferred callbacks: let them run. */
	event_base_loop(main_base, EVLOOP_NONBLOCK);
	event_base_loop(main_base, EVLOOP_NONBLOCK);
	reap_shutdown();
	for (i = 0; i < nitems(sigs); i++)
		event_free(sigs[i]);
	event_free(main_drain_ev);
	event_free(main_trim_ev);
	event_free(main_cert_ev);
	notify_stop();
	listener_stop();
	status_stop();
	console_stop();
	evdns_base_free(main_env.dns, 0);
	tls_ctx_free(main_env.server_ctx);
	tls_ctx_free(main_env.upstream_ctx);
	tls_shutdown();
	event_base_free(main_base);
	config_free(main_cfg);
	protolog_close();
	log_close();
	return 0;
}
