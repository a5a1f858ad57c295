/*
 * resync.c - mailbox snapshots and their diff into untagged responses.
 *
 * A snapshot is a growable array of {UID, flags digest} in sequence number
 * order, so UIDs ascend and msn = index + 1.  The diff is a merge of two
 * such arrays, O(old + cur), done in passes: one that validates and counts
 * without emitting (so a -1 never leaves the client half told), then one
 * per kind of response, each in the order the client must receive it.
 */
#include "resync.h"

#include <stdlib.h>
#include <string.h>

#define RESYNC_SNAP_MIN_CAP 64
/* Flags per list digested without an allocation; real lists hold a few. */
#define RESYNC_FLAGS_STACK 64

void
resync_snap_init(struct resync_snap *s)
{
	s->rs_uidvalidity = 0;
	s->rs_n = 0;
	s->rs_cap = 0;
	s->rs_msgs = NULL;
}

void
resync_snap_free(struct resync_snap *s)
{
	free(s->rs_msgs);
	resync_snap_init(s);
}

/* Empties s as resync_snap_init() would, but keeps the array: a client
 * re-selecting a mailbox of the same size then allocates nothing. */
void
resync_snap_clear(struct resync_snap *s)
{
	s->rs_uidvalidity = 0;
	s->rs_n = 0;
}

int
resync_snap_append(struct resync_snap *s, uint32_t uid, uint32_t flags)
{
	struct resync_msg *msgs;
	size_t cap;

	/* UIDs are non-zero (RFC 3501 nz-number), so 0 is "below" the first
	 * one too; ascending order is what lets resync_diff() merge. */
	if (uid <= (s->rs_n > 0 ? s->rs_msgs[s->rs_n - 1].rm_uid : 0))
		return -1;
	if (s->rs_n == s->rs_cap) {
		if (s->rs_cap == 0)
			cap = RESYNC_SNAP_MIN_CAP;
		else if (s->rs_cap > SIZE_MAX / 2 / sizeof(*msgs))
			return -1;
		else
			cap = s->rs_cap * 2;
		msgs = realloc(s->rs_msgs, cap * sizeof(*msgs));
		if (msgs == NULL)
			return -1;
		s->rs_msgs = msgs;
		s->rs_cap = cap;
	}
	s->rs_msgs[s->rs_n].rm_uid = uid;
	s->rs_msgs[s->rs_n].rm_flags = flags;
	s->rs_n++;
	return 0;
}

int
resync_snap_set_flags(struct resync_snap *s, size_t msn, uint32_t flags)
{
	if (msn == 0 || msn > s->rs_n)
		return -1;
	s->rs_msgs[msn - 1].rm_flags = flags;
	return 0;
}

int
resync_snap_expunge(struct resync_snap *s, size_t msn)
{
	if (msn == 0 || msn > s->rs_n)
		return -1;
	memmove(&s->rs_msgs[msn - 1], &s->rs_msgs[msn],
	    (s->rs_n - msn) * sizeof(s->rs_msgs[0]));
	s->rs_n--;
	return 0;
}

size_t
resync_snap_find(const struct resync_snap *s, uint32_t uid)
{
	size_t lo = 0, hi = s->rs_n, mid;

	/* Binary search: UIDs ascend with msn. */
	while (lo < hi) {
		mid = lo + (hi - lo) / 2;
		if (s->rs_msgs[mid].rm_uid < uid)
			lo = mid + 1;
		else if (s->rs_msgs[mid].rm_uid > uid)
			hi = mid;
		else
			return mid + 1;
	}
	return 0;
}

/* ------------------------------------------------------------ digest */

/* murmur3's finalizer: FNV-1a alone leaves flags that differ only in their
 * last byte ($Label1, $Label2) close together, and a sum of close values
 * collides more than a sum of well mixed ones. */
static uint32_t
resync_mix32(uint32_t h)
{
	h ^= h >> 16;
	h *= 0x85ebca6bU;
	h ^= h >> 13;
	h *= 0xc2b2ae35U;
	h ^= h >> 16;
	return h;
}

static bool
resync_is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

static char
resync_fold(char c)
{
	/* Flags and keywords are atoms: ASCII, compared case-insensitively. */
	return c >= 'A' && c <= 'Z' ? (char)(c - 'A' + 'a') : c;
}

static uint32_t
resync_flag_hash(const char *p, size_t len)
{
	uint32_t h = 2166136261U;	/* FNV-1a over the folded bytes */
	size_t i;

	for (i = 0; i < len; i++) {
		h ^= (unsigned char)resync_fold(p[i]);
		h *= 16777619U;
	}
	return resync_mix32(h);
}

/* \Recent is per session: which session saw a message first is not a
 * change the client should hear about. */
static bool
resync_is_recent(const char *p, size_t len)
{
	static const char recent[] = "\\recent";
	size_t i;

	if (len != sizeof(recent) - 1)
		return false;
	for (i = 0; i < len; i++)
		if (resync_fold(p[i]) != recent[i])
			return false;
	return true;
}

static int
resync_u32_cmp(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return (x > y) - (x < y);
}

/*
 * The digest is defined over the set of distinct flags: the sum of the
 * per-flag hashes (a sum ignores order) of the distinct ones, mixed with
 * their count.  Distinct means "distinct hash" - sorting the hashes puts
 * duplicates side by side - so two different flags whose hashes collide
 * count once, a 2^-32 chance that costs one missed flag update.
 *
 * Past RESYNC_FLAGS_STACK flags the hashes go to the heap.  If that
 * allocation fails the duplicates are summed too: then only a list with
 * duplicates in it gets a different digest, which costs the client a
 * redundant FETCH (FLAGS), never a missed one.
 */
uint32_t
resync_flags_digest(const char *flags, size_t len)
{
	uint32_t stack[RESYNC_FLAGS_STACK], *hashes = stack, sum = 0, d;
	size_t ntok = 0, n = 0, distinct = 0, i, start;
	bool dedupe = true;

	for (i = 0; i < len; i++)
		if (!resync_is_space(flags[i]) &&
		    (i == 0 || resync_is_space(flags[i - 1])))
			ntok++;
	if (ntok > RESYNC_FLAGS_STACK) {
		hashes = malloc(ntok * sizeof(*hashes));
		if (hashes == NULL)
			dedupe = false;
	}

	for (i = 0; i < len; ) {
		while (i < len && resync_is_space(flags[i]))
			i++;
		start = i;
		while (i < len && !resync_is_space(flags[i]))
			i++;
		if (i == start || resync_is_recent(flags + start, i - start))
			continue;
		d = resync_flag_hash(flags + start, i - start);
		if (dedupe)
			hashes[n++] = d;
		else {
			sum += d;
			distinct++;
		}
	}

	if (dedupe) {
		qsort(hashes, n, sizeof(*hashes), resync_u32_cmp);
		for (i = 0; i < n; i++)
			if (i == 0 || hashes[i] != hashes[i - 1]) {
				sum += hashes[i];
				distinct++;
			}
		if (hashes != stack)
			free(hashes);
	}

	d = resync_mix32(sum ^ resync_mix32((uint32_t)distinct + 1));
	return d == 0 ? 1 : d;
}

/* ------------------------------------------------------------ diff */

/*
 * Responses, in the order the client needs them:
 *
 * 1. "* msn EXPUNGE" for each message of old missing from cur, highest
 *    msn first: an EXPUNGE renumbers only the messages after it (RFC 3501
 *    7.4.1), so going downwards every msn sent is still old's numbering.
 * 2. "* N EXISTS" when the client's count after those expunges
 *    (old - expunged) differs from cur's: after a valid diff that means
 *    messages were added, which EXISTS announces at the end of the
 *    numbering.  Expunges alone need no EXISTS: the client has already
 *    decremented its count for each (RFC 3501 7.4.1).
 * 3. "* msn FETCH (FLAGS (...))" for each message in both whose digest
 *    differs, msn in cur's numbering (which, after 1, is the client's),
 *    ascending.  New messages get none: the client knows nothing about
 *    them yet and fetches what it wants after EXISTS, as it would for
 *    mail arriving while attached.
 *
 * Digests are compared as opaque values, so 0 ("unknown") on either side
 * differs from any known digest and gives a FETCH (FLAGS), which is
 * harmless when nothing had changed.
 */
int
resync_diff(const struct resync_snap *old, const struct resync_snap *cur,
    resync_emit_fn emit, void *arg)
{
	const struct resync_msg *o = old->rs_msgs, *c = cur->rs_msgs;
	uint32_t old_max;
	size_t i, j, kept, expunged = 0;

	if (old->rs_uidvalidity != cur->rs_uidvalidity)
		return -1;

	/*
	 * Validate: every message of cur up to old's highest UID must be one
	 * old has (EXISTS can only add at the end), and each array must
	 * ascend, or the merges below would pair the wrong messages.  cur's
	 * first `kept` messages are then old's survivors, in old's order.
	 */
	for (i = 1; i < old->rs_n; i++)
		if (o[i].rm_uid <= o[i - 1].rm_uid)
			return -1;
	old_max = old->rs_n > 0 ? o[old->rs_n - 1].rm_uid : 0;
	i = 0;
	for (j = 0; j < cur->rs_n && c[j].rm_uid <= old_max; j++) {
		if (j > 0 && c[j].rm_uid <= c[j - 1].rm_uid)
			return -1;
		while (o[i].rm_uid < c[j].rm_uid) {	/* old_max stops it */
			i++;
			expunged++;
		}
		if (o[i].rm_uid != c[j].rm_uid)
			return -1;
		i++;
	}
	kept = j;
	expunged += old->rs_n - i;
	for (; j < cur->rs_n; j++)
		if (j > 0 && c[j].rm_uid <= c[j - 1].rm_uid)
			return -1;

	/* 1: downwards through old, with cur's survivors alongside. */
	j = kept;
	for (i = old->rs_n; i > 0; i--) {
		if (j > 0 && c[j - 1].rm_uid == o[i - 1].rm_uid)
			j--;
		else
			emit(arg, RESYNC_EXPUNGE, i);
	}

	/* 2 */
	if (cur->rs_n != old->rs_n - expunged)
		emit(arg, RESYNC_EXISTS, cur->rs_n);

	/* 3: upwards through the survivors, pairing each with old's. */
	i = 0;
	for (j = 0; j < kept; j++) {
		while (o[i].rm_uid != c[j].rm_uid)
			i++;
		if (o[i].rm_flags != c[j].rm_flags)
			emit(arg, RESYNC_FLAGS, j + 1);
		i++;
	}
	return 0;
}

/* ------------------------------------------------------------- parsing */

static bool
resync_num(const char **p, const char *end, uint32_t *n_r)
{
	uint64_t n = 0;
	const char *q = *p;

	if (q >= end || *q < '0' || *q > '9')
		return false;
	while (q < end && *q >= '0' && *q <= '9') {
		n = n * 10 + (uint64_t)(*q - '0');
		if (n > UINT32_MAX)
			return false;
		q++;
	}
	*p = q;
	*n_r = (uint32_t)n;
	return true;
}

static bool
resync_word(const char **p, const char *end, const char *w)
{
	size_t n = strlen(w), i;

	if ((size_t)(end - *p) < n)
		return false;
	for (i = 0; i < n; i++) {
		char ch = (*p)[i];

		if (ch >= 'a' && ch <= 'z')
			ch = (char)(ch - 'a' + 'A');
		if (ch != w[i])
			return false;
	}
	*p += n;
	return true;
}

int
resync_parse_count(const char *line, size_t len, const char *word,
    uint32_t *n_r)
{
	const char *p = line, *end = line + len;

	while (end > p && (end[-1] == '\r' || end[-1] == '\n'))
		end--;
	if (!resync_word(&p, end, "* ") || !resync_num(&p, end, n_r) ||
	    !resync_word(&p, end, " ") || !resync_word(&p, end, word))
		return -1;
	return p == end ? 0 : -1;
}

int
resync_parse_uidvalidity(const char *line, size_t len, uint32_t *n_r)
{
	const char *p = line, *end = line + len;

	if (!resync_word(&p, end, "* OK [UIDVALIDITY ") ||
	    !resync_num(&p, end, n_r) || p >= end || *p != ']')
		return -1;
	return 0;
}

int
resync_parse_fetch(const char *line, size_t len, uint32_t *msn_r,
    uint32_t *uid_r, const char **flags_r, size_t *flags_len_r)
{
	const char *p = line, *end = line + len, *f = NULL;
	bool have_uid = false;
	size_t flen = 0;

	while (end > p && (end[-1] == '\r' || end[-1] == '\n'))
		end--;
	if (!resync_word(&p, end, "* ") || !resync_num(&p, end, msn_r) ||
	    !resync_word(&p, end, " FETCH ("))
		return -1;
	/* Items are "NAME value" pairs; only UID and FLAGS matter here, and
	 * the server sends them without literals. */
	while (p < end && *p != ')') {
		if (*p == ' ') {
			p++;
			continue;
		}
		if (resync_word(&p, end, "UID ")) {
			if (!resync_num(&p, end, uid_r))
				return -1;
			have_uid = true;
		} else if (resync_word(&p, end, "FLAGS (")) {
			f = p;
			while (p < end && *p != ')')
				p++;
			if (p >= end)
				return -1;
			flen = (size_t)(p - f);
			p++;
		} else {
			/* Skip an item we do not need: name, then a value
			 * that is an atom or a parenthesised list. */
			int depth = 0;

			while (p < end && *p != ' ')
				p++;
			if (p < end)
				p++;
			while (p < end) {
				if (*p == '(')
					depth++;
				else if (*p == ')') {
					if (depth == 0)
						break;
					depth--;
				} else if (*p == ' ' && depth == 0)
					break;
				p++;
			}
		}
	}
	if (!have_uid || f == NULL)
		return -1;
	*flags_r = f;
	*flags_len_r = flen;
	return 0;
}
