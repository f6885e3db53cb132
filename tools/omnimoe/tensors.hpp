// Owning tensors for the tools (the library itself never allocates): memory from
// omnimoe::device_alloc on either device, a TensorView over it, and host-side dtype
// conversion. Failures throw omnimoe::Error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "omnimoe/device.hpp"
#include "omnimoe/tensor.hpp"

namespace omnimoe::tool {

// Raw device memory, move-only.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Device device, std::size_t bytes);
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { device_free(device_, data_); }

  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  Device device_ = Device::cpu;
};

// A dense tensor owning its memory. Default-constructed: absent (view().defined() is false).
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, Device device, const std::vector<std::int64_t>& shape);  // rank <= 2
  // A moved-from tensor reads as absent (its view must not alias the memory it gave away).
  Tensor(Tensor&& o) noexcept : buf_(std::move(o.buf_)), view_(std::exchange(o.view_, {})) {}
  Tensor& operator=(Tensor&& o) noexcept {
    buf_ = std::move(o.buf_);
    view_ = std::exchange(o.view_, {});
    return *this;
  }

  const TensorView& view() const { return view_; }
  bool defined() const { return view_.defined(); }

 private:
  Buffer buf_;
  TensorView view_;
};

// Element conversion on the host between any two dtypes (through double: exact for every
// value the layer stores, and for integer ids below 2^53).
void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::size_t n);
// A new tensor of `dtype` on `device` holding src's values (src may live on either device).
Tensor convert_tensor(const TensorView& src, DType dtype, Device device);
// Host copy of a tensor's values.
std::vector<double> to_doubles(const TensorView& t);
std::vector<std::int64_t> to_ints(const TensorView& t);

// Deterministic pseudo-random fill, uniform in (lo, hi) and never exactly zero (a value
// of element i depends only on seed and i, so any dtype or device gets the same numbers
// up to rounding).
void fill_uniform(const TensorView& t, std::uint64_t seed, double lo, double hi);
// Poison with all-ones bytes: NaN for every float dtype, -1 for integers (absent: no-op).
void poison(const TensorView& t);

}  // namespace omnimoe::tool
