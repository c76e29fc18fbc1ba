// Enough of CUDA's execution model to run this project's kernels on a CPU, for machines without a GPU.
//
// Every GPU thread is an OS thread and the 32 lanes of a warp run concurrently, so warp shuffles really
// exchange values between lanes. Shuffles enforce the rules the hardware leaves undefined when broken: the
// calling lane is in the mask, the source lane is in the mask, and every lane named in the mask reaches
// the same shuffle (a lane that has exited or took another path is reported as a deadlock). Vector
// atomics check their 16-byte alignment. Warps run one after another: no kernel here uses shared memory
// or __syncthreads. Include after the torch headers and before the kernels.
#pragma once

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define DETA_VECTOR_ATOMICS 1  // emulate sm_90, whose float4 atomics the kernels use

namespace cuda_emulation {

constexpr int kWarpSize = 32;

struct Index {
  unsigned x = 0, y = 0, z = 0;
};

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::abort();
}

// The values the lanes of one warp pass to shuffles, one exchange round per distinct mask.
class Warp {
 public:
  template <typename T>
  T exchange(unsigned mask, int lane, T value, int source) {
    std::unique_lock<std::mutex> lock(mutex_);
    Round& round = rounds_[mask];
    round.deposit[lane] = static_cast<double>(value);
    const uint64_t generation = round.generation;
    if (++round.arrived == __builtin_popcount(mask)) {
      std::copy(std::begin(round.deposit), std::end(round.deposit), std::begin(round.result));
      round.arrived = 0;
      ++round.generation;
      everyone_arrived_.notify_all();
    } else if (!everyone_arrived_.wait_for(lock, std::chrono::seconds(20),
                                           [&] { return round.generation != generation; })) {
      fail("deadlock: a lane named in a shuffle's mask never reached it");
    }
    return static_cast<T>(round.result[source]);
  }

 private:
  struct Round {
    int arrived = 0;
    uint64_t generation = 0;
    double deposit[kWarpSize] = {};  // float and double values round-trip exactly
    double result[kWarpSize] = {};
  };
  std::mutex mutex_;
  std::condition_variable everyone_arrived_;
  std::map<unsigned, Round> rounds_;
};

inline thread_local Warp* current_warp = nullptr;

inline std::mutex& atomics_mutex() {
  static std::mutex mutex;
  return mutex;
}

}  // namespace cuda_emulation

inline thread_local cuda_emulation::Index threadIdx, blockIdx;
inline cuda_emulation::Index blockDim;

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = cuda_emulation::kWarpSize) {
  using cuda_emulation::fail;
  if (width <= 0 || width > cuda_emulation::kWarpSize || (width & (width - 1)) != 0) {
    fail("shuffle width must be a power of two up to 32");
  }
  const int lane = static_cast<int>(threadIdx.x % cuda_emulation::kWarpSize);
  if (!(mask >> lane & 1u)) {
    fail("a lane called a shuffle whose mask does not include it");
  }
  int source = lane ^ lane_mask;
  if (source / width > lane / width) {
    source = lane;  // lanes of a later segment are out of reach: the caller gets its own value
  }
  if (!(mask >> source & 1u)) {
    fail("a shuffle read from a lane outside its mask");
  }
  return cuda_emulation::current_warp->exchange(mask, lane, value, source);
}

template <typename T>
T atomicAdd(T* address, T value) {
  const std::lock_guard<std::mutex> lock(cuda_emulation::atomics_mutex());
  const T old = *address;
  *address = old + value;
  return old;
}

struct alignas(16) float4 {
  float x, y, z, w;
};

inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline float4 atomicAdd(float4* address, float4 value) {
  if (reinterpret_cast<uintptr_t>(address) % alignof(float4) != 0) {
    cuda_emulation::fail("float4 atomicAdd on an address that is not 16-byte aligned");
  }
  const std::lock_guard<std::mutex> lock(cuda_emulation::atomics_mutex());
  const float4 old = *address;
  *address = {old.x + value.x, old.y + value.y, old.z + value.z, old.w + value.w};
  return old;
}

namespace cuda_emulation {

// kernel<<<grid, block>>>(args...) for one-dimensional grids and blocks of whole warps.
template <typename... Params, typename... Args>
void launch(unsigned grid, unsigned block, void (*kernel)(Params...), Args... args) {
  if (block % kWarpSize != 0) {
    fail("blocks must be whole warps");
  }
  blockDim.x = block;
  for (unsigned b = 0; b < grid; ++b) {
    for (unsigned first = 0; first < block; first += kWarpSize) {
      Warp warp;
      std::vector<std::thread> lanes;
      for (unsigned t = first; t < first + kWarpSize; ++t) {
        lanes.emplace_back([&, b, t] {
          blockIdx.x = b;
          threadIdx.x = t;
          current_warp = &warp;
          kernel(args...);
        });
      }
      for (std::thread& lane : lanes) {
        lane.join();
      }
    }
  }
}

}  // namespace cuda_emulation
