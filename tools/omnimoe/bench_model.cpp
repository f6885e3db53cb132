#include "bench_model.hpp"

#include <algorithm>
#include <cmath>
#include <map>

namespace omnimoe::tool {
namespace {

std::map<std::string, std::vector<BenchConfig>> make_suites() {
  std::map<std::string, std::vector<BenchConfig>> s;
  // CPU: the README's speed target (the layer within 1.3x of its shared MLP's matrix
  // products alone) at the language-model shape, and a small shape.
  s["cpu"] = {
      {"small-32x32-t256", 256, 1024, 32, 32, 16, 256},
      {"lm-256x256-t1024", 1024, 4096, 256, 256, 16, 1024, 1.3},
  };
  // Seconds on any machine: for tests of the tool itself.
  s["smoke"] = {{"tiny-8x8-t64", 64, 128, 8, 8, 4, 64}};
  // DESIGN.md section 3: the paper's OmniMoE sweeps (N = 320^2, shared width 1024), and
  // the language-model family (I = 4096, K = 16).
  auto& g = s["omnimoe"];
  for (std::int64_t K : {512, 1024, 2048, 4096})
    g.push_back({"paper-k" + std::to_string(K) + "-t1024", 1024, 1024, 320, 320, K, 1024});
  for (std::int64_t T : {2048, 4096, 8192, 16384})
    g.push_back({"paper-k512-t" + std::to_string(T), 1024, 1024, 320, 320, 512, T});
  g.push_back({"paper-k4096-t4096", 1024, 1024, 320, 320, 4096, 4096});
  for (std::int64_t side : {64, 256, 1024})
    for (std::int64_t T : {1024, 4096, 16384})
      g.push_back({"lm-" + std::to_string(side) + "x" + std::to_string(side) + "-t" + std::to_string(T), 1024, 4096,
                   side, side, 16, T});
  // The backward's path rule (choose_path in src/cuda/layer.cu) at larger T: the paper
  // family between K = 1024 and 4096, where the gather and dense backwards cross, at
  // T = 4096 and 16384 (session q measured T = 1024 and one point at T = 4096). Time each
  // path with OMNIMOE_EXPERTS_PATH (scripts/gpu_check.sh paths, BENCH_SUITE=crossover).
  auto& x = s["crossover"];
  for (std::int64_t T : {4096, 16384})
    for (std::int64_t K : {1024, 2048, 3072})
      x.push_back({"paper-k" + std::to_string(K) + "-t" + std::to_string(T), 1024, 1024, 320, 320, K, T});
  // The block top-K's tiles for axes over 1024 entries, which no point above takes
  // (route_topk in src/cuda/route.cu: <256, 16, 4> for K <= 1024, <512, 8, 8> above).
  s["wide"] = {{"wide-2048x64-k512-t4096", 1024, 1024, 2048, 64, 512, 4096},
               {"wide-2048x64-k2048-t1024", 1024, 1024, 2048, 64, 2048, 1024}};
  return s;
}

const std::map<std::string, std::vector<BenchConfig>>& suites() {
  static const auto s = make_suites();
  return s;
}

}  // namespace

Config BenchConfig::config() const {
  Config c;
  c.hidden = H;
  c.intermediate = I;
  c.grid_rows = Nr;
  c.grid_cols = Nc;
  c.top_k = K;
  return c;
}

double BenchConfig::flops() const {
  const double t = static_cast<double>(T), h = static_cast<double>(H), n = static_cast<double>(N());
  const double active_per_tile = 1 - std::exp(16 * std::log1p(-static_cast<double>(K) / n));  // 1 - (1 - K/N)^16
  return 2 * t * h * static_cast<double>(Nr + Nc) + 6 * t * h * static_cast<double>(I) +
         4 * h * n * t * active_per_tile;
}

double BenchConfig::bytes(std::size_t element_bytes) const {
  const double h = static_cast<double>(H);
  const double active = static_cast<double>(std::min(T * K, N()));
  return (2 * active * h + 3 * h * static_cast<double>(I) + static_cast<double>(Nr + Nc) * h +
          2 * static_cast<double>(T) * h) *
         static_cast<double>(element_bytes);
}

const std::vector<BenchConfig>* find_suite(const std::string& name) {
  auto it = suites().find(name);
  return it == suites().end() ? nullptr : &it->second;
}

std::string suite_names() {
  std::string r;
  for (const auto& [name, configs] : suites()) r += (r.empty() ? "" : ", ") + name;
  return r;
}

}  // namespace omnimoe::tool
