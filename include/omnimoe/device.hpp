// Small device utilities for tools, tests and benchmarks (the layer itself never allocates):
// memory, copies, synchronisation and timing on either backend, with no CUDA header needed.
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "omnimoe/config.hpp"
#include "omnimoe/status.hpp"
#include "omnimoe/tensor.hpp"

namespace omnimoe {

// True when this build has the CUDA backend AND a CUDA device is present.
bool cuda_available();
// "cpu: 2 threads" / "cuda: NVIDIA H100 80GB HBM3 (132 SMs)".
std::string device_description(Device d);

Status device_alloc(Device d, std::size_t bytes, void** ptr);  // CPU: 256-byte aligned host memory
void device_free(Device d, void* ptr);
// Synchronous copy between any two devices (host <-> cuda, cuda <-> cuda, host <-> host).
Status copy_bytes(void* dst, Device dst_dev, const void* src, Device src_dev, std::size_t bytes);
// Fill with a byte pattern (tests poison outputs with 0xFF = NaN for every float dtype).
Status fill_bytes(void* dst, Device d, int byte, std::size_t bytes);
Status synchronize(Device d);

// Milliseconds of each of `reps` calls of fn after `warmup` calls. CUDA: events on the
// default stream around each call; CPU: steady clock.
Status time_calls(Device d, const std::function<Status()>& fn, int warmup, int reps, std::vector<double>* ms);

// Captures each of `calls` (launching on the stream it is given) into a CUDA graph once,
// then times `reps` replays round-robin over them, with events around each replay. This
// leaves out the host's launch cost, as an application replaying a captured layer would.
// CPU: the calls run directly (stream nullptr), timed as time_calls does.
Status time_graph_replays(Device d, const std::vector<std::function<Status(void* stream)>>& calls, int warmup,
                          int reps, std::vector<double>* ms);

// Peak device memory tracking for benchmarks: reset, then read the high-water mark of
// memory in use on the device since the reset (CUDA: sampled through cudaMemGetInfo after
// each timed call; CPU: not tracked, returns 0).
void reset_peak_memory(Device d);
std::size_t peak_memory_bytes(Device d);

}  // namespace omnimoe

namespace omnimoe {
// Measured ceilings for benchmark floors, taken on this device now: a dense matrix-product
// rate (CUDA: bf16 tensor cores through cuBLASLt, 8192^3, random data) and a copy bandwidth
// (bytes read + written by a 2 GiB device-to-device copy). CUDA only; the CPU returns
// unsupported (the benchmark measures its own sgemm and memcpy).
Status measure_ceilings(Device d, double* flops_per_s, double* bytes_per_s);
// The rate of whole-row gathers from L2 (CUDA): 2 KB rows of a 16 MB table (an expert
// chunk's rows at H = 1024 in 16-bit storage) read in random order, a warp per row, two rows
// in flight, one wave of as many warps per SM as fit; bytes of rows read per second. For the cost models of paths that
// read expert rows from L2 (the dense path's sparse output). CUDA only.
Status measure_l2_gather_rate(Device d, double* bytes_per_s);

// The "dense equivalent" of a layer, for benchmark context (CUDA, bf16 or f16): both router
// products, the three shared-MLP products, and (T x H)(H x N), (T x N)(N x H) through
// cuBLASLt on random data; median ms over `reps`. unsupported when its buffers do not fit
// in device memory.
Status time_dense_equivalent(const Config& cfg, std::int64_t tokens, DType dtype, int reps, double* ms);
}  // namespace omnimoe
