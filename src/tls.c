/* tls.c - SSL_CTXs for both sides, verification and failure reasons. */
#include "tls.h"

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "addr.h"
#include "config.h"
#include "log.h"

/*
 * ECDHE only: finite-field DHE trips Windows Schannel's leading-zero bug
 * (KB4557473), which shows up as random handshake failures and Schannel
 * event 36888 on the CAS.  TLS 1.3 suites all use (EC)DHE already.
 */
#define TLS_CIPHERS \
	"ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AES:!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES"

/* ex_data slot where we keep the first record header bytes we read (and,
 * on a client's connection, the version its ClientHello offered). */
static int tls_peek_idx = -1;

struct tls_peek {
	unsigned char hdr[5];
	size_t len;
	int offered;		/* highest version offered; 0: not seen */
};

/*
 * Upstream session resumption: the newest session each server gave us,
 * keyed by "host:port", so that a new connection to a CAS skips the full
 * handshake (and its certificate verification and key exchange).  A
 * handful of servers: a small table searched linearly.
 */
#define TLS_RESUME_MAX CONFIG_MAX_SERVERS

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

/*
 * Client-side resumption: session tickets sealed with imapshim's own key
 * ring instead of the keys OpenSSL makes for each SSL_CTX.  OpenSSL 3
 * never rotates those, so one key would seal every ticket for the life of
 * the process (whoever reads it later can decrypt every recorded session),
 * and every reload's new SSL_CTX would make all the clients' tickets
 * useless at once.  The ring is the process's: the newest key seals, the
 * one before still opens (and such a ticket is renewed), and a new key
 * comes every TLS_TICKET_ROTATE_S, checked as tickets are made and by
 * main's trim timer (so an unused key is erased on time too).  A ticket
 * lives as long as a key seals (SSL_CTX_set_timeout), so it can always be
 * opened while it is valid, and no key is kept much longer than two
 * periods.
 */
#define TLS_TICKET_KEYS 2

struct tls_ticket_key {
	unsigned char name[16];
	unsigned char aes[32];		/* AES-256-CBC */
	unsigned char hmac[32];		/* HMAC-SHA256 */
	int64_t born;			/* Unix seconds; 0: no key */
};

static struct tls_ticket_key tls_tkeys[TLS_TICKET_KEYS];	/* [0] seals */

bool
tls_ticket_rotate(int64_t now)
{
	struct tls_ticket_key k;

	if (tls_tkeys[0].born != 0 && now - tls_tkeys[0].born < TLS_TICKET_ROTATE_S)
		return false;
	if (RAND_bytes(k.name, sizeof(k.name)) != 1 ||
	    RAND_bytes(k.aes, sizeof(k.aes)) != 1 ||
	    RAND_bytes(k.hmac, sizeof(k.hmac)) != 1) {
		/* The old key keeps sealing: better than no resumption. */
		log_error("tls_ticket_key", "reason=%s",
		    log_v("no random bytes for a new ticket key"));
		ERR_clear_error();
		OPENSSL_cleanse(&k, sizeof(k));
		return false;
	}
	k.born = now > 0 ? now : 1;
	OPENSSL_cleanse(&tls_tkeys[TLS_TICKET_KEYS - 1], sizeof(tls_tkeys[0]));
	memmove(&tls_tkeys[1], &tls_tkeys[0],
	    (TLS_TICKET_KEYS - 1) * sizeof(tls_tkeys[0]));
	tls_tkeys[0] = k;
	OPENSSL_cleanse(&k, sizeof(k));
	return true;
}

/* OpenSSL's ticket callback: seal (enc) with the newest key, open with the
 * key the ticket names.  Returns 1, 2 (opened with an older key: issue a
 * new ticket), 0 (no ticket / full handshake) or -1. */
static int
tls_ticket_cb(SSL *ssl, unsigned char key_name[16], unsigned char *iv,
    EVP_CIPHER_CTX *ectx, EVP_MAC_CTX *hctx, int enc)
{
	const struct tls_ticket_key *k = NULL;
	OSSL_PARAM params[3];
	size_t i;

	(void)ssl;
	if (enc) {
		(void)tls_ticket_rotate((int64_t)time(NULL));
		k = &tls_tkeys[0];
		if (k->born == 0 || RAND_bytes(iv, 16) != 1)
			return 0;
		memcpy(key_name, k->name, sizeof(k->name));
	} else {
		for (i = 0; i < TLS_TICKET_KEYS && k == NULL; i++)
			if (tls_tkeys[i].born != 0 &&
			    memcmp(key_name, tls_tkeys[i].name, 16) == 0)
				k = &tls_tkeys[i];
		if (k == NULL)
			return 0;	/* rotated out: a full handshake */
	}
	params[0] = OSSL_PARAM_construct_octet_string(OSSL_MAC_PARAM_KEY,
	    (void *)k->hmac, sizeof(k->hmac));
	params[1] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
	    (char *)"SHA256", 0);
	params[2] = OSSL_PARAM_construct_end();
	if (EVP_MAC_CTX_set_params(hctx, params) != 1 ||
	    EVP_CipherInit_ex(ectx, EVP_aes_256_cbc(), NULL, k->aes, iv,
	    enc) != 1)
		return -1;
	return enc || k == &tls_tkeys[0] ? 1 : 2;
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

/* x's notAfter in Unix seconds (0 when unreadable). */
static int64_t
tls_not_after(const X509 *x)
{
	struct tm tm;

	if (x == NULL || ASN1_TIME_to_tm(X509_get0_notAfter(x), &tm) != 1)
		return 0;
	return (int64_t)timegm(&tm);
}

/* t as "2026-01-31T23:59:59Z".  Returns buf. */
static const char *
tls_time_str(int64_t t, char *buf, size_t buflen)
{
	time_t tt = (time_t)t;
	struct tm tm;

	if (gmtime_r(&tt, &tm) == NULL ||
	    strftime(buf, buflen, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
		snprintf(buf, buflen, "%lld", (long long)t);
	return buf;
}

/* True when b[0..len) looks like text (IMAP, HTTP) rather than a TLS
 * record, whose first byte is a content type of 20..24. */
static bool
tls_is_text(const unsigned char *b, size_t len)
{
	size_t i;

	if (len == 0 || (b[0] >= 20 && b[0] <= 24))
		return false;
	for (i = 0; i < len; i++)
		if (b[i] < 0x20 || b[i] > 0x7e)
			return false;
	return true;
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

static void
tls_indexes_init(void)
{
	if (tls_peek_idx < 0)
		tls_peek_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL,
		    tls_exdata_free);
	if (tls_resume_idx < 0)
		tls_resume_idx = SSL_get_ex_new_index(0, NULL, NULL, NULL,
		    tls_exdata_free);
}

/* Keep the first record header the peer sent: if it is plaintext such as
 * "* BYE" (a server) or "a1 LOGIN" (a client) we can say so. */
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

/* Note the highest version the client offers, before OpenSSL picks one
 * (or refuses them all).  A TLS 1.3 client says TLS 1.2 in the legacy
 * field and lists its versions in supported_versions. */
static int
tls_client_hello_cb(SSL *ssl, int *al, void *arg)
{
	struct tls_peek *pk = SSL_get_ex_data(ssl, tls_peek_idx);
	const unsigned char *ext;
	size_t len, i;
	int v;

	(void)al;
	(void)arg;
	if (pk == NULL)
		return SSL_CLIENT_HELLO_SUCCESS;
	pk->offered = (int)SSL_client_hello_get0_legacy_version(ssl);
	if (SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_supported_versions,
	    &ext, &len) == 1 && len >= 1 && (size_t)ext[0] + 1 <= len) {
		for (i = 1; i + 1 < (size_t)ext[0] + 1; i += 2) {
			v = ext[i] << 8 | ext[i + 1];
			/* Skip GREASE (0x?a?a) and drafts: not 3.x. */
			if (ext[i] == 3 && v > pk->offered)
				pk->offered = v;
		}
	}
	return SSL_CLIENT_HELLO_SUCCESS;
}

/* A peek record for ssl; false when out of memory. */
static bool
tls_peek_attach(SSL *ssl)
{
	struct tls_peek *pk = OPENSSL_zalloc(sizeof(*pk));

	if (pk == NULL || SSL_set_ex_data(ssl, tls_peek_idx, pk) != 1) {
		OPENSSL_free(pk);
		return false;
	}
	return true;
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
	tls_indexes_init();
	tls_ctx_common(ctx);
	SSL_CTX_set_min_proto_version(ctx, min_version);
	SSL_CTX_set_cipher_list(ctx, TLS_CIPHERS);
	/* Resumption (TLS 1.2 and 1.3): tickets from the key ring, which
	 * cost imapshim no memory per client; the session cache serves TLS
	 * 1.2 clients that resume by session ID only, one entry per client
	 * at most (max_clients' default). */
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_SERVER);
	SSL_CTX_set_session_id_context(ctx, (const unsigned char *)"imapshim", 8);
	SSL_CTX_sess_set_cache_size(ctx, TLS_SESSION_CACHE_MAX);
	SSL_CTX_set_timeout(ctx, TLS_TICKET_ROTATE_S);
	/* A client reconnects one connection at a time: one TLS 1.3 ticket
	 * (OpenSSL sends 2) saves a sealing and a record per handshake. */
	SSL_CTX_set_num_tickets(ctx, 1);
	(void)tls_ticket_rotate((int64_t)time(NULL));
	SSL_CTX_set_tlsext_ticket_key_evp_cb(ctx, tls_ticket_cb);
	/* For tls_client_failure(): what the client sent and offered. */
	SSL_CTX_set_msg_callback(ctx, tls_msg_cb);
	SSL_CTX_set_client_hello_cb(ctx, tls_client_hello_cb, NULL);
	if (SSL_CTX_use_certificate_chain_file(ctx, cert_file) != 1) {
		tls_err_string(e, sizeof(e), ERR_get_error());
		snprintf(err, errlen, "cannot load certificate %s: %s", cert_file, e);
		goto fail;
	}
	if (X509_cmp_current_time(X509_get0_notAfter(
	    SSL_CTX_get0_certificate(ctx))) <= 0) {
		snprintf(err, errlen, "certificate %s has expired (%s)",
		    cert_file, tls_time_str(tls_not_after(
		    SSL_CTX_get0_certificate(ctx)), e, sizeof(e)));
		goto fail;
	}
	if (SSL_CTX_use_PrivateKey_file(ctx, key_file, SSL_FILETYPE_PEM) != 1) {
		unsigned long ke = ERR_get_error();

		/* OpenSSL checks the pair as it loads the key. */
		if (ERR_GET_LIB(ke) == ERR_LIB_X509 &&
		    ERR_GET_REASON(ke) == X509_R_KEY_VALUES_MISMATCH) {
			snprintf(err, errlen, "key %s does not match "
			    "certificate %s", key_file, cert_file);
			goto fail;
		}
		tls_err_string(e, sizeof(e), ke);
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

SSL_CTX *
tls_client_ctx_new(bool verify, const char *ca_file, char *err, size_t errlen)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	char e[256];

	if (ctx == NULL) {
		snprintf(err, errlen, "SSL_CTX_new failed");
		return NULL;
	}
	tls_indexes_init();
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
	struct tls_resume *r;
	char *key;

	if (ssl == NULL)
		return NULL;
	if (!tls_peek_attach(ssl)) {
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
	SSL *ssl = SSL_new(ctx);

	if (ssl != NULL && !tls_peek_attach(ssl)) {
		SSL_free(ssl);
		return NULL;
	}
	return ssl;
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

	if (tls_peek_idx < 0 || (pk = SSL_get_ex_data(ssl, tls_peek_idx)) == NULL ||
	    !tls_is_text(pk->hdr, pk->len))
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

enum stats_tls_failure
tls_failure_class(unsigned long ossl_err, const unsigned char *first,
    size_t len)
{
	if (tls_is_text(first, len))
		return STATS_TLS_FAIL_PLAINTEXT;
	if (ERR_GET_LIB(ossl_err) != ERR_LIB_SSL)
		return STATS_TLS_FAIL_OTHER;
	switch (ERR_GET_REASON(ossl_err)) {
	case SSL_R_UNSUPPORTED_PROTOCOL:
	case SSL_R_UNKNOWN_PROTOCOL:
	case SSL_R_VERSION_TOO_LOW:
	case SSL_R_VERSION_TOO_HIGH:
	case SSL_R_WRONG_SSL_VERSION:
	case SSL_R_INAPPROPRIATE_FALLBACK:
	case SSL_R_TLSV1_ALERT_PROTOCOL_VERSION:
	case SSL_R_TLSV1_ALERT_INAPPROPRIATE_FALLBACK:
		return STATS_TLS_FAIL_PROTOCOL_VERSION;
	case SSL_R_NO_SHARED_CIPHER:
	case SSL_R_NO_SHARED_GROUPS:
	case SSL_R_NO_SUITABLE_KEY_SHARE:
	case SSL_R_NO_SHARED_SIGNATURE_ALGORITHMS:
	case SSL_R_NO_SUITABLE_SIGNATURE_ALGORITHM:
	case SSL_R_TLSV1_ALERT_INSUFFICIENT_SECURITY:
		return STATS_TLS_FAIL_NO_SHARED_CIPHER;
	/* The listener asks for no client certificate: these are the
	 * client's alerts about ours (unknown CA, expired, wrong...). */
	case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
	case SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE:
	case SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED:
	case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
	case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
	case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
	case SSL_R_TLSV1_BAD_CERTIFICATE_STATUS_RESPONSE:
	case SSL_R_TLSV1_BAD_CERTIFICATE_HASH_VALUE:
	case SSL_R_TLSV1_CERTIFICATE_UNOBTAINABLE:
	case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
	case SSL_R_CERTIFICATE_VERIFY_FAILED:
	case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
		return STATS_TLS_FAIL_CERTIFICATE;
	case SSL_R_HTTP_REQUEST:
	case SSL_R_HTTPS_PROXY_REQUEST:
		return STATS_TLS_FAIL_PLAINTEXT;
	default:
		return STATS_TLS_FAIL_OTHER;
	}
}

/* OpenSSL's name of a protocol version ("TLSv1.2"). */
static const char *
tls_version_name(int v, char *buf, size_t buflen)
{
	switch (v) {
	case 0:
		return "unknown";
	case SSL3_VERSION:
		return "SSLv3";
	case TLS1_VERSION:
		return "TLSv1";
	case TLS1_1_VERSION:
		return "TLSv1.1";
	case TLS1_2_VERSION:
		return "TLSv1.2";
	case TLS1_3_VERSION:
		return "TLSv1.3";
	default:
		snprintf(buf, buflen, "0x%04x", (unsigned)v);
		return buf;
	}
}

enum stats_tls_failure
tls_client_failure(SSL *ssl, unsigned long ossl_err, char *detail,
    size_t detaillen, char *offered, size_t offeredlen)
{
	const struct tls_peek *pk = ssl == NULL || tls_peek_idx < 0 ? NULL :
	    SSL_get_ex_data(ssl, tls_peek_idx);
	enum stats_tls_failure r;
	char num[16];

	if (ossl_err == 0)
		ossl_err = ERR_peek_last_error();
	r = tls_failure_class(ossl_err, pk != NULL ? pk->hdr : NULL,
	    pk != NULL ? pk->len : 0);
	tls_err_string(detail, detaillen, ossl_err);
	snprintf(offered, offeredlen, "%s", tls_version_name(
	    pk != NULL ? pk->offered : 0, num, sizeof(num)));
	ERR_clear_error();
	return r;
}

/* ------------------------------------------------------ certificate expiry */

const char *const tls_side_names[TLS_SIDE_COUNT] = { "client", "upstream" };

/*
 * The certificates in use: the client-facing one and, per server, the one
 * its last handshake showed.  A handful: a small table searched linearly
 * (like the resumption table).  An entry outlives a server removed by a
 * reload (/metrics shows only the configured ones): once the table is
 * full, a server a reload added has no expiry metric.
 */
#define TLS_CERT_MAX (CONFIG_MAX_SERVERS + 1)	/* and the client side */

struct tls_cert {
	enum tls_side side;
	char server[300];	/* "host:port"; "" for the client side */
	int64_t not_after;
	unsigned warned;	/* the last stage warned (tls_expiry_stage) */
};

static struct tls_cert tls_certs[TLS_CERT_MAX];
static size_t tls_ncerts;

unsigned
tls_expiry_stage(int64_t not_after, int64_t now)
{
	int64_t left = not_after - now;

	if (left <= (int64_t)TLS_EXPIRY_URGENT_DAYS * 86400)
		return TLS_EXPIRY_URGENT_DAYS;
	if (left <= (int64_t)TLS_EXPIRY_WARN_DAYS * 86400)
		return TLS_EXPIRY_WARN_DAYS;
	return 0;
}

/* Log the warning due for c at now, once per stage. */
static void
tls_cert_warn(struct tls_cert *c, int64_t now)
{
	unsigned stage = tls_expiry_stage(c->not_after, now);
	int64_t left = c->not_after - now;
	char when[32];

	/* Stages only shrink (30, then 7) while the certificate stays. */
	if (stage == 0 || (c->warned != 0 && stage >= c->warned))
		return;
	c->warned = stage;
	/* Whole days left, rounded down (negative once expired). */
	log_warn("tls_certificate_expiring", "side=%s server=%s days_left=%lld "
	    "not_after=%s", tls_side_names[c->side], log_v(c->server),
	    (long long)(left >= 0 ? left / 86400 : -((-left + 86399) / 86400)),
	    tls_time_str(c->not_after, when, sizeof(when)));
}

static struct tls_cert *
tls_cert_slot(enum tls_side side, const char *server)
{
	size_t i;

	for (i = 0; i < tls_ncerts; i++)
		if (tls_certs[i].side == side &&
		    strcmp(tls_certs[i].server, server) == 0)
			return &tls_certs[i];
	return NULL;
}

static void
tls_cert_note(enum tls_side side, const char *server, const X509 *x,
    int64_t now)
{
	struct tls_cert *c = tls_cert_slot(side, server);
	int64_t na = tls_not_after(x);

	if (na == 0)
		return;
	if (c == NULL) {
		if (tls_ncerts == TLS_CERT_MAX ||
		    strlen(server) >= sizeof(c->server))
			return;
		c = &tls_certs[tls_ncerts++];
		c->side = side;
		snprintf(c->server, sizeof(c->server), "%s", server);
	}
	if (c->not_after != na) {
		/* Another certificate (renewed): its own warnings. */
		c->not_after = na;
		c->warned = 0;
	}
	tls_cert_warn(c, now);
}

void
tls_cert_in_use(SSL_CTX *ctx, int64_t now)
{
	if (ctx != NULL)
		tls_cert_note(TLS_SIDE_CLIENT, "", SSL_CTX_get0_certificate(ctx),
		    now);
}

void
tls_cert_seen(SSL *ssl, const char *server, int64_t now)
{
	if (ssl != NULL)
		tls_cert_note(TLS_SIDE_UPSTREAM, server,
		    SSL_get0_peer_certificate(ssl), now);
}

void
tls_cert_recheck(int64_t now)
{
	size_t i;

	for (i = 0; i < tls_ncerts; i++)
		tls_cert_warn(&tls_certs[i], now);
}

bool
tls_cert_expiry(enum tls_side side, const char *server, int64_t *not_after)
{
	const struct tls_cert *c = tls_cert_slot(side, server);

	if (c == NULL)
		return false;
	*not_after = c->not_after;
	return true;
}

int
tls_check_server_files(const char *cert_file, const char *key_file,
    int min_version, int64_t now, char *msg, size_t msglen)
{
	SSL_CTX *ctx = tls_server_ctx_new(cert_file, key_file, min_version, msg,
	    msglen);
	int64_t na;
	char when[32];

	if (ctx == NULL)
		return -1;
	na = tls_not_after(SSL_CTX_get0_certificate(ctx));
	SSL_CTX_free(ctx);
	if (tls_expiry_stage(na, now) == 0)
		return 0;
	snprintf(msg, msglen, "certificate %s expires in %lld days (%s)",
	    cert_file, (long long)((na - now) / 86400),
	    tls_time_str(na, when, sizeof(when)));
	return 1;
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
	OPENSSL_cleanse(tls_tkeys, sizeof(tls_tkeys));
}
