#!/bin/bash
# run-fuzz.sh - build and run imapshim's libFuzzer harnesses.
#
# usage: tests/fuzz/run-fuzz.sh [-o CRASH_DIR] [-t SECONDS] [HARNESS...]
#
#   HARNESS      command response login config resync (default: all)
#   -t SECONDS   time per harness (default $FUZZ_SECONDS, else 60); 0 only
#                replays the checked-in corpus (a regression test: every
#                file in tests/fuzz/corpus/HARNESS/, crash reproducers
#                included, must run clean)
#   -o DIR       where crash inputs are saved (default $FUZZ_CRASH_DIR,
#                else ./fuzz-crashes); created only when something crashed
#
# Each harness is built with
#   ${CC:-clang} -g -O1 -fsanitize=fuzzer,address,undefined -Isrc ...
# from the src/*.c files it needs, in a temporary directory.  The seed
# corpus is copied there too: nothing is ever written into the source tree.
# Prints one line per harness ("fuzz_X: N executions, M crashes") and exits
# 1 when any harness crashed, 2 when one could not be built, else 0.
# A harness whose sources are missing (resync.c before it lands) is skipped.
#
# A crash input becomes a regression test by copying it into
# tests/fuzz/corpus/HARNESS/ (named crash-<what>); `-t 0` replays it.
#
# Environment: CC, FUZZ_SECONDS, FUZZ_CRASH_DIR, FUZZ_CFLAGS (extra flags),
# FUZZ_KEEP=1 keeps the working directory.
set -u

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
src=$top/src
corpus=$here/corpus
CC=${CC:-clang}
secs=${FUZZ_SECONDS:-60}
out=${FUZZ_CRASH_DIR:-$PWD/fuzz-crashes}

while getopts "o:t:h" opt; do
	case $opt in
	o) out=$OPTARG ;;
	t) secs=$OPTARG ;;
	h) sed -n '2,/^set -u/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
	*) exit 2 ;;
	esac
done
shift $((OPTIND - 1))
harnesses=${*:-command response login config resync}
case $secs in ''|*[!0-9]*) echo "run-fuzz.sh: bad seconds '$secs'" >&2; exit 2 ;; esac
case $out in /*) ;; *) out=$PWD/$out ;; esac

if ! command -v "$CC" >/dev/null 2>&1; then
	echo "run-fuzz.sh: $CC not found (apt-get install clang libclang-rt-14-dev)" >&2
	exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/imapshim-fuzz.XXXXXX") || exit 2
if [ "${FUZZ_KEEP:-0}" = 1 ]; then
	echo "run-fuzz.sh: working directory $work (kept)"
else
	trap 'rm -rf "$work"' EXIT
fi

# Sources and libraries per harness.
srcs_for() {
	case $1 in
	command|response) echo "imap_parse.c" ;;
	login) echo "auth.c imap_parse.c util.c log.c" ;;
	config) echo "config.c addr.c util.c log.c auth.c imap_parse.c" ;;
	resync) echo "resync.c" ;;
	*) return 1 ;;
	esac
}
libs_for() {
	case $1 in
	login) echo "-levent -lcrypto" ;;
	config) echo "-linih -levent -lssl -lcrypto" ;;
	esac
}

# A dictionary of the config keys, section names and values, taken from the
# loader's own key table, so that the fuzzer reaches the setters quickly.
make_config_dict() {
	{
		grep -o '"[a-z_][a-z_]*"' "$src/config.c" | sort -u | sed 's/^/kw=/'
		for w in '[shim]' '[upstream]' '[pool]' '[retry]' '[admin ' \
		    ' = ' ' ; ' '\x0a  ' '{domain}' '{admin}' '{mailbox}' \
		    '127.0.0.1:993' '[::1]:993' '10s' '250ms' '5m' '1h' '64k' \
		    '4G' 'yes' 'no' 'implicit' 'starttls' 'none' 'session' \
		    'multiplex' 'debug' '0.0.0.0/0' '::/0'; do
			printf 'kw="%s"\n' "$w"
		done
	} > "$1"
}

status=0
summary=""
for h in $harnesses; do
	name=fuzz_$h
	if ! srcs=$(srcs_for "$h"); then
		echo "run-fuzz.sh: unknown harness '$h'" >&2
		status=2
		continue
	fi
	files="$here/$name.c"
	missing=""
	for s in $srcs; do
		[ -f "$src/$s" ] || missing="$missing src/$s"
		files="$files $src/$s"
	done
	if [ -n "$missing" ]; then
		line="$name: skipped (missing$missing)"
		echo "$line"
		summary="$summary$line
"
		continue
	fi
	# shellcheck disable=SC2046,SC2086
	if ! "$CC" -g -O1 -std=c11 -D_GNU_SOURCE \
	    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	    -I"$src" ${FUZZ_CFLAGS:-} $files $(libs_for "$h") \
	    -o "$work/$name" >"$work/$name.build.log" 2>&1; then
		cat "$work/$name.build.log" >&2
		line="$name: BUILD FAILED"
		echo "$line"
		summary="$summary$line
"
		status=2
		continue
	fi

	mkdir -p "$work/$h/corpus" "$work/$h/artifacts"
	if [ -d "$corpus/$h" ]; then
		cp -p "$corpus/$h"/* "$work/$h/corpus/" 2>/dev/null
	fi
	dict=""
	if [ "$h" = config ]; then
		make_config_dict "$work/config.dict"
		dict="-dict=$work/config.dict"
	fi
	log=$work/$h/fuzz.log
	export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}"
	export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
	if [ "$secs" -eq 0 ]; then
		# Replay only: every checked-in input, one run each.
		set -- "$work/$h/corpus"/*
		if [ -e "$1" ]; then
			"$work/$name" -artifact_prefix="$work/$h/artifacts/" \
			    "$@" >"$log" 2>&1
			rc=$?
		else
			rc=0
			: >"$log"
		fi
		execs=$(grep -c '^Executed ' "$log")
	else
		# shellcheck disable=SC2086
		"$work/$name" -max_total_time="$secs" -timeout=10 \
		    -rss_limit_mb=2048 -max_len=16384 -print_final_stats=1 \
		    -artifact_prefix="$work/$h/artifacts/" $dict \
		    "$work/$h/corpus" >"$log" 2>&1
		rc=$?
		execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
	fi
	crashes=$(find "$work/$h/artifacts" -type f | wc -l)
	if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then
		crashes=1	# died without an artifact (e.g. OOM in the harness)
	fi
	line="$name: ${execs:-0} executions, $crashes crashes"
	echo "$line"
	summary="$summary$line
"
	if [ "$crashes" -gt 0 ]; then
		status=1
		mkdir -p "$out/$h"
		cp -p "$work/$h/artifacts"/* "$out/$h/" 2>/dev/null
		cp -p "$log" "$out/$h/$name.log"
		grep -E 'property failed|ERROR: |runtime error|SUMMARY' "$log" | head -5 | sed 's/^/    /'
		echo "    inputs and log saved in $out/$h/"
	fi
done

exit $status
