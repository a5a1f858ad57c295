"""
End-to-end tests of the operator's console (DESIGN.md 3.6): imapshim's
control_socket and imapshim-ctl, against fake_exchange (which records every
LOGIN and LOGOUT, per server).  Every command is run through the built
imapshim-ctl and its outcome checked in what clients and Exchange see:

  socket     mode 0600, a Unix socket; another uid is refused (SO_PEERCRED,
             logged with its uid); over-long lines and too many connections
             are refused; imapshim-ctl's exit statuses 0/1/2.
  show       pools, servers, clients (id, peer, mailbox, admin, state,
             since, upstream), stats (/metrics), status (/status JSON).
  kick       client ID and mailbox NAME: "* BYE", closed, the others
             untouched; a command in flight gets its tagged reply first.
  drain      server A: A's idle session logged out, new logins go to B, a
             session in use on A works on and is logged out at release;
             enable: A takes logins again.
  pause      a new client's LOGIN, and a parked client's SELECT, wait (no
             new upstream login) while a logged-in client works on;
             resume lets them complete.
  reload     a good file: exit 0; a broken one: the error, exit 1.
"""

import json
import os
import pwd
import socket
import stat
import sys

import pytest

import harness

ADMIN1 = "NPUMAdmin1"


def console_config(servers=None, pool=None):
    cfg = {
        "upstream": {"login_format": "{domain}/{admin}/{mailbox}"},
        "pool": {"mode": "session", "session_budget": "8", "queue_timeout": "30s",
                 "reuse_timeout": "60s", "login_rate": "1000", "login_burst": "1000"},
    }
    if servers:
        cfg["upstream"]["servers"] = ", ".join("%s:%d" % (harness.HOST, p) for p in servers)
    cfg["pool"].update(pool or {})
    return cfg


@pytest.fixture
def env(make_fake, make_shim):
    """One fake Exchange and an imapshim in session mode in front of it."""
    fe = make_fake()
    s = make_shim(fe.port, config=console_config())
    return fe, s


def ctl_ok(shim, *args):
    rc, out, err = harness.ctl(shim, *args)
    assert rc == 0, "imapshim-ctl %s: exit %d\nstdout: %s\nstderr: %s\nlog:\n%s" % (
        " ".join(args), rc, out, err, shim.log_text(True)[-3000:])
    return out


def kv_lines(text):
    """The key=value data lines as dicts (quoted values unquoted)."""
    return [{k: harness._log_unquote(v) for k, v in harness._LOG_KV_RE.findall(line)}
            for line in text.splitlines() if "=" in line]


def client_rows(shim):
    return [r for r in kv_lines(ctl_ok(shim, "show clients")) if "id" in r]


def answer_to_long_command(sock):
    """Send a 1 MiB command line (more than the socket's buffers hold, so
    the daemon answers while it is still being sent), then read to EOF.
    A daemon that closed with the command unread would break this send
    (EPIPE) or reset the connection."""
    sock.sendall(b"show " + b"x" * (1 << 20))
    got = b""
    while True:
        d = sock.recv(65536)
        if not d:
            return got
        got += d


# ------------------------------------------------------------------ socket

def test_socket_mode_and_exit_codes(env):
    fe, s = env
    st = os.lstat(s.control_path)
    assert stat.S_ISSOCK(st.st_mode), "control_socket is not a socket"
    assert stat.S_IMODE(st.st_mode) == 0o600, "socket mode %o" % stat.S_IMODE(st.st_mode)
    assert st.st_uid == os.geteuid()

    # 0: OK; 1: the daemon answered ERROR; 2: no daemon, usage, refused.
    rc, out, err = harness.ctl(s, "help")
    assert rc == 0 and "kick mailbox NAME" in out, (rc, out, err)
    rc, out, err = harness.ctl(s, "frobnicate")
    assert rc == 1 and "unknown command" in err, (rc, out, err)
    rc, out, err = harness.ctl(s, "kick client 999999")
    assert rc == 1 and "no client 999999" in err, (rc, out, err)
    rc, out, err = harness.ctl(s, "show stats", socket=os.path.join(s.dir, "nonexistent"))
    assert rc == 2 and "cannot connect" in err, (rc, out, err)
    p = harness.subprocess.run([harness.find_ctl(s.binary)], capture_output=True)
    assert p.returncode == 2 and b"usage" in p.stderr
    # -c INI reads control_socket from the file.
    p = harness.subprocess.run([harness.find_ctl(s.binary), "-c", s.ini_path, "show", "pools"],
                               capture_output=True)
    assert p.returncode == 0 and b"budget=" in p.stdout, p
    s.wait_log_event("console_command", cmd="help", result="ok")
    s.wait_log_event("console_command", cmd="frobnicate", result="error")


def test_other_uid_refused(env):
    fe, s = env
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    nobody = pwd.getpwnam("nobody")
    # Open the socket's mode so only the SO_PEERCRED check stands between
    # that uid and the console.
    os.chmod(s.control_path, 0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                # the child: become nobody, ask, report
        status = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(10)
            c.connect(s.control_path)
            os.write(w, answer_to_long_command(c))
            status = 0
        except BaseException as e:  # noqa: B036 (the child must reach _exit)
            os.write(w, repr(e).encode())
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read()
    _, st = os.waitpid(pid, 0)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, "the child failed: %r" % got
    assert got == b"REFUSED permission denied: uid %d may not use the console\n" % \
        nobody.pw_uid, got
    s.wait_log_event("console_refused", uid=str(nobody.pw_uid))
    assert not s.log_events("console_command"), "a refused peer's command ran"
    # Root still is served.
    assert "budget=" in ctl_ok(s, "show pools")


def test_line_and_connection_limits(env):
    fe, s = env

    class Conn:
        def __init__(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(s.control_path)
            self.rfile = self.sock.makefile("rb")

        def sendall(self, data):
            self.sock.sendall(data)

        def close(self):
            self.rfile.close()
            self.sock.close()

    connect = Conn

    def read_line(c):
        return c.rfile.readline()

    c = connect()
    c.sendall(b"x" * 2000)
    assert read_line(c).startswith(b"REFUSED line too long"), "no refusal of a long line"
    assert c.rfile.read() == b"", "connection not closed after the refusal"
    c.close()

    # Several commands on one connection: one answer each, in order.
    c = connect()
    c.sendall(b"pause\r\nresume\n")
    assert read_line(c).startswith(b"OK paused")
    assert read_line(c) == b"OK resumed\n"
    held = [c] + [connect() for _ in range(7)]
    for h in held[1:]:          # served (the 8 allowed)
        h.sendall(b"show servers\n")
        assert b"server=" in read_line(h)
    extra = connect()
    assert read_line(extra).startswith(b"REFUSED busy"), "a 9th connection was served"
    extra.close()
    # imapshim-ctl, refused: exit 2.
    rc, out, err = harness.ctl(s, "show pools")
    assert rc == 2 and "refused: busy" in err and out == "", (rc, out, err)
    for h in held:
        h.close()
    # Slots come back once those are closed.
    harness.wait_until(lambda: harness.ctl(s, "show pools")[0] == 0, timeout=10,
                       what="console usable again")


def test_refused_peer_reads_the_refusal(env):
    """A peer refused while its long command is still coming in takes no
    reset: the daemon writes the REFUSED line, shuts its side and drops
    the rest, so the peer's send completes and it reads the line, then
    EOF.  Every connection's end is one log line with the reason."""
    fe, s = env

    def connect():
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(10)
        c.connect(s.control_path)
        return c

    c = connect()
    assert answer_to_long_command(c) == b"REFUSED line too long (more than 1024 bytes)\n"
    c.close()
    # Until its end is logged it holds one of the 8 slots.
    s.wait_log_event("console_refused", reason="line-too-long")
    held = [connect() for _ in range(8)]        # the 8 allowed, served
    for h in held:
        h.sendall(b"resume\n")
        got = b""
        while not got.endswith(b"\n"):
            got += h.recv(4096)
        assert got == b"OK resumed\n"
    extra = connect()
    assert answer_to_long_command(extra) == b"REFUSED busy: too many console connections\n"
    extra.close()
    for h in held:
        h.close()
    s.wait_log_event("console_close", count=8, reason="eof")
    refused = [e["reason"] for e in s.log_events("console_refused")]
    assert sorted(refused) == ["line-too-long", "too-many-connections"], refused
    assert len(s.log_events("console_close")) == 8


# -------------------------------------------------------------------- show

def test_show_commands(make_fake, make_shim):
    fa, fb = make_fake(), make_fake()
    s = make_shim(fa.port, config=console_config(servers=[fa.port, fb.port]))
    c1 = s.logged_in("alice")
    c2 = s.logged_in("bob")
    try:
        rows = client_rows(s)
        assert len(rows) == 2, rows
        a = next(r for r in rows if r["mailbox"] == "alice")
        assert a["admin"] in s.admins and a["state"] == "attached"
        assert a["peer"].startswith("127.0.0.1:")
        assert a["upstream"] == "%s:%d" % (harness.HOST, fa.port)
        assert a["since"].endswith("Z") and int(a["age_seconds"]) >= 0
        assert int(a["id"]) != int(next(r for r in rows if r["mailbox"] == "bob")["id"])
        # An unauthenticated client: no mailbox, no upstream.
        c3 = s.client()
        rows = client_rows(s)
        anon = [r for r in rows if r["mailbox"] == "-"]
        assert len(anon) == 1 and anon[0]["upstream"] == "-", rows
        c3.close()

        pools = kv_lines(ctl_ok(s, "show pools"))
        head = pools[0]
        assert head["budget"] == "8" and head["used"] == "2" and head["paused"] == "no"
        admins = {r["admin"]: r for r in pools if "admin" in r}
        assert set(admins) == set(s.admins)
        assert sum(int(r["leased"]) for r in admins.values()) == 2
        assert admins[ADMIN1]["max_sessions"] == "16"
        assert admins[ADMIN1]["configured"] == "yes"

        servers = kv_lines(ctl_ok(s, "show servers"))
        assert [r["server"] for r in servers] == ["%s:%d" % (harness.HOST, p)
                                                  for p in (fa.port, fb.port)]
        assert servers[0]["sessions"] == "2" and servers[0]["up"] == "yes"
        assert servers[1]["sessions"] == "0" and servers[0]["draining"] == "no"

        stats = ctl_ok(s, "show stats")
        assert 'imapshim_clients{state="attached"} 2' in stats, stats[:2000]
        assert "imapshim_paused 0" in stats

        st = json.loads(ctl_ok(s, "show status"))
        assert st["clients"]["attached"] == 2 and st["paused"] is False
        assert [x["draining"] for x in st["servers"]] == [False, False]
        s.wait_log_event("console_command", cmd="show status", result="ok")
    finally:
        c1.close()
        c2.close()


# -------------------------------------------------------------------- kick

def test_kick_mailbox_and_client(env):
    fe, s = env
    a1, a2, b = s.logged_in("alice"), s.logged_in("alice"), s.logged_in("bob")
    try:
        rc, out, err = harness.ctl(s, "kick mailbox ALICE")    # any case
        assert rc == 0 and "2 clients of mailbox ALICE kicked" in out, (rc, out, err)
        for c in (a1, a2):
            line = c.read_line(timeout=10)
            assert line.startswith(b"* BYE Session ended by the operator."), line
            c.expect_closed()
        # bob is untouched.
        assert b.command("NOOP").status == "OK"
        assert [r["mailbox"] for r in client_rows(s)] == ["bob"]
        s.wait_log_event("client_close", mailbox="alice", reason="kicked", count=2)

        bob_id = client_rows(s)[0]["id"]
        assert "client %s kicked" % bob_id in ctl_ok(s, "kick client %s" % bob_id)
        assert b.read_line(timeout=10).startswith(b"* BYE Session ended by the operator.")
        b.expect_closed()
        assert client_rows(s) == []
        rc, out, err = harness.ctl(s, "kick mailbox alice")
        assert rc == 1 and "no client of mailbox alice" in err
    finally:
        for c in (a1, a2, b):
            c.close()


def test_kick_waits_for_command_in_flight(env):
    fe, s = env
    # carol's NOOP takes 1.5 s at "Exchange".
    fe.script["on_command"] = lambda conn, tag, name, cmd: (
        1.5 if name == "NOOP" and (conn.mailbox or "") == "carol" else None)
    c = s.logged_in("carol")
    try:
        c.send(b"n1 NOOP\r\n")
        fe.wait_for(lambda f: f.commands("NOOP", mailbox="carol"), timeout=10)
        rc, out, err = harness.ctl(s, "kick mailbox carol")
        assert rc == 0, (rc, out, err)
        r = c.read_response("n1", timeout=10)
        assert r.status == "OK", "the command in flight lost its reply: %r" % r
        assert c.read_line(timeout=10).startswith(b"* BYE Session ended by the operator.")
        c.expect_closed()
    finally:
        c.close()


# ------------------------------------------------------------------- drain

def test_drain_and_enable_server(make_fake, make_shim):
    fa, fb = make_fake(), make_fake()
    s = make_shim(fa.port, config=console_config(servers=[fa.port, fb.port]))
    a_srv, b_srv = "%s:%d" % (harness.HOST, fa.port), "%s:%d" % (harness.HOST, fb.port)
    # "idle1" leaves a pooled session on A; "busy1" keeps its session on A.
    c = s.logged_in("idle1")
    c.logout()
    busy = s.logged_in("busy1")
    try:
        assert fa.logins(ok=True, mailbox="idle1") and fa.logins(ok=True, mailbox="busy1")
        s.wait_log_event("pool_grant", mailbox="busy1")
        out = ctl_ok(s, "drain server %s" % a_srv)
        assert "%s draining" % a_srv in out
        # A's idle session is logged out at once.
        assert fa.wait_for(lambda f: f.commands("LOGOUT", mailbox="idle1"), timeout=10), \
            "the idle session on the drained server was not logged out"
        srv = {r["server"]: r for r in kv_lines(ctl_ok(s, "show servers"))}
        assert srv[a_srv]["draining"] == "yes" and srv[b_srv]["draining"] == "no"
        assert json.loads(ctl_ok(s, "show status"))["servers"][0]["draining"] is True
        assert 'imapshim_server_draining{server="%s"} 1' % a_srv in ctl_ok(s, "show stats")

        # New logins go to B, even for the mailbox A served before.
        for mb in ("new1", "idle1"):
            n = s.logged_in(mb)
            n.logout()
            assert fb.logins(ok=True, mailbox=mb), "%s did not log in on B" % mb
        assert not fa.logins(mailbox="new1")
        # The session in use on A works on, and is logged out at release.
        assert busy.command("SELECT INBOX").status == "OK"
        assert not fa.commands("LOGOUT", mailbox="busy1")
        busy.logout()
        assert fa.wait_for(lambda f: f.commands("LOGOUT", mailbox="busy1"), timeout=10), \
            "the released session on the drained server was pooled, not logged out"

        assert "%s enabled" % a_srv in ctl_ok(s, "enable server %s" % a_srv)
        n = s.logged_in("new2")
        n.logout()
        assert fa.logins(ok=True, mailbox="new2"), "A takes no logins after enable"
        rc, out, err = harness.ctl(s, "drain server 127.0.0.1:1")
        assert rc == 1 and "not one of [upstream] servers" in err, (rc, out, err)
        s.wait_log_event("pool_server_drain", server=a_srv)
    finally:
        busy.close()


# ------------------------------------------------------------------- pause

def test_pause_and_resume(env):
    fe, s = env
    early = s.logged_in("early")
    late = s.client()
    try:
        out = ctl_ok(s, "pause")
        assert out.startswith("paused")
        assert kv_lines(ctl_ok(s, "show pools"))[0]["paused"] == "yes"
        # A logged-in client works on.
        assert early.command("SELECT INBOX").status == "OK"
        # A new client's LOGIN waits in the queue: no upstream login.
        late.send(b"L1 LOGIN " + harness.imap_quote(s.login_name("late")) + b" " +
                  harness.imap_quote(s.admins[ADMIN1]) + b"\r\n")
        harness.wait_until(lambda: kv_lines(ctl_ok(s, "show pools"))[0]["queue"] == "1",
                           timeout=10, what="the LOGIN queued")
        with pytest.raises(socket.timeout):
            late.read_response("L1", timeout=1.0)
        assert not fe.logins(mailbox="late"), "a login went upstream while paused"
        assert "imapshim_paused 1" in ctl_ok(s, "show stats")

        assert ctl_ok(s, "resume").strip() == "resumed"
        r = late.read_response("L1", timeout=10)
        assert r.status == "OK", r
        assert fe.logins(ok=True, mailbox="late")
        assert late.command("SELECT INBOX").status == "OK"
        s.wait_log_event("pool_paused")
        s.wait_log_event("pool_resumed")
    finally:
        early.close()
        late.close()


def test_pause_holds_a_parked_clients_select(make_fake, make_shim):
    """Multiplex mode: a parked client whose session was retired needs a new
    login for its SELECT; paused, the SELECT waits; resumed, it completes."""
    fe = make_fake()
    s = make_shim(fe.port, config=console_config(pool={
        "mode": "multiplex", "park_after": "1s", "reuse_timeout": "0"}))
    c = s.logged_in("parked1")
    try:
        s.wait_log_event("client_parked", mailbox="parked1")
        assert fe.wait_for(lambda f: f.commands("LOGOUT", mailbox="parked1"), timeout=10), \
            "the parked client's session was not retired"
        ctl_ok(s, "pause")
        c.send(b"s1 SELECT INBOX\r\n")
        with pytest.raises(socket.timeout):
            c.read_response("s1", timeout=1.0)
        assert len(fe.logins(mailbox="parked1")) == 1, "a login went upstream while paused"
        ctl_ok(s, "resume")
        assert c.read_response("s1", timeout=10).status == "OK"
        assert len(fe.logins(ok=True, mailbox="parked1")) == 2
    finally:
        c.close()


# ------------------------------------------------------------------ reload

def test_reload(env):
    fe, s = env
    rc, out, err = harness.ctl(s, "reload")
    assert rc == 0 and out.strip() == "reloaded", (rc, out, err)
    s.wait_log_event("reload", result="ok")

    good = open(s.ini_path).read()
    with open(s.ini_path, "a") as f:
        f.write("\n[pool]\nsession_budget = lots\n")
    try:
        rc, out, err = harness.ctl(s, "reload")
        assert rc == 1, (rc, out, err)
        # The answer names the file, the line's setting and the outcome.
        assert s.ini_path in err and "session_budget" in err and \
            "old settings kept" in err, err
        s.wait_log_event("console_command", cmd="reload", result="error")
    finally:
        harness.write_file(s.ini_path, good, 0o600)
    # The old settings stayed: clients still log in.
    c = s.logged_in("after")
    c.close()

    # A changed control_socket needs a restart: said, and the old one stays.
    s.config["shim"]["control_socket"] = os.path.join(s.dir, "other.control")
    s.write_ini()
    rc, out, err = harness.ctl(s, "reload")
    assert rc == 0, (rc, out, err)
    s.wait_log_event("console_restart_needed")
    assert os.path.exists(s.control_path)


# ------------------------------------------------------------ imapshim-top

def test_imapshim_top_socket(env):
    """contrib/imapshim-top --socket reads the status through the console
    (no status_listen needed): admin names, the server, PAUSED."""
    fe, s = env
    top = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                       "contrib", "imapshim-top")
    ctl_ok(s, "pause")
    r = harness.subprocess.run([sys.executable, top, "--once", "--socket", s.control_path],
                               capture_output=True, timeout=20)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, (r.returncode, out, r.stderr)
    assert ADMIN1 in out and s.config["upstream"]["servers"] in out, out
    assert "PAUSED" in out, out
    r = harness.subprocess.run([sys.executable, top, "--once", "--socket",
                                os.path.join(s.dir, "nonexistent")],
                               capture_output=True, timeout=20)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
