// The interface every backend implements. Arguments arrive validated (core/validate.cpp);
// a backend still checks what only it can see (index values on the CPU, CUDA errors).
#pragma once

#include "omnimoe/layer.hpp"

namespace omnimoe::cpu {
std::size_t forward_workspace_size(const Config& cfg, std::int64_t tokens, DType dtype);
std::size_t backward_workspace_size(const Config& cfg, std::int64_t tokens, DType dtype);
Status forward(const Config& cfg, Mode mode, const TensorView& x, const Params& p, const ForwardOutputs& out,
               Workspace ws);
// sparse non-null: backward_sparse (g.expert_in / expert_out absent).
Status backward(const Config& cfg, Mode mode, const TensorView& x, const Params& p, const TensorView& expert_ids,
                const TensorView& grad_y, const Gradients& g, Workspace ws,
                const SparseExpertGradients* sparse = nullptr);
Status forward_routed(const Config& cfg, const TensorView& x, const Params& p, const TensorView& expert_ids,
                      const TensorView& gates, const TensorView& y, Workspace ws);
}  // namespace omnimoe::cpu

namespace omnimoe::cuda {
// True when the library was built with the CUDA backend (a GPU may still be absent).
bool built();
// ids_i32: the forward's out.expert_ids will be i32 (its working copy of the routing lives
// there; forward_routed and i64 ids need the size without it).
Status forward_workspace_size(const Config& cfg, std::int64_t tokens, DType dtype, bool ids_i32, std::size_t* bytes);
Status backward_workspace_size(const Config& cfg, std::int64_t tokens, DType dtype, std::size_t* bytes);
Status forward(const Config& cfg, Mode mode, const TensorView& x, const Params& p, const ForwardOutputs& out,
               Workspace ws, void* stream);
Status backward(const Config& cfg, Mode mode, const TensorView& x, const Params& p, const TensorView& expert_ids,
                const TensorView& grad_y, const Gradients& g, Workspace ws, void* stream,
                const SparseExpertGradients* sparse = nullptr);
Status forward_routed(const Config& cfg, const TensorView& x, const Params& p, const TensorView& expert_ids,
                      const TensorView& gates, const TensorView& y, Workspace ws, void* stream);
// The experts schedule the forward (backward = false) or the backward, and its workspace
// plan, take for T tokens of `dtype`: expert_centric or token_centric, never automatic (that
// is resolved here; the two passes may differ). Tests use it to know which path ran (both
// paths compute the same values). No CUDA backend: automatic.
Schedule experts_schedule(const Config& cfg, std::int64_t tokens, DType dtype, bool backward);
}  // namespace omnimoe::cuda
