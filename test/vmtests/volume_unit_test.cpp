// Volumes without a VM: the -v spec and path checks, the agent's parse of
// supermachine.volume=, QEMU's arguments for shared directories, and a
// missing virtiofsd named as engine_unavailable (QEMU itself is real).
#include "../../guest/agent/init.hpp"

#include <skip.hpp>
#include <supermachine/backend/qemu.hpp>
#include <supermachine/shared_directory.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace sm = supermachine;

namespace {

struct temp_dir {
    fs::path path;
    temp_dir() {
        std::string pattern = (fs::temp_directory_path() / "sm-volume-unit-XXXXXX").string();
        BOOST_TEST_REQUIRE(::mkdtemp(pattern.data()) != nullptr);
        path = pattern;
    }
    ~temp_dir() {
        std::error_code ignored;
        fs::remove_all(path, ignored);
    }
};

bool has(const std::vector<std::string>& argv, std::string_view word) {
    return std::find(argv.begin(), argv.end(), word) != argv.end();
}

} // namespace

BOOST_AUTO_TEST_CASE(volume_specs_parse_like_docker) {
    auto a = sm::parse_volume_spec("/srv:/data", "/cwd");
    BOOST_TEST_REQUIRE(a.has_value());
    BOOST_TEST(a.value().host == fs::path("/srv"));
    BOOST_TEST(a.value().guest == "/data");
    BOOST_TEST(!a.value().read_only);
    auto b = sm::parse_volume_spec("rel/dir:/x:ro", "/cwd");
    BOOST_TEST_REQUIRE(b.has_value());
    BOOST_TEST(b.value().host == fs::path("/cwd/rel/dir"));
    BOOST_TEST(b.value().read_only);
    BOOST_TEST(sm::parse_volume_spec("/a:/b:rw", "/").has_value());
    for (const char* bad : {"", "/only", ":/x", "/a:/b:rx", "/a:/b:ro:ro"})
        BOOST_TEST(!sm::parse_volume_spec(bad, "/").has_value(), bad);
}

BOOST_AUTO_TEST_CASE(guest_paths_are_checked) {
    for (const char* good : {"/data", "/srv/deep/data", "/a.b/c-d_e", "/procfs"})
        BOOST_TEST(sm::guest_path_problem(good).empty(), good);
    for (const char* bad : {"", "data", "/", "/a/../b", "/a/./b", "/a//b", "/a/", "/a b", "/a:b",
                            "/a,b", "/a\"b", "/a\\b", "/proc", "/sys/x", "/dev/shm", "/\x01"})
        BOOST_TEST(!sm::guest_path_problem(bad).empty(), bad);
    BOOST_TEST(!sm::guest_path_problem("/" + std::string(sm::max_guest_path_length, 'a')).empty());
}

BOOST_AUTO_TEST_CASE(host_paths_are_resolved_and_checked) {
    temp_dir t;
    fs::create_directories(t.path / "real");
    fs::create_symlink(t.path / "real", t.path / "link");
    std::ofstream(t.path / "file") << "x";
    fs::create_directories(t.path / "a,b");
    sm::shared_directory d{t.path / "link", "/data", false};
    std::string why;
    BOOST_TEST_REQUIRE(sm::validate_shared_directory(d, &why).has_value(), why);
    BOOST_TEST(d.host == fs::canonical(t.path / "real")); // symlink resolved now
    sm::shared_directory missing{t.path / "missing", "/data", false};
    BOOST_TEST(sm::validate_shared_directory(missing, &why).error() == sm::errc::not_found);
    BOOST_TEST(why.find("does not exist") != std::string::npos, why);
    sm::shared_directory file{t.path / "file", "/data", false};
    BOOST_TEST(!sm::validate_shared_directory(file, &why).has_value());
    BOOST_TEST(why.find("not a directory") != std::string::npos, why);
    sm::shared_directory comma{t.path / "a,b", "/data", false};
    BOOST_TEST(!sm::validate_shared_directory(comma, &why).has_value());
    BOOST_TEST(why.find("','") != std::string::npos, why);
}

BOOST_AUTO_TEST_CASE(agent_parses_volume_arguments_with_bounds) {
    using namespace supermachine::agent::guest;
    volume_request v;
    BOOST_TEST(parse_volume("supermachine0:/data", v));
    BOOST_TEST(v.tag == "supermachine0");
    BOOST_TEST(v.path == "/data");
    BOOST_TEST(!v.read_only);
    BOOST_TEST(parse_volume("t-1:/a/b:ro", v));
    BOOST_TEST(v.path == "/a/b");
    BOOST_TEST(v.read_only);
    for (const char* bad :
         {"", "tag", ":/a", "tag:", "tag:rel", "tag:/", "tag:/a/../b", "tag:/a//b", "t/g:/a",
          "tag:/a:rw", std::string(37, 't').append(":/a").c_str()})
        BOOST_TEST(!parse_volume(bad, v), bad);
    std::string cmdline = "quiet";
    for (int i = 0; i < 12; ++i)
        cmdline += " supermachine.volume=t" + std::to_string(i) + ":/v" + std::to_string(i);
    cmdline += " supermachine.volume=long:/" + std::string(300, 'x');
    const auto values = cmdline_values(cmdline, "supermachine.volume", 8, 200);
    BOOST_TEST(values.size() == 8u);
    BOOST_TEST(values.front() == "t0:/v0");
    BOOST_TEST(cmdline_values(" supermachine.volume=long:/" + std::string(300, 'x'),
                              "supermachine.volume", 8, 200)
                   .empty());
}

BOOST_AUTO_TEST_CASE(qemu_gets_one_vhost_user_fs_device_per_directory) {
    sm::backend::qemu_config config;
    config.kernel = "/boot/vmlinuz";
    config.shared_directories = {{"/srv/a", "supermachine0", false},
                                 {"/srv/b", "supermachine1", true}};
    auto argv = sm::backend::detail::qemu_arguments("qemu", config, {}, false, "/run/x");
    BOOST_TEST_REQUIRE(argv.has_value());
    BOOST_TEST(has(argv.value(), "socket,id=fs0,path=/run/x/fs0.sock"));
    BOOST_TEST(has(argv.value(), "vhost-user-fs-device,chardev=fs1,tag=supermachine1"));
    BOOST_TEST(std::any_of(argv.value().begin(), argv.value().end(), [](const std::string& a) {
        return a.starts_with("memory-backend-memfd") && a.ends_with("share=on");
    }));
    // RAM mapped privately (a restored clone): virtiofsd could not see it.
    config.memory_file = "/run/x/ram";
    config.memory_file_shared = false;
    BOOST_TEST(sm::backend::detail::qemu_arguments("qemu", config, {}, false, "/run/x").error() ==
               sm::errc::invalid_argument);
    config.memory_file_shared = true;
    config.shared_directories = {{"/srv/a", "bad,tag", false}};
    BOOST_TEST(sm::backend::detail::qemu_arguments("qemu", config, {}, false, "/run/x").error() ==
               sm::errc::invalid_argument);
}

// Last: skips the whole binary when QEMU is missing.
BOOST_AUTO_TEST_CASE(missing_virtiofsd_is_engine_unavailable_and_named) {
    sm::test::skip_unless(sm::backend::find_qemu("qemu-system-x86_64").has_value(),
                          "qemu-system-x86_64 not installed");
    temp_dir t;
    boost::asio::io_context io;
    sm::backend::qemu_config config;
    config.kernel = "/nonexistent/vmlinuz"; // never reached
    config.shared_directories = {{t.path, "supermachine0", false}};
    config.virtiofsd_binary = "/nonexistent/virtiofsd";
    sm::backend::qemu_machine machine(io.get_executor(), config);
    auto started = machine.start([](std::string_view) {});
    BOOST_TEST_REQUIRE(!started.has_value());
    BOOST_TEST(started.error() == sm::errc::engine_unavailable);
    BOOST_TEST(machine.diagnostics().find("/nonexistent/virtiofsd") != std::string::npos,
               machine.diagnostics());
    BOOST_TEST(machine.pid() <= 0); // QEMU never started
}
