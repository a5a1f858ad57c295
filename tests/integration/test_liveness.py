"""
Liveness under a seeded random schedule (issue 12; DESIGN.md 3.6 "Liveness",
with 3.3-3.5): every tagged command a client sends gets exactly one tagged
answer, in the order sent, within command_timeout + queue_timeout, whatever
the upstream does and whatever the client pipelines.

The driver.  One seed decides everything the test chooses: the configuration
(session_budget 1-3, park_after, how many clients at most, message size) and
a sequence of steps.  imapshim runs in multiplex mode in front of the fake
Exchange (fake_exchange.py) with short timers.  Each step is one action,
then a short stretch of the event loop:
  clients    connect (most to a mailbox of their own, some sharing one) and
             LOGIN; pipeline 1-4 commands (SELECT/EXAMINE, NOOP, STATUS,
             LIST, UID FETCH/SEARCH/STORE, EXPUNGE, APPEND with LITERAL+);
             APPEND with a synchronizing literal; IDLE, then DONE later;
             LOGOUT; leave abruptly (FIN, RST, mid-literal, mid-FETCH);
             wait (so that imapshim parks them and polls idling ones).
  upstream   new mail (push); loss of a mailbox's connections or of all;
             one-shot faults armed in the fake ("the next IDLE of mailbox
             m: answer NO") on IDLE, on the DONE that ends it (the client's,
             or imapshim's own when it parks an idling client under budget
             pressure), on imapshim's park snapshot FETCH 1:* (UID FLAGS),
             on an attach's SELECT and resync FETCH, on an APPEND literal,
             mid FETCH response, on client commands and on LOGIN: drop,
             tagged NO or BAD, a stall longer than command_timeout, or a
             stall for good; a changed UIDVALIDITY; budget pressure (every
             free client at once).
One thread drives it all: select() over the client sockets
(harness.ImapClient.recv_nowait / take_items), a model per client of the
tags it sent and not yet had answered, in order, and of the IDLE or
synchronizing literal waiting for its "+".  The fake answers from its own
threads; its hooks (class Faults) report back which armed fault fired.

Checked all the time:
  - a tagged line answers the oldest outstanding tag of that client: never
    a tag it did not send, never one twice, never out of order; a "+" only
    where an IDLE or a synchronizing literal asked for it;
  - the clock of a command starts when it was sent or when the command
    before it was answered, whichever is later (imapshim relays a
    session's commands one at a time), and stops at its tagged answer (for IDLE: at
    its "+", and again from DONE); it must stop within command_timeout +
    queue_timeout + a margin for scheduling (2 s; 4 s under ASan);
  - no byte naming another mailbox reaches a client (the fake's messages
    and ours name their mailbox: To, Subject, Message-ID, body);
  - BAD only where the client earned it (a UID command with nothing
    selected) or a BAD was injected on that mailbox;
  - a connection imapshim closes must be explained: LOGOUT; BYE after a
    changed UIDVALIDITY; BYE "connection to Exchange was lost" after three
    or more injected losses of that mailbox (imapshim gives up after a
    few in a row); a silent close while the client holds half a
    response, after an upstream loss, or a BYE once the outstanding
    command had data responses, after an upstream loss.  These are
    counted; anything else (another BYE, e.g. after a NO to imapshim's own
    SELECT or FETCH; a silent close between responses) is a failure.
Checked at the end, once every client has left: /status shows no client in
any state, an empty queue and no upstream session but idle pooled ones;
imapshim is alive (conftest: exit 0 at SIGTERM, no sanitizer report).

On failure the assertion names the seed and shows the last 100 steps with
their times, and the fake's records and imapshim's log tail are attached.

Running:
  CI              REGRESSION_SEEDS and CI_SEEDS, IMAPSHIM_LIVENESS_STEPS
                  steps each (default 75, about 20 s a seed; 40 under
                  AddressSanitizer)
  one seed        IMAPSHIM_LIVENESS_SEED=N (that seed alone)
  long            IMAPSHIM_LIVENESS_SECONDS=3600: random seeds for an hour
                  instead (test_liveness[random]; stops at the first
                  failing seed and names it)
  step log        IMAPSHIM_LIVENESS_LOG=FILE appends every seed's whole
                  step log to FILE (the assertion shows the last 100 lines)
  e.g. IMAPSHIM=build/src/imapshim IMAPSHIM_LIVENESS_SEED=7 \\
         python3 -m pytest -q -p no:cacheprovider tests/integration/test_liveness.py
A seed replays the client side and the choice of faults exactly; when a
fault fires still depends on thread timing, so a failure may need a few
reruns (IMAPSHIM_KEEP_TMP=1 keeps imapshim's debug log).
"""

import collections
import json
import os
import random
import re
import select
import signal
import socket
import struct
import sys
import threading
import time

import pytest

import fake_exchange
import harness

# Every seed that ever failed, with what it found (they run in CI first).
# "base": the code before the client.c split; "split": the split client
# (client_*.c) as first built; "+fixes": base with the earlier findings
# patched out locally, which uncovered the later ones.
REGRESSION_SEEDS = [
    803058,  # long run: upstream lost under an idle client, its new login dropped:
             # BYE "no new session could be had" (R13), which the model did not know
    973866,  # long run: the model took the BAD after a refused re-SELECT
             # (nothing selected, DESIGN 3.5 R13) for one nothing asked for
    3,   # base, split: BAD to the resync FETCH 1:* -> BYE, attaching STATUS unanswered
    1,   # base: BYE Autologout command_timeout after an answer (timer never re-armed)
         # +fixes: NO to IDLE -> next command taken for DONE, answers out of order;
         # a stalled UID FETCH with an APPEND pipelined behind it never times out
    11,  # base: NO to IDLE -> the next IDLE is taken for DONE, never gets its "+"
    12,  # base: the upstream never answers the client's DONE -> IDLE unanswered
    10,  # base: IDLE slower than command_timeout upstream -> no "+", no answer;
         # split: BAD to the resync FETCH after losses -> BYE
    9,   # base, split: NO to the resync FETCH -> BYE, 8 pipelined commands lost
    2,   # +fixes: IDLE stalled upstream, client parked then left: still "attached",
         # its upstream session leased for good (budget 1: every later LOGIN NO)
    36,  # split: upstream cut just after a whole FETCH item -> silent close between
         # responses (no BYE, no tagged NO)
    30,  # split: NO to the re-SELECT after a loss -> BYE, 5 pipelined commands lost
]
# More seeds for CI, beyond the regression seeds (which already cover
# session_budget 1-3 and 3-6 clients, and fill the 2-3 minutes this file may
# take); a failing seed that finds nothing new (e.g. another Autologout on
# base) need not be added to either list.
CI_SEEDS = []

ADMIN = "NPUMAdmin1"
CMD_TIMEOUT = 2.0        # [upstream] command_timeout (and login_timeout, which
                         # times imapshim's own commands: SELECT, FETCH 1:*)
QUEUE_TIMEOUT = 3.0      # [pool] queue_timeout
IDLE_POLL = 1.0          # [pool] idle_poll_interval (its minimum)
STALL = CMD_TIMEOUT * 1.5  # a "slow" upstream: longer than command_timeout
MAX_PIPELINE = 6         # outstanding commands per client at most
# imapshim's warning that the mailbox could not be selected again.
NOTHING_SELECTED = b"* NO The selected mailbox could not be opened again"
# Data responses: a command that had some cannot be run again after a loss.
DATA_RE = re.compile(rb"\* (\d+ FETCH|SEARCH|STATUS|LIST|LSUB)\b", re.I)


def _asan(binary, _cache={}):
    """Built with --enable-sanitizers (libasan is linked dynamically: its
    entry symbol is what the binary shows)."""
    if binary not in _cache:
        try:
            with open(binary, "rb") as f:
                _cache[binary] = b"__asan_init" in f.read()
        except OSError:
            _cache[binary] = False
    return _cache[binary]


def _env_int(name, default):
    v = os.environ.get(name)
    return int(v) if v else default


def seeds():
    """The seeds to run; [0] stands for random seeds until
    IMAPSHIM_LIVENESS_SECONDS have passed (long_run)."""
    if os.environ.get("IMAPSHIM_LIVENESS_SECONDS"):
        return [0]
    one = os.environ.get("IMAPSHIM_LIVENESS_SEED")
    if one:
        return [int(one)]
    return list(dict.fromkeys(REGRESSION_SEEDS + CI_SEEDS))


# ------------------------------------------------------------------ faults

LOSS, REPLY_NO, REPLY_BAD = "loss", "no", "bad"


class Fault:
    def __init__(self, kind, mailbox, action, until):
        self.kind, self.mailbox, self.action, self.until = kind, mailbox, action, until

    @property
    def cls(self):
        a = self.action
        if isinstance(a, tuple) and a[0] == "reply":
            return REPLY_BAD if a[1].startswith(b"BAD") else REPLY_NO
        if isinstance(a, str) and a.startswith("NO"):
            return REPLY_NO          # a LOGIN refused
        return LOSS                  # drop, stall, slow, cut, half a literal

    def __repr__(self):
        a = self.action
        if isinstance(a, tuple) and a[0] == "reply":
            a = a[1].decode()
        return "%s/%s:%s" % (self.kind, self.mailbox, a)


class Faults:
    """
    One-shot faults armed by the driver in the fake Exchange: "the next
    <kind> of mailbox m gets <action>".  Kinds: idle, done (the DONE ending
    an IDLE), select (SELECT/EXAMINE), park_fetch / resync_fetch
    (imapshim's FETCH 1:* (UID FLAGS): after a SELECT it sent a moment
    before it is an attach's resync, else a park's snapshot), fetch_cut (a
    UID FETCH of bodies), cmd (a client command), literal (an APPEND
    literal), login.  The fake's threads call the hooks; the driver reads
    what fired with take_fired().
    """

    CLIENT_COMMANDS = {"NOOP", "STATUS", "LIST", "CHECK", "EXPUNGE", "UID FETCH",
                       "UID SEARCH", "UID STORE"}

    def __init__(self):
        self.lock = threading.Lock()
        self.armed = []
        self.fired = []

    def arm(self, kind, mailbox, action, ttl):
        f = Fault(kind, mailbox.lower(), action, time.monotonic() + ttl)
        with self.lock:
            self.armed.append(f)
        return f

    def take_fired(self):
        """[(time, fault, conn id, what it hit)] fired since the last call,
        and the faults that expired unfired."""
        now = time.monotonic()
        with self.lock:
            fired, self.fired = self.fired, []
            gone = [f for f in self.armed if f.until <= now]
            self.armed = [f for f in self.armed if f.until > now]
        return fired, gone

    def _fire(self, kinds, mailbox, conn, what):
        now = time.monotonic()
        mailbox = (mailbox or "").lower()
        with self.lock:
            for f in self.armed:
                if f.kind in kinds and f.mailbox == mailbox and f.until > now:
                    self.armed.remove(f)
                    self.fired.append((now, f, conn.id, what))
                    return f
        return None

    @staticmethod
    def _answer(f, tag):
        a = f.action
        if isinstance(a, tuple) and a[0] == "reply":
            return tag + b" " + a[1] + b"\r\n"
        return a

    @staticmethod
    def _after_select(conn):
        """imapshim's resync: FETCH 1:* right behind its own SELECT (a
        client's SELECT and a later park are park_after apart)."""
        cmds = conn.commands
        if len(cmds) < 2:
            return False
        (t0, prev), (t1, _) = cmds[-2], cmds[-1]
        return fake_exchange.command_name(prev) in ("SELECT", "EXAMINE") and t1 - t0 < 0.1

    def on_command(self, conn, tag, name, cmd):
        full = fake_exchange.command_name(cmd)
        if name == "IDLE":
            kinds = ("idle",)
        elif name in ("SELECT", "EXAMINE"):
            kinds = ("select",)
        elif full == "FETCH" and b"(UID FLAGS)" in cmd:
            kinds = ("resync_fetch",) if self._after_select(conn) else ("park_fetch",)
        elif full == "UID FETCH" and b"BODY" in cmd.upper():
            kinds = ("fetch_cut", "cmd")
        elif full in self.CLIENT_COMMANDS:
            kinds = ("cmd",)
        else:
            return None
        f = self._fire(kinds, conn.mailbox, conn, cmd[:50])
        return None if f is None else self._answer(f, tag)

    def on_idle_done(self, conn, tag):
        f = self._fire(("done",), conn.mailbox, conn, b"DONE of " + tag)
        return None if f is None else self._answer(f, tag)

    def on_literal(self, conn, head, n):
        if fake_exchange.command_name(head) != "APPEND":
            return None
        f = self._fire(("literal",), conn.mailbox, conn, head[:50])
        return None if f is None else max(0, min(n - 1, int(n * f.action)))

    def on_login(self, conn, user, password):
        f = self._fire(("login",), re.split(r"[/\\]", user)[-1], conn, b"LOGIN")
        return None if f is None else f.action

    def hooks(self):
        return {"on_command": self.on_command, "on_idle_done": self.on_idle_done,
                "on_literal": self.on_literal, "on_login": self.on_login}


# ------------------------------------------------------------------ model

class Cmd:
    """One tagged command of a client, from sending to its tagged answer."""

    def __init__(self, tag, name, step, literal=None):
        self.tag, self.name, self.step = tag, name, step
        self.literal = literal   # synchronizing literal to send at "+"
        self.state = None        # IDLE: cont -> idling -> done; APPEND {n}: cont -> sent
        self.sent = time.monotonic()
        self.late = False


class Client:
    def __init__(self, n, mailbox, ic):
        self.name = "c%d" % n
        self.mailbox = mailbox
        self.ic = ic
        self.tagn = 0
        self.pend = collections.deque()
        self.clock = None        # when the oldest outstanding command's clock started
        self.authed = False
        self.selected = False    # as the answers so far say
        self.idle = None         # the IDLE in progress
        self.cont = None         # the APPEND waiting for "+"
        self.got_data = False    # the oldest outstanding command has had data
        self.logout = False
        self.bye = None
        self.gone = False
        self.active = time.monotonic()

    def tag(self):
        self.tagn += 1
        return "%s.%d" % (self.name, self.tagn)

    @property
    def free(self):
        """May send a new command now."""
        return (self.authed and not self.gone and not self.logout and self.idle is None
                and self.cont is None and len(self.pend) < MAX_PIPELINE)

    def __repr__(self):
        return "%s(%s)" % (self.name, self.mailbox)


class Failed(Exception):
    pass


# ------------------------------------------------------------------ driver

class Liveness:
    def __init__(self, seed, steps, make_shim, make_fake, pki, admins, asan):
        self.seed = seed
        self.steps = steps
        self.rng = rng = random.Random(seed)
        self.t0 = time.monotonic()
        self.margin = 4.0 if asan else 2.0
        self.limit = CMD_TIMEOUT + QUEUE_TIMEOUT + self.margin
        self.window = 3 * self.limit   # how long an injected fault explains a close
        self.admins = admins
        self.pki = pki
        self.ctx = pki.client_context()
        self.budget = rng.choice((1, 2, 2, 3))
        self.max_clients = rng.randint(3, 6)
        self.park_after = rng.choice((0.2, 0.4, 0.8))
        self.message_size = rng.choice((1500, 6000, 20000))
        self.prefix = "lv%04d" % (seed % 10000)
        self.mailboxes = ["%sm%02d" % (self.prefix, i) for i in range(self.max_clients + 2)]
        self.name_re = re.compile((r"lv\d{4}m\d{2}").encode())
        self.log = []
        self.step_no = 0
        self.failures = []
        self.clients = []
        self.nclients = 0
        self.counts = collections.Counter()
        self.latency_max = 0.0
        self.events = collections.defaultdict(list)   # mailbox -> [(t, class, kind)]
        self.uidv_changed = set()
        self.msg_n = 1000
        self.faults = Faults()
        self.fake = make_fake(messages_per_mailbox=3, message_size=self.message_size,
                              script=self.faults.hooks())
        self.status_port = harness.free_port()
        self.shim = make_shim(self.fake.port, config={
            "shim": {"status_listen": "%s:%d" % (harness.HOST, self.status_port),
                     "max_unauth_per_ip": "1000"},
            "upstream": {"command_timeout": "%dms" % (CMD_TIMEOUT * 1000),
                         "login_timeout": "%dms" % (CMD_TIMEOUT * 1000),
                         "connect_timeout": "%dms" % (CMD_TIMEOUT * 1000)},
            "pool": {"mode": "multiplex", "session_budget": str(self.budget),
                     "park_after": "%dms" % (self.park_after * 1000),
                     "queue_timeout": "%dms" % (QUEUE_TIMEOUT * 1000),
                     "idle_poll_interval": "%dms" % (IDLE_POLL * 1000),
                     "reuse_timeout": "3s", "login_rate": "1000", "login_burst": "1000"},
            "retry": {"backoff_initial": "50ms", "backoff_max": "300ms",
                      "server_fail_threshold": "1000", "negative_cache_ttl": "0"},
        })
        self.note("seed %d: budget %d, up to %d clients, park_after %.1fs, messages of %d "
                  "bytes, limit %.1fs; imapshim %s, fake port %d"
                  % (seed, self.budget, self.max_clients, self.park_after,
                     self.message_size, self.limit, self.shim.log_path, self.fake.port))

    # ---- records
    def note(self, text):
        self.log.append("%8.3f s%03d %s" % (time.monotonic() - self.t0, self.step_no, text))

    def fail(self, text):
        self.note("FAIL " + text)
        self.failures.append("step %d (t=%.3f): %s" % (self.step_no,
                                                       time.monotonic() - self.t0, text))

    def report(self):
        tail = self.log[-100:]
        return ("seed %d: %d failure(s):\n  %s\nsummary: %s\nrerun: IMAPSHIM_LIVENESS_SEED=%d "
                "(keep the seed in REGRESSION_SEEDS)\nstep log (last %d of %d lines):\n%s"
                % (self.seed, len(self.failures), "\n  ".join(self.failures[:12]),
                   self.summary(), self.seed, len(tail), len(self.log), "\n".join(tail)))

    def summary(self):
        c = self.counts
        return ("seed %d: %d steps in %.1fs, budget %d, %d client sessions, %d answers "
                "(%s), NO [UNAVAILABLE] %d, slowest answer %.2fs (limit %.1fs), faults fired "
                "%s, expired %d, kills %d, closes explained %s"
                % (self.seed, self.step_no, time.monotonic() - self.t0, self.budget,
                   self.nclients, c["answers"],
                   ", ".join("%s %d" % (k[7:], v) for k, v in sorted(c.items())
                             if k.startswith("status_")),
                   c["unavailable"], self.latency_max, self.limit,
                   dict(sorted((k[6:], v) for k, v in c.items() if k.startswith("fired_"))),
                   c["expired"], c["kills"],
                   dict(sorted((k[6:], v) for k, v in c.items() if k.startswith("close_")))))

    def recent(self, mailbox, classes, kinds=None):
        """Faults that hit mailbox lately: [(time, class, kind)]."""
        now = time.monotonic()
        return [e for e in self.events[mailbox.lower()]
                if now - e[0] < self.window and e[1] in classes
                and (kinds is None or e[2] in kinds)]

    def take_fired(self):
        fired, gone = self.faults.take_fired()
        for t, f, cid, what in fired:
            self.events[f.mailbox].append((t, f.cls, f.kind))
            # imapshim's own commands carry tags U1, U2, ...
            own = f.kind in ("select", "cmd") and re.match(rb"U\d+ ", what)
            self.counts["fired_" + f.kind + ("(own)" if own else "")] += 1
            self.note("fault fired %r on upstream conn %d at %r" % (f, cid, what))
        for f in gone:
            self.counts["expired"] += 1
            self.note("fault expired unfired %r" % f)

    # ---- client I/O
    def live(self):
        return [c for c in self.clients if not c.gone]

    def connect(self, mailbox):
        self.nclients += 1
        try:
            ic = harness.ImapClient(self.shim.port, tls=self.ctx, timeout=5.0)
        except (OSError, harness.HarnessError) as e:
            self.fail("cannot connect to imapshim: %r" % e)
            return None
        c = Client(self.nclients, mailbox, ic)
        self.clients.append(c)
        user = "example.com/%s/%s" % (ADMIN, mailbox)
        self.note("%r connects" % c)
        self.send(c, [(b"LOGIN " + harness.imap_quote(user) + b" "
                       + harness.imap_quote(self.admins[ADMIN]), "LOGIN", None)])
        return c

    def send(self, c, cmds, extra=b""):
        """Send [(text, name, literal)] in one write (a pipeline); a command
        with a synchronizing literal must come last.  extra: bytes after."""
        data = b""
        for text, name, literal in cmds:
            cmd = Cmd(c.tag(), name, self.step_no, literal)
            if name == "IDLE":
                cmd.state = "cont"
                c.idle = cmd
            if literal is not None:
                cmd.state = "cont"
                c.cont = cmd
            data += cmd.tag.encode() + b" " + text + b"\r\n"
            if not c.pend:
                c.clock = cmd.sent
            c.pend.append(cmd)
        self.note("%r sends %r" % (c, (data + extra)[:160]))
        self.write(c, data + extra)

    def write(self, c, data):
        try:
            c.ic.send(data)
            c.active = time.monotonic()
            return True
        except socket.timeout:
            self.fail("%r: imapshim took no byte of %d for 5s (not reading)" % (c, len(data)))
        except OSError as e:
            self.note("%r: send failed: %r" % (c, e))
            self.read(c)
            if not c.gone:
                self.closed(c, "send failed: %r" % e)
        return False

    def read(self, c):
        alive = c.ic.recv_nowait()
        self.take_fired()     # what a fault made imapshim say is judged knowing it
        for item in c.ic.take_items():
            if c.gone:
                break
            self.item(c, item)
        if not alive and not c.gone:
            self.closed(c, "eof (%r)" % getattr(c.ic, "eof_error", None))

    def item(self, c, item):
        names = set(self.name_re.findall(item))
        if names - {c.mailbox.encode()}:
            self.fail("%r got bytes of another mailbox %r: %r" % (c, names, item[:200]))
        if item.startswith(b"+"):
            if c.cont is not None and c.cont.state == "cont":
                cmd, c.cont = c.cont, None
                cmd.state = "sent"
                c.clock = time.monotonic()
                self.note("%r: + for %s, literal of %d follows" % (c, cmd.tag, len(cmd.literal)))
                self.write(c, cmd.literal + b"\r\n")
            elif c.idle is not None and c.idle.state == "cont":
                c.idle.state = "idling"
                self.note("%r: idling (%s)" % (c, c.idle.tag))
            else:
                self.fail("%r: a continuation nobody asked for: %r" % (c, item[:120]))
            return
        if item.startswith(b"* "):
            if item[2:5].upper() == b"BYE":
                c.bye = item.strip()
                self.note("%r: %r" % (c, item.strip()[:120]))
            elif item.startswith(NOTHING_SELECTED):
                # Exchange refused imapshim's re-SELECT after a loss
                # (DESIGN 3.5 R13): from here the server's answers
                # follow from no mailbox being selected.
                c.selected = False
                self.note("%r: %r" % (c, item.strip()[:120]))
            elif c.pend and DATA_RE.match(item):
                c.got_data = True
            return
        tag = item.split(b" ", 1)[0].decode(errors="replace")
        if not c.pend or c.pend[0].tag != tag:
            where = [p.tag for p in c.pend]
            self.fail("%r: tagged line %r %s (outstanding, in order: %s)" % (
                c, item.strip()[:120], "answers a later command first" if tag in where
                else "answers no outstanding command", where))
            return
        cmd = c.pend.popleft()
        c.got_data = False
        now = time.monotonic()
        took = now - c.clock
        c.clock = now
        self.latency_max = max(self.latency_max, took)
        status = (item.split(b" ", 2) + [b""])[1].upper().decode(errors="replace")
        self.counts["answers"] += 1
        self.counts["status_" + status] += 1
        if b"[UNAVAILABLE]" in item:
            self.counts["unavailable"] += 1
        self.note("%r: %s %s -> %r (%.2fs)%s" % (c, cmd.tag, cmd.name, item.strip()[:100], took,
                                                 " LATE" if cmd.late else ""))
        if cmd is c.idle:
            c.idle = None
        if cmd is c.cont:
            c.cont = None         # refused before its "+": the literal is not sent
        self.judge(c, cmd, status, item)

    def judge(self, c, cmd, status, item):
        """The model's view of the answer; BAD only where earned."""
        name = cmd.name
        if name == "LOGIN":
            if status == "OK":
                c.authed = True
            else:
                self.note("%r: login refused, leaves" % c)
                self.drop(c, "close")
            if status == "BAD":
                self.fail("%r: LOGIN answered BAD: %r" % (c, item[:120]))
            return
        if name in ("SELECT", "EXAMINE"):
            c.selected = status == "OK"
        if status == "BAD":
            earned = name.startswith("UID ") or name == "EXPUNGE"
            earned = earned and not c.selected
            if not earned and not self.recent(c.mailbox, (REPLY_BAD,)):
                self.fail("%r: %s %s answered BAD (nothing asked for it): %r"
                          % (c, cmd.tag, name, item.strip()[:120]))
        if name == "LOGOUT" and status == "OK":
            self.close_client(c)

    def closed(self, c, how):
        """imapshim closed c: explain it or fail."""
        c.gone = True
        partial = bool(c.ic.buf)
        outstanding = [p.tag for p in c.pend]
        why = None
        bye = c.bye or b""
        if c.logout and not c.pend:
            why = "logout"
        elif b"UIDVALIDITY" in bye and c.mailbox in self.uidv_changed:
            why = "uidvalidity"
        elif (b"connection to Exchange was lost" in bye
              and len(self.recent(c.mailbox, (LOSS,))) >= 3):
            why = "repeated_loss"
        elif (b"no new session could be had" in bye
              and self.recent(c.mailbox, (LOSS,), ("login",))
              and self.recent(c.mailbox, (LOSS,))):
            # the session was lost and the login of its replacement
            # failed too (DESIGN 3.5 R13)
            why = "no_new_session"
        elif not bye and partial and self.recent(c.mailbox, (LOSS,)):
            why = "cut_mid_response"
        elif bye and c.got_data and self.recent(c.mailbox, (LOSS,)):
            why = "bye_mid_response"
        if why:
            self.counts["close_" + why] += 1
            self.note("%r closed by imapshim (%s), explained: %s; outstanding %s"
                      % (c, how, why, outstanding))
        else:
            self.fail("%r closed by imapshim (%s) with %s, %s, outstanding %s; partial %r; "
                      "its mailbox's recent faults %r"
                      % (c, how, ("BYE %r" % bye) if bye else "no BYE",
                         "half a response buffered" if partial else
                         "between responses (%s)" % ("data of the outstanding command had come"
                                                     if c.got_data else "none of its data"),
                         outstanding, c.ic.buf[:120], self.recent(c.mailbox, (LOSS, REPLY_NO,
                                                                             REPLY_BAD))))
        c.ic.close()

    def close_client(self, c):
        c.gone = True
        c.ic.close()

    def drop(self, c, how):
        """The client leaves abruptly (how: close, rst)."""
        if how == "rst":
            try:
                c.ic.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.note("%r leaves (%s) with %d outstanding" % (c, how, len(c.pend)))
        self.close_client(c)

    # ---- the loop
    def pump(self, seconds):
        end = time.monotonic() + seconds
        while True:
            self.check_deadlines()
            if not self.shim.alive():
                raise Failed("imapshim died (exit status %s)" % self.shim.proc.returncode)
            left = end - time.monotonic()
            if left <= 0:
                return
            socks = {c.ic.sock.fileno(): c for c in self.live()}
            if socks:
                # poll, not select: a long run's descriptors pass 1024
                p = select.poll()
                for fd in socks:
                    p.register(fd, select.POLLIN)
                for fd, _ in p.poll(min(left, 0.05) * 1000):
                    c = socks[fd]
                    if not c.gone:
                        self.read(c)
            else:
                time.sleep(min(left, 0.05))
            self.take_fired()

    def check_deadlines(self):
        now = time.monotonic()
        for c in self.live():
            if not c.pend:
                continue
            head = c.pend[0]
            if head.late or (head is c.idle and head.state == "idling"):
                continue
            if now - c.clock > self.limit:
                head.late = True
                what = {"cont": "no continuation", "idling": "-", "done": "no answer after DONE",
                        "sent": "no answer after the literal"}.get(head.state, "no answer")
                self.fail("%r: %s for %s %s (sent at step %d) within %.1fs; outstanding %s"
                          % (c, what, head.tag, head.name, head.step, self.limit,
                             [p.tag for p in c.pend]))

    # ---- actions
    def new_message(self, mailbox, size=None):
        self.msg_n += 1
        return fake_exchange.make_message(mailbox, self.msg_n, size or self.rng.choice(
            (300, 2000, 9000)))

    def pick(self, pred=None):
        cs = [c for c in self.live() if pred is None or pred(c)]
        return self.rng.choice(cs) if cs else None

    def free_mailbox(self):
        used = {c.mailbox for c in self.live()}
        spare = [m for m in self.mailboxes if m not in used]
        return self.rng.choice(spare or self.mailboxes)

    def a_connect(self):
        if len(self.live()) >= self.max_clients:
            return False
        shared = [c.mailbox for c in self.live()]
        mbx = (self.rng.choice(shared) if shared and self.rng.random() < 0.25
               else self.free_mailbox())
        self.connect(mbx)
        return True

    def batch(self, c, n=None):
        """1-4 commands for c (UID commands mostly after a SELECT)."""
        rng = self.rng
        out = []
        selected = c.selected
        for _ in range(n or rng.randint(1, 4)):
            if not selected and rng.random() < 0.5:
                name = rng.choice(("SELECT", "SELECT", "EXAMINE"))
                out.append((name.encode() + b" INBOX", name, None))
                selected = True
                continue
            k = rng.choice(("NOOP", "STATUS", "LIST", "FETCH", "FETCH", "BODY", "SEARCH",
                            "STORE", "APPEND", "EXPUNGE", "SELECT", "CHECK"))
            if k in ("FETCH", "BODY", "SEARCH", "STORE", "EXPUNGE") and not selected \
                    and rng.random() < 0.8:
                k = "NOOP"
            if k == "NOOP":
                out.append((b"NOOP", "NOOP", None))
            elif k == "STATUS":
                out.append((b"STATUS INBOX (MESSAGES UIDNEXT)", "STATUS", None))
            elif k == "LIST":
                out.append((b'LIST "" "*"', "LIST", None))
            elif k == "CHECK":
                out.append((b"CHECK", "CHECK", None))
            elif k == "FETCH":
                out.append((b"UID FETCH 1:* (FLAGS)", "UID FETCH", None))
            elif k == "BODY":
                out.append((b"UID FETCH %d:* (BODY.PEEK[])" % rng.randint(1, 4), "UID FETCH",
                            None))
            elif k == "SEARCH":
                out.append((b"UID SEARCH ALL", "UID SEARCH", None))
            elif k == "STORE":
                flag = rng.choice((b"\\Seen", b"\\Flagged", b"\\Deleted", b"$MDNSent"))
                out.append((b"UID STORE %d %sFLAGS (%s)" % (rng.randint(1, 8),
                                                           rng.choice((b"+", b"-")), flag),
                            "UID STORE", None))
            elif k == "EXPUNGE":
                out.append((b"EXPUNGE", "EXPUNGE", None))
            elif k == "SELECT":
                out.append((b"SELECT INBOX", "SELECT", None))
                selected = True
            elif k == "APPEND":
                msg = self.new_message(c.mailbox)
                out.append((b"APPEND INBOX {%d+}\r\n" % len(msg) + msg, "APPEND", None))
        return out

    def a_commands(self, c=None):
        c = c or self.pick(lambda c: c.free)
        if c is None:
            return False
        self.send(c, self.batch(c))
        return True

    def a_append_sync(self, c=None, size=None):
        c = c or self.pick(lambda c: c.free)
        if c is None:
            return False
        msg = self.new_message(c.mailbox, size)
        flags = self.rng.choice((b"", b" (\\Seen)"))
        self.send(c, [(b"APPEND INBOX%s {%d}" % (flags, len(msg)), "APPEND", msg)])
        return True

    def a_idle(self, c=None):
        c = c or self.pick(lambda c: c.free and not c.pend)
        if c is None:
            return False
        self.send(c, [(b"IDLE", "IDLE", None)])
        return True

    def a_done(self, c=None):
        c = c or self.pick(lambda c: c.idle is not None and c.idle.state == "idling")
        if c is None:
            return False
        c.idle.state = "done"
        c.clock = time.monotonic()
        self.note("%r sends DONE for %s" % (c, c.idle.tag))
        self.write(c, b"DONE\r\n")
        return True

    def a_wait(self):
        t = self.rng.choice((self.park_after * 1.5, IDLE_POLL * 1.2, 0.5))
        self.note("waits %.1fs" % t)
        self.pump(t)
        return True

    def a_logout(self):
        c = self.pick(lambda c: c.free)
        if c is None:
            return False
        self.send(c, [(b"LOGOUT", "LOGOUT", None)])
        c.logout = True
        return True

    def a_leave(self):
        c = self.pick()
        if c is None:
            return False
        how = self.rng.choice(("close", "rst", "literal", "sync_literal", "fetch"))
        if how == "literal" and c.free:
            msg = self.new_message(c.mailbox, 9000)
            self.write(c, b"%s APPEND INBOX {%d+}\r\n" % (c.tag().encode(), len(msg))
                       + msg[:self.rng.randint(0, len(msg) - 1)])
        elif how == "sync_literal" and c.free:
            self.write(c, b"%s APPEND INBOX {%d}\r\n" % (c.tag().encode(), 500))
        elif how == "fetch" and c.free and c.selected:
            self.write(c, b"%s UID FETCH 1:* (BODY.PEEK[])\r\n" % c.tag().encode())
        if not c.gone:
            self.drop(c, "rst" if how == "rst" else "close after %s" % how)
        return True

    def a_push(self):
        c = self.pick()
        if c is None:
            return False
        self.note("new mail for %s" % c.mailbox)
        self.fake.push(c.mailbox, self.new_message(c.mailbox, 1200))
        return True

    def a_kill(self):
        c = self.pick(lambda c: c.authed)
        if c is None:
            return False
        n = self.fake.kill_mailbox(c.mailbox, bye=self.rng.choice(
            (None, b"* BYE Connection is closed. 13\r\n")))
        self.events[c.mailbox].append((time.monotonic(), LOSS, "kill"))
        self.counts["kills"] += 1
        self.note("upstream of %s killed (%d connections)" % (c.mailbox, n))
        return True

    def a_drop_all(self):
        n = self.fake.drop_all()
        for m in self.mailboxes:
            self.events[m].append((time.monotonic(), LOSS, "drop_all"))
        self.counts["kills"] += 1
        self.note("every upstream connection dropped (%d)" % n)
        return True

    def a_pressure(self):
        cs = [c for c in self.live() if c.free]
        if len(cs) < 2:
            return False
        self.note("pressure: %d clients at once" % len(cs))
        for c in cs:
            if not c.gone:
                self.send(c, [(b"NOOP", "NOOP", None)])
        return True

    def a_uidvalidity(self):
        c = self.pick(lambda c: c.selected)
        if c is None:
            return False
        mb = self.fake.mailbox(c.mailbox)
        with self.fake.lock:
            mb.uidvalidity += 1
        self.uidv_changed.add(c.mailbox)
        self.note("UIDVALIDITY of %s changed to %d" % (c.mailbox, mb.uidvalidity))
        return True

    def reply_action(self, no_ok=True, bad_ok=True):
        opts = ["drop", "stall", STALL]
        if no_ok:
            opts += [("reply", b"NO Server Unavailable. 15"),
                     ("reply", b"NO Command received in Invalid state.")]
        if bad_ok:
            opts.append(("reply", b"BAD Command Error. 12"))
        return self.rng.choice(opts)

    def a_fault(self):
        rng = self.rng
        kind = rng.choice(("idle", "done", "done", "park_fetch", "park_fetch", "select",
                           "resync_fetch", "literal", "fetch_cut", "cmd", "login"))
        ttl = self.limit
        if kind == "login":
            if len(self.live()) >= self.max_clients:
                return False
            mbx = self.free_mailbox()
            f = self.faults.arm("login", mbx, rng.choice(
                ("stall", "drop", "NO LOGIN failed.", STALL)), ttl)
            self.note("armed %r" % f)
            self.connect(mbx)
            return True
        if kind == "done":
            c = self.pick(lambda c: c.idle is not None and c.idle.state == "idling")
        elif kind in ("park_fetch", "select", "resync_fetch", "fetch_cut"):
            c = self.pick(lambda c: c.free and c.selected)
        elif kind == "idle":
            c = self.pick(lambda c: c.free and not c.pend)
        else:
            c = self.pick(lambda c: c.free)
        if c is None:
            return False
        if kind == "literal":
            action = rng.random()           # fraction of the literal read
        elif kind == "fetch_cut":
            action = ("cut", rng.randint(1, 3 * self.message_size))
        elif kind == "cmd":
            action = rng.choice(("drop", "stall", "drop_after", STALL))
        else:
            action = self.reply_action()
        f = self.faults.arm(kind, c.mailbox, action, ttl)
        self.note("armed %r for %r" % (f, c))
        if kind == "idle":
            self.a_idle(c)
        elif kind == "done":
            if rng.random() < 0.5:
                self.a_done(c)
            else:
                self.a_pressure_for(c)
        elif kind == "park_fetch":
            self.send(c, [(b"NOOP", "NOOP", None)])   # attached now; parks after park_after
        elif kind in ("select", "resync_fetch"):
            if time.monotonic() - c.active < self.park_after:
                self.pump(self.park_after + 0.2)       # let it park first
            if c.free:
                self.send(c, self.batch(c, 1))
        elif kind == "literal":
            if rng.random() < 0.5:
                self.a_append_sync(c, 20000)
            else:
                msg = self.new_message(c.mailbox, 20000)
                self.send(c, [(b"APPEND INBOX {%d+}\r\n" % len(msg) + msg, "APPEND", None)])
        elif kind == "fetch_cut":
            self.send(c, [(b"UID FETCH 1:* (BODY.PEEK[])", "UID FETCH", None)])
        else:
            self.send(c, self.batch(c))
        return True

    def a_pressure_for(self, idler):
        """Make imapshim want the idler's session: others need one now."""
        others = [c for c in self.live() if c.free and c is not idler]
        if others:
            for c in others:
                self.send(c, [(b"NOOP", "NOOP", None)])
        elif len(self.live()) < self.max_clients:
            self.connect(self.free_mailbox())
        self.note("pressure on %r's session (%d others)" % (idler, len(others)))

    ACTIONS = (("connect", 6), ("commands", 22), ("append_sync", 4), ("idle", 6), ("done", 5),
               ("wait", 6), ("logout", 2), ("leave", 3), ("push", 4), ("kill", 3),
               ("drop_all", 0.4), ("fault", 16), ("pressure", 3), ("uidvalidity", 0.5))

    def step(self):
        names = [a for a, _ in self.ACTIONS]
        weights = [w for _, w in self.ACTIONS]
        for _ in range(10):
            a = self.rng.choices(names, weights)[0]
            if getattr(self, "a_" + a)():
                break
        self.pump(self.rng.uniform(0.02, 0.2))

    def run(self):
        try:
            harness.wait_until(lambda: self.status(), timeout=5, what="/status")
            for _ in range(min(3, self.max_clients)):
                self.connect(self.free_mailbox())
            self.pump(0.3)
            while self.step_no < self.steps and not self.failures:
                self.step_no += 1
                self.step()
            self.wind_down()
        except Failed as e:
            self.fail(str(e))
        finally:
            for c in self.live():
                self.close_client(c)
        self.note(self.summary())

    def wind_down(self):
        """End every IDLE, let every answer come, leave, and see that
        imapshim has nothing left over."""
        if self.failures:
            self.note("a failure: waiting %.1fs more to see what still comes" % self.limit)
            self.pump(self.limit)
            return
        self.note("winding down")
        for c in self.live():
            if c.idle is not None and c.idle.state == "idling":
                self.a_done(c)
        deadline = time.monotonic() + 2 * self.limit
        while any(c.pend for c in self.live()) and time.monotonic() < deadline \
                and not self.failures:
            self.pump(0.1)
        for c in self.live():
            if c.authed and c.free and self.rng.random() < 0.5:
                self.send(c, [(b"LOGOUT", "LOGOUT", None)])
                c.logout = True
            else:
                self.drop(c, "close")
        deadline = time.monotonic() + self.limit
        while self.live() and time.monotonic() < deadline and not self.failures:
            self.pump(0.1)
        if self.failures:
            return
        for conn in self.fake.connections:
            if conn.error:
                self.fail("fake_exchange failed on upstream conn %d: %s" % (conn.id, conn.error))
        for c in self.live():
            self.fail("%r: LOGOUT not answered and closed; outstanding %r"
                      % (c, [p.tag for p in c.pend]))
        last = [None]

        def settled():
            st = last[0] = self.status()
            busy = {}
            for a in st["admins"]:
                for k, v in a["sessions"].items():
                    if v and k != "idle":
                        busy[k] = busy.get(k, 0) + v
            return not any(st["clients"].values()) and not st["queue"]["length"] and not busy
        try:
            harness.wait_until(settled, timeout=self.limit, interval=0.1,
                               what="no client, empty queue, only idle upstream sessions")
            self.note("settled: %s" % json.dumps({k: last[0][k] for k in
                                                  ("clients", "queue", "budget")}))
        except harness.HarnessError as e:
            self.fail("every client has left, but %s: /status %s" % (e, json.dumps(last[0])))

    def status(self):
        return json.loads(harness.http_get(self.status_port, "/status"))


def run_seed(seed, steps, make_shim, make_fake, pki, admins):
    asan = _asan(make_shim.binary)
    # the conftest's alarm is per test; one seed is bounded by its steps
    signal.alarm(int(steps * 0.6 + 120))
    drv = Liveness(seed, steps, make_shim, make_fake, pki, admins, asan)
    drv.run()
    print("\n" + drv.summary())
    if os.environ.get("IMAPSHIM_LIVENESS_LOG"):
        with open(os.environ["IMAPSHIM_LIVENESS_LOG"], "a") as f:
            f.write("\n".join(drv.log + drv.failures) + "\n")
    return drv


def default_steps(make_shim):
    return _env_int("IMAPSHIM_LIVENESS_STEPS", 40 if _asan(make_shim.binary) else 75)


@pytest.mark.parametrize("seed", seeds(), ids=lambda s: "seed%d" % s if s else "random")
def test_liveness(seed, make_shim, make_fake, pki, admins):
    """The seeded random driver of the module docstring, one seed."""
    if seed == 0:
        long_run(make_shim, make_fake, pki, admins)
        return
    drv = run_seed(seed, default_steps(make_shim), make_shim, make_fake, pki, admins)
    assert not drv.failures, drv.report()


def long_run(make_shim, make_fake, pki, admins):
    """Random seeds until IMAPSHIM_LIVENESS_SECONDS have passed; stops at
    the first failing seed (add it to REGRESSION_SEEDS)."""
    end = time.monotonic() + float(os.environ["IMAPSHIM_LIVENESS_SECONDS"])
    sysrand = random.SystemRandom()
    done = []
    while time.monotonic() < end:
        seed = sysrand.randrange(1, 10 ** 6)
        drv = run_seed(seed, default_steps(make_shim), make_shim, make_fake, pki, admins)
        assert not drv.failures, "after %d good seeds %r:\n%s" % (len(done), done, drv.report())
        done.append(seed)
        rc = drv.shim.stop()
        drv.fake.stop()
        assert rc == 0, "seed %d: exit status %s after SIGTERM" % (seed, rc)
        # a good seed's logs need not go into a later failure's report
        active = getattr(sys.modules.get("conftest"), "_ACTIVE", {})
        for k, obj in (("shims", drv.shim), ("fakes", drv.fake)):
            if obj in active.get(k, ()):
                active[k].remove(obj)
    print("\n%d seeds passed: %r" % (len(done), done))
