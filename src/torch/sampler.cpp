// DistributedSampler (include/aikido/torch.hpp): one shared order per epoch, walked one global batch at a time.
#include <aikido/elastic.hpp>
#include <aikido/torch.hpp>
#include <numeric>
#include <sstream>

#include "base/bytes.hpp"
#include "base/error.hpp"
#include "splitmix.hpp"

namespace aikido::torch {

using detail::str_cat;

DistributedSampler::DistributedSampler(std::size_t dataset_size, const Peer& peer, std::uint64_t seed, bool shuffle)
    : dataset_size_(dataset_size), peer_(&peer), seed_(seed), shuffle_(shuffle) {
  shuffle_order();
}

DistributedSampler::DistributedSampler(std::size_t dataset_size, int rank, int size, std::uint64_t seed, bool shuffle)
    : dataset_size_(dataset_size), rank_(rank), size_(size), seed_(seed), shuffle_(shuffle) {
  if (size < 1 || rank < 0 || rank >= size) {
    throw ConfigError(str_cat("DistributedSampler: rank ", rank, " is not in 0..", size - 1));
  }
  shuffle_order();
}

std::pair<int, int> DistributedSampler::world() const {
  if (peer_ != nullptr) return {peer_->rank(), peer_->size()};
  return {rank_, size_};
}

// The order of epoch epoch_: a Fisher-Yates shuffle driven by (seed, epoch), identical on every worker and platform.
void DistributedSampler::shuffle_order() {
  order_.resize(dataset_size_);
  std::iota(order_.begin(), order_.end(), std::size_t(0));
  if (!shuffle_) return;
  std::uint64_t state = seed_ ^ (static_cast<std::uint64_t>(epoch_) * 0xd1b54a32d192ed03ULL);
  for (std::size_t i = dataset_size_; i > 1; --i) {
    const std::size_t j = static_cast<std::size_t>(rng::splitmix64(state) % i);
    std::swap(order_[i - 1], order_[j]);
  }
}

void DistributedSampler::set_epoch(std::int64_t epoch) {
  epoch_ = epoch;
  position_ = 0;
  shuffle_order();
}

void DistributedSampler::set_position(std::size_t position) {
  if (position > dataset_size_) {
    throw ConfigError(str_cat("DistributedSampler: position ", position, " is past the end of the epoch (",
                              dataset_size_, " samples)"));
  }
  position_ = position;
}

std::size_t DistributedSampler::steps_per_epoch(std::size_t batch_size) const {
  const std::size_t global = batch_size * static_cast<std::size_t>(world().second);
  return global == 0 ? 0 : (dataset_size_ + global - 1) / global;
}

std::optional<std::vector<std::size_t>> DistributedSampler::next_batch(std::size_t batch_size) {
  if (batch_size == 0) throw ConfigError("DistributedSampler: the batch size must be at least 1");
  if (position_ >= dataset_size_) return std::nullopt;
  const auto [rank, size] = world();
  const std::size_t ranks = static_cast<std::size_t>(size), r = static_cast<std::size_t>(rank);
  const std::size_t remaining = dataset_size_ - position_;
  std::size_t begin, count, advance;
  if (remaining >= batch_size * ranks) {
    begin = position_ + r * batch_size;
    count = batch_size;
    advance = batch_size * ranks;
  } else {
    // The last, partial global batch: as even a split as possible, every index exactly once.
    const std::size_t base = remaining / ranks, extra = remaining % ranks;
    begin = position_ + r * base + std::min(r, extra);
    count = base + (r < extra ? 1 : 0);
    advance = remaining;
  }
  position_ += advance;
  return std::vector<std::size_t>(order_.begin() + static_cast<std::ptrdiff_t>(begin),
                                  order_.begin() + static_cast<std::ptrdiff_t>(begin + count));
}

void DistributedSampler::reset(::c10::optional<std::size_t> new_size) {
  if (new_size) dataset_size_ = *new_size;
  position_ = 0;
  shuffle_order();
}

::c10::optional<std::vector<std::size_t>> DistributedSampler::next(std::size_t batch_size) {
  auto batch = next_batch(batch_size);
  if (!batch) return ::c10::nullopt;
  return std::move(*batch);
}

void DistributedSampler::save(::torch::serialize::OutputArchive& archive) const {
  archive.write("epoch", ::torch::tensor(static_cast<std::int64_t>(epoch_)), /*is_buffer=*/true);
  archive.write("position", ::torch::tensor(static_cast<std::int64_t>(position_)), /*is_buffer=*/true);
}

void DistributedSampler::load(::torch::serialize::InputArchive& archive) {
  ::torch::Tensor epoch, position;
  archive.read("epoch", epoch, /*is_buffer=*/true);
  archive.read("position", position, /*is_buffer=*/true);
  set_epoch(epoch.item<std::int64_t>());
  set_position(static_cast<std::size_t>(position.item<std::int64_t>()));
}

void register_state(ElasticSession& session, const NamedParameters& parameters, ::torch::optim::Optimizer& optimizer,
                    DistributedSampler& sampler) {
  for (const auto& item : parameters) {
    const ::torch::Tensor& p = item.value();
    if (!p.is_contiguous())
      throw ConfigError(str_cat("register_state: parameter '", item.key(), "' is not contiguous"));
    session.register_bytes("param/" + item.key(),
                           std::span<std::byte>(static_cast<std::byte*>(p.data_ptr()), p.numel() * p.element_size()));
  }
  session.register_state(
      "optimizer",
      [&optimizer] {
        ::torch::serialize::OutputArchive archive;
        optimizer.save(archive);
        // LibTorch's load() restores the per-parameter state but not the groups' options (learning rate,
        // momentum, ...), which training may have changed: they travel beside it.
        for (std::size_t i = 0; i < optimizer.param_groups().size(); ++i) {
          ::torch::serialize::OutputArchive options(archive.compilation_unit());
          optimizer.param_groups()[i].options().serialize(options);
          archive.write(str_cat("aikido/options/", i), options);
        }
        std::ostringstream os;
        archive.save_to(os);
        const std::string bytes = os.str();
        const auto* b = reinterpret_cast<const std::byte*>(bytes.data());
        return std::vector<std::byte>(b, b + bytes.size());
      },
      [&optimizer](std::span<const std::byte> bytes) {
        std::istringstream is(std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
        ::torch::serialize::InputArchive archive;
        archive.load_from(is);
        optimizer.load(archive);
        for (std::size_t i = 0; i < optimizer.param_groups().size(); ++i) {
          ::torch::serialize::InputArchive options;
          if (archive.try_read(str_cat("aikido/options/", i), options)) {
            optimizer.param_groups()[i].options().serialize(options);
          }
        }
      });
  session.register_state(
      "sampler", [&sampler] { return detail::ByteWriter().put(sampler.epoch()).put(sampler.position()).take(); },
      [&sampler](std::span<const std::byte> bytes) {
        detail::ByteReader r(bytes, "register_state: sampler");
        const auto epoch = r.get<std::int64_t>();
        const auto position = r.get<std::size_t>();
        r.finish();
        if (epoch != sampler.epoch()) sampler.set_epoch(epoch);
        sampler.set_position(position);
      });
}

}  // namespace aikido::torch
