/*
 * tls.h - both SSL_CTXs, peer verification, and OpenSSL errors as reasons.
 *
 * Owns every SSL_CTX of the process.  The client side (imapshim as a
 * server) uses the site's certificate; the upstream side (imapshim as a
 * client of Exchange) verifies the CAS certificate, sends SNI, checks the
 * host name, offers TLS 1.2+ with ECDHE key exchange only (no finite-field
 * DHE: Schannel's leading-zero bug, KB4557473) and caches sessions for
 * resumption.  Turns a failed handshake into one plain-language reason.
 */
#ifndef TLS_H
#define TLS_H

#include <stdbool.h>
#include <stddef.h>

#include <openssl/ssl.h>

/* Server context for client connections.  NULL with a reason in err. */
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

/* True when the failure on ssl was a certificate verification failure. */
bool tls_failed_verification(SSL *ssl);

/* Send close_notify if the handshake completed (best effort, non-blocking). */
void tls_close_notify(SSL *ssl);

void tls_ctx_free(SSL_CTX *ctx);

/* At exit: drop the cached upstream sessions. */
void tls_shutdown(void);

#endif
