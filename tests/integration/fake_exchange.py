"""
fake_exchange.py - a scriptable IMAP server that answers like Exchange.

Runs in threads of the test process (one accept thread, one thread per
connection) on 127.0.0.1, implicit TLS by default.  It speaks just enough
IMAP4rev1 for a proxy in front of it: greeting, CAPABILITY, LOGIN and
AUTHENTICATE PLAIN with Exchange's "domain/admin/mailbox" delegated names,
NOOP, ID, NAMESPACE, LIST, SELECT/EXAMINE, FETCH/UID FETCH, APPEND, IDLE,
LOGOUT, STARTTLS (tls="starttls").  Strings are Exchange's (DESIGN.md and
exchange-imap-facts.md sections 1.7-1.8).

It records everything: each connection (accepted, TLS outcome, closed), each
command as received (bytes, literals inline), each LOGIN attempt, and the
current and highest number of concurrent connections and logged-in sessions,
in total and per admin account.

Fault injection goes through `script`, a dict of optional hooks; each may be
changed while the server runs:

  on_connect(conn)                -> None | "drop" | "stall" | bytes
        before TLS.  bytes: sent in plaintext, then the connection closes
        (e.g. b"* BYE Connection is closed. 14\\r\\n").
  greeting(conn)                  -> None | bytes (full greeting line)
  on_login(conn, user, password)  -> None | "drop" | "stall" | str
        str: the tagged reply text without the tag, e.g. "NO LOGIN failed."
        (a reply starting with "OK" logs the session in).
  on_command(conn, tag, name, cmd)-> None | "drop" | "stall" | bytes
        bytes: sent instead of the normal reply (include the tagged line).

Helpers fail_logins(k), bye_plaintext(), etc. build common hooks.
"""

import base64
import re
import socket
import ssl
import threading
import time

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
        self.uidvalidity = 1000 + (hash(name) & 0xFFFF)
        self.uidnext = 1
        self.messages = []

    def add(self, data, flags=()):
        m = Message(self.uidnext, data, flags)
        self.uidnext += 1
        self.messages.append(m)
        return m


class Conn:
    """The record of one accepted connection (and its live socket)."""

    def __init__(self, server, cid, sock, peer):
        self.server = server
        self.id = cid
        self.sock = sock
        self.peer = peer
        self.opened = time.monotonic()
        self.closed = None
        self.tls = None          # True after a good handshake, False if it failed
        self.tls_error = None
        self.commands = []       # (monotonic time, bytes) as received, literals inline
        self.logins = []         # (monotonic time, user, password, reply str)
        self.replies = []        # bytes sent
        self.admin = None        # after a successful login
        self.mailbox = None
        self.selected = None
        self.idling_tag = None
        self.failed_logins = 0
        self.error = None
        self.wlock = threading.Lock()
        self.rfile = None

    # ---- I/O
    def write(self, data):
        with self.wlock:
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
            if not m.group(2):
                self.write(LITERAL_CONT)
            data = self.rfile.read(n)
            if len(data) < n:
                raise EOFError
            out += data

    def close(self):
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

    def __repr__(self):
        return "Conn(%d, tls=%s, admin=%s, mailbox=%s, %d cmds)" % (
            self.id, self.tls, self.admin, self.mailbox, len(self.commands))


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

class FakeExchange:
    def __init__(self, cert=None, admins=None, domain="example.com", tls="implicit",
                 script=None, host="127.0.0.1", exchange_counters=True):
        """cert: a harness.Cert (or object with .cert/.key) unless tls == "none"."""
        self.cert = cert
        self.admins = dict(admins or {})
        self.domain = domain
        self.tls_mode = tls
        self.script = script if script is not None else {}
        self.host = host
        self.exchange_counters = exchange_counters
        self.mailboxes = {}
        self.connections = []
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
        self.lsock.listen(128)
        self.lsock.settimeout(0.2)
        self.port = self.lsock.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name="fake-exchange-accept", daemon=True)
        t.start()
        self.threads.append(t)
        return self

    def stop(self):
        self.stop_event.set()
        if self.lsock:
            self.lsock.close()
        with self.lock:
            conns = list(self.connections)
        for c in conns:
            c.close()
        for t in self.threads:
            t.join(timeout=2)

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.stop()

    def mailbox(self, name):
        with self.lock:
            mb = self.mailboxes.get(name.lower())
            if mb is None:
                mb = self.mailboxes[name.lower()] = Mailbox(name)
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
            c.close()
        return len(conns)

    # ---- records
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

    def open_connections(self):
        with self.lock:
            return [c for c in self.connections if c.is_open]

    def wait_for(self, pred, timeout=10.0, interval=0.02):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                v = pred(self)
            if v:
                return v
            time.sleep(interval)
        return None

    def summary(self):
        with self.lock:
            lines = ["fake_exchange port %d: %d connections, max %d concurrent, "
                     "max %d sessions" % (self.port, len(self.connections),
                                          self.max_conns, self.max_sessions)]
            for c in self.connections:
                lines.append("  %r tls_error=%r" % (c, c.tls_error))
                for _, cmd in c.commands[:20]:
                    lines.append("    C: %r" % cmd[:200])
            return "\n".join(lines)

    # ---- internals
    def _accept_loop(self):
        cid = 0
        while not self.stop_event.is_set():
            try:
                sock, peer = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            cid += 1
            conn = Conn(self, cid, sock, peer)
            with self.lock:
                self.connections.append(conn)
                self.cur_conns += 1
                self.max_conns = max(self.max_conns, self.cur_conns)
            t = threading.Thread(target=self._serve, args=(conn,),
                                 name="fake-exchange-%d" % cid, daemon=True)
            t.start()
            self.threads.append(t)

    def _hook(self, name, *args):
        fn = self.script.get(name)
        return fn(*args) if fn else None

    def _stall(self, conn):
        while not self.stop_event.is_set() and conn.is_open:
            try:
                conn.sock.settimeout(0.2)
                if not conn.sock.recv(65536):
                    return
            except socket.timeout:
                continue
            except OSError:
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
                self.cur_conns -= 1
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
        if act == "drop":
            return
        if act == "stall":
            return self._stall(conn)
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
        while not self.stop_event.is_set():
            cmd = conn.read_command()
            with self.lock:
                conn.commands.append((time.monotonic(), cmd))
            if not self._dispatch(conn, cmd):
                return

    def _reply(self, conn, data):
        conn.write(data if isinstance(data, bytes) else data.encode())

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
        if act == "drop":
            return False
        if act == "stall":
            self._stall(conn)
            return False
        if isinstance(act, (bytes, bytearray)):
            self._reply(conn, act)
            return True

        if name not in PREAUTH_OK and conn.admin is None:
            self._reply(conn, t + b"BAD Command received in Invalid state.\r\n")
            return True
        if name == "CAPABILITY":
            caps = CAPABILITY
            if self.tls_mode == "starttls" and not isinstance(conn.sock, ssl.SSLSocket):
                caps = CAPABILITY_PLAIN
            self._reply(conn, b"* CAPABILITY " + caps + b"\r\n" + t + b"OK CAPABILITY completed.\r\n")
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
            self._reply(conn, t + b"OK IDLE completed.\r\n")
        elif name == "APPEND":
            self._append(conn, t, args)
        elif name == "FETCH":
            self._fetch(conn, t, args, uid=False)
        elif name == "UID" and args and args[0].upper() == b"FETCH":
            self._fetch(conn, t, args[1:], uid=True)
        elif name in ("CHECK",):
            self._reply(conn, t + b"OK CHECK completed.\r\n")
        else:
            self._reply(conn, t + b"BAD Command Error. 12\r\n")
        return True

    def _login(self, conn, t, user, pw, kind):
        user_s = user.decode("utf-8", errors="replace")
        pw_s = pw.decode("utf-8", errors="replace")
        act = self._hook("on_login", conn, user_s, pw_s)
        if act == "drop":
            conn.logins.append((time.monotonic(), user_s, pw_s, "drop"))
            return False
        if act == "stall":
            conn.logins.append((time.monotonic(), user_s, pw_s, "stall"))
            self._stall(conn)
            return False
        parts = re.split(r"[/\\]", user_s)
        ok = False
        admin = None
        if act is None:
            if len(parts) == 3 and parts[0].lower() == self.domain.lower():
                for a, p in self.admins.items():
                    if a.lower() == parts[1].lower() and p == pw_s:
                        ok, admin = True, a
            reply = ("OK %s completed." % kind) if ok else ("NO %s failed." % kind)
        else:
            reply = act
            ok = reply.startswith("OK")
            if ok and len(parts) == 3:
                admin = parts[1]
            elif ok:
                admin = "?"
        conn.logins.append((time.monotonic(), user_s, pw_s, reply))
        if ok:
            conn.mailbox = parts[2] if len(parts) == 3 else user_s
            self._login_count(conn, admin)
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
        with self.lock:
            n = len(mb.messages)
        ro = name == "EXAMINE"
        self._reply(conn, b"* %d EXISTS\r\n* 0 RECENT\r\n" % n
                    + b"* FLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $MDNSent)\r\n"
                    + b"* OK [PERMANENTFLAGS (\\Seen \\Answered \\Flagged \\Deleted \\Draft $MDNSent)] "
                    + b"Permanent flags\r\n"
                    + b"* OK [UIDVALIDITY %d] UIDVALIDITY value\r\n" % mb.uidvalidity
                    + b"* OK [UIDNEXT %d] The next unique identifier value\r\n" % mb.uidnext
                    + t + (b"OK [READ-ONLY] EXAMINE completed.\r\n" if ro
                           else b"OK [READ-WRITE] SELECT completed.\r\n"))

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

    def _fetch(self, conn, t, args, uid):
        mb = conn.selected
        if mb is None or len(args) < 2:
            self._reply(conn, t + b"BAD Command received in Invalid state.\r\n")
            return
        with self.lock:
            msgs = list(mb.messages)
        items = b" ".join(args[1:]).upper()
        out = b""
        if uid:
            maxuid = msgs[-1].uid if msgs else 0
            wanted = set(parse_seqset(args[0], maxuid))
            sel = [(i + 1, m) for i, m in enumerate(msgs) if m.uid in wanted]
        else:
            try:
                wanted = parse_seqset(args[0], len(msgs))
            except ValueError:
                wanted = []
            if any(w < 1 or w > len(msgs) for w in wanted):
                self._reply(conn, t + b"BAD The specified message set is invalid.\r\n")
                return
            sel = [(w, msgs[w - 1]) for w in wanted]
        for seq, m in sel:
            parts = []
            if uid or b"UID" in items:
                parts.append(b"UID %d" % m.uid)
            if b"FLAGS" in items:
                parts.append(b"FLAGS (" + " ".join(sorted(m.flags)).encode() + b")")
            if b"RFC822.SIZE" in items:
                parts.append(b"RFC822.SIZE %d" % len(m.data))
            if b"BODY[]" in items or b"BODY.PEEK[]" in items:
                parts.append(b"BODY[] {%d}\r\n" % len(m.data) + m.data)
            elif re.search(rb"\bRFC822\b(?!\.)", items):
                parts.append(b"RFC822 {%d}\r\n" % len(m.data) + m.data)
            out += b"* %d FETCH (" % seq + b" ".join(parts) + b")\r\n"
        self._reply(conn, out + t + b"OK FETCH completed.\r\n")


# ------------------------------------------------------------ hook helpers

def fail_logins(k, text="NO LOGIN failed."):
    """on_login hook: the first k LOGIN/AUTHENTICATE attempts get `text`."""
    state = {"n": 0}
    lock = threading.Lock()

    def hook(conn, user, password):
        with lock:
            state["n"] += 1
            if state["n"] <= k:
                return text
        return None
    hook.state = state
    return hook


def bye_plaintext(text=b"* BYE Connection is closed. 14\r\n"):
    """on_connect hook: answer a TLS ClientHello with Exchange's plaintext BYE."""
    return lambda conn: text


def drop_on(command):
    """on_command hook: close the connection when `command` arrives."""
    command = command.upper()
    return lambda conn, tag, name, cmd: "drop" if name == command else None


def stall_on(command):
    command = command.upper()
    return lambda conn, tag, name, cmd: "stall" if name == command else None
