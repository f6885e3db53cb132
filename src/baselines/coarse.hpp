// The coarse layers (dense, gshard, deepseekmoe): the backend halves behind dense_* and
// gshard_* of kinds.hpp. dense.cpp / gshard.cpp hold the CPU reference and pick the
// backend from x's device; the CUDA halves live in dense.cu / gshard.cu and, in builds
// without CUDA, in coarse_cuda_stub.cpp.
#pragma once

#include "baselines/kinds.hpp"

namespace omnimoe::baselines {

Status dense_workspace_size_cuda(const BaselineConfig& c, std::int64_t tokens, DType dtype, std::size_t* bytes);
Status dense_forward_cuda(const ForwardArgs& a);
Status gshard_workspace_size_cuda(const BaselineConfig& c, std::int64_t tokens, DType dtype, std::size_t* bytes);
Status gshard_forward_cuda(const ForwardArgs& a);

// Largest N the CUDA router kernel serves (a warp per token holds the N probabilities in
// shared memory).
inline constexpr std::int64_t kCoarseMaxExperts = 4096;

}  // namespace omnimoe::baselines
