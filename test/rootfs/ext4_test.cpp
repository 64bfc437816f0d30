// The ext4 writer and the cached builder, checked with e2fsprogs: e2fsck -fn
// must find the image clean and debugfs must read back what the layers said.
#include <supermachine/oci/ext4_writer.hpp>
#include <supermachine/oci/passwd.hpp>
#include <supermachine/oci/rootfs_builder.hpp>

#include "rootfs_fixture.hpp"

#include <boost/test/unit_test.hpp>

#include <regex>

using namespace rootfs_test;
namespace sm = supermachine;

namespace {

void need_e2fsprogs() {
    supermachine::test::skip_unless(have_tool("e2fsck") && have_tool("debugfs"), "e2fsprogs not installed");
}

std::pair<int, std::string> fsck(const fs::path& image) {
    return run("e2fsck -fn " + shell_quote(image.string()) + " 2>&1");
}

std::string debugfs(const fs::path& image, const std::string& request) {
    return run("debugfs -R " + shell_quote(request) + " " + shell_quote(image.string()) + " 2>/dev/null").second;
}

bool contains(const std::string& text, const std::string& what) { return text.find(what) != std::string::npos; }

struct fixture {
    temp_dir dir;
    temp_dir escape;
    fs::path layers, spool, image;
    fixture() : layers(dir.path / "layers"), spool(dir.path / "spool"), image(dir.path / "rootfs.ext4") {
        need_e2fsprogs();
        fs::create_directories(spool);
        make_layers(layers, escape.path / "target");
    }
    std::vector<fs::path> all_layers() const {
        return {layers / "l1.tar.gz", layers / "l2.tar.zst", layers / "l3.tar.gz"};
    }
};

// A synthetic tar stream: one regular file "huge" of `size` patterned bytes.
class patterned_tar {
public:
    explicit patterned_tar(std::uint64_t size) : size_(size) {
        header_.assign(512, '\0');
        std::memcpy(header_.data(), "huge", 4);
        std::snprintf(header_.data() + 100, 8, "%07o", 0640);
        std::snprintf(header_.data() + 108, 8, "%07o", 1234);
        std::snprintf(header_.data() + 116, 8, "%07o", 5678);
        std::snprintf(header_.data() + 124, 12, "%011llo", static_cast<unsigned long long>(size));
        std::snprintf(header_.data() + 136, 12, "%011o", 1600000000u);
        header_[156] = '0';
        std::memcpy(header_.data() + 257, "ustar\0" "00", 8);
        std::memset(header_.data() + 148, ' ', 8);
        unsigned sum = 0;
        for (unsigned char c : header_) sum += c;
        std::snprintf(header_.data() + 148, 8, "%06o", sum);
        total_ = 512 + (size + 511) / 512 * 512 + 1024;
    }
    static std::uint8_t byte_at(std::uint64_t i) { return static_cast<std::uint8_t>(i * 7 + i / 4096); }
    sm::result<std::size_t> read_some(std::span<std::byte> out) {
        std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(out.size(), total_ - pos_));
        for (std::size_t k = 0; k < n; ++k) {
            std::uint64_t p = pos_ + k;
            std::uint8_t b = 0;
            if (p < 512) b = static_cast<std::uint8_t>(header_[p]);
            else if (p - 512 < size_) b = byte_at(p - 512);
            out[k] = std::byte(b);
        }
        pos_ += n;
        return n;
    }

private:
    std::string header_;
    std::uint64_t size_, total_, pos_ = 0;
};

std::map<std::string, std::string> without_links_and_specials(std::map<std::string, std::string> l) {
    std::map<std::string, std::string> out;
    for (auto& [path, line] : l) {
        // rdump skips special files and drops setuid/sticky bits: those are checked with stat.
        if (line == "device" || line.starts_with("fifo") || path == "/lost+found" || path == "/tmp" ||
            path == "/usr/bin/setuid")
            continue;
        auto cut = line.find(" link-group=");
        out[path] = cut == std::string::npos ? line : line.substr(0, cut);
    }
    return out;
}

} // namespace

BOOST_AUTO_TEST_SUITE(rootfs_ext4)

BOOST_AUTO_TEST_CASE(image_is_clean_and_reads_back) {
    fixture f;
    auto tree = merge(f.spool, f.all_layers());
    BOOST_REQUIRE(tree);
    oci::ext4_options options;
    options.timestamp = 1700000000;
    auto stats = oci::write_ext4(tree.value(), f.image, options);
    BOOST_REQUIRE_MESSAGE(stats, (stats ? "" : stats.error().message()));
    auto [rc, out] = fsck(f.image);
    BOOST_TEST(rc == 0, out);
    BOOST_TEST_MESSAGE(out);
    // Sized to the content plus free space (20% + 64 MiB by default).
    BOOST_TEST(stats.value().image_bytes >= (64u << 20));
    BOOST_TEST(stats.value().image_bytes < (80u << 20));

    // Every file, directory and symlink: debugfs rdump against our tree.
    auto dump = f.dir.path / "dump";
    fs::create_directories(dump);
    debugfs(f.image, "rdump / " + dump.string());
    auto ours = without_links_and_specials(list_tree(tree.value()));
    auto back = without_links_and_specials(list_host(dump));
    BOOST_TEST(ours.size() > 40u);
    for (auto& [path, line] : ours) BOOST_TEST(back[path] == line, path);
    BOOST_TEST(back.size() == ours.size());

    auto owned = debugfs(f.image, "stat /home/app/owned");
    BOOST_TEST(contains(owned, "User:  1000   Group:  1000"), owned);
    BOOST_TEST(contains(owned, "mtime: 0x499602d2"), owned); // 1234567890
    auto high = debugfs(f.image, "stat /highuid");
    // debugfs prints ids as signed 32-bit: 3000000000 shows as -1294967296.
    BOOST_TEST(contains(high, "User: -1294967296   Group: -1294967295"), high);
    auto nano = debugfs(f.image, "stat /nanotime");
    BOOST_TEST(contains(nano, "mtime: 0x6553f100:1d6f3454"), nano); // nsec 123456789 << 2
    auto ping = debugfs(f.image, "stat /bin/ping");
    BOOST_TEST(contains(ping, "security.capability (20) = 01 00 00 02 00 20 00 00"), ping);
    BOOST_TEST(contains(ping, "user.comment (6) = \"pinger\""), ping);
    auto null = debugfs(f.image, "stat /dev/null");
    BOOST_TEST(contains(null, "Type: character special"), null);
    BOOST_TEST(contains(null, "Mode:  0666"), null);
    BOOST_TEST(contains(null, "Device major/minor number: 01:03"), null);
    auto sda = debugfs(f.image, "stat /dev/sda");
    BOOST_TEST(contains(sda, "Type: block special"), sda);
    BOOST_TEST(contains(sda, "Group:     6"), sda);
    auto big = debugfs(f.image, "stat /dev/bigminor");
    BOOST_TEST(contains(big, "300:70000"), big);
    auto fifo = debugfs(f.image, "stat /dev/fifo");
    BOOST_TEST(contains(fifo, "Type: FIFO"), fifo);
    BOOST_TEST(contains(fifo, "Mode:  0620"), fifo);
    auto tmp = debugfs(f.image, "stat /tmp");
    BOOST_TEST(contains(tmp, "Mode:  01777"), tmp);
    auto setuid = debugfs(f.image, "stat /usr/bin/setuid");
    BOOST_TEST(contains(setuid, "Mode:  04755"), setuid);
    auto sh = debugfs(f.image, "stat /bin/sh");
    BOOST_TEST(contains(sh, "Fast link dest: \"busybox\""), sh);
    // Hard links: one inode, link count 3.
    auto bb = debugfs(f.image, "stat /bin/busybox");
    BOOST_TEST(contains(bb, "Links: 3"), bb);
    std::smatch m;
    auto listing = debugfs(f.image, "ls -l /bin");
    std::regex line_re(R"(^\s*(\d+)\s+\d+ \(\d\)\s+\d+\s+\d+\s+\d+\s+\S+ \S+ (\S+)\s*$)");
    std::map<std::string, std::string> inode_of;
    std::istringstream in(listing);
    for (std::string line; std::getline(in, line);)
        if (std::regex_match(line, m, line_re)) inode_of[m[2]] = m[1];
    BOOST_TEST(!inode_of["busybox"].empty());
    BOOST_TEST(inode_of["ls"] == inode_of["busybox"]);
    BOOST_TEST(inode_of["cat"] == inode_of["busybox"]);
    auto passwd = debugfs(f.image, "stat /etc/passwd");
    BOOST_TEST(contains(passwd, "Links: 2"), passwd); // + passwd-hardlink from layer 2
}

BOOST_AUTO_TEST_CASE(large_file_spans_groups_with_an_extent_tree) {
    need_e2fsprogs();
    temp_dir d;
    const std::uint64_t size = (std::uint64_t{600} << 20) + 123; // > 4 groups: index + leaf
    auto tree = oci::filesystem_tree::create(d.path).value();
    auto applied = oci::apply_layer(tree, patterned_tar(size), 1);
    BOOST_REQUIRE_MESSAGE(applied, (applied ? "" : applied.error().message()));
    // Many small files as well, so the inode tables span groups too.
    auto image = d.path / "big.ext4";
    auto stats = oci::write_ext4(tree, image);
    BOOST_REQUIRE(stats);
    BOOST_TEST(stats.value().groups >= 5u);
    auto [rc, out] = fsck(image);
    BOOST_TEST(rc == 0, out);
    auto st = debugfs(image, "stat /huge");
    BOOST_TEST(contains(st, "(ETB0)"), st); // an extent tree block, not just in-inode extents
    BOOST_TEST(contains(st, "User:  1234   Group:  5678"), st);
    BOOST_TEST(contains(st, "Size: " + std::to_string(size)), st);
    auto dumped = d.path / "huge.out";
    debugfs(image, "dump /huge " + dumped.string());
    BOOST_REQUIRE(fs::file_size(dumped) == size);
    std::ifstream inf(dumped, std::ios::binary);
    std::vector<char> buffer(1 << 20);
    std::uint64_t pos = 0, mismatches = 0;
    while (inf) {
        inf.read(buffer.data(), buffer.size());
        for (std::streamsize i = 0; i < inf.gcount(); ++i, ++pos)
            if (static_cast<std::uint8_t>(buffer[i]) != patterned_tar::byte_at(pos)) ++mismatches;
    }
    BOOST_TEST(pos == size);
    BOOST_TEST(mismatches == 0u);
}

BOOST_AUTO_TEST_CASE(many_files_and_a_big_directory) {
    need_e2fsprogs();
    temp_dir d;
    auto tree = oci::filesystem_tree::create(d.path).value();
    struct no_data {
        sm::result<std::size_t> read_data(std::span<std::byte>) { return std::size_t{0}; }
    } none;
    for (int i = 0; i < 40000; ++i) {
        oci::tar_entry e;
        e.path = "dir/" + std::string(100, 'n') + std::to_string(i);
        e.mode = 0600;
        e.uid = 70000 + i;
        BOOST_REQUIRE(tree.apply(e, none, 1));
    }
    auto image = d.path / "many.ext4";
    oci::ext4_options small;
    small.free_space_bytes = 0;
    auto stats = oci::write_ext4(tree, image, small);
    BOOST_REQUIRE(stats);
    BOOST_TEST(stats.value().inodes_used >= 40000u);
    auto [rc, out] = fsck(image);
    BOOST_TEST(rc == 0, out);
    auto st = debugfs(image, "stat /dir/" + std::string(100, 'n') + "39999");
    BOOST_TEST(contains(st, "User: 109999"), st);
}

BOOST_AUTO_TEST_CASE(builder_caches_per_digest_and_writes_only_its_cache) {
    fixture f;
    temp_dir cache;
    oci::rootfs_build_options options;
    options.cache_dir = cache.path;
    auto layers = f.all_layers();
    const std::string digest = "sha256:" + std::string(64, 'a');
    auto first = oci::build_rootfs(digest, layers, options);
    BOOST_REQUIRE_MESSAGE(first, (first ? "" : first.error().message()));
    BOOST_TEST(!first.value().reused);
    BOOST_TEST(first.value().path == cache.path / "rootfs" / ("sha256-" + std::string(64, 'a') + ".ext4"));
    BOOST_TEST(first.value().layers.size() == 3u);
    BOOST_TEST((first.value().layers[1].format == oci::compression::zstd));
    BOOST_TEST(contains(first.value().passwd, "app:x:1000:1000"));
    BOOST_TEST(contains(first.value().group, "wheel:x:10:app,root"));
    auto [rc, out] = fsck(first.value().path);
    BOOST_TEST(rc == 0, out);
    auto mtime = fs::last_write_time(first.value().path);

    auto second = oci::build_rootfs(digest, layers, options);
    BOOST_REQUIRE(second);
    BOOST_TEST(second.value().reused);
    BOOST_TEST(second.value().passwd == first.value().passwd);
    BOOST_TEST(second.value().group == first.value().group);
    BOOST_TEST((fs::last_write_time(second.value().path) == mtime));

    // The image's config User resolves against the image's own files.
    auto user = oci::resolve_user("app", second.value().passwd, second.value().group);
    BOOST_REQUIRE(user);
    BOOST_TEST(user.value().uid == 1000u);
    BOOST_TEST(user.value().home == "/home/app");
    BOOST_TEST((user.value().supplementary_gids == std::vector<std::uint32_t>{10, 29}));

    std::set<std::string> expected{"rootfs",
                                   "rootfs/sha256-" + std::string(64, 'a') + ".ext4",
                                   "rootfs/sha256-" + std::string(64, 'a') + ".passwd",
                                   "rootfs/sha256-" + std::string(64, 'a') + ".group",
                                   "rootfs/sha256-" + std::string(64, 'a') + ".lock"};
    BOOST_TEST((files_below(cache.path) == expected));

    // Digests become file names: anything else is refused before touching the disk.
    for (std::string bad : {"sha256", "sha256:../../x", "../sha256:aa", "sha256:a/b", ":abc", "sha256:"}) {
        auto r = oci::build_rootfs(bad, layers, options);
        BOOST_TEST(r.error() == sm::errc::bad_digest, bad);
    }
    // A failing layer leaves nothing behind but the lock.
    std::vector<fs::path> broken{f.layers / "hostile" / "truncated.tar"};
    auto r = oci::build_rootfs("sha256:" + std::string(64, 'b'), broken, options);
    BOOST_TEST(r.error() == sm::errc::archive_malformed);
    BOOST_TEST(!fs::exists(cache.path / "rootfs" / ("sha256-" + std::string(64, 'b') + ".ext4")));
    BOOST_TEST(files_below(cache.path).size() == expected.size() + 1); // + its .lock
}

BOOST_AUTO_TEST_SUITE_END()
