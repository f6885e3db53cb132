// CPU backend entry points: workspace planning and the stage sequence of forward and
// backward, in compute type C (double for f64 layers, float otherwise) over storage S.
#include <omp.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "core/backend.hpp"
#include "core/workspace.hpp"
#include "cpu/cpu.hpp"

namespace omnimoe::cpu {
namespace {

// Dense operands in C: the caller's memory when S == C, else a converted copy in the
// workspace. The expert tables are never copied (rows are converted as they are read).
template <class C, class S>
struct Operand {
  static constexpr bool kConvert = !std::is_same_v<C, S>;
  C* take(Arena& a, i64 n) { return kConvert ? a.take<C>(static_cast<std::size_t>(n)) : nullptr; }
};

template <class C, class S>
const C* as_compute(const TensorView& v, C* copy) {
  if constexpr (std::is_same_v<C, S>) {
    (void)copy;
    return v.as<const C>();
  } else {
    const S* src = v.as<const S>();
    const i64 n = v.numel();
#pragma omp parallel for schedule(static)
    for (i64 i = 0; i < n; ++i) copy[i] = load_as<C>(src, static_cast<std::size_t>(i));
    return copy;
  }
}

template <class C, class S>
void store_from_compute(const C* src, const TensorView& dst) {
  if constexpr (!std::is_same_v<C, S>) {
    S* d = dst.as<S>();
    const i64 n = dst.numel();
#pragma omp parallel for schedule(static)
    for (i64 i = 0; i < n; ++i) store_as(d, static_cast<std::size_t>(i), src[i]);
  } else {
    (void)src;
    (void)dst;
  }
}

// Per-thread scratch is planned for every processor, so a size queried on one thread stays
// valid on another or after omp_set_num_threads; a call runs on at most that many threads.
int planned_threads() { return omp_get_num_procs(); }
int run_threads() { return std::min(omp_get_max_threads(), planned_threads()); }

// Router state shared by forward and backward.
template <class C>
struct RouteBuffers {
  C *lr, *lc;          // logits, normalised in place: [T, Nr], [T, Nc]
  C *pr, *pc;          // log-probabilities
  C *mean_r, *rstd_r;  // statistics used by the norm, per row / column
  C *mean_c, *rstd_c;
  double* acc;         // [2 * max(Nr, Nc)] statistics scratch
  i32* ids;            // [T, K]
  C *scores, *gates;   // [T, K]
};

template <class C>
RouteBuffers<C> carve_route(Arena& a, const Config& cfg, i64 T) {
  const auto Nr = static_cast<std::size_t>(cfg.grid_rows), Nc = static_cast<std::size_t>(cfg.grid_cols);
  const auto t = static_cast<std::size_t>(T), tk = t * static_cast<std::size_t>(cfg.top_k);
  RouteBuffers<C> r;
  r.lr = a.take<C>(t * Nr);
  r.lc = a.take<C>(t * Nc);
  r.pr = a.take<C>(t * Nr);
  r.pc = a.take<C>(t * Nc);
  r.mean_r = a.take<C>(Nr);
  r.rstd_r = a.take<C>(Nr);
  r.mean_c = a.take<C>(Nc);
  r.rstd_c = a.take<C>(Nc);
  r.acc = a.take<double>(2 * std::max(Nr, Nc));
  r.ids = a.take<i32>(tk);
  r.scores = a.take<C>(tk);
  r.gates = a.take<C>(tk);
  return r;
}

// Logits -> norm -> log-probs. `update_running`: training forward only.
template <class C>
void route_probabilities(const Config& cfg, Mode mode, i64 T, const C* x, const C* w_row, const C* w_col,
                         const Params& p, bool update_running, RouteBuffers<C>& r) {
  route_logits(cfg, T, x, w_row, w_col, r.lr, r.lc);
  const bool train = mode == Mode::training;
  // Inference reads the running statistics; training updates them only when asked.
  auto running = [&](const TensorView& v) { return (!train || update_running) ? v.as<C>() : nullptr; };
  route_normalize(cfg, mode, T, cfg.grid_rows, r.lr, r.mean_r, r.rstd_r, running(p.running_mean_row),
                  running(p.running_var_row), r.acc);
  route_normalize(cfg, mode, T, cfg.grid_cols, r.lc, r.mean_c, r.rstd_c, running(p.running_mean_col),
                  running(p.running_var_col), r.acc);
  route_log_softmax(T, cfg.grid_rows, r.lr, r.pr);
  route_log_softmax(T, cfg.grid_cols, r.lc, r.pc);
}

// ---- forward ----------------------------------------------------------------------------

template <class C, class S>
struct ForwardBuffers {
  C *x, *w_row, *w_col, *gate, *up, *down, *y;  // converted copies (null when S == C)
  RouteBuffers<C> route;
  TopkScratch<C> topk;
  C *u, *v;  // shared MLP [T, I]
};

template <class C, class S>
ForwardBuffers<C, S> carve_forward(Arena& a, const Config& cfg, i64 T, int threads) {
  const i64 H = cfg.hidden, I = cfg.intermediate;
  Operand<C, S> op;
  ForwardBuffers<C, S> b;
  b.x = op.take(a, T * H);
  b.w_row = op.take(a, cfg.grid_rows * H);
  b.w_col = op.take(a, cfg.grid_cols * H);
  b.gate = op.take(a, I * H);
  b.up = op.take(a, I * H);
  b.down = op.take(a, H * I);
  b.y = op.take(a, T * H);
  b.route = carve_route<C>(a, cfg, T);
  b.topk.threads = threads;
  b.topk.index = a.take<i32>(static_cast<std::size_t>(threads * (cfg.grid_rows + cfg.grid_cols)));
  b.topk.heap = a.take<TopkEntry<C>>(static_cast<std::size_t>(threads * (3 * cfg.top_k + 1)));
  b.u = a.take<C>(static_cast<std::size_t>(T * I));
  b.v = a.take<C>(static_cast<std::size_t>(T * I));
  return b;
}

// The two branches for a routing: shared_mlp writes y, then the experts add to it.
template <class C, class S>
void branches(const Config& cfg, i64 T, const C* x, const Params& p, const i32* ids, const C* gates,
              const ForwardBuffers<C, S>& b, const TensorView& yv) {
  const bool shared = cfg.has_shared_mlp();
  C* y = std::is_same_v<C, S> ? yv.as<C>() : b.y;
  shared_mlp_forward(cfg, T, x, shared ? as_compute<C, S>(p.gate, b.gate) : nullptr,
                     shared ? as_compute<C, S>(p.up, b.up) : nullptr,
                     shared ? as_compute<C, S>(p.down, b.down) : nullptr, b.u, b.v, y);
  experts_forward(cfg, T, x, p.expert_in.as<const S>(), p.expert_out.as<const S>(), ids, gates, y);
  store_from_compute<C, S>(y, yv);
}

template <class C, class S>
Status forward_impl(const Config& cfg, Mode mode, const TensorView& xv, const Params& p, const ForwardOutputs& out,
                    Workspace ws) {
  const i64 T = xv.shape[0], K = cfg.top_k;
  Arena arena(ws.data, ws.bytes);
  auto b = carve_forward<C, S>(arena, cfg, T, planned_threads());
  if (!arena.fits()) return {StatusCode::internal, "cpu forward: workspace plan exceeds the queried size"};
  b.topk.threads = run_threads();

  const C* x = as_compute<C, S>(xv, b.x);
  const C* w_row = as_compute<C, S>(p.router_row, b.w_row);
  const C* w_col = as_compute<C, S>(p.router_col, b.w_col);

  // route
  auto& r = b.route;
  route_probabilities(cfg, mode, T, x, w_row, w_col, p, /*update_running=*/true, r);
  route_topk(cfg, T, r.pr, r.pc, b.topk, r.ids, r.scores);
  route_gates(cfg, T, r.scores, r.gates);

  branches<C, S>(cfg, T, x, p, r.ids, r.gates, b, out.y);

  const i64 TK = T * K;
  for (i64 i = 0; i < TK; ++i) {
    if (out.expert_ids.dtype == DType::i32) out.expert_ids.as<i32>()[i] = r.ids[i];
    else out.expert_ids.as<i64>()[i] = r.ids[i];
    if (out.scores.defined()) out.scores.as<C>()[i] = r.scores[i];
    if (out.gates.defined()) out.gates.as<C>()[i] = r.gates[i];
  }
  return Status::Ok();
}

// ---- backward ---------------------------------------------------------------------------

template <class C, class S>
struct BackwardBuffers {
  C *x, *dy, *w_row, *w_col, *gate, *up, *down;         // converted inputs (null when S == C)
  C *dx, *dw_row, *dw_col, *dgate, *dup, *ddown;        // gradients in C (null when S == C)
  RouteBuffers<C> route;
  C *dpr, *dpc;                                          // [T, Nr], [T, Nc]
  C *a, *dh, *dg;                                        // per task [T, K]
  Schedule schedule;
  C* rows;                                               // [threads][2H]
  C *u, *v, *dm;                                         // shared MLP [T, I]
};

template <class C, class S>
BackwardBuffers<C, S> carve_backward(Arena& a, const Config& cfg, i64 T, int threads) {
  const i64 H = cfg.hidden, I = cfg.intermediate, Nr = cfg.grid_rows, Nc = cfg.grid_cols;
  const auto tk = static_cast<std::size_t>(T * cfg.top_k);
  Operand<C, S> op;
  BackwardBuffers<C, S> b;
  b.x = op.take(a, T * H);
  b.dy = op.take(a, T * H);
  b.w_row = op.take(a, Nr * H);
  b.w_col = op.take(a, Nc * H);
  b.gate = op.take(a, I * H);
  b.up = op.take(a, I * H);
  b.down = op.take(a, H * I);
  b.dx = op.take(a, T * H);
  b.dw_row = op.take(a, Nr * H);
  b.dw_col = op.take(a, Nc * H);
  b.dgate = op.take(a, I * H);
  b.dup = op.take(a, I * H);
  b.ddown = op.take(a, H * I);
  b.route = carve_route<C>(a, cfg, T);
  b.dpr = a.take<C>(static_cast<std::size_t>(T * Nr));
  b.dpc = a.take<C>(static_cast<std::size_t>(T * Nc));
  b.a = a.take<C>(tk);
  b.dh = a.take<C>(tk);
  b.dg = a.take<C>(tk);
  b.schedule.offsets = a.take<i64>(static_cast<std::size_t>(cfg.num_experts() + 1));
  b.schedule.order = a.take<i64>(tk);
  b.rows = a.take<C>(static_cast<std::size_t>(threads * 2 * H));
  b.u = a.take<C>(static_cast<std::size_t>(T * I));
  b.v = a.take<C>(static_cast<std::size_t>(T * I));
  b.dm = a.take<C>(static_cast<std::size_t>(T * I));
  return b;
}

// Copies the caller's routing into i32, rejecting ids outside [0, N).
Status load_ids(const Config& cfg, const TensorView& ids, i32* dst) {
  const i64 n = ids.numel(), N = cfg.num_experts(), K = cfg.top_k;
  for (i64 i = 0; i < n; ++i) {
    const i64 e = ids.dtype == DType::i32 ? ids.as<const i32>()[i] : ids.as<const i64>()[i];
    if (e < 0 || e >= N)
      return invalid_argument("expert_ids[" + std::to_string(i / K) + ", " + std::to_string(i % K) +
                              "] = " + std::to_string(e) + " is outside [0, N = " + std::to_string(N) + ")");
    dst[i] = static_cast<i32>(e);
  }
  return Status::Ok();
}

template <class C, class S>
Status forward_routed_impl(const Config& cfg, const TensorView& xv, const Params& p, const TensorView& idv,
                           const TensorView& gv, const TensorView& yv, Workspace ws) {
  const i64 T = xv.shape[0];
  Arena arena(ws.data, ws.bytes);
  auto b = carve_forward<C, S>(arena, cfg, T, planned_threads());
  if (!arena.fits()) return {StatusCode::internal, "cpu forward_routed: workspace plan exceeds the queried size"};
  OMNIMOE_RETURN_IF_ERROR(load_ids(cfg, idv, b.route.ids));
  branches<C, S>(cfg, T, as_compute<C, S>(xv, b.x), p, b.route.ids, gv.as<const C>(), b, yv);
  return Status::Ok();
}

template <class C, class S>
Status backward_impl(const Config& cfg, Mode mode, const TensorView& xv, const Params& p, const TensorView& idv,
                     const TensorView& dyv, const Gradients& g, Workspace ws,
                     const SparseExpertGradients* sparse) {
  const i64 T = xv.shape[0];
  Arena arena(ws.data, ws.bytes);
  auto b = carve_backward<C, S>(arena, cfg, T, planned_threads());
  if (!arena.fits()) return {StatusCode::internal, "cpu backward: workspace plan exceeds the queried size"};
  auto& r = b.route;
  OMNIMOE_RETURN_IF_ERROR(load_ids(cfg, idv, r.ids));

  constexpr bool same = std::is_same_v<C, S>;
  const bool shared = cfg.has_shared_mlp();
  const C* x = as_compute<C, S>(xv, b.x);
  const C* dy = as_compute<C, S>(dyv, b.dy);
  const C* w_row = as_compute<C, S>(p.router_row, b.w_row);
  const C* w_col = as_compute<C, S>(p.router_col, b.w_col);
  C* dx = same ? g.x.as<C>() : b.dx;
  C* dw_row = same ? g.router_row.as<C>() : b.dw_row;
  C* dw_col = same ? g.router_col.as<C>() : b.dw_col;

  // Recompute the forward's router state for the given routing (running stats untouched).
  route_probabilities(cfg, mode, T, x, w_row, w_col, p, /*update_running=*/false, r);
  route_scores_of(cfg, T, r.pr, r.pc, r.ids, r.scores);
  route_gates(cfg, T, r.scores, r.gates);

  // shared_mlp writes dx, the other branches add to it
  std::fill(dx, dx + T * cfg.hidden, C(0));
  if (shared)
    shared_mlp_backward(cfg, T, x, as_compute<C, S>(p.gate, b.gate), as_compute<C, S>(p.up, b.up),
                        as_compute<C, S>(p.down, b.down), dy, b.u, b.v, b.dm, same ? g.gate.as<C>() : b.dgate,
                        same ? g.up.as<C>() : b.dup, same ? g.down.as<C>() : b.ddown, dx);

  // experts
  const S* w_in = p.expert_in.as<const S>();
  const S* w_out = p.expert_out.as<const S>();
  experts_backward_tokens(cfg, T, x, w_in, w_out, r.ids, r.gates, dy, b.a, b.dh, b.dg, dx);
  schedule_by_expert(cfg.num_experts(), T * cfg.top_k, r.ids, b.schedule);
  ExpertRows<S> rows{g.expert_in.as<S>(), g.expert_out.as<S>()};
  if (sparse != nullptr)
    rows = {sparse->expert_in.as<S>(), sparse->expert_out.as<S>(), sparse->ids.as<i32>(), sparse->count.as<i32>(),
            sparse_gradient_capacity(cfg, T)};
  experts_backward_weights(cfg, x, dy, b.schedule, b.a, b.dh, run_threads(), b.rows, rows);

  // route: gates -> scores -> log-probs -> norm -> router weights (and dx)
  route_gates_backward(cfg, T, r.gates, b.dg);
  route_scores_backward(cfg, T, r.ids, b.dg, b.dpr, b.dpc);
  route_log_softmax_backward(T, cfg.grid_rows, r.pr, b.dpr);
  route_log_softmax_backward(T, cfg.grid_cols, r.pc, b.dpc);
  route_normalize_backward(cfg, mode, T, cfg.grid_rows, r.lr, r.rstd_r, b.dpr, r.acc);
  route_normalize_backward(cfg, mode, T, cfg.grid_cols, r.lc, r.rstd_c, b.dpc, r.acc);
  route_weights_backward(cfg, T, x, w_row, w_col, b.dpr, b.dpc, dw_row, dw_col, dx);

  store_from_compute<C, S>(dx, g.x);
  store_from_compute<C, S>(dw_row, g.router_row);
  store_from_compute<C, S>(dw_col, g.router_col);
  if (shared) {
    store_from_compute<C, S>(b.dgate, g.gate);
    store_from_compute<C, S>(b.dup, g.up);
    store_from_compute<C, S>(b.ddown, g.down);
  }
  return Status::Ok();
}

// Runs fn.template operator()<C, S>() for the layer dtype.
template <class Fn>
auto dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f64: return fn.template operator()<double, double>();
    case DType::f16: return fn.template operator()<float, f16_t>();
    case DType::bf16: return fn.template operator()<float, bf16_t>();
    default: return fn.template operator()<float, float>();
  }
}

}  // namespace

std::size_t forward_workspace_size(const Config& cfg, i64 tokens, DType dtype) {
  return dispatch(dtype, [&]<class C, class S>() {
    Arena a;
    carve_forward<C, S>(a, cfg, tokens, planned_threads());
    return a.used();
  });
}

std::size_t backward_workspace_size(const Config& cfg, i64 tokens, DType dtype) {
  return dispatch(dtype, [&]<class C, class S>() {
    Arena a;
    carve_backward<C, S>(a, cfg, tokens, planned_threads());
    return a.used();
  });
}

Status forward(const Config& cfg, Mode mode, const TensorView& x, const Params& p, const ForwardOutputs& out,
               Workspace ws) {
  return dispatch(x.dtype, [&]<class C, class S>() { return forward_impl<C, S>(cfg, mode, x, p, out, ws); });
}

Status forward_routed(const Config& cfg, const TensorView& x, const Params& p, const TensorView& expert_ids,
                      const TensorView& gates, const TensorView& y, Workspace ws) {
  return dispatch(x.dtype, [&]<class C, class S>() {
    return forward_routed_impl<C, S>(cfg, x, p, expert_ids, gates, y, ws);
  });
}

Status backward(const Config& cfg, Mode mode, const TensorView& x, const Params& p, const TensorView& expert_ids,
                const TensorView& grad_y, const Gradients& g, Workspace ws, const SparseExpertGradients* sparse) {
  return dispatch(x.dtype, [&]<class C, class S>() {
    return backward_impl<C, S>(cfg, mode, x, p, expert_ids, grad_y, g, ws, sparse);
  });
}

}  // namespace omnimoe::cpu
