/* conformance.mode=count: count forever, in memory and on the console.
 *
 *   conformance.touch_mib=M   first write M MiB from 64 MiB up (one distinct
 *                             non-zero qword per page), then read one qword of
 *                             every such page on each tick: the guest's
 *                             working set, for snapshot size and restore cost
 *   conformance.every=N       spin N register-only loop iterations per tick
 *                             (default 1000: ~6 ms on kvm_pvm, which runs
 *                             this guest at ~6 us per loop iteration)
 *
 * Prints "count: at 0x<address of the counter>" once, then "count=<n>" on every
 * tick (n = 1, 2, ...). A snapshot restored later must continue with the next
 * n: no reset to 0, no gap. General-purpose instructions only (kvm_pvm).
 *
 *   conformance.vsock=1       also drive a virtio-vsock's event queue and print
 *                             what arrives there before each tick's line
 *                             (vsock_events.c) */
#include <stddef.h>
#include <stdint.h>

#define COM1 0x3f8
#define TOUCH_BASE (64ull << 20)

static inline void count_outb(uint16_t port, uint8_t v) {
    __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port));
}
static inline uint8_t count_inb(uint16_t port) {
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* One line, sent like conformance.c does: wait for THRE, one rep outsb. */
static void count_line(const char* text, size_t length) {
    for (int i = 0; i < 100000 && !(count_inb(COM1 + 5) & 0x20); ++i) {
    }
    __asm__ volatile("rep outsb" : "+S"(text), "+c"(length) : "d"((uint16_t)COM1) : "memory");
}

static size_t count_format(char* out, const char* prefix, uint64_t v, int hex) {
    size_t n = 0;
    while (*prefix) out[n++] = *prefix++;
    char digits[24];
    int d = 0;
    const unsigned base = hex ? 16 : 10;
    do {
        digits[d++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    while (d) out[n++] = digits[--d];
    out[n++] = '\n';
    return n;
}

/* In guest RAM (.bss): the host reads it from a snapshot. */
volatile uint64_t conformance_counter;
volatile uint64_t conformance_touch_sum;

void count_vsock_poll(void); /* vsock_events.c: nothing unless conformance.vsock=1 */

void conformance_count(uint64_t touch_mib, uint64_t every) {
    char line[64];
    if (every == 0) every = 1000;
    count_line(line, count_format(line, "count: at 0x", (uint64_t)&conformance_counter, 1));
    const uint64_t pages = (touch_mib << 20) / 4096;
    for (uint64_t p = 0; p < pages; ++p)
        *(volatile uint64_t*)(TOUCH_BASE + p * 4096) = 0x5a5a000000000000ull | (p + 1);
    if (pages) count_line(line, count_format(line, "count: touched MiB ", touch_mib, 0));
    for (;;) {
        uint64_t sum = 0;
        for (uint64_t p = 0; p < pages; ++p) sum += *(volatile uint64_t*)(TOUCH_BASE + p * 4096);
        conformance_touch_sum = sum;
        /* A register-only spin: on kvm_pvm a store to the stack page in a
         * loop can trap on every iteration (~20 us) under shadow paging. */
        for (uint64_t i = 0; i < every; ++i) __asm__ volatile("" : "+r"(i));
        count_vsock_poll();
        const uint64_t n = conformance_counter + 1;
        conformance_counter = n;
        count_line(line, count_format(line, "count=", n, 0));
    }
}
