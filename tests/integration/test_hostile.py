"""
Hostile clients (DESIGN.md 3.1 limits and timeouts): each test attacks one
imapshim in front of Dovecot while a good client works through the same
imapshim, and asserts three things:

  1. the bad client gets the documented answer: a tagged BAD, NO [TOOBIG],
     * BYE, or a close;
  2. the good client, connected at the same time, still gets prompt and
     correct answers (LOGIN, SELECT, FETCH of a known message);
  3. imapshim's resident memory (VmRSS of its process) stays within a bound
     far below what buffering the attack would cost.

Memory bounds, all growth over the RSS measured just before the attack:
  - 500 slowloris connections: < 64 MiB (a session costs kilobytes; 64 MiB
    would be > 128 KiB each);
  - a 60 MB {n+} literal over max_literal_bytes: < 16 MiB (it must be
    discarded as it arrives, never buffered);
  - a client that never reads 12 FETCHes of a 5 MB message: < 24 MiB
    (buffering them would cost 60 MB; backpressure holds one relay window);
  - 5000 pipelined NOOPs: < 16 MiB.
Under AddressSanitizer the quarantine (256 MiB by default) would keep freed
buffers resident, so each imapshim here starts with quarantine_size_mb=8,
and the bounds get 16 MiB of slack for that quarantine and the allocator's
caches (measured: 6-13 MiB of growth in every case, attack or not).

Short timeouts (client_login_timeout 2-5 s, client_idle_timeout 4 s) keep
the whole module within about a minute and a half.
"""

import os
import random
import re
import resource
import select
import socket
import ssl
import threading
import time

import pytest

import harness

ADMIN = "NPUMAdmin1"
MIB = 1024 * 1024


# ------------------------------------------------------------- helpers

def raise_nofile(want=4096):
    """500 slowloris sockets here and in imapshim (which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_bytes(shim):
    with open("/proc/%d/status" % shim.proc.pid) as f:
        m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024


class RssPeak:
    """Samples imapshim's VmRSS every 20 ms in a thread; .peak, .growth."""

    def __init__(self, shim):
        self.shim = shim
        self.base = rss_bytes(shim)
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.shim))
            except (OSError, AttributeError):
                return
            time.sleep(0.02)

    def stop(self):
        self._stop.set()
        self._t.join()
        return self

    @property
    def growth(self):
        return self.peak - self.base

    def __repr__(self):
        return "RSS base %.1f MiB, peak %.1f MiB, growth %.1f MiB" % (
            self.base / MIB, self.peak / MIB, self.growth / MIB)


_ASAN = {}


def asan_slack(shim):
    """16 MiB more room under ASan (see the module docstring)."""
    if shim.binary not in _ASAN:
        with open(shim.binary, "rb") as f:
            _ASAN[shim.binary] = b"AddressSanitizer" in f.read()
    return 16 * MIB if _ASAN[shim.binary] else 0


def unique(prefix):
    return "%s-%d" % (prefix, random.randrange(10 ** 9))


def start_shim(make_shim, dovecot, **shim_keys):
    """An imapshim in front of Dovecot with [shim] overrides; ASan (if the
    binary has it) with a small quarantine so RSS shows live memory."""
    cfg = {"upstream": {"login_format": "{mailbox}*{admin}"},
           "shim": dict(shim_keys)}
    shim = make_shim(dovecot.port_imaps, config=cfg, start=False)
    old = os.environ.get("ASAN_OPTIONS")
    os.environ["ASAN_OPTIONS"] = ((old + ":") if old else "") + \
        "quarantine_size_mb=8:thread_local_quarantine_size_kb=64"
    try:
        shim.start()
    finally:
        if old is None:
            del os.environ["ASAN_OPTIONS"]
        else:
            os.environ["ASAN_OPTIONS"] = old
    return shim


MESSAGE = (b"From: voicemail@example.com\r\nSubject: good client\r\n"
           b"Message-ID: <good-%d@example.com>\r\n\r\n" % random.randrange(10 ** 9)
           + b"The good client's message.\r\n" * 20)


class Good:
    """The well-behaved client: logged in before the attack, and checked
    (SELECT, FETCH of its known message, each within `prompt` seconds) during
    and after it; check_new() does the same on a fresh connection."""

    def __init__(self, shim, dovecot, admins, prompt=5.0):
        self.shim, self.admins, self.prompt = shim, admins, prompt
        self.mbx = unique("good")
        dovecot.append(self.mbx, MESSAGE)
        self.c = self._login()

    def _login(self):
        t0 = time.monotonic()
        c = self.shim.client(timeout=15)
        r = c.login("example.com/%s/%s" % (ADMIN, self.mbx), self.admins[ADMIN], tag="L")
        took = time.monotonic() - t0
        assert r.status == "OK", "good client's LOGIN: %r" % r
        assert took < self.prompt, "good client's LOGIN took %.1fs" % took
        return c

    def _exercise(self, c, what):
        t0 = time.monotonic()
        r = c.command("SELECT INBOX")
        assert r.status == "OK", "%s: SELECT %r" % (what, r)
        assert any(re.match(rb"\* 1 EXISTS", i) for i in r.untagged), r
        r = c.command("FETCH 1 (BODY.PEEK[])")
        assert r.status == "OK", "%s: FETCH %r" % (what, r)
        assert MESSAGE in harness.fetch_literals(r), "%s: wrong FETCH data %r" % (what, r)
        took = time.monotonic() - t0
        assert took < self.prompt, "%s: SELECT+FETCH took %.1fs" % (what, took)

    def check(self, what="good client"):
        self._exercise(self.c, what)

    def check_new(self, what="new good client"):
        c = self._login()
        try:
            self._exercise(c, what)
            c.command("LOGOUT")
        finally:
            c.close()

    def close(self):
        self.c.close()


def tagged_answer(c, tag, timeout=10):
    """The tagged reply for tag, skipping untagged lines; or the * BYE line
    if the connection is closed instead.  Returns bytes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = c.read_item(timeout=max(0.1, deadline - time.monotonic()))
        except harness.ConnectionClosed:
            return b"<closed>"
        if line.startswith(tag + b" ") or line.startswith(b"* BYE"):
            return line


def expect_bye_or_close(c, timeout):
    """Reads until EOF; returns what came.  Fails if still open."""
    return c.expect_closed(timeout=timeout)


# ------------------------------------------------------------- fixtures

@pytest.fixture
def env(make_shim, dovecot, admins):
    """Default hostile setup: small timeouts, limits at their defaults."""
    shim = start_shim(make_shim, dovecot, client_login_timeout="2s",
                      client_idle_timeout="4s")
    good = Good(shim, dovecot, admins)
    yield shim, good
    good.close()


# ------------------------------------------------------------- command size

def test_command_line_far_over_max(env, admins):
    """An 8 MB command line without CRLF, before and after login: one tagged
    BAD each, the rest discarded as it arrives, RSS growth < 16 MiB, and the
    session still answers NOOP; the good client is unaffected."""
    shim, good = env
    mon = RssPeak(shim)
    with shim.client(timeout=20) as bad:
        bad.send(b"a1 NOOP ")
        chunk = b"x" * 65536
        for i in range(128):
            bad.send(chunk)
            if i == 64:
                good.check("good client during an 8 MB line")
        bad.send(b"\r\n")
        line = tagged_answer(bad, b"a1", timeout=20)
        assert line.startswith(b"a1 BAD"), line
        assert bad.command("NOOP", tag="a2").status == "OK"
        r = bad.login("example.com/%s/%s" % (ADMIN, unique("big")), admins[ADMIN], tag="a3")
        assert r.status == "OK", r
        bad.send(b"b1 SEARCH SUBJECT \"" + b"y" * (2 * MIB) + b"\"\r\n")
        line = tagged_answer(bad, b"b1", timeout=20)
        assert line.startswith(b"b1 BAD"), line
        assert bad.command("NOOP", tag="b2").status == "OK"
    mon.stop()
    print("RSS:", mon)
    good.check()
    assert mon.growth < 16 * MIB + asan_slack(shim), mon


# ------------------------------------------------------------- literals

def test_sync_literal_over_max_never_invited(env):
    """{n} over max_literal_bytes (50 MiB default): NO [TOOBIG] at once and
    no '+'; imapshim must not wait for the octets: the very next line is a
    new command and gets its own answer.  Before and after login."""
    shim, good = env
    with shim.client() as bad:
        bad.send(b"a APPEND INBOX {52428801}\r\nb NOOP\r\n")
        item = bad.read_item()
        assert not item.startswith(b"+"), "oversized literal invited: %r" % item
        assert item.startswith(b"a NO [TOOBIG]"), item
        assert tagged_answer(bad, b"b").startswith(b"b OK")
    with shim.logged_in(unique("sync")) as bad:
        bad.send(b"a APPEND INBOX {999999999999}\r\nb NOOP\r\n")
        item = bad.read_item()
        assert not item.startswith(b"+"), "oversized literal invited: %r" % item
        assert item.startswith(b"a NO [TOOBIG]"), item
        assert tagged_answer(bad, b"b").startswith(b"b OK")
    good.check()


def test_nonsync_literal_60mb_discarded_not_buffered(env):
    """A 60 MB {n+} literal (over the 50 MiB default) after login: the
    octets are read and discarded as they stream in (RSS growth < 16 MiB,
    far below 60 MB), the command is answered NO [TOOBIG] (or the session
    closed with BYE), and the good client is served meanwhile."""
    shim, good = env
    size = 60 * 1000 * 1000
    mon = RssPeak(shim)
    with shim.logged_in(unique("nonsync"), timeout=30) as bad:
        bad.send(b"a APPEND INBOX {%d+}\r\n" % size)
        chunk = b"z" * (1024 * 1024)
        sent = 0
        closed = False
        while sent < size:
            n = min(len(chunk), size - sent)
            try:
                bad.send(chunk[:n])
            except OSError:
                closed = True
                break
            sent += n
            if sent % (20 * 1000 * 1000) < n:
                good.check("good client during a 60 MB literal")
        if not closed:
            bad.send(b"\r\nb NOOP\r\n")
            line = tagged_answer(bad, b"a", timeout=30)
            assert line.startswith(b"a NO [TOOBIG]") or line.startswith(b"* BYE") \
                or line == b"<closed>", line
            if line.startswith(b"a NO"):
                assert tagged_answer(bad, b"b").startswith(b"b OK")
    mon.stop()
    print("RSS:", mon)
    good.check()
    assert mon.growth < 16 * MIB + asan_slack(shim), "%r while a 60 MB literal streamed through" % mon


def test_prelogin_literals_bounded(env):
    """Before login nothing needs a big literal: a {n+} literal under
    max_literal_bytes but far over any login's size (40 MB) ends with * BYE
    and a close once imapshim's pre-login cap is passed, without buffering
    it; an oversized {n+} one gets NO [TOOBIG] and its octets discarded."""
    shim, good = env
    mon = RssPeak(shim)
    with shim.client(timeout=20) as bad:
        bad.send(b"a LOGIN {40000000+}\r\n")
        got_closed = False
        for _ in range(40):
            try:
                bad.send(b"u" * 1000000)
            except OSError:
                got_closed = True
                break
        rest = b""
        if not got_closed:
            try:
                rest = bad.expect_closed(timeout=10)
            except harness.HarnessError as e:
                pytest.fail("40 MB pre-login literal: still open: %s" % e)
        else:
            try:
                rest = bad.expect_closed(timeout=5)
            except harness.HarnessError:
                pass
        assert b"* BYE" in b"".join(bad.transcript) + rest or got_closed, rest
    with shim.client(timeout=20) as bad:
        bad.send(b"a LOGIN {52428801+}\r\n")
        for _ in range(52):
            bad.send(b"v" * 1000000)
        bad.send(b"v" * 428801 + b" x\r\nb NOOP\r\n")
        assert tagged_answer(bad, b"a", timeout=20).startswith(b"a NO [TOOBIG]")
        assert tagged_answer(bad, b"b", timeout=20).startswith(b"b OK")
    mon.stop()
    print("RSS:", mon)
    good.check()
    assert mon.growth < 16 * MIB + asan_slack(shim), mon


def test_lying_literal_length(make_shim, dovecot, admins):
    """'a APPEND INBOX {100}' and then only 10 octets, a pause, and a new
    command: IMAP says those bytes are literal data, so the 'command' is
    swallowed.  Other sessions are not desynchronised (the good client's
    replies stay correct), and the liar is eventually answered or closed
    by client_idle_timeout (4 s here).  The same before login ends with the
    login timeout (2 s)."""
    shim = start_shim(make_shim, dovecot, client_login_timeout="2s",
                      client_idle_timeout="4s")
    good = Good(shim, dovecot, admins)
    try:
        # before login
        with shim.client() as liar:
            liar.send(b"a LOGIN {100}\r\n")
            assert liar.read_line().startswith(b"+"), liar.transcript
            liar.send(b"0123456789")
            time.sleep(0.5)
            liar.send(b"b NOOP\r\n")
            t0 = time.monotonic()
            rest = liar.expect_closed(timeout=6)
            assert time.monotonic() - t0 < 5
            assert b"b OK" not in rest, "the literal's bytes ran as a command: %r" % rest
        # after login
        liar = shim.logged_in(unique("liar"))
        try:
            assert liar.command("SELECT INBOX").status == "OK"
            liar.send(b"a APPEND INBOX {100}\r\n")
            assert liar.read_line().startswith(b"+"), liar.transcript
            liar.send(b"0123456789")
            time.sleep(1)
            liar.send(b"b NOOP\r\n")
            # Wait up to 15 s for an answer or a close, keeping the good
            # client busy (and so not idle) meanwhile.
            got, answered, closed = b"", False, False
            t0 = time.monotonic()
            while time.monotonic() - t0 < 15 and not (answered or closed):
                good.check("good client while a liar waits mid-literal")
                try:
                    liar._fill(1.0)
                except harness.ConnectionClosed:
                    closed = True
                except socket.timeout:
                    pass
                got = liar.buf
                answered = re.search(rb"(^|\n)(a (OK|NO|BAD)|\* BYE)", got) is not None
            assert answered or closed, (
                "liar neither answered nor closed %.0fs after it stopped "
                "mid-literal (client_idle_timeout 4s): %r" % (time.monotonic() - t0, got))
            assert b"b OK" not in got, "the literal's bytes ran as a command: %r" % got
        finally:
            liar.close()
        good.check()
        good.check_new()
    finally:
        good.close()


# ------------------------------------------------------------- odd bytes

ODD_LINES = [
    b"a1 NOOP\x00\r\n",
    b"a2 SELECT \"IN\x00BOX\"\r\n",
    b"a3 \xff\xfe\xfd\r\n",
    b"a4 SEARCH TEXT \"\xe4\xf6\xfc\"\r\n",
    b"a5 LOGIN \"\x00\" \"\x00\"\r\n",
    b"\x00\x00\x00\r\n",
    b"a6 NO\x80OP\r\n",
]


@pytest.mark.parametrize("when", ["prelogin", "postlogin"])
def test_nul_and_8bit_bytes(env, when):
    """NUL and 8-bit bytes in tags, atoms and quoted strings: every line is
    answered (tagged BAD or NO, or OK where 8-bit text is legal; '* BAD'
    when there is no usable tag), the session keeps working, nothing else
    is affected."""
    shim, good = env
    c = shim.client() if when == "prelogin" else shim.logged_in(unique("odd"))
    with c:
        if when == "postlogin":
            assert c.command("SELECT INBOX").status == "OK"
        for line in ODD_LINES:
            c.send(line)
            item = c.read_item()
            m = re.match(rb"^(\S+) (OK|NO|BAD)\b", item)
            assert m, "%r answered %r" % (line, item)
            tag = line.split(b" ", 1)[0]
            if m.group(1) != b"*":
                assert m.group(1) == tag, "%r answered for tag %r" % (line, m.group(1))
            if b"\x00" in line or line.startswith(b"a3") or line.startswith(b"a6"):
                assert m.group(2) in (b"BAD", b"NO"), "%r answered %r" % (line, item)
            assert c.command("NOOP").status == "OK"
    good.check()


def test_commands_in_wrong_state(env):
    """Before login: SELECT, FETCH, IDLE, APPEND, DONE -> BAD or NO, and no
    literal is invited for an APPEND that cannot run; after login: LOGIN,
    AUTHENTICATE, STARTTLS -> BAD, FETCH before SELECT -> BAD/NO, a stray
    DONE -> BAD.  The session stays usable throughout."""
    shim, good = env
    with shim.client() as c:
        for cmd in ("SELECT INBOX", "FETCH 1 BODY[]", "IDLE", "DONE", "EXPUNGE",
                    "UID FETCH 1:* FLAGS"):
            r = c.command(cmd, timeout=5)
            assert r.status in ("BAD", "NO"), "%s before login: %r" % (cmd, r)
        c.send(b"ap APPEND INBOX {5+}\r\nhello\r\n")
        assert tagged_answer(c, b"ap").split(b" ")[1] in (b"BAD", b"NO")
        assert c.command("NOOP").status == "OK"
    with shim.logged_in(unique("state")) as c:
        for cmd in ('LOGIN "a" "b"', "AUTHENTICATE PLAIN", "STARTTLS",
                    "FETCH 1 BODY[]", "DONE"):
            r = c.command(cmd, timeout=5)
            assert r.status in ("BAD", "NO"), "%s after login: %r" % (cmd, r)
        assert c.command("NOOP").status == "OK"
    good.check()


# ------------------------------------------------------------- pipelining

def test_pipeline_5000_noops(env):
    """5000 NOOPs in one write, before and after login: each answered once,
    in order, tagged OK; RSS growth < 16 MiB; the good client meanwhile."""
    shim, good = env
    n = 5000
    mon = RssPeak(shim)
    for when in ("prelogin", "postlogin"):
        c = shim.client(timeout=60) if when == "prelogin" else \
            shim.logged_in(unique("pipe"), timeout=60)
        with c:
            c.send(b"".join(b"n%d NOOP\r\n" % i for i in range(n)))
            good.check("good client during 5000 pipelined NOOPs")
            expect = 0
            deadline = time.monotonic() + 60
            while expect < n:
                item = c.read_item(timeout=max(0.1, deadline - time.monotonic()))
                if item.startswith(b"* "):
                    continue
                m = re.match(rb"^n(\d+) (OK|NO|BAD)", item)
                assert m, "%s: unexpected %r after n%d" % (when, item, expect - 1)
                assert int(m.group(1)) == expect, "%s: n%s answered, n%d expected" % (
                    when, m.group(1).decode(), expect)
                assert m.group(2) == b"OK", item
                expect += 1
            assert c.command("NOOP", tag="last").status == "OK"
    mon.stop()
    print("RSS:", mon)
    good.check()
    assert mon.growth < 16 * MIB + asan_slack(shim), mon


# ------------------------------------------------------------- slowloris

def test_slowloris_500(make_shim, dovecot, admins):
    """500 connections to the cleartext listener each send one byte a second
    for 4 s: the good client logs in, SELECTs and FETCHes promptly all the
    while; RSS growth < 64 MiB; and client_login_timeout (5 s) closes every
    slow connection with * BYE."""
    nofile = raise_nofile(4096)
    if nofile < 1200:
        pytest.skip("RLIMIT_NOFILE %d is too low for 500 connections" % nofile)
    shim = start_shim(make_shim, dovecot, client_login_timeout="5s",
                      max_unauth_per_ip="1000")
    good = Good(shim, dovecot, admins)
    mon = RssPeak(shim)
    socks = []
    try:
        t0 = time.monotonic()
        for _ in range(500):
            s = socket.create_connection((harness.HOST, shim.port_starttls), timeout=10)
            s.setblocking(False)
            socks.append(s)
        data = b"a LOGIN "
        for i in range(4):
            for s in socks:
                try:
                    s.send(data[i:i + 1])
                except (BlockingIOError, OSError):
                    pass
            good.check("good client during slowloris second %d" % i)
            if i == 1:
                good.check_new()
            time.sleep(max(0, t0 + i + 1 - time.monotonic()))
        peak = mon.stop()
        print("RSS:", peak)
        assert peak.growth < 64 * MIB + asan_slack(shim), "%r with 500 slowloris connections" % peak
        # every slow connection is closed by the login timeout, with a BYE
        got = {s: b"" for s in socks}
        open_ = set(socks)
        deadline = time.monotonic() + 10
        while open_ and time.monotonic() < deadline:
            r, _, _ = select.select(list(open_), [], [], 0.5)
            for s in r:
                try:
                    chunk = s.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    got[s] += chunk
                else:
                    open_.discard(s)
        assert not open_, "%d of 500 slowloris connections still open %.0fs after " \
            "connecting (client_login_timeout 5s)" % (len(open_), time.monotonic() - t0)
        no_bye = [g for g in got.values() if b"* BYE" not in g]
        assert len(no_bye) == 0, "%d closed without * BYE, e.g. %r" % (len(no_bye), no_bye[:2])
        good.check()
        good.check_new()
    finally:
        for s in socks:
            s.close()
        good.close()


# ------------------------------------------------------------- TLS abuse

def half_client_hello():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = out.read()
    assert hello[:1] == b"\x16", hello[:8]
    return hello[:len(hello) // 2]


def test_tls_garbage_and_unfinished_handshakes(env):
    """On the implicit-TLS port: 20 connections sending random bytes are
    closed at once (handshake failure); 50 connections sending half a
    ClientHello, 20 that connect and send nothing, and a STARTTLS client
    that stops half-way through its handshake, are all closed by
    client_login_timeout (2 s) within 5 s; the good client works meanwhile."""
    shim, good = env
    rnd = random.Random(99)
    mon = RssPeak(shim)
    garbage = []
    for _ in range(20):
        s = socket.create_connection((harness.HOST, shim.port), timeout=10)
        s.sendall(bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 3000))))
        garbage.append(s)
    hello = half_client_hello()
    half = []
    t0 = time.monotonic()
    for i in range(70):
        s = socket.create_connection((harness.HOST, shim.port), timeout=10)
        if i < 50:
            s.sendall(hello)
        half.append(s)
    st = harness.ImapClient(shim.port_starttls, timeout=10)
    assert st.command("STARTTLS", tag="s").status == "OK"
    st.sock.sendall(hello)
    half.append(st.sock)
    good.check("good client during TLS abuse")
    good.check_new()
    for s in garbage:
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except socket.timeout:
            pytest.fail("a TLS-garbage connection was still open after 5 s")
        except OSError:
            pass
    for s in half:
        s.settimeout(max(0.1, t0 + 6 - time.monotonic()))
        try:
            while s.recv(4096):
                pass
        except socket.timeout:
            pytest.fail("an unfinished TLS handshake was still open %.1fs after it "
                        "started (client_login_timeout 2s)" % (time.monotonic() - t0))
        except OSError:
            pass
    took = time.monotonic() - t0
    assert took < 6, "unfinished handshakes closed after %.1fs" % took
    mon.stop()
    print("RSS:", mon)
    for s in garbage + half:
        s.close()
    good.check()
    assert mon.growth < 32 * MIB + asan_slack(shim), mon


# ------------------------------------------------------------- slow reader

def test_client_never_reads_large_fetches(make_shim, dovecot, admins):
    """A client FETCHes a 5 MB message 12 times without reading anything:
    imapshim stops reading from Dovecot once its buffer to the client is
    full (backpressure), so RSS grows < 24 MiB rather than 60 MB; the good
    client is served normally meanwhile; when the slow client finally reads
    it gets all 12 answers, byte-exact and in order."""
    shim = start_shim(make_shim, dovecot, client_login_timeout="5s")
    good = Good(shim, dovecot, admins)
    mbx = unique("slow")
    big = b"Subject: big\r\n\r\n" + (b"0123456789abcdef" * 63 + b"0123456789abc\r\n") * 5000
    dovecot.append(mbx, big)
    n = 12
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        raw.connect((harness.HOST, shim.port))
        slow = harness.ImapClient.__new__(harness.ImapClient)
        slow.host, slow.port, slow.timeout = harness.HOST, shim.port, 60
        slow.server_hostname, slow.buf, slow.transcript = "localhost", b"", []
        slow.closed, slow._tagn = False, 0
        slow.sock = shim.pki.client_context().wrap_socket(raw, server_hostname="localhost")
        slow.greeting = slow.read_line()
        r = slow.login("example.com/%s/%s" % (ADMIN, mbx), admins[ADMIN], tag="L")
        assert r.status == "OK", r
        assert slow.command("SELECT INBOX").status == "OK"
        mon = RssPeak(shim)
        slow.send(b"".join(b"f%d FETCH 1 (BODY.PEEK[])\r\n" % i for i in range(n)))
        time.sleep(2)
        for i in range(3):
            good.check("good client while a reader stalls")
            time.sleep(0.5)
        good.check_new()
        stalled = mon.stop()
        print("RSS:", stalled)
        assert stalled.growth < 24 * MIB + asan_slack(shim), "%r with %d x %d bytes unread" % (
            stalled, n, len(big))
        for i in range(n):
            r = slow.read_response("f%d" % i, timeout=60)
            assert r.status == "OK", r
            assert harness.fetch_literals(r) == [big], "FETCH f%d data differs" % i
        assert slow.command("NOOP").status == "OK"
        slow.close()
        good.check()
    finally:
        good.close()
