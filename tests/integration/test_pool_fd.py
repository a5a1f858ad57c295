"""
The pool's budget within the open-file limit (DESIGN.md 3.3 P13; issue 15,
a platform restart of 19,000 clients under a hard limit of 20,000 open
files), against fake_exchange, which counts every upstream connection from
TCP accept to close.

  shrink  imapshim runs with RLIMIT_NOFILE = 140 (a wrapper script does
          `ulimit -n 140; exec imapshim "$@"`), session_budget = 16,
          multiplex mode.  12 mailboxes log in and out, leaving 12 idle
          pooled sessions.  Then 67 clients connect: 140 less 64 kept for
          listeners, status, DNS ... less 67 clients leaves 9 descriptors,
          so the pool logs event=pool_fd_limited once (when the 61st client
          takes the budget below 16) and logs idle sessions out (LRU first;
          the fake counts their LOGOUTs) until 9 are left;
          imapshim_pool_effective_budget and /status budget.effective say 9.
          Every one of the 67 then gets OK to LOGIN and SELECT and "+" to
          IDLE, while the fake never sees more than 9 connections at once.
          Once the clients leave, event=pool_fd_unlimited and the gauge is
          back at 16.
"""

import concurrent.futures
import json
import os
import re
import shlex
import time

import harness

NOFILE = 140
RESERVE = 64            # MAIN_FD_HEADROOM
BUDGET = 16
N_CLIENTS = 67          # leaves 140 - 64 - 67 = 9
ROOM = NOFILE - RESERVE - N_CLIENTS


def status(port):
    return json.loads(harness.http_get(port, "/status"))


def max_open_since(fe, t0):
    """Most upstream connections open at once from t0 on (those open at t0
    count from t0)."""
    with fe.lock:
        spans = [(max(c.opened, t0), c.end) for c in fe.connections
                 if c.end is None or c.end > t0]
    ev = sorted([(a, 1) for a, _ in spans] +
                [(float("inf") if b is None else b, -1) for _, b in spans])
    cur = best = 0
    for _, d in ev:
        cur += d
        best = max(best, cur)
    return best


def low_nofile_shim(make_shim, fake, tmp_path, config):
    shim = make_shim(fake.port, config=config, start=False)
    wrapper = tmp_path / "imapshim-nofile"
    wrapper.write_text("#!/bin/sh\nulimit -n %d || exit 1\nexec %s \"$@\"\n"
                       % (NOFILE, shlex.quote(shim.binary)))
    wrapper.chmod(0o755)
    shim.binary = str(wrapper)
    shim.start()
    with open("/proc/%d/limits" % shim.proc.pid) as f:
        m = re.search(r"^Max open files\s+(\d+)", f.read(), re.M)
    assert m and int(m.group(1)) == NOFILE, "the wrapper did not lower RLIMIT_NOFILE"
    return shim


def serve(shim, c, mailbox):
    """LOGIN, SELECT INBOX, IDLE: the tagged lines and the IDLE's "+"."""
    r1 = c.login(shim.login_name(mailbox), shim.admins[next(iter(shim.admins))],
                 timeout=60)
    r2 = c.command("SELECT INBOX", timeout=60)
    c.send(b"i IDLE\r\n")
    _, plus = c.read_continuation(timeout=60)
    return r1.status, r2.status, plus


def test_pool_shrinks_to_fit_the_fd_limit(make_shim, make_fake, tmp_path):
    fe = make_fake()
    status_port = harness.free_port()
    shim = low_nofile_shim(make_shim, fe, tmp_path, {
        "shim": {"status_listen": "127.0.0.1:%d" % status_port,
                 "log_level": "info"},
        "upstream": {"login_format": "{domain}/{admin}/{mailbox}"},
        "pool": {"mode": "multiplex", "session_budget": str(BUDGET),
                 "queue_timeout": "60s", "reuse_timeout": "5m",
                 "login_rate": "1000", "login_burst": "1000"},
    })
    harness.wait_port(status_port, proc=shim.proc, what="status endpoint")
    assert harness.metric(status_port, "imapshim_pool_effective_budget") == BUDGET

    # 12 idle pooled sessions, no client left.
    for i in range(12):
        with shim.logged_in("fd%02d" % i) as c:
            assert c.command("SELECT INBOX").status == "OK"
            c.logout()
    harness.wait_until(lambda: sum(status(status_port)["clients"].values()) == 0,
                       what="the first clients gone")
    assert len(fe.open_connections()) == 12
    assert not shim.log_events("pool_fd_limited")

    clients = []
    try:
        for _ in range(N_CLIENTS):
            clients.append(shim.client(timeout=60))
        # One line when the descriptors start to bind: the 61st client
        # leaves 140 - 64 - 61 = 15 < 16.
        ev = shim.wait_log_event("pool_fd_limited")
        assert ev == [dict(ev[0], budget="15", session_budget=str(BUDGET),
                           clients="61", fd_limit=str(NOFILE))], ev
        # Idle sessions beyond the room are logged out, LRU first.
        harness.wait_until(lambda: len(fe.open_connections()) <= ROOM,
                           what="upstream connections down to %d" % ROOM)
        t_settled = time.monotonic()
        logouts = fe.commands("LOGOUT")
        assert len(logouts) == 12 - ROOM, logouts
        assert sorted(c.mailbox for c, _, _ in logouts) == ["fd00", "fd01", "fd02"]
        assert harness.metric(status_port, "imapshim_pool_effective_budget") == ROOM
        assert status(status_port)["budget"]["effective"] == ROOM

        # Every client served, the upstream within the room throughout.
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            res = list(ex.map(lambda ic: serve(shim, ic[1], "fd%02d" % ic[0]),
                              enumerate(clients)))
        assert res == [("OK", "OK", res[0][2])] * N_CLIENTS, res
        assert res[0][2].startswith(b"+"), res[0]
        most = max_open_since(fe, t_settled)
        assert most <= ROOM, "%d upstream connections at once, room %d" % (most, ROOM)
        assert len(shim.log_events("pool_fd_limited")) == 1
        assert not shim.log_events("pool_queue_timeout")
    finally:
        for c in clients:
            c.close()

    # The clients leave: the whole budget again, said once.
    ev = shim.wait_log_event("pool_fd_unlimited")
    assert len(ev) == 1 and ev[0]["budget"] == str(BUDGET), ev
    harness.wait_until(lambda: harness.metric(
        status_port, "imapshim_pool_effective_budget") == BUDGET,
        what="the effective budget back at %d" % BUDGET)
    assert os.path.exists("/proc/%d" % shim.proc.pid) and shim.alive()
