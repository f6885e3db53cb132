// Row-major GEMM through cuBLASLt: C = alpha * op(A) op(B) + beta * C, fp32 accumulation.
// A and B share a storage dtype (f32, bf16, f16); C is f32 or that dtype. f32 inputs use true
// fp32 arithmetic (no TF32), so the f32 layer stays within ~1e-5 of the float64 reference.
#pragma once

#include <cuda_runtime.h>

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
