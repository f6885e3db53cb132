// omnimoe bench: forward latency of the layer for the configurations of a named suite.
#include <algorithm>
#include <cstdio>

#include "bench_device.hpp"
#include "bench_model.hpp"
#ifdef OMNIMOE_HAVE_BASELINES
#include "bench_paper.hpp"
#endif
#include "commands.hpp"
#include "layer_tensors.hpp"
#include "omnimoe/device.hpp"
#include "table.hpp"

namespace omnimoe::tool {
namespace {

constexpr const char* kBenchUsage =
    "usage: omnimoe bench [--device cpu|cuda] [--suite NAME] [--dtype f32|bf16|f16|f64] [--reps N] [--csv FILE]\n"
    "                     [--schedule auto|expert|token]\n"
    "\n"
    "Times the layer forward (inference, fresh random inputs) for each configuration of a\n"
    "suite: a progress line per configuration on stderr, then a table on stdout.\n"
    "  --device  cpu or cuda (default: cuda when a GPU is present)\n"
    "  --suite   cpu (default on cpu), omnimoe (default on cuda), smoke, crossover (the paper\n"
    "            family where the backward's two experts paths cross, T = 4096 and 16384), wide\n"
    "            (grids with an axis of 2048: the router's large top-K tiles), or\n"
    "            paper: every layer of DESIGN.md section 3 (baselines too; reduced sizes on cpu;\n"
    "            docs/benchmarks.md)\n"
    "  --dtype   layer dtype (default: f32 on cpu, bf16 on cuda)\n"
    "  --reps    timed calls per configuration (default: 9 on cpu, 20 on cuda; paper: 3, 50)\n"
    "  --only    run only the configurations whose name contains this text\n"
    "  --backward  time forward + backward (training mode) instead of the forward\n"
    "  --sparse-grads  with --backward: the expert tables' gradients through backward_sparse\n"
    "              (active rows only) instead of dense [N, H] tables\n"
    "  --schedule  experts path of the OmniMoE layer on cuda: auto (default: chosen from the\n"
    "            sizes), expert (expert-centric tile products) or token (token-centric per-token\n"
    "            gathers, the paper's ablation without expert-centric scheduling); the CPU\n"
    "            ignores it\n"
    "  --csv     also write the table to FILE as CSV\n"
    "Columns: ms is the median and min ms the fastest call; TFLOP/s and GB/s use the work\n"
    "model of README.md; floor ms is that work at this device's measured peak rates and\n"
    "ratio = ms / floor. On cpu with f32, mlp ms times the shared MLP's three matrix products\n"
    "alone, and fwd/mlp is checked against the configuration's target (PASS / FAIL lines,\n"
    "informational: a miss does not change the exit status).\n";

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int cmd_bench(Args& args) {
  if (args.help()) {
    std::fputs(kBenchUsage, stdout);
    return 0;
  }
  const Device device = device_option(args.value("--device").value_or(device_name(best_device())));
  const bool cpu = device == Device::cpu;
  const std::string suite_name = args.value("--suite").value_or(cpu ? "cpu" : "omnimoe");
  const DType dtype = float_dtype_option(args.value("--dtype").value_or(cpu ? "f32" : "bf16"));
  const auto reps_text = args.value("--reps");
  const int reps = reps_text ? static_cast<int>(std::min<std::int64_t>(positive_option("--reps", *reps_text), 100000))
                             : (cpu ? 9 : 20);
  const int warmup = cpu ? 1 : 5;
  const auto csv = args.value("--csv");
  const std::string only = args.value("--only").value_or("");
  // --backward: a training step, forward then backward (training mode), per configuration.
  const bool train_step = args.flag("--backward");
  const bool sparse_grads = args.flag("--sparse-grads");
  const Schedule schedule = schedule_option(args.value("--schedule"));
  args.finish();
  if (sparse_grads && !train_step) throw UsageError("--sparse-grads needs --backward");
  if (suite_name == "paper") {  // bench_paper.cpp
#ifdef OMNIMOE_HAVE_BASELINES
    if (train_step) throw UsageError("--backward: the paper suite times the forward only");
    require_device(device);
    return bench_paper({device, dtype, reps_text ? reps : 0, csv, only, schedule});
#else
    throw UsageError("--suite paper: this build has no baseline layers (configured with -DOMNIMOE_BASELINES=OFF)");
#endif
  }
  const std::vector<BenchConfig>* suite = find_suite(suite_name);
  if (suite == nullptr) throw UsageError("--suite '" + suite_name + "': expected one of " + suite_names() + ", paper");
  require_device(device);

  std::fprintf(stderr, "omnimoe bench: suite %s, %s, %s, %d reps, schedule %s\n", suite_name.c_str(),
               device_description(device).c_str(), dtype_name(dtype), reps, name(schedule));
  const Ceilings ceil = bench_ceilings(device, dtype);
  if (ceil.known())
    std::fprintf(stderr, "ceilings: %.2f TFLOP/s products, %.1f GB/s copy\n", ceil.flops_per_s * 1e-12,
                 ceil.bytes_per_s * 1e-9);
  if (ceil.l2_gather_bytes_per_s > 0)
    std::fprintf(stderr, "context: %.1f GB/s gathering 2 KB rows from L2 (16 MB table, random order)\n",
                 ceil.l2_gather_bytes_per_s * 1e-9);
  const bool mlp_baseline = cpu && dtype == DType::f32 && !train_step;

  const bool gpu = device == Device::cuda;
  Table table({"config", "routing", "device", "dtype", "T", "H", "I", "N", "K", "ms", "min ms", "eager ms",
               "workspace MB", "mem goal MB", "TFLOP/s", "GB/s", "floor ms", "ratio", "dense ms", "mlp ms",
               "fwd/mlp", "schedule"});
  std::vector<std::string> verdicts;
  for (std::size_t n = 0; n < suite->size(); ++n) {
    const BenchConfig& b = (*suite)[n];
    if (!only.empty() && b.name.find(only) == std::string::npos) continue;
    const std::int64_t set_bytes = b.T * b.H * static_cast<std::int64_t>(dtype_size(dtype));
    Config cfg = b.config();
    cfg.schedule = schedule;
    LayerTensors l =
        random_layer(cfg, b.T, dtype, device, n + 1, input_sets(device, set_bytes), /*with_grad_y=*/train_step);
    ForwardBuffers out = forward_buffers(l, DType::i32);
    Buffer ws = workspace(l, /*backward=*/false, DType::i32);  // the forward keeps its routing in out's i32 ids
    Buffer bws = train_step ? workspace(l, /*backward=*/true) : Buffer{};
    GradientBuffers grads = train_step ? gradient_buffers(l) : GradientBuffers{};
    // --sparse-grads: active expert rows only (the dense tables are not written).
    const std::int64_t cap = sparse_gradient_capacity(l.cfg, b.T);
    Tensor sp_ids, sp_count, sp_in, sp_out;
    if (sparse_grads) {
      grads.expert_in = Tensor();
      grads.expert_out = Tensor();
      sp_ids = Tensor(DType::i32, device, {cap});
      sp_count = Tensor(DType::i32, device, {1});
      sp_in = Tensor(dtype, device, {cap, b.H});
      sp_out = Tensor(dtype, device, {cap, b.H});
    }
    const SparseExpertGradients sparse{sp_ids.view(), sp_count.view(), sp_in.view(), sp_out.view()};
    // The paper's harness timed its layer without the router (uniform random ids): that
    // series runs the same branches through forward_routed.
    const bool paper = b.name.rfind("paper-", 0) == 0 && !train_step;
    const RandomRouting routing = paper ? random_routing(l.cfg, b.T, dtype, device, n + 7) : RandomRouting{};
    const Buffer ws_routed = paper ? workspace(l, /*backward=*/false) : Buffer{};  // forward_routed copies the ids
    for (const bool with_router : {true, false}) {
      if (!with_router && !paper) continue;
      auto call_on = [&](std::size_t set, void* stream) {
        const TensorView& x = l.x[set % l.x.size()].view();
        if (train_step) {  // one training step: forward, then backward for its routing
          OMNIMOE_RETURN_IF_ERROR(forward(l.cfg, Mode::training, x, l.params(), out.outputs(), as_workspace(ws), stream));
          if (sparse_grads)
            return backward_sparse(l.cfg, Mode::training, x, l.params(), out.expert_ids.view(), l.grad_y.view(),
                                   grads.gradients(), sparse, as_workspace(bws), stream);
          return backward(l.cfg, Mode::training, x, l.params(), out.expert_ids.view(), l.grad_y.view(),
                          grads.gradients(), as_workspace(bws), stream);
        }
        if (with_router) return forward(l.cfg, Mode::inference, x, l.params(), out.outputs(), as_workspace(ws), stream);
        return forward_routed(l.cfg, x, l.params(), routing.ids.view(), routing.gates.view(), out.y.view(),
                              as_workspace(ws_routed), stream);
      };
      std::size_t next = 0;  // rotates through the input sets
      std::vector<double> eager, ms;
      throw_if_error(time_calls(device, [&] { return call_on(next++, nullptr); }, warmup, reps, &eager));
      if (gpu) {  // one captured graph per input set, replayed round-robin
        std::vector<std::function<Status(void*)>> calls;
        for (std::size_t i = 0; i < l.x.size(); ++i) calls.push_back([&, i](void* st) { return call_on(i, st); });
        throw_if_error(time_graph_replays(device, calls, warmup, reps, &ms));
      } else {
        ms = eager;
      }
      const double med = median(ms), best = *std::min_element(ms.begin(), ms.end());
      const char* step_name = train_step ? (sparse_grads ? "fwd+bwd sparse" : "fwd+bwd")
                              : with_router ? "router" : "random ids";

      // A training step: 3x the forward's flops and twice its bytes (the model).
      const double flops = b.flops() * (train_step ? 3 : 1), bytes = b.bytes(dtype_size(dtype)) * (train_step ? 2 : 1);
      const double mem_goal = 64.0 + (train_step ? 32.0 : 16.0) * static_cast<double>(b.T * b.K) / (1 << 20);
      const double ws_bytes =  // the training step's forward and backward run one after the other: the larger counts
          static_cast<double>(with_router ? std::max(ws.bytes(), bws.bytes()) : ws_routed.bytes());
      std::string floor_ms, ratio, mlp_ms, fwd_over_mlp, dense_ms;
      if (ceil.known()) {
        const double fl = 1e3 * std::max(flops / ceil.flops_per_s, bytes / ceil.bytes_per_s);
        floor_ms = strfmt("%.3f", fl);
        ratio = strfmt("%.2f", med / fl);
        if (with_router)
        {
          const double goal = train_step ? 3 : 2;
          verdicts.push_back(strfmt("%s %s: %.3f ms, floor %.3f ms, ratio %.2f (goal <= %g%s)",
                                    med / fl <= goal ? "PASS" : "MISS", b.name.c_str(), med, fl, med / fl, goal,
                                    med / fl <= goal ? "" : strfmt(", %.1fx over", med / fl / goal).c_str()));
        }
      }
      if (gpu && with_router) {
        double d = 0;
        if (!train_step && time_dense_equivalent(l.cfg, b.T, dtype, 5, &d).ok()) dense_ms = strfmt("%.3f", d);
        const double ws_mb = ws_bytes / (1 << 20);
        verdicts.push_back(strfmt("%s %s: workspace %.1f MB, goal <= %.1f MB", ws_mb <= mem_goal ? "PASS" : "MISS",
                                  b.name.c_str(), ws_mb, mem_goal));
      }
      if (mlp_baseline && b.I > 0) {
        const double m = shared_mlp_gemm_ms(l.x[0].view().as<float>(), l.gate.view().as<float>(),
                                            l.up.view().as<float>(), l.down.view().as<float>(), b.T, b.H, b.I, warmup,
                                            reps);
        mlp_ms = strfmt("%.3f", m);
        fwd_over_mlp = strfmt("%.2f", med / m);
        if (b.max_forward_over_mlp > 0)
          verdicts.push_back(strfmt("%s cpu speed %s: forward %.1f ms, shared-MLP products alone %.1f ms, ratio %.2f "
                                    "(target <= %.2f)",
                                    med / m <= b.max_forward_over_mlp ? "PASS" : "FAIL", b.name.c_str(), med, m,
                                    med / m, b.max_forward_over_mlp));
      }
      table.add({b.name, step_name, device_name(device), dtype_name(dtype),
                 std::to_string(b.T), std::to_string(b.H), std::to_string(b.I), std::to_string(b.N()),
                 std::to_string(b.K), strfmt("%.3f", med), strfmt("%.3f", best), strfmt("%.3f", median(eager)),
                 strfmt("%.1f", ws_bytes / (1 << 20)), strfmt("%.1f", mem_goal),
                 strfmt("%.3g", flops / (med * 1e-3) * 1e-12), strfmt("%.3g", bytes / (med * 1e-3) * 1e-9), floor_ms,
                 ratio, dense_ms, mlp_ms, fwd_over_mlp, name(schedule)});
      const std::string extra = mlp_ms.empty() ? "" : ", shared-MLP products " + mlp_ms + " ms";
      std::fprintf(stderr, "[%zu/%zu] %s (%s): %.3f ms (min %.3f)%s\n", n + 1, suite->size(), b.name.c_str(),
                   step_name, med, best, extra.c_str());
    }
  }
  table.print(stdout);
  for (const std::string& v : verdicts) std::printf("%s\n", v.c_str());
  if (csv) table.write_csv(*csv);
  return 0;
}

}  // namespace omnimoe::tool
