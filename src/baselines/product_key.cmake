# pkm, peer (see sources.cmake): CPU reference and backend switch in pkm.cpp, CUDA in pkm.cu.
list(APPEND OMNIMOE_BASELINE_SOURCES
  baselines/pkm.cpp
)
list(APPEND OMNIMOE_BASELINE_CUDA_SOURCES
  baselines/pkm.cu
)
list(APPEND OMNIMOE_BASELINE_CUDA_STUBS
  baselines/pkm_cuda_stub.cpp
)
