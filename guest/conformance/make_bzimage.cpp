// Packs a flat protected-mode image (linked at 1 MiB, 64-bit entry at +0x200)
// into a bzImage per the x86 boot protocol (Documentation/arch/x86/boot.rst):
// four setup sectors plus the boot sector holding the setup header, then the
// image. Only the fields a 64-bit boot loader reads are filled in.
//
//   make_bzimage IMAGE.bin OUT.bzImage
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <vector>

namespace {
void put16(std::vector<unsigned char>& b, std::size_t at, std::uint16_t v) {
    b[at] = v & 0xff;
    b[at + 1] = v >> 8;
}
void put32(std::vector<unsigned char>& b, std::size_t at, std::uint32_t v) {
    for (int i = 0; i < 4; ++i)
        b[at + i] = (v >> (8 * i)) & 0xff;
}
void put64(std::vector<unsigned char>& b, std::size_t at, std::uint64_t v) {
    for (int i = 0; i < 8; ++i)
        b[at + i] = (v >> (8 * i)) & 0xff;
}
} // namespace

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: make_bzimage IMAGE.bin OUT.bzImage\n");
        return 2;
    }
    std::ifstream in(argv[1], std::ios::binary);
    std::vector<unsigned char> image((std::istreambuf_iterator<char>(in)), {});
    if (!in.good() && !in.eof()) return 1;
    if (image.size() <= 0x200 || image.size() > (64u << 20)) {
        std::fprintf(stderr, "make_bzimage: image size %zu out of range\n", image.size());
        return 1;
    }
    image.resize((image.size() + 15) / 16 * 16, 0); // syssize counts 16-byte paragraphs

    constexpr std::size_t setup_sects = 4;
    std::vector<unsigned char> setup((setup_sects + 1) * 512, 0);
    setup[0x1f1] = setup_sects;
    put32(setup, 0x1f4, static_cast<std::uint32_t>(image.size() / 16)); // syssize
    put16(setup, 0x1fe, 0xaa55);                                        // boot_flag
    setup[0x200] = 0xeb;                                                // jump over the header:
    setup[0x201] = 0x26c - 0x202;                                       // it ends at 0x26c (2.15)
    std::memcpy(&setup[0x202], "HdrS", 4);
    put16(setup, 0x206, 0x020f);     // protocol 2.15
    setup[0x211] = 0x01;             // loadflags: LOADED_HIGH (protected-mode code at 1 MiB)
    put32(setup, 0x214, 0x100000);   // code32_start
    put32(setup, 0x22c, 0x37ffffff); // initrd_addr_max
    put32(setup, 0x230, 0x200000);   // kernel_alignment
    setup[0x234] = 0;                // not relocatable: linked at 1 MiB
    put16(setup, 0x236, 0x0001);     // xloadflags: XLF_KERNEL_64 (64-bit entry at +0x200)
    put32(setup, 0x238, 2047);       // cmdline_size
    put64(setup, 0x258, 0x100000);   // pref_address
    // init_size: the image (bss included) plus room; the loader reserves it.
    put32(setup, 0x260,
          static_cast<std::uint32_t>((image.size() + 0xfff) / 0x1000 * 0x1000 + 0x10000));

    std::ofstream out(argv[2], std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(setup.data()),
              static_cast<std::streamsize>(setup.size()));
    out.write(reinterpret_cast<const char*>(image.data()),
              static_cast<std::streamsize>(image.size()));
    return out.good() ? 0 : 1;
}
