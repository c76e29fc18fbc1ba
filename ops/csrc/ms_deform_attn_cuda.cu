// The CUDA registration of deta_ops: the kernels and their host code are in ms_deform_attn_cuda_kernels.cuh.
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ms_deform_attn_cuda_kernels.cuh"

namespace deta_ops {
namespace {

struct CudaLauncher {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), const cuda_kernels::Launch& launch, Args... args) const {
    kernel<<<cuda_kernels::blocks(launch), cuda_kernels::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  return cuda_kernels::forward(CudaLauncher{}, s, value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output, const at::Tensor& value,
                                                             const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights) {
  const Sizes s = check_backward_inputs(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  // Float atomics add the value gradient in a run-dependent order.
  at::globalContext().alertNotDeterministic("deta_ops::ms_deform_attn_backward (CUDA)");
  return cuda_kernels::backward(CudaLauncher{}, s, grad_output, value, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights);
}

}  // namespace

TORCH_LIBRARY_IMPL(deta_ops, CUDA, m) {
  m.impl("ms_deform_attn", &forward_cuda);
  m.impl("ms_deform_attn_backward", &backward_cuda);
}

}  // namespace deta_ops
