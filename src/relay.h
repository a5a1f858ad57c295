/*
 * relay.h - framing an evbuffer and moving bytes with backpressure.
 *
 * Owns no object: helpers shared by client.c and upstream.c to run the
 * imap_parse framer over a bufferevent's input (lines are never copied
 * for it), to move literal data in TLS-record-sized pieces, to write in the
 * current loop pass, to read TLS records ahead (one read() per arrival)
 * without leaving any behind, and the high/low-water constants that bound each
 * session's buffers.  Backpressure never uses read high-watermarks (they
 * stall on SSL bufferevents): the reader disables EV_READ on its source and
 * the sink's write low-watermark callback enables it again.
 */
#ifndef RELAY_H
#define RELAY_H

#include <stdbool.h>
#include <stddef.h>

#include "imap_parse.h"

struct evbuffer;
struct bufferevent;

/* Output queued for one peer beyond which we stop reading the other. */
#define RELAY_HIWAT (256 * 1024)
/* Output level at which reading resumes. */
#define RELAY_LOWAT (64 * 1024)
/* Bytes libevent hands SSL_write() at a time: the largest TLS record. */
#define RELAY_RECORD 15000
/* Runs shorter than this are moved as chains, not copied (relay_move). */
#define RELAY_COPY_MIN 1024

/*
 * Run the framer over in.  Returns true with a frame in out (and, for LINE
 * frames, *line pointing at its contiguous bytes, valid until in changes);
 * false when more input is needed.  The caller consumes out->len bytes
 * (evbuffer_drain or evbuffer_remove_buffer) before calling again.
 * MORE frames with len > 0 (discarded bytes) are drained here.
 */
bool relay_frame_next(struct imap_framer *fr, struct evbuffer *in,
    struct imap_frame *out, const char **line);

/*
 * Move len bytes from the head of src to dst.  From RELAY_COPY_MIN on
 * (literal data) they are copied, filling dst's last chain before starting
 * a new one of RELAY_RECORD bytes: an OpenSSL bufferevent makes one TLS
 * record and one write() of each chain, where moving src's own read chains
 * (4 KiB, or a peer's small records) would make several.
 */
void relay_move(struct evbuffer *src, struct evbuffer *dst, size_t len);

/* True when dst's output is at or above the high-water mark. */
bool relay_output_full(struct bufferevent *dst);

/*
 * Write what is queued on bev in this pass of the event loop instead of
 * waiting for epoll to report the socket writable.  Call after queueing a
 * reply or a command.
 */
void relay_write_now(struct bufferevent *bev);

/*
 * TLS read-ahead for bev, an OpenSSL bufferevent on a socket: one read()
 * takes every record the socket holds, instead of one read() for a
 * record's header and one for its body.  libevent 2.1 reads on only while
 * SSL_pending() > 0, which does not count records read ahead and not yet
 * opened, so relay_read_pending() must run wherever they could be left
 * behind: in every read callback, after the handshake, and wherever
 * reading is turned back on.  A filter bufferevent is left alone.
 */
void relay_read_ahead(struct bufferevent *bev);

/* If OpenSSL holds records read ahead on bev and reading is on, run bev's
 * read event in this pass of the loop (no system call: OpenSSL opens them
 * from its buffer).  Turning reading off cancels it. */
void relay_read_pending(struct bufferevent *bev);

#endif
