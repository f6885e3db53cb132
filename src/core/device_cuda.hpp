// The CUDA half of include/omnimoe/device.hpp, kept behind plain C++ declarations so that
// core/device.cpp needs no CUDA header. Implemented in cuda/device.cu when the CUDA backend
// is built, and by core/device_cuda_stub.cpp otherwise.
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "omnimoe/status.hpp"
#include "omnimoe/tensor.hpp"

namespace omnimoe {

bool cuda_device_present();               // a CUDA device is visible to this process
std::string cuda_device_description();    // "NVIDIA H100 80GB HBM3 (132 SMs)"
Status cuda_device_alloc(std::size_t bytes, void** ptr);
void cuda_device_free(void* ptr);
// At least one side is Device::cuda; synchronous.
Status cuda_copy_bytes(void* dst, Device dst_dev, const void* src, Device src_dev, std::size_t bytes);
Status cuda_fill_bytes(void* dst, int byte, std::size_t bytes);
Status cuda_synchronize();
Status cuda_time_calls(const std::function<Status()>& fn, int warmup, int reps, std::vector<double>* ms);
Status cuda_time_graph_replays(const std::vector<std::function<Status(void*)>>& calls, int warmup, int reps,
                               std::vector<double>* ms);
void cuda_reset_peak_memory();
std::size_t cuda_peak_memory_bytes();

}  // namespace omnimoe
