// The ext4 writer and the cached builder, checked with e2fsprogs: e2fsck -fn
// must find the image clean and debugfs must read back what the layers said.
#include <supermachine/oci/ext4_writer.hpp>
#include <supermachine/oci/passwd.hpp>
#include <supermachine/oci/rootfs_builder.hpp>

#include "rootfs_fixture.hpp"

#include <boost/test/unit_test.hpp>

#include <regex>

#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <sys/xattr.h>

using namespace rootfs_test;
namespace sm = supermachine;

namespace {

void need_e2fsprogs() {
    supermachine::test::skip_unless(have_tool("e2fsck") && have_tool("debugfs"),
                                    "e2fsprogs not installed");
}

std::pair<int, std::string> fsck(const fs::path& image) {
    return run("e2fsck -fn " + shell_quote(image.string()) + " 2>&1");
}

std::string debugfs(const fs::path& image, const std::string& request) {
    return run("debugfs -R " + shell_quote(request) + " " + shell_quote(image.string()) +
               " 2>/dev/null")
        .second;
}

bool contains(const std::string& text, const std::string& what) {
    return text.find(what) != std::string::npos;
}

struct fixture {
    temp_dir dir;
    temp_dir escape;
    fs::path layers, spool, image;
    fixture()
        : layers(dir.path / "layers")
        , spool(dir.path / "spool")
        , image(dir.path / "rootfs.ext4") {
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
    explicit patterned_tar(std::uint64_t size)
        : size_(size) {
        header_.assign(512, '\0');
        std::memcpy(header_.data(), "huge", 4);
        std::snprintf(header_.data() + 100, 8, "%07o", 0640);
        std::snprintf(header_.data() + 108, 8, "%07o", 1234);
        std::snprintf(header_.data() + 116, 8, "%07o", 5678);
        std::snprintf(header_.data() + 124, 12, "%011llo", static_cast<unsigned long long>(size));
        std::snprintf(header_.data() + 136, 12, "%011o", 1600000000u);
        header_[156] = '0';
        std::memcpy(header_.data() + 257,
                    "ustar\0"
                    "00",
                    8);
        std::memset(header_.data() + 148, ' ', 8);
        unsigned sum = 0;
        for (unsigned char c : header_)
            sum += c;
        std::snprintf(header_.data() + 148, 8, "%06o", sum);
        total_ = 512 + (size + 511) / 512 * 512 + 1024;
    }
    static std::uint8_t byte_at(std::uint64_t i) {
        return static_cast<std::uint8_t>(i * 7 + i / 4096);
    }
    sm::result<std::size_t> read_some(std::span<std::byte> out) {
        std::size_t n =
            static_cast<std::size_t>(std::min<std::uint64_t>(out.size(), total_ - pos_));
        for (std::size_t k = 0; k < n; ++k) {
            std::uint64_t p = pos_ + k;
            std::uint8_t b = 0;
            if (p < 512)
                b = static_cast<std::uint8_t>(header_[p]);
            else if (p - 512 < size_)
                b = byte_at(p - 512);
            out[k] = std::byte(b);
        }
        pos_ += n;
        return n;
    }

private:
    std::string header_;
    std::uint64_t size_, total_, pos_ = 0;
};

std::map<std::string, std::string>
without_links_and_specials(std::map<std::string, std::string> l) {
    std::map<std::string, std::string> out;
    for (auto& [path, line] : l) {
        // rdump skips special files and drops setuid/sticky bits: those are checked with stat.
        if (line == "device" || line.starts_with("fifo") || path == "/lost+found" ||
            path == "/tmp" || path == "/usr/bin/setuid")
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
    for (auto& [path, line] : ours)
        BOOST_TEST(back[path] == line, path);
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
    // A crashed builder's temporary is cleaned up by the next build of that digest.
    fs::create_directories(cache.path / "rootfs");
    std::ofstream(cache.path / "rootfs" / ("sha256-" + std::string(64, 'a') + ".ext4.tmp-99999"))
        << "junk";
    auto first = oci::build_rootfs(digest, layers, options);
    BOOST_REQUIRE_MESSAGE(first, (first ? "" : first.error().message()));
    BOOST_TEST(!first.value().reused);
    BOOST_TEST(first.value().path ==
               cache.path / "rootfs" / ("sha256-" + std::string(64, 'a') + ".ext4"));
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

    std::set<std::string> expected{"rootfs", "rootfs/sha256-" + std::string(64, 'a') + ".ext4",
                                   "rootfs/sha256-" + std::string(64, 'a') + ".passwd",
                                   "rootfs/sha256-" + std::string(64, 'a') + ".group",
                                   "rootfs/sha256-" + std::string(64, 'a') + ".lock"};
    BOOST_TEST((files_below(cache.path) == expected));

    // Digests become file names: anything else is refused before touching the disk.
    for (std::string bad :
         {"sha256", "sha256:../../x", "../sha256:aa", "sha256:a/b", ":abc", "sha256:"}) {
        auto r = oci::build_rootfs(bad, layers, options);
        BOOST_TEST(r.error() == sm::errc::bad_digest, bad);
    }
    // From in-memory sources (any byte_source): same cache, a new digest.
    std::vector<std::string> blobs;
    for (auto& l : layers) {
        std::ifstream in(l, std::ios::binary);
        blobs.emplace_back((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    }
    auto from_memory = oci::build_rootfs_from(
        "sha256:" + std::string(64, 'c'), blobs.size(),
        [&](std::size_t i) -> sm::result<oci::memory_source> {
            return oci::memory_source(std::as_bytes(std::span(blobs[i])));
        },
        options);
    BOOST_REQUIRE(from_memory);
    BOOST_TEST(from_memory.value().passwd == first.value().passwd);
    BOOST_TEST(fsck(from_memory.value().path).first == 0);
    for (auto ext : {".ext4", ".passwd", ".group", ".lock"})
        expected.insert("rootfs/sha256-" + std::string(64, 'c') + ext);
    BOOST_TEST((files_below(cache.path) == expected));

    // A failing layer leaves nothing behind but the lock.
    std::vector<fs::path> broken{f.layers / "hostile" / "truncated.tar"};
    auto r = oci::build_rootfs("sha256:" + std::string(64, 'b'), broken, options);
    BOOST_TEST(r.error() == sm::errc::archive_malformed);
    BOOST_TEST(!fs::exists(cache.path / "rootfs" / ("sha256-" + std::string(64, 'b') + ".ext4")));
    BOOST_TEST(files_below(cache.path).size() == expected.size() + 1); // + its .lock
}

BOOST_AUTO_TEST_CASE(concurrent_builders_of_one_digest_build_once) {
    fixture f;
    temp_dir cache;
    oci::rootfs_build_options options;
    options.cache_dir = cache.path;
    auto layers = f.all_layers();
    const std::string digest = "sha256:" + std::string(64, 'd');
    std::vector<pid_t> children;
    for (int i = 0; i < 3; ++i) {
        pid_t pid = ::fork();
        if (pid == 0) {
            auto r = oci::build_rootfs(digest, layers, options);
            std::_Exit(!r ? 1 : r.value().reused ? 20 : 10);
        }
        children.push_back(pid);
    }
    int built = 0, reused = 0;
    for (pid_t pid : children) {
        int status = 0;
        ::waitpid(pid, &status, 0);
        BOOST_REQUIRE(WIFEXITED(status));
        if (WEXITSTATUS(status) == 10)
            ++built;
        else if (WEXITSTATUS(status) == 20)
            ++reused;
    }
    BOOST_TEST(built == 1);
    BOOST_TEST(reused == 2);
    auto path = oci::rootfs_path(cache.path, digest).value();
    BOOST_TEST(fsck(path).first == 0);
    BOOST_TEST(files_below(cache.path).size() == 5u); // rootfs/ + image, passwd, group, lock
}

BOOST_AUTO_TEST_CASE(linux_mounts_the_image) {
    supermachine::test::skip_unless(::geteuid() == 0, "loop-mounting needs root");
    fixture f;
    auto tree = merge(f.spool, f.all_layers());
    BOOST_REQUIRE(tree);
    BOOST_REQUIRE(oci::write_ext4(tree.value(), f.image));
    auto mnt = f.dir.path / "mnt";
    fs::create_directories(mnt);
    auto [rc, out] = run("mount -t ext4 -o loop,ro " + shell_quote(f.image.string()) + " " +
                         shell_quote(mnt.string()) + " 2>&1");
    if (rc != 0) supermachine::test::skip("cannot loop-mount here: " + out);
    struct unmount {
        fs::path where;
        ~unmount() { run("umount " + shell_quote(where.string()) + " 2>&1"); }
    } guard{mnt};
    // The kernel's view: every path, type, mode, size, content hash, symlink target and
    // hard-link group as our tree has it.
    auto ours = list_tree(tree.value());
    auto kernel = list_host(mnt);
    kernel.erase("/lost+found");
    BOOST_TEST(ours.size() > 40u);
    for (auto& [path, line] : ours)
        BOOST_TEST(kernel[path] == line, path);
    BOOST_TEST(kernel.size() == ours.size());
    struct stat st;
    BOOST_REQUIRE(::lstat((mnt / "dev/null").c_str(), &st) == 0);
    BOOST_TEST((S_ISCHR(st.st_mode) && major(st.st_rdev) == 1 && minor(st.st_rdev) == 3));
    BOOST_REQUIRE(::lstat((mnt / "dev/bigminor").c_str(), &st) == 0);
    BOOST_TEST((major(st.st_rdev) == 300 && minor(st.st_rdev) == 70000));
    BOOST_REQUIRE(::lstat((mnt / "dev/sda").c_str(), &st) == 0);
    BOOST_TEST((S_ISBLK(st.st_mode) && st.st_gid == 6u));
    BOOST_REQUIRE(::lstat((mnt / "highuid").c_str(), &st) == 0);
    BOOST_TEST(st.st_uid == 3000000000u);
    BOOST_TEST(st.st_gid == 3000000001u);
    BOOST_REQUIRE(::lstat((mnt / "nanotime").c_str(), &st) == 0);
    BOOST_TEST(st.st_mtim.tv_sec == 1700000000);
    BOOST_TEST(st.st_mtim.tv_nsec == 123456789);
    char value[64];
    auto n = ::lgetxattr((mnt / "bin/ping").c_str(), "security.capability", value, sizeof value);
    BOOST_TEST(n == 20);
    n = ::lgetxattr((mnt / "bin/ping").c_str(), "user.comment", value, sizeof value);
    BOOST_TEST(std::string(value, n > 0 ? n : 0) == "pinger");
    // The ACL went to ext4's on-disk format; the kernel gives back the VFS form the layer had.
    std::ifstream acl_file(f.layers / "acl.xattr", std::ios::binary);
    std::string acl((std::istreambuf_iterator<char>(acl_file)), std::istreambuf_iterator<char>());
    char acl_value[256];
    n = ::lgetxattr((mnt / "acl").c_str(), "system.posix_acl_access", acl_value, sizeof acl_value);
    BOOST_REQUIRE(n > 0);
    BOOST_TEST(std::string(acl_value, n) == acl);
}

namespace {
// Feeds one entry's data to filesystem_tree::apply.
struct string_data {
    std::string data;
    std::size_t at = 0;
    sm::result<std::size_t> read_data(std::span<std::byte> out) {
        std::size_t n = std::min(out.size(), data.size() - at);
        std::memcpy(out.data(), data.data() + at, n);
        at += n;
        return n;
    }
};

void put(oci::filesystem_tree& tree, oci::tar_entry e, std::string data = {}) {
    e.size = data.size();
    string_data reader{std::move(data)};
    auto r = tree.apply(e, reader, 1);
    BOOST_REQUIRE_MESSAGE(r, e.path << ": " << (r ? "" : r.error().message()));
}

bool try_mount(const fs::path& image, const fs::path& mnt) {
    if (::geteuid() != 0) return false;
    fs::create_directories(mnt);
    return run("mount -t ext4 -o loop,ro " + shell_quote(image.string()) + " " +
               shell_quote(mnt.string()) + " 2>&1")
               .first == 0;
}
} // namespace

BOOST_AUTO_TEST_CASE(the_kernel_can_write_to_it) {
    // The image is a base under a copy-on-write disk: the guest writes to it as to any ext4.
    supermachine::test::skip_unless(::geteuid() == 0, "loop-mounting needs root");
    fixture f;
    auto tree = merge(f.spool, f.all_layers());
    BOOST_REQUIRE(tree);
    BOOST_REQUIRE(oci::write_ext4(tree.value(), f.image));
    auto mnt = f.dir.path / "mnt";
    fs::create_directories(mnt);
    auto [rc, out] = run("mount -t ext4 -o loop " + shell_quote(f.image.string()) + " " +
                         shell_quote(mnt.string()) + " 2>&1");
    if (rc != 0) supermachine::test::skip("cannot loop-mount here: " + out);
    {
        struct unmount {
            fs::path where;
            ~unmount() { run("umount " + shell_quote(where.string()) + " 2>&1"); }
        } guard{mnt};
        fs::create_directories(mnt / "new/dir");
        for (int i = 0; i < 300; ++i)
            std::ofstream(mnt / "new/dir" / ("f" + std::to_string(i))) << i;
        std::ofstream(mnt / "new/big") << std::string(20 << 20, 'q');
        fs::remove_all(mnt / "long");
        fs::remove(mnt / "bin/busybox");
        fs::rename(mnt / "etc", mnt / "etc2");
        fs::create_hard_link(mnt / "big", mnt / "big2");
        BOOST_TEST(::lsetxattr((mnt / "dup").c_str(), "user.added", "v", 1, 0) == 0);
    }
    auto [fsck_rc, fsck_out] = fsck(f.image);
    BOOST_TEST(fsck_rc == 0, fsck_out);
}

BOOST_AUTO_TEST_CASE(format_boundaries) {
    need_e2fsprogs();
    temp_dir d;
    auto tree = oci::filesystem_tree::create(d.path).value();
    using oci::entry_type;
    put(tree, {.path = "links", .type = entry_type::directory, .mode = 0755});
    for (std::size_t n : {1, 59, 60, 61, 255, 4095})
        put(tree, {.path = "links/l" + std::to_string(n),
                   .link_target = std::string(n, 'x'),
                   .type = entry_type::symlink,
                   .mode = 0777});
    for (std::size_t n : {0, 1, 4095, 4096, 4097, 8192, 65537}) {
        std::string data(n, '\0');
        for (std::size_t i = 0; i < n; ++i)
            data[i] = static_cast<char>('a' + i % 23);
        put(tree, {.path = "sizes/f" + std::to_string(n), .mode = 0644}, data);
    }
    // In-inode xattr space is 92 bytes: entries (16 + name, rounded) + 4 + values (rounded).
    // "user.a" + 68-byte value: 20 + 4 + 68 = 92 fits; 69 bytes needs 72 and goes to a block.
    put(tree, {.path = "x/fits", .mode = 0644, .xattrs = {{"user.a", std::string(68, 'v')}}});
    put(tree, {.path = "x/block", .mode = 0644, .xattrs = {{"user.a", std::string(69, 'v')}}});
    put(tree, {.path = "x/empty-value", .mode = 0644, .xattrs = {{"trusted.e", ""}}});
    put(tree, {.path = "x/big",
               .mode = 0644,
               .xattrs = {{"user.big", std::string(3000, 'b')},
                          {"security.selinux", "system_u:object_r:bin_t"}}});
    // Long names fill directory blocks exactly and spill into more.
    for (int i = 0; i < 300; ++i) {
        std::string name = std::to_string(i);
        name += std::string(255 - name.size(), 'n');
        put(tree, {.path = "wide/" + name, .mode = 0600});
    }
    put(tree, {.path = "names/line\nbreak", .mode = 0644});
    put(tree, {.path = "names/\xc3\xa9t\xc3\xa9", .mode = 0644});
    put(tree, {.path = "names/\xff\xfe", .mode = 0644});
    put(tree, {.path = "ids/u65535", .mode = 0644, .uid = 65535, .gid = 65535});
    put(tree, {.path = "ids/u65536", .mode = 0644, .uid = 65536, .gid = 65536});
    put(tree, {.path = "ids/umax", .mode = 0644, .uid = 0xfffffffe, .gid = 0xfffffffe});
    put(tree, {.path = "times/neg", .mode = 0644, .mtime = -1, .mtime_nsec = 999999999});
    put(tree, {.path = "times/2038", .mode = 0644, .mtime = std::int64_t{1} << 31});
    put(tree,
        {.path = "times/2242", .mode = 0644, .mtime = std::int64_t{1} << 33, .mtime_nsec = 1});
    put(tree, {.path = "dev/old",
               .type = entry_type::char_device,
               .mode = 0600,
               .device_major = 255,
               .device_minor = 255});
    put(tree, {.path = "dev/new",
               .type = entry_type::block_device,
               .mode = 0600,
               .device_major = 255,
               .device_minor = 256});
    put(tree, {.path = "dev/max",
               .type = entry_type::char_device,
               .mode = 0600,
               .device_major = 4095,
               .device_minor = 0xfffff});
    put(tree,
        {.path = "dev/null-hardlinked", .link_target = "dev/old", .type = entry_type::hard_link});

    auto image = d.path / "b.ext4";
    auto stats = oci::write_ext4(tree, image);
    BOOST_REQUIRE(stats);
    auto [rc, out] = fsck(image);
    BOOST_TEST(rc == 0, out);
    BOOST_TEST(contains(debugfs(image, "stat /links/l59"), "Fast link dest"));
    BOOST_TEST(!contains(debugfs(image, "stat /links/l60"), "Fast link dest"));
    BOOST_TEST(contains(debugfs(image, "stat /x/fits"), "File ACL: 0"));
    BOOST_TEST(!contains(debugfs(image, "stat /x/block"), "File ACL: 0"));
    BOOST_TEST(contains(debugfs(image, "stat /dev/old"), "Links: 2"));

    auto mnt = d.path / "mnt";
    if (!try_mount(image, mnt)) {
        BOOST_TEST_MESSAGE("not mounted (needs root and loop devices): e2fsck/debugfs checks only");
        return;
    }
    struct unmount {
        fs::path where;
        ~unmount() { run("umount " + shell_quote(where.string()) + " 2>&1"); }
    } guard{mnt};
    auto ours = list_tree(tree);
    auto kernel = list_host(mnt);
    kernel.erase("/lost+found");
    for (auto& [path, line] : ours)
        BOOST_TEST(kernel[path] == line, path);
    BOOST_TEST(kernel.size() == ours.size());
    struct stat st;
    auto at = [&](const char* p) {
        BOOST_REQUIRE(::lstat((mnt / p).c_str(), &st) == 0);
        return st;
    };
    BOOST_TEST(at("ids/u65536").st_uid == 65536u);
    BOOST_TEST(at("ids/umax").st_gid == 0xfffffffeu);
    BOOST_TEST(at("times/neg").st_mtim.tv_sec == -1);
    BOOST_TEST(at("times/neg").st_mtim.tv_nsec == 999999999);
    BOOST_TEST(at("times/2038").st_mtim.tv_sec == (std::int64_t{1} << 31));
    BOOST_TEST(at("times/2242").st_mtim.tv_sec == (std::int64_t{1} << 33));
    BOOST_TEST(at("times/2242").st_mtim.tv_nsec == 1);
    BOOST_TEST((major(at("dev/new").st_rdev) == 255 && minor(at("dev/new").st_rdev) == 256));
    BOOST_TEST((major(at("dev/max").st_rdev) == 4095 && minor(at("dev/max").st_rdev) == 0xfffff));
    char value[4096];
    BOOST_TEST(::lgetxattr((mnt / "x/block").c_str(), "user.a", value, sizeof value) == 69);
    BOOST_TEST(::lgetxattr((mnt / "x/big").c_str(), "user.big", value, sizeof value) == 3000);
    BOOST_TEST(::lgetxattr((mnt / "x/empty-value").c_str(), "trusted.e", value, sizeof value) == 0);
}

BOOST_AUTO_TEST_SUITE_END()
