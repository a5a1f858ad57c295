"""
Client-side TLS session resumption: a client that offers the session of
its previous connection to imapshim resumes it, and
imapshim_client_tls_handshakes_total{resumed} counts both handshakes.

  tls13        TLS 1.3: the second connection resumes with the session
               ticket of the first and logs in over it.
  tls12        TLS 1.2 with a session ticket.
  tls12_id     TLS 1.2 without tickets (a client that resumes only by
               session ID): imapshim's session cache.
  reload       a ticket issued before a reload (SIGHUP, a new server
               context) resumes after it: the ticket keys are the
               process's, not the context's.
  no_session   a connection that offers nothing is a full handshake.

Key rotation is unit-tested (tests/unit/test_tls.c): its period is hours.
"""

import ssl

import pytest

import harness
from test_ops import sighup

HANDSHAKES = "imapshim_client_tls_handshakes_total"


@pytest.fixture
def rshim(make_shim, dovecot):
    port = harness.free_port()
    shim = make_shim(dovecot.port_imaps, config={
        "shim": {"status_listen": "%s:%d" % (harness.HOST, port)},
        "upstream": {"login_format": "{mailbox}*{admin}"},
    })
    shim.status_port = port
    harness.wait_port(port, proc=shim.proc, what="imapshim status endpoint")
    return shim


def handshakes(shim):
    """(full, resumed) client handshakes from /metrics."""
    return tuple(int(harness.metric(shim.status_port, HANDSHAKES, resumed=r) or 0)
                 for r in ("no", "yes"))


def context(shim, version=None, tickets=True):
    ctx = shim.pki.client_context()
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET
    return ctx


def first_session(shim, ctx, mailbox):
    """A full handshake, a login, LOGOUT; the session to resume."""
    c = harness.ImapClient(shim.port, tls=ctx)
    try:
        assert not c.sock.session_reused
        r = c.login(shim.login_name(mailbox), shim.admins["NPUMAdmin1"], tag="L")
        assert r.status == "OK", r
        # TLS 1.3's ticket came before the greeting and the reply
        sess = c.sock.session
        assert sess is not None
        c.command("LOGOUT")
    finally:
        c.close()
    return sess


def resumed_login(shim, ctx, sess, mailbox):
    """A connection offering sess: whether it resumed, and it logs in."""
    c = harness.ImapClient(shim.port, tls=ctx, tls_session=sess)
    try:
        reused = c.sock.session_reused
        r = c.login(shim.login_name(mailbox), shim.admins["NPUMAdmin1"], tag="L")
        assert r.status == "OK", r
        r = c.command("SELECT INBOX")
        assert r.status == "OK", r
        c.command("LOGOUT")
    finally:
        c.close()
    return reused


@pytest.mark.parametrize("version,tickets", [
    (ssl.TLSVersion.TLSv1_3, True),
    (ssl.TLSVersion.TLSv1_2, True),
    (ssl.TLSVersion.TLSv1_2, False),
], ids=["tls13", "tls12", "tls12_id"])
def test_client_resumes(rshim, version, tickets):
    ctx = context(rshim, version, tickets)
    full0, res0 = handshakes(rshim)
    sess = first_session(rshim, ctx, "res-a")
    assert sess.has_ticket == tickets
    assert resumed_login(rshim, ctx, sess, "res-b")
    full1, res1 = handshakes(rshim)
    assert (full1 - full0, res1 - res0) == (1, 1)


def test_ticket_survives_reload(rshim):
    ctx = context(rshim)
    sess = first_session(rshim, ctx, "res-c")
    sighup(rshim)
    full0, res0 = handshakes(rshim)
    assert resumed_login(rshim, ctx, sess, "res-c")
    assert handshakes(rshim) == (full0, res0 + 1)


def test_no_session_is_full_handshake(rshim):
    ctx = context(rshim)
    first_session(rshim, ctx, "res-d")
    full0, res0 = handshakes(rshim)
    # a new context has no session to offer
    assert not resumed_login(rshim, context(rshim), None, "res-d")
    assert handshakes(rshim) == (full0 + 1, res0)
