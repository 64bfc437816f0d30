/* A minimal virtio-mmio (version 2, modern) driver for the conformance guest:
 * conformance.mode=virtio drives every virtio-blk and virtio-rng device the
 * cmdline names (virtio_mmio.device=SIZE@BASE:GSI) and prints what it saw,
 * for the host test to compare with its own view of the disks:
 *
 *   virtio: device 0 at 0xd0000000 gsi 5: id 2 (blk)
 *   virtio-blk 0: features 0x..., capacity N sectors, ro 0, id 'disk0'
 *   virtio-blk 0: sectors 0..7 before fnv 0x...
 *   virtio-blk 0: wrote sectors S..S+7, read back equal, fnv 0x...
 *   virtio-blk 1: write refused, status 1            (read-only disk)
 *   virtio-rng 0: 32 bytes 0123...
 *   virtio: completions by interrupt N, by polling M
 *
 * Parameters: conformance.virtio.seed=N (pattern seed, default 1),
 * conformance.virtio.sector=N (first sector written, default 8),
 * conformance.virtio.irq=0 (leave the IOAPIC pins masked: every completion
 * must then be found by polling).
 * Completions are awaited with interrupts on (IOAPIC pin -> LAPIC vector
 * 0x30 -> InterruptStatus/InterruptAck), the used ring checked by polling
 * as well; each request reports which one arrived first. */
#ifndef CONFORMANCE_VIRTIO_H
#define CONFORMANCE_VIRTIO_H

/* What the driver borrows from conformance.c. */
struct virtio_console {
    void (*puts)(const char*);
    int (*check)(int ok, const char* what);
    const char* cmdline;
};

void virtio_conformance(const struct virtio_console* console);

#endif
