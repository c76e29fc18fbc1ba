// The CUDA kernels and the host code that launches them, written against a `launcher` so that the same
// code runs on a GPU (ms_deform_attn_cuda.cu) and under the CPU emulation of tests/cuda_emulation.
//
// A group of lanes (a power of two up to a warp) handles one (batch, query, head); each lane owns vectors of
// kVec channels, loaded 16 bytes at a time. The backward pass reduces the per-sample location and attention
// gradients across the group with warp shuffles, so each is written once without atomics; only the value
// gradient is scattered with (vector, on sm_90+) atomics, in float32 or float64.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include "ms_deform_attn.h"

// float4 atomicAdd exists from sm_90; each device pass of nvcc sees its own __CUDA_ARCH__.
#ifndef DETA_VECTOR_ATOMICS
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define DETA_VECTOR_ATOMICS 1
#else
#define DETA_VECTOR_ATOMICS 0
#endif
#endif

namespace deta_ops {
namespace cuda_kernels {

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

// The channel vectors of a sample's four corners. The loads are unconditional, so that all four are in flight
// at once rather than one per branch: a corner outside the map reads token 0, which always exists, and is
// then zeroed (zero padding, and no Inf * 0 from whatever token 0 holds).
template <typename acc_t, typename scalar_t, int kVec>
__device__ __forceinline__ void load_corners(const scalar_t* __restrict__ value_h, const Corners<acc_t>& c,
                                             int64_t token_stride, int channel, acc_t (&v)[4][kVec]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    load(value_h + (c.token[k] < 0 ? 0 : c.token[k]) * token_stride + channel, v[k]);
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      v[k][j] = c.token[k] < 0 ? acc_t(0) : v[k][j];
    }
  }
}

template <typename acc_t, int kVec>
__device__ __forceinline__ void atomic_add(acc_t* dst, const acc_t (&src)[kVec]) {
  constexpr bool kFloat4 = DETA_VECTOR_ATOMICS && std::is_same_v<acc_t, float> && kVec % 4 == 0;
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

struct Level {
  int32_t height, width, start;
};

// The shapes live on the device, where checking them costs nothing and reading them needs no host
// synchronisation; a level that would read past the end of value stops the kernel (a device-side assert).
__device__ __forceinline__ Level read_level(const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                            int64_t l, int64_t tokens) {
  const int64_t height = shapes[2 * l], width = shapes[2 * l + 1], start = starts[l];
  CUDA_KERNEL_ASSERT_MSG(height >= 0 && width >= 0 && start >= 0 && start + height * width <= tokens,
                         "ms_deform_attn: a level of spatial_shapes / level_start_index does not fit in value");
  return {static_cast<int32_t>(height), static_cast<int32_t>(width), static_cast<int32_t>(start)};
}

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
      const Level level = read_level(shapes, starts, l, s.tokens);
      for (int64_t i = l * s.points; i < (l + 1) * s.points; ++i) {
        Corners<acc_t> c;
        locate(loc[2 * i], loc[2 * i + 1], level.height, level.width, level.start, c);
        const acc_t a = attention[i];
        acc_t v[4][kVec];
        load_corners(value_h, c, token_stride, channel, v);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const acc_t w = a * c.weight[k];
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            acc[j] += w * v[k][j];
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

// At most 85 registers, for 3 blocks per SM: nvcc 13 then keeps the four corner loads in flight with no
// spill in float32 (76 registers on sm_90), where unbounded it took 110 (2 blocks), and 228 for bfloat16 on
// sm_80 (1 block). Chosen from ptxas' counts; not yet timed on a GPU.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads, 3)
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
    const Level level = read_level(shapes, starts, l, s.tokens);
    for (int64_t i = l * s.points; i < (l + 1) * s.points; ++i) {
      Corners<acc_t> c;
      locate(loc[2 * i], loc[2 * i + 1], level.height, level.width, level.start, c);
      const acc_t a = attention[i];
      acc_t d[4] = {0, 0, 0, 0};  // this lane's share of <grad_output, corner k>
      for (int vec = lane; vec < launch.vectors; vec += launch.group_size) {
        const int channel = vec * kVec;
        acc_t go[kVec];
        load(grad_output + group * s.channels + channel, go);
        acc_t v[4][kVec];
        load_corners(value_h, c, token_stride, channel, v);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (c.token[k] < 0) {
            continue;
          }
          acc_t scaled[kVec];
          const acc_t w = a * c.weight[k];
#pragma unroll
          for (int j = 0; j < kVec; ++j) {
            d[k] += go[j] * v[k][j];
            scaled[j] = w * go[j];
          }
          atomic_add(grad_value_h + c.token[k] * token_stride + channel, scaled);
        }
      }
      SampleGrad<acc_t> g = sample_grad(c.weight, c.lh, c.lw, d, a, level.height, level.width);
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

inline bool can_vectorise(int64_t channels, std::initializer_list<const void*> pointers, int vec) {
  bool aligned = channels % vec == 0;
  for (const void* p : pointers) {
    aligned = aligned && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  }
  return aligned;
}

inline Launch make_launch(const Sizes& s, int vec) {
  const int vectors = static_cast<int>(s.channels / vec);
  int group_size = 1;
  while (group_size * 2 <= std::min(vectors, kWarp)) {
    group_size *= 2;
  }
  return {s.batch * s.queries * s.heads, group_size, vectors};
}

inline unsigned blocks(const Launch& launch) {
  const int64_t count = (launch.groups * launch.group_size + kThreads - 1) / kThreads;
  TORCH_CHECK(count <= std::numeric_limits<int32_t>::max(), "ms_deform_attn: ", launch.groups,
              " (batch, query, head) triples need more blocks than one CUDA launch has");
  return static_cast<unsigned>(count);
}

// Calls run(std::integral_constant<int, kVec>, launch) with the widest vector the data allows.
template <typename scalar_t, typename Run>
void with_vector_width(const Sizes& s, std::initializer_list<const void*> pointers, Run&& run) {
  constexpr int wide = kWideVec<scalar_t>;
  if (can_vectorise(s.channels, pointers, wide)) {
    run(std::integral_constant<int, wide>{}, make_launch(s, wide));
  } else {
    run(std::integral_constant<int, 1>{}, make_launch(s, 1));
  }
}

// launcher(kernel, launch, args...) runs `kernel` on blocks(launch) blocks of kThreads threads.
template <typename Launcher>
at::Tensor forward(const Launcher& launcher, const Sizes& s, const at::Tensor& value_in,
                   const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
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
    with_vector_width<scalar_t>(s, {value.const_data_ptr(), output.const_data_ptr()},
                                [&](auto vec, const Launch& launch) {
      launcher(forward_kernel<scalar_t, decltype(vec)::value>, launch, value.const_data_ptr<scalar_t>(),
               shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(), locations.const_data_ptr<acc_t>(),
               weights.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(), s, launch);
    });
  });
  return output;
}

template <typename Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const Launcher& launcher, const Sizes& s,
                                                        const at::Tensor& grad_output_in, const at::Tensor& value_in,
                                                        const at::Tensor& spatial_shapes,
                                                        const at::Tensor& level_start_index,
                                                        const at::Tensor& sampling_locations,
                                                        const at::Tensor& attention_weights) {
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
    with_vector_width<scalar_t>(s, {value.const_data_ptr(), grad_output.const_data_ptr()},
                                [&](auto vec, const Launch& launch) {
      launcher(backward_kernel<scalar_t, decltype(vec)::value>, launch, grad_output.const_data_ptr<scalar_t>(),
               value.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
               locations.const_data_ptr<acc_t>(), weights.const_data_ptr<acc_t>(),
               grad_value.mutable_data_ptr<acc_t>(), grad_locations.mutable_data_ptr<acc_t>(),
               grad_weights.mutable_data_ptr<acc_t>(), s, launch);
    });
  });
  return {grad_value.to(value.scalar_type()), grad_locations.to(sampling_locations.scalar_type()),
          grad_weights.to(attention_weights.scalar_type())};
}

}  // namespace cuda_kernels
}  // namespace deta_ops
