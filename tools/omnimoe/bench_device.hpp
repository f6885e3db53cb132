// Device-dependent parts of `omnimoe bench`: measured ceilings for the floor column, the
// number of input sets to rotate through, and the CPU shared-MLP matrix-product baseline.
#pragma once

#include <cstdint>

#include "omnimoe/layer.hpp"
#include "omnimoe/tensor.hpp"
#include "tensors.hpp"

namespace omnimoe::tool {

// Measured peak rates of this device for a layer of `dtype`; zero where not measured
// (then the table leaves floor and ratio empty).
struct Ceilings {
  double flops_per_s = 0;  // dense matrix products (CPU: sgemm; CUDA: bf16 tensor cores)
  double bytes_per_s = 0;  // memory bandwidth, read + write bytes (a large copy)
  double l2_gather_bytes_per_s = 0;  // CUDA: 2 KB rows gathered from L2 (context, not in the floor)
  bool known() const { return flops_per_s > 0 && bytes_per_s > 0; }
};

// CPU: an sgemm and a memcpy measured here. CUDA: omnimoe::measure_ceilings (bf16 tensor
// cores, device copy), used for bf16 and f16 layers only (other dtypes: unknown).
Ceilings bench_ceilings(Device device, DType dtype);

// HOOK: how many distinct x sets a config rotates through so that timed calls do not
// find their inputs in cache (CPU: 1; CUDA: to be sized against L2).
int input_sets(Device device, std::int64_t bytes_per_set);

// A uniform random routing (distinct ids per token, gates in (0.01, 1)) on `device`, for
// timing the layer without its router as the paper's harness did.
struct RandomRouting {
  Tensor ids;    // [T, K] i32
  Tensor gates;  // [T, K] accumulation dtype
};
RandomRouting random_routing(const Config& cfg, std::int64_t T, DType dtype, Device device, std::uint64_t seed);

// Median milliseconds of the shared MLP's three float32 matrix products alone,
// x gate^T [T, I], x up^T [T, I], m down^T [T, H], through the same BLAS as the library.
double shared_mlp_gemm_ms(const float* x, const float* gate, const float* up, const float* down, std::int64_t T,
                          std::int64_t H, std::int64_t I, int warmup, int reps);

}  // namespace omnimoe::tool
