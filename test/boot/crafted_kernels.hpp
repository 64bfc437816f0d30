#pragma once
// Small synthetic kernels for the loader tests: a bzImage with a 2.15
// setup header and an ELF64 with one PT_LOAD and a PVH note. Their fields
// are the knobs the tests turn to make them wrong.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace supermachine::test {

struct bzimage_knobs {
    std::uint8_t setup_sects = 1;
    std::uint16_t version = 0x020f;
    std::uint8_t loadflags = 0x01;
    std::uint16_t xloadflags = 0x03;
    std::uint8_t relocatable = 1;
    std::uint32_t kernel_alignment = 0x200000;
    std::uint64_t pref_address = 0x1000000;
    std::uint32_t init_size = 0x400000;
    std::uint32_t cmdline_size = 2047;
    std::uint32_t initrd_addr_max = 0x7fffffff;
    std::size_t protected_mode_size = 0x2000;
    std::int64_t syssize = -1; // -1: protected_mode_size / 16
};

template <class T>
inline void put(std::vector<std::byte>& v, std::size_t at, T value) {
    std::memcpy(v.data() + at, &value, sizeof value);
}

inline std::vector<std::byte> make_bzimage(const bzimage_knobs& k = {}) {
    const std::size_t setup = (std::size_t{k.setup_sects == 0 ? 4u : k.setup_sects} + 1) * 512;
    std::vector<std::byte> v(setup + k.protected_mode_size);
    v[0] = std::byte{'M'};
    v[1] = std::byte{'Z'};
    put<std::uint8_t>(v, 0x1f1, k.setup_sects);
    put<std::uint32_t>(v, 0x1f4,
                       k.syssize < 0 ? static_cast<std::uint32_t>(k.protected_mode_size / 16)
                                     : static_cast<std::uint32_t>(k.syssize));
    put<std::uint16_t>(v, 0x1fe, 0xaa55);
    put<std::uint8_t>(v, 0x200, 0xeb);
    put<std::uint8_t>(v, 0x201, 0x6a); // header runs to 0x26c
    put<std::uint32_t>(v, 0x202, 0x53726448);
    put<std::uint16_t>(v, 0x206, k.version);
    put<std::uint8_t>(v, 0x211, k.loadflags);
    put<std::uint32_t>(v, 0x22c, k.initrd_addr_max);
    put<std::uint32_t>(v, 0x230, k.kernel_alignment);
    put<std::uint8_t>(v, 0x234, k.relocatable);
    put<std::uint8_t>(v, 0x235, 21);
    put<std::uint16_t>(v, 0x236, k.xloadflags);
    put<std::uint32_t>(v, 0x238, k.cmdline_size);
    put<std::uint64_t>(v, 0x250, 0xdeadbeef); // setup_data: the loader must not pass it on
    put<std::uint64_t>(v, 0x258, k.pref_address);
    put<std::uint32_t>(v, 0x260, k.init_size);
    for (std::size_t i = 0; i < k.protected_mode_size; ++i)
        v[setup + i] = static_cast<std::byte>((i * 7 + 3) & 0xff);
    return v;
}

struct elf_knobs {
    std::uint64_t entry = 0x1000000;
    std::uint16_t phnum = 2; // PT_LOAD + PT_NOTE
    std::uint16_t phentsize = 56;
    std::uint64_t phoff = 64;
    std::uint64_t load_paddr = 0x1000000;
    std::uint64_t load_filesz = 0x1000;
    std::uint64_t load_memsz = 0x3000;
    std::uint64_t load_offset = 0x1000;
    bool pvh_note = true;
    std::uint32_t pvh_entry = 0x1000040;
    std::uint32_t note_descsz = 8;
};

inline std::vector<std::byte> make_elf(const elf_knobs& k = {}) {
    std::vector<std::byte> v(0x1000 + 0x1000);
    v[0] = std::byte{0x7f};
    v[1] = std::byte{'E'};
    v[2] = std::byte{'L'};
    v[3] = std::byte{'F'};
    v[4] = std::byte{2};
    v[5] = std::byte{1};
    v[6] = std::byte{1};
    put<std::uint16_t>(v, 16, 2);
    put<std::uint16_t>(v, 18, 62);
    put<std::uint32_t>(v, 20, 1);
    put<std::uint64_t>(v, 24, k.entry);
    put<std::uint64_t>(v, 32, k.phoff);
    put<std::uint16_t>(v, 52, 64);
    put<std::uint16_t>(v, 54, k.phentsize);
    put<std::uint16_t>(v, 56, k.phnum);
    // The real table is at 64 (room for 2 entries); phnum/phoff may lie about it.
    std::size_t ph = 64;
    put<std::uint32_t>(v, ph + 0, 1); // PT_LOAD
    put<std::uint32_t>(v, ph + 4, 7);
    put<std::uint64_t>(v, ph + 8, k.load_offset);
    put<std::uint64_t>(v, ph + 16, 0xffffffff81000000ull);
    put<std::uint64_t>(v, ph + 24, k.load_paddr);
    put<std::uint64_t>(v, ph + 32, k.load_filesz);
    put<std::uint64_t>(v, ph + 40, k.load_memsz);
    put<std::uint64_t>(v, ph + 48, 0x200000);
    ph += 56;
    const std::size_t note = 0x200;
    put<std::uint32_t>(v, ph + 0, k.pvh_note ? 4 : 6); // PT_NOTE or PT_PHDR
    put<std::uint64_t>(v, ph + 8, note);
    put<std::uint64_t>(v, ph + 32, 4 + 4 + 4 + 4 + 8);
    // Note: namesz 4 "Xen\0", descsz, type 18, desc (the entry).
    put<std::uint32_t>(v, note + 0, 4);
    put<std::uint32_t>(v, note + 4, k.note_descsz);
    put<std::uint32_t>(v, note + 8, 18);
    std::memcpy(v.data() + note + 12, "Xen", 4);
    put<std::uint64_t>(v, note + 16, k.pvh_entry);
    for (std::size_t i = 0; i < 0x1000; ++i)
        v[0x1000 + i] = static_cast<std::byte>((i * 13 + 1) & 0xff);
    return v;
}

} // namespace supermachine::test
