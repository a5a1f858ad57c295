#!/usr/bin/python3
"""
demo.py - hundreds of voice mailboxes through imapshim over a small budget.

What it does, all on 127.0.0.1 with free ports and a temporary directory:

  1. makes a throwaway PKI (tests/integration/harness.py: Pki);
  2. starts a private Dovecot standing in for Exchange: the admin accounts
     NPUMAdmin1 and NPUMAdmin2 are Dovecot master users, so the upstream
     login "vm0001*NPUMAdmin1" plays the part of Exchange's delegated
     "example.com/NPUMAdmin1/vm0001";
  3. starts imapshim in front of it in [pool] mode = multiplex, with
     session_budget = 16 and max_sessions = 8 for each of the two admin
     accounts, and its status endpoint on a free port;
  4. connects --mailboxes simulated voice mailboxes (default 300), the way
     the voice platform does: each logs in through imapshim as
     "example.com/NPUMAdmin1/vmNNNN", SELECTs its INBOX and keeps its
     session, polling with UID SEARCH UNSEEN every --poll seconds
     (jittered); a new message is fetched (its headers) and marked \\Seen;
  5. delivers a voice message every --deliver-every seconds into a random
     mailbox over a separate, direct Dovecot session (as Exchange's
     transport would), which the polling clients then find;
  6. shows a live view every second (imapshim-top's rendering of /status,
     plus the clients' own counters), and after --duration seconds (or on
     Ctrl-C) logs every client out and prints a summary.

One asyncio loop drives every client.  Exchange's own per-admin limit
(MaxConnectionsPerUser) is 16; the demo gives each admin account 8 so that
the bound is easy to see, and Dovecot is never asked for more than 16
sessions in all however many mailboxes poll.

Run it with contrib/demo.sh, which installs and builds first, or directly
once imapshim is built:  /usr/bin/python3 contrib/demo.py [--help]
"""

import argparse
import asyncio
import importlib.machinery
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import urllib.request

TOP = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(TOP, "tests", "integration"))

import harness  # noqa: E402  (the integration tests' building blocks)

ADMINS = ("NPUMAdmin1", "NPUMAdmin2")
DOMAIN = "example.com"
BUDGET = 16          # [pool] session_budget
PER_ADMIN = 8        # [admin NAME] max_sessions (Exchange's default would be 16)
CALLERS = ("+1 613 555 0142", "+44 20 7946 0018", "+1 416 555 0199",
           "+33 1 70 36 39 50", "+49 30 901820")


def load_top():
    """contrib/imapshim-top as a module (it has no .py suffix), or None."""
    path = os.path.join(TOP, "contrib", "imapshim-top")
    try:
        loader = importlib.machinery.SourceFileLoader("imapshim_top", path)
        spec = importlib.util.spec_from_loader("imapshim_top", loader)
        mod = importlib.util.module_from_spec(spec)
        loader.exec_module(mod)
        return mod if hasattr(mod, "render") else None
    except (OSError, SyntaxError, ImportError):
        return None


def voice_message(mailbox, n):
    """A small RFC 5322 voice message (a short fake audio attachment)."""
    caller = CALLERS[n % len(CALLERS)]
    audio = os.urandom(3000).hex()
    audio = "\r\n".join(audio[i:i + 76] for i in range(0, len(audio), 76))
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    return (
        "From: \"Voice Mail\" <voicemail@%s>\r\n"
        "To: <%s@%s>\r\n"
        "Subject: Voice message from %s\r\n"
        "Date: %s\r\n"
        "Message-ID: <vm.%d.%s@demo.%s>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/mixed; boundary=\"b%d\"\r\n"
        "\r\n"
        "--b%d\r\nContent-Type: text/plain\r\n\r\n"
        "You have a new voice message from %s.\r\n"
        "--b%d\r\nContent-Type: audio/wav\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n%s\r\n"
        "--b%d--\r\n" % (DOMAIN, mailbox, DOMAIN, caller, date, n, mailbox, DOMAIN,
                         n, n, caller, n, audio, n)).encode()


# --------------------------------------------------------------- IMAP client

class ImapError(Exception):
    pass


class Imap:
    """A minimal asyncio IMAP client: tagged commands, literals, one at a time."""

    LIT = re.compile(rb"\{(\d+)\+?\}\r\n$")

    def __init__(self, reader, writer):
        self.r, self.w = reader, writer
        self.n = 0

    @classmethod
    async def connect(cls, port, ctx, timeout=30):
        r, w = await asyncio.wait_for(
            asyncio.open_connection(harness.HOST, port, ssl=ctx,
                                    server_hostname="localhost"), timeout)
        c = cls(r, w)
        greeting = await asyncio.wait_for(r.readline(), timeout)
        if not greeting.startswith(b"* OK"):
            w.close()
            raise ImapError("greeting %r" % greeting[:80])
        return c

    async def _item(self):
        """One response line with its literals inline."""
        line = await self.r.readline()
        if not line:
            raise ImapError("connection closed")
        data = line
        while True:
            m = self.LIT.search(line)
            if not m:
                return data
            data += await self.r.readexactly(int(m.group(1)))
            line = await self.r.readline()
            data += line

    async def command(self, text, literal=None, timeout=60):
        self.n += 1
        tag = b"a%d" % self.n
        if literal is not None:
            self.w.write(tag + b" " + text.encode() + b" {%d+}\r\n" % len(literal)
                         + literal + b"\r\n")
        else:
            self.w.write(tag + b" " + text.encode() + b"\r\n")
        await self.w.drain()
        untagged = []
        while True:
            item = await asyncio.wait_for(self._item(), timeout)
            if item.startswith(tag + b" "):
                status = item[len(tag) + 1:].split(b" ", 1)[0].decode(errors="replace")
                return status, untagged, item
            if item.startswith(b"* BYE"):
                untagged.append(item)
                continue
            untagged.append(item)

    async def close(self):
        try:
            self.w.close()
            await asyncio.wait_for(self.w.wait_closed(), 2)
        except (OSError, asyncio.TimeoutError, ssl_errors()):
            pass


def ssl_errors():
    import ssl
    return ssl.SSLError


def quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------- state

class Stats:
    def __init__(self):
        self.t0 = time.monotonic()
        self.logged_in = 0
        self.login_failed = 0
        self.commands = 0
        self.errors = 0
        self.error_samples = []
        self.polls = 0
        self.latency = {}            # command -> [seconds]
        self.delivered = {}          # message number -> delivery time
        self.seen = {}               # message number -> seconds from delivery
        self.max_used = 0
        self.max_admin = {}
        self.max_sockets = 0         # counted in /proc, not from /status
        self.samples = []            # (t, commands) for commands/s

    def cmd(self, name, seconds, status, detail=b""):
        self.commands += 1
        self.latency.setdefault(name, []).append(seconds)
        if status != "OK":
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append("%s: %s" % (name, detail[:120].decode(errors="replace").strip()))

    def rate(self):
        now = time.monotonic()
        self.samples.append((now, self.commands))
        while len(self.samples) > 2 and now - self.samples[0][0] > 5:
            self.samples.pop(0)
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


async def timed(stats, c, name, text, literal=None):
    t = time.monotonic()
    status, untagged, tagged = await c.command(text, literal)
    stats.cmd(name, time.monotonic() - t, status, tagged)
    return status, untagged


async def voice_mailbox(n, mailbox, admin, shim, ctx, stats, stop, args):
    """One voice mailbox: log in, keep the session, poll the INBOX."""
    await asyncio.sleep(random.uniform(0, args.ramp))
    c = None
    try:
        c = await Imap.connect(shim.port, ctx)
        user = "%s/%s/%s" % (DOMAIN, admin, mailbox)
        t = time.monotonic()
        status, _, tagged = await c.command("LOGIN %s %s" % (quote(user), quote(shim.admins[admin])))
        stats.cmd("LOGIN", time.monotonic() - t, status, tagged)
        if status != "OK":
            stats.login_failed += 1
            return
        stats.logged_in += 1
        status, _ = await timed(stats, c, "SELECT", "SELECT INBOX")
        if status != "OK":
            return
        known = set()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), args.poll * random.uniform(0.8, 1.2))
                break
            except asyncio.TimeoutError:
                pass
            stats.polls += 1
            status, untagged = await timed(stats, c, "UID SEARCH", "UID SEARCH UNSEEN")
            uids = []
            for item in untagged:
                if item.startswith(b"* SEARCH"):
                    uids = [int(x) for x in item[8:].split()]
            for uid in uids:
                if uid in known:
                    continue
                known.add(uid)
                status, untagged = await timed(
                    stats, c, "UID FETCH",
                    "UID FETCH %d (FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID SUBJECT)])" % uid)
                for item in untagged:
                    m = re.search(rb"<vm\.(\d+)\.", item)
                    if m and int(m.group(1)) in stats.delivered and int(m.group(1)) not in stats.seen:
                        stats.seen[int(m.group(1))] = time.time() - stats.delivered[int(m.group(1))]
                await timed(stats, c, "UID STORE", "UID STORE %d +FLAGS.SILENT (\\Seen)" % uid)
        await timed(stats, c, "LOGOUT", "LOGOUT")
    except (ImapError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
            ssl_errors()) as e:
        stats.errors += 1
        if len(stats.error_samples) < 5:
            stats.error_samples.append("%s: %s: %s" % (mailbox, type(e).__name__, e))
    finally:
        if c is not None:
            await c.close()


async def deliverer(dovecot, mailboxes, ctx, stats, stop, args):
    """Exchange's transport, played by direct Dovecot sessions: APPEND a
    voice message into a random mailbox now and then."""
    n = 0
    admin = ADMINS[0]
    await asyncio.sleep(args.ramp + 2)
    while not stop.is_set():
        n += 1
        mb = random.choice(mailboxes)
        try:
            c = await Imap.connect(dovecot.port_imaps, ctx)
            try:
                st, _, _ = await c.command("LOGIN %s %s" % (quote("%s*%s" % (mb, admin)),
                                                            quote(dovecot.admins[admin])))
                if st == "OK":
                    st, _, _ = await c.command("APPEND INBOX", voice_message(mb, n))
                    if st == "OK":
                        stats.delivered[n] = time.time()
                    await c.command("LOGOUT")
            finally:
                await c.close()
        except (ImapError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        try:
            await asyncio.wait_for(stop.wait(), args.deliver_every)
        except asyncio.TimeoutError:
            pass


def upstream_sockets(pid, port):
    """imapshim's own TCP sockets to the stand-in Exchange's port, counted
    from /proc (every state while imapshim still holds the descriptor): a
    check of the budget that does not take imapshim's word for it."""
    inodes = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                t = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if t.startswith("socket:["):
                inodes.add(t[8:-1])
    except OSError:
        return None
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if int(parts[2].rsplit(":", 1)[1], 16) == port and parts[9] in inodes:
                        n += 1
        except (OSError, StopIteration, IndexError, ValueError):
            pass
    return n


def fetch_status(url):
    with urllib.request.urlopen(url + "/status", timeout=2) as r:
        return json.loads(r.read().decode())


def summary_line(st, stats):
    """The compact view: clients, upstream sessions by state, budget, queue."""
    cl = st.get("clients", {})
    b = st.get("budget", {})
    q = st.get("queue", {})
    states = {}
    for a in st.get("admins", []):
        for k, v in a.get("sessions", {}).items():
            states[k] = states.get(k, 0) + v
    logins = st.get("counters", {}).get("logins", {})
    return ("%5.0fs clients att %3d park %3d wait %3d | upstream %s | budget %d/%d | "
            "logins %d | queue %d | %.0f cmd/s | err %d" % (
                time.monotonic() - stats.t0, cl.get("attached", 0), cl.get("parked", 0),
                cl.get("waiting", 0),
                " ".join("%s %d" % (k, v) for k, v in sorted(states.items()) if v) or "-",
                b.get("used", 0), b.get("total", 0), logins.get("ok", 0),
                q.get("length", 0), stats.rate(), stats.errors))


async def monitor(url, top, stats, stop, args, shim, dovecot):
    tty = sys.stdout.isatty() and not args.plain
    last_print = 0.0
    loop = asyncio.get_running_loop()

    async def sample_sockets():
        # Between status fetches too: several samples a second.
        while not stop.is_set():
            n = await loop.run_in_executor(None, upstream_sockets, shim.proc.pid,
                                           dovecot.port_imaps)
            if n is not None:
                stats.max_sockets = max(stats.max_sockets, n)
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
    sampler = asyncio.create_task(sample_sockets())
    while not stop.is_set():
        try:
            st = await asyncio.get_running_loop().run_in_executor(None, fetch_status, url)
        except (OSError, ValueError) as e:
            st = None
            err = str(e)
        if st is not None:
            used = st.get("budget", {}).get("used", 0)
            stats.max_used = max(stats.max_used, used)
            for a in st.get("admins", []):
                stats.max_admin[a.get("name")] = max(stats.max_admin.get(a.get("name"), 0),
                                                     a.get("used", 0))
            stats.last_status = st
        now = time.monotonic()
        if tty:
            lines = (top.render(st, url) if (top and st) else
                     [summary_line(st, stats) if st else "status: %s" % err])
            seen = len(stats.seen)
            lines += ["",
                      "voice mailboxes  %d logged in through imapshim, %d polls, %d commands "
                      "(%.0f/s), %d errors" % (stats.logged_in, stats.polls, stats.commands,
                                               stats.rate(), stats.errors),
                      "deliveries       %d voice messages delivered straight to 'Exchange', "
                      "%d already seen by their mailbox's client" % (len(stats.delivered), seen),
                      "peak             %d upstream sessions (budget %d; %d sockets to "
                      "'Exchange' counted in /proc); per admin %s" % (
                          stats.max_used, BUDGET, stats.max_sockets,
                          ", ".join("%s %d/%d" % (k, v, PER_ADMIN)
                                    for k, v in sorted(stats.max_admin.items()))),
                      "",
                      "stops in %.0fs; Ctrl-C stops now" % max(0, args.duration - (now - stats.t0))]
            cols, rows = shutil.get_terminal_size((110, 40))
            sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(l[:cols] for l in lines[:rows - 1]) + "\n")
            sys.stdout.flush()
        elif st is not None and now - last_print >= args.every:
            last_print = now
            print(summary_line(st, stats), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
    await sampler


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(math.ceil(p / 100.0 * len(v))) - 1))] if v else 0.0


def dovecot_logins(dovecot):
    return len(re.findall(r"imap-login: (?:Info: )?Login: user=<", dovecot.log_text()))


def print_summary(stats, st, dovecot, logins_before, deliveries_logins, args, shim):
    elapsed = time.monotonic() - stats.t0
    print()
    print("Summary (%.0f s)" % elapsed)
    row = "  %-34s %s"
    print(row % ("voice-mailbox client sessions", "%d logged in, %d refused (of %d)"
                 % (stats.logged_in, stats.login_failed, args.mailboxes)))
    print(row % ("IMAP commands through imapshim", "%d (%d polls)" % (stats.commands, stats.polls)))
    print(row % ("errors (NO/BAD, dropped sessions)", stats.errors))
    print(row % ("voice messages delivered", "%d, %d seen by their client (median %.1f s after "
                 "delivery)" % (len(stats.delivered), len(stats.seen),
                                pct(list(stats.seen.values()), 50))))
    print(row % ("most upstream sessions at once", "%d (session_budget %d)" % (stats.max_used, BUDGET)))
    print(row % ("  its sockets to 'Exchange'", "at most %d (counted in /proc every 0.2 s)"
                 % stats.max_sockets))
    print(row % ("  per admin account", ", ".join("%s %d (max_sessions %d)" % (k, v, PER_ADMIN)
                                                for k, v in sorted(stats.max_admin.items()))))
    if st:
        c = st.get("counters", {})
        lg = c.get("logins", {})
        print(row % ("upstream logins (imapshim)", "%d ok, %d refused, %d error; %d pooled "
                     "sessions reused" % (lg.get("ok", 0), lg.get("refused", 0),
                                          lg.get("error", 0), c.get("reuse", 0))))
        print(row % ("queue timeouts", c.get("queue_timeouts", 0)))
    logins = dovecot_logins(dovecot) - logins_before - deliveries_logins
    print(row % ("logins 'Exchange' saw from imapshim", logins))
    print()
    print("  %-10s %7s %9s %9s %9s" % ("command", "count", "p50 ms", "p95 ms", "max ms"))
    order = ["LOGIN", "SELECT", "UID SEARCH", "UID FETCH", "UID STORE", "LOGOUT"]
    for name in order + sorted(set(stats.latency) - set(order)):
        v = stats.latency.get(name)
        if v:
            print("  %-10s %7d %9.1f %9.1f %9.1f" % (name, len(v), 1000 * pct(v, 50),
                                                   1000 * pct(v, 95), 1000 * max(v)))
    if stats.error_samples:
        print()
        print("First errors:")
        for e in stats.error_samples:
            print("  " + e)
    print()
    ok = st.get("counters", {}).get("logins", {}).get("ok", 0) if st else 0
    reuse = st.get("counters", {}).get("reuse", 0) if st else 0
    print("%d voice mailboxes kept their sessions while 'Exchange' never saw more than %d"
          % (stats.logged_in, max(stats.max_used, stats.max_sockets)))
    print("sessions at once (%d per admin account at most)." % max(stats.max_admin.values() or [0]))
    if args.mailboxes > BUDGET:
        print("An upstream session is logged in for one mailbox; with fewer sessions than")
        print("polling mailboxes they rotate, so a poll that finds its mailbox's session gone")
        print("costs a new upstream LOGIN: %d logins, %d reuses here (README, \"Pool modes\")."
              % (ok, reuse))
    else:
        print("The budget covers every mailbox, so parked clients came back to their own")
        print("logged-in sessions: %d upstream logins, %d reuses." % (ok, reuse))
    if args.keep:
        print("imapshim's log: %s" % shim.log_path)


async def run(args, shim, dovecot, ctx, url, top, stats):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    mailboxes = ["vm%04d" % (i + 1) for i in range(args.mailboxes)]
    tasks = [asyncio.create_task(voice_mailbox(i, mb, ADMINS[i % len(ADMINS)], shim, ctx,
                                               stats, stop, args))
             for i, mb in enumerate(mailboxes)]
    dl = asyncio.create_task(deliverer(dovecot, mailboxes, ctx, stats, stop, args))
    mon = asyncio.create_task(monitor(url, top, stats, stop, args, shim, dovecot))
    try:
        await asyncio.wait_for(stop.wait(), args.duration)
    except asyncio.TimeoutError:
        pass
    stop.set()
    if not (sys.stdout.isatty() and not args.plain):
        print("stopping: logging %d clients out ..." % stats.logged_in, flush=True)
    done, pending = await asyncio.wait(tasks + [dl, mon], timeout=45)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    try:
        return await loop.run_in_executor(None, fetch_status, url)
    except (OSError, ValueError):
        return getattr(stats, "last_status", None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--mailboxes", type=int, default=300,
                    help="simulated voice mailboxes (default %(default)s)")
    ap.add_argument("--poll", type=float, default=10.0,
                    help="seconds between a mailbox's polls, +-20%% (default %(default)s)")
    ap.add_argument("--park-after", default="2s",
                    help="[pool] park_after (default %(default)s)")
    ap.add_argument("--duration", type=float, default=60.0,
                    help="seconds to run (default %(default)s)")
    ap.add_argument("--ramp", type=float, default=8.0,
                    help="seconds over which the mailboxes log in (default %(default)s)")
    ap.add_argument("--deliver-every", type=float, default=2.0,
                    help="seconds between voice-message deliveries (default %(default)s)")
    ap.add_argument("--every", type=float, default=5.0,
                    help="without a terminal: seconds between status lines (default %(default)s)")
    ap.add_argument("--plain", action="store_true",
                    help="status lines instead of the full-screen view")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary directory (logs, configuration)")
    args = ap.parse_args()

    binary = os.environ.get("IMAPSHIM") or os.path.join(TOP, "build", "src", "imapshim")
    if not os.access(binary, os.X_OK):
        binary = harness.find_imapshim()
    if not binary or not os.access(binary, os.X_OK):
        sys.exit("demo.py: imapshim is not built; run contrib/demo.sh (or set IMAPSHIM)")
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.mailboxes + 256))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    workdir = harness.make_tempdir(prefix="imapshim-demo-")
    dovecot = shim = None
    rc = 0
    try:
        print("imapshim demo (temporary directory %s)" % workdir)
        pki = harness.Pki(os.path.join(workdir, "pki"))
        admins = {a: "%s-%s" % (a, os.urandom(6).hex()) for a in ADMINS}
        print("  starting Dovecot, standing in for Exchange (master users %s) ..."
              % ", ".join(ADMINS))
        dovecot = harness.Dovecot(os.path.join(workdir, "dovecot"), pki, admins).start()
        status_port = harness.free_port()
        config = {
            "shim": {"log_level": "info", "status_listen": "%s:%d" % (harness.HOST, status_port),
                     "max_unauth_per_ip": str(max(256, args.mailboxes))},
            "upstream": {"login_format": "{mailbox}*{admin}"},
            "pool": {"mode": "multiplex", "session_budget": str(BUDGET),
                     "park_after": args.park_after},
        }
        for a in ADMINS:
            config["admin " + a] = {"max_sessions": str(PER_ADMIN)}
        shim = harness.ImapShim(binary, os.path.join(workdir, "imapshim"), pki,
                                dovecot.port_imaps, admins, config=config,
                                starttls=False, name="imapshim").start()
        url = "http://%s:%d" % (harness.HOST, status_port)
        harness.wait_until(lambda: _status_ok(url), timeout=10, what="imapshim /status")
        print("  'Exchange' (Dovecot) on %s:%d; imapshim on %s:%d, status %s"
              % (harness.HOST, dovecot.port_imaps, harness.HOST, shim.port, url))
        print("  imapshim: mode = multiplex, session_budget = %d, two admin accounts with "
              "max_sessions = %d, park_after = %s" % (BUDGET, PER_ADMIN, args.park_after))
        print("  %d voice mailboxes log in over %.0f s and poll every ~%.0f s; a delivery "
              "every %.0f s; %.0f s in all\n" % (args.mailboxes, args.ramp, args.poll,
                                                 args.deliver_every, args.duration))
        time.sleep(1)
        logins_before = dovecot_logins(dovecot)
        stats = Stats()
        ctx = pki.client_context()
        st = asyncio.run(run(args, shim, dovecot, ctx, url, load_top(), stats))
        deliveries_logins = len(stats.delivered)
        if not shim.alive():
            print("imapshim exited unexpectedly; its log:\n" + shim.log_text()[-3000:])
            rc = 1
        print_summary(stats, st, dovecot, logins_before, deliveries_logins, args, shim)
        if stats.errors or stats.max_used > BUDGET or stats.max_sockets > BUDGET:
            rc = 1
    except harness.HarnessError as e:
        print("demo.py: %s" % e, file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        rc = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if shim is not None:
            shim.stop()
        if dovecot is not None:
            dovecot.stop()
        if args.keep:
            print("kept %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return rc


def _status_ok(url):
    try:
        fetch_status(url)
        return True
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
