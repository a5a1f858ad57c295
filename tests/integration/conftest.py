"""
Fixtures for imapshim's integration tests.

Session-scoped: the test PKI, a private Dovecot (the "Exchange" of most
tests), the admin accounts.  Module-scoped: one imapshim in front of Dovecot
with the default test configuration.  Function-scoped factories: make_shim()
for an imapshim with special settings, make_fake() for a fake Exchange.

On a failing test, the tail of every imapshim log the test used (and the
fake Exchange's records) are attached to the report.
"""

import os
import re
import secrets
import shutil
import signal
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
import fake_exchange  # noqa: E402

TEST_TIME_LIMIT = int(os.environ.get("IMAPSHIM_TEST_TIME_LIMIT", "90"))

# Objects whose logs belong in a failing test's report (reset per test).
_ACTIVE = {"shims": [], "fakes": []}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when in ("setup", "call") and rep.failed:
        for shim in _ACTIVE["shims"]:
            tail = shim.log_text()[-6000:]
            rep.sections.append(("%s log (%s), tail" % (shim.name, shim.log_path), tail))
        for fe in _ACTIVE["fakes"]:
            rep.sections.append(("fake_exchange records", fe.summary()))


@pytest.fixture(autouse=True)
def _time_limit(request):
    """Every test is bounded: SIGALRM raises in the test after the limit."""
    def on_alarm(signum, frame):
        raise TimeoutError("test exceeded %ds" % TEST_TIME_LIMIT)
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIME_LIMIT)
    _ACTIVE["shims"] = []
    _ACTIVE["fakes"] = []
    if "shim" in request.fixturenames:
        # the module-scoped shim's log belongs in this test's report too
        s = request.getfixturevalue("shim")
        if not s.alive():
            # an earlier test killed it (reported there); start it again so
            # one crash does not fail every later test
            s.stop()
            s.start()
        _ACTIVE["shims"].append(s)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
    dead = [s for s in _ACTIVE["shims"]
            if s.proc is not None and not s.stopped and not s.alive()]
    for s in dead:
        pytest.fail("%s died during this test (exit status %s); log tail:\n%s"
                    % (s.name, s.proc.returncode, s.log_text()[-4000:]), pytrace=False)


def check_stopped(shim):
    """After stop(): SIGTERM must end imapshim with status 0 (DESIGN 3.6),
    it must have logged no broken invariant (IMAPSHIM_ASSERT), a
    sanitizer build must have reported nothing, and every line of its log
    must be logfmt (DESIGN 3.6: one key=value line per event)."""
    problems = []
    rc = getattr(shim, "returncode", None)
    if rc is not None and rc != 0:
        problems.append("exit status %s after SIGTERM (expected 0)" % rc)
    log = shim.log_text(this_run=True)
    m = re.search(r"^.*event=(assertion_failed|client_state_illegal) .*$", log, re.M)
    if m:
        problems.append("broken invariant: " + m.group(0))
    m = re.search(r"^.*(ERROR: \w+Sanitizer|runtime error:|SUMMARY: \w+Sanitizer).*$", log, re.M)
    if m:
        i = log.find(m.group(0))
        problems.append("sanitizer report:\n" + log[max(0, i - 1500):i + 4000])
    # Every line of every run is logfmt (harness.parse_log_line).
    bad = [ln for ln in shim.log_text().splitlines() if not harness.parse_log_line(ln)[1]]
    if bad:
        problems.append("%d log line(s) not logfmt, e.g.:\n%s" % (len(bad), "\n".join(bad[:5])))
    if problems:
        pytest.fail("%s (%s): %s" % (shim.name, shim.log_path, "\n".join(problems)),
                    pytrace=False)


@pytest.fixture(scope="session")
def imapshim_bin():
    b = harness.find_imapshim()
    if not b:
        pytest.skip("imapshim not built and $IMAPSHIM not set")
    if not os.access(b, os.X_OK):
        pytest.fail("$IMAPSHIM=%s is not an executable file" % b)
    return b


@pytest.fixture(scope="session")
def workdir():
    d = harness.make_tempdir()
    yield d
    if not os.environ.get("IMAPSHIM_KEEP_TMP"):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def pki(workdir):
    return harness.Pki(os.path.join(workdir, "pki"))


@pytest.fixture(scope="session")
def admins():
    """Two admin accounts.  NPUMAdmin2's password holds characters that must
    be quoted (", \\), a space and ini comment markers (; #)."""
    return {
        "NPUMAdmin1": "Adm1n-" + secrets.token_hex(12),
        "NPUMAdmin2": 'Q"uo\\te d;#' + secrets.token_hex(8),
    }


@pytest.fixture(scope="session")
def dovecot(workdir, pki, admins):
    dv = harness.Dovecot(os.path.join(workdir, "dovecot"), pki, admins).start()
    yield dv
    dv.stop()


class _ShimFactory:
    def __init__(self, binary, workdir, pki, admins):
        self.binary, self.workdir, self.pki, self.admins = binary, workdir, pki, admins
        self.started = []

    def __call__(self, upstream_port, config=None, admins=None, starttls=True, name=None,
                 start=True):
        name = name or "imapshim-%s" % secrets.token_hex(3)
        shim = harness.ImapShim(self.binary, os.path.join(self.workdir, "shims"), self.pki,
                                upstream_port, admins or self.admins, config=config,
                                starttls=starttls, name=name)
        self.started.append(shim)
        _ACTIVE["shims"].append(shim)
        if start:
            shim.start()
        return shim

    def stop_all(self):
        for s in self.started:
            s.stop()
        for s in self.started:
            check_stopped(s)


@pytest.fixture(scope="module")
def shim(imapshim_bin, workdir, pki, admins, dovecot):
    """imapshim with the default test configuration in front of Dovecot."""
    f = _ShimFactory(imapshim_bin, workdir, pki, admins)
    s = f(dovecot.port_imaps, config={"upstream": {"login_format": "{mailbox}*{admin}"}},
          name="imapshim-dovecot")
    yield s
    f.stop_all()


@pytest.fixture
def make_shim(imapshim_bin, workdir, pki, admins):
    f = _ShimFactory(imapshim_bin, workdir, pki, admins)
    yield f
    f.stop_all()


@pytest.fixture
def make_fake(pki, admins):
    started = []

    def factory(cert=None, **kw):
        kw.setdefault("admins", admins)
        fe = fake_exchange.FakeExchange(cert=cert or pki.server, **kw).start()
        started.append(fe)
        _ACTIVE["fakes"].append(fe)
        return fe
    yield factory
    for fe in started:
        fe.stop()
