# Tests of dispatch, dense, gshard, deepseekmoe: the CPU reference against a naive float64
# implementation plus the argument errors of every kind (label cpu), and the CUDA forward
# against the CPU float64 reference (label cuda, needs a GPU).
omnimoe_add_test(test_baselines_coarse LABEL cpu SOURCES test_coarse_cpu.cpp)
if(OMNIMOE_HAVE_CUDA)
  omnimoe_add_test(test_baselines_coarse_cuda LABEL cuda SOURCES test_coarse_cuda.cpp)
endif()

# The paper suite end to end on the CPU, every layer at the smallest T (a few seconds): a
# point that fails prints FAILED.
add_test(NAME bench_paper_cpu_smoke
         COMMAND omnimoe bench --suite paper --device cpu --reps 1 --only -t256
                 --csv ${CMAKE_CURRENT_BINARY_DIR}/bench_paper_cpu_smoke.csv)
set_tests_properties(bench_paper_cpu_smoke PROPERTIES LABELS cpu FAIL_REGULAR_EXPRESSION "FAILED" TIMEOUT 120)
