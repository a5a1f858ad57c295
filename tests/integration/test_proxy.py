"""
End-to-end tests of imapshim's client-facing contract (DESIGN.md 3.1, 3.2,
3.6), against a real Dovecot (master-user logins stand in for Exchange's
delegated logins) and, where upstream traffic must be counted or upstream
certificates faked, against fake_exchange.

Each test states what it sends and what it expects; failures show the raw
bytes that came back, and the report carries imapshim's log tail.
"""

import base64
import random
import re
import socket
import threading
import time

import pytest

import harness
from harness import imap_quote, parse_capabilities, sasl_plain, fetch_literals

ADMIN = "NPUMAdmin1"
FORBIDDEN_CAPS = ("STARTTLS", "LOGINDISABLED")


def name_for(mailbox, admin=ADMIN, sep="/"):
    return sep.join(("example.com", admin, mailbox))


def unique_mailbox(prefix):
    return "%s-%d" % (prefix, random.randrange(10 ** 9))


def eventually(pred, timeout=3.0, what="condition"):
    """True once pred() is; False after timeout (for logs written async)."""
    try:
        return bool(harness.wait_until(pred, timeout=timeout, what=what))
    except harness.HarnessError:
        return False


def assert_prefix(resp_or_line, prefix, what=""):
    data = resp_or_line.tagged if isinstance(resp_or_line, harness.Response) else resp_or_line
    assert data.startswith(prefix), "%s: expected a line starting %r, got %r (all: %r)" % (
        what, prefix, data, resp_or_line)


def no_compress(caps):
    return [c for c in caps if c.startswith("COMPRESS")]


def fake_shim_config(**upstream):
    """Config for an imapshim in front of fake_exchange (Exchange's login
    format), with short retry timings so failures surface quickly."""
    cfg = {
        "upstream": {"login_format": "{domain}/{admin}/{mailbox}",
                     "connect_timeout": "3s", "login_timeout": "5s"},
        "pool": {"queue_timeout": "5s"},
        "retry": {"backoff_initial": "100ms", "backoff_max": "500ms"},
    }
    cfg["upstream"].update(upstream)
    return cfg


# ------------------------------------------------------------- greeting

def test_greeting(shim):
    """Connect over implicit TLS: the greeting is '* OK ... imapshim ...'."""
    with shim.client() as c:
        assert c.greeting.startswith(b"* OK"), c.greeting
        assert b"imapshim" in c.greeting.lower(), c.greeting
        assert c.greeting.endswith(b"\r\n"), c.greeting


# ------------------------------------------------------------- login

@pytest.mark.parametrize("sep", ["/", "\\"])
def test_login_delegated_name(shim, dovecot, admins, sep):
    """LOGIN "example.com/NPUMAdmin1/<mailbox>" (or with backslashes) and the
    admin password: imapshim logs in to Dovecot as <mailbox>*NPUMAdmin1 and
    answers OK; the session then really is that mailbox's."""
    mbx = unique_mailbox("login")
    with shim.client() as c:
        r = c.login(name_for(mbx, sep=sep), admins[ADMIN], tag="a")
        assert r.status == "OK", r
        assert_prefix(r, b"a OK")
        # the upstream login happened before the OK (LOGIN is truthful)
        assert eventually(lambda: dovecot.login_count(mbx) == 1), (
            "Dovecot did not log a login of %s before imapshim said OK:\n%s"
            % (mbx, dovecot.log_text()[-3000:]))
        r = c.command("SELECT INBOX", tag="b")
        assert r.status == "OK", r
        assert b"UIDVALIDITY" in r.raw, r
        c.command("LOGOUT")
    assert "Master user logging in as %s" % mbx in dovecot.log_text()
    assert dovecot.login_count(mbx) == 1


def test_login_admin_name_case_insensitive(shim, dovecot, admins):
    """The {admin} part is matched case-insensitively (DESIGN 3.1)."""
    mbx = unique_mailbox("case")
    with shim.client() as c:
        r = c.login(name_for(mbx, admin=ADMIN.lower()), admins[ADMIN], tag="a")
        assert r.status == "OK", r


def test_login_admin_password_needing_quotes(shim, dovecot, admins):
    """NPUMAdmin2's password holds '"', '\\', ' ', ';', '#': imapshim reads it
    from its password_file and quotes it correctly in the upstream LOGIN."""
    mbx = unique_mailbox("quoted")
    with shim.client() as c:
        r = c.login(name_for(mbx, admin="NPUMAdmin2"), admins["NPUMAdmin2"], tag="a")
        assert r.status == "OK", r
        r = c.command("NOOP")
        assert r.status == "OK", r
    assert eventually(lambda: dovecot.login_count(mbx) == 1)


def test_login_is_truthful_upstream(make_fake, make_shim, admins):
    """imapshim says OK only after the upstream LOGIN succeeded, and never OK
    when every upstream LOGIN fails (fake Exchange, delayed / failing)."""
    def slow_login(conn, user, password):
        time.sleep(1.0)
        return None
    fe = make_fake(script={"on_login": slow_login})
    shim = make_shim(fe.port, config=fake_shim_config())
    with shim.client() as c:
        r = c.login(name_for("user1"), admins[ADMIN], tag="a")
        t_ok = time.monotonic()
        assert r.status == "OK", r
    logins = fe.all_logins()
    assert len(logins) == 1, fe.summary()
    _, user, _, reply = logins[0]
    assert user == "example.com/NPUMAdmin1/user1", user
    assert reply.startswith("OK")
    t_login = [t for (t, cmd) in fe.connections[0].commands if b" LOGIN " in cmd.upper()][0]
    assert t_ok >= t_login + 0.9, "client got OK %.2fs after the upstream LOGIN arrived" % (
        t_ok - t_login)

    fe.script["on_login"] = lambda conn, user, pw: "NO LOGIN failed."
    with shim.client(timeout=20) as c:
        r = c.login(name_for("user2"), admins[ADMIN], tag="b")
        assert r.status == "NO", "upstream refused every LOGIN, client got %r" % r


# ------------------------------------------------------------- capabilities

def test_capability_prelogin_implicit_tls(shim):
    """CAPABILITY before login on the implicit-TLS listener."""
    with shim.client() as c:
        r = c.command("CAPABILITY", tag="c")
        assert r.status == "OK", r
        caps = parse_capabilities(b"".join(r.untagged))
        for want in ("IMAP4REV1", "LITERAL+", "ID", "IDLE", "AUTH=PLAIN", "SASL-IR"):
            assert want in caps, "%s missing from %r" % (want, r)
        for bad in FORBIDDEN_CAPS:
            assert bad not in caps, "%s advertised on the implicit-TLS listener: %r" % (bad, r)
        assert not no_compress(caps), r
        greet_caps = parse_capabilities(c.greeting)
        for bad in FORBIDDEN_CAPS:
            assert bad not in greet_caps, c.greeting
        assert not no_compress(greet_caps), c.greeting


def test_starttls_listener(shim, pki, admins):
    """Cleartext listener: CAPABILITY shows STARTTLS and LOGINDISABLED; LOGIN
    is refused with NO [PRIVACYREQUIRED]; after STARTTLS the capabilities
    change and LOGIN works."""
    with shim.plain_client() as c:
        assert c.greeting.startswith(b"* OK"), c.greeting
        r = c.command("CAPABILITY", tag="c")
        caps = parse_capabilities(b"".join(r.untagged))
        assert r.status == "OK", r
        assert "STARTTLS" in caps and "LOGINDISABLED" in caps, r
        assert "AUTH=PLAIN" not in caps, "AUTH=PLAIN offered in cleartext: %r" % r
        assert not no_compress(caps), r

        r = c.login(name_for("user1"), admins[ADMIN], tag="a")
        assert_prefix(r, b"a NO [PRIVACYREQUIRED]", "LOGIN in cleartext")

        r = c.starttls(pki.client_context(), tag="s")
        assert_prefix(r, b"s OK", "STARTTLS")
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3"), c.sock.version()

        r = c.command("CAPABILITY", tag="d")
        caps = parse_capabilities(b"".join(r.untagged))
        assert "AUTH=PLAIN" in caps, r
        assert "STARTTLS" not in caps and "LOGINDISABLED" not in caps, r

        r = c.login(name_for("user1"), admins[ADMIN], tag="e")
        assert r.status == "OK", r
        assert c.command("NOOP", tag="f").status == "OK"


def test_capability_after_login(shim, admins):
    """After login CAPABILITY adds relayed upstream extensions (Dovecot offers
    NAMESPACE, CHILDREN, UIDPLUS) and never COMPRESS, STARTTLS or AUTH=."""
    with shim.client() as c:
        r = c.login(name_for("user1"), admins[ADMIN], tag="a")
        assert r.status == "OK", r
        login_caps = parse_capabilities(r.tagged)
        r = c.command("CAPABILITY", tag="c")
        assert r.status == "OK", r
        caps = parse_capabilities(b"".join(r.untagged))
        for want in ("IMAP4REV1", "NAMESPACE", "CHILDREN", "UIDPLUS", "IDLE", "LITERAL+"):
            assert want in caps, "%s missing after login: %r" % (want, r)
        for cs in (caps, login_caps):
            assert not no_compress(cs), r
            assert not [x for x in cs if x.startswith("AUTH=")], r
            for bad in FORBIDDEN_CAPS:
                assert bad not in cs, r
        r = c.command("NAMESPACE", tag="n")
        assert r.status == "OK" and b"* NAMESPACE" in r.raw, r


# ------------------------------------------------------------- failed logins

def test_wrong_password_delay_and_bye(make_fake, make_shim, admins):
    """Five LOGINs with a wrong password on one connection: each answered
    NO [AUTHENTICATIONFAILED] after 0.5, 1, 2, 4 s; after the 5th the client
    gets * BYE and is closed.  The upstream sees no connection at all."""
    fe = make_fake()
    shim = make_shim(fe.port, config=fake_shim_config())
    expected = [0.5, 1.0, 2.0, 4.0]
    with shim.client(timeout=15) as c:
        for i, delay in enumerate(expected):
            t0 = time.monotonic()
            r = c.login(name_for("user1"), "wrong-" + admins[ADMIN], tag="w%d" % i)
            took = time.monotonic() - t0
            assert_prefix(r, b"w%d NO [AUTHENTICATIONFAILED]" % i, "failure %d" % (i + 1))
            assert delay * 0.9 - 0.05 <= took <= delay + 1.5, (
                "failure %d answered after %.2fs, expected about %.1fs" % (i + 1, took, delay))
        # 5th failure: optional NO, then BYE and close
        c.send(b"w4 LOGIN " + imap_quote(name_for("user1")) + b" "
               + imap_quote("wrong-" + admins[ADMIN]) + b"\r\n")
        rest = c.expect_closed(timeout=12)
        assert b"* BYE" in rest, "after the 5th failure expected * BYE then close, got %r" % rest
        m = re.search(rb"^w4 (\S+)", rest, re.M)
        if m:
            assert rest.startswith(b"w4 NO [AUTHENTICATIONFAILED]"), rest
    time.sleep(0.3)
    assert fe.n_connections == 0, "a wrong password reached the upstream:\n" + fe.summary()

    # control: the same shim does reach the upstream with the right password
    with shim.client() as c:
        assert c.login(name_for("user1"), admins[ADMIN]).status == "OK"
    assert fe.n_connections == 1, fe.summary()


def test_unknown_admin_or_invalid_mailbox_never_reach_upstream(make_fake, make_shim, admins):
    """Unknown admin, and mailboxes with forbidden characters or > 256 bytes:
    NO [AUTHENTICATIONFAILED], and no upstream connection."""
    fe = make_fake()
    shim = make_shim(fe.port, config=fake_shim_config())
    pw = admins[ADMIN]
    cases = {
        "unknown admin": (name_for("user1", admin="NPUMAdmin9"), pw),
        "unknown admin, its own password": (name_for("user1", admin="NPUMAdmin9"), "x"),
        "mailbox with space": (name_for("user 1"), pw),
        "mailbox with '#'": (name_for("user#1"), pw),
        "mailbox with '%'": (name_for("us%er"), pw),
        "mailbox of 257 bytes": (name_for("a" * 257), pw),
        "empty mailbox": (name_for(""), pw),
        "no domain part": ("NPUMAdmin1/user1", pw),
    }
    results = {}

    def run(label, user, password):
        try:
            with shim.client(timeout=12) as c:
                results[label] = c.login(user, password, tag="x")
        except Exception as e:  # noqa: BLE001 - reported below
            results[label] = e

    threads = [threading.Thread(target=run, args=(k,) + v) for k, v in cases.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    for label in cases:
        r = results.get(label)
        assert isinstance(r, harness.Response), "%s: %r" % (label, r)
        assert_prefix(r, b"x NO [AUTHENTICATIONFAILED]", label)
    # the 257-byte mailbox must work one byte shorter (boundary)
    with shim.client() as c:
        assert c.login(name_for("b" * 256), pw).status == "OK"
    time.sleep(0.3)
    users = [u for (_, u, _, _) in fe.all_logins()]
    assert users == [name_for("b" * 256)], "unexpected upstream logins %r\n%s" % (
        users, fe.summary())


def test_login_name_injection(make_fake, make_shim, admins):
    """Login names crafted to smuggle bytes into the upstream LOGIN: CRLF in a
    literal, '"' inside a quoted string, extra '/' separators, '*' (Dovecot's
    master separator), NUL and 8-bit bytes.  All NO [AUTHENTICATIONFAILED]
    with the correct admin password; the upstream receives nothing."""
    fe = make_fake()
    shim = make_shim(fe.port, config=fake_shim_config())
    pw = imap_quote(admins[ADMIN])
    base = b"example.com/NPUMAdmin1/"

    def lit(b, plus=True):
        return b"{%d%s}\r\n" % (len(b), b"+" if plus else b"") + b

    cases = {
        "CRLF in literal+": b"x LOGIN " + lit(base + b"us\r\nx LOGOUT\r\ner1") + b" " + pw + b"\r\n",
        "LF in literal+": b"x LOGIN " + lit(base + b"user1\nfoo") + b" " + pw + b"\r\n",
        "quote in quoted": b"x LOGIN " + imap_quote(base + b'us"er1') + b" " + pw + b"\r\n",
        "backslash in quoted": b"x LOGIN " + imap_quote(base + b"us\\er1") + b" " + pw + b"\r\n",
        "extra separator": b"x LOGIN " + imap_quote(base + b"user1/extra") + b" " + pw + b"\r\n",
        "dot-dot path": b"x LOGIN " + imap_quote(base + b"../user1") + b" " + pw + b"\r\n",
        "backslash separator extra": b"x LOGIN " + imap_quote(base + b"a\\user1") + b" " + pw + b"\r\n",
        "master separator": b"x LOGIN " + imap_quote(base + b"user1*NPUMAdmin2") + b" " + pw + b"\r\n",
        "NUL in literal+": b"x LOGIN " + lit(base + b"user1\0x") + b" " + pw + b"\r\n",
        "8-bit in literal+": b"x LOGIN " + lit(base + b"us\xe9r1") + b" " + pw + b"\r\n",
        "space in quoted": b"x LOGIN " + imap_quote(base + b"user1 x") + b" " + pw + b"\r\n",
    }
    results = {}

    def run(label, raw):
        try:
            with shim.client(timeout=12) as c:
                c.send(raw)
                results[label] = c.read_response("x")
        except Exception as e:  # noqa: BLE001
            results[label] = e

    threads = [threading.Thread(target=run, args=kv) for kv in cases.items()]
    for t in threads:
        t.start()
    # a synchronizing literal with CRLF inside, on its own connection
    with shim.client(timeout=12) as c:
        name = base + b"us\r\ner1"
        c.send(b"y LOGIN {%d}\r\n" % len(name))
        items, plus = c.read_continuation()
        assert not items, items
        c.send(name + b" " + pw + b"\r\n")
        r = c.read_response("y")
        assert_prefix(r, b"y NO [AUTHENTICATIONFAILED]", "CRLF in sync literal")
    for t in threads:
        t.join(20)
    for label in cases:
        r = results.get(label)
        assert isinstance(r, harness.Response), "%s: %r" % (label, r)
        assert_prefix(r, b"x NO [AUTHENTICATIONFAILED]", label)
    time.sleep(0.3)
    assert fe.n_connections == 0, "an injection attempt reached the upstream:\n" + fe.summary()


# ------------------------------------------------------------- AUTHENTICATE

def test_authenticate_plain(shim, admins):
    """AUTHENTICATE PLAIN with SASL-IR, in two steps, and cancelled with '*'."""
    blob = sasl_plain(name_for("user1"), admins[ADMIN])
    with shim.client() as c:
        r = c.command("AUTHENTICATE PLAIN " + blob, tag="a")
        assert r.status == "OK", r
        assert c.command("NOOP", tag="n").status == "OK"

    with shim.client() as c:
        c.send(b"b AUTHENTICATE PLAIN\r\n")
        items, plus = c.read_continuation()
        assert not items, items
        assert plus.startswith(b"+"), plus
        c.send(blob.encode() + b"\r\n")
        r = c.read_response("b")
        assert r.status == "OK", r
        assert c.command("NOOP", tag="n").status == "OK"

    with shim.client() as c:
        # backslash form and an explicit empty authzid
        blob2 = sasl_plain(name_for("user1", sep="\\"), admins[ADMIN], authzid="")
        r = c.command("AUTHENTICATE PLAIN " + blob2, tag="a2")
        assert r.status == "OK", r

    with shim.client() as c:
        c.send(b"c AUTHENTICATE PLAIN\r\n")
        c.read_continuation()
        c.send(b"*\r\n")
        r = c.read_response("c")
        assert_prefix(r, b"c BAD", "cancelled AUTHENTICATE")
        # still usable afterwards
        assert c.command("NOOP", tag="n").status == "OK"

    with shim.client() as c:
        bad = sasl_plain(name_for("user1"), "wrong-" + admins[ADMIN])
        r = c.command("AUTHENTICATE PLAIN " + bad, tag="d")
        assert_prefix(r, b"d NO [AUTHENTICATIONFAILED]", "AUTHENTICATE with a wrong password")


# ------------------------------------------------------------- before login

def test_commands_before_login(shim):
    """NOOP -> OK; ID -> * ID (...) + OK; SELECT -> BAD (or NO); LOGOUT ->
    * BYE, OK, close."""
    with shim.client() as c:
        r = c.command("NOOP", tag="a")
        assert_prefix(r, b"a OK", "NOOP")
        r = c.command('ID ("name" "imapshim-test" "version" "1")', tag="b")
        assert_prefix(r, b"b OK", "ID")
        assert any(i.startswith(b"* ID ") for i in r.untagged), r
        r = c.command("SELECT INBOX", tag="c")
        assert r.status in ("BAD", "NO"), r
        r = c.command("LOGOUT", tag="d")
        assert r.untagged and r.untagged[0].startswith(b"* BYE"), r
        assert_prefix(r, b"d OK", "LOGOUT")
        c.expect_closed(timeout=5)


# ------------------------------------------------------------- relaying

TRICKY_MESSAGE = (
    b"From: voicemail@example.com\r\n"
    b"To: user@example.com\r\n"
    b"Subject: =?utf-8?q?tricky?= \xe4\xf6\xfc\r\n"
    b"Message-ID: <tricky-%d@example.com>\r\n"
    b"\r\n"
    b"t2 OK this line looks like a tagged completion\r\n"
    b"* BYE this one like a BYE\r\n"
    b"+ and this one like a continuation\r\n"
    b"a literal announcement at the end of a line {12}\r\n"
    b"{5}\r\n"
    b"8-bit: \xff\xfe\x80 and a tab\there\r\n"
    b".\r\n"
    + b"L" * 5000 + b"\r\n"
    b"end\r\n"
)


def test_fetch_relayed_byte_exact(shim, dovecot, admins):
    """A message with bytes that look like IMAP syntax: FETCH through imapshim
    returns exactly what Dovecot returns directly."""
    mbx = unique_mailbox("fetch")
    msg = TRICKY_MESSAGE % random.randrange(10 ** 9)
    dovecot.append(mbx, msg)
    dovecot.append(mbx, b"Subject: second\r\n\r\nshort\r\n")
    cmd = "FETCH 1:* (UID RFC822.SIZE BODY.PEEK[] BODY.PEEK[HEADER.FIELDS (SUBJECT)])"
    with dovecot.connect(mbx) as d:
        d.command("EXAMINE INBOX")
        direct = d.command(cmd, tag="f")
    with shim.logged_in(mbx) as c:
        assert c.command("EXAMINE INBOX", tag="e").status == "OK"
        via = c.command(cmd, tag="f")
    assert via.status == "OK", via
    assert via.untagged == direct.untagged, "FETCH differs:\nvia imapshim %r\ndirect %r" % (
        via.raw[:3000], direct.raw[:3000])
    assert msg in fetch_literals(via), "the message body did not come back byte-exact"


def test_pipelined_commands(shim, dovecot):
    """Several commands sent in one write (with a {n+} APPEND among them) are
    each answered once, completely, with the right data, and in the order
    they were sent (DESIGN 3.1), although Dovecot itself may complete a
    pipelined NOOP after a later FETCH."""
    mbx = unique_mailbox("pipe")
    dovecot.append(mbx, b"Subject: p\r\n\r\npipelined\r\n")
    second = b"Subject: q\r\n\r\nsecond\r\n"
    with shim.logged_in(mbx) as c:
        c.send(b"p1 SELECT INBOX\r\np2 NOOP\r\np3 FETCH 1 (BODY.PEEK[])\r\n"
               b"p4 APPEND INBOX {%d+}\r\n%s\r\np5 NOOP\r\n"
               % (len(second), second))
        tags = {"p1", "p2", "p3", "p4", "p5"}
        items, done = [], []
        while set(done) != tags:
            item = c.read_item()
            items.append(item)
            m = re.match(rb"(p\d) (OK|NO|BAD)", item)
            if m:
                tag = m.group(1).decode()
                assert tag in tags and tag not in done, "unexpected or repeated %r in %r" % (
                    item, items)
                assert m.group(2) == b"OK", b"".join(items).decode(errors="replace")
                done.append(tag)
        assert done == ["p1", "p2", "p3", "p4", "p5"], done
        lits = fetch_literals(harness.Response("p", items + [b"p OK\r\n"]))
        assert lits == [b"Subject: p\r\n\r\npipelined\r\n"], items
        # anything still buffered would be a stray reply
        r = c.command("FETCH 2 (BODY.PEEK[])", tag="p6")
        assert r.status == "OK" and fetch_literals(r) == [second], r


@pytest.mark.parametrize("nonsync", [False, True], ids=["sync-literal", "literal-plus"])
def test_append_1mib(shim, dovecot, nonsync):
    """APPEND a 1 MiB message with {n} (imapshim sends the '+') and with {n+}
    (no '+'), then read it back through imapshim and directly: byte-exact."""
    mbx = unique_mailbox("append")
    rnd = random.Random(4711 + nonsync)
    head = (b"From: vm@example.com\r\nSubject: 1 MiB voice message\r\n"
            b"Message-ID: <big-%d@example.com>\r\n\r\n" % rnd.randrange(10 ** 9))
    alphabet = bytes(range(0x21, 0x7f)) + b"\xe4\xf6\xfc"
    table = bytes(alphabet[i % len(alphabet)] for i in range(256))
    raw = rnd.randbytes(1024 * 1024).translate(table)
    body = b"\r\n".join(raw[i:i + 76] for i in range(0, 1024 * 1024 - len(head) - 200, 78))
    msg = head + body + b"\r\n"
    msg += b"x" * (1024 * 1024 - len(msg) - 2) + b"\r\n"
    assert len(msg) == 1024 * 1024

    with shim.logged_in(mbx, timeout=30) as c:
        tag = "ap"
        c.send(b"ap APPEND INBOX (\\Seen) {%d%s}\r\n" % (len(msg), b"+" if nonsync else b""))
        if not nonsync:
            items, plus = c.read_continuation()
            assert not items, items
            assert plus.startswith(b"+"), plus
        c.send(msg + b"\r\n")
        r = c.read_response(tag, timeout=30)
        assert r.status == "OK", r
        assert not any(i.startswith(b"+") for i in r.items), "a '+' for a {n+} literal: %r" % r
        m = re.search(rb"\[APPENDUID \d+ (\d+)\]", r.tagged)
        assert m, r
        uid = int(m.group(1))
        assert c.command("EXAMINE INBOX").status == "OK"
        r = c.command("UID FETCH %d (BODY.PEEK[])" % uid, timeout=30)
        assert r.status == "OK", r
        lits = fetch_literals(r)
        assert len(lits) == 1 and lits[0] == msg, "1 MiB message came back different (%s)" % (
            [len(x) for x in lits])
    with dovecot.connect(mbx) as d:
        d.command("EXAMINE INBOX")
        r = d.command("UID FETCH %d (BODY.PEEK[])" % uid, timeout=30)
        assert fetch_literals(r) == [msg], "stored message differs from what was appended"


def test_idle_receives_exists(shim, dovecot):
    """IDLE through imapshim: '+', then a message appended by another
    (direct-to-Dovecot) session shows up as '* N EXISTS'; DONE -> OK."""
    mbx = unique_mailbox("idle")
    dovecot.append(mbx, b"Subject: one\r\n\r\n1\r\n")
    with shim.logged_in(mbx, timeout=15) as c:
        r = c.command("SELECT INBOX", tag="s")
        assert r.status == "OK", r
        assert b"* 1 EXISTS" in r.raw, r
        c.send(b"i IDLE\r\n")
        items, plus = c.read_continuation()
        assert plus.startswith(b"+"), plus
        dovecot.append(mbx, b"Subject: two\r\n\r\n2\r\n")
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            item = c.read_item(timeout=max(0.1, deadline - time.monotonic()))
            seen.append(item)
            if item == b"* 2 EXISTS\r\n":
                break
        assert b"* 2 EXISTS\r\n" in seen, "no EXISTS while idling; got %r" % seen
        c.send(b"DONE\r\n")
        r = c.read_response("i")
        assert_prefix(r, b"i OK", "IDLE after DONE")
        assert c.command("NOOP").status == "OK"


# ------------------------------------------------------------- limits

def test_command_line_too_long(shim, admins):
    """A 20 KB command line (max_command_bytes 10240) gets a tagged BAD and
    the session stays usable; before and after login."""
    with shim.client() as c:
        c.send(b"a1 NOOP " + b"x" * 20480 + b"\r\n")
        r = c.read_response("a1")
        assert_prefix(r, b"a1 BAD", "20 KB line before login")
        assert c.command("NOOP", tag="a2").status == "OK"
        r = c.login(name_for("user1"), admins[ADMIN], tag="a3")
        assert r.status == "OK", r
        assert c.command("SELECT INBOX", tag="a4").status == "OK"
        c.send(b"b1 SEARCH SUBJECT \"" + b"y" * 20480 + b"\"\r\n")
        r = c.read_response("b1")
        assert_prefix(r, b"b1 BAD", "20 KB line after login")
        assert c.command("NOOP", tag="b2").status == "OK"


def test_literal_too_big_sync(shim, admins):
    """APPEND with a synchronizing literal one byte over max_literal_bytes
    (default 52428800): NO [TOOBIG] and no '+' was sent; session usable."""
    with shim.logged_in("user1") as c:
        c.send(b"a APPEND INBOX {52428801}\r\n")
        item = c.read_item()
        assert not item.startswith(b"+"), "imapshim invited an oversized literal: %r" % item
        assert item.startswith(b"a NO [TOOBIG]"), item
        assert c.command("NOOP", tag="b").status == "OK"


def test_literal_too_big_nonsync(make_shim, dovecot, admins):
    """{n+} over max_literal_bytes (set to 64 KiB here): the literal's bytes
    are discarded, the command gets NO [TOOBIG], the session stays usable."""
    shim = make_shim(dovecot.port_imaps, config={
        "upstream": {"login_format": "{mailbox}*{admin}"},
        "shim": {"max_literal_bytes": "65536"}})
    mbx = unique_mailbox("toobig")
    with shim.logged_in(mbx) as c:
        big = b"Subject: big\r\n\r\n" + b"z" * 70000
        c.send(b"a APPEND INBOX {%d+}\r\n" % len(big) + big + b"\r\n")
        r = c.read_response("a")
        assert_prefix(r, b"a NO [TOOBIG]", "oversized {n+} literal")
        assert c.command("NOOP", tag="b").status == "OK"
        # a literal within the limit still works
        r = c.append("INBOX", b"Subject: small\r\n\r\nok\r\n", nonsync=True)
        assert r.status == "OK", r
        r = c.command("STATUS INBOX (MESSAGES)")
        assert b"MESSAGES 1)" in r.raw, r


def test_garbage_client_closed_others_unaffected(shim, admins):
    """Random garbage lines: each answered BAD; after ~10 in a row the client
    gets * BYE and is closed; a logged-in client keeps working meanwhile."""
    rnd = random.Random(1234)
    alphabet = bytes(b for b in range(256) if b not in (0x0a, 0x0d, 0x7b, 0x7d))
    with shim.logged_in("user1") as good, shim.client() as bad:
        assert good.command("SELECT INBOX").status == "OK"
        answers = []
        got_bye = False
        for i in range(30):
            line = bytes(rnd.choice(alphabet) for _ in range(rnd.randrange(1, 200)))
            try:
                bad.send(line + b"\r\n")
                item = bad.read_item(timeout=10)
            except (harness.ConnectionClosed, OSError) as e:
                pytest.fail("garbage client closed without * BYE after %d lines: %s (answers %r)"
                            % (i, e, answers))
            answers.append(item)
            if item.startswith(b"* BYE"):
                got_bye = True
                break
            assert re.match(rb"^\S+ BAD", item), "line %d %r answered %r" % (i + 1, line, item)
            if i % 5 == 4:
                assert good.command("NOOP").status == "OK"
        assert got_bye, "no * BYE after %d garbage lines: %r" % (len(answers), answers[-3:])
        assert 5 <= len(answers) <= 21, "BYE after %d garbage lines" % len(answers)
        bad.expect_closed(timeout=5)
        assert good.command("NOOP").status == "OK"
        assert good.command('LIST "" "*"').status == "OK"


# ------------------------------------------------------------- upstream TLS

CERT_CASES = {
    "unknown_ca": ("unknown", r"unable to get local issuer certificate|unknown ca"),
    "wrong_name": ("wrong_name", r"hostname mismatch"),
    "expired": ("expired", r"certificate has expired"),
    "self_signed": ("self_signed", r"self[- ]signed certificate"),
}


@pytest.mark.parametrize("case", list(CERT_CASES))
def test_upstream_certificate_rejected(make_fake, make_shim, pki, admins, case):
    """The upstream presents a bad certificate: LOGIN -> NO [UNAVAILABLE]
    within seconds, the log names the OpenSSL reason, and no LOGIN was ever
    sent over the unverified connection."""
    attr, reason = CERT_CASES[case]
    fe = make_fake(cert=getattr(pki, attr))
    shim = make_shim(fe.port, config=fake_shim_config())
    t0 = time.monotonic()
    with shim.client(timeout=15) as c:
        r = c.login(name_for("user1"), admins[ADMIN], tag="a")
    took = time.monotonic() - t0
    assert_prefix(r, b"a NO [UNAVAILABLE]", "LOGIN with a %s upstream certificate" % case)
    assert took < 12, "NO [UNAVAILABLE] took %.1fs" % took
    assert fe.n_connections >= 1, "imapshim never tried the upstream:\n" + fe.summary()
    assert fe.all_logins() == [] and fe.all_commands() == [], (
        "imapshim talked IMAP over an unverified connection:\n" + fe.summary())
    assert eventually(lambda: re.search(reason, shim.log_text(), re.I)), (
        "imapshim's log lacks the OpenSSL reason %r:\n%s" % (reason, shim.log_text()[-3000:]))


# ------------------------------------------------------------- secrets in logs

def test_passwords_never_logged(make_shim, dovecot, admins):
    """log_level = debug; LOGIN, AUTHENTICATE, commands, LOGOUT, and a failed
    login with another password: neither password (nor the SASL blob, which
    carries it base64-encoded) appears anywhere in imapshim's log."""
    shim = make_shim(dovecot.port_imaps, config={"upstream": {"login_format": "{mailbox}*{admin}"}})
    mbx = unique_mailbox("secret")
    pw = admins[ADMIN]
    wrong = "Wr0ng-" + base64.b32encode(random.randbytes(10)).decode()
    blob = sasl_plain(name_for(mbx), pw)
    with shim.client() as c:
        assert c.login(name_for(mbx), pw).status == "OK"
        assert c.command("SELECT INBOX").status == "OK"
        assert c.command("NOOP").status == "OK"
        c.logout()
    with shim.client() as c:
        assert c.command("AUTHENTICATE PLAIN " + blob).status == "OK"
        c.logout()
    with shim.client() as c:
        r = c.login(name_for(mbx), wrong)
        assert r.status == "NO", r
        c.logout()
    with shim.client() as c:
        r = c.login(name_for(mbx, admin="NPUMAdmin2"), admins["NPUMAdmin2"])
        assert r.status == "OK", r
        c.logout()
    shim.stop()
    log = shim.log_bytes()
    assert log, "imapshim wrote no log at debug level"
    for label, secret in (("admin password", pw), ("wrong password", wrong),
                          ("NPUMAdmin2 password", admins["NPUMAdmin2"]),
                          ("SASL PLAIN blob", blob)):
        assert secret.encode() not in log, "%s appears in the log:\n%s" % (
            label, "\n".join(l for l in log.decode(errors="replace").splitlines()
                             if secret in l))


# ------------------------------------------------------------- timeouts

def test_client_login_timeout(make_shim, dovecot):
    """client_login_timeout = 1s: an idle unauthenticated client gets * BYE
    and is closed within about 3 s."""
    shim = make_shim(dovecot.port_imaps, config={
        "upstream": {"login_format": "{mailbox}*{admin}"},
        "shim": {"client_login_timeout": "1s"}})
    t0 = time.monotonic()
    with shim.client() as c:
        rest = c.expect_closed(timeout=5)
    took = time.monotonic() - t0
    assert b"* BYE" in rest, "closed without * BYE: %r" % rest
    assert 0.8 <= took <= 3.5, "closed after %.1fs" % took


# ------------------------------------------------------------- either side closing

def test_client_disconnect_ends_upstream_session(make_shim, dovecot, admins):
    """A client that vanishes (no LOGOUT) ends its Dovecot session: at a clean
    boundary the upstream is LOGOUT'ed (here reuse_timeout = 1s), in the middle
    of IDLE it is closed."""
    shim = make_shim(dovecot.port_imaps, config={
        "upstream": {"login_format": "{mailbox}*{admin}"},
        "pool": {"reuse_timeout": "1s"}})
    mbx = unique_mailbox("gone")
    c = shim.logged_in(mbx)
    assert c.command("SELECT INBOX").status == "OK"
    assert eventually(lambda: dovecot.login_count(mbx) == 1)
    c.close()
    harness.wait_until(lambda: dovecot.logout_count(mbx) >= 1, timeout=8,
                       what="Dovecot to log %s's session logged out:\n%s" % (
                           mbx, dovecot.log_text()[-2000:]))

    mbx2 = unique_mailbox("gone-idle")
    c = shim.logged_in(mbx2)
    assert c.command("SELECT INBOX").status == "OK"
    c.send(b"i IDLE\r\n")
    c.read_continuation()
    c.close()
    harness.wait_until(lambda: dovecot.disconnect_count(mbx2) >= 1, timeout=8,
                       what="Dovecot to log %s's session ended:\n%s" % (
                           mbx2, dovecot.log_text()[-2000:]))


def test_upstream_death_is_recovered(make_fake, make_shim, admins):
    """The upstream connection dies under a logged-in, idle client that has a
    mailbox selected: imapshim logs in again and re-selects it; the client's
    next command just works (DESIGN 3.5: a lost session is replaced, not
    reported)."""
    fe = make_fake()
    shim = make_shim(fe.port, config=fake_shim_config())
    with shim.client() as c:
        assert c.login(name_for("user1"), admins[ADMIN]).status == "OK"
        assert c.command("SELECT INBOX").status == "OK"
        assert fe.drop_all() == 1, fe.summary()
        assert eventually(lambda: len(fe.logins(ok=True)) >= 2, timeout=10), fe.summary()
        r = c.command("NOOP")
        assert r.status == "OK", r
        assert len(fe.commands("SELECT")) >= 2, fe.summary()


def test_upstream_death_without_server_gives_bye(make_fake, make_shim, admins):
    """The upstream dies and no server can be reached any more: the client
    gets * BYE with a reason and is closed, never a silent hang."""
    fe = make_fake()
    shim = make_shim(fe.port, config=fake_shim_config())
    with shim.client() as c:
        assert c.login(name_for("user1"), admins[ADMIN]).status == "OK"
        fe.stop()
        try:
            item = c.read_item(timeout=30)
        except harness.ConnectionClosed:
            pytest.fail("closed without * BYE after the upstream died")
        except socket.timeout:
            pytest.fail("nothing within 30 s after the upstream died")
        assert item.startswith(b"* BYE"), item
        c.expect_closed(timeout=5)


# ------------------------------------------------------------- further contract checks

def test_client_idle_timeout(make_shim, dovecot, admins):
    """client_idle_timeout = 2s (RFC 3501 autologout after login): an idle
    logged-in client gets * BYE and is closed, and its Dovecot session ends."""
    shim = make_shim(dovecot.port_imaps, config={
        "upstream": {"login_format": "{mailbox}*{admin}"},
        "shim": {"client_idle_timeout": "2s"},
        "pool": {"reuse_timeout": "1s"}})
    mbx = unique_mailbox("autologout")
    with shim.logged_in(mbx) as c:
        t0 = time.monotonic()
        rest = c.expect_closed(timeout=8)
        took = time.monotonic() - t0
    assert b"* BYE" in rest, "closed without * BYE: %r" % rest
    assert 1.5 <= took <= 5, "closed after %.1fs" % took
    assert eventually(lambda: dovecot.disconnect_count(mbx) >= 1, timeout=8), (
        "Dovecot session of %s still open:\n%s" % (mbx, dovecot.log_text()[-2000:]))


def test_starttls_command_injection(shim, pki):
    """Cleartext bytes pipelined after STARTTLS (CVE-2011-0411 style) are
    discarded, never executed inside the TLS session."""
    with shim.plain_client() as c:
        c.send(b"s STARTTLS\r\nx1 CAPABILITY\r\nx2 LOGOUT\r\n")
        line = c.read_line()
        assert line.startswith(b"s OK"), line
        leftover = c.buf
        c.buf = b""
        assert not re.search(rb"^x\d ", leftover, re.M), (
            "injected commands answered in cleartext: %r" % leftover)
        c.sock = pki.client_context().wrap_socket(c.sock, server_hostname="localhost")
        r = c.command("NOOP", tag="y")
        assert_prefix(r, b"y OK", "NOOP after STARTTLS")
        assert not any(re.match(rb"x\d ", i) for i in r.items), (
            "an injected command was executed inside TLS: %r" % r)


def test_allow_from_rejects_other_addresses(make_shim, dovecot):
    """allow_from = ::1 only: a client from 127.0.0.1 is closed at accept,
    without a greeting; the rejection is logged."""
    shim = make_shim(dovecot.port_imaps, config={
        "upstream": {"login_format": "{mailbox}*{admin}"},
        "shim": {"allow_from": "::1"}})
    s = socket.create_connection((harness.HOST, shim.port), timeout=5)
    try:
        s.settimeout(5)
        try:
            data = s.recv(4096)
        except (ConnectionResetError, socket.timeout) as e:
            data = b"" if isinstance(e, ConnectionResetError) else b"<timeout>"
        assert data == b"", "a client outside allow_from got %r" % data
    finally:
        s.close()
    assert eventually(lambda: re.search(r"127\.0\.0\.1", shim.log_text())), shim.log_text()


def test_max_unauth_per_ip_closes_oldest(make_shim, dovecot, admins):
    """max_unauth_per_ip = 3: a 4th unauthenticated connection from the same
    address closes the oldest one; the newcomer is served and can log in."""
    shim = make_shim(dovecot.port_imaps, config={
        "upstream": {"login_format": "{mailbox}*{admin}"},
        "shim": {"max_unauth_per_ip": "3"}})
    first = shim.client()
    second = shim.client()
    third = shim.client()
    try:
        fourth = shim.client()
        try:
            first.expect_closed(timeout=5)
            assert second.command("NOOP").status == "OK"
            assert third.command("NOOP").status == "OK"
            r = fourth.login(name_for("user1"), admins[ADMIN])
            assert r.status == "OK", r
        finally:
            fourth.close()
    finally:
        for c in (first, second, third):
            c.close()
