/* protolog.c - Exchange-style CSV protocol log. */
#include "protolog.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

/* Exchange truncates parameters to 2048 characters; so do we. */
#define PROTOLOG_PARAMS_MAX 2048
#define PROTOLOG_LINE_MAX 8192

static int pl_fd = -1;
static char *pl_path;

static const char pl_fields[] =
    "#Fields: dateTime,sessionId,seqNumber,sIp,cIp,user,duration,rqsize,"
    "rpsize,command,parameters,context\n";

static int
pl_open_fd(const char *path)
{
	int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
	struct stat st;
	char hdr[512];
	int n;

	if (fd < 0)
		return -1;
	/* A new file starts with Exchange's header lines, so log tools
	 * that read Exchange's logs read this one too. */
	if (fstat(fd, &st) == 0 && st.st_size == 0) {
		n = snprintf(hdr, sizeof(hdr), "#Software: imapshim %s\n"
		    "#Version: 15.00.0000.000\n#Log-type: IMAP4 Protocol Log\n%s",
		    PACKAGE_VERSION, pl_fields);
		if (n > 0 && write(fd, hdr, (size_t)n) < 0) {
			close(fd);
			return -1;
		}
	}
	return fd;
}

int
protolog_open(const char *path, char *err, size_t errlen)
{
	protolog_close();
	if (path == NULL || *path == '\0')
		return 0;
	pl_fd = pl_open_fd(path);
	if (pl_fd < 0) {
		snprintf(err, errlen, "cannot open protocol_log %s: %s", path,
		    strerror(errno));
		return -1;
	}
	pl_path = xstrdup(path);
	return 0;
}

int
protolog_reopen(void)
{
	int fd;

	if (pl_path == NULL)
		return 0;
	if ((fd = pl_open_fd(pl_path)) < 0)
		return -1;
	close(pl_fd);
	pl_fd = fd;
	return 0;
}

void
protolog_close(void)
{
	if (pl_fd >= 0)
		close(pl_fd);
	pl_fd = -1;
	free(pl_path);
	pl_path = NULL;
}

bool
protolog_enabled(void)
{
	return pl_fd >= 0;
}

/* Append s as one CSV field: quoted (with "" for ") when it holds a
 * comma, a quote or a line break.  Returns the new length. */
static size_t
pl_field(char *buf, size_t len, size_t cap, const char *s, size_t max)
{
	size_t i, n = strlen(s);
	bool quote = strpbrk(s, ",\"\r\n") != NULL;

	if (n > max)
		n = max;
	if (quote && len < cap)
		buf[len++] = '"';
	for (i = 0; i < n && len + 2 < cap; i++) {
		char ch = s[i] == '\r' || s[i] == '\n' ? ' ' : s[i];

		if (ch == '"')
			buf[len++] = '"';
		buf[len++] = ch;
	}
	if (quote && len < cap)
		buf[len++] = '"';
	return len;
}

void
protolog_write(const struct protolog_rec *r)
{
	char buf[PROTOLOG_LINE_MAX];
	struct timeval tv;
	struct tm tm;
	size_t len;
	int n;

	if (pl_fd < 0)
		return;
	gettimeofday(&tv, NULL);
	gmtime_r(&tv.tv_sec, &tm);
	n = snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ,"
	    "%016llX,%u,%s,%s,", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
	    tm.tm_hour, tm.tm_min, tm.tm_sec, (long)tv.tv_usec / 1000,
	    (unsigned long long)r->session_id, r->seq, r->sip, r->cip);
	if (n < 0)
		return;
	len = (size_t)n;
	/* Fields are cut to leave room for the separators and newline. */
	len = pl_field(buf, len, sizeof(buf) - 16, r->user, 512);
	n = snprintf(buf + len, sizeof(buf) - len, ",%llu,%llu,%llu,",
	    (unsigned long long)r->duration_ms, (unsigned long long)r->rqsize,
	    (unsigned long long)r->rpsize);
	if (n < 0 || (size_t)n >= sizeof(buf) - len)
		return;
	len += (size_t)n;
	len = pl_field(buf, len, sizeof(buf) - 16, r->command, 64);
	buf[len++] = ',';
	len = pl_field(buf, len, sizeof(buf) - 16, r->params, PROTOLOG_PARAMS_MAX);
	buf[len++] = ',';
	len = pl_field(buf, len, sizeof(buf) - 16, r->context, 2048);
	buf[len++] = '\n';
	/* One write per line: lines from one process never interleave. */
	if (write(pl_fd, buf, len) < 0)
		return;
}
