#!/bin/bash
# contrib/demo.sh - install, build, and run the imapshim demo.
#
#     sudo contrib/demo.sh [demo.py options, e.g. --mailboxes 500 --poll 5]
#
# Installs the same Debian 12 packages as contrib/test.sh (skip that with
# IMAPSHIM_SKIP_APT=1), builds imapshim in build/ if needed, then runs
# contrib/demo.py: a private Dovecot standing in for Exchange (with master
# users NPUMAdmin1 and NPUMAdmin2), imapshim in front of it in multiplex
# mode with session_budget = 16 and max_sessions = 8 per admin account, and
# 300 simulated voice mailboxes that each keep a session and poll their
# INBOX, while voice messages are delivered straight to "Exchange".  A live
# view of imapshim's /status refreshes every second.  Everything runs on
# 127.0.0.1 with free ports and a temporary directory that is removed at the
# end.  It stops by itself after about a minute, or on Ctrl-C, and prints a
# summary.
set -euo pipefail

cd "$(dirname "$0")/.."

bash contrib/test.sh --install-only

if [ ! -f build/Makefile ]; then
	if [ -f config.status ]; then
		echo "contrib/demo.sh: the source tree itself is configured;" \
		    "run 'make distclean' here first (builds go to build/)" >&2
		exit 1
	fi
	printf '\n==> autoreconf -fi and configure in build/\n'
	autoreconf -fi
	mkdir -p build
	(cd build && PYTHON3=/usr/bin/python3 ../configure)
fi
printf '\n==> make in build/\n'
make -C build -j2

printf '\n==> running contrib/demo.py\n\n'
IMAPSHIM=$(pwd)/build/src/imapshim
export IMAPSHIM
# Debian's python3: the harness needs nothing else, and a python3 earlier on
# PATH (pyenv) may not be the system's.
exec /usr/bin/python3 contrib/demo.py "$@"
