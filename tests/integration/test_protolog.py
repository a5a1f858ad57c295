"""protocol_log: one Exchange-style CSV line per command, passwords masked."""
import csv
import io
import os

import pytest

import harness

FIELDS = ["dateTime", "sessionId", "seqNumber", "sIp", "cIp", "user", "duration",
          "rqsize", "rpsize", "command", "parameters", "context"]


@pytest.fixture
def logged_shim(make_shim, dovecot, tmp_path):
    path = str(tmp_path / "imap4-protocol.csv")
    shim = make_shim(dovecot.port_imaps, config={
        "shim": {"protocol_log": path},
        "upstream": {"login_format": "{mailbox}*{admin}"}})
    return shim, path


def read_log(path):
    with open(path, newline="") as f:
        text = f.read()
    header = [l for l in text.splitlines() if l.startswith("#")]
    rows = list(csv.reader(io.StringIO("\n".join(
        l for l in text.splitlines() if not l.startswith("#")))))
    return text, header, rows


def test_protocol_log_lines(logged_shim, dovecot, admins):
    shim, path = logged_shim
    mbx = "plog1"
    dovecot.append(mbx, b"Subject: p\r\n\r\nprotocol log\r\n")
    admin, password = next(iter(admins.items()))
    with shim.client() as c:
        assert c.command("CAPABILITY").status == "OK"
        assert c.login(shim.login_name(mbx, admin), password).status == "OK"
        assert c.command("SELECT INBOX").status == "OK"
        assert c.command("FETCH 1 (BODY.PEEK[])").status == "OK"
        c.logout()
    with shim.client() as c:
        assert c.login(shim.login_name(mbx, admin), "not-the-password").status == "NO"
    harness.wait_until(lambda: read_log(path)[2] and
                       sum(r[9] == "CloseSession" for r in read_log(path)[2]) >= 2,
                       what="CloseSession lines")
    text, header, rows = read_log(path)
    assert "#Fields: " + ",".join(FIELDS) in header
    assert all(len(r) == len(FIELDS) for r in rows), rows
    cmds = [r[9] for r in rows]
    for want in ("OpenSession", "capability", "login", "select", "fetch", "logout",
                 "CloseSession"):
        assert want in cmds, cmds
    logins = [r for r in rows if r[9] == "login"]
    assert all(r[10] == "*****" for r in logins), logins
    assert any("OK" in r[11] for r in logins) and any("NO" in r[11] for r in logins)
    sel = [r for r in rows if r[9] == "select"][0]
    assert sel[5] == "example.com/%s/%s" % (admin, mbx)
    assert sel[10] == "INBOX" and int(sel[7]) > 0 and int(sel[8]) > 0
    assert sel[11].startswith("R=")
    # lines of one session carry increasing sequence numbers
    sid = sel[1]
    seqs = [int(r[2]) for r in rows if r[1] == sid]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert password not in text and "not-the-password" not in text
