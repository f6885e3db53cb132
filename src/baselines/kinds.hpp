// Per-kind entry points behind include/omnimoe/baselines.hpp. baselines.cpp validates the
// config and the tensors (shapes, dtypes, devices, workspace size) and then calls these;
// each kind's files handle both backends (CPU in <kind>.cpp, CUDA in <kind>.cu, and a stub
// in <kind>_cuda_stub.cpp for builds without CUDA, as src/core/cuda_stub.cpp does).
#pragma once

#include "omnimoe/baselines.hpp"

namespace omnimoe::baselines {

// Everything a forward needs. `ids_in` / `gates_in` are defined for forward_routed (then the
// kind skips its router and uses them); `ids_out` is the optional expert_ids output of forward.
struct ForwardArgs {
  const BaselineConfig* cfg;  // validated
  TensorView x;               // [T, H]
  const BaselineParams* p;    // validated for cfg.kind
  TensorView ids_in;          // [T, K] i32 or undefined
  TensorView gates_in;        // [T, K] f32 or undefined
  TensorView ids_out;         // [T, K] i32 or undefined
  TensorView y;               // [T, H]
  Workspace ws;               // at least workspace_size bytes
  void* stream;               // cudaStream_t on CUDA
};

// One pair per kind: the workspace bytes and the forward, for x's device.
Status dense_workspace_size(const BaselineConfig& c, std::int64_t tokens, DType dtype, Device d, std::size_t* bytes);
Status dense_forward(const ForwardArgs& a);
Status gshard_workspace_size(const BaselineConfig& c, std::int64_t tokens, DType dtype, Device d, std::size_t* bytes);
Status gshard_forward(const ForwardArgs& a);  // gshard and deepseekmoe (cfg.kind tells the gates)
Status pkm_workspace_size(const BaselineConfig& c, std::int64_t tokens, DType dtype, Device d, std::size_t* bytes);
Status pkm_forward(const ForwardArgs& a);  // pkm and peer (cfg.kind tells the output)

}  // namespace omnimoe::baselines
