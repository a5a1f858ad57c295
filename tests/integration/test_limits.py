"""
Resource limits of imapshim (DESIGN.md 3.1, 3.6, 4 "memory per session stays
bounded"), against the fake Exchange of fake_exchange.py:

  emfile       imapshim runs with RLIMIT_NOFILE = 64 (a wrapper script does
               `ulimit -n 64; exec imapshim "$@"`).  Connections are opened
               until accept() fails: imapshim logs event=accept_error and backs
               off (listener.c pauses accepting 200 ms) instead of spinning --
               its CPU time (utime+stime of /proc/PID/stat) grows by less than
               0.5 s over 3 s of saturation, and it logs at most a few dozen
               accept_error lines; a client logged in before keeps being
               served meanwhile.  Once the extra connections close, a new
               client logs in and works normally.
  max_clients  max_clients = 5: the 6th connection is closed at accept (no
               greeting), logged (event=client_refused reason=max_clients) and
               counted (imapshim_clients_refused_total, /status
               counters.clients_refused); the five keep working; when one
               leaves, a new client is admitted.
  rss          300 logged-in clients (one mailbox each, INBOX selected) parked
               in multiplex mode (park_after = 1s; the pooled upstream sessions
               retired after reuse_timeout = 2s).  Once they are quiet (their
               TLS buffers given back, the heap trimmed after the burst of
               logins: waited for, with a deadline), imapshim's RSS has grown
               by less than RSS_PER_PARKED_SESSION and its heap gauge
               (imapshim_heap_in_use_bytes) by less than
               HEAP_PER_PARKED_SESSION per parked client session (the bounds
               the README documents; the measured figures are printed).  Under
               the ASan build the bounds are not asserted (its shadow memory,
               redzones and quarantine are not the product's footprint) but
               everything else is.
"""

import os
import re
import shlex
import socket
import concurrent.futures
import json
import time

import pytest

import harness

ADMIN = "NPUMAdmin1"
ASAN = "asan" in os.environ.get("IMAPSHIM", "")
KIB = 1024
# The documented bounds on memory per parked client session (TLS client
# connection, its session state and its mailbox snapshot of 3 messages),
# as the OS sees it and as the heap gauge does.  About 14 KiB of it is
# OpenSSL's state of the TLS connection, which stays while it is open.
RSS_PER_PARKED_SESSION = 30 * KIB
HEAP_PER_PARKED_SESSION = 26 * KIB
N_PARKED = 300


# ------------------------------------------------------------- helpers

def cpu_seconds(pid):
    """utime + stime of a process, in seconds (/proc/PID/stat fields 14, 15)."""
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1)) * KIB


def nofile_limit(pid):
    with open("/proc/%d/limits" % pid) as f:
        m = re.search(r"^Max open files\s+(\d+)\s+(\d+)", f.read(), re.M)
    return int(m.group(1)), int(m.group(2))


def status(port):
    return json.loads(harness.http_get(port, "/status"))


metric = harness.metric


def log_count(shim, pattern):
    return len(re.findall(pattern, shim.log_text(this_run=True)))


def check_served(shim, mailbox, timeout=10):
    """A new client logs in, SELECTs and FETCHes; returns its Response."""
    with shim.logged_in(mailbox, timeout=timeout) as c:
        r = c.command("SELECT INBOX", timeout=timeout)
        assert r.status == "OK", r
        r = c.command("FETCH 1 BODY.PEEK[]", timeout=timeout)
        assert r.status == "OK" and ("for %s" % mailbox).encode() in r.raw, r
        c.logout()
    return r


def raw_connections(port, n):
    out = []
    for _ in range(n):
        s = socket.create_connection((harness.HOST, port), timeout=5)
        out.append(s)
    return out


# ---------------------------------------------------------------- EMFILE

def test_emfile_backs_off_and_recovers(make_shim, make_fake, tmp_path):
    fake = make_fake()
    wrapper = tmp_path / "imapshim-nofile64"
    shim = make_shim(fake.port, config={"pool": {"mode": "session"},
                                        "shim": {"log_level": "info"}}, start=False)
    wrapper.write_text("#!/bin/sh\nulimit -n 64 || exit 1\nexec %s \"$@\"\n"
                       % shlex.quote(shim.binary))
    wrapper.chmod(0o755)
    shim.binary = str(wrapper)
    shim.start()
    pid = shim.proc.pid
    assert nofile_limit(pid) == (64, 64), "the wrapper did not lower RLIMIT_NOFILE"
    assert os.path.realpath("/proc/%d/exe" % pid).endswith("imapshim")

    good = shim.logged_in("emfile-good")            # holds its upstream session
    extra = []
    try:
        # fill every descriptor imapshim has; the kernel still completes the
        # TCP handshakes (listen backlog 1024), so count accept_error lines
        for _ in range(20):
            extra += raw_connections(shim.port, 10)
            time.sleep(0.3)
            if log_count(shim, r"event=accept_error") > 0:
                break
        assert log_count(shim, r"event=accept_error") > 0, (
            "%d connections and no accept_error; fds %d" % (
                len(extra), len(os.listdir("/proc/%d/fd" % pid))))
        m = re.search(r"event=accept_error [^\n]*", shim.log_text(this_run=True))
        assert re.search(r"reason=.*(open files|EMFILE)", m.group(0), re.I), m.group(0)
        fds = len(os.listdir("/proc/%d/fd" % pid))
        assert fds >= 60, "imapshim holds %d descriptors, not near 64" % fds

        # saturated: a few more in the backlog, then measure for 3 s
        extra += raw_connections(shim.port, 10)
        n0 = log_count(shim, r"event=accept_error")
        c0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(1.5)
        r = good.command("NOOP", timeout=5)          # the loop still serves
        assert r.status == "OK", r
        time.sleep(1.5)
        c1, t1 = cpu_seconds(pid), time.monotonic()
        n1 = log_count(shim, r"event=accept_error")
        cpu = c1 - c0
        figures = ("EMFILE: %d extra connections, imapshim fds %d; over %.1fs of "
                   "saturation: cpu %.3fs, %d accept_error lines" % (
                       len(extra), fds, t1 - t0, cpu, n1 - n0))
        print("\n" + figures)
        assert cpu < 0.5, "busy loop on EMFILE? " + figures
        # 200 ms pause per listener: ~15 per listener in 3 s; a spin logs thousands
        assert n1 - n0 <= 40, "accept_error not backed off: " + figures
        assert shim.alive()
    finally:
        for s in extra:
            s.close()

    # descriptors free again: the backlog drains and a new client is served
    deadline = time.monotonic() + 15
    while True:
        try:
            check_served(shim, "emfile-after", timeout=5)
            break
        except (harness.HarnessError, OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    r = good.command("NOOP", timeout=5)
    assert r.status == "OK", r
    good.logout()
    assert shim.alive()


# ----------------------------------------------------------- max_clients

def test_max_clients_refuses_and_counts(make_shim, make_fake):
    fake = make_fake()
    sport = harness.free_port()
    shim = make_shim(fake.port, config={
        "pool": {"mode": "session"},
        "shim": {"max_clients": "5", "status_listen": "%s:%d" % (harness.HOST, sport)}})
    harness.wait_until(lambda: status(sport), what="/status")
    assert metric(sport, "imapshim_clients_refused_total") == 0
    clients = [shim.logged_in("maxcl-%d" % i) for i in range(3)]
    clients += [shim.client() for _ in range(2)]     # TLS done, greeting read
    try:
        harness.wait_until(lambda: sum(status(sport)["clients"].values()) == 5,
                           what="5 clients in /status")

        def refused_6th():
            s = socket.create_connection((harness.HOST, shim.port), timeout=5)
            try:
                s.settimeout(5)
                try:
                    got = s.recv(100)
                except ConnectionResetError:
                    got = b""
                return got
            finally:
                s.close()
        assert refused_6th() == b"", "the 6th connection was not closed at accept"
        harness.wait_until(lambda: metric(sport, "imapshim_clients_refused_total") == 1,
                           what="imapshim_clients_refused_total 1")
        assert status(sport)["counters"]["clients_refused"] == 1
        assert log_count(shim, r"event=client_refused [^\n]*reason=max_clients") == 1
        # a TLS client sees the same: no greeting
        with pytest.raises((harness.HarnessError, OSError)):
            shim.client(timeout=5)
        harness.wait_until(lambda: metric(sport, "imapshim_clients_refused_total") == 2,
                           what="imapshim_clients_refused_total 2")
        # the five are unaffected
        for c in clients[:3]:
            assert c.command("NOOP").status == "OK"
        # one leaves: room for one more
        clients.pop().close()
        harness.wait_until(lambda: sum(status(sport)["clients"].values()) == 4,
                           what="4 clients in /status")
        clients.append(shim.logged_in("maxcl-new"))
        assert clients[-1].command("SELECT INBOX").status == "OK"
        assert refused_6th() == b""
        harness.wait_until(lambda: metric(sport, "imapshim_clients_refused_total") == 3,
                           what="imapshim_clients_refused_total 3")
    finally:
        for c in clients:
            c.close()


# ------------------------------------------------------------------- RSS

def test_rss_per_parked_session(make_shim, make_fake):
    fake = make_fake(messages_per_mailbox=3)
    sport = harness.free_port()
    shim = make_shim(fake.port, config={
        "shim": {"status_listen": "%s:%d" % (harness.HOST, sport), "log_level": "info",
                 "max_unauth_per_ip": "1000"},
        "pool": {"mode": "multiplex", "session_budget": "16", "park_after": "1s",
                 "reuse_timeout": "2s", "queue_timeout": "30s",
                 "login_rate": "1000", "login_burst": "1000"}})
    pid = shim.proc.pid
    harness.wait_until(lambda: status(sport), what="/status")

    def open_one(mbx):
        c = shim.logged_in(mbx, timeout=30)
        r = c.command("SELECT INBOX", timeout=30)
        assert r.status == "OK", r
        return c

    def all_parked(n):
        st = status(sport)
        cl = st["clients"]
        return (cl["parked"] == n and cl["attached"] == 0 and cl["waiting"] == 0
                and cl["unauthenticated"] == 0 and st["budget"]["used"] == 0)

    # warm up (OpenSSL, libevent, allocator), then let everything park and
    # the pooled sessions retire
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        warm = list(ex.map(open_one, ["rss-warm-%d" % i for i in range(20)]))
    for c in warm:
        c.logout()
    harness.wait_until(lambda: all_parked(0), timeout=15, interval=0.2,
                       what="warm-up clients gone, no upstream session")
    time.sleep(0.5)
    base = rss_bytes(pid)
    heap0 = metric(sport, "imapshim_heap_in_use_bytes")
    clients = []

    def per_session():
        """(RSS, heap) growth per parked session, bytes."""
        return ((rss_bytes(pid) - base) / N_PARKED,
                (metric(sport, "imapshim_heap_in_use_bytes") - heap0) / N_PARKED)

    def within_bounds():
        rss, heap = per_session()
        return rss < RSS_PER_PARKED_SESSION and heap < HEAP_PER_PARKED_SESSION
    try:
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            clients = list(ex.map(open_one, ["rss-%03d" % i for i in range(N_PARKED)]))
        took = time.monotonic() - t0
        harness.wait_until(lambda: all_parked(N_PARKED), timeout=20, interval=0.2,
                           what="%d parked clients and no upstream session" % N_PARKED)
        # quiet sessions give their TLS buffers back (after 2 s) and the
        # heap is trimmed at the next 2 s tick: wait for that, bounded
        try:
            if not ASAN:
                harness.wait_until(within_bounds, timeout=20, interval=0.5,
                                   what="memory within bounds")
        except harness.HarnessError:
            pass                        # judged below, with the figures
        after = rss_bytes(pid)
        per, heap_per = per_session()
        figures = ("RSS%s: %d parked client sessions (logged in %.1fs): RSS %.1f MiB -> "
                   "%.1f MiB, %.1f KiB per parked session (bound %d KiB); heap in use "
                   "%.1f KiB per parked session (bound %d KiB)" % (
                       " (ASan, not asserted)" if ASAN else "", N_PARKED, took,
                       base / KIB / KIB, after / KIB / KIB, per / KIB,
                       RSS_PER_PARKED_SESSION // KIB, heap_per / KIB,
                       HEAP_PER_PARKED_SESSION // KIB))
        print("\n" + figures)
        with open(os.path.join(shim.dir, "rss-figures.txt"), "a") as f:
            f.write(figures + "\n")
        # the parked sessions are alive: a sample of them is served again
        for c in clients[::30]:
            r = c.command("FETCH 1 (FLAGS)", timeout=30)
            assert r.status == "OK" and b"* 1 FETCH" in r.raw, r
        if not ASAN:
            assert per < RSS_PER_PARKED_SESSION, figures
            assert heap_per < HEAP_PER_PARKED_SESSION, figures
    finally:
        for c in clients:
            c.close()
    harness.wait_until(lambda: sum(status(sport)["clients"].values()) == 0, timeout=10,
                       what="no client left")
