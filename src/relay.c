/* relay.c - framing evbuffers for the client and upstream relays. */
#include "relay.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/bufferevent_struct.h>
#include <event2/event.h>
#include <openssl/ssl.h>

bool
relay_frame_next(struct imap_framer *fr, struct evbuffer *in,
    struct imap_frame *out, const char **line)
{
	struct evbuffer_iovec v;
	size_t avail, want;

	*line = NULL;
	for (;;) {
		avail = evbuffer_get_length(in);
		if (avail == 0)
			return false;
		if (evbuffer_peek(in, -1, NULL, &v, 1) < 1)
			return false;
		/* Literal octets are counted, not read: one frame takes all
		 * that arrived, not only the first chain's 4 KiB. */
		imap_framer_next(fr, v.iov_base, imap_framer_in_literal(fr) ?
		    avail : v.iov_len, out);
		if (out->kind == IMAP_FR_MORE) {
			if (out->len > 0) {
				evbuffer_drain(in, out->len);
				continue;
			}
			if (v.iov_len >= avail)
				return false;
			/* The line spans chunks: make more of it contiguous.
			 * Lines are bounded by the framer's limit, so this
			 * never copies a literal. */
			want = v.iov_len * 2 + 4096;
			if (want > avail)
				want = avail;
			if (evbuffer_pullup(in, (ev_ssize_t)want) == NULL)
				return false;
			continue;
		}
		if (out->kind == IMAP_FR_LINE || out->kind == IMAP_FR_OVERFLOW)
			*line = v.iov_base;
		return true;
	}
}

void
relay_move(struct evbuffer *src, struct evbuffer *dst, size_t len)
{
	struct evbuffer_iovec v;
	ev_ssize_t got;
	size_t n, want;

	/* A command or response line: moving its chain costs no copy. */
	if (len < RELAY_COPY_MIN) {
		evbuffer_remove_buffer(src, dst, len);
		return;
	}
	while (len > 0) {
		/* Fill the room left in dst's last chain first; start a new
		 * chain only of a whole record's size. */
		want = evbuffer_get_length(dst) > 0 ? 1 : RELAY_RECORD;
		if (evbuffer_reserve_space(dst, (ev_ssize_t)want, &v, 1) < 1)
			goto fallback;
		if (v.iov_len < RELAY_COPY_MIN && v.iov_len < len &&
		    evbuffer_reserve_space(dst, RELAY_RECORD, &v, 1) < 1)
			goto fallback;
		n = len < v.iov_len ? len : v.iov_len;
		if ((got = evbuffer_copyout(src, v.iov_base, n)) <= 0)
			goto fallback;
		v.iov_len = (size_t)got;
		evbuffer_commit_space(dst, &v, 1);
		evbuffer_drain(src, (size_t)got);
		len -= (size_t)got;
	}
	return;
fallback:
	evbuffer_remove_buffer(src, dst, len);	/* out of memory: no copy */
}

bool
relay_output_full(struct bufferevent *dst)
{
	return evbuffer_get_length(bufferevent_get_output(dst)) >= RELAY_HIWAT;
}

/*
 * A socket bufferevent (OpenSSL's included) writes only once epoll reports
 * EPOLLOUT: one epoll_ctl to ask, a wakeup, the write, one epoll_ctl to
 * stop asking, for every reply.  The socket is almost always writable, so
 * run the write event now: with epoll's changelist (main.c) the add and
 * the delete then cancel out within this pass.  A full socket makes
 * SSL_write() or writev() say EAGAIN and the write waits for EPOLLOUT as
 * before.  A filter bufferevent writes through its underlying one already.
 */
void
relay_write_now(struct bufferevent *bev)
{
	if (bufferevent_get_underlying(bev) == NULL &&
	    (bufferevent_get_enabled(bev) & EV_WRITE) &&
	    evbuffer_get_length(bufferevent_get_output(bev)) > 0)
		event_active(&bev->ev_write, EV_WRITE, 1);
}

void
relay_read_ahead(struct bufferevent *bev)
{
	SSL *ssl = bufferevent_openssl_get_ssl(bev);

	/* A filter reads its records from the underlying evbuffer, which
	 * libevent drains on its own. */
	if (ssl != NULL && bufferevent_get_underlying(bev) == NULL)
		SSL_set_read_ahead(ssl, 1);
}

void
relay_read_pending(struct bufferevent *bev)
{
	SSL *ssl = bufferevent_openssl_get_ssl(bev);

	if (ssl != NULL && SSL_get_read_ahead(ssl) &&
	    (bufferevent_get_enabled(bev) & EV_READ) && SSL_has_pending(ssl))
		event_active(&bev->ev_read, EV_READ, 1);
}
