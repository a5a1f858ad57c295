"""
End-to-end tests of imapshim's bounded pool in `[pool] mode = session`
(DESIGN.md 3.3, 3.4, 3.7), against fake_exchange, which counts what Exchange
would count: concurrent connections from TCP accept to close, in total and
per admin account, every LOGIN with its time, every command per connection.

  budget     session_budget / max_sessions never exceeded, under 200
             concurrent clients; queue_timeout -> NO [UNAVAILABLE] and the
             client may retry LOGIN on the same connection; FIFO queue.
  admins     admin choice by most free capacity; per-admin caps.
  reuse      one upstream LOGIN for many client sessions of a mailbox;
             reset by EXAMINE INBOX (UNSELECT only where advertised), never
             CLOSE; a dead pooled session is replaced silently; LRU eviction.
  isolation  no byte of mailbox A reaches a client of mailbox B.
  pacing     login_rate / login_burst per admin account.
  retire     a pooled session is logged out after reuse_timeout idle.

Each test states what it sends and what it expects; on failure the report
carries imapshim's log tail and fake_exchange's records.
"""

import re
import threading
import time

import pytest

import harness
from harness import fetch_literals

ADMIN1, ADMIN2 = "NPUMAdmin1", "NPUMAdmin2"
NAME_RE = re.compile(rb"(?:mailbox=|Subject: for |To: )([A-Za-z0-9._+@-]+?)(?:@example\.com)?(?=[\s]|$)")


def pool_config(pool=None, admin_max=None, upstream=None, shim=None):
    """Config for an imapshim in session mode in front of fake_exchange."""
    # connect_timeout is the default: it covers TCP, TLS and the greeting,
    # and under valgrind 200 clients' TLS handshakes arriving at once keep
    # the loop busy for seconds (a 3s value failed a login there).
    cfg = {
        "upstream": {"login_format": "{domain}/{admin}/{mailbox}",
                     "connect_timeout": "10s", "login_timeout": "10s"},
        "pool": {"mode": "session", "session_budget": "8", "queue_timeout": "30s",
                 "reuse_timeout": "60s", "login_rate": "1000", "login_burst": "1000"},
        "retry": {"backoff_initial": "100ms", "backoff_max": "500ms"},
    }
    cfg["pool"].update(pool or {})
    cfg["upstream"].update(upstream or {})
    if shim:
        cfg["shim"] = dict(shim)
    for admin, n in (admin_max or {}).items():
        cfg["admin " + admin] = {"max_sessions": str(n)}
    return cfg


@pytest.fixture
def pool_env(make_fake, make_shim):
    """pool_env(pool={...}, admin_max={admin: n}, fake={...}, admins=...) ->
    (fake_exchange, imapshim) wired together."""
    def setup(pool=None, admin_max=None, fake=None, admins=None, shim=None):
        fe = make_fake(**(fake or {}))
        s = make_shim(fe.port, config=pool_config(pool, admin_max, shim=shim), admins=admins)
        return fe, s
    return setup


def login_name(mailbox, admin=ADMIN1):
    return "example.com/%s/%s" % (admin, mailbox)


def names_in(data):
    """Every mailbox name the fake's messages mention in data (bytes)."""
    return {m.decode() for m in NAME_RE.findall(data)}


def check_own(mailbox, data, what):
    """data (bytes received by a client of mailbox) names no other mailbox."""
    other = names_in(data) - {mailbox}
    assert not other, "%s: a client of %s received bytes of %s: %r" % (
        what, mailbox, sorted(other), data[:600])


def log_has(shim, pattern):
    return re.search(pattern, shim.log_text(this_run=True), re.M)


def auth_logged(shim, mailbox):
    """imapshim logged the client's LOGIN of mailbox (credentials checked,
    the client is now asking the pool)."""
    return log_has(shim, r"event=client_auth\b[^\n]*\bmailbox=%s(\s|$)" % re.escape(mailbox))


def upstream_max_ok(fe, total, per_admin):
    """(ok, text): the fake's recorded maxima within the budget."""
    tot = fe.max_concurrent()
    by = fe.max_concurrent_by_admin()
    bad = {a: n for a, n in by.items() if n > per_admin.get(a, 10 ** 9)}
    text = "max concurrent upstream connections: total %d (budget %d), by admin %r (caps %r)" % (
        tot, total, by, per_admin)
    return tot <= total and not bad, text, tot, by


class Session:
    """One client session run to completion in a thread: LOGIN (retried on
    the same connection while the answer is NO [UNAVAILABLE], until
    retry_until), SELECT INBOX, FETCH <fetch> BODY[], LOGOUT."""

    def __init__(self, shim, mailbox, admin, password, retry_until=None, fetch="1",
                 timeout=20.0, start=None):
        self.shim, self.mailbox, self.admin, self.password = shim, mailbox, admin, password
        self.retry_until = retry_until
        self.fetch = fetch
        self.timeout = timeout
        self.start_event = start
        self.attempts = []        # (status, tagged line, seconds)
        self.error = None
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def unavailable(self):
        return sum(1 for a in self.attempts if a[0] == "NO")

    def _fail(self, text):
        self.error = "%s: %s" % (self.mailbox, text)

    def _run(self):
        c = None
        try:
            if self.start_event is not None:
                self.start_event.wait(30)
            c = self.shim.client(timeout=self.timeout)
            n = 0
            while True:
                n += 1
                tag = "L%d" % n
                t0 = time.monotonic()
                r = c.login(login_name(self.mailbox, self.admin), self.password, tag=tag)
                took = time.monotonic() - t0
                self.attempts.append((r.status, r.tagged, took))
                if r.status == "OK":
                    break
                if not r.tagged.startswith(tag.encode() + b" NO [UNAVAILABLE]"):
                    return self._fail("LOGIN #%d answered %r after %.2fs" % (n, r.raw, took))
                if self.retry_until is None or time.monotonic() > self.retry_until:
                    return self._fail("LOGIN #%d still %r after %.2fs; giving up"
                                      % (n, r.tagged, took))
            r = c.command("SELECT INBOX", tag="S")
            if r.status != "OK" or b"EXISTS" not in r.raw:
                return self._fail("SELECT INBOX answered %r" % r.raw)
            check_own(self.mailbox, r.raw, "SELECT")
            r = c.command("FETCH %s BODY[]" % self.fetch, tag="F")
            bodies = fetch_literals(r)
            if r.status != "OK" or not bodies:
                return self._fail("FETCH %s BODY[] answered %r" % (self.fetch, r))
            for b in bodies:
                if ("Subject: for %s\r\n" % self.mailbox).encode() not in b:
                    return self._fail("FETCH body is not a message of %s: %r"
                                      % (self.mailbox, b[:300]))
            check_own(self.mailbox, r.raw, "FETCH")
            r = c.command("LOGOUT", tag="Z")
            if r.status != "OK" or not r.raw.startswith(b"* BYE"):
                return self._fail("LOGOUT answered %r" % r.raw)
            self.done = True
        except Exception as e:  # noqa: BLE001 - reported by the test
            self._fail("%s after attempts %r" % (e, self.attempts))
        finally:
            if c is not None:
                c.close()


def one_session(shim, mailbox, admins, admin=ADMIN1, select=True, logout=True):
    """A short client session asserting every step; returns the client's
    FETCH bytes."""
    c = shim.client(timeout=15)
    try:
        r = c.login(login_name(mailbox, admin), admins[admin], tag="L")
        assert r.status == "OK", "LOGIN of %s answered %r" % (mailbox, r.raw)
        data = b""
        if select:
            r = c.command("SELECT INBOX", tag="S")
            assert r.status == "OK", "SELECT INBOX of %s answered %r" % (mailbox, r.raw)
            r = c.command("FETCH 1 BODY[]", tag="F")
            assert r.status == "OK", "FETCH of %s answered %r" % (mailbox, r)
            bodies = fetch_literals(r)
            assert bodies and ("Subject: for %s\r\n" % mailbox).encode() in bodies[0], (
                "FETCH 1 BODY[] of %s returned %r" % (mailbox, r))
            check_own(mailbox, r.raw, "FETCH")
            data = r.raw
        if logout:
            r = c.command("LOGOUT", tag="Z")
            assert r.status == "OK", "LOGOUT answered %r" % r.raw
        return data
    finally:
        c.close()


def reset_cmds(fe, conn):
    return [n for n in conn.command_names() if n in ("SELECT", "EXAMINE", "CLOSE", "UNSELECT")]


# ------------------------------------------------------------------ budget

@pytest.mark.parametrize("variant", ["short_queue_timeout", "long_queue_timeout"])
def test_budget_200_clients(pool_env, admins, variant):
    """200 client sessions of 200 mailboxes, all at once, over session_budget
    = 8 with two admin accounts of max_sessions = 4.  Each: LOGIN, SELECT
    INBOX, FETCH 1 BODY[], LOGOUT.  The fake Exchange thinks 0.1 s (short) /
    0.02 s (long) about each LOGIN.

    Expected: the fake never sees more than 8 connections at once, nor more
    than 4 of one admin account, and the pool uses its whole budget (8, 4+4).
    queue_timeout = 1s: a client either completes or gets `NO [UNAVAILABLE]`
    to its LOGIN about 1 s after sending it, and a LOGIN retried on the same
    connection eventually succeeds (no client is cut off after 5 such
    answers).  queue_timeout = 60s: all 200 complete with no NO at all."""
    short = variant == "short_queue_timeout"
    fe, shim = pool_env(
        pool={"session_budget": "8", "queue_timeout": "1s" if short else "60s"},
        admin_max={ADMIN1: 4, ADMIN2: 4},
        fake={"login_delay": 0.1 if short else 0.02})
    start = threading.Event()
    t_begin = time.monotonic()
    retry_until = t_begin + 40
    sessions = []
    for i in range(200):
        admin = (ADMIN1, ADMIN2)[i % 2]
        sessions.append(Session(shim, "bud%03d" % i, admin, admins[admin],
                                retry_until=retry_until if short else None,
                                timeout=65 if not short else 20, start=start))
    for s in sessions:
        s.thread.start()
    start.set()
    deadline = time.monotonic() + 55
    for s in sessions:
        s.thread.join(max(0.1, deadline - time.monotonic()))
    took = time.monotonic() - t_begin

    ok, text, tot, by = upstream_max_ok(fe, 8, {ADMIN1: 4, ADMIN2: 4})
    assert ok, "budget exceeded: " + text + "\n" + fe.summary()
    stuck = [s.mailbox for s in sessions if s.thread.is_alive()]
    errors = [s.error for s in sessions if s.error]
    done = sum(1 for s in sessions if s.done)
    unavail = [a for s in sessions for a in s.attempts if a[0] == "NO"]
    assert not errors, "%d of 200 clients failed (%d done, %d stuck, took %.1fs); first: %s" % (
        len(errors), done, len(stuck), took, "\n".join(errors[:8]))
    assert not stuck, "%d client threads still running: %r" % (len(stuck), stuck[:10])
    assert done == 200, "%d of 200 sessions completed" % done
    if short:
        # 200 logins of >= 0.1 s over 8 slots take >= 2.5 s: some waited > 1 s
        assert unavail, ("no client ever got NO [UNAVAILABLE] with queue_timeout = 1s, "
                         "200 clients, budget 8 and 0.1 s per upstream LOGIN (took %.1fs)" % took)
        waits = sorted(a[2] for a in unavail)
        assert waits[0] >= 0.9, "NO [UNAVAILABLE] after only %.2fs (queue_timeout 1s): %r" % (
            waits[0], [a for a in unavail if a[2] == waits[0]][0])
        assert waits[-1] <= 5.0, "NO [UNAVAILABLE] only after %.2fs (queue_timeout 1s)" % waits[-1]
        most = max(s.unavailable for s in sessions)
        print("short queue_timeout: %d NO [UNAVAILABLE] answers, at most %d for one client, "
              "wait %.2f..%.2fs, %.1fs total" % (len(unavail), most, waits[0], waits[-1], took))
    else:
        assert not unavail, "%d NO [UNAVAILABLE] with queue_timeout = 60s: %r" % (
            len(unavail), unavail[:5])
    assert tot == 8 and by.get(ADMIN1) == 4 and by.get(ADMIN2) == 4, (
        "the pool did not use its budget with 200 clients waiting: " + text)
    bad_logins = fe.logins(ok=False)
    assert not bad_logins, "upstream LOGINs refused: %r" % bad_logins[:5]
    mailboxes = {r.mailbox for r in fe.logins(ok=True)}
    assert mailboxes == {s.mailbox for s in sessions}, (
        "upstream logins missing for %r" % sorted({s.mailbox for s in sessions} - mailboxes)[:10])
    assert not fe.commands("CLOSE"), "imapshim sent CLOSE: %r" % fe.commands("CLOSE")[:3]


def test_queue_is_fifo(pool_env, admins):
    """session_budget = 1.  Client H logs in (and holds the only upstream
    session).  Then clients W1..W8 each connect and send LOGIN, one after the
    other, each only once imapshim has logged the previous one's
    client_auth event.  H logs out; each Wi logs out as soon as its LOGIN is
    answered.  Expected: all get OK, and the upstream LOGINs arrive in the
    order H, W1, ..., W8."""
    fe, shim = pool_env(pool={"session_budget": "1", "queue_timeout": "30s"})
    pw = admins[ADMIN1]
    holder = shim.client(timeout=10)
    r = holder.login(login_name("fifo-hold"), pw, tag="H")
    assert r.status == "OK", r
    waiters = []
    results = {}

    def finish(i, c):
        try:
            r = c.read_response("W", timeout=40)
            results[i] = (r.tagged, time.monotonic())
            if r.status == "OK":
                c.command("LOGOUT", tag="Z")
        except Exception as e:  # noqa: BLE001
            results[i] = ("%r" % e, time.monotonic())
        finally:
            c.close()

    order = ["fifo-w%d" % i for i in range(1, 9)]
    threads = []
    for i, mbx in enumerate(order):
        c = shim.client(timeout=10)
        c.send(b"W LOGIN " + harness.imap_quote(login_name(mbx)) + b" "
               + harness.imap_quote(pw) + b"\r\n")
        harness.wait_until(lambda: auth_logged(shim, mbx), timeout=10,
                           what="imapshim to log client_auth of %s" % mbx)
        waiters.append(c)
        t = threading.Thread(target=finish, args=(i, c), daemon=True)
        t.start()
        threads.append(t)
    time.sleep(0.3)
    early = [m for m in order if fe.logins(mailbox=m)]
    assert not early, "upstream LOGIN for %r while the budget of 1 was held by H" % early
    r = holder.command("LOGOUT", tag="Z")
    assert r.status == "OK", r
    holder.close()
    for t in threads:
        t.join(45)
    bad = {order[i]: v[0] for i, v in results.items()
           if not (isinstance(v[0], bytes) and v[0].startswith(b"W OK"))}
    assert len(results) == len(order) and not bad, "waiters' LOGIN answers: %r" % bad
    up = [r.mailbox for r in fe.logins(ok=True)]
    assert up == ["fifo-hold"] + order, (
        "upstream LOGIN order %r, clients arrived in order %r" % (up, ["fifo-hold"] + order))
    served = sorted(range(len(order)), key=lambda i: results[i][1])
    assert [order[i] for i in served] == order, (
        "clients got their OK in the order %r" % [order[i] for i in served])
    ok, text, tot, by = upstream_max_ok(fe, 1, {})
    assert ok, text


def test_admin_choice_and_caps(pool_env, admins):
    """max_sessions NPUMAdmin1 = 1, NPUMAdmin2 = 3, budget 8, queue_timeout
    1s.  Four clients of four mailboxes log in and stay: the fake sees 1
    session of NPUMAdmin1 and 3 of NPUMAdmin2 (most free capacity first;
    the client's own admin name does not matter).  A fifth client gets
    `NO [UNAVAILABLE]` after ~1 s (both admins full), stays connected, and
    its retried LOGIN succeeds once one of the four logs out, on the admin
    whose slot was freed."""
    fe, shim = pool_env(pool={"session_budget": "8", "queue_timeout": "1s"},
                        admin_max={ADMIN1: 1, ADMIN2: 3})
    held = []
    try:
        for i in range(4):
            c = shim.client(timeout=10)
            r = c.login(login_name("adm%d" % i, ADMIN1), admins[ADMIN1], tag="L")
            assert r.status == "OK", "client %d: %r" % (i, r.raw)
            held.append(c)
        ups = {r.mailbox: r.admin for r in fe.logins(ok=True)}
        per = {a: sum(1 for v in ups.values() if v == a) for a in (ADMIN1, ADMIN2)}
        assert per == {ADMIN1: 1, ADMIN2: 3}, "upstream admins per mailbox: %r" % ups
        c5 = shim.client(timeout=10)
        t0 = time.monotonic()
        r = c5.login(login_name("adm4", ADMIN2), admins[ADMIN2], tag="A")
        took = time.monotonic() - t0
        assert r.tagged.startswith(b"A NO [UNAVAILABLE]"), (
            "5th client with both admins at max_sessions: %r" % r.raw)
        assert 0.8 <= took <= 5, "NO [UNAVAILABLE] after %.2fs (queue_timeout 1s)" % took
        assert not fe.logins(mailbox="adm4"), "upstream LOGIN beyond max_sessions: %r" % (
            fe.logins(mailbox="adm4"))
        # free an NPUMAdmin1 slot: the holder whose upstream is NPUMAdmin1
        i1 = [i for i in range(4) if ups["adm%d" % i] == ADMIN1][0]
        r = held[i1].command("LOGOUT", tag="Z")
        assert r.status == "OK", r
        r = c5.login(login_name("adm4", ADMIN2), admins[ADMIN2], tag="B")
        assert r.status == "OK", "retried LOGIN on the same connection: %r" % r.raw
        up5 = fe.logins(mailbox="adm4", ok=True)
        assert [x.admin for x in up5] == [ADMIN1], "adm4 upstream logins: %r" % up5
        r = c5.command("SELECT INBOX", tag="S")
        assert r.status == "OK", r
        c5.command("LOGOUT", tag="Z")
        c5.close()
    finally:
        for c in held:
            c.close()
    ok, text, tot, by = upstream_max_ok(fe, 8, {ADMIN1: 1, ADMIN2: 3})
    assert ok, text + "\n" + fe.summary()


def test_admin_choice_skips_rate_limited(pool_env, admins):
    """login_rate = 1, login_burst = 2 per admin; max_sessions NPUMAdmin1 =
    16, NPUMAdmin2 = 4 (NPUMAdmin1 has the most free capacity).  4 cold
    logins at once: NPUMAdmin1's bucket allows 2, then it is rate-limited,
    so the other 2 go to NPUMAdmin2 at once.  Expected: all 4 upstream
    LOGINs within 0.8 s of the first, 2 per admin (not 4 on NPUMAdmin1 paced
    over 2 s)."""
    fe, shim = pool_env(pool={"session_budget": "100", "login_rate": "1", "login_burst": "2",
                              "queue_timeout": "10s"},
                        admin_max={ADMIN1: 16, ADMIN2: 4})
    start = threading.Event()
    sessions = [Session(shim, "rl%d" % i, ADMIN1, admins[ADMIN1], timeout=15, start=start)
                for i in range(4)]
    for s in sessions:
        s.thread.start()
    start.set()
    for s in sessions:
        s.thread.join(20)
    errors = [s.error for s in sessions if s.error]
    assert not errors, "\n".join(errors)
    recs = fe.logins(ok=True)
    assert len(recs) == 4, recs
    span = recs[-1].t - recs[0].t
    per = {a: sum(1 for r in recs if r.admin == a) for a in (ADMIN1, ADMIN2)}
    assert per == {ADMIN1: 2, ADMIN2: 2} and span <= 0.8, (
        "upstream LOGINs: %r over %.2fs (expected 2 per admin, at once: a rate-limited admin "
        "is skipped)" % ([(round(r.t - recs[0].t, 2), r.admin) for r in recs], span))


# ------------------------------------------------------------------- reuse

def test_reuse_one_upstream_login(pool_env, admins):
    """One mailbox, 50 client sessions in a row, each on a new connection:
    LOGIN, SELECT INBOX, FETCH 1 BODY[], LOGOUT.  Expected: exactly one
    upstream connection and one upstream LOGIN; the client never sees an
    error; between two client sessions the upstream gets EXAMINE INBOX (the
    reset, since Exchange has no UNSELECT), and never CLOSE or UNSELECT."""
    fe, shim = pool_env(pool={"session_budget": "8"})
    mbx = "reuse-1"
    for i in range(50):
        one_session(shim, mbx, admins, admin=(ADMIN1, ADMIN2)[i % 2])
    logins = fe.logins(mailbox=mbx)
    assert len(logins) == 1 and logins[0].ok, (
        "50 client sessions of one mailbox made %d upstream LOGINs: %r" % (len(logins), logins))
    conns = fe.connections_of(mbx)
    assert len(conns) == 1 and fe.n_connections == 1, (
        "%d upstream connections for one mailbox\n%s" % (fe.n_connections, fe.summary()))
    c = conns[0]
    fe.wait_for(lambda f: len([n for n in c.command_names() if n == "EXAMINE"]) >= 50,
                timeout=5)
    seq = reset_cmds(fe, c)
    assert "CLOSE" not in seq and "UNSELECT" not in seq, (
        "upstream got CLOSE/UNSELECT: %r" % seq)
    assert seq == ["SELECT", "EXAMINE"] * 50, (
        "upstream SELECT/EXAMINE sequence (expected SELECT then the EXAMINE INBOX reset, "
        "50 times): %r" % seq)
    examines = [cmd for (_, cmd) in c.commands if b" EXAMINE " in cmd.upper()]
    assert all(re.match(rb"^\S+ EXAMINE \"?INBOX\"?\r\n$", x, re.I) for x in examines), examines[:3]
    assert c.is_open, "the pooled session was closed\n" + fe.summary()


def test_reset_uses_unselect_when_advertised(pool_env, admins):
    """The fake advertises UNSELECT (like Exchange Online): the reset between
    client sessions is UNSELECT, not EXAMINE, and never CLOSE."""
    fe, shim = pool_env(fake={"unselect": True})
    for _ in range(3):
        one_session(shim, "unsel-1", admins)
    c = fe.connections_of("unsel-1")
    assert len(c) == 1, fe.summary()
    fe.wait_for(lambda f: c[0].command_names().count("UNSELECT") >= 3, timeout=5)
    seq = reset_cmds(fe, c[0])
    assert seq == ["SELECT", "UNSELECT"] * 3, "upstream reset sequence: %r" % seq


def test_reuse_after_client_disconnect(pool_env, admins):
    """A client of mailbox M logs in, SELECTs and drops its TCP connection
    without LOGOUT: the upstream session is reset (EXAMINE INBOX) and kept;
    the next client of M logs in without a new upstream LOGIN."""
    fe, shim = pool_env()
    c = shim.client()
    assert c.login(login_name("drop-1"), admins[ADMIN1]).status == "OK"
    assert c.command("SELECT INBOX").status == "OK"
    c.close()
    assert fe.wait_for(lambda f: "EXAMINE" in f.connections[0].command_names(), timeout=5), (
        "no reset after the client vanished\n" + fe.summary())
    one_session(shim, "drop-1", admins)
    assert len(fe.logins(mailbox="drop-1")) == 1, fe.summary()
    assert not fe.commands("CLOSE"), fe.summary()


@pytest.mark.parametrize("how", ["at_once", "after_pause", "bye13"])
def test_dead_pooled_session_replaced(pool_env, admins, how):
    """Client session 1 of mailbox M ends; its upstream session is pooled.
    The fake then kills M's server-side connection (at_once: right before
    the next client; after_pause: 0.5 s before; bye13: with Exchange's idle
    autologout `* BYE Connection is closed. 13` first).  Client session 2 of
    M: LOGIN gets OK, SELECT and FETCH 1 BODY[] work, and the fake shows a
    second upstream LOGIN of M on a new connection."""
    fe, shim = pool_env()
    mbx = "kill-" + how.replace("_", "")
    one_session(shim, mbx, admins)
    assert fe.wait_for(lambda f: "EXAMINE" in f.connections_of(mbx)[0].command_names(),
                       timeout=5), "session 1 was not reset/pooled\n" + fe.summary()
    time.sleep(0.1)
    n = fe.kill_mailbox(mbx, bye=b"* BYE Connection is closed. 13\r\n" if how == "bye13" else None)
    assert n == 1, "expected one pooled upstream connection of %s, killed %d\n%s" % (
        mbx, n, fe.summary())
    if how != "at_once":
        time.sleep(0.5)
    one_session(shim, mbx, admins)
    logins = fe.logins(mailbox=mbx, ok=True)
    assert len(logins) == 2, "upstream LOGINs of %s: %r\n%s" % (mbx, logins, fe.summary())
    assert len({r.conn_id for r in logins}) == 2, logins


def test_lru_idle_session_closed_first(pool_env, admins):
    """session_budget = 2.  Clients of A, then B, use and release sessions
    (A is least recently used).  A client of C needs a session: imapshim
    sends LOGOUT on A's idle session (not B's) and logs in C.  A following
    client of B reuses B's session (no new LOGIN)."""
    fe, shim = pool_env(pool={"session_budget": "2"})
    one_session(shim, "lru-a", admins)
    one_session(shim, "lru-b", admins)
    one_session(shim, "lru-c", admins)
    ca, cb = fe.connections_of("lru-a")[0], fe.connections_of("lru-b")[0]
    assert "LOGOUT" in ca.command_names(), (
        "LRU idle session of lru-a not logged out: %r\n%s" % (ca.command_names(), fe.summary()))
    assert "LOGOUT" not in cb.command_names() and cb.is_open, (
        "lru-b's session (more recently used) was closed instead: %r" % cb.command_names())
    one_session(shim, "lru-b", admins)
    assert len(fe.logins(mailbox="lru-b")) == 1, "lru-b was not reused\n" + fe.summary()
    ok, text, _, _ = upstream_max_ok(fe, 2, {})
    assert ok, text


# --------------------------------------------------------------- isolation

def test_isolation_40_clients_8_mailboxes(pool_env, admins):
    """40 concurrent clients over 8 mailboxes (5 each), session_budget = 4,
    for ~6 s each loops: connect, LOGIN, SELECT INBOX, FETCH 1:* BODY[],
    LOGOUT.  Expected: no errors, every FETCH returns that mailbox's 3
    messages, and no byte a client receives names any other mailbox."""
    fe, shim = pool_env(pool={"session_budget": "4", "queue_timeout": "30s"})
    mailboxes = ["iso-%s" % x for x in "abcdefgh"]
    stop_at = time.monotonic() + 6
    errors, counts = [], {}
    lock = threading.Lock()

    def worker(k):
        mbx = mailboxes[k % 8]
        admin = (ADMIN1, ADMIN2)[k % 2]
        n = 0
        try:
            while time.monotonic() < stop_at:
                c = shim.client(timeout=40)
                try:
                    got = [c.greeting]
                    r = c.login(login_name(mbx, admin), admins[admin], tag="L")
                    got.append(r.raw)
                    assert r.status == "OK", "LOGIN %r" % r.raw
                    r = c.command("SELECT INBOX", tag="S")
                    got.append(r.raw)
                    assert r.status == "OK" and b"* 3 EXISTS" in r.raw, "SELECT %r" % r.raw
                    r = c.command("FETCH 1:* BODY[]", tag="F")
                    got.append(r.raw)
                    bodies = fetch_literals(r)
                    assert r.status == "OK" and len(bodies) == 3, "FETCH 1:* BODY[] %r" % r
                    for b in bodies:
                        assert ("Subject: for %s\r\n" % mbx).encode() in b, b[:300]
                    r = c.command("LOGOUT", tag="Z")
                    got.append(r.raw)
                    assert r.status == "OK", "LOGOUT %r" % r.raw
                    check_own(mbx, b"".join(got), "session %d" % n)
                    n += 1
                finally:
                    c.close()
        except Exception as e:  # noqa: BLE001
            with lock:
                errors.append("client %d (%s) after %d sessions: %s" % (k, mbx, n, e))
        with lock:
            counts[k] = n

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not [t for t in threads if t.is_alive()], "clients still running after 50 s"
    assert not errors, "%d of 40 clients failed:\n%s" % (len(errors), "\n".join(errors[:8]))
    total = sum(counts.values())
    assert min(counts.values()) >= 1, "some client never completed a session: %r" % counts
    ok, text, _, _ = upstream_max_ok(fe, 4, {})
    assert ok, text
    # upstream: every connection only ever logged in as one mailbox
    for c in fe.connections:
        users = {u for (_, u, _, _) in c.logins}
        assert len(users) <= 1, "one upstream connection logged in as %r" % users
    print("isolation: %d client sessions, %d upstream logins" % (total, len(fe.logins())))


# ------------------------------------------------------------------ pacing

def test_login_pacing(pool_env, admins):
    """login_rate = 5, login_burst = 5, one admin account (max_sessions 100),
    session_budget 100: 30 clients of 30 mailboxes send LOGIN at once.
    Expected: all get OK; the fake sees the first and last of the 30 upstream
    LOGINs at least (30-5)/5 = 5 s apart (4.8 s allowed for connect/TLS
    jitter), and never more than 5 + 5 LOGINs within any 1-second window
    (0.95 s, for the same jitter)."""
    fe, shim = pool_env(pool={"session_budget": "100", "login_rate": "5", "login_burst": "5",
                              "queue_timeout": "30s"},
                        admin_max={ADMIN1: 100}, admins={ADMIN1: admins[ADMIN1]},
                        fake={"max_connections_per_user": 200})
    start = threading.Event()
    sessions = [Session(shim, "pace%02d" % i, ADMIN1, admins[ADMIN1], timeout=40, start=start)
                for i in range(30)]
    t0 = time.monotonic()
    for s in sessions:
        s.thread.start()
    start.set()
    for s in sessions:
        s.thread.join(max(0.1, t0 + 45 - time.monotonic()))
    errors = [s.error for s in sessions if s.error]
    assert not errors, "%d clients failed:\n%s" % (len(errors), "\n".join(errors[:8]))
    assert all(s.done for s in sessions)
    ts = sorted(r.t for r in fe.logins())
    assert len(ts) == 30, "%d upstream LOGINs for 30 cold mailboxes" % len(ts)
    span = ts[-1] - ts[0]
    rel = ["%.2f" % (t - ts[0]) for t in ts]
    assert span >= 4.8, ("30 cold logins at login_rate 5, burst 5 took only %.2fs from first to "
                         "last upstream LOGIN (expected >= 5 s); times: %s" % (span, rel))
    # windows of 1 s less 50 ms: the fake sees a LOGIN a connect + TLS
    # handshake after imapshim spent the token, and that delay varies by a
    # few ms (more for the first burst, whose handshakes run together)
    worst = max(sum(1 for u in ts if t <= u < t + 0.95) for t in ts)
    assert worst <= 10, "%d upstream LOGINs within one second (max burst 5 + rate 5); times: %s" % (
        worst, rel)
    assert span <= 12, "pacing far slower than 5/s: %.2fs; times: %s" % (span, rel)
    print("pacing: 30 logins over %.2fs, at most %d in one second" % (span, worst))


# ------------------------------------------------------------ idle retirement

def test_idle_pooled_session_retired(pool_env, admins):
    """reuse_timeout = 2s.  Session 1 of M, then 0.5 s later session 2 of M
    (reuses the pooled session: one upstream LOGIN).  After session 2's
    LOGOUT the pooled session gets LOGOUT from imapshim 1.5-4 s later and the
    connection closes; session 3 of M then makes a fresh upstream LOGIN."""
    fe, shim = pool_env(pool={"reuse_timeout": "2s"})
    mbx = "retire-1"
    one_session(shim, mbx, admins)
    time.sleep(0.5)
    one_session(shim, mbx, admins)
    t_release = time.monotonic()
    assert len(fe.logins(mailbox=mbx)) == 1, "session 2 within reuse_timeout was not reused\n" \
        + fe.summary()
    conn = fe.connections_of(mbx)[0]
    got = fe.wait_for(lambda f: [t for (t, cmd) in conn.commands
                                 if re.match(rb"^\S+ LOGOUT\r\n$", cmd, re.I)], timeout=8)
    assert got, "pooled session not logged out within 8 s of idling (reuse_timeout 2s): %r" % (
        conn.command_names())
    dt = got[0] - t_release
    assert 1.5 <= dt <= 4.0, "pooled session logged out %.2fs after release (reuse_timeout 2s)" % dt
    print("retire: LOGOUT %.2fs after the client's release" % dt)
    assert fe.wait_for(lambda f: not conn.is_open, timeout=3), "connection still open"
    one_session(shim, mbx, admins)
    logins = fe.logins(mailbox=mbx, ok=True)
    assert len(logins) == 2, "after retirement: upstream LOGINs %r" % logins
