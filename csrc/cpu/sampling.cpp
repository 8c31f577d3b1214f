// Torch adapters of the CPU sampling kernels: check arguments, dispatch on the logits dtype,
// run the row kernels of sampling_kernel.h in parallel over rows (at::parallel_for, so the thread
// count follows torch.get_num_threads()).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/checks.h"
#include "../common/philox.h"
#include "ops.h"
#include "sampling_kernel.h"
#include "value_checks.h"

namespace fastdecode::cpu {
namespace {

namespace s = sampling;

// logits [B, V] on CPU with unit stride along V (row stride free).
at::Tensor checked_logits(const char* op, const at::Tensor& logits) {
  FASTDECODE_CHECK(logits.device().is_cpu(), op, "logits must be a CPU tensor, got ",
                   logits.device());
  checks::logits(op, logits);
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

// seen_tokens [B, L] int64 with ids < V (-1 = padding), made contiguous; undefined when absent.
at::Tensor checked_seen(const char* op, const std::optional<at::Tensor>& seen_tokens,
                        const at::Tensor& logits) {
  if (!checks::seen_tokens(op, seen_tokens, logits)) return {};
  values::seen_ids(op, *seen_tokens, logits.size(1));
  return seen_tokens->contiguous();
}

// Calls f(T{}) with T the C++ type of the (already checked) logits dtype.
template <typename F>
void dispatch_logits(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default: return f(c10::Half{});
  }
}

// Calls f(row, input, workspace) for every row b in parallel; each thread keeps its workspace.
template <typename T, typename F>
void for_each_row(const at::Tensor& logits, const at::Tensor& seen, F&& f) {
  const int64_t batch = logits.size(0), vocab = logits.size(1), row_stride = logits.stride(0);
  const T* base = logits.const_data_ptr<T>();
  const int64_t num_seen = seen.defined() ? seen.size(1) : 0;
  const int64_t* seen_base = seen.defined() ? seen.const_data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    thread_local s::Workspace ws;
    for (int64_t b = begin; b < end; ++b) {
      const s::RowInput<T> in{base + b * row_stride, vocab,
                              seen_base != nullptr ? seen_base + b * num_seen : nullptr, num_seen};
      f(b, in, ws);
    }
  });
}

// The per-row parameter tensors, checked, with their data pointers.
struct RowParamTensors {
  at::Tensor temperature, top_k, top_p, min_p, penalty;

  RowParamTensors(const char* op, const at::Tensor& logits, const at::Tensor& temperature_,
                  const at::Tensor& top_k_, const at::Tensor& top_p_, const at::Tensor& min_p_,
                  const at::Tensor& penalty_)
      : temperature(temperature_.contiguous()),
        top_k(top_k_.contiguous()),
        top_p(top_p_.contiguous()),
        min_p(min_p_.contiguous()),
        penalty(penalty_.contiguous()) {
    checks::per_row(op, temperature, "temperature", at::kFloat, logits);
    checks::per_row(op, top_k, "top_k", at::kInt, logits);
    checks::per_row(op, top_p, "top_p", at::kFloat, logits);
    checks::per_row(op, min_p, "min_p", at::kFloat, logits);
    checks::per_row(op, penalty, "repetition_penalty", at::kFloat, logits);
  }

  s::RowParams row(int64_t b) const {
    return {temperature.const_data_ptr<float>()[b], top_k.const_data_ptr<int32_t>()[b],
            top_p.const_data_ptr<float>()[b], min_p.const_data_ptr<float>()[b],
            penalty.const_data_ptr<float>()[b]};
  }
};

}  // namespace

at::Tensor apply_repetition_penalty(const at::Tensor& logits_,
                                    const std::optional<at::Tensor>& seen_tokens,
                                    const at::Tensor& penalty_) {
  constexpr const char* op = "apply_repetition_penalty";
  const at::Tensor logits = checked_logits(op, logits_);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  const at::Tensor penalty = penalty_.contiguous();
  checks::per_row(op, penalty, "penalty", at::kFloat, logits);
  const at::Tensor seen = checked_seen(op, seen_tokens, logits);
  at::Tensor out = at::empty({batch, vocab}, logits.options().dtype(at::kFloat));
  float* out_ptr = out.data_ptr<float>();
  const float* pen = penalty.const_data_ptr<float>();
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for_each_row<T>(logits, seen, [&](int64_t b, const s::RowInput<T>& in, s::Workspace& ws) {
      s::penalize_row(in, pen[b], out_ptr + b * vocab, ws);
    });
  });
  return out;
}

at::Tensor process_logits(const at::Tensor& logits_, const at::Tensor& temperature,
                          const at::Tensor& top_k, const at::Tensor& top_p,
                          const at::Tensor& min_p, const at::Tensor& repetition_penalty,
                          const std::optional<at::Tensor>& seen_tokens) {
  constexpr const char* op = "process_logits";
  const at::Tensor logits = checked_logits(op, logits_);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  const RowParamTensors params(op, logits, temperature, top_k, top_p, min_p, repetition_penalty);
  const at::Tensor seen = checked_seen(op, seen_tokens, logits);
  at::Tensor out = at::empty({batch, vocab}, logits.options().dtype(at::kFloat));
  float* out_ptr = out.data_ptr<float>();
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for_each_row<T>(logits, seen, [&](int64_t b, const s::RowInput<T>& in, s::Workspace& ws) {
      s::process_row(in, params.row(b), out_ptr + b * vocab, ws);
    });
  });
  return out;
}

at::Tensor sample(const at::Tensor& logits_, const at::Tensor& temperature,
                  const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                  const at::Tensor& repetition_penalty,
                  const std::optional<at::Tensor>& seen_tokens, const at::Tensor& seeds_,
                  const at::Tensor& offsets_) {
  constexpr const char* op = "sample";
  const at::Tensor logits = checked_logits(op, logits_);
  const int64_t batch = logits.size(0);
  const RowParamTensors params(op, logits, temperature, top_k, top_p, min_p, repetition_penalty);
  const at::Tensor seen = checked_seen(op, seen_tokens, logits);
  const at::Tensor seeds = seeds_.contiguous(), offsets = offsets_.contiguous();
  checks::per_row(op, seeds, "seeds", at::kLong, logits);
  checks::per_row(op, offsets, "offsets", at::kLong, logits);
  at::Tensor out = at::empty({batch}, logits.options().dtype(at::kLong));
  int64_t* out_ptr = out.data_ptr<int64_t>();
  const int64_t* seed = seeds.const_data_ptr<int64_t>();
  const int64_t* offset = offsets.const_data_ptr<int64_t>();
  dispatch_logits(logits.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for_each_row<T>(logits, seen, [&](int64_t b, const s::RowInput<T>& in, s::Workspace& ws) {
      const float u = philox_uniform(static_cast<uint64_t>(seed[b]),
                                     static_cast<uint64_t>(offset[b]));
      out_ptr[b] = s::sample_row(in, params.row(b), u, ws);
    });
  });
  return out;
}

}  // namespace fastdecode::cpu
