/*
 * fuzz_resync.c - libFuzzer harness for resync.c (mailbox snapshots and
 * their diff), written against resync.h.
 *
 * Input:
 *   byte 0        mode: bits 0-1 = 3 builds cur independently of old,
 *                 else cur is old after random mailbox operations;
 *                 bit 2 changes UIDVALIDITY; bit 3 adds a UID below old's
 *                 highest that old never had (a message the client's
 *                 numbering cannot hold)
 *   bytes 1-4     UIDVALIDITY
 *   byte 5        messages in old
 *   then          per message: UID step, flag-list choice; then operations
 *
 * A simulated client holds what it was told (old) and applies the emitted
 * events as an IMAP client would: EXPUNGE removes msn (old numbering,
 * highest first, before anything else), EXISTS grows the list to count
 * (the client fetches the new messages), FLAGS replaces msn's flags (new
 * numbering).  Properties:
 *
 *   - resync_diff fails (-1, nothing emitted) exactly when UIDVALIDITY
 *     differs or cur has a UID below old's highest that old never had;
 *   - otherwise the events come in order (EXPUNGEs strictly descending,
 *     at most one EXISTS, then FLAGS), every msn is in range, and after
 *     applying them the client's list equals cur: same UIDs in the same
 *     order, same flag digests; no FLAGS event for a message whose
 *     flags the client already had right;
 *   - snapshot calls reject bad msns and non-ascending UIDs, find() agrees
 *     with the list, and the flags digest ignores order, case, spacing and
 *     \Recent, and is never 0.
 */
#include <ctype.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "resync.h"

#define CHECK(cond) do { \
	if (!(cond)) { \
		fprintf(stderr, "%s:%d: property failed: %s\n", __FILE__, \
		    __LINE__, #cond); \
		abort(); \
	} \
} while (0)

static const char *const flag_lists[] = {
	"",
	"\\Seen",
	"\\Seen \\Flagged",
	"\\Flagged \\Seen",
	"\\Deleted",
	"\\Answered \\Seen $Label1",
	"\\Recent",
	"\\Seen \\Recent",
	"$Forwarded NonJunk",
	"\\Draft",
};
#define N_FLAG_LISTS (sizeof(flag_lists) / sizeof(flag_lists[0]))

struct in {
	const uint8_t *p, *end;
};

static unsigned
take(struct in *in)
{
	return in->p < in->end ? *in->p++ : 0;
}

static bool
more(const struct in *in)
{
	return in->p < in->end;
}

static uint32_t
digest_of(unsigned choice)
{
	const char *s = flag_lists[choice % N_FLAG_LISTS];
	uint32_t d = resync_flags_digest(s, strlen(s));

	CHECK(d != 0);
	return d;
}

/* Scramble a flag list: reverse token order, flip case, pad spaces, add
 * \Recent.  The digest must not change. */
static void
check_digest_invariance(const char *s, size_t len, unsigned how)
{
	char out[1024], tok[64][64];
	size_t ntok = 0, i, j, o = 0;
	const char *p = s, *end = s + len;
	uint32_t d1, d2;

	if (len > 400)
		return;
	while (p < end && ntok < 64) {
		while (p < end && *p == ' ')
			p++;
		if (p >= end)
			break;
		for (j = 0; p < end && *p != ' ' && j < 63; p++, j++) {
			unsigned char c = (unsigned char)*p;

			/* Keep to flag-like bytes: atoms and backslash. */
			if (c <= 0x20 || c >= 0x7f || c == '(' || c == ')' ||
			    c == '"' || c == '{')
				return;
			tok[ntok][j] = (char)c;
		}
		if (j == 63)
			return;
		tok[ntok][j] = '\0';
		ntok++;
	}
	if (p < end)
		return;
	d1 = resync_flags_digest(s, len);
	CHECK(d1 != 0);
	for (i = ntok; i-- > 0;) {
		for (j = 0; tok[i][j] != '\0'; j++) {
			char c = tok[i][j];

			if (how & 1)
				c = (char)(isupper((unsigned char)c) ?
				    tolower((unsigned char)c) :
				    toupper((unsigned char)c));
			out[o++] = c;
		}
		out[o++] = ' ';
		if (how & 2)
			out[o++] = ' ';
	}
	if (how & 4) {
		memcpy(out + o, "\\Recent ", 8);
		o += 8;
	}
	if (o > 0 && !(how & 8))
		o--;		/* drop the trailing space */
	d2 = resync_flags_digest(out, o);
	CHECK(d1 == d2);
}

/* --------------------------------------------------------- client model */

struct cmsg {
	uint32_t uid, flags;
	bool is_new;
};

struct client {
	struct cmsg *m;
	size_t n, cap;
	const struct resync_snap *cur;
	int phase;		/* 0 expunges, 1 exists, 2 flags */
	size_t last_expunge;	/* msn of the previous EXPUNGE, 0: none */
	bool saw_exists;
	size_t events;
};

static void
client_emit(void *arg, enum resync_ev ev, size_t v)
{
	struct client *c = arg;
	size_t i;

	c->events++;
	switch (ev) {
	case RESYNC_EXPUNGE:
		CHECK(c->phase == 0);
		CHECK(v >= 1 && v <= c->n);
		CHECK(c->last_expunge == 0 || v < c->last_expunge);
		c->last_expunge = v;
		memmove(&c->m[v - 1], &c->m[v], (c->n - v) * sizeof(c->m[0]));
		c->n--;
		break;
	case RESYNC_EXISTS:
		CHECK(c->phase <= 1 && !c->saw_exists);
		c->phase = 1;
		c->saw_exists = true;
		CHECK(v >= c->n);
		CHECK(v == c->cur->rs_n);
		if (v > c->cap) {
			c->cap = v;
			c->m = realloc(c->m, c->cap * sizeof(c->m[0]));
			CHECK(c->m != NULL);
		}
		/* The client fetches the new messages: UID and FLAGS. */
		for (i = c->n; i < v; i++) {
			c->m[i].uid = c->cur->rs_msgs[i].rm_uid;
			c->m[i].flags = c->cur->rs_msgs[i].rm_flags;
			c->m[i].is_new = true;
		}
		c->n = v;
		break;
	case RESYNC_FLAGS:
		c->phase = 2;
		CHECK(v >= 1 && v <= c->n && v <= c->cur->rs_n);
		/* No news is no event (new messages were just fetched). */
		if (!c->m[v - 1].is_new)
			CHECK(c->m[v - 1].flags != c->cur->rs_msgs[v - 1].rm_flags);
		c->m[v - 1].flags = c->cur->rs_msgs[v - 1].rm_flags;
		break;
	default:
		CHECK(!"unknown event");
	}
}

/* ---------------------------------------------------------- snapshots */

static uint32_t
snap_max_uid(const struct resync_snap *s)
{
	return s->rs_n > 0 ? s->rs_msgs[s->rs_n - 1].rm_uid : 0;
}

static void
snap_check(const struct resync_snap *s)
{
	size_t i;

	for (i = 0; i < s->rs_n; i++) {
		if (i > 0)
			CHECK(s->rs_msgs[i].rm_uid > s->rs_msgs[i - 1].rm_uid);
		CHECK(resync_snap_find(s, s->rs_msgs[i].rm_uid) == i + 1);
	}
	CHECK(resync_snap_find(s, 0) == 0);
	if (s->rs_n > 0 && snap_max_uid(s) < UINT32_MAX)
		CHECK(resync_snap_find(s, snap_max_uid(s) + 1) == 0);
	CHECK(resync_snap_set_flags((struct resync_snap *)s, 0, 1) == -1);
	CHECK(resync_snap_set_flags((struct resync_snap *)s, s->rs_n + 1, 1) == -1);
}

/* Append count messages with ascending UIDs starting above *uid. */
static void
snap_fill(struct resync_snap *s, struct in *in, size_t count, uint32_t *uid)
{
	size_t i;
	unsigned step;

	for (i = 0; i < count && more(in); i++) {
		step = take(in);
		/* Mostly dense UIDs, sometimes gaps, rarely near the top. */
		if (step == 0xff)
			*uid = UINT32_MAX - 1 - take(in);
		else
			*uid += 1 + (step & 0x80 ? (step & 0x7f) * 100u : step % 3);
		if (*uid == 0)
			*uid = 1;
		if (resync_snap_append(s, *uid, digest_of(take(in))) == -1) {
			/* only for a UID not above the previous one */
			CHECK(s->rs_n > 0 && *uid <= snap_max_uid(s));
			return;
		}
		/* Not ascending: refused, nothing changes. */
		CHECK(resync_snap_append(s, *uid, 1) == -1);
		CHECK(s->rs_msgs[s->rs_n - 1].rm_uid == *uid);
	}
}

static bool
snap_has(const struct resync_snap *s, uint32_t uid)
{
	size_t i;

	for (i = 0; i < s->rs_n; i++)
		if (s->rs_msgs[i].rm_uid == uid)
			return true;
	return false;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct resync_snap old, cur;
	struct client cl;
	struct in in = { data, data + size };
	unsigned mode, op, how;
	uint32_t uidv, uid, old_max;
	size_t nold, i, msn, n;
	bool expect_fail;
	int r;

	if (size < 6 || size > 16384)
		return 0;
	mode = take(&in);
	uidv = (uint32_t)take(&in) | (uint32_t)take(&in) << 8 |
	    (uint32_t)take(&in) << 16 | (uint32_t)take(&in) << 24;
	nold = take(&in);

	resync_snap_init(&old);
	resync_snap_init(&cur);
	old.rs_uidvalidity = uidv;
	uid = 0;
	snap_fill(&old, &in, nold, &uid);
	snap_check(&old);
	old_max = snap_max_uid(&old);

	cur.rs_uidvalidity = (mode & 4) ? uidv + 1 : uidv;
	if ((mode & 3) == 3) {
		/* Independent: any UIDs at all. */
		uid = take(&in);
		snap_fill(&cur, &in, take(&in), &uid);
	} else {
		uint32_t next = old_max;

		for (i = 0; i < old.rs_n; i++)
			CHECK(resync_snap_append(&cur, old.rs_msgs[i].rm_uid,
			    old.rs_msgs[i].rm_flags) == 0);
		n = take(&in) % 64;
		while (n-- > 0 && more(&in)) {
			op = take(&in);
			switch (op % 4) {
			case 0:		/* someone expunged a message */
			case 3:
				if (cur.rs_n == 0)
					break;
				msn = 1 + take(&in) % cur.rs_n;
				CHECK(resync_snap_expunge(&cur, msn) == 0);
				break;
			case 1:		/* flags changed */
				if (cur.rs_n == 0)
					break;
				msn = 1 + take(&in) % cur.rs_n;
				CHECK(resync_snap_set_flags(&cur, msn,
				    digest_of(take(&in))) == 0);
				break;
			case 2:		/* a message arrived */
				if (snap_max_uid(&cur) > next)
					next = snap_max_uid(&cur);
				if (next >= UINT32_MAX - 300)
					break;
				next += 1 + take(&in) % 5;
				CHECK(resync_snap_append(&cur, next,
				    digest_of(take(&in))) == 0);
				break;
			}
		}
		if ((mode & 8) && old_max > 1) {
			/* Rebuild cur with a UID old never had, below old_max. */
			struct resync_snap bad;
			uint32_t hole = 0;

			for (uid = 1; uid < old_max; uid++)
				if (!snap_has(&old, uid)) {
					hole = uid;
					break;
				}
			if (hole != 0) {
				resync_snap_init(&bad);
				bad.rs_uidvalidity = cur.rs_uidvalidity;
				for (i = 0; i < cur.rs_n && cur.rs_msgs[i].rm_uid < hole; i++)
					CHECK(resync_snap_append(&bad,
					    cur.rs_msgs[i].rm_uid,
					    cur.rs_msgs[i].rm_flags) == 0);
				CHECK(resync_snap_append(&bad, hole, 1) == 0);
				for (; i < cur.rs_n; i++)
					CHECK(resync_snap_append(&bad,
					    cur.rs_msgs[i].rm_uid,
					    cur.rs_msgs[i].rm_flags) == 0);
				resync_snap_free(&cur);
				cur = bad;
			}
		}
	}
	snap_check(&cur);
	CHECK(resync_snap_expunge(&cur, 0) == -1);
	CHECK(resync_snap_expunge(&cur, cur.rs_n + 1) == -1);

	/* The oracle. */
	expect_fail = cur.rs_uidvalidity != old.rs_uidvalidity;
	for (i = 0; i < cur.rs_n; i++)
		if (cur.rs_msgs[i].rm_uid < old_max &&
		    resync_snap_find(&old, cur.rs_msgs[i].rm_uid) == 0)
			expect_fail = true;

	memset(&cl, 0, sizeof(cl));
	cl.cur = &cur;
	cl.cap = old.rs_n > 0 ? old.rs_n : 1;
	cl.m = calloc(cl.cap, sizeof(cl.m[0]));
	CHECK(cl.m != NULL);
	for (i = 0; i < old.rs_n; i++) {
		cl.m[i].uid = old.rs_msgs[i].rm_uid;
		cl.m[i].flags = old.rs_msgs[i].rm_flags;
	}
	cl.n = old.rs_n;

	r = resync_diff(&old, &cur, client_emit, &cl);
	CHECK(r == 0 || r == -1);
	if (expect_fail) {
		CHECK(r == -1);
		CHECK(cl.events == 0);
	} else {
		CHECK(r == 0);
		CHECK(cl.n == cur.rs_n);
		for (i = 0; i < cl.n; i++) {
			CHECK(cl.m[i].uid == cur.rs_msgs[i].rm_uid);
			CHECK(cl.m[i].flags == cur.rs_msgs[i].rm_flags);
		}
	}
	/* Diffing a snapshot against itself says nothing. */
	free(cl.m);
	{
		struct client self;

		memset(&self, 0, sizeof(self));
		self.cur = &old;
		self.cap = old.rs_n > 0 ? old.rs_n : 1;
		self.m = calloc(self.cap, sizeof(self.m[0]));
		CHECK(self.m != NULL);
		for (i = 0; i < old.rs_n; i++) {
			self.m[i].uid = old.rs_msgs[i].rm_uid;
			self.m[i].flags = old.rs_msgs[i].rm_flags;
		}
		self.n = old.rs_n;
		CHECK(resync_diff(&old, &old, client_emit, &self) == 0);
		CHECK(self.events == 0);
		free(self.m);
	}

	/* The rest of the input as a flag list. */
	how = mode >> 4;
	check_digest_invariance((const char *)in.p, (size_t)(in.end - in.p), how);

	resync_snap_clear(&cur);
	CHECK(cur.rs_n == 0);
	resync_snap_free(&old);
	resync_snap_free(&cur);
	return 0;
}
