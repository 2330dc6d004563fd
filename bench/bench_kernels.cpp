// Micro-benchmarks of the pieces every collective runs per byte or per message:
//   reduce_into/<dtype>/<op>/<bytes>   aikido::detail::reduce_into (dst = op(dst, src)) for every element type and
//                                      operation; bytes/s counts the bytes of one buffer per call.
//   frame_encode, frame_decode         building a frame (header + name + payload) into a byte stream and parsing it
//                                      back with validation, as a connection does, in memory; bytes/s counts the
//                                      frame's bytes.
//   frame_roundtrip_unix               the same frame written with writev and read back over a Unix socket pair.
#include <benchmark/benchmark.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <aikido/types.hpp>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "base/reduce.hpp"
#include "transport/frame.hpp"

namespace {

using aikido::DType;
using aikido::ReduceOp;

constexpr DType kDTypes[] = {DType::f32, DType::f64, DType::f16, DType::bf16, DType::i32, DType::i64, DType::u8};
constexpr ReduceOp kOps[] = {ReduceOp::sum, ReduceOp::min, ReduceOp::max, ReduceOp::prod};
// In cache (L1/L2), in L2/L3, and out of cache.
constexpr std::size_t kReduceBytes[] = {std::size_t(4) << 10, std::size_t(256) << 10, std::size_t(16) << 20};

/// Writes `count` elements of `dtype` holding small integers cycling through `values`.
void fill(DType dtype, void* data, std::size_t count, std::initializer_list<int> values) {
  const std::vector<int> cycle(values);
  for (std::size_t i = 0; i < count; ++i) {
    const int v = cycle[i % cycle.size()];
    switch (dtype) {
      case DType::f32:
        static_cast<float*>(data)[i] = float(v);
        break;
      case DType::f64:
        static_cast<double*>(data)[i] = double(v);
        break;
      case DType::f16:
        static_cast<aikido::float16*>(data)[i] = aikido::float16(float(v));
        break;
      case DType::bf16:
        static_cast<aikido::bfloat16*>(data)[i] = aikido::bfloat16(float(v));
        break;
      case DType::i32:
        static_cast<std::int32_t*>(data)[i] = v;
        break;
      case DType::i64:
        static_cast<std::int64_t*>(data)[i] = v;
        break;
      case DType::u8:
        static_cast<std::uint8_t*>(data)[i] = std::uint8_t(v);
        break;
    }
  }
}

void bm_reduce_into(benchmark::State& state, DType dtype, ReduceOp op, std::size_t bytes) {
  const std::size_t count = bytes / aikido::dtype_size(dtype);
  std::vector<std::byte> dst(bytes);
  std::vector<std::byte> src(bytes);
  // Repeated reductions into dst must stay finite and free of overflow: prod multiplies by one, sum adds zeros and
  // ones, min and max see a mix.
  switch (op) {
    case ReduceOp::prod:
      fill(dtype, dst.data(), count, {1, 2, 3});
      fill(dtype, src.data(), count, {1});
      break;
    case ReduceOp::sum:
    case ReduceOp::mean:
      fill(dtype, dst.data(), count, {1, 2, 3});
      fill(dtype, src.data(), count, {0, 1, 0, 0});
      break;
    case ReduceOp::min:
    case ReduceOp::max:
      fill(dtype, dst.data(), count, {3, 1, 4, 1, 5, 9, 2, 6});
      fill(dtype, src.data(), count, {2, 7, 1, 8, 2, 8});
      break;
  }
  for (auto _ : state) {
    aikido::detail::reduce_into(dtype, op, dst.data(), src.data(), count);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(count * aikido::dtype_size(dtype)));
  state.SetItemsProcessed(std::int64_t(state.iterations()) * std::int64_t(count));
}

// A data frame as the ring algorithm sends it: header, collective name, one segment of payload.
struct FrameFixture {
  explicit FrameFixture(std::size_t payload_bytes) : payload(payload_bytes, std::byte{1}) {
    stream.resize(sizeof(aikido::transport::FrameHeader) + name.size() + payload_bytes);
  }
  std::string name = "model.layers.17.mlp.fc1.weight.grad";
  std::vector<std::byte> payload;
  std::vector<std::byte> stream;

  aikido::transport::FrameHeader header(std::uint64_t seq) const {
    aikido::transport::FrameHeader h;
    h.type = aikido::transport::FrameType::data;
    h.kind = 0;
    h.dtype = std::uint8_t(DType::f32);
    h.op = std::uint8_t(ReduceOp::sum);
    h.source = 1;
    h.cluster_version = 3;
    h.seq = seq;
    h.tag = 5;
    h.count = payload.size() / 4;
    h.name_bytes = std::uint32_t(name.size());
    h.payload_bytes = payload.size();
    return h;
  }
  std::size_t encode(std::uint64_t seq) {
    const aikido::transport::FrameHeader h = header(seq);
    std::byte* out = stream.data();
    std::memcpy(out, &h, sizeof h);
    std::memcpy(out + sizeof h, name.data(), name.size());
    std::memcpy(out + sizeof h + name.size(), payload.data(), payload.size());
    return stream.size();
  }
};

/// Parses a frame from `stream` the way a connection's receive loop does; returns the payload size.
std::size_t decode(const std::byte* stream, std::string& name, std::byte* payload_out, int peer) {
  aikido::transport::FrameHeader h;
  std::memcpy(&h, stream, sizeof h);
  aikido::transport::validate_header(h, peer);
  name.assign(reinterpret_cast<const char*>(stream + sizeof h), h.name_bytes);
  std::memcpy(payload_out, stream + sizeof h + h.name_bytes, std::size_t(h.payload_bytes));
  return std::size_t(h.payload_bytes);
}

void bm_frame_encode(benchmark::State& state) {
  FrameFixture fixture(std::size_t(state.range(0)));
  std::uint64_t seq = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(fixture.encode(seq++));
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(fixture.stream.size()));
  state.SetItemsProcessed(std::int64_t(state.iterations()));
}

void bm_frame_decode(benchmark::State& state) {
  FrameFixture fixture(std::size_t(state.range(0)));
  fixture.encode(7);
  std::string name;
  std::vector<std::byte> payload(fixture.payload.size());
  for (auto _ : state) {
    benchmark::DoNotOptimize(decode(fixture.stream.data(), name, payload.data(), 1));
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(fixture.stream.size()));
  state.SetItemsProcessed(std::int64_t(state.iterations()));
}

void read_exact(int fd, void* data, std::size_t size) {
  auto* p = static_cast<char*>(data);
  while (size > 0) {
    const ssize_t n = ::read(fd, p, size);
    if (n <= 0) throw std::runtime_error("frame_roundtrip_unix: read failed");
    p += n;
    size -= std::size_t(n);
  }
}

// Payloads fit in the socket buffer, so one thread can write then read.
void bm_frame_roundtrip_unix(benchmark::State& state) {
  FrameFixture fixture(std::size_t(state.range(0)));
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) {
    state.SkipWithError("socketpair failed");
    return;
  }
  std::string name;
  std::vector<std::byte> payload(fixture.payload.size());
  std::uint64_t seq = 0;
  for (auto _ : state) {
    aikido::transport::FrameHeader h = fixture.header(seq++);
    iovec iov[3] = {
        {&h, sizeof h}, {fixture.name.data(), fixture.name.size()}, {fixture.payload.data(), fixture.payload.size()}};
    const ssize_t written = ::writev(fds[0], iov, 3);
    if (written != ssize_t(fixture.stream.size())) {
      state.SkipWithError("short writev");
      break;
    }
    aikido::transport::FrameHeader got;
    read_exact(fds[1], &got, sizeof got);
    aikido::transport::validate_header(got, 1);
    name.resize(got.name_bytes);
    read_exact(fds[1], name.data(), name.size());
    read_exact(fds[1], payload.data(), std::size_t(got.payload_bytes));
    benchmark::ClobberMemory();
  }
  ::close(fds[0]);
  ::close(fds[1]);
  state.SetBytesProcessed(std::int64_t(state.iterations()) * std::int64_t(fixture.stream.size()));
  state.SetItemsProcessed(std::int64_t(state.iterations()));
}

void register_benchmarks() {
  for (DType dtype : kDTypes) {
    for (ReduceOp op : kOps) {
      for (std::size_t bytes : kReduceBytes) {
        const std::string name = std::string("reduce_into/") + aikido::dtype_name(dtype) + "/" +
                                 aikido::reduce_op_name(op) + "/" + std::to_string(bytes);
        benchmark::RegisterBenchmark(name.c_str(), bm_reduce_into, dtype, op, bytes);
      }
    }
  }
  for (auto* bm : {benchmark::RegisterBenchmark("frame_encode", bm_frame_encode),
                   benchmark::RegisterBenchmark("frame_decode", bm_frame_decode)}) {
    bm->Arg(0)->Arg(256)->Arg(4 << 10)->Arg(64 << 10)->Arg(1 << 20);
  }
  benchmark::RegisterBenchmark("frame_roundtrip_unix", bm_frame_roundtrip_unix)
      ->Arg(0)
      ->Arg(256)
      ->Arg(4 << 10)
      ->Arg(16 << 10);
}

}  // namespace

int main(int argc, char** argv) {
  register_benchmarks();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 2;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
