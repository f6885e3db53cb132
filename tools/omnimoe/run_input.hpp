// `omnimoe run` input: the layer config from a safetensors file's __metadata__ and its
// tensors checked against it, with messages that name the file's tensors and keys.
#pragma once

#include <map>
#include <string>

#include "io/safetensors.hpp"
#include "layer_tensors.hpp"

namespace omnimoe::tool {

struct RunInput {
  LayerTensors layer;                      // staged on the run's device in the layer dtype
  std::map<std::string, DType> file_dtype;  // each staged tensor's dtype in the file
};

// Throws omnimoe::Error naming the problem (missing tensor, wrong shape or dtype, bad
// metadata) before anything runs.
RunInput load_run_input(io::StFile& file, Device device, Mode mode, bool backward);

// Safetensors dtype spelling ("F32", "BF16", "I64").
std::string st_dtype_name(DType d);

}  // namespace omnimoe::tool
