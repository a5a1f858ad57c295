#!/usr/bin/env python3
"""
run-bench.py - the `make bench` driver: imapshim against the same load sent
straight to its upstream, in one run.

Starts a throwaway PKI and Dovecot (tests/integration/harness.py, as the
integration tests do), fills a few mailboxes, and starts imapshim in front of
Dovecot with TLS on both sides ([pool] mode = session, session_budget 32, two
admin accounts of 16 sessions).  Then, for each scenario, runs imapshim-bench
alternately straight to Dovecot's imaps port ("direct", login
mailbox*NPUMAdmin1) and through imapshim ("shim", login
example.com/NPUMAdmin1/mailbox): direct, shim, direct, shim.  Around every run
it samples imapshim's CPU time (utime + stime from /proc/PID/stat), Dovecot's
log (successful logins) and, during the run, the established loopback TCP
connections to each port (/proc/net/tcp), and prints one table, with the
previous run's figures and what one core carries under it.  --upstream fake
puts tests/integration/fake_exchange.py behind imapshim instead (idle only):
imapshim's memory at 10,000 and more idle clients.  Shared helpers:
benchlib.py.

Only the Python standard library.  Bounded: every bench run is killed after
its duration + 40 s, and the whole run takes about 4 minutes (--quick: about
1.5 minutes).  Exit status: 0, 1 when a bench run failed (verification or
error rate), 77 when Dovecot is not installed.
"""

import argparse
import json
import os
import re
import secrets
import sys
import threading
import time

import benchlib as bl
from benchlib import fmt, harness

import fake_exchange  # noqa: E402  (tests/integration, on the path benchlib set)

ADMIN = "NPUMAdmin1"

IDLE_SESSIONS = 2000         # the figure; fewer if RLIMIT_NOFILE is low
IDLE_RAMP_S = 25             # logins spread over at least this many seconds...
IDLE_RAMP_RATE = 300         # ...and at most this many a second
FAKE_RAMP_RATE = 50          # the fake Exchange (Python, a thread and a TLS
                             # handshake per upstream login) with budget 16:
                             # about 60 logins a second on a loaded 2-core box
IDLE_BUDGET = 16
# Memory is read this long after the last client went idle: twice the time
# imapshim takes to give a quiet session's TLS buffers back (2 s quiet, seen
# by a 2 s tick) and then its free heap to the system.
IDLE_SETTLE_S = 8
LAST_JSON = "bench-last.json"   # the previous run's rows, in the build directory
POLL_LAST_JSON = "bench-poll-last.json"     # poll-bench.py's, for "one core"
CHURN_MAILBOXES = 200        # issue 15's measurement: 50 clients over 200
# churn's pool: every mailbox keeps its upstream session (a warm pool), and
# logins are not paced below what Dovecot takes, so the first run warms it
# within a second or two (at the default login_rate of 20 it would take 10 s)
# (a scenario "X-variant" runs imapshim-bench's scenario X)
CHURN_POOL = {"session_budget": "256", "login_rate": "200", "login_burst": "200"}

# name, bench options, imapshim [pool] settings, what the scenario shows.
# Every scenario runs in multiplex mode (the default).  idle and poll hold
# more client sessions than the budget; churn, steady and append get a budget
# larger than their mailboxes, so pooled sessions are reused, not evicted.
SCENARIOS = [
    ("idle", [],                # idle_opts(): the count is an option
     # parked clients poll after the measurement, not during it; logins
     # paced only as far as Dovecot needs (the ramp sets the pace)
     {"session_budget": str(IDLE_BUDGET), "idle_poll_interval": "5m",
      "login_rate": "500", "login_burst": "500"},
     "%d sessions LOGIN, SELECT, IDLE and hold" % IDLE_SESSIONS),
    # every connection a full TLS handshake, as NuPoint's are
    ("churn", ["--sessions", "50", "--mailboxes", str(CHURN_MAILBOXES)], CHURN_POOL,
     "connect, LOGIN, SELECT, STATUS|FETCH, LOGOUT; 50 clients over %d mailboxes"
     % CHURN_MAILBOXES),
    # the same with clients that resume their last TLS session (both targets)
    ("churn-resume", ["--sessions", "50", "--mailboxes", str(CHURN_MAILBOXES),
                      "--resume"], CHURN_POOL,
     "churn, each client resuming its previous TLS session"),
    ("poll", ["--sessions", "32"], {"session_budget": "16"},
     "32 mailboxes poll NOOP, UID SEARCH UNSEEN, STATUS"),
    ("steady", ["--sessions", "16"], {"session_budget": "32"},
     "closed loop NOOP, UID FETCH 1:* (FLAGS), STATUS"),
    ("append", ["--sessions", "8", "--mailbox-base", "3000"], {"session_budget": "32"},
     "60 KB voice messages by sync literal, verified byte-exact, then expunged"),
]


# ------------------------------------------------------------- sampling

def group_pss_kib(pgid):
    """Proportional set size (shared pages split between sharers) summed
    over every process of process group pgid: Dovecot's master and all its
    login, auth and imap processes."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as f:
                rest = f.read().rsplit(")", 1)[1].split()
            if int(rest[2]) != pgid:
                continue
            with open("/proc/%s/smaps_rollup" % name) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total


def shim_heap(shim):
    """imapshim's heap in use (its /metrics gauge), bytes."""
    return harness.metric(bl.status_port(shim), "imapshim_heap_in_use_bytes")


def _read_all(path):
    """The whole file in as few read()s as possible: /proc/net/tcp resumes
    by record offset between reads, so a table that changes in between can
    show a socket twice (the caller also dedupes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            b = os.read(fd, 4 << 20)
            if not b:
                return b"".join(chunks)
            chunks.append(b)
    finally:
        os.close(fd)


def established_to(ports):
    """{port: n} established TCP connections to 127.0.0.1:port / [::1]:port,
    counted from the connecting side (remote address is the port)."""
    seen = {p: set() for p in ports}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            data = _read_all(path).decode(errors="replace").splitlines()[1:]
        except OSError:
            continue
        for line in data:
            parts = line.split()
            if len(parts) < 4 or parts[3] != "01":      # ESTABLISHED
                continue
            port = int(parts[2].rsplit(":", 1)[1], 16)
            if port in seen and int(parts[1].rsplit(":", 1)[1], 16) not in seen:
                seen[port].add((parts[1], parts[2]))    # the connecting side
    return {p: len(v) for p, v in seen.items()}


class PeakSampler(threading.Thread):
    """Peak established connections to each port, sampled every interval
    seconds."""

    def __init__(self, ports, pss_pgid=None, interval=0.05):
        super().__init__(daemon=True)
        self.ports, self.interval = ports, interval
        self.peak = dict.fromkeys(ports, 0)
        self.pss_pgid = pss_pgid        # also track this group's peak PSS
        self.peak_pss = 0
        self.stop_ev = threading.Event()

    def run(self):
        last_pss = 0.0
        while not self.stop_ev.is_set():
            for p, n in established_to(self.ports).items():
                self.peak[p] = max(self.peak[p], n)
            if self.pss_pgid and time.monotonic() - last_pss >= 1.0:
                last_pss = time.monotonic()
                self.peak_pss = max(self.peak_pss, group_pss_kib(self.pss_pgid))
            self.stop_ev.wait(self.interval)

    def stop(self):
        self.stop_ev.set()
        self.join(2)
        return self.peak


class LogCounter:
    """Successful IMAP logins in Dovecot's log since the last mark()."""

    RE = re.compile(r"imap-login: (?:Info: )?Login: user=<")

    def __init__(self, path):
        self.path = path
        self.off = 0

    def mark(self):
        try:
            self.off = os.path.getsize(self.path)
        except OSError:
            self.off = 0

    def count(self):
        with open(self.path, "rb") as f:
            f.seek(self.off)
            return len(self.RE.findall(f.read().decode(errors="replace")))


class FakeLogins:
    """LogCounter's count for the fake upstream (--upstream fake): its
    record of successful LOGINs."""

    def __init__(self, fake):
        self.fake, self.off = fake, 0

    def mark(self):
        self.off = len(self.fake.logins(ok=True))

    def count(self):
        return len(self.fake.logins(ok=True)) - self.off


# ------------------------------------------------------------- setup

def populate(dv, mailboxes, per_box):
    """A few messages in each mailbox, straight into Dovecot."""
    for n in mailboxes:
        with dv.connect("mbox%05d" % n, ADMIN) as c:
            for k in range(per_box):
                msg = ("From: <vm@example.com>\r\nTo: <mbox%05d@example.com>\r\n"
                       "Subject: seed %d\r\nMessage-ID: <seed.%d.%d@bench>\r\n\r\n"
                       "seed message %d\r\n" % (n, k, n, k, k)).encode()
                r = c.append("INBOX", msg, flags="\\Seen" if k % 2 == 0 else None)
                if r.status != "OK":
                    raise harness.HarnessError("seed APPEND failed: %r" % r)
            c.command("LOGOUT")


# ------------------------------------------------------------- runs

def shim_tls_handshakes(shim):
    """(full, resumed) upstream TLS handshakes from imapshim's /metrics."""
    return tuple(int(harness.metric(bl.status_port(shim), "imapshim_upstream_tls_handshakes_total",
                                    resumed=r) or 0) for r in ("no", "yes"))


def run_bench(args, env, scen, opts, target, shim, uplog):
    """One imapshim-bench run; returns its JSON plus the samples.  env:
    the CA and password file, and the upstream's port and (Dovecot) process
    group; uplog counts the upstream's logins (LogCounter, FakeLogins)."""
    if target == "direct":
        port, user_fmt = env["up_port"], "%s*" + ADMIN
    else:
        port, user_fmt = shim.port, "example.com/%s/%%s" % ADMIN
    cmd = [args.bench, "--host", harness.HOST, "--port", str(port), "--tls",
           "--cafile", env["ca"], "--password-file", env["pwfile"],
           "--user-format", user_fmt, "--scenario", scen.split("-")[0],
           "--duration", str(duration_for(args, scen)), "--label", target] + opts
    if scen == "poll":
        cmd += ["--poll-interval", str(args.poll_interval)]
    if target == "shim" and scen == "idle":
        cmd += ["--pid", str(shim.proc.pid)]
    # /proc/net/tcp at 20,000 sockets is megabytes: read it less often
    sampler = PeakSampler([env["up_port"], shim.port],
                          pss_pgid=env["up_pgid"] if scen == "idle" else None,
                          interval=0.05 if args.idle_sessions <= IDLE_SESSIONS else 1.0)
    uplog.mark()
    cpu0 = bl.proc_cpu_s(shim.proc.pid)
    rss0 = bl.proc_kib(shim.proc.pid)
    tls0 = shim_tls_handshakes(shim)
    heap = {}
    if target == "shim" and scen == "idle":
        heap["before"] = shim_heap(shim)

    def on_line(line):
        # settled: every client idle for --settle s; the heap gauge now,
        # while the clients still hold
        if "imapshim-bench: settled:" in line and heap:
            try:
                heap["after"] = shim_heap(shim)
            except OSError:
                pass
    sampler.start()
    run = bl.BenchRun(cmd, duration_for(args, scen) + 60, on_line)
    try:
        res = run.result()
    finally:
        peak = sampler.stop()
    cpu1 = bl.proc_cpu_s(shim.proc.pid)
    rss1 = bl.proc_kib(shim.proc.pid)
    tls1 = shim_tls_handshakes(shim)
    time.sleep(0.3)                         # Dovecot's log is written async
    if heap.get("after") is not None and res.get("idling"):
        res["heap_per_session_kib"] = (heap["after"] - heap["before"]) / 1024.0 / res["idling"]
    res["shim_cpu_s"] = cpu1 - cpu0
    res["shim_rss_kib"] = (rss0, rss1)
    res["dovecot_logins"] = uplog.count()
    res["peak_to_dovecot"] = peak[env["up_port"]]
    res["peak_to_shim"] = peak[shim.port]
    res["dovecot_pss_kib"] = sampler.peak_pss or None
    res["tls_full"], res["tls_resumed"] = tls1[0] - tls0[0], tls1[1] - tls0[1]
    return res


def idle_ramp_s(n, ramp=None):
    return ramp or max(IDLE_RAMP_S, n / IDLE_RAMP_RATE)


def idle_opts(n, ramp):
    # above the 2,000 a client may wait its turn in imapshim's queue
    # longer than the default 30 s: a timeout would reconnect and add load
    return ["--sessions", str(n), "--ramp", "%g" % idle_ramp_s(n, ramp),
            "--settle", str(IDLE_SETTLE_S)] + (["--timeout", "120"] if n > IDLE_SESSIONS
                                               else [])


def duration_for(args, scen):
    """idle must outlast its ramp and settling (it ends once settled)."""
    if scen != "idle":
        return args.duration
    # generous: a loaded machine logs in slower than the ramp, and the run
    # ends as soon as every client idled for IDLE_SETTLE_S anyway
    return max(args.duration, idle_ramp_s(args.idle_sessions, args.idle_ramp) +
               IDLE_SETTLE_S + 60 + args.idle_sessions / 50)


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def lat(res, q, cmd="all"):
    return res.get("latency_ms", {}).get(cmd, {}).get(q)


def summarize(scen, runs):
    d = [r for r in runs if r["label"] == "direct"]
    s = [r for r in runs if r["label"] == "shim"]
    row = {"scenario": scen}
    row["d_ops"] = mean([r["ops_per_s"] for r in d])
    row["s_ops"] = mean([r["ops_per_s"] for r in s])
    row["ratio"] = row["s_ops"] / row["d_ops"] if row["d_ops"] else None
    for q in ("p50", "p99"):
        dv_, sv = mean([lat(r, q) for r in d]), mean([lat(r, q) for r in s])
        row[q + "_add"] = (sv - dv_) if dv_ is not None and sv is not None else None
    ops = sum(r["ops"] for r in s)
    # CPU over the whole run (teardown LOGOUTs included) per measured command
    row["cpu_us"] = 1e6 * sum(r["shim_cpu_s"] for r in s) / ops if ops else None
    row["cpu_s_1k"] = row["cpu_us"] / 1000.0 if row["cpu_us"] is not None else None
    # ... per client connection (churn: each a full TLS handshake) and per
    # scenario iteration (poll: a NOOP, UID SEARCH, STATUS round)
    logins, cycles = sum(r["logins"] for r in s), sum(r["cycles"] for r in s)
    cpu = sum(r["shim_cpu_s"] for r in s)
    row["cpu_us_login"] = 1e6 * cpu / logins if logins else None
    row["cpu_us_cycle"] = 1e6 * cpu / cycles if cycles else None
    full = sum(r["tls_full"] for r in s)
    resumed = sum(r["tls_resumed"] for r in s)
    row["tls_resumed_pct"] = 100.0 * resumed / (full + resumed) if full + resumed else None
    row["tls"] = (full, resumed)
    row["dv_pss"] = (mean([r.get("dovecot_pss_kib") for r in d]),
                     mean([r.get("dovecot_pss_kib") for r in s]))
    for k in ("rss", "pss", "heap"):                # first run: a cold pool
        v = [r[k + "_per_session_kib"] for r in s
             if r.get(k + "_per_session_kib") is not None]
        row[k] = v[0] if v else None
    row["idling"] = s[0].get("idling") if s else None
    row["settled"] = bool(s and s[0].get("settled"))
    clog = sum(r["logins"] for r in s)
    ulog = sum(r["dovecot_logins"] for r in s)
    # logins in the teardown are not in "logins": count every client login
    # Dovecot saw in the direct runs the same way, as a cross-check
    row["up_logins_k"] = 1000.0 * ulog / clog if clog else None
    pc = sum(r["peak_to_shim"] for r in s)
    pu = sum(r["peak_to_dovecot"] for r in s)
    row["up_sess_k"] = 1000.0 * pu / pc if pc else None
    row["direct_check"] = (sum(r["dovecot_logins"] for r in d), sum(r["logins"] for r in d))
    row["errors"] = sum(r["errors_total"] for r in runs)
    row["failed"] = [r["label"] for r in runs if r["exit"] != 0]
    return row


def print_table(rows, out, last):
    """One line per scenario and, under it, the previous run's figures
    (last: load_last()) when it ran that scenario."""
    hdr = ("scenario", "direct ops/s", "shim ops/s", "ratio", "p50 +ms", "p99 +ms",
           "CPU s/1k cmd", "KiB/session", "up logins/1k", "up sess/1k", "TLS resumed",
           "errors")
    cells = []
    pairs = [(label, r) for row in rows for label, r in
             ((row["scenario"], row), ("  last run", last.get(row["scenario"]))) if r]
    for label, r in pairs:
        cells.append((label, fmt(r["d_ops"], ".1f"), fmt(r["s_ops"], ".1f"),
                      fmt(r["ratio"], ".2f"), fmt(r["p50_add"], "+.3f"),
                      fmt(r["p99_add"], "+.3f"), fmt(r["cpu_s_1k"], ".4f"),
                      fmt(r["rss"], ".1f"), fmt(r["up_logins_k"], ".0f"),
                      fmt(r["up_sess_k"], ".0f"),
                      fmt(r["tls_resumed_pct"], ".0f", "-") +
                      ("%" if r["tls_resumed_pct"] is not None else ""),
                      str(r["errors"]) + (" FAIL" if r["failed"] else "")))
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(hdr)]
    line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(hdr, widths)))
    print(line, file=out)
    print("-" * len(line), file=out)
    for c in cells:
        print("  ".join(x.rjust(w) if i else x.ljust(w)
                        for i, (x, w) in enumerate(zip(c, widths))), file=out)


def print_one_core(rows, lrows, out):
    """What one core of this machine carries, from the CPU imapshim spent:
    per command (steady), per client connection with a full TLS handshake
    (churn) and per poll of a parked IDLE client (bench-poll's last run in
    this directory; else the poll scenario's client poll round).  Figures
    of this run, else of the previous one."""
    cur = {r["scenario"]: r for r in rows}

    def cpu(scen, key):
        for src, rs in (("", cur), (", last run", lrows)):
            v = (rs.get(scen) or {}).get(key)
            if v:
                return v, scen + src
        return None, None
    cmd, cmd_src = cpu("steady", "cpu_us")
    login, login_src = cpu("churn", "cpu_us_login")
    poll = bl.load_last(POLL_LAST_JSON).get("cpu_us_per_poll")
    if poll:
        poll_src = "bench-poll's last run: a parked IDLE client's poll"
    else:
        poll, poll_src = cpu("poll", "cpu_us_cycle")
        poll_src = poll_src and poll_src + ": a client's NOOP, UID SEARCH, STATUS round"

    if not (cmd or login or poll):
        return

    def per_s(us):
        return fmt(1e6 / us if us else None, ",.0f")
    print("\none core ~ %s commands/s, %s logins/s (full TLS handshake), %s polls/s"
          % (per_s(cmd), per_s(login), per_s(poll)), file=out)
    print("  = 1 s / imapshim's CPU per item, each load alone: %s us per command (%s), "
          "%s us per client\n  connection with LOGIN, SELECT, a command, LOGOUT (%s), "
          "%s us per poll (%s)" % (fmt(cmd, ".0f"), cmd_src or "not measured",
                                   fmt(login, ".0f"), login_src or "not measured",
                                   fmt(poll, ".0f"), poll_src or "not measured"), file=out)


def last_rows(last):
    """{scenario: row} of the previous run (load_last()), {} when none."""
    try:
        return {r["scenario"]: r for r in last.get("rows", [])}
    except (KeyError, TypeError):
        return {}


def print_idle_memory(row, prev, upstream, out):
    """imapshim's memory per idle client as the OS sees it, beside the
    previous run's at the same count (prev; each count keeps its own)."""
    print("  %-7s imapshim per idle client (upstream: %s), %s:\n"
          "          VmRSS %s, Pss %s, heap in use %s"
          % ("idle", upstream, "%d s after the last of %s went idle"
             % (IDLE_SETTLE_S, row.get("idling")) if row.get("settled") else
             "NOT SETTLED (%s idle at the end; heap not read)" % row.get("idling"),
             bl.with_last(row.get("rss"), prev.get("rss"), ".1f", " KiB"),
             bl.with_last(row.get("pss"), prev.get("pss"), ".1f", " KiB"),
             bl.with_last(row.get("heap"), prev.get("heap"), ".1f", " KiB")), file=out)


def print_details(scen, runs, out):
    """Per-command p50/p99, mean over each side's runs."""
    cmds = []
    for r in runs:
        for c in r.get("latency_ms", {}):
            if c not in cmds and c != "all":
                cmds.append(c)
    parts = []
    for c in cmds:
        dd = [r for r in runs if r["label"] == "direct"]
        ss = [r for r in runs if r["label"] == "shim"]
        parts.append("%s %s/%s" % (
            c, fmt(mean([lat(r, "p50", c) for r in dd]), ".2f"),
            fmt(mean([lat(r, "p50", c) for r in ss]), ".2f")))
    ss = [r for r in runs if r["label"] == "shim"]
    dd = [r for r in runs if r["label"] == "direct"]
    print("  %-7s p50 ms direct/shim: %s" % (scen, ", ".join(parts)), file=out)
    dpss, spss = mean([r.get("dovecot_pss_kib") for r in dd]), mean(
        [r.get("dovecot_pss_kib") for r in ss])
    if dpss and spss:
        n = max(r["peak_to_shim"] for r in ss)
        print("  %-7s Dovecot's own memory (PSS, all its processes) with %d idling clients: "
              "%.0f MiB direct, %.0f MiB through imapshim (%d upstream sessions)"
              % ("", n, dpss / 1024.0, spss / 1024.0,
                 max(r["peak_to_dovecot"] for r in ss)), file=out)
    print("  %-7s through imapshim, per run: upstream peak %s for client peak %s; "
          "Dovecot logins %s for client logins %s"
          % ("", "/".join(str(r["peak_to_dovecot"]) for r in ss),
             "/".join(str(r["peak_to_shim"]) for r in ss),
             "/".join(str(r["dovecot_logins"]) for r in ss),
             "/".join(str(r["logins"]) for r in ss)), file=out)
    if any(r.get("handshakes_resumed") for r in runs):
        def resumed(rs):
            full = sum(r.get("handshakes_full", 0) for r in rs)
            res = sum(r.get("handshakes_resumed", 0) for r in rs)
            return "%.0f%% of %d" % (100.0 * res / (full + res), full + res) \
                if full + res else "-"
        print("  %-7s clients' TLS handshakes resumed: direct %s, imapshim %s"
              % ("", resumed(dd), resumed(ss)), file=out)


# ------------------------------------------------------------- main

def raise_fd_limit(wanted):
    """Lift the soft RLIMIT_NOFILE to the hard one (inherited by Dovecot,
    imapshim and the load generator, each a process with its own count);
    returns how many of the wanted idle sessions fit."""
    soft, _ = bl.raise_nofile()
    # each idle session is a descriptor in the load generator, in imapshim
    # and (direct runs, only up to IDLE_SESSIONS) in Dovecot's login process
    room = soft - 300 if wanted > IDLE_SESSIONS else (soft - 200) // 2
    return max(32, min(wanted, room))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shim", required=True, help="the imapshim binary")
    ap.add_argument("--bench", required=True, help="the imapshim-bench binary")
    ap.add_argument("--quick", action="store_true", help="3 s runs (smoke test)")
    ap.add_argument("--duration", type=float, help="seconds per run (default 10, quick 3)")
    ap.add_argument("--poll-interval", type=float,
                    help="poll scenario interval (default 5 = NuPoint's; quick 1)")
    ap.add_argument("--scenarios", default=",".join(s[0] for s in SCENARIOS))
    ap.add_argument("--idle-sessions", type=int, default=IDLE_SESSIONS,
                    help="idle clients (default %d; more runs imapshim only, since "
                    "Dovecot alone would need a process per client)" % IDLE_SESSIONS)
    ap.add_argument("--idle-ramp", type=float,
                    help="seconds over which the idle clients log in (default: "
                    "%d, or %d a second for more)" % (IDLE_RAMP_S, IDLE_RAMP_RATE))
    ap.add_argument("--shim-only", action="store_true",
                    help="skip the direct runs (e.g. to measure imapshim's memory)")
    ap.add_argument("--upstream", choices=("dovecot", "fake"), default="dovecot",
                    help="fake: imapshim's upstream is tests/integration/fake_exchange.py "
                    "(idle only, imapshim only): the memory figures at 10,000 and more "
                    "clients, which direct Dovecot cannot hold here")
    ap.add_argument("--json", help="also write every run's result here")
    ap.add_argument("--last", default=LAST_JSON,
                    help="the previous run's figures, read and then replaced "
                    "(default %s in the current directory)" % LAST_JSON)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.poll_interval = args.poll_interval or (1.0 if args.quick else 5.0)
    wanted = args.scenarios.split(",")
    for b in (args.shim, args.bench):
        if not os.access(b, os.X_OK):
            sys.exit("run-bench: %s is not an executable file" % b)
    if args.upstream == "fake":
        if wanted != ["idle"]:
            sys.exit("run-bench: --upstream fake runs only --scenarios idle")
        args.shim_only = True
    elif not harness.which("dovecot"):
        print("run-bench: dovecot is not installed; skipping (apt-get install dovecot-imapd)")
        return 77

    idle_sessions = raise_fd_limit(args.idle_sessions)
    if idle_sessions != args.idle_sessions:
        print("run-bench: RLIMIT_NOFILE allows %d idle sessions, not %d"
              % (idle_sessions, args.idle_sessions), file=sys.stderr)
    args.idle_sessions = idle_sessions
    if args.upstream == "fake" and args.idle_ramp is None:
        args.idle_ramp = max(IDLE_RAMP_S, idle_sessions / FAKE_RAMP_RATE)
    for i, sc in enumerate(SCENARIOS):
        if sc[0] == "idle":
            SCENARIOS[i] = (sc[0], idle_opts(idle_sessions, args.idle_ramp), sc[2],
                            "%d sessions LOGIN, SELECT, IDLE and hold" % idle_sessions)
    t_start = time.monotonic()
    tmp = harness.make_tempdir("imapshim-bench-")
    admins = {"NPUMAdmin1": "Adm1n-" + secrets.token_hex(12),
              "NPUMAdmin2": "Adm2n-" + secrets.token_hex(12)}
    dv = fake = shim = None
    rows, allruns, failed = [], [], False
    out = sys.stdout
    try:
        pki = harness.Pki(os.path.join(tmp, "pki"))
        if args.upstream == "fake":
            # Exchange's login format; one small message a mailbox (the
            # fake keeps every mailbox it was asked for in memory)
            fake = fake_exchange.FakeExchange(
                cert=pki.server, admins=admins, max_connections_per_user=1000,
                messages_per_mailbox=1, message_size=512, keep_closed=False).start()
            up_port, login_format, uplog = fake.port, None, FakeLogins(fake)
        else:
            dv = harness.Dovecot(os.path.join(tmp, "dovecot"), pki, admins,
                                 max_sessions=idle_sessions + 100).start()
            up_port, login_format = dv.port_imaps, "{mailbox}*{admin}"
            uplog = LogCounter(dv.log_path)
        shim = harness.ImapShim(
            args.shim, os.path.join(tmp, "shim"), pki, up_port, admins,
            config={"shim": {"log_level": "warn", "max_unauth_per_ip": "8192",
                             "max_clients": str(idle_sessions + 1000),
                             "status_listen": "%s:%d" % (harness.HOST, harness.free_port())},
                    "upstream": {"login_format": login_format},
                    "pool": {"mode": "multiplex"},
                    # session_budget bounds every scenario; churn's 256
                    # sessions for 200 mailboxes need both accounts' room
                    "admin NPUMAdmin1": {"max_sessions": "128"},
                    "admin NPUMAdmin2": {"max_sessions": "128"}},
            starttls=False, name="imapshim-bench")
        env = {"ca": pki.ca.cert, "up_port": up_port,
               "up_pgid": dv.proc.pid if dv is not None else None,
               "pwfile": harness.write_file(os.path.join(tmp, "bench.pw"),
                                            admins[ADMIN] + "\n")}
        if dv is not None:
            churn = any(w.startswith("churn") for w in wanted)
            populate(dv, range(0, CHURN_MAILBOXES if churn else 32), 4)

        bl.banner("imapshim bench", out)
        print("  %g s per run, direct/shim alternated twice per scenario (idle: %g s, once "
              "each), a fresh imapshim per scenario;\n  TLS on every hop; imapshim %s: multiplex mode, "
              "budget 16 (idle, poll), 256 (churn) or 32, 2 admins, default limits and timeouts"
              % (args.duration, duration_for(args, "idle"), args.shim), file=out)
        out.flush()
        for scen, opts, pool_cfg, what in SCENARIOS:
            if scen not in wanted:
                continue
            # a fresh imapshim per scenario: an empty pool, results that do
            # not depend on the order of the scenarios
            shim.config["pool"].update(pool_cfg)
            shim.start()
            runs = []
            # idle measures memory, not a rate: one run each is enough
            if scen != "idle":
                targets = ("direct", "shim", "direct", "shim")
            elif idle_sessions <= IDLE_SESSIONS:
                targets = ("direct", "shim")
            else:
                targets = ("shim",)
            if args.shim_only:
                targets = [t for t in targets if t == "shim"]
            for target in targets:
                if not shim.alive():
                    raise harness.HarnessError("imapshim died:\n" + shim.log_text()[-3000:])
                r = run_bench(args, env, scen, opts, target, shim, uplog)
                r["scenario"], r["scenario_desc"] = scen, what
                runs.append(r)
                if r["exit"] != 0:
                    failed = True
                    print("run-bench: %s %s exited %d:\n%s" % (scen, target, r["exit"],
                          r["stderr"][-1500:]), file=sys.stderr)
            rc = shim.stop()
            if rc != 0:
                failed = True
                print("run-bench: imapshim exited %s after SIGTERM (%s):\n%s"
                      % (rc, scen, shim.log_text(this_run=True)[-2000:]), file=sys.stderr)
            allruns.extend(runs)
            rows.append(summarize(scen, runs))
        print("", file=out)
        last = bl.load_last(args.last)
        lrows = last_rows(last)
        idle_last = last.get("idle_by_clients") or {}
        print_table(rows, out, lrows)
        print_one_core(rows, lrows, out)
        print("", file=out)
        for scen, _, _, what in SCENARIOS:
            rs = [r for r in allruns if r["scenario"] == scen]
            if rs:
                print_details(scen, rs, out)
            if scen == "idle" and rs:
                row = rows[[r["scenario"] for r in rows].index("idle")]
                print_idle_memory(row, idle_last.get(str(idle_sessions), {}),
                                  args.upstream, out)
                idle_last[str(idle_sessions)] = {
                    k: row[k] for k in ("rss", "pss", "heap", "idling", "settled")}
        print("", file=out)
        print("  ratio = shim ops/s / direct ops/s; p50/p99 +ms = latency added over all "
              "commands (mean of runs);\n  CPU = imapshim utime+stime in seconds per 1000 "
              "commands (x1000 = microseconds per command);\n  KiB/session = imapshim VmRSS "
              "growth per idling client, %d s after the last went idle;\n  TLS resumed = upstream TLS "
              "handshakes resumed from imapshim's session cache;\n"
              "  up logins/1k = Dovecot logins per 1000 client logins; up sess/1k = peak "
              "upstream per 1000 peak client connections;\n  idle and poll offer a fixed load "
              "(ratio 1.00 = kept up); churn, steady and append are closed loops."
              % IDLE_SETTLE_S, file=out)
        checks = ["%s %d/%d" % (r["scenario"], *r["direct_check"]) for r in rows]
        print("  cross-check, direct runs, Dovecot logins / bench logins (teardown "
              "excluded): " + ", ".join(checks), file=out)
        print("  total %.0f s" % (time.monotonic() - t_start), file=out)
        # the next run prints these figures beside its own
        bl.save_last(args.last, {
            "rows": rows + [v for k, v in lrows.items()
                            if k not in [r["scenario"] for r in rows]],
            "idle_by_clients": idle_last})
        if args.json:
            with open(args.json, "w") as f:
                for r in allruns:
                    json.dump({k: v for k, v in r.items() if k != "stderr"}, f)
                    f.write("\n")
    finally:
        bl.cleanup(tmp, args.keep, shim, dv, fake, out=out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
