"""
End-to-end tests of imapshim's operations contract (DESIGN.md 3.6): SIGHUP
reload, SIGTERM drain, privilege drop, SIGUSR1 log reopen, the command line
(-t, -V, -h, file modes), passwords never in a log, and the shipped
contrib/ files (systemd unit).

  reload   under load from looping clients: budget 4 -> 8 -> 2 -> a new
           admin password -> a broken file; no client error, no client
           dropped, the upstream sessions imapshim holds to Dovecot never
           over the active budget (or what was already open when it was
           lowered); waiting clients admitted when the budget rises.
  drain    a FETCH held 2 s by fake_exchange when SIGTERM arrives: the
           client still gets its tagged OK, then * BYE; new connections
           are refused; the upstream is logged out; exit status 0.
  user     (root only) "user = nobody": real, effective and saved uid and
           gid are nobody's, and logins still work.
  usr1     log_target = FILE renamed, SIGUSR1, a login: the lines go to a
           new FILE.
  cli      -t good/bad, -V, -h, group-readable ini or password file.
  secrets  no password used by this module appears in any log it produced.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

import harness

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.environ.get("top_srcdir") or os.path.abspath(os.path.join(HERE, "..", ".."))

# Every password and log file this module used: the last test checks them.
SECRETS = set()
LOGS = []


def remember(shim, *extra_logs):
    LOGS.append(shim.log_path)
    LOGS.extend(extra_logs)
    SECRETS.update(shim.admins.values())
    return shim


def reload_count(shim, what="ok"):
    return len(re.findall(r"event=reload result=%s" % what, shim.log_text(this_run=True)))


def sighup(shim, expect="ok"):
    """SIGHUP and wait for the reload's log line."""
    n = reload_count(shim, expect)
    os.kill(shim.proc.pid, signal.SIGHUP)
    harness.wait_until(lambda: reload_count(shim, expect) > n, timeout=10,
                       what="event=reload result=%s in imapshim's log" % expect)


# ------------------------------------------------------ upstream sessions

def _socket_inodes(pid):
    out = set()
    d = "/proc/%d/fd" % pid
    try:
        names = os.listdir(d)
    except OSError:
        return out
    for n in names:
        try:
            t = os.readlink(os.path.join(d, n))
        except OSError:
            continue
        if t.startswith("socket:["):
            out.add(t[8:-1])
    return out


def upstream_sockets(pid, port):
    """Sockets process pid holds open to 127.0.0.1:port (any TCP state):
    what counts against the budget until imapshim frees the session."""
    inodes = _socket_inodes(pid)
    n = 0
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                p = line.split()
                rem_port = int(p[2].split(":")[1], 16)
                if rem_port == port and p[9] in inodes:
                    n += 1
    except OSError:
        pass
    return n


class Sampler(threading.Thread):
    """Samples upstream_sockets() every 20 ms; records any sample above the
    current limit (set by the test as the active budget changes)."""

    def __init__(self, pid, port, limit):
        super().__init__(daemon=True)
        self.pid, self.port = pid, port
        self.limit = limit
        self.stop_ev = threading.Event()
        self.violations = []
        self.peak = 0
        self.last = 0

    def run(self):
        while not self.stop_ev.is_set():
            limit = self.limit
            n = upstream_sockets(self.pid, self.port)
            self.last = n
            self.peak = max(self.peak, n)
            if n > limit:
                self.violations.append((time.monotonic(), n, limit))
            time.sleep(0.02)

    def stop(self):
        self.stop_ev.set()
        self.join(5)


# ---------------------------------------------------------- looping client

class Looper(threading.Thread):
    """A client that logs in (it may wait in imapshim's queue) and runs
    commands in a loop until stopped, then logs out.  Any error is kept."""

    COMMANDS = ("NOOP", "SELECT INBOX", "UID SEARCH ALL", "STATUS INBOX (MESSAGES)",
                "UID FETCH 1:* (FLAGS)")

    def __init__(self, shim, mailbox, admin, password):
        super().__init__(daemon=True, name="looper-" + mailbox)
        self.shim, self.mailbox, self.admin, self.password = shim, mailbox, admin, password
        self.stop_ev = threading.Event()
        self.logged_in = threading.Event()
        self.errors = []
        self.iterations = 0

    def run(self):
        c = None
        try:
            c = self.shim.client(timeout=40)
            r = c.login(self.shim.login_name(self.mailbox, self.admin), self.password,
                        tag="L", timeout=40)
            if r.status != "OK":
                self.errors.append("LOGIN: %r" % r)
                return
            self.logged_in.set()
            while not self.stop_ev.is_set():
                for cmd in self.COMMANDS:
                    r = c.command(cmd, timeout=20)
                    if r.status != "OK":
                        self.errors.append("%s: %r" % (cmd, r))
                        return
                self.iterations += 1
                time.sleep(0.02)
            r = c.command("LOGOUT", timeout=20)
            if not r.raw.startswith(b"* BYE"):
                self.errors.append("LOGOUT: %r" % r)
        except Exception as e:  # noqa: BLE001 - every failure is a finding
            self.errors.append("%s: %s" % (type(e).__name__, e))
        finally:
            if c is not None:
                c.close()

    def finish(self):
        self.stop_ev.set()
        self.join(30)
        assert not self.is_alive(), "%s did not finish" % self.name
        assert not self.errors, "%s: %s" % (self.name, self.errors)


def wait_progress(loopers, timeout=15):
    """Every looper completes at least two more loops (it is still served)."""
    start = {lp: lp.iterations for lp in loopers}
    harness.wait_until(
        lambda: all(lp.iterations >= start[lp] + 2 or lp.errors for lp in loopers),
        timeout=timeout, what="every client to keep running commands")
    for lp in loopers:
        assert not lp.errors, "%s: %s" % (lp.name, lp.errors)


# ----------------------------------------------------------------- fixtures

OPS_ADMIN = "OpsAdmin1"


@pytest.fixture(scope="module")
def ops_dovecot(workdir, pki):
    """A private Dovecot whose master passwords this module may change."""
    admins = {OPS_ADMIN: "Ops-" + os.urandom(9).hex(), "OpsAdmin2": "Ops2-" + os.urandom(9).hex()}
    dv = harness.Dovecot(os.path.join(workdir, "dovecot-ops"), pki, admins).start()
    yield dv
    dv.stop()


def set_dovecot_password(dv, admin, password):
    """Change a master password in the running Dovecot (it re-reads its
    passwd-file when the file changes)."""
    dv.admins[admin] = password
    harness.write_file(dv.master_passwd, "".join(
        "%s:{PLAIN}%s\n" % (a, p) for a, p in dv.admins.items()), 0o644)
    st = os.stat(dv.master_passwd)
    os.utime(dv.master_passwd, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))

    def takes_new_password():
        try:
            dv.connect("opsprobe", admin).close()
            return True
        except (harness.HarnessError, OSError):
            return False
    # Dovecot reads the file at its next lookup; make sure it did before
    # the test goes on to blame imapshim for Dovecot's old password.
    harness.wait_until(takes_new_password, timeout=10,
                       what="Dovecot taking %s's new password" % admin)


def dovecot_shim(make_shim, dv, admins, pool=None, shim=None, **kw):
    cfg = {
        "upstream": {"login_format": "{mailbox}*{admin}", "connect_timeout": "5s"},
        "pool": {"mode": "session", "session_budget": "4", "queue_timeout": "25s",
                 "login_rate": "1000", "login_burst": "1000"},
    }
    cfg["pool"].update(pool or {})
    if shim:
        cfg["shim"] = dict(shim)
    return remember(make_shim(dv.port_imaps, config=cfg, admins=admins, **kw))


def rewrite_ini(s, pool=None, extra_lines=""):
    """New values in s.config, rewrite the ini (and password files)."""
    for k, v in (pool or {}).items():
        s.config["pool"][k] = v
    s.write_ini()
    if extra_lines:
        with open(s.ini_path, "a") as f:
            f.write(extra_lines)


# ------------------------------------------------------------------ reload

def test_reload_under_load(make_shim, ops_dovecot):
    dv = ops_dovecot
    old_pw = dv.admins[OPS_ADMIN]
    s = dovecot_shim(make_shim, dv, {OPS_ADMIN: old_pw}, pool={"session_budget": "4"})
    sampler = Sampler(s.proc.pid, dv.port_imaps, limit=4)
    sampler.start()
    loopers = [Looper(s, "ops%d" % i, OPS_ADMIN, old_pw) for i in range(6)]
    try:
        for lp in loopers:
            lp.start()
        # budget 4: four clients are served, two wait in the queue
        harness.wait_until(lambda: sum(lp.logged_in.is_set() for lp in loopers) >= 4,
                           timeout=15, what="four clients logged in")
        time.sleep(0.7)
        assert sum(lp.logged_in.is_set() for lp in loopers) == 4, \
            "budget 4 but %d clients were given sessions" % sum(
                lp.logged_in.is_set() for lp in loopers)
        assert all(not lp.errors for lp in loopers), [lp.errors for lp in loopers]

        # budget 8: the two waiting clients are admitted at once
        sampler.limit = 8
        rewrite_ini(s, pool={"session_budget": "8"})
        sighup(s)
        harness.wait_until(lambda: all(lp.logged_in.is_set() for lp in loopers),
                           timeout=5, what="waiting clients admitted after the budget rose")
        wait_progress(loopers)
        assert upstream_sockets(s.proc.pid, dv.port_imaps) == 6

        # budget 2: nothing is dropped; no new upstream session while over it
        open_now = upstream_sockets(s.proc.pid, dv.port_imaps)
        sampler.limit = max(2, open_now)
        rewrite_ini(s, pool={"session_budget": "2"})
        sighup(s)
        wait_progress(loopers)
        # five clients leave: their sessions are not kept over the budget
        for lp in loopers[1:]:
            lp.finish()
        sampler.limit = max(2, open_now)
        harness.wait_until(lambda: upstream_sockets(s.proc.pid, dv.port_imaps) <= 2,
                           timeout=10, what="upstream sessions trimmed to the budget of 2")
        sampler.limit = 2
        wait_progress(loopers[:1])

        # a new password for the admin account, in imapshim and in "Exchange"
        new_pw = "Ops-new-" + os.urandom(12).hex()
        SECRETS.add(new_pw)
        s.admins[OPS_ADMIN] = new_pw
        set_dovecot_password(dv, OPS_ADMIN, new_pw)
        rewrite_ini(s)
        sighup(s)
        with s.client() as c:
            r = c.login(s.login_name("opsnew1", OPS_ADMIN), old_pw)
            assert r.status == "NO", "the old password still works after reload: %r" % r
        with s.client() as c:
            r = c.login(s.login_name("opsnew2", OPS_ADMIN), new_pw)
            assert r.status == "OK", "new password refused after reload: %r" % r
            assert c.command("SELECT INBOX").status == "OK"
            c.logout()
        wait_progress(loopers[:1])          # the old session keeps working

        # a broken file: rejected with file:line, old settings kept
        bad_pwf = harness.write_file(os.path.join(s.dir, "ops-bad.secret"),
                                     "Bad-" + os.urandom(8).hex() + "\n", 0o600)
        SECRETS.add(open(bad_pwf).read().strip())
        s.write_ini()
        good_ini = open(s.ini_path).read()
        lines = good_ini.splitlines()
        i = lines.index("[pool]")
        lines.insert(i + 1, "bogus_key = 1")
        lines = [("password_file = %s" % bad_pwf) if ln.startswith("password_file") else ln
                 for ln in lines]
        bad_line = i + 2
        harness.write_file(s.ini_path, "\n".join(lines) + "\n", 0o600)
        sighup(s, expect="rejected")
        log = s.log_text(this_run=True)
        assert re.search(r"event=reload_rejected .*%s:%d\b" % (re.escape(s.ini_path), bad_line),
                         log), "no reload_rejected line naming %s:%d:\n%s" % (
            s.ini_path, bad_line, log[-3000:])
        with s.client() as c:
            r = c.login(s.login_name("opsnew3", OPS_ADMIN), new_pw)
            assert r.status == "OK", "old settings not kept after a rejected reload: %r" % r
            assert c.command("NOOP").status == "OK"
            c.logout()
        with s.client() as c:
            r = c.login(s.login_name("opsnew4", OPS_ADMIN), open(bad_pwf).read().strip())
            assert r.status == "NO", "a rejected file's password was taken: %r" % r
        wait_progress(loopers[:1])
        loopers[0].finish()
        assert s.alive()
    finally:
        for lp in loopers:
            lp.stop_ev.set()
        sampler.stop()
        set_dovecot_password(dv, OPS_ADMIN, old_pw)
    assert not sampler.violations, (
        "imapshim held more upstream sessions than the active budget "
        "(time, sessions, limit): %r" % sampler.violations[:10])
    assert sampler.peak <= 8
    assert reload_count(s, "ok") == 3


# ------------------------------------------------------------------- drain

def test_drain_finishes_command_in_flight(make_shim, make_fake, admins):
    in_flight = threading.Event()

    def slow_fetch(conn, tag, name, cmd):
        if name == "FETCH":
            in_flight.set()
            time.sleep(2.0)
        return None

    fe = make_fake(script={"on_command": slow_fetch})
    drain = 8.0
    s = remember(make_shim(fe.port, config={
        "upstream": {"login_format": "{domain}/{admin}/{mailbox}"},
        "shim": {"drain_timeout": "%ds" % drain}}))
    c = s.logged_in("drainbox")
    assert c.command("SELECT INBOX").status == "OK"
    c.send(b"f1 FETCH 1 (BODY[])\r\n")
    assert in_flight.wait(10), "the FETCH never reached fake_exchange"
    t0 = time.monotonic()
    os.kill(s.proc.pid, signal.SIGTERM)

    # New connections are refused once the drain has started.  A SYN that
    # meets the listener while the kernel is closing it is dropped without a
    # reset; its retransmission, about 1 s later, is refused.  So a connect
    # that times out means "not yet", never "refused".
    def refused():
        try:
            socket.create_connection((harness.HOST, s.port), timeout=3).close()
            return False
        except (ConnectionRefusedError, ConnectionResetError):
            # reset: the connect sat in the backlog of the listener
            # being closed
            return True
        except TimeoutError:
            return False
    harness.wait_until(refused, timeout=8, what="the listener to close after SIGTERM")

    r = c.read_response("f1", timeout=10)
    assert r.status == "OK", "command in flight at SIGTERM did not finish: %r" % r
    lits = harness.fetch_literals(r)
    assert lits and b"drainbox" in lits[0]
    rest = c.expect_closed(timeout=drain + 5)
    assert re.search(rb"^\* BYE ", rest, re.M), "no * BYE before close: %r" % rest
    rc = s.proc.wait(timeout=drain + 10)
    elapsed = time.monotonic() - t0
    s.stop()
    assert rc == 0, "exit status %s after SIGTERM" % rc
    assert elapsed < drain + 5
    # the upstream session was logged out, not just dropped
    conns = [cn for cn in fe.connections if cn.admin or cn.login_admin]
    assert conns and all("LOGOUT" in cn.command_names() for cn in conns), \
        [(cn, cn.command_names()) for cn in conns]
    log = s.log_text(this_run=True)
    assert "event=shutdown" in log and "event=exit status=0" in log


def test_drain_does_not_wait_for_idle_clients(make_shim, make_fake):
    """SIGTERM with only idle clients (nothing in flight): the drain has no
    command to wait for, so imapshim says BYE and exits well before
    drain_timeout.  (NuPoint keeps its sessions open: a drain that waits
    for clients to leave always takes the full drain_timeout.)"""
    fe = make_fake()
    s = remember(make_shim(fe.port, config={
        "upstream": {"login_format": "{domain}/{admin}/{mailbox}"},
        "shim": {"drain_timeout": "10s"}}))
    clients = [s.logged_in("idle%d" % i) for i in range(3)]
    for c in clients:
        assert c.command("SELECT INBOX").status == "OK"
    t0 = time.monotonic()
    os.kill(s.proc.pid, signal.SIGTERM)
    got = [c.expect_closed(timeout=15) for c in clients]
    rc = s.proc.wait(timeout=15)     # no second signal: that path is tested below
    elapsed = time.monotonic() - t0
    s.stop()
    assert rc == 0
    for g in got:
        assert b"* BYE" in g, g
    assert elapsed < 5, ("imapshim drained %.1fs with only idle clients "
                         "(drain_timeout 10s)" % elapsed)


def test_second_sigterm_exits_at_once(make_shim, make_fake):
    """A second SIGTERM during the drain ends it at once, exit status 0,
    everything freed (the sanitizer build checks at stop)."""
    fe = make_fake()
    s = remember(make_shim(fe.port, config={
        "upstream": {"login_format": "{domain}/{admin}/{mailbox}"},
        "shim": {"drain_timeout": "30s"}}))
    clients = [s.logged_in("twice%d" % i) for i in range(3)]
    for c in clients:
        assert c.command("SELECT INBOX").status == "OK"
    os.kill(s.proc.pid, signal.SIGTERM)
    harness.wait_until(lambda: "event=shutdown" in s.log_text(this_run=True),
                       what="event=shutdown")
    t0 = time.monotonic()
    os.kill(s.proc.pid, signal.SIGTERM)
    rc = s.proc.wait(timeout=10)
    assert time.monotonic() - t0 < 3
    s.stop()
    assert rc == 0
    for c in clients:
        c.expect_closed(timeout=5)


# --------------------------------------------------------- privilege drop

@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_user_drops_privileges(make_shim, dovecot, admins):
    import pwd
    nobody = pwd.getpwnam("nobody")
    s = remember(make_shim(dovecot.port_imaps, config={
        "upstream": {"login_format": "{mailbox}*{admin}"},
        "shim": {"user": "nobody"}}))
    harness.wait_until(lambda: "event=privileges" in s.log_text(this_run=True),
                       what="the privileges log line")
    status = open("/proc/%d/status" % s.proc.pid).read()
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M).groups()
    gids = re.search(r"^Gid:\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M).groups()
    groups = re.search(r"^Groups:\s*(.*)$", status, re.M).group(1).split()
    assert uids[:3] == (str(nobody.pw_uid),) * 3, "Uid line: %r" % (uids,)
    assert gids[:3] == (str(nobody.pw_gid),) * 3, "Gid line: %r" % (gids,)
    assert groups in ([], [str(nobody.pw_gid)]), "supplementary groups kept: %r" % groups
    caps = re.search(r"^CapEff:\s+([0-9a-f]+)", status, re.M).group(1)
    assert int(caps, 16) == 0, "effective capabilities left: %s" % caps
    for admin in admins:
        c = s.logged_in("privbox", admin)
        assert c.command("SELECT INBOX").status == "OK"
        c.logout()
    assert "event=privileges user=nobody uid=%d" % nobody.pw_uid in s.log_text(this_run=True)


# ----------------------------------------------------------- log reopen

def test_sigusr1_reopens_log_file(make_shim, dovecot, tmp_path):
    logf = str(tmp_path / "imapshim.log")
    s = remember(make_shim(dovecot.port_imaps, config={
        "upstream": {"login_format": "{mailbox}*{admin}"},
        "shim": {"log_target": logf}}), logf, logf + ".1")
    harness.wait_until(lambda: os.path.exists(logf) and "event=ready" in open(logf).read(),
                       what="event=ready in %s" % logf)
    c = s.logged_in("usr1before")
    c.logout()
    harness.wait_until(lambda: "usr1before" in open(logf).read(), what="first login logged")
    os.rename(logf, logf + ".1")
    os.kill(s.proc.pid, signal.SIGUSR1)
    harness.wait_until(lambda: os.path.exists(logf), timeout=5,
                       what="a new %s after SIGUSR1" % logf)
    c = s.logged_in("usr1after")
    c.logout()
    harness.wait_until(lambda: "usr1after" in open(logf).read(), timeout=5,
                       what="the new login in the new log file")
    new = open(logf).read()
    old = open(logf + ".1").read()
    assert "usr1after" not in old, "lines still going to the renamed file"
    assert "usr1before" not in new
    assert re.search(r"event=client_auth .*mailbox=usr1after", new)
    assert os.stat(logf).st_mode & 0o007 == 0, "log file readable by others"


# ---------------------------------------------------------- command line

def run_bin(binary, *args):
    p = subprocess.run([binary] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def test_check_config_and_command_line(make_shim, dovecot, imapshim_bin):
    s = remember(make_shim(dovecot.port_imaps, start=False,
                           config={"upstream": {"login_format": "{mailbox}*{admin}"}}))
    s.write_ini()
    rc, out, err = run_bin(imapshim_bin, "-t", "-c", s.ini_path)
    assert rc == 0, (out, err)
    assert "configuration is valid" in out

    # an error: exit 1, file:line on stderr
    lines = open(s.ini_path).read().splitlines()
    i = lines.index("[upstream]")
    lines.insert(i + 1, "no_such_key = 1")
    bad = os.path.join(s.dir, "bad.ini")
    harness.write_file(bad, "\n".join(lines) + "\n", 0o600)
    rc, out, err = run_bin(imapshim_bin, "-t", "-c", bad)
    assert rc == 1, (out, err)
    assert "%s:%d:" % (bad, i + 2) in err and "no_such_key" in err, err
    # running (not just checking) refuses it too
    rc, out, err = run_bin(imapshim_bin, "-c", bad)
    assert rc == 1 and "%s:%d:" % (bad, i + 2) in err, (out, err)

    rc, out, err = run_bin(imapshim_bin, "-V")
    assert rc == 0 and re.match(r"^imapshim \d+\.\d+\.\d+", out), (out, err)
    rc, out, err = run_bin(imapshim_bin, "-h")
    assert rc == 0 and "usage:" in out and "-c FILE" in out and "-t" in out, (out, err)
    rc, out, err = run_bin(imapshim_bin)
    assert rc == 1 and "usage:" in err
    rc, out, err = run_bin(imapshim_bin, "-x")
    assert rc == 1 and "usage:" in err

    # group-readable ini: refused with the fix in the message
    os.chmod(s.ini_path, 0o640)
    try:
        for args in (("-t", "-c", s.ini_path), ("-c", s.ini_path)):
            rc, out, err = run_bin(imapshim_bin, *args)
            assert rc == 1, (args, out, err)
            assert "chmod 600 %s" % s.ini_path in err, err
    finally:
        os.chmod(s.ini_path, 0o600)
    # a group-readable password file likewise
    pwf = os.path.join(s.dir, "%s.%s.secret" % (s.name, next(iter(s.admins))))
    os.chmod(pwf, 0o644)
    try:
        rc, out, err = run_bin(imapshim_bin, "-t", "-c", s.ini_path)
        assert rc == 1 and "chmod 600 %s" % pwf in err, (out, err)
    finally:
        os.chmod(pwf, 0o600)
    rc, out, err = run_bin(imapshim_bin, "-t", "-c", s.ini_path)
    assert rc == 0, (out, err)


# ------------------------------------------------------------- contrib/

def test_systemd_unit(imapshim_bin, tmp_path):
    unit = os.path.join(TOP, "contrib", "imapshim.service")
    text = open(unit).read()
    kv = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            kv.setdefault(m.group(1), m.group(2))
    # notify: READY, RELOADING, STOPPING, STATUS, WATCHDOG (test_notify.py)
    assert kv["Type"] == "notify" and kv["NotifyAccess"] == "main"
    assert kv["WatchdogSec"] == "30s"
    assert kv["ExecStart"] == "/usr/sbin/imapshim -c /etc/imapshim/imapshim.ini"
    assert kv["ExecStartPre"] == "/usr/sbin/imapshim -t -c /etc/imapshim/imapshim.ini"
    # a rejected reload must fail "systemctl reload": not kill -HUP
    assert kv["ExecReload"] == "/usr/sbin/imapshim-ctl reload"
    assert kv["RuntimeDirectory"] == "imapshim"
    assert kv["KillSignal"] == "SIGTERM"
    assert int(kv["TimeoutStopSec"]) > 30, "TimeoutStopSec must exceed drain_timeout (30s)"
    assert kv["Restart"] == "on-failure"
    assert kv["NoNewPrivileges"] == "yes" and kv["ProtectSystem"] == "strict"
    assert kv["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert kv["LimitNOFILE"] == "65536"
    sa = shutil.which("systemd-analyze")
    if not sa:
        pytest.skip("systemd-analyze is not installed")
    # verify the unit with the built binary in place of /usr/sbin/imapshim
    # (verify checks that the commands exist); --man=no: the man pages are
    # not installed here
    copy = tmp_path / "imapshim.service"
    copy.write_text(text.replace("/usr/sbin/imapshim", imapshim_bin))
    p = subprocess.run([sa, "verify", "--man=no", str(copy)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, out
    assert "imapshim.service" not in out, out


def test_logrotate_and_keepalived_examples(tmp_path):
    rot = open(os.path.join(TOP, "contrib", "imapshim.logrotate")).read()
    assert "postrotate" in rot and "USR1" in rot
    ka = open(os.path.join(TOP, "contrib", "keepalived.conf.example")).read()
    assert "vrrp_script" in ka and "http://127.0.0.1:9143/status" in ka
    assert ka.count("{") == ka.count("}")
    lr = shutil.which("logrotate", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if lr:
        conf = tmp_path / "lr.conf"
        conf.write_text(rot.replace("/var/log/imapshim", str(tmp_path)))
        (tmp_path / "imapshim.log").write_text("x\n")
        p = subprocess.run([lr, "-d", "-s", str(tmp_path / "state"), str(conf)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        out = p.stdout.decode(errors="replace")
        assert "error:" not in out.lower() or "unknown user" in out, out


# ------------------------------------------------------------- secrets

def test_no_password_in_any_log():
    """Runs last: every log file of this module, at debug level, holds no
    password and no recognisable part of one."""
    if not LOGS:
        pytest.skip("no other test of this module ran")
    needles = set()
    for pw in SECRETS:
        needles.add(pw)
        needles.add(harness.imap_quote(pw).decode())
        needles.update(t for t in re.findall(r"[0-9a-f]{12,}", pw))
    found = []
    for path in set(LOGS):
        try:
            text = open(path, errors="replace").read()
        except OSError:
            continue
        for n in needles:
            if n and n in text:
                i = text.index(n)
                found.append("%s: %r" % (path, text[max(0, i - 200):i + 50]))
    assert not found, "passwords in logs:\n" + "\n".join(found[:5])
