"""
Tests of contrib/exchange-log-summary, the report of LOGIN failures and
per-admin sessions in Exchange IMAP4 protocol logs
(exchange-imap-facts.md 1.3, 1.9).

fixtures/exchange-imap4.log is two hourly files of one CAS concatenated
(each with its #Software/#Log-type/#Fields header), written for these
tests.  What it holds, and so what the counts below are:

  hour 09  11 LOGIN attempts, 5 failed:
           NPUMAdmin1/dfox  ProxyNotAuthenticated twice (one session)
           EXAMPLE\\NPUMAdmin2\\fhill (quoted, escaped)  UserConnectionLimitReached
           NPUMAdmin2/ghost  NoADRecipient
           NPUMAdmin1/hjones "NO LOGIN failed." without ErrMsg -> (none)
           NPUMAdmin1 has 4 sessions open at 09:00:05.000 (its peak);
           NPUMAdmin2 2 at 09:10:01.000 (EXAMPLE\\NPUMAdmin2\\egray + fhill);
           one session without any login (a probe) -> admin (none).
  hour 10  5 attempts, 3 failed: NPUMAdmin1/jkim ProxyNotAuthenticated and
           LogonFailed:LogonDenied; AUTHENTICATE for NPUMAdmin1/kwu
           ("NO AUTHENTICATE failed.", ProxyNotAuthenticated).
           NPUMAdmin2@example.com/ilee (UPN form) counts as NPUMAdmin2; the
           last session has no CloseSession (the log ends).
  16 sessions: NPUMAdmin1 11 (6 logged in), NPUMAdmin2 4 (2), (none) 1.

Only the standard library and the script itself are needed (no daemon).
"""

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.environ.get("top_srcdir") or os.path.abspath(os.path.join(HERE, "..", ".."))
SCRIPT = os.path.join(TOP, "contrib", "exchange-log-summary")
FIXTURE = os.path.join(HERE, "fixtures", "exchange-imap4.log")

FIELDS = ("#Fields: dateTime,sessionId,seqNumber,sIp,cIp,user,duration,rqsize,rpsize,"
          "command,parameters,context")


def run(*args, stdin=None):
    p = subprocess.run([sys.executable, SCRIPT] + list(args), input=stdin,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert p.returncode == 0, "exit %d\nstdout:\n%s\nstderr:\n%s" % (
        p.returncode, p.stdout.decode(), p.stderr.decode())
    return p.stdout.decode()


def run_json(*args, **kw):
    return json.loads(run("--json", *args, **kw))


def as_dict(rows, key, value="count"):
    return {r[key] if isinstance(key, str) else tuple(r[k] for k in key): r[value]
            for r in rows}


@pytest.fixture(scope="module")
def mod():
    """The script imported as a module (it has no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("exchange_log_summary", SCRIPT)
    m = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(m)
    return m


def test_json_counts():
    j = run_json("--top", "0", FIXTURE)
    assert j["files"] == 1 and j["bad_lines"] == 0
    assert j["lines"] == 65
    assert j["first"] == "2026-03-02T09:00:01.100Z"
    assert j["last"] == "2026-03-02T10:10:02.000Z"
    assert (j["login_attempts"], j["login_failures"]) == (16, 8)
    assert as_dict(j["failures_by_errmsg"], "errmsg") == {
        "ProxyNotAuthenticated": 4, "UserConnectionLimitReached": 1, "NoADRecipient": 1,
        "LogonFailed:LogonDenied": 1, "(none)": 1}
    # the largest first
    assert j["failures_by_errmsg"][0] == {"errmsg": "ProxyNotAuthenticated", "count": 4}
    assert as_dict(j["failures_by_admin"], "admin") == {"NPUMAdmin1": 6, "NPUMAdmin2": 2}
    assert as_dict(j["failures_by_mailbox"], ("admin", "mailbox")) == {
        ("NPUMAdmin1", "dfox"): 2, ("NPUMAdmin1", "jkim"): 2, ("NPUMAdmin1", "hjones"): 1,
        ("NPUMAdmin1", "kwu"): 1, ("NPUMAdmin2", "fhill"): 1, ("NPUMAdmin2", "ghost"): 1}
    assert j["failures_by_hour"] == [
        {"hour": "2026-03-02T09:00Z", "failures": 5, "attempts": 11},
        {"hour": "2026-03-02T10:00Z", "failures": 3, "attempts": 5}]
    assert j["sessions"] == 16
    admins = {a["admin"]: a for a in j["admins"]}
    assert set(admins) == {"NPUMAdmin1", "NPUMAdmin2", "(none)"}
    a1, a2 = admins["NPUMAdmin1"], admins["NPUMAdmin2"]
    assert (a1["sessions"], a1["logged_in"], a1["login_failures"]) == (11, 6, 6)
    assert (a1["peak_concurrent"], a1["peak_at"]) == (4, "2026-03-02T09:00:05.000Z")
    assert a1["peak_by_hour"] == {"2026-03-02T09:00Z": 4, "2026-03-02T10:00Z": 1}
    assert (a2["sessions"], a2["logged_in"], a2["login_failures"]) == (4, 2, 2)
    assert (a2["peak_concurrent"], a2["peak_at"]) == (2, "2026-03-02T09:10:01.000Z")
    assert (admins["(none)"]["sessions"], admins["(none)"]["peak_concurrent"]) == (1, 1)
    assert [a["admin"] for a in j["admins"]] == ["NPUMAdmin1", "NPUMAdmin2", "(none)"]


def test_text_report():
    out = run(FIXTURE)
    assert "LOGIN failures: 8 of 16 attempts" in out
    lines = [ln.split() for ln in out.splitlines()]
    assert ["4", "ProxyNotAuthenticated"] in lines
    assert ["1", "UserConnectionLimitReached"] in lines
    assert ["1", "(none)"] in lines
    assert ["6", "NPUMAdmin1"] in lines and ["2", "NPUMAdmin2"] in lines
    assert ["2", "NPUMAdmin1", "/", "dfox"] in lines
    assert ["1", "NPUMAdmin2", "/", "fhill"] in lines
    assert ["2026-03-02T09:00Z", "5", "/", "11"] in lines
    assert ["2026-03-02T10:00Z", "3", "/", "5"] in lines
    assert "Sessions: 16" in out
    assert ["NPUMAdmin1", "11", "6", "6", "4", "2026-03-02T09:00:05.000Z"] in lines
    assert ["NPUMAdmin2", "4", "2", "2", "2", "2026-03-02T09:10:01.000Z"] in lines
    assert "No admin account went over 16" in out
    # passwords are masked in Exchange's log and stay masked here
    assert "*****" not in out


def test_top_limits_every_table():
    j = run_json("--top", "1", FIXTURE)
    assert j["failures_by_errmsg"] == [{"errmsg": "ProxyNotAuthenticated", "count": 4}]
    assert j["failures_by_admin"] == [{"admin": "NPUMAdmin1", "count": 6}]
    assert len(j["failures_by_mailbox"]) == 1
    assert [a["admin"] for a in j["admins"]] == ["NPUMAdmin1"]
    # totals are not cut
    assert (j["login_attempts"], j["login_failures"], j["sessions"]) == (16, 8, 16)
    out = run("--top", "1", FIXTURE)
    assert "UserConnectionLimitReached" not in out
    assert "NPUMAdmin2" not in out


def test_over_max_per_user_is_flagged():
    out = run("--max-per-user", "3", FIXTURE)
    assert "Over Exchange's MaxConnectionsPerUser (3)" in out
    assert "NPUMAdmin1 peaked at 4 concurrent sessions" in out
    assert "NPUMAdmin2 peaked" not in out


def test_stdin_directory_and_split_files(tmp_path):
    data = open(FIXTURE, "rb").read()
    # stdin gives the same answer
    j = run_json("-", stdin=data)
    assert (j["login_attempts"], j["login_failures"], j["sessions"]) == (16, 8, 16)
    # the two hourly files separately, as a directory (sessions and the
    # peak are counted across files)
    text = data.decode()
    cut = text.index("#Software", 10)
    (tmp_path / "IMAP4_2026030209-1.LOG").write_text(text[:cut], newline="")
    (tmp_path / "IMAP4_2026030210-1.LOG").write_text(text[cut:], newline="")
    (tmp_path / "notes.txt").write_text("not a log\n")
    j2 = run_json("--top", "0", str(tmp_path))
    assert j2["files"] == 2
    for k in ("login_attempts", "login_failures", "sessions", "failures_by_errmsg",
              "failures_by_mailbox", "failures_by_hour", "admins"):
        assert j2[k] == run_json("--top", "0", FIXTURE)[k], k


def test_fields_header_decides_the_columns(tmp_path):
    """A trailing puid column (later builds), a reordered header, a
    session that started in an earlier file, an unreadable line."""
    log = tmp_path / "x.log"
    log.write_text(
        "#Software: Microsoft Exchange Server\r\n#Log-type: IMAP4 Protocol Log\r\n"
        + FIELDS + ",puid\r\n"
        "2026-03-03T08:00:00.000Z,00000000000000E2,0,192.0.2.5:993,192.0.2.9:4000,,39,0,53,"
        "OpenSession,,,\r\n"
        "2026-03-03T08:00:00.100Z,00000000000000E2,1,192.0.2.5:993,192.0.2.9:4000,"
        "CONTOSO\\svc-um\\alice,122,41,23,login,CONTOSO\\svc-um\\alice *****,"
        "\"R=\"\"aXSV NO LOGIN failed.\"\";Msg=Proxy:cas1.contoso.test:1993:SSL;"
        "ErrMsg=ProxyNotAuthenticated\",1003BFFD9A8B1234\r\n"
        "garbage line without enough fields\r\n"
        "#Fields: command,dateTime,sessionId,user,parameters,context,sIp\r\n"
        "login,2026-03-03T08:05:00.000Z,00000000000000F0,svc-um@contoso.test,"
        "svc-um@contoso.test/bob *****,R=ok,192.0.2.5:993\r\n"
        "login,2026-03-03T08:06:00.000Z,00000000000000F1,contoso/svc-um,"
        "contoso/svc-um *****,\"R=\"\"b NO LOGIN failed.\"\";ErrMsg=UserDisabled\","
        "192.0.2.5:993\r\n", newline="")
    j = run_json("--top", "0", str(log))
    assert j["bad_lines"] == 1
    assert (j["login_attempts"], j["login_failures"]) == (3, 2)
    assert as_dict(j["failures_by_errmsg"], "errmsg") == {
        "ProxyNotAuthenticated": 1, "UserDisabled": 1}
    assert as_dict(j["failures_by_mailbox"], ("admin", "mailbox")) == {
        ("svc-um", "alice"): 1, ("svc-um", "svc-um"): 1}
    admins = {a["admin"]: a for a in j["admins"]}
    assert set(admins) == {"svc-um"}
    assert admins["svc-um"]["sessions"] == 3
    assert admins["svc-um"]["logged_in"] == 1


def test_parsers(mod):
    pc = mod.parse_context
    assert pc('R="aXSV NO LOGIN failed.";Msg=Proxy:cas:1993:SSL;ErrMsg=ProxyNotAuthenticated') \
        == {"R": "aXSV NO LOGIN failed.", "Msg": "Proxy:cas:1993:SSL",
            "ErrMsg": "ProxyNotAuthenticated"}
    assert pc('R=ok;Msg="a ""quoted"" value; with, separators";Rows=3') == {
        "R": "ok", "Msg": 'a "quoted" value; with, separators', "Rows": "3"}
    assert pc("") == {}
    assert pc("R=ok;") == {"R": "ok"}
    sl = mod.split_login
    assert sl("example.com/NPUMAdmin1/oozuna") == ("NPUMAdmin1", "oozuna")
    assert sl("EXAMPLE\\NPUMAdmin2\\egray") == ("NPUMAdmin2", "egray")
    assert sl("EXAMPLE\\\\NPUMAdmin2\\\\egray") == ("NPUMAdmin2", "egray")
    assert sl("NPUMAdmin2@example.com/ilee") == ("NPUMAdmin2@example.com", "ilee")
    assert sl("example.com/NPUMAdmin1") == ("NPUMAdmin1", "NPUMAdmin1")
    assert sl("NPUMAdmin1") == ("NPUMAdmin1", "NPUMAdmin1")
    assert sl("a/b/c/d") == ("b", "c/d")
    ft = mod.first_token
    assert ft('"EXAMPLE\\\\NPUMAdmin2\\\\fhill" *****') == "EXAMPLE\\NPUMAdmin2\\fhill"
    assert ft("example.com/NPUMAdmin1/oozuna *****") == "example.com/NPUMAdmin1/oozuna"
    assert mod.is_login_failure({"R": "a1 NO LOGIN failed."})
    assert mod.is_login_failure({"R": "NO [AUTHENTICATIONFAILED] x"})
    assert not mod.is_login_failure({"R": "ok"})
    assert not mod.is_login_failure({"R": "a1 OK LOGIN completed."})


def test_bad_arguments():
    p = subprocess.run([sys.executable, SCRIPT, "--top", "-1", FIXTURE],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert p.returncode == 2
    p = subprocess.run([sys.executable, SCRIPT, "/nonexistent/imap4.log"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert p.returncode == 2 and b"nonexistent" in p.stderr


def test_runs_as_an_executable():
    """The #! line and mode: operators run it directly."""
    if not os.access(SCRIPT, os.X_OK):
        pytest.skip("%s is not executable in this tree" % SCRIPT)
    p = subprocess.run([SCRIPT, "--help"], stdout=subprocess.PIPE, timeout=30)
    assert p.returncode == 0 and b"--top" in p.stdout
