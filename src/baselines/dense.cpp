// Dense SwiGLU baseline, CPU reference: y = (silu(x gateᵀ) * (x upᵀ)) downᵀ through the
// OmniMoE CPU backend's shared-MLP stage (three BLAS products and one SwiGLU pass) in the
// compute type C, over any storage type. The CUDA half is dense.cu.
#include "baselines/coarse.hpp"
#include "baselines/coarse_cpu.hpp"
#include "cpu/cpu.hpp"

namespace omnimoe::baselines {
namespace {

using namespace cpu_ref;

template <class C, class S>
struct DenseCpuBuffers {
  C *x, *gate, *up, *down, *y;  // converted copies (null when S == C)
  C *u, *v;                     // [T, I]
};

template <class C, class S>
DenseCpuBuffers<C, S> carve_dense(Arena& a, const BaselineConfig& c, i64 T) {
  const i64 H = c.hidden, I = c.width;
  DenseCpuBuffers<C, S> b;
  b.x = take_copy<C, S>(a, T * H);
  b.gate = take_copy<C, S>(a, I * H);
  b.up = take_copy<C, S>(a, I * H);
  b.down = take_copy<C, S>(a, H * I);
  b.y = take_copy<C, S>(a, T * H);
  b.u = a.take<C>(static_cast<std::size_t>(T * I));
  b.v = a.take<C>(static_cast<std::size_t>(T * I));
  return b;
}

// The OmniMoE CPU shared-MLP stage reads only hidden and intermediate from its config.
Config swiglu_config(i64 H, i64 I) {
  Config k;
  k.hidden = H;
  k.intermediate = I;
  return k;
}

}  // namespace

Status dense_workspace_size(const BaselineConfig& c, std::int64_t tokens, DType dtype, Device d, std::size_t* bytes) {
  if (d == Device::cuda) return dense_workspace_size_cuda(c, tokens, dtype, bytes);
  return dispatch_dtype(dtype, [&]<class C, class S>() {
    Arena a;
    carve_dense<C, S>(a, c, tokens);
    *bytes = a.used();
    return Status::Ok();
  });
}

Status dense_forward(const ForwardArgs& a) {
  if (a.x.device == Device::cuda) return dense_forward_cuda(a);
  const BaselineConfig& c = *a.cfg;
  return dispatch_dtype(a.x.dtype, [&]<class C, class S>() {
    const i64 T = a.x.shape[0];
    Arena arena(a.ws.data, a.ws.bytes);
    const DenseCpuBuffers<C, S> b = carve_dense<C, S>(arena, c, T);
    if (!arena.fits()) return Status{StatusCode::internal, "dense cpu forward: workspace plan exceeds the queried size"};
    const C* x = as_compute<C, S>(a.x, b.x);
    C* y = std::is_same_v<C, S> ? a.y.as<C>() : b.y;
    cpu::shared_mlp_forward(swiglu_config(c.hidden, c.width), T, x, as_compute<C, S>(a.p->gate, b.gate),
                            as_compute<C, S>(a.p->up, b.up), as_compute<C, S>(a.p->down, b.down), b.u, b.v, y);
    store_output<C, S>(y, a.y);
    return Status::Ok();
  });
}

}  // namespace omnimoe::baselines
