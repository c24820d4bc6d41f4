// CUDA Adam/AdamW updates, fp32 states and 8-bit blockwise states, many tensors per launch.
//
// Multi-tensor apply: tensors are cut into fixed chunks and one CUDA block updates one chunk,
// finding its tensor by a binary search of the table's chunk prefix sum (`chunk_start`, in device
// memory with the table: any number of tensors per launch, one launch per state kind and param
// dtype). Loads are coalesced (consecutive threads, consecutive elements) with kIlp independent
// elements in flight per thread.
// fp32 states: reads p, g, m, v and writes p, m, v: 28 bytes per element with fp32 params
// (20 with bf16): 268M fp32 params -> 7.5 GB, ~2.3-2.5 ms at an H100's ~3.2 TB/s.
// 8-bit states: one warp per 256-element block, each lane 8 consecutive elements (16-byte
// loads of p and g, 8-byte loads of the codes): dequantize (code table in shared memory),
// update, warp-reduce the new absmax, requantize by a branch-free binary search over the 255
// code midpoints stored in Eytzinger order (the CPU path's codes come from the same search).
// Traffic: p, g, p written back + 4 bytes of codes + ~1/32 byte of absmax per element
// (16 bytes for fp32 params, ~1.4 ms for 268M params).
// Status: compiled (sm_80, sm_90, no spills: bench/cuda_compile_check.sh) but never run here
// (no GPU in the sessions that wrote it); tests/test_optim_gpu.py checks it against the CPU op.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "adam_common.h"
#include "adamw_cuda.h"

namespace {

using qlora_fast::AdamScalars;
using qlora_fast::kQuantBlock;

constexpr int kThreads = 256;
constexpr int kIlp = 4;
constexpr int64_t kChunk32 = kQfChunk32;
constexpr int64_t kChunk8 = kQfChunk8;
static_assert(kChunk8 == (kThreads / 32) * 4 * kQuantBlock, "a chunk is 4 quant blocks per warp");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// The entry of CUDA block `block`: the last t with chunk_start[t] <= block (binary search; the
// first probes are the same for every block, so they hit in cache).
__device__ __forceinline__ int tensor_of_block(const int* __restrict__ chunk_start, int count, int block) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (__ldg(chunk_start + mid) <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) adam32_kernel(const QfAdam32Entry* __restrict__ table,
                                                            const int* __restrict__ chunk_start, int count) {
  const int t = tensor_of_block(chunk_start, count, blockIdx.x);
  const QfAdam32Entry& e = table[t];
  const int64_t begin = static_cast<int64_t>(blockIdx.x - __ldg(chunk_start + t)) * kChunk32;
  const int64_t end = min(e.n, begin + kChunk32);
  T* __restrict__ p = static_cast<T*>(e.p);
  const T* __restrict__ g = static_cast<const T*>(e.g);
  float* __restrict__ m = e.exp_avg;
  float* __restrict__ v = e.exp_avg_sq;
  const AdamScalars s = e.s;
  for (int64_t base = begin + threadIdx.x; base < end; base += kIlp * kThreads) {
    float pr[kIlp], gr[kIlp], mr[kIlp], vr[kIlp];
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int64_t i = base + j * kThreads;
      if (i < end) {
        pr[j] = to_float(p[i]);
        gr[j] = to_float(g[i]);
        mr[j] = m[i];
        vr[j] = v[i];
      }
    }
#pragma unroll
    for (int j = 0; j < kIlp; ++j) {
      const int64_t i = base + j * kThreads;
      if (i < end) {
        qlora_fast::adam_element(s, pr[j], gr[j], mr[j], vr[j]);
        p[i] = from_float<T>(pr[j]);
        m[i] = mr[j];
        v[i] = vr[j];
      }
    }
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = qlora_fast::max_keep_nan(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

constexpr int kPerLane = kQuantBlock / 32;  // consecutive elements per lane in the 8-bit kernel

// kPerLane consecutive values of type T from `src` as floats: 16-byte loads when `vec` (all
// in range and 16-byte aligned), else element by element up to `count`.
template <typename T>
__device__ __forceinline__ void load_lane(const T* src, bool vec, int count, float (&out)[kPerLane]) {
  if (vec) {
    constexpr int kWords = kPerLane * sizeof(T) / 16;
    uint4 words[kWords];
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = reinterpret_cast<const uint4*>(src)[w];
    const T* vals = reinterpret_cast<const T*>(words);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) out[j] = to_float(vals[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) out[j] = j < count ? to_float(src[j]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_lane(T* dst, bool vec, int count, const float (&in)[kPerLane]) {
  if (vec) {
    constexpr int kWords = kPerLane * sizeof(T) / 16;
    uint4 words[kWords];
    T* vals = reinterpret_cast<T*>(words);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) vals[j] = from_float<T>(in[j]);
#pragma unroll
    for (int w = 0; w < kWords; ++w) reinterpret_cast<uint4*>(dst)[w] = words[w];
  } else {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (j < count) dst[j] = from_float<T>(in[j]);
    }
  }
}

// kPerLane codes (8 bytes) at `src`: one 8-byte load when `vec`.
__device__ __forceinline__ void load_codes(const uint8_t* src, bool vec, int count, uint8_t (&out)[kPerLane]) {
  if (vec) {
    const uint2 word = *reinterpret_cast<const uint2*>(src);
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&word);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) out[j] = bytes[j];
  } else {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) out[j] = j < count ? src[j] : 0;
  }
}

__device__ __forceinline__ void store_codes(uint8_t* dst, bool vec, int count, const uint8_t (&in)[kPerLane]) {
  if (vec) {
    uint2 word;
    uint8_t* bytes = reinterpret_cast<uint8_t*>(&word);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) bytes[j] = in[j];
    *reinterpret_cast<uint2*>(dst) = word;
  } else {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      if (j < count) dst[j] = in[j];
    }
  }
}

__device__ __forceinline__ bool aligned(const void* ptr, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(ptr) & (bytes - 1)) == 0;
}

// At least 3 blocks (24 warps) per SM: the table's pointers and scalars live in registers (not in
// the kernel-argument bank as with per-launch batches), which left ptxas at 105 registers (2 blocks);
// capped, it fits 80 with no spills (bench/cuda_compile_check.sh).
template <typename T>
__global__ void __launch_bounds__(kThreads, 3) adam8bit_kernel(const QfAdam8Entry* __restrict__ table,
                                                              const int* __restrict__ chunk_start, int count,
                                                              const float* __restrict__ signed_map,
                                                              const float* __restrict__ unsigned_map,
                                                              int* nonfinite) {
  __shared__ float signed_code[256];
  __shared__ float unsigned_code[256];
  __shared__ float signed_tree[256];    // midpoints in Eytzinger order (index 0 unused)
  __shared__ float unsigned_tree[256];
  signed_code[threadIdx.x] = signed_map[threadIdx.x];
  unsigned_code[threadIdx.x] = unsigned_map[threadIdx.x];
  __syncthreads();
  if (threadIdx.x >= 1) {
    signed_tree[threadIdx.x] = qlora_fast::eytzinger_midpoint(signed_code, threadIdx.x);
    unsigned_tree[threadIdx.x] = qlora_fast::eytzinger_midpoint(unsigned_code, threadIdx.x);
  }
  __syncthreads();

  const int t = tensor_of_block(chunk_start, count, blockIdx.x);
  const QfAdam8Entry& e = table[t];
  const int64_t n = e.n;
  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.x - __ldg(chunk_start + t)) * kChunk8;
  T* __restrict__ p = static_cast<T*>(e.p);
  const T* __restrict__ g = static_cast<const T*>(e.g);
  uint8_t* __restrict__ mq = e.m_codes;
  uint8_t* __restrict__ vq = e.v_codes;
  const AdamScalars s = e.s;
  bool finite = true;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  constexpr int kWarps = kThreads / 32;
  // Vector loads need 16-byte aligned params/grads and 8-byte aligned codes; blocks start at
  // multiples of 256 elements, so the base pointers decide.
  const bool aligned_tensor = aligned(p, 16) && aligned(g, 16) && aligned(mq, 8) && aligned(vq, 8);

  for (int64_t qb_begin = chunk_begin + warp * kQuantBlock; qb_begin < min(n, chunk_begin + kChunk8);
       qb_begin += kWarps * kQuantBlock) {
    const int64_t qb = qb_begin / kQuantBlock;
    const int64_t first = qb_begin + lane * kPerLane;  // this lane's kPerLane consecutive elements
    const int64_t left = n - first;
    const int count = left <= 0 ? 0 : (left >= kPerLane ? kPerLane : static_cast<int>(left));
    const bool vec = aligned_tensor && count == kPerLane;
    const float am = e.m_absmax[qb];
    const float av = e.v_absmax[qb];
    float pr[kPerLane], gr[kPerLane], mr[kPerLane], vr[kPerLane];
    uint8_t mc[kPerLane], vc[kPerLane];
    load_lane(p + first, vec, count, pr);
    load_lane(g + first, vec, count, gr);
    load_codes(mq + first, vec, count, mc);
    load_codes(vq + first, vec, count, vc);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      mr[j] = 0.0f;
      vr[j] = 0.0f;
      if (j < count) {
        mr[j] = signed_code[mc[j]] * am;
        vr[j] = unsigned_code[vc[j]] * av;
        qlora_fast::adam_element(s, pr[j], gr[j], mr[j], vr[j]);
      }
    }
    store_lane(p + first, vec, count, pr);
    float new_am = 0.0f, new_av = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      new_am = qlora_fast::max_keep_nan(new_am, fabsf(mr[j]));
      new_av = qlora_fast::max_keep_nan(new_av, fabsf(vr[j]));
    }
    new_am = warp_max(new_am);
    new_av = warp_max(new_av);
    // An all-zero block stays zero instead of dividing by zero (as on the CPU).
    const float inv_m = new_am > 0.0f ? 1.0f / new_am : 0.0f;
    const float inv_v = new_av > 0.0f ? 1.0f / new_av : 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      mc[j] = static_cast<uint8_t>(qlora_fast::nearest_code(signed_tree, fminf(1.0f, fmaxf(-1.0f, mr[j] * inv_m))));
      const float v_scaled = fminf(1.0f, fmaxf(-1.0f, vr[j] * inv_v));
      vc[j] = static_cast<uint8_t>(
          qlora_fast::second_moment_code(qlora_fast::nearest_code(unsigned_tree, v_scaled), v_scaled));
    }
    store_codes(mq + first, vec, count, mc);
    store_codes(vq + first, vec, count, vc);
    if (lane == 0) {
      e.m_absmax[qb] = new_am;
      e.v_absmax[qb] = new_av;
      finite = finite && isfinite(new_am) && isfinite(new_av);
    }
  }
  // The optimizer's overflow check, read by the host later without a sync.
  if (!finite && nonfinite != nullptr) *nonfinite = 1;
}

template <typename T>
int launch32(const QfAdam32Entry* table, const int* chunk_start, int count, int chunks, cudaStream_t stream) {
  adam32_kernel<T><<<chunks, kThreads, 0, stream>>>(table, chunk_start, count);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch8(const QfAdam8Entry* table, const int* chunk_start, int count, int chunks, const float* signed_map,
            const float* unsigned_map, int* nonfinite, cudaStream_t stream) {
  adam8bit_kernel<T><<<chunks, kThreads, 0, stream>>>(table, chunk_start, count, signed_map, unsigned_map,
                                                      nonfinite);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int qf_adam32_cuda(const QfAdam32Entry* table, const int* chunk_start, int count, int chunks, int dtype,
                              void* stream) {
  if (count == 0 || chunks == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case QF_FLOAT32: return launch32<float>(table, chunk_start, count, chunks, s);
    case QF_BFLOAT16: return launch32<__nv_bfloat16>(table, chunk_start, count, chunks, s);
    case QF_FLOAT16: return launch32<__half>(table, chunk_start, count, chunks, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int qf_adam8bit_cuda(const QfAdam8Entry* table, const int* chunk_start, int count, int chunks, int dtype,
                                const float* signed_map, const float* unsigned_map, int* nonfinite, void* stream) {
  if (count == 0 || chunks == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case QF_FLOAT32: return launch8<float>(table, chunk_start, count, chunks, signed_map, unsigned_map, nonfinite, s);
    case QF_BFLOAT16:
      return launch8<__nv_bfloat16>(table, chunk_start, count, chunks, signed_map, unsigned_map, nonfinite, s);
    case QF_FLOAT16:
      return launch8<__half>(table, chunk_start, count, chunks, signed_map, unsigned_map, nonfinite, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" const char* qf_cuda_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
