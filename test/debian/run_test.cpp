// The Debian image end to end, the slow one: a `debootstrap --variant=minbase
// bookworm` tree (scripts/make-debian-tree.sh, cached per machine), made into
// an OCI image by umoci with a config of its own (a non-root User added in a
// second layer, WorkingDir, Env, Cmd), pushed by skopeo to Debian's
// docker-registry on 127.0.0.1, then `supermachine pull` and `supermachine
// run` (QEMU engine on this host) whose output must match the image config.
#include "../registry/registry_fixture.hpp"
#include "../rootfs/debian_tree.hpp"
#include "../vmtests/vm_fixture.hpp"

#include <boost/test/unit_test.hpp>

#include <nlohmann/json.hpp>

#include <memory>
#include <sstream>

using namespace supermachine::test;
using namespace std::chrono_literals;

namespace {

constexpr int tester_uid = 1234;
const std::string reference_path = "/debian/minbase:12";

/// Built once for all test cases (a boot is seconds; the image minutes).
struct debian_image {
    std::unique_ptr<vm_environment> env;
    std::unique_ptr<registry_server> registry;
    std::string reference;
    nlohmann::json config; // the image config as pushed
    fs::path layout;

    debian_image() {
        // The tree is cached under the user's cache dir: read it before
        // vm_environment points XDG_CACHE_HOME at a temporary one.
        const char* xdg = std::getenv("XDG_CACHE_HOME");
        const char* home = std::getenv("HOME");
        const std::string cache_home =
            xdg && *xdg ? xdg : (std::string(home && *home ? home : "/root") + "/.cache");
        skip_unless(have_program("/usr/bin/umoci") && have_program("/usr/bin/skopeo"),
                    "umoci or skopeo not installed");
        const auto tree = debian_tree(cache_home);
        env = std::make_unique<vm_environment>();
        layout = env->work / "debian-oci";
        const auto q = [](const fs::path& p) { return shell_quote(p.string()); };

        // Layer 1: the debootstrap tree as it is (read only; shared cache).
        const auto base_tar = env->work / "base.tar";
        run("tar --numeric-owner --xattrs --xattrs-include='*' -C " + q(tree) + " -cf " +
            q(base_tar) + " .");
        // Layer 2: a user of our own (uid 1234, also in group users) and its
        // home with the working directory, so User and WorkingDir are not root's.
        const auto extra = env->work / "extra";
        fs::create_directories(extra / "etc");
        fs::create_directories(extra / "home/tester/work");
        write_text(extra / "etc/passwd",
                   read_text(tree / "etc/passwd") +
                       "tester:x:1234:1234:Test User:/home/tester:/bin/bash\n");
        std::string group = read_text(tree / "etc/group"), edited;
        std::istringstream lines(group);
        for (std::string line; std::getline(lines, line);)
            edited +=
                (line.rfind("users:", 0) == 0 ? line + (line.back() == ':' ? "" : ",") + "tester"
                                              : line) +
                "\n";
        BOOST_REQUIRE(edited.find("users:x:100:tester") != std::string::npos);
        write_text(extra / "etc/group", edited + "tester:x:1234:\n");
        run("chmod 644 " + q(extra / "etc/passwd") + " " + q(extra / "etc/group") +
            " && chown -R " + std::to_string(tester_uid) + ":" + std::to_string(tester_uid) + " " +
            q(extra / "home/tester"));
        const auto extra_tar = env->work / "extra.tar";
        run("tar --numeric-owner -C " + q(extra) + " -cf " + q(extra_tar) + " etc home");

        const auto image = q(layout) + ":12";
        run("umoci init --layout " + q(layout) + " && umoci new --image " + image +
            " && umoci raw add-layer --image " + image + " " + q(base_tar) +
            " && umoci raw add-layer --image " + image + " " + q(extra_tar));
        fs::remove(base_tar);
        fs::remove(extra_tar);
        run("umoci config --image " + image +
            " --config.user tester --config.workingdir /home/tester/work"
            " --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            " --config.env LANG=C.UTF-8 --config.env 'GREETING=hello from debian'"
            " --config.cmd /bin/bash --config.cmd -c"
            " --config.cmd 'echo \"cmd ran as $(id -un) in $PWD\"'");
        config = read_config();

        registry = std::make_unique<registry_server>(env->work);
        reference = registry->host() + reference_path;
        skopeo_copy("oci:" + layout.string() + ":12", "docker://" + reference);
    }

    nlohmann::json read_config() const {
        auto json = [](const fs::path& p) { return nlohmann::json::parse(read_text(p)); };
        auto blob = [&](const std::string& digest) {
            return layout / "blobs/sha256" / digest.substr(7);
        };
        auto index = json(layout / "index.json");
        auto manifest = json(blob(index["manifests"][0]["digest"]));
        return json(blob(manifest["config"]["digest"]));
    }

    process_result boot(const std::vector<std::string>& options,
                        const std::vector<std::string>& command) const {
        return env->run(options, command, "", 600s, false, reference);
    }
};

debian_image& image() {
    static debian_image instance;
    return instance;
}

std::vector<std::string> lines_of(const std::string& text) {
    std::vector<std::string> out;
    std::istringstream in(text);
    for (std::string line; std::getline(in, line);)
        out.push_back(line);
    return out;
}

bool has_line(const std::string& text, const std::string& line) {
    auto all = lines_of(text);
    return std::find(all.begin(), all.end(), line) != all.end();
}

} // namespace

BOOST_AUTO_TEST_CASE(pull_then_images_lists_it) {
    auto& img = image();
    auto pulled = run_process({img.env->cli.string(), "pull", img.reference}, "", 600s);
    BOOST_TEST_REQUIRE(pulled.status == 0, pulled.out << pulled.err);
    auto listed = run_process({img.env->cli.string(), "images"}, "", 60s);
    BOOST_TEST(listed.status == 0, listed.err);
    BOOST_TEST(listed.out.find(img.registry->host() + "/debian/minbase") != std::string::npos,
               listed.out);
}

BOOST_AUTO_TEST_CASE(os_release_is_debian_12) {
    auto r = image().boot({}, {"cat", "/etc/os-release"});
    BOOST_TEST_REQUIRE(r.status == 0, r.err);
    BOOST_TEST(has_line(r.out, "ID=debian"), r.out);
    BOOST_TEST(has_line(r.out, "VERSION_ID=\"12\""), r.out);
    BOOST_TEST(has_line(r.out, "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\""), r.out);
}

BOOST_AUTO_TEST_CASE(default_command_is_the_image_cmd) {
    auto& img = image();
    BOOST_TEST(img.config["config"]["Cmd"].size() == 3u);
    auto r = img.boot({}, {});
    BOOST_TEST(r.status == 0, r.err);
    BOOST_TEST(r.out == "cmd ran as tester in /home/tester/work\n", r.out << r.err);
}

BOOST_AUTO_TEST_CASE(id_is_the_image_user) {
    auto& img = image();
    BOOST_TEST(img.config["config"]["User"] == "tester");
    auto r = img.boot({}, {"id"});
    BOOST_TEST(r.status == 0, r.err);
    BOOST_TEST(r.out == "uid=1234(tester) gid=1234(tester) groups=1234(tester),100(users)\n",
               r.out << r.err);
}

BOOST_AUTO_TEST_CASE(pwd_is_the_image_working_dir) {
    auto& img = image();
    const std::string working_dir = img.config["config"]["WorkingDir"];
    BOOST_TEST(working_dir == "/home/tester/work");
    auto r = img.boot({}, {"pwd"});
    BOOST_TEST(r.status == 0, r.err);
    BOOST_TEST(r.out == working_dir + "\n", r.out << r.err);
}

BOOST_AUTO_TEST_CASE(env_is_the_image_env) {
    auto& img = image();
    auto r = img.boot({}, {"env"});
    BOOST_TEST_REQUIRE(r.status == 0, r.err);
    const auto& env = img.config["config"]["Env"];
    BOOST_TEST(env.size() == 3u);
    for (const std::string entry : env)
        BOOST_TEST(has_line(r.out, entry), entry << " in\n" << r.out);
    BOOST_TEST(has_line(r.out, "HOME=/home/tester"), r.out); // from the image's /etc/passwd
    BOOST_TEST(!has_line(r.out, "X=1"), r.out);
}

BOOST_AUTO_TEST_CASE(user_override) {
    auto r = image().boot({"-u", "0"}, {"id"});
    BOOST_TEST(r.status == 0, r.err);
    BOOST_TEST(r.out == "uid=0(root) gid=0(root) groups=0(root)\n", r.out << r.err);
}

BOOST_AUTO_TEST_CASE(user_override_resolves_against_the_image) {
    auto& img = image();
    // Debian's own nobody/nogroup, from the image's /etc/passwd and /etc/group.
    auto nobody = img.boot({"-u", "nobody"}, {"id"});
    BOOST_TEST(nobody.status == 0, nobody.err);
    BOOST_TEST(nobody.out == "uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)\n",
               nobody.out << nobody.err);
    // name:group: the group replaces the primary one, no supplementary groups (runc's rule).
    auto grouped = img.boot({"-u", "tester:users"}, {"id"});
    BOOST_TEST(grouped.status == 0, grouped.err);
    BOOST_TEST(grouped.out == "uid=1234(tester) gid=100(users) groups=100(users)\n",
               grouped.out << grouped.err);
}

BOOST_AUTO_TEST_CASE(working_dir_override) {
    auto r = image().boot({"-w", "/"}, {"pwd"});
    BOOST_TEST(r.status == 0, r.err);
    BOOST_TEST(r.out == "/\n", r.out << r.err);
}

BOOST_AUTO_TEST_CASE(env_override_adds_to_the_image_env) {
    auto& img = image();
    auto r = img.boot({"-e", "X=1", "-e", "GREETING=overridden"}, {"env"});
    BOOST_TEST_REQUIRE(r.status == 0, r.err);
    BOOST_TEST(has_line(r.out, "X=1"), r.out);
    BOOST_TEST(has_line(r.out, "GREETING=overridden"), r.out);
    BOOST_TEST(!has_line(r.out, "GREETING=hello from debian"), r.out);
    BOOST_TEST(has_line(r.out, "LANG=C.UTF-8"), r.out);
}

BOOST_AUTO_TEST_CASE(entrypoint_override_drops_the_image_cmd) {
    auto& img = image();
    // docker: --entrypoint resets Cmd; the arguments after the image follow it.
    auto with_args = img.boot({"--entrypoint", "/bin/echo"}, {"hi", "there"});
    BOOST_TEST(with_args.status == 0, with_args.err);
    BOOST_TEST(with_args.out == "hi there\n", with_args.out << with_args.err);
    auto alone = img.boot({"--entrypoint", "/bin/echo"}, {});
    BOOST_TEST(alone.status == 0, alone.err);
    BOOST_TEST(alone.out == "\n", alone.out << alone.err);
}

BOOST_AUTO_TEST_CASE(memory_option_sizes_the_guest) {
    auto r = image().boot({"-m", "256m"}, {"grep", "MemTotal", "/proc/meminfo"});
    BOOST_TEST_REQUIRE(r.status == 0, r.err);
    long kib = 0;
    BOOST_TEST_REQUIRE(std::sscanf(r.out.c_str(), "MemTotal: %ld kB", &kib) == 1, r.out);
    BOOST_TEST(kib > 150 * 1024, r.out); // the kernel keeps some for itself
    BOOST_TEST(kib <= 256 * 1024, r.out);
}

BOOST_AUTO_TEST_CASE(platform_option_refuses_a_cached_image_of_another_platform) {
    // The amd64 image is cached by now; linux/arm64 must not run it, and is
    // refused before any pull or boot (this host boots x86-64 guests only).
    auto r = image().boot({"--platform", "linux/arm64"}, {"true"});
    BOOST_TEST(r.status == 125, r.out << r.err);
    BOOST_TEST(r.err.find("cannot run a linux/arm64 image on this linux/amd64 host") !=
                   std::string::npos,
               r.err);
}

// Two vCPUs: under -icount QEMU's TCG ran them round-robin and Linux's SMP
// bring-up stalled ("the VM did not come up: timed out"); the engine now
// gives SMP guests multi-threaded TCG instead.
BOOST_AUTO_TEST_CASE(cpus_option_gives_that_many_processors) {
    auto& img = image();
    auto r = img.env->run({"--cpus", "2"}, {"nproc"}, "", 180s, false, img.reference);
    BOOST_TEST((r.status == 0 && r.out == "2\n"), "status " << r.status
                                                            << (r.timed_out ? " (timed out)" : "")
                                                            << ": " << r.out << r.err);
}
