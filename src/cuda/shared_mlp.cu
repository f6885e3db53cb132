// CUDA shared_mlp stage (also the dense SwiGLU of the baselines): gate and up as one
// strided-batch cuBLASLt product (x broadcast against both weights; the batch stride is the
// distance between the caller's two tensors), the SwiGLU kernel, then the down product,
// chunk by chunk of tokens.
#include <algorithm>

#include "core/math.hpp"
#include "cuda/cuda.cuh"

namespace omnimoe::cuda {
namespace {

template <class S>
__global__ void swiglu_kernel(S* __restrict__ u, const S* __restrict__ v, i64 n) {
  constexpr int V = Vec<S>::kN;
  const i64 i = (static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (i + V <= n) {
    float a[V], b[V];
    load16(u + i, a);
    load16(v + i, b);
#pragma unroll
    for (int j = 0; j < V; ++j) a[j] = a[j] * sigmoid(a[j]) * b[j];
    store16(u + i, a);
  } else {
    for (i64 j = i; j < n; ++j) {
      const float a = to_f32(u[j]);
      u[j] = from_f32<S>(a * sigmoid(a) * to_f32(v[j]));
    }
  }
}

template <class S>
Status launch(void* u, const void* v, i64 n, cudaStream_t stream) {
  const i64 threads = (n + Vec<S>::kN - 1) / Vec<S>::kN;
  swiglu_kernel<S><<<ceil_div(threads, 256), 256, 0, stream>>>(static_cast<S*>(u), static_cast<const S*>(v), n);
  OMNIMOE_CUDA_LAUNCH_CHECK("shared_mlp swiglu_kernel");
  return Status::Ok();
}

}  // namespace

Status shared_mlp_swiglu(DType dtype, void* u, const void* v, i64 n, cudaStream_t stream) {
  switch (dtype) {
    case DType::bf16: return launch<__nv_bfloat16>(u, v, n, stream);
    case DType::f16: return launch<__half>(u, v, n, stream);
    default: return launch<float>(u, v, n, stream);
  }
}

i64 swiglu_chunk_rows(i64 T, i64 I, DType dtype, std::size_t bytes) {
  const i64 per_row = 2 * I * static_cast<i64>(dtype_size(dtype));
  return std::clamp<i64>(static_cast<i64>(bytes) / per_row, 1, T);
}

Status swiglu_forward(const SwigluArgs& a, cudaStream_t s) {
  const DType dt = a.dtype;
  const i64 H = a.H, I = a.I, es = static_cast<i64>(dtype_size(dt));
  // Batch slot 0 is whichever of gate / up lies first in memory (strides must be >= 0); u
  // and v are consecutive workspace buffers, so the output stride is positive too.
  const auto* gp = static_cast<const char*>(a.gate);
  const auto* upp = static_cast<const char*>(a.up);
  const BatchGap gap = batch_gap(gp, upp);
  const bool gate_first = gap.a_first;
  // One strided-batch product where the gap is whole 16-byte units (batch_gap, gemm.cuh, says
  // why); else two products. The backward's twin of this choice is mlp_batches (layer_backward.cu).
  const bool one_product = gap.whole16() && static_cast<char*>(a.v) > static_cast<char*>(a.u);
  void* gate_out = (one_product && !gate_first) ? a.v : a.u;
  void* up_out = (one_product && !gate_first) ? a.u : a.v;
  for (i64 t0 = 0; t0 < a.T; t0 += a.chunk_rows) {
    const i64 rows = std::min(a.chunk_rows, a.T - t0);
    GemmArgs g;
    g.tb = true;
    g.M = rows;
    g.N = I;
    g.K = H;
    g.A = at(a.x, t0 * H, dt);
    g.lda = H;
    g.ldb = H;
    g.ldc = I;
    g.ab = g.c = dt;
    if (one_product) {
      g.B = gate_first ? gp : upp;
      g.C = a.u;
      const i64 out_gap = static_cast<i64>(static_cast<char*>(a.v) - static_cast<char*>(a.u)) / es;
      OMNIMOE_RETURN_IF_ERROR(gemm(batch2(g, 0, gap.bytes / es, out_gap), a.gemm, s));
    } else {
      g.B = gp;
      g.C = gate_out;
      OMNIMOE_RETURN_IF_ERROR(gemm(g, a.gemm, s));
      g.B = upp;
      g.C = up_out;
      OMNIMOE_RETURN_IF_ERROR(gemm(g, a.gemm, s));
    }
    OMNIMOE_RETURN_IF_ERROR(shared_mlp_swiglu(dt, gate_out, up_out, rows * I, s));
    GemmArgs d;
    d.tb = true;
    d.M = rows;
    d.N = H;
    d.K = I;
    d.A = gate_out;
    d.lda = I;
    d.B = a.down;
    d.ldb = I;
    d.C = const_cast<char*>(at(a.y, t0 * H, dt));
    d.ldc = H;
    d.ab = d.c = dt;
    OMNIMOE_RETURN_IF_ERROR(gemm(d, a.gemm, s));
  }
  return Status::Ok();
}

}  // namespace omnimoe::cuda
