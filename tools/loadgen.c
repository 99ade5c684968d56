/*
 * mtloop-loadgen: a single-threaded epoll load generator for echo servers.
 *
 *   mtloop-loadgen --port 8888 [--host 127.0.0.1] | --unix PATH
 *                  [-c CONNS] [-s SIZE] [-d SECONDS | -n REQUESTS]
 *                  [-p DEPTH] [--warmup SECONDS] [--json] [--cpu N]
 *                  [--connect-timeout SECONDS] [--tls [--tls-reuse]] [--reconnect]
 *                  [--pattern edge|level] [--storm [--storm-chunk MAX]]
 *
 * Each connection runs a closed loop with up to DEPTH messages in flight: a
 * message is sent when one of the connection's earlier ones has been echoed
 * back in full.  Message `seq` of connection `id` carries bytes derived from
 * (id, seq) only, so every echoed byte is checked against what it must be:
 * corruption, loss, duplication or reordering shows as a mismatch.  A
 * mismatch, unexpected data, EOF or a reset counts as an error and closes
 * that connection.
 *
 * Latency of a request: from just before the send() that carries the first
 * byte of the message to just after the recv() that returns the last byte of
 * its echo (CLOCK_MONOTONIC), recorded in a log-linear histogram (values in
 * ns; exact below 256 ns, then 128 sub-buckets per power of two, i.e. under
 * 0.8 % relative error, up to 2^34 ns ~ 17 s; larger values are clamped into
 * the top bucket, the exact max and mean are kept separately).
 *
 * Connections are opened in parallel; the clock starts when every connection
 * is open (or has failed).
 *
 * --pattern says how a connection meets its socket.  "edge" (the default):
 * edge-triggered epoll; on each event it sends all it may (up to 256 KiB a
 * send()) until the socket is full, and reads until it is drained, in
 * recv() calls of up to 256 KiB.  "level" is how a client on an event loop
 * of its own tends to behave: level-triggered epoll, writability watched
 * only while output is pending; on each event one send() of what is
 * pending, taken as far as the socket accepts it, and one recv() of at most
 * 64 KiB.  A large echo then arrives in more, smaller reads, interleaved
 * with the sends of other connections, and the server meets a different
 * rhythm of segments and wakeups.
 *
 * --tls speaks TLS (OpenSSL, no certificate verification: the server is the
 * one under test); a connection counts as open once its handshake is done.
 * --reconnect makes each connection send one message, read its echo, close
 * (with close_notify under TLS) and connect again: requests/s is then
 * connections (handshakes) per second.  TLS sessions are not resumed unless
 * --tls-reuse is given.  Requests completed during --warmup are not
 * counted (with -n they do not use up the budget either).
 *
 * --udp makes each "connection" a connected UDP socket with one datagram in
 * flight: datagram `seq` carries seq in its first 8 bytes and the
 * connection's pattern for (id, seq) after them, and is checked byte for
 * byte when it comes back.  Loss is counted, never waited for: a datagram
 * not echoed within --udp-timeout counts as lost and the next one goes; an
 * echo that comes after that counts as late and is ignored.  A datagram
 * that is neither (the wrong length or bytes) is an error.
 *
 * --udp-flood measures a receiver instead: every socket sends datagrams
 * back to back, round robin, without waiting for echoes (anything that
 * comes back is read and dropped); `requests` counts what was sent, and
 * the receiver reports what it got (tools/bench_server.py --mode udp-sink).
 *
 * --storm opens all -c connections at once; each echoes -s bytes in chunks
 * of random size (1 to --storm-chunk bytes; a chunk is sent once the echo
 * of the one before it is back in full, every byte checked), then closes.
 * The clock runs from the first connect() to the last close() (-d is the
 * deadline); `requests` counts connections that finished, and a request's
 * latency is a connection's whole life.  A listen backlog that overflows
 * shows here: the kernel drops the SYN and the client sends it again a
 * second later.
 *
 * Exit status: 0 on success, 1 if any error occurred or no request completed,
 * 2 on bad usage.
 */

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#define PROG "mtloop-loadgen"

#define NS_PER_SEC 1000000000ULL
#define SEND_CHUNK (256 * 1024)
#define RECV_CHUNK (256 * 1024)
#define LEVEL_RECV_CHUNK (64 * 1024)  /* --pattern level */
#define MAX_EVENTS 256
#define MAX_REPORTED_ERRORS 10
#define NEVER UINT64_MAX

/* ------------------------------------------------------------------------ */
/* Time                                                                     */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS_PER_SEC + (uint64_t)ts.tv_nsec;
}

/* ------------------------------------------------------------------------ */
/* Latency histogram (log-linear, HDR-like)                                 */

#define H_SUB_BITS 7                    /* 128 sub-buckets per power of two */
#define H_SUB (1u << H_SUB_BITS)
#define H_MAX_EXP 34                    /* values below 2^34 ns (~17 s) */
#define H_BUCKETS ((H_MAX_EXP - H_SUB_BITS + 1) * H_SUB)

struct histogram {
    uint64_t counts[H_BUCKETS];
    uint64_t total;
    uint64_t max;
    long double sum;
};

static unsigned hist_index(uint64_t v)
{
    if (v >= (1ULL << H_MAX_EXP))
        v = (1ULL << H_MAX_EXP) - 1;
    if (v < 2 * H_SUB)
        return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    unsigned shift = e - H_SUB_BITS;
    return shift * H_SUB + (unsigned)(v >> shift);
}

/* The highest value that falls into bucket `idx`. */
static uint64_t hist_upper(unsigned idx)
{
    if (idx < 2 * H_SUB)
        return idx;
    unsigned shift = idx / H_SUB - 1;
    uint64_t m = (uint64_t)(idx % H_SUB) + H_SUB;
    return ((m + 1) << shift) - 1;
}

static void hist_record(struct histogram *h, uint64_t v)
{
    h->counts[hist_index(v)]++;
    h->total++;
    h->sum += (long double)v;
    if (v > h->max)
        h->max = v;
}

/* Value at percentile p (0 < p <= 100), in ns; never above the exact max. */
static uint64_t hist_percentile(const struct histogram *h, double p)
{
    if (h->total == 0)
        return 0;
    uint64_t target = (uint64_t)ceil(p / 100.0 * (double)h->total);
    if (target < 1)
        target = 1;
    if (target > h->total)
        target = h->total;
    uint64_t seen = 0;
    for (unsigned i = 0; i < H_BUCKETS; i++) {
        seen += h->counts[i];
        if (seen >= target) {
            uint64_t v = hist_upper(i);
            return v < h->max ? v : h->max;
        }
    }
    return h->max;
}

/* ------------------------------------------------------------------------ */
/* Message content: a pure function of (connection id, sequence number)     */

static inline uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static inline uint64_t msg_seed(uint32_t id, uint64_t seq)
{
    return mix64(((uint64_t)id << 40) ^ seq ^ 0x6d746c6f6f70ULL);
}

static inline uint64_t msg_word(uint64_t seed, uint64_t k)
{
    uint64_t x = seed + (k + 1) * 0x9e3779b97f4a7c15ULL;
    x ^= x >> 32;
    x *= 0xd6e8feb86659fd93ULL;
    x ^= x >> 32;
    return x;
}

/* Bytes [off, off + len) of the message with this seed, into out. */
static void msg_fill(uint64_t seed, size_t off, size_t len, unsigned char *out)
{
    uint64_t k = off / 8;
    size_t in = off % 8;
    while (len > 0) {
        uint64_t w = msg_word(seed, k++);
        size_t take = 8 - in;
        if (take > len)
            take = len;
        memcpy(out, (const unsigned char *)&w + in, take);
        out += take;
        len -= take;
        in = 0;
    }
}

/* ------------------------------------------------------------------------ */
/* State                                                                    */

enum conn_state { C_IDLE, C_RETRY, C_CONNECTING, C_HANDSHAKE, C_OPEN, C_CLOSED };
enum phase { PH_CONNECTING, PH_RUNNING, PH_DONE };

struct conn {
    int fd;
    uint32_t id;
    enum conn_state state;
    uint64_t nissued;           /* messages 0..nissued-1 have been issued */
    uint64_t wseq;              /* send position: message, offset */
    size_t woff;
    uint64_t rseq;              /* receive position: message, offset */
    size_t roff;
    uint64_t *tstart;           /* [pipeline]: send time of message seq */
    SSL *ssl;                   /* --tls */
    size_t tls_retry;           /* an SSL_write to repeat with this length */
    bool restarting;            /* --reconnect: connecting again, not counted */
    uint32_t interest;          /* the epoll mask registered (--pattern level) */
};

struct options {
    const char *host;
    const char *port;
    const char *unix_path;
    uint64_t connections;
    uint64_t size;
    double duration;            /* seconds; 0: none */
    uint64_t requests;          /* 0: none */
    uint64_t pipeline;
    double warmup;
    bool json;
    long cpu;                   /* -1: none */
    double connect_timeout;
    bool tls, tls_reuse, reconnect;
    bool udp;
    bool udp_flood;             /* send without waiting for echoes */
    bool level;                 /* --pattern level */
    double udp_timeout;         /* seconds */
    bool storm;                 /* --storm */
    uint64_t storm_chunk;       /* its largest chunk */
};

static struct options opt = {
    .host = "127.0.0.1",
    .connections = 32,
    .size = 1024,
    .pipeline = 1,
    .cpu = -1,
    .connect_timeout = 5.0,
    .udp_timeout = 0.1,
    .storm_chunk = 16384,
};

static struct {
    int epfd;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int family;
    struct conn *conns;
    uint64_t nconns;
    enum phase phase;
    uint64_t pending;           /* connections still connecting */
    uint64_t alive;             /* connections open */
    uint64_t connected;         /* connections that got established */
    uint64_t issued;            /* messages issued, all connections */
    uint64_t budget;            /* may issue while issued < budget */
    uint64_t inflight;          /* issued and not yet completed */
    uint64_t requests;          /* completed and counted */
    uint64_t errors;
    uint64_t connect_deadline;
    uint64_t t0;                /* all connections resolved */
    uint64_t measure_start;     /* t0 + warmup */
    uint64_t end;               /* measure_start + duration, or NEVER */
    uint64_t stop_time;
    struct histogram hist;
    unsigned char *sbuf;
    unsigned char *rbuf;
    unsigned char *ebuf;
    SSL_CTX *ssl_ctx;
    SSL_SESSION *session;       /* --tls-reuse: the session to resume */
    uint64_t reconnects;
    uint64_t lost, late;        /* --udp */
    uint64_t max_read;          /* the most bytes one stream read returned */
} g;

static volatile sig_atomic_t interrupted;

static void on_signal(int sig)
{
    (void)sig;
    interrupted = 1;
}

/* ------------------------------------------------------------------------ */
/* Usage                                                                    */

static void usage(FILE *f)
{
    fprintf(f,
        "usage: " PROG " (--port PORT [--host HOST] | --unix PATH) [options]\n"
        "\n"
        "Closed-loop echo load generator: every echoed byte is verified.\n"
        "\n"
        "  --host HOST             server host (default 127.0.0.1)\n"
        "  --port PORT             server TCP port\n"
        "  --unix PATH             server Unix socket path (instead of TCP)\n"
        "  -c, --connections N     concurrent connections (default 32)\n"
        "  -s, --size BYTES        message size (default 1024)\n"
        "  -d, --duration SECONDS  measured run time (default 10 unless -n)\n"
        "  -n, --requests N        stop after N counted requests\n"
        "  -p, --pipeline DEPTH    messages in flight per connection (default 1)\n"
        "      --warmup SECONDS    run this long before counting (default 0)\n"
        "      --json              print one JSON object\n"
        "      --cpu N             pin this process to CPU N\n"
        "      --connect-timeout SECONDS  (default 5)\n"
        "      --tls               speak TLS (no certificate verification)\n"
        "      --tls-reuse         resume TLS sessions (with --reconnect)\n"
        "      --reconnect         one request per connection, then connect again\n"
        "      --pattern P         edge (default): edge-triggered, send until full, read\n"
        "                          until drained, 256 KiB a call; level: level-triggered,\n"
        "                          one send() and one recv() of <= 64 KiB per event\n"
        "      --udp               UDP: a connected socket per connection, one datagram in\n"
        "                          flight each (-s 8..65507)\n"
        "      --udp-timeout SECONDS  a datagram not echoed by then is lost (default 0.1)\n"
        "      --udp-flood         UDP one way: each socket sends datagrams back to back,\n"
        "                          echoes are not awaited; `requests` counts the sends\n"
        "      --storm             a connection storm: all -c connections at once, each\n"
        "                          echoes -s bytes in chunks of random size, one chunk\n"
        "                          in flight, then closes; -d is the deadline (default 60)\n"
        "      --storm-chunk MAX   the largest chunk of --storm (default 16384)\n"
        "  -h, --help              show this help\n"
        "\n"
        "Exit status: 0 ok, 1 errors or no request completed, 2 bad usage.\n");
}

static void bad_usage(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, PROG ": ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nTry '" PROG " --help'.\n");
    exit(2);
}

static uint64_t parse_uint(const char *name, const char *s, uint64_t lo, uint64_t hi)
{
    char *end;
    errno = 0;
    if (*s == '-' || *s == '+' || *s == '\0' || *s == ' ')
        bad_usage("%s: not a valid integer: '%s'", name, s);
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0')
        bad_usage("%s: not a valid integer: '%s'", name, s);
    if (v < lo || v > hi)
        bad_usage("%s: %s is out of range [%llu, %llu]", name, s,
                  (unsigned long long)lo, (unsigned long long)hi);
    return v;
}

static double parse_seconds(const char *name, const char *s, bool allow_zero)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (*s == '\0' || errno != 0 || *end != '\0' || !isfinite(v) || v < 0 ||
        (!allow_zero && v == 0) || v > 1e7)
        bad_usage("%s: not a valid number of seconds: '%s'", name, s);
    return v;
}

enum {
    OPT_HOST = 256, OPT_PORT, OPT_UNIX, OPT_WARMUP, OPT_JSON, OPT_CPU,
    OPT_CONNECT_TIMEOUT, OPT_TLS, OPT_TLS_REUSE, OPT_RECONNECT, OPT_UDP, OPT_UDP_TIMEOUT, OPT_UDP_FLOOD,
    OPT_PATTERN, OPT_STORM, OPT_STORM_CHUNK,
};

static void parse_args(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"host", required_argument, NULL, OPT_HOST},
        {"port", required_argument, NULL, OPT_PORT},
        {"unix", required_argument, NULL, OPT_UNIX},
        {"connections", required_argument, NULL, 'c'},
        {"size", required_argument, NULL, 's'},
        {"duration", required_argument, NULL, 'd'},
        {"requests", required_argument, NULL, 'n'},
        {"pipeline", required_argument, NULL, 'p'},
        {"warmup", required_argument, NULL, OPT_WARMUP},
        {"json", no_argument, NULL, OPT_JSON},
        {"cpu", required_argument, NULL, OPT_CPU},
        {"connect-timeout", required_argument, NULL, OPT_CONNECT_TIMEOUT},
        {"tls", no_argument, NULL, OPT_TLS},
        {"tls-reuse", no_argument, NULL, OPT_TLS_REUSE},
        {"reconnect", no_argument, NULL, OPT_RECONNECT},
        {"udp", no_argument, NULL, OPT_UDP},
        {"udp-timeout", required_argument, NULL, OPT_UDP_TIMEOUT},
        {"udp-flood", no_argument, NULL, OPT_UDP_FLOOD},
        {"pattern", required_argument, NULL, OPT_PATTERN},
        {"storm", no_argument, NULL, OPT_STORM},
        {"storm-chunk", required_argument, NULL, OPT_STORM_CHUNK},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    bool host_given = false;
    int ch;
    while ((ch = getopt_long(argc, argv, "c:s:d:n:p:h", longopts, NULL)) != -1) {
        switch (ch) {
        case OPT_HOST: opt.host = optarg; host_given = true; break;
        case OPT_PORT:
            parse_uint("--port", optarg, 1, 65535);
            opt.port = optarg;
            break;
        case OPT_UNIX: opt.unix_path = optarg; break;
        case 'c': opt.connections = parse_uint("--connections", optarg, 1, 1000000); break;
        case 's': opt.size = parse_uint("--size", optarg, 1, 1ULL << 30); break;
        case 'd': opt.duration = parse_seconds("--duration", optarg, false); break;
        case 'n': opt.requests = parse_uint("--requests", optarg, 1, 1ULL << 48); break;
        case 'p': opt.pipeline = parse_uint("--pipeline", optarg, 1, 1 << 20); break;
        case OPT_WARMUP: opt.warmup = parse_seconds("--warmup", optarg, true); break;
        case OPT_JSON: opt.json = true; break;
        case OPT_CPU: opt.cpu = (long)parse_uint("--cpu", optarg, 0, CPU_SETSIZE - 1); break;
        case OPT_CONNECT_TIMEOUT:
            opt.connect_timeout = parse_seconds("--connect-timeout", optarg, false);
            break;
        case OPT_TLS: opt.tls = true; break;
        case OPT_TLS_REUSE: opt.tls_reuse = true; break;
        case OPT_RECONNECT: opt.reconnect = true; break;
        case OPT_UDP: opt.udp = true; break;
        case OPT_UDP_FLOOD: opt.udp = opt.udp_flood = true; break;
        case OPT_UDP_TIMEOUT: opt.udp_timeout = parse_seconds("--udp-timeout", optarg, false); break;
        case OPT_PATTERN:
            if (strcmp(optarg, "edge") != 0 && strcmp(optarg, "level") != 0)
                bad_usage("--pattern: 'edge' or 'level', not '%s'", optarg);
            opt.level = strcmp(optarg, "level") == 0;
            break;
        case OPT_STORM: opt.storm = true; break;
        case OPT_STORM_CHUNK:
            opt.storm_chunk = parse_uint("--storm-chunk", optarg, 1, SEND_CHUNK);
            break;
        case 'h': usage(stdout); exit(0);
        default: fprintf(stderr, "Try '" PROG " --help'.\n"); exit(2);
        }
    }
    if (optind < argc)
        bad_usage("unexpected argument '%s'", argv[optind]);
    if (opt.unix_path) {
        if (opt.port || host_given)
            bad_usage("--unix excludes --host and --port");
        if (strlen(opt.unix_path) >= sizeof(((struct sockaddr_un *)0)->sun_path))
            bad_usage("--unix: path too long");
        if (opt.unix_path[0] == '\0')
            bad_usage("--unix: empty path");
    } else if (!opt.port) {
        bad_usage("--port (or --unix) is required");
    }
    if (opt.storm && (opt.unix_path || opt.tls || opt.udp || opt.reconnect || opt.level ||
                      opt.pipeline != 1 || opt.requests || opt.warmup > 0))
        bad_usage("--storm excludes --unix, --tls, --udp, --reconnect, --pattern level, "
                  "--pipeline, --requests and --warmup");
    if (opt.duration == 0 && opt.requests == 0)
        opt.duration = opt.storm ? 60.0 : 10.0;
    if (opt.connections * opt.pipeline > (1ULL << 24))
        bad_usage("--connections x --pipeline is too large");
    if (opt.tls_reuse && !opt.tls)
        bad_usage("--tls-reuse needs --tls");
    if (opt.reconnect && opt.pipeline != 1)
        bad_usage("--reconnect sends one message per connection: no --pipeline");
    if (opt.udp && (opt.tls || opt.reconnect || opt.pipeline != 1 || opt.unix_path))
        bad_usage("--udp excludes --tls, --reconnect, --pipeline and --unix");
    if (opt.level && (opt.udp || opt.tls))
        bad_usage("--pattern level is for plain stream connections: no --udp or --tls");
    if (opt.udp && (opt.size < 8 || opt.size > 65507))
        bad_usage("--udp: --size must be 8..65507");
}

/* ------------------------------------------------------------------------ */
/* Connections                                                              */

static void conn_close(struct conn *c)
{
    if (c->state == C_CLOSED)
        return;
    if (c->state == C_OPEN || c->restarting)
        g.alive--;
    if (!c->restarting && (c->state == C_CONNECTING || c->state == C_RETRY ||
                           c->state == C_HANDSHAKE))
        g.pending--;
    c->restarting = false;
    if (c->ssl != NULL) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    g.inflight -= c->nissued - c->rseq;
    c->state = C_CLOSED;
}

/* Counts an error of connection `id`; the first few are told on stderr. */
static void count_error(uint32_t id, const char *fmt, va_list ap)
{
    g.errors++;
    if (g.errors <= MAX_REPORTED_ERRORS) {
        fprintf(stderr, PROG ": connection %u: ", id);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
    } else if (g.errors == MAX_REPORTED_ERRORS + 1) {
        fprintf(stderr, PROG ": further errors not shown\n");
    }
}

static void conn_fail(struct conn *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    count_error(c->id, fmt, ap);
    va_end(ap);
    conn_close(c);
}

static void conn_watch_output(struct conn *c, bool want);

static void conn_opened(struct conn *c)
{
    c->state = C_OPEN;
    conn_watch_output(c, false); /* --pattern level: until there is output */
    if (c->restarting) {
        c->restarting = false; /* counted as alive throughout */
        return;
    }
    g.pending--;
    g.alive++;
    g.connected++;
}

static const char *tls_error_text(void)
{
    unsigned long e = ERR_get_error();
    const char *r = e ? ERR_reason_error_string(e) : NULL;
    ERR_clear_error();
    return r ? r : "unknown error (the peer closed?)";
}

/* The TCP connection is up: open it, or start its TLS handshake. */
static void conn_connected(struct conn *c)
{
    if (!opt.tls) {
        conn_opened(c);
        return;
    }
    c->ssl = SSL_new(g.ssl_ctx);
    if (c->ssl == NULL || SSL_set_fd(c->ssl, c->fd) != 1) {
        conn_fail(c, "SSL_new: %s", tls_error_text());
        return;
    }
    SSL_set_connect_state(c->ssl);
    if (opt.tls_reuse && g.session != NULL)
        SSL_set_session(c->ssl, g.session);
    c->state = C_HANDSHAKE;
}

/* Moves the handshake on; true once it is done (the connection is open). */
static bool conn_handshake(struct conn *c)
{
    ERR_clear_error();
    int rc = SSL_do_handshake(c->ssl);
    if (rc == 1) {
        conn_opened(c);
        return true;
    }
    int e = SSL_get_error(c->ssl, rc);
    if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
        conn_fail(c, "TLS handshake: %s", tls_error_text());
    return false;
}

/* send() and recv() in the socket's terms (-1 with errno, EAGAIN when the
 * socket is not ready), through TLS when --tls. */
static ssize_t conn_send(struct conn *c, const void *buf, size_t len)
{
    if (c->ssl == NULL)
        return send(c->fd, buf, len, MSG_NOSIGNAL);
    if (c->tls_retry)
        len = c->tls_retry; /* OpenSSL wants the same write again */
    ERR_clear_error();
    int n = SSL_write(c->ssl, buf, (int)len);
    if (n > 0) {
        c->tls_retry = 0;
        return n;
    }
    int e = SSL_get_error(c->ssl, n);
    if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
        c->tls_retry = len;
        errno = EAGAIN;
        return -1;
    }
    errno = EPROTO;
    return -1;
}

/* Reads until the buffer is full or the socket is drained, so that a short
 * read means drained, as for recv() (edge-triggered epoll relies on it). */
static ssize_t conn_recv(struct conn *c, void *buf, size_t len)
{
    if (c->ssl == NULL)
        return recv(c->fd, buf, len, 0);
    size_t got = 0;
    while (got < len) {
        ERR_clear_error();
        int n = SSL_read(c->ssl, (char *)buf + got, (int)(len - got));
        if (n > 0) {
            got += (size_t)n;
            continue;
        }
        int e = SSL_get_error(c->ssl, n);
        if (got > 0)
            break;
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            errno = EAGAIN;
            return -1;
        }
        if (e == SSL_ERROR_ZERO_RETURN)
            return 0;
        errno = EPROTO;
        return -1;
    }
    return (ssize_t)got;
}

/* One connect attempt; leaves c CONNECTING, RETRY, OPEN or CLOSED. */
static void conn_try_connect(struct conn *c)
{
    if (c->fd < 0) {
        c->fd = socket(g.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0) {
            conn_fail(c, "socket: %s", strerror(errno));
            return;
        }
        if (g.family != AF_UNIX) {
            int one = 1;
            if (setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) {
                conn_fail(c, "TCP_NODELAY: %s", strerror(errno));
                return;
            }
        }
    }
    int rc = connect(c->fd, (struct sockaddr *)&g.addr, g.addrlen);
    if (rc < 0 && g.family == AF_UNIX && errno == EAGAIN) {
        c->state = C_RETRY;      /* listen backlog full: try again shortly */
        return;
    }
    /* A non-blocking TCP connect goes on in the background (EINTR too). */
    if (rc < 0 && !(g.family != AF_UNIX && (errno == EINPROGRESS || errno == EINTR))) {
        conn_fail(c, "connect: %s", strerror(errno));
        return;
    }
    struct epoll_event ev = {
        .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | (opt.level ? 0 : EPOLLET),
        .data.ptr = c,
    };
    c->interest = ev.events;
    if (epoll_ctl(g.epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        conn_fail(c, "epoll_ctl: %s", strerror(errno));
        return;
    }
    if (rc == 0)
        conn_connected(c);
    else
        c->state = C_CONNECTING;
}

/* --reconnect: the request is done; close politely and connect again. */
static void conn_restart(struct conn *c)
{
    if (c->ssl != NULL) {
        if (opt.tls_reuse && g.session == NULL)
            g.session = SSL_get1_session(c->ssl);
        SSL_shutdown(c->ssl); /* close_notify, not waiting for the answer */
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    epoll_ctl(g.epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->nissued = c->wseq = c->rseq = 0;
    c->woff = c->roff = 0;
    c->tls_retry = 0;
    c->restarting = true;
    g.reconnects++;
    conn_try_connect(c);
}

static uint64_t send_pos(const struct conn *c)
{
    return c->wseq * opt.size + c->woff;
}

static uint64_t recv_pos(const struct conn *c)
{
    return c->rseq * opt.size + c->roff;
}

/* --pattern level: writability is watched only while output is pending
 * (level-triggered, it would wake every round otherwise). */
static void conn_watch_output(struct conn *c, bool want)
{
    uint32_t mask = EPOLLIN | EPOLLRDHUP | (want ? EPOLLOUT : 0);
    if (!opt.level || c->state == C_CLOSED || mask == c->interest)
        return;
    struct epoll_event ev = {.events = mask, .data.ptr = c};
    if (epoll_ctl(g.epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        conn_fail(c, "epoll_ctl: %s", strerror(errno));
        return;
    }
    c->interest = mask;
}

/* Send what the closed loop allows, until it is all sent or the socket is
 * full (edge-triggered EPOLLOUT then brings us back); --pattern level: one
 * send() a call, and writability watched while output is left. */
static void conn_write(struct conn *c)
{
    const uint64_t size = opt.size, depth = opt.pipeline;
    while (c->state == C_OPEN) {
        while (c->nissued < c->rseq + depth && g.issued < g.budget) {
            c->nissued++;
            g.issued++;
            g.inflight++;
        }
        uint64_t pending = (c->nissued - c->wseq) * size - c->woff;
        if (pending == 0) {
            conn_watch_output(c, false);
            return;
        }
        size_t fill = pending < SEND_CHUNK ? (size_t)pending : SEND_CHUNK;

        uint64_t seq = c->wseq;
        size_t off = c->woff, pos = 0;
        while (pos < fill) {
            size_t k = (size_t)size - off;
            if (k > fill - pos)
                k = fill - pos;
            msg_fill(msg_seed(c->id, seq), off, k, g.sbuf + pos);
            pos += k;
            off += k;
            if (off == size) {
                seq++;
                off = 0;
            }
        }

        uint64_t t = now_ns();
        ssize_t n = conn_send(c, g.sbuf, fill);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                conn_watch_output(c, true);
                return;
            }
            conn_fail(c, "send: %s", strerror(errno));
            return;
        }
        size_t left = (size_t)n;
        while (left > 0) {
            if (c->woff == 0)
                c->tstart[c->wseq % depth] = t;
            size_t k = (size_t)size - c->woff;
            if (k > left)
                k = left;
            c->woff += k;
            left -= k;
            if (c->woff == size) {
                c->wseq++;
                c->woff = 0;
            }
        }
        if (opt.level) {
            conn_watch_output(c, (size_t)n < pending);
            return;
        }
        if ((size_t)n < fill)
            return;             /* the socket buffer is full */
    }
}

static void complete(struct conn *c, uint64_t t)
{
    uint64_t lat = t - c->tstart[c->rseq % opt.pipeline];
    if (g.phase == PH_RUNNING && t >= g.measure_start) {
        if (t < g.end) {
            hist_record(&g.hist, lat);
            g.requests++;
        }
    } else if (g.budget != NEVER) {
        g.budget++;             /* a warmup request: not counted */
    }
    c->rseq++;
    c->roff = 0;
    g.inflight--;
    if (opt.reconnect && g.phase == PH_RUNNING)
        conn_restart(c);
}

/* Read everything available, verifying each byte against what was sent.
 * `events` is the epoll mask that brought us here. */
static void conn_read(struct conn *c, uint32_t events)
{
    const uint64_t size = opt.size;
    const size_t chunk = opt.level ? LEVEL_RECV_CHUNK : RECV_CHUNK;
    while (c->state == C_OPEN) {
        ssize_t n = conn_recv(c, g.rbuf, chunk);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            conn_fail(c, "recv: %s", strerror(errno));
            return;
        }
        if (n == 0) {
            conn_fail(c, "connection closed by the server (%llu requests done, %llu in flight)",
                      (unsigned long long)c->rseq,
                      (unsigned long long)(c->nissued - c->rseq));
            return;
        }
        uint64_t t = now_ns();
        if ((uint64_t)n > g.max_read)
            g.max_read = (uint64_t)n;
        if (recv_pos(c) + (uint64_t)n > send_pos(c)) {
            conn_fail(c, "received %llu bytes more than were sent",
                      (unsigned long long)(recv_pos(c) + (uint64_t)n - send_pos(c)));
            return;
        }
        size_t pos = 0;
        while (pos < (size_t)n) {
            size_t k = (size_t)size - c->roff;
            if (k > (size_t)n - pos)
                k = (size_t)n - pos;
            msg_fill(msg_seed(c->id, c->rseq), c->roff, k, g.ebuf);
            if (memcmp(g.ebuf, g.rbuf + pos, k) != 0) {
                size_t i = 0;
                while (g.ebuf[i] == g.rbuf[pos + i])
                    i++;
                conn_fail(c, "echo mismatch in message %llu at offset %zu "
                          "(expected 0x%02x, got 0x%02x)",
                          (unsigned long long)c->rseq, c->roff + i,
                          g.ebuf[i], g.rbuf[pos + i]);
                return;
            }
            pos += k;
            c->roff += k;
            if (c->roff == size) {
                complete(c, t);
                if (c->state != C_OPEN)
                    return; /* --reconnect: a new connection now */
            }
        }
        /* A short read drained the socket: data arriving later raises a new
         * edge.  Not so for a FIN that came before the read (the mask then
         * says EPOLLRDHUP): read on to see the EOF. */
        if (opt.level)
            return;             /* one recv() per event: the rest raises another */
        if ((size_t)n < RECV_CHUNK && !(events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
            return;
    }
}

static void conn_event(struct conn *c, uint32_t events)
{
    int fd = c->fd;
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err != 0) {
            conn_fail(c, "connect: %s", strerror(err));
            return;
        }
        if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP)))
            return;
        if (events & (EPOLLERR | EPOLLHUP)) {
            conn_fail(c, "connect: connection failed");
            return;
        }
        conn_connected(c);
    }
    if (c->state == C_HANDSHAKE && !conn_handshake(c))
        return;
    if (c->state != C_OPEN)
        return;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        conn_read(c, events);
    if (c->fd != fd)
        return; /* --reconnect: the events were the old connection's */
    if (c->state == C_OPEN && (events & (EPOLLHUP | EPOLLERR))) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        conn_fail(c, "socket error: %s", err ? strerror(err) : "hang-up");
        return;
    }
    if (c->state == C_OPEN && g.phase == PH_RUNNING)
        conn_write(c);
}

/* ------------------------------------------------------------------------ */
/* Set-up                                                                   */

static void resolve(void)
{
    memset(&g.addr, 0, sizeof g.addr);
    if (opt.unix_path) {
        struct sockaddr_un *sun = (struct sockaddr_un *)&g.addr;
        sun->sun_family = AF_UNIX;
        strcpy(sun->sun_path, opt.unix_path);
        g.addrlen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(opt.unix_path) + 1);
        g.family = AF_UNIX;
        return;
    }
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    int rc = getaddrinfo(opt.host, opt.port, &hints, &res);
    if (rc != 0 || res == NULL) {
        fprintf(stderr, PROG ": cannot resolve %s: %s\n", opt.host, gai_strerror(rc));
        exit(2);
    }
    memcpy(&g.addr, res->ai_addr, res->ai_addrlen);
    g.addrlen = res->ai_addrlen;
    g.family = res->ai_family;
    freeaddrinfo(res);
}

static void raise_fd_limit(uint64_t need)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= need)
        return;
    rl.rlim_cur = (rl.rlim_max == RLIM_INFINITY || rl.rlim_max > need) ? need : rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur < need)
        fprintf(stderr, PROG ": warning: file descriptor limit is below %llu\n",
                (unsigned long long)need);
}

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n, size);
    if (!p) {
        fprintf(stderr, PROG ": out of memory\n");
        exit(1);
    }
    return p;
}

static void start_run(uint64_t now)
{
    g.phase = PH_RUNNING;
    g.t0 = now;
    g.measure_start = now + (uint64_t)(opt.warmup * 1e9);
    g.end = opt.duration > 0 ? g.measure_start + (uint64_t)(opt.duration * 1e9) : NEVER;
    for (uint64_t i = 0; i < g.nconns; i++)
        if (g.conns[i].state == C_OPEN)
            conn_write(&g.conns[i]);
}

static void stop_run(uint64_t now)
{
    if (g.phase == PH_RUNNING)
        g.stop_time = now < g.end ? now : g.end;
    g.phase = PH_DONE;
    for (uint64_t i = 0; i < g.nconns; i++)
        if (g.conns[i].state != C_CLOSED) {
            if (g.conns[i].state != C_OPEN && !g.conns[i].restarting)
                conn_fail(&g.conns[i], "interrupted while connecting");
            else
                conn_close(&g.conns[i]);
        }
}

static int ms_until(uint64_t now, uint64_t deadline)
{
    if (deadline == NEVER)
        return -1;
    if (deadline <= now)
        return 0;
    uint64_t ms = (deadline - now + 999999) / 1000000;
    return ms > 1000 ? 1000 : (int)ms;
}

/* ------------------------------------------------------------------------ */
/* UDP (--udp)                                                              */

struct udp_sock {
    int fd;
    uint32_t id;
    uint64_t seq;               /* the datagram in flight */
    uint64_t sent_at;
};

static void udp_datagram(uint32_t id, uint64_t seq, unsigned char *out)
{
    memcpy(out, &seq, 8);
    msg_fill(msg_seed(id, seq), 0, opt.size - 8, out + 8);
}

static void udp_send(struct udp_sock *u, uint64_t now)
{
    udp_datagram(u->id, u->seq, g.sbuf);
    g.issued++;
    u->sent_at = now;
    /* A refused or full send is a datagram the timeout will count as lost. */
    (void)send(u->fd, g.sbuf, opt.size, MSG_DONTWAIT);
}

static bool udp_measuring(uint64_t now)
{
    return now >= g.measure_start && now < g.end;
}

/* The datagram in flight is done (echoed, or lost): the next one goes. */
static void udp_next(struct udp_sock *u, uint64_t now)
{
    u->seq++;
    udp_send(u, now); /* -n counts echoes, not sends: loss must not stall it */
}

static void udp_readable(struct udp_sock *u)
{
    for (;;) {
        ssize_t n = recv(u->fd, g.rbuf, RECV_CHUNK, MSG_DONTWAIT);
        uint64_t now = now_ns();
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                errno != ECONNREFUSED)
                g.errors++;
            if (errno == EINTR || errno == ECONNREFUSED)
                continue;
            return;
        }
        uint64_t seq;
        if ((size_t)n < 8) {
            g.errors++;
            continue;
        }
        memcpy(&seq, g.rbuf, 8);
        if (seq < u->seq && (uint64_t)n == opt.size) {
            g.late++;
            continue;
        }
        udp_datagram(u->id, u->seq, g.ebuf);
        if ((uint64_t)n != opt.size || seq != u->seq || memcmp(g.rbuf, g.ebuf, opt.size) != 0) {
            g.errors++;
            continue;
        }
        if (udp_measuring(now)) {
            g.requests++;
            hist_record(&g.hist, now - u->sent_at);
        }
        udp_next(u, now);
    }
}

static void udp_close_all(struct udp_sock *socks)
{
    for (uint64_t i = 0; i < opt.connections; i++)
        close(socks[i].fd);
    free(socks);
}

/* --udp-flood: sends round robin until the end; the kernel drops what the
 * receiver has no room for, which is the receiver's loss to count. */
static int udp_flood(struct udp_sock *socks, uint64_t now)
{
    while (!interrupted && now < g.end && !(opt.requests && g.requests >= opt.requests)) {
        for (int round = 0; round < 64; round++) {
            for (uint64_t i = 0; i < opt.connections; i++) {
                struct udp_sock *u = &socks[i];
                udp_datagram(u->id, u->seq++, g.sbuf);
                if (send(u->fd, g.sbuf, opt.size, MSG_DONTWAIT) == (ssize_t)opt.size &&
                    udp_measuring(now))
                    g.requests++;
                while (recv(u->fd, g.rbuf, RECV_CHUNK, MSG_DONTWAIT) >= 0 || errno == EINTR ||
                       errno == ECONNREFUSED)
                    ; /* echoes or refusals: not what this mode measures */
            }
        }
        now = now_ns();
    }
    g.stop_time = now < g.end ? now : g.end;
    g.phase = PH_DONE;
    udp_close_all(socks);
    return 0;
}

static int run_udp(void)
{
    struct udp_sock *socks = xcalloc((size_t)opt.connections, sizeof *socks);
    uint64_t timeout_ns = (uint64_t)(opt.udp_timeout * 1e9);
    for (uint64_t i = 0; i < opt.connections; i++) {
        struct udp_sock *u = &socks[i];
        u->id = (uint32_t)i;
        u->fd = socket(g.family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (u->fd < 0 || connect(u->fd, (struct sockaddr *)&g.addr, g.addrlen) != 0) {
            perror(PROG ": udp socket");
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = u};
        if (epoll_ctl(g.epfd, EPOLL_CTL_ADD, u->fd, &ev) != 0) {
            perror(PROG ": epoll_ctl");
            return 1;
        }
        g.connected++;
    }
    uint64_t now = now_ns();
    g.t0 = now;
    g.measure_start = now + (uint64_t)(opt.warmup * 1e9);
    g.end = opt.duration > 0 ? g.measure_start + (uint64_t)(opt.duration * 1e9) : NEVER;
    g.phase = PH_RUNNING;
    if (opt.udp_flood)
        return udp_flood(socks, now);
    for (uint64_t i = 0; i < opt.connections; i++)
        udp_send(&socks[i], now);
    struct epoll_event events[MAX_EVENTS];
    while (!interrupted && now < g.end && !(opt.requests && g.requests >= opt.requests)) {
        int n = epoll_wait(g.epfd, events, MAX_EVENTS, 10);
        if (n < 0 && errno != EINTR) {
            perror(PROG ": epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++)
            udp_readable(events[i].data.ptr);
        now = now_ns();
        for (uint64_t i = 0; i < opt.connections; i++) {
            struct udp_sock *u = &socks[i];
            if (now - u->sent_at > timeout_ns) {
                if (udp_measuring(now))
                    g.lost++;
                udp_next(u, now);
            }
        }
    }
    g.stop_time = now < g.end ? now : g.end;
    g.phase = PH_DONE;
    udp_close_all(socks);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* A connection storm (--storm)                                             */

/* Every connection at once: connect, echo --size bytes in chunks of random
 * size (1..--storm-chunk, one chunk in flight: a chunk goes when the echo
 * of the one before is back in full), check every byte, close.  The clock
 * runs from the first connect() to the last close(); a connection's
 * "latency" is its whole life, from its connect() to its close(). */
struct storm_conn {
    int fd;
    uint32_t id;
    bool connecting;
    uint64_t rng;               /* xorshift64: the chunk sizes */
    uint64_t sent, echoed;      /* bytes of the stream */
    uint64_t chunk_end;         /* the chunk in flight ends here */
    uint64_t started;
};

static uint64_t storm_next_chunk(struct storm_conn *s)
{
    s->rng ^= s->rng << 13;
    s->rng ^= s->rng >> 7;
    s->rng ^= s->rng << 17;
    uint64_t n = 1 + s->rng % opt.storm_chunk;
    uint64_t left = opt.size - s->chunk_end;
    return n < left ? n : left;
}

static void storm_close(struct storm_conn *s)
{
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
    g.alive--;
}

static void storm_fail(struct storm_conn *s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    count_error(s->id, fmt, ap);
    va_end(ap);
    storm_close(s);
}

static void storm_write(struct storm_conn *s)
{
    while (s->sent < s->chunk_end) {
        size_t len = (size_t)(s->chunk_end - s->sent);
        if (len > SEND_CHUNK)
            len = SEND_CHUNK;
        msg_fill(msg_seed(s->id, 0), (size_t)s->sent, len, g.sbuf);
        ssize_t n = send(s->fd, g.sbuf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                storm_fail(s, "send: %s", strerror(errno));
            return;             /* EPOLLOUT (edge-triggered) brings us back */
        }
        s->sent += (uint64_t)n;
    }
}

static void storm_read(struct storm_conn *s)
{
    for (;;) {
        ssize_t n = recv(s->fd, g.rbuf, RECV_CHUNK, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                storm_fail(s, "recv: %s", strerror(errno));
            return;
        }
        if (n == 0) {
            storm_fail(s, "closed by the server after %llu of %llu bytes",
                      (unsigned long long)s->echoed, (unsigned long long)opt.size);
            return;
        }
        if (s->echoed + (uint64_t)n > s->sent) {
            storm_fail(s, "received %llu bytes more than were sent",
                      (unsigned long long)(s->echoed + (uint64_t)n - s->sent));
            return;
        }
        msg_fill(msg_seed(s->id, 0), (size_t)s->echoed, (size_t)n, g.ebuf);
        if (memcmp(g.ebuf, g.rbuf, (size_t)n) != 0) {
            size_t i = 0;
            while (g.ebuf[i] == g.rbuf[i])
                i++;
            storm_fail(s, "echo mismatch at offset %llu",
                      (unsigned long long)(s->echoed + i));
            return;
        }
        s->echoed += (uint64_t)n;
        if (s->echoed < s->chunk_end)
            continue;
        if (s->chunk_end == opt.size) {
            uint64_t t = now_ns();
            hist_record(&g.hist, t - s->started);
            g.requests++;
            storm_close(s);
            return;
        }
        s->chunk_end += storm_next_chunk(s);
        storm_write(s);
        if (s->fd < 0)
            return;
    }
}

static void storm_event(struct storm_conn *s, uint32_t events)
{
    if (s->fd < 0)
        return;                 /* ended earlier in this batch of events */
    if (s->connecting) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err != 0 || (events & (EPOLLERR | EPOLLHUP))) {
            storm_fail(s, "connect: %s", strerror(err ? err : ECONNRESET));
            return;
        }
        if (!(events & EPOLLOUT))
            return;
        s->connecting = false;
        g.connected++;
        s->chunk_end = storm_next_chunk(s);
        storm_write(s);
        return;
    }
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        storm_read(s);
    if (s->fd >= 0 && (events & EPOLLOUT))
        storm_write(s);
}

static int run_storm(void)
{
    struct storm_conn *conns = xcalloc((size_t)opt.connections, sizeof *conns);
    uint64_t now = now_ns();
    g.t0 = g.measure_start = now;
    g.end = now + (uint64_t)(opt.duration * 1e9);
    g.phase = PH_RUNNING;
    for (uint64_t i = 0; i < opt.connections; i++) {
        struct storm_conn *s = &conns[i];
        s->id = (uint32_t)i;
        s->rng = mix64(i + 1) | 1;
        s->started = now_ns();
        g.alive++;
        s->fd = socket(g.family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (s->fd < 0) {
            storm_fail(s, "socket: %s", strerror(errno));
            continue;
        }
        int one = 1;
        (void)setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        int rc = connect(s->fd, (struct sockaddr *)&g.addr, g.addrlen);
        if (rc < 0 && errno != EINPROGRESS && errno != EINTR) {
            storm_fail(s, "connect: %s", strerror(errno));
            continue;
        }
        s->connecting = true;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                                 .data.ptr = s};
        if (epoll_ctl(g.epfd, EPOLL_CTL_ADD, s->fd, &ev) < 0) {
            storm_fail(s, "epoll_ctl: %s", strerror(errno));
            continue;
        }
    }
    struct epoll_event events[MAX_EVENTS];
    while (g.alive > 0 && !interrupted && now < g.end) {
        int n = epoll_wait(g.epfd, events, MAX_EVENTS, ms_until(now, g.end));
        if (n < 0 && errno != EINTR) {
            perror(PROG ": epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++)
            storm_event(events[i].data.ptr, events[i].events);
        now = now_ns();
    }
    g.stop_time = now;
    g.end = NEVER;              /* report(): the storm's time, not the deadline */
    g.phase = PH_DONE;
    for (uint64_t i = 0; i < opt.connections; i++)
        if (conns[i].fd >= 0)
            storm_fail(&conns[i], "unfinished after %.1f s (%llu of %llu bytes echoed)",
                      opt.duration, (unsigned long long)conns[i].echoed,
                      (unsigned long long)opt.size);
    free(conns);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Report                                                                   */

static void report(void)
{
    double seconds = 0;
    if (g.stop_time > g.measure_start && g.t0 != 0)
        seconds = (double)(g.stop_time - g.measure_start) / 1e9;
    double rps = seconds > 0 ? (double)g.requests / seconds : 0;
    double mib_s = seconds > 0 ? (double)g.requests * (double)opt.size / seconds / 1048576.0 : 0;
    double p50 = hist_percentile(&g.hist, 50) / 1e3;
    double p90 = hist_percentile(&g.hist, 90) / 1e3;
    double p99 = hist_percentile(&g.hist, 99) / 1e3;
    double p999 = hist_percentile(&g.hist, 99.9) / 1e3;
    double max = g.hist.max / 1e3;
    double mean = g.hist.total ? (double)(g.hist.sum / g.hist.total) / 1e3 : 0;

    if (opt.json) {
        printf("{\"requests\": %llu, \"seconds\": %.6f, \"rps\": %.3f, \"mib_s\": %.3f, "
               "\"errors\": %llu, \"connections\": %llu, \"size\": %llu, \"pipeline\": %llu, "
               "\"p50_us\": %.3f, \"p90_us\": %.3f, \"p99_us\": %.3f, \"p999_us\": %.3f, "
               "\"max_us\": %.3f, \"mean_us\": %.3f, \"tls\": %s, \"reconnects\": %llu, "
               "\"udp\": %s, \"lost\": %llu, \"late\": %llu, \"flood\": %s, "
               "\"pattern\": \"%s\", \"max_read\": %llu, \"storm\": %s}\n",
               (unsigned long long)g.requests, seconds, rps, mib_s,
               (unsigned long long)g.errors, (unsigned long long)g.connected,
               (unsigned long long)opt.size, (unsigned long long)opt.pipeline,
               p50, p90, p99, p999, max, mean, opt.tls ? "true" : "false",
               (unsigned long long)g.reconnects, opt.udp ? "true" : "false",
               (unsigned long long)g.lost, (unsigned long long)g.late,
               opt.udp_flood ? "true" : "false", opt.level ? "level" : "edge",
               (unsigned long long)g.max_read, opt.storm ? "true" : "false");
        return;
    }
    if (opt.unix_path)
        printf(PROG ": unix %s", opt.unix_path);
    else
        printf(PROG ": %s %s port %s", opt.udp ? "udp" : "tcp", opt.host, opt.port);
    printf(", %llu B messages, pipeline %llu%s%s%s\n",
           (unsigned long long)opt.size, (unsigned long long)opt.pipeline,
           opt.tls ? ", TLS" : "", opt.reconnect ? ", a connection per request" : "",
           opt.storm ? ", a storm (a request is a connection, connect to close)" : "");
    printf("  connections  %llu", (unsigned long long)g.connected);
    if (g.connected != opt.connections)
        printf(" (of %llu requested)", (unsigned long long)opt.connections);
    printf("\n  duration     %.3f s", seconds);
    if (opt.warmup > 0)
        printf(" (after %.3f s warmup)", opt.warmup);
    printf("\n  requests     %llu  (%.1f req/s, %.2f MiB/s echoed)\n",
           (unsigned long long)g.requests, rps, mib_s);
    printf("  errors       %llu\n", (unsigned long long)g.errors);
    if (opt.udp)
        printf("  lost         %llu  (late echoes %llu)\n", (unsigned long long)g.lost,
               (unsigned long long)g.late);
    printf("  latency (us) mean %.1f  p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f\n",
           mean, p50, p90, p99, p999, max);
}

/* ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    parse_args(argc, argv);

    if (opt.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET((int)opt.cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0) {
            fprintf(stderr, PROG ": cannot pin to CPU %ld: %s\n", opt.cpu, strerror(errno));
            exit(2);
        }
    }

    resolve();
    raise_fd_limit(opt.connections + 16);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    if (opt.tls) {
        g.ssl_ctx = SSL_CTX_new(TLS_client_method());
        if (g.ssl_ctx == NULL) {
            fprintf(stderr, PROG ": SSL_CTX_new: %s\n", tls_error_text());
            return 1;
        }
        SSL_CTX_set_verify(g.ssl_ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_mode(g.ssl_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                                        SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    }
    g.epfd = epoll_create1(EPOLL_CLOEXEC);
    if (g.epfd < 0) {
        perror(PROG ": epoll_create1");
        return 1;
    }
    g.sbuf = xcalloc(1, SEND_CHUNK);
    g.rbuf = xcalloc(1, RECV_CHUNK);
    g.ebuf = xcalloc(1, RECV_CHUNK);
    g.budget = opt.requests ? opt.requests : NEVER;
    if (opt.udp || opt.storm) {
        int rc = opt.udp ? run_udp() : run_storm();
        report();
        free(g.sbuf);
        free(g.rbuf);
        free(g.ebuf);
        close(g.epfd);
        return (rc || g.errors > 0 || g.requests == 0) ? 1 : 0;
    }
    g.nconns = opt.connections;
    g.conns = xcalloc((size_t)g.nconns, sizeof *g.conns);
    uint64_t *tstarts = xcalloc((size_t)(g.nconns * opt.pipeline), sizeof *tstarts);
    g.budget = opt.requests ? opt.requests : NEVER;
    g.end = NEVER;
    g.phase = PH_CONNECTING;

    uint64_t now = now_ns();
    g.connect_deadline = now + (uint64_t)(opt.connect_timeout * 1e9);
    g.pending = g.nconns;
    for (uint64_t i = 0; i < g.nconns; i++) {
        struct conn *c = &g.conns[i];
        c->fd = -1;
        c->id = (uint32_t)i;
        c->state = C_IDLE;
        c->tstart = tstarts + i * opt.pipeline;
        conn_try_connect(c);
    }

    struct epoll_event events[MAX_EVENTS];
    bool retrying = false;
    while (g.phase != PH_DONE) {
        now = now_ns();
        if (g.phase == PH_CONNECTING) {
            retrying = false;
            for (uint64_t i = 0; i < g.nconns; i++)
                if (g.conns[i].state == C_RETRY) {
                    conn_try_connect(&g.conns[i]);
                    retrying |= g.conns[i].state == C_RETRY;
                }
            if (now >= g.connect_deadline)
                for (uint64_t i = 0; i < g.nconns; i++)
                    if (g.conns[i].state == C_CONNECTING || g.conns[i].state == C_RETRY)
                        conn_fail(&g.conns[i], "connect timed out");
            if (g.pending == 0) {
                if (g.alive == 0) {
                    g.phase = PH_DONE;
                    break;
                }
                start_run(now);
            }
        }
        if (g.phase == PH_RUNNING) {
            if (interrupted || now >= g.end || g.alive == 0 ||
                (g.issued >= g.budget && g.inflight == 0)) {
                stop_run(now);
                break;
            }
        } else if (interrupted) {
            stop_run(now);
            break;
        }

        int timeout = g.phase == PH_CONNECTING ? ms_until(now, g.connect_deadline)
                                               : ms_until(now, g.end);
        if (retrying && timeout != 0)
            timeout = 1;
        if (timeout < 0 || timeout > 100)
            timeout = 100;      /* to notice a signal that raced epoll_wait */
        int n = epoll_wait(g.epfd, events, MAX_EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror(PROG ": epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++)
            conn_event(events[i].data.ptr, events[i].events);
    }

    report();
    free(tstarts);
    free(g.conns);
    free(g.sbuf);
    free(g.rbuf);
    free(g.ebuf);
    if (g.session != NULL)
        SSL_SESSION_free(g.session);
    if (g.ssl_ctx != NULL)
        SSL_CTX_free(g.ssl_ctx);
    close(g.epfd);
    return (g.errors > 0 || g.requests == 0) ? 1 : 0;
}
