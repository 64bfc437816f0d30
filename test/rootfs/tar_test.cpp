// The tar reader and decompression against archives made by GNU tar, python's
// tarfile, gzip and zstd, and against crafted hostile streams.
#include <supermachine/oci/decompress.hpp>
#include <supermachine/oci/tar_reader.hpp>

#include "rootfs_fixture.hpp"

#include <boost/test/unit_test.hpp>

#include <zlib.h>
#include <zstd.h>

using namespace rootfs_test;
namespace sm = supermachine;

namespace {

struct read_all_result {
    std::vector<oci::tar_entry> entries;
    std::vector<std::string> data;
    supermachine::error_code error;
};

template <class Source>
read_all_result read_all(Source source, oci::decompress_limits dl = {}, oci::tar_limits tl = {}) {
    read_all_result out;
    oci::decompressing_source<Source> stream(std::move(source), dl);
    oci::tar_reader<oci::decompressing_source<Source>> reader(stream, tl);
    for (;;) {
        auto next = reader.next();
        if (!next) {
            out.error = next.error();
            return out;
        }
        if (!next.value()) return out;
        std::string data;
        std::vector<std::byte> buffer(7777);
        for (;;) {
            auto got = reader.read_data(buffer);
            if (!got) {
                out.error = got.error();
                return out;
            }
            if (got.value() == 0) break;
            data.append(reinterpret_cast<const char*>(buffer.data()), got.value());
        }
        out.entries.push_back(std::move(*next.value()));
        out.data.push_back(std::move(data));
    }
}

read_all_result read_file(const fs::path& p, oci::decompress_limits dl = {},
                          oci::tar_limits tl = {}) {
    return read_all(oci::file_source::open(p).value(), dl, tl);
}

const oci::tar_entry* find(const read_all_result& r, std::string_view path) {
    for (auto& e : r.entries) {
        std::string_view p = e.path;
        if (p.starts_with("./")) p.remove_prefix(2);
        if (p.size() > 1 && p.ends_with('/')) p.remove_suffix(1);
        if (p == path) return &e;
    }
    return nullptr;
}

struct layers_fixture {
    temp_dir dir;
    temp_dir escape;
    layers_fixture() { make_layers(dir.path / "layers", escape.path / "target"); }
    fs::path layer(const std::string& name) const { return dir.path / "layers" / name; }
};

std::string zstd_bytes(const std::string& data) {
    std::string out(ZSTD_compressBound(data.size()), '\0');
    out.resize(ZSTD_compress(out.data(), out.size(), data.data(), data.size(), 3));
    return out;
}

std::span<const std::byte> bytes(const std::string& s) {
    return std::as_bytes(std::span(s));
}

} // namespace

BOOST_AUTO_TEST_SUITE(rootfs_tar)

BOOST_AUTO_TEST_CASE(detects_format_by_magic_not_name) {
    layers_fixture f;
    auto plain = read_file(f.layer("l2.tar"));
    auto zst = read_file(f.layer("l2.tar.zst"));
    auto lying = read_file(f.layer("mislabelled.tar.gz")); // zstd under a .gz name
    BOOST_TEST(!plain.error);
    BOOST_TEST(!zst.error);
    BOOST_TEST(!lying.error);
    BOOST_TEST(plain.entries.size() > 10u);
    BOOST_TEST(zst.entries.size() == plain.entries.size());
    BOOST_TEST(lying.entries.size() == plain.entries.size());
    BOOST_TEST(zst.data == plain.data);
    oci::decompressing_source<oci::file_source> s(
        oci::file_source::open(f.layer("mislabelled.tar.gz")).value());
    std::array<std::byte, 10> b;
    BOOST_TEST(s.read_some(b).value() == 10u);
    BOOST_TEST((s.format() == oci::compression::zstd));
}

BOOST_AUTO_TEST_CASE(multi_member_gzip_reads_to_the_end) {
    layers_fixture f;
    auto gz = read_file(f.layer("l3.tar.gz"));
    auto plain = read_file(f.layer("l3.tar"));
    BOOST_TEST(!gz.error);
    BOOST_TEST(gz.entries.size() == 2u);
    BOOST_TEST(gz.data == plain.data);
    BOOST_TEST(gz.data[0] == "layer three\n");
}

BOOST_AUTO_TEST_CASE(gnu_long_names_links_devices_and_base_fields) {
    layers_fixture f;
    auto r = read_file(f.layer("l1.tar.gz"));
    BOOST_REQUIRE(!r.error);
    auto* longfile = find(r, "long/" + std::string(90, 'd') + "/" + std::string(90, 'e') +
                                 "/file-with-a-long-path");
    BOOST_REQUIRE(longfile);
    auto* longlink = find(r, "long/link");
    BOOST_REQUIRE(longlink);
    BOOST_TEST(longlink->link_target == "../../../" + std::string(150, 't'));
    BOOST_TEST((longlink->type == oci::entry_type::symlink));
    auto* null = find(r, "dev/null");
    BOOST_REQUIRE(null);
    BOOST_TEST((null->type == oci::entry_type::char_device));
    BOOST_TEST(null->device_major == 1u);
    BOOST_TEST(null->device_minor == 3u);
    auto* big = find(r, "dev/bigminor");
    BOOST_REQUIRE(big);
    BOOST_TEST(big->device_minor == 70000u); // > 2^16: needs the octal field's full width
    auto* sda = find(r, "dev/sda");
    BOOST_TEST((sda->type == oci::entry_type::block_device));
    BOOST_TEST(sda->gid == 6u);
    auto* fifo = find(r, "dev/fifo");
    BOOST_TEST((fifo->type == oci::entry_type::fifo));
    BOOST_TEST(fifo->mode == 0620u);
    auto* ls = find(r, "bin/ls");
    BOOST_TEST((ls->type == oci::entry_type::hard_link));
    BOOST_TEST(ls->link_target == "bin/busybox");
    auto* owned = find(r, "home/app/owned");
    BOOST_TEST(owned->uid == 1000u);
    BOOST_TEST(owned->mtime == 1234567890);
    auto* setuid = find(r, "usr/bin/setuid");
    BOOST_TEST(setuid->mode == 04755u);
    auto* tmp = find(r, "tmp");
    BOOST_TEST(tmp->mode == 01777u);
    auto* bigfile = find(r, "big");
    BOOST_TEST(bigfile->size == 3u * 1024 * 1024 + 4);
}

BOOST_AUTO_TEST_CASE(pax_paths_ids_times_and_xattrs) {
    layers_fixture f;
    auto r = read_file(f.layer("l2.tar"));
    BOOST_REQUIRE(!r.error);
    std::string deep = "pax/";
    for (int i = 0; i < 5; ++i)
        deep += std::string(60, 'p') + "/";
    BOOST_TEST(find(r, deep + "deep"));
    auto* ping = find(r, "bin/ping");
    BOOST_REQUIRE(ping);
    BOOST_REQUIRE(ping->xattrs.size() == 2u);
    bool cap = false;
    for (auto& x : ping->xattrs)
        if (x.name == "security.capability")
            cap = x.value.size() == 20 && x.value[0] == 1 && x.value[5] == 0x20;
    BOOST_TEST(cap);
    auto* high = find(r, "highuid");
    BOOST_TEST(high->uid == 3000000000u);
    BOOST_TEST(high->gid == 3000000001u);
    auto* nano = find(r, "nanotime");
    BOOST_TEST(nano->mtime == 1700000000);
    BOOST_TEST(nano->mtime_nsec == 123456789u);
}

BOOST_AUTO_TEST_CASE(gnu_tar_formats_agree) {
    supermachine::test::skip_unless(have_tool("tar"), "GNU tar missing");
    temp_dir t;
    auto src = t.path / "src";
    fs::create_directories(src / std::string(120, 'x') / std::string(120, 'y'));
    std::ofstream(src / std::string(120, 'x') / std::string(120, 'y') / "f") << "data";
    fs::create_symlink(std::string(130, 'l'), src / "sym");
    for (std::string format : {"gnu", "pax", "ustar", "v7"}) {
        auto tarball = t.path / (format + ".tar");
        auto [rc, out] = run("tar --format=" + format + " -cf " + shell_quote(tarball.string()) +
                             " -C " + shell_quote(src.string()) + " . 2>&1");
        if (rc != 0) {
            // ustar / v7 cannot store these names: tar itself refuses.
            BOOST_TEST_MESSAGE(format << ": tar refused: " << out);
            continue;
        }
        auto r = read_file(tarball);
        BOOST_TEST(!r.error, format);
        auto* file = find(r, std::string(120, 'x') + "/" + std::string(120, 'y') + "/f");
        BOOST_TEST(file, format);
        if (file) BOOST_TEST(r.data[file - r.entries.data()] == "data");
        auto* sym = find(r, "sym");
        BOOST_TEST(sym, format);
        if (sym) BOOST_TEST(sym->link_target == std::string(130, 'l'));
    }
}

BOOST_AUTO_TEST_CASE(pax_global_headers_apply_to_later_entries) {
    supermachine::test::skip_unless(have_tool("python3"), "python3 missing");
    temp_dir t;
    auto tarball = t.path / "global.tar";
    auto [rc, out] = run("python3 -c " + shell_quote(R"(
import tarfile, io, sys
with tarfile.open(sys.argv[1], 'w', format=tarfile.PAX_FORMAT, pax_headers={'uid': '4242', 'mtime': '5.25'}) as t:
    for name in ['a', 'b']:
        ti = tarfile.TarInfo(name); ti.size = 1
        if name == 'b': ti.pax_headers = {'uid': '7'}
        t.addfile(ti, io.BytesIO(b'x'))
)") + " " + shell_quote(tarball.string()) +
                         " 2>&1");
    BOOST_REQUIRE_MESSAGE(rc == 0, out);
    auto r = read_file(tarball);
    BOOST_REQUIRE(!r.error);
    BOOST_REQUIRE(r.entries.size() == 2u);
    BOOST_TEST(r.entries[0].uid == 4242u);
    BOOST_TEST(r.entries[0].mtime == 5);
    BOOST_TEST(r.entries[0].mtime_nsec == 250000000u);
    BOOST_TEST(r.entries[1].uid == 7u); // a local record beats the global one
}

BOOST_AUTO_TEST_CASE(gnu_base256_numbers) {
    supermachine::test::skip_unless(have_tool("python3"), "python3 missing");
    temp_dir t;
    auto tarball = t.path / "b256.tar";
    // GNU format stores numbers too big for octal in base-256 (high bit set).
    auto [rc, out] = run("python3 -c " + shell_quote(R"(
import tarfile, io, sys
with tarfile.open(sys.argv[1], 'w', format=tarfile.GNU_FORMAT) as t:
    ti = tarfile.TarInfo('big-ids'); ti.size = 2; ti.uid = 3000000000; ti.gid = 4000000000; ti.mtime = 2**35
    t.addfile(ti, io.BytesIO(b'ok'))
)") + " " + shell_quote(tarball.string()) +
                         " 2>&1");
    BOOST_REQUIRE_MESSAGE(rc == 0, out);
    std::ifstream in(tarball, std::ios::binary);
    std::string raw((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    BOOST_TEST((static_cast<unsigned char>(raw[108]) & 0x80) != 0); // uid really is base-256
    auto r = read_file(tarball);
    BOOST_REQUIRE(!r.error);
    BOOST_REQUIRE(r.entries.size() == 1u);
    BOOST_TEST(r.entries[0].uid == 3000000000u);
    BOOST_TEST(r.entries[0].gid == 4000000000u);
    BOOST_TEST(r.entries[0].mtime == (std::int64_t{1} << 35));
    BOOST_TEST(r.data[0] == "ok");
}

BOOST_AUTO_TEST_CASE(hostile_streams_are_clean_errors) {
    layers_fixture f;
    auto h = [&](const char* name) {
        return read_file(f.dir.path / "layers" / "hostile" / name).error;
    };
    BOOST_TEST(h("truncated.tar") == sm::errc::archive_malformed);
    BOOST_TEST(h("truncated_header.tar") == sm::errc::archive_malformed);
    BOOST_TEST(h("no_end_marker.tar") == sm::errc::archive_malformed);
    BOOST_TEST(h("truncated.tar.gz") == sm::errc::archive_malformed);
    BOOST_TEST(h("bad_checksum.tar") == sm::errc::archive_malformed);
    BOOST_TEST(h("huge_size.tar") == sm::errc::image_too_large);
    BOOST_TEST(h("pax_bad_length.tar") == sm::errc::archive_malformed);
    // A size bound below the file's size is enforced before reading data.
    oci::tar_limits small;
    small.max_entry_size = 100;
    BOOST_TEST(read_file(f.layer("l1.tar.gz"), {}, small).error == sm::errc::image_too_large);
}

BOOST_AUTO_TEST_CASE(zip_bombs_stop_at_the_limits) {
    std::string zeros(48 << 20, '\0');
    std::string bomb = zstd_bytes(zeros);
    BOOST_TEST_MESSAGE("bomb: " << bomb.size() << " bytes for " << zeros.size());
    oci::decompress_limits ratio;
    ratio.ratio_grace = 1 << 20;
    ratio.max_ratio = 100;
    std::vector<std::byte> buffer(1 << 16);
    {
        oci::decompressing_source<oci::memory_source> s(oci::memory_source(bytes(bomb)), ratio);
        supermachine::error_code ec;
        for (;;) {
            auto got = s.read_some(buffer);
            if (!got) {
                ec = got.error();
                break;
            }
            if (!got.value()) break;
        }
        BOOST_TEST(ec == sm::errc::image_too_large);
        BOOST_TEST(s.output_bytes() < (4u << 20)); // stopped early, not after inflating it all
    }
    oci::decompress_limits total;
    total.max_output = 8 << 20;
    {
        // gzip this time, through the tar reader (a tar of one 48 MiB file of zeros)
        std::string tar(512, '\0');
        std::memcpy(tar.data(), "zeros", 5);
        std::snprintf(tar.data() + 100, 8, "%07o", 0644);
        std::snprintf(tar.data() + 124, 12, "%011o", unsigned(zeros.size()));
        tar[156] = '0';
        std::memcpy(tar.data() + 257,
                    "ustar\0"
                    "00",
                    8);
        std::memset(tar.data() + 148, ' ', 8);
        unsigned sum = 0;
        for (unsigned char c : tar)
            sum += c;
        std::snprintf(tar.data() + 148, 8, "%06o", sum);
        tar += zeros;
        tar += std::string(1024, '\0');
        uLongf len = compressBound(tar.size());
        std::string z(len, '\0');
        // zlib format, not gzip: wrap it by hand as a gzip member via deflateInit2.
        z_stream zs{};
        deflateInit2(&zs, 9, Z_DEFLATED, 16 + MAX_WBITS, 9, Z_DEFAULT_STRATEGY);
        zs.next_in = reinterpret_cast<Bytef*>(tar.data());
        zs.avail_in = tar.size();
        zs.next_out = reinterpret_cast<Bytef*>(z.data());
        zs.avail_out = z.size();
        deflate(&zs, Z_FINISH);
        z.resize(zs.total_out);
        deflateEnd(&zs);
        auto r = read_all(oci::memory_source(bytes(z)), total);
        BOOST_TEST(r.error == sm::errc::image_too_large);
    }
}

BOOST_AUTO_TEST_CASE(trailing_garbage_after_gzip_is_an_error) {
    std::string data = "hello";
    z_stream zs{};
    std::string z(256, '\0');
    deflateInit2(&zs, 6, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY);
    zs.next_in = reinterpret_cast<Bytef*>(data.data());
    zs.avail_in = data.size();
    zs.next_out = reinterpret_cast<Bytef*>(z.data());
    zs.avail_out = z.size();
    deflate(&zs, Z_FINISH);
    z.resize(zs.total_out);
    deflateEnd(&zs);
    std::vector<std::byte> buffer(64);
    {
        oci::decompressing_source<oci::memory_source> s(oci::memory_source(bytes(z)));
        BOOST_TEST(s.read_some(buffer).value() == 5u);
        BOOST_TEST(s.read_some(buffer).value() == 0u);
    }
    std::string junk = z + "JUNK";
    oci::decompressing_source<oci::memory_source> s(oci::memory_source(bytes(junk)));
    BOOST_TEST(s.read_some(buffer).value() == 5u);
    auto r = s.read_some(buffer);
    BOOST_TEST(!r);
}

BOOST_AUTO_TEST_SUITE_END()
