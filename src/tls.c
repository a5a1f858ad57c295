/* tls.c - SSL_CTXs for both sides, verification and failure reasons. */
#include "tls.h"

#include <openssl/err.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <string.h>

#include "addr.h"

/*
 * ECDHE only: finite-field DHE trips Windows Schannel's leading-zero bug
 * (KB4557473), which shows up as random handshake failures and Schannel
 * event 36888 on the CAS.  TLS 1.3 suites all use (EC)DHE already.
 */
#define TLS_CIPHERS \
	"ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES"

/* ex_data slot where we keep the first record header bytes we read. */
static int tls_peek_idx = -1;

struct tls_peek {
	unsigned char hdr[5];
	size_t len;
};

/*
 * Upstream session resumption: the newest session each server gave us,
 * keyed by "host:port", so that a new connection to a CAS skips the full
 * handshake (and its certificate verification and key exchange).  A
 * handful of servers: a small table searched linearly.
 */
#define TLS_RESUME_MAX 64

struct tls_resume {
	char key[300];
	SSL_SESSION *sess;
	/* The context whose connection got sess: only its connections may
	 * resume it.  After a reload a pooled connection of the old context
	 * can still receive a ticket, and its certificate was checked
	 * against the old tls_ca_file.  (A context's address is not reused
	 * while one of its connections lives, and every new context flushes
	 * the table, so the pointer cannot alias.) */
	const SSL_CTX *ctx;
};

static struct tls_resume tls_resume[TLS_RESUME_MAX];
static size_t tls_nresume;
static int tls_resume_idx = -1;	/* ex_data: the SSL's key (a copy) */

static struct tls_resume *
tls_resume_slot(const char *key)
{
	size_t i;

	for (i = 0; i < tls_nresume; i++)
		if (strcmp(tls_resume[i].key, key) == 0)
			return &tls_resume[i];
	if (tls_nresume == TLS_RESUME_MAX || strlen(key) >= sizeof(tls_resume[0].key))
		return NULL;
	snprintf(tls_resume[tls_nresume].key, sizeof(tls_resume[0].key), "%s", key);
	return &tls_resume[tls_nresume++];
}

/* OpenSSL hands us each new session (TLS 1.3: each ticket, after the
 * handshake); keep the newest for the server. */
static int
tls_new_session_cb(SSL *ssl, SSL_SESSION *sess)
{
	const char *key = SSL_get_ex_data(ssl, tls_resume_idx);
	struct tls_resume *r;

	if (key == NULL || !SSL_SESSION_is_resumable(sess) ||
	    (r = tls_resume_slot(key)) == NULL)
		return 0;
	SSL_SESSION_free(r->sess);
	r->sess = sess;
	r->ctx = SSL_get_SSL_CTX(ssl);
	return 1;	/* we keep the reference */
}

void
tls_forget_session(SSL *ssl)
{
	const char *key;
	struct tls_resume *r;

	if (ssl == NULL || tls_resume_idx < 0 ||
	    (key = SSL_get_ex_data(ssl, tls_resume_idx)) == NULL ||
	    (r = tls_resume_slot(key)) == NULL)
		return;
	SSL_SESSION_free(r->sess);
	r->sess = NULL;
}

static void
tls_resume_flush(void)
{
	size_t i;

	for (i = 0; i < tls_nresume; i++) {
		SSL_SESSION_free(tls_resume[i].sess);
		tls_resume[i].sess = NULL;
	}
	tls_nresume = 0;
}

static void
tls_err_string(char *buf, size_t buflen, unsigned long e)
{
	if (e == 0) {
		snprintf(buf, buflen, "connection closed during handshake");
		return;
	}
	ERR_error_string_n(e, buf, buflen);
}

static void
tls_ctx_common(SSL_CTX *ctx)
{
	/* A peer closing without close_notify is common (Exchange, clients
	 * that just drop) and must not be reported as a protocol error. */
	SSL_CTX_set_options(ctx, SSL_OP_IGNORE_UNEXPECTED_EOF |
	    SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
	/* No SSL_MODE_RELEASE_BUFFERS: it frees and allocates the record
	 * buffers around every record, i.e. on every command.  Buffers are
	 * released only once a connection is quiet (tls_release_buffers). */
	SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
	    SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
}

SSL_CTX *
tls_server_ctx_new(const char *cert_file, const char *key_file,
    int min_version, char *err, size_t errlen)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
	char e[256];

	if (ctx == NULL) {
		snprintf(err, errlen, "SSL_CTX_new failed");
		return NULL;
	}
	tls_ctx_common(ctx);
	SSL_CTX_set_min_proto_version(ctx, min_version);
	SSL_CTX_set_cipher_list(ctx, TLS_CIPHERS);
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
	SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"imapshim", 8);
	if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
		tls_err_string(e, sizeof(e), ERR_get_error());
		snprintf(err, errlen, "cannot load certificate %s: %s", cert_file, e);
		goto fail;
	}
	if (SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1) {
		tls_err_string(e, sizeof(e), ERR_get_error());
		snprintf(err, errlen, "cannot load key %s: %s", key_file, e);
		goto fail;
	}
	if (SSL_CTX_check_private_key(ctx) != 1) {
		snprintf(err, errlen, "key %s does not match certificate %s",
		    key_file, cert_file);
		goto fail;
	}
	ERR_clear_error();
	return ctx;
fail:
	ERR_clear_error();
	SSL_CTX_free(ctx);
	return NULL;
}

/* Keep the first record header the peer sent: if it is plaintext such as
 * "* BYE" we can say what the server really answered. */
static void
tls_msg_cb(int write_p, int version, int content_type, const void *buf,
    size_t len, SSL *ssl, void *arg)
{
	struct tls_peek *pk;

	(void)version;
	(void)arg;
	if (write_p || content_type != SSL3_RT_HEADER || tls_peek_idx < 0)
		return;
	pk = SSL_get_ex_data(ssl, tls_peek_idx);
	if (pk == NULL || pk->len != 0)
		return;
	pk->len = len < sizeof(pk->hdr) ? len : sizeof(pk->hdr);
	memcpy(pk->hdr, buf, pk->len);
}

static void
tls_exdata_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
    void *argp)
{
	(void)parent;
	(void)ad;
	(void)idx;
	(void)argl;
	(void)argp;
	OPENSSL_free(ptr);
}

SSL_CTX *
tls_client_ctx_new(bool verify, const char *ca_file, char *err, size_t errlen)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	char e[256];

	if (ctx == NULL) {
		snprintf(err, errlen, "SSL_CTX_new failed");
		return NULL;
	}
	if (tls_peek_idx < 0)
		tls_peek_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL,
		    tls_exdata_free);
	if (tls_resume_idx < 0)
		tls_resume_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL,
		    tls_exdata_free);
	/* A new context may trust other CAs: no session of the old one
	 * may skip its verification. */
	tls_resume_flush();
	tls_ctx_common(ctx);
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	SSL_CTX_set_cipher_list(ctx, TLS_CIPHERS);
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT |
	    SSL_SESS_CACHE_NO_INTERNAL_STORE);
	SSL_CTX_sess_set_new_cb(ctx, tls_new_session_cb);
	SSL_CTX_set_msg_callback(ctx, tls_msg_cb);
	if (verify) {
		SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
		if (ca_file == NULL ||
		    SSL_CTX_load_verify_locations(ctx, ca_file, NULL) != 1) {
			tls_err_string(e, sizeof(e), ERR_get_error());
			snprintf(err, errlen, "cannot load CA file %s: %s",
			    ca_file ? ca_file : "(none)", e);
			ERR_clear_error();
			SSL_CTX_free(ctx);
			return NULL;
		}
	} else
		SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
	ERR_clear_error();
	return ctx;
}

SSL *
tls_client_ssl_new(SSL_CTX *ctx, const char *name, bool verify,
    const char *resume_key)
{
	SSL *ssl = SSL_new(ctx);
	struct tls_peek *pk;
	struct tls_resume *r;
	char *key;

	if (ssl == NULL)
		return NULL;
	pk = OPENSSL_zalloc(sizeof(*pk));
	if (pk == NULL || SSL_set_ex_data(ssl, tls_peek_idx, pk) != 1) {
		OPENSSL_free(pk);
		SSL_free(ssl);
		return NULL;
	}
	if (name != NULL && *name != '\0') {
		if (!addr_is_ip_literal(name))
			SSL_set_tlsext_host_name(ssl, name);
		/* SSL_set1_host also accepts IP literals and checks IP SANs. */
		if (verify && SSL_set1_host(ssl, name) != 1) {
			SSL_free(ssl);
			return NULL;
		}
	}
	if (resume_key != NULL && (r = tls_resume_slot(resume_key)) != NULL) {
		key = OPENSSL_strdup(resume_key);
		if (key == NULL || SSL_set_ex_data(ssl, tls_resume_idx, key) != 1)
			OPENSSL_free(key);
		else if (r->sess != NULL && r->ctx == ctx)
			SSL_set_session(ssl, r->sess);
	}
	return ssl;
}

bool
tls_handshake_done(SSL *ssl)
{
	/* The first record's header is all tls_msg_cb wanted. */
	SSL_set_msg_callback(ssl, NULL);
	return SSL_session_reused(ssl) == 1;
}

void
tls_release_buffers(SSL *ssl)
{
	/* Refused (harmlessly) while a record is half read or written. */
	if (ssl != NULL)
		(void)SSL_free_buffers(ssl);
}

SSL *
tls_server_ssl_new(SSL_CTX *ctx)
{
	return SSL_new(ctx);
}

bool
tls_failed_verification(SSL *ssl)
{
	return ssl != NULL && SSL_get_verify_result(ssl) != X509_V_OK;
}

static bool
tls_peek_plaintext(SSL *ssl, char *buf, size_t buflen)
{
	struct tls_peek *pk;
	size_t i;

	if (tls_peek_idx < 0 || (pk = SSL_get_ex_data(ssl, tls_peek_idx)) == NULL ||
	    pk->len == 0)
		return false;
	/* A TLS record starts with a content type of 20..24; IMAP text
	 * starts with '*' or a printable tag. */
	if (pk->hdr[0] >= 20 && pk->hdr[0] <= 24)
		return false;
	for (i = 0; i < pk->len; i++)
		if (pk->hdr[i] < 0x20 || pk->hdr[i] > 0x7e)
			return false;
	if (pk->len >= 5 && memcmp(pk->hdr, "* BYE", 5) == 0)
		snprintf(buf, buflen, "server answered in plaintext \"* BYE\" "
		    "instead of a TLS handshake (Exchange: no certificate bound "
		    "to IMAP, event 1102, \"BYE Connection is closed. 14\")");
	else
		snprintf(buf, buflen, "server answered in plaintext \"%.*s\" "
		    "instead of a TLS handshake (check [upstream] tls)",
		    (int)pk->len, (const char *)pk->hdr);
	return true;
}

const char *
tls_failure_reason(SSL *ssl, unsigned long ossl_err, char *buf, size_t buflen)
{
	long vr;
	char e[256];

	if (ssl != NULL && (vr = SSL_get_verify_result(ssl)) != X509_V_OK) {
		snprintf(buf, buflen, "certificate verify failed: %s",
		    X509_verify_cert_error_string(vr));
		ERR_clear_error();
		return buf;
	}
	if (ssl != NULL && tls_peek_plaintext(ssl, buf, buflen)) {
		ERR_clear_error();
		return buf;
	}
	if (ossl_err == 0)
		ossl_err = ERR_peek_last_error();
	tls_err_string(e, sizeof(e), ossl_err);
	snprintf(buf, buflen, "TLS handshake failed: %s", e);
	ERR_clear_error();
	return buf;
}

void
tls_close_notify(SSL *ssl)
{
	if (ssl != NULL && SSL_is_init_finished(ssl)) {
		SSL_set_quiet_shutdown(ssl, 0);
		(void)SSL_shutdown(ssl);
		ERR_clear_error();
	}
}

void
tls_ctx_free(SSL_CTX *ctx)
{
	SSL_CTX_free(ctx);
}

void
tls_shutdown(void)
{
	tls_resume_flush();
}
