/*
 * auth.h - client login names, mailbox validation, SASL PLAIN, and the
 * upstream LOGIN command.
 *
 * Owns the rules that decide what a client may log in as and what goes on
 * the wire upstream; pure functions over byte strings, no I/O, so every
 * injection attempt can be unit-tested.
 *
 * A login format is text with the placeholders {domain}, {admin} and
 * {mailbox}, e.g. "{domain}/{admin}/{mailbox}" (Exchange's delegated form)
 * or "{mailbox}*{admin}" (Dovecot's master-user form).  When matching a
 * client's name, '\' and '/' are the same character.
 */
#ifndef AUTH_H
#define AUTH_H

#include <stdbool.h>
#include <stddef.h>

#include "imapshim.h"
#include "stats.h"

struct auth_name {
	char domain[IMAPSHIM_NAME_MAX + 1];	/* "" when the format has none */
	char admin[IMAPSHIM_NAME_MAX + 1];
	char mailbox[IMAPSHIM_MAILBOX_MAX + 1];
};

/* True when fmt is usable as a client format: it names {admin} and
 * {mailbox} once each, {domain} at most once, and every two placeholders
 * are separated by at least one literal character. */
bool auth_format_valid(const char *fmt);

/*
 * Split a client login name by fmt.  Each placeholder matches a non-empty
 * run up to the first occurrence of the literal text that follows it in
 * fmt (or the end).  Fails (-1) when the name does not fit the format, a
 * part is too long, or the mailbox is not valid (auth_mailbox_valid).
 */
int auth_parse_login(const char *fmt, const char *name, size_t len,
    struct auth_name *out);

/* The password of the admin account named admin[0..len) (ASCII
 * case-insensitive), or NULL when there is no such account. */
typedef const char *(*auth_password_fn)(const void *arg, const char *admin,
    size_t len);

/*
 * The decision on a client's login: name split by fmt (auth_parse_login),
 * its {admin} a known account (password_of), pass that account's password
 * (compared in constant time).  Returns 0 with the parts in out, or -1 with
 * why in *why: STATS_AUTH_FAIL_MALFORMED_NAME, _UNKNOWN_ADMIN or
 * _WRONG_PASSWORD (out is then cleared).
 */
int auth_check_login(const char *fmt, const char *name, size_t len,
    const char *pass, size_t passlen, auth_password_fn password_of,
    const void *arg, struct auth_name *out, enum stats_auth_failure *why);

/* Letters, digits, '.', '_', '-', '+', '@'; 1..IMAPSHIM_MAILBOX_MAX bytes. */
bool auth_mailbox_valid(const char *mb, size_t len);

/*
 * Decode a base64 SASL PLAIN message "[authzid] NUL authcid NUL passwd".
 * The parts are written NUL-terminated into the caller's buffers.
 * Returns 0, or -1 on bad base64, a missing NUL, an embedded NUL or a part
 * too long for its buffer.
 */
int auth_plain_decode(const char *b64, size_t len,
    char *authzid, size_t authzid_len,
    char *authcid, size_t authcid_len,
    char *passwd, size_t passwd_len);

/* Expand fmt (placeholders as above) into out.  Returns the length, or -1
 * when out is too small. */
int auth_format_login(const char *fmt, const char *domain, const char *admin,
    const char *mailbox, char *out, size_t outlen);

/*
 * Build an upstream command "TAG LOGIN user pass\r\n" into out.  Each
 * argument is a quoted string with \ and " escaped; an argument holding CR,
 * LF, NUL or 8-bit bytes cannot be quoted and is sent as a literal: with
 * literal_plus "{n+}\r\n<bytes>", else the command is refused (-1), since a
 * synchronizing literal would need a round trip.  Returns the length
 * written, or -1 (no room, or an argument that cannot be sent).
 */
int auth_build_login(const char *tag, const char *user, const char *pass,
    bool literal_plus, char *out, size_t outlen);

#endif
