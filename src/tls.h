/*
 * tls.h - both SSL_CTXs, peer verification, and OpenSSL errors as reasons.
 *
 * Owns every SSL_CTX of the process.  The client side (imapshim as a
 * server) uses the site's certificate; the upstream side (imapshim as a
 * client of Exchange) verifies the CAS certificate, sends SNI, checks the
 * host name, offers TLS 1.2+ with ECDHE key exchange only (no finite-field
 * DHE: Schannel's leading-zero bug, KB4557473) and caches sessions for
 * resumption; clients resume with session tickets sealed by a rotating
 * key ring that outlives reloads.  Turns a failed handshake into one plain-language reason
 * (and a client's into a counted class).  Keeps the expiry of the
 * certificates in use: the client-facing one (side "client") and each
 * upstream server's as last seen in a handshake (side "upstream"), with a
 * warning 30 and again 7 days before each expires.
 */
#ifndef TLS_H
#define TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

#include "stats.h"

/* Server context for client connections.  NULL with a reason in err, also
 * when the key does not match the certificate or the certificate has
 * expired. */
SSL_CTX *tls_server_ctx_new(const char *cert_file, const char *key_file,
    int min_version, char *err, size_t errlen);

/* Client context for upstream connections.  With verify, ca_file must load.
 * NULL with a reason in err. */
SSL_CTX *tls_client_ctx_new(bool verify, const char *ca_file, char *err,
    size_t errlen);

/* A new SSL for one upstream connection to host: SNI (unless host is an IP
 * literal) and, with verify, the host-name check against name.  With a
 * resume_key ("host:port"), offers the last session that server gave and
 * keeps the ones it gives now. */
SSL *tls_client_ssl_new(SSL_CTX *ctx, const char *name, bool verify,
    const char *resume_key);

/* The handshake on ssl completed: stop watching its records.  True when
 * the session was resumed. */
bool tls_handshake_done(SSL *ssl);

/* Drop the resumable session of ssl's server (after a failure with it). */
void tls_forget_session(SSL *ssl);

/* Free ssl's record buffers (about 34 KiB) while its connection is quiet;
 * OpenSSL allocates them again at the next record. */
void tls_release_buffers(SSL *ssl);

/* A new SSL for one accepted client connection. */
SSL *tls_server_ssl_new(SSL_CTX *ctx);

/* Clients' session tickets: a new key seals them every
 * TLS_TICKET_ROTATE_S, the one before still opens them, an older one is
 * forgotten (its tickets get a full handshake).  Also their lifetime. */
#define TLS_TICKET_ROTATE_S (6 * 3600)
/* Clients' TLS 1.2 sessions kept for resumption by session ID. */
#define TLS_SESSION_CACHE_MAX 20000

/* Start a new ticket key if the newest is TLS_TICKET_ROTATE_S old at now
 * (Unix seconds), or there is none; true when it did.  Called with
 * time(NULL) as tickets are made and by a periodic timer; tests pass a
 * later now to rotate. */
bool tls_ticket_rotate(int64_t now);

/*
 * Why the handshake or session on ssl failed: the certificate verification
 * result ("certificate has expired", "unable to get local issuer
 * certificate", "hostname mismatch"...), a plaintext reply where TLS was
 * expected (Exchange with no certificate bound to IMAP sends
 * "* BYE Connection is closed. 14"), or OpenSSL's error string for
 * ossl_err (0: take the thread's error queue).  Clears the error queue.
 * Returns buf.
 */
const char *tls_failure_reason(SSL *ssl, unsigned long ossl_err, char *buf,
    size_t buflen);

/*
 * A client's TLS handshake on ssl failed with ossl_err (0: the thread's
 * queue): its class for imapshim_client_tls_failures_total, OpenSSL's text
 * in detail, and in offered the highest version the ClientHello offered
 * ("TLSv1", "TLSv1.2"...; "unknown" when none was read).  Clears the
 * error queue.
 */
enum stats_tls_failure tls_client_failure(SSL *ssl, unsigned long ossl_err,
    char *detail, size_t detaillen, char *offered, size_t offeredlen);

/* The class of a client handshake failure: plaintext when the first bytes
 * the client sent (first[0..len), len 0: none read) are ASCII text rather
 * than a TLS record, else by OpenSSL's reason in ossl_err.  Pure. */
enum stats_tls_failure tls_failure_class(unsigned long ossl_err,
    const unsigned char *first, size_t len);

/* ---- certificate expiry */

/* Days before notAfter of the first and the second warning. */
#define TLS_EXPIRY_WARN_DAYS 30
#define TLS_EXPIRY_URGENT_DAYS 7

/* The label side="client" (the certificate clients see, tls_cert_file,
 * with server="") or side="upstream" (a server's, server="host:port"). */
enum tls_side { TLS_SIDE_CLIENT, TLS_SIDE_UPSTREAM, TLS_SIDE_COUNT };
extern const char *const tls_side_names[TLS_SIDE_COUNT];

/* Which warning is due at now (Unix seconds) for a certificate valid until
 * not_after: 0 while more than TLS_EXPIRY_WARN_DAYS days are left, else
 * TLS_EXPIRY_WARN_DAYS or, from TLS_EXPIRY_URGENT_DAYS days on (expired
 * included), TLS_EXPIRY_URGENT_DAYS.  Pure. */
unsigned tls_expiry_stage(int64_t not_after, int64_t now);

/* ctx (from tls_server_ctx_new) now serves the clients: record its
 * certificate's expiry and warn when a warning is due (start, reload). */
void tls_cert_in_use(SSL_CTX *ctx, int64_t now);
/* A handshake with server ("host:port") completed on ssl: record the
 * expiry of the certificate it showed and warn when a warning is due. */
void tls_cert_seen(SSL *ssl, const char *server, int64_t now);
/* Warn for every recorded certificate whose next warning has come (a daily
 * timer; each warning is logged once per certificate and threshold). */
void tls_cert_recheck(int64_t now);
/* notAfter (Unix seconds) of the certificate recorded for side and server
 * ("" for the client side); false when none was. */
bool tls_cert_expiry(enum tls_side side, const char *server,
    int64_t *not_after);

/* imapshim -t: load cert_file and key_file as tls_server_ctx_new does.
 * Returns -1 with the error in msg, 1 with a warning in msg (expires
 * within TLS_EXPIRY_WARN_DAYS days), or 0. */
int tls_check_server_files(const char *cert_file, const char *key_file,
    int min_version, int64_t now, char *msg, size_t msglen);

/* True when the failure on ssl was a certificate verification failure. */
bool tls_failed_verification(SSL *ssl);

/* Send close_notify if the handshake completed (best effort, non-blocking). */
void tls_close_notify(SSL *ssl);

void tls_ctx_free(SSL_CTX *ctx);

/* At exit: drop the cached upstream sessions. */
void tls_shutdown(void);

#endif
