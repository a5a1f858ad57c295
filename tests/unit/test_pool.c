/* test_pool.c - the pool with fake upstreams and a fake clock. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <event2/buffer.h>

#include "config.h"
#include "log.h"
#include "pool.h"
#include "retry.h"
#include "stats.h"
#include "util.h"

/* ------------------------------------------------------------ fakes */

#define MAXF 4096

struct fake_up {
	bool opened;
	size_t admin, server;
	char mailbox[IMAPSHIM_MAILBOX_MAX + 1];
	const struct upstream_cbs *cbs;	/* current lessee */
	void *arg;
	const struct upstream_cbs *pool_cbs;	/* the pool's, from open */
	void (*on_free)(void *);
	void *free_arg;
	bool ready;
	bool closed;
	int n_close;
	bool freed;
	char close_reason[64];
	bool cap_unselect;
	unsigned failed, bad;
	void (*cmd_done)(void *, bool);
	void *cmd_arg;
	char hist[32][32];
	int nhist;
};

static struct fake_up F[MAXF];
static int nf;
static uint64_t fnow;
static uint64_t fsched;
static bool in_api;
static bool open_returns_null;
static unsigned open_cap;	/* 0, or: no open with this many alive */

#define U(i) ((struct upstream *)&F[i])

static int
fidx(const struct upstream *u)
{
	const struct fake_up *f = (const struct fake_up *)u;

	assert_true(f >= F && f < F + nf);
	return (int)(f - F);
}

static uint64_t
fake_now(void)
{
	return fnow;
}

static struct upstream *
fake_open(const struct config *cfg, size_t admin, size_t server,
    const char *domain,
    const char *mailbox, const struct upstream_cbs *cbs, void *arg,
    void (*on_free)(void *), void *free_arg)
{
	struct fake_up *f;
	unsigned live = 0, per = 0;
	int i;

	assert_true(admin < cfg->n_admins);
	assert_true(server < cfg->n_servers);
	assert_non_null(domain);	/* "" when the config names one */
	/* A new session only while there is room, even right after a reload
	 * lowered the budget (sessions already open are then over it). */
	for (i = 0; i < nf; i++)
		if (!F[i].freed) {
			live++;
			per += F[i].admin == admin;
		}
	assert_true(live < cfg->session_budget);
	assert_true(per < cfg->admins[admin].max_sessions);
	assert_true(open_cap == 0 || live < open_cap);
	if (open_returns_null)
		return NULL;
	assert_true(nf < MAXF);
	f = &F[nf++];
	memset(f, 0, sizeof(*f));
	f->opened = true;
	f->admin = admin;
	f->server = server;
	snprintf(f->mailbox, sizeof(f->mailbox), "%s", mailbox);
	f->cbs = f->pool_cbs = cbs;
	f->arg = arg;
	f->on_free = on_free;
	f->free_arg = free_arg;
	return (struct upstream *)f;
}

static void
fake_close(struct upstream *u, const char *reason)
{
	struct fake_up *f = &F[fidx(u)];

	assert_false(f->freed);
	assert_int_equal(f->n_close, 0);	/* the pool closes once */
	f->n_close++;
	f->cmd_done = NULL;		/* no callbacks after close */
	f->cbs = NULL;
	if (f->closed)			/* closing by itself: idempotent */
		return;
	f->closed = true;
	snprintf(f->close_reason, sizeof(f->close_reason), "%s", reason);
}

static void
fake_set_lessee(struct upstream *u, const struct upstream_cbs *cbs, void *arg)
{
	struct fake_up *f = &F[fidx(u)];

	assert_false(f->freed);
	if (f->closed)
		return;
	f->cbs = cbs;
	f->arg = arg;
}

static int
fake_command(struct upstream *u, const char *cmd, void (*done)(void *, bool),
    void *arg)
{
	struct fake_up *f = &F[fidx(u)];

	assert_false(f->freed);
	if (f->closed || !f->ready || f->cmd_done != NULL)
		return -1;
	assert_true(f->cbs == f->pool_cbs);	/* only on unleased sessions */
	f->cmd_done = done;
	f->cmd_arg = arg;
	if (f->nhist < 32)
		snprintf(f->hist[f->nhist++], sizeof(f->hist[0]), "%s", cmd);
	return 0;
}

static bool
fake_has_cap(const struct upstream *u, const char *cap)
{
	const struct fake_up *f = &F[fidx(u)];

	return strcmp(cap, "UNSELECT") == 0 && f->cap_unselect;
}

static unsigned
fake_failed_responses(const struct upstream *u, unsigned *bad_r)
{
	const struct fake_up *f = &F[fidx(u)];

	if (bad_r != NULL)
		*bad_r = f->bad;
	return f->failed + f->bad;
}

static void
fake_schedule(uint64_t at)
{
	fsched = at;
}

static const struct pool_ops fops = {
	.now_ms = fake_now,
	.open = fake_open,
	.close = fake_close,
	.set_lessee = fake_set_lessee,
	.command = fake_command,
	.has_cap = fake_has_cap,
	.failed_responses = fake_failed_responses,
	.schedule = fake_schedule,
};

/* Run the pool's timer while it is due. */
static void
run(void)
{
	int guard = 0;

	while (fsched <= fnow) {
		assert_true(++guard < 1000);
		fsched = UINT64_MAX;
		pool_tick();
	}
}

static void
advance(uint64_t ms)
{
	fnow += ms;
	run();
}

static void
fready(int i)
{
	assert_true(F[i].cbs == F[i].pool_cbs);
	F[i].ready = true;
	F[i].cbs->ready(F[i].arg);
	run();
}

static void
ffail(int i, enum up_fail why, const char *reason)
{
	const struct upstream_cbs *cbs = F[i].cbs;

	assert_false(F[i].ready);
	assert_false(F[i].closed);
	cbs->failed(F[i].arg, why, reason);
	F[i].closed = true;		/* the upstream closes itself */
	F[i].cbs = NULL;
	run();
}

static void
fcmd(int i, bool ok)
{
	void (*done)(void *, bool) = F[i].cmd_done;

	assert_non_null(done);
	F[i].cmd_done = NULL;
	done(F[i].cmd_arg, ok);
	run();
}

/* The socket is gone: the upstream's on_free hook. */
static void
ffree(int i)
{
	assert_true(F[i].closed);
	assert_false(F[i].freed);
	F[i].freed = true;
	F[i].on_free(F[i].free_arg);
	run();
}

/* ------------------------------------------------------------ test client */

struct tclient {
	struct pool_waiter w;
	int granted;
	int failed;
	struct upstream *u;
	enum pool_fail why;
	char reason[256];
	int order;
	int lost;
};

static int grant_seq;
/* This client gives its session back from inside the grant callback. */
static struct tclient *release_on_grant;

static void
c_lost(void *arg, const char *reason)
{
	struct tclient *c = arg;

	(void)reason;
	assert_non_null(c->u);
	pool_forget(c->u);
	c->u = NULL;
	c->granted = 0;
	c->lost++;
}

static const struct upstream_cbs client_cbs = { .lost = c_lost };

static void
c_granted(struct pool_waiter *w, struct upstream *u)
{
	struct tclient *c = (struct tclient *)((char *)w -
	    offsetof(struct tclient, w));
	struct fake_up *f = &F[fidx(u)];

	assert_false(in_api);		/* never from inside the API */
	assert_null(c->u);
	assert_true(f->ready);
	assert_false(f->closed);
	/* No byte of mailbox A's session may reach a client of mailbox B. */
	assert_true(util_ieq(f->mailbox, c->w.pw_mailbox));
	c->granted++;
	c->u = u;
	c->order = ++grant_seq;
	fake_set_lessee(u, &client_cbs, c);
	if (c == release_on_grant) {
		c->u = NULL;
		pool_release(u, POOL_RELEASE_CLEAN);
	}
}

static void
c_failed(struct pool_waiter *w, enum pool_fail why, const char *reason)
{
	struct tclient *c = (struct tclient *)((char *)w -
	    offsetof(struct tclient, w));

	assert_false(in_api);
	c->failed++;
	c->why = why;
	snprintf(c->reason, sizeof(c->reason), "%s", reason);
}

static void
acq_as(struct tclient *c, const char *mb, bool poll)
{
	memset(c, 0, sizeof(*c));
	snprintf(c->w.pw_mailbox, sizeof(c->w.pw_mailbox), "%s", mb);
	c->w.pw_granted = c_granted;
	c->w.pw_failed = c_failed;
	c->w.pw_arg = c;
	c->w.pw_poll = poll;
	in_api = true;
	pool_acquire(&c->w);
	in_api = false;
}

static void
acq(struct tclient *c, const char *mb)
{
	acq_as(c, mb, false);
}

static void
cancel(struct tclient *c)
{
	in_api = true;
	pool_cancel(&c->w);
	in_api = false;
}

static void
rel(struct tclient *c, enum pool_release how)
{
	struct upstream *u = c->u;

	assert_non_null(u);
	c->u = NULL;
	c->granted = 0;
	in_api = true;
	pool_release(u, how);
	in_api = false;
	run();
}

/* ------------------------------------------------------------ config */

static struct config C;
static struct config_admin admins[4];
static struct addr_endpoint servers[3];
static char *patterns[] = {
	"LOGIN failed", "ProxyNotAuthenticated", "[UNAVAILABLE]",
	"Server Unavailable", "User is authenticated but not connected",
};

static void
set_admins(struct config *c, struct config_admin *a, size_t n)
{
	c->admins = a;
	c->n_admins = n;
}

static int
setup(void **state)
{
	static char *names[] = { "NPUMAdmin1", "NPUMAdmin2", "NPUMAdmin3",
	    "NPUMAdmin4" };
	size_t i;

	(void)state;
	memset(&C, 0, sizeof(C));
	memset(admins, 0, sizeof(admins));
	for (i = 0; i < 4; i++) {
		admins[i].name = names[i];
		admins[i].password = "s3cret";
		admins[i].max_sessions = 5;
	}
	for (i = 0; i < 3; i++) {
		snprintf(servers[i].host, sizeof(servers[i].host),
		    "cas%zu.example.com", i + 1);
		snprintf(servers[i].port, sizeof(servers[i].port), "993");
	}
	C.servers = servers;
	C.n_servers = 1;
	set_admins(&C, admins, 2);
	C.up_tls = CFG_TLS_IMPLICIT;
	C.tls_verify = true;
	C.login_format = "{domain}/{admin}/{mailbox}";
	C.domain = "example.com";
	C.pool_mode = CFG_POOL_SESSION;
	C.session_budget = 10;
	C.queue_timeout_ms = 30000;
	C.reuse_timeout_ms = 300000;
	C.login_rate = 1000;
	C.login_burst = 1000;
	C.max_logins_in_flight = 1000;
	C.transient_login_patterns = patterns;
	C.n_transient_login_patterns = nitems(patterns);
	/* [retry] defaults (DESIGN.md 3.7) */
	C.login_attempts = 3;
	C.backoff_initial_ms = 250;
	C.backoff_max_ms = 8000;
	C.server_fail_threshold = 5;
	C.server_cooldown_ms = 30000;
	C.admin_cooldown_ms = 300000;
	C.negative_cache_ttl_ms = 60000;
	retry_seed(42);
	stats_reset();

	memset(F, 0, sizeof(F));
	nf = 0;
	fnow = 1000000;
	fsched = UINT64_MAX;
	in_api = false;
	open_returns_null = false;
	open_cap = 0;
	grant_seq = 0;
	release_on_grant = NULL;
	pool_init(&C, &fops);
	return 0;
}

static int
teardown(void **state)
{
	struct pool_stats st;
	int i;

	(void)state;
	pool_shutdown();
	for (i = 0; i < nf; i++) {
		if (F[i].freed)
			continue;
		F[i].closed = true;	/* upstream_free_all at exit */
		F[i].freed = true;
		F[i].on_free(F[i].free_arg);
	}
	pool_get_stats(&st);
	assert_int_equal(st.sessions, 0);
	return 0;
}

/* Start over with the changed C (no session may be open). */
static void
reinit(void)
{
	pool_shutdown();
	pool_init(&C, &fops);
}

/* Sessions alive (opened, not freed) never exceed the budgets; the pool's
 * counters agree with the fakes. */
static void
check_budget_mode(bool strict)
{
	struct pool_stats st;
	unsigned live = 0, per[4] = { 0 };
	size_t a;
	int i;

	for (i = 0; i < nf; i++)
		if (!F[i].freed) {
			live++;
			per[F[i].admin]++;
		}
	if (strict)
		assert_true(live <= C.session_budget);
	pool_get_stats(&st);
	assert_int_equal(st.sessions, live);
	for (a = 0; a < C.n_admins; a++) {
		if (strict)
			assert_true(per[a] <= C.admins[a].max_sessions);
		assert_int_equal(pool_admin_sessions(a), per[a]);
	}
}

static void
check_budget(void)
{
	check_budget_mode(true);
}

/* A leased session belongs to one client and is never closed by the pool. */
static void
check_leases(struct tclient *cl, int n)
{
	int i, j;

	for (i = 0; i < n; i++) {
		if (cl[i].u == NULL)
			continue;
		assert_int_equal(F[fidx(cl[i].u)].n_close, 0);
		assert_true(util_ieq(F[fidx(cl[i].u)].mailbox,
		    cl[i].w.pw_mailbox));
		for (j = i + 1; j < n; j++)
			assert_true(cl[i].u != cl[j].u);
	}
}

static int
count_cmd(int i, const char *cmd)
{
	int k, n = 0;

	for (k = 0; k < F[i].nhist; k++)
		n += strcmp(F[i].hist[k], cmd) == 0;
	return n;
}

/* ------------------------------------------------------------ tests */

static void
test_no_sync_callbacks(void **state)
{
	static struct tclient c1;
	struct pool_stats st;

	(void)state;
	acq(&c1, "alice");
	/* Nothing happened inside pool_acquire: a tick is asked for now. */
	assert_int_equal(nf, 0);
	assert_int_equal(c1.granted + c1.failed, 0);
	assert_true(fsched == fnow);
	run();
	assert_int_equal(nf, 1);
	assert_string_equal(F[0].mailbox, "alice");
	pool_get_stats(&st);
	assert_int_equal(st.connecting, 1);
	assert_int_equal(st.waiters, 1);
	fready(0);
	assert_int_equal(c1.granted, 1);
	assert_ptr_equal(c1.u, U(0));
	assert_int_equal(count_cmd(0, "NOOP"), 0);	/* fresh: no check */
	pool_get_stats(&st);
	assert_int_equal(st.leased, 1);
	assert_int_equal(st.sessions, 1);
	assert_int_equal(st.waiters, 0);
	assert_int_equal(st.logins_ok, 1);
	assert_int_equal(st.reuses, 0);
	check_budget();
	rel(&c1, POOL_RELEASE_CLEAN);
	assert_int_equal(c1.granted, 0);	/* no callback from release */
}

static void
test_budget_slot_freed_at_on_free(void **state)
{
	static struct tclient a, b, c;

	(void)state;
	C.session_budget = 2;
	acq(&a, "a");
	acq(&b, "b");
	acq(&c, "c");
	run();
	assert_int_equal(nf, 2);
	check_budget();
	fready(0);
	fready(1);
	assert_int_equal(a.granted + b.granted, 2);
	rel(&a, POOL_RELEASE_DIRTY);
	assert_true(F[0].closed);
	assert_string_equal(F[0].close_reason, "dirty-return");
	advance(10);
	assert_int_equal(nf, 2);		/* not before on_free */
	check_budget();
	ffree(0);
	assert_int_equal(nf, 3);
	assert_string_equal(F[2].mailbox, "c");
	check_budget();
	fready(2);
	assert_int_equal(c.granted, 1);
}

static void
test_budget_per_admin(void **state)
{
	static struct tclient c[3];

	(void)state;
	admins[0].max_sessions = 1;
	admins[1].max_sessions = 1;
	pool_set_config(&C);
	acq(&c[0], "a");
	acq(&c[1], "b");
	acq(&c[2], "c");
	run();
	assert_int_equal(nf, 2);
	assert_true(F[0].admin != F[1].admin);
	assert_int_equal(pool_admin_sessions(0), 1);
	assert_int_equal(pool_admin_sessions(1), 1);
	check_budget();
	ffail(0, UP_FAIL_CONNECT, "connection refused");
	assert_int_equal(c[0].failed, 1);	/* its only server failed */
	assert_int_equal(c[0].why, POOL_FAIL_UNAVAILABLE);
	assert_int_equal(nf, 2);		/* slot still taken */
	ffree(0);
	assert_int_equal(nf, 3);
	assert_int_equal(F[2].admin, F[0].admin);
	check_budget();
}

static void
test_admin_choice(void **state)
{
	static const size_t want[] = { 0, 2, 0, 2, 0, 1, 2, 0, 1, 2 };
	static struct tclient c[11];
	char mb[16];
	size_t i;

	(void)state;
	admins[0].max_sessions = 4;
	admins[1].max_sessions = 2;
	admins[2].max_sessions = 4;
	set_admins(&C, admins, 3);
	C.session_budget = 100;
	pool_set_config(&C);
	for (i = 0; i < 11; i++) {
		snprintf(mb, sizeof(mb), "m%zu", i);
		acq(&c[i], mb);
		run();
		check_budget();
	}
	assert_int_equal(nf, 10);		/* all admins full */
	for (i = 0; i < 10; i++)
		assert_int_equal(F[i].admin, want[i]);
}

static void
test_admin_rate_limited_skipped(void **state)
{
	static struct tclient c[3];

	(void)state;
	admins[0].max_sessions = 10;
	admins[1].max_sessions = 5;
	C.login_rate = 1;
	C.login_burst = 1;
	reinit();
	acq(&c[0], "a");
	acq(&c[1], "b");
	acq(&c[2], "c");
	run();
	assert_int_equal(nf, 2);
	assert_int_equal(F[0].admin, 0);	/* most free */
	assert_int_equal(F[1].admin, 1);	/* admin 0 has no token */
	assert_true(fsched == fnow + 1000);	/* next token */
	advance(999);
	assert_int_equal(nf, 2);
	advance(1);
	assert_int_equal(nf, 3);
	assert_int_equal(F[2].admin, 0);
	check_budget();
}

static void
test_fifo_and_eviction(void **state)
{
	static struct tclient c[4];
	const char *mbs[] = { "a", "b", "c", "d" };
	int i;

	(void)state;
	C.session_budget = 1;
	for (i = 0; i < 4; i++)
		acq(&c[i], mbs[i]);
	run();
	assert_int_equal(nf, 1);
	for (i = 0; i < 4; i++) {
		fready(i);
		assert_int_equal(c[i].granted, 1);
		assert_int_equal(c[i].order, i + 1);
		rel(&c[i], POOL_RELEASE_CLEAN);
		check_budget();
		if (i < 3) {
			/* The next waiter needs room: the idle one goes. */
			assert_true(F[i].closed);
			assert_string_equal(F[i].close_reason, "evicted");
			assert_int_equal(nf, i + 1);
			ffree(i);
			assert_int_equal(nf, i + 2);
			assert_string_equal(F[i + 1].mailbox, mbs[i + 1]);
		}
	}
	assert_false(F[3].closed);		/* nobody waits: kept */
}

static void
test_fifo_new_logins_strict(void **state)
{
	static struct tclient a, b, c, d;

	(void)state;
	C.login_rate = 1;
	C.login_burst = 1;
	set_admins(&C, admins, 1);
	reinit();
	/* A pooled "c" first. */
	acq(&c, "c");
	run();
	fready(0);
	rel(&c, POOL_RELEASE_CLEAN);
	advance(1000);
	acq(&a, "a");
	run();
	assert_int_equal(nf, 2);		/* token spent */
	acq(&b, "b");
	acq(&d, "C");				/* its pooled session: out of order */
	run();
	assert_int_equal(nf, 2);
	assert_int_equal(count_cmd(0, "NOOP"), 1);
	fcmd(0, true);
	assert_int_equal(d.granted, 1);
	assert_int_equal(b.granted, 0);
	advance(1000);
	assert_int_equal(nf, 3);
	assert_string_equal(F[2].mailbox, "b");
}

/* An IDLE poll waiter yields to a command waiter that came later, waits
 * past queue_timeout without failing, and is served once the budget
 * frees up (DESIGN 3.3 P3, 3.4 M10). */
static void
test_poll_yields_to_command(void **state)
{
	static struct tclient a, p, b;
	struct pool_stats st;

	(void)state;
	C.session_budget = 1;
	acq(&a, "a");
	run();
	fready(0);
	assert_int_equal(a.granted, 1);
	acq_as(&p, "p", true);
	run();
	advance(10);
	acq(&b, "b");
	run();
	pool_get_stats(&st);
	assert_int_equal(st.waiters, 1);
	assert_int_equal(st.poll_waiters, 1);
	rel(&a, POOL_RELEASE_DIRTY);
	ffree(0);
	assert_int_equal(nf, 2);
	assert_string_equal(F[1].mailbox, "b");	/* the command first */
	fready(1);
	assert_int_equal(b.granted, 1);
	advance(C.queue_timeout_ms * 2);
	assert_int_equal(p.failed, 0);		/* no queue_timeout for polls */
	assert_int_equal(b.failed, 0);
	rel(&b, POOL_RELEASE_DIRTY);
	ffree(1);
	assert_int_equal(nf, 3);
	assert_string_equal(F[2].mailbox, "p");
	fready(2);
	assert_int_equal(p.granted, 1);
	pool_get_stats(&st);
	assert_int_equal(st.poll_waiters, 0);
	check_budget();
}

static void
test_queue_timeout(void **state)
{
	static struct tclient a, b;
	struct pool_stats st;

	(void)state;
	C.session_budget = 1;
	acq(&a, "a");
	run();
	fready(0);
	acq(&b, "b");
	run();
	advance(29999);
	assert_int_equal(b.failed, 0);
	pool_get_stats(&st);
	assert_int_equal(st.waiters, 1);
	assert_int_equal(st.oldest_wait_ms, 29999);
	advance(1);
	assert_int_equal(b.failed, 1);
	assert_int_equal(b.why, POOL_FAIL_TIMEOUT);
	assert_true(strlen(b.reason) > 0);
	pool_get_stats(&st);
	assert_int_equal(st.queue_timeouts, 1);
	assert_int_equal(st.waiters, 0);
	assert_int_equal(nf, 1);
}

static void
test_evict_lru(void **state)
{
	static struct tclient a, b, c;

	(void)state;
	C.session_budget = 2;
	acq(&a, "a");
	acq(&b, "b");
	run();
	fready(0);
	fready(1);
	rel(&a, POOL_RELEASE_CLEAN);
	advance(10);
	rel(&b, POOL_RELEASE_CLEAN);
	advance(10);
	acq(&c, "c");
	run();
	assert_true(F[0].closed);		/* a: least recently used */
	assert_false(F[1].closed);
	assert_int_equal(nf, 2);
	ffree(0);
	assert_int_equal(nf, 3);
	fready(2);
	assert_int_equal(c.granted, 1);
	check_budget();
}

/* A second client of a mailbox whose session is busy waits for it (up to
 * POOL_BUSY_WAIT_MS) instead of logging in a copy; after that it logs in. */
static void
test_busy_mailbox_waits(void **state)
{
	static struct tclient a, b, c, d;

	(void)state;
	acq(&a, "a");
	run();
	acq(&b, "a");			/* a's session is still logging in */
	run();
	assert_int_equal(nf, 1);
	fready(0);
	assert_int_equal(a.granted, 1);
	advance(100);
	run();
	assert_int_equal(nf, 1);	/* leased to a: b still waits */
	rel(&a, POOL_RELEASE_CLEAN);
	run();
	fcmd(0, true);			/* the NOOP check */
	assert_int_equal(b.granted, 1);
	assert_ptr_equal(b.u, U(0));
	assert_int_equal(nf, 1);
	/* Held for longer: after 500 ms c logs in a second copy. */
	acq(&c, "a");
	run();
	advance(499);
	run();
	assert_int_equal(nf, 1);
	advance(1);
	run();
	assert_int_equal(nf, 2);
	fready(1);
	assert_int_equal(c.granted, 1);
	/* Another mailbox never waits. */
	acq(&d, "d");
	run();
	assert_int_equal(nf, 3);
	check_budget();
}

static void
test_reuse_case_insensitive(void **state)
{
	static struct tclient a, b;
	struct pool_stats st;

	(void)state;
	acq(&a, "Alice");
	run();
	fready(0);
	rel(&a, POOL_RELEASE_CLEAN);
	pool_get_stats(&st);
	assert_int_equal(st.idle, 1);
	acq(&b, "ALICE");
	run();
	assert_int_equal(nf, 1);		/* no new login */
	assert_int_equal(count_cmd(0, "NOOP"), 1);
	assert_int_equal(b.granted, 0);		/* not before the NOOP's OK */
	fcmd(0, true);
	assert_int_equal(b.granted, 1);
	assert_ptr_equal(b.u, U(0));
	pool_get_stats(&st);
	assert_int_equal(st.reuses, 1);
	assert_int_equal(st.logins_ok, 1);
	assert_int_equal(st.idle, 0);
}

static void
test_release_selected(void **state)
{
	static struct tclient a, b;

	(void)state;
	acq(&a, "a");
	acq(&b, "b");
	run();
	F[1].cap_unselect = true;
	fready(0);
	fready(1);
	rel(&a, POOL_RELEASE_SELECTED);
	rel(&b, POOL_RELEASE_SELECTED);
	assert_int_equal(count_cmd(0, "EXAMINE INBOX"), 1);
	assert_int_equal(count_cmd(0, "UNSELECT"), 0);
	assert_int_equal(count_cmd(1, "UNSELECT"), 1);
	assert_int_equal(count_cmd(1, "EXAMINE INBOX"), 0);
	fcmd(0, true);
	fcmd(1, true);
	assert_false(F[0].closed);
	assert_false(F[1].closed);
	/* Again on a: the reset fails and the session is closed. */
	acq(&a, "a");
	run();
	fcmd(0, true);				/* NOOP */
	assert_int_equal(a.granted, 1);
	rel(&a, POOL_RELEASE_SELECTED);
	fcmd(0, false);
	assert_true(F[0].closed);
	assert_string_equal(F[0].close_reason, "reset-failed");
	assert_int_equal(count_cmd(0, "CLOSE"), 0);
	assert_int_equal(count_cmd(1, "CLOSE"), 0);
}

/* The console's pause (DESIGN 3.3 P11): no login starts, a pooled session
 * of the waiter's mailbox still serves it, queue_timeout still bounds the
 * wait, resume serves the queue at once. */
static void
test_pause(void **state)
{
	static struct tclient a, a2, b, c;

	(void)state;
	acq(&a, "a");
	run();
	fready(0);
	rel(&a, POOL_RELEASE_CLEAN);
	pool_pause(true);
	assert_true(pool_is_paused());
	acq(&b, "b");
	run();
	assert_int_equal(nf, 1);		/* no new login */
	assert_int_equal(b.granted + b.failed, 0);
	acq(&a2, "a");				/* its pooled session */
	run();
	fcmd(0, true);				/* NOOP */
	assert_int_equal(a2.granted, 1);
	pool_pause(false);
	assert_false(pool_is_paused());
	run();
	assert_int_equal(nf, 2);
	assert_string_equal(F[1].mailbox, "b");
	fready(1);
	assert_int_equal(b.granted, 1);

	/* Paused until queue_timeout: the waiter is told why. */
	pool_pause(true);
	acq(&c, "c");
	advance(C.queue_timeout_ms);
	assert_int_equal(c.failed, 1);
	assert_int_equal(c.why, POOL_FAIL_TIMEOUT);
	assert_non_null(strstr(c.w.pw_explain, "paused by the operator"));
	assert_int_equal(nf, 2);
	pool_pause(false);
}

/* The console's drain (DESIGN 3.3 P11): no login on a drained server; its
 * idle sessions close now, leased ones at release; kept across a reload
 * by name; every server drained: logins wait. */
static void
test_drain(void **state)
{
	static struct addr_endpoint swapped[2];
	static struct config c2;
	static struct tclient a, b, c, d;

	(void)state;
	C.n_servers = 2;
	pool_set_config(&C);
	acq(&a, "a");
	acq(&b, "b");
	run();
	fready(0);
	fready(1);
	assert_int_equal(F[0].server, 0);
	assert_int_equal(F[1].server, 0);
	rel(&b, POOL_RELEASE_CLEAN);		/* F[1] idle on server 0 */
	assert_int_equal(pool_server_drain(0, true), 0);
	assert_true(pool_server_draining(0));
	assert_false(pool_server_draining(1));
	assert_true(F[1].closed);
	assert_string_equal(F[1].close_reason, "server-drained");
	assert_false(F[0].closed);		/* leased: works on */
	acq(&c, "c");
	run();
	assert_int_equal(F[2].server, 1);
	fready(2);
	rel(&a, POOL_RELEASE_CLEAN);		/* back from server 0: closed */
	assert_true(F[0].closed);
	assert_string_equal(F[0].close_reason, "server-drained");
	rel(&c, POOL_RELEASE_CLEAN);		/* server 1: pooled */
	assert_false(F[2].closed);
	assert_int_equal(pool_server_drain(2, true), -1);

	/* A reload that reorders the servers keeps the drain on its name. */
	swapped[0] = servers[1];
	swapped[1] = servers[0];
	c2 = C;
	c2.servers = swapped;
	pool_set_config(&c2);
	assert_true(pool_server_draining(1));
	assert_false(pool_server_draining(0));

	/* Every server drained: a login waits until one is enabled. */
	assert_int_equal(pool_server_drain(0, true), 0);
	assert_true(F[2].closed);		/* the idle one on it */
	ffree(0);
	ffree(1);
	ffree(2);
	acq(&d, "d");
	advance(1000);
	assert_int_equal(nf, 3);
	assert_int_equal(d.granted + d.failed, 0);
	assert_int_equal(pool_server_drain(1, false), 0);
	run();
	assert_int_equal(nf, 4);
	assert_int_equal(F[3].server, 1);
	assert_string_equal(c2.servers[F[3].server].host, "cas1.example.com");
	fready(3);
	assert_int_equal(d.granted, 1);
}

static void
test_release_dirty(void **state)
{
	static struct tclient a;
	struct pool_stats st;

	(void)state;
	acq(&a, "a");
	run();
	fready(0);
	rel(&a, POOL_RELEASE_DIRTY);
	assert_true(F[0].closed);
	assert_int_equal(F[0].nhist, 0);
	pool_get_stats(&st);
	assert_int_equal(st.sessions, 1);
	assert_int_equal(st.idle, 0);
	ffree(0);
	pool_get_stats(&st);
	assert_int_equal(st.sessions, 0);
}

static void
test_retire_on_counters(void **state)
{
	static struct tclient c[3];

	(void)state;
	acq(&c[0], "a");
	acq(&c[1], "b");
	acq(&c[2], "c");
	run();
	fready(0);
	fready(1);
	fready(2);
	F[0].failed = 6;
	F[1].failed = 1;
	F[1].bad = 2;
	F[2].failed = 4;
	F[2].bad = 1;
	rel(&c[0], POOL_RELEASE_CLEAN);
	rel(&c[1], POOL_RELEASE_CLEAN);
	rel(&c[2], POOL_RELEASE_CLEAN);
	assert_true(F[0].closed);
	assert_string_equal(F[0].close_reason, "retire-counters");
	assert_true(F[1].closed);
	assert_string_equal(F[1].close_reason, "retire-counters");
	assert_false(F[2].closed);		/* 5 failed, 1 BAD: kept */
}

static void
test_idle_retirement(void **state)
{
	static struct tclient a;

	(void)state;
	acq(&a, "a");
	run();
	fready(0);
	rel(&a, POOL_RELEASE_CLEAN);
	assert_true(fsched == fnow + C.reuse_timeout_ms);
	advance(C.reuse_timeout_ms - 1);
	assert_false(F[0].closed);
	advance(1);
	assert_true(F[0].closed);
	assert_string_equal(F[0].close_reason, "idle-timeout");
}

static void
test_dead_pooled_replaced(void **state)
{
	static struct tclient a, b;

	(void)state;
	acq(&a, "a");
	run();
	fready(0);
	rel(&a, POOL_RELEASE_CLEAN);
	acq(&b, "a");
	run();
	fcmd(0, false);				/* NOOP: session lost */
	assert_true(F[0].closed);
	assert_int_equal(nf, 2);		/* new login, silently */
	assert_int_equal(b.failed + b.granted, 0);
	fready(1);
	assert_int_equal(b.granted, 1);
	assert_ptr_equal(b.u, U(1));
	check_budget();
}

static void
test_dead_pooled_budget_full(void **state)
{
	static struct tclient a, b;

	(void)state;
	C.session_budget = 1;
	acq(&a, "a");
	run();
	fready(0);
	rel(&a, POOL_RELEASE_CLEAN);
	acq(&b, "a");
	run();
	fcmd(0, false);
	assert_int_equal(nf, 1);		/* waits for the slot */
	ffree(0);
	assert_int_equal(nf, 2);
	fready(1);
	assert_int_equal(b.granted, 1);
	assert_int_equal(b.failed, 0);
}

static void
test_token_bucket(void **state)
{
	static struct tclient c[6];
	char mb[8];
	int i;

	(void)state;
	C.login_rate = 5;
	C.login_burst = 5;
	admins[0].max_sessions = 100;
	set_admins(&C, admins, 1);
	C.session_budget = 100;
	reinit();
	for (i = 0; i < 6; i++) {
		snprintf(mb, sizeof(mb), "m%d", i);
		acq(&c[i], mb);
	}
	run();
	assert_int_equal(nf, 5);
	assert_true(fsched == fnow + 200);
	advance(199);
	assert_int_equal(nf, 5);
	advance(1);
	assert_int_equal(nf, 6);
	assert_string_equal(F[5].mailbox, "m5");
}

/* The fakes alive for mailbox mb and not yet closed, newest last. */
static int
last_open(void)
{
	return nf - 1;
}

static void
test_login_failure_classes(void **state)
{
	static struct tclient c[3];
	const struct stats_snapshot *ss = stats_get();

	(void)state;
	C.login_attempts = 1;		/* no retry: the class alone */
	acq(&c[0], "a");
	acq(&c[1], "b");
	acq(&c[2], "c");
	run();
	ffail(0, UP_FAIL_LOGIN, "NO LOGIN failed.");
	ffail(1, UP_FAIL_LOGIN, "no login FAILED.");
	/* Exchange answered: a refusal, not "unreachable" (issue 13). */
	assert_int_equal(c[0].why, POOL_FAIL_REFUSED);
	assert_int_equal(c[1].why, POOL_FAIL_REFUSED);
	/* A final refusal is tried with the other admin first. */
	ffail(2, UP_FAIL_LOGIN, "NO [AUTHENTICATIONFAILED] Authentication failed.");
	assert_int_equal(c[2].failed, 0);
	/* Three failures in a row and no success: logins slow down. */
	assert_true(retry_login_not_before(fnow) > fnow);
	assert_int_equal(nf, 3);
	advance(250);
	assert_int_equal(nf, 4);
	assert_string_equal(F[3].mailbox, "c");
	assert_true(F[3].admin != F[2].admin);
	ffail(3, UP_FAIL_LOGIN, "NO [AUTHENTICATIONFAILED] Authentication failed.");
	assert_int_equal(c[2].failed, 1);
	assert_int_equal(c[2].why, POOL_FAIL_AUTH);
	assert_int_equal(c[0].failed + c[1].failed + c[2].failed, 3);
	assert_int_equal(nf, 4);
	assert_string_equal(c[2].reason,
	    "NO [AUTHENTICATIONFAILED] Authentication failed.");
	assert_int_equal(ss->retries[STATS_RETRY_LOGIN_REFUSED], 1);
}

/* A transient refusal is retried on a fresh connection, with the other
 * admin and the other server, after a backoff, login_attempts in all. */
static void
test_transient_retry_other_admin(void **state)
{
	static struct tclient a, b;
	const struct stats_snapshot *ss = stats_get();
	uint64_t t0;

	(void)state;
	C.n_servers = 2;
	pool_set_config(&C);
	acq(&a, "a");
	run();
	assert_int_equal(nf, 1);
	assert_int_equal(F[0].server, 0);
	t0 = fnow;
	ffail(0, UP_FAIL_LOGIN, "NO LOGIN failed.");
	assert_int_equal(a.failed, 0);
	assert_int_equal(nf, 1);		/* backing off */
	assert_true(fsched >= t0 + 125 && fsched <= t0 + 250);
	advance(250);
	assert_int_equal(nf, 2);
	assert_true(F[1].admin != F[0].admin);	/* another admin */
	assert_int_equal(F[1].server, 1);	/* another server */
	assert_false(F[0].n_close > 0 && F[1].n_close > 0);
	ffail(1, UP_FAIL_LOGIN,
	    "NO [Error=ProxyNotAuthenticated Proxy=mbx1:1993:SSL] LOGIN failed.");
	advance(249);
	assert_true(nf == 2 || fsched <= fnow + 251);
	advance(500);
	assert_int_equal(nf, 3);
	assert_int_equal(F[2].server, 0);	/* not the last one */
	ffail(2, UP_FAIL_LOGIN, "NO Server Unavailable. 15");
	assert_int_equal(a.failed, 1);		/* login_attempts = 3 spent */
	assert_int_equal(a.why, POOL_FAIL_REFUSED);	/* answered: refused */
	assert_string_equal(a.reason, "NO Server Unavailable. 15");
	advance(20000);
	assert_int_equal(nf, 3);		/* never a 4th */
	assert_int_equal(ss->retries[STATS_RETRY_LOGIN_TRANSIENT], 2);
	/* A session the server took for an authenticated one, whose
	 * CAPABILITY then got "BAD User is authenticated but not
	 * connected.": the same failure, retried. */
	acq(&b, "b");
	advance(10000);				/* past the slowdown */
	assert_int_equal(nf, 4);
	ffail(3, UP_FAIL_PROTOCOL, "BAD User is authenticated but not connected.");
	advance(10000);
	assert_int_equal(nf, 5);
	assert_int_equal(b.failed, 0);
	fready(4);
	assert_int_equal(b.granted, 1);
	check_budget();
}

/* A final refusal tries the admins that have not refused the mailbox,
 * then answers AUTH and caches it: the next request opens nothing. */
static void
test_final_then_negcache(void **state)
{
	static struct tclient a, b, c, d;

	(void)state;
	set_admins(&C, admins, 3);
	pool_set_config(&C);
	acq(&a, "ghost");
	run();
	ffail(0, UP_FAIL_LOGIN, "NO no such user");
	assert_int_equal(nf, 2);		/* at once: another admin */
	ffail(1, UP_FAIL_LOGIN, "NO no such user");
	assert_int_equal(nf, 3);
	assert_true(F[0].admin != F[1].admin && F[1].admin != F[2].admin &&
	    F[0].admin != F[2].admin);
	assert_int_equal(a.failed, 0);
	ffail(2, UP_FAIL_LOGIN, "NO no such user");
	assert_int_equal(a.failed, 1);
	assert_int_equal(a.why, POOL_FAIL_AUTH);
	assert_int_equal(nf, 3);
	/* The mailbox's fault, not the accounts'. */
	assert_false(retry_admin_quarantined(0, fnow));
	assert_false(retry_admin_quarantined(1, fnow));
	assert_false(retry_admin_quarantined(2, fnow));

	/* Cached, case-insensitively; answered from the tick. */
	acq(&b, "GHOST");
	assert_int_equal(b.failed, 0);
	run();
	assert_int_equal(b.failed, 1);
	assert_int_equal(b.why, POOL_FAIL_AUTH);
	assert_int_equal(nf, 3);		/* no open */
	/* Past negative_cache_ttl Exchange is asked again. */
	advance(C.negative_cache_ttl_ms);
	acq(&c, "ghost");
	run();
	assert_int_equal(nf, 4);
	assert_int_equal(c.failed, 0);
	fready(3);
	assert_int_equal(c.granted, 1);
	/* Another mailbox never was cached. */
	acq(&d, "ghost2");
	run();
	assert_int_equal(nf, 5);
}

/*
 * DESIGN 3.5 R5 (issue 13): "NO LOGIN failed." from every account for one
 * mailbox while another mailbox logged in a moment ago.  Neither account
 * logged in since, so one probe decides: the mailbox that worked logs in
 * with an account that refused this one: the mailbox is at fault: AUTH,
 * cached, no quarantine, no slowdown; the probe's session stays pooled.
 */
static void
test_missing_mailbox_probe(void **state)
{
	static struct tclient g, a, b, h;
	const struct stats_snapshot *ss = stats_get();
	struct pool_stats st;

	(void)state;
	acq(&g, "good");
	run();
	fready(0);
	assert_int_equal(g.granted, 1);
	acq(&a, "ghost");
	run();
	assert_int_equal(nf, 2);
	ffail(1, UP_FAIL_LOGIN, "NO LOGIN failed.");
	advance(250);
	assert_int_equal(nf, 3);
	assert_true(F[2].admin != F[1].admin);
	ffail(2, UP_FAIL_LOGIN, "NO LOGIN failed.");
	/* The probe: at once, "good" with the first account that refused. */
	assert_int_equal(nf, 4);
	assert_string_equal(F[3].mailbox, "good");
	assert_int_equal(F[3].admin, F[1].admin);
	assert_int_equal(a.failed, 0);
	fready(3);
	assert_int_equal(a.failed, 1);
	assert_int_equal(a.why, POOL_FAIL_AUTH);
	assert_string_equal(a.reason, "NO LOGIN failed.");
	assert_string_equal(a.w.pw_explain,
	    "with every admin account while other mailboxes log in");
	assert_false(retry_admin_quarantined(0, fnow));
	assert_false(retry_admin_quarantined(1, fnow));
	assert_false(retry_slowdown());
	assert_int_equal(retry_login_not_before(fnow), fnow);
	assert_int_equal(ss->login_failures[STATS_ATTR_MAILBOX], 2);
	pool_get_stats(&st);
	assert_int_equal(st.idle, 1);		/* the probe's session */
	/* Cached: no login at all the next time. */
	acq(&b, "ghost");
	run();
	assert_int_equal(b.why, POOL_FAIL_AUTH);
	assert_int_equal(nf, 4);
	/* The probe's session serves "good" without a login. */
	acq(&h, "good");
	run();
	fcmd(3, true);
	assert_int_equal(h.granted, 1);
	assert_int_equal(nf, 4);
	check_budget();
}

/* Every account logged in another mailbox after refusing this one: the
 * evidence is there, no probe needed. */
static void
test_missing_mailbox_evidence(void **state)
{
	static struct tclient a, o[2];

	(void)state;
	acq(&a, "ghost");
	run();
	ffail(0, UP_FAIL_LOGIN, "NO LOGIN failed.");
	/* Meanwhile both accounts log in other mailboxes. */
	acq(&o[0], "o0");
	run();
	acq(&o[1], "o1");
	run();
	assert_int_equal(nf, 3);
	assert_true(F[1].admin != F[2].admin);
	fready(1);
	fready(2);
	advance(250);
	assert_int_equal(nf, 4);
	ffail(3, UP_FAIL_LOGIN, "NO LOGIN failed.");
	assert_int_equal(a.failed, 1);
	assert_int_equal(a.why, POOL_FAIL_AUTH);
	assert_int_equal(nf, 4);		/* two logins, no probe */
	acq(&a, "ghost");			/* cached */
	run();
	assert_int_equal(a.why, POOL_FAIL_AUTH);
	assert_int_equal(nf, 4);
}

/* The probe fails too (every account at MaxConnectionsPerUser, say):
 * not the mailbox's fault: REFUSED, not cached. */
static void
test_probe_fails_not_final(void **state)
{
	static struct tclient g, a;

	(void)state;
	acq(&g, "good");
	run();
	fready(0);
	acq(&a, "full");
	run();
	ffail(1, UP_FAIL_LOGIN, "NO LOGIN failed.");
	advance(250);
	ffail(2, UP_FAIL_LOGIN, "NO LOGIN failed.");
	assert_int_equal(nf, 4);
	assert_string_equal(F[3].mailbox, "good");
	ffail(3, UP_FAIL_LOGIN, "NO LOGIN failed.");
	assert_int_equal(a.failed, 1);		/* login_attempts = 3 spent */
	assert_int_equal(a.why, POOL_FAIL_REFUSED);
	advance(20000);
	assert_int_equal(nf, 4);
	acq(&a, "full");			/* not cached: asked again */
	run();
	assert_int_equal(nf, 5);
}

/* No login succeeded yet: nothing to compare with: REFUSED, saying so,
 * after login_attempts; not cached. */
static void
test_no_evidence_refused(void **state)
{
	static struct tclient a;

	(void)state;
	acq(&a, "ghost");
	run();
	ffail(0, UP_FAIL_LOGIN, "NO LOGIN failed.");
	advance(250);
	ffail(1, UP_FAIL_LOGIN, "NO LOGIN failed.");
	advance(500);
	assert_int_equal(nf, 3);
	ffail(2, UP_FAIL_LOGIN, "NO LOGIN failed.");
	assert_int_equal(a.failed, 1);
	assert_int_equal(a.why, POOL_FAIL_REFUSED);
	assert_non_null(strstr(a.w.pw_explain, "no login succeeded recently"));
	assert_false(retry_slowdown());		/* one mailbox only */
	acq(&a, "ghost");			/* not cached */
	run();
	assert_int_equal(nf, 4);
}

/* One account refuses a mailbox the other serves (FullAccess on one
 * only): the other is tried first for it afterwards. */
static void
test_preferred_admin(void **state)
{
	static struct tclient a, b;
	size_t good;

	(void)state;
	acq(&a, "shared");
	run();
	ffail(0, UP_FAIL_LOGIN, "NO LOGIN failed.");
	advance(250);
	good = F[1].admin;
	assert_true(good != F[0].admin);
	fready(1);
	assert_int_equal(a.granted, 1);
	rel(&a, POOL_RELEASE_DIRTY);
	ffree(1);
	for (int k = 0; k < 3; k++) {
		acq(&b, "shared");
		run();
		assert_int_equal(F[last_open()].admin, good);
		fready(last_open());
		assert_int_equal(b.granted, 1);
		rel(&b, POOL_RELEASE_DIRTY);
		ffree(last_open());
	}
}

/* An admin whose logins fail while the other's succeed is quarantined
 * and no longer chosen. */
static void
test_quarantined_admin_not_chosen(void **state)
{
	static struct tclient c[5];
	char mb[8];
	int i, k;

	(void)state;
	for (i = 0; i < 3; i++) {
		snprintf(mb, sizeof(mb), "m%d", i);
		acq(&c[i], mb);
		run();
		k = last_open();
		assert_int_equal(F[k].admin, 0);	/* the most free */
		ffail(k, UP_FAIL_LOGIN, "NO [AUTHENTICATIONFAILED] bad password");
		ffree(k);
		assert_int_equal(F[last_open()].admin, 1);
		fready(last_open());
		assert_int_equal(c[i].granted, 1);
		assert_int_equal(retry_admin_quarantined(0, fnow), i == 2);
	}
	assert_false(retry_admin_quarantined(1, fnow));
	/* Admin 0 has the most room, but it is quarantined. */
	acq(&c[3], "m3");
	run();
	assert_int_equal(F[last_open()].admin, 1);
	fready(last_open());
	assert_int_equal(c[3].granted, 1);
	/* After admin_cooldown it is tried again. */
	advance(C.admin_cooldown_ms);
	assert_false(retry_admin_quarantined(0, fnow));
	acq(&c[4], "m4");
	run();
	assert_int_equal(F[last_open()].admin, 0);
	check_budget();
}

static void
test_server_failover(void **state)
{
	static struct tclient a;
	const struct stats_snapshot *ss = stats_get();
	struct pool_stats st;
	uint64_t t0;

	(void)state;
	C.n_servers = 3;
	C.session_budget = 1;
	pool_set_config(&C);
	acq(&a, "a");
	run();
	assert_int_equal(F[0].server, 0);
	t0 = fnow;
	ffail(0, UP_FAIL_CONNECT, "connection refused");
	assert_int_equal(a.failed, 0);
	assert_int_equal(nf, 1);		/* budget 1: after on_free */
	ffree(0);
	assert_int_equal(nf, 1);		/* and after the backoff */
	assert_true(fsched >= t0 + 125 && fsched <= t0 + 250);
	advance(250);
	assert_int_equal(nf, 2);
	assert_int_equal(F[1].server, 1);
	t0 = fnow;
	ffail(1, UP_FAIL_TLS, "handshake failed");
	ffree(1);
	assert_true(fsched >= t0 + 250 && fsched <= t0 + 500);
	advance(500);
	assert_int_equal(F[2].server, 2);
	ffail(2, UP_FAIL_CERT, "certificate has expired");
	assert_int_equal(a.failed, 1);		/* every server failed once */
	assert_int_equal(a.why, POOL_FAIL_UNAVAILABLE);
	assert_string_equal(a.reason, "certificate has expired");
	ffree(2);
	assert_int_equal(nf, 3);
	pool_get_stats(&st);
	assert_int_equal(st.logins_failed, 3);
	assert_int_equal(ss->retries[STATS_RETRY_CONNECT], 1);
	assert_int_equal(ss->retries[STATS_RETRY_TLS], 1);
	assert_int_equal(retry_server_failures(0), 1);
	assert_string_equal(retry_server_last_failure(2),
	    "certificate has expired");

	/* One good server after a bad one. */
	acq(&a, "a");
	run();
	assert_int_equal(F[3].server, 0);
	ffail(3, UP_FAIL_GREETING,
	    "server greeted with \"* BYE Connection is closed. 14\"");
	ffree(3);
	advance(250);
	fready(4);
	assert_int_equal(F[4].server, 1);
	assert_int_equal(a.granted, 1);
	assert_int_equal(retry_server_failures(1), 0);	/* ok resets */
	assert_int_equal(ss->retries[STATS_RETRY_GREETING], 1);
}

/* DESIGN 3.3 P12, 3.5 R14: at most max_logins_in_flight logins to a server
 * at once, later waiters wait in order; a timeout while the server logs
 * in others halves the bound and backs the waiter off, it neither fails
 * the waiter nor counts towards server_fail_threshold. */
static void
test_logins_in_flight_overload(void **state)
{
	static struct tclient c[5];
	static const char *mbs[] = { "a", "b", "c", "d", "e" };
	int i;

	(void)state;
	C.max_logins_in_flight = 2;
	C.server_fail_threshold = 1;
	C.connect_timeout_ms = 10000;
	C.login_timeout_ms = 20000;
	reinit();
	for (i = 0; i < 5; i++)
		acq(&c[i], mbs[i]);
	run();
	assert_int_equal(nf, 2);		/* the bound, not the budget */
	assert_string_equal(F[1].mailbox, "b");
	fready(0);
	assert_int_equal(c[0].granted, 1);
	assert_int_equal(nf, 3);		/* one ended, the next in order */
	assert_string_equal(F[2].mailbox, "c");
	/* Overload: b's handshake times out while a logged in. */
	ffail(1, UP_FAIL_TIMEOUT, "no answer from the server within "
	    "connect_timeout");
	assert_int_equal(c[1].failed, 0);
	assert_true(retry_server_up(0, fnow));
	assert_int_equal(retry_server_overloads(0), 1);
	assert_int_equal(retry_server_limit(0), 1);
	advance(1000);
	assert_int_equal(nf, 3);		/* c's login holds the bound */
	fready(2);
	assert_int_equal(c[2].granted, 1);
	assert_int_equal(retry_server_limit(0), 2);
	/* b (first in the queue, its backoff over) and then d. */
	assert_int_equal(nf, 5);
	assert_string_equal(F[3].mailbox, "b");
	assert_string_equal(F[4].mailbox, "d");
	fready(3);
	fready(4);
	assert_int_equal(nf, 6);
	fready(5);
	for (i = 0; i < 5; i++) {
		assert_int_equal(c[i].granted, 1);
		assert_int_equal(c[i].failed, 0);
	}
	assert_int_equal(retry_server_failures(0), 0);
	C.max_logins_in_flight = 1000;
	C.server_fail_threshold = 5;
}

/* Servers that keep failing go down; while all are down a request fails
 * at once, without a login; after the cooldown one probe goes. */
static void
test_all_servers_down(void **state)
{
	static struct tclient c[6];
	int i;

	(void)state;
	C.n_servers = 2;
	C.server_fail_threshold = 2;
	pool_set_config(&C);
	for (i = 0; i < 2; i++) {
		acq(&c[i], "a");
		run();
		ffail(last_open(), UP_FAIL_CONNECT, "connection refused");
		advance(8000);
		ffail(last_open(), UP_FAIL_TIMEOUT, "no greeting");
		assert_int_equal(c[i].failed, 1);
		assert_int_equal(c[i].why, POOL_FAIL_UNAVAILABLE);
	}
	assert_int_equal(nf, 4);
	assert_false(retry_server_up(0, fnow));
	assert_false(retry_server_up(1, fnow));
	assert_true(retry_all_servers_down(fnow));
	acq(&c[2], "b");
	run();
	assert_int_equal(c[2].failed, 1);
	assert_int_equal(c[2].why, POOL_FAIL_UNAVAILABLE);
	assert_non_null(strstr(c[2].reason, "every upstream server is down"));
	assert_int_equal(nf, 4);		/* nothing opened */

	/* Cooldown over: one probe per server, not one per request. */
	advance(C.server_cooldown_ms);
	assert_false(retry_all_servers_down(fnow));
	acq(&c[3], "c");
	acq(&c[4], "d");
	acq(&c[5], "e");
	run();
	assert_int_equal(nf, 6);
	assert_int_equal(F[4].server, 0);
	assert_int_equal(F[5].server, 1);
	ffail(5, UP_FAIL_CONNECT, "connection refused");	/* probe fails */
	fready(4);						/* probe works */
	assert_int_equal(c[3].granted, 1);
	assert_true(retry_server_up(0, fnow));
	assert_false(retry_server_up(1, fnow));
	/* c[4] retries on server 0 after its backoff; c[5] gets one too. */
	advance(8000);
	fready(6);
	fready(7);
	assert_int_equal(F[6].server, 0);
	assert_int_equal(F[7].server, 0);
	assert_int_equal(c[4].granted + c[5].granted, 2);
	check_budget();
}

static void
test_open_null(void **state)
{
	static struct tclient a;

	(void)state;
	open_returns_null = true;
	acq(&a, "a");
	run();
	assert_int_equal(a.failed, 1);
	assert_int_equal(a.why, POOL_FAIL_UNAVAILABLE);
	check_budget();
}

/* Server of the session whose mailbox is arg (first field). */
struct find_si {
	const char *mailbox;
	size_t server;
	int found;
};

static void
find_si_cb(const struct pool_session_info *si, void *arg)
{
	struct find_si *f = arg;

	if (strcmp(si->mailbox, f->mailbox) == 0) {
		f->server = si->server;
		f->found++;
	}
}

static size_t
session_server(const char *mailbox)
{
	struct find_si f = { mailbox, 0, 0 };

	pool_foreach_session(find_si_cb, &f);
	assert_int_equal(f.found, 1);
	return f.server;
}

/* A reload that reorders servers while a login is under way and a session
 * is leased: the failure counts against the server that failed, the retry
 * goes to the other one, and the leased session is shown under its own
 * server (and under none once a reload drops it). */
static void
test_reload_reorders_servers(void **state)
{
	static struct config c2, c3;
	static struct addr_endpoint swapped[2], only2[1];
	static struct tclient a, b;

	(void)state;
	C.n_servers = 2;
	C.session_budget = 3;
	pool_set_config(&C);
	acq(&b, "b");
	run();
	fready(0);
	assert_int_equal(b.granted, 1);
	acq(&a, "a");
	run();
	assert_int_equal(F[1].server, 0);		/* cas1, logging in */
	swapped[0] = servers[1];
	swapped[1] = servers[0];
	c2 = C;
	c2.servers = swapped;
	pool_set_config(&c2);
	assert_int_equal(session_server("b"), 1);	/* cas1 is now 1 */
	ffail(1, UP_FAIL_CONNECT, "connection refused");
	assert_int_equal(retry_server_failures(1), 1);	/* cas1 */
	assert_int_equal(retry_server_failures(0), 0);	/* cas2 */
	ffree(1);
	advance(250);
	assert_int_equal(nf, 3);
	assert_int_equal(F[2].server, 0);		/* cas2, not cas1 again */
	fready(2);
	assert_int_equal(a.granted, 1);
	only2[0] = servers[1];
	c3 = c2;
	c3.servers = only2;
	c3.n_servers = 1;
	pool_set_config(&c3);
	assert_int_equal(session_server("b"), (size_t)-1);
	assert_int_equal(session_server("a"), 0);
	rel(&a, POOL_RELEASE_CLEAN);
	rel(&b, POOL_RELEASE_CLEAN);
	C = c3;
}

static void
test_reload_raises_budget(void **state)
{
	static struct config c2;
	static struct tclient a, b;

	(void)state;
	C.session_budget = 1;
	pool_set_config(&C);
	acq(&a, "a");
	acq(&b, "b");
	run();
	fready(0);
	assert_int_equal(nf, 1);
	c2 = C;
	c2.session_budget = 2;
	pool_set_config(&c2);
	assert_int_equal(nf, 1);		/* served from the tick */
	run();
	assert_int_equal(nf, 2);
	assert_string_equal(F[1].mailbox, "b");
	C = c2;
}

static void
test_reload_lowers_budget(void **state)
{
	static struct config c2;
	static struct tclient a, b, c, d;
	struct pool_stats st;

	(void)state;
	C.session_budget = 3;
	pool_set_config(&C);
	acq(&a, "a");
	acq(&b, "b");
	acq(&c, "c");
	run();
	fready(0);
	fready(1);
	fready(2);
	rel(&c, POOL_RELEASE_CLEAN);
	c2 = C;
	c2.session_budget = 1;
	pool_set_config(&c2);
	run();
	assert_true(F[2].closed);		/* idle retired */
	assert_string_equal(F[2].close_reason, "over-budget");
	assert_false(F[0].closed);		/* leased ones kept */
	assert_false(F[1].closed);
	acq(&d, "d");
	run();
	ffree(2);
	assert_int_equal(nf, 3);		/* 2 > 1: no new login */
	rel(&a, POOL_RELEASE_CLEAN);
	assert_true(F[0].closed);		/* still over: not pooled */
	ffree(0);
	assert_int_equal(nf, 3);		/* at the budget */
	pool_get_stats(&st);
	assert_int_equal(st.sessions, 1);
	rel(&b, POOL_RELEASE_CLEAN);
	assert_true(F[1].closed);		/* evicted for d */
	ffree(1);
	assert_int_equal(nf, 4);
	fready(3);
	assert_int_equal(d.granted, 1);
	C = c2;
	check_budget();
}

/* DESIGN 3.3 P13: the budget the descriptors leave. */
static void
test_budget_fit(void **state)
{
	(void)state;
	/* No limit: session_budget or the admins' max_sessions added up. */
	assert_int_equal(pool_budget_fit(2048, 16, 0, 64, 19000), 16);
	assert_int_equal(pool_budget_fit(2048, 4096, 0, 64, 19000), 2048);
	/* 20,000 descriptors, 64 kept for the rest: up to 17,888 clients
	 * leave the whole budget, 19,000 leave 936 sessions. */
	assert_int_equal(pool_budget_fit(2048, 2048, 20000, 64, 17888), 2048);
	assert_int_equal(pool_budget_fit(2048, 2048, 20000, 64, 17889), 2047);
	assert_int_equal(pool_budget_fit(2048, 2048, 20000, 64, 19000), 936);
	/* Nearly full or over: the floor, unless a budget is lower. */
	assert_int_equal(pool_budget_fit(2048, 2048, 20000, 64, 19930),
	    POOL_FD_FLOOR);
	assert_int_equal(pool_budget_fit(2048, 2048, 20000, 64, 30000),
	    POOL_FD_FLOOR);
	assert_int_equal(pool_budget_fit(2048, 2048, 50, 64, 0), POOL_FD_FLOOR);
	assert_int_equal(pool_budget_fit(3, 2048, 20000, 64, 19999), 3);
	assert_int_equal(pool_budget_fit(2048, 2, 20000, 64, 19999), 2);
	/* A limit past 32 bits. */
	assert_int_equal(pool_budget_fit(2048, 2048, (uint64_t)1 << 40, 64,
	    19000), 2048);
}

static void
set_clients(unsigned n)
{
	in_api = true;
	pool_set_clients(n);
	in_api = false;
	run();
}

/* Clients take descriptors: idle sessions beyond what is left are logged
 * out (LRU first), waiters wait (no eviction beyond it, no failure), and
 * the whole budget comes back when the clients leave. */
static void
test_fd_limit_shrinks_pool(void **state)
{
	static struct tclient cl[20], d, e;
	struct pool_stats st;
	char mb[8];
	int i;

	(void)state;
	set_admins(&C, admins, 4);		/* 4 x 5 = 20 */
	C.session_budget = 20;
	reinit();
	pool_set_fd_limit(200, 64);		/* 136 for clients and sessions */
	pool_get_stats(&st);
	assert_int_equal(st.effective_budget, 20);
	for (i = 0; i < 20; i++) {
		snprintf(mb, sizeof(mb), "m%d", i);
		acq(&cl[i], mb);
	}
	run();
	assert_int_equal(nf, 20);
	for (i = 0; i < 20; i++)
		fready(i);
	for (i = 0; i < 16; i++)		/* idle, LRU first: 0 .. 15 */
		rel(&cl[i], POOL_RELEASE_CLEAN);

	set_clients(124);			/* 12 left */
	pool_get_stats(&st);
	assert_int_equal(st.effective_budget, 12);
	for (i = 0; i < 20; i++) {
		assert_int_equal(F[i].closed, i < 8);
		if (i < 8)
			assert_string_equal(F[i].close_reason, "over-budget");
	}
	open_cap = 12;
	/* A new mailbox waits: closing sessions free no room while the rest
	 * fill the budget, so only one idle session makes way for it. */
	acq(&d, "new-d");
	run();
	assert_int_equal(nf, 20);
	assert_true(F[8].closed);
	assert_false(F[9].closed);
	for (i = 0; i < 8; i++)
		ffree(i);
	assert_int_equal(nf, 20);		/* 12 alive: still full */
	ffree(8);
	assert_int_equal(nf, 21);
	fready(20);
	assert_int_equal(d.granted, 1);
	assert_int_equal(d.failed, 0);
	check_budget();

	/* Past the floor: POOL_FD_FLOOR sessions remain. */
	set_clients(1000);
	pool_get_stats(&st);
	assert_int_equal(st.effective_budget, POOL_FD_FLOOR);
	for (i = 9; i < 13; i++)		/* 12 alive - 8: 4 idle, LRU */
		assert_true(F[i].closed);
	for (i = 13; i < 16; i++)
		assert_false(F[i].closed);
	for (i = 9; i < 13; i++)
		ffree(i);
	check_budget();

	/* The clients leave: the whole budget again, no eviction needed. */
	open_cap = 0;
	set_clients(0);
	pool_get_stats(&st);
	assert_int_equal(st.effective_budget, 20);
	acq(&e, "new-e");
	run();
	assert_int_equal(nf, 22);
	for (i = 13; i < 16; i++)
		assert_false(F[i].closed);
	fready(21);
	assert_int_equal(e.granted, 1);
	check_budget();
}

static void
test_reload_admin_removed(void **state)
{
	static struct config c2, c3;
	static struct config_admin only_y[1], only_x[1];
	static struct tclient a, b, c;

	(void)state;
	acq(&a, "a");
	acq(&b, "b");
	run();
	assert_int_equal(F[0].admin, 0);	/* NPUMAdmin1 */
	assert_int_equal(F[1].admin, 1);	/* NPUMAdmin2 */
	fready(0);
	fready(1);
	rel(&a, POOL_RELEASE_CLEAN);

	/* Drop NPUMAdmin1 (its idle session closes), keep NPUMAdmin2 under
	 * another spelling at another index. */
	only_y[0] = admins[1];
	only_y[0].name = "npumadmin2";
	c2 = C;
	set_admins(&c2, only_y, 1);
	pool_set_config(&c2);
	assert_true(F[0].closed);
	assert_string_equal(F[0].close_reason, "admin-removed");
	assert_int_equal(pool_admin_sessions(0), 1);	/* matched by name */
	acq(&c, "c");
	run();
	assert_int_equal(nf, 3);
	assert_int_equal(F[2].admin, 0);		/* index in c2 */
	fready(2);
	ffree(0);

	/* Drop NPUMAdmin2: leased sessions close at release. */
	only_x[0] = admins[0];
	c3 = C;
	set_admins(&c3, only_x, 1);
	pool_set_config(&c3);
	run();
	assert_false(F[1].closed);
	assert_false(F[2].closed);
	rel(&b, POOL_RELEASE_CLEAN);
	assert_true(F[1].closed);
	assert_string_equal(F[1].close_reason, "admin-removed");
	assert_int_equal(pool_admin_sessions(0), 0);
	acq(&a, "a");
	run();
	assert_int_equal(nf, 4);
	assert_int_equal(F[3].admin, 0);
	assert_string_equal(c3.admins[F[3].admin].name, "NPUMAdmin1");
}

static void
test_cancel(void **state)
{
	static struct tclient a, b, c;
	struct pool_stats st;

	(void)state;
	acq(&a, "a");
	run();
	cancel(&a);
	fready(0);				/* login kept for the pool */
	assert_int_equal(a.granted + a.failed, 0);
	pool_get_stats(&st);
	assert_int_equal(st.idle, 1);
	assert_int_equal(st.waiters, 0);
	acq(&b, "a");
	run();
	fcmd(0, true);
	assert_int_equal(b.granted, 1);

	/* Cancelled between the decision and the callback. */
	acq(&c, "c");
	run();
	F[1].ready = true;
	F[1].cbs->ready(F[1].arg);		/* handoff, not yet granted */
	cancel(&c);
	run();
	assert_int_equal(c.granted, 0);
	pool_get_stats(&st);
	assert_int_equal(st.idle, 1);
	assert_int_equal(st.leased, 1);

	/* Cancel of a waiter not queued: nothing. */
	cancel(&c);
	cancel(&a);
}

static void
test_forget_lost(void **state)
{
	static struct tclient a, b;

	(void)state;
	C.session_budget = 1;
	acq(&a, "a");
	run();
	fready(0);
	acq(&b, "b");
	run();
	/* The leased session dies: the client sees lost and forgets it. */
	F[0].closed = true;
	F[0].cbs->lost(F[0].arg, "reset by peer");
	run();
	assert_null(a.u);
	assert_int_equal(nf, 1);
	check_budget();
	ffree(0);
	assert_int_equal(nf, 2);
	fready(1);
	assert_int_equal(b.granted, 1);
}

static void
test_idle_lost(void **state)
{
	static struct tclient a, b;

	(void)state;
	acq(&a, "a");
	run();
	fready(0);
	rel(&a, POOL_RELEASE_CLEAN);
	/* Exchange logs an idle session out: the pool is its lessee. */
	assert_true(F[0].cbs == F[0].pool_cbs);
	F[0].cbs->lost(F[0].arg, "BYE autologout");
	F[0].closed = true;
	run();
	acq(&b, "a");
	run();
	assert_int_equal(nf, 2);		/* not reused */
	ffree(0);
	fready(1);
	assert_int_equal(b.granted, 1);
}

static void
test_handoff_lost(void **state)
{
	static struct tclient a, b;

	(void)state;
	acq(&a, "a");
	acq(&b, "b");
	run();
	F[0].ready = true;
	F[0].cbs->ready(F[0].arg);		/* promised to a ... */
	F[0].closed = true;
	F[0].cbs->lost(F[0].arg, "reset");	/* ... and lost before the tick */
	F[0].cbs = NULL;
	run();
	assert_int_equal(a.granted + a.failed, 0);
	assert_int_equal(nf, 3);		/* a gets a new login */
	assert_string_equal(F[2].mailbox, "a");
	fready(2);
	fready(1);
	assert_int_equal(a.granted, 1);
	assert_ptr_equal(a.u, U(2));
	assert_int_equal(b.granted, 1);
	check_budget();
}

static void
test_reentrant_callbacks(void **state)
{
	static struct tclient a, b;
	struct pool_stats st;

	(void)state;
	release_on_grant = &a;
	acq(&a, "a");
	acq(&b, "a");
	run();
	assert_int_equal(nf, 1);		/* b waits for a's session ... */
	advance(500);
	run();
	assert_int_equal(nf, 2);		/* ... then logs in too */
	fready(0);
	assert_int_equal(a.granted, 1);		/* and given back at once */
	pool_get_stats(&st);
	assert_int_equal(st.leased, 0);
	/* b takes a's pooled session (its own login goes to the pool). */
	assert_int_equal(count_cmd(0, "NOOP"), 1);
	fcmd(0, true);
	assert_int_equal(b.granted, 1);
	assert_ptr_equal(b.u, U(0));
	fready(1);
	pool_get_stats(&st);
	assert_int_equal(st.idle, 1);
	assert_int_equal(st.leased, 1);
}

static void
test_idle_frames_drained(void **state)
{
	static struct tclient a;
	struct evbuffer *in = evbuffer_new();
	struct imap_frame fr;

	(void)state;
	acq(&a, "a");
	run();
	fready(0);
	rel(&a, POOL_RELEASE_CLEAN);
	evbuffer_add_printf(in, "* 4 EXISTS\r\n* 1 RECENT\r\n");
	memset(&fr, 0, sizeof(fr));
	fr.kind = IMAP_FR_LINE;
	fr.len = 12;
	F[0].cbs->frame(F[0].arg, &fr, NULL, in);
	assert_int_equal(evbuffer_get_length(in), 12);
	evbuffer_free(in);
}

enum pick_kind { PICK_LOGIN, PICK_CMD, PICK_CLOSED, PICK_READY };

/* A random fake in the given condition, or -1. */
static int
pick(enum pick_kind kind)
{
	static int cand[MAXF];
	int i, n = 0;

	for (i = 0; i < nf; i++) {
		bool ok = false;

		switch (kind) {
		case PICK_LOGIN:
			ok = !F[i].ready && !F[i].closed;
			break;
		case PICK_CMD:
			ok = F[i].cmd_done != NULL;
			break;
		case PICK_CLOSED:
			ok = F[i].closed && !F[i].freed;
			break;
		case PICK_READY:
			ok = F[i].ready && !F[i].closed;
			break;
		}
		if (ok)
			cand[n++] = i;
	}
	return n > 0 ? cand[rand() % n] : -1;
}

/* Random sequences; the budgets are checked after every step. */
static void
test_random(void **state)
{
	enum { NC = 24 };
	static struct tclient cl[NC];
	static const char *mbs[] = { "a", "B", "c", "D", "e", "A", "b" };
	static const struct {
		enum up_fail why;
		const char *text;
	} fails[] = {
		{ UP_FAIL_CONNECT, "cannot connect: Connection refused" },
		{ UP_FAIL_TLS, "wrong version number" },
		{ UP_FAIL_CERT, "certificate verify failed: expired" },
		{ UP_FAIL_GREETING, "* BYE Connection is closed. 10" },
		{ UP_FAIL_TIMEOUT, "no answer" },
		{ UP_FAIL_LOGIN, "NO LOGIN failed." },
		{ UP_FAIL_LOGIN, "NO Server Unavailable. 15" },
		{ UP_FAIL_LOGIN, "NO no such user" },
		{ UP_FAIL_LOGIN, "NO [AUTHENTICATIONFAILED] nope" },
		{ UP_FAIL_PROTOCOL, "BAD User is authenticated but not connected." },
	};
	bool busy[NC];
	uint64_t grants = 0, reuses = 0, timeouts = 0, failed = 0;
	bool reloaded;
	unsigned seed;
	int step, i, k, round;

	(void)state;
	admins[0].max_sessions = 3;
	admins[1].max_sessions = 2;
	admins[2].max_sessions = 3;
	set_admins(&C, admins, 3);
	C.n_servers = 2;
	C.session_budget = 6;
	C.login_rate = 20;
	C.login_burst = 4;
	C.queue_timeout_ms = 5000;
	C.reuse_timeout_ms = 20000;
	C.negative_cache_ttl_ms = 3000;
	C.server_fail_threshold = 3;
	C.server_cooldown_ms = 2000;
	C.admin_cooldown_ms = 10000;
	C.backoff_max_ms = 2000;
	pool_shutdown();
	for (round = 0; round < 8; round++) {
		seed = 12345u + (unsigned)round * 7919u;
		srand(seed);
		memset(F, 0, sizeof(F));
		nf = 0;
		pool_init(&C, &fops);
		memset(cl, 0, sizeof(cl));
		memset(busy, 0, sizeof(busy));
		/* The first half of the rounds keep the budget fixed. */
		reloaded = false;
		for (step = 0; step < 3000; step++) {
			int op = rand() % 10;

			/* Forget finished waiters. */
			for (i = 0; i < NC; i++)
				if (busy[i] && (cl[i].failed || cl[i].lost))
					busy[i] = false;
			switch (op) {
			case 0:		/* acquire */
				i = rand() % NC;
				if (!busy[i]) {
					acq(&cl[i], mbs[rand() % 7]);
					busy[i] = true;
				}
				break;
			case 1:		/* release */
				i = rand() % NC;
				if (busy[i] && cl[i].u != NULL) {
					struct fake_up *f = &F[fidx(cl[i].u)];

					f->failed += (unsigned)(rand() % 3);
					f->bad += rand() % 8 == 0;
					f->cap_unselect = rand() % 2;
					rel(&cl[i], (enum pool_release)(rand() % 3));
					busy[i] = false;
				}
				break;
			case 2:		/* cancel a waiter */
				i = rand() % NC;
				if (busy[i] && cl[i].u == NULL && rand() % 3 == 0) {
					cancel(&cl[i]);
					busy[i] = false;
				}
				break;
			case 3:		/* a login completes */
			case 4:
				k = pick(PICK_LOGIN);
				if (k >= 0) {
					if (rand() % 4 == 0) {
						int fi = rand() % (int)nitems(fails);

						ffail(k, fails[fi].why, fails[fi].text);
					} else
						fready(k);
				}
				break;
			case 5:		/* an internal command ends */
				k = pick(PICK_CMD);
				if (k >= 0)
					fcmd(k, rand() % 5 != 0);
				break;
			case 6:		/* a socket is finally gone */
			case 7:
				k = pick(PICK_CLOSED);
				if (k >= 0)
					ffree(k);
				break;
			case 8:		/* a session is lost */
				k = pick(PICK_READY);
				if (k >= 0 && rand() % 4 == 0) {
					const struct upstream_cbs *cbs = F[k].cbs;
					void (*done)(void *, bool) = F[k].cmd_done;

					F[k].closed = true;
					F[k].cbs = NULL;
					F[k].cmd_done = NULL;
					if (done != NULL)
						done(F[k].cmd_arg, false);
					if (F[k].n_close == 0 && cbs->lost != NULL)
						cbs->lost(F[k].arg, "lost");
					run();
				}
				break;
			case 9:
				if (round >= 4 && rand() % 40 == 0) {	/* reload */
					C.session_budget = 3 +
					    (unsigned)(rand() % 6);
					admins[0].max_sessions = 1 +
					    (unsigned)(rand() % 4);
					admins[2].max_sessions = 1 +
					    (unsigned)(rand() % 4);
					pool_set_config(&C);
					run();
					reloaded = true;
					break;
				}
				/* FALLTHROUGH */
			default:
				advance((uint64_t)(rand() % 400));
				break;
			}
			check_budget_mode(!reloaded);
			check_leases(cl, NC);
		}
		/* Drain: every waiter ends granted or failed. */
		for (i = 0; i < 200; i++) {
			for (k = 0; k < nf; k++) {
				if (!F[k].ready && !F[k].closed)
					fready(k);
				else if (F[k].cmd_done != NULL)
					fcmd(k, true);
				else if (F[k].closed && !F[k].freed)
					ffree(k);
			}
			for (k = 0; k < NC; k++)
				if (busy[k] && cl[k].u != NULL) {
					rel(&cl[k], POOL_RELEASE_CLEAN);
					busy[k] = false;
				}
			advance(100);
			check_budget_mode(!reloaded);
		}
		for (k = 0; k < NC; k++)
			assert_true(!busy[k] || cl[k].failed || cl[k].lost ||
			    cl[k].u != NULL);
		{
			struct pool_stats st;

			pool_get_stats(&st);
			assert_int_equal(st.waiters, 0);
			assert_int_equal(st.connecting, 0);
			grants += (uint64_t)grant_seq;
			reuses += st.reuses;
			timeouts += st.queue_timeouts;
			failed += st.logins_failed;
			grant_seq = 0;
		}
		teardown(NULL);
	}
	/* The sequences did reach the interesting paths. */
	{
		const struct stats_snapshot *ss = stats_get();
		uint64_t retries = 0;

		for (i = 0; i < STATS_RETRY_COUNT; i++)
			retries += ss->retries[i];
		if (getenv("POOL_TEST_DEBUG") != NULL)
			fprintf(stderr, "random: grants=%llu reuses=%llu "
			    "timeouts=%llu failed=%llu retries=%llu\n",
			    (unsigned long long)grants,
			    (unsigned long long)reuses,
			    (unsigned long long)timeouts,
			    (unsigned long long)failed,
			    (unsigned long long)retries);
		assert_true(retries > 50);
	}
	assert_true(grants > 500);
	assert_true(reuses > 30);
	assert_true(timeouts > 5);
	assert_true(failed > 50);
	pool_init(&C, &fops);		/* for the fixture's teardown */
	nf = 0;
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_no_sync_callbacks, setup, teardown),
		cmocka_unit_test_setup_teardown(test_budget_slot_freed_at_on_free, setup, teardown),
		cmocka_unit_test_setup_teardown(test_budget_per_admin, setup, teardown),
		cmocka_unit_test_setup_teardown(test_admin_choice, setup, teardown),
		cmocka_unit_test_setup_teardown(test_admin_rate_limited_skipped, setup, teardown),
		cmocka_unit_test_setup_teardown(test_fifo_and_eviction, setup, teardown),
		cmocka_unit_test_setup_teardown(test_fifo_new_logins_strict, setup, teardown),
		cmocka_unit_test_setup_teardown(test_queue_timeout, setup, teardown),
		cmocka_unit_test_setup_teardown(test_busy_mailbox_waits, setup, teardown),
		cmocka_unit_test_setup_teardown(test_evict_lru, setup, teardown),
		cmocka_unit_test_setup_teardown(test_reuse_case_insensitive, setup, teardown),
		cmocka_unit_test_setup_teardown(test_release_selected, setup, teardown),
		cmocka_unit_test_setup_teardown(test_release_dirty, setup, teardown),
		cmocka_unit_test_setup_teardown(test_retire_on_counters, setup, teardown),
		cmocka_unit_test_setup_teardown(test_idle_retirement, setup, teardown),
		cmocka_unit_test_setup_teardown(test_dead_pooled_replaced, setup, teardown),
		cmocka_unit_test_setup_teardown(test_dead_pooled_budget_full, setup, teardown),
		cmocka_unit_test_setup_teardown(test_token_bucket, setup, teardown),
		cmocka_unit_test_setup_teardown(test_login_failure_classes, setup, teardown),
		cmocka_unit_test_setup_teardown(test_server_failover, setup, teardown),
		cmocka_unit_test_setup_teardown(test_transient_retry_other_admin, setup, teardown),
		cmocka_unit_test_setup_teardown(test_final_then_negcache, setup, teardown),
		cmocka_unit_test_setup_teardown(test_quarantined_admin_not_chosen, setup, teardown),
		cmocka_unit_test_setup_teardown(test_logins_in_flight_overload,
		    setup, teardown),
		cmocka_unit_test_setup_teardown(test_all_servers_down, setup, teardown),
		cmocka_unit_test_setup_teardown(test_open_null, setup, teardown),
		cmocka_unit_test_setup_teardown(test_pause, setup, teardown),
		cmocka_unit_test_setup_teardown(test_drain, setup, teardown),
		cmocka_unit_test_setup_teardown(test_reload_reorders_servers, setup, teardown),
		cmocka_unit_test_setup_teardown(test_reload_raises_budget, setup, teardown),
		cmocka_unit_test_setup_teardown(test_reload_lowers_budget, setup, teardown),
		cmocka_unit_test_setup_teardown(test_budget_fit, setup, teardown),
		cmocka_unit_test_setup_teardown(test_fd_limit_shrinks_pool, setup,
		    teardown),
		cmocka_unit_test_setup_teardown(test_reload_admin_removed, setup, teardown),
		cmocka_unit_test_setup_teardown(test_cancel, setup, teardown),
		cmocka_unit_test_setup_teardown(test_forget_lost, setup, teardown),
		cmocka_unit_test_setup_teardown(test_idle_lost, setup, teardown),
		cmocka_unit_test_setup_teardown(test_handoff_lost, setup, teardown),
		cmocka_unit_test_setup_teardown(test_reentrant_callbacks, setup, teardown),
		cmocka_unit_test_setup_teardown(test_idle_frames_drained, setup, teardown),
		cmocka_unit_test_setup_teardown(test_random, setup, teardown),
		cmocka_unit_test_setup_teardown(test_missing_mailbox_probe, setup, teardown),
		cmocka_unit_test_setup_teardown(test_missing_mailbox_evidence, setup, teardown),
		cmocka_unit_test_setup_teardown(test_probe_fails_not_final, setup, teardown),
		cmocka_unit_test_setup_teardown(test_no_evidence_refused, setup, teardown),
		cmocka_unit_test_setup_teardown(test_preferred_admin, setup, teardown),
		cmocka_unit_test_setup_teardown(test_poll_yields_to_command, setup,
		    teardown),
	};

	log_set_level(getenv("POOL_TEST_DEBUG") != NULL ? LOG_LVL_DEBUG :
	    LOG_LVL_ERROR);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
