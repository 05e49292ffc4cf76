/* udpload: a UDP load generator for the rendezvous_load benchmark.
 *
 * It sends one fixed datagram, over and over, on sockets it inherits
 * already connected to the server under test, at a given total rate (0: as
 * fast as it can), and counts the datagrams that come back on the sockets
 * it is told to read. sendmmsg and recvmmsg move up to BATCH datagrams per
 * system call, so one process on one core offers several hundred thousand
 * datagrams a second.
 *
 *   udpload RATE DURATION DRAIN SPEC...
 *
 *   RATE      datagrams per second over all send sockets (0: unlimited)
 *   DURATION  seconds to send
 *   DRAIN     seconds to go on reading after the last send
 *   SPEC      s:FD:HEX  send HEX (the datagram, hex) on the connected FD
 *             r:FD      count what arrives on FD
 *
 * Prints one JSON line: {"sent": N, "received": N, "send_errors": N,
 * "elapsed_s": S}, elapsed being the sending time actually spent.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64
#define MAX_FDS 64
#define MAX_BYTES 2048
#define BUFFER_BYTES (4 * 1024 * 1024) /* capped by net.core.[rw]mem_max */

struct sender {
    int fd;
    unsigned char data[MAX_BYTES];
    size_t len;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int parse_hex(const char *hex, unsigned char *out, size_t *len)
{
    size_t n = strlen(hex);
    if (n % 2 || n / 2 > MAX_BYTES)
        return -1;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned int byte;
        if (sscanf(hex + 2 * i, "%2x", &byte) != 1)
            return -1;
        out[i] = (unsigned char)byte;
    }
    *len = n / 2;
    return 0;
}

static struct sender senders[MAX_FDS];
static int receivers[MAX_FDS];
static int n_senders, n_receivers;
static unsigned long long sent, received, send_errors;

static struct mmsghdr out_msgs[BATCH];
static struct iovec out_iov[BATCH];
static struct mmsghdr in_msgs[BATCH];
static struct iovec in_iov[BATCH];
static unsigned char in_buf[BATCH][MAX_BYTES];

static void send_batch(struct sender *s, int count)
{
    for (int i = 0; i < count; i++) {
        out_iov[i].iov_base = s->data;
        out_iov[i].iov_len = s->len;
        memset(&out_msgs[i].msg_hdr, 0, sizeof out_msgs[i].msg_hdr);
        out_msgs[i].msg_hdr.msg_iov = &out_iov[i];
        out_msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int done = sendmmsg(s->fd, out_msgs, count, MSG_DONTWAIT);
    if (done < 0) {
        send_errors += count;
        return;
    }
    sent += done;
    send_errors += count - done;
}

/* Reads what waits on every receive socket (bounded per call); returns
 * how many datagrams were read. */
static int drain(void)
{
    int total = 0;
    for (int r = 0; r < n_receivers; r++) {
        for (int round = 0; round < 16; round++) {
            for (int i = 0; i < BATCH; i++) {
                in_iov[i].iov_base = in_buf[i];
                in_iov[i].iov_len = MAX_BYTES;
                memset(&in_msgs[i].msg_hdr, 0, sizeof in_msgs[i].msg_hdr);
                in_msgs[i].msg_hdr.msg_iov = &in_iov[i];
                in_msgs[i].msg_hdr.msg_iovlen = 1;
            }
            int got = recvmmsg(receivers[r], in_msgs, BATCH, MSG_DONTWAIT, NULL);
            if (got <= 0)
                break;
            received += got;
            total += got;
            if (got < BATCH)
                break;
        }
    }
    return total;
}

static void wait_readable(int timeout_ms)
{
    struct pollfd fds[MAX_FDS];
    for (int r = 0; r < n_receivers; r++) {
        fds[r].fd = receivers[r];
        fds[r].events = POLLIN;
    }
    poll(fds, n_receivers, timeout_ms);
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: udpload RATE DURATION DRAIN SPEC...\n");
        return 2;
    }
    double rate = atof(argv[1]), duration = atof(argv[2]), drain_s = atof(argv[3]);
    for (int i = 4; i < argc; i++) {
        const char *spec = argv[i];
        if (spec[0] == 's' && spec[1] == ':' && n_senders < MAX_FDS) {
            struct sender *s = &senders[n_senders];
            char *rest;
            s->fd = (int)strtol(spec + 2, &rest, 10);
            if (*rest != ':' || parse_hex(rest + 1, s->data, &s->len) < 0) {
                fprintf(stderr, "udpload: bad spec %s\n", spec);
                return 2;
            }
            n_senders++;
        } else if (spec[0] == 'r' && spec[1] == ':' && n_receivers < MAX_FDS) {
            receivers[n_receivers++] = atoi(spec + 2);
        } else {
            fprintf(stderr, "udpload: bad spec %s\n", spec);
            return 2;
        }
    }
    int buffer = BUFFER_BYTES;
    for (int r = 0; r < n_receivers; r++)
        setsockopt(receivers[r], SOL_SOCKET, SO_RCVBUF, &buffer, sizeof buffer);
    for (int i = 0; i < n_senders; i++)
        setsockopt(senders[i].fd, SOL_SOCKET, SO_SNDBUF, &buffer, sizeof buffer);
    if (n_senders == 0) {
        fprintf(stderr, "udpload: nothing to send\n");
        return 2;
    }
    double start = now_s(), end = start + duration, t = start;
    int next = 0;
    while (t < end) {
        long long due = rate > 0
            ? (long long)(rate * (t - start)) - (long long)(sent + send_errors)
            : BATCH;
        if (due > 0) {
            int count = due > BATCH ? BATCH : (int)due;
            send_batch(&senders[next], count);
            next = (next + 1) % n_senders;
        }
        if (drain() == 0 && due <= 0)
            wait_readable(1);
        t = now_s();
    }
    double elapsed = t - start;
    double stop = now_s() + drain_s;
    while (now_s() < stop) {
        if (drain() == 0)
            wait_readable(10);
    }
    printf("{\"sent\": %llu, \"received\": %llu, \"send_errors\": %llu, "
           "\"elapsed_s\": %.6f}\n", sent, received, send_errors, elapsed);
    return 0;
}
