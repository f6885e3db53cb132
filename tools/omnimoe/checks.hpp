// The checks of `omnimoe check`. Each builds fresh random inputs from its seed, runs the
// library and returns a verdict; a thrown omnimoe::Error counts as a failure.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "omnimoe/config.hpp"
#include "omnimoe/tensor.hpp"

namespace omnimoe::tool {

struct CheckCase {
  std::string name;  // "bn-exp-silu/training"
  Config cfg;        // complete, hidden and intermediate included
  Mode mode = Mode::inference;
  std::int64_t tokens = 0;
};

struct CheckResult {
  enum class Kind { pass, fail, skip } kind = Kind::pass;
  std::string detail;  // pass: a summary; fail: what went wrong first; skip: why
  static CheckResult pass(std::string d) { return {Kind::pass, std::move(d)}; }
  static CheckResult fail(std::string d) { return {Kind::fail, std::move(d)}; }
  static CheckResult skip(std::string d) { return {Kind::skip, std::move(d)}; }
};

// Central finite differences of <grad_y, y> in float64 on the CPU against backward, for x
// and every parameter (elements whose perturbation flips the routing are skipped).
CheckResult check_gradients(const CheckCase& c, std::uint64_t seed);
// CPU forward in `dtype` against the float64 reference: ids in range and unique, order,
// exact top-K, scores, gates, running statistics, y; every output and gradient written.
CheckResult check_forward(const CheckCase& c, DType dtype, std::uint64_t seed);
// CUDA forward in `dtype` against the CPU float64 forward on the same (rounded) values,
// token by token where the routing is not a near-tie.
CheckResult check_cuda_forward(const CheckCase& c, DType dtype, std::uint64_t seed);

// Helpers shared by the check files.
std::string fmt(double v);  // "%.3g"
// Index of the first non-finite value, or -1.
std::int64_t first_non_finite(const std::vector<double>& v);

}  // namespace omnimoe::tool
