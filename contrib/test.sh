#!/bin/bash
# contrib/test.sh - install what imapshim needs, build it, pass every test.
#
# This is the README's test command and what CI runs (.ci/run).  Made for a
# fresh Debian 12 machine:
#
#     sudo contrib/test.sh
#
# Steps: apt-get install the build and test dependencies; autoreconf; build
# (with libsystemd) and "make check" in build/; "make install" into a
# scratch directory; the same tests with AddressSanitizer and UBSan in
# build-asan/ (without libsystemd); every libFuzzer harness for a short
# while (ASan+UBSan); the functional integration suites once more with the
# daemon under valgrind memcheck (any error fails the run); "make distcheck"
# in build/; as root, contrib/test-package.sh (build, install, upgrade and
# purge the .deb).
# On a failure it prints the failing tests' logs and exits non-zero.  The
# last line of output is always one summary line of the automake test
# results of build/ and build-asan/:
#
#     N passed, N failed, N skipped
#
# Environment:
#   IMAPSHIM_SKIP_APT=1    do not run apt-get (dependencies already there)
#   IMAPSHIM_ALLOW_SKIP=1  with CI set, do not count skipped tests as failure
#   CI                     set by CI; a skipped test then fails the run
#                          (every dependency is installed, so a skip means
#                          something is broken)
#
# Options:
#   --install-only         install the dependencies and stop (contrib/demo.sh)
set -euo pipefail

cd "$(dirname "$0")/.."

PACKAGES="build-essential autoconf automake pkg-config libevent-dev libssl-dev
libinih-dev libsystemd-dev libcmocka-dev dovecot-imapd openssl python3 python3-pytest
valgrind clang libclang-rt-14-dev
ca-certificates"

# Debian's pytest; a pyenv python3 first on PATH may lack it.  configure
# looks in /usr/bin first too, this makes sure nothing overrides it.
PYTHON3=/usr/bin/python3
export PYTHON3

install_only=no
for arg in "$@"; do
	case $arg in
	--install-only) install_only=yes ;;
	-h|--help) sed -n '2,/^#   --install-only/p' "$0"; exit 0 ;;
	*) echo "contrib/test.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
	esac
done

say() { printf '\n==> %s\n' "$*"; }

# ------------------------------------------------------------ dependencies

# The policy-rc.d we put in place (if any), removed on every exit path.
OUR_POLICY=

install_deps() {
	local sudo=
	if [ "${IMAPSHIM_SKIP_APT:-}" = 1 ]; then
		say "IMAPSHIM_SKIP_APT=1: not installing packages"
		return 0
	fi
	if [ "$(id -u)" -ne 0 ]; then
		if command -v sudo >/dev/null 2>&1; then
			sudo=sudo
		else
			echo "contrib/test.sh: need root (or sudo) for apt-get;" \
			    "or set IMAPSHIM_SKIP_APT=1 if the packages are installed" >&2
			return 1
		fi
	fi
	say "installing packages (apt-get)"
	# Installing dovecot-imapd makes its postinst start the system Dovecot
	# (on 143/993).  The tests run their own private Dovecot on free ports
	# and do not need it; where it cannot start (a container without an
	# init system, ports taken) the failed start would fail the install.
	# So, unless the machine already has a policy, deny service starts
	# for the duration of this install only ("exit 101", see invoke-rc.d(8)).
	if [ ! -e /usr/sbin/policy-rc.d ]; then
		printf '#!/bin/sh\n# temporary, from imapshim contrib/test.sh\nexit 101\n' |
		    $sudo tee /usr/sbin/policy-rc.d >/dev/null
		$sudo chmod 755 /usr/sbin/policy-rc.d
		OUR_POLICY=/usr/sbin/policy-rc.d
	fi
	# shellcheck disable=SC2086
	$sudo env DEBIAN_FRONTEND=noninteractive apt-get update </dev/null
	# shellcheck disable=SC2086
	$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y \
	    --no-install-recommends $PACKAGES </dev/null
	remove_policy
}

remove_policy() {
	if [ -n "$OUR_POLICY" ]; then
		if [ "$(id -u)" -eq 0 ]; then rm -f "$OUR_POLICY"; else sudo rm -f "$OUR_POLICY"; fi
		OUR_POLICY=
	fi
}

# ---------------------------------------------------------------- results

# Every automake test result of build/ and build-asan/ (not distcheck's
# throwaway tree inside build/).
result_files() {
	local d
	for d in build build-asan; do
		[ -d "$d" ] || continue
		find "$d" -name '*.trs' -not -path "$d/imapshim-*" -print
	done
}

summary() {
	local pass=0 fail=0 skip=0 f res
	while IFS= read -r f; do
		while IFS= read -r res; do
			case $res in
			PASS|XFAIL) pass=$((pass + 1)) ;;
			SKIP) skip=$((skip + 1)) ;;
			*) fail=$((fail + 1)) ;;	# FAIL, XPASS, ERROR
			esac
		done < <(sed -n 's/^:test-result: *\([A-Z]*\).*/\1/p' "$f")
	done < <(result_files)
	SUM_PASS=$pass SUM_FAIL=$fail SUM_SKIP=$skip
}

# The .log of every test that did not pass, anywhere under the build trees
# (distcheck's tree included: it is kept when its check fails).
print_failed_logs() {
	local d trs log
	for d in build build-asan; do
		[ -d "$d" ] || continue
		while IFS= read -r trs; do
			if grep -Eq '^:test-result: *(FAIL|XPASS|ERROR)' "$trs"; then
				log=${trs%.trs}.log
				printf '\n---------- %s ----------\n' "$log"
				# Indented, so no line of a log can pass for the
				# summary line CI reads.
				if [ -f "$log" ]; then sed 's/^/  | /' "$log"; else echo "  (no log file)"; fi
			fi
		done < <(find "$d" -name '*.trs' -print | sort)
	done
}

STEP="starting"
finish() {
	local rc=$?
	set +e
	remove_policy
	if [ "$install_only" = yes ]; then
		return
	fi
	summary
	if [ "$rc" -eq 0 ] && [ -n "${CI:-}" ] && [ "${CI:-}" != false ] &&
	    [ "$SUM_SKIP" -gt 0 ] && [ "${IMAPSHIM_ALLOW_SKIP:-}" != 1 ]; then
		echo
		echo "contrib/test.sh: $SUM_SKIP test(s) skipped under CI; every" \
		    "dependency is installed, so that is a failure" \
		    "(IMAPSHIM_ALLOW_SKIP=1 accepts it)." >&2
		result_files | while IFS= read -r f; do
			grep -q '^:test-result: *SKIP' "$f" && echo "  skipped: ${f%.trs}.log"
		done
		rc=1
	fi
	if [ "$rc" -ne 0 ]; then
		print_failed_logs
		echo
		echo "contrib/test.sh: FAILED during: $STEP (exit status $rc)" >&2
	else
		echo
		echo "contrib/test.sh: all steps passed"
	fi
	if [ "$SUM_SKIP" -gt 0 ]; then
		printf '%d passed, %d failed, %d skipped\n' "$SUM_PASS" "$SUM_FAIL" "$SUM_SKIP"
	else
		printf '%d passed, %d failed\n' "$SUM_PASS" "$SUM_FAIL"
	fi
	exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------------------------- steps

STEP="installing packages"
install_deps
if [ "$install_only" = yes ]; then
	exit 0
fi

if [ -f config.status ]; then
	echo "contrib/test.sh: the source tree itself is configured (config.status);" \
	    "builds go to build/ and build-asan/: run 'make distclean' here first" >&2
	exit 1
fi

# Results of an earlier run must not be counted again.
for d in build build-asan; do
	[ -d "$d" ] && find "$d" \( -name '*.trs' -o -name 'test-suite.log' \) -delete
done

STEP="autoreconf"
say "autoreconf -fi"
autoreconf -fi

STEP="build (build/)"
say "configure and build in build/"
mkdir -p build
(cd build && ../configure --with-systemd && make -j2)

STEP="make check (build/)"
say "make check in build/"
(cd build && make -j2 check)

STEP="make install (build/)"
say "make install DESTDIR=... in build/"
dest=$(mktemp -d)
(cd build && make install DESTDIR="$dest" >/dev/null)
for f in sbin/imapshim sbin/imapshim-ctl bin/imapshim-top share/man/man8/imapshim.8 \
    share/man/man8/imapshim-ctl.8 share/man/man5/imapshim.ini.5 etc/imapshim/imapshim.ini.example \
    lib/systemd/system/imapshim.service etc/logrotate.d/imapshim; do
	if [ ! -e "$dest/usr/local/$f" ]; then
		echo "make install did not install $f" >&2
		exit 1
	fi
done
rm -rf "$dest"

STEP="sanitizer build and check (build-asan/)"
say "configure --enable-sanitizers --without-systemd and make check in build-asan/"
mkdir -p build-asan
# build/ is configured --with-systemd; this one without, so both variants
# are built and tested (test_notify.py checks each; valgrind below runs it
# on build/'s).
(
	export ASAN_OPTIONS=detect_leaks=1
	export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
	cd build-asan && ../configure --enable-sanitizers --without-systemd &&
	    make -j2 check
)

STEP="fuzzing (tests/fuzz)"
say "libFuzzer harnesses, ${FUZZ_SECONDS:-20} s each"
FUZZ_SECONDS=${FUZZ_SECONDS:-20} bash tests/fuzz/run-fuzz.sh

STEP="valgrind memcheck (integration)"
say "integration suites with imapshim under valgrind"
vg=$(mktemp -d)
mkdir "$vg/logs"
# Valgrind writes to a file of its own, one per process named after the
# test that started it, so the daemon's log stays logfmt.  Any memcheck
# error or definite leak counts in that file's ERROR SUMMARY, and makes the
# daemon exit 99, which the harness reports as a failed test (it expects
# exit status 0 on SIGTERM); one whose exit status no test checks is caught
# by the file alone (a process killed outright writes no summary).
{
	printf "#!/bin/sh\nlogs='%s'\nbin='%s'\n" "$vg/logs" "$PWD/build/src/imapshim"
	cat <<'EOF'
tag=$(printf '%s' "${PYTEST_CURRENT_TEST:-imapshim}" | tr -c 'A-Za-z0-9_.-' _)
exec valgrind --log-file="$logs/$tag.%p" --error-exitcode=99 --leak-check=full \
    --errors-for-leak-kinds=definite --show-leak-kinds=definite "$bin" "$@"
EOF
} >"$vg/imapshim"
chmod +x "$vg/imapshim"
# The tests find imapshim-ctl beside the daemon.
ln -s "$PWD/build/src/imapshim-ctl" "$vg/imapshim-ctl"
# Tests of sub-second timeouts measure time, which valgrind stretches.
for t in test_proxy test_pool test_protolog test_status test_ops test_notify test_console; do
	rc=0
	IMAPSHIM="$vg/imapshim" PYTHON3=/usr/bin/python3 \
	    PYTEST_ADDOPTS="-k 'not login_timeout and not idle_timeout and not second_sigterm and not pacing'" \
	    bash tests/integration/run-pytest.sh "tests/integration/$t.py" || rc=$?
	bad=$(grep -l -E '^==[0-9]+== ERROR SUMMARY: [1-9]' "$vg"/logs/* 2>/dev/null || true)
	for f in $bad; do
		printf '\n---------- valgrind: %s ----------\n' "${f##*/}"
		sed 's/^/  | /' "$f"
	done
	if [ -n "$bad" ]; then
		echo "contrib/test.sh: valgrind found errors under $t.py" >&2
		exit 1
	fi
	[ "$rc" -eq 0 ] || exit "$rc"
done
rm -rf "$vg"

STEP="make distcheck (build/)"
say "make distcheck in build/"
unset DISTCHECK_CONFIGURE_FLAGS
(cd build && make distcheck)

STEP="Debian package (contrib/test-package.sh)"
if [ "$(id -u)" -eq 0 ] && command -v dpkg-deb >/dev/null 2>&1; then
	say "build, install, upgrade and purge the Debian package"
	bash contrib/test-package.sh
elif [ -n "${CI:-}" ] && [ "${CI:-}" != false ]; then
	echo "contrib/test.sh: the package test needs root on Debian" >&2
	exit 1
else
	say "not root (or no dpkg): the Debian package test is left out"
fi

STEP="done"
# finish (the EXIT trap) prints the summary line.
