// Shared by the CPU and CUDA kernels: input validation and the bilinear sampling geometry.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

namespace deta_ops {

struct Sizes {
  int64_t batch, tokens, heads, channels, queries, levels, points;
};

// Checks ranks, sizes and dtypes against value (B, S, heads, C); every implementation calls it first.
inline Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                          const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "value must be (batch, tokens, heads, channels), got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "sampling_locations must be (batch, queries, heads, levels, points, 2), got ",
              sampling_locations.sizes());
  const Sizes s{value.size(0), value.size(1), value.size(2), value.size(3),
                sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == s.batch && sampling_locations.size(2) == s.heads,
              "sampling_locations ", sampling_locations.sizes(), " does not match value ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "attention_weights must be ", sampling_locations.sizes().slice(0, 5), ", got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == s.levels && spatial_shapes.size(1) == 2,
              "spatial_shapes must be (", s.levels, ", 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == s.levels,
              "level_start_index must be (", s.levels, ",), got ", level_start_index.sizes());
  TORCH_CHECK(value.is_floating_point() && sampling_locations.is_floating_point() &&
                  attention_weights.is_floating_point(),
              "value, sampling_locations and attention_weights must be floating point");
  TORCH_CHECK(!spatial_shapes.is_floating_point() && !level_start_index.is_floating_point(),
              "spatial_shapes and level_start_index must be integer tensors");
  TORCH_CHECK(sampling_locations.device() == value.device() && attention_weights.device() == value.device(),
              "value, sampling_locations and attention_weights must be on one device");
  // Token indices are 32-bit in the kernels: a single image would need 2^31 feature-map pixels to overflow.
  TORCH_CHECK(s.tokens < (int64_t{1} << 31), "value has ", s.tokens, " tokens, more than the kernels index");
  return s;
}

// check_inputs for a backward pass, plus grad_output's size: (B, Q, heads * C) in any layout.
inline Sizes check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& value,
                                   const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.numel() == s.batch * s.queries * s.heads * s.channels, "grad_output must have ",
              s.batch * s.queries * s.heads * s.channels, " elements, got ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == value.device(), "grad_output is on ", grad_output.device(), ", value on ",
              value.device());
  return s;
}

// One bilinear sample: the token index (within one batch element) of each of its four corners
// (top-left, top-right, bottom-left, bottom-right), -1 for corners outside the map, and their weights.
template <typename acc_t>
struct Corners {
  int32_t token[4];
  acc_t weight[4];
  acc_t lh, lw;  // fractional position inside the cell, needed by the location gradient
};

// floor for values well inside the int32 range. std::floor does not vectorise under GCC's default
// -ftrapping-math; truncation plus a correction does, and is exact.
template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE int32_t floor_int(acc_t x) {
  const int32_t truncated = static_cast<int32_t>(x);
  return truncated - static_cast<int32_t>(x < static_cast<acc_t>(truncated));
}

// token if valid, else -1.
C10_HOST_DEVICE C10_ALWAYS_INLINE int32_t select_token(bool valid, int32_t token) {
  const int32_t mask = -static_cast<int32_t>(valid);
  return (token & mask) | ~mask;
}

// Pixel coordinate = location * size - 0.5 (grid_sample, align_corners=False). A sample with no corner
// inside the map (NaN included, which fails every comparison) gets four -1 tokens. The lower bound is
// inclusive so that a sample exactly one pixel outside still gets grid_sample's one-sided location
// gradient. Selections are written as arithmetic and masks: GCC turns ternaries into branches here,
// and the CPU kernels need this loop vectorised across samples.
template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE void locate(acc_t x, acc_t y, int32_t height, int32_t width, int32_t start,
                                              Corners<acc_t>& c) {
  const acc_t h_im = y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  const acc_t w_im = x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  const bool inside = (h_im >= -1) & (w_im >= -1) & (h_im < static_cast<acc_t>(height)) &
                      (w_im < static_cast<acc_t>(width));
  // Clamped (NaN to -1) so that the integer conversion stays in range; unused when outside.
  const acc_t h_c = std::min(std::max(acc_t(-1), h_im), static_cast<acc_t>(height));
  const acc_t w_c = std::min(std::max(acc_t(-1), w_im), static_cast<acc_t>(width));
  const int32_t y0 = floor_int(h_c);
  const int32_t x0 = floor_int(w_c);
  const acc_t in = static_cast<acc_t>(static_cast<int32_t>(inside));  // bool -> float does not vectorise
  c.lh = (h_c - static_cast<acc_t>(y0)) * in;
  c.lw = (w_c - static_cast<acc_t>(x0)) * in;
  const acc_t hh = 1 - c.lh;
  const acc_t hw = 1 - c.lw;
  const bool top = inside & (y0 >= 0), bottom = inside & (y0 + 1 < height);
  const bool left = x0 >= 0, right = x0 + 1 < width;
  const int32_t top_left = start + y0 * width + x0;
  c.token[0] = select_token(top & left, top_left);
  c.token[1] = select_token(top & right, top_left + 1);
  c.token[2] = select_token(bottom & left, top_left + width);
  c.token[3] = select_token(bottom & right, top_left + width + 1);
  c.weight[0] = hh * hw;
  c.weight[1] = hh * c.lw;
  c.weight[2] = c.lh * hw;
  c.weight[3] = c.lh * c.lw;
}

// Gradients of one sample (attention weight, x, y) from its bilinear weights and position in the cell and
// the dot products d[k] = <grad_output, corner k> (0 for corners outside the map); the location terms
// differentiate the four bilinear weights. Linear in d, so partial sums of d give partial gradients.
template <typename acc_t>
struct SampleGrad {
  acc_t weight, x, y;
};

template <typename acc_t>
C10_HOST_DEVICE C10_ALWAYS_INLINE SampleGrad<acc_t> sample_grad(const acc_t (&weight)[4], acc_t lh, acc_t lw,
                                                                const acc_t (&d)[4], acc_t attention,
                                                                int32_t height, int32_t width) {
  return {weight[0] * d[0] + weight[1] * d[1] + weight[2] * d[2] + weight[3] * d[3],
          attention * static_cast<acc_t>(width) * ((1 - lh) * (d[1] - d[0]) + lh * (d[3] - d[2])),
          attention * static_cast<acc_t>(height) * ((1 - lw) * (d[2] - d[0]) + lw * (d[3] - d[1]))};
}

}  // namespace deta_ops
