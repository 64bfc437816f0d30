// storage::one_of<Policies...>: the alternative the config holds is opened
// and every call goes to it; optional members follow the alternatives.
#include <supermachine/storage/cow_file.hpp>
#include <supermachine/storage/one_of.hpp>
#include <supermachine/storage/raw_file.hpp>
#include <supermachine/storage/read_only.hpp>
#include <supermachine/virtio/blk.hpp>

#include <boost/test/unit_test.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

using namespace supermachine;
namespace st = supermachine::storage;

namespace {
using disk = st::one_of<st::raw_file, st::cow_file<st::raw_file>, st::read_only<st::raw_file>>;
static_assert(st::block_storage<disk>);
static_assert(!st::discards<disk>); // read_only has none
static_assert(st::discards<st::one_of<st::raw_file, st::cow_file<st::raw_file>>>);
static_assert(st::has_id<disk>);
static_assert(virtio::device_core<virtio::blk<disk>>);

struct file {
    std::string path;
    explicit file(const std::string& content) {
        std::string tmpl = (std::filesystem::temp_directory_path() / "sm-oneof-XXXXXX").string();
        const int fd = ::mkstemp(tmpl.data());
        ::close(fd);
        path = tmpl;
        std::ofstream(path, std::ios::binary) << content;
    }
    ~file() { ::unlink(path.c_str()); }
    std::string read() const {
        std::ifstream in(path, std::ios::binary);
        return {std::istreambuf_iterator<char>(in), {}};
    }
};

std::span<const std::byte> bytes(const std::string& s) {
    return std::as_bytes(std::span(s.data(), s.size()));
}
} // namespace

BOOST_AUTO_TEST_CASE(each_alternative_is_served) {
    const std::string original(8192, 'o');
    file f(original);
    const std::string data(512, 'w');
    std::vector<std::byte> back(512);

    disk::config raw;
    raw.choice.emplace<0>(st::raw_file::config{f.path, false});
    auto r = value_or_throw(disk::open(raw));
    BOOST_TEST(r->index() == 0u);
    BOOST_TEST(r->size() == 8192u);
    BOOST_TEST(!r->is_read_only());
    BOOST_TEST(r->write(512, bytes(data)).has_value());
    BOOST_TEST(r->flush().has_value());
    BOOST_TEST(f.read().substr(512, 512) == data);
    BOOST_TEST(r->write(8192 - 256, bytes(data)).error() ==
               make_error_code(errc::sector_out_of_range));
    r.reset();

    const std::string before = f.read();
    disk::config cow;
    cow.choice.emplace<1>(st::cow_file<st::raw_file>::config{.base = {f.path, true}});
    auto c = value_or_throw(disk::open(cow));
    BOOST_TEST(c->index() == 1u);
    const std::string other(512, 'c');
    BOOST_TEST(c->write(0, bytes(other)).has_value());
    BOOST_TEST(c->read(0, back).has_value());
    BOOST_TEST((std::string(reinterpret_cast<const char*>(back.data()), 512) == other));
    BOOST_TEST(f.read() == before); // the base never changes

    disk::config ro;
    ro.choice.emplace<2>(st::raw_file::config{f.path, true});
    auto o = value_or_throw(disk::open(ro));
    BOOST_TEST(o->index() == 2u);
    BOOST_TEST(o->is_read_only());
    BOOST_TEST(o->write(0, bytes(other)).error() == make_error_code(errc::device_read_only));
    BOOST_TEST(o->read(512, back).has_value());
    BOOST_TEST((std::string(reinterpret_cast<const char*>(back.data()), 512) == data));
    BOOST_TEST(f.read() == before);

    disk::config missing;
    missing.choice.emplace<0>(st::raw_file::config{"/nonexistent/disk.img", false});
    BOOST_TEST(!disk::open(missing).has_value());
}
