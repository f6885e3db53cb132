// Dense SwiGLU through cuBLASLt, chunk by chunk of tokens: gate and up as one strided-batch
// product (x broadcast against both weights; the batch stride is the distance between the
// caller's two tensors), the SwiGLU of the OmniMoE shared-MLP stage, then the down product.
#include <algorithm>

#include "baselines/coarse_cuda.cuh"
#include "cuda/cuda.cuh"

namespace omnimoe::baselines::gpu {

i64 swiglu_chunk_rows(i64 T, i64 I, DType dtype, std::size_t bytes) {
  const i64 per_row = 2 * I * static_cast<i64>(dtype_size(dtype));
  return std::clamp<i64>(static_cast<i64>(bytes) / per_row, 1, T);
}

Status swiglu_forward(const SwigluArgs& a, cudaStream_t s) {
  using cuda::at;
  using cuda::GemmArgs;
  const DType dt = a.dtype;
  const i64 H = a.H, I = a.I, es = static_cast<i64>(dtype_size(dt));
  // Batch slot 0 is whichever of gate / up lies first in memory (strides must be >= 0); u
  // and v are consecutive workspace buffers, so the output stride is positive too.
  const auto* gp = static_cast<const char*>(a.gate);
  const auto* upp = static_cast<const char*>(a.up);
  const bool gate_first = gp <= upp;
  const i64 gap = gate_first ? upp - gp : gp - upp;
  const bool one_product = gap % es == 0 && static_cast<char*>(a.v) > static_cast<char*>(a.u);
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
      g.batch = 2;
      g.stride_a = 0;
      g.stride_b = gap / es;
      g.stride_c = static_cast<i64>(static_cast<char*>(a.v) - static_cast<char*>(a.u)) / es;
      OMNIMOE_RETURN_IF_ERROR(cuda::gemm(g, a.gemm, s));
    } else {
      g.B = gp;
      g.C = gate_out;
      OMNIMOE_RETURN_IF_ERROR(cuda::gemm(g, a.gemm, s));
      g.B = upp;
      g.C = up_out;
      OMNIMOE_RETURN_IF_ERROR(cuda::gemm(g, a.gemm, s));
    }
    OMNIMOE_RETURN_IF_ERROR(cuda::shared_mlp_swiglu(dt, gate_out, up_out, rows * I, s));
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
    OMNIMOE_RETURN_IF_ERROR(cuda::gemm(d, a.gemm, s));
  }
  return Status::Ok();
}

}  // namespace omnimoe::baselines::gpu
