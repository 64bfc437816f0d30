#pragma once
// An image snapshot directory as something to start, from the directory
// alone (doc/vm.md, "Starting from a snapshot alone"):
//
//   boost::asio::io_context io;
//   supermachine::image::from_snapshot("/var/lib/app/snap").async_start(
//       io.get_executor(), [](error_code ec, std::shared_ptr<supermachine::vm> vm) {
//           if (ec) std::cerr << ec.message() << ": " << (vm ? vm->failure_detail() : "");
//       });
//   io.run();
//
// The directory (`supermachine snapshot -o DIR IMAGE`, or vm::async_snapshot)
// records the image digest, memory, vCPUs, kernel release and command line;
// the image is found in the content store, the kernel in the kernel cache.
#include <supermachine/detail/warm_snapshot_contents.hpp>
#include <supermachine/error.hpp>
#include <supermachine/image.hpp>
#include <supermachine/vm.hpp>

#include <filesystem>
#include <string>
#include <utility>

namespace supermachine {

class snapshot_image {
public:
    /// What the directory says: the image (config, root filesystem,
    /// accounts), memory, vCPUs, kernel, extra kernel arguments, the record.
    using contents = detail::warm_snapshot_contents;

    explicit snapshot_image(std::filesystem::path directory, snapshot_start_options options = {})
        : directory_(std::move(directory))
        , options_(std::move(options)) {}

    const std::filesystem::path& directory() const noexcept { return directory_; }
    /// Console, ready timeout, runtime directory, content store.
    snapshot_start_options& options() noexcept { return options_; }
    const snapshot_start_options& options() const noexcept { return options_; }

    /// Read the record and find its image and kernel (blocking, small: the
    /// record, the content store's index, the manifest and config). The
    /// same checks async_start makes first; `why` gets one sentence on
    /// failure. For a caller that wants the image's config before starting.
    result<contents> read(std::string* why = nullptr) const {
        return detail::read_warm_snapshot(directory_, options_.cache_dir, why);
    }

    /// Start a vm from the snapshot: vm::async_restore(executor, directory(),
    /// options(), token). Completion: void(error_code, std::shared_ptr<vm>);
    /// on error the vm (if any) is stopped and only says failure_detail() and
    /// console_tail().
    template <class Token>
    auto async_start(vm::executor_type executor, Token&& token) const {
        return vm::async_restore(std::move(executor), directory_, options_,
                                 std::forward<Token>(token));
    }

private:
    std::filesystem::path directory_;
    snapshot_start_options options_;
};

inline snapshot_image image::from_snapshot(std::filesystem::path directory) {
    return snapshot_image(std::move(directory));
}

} // namespace supermachine
