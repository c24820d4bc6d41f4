// Bindings of the optimizer extension `qlora_fast._C`: the op schemas (TORCH_LIBRARY), the
// argument checks both devices share, the CPU registrations, and a bare Python module init so
// `import qlora_fast._C` loads the library (the ops are then under torch.ops.qlora_fast).
//
// Ops (all in place, many tensors per call, one step count per tensor):
//   adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, decoupled)
//   adam8bit_step_(params, grads, m_codes, v_codes, m_absmax, v_absmax, signed_map, unsigned_map,
//                  steps, lr, beta1, beta2, eps, weight_decay, decoupled)
//   adam8bit_step_checked_(same arguments) -> bool: CPU only; true when a new block absmax is
//                  not finite (the optimizer's overflow check without a pass over the states)
//   adam_multi_step_(params, grads, steps, states, entries, hyper, decoupled, signed_map, unsigned_map,
//                    nonfinite) -> bool: the optimizers' step, every param group and state kind of a
//                  device in one call: params and their optional grads and step-count tensors (one
//                  each per param; a param without a grad is skipped and its count kept), a flat list
//                  of state tensors, an int64 table of (param, group, kind, start, end, state) rows
//                  (see MultiEntry), and 5 floats (lr, beta1, beta2, eps, weight_decay) per group.
//                  Increments the counts of the params it updates. Returns (CPU) whether a new 8-bit
//                  block absmax is not finite; on CUDA it returns false and sets `nonfinite` (an int32
//                  device tensor) instead, so the host never waits.
// Class MultiStepPlan(params, steps, states, entries, signed_map, unsigned_map, nonfinite): those
//   arguments of adam_multi_step_ held in C++; .step(grads, hyper, decoupled) calls the op, so a
//   step passes only the gradients from Python (boxing each tensor of a list costs ~0.1 us).
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "adam_common.h"
#include "optim.h"

namespace qlora_fast {

void check_adam_args(at::TensorList params, at::TensorList grads, at::IntArrayRef steps,
                     c10::DeviceType device_type) {
  TORCH_CHECK(grads.size() == params.size(), "grads: expected ", params.size(), " tensors, got ", grads.size());
  TORCH_CHECK(steps.size() == params.size(), "steps: expected ", params.size(), " values, got ", steps.size());
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    const at::Tensor& g = grads[t];
    TORCH_CHECK(p.device().type() == device_type, "params[", t, "] is on ", p.device(), ", expected ", device_type);
    TORCH_CHECK(g.device() == p.device(), "grads[", t, "] is on ", g.device(), ", its param on ", p.device());
    const auto dt = p.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                "params[", t, "]: expected float32, bfloat16 or float16, got ", dt);
    TORCH_CHECK(g.scalar_type() == dt, "grads[", t, "]: dtype ", g.scalar_type(), " != param dtype ", dt);
    TORCH_CHECK(g.numel() == p.numel(), "grads[", t, "]: ", g.numel(), " elements, param has ", p.numel());
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous(), "params[", t, "] and grads[", t, "] must be contiguous");
    TORCH_CHECK(steps[t] >= 1, "steps[", t, "] must be >= 1, got ", steps[t]);
  }
}

static void check_state(const at::Tensor& p, const at::Tensor& s, at::ScalarType dtype, int64_t numel,
                        const char* name, size_t t) {
  TORCH_CHECK(s.device() == p.device(), name, "[", t, "] is on ", s.device(), ", its param on ", p.device());
  TORCH_CHECK(s.scalar_type() == dtype, name, "[", t, "]: expected ", dtype, ", got ", s.scalar_type());
  TORCH_CHECK(s.numel() == numel, name, "[", t, "]: expected ", numel, " elements, got ", s.numel());
  TORCH_CHECK(s.is_contiguous(), name, "[", t, "] must be contiguous");
}

void check_adam32_states(at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs) {
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(),
              "exp_avgs and exp_avg_sqs need one tensor per param");
  for (size_t t = 0; t < params.size(); ++t) {
    check_state(params[t], exp_avgs[t], at::kFloat, params[t].numel(), "exp_avgs", t);
    check_state(params[t], exp_avg_sqs[t], at::kFloat, params[t].numel(), "exp_avg_sqs", t);
  }
}

void check_adam8bit_states(at::TensorList params, at::TensorList m_codes, at::TensorList v_codes,
                           at::TensorList m_absmax, at::TensorList v_absmax,
                           const at::Tensor& signed_map, const at::Tensor& unsigned_map) {
  const size_t n = params.size();
  TORCH_CHECK(m_codes.size() == n && v_codes.size() == n && m_absmax.size() == n && v_absmax.size() == n,
              "m_codes, v_codes, m_absmax and v_absmax need one tensor per param");
  for (const at::Tensor* map : {&signed_map, &unsigned_map}) {
    TORCH_CHECK(map->scalar_type() == at::kFloat && map->numel() == 256 && map->is_contiguous(),
                "the 8-bit maps must be contiguous float32 tensors of 256 sorted values");
  }
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    const int64_t blocks = (p.numel() + kQuantBlock - 1) / kQuantBlock;
    TORCH_CHECK(signed_map.device() == p.device() && unsigned_map.device() == p.device(),
                "the 8-bit maps must be on the params' device ", p.device());
    check_state(p, m_codes[t], at::kByte, p.numel(), "m_codes", t);
    check_state(p, v_codes[t], at::kByte, p.numel(), "v_codes", t);
    check_state(p, m_absmax[t], at::kFloat, blocks, "m_absmax", t);
    check_state(p, v_absmax[t], at::kFloat, blocks, "v_absmax", t);
  }
}

MultiStep check_multi_args(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                           at::TensorList steps, at::TensorList states, const at::Tensor& entries,
                           at::ArrayRef<double> hyper, const at::Tensor& signed_map, const at::Tensor& unsigned_map,
                           c10::DeviceType device_type) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, "grads: expected ", n, " entries (None for a param without a gradient), got ",
              grads.size());
  TORCH_CHECK(steps.size() == n, "steps: expected ", n, " step-count tensors, got ", steps.size());
  TORCH_CHECK(hyper.size() % 5 == 0, "hyper: expected 5 values per group, got ", hyper.size());
  TORCH_CHECK(entries.device().is_cpu() && entries.scalar_type() == at::kLong && entries.dim() == 2 &&
                  entries.size(1) == kMultiColumns && entries.is_contiguous(),
              "entries: expected a contiguous CPU int64 tensor of shape (rows, ", kMultiColumns, ")");
  MultiStep out;
  out.grads.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().type() == device_type, "params[", i, "] is on ", p.device(), ", expected ", device_type);
    TORCH_CHECK(p.device() == params[0].device(), "all params of one call must be on one device");
    const auto dt = p.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                "params[", i, "]: expected float32, bfloat16 or float16, got ", dt);
    TORCH_CHECK(p.is_contiguous(), "params[", i, "] must be contiguous");
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1,
                "steps[", i, "]: expected a one-element float32 CPU tensor (the step count), got ", s.scalar_type(),
                " ", s.sizes(), " on ", s.device());
    const std::optional<at::Tensor> g = grads[i];
    if (!g.has_value() || !g->defined()) continue;
    // TypeError, as the optimizers' own checks of a gradient raise.
    TORCH_CHECK_TYPE(g->layout() == at::kStrided, "qlora_fast Adam optimizers do not support sparse gradients");
    TORCH_CHECK_TYPE(!g->is_complex(), "qlora_fast Adam optimizers do not support complex parameters or gradients");
    TORCH_CHECK_TYPE(g->scalar_type() == dt && g->sizes() == p.sizes(), "gradient ", g->scalar_type(), " ",
                     g->sizes(), " of params[", i, "] does not match its parameter ", dt, " ", p.sizes());
    TORCH_CHECK(g->device() == p.device(), "grads[", i, "] is on ", g->device(), ", its param on ", p.device());
    out.grads[i] = g->contiguous();
  }
  const int64_t rows = entries.size(0);
  const int64_t* e = entries.data_ptr<int64_t>();
  out.entries.reserve(rows);
  for (int64_t r = 0; r < rows; ++r, e += kMultiColumns) {
    const MultiEntry x{e[0], e[1], e[2], e[3], e[4], e[5]};
    TORCH_CHECK(x.param >= 0 && x.param < static_cast<int64_t>(n), "entries[", r, "]: param ", x.param,
                " out of range");
    TORCH_CHECK(x.group >= 0 && x.group < static_cast<int64_t>(hyper.size() / 5), "entries[", r, "]: group ",
                x.group, " has no hyper-parameters");
    TORCH_CHECK(x.kind == 0 || x.kind == 1, "entries[", r, "]: kind must be 0 (fp32) or 1 (8-bit), got ", x.kind);
    const at::Tensor& p = params[x.param];
    TORCH_CHECK(0 <= x.start && x.start <= x.end && x.end <= p.numel(), "entries[", r, "]: slice [", x.start, ", ",
                x.end, ") out of params[", x.param, "] (", p.numel(), " elements)");
    const int64_t width = x.kind == 0 ? 2 : 4;
    TORCH_CHECK(x.state >= 0 && x.state + width <= static_cast<int64_t>(states.size()), "entries[", r,
                "]: states[", x.state, "...] out of range");
    const int64_t len = x.end - x.start;
    if (x.kind == 0) {
      check_state(p, states[x.state], at::kFloat, len, "states", static_cast<size_t>(x.state));
      check_state(p, states[x.state + 1], at::kFloat, len, "states", static_cast<size_t>(x.state + 1));
    } else {
      TORCH_CHECK(x.start % kQuantBlock == 0, "entries[", r, "]: an 8-bit slice must start at a multiple of ",
                  kQuantBlock, ", got ", x.start);
      const int64_t blocks = (len + kQuantBlock - 1) / kQuantBlock;
      check_state(p, states[x.state], at::kByte, len, "states", static_cast<size_t>(x.state));
      check_state(p, states[x.state + 1], at::kByte, len, "states", static_cast<size_t>(x.state + 1));
      check_state(p, states[x.state + 2], at::kFloat, blocks, "states", static_cast<size_t>(x.state + 2));
      check_state(p, states[x.state + 3], at::kFloat, blocks, "states", static_cast<size_t>(x.state + 3));
      out.any_8bit = true;
    }
    out.entries.push_back(x);
  }
  if (out.any_8bit) {
    for (const at::Tensor* map : {&signed_map, &unsigned_map}) {
      TORCH_CHECK(map->scalar_type() == at::kFloat && map->numel() == 256 && map->is_contiguous() &&
                      map->device() == params[0].device(),
                  "the 8-bit maps must be contiguous float32 tensors of 256 sorted values on the params' device");
    }
  }
  return out;
}

std::vector<int64_t> advance_steps(at::TensorList steps, const MultiStep& step) {
  std::vector<int64_t> counts(steps.size(), 0);
  for (size_t i = 0; i < steps.size(); ++i) {
    if (!step.grads[i].defined()) continue;
    float* count = steps[i].data_ptr<float>();
    *count += 1.0f;
    counts[i] = static_cast<int64_t>(*count);
  }
  return counts;
}

// The arguments of adam_multi_step_ that stay the same from step to step (see the top comment).
// `params` hold the parameters' TensorImpls, which `p.data = ...` updates in place.
struct MultiStepPlan : torch::CustomClassHolder {
  std::vector<at::Tensor> params, steps, states;
  at::Tensor entries, signed_map, unsigned_map;
  std::optional<at::Tensor> nonfinite;

  MultiStepPlan(std::vector<at::Tensor> params_, std::vector<at::Tensor> steps_, std::vector<at::Tensor> states_,
                at::Tensor entries_, at::Tensor signed_map_, at::Tensor unsigned_map_,
                std::optional<at::Tensor> nonfinite_)
      : params(std::move(params_)), steps(std::move(steps_)), states(std::move(states_)), entries(std::move(entries_)),
        signed_map(std::move(signed_map_)), unsigned_map(std::move(unsigned_map_)), nonfinite(std::move(nonfinite_)) {}

  bool step(const c10::List<std::optional<at::Tensor>>& grads, std::vector<double> hyper, bool decoupled) {
    // Through the dispatcher (unboxed), so the device's kernel runs: CPU or CUDA.
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("qlora_fast::adam_multi_step_", "")
                         .typed<bool(at::TensorList, const c10::List<std::optional<at::Tensor>>&, at::TensorList,
                                     at::TensorList, const at::Tensor&, at::ArrayRef<double>, bool, const at::Tensor&,
                                     const at::Tensor&, const std::optional<at::Tensor>&)>();
    return op.call(params, grads, steps, states, entries, hyper, decoupled, signed_map, unsigned_map, nonfinite);
  }
};

}  // namespace qlora_fast

TORCH_LIBRARY(qlora_fast, m) {
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "int[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled) -> ()");
  m.def(
      "adam8bit_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] m_codes, Tensor(c!)[] v_codes, "
      "Tensor(d!)[] m_absmax, Tensor(e!)[] v_absmax, Tensor signed_map, Tensor unsigned_map, int[] steps, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled) -> ()");
  m.def(
      "adam8bit_step_checked_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] m_codes, Tensor(c!)[] v_codes, "
      "Tensor(d!)[] m_absmax, Tensor(e!)[] v_absmax, Tensor signed_map, Tensor unsigned_map, int[] steps, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled) -> bool");
  m.def(
      "adam_multi_step_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] steps, Tensor(c!)[] states, "
      "Tensor entries, float[] hyper, bool decoupled, Tensor signed_map, Tensor unsigned_map, "
      "Tensor(d!)? nonfinite) -> bool");
  m.class_<qlora_fast::MultiStepPlan>("MultiStepPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
                       at::Tensor, at::Tensor, std::optional<at::Tensor>>())
      .def("step", &qlora_fast::MultiStepPlan::step);
}

TORCH_LIBRARY_IMPL(qlora_fast, CPU, m) {
  m.impl("adam_step_", &qlora_fast::adam_step_cpu);
  m.impl("adam8bit_step_", &qlora_fast::adam8bit_step_cpu);
  m.impl("adam8bit_step_checked_", &qlora_fast::adam8bit_step_checked_cpu);
  m.impl("adam_multi_step_", &qlora_fast::adam_multi_step_cpu);
}

// A sparse gradient routes the call to the sparse key: the same kernel, whose checks then raise
// the TypeError that names the problem (instead of the dispatcher's "no kernel" error).
TORCH_LIBRARY_IMPL(qlora_fast, SparseCPU, m) {
  m.impl("adam_multi_step_", &qlora_fast::adam_multi_step_cpu);
}

// The hash of the sources this library was built from (setup.py / the JIT loader define it):
// qlora_fast/_extension.py reads it from the file, before loading, to skip a stale build.
#define QF_STRINGIFY2(x) #x
#define QF_STRINGIFY(x) QF_STRINGIFY2(x)
#ifndef QLORA_FAST_SOURCE_HASH
#define QLORA_FAST_SOURCE_HASH unknown
#endif
__attribute__((used)) static const char kSourceHash[] = "qlora_fast_source_hash:" QF_STRINGIFY(QLORA_FAST_SOURCE_HASH);

// A bare module: importing it runs the static registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "qlora_fast optimizer ops (torch.ops.qlora_fast)", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr) PyModule_AddStringConstant(module, "source_hash", kSourceHash + sizeof("qlora_fast_source_hash:") - 1);
  return module;
}
