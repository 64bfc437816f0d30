// The newc writer against GNU cpio: what we write, cpio lists and extracts
// with the names, modes, owners, times, link targets and contents we gave.
#include "printers.hpp"

#include <supermachine/boot/cpio.hpp>
#include <supermachine/boot/initramfs.hpp>

#include <skip.hpp>

#include <boost/test/unit_test.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

using namespace supermachine;
using namespace supermachine::boot;
namespace fs = std::filesystem;

namespace {

struct scratch_dir {
    fs::path path;
    scratch_dir() {
        std::string pattern = (fs::temp_directory_path() / "sm-cpio-XXXXXX").string();
        path = ::mkdtemp(pattern.data());
    }
    ~scratch_dir() { fs::remove_all(path); }
};

std::string read_text(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

void write_bytes(const fs::path& path, std::span<const std::byte> bytes) {
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()),
               static_cast<std::streamsize>(bytes.size()));
}

std::vector<initramfs_entry> sample_entries() {
    std::vector<initramfs_entry> e;
    e.push_back(initramfs_entry::directory("bin"));
    e.push_back(initramfs_entry::directory("/etc", 0700)); // leading '/' is stripped
    for (int n = 0; n < 6; ++n) // every padding remainder for names and data
        e.push_back(initramfs_entry::text_file("etc/f" + std::string(n, 'x'),
                                               std::string(n, 'a' + n), 0600 + n));
    auto owned = initramfs_entry::text_file("etc/owned", "owner\n", 0640);
    owned.attributes.uid = 1234;
    owned.attributes.gid = 4321;
    owned.attributes.mtime = 1'000'000'000;
    e.push_back(owned);
    e.push_back(initramfs_entry::text_file("bin/tool", "#!/bin/sh\necho hi\n", 0755));
    e.push_back(initramfs_entry::symlink("bin/sh", "tool"));
    e.push_back(initramfs_entry::directory("dev"));
    e.push_back(initramfs_entry::device("dev/console", cpio_kind::character_device, 5, 1, 0600));
    e.push_back(initramfs_entry::device("dev/vda", cpio_kind::block_device, 254, 0, 0660));
    std::vector<std::byte> big(100'003);
    for (std::size_t i = 0; i < big.size(); ++i)
        big[i] = static_cast<std::byte>(i * 31 % 251);
    e.push_back(initramfs_entry::file("big.bin", big));
    return e;
}

bool have(const char* tool) {
    return std::system((std::string("command -v ") + tool + " >/dev/null").c_str()) == 0;
}

} // namespace

BOOST_AUTO_TEST_SUITE(cpio_newc)

BOOST_AUTO_TEST_CASE(format_is_newc_with_4_byte_alignment) {
    const auto archive = build_initramfs(sample_entries()).value();
    BOOST_TEST(archive.size() % 4 == 0u);
    BOOST_TEST(std::memcmp(archive.data(), "070701", 6) == 0);
    const std::string text(reinterpret_cast<const char*>(archive.data()), archive.size());
    BOOST_TEST(text.find("TRAILER!!!") != std::string::npos);
    BOOST_TEST(text.rfind("070701") + 110 + 11 + 1 <= text.size()); // trailer is last
}

BOOST_AUTO_TEST_CASE(gnu_cpio_lists_and_extracts_it) {
    test::skip_unless(have("cpio"), "cpio not installed");
    scratch_dir dir;
    write_bytes(dir.path / "a.cpio", build_initramfs(sample_entries()).value());
    const std::string list =
        "cd '" + dir.path.string() + "' && cpio -itv --quiet < a.cpio > list 2> err";
    BOOST_TEST_REQUIRE(std::system(list.c_str()) == 0, read_text(dir.path / "err"));
    const auto listing = read_text(dir.path / "list");
    BOOST_TEST_MESSAGE(listing);
    BOOST_TEST(listing.find("crw-------") != std::string::npos);
    BOOST_TEST(listing.find("5,   1") != std::string::npos, listing);
    BOOST_TEST(listing.find("brw-rw----") != std::string::npos);
    BOOST_TEST(listing.find("254,   0") != std::string::npos, listing);
    BOOST_TEST(listing.find("bin/sh -> tool") != std::string::npos);
    BOOST_TEST(listing.find("1234     4321") != std::string::npos, listing);
    BOOST_TEST(listing.find("-rwxr-xr-x") != std::string::npos);
    BOOST_TEST(listing.find("drwx------") != std::string::npos); // etc 0700
    BOOST_TEST(listing.find("/etc") == std::string::npos);       // stored relative

    fs::create_directory(dir.path / "x");
    // Device nodes need root to create; extract everything else as anyone.
    const std::string extract = "cd '" + dir.path.string() +
                                "/x' && cpio -idm --quiet --no-absolute-filenames --nonmatching "
                                "'dev/*' < ../a.cpio 2> ../err2";
    BOOST_TEST_REQUIRE(std::system(extract.c_str()) == 0, read_text(dir.path / "err2"));
    const auto x = dir.path / "x";
    BOOST_TEST(read_text(x / "bin/tool") == "#!/bin/sh\necho hi\n");
    BOOST_TEST(fs::is_symlink(x / "bin/sh"));
    BOOST_TEST(fs::read_symlink(x / "bin/sh") == "tool");
    for (int n = 0; n < 6; ++n) {
        const auto p = x / ("etc/f" + std::string(n, 'x'));
        BOOST_TEST(read_text(p) == std::string(n, 'a' + n));
        struct stat st {};
        BOOST_TEST(::stat(p.c_str(), &st) == 0);
        BOOST_TEST((st.st_mode & 07777) == static_cast<unsigned>(0600 + n));
    }
    struct stat st {};
    BOOST_TEST(::stat((x / "etc/owned").c_str(), &st) == 0);
    BOOST_TEST(st.st_mtime == 1'000'000'000);
    const auto big = read_text(x / "big.bin");
    BOOST_TEST_REQUIRE(big.size() == 100'003u);
    bool same = true;
    for (std::size_t i = 0; i < big.size(); ++i)
        same = same && static_cast<unsigned char>(big[i]) == i * 31 % 251;
    BOOST_TEST(same);
}

BOOST_AUTO_TEST_CASE(gzip_archive_decompresses_to_the_same_cpio) {
    test::skip_unless(have("gzip"), "gzip not installed");
    scratch_dir dir;
    const auto plain = build_initramfs(sample_entries()).value();
    const auto packed = build_initramfs(sample_entries(), initramfs_compression::gzip).value();
    BOOST_TEST(packed.size() < plain.size());
    BOOST_TEST(static_cast<unsigned>(packed[0]) == 0x1fu);
    BOOST_TEST(static_cast<unsigned>(packed[1]) == 0x8bu);
    write_bytes(dir.path / "a.cpio.gz", packed);
    const std::string unpack = "cd '" + dir.path.string() + "' && gzip -dc a.cpio.gz > a.cpio";
    BOOST_TEST_REQUIRE(std::system(unpack.c_str()) == 0);
    const auto round = read_text(dir.path / "a.cpio");
    BOOST_TEST_REQUIRE(round.size() == plain.size());
    BOOST_TEST(std::memcmp(round.data(), plain.data(), plain.size()) == 0);
}

BOOST_AUTO_TEST_CASE(bad_entries_are_rejected) {
    std::vector<std::byte> out;
    cpio_writer writer(
        [&](std::span<const std::byte> b) { out.insert(out.end(), b.begin(), b.end()); });
    BOOST_TEST(writer.add_directory("").error() == errc::invalid_argument);
    BOOST_TEST(writer.add_directory("/").error() == errc::invalid_argument);
    BOOST_TEST(writer.add_directory(std::string(5000, 'a')).error() == errc::invalid_argument);
    BOOST_TEST(writer.add_directory(std::string("a\0b", 3)).error() == errc::invalid_argument);
    BOOST_TEST(writer.add_directory("TRAILER!!!").error() == errc::invalid_argument);
    BOOST_TEST(writer.add_symlink("l", "").error() == errc::invalid_argument);
    BOOST_TEST(writer.add_device("d", cpio_kind::regular, 1, 1).error() == errc::invalid_argument);
    BOOST_TEST(out.empty());
    BOOST_TEST(writer.finish().has_value());
    BOOST_TEST(writer.add_directory("late").error() == errc::invalid_argument);
    BOOST_TEST(writer.finish().error() == errc::invalid_argument);

    // A failing sink stops the writer with its error.
    cpio_writer failing([](std::span<const std::byte>) -> result<void> { return errc::io_error; });
    BOOST_TEST(failing.add_directory("a").error() == errc::io_error);
}

BOOST_AUTO_TEST_SUITE_END()
