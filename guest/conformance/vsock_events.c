/* conformance.mode=count conformance.vsock=1: a virtio-vsock driver that does
 * nothing but listen on the event queue, so a host test can see what a
 * restored device tells the guest (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, virtio
 * 1.2 section 5.10.6.7).
 *
 *   conformance.vsock.buffers=N     event buffers posted (0..8, default 4)
 *   conformance.vsock.buffer_len=L  bytes each (1..16, default 8; below 4 is
 *                                   a too-short buffer, for hostile-input tests)
 *
 * Setup (once, before counting): finds the first virtio_mmio.device=SIZE@BASE:GSI
 * window whose DeviceID is 19, negotiates VERSION_1 only, sets up rx (0), tx (1)
 * and event (2) queues of min(8, QueueNumMax) entries (rx and tx stay empty),
 * posts the event buffers, DRIVER_OK. Prints "vsock: cid C, event buffers N of L
 * bytes" or "vsock: <what failed>".
 *
 * Each count tick (count_vsock_poll) reads the event queue's used ring and
 * prints one line per used entry: "vsock event: transport reset" (id 0),
 * "vsock event: unknown N", "vsock event: short, length L" (used length < 4)
 * or "vsock event: bad descriptor N", then reposts the buffer and notifies.
 * Interrupts stay off (count mode polls): the ring is the whole interface. */
#include <stddef.h>
#include <stdint.h>

#include "virtio_mmio.h"

int memcmp(const void* a, const void* b, size_t n);

#define COM1 0x3f8
#define VSOCK_DEVICE_ID 19
#define EVENT_QUEUE 2
#define MAX_BUFFER 16

static struct queue_memory vsock_queues[3];
static uint8_t event_buffers[QUEUE_SIZE][MAX_BUFFER] __attribute__((aligned(16)));
static uint64_t vsock_base;
static uint16_t event_queue_size, event_last_used, event_buffer_count;
static uint32_t event_buffer_length;
static int vsock_ready;

static inline uint32_t reg(uint32_t offset) {
    return *(volatile uint32_t*)(vsock_base + offset);
}
static inline void set_reg(uint32_t offset, uint32_t v) {
    *(volatile uint32_t*)(vsock_base + offset) = v;
}
static inline void compiler_barrier(void) {
    __asm__ volatile("" ::: "memory");
}
/* A full barrier without SSE2's mfence. */
static inline void full_barrier(void) {
    __asm__ volatile("lock orl $0, (%%rsp)" ::: "memory", "cc");
}
static inline uint8_t inb_(uint16_t port) {
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* One line in one rep outsb, as count.c prints (a capture splits at most one line). */
static void vsock_line(const char* prefix, uint64_t value, int with_value) {
    char text[96];
    size_t n = 0;
    while (*prefix && n < 64)
        text[n++] = *prefix++;
    if (with_value) {
        char digits[24];
        int d = 0;
        do {
            digits[d++] = (char)('0' + value % 10);
            value /= 10;
        } while (value);
        while (d)
            text[n++] = digits[--d];
    }
    text[n++] = '\n';
    for (int i = 0; i < 100000 && !(inb_(COM1 + 5) & 0x20); ++i) {
    }
    const char* p = text;
    __asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"((uint16_t)COM1) : "memory");
}


/* The first virtio_mmio.device= window in the MMIO gap whose DeviceID is 19. */
static uint64_t find_vsock(const char* cmdline) {
    static const char name[] = "virtio_mmio.device=";
    const size_t name_length = sizeof name - 1;
    const char* p = cmdline;
    while (*p) {
        while (*p == ' ')
            ++p;
        const char* word = p;
        while (*p && *p != ' ')
            ++p;
        if ((size_t)(p - word) <= name_length || memcmp(word, name, name_length)) continue;
        const char *v = word + name_length, *end = p;
        uint64_t size, base, gsi;
        if (!parse_number(&v, end, &size) || v >= end || *v++ != '@' ||
            !parse_number(&v, end, &base) || v >= end || *v++ != ':' ||
            !parse_number(&v, end, &gsi))
            continue;
        if (size < 0x200 || base < 0xc0000000ull || base >= 0x100000000ull) continue;
        if (*(volatile uint32_t*)(base + REG_MAGIC) != 0x74726976 ||
            *(volatile uint32_t*)(base + REG_VERSION) != 2)
            continue;
        if (*(volatile uint32_t*)(base + REG_DEVICE_ID) == VSOCK_DEVICE_ID) return base;
    }
    return 0;
}

static int setup_queue(unsigned index, uint16_t* size_out) {
    set_reg(REG_QUEUE_SEL, index);
    const uint32_t max = reg(REG_QUEUE_NUM_MAX);
    if (max == 0 || reg(REG_QUEUE_READY) != 0) return 0;
    const uint16_t size = max < QUEUE_SIZE ? (uint16_t)max : QUEUE_SIZE;
    struct queue_memory* q = &vsock_queues[index];
    const uint64_t desc = (uint64_t)q->desc, avail = (uint64_t)&q->avail_flags,
                   used = (uint64_t)&q->used_flags;
    set_reg(REG_QUEUE_NUM, size);
    set_reg(REG_QUEUE_DESC_LOW, (uint32_t)desc);
    set_reg(REG_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    set_reg(REG_QUEUE_DRIVER_LOW, (uint32_t)avail);
    set_reg(REG_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    set_reg(REG_QUEUE_DEVICE_LOW, (uint32_t)used);
    set_reg(REG_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    set_reg(REG_QUEUE_READY, 1);
    if (reg(REG_QUEUE_READY) != 1) return 0;
    *size_out = size;
    return 1;
}

/* Marks buffer `id` unwritten and makes it available again. */
static void post_event_buffer(uint16_t id) {
    volatile uint8_t* b = event_buffers[id];
    for (unsigned i = 0; i < MAX_BUFFER; ++i)
        b[i] = 0xff;
    struct queue_memory* q = &vsock_queues[EVENT_QUEUE];
    volatile uint16_t* avail_idx = &q->avail_idx;
    const uint16_t slot = *avail_idx;
    ((volatile uint16_t*)q->avail_ring)[slot % event_queue_size] = id;
    compiler_barrier(); /* x86 keeps stores in order: ring entry before index */
    *avail_idx = (uint16_t)(slot + 1);
}

void count_vsock_setup(const char* cmdline, uint64_t buffers, uint64_t buffer_length) {
    vsock_base = find_vsock(cmdline);
    if (!vsock_base) return vsock_line("vsock: no device", 0, 0);
    if (buffers > QUEUE_SIZE) buffers = QUEUE_SIZE;
    if (buffer_length == 0 || buffer_length > MAX_BUFFER) buffer_length = 8;
    set_reg(REG_STATUS, 0);
    set_reg(REG_STATUS, STATUS_ACKNOWLEDGE);
    set_reg(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    set_reg(REG_DEVICE_FEATURES_SEL, 1);
    if (!(reg(REG_DEVICE_FEATURES) & 1)) return vsock_line("vsock: no VERSION_1", 0, 0);
    set_reg(REG_DRIVER_FEATURES_SEL, 0);
    set_reg(REG_DRIVER_FEATURES, 0);
    set_reg(REG_DRIVER_FEATURES_SEL, 1);
    set_reg(REG_DRIVER_FEATURES, 1); /* VERSION_1 (bit 32) only */
    set_reg(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    if (!(reg(REG_STATUS) & STATUS_FEATURES_OK))
        return vsock_line("vsock: FEATURES_OK refused", 0, 0);
    uint16_t unused;
    if (!setup_queue(0, &unused) || !setup_queue(1, &unused) ||
        !setup_queue(EVENT_QUEUE, &event_queue_size))
        return vsock_line("vsock: queue set-up failed", 0, 0);
    if (buffers > event_queue_size) buffers = event_queue_size;
    event_buffer_count = (uint16_t)buffers;
    event_buffer_length = (uint32_t)buffer_length;
    struct queue_memory* q = &vsock_queues[EVENT_QUEUE];
    for (uint16_t i = 0; i < event_buffer_count; ++i) {
        q->desc[i].addr = (uint64_t)event_buffers[i];
        q->desc[i].len = event_buffer_length;
        q->desc[i].flags = DESC_F_WRITE;
        q->desc[i].next = 0;
        post_event_buffer(i);
    }
    set_reg(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    if (!(reg(REG_STATUS) & STATUS_DRIVER_OK)) return vsock_line("vsock: DRIVER_OK refused", 0, 0);
    full_barrier();
    if (event_buffer_count) set_reg(REG_QUEUE_NOTIFY, EVENT_QUEUE);
    event_last_used = 0;
    vsock_ready = 1;
    const uint64_t cid = *(volatile uint32_t*)(vsock_base + REG_CONFIG);
    vsock_line("vsock: cid ", cid, 1);
    vsock_line("vsock: event buffers ", event_buffer_count, 1);
    vsock_line("vsock: event buffer bytes ", event_buffer_length, 1);
}

void count_vsock_poll(void) {
    if (!vsock_ready) return;
    struct queue_memory* q = &vsock_queues[EVENT_QUEUE];
    const uint16_t used = *(volatile uint16_t*)&q->used_idx;
    compiler_barrier(); /* the index before the entries it covers */
    int reposted = 0;
    for (; event_last_used != used; ++event_last_used) {
        volatile struct vring_used_elem* e = &q->used_ring[event_last_used % event_queue_size];
        const uint32_t id = e->id, length = e->len;
        if (id >= event_buffer_count) {
            vsock_line("vsock event: bad descriptor ", id, 1);
            continue;
        }
        if (length < 4) {
            vsock_line("vsock event: short, length ", length, 1);
        } else {
            const uint32_t event = *(volatile uint32_t*)event_buffers[id];
            if (event == 0)
                vsock_line("vsock event: transport reset", 0, 0);
            else
                vsock_line("vsock event: unknown ", event, 1);
        }
        post_event_buffer((uint16_t)id);
        reposted = 1;
    }
    if (reposted) {
        full_barrier();
        set_reg(REG_QUEUE_NOTIFY, EVENT_QUEUE);
    }
}
