// CUDA kernels. A group of lanes (a power of two up to a warp) handles one (batch, query, head); each lane
// owns vectors of kVec channels, loaded 16 bytes at a time. The backward pass reduces the per-sample
// location and attention gradients across the group with warp shuffles, so each is written once without
// atomics; only the value gradient is scattered with (vector, on sm_90+) atomics, in float32 or float64.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "ms_deform_attn.h"

namespace deta_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Vec {
  scalar_t v[kVec];
};

template <typename acc_t, typename scalar_t, int kVec>
__device__ __forceinline__ void load(const scalar_t* __restrict__ src, acc_t (&dst)[kVec]) {
  const Vec<scalar_t, kVec> packed = *reinterpret_cast<const Vec<scalar_t, kVec>*>(src);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    dst[j] = static_cast<acc_t>(packed.v[j]);
  }
}

template <typename acc_t, int kVec>
__device__ __forceinline__ void atomic_add(acc_t* dst, const acc_t (&src)[kVec]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kFloat4 = std::is_same_v<acc_t, float> && kVec % 4 == 0;
#else
  constexpr bool kFloat4 = false;  // vector atomics need sm_90
#endif
  if constexpr (kFloat4) {
#pragma unroll
    for (int j = 0; j < kVec; j += 4) {
      atomicAdd(reinterpret_cast<float4*>(dst + j), make_float4(src[j], src[j + 1], src[j + 2], src[j + 3]));
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      atomicAdd(dst + j, src[j]);
    }
  }
}

struct Launch {
  int64_t groups;    // batch * queries * heads
  int group_size;    // lanes per group, a power of two <= kWarp
  int vectors;       // channels / kVec
};

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const at::opmath_type<scalar_t>* __restrict__ locations,
                   const at::opmath_type<scalar_t>* __restrict__ weights, scalar_t* __restrict__ output, Sizes s,
                   Launch launch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = thread / launch.group_size;
  const int lane = static_cast<int>(thread % launch.group_size);
  if (group >= launch.groups) {
    return;
  }
  const int64_t b = group / s.heads / s.queries;
  const int64_t h = group % s.heads;
  const int64_t token_stride = s.heads * s.channels;
  const scalar_t* value_h = value + b * s.tokens * token_stride + h * s.channels;
  const int64_t samples = s.levels * s.points;
  const acc_t* loc = locations + group * samples * 2;
  const acc_t* attention = weights + group * samples;

  for (int vec = lane; vec < launch.vectors; vec += launch.group_size) {
    const int channel = vec * kVec;
    acc_t acc[kVec] = {};
    for (int64_t l = 0; l < s.levels; ++l) {
      const int32_t height = static_cast<int32_t>(shapes[2 * l]), width = static_cast<int32_t>(shapes[2 * l + 1]);
      const int32_t start = static_cast<int32_t>(starts[l]);
      for (int64_t i = l * s.points; i < (l + 1) * s.points; ++i) {
        Corners<acc_t> c;
        locate(loc[2 * i], loc[2 * i + 1], height, width, start, c);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (c.token[k] < 0) {
            continue;
          }
          acc_t v[kVec];
          load(value_h + c.token[k] * token_stride + channel, v);
          const acc_t w = attention[i] * c.weight[k];
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            acc[j] += w * v[j];
          }
        }
      }
    }
    Vec<scalar_t, kVec> out;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      out.v[j] = static_cast<scalar_t>(acc[j]);
    }
    *reinterpret_cast<Vec<scalar_t, kVec>*>(output + group * s.channels + channel) = out;
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                    const at::opmath_type<scalar_t>* __restrict__ locations,
                    const at::opmath_type<scalar_t>* __restrict__ weights,
                    at::opmath_type<scalar_t>* __restrict__ grad_value,
                    at::opmath_type<scalar_t>* __restrict__ grad_loc,
                    at::opmath_type<scalar_t>* __restrict__ grad_weight, Sizes s, Launch launch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = thread / launch.group_size;
  const int lane = static_cast<int>(thread % launch.group_size);
  if (group >= launch.groups) {
    return;  // whole groups leave together, so the shuffles below always see their full group
  }
  // Groups are aligned to group_size within the warp because blockDim is a multiple of kWarp.
  const unsigned group_mask = launch.group_size == kWarp
                                  ? 0xffffffffu
                                  : ((1u << launch.group_size) - 1u) << (threadIdx.x % kWarp / launch.group_size *
                                                                        launch.group_size);
  const int64_t b = group / s.heads / s.queries;
  const int64_t h = group % s.heads;
  const int64_t token_stride = s.heads * s.channels;
  const int64_t head_offset = b * s.tokens * token_stride + h * s.channels;
  const scalar_t* value_h = value + head_offset;
  acc_t* grad_value_h = grad_value + head_offset;
  const int64_t samples = s.levels * s.points;
  const acc_t* loc = locations + group * samples * 2;
  const acc_t* attention = weights + group * samples;

  for (int64_t l = 0; l < s.levels; ++l) {
    const int32_t height = static_cast<int32_t>(shapes[2 * l]), width = static_cast<int32_t>(shapes[2 * l + 1]);
    const int32_t start = static_cast<int32_t>(starts[l]);
    for (int64_t i = l * s.points; i < (l + 1) * s.points; ++i) {
      Corners<acc_t> c;
      locate(loc[2 * i], loc[2 * i + 1], height, width, start, c);
      const acc_t a = attention[i];
      acc_t d[4] = {0, 0, 0, 0};  // this lane's share of <grad_output, corner k>
      for (int vec = lane; vec < launch.vectors; vec += launch.group_size) {
        const int channel = vec * kVec;
        acc_t go[kVec];
        load(grad_output + group * s.channels + channel, go);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (c.token[k] < 0) {
            continue;
          }
          const int64_t offset = c.token[k] * token_stride + channel;
          acc_t v[kVec];
          load(value_h + offset, v);
          acc_t scaled[kVec];
          const acc_t w = a * c.weight[k];
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            d[k] += go[j] * v[j];
            scaled[j] = w * go[j];
          }
          atomic_add(grad_value_h + offset, scaled);
        }
      }
      SampleGrad<acc_t> g = sample_grad(c.weight, c.lh, c.lw, d, a, height, width);
      for (int offset = launch.group_size / 2; offset > 0; offset /= 2) {
        g.weight += __shfl_xor_sync(group_mask, g.weight, offset, launch.group_size);
        g.x += __shfl_xor_sync(group_mask, g.x, offset, launch.group_size);
        g.y += __shfl_xor_sync(group_mask, g.y, offset, launch.group_size);
      }
      if (lane == 0) {
        grad_weight[group * samples + i] = g.weight;
        grad_loc[(group * samples + i) * 2] = g.x;
        grad_loc[(group * samples + i) * 2 + 1] = g.y;
      }
    }
  }
}

// 16-byte vectors when the channels and pointers allow it, else one element per lane.
template <typename scalar_t>
constexpr int kWideVec = 16 / sizeof(scalar_t);

bool can_vectorise(int64_t channels, std::initializer_list<const void*> pointers, int vec) {
  bool aligned = channels % vec == 0;
  for (const void* p : pointers) {
    aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  }
  return aligned;
}

Launch make_launch(const Sizes& s, int vec) {
  const int vectors = static_cast<int>(s.channels / vec);
  int group_size = 1;
  while (group_size * 2 <= std::min(vectors, kWarp)) {
    group_size *= 2;
  }
  return {s.batch * s.queries * s.heads, group_size, vectors};
}

unsigned blocks(const Launch& launch) {
  return static_cast<unsigned>((launch.groups * launch.group_size + kThreads - 1) / kThreads);
}

at::Tensor forward_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value_in, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value_in.device());
  // Level shapes are read inside the kernels: copying them to the host would synchronise every call.
  const at::Tensor shapes = spatial_shapes.to(value_in.device(), at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(value_in.device(), at::kLong).contiguous();
  const at::Tensor value = value_in.contiguous();
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  if (s.tokens == 0) {
    return output.zero_();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor locations = sampling_locations.to(acc_type).contiguous();
    const at::Tensor weights = attention_weights.to(acc_type).contiguous();
    const auto stream = c10::cuda::getCurrentCUDAStream();
    constexpr int wide = kWideVec<scalar_t>;
    if (can_vectorise(s.channels, {value.const_data_ptr(), output.const_data_ptr()}, wide)) {
      const Launch launch = make_launch(s, wide);
      forward_kernel<scalar_t, wide><<<blocks(launch), kThreads, 0, stream>>>(
          value.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
          locations.const_data_ptr<acc_t>(), weights.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(),
          s, launch);
    } else {
      const Launch launch = make_launch(s, 1);
      forward_kernel<scalar_t, 1><<<blocks(launch), kThreads, 0, stream>>>(
          value.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
          locations.const_data_ptr<acc_t>(), weights.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(),
          s, launch);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output_in,
                                                             const at::Tensor& value_in,
                                                             const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights) {
  const Sizes s = check_backward_inputs(grad_output_in, value_in, spatial_shapes, level_start_index,
                                        sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor shapes = spatial_shapes.to(value_in.device(), at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(value_in.device(), at::kLong).contiguous();
  const at::Tensor value = value_in.contiguous();
  const at::Tensor grad_output = grad_output_in.to(value.scalar_type()).contiguous();
  at::Tensor grad_value, grad_locations, grad_weights;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor locations = sampling_locations.to(acc_type).contiguous();
    const at::Tensor weights = attention_weights.to(acc_type).contiguous();
    // Half-precision atomics would round every one of the many additions; accumulate in acc_t.
    grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
    grad_locations = at::empty(locations.sizes(), locations.options());
    grad_weights = at::empty(weights.sizes(), weights.options());
    if (grad_weights.numel() == 0 || s.channels == 0 || s.tokens == 0) {
      grad_locations.zero_();
      grad_weights.zero_();
      return;
    }
    const auto stream = c10::cuda::getCurrentCUDAStream();
    constexpr int wide = kWideVec<scalar_t>;
    if (can_vectorise(s.channels, {value.const_data_ptr(), grad_output.const_data_ptr()}, wide)) {
      const Launch launch = make_launch(s, wide);
      backward_kernel<scalar_t, wide><<<blocks(launch), kThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
          shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(), locations.const_data_ptr<acc_t>(),
          weights.const_data_ptr<acc_t>(), grad_value.mutable_data_ptr<acc_t>(),
          grad_locations.mutable_data_ptr<acc_t>(), grad_weights.mutable_data_ptr<acc_t>(), s, launch);
    } else {
      const Launch launch = make_launch(s, 1);
      backward_kernel<scalar_t, 1><<<blocks(launch), kThreads, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), value.const_data_ptr<scalar_t>(),
          shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(), locations.const_data_ptr<acc_t>(),
          weights.const_data_ptr<acc_t>(), grad_value.mutable_data_ptr<acc_t>(),
          grad_locations.mutable_data_ptr<acc_t>(), grad_weights.mutable_data_ptr<acc_t>(), s, launch);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_value.to(value.scalar_type()), grad_locations.to(sampling_locations.scalar_type()),
          grad_weights.to(attention_weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(deta_ops, CUDA, m) {
  m.impl("ms_deform_attn", &forward_cuda);
  m.impl("ms_deform_attn_backward", &backward_cuda);
}

}  // namespace deta_ops
