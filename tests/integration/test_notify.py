"""
End-to-end tests of imapshim's systemd notifications (DESIGN.md 3.6,
Type=notify) and the last-reload gauges.  Each test binds a Unix datagram
socket, starts imapshim with NOTIFY_SOCKET pointing at it (as systemd does
for a Type=notify unit) and reads what arrives.

  lifecycle  READY=1 with a STATUS once the listeners and the status
             endpoint are up; a good SIGHUP: RELOADING=1, then READY=1 with
             STATUS "reload ok"; a broken ini: RELOADING=1, READY=1 with
             "reload rejected: ..." and imapshim_last_reload_success 0,
             imapshim_reloads_total{result="rejected"} 1 (and /status's
             "reload"); a fixed ini: success 1 again; SIGTERM: STOPPING=1,
             exit 0.  No WATCHDOG=1 when systemd asked for none.
  status     the periodic STATUS counts a logged-in client and its upstream
             session against the budget.
  watchdog   WATCHDOG_USEC=1 s with WATCHDOG_PID = imapshim's pid (a shell
             that execs it, as systemd sets both): pings about every 0.5 s;
             WATCHDOG_PID of another process: no pings.
  console    the same for a reload by "imapshim-ctl reload" (the unit's
             ExecReload), which exits 0, then 1 for the broken ini.
  without    a binary built --without-systemd ignores NOTIFY_SOCKET: it
             serves, reloads (gauges included) and stops, sending nothing.

The notify tests skip for a binary built without libsystemd ("imapshim -V"
says "features: none"), the last one for a binary built with it.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

import harness


def _features(binary):
    out = subprocess.run([binary, "-V"], stdout=subprocess.PIPE, timeout=30,
                         check=True).stdout.decode()
    m = re.search(r"^features: (.*)$", out, re.M)
    assert m, "imapshim -V prints no features line: %r" % out
    return m.group(1).split()


@pytest.fixture(scope="module")
def has_systemd(imapshim_bin):
    return "systemd" in _features(imapshim_bin)


@pytest.fixture
def need_systemd(has_systemd):
    if not has_systemd:
        pytest.skip("imapshim was built without libsystemd (configure --without-systemd)")


class NotifySocket:
    """The service manager's end: a bound AF_UNIX datagram socket.  Every
    datagram is kept, parsed into {VAR: value}, in arrival order."""

    def __init__(self):
        # A short directory: sun_path holds 108 bytes.
        self.dir = tempfile.mkdtemp(prefix="imapshim-notify-")
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages = []

    def close(self):
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _recv(self, timeout):
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        msg = {}
        for line in data.decode(errors="replace").split("\n"):
            if "=" in line:
                k, v = line.split("=", 1)
                msg[k] = v
        self.messages.append(msg)
        return True

    def wait(self, pred, start=0, timeout=15.0, what="a notification"):
        """The index of the first message from index start on that
        satisfies pred; waits for more up to timeout."""
        deadline = time.monotonic() + timeout
        i = start
        while True:
            while i < len(self.messages):
                if pred(self.messages[i]):
                    return i
                i += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out after %.1fs waiting for %s; got %r"
                                     % (timeout, what, self.messages[start:]))
            self._recv(left)

    def drain(self, seconds):
        """Collect whatever arrives for this long (for counting pings)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._recv(deadline - time.monotonic())

    def count(self, key, start=0):
        return sum(1 for m in self.messages[start:] if key in m)


@pytest.fixture
def notify_socket():
    ns = NotifySocket()
    yield ns
    ns.close()


def _notify_shim(make_shim, dovecot, ns, env=None, config=None, binary=None):
    """An imapshim with NOTIFY_SOCKET = ns and status_listen on a free port
    (shim.status_port); the watchdog variables only as env says."""
    port = harness.free_port()
    cfg = {"shim": {"status_listen": "127.0.0.1:%d" % port},
           "upstream": {"login_format": "{mailbox}*{admin}"},
           "pool": {"session_budget": "9"}}
    for sect, kv in (config or {}).items():
        cfg.setdefault(sect, {}).update(kv)
    shim = make_shim(dovecot.port_imaps, config=cfg, start=False)
    shim.status_port = port
    shim.env = {"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": None, "WATCHDOG_PID": None}
    shim.env.update(env or {})
    if binary:
        shim.binary = binary
    shim.start()
    harness.wait_port(port, proc=shim.proc, what="imapshim status endpoint")
    return shim


def _is(key, value=None, status=None):
    """A predicate: key present (= value), STATUS matching the regex status."""
    def pred(m):
        if key not in m or (value is not None and m[key] != value):
            return False
        return status is None or re.search(status, m.get("STATUS", "")) is not None
    return pred


def _reload(shim, ns, good, start, trigger=None):
    """SIGHUP (or trigger()); RELOADING=1 and then READY=1 with the result.
    Returns the index after the READY message and its STATUS."""
    before = time.time()
    if trigger is None:
        os.kill(shim.proc.pid, signal.SIGHUP)
    else:
        trigger()
    i = ns.wait(_is("RELOADING", "1"), start, what="RELOADING=1")
    assert ns.messages[i].get("MONOTONIC_USEC", "").isdigit(), ns.messages[i]
    assert "READY" not in ns.messages[i]
    result = r"^reload ok$" if good else r"^reload rejected: \S.*"
    j = ns.wait(_is("READY", "1"), i + 1, what="READY=1 after the reload")
    status = ns.messages[j].get("STATUS", "")
    assert re.search(result, status), (good, ns.messages[j])
    ts = harness.metric(shim.status_port, "imapshim_last_reload_timestamp_seconds")
    assert int(before) <= ts <= time.time() + 1, (before, ts)
    return j + 1, status


def _gauges(shim):
    p = shim.status_port
    return (harness.metric(p, "imapshim_last_reload_success"),
            harness.metric(p, "imapshim_reloads_total", result="ok"),
            harness.metric(p, "imapshim_reloads_total", result="rejected"))


def test_ready_reload_rejected_stopping(need_systemd, make_shim, dovecot, notify_socket):
    ns = notify_socket
    t0 = time.time()
    shim = _notify_shim(make_shim, dovecot, ns)
    i = ns.wait(_is("READY", "1"), what="READY=1 at start")
    assert re.search(r"^ready; servers 1, admin accounts 2, session budget 9$",
                     ns.messages[i].get("STATUS", "")), ns.messages[i]
    # READY only once the listeners answer: a login works now.
    c = shim.logged_in("notify-ready")
    c.logout()
    # At start: success 1, the start time, no reloads.
    assert _gauges(shim) == (1, 0, 0)
    ts = harness.metric(shim.status_port, "imapshim_last_reload_timestamp_seconds")
    assert int(t0) <= ts <= time.time() + 1, (t0, ts)

    n, _ = _reload(shim, ns, True, i + 1)
    assert _gauges(shim) == (1, 1, 0)

    shim.config["upstream"]["no_such_key"] = "1"
    shim.write_ini()
    n, status = _reload(shim, ns, False, n)
    assert shim.ini_path in status, status
    assert _gauges(shim) == (0, 1, 1)
    doc = json.loads(harness.http_get(shim.status_port, "/status"))
    rel = doc["reload"]
    assert rel["last_success"] is False and rel["ok"] == 1 and rel["rejected"] == 1, rel
    assert rel["last_timestamp_seconds"] == harness.metric(
        shim.status_port, "imapshim_last_reload_timestamp_seconds")
    # The old settings kept serving.
    c = shim.logged_in("notify-rejected")
    c.logout()

    del shim.config["upstream"]["no_such_key"]
    shim.write_ini()
    n, _ = _reload(shim, ns, True, n)
    assert _gauges(shim) == (1, 2, 1)
    assert json.loads(harness.http_get(shim.status_port, "/status"))["reload"][
        "last_success"] is True

    assert shim.stop() == 0
    k = ns.wait(_is("STOPPING", "1"), n, what="STOPPING=1 on SIGTERM")
    assert "READY" not in ns.messages[k]
    # Nobody asked for a watchdog.
    assert ns.count("WATCHDOG") == 0, ns.messages
    assert shim.log_events("systemd_notify", watchdog_ms="0")


def test_console_reload(need_systemd, make_shim, dovecot, notify_socket):
    """The unit's ExecReload=imapshim-ctl reload: its exit status is the
    result (what makes "systemctl reload" fail), and systemd hears
    RELOADING=1 and READY=1 as for SIGHUP."""
    ns = notify_socket
    shim = _notify_shim(make_shim, dovecot, ns)
    n = ns.wait(_is("READY", "1"), what="READY=1 at start") + 1
    res = []

    def ctl_reload():
        res.append(harness.ctl(shim, "reload"))

    n, _ = _reload(shim, ns, True, n, trigger=ctl_reload)
    assert res[-1][0] == 0, res[-1]
    shim.config["upstream"]["no_such_key"] = "1"
    shim.write_ini()
    n, status = _reload(shim, ns, False, n, trigger=ctl_reload)
    assert res[-1][0] == 1, res[-1]
    assert _gauges(shim) == (0, 1, 1)


def test_periodic_status(need_systemd, make_shim, dovecot, notify_socket):
    ns = notify_socket
    shim = _notify_shim(make_shim, dovecot, ns)
    i = ns.wait(_is("READY", "1"), what="READY=1 at start")
    c = shim.logged_in("notify-status")
    try:
        # Refreshed every 5 s: within two periods it shows the client,
        # attached, and its upstream session out of the budget of 9.
        j = ns.wait(_is("STATUS", status=r"^clients 1 \(attached 1, parked 0, "
                                         r"waiting 0\); upstream 1/9$"),
                    i + 1, timeout=12, what="a STATUS with the logged-in client")
        assert "READY" not in ns.messages[j]
    finally:
        c.logout()
    ns.wait(_is("STATUS", status=r"^clients 0 \(attached 0, parked 0, waiting 0\); "
                                 r"upstream \d+/9$"),
            j + 1, timeout=12, what="a STATUS without the client")


def test_watchdog_pings(need_systemd, make_shim, dovecot, notify_socket, imapshim_bin):
    ns = notify_socket
    # systemd sets WATCHDOG_PID to the service's pid; a shell that execs
    # imapshim keeps its pid, so $$ is imapshim's.
    wrapper = os.path.join(ns.dir, "imapshim-wd")
    harness.write_file(wrapper, '#!/bin/sh\nWATCHDOG_PID=$$ exec %s "$@"\n'
                       % imapshim_bin, 0o755)
    shim = _notify_shim(make_shim, dovecot, ns, env={"WATCHDOG_USEC": "1000000"},
                        binary=wrapper)
    i = ns.wait(_is("READY", "1"), what="READY=1 at start")
    assert shim.log_events("systemd_notify", watchdog_ms="1000"), shim.log_text(True)[-2000:]
    t = time.monotonic()
    # Every 0.5 s: at least 3 within 3 s, even on a busy machine.
    ns.wait(lambda m: ns.count("WATCHDOG", i + 1) >= 3, i + 1, timeout=3,
            what="3 WATCHDOG=1 pings")
    assert time.monotonic() - t >= 0.9, "pings faster than half WATCHDOG_USEC"
    assert all(m.get("WATCHDOG") == "1" for m in ns.messages if "WATCHDOG" in m)
    assert shim.stop() == 0


def test_watchdog_of_another_process(need_systemd, make_shim, dovecot, notify_socket):
    """WATCHDOG_PID names another process: that process's watchdog, not
    imapshim's.  The first ping would come before READY."""
    ns = notify_socket
    shim = _notify_shim(make_shim, dovecot, ns, env={"WATCHDOG_USEC": "1000000",
                                                     "WATCHDOG_PID": str(os.getpid())})
    i = ns.wait(_is("READY", "1"), what="READY=1 at start")
    assert ns.count("WATCHDOG") == 0, ns.messages[:i + 1]
    assert shim.log_events("systemd_notify", watchdog_ms="0")


def test_without_systemd_ignores_notify_socket(has_systemd, make_shim, dovecot,
                                               notify_socket):
    if has_systemd:
        pytest.skip("imapshim was built with libsystemd (this is the --without-systemd check)")
    ns = notify_socket
    shim = _notify_shim(make_shim, dovecot, ns, env={"WATCHDOG_USEC": "1000000"})
    c = shim.logged_in("notify-none")
    c.logout()
    os.kill(shim.proc.pid, signal.SIGHUP)
    shim.wait_log_event("reload", result="ok")
    assert _gauges(shim) == (1, 1, 0)
    assert shim.stop() == 0
    ns.drain(0.2)
    assert ns.messages == []
    assert not shim.log_events("systemd_notify")
