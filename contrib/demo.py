#!/usr/bin/python3
"""
demo.py - imapshim in front of a stand-in Exchange, with simulated voice
mailboxes.

What it does, all on 127.0.0.1 with free ports and a temporary directory:

  1. makes a throwaway PKI (tests/integration/harness.py: Pki);
  2. starts a private Dovecot standing in for Exchange: admin accounts
     NPUMAdmin1 and NPUMAdmin2 are Dovecot master users, so the upstream
     login "oozuna*NPUMAdmin1" plays the part of Exchange's delegated
     "example.com/NPUMAdmin1/oozuna";
  3. seeds a few voice messages into a handful of mailboxes;
  4. starts imapshim in front of it (login_format = {mailbox}*{admin},
     [pool] mode = session);
  5. runs simulated voice-mailbox sessions through imapshim, the way the
     voice platform does: LOGIN "example.com/NPUMAdmin1/<mailbox>", SELECT
     INBOX, UID SEARCH UNSEEN, UID FETCH one message, APPEND a ~60 KB voice
     message, LOGOUT;
  6. prints the transcript of the first sessions, then a summary table.

It stops by itself (after --sessions sessions, or --duration seconds at the
latest), or on Ctrl-C, and removes its temporary directory (--keep keeps
it, with the imapshim and Dovecot logs).

Run it with contrib/demo.sh, which installs and builds first, or directly
once imapshim is built:  /usr/bin/python3 contrib/demo.py [--help]
"""

import argparse
import io
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
import wave

TOP = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(TOP, "tests", "integration"))

import harness  # noqa: E402  (the integration tests' building blocks)

ADMINS = ("NPUMAdmin1", "NPUMAdmin2")
DOMAIN = "example.com"
MAILBOXES = ("oozuna", "jsmith", "mgarcia", "tnguyen", "akowalski", "lchen")
SEEDED_PER_MAILBOX = 3

# ---------------------------------------------------------------- scenario
#
# Growth point.  Today imapshim holds one upstream session per client
# session ([pool] mode = session, and the pool itself is still being built),
# so the demo runs a few dozen sessions with modest concurrency.  When the
# pool lands, this is where the demo grows: hundreds of sessions in
# mode = multiplex over a small session_budget (say 8 per admin account),
# a live status view fed by imapshim's /status endpoint (status_listen),
# and the "upstream logins" line of the summary showing the reuse.

SCENARIO = {
    "shim_config": {
        "shim": {"log_level": "info"},
        "upstream": {"login_format": "{mailbox}*{admin}"},
        "pool": {"mode": "session"},
    },
    "sessions": 40,
    "concurrency": 6,
    "duration": 50.0,        # seconds; the demo stops starting sessions after it
    "transcripts": 2,        # sessions whose full transcript is printed
}


def live_status(stats, final=False):
    """One status line, rewritten in place.  Later: the pool's view from
    /status (clients attached/parked/waiting, upstream sessions per admin)."""
    s = stats.snapshot()
    line = ("  sessions %3d/%d done (%d running), commands %4d, errors %d, %5.1fs"
            % (s["done"], s["planned"], s["running"], s["commands"], s["errors"],
               s["elapsed"]))
    if sys.stdout.isatty():
        sys.stdout.write("\r" + line + ("\n" if final else ""))
    elif final:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------ voice messages

def voice_wav(seconds, seed):
    """A small 8 kHz, 8-bit mono WAV: a few tones, like a short voice note."""
    rate = 8000
    frames = bytearray()
    tones = (330 + 40 * (seed % 7), 440 + 30 * (seed % 5), 262 + 20 * (seed % 3))
    n = int(seconds * rate)
    for i in range(n):
        f = tones[(i * len(tones)) // n]
        v = math.sin(2 * math.pi * f * i / rate) * (0.6 + 0.3 * math.sin(i / 900.0))
        frames.append(128 + int(100 * v))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(bytes(frames))
    return buf.getvalue()


def voice_message(mailbox, caller, seconds, seed):
    """An RFC 5322 voice message with the audio as a base64 attachment."""
    import base64
    audio = base64.encodebytes(voice_wav(seconds, seed))
    boundary = "=_voice_%d" % seed
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    head = (
        "From: \"Voice Mail\" <voicemail@%s>\r\n"
        "To: <%s@%s>\r\n"
        "Subject: Voice message from %s (%d seconds)\r\n"
        "Date: %s\r\n"
        "Message-ID: <vm.%d.%s@%s>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: multipart/mixed; boundary=\"%s\"\r\n"
        "\r\n"
        "--%s\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        "You have a new voice message from %s.\r\n"
        "\r\n"
        "--%s\r\n"
        "Content-Type: audio/wav; name=\"message.wav\"\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        "Content-Disposition: attachment; filename=\"message.wav\"\r\n"
        "\r\n" % (DOMAIN, mailbox, DOMAIN, caller, int(seconds), date, seed,
                  mailbox, DOMAIN, boundary, boundary, caller, boundary)
    ).encode()
    body = audio.replace(b"\n", b"\r\n")
    return head + body + ("\r\n--%s--\r\n" % boundary).encode()


CALLERS = ("+1 613 555 0142", "+44 20 7946 0018", "+1 416 555 0199", "+33 1 70 36 39 50")


# ------------------------------------------------------------------ stats

class Stats:
    def __init__(self, planned):
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.planned = planned
        self.started = 0
        self.done = 0
        self.ok = 0
        self.failed = 0
        self.commands = 0
        self.errors = 0          # NO/BAD answers and failed sessions
        self.latency = {}        # command name -> [seconds]
        self.fetched = 0
        self.appended = 0
        self.appended_bytes = 0
        self.failures = []       # (session, reason)

    def command(self, name, seconds, status):
        with self.lock:
            self.commands += 1
            self.latency.setdefault(name, []).append(seconds)
            if status != "OK":
                self.errors += 1

    def snapshot(self):
        with self.lock:
            return {"done": self.done, "planned": self.planned,
                    "running": self.started - self.done, "commands": self.commands,
                    "errors": self.errors, "elapsed": time.monotonic() - self.t0}


# ---------------------------------------------------------------- sessions

_LIT = re.compile(rb"\{(\d+)\+?\}\r\n")


def render(data, width=100):
    """Server bytes as readable lines: literal payloads become <N bytes>."""
    out, pos = b"", 0
    for m in _LIT.finditer(data):
        if m.start() < pos:
            continue
        n = int(m.group(1))
        out += data[pos:m.start()] + b"{%d}<%d bytes>" % (n, n)
        pos = m.end() + n
    out += data[pos:]
    lines = []
    for ln in out.decode("utf-8", errors="replace").splitlines():
        if len(ln) > width:
            ln = ln[:width - 3] + "..."
        lines.append(ln)
    return lines


class VoiceSession:
    """One simulated voice-mailbox session through imapshim."""

    def __init__(self, shim, n, mailbox, admin, stats, transcript=False):
        self.shim, self.n, self.mailbox, self.admin = shim, n, mailbox, admin
        self.stats = stats
        self.lines = [] if transcript else None

    def note(self, who, lines):
        if self.lines is not None:
            for ln in lines:
                self.lines.append("  %s %s" % (who, ln))

    def cmd(self, c, name, text, shown=None):
        tag = c.next_tag()
        self.note("C:", ["%s %s" % (tag, shown or text)])
        t = time.monotonic()
        r = c.command(text, tag=tag)
        self.stats.command(name, time.monotonic() - t, r.status)
        self.note("S:", render(r.raw))
        if r.status != "OK":
            raise harness.HarnessError("%s answered %s" % (name, render(r.tagged)[0]))
        return r

    def append(self, c, message):
        tag = c.next_tag()
        head = "%s APPEND INBOX {%d}" % (tag, len(message))
        self.note("C:", [head])
        t = time.monotonic()
        c.send(head.encode() + b"\r\n")
        items, plus = c.read_continuation()
        self.note("S:", render(b"".join(items) + plus))
        c.send(message + b"\r\n")
        self.note("C:", ["<%d bytes: a voice message, audio/wav in base64>" % len(message)])
        r = c.read_response(tag)
        self.stats.command("APPEND", time.monotonic() - t, r.status)
        self.note("S:", render(r.raw))
        if r.status != "OK":
            raise harness.HarnessError("APPEND answered %s" % render(r.tagged)[0])
        return r

    def run(self):
        user = self.shim.login_name(self.mailbox, self.admin, domain=DOMAIN)
        c = self.shim.client(timeout=15)
        try:
            self.note("S:", render(c.greeting))
            tag = c.next_tag()
            self.note("C:", ['%s LOGIN "%s" *****' % (tag, user)])
            t = time.monotonic()
            r = c.login(user, self.shim.admins[self.admin], tag=tag)
            self.stats.command("LOGIN", time.monotonic() - t, r.status)
            self.note("S:", render(r.raw))
            if r.status != "OK":
                raise harness.HarnessError("LOGIN answered %s" % render(r.tagged)[0])
            self.cmd(c, "SELECT", "SELECT INBOX")
            r = self.cmd(c, "UID SEARCH", "UID SEARCH UNSEEN")
            m = re.search(rb"^\* SEARCH([ 0-9]*)", r.raw, re.M)
            uids = [int(x) for x in m.group(1).split()] if m else []
            if not uids:
                r = self.cmd(c, "UID SEARCH", "UID SEARCH ALL")
                m = re.search(rb"^\* SEARCH([ 0-9]*)", r.raw, re.M)
                uids = [int(x) for x in m.group(1).split()] if m else []
            if uids:
                r = self.cmd(c, "UID FETCH",
                             "UID FETCH %d (FLAGS RFC822.SIZE BODY[])" % uids[0])
                with self.stats.lock:
                    self.stats.fetched += sum(len(x) for x in harness.fetch_literals(r))
            msg = voice_message(self.mailbox, CALLERS[self.n % len(CALLERS)],
                                5.5, 1000 + self.n)
            self.append(c, msg)
            with self.stats.lock:
                self.stats.appended += 1
                self.stats.appended_bytes += len(msg)
            tag = c.next_tag()
            self.note("C:", ["%s LOGOUT" % tag])
            t = time.monotonic()
            r = c.command("LOGOUT", tag=tag)
            self.stats.command("LOGOUT", time.monotonic() - t, r.status)
            self.note("S:", render(r.raw))
        finally:
            c.close()


# -------------------------------------------------------------------- main

class Stop(BaseException):
    """Ctrl-C or SIGTERM: not a session failure."""



def on_signal(signum, frame):
    raise Stop("signal %d" % signum)


def worker(shim, plan, stats, stop, deadline):
    while not stop.is_set() and time.monotonic() < deadline:
        with stats.lock:
            if not plan:
                return
            n, mailbox, admin = plan.pop(0)
            stats.started += 1
        ok, why = True, None
        try:
            VoiceSession(shim, n, mailbox, admin, stats).run()
        except Exception as e:  # a session's failure is data, not a crash
            ok, why = False, "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:160])
        with stats.lock:
            stats.done += 1
            if ok:
                stats.ok += 1
            else:
                stats.failed += 1
                stats.errors += 1
                stats.failures.append((n, why))


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(math.ceil(p / 100.0 * len(v))) - 1)] if v else 0.0


def print_summary(stats, dovecot, shim_log, logins_before):
    elapsed = time.monotonic() - stats.t0
    print()
    print("Summary")
    print("  %-30s %s" % ("client sessions", "%d run, %d ok, %d failed"
                          % (stats.done, stats.ok, stats.failed)))
    print("  %-30s %d" % ("IMAP commands", stats.commands))
    print("  %-30s %d" % ("errors (NO/BAD/failed)", stats.errors))
    print("  %-30s %.1f s" % ("elapsed", elapsed))
    print("  %-30s %d (%.0f KiB)" % ("voice messages appended", stats.appended,
                                     stats.appended_bytes / 1024.0))
    print("  %-30s %.0f KiB" % ("message bytes fetched", stats.fetched / 1024.0))
    logins = sum(dovecot.login_count(m) for m in MAILBOXES) - logins_before
    print("  %-30s %d  (today: one per client session; the pool will reuse them)"
          % ("upstream logins at 'Exchange'", logins))
    print()
    print("  %-12s %7s %9s %9s %9s" % ("command", "count", "avg ms", "p95 ms", "max ms"))
    order = ["LOGIN", "SELECT", "UID SEARCH", "UID FETCH", "APPEND", "LOGOUT"]
    for name in order + sorted(set(stats.latency) - set(order)):
        v = stats.latency.get(name)
        if not v:
            continue
        print("  %-12s %7d %9.1f %9.1f %9.1f" % (name, len(v), 1000 * sum(v) / len(v),
                                               1000 * pct(v, 95), 1000 * max(v)))
    if stats.failures:
        print()
        print("Failed sessions (first 5):")
        for n, why in stats.failures[:5]:
            print("  #%d %s" % (n, why))
    lines = [ln for ln in shim_log.splitlines() if "event=client_auth " in ln][:2]
    if lines:
        print()
        print("imapshim's log (one key=value line per event; passwords as *****):")
        for ln in lines:
            print("  " + ln[:150])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--sessions", type=int, default=SCENARIO["sessions"],
                    help="client sessions to run (default %(default)s)")
    ap.add_argument("--concurrency", type=int, default=SCENARIO["concurrency"],
                    help="sessions at once (default %(default)s)")
    ap.add_argument("--duration", type=float, default=SCENARIO["duration"],
                    help="stop starting sessions after this many seconds "
                         "(default %(default)s)")
    ap.add_argument("--transcripts", type=int, default=SCENARIO["transcripts"],
                    help="sessions whose transcript is printed (default %(default)s)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temporary directory (logs, configuration)")
    args = ap.parse_args()

    binary = os.environ.get("IMAPSHIM") or os.path.join(TOP, "build", "src", "imapshim")
    if not os.access(binary, os.X_OK):
        binary = harness.find_imapshim()
    if not binary or not os.access(binary, os.X_OK):
        sys.exit("demo.py: imapshim is not built; run contrib/demo.sh (or set IMAPSHIM)")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workdir = harness.make_tempdir(prefix="imapshim-demo-")
    dovecot = shim = None
    stop = threading.Event()
    threads = []
    stats = None
    logins_before = 0
    rc = 0
    try:
        print("imapshim demo (temporary directory %s)" % workdir)
        print("  making a test PKI ...")
        pki = harness.Pki(os.path.join(workdir, "pki"))
        admins = {a: "%s-%s" % (a, os.urandom(6).hex()) for a in ADMINS}
        print("  starting Dovecot, standing in for Exchange (master users %s) ..."
              % ", ".join(ADMINS))
        dovecot = harness.Dovecot(os.path.join(workdir, "dovecot"), pki, admins).start()
        print("  seeding %d voice messages into each of %d mailboxes ..."
              % (SEEDED_PER_MAILBOX, len(MAILBOXES)))
        for i, mb in enumerate(MAILBOXES):
            for j in range(SEEDED_PER_MAILBOX):
                dovecot.append(mb, voice_message(mb, CALLERS[(i + j) % len(CALLERS)],
                                                 2.0 + j, 100 * i + j))
        shim = harness.ImapShim(binary, os.path.join(workdir, "imapshim"), pki,
                                dovecot.port_imaps, admins,
                                config=SCENARIO["shim_config"], starttls=False,
                                name="imapshim").start()
        print("  'Exchange' (Dovecot) on %s:%d, imapshim on %s:%d (implicit TLS)"
              % (harness.HOST, dovecot.port_imaps, harness.HOST, shim.port))
        print("  imapshim configuration: %s" % shim.ini_path)

        # Logins the seeding made (straight to Dovecot) are not imapshim's.
        logins_before = sum(dovecot.login_count(m) for m in MAILBOXES)
        stats = Stats(args.sessions)
        deadline = time.monotonic() + args.duration
        plan = [(n + 1, MAILBOXES[n % len(MAILBOXES)], ADMINS[(n // len(MAILBOXES)) % len(ADMINS)])
                for n in range(args.sessions)]

        # The first sessions one by one, with their transcripts.
        for _ in range(min(args.transcripts, len(plan))):
            n, mb, admin = plan.pop(0)
            stats.started += 1
            s = VoiceSession(shim, n, mb, admin, stats, transcript=True)
            print("\nSession #%d: mailbox %s through admin %s" % (n, mb, admin))
            try:
                s.run()
                stats.ok += 1
            except Exception as e:
                stats.failed += 1
                stats.errors += 1
                stats.failures.append((n, "%s: %s" % (type(e).__name__, e)))
            finally:
                stats.done += 1
                print("\n".join(s.lines))

        # The rest at once, a few at a time.
        if plan:
            print("\nRunning %d more sessions, %d at a time ..." % (len(plan), args.concurrency))
            for _ in range(max(1, args.concurrency)):
                t = threading.Thread(target=worker, args=(shim, plan, stats, stop, deadline),
                                     daemon=True)
                t.start()
                threads.append(t)
            while any(t.is_alive() for t in threads):
                live_status(stats)
                time.sleep(0.25)
            live_status(stats, final=True)
            if plan:
                print("  (--duration %.0fs reached: %d sessions not started)"
                      % (args.duration, len(plan)))
        if not shim.alive():
            print("imapshim exited unexpectedly; its log:\n" + shim.log_text()[-3000:])
            rc = 1
        print_summary(stats, dovecot, shim.log_text(), logins_before)
        if stats.failed:
            rc = 1
    except Stop:
        print("\ninterrupted; stopping ...")
        rc = 130
        if stats is not None and dovecot is not None and shim is not None:
            stop.set()
            print_summary(stats, dovecot, shim.log_text(), logins_before)
    except harness.HarnessError as e:
        print("demo.py: %s" % e, file=sys.stderr)
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop.set()
        end = time.monotonic() + 20     # sockets time out after 15 s
        for t in threads:
            t.join(timeout=max(0.1, end - time.monotonic()))
        if shim is not None:
            shim.stop()
        if dovecot is not None:
            dovecot.stop()
        if args.keep:
            print("kept %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
