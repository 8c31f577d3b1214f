// The one place that registers fastdecode's C++ ops with torch: schemas (outputs first, mutated
// tensors marked) and the CPU implementations. CUDA implementations of the same schemas are
// registered by csrc/cuda/registration.cpp when the extension is built with CUDA.
#include <Python.h>
#include <torch/library.h>

#include "cpu/ops.h"

// The module object only exists so `import fastdecode._C` loads the library and runs the
// registrations below.
static struct PyModuleDef fastdecode_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastdecode_module); }

TORCH_LIBRARY(fastdecode, m) {
  m.def("append_kv(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping) -> ()");
  m.def("paged_attention(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, "
        "Tensor block_tables, Tensor seq_lens, Tensor? cu_seqlens_q, float scale, bool causal, "
        "float softcap, int sliding_window, Tensor? alibi_slopes, Tensor? relative_bias=None) "
        "-> ()");
  // CPU only: paged attention that also returns each row's log-sum-exp (shared-prefix decode).
  m.def("paged_attention_lse(Tensor(a!) out, Tensor(b!) lse, Tensor query, Tensor k_cache, "
        "Tensor v_cache, Tensor block_tables, Tensor seq_lens, Tensor? cu_seqlens_q, "
        "float scale, bool causal, float softcap) -> ()");
  m.def("apply_repetition_penalty(Tensor logits, Tensor? seen_tokens, Tensor penalty) -> Tensor");
  m.def("process_logits(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, "
        "Tensor min_p, Tensor repetition_penalty, Tensor? seen_tokens) -> Tensor");
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, "
        "Tensor repetition_penalty, Tensor? seen_tokens, Tensor seeds, Tensor offsets) -> Tensor");
  // CPU only: the weight-streaming linear product of the fast-linear path.
  m.def("packed_linear_panel_width() -> int", &fastdecode::cpu::packed_linear_panel_width);
  m.def("pack_linear_weight(Tensor(a!) packed, Tensor weight) -> ()");
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor");
  // CPU only: the native decoder step's elementwise layers.
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_embedding(Tensor(a!) x, Tensor positions, Tensor inv_freq, float scaling) -> ()");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  // CPU only: every decoder layer of a Llama-family step, float32.
  m.def("decoder_layers(Tensor(a!) hidden, Tensor positions, Tensor?[] layers, "
        "Tensor(b!)[] k_caches, Tensor(c!)[] v_caches, int[] sliding_windows, "
        "Tensor block_tables, Tensor seq_lens, Tensor? cu_seqlens_q, Tensor slot_mapping, "
        "Tensor inv_freq, float rotary_scaling, int num_heads, float eps, float scale, "
        "Tensor[] shared_prefix) -> ()");
  m.def("contrastive_logits(Tensor expert_logits, Tensor amateur_logits, Tensor alpha, "
        "Tensor plausibility) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastdecode, CPU, m) {
  m.impl("append_kv", &fastdecode::cpu::append_kv);
  m.impl("paged_attention", &fastdecode::cpu::paged_attention);
  m.impl("paged_attention_lse", &fastdecode::cpu::paged_attention_lse);
  m.impl("apply_repetition_penalty", &fastdecode::cpu::apply_repetition_penalty);
  m.impl("process_logits", &fastdecode::cpu::process_logits);
  m.impl("sample", &fastdecode::cpu::sample);
  m.impl("pack_linear_weight", &fastdecode::cpu::pack_linear_weight);
  m.impl("packed_linear", &fastdecode::cpu::packed_linear);
  m.impl("rms_norm", &fastdecode::cpu::rms_norm);
  m.impl("rotary_embedding", &fastdecode::cpu::rotary_embedding);
  m.impl("silu_and_mul", &fastdecode::cpu::silu_and_mul);
  m.impl("decoder_layers", &fastdecode::cpu::decoder_layers);
  m.impl("contrastive_logits", &fastdecode::cpu::contrastive_logits);
}
