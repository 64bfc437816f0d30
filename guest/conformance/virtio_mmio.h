/* The virtio-mmio (version 2) register map and the split virtqueue layout
 * (virtio 1.2 sections 4.2.2 and 2.7), shared by the conformance guest's
 * drivers (virtio.c: blk and rng; vsock_events.c: the vsock event queue). */
#ifndef CONFORMANCE_VIRTIO_MMIO_H
#define CONFORMANCE_VIRTIO_MMIO_H

#include <stdint.h>

#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_INTERRUPT_STATUS 0x060
#define REG_INTERRUPT_ACK 0x064
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_CONFIG_GENERATION 0x0fc
#define REG_CONFIG 0x100

#define STATUS_ACKNOWLEDGE 1u
#define STATUS_DRIVER 2u
#define STATUS_DRIVER_OK 4u
#define STATUS_FEATURES_OK 8u

#define F_VERSION_1 (1ull << 32)

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

/* ---- split virtqueue, 8 entries ---- */
#define QUEUE_SIZE 8
struct vring_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
struct vring_used_elem {
    uint32_t id;
    uint32_t len;
};
/* desc at 0 (16-aligned), avail at 128 (2-aligned), used at 152 (4-aligned). */
struct queue_memory {
    struct vring_desc desc[QUEUE_SIZE];
    uint16_t avail_flags, avail_idx, avail_ring[QUEUE_SIZE], used_event;
    uint16_t pad;
    uint16_t used_flags, used_idx;
    struct vring_used_elem used_ring[QUEUE_SIZE];
    uint16_t avail_event;
} __attribute__((aligned(256)));
_Static_assert(__builtin_offsetof(struct queue_memory, avail_flags) == 128, "avail ring offset");
_Static_assert(__builtin_offsetof(struct queue_memory, used_flags) == 152, "used ring offset");

/* Parses a number (0x.. hex or decimal) at *p, advancing it: the SIZE, BASE
 * and GSI of a virtio_mmio.device=SIZE@BASE:GSI window on the command line. */
static inline int parse_number(const char** p, const char* end, uint64_t* out_value) {
    const char* s = *p;
    uint64_t x = 0;
    int base = 10, digits = 0;
    if (end - s > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
    }
    for (; s < end && digits < 17; ++s, ++digits) {
        unsigned d;
        if (*s >= '0' && *s <= '9') d = (unsigned)(*s - '0');
        else if (base == 16 && *s >= 'a' && *s <= 'f') d = (unsigned)(*s - 'a' + 10);
        else if (base == 16 && *s >= 'A' && *s <= 'F') d = (unsigned)(*s - 'A' + 10);
        else break;
        x = x * (uint64_t)base + d;
    }
    if (!digits) return 0;
    *p = s;
    *out_value = x;
    return 1;
}

#endif
