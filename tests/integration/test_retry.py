"""
End-to-end tests of imapshim's retries and failover (DESIGN.md 3.2, 3.5,
3.7 [retry]; reference exchange-imap-facts.md 0, 1.3, 1.6, 1.8), against one
to three fake_exchange servers (each FakeExchange is one CAS) that inject
Exchange's failures per server and per mailbox, and record every
connection, TLS outcome, LOGIN (with its admin account) and command.

  servers    connect refused, certificate failures (expired, wrong name,
             unknown CA), TLS alerts and aborted handshakes, plaintext
             "* BYE Connection is closed. 14" on the TLS port, a
             "* BYE Connection is closed. 10" greeting: the client's LOGIN
             succeeds on the next server, with backoff and jitter; a server
             failing server_fail_threshold times in a row is down for
             server_cooldown, then probed; every server failing gives
             NO [UNAVAILABLE] with a plain reason.  A bad certificate never
             leads to an unverified retry.
  transient  NO LOGIN failed., NO Server Unavailable. 15, OK-then-BAD "User
             is authenticated but not connected.": login_attempts tries,
             each on a fresh connection, another server and admin account
             where possible; never two failed LOGINs on one connection.
  final      [AUTHENTICATIONFAILED] or a refusal by every admin account:
             NO [AUTHENTICATIONFAILED], and the negative cache answers the
             next LOGIN of that mailbox without going upstream.
  lockout    a wrong admin password is quarantined; with every password
             wrong, 50 looping clients cause a bounded number of LOGINs.
  lost       an upstream dying mid-command: read-only commands re-run,
             STORE answered NO [UNAVAILABLE], APPEND exactly once at both
             drop points (stored-but-unanswered, and mid-literal).
  metrics    imapshim_login_retries_total{reason} counts each reason.

Timings are short (backoff 50 ms .. 500 ms, cooldown 2 s) so the module runs
in a few minutes even under AddressSanitizer.
"""

import base64
import hashlib
import re
import threading
import time
import urllib.request

import pytest

import harness
from harness import fetch_literals

ADMIN1, ADMIN2 = "NPUMAdmin1", "NPUMAdmin2"
BACKOFF_INITIAL_MS = 50
BACKOFF_MAX_MS = 500
FAIL_THRESHOLD = 3
COOLDOWN_S = 2.0
# The shortest gap a first-retry backoff may leave between two connections
# the fakes saw: jitter draws from [initial/2, initial], the fakes stamp
# connections from their own threads, and imapshim's timers count from the
# time its loop woke, so a gap may come out a fraction of a millisecond
# under the backoff logged.
MIN_BACKOFF_GAP_S = BACKOFF_INITIAL_MS / 2 / 1000.0 * 0.9

# reason label -> a test that made imapshim count it (test_metrics_cover_all_reasons)
SEEN_REASONS = {}
# every first-retry backoff imapshim logged (jitter check)
BACKOFFS = []


# ------------------------------------------------------------------ helpers

def retry_config(servers, status_port, pool=None, retry=None, upstream=None, shim=None):
    """imapshim config for fake_exchange servers (list of "host:port")."""
    cfg = {
        "shim": {"status_listen": "127.0.0.1:%d" % status_port},
        "upstream": {"servers": ", ".join(servers),
                     "login_format": "{domain}/{admin}/{mailbox}",
                     "connect_timeout": "2s", "login_timeout": "4s",
                     "command_timeout": "20s"},
        "pool": {"mode": "session", "queue_timeout": "8s", "session_budget": "64",
                 "reuse_timeout": "60s", "login_rate": "1000", "login_burst": "1000"},
        "retry": {"login_attempts": "3",
                  "backoff_initial": "%dms" % BACKOFF_INITIAL_MS,
                  "backoff_max": "%dms" % BACKOFF_MAX_MS,
                  "server_fail_threshold": str(FAIL_THRESHOLD),
                  "server_cooldown": "%ds" % COOLDOWN_S,
                  "admin_cooldown": "5m",
                  "negative_cache_ttl": "30s"},
    }
    for sect, kv in (("pool", pool), ("retry", retry), ("upstream", upstream),
                     ("shim", shim)):
        cfg[sect].update(kv or {})
    return cfg


def ep(port):
    return "127.0.0.1:%d" % port


@pytest.fixture
def env(make_fake, make_shim):
    """env(servers=[...], **config) -> imapshim started with status_listen;
    servers: FakeExchange objects or plain ports (closed ones)."""
    def setup(servers, admins=None, **kw):
        eps = [ep(s if isinstance(s, int) else s.port) for s in servers]
        status_port = harness.free_port()
        first = servers[0] if isinstance(servers[0], int) else servers[0].port
        shim = make_shim(first, config=retry_config(eps, status_port, **kw), admins=admins)
        shim.status_port = status_port
        harness.wait_port(status_port, proc=shim.proc, what="imapshim status endpoint")
        return shim
    return setup


def login_name(mailbox, admin=ADMIN1):
    return "example.com/%s/%s" % (admin, mailbox)


def log_lines(shim, event, **fields):
    """Log lines of `event` whose key=value fields match (values as regex)."""
    out = []
    for line in shim.log_text(this_run=True).splitlines():
        if not re.search(r"\bevent=%s\b" % re.escape(event), line):
            continue
        if all(re.search(r"\b%s=%s(\s|$)" % (k, v), line) for k, v in fields.items()):
            out.append(line)
    return out


def eventually(pred, timeout=5.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def metrics(shim):
    """{(name, frozenset(labels.items())): value} from /metrics."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % shim.status_port,
                                timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), frozenset(labels.items()))] = float(m.group(3))
    return out


def metric(shim, name, **labels):
    return metrics(shim).get((name, frozenset(labels.items())))


def retries(shim):
    """imapshim_login_retries_total by reason."""
    return {dict(k[1]).get("reason"): v for k, v in metrics(shim).items()
            if k[0] == "imapshim_login_retries_total"}


def note_reasons(shim, test):
    for reason, v in retries(shim).items():
        if v > 0:
            SEEN_REASONS.setdefault(reason, test)


def server_up(shim, port):
    return metric(shim, "imapshim_server_up", server=ep(port))


def login(shim, mailbox, admins, admin=ADMIN1, timeout=20):
    """(client, Response, seconds) for a LOGIN of mailbox through imapshim."""
    c = shim.client(timeout=timeout)
    t0 = time.monotonic()
    r = c.login(login_name(mailbox, admin), admins[admin], tag="L")
    return c, r, time.monotonic() - t0


def login_ok(shim, mailbox, admins, admin=ADMIN1, fes=()):
    c, r, took = login(shim, mailbox, admins, admin)
    c.close()
    assert r.status == "OK", "LOGIN of %s answered %r after %.2fs\n%s" % (
        mailbox, r.raw, took, "\n".join(fe.summary() for fe in fes))
    return took


def voice_message(tag, size=60 * 1024):
    """A NuPoint-like voice message: MIME with a base64 WAV of about `size`
    bytes, and a unique Message-ID.  Returns (bytes, message_id)."""
    msgid = "<%s.%d@nupoint.example.com>" % (tag, int(time.time() * 1000))
    audio = hashlib.sha256(tag.encode()).digest() * (size * 3 // 4 // 32 + 1)
    b64 = base64.encodebytes(audio[:size * 3 // 4]).replace(b"\n", b"\r\n")
    head = ("From: \"NuPoint Voice Mail\" <voicemail@example.com>\r\n"
            "To: %s@example.com\r\n"
            "Subject: Voice message from 5551234 (0:42)\r\n"
            "Message-ID: %s\r\n"
            "Date: Thu, 01 Jan 2026 12:00:00 +0000\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"np-boundary\"\r\n"
            "\r\n"
            "--np-boundary\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
            "You have a new voice message.\r\n"
            "--np-boundary\r\n"
            "Content-Type: audio/wav; name=\"msg.wav\"\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n" % (tag, msgid)).encode()
    return head + b64 + b"--np-boundary--\r\n", msgid


# ------------------------------------------------------------ server failures

SERVER_FAULTS = {
    # kind: (fake kwargs builder, upstream_fail log text, retries reason)
    "refused": (None, r"(?i)refused", "connect"),
    "expired": (lambda pki: {"cert": pki.expired}, r"certificate has expired", "certificate"),
    "wrong_name": (lambda pki: {"cert": pki.wrong_name}, r"hostname mismatch", "certificate"),
    "unknown_ca": (lambda pki: {"cert": pki.unknown},
                   r"unable to get local issuer certificate|unknown ca", "certificate"),
    "tls_alert": (lambda pki: {"script": {"on_connect": fx().tls_alert()}},
                  r"(?i)alert|handshake", "tls"),
    "tls_abort": (lambda pki: {"script": {"on_connect": fx().tls_abort()}},
                  r"(?i)eof|closed|handshake|tls", "tls"),
    "bye14_plaintext": (lambda pki: {"script": {"on_connect": fx().bye_plaintext()}},
                        r"event 1102", "certificate"),
    "bye10_greeting": (lambda pki: {"script": {"greeting": fx().bye_greeting()}},
                       r"Connection is closed\. 10", "greeting"),
}
CERT_KINDS = ("expired", "wrong_name", "unknown_ca")


def fx():
    import fake_exchange
    return fake_exchange


@pytest.mark.parametrize("kind", list(SERVER_FAULTS))
def test_server_failover(env, make_fake, pki, admins, kind):
    """servers = bad, good.  Each client LOGIN first meets the bad server,
    then succeeds on the good one after a jittered backoff; after
    server_fail_threshold (3) failures in a row the bad server is marked
    down (log, imapshim_server_up 0) and skipped; after server_cooldown it
    is probed once, and once it works again it is used again (first in the
    list) and shown up.  Certificate failures: the bad server never gets an
    IMAP command; the log names the server and OpenSSL's reason."""
    build, reason_re, metric_reason = SERVER_FAULTS[kind]
    good = make_fake()
    if build is None:
        bad, bad_port = None, harness.free_port()
    else:
        bad = make_fake(**build(pki))
        bad_port = bad.port
    shim = env([bad_port if bad is None else bad, good])
    fes = [f for f in (bad, good) if f]

    assert server_up(shim, bad_port) == 1 and server_up(shim, good.port) == 1

    # 1. Three clients: each meets the bad server once, then the good one.
    for i in range(1, FAIL_THRESHOLD + 1):
        mbx = "fo-%s-%d" % (kind, i)
        login_ok(shim, mbx, admins, fes=fes)
        ok = good.logins(ok=True, mailbox=mbx)
        assert len(ok) == 1, good.summary()
        if bad is not None:
            assert bad.n_connections == i, (
                "client %d: the bad server should have seen %d connections\n%s"
                % (i, i, bad.summary()))
            # the backoff lies between the failure and the next try
            gap = good.connections_of(mbx)[0].opened - bad.connections[i - 1].opened
            assert gap >= MIN_BACKOFF_GAP_S, (
                "next server tried %.3fs after the failed one (backoff >= %dms)"
                % (gap, BACKOFF_INITIAL_MS // 2))
    retry_lines = log_lines(shim, "pool_retry", server=re.escape(ep(bad_port)), **{"class": "server"})
    assert len(retry_lines) == FAIL_THRESHOLD, "\n".join(retry_lines) or shim.log_text()[-3000:]
    backoffs = [int(re.search(r"backoff_ms=(\d+)", l).group(1)) for l in retry_lines]
    # attempt 1's backoff: backoff_initial with jitter in [initial/2, initial]
    assert all(BACKOFF_INITIAL_MS // 2 <= b <= BACKOFF_INITIAL_MS for b in backoffs), backoffs
    BACKOFFS.extend(backoffs)

    # 2. Marked down after the threshold, with a warning naming it.
    down = eventually(lambda: log_lines(shim, "retry_server_down",
                                        server=re.escape(ep(bad_port))))
    assert down, "no retry_server_down for %s:\n%s" % (ep(bad_port), shim.log_text()[-3000:])
    t_down = time.monotonic()
    assert "level=warn" in down[0] or "warn" in down[0].lower(), down[0]
    assert server_up(shim, bad_port) == 0, metrics(shim)
    assert server_up(shim, good.port) == 1

    # 3. During the cooldown: logins go straight to the good server.
    before = bad.n_connections if bad else None
    for i in range(2):
        mbx = "fo-%s-cool-%d" % (kind, i)
        login_ok(shim, mbx, admins, fes=fes)
        assert len(good.logins(ok=True, mailbox=mbx)) == 1
    if bad is not None:
        assert bad.n_connections == before, (
            "a server marked down was tried during its cooldown\n" + bad.summary())
    assert len(log_lines(shim, "pool_retry", server=re.escape(ep(bad_port)))) == FAIL_THRESHOLD

    # Certificate and TLS failures: never an unverified retry (no IMAP
    # command reached the bad server); the log names server and reason.
    if bad is not None and kind != "bye10_greeting":
        assert bad.all_commands() == [] and bad.all_logins() == [], (
            "imapshim talked IMAP to a server whose TLS failed:\n" + bad.summary())
    fails = log_lines(shim, "upstream_fail", server=re.escape(ep(bad_port)))
    assert len(fails) == FAIL_THRESHOLD, "\n".join(fails) or shim.log_text()[-3000:]
    assert all(re.search(reason_re, l) for l in fails), (
        "upstream_fail lines lack the reason %r:\n%s" % (reason_re, "\n".join(fails)))

    r = retries(shim)
    assert r.get(metric_reason, 0) >= FAIL_THRESHOLD, (
        "imapshim_login_retries_total{reason=%r} after %d failures: %r"
        % (metric_reason, FAIL_THRESHOLD, r))
    note_reasons(shim, "test_server_failover[%s]" % kind)


def test_server_down_probed_after_cooldown(env, make_fake, pki, admins):
    """servers = bad (TLS fatal alert), good.  Once the bad server is down
    (3 failures), it is probed after server_cooldown (DESIGN 3.5 "... marks
    the server down for server_cooldown, then probes it") by one connection;
    a failed probe keeps it down for another cooldown; once repaired, the
    probe succeeds, imapshim_server_up shows 1 again and, being first in
    `servers`, it serves the next logins."""
    bad = make_fake(script={"on_connect": fx().tls_alert()})
    good = make_fake()
    shim = env([bad, good])
    fes = [bad, good]
    for i in range(FAIL_THRESHOLD):
        login_ok(shim, "pr-%d" % i, admins, fes=fes)
    assert eventually(lambda: log_lines(shim, "retry_server_down", server=re.escape(ep(bad.port))))
    t_down = time.monotonic()
    assert bad.n_connections == FAIL_THRESHOLD, bad.summary()
    assert server_up(shim, bad.port) == 0

    # After the cooldown: clients keep logging in; the down server must be
    # probed (exactly one connection), fail again, stay down.
    time.sleep(max(0.0, t_down + COOLDOWN_S + 0.3 - time.monotonic()))
    for i in range(3):
        login_ok(shim, "pr-probe-%d" % i, admins, fes=fes)
    probed = eventually(lambda: log_lines(shim, "retry_server_probe",
                                          server=re.escape(ep(bad.port))), timeout=2)
    assert probed and bad.n_connections == FAIL_THRESHOLD + 1, (
        "server %s was down for server_cooldown (%ss) and then never probed although "
        "clients kept logging in (it got %d connections, expected %d); "
        "imapshim_server_up stays %r\n%s" % (
            ep(bad.port), COOLDOWN_S, bad.n_connections, FAIL_THRESHOLD + 1,
            server_up(shim, bad.port), bad.summary()))
    assert server_up(shim, bad.port) == 0

    # Repaired: after the next cooldown a probe succeeds (whether a client's
    # login is the probe or not), the server is up again and, first in
    # `servers`, serves the next login.
    bad.script.clear()
    time.sleep(COOLDOWN_S + 0.3)
    for i in range(3):
        login_ok(shim, "pr-back-%d" % i, admins, fes=fes)
        if eventually(lambda: server_up(shim, bad.port) == 1, timeout=1):
            break
    assert server_up(shim, bad.port) == 1, (metrics(shim), bad.summary())
    assert log_lines(shim, "retry_server_up", server=re.escape(ep(bad.port)))
    login_ok(shim, "pr-back-last", admins, fes=fes)
    assert len(bad.logins(ok=True, mailbox="pr-back-last")) == 1, (
        "a repaired first server should serve new logins\n%s\n%s"
        % (bad.summary(), good.summary()))


def test_every_server_failed(env, make_fake, pki, admins):
    """servers = closed port, expired certificate, plaintext BYE 14: the
    client's LOGIN gets NO [UNAVAILABLE] with a plain one-line reason as soon
    as each server failed once (well before queue_timeout); each server was
    tried exactly once, the TLS ones without any IMAP command.  After
    server_fail_threshold such rounds every server is down: the next LOGIN
    is answered at once without touching any server."""
    closed = harness.free_port()
    expired = make_fake(cert=pki.expired)
    nocert = make_fake(script={"on_connect": fx().bye_plaintext()})
    shim = env([closed, expired, nocert])
    fes = [expired, nocert]
    for i in range(1, FAIL_THRESHOLD + 1):
        c, r, took = login(shim, "all-%d" % i, admins)
        c.close()
        assert r.tagged.startswith(b"L NO [UNAVAILABLE] "), r
        text = r.tagged.decode()
        assert text.endswith("\r\n") and "\r" not in text[:-2] and "\n" not in text[:-2]
        assert len(text) < 800, text
        assert took < 5.0, "NO [UNAVAILABLE] after %.1fs (queue_timeout 8s)" % took
        assert expired.n_connections == i and nocert.n_connections == i, (
            "round %d: each server should have been tried once\n%s\n%s"
            % (i, expired.summary(), nocert.summary()))
        # one round: closed -> expired -> nocert, each after a backoff
        t_exp = expired.connections[i - 1].opened
        t_bye = nocert.connections[i - 1].opened
        assert t_bye - t_exp >= MIN_BACKOFF_GAP_S, (t_exp, t_bye)
    assert expired.all_commands() == [] and nocert.all_commands() == [], (
        "IMAP spoken over a failed TLS connection\n%s\n%s"
        % (expired.summary(), nocert.summary()))
    # the log names each server and its reason
    for port, why in ((closed, r"refused"), (expired.port, r"certificate has expired"),
                      (nocert.port, r"event 1102")):
        lines = log_lines(shim, "upstream_fail", server=re.escape(ep(port)))
        assert len(lines) == FAIL_THRESHOLD and all(re.search(why, l) for l in lines), (
            "%s: %r" % (ep(port), lines))
    for port in (closed, expired.port, nocert.port):
        assert eventually(lambda: server_up(shim, port) == 0), metrics(shim)
    # every server down: answered at once, no server touched
    c, r, took = login(shim, "all-down", admins)
    c.close()
    assert r.tagged.startswith(b"L NO [UNAVAILABLE] "), r
    assert took < 1.5, took
    assert expired.n_connections == FAIL_THRESHOLD and nocert.n_connections == FAIL_THRESHOLD, (
        "a server in its cooldown was tried\n%s\n%s" % (expired.summary(), nocert.summary()))
    note_reasons(shim, "test_every_server_failed")


def test_queue_timeout_while_server_hangs(env, make_fake, admins):
    """The only server accepts, greets and then never answers LOGIN
    (login_timeout 10 s): the client gets NO [UNAVAILABLE] when its
    queue_timeout (2 s) has passed, not later, and not before."""
    fe = make_fake(script={"on_login": lambda conn, u, p: "stall"})
    shim = env([fe], pool={"queue_timeout": "2s"}, upstream={"login_timeout": "10s"})
    c, r, took = login(shim, "hang", admins)
    c.close()
    assert r.tagged.startswith(b"L NO [UNAVAILABLE] "), r
    assert 1.8 <= took <= 4.0, "answered after %.2fs (queue_timeout 2s)" % took
    assert len(fe.logins(mailbox="hang")) >= 1, fe.summary()


# ------------------------------------------------------------ transient refusals

TRANSIENT = {
    "login_failed": lambda k: {"on_login": fx().fail_logins(k, "NO LOGIN failed.")},
    "server_unavailable": lambda k: {"on_login": fx().fail_logins(k, "NO Server Unavailable. 15")},
    "not_connected": lambda k: fx().authenticated_not_connected(k),
}


def upstream_attempts(fes, mailbox):
    """[(t, server_index, conn, LoginRecord)] of LOGINs of mailbox, in order."""
    out = []
    for i, fe in enumerate(fes):
        for rec in fe.logins(mailbox=mailbox):
            conn = next(c for c in fe.connections if c.id == rec.conn_id)
            out.append((rec.t, i, conn, rec))
    out.sort(key=lambda x: x[0])
    return out


def failed_attempt(conn, rec):
    """A LOGIN that failed, counting OK-then-BAD "not connected" ones."""
    return not rec.ok or conn.not_connected


def assert_one_failure_per_connection(fes):
    for fe in fes:
        for conn in fe.connections:
            bad = [l for l in conn.logins if not l[3].startswith("OK")]
            assert len(bad) <= 1, "%d failed LOGINs on one upstream connection\n%s" % (
                len(bad), fe.summary())
            assert len(conn.logins) <= 1 or not bad, fe.summary()
            assert conn.failed_commands < 10, fe.summary()


# Exchange itself sends no RFC 5530 codes, but the default
# transient_login_patterns list "[UNAVAILABLE]" (DESIGN 3.7): a server that
# does send it must be retried too.
TRANSIENT_RETRIED = dict(TRANSIENT, unavailable_code=lambda k: {
    "on_login": fx().fail_logins(k, "NO [UNAVAILABLE] Backend is busy, try again.")})


@pytest.mark.parametrize("case", list(TRANSIENT_RETRIED))
def test_transient_login_retried(env, make_fake, admins, case):
    """servers A, B sharing one fault: the first 2 LOGINs fail with a
    transient text.  With login_attempts = 3 the client gets OK; upstream
    saw exactly 3 LOGINs, each on a fresh connection, alternating servers
    (A, B, A) and changing admin account between the first two, with a
    growing backoff between them; the session the client got works."""
    hooks = TRANSIENT_RETRIED[case](2)
    a = make_fake(script=dict(hooks))
    b = make_fake(script=dict(hooks))
    shim = env([a, b])
    mbx = "tr-%s" % case
    c, r, took = login(shim, mbx, admins)
    try:
        assert r.status == "OK", "LOGIN answered %r\n%s\n%s" % (r.raw, a.summary(), b.summary())
        att = upstream_attempts([a, b], mbx)
        assert len(att) == 3, "expected 3 upstream LOGINs, got %r\n%s\n%s" % (
            [x[3] for x in att], a.summary(), b.summary())
        assert [failed_attempt(x[2], x[3]) for x in att] == [True, True, False], att
        assert [x[1] for x in att] == [0, 1, 0], (
            "retries should go to another server: servers used %r" % [x[1] for x in att])
        assert len({(x[1], x[2].id) for x in att}) == 3, "a LOGIN reused a connection"
        admins_used = [x[3].admin for x in att]
        assert admins_used[0] != admins_used[1], (
            "the retry should use another admin account: %r" % admins_used)
        gaps = [att[i + 1][0] - att[i][0] for i in range(2)]
        assert gaps[0] >= MIN_BACKOFF_GAP_S, gaps
        assert gaps[1] >= 2 * MIN_BACKOFF_GAP_S, gaps   # attempt 2: [initial, 2 x initial]
        assert_one_failure_per_connection([a, b])
        # the client's session is the good one
        r = c.command("SELECT INBOX", tag="S")
        assert r.status == "OK", r
        good_conn = att[2][2]
        assert any(command_is(cmd, b"SELECT") for _, cmd in good_conn.commands), (
            "SELECT did not go to the connection that logged in\n" + a.summary())
    finally:
        c.close()
    lines = log_lines(shim, "pool_retry", mailbox=re.escape(mbx), **{"class": "login"})
    assert len(lines) == 2, "\n".join(lines)
    BACKOFFS.extend(int(re.search(r"backoff_ms=(\d+)", l).group(1))
                    for l in lines if "attempt=1 " in l)
    assert retries(shim).get("login_transient", 0) >= 2, retries(shim)
    note_reasons(shim, "test_transient_login_retried[%s]" % case)


def command_is(cmd, name):
    toks = cmd.split(None, 2)
    return len(toks) >= 2 and toks[1].upper() == name


@pytest.mark.parametrize("case", list(TRANSIENT))
def test_transient_login_exhausted(env, make_fake, admins, case):
    """Every LOGIN fails transiently: the client gets NO [UNAVAILABLE] after
    exactly login_attempts (3) upstream LOGINs, each on its own connection;
    no connection ever carries two failed LOGINs (Exchange's 4th-failure
    BYE and 10th-NO disconnect are never reached)."""
    hooks = TRANSIENT[case](None)
    a = make_fake(script=dict(hooks))
    b = make_fake(script=dict(hooks))
    shim = env([a, b])
    mbx = "tx-%s" % case
    c, r, took = login(shim, mbx, admins)
    c.close()
    assert r.tagged.startswith(b"L NO [UNAVAILABLE] "), r
    att = upstream_attempts([a, b], mbx)
    assert len(att) == 3, "expected login_attempts = 3 LOGINs, got %d\n%s\n%s" % (
        len(att), a.summary(), b.summary())
    assert all(failed_attempt(x[2], x[3]) for x in att)
    assert len({(x[1], x[2].id) for x in att}) == 3
    assert_one_failure_per_connection([a, b])
    assert took < 5.0, took
    # a second client does the same, no more
    c, r, _ = login(shim, mbx + "-2", admins)
    c.close()
    assert r.tagged.startswith(b"L NO [UNAVAILABLE] "), r
    assert len(upstream_attempts([a, b], mbx + "-2")) == 3
    assert_one_failure_per_connection([a, b])
    note_reasons(shim, "test_transient_login_exhausted[%s]" % case)


# ------------------------------------------------------------ final refusals

FINAL_TEXTS = {
    "authenticationfailed": "NO [AUTHENTICATIONFAILED] Invalid credentials.",
    # Dovecot's wording: the code must win over the "LOGIN failed" pattern
    "authenticationfailed_login_failed": "NO [AUTHENTICATIONFAILED] LOGIN failed.",
    "no_such_mailbox": "NO no such mailbox",
}


@pytest.mark.parametrize("case", list(FINAL_TEXTS))
def test_final_refusal_and_negative_cache(env, make_fake, admins, case):
    """Mailbox M is refused with a non-transient text by every admin
    account: the client gets NO [AUTHENTICATIONFAILED] after one LOGIN per
    admin account (never more); a second LOGIN of M within
    negative_cache_ttl is answered the same without any upstream attempt
    or connection; another mailbox still logs in."""
    mbx = "fin-%s" % case
    fe = make_fake(script={"on_login": fx().fail_logins(None, FINAL_TEXTS[case], mailbox=mbx)})
    shim = env([fe])
    c, r, took = login(shim, mbx, admins)
    c.close()
    assert r.tagged.startswith(b"L NO [AUTHENTICATIONFAILED] "), r
    att = fe.logins(mailbox=mbx)
    assert sorted(x.admin for x in att) == sorted([ADMIN1, ADMIN2]), (
        "expected one LOGIN per admin account, got %r\n%s" % (att, fe.summary()))
    assert_one_failure_per_connection([fe])
    n_conn, n_login = fe.n_connections, len(fe.logins())

    c, r, took = login(shim, mbx, admins, admin=ADMIN2)
    c.close()
    assert r.tagged.startswith(b"L NO [AUTHENTICATIONFAILED] "), r
    assert fe.n_connections == n_conn and len(fe.logins()) == n_login, (
        "a LOGIN of a mailbox refused %s ago went upstream again\n%s"
        % ("moments", fe.summary()))
    assert log_lines(shim, "pool_negcache_hit", mailbox=re.escape(mbx)), shim.log_text()[-2000:]
    login_ok(shim, "fin-other", admins, fes=[fe])
    assert retries(shim).get("login_refused", 0) >= 1, retries(shim)
    note_reasons(shim, "test_final_refusal_and_negative_cache[%s]" % case)


# ------------------------------------------------------------ lockout guard

def test_wrong_admin_password_quarantined(env, make_fake, admins):
    """The ini has a wrong password for NPUMAdmin2 (Exchange has the right
    one), NPUMAdmin1's is right.  Ten clients log in one after another: all
    get OK; NPUMAdmin2 fails at most RETRY_ADMIN_QUARANTINE_FAILS (3,
    retry.h) times, then is quarantined for admin_cooldown with one warning
    naming it, and every later login goes to NPUMAdmin1."""
    ini_admins = dict(admins)
    ini_admins[ADMIN2] = "wrong-" + admins[ADMIN2]
    fe = make_fake()          # knows the right passwords
    shim = env([fe], admins=ini_admins)
    for i in range(10):
        login_ok(shim, "lk-%d" % i, ini_admins, fes=[fe])
    bad = fe.logins(admin=ADMIN2)
    assert all(not r.ok for r in bad), bad
    assert 1 <= len(bad) <= 3, (
        "NPUMAdmin2 (wrong password) tried %d times; quarantine should stop it after 3\n%s"
        % (len(bad), fe.summary()))
    q = log_lines(shim, "retry_admin_quarantined", admin=ADMIN2)
    assert len(q) == 1, "expected one quarantine warning for %s, got %r" % (ADMIN2, q)
    assert "level=warn" in q[0], q[0]
    assert not log_lines(shim, "retry_admin_quarantined", admin=ADMIN1)
    last_bad = max(r.t for r in bad)
    later = [r for r in fe.logins() if r.t > last_bad]
    assert later and all(r.admin == ADMIN1 and r.ok for r in later), later
    assert len(fe.logins(ok=True, admin=ADMIN1)) == 10
    assert_one_failure_per_connection([fe])


def test_all_admin_passwords_wrong_bounded(env, make_fake, admins):
    """Both admin passwords in the ini are wrong; 50 clients keep retrying
    LOGIN for 20 s.  The bound, from src/retry.c: once max(RETRY_SLOW_AFTER
    = 3, number of admins = 2) = 3 logins in a row failed, each failure sets
    the earliest next login to failure + backoff(k), k = 1, 2, ..., which
    reaches backoff_max (here 4 s) with jitter in [backoff_max/2,
    backoff_max]: at most one upstream LOGIN per backoff_max/2 = 2 s, i.e.
    <= 30 per minute.  Before the slowdown at most the logins already under
    way can fail: the first burst is bounded by session_budget (8).  So in
    20 s: <= 8 + 20/2 + 2 (the backoff ramp 50, 100, ... ms) = 20 LOGINs,
    and in the last 12 s <= 12/2 + 1 = 7."""
    ini_admins = {a: "wrong-" + p for a, p in admins.items()}
    fe = make_fake()
    budget, bmax, dur = 8, 4.0, 20.0
    shim = env([fe], admins=ini_admins,
               pool={"session_budget": str(budget), "queue_timeout": "3s"},
               retry={"backoff_max": "%ds" % int(bmax)})
    stop = time.monotonic() + dur
    answers = {"ok": 0, "unavailable": 0, "other": []}
    lock = threading.Lock()

    def client(i):
        c = None
        n = 0
        while time.monotonic() < stop:
            try:
                if c is None:
                    c = shim.client(timeout=15)
                n += 1
                r = c.login(login_name("wr-%d" % i), ini_admins[ADMIN1], tag="L%d" % n)
                with lock:
                    if r.status == "OK":
                        answers["ok"] += 1
                    elif r.tagged.startswith(b"L%d NO [UNAVAILABLE]" % n):
                        answers["unavailable"] += 1
                    else:
                        answers["other"].append(r.tagged)
            except (OSError, harness.HarnessError):
                if c is not None:
                    c.close()
                c = None
                time.sleep(0.05)
        if c is not None:
            c.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=dur + 30)
    logins = fe.logins()
    total = len(logins)
    late = [r for r in logins if r.t >= t0 + dur - 12]
    rate_per_min = len(late) / 12.0 * 60
    # when they came: bursts (logins started in one pool tick) show here
    bursts = []
    for r in logins:
        if bursts and r.t - bursts[-1][0] < 0.2:
            bursts[-1][1] += 1
        else:
            bursts.append([r.t, 1])
    timeline = " ".join("+%.1fs:%d" % (b[0] - t0, b[1]) for b in bursts)
    assert answers["ok"] == 0, answers
    assert answers["unavailable"] > 50, answers
    assert not answers["other"], answers["other"][:5]
    assert all(not r.ok for r in logins)
    bound = budget + dur / (bmax / 2) + 2
    assert total <= bound, (
        "%d upstream LOGINs in %.0fs with every admin password wrong (bound %d, "
        "derived from retry.c's slowdown); in the last 12 s: %d (%.0f/min); "
        "LOGINs by time (+s:count): %s" % (total, dur, bound, len(late), rate_per_min, timeline))
    assert len(late) <= 12 / (bmax / 2) + 1, (len(late), rate_per_min, timeline)
    assert log_lines(shim, "retry_login_slowdown"), shim.log_text()[-2000:]
    assert not log_lines(shim, "retry_admin_quarantined"), (
        "with every account failing none is quarantined; logins slow down instead")
    assert_one_failure_per_connection([fe])


# ------------------------------------------------------------ upstream lost mid-command

def select_and_check(c, tag="S"):
    r = c.command("SELECT INBOX", tag=tag)
    assert r.status == "OK", r
    return r


@pytest.mark.parametrize("mode", ["session", "multiplex"])
def test_lost_during_fetch_is_rerun(env, make_fake, admins, mode):
    """The upstream dies as FETCH 1:3 BODY.PEEK[] arrives (before any reply
    byte): imapshim logs in again, selects INBOX again, runs the FETCH again
    and the client gets the complete, right answer once."""
    mbx = "lost-fetch-%s" % mode
    fe = make_fake(message_size=20000,
                   script={"on_command": fx().drop_on("FETCH", times=1, mailbox=mbx)})
    shim = env([fe], pool={"mode": mode})
    c, r, _ = login(shim, mbx, admins)
    try:
        assert r.status == "OK", r
        select_and_check(c)
        r = c.command("FETCH 1:3 (UID BODY.PEEK[])", tag="F", timeout=20)
        assert r.status == "OK", r
        bodies = fetch_literals(r)
        want = [m.data for m in fe.mailbox(mbx).messages[:3]]
        assert bodies == want, "FETCH after the re-run returned other bytes: %r" % r
        assert len([i for i in r.untagged if b" FETCH " in i]) == 3, r
        fetches = fe.commands("FETCH", mailbox=mbx)
        assert len(fetches) == 2 and fetches[0][0] is not fetches[1][0], fe.summary()
        assert fetches[0][0].end is not None
        # the new session selected INBOX before the FETCH ran again
        names = fetches[1][0].command_names()
        assert names.index("SELECT") < names.index("FETCH"), names
        assert len(fe.logins(ok=True, mailbox=mbx)) == 2, fe.summary()
        assert c.command("NOOP").status == "OK"
    finally:
        c.close()
    assert log_lines(shim, "client_upstream_lost", mailbox=re.escape(mbx))
    assert retries(shim).get("lost", 0) >= 1, retries(shim)
    note_reasons(shim, "test_lost_during_fetch_is_rerun[%s]" % mode)


@pytest.mark.parametrize("mode", ["session", "multiplex"])
def test_fetch_lost_every_time_ends(env, make_fake, admins, mode):
    """The upstream dies every time the FETCH arrives (a command that kills
    Exchange's worker): imapshim runs it again on a new session a bounded
    number of times (DESIGN 3.5 R13: CL_RECOVER_TRIES losses in a row), then
    ends the client's session with a BYE naming Exchange; it never goes on
    logging in and re-sending for ever."""
    mbx = "lost-always-%s" % mode
    fe = make_fake(script={"on_command": fx().drop_on("FETCH", mailbox=mbx)})
    shim = env([fe], pool={"mode": mode})
    c, r, _ = login(shim, mbx, admins)
    try:
        assert r.status == "OK", r
        select_and_check(c)
        c.send(b"F FETCH 1 (FLAGS)\r\n")
        got = c.expect_closed(timeout=30)
    finally:
        c.close()
    byes = [l for l in got.split(b"\r\n") if l.startswith(b"* BYE ")]
    assert len(byes) == 1 and b"Exchange" in byes[0], got
    assert 2 <= len(fe.commands("FETCH", mailbox=mbx)) <= 4, fe.summary()
    closes = log_lines(shim, "client_close", mailbox=re.escape(mbx))
    assert len(closes) == 1 and "reason=upstream-lost" in closes[0], closes


def test_lost_during_store_is_unavailable(env, make_fake, admins):
    """The upstream dies as STORE arrives: the STORE is not sent again (it
    changes the mailbox); the client gets NO [UNAVAILABLE] for it and its
    session goes on on a new upstream session."""
    mbx = "lost-store"
    fe = make_fake(script={"on_command": fx().drop_on("STORE", times=1, mailbox=mbx)})
    shim = env([fe])
    c, r, _ = login(shim, mbx, admins)
    try:
        assert r.status == "OK", r
        select_and_check(c)
        r = c.command("STORE 1 +FLAGS (\\Flagged)", tag="W", timeout=20)
        assert r.tagged.startswith(b"W NO [UNAVAILABLE]"), r
        assert len(fe.commands("STORE", mailbox=mbx)) == 1, fe.summary()
        r = c.command("FETCH 1 (FLAGS)", tag="G", timeout=20)
        assert r.status == "OK" and b"\\Flagged" not in r.raw, r
        assert len(fe.commands("STORE", mailbox=mbx)) == 1, (
            "the STORE was sent again after the loss\n" + fe.summary())
    finally:
        c.close()


def test_lost_and_unreachable_says_bye(env, make_fake, admins):
    """The upstream dies as STORE arrives and from then on the server drops
    every connection, while the client, without reading, goes on writing an
    APPEND with a LITERAL+ literal (as NuPoint may).  imapshim answers the
    STORE NO [UNAVAILABLE] and, with no server to carry the session on,
    ends it with a BYE that names Exchange and then closes: the client
    finds both in what it received, and no APPEND reached the server."""
    mbx = "lost-unreachable"
    fe = make_fake()

    def drop_store_then_all(conn, tag, name, cmd):
        if name != "STORE":
            return None
        fe.script["on_connect"] = lambda conn: "drop"
        return "drop"
    fe.script["on_command"] = drop_store_then_all
    shim = env([fe])
    c, r, _ = login(shim, mbx, admins)
    try:
        assert r.status == "OK", r
        select_and_check(c)
        msg, _ = voice_message("unreachable", size=2000)
        c.send(b"W STORE 1 +FLAGS (\\Flagged)\r\n")
        c.send(b"A APPEND INBOX {%d+}\r\n" % len(msg) + msg[:len(msg) // 2])
        got = c.expect_closed(timeout=15)
    finally:
        c.close()
    lines = got.split(b"\r\n")
    assert lines[0].startswith(b"W NO [UNAVAILABLE] "), got
    byes = [l for l in lines if l.startswith(b"* BYE ")]
    assert len(byes) == 1 and b"Exchange" in byes[0], got
    assert fe.commands("APPEND", mailbox=mbx) == [], fe.summary()
    closes = log_lines(shim, "client_close", mailbox=re.escape(mbx))
    assert len(closes) == 1 and "reason=upstream-lost" in closes[0], closes


@pytest.mark.parametrize("point", ["stored_unanswered", "mid_literal",
                                   "mid_literal_client_done"])
def test_append_exactly_once(env, make_fake, admins, point):
    """APPEND of a 60 KB voice message (sync literal, with a Message-ID)
    whose upstream dies
      stored_unanswered: after the message was stored, before the tagged OK
        -> imapshim finds it by UID SEARCH HEADER Message-ID on a new
        session and answers OK [APPENDUID v uid] without sending it again;
      mid_literal: after 20,000 of its bytes, while the client is still
        sending -> it provably did not land, imapshim sends it again and
        relays the OK;
      mid_literal_client_done: the server reads 20,000 bytes, waits 1 s
        (imapshim has read all of the client's literal meanwhile), then
        dies -> imapshim searches for the Message-ID, finds nothing, sends
        it again.
    Either way the mailbox holds exactly one copy, byte-exact, and the
    client's session goes on with INBOX selected."""
    mbx = "vm-%s" % point
    msg, msgid = voice_message(mbx)
    assert 55000 <= len(msg) <= 70000, len(msg)
    script = {}
    if point == "stored_unanswered":
        script["on_command"] = fx().drop_on("APPEND", times=1, mailbox=mbx, after=True)
    else:
        script["on_literal"] = fx().drop_in_literal(
            "APPEND", after_bytes=20000, mailbox=mbx,
            linger=1.0 if point == "mid_literal_client_done" else 0)
    fe = make_fake(script=script)
    shim = env([fe])
    c, r, _ = login(shim, mbx, admins)
    try:
        assert r.status == "OK", r
        select_and_check(c)
        r = c.append("INBOX", msg, tag="A", timeout=30)
        assert r.status == "OK", "APPEND answered %r\n%s" % (r, fe.summary())
        stored = fe.messages_with(mbx, msgid)
        assert len(stored) == 1, "%d copies of %s in the mailbox\n%s" % (
            len(stored), msgid, fe.summary())
        assert stored[0].data == msg, "the stored message differs from the one sent"
        m = re.search(rb"\[APPENDUID (\d+) (\d+)\]", r.tagged)
        assert m, "UIDPLUS is advertised but the OK has no APPENDUID: %r" % r.tagged
        assert int(m.group(1)) == fe.mailbox(mbx).uidvalidity
        assert int(m.group(2)) == stored[0].uid
        appends = fe.commands("APPEND", mailbox=mbx)
        conns = [x[0] for x in appends]
        if point == "stored_unanswered":
            assert len(appends) == 1, "the stored APPEND was sent again\n" + fe.summary()
            assert conns[0].withheld and conns[0].end is not None
            searches = [cmd for (_, _, cmd) in fe.commands("UID SEARCH", mailbox=mbx)]
            assert any(b"HEADER" in s.upper() and msgid.encode() in s for s in searches), (
                "no UID SEARCH HEADER Message-ID on the new session\n" + fe.summary())
        else:
            assert len(appends) == 2 and conns[0].truncated and not conns[1].truncated, (
                fe.summary())
        if point == "mid_literal_client_done":
            searches = [cmd for (_, _, cmd) in fe.commands("UID SEARCH", mailbox=mbx)]
            assert any(msgid.encode() in s for s in searches), (
                "imapshim had the whole APPEND when the upstream died: it must look for "
                "the Message-ID before sending it again\n" + fe.summary())
            assert log_lines(shim, "client_append_recovered", result="sent-again")
        # the client's mailbox is selected again: a FETCH of the new UID works
        r = c.command("UID FETCH %d (BODY.PEEK[])" % stored[0].uid, tag="F", timeout=20)
        assert r.status == "OK" and fetch_literals(r) == [msg], r
        assert fe.copies(mbx, msgid) == 1
    finally:
        c.close()
    assert log_lines(shim, "client_upstream_lost", mailbox=re.escape(mbx))
    note_reasons(shim, "test_append_exactly_once[%s]" % point)


def test_failed_commands_never_reach_exchange_limit(env, make_fake, admins):
    """Exchange closes a connection, without a word, after its 10th tagged
    NO-or-BAD (never reset).  A client whose commands keep failing (12
    SELECTs of a missing folder, then a good SELECT and FETCH) gets each
    answer as Exchange gave it, and no upstream connection ever reaches 10
    NO-or-BAD: imapshim moves the client to a fresh session in time (DESIGN
    3.3), or, failing that, recovers the read-only command transparently."""
    mbx = "nolimit"
    fe = make_fake()
    shim = env([fe])
    c, r, _ = login(shim, mbx, admins)
    try:
        assert r.status == "OK", r
        for i in range(12):
            r = c.command('SELECT "Missing %d"' % i, tag="X%d" % i, timeout=20)
            assert r.status == "NO", r
        select_and_check(c)
        r = c.command("FETCH 1 (UID)", tag="F", timeout=20)
        assert r.status == "OK", r
    finally:
        c.close()
    worst = max(conn.failed_commands for conn in fe.connections)
    assert worst < 10, (
        "an upstream connection got %d tagged NO/BAD: Exchange would have closed it "
        "at the 10th\n%s" % (worst, fe.summary(max_cmds=20)))


# ------------------------------------------------------------ metrics summary

EXPECTED_REASONS = {"connect", "tls", "certificate", "greeting", "login_transient",
                    "login_refused", "lost"}


def test_metrics_cover_all_reasons():
    """After the tests above, imapshim_login_retries_total{reason} was seen
    incremented for every reason they exercised, and the first-retry
    backoffs vary (jitter)."""
    if not SEEN_REASONS:
        pytest.skip("run with the rest of test_retry.py")
    missing = EXPECTED_REASONS - set(SEEN_REASONS)
    assert not missing, "never counted: %s (seen: %r)" % (sorted(missing), SEEN_REASONS)
    if len(BACKOFFS) >= 10:
        assert len(set(BACKOFFS)) > 1, "every backoff was %r: no jitter" % BACKOFFS[:1]
        assert all(BACKOFF_INITIAL_MS // 2 <= b <= BACKOFF_INITIAL_MS for b in BACKOFFS), BACKOFFS
