// Reader and writer for the safetensors format: u64 little-endian header length N, N bytes
// of JSON header {"name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...,
// "__metadata__": {"key": "value"}}, then the raw little-endian data.
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

  std::int64_t numel() const;
  // A host view of the data; rank must be <= TensorView::kMaxRank (checked by the caller).
  TensorView view();
};

struct StFile {
  std::map<std::string, std::string> metadata;  // "__metadata__" (string values only)
  std::vector<StTensor> tensors;                // in header order

  const StTensor* find(const std::string& name) const;
  StTensor* find(const std::string& name);
};

// Parse a whole file image. Errors (io_error) say what is wrong: truncated header,
// header length beyond the file, invalid JSON, unknown dtype, negative or overflowing
// shape, offsets out of range or inconsistent with shape*dtype, overlapping tensors,
// duplicate names, non-string metadata values.
Status parse_safetensors(const std::uint8_t* data, std::size_t size, StFile* out);
Status read_safetensors(const std::string& path, StFile* out);

// Serialise (tensors in the given order, data packed without gaps; the header is padded
// with spaces to a multiple of 8 bytes).
Status serialize_safetensors(const StFile& file, std::vector<std::uint8_t>* out);
// Writes to a temporary file next to `path` and renames it: no partial output on failure.
Status write_safetensors(const std::string& path, const StFile& file);

}  // namespace omnimoe::io
