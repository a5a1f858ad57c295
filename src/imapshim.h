/*
 * imapshim.h - limits and forward declarations shared by every module.
 *
 * Owns nothing: it only names the constants that several modules must agree
 * on, so that no module has to include another's header for a number.
 */
#ifndef IMAPSHIM_H
#define IMAPSHIM_H

#include <stddef.h>

#define nitems(a) (sizeof(a) / sizeof((a)[0]))

/* Longest {mailbox} a client may name (DESIGN.md 3.1). */
#define IMAPSHIM_MAILBOX_MAX 256
/* Longest admin account name, domain and password we accept. */
#define IMAPSHIM_NAME_MAX 256
#define IMAPSHIM_PASSWORD_MAX 1024
/* Longest IMAP tag we keep (longer tags are answered BAD). */
#define IMAPSHIM_TAG_MAX 64
/* Longest upstream response line (outside literals) before we call the
 * upstream broken; generous because FETCH envelopes can be long. */
#define IMAPSHIM_UPSTREAM_LINE_MAX (1024 * 1024)

struct config;
struct client;
struct upstream;

#endif
