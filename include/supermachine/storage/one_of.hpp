#pragma once
// one_of<Policies...>: block storage whose policy is chosen at run time from
// a compile-time list, e.g. one_of<raw_file, cow_file<raw_file>> for a disk
// slot that is either a plain file or a copy-on-write overlay, decided by a
// command-line flag. The config is a std::variant of the policies' configs;
// the alternative it holds is the one opened.
//
// Optional members are offered when every alternative has them
// (discard, write_zeroes, read_vectored/write_vectored), id() when any has it.
#include <supermachine/error.hpp>
#include <supermachine/storage/block_storage.hpp>

#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <variant>

namespace supermachine::storage {

template <block_storage... Policies>
requires(sizeof...(Policies) > 0) class one_of {
public:
    struct config {
        std::variant<typename Policies::config...> choice;
    };

    static result<std::unique_ptr<one_of>> open(const config& cfg) { return open_index<0>(cfg); }

    std::uint64_t size() const noexcept {
        return std::visit([](const auto& p) -> std::uint64_t { return p->size(); }, chosen_);
    }
    bool is_read_only() const noexcept {
        return std::visit([](const auto& p) -> bool { return p->is_read_only(); }, chosen_);
    }
    result<void> read(std::uint64_t offset, std::span<std::byte> out) {
        return std::visit([&](auto& p) { return p->read(offset, out); }, chosen_);
    }
    result<void> write(std::uint64_t offset, std::span<const std::byte> in) {
        return std::visit([&](auto& p) { return p->write(offset, in); }, chosen_);
    }
    result<void> flush() {
        return std::visit([](auto& p) { return p->flush(); }, chosen_);
    }
    result<void> discard(std::uint64_t offset,
                         std::uint64_t length) requires(discards<Policies>&&...) {
        return std::visit([&](auto& p) { return p->discard(offset, length); }, chosen_);
    }
    result<void> write_zeroes(std::uint64_t offset,
                              std::uint64_t length) requires(writes_zeroes<Policies>&&...) {
        return std::visit([&](auto& p) { return p->write_zeroes(offset, length); }, chosen_);
    }
    result<void> read_vectored(std::uint64_t offset,
                               std::span<::iovec> iov) requires(vectored<Policies>&&...) {
        return std::visit([&](auto& p) { return p->read_vectored(offset, iov); }, chosen_);
    }
    result<void> write_vectored(std::uint64_t offset,
                                std::span<::iovec> iov) requires(vectored<Policies>&&...) {
        return std::visit([&](auto& p) { return p->write_vectored(offset, iov); }, chosen_);
    }
    std::string id() const requires(has_id<Policies> || ...) {
        return std::visit(
            [](const auto& p) -> std::string {
                if constexpr (has_id<std::decay_t<decltype(*p)>>)
                    return p->id();
                else
                    return {};
            },
            chosen_);
    }

    /// Which alternative was opened (index into Policies...).
    std::size_t index() const noexcept { return chosen_.index(); }

private:
    // By index, not by type: two alternatives may share a config type
    // (raw_file and read_only<raw_file>).
    template <std::size_t I>
    static result<std::unique_ptr<one_of>> open_index(const config& cfg) {
        if constexpr (I == sizeof...(Policies)) {
            return errc::invalid_argument; // valueless variant
        } else {
            if (cfg.choice.index() != I) return open_index<I + 1>(cfg);
            using policy = std::tuple_element_t<I, std::tuple<Policies...>>;
            SUPERMACHINE_TRY(opened, policy::open(std::get<I>(cfg.choice)));
            return std::unique_ptr<one_of>(new one_of(std::in_place_index<I>, std::move(opened)));
        }
    }

    template <std::size_t I, class P>
    one_of(std::in_place_index_t<I> at, std::unique_ptr<P> p)
        : chosen_(at, std::move(p)) {}

    std::variant<std::unique_ptr<Policies>...> chosen_;
};

} // namespace supermachine::storage
