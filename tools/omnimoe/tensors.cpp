#include "tensors.hpp"

#include <cmath>
#include <utility>

#include "core/half.hpp"

namespace omnimoe::tool {
namespace {

void check(const Status& s) { throw_if_error(s); }

// Calls f(T{}) with T the storage type of dtype.
template <class F>
void visit(DType dt, F&& f) {
  switch (dt) {
    case DType::f64: return f(double{});
    case DType::f32: return f(float{});
    case DType::f16: return f(f16_t{});
    case DType::bf16: return f(bf16_t{});
    case DType::i32: return f(std::int32_t{});
    case DType::i64: return f(std::int64_t{});
  }
}

template <class T> double load(const T* p, std::size_t i) {
  if constexpr (std::is_same_v<T, f16_t> || std::is_same_v<T, bf16_t>) {
    return to_float(p[i]);
  } else {
    return static_cast<double>(p[i]);
  }
}
template <class T> void store(T* p, std::size_t i, double v) {
  if constexpr (std::is_same_v<T, f16_t>) {
    p[i] = to_f16(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    p[i] = to_bf16(static_cast<float>(v));
  } else {
    p[i] = static_cast<T>(v);
  }
}

// Host bytes of `t`: the data itself on the CPU, a staged copy otherwise.
const void* host_data(const TensorView& t, Buffer* staging) {
  if (t.device == Device::cpu) return t.data;
  *staging = Buffer(Device::cpu, t.bytes());
  check(copy_bytes(staging->data(), Device::cpu, t.data, t.device, t.bytes()));
  return staging->data();
}

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

Buffer::Buffer(Device device, std::size_t bytes) : bytes_(bytes), device_(device) {
  check(device_alloc(device, bytes, &data_));
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    device_free(device_, data_);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    device_ = o.device_;
  }
  return *this;
}

Tensor::Tensor(DType dtype, Device device, const std::vector<std::int64_t>& shape) {
  if (shape.size() > TensorView::kMaxRank) throw Error(invalid_argument("tensor rank above 2"));
  view_.dtype = dtype;
  view_.device = device;
  view_.rank = static_cast<int>(shape.size());
  for (std::size_t i = 0; i < shape.size(); ++i) view_.shape[i] = shape[i];
  buf_ = Buffer(device, view_.bytes());
  view_.data = buf_.data();
}

void convert(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::size_t n) {
  visit(src_dtype, [&](auto s) {
    visit(dst_dtype, [&](auto d) {
      using S = decltype(s);
      using D = decltype(d);
      const S* in = static_cast<const S*>(src);
      D* out = static_cast<D*>(dst);
#pragma omp parallel for schedule(static) if (n > (1u << 16))
      for (std::size_t i = 0; i < n; ++i) store(out, i, load(in, i));
    });
  });
}

Tensor convert_tensor(const TensorView& src, DType dtype, Device device) {
  std::vector<std::int64_t> shape(src.shape.begin(), src.shape.begin() + src.rank);
  Tensor out(dtype, device, shape);
  const std::size_t n = static_cast<std::size_t>(src.numel());
  if (src.dtype == dtype) {
    check(copy_bytes(out.view().data, device, src.data, src.device, src.bytes()));
    return out;
  }
  Buffer src_staging;
  const void* host_src = host_data(src, &src_staging);
  if (device == Device::cpu) {
    convert(host_src, src.dtype, out.view().data, dtype, n);
  } else {
    Buffer dst_staging(Device::cpu, out.view().bytes());
    convert(host_src, src.dtype, dst_staging.data(), dtype, n);
    check(copy_bytes(out.view().data, device, dst_staging.data(), Device::cpu, out.view().bytes()));
  }
  return out;
}

std::vector<double> to_doubles(const TensorView& t) {
  std::vector<double> v(static_cast<std::size_t>(t.numel()));
  Buffer staging;
  convert(host_data(t, &staging), t.dtype, v.data(), DType::f64, v.size());
  return v;
}

std::vector<std::int64_t> to_ints(const TensorView& t) {
  std::vector<std::int64_t> v(static_cast<std::size_t>(t.numel()));
  Buffer staging;
  convert(host_data(t, &staging), t.dtype, v.data(), DType::i64, v.size());
  return v;
}

void fill_uniform(const TensorView& t, std::uint64_t seed, double lo, double hi) {
  Buffer staging;
  void* host = t.data;
  if (t.device != Device::cpu) {
    staging = Buffer(Device::cpu, t.bytes());
    host = staging.data();
  }
  const std::size_t n = static_cast<std::size_t>(t.numel());
  const std::uint64_t key = splitmix64(seed);
  const double min_abs = 1e-3 * (hi - lo);  // keeps every value clear of zero in every dtype
  visit(t.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(host);
#pragma omp parallel for schedule(static) if (n > (1u << 16))
    for (std::size_t i = 0; i < n; ++i) {
      double u = static_cast<double>(splitmix64(key ^ (i * 0xd1b54a32d192ed03ull)) >> 11) * 0x1.0p-53;
      double v = lo + (hi - lo) * u;
      if (std::abs(v) < min_abs) v = v < 0 ? -min_abs : min_abs;
      store(out, i, v);
    }
  });
  if (host != t.data) check(copy_bytes(t.data, t.device, host, Device::cpu, t.bytes()));
}

void poison(const TensorView& t) {
  if (t.defined()) check(fill_bytes(t.data, t.device, 0xFF, t.bytes()));
}

}  // namespace omnimoe::tool
