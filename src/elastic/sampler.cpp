#include <aikido/elastic.hpp>
#include <aikido/errors.hpp>
#include <algorithm>
#include <numeric>
#include <random>

namespace aikido {

ElasticSampler::ElasticSampler(std::uint64_t dataset_size, std::uint64_t seed, bool shuffle)
    : dataset_size_(dataset_size), seed_(seed), shuffle_(shuffle) {
  if (dataset_size == 0) throw ConfigError("ElasticSampler: the dataset is empty");
  if (shuffle && dataset_size > std::uint64_t(UINT32_MAX)) {
    throw ConfigError("ElasticSampler: shuffling supports at most 2^32 - 1 samples");
  }
}

ElasticSampler::Range ElasticSampler::shard(int rank, int size, std::uint64_t batch) const {
  if (rank < 0 || rank >= size) throw ConfigError("ElasticSampler::shard: rank outside 0..size-1");
  const std::uint64_t begin = std::min(dataset_size_, state_.position + std::uint64_t(rank) * batch);
  return {begin, std::min(dataset_size_, begin + batch)};
}

void ElasticSampler::shuffle_epoch() const {
  order_.resize(dataset_size_);
  std::iota(order_.begin(), order_.end(), 0u);
  std::mt19937_64 rng(seed_ * 0x9e3779b97f4a7c15ull + state_.epoch);
  std::shuffle(order_.begin(), order_.end(), rng);
  order_epoch_ = state_.epoch;
}

std::uint64_t ElasticSampler::index(std::uint64_t position) const {
  if (position >= dataset_size_) throw ConfigError("ElasticSampler::index: position past the end of the epoch");
  if (!shuffle_) return position;
  if (order_epoch_ != state_.epoch) shuffle_epoch();
  return order_[position];
}

bool ElasticSampler::advance(int size, std::uint64_t batch) {
  state_.position += std::uint64_t(size) * batch;
  if (state_.position < dataset_size_) return false;
  state_.position = 0;
  ++state_.epoch;
  return true;
}

}  // namespace aikido
