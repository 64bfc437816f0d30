/* The conformance guest's virtio-mmio driver (see virtio.h). One request at
 * a time per device, queues of 8 descriptors in this program's bss (guest
 * RAM, identity-mapped), plain instructions only (no SSE: the oracle must
 * run where KVM emulates only a subset). */
#include "virtio.h"

#include <stddef.h>
#include <stdint.h>

#include "virtio_mmio.h"

void* memset(void* d, int c, size_t n);
int memcmp(const void* a, const void* b, size_t n);

/* ---- output through conformance.c ---- */
static const struct virtio_console* con;
static void out(const char* s) { con->puts(s); }
static void out_hex(uint64_t v) {
    char buf[20];
    int n = 0;
    buf[n++] = '0';
    buf[n++] = 'x';
    int started = 0;
    for (int shift = 60; shift >= 0; shift -= 4) {
        unsigned d = (v >> shift) & 0xf;
        if (d || started || shift == 0) {
            buf[n++] = "0123456789abcdef"[d];
            started = 1;
        }
    }
    buf[n] = 0;
    out(buf);
}
static void out_dec(uint64_t v) {
    char buf[24];
    int n = 23;
    buf[n] = 0;
    do {
        buf[--n] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    out(buf + n);
}
static int check(int ok, const char* what) { return con->check(ok, what); }

/* ---- cmdline ---- */
static int word_value(const char* name, const char** value, size_t* length, const char** from) {
    size_t n = 0;
    while (name[n]) ++n;
    const char* p = *from;
    while (*p) {
        while (*p == ' ') ++p;
        const char* word = p;
        while (*p && *p != ' ') ++p;
        if ((size_t)(p - word) > n && !memcmp(word, name, n) && word[n] == '=') {
            *value = word + n + 1;
            *length = (size_t)(p - word) - n - 1;
            *from = p;
            return 1;
        }
    }
    *from = p;
    return 0;
}
static uint64_t param_or(const char* name, uint64_t fallback) {
    const char *v, *from = con->cmdline;
    size_t n;
    uint64_t x;
    if (!word_value(name, &v, &n, &from)) return fallback;
    const char* end = v + n;
    return parse_number(&v, end, &x) && v == end ? x : fallback;
}

/* ---- hardware access ---- */
static inline uint32_t mmio_read32(uint64_t a) { return *(volatile uint32_t*)a; }
static inline void mmio_write32(uint64_t a, uint32_t v) { *(volatile uint32_t*)a = v; }
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
/* A full barrier without SSE2's mfence. */
static inline void full_barrier(void) { __asm__ volatile("lock orl $0, (%%rsp)" ::: "memory", "cc"); }
static inline void compiler_barrier(void) { __asm__ volatile("" ::: "memory"); }

#define BLK_F_RO (1ull << 5)
#define BLK_F_BLK_SIZE (1ull << 6)
#define BLK_F_FLUSH (1ull << 9)

#define BLK_T_IN 0u
#define BLK_T_OUT 1u
#define BLK_T_FLUSH 4u
#define BLK_T_GET_ID 8u
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_S_UNSUPP 2

#define LAPIC 0xfee00000ull
#define IOAPIC 0xfec00000ull
#define VIRTIO_VECTOR 0x30
#define SPURIOUS_VECTOR 0xff

#define MAX_DEVICES 16
struct device {
    uint64_t base;
    uint32_t gsi, id;
    uint64_t features;
    uint16_t queue_size, last_used;
    volatile uint32_t interrupts;
    int ready;
};
static struct device devices[MAX_DEVICES];
static struct queue_memory queues[MAX_DEVICES];
static unsigned device_count;
static unsigned by_interrupt, by_polling, interrupts_work = 1;

/* One request buffer (one request in flight at a time). */
static struct {
    uint32_t type, reserved;
    uint64_t sector;
} __attribute__((aligned(16))) request_header;
static uint8_t request_data[4096] __attribute__((aligned(4096)));
static uint8_t expected_data[4096];
static volatile uint8_t request_status;

static uint32_t reg(const struct device* d, uint32_t offset) { return mmio_read32(d->base + offset); }
static void set_reg(const struct device* d, uint32_t offset, uint32_t v) { mmio_write32(d->base + offset, v); }

/* ---- interrupts: IDT, LAPIC, IOAPIC ---- */
void virtio_irq_entry(void);
void virtio_spurious_entry(void);
__asm__(".text\n"
        ".globl virtio_irq_entry\n"
        "virtio_irq_entry:\n"
        "  push %rax\n  push %rcx\n  push %rdx\n  push %rsi\n  push %rdi\n"
        "  push %r8\n  push %r9\n  push %r10\n  push %r11\n"
        "  cld\n"
        "  call virtio_irq_handler\n"
        "  pop %r11\n  pop %r10\n  pop %r9\n  pop %r8\n"
        "  pop %rdi\n  pop %rsi\n  pop %rdx\n  pop %rcx\n  pop %rax\n"
        "  iretq\n"
        ".globl virtio_spurious_entry\n"
        "virtio_spurious_entry:\n"
        "  iretq\n");

static volatile uint32_t irq_total;

/* Every virtio GSI shares the vector: ask each device (InterruptStatus), ack, EOI. */
void virtio_irq_handler(void) {
    ++irq_total;
    for (unsigned i = 0; i < device_count; ++i) {
        struct device* d = &devices[i];
        if (!d->ready) continue;
        uint32_t s = reg(d, REG_INTERRUPT_STATUS);
        if (s) {
            set_reg(d, REG_INTERRUPT_ACK, s);
            ++d->interrupts;
        }
    }
    mmio_write32(LAPIC + 0xb0, 0); /* EOI */
}

static struct {
    uint64_t low, high;
} idt[256] __attribute__((aligned(16)));

static void set_gate(unsigned vector, void (*entry)(void), uint16_t cs) {
    uint64_t a = (uint64_t)entry;
    idt[vector].low = (a & 0xffff) | ((uint64_t)cs << 16) | (0x8eull << 40) /* present, interrupt gate */
                      | ((a >> 16) & 0xffff) << 48;
    idt[vector].high = a >> 32;
}

static void ioapic_write(uint32_t index, uint32_t value) {
    mmio_write32(IOAPIC, index);
    mmio_write32(IOAPIC + 0x10, value);
}

static void setup_interrupts(void) {
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    set_gate(VIRTIO_VECTOR, virtio_irq_entry, cs);
    set_gate(SPURIOUS_VECTOR, virtio_spurious_entry, cs);
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } descriptor = {sizeof idt - 1, (uint64_t)idt};
    __asm__ volatile("lidt %0" ::"m"(descriptor));
    /* The legacy PIC stays out: all lines masked, and LINT0 (ExtINT) masked. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    mmio_write32(LAPIC + 0x350, 1u << 16);
    mmio_write32(LAPIC + 0x80, 0);                          /* TPR: accept everything */
    mmio_write32(LAPIC + 0xf0, 0x100 | SPURIOUS_VECTOR);    /* software-enable the LAPIC */
    uint32_t apic_id = mmio_read32(LAPIC + 0x20) >> 24;
    /* conformance.virtio.irq=0: leave the IOAPIC pins masked, so the oracle
     * shows it tells interrupts from polling (every completion is polled). */
    if (param_or("conformance.virtio.irq", 1) == 0) {
        out("virtio: IOAPIC pins left masked (conformance.virtio.irq=0)\n");
        return;
    }
    for (unsigned i = 0; i < device_count; ++i) {
        uint32_t pin = devices[i].gsi;
        if (pin > 23) continue;
        /* Edge, active high, fixed delivery, physical destination: this CPU. */
        ioapic_write(0x11 + 2 * pin, apic_id << 24);
        ioapic_write(0x10 + 2 * pin, VIRTIO_VECTOR);
    }
}

/* ---- device discovery: virtio_mmio.device=SIZE@BASE:GSI ---- */
static void find_devices(void) {
    const char *v, *from = con->cmdline;
    size_t n;
    while (device_count < MAX_DEVICES && word_value("virtio_mmio.device", &v, &n, &from)) {
        const char* end = v + n;
        uint64_t size, base, gsi;
        if (!parse_number(&v, end, &size) || v >= end || *v++ != '@' || !parse_number(&v, end, &base) ||
            v >= end || *v++ != ':' || !parse_number(&v, end, &gsi)) {
            check(0, "virtio_mmio.device= entry parses");
            continue;
        }
        if (size < 0x200 || base < 0x100000000ull - 0x40000000ull || base >= 0x100000000ull || gsi > 23) {
            check(0, "virtio_mmio.device= window in the MMIO gap, GSI <= 23");
            continue;
        }
        struct device* d = &devices[device_count++];
        d->base = base;
        d->gsi = (uint32_t)gsi;
    }
}

/* ---- device initialisation (virtio 1.2 section 3.1.1) ---- */
static uint64_t device_features(const struct device* d) {
    set_reg(d, REG_DEVICE_FEATURES_SEL, 0);
    uint64_t low = reg(d, REG_DEVICE_FEATURES);
    set_reg(d, REG_DEVICE_FEATURES_SEL, 1);
    return low | ((uint64_t)reg(d, REG_DEVICE_FEATURES) << 32);
}
static void write_driver_features(const struct device* d, uint64_t f) {
    set_reg(d, REG_DRIVER_FEATURES_SEL, 0);
    set_reg(d, REG_DRIVER_FEATURES, (uint32_t)f);
    set_reg(d, REG_DRIVER_FEATURES_SEL, 1);
    set_reg(d, REG_DRIVER_FEATURES, (uint32_t)(f >> 32));
}
static void reset_device(const struct device* d) {
    set_reg(d, REG_STATUS, 0);
    set_reg(d, REG_STATUS, STATUS_ACKNOWLEDGE);
    set_reg(d, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
}
/* Try FEATURES_OK with `features`; returns whether the device kept it. */
static int offer_features(const struct device* d, uint64_t features) {
    write_driver_features(d, features);
    set_reg(d, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    return (reg(d, REG_STATUS) & STATUS_FEATURES_OK) != 0;
}

static int negotiation_refusals_checked;

static int bring_up(struct device* d, uint64_t wanted) {
    set_reg(d, REG_STATUS, 0);
    if (!check(reg(d, REG_STATUS) == 0, "virtio: status reads 0 after reset")) return 0;
    reset_device(d);
    uint64_t offered = device_features(d);
    d->features = offered;
    check((offered & F_VERSION_1) != 0, "virtio: device offers VERSION_1");
    if (!negotiation_refusals_checked) {
        negotiation_refusals_checked = 1;
        /* The device must refuse what it did not offer, and a driver without VERSION_1. */
        uint64_t stray = 0;
        for (unsigned bit = 0; bit < 64 && !stray; ++bit)
            if (!(offered & (1ull << bit))) stray = 1ull << bit;
        check(!offer_features(d, F_VERSION_1 | stray), "virtio: FEATURES_OK refused for a feature not offered");
        reset_device(d);
        check(!offer_features(d, 0), "virtio: FEATURES_OK refused without VERSION_1");
        reset_device(d);
    }
    uint64_t accepted = offered & (wanted | F_VERSION_1);
    if (!check(offer_features(d, accepted), "virtio: FEATURES_OK accepted")) return 0;
    d->features = accepted;

    set_reg(d, REG_QUEUE_SEL, 0);
    uint32_t max = reg(d, REG_QUEUE_NUM_MAX);
    check(max >= 1, "virtio: queue 0 exists (QueueNumMax > 0)");
    check(reg(d, REG_QUEUE_READY) == 0, "virtio: queue 0 not ready before set-up");
    d->queue_size = max < QUEUE_SIZE ? (uint16_t)max : QUEUE_SIZE;
    unsigned index = (unsigned)(d - devices);
    struct queue_memory* q = &queues[index];
    memset(q, 0, sizeof *q);
    d->last_used = 0;
    uint64_t desc = (uint64_t)q->desc, avail = (uint64_t)&q->avail_flags, used = (uint64_t)&q->used_flags;
    set_reg(d, REG_QUEUE_NUM, d->queue_size);
    set_reg(d, REG_QUEUE_DESC_LOW, (uint32_t)desc);
    set_reg(d, REG_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    set_reg(d, REG_QUEUE_DRIVER_LOW, (uint32_t)avail);
    set_reg(d, REG_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    set_reg(d, REG_QUEUE_DEVICE_LOW, (uint32_t)used);
    set_reg(d, REG_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    set_reg(d, REG_QUEUE_READY, 1);
    if (!check(reg(d, REG_QUEUE_READY) == 1, "virtio: queue 0 ready")) return 0;
    set_reg(d, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    if (!check(reg(d, REG_STATUS) & STATUS_DRIVER_OK, "virtio: DRIVER_OK set")) return 0;
    d->ready = 1;
    return 1;
}

/* ---- one request: descriptors 0..n-1, head 0 ---- */
struct buffer {
    void* address;
    uint32_t length;
    int device_writes;
};

/* In TSC cycles (a few GHz): generous, because the TSC runs on while a
 * loaded host deschedules the device's thread between its used-ring write
 * and its irqfd write; the cost is paid only when something is wrong. */
#define REQUEST_TIMEOUT_CYCLES 20000000000ull /* ~5-10 s */
#define INTERRUPT_GRACE_CYCLES 3000000000ull  /* ~1 s */

/* Returns the used length, or -1 on timeout / a wrong head. */
static int64_t transfer(struct device* d, const struct buffer* b, unsigned n) {
    struct queue_memory* q = &queues[d - devices];
    for (unsigned i = 0; i < n; ++i) {
        q->desc[i].addr = (uint64_t)b[i].address;
        q->desc[i].len = b[i].length;
        q->desc[i].flags = (uint16_t)((i + 1 < n ? DESC_F_NEXT : 0) | (b[i].device_writes ? DESC_F_WRITE : 0));
        q->desc[i].next = (uint16_t)(i + 1 < n ? i + 1 : 0);
    }
    uint32_t interrupts_before = d->interrupts;
    q->avail_ring[q->avail_idx % d->queue_size] = 0;
    compiler_barrier(); /* x86 keeps stores in order: the entry before the index */
    ++q->avail_idx;
    full_barrier();
    set_reg(d, REG_QUEUE_NOTIFY, 0);

    __asm__ volatile("sti");
    uint64_t start = rdtsc(), used_at = 0;
    int by = 0; /* 1 interrupt, 2 polling */
    for (;;) {
        int used = *(volatile uint16_t*)&q->used_idx != d->last_used;
        int interrupted = d->interrupts != interrupts_before;
        uint64_t now = rdtsc();
        if (used && !used_at) used_at = now;
        if (used && interrupted) {
            by = 1;
            break;
        }
        if (used && (!interrupts_work || now - used_at > INTERRUPT_GRACE_CYCLES)) {
            by = 2;
            break;
        }
        if (!used && now - start > REQUEST_TIMEOUT_CYCLES) break;
        __asm__ volatile("pause");
    }
    __asm__ volatile("cli");
    if (!by) {
        check(0, "virtio: request completed (used ring) before the timeout");
        return -1;
    }
    if (by == 1) {
        ++by_interrupt;
    } else {
        ++by_polling;
        if (interrupts_work) out("virtio: a completion came without an interrupt; polling from now on\n");
        interrupts_work = 0;
    }
    compiler_barrier();
    struct vring_used_elem e = q->used_ring[d->last_used % d->queue_size];
    ++d->last_used;
    if (e.id != 0) { /* counted only when wrong: one line per request would drown the log */
        check(0, "virtio: used ring returns our head");
        return -1;
    }
    return e.len;
}

/* ---- checksums and the pattern the host recomputes ---- */
static uint64_t fnv1a(const uint8_t* p, uint64_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint64_t i = 0; i < n; ++i) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}
/* Byte i of the pattern written to blk device `disk` (splitmix64 of seed, disk, i). */
static uint8_t pattern_byte(uint64_t seed, unsigned disk, uint64_t i) {
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + (uint64_t)disk * 0x100000001b3ull + i;
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return (uint8_t)x;
}

/* ---- virtio-blk ---- */
static int blk_request(struct device* d, uint32_t type, uint64_t sector, void* data, uint32_t length,
                       int device_writes) {
    request_header.type = type;
    request_header.reserved = 0;
    request_header.sector = sector;
    request_status = 0xee;
    struct buffer b[4];
    unsigned n = 0;
    b[n++] = (struct buffer){&request_header, sizeof request_header, 0};
    if (length > 1024) { /* two data descriptors: a chain longer than three */
        b[n++] = (struct buffer){data, length / 2, device_writes};
        b[n++] = (struct buffer){(uint8_t*)data + length / 2, length - length / 2, device_writes};
    } else if (length) {
        b[n++] = (struct buffer){data, length, device_writes};
    }
    b[n++] = (struct buffer){(void*)&request_status, 1, 1};
    if (transfer(d, b, n) < 0) return -1;
    return request_status;
}

static uint64_t blk_capacity(const struct device* d) {
    uint32_t generation, low, high;
    do {
        generation = reg(d, REG_CONFIG_GENERATION);
        low = reg(d, REG_CONFIG);
        high = reg(d, REG_CONFIG + 4);
    } while (generation != reg(d, REG_CONFIG_GENERATION));
    return low | ((uint64_t)high << 32);
}

static void run_blk(struct device* d, unsigned disk) {
    if (!bring_up(d, BLK_F_RO | BLK_F_BLK_SIZE | BLK_F_FLUSH)) return;
    uint64_t capacity = blk_capacity(d);
    int read_only = (d->features & BLK_F_RO) != 0;
    char id[21];
    memset(id, 0, sizeof id);
    int status = blk_request(d, BLK_T_GET_ID, 0, id, 20, 1); /* before the line: it may print */
    out("virtio-blk ");
    out_dec(disk);
    out(": features ");
    out_hex(d->features);
    out(", capacity ");
    out_dec(capacity);
    out(" sectors, ro ");
    out_dec((uint64_t)read_only);

    for (int i = 0; i < 20 && id[i]; ++i)
        if (id[i] < 32 || id[i] > 126 || id[i] == '\'') id[i] = '.';
    out(", id '");
    out(id);
    out("'\n");
    check(status == BLK_S_OK, "virtio-blk: GET_ID answered");

    const uint64_t sectors = sizeof request_data / 512;
    uint64_t first = param_or("conformance.virtio.sector", 8);
    if (!check(capacity >= sectors && first <= capacity - sectors, "virtio-blk: disk large enough for the test"))
        return;

    /* What is there before we write: the host knows the file. */
    status = blk_request(d, BLK_T_IN, 0, request_data, sizeof request_data, 1);
    check(status == BLK_S_OK, "virtio-blk: read of sectors 0..7");
    out("virtio-blk ");
    out_dec(disk);
    out(": sectors 0..7 before fnv ");
    out_hex(fnv1a(request_data, sizeof request_data));
    out("\n");

    /* Past the end: an I/O error, not a crash. */
    status = blk_request(d, BLK_T_IN, capacity, request_data, 512, 1);
    check(status == BLK_S_IOERR, "virtio-blk: a read past the capacity answers IOERR");

    uint64_t seed = param_or("conformance.virtio.seed", 1);
    for (uint64_t i = 0; i < sizeof request_data; ++i)
        request_data[i] = expected_data[i] = pattern_byte(seed, disk, i);
    status = blk_request(d, BLK_T_OUT, first, request_data, sizeof request_data, 0);
    out("virtio-blk ");
    out_dec(disk);
    if (read_only) {
        out(": write refused, status ");
        out_dec((uint64_t)(status & 0xff));
        out("\n");
        check(status == BLK_S_IOERR || status == BLK_S_UNSUPP, "virtio-blk: read-only disk refuses a write");
    } else {
        out(": write status ");
        out_dec((uint64_t)(status & 0xff));
        out("\n");
        check(status == BLK_S_OK, "virtio-blk: write accepted");
        if (d->features & BLK_F_FLUSH)
            check(blk_request(d, BLK_T_FLUSH, 0, 0, 0, 1) == BLK_S_OK, "virtio-blk: flush");
    }
    memset(request_data, 0, sizeof request_data);
    status = blk_request(d, BLK_T_IN, first, request_data, sizeof request_data, 1);
    check(status == BLK_S_OK, "virtio-blk: read back");
    int equal = !memcmp(request_data, expected_data, sizeof request_data);
    out("virtio-blk ");
    out_dec(disk);
    out(": sectors ");
    out_dec(first);
    out("..");
    out_dec(first + sectors - 1);
    out(read_only ? " after refused write" : (equal ? " read back equal" : " read back DIFFERENT"));
    out(", fnv ");
    out_hex(fnv1a(request_data, sizeof request_data));
    out("\n");
    if (read_only)
        check(!equal, "virtio-blk: read-only disk unchanged by the refused write");
    else
        check(equal, "virtio-blk: read back what was written");
}

/* ---- virtio-rng ---- */
static void run_rng(struct device* d, unsigned index) {
    if (!bring_up(d, 0)) return;
    uint8_t bytes[32];
    memset(bytes, 0, sizeof bytes);
    struct buffer b = {bytes, sizeof bytes, 1};
    int64_t n = transfer(d, &b, 1);
    check(n == (int64_t)sizeof bytes, "virtio-rng: 32 bytes returned");
    int nonzero = 0;
    char hex[2 * sizeof bytes + 1];
    for (unsigned i = 0; i < sizeof bytes; ++i) {
        nonzero |= bytes[i];
        hex[2 * i] = "0123456789abcdef"[bytes[i] >> 4];
        hex[2 * i + 1] = "0123456789abcdef"[bytes[i] & 15];
    }
    hex[2 * sizeof bytes] = 0;
    out("virtio-rng ");
    out_dec(index);
    out(": ");
    out(hex);
    out("\n");
    check(nonzero, "virtio-rng: bytes not all zero");
}

void virtio_conformance(const struct virtio_console* console) {
    con = console;
    find_devices();
    check(device_count > 0, "virtio: cmdline names virtio-mmio devices");
    for (unsigned i = 0; i < device_count; ++i) {
        struct device* d = &devices[i];
        uint32_t magic = reg(d, REG_MAGIC), version = reg(d, REG_VERSION);
        d->id = reg(d, REG_DEVICE_ID);
        out("virtio: device ");
        out_dec(i);
        out(" at ");
        out_hex(d->base);
        out(" gsi ");
        out_dec(d->gsi);
        out(": id ");
        out_dec(d->id);
        out(d->id == 2 ? " (blk)\n" : d->id == 4 ? " (rng)\n" : d->id == 0 ? " (empty slot)\n" : "\n");
        check(magic == 0x74726976, "virtio: magic 'virt'");
        check(version == 2, "virtio: version 2 (modern)");
    }
    setup_interrupts();
    unsigned disks = 0, rngs = 0;
    for (unsigned i = 0; i < device_count; ++i) {
        struct device* d = &devices[i];
        if (d->id == 2) run_blk(d, disks++);
        else if (d->id == 4) run_rng(d, rngs++);
    }
    for (unsigned i = 0; i < device_count; ++i)
        if (devices[i].ready) set_reg(&devices[i], REG_STATUS, 0);
    out("virtio: blk ");
    out_dec(disks);
    out(", rng ");
    out_dec(rngs);
    out(", completions by interrupt ");
    out_dec(by_interrupt);
    out(", by polling ");
    out_dec(by_polling);
    out(", interrupts ");
    out_dec(irq_total);
    out("\n");
}
