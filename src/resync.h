/*
 * resync.h - mailbox snapshots and their diff into untagged responses.
 *
 * Owns the record of what a parked client was told about its selected
 * mailbox (UIDVALIDITY, the UID of each message sequence number, a digest
 * of each message's flags) and the computation of what changed since, in
 * the order IMAP requires: "* n EXPUNGE" highest n first, then
 * "* N EXISTS", then "* n FETCH (FLAGS (...))" in the new numbering.
 * A leaf: no I/O, no other module; memory grows with the mailbox (8 bytes
 * a message) and is the caller's to bound.
 */
#ifndef RESYNC_H
#define RESYNC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct resync_msg {
	uint32_t rm_uid;
	uint32_t rm_flags;	/* resync_flags_digest() of its FLAGS list */
};

struct resync_snap {
	uint32_t rs_uidvalidity;
	size_t rs_n;		/* messages: rs_msgs[msn - 1] */
	size_t rs_cap;
	struct resync_msg *rs_msgs;
};

void resync_snap_init(struct resync_snap *s);
void resync_snap_free(struct resync_snap *s);
void resync_snap_clear(struct resync_snap *s);
/* Append message msn = rs_n + 1.  UIDs must ascend.  Returns 0, or -1 on
 * a UID not above the previous one or out of memory. */
int resync_snap_append(struct resync_snap *s, uint32_t uid, uint32_t flags);
/* Set message msn's flags digest (1-based).  Returns 0 or -1. */
int resync_snap_set_flags(struct resync_snap *s, size_t msn, uint32_t flags);
/* Remove message msn (1-based), as "* msn EXPUNGE" does.  Returns 0 or -1. */
int resync_snap_expunge(struct resync_snap *s, size_t msn);
/* 1-based msn of uid, or 0. */
size_t resync_snap_find(const struct resync_snap *s, uint32_t uid);

/*
 * Digest of an IMAP flag list's contents (the text between the
 * parentheses of FLAGS (...)): insensitive to order, case and spacing,
 * and never 0 for a list (0 means "unknown"), so two lists with the same
 * flags give the same digest.  \Recent is ignored (it is per session).
 */
uint32_t resync_flags_digest(const char *flags, size_t len);

enum resync_ev {
	RESYNC_EXPUNGE,		/* "* msn EXPUNGE" (old numbering, highest first) */
	RESYNC_EXISTS,		/* "* count EXISTS" */
	RESYNC_FLAGS,		/* "* msn FETCH (FLAGS (...))": msn in the new
				 * numbering; index = msn - 1 into cur */
};

/* Called once per response to send, in order. */
typedef void (*resync_emit_fn)(void *arg, enum resync_ev ev, size_t msn_or_count);

/*
 * What changed from old (what the client was told) to cur (the mailbox
 * now).  Emits EXPUNGE for every UID of old missing from cur (highest msn
 * first), EXISTS when cur has messages old had not (or when any expunge
 * happened and the count changed), and FLAGS for messages in both whose
 * digest differs.  Returns 0; -1 (and emits nothing) when the two cannot
 * be reconciled: UIDVALIDITY differs, or cur holds a message whose UID is
 * below old's highest UID that old never had (the client's numbering
 * would be wrong) — the caller then ends the session with "* BYE".
 */
int resync_diff(const struct resync_snap *old, const struct resync_snap *cur,
    resync_emit_fn emit, void *arg);

/*
 * Parse "* n FETCH (... UID u ... FLAGS (f ...) ...)" (items in any order).
 * Returns 0 with msn, uid and the flag list's contents (between the
 * parentheses, not NUL-terminated) when the line carries both UID and
 * FLAGS; -1 otherwise.
 */
int resync_parse_fetch(const char *line, size_t len, uint32_t *msn_r,
    uint32_t *uid_r, const char **flags_r, size_t *flags_len_r);

/* Parse "* n WORD" (e.g. EXISTS, EXPUNGE) into n.  Returns 0 or -1. */
int resync_parse_count(const char *line, size_t len, const char *word,
    uint32_t *n_r);

/* Parse "* OK [UIDVALIDITY n] ..." into n.  Returns 0 or -1. */
int resync_parse_uidvalidity(const char *line, size_t len, uint32_t *n_r);

#endif
