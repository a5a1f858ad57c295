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

Beside each figure the previous run's (bench-poll-last.json in the current
directory; run-bench.py reads its CPU per poll for its "one core" line).
One JSON line follows with the same figures.  Usage:
  poll-bench.py --shim build/src/imapshim --bench build/bench/imapshim-bench
      [--sessions 2000] [--interval 30] [--ramp 20] [--hold 90]
Exits 77 when Dovecot is missing.
"""
import argparse
import json
import os
import secrets
import sys
import time

import benchlib as bl
from benchlib import harness

ADMIN = "NPUMAdmin1"
BUDGET = 16
LAST_JSON = "bench-poll-last.json"


def poll_metrics(port):
    return {k: v for k, v in bl.metrics(port).items()
            if k.startswith(("imapshim_poll", "imapshim_clients"))}


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
    ap.add_argument("--last", default=LAST_JSON)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if not harness.which("dovecot"):
        print("poll-bench: dovecot is not installed; skipping")
        return 77
    bl.raise_nofile()
    tmp = harness.make_tempdir("imapshim-pollbench-")
    admins = {ADMIN: "Adm1n-" + secrets.token_hex(12),
              "NPUMAdmin2": "Adm2n-" + secrets.token_hex(12)}
    dv = shim = None
    out = sys.stdout
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
        load0 = bl.load_average()
        run = bl.BenchRun(cmd, args.ramp + 2 * args.hold + 200)
        # The hold: from all idling (imapshim's gauges say so) to its end.
        deadline = time.monotonic() + args.ramp + 120
        while True:
            m = poll_metrics(status_port)
            idling = m.get('imapshim_clients{state="parked"}', 0) + \
                m.get('imapshim_clients{state="attached"}', 0)
            if idling >= 0.98 * args.sessions or time.monotonic() > deadline:
                break
            time.sleep(1)
        t0, cpu0 = time.monotonic(), bl.proc_cpu_s(shim.proc.pid)
        polls0 = m.get("imapshim_poll_lag_seconds_count", 0)
        samples = []
        while time.monotonic() - t0 < args.hold - 5 and run.p.poll() is None:
            time.sleep(5)
            samples.append(poll_metrics(status_port))
        t1, cpu1 = time.monotonic(), bl.proc_cpu_s(shim.proc.pid)
        last = samples[-1] if samples else poll_metrics(status_port)
        polls = last.get("imapshim_poll_lag_seconds_count", 0) - polls0
        req = bl.request_times(shim)
        bench = run.result()
        res = {
            "scenario": "idlepoll", "sessions": args.sessions, "budget": BUDGET,
            "interval_s": args.interval, "hold_s": t1 - t0,
            "parked": last.get('imapshim_clients{state="parked"}'),
            "polls_needed_per_s": args.sessions / args.interval,
            "polls_per_s": polls / (t1 - t0),
            "lag_max_s": max(s.get("imapshim_poll_lag_max_seconds", 0) for s in samples)
            if samples else None,
            "lag_avg_s": last.get("imapshim_poll_lag_avg_seconds"),
            "achieved_interval_s": last.get("imapshim_poll_interval_seconds"),
            "cpu_us_per_poll": 1e6 * (cpu1 - cpu0) / polls if polls else None,
            "cpu_share_pct": 100.0 * (cpu1 - cpu0) / (t1 - t0),
            "bench_errors": bench.get("errors_total"),
            "load_average": (load0, bl.load_average()),
        }
        res.update(req)
        prev = bl.load_last(args.last)
        print("idlepoll: %d clients, budget %d, idle_poll_interval %gs, hold %.0fs; "
              "load average %.2f before, %.2f after"
              % (args.sessions, BUDGET, args.interval, t1 - t0, *res["load_average"]),
              file=out)
        if prev and (prev.get("sessions"), prev.get("interval_s")) != \
                (args.sessions, args.interval):
            print("  (last run: %s clients, idle_poll_interval %gs)"
                  % (prev.get("sessions"), prev.get("interval_s") or 0), file=out)
        bl.print_rows([
            ("clients", "sessions", "d"),
            ("polls/s needed (clients / interval)", "polls_needed_per_s", ".1f"),
            ("polls/s done", "polls_per_s", ".1f"),
            ("poll lag, worst s", "lag_max_s", ".2f"),
            ("poll lag, average s", "lag_avg_s", ".2f"),
            ("achieved poll interval s", "achieved_interval_s", ".1f"),
            ("imapshim CPU per poll, us", "cpu_us_per_poll", ".0f"),
            ("imapshim CPU, % of a core", "cpu_share_pct", ".0f"),
            ("GET /status ms", "status_ms", ".1f"),
            ("GET /metrics ms", "metrics_ms", ".1f"),
            ("console show clients ms", "show_clients_ms", ".1f"),
            ("console show status ms", "show_status_ms", ".1f"),
            ("load generator errors", "bench_errors", "d")], res, prev, out)
        print(json.dumps(res), file=out)
        bl.save_last(args.last, res)
        if bench.get("errors_total"):
            print("poll-bench: the load generator saw errors %r:\n%s"
                  % (bench.get("errors"), "\n".join(bench["stderr"].splitlines()[-20:])),
                  file=sys.stderr)
        return 0 if not bench.get("errors_total") else 1
    finally:
        bl.cleanup(tmp, args.keep, shim, dv, out=out)


if __name__ == "__main__":
    sys.exit(main())
