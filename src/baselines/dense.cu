// Dense SwiGLU baseline, CUDA: three cuBLASLt products (gate and up as one strided batch)
// and the SwiGLU between them, over token chunks whose activations fit in kChunkBytes.
#include <string>

#include "baselines/coarse.hpp"
#include "baselines/coarse_cuda.cuh"
#include "core/workspace.hpp"

namespace omnimoe::baselines {
namespace {

using gpu::i64;

// u and v of one token chunk. Chunks of several thousand tokens keep the products at full
// speed while the activations stay bounded.
constexpr std::size_t kChunkBytes = std::size_t{64} << 20;

struct DenseGpuBuffers {
  cuda::GemmWorkspace gemm;
  void *u, *v;
  i64 chunk_rows;
};

DenseGpuBuffers carve(Arena& a, const BaselineConfig& c, i64 T, DType dt) {
  DenseGpuBuffers b;
  b.gemm.bytes = cuda::kLayerGemmBytes;
  b.gemm.data = a.take<char>(cuda::kLayerGemmBytes);
  b.chunk_rows = gpu::swiglu_chunk_rows(T, c.width, dt, kChunkBytes);
  const auto n = static_cast<std::size_t>(b.chunk_rows * c.width) * dtype_size(dt);
  b.u = a.take<char>(n);
  b.v = a.take<char>(n);
  return b;
}

}  // namespace

Status dense_workspace_size_cuda(const BaselineConfig& c, std::int64_t tokens, DType dtype, std::size_t* bytes) {
  Arena a;
  carve(a, c, tokens, dtype);
  *bytes = a.used();
  return Status::Ok();
}

Status dense_forward_cuda(const ForwardArgs& a) {
  const BaselineConfig& c = *a.cfg;
  const i64 T = a.x.shape[0];
  Arena arena(a.ws.data, a.ws.bytes);
  const DenseGpuBuffers b = carve(arena, c, T, a.x.dtype);
  if (!arena.fits()) return {StatusCode::internal, "dense cuda forward: workspace plan exceeds the queried size"};
  gpu::SwigluArgs s{a.x.dtype, T,       c.hidden, c.width, a.x.data,     a.p->gate.data, a.p->up.data,
                    a.p->down.data, a.y.data, b.chunk_rows, b.u, b.v, b.gemm};
  return gpu::swiglu_forward(s, static_cast<cudaStream_t>(a.stream));
}

}  // namespace omnimoe::baselines
