# Dispatch (baselines.cpp) and the coarse layers: dense, gshard, deepseekmoe (see sources.cmake).
list(APPEND OMNIMOE_BASELINE_SOURCES
  baselines/baselines.cpp
  baselines/dense.cpp
  baselines/gshard.cpp
)
list(APPEND OMNIMOE_BASELINE_CUDA_SOURCES
  baselines/dense.cu
  baselines/gshard.cu
  baselines/gshard_route.cu
  baselines/gshard_schedule.cu
  baselines/grouped_gemm.cu
  baselines/gshard_combine.cu
)
list(APPEND OMNIMOE_BASELINE_CUDA_STUBS
  baselines/coarse_cuda_stub.cpp
)
