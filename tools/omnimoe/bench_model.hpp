// Benchmark configurations (named suites) and the work model used for the table's rates.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "omnimoe/config.hpp"

namespace omnimoe::tool {

struct BenchConfig {
  std::string name;
  std::int64_t H, I, Nr, Nc, K, T;
  // Target for forward time / shared-MLP matrix products time (CPU, float32); 0: none.
  double max_forward_over_mlp = 0;

  std::int64_t N() const { return Nr * Nc; }
  Config config() const;  // defaults for norm (batchnorm), gate (exp) and activation (silu)
  // FLOPs of one forward: router products, shared MLP, and expert-centric tile products
  // over 16-token tiles (an expert is computed for a tile when any of its tokens chose it).
  double flops() const;
  // Bytes one forward must move: each active expert's two rows once, the shared MLP and
  // router weights, x read and y written.
  double bytes(std::size_t element_bytes) const;
};

// The suite of that name, or nullptr.
const std::vector<BenchConfig>* find_suite(const std::string& name);
std::string suite_names();  // "cpu, omnimoe, smoke"

}  // namespace omnimoe::tool
