// Non-owning tensor view: the library never allocates or frees caller memory.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace omnimoe {

enum class DType : std::uint8_t { f64, f32, f16, bf16, i32, i64 };
enum class Device : std::uint8_t { cpu, cuda };

std::size_t dtype_size(DType t);
const char* dtype_name(DType t);  // "f64", "f32", "f16", "bf16", "i32", "i64"
bool dtype_is_float(DType t);
const char* device_name(Device d);  // "cpu", "cuda"

// A dense, row-major tensor of rank 0..2 (the layer needs no more). `data == nullptr`
// means "absent" (an optional input or output that is not given).
struct TensorView {
  static constexpr int kMaxRank = 2;

  void* data = nullptr;                     // first element; host or device memory per `device`
  DType dtype = DType::f32;                 // element type
  Device device = Device::cpu;              // where `data` lives
  int rank = 0;                             // number of dimensions used in `shape`
  std::array<std::int64_t, kMaxRank> shape{};  // extents, outermost first

  bool defined() const { return data != nullptr; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= shape[i];
    return n;
  }
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }
  std::int64_t dim(int i) const { return i < rank ? shape[i] : 1; }
  template <class T> T* as() const { return static_cast<T*>(data); }
};

// Build a view; `shape` has at most TensorView::kMaxRank extents.
TensorView make_view(void* data, DType dtype, Device device, std::initializer_list<std::int64_t> shape);

// "[4, 16] bf16 cuda" - used in error messages.
std::string describe(const TensorView& t);

}  // namespace omnimoe
