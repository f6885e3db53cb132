// safetensors reader/writer: round trips, a hand-built golden file, every rejection with
// its message, and truncation at every byte.
#include "io/safetensors.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace omnimoe::io {
namespace {

using Bytes = std::vector<std::uint8_t>;

// A file image with an arbitrary (possibly malformed) header and `data_size` data bytes.
// (Built as a string: g++ 12 warns falsely on vector::insert of a string here.)
Bytes raw_file(const std::string& header, std::size_t data_size) {
  std::string s;
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) s += static_cast<char>(n >> (8 * i));
  s += header;
  for (std::size_t i = 0; i < data_size; ++i) s += static_cast<char>(i * 7 + 1);
  return Bytes(s.begin(), s.end());
}

Status parse(const Bytes& b, StFile* f) { return parse_safetensors(b.data(), b.size(), f); }

StTensor random_tensor(const std::string& name, DType dtype, std::vector<std::int64_t> shape,
                       std::mt19937& rng) {
  StTensor t;
  t.name = name;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.data.resize(static_cast<std::size_t>(t.numel()) * dtype_size(dtype));
  for (auto& b : t.data) b = static_cast<std::byte>(rng());
  return t;
}

// Every dtype at ranks 0..3 (one rank-1 tensor with no elements), plus metadata.
StFile sample_file() {
  std::mt19937 rng(1234);
  const std::vector<std::vector<std::int64_t>> shapes = {{}, {5}, {3, 2}, {2, 1, 3}, {0}};
  StFile f;
  f.metadata = {{"format", "pt"}, {"note", "h\u00e9llo \"quoted\""}, {"", "empty key"}};
  for (DType dt : {DType::f64, DType::f32, DType::f16, DType::bf16, DType::i32, DType::i64}) {
    for (std::size_t r = 0; r < shapes.size(); ++r) {
      const std::string name = std::string(dtype_name(dt)) + ".r" + std::to_string(r);
      f.tensors.push_back(random_tensor(name, dt, shapes[r], rng));
    }
  }
  return f;
}

Bytes serialized(const StFile& f) {
  Bytes b;
  EXPECT_TRUE(serialize_safetensors(f, &b).ok());
  return b;
}

std::filesystem::path temp_path(const std::string& stem) {
  return std::filesystem::temp_directory_path() /
         ("omnimoe_st_" + stem + "_" + std::to_string(::getpid()) + ".safetensors");
}

// ---- round trips ---------------------------------------------------------------------

TEST(SafetensorsRoundTrip, EveryDtypeAndRankInMemory) {
  const StFile f = sample_file();
  const Bytes b = serialized(f);
  StFile back;
  ASSERT_TRUE(parse(b, &back).ok());
  EXPECT_EQ(back, f);
}

TEST(SafetensorsRoundTrip, HeaderIsPaddedAndDataPacked) {
  const StFile f = sample_file();
  const Bytes b = serialized(f);
  std::uint64_t n = 0;
  std::memcpy(&n, b.data(), 8);  // the build machines are little-endian
  EXPECT_EQ(n % 8, 0u);
  std::size_t data_bytes = 0;
  for (const auto& t : f.tensors) data_bytes += t.data.size();
  EXPECT_EQ(b.size(), 8 + n + data_bytes);
  EXPECT_EQ(std::memcmp(b.data() + 8 + n, f.tensors[0].data.data(), f.tensors[0].data.size()), 0);
}

TEST(SafetensorsRoundTrip, ThroughAFile) {
  const StFile f = sample_file();
  const auto path = temp_path("roundtrip");
  ASSERT_TRUE(write_safetensors(path.string(), f).ok());
  StFile back;
  const Status s = read_safetensors(path.string(), &back);
  ASSERT_TRUE(s.ok()) << s.message();
  EXPECT_EQ(back, f);
  EXPECT_FALSE(std::filesystem::exists(path.string() + ".tmp." + std::to_string(::getpid())));
  std::filesystem::remove(path);
}

// ---- golden bytes --------------------------------------------------------------------

// "a": F32 [2] = {1.0, -2.0}; metadata {"k": "v"}. The header is 79 bytes, padded to 80.
const std::string kGoldenHeader =
    R"({"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})"
    " ";

Bytes golden_bytes() {
  const std::string length("\x50\0\0\0\0\0\0\0", 8);                 // 80
  const std::string data("\x00\x00\x80\x3F\x00\x00\x00\xC0", 8);     // 1.0f, -2.0f
  const std::string all = length + kGoldenHeader + data;
  return Bytes(all.begin(), all.end());
}

TEST(SafetensorsGolden, WriterProducesExactBytes) {
  ASSERT_EQ(kGoldenHeader.size(), 80u);
  StFile f;
  f.metadata["k"] = "v";
  StTensor t;
  t.name = "a";
  t.dtype = DType::f32;
  t.shape = {2};
  const float values[2] = {1.0f, -2.0f};
  t.data.resize(8);
  std::memcpy(t.data.data(), values, 8);
  f.tensors.push_back(t);
  EXPECT_EQ(serialized(f), golden_bytes());
}

TEST(SafetensorsGolden, ReaderDecodesHandBuiltFile) {
  StFile f;
  ASSERT_TRUE(parse(golden_bytes(), &f).ok());
  EXPECT_EQ(f.metadata, (std::map<std::string, std::string>{{"k", "v"}}));
  ASSERT_EQ(f.tensors.size(), 1u);
  StTensor* a = f.find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->numel(), 2);
  const TensorView v = a->view();
  EXPECT_EQ(v.rank, 1);
  EXPECT_EQ(v.shape[0], 2);
  EXPECT_EQ(v.dtype, DType::f32);
  EXPECT_EQ(v.as<float>()[0], 1.0f);
  EXPECT_EQ(v.as<float>()[1], -2.0f);
  EXPECT_EQ(f.find("b"), nullptr);
}

// ---- reader details ------------------------------------------------------------------

TEST(SafetensorsParse, KeepsHeaderOrderNotOffsetOrder) {
  const std::string h =
      R"({"z":{"dtype":"I32","shape":[],"data_offsets":[8,12]},)"
      R"("a":{"dtype":"I32","shape":[1],"data_offsets":[4,8]},)"
      R"("m":{"dtype":"I32","shape":[1,1],"data_offsets":[0,4]}})";
  StFile f;
  ASSERT_TRUE(parse(raw_file(h, 12), &f).ok());
  ASSERT_EQ(f.tensors.size(), 3u);
  EXPECT_EQ(f.tensors[0].name, "z");
  EXPECT_EQ(f.tensors[1].name, "a");
  EXPECT_EQ(f.tensors[2].name, "m");
}

TEST(SafetensorsParse, AllowsGapsTrailingBytesAndEmptyTensorsAnywhere) {
  // "e" has no elements and sits inside "w": it owns no bytes, so nothing overlaps.
  const std::string h =
      R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},)"
      R"("e":{"dtype":"F64","shape":[3,0],"data_offsets":[8,8]}})";
  StFile f;
  ASSERT_TRUE(parse(raw_file(h, 20), &f).ok());
  EXPECT_EQ(f.find("e")->data.size(), 0u);
  EXPECT_EQ(f.find("w")->data.size(), 8u);
}

// 100k tensors, names out of alphabetical order: the order is kept, and the header is
// parsed in well under the bound (a quadratic key insertion would take minutes).
TEST(SafetensorsParse, ManyTensorsKeepOrderAndParseQuickly) {
  constexpr int kCount = 100'000;
  StFile f;
  for (int i = 0; i < kCount; ++i) {
    StTensor& t = f.tensors.emplace_back();
    t.name = std::to_string((i * 7919) % kCount);
    t.dtype = DType::i32;
    t.shape = {1};
    t.data.resize(4, std::byte{static_cast<unsigned char>(i)});
  }
  const Bytes b = serialized(f);
  const auto start = std::chrono::steady_clock::now();
  StFile back;
  ASSERT_TRUE(parse(b, &back).ok());
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), 20.0);
  EXPECT_EQ(back, f);
}

TEST(SafetensorsParse, ViewOfRankAboveTwoThrows) {
  std::mt19937 rng(1);
  StTensor t = random_tensor("t", DType::f32, {2, 2, 2}, rng);
  EXPECT_THROW(t.view(), std::invalid_argument);
  StTensor s = random_tensor("s", DType::bf16, {}, rng);
  EXPECT_EQ(s.view().rank, 0);
  EXPECT_EQ(s.view().bytes(), 2u);
}

// ---- rejections ----------------------------------------------------------------------

struct RejectCase {
  const char* label;
  Bytes file;
  std::vector<std::string> words;  // each must appear in the message
};

std::string tensor_header(const std::string& entry) { return R"({"w":)" + entry + "}"; }

std::string entry(const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return R"({"dtype":)" + dtype + R"(,"shape":)" + shape + R"(,"data_offsets":)" + offsets + "}";
}

Bytes bad_tensor(const std::string& dtype, const std::string& shape, const std::string& offsets,
                 std::size_t data = 16) {
  return raw_file(tensor_header(entry(dtype, shape, offsets)), data);
}

Bytes header_length_only(std::uint64_t n, std::size_t total) {
  Bytes b(std::max<std::size_t>(total, 8), ' ');
  for (int i = 0; i < 8; ++i) b[i] = static_cast<std::uint8_t>(n >> (8 * i));
  return b;
}

std::vector<RejectCase> reject_cases() {
  const std::string f32_2 = R"("F32")";
  return {
      {"empty_file", {}, {"shorter than the 8-byte"}},
      {"seven_bytes", Bytes(7, 0), {"7 bytes", "shorter than the 8-byte"}},
      {"header_beyond_file", header_length_only(100, 20), {"header length 100", "exceeds"}},
      {"header_absurd", header_length_only(~0ull, 64), {"header length", "100 MB"}},
      {"header_just_over_limit", header_length_only(100'000'001, 64), {"100 MB"}},
      {"invalid_json", raw_file(R"({"w":)", 0), {"not valid JSON"}},
      {"trailing_garbage", raw_file(R"({} x)", 0), {"not valid JSON"}},
      {"nul_padding", raw_file(std::string("{}\0\0", 4), 0), {"NUL byte"}},
      {"invalid_utf8", raw_file("{\"\xff\":1}", 0), {"not valid JSON"}},
      {"empty_header", raw_file("", 0), {"not valid JSON"}},
      {"header_array", raw_file("[1,2]", 0), {"not a JSON object"}},
      {"header_string", raw_file(R"("x")", 0), {"not a JSON object"}},
      {"entry_not_object", raw_file(tensor_header("3"), 0), {"'w'", "not a JSON object"}},
      {"unknown_dtype", bad_tensor(R"("F8_E4M3")", "[1]", "[0,1]"), {"'w'", "unknown dtype 'F8_E4M3'"}},
      {"dtype_lowercase", bad_tensor(R"("f32")", "[1]", "[0,4]"), {"unknown dtype 'f32'"}},
      {"dtype_not_string", bad_tensor("7", "[1]", "[0,4]"), {"'w'", "dtype is not a string"}},
      {"shape_not_array", bad_tensor(f32_2, "2", "[0,8]"), {"'w'", "shape is not an array"}},
      {"shape_negative", bad_tensor(f32_2, "[2,-1]", "[0,8]"), {"'w'", "shape[1]", "negative"}},
      {"shape_minus_zero_ok_but_size", bad_tensor(f32_2, "[-0]", "[0,4]"), {"holds 4 bytes", "need 0"}},
      {"shape_fraction", bad_tensor(f32_2, "[2.5]", "[0,8]"), {"shape[0]", "not a 64-bit integer"}},
      {"shape_float_integral", bad_tensor(f32_2, "[2.0]", "[0,8]"), {"shape[0]", "not a 64-bit integer"}},
      {"shape_string", bad_tensor(f32_2, R"(["2"])", "[0,8]"), {"shape[0]", "not a 64-bit integer"}},
      {"shape_beyond_u64", bad_tensor(f32_2, "[18446744073709551616]", "[0,8]"), {"shape[0]", "not a 64-bit"}},
      {"shape_beyond_i64", bad_tensor(f32_2, "[9223372036854775808]", "[0,8]"), {"shape[0]", "too large"}},
      {"numel_overflow", bad_tensor(f32_2, "[4294967296,4294967296]", "[0,8]"), {"'w'", "overflows int64"}},
      {"bytes_overflow", bad_tensor(R"("F64")", "[2305843009213693952]", "[0,8]"), {"'w'", "overflows uint64"}},
      {"offsets_not_array", bad_tensor(f32_2, "[2]", "8"), {"'w'", "data_offsets", "[begin, end]"}},
      {"offsets_one", bad_tensor(f32_2, "[2]", "[8]"), {"data_offsets", "[begin, end]"}},
      {"offsets_three", bad_tensor(f32_2, "[2]", "[0,8,16]"), {"data_offsets", "[begin, end]"}},
      {"offsets_negative", bad_tensor(f32_2, "[2]", "[-8,0]"), {"data_offsets", "non-negative integers"}},
      {"offsets_fraction", bad_tensor(f32_2, "[2]", "[0,8.5]"), {"data_offsets", "non-negative integers"}},
      {"offsets_reversed", bad_tensor(f32_2, "[2]", "[8,0]"), {"'w'", "[8, 0]", "begin > end"}},
      {"offsets_beyond_data", bad_tensor(f32_2, "[2]", "[12,20]"), {"'w'", "beyond the data section (16 bytes)"}},
      {"offsets_huge", bad_tensor(f32_2, "[2]", "[18446744073709551608,18446744073709551615]"), {"beyond"}},
      {"size_mismatch", bad_tensor(f32_2, "[3]", "[0,8]"), {"'w'", "holds 8 bytes", "need 12"}},
      {"overlap",
       raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 16),
       {"'a'", "'b'", "overlap"}},
      {"same_range_twice",
       raw_file(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[4,8]},)"
                R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 16),
       {"'a'", "'b'", "overlap"}},
      {"duplicate_name",
       raw_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 16),
       {"duplicate tensor name 'w'"}},
      {"duplicate_field",
       raw_file(R"({"w":{"dtype":"F32","dtype":"F64","shape":[1],"data_offsets":[0,4]}})", 16),
       {"duplicate key 'dtype'"}},
      {"duplicate_metadata_key", raw_file(R"({"__metadata__":{"k":"a","k":"b"}})", 0), {"duplicate key 'k'"}},
      {"metadata_not_object", raw_file(R"({"__metadata__":["x"]})", 0), {"__metadata__", "not a JSON object"}},
      {"metadata_number", raw_file(R"({"__metadata__":{"k":1}})", 0), {"__metadata__", "'k'", "not a string"}},
      {"metadata_null", raw_file(R"({"__metadata__":{"k":null}})", 0), {"'k'", "not a string"}},
      {"extra_field",
       raw_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"foo":1}})", 16),
       {"'w'", "unknown field 'foo'"}},
      {"missing_field", raw_file(R"({"w":{"dtype":"F32","data_offsets":[0,4]}})", 16), {"'w'", "missing field 'shape'"}},
  };
}

void PrintTo(const RejectCase& c, std::ostream* os) { *os << c.label; }

class SafetensorsReject : public testing::TestWithParam<RejectCase> {};

TEST_P(SafetensorsReject, NamesTheProblem) {
  const RejectCase& c = GetParam();
  StFile f;
  f.metadata["untouched"] = "yes";
  const Status s = parse(c.file, &f);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::io_error);
  for (const auto& w : c.words) EXPECT_NE(s.message().find(w), std::string::npos) << s.message();
  EXPECT_EQ(f.metadata.at("untouched"), "yes");  // output only written on success
}

INSTANTIATE_TEST_SUITE_P(Safetensors, SafetensorsReject, testing::ValuesIn(reject_cases()),
                         [](const testing::TestParamInfo<RejectCase>& i) { return std::string(i.param.label); });

TEST(SafetensorsRejectTruncation, EveryPrefixFailsCleanly) {
  const Bytes b = serialized(sample_file());
  for (std::size_t len = 0; len < b.size(); ++len) {
    const Bytes prefix(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(len));  // exact-size buffer
    StFile f;
    const Status s = parse(prefix, &f);
    ASSERT_FALSE(s.ok()) << "prefix of " << len << " bytes was accepted";
    ASSERT_EQ(s.code(), StatusCode::io_error);
  }
}

TEST(SafetensorsParse, LongTensorNamesAreShortenedInMessages) {
  const std::string name(10000, 'n');
  StFile f;
  const Status s = parse(raw_file(R"({")" + name + R"(":{"dtype":"X","shape":[],"data_offsets":[0,0]}})", 0), &f);
  ASSERT_FALSE(s.ok());
  EXPECT_LT(s.message().size(), 300u);
  EXPECT_NE(s.message().find("unknown dtype 'X'"), std::string::npos);
}

// ---- writer rejections ---------------------------------------------------------------

Status serialize_one(StTensor t) {
  StFile f;
  f.tensors.push_back(std::move(t));
  Bytes b;
  return serialize_safetensors(f, &b);
}

TEST(SafetensorsWriteReject, InconsistentTensors) {
  std::mt19937 rng(5);
  StTensor t = random_tensor("w", DType::f32, {2, 3}, rng);
  t.data.pop_back();
  Status s = serialize_one(t);
  EXPECT_EQ(s.code(), StatusCode::io_error);
  EXPECT_NE(s.message().find("'w': has 23 data bytes but shape and dtype need 24"), std::string::npos) << s.message();

  t = random_tensor("w", DType::f32, {2}, rng);
  t.shape = {-2};
  s = serialize_one(t);
  EXPECT_NE(s.message().find("shape[0] is negative"), std::string::npos) << s.message();

  t = random_tensor("__metadata__", DType::f32, {1}, rng);
  s = serialize_one(t);
  EXPECT_NE(s.message().find("__metadata__"), std::string::npos) << s.message();

  t = random_tensor("bad\xff", DType::f32, {1}, rng);
  s = serialize_one(t);
  EXPECT_NE(s.message().find("cannot encode header"), std::string::npos) << s.message();
}

TEST(SafetensorsWriteReject, DuplicateNames) {
  std::mt19937 rng(6);
  StFile f;
  f.tensors = {random_tensor("w", DType::i64, {1}, rng), random_tensor("w", DType::i64, {1}, rng)};
  Bytes b;
  const Status s = serialize_safetensors(f, &b);
  EXPECT_NE(s.message().find("duplicate tensor name 'w'"), std::string::npos) << s.message();
}

TEST(SafetensorsWriteReject, UnwritablePathLeavesNothing) {
  const auto dir = temp_path("missing_dir");
  const std::string path = (dir / "x.safetensors").string();
  const Status s = write_safetensors(path, sample_file());
  EXPECT_EQ(s.code(), StatusCode::io_error);
  EXPECT_NE(s.message().find(path), std::string::npos) << s.message();
  EXPECT_FALSE(std::filesystem::exists(dir));
}

TEST(SafetensorsWriteReject, FailedRenameRemovesTemporary) {
  // Renaming a file onto a non-empty directory fails after the temporary was written.
  const auto dir = temp_path("dir_target");
  std::filesystem::create_directories(dir / "child");
  const Status s = write_safetensors(dir.string(), sample_file());
  EXPECT_EQ(s.code(), StatusCode::io_error);
  EXPECT_NE(s.message().find(dir.string()), std::string::npos) << s.message();
  EXPECT_FALSE(std::filesystem::exists(dir.string() + ".tmp." + std::to_string(::getpid())));
  std::filesystem::remove_all(dir);
}

TEST(SafetensorsReadReject, MissingFileAndDirectory) {
  StFile f;
  const auto missing = temp_path("missing");
  Status s = read_safetensors(missing.string(), &f);
  EXPECT_EQ(s.code(), StatusCode::io_error);
  EXPECT_NE(s.message().find(missing.string()), std::string::npos) << s.message();

  s = read_safetensors(std::filesystem::temp_directory_path().string(), &f);
  EXPECT_NE(s.message().find("not a regular file"), std::string::npos) << s.message();
}

TEST(SafetensorsReadReject, MalformedFileMessageStartsWithPath) {
  const auto path = temp_path("malformed");
  {
    std::ofstream out(path, std::ios::binary);
    out << "abc";
  }
  StFile f;
  const Status s = read_safetensors(path.string(), &f);
  EXPECT_EQ(s.message().rfind(path.string() + ": ", 0), 0u) << s.message();
  EXPECT_NE(s.message().find("shorter than the 8-byte"), std::string::npos);
  std::filesystem::remove(path);
}

}  // namespace
}  // namespace omnimoe::io
