// `supermachine pull` and `supermachine images` as users run them.
#include "registry_fixture.hpp"

#include <boost/test/unit_test.hpp>

#include <chrono>
#include <cstdlib>

using namespace supermachine::test;
namespace fs = std::filesystem;

namespace {
std::string cli() {
    const char* dir = std::getenv("SUPERMACHINE_BINARY_DIR");
    skip_unless(dir != nullptr, "SUPERMACHINE_BINARY_DIR not set (run through ctest)");
    auto path = fs::path(dir) / "bin/supermachine";
    skip_unless(fs::exists(path), "supermachine CLI not built");
    return path.string();
}
// A shell command line: its exit status and its output (stdout and stderr).
std::pair<int, std::string> run_shell(const std::string& command) {
    FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
    std::string out;
    char buffer[4096];
    while (auto n = std::fread(buffer, 1, sizeof buffer, pipe))
        out.append(buffer, n);
    int status = ::pclose(pipe);
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}
// Run with the cache in `cache`; returns exit status and output.
std::pair<int, std::string> run_cli(const fs::path& cache, const std::string& args) {
    return run_shell("XDG_CACHE_HOME=" + cache.string() + " " + cli() + " " + args);
}
} // namespace

BOOST_AUTO_TEST_CASE(pull_and_images_commands) {
    cli();
    temp_dir dir;
    auto layout = make_busybox_layout(dir.path);
    registry_server server(dir.path);
    skopeo_copy("oci:" + layout.string() + ":latest",
                "docker://" + server.host() + "/cli/busybox:1");
    auto cache = dir.path / "cache";

    auto [status, out] = run_cli(cache, "pull " + server.host() + "/cli/busybox:1");
    BOOST_TEST_INFO(out);
    BOOST_TEST(status == 0);
    BOOST_TEST(out.find("layer ") != std::string::npos); // plain progress lines (not a TTY)
    BOOST_TEST(out.find("done") != std::string::npos);
    BOOST_TEST(out.find("Digest:   sha256:") != std::string::npos);
    BOOST_TEST(out.find("Ports:    8080/tcp\n") != std::string::npos); // the config's ExposedPorts
    BOOST_TEST(fs::exists(cache / "supermachine/images.json"));

    auto [s2, again] = run_cli(cache, "pull " + server.host() + "/cli/busybox:1");
    BOOST_TEST(s2 == 0);
    BOOST_TEST(again.find("already present") != std::string::npos);

    auto [s3, local] = run_cli(cache, "pull --quiet oci:" + layout.string() + ":latest");
    BOOST_TEST(s3 == 0);
    BOOST_TEST(local.starts_with("sha256:"));

    auto [s4, listing] = run_cli(cache, "images");
    BOOST_TEST_INFO(listing);
    BOOST_TEST(s4 == 0);
    BOOST_TEST(listing.find("REFERENCE") != std::string::npos);
    BOOST_TEST(listing.find(server.host() + "/cli/busybox:1") != std::string::npos);
    BOOST_TEST(listing.find("oci:" + layout.string() + ":latest") != std::string::npos);
    BOOST_TEST(listing.find("linux/amd64") != std::string::npos);

    auto [s5, missing] = run_cli(cache, "pull " + server.host() + "/cli/none:1");
    BOOST_TEST(s5 == 1);
    BOOST_TEST(missing.find("MANIFEST_UNKNOWN") != std::string::npos);

    auto [s6, bad] = run_cli(cache, "pull library/Alpine");
    BOOST_TEST(s6 == 2);
    BOOST_TEST(bad.find("lowercase") != std::string::npos);

    // On a terminal: redrawn bars (cursor-up escapes, a bar, a rate).
    if (have_program("/usr/bin/script")) {
        auto [s8, tty] = run_cli(
            cache, "images >/dev/null; XDG_CACHE_HOME=" + (dir.path / "tty-cache").string() +
                       " script -qec '" + cli() + " pull " + server.host() +
                       "/cli/busybox:1' /dev/null");
        BOOST_TEST_INFO(tty);
        BOOST_TEST(s8 == 0);
        BOOST_TEST(tty.find("\x1b[2K") != std::string::npos);
        BOOST_TEST(tty.find("[==============================]") != std::string::npos);
        BOOST_TEST(tty.find("/s") != std::string::npos);
    }

    auto [s7, wrong_platform] =
        run_cli(cache, "pull --platform linux/arm64 " + server.host() + "/cli/busybox:1");
    BOOST_TEST(s7 == 1);
    BOOST_TEST(wrong_platform.find("not linux/arm64") != std::string::npos);
}

// The CLI finds credentials where docker keeps them: $DOCKER_CONFIG/config.json,
// else ~/.docker/config.json (auths.<host>.auth = base64 user:pass).
BOOST_AUTO_TEST_CASE(pull_with_credentials_from_the_docker_config) {
    cli();
    temp_dir dir;
    auto layout = make_busybox_layout(dir.path);
    // bcrypt("s3cret"), cost 4 (as in auth_tls_test).
    write_text(dir.path / "htpasswd",
               "alice:$2b$04$zTfKrLlsiIa0EsPG/XkzReGbQUHmROMFi1OOWgyuSy3zC3d5eP.a2\n");
    registry_server server(dir.path, {"auth:\n  htpasswd:\n    realm: test-realm\n    path: " +
                                      (dir.path / "htpasswd").string() + "\n"});
    skopeo_copy("oci:" + layout.string() + ":latest",
                "docker://" + server.host() + "/cli/private:1", "--dest-creds alice:s3cret");
    const std::string config = "{\"auths\":{\"" + server.host() + "\":{\"auth\":\"" +
                               "YWxpY2U6czNjcmV0" /* alice:s3cret */ + "\"}}}";
    const auto empty_home = dir.path / "empty-home", home = dir.path / "home",
               docker_config = dir.path / "docker-config";
    fs::create_directories(empty_home);
    fs::create_directories(home / ".docker");
    fs::create_directories(docker_config);
    write_text(home / ".docker/config.json", config);
    write_text(docker_config / "config.json", config);
    // `env` first: HOME and DOCKER_CONFIG exactly as each case says.
    auto pull = [&](const std::string& environment, const std::string& cache) {
        return run_shell("env -u DOCKER_CONFIG " + environment +
                         " XDG_CACHE_HOME=" + (dir.path / cache).string() + " " + cli() +
                         " pull --quiet " + server.host() + "/cli/private:1");
    };
    auto [s1, anonymous] = pull("HOME=" + empty_home.string(), "c1");
    BOOST_TEST(s1 == 1, anonymous);
    BOOST_TEST(anonymous.find("unauthorized") != std::string::npos, anonymous);
    auto [s2, from_home] = pull("HOME=" + home.string(), "c2");
    BOOST_TEST(s2 == 0, from_home);
    BOOST_TEST(from_home.starts_with("sha256:"), from_home);
    auto [s3, from_env] =
        pull("HOME=" + empty_home.string() + " DOCKER_CONFIG=" + docker_config.string(), "c3");
    BOOST_TEST(s3 == 0, from_env);
    BOOST_TEST(from_env.starts_with("sha256:"), from_env);
}

// `run --platform` for a platform this host cannot boot is refused at once,
// before any pull or boot, naming both platforms; `pull` of it still works.
BOOST_AUTO_TEST_CASE(run_refuses_a_foreign_platform_before_booting) {
    cli();
    temp_dir dir;
    auto layout = make_busybox_layout(dir.path, "arm", "arm64");
    registry_server server(dir.path);
    skopeo_copy("oci:" + layout.string() + ":arm", "docker://" + server.host() + "/cli/arm:1");
    auto cache = dir.path / "cache";
    auto start = std::chrono::steady_clock::now();
    auto [status, out] =
        run_cli(cache, "run --platform linux/arm64 " + server.host() + "/cli/arm:1 true");
    auto seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    BOOST_TEST(status == 125, out);
    BOOST_TEST(out.find("cannot run a linux/arm64 image on this linux/amd64 host") !=
                   std::string::npos,
               out);
    BOOST_TEST(out.find("engine") == std::string::npos, out); // no VM was started
    BOOST_TEST(seconds < 3.0);
    BOOST_TEST(!fs::exists(cache / "supermachine/images.json")); // not even pulled
    auto [s2, pulled] =
        run_cli(cache, "pull --quiet --platform linux/arm64 " + server.host() + "/cli/arm:1");
    BOOST_TEST(s2 == 0, pulled);
}

// A docker config.json that does not parse: `pull` warns, naming it, and
// goes on without credentials (as docker does).
BOOST_AUTO_TEST_CASE(pull_names_a_docker_config_it_cannot_parse) {
    cli();
    temp_dir dir;
    auto layout = make_busybox_layout(dir.path);
    registry_server server(dir.path);
    skopeo_copy("oci:" + layout.string() + ":latest",
                "docker://" + server.host() + "/cli/busybox:1");
    write_text(dir.path / "config.json", "{\"auths\": {");
    auto [status, out] = run_shell("DOCKER_CONFIG=" + dir.path.string() +
                                   " XDG_CACHE_HOME=" + (dir.path / "cache").string() + " " +
                                   cli() + " pull --quiet " + server.host() + "/cli/busybox:1");
    BOOST_TEST(status == 0, out);
    BOOST_TEST(out.find("supermachine pull: warning: cannot parse " +
                        (dir.path / "config.json").string()) != std::string::npos,
               out);
}
