// pkm and peer (include/omnimoe/baselines.hpp): the CPU reference and the backend switch.
// CPU: compute type C = double for f64 layers, float otherwise, over storage S (f64, f32,
// f16, bf16). The query and sub-key products go through BLAS over token chunks; the exact
// top-K (see product_key.hpp), the softmax and the token-centric gather run per token under
// OpenMP, each token reading its own K rows (converted as they are read).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>

#include "baselines/product_key.hpp"
#include "core/half.hpp"
#include "core/math.hpp"
#include "core/workspace.hpp"
#include "cpu/blas.hpp"

namespace omnimoe::baselines {
namespace {

using i64 = std::int64_t;
using i32 = std::int32_t;

// Tokens per chunk of the query / sub-key products (bounds the workspace; the products stay
// large enough for BLAS).
constexpr i64 kCpuTokenChunk = 2048;

// Per-thread scratch is planned for every processor, so a size queried on one thread stays
// valid on another (as src/cpu/layer.cpp does).
int planned_threads() { return omp_get_num_procs(); }
int run_threads() { return std::min(omp_get_max_threads(), planned_threads()); }

template <class C>
struct Cell {
  C s;
  i32 e;
};

template <class C>
struct CpuBuffers {
  C *x, *query, *keys_row, *keys_col;  // converted copies (null when S == C); x per chunk
  C *q, *s1, *s2;                      // [Tc, H], [Tc, Nr], [Tc, Nc]
  // Per thread:
  i32 *rid, *cid;    // [Nr], [Nc] sorted axis ids
  C *rv, *cv;        // [Nr], [Nc] sorted axis values
  i32 *gt, *ge;      // [Nr] cells of each sorted row above / at-or-above tau
  Cell<C>* sel;      // [K]
  C* acc;            // [H]
};

template <class C, class S>
CpuBuffers<C> carve(Arena& a, const BaselineConfig& c, i64 T, int threads) {
  constexpr bool convert = !std::is_same_v<C, S>;
  const auto H = static_cast<std::size_t>(c.hidden), Nr = static_cast<std::size_t>(c.grid_rows),
             Nc = static_cast<std::size_t>(c.grid_cols), K = static_cast<std::size_t>(c.top_k);
  const auto Tc = static_cast<std::size_t>(std::min(T, kCpuTokenChunk)), th = static_cast<std::size_t>(threads);
  CpuBuffers<C> b{};
  b.x = convert ? a.take<C>(Tc * H) : nullptr;
  b.query = convert ? a.take<C>(H * H) : nullptr;
  b.keys_row = convert ? a.take<C>(Nr * H / 2) : nullptr;
  b.keys_col = convert ? a.take<C>(Nc * H / 2) : nullptr;
  b.q = a.take<C>(Tc * H);
  b.s1 = a.take<C>(Tc * Nr);
  b.s2 = a.take<C>(Tc * Nc);
  b.rid = a.take<i32>(th * Nr);
  b.cid = a.take<i32>(th * Nc);
  b.rv = a.take<C>(th * Nr);
  b.cv = a.take<C>(th * Nc);
  b.gt = a.take<i32>(th * Nr);
  b.ge = a.take<i32>(th * Nr);
  b.sel = a.take<Cell<C>>(th * K);
  b.acc = a.take<C>(th * H);
  return b;
}

// `n` elements of S at src as C: src itself when S == C, else converted into `copy`.
template <class C, class S>
const C* as_compute(const S* src, i64 n, C* copy) {
  if constexpr (std::is_same_v<C, S>) {
    (void)n;
    (void)copy;
    return src;
  } else {
#pragma omp parallel for schedule(static)
    for (i64 i = 0; i < n; ++i) copy[i] = load_as<C>(src, static_cast<std::size_t>(i));
    return copy;
  }
}

template <class C, class S>
C dot(const C* a, const S* b, i64 n) {
  C s = 0;
#pragma omp simd reduction(+ : s)
  for (i64 i = 0; i < n; ++i) s += a[i] * load_as<C>(b, static_cast<std::size_t>(i));
  return s;
}

template <class C, class S>
void axpy(C alpha, const S* x, C* y, i64 n) {
#pragma omp simd
  for (i64 i = 0; i < n; ++i) y[i] += alpha * load_as<C>(x, static_cast<std::size_t>(i));
}

// Indices 0..n-1 sorted by descending value of v, ties by ascending index; values to `sv`.
template <class C>
void sort_axis(const C* v, i64 n, i32* idx, C* sv) {
  for (i64 i = 0; i < n; ++i) idx[i] = static_cast<i32>(i);
  std::sort(idx, idx + n, [v](i32 a, i32 b) {
    const auto oa = pk::ord(v[a]), ob = pk::ord(v[b]);
    return oa > ob || (oa == ob && a < b);
  });
  for (i64 i = 0; i < n; ++i) sv[i] = v[idx[i]];
}

// The exact top-K of one token (product_key.hpp): the K cells in descending score, then
// ascending id. Returns false for a token with a non-finite sub-key score.
template <class C>
bool select_token(const BaselineConfig& c, const C* s1, const C* s2, const CpuBuffers<C>& b, int tid) {
  using U = decltype(pk::ord(C(0)));
  const i64 Nr = c.grid_rows, Nc = c.grid_cols, K = c.top_k;
  for (i64 i = 0; i < Nr; ++i)
    if (!std::isfinite(s1[i])) return false;
  for (i64 j = 0; j < Nc; ++j)
    if (!std::isfinite(s2[j])) return false;
  i32* rid = b.rid + tid * Nr;
  i32* cid = b.cid + tid * Nc;
  C* rv = b.rv + tid * Nr;
  C* cv = b.cv + tid * Nc;
  i32* gt = b.gt + tid * Nr;
  i32* ge = b.ge + tid * Nr;
  Cell<C>* sel = b.sel + tid * K;
  sort_axis(s1, Nr, rid, rv);
  sort_axis(s2, Nc, cid, cv);
  const int nc = static_cast<int>(Nc);
  auto count = [&](U u, bool strict) {
    i64 n = 0;
    for (i64 p = 0; p < Nr; ++p) {
      const int m = pk::prefix_count(rv[p], cv, nc, u, strict);
      if (m == 0) break;  // rows are sorted: the rest reach u even less
      n += m;
    }
    return n;
  };
  // 1. tau: bisection between a cut known to hold >= K cells and the best cell. Row p with
  //    the best ceil(K / (p + 1)) columns spans (p + 1) * ceil(K / (p + 1)) >= K cells at or
  //    above its corner, so each such corner is a lower bound (p = Nr - 1 always fits).
  U lo = 0;
  for (i64 p = 0; p < Nr; ++p) {
    const i64 w = (K + p) / (p + 1);
    if (w <= Nc) lo = std::max(lo, pk::ord(static_cast<C>(rv[p] + cv[w - 1])));
  }
  U hi = pk::ord(static_cast<C>(rv[0] + cv[0]));
  while (lo < hi) {
    const U mid = lo + (hi - lo) / 2 + ((hi - lo) & 1);  // upper middle, no overflow
    if (count(mid, false) >= K) lo = mid;
    else hi = mid - 1;
  }
  const U tau = lo;
  // 2. per row: cells above tau [0, gt) and at tau [gt, ge) of the sorted columns.
  i64 n_gt = 0, n_ge = 0;
  for (i64 p = 0; p < Nr; ++p) {
    gt[p] = pk::prefix_count(rv[p], cv, nc, tau, true);
    ge[p] = pk::prefix_count(rv[p], cv, nc, tau, false);
    n_gt += gt[p];
    n_ge += ge[p];
  }
  // 3. ties: the `need` smallest ids.
  const i64 need = K - n_gt;
  std::uint32_t cap = 0xffffffffu;
  if (n_ge - n_gt > need) {
    std::uint32_t elo = 0, ehi = static_cast<std::uint32_t>(Nr * Nc - 1);
    while (elo < ehi) {
      const std::uint32_t mid = elo + (ehi - elo) / 2;
      i64 n = 0;
      for (i64 p = 0; p < Nr; ++p)
        for (i32 q = gt[p]; q < ge[p]; ++q) n += static_cast<std::uint32_t>(rid[p] * Nc + cid[q]) <= mid;
      if (n >= need) ehi = mid;
      else elo = mid + 1;
    }
    cap = elo;
  }
  i64 n = 0;
  for (i64 p = 0; p < Nr; ++p)
    for (i32 q = 0; q < ge[p]; ++q) {
      const i32 e = static_cast<i32>(rid[p] * Nc + cid[q]);
      if (q < gt[p] || static_cast<std::uint32_t>(e) <= cap) sel[n++] = Cell<C>{static_cast<C>(rv[p] + cv[q]), e};
    }
  // n == K by construction.
  std::sort(sel, sel + K, [](const Cell<C>& x, const Cell<C>& y) {
    const auto ox = pk::ord(x.s), oy = pk::ord(y.s);
    return ox > oy || (ox == oy && x.e < y.e);
  });
  return n == K;
}

template <class C, class S>
void store_row(const C* acc, i64 H, bool bad, S* y) {
  for (i64 h = 0; h < H; ++h)
    store_as(y, static_cast<std::size_t>(h), bad ? std::numeric_limits<C>::quiet_NaN() : acc[h]);
}

template <class C, class S>
Status forward_impl(const ForwardArgs& a) {
  const BaselineConfig& c = *a.cfg;
  const BaselineParams& p = *a.p;
  const bool peer = c.kind == Kind::peer;
  const i64 T = a.x.shape[0], H = c.hidden, Hh = H / 2, Nr = c.grid_rows, Nc = c.grid_cols, K = c.top_k;
  const i64 N = Nr * Nc;
  Arena arena(a.ws.data, a.ws.bytes);
  const CpuBuffers<C> b = carve<C, S>(arena, c, T, planned_threads());
  if (!arena.fits()) return {StatusCode::internal, "pkm cpu: workspace plan exceeds the queried size"};
  const int threads = run_threads();
  const S* xs = a.x.as<const S>();
  S* y = a.y.as<S>();
  const S* wa = peer ? p.expert_in.as<const S>() : p.values.as<const S>();
  const S* wb = peer ? p.expert_out.as<const S>() : nullptr;
  const Activation gelu = Activation::gelu;

  if (a.ids_in.defined()) {  // forward_routed: the caller's ids and gates
    const i32* ids = a.ids_in.as<const i32>();
    const float* gates = a.gates_in.as<const float>();
    for (i64 i = 0; i < T * K; ++i)
      if (ids[i] < 0 || ids[i] >= N)
        return invalid_argument("expert_ids: element " + std::to_string(i) + " = " + std::to_string(ids[i]) +
                                " is outside [0, N = " + std::to_string(N) + ")");
    for (i64 t0 = 0; t0 < T; t0 += kCpuTokenChunk) {
      const i64 rows = std::min(kCpuTokenChunk, T - t0);
      const C* x = as_compute<C, S>(xs + t0 * H, rows * H, b.x);
#pragma omp parallel num_threads(threads)
      {
        C* acc = b.acc + omp_get_thread_num() * H;
#pragma omp for schedule(static)
        for (i64 r = 0; r < rows; ++r) {
          const i64 t = t0 + r;
          std::fill(acc, acc + H, C(0));
          for (i64 k = 0; k < K; ++k) {
            const i64 e = ids[t * K + k];
            const C g = static_cast<C>(gates[t * K + k]);
            if (peer) axpy(g * activate(gelu, dot(x + r * H, wa + e * H, H)), wb + e * H, acc, H);
            else axpy(g, wa + e * H, acc, H);
          }
          store_row(acc, H, false, y + t * H);
        }
      }
    }
    return Status::Ok();
  }

  const C* query = as_compute<C, S>(p.query.as<const S>(), H * H, b.query);
  const C* keys_row = as_compute<C, S>(p.keys_row.as<const S>(), Nr * Hh, b.keys_row);
  const C* keys_col = as_compute<C, S>(p.keys_col.as<const S>(), Nc * Hh, b.keys_col);
  i32* ids_out = a.ids_out.defined() ? a.ids_out.as<i32>() : nullptr;
  for (i64 t0 = 0; t0 < T; t0 += kCpuTokenChunk) {
    const i64 rows = std::min(kCpuTokenChunk, T - t0);
    const C* x = as_compute<C, S>(xs + t0 * H, rows * H, b.x);
    // q = x queryᵀ; s1 = q[:, :H/2] keys_rowᵀ; s2 = q[:, H/2:] keys_colᵀ.
    cpu::gemm(false, true, rows, H, H, C(1), x, H, query, H, C(0), b.q, H);
    cpu::gemm(false, true, rows, Nr, Hh, C(1), b.q, H, keys_row, Hh, C(0), b.s1, Nr);
    cpu::gemm(false, true, rows, Nc, Hh, C(1), b.q + Hh, H, keys_col, Hh, C(0), b.s2, Nc);
#pragma omp parallel num_threads(threads)
    {
      const int tid = omp_get_thread_num();
      C* acc = b.acc + tid * H;
      const Cell<C>* sel = b.sel + tid * K;
#pragma omp for schedule(static)
      for (i64 r = 0; r < rows; ++r) {
        const i64 t = t0 + r;
        const bool ok = select_token(c, b.s1 + r * Nr, b.s2 + r * Nc, b, tid);
        std::fill(acc, acc + H, C(0));
        if (ok) {
          // w = softmax over the K scores (sel[0] holds the largest).
          C z = 0;
          for (i64 k = 0; k < K; ++k) z += exp_c(sel[k].s - sel[0].s);
          for (i64 k = 0; k < K; ++k) {
            const i64 e = sel[k].e;
            const C w = exp_c(sel[k].s - sel[0].s) / z;
            if (peer) axpy(w * activate(gelu, dot(x + r * H, wa + e * H, H)), wb + e * H, acc, H);
            else axpy(w, wa + e * H, acc, H);
          }
        }
        store_row(acc, H, !ok, y + t * H);
        if (ids_out != nullptr)
          for (i64 k = 0; k < K; ++k) ids_out[t * K + k] = ok ? sel[k].e : static_cast<i32>(k);
      }
    }
  }
  return Status::Ok();
}

template <class C, class S>
std::size_t cpu_bytes(const BaselineConfig& c, i64 T) {
  Arena a;
  (void)carve<C, S>(a, c, T, planned_threads());
  return a.used();
}

}  // namespace

Status pkm_workspace_size(const BaselineConfig& c, std::int64_t tokens, DType dtype, Device d, std::size_t* bytes) {
  if (c.kind != Kind::pkm && c.kind != Kind::peer) return {StatusCode::internal, "pkm_workspace_size: wrong kind"};
  if (c.hidden % 2 != 0) return invalid_argument("config.hidden: must be even for pkm / peer");
  if (d == Device::cuda) return pkm_workspace_size_cuda(c, tokens, dtype, bytes);
  switch (dtype) {
    case DType::f64: *bytes = cpu_bytes<double, double>(c, tokens); break;
    case DType::f32: *bytes = cpu_bytes<float, float>(c, tokens); break;
    case DType::f16: *bytes = cpu_bytes<float, f16_t>(c, tokens); break;
    case DType::bf16: *bytes = cpu_bytes<float, bf16_t>(c, tokens); break;
    default: return invalid_argument(std::string("dtype: ") + dtype_name(dtype) + " is not a float dtype");
  }
  return Status::Ok();
}

Status pkm_forward(const ForwardArgs& a) {
  if (a.cfg->kind != Kind::pkm && a.cfg->kind != Kind::peer) return {StatusCode::internal, "pkm_forward: wrong kind"};
  if (a.cfg->hidden % 2 != 0) return invalid_argument("config.hidden: must be even for pkm / peer");
  if (a.x.device == Device::cuda) return pkm_forward_cuda(a);
  switch (a.x.dtype) {
    case DType::f64: return forward_impl<double, double>(a);
    case DType::f32: return forward_impl<float, float>(a);
    case DType::f16: return forward_impl<float, f16_t>(a);
    case DType::bf16: return forward_impl<float, bf16_t>(a);
    default: return invalid_argument(std::string("x: ") + dtype_name(a.x.dtype) + " is not a float dtype");
  }
}

}  // namespace omnimoe::baselines
