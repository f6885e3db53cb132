// `omnimoe bench --suite paper`: the efficiency comparison of DESIGN.md section 3 (the
// paper's Figure 4): OmniMoE, GShard, DeepSeekMoE, PKM, PEER and a dense SwiGLU of equal
// activated parameters; latency and peak memory against activated parameters (K sweep at
// one T) and against T (at each layer's smallest K). docs/benchmarks.md explains the numbers.
#pragma once

#include <optional>
#include <string>

#include "omnimoe/config.hpp"
#include "omnimoe/tensor.hpp"

namespace omnimoe::tool {

struct PaperBenchOptions {
  Device device = Device::cpu;  // cuda: the paper's sizes; cpu: reduced sizes (about a minute)
  DType dtype = DType::bf16;
  int reps = 0;                 // timed calls per point (0: 50 on cuda, 3 on cpu)
  std::optional<std::string> csv;
  std::string only;             // run only the points whose name contains this text
  Schedule schedule = Schedule::automatic;  // experts path of the OmniMoE points (baselines: n/a)
};

// Runs the suite: progress on stderr, the table on stdout, the CSV when asked. Returns the
// exit status (0; a point that fails is reported on stderr and in its row's note).
int bench_paper(const PaperBenchOptions& o);

}  // namespace omnimoe::tool
