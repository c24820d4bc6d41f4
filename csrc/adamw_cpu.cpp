// CPU implementation of the fused Adam/AdamW updates, fp32 states and 8-bit blockwise states.
//
// fp32 states: one pass over p, g, m, v (read 4 tensors, write 3), split across threads with
// at::parallel_for; the inner loop is branch-free float math that GCC vectorises (-O3
// -fno-math-errno lets sqrtf vectorise).
// 8-bit states: per block of 256 elements, dequantize m and v (code lookup * absmax), update,
// take the new absmax of each block and requantize to the nearest code (binary search over the
// 255 midpoints). Traffic per element: p, g (2 or 4 bytes each, p written back) + 2 bytes of codes.
#include "optim.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "adam_common.h"

namespace qlora_fast {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel task for the fp32-state update

template <typename scalar_t>
void adam_tensor_cpu(const AdamScalars& s, scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                     float* __restrict__ m, float* __restrict__ v, int64_t n) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float pf = static_cast<float>(p[i]);
      float mf = m[i];
      float vf = v[i];
      adam_element(s, pf, static_cast<float>(g[i]), mf, vf);
      p[i] = static_cast<scalar_t>(pf);
      m[i] = mf;
      v[i] = vf;
    }
  });
}

std::array<float, 255> midpoints_of(const float* code) {
  std::array<float, 255> mid;
  for (int i = 0; i < 255; ++i) mid[i] = (code[i] + code[i + 1]) * 0.5f;
  return mid;
}

// Quantize `x[0..n)` (one block) against `code` with the block's absmax; returns the absmax.
float requantize_block(const float* x, int64_t n, const std::array<float, 255>& mid, uint8_t* out) {
  float absmax = 0.0f;
  for (int64_t i = 0; i < n; ++i) absmax = std::max(absmax, std::fabs(x[i]));
  // An all-zero block stays zero (code of 0) instead of dividing by zero.
  const float inv = absmax > 0.0f ? 1.0f / absmax : 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float scaled = std::min(1.0f, std::max(-1.0f, x[i] * inv));
    out[i] = static_cast<uint8_t>(nearest_code(mid.data(), scaled));
  }
  return absmax;
}

template <typename scalar_t>
void adam8bit_tensor_cpu(const AdamScalars& s, scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                         uint8_t* __restrict__ mq, uint8_t* __restrict__ vq, float* __restrict__ m_absmax,
                         float* __restrict__ v_absmax, const float* signed_code, const float* unsigned_code,
                         const std::array<float, 255>& signed_mid, const std::array<float, 255>& unsigned_mid,
                         int64_t n) {
  const int64_t blocks = (n + kQuantBlock - 1) / kQuantBlock;
  at::parallel_for(0, blocks, std::max<int64_t>(1, kGrain / kQuantBlock), [&](int64_t b0, int64_t b1) {
    float m[kQuantBlock];
    float v[kQuantBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * kQuantBlock;
      const int64_t len = std::min(kQuantBlock, n - start);
      const float am = m_absmax[b];
      const float av = v_absmax[b];
      for (int64_t i = 0; i < len; ++i) {
        float pf = static_cast<float>(p[start + i]);
        m[i] = signed_code[mq[start + i]] * am;
        v[i] = unsigned_code[vq[start + i]] * av;
        adam_element(s, pf, static_cast<float>(g[start + i]), m[i], v[i]);
        p[start + i] = static_cast<scalar_t>(pf);
      }
      m_absmax[b] = requantize_block(m, len, signed_mid, mq + start);
      v_absmax[b] = requantize_block(v, len, unsigned_mid, vq + start);
    }
  });
}

}  // namespace

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::IntArrayRef steps, double lr, double beta1,
                   double beta2, double eps, double weight_decay, bool decoupled) {
  check_adam_args(params, grads, steps, c10::DeviceType::CPU);
  check_adam32_states(params, exp_avgs, exp_avg_sqs);
  for (size_t t = 0; t < params.size(); ++t) {
    const AdamScalars s = make_adam_scalars(lr, beta1, beta2, eps, weight_decay, steps[t], decoupled);
    const at::Tensor& p = params[t];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "adam_step_cpu", [&] {
      adam_tensor_cpu<scalar_t>(s, p.data_ptr<scalar_t>(), grads[t].data_ptr<scalar_t>(),
                                exp_avgs[t].data_ptr<float>(), exp_avg_sqs[t].data_ptr<float>(), p.numel());
    });
  }
}

void adam8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList m_codes,
                       at::TensorList v_codes, at::TensorList m_absmax, at::TensorList v_absmax,
                       const at::Tensor& signed_map, const at::Tensor& unsigned_map,
                       at::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                       double weight_decay, bool decoupled) {
  check_adam_args(params, grads, steps, c10::DeviceType::CPU);
  check_adam8bit_states(params, m_codes, v_codes, m_absmax, v_absmax, signed_map, unsigned_map);
  const float* signed_code = signed_map.data_ptr<float>();
  const float* unsigned_code = unsigned_map.data_ptr<float>();
  const auto signed_mid = midpoints_of(signed_code);
  const auto unsigned_mid = midpoints_of(unsigned_code);
  for (size_t t = 0; t < params.size(); ++t) {
    const AdamScalars s = make_adam_scalars(lr, beta1, beta2, eps, weight_decay, steps[t], decoupled);
    const at::Tensor& p = params[t];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "adam8bit_step_cpu", [&] {
      adam8bit_tensor_cpu<scalar_t>(s, p.data_ptr<scalar_t>(), grads[t].data_ptr<scalar_t>(),
                                    m_codes[t].data_ptr<uint8_t>(), v_codes[t].data_ptr<uint8_t>(),
                                    m_absmax[t].data_ptr<float>(), v_absmax[t].data_ptr<float>(),
                                    signed_code, unsigned_code, signed_mid, unsigned_mid, p.numel());
    });
  }
}

}  // namespace qlora_fast
