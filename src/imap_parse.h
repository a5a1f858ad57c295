/*
 * imap_parse.h - incremental, allocation-free IMAP framing and tokenizing.
 *
 * Owns the IMAP syntax rules and nothing else: no I/O, no libevent, no
 * allocation.  Three tools, all working on byte slices owned by the caller:
 *
 * 1. The framer splits a byte stream (client commands or server responses)
 *    into lines and literal octets.  It is fed whatever bytes are buffered;
 *    it says how many to consume and what they are.  Bytes it did not
 *    consume must be presented again, at the start of buf, on the next call
 *    (it remembers how far it already scanned, so byte-at-a-time feeding is
 *    linear).  It enforces the line and literal limits and, after an
 *    overflow, silently swallows the rest of that command.
 *
 * 2. The lexer walks one complete command or response (its wire bytes, with
 *    literal octets inline after each "{n}\r\n") token by token.
 *
 * 3. Helpers classify a response line and quote strings.
 */
#ifndef IMAP_PARSE_H
#define IMAP_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* ------------------------------------------------------------ framer */

enum imap_fr_kind {
	IMAP_FR_MORE,		/* need more bytes; consume len (0, or >0 while discarding) */
	IMAP_FR_LINE,		/* one line, len bytes including its CRLF (or bare LF) */
	IMAP_FR_LITERAL,	/* len octets of the current literal */
	IMAP_FR_OVERFLOW,	/* line passed line_max: consume len; the rest of the
				 * command is discarded by the framer from now on */
};

struct imap_frame {
	enum imap_fr_kind kind;
	size_t len;		/* bytes of buf this frame covers (to consume) */
	/* LINE */
	bool first;		/* first line of a command/response: the tag is here */
	bool last;		/* no literal follows: the command/response is complete */
	bool has_lit;		/* the line ends in {n}, {n+} or ~{n} (before CRLF) */
	bool lit_nonsync;	/* {n+} */
	bool lit_toobig;	/* n > lit_max: answer NO [TOOBIG]; a {n+} literal
				 * and the rest of its command are discarded by the
				 * framer, a {n} one is never sent by the client */
	uint64_t lit_size;	/* n */
	size_t marker_off;	/* offset of '{' (or '~' for ~{n}) within the line */
	size_t text_len;	/* line length without CRLF */
	/* LITERAL */
	bool lit_end;		/* these octets finish the literal */
	/* OVERFLOW */
	bool overflow_first;	/* the overflowing line was the command's first */
};

struct imap_framer {
	/* private; on the stack or embedded by the caller */
	int fr_state;
	size_t fr_line_max;	/* max bytes of one command's text outside literals */
	uint64_t fr_lit_max;
	size_t fr_scanned;	/* bytes of the pending line already scanned */
	size_t fr_cmd_text;	/* text bytes of the current command so far */
	uint64_t fr_lit_left;
	bool fr_in_cmd;		/* a command/response has started and not ended */
	char fr_tail[24];	/* last bytes of a discarded line (literal marker) */
	size_t fr_tail_len;
};

/* line_max counts a whole command's text outside literals (CRLFs included);
 * lit_max is the largest literal accepted. */
void imap_framer_init(struct imap_framer *fr, size_t line_max, uint64_t lit_max);
void imap_framer_next(struct imap_framer *fr, const char *buf, size_t len,
    struct imap_frame *out);
/* True between commands: no partial line, literal or discard pending. */
bool imap_framer_at_boundary(const struct imap_framer *fr);
/* True inside a literal: the next frame only counts bytes (their content
 * is never read), so it may span more than the buffer given. */
bool imap_framer_in_literal(const struct imap_framer *fr);

/* ------------------------------------------------------------- lexer */

enum imap_tok_type {
	IMAP_TOK_ATOM,		/* any run of non-special bytes (also NIL, numbers,
				 * BODY[...] and sequence sets) */
	IMAP_TOK_QUOTED,	/* "...": p/len point inside the quotes, escapes kept */
	IMAP_TOK_LITERAL,	/* {n}/{n+}/~{n}: p/len point at the n octets */
	IMAP_TOK_LPAREN,
	IMAP_TOK_RPAREN,
	IMAP_TOK_EOL,		/* end of the command (final CRLF or end of input) */
};

struct imap_tok {
	enum imap_tok_type type;
	const char *p;
	size_t len;
};

struct imap_lexer {
	const char *lx_p;
	const char *lx_end;
};

void imap_lexer_init(struct imap_lexer *lx, const char *buf, size_t len);
/* 1: a token in tok (EOL once at the end, and again on later calls);
 * -1: syntax error (unterminated quote, bad literal marker, short literal,
 * CR/LF/NUL inside a quoted string). Single spaces separate tokens. */
int imap_lex_next(struct imap_lexer *lx, struct imap_tok *tok);
/* Rest of the input from the current position (for "remaining text"). */
const char *imap_lex_rest(const struct imap_lexer *lx, size_t *len_r);

/* Copy a token's string value (QUOTED unescaped, ATOM and LITERAL as is)
 * into dst with a NUL.  Returns the length, or -1 when dst is too small or
 * the value holds a NUL byte. */
ssize_t imap_tok_string(const struct imap_tok *tok, char *dst, size_t dstlen);

/* Tag and command name of a command's first line (tag: a non-empty atom
 * without '+'; command: an atom).  Returns 0 or -1. */
int imap_parse_command_head(const char *line, size_t len,
    struct imap_tok *tag, struct imap_tok *cmd);

/* ---------------------------------------------------------- responses */

enum imap_resp_kind {
	IMAP_RESP_UNTAGGED,	/* "* ..." */
	IMAP_RESP_CONTINUATION,	/* "+" or "+ text" */
	IMAP_RESP_TAGGED,	/* "tag OK|NO|BAD ..." */
	IMAP_RESP_INVALID,
};

enum imap_resp_status {
	IMAP_ST_NONE,		/* untagged data such as "* 3 EXISTS" */
	IMAP_ST_OK,
	IMAP_ST_NO,
	IMAP_ST_BAD,
	IMAP_ST_BYE,
	IMAP_ST_PREAUTH,
};

struct imap_resp {
	enum imap_resp_kind kind;
	enum imap_resp_status status;
	struct imap_tok tag;	/* TAGGED */
	const char *code;	/* inside [...] after the status, or NULL */
	size_t code_len;
	const char *text;	/* human text after status and code (may be empty) */
	size_t text_len;
};

/* Classify the first line of a response (with or without CRLF). */
void imap_parse_response(const char *line, size_t len, struct imap_resp *r);

/* ------------------------------------------------------------ quoting */

/* Write s as an IMAP quoted string ("..." with \ and " escaped) into dst.
 * Returns the length written (without NUL), -1 when s holds CR, LF, NUL or
 * a byte >= 0x80 (a literal is needed), -2 when dst is too small. */
ssize_t imap_quote(char *dst, size_t dstlen, const char *s, size_t len);

/* ASCII case-insensitive compare of a token with a NUL-terminated word. */
bool imap_tok_is(const struct imap_tok *tok, const char *word);

#endif
