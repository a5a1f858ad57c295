/*
 * config.h - the ini file: keys, defaults, validation.
 *
 * Owns struct config and everything in it.  config_load() parses a file
 * (with Debian's libinih) into a fresh struct config; nothing else writes
 * one.  A reload (SIGHUP) loads a new struct and swaps it in only when it
 * loaded without errors.  Never touches libevent or sockets.
 *
 * Durations are kept in milliseconds; in the file they take ms, s, m or h
 * (a bare number means seconds).  Sizes are plain bytes (k, M, G suffixes
 * accepted).  Every error names file:line and the [section] key.
 */
#ifndef CONFIG_H
#define CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "addr.h"
#include "log.h"

/* control_socket's default, also imapshim-ctl's. */
#define CONFIG_CONTROL_SOCKET "/run/imapshim/control"

/* The most servers and [admin] sections a file may name: the pool and
 * retry.c keep a request's servers and accounts as 64-bit sets, and the
 * load refuses more. */
#define CONFIG_MAX_SERVERS 64
#define CONFIG_MAX_ADMINS 64

enum config_tls_mode { CFG_TLS_IMPLICIT, CFG_TLS_STARTTLS, CFG_TLS_NONE };
enum config_pool_mode { CFG_POOL_MULTIPLEX, CFG_POOL_SESSION };

struct config_admin {
	char *name;		/* as written in [admin NAME] */
	char *password;		/* from password or password_file; never logged */
	char *password_file;	/* NULL when the password was inline */
	unsigned max_sessions;	/* default 16 */
	int line;		/* line of the [admin NAME] header */
};

struct config {
	char *path;

	/* [shim] */
	bool has_listen;			/* listen = (empty disables) */
	struct addr_endpoint listen;		/* default 0.0.0.0:993 */
	bool has_listen_starttls;
	struct addr_endpoint listen_starttls;	/* default: none */
	char *tls_cert_file;
	char *tls_key_file;
	int tls_min_version;			/* TLS1_2_VERSION or TLS1_3_VERSION */
	struct addr_cidr *allow_from;		/* default 127.0.0.0/8 */
	size_t n_allow_from;
	bool allow_plaintext_login;		/* default no */
	char *client_login_format;		/* default {domain}/{admin}/{mailbox} */
	unsigned max_clients;			/* default 20000 */
	unsigned max_unauth_per_ip;		/* default 256 */
	uint64_t max_command_bytes;		/* default 10240 */
	uint64_t max_literal_bytes;		/* default 52428800 */
	uint64_t client_login_timeout_ms;	/* default 60s */
	uint64_t client_idle_timeout_ms;	/* default 30m */
	bool has_status_listen;
	struct addr_endpoint status_listen;	/* default 127.0.0.1:9143 */
	uint64_t drain_timeout_ms;		/* default 30s */
	char *protocol_log;			/* NULL: off */
	char *control_socket;			/* NULL: no console */
	char *user;				/* NULL: no privilege drop */
	enum log_level log_level;		/* default info */
	char *log_target;			/* default "stderr" */

	/* [upstream] */
	struct addr_endpoint *servers;		/* in order; at least one */
	size_t n_servers;
	enum config_tls_mode up_tls;		/* default implicit */
	bool tls_verify;			/* default yes */
	char *tls_ca_file;			/* default /etc/ssl/certs/ca-certificates.crt */
	char *tls_server_name;			/* NULL: each server's host */
	char *domain;				/* default NULL: the client's {domain} */
	char *login_format;			/* default {domain}/{admin}/{mailbox} */
	uint64_t connect_timeout_ms;		/* default 10s */
	uint64_t login_timeout_ms;		/* default 20s */
	uint64_t command_timeout_ms;		/* default 120s */

	/* [pool] */
	enum config_pool_mode pool_mode;	/* default multiplex */
	unsigned session_budget;		/* default 2048 */
	uint64_t queue_timeout_ms;		/* default 30s */
	uint64_t park_after_ms;			/* default 10s */
	uint64_t reuse_timeout_ms;		/* default 5m, must be < 25m */
	uint64_t idle_poll_interval_ms;		/* default 30s */
	uint64_t idle_refresh_ms;		/* default 25m */
	unsigned login_rate;			/* default 20 per second */
	unsigned login_burst;			/* default 40 */
	unsigned max_logins_in_flight;		/* default 32, per server */

	/* [retry] */
	unsigned login_attempts;		/* default 3 */
	uint64_t backoff_initial_ms;		/* default 250ms */
	uint64_t backoff_max_ms;		/* default 8s */
	unsigned server_fail_threshold;		/* default 5 */
	uint64_t server_cooldown_ms;		/* default 30s */
	uint64_t admin_cooldown_ms;		/* default 5m */
	uint64_t negative_cache_ttl_ms;		/* default 60s */
	char **transient_login_patterns;	/* default list of DESIGN.md 3.7 */
	size_t n_transient_login_patterns;

	/* [admin NAME] sections, in file order; at least one */
	struct config_admin *admins;
	size_t n_admins;
};

/* Errors and warnings of one load, each line "file:line: [sect] key: what". */
struct config_diag {
	char errors[8192];
	char warnings[4096];
	unsigned n_errors;
	unsigned n_warnings;
};

/*
 * Load and validate path.  Returns a new config, or NULL with at least one
 * error in diag.  Warnings (tls_verify = no, an inline password holding ';')
 * are reported in diag even on success.  check_files: also check that
 * certificate, key, CA and password files exist and are readable, and that
 * path and password files are not readable by group or others.
 */
struct config *config_load(const char *path, bool check_files,
    struct config_diag *diag);
void config_free(struct config *cfg);

/* Index of ep in cfg->servers, or (size_t)-1 when it is not listed. */
size_t config_find_server(const struct config *cfg,
    const struct addr_endpoint *ep);

/* Find an admin by name, ASCII case-insensitive.  NULL when unknown. */
const struct config_admin *config_find_admin(const struct config *cfg,
    const char *name, size_t len);

/* Parsers shared with tests: return 0, or -1 on a bad value. */
int config_parse_duration(const char *s, uint64_t *ms_r);
int config_parse_size(const char *s, uint64_t *bytes_r);
int config_parse_bool(const char *s, bool *b_r);

#endif
