/*
 * ctl.c - imapshim-ctl, the operator's console client.
 *
 *     imapshim-ctl [-s SOCKET | -c INI] COMMAND [ARGS...]
 *
 * Sends one command line to imapshim's control_socket (console.h has the
 * protocol), prints the answer's data lines and the text of its OK on
 * stdout, an ERROR or REFUSED on stderr.  Exit status: 0 OK; 1 the daemon
 * answered ERROR (an unknown client, a rejected reload: systemd's
 * ExecReload relies on it); 2 usage, cannot connect, refused, or no
 * complete answer.  Needs nothing but libc.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "config.h"
#include "console.h"

/* How long to wait for an answer (a reload reads files, no more). */
#define CTL_TIMEOUT_MS 60000

enum { CTL_OK = 0, CTL_ERROR = 1, CTL_FAIL = 2 };

static void
ctl_usage(FILE *f)
{
	fprintf(f,
	    "usage: imapshim-ctl [-s SOCKET | -c INI] COMMAND [ARGS...]\n"
	    "\n"
	    "  -s SOCKET  the daemon's control_socket (default %s)\n"
	    "  -c INI     read control_socket from this imapshim.ini\n"
	    "\n"
	    "commands: show pools | show servers | show clients | show stats |\n"
	    "          show status | kick client ID | kick mailbox NAME |\n"
	    "          drain server HOST:PORT | enable server HOST:PORT |\n"
	    "          pause | resume | reload | help\n"
	    "exit status: 0 OK, 1 the daemon answered an error, 2 cannot talk "
	    "to it\n", CONFIG_CONTROL_SOCKET);
}

/* Trim blanks at both ends, in place. */
static char *
ctl_trim(char *s)
{
	char *e;

	while (*s == ' ' || *s == '\t')
		s++;
	e = s + strlen(s);
	while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' ||
	    e[-1] == '\r'))
		*--e = '\0';
	return s;
}

/*
 * control_socket from [shim] of an imapshim.ini, as the daemon reads it
 * (a " ;" starts a comment; an empty value disables the console).  Returns
 * 0 with the path (the default if the key is absent) in buf, or -1.
 */
static int
ctl_ini_socket(const char *ini, char *buf, size_t len)
{
	char line[1024], *k, *v, *c;
	bool shim = false;
	FILE *f;

	if ((f = fopen(ini, "re")) == NULL) {
		fprintf(stderr, "imapshim-ctl: %s: %s\n", ini, strerror(errno));
		return -1;
	}
	snprintf(buf, len, "%s", CONFIG_CONTROL_SOCKET);
	while (fgets(line, sizeof(line), f) != NULL) {
		k = ctl_trim(line);
		if (*k == '[') {
			shim = strncmp(k, "[shim]", 6) == 0;
			continue;
		}
		if (!shim || (v = strchr(k, '=')) == NULL)
			continue;
		*v++ = '\0';
		if (strcmp(ctl_trim(k), "control_socket") != 0)
			continue;
		if ((c = strstr(v, " ;")) != NULL || (c = strstr(v, "\t;")) != NULL)
			*c = '\0';
		snprintf(buf, len, "%s", ctl_trim(v));
	}
	fclose(f);
	if (buf[0] == '\0') {
		fprintf(stderr, "imapshim-ctl: %s: control_socket is empty (the "
		    "console is disabled)\n", ini);
		return -1;
	}
	return 0;
}

/* One terminator or data line of the answer: returns the exit status once
 * the answer is complete, or -1 for a data line. */
static int
ctl_line(const char *line)
{
	static const struct {
		const char *word;
		int status;
	} ends[] = { { "OK", CTL_OK }, { "ERROR", CTL_ERROR },
	    { "REFUSED", CTL_FAIL } };
	size_t i, n;

	for (i = 0; i < sizeof(ends) / sizeof(ends[0]); i++) {
		n = strlen(ends[i].word);
		if (strncmp(line, ends[i].word, n) != 0 ||
		    (line[n] != '\0' && line[n] != ' '))
			continue;
		line += n + (line[n] == ' ');
		if (ends[i].status == CTL_OK) {
			if (*line != '\0')
				printf("%s\n", line);
		} else
			fprintf(stderr, "imapshim-ctl: %s%s\n",
			    ends[i].status == CTL_FAIL ? "refused: " : "", line);
		return ends[i].status;
	}
	printf("%s\n", line);
	return -1;
}

/* Read the answer; lines are split here so any length of data passes. */
static int
ctl_answer(int fd, const char *path)
{
	static char buf[65536];
	struct pollfd pfd = { fd, POLLIN, 0 };
	size_t have = 0, i, start;
	ssize_t n;
	int rc;

	for (;;) {
		rc = poll(&pfd, 1, CTL_TIMEOUT_MS);
		if (rc == 0) {
			fprintf(stderr, "imapshim-ctl: no answer from %s within "
			    "%d s\n", path, CTL_TIMEOUT_MS / 1000);
			return CTL_FAIL;
		}
		if (rc < 0 && errno == EINTR)
			continue;
		n = rc < 0 ? -1 : read(fd, buf + have, sizeof(buf) - 1 - have);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			fprintf(stderr, "imapshim-ctl: %s closed the connection "
			    "without an answer%s%s\n", path, n < 0 ? ": " : "",
			    n < 0 ? strerror(errno) : "");
			return CTL_FAIL;
		}
		have += (size_t)n;
		for (start = 0, i = 0; i < have; i++) {
			if (buf[i] != '\n')
				continue;
			buf[i] = '\0';
			if ((rc = ctl_line(buf + start)) >= 0)
				return rc;
			start = i + 1;
		}
		if (start == 0 && have == sizeof(buf) - 1) {
			/* A data line longer than the buffer: pass it on. */
			buf[have] = '\0';
			fputs(buf, stdout);
			have = 0;
			continue;
		}
		memmove(buf, buf + start, have - start);
		have -= start;
	}
}

int
main(int argc, char **argv)
{
	const char *path = CONFIG_CONTROL_SOCKET, *ini = NULL;
	char inipath[sizeof(((struct sockaddr_un *)NULL)->sun_path)];
	char line[CONSOLE_LINE_MAX + 2];
	struct sockaddr_un sun;
	size_t len = 0, n;
	int ch, fd, i, rc;

	while ((ch = getopt(argc, argv, "+s:c:h")) != -1) {
		switch (ch) {
		case 's':
			path = optarg;
			break;
		case 'c':
			ini = optarg;
			break;
		case 'h':
			ctl_usage(stdout);
			return CTL_OK;
		default:
			ctl_usage(stderr);
			return CTL_FAIL;
		}
	}
	if (optind >= argc) {
		ctl_usage(stderr);
		return CTL_FAIL;
	}
	if (ini != NULL) {
		if (ctl_ini_socket(ini, inipath, sizeof(inipath)) != 0)
			return CTL_FAIL;
		path = inipath;
	}
	for (i = optind; i < argc; i++) {
		n = strlen(argv[i]);
		if (len + n + 1 > CONSOLE_LINE_MAX || strchr(argv[i], '\n')) {
			fprintf(stderr, "imapshim-ctl: command too long or "
			    "holding a line break\n");
			return CTL_FAIL;
		}
		if (len > 0)
			line[len++] = ' ';
		memcpy(line + len, argv[i], n);
		len += n;
	}
	line[len++] = '\n';

	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(sun.sun_path)) {
		fprintf(stderr, "imapshim-ctl: socket path too long: %s\n", path);
		return CTL_FAIL;
	}
	memcpy(sun.sun_path, path, strlen(path));
	signal(SIGPIPE, SIG_IGN);
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0 ||
	    connect(fd, (struct sockaddr *)&sun, sizeof(sun)) != 0) {
		fprintf(stderr, "imapshim-ctl: cannot connect to %s: %s (is "
		    "imapshim running, with this control_socket?)\n", path,
		    strerror(errno));
		return CTL_FAIL;
	}
	/* A refused peer may find the socket closed before it writes: the
	 * refusal is still there to read. */
	(void)!write(fd, line, len);
	rc = ctl_answer(fd, path);
	close(fd);
	if (fflush(stdout) != 0 && rc == CTL_OK)
		rc = CTL_FAIL;
	return rc;
}
