// Declarations shared by the bindings (optim.cpp) and the CPU / CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/util/ArrayRef.h>

#include <vector>

namespace qlora_fast {

// Argument checks shared by both devices; `device_type` is the device every tensor must be on.
void check_adam_args(at::TensorList params, at::TensorList grads, at::IntArrayRef steps,
                     c10::DeviceType device_type);
void check_adam32_states(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs);
void check_adam8bit_states(at::TensorList params, at::TensorList m_codes, at::TensorList v_codes,
                           at::TensorList m_absmax, at::TensorList v_absmax,
                           const at::Tensor& signed_map, const at::Tensor& unsigned_map);

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::IntArrayRef steps, double lr, double beta1,
                   double beta2, double eps, double weight_decay, bool decoupled);

void adam8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList m_codes,
                       at::TensorList v_codes, at::TensorList m_absmax, at::TensorList v_absmax,
                       const at::Tensor& signed_map, const at::Tensor& unsigned_map,
                       at::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                       double weight_decay, bool decoupled);

// adam8bit_step_cpu that also says whether any new block absmax is not finite (the optimizer's
// overflow check, CPU only: on CUDA the flag is computed on the device and read later).
bool adam8bit_step_checked_cpu(at::TensorList params, at::TensorList grads, at::TensorList m_codes,
                               at::TensorList v_codes, at::TensorList m_absmax, at::TensorList v_absmax,
                               const at::Tensor& signed_map, const at::Tensor& unsigned_map,
                               at::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                               double weight_decay, bool decoupled);

// The multi-tensor step (adam_multi_step_): one row of its `entries` table, a slice
// [start, end) of params[param] updated with hyper-parameter group `group`; kind 0: fp32 states
// states[state], states[state + 1] (m, v); kind 1: 8-bit states states[state .. state + 3]
// (m codes, v codes, m absmax, v absmax).
struct MultiEntry {
  int64_t param, group, kind, start, end, state;
};
constexpr int64_t kMultiColumns = 6;

// Its arguments after the checks both devices share (nothing is changed by the checks):
// contiguous gradients (undefined where a param has none: its entries are skipped) and the rows.
struct MultiStep {
  std::vector<at::Tensor> grads;
  std::vector<MultiEntry> entries;
  bool any_8bit = false;
};
MultiStep check_multi_args(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                           at::TensorList steps, at::TensorList states, const at::Tensor& entries,
                           at::ArrayRef<double> hyper, const at::Tensor& signed_map, const at::Tensor& unsigned_map,
                           c10::DeviceType device_type);
// Add 1 to the step count of every param with a gradient; returns each param's new count
// (0 where it has no gradient). Call after the checks, so a failed call changes nothing.
std::vector<int64_t> advance_steps(at::TensorList steps, const MultiStep& step);

bool adam_multi_step_cpu(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                         at::TensorList steps, at::TensorList states, const at::Tensor& entries,
                         at::ArrayRef<double> hyper, bool decoupled, const at::Tensor& signed_map,
                         const at::Tensor& unsigned_map, const std::optional<at::Tensor>& nonfinite);

}  // namespace qlora_fast
