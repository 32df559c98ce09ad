/*
 * loadgen.c: the second SMTP load generator of the benchmarks, of a different kind than
 * smtp_load.py (Python asyncio): one C process, one thread, epoll, non-blocking sockets.
 * It costs its machine a small fraction of the CPU the Python driver does, so on a small
 * machine the server under test keeps the CPU the Python driver would have taken: what one
 * generator shows and the other does not is the client's CPU share.
 *
 * Built at run time by the harness (bench/loadgen.py: gcc -O2, cached by source hash):
 *
 *   loadgen throughput --port 2535 --clients 20 --messages 3000 \
 *       --source-range 127.0.0.10-127.0.0.19 [--size 4096] [--helo NAME] [--sender A] [--rcpt A]
 *   loadgen listed --port 2535 --clients 20 --connections 5000 --source-range 127.0.1.10-127.0.1.59
 *
 * Shape (the reference one, as smtp_load.py): one transaction per connection: connect (bound to
 * the next source address of the range, round-robin over all connections, IP_BIND_ADDRESS_NO_PORT),
 * read the 220, EHLO, MAIL, one RCPT, DATA, the message (about --size bytes with headers, sent
 * in one write), then QUIT written and the socket closed at once (the QUIT goes out with the
 * FIN, the 221 is not awaited). No pipelining. Listed: connect, read the first reply, a 4xx/5xx
 * is a refusal (a 220 is an error), then QUIT with the FIN. Latency: connect() to the 250 after
 * the final dot (to the refusal in listed mode), every value kept, nearest-rank percentiles.
 * Output: one JSON object on stdout (the keys of smtp_load.py's), a summary line on stderr.
 * Bounded by the count and by --duration; every transaction by --timeout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { S_GREET, S_EHLO, S_MAIL, S_RCPT, S_DATA, S_DOT };
static const char *EXPECT[] = {"220", "250", "250", "250", "354", "250"};

typedef struct {
    int fd;          /* -1: idle slot */
    int state;
    int connected;
    double t0;
    double t_step; /* when the command now answered was sent (connect() for the greeting) */
    double step[6]; /* this transaction's time per step */
    size_t len;
    char buf[8192];
} Slot;

typedef struct {
    char key[96];
    long count;
} Kind;

static Kind kinds[64];
static int nkinds;
static double *lat;
static long nlat, cap_lat;
static long refused_codes[1000];
static double step_sum[6]; /* seconds summed per step over successful transactions */
static const char *STEP_NAMES[] = {"greeting", "ehlo", "mail", "rcpt", "data", "dot"};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void count_error(const char *key) {
    for (int i = 0; i < nkinds; i++)
        if (strcmp(kinds[i].key, key) == 0) {
            kinds[i].count++;
            return;
        }
    if (nkinds < 64) {
        snprintf(kinds[nkinds].key, sizeof kinds[nkinds].key, "%s", key);
        kinds[nkinds++].count = 1;
    } else {
        kinds[63].count++;
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double p) {
    if (nlat == 0) return 0;
    long k = (long)(p / 100.0 * nlat + 0.999999999) - 1;
    if (k < 0) k = 0;
    if (k >= nlat) k = nlat - 1;
    return lat[k];
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen throughput|listed --port N [--host A] [--clients N] [--messages N]\n"
            "       [--connections N] [--duration S] [--timeout S] [--source-range A-B]\n"
            "       [--size N] [--helo NAME] [--sender ADDR] [--rcpt ADDR]\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    int listed = strcmp(argv[1], "listed") == 0;
    if (!listed && strcmp(argv[1], "throughput") != 0) usage();
    const char *host = "127.0.0.1", *range = NULL, *helo = "client.example";
    const char *sender = "load@client.example", *rcpt = "rcpt@bench.test";
    int port = 0, clients = 20, size = 4096;
    long total = listed ? 5000 : 5000;
    double duration = 60, timeout = 30;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--port")) port = atoi(v);
        else if (!strcmp(a, "--host")) host = v;
        else if (!strcmp(a, "--clients")) clients = atoi(v);
        else if (!strcmp(a, "--messages") || !strcmp(a, "--connections")) total = atol(v);
        else if (!strcmp(a, "--duration")) duration = atof(v);
        else if (!strcmp(a, "--timeout")) timeout = atof(v);
        else if (!strcmp(a, "--source-range")) range = v;
        else if (!strcmp(a, "--size")) size = atoi(v);
        else if (!strcmp(a, "--helo")) helo = v;
        else if (!strcmp(a, "--sender")) sender = v;
        else if (!strcmp(a, "--rcpt")) rcpt = v;
        else usage();
    }
    if (port <= 0 || clients <= 0 || total <= 0) usage();

    /* source addresses: FIRST-LAST (same /24 or wider; host order increments) */
    uint32_t src_first = 0, src_count = 0, src_next = 0;
    if (range) {
        char a[64], b[64];
        const char *dash = strchr(range, '-');
        struct in_addr ia, ib;
        if (!dash || (size_t)(dash - range) >= sizeof a) usage();
        memcpy(a, range, dash - range);
        a[dash - range] = 0;
        snprintf(b, sizeof b, "%s", dash + 1);
        if (inet_pton(AF_INET, a, &ia) != 1 || inet_pton(AF_INET, b, &ib) != 1) usage();
        src_first = ntohl(ia.s_addr);
        if (ntohl(ib.s_addr) < src_first) usage();
        src_count = ntohl(ib.s_addr) - src_first + 1;
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, host, &dst.sin_addr) != 1) usage();

    /* the lines sent after each expected reply, built once */
    char ehlo[300], mail[300], rcptl[300];
    snprintf(ehlo, sizeof ehlo, "EHLO %s\r\n", helo);
    snprintf(mail, sizeof mail, "MAIL FROM:<%s>\r\n", sender);
    snprintf(rcptl, sizeof rcptl, "RCPT TO:<%s>\r\n", rcpt);
    char head[1024];
    int hl = snprintf(head, sizeof head,
                      "From: <%s>\r\nTo: <%s>\r\nSubject: palisade bench\r\n"
                      "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <bench@load.bench.test>\r\n"
                      "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
                      sender, rcpt);
    const char *line = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-abcdefghijklm\r\n";
    size_t ll = strlen(line);
    long body_len = size - hl > 2 ? size - hl : 2;
    char *msg = malloc(hl + body_len + 8);
    memcpy(msg, head, hl);
    for (long i = 0; i < body_len; i++) msg[hl + i] = line[i % ll];
    msg[hl + body_len - 2] = '\r';
    msg[hl + body_len - 1] = '\n';
    memcpy(msg + hl + body_len, ".\r\n", 3);
    size_t msg_len = hl + body_len + 3;
    const char *send_after[] = {ehlo, mail, rcptl, "DATA\r\n", NULL};

    cap_lat = total;
    lat = malloc(sizeof(double) * cap_lat);
    Slot *slots = calloc(clients, sizeof(Slot));
    int ep = epoll_create1(EPOLL_CLOEXEC);
    long started = 0, done_ok = 0;
    double t_start = now(), deadline = t_start + duration;
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    for (int i = 0; i < clients; i++) slots[i].fd = -1;

    /* start (or restart) slot i with a new connection; returns 0 if none is to be started */
    int active = 0;
#define FINISH(i, err)                                                   \
    do {                                                                 \
        if ((err) != NULL) count_error(err);                             \
        close(slots[i].fd);                                              \
        slots[i].fd = -1;                                                \
        active--;                                                        \
    } while (0)

    for (;;) {
        double t = now();
        /* fill idle slots */
        for (int i = 0; i < clients; i++) {
            if (slots[i].fd >= 0) continue;
            if (started >= total || t >= deadline) continue;
            started++;
            Slot *s = &slots[i];
            s->state = S_GREET;
            s->len = 0;
            s->connected = 0;
            s->t0 = s->t_step = now();
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
            if (fd < 0) {
                count_error("socket() failed");
                continue;
            }
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            if (src_count) {
                setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
                struct sockaddr_in sa = {.sin_family = AF_INET};
                sa.sin_addr.s_addr = htonl(src_first + (src_next++ % src_count));
                if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
                    count_error("bind failed");
                    close(fd);
                    continue;
                }
            }
            if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0 && errno != EINPROGRESS) {
                char e[96];
                snprintf(e, sizeof e, "connect: %s", strerror(errno));
                count_error(e);
                close(fd);
                continue;
            }
            s->fd = fd;
            active++;
            struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.u32 = (uint32_t)i};
            epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        }
        if (active == 0 && (started >= total || now() >= deadline)) break;
        struct epoll_event evs[256];
        int n = epoll_wait(ep, evs, 256, 100);
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            return 1;
        }
        for (int k = 0; k < n; k++) {
            int i = (int)evs[k].data.u32;
            Slot *s = &slots[i];
            if (s->fd < 0) continue;
            ssize_t r = read(s->fd, s->buf + s->len, sizeof s->buf - 1 - s->len);
            if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
            if (r <= 0) {
                char e[96];
                if (r == 0)
                    snprintf(e, sizeof e, "server closed at step %d", s->state);
                else
                    snprintf(e, sizeof e, "connection lost at step %d: %s", s->state,
                             strerror(errno));
                if (listed) {
                    snprintf(e, sizeof e, "%s", r == 0 ? "closed without a reply"
                                                       : "connection lost before a reply");
                }
                FINISH(i, e);
                continue;
            }
            s->len += r;
            /* a reply is complete when it ends in CRLF and its last line is "ddd " */
            if (s->len < 4 || s->buf[s->len - 2] != '\r' || s->buf[s->len - 1] != '\n') {
                if (s->len >= sizeof s->buf - 1) FINISH(i, "reply too long");
                continue;
            }
            size_t st = s->len - 2;
            while (st > 0 && s->buf[st - 1] != '\n') st--;
            if (s->len - st < 4 || (s->buf[st + 3] != ' ' && s->buf[st + 3] != '\r')) continue;
            char code[4] = {s->buf[st], s->buf[st + 1], s->buf[st + 2], 0};
            s->len = 0;
            double t_reply = now();
            s->step[s->state] = t_reply - s->t_step;
            s->t_step = t_reply;
            if (listed) {
                (void)!write(s->fd, "QUIT\r\n", 6);
                if ((code[0] == '4' || code[0] == '5') && code[1] >= '0' && code[1] <= '9') {
                    refused_codes[atoi(code)]++;
                    if (nlat < cap_lat) lat[nlat++] = now() - s->t0;
                    done_ok++;
                    FINISH(i, NULL);
                } else {
                    char e[64];
                    snprintf(e, sizeof e, "not refused: %s", code);
                    FINISH(i, e);
                }
                continue;
            }
            if (strcmp(code, EXPECT[s->state]) != 0) {
                char e[64];
                snprintf(e, sizeof e, "reply %s at step %d", code, s->state);
                FINISH(i, e);
                continue;
            }
            if (s->state == S_DOT) {
                if (nlat < cap_lat) lat[nlat++] = t_reply - s->t0;
                for (int j = 0; j <= S_DOT; j++) step_sum[j] += s->step[j];
                done_ok++;
                (void)!write(s->fd, "QUIT\r\n", 6); /* goes out with the FIN, 221 not awaited */
                FINISH(i, NULL);
                continue;
            }
            const char *out = s->state == S_DATA ? msg : send_after[s->state];
            size_t olen = s->state == S_DATA ? msg_len : strlen(out);
            ssize_t w = write(s->fd, out, olen);
            if (w != (ssize_t)olen) {
                FINISH(i, "short write");
                continue;
            }
            s->state++;
        }
        /* per-transaction timeouts */
        double tn = now();
        for (int i = 0; i < clients; i++)
            if (slots[i].fd >= 0 && tn - slots[i].t0 > timeout) FINISH(i, "timeout");
    }
    double elapsed = now() - t_start;
    getrusage(RUSAGE_SELF, &ru1);
    double cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                 (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                 (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                 (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    qsort(lat, nlat, sizeof(double), cmp_double);
    long errors = 0;
    for (int i = 0; i < nkinds; i++) errors += kinds[i].count;
    double rate = elapsed > 0 ? done_ok / elapsed : 0;
    printf("{\"mode\": \"%s\", \"driver\": \"loadgen.c\", \"host\": \"%s\", \"port\": %d, "
           "\"clients\": %d, \"source_range\": \"%s\", ",
           listed ? "listed" : "throughput", host, port, clients, range ? range : "");
    if (listed) {
        printf("\"attempted\": %ld, \"refused\": %ld, \"codes\": {", done_ok + errors, done_ok);
        int first = 1;
        for (int c = 0; c < 1000; c++)
            if (refused_codes[c]) {
                printf("%s\"%03d\": %ld", first ? "" : ", ", c, refused_codes[c]);
                first = 0;
            }
        printf("}, \"refused_per_s\": %.1f, ", rate);
    } else {
        printf("\"message_bytes\": %zu, \"accepted\": %ld, \"msgs_per_s\": %.1f, ", msg_len - 3,
               done_ok, rate);
    }
    printf("\"errors\": %ld, \"error_kinds\": {", errors);
    for (int i = 0; i < nkinds; i++) printf("%s\"%s\": %ld", i ? ", " : "", kinds[i].key, kinds[i].count);
    printf("}, \"elapsed_s\": %.3f, ", elapsed);
    if (nlat)
        printf("\"p50_ms\": %.2f, \"p99_ms\": %.2f, \"max_ms\": %.2f, ", pct(50) * 1000,
               pct(99) * 1000, lat[nlat - 1] * 1000);
    else
        printf("\"p50_ms\": null, \"p99_ms\": null, \"max_ms\": null, ");
    if (!listed && done_ok) {
        printf("\"step_mean_ms\": {");
        for (int j = 0; j <= S_DOT; j++)
            printf("%s\"%s\": %.3f", j ? ", " : "", STEP_NAMES[j], step_sum[j] / done_ok * 1000);
        printf("}, ");
    }
    if (nlat) {
        /* latency histogram: counts of transactions under 1, 2, 4 ... 1024 ms, then the rest */
        long hist[12] = {0};
        for (long k = 0; k < nlat; k++) {
            int b = 0;
            double ms = lat[k] * 1000;
            while (b < 11 && ms >= (double)(1 << b)) b++;
            hist[b]++;
        }
        printf("\"p90_ms\": %.2f, \"p95_ms\": %.2f, \"histogram_ms\": {", pct(90) * 1000,
               pct(95) * 1000);
        for (int b = 0; b < 12; b++) {
            if (b < 11)
                printf("%s\"<%d\": %ld", b ? ", " : "", 1 << b, hist[b]);
            else
                printf(", \">=1024\": %ld", hist[b]);
        }
        printf("}, ");
    }
    printf("\"driver_cpu_s\": %.3f}\n", cpu);
    fprintf(stderr,
            "loadgen.c %s -> %s:%d: %ld done, %ld errors in %.2f s = %.1f/s, p50 %.2f ms, "
            "p99 %.2f ms, driver CPU %.3f s\n",
            listed ? "listed" : "throughput", host, port, done_ok, errors, elapsed, rate,
            pct(50) * 1000, pct(99) * 1000, cpu);
    return 0;
}
