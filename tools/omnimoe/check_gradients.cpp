// Finite-difference gradient check (float64, CPU).
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "checks.hpp"
#include "layer_tensors.hpp"

namespace omnimoe::tool {
namespace {
// Thousands of forwards of a tiny layer: threads only add fork/join cost, which on a busy
// machine (spinning threads descheduled) grows from seconds to minutes. The forward checks
// still run the library with all threads.
class SingleThreaded {
 public:
  SingleThreaded() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~SingleThreaded() { omp_set_num_threads(saved_); }
  SingleThreaded(const SingleThreaded&) = delete;
  SingleThreaded& operator=(const SingleThreaded&) = delete;

 private:
  int saved_;
};
}  // namespace

CheckResult check_gradients(const CheckCase& c, std::uint64_t seed) {
  // Step and tolerance for float64: truncation error ~h^2 and rounding ~1e-16 / h are both
  // far below the tolerance, which is still far below any real gradient bug.
  constexpr double kStep = 1e-6, kAbsTol = 1e-6, kRelTol = 1e-5;
  // Elements whose +-h perturbation flips the routing have no derivative there; if many
  // do, the check says nothing and fails.
  constexpr double kMaxSkippedFraction = 0.1;

  SingleThreaded one_thread;  // before the workspace query: the CPU plan depends on the thread count
  LayerTensors l = random_layer(c.cfg, c.tokens, DType::f64, Device::cpu, seed, 1, /*with_grad_y=*/true);
  ForwardBuffers fwd = forward_buffers(l);
  GradientBuffers grads = gradient_buffers(l);
  Buffer ws = workspace(l, /*backward=*/true);
  const std::vector<double> grad_y = to_doubles(l.grad_y.view());

  // Loss <grad_y, y> of one forward; `ids` receives the routing. In training the forward
  // also moves the running statistics, which the training loss does not read.
  auto loss = [&](std::vector<std::int64_t>* ids) {
    throw_if_error(forward(c.cfg, c.mode, l.x[0].view(), l.params(), fwd.outputs(), as_workspace(ws)));
    *ids = to_ints(fwd.expert_ids.view());
    const double* y = fwd.y.view().as<const double>();
    double s = 0;
    for (std::size_t i = 0; i < grad_y.size(); ++i) s += grad_y[i] * y[i];
    return s;
  };

  std::vector<std::int64_t> ids0, ids;
  loss(&ids0);
  for (const GradientMember& m : kGradientMembers) poison((grads.*m.tensor).view());
  throw_if_error(backward(c.cfg, c.mode, l.x[0].view(), l.params(), fwd.expert_ids.view(), l.grad_y.view(),
                          grads.gradients(), as_workspace(ws)));

  std::int64_t checked = 0, skipped = 0;
  double worst = 0;  // largest error / tolerance
  std::string worst_at;
  for (const GradientMember& m : kGradientMembers) {
    const Tensor& g = grads.*m.tensor;
    if (!g.defined()) continue;
    const std::vector<double> analytic = to_doubles(g.view());
    if (std::int64_t i = first_non_finite(analytic); i >= 0)
      return CheckResult::fail("grad_" + std::string(m.name) + "[" + std::to_string(i) + "] not written (NaN)");
    double* p = layer_tensor(l, m.name).view().as<double>();
    for (std::size_t i = 0; i < analytic.size(); ++i) {
      const double saved = p[i];
      p[i] = saved + kStep;
      const double lp = loss(&ids);
      bool flipped = ids != ids0;
      p[i] = saved - kStep;
      const double lm = loss(&ids);
      flipped = flipped || ids != ids0;
      p[i] = saved;
      if (flipped) {
        ++skipped;
        continue;
      }
      ++checked;
      const double fd = (lp - lm) / (2 * kStep);
      const double err = std::abs(fd - analytic[i]) / (kAbsTol + kRelTol * std::abs(analytic[i]));
      if (err > worst) {
        worst = err;
        worst_at = "grad_" + std::string(m.name) + "[" + std::to_string(i) + "]: backward " + fmt(analytic[i]) +
                   ", finite difference " + fmt(fd);
      }
    }
  }
  if (worst > 1) return CheckResult::fail(worst_at);
  if (skipped > kMaxSkippedFraction * static_cast<double>(checked + skipped))
    return CheckResult::fail(std::to_string(skipped) + " of " + std::to_string(checked + skipped) +
                             " perturbations flip the routing");
  return CheckResult::pass(std::to_string(checked) + " elements, worst error " + fmt(worst) + " of tolerance" +
                           (skipped ? ", " + std::to_string(skipped) + " skipped (routing flip)" : ""));
}

}  // namespace omnimoe::tool
