"""
imapshim's log as an operator's tools read it, and the configuration
checks that reach it (issue 14: "Logs", "Configuration checks").

  journal   stderr is the stream JOURNAL_STREAM names (as systemd sets it):
            every line starts with its syslog priority <6>, <4>, <3> and has
            no timestamp; not the named stream, or no JOURNAL_STREAM: the
            timestamp, no prefix.
  logfmt    values with spaces, quotes, '=' and control bytes (a client's
            login name, a rejected reload's line) come out quoted and read
            back unchanged.  (conftest.check_stopped checks every line of
            every imapshim log of every test the same way.)
  start     a configuration with errors is refused in logfmt lines
            (config_error), not raw text.
  checks    -t and the start report a session_budget the admin accounts
            cannot use (with the effective budget), [upstream] tls = none,
            plaintext LOGIN on a listener that is not loopback; log_level
            takes any case.
"""

import os
import signal
import subprocess

import harness


def stream_id(path):
    """JOURNAL_STREAM's "DEV:INODE" of the file at path."""
    st = os.stat(path)
    return "%d:%d" % (st.st_dev, st.st_ino)


def start_with_env(make_shim, fe, env, config=None):
    s = make_shim(fe.port, config=config, start=False)
    open(s.log_path, "ab").close()      # exists, so its dev:ino is known
    s.env.update({k: (stream_id(s.log_path) if v == "LOG" else v) for k, v in env.items()})
    s.start()
    return s


def run_check(binary, ini):
    p = subprocess.run([binary, "-t", "-c", ini], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def test_journal_priority_prefix(make_shim, make_fake):
    fe = make_fake()
    # session_budget above 2 x 16: a warning at start (<4>).
    s = start_with_env(make_shim, fe, {"JOURNAL_STREAM": "LOG"},
                       config={"pool": {"session_budget": "40"}})
    s.wait_log_event("config_warning")
    # A rejected reload: errors (<3>) and a warning (<4>).
    with open(s.ini_path, "a") as f:
        f.write("[upstream]\nno_such_key = 1\n")
    s.proc.send_signal(signal.SIGHUP)
    s.wait_log_event("reload", result="rejected")
    c = s.logged_in("journal1")
    c.logout()
    s.wait_log_event("client_close", mailbox="journal1")
    lines = s.log_text(this_run=True).splitlines()
    assert lines
    want = {"error": "<3>", "warn": "<4>", "info": "<6>", "debug": "<7>"}
    seen = set()
    for ln in lines:
        fields, valid = harness.parse_log_line(ln)
        assert valid, ln
        assert ln.startswith(want[fields["level"]] + "level="), ln
        seen.add(ln[:3])
    assert {"<3>", "<4>", "<6>", "<7>"} <= seen, seen


def test_no_prefix_unless_stderr_is_the_journal(make_shim, make_fake, tmp_path):
    fe = make_fake()
    other = tmp_path / "other"
    other.write_text("")
    # Inherited from a journal-connected parent but stderr went elsewhere;
    # garbage; unset.
    for env in ({"JOURNAL_STREAM": stream_id(str(other))},
                {"JOURNAL_STREAM": "not-a-stream"},
                {"JOURNAL_STREAM": None}):
        s = start_with_env(make_shim, fe, env)
        s.wait_log_event("listening")
        s.stop()
        lines = s.log_text(this_run=True).splitlines()
        assert lines
        for ln in lines:
            assert not ln.startswith("<"), (env, ln)
            assert harness.parse_log_line(ln)[1], (env, ln)
            assert ln[:4].isdigit() and ln[23:25] == "Z ", (env, ln)


def test_values_quoted_and_read_back(make_shim, make_fake):
    fe = make_fake()
    s = make_shim(fe.port)
    # A login name holding a space, quotes, '=', a backslash and a tab.
    odd = 'example.com/NPUMAdmin1/a b"c=d\\e\tf'
    c = s.client()
    r = c.login(odd, "wrong")
    assert r.status == "NO", r
    c.close()
    # A reload rejected for a value that holds quotes, '=' and a backslash:
    # the error quotes the value.
    with open(s.ini_path, "a") as f:
        f.write('[pool]\nlogin_rate = "x=1" \\ y\n')
    s.proc.send_signal(signal.SIGHUP)
    s.wait_log_event("reload", result="rejected")
    rej = s.log_events("reload_rejected")
    assert any("[pool] login_rate: '\"x=1\" \\ y' is not a number" in e["what"] for e in rej), rej
    text = s.log_text(this_run=True)
    for ln in text.splitlines():
        assert harness.parse_log_line(ln)[1], ln
    # Whatever line names the odd login, it reads back unchanged.
    assert any(odd in v for ln in text.splitlines()
               for v in harness.parse_log_line(ln)[0].values()), text[-3000:]
    assert '\\"x=1\\" \\\\ y' in text, text[-3000:]


def test_start_errors_are_log_lines(make_shim, make_fake, imapshim_bin):
    """Not -t: a configuration with errors is refused in logfmt lines."""
    fe = make_fake()
    s = make_shim(fe.port, start=False, config={
        "pool": {"no_such_key": '"x" = y', "session_budget": "40"}})
    s.write_ini()
    p = subprocess.run([imapshim_bin, "-c", s.ini_path], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30)
    assert p.returncode == 1, p
    lines = p.stderr.decode(errors="replace").splitlines()
    parsed = [harness.parse_log_line(ln) for ln in lines]
    assert lines and all(ok for _, ok in parsed), lines
    events = [(f["event"], f.get("what", f.get("reason"))) for f, _ in parsed]
    assert any(e == "config_error" and "unknown key 'no_such_key'" in w for e, w in events), events
    assert any(e == "config_warning" and "session_budget 40" in w for e, w in events), events
    assert events[-1] == ("start", "errors in the configuration"), events


def test_check_reports_unusable_budget(make_shim, make_fake, imapshim_bin):
    fe = make_fake()
    s = make_shim(fe.port, start=False, config={
        "pool": {"session_budget": "2048"},
        # few enough clients for any open-file limit: the budget warning
        # is to be the only one
        "shim": {"log_level": "INFO", "max_clients": "1000"}})
    s.write_ini()
    rc, out, err = run_check(imapshim_bin, s.ini_path)
    assert rc == 0, (out, err)
    assert "configuration is valid" in out
    # two admin accounts at 16 each (harness.ImapShim)
    assert ("[pool] session_budget: session_budget 2048 is more than the admin "
            "accounts allow together (32); imapshim will use at most 32") in err, err
    assert err.count("\n") == 1, err
    # The start logs it as config_warning, and runs.
    s.start()
    w = s.wait_log_event("config_warning")
    assert "imapshim will use at most 32" in w[0]["what"], w
    assert w[0]["level"] == "warn"
    s.logged_in("budget1").logout()


def test_check_warns_about_cleartext_passwords(make_shim, make_fake, imapshim_bin):
    fe = make_fake()
    s = make_shim(fe.port, start=False, config={
        "upstream": {"tls": "none"},
        "shim": {"listen_starttls": "0.0.0.0:%d" % harness.free_port(),
                 "allow_plaintext_login": "yes"}})
    s.write_ini()
    rc, out, err = run_check(imapshim_bin, s.ini_path)
    assert rc == 0, (out, err)
    assert "[upstream] tls: none sends the admin accounts' passwords to Exchange in clear" in err, err
    assert "[shim] allow_plaintext_login: yes while listen_starttls = 0.0.0.0:" in err, err
    assert "is not a loopback address" in err, err
    # On loopback (as the tests run): no such warning.
    s.config["shim"]["listen_starttls"] = "127.0.0.1:%d" % s.port_starttls
    s.write_ini()
    rc, out, err = run_check(imapshim_bin, s.ini_path)
    assert rc == 0 and "allow_plaintext_login" not in err, (out, err)
