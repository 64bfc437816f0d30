#pragma once
// What the agent does as PID 1 before it serves: the mounts a container
// expects, kernel modules, the root disk and switch_root, the token from the
// initramfs, the workload's /dev, and the loopback interface (TCP forwarding connects to
// 127.0.0.1 inside the guest). Failures are logged and survived: a VM that
// can still serve exec is more useful than one that panics.
#include "server.hpp"

#include <cctype>

#include <arpa/inet.h>
#include <dirent.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>

#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/sysmacros.h>

namespace supermachine::agent::guest {

inline void make_dir(const char* path, mode_t mode = 0755) {
    ::mkdir(path, mode);
}

inline void mount_one(const char* source, const char* target, const char* type, unsigned long flags,
                      const char* data = nullptr) {
    make_dir(target);
    if (::mount(source, target, type, flags, data) < 0 && errno != EBUSY)
        log("mount %s failed: errno %d", target, errno);
}

inline void mount_basics() {
    mount_one("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC);
    mount_one("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC);
    mount_one("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    mount_one("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
              "gid=5,mode=0620,ptmxmode=0666");
    mount_one("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    mount_one("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    mount_one("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    // /dev/ptmx must reach the devpts instance for posix_openpt.
    if (::access("/dev/ptmx", F_OK) != 0) ::symlink("pts/ptmx", "/dev/ptmx");
}

inline std::string read_small_file(const char* path, std::size_t max = 64 * 1024) {
    int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return {};
    std::string s(max, '\0');
    std::size_t got = 0;
    while (got < max) {
        ssize_t n = ::read(fd, s.data() + got, max - got);
        if (n <= 0) break;
        got += static_cast<std::size_t>(n);
    }
    ::close(fd);
    s.resize(got);
    return s;
}

/// The value of `key=` on the kernel command line, or empty.
inline std::string cmdline_value(const std::string& cmdline, const std::string& key) {
    // No <sstream>: it drags libstdc++'s locale machinery into the static binary.
    std::string prefix = key + "=";
    std::size_t pos = 0;
    while (pos < cmdline.size()) {
        std::size_t start = cmdline.find_first_not_of(" \t\n", pos);
        if (start == std::string::npos) break;
        std::size_t end = cmdline.find_first_of(" \t\n", start);
        if (end == std::string::npos) end = cmdline.size();
        std::string_view word(cmdline.data() + start, end - start);
        if (word.substr(0, prefix.size()) == prefix) return std::string(word.substr(prefix.size()));
        pos = end;
    }
    return {};
}

/// The lines of `text`, trimmed.
inline std::vector<std::string> split_lines(const std::string& text) {
    std::vector<std::string> lines;
    std::size_t pos = 0;
    while (pos <= text.size()) {
        std::size_t end = text.find('\n', pos);
        if (end == std::string::npos) end = text.size();
        lines.push_back(text.substr(pos, end - pos));
        pos = end + 1;
    }
    return lines;
}

inline std::string trim(std::string s) {
    while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' '))
        s.pop_back();
    return s;
}

/// Loads each module named in the list files: one path per line, relative to
/// /lib/modules (or absolute); '#' starts a comment. A module whose
/// dependencies come later in the list fails with ENOENT (unknown symbol);
/// failed ones are retried while a pass makes progress, so order is forgiving.
inline void load_modules() {
    std::vector<std::string> pending;
    for (const char* list : {"/etc/supermachine/modules", "/etc/modules-load"}) {
        for (std::string line : split_lines(read_small_file(list))) {
            line = trim(line);
            if (line.empty() || line[0] == '#') continue;
            pending.push_back(line[0] == '/' ? line : "/lib/modules/" + line);
        }
    }
    for (bool progress = true; progress && !pending.empty();) {
        progress = false;
        std::vector<std::string> failed;
        std::vector<int> errors;
        for (auto& path : pending) {
            int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
            if (fd < 0) {
                log("module %s: cannot open (errno %d)", path.c_str(), errno);
                continue;
            }
            if (::syscall(SYS_finit_module, fd, "", 0) == 0 || errno == EEXIST) {
                progress = true;
            } else {
                failed.push_back(path);
                errors.push_back(errno);
            }
            ::close(fd);
        }
        if (!progress)
            for (std::size_t i = 0; i < failed.size(); ++i)
                log("module %s: finit_module errno %d", failed[i].c_str(), errors[i]);
        pending = std::move(failed);
    }
}

inline void bring_up_loopback() {
    int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return;
    ifreq req{};
    std::strncpy(req.ifr_name, "lo", IFNAMSIZ - 1);
    if (::ioctl(fd, SIOCGIFFLAGS, &req) == 0) {
        req.ifr_flags |= IFF_UP | IFF_RUNNING;
        ::ioctl(fd, SIOCSIFFLAGS, &req);
    }
    ::close(fd);
}

/// Mounts the root disk (when present) and makes it `/`, moving the API
/// filesystems along. Stays in the initramfs when there is no disk.
inline void switch_to_root_disk(const std::string& cmdline) {
    std::string device = cmdline_value(cmdline, "supermachine.root");
    if (device.empty()) device = "/dev/vda";
    if (device == "none") return;
    std::string type = cmdline_value(cmdline, "supermachine.rootfstype");
    if (type.empty()) type = "ext4";
    // The disk appears when its driver probes, which may trail PID 1 slightly.
    std::int64_t wait_ms = 1000;
    if (auto w = cmdline_value(cmdline, "supermachine.root_wait_ms"); !w.empty())
        wait_ms = std::strtoll(w.c_str(), nullptr, 10);
    std::int64_t until = now_ms() + wait_ms;
    while (::access(device.c_str(), F_OK) != 0 && now_ms() < until)
        ::usleep(10 * 1000);
    if (::access(device.c_str(), F_OK) != 0) {
        log("no root disk %s: staying in the initramfs", device.c_str());
        return;
    }
    make_dir("/newroot");
    if (::mount(device.c_str(), "/newroot", type.c_str(), 0, nullptr) < 0) {
        log("mount root %s failed (errno %d): staying in the initramfs", device.c_str(), errno);
        return;
    }
    for (const char* m : {"/proc", "/sys", "/dev", "/tmp", "/run"}) {
        std::string target = std::string("/newroot") + m;
        ::mkdir(target.c_str(), 0755);
        if (::mount(m, target.c_str(), nullptr, MS_MOVE, nullptr) < 0)
            log("move %s failed: errno %d", m, errno);
    }
    if (::chdir("/newroot") < 0 || ::mount("/newroot", "/", nullptr, MS_MOVE, nullptr) < 0 ||
        ::chroot(".") < 0 || ::chdir("/") < 0) {
        log("switch_root failed: errno %d", "", errno);
        return;
    }
    log("switched root to %s", device.c_str());
}

/// Every value of `key=` on the kernel command line, in order: at most
/// `max_count`, each at most `max_length` bytes (longer ones are skipped and
/// logged: the command line is the host's, but we bound what we act on).
inline std::vector<std::string> cmdline_values(const std::string& cmdline, const std::string& key,
                                               std::size_t max_count, std::size_t max_length) {
    std::vector<std::string> values;
    const std::string prefix = key + "=";
    std::size_t pos = 0;
    while (pos < cmdline.size() && values.size() < max_count) {
        std::size_t start = cmdline.find_first_not_of(" \t\n", pos);
        if (start == std::string::npos) break;
        std::size_t end = cmdline.find_first_of(" \t\n", start);
        if (end == std::string::npos) end = cmdline.size();
        std::string_view word(cmdline.data() + start, end - start);
        if (word.substr(0, prefix.size()) == prefix) {
            if (word.size() - prefix.size() <= max_length)
                values.emplace_back(word.substr(prefix.size()));
            else
                log("%s: value too long, ignored", key.c_str());
        }
        pos = end;
    }
    return values;
}

/// A volume the host asked for: supermachine.volume=TAG:/PATH[:ro].
struct volume_request {
    std::string tag, path;
    bool read_only = false;
};

/// Parse and check one supermachine.volume value: a tag of [A-Za-z0-9_-]
/// (<= 36 bytes, virtio-fs's limit), an absolute path without empty, "." or
/// ".." parts. False: not a volume we mount.
inline bool parse_volume(std::string_view text, volume_request& out) {
    const auto colon = text.find(':');
    if (colon == std::string_view::npos || colon == 0 || colon > 36) return false;
    out.tag = std::string(text.substr(0, colon));
    for (char c : out.tag)
        if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-')) return false;
    std::string_view path = text.substr(colon + 1);
    out.read_only = false;
    if (path.size() >= 3 && path.substr(path.size() - 3) == ":ro") {
        out.read_only = true;
        path.remove_suffix(3);
    }
    if (path.size() < 2 || path.front() != '/' || path.find(':') != std::string_view::npos)
        return false;
    for (std::size_t pos = 1; pos <= path.size();) {
        const auto end = std::min(path.find('/', pos), path.size());
        const auto part = path.substr(pos, end - pos);
        if (part.empty() || part == "." || part == "..") return false;
        pos = end + 1;
    }
    out.path = std::string(path);
    return true;
}

/// mkdir -p `path` (absolute; already checked by parse_volume). We run in
/// the image's root (after switch_root), so a symlink in the image resolves
/// inside that root: the mount point cannot land outside it.
inline bool make_directories(const std::string& path) {
    for (std::size_t pos = 1; pos <= path.size();) {
        const auto end = std::min(path.find('/', pos), path.size());
        const std::string prefix = path.substr(0, end);
        if (::mkdir(prefix.c_str(), 0755) < 0 && errno != EEXIST) return false;
        pos = end + 1;
    }
    return true;
}

/// Mount each supermachine.volume (virtio-fs, by tag) at its path in the
/// current root: at most 8, as the host sends. A read-only one is mounted
/// MS_RDONLY (and the host serves it from a read-only bind mount too).
inline void mount_volumes(const std::string& cmdline) {
    for (const auto& value : cmdline_values(cmdline, "supermachine.volume", 8, 200)) {
        volume_request volume;
        if (!parse_volume(value, volume)) {
            log("volume '%s': not TAG:/PATH[:ro], ignored", value.c_str());
            continue;
        }
        if (!make_directories(volume.path)) {
            log("volume %s: mkdir failed: errno %d", volume.path.c_str(), errno);
            continue;
        }
        const unsigned long flags = MS_NOSUID | MS_NODEV | (volume.read_only ? MS_RDONLY : 0);
        if (::mount(volume.tag.c_str(), volume.path.c_str(), "virtiofs", flags, nullptr) < 0)
            log("volume %s: mount failed: errno %d", volume.path.c_str(), errno);
    }
}

/// The token: /etc/supermachine/token in the initramfs (the host writes one
/// initramfs per vm), removed once read. Never the kernel command line:
/// /proc/cmdline and the boot log are readable by every guest user.
inline std::string take_token() {
    std::string token = trim(read_small_file("/etc/supermachine/token", max_token_size));
    if (::unlink("/etc/supermachine/token") < 0 && errno != ENOENT)
        log("cannot remove the token file: errno %d", "", errno);
    return token;
}

/// /etc/hostname and /etc/hosts as docker gives them: files of the agent's
/// (in the /run tmpfs) bind-mounted over the image's, so the per-run
/// set_hostname writes no disk. Made once at boot, before a warm snapshot;
/// a missing or symlinked target is replaced by an empty file first. A
/// failure leaves the image's files (set_hostname then writes them).
inline void mount_hostname_files() {
    make_dir("/run/supermachine");
    for (const char* name : {"hostname", "hosts"}) {
        const std::string source = std::string("/run/supermachine/") + name;
        const std::string target = std::string("/etc/") + name;
        const int fd = ::open(source.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0) continue;
        ::close(fd);
        struct stat st {};
        if (::lstat(target.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
            make_dir("/etc");
            ::unlink(target.c_str());
            const int made =
                ::open(target.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
            if (made >= 0) ::close(made);
        }
        if (::mount(source.c_str(), target.c_str(), nullptr, MS_BIND, nullptr) < 0)
            log("%s: bind mount failed: errno %d", target.c_str(), errno);
    }
}

/// The user-mode network (supermachine.net=user, doc/vm.md "Network"):
/// eth0 at 10.0.2.15/24, default route via 10.0.2.2, DNS at 10.0.2.3, set
/// with ioctls (images need no `ip`). /etc/resolv.conf is a file of ours
/// bind-mounted over the image's, as /etc/hosts is (mount_hostname_files).
/// Done once at boot, so a warm snapshot holds it; a restored clone keeps
/// the configuration and sees at most a link flap.
inline void configure_network(const std::string& cmdline) {
    if (cmdline_value(cmdline, "supermachine.net") != "user") return;
    const char* name = "eth0";
    // virtio_net probes while the modules load: wait for eth0 briefly.
    for (int i = 0; i < 200 && ::if_nametoindex(name) == 0; ++i)
        ::usleep(10 * 1000);
    const int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || ::if_nametoindex(name) == 0) {
        log("network: no %s (errno %d)", name, errno);
        if (fd >= 0) ::close(fd);
        return;
    }
    auto set_address = [&](unsigned long request, const char* text) {
        ifreq req{};
        std::strncpy(req.ifr_name, name, IFNAMSIZ - 1);
        auto* in = reinterpret_cast<sockaddr_in*>(&req.ifr_addr);
        in->sin_family = AF_INET;
        ::inet_pton(AF_INET, text, &in->sin_addr);
        if (::ioctl(fd, request, &req) != 0) log("network: address %s: errno %d", text, errno);
    };
    set_address(SIOCSIFADDR, "10.0.2.15");
    set_address(SIOCSIFNETMASK, "255.255.255.0");
    ifreq up{};
    std::strncpy(up.ifr_name, name, IFNAMSIZ - 1);
    if (::ioctl(fd, SIOCGIFFLAGS, &up) == 0) {
        up.ifr_flags |= IFF_UP | IFF_RUNNING;
        if (::ioctl(fd, SIOCSIFFLAGS, &up) != 0) log("network: %s up: errno %d", name, errno);
    }
    rtentry route{};
    auto* gateway = reinterpret_cast<sockaddr_in*>(&route.rt_gateway);
    gateway->sin_family = AF_INET;
    ::inet_pton(AF_INET, "10.0.2.2", &gateway->sin_addr);
    reinterpret_cast<sockaddr_in*>(&route.rt_dst)->sin_family = AF_INET;
    reinterpret_cast<sockaddr_in*>(&route.rt_genmask)->sin_family = AF_INET;
    route.rt_flags = RTF_UP | RTF_GATEWAY;
    route.rt_dev = const_cast<char*>(name);
    if (::ioctl(fd, SIOCADDRT, &route) != 0 && errno != EEXIST)
        log("network: default route%s: errno %d", "", errno);
    ::close(fd);

    make_dir("/run/supermachine");
    const char* source = "/run/supermachine/resolv.conf";
    const char* target = "/etc/resolv.conf";
    const std::string text = "nameserver 10.0.2.3\n";
    const int out = ::open(source, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0) return;
    const bool written =
        ::write(out, text.data(), text.size()) == static_cast<ssize_t>(text.size());
    ::close(out);
    if (!written) return;
    struct stat st {};
    if (::lstat(target, &st) != 0 || !S_ISREG(st.st_mode)) {
        // Missing, or a symlink (e.g. into systemd-resolved's /run): replaced in
        // this vm's own copy-on-write root, never followed.
        make_dir("/etc");
        ::unlink(target);
        const int made = ::open(target, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
        if (made >= 0) ::close(made);
    }
    if (::mount(source, target, nullptr, MS_BIND, nullptr) < 0)
        log("%s: bind mount failed: errno %d", target, errno);
}

/// A node of the workload's /dev: name, kind (S_IFCHR/S_IFBLK), device, mode.
struct dev_node {
    const char* name;
    unsigned major, minor;
    mode_t mode;
};

/// Gives the workload the /dev a container has (docker's list; doc/vm.md,
/// "/dev"): a tmpfs with null zero full random urandom tty console, ptmx ->
/// pts/ptmx, a fresh devpts, shm, mqueue, fd stdin stdout stderr as links
/// into /proc/self/fd, and the data disks (every /dev/vd* but the root
/// disk). Built aside in /run, then moved over /dev; the kernel's devtmpfs
/// (memory, kmsg, the agent's virtio-serial port...) is unmounted: fds the
/// agent holds on it stay valid. On failure the devtmpfs stays.
inline void make_container_dev(const std::string& root_device) {
    const char* stage = "/run/.supermachine-dev";
    make_dir(stage);
    if (::mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=65536k") < 0) {
        log("/dev: tmpfs failed: errno %d, keeping devtmpfs", "", errno);
        ::rmdir(stage);
        return;
    }
    const mode_t old_mask = ::umask(0);
    const std::string at = std::string(stage) + "/";
    static constexpr dev_node nodes[] = {
        {"null", 1, 3, 0666},    {"zero", 1, 5, 0666},    {"full", 1, 7, 0666},
        {"random", 1, 8, 0666},  {"urandom", 1, 9, 0666}, {"tty", 5, 0, 0666},
        {"console", 5, 1, 0600}, // the serial console: root only
    };
    for (const auto& n : nodes)
        if (::mknod((at + n.name).c_str(), S_IFCHR | n.mode, makedev(n.major, n.minor)) < 0)
            log("/dev/%s: mknod failed: errno %d", n.name, errno);
    // Data disks: the same device numbers and owners as devtmpfs gave them.
    if (DIR* dir = ::opendir("/dev")) {
        while (dirent* e = ::readdir(dir)) {
            const std::string name = e->d_name;
            if (name.size() < 3 || name.compare(0, 2, "vd") != 0 || "/dev/" + name == root_device)
                continue;
            struct stat st {};
            if (::stat(("/dev/" + name).c_str(), &st) == 0 && S_ISBLK(st.st_mode) &&
                ::mknod((at + name).c_str(), S_IFBLK | 0660, st.st_rdev) == 0)
                (void)!::chown((at + name).c_str(), st.st_uid, st.st_gid);
        }
        ::closedir(dir);
    }
    for (const auto& [name, target] :
         {std::pair{"fd", "/proc/self/fd"}, std::pair{"stdin", "/proc/self/fd/0"},
          std::pair{"stdout", "/proc/self/fd/1"}, std::pair{"stderr", "/proc/self/fd/2"},
          std::pair{"ptmx", "pts/ptmx"}})
        ::symlink(target, (at + name).c_str());
    for (const char* d : {"pts", "shm", "mqueue"})
        ::mkdir((at + d).c_str(), 0755);
    ::umask(old_mask);
    for (const char* m : {"/dev/pts", "/dev/shm", "/dev/mqueue", "/dev"})
        ::umount2(m, MNT_DETACH);
    if (::mount(stage, "/dev", nullptr, MS_MOVE, nullptr) < 0) {
        log("/dev: move failed: errno %d", "", errno);
        return;
    }
    ::rmdir(stage);
    mount_one("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
              "newinstance,gid=5,mode=0620,ptmxmode=0666");
    mount_one("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              "mode=1777,size=65536k");
    mount_one("mqueue", "/dev/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC);
}

[[noreturn]] inline void power_off() {
    ::sync();
    ::reboot(RB_POWER_OFF);
    for (;;)
        ::pause();
}

} // namespace supermachine::agent::guest
