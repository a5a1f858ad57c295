"""
fake_exchange.py - a scriptable IMAP server that answers like Exchange.

Runs in threads of the test process (one accept thread, one thread per
connection; a few hundred connections are fine) on 127.0.0.1, implicit TLS
by default.  It speaks the IMAP4rev1 an IMAP proxy in front of Exchange
needs: greeting, CAPABILITY (no UNSELECT unless unselect=True), LOGIN and
AUTHENTICATE PLAIN with Exchange's "domain/admin/mailbox" delegated names,
NOOP, ID, NAMESPACE, LIST, STATUS, SELECT/EXAMINE, FETCH/UID FETCH (BODY[],
BODY.PEEK[], RFC822, RFC822.SIZE, FLAGS, UID, INTERNALDATE), SEARCH/UID
SEARCH, STORE, EXPUNGE, CLOSE (which expunges, as Exchange's does), UNSELECT
(only when advertised), APPEND, IDLE/DONE, LOGOUT, STARTTLS (tls="starttls").
Strings are Exchange's (DESIGN.md, exchange-imap-facts.md 1.7-1.8).

Every mailbox has its own message store, created on first use with
`messages_per_mailbox` messages; each message names its mailbox ("Subject:
for <mailbox>", body lines "mailbox=<mailbox>" up to `message_size` bytes),
so a test can tell whose bytes a client received.

Exchange's MaxConnectionsPerUser is enforced: at most
`max_connections_per_user` (default 16; `max_per_admin` per account)
logged-in sessions per admin account; the next LOGIN gets "NO LOGIN failed."
(recorded with reason UserConnectionLimitReached).

It records everything: each connection (accepted, TLS outcome, the admin its
LOGIN named, when the peer closed it), each command as received (bytes,
literals inline, with its time), each LOGIN attempt (login_log:
LoginRecord(t, conn_id, user, admin, mailbox, ok, reply, reason)), the
highest number of concurrent connections in total and per admin account,
counting a connection from TCP accept until its socket closes
(max_concurrent(), max_concurrent_by_admin()), connections in progress
(from TCP accept until their first LOGIN is answered or they close:
max_in_progress(), what a bound on connects + handshakes + logins in flight
limits), and logged-in sessions (max_sessions, max_by_admin).

Fault injection goes through `script`, a dict of optional hooks; each may be
changed while the server runs:

  on_connect(conn)                -> None | "drop" | "stall" | bytes | seconds
                                     | "tls_alert" | "tls_abort"
        before TLS.  bytes: sent in plaintext, then the connection closes
        (e.g. b"* BYE Connection is closed. 14\\r\\n").  "tls_alert": read
        the ClientHello, answer a fatal handshake_failure alert, close
        (Schannel's fatal alerts); "tls_abort": read it and close without a
        word.  A number: sleep that many seconds, then go on as usual.
  greeting(conn)                  -> None | bytes (full greeting line)
        a greeting starting "* BYE" is sent and the connection closed
        (e.g. b"* BYE Connection is closed. 10\\r\\n", server limit).
  on_login(conn, user, password)  -> None | "drop" | "stall" | str | seconds
        str: the tagged reply text without the tag, e.g. "NO LOGIN failed."
        (a reply starting with "OK" logs the session in).  A number: think
        that long, then answer as usual.
  on_command(conn, tag, name, cmd)-> None | "drop" | "stall" | bytes | seconds
                                     | "drop_after" | ("close", bytes)
        bytes: sent instead of the normal reply (include the tagged line).
        "drop_after": carry the command out (an APPEND stores its message)
        but close the connection instead of sending any reply byte.
        ("close", bytes): send bytes, then close.  ("cut", k): carry the
        command out but send only the first k bytes of its reply (e.g.
        half a FETCH literal), then close.  A number: stall that
        many seconds, then answer as usual.
  on_idle_done(conn, tag)         -> None | "drop" | "stall" | bytes | seconds
        when an IDLE (tag: its tag) gets its DONE line; the IDLE has
        ended (push() no longer writes to it).  None: answer "<tag> OK
        IDLE completed." as usual; "drop": close without a reply byte;
        "stall": send nothing more (until the peer closes); bytes: sent
        instead of the tagged OK; a number: wait that long, leaving
        whatever follows DONE unread, then answer as usual.
  on_literal(conn, head, n)       -> None | "drop" | int k | (k, seconds)
        when a command announces a literal of n bytes (head: the command
        so far).  "drop" or k: close after receiving k (0) bytes of it; the
        partial command is recorded (conn.truncated is set).  (k, seconds):
        read k bytes, wait that long (the sender may finish meanwhile),
        then close.

Exchange's own counters (exchange_counters=True): the 4th failed LOGIN on a
connection is answered "* BYE Connection is closed. 14" and the connection
closed; the 10th tagged NO-or-BAD of any kind on a connection is sent and
the connection closed without a word (conn.failed_commands counts them).

APPEND stores the literal as is; UID SEARCH / SEARCH understand ALL, SEEN,
UNSEEN, DELETED, UNDELETED and HEADER <field> <string> (substring, case-
insensitive), so "UID SEARCH HEADER Message-ID <id>" finds an APPENDed
message; copies(mailbox, message_id) counts them for a test.

drop_all() and kill_mailbox(name) close server-side connections abruptly
(Exchange dropping sessions).  Helpers fail_logins(k), bye_plaintext(), etc.
build common hooks.
"""

import base64
import collections
import re
import select
import socket
import ssl
import threading
import time
import zlib

GREETING = b"* OK The Microsoft Exchange IMAP4 service is ready.\r\n"
CAPABILITY = (b"IMAP4 IMAP4rev1 AUTH=PLAIN UIDPLUS MOVE ID CHILDREN IDLE NAMESPACE "
              b"LITERAL+")
CAPABILITY_PLAIN = (b"IMAP4 IMAP4rev1 LOGINDISABLED STARTTLS UIDPLUS MOVE ID CHILDREN IDLE "
                    b"NAMESPACE LITERAL+")
LITERAL_CONT = b"+ Ready for additional command text.\r\n"
PREAUTH_OK = {"CAPABILITY", "NOOP", "LOGOUT", "LOGIN", "AUTHENTICATE", "STARTTLS", "ID"}


class Message:
    def __init__(self, uid, data, flags=()):
        self.uid = uid
        self.data = data
        self.flags = set(flags)


class Mailbox:
    def __init__(self, name):
        self.name = name
        self.uidvalidity = 1000 + (zlib.crc32(name.lower().encode()) & 0xFFFF)
        self.uidnext = 1
        self.messages = []
        self.expunged = 0

    def add(self, data, flags=()):
        m = Message(self.uidnext, data, flags)
        self.uidnext += 1
        self.messages.append(m)
        return m


def _max_overlap(spans):
    """Most (start, end) spans open at once; end None: still open."""
    ev = []
    for a, b in spans:
        ev.append((a, 1))
        ev.append((float("inf") if b is None else b, -1))
    ev.sort()          # at equal times, -1 sorts before +1
    cur = best = 0
    for _, d in ev:
        cur += d
        best = max(best, cur)
    return best


class Conn:
    """The record of one accepted connection (and its live socket)."""

    def __init__(self, server, cid, sock, peer):
        self.server = server
        self.id = cid
        self.sock = sock
        self.fd = sock.fileno()  # stays valid across wrap_socket (which detaches sock)
        self.peer = peer
        self.opened = time.monotonic()
        self.closing = None      # when we started closing it (before the fd goes)
        self.closed = None
        self.tls = None          # True after a good handshake, False if it failed
        self.tls_error = None
        self.commands = []       # (monotonic time, bytes) as received, literals inline
        self.logins = []         # (monotonic time, user, password, reply str)
        self.replies = []        # bytes sent
        self.admin = None        # after a successful login
        self.login_admin = None  # the admin account its first LOGIN named
        self.login_answered = None  # when its first LOGIN was answered
        self.mailbox = None
        self.selected = None
        self.read_only = False
        self.gone = None         # when the peer was seen to have closed it
        self.killed = False      # closed by drop_all() / kill_mailbox()
        self.idling_tag = None
        self.failed_logins = 0
        self.failed_commands = 0  # tagged NO or BAD sent (Exchange's counter)
        self.withhold = False    # "drop_after": replies are not sent
        self.withheld = []       # replies that were not sent
        self.truncated = False   # closed in the middle of a literal (on_literal)
        self.not_connected = False  # authenticated_not_connected()
        self.error = None
        self.wlock = threading.Lock()
        self.rfile = None

    # ---- I/O
    def write(self, data):
        with self.wlock:
            if self.withhold:
                self.withheld.append(data)
                return
            # Exchange's "failedCommands": every tagged NO or BAD counts
            last = data.rstrip(b"\r\n").rsplit(b"\n", 1)[-1]
            toks = last.split(b" ", 2)
            if (len(toks) >= 2 and not last.startswith((b"*", b"+"))
                    and toks[1].upper() in (b"NO", b"BAD")):
                self.failed_commands += 1
            self.replies.append(data)
            self.sock.sendall(data)

    def readline(self):
        line = self.rfile.readline(1 << 20)
        if not line:
            raise EOFError
        return line

    def read_command(self):
        """One command with its literals inline (bytes), or raise EOFError."""
        out = b""
        while True:
            line = self.readline()
            out += line
            m = re.search(rb"\{(\d+)(\+?)\}\r?\n$", line)
            if not m:
                return out
            n = int(m.group(1))
            act = self.server._hook("on_literal", self, out, n)
            if act is not None:
                linger = 0
                if isinstance(act, tuple):
                    act, linger = act
                k = 0 if act == "drop" else max(0, min(int(act), n))
                if not m.group(2):
                    self.write(LITERAL_CONT)
                data = self.rfile.read(k) if k else b""
                if linger:
                    time.sleep(linger)     # the rest waits unread in the socket
                with self.server.lock:
                    self.truncated = True
                    self.commands.append((time.monotonic(), out + data))
                raise EOFError
            if not m.group(2):
                self.write(LITERAL_CONT)
            data = self.rfile.read(n)
            if len(data) < n:
                raise EOFError
            out += data

    def close(self):
        if self.closing is None:
            self.closing = time.monotonic()
        try:
            # the plain socket's shutdown: SSLSocket.shutdown() would tear down
            # the SSL object under a reader in another thread
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    @property
    def is_open(self):
        return self.closed is None

    @property
    def end(self):
        """When this connection stopped counting (peer closed, or we did)."""
        ts = [t for t in (self.gone, self.closing, self.closed) if t is not None]
        return min(ts) if ts else None

    def command_names(self):
        return [command_name(cmd) for (_, cmd) in self.commands]

    def __repr__(self):
        return "Conn(%d, tls=%s, admin=%s, mailbox=%s, %d cmds%s)" % (
            self.id, self.tls, self.admin or self.login_admin, self.mailbox,
            len(self.commands), ", killed" if self.killed else "")


def command_name(cmd):
    """The command name of a recorded command, upper case: "SELECT",
    "UID FETCH", ...; "" for a continuation line (e.g. DONE counts as
    "DONE")."""
    toks = cmd.split(None, 3)
    if len(toks) == 1:
        return toks[0].decode(errors="replace").upper()
    if len(toks) < 2:
        return ""
    name = toks[1].decode(errors="replace").upper()
    if name == "UID" and len(toks) > 2:
        name += " " + toks[2].decode(errors="replace").upper()
    return name


def _is_seconds(act):
    """A hook's "wait this many seconds, then go on" answer."""
    return isinstance(act, (int, float)) and not isinstance(act, bool)


def message_header(data, field):
    """The (unfolded) value of header `field` of message bytes, or None."""
    head = data.split(b"\r\n\r\n", 1)[0]
    head = re.sub(rb"\r?\n[ \t]+", b" ", head)
    for line in head.split(b"\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == field.lower():
            return value.strip()
    return None


def header_matches(data, field, value):
    """SEARCH HEADER semantics: the field exists and contains value
    (case-insensitive); an empty value matches any message with the field."""
    v = message_header(data, field)
    return v is not None and value.lower() in v.lower()


def mask_login(cmd):
    """A recorded command with a LOGIN password masked (for reports)."""
    m = re.match(rb"^(\S+ LOGIN (?:\"(?:[^\"\\\\]|\\\\.)*\"|\S+) ).*$", cmd, re.I | re.S)
    return m.group(1) + b"*****\r\n" if m else cmd


def make_message(mailbox, n, size=4096):
    """Message number n of `mailbox`: every part of it names the mailbox."""
    head = ("From: Voice Mail <voicemail@example.com>\r\n"
            "To: %s@example.com\r\n"
            "Subject: for %s\r\n"
            "Message-ID: <%s.%d@fake-exchange.example.com>\r\n"
            "Date: Thu, 01 Jan 2026 00:00:%02d +0000\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "\r\n"
            "mailbox=%s message=%d\r\n" % (mailbox, mailbox, mailbox, n, n % 60, mailbox, n))
    line = "mailbox=%s\r\n" % mailbox
    body = head
    while len(body) + len(line) <= size:
        body += line
    return body.encode()


# ------------------------------------------------------------ tokenizer

def tokenize(cmd):
    """Tokens of a command (bytes, literals inline): atoms, quoted strings
    (unescaped), literals (their bytes), parenthesised lists (raw text)."""
    toks = []
    i, n = 0, len(cmd)
    while i < n:
        c = cmd[i:i + 1]
        if c in (b" ",):
            i += 1
        elif c in (b"\r", b"\n"):
            i += 1
        elif c == b'"':
            j, s = i + 1, bytearray()
            while j < n and cmd[j:j + 1] != b'"':
                if cmd[j:j + 1] == b"\\" and j + 1 < n:
                    j += 1
                s += cmd[j:j + 1]
                j += 1
            toks.append(bytes(s))
            i = j + 1
        elif c == b"{":
            m = re.compile(rb"\{(\d+)\+?\}\r?\n").match(cmd, i)
            if not m:
                j = cmd.find(b" ", i)
                j = n if j < 0 else j
                toks.append(cmd[i:j])
                i = j
                continue
            ln = int(m.group(1))
            toks.append(cmd[m.end():m.end() + ln])
            i = m.end() + ln
        elif c in (b"(", b"["):
            close = b")" if c == b"(" else b"]"
            depth, j = 0, i
            while j < n:
                ch = cmd[j:j + 1]
                if ch == c:
                    depth += 1
                elif ch == close:
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            toks.append(cmd[i:j + 1])
            i = j + 1
        else:
            j = i
            while j < n and cmd[j:j + 1] not in (b" ", b"\r", b"\n", b"("):
                if cmd[j:j + 1] == b"[":   # BODY[...] stays one atom
                    k = cmd.find(b"]", j)
                    j = n if k < 0 else k + 1
                    continue
                j += 1
            toks.append(cmd[i:j])
            i = j
    return toks


def parse_seqset(s, maxn):
    out = set()
    for part in s.split(b","):
        if b":" in part:
            a, b = part.split(b":", 1)
            a = maxn if a == b"*" else int(a)
            b = maxn if b == b"*" else int(b)
            lo, hi = min(a, b), max(a, b)
            out.update(range(lo, hi + 1))
        else:
            out.add(maxn if part == b"*" else int(part))
    return sorted(out)


# -------------------------------------------------------------- server

LoginRecord = collections.namedtuple(
    "LoginRecord", "t conn_id user admin mailbox ok reply reason")
LoginRecord.__doc__ = """One LOGIN/AUTHENTICATE attempt as the fake saw it.
t: monotonic time the command arrived; admin/mailbox: parsed from the
delegated name (None if it had no domain/admin/mailbox form); ok: logged in;
reply: the tagged reply text; reason: why it failed (Exchange's protocol-log
ErrMsg, e.g. "UserConnectionLimitReached"), or "" on success."""


class FakeExchange:
    def __init__(self, cert=None, admins=None, domain="example.com", tls="implicit",
                 script=None, host="127.0.0.1", exchange_counters=True,
                 unselect=False, max_connections_per_user=16, max_per_admin=None,
                 messages_per_mailbox=3, message_size=4096, login_delay=0.0,
                 keep_closed=True):
        """cert: a harness.Cert (or object with .cert/.key) unless tls == "none".

        unselect: advertise and implement UNSELECT (on-premises Exchange does
        not; Exchange Online does).  max_connections_per_user: Exchange's
        MaxConnectionsPerUser, the cap on concurrent logged-in sessions of one
        admin account (beyond it: NO LOGIN failed.); max_per_admin overrides
        it per admin name.  messages_per_mailbox / message_size: every
        mailbox starts with that many messages of about that size, each
        naming its mailbox.  login_delay: seconds to think before answering a
        LOGIN (Exchange under load).  keep_closed=False: forget a
        connection once it has closed (a benchmark's upstream of thousands of
        logins: accept and LOGIN look at every connection kept)."""
        self.cert = cert
        self.admins = dict(admins or {})
        self.domain = domain
        self.tls_mode = tls
        self.script = script if script is not None else {}
        self.host = host
        self.exchange_counters = exchange_counters
        self.unselect = unselect
        self.max_connections_per_user = max_connections_per_user
        self.max_per_admin = {k.lower(): v for k, v in (max_per_admin or {}).items()}
        self.messages_per_mailbox = messages_per_mailbox
        self.message_size = message_size
        self.login_delay = login_delay
        self.keep_closed = keep_closed
        self.mailboxes = {}
        self.connections = []
        self.login_log = []
        self.lock = threading.RLock()
        self.stop_event = threading.Event()
        self.cur_conns = self.max_conns = 0
        self.cur_sessions = self.max_sessions = 0
        self.cur_by_admin = {}
        self.max_by_admin = {}
        self.lsock = None
        self.port = None
        self.threads = []
        self.ctx = None

    # ---- lifecycle
    def start(self):
        if self.tls_mode != "none":
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(self.cert.cert, self.cert.key)
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((self.host, 0))
        self.lsock.listen(1024)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name="fake-exchange-accept", daemon=True)
        t.start()
        self.accept_thread = t
        return self

    def stop(self, timeout=5.0):
        """Stop accepting, close every connection, join the threads (bounded)."""
        self.stop_event.set()
        if self.lsock:
            try:
                self.lsock.close()
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        if getattr(self, "accept_thread", None):
            self.accept_thread.join(timeout=max(0.1, deadline - time.monotonic()))
        with self.lock:
            conns = list(self.connections)
            threads = list(self.threads)
        for c in conns:
            c.close()
        for t in threads:
            t.join(timeout=max(0.05, deadline - time.monotonic()))

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.stop()

    def mailbox(self, name):
        """The store of mailbox `name` (created, with its initial messages,
        on first use)."""
        with self.lock:
            mb = self.mailboxes.get(name.lower())
            if mb is None:
                mb = self.mailboxes[name.lower()] = Mailbox(name)
                for i in range(1, self.messages_per_mailbox + 1):
                    mb.add(make_message(name, i, self.message_size))
            return mb

    def push(self, mailbox, data, flags=()):
        """Deliver a message; idling sessions on that mailbox get EXISTS."""
        with self.lock:
            mb = self.mailbox(mailbox)
            mb.add(data, flags)
            n = len(mb.messages)
            idlers = [c for c in self.connections if c.is_open and c.mailbox
                      and c.mailbox.lower() == mailbox.lower() and c.selected
                      and c.idling_tag]
        for c in idlers:
            try:
                c.write(b"* %d EXISTS\r\n" % n)
            except OSError:
                pass

    def drop_all(self):
        """Close every open connection abruptly (the upstream "dies")."""
        with self.lock:
            conns = [c for c in self.connections if c.is_open]
        for c in conns:
            c.killed = True
            c.close()
        return len(conns)

    def kill_mailbox(self, mailbox, bye=None):
        """Close every open server-side connection logged in to `mailbox`
        (Exchange dropping a pooled session); bye: a line sent first, e.g.
        b"* BYE Connection is closed. 13\\r\\n".  Returns how many."""
        with self.lock:
            conns = [c for c in self.connections if c.is_open and c.mailbox
                     and c.mailbox.lower() == mailbox.lower()]
        for c in conns:
            c.killed = True
            if bye:
                try:
                    c.write(bye)
                except OSError:
                    pass
            c.close()
        for c in conns:
            deadline = time.monotonic() + 2
            while c.is_open and time.monotonic() < deadline:
                time.sleep(0.01)
        return len(conns)

    # ---- records
    def copies(self, mailbox, message_id):
        """How many messages of `mailbox` carry this Message-ID (bytes or
        str, with or without the angle brackets' exact spelling)."""
        if isinstance(message_id, str):
            message_id = message_id.encode()
        with self.lock:
            mb = self.mailboxes.get(mailbox.lower())
            msgs = list(mb.messages) if mb else []
        return sum(1 for m in msgs
                   if (message_header(m.data, b"Message-ID") or b"") == message_id.strip())

    def messages_with(self, mailbox, message_id):
        """The stored Message objects of `mailbox` with this Message-ID."""
        if isinstance(message_id, str):
            message_id = message_id.encode()
        with self.lock:
            mb = self.mailboxes.get(mailbox.lower())
            msgs = list(mb.messages) if mb else []
        return [m for m in msgs
                if (message_header(m.data, b"Message-ID") or b"") == message_id.strip()]

    @property
    def n_connections(self):
        with self.lock:
            return len(self.connections)

    def all_commands(self):
        with self.lock:
            return [cmd for c in self.connections for (_, cmd) in c.commands]

    def all_logins(self):
        with self.lock:
            return [(t, u, p, r) for c in self.connections for (t, u, p, r) in c.logins]

    def logins(self, ok=None, mailbox=None, admin=None):
        """LoginRecords in arrival order, optionally filtered."""
        with self.lock:
            recs = sorted(self.login_log, key=lambda r: r.t)
        return [r for r in recs
                if (ok is None or r.ok == ok)
                and (mailbox is None or (r.mailbox or "").lower() == mailbox.lower())
                and (admin is None or (r.admin or "").lower() == admin.lower())]

    def commands(self, name=None, mailbox=None):
        """(conn, time, command bytes) in arrival order; name: the command
        name ("SELECT", "UID FETCH", ...), mailbox: the connection's."""
        out = []
        with self.lock:
            for c in self.connections:
                if mailbox is not None and (c.mailbox or "").lower() != mailbox.lower():
                    continue
                for t, cmd in c.commands:
                    if name is None or command_name(cmd) == name.upper():
                        out.append((c, t, cmd))
        out.sort(key=lambda x: x[1])
        return out

    def connections_of(self, mailbox):
        with self.lock:
            return [c for c in self.connections
                    if (c.mailbox or "").lower() == mailbox.lower()]

    def open_connections(self):
        with self.lock:
            return [c for c in self.connections if c.is_open]

    def max_concurrent(self, admin=None):
        """Most connections open at once, counting each from TCP accept to
        the moment its peer closed (or we did).  admin: only connections
        whose (first) LOGIN named that admin account, counted from accept."""
        with self.lock:
            conns = [c for c in self.connections
                     if admin is None or (c.login_admin or "").lower() == admin.lower()]
            spans = [(c.opened, c.end) for c in conns]
        return _max_overlap(spans)

    def max_in_progress(self):
        """Most connections at once between TCP accept and the answer to
        their first LOGIN (or their end): connects, TLS handshakes and
        logins in flight together."""
        with self.lock:
            spans = [(c.opened, c.login_answered if c.login_answered is not None
                      else c.end) for c in self.connections]
        return _max_overlap(spans)

    def max_concurrent_by_admin(self):
        with self.lock:
            names = sorted({c.login_admin for c in self.connections if c.login_admin})
        return {a: self.max_concurrent(a) for a in names}

    def wait_for(self, pred, timeout=10.0, interval=0.02):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                v = pred(self)
            if v:
                return v
            time.sleep(interval)
        return None

    def summary(self, max_conns=40, max_cmds=12):
        with self.lock:
            conns = list(self.connections)
            lines = ["fake_exchange port %d: %d connections, max %d concurrent (live count), "
                     "max %d logged in; logins ok=%d failed=%d"
                     % (self.port or 0, len(conns), self.max_conns, self.max_sessions,
                        sum(1 for r in self.login_log if r.ok),
                        sum(1 for r in self.login_log if not r.ok))]
        lines.append("  max concurrent (accept..close): total %d, by admin %r"
                     % (self.max_concurrent(), self.max_concurrent_by_admin()))
        shown = conns if len(conns) <= max_conns else conns[:max_conns // 2] + conns[-max_conns // 2:]
        if len(shown) < len(conns):
            lines.append("  (showing %d of %d connections)" % (len(shown), len(conns)))
        t0 = conns[0].opened if conns else 0
        for c in shown:
            lines.append("  %r open=+%.3f end=%s tls_error=%r error=%r" % (
                c, c.opened - t0, "-" if c.end is None else "+%.3f" % (c.end - t0),
                c.tls_error, c.error))
            for t, cmd in c.commands[:max_cmds]:
                lines.append("    +%.3f C: %r" % (t - t0, mask_login(cmd)[:160]))
            if len(c.commands) > max_cmds:
                lines.append("    ... %d more commands" % (len(c.commands) - max_cmds))
        return "\n".join(lines)

    # ---- internals
    def _peer_gone(self, conn):
        """Has the peer closed (FIN/RST) this connection, as the kernel sees it
        right now?  (The serving thread may not have noticed yet.)"""
        if conn.end is not None:
            return True
        # conn.fd, not conn.sock.fileno(): wrap_socket() detaches the plain
        # socket (fileno -1) while the handshake runs.  The fd is closed only
        # after conn.closing is set, so it cannot have been reused here.
        p = select.poll()
        p.register(conn.fd, select.POLLRDHUP)
        try:
            ev = p.poll(0)
        except OSError:
            return True
        return any(e & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL)
                   for _, e in ev)

    def _note_gone(self, conns):
        """Mark connections whose peer has gone (for exact accounting)."""
        now = time.monotonic()
        for c in conns:
            if c.gone is None and c.closed is None and self._peer_gone(c):
                c.gone = now

    def _accept_loop(self):
        cid = 0
        while not self.stop_event.is_set():
            try:
                sock, peer = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            if self.stop_event.is_set():
                sock.close()
                break
            cid += 1
            with self.lock:
                # connections the peer closed before opening this one do not
                # overlap with it, however late their threads notice the EOF
                self._note_gone([c for c in self.connections if c.is_open])
                conn = Conn(self, cid, sock, peer)
                self.connections.append(conn)
                self.cur_conns += 1
                self.max_conns = max(self.max_conns, self.cur_conns)
                self.threads = [t for t in self.threads if t.is_alive()]
            t = threading.Thread(target=self._serve, args=(conn,),
                                 name="fake-exchange-%d" % cid, daemon=True)
            with self.lock:
                self.threads.append(t)
            t.start()

    def _hook(self, name, *args):
        fn = self.script.get(name)
        return fn(*args) if fn else None

    def _act(self, conn, act):
        """The answers every command hook may give: a number (think that
        long, then go on), "drop", "stall", bytes (sent instead).  None:
        go on as usual; else what the caller returns (False: the
        connection is over)."""
        if _is_seconds(act):
            time.sleep(act)
            return None
        if act == "drop":
            return False
        if act == "stall":
            self._stall(conn)
            return False
        if isinstance(act, (bytes, bytearray)):
            self._reply(conn, act)
            return True
        return None

    def _stall(self, conn):
        while not self.stop_event.is_set() and conn.is_open:
            try:
                conn.sock.settimeout(0.2)
                if not conn.sock.recv(65536):
                    return
            except socket.timeout:
                continue
            except (OSError, ValueError):
                return

    def _serve(self, conn):
        try:
            self._serve_inner(conn)
        except (EOFError, OSError, ValueError):
            pass
        except Exception as e:  # a bug in the fake: keep it visible in records
            conn.error = repr(e)
        finally:
            conn.close()
            with self.lock:
                conn.closed = time.monotonic()
                if conn.gone is None:
                    conn.gone = conn.closed
                self.cur_conns -= 1
                if not self.keep_closed:
                    self.connections.remove(conn)
                if conn.admin:
                    self._logout_count(conn)

    def _login_count(self, conn, admin):
        with self.lock:
            conn.admin = admin
            self.cur_sessions += 1
            self.max_sessions = max(self.max_sessions, self.cur_sessions)
            self.cur_by_admin[admin] = self.cur_by_admin.get(admin, 0) + 1
            self.max_by_admin[admin] = max(self.max_by_admin.get(admin, 0),
                                           self.cur_by_admin[admin])

    def _logout_count(self, conn):
        self.cur_sessions -= 1
        self.cur_by_admin[conn.admin] -= 1

    def _start_tls(self, conn):
        conn.sock.settimeout(10)
        try:
            conn.sock = self.ctx.wrap_socket(conn.sock, server_side=True)
            conn.tls = True
        except (ssl.SSLError, OSError) as e:
            conn.tls = False
            conn.tls_error = str(e)
            raise EOFError
        conn.sock.settimeout(None)
        conn.rfile = conn.sock.makefile("rb")

    def _serve_inner(self, conn):
        act = self._hook("on_connect", conn)
        if _is_seconds(act):
            time.sleep(act)
            act = None
        if act == "drop":
            return
        if act == "stall":
            return self._stall(conn)
        if act in ("tls_alert", "tls_abort"):
            conn.sock.settimeout(5)
            hello = conn.sock.recv(65536)      # the ClientHello
            with self.lock:
                conn.tls = False
                conn.tls_error = "%s after %d bytes of ClientHello" % (act, len(hello))
            if act == "tls_alert":
                # TLS 1.2 record: alert, fatal (2), handshake_failure (40)
                conn.sock.sendall(b"\x15\x03\x03\x00\x02\x02\x28")
                time.sleep(0.05)
            return
        if isinstance(act, (bytes, bytearray)):
            conn.sock.sendall(act)
            time.sleep(0.1)
            return
        if self.tls_mode == "implicit":
            self._start_tls(conn)
        else:
            conn.rfile = conn.sock.makefile("rb")
        g = self._hook("greeting", conn)
        conn.write(g if g is not None else GREETING)
        if g is not None and g.startswith(b"* BYE"):
            time.sleep(0.05)
            return
        while not self.stop_event.is_set():
            cmd = conn.read_command()
            with self.lock:
                conn.commands.append((time.monotonic(), cmd))
            if not self._dispatch(conn, cmd):
                return
            if self.exchange_counters and conn.failed_commands >= 10:
                return        # the 10th NO-or-BAD: closed without a word

    def _reply(self, conn, data):
        conn.write(data if isinstance(data, bytes) else data.encode())

    def capability(self, conn):
        if self.tls_mode == "starttls" and not isinstance(conn.sock, ssl.SSLSocket):
            caps = CAPABILITY_PLAIN
        else:
            caps = CAPABILITY
        if self.unselect:
            caps += b" UNSELECT"
        return caps

    def _dispatch(self, conn, cmd):
        """Handle one command; False ends the connection."""
        toks = tokenize(cmd)
        if len(toks) < 2:
            self._reply(conn, b"* BAD Command Error. 12\r\n")
            return True
        tag = toks[0]
        name = toks[1].decode(errors="replace").upper()
        args = toks[2:]
        t = tag + b" "
        act = self._hook("on_command", conn, tag, name, cmd)
        done = self._act(conn, act)
        if done is not None:
            return done
        if isinstance(act, tuple) and act[:1] == ("close",):
            self._reply(conn, act[1])
            time.sleep(0.05)
            return False
        if isinstance(act, tuple) and act[:1] == ("cut",):
            # Exchange dying mid-response: the reply's first k bytes only
            with conn.wlock:
                conn.withhold = True
            self._dispatch_command(conn, cmd, tag, name, args, t)
            with conn.wlock:
                data = b"".join(conn.withheld)
                conn.withheld = [data[act[1]:]]
                conn.withhold = False
            conn.write(data[:act[1]])
            time.sleep(0.05)
            return False
        if act == "drop_after":
            # carry it out, but the connection dies before any reply byte
            with conn.wlock:
                conn.withhold = True
            self._dispatch_command(conn, cmd, tag, name, args, t)
            return False
        return self._dispatch_command(conn, cmd, tag, name, args, t)

    def _dispatch_command(self, conn, cmd, tag, name, args, t):

        if name not in PREAUTH_OK and conn.admin is None:
            self._reply(conn, t + b"BAD Command received in Invalid state.\r\n")
            return True
        if name == "CAPABILITY":
            self._reply(conn, b"* CAPABILITY " + self.capability(conn) + b"\r\n"
                        + t + b"OK CAPABILITY completed.\r\n")
        elif name == "NOOP":
            self._reply(conn, t + b"OK NOOP completed.\r\n")
        elif name == "ID":
            self._reply(conn, b"* ID NIL\r\n" + t + b"OK ID completed.\r\n")
        elif name == "LOGOUT":
            self._reply(conn, b"* BYE Microsoft Exchange Server IMAP4 server signing off.\r\n"
                        + t + b"OK LOGOUT completed.\r\n")
            return False
        elif name == "STARTTLS":
            if self.tls_mode != "starttls" or isinstance(conn.sock, ssl.SSLSocket):
                self._reply(conn, t + b"BAD Command received in Invalid state.\r\n")
            else:
                self._reply(conn, t + b"OK Begin TLS negotiation now.\r\n")
                self._start_tls(conn)
        elif name == "LOGIN":
            if len(args) != 2:
                self._reply(conn, t + b"BAD Command Argument Error. 12\r\n")
                return True
            return self._login(conn, t, args[0], args[1], "LOGIN")
        elif name == "AUTHENTICATE":
            if len(args) != 1 or args[0].upper() != b"PLAIN":
                self._reply(conn, t + b"BAD Command Argument Error. 12\r\n")
                return True
            conn.write(b"+\r\n")           # Exchange: bare "+", no SASL-IR
            line = conn.readline().rstrip(b"\r\n")
            with self.lock:
                conn.commands.append((time.monotonic(), line + b"\r\n"))
            if line == b"*":
                self._reply(conn, t + b"BAD The AUTH protocol exchange was canceled by the client.\r\n")
                return True
            try:
                _, user, pw = base64.b64decode(line, validate=True).split(b"\0")
            except Exception:
                self._reply(conn, t + b"NO AUTHENTICATE failed.\r\n")
                return True
            return self._login(conn, t, user, pw, "AUTHENTICATE")
        elif name in ("SELECT", "EXAMINE"):
            self._select(conn, t, name, args)
        elif name == "NAMESPACE":
            self._reply(conn, b'* NAMESPACE (("" "/")) NIL NIL\r\n' + t + b"OK NAMESPACE completed.\r\n")
        elif name in ("LIST", "LSUB"):
            self._reply(conn, b'* %s (\\HasNoChildren) "/" INBOX\r\n' % name.encode()
                        + t + b"OK %s completed.\r\n" % name.encode())
        elif name == "STATUS":
            self._status(conn, t, args)
        elif name == "IDLE":
            conn.idling_tag = tag
            self._reply(conn, b"+ IDLE accepted, awaiting DONE command.\r\n")
            while True:
                line = conn.readline()
                with self.lock:
                    conn.commands.append((time.monotonic(), line))
                if line.rstrip(b"\r\n").upper() == b"DONE":
                    break
            conn.idling_tag = None
            done = self._act(conn, self._hook("on_idle_done", conn, tag))
            if done is False:
                return False
            if done is None:
                self._reply(conn, t + b"OK IDLE completed.\r\n")
        elif name == "APPEND":
            self._append(conn, t, args)
        elif name == "FETCH":
            self._fetch(conn, t, args, uid=False)
        elif name == "SEARCH":
            self._search(conn, t, args, uid=False)
        elif name == "STORE":
            self._store(conn, t, args, uid=False)
        elif name == "UID" and args and args[0].upper() == b"FETCH":
            self._fetch(conn, t, args[1:], uid=True)
        elif name == "UID" and args and args[0].upper() == b"SEARCH":
            self._search(conn, t, args[1:], uid=True)
        elif name == "UID" and args and args[0].upper() == b"STORE":
            self._store(conn, t, args[1:], uid=True)
        elif name == "CLOSE":
            # expunges \Deleted messages of a read-write selection: the reason
            # imapshim must never use CLOSE as its reset
            if conn.selected is None:
                self._reply(conn, t + b"BAD Command received in Invalid state.\r\n")
            else:
                if not conn.read_only:
                    self._expunge(conn.selected)
                conn.selected = None
                self._reply(conn, t + b"OK CLOSE completed.\r\n")
        elif name == "UNSELECT" and self.unselect:
            if conn.selected is None:
                self._reply(conn, t + b"BAD Command received in Invalid state.\r\n")
            else:
                conn.selected = None
                self._reply(conn, t + b"OK UNSELECT completed.\r\n")
        elif name == "EXPUNGE":
            if conn.selected is None or conn.read_only:
                self._reply(conn, t + b"NO Command received in Invalid state.\r\n")
            else:
                gone = self._expunge(conn.selected)
                self._reply(conn, b"".join(b"* %d EXPUNGE\r\n" % s for s in gone)
                            + t + b"OK EXPUNGE completed.\r\n")
        elif name in ("CHECK",):
            self._reply(conn, t + b"OK CHECK completed.\r\n")
        else:
            self._reply(conn, t + b"BAD Command Error. 12\r\n")
        return True

    def _admin_cap(self, admin):
        return self.max_per_admin.get(admin.lower(), self.max_connections_per_user)

    def _login(self, conn, t, user, pw, kind):
        t_arrived = time.monotonic()
        user_s = user.decode("utf-8", errors="replace")
        pw_s = pw.decode("utf-8", errors="replace")
        parts = re.split(r"[/\\]", user_s)
        named_admin = None
        if len(parts) == 3:
            named_admin = next((a for a in self.admins if a.lower() == parts[1].lower()),
                               parts[1])
        if conn.login_admin is None:
            conn.login_admin = named_admin
        if self.login_delay:
            time.sleep(self.login_delay)
        act = self._hook("on_login", conn, user_s, pw_s)
        if _is_seconds(act):
            time.sleep(act)
            act = None
        mailbox = parts[2] if len(parts) == 3 else None

        def record(reply, ok, reason):
            with self.lock:
                if conn.login_answered is None:
                    conn.login_answered = time.monotonic()
                conn.logins.append((t_arrived, user_s, pw_s, reply))
                self.login_log.append(LoginRecord(t_arrived, conn.id, user_s, named_admin,
                                                  mailbox, ok, reply, reason))
        if act == "drop":
            record("drop", False, "drop")
            return False
        if act == "stall":
            record("stall", False, "stall")
            self._stall(conn)
            return False
        ok = False
        admin = None
        reason = ""
        if act is None:
            if len(parts) == 3 and parts[0].lower() == self.domain.lower():
                for a, p in self.admins.items():
                    if a.lower() == parts[1].lower() and p == pw_s:
                        ok, admin = True, a
            if not ok:
                reason = "AuthFailed"
            if ok:
                with self.lock:
                    # Exchange first disposes of the user's disconnected sessions
                    mine = [c for c in self.connections if c is not conn and c.is_open
                            and c.admin == admin]
                    self._note_gone(mine)
                    live = sum(1 for c in mine if c.gone is None)
                    if live >= self._admin_cap(admin):
                        ok, admin, reason = False, None, "UserConnectionLimitReached"
                    else:
                        self._login_count(conn, admin)
            reply = ("OK %s completed." % kind) if ok else ("NO %s failed." % kind)
        else:
            reply = act
            ok = reply.startswith("OK")
            reason = "" if ok else "script"
            if ok:
                admin = named_admin if named_admin else "?"
                self._login_count(conn, admin)
        record(reply, ok, reason)
        if ok:
            conn.mailbox = mailbox if mailbox is not None else user_s
            self._reply(conn, t + reply.encode() + b"\r\n")
            return True
        conn.failed_logins += 1
        if self.exchange_counters and conn.failed_logins >= 4:
            self._reply(conn, b"* BYE Connection is closed. 14\r\n")
            return False
        self._reply(conn, t + reply.encode() + b"\r\n")
        return True

    def _select(self, conn, t, name, args):
        if not args or args[0].upper() != b"INBOX":
            conn.selected = None
            self._reply(conn, t + b"NO " + (args[0] if args else b"") + b" doesn't exist.\r\n")
            return
        mb = self.mailbox(conn.mailbox)
        conn.selected = mb
        ro = name == "EXAMINE"
        conn.read_only = ro
        with self.lock:
            n = len(mb.messages)
            unseen = next((i + 1 for i, m in enumerate(mb.messages) if "\\Seen" not in m.flags),
                          None)
            uidnext = mb.uidnext
        self._reply(conn, b"* %d EXISTS\r\n* 0 RECENT\r\n" % n
                    + b"* FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $MDNSent)\r\n"
                    + b"* OK [PERMANENTFLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $MDNSent)] "
                    + b"Permanent flags\r\n"
                    + (b"* OK [UNSEEN %d] Is the first unseen message\r\n" % unseen
                       if unseen else b"")
                    + b"* OK [UIDVALIDITY %d] UIDVALIDITY value\r\n" % mb.uidvalidity
                    + b"* OK [UIDNEXT %d] The next unique identifier value\r\n" % uidnext
                    + t + (b"OK [READ-ONLY] EXAMINE completed.\r\n" if ro
                           else b"OK [READ-WRITE] SELECT completed.\r\n"))

    def _status(self, conn, t, args):
        if len(args) < 2 or args[0].upper() != b"INBOX":
            self._reply(conn, t + b"NO " + (args[0] if args else b"") + b" doesn't exist.\r\n")
            return
        mb = self.mailbox(conn.mailbox)
        with self.lock:
            vals = {b"MESSAGES": len(mb.messages), b"RECENT": 0, b"UIDNEXT": mb.uidnext,
                    b"UIDVALIDITY": mb.uidvalidity,
                    b"UNSEEN": sum(1 for m in mb.messages if "\\Seen" not in m.flags)}
        want = args[1].strip(b"()").upper().split()
        if not want or any(w not in vals for w in want):
            self._reply(conn, t + b"BAD Command Argument Error. 11\r\n")
            return
        self._reply(conn, b"* STATUS INBOX (" + b" ".join(b"%s %d" % (w, vals[w]) for w in want)
                    + b")\r\n" + t + b"OK STATUS completed.\r\n")

    def _append(self, conn, t, args):
        if len(args) < 2:
            self._reply(conn, t + b"BAD Command Argument Error. 12\r\n")
            return
        if args[0].upper() != b"INBOX":
            self._reply(conn, t + b"NO [TRYCREATE] Folder is not found.\r\n")
            return
        flags = ()
        if args[1].startswith(b"("):
            flags = [f.decode() for f in args[1].strip(b"()").split()]
        mb = self.mailbox(conn.mailbox)
        with self.lock:
            m = mb.add(args[-1], flags)
        self._reply(conn, t + b"OK [APPENDUID %d %d] APPEND completed.\r\n" % (mb.uidvalidity, m.uid))

    def _select_msgs(self, conn, seqset, uid):
        """[(seq, Message)] for a sequence set, or None if it is invalid."""
        with self.lock:
            msgs = list(conn.selected.messages)
        try:
            if uid:
                maxuid = msgs[-1].uid if msgs else 0
                wanted = set(parse_seqset(seqset, maxuid))
                return [(i + 1, m) for i, m in enumerate(msgs) if m.uid in wanted]
            wanted = parse_seqset(seqset, len(msgs))
        except ValueError:
            return None
        if any(w < 1 or w > len(msgs) for w in wanted):
            return None
        return [(w, msgs[w - 1]) for w in wanted]

    def _fetch(self, conn, t, args, uid):
        if conn.selected is None or len(args) < 2:
            self._reply(conn, t + b"BAD Command received in Invalid state.\r\n")
            return
        sel = self._select_msgs(conn, args[0], uid)
        if sel is None:
            self._reply(conn, t + b"BAD The specified message set is invalid.\r\n")
            return
        items = b" ".join(args[1:]).upper()
        want_body = b"BODY[]" in items or b"BODY.PEEK[]" in items
        want_rfc822 = bool(re.search(rb"\bRFC822\b(?!\.)", items))
        sets_seen = (b"BODY[]" in items or want_rfc822) and not conn.read_only
        out = []
        for seq, m in sel:
            parts = []
            if uid or b"UID" in items:
                parts.append(b"UID %d" % m.uid)
            if sets_seen:
                with self.lock:
                    m.flags.add("\\Seen")
            if b"FLAGS" in items:
                parts.append(b"FLAGS (" + " ".join(sorted(m.flags)).encode() + b")")
            if b"INTERNALDATE" in items:
                parts.append(b'INTERNALDATE "01-Jan-2026 00:00:00 +0000"')
            if b"RFC822.SIZE" in items:
                parts.append(b"RFC822.SIZE %d" % len(m.data))
            if want_body:
                parts.append(b"BODY[] {%d}\r\n" % len(m.data) + m.data)
            elif want_rfc822:
                parts.append(b"RFC822 {%d}\r\n" % len(m.data) + m.data)
            out.append(b"* %d FETCH (" % seq + b" ".join(parts) + b")\r\n")
        self._reply(conn, b"".join(out) + t + b"OK FETCH completed.\r\n")

    def _search(self, conn, t, args, uid):
        if conn.selected is None:
            self._reply(conn, t + b"BAD Command received in Invalid state.\r\n")
            return
        with self.lock:
            msgs = list(conn.selected.messages)
        raw = list(args)
        keys = [a.upper() for a in args]
        if keys[:1] == [b"CHARSET"]:
            if len(keys) < 2 or keys[1] not in (b"US-ASCII", b"UTF-8"):
                self._reply(conn, t + b"NO [BADCHARSET (US-ASCII)] The specified charset is "
                            b"not supported.\r\n")
                return
            keys, raw = keys[2:], raw[2:]
        headers = []      # HEADER <field> <string>
        flagkeys = []
        i = 0
        while i < len(keys):
            if keys[i] == b"HEADER":
                if i + 2 >= len(keys):
                    self._reply(conn, t + b"BAD Command Argument Error. 12\r\n")
                    return
                headers.append((raw[i + 1], raw[i + 2]))
                i += 3
            else:
                flagkeys.append(keys[i])
                i += 1
        hits = []
        for i, m in enumerate(msgs):
            ok = True
            for k in flagkeys:
                if k == b"SEEN":
                    ok = ok and "\\Seen" in m.flags
                elif k == b"UNSEEN":
                    ok = ok and "\\Seen" not in m.flags
                elif k == b"DELETED":
                    ok = ok and "\\Deleted" in m.flags
                elif k == b"UNDELETED":
                    ok = ok and "\\Deleted" not in m.flags
            for field, value in headers:
                ok = ok and header_matches(m.data, field, value)
            if ok:
                hits.append(m.uid if uid else i + 1)
        self._reply(conn, b"* SEARCH" + b"".join(b" %d" % h for h in hits) + b"\r\n"
                    + t + b"OK SEARCH completed.\r\n")

    def _store(self, conn, t, args, uid):
        if conn.selected is None or len(args) < 3:
            self._reply(conn, t + b"BAD Command received in Invalid state.\r\n")
            return
        if conn.read_only:
            self._reply(conn, t + b"NO Command received in Invalid state.\r\n")
            return
        sel = self._select_msgs(conn, args[0], uid)
        if sel is None:
            self._reply(conn, t + b"BAD The specified message set is invalid.\r\n")
            return
        op = args[1].upper()
        flags = {f.decode() for f in b" ".join(args[2:]).strip(b"()").split()}
        out = []
        for seq, m in sel:
            with self.lock:
                if op.startswith(b"+"):
                    m.flags |= flags
                elif op.startswith(b"-"):
                    m.flags -= flags
                else:
                    m.flags = set(flags)
                fl = " ".join(sorted(m.flags)).encode()
            if not op.endswith(b".SILENT"):
                out.append(b"* %d FETCH (%sFLAGS (%s))\r\n"
                           % (seq, b"UID %d " % m.uid if uid else b"", fl))
        self._reply(conn, b"".join(out) + t + b"OK STORE completed.\r\n")

    def _expunge(self, mb):
        """Remove \\Deleted messages; their sequence numbers, highest first."""
        with self.lock:
            gone = [i + 1 for i, m in enumerate(mb.messages) if "\\Deleted" in m.flags]
            mb.messages = [m for m in mb.messages if "\\Deleted" not in m.flags]
            mb.expunged += len(gone)
        return sorted(gone, reverse=True)


# ------------------------------------------------------------ hook helpers
#
# Each helper builds one hook (or, for authenticated_not_connected, a dict of
# hooks to merge into `script`).  A hook object may be shared by several
# FakeExchange instances (servers): its counters are then global.  Filters:
# mailbox / admin (case-insensitive) restrict a fault to those sessions;
# times / k bound how often it fires (None: always).  hook.state["n"] counts
# the times it fired.

def _login_parts(user):
    parts = re.split(r"[/\\]", user)
    if len(parts) == 3:
        return parts[1], parts[2]
    return None, user


def _counter(k):
    state = {"n": 0, "seen": 0}
    lock = threading.Lock()

    def fire():
        with lock:
            state["seen"] += 1
            if k is None or state["n"] < k:
                state["n"] += 1
                return True
            return False
    return state, fire


def _same(a, b):
    return b is None or (a or "").lower() == b.lower()


def fail_logins(k, text="NO LOGIN failed.", mailbox=None, admin=None):
    """on_login hook: the first k matching LOGIN/AUTHENTICATE attempts get
    `text` (k=None: every one).  E.g. "NO Server Unavailable. 15",
    "NO [AUTHENTICATIONFAILED] Invalid credentials"."""
    state, fire = _counter(k)

    def hook(conn, user, password):
        adm, mbx = _login_parts(user)
        if _same(mbx, mailbox) and _same(adm, admin) and fire():
            return text
        return None
    hook.state = state
    return hook


def bye_plaintext(text=b"* BYE Connection is closed. 14\r\n"):
    """on_connect hook: answer a TLS ClientHello with Exchange's plaintext BYE
    (no certificate bound to IMAP, event 1102)."""
    return lambda conn: text


def tls_alert(times=None):
    """on_connect hook: read the ClientHello, answer a fatal TLS alert."""
    state, fire = _counter(times)

    def hook(conn):
        return "tls_alert" if fire() else None
    hook.state = state
    return hook


def tls_abort(times=None):
    """on_connect hook: read the ClientHello and close without a word."""
    state, fire = _counter(times)

    def hook(conn):
        return "tls_abort" if fire() else None
    hook.state = state
    return hook


def bye_greeting(text=b"* BYE Connection is closed. 10\r\n", times=None):
    """greeting hook: greet with `text` (default: server connection limit)
    and close, the first `times` connections (None: every one)."""
    state, fire = _counter(times)

    def hook(conn):
        return text if fire() else None
    hook.state = state
    return hook


def authenticated_not_connected(k=None, mailbox=None, admin=None):
    """Hooks (a dict for `script`) for Exchange Online's broken proxy: the
    first k matching LOGINs are answered OK, then every command on that
    connection gets "BAD User is authenticated but not connected.", the 3rd
    with "* BYE Connection closed. 14" and the connection closed."""
    state, fire = _counter(k)

    def on_login(conn, user, password):
        adm, mbx = _login_parts(user)
        if _same(mbx, mailbox) and _same(adm, admin) and fire():
            conn.not_connected = True
            return "OK LOGIN completed."
        return None

    def on_command(conn, tag, name, cmd):
        if not conn.not_connected or name == "LOGIN":
            return None
        conn.nc_bad = getattr(conn, "nc_bad", 0) + 1
        line = tag + b" BAD User is authenticated but not connected.\r\n"
        if conn.nc_bad >= 3:
            return ("close", line + b"* BYE Connection closed. 14\r\n")
        return line
    on_login.state = state
    return {"on_login": on_login, "on_command": on_command}


def drop_on(command, times=None, mailbox=None, after=False):
    """on_command hook: close the connection when `command` ("FETCH",
    "UID FETCH", "APPEND"...) arrives, before any reply byte; after=True:
    carry the command out first (an APPEND is stored) and close instead of
    answering.  times: only the first n matching commands (None: all)."""
    command = command.upper()
    state, fire = _counter(times)

    def hook(conn, tag, name, cmd):
        full = command_name(cmd)
        if (name == command or full == command) and _same(conn.mailbox, mailbox) and fire():
            return "drop_after" if after else "drop"
        return None
    hook.state = state
    return hook


def drop_in_literal(command="APPEND", after_bytes=0, times=1, mailbox=None, linger=0):
    """on_literal hook: close the connection after receiving `after_bytes`
    bytes of the literal of `command` (the message was never stored);
    linger: wait that many seconds before closing, reading nothing more."""
    command = command.upper()
    state, fire = _counter(times)

    def hook(conn, head, n):
        if (command_name(head) == command and _same(conn.mailbox, mailbox) and fire()):
            k = min(after_bytes, max(0, n - 1))
            return (k, linger) if linger else k
        return None
    hook.state = state
    return hook


def stall_on(command, seconds=None, times=None, mailbox=None):
    """on_command hook: stall when `command` arrives: forever (until the
    peer closes), or `seconds` and then answer as usual."""
    command = command.upper()
    state, fire = _counter(times)

    def hook(conn, tag, name, cmd):
        if ((name == command or command_name(cmd) == command)
                and _same(conn.mailbox, mailbox) and fire()):
            return "stall" if seconds is None else float(seconds)
        return None
    hook.state = state
    return hook


def chain(*hooks):
    """One hook from several of the same kind: the first non-None answer."""
    def hook(*a):
        for h in hooks:
            if h is not None:
                r = h(*a)
                if r is not None:
                    return r
        return None
    return hook
