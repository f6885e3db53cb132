// Stand-ins for the CUDA halves of the coarse layers in builds without a CUDA toolkit.
#include "baselines/coarse.hpp"

namespace omnimoe::baselines {
namespace {
Status no_cuda() {
  return {StatusCode::unsupported, "device cuda: this build of omnimoe has no CUDA backend (no CUDA toolkit was found)"};
}
}  // namespace
Status dense_workspace_size_cuda(const BaselineConfig&, std::int64_t, DType, std::size_t*) { return no_cuda(); }
Status dense_forward_cuda(const ForwardArgs&) { return no_cuda(); }
Status gshard_workspace_size_cuda(const BaselineConfig&, std::int64_t, DType, std::size_t*) { return no_cuda(); }
Status gshard_forward_cuda(const ForwardArgs&) { return no_cuda(); }
}  // namespace omnimoe::baselines
