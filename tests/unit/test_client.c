/*
 * test_client.c - the client module's pieces that need no sockets: the
 * ring that keeps replies in command order, the Message-ID an APPEND
 * check searches for, what a lost upstream lets us do with a command
 * (cl_prepare_rerun), the state table against DESIGN.md A.3, and the tag
 * an error reply uses (cl_line_tag).
 *
 * cl_prepare_rerun reads the module's config, so the tests run with a
 * config loaded by config_load() from a minimal file (defaults for all
 * else), installed by client_init() once for the whole run.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "client_int.h"
#include "config.h"
#include "imap_parse.h"
#include "util.h"

/* ------------------------------------------------------------ fixture */

static struct config *cfg;
static struct client_env env;

static int
group_setup(void **state)
{
	static const char ini[] = "[upstream]\nservers = cas1.example.com:993\n"
	    "[admin A1]\npassword = s3cret\n";
	const char *dir = getenv("TMPDIR");
	struct config_diag diag;
	char path[512];
	FILE *f;
	int fd;

	(void)state;
	snprintf(path, sizeof(path), "%s/test_client.XXXXXX",
	    dir != NULL && *dir != '\0' ? dir : P_tmpdir);
	if ((fd = mkstemp(path)) < 0 || (f = fdopen(fd, "w")) == NULL)
		return -1;
	fputs(ini, f);
	fclose(f);
	cfg = config_load(path, false, &diag);
	unlink(path);
	if (cfg == NULL) {
		fprintf(stderr, "%s", diag.errors);
		return -1;
	}
	env.cfg = cfg;
	client_init(&env);
	return 0;
}

static int
group_teardown(void **state)
{
	(void)state;
	cl_stage_free();
	config_free(cfg);
	return 0;
}

/* ------------------------------------------------------- reply ordering */

/* Room for a test tag: a letter and any size_t. */
#define TAGW 24

static struct cl_pend *
push(struct cl_ring *r, const char *tag)
{
	return cl_ring_push(r, tag, strlen(tag));
}

/* The ring holds exactly tags[0..n), oldest first. */
static void
expect_ring(struct cl_ring *r, char (*tags)[TAGW], size_t n)
{
	size_t i;

	assert_int_equal(r->r_len, n);
	assert_true(r->r_cap >= n);
	for (i = 0; i < n; i++)
		assert_string_equal(cl_ring_at(r, i)->tag, tags[i]);
}

/* Full while wrapped (the head in the middle): growing keeps the order,
 * and the entries' contents move with them. */
static void
test_ring_grow_wrapped(void **state)
{
	struct cl_ring r = { 0 };
	char tags[64][TAGW];
	size_t cap0, half, n = 0, i;

	(void)state;
	push(&r, "t0");
	snprintf(tags[n++], TAGW, "t0");
	cap0 = r.r_cap;
	assert_true(cap0 >= 2 && cap0 < 32);
	while (n < cap0) {
		snprintf(tags[n], TAGW, "t%zu", n);
		push(&r, tags[n])->relayed = (n % 2) == 1;
		n++;
	}
	half = cap0 / 2;
	for (i = 0; i < half; i++)
		assert_string_equal(cl_ring_pop(&r)->tag, tags[i]);
	memmove(tags, tags + half, (n - half) * sizeof(tags[0]));
	n -= half;
	while (n < cap0) {
		snprintf(tags[n], TAGW, "w%zu", n);
		push(&r, tags[n])->reply = xstrdup(tags[n]);
		n++;
	}
	/* Full, and its entries run past the array's end. */
	assert_int_equal(r.r_cap, cap0);
	assert_int_equal(r.r_len, cap0);
	assert_int_equal(r.r_head, half);
	expect_ring(&r, tags, n);

	snprintf(tags[n], TAGW, "grow");
	push(&r, tags[n++])->done = true;
	assert_true(r.r_cap > cap0);
	expect_ring(&r, tags, n);
	for (i = 0; i < n; i++) {
		struct cl_pend *p = cl_ring_at(&r, i);

		if (tags[i][0] == 't') {
			assert_int_equal(p->relayed, atoi(tags[i] + 1) % 2 == 1);
			assert_null(p->reply);
		} else if (tags[i][0] == 'w') {
			assert_non_null(p->reply);
			assert_string_equal(p->reply, tags[i]);
		}
	}
	assert_true(cl_ring_at(&r, n - 1)->done);
	assert_false(cl_ring_at(&r, 0)->done);
	cl_ring_clear(&r);
}

/* A long deterministic mix of pushes and pops against a plain queue. */
static void
test_ring_against_model(void **state)
{
	static char model[4096][TAGW];
	struct cl_ring r = { 0 };
	size_t head = 0, tail = 0, i, k;
	uint32_t x = 12345, next = 0;

	(void)state;
	for (k = 0; k < 3000; k++) {
		x = x * 1103515245u + 12345u;
		/* Pushes outnumber pops 3:2 so the ring grows several times. */
		if (tail == head || (x >> 16) % 5 < 3) {
			snprintf(model[tail], TAGW, "m%u", next++);
			push(&r, model[tail])->reply = (x >> 8) % 2 ?
			    xstrdup(model[tail]) : NULL;
			tail++;
		} else {
			struct cl_pend *p = cl_ring_pop(&r);

			assert_string_equal(p->tag, model[head]);
			assert_null(p->reply);	/* freed by the pop */
			head++;
		}
		assert_int_equal(r.r_len, tail - head);
		if (k % 97 == 0)
			for (i = head; i < tail; i++)
				assert_string_equal(
				    cl_ring_at(&r, i - head)->tag, model[i]);
	}
	assert_true(tail - head > 100);
	expect_ring(&r, model + head, tail - head);
	cl_ring_clear(&r);
}

/* A slot used before comes back zeroed: no flag of an old command leaks
 * into a new one. */
static void
test_ring_push_zeroes(void **state)
{
	struct cl_ring r = { 0 };
	struct cl_pend *p;
	size_t i, cap;

	(void)state;
	p = push(&r, "old");
	cap = r.r_cap;
	p->relayed = p->done = p->logout = p->replied = p->cont_sent = true;
	p->selects = -1;
	p->rerun = CL_RERUN_APPEND;
	p->rq = p->rp = p->started_us = 99;
	cl_ring_pop(&r);
	/* Walk once around so the old slot is used again. */
	for (i = 0; i < cap; i++) {
		p = push(&r, "new");
		assert_false(p->relayed || p->done || p->logout ||
		    p->replied || p->cont_sent);
		assert_int_equal(p->selects, 0);
		assert_int_equal(p->rerun, CL_RERUN_NO);
		assert_int_equal(p->rq + p->rp + p->started_us, 0);
		assert_null(p->reply);
		assert_null(p->select_cmd);
		assert_null(p->pl_params);
		cl_ring_pop(&r);
	}
	assert_int_equal(r.r_cap, cap);
	cl_ring_clear(&r);
}

static void
test_ring_tag_cut(void **state)
{
	struct cl_ring r = { 0 };
	char longtag[IMAPSHIM_TAG_MAX + 20];
	struct cl_pend *p;

	(void)state;
	memset(longtag, 'x', sizeof(longtag) - 1);
	longtag[sizeof(longtag) - 1] = '\0';
	longtag[IMAPSHIM_TAG_MAX - 1] = 'y';	/* the last byte kept */
	p = push(&r, longtag);
	assert_int_equal(strlen(p->tag), IMAPSHIM_TAG_MAX);
	assert_memory_equal(p->tag, longtag, IMAPSHIM_TAG_MAX);

	/* Exactly the maximum is kept whole. */
	longtag[IMAPSHIM_TAG_MAX] = '\0';
	p = push(&r, longtag);
	assert_string_equal(p->tag, longtag);

	/* Only taglen bytes are read: the tag of a line, not the line. */
	p = cl_ring_push(&r, "a17 FETCH 1 FLAGS", 3);
	assert_string_equal(p->tag, "a17");
	p = cl_ring_push(&r, "", 0);
	assert_string_equal(p->tag, "");
	assert_int_equal(r.r_len, 4);
	cl_ring_clear(&r);
}

static void
test_ring_find(void **state)
{
	struct cl_ring r = { 0 };
	struct cl_pend *a1, *a10, *local, *done, *dup2;

	(void)state;
	assert_null(cl_ring_find(&r, "a1", 2));	/* empty ring */
	push(&r, "a1");
	push(&r, "a10");
	push(&r, "loc");	/* answered locally: never upstream's */
	push(&r, "dup");
	push(&r, "dup");
	/* A push may move the entries: take pointers once all are in. */
	a1 = cl_ring_at(&r, 0);
	a10 = cl_ring_at(&r, 1);
	local = cl_ring_at(&r, 2);
	done = cl_ring_at(&r, 3);
	dup2 = cl_ring_at(&r, 4);
	a1->relayed = a10->relayed = dup2->relayed = true;
	local->done = true;
	done->relayed = done->done = true;

	assert_ptr_equal(cl_ring_find(&r, "a1", 2), a1);
	assert_ptr_equal(cl_ring_find(&r, "a10", 3), a10);
	/* Whole tags only, and only taglen bytes of the reply line count. */
	assert_ptr_equal(cl_ring_find(&r, "a1 OK done", 2), a1);
	assert_ptr_equal(cl_ring_find(&r, "a100", 3), a10);
	assert_null(cl_ring_find(&r, "a", 1));
	assert_null(cl_ring_find(&r, "a100", 4));
	/* Case matters: tags are compared as bytes. */
	assert_null(cl_ring_find(&r, "A1", 2));
	/* Not relayed, or already done: not found. */
	assert_null(cl_ring_find(&r, "loc", 3));
	local->relayed = true;
	assert_null(cl_ring_find(&r, "loc", 3));
	/* The same tag twice: the one still waiting. */
	assert_ptr_equal(cl_ring_find(&r, "dup", 3), dup2);
	dup2->done = true;
	assert_null(cl_ring_find(&r, "dup", 3));
	a1->done = true;
	assert_null(cl_ring_find(&r, "a1", 2));
	assert_ptr_equal(cl_ring_find(&r, "a10", 3), a10);
	cl_ring_clear(&r);
}

static void
test_ring_inflight(void **state)
{
	struct cl_ring r = { 0 };
	struct cl_pend *loc, *done, *first, *second;

	(void)state;
	assert_null(cl_ring_inflight(&r));
	loc = push(&r, "l");		/* local reply, waiting its turn */
	loc->done = true;
	assert_null(cl_ring_inflight(&r));
	done = push(&r, "d");
	done->relayed = done->done = true;
	first = push(&r, "f");
	assert_null(cl_ring_inflight(&r));	/* not relayed yet */
	first->relayed = true;
	push(&r, "s")->relayed = true;
	/* A push may move the entries: look them up again. */
	first = cl_ring_at(&r, 2);
	second = cl_ring_at(&r, 3);
	assert_string_equal(second->tag, "s");
	assert_ptr_equal(cl_ring_inflight(&r), first);
	first->done = true;
	assert_ptr_equal(cl_ring_inflight(&r), second);
	second->done = true;
	assert_null(cl_ring_inflight(&r));
	cl_ring_clear(&r);
}

/* Clear frees every entry's strings and the array (ASan: no leak) and
 * leaves an empty ring that works again. */
static void
test_ring_clear(void **state)
{
	struct cl_ring r = { 0 };
	struct cl_pend *p;
	size_t i;

	(void)state;
	cl_ring_clear(&r);		/* empty: nothing to free */
	for (i = 0; i < 10; i++) {
		p = push(&r, "c");
		p->reply = xstrdup("c OK done\r\n");
		p->pl_params = xstrdup("1:* (FLAGS)");
		p->select_cmd = xstrdup("SELECT INBOX");
	}
	cl_ring_pop(&r);
	cl_ring_pop(&r);
	cl_ring_clear(&r);
	assert_null(r.r_pend);
	assert_int_equal(r.r_cap, 0);
	assert_int_equal(r.r_len, 0);
	assert_int_equal(r.r_head, 0);

	p = push(&r, "again");
	p->reply = xstrdup("x");
	assert_int_equal(r.r_len, 1);
	assert_string_equal(cl_ring_at(&r, 0)->tag, "again");
	cl_ring_clear(&r);
	assert_null(r.r_pend);
}

/* ----------------------------------------------------- cl_append_msgid */

/* An APPEND as kept for a re-run: the command line, then the message. */
static int
msgid(const char *message, char *out, size_t outlen)
{
	char buf[2048];
	int n;

	n = snprintf(buf, sizeof(buf), "A7 APPEND INBOX (\\Seen) {%zu}\r\n%s",
	    strlen(message), message);
	assert_true(n > 0 && (size_t)n < sizeof(buf));
	memset(out, '#', outlen);
	return cl_append_msgid(buf, (size_t)n, out, outlen);
}

static void
test_msgid_found(void **state)
{
	char out[256];

	(void)state;
	assert_int_equal(msgid("From: a@example.com\r\n"
	    "Message-ID: <vm.1234@pbx.example.com>\r\nSubject: voice\r\n"
	    "\r\nbody\r\n", out, sizeof(out)), 0);
	assert_string_equal(out, "\"<vm.1234@pbx.example.com>\"");

	/* The first header, and a header block with no body after it. */
	assert_int_equal(msgid("Message-ID: <first@x>\r\nTo: b\r\n\r\n", out,
	    sizeof(out)), 0);
	assert_string_equal(out, "\"<first@x>\"");
	assert_int_equal(msgid("To: b\r\nMessage-ID: <last@x>", out,
	    sizeof(out)), 0);
	assert_string_equal(out, "\"<last@x>\"");
}

static void
test_msgid_case_and_space(void **state)
{
	char out[256];

	(void)state;
	assert_int_equal(msgid("To: b\r\nmessage-id:<lower@x>\r\n\r\nb",
	    out, sizeof(out)), 0);
	assert_string_equal(out, "\"<lower@x>\"");
	assert_int_equal(msgid("To: b\r\nMESSAGE-ID: \t <upper@x>\r\n\r\nb",
	    out, sizeof(out)), 0);
	assert_string_equal(out, "\"<upper@x>\"");
	/* Bare LF line ends count too. */
	assert_int_equal(msgid("To: b\nMessage-Id: <lf@x>\n\nb",
	    out, sizeof(out)), 0);
	assert_string_equal(out, "\"<lf@x>\"");
}

/* cl_poll_due (DESIGN 3.4 M10): clients parked together poll at offsets
 * spread over [0, interval) by r; after a poll the next is one interval
 * after it ran; a poll that ran late moves the next one back instead of
 * bunching it up. */
static void
test_poll_due(void **state)
{
	(void)state;
	/* First park: now + r, whatever r in [0, interval). */
	assert_int_equal(cl_poll_due(100000, 0, 30000, 0), 100000);
	assert_int_equal(cl_poll_due(100000, 0, 30000, 29999), 129999);
	/* Parked again soon after a poll: one interval after it ran. */
	assert_int_equal(cl_poll_due(100500, 100000, 30000, 7), 130000);
	/* A poll that ran late (due 130000, ran 145000): from when it ran. */
	assert_int_equal(cl_poll_due(145100, 145000, 30000, 7), 175000);
	/* Its last poll is more than an interval ago (it idled attached
	 * meanwhile, its view is fresh): spread again. */
	assert_int_equal(cl_poll_due(200000, 100000, 30000, 12345), 212345);
	assert_int_equal(cl_poll_due(130000, 100000, 30000, 5), 130005);
}

static void
test_msgid_not_found(void **state)
{
	char out[256];

	(void)state;
	/* Absent. */
	assert_int_equal(msgid("From: a\r\nSubject: s\r\n\r\nbody\r\n", out,
	    sizeof(out)), -1);
	/* Folded onto the next line: nothing on the header's own line. */
	assert_int_equal(msgid("From: a\r\nMessage-ID:\r\n <fold@x>\r\n\r\nb",
	    out, sizeof(out)), -1);
	assert_int_equal(msgid("From: a\r\nMessage-ID:   \r\n\r\nb", out,
	    sizeof(out)), -1);
	/* Only in the body, after the blank line. */
	assert_int_equal(msgid("From: a\r\n\r\nMessage-ID: <body@x>\r\n", out,
	    sizeof(out)), -1);
	/* Another header whose name ends in Message-ID. */
	assert_int_equal(msgid("X-Original-Message-ID: <other@x>\r\n\r\nb",
	    out, sizeof(out)), -1);
	/* ... is skipped for the real one. */
	assert_int_equal(msgid("X-Original-Message-ID: <other@x>\r\n"
	    "Message-ID: <real@x>\r\n\r\nb", out, sizeof(out)), 0);
	assert_string_equal(out, "\"<real@x>\"");
}

/* What SEARCH HEADER could not carry as a plain quoted string. */
static void
test_msgid_refused(void **state)
{
	char out[256], small[8];

	(void)state;
	assert_int_equal(msgid("Message-ID: <a\"b@x>\r\n\r\nb", out,
	    sizeof(out)), -1);
	assert_int_equal(msgid("Message-ID: <a\\b@x>\r\n\r\nb", out,
	    sizeof(out)), -1);
	assert_int_equal(msgid("Message-ID: <\xc3\xa9@x>\r\n\r\nb", out,
	    sizeof(out)), -1);
	/* Does not fit out: "<long@x>" quoted needs 11 bytes. */
	assert_int_equal(msgid("Message-ID: <long@x>\r\n\r\nb", small,
	    sizeof(small)), -1);
}

static void
test_msgid_bad_buffer(void **state)
{
	static const char nolit[] = "A7 APPEND INBOX\r\nMessage-ID: <n@x>\r\n\r\n";
	static const char cut[] = "A7 APPEND INBOX {30}\r\nMessage-ID: <cut@x>\r\n";
	char out[256];

	(void)state;
	assert_int_equal(cl_append_msgid(NULL, 0, out, sizeof(out)), -1);
	/* No literal marker: no message to look in. */
	assert_int_equal(cl_append_msgid(nolit, strlen(nolit), out,
	    sizeof(out)), -1);
	/* Only len bytes are read: the header lies past them. */
	assert_int_equal(cl_append_msgid(cut, 30, out, sizeof(out)), -1);
	assert_int_equal(cl_append_msgid(cut, strlen(cut), out, sizeof(out)),
	    0);
	assert_string_equal(out, "\"<cut@x>\"");
	/* Only the command line: the marker ends the buffer. */
	assert_int_equal(cl_append_msgid(cut, 22, out, sizeof(out)), -1);
}

/* ---------------------------------------------------- cl_prepare_rerun */

static struct client *
client_zero(void)
{
	return xcalloc(1, sizeof(struct client));
}

static void
client_done(struct client *c)
{
	cl_ring_clear(&c->cl_ring);
	cl_replay_release(c);
	free(c->cl_append_mbox);
	free(c);
}

/* A command as the relay starts it: tag pushed, then its rerun decided.
 * line is the first line's text without its CRLF, as the framer gives it. */
static struct cl_pend *
start(struct client *c, const char *line, int8_t selects)
{
	struct imap_tok tag, cmd;
	struct cl_pend *p;

	assert_int_equal(imap_parse_command_head(line, strlen(line), &tag,
	    &cmd), 0);
	p = cl_ring_push(&c->cl_ring, tag.p, tag.len);
	p->relayed = true;
	p->selects = selects;
	cl_prepare_rerun(c, p, line, strlen(line), &cmd);
	return p;
}

/* DESIGN R11: read-only commands, IDLE and APPEND; anything else NO. */
static void
test_rerun_kinds(void **state)
{
	static const struct {
		const char *line;
		enum cl_rerun want;
	} cases[] = {
		{ "a1 FETCH 1:* (UID FLAGS)", CL_RERUN_READONLY },
		{ "a1 fetch 3 BODY.PEEK[]", CL_RERUN_READONLY },
		{ "a1 UID FETCH 1:* (FLAGS)", CL_RERUN_READONLY },
		{ "a1 uid fetch 7 BODY[]", CL_RERUN_READONLY },
		{ "a1 UID SEARCH UNSEEN", CL_RERUN_READONLY },
		{ "a1 SEARCH ALL", CL_RERUN_READONLY },
		{ "a1 STATUS INBOX (MESSAGES UNSEEN)", CL_RERUN_READONLY },
		{ "a1 NOOP", CL_RERUN_READONLY },
		{ "a1 SELECT INBOX", CL_RERUN_READONLY },
		{ "a1 EXAMINE INBOX", CL_RERUN_READONLY },
		{ "a1 LIST \"\" *", CL_RERUN_READONLY },
		{ "a1 LSUB \"\" *", CL_RERUN_READONLY },
		{ "a1 XLIST \"\" *", CL_RERUN_READONLY },
		{ "a1 CHECK", CL_RERUN_READONLY },
		{ "a1 NAMESPACE", CL_RERUN_READONLY },
		{ "a1 GETQUOTAROOT INBOX", CL_RERUN_READONLY },
		{ "a1 MYRIGHTS INBOX", CL_RERUN_READONLY },
		{ "a1 SORT (DATE) UTF-8 ALL", CL_RERUN_READONLY },
		{ "a1 UID SORT (DATE) UTF-8 ALL", CL_RERUN_READONLY },
		{ "a1 UID THREAD REFERENCES UTF-8 ALL", CL_RERUN_READONLY },
		{ "a1 SETQUOTA \"\" (STORAGE 10)", CL_RERUN_NO },
		{ "a1 SUBSCRIBE Saved", CL_RERUN_NO },
		{ "a1 RENAME Saved Old", CL_RERUN_NO },
		{ "a1 STORE 1 +FLAGS (\\Seen)", CL_RERUN_NO },
		{ "a1 UID STORE 1 +FLAGS (\\Deleted)", CL_RERUN_NO },
		{ "a1 EXPUNGE", CL_RERUN_NO },
		{ "a1 UID EXPUNGE 4", CL_RERUN_NO },
		{ "a1 COPY 1 Trash", CL_RERUN_NO },
		{ "a1 UID COPY 1 Trash", CL_RERUN_NO },
		{ "a1 MOVE 1 Trash", CL_RERUN_NO },
		{ "a1 UID MOVE 1 Trash", CL_RERUN_NO },
		{ "a1 CREATE Saved", CL_RERUN_NO },
		{ "a1 DELETE Saved", CL_RERUN_NO },
		{ "a1 CLOSE", CL_RERUN_NO },
		{ "a1 UID", CL_RERUN_NO },
		{ "a1 FETCHX 1 FLAGS", CL_RERUN_NO },
		{ "a1 IDLE", CL_RERUN_IDLE },
		{ "a1 idle", CL_RERUN_IDLE },
		{ "a1 APPEND INBOX {12}", CL_RERUN_APPEND },
		{ "a1 APPEND INBOX (\\Seen) {12+}", CL_RERUN_APPEND },
	};
	struct client *c = client_zero();
	struct cl_pend *p;
	size_t i;

	(void)state;
	for (i = 0; i < nitems(cases); i++) {
		/* A copy of an earlier command must not carry over. */
		c->cl_replay_on = !c->cl_replay_on;
		c->cl_replay_len = 5;
		p = start(c, cases[i].line, 0);
		if (p->rerun != cases[i].want)
			fail_msg("\"%s\": rerun %d, want %d", cases[i].line,
			    p->rerun, cases[i].want);
		assert_int_equal(c->cl_replay_on, cases[i].want != CL_RERUN_NO);
		assert_int_equal(c->cl_replay_len, 0);
		assert_null(p->select_cmd);	/* selects was 0 */
		cl_ring_pop(&c->cl_ring);
	}
	client_done(c);
}

static void
test_rerun_append_mailbox(void **state)
{
	struct client *c = client_zero();
	struct cl_pend *p;

	(void)state;
	p = start(c, "a2 APPEND \"INBOX\" {12}", 0);
	assert_int_equal(p->rerun, CL_RERUN_APPEND);
	assert_string_equal(c->cl_append_mbox, "\"INBOX\"");
	/* An APPEND's copy holds its whole message. */
	assert_true(c->cl_replay_on);
	assert_int_equal(c->cl_replay_max,
	    cfg->max_literal_bytes + 2 * cfg->max_command_bytes);

	/* The next APPEND replaces it (the old one freed: ASan). */
	p = start(c, "a3 APPEND Voicemail (\\Seen) {12}", 0);
	assert_int_equal(p->rerun, CL_RERUN_APPEND);
	assert_string_equal(c->cl_append_mbox, "Voicemail");

	/* Quoted, escapes and all, as the client wrote it. */
	p = start(c, "a4 APPEND \"Sent \\\"x\\\"\" {5}", 0);
	assert_string_equal(c->cl_append_mbox, "\"Sent \\\"x\\\"\"");

	/* A read-only command keeps up to 64 KiB (DESIGN R11). */
	p = start(c, "a5 FETCH 1 BODY[]", 0);
	assert_int_equal(c->cl_replay_max, 64 * 1024);
	client_done(c);

	/* A mailbox name sent as a literal: not kept, no exactly-once. */
	c = client_zero();
	p = start(c, "a6 APPEND {5}", 0);
	assert_int_equal(p->rerun, CL_RERUN_NO);
	assert_null(c->cl_append_mbox);
	assert_false(c->cl_replay_on);
	client_done(c);
}

static void
test_rerun_select_cmd(void **state)
{
	struct client *c = client_zero();
	struct cl_pend *p;

	(void)state;
	p = start(c, "s1 SELECT INBOX", 1);
	assert_non_null(p->select_cmd);
	assert_string_equal(p->select_cmd, "SELECT INBOX");
	p = start(c, "s2 examine \"Sent Items\"", 1);
	assert_string_equal(p->select_cmd, "examine \"Sent Items\"");
	/* A literal argument: the command cannot be redone from its line. */
	p = start(c, "s3 SELECT {5}", 1);
	assert_null(p->select_cmd);
	p = start(c, "s4 SELECT {5+}", 1);
	assert_null(p->select_cmd);
	/* Not a select as the relay saw it. */
	p = start(c, "s5 SELECT INBOX", 0);
	assert_null(p->select_cmd);
	p = start(c, "s6 UNSELECT", -1);
	assert_null(p->select_cmd);
	/* The ring frees what was kept (ASan). */
	assert_int_equal(c->cl_ring.r_len, 6);
	client_done(c);
}

/* The copy kept for a re-run: on, bounded, and its memory given back
 * after a big command. */
static void
test_rerun_replay_copy(void **state)
{
	struct client *c = client_zero();
	char *kept, *room;

	(void)state;
	start(c, "k1 FETCH 1 BODY[]", 0);
	cl_keep(c, "k1 FETCH 1 BODY[]\r\n", 19);
	assert_int_equal(c->cl_replay_len, 19);
	assert_memory_equal(c->cl_replay, "k1 FETCH 1 BODY[]\r\n", 19);
	/* Past the bound the copy is dropped: no re-run. */
	assert_null(cl_keep_room(c, c->cl_replay_max));
	assert_false(c->cl_replay_on);
	assert_int_equal(c->cl_replay_len, 0);

	/* A small buffer is kept from command to command... */
	kept = c->cl_replay;
	start(c, "k2 NOOP", 0);
	assert_ptr_equal(c->cl_replay, kept);
	assert_int_equal(c->cl_replay_len, 0);
	/* ...a STORE keeps nothing... */
	start(c, "k3 STORE 1 +FLAGS (\\Seen)", 0);
	assert_false(c->cl_replay_on);
	assert_null(cl_keep_room(c, 1));
	/* ...and a big one (an APPEND's message) is given back. */
	start(c, "k4 APPEND INBOX {200000}", 0);
	room = cl_keep_room(c, 200000);
	assert_non_null(room);
	memset(room, 'm', 200000);
	assert_true(c->cl_replay_cap >= 200000);
	start(c, "k5 NOOP", 0);
	assert_true(c->cl_replay_cap < 200000);
	assert_int_equal(c->cl_replay_len, 0);
	assert_true(c->cl_replay_on);
	client_done(c);
}

/* ------------------------------------------------------- the state table */

#define ST(s) CL_S_##s

/* DESIGN.md A.3 "Transitions", one line each (CLOSING aside). */
static const struct {
	enum cl_state from, to;
} design_edges[] = {
	{ ST(HANDSHAKE), ST(NOTAUTH) },
	{ ST(NOTAUTH), ST(STARTTLS) },
	{ ST(NOTAUTH), ST(SASL) },
	{ ST(NOTAUTH), ST(AUTHDELAY) },
	{ ST(NOTAUTH), ST(LOGGING_IN) },
	{ ST(STARTTLS), ST(NOTAUTH) },
	{ ST(SASL), ST(NOTAUTH) },
	{ ST(SASL), ST(AUTHDELAY) },
	{ ST(SASL), ST(LOGGING_IN) },
	{ ST(AUTHDELAY), ST(NOTAUTH) },
	{ ST(LOGGING_IN), ST(ATTACHED) },
	{ ST(LOGGING_IN), ST(NOTAUTH) },
	{ ST(ATTACHED), ST(IDLE) },
	{ ST(ATTACHED), ST(PARKING) },
	{ ST(ATTACHED), ST(RECOVERING) },
	{ ST(IDLE), ST(ATTACHED) },
	{ ST(IDLE), ST(IDLE_RENEW) },
	{ ST(IDLE), ST(IDLE_ENDING) },
	{ ST(IDLE_RENEW), ST(IDLE_RESUME) },
	{ ST(IDLE_RESUME), ST(IDLE) },
	{ ST(IDLE_RESUME), ST(ATTACHED) },
	{ ST(IDLE_ENDING), ST(PARKING_IDLE) },
	{ ST(PARKING), ST(PARKED) },
	{ ST(PARKING), ST(ATTACHED) },
	{ ST(PARKING_IDLE), ST(PARKED_IDLE) },
	{ ST(PARKING_IDLE), ST(IDLE_RESUME) },
	{ ST(PARKED), ST(ATTACHING) },
	{ ST(PARKED_IDLE), ST(PARKED) },
	{ ST(PARKED_IDLE), ST(POLLING) },
	{ ST(ATTACHING), ST(ATTACHED) },
	{ ST(ATTACHING), ST(PARKED) },
	{ ST(POLLING), ST(IDLE_RESUME) },
	{ ST(POLLING), ST(PARKED_IDLE) },
	{ ST(RECOVERING), ST(ATTACHED) },
	{ ST(RECOVERING), ST(IDLE_RESUME) },
	{ ST(IDLE), ST(RECOVERING) },
	{ ST(IDLE_RENEW), ST(RECOVERING) },
	{ ST(IDLE_RESUME), ST(RECOVERING) },
	{ ST(IDLE_ENDING), ST(RECOVERING) },
	{ ST(PARKING), ST(RECOVERING) },
	{ ST(PARKING_IDLE), ST(RECOVERING) },
};

static bool
design_legal(enum cl_state from, enum cl_state to)
{
	size_t i;

	if (from == CL_S_CLOSING)
		return false;
	if (to == CL_S_CLOSING)
		return true;
	for (i = 0; i < nitems(design_edges); i++)
		if (design_edges[i].from == from && design_edges[i].to == to)
			return true;
	return false;
}

/* The code's table is the design's, pair by pair. */
static void
test_state_table_is_design(void **state)
{
	int from, to;

	(void)state;
	for (from = 0; from < CL_S_COUNT; from++)
		for (to = 0; to < CL_S_COUNT; to++)
			if (cl_state_legal(from, to) != design_legal(from, to))
				fail_msg("%s -> %s: legal %d, DESIGN says %d",
				    cl_state_name(from), cl_state_name(to),
				    cl_state_legal(from, to),
				    design_legal(from, to));
}

static void
test_state_named_transitions(void **state)
{
	int s;

	(void)state;
	for (s = 0; s < CL_S_COUNT; s++) {
		if (s != CL_S_CLOSING)
			assert_true(cl_state_legal(s, CL_S_CLOSING));
		assert_false(cl_state_legal(CL_S_CLOSING, s));
		assert_false(cl_state_legal(s, s) && s != CL_S_CLOSING);
	}
	assert_true(cl_state_legal(CL_S_IDLE, CL_S_IDLE_ENDING));
	assert_true(cl_state_legal(CL_S_IDLE_ENDING, CL_S_PARKING_IDLE));
	assert_true(cl_state_legal(CL_S_PARKING_IDLE, CL_S_IDLE_RESUME));
	assert_true(cl_state_legal(CL_S_POLLING, CL_S_PARKED_IDLE));
	assert_true(cl_state_legal(CL_S_RECOVERING, CL_S_IDLE_RESUME));
	assert_true(cl_state_legal(CL_S_IDLE, CL_S_ATTACHED));
	assert_false(cl_state_legal(CL_S_PARKED, CL_S_ATTACHED));
	assert_false(cl_state_legal(CL_S_HANDSHAKE, CL_S_ATTACHED));
	assert_false(cl_state_legal(CL_S_ATTACHED, CL_S_PARKED));
	assert_false(cl_state_legal(CL_S_NOTAUTH, CL_S_ATTACHED));
	assert_false(cl_state_legal(CL_S_PARKED_IDLE, CL_S_IDLE));
	assert_false(cl_state_legal(CL_S_RECOVERING, CL_S_PARKED));
}

/* No dead rows: every state but the two a session starts in is entered
 * from another, and all are reachable from those two. */
static void
test_state_reachable(void **state)
{
	bool seen[CL_S_COUNT] = { false };
	int queue[CL_S_COUNT], qh = 0, qt = 0, s, to;

	(void)state;
	for (to = 0; to < CL_S_COUNT; to++) {
		bool entered = false;

		for (s = 0; s < CL_S_COUNT; s++)
			entered |= s != to && cl_state_legal(s, to);
		if (to == CL_S_HANDSHAKE)
			assert_false(entered);	/* only at accept */
		else if (!entered)
			fail_msg("nothing enters %s", cl_state_name(to));
	}
	seen[CL_S_HANDSHAKE] = seen[CL_S_NOTAUTH] = true;
	queue[qt++] = CL_S_HANDSHAKE;
	queue[qt++] = CL_S_NOTAUTH;
	while (qh < qt) {
		s = queue[qh++];
		for (to = 0; to < CL_S_COUNT; to++)
			if (!seen[to] && cl_state_legal(s, to)) {
				seen[to] = true;
				queue[qt++] = to;
			}
	}
	for (s = 0; s < CL_S_COUNT; s++)
		if (!seen[s])
			fail_msg("%s unreachable", cl_state_name(s));
}

/* DESIGN.md A.3 "read" column. */
static void
test_state_reads(void **state)
{
	static const enum cl_state on[] = {
		ST(HANDSHAKE), ST(NOTAUTH), ST(STARTTLS), ST(SASL),
		ST(ATTACHED), ST(IDLE), ST(PARKED), ST(PARKED_IDLE),
		ST(RECOVERING),
	};
	static const enum cl_state off[] = {
		ST(AUTHDELAY), ST(LOGGING_IN), ST(IDLE_RENEW), ST(IDLE_RESUME),
		ST(IDLE_ENDING), ST(PARKING), ST(PARKING_IDLE), ST(ATTACHING),
		ST(POLLING), ST(CLOSING),
	};
	size_t i;

	(void)state;
	_Static_assert(nitems(on) + nitems(off) == CL_S_COUNT, "every state");
	for (i = 0; i < nitems(on); i++)
		if (!cl_state_reads(on[i]))
			fail_msg("%s should read", cl_state_name(on[i]));
	for (i = 0; i < nitems(off); i++)
		if (cl_state_reads(off[i]))
			fail_msg("%s should not read", cl_state_name(off[i]));
}

/* DESIGN.md A.3 "Gauge": imapshim_clients{state}. */
static void
test_state_kind(void **state)
{
	static const struct {
		enum cl_state st;
		enum client_kind kind;
	} want[] = {
		{ ST(HANDSHAKE), CLIENT_UNAUTHENTICATED },
		{ ST(NOTAUTH), CLIENT_UNAUTHENTICATED },
		{ ST(STARTTLS), CLIENT_UNAUTHENTICATED },
		{ ST(SASL), CLIENT_UNAUTHENTICATED },
		{ ST(AUTHDELAY), CLIENT_UNAUTHENTICATED },
		{ ST(LOGGING_IN), CLIENT_WAITING },
		{ ST(ATTACHED), CLIENT_ATTACHED },
		{ ST(IDLE), CLIENT_ATTACHED },
		{ ST(IDLE_RENEW), CLIENT_ATTACHED },
		{ ST(IDLE_RESUME), CLIENT_ATTACHED },
		{ ST(IDLE_ENDING), CLIENT_ATTACHED },
		{ ST(PARKING), CLIENT_ATTACHED },
		{ ST(PARKING_IDLE), CLIENT_ATTACHED },
		{ ST(PARKED), CLIENT_PARKED },
		{ ST(PARKED_IDLE), CLIENT_PARKED },
		{ ST(ATTACHING), CLIENT_WAITING },
		{ ST(POLLING), CLIENT_WAITING },
		{ ST(RECOVERING), CLIENT_WAITING },
	};
	size_t i;

	(void)state;
	_Static_assert(nitems(want) == CL_S_COUNT - 1, "every state but one");
	for (i = 0; i < nitems(want); i++)
		if (cl_state_kind(want[i].st) != want[i].kind)
			fail_msg("%s counts as %s, want %s",
			    cl_state_name(want[i].st),
			    cl_state_kind(want[i].st) < CLIENT_KIND_COUNT ?
			    client_kind_names[cl_state_kind(want[i].st)] : "-",
			    client_kind_names[want[i].kind]);
	/* RECOVERING holds no session: not attached. */
	assert_int_not_equal(cl_state_kind(CL_S_RECOVERING), CLIENT_ATTACHED);
	/* CLOSING is counted under no kind. */
	assert_true(cl_state_kind(CL_S_CLOSING) >= CLIENT_KIND_COUNT);
}

/* Names go into logs: each state has its own. */
static void
test_state_names(void **state)
{
	int a, b;

	(void)state;
	for (a = 0; a < CL_S_COUNT; a++) {
		assert_non_null(cl_state_name(a));
		assert_true(cl_state_name(a)[0] != '\0');
		for (b = 0; b < a; b++)
			assert_string_not_equal(cl_state_name(a),
			    cl_state_name(b));
	}
	assert_string_equal(cl_state_name(CL_S_PARKING_IDLE), "parking-idle");
}

/* ---------------------------------------------------------- cl_line_tag */

static void
expect_tag(const char *line, size_t len, const char *want)
{
	char tag[IMAPSHIM_TAG_MAX + 1];

	memset(tag, '#', sizeof(tag));
	assert_ptr_equal(cl_line_tag(line, len, tag), tag);
	if (strcmp(tag, want) != 0)
		fail_msg("tag of \"%.*s\": \"%s\", want \"%s\"", (int)len, line,
		    tag, want);
}

#define TAG(line, want) expect_tag(line, strlen(line), want)

static void
test_line_tag(void **state)
{
	char line[IMAPSHIM_TAG_MAX + 16], want[IMAPSHIM_TAG_MAX + 1];

	(void)state;
	TAG("a001 FETCH 1 FLAGS", "a001");
	TAG("x.y-z_1 NOOP", "x.y-z_1");
	TAG("A LOGIN \"u\" \"p\"", "A");
	/* No tag: "*" for the error reply. */
	TAG("", "*");
	TAG(" NOOP", "*");
	TAG("a001", "*");		/* no space after it */
	TAG("a001\r\n", "*");
	TAG("* OK hello", "*");
	TAG("+ go", "*");
	TAG("a+b NOOP", "*");
	TAG("a*b NOOP", "*");
	TAG("a{5} NOOP", "*");
	TAG("\"a\" NOOP", "*");
	TAG("a\tb NOOP", "*");
	TAG("\xc3\xa9 NOOP", "*");
	TAG("a\x7f NOOP", "*");
	/* Only len bytes are read. */
	expect_tag("a001 NOOP", 4, "*");
	expect_tag("a001 NOOP", 5, "a001");
	expect_tag("a001 NOOP", 0, "*");

	/* The longest tag kept, and one byte more. */
	memset(want, 't', IMAPSHIM_TAG_MAX);
	want[IMAPSHIM_TAG_MAX] = '\0';
	snprintf(line, sizeof(line), "%s NOOP", want);
	TAG(line, want);
	snprintf(line, sizeof(line), "%su NOOP", want);
	TAG(line, "*");
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_ring_grow_wrapped),
		cmocka_unit_test(test_ring_against_model),
		cmocka_unit_test(test_ring_push_zeroes),
		cmocka_unit_test(test_ring_tag_cut),
		cmocka_unit_test(test_ring_find),
		cmocka_unit_test(test_ring_inflight),
		cmocka_unit_test(test_ring_clear),
		cmocka_unit_test(test_msgid_found),
		cmocka_unit_test(test_msgid_case_and_space),
		cmocka_unit_test(test_msgid_not_found),
		cmocka_unit_test(test_poll_due),
		cmocka_unit_test(test_msgid_refused),
		cmocka_unit_test(test_msgid_bad_buffer),
		cmocka_unit_test(test_rerun_kinds),
		cmocka_unit_test(test_rerun_append_mailbox),
		cmocka_unit_test(test_rerun_select_cmd),
		cmocka_unit_test(test_rerun_replay_copy),
		cmocka_unit_test(test_state_table_is_design),
		cmocka_unit_test(test_state_named_transitions),
		cmocka_unit_test(test_state_reachable),
		cmocka_unit_test(test_state_reads),
		cmocka_unit_test(test_state_kind),
		cmocka_unit_test(test_state_names),
		cmocka_unit_test(test_line_tag),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
