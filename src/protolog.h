/*
 * protolog.h - the optional protocol log in Exchange's IMAP4 CSV format.
 *
 * Owns the protocol_log file: one CSV line per client command in the field
 * order of Exchange's own IMAP protocol log
 * (dateTime,sessionId,seqNumber,sIp,cIp,user,duration,rqsize,rpsize,
 * command,parameters,context), so an operator can lay imapshim's view
 * beside Exchange's when chasing ProxyNotAuthenticated.  Callers pass
 * parameters already masked: a LOGIN's password is always "*****".
 */
#ifndef PROTOLOG_H
#define PROTOLOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct protolog_rec {
	uint64_t session_id;	/* the client session id */
	unsigned seq;		/* per-session line counter */
	const char *sip;	/* "ip:port" imapshim accepted on */
	const char *cip;	/* "ip:port" of the client */
	const char *user;	/* "domain/admin/mailbox" once known, else "" */
	uint64_t duration_ms;
	uint64_t rqsize;	/* bytes of the command */
	uint64_t rpsize;	/* bytes of its responses */
	const char *command;	/* lower case, or OpenSession/CloseSession */
	const char *params;	/* masked, cut to 2048 bytes */
	const char *context;	/* e.g. R="a1 OK LOGIN completed." */
};

/* Open (append) path; NULL or "" turns the log off.  Returns 0 or -1. */
int protolog_open(const char *path, char *err, size_t errlen);
int protolog_reopen(void);
void protolog_close(void);
bool protolog_enabled(void);
void protolog_write(const struct protolog_rec *r);

#endif
