"""
test_polling.py - parked IDLE clients' polls at scale, and the fd limit
(DESIGN.md 3.3 P3, 3.4 M10; issue 15 "Polling at scale", "LimitNOFILE").

  spread     50 clients that parked within seconds of each other poll spread
             over the whole idle_poll_interval: each one's first poll comes
             at a uniformly random offset in [0, interval) after it parked,
             not in [interval/2, interval] (the old jitter) or all at once.
  priority   with the budget full and IDLE polls queued, a client's command
             (here a LOGIN) is served before the polls queued ahead of it.
  stretch    when the budget cannot keep up, polls stretch: no client polls
             twice within one interval, and the poll lag gauges
             (imapshim_poll_lag_max_seconds, /status "polls") move.
  fd limit   started with a low soft and hard RLIMIT_NOFILE, imapshim raises
             the soft limit to the hard one and warns (log and -t) that
             max_clients does not fit, naming LimitNOFILE=.

The fake Exchange (fake_exchange.py) records every command with its time; a
poll shows there as the client's saved SELECT sent again.  How a test knows
when a client parked and polled: imapshim's debug log (event=client_parked
... idle=yes, event=client_state from=parked-idle to=polling).  No test
asserts a timing: they assert counts, orders and gauges.
"""
import datetime
import json
import os
import random
import re
import resource
import subprocess

import pytest

import harness

ADMIN1 = "NPUMAdmin1"


def poll_config(pool=None, status_port=None):
    cfg = {
        "pool": {"mode": "multiplex", "park_after": "1s", "queue_timeout": "30s",
                 "reuse_timeout": "60s", "login_rate": "1000", "login_burst": "1000"},
    }
    cfg["pool"].update(pool or {})
    if status_port:
        cfg["shim"] = {"status_listen": "127.0.0.1:%d" % status_port}
    return cfg


def mailbox(prefix):
    return "%s-%d" % (prefix, random.randrange(10 ** 9))


def idle_client(shim, mbx):
    """A client of mbx logged in, its INBOX selected, idling."""
    c = shim.logged_in(mbx, timeout=30)
    r = c.command("SELECT INBOX", timeout=30)
    assert r.status == "OK", r
    c.send(b"i IDLE\r\n")
    _, plus = c.read_continuation(timeout=30)
    assert plus.startswith(b"+"), plus
    return c


def log_time(kv_line):
    """The time of a log line (its ISO timestamp), in seconds."""
    ts = kv_line.split(" ", 1)[0]
    return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def timed_events(shim, pattern):
    """[(time, match)] of this run's log lines matching pattern."""
    out = []
    for line in shim.log_text(this_run=True).splitlines():
        m = re.search(pattern, line)
        if m:
            out.append((log_time(line), m))
    return out


def first_park_and_poll(shim):
    """{client id: (time of its first IDLE park, time of its first poll
    after it)}, for the clients that have both."""
    parks, polls = {}, {}
    for t, m in timed_events(shim, r"event=client_parked id=(\d+) .* idle=yes"):
        parks.setdefault(m.group(1), t)
    for t, m in timed_events(shim, r"event=client_state id=(\d+) from=parked-idle "
                                   r"to=polling"):
        if m.group(1) in parks and t >= parks[m.group(1)]:
            polls.setdefault(m.group(1), t)
    return {cid: (parks[cid], polls[cid]) for cid in polls}


def status_json(port):
    return json.loads(harness.http_get(port, "/status"))


def gauge(port, name):
    return harness.metric(port, name)


def test_polls_spread_over_the_interval(make_shim, make_fake):
    """50 clients, each its own mailbox, LOGIN + SELECT + IDLE through a
    budget of 8 (so they are parked within seconds of each other as the
    next ones log in), idle_poll_interval = 4s.  Expected: each client's
    first poll comes at a uniformly random offset in [0, 4s) after it
    parked: at least 10 of them within 1.6 s of parking (about 20 are
    expected; with the old jitter of [2s, 4s] none would be), and the first
    polls are spread over most of the interval (not in a small window)."""
    interval = 4.0
    fe = make_fake()
    shim = make_shim(fe.port, config=poll_config(
        {"session_budget": "8", "idle_poll_interval": "4s"}))
    clients = []
    try:
        for i in range(50):
            clients.append(idle_client(shim, mailbox("spread%d" % i)))
        got = harness.wait_until(
            lambda: (lambda d: d if len(d) >= 40 else None)(first_park_and_poll(shim)),
            timeout=30, what="40 parked IDLE clients to poll once")
        offsets = sorted(poll - park for park, poll in got.values())
        firsts = sorted(poll for _, poll in got.values())
        early = [o for o in offsets if o < 0.4 * interval]
        print("first poll offsets after parking (s): %s" % ["%.2f" % o for o in offsets])
        assert len(early) >= 10, (
            "only %d of %d clients polled within 0.4 x idle_poll_interval of "
            "parking: %r" % (len(early), len(offsets), offsets))
        assert firsts[-1] - firsts[0] >= 0.5 * interval, (
            "first polls all within %.2fs" % (firsts[-1] - firsts[0]))
        # Every poll is a SELECT sent again; none of the clients was failed.
        assert len(fe.commands("SELECT")) >= 50 + 40
        assert not shim.log_events("client_resync_refused")
    finally:
        for c in clients:
            c.close()


def test_commands_before_polls_and_polls_stretch(make_shim, make_fake):
    """session_budget = 1, idle_poll_interval = 1s, and a SELECT that takes
    the fake Exchange 0.4 s: five parked IDLE clients need 5 polls a second,
    the one session can do about two, so polls queue up.  Expected:
    - with 3 or more polls queued, a new client's LOGIN (a command waiter)
      gets the next session: at most one poll (one already logging in) is
      granted between its arrival and its own grant, not the polls queued
      ahead of it;
    - polls stretch instead of herding: no client polls (SELECTs again)
      sooner than one interval after its previous poll;
    - the lag gauges move: imapshim_poll_lag_max_seconds and /status
      polls.lag_max_seconds pass 1 s, the achieved interval passes 1 s,
      imapshim_poll_queue_length shows the polls waiting."""
    interval = 1.0
    status_port = harness.free_port()
    fe = make_fake(script={"on_command": lambda conn, tag, name, cmd:
                           0.4 if name == "SELECT" else None})
    shim = make_shim(fe.port, config=poll_config(
        {"session_budget": "1", "idle_poll_interval": "1s"}, status_port))
    pollers = [mailbox("poller%d" % i) for i in range(5)]
    clients = []
    late = None
    try:
        for mbx in pollers:
            clients.append(idle_client(shim, mbx))
        harness.wait_until(lambda: (gauge(status_port, "imapshim_poll_queue_length")
                                    or 0) >= 3,
                           timeout=30, what="3 IDLE polls queued")

        late = mailbox("late")
        c = shim.logged_in(late, timeout=30)
        clients.append(c)
        lines = shim.log_text(this_run=True).splitlines()
        auth = [i for i, ln in enumerate(lines)
                if "event=client_auth " in ln and "mailbox=%s " % late in ln + " "]
        assert auth, "no client_auth line for %s" % late
        grants = [harness.parse_log_line(ln)[0] for ln in lines[auth[0]:]
                  if " event=pool_grant " in ln]
        mine = [i for i, g in enumerate(grants) if g.get("mailbox") == late]
        assert mine, "no pool_grant for %s" % late
        assert mine[0] <= 1, (
            "%d polls were granted before the waiting LOGIN: %r"
            % (mine[0], [g.get("mailbox") for g in grants[:mine[0] + 1]]))

        harness.wait_until(lambda: (gauge(status_port, "imapshim_poll_lag_max_seconds")
                                    or 0) > 1.0,
                           timeout=30, what="poll lag over 1s")
        # The achieved interval counts polls that repeated a poll.
        harness.wait_until(lambda: (gauge(status_port, "imapshim_poll_interval_seconds")
                                    or 0) > interval,
                           timeout=30, what="achieved poll interval over 1s")
        st = status_json(status_port)
        assert st["polls"]["lag_max_seconds"] > 1.0, st["polls"]
        assert st["polls"]["interval_target_seconds"] == 1, st["polls"]
        assert st["polls"]["interval_seconds"] > interval, st["polls"]
        assert st["polls"]["last_minute"] > 0, st["polls"]
        assert (gauge(status_port, "imapshim_poll_lag_seconds_count") or 0) > 0
        assert (gauge(status_port, "imapshim_poll_interval_seconds") or 0) > interval

        # No herd: each poller's SELECTs (the first is its own) at least an
        # interval apart (10% for the clock and the time to send).
        for mbx in pollers:
            ts = [t for _, t, _ in fe.commands("SELECT", mailbox=mbx)][1:]
            gaps = [b - a for a, b in zip(ts, ts[1:])]
            assert all(g >= 0.9 * interval for g in gaps), (mbx, gaps)
        # Nobody waiting for a command was refused meanwhile.
        assert not shim.log_events("pool_queue_timeout")
    finally:
        for c in clients:
            c.close()


def _low_nofile(soft, hard):
    def pre():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return pre


def _soft_nofile(pid):
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return None


def test_fd_limit_raised_and_warned(make_shim):
    """Started with RLIMIT_NOFILE soft 200, hard 1000, session_budget = 16
    and the default max_clients = 20000: imapshim raises its soft limit to 1000
    (event=fd_limit_raised from=200 to=1000, and /proc says so) and logs
    event=fd_limit_low once, saying how many clients fit and naming
    LimitNOFILE=; `imapshim -t` prints the same warning and still exits 0."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1000:
        pytest.skip("hard RLIMIT_NOFILE below 1000")
    shim = make_shim(harness.free_port(), config={"pool": {"session_budget": "16"}},
                     start=False)
    shim.write_ini()

    t = subprocess.run([shim.binary, "-t", "-c", shim.ini_path],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       preexec_fn=_low_nofile(200, 1000), timeout=30)
    assert t.returncode == 0, (t.stdout, t.stderr)
    assert "LimitNOFILE=" in t.stderr and "max_clients = 20000" in t.stderr, t.stderr
    # 1000 descriptors less session_budget (16) and 64 for the rest.
    assert "about 920 clients" in t.stderr, t.stderr

    logf = open(shim.log_path, "ab")
    proc = subprocess.Popen([shim.binary, "-c", shim.ini_path],
                            stdin=subprocess.DEVNULL, stdout=logf,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_low_nofile(200, 1000))
    try:
        harness.wait_port(shim.port, proc=proc, what="imapshim")
        raised = shim.log_events("fd_limit_raised", this_run=False)
        assert raised and raised[0]["from"] == "200" and raised[0]["to"] == "1000", raised
        assert _soft_nofile(proc.pid) == 1000
        low = shim.log_events("fd_limit_low", this_run=False)
        assert len(low) == 1, low
        assert low[0]["max_clients"] == "20000", low
        assert "LimitNOFILE=" in low[0]["reason"], low
        assert proc.poll() is None
    finally:
        harness.kill_group(proc)
        logf.close()
