// Everything one layer call needs, owned: parameters, running statistics, inputs, outputs,
// gradients and workspace, on one device in one dtype. Built either at random (check,
// bench) or from a file (run). Tensor names are the safetensors names of the README.
#pragma once

#include <array>
#include <cstdint>
#include <string_view>
#include <vector>

#include "omnimoe/layer.hpp"
#include "tensors.hpp"

namespace omnimoe::tool {

struct LayerTensors {
  Config cfg;
  DType dtype = DType::f32;  // layer dtype; running statistics use accumulation_dtype(dtype)
  Device device = Device::cpu;
  std::int64_t tokens = 0;
  Tensor router_row, router_col, expert_in, expert_out, gate, up, down;
  Tensor running_mean_row, running_var_row, running_mean_col, running_var_col;
  std::vector<Tensor> x;  // one or more input sets [T, H] (benchmarks rotate through them)
  Tensor grad_y;          // [T, H]; absent unless asked for

  Params params() const;
};

// Every parameter and running statistic by name (absent ones included): for loops over
// "each parameter" (file I/O, finite differences) without listing the members again.
struct LayerMember {
  const char* name;
  Tensor LayerTensors::*tensor;
  bool is_statistic;  // stored in the accumulation dtype
};
inline constexpr std::array<LayerMember, 11> kLayerMembers{{
    {"router_row", &LayerTensors::router_row, false},
    {"router_col", &LayerTensors::router_col, false},
    {"expert_in", &LayerTensors::expert_in, false},
    {"expert_out", &LayerTensors::expert_out, false},
    {"gate", &LayerTensors::gate, false},
    {"up", &LayerTensors::up, false},
    {"down", &LayerTensors::down, false},
    {"running_mean_row", &LayerTensors::running_mean_row, true},
    {"running_var_row", &LayerTensors::running_var_row, true},
    {"running_mean_col", &LayerTensors::running_mean_col, true},
    {"running_var_col", &LayerTensors::running_var_col, true},
}};

// Random parameters and inputs (uniform, scaled so activations stay O(1); see .cpp).
LayerTensors random_layer(const Config& cfg, std::int64_t tokens, DType dtype, Device device, std::uint64_t seed,
                          int input_sets = 1, bool with_grad_y = false);
// The same layer in another dtype or on another device (values rounded to the new dtype).
LayerTensors convert_layer(const LayerTensors& l, DType dtype, Device device);

// Tensor `name` of the layer: "x" (input set 0) or a kLayerMembers name.
Tensor& layer_tensor(LayerTensors& l, std::string_view name);

struct ForwardBuffers {
  Tensor y, expert_ids, scores, gates;
  ForwardOutputs outputs() const { return {y.view(), expert_ids.view(), scores.view(), gates.view()}; }
};
ForwardBuffers forward_buffers(const LayerTensors& l, DType id_dtype = DType::i64);

struct GradientBuffers {
  Tensor x, router_row, router_col, expert_in, expert_out, gate, up, down;
  Gradients gradients() const;
};

// Each gradient under the name of what it is the gradient of ("x", "router_row", ...).
struct GradientMember {
  const char* name;
  Tensor GradientBuffers::*tensor;
};
inline constexpr std::array<GradientMember, 8> kGradientMembers{{
    {"x", &GradientBuffers::x},
    {"router_row", &GradientBuffers::router_row},
    {"router_col", &GradientBuffers::router_col},
    {"expert_in", &GradientBuffers::expert_in},
    {"expert_out", &GradientBuffers::expert_out},
    {"gate", &GradientBuffers::gate},
    {"up", &GradientBuffers::up},
    {"down", &GradientBuffers::down},
}};
GradientBuffers gradient_buffers(const LayerTensors& l);

// Workspace for forward (with out.expert_ids of dtype `ids`; i64 is enough for either and
// for forward_routed), and for backward too when `backward` is set.
Buffer workspace(const LayerTensors& l, bool backward, DType ids = DType::i64);
inline Workspace as_workspace(const Buffer& b) { return {b.data(), b.bytes()}; }

}  // namespace omnimoe::tool
