/* test_console.c - the console's command parser (console_parse): every
 * command, its arguments, and what is refused. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "console.h"

static struct console_cmd
parse_ok(const char *line, enum console_verb verb)
{
	struct console_cmd cmd;
	char err[256] = "";

	if (console_parse(line, strlen(line), &cmd, err, sizeof(err)) != 0)
		fail_msg("'%s' refused: %s", line, err);
	if (cmd.verb != verb)
		fail_msg("'%s' parsed as '%s', not '%s'", line,
		    console_verb_name(cmd.verb), console_verb_name(verb));
	return cmd;
}

static void
parse_bad(const char *line, size_t len, const char *errpart)
{
	struct console_cmd cmd;
	char err[256] = "";

	if (console_parse(line, len, &cmd, err, sizeof(err)) != -1)
		fail_msg("'%s' accepted as '%s'", line,
		    console_verb_name(cmd.verb));
	if (strstr(err, errpart) == NULL)
		fail_msg("'%s': error '%s' lacks '%s'", line, err, errpart);
}

static void
test_every_command(void **state)
{
	(void)state;
	parse_ok("show pools", CON_SHOW_POOLS);
	parse_ok("show servers", CON_SHOW_SERVERS);
	parse_ok("show clients", CON_SHOW_CLIENTS);
	parse_ok("show stats", CON_SHOW_STATS);
	parse_ok("show status", CON_SHOW_STATUS);
	parse_ok("kick client 7", CON_KICK_CLIENT);
	parse_ok("kick mailbox alice", CON_KICK_MAILBOX);
	parse_ok("drain server cas1.example.com:993", CON_DRAIN_SERVER);
	parse_ok("enable server cas1.example.com:993", CON_ENABLE_SERVER);
	parse_ok("pause", CON_PAUSE);
	parse_ok("resume", CON_RESUME);
	parse_ok("reload", CON_RELOAD);
	parse_ok("help", CON_HELP);
}

static void
test_names(void **state)
{
	(void)state;
	assert_string_equal(console_verb_name(CON_SHOW_POOLS), "show pools");
	assert_string_equal(console_verb_name(CON_KICK_MAILBOX), "kick mailbox");
	assert_string_equal(console_verb_name(CON_RELOAD), "reload");
	assert_string_equal(console_verb_name(CON_VERB_COUNT), "?");
}

static void
test_spelling(void **state)
{
	(void)state;
	/* Keywords in any case; blanks around and between words. */
	parse_ok("SHOW Pools", CON_SHOW_POOLS);
	parse_ok("  show \t clients  ", CON_SHOW_CLIENTS);
	parse_ok("Reload", CON_RELOAD);
	parse_ok("\tpause\t", CON_PAUSE);
}

static void
test_arguments(void **state)
{
	struct console_cmd c;

	(void)state;
	c = parse_ok("kick client 18446744073709551615", CON_KICK_CLIENT);
	assert_true(c.id == UINT64_MAX);
	c = parse_ok("kick client 42", CON_KICK_CLIENT);
	assert_true(c.id == 42);
	/* The mailbox is kept as written (matched case-insensitively). */
	c = parse_ok("kick mailbox Voice.Box_1+x@y-z", CON_KICK_MAILBOX);
	assert_string_equal(c.mailbox, "Voice.Box_1+x@y-z");
	c = parse_ok("drain server 127.0.0.1:1993", CON_DRAIN_SERVER);
	assert_string_equal(c.server.host, "127.0.0.1");
	assert_string_equal(c.server.port, "1993");
	c = parse_ok("enable server [::1]:993", CON_ENABLE_SERVER);
	assert_string_equal(c.server.host, "::1");
	assert_string_equal(c.server.port, "993");
}

static void
test_refused(void **state)
{
	char big[CONSOLE_LINE_MAX + 16];

	(void)state;
	parse_bad("", 0, "empty");
	parse_bad("   ", 3, "empty");
	parse_bad("show", 4, "unknown command");
	parse_bad("show everything", 15, "unknown command 'show everything'");
	parse_bad("shutdown", 8, "unknown command");
	/* Arguments missing, extra, or malformed. */
	parse_bad("show pools now", 14, "usage: show pools");
	parse_bad("pause 5", 7, "usage: pause");
	parse_bad("kick client", 11, "usage: kick client ID");
	parse_bad("kick client 1 2", 15, "usage: kick client ID");
	parse_bad("kick client 0", 13, "not a client id");
	parse_bad("kick client -1", 14, "not a client id");
	parse_bad("kick client 12x", 15, "not a client id");
	parse_bad("kick client 99999999999999999999", 32, "not a client id");
	parse_bad("kick mailbox", 12, "usage: kick mailbox NAME");
	parse_bad("kick mailbox a\"b", 16, "not a mailbox name");
	parse_bad("kick mailbox a*", 15, "not a mailbox name");
	parse_bad("drain server", 12, "usage: drain server HOST:PORT");
	parse_bad("drain server cas1", 17, "not HOST:PORT");
	parse_bad("drain server :993", 17, "not HOST:PORT");
	parse_bad("enable server cas1:99999", 24, "not HOST:PORT");
	/* A NUL inside the line, and a line over the limit. */
	parse_bad("reload\0x", 8, "NUL");
	memset(big, 'a', sizeof(big));
	memcpy(big, "kick mailbox ", 13);
	parse_bad(big, CONSOLE_LINE_MAX + 1, "too long");
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_every_command),
		cmocka_unit_test(test_names),
		cmocka_unit_test(test_spelling),
		cmocka_unit_test(test_arguments),
		cmocka_unit_test(test_refused),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
