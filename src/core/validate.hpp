// Argument checks shared by every backend: shapes, dtypes, devices, presence. Each failure
// names the argument ("params.expert_in: expected [N=64, H=32] f32 cpu, got [64, 16] f32 cpu").
#pragma once

#include "omnimoe/layer.hpp"

namespace omnimoe {

// Tokens T of a forward/backward call (x.shape[0]); call after validate_forward_args.
inline std::int64_t tokens_of(const TensorView& x) { return x.shape[0]; }

Status validate_params(const Config& cfg, DType dtype, Device device, const Params& p);
Status validate_forward_args(const Config& cfg, const TensorView& x, const Params& p, const ForwardOutputs& out,
                             const Workspace& ws);
// `sparse` non-null: backward_sparse (grads.expert_in / expert_out absent, sparse checked).
Status validate_backward_args(const Config& cfg, const TensorView& x, const Params& p,
                              const TensorView& expert_ids, const TensorView& grad_y, const Gradients& g,
                              const Workspace& ws, const SparseExpertGradients* sparse = nullptr);
Status validate_routed_args(const Config& cfg, const TensorView& x, const Params& p, const TensorView& expert_ids,
                            const TensorView& gates, const TensorView& y, const Workspace& ws);
// Workspace: non-null when bytes > 0, at least `required` bytes.
Status validate_workspace(const Workspace& ws, std::size_t required);

}  // namespace omnimoe
