#!/bin/sh
# run-pytest.sh TEST.py [PYTEST-ARGS...] - run one integration test module with
# Debian's pytest (extra arguments, e.g. -k NAME, go to pytest).
#
# Called by automake's test driver as "$(SHELL) run-pytest.sh path/to/test_x.py"
# with IMAPSHIM, PYTHON3 and top_srcdir in the environment.  Exits 77 (skip)
# only when a tool the tests need is not installed.
PATH="$PATH:/usr/sbin:/sbin"
export PATH

if ! command -v dovecot >/dev/null 2>&1; then
	echo "SKIP: dovecot is not installed (apt-get install dovecot-imapd)"
	exit 77
fi
if ! command -v openssl >/dev/null 2>&1; then
	echo "SKIP: the openssl command is not installed"
	exit 77
fi

# srcdir is read-only under distcheck: no .pyc files, no pytest cache.
PYTHONDONTWRITEBYTECODE=1
export PYTHONDONTWRITEBYTECODE

# A python3 without pytest (e.g. a pyenv one first on PATH): use Debian's.
py=${PYTHON3:-/usr/bin/python3}
if ! "$py" -c 'import pytest' >/dev/null 2>&1; then
	echo "note: $py has no pytest module; using /usr/bin/python3" >&2
	py=/usr/bin/python3
fi

exec "$py" -m pytest -q -p no:cacheprovider "$@"
