/*
 * test_resync.c - flag digests, snapshots, and the diff checked against a
 * simulated IMAP client.
 *
 * The client model: it starts from old (what it was told), applies each
 * emitted response as RFC 3501 says a client must (EXPUNGE n removes
 * message n and renumbers the later ones, EXISTS N makes the mailbox N
 * messages long and the client fetches the new ones, FETCH FLAGS replaces
 * message n's flags), and must end up with exactly cur.  The counts of
 * each response are checked against an independent set computation, so a
 * diff that sends too much fails as well as one that sends too little.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "resync.h"

#define D(s) resync_flags_digest((s), strlen(s))

/* ------------------------------------------------------------ helpers */

static uint64_t rng_state;

static void
rng_seed(uint64_t seed)
{
	rng_state = seed * 0x9e3779b97f4a7c15ULL + 1;
}

static uint32_t
rng(void)
{
	/* xorshift64*: deterministic per seed, so a failure names its seed. */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (uint32_t)((rng_state * 0x2545f4914f6cdd1dULL) >> 32);
}

static uint32_t
rng_below(uint32_t n)
{
	return rng() % n;
}

struct ev {
	enum resync_ev e;
	size_t n;
};

struct evlog {
	struct ev *v;
	size_t n, cap;
};

static void
record_cb(void *arg, enum resync_ev e, size_t n)
{
	struct evlog *l = arg;

	if (l->n == l->cap) {
		l->cap = l->cap ? l->cap * 2 : 16;
		l->v = realloc(l->v, l->cap * sizeof(*l->v));
		assert_non_null(l->v);
	}
	l->v[l->n].e = e;
	l->v[l->n].n = n;
	l->n++;
}

static void
evlog_free(struct evlog *l)
{
	free(l->v);
	memset(l, 0, sizeof(*l));
}

static void
snap_build(struct resync_snap *s, uint32_t uidvalidity, const uint32_t *uids,
    const uint32_t *flags, size_t n)
{
	size_t i;

	resync_snap_init(s);
	s->rs_uidvalidity = uidvalidity;
	for (i = 0; i < n; i++)
		assert_int_equal(resync_snap_append(s, uids[i],
		    flags != NULL ? flags[i] : 1), 0);
}

static const char *
ev_name(enum resync_ev e)
{
	return e == RESYNC_EXPUNGE ? "EXPUNGE" : e == RESYNC_EXISTS ?
	    "EXISTS" : "FLAGS";
}

/* Failures inside the shared checker name the case (seed or test). */
static const char *check_ctx = "";

#define CHECK(cond) do {						\
	if (!(cond))							\
		fail_msg("%s: %s (line %d)", check_ctx, #cond, __LINE__); \
} while (0)

/* Drops the messages marked expunged from the client's view. */
static size_t
compact(struct resync_msg *view, bool *gone, size_t n)
{
	size_t k, m = 0;

	for (k = 0; k < n; k++) {
		if (!gone[k])
			view[m++] = view[k];
		gone[k] = false;
	}
	return m;
}

/*
 * Checks one successful diff's responses: their order and ranges, that
 * the simulated client ends at cur, and that no response is redundant.
 */
static void
check_client(const struct resync_snap *old, const struct resync_snap *cur,
    const struct evlog *l)
{
	struct resync_msg *view;
	bool *gone;
	size_t n = old->rs_n, cap, i, k, npending = 0, last = SIZE_MAX;
	size_t nexp = 0, nexists = 0, nflags = 0, want_exp = 0, want_flags = 0;
	bool want_exists = false;
	int phase = 0;

	cap = (old->rs_n > cur->rs_n ? old->rs_n : cur->rs_n) + 1;
	view = malloc(cap * sizeof(*view));
	gone = calloc(cap, sizeof(*gone));
	assert_non_null(view);
	assert_non_null(gone);
	if (n > 0)
		memcpy(view, old->rs_msgs, n * sizeof(*view));

	for (i = 0; i < l->n; i++) {
		const struct ev *e = &l->v[i];

		switch (e->e) {
		case RESYNC_EXPUNGE:
			/* All expunges first, strictly descending: each msn
			 * is then an index into the array as old had it, so
			 * marking now and compacting later is exact. */
			CHECK(phase == 0);
			CHECK(e->n >= 1 && e->n <= n - npending);
			CHECK(e->n < last);
			last = e->n;
			gone[e->n - 1] = true;
			npending++;
			nexp++;
			break;
		case RESYNC_EXISTS:
			CHECK(phase == 0);
			phase = 1;
			if (npending > 0)
				n = compact(view, gone, n);
			npending = 0;
			/* EXISTS never shrinks a mailbox: only EXPUNGE does. */
			CHECK(e->n > n);
			CHECK(e->n <= cur->rs_n);
			for (; n < e->n; n++)
				view[n] = cur->rs_msgs[n];	/* the client fetches */
			nexists++;
			break;
		case RESYNC_FLAGS:
			if (npending > 0)
				n = compact(view, gone, n);
			npending = 0;
			CHECK(phase <= 2);
			if (phase < 2)
				last = 0;
			phase = 2;
			CHECK(e->n > last);
			last = e->n;
			CHECK(e->n >= 1 && e->n <= n);
			CHECK(e->n <= cur->rs_n);
			view[e->n - 1].rm_flags = cur->rs_msgs[e->n - 1].rm_flags;
			nflags++;
			break;
		default:
			fail_msg("%s: unknown event %d", check_ctx, (int)e->e);
		}
	}
	n = compact(view, gone, n);

	CHECK(n == cur->rs_n);
	for (i = 0; i < n; i++) {
		CHECK(view[i].rm_uid == cur->rs_msgs[i].rm_uid);
		CHECK(view[i].rm_flags == cur->rs_msgs[i].rm_flags);
	}

	/* Minimality, from set membership rather than a merge. */
	for (i = 0; i < old->rs_n; i++) {
		k = resync_snap_find(cur, old->rs_msgs[i].rm_uid);
		if (k == 0)
			want_exp++;
		else if (cur->rs_msgs[k - 1].rm_flags != old->rs_msgs[i].rm_flags)
			want_flags++;
	}
	for (i = 0; i < cur->rs_n; i++)
		if (resync_snap_find(old, cur->rs_msgs[i].rm_uid) == 0)
			want_exists = true;
	CHECK(nexp == want_exp);
	CHECK(nflags == want_flags);
	CHECK(nexists == (want_exists ? 1 : 0));

	free(view);
	free(gone);
}

/* The contract's condition for success, by set membership. */
static bool
contract_ok(const struct resync_snap *o, const struct resync_snap *c)
{
	size_t i;

	if (o->rs_uidvalidity != c->rs_uidvalidity)
		return false;
	for (i = 0; i < c->rs_n && o->rs_n > 0; i++)
		if (c->rs_msgs[i].rm_uid < o->rs_msgs[o->rs_n - 1].rm_uid &&
		    resync_snap_find(o, c->rs_msgs[i].rm_uid) == 0)
			return false;
	return true;
}

/* Runs the diff, expects success, and checks it with the client model. */
static void
diff_ok(const struct resync_snap *old, const struct resync_snap *cur,
    struct evlog *l)
{
	memset(l, 0, sizeof(*l));
	CHECK(resync_diff(old, cur, record_cb, l) == 0);
	check_client(old, cur, l);
}

static void
expect_events(const struct evlog *l, const struct ev *want, size_t n)
{
	size_t i;

	for (i = 0; i < l->n && i < n; i++)
		if (l->v[i].e != want[i].e || l->v[i].n != want[i].n)
			fail_msg("event %zu: got %s %zu, want %s %zu", i,
			    ev_name(l->v[i].e), l->v[i].n,
			    ev_name(want[i].e), want[i].n);
	assert_int_equal(l->n, n);
}

/* ------------------------------------------------------------ digest */

static void
test_digest_order_case_spacing(void **state)
{
	uint32_t d = D("\\Seen \\Flagged $Label1");

	(void)state;
	assert_int_equal(D("$Label1 \\Seen \\Flagged"), d);
	assert_int_equal(D("\\Flagged $Label1 \\Seen"), d);
	assert_int_equal(D("\\SEEN \\flagged $LABEL1"), d);
	assert_int_equal(D("\\sEeN \\FlAgGeD $label1"), d);
	assert_int_equal(D("  \\Seen   \\Flagged  $Label1  "), d);
	assert_int_equal(D("\\Seen\t\\Flagged\r\n$Label1"), d);
	assert_int_equal(D(" "), D(""));
}

static void
test_digest_duplicates(void **state)
{
	(void)state;
	assert_int_equal(D("\\Seen \\Seen"), D("\\Seen"));
	assert_int_equal(D("\\Seen \\seen \\SEEN"), D("\\Seen"));
	assert_int_equal(D("\\Seen \\Flagged \\Seen \\Flagged"),
	    D("\\Flagged \\Seen"));
	assert_int_equal(D("$a $b $a $c $b $a"), D("$c $b $a"));
}

static void
test_digest_recent_ignored(void **state)
{
	(void)state;
	assert_int_equal(D("\\Recent"), D(""));
	assert_int_equal(D("\\RECENT \\recent"), D(""));
	assert_int_equal(D("\\Seen \\Recent"), D("\\Seen"));
	assert_int_equal(D("\\Recent \\Seen \\rEcEnT \\Draft"),
	    D("\\Draft \\Seen"));
	/* Only the exact flag: look-alikes are ordinary keywords. */
	assert_int_not_equal(D("\\Recently"), D(""));
	assert_int_not_equal(D("Recent"), D(""));
	assert_int_not_equal(D("\\Recen"), D(""));
	assert_int_not_equal(D("\\Seen \\Recently"), D("\\Seen"));
}

static void
test_digest_reads_only_len(void **state)
{
	const char s[] = "\\Seen \\Flagged";

	(void)state;
	assert_int_equal(resync_flags_digest(s, 5), D("\\Seen"));
	assert_int_equal(resync_flags_digest(s, 6), D("\\Seen"));
	assert_int_equal(resync_flags_digest(s, 0), D(""));
	assert_int_equal(resync_flags_digest(s, 7), D("\\Seen \\"));
	assert_int_not_equal(resync_flags_digest(s, 7), D("\\Seen"));
}

static void
test_digest_distinct(void **state)
{
	static const char *const fl[] = {
		"\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft",
		"$Forwarded", "$MDNSent", "$Junk", "$NotJunk", "$Label1",
		"$Label2", "$Label3",
	};
	const size_t nfl = sizeof(fl) / sizeof(fl[0]);
	size_t nsets = (size_t)1 << nfl, m, i, k;
	uint32_t *d = malloc(nsets * sizeof(*d));
	char buf[256];

	(void)state;
	assert_non_null(d);
	/* Every subset of the flags a voice platform might meet. */
	for (m = 0; m < nsets; m++) {
		buf[0] = '\0';
		for (k = 0; k < nfl; k++)
			if (m & ((size_t)1 << k)) {
				strcat(buf, fl[k]);
				strcat(buf, " ");
			}
		d[m] = D(buf);
		assert_int_not_equal(d[m], 0);
	}
	for (m = 0; m < nsets; m++)
		for (i = m + 1; i < nsets; i++)
			if (d[m] == d[i])
				fail_msg("sets %zx and %zx share digest %08x",
				    m, i, d[m]);
	free(d);

	assert_int_not_equal(D("$Label1"), D("$Label2"));
	assert_int_not_equal(D("ab"), D("a b"));
	assert_int_not_equal(D("\\Seen"), D("Seen"));
}

static void
test_digest_never_zero(void **state)
{
	char buf[64];
	size_t i, k, len;

	(void)state;
	assert_int_not_equal(D(""), 0);
	assert_int_not_equal(D("   "), 0);
	assert_int_not_equal(D("\\Recent"), 0);
	rng_seed(7);
	for (i = 0; i < 300000; i++) {
		len = rng_below(sizeof(buf));
		for (k = 0; k < len; k++)
			buf[k] = (char)(rng_below(5) == 0 ? ' ' :
			    '!' + rng_below(94));
		if (resync_flags_digest(buf, len) == 0)
			fail_msg("digest 0 for \"%.*s\"", (int)len, buf);
	}
}

/* More flags than the digest keeps on its stack. */
static void
test_digest_many_flags(void **state)
{
	const size_t nkw = 300;
	size_t cap = nkw * 32, i;
	char *fwd = malloc(cap), *rev = malloc(cap), *dup = malloc(cap),
	    *less = malloc(cap);
	size_t fo = 0, ro = 0, dp = 0, lo = 0;

	(void)state;
	assert_true(fwd && rev && dup && less);
	for (i = 0; i < nkw; i++) {
		fo += (size_t)sprintf(fwd + fo, "kw%zu ", i);
		ro += (size_t)sprintf(rev + ro, "KW%zu  ", nkw - 1 - i);
		dp += (size_t)sprintf(dup + dp, "kw%zu Kw%zu \\Recent ", i,
		    i / 2);
		if (i != 123)
			lo += (size_t)sprintf(less + lo, "kw%zu ", i);
	}
	assert_int_equal(resync_flags_digest(fwd, fo),
	    resync_flags_digest(rev, ro));
	assert_int_equal(resync_flags_digest(fwd, fo),
	    resync_flags_digest(dup, dp));
	assert_int_not_equal(resync_flags_digest(fwd, fo),
	    resync_flags_digest(less, lo));
	free(fwd);
	free(rev);
	free(dup);
	free(less);
}

/* ------------------------------------------------------------ snapshots */

static void
test_snap_append_find(void **state)
{
	struct resync_snap s;
	uint32_t uid;
	size_t i;

	(void)state;
	resync_snap_init(&s);
	assert_int_equal(s.rs_n, 0);
	assert_int_equal(resync_snap_find(&s, 1), 0);
	assert_int_equal(resync_snap_append(&s, 0, 1), -1);	/* UIDs are nz */
	assert_int_equal(resync_snap_append(&s, 10, 5), 0);
	assert_int_equal(resync_snap_append(&s, 10, 5), -1);
	assert_int_equal(resync_snap_append(&s, 9, 5), -1);
	assert_int_equal(resync_snap_append(&s, 11, 6), 0);
	assert_int_equal(s.rs_n, 2);
	assert_int_equal(s.rs_msgs[0].rm_uid, 10);
	assert_int_equal(s.rs_msgs[0].rm_flags, 5);
	assert_int_equal(s.rs_msgs[1].rm_uid, 11);
	assert_int_equal(s.rs_msgs[1].rm_flags, 6);

	/* Growth across several reallocations, then lookups of every UID
	 * and of the gaps between them. */
	for (i = 0, uid = 20; i < 5000; i++, uid += 3)
		assert_int_equal(resync_snap_append(&s, uid, (uint32_t)i), 0);
	assert_int_equal(s.rs_n, 5002);
	assert_true(s.rs_cap >= s.rs_n);
	assert_int_equal(resync_snap_append(&s, UINT32_MAX, 0), 0);
	assert_int_equal(resync_snap_append(&s, UINT32_MAX, 0), -1);
	assert_int_equal(resync_snap_find(&s, 10), 1);
	assert_int_equal(resync_snap_find(&s, 11), 2);
	for (i = 0, uid = 20; i < 5000; i++, uid += 3) {
		assert_int_equal(resync_snap_find(&s, uid), i + 3);
		assert_int_equal(resync_snap_find(&s, uid + 1), 0);
		assert_int_equal(resync_snap_find(&s, uid - 1), 0);
	}
	assert_int_equal(resync_snap_find(&s, UINT32_MAX), s.rs_n);
	assert_int_equal(resync_snap_find(&s, 0), 0);
	assert_int_equal(resync_snap_find(&s, 1), 0);
	resync_snap_free(&s);
	assert_int_equal(s.rs_n, 0);
	assert_null(s.rs_msgs);
	resync_snap_free(&s);	/* idempotent */
}

static void
test_snap_set_flags_expunge(void **state)
{
	static const uint32_t uids[] = { 3, 4, 8, 9, 12 };
	struct resync_snap s;

	(void)state;
	snap_build(&s, 1, uids, NULL, 5);
	assert_int_equal(resync_snap_set_flags(&s, 0, 9), -1);
	assert_int_equal(resync_snap_set_flags(&s, 6, 9), -1);
	assert_int_equal(resync_snap_set_flags(&s, 3, 9), 0);
	assert_int_equal(s.rs_msgs[2].rm_flags, 9);
	assert_int_equal(resync_snap_set_flags(&s, 5, 7), 0);
	assert_int_equal(s.rs_msgs[4].rm_flags, 7);

	assert_int_equal(resync_snap_expunge(&s, 0), -1);
	assert_int_equal(resync_snap_expunge(&s, 6), -1);
	assert_int_equal(resync_snap_expunge(&s, 2), 0);	/* UID 4 */
	assert_int_equal(s.rs_n, 4);
	assert_int_equal(s.rs_msgs[0].rm_uid, 3);
	assert_int_equal(s.rs_msgs[1].rm_uid, 8);
	assert_int_equal(s.rs_msgs[1].rm_flags, 9);
	assert_int_equal(s.rs_msgs[2].rm_uid, 9);
	assert_int_equal(s.rs_msgs[3].rm_uid, 12);
	assert_int_equal(s.rs_msgs[3].rm_flags, 7);
	assert_int_equal(resync_snap_find(&s, 4), 0);
	assert_int_equal(resync_snap_find(&s, 12), 4);
	assert_int_equal(resync_snap_expunge(&s, 4), 0);	/* last */
	assert_int_equal(resync_snap_expunge(&s, 1), 0);	/* first */
	assert_int_equal(s.rs_n, 2);
	assert_int_equal(s.rs_msgs[0].rm_uid, 8);
	assert_int_equal(s.rs_msgs[1].rm_uid, 9);
	assert_int_equal(resync_snap_expunge(&s, 3), -1);
	/* Appending still checks against the new last UID. */
	assert_int_equal(resync_snap_append(&s, 9, 1), -1);
	assert_int_equal(resync_snap_append(&s, 10, 1), 0);
	assert_int_equal(resync_snap_expunge(&s, 1), 0);
	assert_int_equal(resync_snap_expunge(&s, 1), 0);
	assert_int_equal(resync_snap_expunge(&s, 1), 0);
	assert_int_equal(s.rs_n, 0);
	assert_int_equal(resync_snap_expunge(&s, 1), -1);
	assert_int_equal(resync_snap_set_flags(&s, 1, 1), -1);
	resync_snap_free(&s);
}

static void
test_snap_clear(void **state)
{
	static const uint32_t uids[] = { 5, 6, 7 };
	struct resync_snap s;
	struct resync_msg *keep;

	(void)state;
	snap_build(&s, 42, uids, NULL, 3);
	keep = s.rs_msgs;
	resync_snap_clear(&s);
	assert_int_equal(s.rs_n, 0);
	assert_int_equal(s.rs_uidvalidity, 0);
	assert_int_equal(resync_snap_find(&s, 5), 0);
	/* Reuse: lower UIDs are fine again, and the array is kept. */
	assert_int_equal(resync_snap_append(&s, 1, 1), 0);
	assert_ptr_equal(s.rs_msgs, keep);
	assert_int_equal(s.rs_n, 1);
	resync_snap_free(&s);
}

/* ------------------------------------------------------------ diff */

static void
test_diff_no_change(void **state)
{
	static const uint32_t uids[] = { 1, 2, 7, 9 };
	static const uint32_t fl[] = { 3, 4, 3, 5 };
	struct resync_snap a, b;
	struct evlog l;

	(void)state;
	snap_build(&a, 77, uids, fl, 4);
	snap_build(&b, 77, uids, fl, 4);
	diff_ok(&a, &b, &l);
	assert_int_equal(l.n, 0);
	evlog_free(&l);
	diff_ok(&a, &a, &l);	/* the same snapshot on both sides */
	assert_int_equal(l.n, 0);
	evlog_free(&l);
	resync_snap_free(&a);
	resync_snap_free(&b);
}

static void
test_diff_single_expunge(void **state)
{
	static const uint32_t u5[] = { 10, 20, 30, 40, 50 };
	static const uint32_t mid[] = { 10, 20, 40, 50 };
	static const uint32_t first[] = { 20, 30, 40, 50 };
	static const uint32_t last[] = { 10, 20, 30, 40 };
	static const struct ev w_mid[] = { { RESYNC_EXPUNGE, 3 } };
	static const struct ev w_first[] = { { RESYNC_EXPUNGE, 1 } };
	static const struct ev w_last[] = { { RESYNC_EXPUNGE, 5 } };
	struct resync_snap o, c;
	struct evlog l;

	(void)state;
	snap_build(&o, 1, u5, NULL, 5);

	snap_build(&c, 1, mid, NULL, 4);
	diff_ok(&o, &c, &l);
	expect_events(&l, w_mid, 1);
	evlog_free(&l);
	resync_snap_free(&c);

	snap_build(&c, 1, first, NULL, 4);
	diff_ok(&o, &c, &l);
	expect_events(&l, w_first, 1);
	evlog_free(&l);
	resync_snap_free(&c);

	snap_build(&c, 1, last, NULL, 4);
	diff_ok(&o, &c, &l);
	expect_events(&l, w_last, 1);
	evlog_free(&l);
	resync_snap_free(&c);

	resync_snap_free(&o);
}

static void
test_diff_expunge_patterns(void **state)
{
	static const uint32_t u8[] = { 1, 2, 3, 4, 5, 6, 7, 8 };
	static const uint32_t alt[] = { 1, 3, 5, 7 };
	static const uint32_t runs[] = { 3, 4, 7 };
	static const struct ev w_all[] = {
		{ RESYNC_EXPUNGE, 8 }, { RESYNC_EXPUNGE, 7 },
		{ RESYNC_EXPUNGE, 6 }, { RESYNC_EXPUNGE, 5 },
		{ RESYNC_EXPUNGE, 4 }, { RESYNC_EXPUNGE, 3 },
		{ RESYNC_EXPUNGE, 2 }, { RESYNC_EXPUNGE, 1 },
	};
	static const struct ev w_alt[] = {
		{ RESYNC_EXPUNGE, 8 }, { RESYNC_EXPUNGE, 6 },
		{ RESYNC_EXPUNGE, 4 }, { RESYNC_EXPUNGE, 2 },
	};
	static const struct ev w_runs[] = {
		{ RESYNC_EXPUNGE, 8 }, { RESYNC_EXPUNGE, 6 },
		{ RESYNC_EXPUNGE, 5 }, { RESYNC_EXPUNGE, 2 },
		{ RESYNC_EXPUNGE, 1 },
	};
	struct resync_snap o, c;
	struct evlog l;
	uint32_t uids[12], mask, nbits;
	size_t n, k;
	char ctx[64];

	(void)state;
	snap_build(&o, 1, u8, NULL, 8);

	snap_build(&c, 1, NULL, NULL, 0);
	diff_ok(&o, &c, &l);
	expect_events(&l, w_all, 8);
	evlog_free(&l);
	resync_snap_free(&c);

	snap_build(&c, 1, alt, NULL, 4);
	diff_ok(&o, &c, &l);
	expect_events(&l, w_alt, 4);
	evlog_free(&l);
	resync_snap_free(&c);

	snap_build(&c, 1, runs, NULL, 3);
	diff_ok(&o, &c, &l);
	expect_events(&l, w_runs, 5);
	evlog_free(&l);
	resync_snap_free(&c);
	resync_snap_free(&o);

	/* Every pattern: each subset of 1..12 kept, from every size of
	 * mailbox up to 12, through the client model. */
	for (nbits = 1; nbits <= 12; nbits++) {
		for (k = 0; k < nbits; k++)
			uids[k] = (uint32_t)(k * 2 + 1);
		snap_build(&o, 9, uids, NULL, nbits);
		for (mask = 0; mask < (1U << nbits); mask++) {
			resync_snap_init(&c);
			c.rs_uidvalidity = 9;
			for (k = 0, n = 0; k < nbits; k++)
				if (mask & (1U << k)) {
					assert_int_equal(resync_snap_append(&c,
					    uids[k], 1), 0);
					n++;
				}
			snprintf(ctx, sizeof(ctx), "n %u mask %x", nbits, mask);
			check_ctx = ctx;
			diff_ok(&o, &c, &l);
			CHECK(l.n == nbits - n);
			evlog_free(&l);
			resync_snap_free(&c);
		}
		resync_snap_free(&o);
	}
	check_ctx = "";
}

static void
test_diff_appends(void **state)
{
	static const uint32_t u3[] = { 4, 5, 9 };
	static const uint32_t u5[] = { 4, 5, 9, 10, 30 };
	static const uint32_t u1[] = { 1 };
	static const struct ev w5[] = { { RESYNC_EXISTS, 5 } };
	static const struct ev w3[] = { { RESYNC_EXISTS, 3 } };
	static const struct ev w1[] = { { RESYNC_EXISTS, 1 } };
	struct resync_snap o, c;
	struct evlog l;

	(void)state;
	snap_build(&o, 1, u3, NULL, 3);
	snap_build(&c, 1, u5, NULL, 5);
	diff_ok(&o, &c, &l);
	expect_events(&l, w5, 1);
	evlog_free(&l);
	resync_snap_free(&o);

	/* From an empty mailbox, whatever the UIDs. */
	snap_build(&o, 1, NULL, NULL, 0);
	diff_ok(&o, &c, &l);
	expect_events(&l, w5, 1);
	evlog_free(&l);
	resync_snap_free(&c);
	snap_build(&c, 1, u3, NULL, 3);
	diff_ok(&o, &c, &l);
	expect_events(&l, w3, 1);
	evlog_free(&l);
	resync_snap_free(&c);
	snap_build(&c, 1, u1, NULL, 1);
	diff_ok(&o, &c, &l);
	expect_events(&l, w1, 1);
	evlog_free(&l);
	resync_snap_free(&c);
	resync_snap_free(&o);
}

static void
test_diff_flag_changes(void **state)
{
	static const uint32_t uids[] = { 2, 3, 5, 8, 13, 21 };
	static const uint32_t f_old[] = { 1, 1, 7, 7, 9, 9 };
	static const uint32_t f_new[] = { 1, 4, 7, 8, 9, 3 };
	static const struct ev want[] = {
		{ RESYNC_FLAGS, 2 }, { RESYNC_FLAGS, 4 }, { RESYNC_FLAGS, 6 },
	};
	struct resync_snap o, c;
	struct evlog l;

	(void)state;
	snap_build(&o, 3, uids, f_old, 6);
	snap_build(&c, 3, uids, f_new, 6);
	diff_ok(&o, &c, &l);
	expect_events(&l, want, 3);
	evlog_free(&l);

	/* Real digests: \Recent alone appearing or going is no change. */
	resync_snap_free(&o);
	resync_snap_free(&c);
	snap_build(&o, 3, uids, NULL, 2);
	snap_build(&c, 3, uids, NULL, 2);
	o.rs_msgs[0].rm_flags = D("\\Seen \\Recent");
	c.rs_msgs[0].rm_flags = D("\\seen");
	o.rs_msgs[1].rm_flags = D("\\Seen");
	c.rs_msgs[1].rm_flags = D("\\Seen \\Answered");
	diff_ok(&o, &c, &l);
	expect_events(&l, want, 1);
	evlog_free(&l);
	resync_snap_free(&o);
	resync_snap_free(&c);
}

static void
test_diff_combined(void **state)
{
	static const uint32_t u_old[] = { 1, 2, 3, 4, 5 };
	static const uint32_t u_cur[] = { 1, 3, 4, 5, 6, 7 };
	static const struct ev want[] = {
		{ RESYNC_EXPUNGE, 2 }, { RESYNC_EXISTS, 6 }, { RESYNC_FLAGS, 3 },
	};
	/* Several of each, the new flags being on survivors renumbered by
	 * the expunges and on messages beyond the old end. */
	static const uint32_t u_old2[] = { 10, 11, 12, 13, 14, 15, 16, 17 };
	static const uint32_t f_old2[] = { 1, 1, 1, 1, 1, 1, 1, 1 };
	static const uint32_t u_cur2[] = { 11, 13, 14, 17, 18, 19 };
	static const uint32_t f_cur2[] = { 2, 1, 2, 2, 5, 5 };
	static const struct ev want2[] = {
		{ RESYNC_EXPUNGE, 7 }, { RESYNC_EXPUNGE, 6 },
		{ RESYNC_EXPUNGE, 3 }, { RESYNC_EXPUNGE, 1 },
		{ RESYNC_EXISTS, 6 },
		{ RESYNC_FLAGS, 1 }, { RESYNC_FLAGS, 3 }, { RESYNC_FLAGS, 4 },
	};
	struct resync_snap o, c;
	struct evlog l;
	size_t i;

	(void)state;
	resync_snap_init(&o);
	resync_snap_init(&c);
	o.rs_uidvalidity = c.rs_uidvalidity = 555;
	for (i = 0; i < 5; i++)
		assert_int_equal(resync_snap_append(&o, u_old[i],
		    D("\\Answered")), 0);
	for (i = 0; i < 6; i++)
		assert_int_equal(resync_snap_append(&c, u_cur[i],
		    D("\\Answered")), 0);
	assert_int_equal(resync_snap_set_flags(&c, 3,
	    D("\\Seen \\Answered")), 0);
	diff_ok(&o, &c, &l);
	expect_events(&l, want, 3);
	evlog_free(&l);
	resync_snap_free(&o);
	resync_snap_free(&c);

	snap_build(&o, 2, u_old2, f_old2, 8);
	snap_build(&c, 2, u_cur2, f_cur2, 6);
	diff_ok(&o, &c, &l);
	expect_events(&l, want2, 8);
	evlog_free(&l);
	resync_snap_free(&o);
	resync_snap_free(&c);
}

static void
test_diff_uidvalidity(void **state)
{
	static const uint32_t uids[] = { 1, 2, 3 };
	struct resync_snap o, c;
	struct evlog l = { 0 };

	(void)state;
	snap_build(&o, 100, uids, NULL, 3);
	snap_build(&c, 101, uids, NULL, 2);
	assert_int_equal(resync_diff(&o, &c, record_cb, &l), -1);
	assert_int_equal(l.n, 0);
	/* Even with identical contents, and with empty mailboxes. */
	resync_snap_free(&c);
	snap_build(&c, 101, uids, NULL, 3);
	assert_int_equal(resync_diff(&o, &c, record_cb, &l), -1);
	resync_snap_clear(&o);
	resync_snap_clear(&c);
	o.rs_uidvalidity = 5;
	c.rs_uidvalidity = 6;
	assert_int_equal(resync_diff(&o, &c, record_cb, &l), -1);
	assert_int_equal(l.n, 0);
	resync_snap_free(&o);
	resync_snap_free(&c);
}

static void
test_diff_unreconcilable(void **state)
{
	static const uint32_t u_old[] = { 1, 2, 4, 8 };
	static const uint32_t gap[] = { 1, 3, 4, 8, 9 };	/* 3: new, inside */
	static const uint32_t below[] = { 1, 2, 4, 7 };	/* 7 < 8, 8 gone */
	static const uint32_t first[] = { 0x7fffffff };
	static const uint32_t ok[] = { 2, 9 };		/* 9 > 8: fine */
	static const struct ev w_ok[] = {
		{ RESYNC_EXPUNGE, 4 }, { RESYNC_EXPUNGE, 3 },
		{ RESYNC_EXPUNGE, 1 }, { RESYNC_EXISTS, 2 },
	};
	struct resync_snap o, c;
	struct evlog l = { 0 };

	(void)state;
	snap_build(&o, 1, u_old, NULL, 4);

	snap_build(&c, 1, gap, NULL, 5);
	assert_int_equal(resync_diff(&o, &c, record_cb, &l), -1);
	resync_snap_free(&c);
	snap_build(&c, 1, below, NULL, 4);
	assert_int_equal(resync_diff(&o, &c, record_cb, &l), -1);
	resync_snap_free(&c);
	assert_int_equal(l.n, 0);	/* nothing half-told */

	snap_build(&c, 1, ok, NULL, 2);
	diff_ok(&o, &c, &l);
	expect_events(&l, w_ok, 4);
	evlog_free(&l);
	resync_snap_free(&c);

	/* A snapshot filled by hand out of order cannot be merged. */
	snap_build(&c, 1, u_old, NULL, 4);
	c.rs_msgs[1].rm_uid = 4;
	c.rs_msgs[2].rm_uid = 2;
	assert_int_equal(resync_diff(&o, &c, record_cb, &l), -1);
	assert_int_equal(resync_diff(&c, &o, record_cb, &l), -1);
	c.rs_msgs[1].rm_uid = 2;
	c.rs_msgs[2].rm_uid = 4;
	c.rs_msgs[3].rm_uid = 9;
	assert_int_equal(resync_snap_append(&c, 10, 1), 0);
	c.rs_msgs[4].rm_uid = 9;	/* a repeat past old's end */
	assert_int_equal(resync_diff(&o, &c, record_cb, &l), -1);
	assert_int_equal(l.n, 0);
	resync_snap_free(&c);
	resync_snap_free(&o);

	/* An old that was empty accepts any cur. */
	snap_build(&o, 1, NULL, NULL, 0);
	snap_build(&c, 1, first, NULL, 1);
	diff_ok(&o, &c, &l);
	evlog_free(&l);
	resync_snap_free(&c);
	resync_snap_free(&o);
}

static void
test_diff_empty(void **state)
{
	static const uint32_t u3[] = { 4, 5, 6 };
	static const struct ev w[] = {
		{ RESYNC_EXPUNGE, 3 }, { RESYNC_EXPUNGE, 2 },
		{ RESYNC_EXPUNGE, 1 },
	};
	struct resync_snap o, c;
	struct evlog l;

	(void)state;
	snap_build(&o, 1, NULL, NULL, 0);
	snap_build(&c, 1, NULL, NULL, 0);
	diff_ok(&o, &c, &l);
	assert_int_equal(l.n, 0);
	evlog_free(&l);
	resync_snap_free(&o);

	/* Emptied: expunges only, no "* 0 EXISTS" (the client counted). */
	snap_build(&o, 1, u3, NULL, 3);
	diff_ok(&o, &c, &l);
	expect_events(&l, w, 3);
	evlog_free(&l);
	resync_snap_free(&o);
	resync_snap_free(&c);
}

/*
 * A random pair: old with gaps in its UIDs, cur = old's survivors with
 * some flags changed plus appends above old's highest UID.  With `bad`,
 * one UID below old's highest that old never had is slipped into cur.
 */
static void
make_pair(struct resync_snap *o, struct resync_snap *c, size_t n,
    unsigned expunge_pct, unsigned flag_pct, size_t nappend,
    uint32_t nflags, bool bad)
{
	uint32_t uid = 0, f, bad_uid = 0;
	size_t i;
	bool placed = false;

	resync_snap_init(o);
	resync_snap_init(c);
	o->rs_uidvalidity = c->rs_uidvalidity = rng() | 1;
	for (i = 0; i < n; i++) {
		uid += 1 + (rng_below(4) == 0 ? rng_below(5) + 1 : 0);
		assert_int_equal(resync_snap_append(o, uid,
		    1 + rng_below(nflags)), 0);
	}
	/* A gap to hide the bad UID in: before some message of old. */
	if (bad && n > 0) {
		i = rng_below((uint32_t)n);
		bad_uid = o->rs_msgs[i].rm_uid - 1;
		if (i > 0 && bad_uid == o->rs_msgs[i - 1].rm_uid)
			bad_uid = 0;	/* no gap there */
	}
	for (i = 0; i < n; i++) {
		if (bad_uid != 0 && !placed && o->rs_msgs[i].rm_uid > bad_uid) {
			assert_int_equal(resync_snap_append(c, bad_uid, 1), 0);
			placed = true;
		}
		if (rng_below(100) < expunge_pct)
			continue;
		f = o->rs_msgs[i].rm_flags;
		if (rng_below(100) < flag_pct)
			f = 1 + rng_below(nflags);	/* may be the same */
		assert_int_equal(resync_snap_append(c, o->rs_msgs[i].rm_uid,
		    f), 0);
	}
	uid = n > 0 ? o->rs_msgs[n - 1].rm_uid : 0;
	for (i = 0; i < nappend; i++) {
		uid += 1 + rng_below(3);
		assert_int_equal(resync_snap_append(c, uid,
		    1 + rng_below(nflags)), 0);
	}
}

static void
test_diff_large(void **state)
{
	struct resync_snap o, c;
	struct evlog l;
	clock_t t0;
	double secs;

	(void)state;
	rng_seed(100000);
	check_ctx = "large";
	make_pair(&o, &c, 100000, 3, 5, 2000, 16, false);
	memset(&l, 0, sizeof(l));
	t0 = clock();
	assert_int_equal(resync_diff(&o, &c, record_cb, &l), 0);
	secs = (double)(clock() - t0) / CLOCKS_PER_SEC;
	/* Linear takes milliseconds, even under ASan; quadratic would take
	 * minutes. */
	if (secs > 0.5)
		fail_msg("100k diff took %.2f s", secs);
	check_client(&o, &c, &l);
	assert_true(l.n > 0);
	evlog_free(&l);
	resync_snap_free(&o);
	resync_snap_free(&c);

	/* Half expunged, as many appended, a third of the flags changed. */
	rng_seed(100001);
	make_pair(&o, &c, 100000, 50, 33, 50000, 4, false);
	memset(&l, 0, sizeof(l));
	t0 = clock();
	assert_int_equal(resync_diff(&o, &c, record_cb, &l), 0);
	secs = (double)(clock() - t0) / CLOCKS_PER_SEC;
	if (secs > 0.5)
		fail_msg("100k diff took %.2f s", secs);
	check_client(&o, &c, &l);
	evlog_free(&l);
	resync_snap_free(&o);
	resync_snap_free(&c);

	/* Everything expunged and replaced. */
	rng_seed(100002);
	make_pair(&o, &c, 100000, 100, 0, 100000, 2, false);
	diff_ok(&o, &c, &l);
	assert_int_equal(l.n, 100001);
	evlog_free(&l);
	resync_snap_free(&o);
	resync_snap_free(&c);

	/* And a bad UID is found in a big one too, emitting nothing. */
	rng_seed(100003);
	for (;;) {
		make_pair(&o, &c, 100000, 3, 5, 10, 4, true);
		if (!contract_ok(&o, &c))
			break;
		resync_snap_free(&o);
		resync_snap_free(&c);
	}
	memset(&l, 0, sizeof(l));
	assert_int_equal(resync_diff(&o, &c, record_cb, &l), -1);
	assert_int_equal(l.n, 0);
	check_ctx = "";
	resync_snap_free(&o);
	resync_snap_free(&c);
}

static void
test_diff_random(void **state)
{
	struct resync_snap o, c;
	struct evlog l;
	uint64_t seed;
	size_t n;
	bool bad, want_ok;
	int rc;
	char ctx[64];

	(void)state;
	for (seed = 1; seed <= 20000; seed++) {
		rng_seed(seed);
		snprintf(ctx, sizeof(ctx), "seed %llu",
		    (unsigned long long)seed);
		check_ctx = ctx;
		n = rng_below(4) == 0 ? rng_below(4) : rng_below(60);
		bad = rng_below(8) == 0;
		make_pair(&o, &c, n, rng_below(101), rng_below(101),
		    rng_below(3) == 0 ? rng_below(20) : 0,
		    1 + rng_below(4), bad);
		if (rng_below(50) == 0)
			c.rs_uidvalidity ^= 1U << rng_below(32);

		want_ok = contract_ok(&o, &c);
		memset(&l, 0, sizeof(l));
		rc = resync_diff(&o, &c, record_cb, &l);
		CHECK(rc == (want_ok ? 0 : -1));
		if (rc == 0)
			check_client(&o, &c, &l);
		else
			CHECK(l.n == 0);
		evlog_free(&l);
		resync_snap_free(&o);
		resync_snap_free(&c);
	}
	check_ctx = "";
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_digest_order_case_spacing),
		cmocka_unit_test(test_digest_duplicates),
		cmocka_unit_test(test_digest_recent_ignored),
		cmocka_unit_test(test_digest_reads_only_len),
		cmocka_unit_test(test_digest_distinct),
		cmocka_unit_test(test_digest_never_zero),
		cmocka_unit_test(test_digest_many_flags),
		cmocka_unit_test(test_snap_append_find),
		cmocka_unit_test(test_snap_set_flags_expunge),
		cmocka_unit_test(test_snap_clear),
		cmocka_unit_test(test_diff_no_change),
		cmocka_unit_test(test_diff_single_expunge),
		cmocka_unit_test(test_diff_expunge_patterns),
		cmocka_unit_test(test_diff_appends),
		cmocka_unit_test(test_diff_flag_changes),
		cmocka_unit_test(test_diff_combined),
		cmocka_unit_test(test_diff_uidvalidity),
		cmocka_unit_test(test_diff_unreconcilable),
		cmocka_unit_test(test_diff_empty),
		cmocka_unit_test(test_diff_large),
		cmocka_unit_test(test_diff_random),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
