# tests of pkm, peer: the CPU against an independent naive float64 reference (label cpu), the
# GPU against the CPU float64 forward (label cuda).
omnimoe_add_test(test_baselines_pk LABEL cpu SOURCES test_pk_cpu.cpp)
if(OMNIMOE_HAVE_CUDA)
  omnimoe_add_test(test_baselines_pk_cuda LABEL cuda SOURCES test_pk_cuda.cpp)
endif()
