/*
 * test_tls.c - upstream TLS session resumption, client handshake failure
 * reasons, certificate expiry.
 *
 * Handshakes run in memory (a BIO pair) between tls.c's client context and
 * its server context loaded with a throw-away certificate.  A second
 * connection to the same server resumes the first one's session; a session
 * that a connection of an older context received (after a reload that may
 * have changed tls_ca_file) is never offered by a newer context.  On the
 * server side, a client's ticket (TLS 1.2 and 1.3) opens after one
 * rotation of the ticket key ring, not after two, and under a reload's
 * new server context.
 *
 * A client's failed handshake gets one class from OpenSSL's reason code
 * (or plaintext from its first bytes) and the version it offered; a
 * certificate's expiry is due for a warning at 30 and 7 days; the server
 * context refuses an expired certificate and a key of another
 * certificate, and imapshim -t's check warns for one that expires soon.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <time.h>
#include <unistd.h>

#include "tls.h"

#define RESUME_KEY "cas1.example.com:993"

static char cert_path[64], key_path[64], dir_path[32];
static SSL_CTX *server_ctx;

/* In dir_path: a self-signed P-256 certificate for "localhost" valid from
 * a minute ago for valid_s seconds more (negative: expired), as PEM in
 * <name>.pem and its key in <name>.key.  The paths go to cert and key. */
static void
make_cert(const char *name, long valid_s, char *cert, char *key, size_t len)
{
	EVP_PKEY *pk = EVP_EC_gen("P-256");
	X509 *x = X509_new();
	X509_NAME *subj;
	FILE *f;

	assert_non_null(pk);
	assert_non_null(x);
	snprintf(cert, len, "%s/%s.pem", dir_path, name);
	snprintf(key, len, "%s/%s.key", dir_path, name);
	X509_set_version(x, 2);
	ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
	X509_gmtime_adj(X509_getm_notBefore(x), valid_s < 0 ? valid_s - 60 : -60);
	X509_gmtime_adj(X509_getm_notAfter(x), valid_s);
	X509_set_pubkey(x, pk);
	subj = X509_get_subject_name(x);
	X509_NAME_add_entry_by_txt(subj, "CN", MBSTRING_ASC,
	    (const unsigned char *)"localhost", -1, -1, 0);
	X509_set_issuer_name(x, subj);
	assert_true(X509_sign(x, pk, EVP_sha256()) > 0);
	assert_non_null(f = fopen(cert, "w"));
	assert_int_equal(PEM_write_X509(f, x), 1);
	fclose(f);
	assert_non_null(f = fopen(key, "w"));
	assert_int_equal(PEM_write_PrivateKey(f, pk, NULL, NULL, 0, NULL, NULL), 1);
	fclose(f);
	X509_free(x);
	EVP_PKEY_free(pk);
}

static int
setup(void **state)
{
	char err[256];

	(void)state;
	snprintf(dir_path, sizeof(dir_path), "/tmp/test_tls.XXXXXX");
	assert_non_null(mkdtemp(dir_path));
	make_cert("cert", 3600, cert_path, key_path, sizeof(cert_path));
	server_ctx = tls_server_ctx_new(cert_path, key_path, TLS1_2_VERSION,
	    err, sizeof(err));
	assert_non_null(server_ctx);
	return 0;
}

static int
teardown(void **state)
{
	(void)state;
	tls_ctx_free(server_ctx);
	tls_shutdown();
	unlink(cert_path);
	unlink(key_path);
	rmdir(dir_path);
	return 0;
}

/* An OpenSSL error code of the SSL library (a constant expression). */
#define SSL_ERR(reason) ERR_PACK(ERR_LIB_SSL, 0, (reason))

static void
test_failure_class_by_reason(void **state)
{
	static const unsigned char tls_hdr[5] = { 0x16, 0x03, 0x01, 0x00, 0x80 };
	static const struct {
		unsigned long err;
		bool hdr;		/* the peer sent a TLS record header */
		enum stats_tls_failure want;
	} cases[] = {
		{ SSL_ERR(SSL_R_UNSUPPORTED_PROTOCOL), true,
		  STATS_TLS_FAIL_PROTOCOL_VERSION },
		{ SSL_ERR(SSL_R_VERSION_TOO_LOW), false,
		  STATS_TLS_FAIL_PROTOCOL_VERSION },
		{ SSL_ERR(SSL_R_TLSV1_ALERT_PROTOCOL_VERSION), true,
		  STATS_TLS_FAIL_PROTOCOL_VERSION },
		{ SSL_ERR(SSL_R_NO_SHARED_CIPHER), true,
		  STATS_TLS_FAIL_NO_SHARED_CIPHER },
		{ SSL_ERR(SSL_R_NO_SHARED_GROUPS), true,
		  STATS_TLS_FAIL_NO_SHARED_CIPHER },
		{ SSL_ERR(SSL_R_TLSV1_ALERT_UNKNOWN_CA), true,
		  STATS_TLS_FAIL_CERTIFICATE },
		{ SSL_ERR(SSL_R_SSLV3_ALERT_BAD_CERTIFICATE), true,
		  STATS_TLS_FAIL_CERTIFICATE },
		{ SSL_ERR(SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED), true,
		  STATS_TLS_FAIL_CERTIFICATE },
		{ SSL_ERR(SSL_R_HTTP_REQUEST), false, STATS_TLS_FAIL_PLAINTEXT },
		/* A handshake record that is not what OpenSSL expects: not
		 * text. */
		{ SSL_ERR(SSL_R_WRONG_VERSION_NUMBER), true,
		  STATS_TLS_FAIL_OTHER },
		{ SSL_ERR(SSL_R_SSLV3_ALERT_HANDSHAKE_FAILURE), true,
		  STATS_TLS_FAIL_OTHER },
		{ 0, false, STATS_TLS_FAIL_OTHER },
		{ ERR_PACK(ERR_LIB_SYS, 0, 104), false, STATS_TLS_FAIL_OTHER },
		/* Same reason code, another library: not an SSL reason. */
		{ ERR_PACK(ERR_LIB_X509, 0, SSL_R_NO_SHARED_CIPHER), false,
		  STATS_TLS_FAIL_OTHER },
	};
	size_t i;

	(void)state;
	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		assert_int_equal(tls_failure_class(cases[i].err,
		    cases[i].hdr ? tls_hdr : NULL, cases[i].hdr ? 5 : 0),
		    cases[i].want);
}

static void
test_failure_class_plaintext(void **state)
{
	static const unsigned char binary[5] = { 0x80, 0x2e, 0x01, 0x03, 0x01 };

	(void)state;
	/* IMAP or HTTP text first: plaintext whatever OpenSSL made of it. */
	assert_int_equal(tls_failure_class(SSL_ERR(SSL_R_WRONG_VERSION_NUMBER),
	    (const unsigned char *)"a1 LO", 5), STATS_TLS_FAIL_PLAINTEXT);
	assert_int_equal(tls_failure_class(SSL_ERR(SSL_R_HTTP_REQUEST),
	    (const unsigned char *)"GET /", 5), STATS_TLS_FAIL_PLAINTEXT);
	assert_int_equal(tls_failure_class(0,
	    (const unsigned char *)"* OK", 4), STATS_TLS_FAIL_PLAINTEXT);
	assert_int_equal(tls_failure_class(SSL_ERR(SSL_R_WRONG_VERSION_NUMBER),
	    binary, 5), STATS_TLS_FAIL_OTHER);
}

/* A server SSL of server_ctx whose peer is a raw BIO the test writes. */
static SSL *
server_with_peer(BIO **peer)
{
	SSL *s = tls_server_ssl_new(server_ctx);
	BIO *bs;

	assert_non_null(s);
	assert_int_equal(BIO_new_bio_pair(peer, 0, &bs, 0), 1);
	SSL_set_bio(s, bs, bs);
	SSL_set_accept_state(s);
	return s;
}

static void
test_client_failure_plaintext(void **state)
{
	static const char line[] = "a1 LOGIN user secret\r\n";
	char detail[256], offered[16];
	BIO *peer;
	SSL *s = server_with_peer(&peer);

	(void)state;
	assert_int_equal(BIO_write(peer, line, (int)strlen(line)),
	    (int)strlen(line));
	assert_int_equal(SSL_do_handshake(s), -1);
	assert_int_equal(tls_client_failure(s, 0, detail, sizeof(detail),
	    offered, sizeof(offered)), STATS_TLS_FAIL_PLAINTEXT);
	assert_non_null(strstr(detail, "wrong version number"));
	assert_string_equal(offered, "unknown");
	SSL_free(s);
	BIO_free(peer);
}

/* A client of version v only against server_ctx (TLS 1.2+): refused for
 * the version, and the version the ClientHello offered is reported. */
static void
test_client_failure_protocol_version(void **state)
{
	SSL_CTX *cctx = SSL_CTX_new(TLS_client_method());
	char detail[256], offered[16];
	BIO *bc, *bs;
	SSL *c, *s;
	int i, rs = 0;

	(void)state;
	assert_non_null(cctx);
	SSL_CTX_set_security_level(cctx, 0);
	assert_int_equal(SSL_CTX_set_cipher_list(cctx, "DEFAULT:@SECLEVEL=0"), 1);
	SSL_CTX_set_min_proto_version(cctx, TLS1_VERSION);
	SSL_CTX_set_max_proto_version(cctx, TLS1_VERSION);
	c = SSL_new(cctx);
	s = tls_server_ssl_new(server_ctx);
	assert_non_null(c);
	assert_non_null(s);
	assert_int_equal(BIO_new_bio_pair(&bc, 0, &bs, 0), 1);
	SSL_set_bio(c, bc, bc);
	SSL_set_bio(s, bs, bs);
	SSL_set_connect_state(c);
	SSL_set_accept_state(s);
	for (i = 0; i < 4 && rs != -1; i++) {
		(void)SSL_do_handshake(c);
		rs = SSL_do_handshake(s);
		if (rs == -1 && SSL_get_error(s, rs) == SSL_ERROR_WANT_READ)
			rs = 0;
	}
	assert_int_equal(rs, -1);
	assert_int_equal(tls_client_failure(s, 0, detail, sizeof(detail),
	    offered, sizeof(offered)), STATS_TLS_FAIL_PROTOCOL_VERSION);
	assert_string_equal(offered, "TLSv1");
	assert_non_null(strstr(detail, "unsupported protocol"));
	SSL_free(c);
	SSL_free(s);
	SSL_CTX_free(cctx);
}

static void
test_expiry_stage(void **state)
{
	const int64_t now = 1700000000, day = 86400;

	(void)state;
	assert_int_equal(tls_expiry_stage(now + 90 * day, now), 0);
	assert_int_equal(tls_expiry_stage(now + 30 * day + 1, now), 0);
	assert_int_equal(tls_expiry_stage(now + 30 * day, now), 30);
	assert_int_equal(tls_expiry_stage(now + 10 * day, now), 30);
	assert_int_equal(tls_expiry_stage(now + 7 * day + 1, now), 30);
	assert_int_equal(tls_expiry_stage(now + 7 * day, now), 7);
	assert_int_equal(tls_expiry_stage(now + 1, now), 7);
	assert_int_equal(tls_expiry_stage(now - day, now), 7);
}

static void
test_cert_expiry_recorded(void **state)
{
	int64_t now = (int64_t)time(NULL), na = 0;

	(void)state;
	assert_false(tls_cert_expiry(TLS_SIDE_UPSTREAM, "cas1:993", &na));
	tls_cert_in_use(server_ctx, now);
	assert_true(tls_cert_expiry(TLS_SIDE_CLIENT, "", &na));
	/* make_cert: valid for 3600 s from setup (whole seconds). */
	assert_true(na > now && na <= now + 3600);
	assert_false(tls_cert_expiry(TLS_SIDE_UPSTREAM, "", &na));
}

static void
test_server_files_checked(void **state)
{
	char soon_c[64], soon_k[64], old_c[64], old_k[64], msg[600];
	int64_t now = (int64_t)time(NULL);
	SSL_CTX *ctx;

	(void)state;
	make_cert("soon", 10 * 86400, soon_c, soon_k, sizeof(soon_c));
	make_cert("old", -86400, old_c, old_k, sizeof(old_c));
	assert_int_equal(tls_check_server_files(soon_c, soon_k, TLS1_2_VERSION,
	    now, msg, sizeof(msg)), 1);
	assert_non_null(strstr(msg, "expires in 10 days"));
	assert_int_equal(tls_check_server_files(soon_c, soon_k, TLS1_2_VERSION,
	    now - 90 * 86400, msg, sizeof(msg)), 0);
	/* Another certificate's key: both files named. */
	assert_int_equal(tls_check_server_files(soon_c, key_path, TLS1_2_VERSION,
	    now, msg, sizeof(msg)), -1);
	assert_non_null(strstr(msg, "does not match"));
	assert_non_null(strstr(msg, soon_c));
	assert_non_null(strstr(msg, key_path));
	ctx = tls_server_ctx_new(old_c, old_k, TLS1_2_VERSION, msg, sizeof(msg));
	assert_null(ctx);
	assert_non_null(strstr(msg, "has expired"));
	assert_int_equal(tls_check_server_files(old_c, old_k, TLS1_2_VERSION,
	    now, msg, sizeof(msg)), -1);
	unlink(soon_c);
	unlink(soon_k);
	unlink(old_c);
	unlink(old_k);
}

struct conn {
	SSL *client, *server;
};

/* A client SSL of cctx, for RESUME_KEY, wired to a server SSL. */
static void
conn_open(struct conn *c, SSL_CTX *cctx)
{
	BIO *bc, *bs;

	c->client = tls_client_ssl_new(cctx, "localhost", false, RESUME_KEY);
	c->server = tls_server_ssl_new(server_ctx);
	assert_non_null(c->client);
	assert_non_null(c->server);
	assert_int_equal(BIO_new_bio_pair(&bc, 0, &bs, 0), 1);
	SSL_set_bio(c->client, bc, bc);
	SSL_set_bio(c->server, bs, bs);
	SSL_set_connect_state(c->client);
	SSL_set_accept_state(c->server);
}

/* Run both ends until the handshake is over and the client has read the
 * server's session tickets.  Returns whether the session was resumed. */
static bool
conn_handshake(struct conn *c)
{
	int rc = 0, rs = 0, i;
	char buf[16];

	for (i = 0; i < 20 && (rc != 1 || rs != 1); i++) {
		if (rc != 1)
			rc = SSL_do_handshake(c->client);
		if (rs != 1)
			rs = SSL_do_handshake(c->server);
	}
	assert_int_equal(rc, 1);
	assert_int_equal(rs, 1);
	/* TLS 1.3 tickets follow the handshake: reading processes them. */
	assert_int_equal(SSL_read(c->client, buf, sizeof(buf)), -1);
	assert_int_equal(SSL_get_error(c->client, -1), SSL_ERROR_WANT_READ);
	return tls_handshake_done(c->client);
}

/* As imapshim closes: with close_notify (OpenSSL will not resume the
 * session of a connection freed without one). */
static void
conn_close(struct conn *c)
{
	tls_close_notify(c->client);
	SSL_free(c->client);
	SSL_free(c->server);
}

static void
test_second_connection_resumes(void **state)
{
	char err[256];
	SSL_CTX *cctx = tls_client_ctx_new(false, NULL, err, sizeof(err));
	struct conn a, b;

	(void)state;
	assert_non_null(cctx);
	conn_open(&a, cctx);
	assert_false(conn_handshake(&a));
	conn_close(&a);
	conn_open(&b, cctx);
	assert_true(conn_handshake(&b));
	conn_close(&b);
	tls_ctx_free(cctx);
}

static void
test_old_context_session_not_offered(void **state)
{
	char err[256];
	SSL_CTX *old = tls_client_ctx_new(false, NULL, err, sizeof(err)), *cur;
	struct conn a, b, c;

	(void)state;
	assert_non_null(old);
	/* A connection of the old context is under way at the reload... */
	conn_open(&a, old);
	cur = tls_client_ctx_new(false, NULL, err, sizeof(err));
	assert_non_null(cur);
	/* ...and gets its ticket afterwards. */
	assert_false(conn_handshake(&a));
	conn_open(&b, cur);
	assert_false(conn_handshake(&b));
	/* The new context's own session resumes. */
	conn_open(&c, cur);
	assert_true(conn_handshake(&c));
	conn_close(&a);
	conn_close(&b);
	conn_close(&c);
	tls_ctx_free(old);
	tls_ctx_free(cur);
}

/* A client's ticket still opens after one rotation of the key ring (and
 * is renewed), no longer after the key that sealed it was rotated out;
 * TLS 1.2 and 1.3 alike. */
static void
ticket_rotation(int max_version, int64_t start)
{
	char err[256];
	SSL_CTX *cctx = tls_client_ctx_new(false, NULL, err, sizeof(err));
	int64_t now = (int64_t)time(NULL) + start * TLS_TICKET_ROTATE_S;
	struct conn a, b, c;

	assert_non_null(cctx);
	SSL_CTX_set_max_proto_version(cctx, max_version);
	/* Whatever the ring holds (start is past every earlier test's
	 * clock), a key newer than the tickets below. */
	(void)tls_ticket_rotate(now);
	assert_false(tls_ticket_rotate(now + TLS_TICKET_ROTATE_S - 1));
	conn_open(&a, cctx);
	assert_false(conn_handshake(&a));
	assert_int_equal(SSL_version(a.client), max_version);
	conn_close(&a);
	assert_true(tls_ticket_rotate(now + TLS_TICKET_ROTATE_S));
	conn_open(&b, cctx);
	assert_true(conn_handshake(&b));	/* the previous key opens it */
	conn_close(&b);
	/* b's renewed ticket is sealed with the newest key: two more
	 * rotations forget it. */
	assert_true(tls_ticket_rotate(now + 2 * TLS_TICKET_ROTATE_S));
	assert_true(tls_ticket_rotate(now + 3 * TLS_TICKET_ROTATE_S));
	conn_open(&c, cctx);
	assert_false(conn_handshake(&c));
	conn_close(&c);
	tls_ctx_free(cctx);
}

static void
test_ticket_rotation(void **state)
{
	/* Each version on a clock of its own, past the one before. */
	static const struct {
		int max_version;
		int64_t start;		/* in rotation periods from now */
	} cases[] = {
		{ TLS1_3_VERSION, 10 },
		{ TLS1_2_VERSION, 20 },
	};
	size_t i;

	(void)state;
	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
		ticket_rotation(cases[i].max_version, cases[i].start);
}

/* A reload's new server context opens the tickets of the old one. */
static void
test_tickets_survive_reload(void **state)
{
	char err[256];
	SSL_CTX *cctx = tls_client_ctx_new(false, NULL, err, sizeof(err));
	SSL_CTX *old = server_ctx;
	struct conn a, b;

	(void)state;
	assert_non_null(cctx);
	conn_open(&a, cctx);
	assert_false(conn_handshake(&a));
	conn_close(&a);
	server_ctx = tls_server_ctx_new(cert_path, key_path, TLS1_2_VERSION,
	    err, sizeof(err));
	assert_non_null(server_ctx);
	conn_open(&b, cctx);
	assert_true(conn_handshake(&b));
	conn_close(&b);
	tls_ctx_free(server_ctx);
	server_ctx = old;
	tls_ctx_free(cctx);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_second_connection_resumes),
		cmocka_unit_test(test_old_context_session_not_offered),
		cmocka_unit_test(test_ticket_rotation),
		cmocka_unit_test(test_tickets_survive_reload),
		cmocka_unit_test(test_failure_class_by_reason),
		cmocka_unit_test(test_failure_class_plaintext),
		cmocka_unit_test(test_client_failure_plaintext),
		cmocka_unit_test(test_client_failure_protocol_version),
		cmocka_unit_test(test_expiry_stage),
		cmocka_unit_test(test_cert_expiry_recorded),
		cmocka_unit_test(test_server_files_checked),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
