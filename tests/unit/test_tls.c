/*
 * test_tls.c - upstream TLS session resumption.
 *
 * Handshakes run in memory (a BIO pair) between tls.c's client context and
 * its server context loaded with a throw-away certificate.  A second
 * connection to the same server resumes the first one's session; a session
 * that a connection of an older context received (after a reload that may
 * have changed tls_ca_file) is never offered by a newer context.
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
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <unistd.h>

#include "tls.h"

#define RESUME_KEY "cas1.example.com:993"

static char cert_path[64], key_path[64], dir_path[32];
static SSL_CTX *server_ctx;

/* A self-signed P-256 certificate for "localhost", written as PEM. */
static int
setup(void **state)
{
	EVP_PKEY *pk = EVP_EC_gen("P-256");
	X509 *x = X509_new();
	X509_NAME *name;
	FILE *f;
	char err[256];

	(void)state;
	assert_non_null(pk);
	assert_non_null(x);
	snprintf(dir_path, sizeof(dir_path), "/tmp/test_tls.XXXXXX");
	assert_non_null(mkdtemp(dir_path));
	snprintf(cert_path, sizeof(cert_path), "%s/cert.pem", dir_path);
	snprintf(key_path, sizeof(key_path), "%s/key.pem", dir_path);
	X509_set_version(x, 2);
	ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
	X509_gmtime_adj(X509_getm_notBefore(x), -60);
	X509_gmtime_adj(X509_getm_notAfter(x), 3600);
	X509_set_pubkey(x, pk);
	name = X509_get_subject_name(x);
	X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
	    (const unsigned char *)"localhost", -1, -1, 0);
	X509_set_issuer_name(x, name);
	assert_true(X509_sign(x, pk, EVP_sha256()) > 0);
	assert_non_null(f = fopen(cert_path, "w"));
	assert_int_equal(PEM_write_X509(f, x), 1);
	fclose(f);
	assert_non_null(f = fopen(key_path, "w"));
	assert_int_equal(PEM_write_PrivateKey(f, pk, NULL, NULL, 0, NULL, NULL), 1);
	fclose(f);
	X509_free(x);
	EVP_PKEY_free(pk);
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

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_second_connection_resumes),
		cmocka_unit_test(test_old_context_session_not_offered),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
