"""
End-to-end tests of login failure attribution (DESIGN.md 3.5 "Attribution",
"Client-visible failure texts", "Lockout guard"; src/DESIGN.md 3.5 R4-R6;
issue 13) against fake_exchange, which says "NO LOGIN failed." for a
missing mailbox, a mailbox an admin account has no FullAccess to, an admin
account at MaxConnectionsPerUser and a wrong password alike.

  mailbox    a missing mailbox polled among healthy ones: refused with
             every admin account, NO [AUTHENTICATIONFAILED], cached for
             negative_cache_ttl, no quarantine, no slowdown; the healthy
             mailboxes' login latency is printed (run with -s).  Recovery:
             once the mailbox exists and the cache entry expired, it logs in.
             On a quiet site (one mailbox logged in a moment ago, nothing
             since) one probe login of that mailbox decides instead.
  access     a mailbox one admin account lacks FullAccess to: the other
             serves it and is chosen first for it afterwards; when that one
             loses access in turn, the first serves it again.
  exchange   every account at MaxConnectionsPerUser: NO [UNAVAILABLE]
             saying Exchange refused, never cached, the slowdown starts;
             when Exchange takes logins again, the first success ends it.
  admin      a wrong password in the ini for one account: quarantined with
             the evidence logged, the other serves everybody, its failed
             logins bounded per admin_cooldown; when the passwords agree
             again it is released and used.
  quiet      no login succeeded yet: NO [UNAVAILABLE] saying there is
             nothing to compare with, not cached.

Timings are short (backoff 50 ms .. 500 ms) so the module runs in about a
minute.
"""

import statistics
import threading
import time

import pytest

import fake_exchange
import harness
from test_retry import ADMIN1, ADMIN2, ep, login_name, retry_config

NEG_TTL_S = 4


@pytest.fixture
def env(make_shim):
    """env(fake, **config) -> imapshim with a status port in front of fake."""
    def setup(fe, admins=None, **kw):
        status_port = harness.free_port()
        kw.setdefault("retry", {})
        kw["retry"].setdefault("negative_cache_ttl", "%ds" % NEG_TTL_S)
        shim = make_shim(fe.port, config=retry_config([ep(fe.port)], status_port, **kw),
                         admins=admins)
        shim.status_port = status_port
        harness.wait_port(status_port, proc=shim.proc, what="imapshim status endpoint")
        return shim
    return setup


def login(shim, mailbox, admins, admin=ADMIN1, timeout=20):
    """(Response, seconds) of one client LOGIN of mailbox; logs out."""
    c = shim.client(timeout=timeout)
    try:
        t0 = time.monotonic()
        r = c.login(login_name(mailbox, admin), admins[admin], tag="L")
        took = time.monotonic() - t0
        if r.status == "OK":
            c.logout()
        return r, took
    finally:
        c.close()


def failures(shim, attribution):
    return harness.metric(shim.status_port, "imapshim_login_failures_total",
                          attribution=attribution) or 0


def gauge(shim, name):
    return harness.metric(shim.status_port, name)


class Healthy:
    """Clients logging healthy mailboxes in and out in a loop, recording
    each LOGIN's latency (seconds) with the time it started."""

    def __init__(self, shim, admins, mailboxes):
        self.shim, self.admins = shim, admins
        self.samples = []
        self.errors = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(m,), daemon=True)
                        for m in mailboxes]

    def _run(self, mailbox):
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                r, took = login(self.shim, mailbox, self.admins)
            except (OSError, harness.HarnessError) as e:
                self.errors.append(repr(e))
                continue
            if r.status != "OK":
                self.errors.append(r.tagged)
            self.samples.append((t0, took))
            self.stop.wait(0.05)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=20)

    def between(self, t0, t1):
        return [took for t, took in self.samples if t0 <= t < t1]


def describe(lat):
    if not lat:
        return "no samples"
    lat = sorted(lat)
    return "n=%d median=%.1f ms p95=%.1f ms max=%.1f ms" % (
        len(lat), statistics.median(lat) * 1000,
        lat[min(len(lat) - 1, int(len(lat) * 0.95))] * 1000, lat[-1] * 1000)


# ------------------------------------------------------------ the mailbox

def test_missing_mailbox_among_healthy(env, make_fake, admins):
    """A mailbox Exchange does not know ("NO LOGIN failed." with every
    account), polled every 0.3 s while four healthy mailboxes log in and
    out (each LOGIN a new upstream login: reuse_timeout 0): the first poll costs one LOGIN per admin account (plus at most one
    probe login of a healthy mailbox, which stays pooled) and gets NO
    [AUTHENTICATIONFAILED] naming Exchange's words; later polls within
    negative_cache_ttl cost no upstream LOGIN; no slowdown, no quarantine,
    every healthy LOGIN succeeds.  Recovery: the mailbox is created; after
    the cache entry expires it logs in."""
    gone = "gone-user"
    fe = make_fake(script={"on_login": fake_exchange.fail_logins(None, mailbox=gone)})
    # No pooled sessions: every healthy LOGIN is a new upstream login, the
    # kind a site-wide slowdown would delay.
    shim = env(fe, pool={"reuse_timeout": "0s"})
    per_poll = []
    with Healthy(shim, admins, ["healthy-%d" % i for i in range(4)]) as h:
        time.sleep(2.0)                     # baseline: healthy only
        t_poll = time.monotonic()
        answers = []
        while time.monotonic() < t_poll + 3.0:
            n0 = len(fe.logins(mailbox=gone))
            r, took = login(shim, gone, admins)
            per_poll.append(len(fe.logins(mailbox=gone)) - n0)
            answers.append(r.tagged)
            time.sleep(0.3)
        t_end = time.monotonic()
        time.sleep(0.5)
    base, during = h.between(0, t_poll), h.between(t_poll, t_end)
    probes = shim.log_events("pool_probe")
    print("\n[attribution] missing mailbox: upstream LOGINs of it per client LOGIN: %r "
          "(probe logins of a healthy mailbox: %d)" % (per_poll, len(probes)))
    print("[attribution] healthy login latency before polling: %s" % describe(base))
    print("[attribution] healthy login latency while polling:  %s" % describe(during))
    print("[attribution] first answer: %r" % answers[0])
    assert not h.errors, h.errors[:5]
    assert all(a.startswith(b"L NO [AUTHENTICATIONFAILED] ") for a in answers), answers
    assert b"(NO LOGIN failed.)" in answers[0], answers[0]
    assert per_poll[0] == 2, per_poll           # one per admin account
    assert all(n == 0 for n in per_poll[1:]), per_poll
    assert len(probes) <= 1, probes
    assert sorted(r.admin for r in fe.logins(mailbox=gone)) == sorted([ADMIN1, ADMIN2])
    assert shim.log_events("pool_negcache_hit")
    assert shim.log_events("pool_mailbox_refused", attribution="mailbox")
    assert not shim.log_events("retry_login_slowdown")
    assert not shim.log_events("retry_admin_quarantined")
    assert failures(shim, "mailbox") == 2
    assert failures(shim, "exchange") == 0
    assert gauge(shim, "imapshim_negative_cache_entries") == 1
    assert gauge(shim, "imapshim_login_slowdown") == 0
    assert base and during
    # recovery: the mailbox now exists; the cache entry runs out
    fe.script["on_login"] = None
    time.sleep(NEG_TTL_S + 0.2)
    assert gauge(shim, "imapshim_negative_cache_entries") == 0
    r, _ = login(shim, gone, admins)
    assert r.status == "OK", r


def test_missing_mailbox_quiet_site(env, make_fake, admins):
    """The issue's case: one mailbox logged in a moment ago, then a missing
    mailbox is polled five times, nothing else happening.  Neither account
    logged in since it refused, so one probe (a login of the mailbox that
    worked, with the account that refused first) decides: the first poll
    costs 2 LOGINs of the missing mailbox + 1 probe that succeeds and stays
    pooled; the others cost nothing; no slowdown, no quarantine."""
    gone = "left-the-company"
    fe = make_fake(script={"on_login": fake_exchange.fail_logins(None, mailbox=gone)})
    shim = env(fe)
    r, _ = login(shim, "still-here", admins)
    assert r.status == "OK", r
    per_poll, answers = [], []
    for _ in range(5):
        n0, p0 = len(fe.logins(mailbox=gone)), len(fe.logins(mailbox="still-here"))
        r, _ = login(shim, gone, admins)
        per_poll.append((len(fe.logins(mailbox=gone)) - n0,
                         len(fe.logins(mailbox="still-here")) - p0))
        answers.append(r.tagged)
        time.sleep(0.3)
    print("\n[attribution] quiet site: (LOGINs of the missing mailbox, probe LOGINs) per "
          "client LOGIN: %r; first answer %r" % (per_poll, answers[0]))
    assert all(a.startswith(b"L NO [AUTHENTICATIONFAILED] ") for a in answers), answers
    assert per_poll[0] == (2, 1), per_poll
    assert all(p == (0, 0) for p in per_poll[1:]), per_poll
    assert shim.log_events("pool_probe_ok")
    assert not shim.log_events("retry_login_slowdown")
    assert not shim.log_events("retry_admin_quarantined")
    # the probe's session serves the good mailbox without a new LOGIN
    n0 = len(fe.logins(mailbox="still-here"))
    r, _ = login(shim, "still-here", admins)
    assert r.status == "OK" and len(fe.logins(mailbox="still-here")) == n0


# ------------------------------------------------------------ an account

def test_mailbox_one_admin_lacks_full_access(env, make_fake, admins):
    """NPUMAdmin2 has no FullAccess to "shared" (Exchange: "NO LOGIN
    failed." for it, with NPUMAdmin2 only), and is the account with the most
    room, so it is tried first.  The client gets OK through NPUMAdmin1; each
    later login of "shared" (its pooled session killed each time) goes to
    NPUMAdmin1 first, with no refusal, although NPUMAdmin2 has more room.
    The refusal is charged to the account, which is not quarantined for one
    mailbox.  When access moves to NPUMAdmin2 instead, it serves "shared"
    and is chosen first from then on."""
    mbx = "shared"
    fe = make_fake(script={"on_login": fake_exchange.fail_logins(
        None, mailbox=mbx, admin=ADMIN2)})
    shim = env(fe)
    r, _ = login(shim, "warmup", admins)       # pooled: NPUMAdmin2 has more room
    assert r.status == "OK", r
    assert fe.logins(mailbox="warmup")[0].admin == ADMIN1
    r, _ = login(shim, mbx, admins)
    assert r.status == "OK", (r, fe.summary())
    assert [(x.admin, x.ok) for x in fe.logins(mailbox=mbx)] == [
        (ADMIN2, False), (ADMIN1, True)], fe.logins(mailbox=mbx)
    for _ in range(3):
        fe.kill_mailbox(mbx)                   # no pooled session to reuse
        n0 = len(fe.logins(mailbox=mbx))
        r, _ = login(shim, mbx, admins)
        assert r.status == "OK", r
        new = fe.logins(mailbox=mbx)[n0:]
        assert [(x.admin, x.ok) for x in new] == [(ADMIN1, True)], new
    assert not shim.log_events("retry_admin_quarantined")
    assert failures(shim, "admin") == 1
    assert gauge(shim, "imapshim_negative_cache_entries") == 0
    # access moves: NPUMAdmin1 loses it, NPUMAdmin2 gains it
    fe.script["on_login"] = fake_exchange.fail_logins(None, mailbox=mbx, admin=ADMIN1)
    fe.kill_mailbox(mbx)
    n0 = len(fe.logins(mailbox=mbx))
    r, _ = login(shim, mbx, admins)
    assert r.status == "OK", r
    assert [(x.admin, x.ok) for x in fe.logins(mailbox=mbx)[n0:]] == [
        (ADMIN1, False), (ADMIN2, True)]
    fe.kill_mailbox(mbx)
    n0 = len(fe.logins(mailbox=mbx))
    r, _ = login(shim, mbx, admins)
    assert r.status == "OK", r
    assert [(x.admin, x.ok) for x in fe.logins(mailbox=mbx)[n0:]] == [(ADMIN2, True)]


# ------------------------------------------------------------ Exchange

def test_every_account_at_max_connections(env, make_fake, admins):
    """Exchange's MaxConnectionsPerUser is 2 and four clients hold two
    sessions of each account: new mailboxes are refused with every account
    (and a probe of a mailbox that just logged in is refused too).  Each
    client gets NO [UNAVAILABLE] saying Exchange refused the login, with
    its words; nothing is cached; once different mailboxes failed on every
    account the slowdown starts; nobody is quarantined.  Recovery: Exchange
    takes logins again: the next login succeeds and ends the slowdown."""
    fe = make_fake(max_connections_per_user=2)
    shim = env(fe)
    held = [shim.logged_in("holder-%d" % i, admin=ADMIN1) for i in range(4)]
    try:
        assert fe.max_by_admin.get(ADMIN1) == 2 and fe.max_by_admin.get(ADMIN2) == 2, \
            fe.max_by_admin
        answers = []
        for i in range(4):
            r, _ = login(shim, "new-%d" % i, admins)
            answers.append(r.tagged)
        for a in answers:
            assert a.startswith(b"L NO [UNAVAILABLE] Exchange refused the login"), answers
            assert b"(NO LOGIN failed.)" in a, a
            assert b"not reachable" not in a, a
        shim.wait_log_event("retry_login_slowdown", attribution="exchange")
        assert gauge(shim, "imapshim_login_slowdown") == 1
        assert gauge(shim, "imapshim_negative_cache_entries") == 0
        assert not shim.log_events("pool_mailbox_refused")
        assert not shim.log_events("retry_admin_quarantined")
        assert failures(shim, "exchange") >= 6
        assert failures(shim, "mailbox") == 0
        # recovery: Exchange takes more sessions per account
        fe.max_connections_per_user = 16
        r, took = login(shim, "new-0", admins)
        assert r.status == "OK", r
        shim.wait_log_event("retry_login_slowdown_end")
        assert gauge(shim, "imapshim_login_slowdown") == 0
        print("\n[attribution] every account full: answers %r; recovery login %.0f ms"
              % ([a.decode() for a in answers[:1]], took * 1000))
    finally:
        for c in held:
            c.close()


def test_no_evidence_is_unavailable(env, make_fake, admins):
    """Just started, no login succeeded yet, and a mailbox is refused with
    every account: imapshim cannot tell a missing mailbox from Exchange
    refusing everybody: NO [UNAVAILABLE] saying so after login_attempts
    (3) LOGINs, not cached: the next LOGIN asks Exchange again."""
    mbx = "first-of-the-day"
    fe = make_fake(script={"on_login": fake_exchange.fail_logins(None, mailbox=mbx)})
    shim = env(fe)
    r, _ = login(shim, mbx, admins)
    assert r.tagged.startswith(b"L NO [UNAVAILABLE] Exchange refused the login"), r
    assert b"no login succeeded recently" in r.tagged, r
    assert len(fe.logins(mailbox=mbx)) == 3
    r, _ = login(shim, mbx, admins)
    assert len(fe.logins(mailbox=mbx)) > 3, "cached without evidence"
    assert gauge(shim, "imapshim_negative_cache_entries") == 0


# ------------------------------------------------------------ lockout guard

def test_wrong_admin_password_quarantined_bounded(env, make_fake, admins):
    """The ini has a wrong password for NPUMAdmin2 (admin_cooldown 3 s).
    Clients of different mailboxes log in for 10 s: all get OK; NPUMAdmin2
    is quarantined once three different mailboxes failed with it while
    NPUMAdmin1 succeeds (logged at warn with the evidence), and afterwards
    fails at most once per admin_cooldown: at most 3 + 10/3 + 1 failed
    LOGINs, i.e. with the default admin_cooldown (5 min) at most about 12
    an hour after the first three, which Active Directory's lockout
    threshold never sees.  Recovery: the passwords agree again: after its
    cooldown NPUMAdmin2 logs in, is released, and serves clients."""
    ini_admins = dict(admins)
    ini_admins[ADMIN2] = "wrong-" + admins[ADMIN2]
    cooldown, dur = 3.0, 10.0
    fe = make_fake()
    shim = env(fe, admins=ini_admins, retry={"admin_cooldown": "%ds" % int(cooldown)})
    t0 = time.monotonic()
    i = 0
    gauge_seen = None
    while time.monotonic() < t0 + dur:
        r, _ = login(shim, "lk-%d" % i, ini_admins)
        assert r.status == "OK", r
        i += 1
        if gauge_seen is None and shim.log_events("retry_admin_quarantined"):
            # well within its first cooldown
            gauge_seen = harness.metric(shim.status_port, "imapshim_admin_quarantined",
                                        admin=ADMIN2)
        time.sleep(0.1)
    bad = fe.logins(admin=ADMIN2)
    assert bad and all(not x.ok for x in bad), bad
    bound = 3 + dur / cooldown + 1
    print("\n[attribution] wrong password: %d client LOGINs in %.0f s, %d failed LOGINs "
          "of %s (bound %d)" % (i, dur, len(bad), ADMIN2, bound))
    assert len(bad) <= bound, (len(bad), bound)
    q = shim.log_events("retry_admin_quarantined", admin=ADMIN2)
    assert q and q[0]["mailboxes"] == "3" and q[0]["succeeding"] == ADMIN1, q
    assert not shim.log_events("retry_admin_quarantined", admin=ADMIN1)
    assert not shim.log_events("retry_login_slowdown")
    assert gauge_seen == 1, gauge_seen
    # recovery: Exchange now has the password the ini has
    fe.admins[ADMIN2] = ini_admins[ADMIN2]
    harness.wait_until(lambda: harness.metric(shim.status_port, "imapshim_admin_quarantined",
                                              admin=ADMIN2) == 0,
                       timeout=cooldown + 5, what="the quarantine to end")

    def admin2_served():
        r, _ = login(shim, "lk-%d" % time.monotonic_ns(), ini_admins)
        assert r.status == "OK", r
        return fe.logins(admin=ADMIN2, ok=True)
    harness.wait_until(admin2_served, timeout=20, what="NPUMAdmin2 to serve again")
    assert shim.log_events("retry_admin_released", admin=ADMIN2)
