/* test_log.c - log line format, levels, value quoting, journal priority,
 * file reopen. */
#include <ctype.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "log.h"

struct log_fixture {
	char dir[64];
	char path[128];
};

static int
setup(void **state)
{
	struct log_fixture *f = calloc(1, sizeof(*f));
	char err[256];

	assert_non_null(f);
	snprintf(f->dir, sizeof(f->dir), "/tmp/test_log.XXXXXX");
	assert_non_null(mkdtemp(f->dir));
	snprintf(f->path, sizeof(f->path), "%s/imapshim.log", f->dir);
	assert_int_equal(log_open(f->path, err, sizeof(err)), 0);
	log_set_level(LOG_LVL_INFO);
	*state = f;
	return 0;
}

static int
teardown(void **state)
{
	struct log_fixture *f = *state;
	char p[160];

	log_close();
	unlink(f->path);
	snprintf(p, sizeof(p), "%s.1", f->path);
	unlink(p);
	rmdir(f->dir);
	free(f);
	return 0;
}

/* Whole content of path into a malloc'd NUL-terminated buffer. */
static char *
slurp(const char *path, size_t *len_r)
{
	FILE *fp = fopen(path, "r");
	char *buf;
	size_t n;

	assert_non_null(fp);
	buf = malloc(65536);
	assert_non_null(buf);
	n = fread(buf, 1, 65535, fp);
	buf[n] = '\0';
	fclose(fp);
	if (len_r != NULL)
		*len_r = n;
	return buf;
}

static size_t
count_lines(const char *s)
{
	size_t n = 0;

	for (; *s != '\0'; s++)
		if (*s == '\n')
			n++;
	return n;
}

/*
 * The text of one line after its head is logfmt: key=value pairs split by
 * one space, a value bare (no space, quote or '=') or "quoted" with only
 * \" \\ \xNN escapes.  Mirrors tests/integration/harness.py's parser.
 */
static void
assert_logfmt(const char *s)
{
	const char *k;

	for (;;) {
		k = s;
		while (isalnum((unsigned char)*s) || *s == '_')
			s++;
		assert_true(s > k);
		assert_int_equal(*s++, '=');
		if (*s == '"') {
			for (s++; *s != '"'; s++) {
				assert_true(*s != '\0' && *s != '\n');
				assert_true((unsigned char)*s >= 0x20);
				if (*s != '\\')
					continue;
				s++;
				if (*s == 'x') {
					assert_true(isxdigit((unsigned char)s[1]));
					assert_true(isxdigit((unsigned char)s[2]));
					s += 2;
				} else {
					assert_true(*s == '"' || *s == '\\');
				}
			}
			s++;
		} else {
			while (*s > ' ' && *s != '"' && *s != '=' &&
			    (unsigned char)*s < 0x7f)
				s++;
		}
		if (*s == '\n' || *s == '\0')
			return;
		assert_int_equal(*s++, ' ');
	}
}

/* "2026-11-27T21:30:00.123Z " */
static void
assert_timestamp(const char *s)
{
	static const char pat[] = "dddd-dd-ddTdd:dd:dd.dddZ ";
	size_t i;

	for (i = 0; pat[i] != '\0'; i++) {
		if (pat[i] == 'd')
			assert_true(isdigit((unsigned char)s[i]));
		else
			assert_int_equal(s[i], pat[i]);
	}
}

/* Runs first: before any log_open, lines go to stderr at level info. */
static void
test_default_stderr(void **state)
{
	char path[] = "/tmp/test_log_stderr.XXXXXX";
	char *buf;
	int fd, saved;

	(void)state;
	assert_true(log_enabled(LOG_LVL_INFO));
	assert_false(log_enabled(LOG_LVL_DEBUG));
	fd = mkstemp(path);
	assert_true(fd != -1);
	saved = dup(STDERR_FILENO);
	assert_true(saved != -1);
	assert_int_equal(dup2(fd, STDERR_FILENO), STDERR_FILENO);
	log_info("to_stderr", "k=%s", "v");
	log_debug("not_shown", "k=%s", "v");
	assert_int_equal(dup2(saved, STDERR_FILENO), STDERR_FILENO);
	close(saved);
	close(fd);
	buf = slurp(path, NULL);
	unlink(path);
	assert_int_equal(count_lines(buf), 1);
	assert_timestamp(buf);
	assert_string_equal(buf + 25, "level=info event=to_stderr k=v\n");
	free(buf);
}

static void
test_line_format(void **state)
{
	struct log_fixture *f = *state;
	struct stat st;
	char *buf;

	log_info("client_connected", "id=%d peer=%s", 42, "192.0.2.1:5555");
	log_event(LOG_LVL_ERROR, "no_pairs", "%s", "");
	buf = slurp(f->path, NULL);
	assert_int_equal(count_lines(buf), 2);
	assert_timestamp(buf);
	assert_memory_equal(buf + 25,
	    "level=info event=client_connected id=42 peer=192.0.2.1:5555\n",
	    strlen("level=info event=client_connected id=42 "
	    "peer=192.0.2.1:5555\n"));
	/* Second line: no trailing space when there are no pairs. */
	assert_timestamp(strchr(buf, '\n') + 1);
	assert_string_equal(strchr(buf, '\n') + 1 + 25,
	    "level=error event=no_pairs\n");
	free(buf);

	assert_int_equal(stat(f->path, &st), 0);
	assert_int_equal(st.st_mode & 0777, 0640);
}

static void
test_level_filter(void **state)
{
	struct log_fixture *f = *state;
	char *buf;

	log_set_level(LOG_LVL_WARN);
	assert_false(log_enabled(LOG_LVL_INFO));
	assert_true(log_enabled(LOG_LVL_WARN));
	assert_true(log_enabled(LOG_LVL_ERROR));
	log_info("dropped", "a=1");
	log_debug("dropped_too", "a=%d", 2);
	log_warn("kept_warn", "a=3");
	log_error("kept_error", "a=4");
	log_set_level(LOG_LVL_DEBUG);
	log_debug("kept_debug", "a=%d", 5);
	buf = slurp(f->path, NULL);
	assert_int_equal(count_lines(buf), 3);
	assert_null(strstr(buf, "dropped"));
	assert_non_null(strstr(buf, " level=warn event=kept_warn a=3\n"));
	assert_non_null(strstr(buf, " level=error event=kept_error a=4\n"));
	assert_non_null(strstr(buf, " level=debug event=kept_debug a=5\n"));
	free(buf);
}

static void
test_level_names(void **state)
{
	enum log_level lvl = LOG_LVL_COUNT;

	(void)state;
	assert_int_equal(log_level_parse("error", &lvl), 0);
	assert_int_equal(lvl, LOG_LVL_ERROR);
	assert_int_equal(log_level_parse("warn", &lvl), 0);
	assert_int_equal(lvl, LOG_LVL_WARN);
	assert_int_equal(log_level_parse("info", &lvl), 0);
	assert_int_equal(lvl, LOG_LVL_INFO);
	assert_int_equal(log_level_parse("debug", &lvl), 0);
	assert_int_equal(lvl, LOG_LVL_DEBUG);
	/* Case-insensitive, like the ini's other enum values. */
	assert_int_equal(log_level_parse("INFO", &lvl), 0);
	assert_int_equal(lvl, LOG_LVL_INFO);
	assert_int_equal(log_level_parse("Warn", &lvl), 0);
	assert_int_equal(lvl, LOG_LVL_WARN);
	assert_int_equal(log_level_parse("DEBUG", &lvl), 0);
	assert_int_equal(lvl, LOG_LVL_DEBUG);
	assert_int_equal(log_level_parse("verbose", &lvl), -1);
	assert_int_equal(log_level_parse("info ", &lvl), -1);
	assert_int_equal(log_level_parse("", &lvl), -1);
	assert_int_equal(lvl, LOG_LVL_DEBUG);
	assert_string_equal(log_level_name(LOG_LVL_ERROR), "error");
	assert_string_equal(log_level_name(LOG_LVL_WARN), "warn");
	assert_string_equal(log_level_name(LOG_LVL_INFO), "info");
	assert_string_equal(log_level_name(LOG_LVL_DEBUG), "debug");
}

static void
test_long_line_cut(void **state)
{
	struct log_fixture *f = *state;
	char *big, *buf, *nl;
	size_t len;

	big = malloc(10000);
	assert_non_null(big);
	memset(big, 'x', 9999);
	big[9999] = '\0';
	log_info("big", "v=%s", big);
	log_info("after", "ok=1");
	buf = slurp(f->path, &len);
	assert_int_equal(count_lines(buf), 2);
	/* First line: at most 4096 bytes including the newline, the value
	 * cut as "xxx...". */
	nl = strchr(buf, '\n');
	assert_true(nl - buf + 1 <= 4096 && nl - buf + 1 > 4080);
	assert_memory_equal(nl - 4, "x...\n", 5);
	assert_logfmt(buf + 25);
	assert_non_null(strstr(nl, " level=info event=after ok=1\n"));
	free(buf);
	free(big);
}

/* A line cut anywhere stays logfmt: inside a quoted value (never inside an
 * escape), right after one, or inside a key. */
static void
test_long_line_cut_logfmt(void **state)
{
	struct log_fixture *f = *state;
	char big[5000], bare[5000], *buf, *line, *nl;
	size_t pad, k;

	for (pad = 0; pad < 60; pad++) {
		/* pad plain bytes, then escaped text (\x01, \") that runs
		 * past the limit: escapes straddle every cut point. */
		memset(big, 'a', pad);
		for (k = pad; k < pad + 4500; k++)
			big[k] = "aa\\x01a\\\""[(k - pad) % 9];
		big[k] = '\0';
		log_info("cut", "q=\"%s\" b=bare", big);
		/* Lines ending near the limit: cut in a bare value, in a key,
		 * right after a closing quote. */
		memset(bare, 'b', 4000 + pad);
		bare[4000 + pad] = '\0';
		log_info("cut2", "a=%s longkeyname=1 c=\"\" d=2", bare);
		log_info("cut3", "a=\"%s\" longkeyname=1 c=\"\" d=2", bare);
		buf = slurp(f->path, NULL);
		assert_int_equal(count_lines(buf), 3);
		for (line = buf; (nl = strchr(line, '\n')) != NULL;
		    line = nl + 1) {
			assert_true(nl - line + 1 <= 4096);
			assert_logfmt(line + 25);
			*nl = '\0';
			/* Whole, or cut with "..." at the end. */
			if (strcmp(nl - 3, "d=2") != 0)
				assert_non_null(strstr(nl - 4, "..."));
		}
		free(buf);
		assert_int_equal(truncate(f->path, 0), 0);
	}
}

static void
test_value_bare(void **state)
{
	char buf[64];
	const char *tok = "user@example.com/NPUM:993+a-b,d*[x](y)_z.";

	(void)state;
	assert_ptr_equal(log_value(buf, sizeof(buf), tok, strlen(tok)), buf);
	assert_string_equal(buf, tok);
	assert_string_equal(log_value(buf, sizeof(buf), "abc", 3), "abc");
	/* Only len bytes are read. */
	assert_string_equal(log_value(buf, sizeof(buf), "abcdef", 2), "ab");
}

static void
test_value_quoted(void **state)
{
	char buf[64];

	(void)state;
	assert_string_equal(log_value(buf, sizeof(buf), "", 0), "\"\"");
	assert_string_equal(log_value(buf, sizeof(buf), NULL, 0), "\"\"");
	assert_string_equal(log_value(buf, sizeof(buf), "a b", 3),
	    "\"a b\"");
	assert_string_equal(log_value(buf, sizeof(buf), "say \"hi\"", 8),
	    "\"say \\\"hi\\\"\"");
	assert_string_equal(log_value(buf, sizeof(buf), "dom\\adm", 7),
	    "\"dom\\\\adm\"");
	assert_string_equal(log_value(buf, sizeof(buf), "a\r\nb", 4),
	    "\"a\\x0d\\x0ab\"");
	assert_string_equal(log_value(buf, sizeof(buf), "a\0b", 3),
	    "\"a\\x00b\"");
	assert_string_equal(log_value(buf, sizeof(buf), "\xc3\xa9\x7f", 3),
	    "\"\\xc3\\xa9\\x7f\"");
	assert_string_equal(log_value(buf, sizeof(buf), "a'b", 3),
	    "\"a'b\"");
	assert_string_equal(log_value(buf, sizeof(buf), "x;y", 3),
	    "\"x;y\"");
	/* '=' would make a reader see another key. */
	assert_string_equal(log_value(buf, sizeof(buf), "a=b", 3),
	    "\"a=b\"");
}

/* log_v(): the same escaping, into buffers that last for one log line. */
static void
test_log_v(void **state)
{
	struct log_fixture *f = *state;
	char long_in[3000], *buf;
	const char *v;
	size_t vlen;

	assert_string_equal(log_v("plain-token_1.2:3"), "plain-token_1.2:3");
	assert_string_equal(log_v("a b"), "\"a b\"");
	assert_string_equal(log_v("say \"hi\""), "\"say \\\"hi\\\"\"");
	assert_string_equal(log_v("k=v"), "\"k=v\"");
	assert_string_equal(log_v("dom\\adm"), "\"dom\\\\adm\"");
	assert_string_equal(log_v("a\tb\x1b"), "\"a\\x09b\\x1b\"");
	assert_string_equal(log_v("caf\xc3\xa9"), "\"caf\\xc3\\xa9\"");
	assert_string_equal(log_v(""), "\"\"");
	/* 8 used by now: the ninth gets the marker, not another's buffer. */
	assert_string_equal(log_v("x"), "\"(too many log_v values)\"");
	/* A log line frees the slots. */
	log_info("v", "n=%d", 1);
	assert_string_equal(log_v(NULL), "\"\"");
	assert_string_equal(log_vn("abc def", 3), "abc");
	assert_string_equal(log_vn("a\0b", 3), "\"a\\x00b\"");
	/* Cut to fit LOG_V_MAX, still quoted. */
	memset(long_in, ' ', sizeof(long_in) - 1);
	long_in[sizeof(long_in) - 1] = '\0';
	v = log_v(long_in);
	vlen = strlen(v);
	assert_int_equal(vlen, LOG_V_MAX - 1);
	assert_memory_equal(v + vlen - 4, "...\"", 4);
	assert_int_equal(v[0], '"');
	log_info("long", "v=%s", v);
	/* Eight values in one line, each its own. */
	log_info("eight", "a=%s b=%s c=%s d=%s e=%s f=%s g=%s h=%s",
	    log_v("1 1"), log_v("2"), log_v("3=3"), log_v("4"), log_v("5"),
	    log_v("6"), log_v("7\""), log_v("8 8"));
	buf = slurp(f->path, NULL);
	assert_non_null(strstr(buf, " event=eight a=\"1 1\" b=2 c=\"3=3\" "
	    "d=4 e=5 f=6 g=\"7\\\"\" h=\"8 8\"\n"));
	free(buf);
}

static void
test_value_cut(void **state)
{
	char buf[16];
	char small[4];

	(void)state;
	/* Exactly fits: 15 bytes + NUL. */
	assert_string_equal(log_value(buf, sizeof(buf), "abcdefghijklmno", 15),
	    "abcdefghijklmno");
	assert_string_equal(log_value(buf, sizeof(buf), "abcdefghijklmnop", 16),
	    "abcdefghijkl...");
	assert_int_equal(strlen(buf), 15);
	/* Quoted, exactly fits. */
	assert_string_equal(log_value(buf, sizeof(buf), "a b c d e f g", 13),
	    "\"a b c d e f g\"");
	/* Quoted, cut inside the quotes. */
	assert_string_equal(log_value(buf, sizeof(buf),
	    "a b c d e f g h i j", 19), "\"a b c d e ...\"");
	assert_true(strlen(buf) < sizeof(buf));
	/* An escape sequence is never split. */
	assert_string_equal(log_value(buf, sizeof(buf),
	    "aaaaaaaa\x01zzzzzzzz", 17), "\"aaaaaaaa...\"");
	assert_string_equal(log_value(buf, sizeof(buf),
	    "aaaaaa\x01zzzzzzzzzz", 17), "\"aaaaaa\\x01...\"");
	/* Tiny buffers still come back NUL-terminated. */
	assert_string_equal(log_value(small, sizeof(small), "abcdef", 6),
	    "...");
	assert_string_equal(log_value(small, sizeof(small), "a b c", 5),
	    "\"..");
	assert_string_equal(log_value(small, 1, "a b c", 5), "");
}

/* Log three levels to stderr redirected to a new file, with JOURNAL_STREAM
 * set to js (NULL: unset, "FILE": that file's dev:ino); the file's text. */
static char *
log_to_stderr_file(const char *js)
{
	char path[] = "/tmp/test_log_journal.XXXXXX";
	char err[64], ids[64];
	struct stat sb;
	char *buf;
	int fd, saved;

	fd = mkstemp(path);
	assert_true(fd != -1);
	assert_int_equal(fstat(fd, &sb), 0);
	if (js == NULL) {
		unsetenv("JOURNAL_STREAM");
	} else {
		if (strcmp(js, "FILE") == 0) {
			snprintf(ids, sizeof(ids), "%llu:%llu",
			    (unsigned long long)sb.st_dev,
			    (unsigned long long)sb.st_ino);
			js = ids;
		}
		setenv("JOURNAL_STREAM", js, 1);
	}
	saved = dup(STDERR_FILENO);
	assert_true(saved != -1);
	assert_int_equal(dup2(fd, STDERR_FILENO), STDERR_FILENO);
	/* The journal check runs when stderr is (re)opened as the target. */
	assert_int_equal(log_open("stderr", err, sizeof(err)), 0);
	log_set_level(LOG_LVL_DEBUG);
	log_debug("d", "n=%d", 0);
	log_info("i", "n=%d", 1);
	log_warn("w", "n=%d", 2);
	log_error("e", "n=%d", 3);
	assert_int_equal(dup2(saved, STDERR_FILENO), STDERR_FILENO);
	close(saved);
	close(fd);
	unsetenv("JOURNAL_STREAM");
	assert_int_equal(log_open("stderr", err, sizeof(err)), 0);
	log_set_level(LOG_LVL_INFO);
	buf = slurp(path, NULL);
	unlink(path);
	return buf;
}

static void
test_journal_priority(void **state)
{
	char *buf;

	(void)state;
	/* stderr is the stream JOURNAL_STREAM names: "<N>", no timestamp. */
	buf = log_to_stderr_file("FILE");
	assert_string_equal(buf,
	    "<7>level=debug event=d n=0\n"
	    "<6>level=info event=i n=1\n"
	    "<4>level=warn event=w n=2\n"
	    "<3>level=error event=e n=3\n");
	free(buf);
	/* Unset, not ours (inherited by a redirected child), or garbage:
	 * timestamps as usual. */
	buf = log_to_stderr_file(NULL);
	assert_int_equal(count_lines(buf), 4);
	assert_timestamp(buf);
	assert_null(strchr(buf, '<'));
	free(buf);
	buf = log_to_stderr_file("1:2");
	assert_timestamp(buf);
	assert_null(strchr(buf, '<'));
	free(buf);
	buf = log_to_stderr_file("nonsense");
	assert_timestamp(buf);
	assert_null(strchr(buf, '<'));
	free(buf);
}

static void
test_reopen_after_rename(void **state)
{
	struct log_fixture *f = *state;
	char rotated[160];
	char *buf;

	log_info("before_rotate", "n=1");
	snprintf(rotated, sizeof(rotated), "%s.1", f->path);
	assert_int_equal(rename(f->path, rotated), 0);
	/* Until the reopen, lines still go to the renamed file. */
	log_info("still_old", "n=2");
	assert_int_equal(access(f->path, F_OK), -1);
	assert_int_equal(log_reopen(), 0);
	log_info("after_rotate", "n=3");

	buf = slurp(rotated, NULL);
	assert_int_equal(count_lines(buf), 2);
	assert_non_null(strstr(buf, "event=before_rotate n=1\n"));
	assert_non_null(strstr(buf, "event=still_old n=2\n"));
	assert_null(strstr(buf, "after_rotate"));
	free(buf);
	buf = slurp(f->path, NULL);
	assert_int_equal(count_lines(buf), 1);
	assert_non_null(strstr(buf, " level=info event=after_rotate n=3\n"));
	free(buf);
}

static void
test_open_errors(void **state)
{
	struct log_fixture *f = *state;
	char err[256];
	char *buf;

	err[0] = '\0';
	assert_int_equal(log_open("/nonexistent-dir/x/y.log", err,
	    sizeof(err)), -1);
	assert_non_null(strstr(err, "/nonexistent-dir/x/y.log"));
	assert_int_equal(log_open("", err, sizeof(err)), -1);
	/* The previous target is kept after a failed open. */
	log_info("still_here", "n=1");
	buf = slurp(f->path, NULL);
	assert_non_null(strstr(buf, "event=still_here n=1\n"));
	free(buf);
	/* reopen is a no-op on stderr. */
	assert_int_equal(log_open("stderr", err, sizeof(err)), 0);
	assert_int_equal(log_reopen(), 0);
}

static void
test_fatal_exits(void **state)
{
	struct log_fixture *f = *state;
	char *buf;
	pid_t pid;
	int status, devnull;

	pid = fork();
	assert_true(pid != -1);
	if (pid == 0) {
		/* The copy to stderr is not wanted in the test output. */
		devnull = open("/dev/null", O_WRONLY);
		dup2(devnull, STDERR_FILENO);
		log_set_level(LOG_LVL_ERROR);
		log_fatal("config_invalid", "file=%s line=%d", "a.ini", 7);
	}
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 1);
	buf = slurp(f->path, NULL);
	assert_non_null(strstr(buf,
	    " level=error event=config_invalid file=a.ini line=7\n"));
	free(buf);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_default_stderr),
		cmocka_unit_test_setup_teardown(test_line_format, setup,
		    teardown),
		cmocka_unit_test_setup_teardown(test_level_filter, setup,
		    teardown),
		cmocka_unit_test(test_level_names),
		cmocka_unit_test_setup_teardown(test_long_line_cut, setup,
		    teardown),
		cmocka_unit_test_setup_teardown(test_long_line_cut_logfmt,
		    setup, teardown),
		cmocka_unit_test(test_value_bare),
		cmocka_unit_test(test_value_quoted),
		cmocka_unit_test(test_value_cut),
		cmocka_unit_test_setup_teardown(test_log_v, setup, teardown),
		cmocka_unit_test(test_journal_priority),
		cmocka_unit_test_setup_teardown(test_reopen_after_rename,
		    setup, teardown),
		cmocka_unit_test_setup_teardown(test_open_errors, setup,
		    teardown),
		cmocka_unit_test_setup_teardown(test_fatal_exits, setup,
		    teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
