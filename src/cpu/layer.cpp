// placeholder until the CPU backend lands
#include "core/backend.hpp"
namespace omnimoe::cpu {
std::size_t forward_workspace_size(const Config&, std::int64_t, DType) { return 0; }
std::size_t backward_workspace_size(const Config&, std::int64_t, DType) { return 0; }
Status forward(const Config&, Mode, const TensorView&, const Params&, const ForwardOutputs&, Workspace) {
  return {StatusCode::unsupported, "cpu backend not built yet"};
}
Status backward(const Config&, Mode, const TensorView&, const Params&, const TensorView&, const TensorView&,
                const Gradients&, Workspace) {
  return {StatusCode::unsupported, "cpu backend not built yet"};
}
}  // namespace omnimoe::cpu
