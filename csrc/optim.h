// Declarations shared by the bindings (optim.cpp) and the CPU / CUDA implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

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

}  // namespace qlora_fast
