// The paper's baseline feed-forward layers (DESIGN.md section 3) behind the same contract
// as the OmniMoE layer: a config, a workspace size query, and a forward that returns a
// Status, takes caller-owned buffers and an explicit stream, never allocates and never
// synchronises with the host. CPU (f64/f32 compute, f16/bf16 storage) and CUDA (f32, bf16,
// f16 storage, fp32 accumulation) backends; the device is that of `x`.
//
// The five layers (x [T, H] -> y [T, H]; SwiGLU(x; G, U, D) = D (silu(G x) * (U x))):
//   dense       y = SwiGLU(x; gate, up, down), width `width`.
//   gshard      logits = router x [N]; p = softmax(logits); the top-K experts by p (ties:
//               smaller id first); g_k = p_k / sum of the K chosen p; y = sum_k g_k *
//               SwiGLU_e(x), expert e of width `width`.
//   deepseekmoe as gshard but the gates are the softmax values themselves (no
//               renormalisation over the K chosen), plus an always-on shared SwiGLU of
//               width `shared_width`.
//   pkm         q = query x [H]; q1 = q[0:H/2], q2 = q[H/2:H]; s1 = keys_row q1 [Nr],
//               s2 = keys_col q2 [Nc]; the exact top-K of s1[i] + s2[j] over the Nr x Nc
//               grid (e = i * Nc + j; ties: smaller e first); w = softmax over the K
//               scores; y = sum_k w_k * values[e_k].
//   peer        retrieval as pkm; y = sum_k w_k * gelu(expert_in[e_k] . x) * expert_out[e_k]
//               (exact erf GELU), single-neuron experts.
// Single head, no query batchnorm (the paper's efficiency table times one head).
#pragma once

#include <cstdint>

#include "omnimoe/layer.hpp"

namespace omnimoe::baselines {

enum class Kind : std::uint8_t { dense, gshard, deepseekmoe, pkm, peer };
const char* name(Kind k);  // "dense", "gshard", ...

struct BaselineConfig {
  Kind kind = Kind::dense;
  std::int64_t hidden = 0;        // H
  std::int64_t width = 0;         // dense: I; gshard / deepseekmoe: expert width d_ffn; pkm / peer: unused (0)
  std::int64_t num_experts = 0;   // gshard / deepseekmoe: N; pkm / peer: N = grid_rows * grid_cols; dense: 0
  std::int64_t grid_rows = 0;     // pkm / peer: Nr sub-keys of the first half-query; else 0
  std::int64_t grid_cols = 0;     // pkm / peer: Nc sub-keys of the second half-query; else 0
  std::int64_t top_k = 0;         // K experts (value rows) per token; dense: 0
  std::int64_t shared_width = 0;  // deepseekmoe: width of the shared SwiGLU expert; else 0

  // Parameters a token touches (multiply-accumulated weights), counted the same way for
  // every layer including OmniMoE's (docs/benchmarks.md): router / query / key weights read
  // for every token, plus the chosen experts' weights, plus shared weights.
  double activated_params() const;
  double total_params() const;
};

Status validate(const BaselineConfig& c);

// Parameters; a field a kind does not use stays undefined (data == nullptr). Multi-expert
// tensors are stacked along the rows: expert e of gshard owns rows [e*width, (e+1)*width)
// of expert_gate / expert_up and rows [e*H, (e+1)*H) of expert_down.
struct BaselineParams {
  TensorView gate;          // dense [I, H]; deepseekmoe shared expert [shared_width, H]
  TensorView up;            // dense [I, H]; deepseekmoe shared expert [shared_width, H]
  TensorView down;          // dense [H, I]; deepseekmoe shared expert [H, shared_width]
  TensorView router;        // gshard / deepseekmoe [N, H]
  TensorView expert_gate;   // gshard / deepseekmoe [N * width, H]
  TensorView expert_up;     // gshard / deepseekmoe [N * width, H]
  TensorView expert_down;   // gshard / deepseekmoe [N * H, width]
  TensorView query;         // pkm / peer [H, H]
  TensorView keys_row;      // pkm / peer [Nr, H / 2]
  TensorView keys_col;      // pkm / peer [Nc, H / 2]
  TensorView values;        // pkm [N, H]
  TensorView expert_in;     // peer [N, H]
  TensorView expert_out;    // peer [N, H]
};

// Workspace bytes for a forward over `tokens` tokens of `dtype` on `device`.
Status workspace_size(const BaselineConfig& cfg, std::int64_t tokens, DType dtype, Device device,
                      std::size_t* bytes);

// y [T, H] = layer(x [T, H]). All tensors share x's dtype and device. expert_ids [T, K]
// (i32, optional) receives the chosen experts of the routed kinds, in descending score order.
Status forward(const BaselineConfig& cfg, const TensorView& x, const BaselineParams& params, const TensorView& y,
               Workspace ws, void* stream = nullptr, const TensorView& expert_ids = {});

// The same forward with the routing given (uniform random ids in the benchmark's "random
// ids" series): expert_ids [T, K] i32, gates [T, K] f32 used as given. Dense refuses.
Status forward_routed(const BaselineConfig& cfg, const TensorView& x, const BaselineParams& params,
                      const TensorView& expert_ids, const TensorView& gates, const TensorView& y, Workspace ws,
                      void* stream = nullptr);

}  // namespace omnimoe::baselines
