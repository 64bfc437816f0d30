/* The conformance guest: a freestanding 64-bit program booted through the
 * real loader (as a bzImage) that checks what the VMM built for it — zero
 * page, e820 map, cmdline, initrd, ACPI tables — talks over the UART and ends
 * the machine the way its cmdline asks:
 *
 *   conformance.mode=poweroff|reset|acpireset|triplefault|panic|echo|popcnt|virtio|count
 *     (virtio: drive every virtio-mmio device, see virtio.h;
 *      count: count forever on the console, see count.c)
 *     (popcnt: execute POPCNT, which some hosts cannot emulate, then power off)
 *   conformance.cpus=N        MADT must list N enabled processors
 *   conformance.memory_mib=M  e820 RAM must add up to M MiB
 *   conformance.initrd=TEXT   the initrd must start with TEXT
 *   conformance.virtio=N      DSDT and cmdline describe N virtio-mmio devices
 *   conformance.smp=1         start the other vCPUs (INIT-SIPI-SIPI) and check they run
 *
 * Last line: "conformance: PASS (n checks)" or "conformance: FAIL (k of n checks)".
 * Uses only general-purpose registers and plain instructions (no SSE,
 * XSAVE, POPCNT, CMPXCHG16B): the oracle must run on hosts whose KVM
 * emulates only a subset. Interrupts stay off; any exception triple-faults. */
#include <stddef.h>
#include <stdint.h>

#include "virtio.h"

/* ---- freestanding support the compiler may call ---- */
void* memset(void* d, int c, size_t n) {
    unsigned char* p = d;
    while (n--) *p++ = (unsigned char)c;
    return d;
}
void* memcpy(void* d, const void* s, size_t n) {
    unsigned char* p = d;
    const unsigned char* q = s;
    while (n--) *p++ = *q++;
    return d;
}
int memcmp(const void* a, const void* b, size_t n) {
    const unsigned char *p = a, *q = b;
    for (; n; --n, ++p, ++q)
        if (*p != *q) return *p - *q;
    return 0;
}

/* ---- port I/O, MMIO ---- */
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port) {
    uint8_t v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline uint32_t mmio_read32(uint64_t a) { return *(volatile uint32_t*)a; }
static inline void mmio_write32(uint64_t a, uint32_t v) { *(volatile uint32_t*)a = v; }
static inline uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}
static inline uint64_t read_cr3(void) {
    uint64_t v;
    __asm__ volatile("mov %%cr3, %0" : "=r"(v));
    return v;
}

/* ---- UART (COM1) ---- */
#define COM1 0x3f8
static void uart_init(void) {
    outb(COM1 + 1, 0x00); /* no interrupts: we poll */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x01); /* 115200 */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0xc7); /* FIFO on, cleared */
    outb(COM1 + 4, 0x0b);
}
/* Output is buffered per line and sent like Linux's 8250 driver does: wait
 * for THRE once, then fill the 16-byte FIFO with one `rep outsb` (a single
 * exit to the VMM for the whole chunk). */
static char out_buffer[16];
static size_t out_length;
static void flush(void) {
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); ++i) {
    }
    const char* p = out_buffer;
    size_t n = out_length;
    __asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"((uint16_t)COM1) : "memory");
    out_length = 0;
}
static void putc_(char c) {
    out_buffer[out_length++] = c;
    if (out_length == sizeof out_buffer || c == '\n') flush();
}
static void puts_(const char* s) {
    while (*s) putc_(*s++);
}
static void put_hex(uint64_t v) {
    puts_("0x");
    int started = 0;
    for (int shift = 60; shift >= 0; shift -= 4) {
        unsigned d = (v >> shift) & 0xf;
        if (d || started || shift == 0) {
            putc_("0123456789abcdef"[d]);
            started = 1;
        }
    }
}
static void put_dec(uint64_t v) {
    char buf[24];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) putc_(buf[--n]);
}
static int uart_getc(void) {
    while (!(inb(COM1 + 5) & 0x01)) {
    }
    return inb(COM1);
}

/* ---- checks ---- */
static unsigned checks, failures;
static int check(int ok, const char* what) {
    ++checks;
    if (!ok) ++failures;
    puts_(ok ? "ok: " : "FAIL: ");
    puts_(what);
    putc_('\n');
    return ok;
}

/* ---- bounded reads of what the VMM built (it could be wrong: never trust lengths) ---- */
static uint8_t rd8(uint64_t a) { return *(volatile uint8_t*)a; }
static uint16_t rd16(uint64_t a) { return *(volatile uint16_t*)a; }
static uint32_t rd32(uint64_t a) { return *(volatile uint32_t*)a; }
static uint64_t rd64(uint64_t a) { return *(volatile uint64_t*)a; }
static uint8_t sum_bytes(uint64_t a, uint64_t n) {
    uint8_t s = 0;
    for (uint64_t i = 0; i < n; ++i) s = (uint8_t)(s + rd8(a + i));
    return s;
}

/* ---- cmdline ---- */
static const char* cmdline = "";
static int param(const char* name, const char** value, size_t* length) {
    size_t n = 0;
    while (name[n]) ++n;
    const char* p = cmdline;
    while (*p) {
        while (*p == ' ') ++p;
        const char* word = p;
        while (*p && *p != ' ') ++p;
        if ((size_t)(p - word) > n && !memcmp(word, name, n) && word[n] == '=') {
            *value = word + n + 1;
            *length = (size_t)(p - word) - n - 1;
            return 1;
        }
    }
    return 0;
}
static int param_is(const char* name, const char* expected) {
    const char* v;
    size_t n;
    if (!param(name, &v, &n)) return 0;
    size_t m = 0;
    while (expected[m]) ++m;
    return n == m && !memcmp(v, expected, n);
}
static int param_number(const char* name, uint64_t* out) {
    const char* v;
    size_t n;
    if (!param(name, &v, &n) || n == 0 || n > 18) return 0;
    uint64_t x = 0;
    for (size_t i = 0; i < n; ++i) {
        if (v[i] < '0' || v[i] > '9') return 0;
        x = x * 10 + (uint64_t)(v[i] - '0');
    }
    *out = x;
    return 1;
}

/* ---- zero page (struct boot_params) offsets ---- */
#define BP_ACPI_RSDP 0x070
#define BP_EXT_CMDLINE 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_BOOT_FLAG 0x1fe
#define BP_HEADER 0x202
#define BP_VERSION 0x206
#define BP_LOADER 0x210
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21c
#define BP_CMDLINE 0x228
#define BP_E820_TABLE 0x2d0

extern char _head[], _end[];

static uint64_t ram_bytes;
static uint64_t e820_count;
static uint64_t e820_addr[128], e820_size[128];
static uint32_t e820_type[128];

static int e820_covers(uint64_t begin, uint64_t end, uint32_t type) {
    for (uint64_t i = 0; i < e820_count; ++i)
        if (e820_type[i] == type && begin >= e820_addr[i] && end <= e820_addr[i] + e820_size[i]) return 1;
    return 0;
}
static int e820_overlaps_ram(uint64_t begin, uint64_t end) {
    for (uint64_t i = 0; i < e820_count; ++i)
        if (e820_type[i] == 1 && begin < e820_addr[i] + e820_size[i] && e820_addr[i] < end) return 1;
    return 0;
}

static uint64_t initrd_address, initrd_size, rsdp_hint;

static void set_cmdline(uint64_t cmd) {
    if (check(cmd != 0 && cmd < 0x100000000ull, "cmdline pointer below 4 GiB")) {
        cmdline = (const char*)cmd;
        size_t n = 0;
        while (n < 4096 && cmdline[n]) ++n;
        check(n < 4096, "cmdline NUL-terminated");
        puts_("cmdline: ");
        puts_(cmdline);
        putc_('\n');
    }
}

/* Linux boot protocol: struct boot_params. */
static void read_zero_page(uint64_t zp) {
    puts_("zero page at ");
    put_hex(zp);
    putc_('\n');
    check(zp == 0x7000, "zero page at 0x7000 (rsi)");
    check(rd16(zp + BP_BOOT_FLAG) == 0xaa55, "setup header boot_flag 0xaa55");
    check(rd32(zp + BP_HEADER) == 0x53726448, "setup header magic HdrS");
    check(rd16(zp + BP_VERSION) >= 0x020c, "boot protocol >= 2.12");
    check(rd8(zp + BP_LOADER) != 0, "type_of_loader set");
    set_cmdline(rd32(zp + BP_CMDLINE) | ((uint64_t)rd32(zp + BP_EXT_CMDLINE) << 32));
    e820_count = rd8(zp + BP_E820_ENTRIES);
    if (e820_count > 128) e820_count = 0;
    for (uint64_t i = 0; i < e820_count; ++i) {
        uint64_t e = zp + BP_E820_TABLE + i * 20;
        e820_addr[i] = rd64(e);
        e820_size[i] = rd64(e + 8);
        e820_type[i] = rd32(e + 16);
    }
    initrd_address = rd32(zp + BP_RAMDISK_IMAGE);
    initrd_size = rd32(zp + BP_RAMDISK_SIZE);
    rsdp_hint = rd64(zp + BP_ACPI_RSDP);
}

/* PVH boot: struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h). */
static void read_start_info(uint64_t si) {
    puts_("PVH start_info at ");
    put_hex(si);
    putc_('\n');
    check(rd32(si) == 0x336ec578, "PVH start_info magic");
    uint32_t version = rd32(si + 4);
    check(version >= 1, "PVH start_info version >= 1 (memory map)");
    set_cmdline(rd64(si + 24));
    rsdp_hint = rd64(si + 32);
    check(rsdp_hint != 0, "PVH start_info names the RSDP");
    if (version >= 1) {
        uint64_t map = rd64(si + 40);
        e820_count = rd32(si + 48);
        if (e820_count > 128) e820_count = 0;
        for (uint64_t i = 0; i < e820_count; ++i) {
            e820_addr[i] = rd64(map + i * 24);
            e820_size[i] = rd64(map + i * 24 + 8);
            e820_type[i] = rd32(map + i * 24 + 16);
        }
    }
    if (rd32(si + 12) >= 1) { /* nr_modules: the first is the initrd */
        uint64_t module = rd64(si + 16);
        initrd_address = rd64(module);
        initrd_size = rd64(module + 8);
    }
}

static void check_memory_map(void) {
    check(e820_count >= 2 && e820_count <= 128, "memory map has 2..128 entries");
    int sorted = 1;
    for (uint64_t i = 0; i < e820_count; ++i) {
        puts_("e820: ");
        put_hex(e820_addr[i]);
        puts_(" - ");
        put_hex(e820_addr[i] + e820_size[i]);
        puts_(" type ");
        put_dec(e820_type[i]);
        putc_('\n');
        if (e820_type[i] == 1) ram_bytes += e820_size[i];
        if (i && e820_addr[i] < e820_addr[i - 1] + e820_size[i - 1]) sorted = 0;
    }
    check(sorted, "e820 sorted, no overlaps");
    check(e820_covers(0, 0x9fc00, 1), "e820 RAM [0, 0x9fc00)");
    check(!e820_overlaps_ram(0x9fc00, 0x100000), "e820 EBDA/ACPI/BIOS area not RAM");
    check(e820_covers((uint64_t)_head, (uint64_t)_end, 1), "e820 RAM covers this program");
    check(!e820_overlaps_ram(0xc0000000, 0x100000000), "e820: no RAM in the MMIO gap");
    uint64_t mib;
    if (param_number("conformance.memory_mib", &mib)) {
        puts_("RAM from e820 (incl. reserved low area): ");
        put_dec(ram_bytes >> 20);
        puts_(" MiB\n");
        /* RAM minus the reserved [0x9fc00, 1 MiB) hole. */
        check(ram_bytes + (0x100000 - 0x9fc00) == (mib << 20), "e820 RAM adds up to conformance.memory_mib");
    }
    const char* expect;
    size_t expect_length;
    if (param("conformance.initrd", &expect, &expect_length)) {
        check(initrd_address != 0 && initrd_size >= expect_length, "initrd present");
        check(e820_covers(initrd_address, initrd_address + initrd_size, 1), "initrd in e820 RAM");
        check(initrd_address >= (uint64_t)_end || initrd_address + initrd_size <= (uint64_t)_head,
              "initrd clear of the kernel");
        check(initrd_size >= expect_length && !memcmp((const void*)initrd_address, expect, expect_length),
              "initrd content");
    }
}

/* ---- ACPI ---- */
static uint64_t fadt, madt, dsdt;
static uint16_t reset_port;
static uint8_t sleep_space = 0xff; /* GAS address space: 0 memory, 1 I/O */
static uint64_t sleep_address;
static uint8_t reset_value, s5_type = 0xff;
static uint32_t madt_cpus, madt_apic_ids[256];

static int table_ok(uint64_t t, const char* signature) {
    if (!t || t >= 0x100000000ull) return 0;
    if (memcmp((const void*)t, signature, 4)) return 0;
    uint32_t length = rd32(t + 4);
    if (length < 36 || length > 0x100000) return 0;
    return sum_bytes(t, length) == 0;
}

static void parse_s5(uint64_t body, uint32_t length) {
    for (uint32_t i = 0; i + 12 < length; ++i) {
        if (memcmp((const void*)(body + i), "_S5_", 4)) continue;
        uint64_t p = body + i + 4;
        if (rd8(p) != 0x12) continue; /* PackageOp */
        uint8_t lead = rd8(p + 1);
        p += 2 + (lead >> 6); /* PkgLength bytes */
        p += 1;               /* NumElements */
        uint8_t op = rd8(p);
        if (op == 0x00) s5_type = 0;
        else if (op == 0x01) s5_type = 1;
        else if (op == 0x0a) s5_type = rd8(p + 1);
        return;
    }
}

static void check_acpi(void) {
    uint64_t rsdp = 0;
    for (uint64_t a = 0xe0000; a < 0x100000; a += 16)
        if (!memcmp((const void*)a, "RSD PTR ", 8)) {
            rsdp = a;
            break;
        }
    if (!check(rsdp != 0, "RSDP found in [0xe0000, 0x100000)")) return;
    puts_("RSDP at ");
    put_hex(rsdp);
    putc_('\n');
    check(rsdp_hint == 0 || rsdp_hint == rsdp, "the boot protocol's RSDP pointer agrees");
    check(sum_bytes(rsdp, 20) == 0, "RSDP checksum");
    check(rd8(rsdp + 15) >= 2, "RSDP revision >= 2");
    check(rd32(rsdp + 20) == 36 && sum_bytes(rsdp, 36) == 0, "RSDP extended checksum");
    uint64_t xsdt = rd64(rsdp + 24);
    if (!check(table_ok(xsdt, "XSDT"), "XSDT signature and checksum")) return;
    uint32_t entries = (rd32(xsdt + 4) - 36) / 8;
    for (uint32_t i = 0; i < entries && i < 64; ++i) {
        uint64_t t = rd64(xsdt + 36 + 8 * i);
        if (t >= 0x100000000ull) continue;
        puts_("table ");
        for (int k = 0; k < 4; ++k) putc_((char)rd8(t + k));
        puts_(" at ");
        put_hex(t);
        putc_('\n');
        if (!memcmp((const void*)t, "FACP", 4)) fadt = t;
        if (!memcmp((const void*)t, "APIC", 4)) madt = t;
    }
    if (check(table_ok(fadt, "FACP"), "FADT present, checksum")) {
        uint32_t length = rd32(fadt + 4);
        check(length >= 268, "FADT is ACPI 5+ size (sleep registers)");
        check((rd32(fadt + 112) >> 20) & 1, "FADT HW_REDUCED_ACPI");
        check((rd32(fadt + 112) >> 10) & 1, "FADT RESET_REG_SUP");
        uint64_t x_dsdt = length >= 148 ? rd64(fadt + 140) : 0;
        dsdt = x_dsdt ? x_dsdt : rd32(fadt + 40);
        check(rd8(fadt + 116) == 1, "reset register in system I/O space");
        reset_port = (uint16_t)rd64(fadt + 120);
        reset_value = rd8(fadt + 128);
        check(reset_port == 0x604 && reset_value == 1, "reset register 0x604, value 1");
        if (length >= 268) {
            sleep_space = rd8(fadt + 244);
            sleep_address = rd64(fadt + 248);
            check(sleep_space == 1, "sleep control register in system I/O space");
            check(sleep_address == 0x600, "sleep control register 0x600");
            check(rd8(fadt + 256) == 1 && rd64(fadt + 260) == 0x601, "sleep status register 0x601");
        }
    }
    if (check(table_ok(dsdt, "DSDT"), "DSDT present, checksum")) {
        uint32_t length = rd32(dsdt + 4);
        parse_s5(dsdt + 36, length - 36);
        check(s5_type == 5, "DSDT \\_S5_ sleep type 5");
        static const uint8_t pnp0501[] = {0x0c, 0x41, 0xd0, 0x05, 0x01}; /* EisaId("PNP0501") */
        int com1 = 0;
        for (uint32_t i = 36; i + sizeof pnp0501 <= length; ++i)
            if (!memcmp((const void*)(dsdt + i), pnp0501, sizeof pnp0501) ||
                !memcmp((const void*)(dsdt + i), "PNP0501", 7))
                com1 = 1;
        check(com1, "DSDT describes COM1 (PNP0501)");
        uint64_t virtio;
        if (param_number("conformance.virtio", &virtio)) {
            uint64_t in_dsdt = 0, on_cmdline = 0;
            for (uint32_t i = 36; i + 8 <= length; ++i)
                if (!memcmp((const void*)(dsdt + i), "LNRO0005", 8)) ++in_dsdt;
            for (const char* p = cmdline; *p; ++p)
                if (!memcmp(p, "virtio_mmio.device=", 19)) ++on_cmdline;
            puts_("virtio-mmio devices: DSDT ");
            put_dec(in_dsdt);
            puts_(", cmdline ");
            put_dec(on_cmdline);
            putc_('\n');
            check(in_dsdt == virtio, "DSDT describes every virtio-mmio device (LNRO0005)");
            check(on_cmdline == virtio, "cmdline names every virtio-mmio device");
        }
    }
    if (check(table_ok(madt, "APIC"), "MADT present, checksum")) {
        check(rd32(madt + 36) == 0xfee00000, "MADT local APIC at 0xfee00000");
        uint32_t length = rd32(madt + 4), ioapics = 0, bad = 0;
        for (uint32_t off = 44; off + 2 <= length;) {
            uint8_t type = rd8(madt + off), len = rd8(madt + off + 1);
            if (len < 2 || off + len > length) {
                bad = 1;
                break;
            }
            if (type == 0 && len >= 8 && (rd32(madt + off + 4) & 1) && madt_cpus < 256)
                madt_apic_ids[madt_cpus++] = rd8(madt + off + 3);
            if (type == 9 && len >= 16 && (rd32(madt + off + 8) & 1) && madt_cpus < 256)
                madt_apic_ids[madt_cpus++] = rd32(madt + off + 4);
            if (type == 1 && len >= 12 && rd32(madt + off + 4) == 0xfec00000 && rd32(madt + off + 8) == 0) ++ioapics;
            off += len;
        }
        check(!bad, "MADT entries well-formed");
        check(ioapics == 1, "MADT lists the IOAPIC at 0xfec00000, GSI base 0");
        puts_("MADT processors: ");
        put_dec(madt_cpus);
        putc_('\n');
        uint64_t cpus;
        if (param_number("conformance.cpus", &cpus))
            check(madt_cpus == cpus, "MADT lists every vCPU (conformance.cpus)");
        else
            check(madt_cpus >= 1, "MADT lists at least one processor");
    }
}

/* ---- CPUID (informational: some hosts pass the host's CPUID through) ---- */
static void report_cpuid(void) {
    uint32_t a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    puts_("cpuid.1: apic id ");
    put_dec(b >> 24);
    puts_(c & (1u << 31) ? ", hypervisor bit set\n" : ", no hypervisor bit\n");
    if (c & (1u << 31)) {
        char sig[13];
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x40000000), "c"(0));
        memcpy(sig, &b, 4);
        memcpy(sig + 4, &c, 4);
        memcpy(sig + 8, &d, 4);
        sig[12] = 0;
        for (int i = 0; i < 12; ++i)
            if (sig[i] < 32 || sig[i] > 126) sig[i] = '.';
        puts_("hypervisor signature: ");
        puts_(sig);
        putc_('\n');
    }
}

/* ---- other vCPUs: INIT-SIPI-SIPI into the trampoline ---- */
extern char ap_trampoline_start[], ap_trampoline_end[], ap_trampoline_cr3[], ap_trampoline_count[];
#define AP_BASE 0x10000ull
#define LAPIC 0xfee00000ull

static void spin_cycles(uint64_t cycles) {
    uint64_t start = rdtsc();
    while (rdtsc() - start < cycles) __asm__ volatile("pause");
}

static void start_other_cpus(void) {
    if (madt_cpus < 2) return;
    uint64_t size = (uint64_t)(ap_trampoline_end - ap_trampoline_start);
    memcpy((void*)AP_BASE, ap_trampoline_start, size);
    volatile uint32_t* cr3 = (volatile uint32_t*)(AP_BASE + (uint64_t)(ap_trampoline_cr3 - ap_trampoline_start));
    volatile uint32_t* count = (volatile uint32_t*)(AP_BASE + (uint64_t)(ap_trampoline_count - ap_trampoline_start));
    *cr3 = (uint32_t)read_cr3();
    *count = 0;
    uint32_t self = mmio_read32(LAPIC + 0x20) >> 24;
    puts_("BSP APIC id ");
    put_dec(self);
    putc_('\n');
    uint32_t expected = 0;
    for (uint32_t i = 0; i < madt_cpus; ++i) {
        uint32_t id = madt_apic_ids[i];
        if (id == self) continue;
        ++expected;
        mmio_write32(LAPIC + 0x310, id << 24);
        mmio_write32(LAPIC + 0x300, 0x00004500); /* INIT, assert */
        spin_cycles(10000000);
        for (int k = 0; k < 2; ++k) {
            mmio_write32(LAPIC + 0x310, id << 24);
            mmio_write32(LAPIC + 0x300, 0x00004600 | (uint32_t)(AP_BASE >> 12)); /* SIPI */
            spin_cycles(1000000);
        }
    }
    uint64_t start = rdtsc();
    while (*count < expected && rdtsc() - start < 3000000000ull) __asm__ volatile("pause");
    puts_("application processors running: ");
    put_dec(*count);
    puts_(" of ");
    put_dec(expected);
    putc_('\n');
    check(*count == expected, "every other vCPU started (INIT-SIPI-SIPI)");
}

/* ---- endings ---- */
static void finish_line(void) {
    puts_("conformance: ");
    if (failures) {
        puts_("FAIL (");
        put_dec(failures);
        puts_(" of ");
        put_dec(checks);
        puts_(" checks)\n");
    } else {
        puts_("PASS (");
        put_dec(checks);
        puts_(" checks)\n");
    }
}

/* ACPI S5 through the FADT's sleep control register (I/O or memory, so the
 * same guest powers off other VMMs' hardware-reduced platforms too). */
static void power_off(void) {
    uint8_t value = (uint8_t)(((s5_type != 0xff ? s5_type : 5) << 2) | (1u << 5));
    if (sleep_space == 0 && sleep_address)
        *(volatile uint8_t*)sleep_address = value;
    else
        outb(sleep_space == 1 && sleep_address < 0x10000 ? (uint16_t)sleep_address : 0x600, value);
}

static void triple_fault(void) {
    struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } empty = {0, 0};
    __asm__ volatile("lidt %0\n\tud2" ::"m"(empty));
}

static void echo(void) {
    puts_("echo: ready\n");
    char line[64];
    unsigned n = 0;
    for (;;) {
        int c = uart_getc();
        putc_((char)c);
        flush();
        if (c == '\r') continue;
        if (c == '\n') {
            int bye = n == 3 && !memcmp(line, "bye", 3);
            n = 0;
            if (bye) return;
            continue;
        }
        if (n < sizeof line) line[n++] = (char)c;
    }
}

void conformance_count(uint64_t touch_mib, uint64_t every); /* count.c */
void count_vsock_setup(const char* cmdline, uint64_t buffers, uint64_t buffer_length); /* vsock_events.c */

void conformance_main(uint64_t zero_page, uint64_t start_info) {
    uart_init();
    puts_("conformance: start\n");
    if (start_info)
        read_start_info(start_info);
    else
        read_zero_page(zero_page);
    check_memory_map();
    check_acpi();
    report_cpuid();
    if (param_is("conformance.smp", "1")) start_other_cpus();

    if (param_is("conformance.mode", "count")) { /* count.c; never returns */
        uint64_t touch_mib = 0, every = 0;
        param_number("conformance.touch_mib", &touch_mib);
        param_number("conformance.every", &every);
        uint64_t vsock = 0, vsock_buffers = 4, vsock_buffer_len = 8;
        param_number("conformance.vsock", &vsock);
        param_number("conformance.vsock.buffers", &vsock_buffers);
        param_number("conformance.vsock.buffer_len", &vsock_buffer_len);
        if (vsock) count_vsock_setup(cmdline, vsock_buffers, vsock_buffer_len);
        conformance_count(touch_mib, every);
    }
    if (param_is("conformance.mode", "echo")) {
        echo();
        check(1, "echo");
    }
    if (param_is("conformance.mode", "virtio")) virtio_conformance(&(struct virtio_console){puts_, check, cmdline});
    finish_line();
    if (param_is("conformance.mode", "popcnt")) {
        __asm__ volatile(".byte 0xf3, 0x48, 0x0f, 0xb8, 0xc0" ::: "rax", "cc"); /* popcnt rax, rax */
        puts_("popcnt ran\n");
    }
    if (param_is("conformance.mode", "reset")) {
        outb(0x64, 0xfe); /* i8042: pulse the reset line */
    } else if (param_is("conformance.mode", "acpireset")) {
        outb(reset_port ? reset_port : 0x604, reset_value ? reset_value : 1);
    } else if (param_is("conformance.mode", "triplefault")) {
        triple_fault();
    } else if (param_is("conformance.mode", "panic")) {
        puts_("Kernel panic - not syncing: conformance guest asked to panic\n");
        outb(0x64, 0xfe); /* as panic=-1 reboot=k would */
    } else {
        power_off();
    }
    for (;;) __asm__ volatile("cli; hlt");
}
