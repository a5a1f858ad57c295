"""
benchlib.py - what the benchmark drivers share (run-bench.py, run-storm.py,
poll-bench.py): the open-file limit, a process's CPU time and memory as the
OS sees them, imapshim's /metrics, /status and console, imapshim-bench as a
child process, the previous run's figures (a JSON file in the current
directory) printed beside this run's, and the clean-up.

Only the Python standard library (and tests/integration/harness.py).
"""

import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "integration"))

import harness  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------- the machine

def raise_nofile():
    """Lift the soft RLIMIT_NOFILE to the hard one: Dovecot, imapshim and
    imapshim-bench inherit it, and each holds a descriptor per client.
    Returns (soft, hard) after the change; an unlimited hard limit counts
    as 1 << 20."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%d CPUs (nproc), %s" % (os.cpu_count() or 0, model)


def load_average():
    """The 1-minute load average, for the report: the drivers share the
    machine."""
    return os.getloadavg()[0]


def banner(title, out):
    """A run's first line: what ran, on what, when, and how busy the
    machine was (the drivers share it with whatever else runs)."""
    print("%s: %s; %s; load average %.2f" % (title, machine(),
                                             time.strftime("%Y-%m-%d %H:%M:%S"),
                                             load_average()), file=out)


# ------------------------------------------------------------- a process

def proc_cpu_s(pid):
    """utime + stime of pid in seconds (fields 14 and 15 of /proc/PID/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_kib(pid, name="status", key="VmRSS:"):
    """A "key: N kB" figure of /proc/PID/name (VmRSS by default; Pss is
    name="smaps_rollup", key="Pss:")."""
    with open("/proc/%d/%s" % (pid, name)) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return None


# ------------------------------------------------------------- imapshim

def status_port(shim):
    return int(shim.config["shim"]["status_listen"].rsplit(":", 1)[1])


def metrics(port):
    """imapshim's /metrics as {'name{labels}': value}."""
    out = {}
    for line in harness.http_get(port, "/metrics").splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            try:
                out[k] = float(v)
            except ValueError:
                pass
    return out


def metric_sum(m, name):
    """The sum of a metric over its labels; None when it is absent."""
    vals = [v for k, v in m.items() if k == name or k.startswith(name + "{")]
    return sum(vals) if vals else None


def console(path, line):
    """One command on imapshim's console socket; its whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        data = []
        while True:
            b = s.recv(65536)
            if not b:
                return b"".join(data)
            data.append(b)


def timed_ms(fn, n=5):
    """Median wall time of fn() over n calls, ms."""
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(ts)


def request_times(shim):
    """How long one GET /status, GET /metrics, console "show clients" and
    "show status" take (ms, median of 5) with the clients as they are."""
    port = status_port(shim)
    return {
        "status_ms": timed_ms(lambda: harness.http_get(port, "/status")),
        "metrics_ms": timed_ms(lambda: harness.http_get(port, "/metrics")),
        "show_clients_ms": timed_ms(lambda: console(shim.control_path, "show clients")),
        "show_status_ms": timed_ms(lambda: console(shim.control_path, "show status")),
    }


# ------------------------------------------------------------- imapshim-bench

class BenchRun:
    """imapshim-bench as a child process.  A thread reads its stderr (each
    line to on_line(line) as it comes, e.g. "imapshim-bench: settled: ...");
    the process is killed after limit seconds; result() is its JSON line."""

    def __init__(self, cmd, limit, on_line=None):
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines = []
        self.cond = threading.Condition()
        self.on_line = on_line
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.killer = threading.Timer(limit, self.p.kill)
        self.killer.start()

    def _read(self):
        for raw in self.p.stderr:
            line = raw.decode(errors="replace")
            if self.on_line is not None:
                self.on_line(line)
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)         # EOF
            self.cond.notify_all()

    def wait_line(self, text, timeout):
        """True once a stderr line holds text; False at EOF or timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                if any(ln is not None and text in ln for ln in self.lines):
                    return True
                left = deadline - time.monotonic()
                if None in self.lines or left <= 0:
                    return False
                self.cond.wait(left)

    def interrupt(self):
        """SIGINT: the bench ends its run now (its teardown follows)."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)

    def stderr(self):
        return "".join(ln for ln in self.lines if ln is not None)

    def result(self):
        """Wait for the end; its JSON line plus "exit" and "stderr"."""
        try:
            stdout = self.p.stdout.read()
            self.p.wait()
        finally:
            self.killer.cancel()
            self.reader.join(5)
        lines = stdout.decode(errors="replace").strip().splitlines()
        try:
            res = json.loads(lines[-1])
        except (IndexError, ValueError):
            raise harness.HarnessError("no JSON from imapshim-bench (exit %d):\n%s"
                                       % (self.p.returncode, self.stderr()[-3000:]))
        res["exit"] = self.p.returncode
        res["stderr"] = self.stderr()
        return res


# ------------------------------------------------------------- last run

def load_last(path):
    """The previous run's JSON (a dict), {} when there is none."""
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def save_last(path, data):
    """This run's figures, for the next run to print beside its own."""
    with open(path, "w") as f:
        json.dump(dict(data, when=time.strftime("%Y-%m-%d %H:%M:%S")), f)


def fmt(v, spec, none="-"):
    return none if v is None else format(v, spec)


def with_last(v, was, spec, unit=""):
    """"figure (last: X)"."""
    return "%s%s (last: %s)" % (fmt(v, spec), unit if v is not None else "",
                                fmt(was, spec))


def print_rows(rows, fig, last, out):
    """One line per (label, key, format spec): this run's figure and the
    previous run's beside it."""
    for label, key, spec in rows:
        print("  %-42s %12s   (last: %s)" % (label, fmt(fig.get(key), spec),
                                            fmt(last.get(key), spec)), file=out)


# ------------------------------------------------------------- clean-up

def cleanup(tmp, keep, *servers, out=sys.stdout):
    """Stop what was started (imapshim, Dovecot, a fake upstream: None
    when it never started), then remove the temporary directory unless
    keep."""
    for s in servers:
        if s is not None:
            s.stop()
    if keep:
        print("  kept %s" % tmp, file=out)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
