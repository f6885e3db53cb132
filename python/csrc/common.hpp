// Plumbing shared by every op of the extension: torch tensors -> omnimoe::TensorView, the
// workspace from torch's allocator, torch's current stream, Status -> Python exception.
// No math here: every number the ops return is computed by the library.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "omnimoe/layer.hpp"

#ifdef OMNIMOE_TORCH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace omnimoe_torch {

inline omnimoe::DType to_dtype(c10::ScalarType st, const char* name) {
  switch (st) {
    case c10::ScalarType::Double: return omnimoe::DType::f64;
    case c10::ScalarType::Float: return omnimoe::DType::f32;
    case c10::ScalarType::Half: return omnimoe::DType::f16;
    case c10::ScalarType::BFloat16: return omnimoe::DType::bf16;
    case c10::ScalarType::Int: return omnimoe::DType::i32;
    case c10::ScalarType::Long: return omnimoe::DType::i64;
    default: TORCH_CHECK_TYPE(false, "omnimoe: ", name, " has dtype ", st, "; supported: float64, float32, float16, bfloat16 (int32/int64 for ids)");
  }
}

inline omnimoe::Device to_device(const c10::Device& d, const char* name) {
  if (d.is_cpu()) return omnimoe::Device::cpu;
  if (d.is_cuda()) return omnimoe::Device::cuda;
  TORCH_CHECK(false, "omnimoe: ", name, " is on ", d, "; supported devices: cpu, cuda");
}

// The library takes dense row-major tensors of rank <= 2: `t` must be contiguous (the ops
// call .contiguous() on their inputs first).
inline omnimoe::TensorView view(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() <= omnimoe::TensorView::kMaxRank, "omnimoe: ", name, " must have rank <= 2, got shape ",
                    t.sizes());
  TORCH_CHECK(t.is_contiguous(), "omnimoe: ", name, " must be contiguous");
  omnimoe::TensorView v;
  v.data = t.numel() > 0 ? t.data_ptr() : nullptr;
  v.dtype = to_dtype(t.scalar_type(), name);
  v.device = to_device(t.device(), name);
  v.rank = static_cast<int>(t.dim());
  for (int i = 0; i < v.rank; ++i) v.shape[i] = t.size(i);
  return v;
}

inline omnimoe::TensorView view(const std::optional<at::Tensor>& t, const char* name) {
  return t.has_value() && t->defined() ? view(*t, name) : omnimoe::TensorView{};
}

inline at::Tensor contiguous(const at::Tensor& t) { return t.contiguous(); }
inline std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return t->contiguous();
}

// Raises the library's message as a Python exception: ValueError for a bad argument,
// RuntimeError otherwise.
inline void check(const omnimoe::Status& s, const char* what) {
  if (s.ok()) return;
  TORCH_CHECK_VALUE(s.code() != omnimoe::StatusCode::invalid_argument, "omnimoe.", what, ": ", s.message());
  TORCH_CHECK(false, "omnimoe.", what, " (", omnimoe::status_code_name(s.code()), "): ", s.message());
}

// torch's current stream on x's device (CUDA), nullptr on the CPU.
inline void* current_stream(const at::Tensor& x) {
#ifdef OMNIMOE_TORCH_CUDA
  if (x.is_cuda()) return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
#else
  (void)x;
#endif
  return nullptr;
}

// Workspace of `bytes` from torch's allocator (the caching allocator on CUDA) on x's device,
// 256-byte aligned as the library requires. `storage` keeps the memory alive until the call
// returns; on CUDA the allocator's stream semantics cover the kernels queued on the current
// stream.
struct TorchWorkspace {
  at::Tensor storage;
  omnimoe::Workspace ws;
};

inline TorchWorkspace make_workspace(std::size_t bytes, const at::Tensor& x) {
  constexpr std::size_t kAlign = 256;
  TorchWorkspace w;
  if (bytes == 0) return w;
  w.storage = at::empty({static_cast<std::int64_t>(bytes + kAlign)}, x.options().dtype(at::kByte));
  auto p = reinterpret_cast<std::uintptr_t>(w.storage.data_ptr());
  p = (p + kAlign - 1) / kAlign * kAlign;
  w.ws.data = reinterpret_cast<void*>(p);
  w.ws.bytes = bytes;
  return w;
}

// Accumulation dtype of a layer dtype (router statistics, scores, gates): f64 for f64, else f32.
inline c10::ScalarType accumulation_dtype(c10::ScalarType layer) {
  return layer == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

}  // namespace omnimoe_torch
