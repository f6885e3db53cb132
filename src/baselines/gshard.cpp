// GShard and DeepSeekMoE baselines, CPU reference, in the compute type C over any storage:
//   route     logits = x routerᵀ (BLAS), p = softmax over the N experts, the K largest p per
//             token (ties: smaller id), gates p / (sum of the K chosen p) for gshard and p
//             itself for deepseekmoe; or the caller's routing (forward_routed);
//   schedule  tasks (t, k) grouped by expert, tokens ascending (the OmniMoE CPU counting sort);
//   experts   per expert, its tokens' rows gathered and one SwiGLU of width d_ffn over them
//             (three BLAS products), experts in parallel;
//   combine   y[t] = shared(x)[t] + sum over k (in order) of g_k * out_k.
// The CUDA half is gshard.cu.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

#include "baselines/coarse.hpp"
#include "baselines/coarse_cpu.hpp"
#include "cpu/blas.hpp"
#include "cpu/cpu.hpp"

namespace omnimoe::baselines {
namespace {

using namespace cpu_ref;

template <class C, class S>
struct GshardCpuBuffers {
  C *x, *router;                      // converted copies (null when S == C)
  C *gate, *up, *down;                // shared expert, converted copies (deepseekmoe)
  C* y;                               // [T, H] (null when S == C: the caller's y)
  C* probs;                           // [T, N] logits, then probabilities in place
  i32* index;                         // [threads][N] top-K sort space
  i32* ids;                           // [T, K]
  C* gates;                           // [T, K]
  i64 *offsets, *order, *pos;         // schedule: [N + 1], [T K] task of each sorted slot, [T K] slot of each task
  C *xs, *u, *v, *out;                // [T K, H], [T K, W], [T K, W], [T K, H] in expert order
  C* wconv;                           // [threads][3 W H] one expert's weights in C (S != C)
  C *su, *sv;                         // [T, shared_width]
};

template <class C, class S>
GshardCpuBuffers<C, S> carve_gshard(Arena& a, const BaselineConfig& c, i64 T, int threads) {
  const i64 H = c.hidden, W = c.width, N = c.num_experts, K = c.top_k, SW = c.shared_width, TK = T * K;
  auto n = [](i64 v) { return static_cast<std::size_t>(v); };
  GshardCpuBuffers<C, S> b{};
  b.x = take_copy<C, S>(a, T * H);
  b.router = take_copy<C, S>(a, N * H);
  b.gate = take_copy<C, S>(a, SW * H);
  b.up = take_copy<C, S>(a, SW * H);
  b.down = take_copy<C, S>(a, H * SW);
  b.y = take_copy<C, S>(a, T * H);
  b.probs = a.take<C>(n(T * N));
  b.index = a.take<i32>(n(threads * N));
  b.ids = a.take<i32>(n(TK));
  b.gates = a.take<C>(n(TK));
  b.offsets = a.take<i64>(n(N + 1));
  b.order = a.take<i64>(n(TK));
  b.pos = a.take<i64>(n(TK));
  b.xs = a.take<C>(n(TK * H));
  b.u = a.take<C>(n(TK * W));
  b.v = a.take<C>(n(TK * W));
  b.out = a.take<C>(n(TK * H));
  b.wconv = take_copy<C, S>(a, threads * 3 * W * H);
  b.su = a.take<C>(n(T * SW));
  b.sv = a.take<C>(n(T * SW));
  return b;
}

Config swiglu_config(i64 H, i64 I) {
  Config k;  // the OmniMoE CPU shared-MLP stage reads only these two fields
  k.hidden = H;
  k.intermediate = I;
  return k;
}

// Router: probabilities, the exact top-K by (p descending, id ascending), gates.
template <class C, class S>
void route(const BaselineConfig& c, i64 T, const C* x, const C* router, const GshardCpuBuffers<C, S>& b) {
  const i64 H = c.hidden, N = c.num_experts, K = c.top_k;
  cpu::gemm(false, true, T, N, H, C(1), x, H, router, H, C(0), b.probs, N);
  const bool renormalize = c.kind == Kind::gshard;
#pragma omp parallel for schedule(static)
  for (i64 t = 0; t < T; ++t) {
    C* p = b.probs + t * N;
    C m = -std::numeric_limits<C>::infinity();
    for (i64 i = 0; i < N; ++i)
      if (p[i] > m) m = p[i];  // NaN logits are skipped here and propagate through the sum
    C s = 0;
    for (i64 i = 0; i < N; ++i) {
      p[i] = std::exp(p[i] - m);
      s += p[i];
    }
    for (i64 i = 0; i < N; ++i) p[i] /= s;
    i32* idx = b.index + static_cast<i64>(omp_get_thread_num()) * N;
    std::iota(idx, idx + N, 0);
    std::partial_sort(idx, idx + K, idx + N, [p](i32 u, i32 v) {
      const auto ku = ordered_key(p[u]), kv = ordered_key(p[v]);
      return ku > kv || (ku == kv && u < v);
    });
    C chosen = 0;
    for (i64 k = 0; k < K; ++k) chosen += p[idx[k]];
    for (i64 k = 0; k < K; ++k) {
      b.ids[t * K + k] = idx[k];
      b.gates[t * K + k] = renormalize ? p[idx[k]] / chosen : p[idx[k]];
    }
  }
}

// The caller's routing: ids checked against [0, N), gates converted to C.
template <class C, class S>
Status import_routing(const BaselineConfig& c, const TensorView& ids, const TensorView& gates,
                      const GshardCpuBuffers<C, S>& b) {
  const i64 TK = ids.numel(), K = c.top_k, N = c.num_experts;
  const i32* id = ids.as<const i32>();
  const float* g = gates.as<const float>();
  for (i64 i = 0; i < TK; ++i) {
    if (id[i] < 0 || id[i] >= N)
      return invalid_argument("expert_ids: entry [" + std::to_string(i / K) + ", " + std::to_string(i % K) + "] = " +
                              std::to_string(id[i]) + " is outside [0, N = " + std::to_string(N) + ")");
    b.ids[i] = id[i];
    b.gates[i] = static_cast<C>(g[i]);
  }
  return Status::Ok();
}

// Expert e's SwiGLU over its rows of the expert-ordered buffers, for every active expert.
template <class C, class S>
void experts(const BaselineConfig& c, const BaselineParams& p, const GshardCpuBuffers<C, S>& b) {
  const i64 H = c.hidden, W = c.width, N = c.num_experts;
  const Config sw = swiglu_config(H, W);
  const S* wg = p.expert_gate.as<const S>();
  const S* wu = p.expert_up.as<const S>();
  const S* wd = p.expert_down.as<const S>();
  // One expert per thread at a time: BLAS runs single-threaded inside the parallel region.
#pragma omp parallel for schedule(dynamic, 1)
  for (i64 e = 0; e < N; ++e) {
    const i64 first = b.offsets[e], rows = b.offsets[e + 1] - first;
    if (rows == 0) continue;
    C* conv = std::is_same_v<C, S> ? nullptr : b.wconv + static_cast<i64>(omp_get_thread_num()) * 3 * W * H;
    const C* g = as_compute<C, S>(wg + e * W * H, W * H, conv);
    const C* u = as_compute<C, S>(wu + e * W * H, W * H, conv ? conv + W * H : nullptr);
    const C* d = as_compute<C, S>(wd + e * H * W, H * W, conv ? conv + 2 * W * H : nullptr);
    cpu::shared_mlp_forward(sw, rows, b.xs + first * H, g, u, d, b.u + first * W, b.v + first * W,
                            b.out + first * H);
  }
}

template <class C, class S>
Status forward_impl(const ForwardArgs& a) {
  const BaselineConfig& c = *a.cfg;
  const i64 T = a.x.shape[0], H = c.hidden, N = c.num_experts, K = c.top_k, TK = T * K;
  Arena arena(a.ws.data, a.ws.bytes);
  const GshardCpuBuffers<C, S> b = carve_gshard<C, S>(arena, c, T, planned_threads());
  if (!arena.fits()) return {StatusCode::internal, "gshard cpu forward: workspace plan exceeds the queried size"};
  const C* x = as_compute<C, S>(a.x, b.x);

  // route
  if (a.ids_in.defined()) {
    OMNIMOE_RETURN_IF_ERROR((import_routing<C, S>(c, a.ids_in, a.gates_in, b)));
  } else {
    route<C, S>(c, T, x, as_compute<C, S>(a.p->router, b.router), b);
    if (a.ids_out.defined()) std::copy(b.ids, b.ids + TK, a.ids_out.as<i32>());
  }

  // schedule: tasks by expert, then each task's slot and the gathered rows
  cpu::schedule_by_expert(N, TK, b.ids, cpu::Schedule{b.offsets, b.order});
#pragma omp parallel for schedule(static)
  for (i64 s = 0; s < TK; ++s) {
    b.pos[b.order[s]] = s;
    std::copy(x + (b.order[s] / K) * H, x + (b.order[s] / K + 1) * H, b.xs + s * H);
  }

  experts<C, S>(c, *a.p, b);

  // combine: y = shared expert (deepseekmoe) + sum of the gated expert outputs in k order
  C* y = std::is_same_v<C, S> ? a.y.as<C>() : b.y;
  const bool shared = c.kind == Kind::deepseekmoe && c.shared_width > 0;
  if (shared)
    cpu::shared_mlp_forward(swiglu_config(H, c.shared_width), T, x, as_compute<C, S>(a.p->gate, b.gate),
                            as_compute<C, S>(a.p->up, b.up), as_compute<C, S>(a.p->down, b.down), b.su, b.sv, y);
#pragma omp parallel for schedule(static)
  for (i64 t = 0; t < T; ++t) {
    C* yr = y + t * H;
    if (!shared) std::fill(yr, yr + H, C(0));
    for (i64 k = 0; k < K; ++k) {
      const C g = b.gates[t * K + k];
      const C* o = b.out + b.pos[t * K + k] * H;
      for (i64 h = 0; h < H; ++h) yr[h] += g * o[h];
    }
  }
  store_output<C, S>(y, a.y);
  return Status::Ok();
}

}  // namespace

Status gshard_workspace_size(const BaselineConfig& c, std::int64_t tokens, DType dtype, Device d, std::size_t* bytes) {
  if (d == Device::cuda) return gshard_workspace_size_cuda(c, tokens, dtype, bytes);
  return dispatch_dtype(dtype, [&]<class C, class S>() {
    Arena a;
    carve_gshard<C, S>(a, c, tokens, planned_threads());
    *bytes = a.used();
    return Status::Ok();
  });
}

Status gshard_forward(const ForwardArgs& a) {
  if (a.x.device == Device::cuda) return gshard_forward_cuda(a);
  return dispatch_dtype(a.x.dtype, [&]<class C, class S>() { return forward_impl<C, S>(a); });
}

}  // namespace omnimoe::baselines
