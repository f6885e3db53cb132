# CUDA backend sources (added to omnimoe_lib when a CUDA toolkit is found).
set(OMNIMOE_CUDA_SOURCES
  cuda/ceilings.cu
  cuda/device.cu
  cuda/experts.cu
  cuda/experts_backward.cu
  cuda/experts_backward_dense.cu
  cuda/experts_dense.cu
  cuda/experts_dense_scores.cu
  cuda/gemm.cu
  cuda/layer.cu
  cuda/layer_backward.cu
  cuda/route.cu
  cuda/route_backward.cu
  cuda/schedule.cu
  cuda/shared_mlp.cu
  cuda/side_stream.cu
)
