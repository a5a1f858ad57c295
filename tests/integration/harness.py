"""
harness.py - building blocks for imapshim's integration tests and demo.

Everything runs on loopback with free ports and throwaway files:

  Pki        a test CA and certificates made with the openssl CLI: a good
             server certificate (localhost, 127.0.0.1, ::1), one from an
             unknown CA, one for the wrong name, one expired, one self-signed.
  Dovecot    a real Dovecot with a master passdb, so "user1*NPUMAdmin1"
             logins stand in for Exchange's delegated logins.
  ImapShim   the daemon under test, configured by an ini written here.
  ImapClient a raw-socket IMAP client that reads responses byte-exactly
             (server literals are counted, not line-split).

Only the Python standard library is used (Debian's python3).  Every wait is
a poll with a deadline; every socket has a timeout.
"""

import base64
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request

HOST = "127.0.0.1"
DEFAULT_TIMEOUT = 10.0
EXTRA_PATH = "/usr/sbin:/sbin:/usr/local/sbin"


class HarnessError(Exception):
    pass


# --------------------------------------------------------------- utilities

def which(prog):
    """Find prog on PATH or in the sbin directories (Dovecot lives there)."""
    path = os.environ.get("PATH", "") + ":" + EXTRA_PATH
    return shutil.which(prog, path=path)


_ports_given = set()


def free_port(host=HOST):
    """A port that was free a moment ago (bind port 0, read it, close), and
    never handed out before by this process: the kernel may offer the same
    port twice in a row, and two listeners of one test (listen and
    listen_starttls) must not get it both."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def wait_until(pred, timeout=DEFAULT_TIMEOUT, interval=0.05, what="condition"):
    """Poll pred() until it returns a true value; return it, or raise."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise HarnessError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def wait_port(port, host=HOST, timeout=DEFAULT_TIMEOUT, proc=None, what=None):
    """Poll-connect until host:port accepts.  Fails early if proc died."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise HarnessError("%s exited with status %s before listening on %s:%d"
                               % (what or "process", proc.returncode, host, port))
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise HarnessError("%s:%d did not accept within %.1fs (%s)" % (host, port, timeout, last))


def http_get(port, path, host=HOST):
    """GET http://host:port/path (imapshim's status endpoint); the body as
    text.  An HTTP error raises."""
    with urllib.request.urlopen("http://%s:%d%s" % (host, port, path), timeout=5) as r:
        return r.read().decode()


def metric(port, name, **labels):
    """One sample of imapshim's /metrics as a float, None when absent."""
    lab = ",".join('%s="%s"' % kv for kv in sorted(labels.items()))
    pat = "^" + re.escape(name + ("{%s}" % lab if lab else "")) + r" (\S+)$"
    m = re.search(pat, http_get(port, "/metrics"), re.M)
    return float(m.group(1)) if m else None


def write_file(path, data, mode=0o600):
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def run(cmd, cwd=None):
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=60)
    if p.returncode != 0:
        raise HarnessError("command failed (%d): %s\n%s"
                           % (p.returncode, " ".join(cmd), p.stdout.decode(errors="replace")))
    return p.stdout


def imap_quote(s):
    """An IMAP quoted string for s (str or bytes), escaping \\ and \"."""
    if isinstance(s, str):
        s = s.encode()
    return b'"' + s.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def sasl_plain(authcid, password, authzid=""):
    raw = authzid.encode() + b"\0" + authcid.encode() + b"\0" + password.encode()
    return base64.b64encode(raw).decode()


def kill_group(proc, sig=signal.SIGTERM, timeout=10.0):
    """Send sig to proc's process group, wait, SIGKILL after timeout."""
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else None
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait(timeout=5)


# --------------------------------------------------------------------- PKI

_CA_CNF = """\
[ ca ]
default_ca = test_ca
[ test_ca ]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}/newcerts
serial = {dir}/serial
default_md = sha256
policy = policy_any
unique_subject = no
email_in_dn = no
copy_extensions = none
[ policy_any ]
commonName = supplied
"""


class Cert:
    """A certificate and key pair on disk (chain = leaf only)."""

    def __init__(self, cert, key):
        self.cert = cert
        self.key = key

    def __repr__(self):
        return "Cert(%r)" % self.cert


class Pki:
    """
    Throwaway test PKI built with the openssl CLI (ECDSA P-256, fast):

      ca           the test CA (what imapshim and clients trust)
      server       CN=localhost, SAN DNS:localhost IP:127.0.0.1 IP:::1, by ca
      unknown_ca   another CA nobody trusts
      unknown      CN=localhost with the same SANs, signed by unknown_ca
      wrong_name   CN=wrong.example, SAN DNS:wrong.example, by ca
      expired      localhost SANs, by ca, valid 2020-01-01 .. 2020-01-02
      self_signed  localhost SANs, self-signed
    leaf(name, days) makes another localhost certificate by ca, valid `days`
    days from now (certificate expiry tests).
    """

    def __init__(self, directory):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.openssl = which("openssl")
        if not self.openssl:
            raise HarnessError("openssl not found")
        self.ca = self._make_ca("ca", "imapshim test CA")
        self.unknown_ca = self._make_ca("unknown-ca", "imapshim unknown CA")
        self.san_local = san_local = "DNS:localhost,IP:127.0.0.1,IP:::1"
        self.server = self._make_leaf("server", "localhost", san_local, self.ca)
        self.unknown = self._make_leaf("unknown", "localhost", san_local, self.unknown_ca)
        self.wrong_name = self._make_leaf("wrong-name", "wrong.example",
                                          "DNS:wrong.example", self.ca)
        self.expired = self._make_expired("expired", "localhost", san_local, self.ca)
        self.self_signed = self._make_self_signed("self-signed", "localhost", san_local)
        self.ca_file = self.ca.cert

    def _p(self, name):
        return os.path.join(self.dir, name)

    def _keygen(self, name):
        key = self._p(name + ".key")
        run([self.openssl, "genpkey", "-algorithm", "EC", "-pkeyopt",
             "ec_paramgen_curve:P-256", "-out", key])
        os.chmod(key, 0o600)
        return key

    def _make_ca(self, name, cn):
        key = self._keygen(name)
        cert = self._p(name + ".pem")
        run([self.openssl, "req", "-x509", "-new", "-key", key, "-out", cert,
             "-days", "3650", "-subj", "/CN=" + cn, "-sha256",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash"])
        return Cert(cert, key)

    def _ext(self, name, san):
        ext = self._p(name + ".ext")
        write_file(ext, "[v3]\nbasicConstraints=CA:FALSE\n"
                        "keyUsage=critical,digitalSignature,keyEncipherment\n"
                        "extendedKeyUsage=serverAuth\n"
                        "subjectAltName=%s\n" % san, 0o644)
        return ext

    def _csr(self, name, cn):
        key = self._keygen(name)
        csr = self._p(name + ".csr")
        run([self.openssl, "req", "-new", "-key", key, "-out", csr, "-subj", "/CN=" + cn])
        return key, csr

    def leaf(self, name, days):
        return self._make_leaf(name, "localhost", self.san_local, self.ca, days)

    def _make_leaf(self, name, cn, san, ca, days=365):
        key, csr = self._csr(name, cn)
        cert = self._p(name + ".pem")
        run([self.openssl, "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key,
             "-set_serial", str(secrets.randbits(62)), "-days", str(days), "-sha256",
             "-extfile", self._ext(name, san), "-extensions", "v3", "-out", cert])
        return Cert(cert, key)

    def _make_expired(self, name, cn, san, ca):
        # openssl x509 (3.0) cannot backdate; `openssl ca` takes explicit dates.
        cadir = self._p(name + "-cadb")
        os.makedirs(os.path.join(cadir, "newcerts"), exist_ok=True)
        write_file(os.path.join(cadir, "index.txt"), "", 0o644)
        write_file(os.path.join(cadir, "serial"), "%016X\n" % secrets.randbits(62), 0o644)
        cnf = write_file(os.path.join(cadir, "ca.cnf"), _CA_CNF.format(dir=cadir), 0o644)
        key, csr = self._csr(name, cn)
        cert = self._p(name + ".pem")
        run([self.openssl, "ca", "-batch", "-config", cnf, "-cert", ca.cert,
             "-keyfile", ca.key, "-in", csr, "-out", cert, "-notext",
             "-startdate", "20200101000000Z", "-enddate", "20200102000000Z",
             "-extfile", self._ext(name, san), "-extensions", "v3"])
        return Cert(cert, key)

    def _make_self_signed(self, name, cn, san):
        key = self._keygen(name)
        cert = self._p(name + ".pem")
        run([self.openssl, "req", "-x509", "-new", "-key", key, "-out", cert,
             "-days", "365", "-subj", "/CN=" + cn, "-sha256",
             "-addext", "subjectAltName=" + san,
             "-addext", "extendedKeyUsage=serverAuth"])
        return Cert(cert, key)

    def client_context(self, verify=True):
        """An SSL context for a test client that trusts the test CA."""
        ctx = ssl.create_default_context(cafile=self.ca.cert)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def server_context(self, cert=None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert = cert or self.server
        ctx.load_cert_chain(cert.cert, cert.key)
        return ctx


# ------------------------------------------------------------- IMAP client

class ConnectionClosed(HarnessError):
    pass


_LITERAL_RE = re.compile(rb"\{(\d+)\+?\}\r\n$")


def split_item(buf):
    """Length of the first complete server response at the start of buf (a
    line, the literals it announces and the lines after them, as
    ImapClient.read_item frames it), or 0 while only part of one is there."""
    pos = 0
    while True:
        i = buf.find(b"\n", pos)
        if i < 0:
            return 0
        end = i + 1
        m = _LITERAL_RE.search(buf, pos, end)
        if not m or buf.startswith(b"+"):
            return end
        pos = end + int(m.group(1))
        if len(buf) < pos:
            return 0


class Response:
    """
    The reply to one command: `items` are complete server responses (a line
    plus any literals it announced, with the lines that continue after them),
    in order, byte-exact; the last one is the tagged completion.
    """

    def __init__(self, tag, items):
        self.tag = tag
        self.items = items

    @property
    def tagged(self):
        return self.items[-1]

    @property
    def untagged(self):
        return self.items[:-1]

    @property
    def raw(self):
        return b"".join(self.items)

    @property
    def status(self):
        """OK, NO or BAD (str), from the tagged line."""
        parts = self.tagged.split(b" ", 2)
        return parts[1].decode(errors="replace").upper() if len(parts) > 1 else ""

    @property
    def text(self):
        return self.raw.decode("utf-8", errors="replace")

    def __repr__(self):
        r = self.raw
        if len(r) > 600:
            r = r[:300] + b"...<%d bytes>..." % (len(r) - 600) + r[-300:]
        return "Response(%r)" % r


class ImapClient:
    """
    Raw-socket IMAP client.  tls: an ssl.SSLContext for implicit TLS, or None
    for cleartext (use starttls()); tls_session: an ssl.SSLSession to resume.
    All reads honour `timeout` seconds.  Everything received is also appended to self.transcript.
    """

    def __init__(self, port, host=HOST, tls=None, server_hostname="localhost",
                 timeout=DEFAULT_TIMEOUT, read_greeting=True, tls_session=None):
        self.host, self.port = host, port
        self.timeout = timeout
        self.server_hostname = server_hostname
        self.buf = b""
        self.transcript = []
        self.closed = False
        self._tagn = 0
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname=server_hostname,
                                        session=tls_session)
        self.greeting = self.read_line() if read_greeting else None

    # --- low level
    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _fill(self, timeout=None):
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, BrokenPipeError) as e:
            chunk = b""
            self.eof_error = e
        except ssl.SSLError as e:
            chunk = b""
            self.eof_error = e
        if not chunk:
            self.closed = True
            raise ConnectionClosed("server closed the connection; buffered %r" % self.buf[:300])
        self.buf += chunk

    def read_line(self, timeout=None):
        """One line including CRLF (a bare LF also ends it)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("no complete line within timeout; have %r" % self.buf[:300])
            self._fill(left)
        i = self.buf.index(b"\n") + 1
        line, self.buf = self.buf[:i], self.buf[i:]
        self.transcript.append(line)
        return line

    def read_exact(self, n, timeout=None):
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("wanted %d bytes, have %d" % (n, len(self.buf)))
            self._fill(left)
        data, self.buf = self.buf[:n], self.buf[n:]
        self.transcript.append(data)
        return data

    def read_item(self, timeout=None):
        """One complete server response: a line plus announced literals."""
        item = self.read_line(timeout)
        while True:
            m = _LITERAL_RE.search(item)
            if not m or item.startswith(b"+"):
                return item
            item += self.read_exact(int(m.group(1)), timeout)
            item += self.read_line(timeout)

    # --- non-blocking use, for one thread driving many clients with select()
    def recv_nowait(self):
        """Move whatever the server has sent into self.buf without blocking,
        down to the last byte the TLS layer holds (so select() on self.sock
        tells the truth again).  False once the server has closed the
        connection (EOF, reset, TLS alert): self.closed is then set."""
        if self.closed:
            return False
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.closed = True
                    return False
                self.buf += chunk
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return True
        except OSError as e:          # reset, TLS alert, EOF without close_notify
            self.eof_error = e
            self.closed = True
            return False
        finally:
            try:
                self.sock.settimeout(self.timeout)
            except OSError:
                pass

    def take_items(self):
        """The complete server responses in self.buf (framed as read_item
        frames them), removed from it; a partial one stays there."""
        items = []
        while True:
            n = split_item(self.buf)
            if not n:
                return items
            item, self.buf = self.buf[:n], self.buf[n:]
            self.transcript.append(item)
            items.append(item)

    def read_response(self, tag, timeout=None):
        """Items up to and including the tagged completion for tag."""
        if isinstance(tag, str):
            tag = tag.encode()
        items = []
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left = max(0.01, deadline - time.monotonic())
            try:
                item = self.read_item(left)
            except ConnectionClosed as e:
                raise ConnectionClosed("closed while waiting for tag %r; got %r; %s"
                                       % (tag, b"".join(items)[:2000], e)) from None
            except socket.timeout:
                raise socket.timeout("no tagged reply for %r; got so far %r"
                                     % (tag, b"".join(items)[:2000])) from None
            items.append(item)
            if item.startswith(tag + b" "):
                return Response(tag.decode(errors="replace"), items)

    def read_continuation(self, timeout=None):
        """Read items until a '+' continuation; returns (untagged, plusline)."""
        items = []
        while True:
            item = self.read_item(timeout)
            if item.startswith(b"+"):
                return items, item
            items.append(item)

    def expect_closed(self, timeout=5.0):
        """Read until EOF; returns everything read. Raises if still open."""
        got = b""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HarnessError("connection still open after %.1fs; got %r"
                                       % (timeout, got + self.buf))
                self._fill(left)
                got += self.buf
                self.transcript.append(self.buf)
                self.buf = b""
        except ConnectionClosed:
            got += self.buf
            self.buf = b""
            return got
        except socket.timeout:
            raise HarnessError("connection still open after %.1fs; got %r"
                               % (timeout, got)) from None

    # --- commands
    def next_tag(self):
        self._tagn += 1
        return "t%d" % self._tagn

    def command(self, text, tag=None, timeout=None):
        """Send 'TAG text\\r\\n' (text: str or bytes) and read the reply."""
        tag = tag or self.next_tag()
        if isinstance(text, str):
            text = text.encode()
        self.send(tag.encode() + b" " + text + b"\r\n")
        return self.read_response(tag, timeout)

    def login(self, user, password, tag=None, timeout=None):
        return self.command(b"LOGIN " + imap_quote(user) + b" " + imap_quote(password),
                            tag=tag, timeout=timeout)

    def starttls(self, ctx, tag="s"):
        r = self.command("STARTTLS", tag=tag)
        if r.status != "OK":
            return r
        if self.buf:
            raise HarnessError("bytes after STARTTLS OK before handshake: %r" % self.buf)
        self.sock = ctx.wrap_socket(self.sock, server_hostname=self.server_hostname)
        return r

    def append(self, mailbox, message, nonsync=False, tag=None, flags=None, timeout=None):
        """APPEND with a literal; a sync literal waits for the '+' first."""
        tag = tag or self.next_tag()
        head = tag.encode() + b" APPEND " + imap_quote(mailbox)
        if flags:
            head += b" (" + flags.encode() + b")"
        head += b" {%d%s}\r\n" % (len(message), b"+" if nonsync else b"")
        self.send(head)
        if not nonsync:
            items, plus = self.read_continuation(timeout)
            if items:
                raise HarnessError("untagged before continuation: %r" % items)
        self.send(message + b"\r\n")
        return self.read_response(tag, timeout)

    def logout(self):
        try:
            return self.command("LOGOUT")
        finally:
            self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def parse_capabilities(data):
    """Set of upper-case capability atoms from '* CAPABILITY ...' lines or
    from a '[CAPABILITY ...]' response code in data (bytes or Response)."""
    if isinstance(data, Response):
        data = data.raw
    caps = set()
    for m in re.finditer(rb"^\* CAPABILITY ([^\r\n]*)", data, re.M | re.I):
        caps.update(x.upper() for x in m.group(1).decode().split())
    for m in re.finditer(rb"\[CAPABILITY ([^\]]*)\]", data, re.I):
        caps.update(x.upper() for x in m.group(1).decode().split())
    return caps


def fetch_literals(resp):
    """All literal payloads in a Response's untagged items (bytes list)."""
    out = []
    for item in resp.untagged:
        pos = 0
        while True:
            m = re.compile(rb"\{(\d+)\}\r\n").search(item, pos)
            if not m:
                break
            n = int(m.group(1))
            out.append(item[m.end():m.end() + n])
            pos = m.end() + n
    return out


# ----------------------------------------------------------------- Dovecot

_DOVECOT_CONF = """\
# throwaway Dovecot for imapshim's integration tests
base_dir = {run}
state_dir = {state}
instance_name = imapshim-test-{rand}
log_path = {log}
info_log_path = {log}
debug_log_path = {log}
protocols = imap
listen = 127.0.0.1
shutdown_clients = yes
default_internal_user = {internal_user}
default_login_user = {login_user}
first_valid_uid = {uid}
first_valid_gid = {gid}
last_valid_uid = 0
mail_location = maildir:{mail}/%n/Maildir
mail_uid = {uid}
mail_gid = {gid}
auth_verbose = yes
auth_username_format = %u
auth_master_user_separator = *
auth_mechanisms = plain
disable_plaintext_auth = yes
auth_failure_delay = 0
login_greeting = Dovecot test ready.
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
verbose_proctitle = no
version_ignore = yes
default_process_limit = {process_limit}
default_client_limit = {client_limit}

namespace inbox {{
  inbox = yes
  separator = /
}}

passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {master_passwd}
  master = yes
}}
passdb {{
  # no normal user can log in: nobody knows this password
  driver = static
  args = password={nobody_pw}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={mail}/%n
}}

service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port_imap}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {port_imaps}
    ssl = yes
  }}
  process_min_avail = 1
  # high-performance mode: one login process serves every connection, so
  # its TLS session tickets resume (as a CAS's do)
  service_count = 0
  client_limit = {client_limit}
{login_user_line}}}
service imap {{
  process_limit = {process_limit}
{imap_extra}}}
service anvil {{
  chroot =
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
protocol imap {{
  mail_max_userip_connections = 1000
  imap_idle_notify_interval = 2 mins
}}
"""


class Dovecot:
    """
    A private Dovecot: implicit TLS on port_imaps (what imapshim uses as its
    upstream) and cleartext+STARTTLS on port_imap.  Admin accounts are master
    users: "user1*NPUMAdmin1" with NPUMAdmin1's password logs in as user1.
    """

    def __init__(self, directory, pki, admins, max_sessions=100, sessions_per_process=1):
        self.dir = directory
        self.pki = pki
        self.admins = dict(admins)
        self.max_sessions = max_sessions    # imap processes (one a session)
        # > 1: each imap process serves that many sessions (every mailbox has
        # the same uid here), so thousands of logins do not each fork one
        # (the storm benchmark; Dovecot forks about 10 a second on a busy
        # 2-core machine)
        self.sessions_per_process = sessions_per_process
        self.proc = None
        self.binary = which("dovecot")
        if not self.binary:
            raise HarnessError("dovecot not found")
        self.log_path = os.path.join(directory, "dovecot.log")
        self.conf_path = os.path.join(directory, "dovecot.conf")
        self.port_imap = free_port()
        self.port_imaps = free_port()

    def start(self):
        d = self.dir
        os.makedirs(d, exist_ok=True)
        os.chmod(d, 0o755)
        mail = os.path.join(d, "mail")
        os.makedirs(mail, exist_ok=True)
        if os.geteuid() == 0:
            import pwd
            import grp
            try:
                pw = pwd.getpwnam("nobody")
                uid, gid = pw.pw_uid, pw.pw_gid
            except KeyError:
                uid = gid = 65534
            try:
                gid = grp.getgrnam("nogroup").gr_gid
            except KeyError:
                pass
            os.chown(mail, uid, gid)
            internal_user, login_user, login_user_line = "dovecot", "dovenull", ""
        else:
            import pwd
            uid, gid = os.getuid(), os.getgid()
            me = pwd.getpwuid(uid).pw_name
            internal_user = login_user = me
            login_user_line = "  chroot =\n"
        os.chmod(mail, 0o755)
        # Dovecot's auth process (not root) reads the master passwd-file.
        self.master_passwd = write_file(
            os.path.join(d, "master.passwd"),
            "".join("%s:{PLAIN}%s\n" % (a, p) for a, p in self.admins.items()), 0o644)
        conf = _DOVECOT_CONF.format(
            run=os.path.join(d, "run"), state=os.path.join(d, "state"),
            rand=secrets.token_hex(4), log=self.log_path, mail=mail,
            uid=uid, gid=gid, internal_user=internal_user, login_user=login_user,
            login_user_line=login_user_line,
            cert=self.pki.server.cert, key=self.pki.server.key,
            master_passwd=self.master_passwd, nobody_pw=secrets.token_hex(24),
            port_imap=self.port_imap, port_imaps=self.port_imaps,
            process_limit=self.max_sessions + 10,
            imap_extra="" if self.sessions_per_process <= 1 else
            "  service_count = 0\n  client_limit = %d\n" % self.sessions_per_process,
            client_limit=max(1000, self.max_sessions + 100))
        write_file(self.conf_path, conf, 0o644)
        os.makedirs(os.path.join(d, "state"), exist_ok=True)
        self.errlog = open(os.path.join(d, "dovecot.stderr"), "wb")
        self.proc = subprocess.Popen([self.binary, "-F", "-c", self.conf_path],
                                     stdin=subprocess.DEVNULL, stdout=self.errlog,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_port(self.port_imaps, proc=self.proc, what="dovecot", timeout=20)
            wait_until(self._greets, timeout=20, what="dovecot imaps greeting")
        except Exception:
            self.stop()
            raise HarnessError("dovecot failed to start:\n%s\n%s"
                               % (self._read(os.path.join(d, "dovecot.stderr")), self.log_text()))
        return self

    def _greets(self):
        try:
            c = ImapClient(self.port_imaps, tls=self.pki.client_context(), timeout=3)
            c.close()
            return c.greeting.startswith(b"* OK")
        except (OSError, HarnessError):
            return False

    @staticmethod
    def _read(path):
        try:
            with open(path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_text(self):
        return self._read(self.log_path)

    def stop(self):
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None
        if getattr(self, "errlog", None):
            self.errlog.close()
            self.errlog = None

    # --- direct access, bypassing imapshim
    def connect(self, mailbox, admin=None, timeout=DEFAULT_TIMEOUT):
        """A raw ImapClient logged in to Dovecot directly as mailbox*admin."""
        admin = admin or next(iter(self.admins))
        c = ImapClient(self.port_imaps, tls=self.pki.client_context(), timeout=timeout)
        r = c.login("%s*%s" % (mailbox, admin), self.admins[admin])
        if r.status != "OK":
            c.close()
            raise HarnessError("direct Dovecot login failed: %r" % r)
        return c

    def append(self, mailbox, message, folder="INBOX", admin=None):
        """APPEND message directly; returns the new UID (from APPENDUID)."""
        with self.connect(mailbox, admin) as c:
            r = c.append(folder, message)
            if r.status != "OK":
                raise HarnessError("direct APPEND failed: %r" % r)
            m = re.search(rb"\[APPENDUID (\d+) (\d+)\]", r.tagged)
            c.command("LOGOUT")
            return int(m.group(2)) if m else None

    def login_count(self, mailbox):
        """Successful IMAP logins of mailbox seen in Dovecot's log."""
        return len(re.findall(r"imap-login: (?:Info: )?Login: user=<%s>" % re.escape(mailbox),
                              self.log_text()))

    def disconnect_count(self, mailbox):
        """Ended (post-login) IMAP sessions of mailbox in Dovecot's log."""
        return len(re.findall(r"imap\(%s\)[^\n]*: Disconnected" % re.escape(mailbox),
                              self.log_text()))

    def logout_count(self, mailbox):
        return len(re.findall(r"imap\(%s\)[^\n]*: Disconnected: Logged out" % re.escape(mailbox),
                              self.log_text()))


# ---------------------------------------------------------------- imapshim

# An imapshim log line (log.c) is logfmt: a head -- the timestamp and a
# space, or "<N>" (the syslog priority) when stderr is the journal -- then
# key=value pairs split by one space.  A value is bare (printable ASCII
# without space, quote or '=') or "quoted" with only \" \\ \xNN escapes
# (log.c's log_value).
_LOG_HEAD_RE = re.compile(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z |<[0-7]>')
_LOG_KV_RE = re.compile(r'([A-Za-z_]\w*)=("(?:[ !#-\[\]-~]|\\["\\]|\\x[0-9a-fA-F]{2})*"'
                        r'|[!#-<>-~]+)(?: |$)')


def _log_unquote(v):
    if len(v) < 2 or not v.startswith('"') or not v.endswith('"'):
        return v
    return re.sub(r'\\(x[0-9a-fA-F]{2}|.)',
                  lambda m: chr(int(m.group(1)[1:], 16)) if len(m.group(1)) == 3
                  else m.group(1), v[1:-1])


def parse_log_line(line):
    """(fields, valid) of one imapshim log line: its key=value pairs as a
    dict (quoted values unescaped) and whether the whole line is logfmt,
    level= and event= first.  A part that is not a pair is skipped up to
    the next space, so the pairs around it are still found."""
    m = _LOG_HEAD_RE.match(line)
    pos, valid, keys, kv = (m.end() if m else 0), m is not None, [], {}
    while pos < len(line):
        m = _LOG_KV_RE.match(line, pos)
        if m is None:
            valid = False
            nxt = line.find(" ", pos)
            pos = len(line) if nxt == -1 else nxt + 1
            continue
        keys.append(m.group(1))
        kv[m.group(1)] = _log_unquote(m.group(2))
        pos = m.end()
    valid = valid and keys[:2] == ["level", "event"] and not line.endswith(" ")
    return kv, valid


class ImapShim:
    """
    One imapshim process.  `config` is {section: {key: value}} merged over
    the defaults given by the caller (see shim_config_for()).  admins maps
    name -> password; each password goes to a 0600 password_file.
    """

    def __init__(self, binary, directory, pki, upstream_port, admins, config=None,
                 starttls=True, name="imapshim"):
        self.binary = binary
        self.dir = directory
        self.pki = pki
        self.admins = dict(admins)
        self.name = name
        os.makedirs(directory, exist_ok=True)
        self.port = free_port()
        self.port_starttls = free_port() if starttls else None
        self.ini_path = os.path.join(directory, name + ".ini")
        self.log_path = os.path.join(directory, name + ".log")
        # Its own console socket: the default /run/imapshim/control is
        # neither writable nor private to one test.
        self.control_path = os.path.join(directory, name + ".control")
        self.proc = None
        self.stopped = False
        # Set before start(): variables added to the process environment
        # (None removes one), e.g. NOTIFY_SOCKET as systemd sets it.
        self.env = {}
        cfg = {
            "shim": {
                "listen": "%s:%d" % (HOST, self.port),
                "listen_starttls": ("%s:%d" % (HOST, self.port_starttls)) if starttls else "",
                "tls_cert_file": pki.server.cert,
                "tls_key_file": pki.server.key,
                "allow_from": "127.0.0.0/8, ::1",
                "status_listen": "",
                "control_socket": self.control_path,
                "log_level": "debug",
            },
            "upstream": {
                "servers": "%s:%d" % (HOST, upstream_port),
                "tls": "implicit",
                "tls_ca_file": pki.ca.cert,
                "tls_server_name": "localhost",
                "domain": "example.com",
            },
            "pool": {"mode": "session"},
        }
        for sect, kv in (config or {}).items():
            if sect.startswith("admin "):
                continue
            cfg.setdefault(sect, {})
            for k, v in kv.items():
                if v is None:
                    cfg[sect].pop(k, None)
                else:
                    cfg[sect][k] = v
        self.config = cfg
        self.admin_extra = {k: v for k, v in (config or {}).items() if k.startswith("admin ")}

    def write_ini(self):
        lines = ["; written by tests/integration/harness.py"]
        for sect, kv in self.config.items():
            lines.append("[%s]" % sect)
            lines.extend("%s = %s" % (k, v) for k, v in kv.items())
            lines.append("")
        for admin, pw in self.admins.items():
            pwf = write_file(os.path.join(self.dir, "%s.%s.secret" % (self.name, admin)),
                             pw + "\n", 0o600)
            lines.append("[admin %s]" % admin)
            extra = {"password_file": pwf, "max_sessions": "16"}
            extra.update(self.admin_extra.get("admin " + admin, {}))
            lines.extend("%s = %s" % (k, v) for k, v in extra.items())
            lines.append("")
        write_file(self.ini_path, "\n".join(lines), 0o600)

    def start(self, timeout=DEFAULT_TIMEOUT):
        if not self.binary or not os.access(self.binary, os.X_OK):
            raise HarnessError("imapshim binary not executable: %r" % self.binary)
        self.write_ini()
        self.stopped = False
        try:
            self.log_offset = os.path.getsize(self.log_path)   # this run's log starts here
        except OSError:
            self.log_offset = 0
        self.logf = open(self.log_path, "ab")
        env = dict(os.environ)
        for k, v in self.env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        self.proc = subprocess.Popen([self.binary, "-c", self.ini_path],
                                     stdin=subprocess.DEVNULL, stdout=self.logf,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env)
        try:
            if self.port:
                wait_port(self.port, proc=self.proc, what="imapshim", timeout=timeout)
            if self.port_starttls:
                wait_port(self.port_starttls, proc=self.proc, what="imapshim", timeout=timeout)
            # The console comes up after the listeners.
            ctl_path = self.config["shim"].get("control_socket")
            if ctl_path:
                wait_until(lambda: os.path.exists(ctl_path) or self.proc.poll() is not None,
                           timeout=timeout, what="imapshim's control_socket")
        except HarnessError as e:
            self.stop()
            raise HarnessError("%s\n--- %s ---\n%s\n--- log ---\n%s"
                               % (e, self.ini_path, open(self.ini_path).read(),
                                  self.log_text()[-4000:])) from None
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=10.0):
        rc = None
        self.stopped = True
        if self.proc is not None:
            rc = kill_group(self.proc, signal.SIGTERM, timeout)
            self.returncode = rc
        if getattr(self, "logf", None):
            self.logf.close()
            self.logf = None
        return rc

    def log_bytes(self, this_run=False):
        """The log file's bytes (this_run: only since the last start())."""
        try:
            with open(self.log_path, "rb") as f:
                if this_run:
                    f.seek(getattr(self, "log_offset", 0))
                return f.read()
        except OSError:
            return b""

    def log_text(self, this_run=False):
        return self.log_bytes(this_run).decode(errors="replace")

    def log_events(self, event, this_run=True, **fields):
        """The log lines of `event` as {key: value} dicts (quoted values
        unescaped), in log order; fields: only lines whose values equal
        these (str(value) compared)."""
        out = []
        for line in self.log_text(this_run).splitlines():
            if " event=%s " % event not in line + " ":
                continue
            kv = parse_log_line(line)[0]
            if all(kv.get(k) == str(v) for k, v in fields.items()):
                out.append(kv)
        return out

    def wait_log_event(self, event, timeout=DEFAULT_TIMEOUT, count=1, **fields):
        """Wait until `count` lines of `event` match fields (log_events);
        returns them all, or raises HarnessError with the log's tail."""
        try:
            return wait_until(lambda: (lambda e: e if len(e) >= count else None)(
                self.log_events(event, **fields)), timeout=timeout,
                what="%d log line(s) event=%s %r" % (count, event, fields))
        except HarnessError as e:
            raise HarnessError("%s; %s log tail:\n%s"
                               % (e, self.name, self.log_text(True)[-3000:])) from None

    def client(self, timeout=DEFAULT_TIMEOUT, **kw):
        """Implicit-TLS client to the shim, verifying the test CA."""
        return ImapClient(self.port, tls=self.pki.client_context(), timeout=timeout, **kw)

    def plain_client(self, timeout=DEFAULT_TIMEOUT, **kw):
        """Cleartext client to the STARTTLS listener."""
        return ImapClient(self.port_starttls, tls=None, timeout=timeout, **kw)

    def login_name(self, mailbox, admin=None, domain="example.com", sep="/"):
        admin = admin or next(iter(self.admins))
        return sep.join((domain, admin, mailbox))

    def logged_in(self, mailbox, admin=None, timeout=DEFAULT_TIMEOUT):
        """A client logged in through the shim as mailbox (asserting OK)."""
        admin = admin or next(iter(self.admins))
        c = self.client(timeout=timeout)
        r = c.login(self.login_name(mailbox, admin), self.admins[admin], tag="L")
        if r.status != "OK":
            c.close()
            raise HarnessError("login through imapshim failed for %s: %r\n--- log tail ---\n%s"
                               % (mailbox, r, self.log_text()[-3000:]))
        return c


def make_tempdir(prefix="imapshim-it-"):
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o755)
    return d


def find_ctl(imapshim=None):
    """imapshim-ctl, built beside the imapshim binary ($IMAPSHIM)."""
    b = imapshim or find_imapshim()
    return os.path.join(os.path.dirname(b), "imapshim-ctl") if b else None


def ctl(shim, *args, socket=None, timeout=DEFAULT_TIMEOUT, preexec_fn=None):
    """Run imapshim-ctl against shim's console: ctl(shim, "show", "clients")
    or ctl(shim, "show clients").  Returns (exit status, stdout, stderr)."""
    argv = [find_ctl(shim.binary), "-s", socket or shim.control_path]
    for a in args:
        argv.extend(a.split())
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=timeout, preexec_fn=preexec_fn)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


def find_imapshim():
    """$IMAPSHIM, or a built binary under the source tree (for manual runs)."""
    b = os.environ.get("IMAPSHIM")
    if b:
        return b
    top = os.environ.get("top_srcdir") or os.path.abspath(
        os.path.join(os.path.dirname(__file__), "..", ".."))
    import glob
    for cand in sorted(glob.glob(os.path.join(top, "build*", "src", "imapshim"))) + \
            [os.path.join(top, "src", "imapshim")]:
        if os.access(cand, os.X_OK):
            return cand
    return None
