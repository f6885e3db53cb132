// An independent float64 evaluation of DESIGN.md section 1, written for clarity, not speed
// (small layers only: it scores the whole grid). `omnimoe check` holds the library to it.
#pragma once

#include <cstdint>
#include <vector>

#include "layer_tensors.hpp"

namespace omnimoe::tool {

struct RouteReference {
  std::int64_t tokens = 0, rows = 0, cols = 0;
  std::vector<double> pr, pc;  // log-softmax of the normalised logits: [T, Nr], [T, Nc]
  // Running statistics after this call (training with batchnorm: updated; else unchanged).
  std::vector<double> running_mean_row, running_var_row, running_mean_col, running_var_col;

  double score(std::int64_t t, std::int64_t e) const { return pr[t * rows + e / cols] + pc[t * cols + e % cols]; }
  // Token t's K best experts (descending score, ties by ascending id) and the gap between
  // the K-th score and the best unchosen one (+inf when K = N).
  std::vector<std::int64_t> top_k(std::int64_t t, std::int64_t k, double* gap) const;
};

// Routing of input set `input` of `l` in `mode`.
RouteReference reference_route(const LayerTensors& l, Mode mode, int input = 0);
// Gates for the chosen `ids` [T, K] per the config's gate kind.
std::vector<double> reference_gates(const LayerTensors& l, const RouteReference& r,
                                    const std::vector<std::int64_t>& ids);
// y [T, H] for the given routing (ids and gates [T, K]).
std::vector<double> reference_y(const LayerTensors& l, const std::vector<std::int64_t>& ids,
                                const std::vector<double>& gates, int input = 0);

}  // namespace omnimoe::tool
