// omnimoe check: self-check of random layers; one line per check, exit 1 on any failure.
#include <cstdio>
#include <vector>

#include "checks.hpp"
#include "commands.hpp"
#include "omnimoe/device.hpp"

namespace omnimoe::tool {
namespace {

constexpr const char* kCheckUsage =
    "usage: omnimoe check [--device cpu|cuda] [--seed S] [--schedule auto|expert|token]\n"
    "\n"
    "Self-check on small random layers. On the CPU, for several router-norm / gate /\n"
    "activation combinations: finite-difference gradients (float64) for x and every\n"
    "parameter; forward in float64 and float32 against an independent float64 reference\n"
    "(ids in range and unique, order, exact top-K, scores, gates, running statistics, y,\n"
    "every output written). With --device cuda (the default when a GPU is present), also the\n"
    "CUDA forward in float32 and bf16 against the CPU float64 forward; these are skipped,\n"
    "with the reason, when CUDA is unavailable. Prints PASS / FAIL / SKIP per check and exits\n"
    "1 if any check fails.\n"
    "  --seed S  base seed of the random inputs (default 1)\n"
    "  --schedule auto|expert|token  experts path of the CUDA checks (default auto: chosen\n"
    "            from the sizes; expert: expert-centric tile products; token: token-centric\n"
    "            per-token gathers); the CPU checks ignore it\n";

Config config(std::int64_t H, std::int64_t I, std::int64_t Nr, std::int64_t Nc, std::int64_t K, RouterNorm norm,
              GateKind gate, Activation act) {
  Config c;
  c.hidden = H;
  c.intermediate = I;
  c.grid_rows = Nr;
  c.grid_cols = Nc;
  c.top_k = K;
  c.router_norm = norm;
  c.gate = gate;
  c.activation = act;
  return c;
}

// Every switch value appears, with and without the shared branch, both modes, and K = N.
std::vector<CheckCase> cpu_cases(std::int64_t H, std::int64_t I, std::int64_t Nr, std::int64_t Nc, std::int64_t K,
                                 std::int64_t T) {
  using enum RouterNorm;
  using enum GateKind;
  using enum Activation;
  const Mode tr = Mode::training, inf = Mode::inference;
  return {
      {"batchnorm-exp-silu/training", config(H, I, Nr, Nc, K, batchnorm, exp, silu), tr, T},
      {"batchnorm-exp-silu/inference", config(H, I, Nr, Nc, K, batchnorm, exp, silu), inf, T},
      {"batchnorm-softmax-gelu/training", config(H, I, Nr, Nc, K, batchnorm, softmax, gelu), tr, T},
      {"batchnorm-softmax-relu/inference", config(H, I, Nr, Nc, K, batchnorm, softmax, relu), inf, T},
      {"none-softmax-relu/no-shared", config(H, 0, Nr, Nc, K, none, softmax, relu), inf, T},
      {"none-exp-gelu/K=N", config(H, I, Nr, Nc, Nr * Nc, none, exp, gelu), tr, T},
  };
}

// Both scheduling regimes of DESIGN.md section 2: many tokens per expert, and about one;
// `schedule` forces one experts path for both (automatic: each regime's own choice).
std::vector<CheckCase> cuda_cases(Schedule schedule) {
  const Mode tr = Mode::training, inf = Mode::inference;
  std::vector<CheckCase> cases = {
      {"dense-batchnorm-exp-silu/training",
       config(128, 256, 32, 32, 64, RouterNorm::batchnorm, GateKind::exp, Activation::silu), tr, 256},
      {"sparse-batchnorm-softmax-gelu/inference",
       config(128, 256, 64, 64, 4, RouterNorm::batchnorm, GateKind::softmax, Activation::gelu), inf, 64},
  };
  for (CheckCase& c : cases) {
    c.cfg.schedule = schedule;
    if (schedule != Schedule::automatic) c.name += std::string("/schedule=") + name(schedule);
  }
  return cases;
}

class Report {
 public:
  template <class Fn>
  void run(const std::string& name, Fn&& fn) {
    CheckResult r;
    try {
      r = fn();
    } catch (const std::exception& e) {
      r = CheckResult::fail(e.what());
    }
    switch (r.kind) {
      case CheckResult::Kind::pass: std::printf("PASS %s (%s)\n", name.c_str(), r.detail.c_str()); break;
      case CheckResult::Kind::fail: std::printf("FAIL %s: %s\n", name.c_str(), r.detail.c_str()); break;
      case CheckResult::Kind::skip: std::printf("SKIP %s: %s\n", name.c_str(), r.detail.c_str()); break;
    }
    std::fflush(stdout);
    if (r.kind == CheckResult::Kind::fail) ++failures_;
  }
  int failures() const { return failures_; }

 private:
  int failures_ = 0;
};

}  // namespace

int cmd_check(Args& args) {
  if (args.help()) {
    std::fputs(kCheckUsage, stdout);
    return 0;
  }
  const Device device = device_option(args.value("--device").value_or(device_name(best_device())));
  const auto seed_text = args.value("--seed");
  const std::uint64_t seed = seed_text ? static_cast<std::uint64_t>(positive_option("--seed", *seed_text)) : 1;
  const Schedule schedule = schedule_option(args.value("--schedule"));
  args.finish();
  std::printf("omnimoe check on %s, seed %llu\n", device_description(device).c_str(),
              static_cast<unsigned long long>(seed));

  Report report;
  std::uint64_t s = seed * 1000;  // fresh inputs for every check
  for (const CheckCase& c : cpu_cases(8, 6, 4, 5, 3, 6))
    report.run("gradients " + c.name, [&] { return check_gradients(c, ++s); });
  for (DType dt : {DType::f64, DType::f32})
    for (const CheckCase& c : cpu_cases(32, 48, 12, 16, 24, 40))
      report.run(std::string("forward-") + dtype_name(dt) + " " + c.name, [&] { return check_forward(c, dt, ++s); });
  if (device == Device::cuda)
    for (DType dt : {DType::f32, DType::bf16})
      for (const CheckCase& c : cuda_cases(schedule))
        report.run(std::string("cuda-forward-") + dtype_name(dt) + " " + c.name,
                   [&] { return check_cuda_forward(c, dt, ++s); });

  if (report.failures() > 0) {
    std::printf("%d check(s) FAILED\n", report.failures());
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}

}  // namespace omnimoe::tool
