// The OmniMoE layer (DESIGN.md section 1): public C++ API shared by every backend.
//
// The caller owns all memory: parameters, inputs, outputs and a workspace whose size the
// *_workspace_size queries return. The backend is the device of `x`; every other view must
// be on the same device. Two API levels:
//   - free functions omnimoe::forward / omnimoe::backward return a Status (never throw);
//   - omnimoe::Layer wraps them and throws omnimoe::Error on failure.
#pragma once

#include <cstddef>
#include <cstdint>

#include "omnimoe/config.hpp"
#include "omnimoe/status.hpp"
#include "omnimoe/tensor.hpp"

namespace omnimoe {

// Float dtype of the layer: every parameter, x, y and the gradients share it.
// "Accumulation dtype": f64 for f64 layers, f32 otherwise. Router statistics,
// scores and gates are stored in it.
DType accumulation_dtype(DType layer_dtype);

struct Params {
  TensorView router_row;        // [Nr, H] layer dtype
  TensorView router_col;        // [Nc, H] layer dtype
  TensorView expert_in;         // [N, H]  layer dtype
  TensorView expert_out;        // [N, H]  layer dtype
  TensorView gate;              // [I, H]  layer dtype; absent when I == 0
  TensorView up;                // [I, H]  layer dtype; absent when I == 0
  TensorView down;              // [H, I]  layer dtype; absent when I == 0
  TensorView running_mean_row;  // [Nr] accumulation dtype; batchnorm only (updated in training)
  TensorView running_var_row;   // [Nr] accumulation dtype; batchnorm only (updated in training)
  TensorView running_mean_col;  // [Nc] accumulation dtype; batchnorm only (updated in training)
  TensorView running_var_col;   // [Nc] accumulation dtype; batchnorm only (updated in training)
};

struct ForwardOutputs {
  TensorView y;           // [T, H] layer dtype (required)
  TensorView expert_ids;  // [T, K] i32 or i64 (required; backward takes it back), e = i * Nc + j,
                          //        ordered by descending score, ties by ascending e
  TensorView scores;      // [T, K] accumulation dtype, S = pr[i] + pc[j] (optional)
  TensorView gates;       // [T, K] accumulation dtype (optional)
};

struct Gradients {
  TensorView x;           // [T, H]  layer dtype
  TensorView router_row;  // [Nr, H] layer dtype
  TensorView router_col;  // [Nc, H] layer dtype
  TensorView expert_in;   // [N, H]  layer dtype (rows of unchosen experts are zero)
  TensorView expert_out;  // [N, H]  layer dtype (rows of unchosen experts are zero)
  TensorView gate;        // [I, H]  layer dtype; absent when I == 0
  TensorView up;          // [I, H]  layer dtype; absent when I == 0
  TensorView down;        // [H, I]  layer dtype; absent when I == 0
};

// The expert tables' gradients in sparse form, for optimizers that update only the rows a
// batch touched: the experts chosen by at least one token, in ascending id order, and their
// two gradient rows. Each buffer holds capacity = sparse_gradient_capacity(cfg, T) =
// min(T * K, N) rows. The number of active experts is written to `count` on the layer's
// device (no host synchronisation); slots from `count` on hold id -1 and zero rows, so the
// whole buffer is defined.
struct SparseExpertGradients {
  TensorView ids;         // [capacity] i32: active expert ids, ascending, then -1
  TensorView count;       // [1] i32: number of active experts
  TensorView expert_in;   // [capacity, H] layer dtype: gradient row of expert ids[s] in slot s
  TensorView expert_out;  // [capacity, H] layer dtype
};
std::int64_t sparse_gradient_capacity(const Config& cfg, std::int64_t tokens);

// Caller-owned scratch memory on the layer's device. Contents need not persist between calls.
struct Workspace {
  void* data = nullptr;
  std::size_t bytes = 0;
};

// Size of the workspace forward/backward need for T tokens of `dtype` on `device`.
// Returns a Status because the request itself may be invalid (bad config, T < 1, no CUDA).
Status forward_workspace_size(const Config& cfg, std::int64_t tokens, DType dtype, Device device,
                              std::size_t* bytes);
// The same for a forward whose out.expert_ids will be of dtype `ids` (i32 or i64). The size
// above is the one for i64 ids, enough for either. With i32 ids the CUDA forward keeps its
// working copy of the routing in out.expert_ids itself (it writes the ids there and reads
// them back for the experts, so that buffer must not overlap x, the parameters, the other
// outputs or the workspace), and needs 4 T K bytes less, rounded to 256 (16 MiB at
// T = 1024, K = 4096); on the CPU the size does not depend on `ids`. A forward given less
// than the size for its ids' dtype fails with workspace_too_small.
// forward_routed always needs the size above (it validates a copy of the caller's ids).
Status forward_workspace_size(const Config& cfg, std::int64_t tokens, DType dtype, Device device, DType ids,
                              std::size_t* bytes);
Status backward_workspace_size(const Config& cfg, std::int64_t tokens, DType dtype, Device device,
                               std::size_t* bytes);

// y = routed(x) + shared_mlp(x). `stream` is a cudaStream_t for CUDA (nullptr: default
// stream) and ignored on the CPU. In training mode with batchnorm, the running statistics
// in `params` are updated in place.
Status forward(const Config& cfg, Mode mode, const TensorView& x, const Params& params,
               const ForwardOutputs& out, Workspace ws, void* stream = nullptr);

// The experts and shared branches for a routing given by the caller: y = sum_k gates *
// act(x . expert_in[e]) * expert_out[e] + shared_mlp(x). expert_ids [T, K] i32/i64, gates
// [T, K] accumulation dtype. For benchmarks that time the layer without its router, and for
// tests that feed every backend the same routing. Uses the forward's (i64-ids) size. Ids
// outside [0, N): the CPU returns invalid_argument; the GPU cannot report without a host
// synchronisation, so it writes NaN to the rows of the tokens concerned (never reads or
// writes out of bounds).
Status forward_routed(const Config& cfg, const TensorView& x, const Params& params, const TensorView& expert_ids,
                      const TensorView& gates, const TensorView& y, Workspace ws, void* stream = nullptr);

// Gradients of <grad_y, y> w.r.t. x and every parameter, for the routing `expert_ids`
// returned by forward (selected indices are constants). `mode` must be the forward's mode:
// training differentiates through the batch statistics, inference uses the running ones.
// Running statistics are read, never written.
Status backward(const Config& cfg, Mode mode, const TensorView& x, const Params& params,
                const TensorView& expert_ids, const TensorView& grad_y, const Gradients& grads,
                Workspace ws, void* stream = nullptr);

// backward with the expert tables' gradients returned sparsely (see SparseExpertGradients):
// grads.expert_in and grads.expert_out must be absent; every other gradient is written as
// by backward, and the expert rows are the same values backward would write at those ids.
// Uses backward's workspace size.
Status backward_sparse(const Config& cfg, Mode mode, const TensorView& x, const Params& params,
                       const TensorView& expert_ids, const TensorView& grad_y, const Gradients& grads,
                       const SparseExpertGradients& sparse, Workspace ws, void* stream = nullptr);

// Throwing convenience wrapper holding a validated config.
class Layer {
 public:
  explicit Layer(const Config& cfg);  // throws omnimoe::Error on an invalid config
  const Config& config() const { return cfg_; }

  std::size_t forward_workspace_size(std::int64_t tokens, DType dtype, Device device) const;
  std::size_t forward_workspace_size(std::int64_t tokens, DType dtype, Device device, DType ids) const;
  std::size_t backward_workspace_size(std::int64_t tokens, DType dtype, Device device) const;
  void forward(Mode mode, const TensorView& x, const Params& params, const ForwardOutputs& out,
               Workspace ws, void* stream = nullptr) const;
  void backward(Mode mode, const TensorView& x, const Params& params, const TensorView& expert_ids,
                const TensorView& grad_y, const Gradients& grads, Workspace ws,
                void* stream = nullptr) const;

 private:
  Config cfg_;
};

}  // namespace omnimoe
