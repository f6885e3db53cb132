#include "omnimoe/tensor.hpp"

#include <stdexcept>

namespace omnimoe {

std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::f64: case DType::i64: return 8;
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: return 2;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::f64: return "f64";
    case DType::f32: return "f32";
    case DType::f16: return "f16";
    case DType::bf16: return "bf16";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
  }
  return "?";
}

bool dtype_is_float(DType t) {
  return t == DType::f64 || t == DType::f32 || t == DType::f16 || t == DType::bf16;
}

const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

TensorView make_view(void* data, DType dtype, Device device, std::initializer_list<std::int64_t> shape) {
  if (shape.size() > TensorView::kMaxRank) throw std::invalid_argument("make_view: rank > 2");
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.rank = static_cast<int>(shape.size());
  int i = 0;
  for (auto s : shape) v.shape[i++] = s;
  return v;
}

std::string describe(const TensorView& t) {
  if (!t.defined()) return "(absent)";
  std::string s = "[";
  for (int i = 0; i < t.rank; ++i) {
    if (i) s += ", ";
    s += std::to_string(t.shape[i]);
  }
  s += "] ";
  s += dtype_name(t.dtype);
  s += " ";
  s += device_name(t.device);
  return s;
}

}  // namespace omnimoe
