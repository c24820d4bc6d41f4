// CPU implementation of the fused Adam/AdamW updates, fp32 states and 8-bit blockwise states.
//
// fp32 states: one pass over p, g, m, v (read 4 tensors, write 3), split across threads with
// at::parallel_for; the inner loop is branch-free float math that GCC vectorises (-O3
// -fno-math-errno lets sqrtf vectorise).
// 8-bit states: per block of 256 elements, dequantize m and v (code lookup * absmax), update,
// take the new absmax of each block and requantize to the nearest code (a bucket table over the
// float's exponent and top mantissa bits, then a short scan of the 255 midpoints; a positive
// second moment never takes code 0). Traffic per element: p, g (2 or 4 bytes each, p written back) + 2 bytes of codes.
#include "optim.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
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

// Nearest-code search for the CPU. A plain binary search is a chain of 8 dependent loads per
// value; instead a table indexed by the float's sign, exponent and top kMantissaBits mantissa bits
// gives the few codes a value in that bucket can round to (the dynamic map is close to
// log-spaced, so a bucket spans at most a handful), then a short linear scan finishes. The
// result is identical to the binary search: the count of midpoints below x.
class CodeIndex {
 public:
  static constexpr int kMantissaBits = 5;
  static constexpr int kShift = 23 - kMantissaBits;

  explicit CodeIndex(const float* code) {
    std::copy(code, code + 256, code_.begin());
    for (int i = 0; i < 255; ++i) mid_[i] = (code[i] + code[i + 1]) * 0.5f;
    // Padding past the last midpoint: the fixed-length scan in `nearest` may read it (and
    // ignores it: every index there is >= the bucket's end).
    std::fill(mid_.begin() + 255, mid_.end(), 0.0f);
    // The bucket bounds come from the CUDA kernel's search (Eytzinger tree), so both devices
    // give the same codes by construction.
    std::array<float, 256> tree{};
    for (int k = 1; k < 256; ++k) tree[k] = eytzinger_midpoint(code, k);
    const uint32_t keys = 1u << (32 - kShift);
    first_.resize(keys);
    last_.resize(keys);
    for (uint32_t k = 0; k < keys; ++k) {
      const float low = bits_to_float(k << kShift);
      const float high = bits_to_float((k << kShift) | ((1u << kShift) - 1));
      const bool negative = (k >> (31 - kShift)) & 1u;
      first_[k] = static_cast<uint8_t>(nearest_code(tree.data(), negative ? high : low));
      last_[k] = static_cast<uint8_t>(nearest_code(tree.data(), negative ? low : high));
      span_ = std::max(span_, last_[k] - first_[k]);
    }
    TORCH_CHECK(span_ <= kMaxSpan, "8-bit code table too dense for the CPU code index: a bucket spans ", span_,
                " codes (at most ", kMaxSpan, ")");
  }

  bool same_code(const float* code) const { return std::equal(code, code + 256, code_.begin()); }

  int nearest(float x) const {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    const uint32_t key = bits >> kShift;
    const int first = first_[key];
    const int end = last_[key];
    // The count of midpoints below x in [first, end) (they are sorted, so this is where the
    // scan `while (i < end && mid_[i] < x) ++i` stops), over the same number of candidates for
    // every value: no data-dependent branch to mispredict.
    int i = first;
    for (int j = 0; j < span_; ++j) i += static_cast<int>((first + j < end) & (mid_[first + j] < x));
    return i;
  }

 private:
  static float bits_to_float(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }

  static constexpr int kMaxSpan = 64;
  std::array<float, 256> code_;
  std::array<float, 255 + kMaxSpan> mid_;
  std::vector<uint8_t> first_, last_;
  int span_ = 0;  // the most codes one bucket spans (last_ - first_)
};

// The index of a code table, built once per distinct table (the optimizer passes the same two
// maps on every call).
std::shared_ptr<const CodeIndex> code_index(const float* code) {
  static std::mutex mutex;
  static std::vector<std::shared_ptr<const CodeIndex>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& index : cache) {
    if (index->same_code(code)) return index;
  }
  if (cache.size() >= 8) cache.erase(cache.begin());
  cache.push_back(std::make_shared<const CodeIndex>(code));
  return cache.back();
}

// Quantize `x[0..n)` (one block) with the block's absmax; returns the absmax.
// `second_moment`: a positive value never takes code 0 (see second_moment_code).
float requantize_block(const float* x, int64_t n, const CodeIndex& index, bool second_moment, uint8_t* out) {
  float absmax = 0.0f;
  for (int64_t i = 0; i < n; ++i) absmax = max_keep_nan(absmax, std::fabs(x[i]));
  // An all-zero block stays zero (code of 0) instead of dividing by zero.
  const float inv = absmax > 0.0f ? 1.0f / absmax : 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float scaled = std::min(1.0f, std::max(-1.0f, x[i] * inv));
    const int code = index.nearest(scaled);
    out[i] = static_cast<uint8_t>(second_moment ? second_moment_code(code, scaled) : code);
  }
  return absmax;
}

template <typename scalar_t>
void adam8bit_tensor_cpu(const AdamScalars& s, scalar_t* __restrict__ p, const scalar_t* __restrict__ g,
                         uint8_t* __restrict__ mq, uint8_t* __restrict__ vq, float* __restrict__ m_absmax,
                         float* __restrict__ v_absmax, const float* signed_code, const float* unsigned_code,
                         const CodeIndex& signed_index, const CodeIndex& unsigned_index, int64_t n) {
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
      m_absmax[b] = requantize_block(m, len, signed_index, false, mq + start);
      v_absmax[b] = requantize_block(v, len, unsigned_index, true, vq + start);
    }
  });
}

}  // namespace

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::IntArrayRef steps, double lr, double beta1,
                   double beta2, double eps, double weight_decay, bool decoupled) {
  check_adam_args(params, grads, steps, c10::DeviceType::CPU);
  check_adam32_states(params, exp_avgs, exp_avg_sqs);
  AdamScalars s{};
  int64_t scalars_step = -1;  // the scalars depend only on the step: recomputed when it changes
  for (size_t t = 0; t < params.size(); ++t) {
    if (steps[t] != scalars_step) {
      s = make_adam_scalars(lr, beta1, beta2, eps, weight_decay, steps[t], decoupled);
      scalars_step = steps[t];
    }
    const at::Tensor& p = params[t];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "adam_step_cpu", [&] {
      adam_tensor_cpu<scalar_t>(s, p.data_ptr<scalar_t>(), grads[t].data_ptr<scalar_t>(),
                                exp_avgs[t].data_ptr<float>(), exp_avg_sqs[t].data_ptr<float>(), p.numel());
    });
  }
}

bool adam8bit_step_checked_cpu(at::TensorList params, at::TensorList grads, at::TensorList m_codes,
                               at::TensorList v_codes, at::TensorList m_absmax, at::TensorList v_absmax,
                               const at::Tensor& signed_map, const at::Tensor& unsigned_map,
                               at::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                               double weight_decay, bool decoupled) {
  check_adam_args(params, grads, steps, c10::DeviceType::CPU);
  check_adam8bit_states(params, m_codes, v_codes, m_absmax, v_absmax, signed_map, unsigned_map);
  const float* signed_code = signed_map.data_ptr<float>();
  const float* unsigned_code = unsigned_map.data_ptr<float>();
  const auto signed_index = code_index(signed_code);
  const auto unsigned_index = code_index(unsigned_code);
  bool all_finite = true;
  AdamScalars s{};
  int64_t scalars_step = -1;  // the scalars depend only on the step: recomputed when it changes
  for (size_t t = 0; t < params.size(); ++t) {
    if (steps[t] != scalars_step) {
      s = make_adam_scalars(lr, beta1, beta2, eps, weight_decay, steps[t], decoupled);
      scalars_step = steps[t];
    }
    const at::Tensor& p = params[t];
    float* ma = m_absmax[t].data_ptr<float>();
    float* va = v_absmax[t].data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "adam8bit_step_cpu", [&] {
      adam8bit_tensor_cpu<scalar_t>(s, p.data_ptr<scalar_t>(), grads[t].data_ptr<scalar_t>(),
                                    m_codes[t].data_ptr<uint8_t>(), v_codes[t].data_ptr<uint8_t>(), ma, va,
                                    signed_code, unsigned_code, *signed_index, *unsigned_index, p.numel());
    });
    // The optimizer's overflow check (a non-finite block absmax), here where the values are
    // at hand instead of a torch.cat over every absmax tensor afterwards.
    for (int64_t b = 0, blocks = m_absmax[t].numel(); b < blocks; ++b) {
      all_finite = all_finite && std::isfinite(ma[b]) && std::isfinite(va[b]);
    }
  }
  return !all_finite;
}

bool adam_multi_step_cpu(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                         at::TensorList steps, at::TensorList states, const at::Tensor& entries,
                         at::ArrayRef<double> hyper, bool decoupled, const at::Tensor& signed_map,
                         const at::Tensor& unsigned_map, const std::optional<at::Tensor>& nonfinite) {
  const MultiStep step = check_multi_args(params, grads, steps, states, entries, hyper, signed_map, unsigned_map,
                                          c10::DeviceType::CPU);
  TORCH_CHECK(!nonfinite.has_value() || !nonfinite->defined(), "nonfinite: CUDA only (the CPU op returns the flag)");
  const std::vector<int64_t> counts = advance_steps(steps, step);
  std::shared_ptr<const CodeIndex> signed_index, unsigned_index;
  if (step.any_8bit) {
    signed_index = code_index(signed_map.data_ptr<float>());
    unsigned_index = code_index(unsigned_map.data_ptr<float>());
  }
  bool all_finite = true;
  AdamScalars s{};
  int64_t scalars_group = -1, scalars_step = -1;  // recomputed only when the group or step changes
  for (const MultiEntry& e : step.entries) {
    const at::Tensor& g = step.grads[e.param];
    if (!g.defined() || e.end == e.start) continue;
    if (e.group != scalars_group || counts[e.param] != scalars_step) {
      const double* h = hyper.data() + 5 * e.group;
      s = make_adam_scalars(h[0], h[1], h[2], h[3], h[4], counts[e.param], decoupled);
      scalars_group = e.group;
      scalars_step = counts[e.param];
    }
    const at::Tensor& p = params[e.param];
    const int64_t n = e.end - e.start;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "adam_multi_step_cpu", [&] {
      scalar_t* pp = p.data_ptr<scalar_t>() + e.start;
      const scalar_t* gp = g.data_ptr<scalar_t>() + e.start;
      if (e.kind == 0) {
        adam_tensor_cpu<scalar_t>(s, pp, gp, states[e.state].data_ptr<float>(),
                                  states[e.state + 1].data_ptr<float>(), n);
        return;
      }
      float* ma = states[e.state + 2].data_ptr<float>();
      float* va = states[e.state + 3].data_ptr<float>();
      adam8bit_tensor_cpu<scalar_t>(s, pp, gp, states[e.state].data_ptr<uint8_t>(),
                                    states[e.state + 1].data_ptr<uint8_t>(), ma, va, signed_map.data_ptr<float>(),
                                    unsigned_map.data_ptr<float>(), *signed_index, *unsigned_index, n);
      for (int64_t b = 0, blocks = (n + kQuantBlock - 1) / kQuantBlock; b < blocks; ++b) {
        all_finite = all_finite && std::isfinite(ma[b]) && std::isfinite(va[b]);
      }
    });
  }
  return !all_finite;
}

void adam8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList m_codes,
                       at::TensorList v_codes, at::TensorList m_absmax, at::TensorList v_absmax,
                       const at::Tensor& signed_map, const at::Tensor& unsigned_map,
                       at::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                       double weight_decay, bool decoupled) {
  adam8bit_step_checked_cpu(params, grads, m_codes, v_codes, m_absmax, v_absmax, signed_map, unsigned_map,
                            steps, lr, beta1, beta2, eps, weight_decay, decoupled);
}

}  // namespace qlora_fast
