"""
End-to-end tests of imapshim's status endpoint (DESIGN.md 3.6): GET /metrics
(Prometheus text format 0.0.4) and GET /status (JSON) of a running imapshim
in front of a real Dovecot, and contrib/imapshim-top reading it.

  format     /metrics passes a strict parser of the text format: HELP and
             TYPE for every family, sample and label syntax, every sample
             under its family's TYPE, no duplicate series, histogram buckets
             cumulative with ascending le and +Inf == _count.
  numbers    after N client logins of distinct mailboxes: N upstream logins
             ok, N upstream sessions (== the sessions Dovecot has open for
             those mailboxes), N attached clients; LOGOUT + LOGIN of the same
             mailbox counts one pool reuse and no new Dovecot login.
  json       /status is valid JSON with the documented fields, and its
             numbers agree with each other and with /metrics.
  secrets    no admin password (raw or escaped) in either document.
  http       404 for other paths, 405 for other methods, content types.
  top        imapshim-top --once prints the admin names and exits 0.
"""

import json
import math
import os
import random
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

import harness

ADMIN1, ADMIN2 = "NPUMAdmin1", "NPUMAdmin2"
TOP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                   "contrib", "imapshim-top")
REQUIRED = {
    "imapshim_clients": "gauge",
    "imapshim_upstream_sessions": "gauge",
    "imapshim_session_budget": "gauge",
    "imapshim_admin_max_sessions": "gauge",
    "imapshim_queue_length": "gauge",
    "imapshim_queue_oldest_wait_seconds": "gauge",
    "imapshim_upstream_logins_total": "counter",
    "imapshim_login_retries_total": "counter",
    "imapshim_pool_reuse_total": "counter",
    "imapshim_queue_wait_seconds": "histogram",
    "imapshim_queue_timeouts_total": "counter",
    "imapshim_server_up": "gauge",
    "imapshim_admin_quarantined": "gauge",
    "imapshim_command_seconds": "histogram",
    "imapshim_clients_refused_total": "counter",
    "imapshim_build_info": "gauge",
}
CLIENT_STATES = ("unauthenticated", "attached", "parked", "waiting")


# ---------------------------------------------------- strict exposition parser

class PromError(AssertionError):
    pass


NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
HELP_RE = re.compile(r"^# HELP (%s) (.*)$" % NAME)
TYPE_RE = re.compile(r"^# TYPE (%s) (counter|gauge|histogram|summary|untyped)$" % NAME)
SAMPLE_NAME_RE = re.compile(r"^(%s)" % NAME)
VALUE_RE = re.compile(r"^(?:[+-]?Inf|NaN|[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$")


def _parse_labels(s, i, line):
    """Parse {a="x",b="y"} starting at s[i] == '{'; returns (dict, index after)."""
    labels = {}
    i += 1
    while True:
        if s[i] == "}":
            return labels, i + 1
        m = re.compile(LABEL).match(s, i)
        if not m or s[m.end():m.end() + 2] != '="':
            raise PromError("bad label syntax at %d: %r" % (i, line))
        name = m.group(0)
        i = m.end() + 2
        val = []
        while True:
            if i >= len(s):
                raise PromError("unterminated label value: %r" % line)
            c = s[i]
            if c == "\\":
                nxt = s[i + 1:i + 2]
                if nxt not in ("\\", '"', "n"):
                    raise PromError("bad escape \\%s: %r" % (nxt, line))
                val.append({"\\": "\\", '"': '"', "n": "\n"}[nxt])
                i += 2
                continue
            if c == '"':
                i += 1
                break
            if c == "\n":
                raise PromError("raw newline in label value: %r" % line)
            val.append(c)
            i += 1
        if name in labels:
            raise PromError("label %s twice: %r" % (name, line))
        labels[name] = "".join(val)
        if s[i] == ",":
            i += 1
            if s[i] == "}":
                return labels, i + 1        # trailing comma is legal in 0.0.4
        elif s[i] != "}":
            raise PromError("expected , or } at %d: %r" % (i, line))


def _value(v, line):
    if not VALUE_RE.match(v):
        raise PromError("bad sample value %r: %r" % (v, line))
    return float(v.replace("Inf", "inf"))


def parse_prom(text):
    """Strictly parse a text exposition.  Returns (families, samples):
    families {name: {"type", "help"}}, samples [(name, labels, value, family)]."""
    if not text.endswith("\n"):
        raise PromError("exposition does not end with a newline")
    families, samples, seen_series = {}, [], set()
    current, closed = None, set()
    for line in text[:-1].split("\n"):
        if line == "":
            raise PromError("empty line")
        m = HELP_RE.match(line)
        if m or line.startswith("# TYPE "):
            t = TYPE_RE.match(line)
            if not m and not t:
                raise PromError("bad TYPE line: %r" % line)
            name = (m or t).group(1)
            if name in closed:
                raise PromError("family %s declared again after other families: %r"
                                % (name, line))
            fam = families.setdefault(name, {"type": None, "help": None, "n": 0})
            if fam["n"]:
                raise PromError("HELP/TYPE after samples of %s" % name)
            if m:
                if fam["help"] is not None:
                    raise PromError("second HELP for %s" % name)
                if re.search(r"\\[^\\n]", m.group(2)):
                    raise PromError("bad escape in HELP: %r" % line)
                fam["help"] = m.group(2)
            else:
                if fam["type"] is not None:
                    raise PromError("second TYPE for %s" % name)
                fam["type"] = t.group(2)
            if current is not None and current != name:
                closed.add(current)
            current = name
            continue
        if line.startswith("#"):
            continue
        m = SAMPLE_NAME_RE.match(line)
        if not m:
            raise PromError("bad sample line: %r" % line)
        sname, i = m.group(1), m.end()
        labels = {}
        if i < len(line) and line[i] == "{":
            labels, i = _parse_labels(line, i, line)
        rest = line[i:]
        if not rest.startswith(" "):
            raise PromError("no space before the value: %r" % line)
        parts = rest[1:].split(" ")
        if len(parts) not in (1, 2) or (len(parts) == 2 and not re.match(r"^-?\d+$", parts[1])):
            raise PromError("bad value/timestamp: %r" % line)
        value = _value(parts[0], line)
        fam = None
        if sname in families and families[sname]["type"] not in ("histogram", "summary"):
            fam = sname
        else:
            for suf in ("_bucket", "_sum", "_count"):
                if sname.endswith(suf) and families.get(sname[:-len(suf)], {}).get("type") \
                        == "histogram":
                    fam = sname[:-len(suf)]
                    if (suf == "_bucket") != ("le" in labels):
                        raise PromError("le label misplaced: %r" % line)
                    break
        if fam is None or families[fam]["type"] is None:
            raise PromError("sample of an undeclared family: %r" % line)
        if fam != current:
            raise PromError("sample not grouped under its family's TYPE: %r" % line)
        if "le" in labels and sname != fam + "_bucket":
            raise PromError("le label outside a histogram bucket: %r" % line)
        key = (sname, tuple(sorted(labels.items())))
        if key in seen_series:
            raise PromError("duplicate series: %r" % line)
        seen_series.add(key)
        families[fam]["n"] += 1
        samples.append((sname, labels, value, fam))
    for name, f in families.items():
        if f["type"] is None or f["help"] is None:
            raise PromError("family %s lacks TYPE or HELP" % name)
    _check_histograms(families, samples)
    return families, samples


def _check_histograms(families, samples):
    for fam, f in families.items():
        if f["type"] != "histogram":
            continue
        series = {}
        for name, labels, value, sfam in samples:
            if sfam != fam:
                continue
            key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            s = series.setdefault(key, {"buckets": [], "sum": None, "count": None})
            if name.endswith("_bucket"):
                s["buckets"].append((_value(labels["le"], labels["le"]), value))
            elif name.endswith("_sum"):
                s["sum"] = value
            else:
                s["count"] = value
        for key, s in series.items():
            b = s["buckets"]
            if not b or not math.isinf(b[-1][0]):
                raise PromError("%s%r: no +Inf bucket last" % (fam, key))
            if s["sum"] is None or s["count"] is None:
                raise PromError("%s%r: _sum or _count missing" % (fam, key))
            for (le0, v0), (le1, v1) in zip(b, b[1:]):
                if not le1 > le0:
                    raise PromError("%s%r: le bounds not ascending" % (fam, key))
                if v1 < v0:
                    raise PromError("%s%r: buckets not cumulative" % (fam, key))
            if b[-1][1] != s["count"]:
                raise PromError("%s%r: +Inf bucket %r != _count %r"
                                % (fam, key, b[-1][1], s["count"]))


def test_parser_rejects_bad_expositions():
    """The checker itself: each of these must be refused."""
    ok = ("# HELP a_total x\n# TYPE a_total counter\na_total 1\n"
          "# HELP h y\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\n"
          "h_sum 3.5\nh_count 2\n")
    parse_prom(ok)
    bad = [
        ok.replace("# TYPE a_total counter\n", ""),                 # no TYPE
        ok.replace("# HELP a_total x\n", ""),                       # no HELP
        ok.replace("h_count 2", "h_count 3"),                       # +Inf != count
        ok.replace('h_bucket{le="+Inf"} 2', 'h_bucket{le="+Inf"} 0'),  # not cumulative
        ok.replace('h_bucket{le="+Inf"} 2\n', ""),                  # no +Inf
        ok + "b 1\n",                                               # undeclared
        ok + 'a_total{x="1} 1\n',                                   # unterminated
        ok.replace("a_total 1", 'a_total{x="\\q"} 1'),              # bad escape
        ok.replace("a_total 1", "a_total one"),                     # bad value
        ok.replace("a_total 1", "a_total 1\na_total 2"),            # duplicate
        ok + "a_total 1\n",                                         # not grouped
        ok[:-1],                                                    # no final newline
    ]
    for text in bad:
        with pytest.raises(PromError):
            parse_prom(text)


# --------------------------------------------------------------- helpers

def http_get(port, path, method="GET"):
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def scrape(port):
    code, headers, body = http_get(port, "/metrics")
    assert code == 200, (code, body[:500])
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8", headers
    text = body.decode("utf-8")
    fams, samples = parse_prom(text)
    return text, fams, samples


def status(port):
    code, headers, body = http_get(port, "/status")
    assert code == 200, (code, body[:500])
    assert headers["Content-Type"].split(";")[0].strip() == "application/json", headers
    return body, json.loads(body.decode("utf-8"))


def value(samples, name, **labels):
    vals = [v for (n, l, v, _) in samples if n == name and l == labels]
    assert len(vals) == 1, "series %s%r: found %d" % (name, labels, len(vals))
    return vals[0]


def total(samples, name, **match):
    return sum(v for (n, l, v, _) in samples
               if n == name and all(l.get(k) == x for k, x in match.items()))


def unique_mailbox(prefix):
    return "%s-%d" % (prefix, random.randrange(10 ** 9))


def dovecot_open(dovecot, mailboxes):
    """Sessions Dovecot has open for these mailboxes, from its log."""
    return sum(dovecot.login_count(m) - dovecot.disconnect_count(m) for m in mailboxes)


@pytest.fixture
def status_shim(make_shim, dovecot):
    """imapshim in session mode in front of Dovecot, with status_listen on
    a free loopback port (shim.status_port)."""
    port = harness.free_port()
    shim = make_shim(dovecot.port_imaps, config={
        "shim": {"status_listen": "127.0.0.1:%d" % port},
        "upstream": {"login_format": "{mailbox}*{admin}"},
        "pool": {"mode": "session", "session_budget": "20", "reuse_timeout": "60s",
                 "login_rate": "1000", "login_burst": "1000"},
        "admin %s" % ADMIN1: {"max_sessions": "12"},
        "admin %s" % ADMIN2: {"max_sessions": "5"},
    })
    shim.status_port = port
    harness.wait_port(port, proc=shim.proc, what="imapshim status endpoint")
    return shim


# ------------------------------------------------------------------ tests

def test_metrics_format_at_start(status_shim):
    """A fresh daemon: every required family with HELP and TYPE, zero series
    for each admin x server x login/idle/leased, the configured numbers."""
    text, fams, samples = scrape(status_shim.status_port)
    for name, typ in REQUIRED.items():
        assert name in fams, "family %s missing:\n%s" % (name, text)
        assert fams[name]["type"] == typ, (name, fams[name])
    assert all(n.startswith("imapshim_") for n in fams), sorted(fams)
    server = status_shim.config["upstream"]["servers"]      # "127.0.0.1:PORT", as written
    assert value(samples, "imapshim_session_budget") == 20
    assert value(samples, "imapshim_admin_max_sessions", admin=ADMIN1) == 12
    assert value(samples, "imapshim_admin_max_sessions", admin=ADMIN2) == 5
    assert value(samples, "imapshim_server_up", server=server) == 1
    for admin in (ADMIN1, ADMIN2):
        assert value(samples, "imapshim_admin_quarantined", admin=admin) == 0
        for st in ("login", "idle", "leased"):
            assert value(samples, "imapshim_upstream_sessions",
                         admin=admin, server=server, state=st) == 0
    for st in ("attached", "parked", "waiting"):
        assert value(samples, "imapshim_clients", state=st) == 0
    # The harness's readiness probes (connect, close) are unauthenticated
    # clients for a moment.
    harness.wait_until(lambda: value(scrape(status_shim.status_port)[2], "imapshim_clients",
                                     state="unauthenticated") == 0,
                       timeout=5, what="the readiness probes to be closed")
    for r in ("ok", "refused", "error"):
        assert value(samples, "imapshim_upstream_logins_total", result=r) == 0
    assert value(samples, "imapshim_pool_reuse_total") == 0
    assert value(samples, "imapshim_queue_length") == 0
    assert value(samples, "imapshim_queue_wait_seconds_count") == 0
    info = [l for (n, l, v, _) in samples if n == "imapshim_build_info"]
    assert len(info) == 1 and info[0].get("version"), info


def test_metrics_match_upstream(status_shim, dovecot, admins):
    """N client logins of distinct mailboxes: N upstream logins ok, N
    upstream sessions, as many as Dovecot has open, N attached clients.
    Then LOGOUT + LOGIN of one mailbox: one pool reuse, no new upstream
    login, no new Dovecot login."""
    shim, port = status_shim, status_shim.status_port
    n = 4
    mbxs = [unique_mailbox("st%d" % i) for i in range(n)]
    clients = [shim.logged_in(m, admin=(ADMIN1, ADMIN2)[i % 2]) for i, m in enumerate(mbxs)]
    try:
        harness.wait_until(lambda: dovecot_open(dovecot, mbxs) == n, timeout=8,
                           what="Dovecot to show %d open sessions" % n)
        text, _, samples = scrape(port)
        assert value(samples, "imapshim_upstream_logins_total", result="ok") == n, text
        assert total(samples, "imapshim_upstream_sessions") == n, text
        assert total(samples, "imapshim_upstream_sessions") == dovecot_open(dovecot, mbxs)
        assert total(samples, "imapshim_upstream_sessions", state="leased") == n, text
        assert value(samples, "imapshim_clients", state="attached") == n, text
        assert value(samples, "imapshim_clients", state="waiting") == 0, text
        assert value(samples, "imapshim_queue_length") == 0, text
        # The pool picks the admin account; the split is its business, the
        # per-admin series must add up.
        assert total(samples, "imapshim_upstream_sessions", admin=ADMIN1) + \
            total(samples, "imapshim_upstream_sessions", admin=ADMIN2) == n, text
        # LOGIN was answered: at least n LOGIN commands timed.
        assert value(samples, "imapshim_command_seconds_count", command="login") >= n, text

        # LOGOUT of mailbox 0: its session returns to the pool.
        clients[0].logout()
        clients[0].close()
        harness.wait_until(
            lambda: total(scrape(port)[2], "imapshim_upstream_sessions", state="idle") == 1,
            timeout=5, what="the logged-out mailbox's session to be idle in the pool")
        _, _, samples = scrape(port)
        assert value(samples, "imapshim_clients", state="attached") == n - 1
        assert total(samples, "imapshim_upstream_sessions") == n

        # LOGIN again: served by the pooled session.
        clients[0] = shim.logged_in(mbxs[0], admin=ADMIN1)
        text, _, samples = scrape(port)
        assert value(samples, "imapshim_pool_reuse_total") == 1, text
        assert value(samples, "imapshim_upstream_logins_total", result="ok") == n, text
        assert value(samples, "imapshim_clients", state="attached") == n, text
        assert total(samples, "imapshim_upstream_sessions") == n, text
        assert dovecot.login_count(mbxs[0]) == 1, "a new Dovecot login despite reuse"
        assert dovecot_open(dovecot, mbxs) == n
        # A grant from the pool counts as a (short) queue wait.
        assert value(samples, "imapshim_queue_wait_seconds_count") >= 1, text
    finally:
        for c in clients:
            c.close()


def test_status_json(status_shim, dovecot, admins):
    """/status is valid JSON with the documented fields, and its numbers agree
    with each other, with /metrics and with what the clients did."""
    shim, port = status_shim, status_shim.status_port
    mbxs = [unique_mailbox("sj%d" % i) for i in range(3)]
    clients = [shim.logged_in(m, admin=ADMIN1) for m in mbxs]
    try:
        _, st = status(port)
        for key in ("version", "uptime_seconds", "mode", "budget", "queue", "clients",
                    "admins", "servers", "counters"):
            assert key in st, "missing %s: %r" % (key, st)
        assert st["mode"] == "session"
        assert isinstance(st["uptime_seconds"], (int, float)) and st["uptime_seconds"] >= 0
        b = st["budget"]
        assert b["total"] == 20 and b["used"] == 3 and b["free"] == 17, b
        assert st["queue"] == {"length": 0, "oldest_wait_seconds": 0}, st["queue"]
        assert set(st["clients"]) == set(CLIENT_STATES), st["clients"]
        assert st["clients"]["attached"] == 3, st["clients"]
        names = [a["name"] for a in st["admins"]]
        assert names == [ADMIN1, ADMIN2], names
        a1, a2 = st["admins"]
        for a in (a1, a2):
            for key in ("name", "max_sessions", "sessions", "used", "free", "quarantined"):
                assert key in a, (key, a)
            assert a["quarantined"] is False
            assert sum(a["sessions"].values()) == a["used"], a
            assert a["free"] == a["max_sessions"] - a["used"], a
            for s in ("login", "idle", "leased"):
                assert s in a["sessions"], a
        assert a1["max_sessions"] == 12 and a2["max_sessions"] == 5, st["admins"]
        assert a1["sessions"]["leased"] + a2["sessions"]["leased"] == 3, st["admins"]
        assert sum(a["used"] for a in st["admins"]) == b["used"]
        assert len(st["servers"]) == 1, st["servers"]
        srv = st["servers"][0]
        assert srv["server"] == shim.config["upstream"]["servers"], srv
        assert srv["up"] is True and srv["consecutive_failures"] == 0, srv
        assert "last_failure" in srv
        c = st["counters"]
        assert c["logins"] == {"ok": 3, "refused": 0, "error": 0}, c
        assert c["reuse"] == 0 and c["queue_timeouts"] == 0, c

        # The same numbers in /metrics.
        _, _, samples = scrape(port)
        assert total(samples, "imapshim_upstream_sessions") == b["used"]
        assert value(samples, "imapshim_upstream_logins_total", result="ok") == \
            c["logins"]["ok"]
        assert value(samples, "imapshim_clients", state="attached") == \
            st["clients"]["attached"]
    finally:
        for cl in clients:
            cl.close()


def test_no_password_in_status(status_shim, dovecot, admins):
    """Neither document carries an admin password, raw or in either format's
    escaping (NPUMAdmin2's holds a quote, a backslash and ';#')."""
    shim, port = status_shim, status_shim.status_port
    with shim.logged_in(unique_mailbox("pw"), admin=ADMIN2):
        text, _, _ = scrape(port)
        body, _ = status(port)
    docs = (text.encode(), body)
    for pw in admins.values():
        forms = {pw, json.dumps(pw)[1:-1],
                 pw.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")}
        # The random tail alone, in case a renderer mangled the rest.
        forms.add(pw[-16:])
        for doc in docs:
            for f in forms:
                assert f.encode() not in doc, "a password form appears in a status document"


def test_http_errors(status_shim):
    port = status_shim.status_port
    for path in ("/", "/metric", "/status/", "/metrics/x", "/../metrics"):
        code, _, _ = http_get(port, path)
        assert code == 404, (path, code)
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
        code, headers, _ = http_get(port, "/metrics", method=method)
        assert code == 405, (method, code)
        assert "GET" in (headers.get("Allow") or ""), headers
    code, _, _ = http_get(port, "/metrics?x=1")
    assert code == 200
    # The daemon still serves IMAP and status after all that.
    _, st = status(port)
    assert st["budget"]["total"] == 20


def test_imapshim_top_once(status_shim, admins):
    """contrib/imapshim-top --once prints a snapshot naming the admin accounts
    and the server, and exits 0; against a dead port it exits 1."""
    shim, port = status_shim, status_shim.status_port
    with shim.logged_in(unique_mailbox("top"), admin=ADMIN1):
        r = subprocess.run([sys.executable, TOP, "--once", "--url",
                            "http://127.0.0.1:%d" % port],
                           capture_output=True, timeout=20)
    out = r.stdout.decode(errors="replace")
    assert r.returncode == 0, (r.returncode, out, r.stderr)
    assert ADMIN1 in out and ADMIN2 in out, out
    assert shim.config["upstream"]["servers"] in out, out
    assert "\x1b[" not in out, "--once must not clear the screen"
    for pw in admins.values():
        assert pw not in out
    dead = harness.free_port()
    r = subprocess.run([sys.executable, TOP, "--once", "--url", "http://127.0.0.1:%d" % dead],
                       capture_output=True, timeout=20)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
