#!/usr/bin/env python3
"""
run-storm.py - the `make bench-storm` driver: a platform restart, every
mailbox reconnecting at once, through imapshim to a private Dovecot.

Issue 15's finding, reproduced: N clients (default 19,000, or the largest
count this machine's RLIMIT_NOFILE lets imapshim hold: one descriptor per
client plus one per upstream session), each its own mailbox, 128 connecting
at a time (imapshim-bench --scenario storm), LOGIN + SELECT INBOX + IDLE;
imapshim in multiplex mode, session_budget 2,048, ONE admin account with
max_sessions 2,048, login_rate 1000, TLS on both sides, one upstream server
(Dovecot, its limits raised to the budget for this run only, 64 sessions to
an imap process).
Parked clients poll every 5 minutes, so the figure is the restart itself,
not the steady polling after it.

Prints: clients idling, failed clients (by error kind), the time until all
idled (at most --max-seconds, 600), the peak of upstream sessions,
upstream handshake timeouts
(upstream_fail class=timeout), overload events and server_down events, and
imapshim's VmRSS after the storm settled; beside each figure the previous
run's (bench-storm-last.json in the current directory).  Exit status 0 when
every client reached IDLE and none failed, 1 otherwise, 77 without Dovecot.

Shares its sampling helpers with run-bench.py; only the standard library.
"""

import argparse
import importlib.util
import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))

import harness  # noqa: E402

_spec = importlib.util.spec_from_file_location("run_bench", os.path.join(HERE, "run-bench.py"))
rb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rb)

ADMIN = "NPUMAdmin1"
CLIENTS = 19000
BUDGET = 2048
CONCURRENCY = 128
SETTLE_S = 5
MAX_S = 600                  # the issue watched 300 s; a busy 2-core box needs more
LAST_JSON = "bench-storm-last.json"
FD_SPARE = 200               # listeners, status, logs, libevent, Dovecot's own


class MetricPeak(threading.Thread):
    """Peak of imapshim's upstream sessions (the sum of
    imapshim_upstream_sessions), read from /metrics every 0.5 s: cheaper
    than walking /proc/net/tcp at 20,000 sockets."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.peak, self.stop_ev = port, 0, threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            try:
                text = harness.http_get(self.port, "/metrics")
                n = sum(float(v) for v in re.findall(
                    r"^imapshim_upstream_sessions\{[^}]*\} (\S+)$", text, re.M))
                self.peak = max(self.peak, int(n))
            except OSError:
                pass
            self.stop_ev.wait(0.5)

    def stop(self):
        self.stop_ev.set()
        self.join(3)
        return self.peak


def fit_clients(wanted, budget):
    """Lift the soft RLIMIT_NOFILE to the hard one; the clients imapshim
    can hold beside its upstream sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return max(128, min(wanted, hard - budget - FD_SPARE)), hard


def load_last(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shim", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--budget", type=int, default=BUDGET,
                    help="session_budget and the admin's max_sessions")
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY,
                    help="clients connecting at a time")
    ap.add_argument("--pool", action="append", default=[], metavar="KEY=VALUE",
                    help="another [pool] setting, e.g. max_logins_in_flight=64")
    ap.add_argument("--max-seconds", type=float, default=MAX_S,
                    help="end the storm after this long even if not all idle")
    ap.add_argument("--log-level", default="warn", help="imapshim's (info: every login)")
    ap.add_argument("--last", default=LAST_JSON)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if not harness.which("dovecot"):
        print("run-storm: dovecot is not installed; skipping")
        return 77
    n, hard = fit_clients(args.clients, args.budget)
    note = ""
    if n < args.clients:
        note = ("%d clients, not %d: imapshim needs a descriptor per client and per "
                "upstream session (budget %d) under the hard RLIMIT_NOFILE of %d"
                % (n, args.clients, args.budget, hard))
        print("run-storm: " + note, file=sys.stderr)

    tmp = harness.make_tempdir("imapshim-storm-")
    admins = {ADMIN: "Adm1n-" + secrets.token_hex(12)}
    dv = shim = None
    out = sys.stdout
    try:
        pki = harness.Pki(os.path.join(tmp, "pki"))
        # room for the budget's sessions, 64 to an imap process: forking one
        # per login caps Dovecot near 10 logins a second on a busy 2-core box
        dv = harness.Dovecot(os.path.join(tmp, "dovecot"), pki, admins,
                             max_sessions=args.budget + 50,
                             sessions_per_process=64).start()
        status_port = harness.free_port()
        pool = {"mode": "multiplex", "session_budget": str(args.budget),
                "login_rate": "1000", "idle_poll_interval": "5m"}
        for kv in args.pool:
            k, _, v = kv.partition("=")
            pool[k.strip()] = v.strip()
        shim = harness.ImapShim(
            args.shim, os.path.join(tmp, "shim"), pki, dv.port_imaps, admins,
            config={"shim": {"log_level": args.log_level, "max_unauth_per_ip": str(n + 100),
                             "max_clients": str(n + 100),
                             "status_listen": "%s:%d" % (harness.HOST, status_port)},
                    "upstream": {"login_format": "{mailbox}*{admin}"},
                    "pool": pool,
                    "admin " + ADMIN: {"max_sessions": str(args.budget)}},
            starttls=False, name="imapshim-storm")
        shim.start()
        pw = harness.write_file(os.path.join(tmp, "bench.pw"), admins[ADMIN] + "\n")
        print("imapshim storm: %s; %s" % (rb.machine(), time.strftime("%Y-%m-%d %H:%M:%S")),
              file=out)
        print("  %d clients, each its own mailbox, %d connecting at a time: LOGIN, SELECT, "
              "IDLE; TLS both sides;\n  imapshim multiplex, %s; one admin "
              "(max_sessions %d), one upstream server (Dovecot)"
              % (n, args.concurrency, ", ".join("%s %s" % kv for kv in pool.items()
                                                if kv[0] != "mode"), args.budget), file=out)
        if note:
            print("  note: " + note, file=out)
        out.flush()

        sampler = MetricPeak(status_port)
        sampler.start()
        cmd = [args.bench, "--host", harness.HOST, "--port", str(shim.port), "--tls",
               "--cafile", pki.ca.cert, "--password-file", pw,
               "--user-format", "example.com/%s/%%s" % ADMIN, "--scenario", "storm",
               "--sessions", str(n), "--connect-concurrency", str(args.concurrency),
               "--settle", str(SETTLE_S), "--duration", str(args.max_seconds), "--timeout", "120",
               "--pid", str(shim.proc.pid), "--label", "storm"]
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        errs = []
        reader = threading.Thread(target=lambda: errs.extend(p.stderr), daemon=True)
        reader.start()
        killer = threading.Timer(args.max_seconds + 90, p.kill)
        killer.start()
        try:
            stdout = p.stdout.read()
            p.wait()
        finally:
            killer.cancel()
            peak = sampler.stop()
            reader.join(5)
        wall = time.monotonic() - t0
        lines = stdout.decode(errors="replace").strip().splitlines()
        try:
            res = json.loads(lines[-1])
        except (IndexError, ValueError):
            raise harness.HarnessError("no JSON from imapshim-bench (exit %d):\n%s" % (
                p.returncode, b"".join(errs).decode(errors="replace")[-3000:]))
        log = shim.log_text(this_run=True)
        fig = {
            "clients": n,
            "idling": res.get("idling"),
            "failed": n - (res.get("reached_idle") or 0),
            "errors": res.get("errors", {}),
            "errors_total": res.get("errors_total"),
            "all_idle_s": res.get("all_idle_s"),
            "peak_upstream": peak,
            "handshake_timeouts": len(re.findall(
                r"event=upstream_fail .*stage=handshake class=timeout", log)),
            "upstream_timeouts": len(re.findall(r"event=upstream_fail .*class=timeout", log)),
            "overloads": len(re.findall(r"event=server_overload ", log)),
            "server_down": len(re.findall(r"event=retry_server_down ", log)),
            "rss_mib": (res.get("rss_kib_after") or 0) / 1024.0,
            "login_p50_ms": res.get("latency_ms", {}).get("login", {}).get("p50"),
            "login_p99_ms": res.get("latency_ms", {}).get("login", {}).get("p99"),
            "wall_s": wall,
            "bench_exit": p.returncode,
        }
        last = load_last(args.last).get("figures", {})

        def row(label, key, spec):
            v, w = fig.get(key), last.get(key)
            print("  %-38s %12s   (last run %s)" % (label, rb.fmt(v, spec),
                                                   rb.fmt(w, spec)), file=out)
        print("", file=out)
        row("clients idling (of %d)" % n, "idling", "d")
        row("failed clients (never idled)", "failed", "d")
        row("client-visible errors", "errors_total", "d")
        print("  %-38s %12s   (last run %s)" % (
            "  by error kind", json.dumps(fig["errors"]) if fig["errors"] else "none",
            json.dumps(last.get("errors")) if last.get("errors") else
            ("none" if last else "-")), file=out)
        row("time until all idle, s", "all_idle_s", ".1f")
        row("peak upstream sessions", "peak_upstream", "d")
        row("upstream handshake timeouts", "handshake_timeouts", "d")
        row("upstream timeouts, any stage", "upstream_timeouts", "d")
        row("overload events (server_overload)", "overloads", "d")
        row("server_down events", "server_down", "d")
        row("imapshim VmRSS after settling, MiB", "rss_mib", ".1f")
        row("LOGIN p50 ms", "login_p50_ms", ".1f")
        row("LOGIN p99 ms", "login_p99_ms", ".1f")
        print("  total %.0f s" % fig["wall_s"], file=out)
        with open(args.last, "w") as f:
            json.dump({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "note": note,
                       "pool": pool, "figures": fig}, f)
        rc = shim.stop(timeout=60)
        if rc != 0:
            print("run-storm: imapshim exited %s after SIGTERM:\n%s"
                  % (rc, shim.log_text(this_run=True)[-2000:]), file=sys.stderr)
        ok = fig["failed"] == 0 and not fig["errors"] and rc == 0
        if not ok:
            tail = b"".join(errs).decode(errors="replace").splitlines()[-20:]
            print("run-storm: FAILED: %d clients never idled; imapshim-bench said:\n%s"
                  % (fig["failed"], "\n".join(tail)), file=sys.stderr)
        return 0 if ok else 1
    finally:
        if shim is not None:
            shim.stop()
        if dv is not None:
            dv.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print("  kept %s" % tmp, file=out)


if __name__ == "__main__":
    sys.exit(main())
