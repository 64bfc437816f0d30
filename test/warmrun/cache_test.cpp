// The warm-snapshot cache's pruning (detail/warm_snapshot_cache.hpp) on a
// real directory tree: what it keeps, what it removes, and what it must
// never touch (the current snapshot, one in use lately, one being created,
// anything reached through a symlink).
#include <supermachine/detail/warm_snapshot_cache.hpp>

#include <boost/test/unit_test.hpp>

#include <fcntl.h>
#include <stdlib.h>
#include <sys/file.h>
#include <unistd.h>

#include <fstream>

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using supermachine::detail::mark_warm_snapshot_used;
using supermachine::detail::prune_warm_snapshots;

namespace {

struct cache_dir {
    fs::path root;
    cache_dir() {
        char pattern[] = "/tmp/warm-cache-test-XXXXXX";
        BOOST_REQUIRE(::mkdtemp(pattern));
        root = pattern;
    }
    ~cache_dir() { fs::remove_all(root); }

    /// A snapshot directory (with `meta`) last used `age` ago.
    fs::path snapshot(const std::string& name, fs::file_time_type::duration age) {
        const auto dir = root / name;
        fs::create_directories(dir);
        std::ofstream(dir / "meta") << "m";
        std::ofstream(dir / "ram") << "r";
        fs::last_write_time(dir, fs::file_time_type::clock::now() - age);
        return dir;
    }
};

bool has(const std::vector<fs::path>& v, const fs::path& p) {
    return std::find(v.begin(), v.end(), p) != v.end();
}

} // namespace

BOOST_AUTO_TEST_CASE(keeps_the_most_recently_used_and_removes_idle_ones) {
    cache_dir c;
    const auto current = c.snapshot("current", 0s);
    std::vector<fs::path> old;
    for (int i = 0; i < 5; ++i)
        old.push_back(c.snapshot("old" + std::to_string(i), std::chrono::hours(1 + i)));
    const auto removed = prune_warm_snapshots(c.root, current, {.keep = 3});
    // current + the two most recently used others stay.
    BOOST_TEST(fs::exists(current));
    BOOST_TEST(fs::exists(old[0]));
    BOOST_TEST(fs::exists(old[1]));
    for (int i = 2; i < 5; ++i) {
        BOOST_TEST(!fs::exists(old[i]), old[i]);
        BOOST_TEST(has(removed, old[i]));
    }
    BOOST_TEST(removed.size() == 3u);
}

BOOST_AUTO_TEST_CASE(never_removes_one_used_lately_or_being_created) {
    cache_dir c;
    const auto current = c.snapshot("current", 0s);
    const auto recent = c.snapshot("recent", 2min); // beyond `keep`, but a run may restore it
    const auto locked = c.snapshot("locked", std::chrono::hours(5));
    const auto idle = c.snapshot("idle", std::chrono::hours(6));
    const int fd = ::open((locked.string() + ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    BOOST_REQUIRE(fd >= 0);
    BOOST_REQUIRE(::flock(fd, LOCK_EX) == 0);
    // flock locks belong to the open file description: a second open in this
    // process conflicts with it just as another process's would.
    const auto removed = prune_warm_snapshots(c.root, current, {.keep = 1});
    ::close(fd);
    BOOST_TEST(fs::exists(current));
    BOOST_TEST(fs::exists(recent));
    BOOST_TEST(fs::exists(locked));
    BOOST_TEST(!fs::exists(idle));
    BOOST_TEST(removed.size() == 1u);
}

BOOST_AUTO_TEST_CASE(marking_used_moves_a_snapshot_to_the_front) {
    cache_dir c;
    const auto a = c.snapshot("a", std::chrono::hours(3));
    const auto b = c.snapshot("b", std::chrono::hours(2));
    mark_warm_snapshot_used(a); // now the most recent
    const auto removed = prune_warm_snapshots(c.root, {}, {.keep = 1, .min_idle = 1h});
    BOOST_TEST(fs::exists(a));
    BOOST_TEST(!fs::exists(b));
    BOOST_TEST(removed.size() == 1u);
}

BOOST_AUTO_TEST_CASE(old_creation_temp_dirs_go_fresh_ones_and_other_files_stay) {
    cache_dir c;
    const auto stale = c.root / ".k1.tmp-AAAAAA";
    const auto fresh = c.root / ".k2.tmp-BBBBBB";
    fs::create_directories(stale);
    fs::create_directories(fresh);
    std::ofstream(stale / "ram") << "x";
    fs::last_write_time(stale, fs::file_time_type::clock::now() - std::chrono::hours(2));
    std::ofstream(c.root / "k1.lock") << "";
    fs::create_directories(c.root / "not-a-snapshot"); // no meta: not ours to judge
    fs::last_write_time(c.root / "not-a-snapshot",
                        fs::file_time_type::clock::now() - std::chrono::hours(9));
    const auto removed = prune_warm_snapshots(c.root, {}, {.keep = 0});
    BOOST_TEST(!fs::exists(stale));
    BOOST_TEST(fs::exists(fresh));
    BOOST_TEST(fs::exists(c.root / "k1.lock"));
    BOOST_TEST(fs::exists(c.root / "not-a-snapshot"));
    BOOST_TEST(removed.size() == 1u);
}

BOOST_AUTO_TEST_CASE(a_symlink_in_the_cache_is_not_followed) {
    cache_dir c;
    cache_dir outside;
    const auto target = outside.snapshot("victim", std::chrono::hours(8));
    fs::create_directory_symlink(target, c.root / "link");
    const auto removed = prune_warm_snapshots(c.root, {}, {.keep = 0});
    BOOST_TEST(removed.empty());
    BOOST_TEST(fs::exists(target / "ram"));
}

BOOST_AUTO_TEST_CASE(a_missing_cache_is_nothing_to_do) {
    BOOST_TEST(prune_warm_snapshots("/nonexistent/warm-cache", {}).empty());
}
