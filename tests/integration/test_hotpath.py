"""
The relay path's costs, checked on a live imapshim in front of Dovecot
through its own counters (/metrics), not by timing anything (speed is
measured by `make bench`).

  allocations  relaying a command makes no heap allocation in imapshim's own
               code, and libevent's and OpenSSL's stay a small constant per
               command (imapshim_heap_allocations_total{by}).
  resumption   upstream TLS handshakes after the first resume the session
               the server gave (imapshim_upstream_tls_handshakes_total).
  buffers      sessions quiet for a few seconds give their TLS record
               buffers back (imapshim_heap_in_use_bytes falls by tens of
               KiB per session).
  read-ahead   TLS records that arrive together are all answered: OpenSSL
               reads them in one read(), libevent's loop would stop after
               the first.
"""

import socket
import ssl

import pytest

import harness

ADMIN = "NPUMAdmin1"


def metric(port, name, **labels):
    """One sample of imapshim's /metrics (0 when the series is absent)."""
    return harness.metric(port, name, **labels) or 0.0


def allocations(port):
    return {by: metric(port, "imapshim_heap_allocations_total", by=by)
            for by in ("imapshim", "libevent", "openssl")}


@pytest.fixture
def hot_shim(make_shim, dovecot):
    port = harness.free_port()
    shim = make_shim(dovecot.port_imaps, config={
        "shim": {"status_listen": "127.0.0.1:%d" % port, "log_level": "info"},
        "upstream": {"login_format": "{mailbox}*{admin}"},
        "pool": {"mode": "session", "login_rate": "1000", "login_burst": "1000"},
    })
    shim.status_port = port
    harness.wait_port(port, proc=shim.proc, what="imapshim status endpoint")
    return shim


def steady(c, n):
    """n commands of the bench's steady loop, each answered OK."""
    cmds = ("NOOP", "UID FETCH 1:* (FLAGS)", "STATUS INBOX (MESSAGES UNSEEN)")
    for i in range(n):
        r = c.command(cmds[i % 3])
        assert r.status == "OK", r


def test_no_heap_allocation_per_relayed_command(hot_shim):
    """Two runs of 300 and 900 relayed commands: the difference in
    allocation calls, per extra command, is 0 for imapshim's code, at most
    4 for libevent (a buffer chain per read and per reply) and at most 10
    for OpenSSL 3.0 (its TLS 1.3 record code allocates per record)."""
    port = hot_shim.status_port
    with hot_shim.logged_in("hot-alloc") as c:
        assert c.command("SELECT INBOX").status == "OK"
        for k in range(3):
            msg = b"From: a@example.com\r\nSubject: %d\r\n\r\nbody\r\n" % k
            assert c.append("INBOX", msg).status == "OK"
        steady(c, 60)                    # warm: every buffer sized once
        deltas = []
        for n in (300, 900):
            a0 = allocations(port)
            steady(c, n)
            a1 = allocations(port)
            deltas.append({k: a1[k] - a0[k] for k in a0})
        c.logout()
    per_cmd = {k: (deltas[1][k] - deltas[0][k]) / 600.0 for k in deltas[0]}
    # a scrape or a timer may allocate a little either way; per command
    # that is far below one allocation
    assert per_cmd["imapshim"] < 0.01, (per_cmd, deltas)
    assert per_cmd["libevent"] <= 4, (per_cmd, deltas)
    assert per_cmd["openssl"] <= 10, (per_cmd, deltas)


def test_upstream_tls_sessions_resumed(hot_shim):
    """Six clients of six mailboxes, one after the other: six upstream
    connections, the first a full handshake, the others resumed."""
    port = hot_shim.status_port
    for i in range(6):
        with hot_shim.logged_in("hot-resume-%d" % i) as c:
            assert c.command("SELECT INBOX").status == "OK"
    full = metric(port, "imapshim_upstream_tls_handshakes_total", resumed="no")
    resumed = metric(port, "imapshim_upstream_tls_handshakes_total", resumed="yes")
    assert full + resumed == 6, (full, resumed)
    assert full == 1 and resumed == 5, (full, resumed)


def test_quiet_sessions_release_tls_buffers(hot_shim):
    """20 sessions that have just relayed a reply hold TLS record buffers on
    both of their connections (about 34 KiB each); a few seconds later the
    heap has shrunk by at least 30 KiB per session, and the sessions work
    as before."""
    port = hot_shim.status_port
    clients = []
    try:
        for i in range(20):
            c = hot_shim.logged_in("hot-quiet-%d" % i)
            clients.append(c)
            assert c.command("SELECT INBOX").status == "OK"
        for c in clients:
            assert c.command("NOOP").status == "OK"
        busy = metric(port, "imapshim_heap_in_use_bytes")

        def shrunk():
            return busy - metric(port, "imapshim_heap_in_use_bytes") >= 20 * 30 * 1024
        harness.wait_until(shrunk, timeout=10, what="TLS buffers released")
        for c in clients:
            assert c.command("NOOP").status == "OK"
    finally:
        for c in clients:
            c.close()


class RecordClient:
    """A TLS client over a memory BIO, so that several TLS records can go
    out in one send() (one TCP segment on loopback)."""

    def __init__(self, shim):
        self.sock = socket.create_connection((harness.HOST, shim.port), timeout=10)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = shim.pki.client_context().wrap_bio(self.inc, self.out,
                                                      server_hostname="localhost")
        self.text = b""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self):
        data = self.out.read()
        if data:
            self.sock.sendall(data)

    def _fill(self):
        data = self.sock.recv(65536)
        assert data, "imapshim closed the connection"
        self.inc.write(data)

    def send_records(self, *lines):
        """Each line its own record, all in one send()."""
        for line in lines:
            self.tls.write(line)
        self._flush()

    def wait_for(self, needle):
        """Read until needle has arrived; the socket's 10 s timeout fails
        the test if it never does."""
        while needle not in self.text:
            try:
                self.text += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._fill()
        return self.text

    def close(self):
        self.sock.close()


def test_records_read_ahead_are_answered(hot_shim):
    """Two commands in two TLS records that arrive in one segment, before
    and after LOGIN: OpenSSL reads both records with one read(), and both
    are answered (libevent alone would leave the second one waiting for
    more bytes from the client)."""
    c = RecordClient(hot_shim)
    try:
        c.wait_for(b"* OK")
        c.send_records(b"p1 CAPABILITY\r\n", b"p2 NOOP\r\n")
        assert b"p1 OK" in c.wait_for(b"p2 OK")
        c.send_records(b'L LOGIN "%s" "%s"\r\n' % (
            hot_shim.login_name("hot-ahead").encode(),
            hot_shim.admins[ADMIN].encode()))
        c.wait_for(b"L OK")
        c.send_records(b"s1 SELECT INBOX\r\n", b"s2 NOOP\r\n", b"s3 NOOP\r\n")
        text = c.wait_for(b"s3 OK")
        assert b"s1 OK" in text and b"s2 OK" in text
    finally:
        c.close()
