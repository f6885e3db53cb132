# Baseline layer sources. Each family keeps its own list file so the families can grow
# apart: coarse.cmake (dispatch, dense, gshard, deepseekmoe) and product_key.cmake (pkm, peer).
# Each list file appends to:
#   OMNIMOE_BASELINE_SOURCES       C++ sources, always built
#   OMNIMOE_BASELINE_CUDA_SOURCES  .cu sources, built with the CUDA backend
#   OMNIMOE_BASELINE_CUDA_STUBS    .cpp stubs that stand in for the .cu files without CUDA
set(OMNIMOE_BASELINE_SOURCES "")
set(OMNIMOE_BASELINE_CUDA_SOURCES "")
set(OMNIMOE_BASELINE_CUDA_STUBS "")
if(OMNIMOE_BASELINES)
  include(${CMAKE_CURRENT_LIST_DIR}/coarse.cmake)
  include(${CMAKE_CURRENT_LIST_DIR}/product_key.cmake)
endif()
