// Row-major GEMM through cuBLASLt: C = alpha * op(A) op(B) + beta * C, fp32 accumulation.
// A and B share a storage dtype (f32, bf16, f16); C is f32 or that dtype. f32 inputs use true
// fp32 arithmetic (no TF32), so the f32 layer stays within ~1e-5 of the float64 reference.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common.cuh"

namespace omnimoe::cuda {

struct GemmWorkspace {
  void* data = nullptr;  // cuBLASLt scratch, part of the caller's workspace
  std::size_t bytes = 0;
};
inline constexpr std::size_t kGemmWorkspaceBytes = std::size_t{32} << 20;  // large standalone products
inline constexpr std::size_t kLayerGemmBytes = std::size_t{8} << 20;       // the layer's share of its workspace

struct GemmArgs {
  bool ta = false, tb = false;  // op(A) = Aᵀ / op(B) = Bᵀ
  i64 M = 0, N = 0, K = 0;      // op(A) is [M, K], op(B) is [K, N], C is [M, N]
  const void* A = nullptr;
  i64 lda = 0;
  const void* B = nullptr;
  i64 ldb = 0;
  void* C = nullptr;
  i64 ldc = 0;
  DType ab = DType::bf16;  // dtype of A and B
  DType c = DType::f32;    // dtype of C
  float alpha = 1.f, beta = 0.f;
  // Strided batch: `batch` products, operand i at A + i * stride_a (elements), etc. A stride
  // of 0 broadcasts that operand (one x against several weight matrices).
  int batch = 1;
  i64 stride_a = 0, stride_b = 0, stride_c = 0;
};

Status gemm(const GemmArgs& g, GemmWorkspace ws, cudaStream_t stream);

// g run twice as one strided batch: operand i at A + i * stride_a (elements), etc.
inline GemmArgs batch2(GemmArgs g, i64 stride_a, i64 stride_b, i64 stride_c) {
  g.batch = 2;
  g.stride_a = stride_a;
  g.stride_b = stride_b;
  g.stride_c = stride_c;
  return g;
}

// Two tensors as the slots of one strided batch (the stride: the gap between them): which
// lies first (slot 0, since strides must be >= 0), the gap in bytes, and whether it is whole
// 16-byte units. The gap comes from the addresses as integers: the tensors may be separate
// allocations, whose pointer difference is undefined. Callers batch a pair only where the
// gap is whole 16-byte units, else they run two products: gemm tells cuBLASLt the alignment
// every batch has (batch 1 is only as aligned as the stride), so a 16-byte gap costs at most
// the 16-byte kernels, while a smaller one would narrow the kernels of both batches.
struct BatchGap {
  bool a_first = true;  // a lies at or before b
  i64 bytes = 0;        // |b - a|
  bool whole16() const { return bytes % 16 == 0; }
};
inline BatchGap batch_gap(const void* a, const void* b) {
  const auto ia = reinterpret_cast<std::uintptr_t>(a), ib = reinterpret_cast<std::uintptr_t>(b);
  return {ia <= ib, static_cast<i64>(ia <= ib ? ib - ia : ia - ib)};
}
// Whether `second` lies a positive whole number of 16-byte units after `first` (slot 1 of a
// batch whose slot 0 is `first`; batch_gap says why 16 bytes).
inline bool batch_after(const void* first, const void* second) {
  const BatchGap d = batch_gap(first, second);
  return d.a_first && d.bytes > 0 && d.whole16();
}

// The common case in one expression: C = op(A) op(B) + beta C, no batch.
inline GemmArgs gemm_args(bool ta, bool tb, i64 M, i64 N, i64 K, const void* A, i64 lda, const void* B, i64 ldb,
                          void* C, i64 ldc, DType ab, DType c, float beta) {
  GemmArgs g;
  g.ta = ta;
  g.tb = tb;
  g.M = M;
  g.N = N;
  g.K = K;
  g.A = A;
  g.lda = lda;
  g.B = B;
  g.ldb = ldb;
  g.C = C;
  g.ldc = ldc;
  g.ab = ab;
  g.c = c;
  g.beta = beta;
  return g;
}

}  // namespace omnimoe::cuda
