"""
imapshim's TLS and auth diagnostics (issue 14, "Diagnostics"), end to end in
front of fake_exchange.

  client TLS   a client whose handshake fails is counted in
               imapshim_client_tls_failures_total{reason} (every reason
               rendered, 0 included) and logged once as client_tls_failed
               with reason, offered (the version its ClientHello offered) and
               OpenSSL's detail: TLS 1.0 only against tls_min_version 1.2
               (protocol_version, offered=TLSv1), a cipher the listener does
               not allow (no_shared_cipher), "a1 LOGIN ..." in cleartext on
               the implicit-TLS port (plaintext), a client that rejects
               imapshim's certificate (certificate: the listener asks for no
               client certificate, so this reason is the client's alert
               about ours).
  client auth  each refusal names the login as sent and the reason
               (malformed_name, unknown_admin, wrong_password,
               malformed_request), counted in
               imapshim_client_auth_failures_total{reason}; no password
               reaches the log.  (An address outside allow_from is refused
               at accept, before any login: client_refused.)
  imapshim -t  a key of another certificate fails naming both files; a
               certificate expiring within 30 days warns and passes; an
               expired one fails.
  expiry       imapshim_tls_certificate_expiry_timestamp_seconds for the
               listener's certificate (side="client", server="") and a
               server's as its handshake showed (side="upstream",
               server="host:port"); tls_certificate_expiring at 30 and again
               at 7 days, once per certificate and threshold (a reload of
               the same certificate does not repeat it).
"""

import os
import re
import signal
import socket
import ssl
import subprocess
import time

import pytest

import harness
from test_client_states import plaintext_hello, tls10_hello

TLS_REASONS = ("protocol_version", "no_shared_cipher", "certificate", "plaintext", "other")
AUTH_REASONS = ("malformed_name", "unknown_admin", "wrong_password", "malformed_request")
EXPIRY = "imapshim_tls_certificate_expiry_timestamp_seconds"


def status_config(**shim):
    """Status endpoint on a free port, plus the [shim] keys given."""
    port = harness.free_port()
    shim.setdefault("status_listen", "%s:%d" % (harness.HOST, port))
    return port, {"shim": shim}


def not_after(cert):
    """A PEM certificate's notAfter in Unix seconds."""
    return ssl.cert_time_to_seconds(ssl._ssl._test_decode_cert(cert.cert)["notAfter"])


def handshake(port, ctx):
    """A TLS handshake with ctx that imapshim is expected to refuse."""
    with socket.create_connection((harness.HOST, port), timeout=5) as s:
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(s, server_hostname="localhost").recv(1)


def no_shared_cipher_hello(port):
    """TLS 1.2 with a static-RSA suite only; the listener allows ECDHE only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES128-SHA")
    handshake(port, ctx)


def wrong_ca_hello(pki):
    """A client that verifies against a CA that did not sign our certificate."""
    def hello(port):
        handshake(port, ssl.create_default_context(cafile=pki.unknown_ca.cert))
    return hello


@pytest.mark.parametrize("case", [
    ("protocol_version", "TLSv1", tls10_hello),
    ("no_shared_cipher", "TLSv1.2", no_shared_cipher_hello),
    ("plaintext", "unknown", plaintext_hello),
    ("certificate", "TLSv1.3", None),
], ids=lambda c: c[0])
def test_client_tls_failure_reason(make_shim, make_fake, pki, case):
    reason, offered, hello = case
    fe = make_fake()
    sport, cfg = status_config(tls_min_version="1.2")
    shim = make_shim(fe.port, config=cfg)
    for r in TLS_REASONS:
        assert harness.metric(sport, "imapshim_client_tls_failures_total", reason=r) == 0, r
    (hello or wrong_ca_hello(pki))(shim.port)
    ev = shim.wait_log_event("client_tls_failed", timeout=5)
    assert len(ev) == 1, ev
    ev = ev[0]
    assert ev["reason"] == reason, ev
    assert ev["offered"] == offered, ev
    assert ev["peer"].startswith(harness.HOST + ":"), ev
    assert ev["detail"].isprintable() and "routines" in ev["detail"], ev
    harness.wait_until(lambda: harness.metric(
        sport, "imapshim_client_tls_failures_total", reason=reason) == 1,
        timeout=5, what="the %s counter" % reason)
    for r in TLS_REASONS:
        if r != reason:
            assert harness.metric(sport, "imapshim_client_tls_failures_total",
                                  reason=r) == 0, r


def test_client_auth_failure_reasons(make_shim, make_fake, admins):
    """One refusal of each reason on one connection each: the login name as
    sent and the reason in the log and the counter; no password anywhere in
    the log, neither the ones tried nor the admin accounts'."""
    fe = make_fake()
    sport, cfg = status_config()
    shim = make_shim(fe.port, config=cfg)
    admin = next(iter(admins))
    wrong = "Wr0ng-" + os.urandom(6).hex()
    cases = [
        ("malformed_name", "vm1@example.com", admins[admin]),
        ("unknown_admin", "example.com/NoSuchAdmin/vm1", admins[admin]),
        ("wrong_password", "example.com/%s/vm1" % admin, wrong),
    ]
    for reason, user, password in cases:
        with shim.client() as c:
            r = c.login(user, password, tag="L")
            assert r.status == "NO", r
        ev = shim.wait_log_event("client_auth_fail", timeout=5, reason=reason)
        assert ev[-1]["login"] == user, ev
    # SASL PLAIN that does not decode: no name to show.
    with shim.client() as c:
        r = c.command("AUTHENTICATE PLAIN %s" % "!!!!", tag="A")
        assert r.status in ("NO", "BAD"), r
    ev = shim.wait_log_event("client_auth_fail", timeout=5, reason="malformed_request")
    assert ev[-1]["login"] == "", ev
    for reason in AUTH_REASONS:
        assert harness.metric(sport, "imapshim_client_auth_failures_total",
                              reason=reason) == 1, reason
    log = shim.log_text()
    for secret in [wrong] + list(admins.values()):
        assert secret not in log, "a password in the log"
        assert harness.imap_quote(secret).decode() not in log


def run_imapshim(make_shim, fe, cert, key=None, check=True):
    """imapshim (-t with check) on a configuration with this listener
    certificate, expected to exit by itself: (exit status, its output)."""
    shim = make_shim(fe.port, start=False, config={
        "shim": {"tls_cert_file": cert.cert, "tls_key_file": key or cert.key}})
    shim.write_ini()
    p = subprocess.Popen([shim.binary] + (["-t"] if check else []) + ["-c", shim.ini_path],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        out = p.communicate(timeout=30)[0]
    finally:
        if p.poll() is None:
            harness.kill_group(p, signal.SIGKILL, 5)
    return p.returncode, out.decode(errors="replace")


def expiry(port, side, server):
    """imapshim_tls_certificate_expiry_timestamp_seconds{side,server}, None
    when absent."""
    m = re.search(r'^%s\{side="%s",server="%s"\} (\S+)$' % (EXPIRY, side, re.escape(server)),
                  harness.http_get(port, "/metrics"), re.M)
    return float(m.group(1)) if m else None


def days_left(cert):
    """The days_left imapshim logged for cert within the last minute (whole
    days, rounded down: one less once a second has passed since it was made)."""
    now = time.time()
    return {str(int((not_after(cert) - t) // 86400)) for t in (now - 60, now)}


def test_check_mismatched_key(make_shim, make_fake, pki):
    rc, out = run_imapshim(make_shim, make_fake(), pki.server, key=pki.unknown.key)
    assert rc == 1, out
    assert "does not match" in out and pki.server.cert in out and pki.unknown.key in out, out


def test_check_expiring_certificate_warns(make_shim, make_fake, pki):
    soon = pki.leaf("check-soon", 10)
    rc, out = run_imapshim(make_shim, make_fake(), soon)
    assert rc == 0, out
    assert re.search(r"expires in (9|10) days", out) and soon.cert in out, out
    assert "configuration is valid" in out, out


def test_check_expired_certificate_fails(make_shim, make_fake, pki):
    rc, out = run_imapshim(make_shim, make_fake(), pki.expired)
    assert rc == 1, out
    assert "has expired" in out and pki.expired.cert in out, out


def test_start_refuses_mismatched_key(make_shim, make_fake, pki):
    rc, out = run_imapshim(make_shim, make_fake(), pki.server, key=pki.unknown.key,
                           check=False)
    assert rc == 1, out
    assert "does not match" in out and "event=tls_setup" in out, out


def test_reload_refuses_mismatched_key(make_shim, make_fake, pki):
    """A reload with a key of another certificate is rejected and the old
    pair keeps serving."""
    shim = make_shim(make_fake().port)
    shim.config["shim"]["tls_key_file"] = pki.unknown.key
    shim.write_ini()
    shim.proc.send_signal(signal.SIGHUP)
    ev = shim.wait_log_event("reload", timeout=5)
    assert ev[-1]["result"] == "rejected", ev
    assert any("does not match" in e.get("reason", "")
               for e in shim.log_events("tls_setup")), shim.log_text(True)[-2000:]
    with shim.client() as c:
        assert c.command("NOOP").status == "OK"


def test_listener_certificate_expiry(make_shim, make_fake, pki):
    """Metric = the certificate's notAfter; one warning at 30 days, none
    more for a reload of the same certificate, one at 7 days for a renewal
    that expires within them."""
    c10, c5 = pki.leaf("listen-10d", 10), pki.leaf("listen-5d", 5)
    sport, cfg = status_config(tls_cert_file=c10.cert, tls_key_file=c10.key)
    shim = make_shim(make_fake().port, config=cfg)
    assert expiry(sport, "client", "") == not_after(c10)
    ev = shim.wait_log_event("tls_certificate_expiring", timeout=5)
    assert len(ev) == 1, ev
    assert ev[0]["side"] == "client" and ev[0]["server"] == "", ev
    assert ev[0]["days_left"] in days_left(c10), ev
    assert ev[0]["not_after"].endswith("Z"), ev

    shim.proc.send_signal(signal.SIGHUP)
    shim.wait_log_event("reload", timeout=5, result="ok")
    assert len(shim.log_events("tls_certificate_expiring")) == 1

    shim.config["shim"].update(tls_cert_file=c5.cert, tls_key_file=c5.key)
    shim.write_ini()
    shim.proc.send_signal(signal.SIGHUP)
    shim.wait_log_event("reload", timeout=5, count=2, result="ok")
    ev = shim.wait_log_event("tls_certificate_expiring", timeout=5, count=2)
    assert ev[1]["days_left"] in days_left(c5), ev
    assert expiry(sport, "client", "") == not_after(c5)


def test_upstream_certificate_expiry(make_shim, make_fake, pki):
    """A server's certificate as its handshake showed: the metric, and one
    warning however many sessions see it."""
    cert = pki.leaf("cas-20d", 20)
    fe = make_fake(cert=cert)
    sport, cfg = status_config()
    shim = make_shim(fe.port, config=cfg)
    server = "%s:%d" % (harness.HOST, fe.port)
    assert expiry(sport, "upstream", server) is None
    for mb in ("vm-a", "vm-b"):
        shim.logged_in(mb).close()
    assert len(fe.logins(ok=True)) == 2, "two upstream handshakes expected"
    assert expiry(sport, "upstream", server) == not_after(cert)
    ev = shim.wait_log_event("tls_certificate_expiring", timeout=5, side="upstream")
    assert len(ev) == 1, ev
    assert ev[0]["server"] == server and ev[0]["days_left"] in days_left(cert), ev
    # The listener's certificate (a year) is far from expiry: no warning.
    assert not shim.log_events("tls_certificate_expiring", side="client")
    assert expiry(sport, "client", "") == not_after(pki.server)
