// ACPI tables: checksums and pointers checked here, and the tables handed
// to the real ACPICA disassembler (iasl -d), which must read them without
// errors and show what we described. The DSDT is recompiled from the
// disassembly as a second opinion on the AML.
#include "printers.hpp"

#include <supermachine/boot/acpi.hpp>
#include <supermachine/boot/detail/byte_io.hpp>

#include <skip.hpp>

#include <boost/test/unit_test.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

using namespace supermachine;
using namespace supermachine::boot;
namespace fs = std::filesystem;

namespace {

std::uint8_t byte_sum(std::span<const std::byte> bytes) {
    std::uint8_t sum = 0;
    for (auto b : bytes)
        sum = static_cast<std::uint8_t>(sum + static_cast<std::uint8_t>(b));
    return sum;
}

std::string read_text(const fs::path& path) {
    std::ifstream in(path);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

std::size_t count(const std::string& text, const std::string& what) {
    std::size_t n = 0;
    for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1))
        ++n;
    return n;
}

struct scratch_dir {
    fs::path path;
    scratch_dir() {
        std::string pattern = (fs::temp_directory_path() / "sm-acpi-XXXXXX").string();
        path = ::mkdtemp(pattern.data());
    }
    ~scratch_dir() { fs::remove_all(path); }
};

bool have_iasl() {
    return std::system("iasl -v >/dev/null 2>&1") == 0;
}

/// Write the table, disassemble it; returns the .dsl text (empty on failure).
std::string disassemble(const fs::path& dir, const std::string& name, const acpi_table& table) {
    const auto file = dir / (name + ".dat");
    std::ofstream(file, std::ios::binary)
        .write(reinterpret_cast<const char*>(table.bytes.data()),
               static_cast<std::streamsize>(table.bytes.size()));
    const std::string command =
        "cd '" + dir.string() + "' && iasl -d " + name + ".dat > " + name + ".log 2>&1";
    const int status = std::system(command.c_str());
    BOOST_TEST(status == 0, name << ": iasl -d failed:\n" << read_text(dir / (name + ".log")));
    const std::string log = read_text(dir / (name + ".log"));
    BOOST_TEST(log.find("rror") == std::string::npos, name << ": " << log);
    BOOST_TEST(log.find("nvalid") == std::string::npos, name << ": " << log);
    return read_text(dir / (name + ".dsl"));
}

acpi_config sample_config(std::uint32_t vcpus, std::size_t devices) {
    acpi_config c;
    c.vcpus = vcpus;
    for (std::size_t i = 0; i < devices; ++i)
        c.virtio_devices.push_back(
            {x86_layout::virtio_mmio_base + i * 0x1000, 0x1000,
             static_cast<std::uint32_t>(x86_layout::first_device_gsi + i % 19)});
    return c;
}

} // namespace

BOOST_AUTO_TEST_SUITE(acpi_tables_suite)

BOOST_AUTO_TEST_CASE(checksums_and_pointers) {
    const auto t = build_acpi_tables(sample_config(4, 3)).value();
    BOOST_TEST(t.rsdp.address == x86_layout::rsdp);
    BOOST_TEST(t.end <= x86_layout::acpi_area_end);
    BOOST_TEST(t.rsdp.bytes.size() == 36u);
    BOOST_TEST(byte_sum(std::span(t.rsdp.bytes).first(20)) == 0);
    BOOST_TEST(byte_sum(t.rsdp.bytes) == 0);
    BOOST_TEST(boot::detail::load_le<std::uint64_t>(t.rsdp.bytes, 24) == t.xsdt.address);
    for (const acpi_table* table : {&t.xsdt, &t.fadt, &t.madt, &t.dsdt}) {
        BOOST_TEST(byte_sum(table->bytes) == 0);
        BOOST_TEST(boot::detail::load_le<std::uint32_t>(table->bytes, 4) == table->bytes.size());
        BOOST_TEST(table->address % 16 == 0u);
    }
    BOOST_TEST(boot::detail::load_le<std::uint64_t>(t.xsdt.bytes, 36) == t.fadt.address);
    BOOST_TEST(boot::detail::load_le<std::uint64_t>(t.xsdt.bytes, 44) == t.madt.address);
    BOOST_TEST(t.fadt.bytes.size() == 276u);
    BOOST_TEST(boot::detail::load_le<std::uint64_t>(t.fadt.bytes, 140) == t.dsdt.address);
    BOOST_TEST((boot::detail::load_le<std::uint32_t>(t.fadt.bytes, 112) & (1u << 20)) !=
               0u); // HW_REDUCED_ACPI
    BOOST_TEST(boot::detail::load_le<std::uint64_t>(t.fadt.bytes, 244 + 4) ==
               platform::acpi_sleep_control_port);
    BOOST_TEST(boot::detail::load_le<std::uint64_t>(t.fadt.bytes, 116 + 4) ==
               platform::acpi_reset_port);

    // Written where they were laid out.
    auto memory = guest_memory::allocate_x86(16u << 20, memory_backing::anonymous).value();
    BOOST_TEST(write_acpi_tables(memory, t).value() == x86_layout::rsdp);
    auto dsdt = memory.span(t.dsdt.address, t.dsdt.bytes.size()).value();
    BOOST_TEST(std::memcmp(dsdt.data(), t.dsdt.bytes.data(), dsdt.size()) == 0);
}

BOOST_AUTO_TEST_CASE(limits) {
    BOOST_TEST(build_acpi_tables(sample_config(0, 0)).error() == errc::invalid_argument);
    BOOST_TEST(build_acpi_tables(sample_config(255, 0)).error() == errc::too_many_vcpus);
    BOOST_TEST(build_acpi_tables(sample_config(254, 19)).has_value());
    BOOST_TEST(
        build_acpi_tables(sample_config(1, 0), x86_layout::rsdp, x86_layout::rsdp + 256).error() ==
        errc::acpi_too_large);
    BOOST_TEST(build_acpi_tables(sample_config(1, max_acpi_virtio_devices + 1)).error() ==
               errc::acpi_too_large);
    auto c = sample_config(1, 1);
    c.virtio_devices[0].base = 0xffff'f800; // window wraps past 4 GiB
    BOOST_TEST(build_acpi_tables(c).error() == errc::invalid_argument);
}

BOOST_AUTO_TEST_CASE(iasl_disassembles_every_table) {
    test::skip_unless(have_iasl(), "iasl (acpica-tools) not installed");
    for (auto [vcpus, devices] :
         {std::pair<std::uint32_t, std::size_t>{1, 0}, {2, 3}, {254, 200}}) {
        BOOST_TEST_CONTEXT("vcpus " << vcpus << " devices " << devices) {
            scratch_dir dir;
            const auto config = sample_config(vcpus, devices);
            const auto t = build_acpi_tables(config).value();
            const auto xsdt = disassemble(dir.path, "xsdt", t.xsdt);
            BOOST_TEST(count(xsdt, "ACPI Table Address") == 2u);
            const auto fadt = disassemble(dir.path, "facp", t.fadt);
            BOOST_TEST(fadt.find("Hardware Reduced (V5) : 1") != std::string::npos);
            BOOST_TEST(fadt.find("Reset Register Supported (V2) : 1") != std::string::npos);
            const auto madt = disassemble(dir.path, "apic", t.madt);
            BOOST_TEST(count(madt, "[Processor Local APIC]") == vcpus);
            for (std::uint32_t cpu = 0; cpu < vcpus; cpu += (vcpus > 8 ? 37 : 1)) {
                char line[64];
                std::snprintf(line, sizeof line, "Local Apic ID : %02X", cpu);
                BOOST_TEST(madt.find(line) != std::string::npos, line);
            }
            BOOST_TEST(count(madt, "[I/O APIC]") == 1u);
            BOOST_TEST(madt.find("Address : FEC00000") != std::string::npos);
            const auto dsdt = disassemble(dir.path, "dsdt", t.dsdt);
            BOOST_TEST(count(dsdt, "\"LNRO0005\"") == devices);
            BOOST_TEST(count(dsdt, "EisaId (\"PNP0501\")") == 1u);
            BOOST_TEST(dsdt.find("0x03F8,") != std::string::npos);
            BOOST_TEST(dsdt.find("Name (\\_S5, Package") != std::string::npos);
            for (std::size_t i = 0; i < devices; i += (devices > 8 ? 41 : 1)) {
                char base[32], irq[32];
                std::snprintf(base, sizeof base, "0x%08llX,",
                              static_cast<unsigned long long>(config.virtio_devices[i].base));
                std::snprintf(irq, sizeof irq, "0x%08X,", config.virtio_devices[i].gsi);
                BOOST_TEST(dsdt.find(base) != std::string::npos, base);
                BOOST_TEST(dsdt.find(irq) != std::string::npos, irq);
            }
            BOOST_TEST(count(dsdt, "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive") ==
                       devices);
            // Second opinion: the disassembly compiles back without errors.
            const std::string compile =
                "cd '" + dir.path.string() +
                "' && mkdir -p re && cp dsdt.dsl re/ && cd re && iasl dsdt.dsl > log 2>&1";
            BOOST_TEST(std::system(compile.c_str()) == 0, read_text(dir.path / "re" / "log"));
        }
    }
}

BOOST_AUTO_TEST_SUITE_END()
