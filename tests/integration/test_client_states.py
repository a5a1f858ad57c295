"""
Regression tests for nine ways a client command never got its tagged answer
(issue 12; DESIGN.md 3.6 "Liveness": every tagged client command gets
exactly one tagged answer, in the order sent, within command_timeout +
queue_timeout, whatever the upstream does; a client is never left with
reading disabled and nothing pending that would re-enable it).

Each test drives imapshim in front of fake_exchange (which can refuse,
stall, drop or delay exactly the upstream command a defect needs) and
asserts only what the client sees: the tagged answers, their status and
order, and whether another mailbox's LOGIN gets through.  Every read has a
deadline of a few seconds, so a defect shows up as a bounded failure.

How a test knows where imapshim stands without depending on the names of
its internal states (client.c is being rewritten): the commands the fake
received (a second IDLE: re-attached), the pool's "event=pool_fail" and
"event=client_parked mailbox=M" log lines; every such wait is bounded.

Durations are short where a test waits for them (idle_poll_interval 2s,
queue_timeout 1s..3s, command_timeout 1s); idle_refresh cannot go below 1m
(config.c), so the refresh test alone takes just over a minute.
"""

import re
import socket
import ssl
import threading
import time
import warnings

import pytest

import fake_exchange
import harness

IDLE_REFRESH_S = 60     # config.c: idle_refresh must be at least 1m


# ------------------------------------------------------------------ helpers

def mx_config(**pool):
    """Multiplex mode in front of fake_exchange: one upstream session unless
    a test says otherwise, parking only under pressure (park_after 30s),
    short queue_timeout, no login pacing in the way."""
    cfg = {
        "upstream": {"connect_timeout": "2s", "login_timeout": "4s",
                     "command_timeout": "60s"},
        "pool": {"mode": "multiplex", "session_budget": "1", "park_after": "30s",
                 "queue_timeout": "3s", "reuse_timeout": "60s",
                 "idle_poll_interval": "2s", "login_rate": "1000",
                 "login_burst": "1000"},
        "retry": {"backoff_initial": "50ms", "backoff_max": "200ms"},
    }
    for k, v in pool.items():
        sect = "upstream" if k == "command_timeout" else "pool"
        cfg[sect][k] = v
    return cfg


def wait_parked(shim, mailbox, timeout=10):
    """Wait until the client of mailbox has given its session back."""
    return shim.wait_log_event("client_parked", timeout=timeout, mailbox=mailbox)


def wait_upstream(fe, name, mailbox, count, timeout=10):
    """Wait until the fake has seen `count` commands `name` on sessions of
    mailbox (how a test sees where imapshim stands without relying on its
    internal state names)."""
    assert fe.wait_for(lambda f: len(f.commands(name, mailbox=mailbox)) >= count,
                       timeout=timeout), (
        "the fake saw %d %s of %s, not %d" % (len(fe.commands(name, mailbox=mailbox)),
                                              name, mailbox, count))


def select_and_idle(c, tag="i"):
    """SELECT INBOX (fake_exchange puts 3 messages in every mailbox, so
    parking takes a snapshot), then IDLE up to its "+"."""
    r = c.command("SELECT INBOX", tag="s", timeout=10)
    assert r.status == "OK", r
    c.send(tag.encode() + b" IDLE\r\n")
    untagged, plus = c.read_continuation(timeout=10)
    assert plus.startswith(b"+"), plus


def send_login(shim, mailbox, tag="L"):
    """A client whose LOGIN is sent but not read (it may have to wait)."""
    c = shim.client(timeout=10)
    admin = next(iter(shim.admins))
    c.send(tag.encode() + b" LOGIN " + harness.imap_quote(shim.login_name(mailbox, admin))
           + b" " + harness.imap_quote(shim.admins[admin]) + b"\r\n")
    return c


def answer(c, tag, timeout):
    """c's tagged answer to tag within timeout, or None (timeout or EOF);
    what came before it is in c.transcript."""
    try:
        return c.read_response(tag, timeout=timeout)
    except (socket.timeout, harness.ConnectionClosed):
        return None


def got(c):
    return b"".join(c.transcript)[-600:]


def closing(*clients):
    """Close every client at the end of a test, whatever happened."""
    for c in clients:
        if c is not None:
            c.close()


# ------------------------------------------------------------------ tests

def test_done_read_after_idle_poll_reattach(make_shim, make_fake):
    """Defect 1: DONE after an IDLE poll re-attached the client was never
    read (the poll's resync ended without turning reading back on).
    session_budget 1, idle_poll_interval 2s: A SELECTs and IDLEs; B logs in,
    so A is parked; B logs out, so A's next poll gets the session back and
    A is attached again (the fake sees A's IDLE a second time).  A's DONE
    must then get "i OK" at once."""
    fe = make_fake()
    shim = make_shim(fe.port, config=mx_config(idle_poll_interval="2s"))
    ca = cb = None
    try:
        ca = shim.logged_in("poll-a")
        select_and_idle(ca)
        cb = shim.logged_in("poll-b")
        wait_parked(shim, "poll-a")
        cb.logout()
        # the poll attaches A again (the budget has room now), and A
        # really IDLEs again upstream
        wait_upstream(fe, "IDLE", "poll-a", 2, timeout=8)
        ca.send(b"DONE\r\n")
        r = answer(ca, "i", timeout=5)
        assert r is not None, ("A's DONE after the poll re-attached it got no tagged "
                               "answer within 5s; A got %r" % got(ca))
        assert r.status == "OK", r
        assert ca.command("NOOP", tag="n", timeout=5).status == "OK"
    finally:
        closing(ca, cb)


def test_done_read_while_idle_poll_waits(make_shim, make_fake):
    """Defect 2: a failed IDLE poll (cl_attach_failed on a poll) went back
    to parked with reading off, so a DONE that could be answered at once
    was never read.  Polls now wait without a queue_timeout behind
    commands (src/DESIGN.md), the client parked with reading on.
    session_budget 1: A IDLEs and is parked for B; B holds the one session
    with a FETCH the fake stalls, so A's poll waits in the poll queue.  A's
    DONE must withdraw the poll and get "i OK" at once (within 3s)."""
    fe = make_fake()
    fe.script["on_command"] = fake_exchange.stall_on("FETCH", mailbox="fpoll-b")
    status_port = harness.free_port()
    cfg = mx_config(queue_timeout="1s", idle_poll_interval="2s")
    cfg["shim"] = {"status_listen": "127.0.0.1:%d" % status_port}
    shim = make_shim(fe.port, config=cfg)
    ca = cb = None
    try:
        ca = shim.logged_in("fpoll-a")
        select_and_idle(ca)
        cb = shim.logged_in("fpoll-b")
        wait_parked(shim, "fpoll-a")
        assert cb.command("SELECT INBOX", timeout=5).status == "OK"
        cb.send(b"f FETCH 1 (FLAGS)\r\n")           # stalled: B keeps the session
        assert fe.wait_for(lambda f: f.script["on_command"].state["n"] >= 1, timeout=5), (
            "B's FETCH never reached the fake")
        # A's poll is due within idle_poll_interval and waits for the session
        harness.wait_until(
            lambda: harness.metric(status_port, "imapshim_poll_queue_length") == 1,
            timeout=10, what="A's IDLE poll waiting in the poll queue")
        t0 = time.monotonic()
        ca.send(b"DONE\r\n")
        r = answer(ca, "i", timeout=3)
        assert r is not None, ("A's DONE while its IDLE poll waited got no tagged "
                               "answer within 3s; A got %r" % got(ca))
        assert r.status == "OK", r
        harness.wait_until(
            lambda: harness.metric(status_port, "imapshim_poll_queue_length") == 0,
            timeout=5, what="the DONE withdrew A's poll")
        print("DONE answered %.2fs while a poll waited" % (time.monotonic() - t0))
    finally:
        closing(ca, cb)


def test_upstream_lost_while_parking_idle_client(make_shim, make_fake):
    """Defect 3: the upstream died while an IDLE client was being parked
    (imapshim had sent DONE upstream, no tagged OK came): the client stayed
    "parking" for ever, its DONE was never answered, and since a park
    seemed to be under way, pressure parked nobody else, so other
    mailboxes' LOGINs waited out queue_timeout.  session_budget 1: A IDLEs;
    B's LOGIN makes imapshim park A, and the fake drops A's connection on
    that DONE; B gets the freed budget and IDLEs (parkable).  Then C's LOGIN
    must succeed within queue_timeout (3s) and A's DONE must be answered."""
    fe = make_fake()
    dropped = []

    def on_idle_done(conn, tag):
        if (conn.mailbox or "").lower() == "lost-a" and not dropped:
            dropped.append(conn.id)
            return "drop"
        return None
    fe.script["on_idle_done"] = on_idle_done
    shim = make_shim(fe.port, config=mx_config(queue_timeout="3s"))
    ca = cb = cc = None
    problems = []
    try:
        ca = shim.logged_in("lost-a")
        select_and_idle(ca)
        cb = shim.logged_in("lost-b")
        assert dropped, "imapshim never sent DONE to park A"
        select_and_idle(cb, tag="j")
        t0 = time.monotonic()
        cc = send_login(shim, "lost-c")
        r = answer(cc, "L", timeout=3 + 2)
        if r is None or r.status != "OK":
            problems.append("C's LOGIN got %r after %.1fs although B was idle (parkable)"
                            % (r, time.monotonic() - t0))
        ca.send(b"DONE\r\n")
        r = answer(ca, "i", timeout=3 + 3)
        if r is None or r.status != "OK":
            problems.append("A's DONE got %r; A got %r" % (r, got(ca)))
        assert not problems, "\n".join(problems)
    finally:
        closing(ca, cb, cc)


def test_idle_refused_by_server(make_shim, make_fake):
    """Defect 4: an IDLE the server refused (tagged NO) left imapshim
    believing the client idled: its next command went upstream as if it
    were DONE, and parking it sent DONE to a server not idling and waited
    for ever for the IDLE's OK.  session_budget 1: A's IDLE gets "i NO"
    from the fake; then B's LOGIN (pressure: A must park) must succeed
    within queue_timeout, and A's "c NOOP" must get "c OK"."""
    fe = make_fake()

    def refuse_idle(conn, tag, name, cmd):
        if name == "IDLE" and (conn.mailbox or "").lower() == "noidle-a":
            return tag + b" NO IDLE is not available now.\r\n"
        return None
    fe.script["on_command"] = refuse_idle
    shim = make_shim(fe.port, config=mx_config(queue_timeout="3s"))
    ca = cb = None
    try:
        ca = shim.logged_in("noidle-a")
        assert ca.command("SELECT INBOX", tag="s", timeout=5).status == "OK"
        r = ca.command("IDLE", tag="i", timeout=5)
        assert r.status == "NO", r
        t0 = time.monotonic()
        cb = send_login(shim, "noidle-b")
        r = answer(cb, "L", timeout=3 + 2)
        assert r is not None and r.status == "OK", (
            "B's LOGIN got %r after %.1fs: A (IDLE refused, nothing in flight) could not "
            "be parked" % (r, time.monotonic() - t0))
        ca.send(b"c NOOP\r\n")
        r = answer(ca, "c", timeout=3 + 3)
        assert r is not None, "A's NOOP after the refused IDLE got no answer; A got %r" % got(ca)
        assert r.status == "OK", r
        assert not [x for x in r.untagged if x.startswith(b"* BAD")], (
            "imapshim sent the server something it could not parse: %r" % r)
    finally:
        closing(ca, cb)


def test_snapshot_failure_while_parking_idle_client(make_shim, make_fake):
    """Defect 5: parking an IDLE client ends the real IDLE (DONE) and takes
    a snapshot (FETCH 1:* (UID FLAGS)); when that FETCH got a tagged NO the
    client stayed attached but the server's IDLE was not issued again, so
    the client's DONE went to a server not idling and no tagged answer came.
    session_budget 1: A IDLEs; B's LOGIN makes imapshim park A; the fake
    answers the snapshot FETCH with NO once.  A's DONE must get "i OK"."""
    fe = make_fake()
    refused = []

    def refuse_snapshot(conn, tag, name, cmd):
        if (name == "FETCH" and b"1:* (UID FLAGS)" in cmd and not refused
                and (conn.mailbox or "").lower() == "snap-a"):
            refused.append(tag)
            return tag + b" NO Command received in Invalid state.\r\n"
        return None
    fe.script["on_command"] = refuse_snapshot
    shim = make_shim(fe.port, config=mx_config(queue_timeout="3s"))
    ca = cb = None
    try:
        ca = shim.logged_in("snap-a")
        select_and_idle(ca)
        cb = send_login(shim, "snap-b")
        assert fe.wait_for(lambda f: refused, timeout=5), "imapshim never took a snapshot of A"
        ca.send(b"DONE\r\n")
        r = answer(ca, "i", timeout=3 + 3)
        assert r is not None, ("A's DONE after a failed snapshot got no tagged answer; "
                               "A got %r" % got(ca))
        assert r.status == "OK", r
        r = ca.command("NOOP", tag="n", timeout=3 + 3)
        assert r.status == "OK", r
    finally:
        closing(ca, cb)


def test_idle_refresh_races_done_and_loss(make_shim, make_fake):
    """Defect 6: idle_refresh makes imapshim send DONE and then IDLE again
    upstream.  (a) A client DONE arriving while that refresh waits for its
    tagged OK went upstream as a second DONE, and the OK was taken for the
    refresh's: the client's IDLE was never answered.  (b) An upstream lost
    during a refresh left the refresh flag set: the client could never be
    parked again, and its own DONE was swallowed as a refresh.
    session_budget 2, idle_refresh 1m (the least allowed): A and B IDLE.
    At the refresh the fake delays the OK to A's DONE by 2s (A sends DONE
    meanwhile: exactly one "i OK" expected, and NOOP works after it) and
    drops B's connection (B is re-attached and IDLEs again).  Then, with A
    busy on a FETCH the fake stalls, D's LOGIN must park B, and B's DONE
    must get "j OK"."""
    fe = make_fake()
    refresh = {"lock": threading.Lock(), "a": threading.Event(), "b": threading.Event()}

    def on_idle_done(conn, tag):
        box = (conn.mailbox or "").lower()
        with refresh["lock"]:
            if box == "refresh-a" and not refresh["a"].is_set():
                refresh["a"].set()
                return 2.0          # the client's DONE arrives meanwhile
            if box == "refresh-b" and not refresh["b"].is_set():
                refresh["b"].set()
                return "drop"
        return None
    fe.script["on_idle_done"] = on_idle_done
    fe.script["on_command"] = fake_exchange.stall_on("FETCH", mailbox="refresh-a")
    shim = make_shim(fe.port, config=mx_config(session_budget="2", idle_refresh="1m",
                                               queue_timeout="3s"))
    ca = cb = cd = None
    problems = []
    try:
        ca = shim.logged_in("refresh-a")
        cb = shim.logged_in("refresh-b")
        select_and_idle(ca, tag="i")
        select_and_idle(cb, tag="j")
        assert refresh["a"].wait(IDLE_REFRESH_S + 10), "imapshim never refreshed A's IDLE"
        ca.send(b"DONE\r\n")
        r = answer(ca, "i", timeout=2 + 3)
        if r is None or r.status != "OK":
            problems.append("(a) A's DONE during the refresh got %r; A got %r" % (r, got(ca)))
        else:
            ca.send(b"n NOOP\r\n")
            r = answer(ca, "n", timeout=3)
            if r is None or r.status != "OK" or [x for x in r.untagged
                                                 if x.startswith(b"i ")]:
                problems.append("(a) A's NOOP after the IDLE got %r" % r)
        # stalled: A keeps its session, so only B can make room for D
        ca.send(b"f FETCH 1 (FLAGS)\r\n")
        assert refresh["b"].wait(10), "imapshim never refreshed B's IDLE"
        wait_upstream(fe, "IDLE", "refresh-b", 2, timeout=5)     # B recovered
        t0 = time.monotonic()
        cd = send_login(shim, "refresh-d")
        r = answer(cd, "L", timeout=3 + 2)
        if r is None or r.status != "OK":
            problems.append("(b) D's LOGIN got %r after %.1fs: B (idle again after the "
                            "refresh loss) was not parked" % (r, time.monotonic() - t0))
        cb.send(b"DONE\r\n")
        r = answer(cb, "j", timeout=3 + 3)
        if r is None or r.status != "OK":
            problems.append("(b) B's DONE after the refresh loss got %r; B got %r"
                            % (r, got(cb)))
        assert not problems, "\n".join(problems)
    finally:
        closing(ca, cb, cd)


def test_client_bytes_do_not_defeat_command_timeout(make_shim, make_fake):
    """Defect 7: every client read re-armed the session timer to
    client_idle_timeout, so a client that kept writing (here a pipelined
    NOOP every 0.5s) kept a stalled command waiting for ever.
    command_timeout 1s: the fake stalls A's first FETCH.  The FETCH must
    get its tagged answer (re-run on another session: OK, or NO) within
    command_timeout + 4s although the client keeps writing, then every
    NOOP its OK, in order."""
    fe = make_fake()
    fe.script["on_command"] = fake_exchange.stall_on("FETCH", mailbox="cto-a", times=1)
    shim = make_shim(fe.port, config=mx_config(session_budget="4", command_timeout="1s"))
    with shim.logged_in("cto-a") as c:
        assert c.command("SELECT INBOX", tag="s", timeout=5).status == "OK"
        c.send(b"f FETCH 1 (FLAGS)\r\n")
        deadline = time.monotonic() + 1 + 4
        noops, items, fetch = [], [], None
        while fetch is None and time.monotonic() < deadline:
            time.sleep(0.5)
            tag = "n%d" % (len(noops) + 1)
            c.send(tag.encode() + b" NOOP\r\n")
            noops.append(tag)
            try:
                while True:
                    item = c.read_item(timeout=0.05)
                    items.append(item)
                    if item.startswith(b"f "):
                        fetch = item
                        break
            except socket.timeout:
                pass
        assert fetch is not None, (
            "the stalled FETCH got no tagged answer within command_timeout + 4s while "
            "the client kept writing (%d NOOPs); got %r" % (len(noops), items))
        assert fetch.split(b" ")[1] in (b"OK", b"NO"), fetch
        rest = b"".join(items)
        for tag in noops:
            if not re.search(rb"(^|\n)%s OK" % tag.encode(), rest):
                r = c.read_response(tag, timeout=5)
                rest += r.raw
                assert r.status == "OK", r
        order = re.findall(rb"(?:^|\n)(f|n\d+) ", rest)
        assert order == [b"f"] + [t.encode() for t in noops], order


@pytest.mark.parametrize("line", [b"a ID {2}", b'a "ID" {2}'], ids=["ID", "invalid"])
def test_local_answer_to_command_with_sync_literal(make_shim, make_fake, line):
    """Defect 8: a command imapshim answers itself after login that ends in
    a synchronizing literal ("a ID {2}", or an invalid line ending in
    "{2}") was answered without "+", but imapshim's framer stayed in
    literal state and ate the client's next command.  Either behaviour is
    correct: a's tagged answer without "+" (the client then sends no
    literal), or "+" (the client sends the 2 bytes and CRLF) and then a's
    tagged answer.  Either way "b NOOP" must then get "b OK"."""
    fe = make_fake()
    shim = make_shim(fe.port, config=mx_config())
    with shim.logged_in("lit-a") as c:
        c.send(line + b"\r\n")
        seen = []
        while not seen or not seen[-1].startswith(b"a "):
            seen.append(c.read_item(timeout=5))
            if seen[-1].startswith(b"+"):
                c.send(b"xx\r\n")     # asked for the literal: send it
        c.send(b"b NOOP\r\n")
        r = answer(c, "b", timeout=3)
        assert r is not None, ("b NOOP after %r (answered %r) got no answer; got %r"
                               % (line, seen, got(c)))
        assert r.status == "OK", r


def tls10_hello(port):
    """Attempt a TLS 1.0-only handshake (an old client); imapshim
    (tls_min_version 1.2) refuses it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
    with socket.create_connection((harness.HOST, port), timeout=5) as s:
        try:
            ctx.wrap_socket(s).close()
        except (ssl.SSLError, OSError):
            pass


def plaintext_hello(port):
    """IMAP in cleartext to the implicit-TLS port."""
    with socket.create_connection((harness.HOST, port), timeout=5) as s:
        s.sendall(b"a LOGIN user password\r\n")
        try:
            s.recv(4096)        # imapshim closes (maybe after a TLS alert)
        except OSError:
            pass


@pytest.mark.parametrize("hello", [plaintext_hello, tls10_hello], ids=["plaintext", "tls1.0"])
def test_client_tls_fail_logs_readable_reason(make_shim, make_fake, hello):
    """Defect 9: client_tls_fail escaped its reason into the very buffer it
    read it from, so the log showed quote-and-backslash garbage.  A client
    speaks plaintext, or offers only TLS 1.0, to the implicit-TLS port: the
    client_tls_failed line must carry a readable detail (OpenSSL's text:
    bare, or quoted with valid escapes, quoted if it holds spaces; printable;
    words, not just quotes and backslashes).  Its reason class is
    test_diagnostics.py's."""
    fe = make_fake()
    shim = make_shim(fe.port, config=mx_config())
    hello(shim.port)
    ev = shim.wait_log_event("client_tls_failed", timeout=5)[-1]
    line = [x for x in shim.log_text(True).splitlines() if "event=client_tls_failed" in x][-1]
    raw = re.search(r'\bdetail=("(?:[^"\\]|\\.)*"|[^\s"]+)(?: |$)', line)
    assert raw, "detail is neither a bare nor a properly quoted value: %r" % line
    reason = ev["detail"]
    assert reason.isprintable() and not reason.startswith(('"', "\\")), (
        "unreadable reason %r in %r" % (reason, line))
    assert re.search(r"[A-Za-z]{3,}", reason), "reason without words: %r" % line
    assert raw.group(1).startswith('"') or " " not in reason, (
        "a reason holding spaces must be quoted: %r" % line)


def test_refused_resync_answers_waiting_command(make_shim, make_fake):
    """Attaching a parked client again selects its mailbox and reads it
    (FETCH 1:* (UID FLAGS)) before its command goes on.  When Exchange
    refuses that FETCH, the waiting command gets NO [UNAVAILABLE] and the
    client stays parked, with its session open: its next command attaches
    it again (before, the client was closed with "* BYE The mailbox cannot
    be opened again.").  session_budget 1: A SELECTs; B's LOGIN parks A
    (first FETCH 1:*: the snapshot); B logs out; A's NOOP attaches A and
    the second FETCH 1:* (the resync) is refused once."""
    fe = make_fake()
    fetches = []

    def refuse_resync(conn, tag, name, cmd):
        if (name == "FETCH" and b"1:* (UID FLAGS)" in cmd
                and (conn.mailbox or "").lower() == "resync-a"):
            fetches.append(tag)
            if len(fetches) == 2:
                return tag + b" NO Command received in Invalid state.\r\n"
        return None
    fe.script["on_command"] = refuse_resync
    shim = make_shim(fe.port, config=mx_config())
    ca = cb = None
    try:
        ca = shim.logged_in("resync-a")
        assert ca.command("SELECT INBOX", tag="s", timeout=10).status == "OK"
        cb = shim.logged_in("resync-b", timeout=10)     # pressure: A parks
        wait_parked(shim, "resync-a")
        cb.logout()
        cb = None
        ca.send(b"n1 NOOP\r\n")
        r = answer(ca, "n1", timeout=3 + 3)
        assert r is not None, "A's NOOP got no tagged answer; A got %r" % got(ca)
        assert r.tagged.startswith(b"n1 NO [UNAVAILABLE]"), r
        assert len(fetches) == 2, fetches
        r = ca.command("NOOP", tag="n2", timeout=3 + 3)
        assert r.status == "OK", r
        assert len(fetches) == 3, fetches
    finally:
        closing(ca, cb)
