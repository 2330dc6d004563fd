#include <gtest/gtest.h>

#include <aikido/aikido.hpp>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "base/crypto.hpp"
#include "base/env.hpp"
#include "base/reduce.hpp"

namespace aikido {
namespace {

using detail::to_hex;

std::string hex_of(const detail::Digest& d) { return to_hex(d); }

TEST(Reduce, SumOfSquaresAndCopyInOnePass) {
  for (std::size_t count : {std::size_t(0), std::size_t(1), std::size_t(15), std::size_t(16), std::size_t(1000)}) {
    std::vector<float> src(count), dst(count, -1.0f);
    double expected = 0;
    for (std::size_t i = 0; i < count; ++i) {
      src[i] = float(int(i % 7) - 3) * 0.5f;
      expected += double(src[i]) * src[i];
    }
    EXPECT_DOUBLE_EQ(detail::sum_of_squares(src.data(), count), expected) << count;
    EXPECT_DOUBLE_EQ(detail::copy_sum_of_squares(dst.data(), src.data(), count), expected) << count;
    EXPECT_EQ(dst, src) << count;
  }
}

TEST(Crypto, Sha256KnownVectors) {
  EXPECT_EQ(hex_of(detail::sha256("", 0)), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(hex_of(detail::sha256("abc", 3)), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  const std::string long_input = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  EXPECT_EQ(hex_of(detail::sha256(long_input.data(), long_input.size())),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  std::string million(1000000, 'a');
  EXPECT_EQ(hex_of(detail::sha256(million.data(), million.size())),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Crypto, HmacRfc4231) {
  std::vector<std::uint8_t> key(20, 0x0b);
  const std::string data = "Hi There";
  EXPECT_EQ(hex_of(detail::hmac_sha256(key, {reinterpret_cast<const std::uint8_t*>(data.data()), data.size()})),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
  const std::string jefe = "Jefe", what = "what do ya want for nothing?";
  EXPECT_EQ(hex_of(detail::hmac_sha256({reinterpret_cast<const std::uint8_t*>(jefe.data()), jefe.size()},
                                       {reinterpret_cast<const std::uint8_t*>(what.data()), what.size()})),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  std::vector<std::uint8_t> long_key(131, 0xaa);
  const std::string big = "Test Using Larger Than Block-Size Key - Hash Key First";
  EXPECT_EQ(hex_of(detail::hmac_sha256(long_key, {reinterpret_cast<const std::uint8_t*>(big.data()), big.size()})),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
}

TEST(Crypto, ConstantTimeCompareSeesEveryByte) {
  detail::Digest a{};
  for (std::size_t i = 0; i < a.size(); ++i) a[i] = std::uint8_t(i * 7 + 1);
  EXPECT_TRUE(detail::digest_equal(a, a));
  for (std::size_t i = 0; i < a.size(); ++i) {
    detail::Digest b = a;
    b[i] ^= 0x80;
    EXPECT_FALSE(detail::digest_equal(a, b)) << "byte " << i;
  }
  const std::uint8_t x[3] = {1, 2, 3}, y[3] = {1, 2, 4};
  EXPECT_TRUE(detail::bytes_equal(x, x));
  EXPECT_FALSE(detail::bytes_equal(x, y));
  EXPECT_FALSE(detail::bytes_equal(std::span(x, 2), std::span(x, 3)));
  EXPECT_TRUE(detail::bytes_equal({}, {}));
}

TEST(Crypto, RandomBytesFillEverythingAndDiffer) {
  // 4 KiB of zeros left as zeros, or two draws alike, would mean the generator did not run.
  std::vector<std::uint8_t> a(4096, 0), b(4096, 0);
  detail::random_bytes(a.data(), a.size());
  detail::random_bytes(b.data(), b.size());
  EXPECT_NE(a, b);
  EXPECT_GT(std::count(a.begin(), a.end(), 0), 0);
  EXPECT_LT(std::count(a.begin(), a.end(), 0), 64);  // about 16 expected
  detail::random_bytes(nullptr, 0);
}

TEST(Half, Float16RoundTripsEveryValue) {
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float16 h = float16::from_bits(std::uint16_t(bits));
    const float f = float(h);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(float(float16(f))));
      continue;
    }
    EXPECT_EQ(float16(f).bits, h.bits) << "bits " << bits;
  }
}

TEST(Half, Float16Rounding) {
  EXPECT_EQ(float(float16(1.0f)), 1.0f);
  EXPECT_EQ(float(float16(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(float(float16(65520.0f))));
  EXPECT_EQ(float(float16(65519.0f)), 65504.0f);
  EXPECT_EQ(float16(1.0f + 1.0f / 2048).bits, float16(1.0f).bits);                     // tie rounds to even
  EXPECT_EQ(float16(1.0f + 3.0f / 2048).bits, std::uint16_t(float16(1.0f).bits + 2));  // tie rounds to even (up)
  EXPECT_EQ(float(float16(std::ldexp(1.0f, -24))), std::ldexp(1.0f, -24));             // smallest subnormal
  EXPECT_EQ(float16(std::ldexp(1.0f, -26)).bits, 0);                                   // underflows to zero
  EXPECT_EQ(float16(-2.5f).bits, 0xc100);
}

TEST(Half, BFloat16) {
  EXPECT_EQ(float(bfloat16(1.0f)), 1.0f);
  EXPECT_EQ(float(bfloat16(3.0f)), 3.0f);
  EXPECT_EQ(float(bfloat16(256.0f)), 256.0f);
  EXPECT_EQ(float(bfloat16(257.0f)), 256.0f);  // tie to even
  EXPECT_EQ(float(bfloat16(259.0f)), 260.0f);  // tie to even (up)
  EXPECT_TRUE(std::isnan(float(bfloat16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(Types, NamesParse) {
  EXPECT_EQ(parse_topology("tree"), Topology::tree);
  EXPECT_THROW(parse_topology("mesh"), ConfigError);
  EXPECT_EQ(parse_dtype("bf16"), DType::bf16);
  EXPECT_THROW(parse_dtype("f8"), ConfigError);
  EXPECT_EQ(parse_transport("unix"), TransportKind::unix_socket);
  EXPECT_THROW(parse_transport("rdma"), ConfigError);
}

template <class T>
void check_kernel(ReduceOp op) {
  constexpr std::size_t n = 1000;
  std::vector<T> a(n), b(n);
  for (std::size_t i = 0; i < n; ++i) {
    a[i] = T(float(i % 5 + 1));
    b[i] = T(float(i % 3 + 1));
  }
  // reduce_pair(dst, a, b) must give what a copy of a followed by reduce_into(copy, b) gives, bit for bit.
  std::vector<T> pair(n);
  detail::reduce_pair(dtype_of<T>, op, pair.data(), a.data(), b.data(), n);
  detail::reduce_into(dtype_of<T>, op, a.data(), b.data(), n);
  ASSERT_EQ(std::memcmp(pair.data(), a.data(), n * sizeof(T)), 0)
      << dtype_name(dtype_of<T>) << " " << reduce_op_name(op);
  for (std::size_t i = 0; i < n; ++i) {
    const double x = double(i % 5 + 1), y = double(i % 3 + 1);
    double want = 0;
    switch (op) {
      case ReduceOp::sum:
      case ReduceOp::mean:
        want = x + y;
        break;
      case ReduceOp::min:
        want = std::min(x, y);
        break;
      case ReduceOp::max:
        want = std::max(x, y);
        break;
      case ReduceOp::prod:
        want = x * y;
        break;
    }
    ASSERT_EQ(double(float(a[i])), want) << dtype_name(dtype_of<T>) << " " << reduce_op_name(op) << " at " << i;
  }
}

TEST(Env, LocalCpus) {
  ::unsetenv("AIKIDO_LOCAL_CPUS");
  EXPECT_GE(env::local_cpus(), 1);
  ::setenv("AIKIDO_LOCAL_CPUS", "6", 1);
  EXPECT_EQ(env::local_cpus(), 6);
  ::setenv("AIKIDO_LOCAL_CPUS", "0", 1);
  try {
    env::local_cpus();
    ADD_FAILURE() << "AIKIDO_LOCAL_CPUS=0 was accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("AIKIDO_LOCAL_CPUS"), std::string::npos) << e.what();
  }
  ::unsetenv("AIKIDO_LOCAL_CPUS");
}

TEST(Reduce, EveryTypeAndOp) {
  for (ReduceOp op : {ReduceOp::sum, ReduceOp::min, ReduceOp::max, ReduceOp::prod, ReduceOp::mean}) {
    check_kernel<float>(op);
    check_kernel<double>(op);
    check_kernel<std::int32_t>(op);
    check_kernel<std::int64_t>(op);
    check_kernel<std::uint8_t>(op);
    check_kernel<float16>(op);
    check_kernel<bfloat16>(op);
  }
}

// The vectorised half paths (F16C where the CPU has it) must round exactly like the scalar conversions.
TEST(Reduce, HalfKernelsMatchScalarRounding) {
  std::vector<float16> a, b;
  std::vector<bfloat16> c, d;
  for (std::uint32_t bits = 0; bits < 0x10000; bits += 7) {
    const auto x = std::uint16_t(bits), y = std::uint16_t((bits * 40503u) & 0xffffu);
    a.push_back(float16::from_bits(x));
    b.push_back(float16::from_bits(y));
    c.push_back(bfloat16::from_bits(x));
    d.push_back(bfloat16::from_bits(y));
  }
  auto sum_h = a;
  auto sum_b = c;
  detail::reduce_into(DType::f16, ReduceOp::sum, sum_h.data(), b.data(), a.size());
  detail::reduce_into(DType::bf16, ReduceOp::sum, sum_b.data(), d.data(), c.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    const float16 want(float(a[i]) + float(b[i]));
    if (std::isnan(float(want))) {
      EXPECT_TRUE(std::isnan(float(sum_h[i])));
    } else {
      ASSERT_EQ(sum_h[i].bits, want.bits) << "f16 " << a[i].bits << " + " << b[i].bits;
    }
    const bfloat16 want_b(float(c[i]) + float(d[i]));
    if (std::isnan(float(want_b))) {
      EXPECT_TRUE(std::isnan(float(sum_b[i])));
    } else {
      ASSERT_EQ(sum_b[i].bits, want_b.bits) << "bf16 " << c[i].bits << " + " << d[i].bits;
    }
  }
}

TEST(Reduce, DivideForMean) {
  std::vector<std::int32_t> v{7, 8, -9};
  detail::divide_by_count(DType::i32, v.data(), v.size(), 2);
  EXPECT_EQ(v, (std::vector<std::int32_t>{3, 4, -4}));
  std::vector<double> d{1.0, 3.0};
  detail::divide_by_count(DType::f64, d.data(), d.size(), 4);
  EXPECT_EQ(d, (std::vector<double>{0.25, 0.75}));
}

// Powers of two divide by multiplying with the exact inverse: the same bits as a division for every value
// (subnormal results, infinities and NaNs included), every divisor 1 to 16, float, double and both half types.
template <class T, class Bits>
void expect_divide_bitwise(DType dtype, const std::vector<Bits>& patterns) {
  for (int n = 1; n <= 16; ++n) {
    std::vector<T> values(patterns.size());
    std::memcpy(static_cast<void*>(values.data()), patterns.data(), patterns.size() * sizeof(T));
    std::vector<Bits> expected(patterns.size());
    for (std::size_t i = 0; i < values.size(); ++i) {
      T q;
      if constexpr (std::is_floating_point_v<T>) {
        q = values[i] / T(n);
      } else {
        q = T(float(values[i]) / float(n));
      }
      std::memcpy(&expected[i], &q, sizeof(T));
    }
    detail::divide_by_count(dtype, values.data(), values.size(), n);
    for (std::size_t i = 0; i < values.size(); ++i) {
      Bits got;
      std::memcpy(&got, &values[i], sizeof(T));
      if (std::isnan(double(float(values[i])))) continue;  // NaN payloads may differ; NaN stays NaN (checked below)
      ASSERT_EQ(got, expected[i]) << dtype_name(dtype) << " pattern 0x" << std::hex << patterns[i] << std::dec << " / "
                                  << n;
    }
    for (std::size_t i = 0; i < values.size(); ++i) {
      Bits e = expected[i];
      T q;
      std::memcpy(static_cast<void*>(&q), &e, sizeof(T));
      EXPECT_EQ(std::isnan(double(float(values[i]))), std::isnan(double(float(q))));
    }
  }
}

TEST(Reduce, DivideByPowersOfTwoIsBitwiseADivision) {
  std::vector<std::uint32_t> f32;
  std::vector<std::uint64_t> f64;
  std::vector<std::uint16_t> halves;
  std::uint64_t x = 0x9E3779B97F4A7C15ull;
  for (int i = 0; i < 4096; ++i) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    f32.push_back(std::uint32_t(x));
    f64.push_back(x);
    halves.push_back(std::uint16_t(x));
  }
  for (std::uint32_t b = 0; b < 64; ++b)
    f32.push_back(b), f32.push_back(0x00800000u + b), f32.push_back(0x80000000u | b);
  for (std::uint32_t special : {0x7f800000u, 0xff800000u, 0x7fc00000u, 0x7f7fffffu, 0x00ffffffu})
    f32.push_back(special);
  for (std::uint32_t b = 0; b < 65536; ++b) halves.push_back(std::uint16_t(b));
  expect_divide_bitwise<float>(DType::f32, f32);
  expect_divide_bitwise<double>(DType::f64, f64);
  expect_divide_bitwise<float16>(DType::f16, halves);
  expect_divide_bitwise<bfloat16>(DType::bf16, halves);
}

}  // namespace
}  // namespace aikido
