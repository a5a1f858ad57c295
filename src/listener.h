/*
 * listener.h - the client-facing sockets.
 *
 * Owns the evconnlisteners for `listen` (implicit TLS) and
 * `listen_starttls` (cleartext + STARTTLS) and the accept policy: the
 * allow_from list and max_clients.  Accepted sockets are handed to
 * client_new(); refused ones are closed at once, logged and counted.
 */
#ifndef LISTENER_H
#define LISTENER_H

#include <stddef.h>
#include <stdint.h>

struct event_base;
struct config;

/* Bind every configured listener.  Returns 0, or -1 with a reason in err. */
int listener_start(struct event_base *base, const struct config *cfg,
    char *err, size_t errlen);
/* New settings (reload): the allow-list and limits; addresses stay bound. */
void listener_set_config(const struct config *cfg);
/* Stop accepting (drain) and free the listeners. */
void listener_stop(void);

/* Connections refused at accept since start. */
uint64_t listener_refused(void);

#endif
