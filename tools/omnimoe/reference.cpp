#include "reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace omnimoe::tool {
namespace {

double act(Activation a, double h) {
  switch (a) {
    case Activation::silu: return h / (1.0 + std::exp(-h));
    case Activation::gelu: return 0.5 * h * (1.0 + std::erf(h / std::sqrt(2.0)));
    case Activation::relu: return h > 0 ? h : 0.0;
  }
  return 0.0;
}

double dot(const double* a, const double* b, std::int64_t n) {
  double s = 0;
  for (std::int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One router axis: logits x W^T [T, M], normalised, then log-softmax per token. Updates
// the running statistics in training with batchnorm.
std::vector<double> route_axis(const Config& cfg, Mode mode, const std::vector<double>& x, const Tensor& w,
                               std::int64_t T, std::int64_t M, std::vector<double>* mean, std::vector<double>* var) {
  const std::int64_t H = cfg.hidden;
  const std::vector<double> wv = to_doubles(w.view());
  std::vector<double> l(static_cast<std::size_t>(T * M));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t m = 0; m < M; ++m) l[t * M + m] = dot(&x[t * H], &wv[m * H], H);
  if (cfg.router_norm == RouterNorm::batchnorm) {
    for (std::int64_t m = 0; m < M; ++m) {
      double mu = (*mean)[m], v = (*var)[m];
      if (mode == Mode::training) {
        double s = 0, ss = 0;
        for (std::int64_t t = 0; t < T; ++t) s += l[t * M + m];
        mu = s / T;
        for (std::int64_t t = 0; t < T; ++t) ss += (l[t * M + m] - mu) * (l[t * M + m] - mu);
        v = ss / T;  // biased, for the normalisation
        (*mean)[m] = (1 - kBatchnormMomentum) * (*mean)[m] + kBatchnormMomentum * mu;
        (*var)[m] = (1 - kBatchnormMomentum) * (*var)[m] + kBatchnormMomentum * v * T / (T - 1);
      }
      for (std::int64_t t = 0; t < T; ++t) l[t * M + m] = (l[t * M + m] - mu) / std::sqrt(v + kBatchnormEps);
    }
  }
  for (std::int64_t t = 0; t < T; ++t) {
    double* row = &l[t * M];
    double mx = *std::max_element(row, row + M), s = 0;
    for (std::int64_t m = 0; m < M; ++m) s += std::exp(row[m] - mx);
    for (std::int64_t m = 0; m < M; ++m) row[m] -= mx + std::log(s);
  }
  return l;
}

}  // namespace

std::vector<std::int64_t> RouteReference::top_k(std::int64_t t, std::int64_t k, double* gap) const {
  std::vector<std::int64_t> order(static_cast<std::size_t>(rows * cols));
  std::iota(order.begin(), order.end(), 0);
  auto better = [&](std::int64_t a, std::int64_t b) {
    double sa = score(t, a), sb = score(t, b);
    return sa != sb ? sa > sb : a < b;
  };
  std::sort(order.begin(), order.end(), better);
  *gap = k < rows * cols ? score(t, order[k - 1]) - score(t, order[k]) : std::numeric_limits<double>::infinity();
  order.resize(static_cast<std::size_t>(k));
  return order;
}

RouteReference reference_route(const LayerTensors& l, Mode mode, int input) {
  const Config& cfg = l.cfg;
  RouteReference r;
  r.tokens = l.tokens;
  r.rows = cfg.grid_rows;
  r.cols = cfg.grid_cols;
  if (cfg.router_norm == RouterNorm::batchnorm) {
    r.running_mean_row = to_doubles(l.running_mean_row.view());
    r.running_var_row = to_doubles(l.running_var_row.view());
    r.running_mean_col = to_doubles(l.running_mean_col.view());
    r.running_var_col = to_doubles(l.running_var_col.view());
  }
  const std::vector<double> x = to_doubles(l.x.at(input).view());
  r.pr = route_axis(cfg, mode, x, l.router_row, r.tokens, r.rows, &r.running_mean_row, &r.running_var_row);
  r.pc = route_axis(cfg, mode, x, l.router_col, r.tokens, r.cols, &r.running_mean_col, &r.running_var_col);
  return r;
}

std::vector<double> reference_gates(const LayerTensors& l, const RouteReference& r,
                                    const std::vector<std::int64_t>& ids) {
  const std::int64_t T = l.tokens, K = l.cfg.top_k;
  std::vector<double> g(static_cast<std::size_t>(T * K));
  for (std::int64_t t = 0; t < T; ++t) {
    double mx = -std::numeric_limits<double>::infinity(), sum = 0;
    for (std::int64_t k = 0; k < K; ++k) mx = std::max(mx, r.score(t, ids[t * K + k]));
    for (std::int64_t k = 0; k < K; ++k) {
      const double s = r.score(t, ids[t * K + k]);
      g[t * K + k] = l.cfg.gate == GateKind::exp ? std::exp(s) : std::exp(s - mx);
      sum += g[t * K + k];
    }
    if (l.cfg.gate == GateKind::softmax)
      for (std::int64_t k = 0; k < K; ++k) g[t * K + k] /= sum;
  }
  return g;
}

std::vector<double> reference_y(const LayerTensors& l, const std::vector<std::int64_t>& ids,
                                const std::vector<double>& gates, int input) {
  const Config& cfg = l.cfg;
  const std::int64_t T = l.tokens, H = cfg.hidden, I = cfg.intermediate, K = cfg.top_k;
  const std::vector<double> x = to_doubles(l.x.at(input).view());
  const std::vector<double> win = to_doubles(l.expert_in.view()), wout = to_doubles(l.expert_out.view());
  std::vector<double> y(static_cast<std::size_t>(T * H), 0.0);
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t k = 0; k < K; ++k) {
      const std::int64_t e = ids[t * K + k];
      const double a = gates[t * K + k] * act(cfg.activation, dot(&x[t * H], &win[e * H], H));
      for (std::int64_t h = 0; h < H; ++h) y[t * H + h] += a * wout[e * H + h];
    }
  if (I > 0) {
    const std::vector<double> gate = to_doubles(l.gate.view()), up = to_doubles(l.up.view()),
                              down = to_doubles(l.down.view());
    for (std::int64_t t = 0; t < T; ++t)
      for (std::int64_t i = 0; i < I; ++i) {
        const double m = act(Activation::silu, dot(&x[t * H], &gate[i * H], H)) * dot(&x[t * H], &up[i * H], H);
        for (std::int64_t h = 0; h < H; ++h) y[t * H + h] += m * down[h * I + i];
      }
  }
  return y;
}

}  // namespace omnimoe::tool
