/*
 * Client-matrix driver on libstrophe (Debian's libstrophe-dev), the library
 * behind Profanity. Same command line and JSON-lines output as
 * slixmpp_client.py; built by the test with
 *   gcc -O1 -o strophe_client strophe_client.c -lstrophe
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <strophe.h>

#define RECEIPTS "urn:xmpp:receipts"
#define DELAY "urn:xmpp:delay"
#define MAXQ 64

struct msg {
    char *from, *body, *delay;
};

struct state {
    xmpp_ctx_t *ctx;
    xmpp_conn_t *conn;
    int online, echoed, closed, failed;
    struct msg q[MAXQ];
    int qlen;
    char *receipts[MAXQ];
    int rlen;
};

static int port, direct_tls, repeat, wait_receipt;
static double timeout_s = 15;
static const char *jid, *password, *send_to, *send_body, *msg_id = "m1", *until;

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* Prints a JSON string (the values here are ASCII test data, but escape
 * what JSON requires anyway). */
static void json_str(const char *s)
{
    if (!s) {
        fputs("null", stdout);
        return;
    }
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

static int on_presence(xmpp_conn_t *conn, xmpp_stanza_t *st, void *ud)
{
    struct state *s = ud;
    const char *from = xmpp_stanza_get_from(st);
    const char *me = xmpp_conn_get_bound_jid(conn);
    if (!xmpp_stanza_get_type(st) && from && me && strcmp(from, me) == 0)
        s->echoed = 1;
    return 1;
}

static int on_message(xmpp_conn_t *conn, xmpp_stanza_t *st, void *ud)
{
    struct state *s = ud;
    xmpp_stanza_t *rec = xmpp_stanza_get_child_by_name_and_ns(st, "received", RECEIPTS);
    if (rec && s->rlen < MAXQ)
        s->receipts[s->rlen++] = dup_or_null(xmpp_stanza_get_attribute(rec, "id"));
    xmpp_stanza_t *b = xmpp_stanza_get_child_by_name(st, "body");
    if (!b)
        return 1;
    char *body = xmpp_stanza_get_text(b);
    const char *id = xmpp_stanza_get_id(st);
    const char *from = xmpp_stanza_get_from(st);
    if (id && from && xmpp_stanza_get_child_by_name_and_ns(st, "request", RECEIPTS)) {
        xmpp_stanza_t *r = xmpp_message_new(s->ctx, "chat", from, NULL);
        xmpp_stanza_t *rc = xmpp_stanza_new(s->ctx);
        xmpp_stanza_set_name(rc, "received");
        xmpp_stanza_set_ns(rc, RECEIPTS);
        xmpp_stanza_set_attribute(rc, "id", id);
        xmpp_stanza_add_child(r, rc);
        xmpp_stanza_release(rc);
        xmpp_send(conn, r);
        xmpp_stanza_release(r);
    }
    if (s->qlen < MAXQ) {
        xmpp_stanza_t *d = xmpp_stanza_get_child_by_name_and_ns(st, "delay", DELAY);
        char *bare = from ? strdup(from) : NULL;
        if (bare && strchr(bare, '/'))
            *strchr(bare, '/') = 0;
        s->q[s->qlen].from = bare;
        s->q[s->qlen].body = body ? strdup(body) : strdup("");
        s->q[s->qlen].delay = d ? dup_or_null(xmpp_stanza_get_attribute(d, "stamp")) : NULL;
        s->qlen++;
    }
    if (body)
        xmpp_free(s->ctx, body);
    return 1;
}

static void on_conn(xmpp_conn_t *conn, xmpp_conn_event_t ev, int err, xmpp_stream_error_t *se, void *ud)
{
    struct state *s = ud;
    (void)err;
    (void)se;
    if (ev == XMPP_CONN_CONNECT) {
        s->online = 1;
        xmpp_handler_add(conn, on_presence, NULL, "presence", NULL, s);
        xmpp_handler_add(conn, on_message, NULL, "message", NULL, s);
        xmpp_stanza_t *p = xmpp_presence_new(s->ctx);
        xmpp_send(conn, p);
        xmpp_stanza_release(p);
    } else {
        if (!s->online)
            s->failed = 1;
        s->closed = 1;
    }
}

/* Runs the event loop until *flag is set, the connection fails, or the
 * timeout passes. */
static int run_until(struct state *s, int *flag)
{
    double end = now() + timeout_s;
    while (!*flag && !s->failed && now() < end)
        xmpp_run_once(s->ctx, 50);
    return *flag;
}

static int login(struct state *s, int want_echo)
{
    s->online = s->echoed = s->closed = s->failed = 0;
    s->conn = xmpp_conn_new(s->ctx);
    long flags = XMPP_CONN_FLAG_TRUST_TLS;
    flags |= direct_tls ? XMPP_CONN_FLAG_LEGACY_SSL : XMPP_CONN_FLAG_MANDATORY_TLS;
    xmpp_conn_set_flags(s->conn, flags);
    xmpp_conn_set_jid(s->conn, jid);
    xmpp_conn_set_pass(s->conn, password);
    if (xmpp_connect_client(s->conn, "127.0.0.1", (unsigned short)port, on_conn, s) != XMPP_EOK)
        return 0;
    /* Online once the server echoed our initial presence (RFC 6121 §4.2.2). */
    return run_until(s, &s->online) && (!want_echo || run_until(s, &s->echoed));
}

static void logout(struct state *s)
{
    if (!s->closed) {
        xmpp_disconnect(s->conn);
        run_until(s, &s->closed);
    }
    xmpp_conn_release(s->conn);
    s->conn = NULL;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(a, "--port")) port = atoi(v), i++;
        else if (!strcmp(a, "--direct-tls")) direct_tls = 1;
        else if (!strcmp(a, "--jid")) jid = v, i++;
        else if (!strcmp(a, "--password")) password = v, i++;
        else if (!strcmp(a, "--repeat")) repeat = atoi(v), i++;
        else if (!strcmp(a, "--send") && i + 2 < argc) send_to = argv[i + 1], send_body = argv[i + 2], i += 2;
        else if (!strcmp(a, "--id")) msg_id = v, i++;
        else if (!strcmp(a, "--wait-receipt")) wait_receipt = 1;
        else if (!strcmp(a, "--until")) until = v, i++;
        else if (!strcmp(a, "--timeout")) timeout_s = atof(v), i++;
        else {
            fprintf(stderr, "unknown argument %s\n", a);
            return 2;
        }
    }
    if (!jid || !password || !port) {
        fprintf(stderr, "usage: --port P --jid J --password PW [...]\n");
        return 2;
    }
    /* A write racing the server's close must not kill the client. */
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    xmpp_initialize();
    struct state s = {0};
    s.ctx = xmpp_ctx_new(NULL, getenv("STROPHE_DEBUG") ? xmpp_get_default_logger(XMPP_LEVEL_DEBUG) : NULL);

    if (repeat > 0) {
        int ok = 0;
        for (int i = 0; i < repeat; i++) {
            if (login(&s, 0))
                ok++;
            logout(&s);
        }
        printf("{\"event\": \"logins\", \"ok\": %d, \"total\": %d}\n", ok, repeat);
        return 0;
    }
    if (!login(&s, 1)) {
        printf("{\"event\": \"login_failed\"}\n");
        return 1;
    }
    printf("{\"event\": \"online\", \"jid\": ");
    json_str(xmpp_conn_get_bound_jid(s.conn));
    printf(", \"mechanism\": null, \"version\": \"libstrophe\"}\n");
    if (send_to) {
        xmpp_stanza_t *m = xmpp_message_new(s.ctx, "chat", send_to, msg_id);
        xmpp_message_set_body(m, send_body);
        xmpp_stanza_t *rq = xmpp_stanza_new(s.ctx);
        xmpp_stanza_set_name(rq, "request");
        xmpp_stanza_set_ns(rq, RECEIPTS);
        xmpp_stanza_add_child(m, rq);
        xmpp_stanza_release(rq);
        xmpp_send(s.conn, m);
        xmpp_stanza_release(m);
        printf("{\"event\": \"sent\", \"id\": ");
        json_str(msg_id);
        printf("}\n");
        if (wait_receipt) {
            double end = now() + timeout_s;
            while (s.rlen == 0 && !s.closed && now() < end)
                xmpp_run_once(s.ctx, 50);
            if (s.rlen) {
                printf("{\"event\": \"receipt\", \"id\": ");
                json_str(s.receipts[0]);
                printf("}\n");
            } else {
                printf("{\"event\": \"no_receipt\"}\n");
            }
        }
    }
    if (until) {
        int seen = 0, found = 0;
        double end = now() + timeout_s;
        while (!found && now() < end && !s.closed) {
            xmpp_run_once(s.ctx, 50);
            for (; seen < s.qlen; seen++) {
                printf("{\"event\": \"message\", \"from\": ");
                json_str(s.q[seen].from);
                printf(", \"body\": ");
                json_str(s.q[seen].body);
                printf(", \"delay\": ");
                json_str(s.q[seen].delay);
                printf("}\n");
                if (!strcmp(s.q[seen].body, until))
                    found = 1;
            }
        }
        if (!found)
            printf("{\"event\": \"timeout\"}\n");
    }
    /* Let receipts and acks reach the server before closing. */
    double end = now() + 0.3;
    while (now() < end)
        xmpp_run_once(s.ctx, 50);
    logout(&s);
    printf("{\"event\": \"done\"}\n");
    xmpp_ctx_free(s.ctx);
    xmpp_shutdown();
    return 0;
}
