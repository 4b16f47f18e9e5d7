/*
 * synlb-cref: the benchmark's reference NFQUEUE worker, in C.
 *
 * It does the job of synlb's Python worker (plugin/synlb/worker.py) on its
 * normal path and nothing more: read a queued packet, build the flow key,
 * hash it with the same keyed BLAKE2b (8-byte digest, person "synlb-flow"),
 * look the slot up in the same mark table, and accept the packet with that
 * mark. Same netlink pattern too (one recv and one verdict per packet, the
 * same copy range and queue length), so that the benchmark's ratio of the
 * two workers' CPU per new connection is the cost of Python, not of a
 * different design. It does not follow pins, reload, publish counters while
 * running or rotate logs: it is a yardstick, not a product.
 *
 * With --slot-base BASE it does the job of a worker of flow_hash = jhash
 * instead: the kernel has put the flow's Maglev slot in the packet's mark
 * (BASE + slot), so it looks that slot up, keeps a mark that is no slot
 * (the connection's own), and hashes only a packet that came with neither.
 *
 * Usage:
 *   synlb-cref --queue N --marks FILE --key FILE [--copy-range B] [--maxlen N] [--slot-base BASE]
 *       FILE (marks): the table's slots, one uint32 mark per slot, little
 *       endian (the benchmark writes it from synlb's own Maglev table).
 *       FILE (key): the hash_key's bytes (at most 64 are used, as synlb does).
 *       Prints "bound" once the queue is bound; on SIGTERM or SIGINT prints one
 *       JSON line of counters and exits 0.
 *   synlb-cref --hash KEYFILE HEX
 *       Prints the 64-bit flow hash of the flow key HEX (big-endian digest as
 *       a decimal number): the benchmark's check that both workers hash alike.
 *
 * Built at bench time: gcc -O2 synlb-cref.c $(pkg-config --cflags --libs
 * libnetfilter_queue libb2).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <blake2.h>
#include <errno.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <linux/netfilter.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define FLOW_PERSON "synlb-flow"
#define MAX_KEY_BYTES 64
#define BUFFER_SIZE 4096 /* netfilterqueue's receive buffer */
#define MAX_MARKS 1000003

static blake2b_state keyed; /* the hash state that has absorbed the key */
static uint32_t *marks;
static uint32_t nslots;
static uint64_t hashed, fallback, nomark, slotted, kept;
static uint32_t slot_base; /* 0: hash every packet (flow_hash = blake2b) */
static volatile sig_atomic_t stopping;

static int is_port_protocol(uint8_t p)
{
    return p == 6 || p == 17 || p == 33 || p == 132 || p == 136;
}

/* The flow key of packet.py on the common paths: IPv4 without options or
 * fragmentation, IPv6 with a port protocol right after the fixed header.
 * Anything else hashes its addresses (or the packet's first bytes), which
 * the benchmark's traffic never needs. Returns the key's length. */
static size_t flow_key(const uint8_t *p, size_t n, uint8_t *key)
{
    if (n >= 24 && p[0] == 0x45 && !((p[6] & 0x3F) || p[7]) && is_port_protocol(p[9])) {
        key[0] = 4;
        key[1] = p[9];
        memcpy(key + 2, p + 12, 12);
        return 14;
    }
    if (n >= 20 && (p[0] >> 4) == 4) {
        key[0] = 4;
        key[1] = p[9];
        memcpy(key + 2, p + 12, 8);
        return 10;
    }
    if (n >= 44 && (p[0] >> 4) == 6 && is_port_protocol(p[6])) {
        key[0] = 6;
        key[1] = p[6];
        memcpy(key + 2, p + 8, 32);
        memcpy(key + 34, p + 40, 4);
        return 38;
    }
    if (n >= 40 && (p[0] >> 4) == 6) {
        key[0] = 6;
        key[1] = p[6];
        memcpy(key + 2, p + 8, 32);
        return 34;
    }
    fallback++;
    key[0] = 0;
    size_t k = n < 40 ? n : 40;
    memcpy(key + 1, p, k);
    return k + 1;
}

static uint64_t flow_hash(const uint8_t *key, size_t len)
{
    blake2b_state s = keyed;
    uint8_t d[8];
    blake2b_update(&s, key, len);
    blake2b_final(&s, d, sizeof d);
    uint64_t h = 0;
    for (int i = 0; i < 8; i++)
        h = (h << 8) | d[i];
    return h;
}

/* Python's blake2b(key=K, digest_size=8, person=P): the parameter block,
 * then the key zero-padded to one whole block. */
static int init_keyed(const uint8_t *key, size_t keylen)
{
    blake2b_param P;
    memset(&P, 0, sizeof P);
    if (keylen > MAX_KEY_BYTES)
        keylen = MAX_KEY_BYTES;
    P.digest_length = 8;
    P.key_length = (uint8_t)keylen;
    P.fanout = 1;
    P.depth = 1;
    memcpy(P.personal, FLOW_PERSON, strlen(FLOW_PERSON));
    if (blake2b_init_param(&keyed, &P) < 0)
        return -1;
    if (keylen) {
        uint8_t block[BLAKE2B_BLOCKBYTES];
        memset(block, 0, sizeof block);
        memcpy(block, key, keylen);
        blake2b_update(&keyed, block, sizeof block);
    }
    return 0;
}

static uint8_t *read_file(const char *path, size_t *len, size_t max)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "synlb-cref: %s: %s\n", path, strerror(errno));
        return NULL;
    }
    uint8_t *buf = malloc(max + 1);
    size_t n = buf ? fread(buf, 1, max + 1, f) : 0;
    fclose(f);
    if (!buf || n > max) {
        fprintf(stderr, "synlb-cref: %s: larger than %zu bytes\n", path, max);
        free(buf);
        return NULL;
    }
    *len = n;
    return buf;
}

static int on_packet(struct nfq_q_handle *qh, struct nfgenmsg *msg, struct nfq_data *nfa, void *data)
{
    (void)msg;
    (void)data;
    struct nfqnl_msg_packet_hdr *ph = nfq_get_msg_packet_hdr(nfa);
    if (!ph)
        return 0;
    uint32_t id = ntohl(ph->packet_id);
    if (slot_base) {
        uint32_t m = nfq_get_nfmark(nfa);
        uint32_t slot = m - slot_base;
        if (m && slot >= (1u << 20)) { /* the connection's own mark: it stays */
            kept++;
            return nfq_set_verdict(qh, id, NF_ACCEPT, 0, NULL);
        }
        if (m && slot < nslots) {
            slotted++;
            return nfq_set_verdict2(qh, id, NF_ACCEPT, marks[slot], 0, NULL);
        }
    }
    unsigned char *payload;
    int n = nfq_get_payload(nfa, &payload);
    uint8_t key[64];
    size_t klen = flow_key(payload, n > 0 ? (size_t)n : 0, key);
    if (!nslots) {
        nomark++;
        return nfq_set_verdict(qh, id, NF_DROP, 0, NULL);
    }
    uint32_t mark = marks[flow_hash(key, klen) % nslots];
    hashed++;
    return nfq_set_verdict2(qh, id, NF_ACCEPT, mark, 0, NULL);
}

static void on_stop(int sig)
{
    (void)sig;
    stopping = 1;
}

static int hash_mode(const char *keyfile, const char *hex)
{
    size_t keylen, n = strlen(hex);
    uint8_t *key = read_file(keyfile, &keylen, 4096);
    uint8_t flow[64];
    if (!key || n % 2 || n / 2 > sizeof flow)
        return 2;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1)
            return 2;
        flow[i] = (uint8_t)v;
    }
    if (init_keyed(key, keylen) < 0)
        return 1;
    printf("%llu\n", (unsigned long long)flow_hash(flow, n / 2));
    return 0;
}

int main(int argc, char **argv)
{
    const char *marks_path = NULL, *key_path = NULL;
    long queue = -1, copy_range = 256, maxlen = 4096;
    if (argc == 4 && !strcmp(argv[1], "--hash"))
        return hash_mode(argv[2], argv[3]);
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--queue"))
            queue = strtol(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--marks"))
            marks_path = argv[i + 1];
        else if (!strcmp(argv[i], "--key"))
            key_path = argv[i + 1];
        else if (!strcmp(argv[i], "--copy-range"))
            copy_range = strtol(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--maxlen"))
            maxlen = strtol(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--slot-base"))
            slot_base = (uint32_t)strtoul(argv[i + 1], NULL, 0);
        else {
            fprintf(stderr, "synlb-cref: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (queue < 0 || queue > 65535 || !marks_path || !key_path || copy_range < 1 || maxlen < 1) {
        fprintf(stderr, "usage: synlb-cref --queue N --marks FILE --key FILE [--copy-range B] [--maxlen N]\n");
        return 2;
    }
    size_t keylen, mlen;
    uint8_t *key = read_file(key_path, &keylen, 4096);
    uint8_t *raw = read_file(marks_path, &mlen, (size_t)MAX_MARKS * 4);
    if (!key || !raw || mlen % 4) {
        fprintf(stderr, "synlb-cref: bad key or marks file\n");
        return 2;
    }
    nslots = (uint32_t)(mlen / 4);
    marks = malloc(mlen ? mlen : 4);
    for (uint32_t i = 0; i < nslots; i++)
        marks[i] = (uint32_t)raw[4 * i] | (uint32_t)raw[4 * i + 1] << 8 | (uint32_t)raw[4 * i + 2] << 16 |
                   (uint32_t)raw[4 * i + 3] << 24;
    free(raw);
    if (init_keyed(key, keylen) < 0) {
        fprintf(stderr, "synlb-cref: blake2b init failed\n");
        return 1;
    }

    struct nfq_handle *h = nfq_open();
    if (!h) {
        fprintf(stderr, "synlb-cref: nfq_open: %s\n", strerror(errno));
        return 1;
    }
    struct nfq_q_handle *qh = nfq_create_queue(h, (uint16_t)queue, on_packet, NULL);
    if (!qh) {
        fprintf(stderr, "synlb-cref: cannot bind queue %ld: %s\n", queue, strerror(errno));
        nfq_close(h);
        return 1;
    }
    if (copy_range > BUFFER_SIZE - 80)
        copy_range = BUFFER_SIZE - 80;
    if (nfq_set_mode(qh, NFQNL_COPY_PACKET, (unsigned)copy_range) < 0 ||
        nfq_set_queue_maxlen(qh, (uint32_t)maxlen) < 0) {
        fprintf(stderr, "synlb-cref: cannot set copy mode or queue length\n");
        nfq_destroy_queue(qh);
        nfq_close(h);
        return 1;
    }
    nfnl_rcvbufsiz(nfq_nfnlh(h), 4096u * BUFFER_SIZE / 2);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop; /* no SA_RESTART: recv returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    printf("bound\n");
    fflush(stdout);

    int fd = nfq_fd(h);
    char buf[BUFFER_SIZE] __attribute__((aligned));
    uint64_t recv_errors = 0;
    while (!stopping) {
        ssize_t rv = recv(fd, buf, sizeof buf, 0);
        if (rv < 0) {
            if (errno != EINTR)
                recv_errors++; /* ENOBUFS: the kernel dropped some; go on */
            continue;
        }
        nfq_handle_packet(h, buf, (int)rv);
    }
    nfq_destroy_queue(qh);
    nfq_close(h);
    printf("{\"hashed\": %llu, \"fallback\": %llu, \"no_target\": %llu, \"recv_errors\": %llu, "
           "\"slotted\": %llu, \"kept\": %llu}\n",
           (unsigned long long)hashed, (unsigned long long)fallback, (unsigned long long)nomark,
           (unsigned long long)recv_errors, (unsigned long long)slotted, (unsigned long long)kept);
    return 0;
}
