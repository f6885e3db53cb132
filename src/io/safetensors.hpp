// Reader and writer for the safetensors format: u64 little-endian header length N, N bytes
// of JSON header {"name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...,
// "__metadata__": {"key": "value"}}, then the raw little-endian data; offsets are relative
// to the start of the data section (byte 8 + N).
// The parser never reads outside the buffer it is given (fuzzed: tests/fuzz).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "omnimoe/status.hpp"
#include "omnimoe/tensor.hpp"

namespace omnimoe::io {

struct StTensor {
  std::string name;
  DType dtype = DType::f32;         // F64 F32 F16 BF16 I32 I64 are accepted
  std::vector<std::int64_t> shape;  // any rank (the layer checks its own ranks)
  std::vector<std::byte> data;      // numel * dtype_size bytes, little-endian

  std::int64_t numel() const;  // 1 for rank 0
  // A host view of the data. Rank must be <= TensorView::kMaxRank (callers check the rank
  // first); a higher rank throws std::invalid_argument. A tensor with no elements may give
  // a view with data == nullptr, i.e. one that reads as "absent".
  TensorView view();

  friend bool operator==(const StTensor&, const StTensor&) = default;
};

struct StFile {
  std::map<std::string, std::string> metadata;  // "__metadata__" (string values only)
  std::vector<StTensor> tensors;                // in header order (JSON key order)

  const StTensor* find(const std::string& name) const;
  StTensor* find(const std::string& name);

  friend bool operator==(const StFile&, const StFile&) = default;
};

// Every failure below is StatusCode::io_error with a message naming the tensor or field.

// Parse a whole file image. Rejects: truncated header, header length beyond the file or
// above 100 MB, invalid JSON, a header that is not an object, unknown dtype, negative,
// non-integer or overflowing shape, offsets out of range or inconsistent with
// shape * dtype size, overlapping tensors (empty tensors occupy no bytes and never
// overlap), duplicate names or fields, unknown or missing fields, non-string metadata
// values. Gaps between tensors and trailing bytes are allowed. `*out` is only written on
// success.
Status parse_safetensors(const std::uint8_t* data, std::size_t size, StFile* out);
// Reads a whole regular file and parses it; messages start with the path.
Status read_safetensors(const std::string& path, StFile* out);

// Serialise (tensors in the given order, data packed without gaps; the header is padded
// with spaces to a multiple of 8 bytes, so the data section is 8-byte aligned). Fails for
// a file the parser would reject: data size != numel * dtype size, duplicate names, a
// tensor named "__metadata__", negative or overflowing shape, invalid UTF-8 in a string.
Status serialize_safetensors(const StFile& file, std::vector<std::uint8_t>* out);
// Writes "<path>.tmp.<pid>" and renames it onto `path`: no partial output on failure (the
// temporary is removed). Messages name `path`.
Status write_safetensors(const std::string& path, const StFile& file);

}  // namespace omnimoe::io
