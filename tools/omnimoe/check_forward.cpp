// CPU forward against the float64 reference, and the routing invariants.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <unordered_set>

#include "checks.hpp"
#include "layer_tensors.hpp"
#include "reference.hpp"

namespace omnimoe::tool {

std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3g", v);
  return buf;
}

std::int64_t first_non_finite(const std::vector<double>& v) {
  for (std::size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i])) return static_cast<std::int64_t>(i);
  return -1;
}

namespace {

double rms(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x * x;
  return std::sqrt(s / static_cast<double>(std::max<std::size_t>(v.size(), 1)));
}

// First failure of a routing invariant for one token, or "".
std::string check_token_routing(const RouteReference& ref, std::int64_t t, const std::int64_t* ids,
                                const double* scores, std::int64_t K, double tol) {
  const std::int64_t N = ref.rows * ref.cols;
  const std::string at = "token " + std::to_string(t) + ": ";
  std::unordered_set<std::int64_t> chosen;
  for (std::int64_t k = 0; k < K; ++k) {
    if (ids[k] < 0 || ids[k] >= N) return at + "expert id " + std::to_string(ids[k]) + " outside [0, N)";
    if (!chosen.insert(ids[k]).second) return at + "expert " + std::to_string(ids[k]) + " chosen twice";
    if (std::abs(scores[k] - ref.score(t, ids[k])) > tol)
      return at + "score of expert " + std::to_string(ids[k]) + " is " + fmt(scores[k]) + ", reference " +
             fmt(ref.score(t, ids[k]));
    if (k > 0 && (scores[k] > scores[k - 1] || (scores[k] == scores[k - 1] && ids[k] < ids[k - 1])))
      return at + "outputs " + std::to_string(k - 1) + ", " + std::to_string(k) +
             " not ordered by descending score, then ascending id";
  }
  // Exactly the K best: no unchosen expert scores above the worst chosen one.
  double worst_chosen = ref.score(t, ids[0]);
  for (std::int64_t k = 1; k < K; ++k) worst_chosen = std::min(worst_chosen, ref.score(t, ids[k]));
  for (std::int64_t e = 0; e < N; ++e)
    if (!chosen.count(e) && ref.score(t, e) > worst_chosen + tol)
      return at + "unchosen expert " + std::to_string(e) + " scores " + fmt(ref.score(t, e)) +
             " above a chosen one (" + fmt(worst_chosen) + ")";
  return "";
}

}  // namespace

CheckResult check_forward(const CheckCase& c, DType dtype, std::uint64_t seed) {
  // float64 agrees with the reference to rounding; float32 to its accumulated rounding.
  const double tol = dtype == DType::f64 ? 1e-9 : 1e-4;
  const std::int64_t T = c.tokens, K = c.cfg.top_k;
  LayerTensors l = random_layer(c.cfg, T, dtype, Device::cpu, seed, 1, /*with_grad_y=*/true);
  const RouteReference ref = reference_route(l, c.mode);  // before forward moves the statistics
  // Both id dtypes are part of the API: float32 cases ask for i32, float64 ones for i64.
  ForwardBuffers fwd = forward_buffers(l, dtype == DType::f64 ? DType::i64 : DType::i32);
  for (const Tensor* t : {&fwd.y, &fwd.expert_ids, &fwd.scores, &fwd.gates}) poison(t->view());
  Buffer ws = workspace(l, /*backward=*/true);
  throw_if_error(forward(c.cfg, c.mode, l.x[0].view(), l.params(), fwd.outputs(), as_workspace(ws)));

  const std::vector<double> y = to_doubles(fwd.y.view()), scores = to_doubles(fwd.scores.view()),
                            gates = to_doubles(fwd.gates.view());
  const std::vector<std::int64_t> ids = to_ints(fwd.expert_ids.view());
  for (auto [name, v] : {std::pair{"y", &y}, {"scores", &scores}, {"gates", &gates}})
    if (std::int64_t i = first_non_finite(*v); i >= 0)
      return CheckResult::fail(std::string(name) + "[" + std::to_string(i) + "] not written (NaN)");

  for (std::int64_t t = 0; t < T; ++t)
    if (std::string bad = check_token_routing(ref, t, &ids[t * K], &scores[t * K], K, tol); !bad.empty())
      return CheckResult::fail(bad);

  const std::vector<double> ref_gates = reference_gates(l, ref, ids);
  for (std::int64_t t = 0; t < T; ++t) {
    double sum = 0;
    for (std::int64_t k = 0; k < K; ++k) {
      const std::int64_t i = t * K + k;
      sum += gates[i];
      if (std::abs(gates[i] - ref_gates[i]) > tol * (std::abs(ref_gates[i]) + 1e-3))
        return CheckResult::fail("gates[" + std::to_string(t) + ", " + std::to_string(k) + "] = " + fmt(gates[i]) +
                                 ", reference " + fmt(ref_gates[i]));
    }
    if (c.cfg.gate == GateKind::softmax && std::abs(sum - 1) > tol)
      return CheckResult::fail("softmax gates of token " + std::to_string(t) + " sum to " + fmt(sum));
  }

  if (c.cfg.router_norm == RouterNorm::batchnorm) {
    // Training: reference update; inference: untouched (the reference leaves them as read).
    const std::pair<const char*, const std::vector<double>*> stats[] = {
        {"running_mean_row", &ref.running_mean_row},
        {"running_var_row", &ref.running_var_row},
        {"running_mean_col", &ref.running_mean_col},
        {"running_var_col", &ref.running_var_col}};
    for (auto [stat, want] : stats) {
      const std::vector<double> got = to_doubles(layer_tensor(l, stat).view());
      for (std::size_t i = 0; i < got.size(); ++i)
        if (std::abs(got[i] - (*want)[i]) > tol * (1 + std::abs((*want)[i])))
          return CheckResult::fail(std::string(stat) + "[" + std::to_string(i) + "] = " + fmt(got[i]) +
                                   ", expected " + fmt((*want)[i]) + " after " + name(c.mode));
    }
  }

  const std::vector<double> ref_y = reference_y(l, ids, ref_gates);
  const double scale = rms(ref_y);
  double worst = 0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    const double err = std::abs(y[i] - ref_y[i]) / (std::abs(ref_y[i]) + scale);
    if (err > tol)
      return CheckResult::fail("y[" + std::to_string(i / c.cfg.hidden) + ", " + std::to_string(i % c.cfg.hidden) +
                               "] = " + fmt(y[i]) + ", reference " + fmt(ref_y[i]));
    worst = std::max(worst, err);
  }

  GradientBuffers grads = gradient_buffers(l);
  for (const GradientMember& m : kGradientMembers) poison((grads.*m.tensor).view());
  throw_if_error(backward(c.cfg, c.mode, l.x[0].view(), l.params(), fwd.expert_ids.view(), l.grad_y.view(),
                          grads.gradients(), as_workspace(ws)));
  for (const GradientMember& m : kGradientMembers)
    if ((grads.*m.tensor).defined())
      if (std::int64_t i = first_non_finite(to_doubles((grads.*m.tensor).view())); i >= 0)
        return CheckResult::fail("grad_" + std::string(m.name) + "[" + std::to_string(i) + "] not written (NaN)");

  return CheckResult::pass("T=" + std::to_string(T) + " N=" + std::to_string(c.cfg.num_experts()) +
                           " K=" + std::to_string(K) + ", worst relative y error " + fmt(worst));
}

}  // namespace omnimoe::tool
