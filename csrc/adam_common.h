// Shared, header-only pieces of the Adam/AdamW updates: per-tensor scalars and the 8-bit
// code search. Plain C++ (no torch headers) so the CPU and CUDA paths share one definition.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define QF_HOST_DEVICE __host__ __device__
#else
#define QF_HOST_DEVICE
#endif

namespace qlora_fast {

// Elements per 8-bit quantization block (one fp32 absmax each), as in bitsandbytes.
constexpr int64_t kQuantBlock = 256;

// The scalars of one Adam step for one tensor, computed once on the host in double and
// rounded to float exactly as torch.optim.AdamW (foreach=False) rounds them.
struct AdamScalars {
  float lr;
  float beta1;
  float beta2;
  float one_minus_beta1;   // rounded from double, as torch passes 1 - beta1 to lerp_
  float one_minus_beta2;
  float eps;
  float weight_decay;
  float step_size;         // lr / (1 - beta1^step)
  float bias_corr2_sqrt;   // sqrt(1 - beta2^step)
  float decay_factor;      // 1 - lr * weight_decay (decoupled) or 1
  int decoupled;           // 1: AdamW (decay the weight), 0: Adam (add wd * p to the gradient)
};

inline AdamScalars make_adam_scalars(double lr, double beta1, double beta2, double eps,
                                     double weight_decay, int64_t step, bool decoupled) {
  AdamScalars s;
  s.lr = static_cast<float>(lr);
  s.beta1 = static_cast<float>(beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.weight_decay = static_cast<float>(weight_decay);
  s.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, static_cast<double>(step))));
  s.bias_corr2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step))));
  s.decay_factor = decoupled ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  s.decoupled = decoupled ? 1 : 0;
  return s;
}

// max(a, b) that keeps a NaN from either side (std::max and fmaxf drop it): a NaN gradient makes
// its block's new absmax NaN, so the optimizer's non-finite check sees it as it sees inf.
QF_HOST_DEVICE inline float max_keep_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// One element of the update, in fp32. Follows torch's single-tensor AdamW:
//   p *= 1 - lr*wd;  m = lerp(m, g, 1-beta1);  v = beta2*v + (1-beta2)*g*g;
//   p -= step_size * m / (sqrt(v)/sqrt(bc2) + eps)
// torch's lerp computes m + w*(g-m) for w < 0.5 and g - (g-m)*(1-w) otherwise.
QF_HOST_DEVICE inline void adam_element(const AdamScalars& s, float& p, float g, float& m, float& v) {
  if (s.decoupled) {
    p = p * s.decay_factor;
  } else {
    g = g + s.weight_decay * p;
  }
  const float w = s.one_minus_beta1;
  const float diff = g - m;
  m = (w < 0.5f) ? m + w * diff : g - diff * (1.0f - w);
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / s.bias_corr2_sqrt + s.eps;
  p = p - s.step_size * (m / denom);
}

// The 255 midpoints of a sorted 256-entry code in breadth-first (Eytzinger) order: tree[1] is
// the middle one and the children of tree[k] are tree[2k] and tree[2k+1] (tree[0] unused). A
// search then reads tree[1], tree[2..3], tree[4..7], ...: the first levels are broadcasts and
// the deeper ones spread over the shared-memory banks, unlike a search over the sorted array
// where a warp's lanes pile onto the same few banks.
QF_HOST_DEVICE inline int eytzinger_sorted_index(int k) {
  int level = 0;
  while ((k >> (level + 1)) != 0) ++level;  // floor(log2(k)), k in [1, 255]
  return (2 * (k - (1 << level)) + 1) * (1 << (7 - level)) - 1;
}

QF_HOST_DEVICE inline float eytzinger_midpoint(const float* code, int k) {
  const int i = eytzinger_sorted_index(k);
  return (code[i] + code[i + 1]) * 0.5f;
}

// Index of the code nearest to x, given the midpoints as an Eytzinger `tree`: the number of
// midpoints below x (the first midpoint >= x; ties go to the lower code, like
// torch.bucketize(right=False)). In a perfect tree of 255 keys the leaf reached, k - 256, is
// exactly that count. Branch-free (a select per level).
QF_HOST_DEVICE inline int nearest_code(const float* tree, float x) {
  int k = 1;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int level = 0; level < 8; ++level) k = 2 * k + (tree[k] < x ? 1 : 0);
  return k - 256;
}

// The code of a scaled second moment (unsigned map, code[0] = 0, code[1] its smallest positive
// value). A positive v never takes code 0: with nearest rounding, every v below half of code[1]
// (~1.6e-7 of the block absmax, i.e. a gradient ~2500x smaller than the block's largest) became
// exactly 0, and the next step divided a remembered m by sqrt((1-beta2) g^2) + eps instead of by
// its history (by eps alone where g = 0): block-mates of an outlier drifted without bound.
// Rounding such v up to code[1] overestimates v, which only shortens their steps (as the
// second-moment maps without a zero of 4-bit Adam, Li et al. 2023, do).
// `code` is the nearest code of `scaled` (CPU: CodeIndex, CUDA: the shared-memory search).
QF_HOST_DEVICE inline int second_moment_code(int code, float scaled) {
  return (code == 0 && scaled > 0.0f) ? 1 : code;
}

}  // namespace qlora_fast
