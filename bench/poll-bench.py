#!/usr/bin/env python3
"""
poll-bench.py - the `idlepoll` benchmark: parked IDLE clients' polls at scale
(issue 15 "Polling at scale"; DESIGN.md 3.4 M10).

N clients (default 2,000), each its own mailbox, LOGIN, SELECT and IDLE
through imapshim (multiplex, session_budget 16, one Dovecot, TLS on both
hops), started over --ramp seconds and then held for --hold seconds.  With
far more idling clients than sessions, nearly all are parked and polled
every idle_poll_interval.  During the hold the driver samples imapshim's
/metrics every 5 s and prints, for the hold:

  polls/s needed   N / idle_poll_interval (the sizing model)
  polls/s done     the rise of imapshim_poll_lag_seconds_count / hold
  lag max / avg    imapshim_poll_lag_max_seconds / _avg_seconds (last minute)
  interval         imapshim_poll_interval_seconds (achieved, last minute)
  CPU us/poll      imapshim utime+stime over the hold / polls done
  /status, /metrics, console "show clients"/"show status": ms per request
                   with N clients connected (median of 5)

One JSON line follows with the same figures.  Usage:
  poll-bench.py --shim build/src/imapshim --bench build/bench/imapshim-bench
      [--sessions 2000] [--interval 30] [--ramp 20] [--hold 90]
Exits 77 when Dovecot is missing.
"""
import argparse
import json
import os
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))

import harness  # noqa: E402

ADMIN = "NPUMAdmin1"
BUDGET = 16


def cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metrics(port):
    out = {}
    for line in harness.http_get(port, "/metrics").splitlines():
        if line.startswith("imapshim_poll") or line.startswith("imapshim_clients"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


def timed(fn, n=5):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(ts)


def console(path, line):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            b = s.recv(65536)
            if not b:
                return data
            data += b


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--shim", required=True)
    ap.add_argument("--bench", required=True)
    ap.add_argument("--sessions", type=int, default=2000)
    ap.add_argument("--interval", type=float, default=30.0,
                    help="idle_poll_interval, seconds")
    ap.add_argument("--ramp", type=float, default=20.0)
    ap.add_argument("--hold", type=float, default=90.0)
    ap.add_argument("--login-rate", type=int, default=500)
    args = ap.parse_args()
    if not harness.which("dovecot"):
        print("poll-bench: dovecot is not installed; skipping")
        return 77
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = harness.make_tempdir("imapshim-pollbench-")
    admins = {ADMIN: "Adm1n-" + secrets.token_hex(12),
              "NPUMAdmin2": "Adm2n-" + secrets.token_hex(12)}
    dv = shim = None
    try:
        pki = harness.Pki(os.path.join(tmp, "pki"))
        dv = harness.Dovecot(os.path.join(tmp, "dovecot"), pki, admins,
                             max_sessions=args.sessions + 100).start()
        status_port = harness.free_port()
        shim = harness.ImapShim(
            args.shim, os.path.join(tmp, "shim"), pki, dv.port_imaps, admins,
            config={"shim": {"log_level": "warn", "max_unauth_per_ip": "8192",
                             "max_clients": str(args.sessions + 1000),
                             "status_listen": "127.0.0.1:%d" % status_port},
                    "upstream": {"login_format": "{mailbox}*{admin}"},
                    "pool": {"mode": "multiplex", "session_budget": str(BUDGET),
                             "idle_poll_interval": "%gs" % args.interval,
                             "login_rate": str(args.login_rate),
                             "login_burst": str(args.login_rate)},
                    "admin NPUMAdmin1": {"max_sessions": str(BUDGET)},
                    "admin NPUMAdmin2": {"max_sessions": str(BUDGET)}},
            starttls=False, name="imapshim-pollbench").start()
        pw = harness.write_file(os.path.join(tmp, "bench.pw"), admins[ADMIN] + "\n")
        cmd = [args.bench, "--host", harness.HOST, "--port", str(shim.port), "--tls",
               "--cafile", pki.ca.cert, "--password-file", pw,
               "--user-format", "example.com/%s/%%s" % ADMIN, "--scenario", "idle",
               "--sessions", str(args.sessions), "--ramp", "%g" % args.ramp,
               "--settle", "%g" % args.hold, "--mailbox-base", "10000",
               "--duration", "%g" % (args.ramp + args.hold + 120), "--label", "shim"]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        settled = threading.Event()
        errlines = []

        def watch():
            for line in p.stderr:
                errlines.append(line)
                if b"settled" in line:
                    settled.set()
        threading.Thread(target=watch, daemon=True).start()
        # The hold: from all idling (the bench says so on stderr) to its end.
        deadline = time.monotonic() + args.ramp + 120
        while True:
            m = metrics(status_port)
            idling = m.get('imapshim_clients{state="parked"}', 0) + \
                m.get('imapshim_clients{state="attached"}', 0)
            if idling >= 0.98 * args.sessions or time.monotonic() > deadline:
                break
            time.sleep(1)
        t0, cpu0 = time.monotonic(), cpu_s(shim.proc.pid)
        polls0 = m.get("imapshim_poll_lag_seconds_count", 0)
        samples = []
        while time.monotonic() - t0 < args.hold - 5 and p.poll() is None:
            time.sleep(5)
            samples.append(metrics(status_port))
        t1, cpu1 = time.monotonic(), cpu_s(shim.proc.pid)
        last = samples[-1] if samples else metrics(status_port)
        polls = last.get("imapshim_poll_lag_seconds_count", 0) - polls0
        req = {
            "status_ms": timed(lambda: harness.http_get(status_port, "/status")),
            "metrics_ms": timed(lambda: harness.http_get(status_port, "/metrics")),
            "show_clients_ms": timed(lambda: console(shim.control_path, "show clients")),
            "show_status_ms": timed(lambda: console(shim.control_path, "show status")),
        }
        out = p.communicate(timeout=args.hold + 200)[0]
        bench = json.loads(out.decode().strip().splitlines()[-1])
        res = {
            "scenario": "idlepoll", "sessions": args.sessions, "budget": BUDGET,
            "interval_s": args.interval,
            "parked": last.get('imapshim_clients{state="parked"}'),
            "polls_needed_per_s": args.sessions / args.interval,
            "polls_per_s": polls / (t1 - t0),
            "lag_max_s": max(s.get("imapshim_poll_lag_max_seconds", 0) for s in samples)
            if samples else None,
            "lag_avg_s": last.get("imapshim_poll_lag_avg_seconds"),
            "achieved_interval_s": last.get("imapshim_poll_interval_seconds"),
            "cpu_us_per_poll": 1e6 * (cpu1 - cpu0) / polls if polls else None,
            "cpu_share": (cpu1 - cpu0) / (t1 - t0),
            "bench_errors": bench.get("errors_total"),
        }
        res.update(req)
        print("idlepoll: %d clients, budget %d, idle_poll_interval %gs, hold %.0fs"
              % (args.sessions, BUDGET, args.interval, t1 - t0))
        print("  polls/s needed %.1f, done %.1f; lag max %.2fs avg %.2fs; achieved "
              "interval %.1fs" % (res["polls_needed_per_s"], res["polls_per_s"],
                                  res["lag_max_s"] or 0, res["lag_avg_s"] or 0,
                                  res["achieved_interval_s"] or 0))
        print("  imapshim CPU %.0f us per poll (%.0f%% of a core); /status %.1f ms, "
              "/metrics %.1f ms, show clients %.1f ms, show status %.1f ms"
              % (res["cpu_us_per_poll"] or 0, 100 * res["cpu_share"],
                 req["status_ms"], req["metrics_ms"], req["show_clients_ms"],
                 req["show_status_ms"]))
        print(json.dumps(res))
        if bench.get("errors_total"):
            print("poll-bench: the load generator saw errors %r:\n%s"
                  % (bench.get("errors"), b"".join(errlines[-20:]).decode(errors="replace")),
                  file=sys.stderr)
        return 0 if not bench.get("errors_total") else 1
    finally:
        if shim is not None:
            shim.stop()
        if dv is not None:
            dv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
