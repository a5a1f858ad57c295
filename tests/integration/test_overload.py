"""
End-to-end tests of overload handling (issue 15, "a platform restart without
failures"; DESIGN.md 3.3 P12, 3.5 R14), against fake_exchange servers:

  bound      many clients logging in at once: the fake never sees more
             connects + TLS handshakes + logins in progress at once than
             [pool] max_logins_in_flight; later clients wait in the queue
             and all log in.
  overload   a server that times out some handshakes while it logs others
             in is overloaded, not down: imapshim_server_up stays 1, no
             retry_server_down, every client logs in and SELECTs with OK,
             imapshim_upstream_overload_total moved and the in-flight bound
             came down.
  down       a server that never answers (no success at all) still goes
             down after server_fail_threshold and clients fail over to the
             next server, as before.

Tests assert outcomes (counts, states, log events), never timings.
"""

import itertools
import threading

import harness

ADMIN = "NPUMAdmin1"


def config(servers, status_port, **pool):
    p = {"mode": "session", "session_budget": "256", "queue_timeout": "30s",
         "login_rate": "1000", "login_burst": "1000"}
    p.update(pool)
    return {
        "shim": {"status_listen": "127.0.0.1:%d" % status_port},
        "upstream": {"servers": ", ".join("127.0.0.1:%d" % s.port for s in servers),
                     "login_format": "{domain}/{admin}/{mailbox}",
                     "connect_timeout": "1s", "login_timeout": "4s",
                     "command_timeout": "20s"},
        "pool": p,
        "retry": {"backoff_initial": "50ms", "backoff_max": "500ms",
                  "server_fail_threshold": "2", "server_cooldown": "60s"},
        "admin %s" % ADMIN: {"max_sessions": "256"},
    }


def start(make_shim, servers, **pool):
    status_port = harness.free_port()
    shim = make_shim(servers[0].port, config=config(servers, status_port, **pool))
    shim.status_port = status_port
    harness.wait_port(status_port, proc=shim.proc, what="imapshim status endpoint")
    return shim


def metric(shim, name, fe):
    return harness.metric(shim.status_port, name, server="127.0.0.1:%d" % fe.port)


def storm(shim, admins, n, prefix):
    """n clients at once: LOGIN, SELECT INBOX.  {mailbox: (login, select)}
    tagged lines (None where the client got no answer)."""
    out = {}
    lock = threading.Lock()

    def one(i):
        mb = "%s-%03d" % (prefix, i)
        login = select = None
        try:
            with shim.client(timeout=60) as c:
                r = c.login(shim.login_name(mb, ADMIN), admins[ADMIN], tag="L")
                login = r.tagged
                if r.status == "OK":
                    select = c.command("SELECT INBOX", tag="S").tagged
        except (harness.HarnessError, OSError) as e:
            login = login or repr(e).encode()
        with lock:
            out[mb] = (login, select)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    return out


def assert_all_ok(res, fes):
    bad = {mb: r for mb, r in res.items()
           if not (r[0] or b"").startswith(b"L OK") or not (r[1] or b"").startswith(b"S OK")}
    assert not bad, "%d of %d clients failed: %r\n%s" % (
        len(bad), len(res), dict(itertools.islice(bad.items(), 5)),
        "\n".join(fe.summary(max_conns=10) for fe in fes))


def test_logins_in_flight_bounded(make_fake, make_shim, admins):
    """40 clients at once, max_logins_in_flight 4, each upstream LOGIN takes
    0.2 s: the fake never has more than 4 connections between accept and
    the LOGIN's answer, and every client logs in and SELECTs."""
    fe = make_fake(login_delay=0.2, max_connections_per_user=256)
    shim = start(make_shim, [fe], max_logins_in_flight="4")
    assert metric(shim, "imapshim_upstream_logins_in_flight_limit", fe) == 4
    res = storm(shim, admins, 40, "bound")
    assert_all_ok(res, [fe])
    assert len(fe.logins(ok=True)) >= 40, fe.summary(max_conns=10)
    peak = fe.max_in_progress()
    assert peak <= 4, "%d connects+logins in progress at once (bound 4)\n%s" % (
        peak, fe.summary(max_conns=10))
    # Waiters waited rather than failing: none was refused.
    assert shim.log_events("pool_queue_timeout") == []


def test_overload_is_not_down(make_fake, make_shim, admins):
    """The only server leaves every third connection without a TLS
    handshake (connect_timeout 1 s) while it logs the others in: overload.
    server_fail_threshold is 2, yet the server is never marked down; every
    one of 30 clients logs in and SELECTs with OK; the overload counter
    moved, and the in-flight bound came down from 8."""
    counter = itertools.count()

    def on_connect(conn):
        return "stall" if next(counter) % 3 == 2 else None

    fe = make_fake(script={"on_connect": on_connect}, login_delay=0.05,
                   max_connections_per_user=256)
    shim = start(make_shim, [fe], max_logins_in_flight="8")
    res = storm(shim, admins, 30, "ovl")
    assert_all_ok(res, [fe])
    assert metric(shim, "imapshim_server_up", fe) == 1
    assert shim.log_events("retry_server_down") == [], shim.log_text(True)[-3000:]
    overloads = metric(shim, "imapshim_upstream_overload_total", fe)
    assert overloads is not None and overloads >= 1, shim.log_text(True)[-3000:]
    ev = shim.log_events("server_overload")
    assert len(ev) == overloads
    assert min(int(e["limit"]) for e in ev) < 8
    assert shim.log_events("upstream_fail", **{"class": "timeout"}), \
        "no handshake timed out: the test did not overload anything"
    assert all(not (r[0] or b"").startswith(b"L NO") for r in res.values())


def test_dead_server_still_fails_over(make_fake, make_shim, admins):
    """servers = dead (accepts, never answers: no success at all), good:
    the dead one's timeouts are not overload; it goes down after
    server_fail_threshold (2) and clients log in on the good one."""
    dead = make_fake(script={"on_connect": lambda conn: "stall"})
    good = make_fake()
    shim = start(make_shim, [dead, good])
    for i in range(4):
        with shim.client(timeout=30) as c:
            r = c.login(shim.login_name("fo-%d" % i, ADMIN), admins[ADMIN], tag="L")
            assert r.status == "OK", (r, shim.log_text(True)[-3000:])
    shim.wait_log_event("retry_server_down", server="127.0.0.1:%d" % dead.port)
    assert metric(shim, "imapshim_server_up", dead) == 0
    assert metric(shim, "imapshim_server_up", good) == 1
    assert metric(shim, "imapshim_upstream_overload_total", dead) == 0
    assert shim.log_events("server_overload") == []
    assert dead.n_connections == 2, dead.summary()
