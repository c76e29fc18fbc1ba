// ops/csrc's CUDA kernels and their host code, compiled for the CPU against cuda_emulation.h: the forward and
// backward entry points of ms_deform_attn_cuda.cu, with the emulated launch in place of <<<...>>>, and a
// warp reduction that tests the emulation's shuffles.
#include <torch/extension.h>

#include "cuda_emulation.h"
#include "ms_deform_attn_cuda_kernels.cuh"

namespace {

using deta_ops::cuda_kernels::Launch;

struct EmulatedLauncher {
  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), const Launch& launch, Args... args) const {
    cuda_emulation::launch(deta_ops::cuda_kernels::blocks(launch), deta_ops::cuda_kernels::kThreads, kernel,
                           args...);
  }
};

at::Tensor forward(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const deta_ops::Sizes s =
      deta_ops::check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  return deta_ops::cuda_kernels::forward(EmulatedLauncher{}, s, value, spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& value,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights) {
  const deta_ops::Sizes s = deta_ops::check_backward_inputs(grad_output, value, spatial_shapes, level_start_index,
                                                            sampling_locations, attention_weights);
  return deta_ops::cuda_kernels::backward(EmulatedLauncher{}, s, grad_output, value, spatial_shapes,
                                          level_start_index, sampling_locations, attention_weights);
}

__global__ void warp_sum_kernel(float* values, unsigned mask, int width) {
  float sum = values[threadIdx.x];
  for (int offset = width / 2; offset > 0; offset /= 2) {
    sum += __shfl_xor_sync(mask, sum, offset, width);
  }
  values[threadIdx.x] = sum;
}

// One warp; each lane ends with the sum over its segment of `width` lanes.
at::Tensor warp_sum(const at::Tensor& values, int64_t mask, int64_t width) {
  TORCH_CHECK(values.numel() == cuda_emulation::kWarpSize, "warp_sum takes one value per lane");
  at::Tensor sums = values.to(at::kFloat).contiguous().clone();
  cuda_emulation::launch(1, cuda_emulation::kWarpSize, warp_sum_kernel, sums.mutable_data_ptr<float>(),
                         static_cast<unsigned>(mask), static_cast<int>(width));
  return sums;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
  m.def("warp_sum", &warp_sum);
}
