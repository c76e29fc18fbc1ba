// CPU kernels: threads over (batch, head, query chunk) tasks in both passes; in the backward pass each
// task owns its slice of the value gradient, so that no two threads ever write the same element. Each
// (batch, query, head) first computes the bilinear geometry of all its samples, vectorised across
// samples; every other inner loop runs over the contiguous channels of one (token, head).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ms_deform_attn.h"

// The hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time, so one
// binary is both portable and fast (-march=native would be neither portable nor needed).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DETA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DETA_CPU_CLONES
#endif

namespace deta_ops {
namespace {

// Channel counts compiled with a constant trip count (DETA: 256 channels / 8 heads); others run the
// same code with a runtime count.
constexpr int64_t kSpecialisedChannels = 32;


// Level parameters of each sample i = level * points + point, the same for every (batch, query, head).
struct LevelTable {
  std::vector<int32_t> height, width, start;
};

// Where (batch, head, token) starts in value and in the value gradient, in elements.
struct Layout {
  int64_t batch, head, token;
};

template <typename scalar_t>
struct Problem {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* value;
  Layout layout;
  const acc_t* locations;
  const acc_t* weights;
  const LevelTable* levels;
  Sizes s;
};

// Bilinear geometry of the samples of one (batch, query, head), one array per quantity so that
// `locate` and the gradient formulas vectorise across samples.
template <typename acc_t>
struct Scratch {
  explicit Scratch(int64_t samples) : lh(samples), lw(samples) {
    for (int k = 0; k < 4; ++k) {
      token[k].resize(samples);
      weight[k].resize(samples);
      d[k].resize(samples);
    }
  }
  std::vector<int32_t> token[4];
  std::vector<acc_t> weight[4];
  std::vector<acc_t> d[4];  // <grad_output, corner k>, backward only
  std::vector<acc_t> lh, lw;
};

template <typename acc_t>
C10_ALWAYS_INLINE void locate_samples(const LevelTable& t, const acc_t* __restrict__ loc, Scratch<acc_t>& s) {
  const int64_t samples = static_cast<int64_t>(t.start.size());
  const int32_t* __restrict__ height = t.height.data();
  const int32_t* __restrict__ width = t.width.data();
  const int32_t* __restrict__ start = t.start.data();
  int32_t* __restrict__ t0 = s.token[0].data();
  int32_t* __restrict__ t1 = s.token[1].data();
  int32_t* __restrict__ t2 = s.token[2].data();
  int32_t* __restrict__ t3 = s.token[3].data();
  acc_t* __restrict__ w0 = s.weight[0].data();
  acc_t* __restrict__ w1 = s.weight[1].data();
  acc_t* __restrict__ w2 = s.weight[2].data();
  acc_t* __restrict__ w3 = s.weight[3].data();
  acc_t* __restrict__ lh = s.lh.data();
  acc_t* __restrict__ lw = s.lw.data();
  // The arrays never overlap, but GCC gives up on proving it (more than 10 run-time alias checks).
#pragma GCC ivdep
  for (int64_t i = 0; i < samples; ++i) {
    Corners<acc_t> c;
    locate(loc[2 * i], loc[2 * i + 1], height[i], width[i], start[i], c);
    t0[i] = c.token[0];
    t1[i] = c.token[1];
    t2[i] = c.token[2];
    t3[i] = c.token[3];
    w0[i] = c.weight[0];
    w1[i] = c.weight[1];
    w2[i] = c.weight[2];
    w3[i] = c.weight[3];
    lh[i] = c.lh;
    lw[i] = c.lw;
  }
}

// Lanes of independent partial sums, so that dot products vectorise without reassociation flags.
template <typename acc_t>
constexpr int64_t kLanes = 64 / sizeof(acc_t);

template <typename acc_t, typename scalar_t>
C10_ALWAYS_INLINE acc_t dot(const acc_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t n) {
  acc_t partial[kLanes<acc_t>] = {};
  int64_t c = 0;
  for (; c + kLanes<acc_t> <= n; c += kLanes<acc_t>) {
    for (int64_t j = 0; j < kLanes<acc_t>; ++j) {
      partial[j] += a[c + j] * static_cast<acc_t>(b[c + j]);
    }
  }
  for (int64_t j = 0; c < n; ++c, ++j) {
    partial[j] += a[c] * static_cast<acc_t>(b[c]);
  }
  // Halve the 64 bytes of partial sums twice with vector additions, then add the last 16 bytes' lanes: a
  // fixed order that stays in vector registers, where a loop over the lanes is a long serial chain.
  typedef acc_t Bytes32 __attribute__((vector_size(32)));
  typedef acc_t Bytes16 __attribute__((vector_size(16)));
  Bytes32 half, other_half;
  std::memcpy(&half, partial, 32);
  std::memcpy(&other_half, reinterpret_cast<const char*>(partial) + 32, 32);
  half += other_half;
  Bytes16 quarter, other_quarter;
  std::memcpy(&quarter, &half, 16);
  std::memcpy(&other_quarter, reinterpret_cast<const char*>(&half) + 16, 16);
  quarter += other_quarter;
  acc_t sum = 0;
  for (size_t j = 0; j < 16 / sizeof(acc_t); ++j) {
    sum += quarter[j];
  }
  return sum;
}

// The weighted corners of all samples of one (batch, query, head), added in vector registers: each
// sample's four corners are summed first, so that the running sums see one addition per sample. A
// corner outside the map reads a row of zeros instead of branching.
template <typename acc_t, int64_t kChannels>
C10_ALWAYS_INLINE void gather_in_registers(const Scratch<acc_t>& geo, const acc_t* __restrict__ attention,
                                           const acc_t* value_h, int64_t token_stride, const acc_t* zeros,
                                           int64_t samples, acc_t* __restrict__ out) {
  typedef acc_t Vec __attribute__((vector_size(32)));
  constexpr int64_t kWidth = sizeof(Vec) / sizeof(acc_t);
  constexpr int64_t kVecs = kChannels / kWidth;
  Vec sum[kVecs] = {};
  for (int64_t i = 0; i < samples; ++i) {
    const acc_t* corner[4];
    Vec weight[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const int32_t token = geo.token[k][i];
      corner[k] = token < 0 ? zeros : value_h + token * token_stride;
      weight[k] = Vec{} + attention[i] * geo.weight[k][i];
    }
#pragma GCC unroll 16
    for (int64_t j = 0; j < kVecs; ++j) {
      Vec x[4];
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        std::memcpy(&x[k], corner[k] + j * kWidth, sizeof(Vec));
      }
      sum[j] += weight[0] * x[0] + weight[1] * x[1] + weight[2] * x[2] + weight[3] * x[3];
    }
  }
  std::memcpy(out, sum, sizeof(sum));
}

// The same for any channel count and for half-precision values (converted while reading).
template <typename scalar_t, typename acc_t>
C10_ALWAYS_INLINE void gather(const Scratch<acc_t>& geo, const acc_t* __restrict__ attention,
                              const scalar_t* value_h, int64_t token_stride, int64_t samples, int64_t channels,
                              acc_t* __restrict__ acc, scalar_t* __restrict__ out) {
  std::fill_n(acc, channels, acc_t(0));
  for (int64_t i = 0; i < samples; ++i) {
    for (int k = 0; k < 4; ++k) {
      const int32_t token = geo.token[k][i];
      if (token < 0) {
        continue;
      }
      const scalar_t* __restrict__ v = value_h + token * token_stride;
      const acc_t w = attention[i] * geo.weight[k][i];
      for (int64_t ch = 0; ch < channels; ++ch) {
        acc[ch] += w * static_cast<acc_t>(v[ch]);
      }
    }
  }
  for (int64_t ch = 0; ch < channels; ++ch) {
    out[ch] = static_cast<scalar_t>(acc[ch]);
  }
}

// Task t covers batch b, head h and the t % chunks-th slice of the queries. Consecutive queries of one
// head sample neighbouring pixels, which stay in cache; their locations and weights, `heads` groups
// apart, are prefetched a few queries ahead because the hardware prefetcher does not follow that stride.
template <typename scalar_t, int64_t kChannels>
DETA_CPU_CLONES void forward_tasks(const Problem<scalar_t>& p, scalar_t* __restrict__ output, int64_t chunks,
                                   int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kInRegisters = std::is_same_v<scalar_t, acc_t> && kChannels > 0 &&
                                kChannels * sizeof(acc_t) % 32 == 0 && kChannels * sizeof(acc_t) <= 256;
  constexpr int64_t kPrefetchQueries = 4;
  const Sizes& s = p.s;
  const int64_t channels = kChannels > 0 ? kChannels : s.channels;
  const Layout& layout = p.layout;
  const int64_t samples = s.levels * s.points;
  const int64_t location_bytes = samples * 2 * static_cast<int64_t>(sizeof(acc_t));
  const int64_t last_group = s.batch * s.queries * s.heads - 1;
  Scratch<acc_t> geo(samples);
  std::vector<acc_t> acc(channels);
  const std::vector<scalar_t> zeros(channels, scalar_t(0));

  for (int64_t task = begin; task < end; ++task) {
    const int64_t chunk = task % chunks;
    const int64_t b = task / chunks / s.heads;
    const int64_t h = task / chunks % s.heads;
    const scalar_t* value_h = p.value + b * layout.batch + h * layout.head;
    const int64_t q_begin = s.queries * chunk / chunks, q_end = s.queries * (chunk + 1) / chunks;
    for (int64_t q = q_begin; q < q_end; ++q) {
      const int64_t group = (b * s.queries + q) * s.heads + h;
      const int64_t ahead = std::min(group + kPrefetchQueries * s.heads, last_group);
      for (int64_t byte = 0; byte < location_bytes; byte += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(p.locations + ahead * samples * 2) + byte);
      }
      for (int64_t byte = 0; byte < location_bytes / 2; byte += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(p.weights + ahead * samples) + byte);
      }
      const acc_t* attention = p.weights + group * samples;
      locate_samples(*p.levels, p.locations + group * samples * 2, geo);
      if constexpr (kInRegisters) {
        gather_in_registers<acc_t, kChannels>(geo, attention, value_h, layout.token, zeros.data(), samples,
                                              output + group * channels);
      } else {
        gather(geo, attention, value_h, layout.token, samples, channels, acc.data(), output + group * channels);
      }
    }
  }
}

// Task t covers batch b, head h and the t % chunks-th slice of the queries; it accumulates the value
// gradient into its own copy, grad_value_acc[t % chunks], which no other task touches.
template <typename scalar_t, int64_t kChannels>
DETA_CPU_CLONES void backward_tasks(const Problem<scalar_t>& p, const scalar_t* __restrict__ grad_output,
                                    at::opmath_type<scalar_t>* __restrict__ grad_value_acc,
                                    at::opmath_type<scalar_t>* __restrict__ grad_locations,
                                    at::opmath_type<scalar_t>* __restrict__ grad_weights, int64_t chunks,
                                    int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const Sizes& s = p.s;
  const int64_t channels = kChannels > 0 ? kChannels : s.channels;
  const Layout& layout = p.layout;
  const int64_t samples = s.levels * s.points;
  const int32_t* __restrict__ height = p.levels->height.data();
  const int32_t* __restrict__ width = p.levels->width.data();
  Scratch<acc_t> geo(samples);
  alignas(64) acc_t fixed[kChannels > 0 ? kChannels : 1];
  std::vector<acc_t> dynamic(kChannels > 0 ? 0 : channels);
  acc_t* __restrict__ go = kChannels > 0 ? fixed : dynamic.data();

  for (int64_t task = begin; task < end; ++task) {
    const int64_t chunk = task % chunks;
    const int64_t b = task / chunks / s.heads;
    const int64_t h = task / chunks % s.heads;
    const int64_t head_offset = b * layout.batch + h * layout.head;
    const scalar_t* value_h = p.value + head_offset;
    acc_t* grad_value_h = grad_value_acc + chunk * s.batch * layout.batch + head_offset;
    const int64_t q_begin = s.queries * chunk / chunks, q_end = s.queries * (chunk + 1) / chunks;
    for (int64_t q = q_begin; q < q_end; ++q) {
      const int64_t group = (b * s.queries + q) * s.heads + h;
      const acc_t* __restrict__ attention = p.weights + group * samples;
      locate_samples(*p.levels, p.locations + group * samples * 2, geo);
      for (int64_t ch = 0; ch < channels; ++ch) {
        go[ch] = static_cast<acc_t>(grad_output[group * channels + ch]);
      }
      for (int64_t i = 0; i < samples; ++i) {
        for (int k = 0; k < 4; ++k) {
          const int32_t token = geo.token[k][i];
          if (token < 0) {
            geo.d[k][i] = 0;
            continue;
          }
          geo.d[k][i] = dot(go, value_h + token * layout.token, channels);
          acc_t* __restrict__ gv = grad_value_h + token * layout.token;
          const acc_t w = attention[i] * geo.weight[k][i];
          for (int64_t ch = 0; ch < channels; ++ch) {
            gv[ch] += w * go[ch];
          }
        }
      }
      acc_t* __restrict__ grad_loc = grad_locations + group * samples * 2;
      acc_t* __restrict__ grad_weight = grad_weights + group * samples;
      for (int64_t i = 0; i < samples; ++i) {
        const acc_t weight[4] = {geo.weight[0][i], geo.weight[1][i], geo.weight[2][i], geo.weight[3][i]};
        const acc_t d[4] = {geo.d[0][i], geo.d[1][i], geo.d[2][i], geo.d[3][i]};
        const SampleGrad<acc_t> g = sample_grad(weight, geo.lh[i], geo.lw[i], d, attention[i], height[i], width[i]);
        grad_weight[i] = g.weight;
        grad_loc[2 * i] = g.x;
        grad_loc[2 * i + 1] = g.y;
      }
    }
  }
}

// With many samples per token (the encoder), head-major copies of value (and of its gradient) pay for
// themselves: each task's slice becomes contiguous, touching far fewer pages (TLB misses) and sharing
// cache lines between neighbouring pixels. With few (the decoder) the copies would dominate.
bool prefers_head_major(const Sizes& s) {
  return s.queries * s.levels * s.points >= 8 * s.tokens;
}

Layout token_major(const Sizes& s) {
  return {s.tokens * s.heads * s.channels, s.channels, s.heads * s.channels};
}

Layout head_major_layout(const Sizes& s) {
  return {s.heads * s.tokens * s.channels, s.tokens * s.channels, s.channels};
}

// Reads the level shapes on the host (they are CPU tensors here); a level that would read past the end of
// value is an error rather than an out-of-bounds access.

LevelTable make_table(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, const Sizes& s) {
  const at::Tensor shapes = spatial_shapes.to(at::kLong).contiguous();
  const at::Tensor starts = level_start_index.to(at::kLong).contiguous();
  const int64_t* shape = shapes.const_data_ptr<int64_t>();
  const int64_t* start = starts.const_data_ptr<int64_t>();
  LevelTable t;
  for (int64_t l = 0; l < s.levels; ++l) {
    const int64_t height = shape[2 * l], width = shape[2 * l + 1];
    TORCH_CHECK(height >= 0 && width >= 0 && start[l] >= 0 && start[l] + height * width <= s.tokens,
                "level ", l, " of shape (", height, ", ", width, ") starting at token ", start[l],
                " does not fit in value's ", s.tokens, " tokens");
    t.height.insert(t.height.end(), s.points, static_cast<int32_t>(height));
    t.width.insert(t.width.end(), s.points, static_cast<int32_t>(width));
    t.start.insert(t.start.end(), s.points, static_cast<int32_t>(start[l]));
  }
  return t;
}

at::Tensor forward_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value_in, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const LevelTable table = make_table(spatial_shapes, level_start_index, s);
  const bool head_major = prefers_head_major(s);
  const at::Tensor value = head_major ? value_in.transpose(1, 2).contiguous() : value_in.contiguous();
  const Layout layout = head_major ? head_major_layout(s) : token_major(s);
  at::Tensor output = at::empty({s.batch, s.queries, s.heads * s.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu", [&] {
    // Locations and weights are read in the accumulation type: half-precision locations would be
    // off by a fraction of a pixel on large maps.
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor locations = sampling_locations.to(acc_type).contiguous();
    const at::Tensor weights = attention_weights.to(acc_type).contiguous();
    const Problem<scalar_t> p{value.const_data_ptr<scalar_t>(), layout, locations.const_data_ptr<acc_t>(),
                              weights.const_data_ptr<acc_t>(), &table, s};
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    const bool specialised = s.channels == kSpecialisedChannels;
    // Slices of a few hundred queries: many tasks per thread, each long enough to reuse its head's cache.
    const int64_t chunks = std::max<int64_t>((s.queries + 511) / 512, 1);
    at::parallel_for(0, s.batch * s.heads * chunks, 1, [&](int64_t begin, int64_t end) {
      if (specialised) {
        forward_tasks<scalar_t, kSpecialisedChannels>(p, out, chunks, begin, end);
      } else {
        forward_tasks<scalar_t, 0>(p, out, chunks, begin, end);
      }
    });
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_output_in,
                                                            const at::Tensor& value_in,
                                                            const at::Tensor& spatial_shapes,
                                                            const at::Tensor& level_start_index,
                                                            const at::Tensor& sampling_locations,
                                                            const at::Tensor& attention_weights) {
  const Sizes s = check_backward_inputs(grad_output_in, value_in, spatial_shapes, level_start_index,
                                        sampling_locations, attention_weights);
  const LevelTable table = make_table(spatial_shapes, level_start_index, s);
  const bool head_major = prefers_head_major(s);
  const at::Tensor value = head_major ? value_in.transpose(1, 2).contiguous() : value_in.contiguous();
  const Layout layout = head_major ? head_major_layout(s) : token_major(s);
  const at::Tensor grad_output = grad_output_in.to(value.scalar_type()).contiguous();
  at::Tensor grad_value, grad_locations, grad_weights;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor locations = sampling_locations.to(acc_type).contiguous();
    const at::Tensor weights = attention_weights.to(acc_type).contiguous();
    const Problem<scalar_t> p{value.const_data_ptr<scalar_t>(), layout, locations.const_data_ptr<acc_t>(),
                              weights.const_data_ptr<acc_t>(), &table, s};
    // batch x heads tasks own disjoint slices of the value gradient. When there are fewer of them than
    // threads, the queries are split into chunks that each accumulate into a private copy, summed below.
    const int64_t bh = std::max<int64_t>(s.batch * s.heads, 1);
    const int64_t chunks =
        std::clamp<int64_t>((at::get_num_threads() + bh - 1) / bh, 1, std::max<int64_t>(s.queries, 1));
    at::Tensor grad_value_acc = at::zeros({chunks, s.batch * s.heads * s.tokens * s.channels},
                                          value.options().dtype(acc_type));
    grad_locations = at::empty(locations.sizes(), locations.options());
    grad_weights = at::empty(weights.sizes(), weights.options());
    const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
    acc_t* gv = grad_value_acc.mutable_data_ptr<acc_t>();
    acc_t* gl = grad_locations.mutable_data_ptr<acc_t>();
    acc_t* gw = grad_weights.mutable_data_ptr<acc_t>();
    const bool specialised = s.channels == kSpecialisedChannels;
    at::parallel_for(0, s.batch * s.heads * chunks, 1, [&](int64_t begin, int64_t end) {
      if (specialised) {
        backward_tasks<scalar_t, kSpecialisedChannels>(p, go, gv, gl, gw, chunks, begin, end);
      } else {
        backward_tasks<scalar_t, 0>(p, go, gv, gl, gw, chunks, begin, end);
      }
    });
    at::Tensor summed = chunks > 1 ? grad_value_acc.sum(0) : grad_value_acc.squeeze(0);
    summed = head_major ? summed.view({s.batch, s.heads, s.tokens, s.channels}).transpose(1, 2)
                        : summed.view(value_in.sizes());
    if (summed.is_contiguous() && summed.scalar_type() == value.scalar_type()) {
      grad_value = summed;
    } else {  // back to value's layout and dtype in one copy
      grad_value = at::empty(value_in.sizes(), value.options());
      grad_value.copy_(summed);
    }
  });
  return {grad_value, grad_locations.to(sampling_locations.scalar_type()),
          grad_weights.to(attention_weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(deta_ops, CPU, m) {
  m.impl("ms_deform_attn", &forward_cpu);
  m.impl("ms_deform_attn_backward", &backward_cpu);
}

}  // namespace deta_ops
