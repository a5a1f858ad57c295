#!/bin/bash
# contrib/test-package.sh - build the Debian package, install, upgrade and
# purge it, as a site would.
#
# As root on a Debian 12 machine (CI, a VM or a container) that does not
# have imapshim installed; it installs, upgrades and purges the real
# package:
#
#     sudo contrib/test-package.sh
#
# Steps: apt-get install the build dependencies (from debian/control),
# lintian and openssl; build the package three times in a scratch copy of
# this tree, as VERSION, VERSION+test1 and VERSION+test2 (each with a
# changed example ini); lintian (any error, warning or info fails);
# install VERSION: the imapshim user, /etc/imapshim 0700 and the ini 0600
# owned by imapshim, the service neither enabled nor started, "imapshim -t"
# on the installed example exits 1 naming exactly the three files a site
# must add; upgrade to +test1 with the ini untouched: dpkg installs the new
# example, still imapshim's, 0600; add a certificate, a password file and
# site settings: "-t" as imapshim exits 0, and the daemon (the unit under
# systemd, else the binary as imapshim) greets on loopback, answers
# imapshim-ctl on its console socket (imapshim's, mode 600) and stops;
# upgrade to +test2, keeping the changed ini (--force-confold, as an
# unattended upgrade would): the site's ini is kept byte for byte, the new
# example left as imapshim.ini.dpkg-dist; remove: configuration and user
# stay; purge: /etc/imapshim, /var/log/imapshim, the stat overrides, the
# user and the group are gone; install once more, delete /etc/imapshim and
# the user by hand, and purge still succeeds.
#
# Every command has a time limit; any daemon it started is stopped and the
# package purged on every exit path.  It installs no Dovecot and starts no
# system service but imapshim's own, briefly.  The last line is always
#
#     test-package: PASS (N s)       or       test-package: FAIL: WHAT (N s)
#
# Environment:
#   IMAPSHIM_SKIP_APT=1   do not run apt-get (dependencies already there)
#   IMAPSHIM_KEEP=1       keep the scratch directory (kept anyway on failure)
# (shellcheck cannot see that the trap calls finish and stop_daemon.)
# shellcheck disable=SC2317
set -uo pipefail

SRC=$(cd "$(dirname "$0")/.." && pwd)
START=$(date +%s)
W=
DAEMON_PID=
UNIT_STARTED=no
RUNDIR_MADE=no
PKG_TOUCHED=no
STEP="starting"

# What "-t" says about the example as shipped: it names a certificate, a
# key and a password file that a site has yet to create, and warns that one
# admin account cannot use its session_budget (README.Debian).
EXPECT_PRISTINE="[admin NPUMAdmin1] password_file: cannot read '/etc/imapshim/NPUMAdmin1.secret': No such file or directory
[pool] session_budget: session_budget 2048 is more than the admin accounts allow together (16); imapshim will use at most 16
[shim] tls_cert_file: cannot read '/etc/imapshim/tls/cert.pem': No such file or directory
[shim] tls_key_file: cannot read '/etc/imapshim/tls/key.pem': No such file or directory"

INI=/etc/imapshim/imapshim.ini
APT_OPTS=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300)

say() { printf '\n==> %s\n' "$*"; }
fail() { echo "test-package.sh: $*" >&2; STEP="$STEP: $*"; exit 1; }
elapsed() { echo $(($(date +%s) - START)); }
# A command with a time limit (seconds), its output shown.
t() { local s=$1; shift; timeout -k 10 "$s" "$@"; }
systemd_running() { [ -d /run/systemd/system ]; }
pkg_status() { dpkg-query -W -f='${db:Status-Status}' imapshim 2>/dev/null || echo not-installed; }
owner_mode() { stat -c '%U:%G %a' "$1"; }

stop_daemon() {
	if [ "$UNIT_STARTED" = yes ]; then
		t 90 systemctl stop imapshim.service || true
		UNIT_STARTED=no
	fi
	if [ -n "$DAEMON_PID" ]; then
		kill -TERM "$DAEMON_PID" 2>/dev/null
		for _ in $(seq 400); do
			kill -0 "$DAEMON_PID" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$DAEMON_PID" 2>/dev/null
		wait "$DAEMON_PID" 2>/dev/null
		DAEMON_PID=
	fi
}

finish() {
	local rc=$?
	set +e
	trap - EXIT INT TERM
	stop_daemon
	[ "$RUNDIR_MADE" = yes ] && rm -rf /run/imapshim
	# The package was not here before (checked below): leave none behind.
	if [ "$PKG_TOUCHED" = yes ]; then
		if [ "$(pkg_status)" != not-installed ]; then
			t 300 dpkg --purge imapshim >/dev/null 2>&1 ||
			    echo "test-package.sh: could not purge imapshim" >&2
		fi
		# Whatever a failed purge left: overrides before their user.
		for p in /etc/imapshim/imapshim.ini /etc/imapshim; do
			dpkg-statoverride --list "$p" >/dev/null 2>&1 &&
			    dpkg-statoverride --remove "$p" >/dev/null 2>&1
		done
		getent passwd imapshim >/dev/null && deluser --system --quiet imapshim >/dev/null 2>&1
		getent group imapshim >/dev/null && delgroup --system --quiet imapshim >/dev/null 2>&1
	fi
	if [ -n "$W" ]; then
		if [ "$rc" -eq 0 ] && [ "${IMAPSHIM_KEEP:-}" != 1 ]; then
			rm -rf "$W"
		else
			echo "test-package.sh: build logs and packages kept in $W" >&2
		fi
	fi
	if [ "$rc" -eq 0 ]; then
		echo "test-package: PASS ($(elapsed) s)"
	else
		echo "test-package: FAIL: $STEP ($(elapsed) s)"
	fi
	exit "$rc"
}
trap finish EXIT
trap 'STEP="$STEP (interrupted)"; exit 130' INT
trap 'STEP="$STEP (terminated)"; exit 143' TERM

# ------------------------------------------------------------ preconditions

STEP="preconditions"
[ "$(id -u)" -eq 0 ] || fail "must run as root (it installs and purges the package)"
[ -r /etc/debian_version ] || fail "not a Debian system"
# A machine with imapshim in use must not lose it to a purge.
if [ "$(pkg_status)" != not-installed ] || getent passwd imapshim >/dev/null ||
    getent group imapshim >/dev/null || [ -e /etc/imapshim ]; then
	fail "imapshim (package, user, group or /etc/imapshim) is already on this machine; run on a machine without it"
fi
if [ -f "$SRC/config.status" ]; then
	fail "the source tree itself is configured (config.status): run 'make distclean' there first"
fi

# ------------------------------------------------------------ dependencies

STEP="installing the build dependencies"
if [ "${IMAPSHIM_SKIP_APT:-}" = 1 ]; then
	say "IMAPSHIM_SKIP_APT=1: not installing packages"
else
	say "installing the build dependencies, lintian and openssl (apt-get)"
	export DEBIAN_FRONTEND=noninteractive
	t 600 apt-get update -q </dev/null || fail "apt-get update"
	t 900 apt-get install "${APT_OPTS[@]}" build-essential lintian openssl \
	    ca-certificates python3 </dev/null || fail "apt-get install"
	# The Build-Depends of debian/control, so this list cannot drift.
	t 900 apt-get build-dep "${APT_OPTS[@]}" "$SRC" </dev/null ||
	    fail "apt-get build-dep"
fi

# ------------------------------------------------------------ build

W=$(mktemp -d) || fail "mktemp"
# apt-get reads the local .debs as the _apt user.
chmod 755 "$W"
BASE_VERSION=$(cd "$SRC" && dpkg-parsechangelog -S Version) || fail "dpkg-parsechangelog"
V1=$BASE_VERSION V2=$BASE_VERSION+test1 V3=$BASE_VERSION+test2
ARCH=$(dpkg --print-architecture)

# A scratch copy of the tree: what git knows (tracked, and new files not
# ignored), or, outside git, everything but the build directories.
copy_tree() {
	local dest=$1
	mkdir -p "$dest"
	if [ -e "$SRC/.git" ] && command -v git >/dev/null; then
		(cd "$SRC" && git ls-files -z -co --exclude-standard |
		    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
		    tar --null -T - -cf -) | tar -C "$dest" -xf -
	else
		tar -C "$SRC" --exclude='./build*' --exclude=./autom4te.cache \
		    --exclude=./debian/build --exclude=./debian/imapshim \
		    --exclude=./debian/.debhelper -cf - . | tar -C "$dest" -xf -
	fi
}

# build VERSION: the package of this tree; a VERSION other than the
# changelog's gets its own changelog entry and a line added to the example
# ini (so dpkg sees a changed conffile).
build() {
	local v=$1 d=$W/$1/imapshim
	STEP="building $v"
	say "building imapshim $v"
	copy_tree "$d" || fail "copying the tree"
	if [ "$v" != "$BASE_VERSION" ]; then
		printf '; (test-package.sh: the example of version %s)\n' "$v" >>"$d/conf/imapshim.ini"
		{
			printf 'imapshim (%s) unstable; urgency=medium\n\n' "$v"
			printf '  * contrib/test-package.sh: an upgrade under test.\n\n'
			printf ' -- imapshim test <root@localhost>  %s\n\n' "$(date -R)"
			cat "$d/debian/changelog"
		} >"$d/debian/changelog.new" && mv "$d/debian/changelog.new" "$d/debian/changelog"
	fi
	(cd "$d" && DEB_BUILD_OPTIONS="parallel=$(nproc)" \
	    t 900 dpkg-buildpackage -us -uc -b) >"$W/build-$v.log" 2>&1 ||
	    { tail -40 "$W/build-$v.log"; fail "dpkg-buildpackage (log: $W/build-$v.log)"; }
	[ -f "$W/$v/imapshim_${v}_$ARCH.deb" ] || fail "no imapshim_${v}_$ARCH.deb"
	echo "built $W/$v/imapshim_${v}_$ARCH.deb"
}
build "$V1"
build "$V2"
build "$V3"
DEB1=$W/$V1/imapshim_${V1}_$ARCH.deb
DEB2=$W/$V2/imapshim_${V2}_$ARCH.deb
DEB3=$W/$V3/imapshim_${V3}_$ARCH.deb

STEP="lintian"
say "lintian"
t 300 lintian --pedantic --display-info --fail-on error,warning,info \
    "$W/$V1/imapshim_${V1}_${ARCH}.changes" || fail "lintian reports tags"

# ------------------------------------------------------------ install

install_deb() {	# install_deb DEB [dpkg options]: as a site would, with apt
	local deb=$1; shift
	local o opts=()
	for o in "$@"; do opts+=(-o "Dpkg::Options::=$o"); done
	PKG_TOUCHED=yes
	DEBIAN_FRONTEND=noninteractive t 300 apt-get install "${APT_OPTS[@]}" \
	    "${opts[@]}" "$deb" </dev/null
}

# check_t EXPECTED_STATUS: "imapshim -t" as the imapshim user, as the
# unit's ExecStartPre runs it; its output in $T_OUT.
check_t() {
	local rc
	# The open-file limit warning depends on the machine running this test
	# (a unit gets LimitNOFILE=65536), not on the package: left out.
	T_OUT=$(t 30 setpriv --reuid=imapshim --regid=imapshim --clear-groups \
	    /usr/sbin/imapshim -t -c "$INI" 2>&1)
	rc=$?
	T_OUT=$(printf '%s\n' "$T_OUT" | grep -v ': warning: the open-file limit is ' || true)
	printf '%s\n' "$T_OUT" | sed 's/^/  | /'
	[ "$rc" -eq "$1" ] || fail "imapshim -t exited $rc, not $1"
}

STEP="installing $V1"
say "installing $V1"
install_deb "$DEB1" || fail "apt-get install $DEB1"
[ "$(pkg_status)" = installed ] || fail "package state '$(pkg_status)'"
[ "$(/usr/sbin/imapshim -V)" = "imapshim $BASE_VERSION
features: systemd" ] ||
    fail "imapshim -V says '$(/usr/sbin/imapshim -V)', not 'imapshim $BASE_VERSION' with systemd (the unit is Type=notify)"
uid=$(id -u imapshim) || fail "no imapshim user"
[ "$uid" -lt 1000 ] || fail "imapshim is not a system user (uid $uid)"
[ "$(getent passwd imapshim | cut -d: -f7)" = /usr/sbin/nologin ] || fail "imapshim has a login shell"
[ "$(owner_mode /etc/imapshim)" = "imapshim:imapshim 700" ] || fail "/etc/imapshim is $(owner_mode /etc/imapshim)"
[ "$(owner_mode $INI)" = "imapshim:imapshim 600" ] || fail "$INI is $(owner_mode $INI)"
for f in /usr/bin/imapshim-top /usr/sbin/imapshim-ctl \
    /usr/share/man/man8/imapshim-ctl.8.gz /usr/share/imapshim/exchange-log-summary \
    /lib/systemd/system/imapshim.service /etc/logrotate.d/imapshim \
    /usr/share/man/man8/imapshim.8.gz /usr/share/man/man5/imapshim.ini.5.gz \
    /usr/share/man/man1/imapshim-top.1.gz; do
	[ -e "$f" ] || fail "$f not installed"
done
/usr/bin/imapshim-top --help >/dev/null || fail "imapshim-top --help"
# No daemon at that socket: exit 2 (cannot talk to it), with the reason.
ctl_err=$(/usr/sbin/imapshim-ctl -s /nonexistent/control show stats 2>&1); rc=$?
[ "$rc" -eq 2 ] || fail "imapshim-ctl without a daemon exited $rc, not 2"
case $ctl_err in *"cannot connect to /nonexistent/control"*) ;;
*) fail "imapshim-ctl without a daemon said: $ctl_err" ;; esac
# Not started and not enabled: the example cannot run (see README.Debian).
if systemd_running; then
	[ "$(systemctl is-enabled imapshim.service)" = disabled ] || fail "the unit is enabled"
	systemctl is-active --quiet imapshim.service && fail "the unit was started"
fi
pgrep -u imapshim >/dev/null && fail "a process runs as imapshim after the install"

STEP="imapshim -t on the shipped example"
say "imapshim -t on the installed example (exit 1, three files to add)"
check_t 1
got=$(printf '%s\n' "$T_OUT" | sed "s|^$INI:[0-9]*: ||" | LC_ALL=C sort)
if [ "$got" != "$EXPECT_PRISTINE" ]; then
	diff <(printf '%s\n' "$EXPECT_PRISTINE") <(printf '%s\n' "$got") | sed 's/^/  expected(<) got(>) /'
	fail "imapshim -t on the example said something else (README.Debian documents it)"
fi

# ------------------------------------------------------------ upgrade, ini untouched

STEP="upgrading to $V2 (ini untouched)"
say "upgrading to $V2 with the ini untouched: dpkg installs the new example"
install_deb "$DEB2" || fail "apt-get install $DEB2"
grep -qF "example of version $V2" "$INI" || fail "the new example was not installed"
[ "$(owner_mode $INI)" = "imapshim:imapshim 600" ] || fail "the new $INI is $(owner_mode $INI)"
ls /etc/imapshim/*.dpkg-* 2>/dev/null && fail "dpkg left copies of an untouched ini"

# ------------------------------------------------------------ a site's configuration

STEP="configuring as a site"
say "adding a certificate, a password file and site settings"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
P_TLS=$(free_port) P_STATUS=$(free_port) P_UP=$(free_port)
install -d -m 700 -o imapshim -g imapshim /etc/imapshim/tls || fail "creating /etc/imapshim/tls"
(umask 077
 t 60 openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=localhost \
     -keyout /etc/imapshim/tls/key.pem -out /etc/imapshim/tls/cert.pem 2>/dev/null &&
 printf 'not-a-real-password\n' >/etc/imapshim/NPUMAdmin1.secret) || fail "creating the site's files"
chown imapshim:imapshim /etc/imapshim/tls/key.pem /etc/imapshim/tls/cert.pem \
    /etc/imapshim/NPUMAdmin1.secret || fail "chown of the site's files"
# The site's changes, written into the file in place (owner and mode stay).
# Loopback only: nothing listens on the upstream port, no client logs in.
site_ini=$(sed -e "s|^listen = .*|listen = 127.0.0.1:$P_TLS|" \
    -e "s|^status_listen = .*|status_listen = 127.0.0.1:$P_STATUS|" \
    -e "s|^servers = .*|servers = 127.0.0.1:$P_UP|" \
    -e "s|^drain_timeout = .*|drain_timeout = 5s|" \
    -e "s|^session_budget = .*|session_budget = 16|" "$INI") || fail "reading $INI"
printf '%s\n; changed by the site\n' "$site_ini" >"$INI" || fail "writing $INI"
cp -p "$INI" "$W/site.ini" || fail "saving $INI"
check_t 0
[ "$T_OUT" = "$INI: configuration is valid" ] || fail "imapshim -t said something else"

STEP="running the installed daemon"
# The daemon greets on its TLS port and answers /status.
probe() {
	t 60 python3 - "$P_TLS" "$P_STATUS" "$1" <<'EOF'
import socket, ssl, sys, time, urllib.request
tls_port, status_port, deadline = int(sys.argv[1]), int(sys.argv[2]), time.time() + 30
ctx = ssl.create_default_context()
ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
while True:
    try:
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                greeting = s.recv(4096).decode("ascii", "replace").strip()
        body = urllib.request.urlopen("http://127.0.0.1:%d/status" % status_port,
                                      timeout=5).read()
        break
    except OSError as e:
        if time.time() > deadline:
            sys.exit("no answer from the daemon: %s" % e)
        time.sleep(0.2)
print("  greeting: " + greeting)
sys.exit(0 if greeting.startswith("* OK") and body.lstrip().startswith(b"{") else
         "unexpected greeting or /status")
EOF
}
# The operator's console as root (the default control_socket): the socket is
# the imapshim user's, mode 600, and "show status" answers the /status JSON.
console() {
	[ "$(owner_mode /run/imapshim/control)" = "imapshim:imapshim 600" ] ||
	    { echo "control socket: $(owner_mode /run/imapshim/control)"; return 1; }
	out=$(t 30 /usr/sbin/imapshim-ctl show status) || return 1
	case $out in "{"*'"budget"'*) echo "  imapshim-ctl show status: ok" ;; *) return 1 ;; esac
	t 30 /usr/sbin/imapshim-ctl kick client 1 >/dev/null 2>&1
	[ $? -eq 1 ] || { echo "kick of no client did not exit 1"; return 1; }
}
if systemd_running; then
	say "starting imapshim.service on 127.0.0.1:$P_TLS"
	UNIT_STARTED=yes
	t 90 systemctl start imapshim.service || fail "systemctl start imapshim"
	probe unit || fail "the unit's daemon does not answer"
	console || fail "the unit's daemon's console does not answer"
	t 90 systemctl stop imapshim.service || fail "systemctl stop imapshim"
	UNIT_STARTED=no
	systemctl is-active --quiet imapshim.service && fail "the unit still runs"
else
	say "no systemd: running /usr/sbin/imapshim as imapshim on 127.0.0.1:$P_TLS"
	# The console's directory, as the unit's RuntimeDirectory= makes it.
	RUNDIR_MADE=yes
	install -d -m 750 -o imapshim -g imapshim /run/imapshim || fail "creating /run/imapshim"
	setpriv --reuid=imapshim --regid=imapshim --clear-groups \
	    /usr/sbin/imapshim -c "$INI" >"$W/daemon.log" 2>&1 &
	DAEMON_PID=$!
	probe direct || { cat "$W/daemon.log"; fail "the daemon does not answer"; }
	console || { cat "$W/daemon.log"; fail "the daemon's console does not answer"; }
	kill -TERM "$DAEMON_PID"
	for _ in $(seq 300); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
	kill -0 "$DAEMON_PID" 2>/dev/null && fail "the daemon did not stop on SIGTERM within 30 s"
	wait "$DAEMON_PID"; rc=$?
	DAEMON_PID=
	[ "$rc" -eq 0 ] || { cat "$W/daemon.log"; fail "the daemon exited $rc on SIGTERM"; }
	[ ! -e /run/imapshim/control ] || fail "the daemon left its console socket behind"
	rmdir /run/imapshim && RUNDIR_MADE=no
fi
pgrep -u imapshim >/dev/null && fail "a process still runs as imapshim"

# ------------------------------------------------------------ upgrade, ini changed

STEP="upgrading to $V3 (ini changed by the site)"
say "upgrading to $V3 with the site's ini: kept, the new example beside it"
install_deb "$DEB3" --force-confdef --force-confold || fail "apt-get install $DEB3"
[ "$(pkg_status)" = installed ] || fail "package state '$(pkg_status)'"
cmp "$INI" "$W/site.ini" || fail "the site's ini was not kept"
[ "$(owner_mode $INI)" = "imapshim:imapshim 600" ] || fail "$INI is $(owner_mode $INI) after the upgrade"
grep -qF "example of version $V3" "$INI.dpkg-dist" || fail "no new example in $INI.dpkg-dist"
{ [ -s /etc/imapshim/NPUMAdmin1.secret ] && [ -s /etc/imapshim/tls/key.pem ]; } ||
    fail "site files lost"
check_t 0

# ------------------------------------------------------------ remove, purge

STEP="removing"
say "remove: the configuration and the user stay"
t 300 apt-get remove "${APT_OPTS[@]}" imapshim </dev/null || fail "apt-get remove"
[ "$(pkg_status)" = config-files ] || fail "package state '$(pkg_status)' after remove"
[ ! -e /usr/sbin/imapshim ] || fail "/usr/sbin/imapshim still there"
cmp "$INI" "$W/site.ini" || fail "remove changed the site's ini"
[ -s /etc/imapshim/NPUMAdmin1.secret ] || fail "remove deleted the password file"
getent passwd imapshim >/dev/null || fail "remove deleted the user"

check_purged() {
	[ "$(pkg_status)" = not-installed ] || fail "package state '$(pkg_status)' after purge"
	[ ! -e /etc/imapshim ] || fail "/etc/imapshim is still there"
	[ ! -e /var/log/imapshim ] || fail "/var/log/imapshim is still there"
	! getent passwd imapshim >/dev/null || fail "the user imapshim is still there"
	! getent group imapshim >/dev/null || fail "the group imapshim is still there"
	for p in /etc/imapshim /etc/imapshim/imapshim.ini; do
		! dpkg-statoverride --list "$p" >/dev/null 2>&1 || fail "a stat override for $p is left"
	done
}

STEP="purging"
say "purge: /etc/imapshim, the logs, the overrides and the user go"
mkdir -p /var/log/imapshim && chown imapshim: /var/log/imapshim	# as LogsDirectory= leaves it
t 300 apt-get purge "${APT_OPTS[@]}" imapshim </dev/null || fail "apt-get purge"
check_purged

STEP="purging what is already gone"
say "install, delete /etc/imapshim and the user by hand, purge"
install_deb "$DEB3" || fail "apt-get install $DEB3 again"
rm -rf /etc/imapshim
deluser --system --quiet imapshim >/dev/null 2>&1
getent group imapshim >/dev/null && delgroup --system --quiet imapshim >/dev/null 2>&1
t 300 apt-get purge "${APT_OPTS[@]}" imapshim </dev/null || fail "apt-get purge"
check_purged

STEP="done"
exit 0
