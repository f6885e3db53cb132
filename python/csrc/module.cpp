// The Python extension module omnimoe._C: importing it registers the omnimoe:: torch ops
// (layer_ops.cpp); the module itself only tells how it was built.
#include <torch/extension.h>

#include "omnimoe/device.hpp"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "omnimoe torch ops (registered as torch.ops.omnimoe.*) and build information";
#ifdef OMNIMOE_TORCH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
  m.def("cuda_available", &omnimoe::cuda_available,
        "True when this build has the CUDA backend and a CUDA device is present");
}
