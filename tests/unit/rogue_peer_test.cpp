// A peer that knows the job secret but breaks the protocol: rank 1 is played by hand over a real TCP connection
// (handshake, then frames built here), rank 0 is a real Peer. Every violation must end rank 0's collective with a
// ProtocolError that names rank 1, never a crash, a hang or a wrong result.
#include <gtest/gtest.h>

#include <aikido/aikido.hpp>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "runtime/endpoint.hpp"
#include "runtime/peer_env.hpp"
#include "transport/frame.hpp"
#include "transport/handshake.hpp"
#include "transport/interfaces.hpp"
#include "transport/socket.hpp"

namespace aikido {
namespace {

using transport::FrameHeader;
using transport::FrameType;

constexpr auto kTimeout = std::chrono::seconds(20);
const std::string kSecret = "rogue-test-secret";

struct Frame {
  FrameHeader header;
  std::string name;
};

// Rank 1, by hand: connects to rank 0, reads what rank 0 sends and sends what the test builds.
class Rogue {
 public:
  Rogue(const std::shared_ptr<Store>& store, const std::string& job_id) {
    detail::Endpoint mine{"rogue-host", "tcp:127.0.0.1:9", "", transport::network_id()};
    store->set(detail::endpoint_key(job_id, 0, 1), detail::encode_endpoint(mine));
    const auto record = store->wait(detail::endpoint_key(job_id, 0, 0), kTimeout);
    const detail::Endpoint rank0 = detail::decode_endpoint(record, 0);
    socket_ = transport::connect(transport::Address::parse(rank0.tcp), transport::Clock::now() + kTimeout);
    transport::handshake_connect(socket_, kSecret, transport::Channel::data, 0, 1, kTimeout);
  }

  // The next data frame rank 0 sends (its segment of a collective); its payload is skipped.
  Frame next_data_frame() {
    for (;;) {
      Frame f;
      socket_.read_exact(&f.header, sizeof f.header);
      f.name.resize(f.header.name_bytes);
      if (!f.name.empty()) socket_.read_exact(f.name.data(), f.name.size());
      std::vector<char> payload(f.header.payload_bytes);
      if (!payload.empty()) socket_.read_exact(payload.data(), payload.size());
      if (f.header.type == FrameType::data) return f;
    }
  }

  // Sends `frame` as rank 1 with `payload_bytes` bytes of payload, each `fill`.
  void send(Frame frame, std::uint64_t payload_bytes, char fill = 0) {
    frame.header.source = 1;
    frame.header.name_bytes = std::uint32_t(frame.name.size());
    frame.header.payload_bytes = payload_bytes;
    std::string bytes(reinterpret_cast<const char*>(&frame.header), sizeof frame.header);
    bytes += frame.name;
    bytes += std::string(payload_bytes, fill);
    socket_.write_all(bytes.data(), bytes.size());
  }

 private:
  transport::Socket socket_;
};

// Runs rank 0 (a real Peer, in a thread) against the rogue rank 1 (this thread).
void run_against_rogue(const std::function<void(Peer&)>& rank0, const std::function<void(Rogue&)>& rogue) {
  static int job = 0;
  auto store = make_memory_store();
  const std::string job_id = "rogue" + std::to_string(job++);
  std::exception_ptr failure;
  std::thread thread([&] {
    try {
      PeerConfig config;
      config.secret = kSecret;
      config.rank = 0;
      config.size = 2;
      config.store = store;
      config.job_id = job_id;
      config.host = "rank0-host";
      config.transport = TransportKind::tcp;
      config.streams = 1;  // the rogue speaks the data protocol only, not the link probe between hosts
      config.timeout = std::chrono::duration_cast<std::chrono::milliseconds>(kTimeout);
      Peer peer = Peer::create(config);
      rank0(peer);
    } catch (...) {
      failure = std::current_exception();
    }
  });
  try {
    Rogue r(store, job_id);
    rogue(r);
  } catch (const Error& e) {
    // Its connection is closed now, so rank 0's collective ends too; whether rank 0 saw what it must is its check.
    // (A rogue's write may fail because rank 0 already closed the connection on a violation.)
    std::printf("the rogue rank stopped: %s\n", e.what());
  }
  thread.join();
  if (failure) std::rethrow_exception(failure);
}

// Rank 0's allreduce of four floats named "w" fails with a ProtocolError naming rank 1 and containing `what`.
void expect_protocol_error(Peer& peer, const std::string& what) {
  std::vector<float> x{1, 2, 3, 4};
  try {
    peer.allreduce(std::span<float>(x), ReduceOp::sum, "w");
    ADD_FAILURE() << "the allreduce succeeded against a peer that broke the protocol";
  } catch (const ProtocolError& e) {
    const std::string text = e.what();
    EXPECT_NE(text.find("rank 1"), std::string::npos) << text;
    EXPECT_NE(text.find(what), std::string::npos) << text;
  }
}

// Whether the receive is armed when the segment arrives or not, the length is checked before a byte is read.
TEST(RoguePeer, ASegmentOfTheWrongLength) {
  run_against_rogue([](Peer& peer) { expect_protocol_error(peer, "segment of allreduce 'w' (seq 0)"); },
                    [](Rogue& r) {
                      const Frame f = r.next_data_frame();
                      r.send(f, f.header.payload_bytes + 4);
                    });
}

TEST(RoguePeer, ASegmentOutsideThePlan) {
  run_against_rogue([](Peer& peer) { expect_protocol_error(peer, "which is not one that rank sends"); },
                    [](Rogue& r) {
                      Frame f = r.next_data_frame();
                      f.header.tag += 12345;
                      r.send(f, f.header.payload_bytes);
                    });
}

// A stale segment of an earlier occurrence of a name (occurrence 0 again while occurrence 1 runs) is never taken for
// the running one. (It cannot be refused outright: peers may legitimately send segments a rank no longer needs.)
TEST(RoguePeer, ASegmentOfAFinishedCollectiveIsNeverTakenForALaterOne) {
  run_against_rogue(
      [](Peer& peer) {
        for (int occurrence = 0; occurrence < 2; ++occurrence) {
          std::vector<float> x{1, 2, 3, 4};
          peer.allreduce(std::span<float>(x), ReduceOp::sum, "w");
          EXPECT_EQ(x, (std::vector<float>{1, 2, 3, 4})) << occurrence;  // the rogue's zeros added
        }
      },
      [](Rogue& r) {
        const Frame first = r.next_data_frame();
        r.send(first, first.header.payload_bytes);     // a correct segment of zeros: occurrence 0 completes
        const Frame second = r.next_data_frame();      // rank 0 posted occurrence 1
        r.send(first, first.header.payload_bytes, 1);  // occurrence 0 again, with other values
        r.send(second, second.header.payload_bytes);
      });
}

TEST(RoguePeer, FramesOfUnknownNamesAreNeverMixedIntoAResult) {
  run_against_rogue(
      [](Peer& peer) {
        std::vector<float> x{1, 2, 3, 4};
        peer.allreduce(std::span<float>(x), ReduceOp::sum, "w");
        EXPECT_EQ(x, (std::vector<float>{1, 2, 3, 4}));
      },
      [](Rogue& r) {
        Frame f = r.next_data_frame();
        Frame other = f;
        other.name = "no-such-collective";
        r.send(other, f.header.payload_bytes, 1);  // early for a name never posted: kept apart
        r.send(f, f.header.payload_bytes);
      });
}

TEST(RoguePeer, AFrameOfUnknownTypeOrAnOversizedName) {
  for (const int variant : {0, 1}) {
    run_against_rogue([&](Peer& peer) { expect_protocol_error(peer, variant == 0 ? "unknown type" : "-byte name"); },
                      [&](Rogue& r) {
                        Frame f = r.next_data_frame();
                        if (variant == 0) {
                          f.header.type = FrameType(42);
                        } else {
                          f.name.assign(transport::kMaxNameBytes + 1, 'n');
                        }
                        r.send(f, f.header.payload_bytes);
                      });
  }
}

}  // namespace
}  // namespace aikido
