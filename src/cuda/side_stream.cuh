// A second stream on which part of a stage sequence overlaps the caller's stream, forked
// from it and joined back with events. Under CUDA graph capture the fork pulls the side
// stream into the caller's capture, and it stays in it until that capture ends (the join
// makes the capture complete; it does not release the side stream).
#pragma once

#include <cuda_runtime.h>

#include "cuda/common.cuh"

namespace omnimoe::cuda {

struct SideStream {
  cudaStream_t stream = nullptr;  // non-blocking, highest priority: its work is the shorter chain
  cudaEvent_t fork = nullptr;     // recorded on the caller's stream, waited on by `stream`
  cudaEvent_t join = nullptr;     // recorded on `stream`, waited on by the caller's stream
};

// The side stream of the calling host thread on the current device, created on first use
// and kept for the thread's lifetime. Per thread, so that two threads forking at once never
// wait on each other's events. Creation switches the thread to relaxed capture mode for its
// duration, so a first call made while capturing a graph still succeeds.
Status side_stream_for_current_device(SideStream* out);

// `side.stream` waits for everything issued so far on `main`, and *forked is true; or, while
// the side stream belongs to a capture that `main` is not part of (the thread captured a
// call on another stream and has not ended that capture yet), nothing is issued, *forked is
// false and the caller stays on `main`.
Status fork_side(cudaStream_t main, const SideStream& side, bool* forked);
// `main` waits for everything issued so far on `side.stream`.
Status join_side(cudaStream_t main, const SideStream& side);

// Whether stage sequences may use a side stream (OMNIMOE_OVERLAP=0 turns it off, for
// measuring what the overlap gains; read once).
bool overlap_enabled();

}  // namespace omnimoe::cuda
