// The Llama-family decoder layer loop (see decoder_step.h): every step of a layer is one call
// of an existing kernel; only the residual add lives here.
#include "decoder_step.h"

#include <algorithm>
#include <cmath>

#include "attention_kernels.h"
#include "layer_kernels.h"
#include "linear_kernel.h"

namespace fastdecode::cpu {
namespace {

// Scratch regions of one call, in floats, laid out one after another.
struct Scratch {
  float *normed, *qkv, *attn, *proj, *gate_up, *act;
  float *shared, *lse;  // shared-prefix steps: [T, Hq, D] the shared part, [2, T, Hq]
};

Scratch carve(float* base, int64_t t, int64_t h, int64_t inter, int64_t hq, int64_t hkv,
              int64_t d) {
  Scratch s{};
  s.normed = base;
  s.qkv = s.normed + t * h;
  s.attn = s.qkv + t * (hq + 2 * hkv) * d;
  s.proj = s.attn + t * hq * d;
  s.gate_up = s.proj + t * h;
  s.act = s.gate_up + t * 2 * inter;
  s.shared = s.act + t * inter;
  s.lse = s.shared + t * hq * d;
  return s;
}

void rms_norm(float* out, const float* x, const float* weight, int64_t rows, int64_t width,
              int64_t stride, float eps) {
  RmsNormParams p{};
  p.out = out;
  p.x = x;
  p.weight = weight;
  p.rows = rows;
  p.hidden = width;
  p.x_stride = p.out_stride = stride;
  p.eps = eps;
  rms_norm_kernel(p);
}

// out [T, out_features] (contiguous) = x [T, in_features] (contiguous) @ W^T (+ bias).
void linear(float* out, const float* x, const float* packed, const float* bias, int64_t tokens,
            int64_t in_features, int64_t out_features) {
  PackedLinearParams p{};
  p.out = out;
  p.x = x;
  p.packed = packed;
  p.bias = bias;
  p.num_tokens = tokens;
  p.in_features = in_features;
  p.out_features = out_features;
  p.x_stride = in_features;
  p.out_stride = out_features;
  packed_linear_kernel(p);
}

// hidden += y, both [n] contiguous. HF adds the residual after the product, in this order.
void add_into(float* hidden, const float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) hidden[i] += y[i];
}

// (qwen3) RMSNorm over each head's D values of q and k, in place in the q/k/v rows.
void norm_heads(const DecoderStepParams& p, const DecoderLayerWeights& w, float* qkv,
                int64_t row) {
  const int64_t hq = p.num_heads, hkv = p.num_kv_heads, d = p.head_dim;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    float* q = qkv + t * row;
    rms_norm(q, q, w.q_norm, hq, d, d, p.eps);
    rms_norm(q + hq * d, q + hq * d, w.k_norm, hkv, d, d, p.eps);
  }
}

// out = the shared part and the own part of each row, weighted by the softmax of their
// log-sum-exps (lse [2, T, Hq]; the own part always has a key, so the weights are finite).
void merge_parts(const DecoderStepParams& p, float* out, const float* shared, const float* lse) {
  const int64_t rows = p.num_tokens * p.num_heads, d = p.head_dim;
  for (int64_t r = 0; r < rows; ++r) {
    const float m = std::max(lse[r], lse[rows + r]);
    const float e_shared = std::exp(lse[r] - m), e_own = std::exp(lse[rows + r] - m);
    const float w_shared = e_shared / (e_shared + e_own), w_own = e_own / (e_shared + e_own);
    float* o = out + r * d;
    const float* sh = shared + r * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) o[i] = o[i] * w_own + sh[i] * w_shared;
  }
}

void attend(const DecoderStepParams& p, const DecoderLayerWeights& w, const Scratch& s,
            int64_t row) {
  const float* qkv = s.qkv;
  float* out = s.attn;
  const int64_t hq = p.num_heads, hkv = p.num_kv_heads, d = p.head_dim;
  AppendKvParams a{};
  a.key = qkv + hq * d;
  a.value = qkv + (hq + hkv) * d;
  a.k_cache = w.k_cache;
  a.v_cache = w.v_cache;
  a.slot_mapping = p.slot_mapping;
  a.num_tokens = p.num_tokens;
  a.num_kv_heads = hkv;
  a.head_dim = d;
  a.key_stride_t = a.value_stride_t = row;
  a.key_stride_h = a.value_stride_h = d;
  append_kv_kernel<float>(a);

  PagedAttentionParams at{};
  at.out = out;
  at.query = qkv;
  at.k_cache = w.k_cache;
  at.v_cache = w.v_cache;
  at.block_tables = p.block_tables;
  at.seq_lens = p.seq_lens;
  at.cu_seqlens_q = p.cu_seqlens_q;
  at.num_seqs = p.num_seqs;
  at.num_qo_heads = hq;
  at.num_kv_heads = hkv;
  at.head_dim = d;
  at.block_size = p.block_size;
  at.max_blocks_per_seq = p.max_blocks_per_seq;
  at.q_stride_t = row;
  at.q_stride_h = d;
  at.o_stride_t = hq * d;
  at.o_stride_h = d;
  at.scale = p.scale;
  at.sliding_window = w.sliding_window;
  at.causal = true;
  const SharedPrefixParams* sp = p.shared_prefix;
  if (sp == nullptr || w.sliding_window > 0) {
    paged_attention_kernel<float>(at);
    return;
  }
  PagedAttentionParams shared = at;  // every query row over the shared blocks, no mask
  shared.out = s.shared;
  shared.lse = s.lse;
  shared.block_tables = sp->tables;
  shared.seq_lens = sp->lens;
  shared.cu_seqlens_q = sp->cu_seqlens;
  shared.num_seqs = 1;
  shared.max_blocks_per_seq = sp->num_blocks;
  shared.causal = false;
  paged_attention_kernel<float>(shared);
  at.lse = s.lse + p.num_tokens * p.num_heads;  // each row over its own blocks
  at.block_tables = sp->suffix_tables;
  at.seq_lens = sp->suffix_lens;
  at.max_blocks_per_seq = sp->suffix_max_blocks;
  paged_attention_kernel<float>(at);
  merge_parts(p, out, s.shared, s.lse);
}

}  // namespace

int64_t decoder_step_scratch_size(int64_t num_tokens, int64_t hidden_size,
                                  int64_t intermediate_size, int64_t num_heads,
                                  int64_t num_kv_heads, int64_t head_dim) {
  return num_tokens * (2 * hidden_size + (3 * num_heads + 2 * num_kv_heads) * head_dim +
                       3 * intermediate_size + 2 * num_heads);
}

void decoder_step_kernel(const DecoderStepParams& p) {
  const int64_t t = p.num_tokens, h = p.hidden_size, inter = p.intermediate_size;
  const int64_t hq = p.num_heads, hkv = p.num_kv_heads, d = p.head_dim;
  const int64_t row = (hq + 2 * hkv) * d;
  const Scratch s = carve(p.scratch, t, h, inter, hq, hkv, d);
  RotaryParams rot{};
  rot.positions = p.positions;
  rot.inv_freq = p.inv_freq;
  rot.scaling = p.rotary_scaling;
  rot.tokens = t;
  rot.heads = hq + hkv;
  rot.head_dim = d;
  rot.x = s.qkv;
  rot.x_stride_token = row;
  rot.x_stride_head = d;
  SiluMulParams act{};
  act.out = s.act;
  act.gate_up = s.gate_up;
  act.tokens = t;
  act.width = inter;
  act.in_stride = 2 * inter;
  act.out_stride = inter;
  for (int64_t l = 0; l < p.num_layers; ++l) {
    const DecoderLayerWeights& w = p.layers[l];
    rms_norm(s.normed, p.hidden, w.input_norm, t, h, h, p.eps);
    linear(s.qkv, s.normed, w.qkv, w.qkv_bias, t, h, row);
    if (w.q_norm != nullptr) norm_heads(p, w, s.qkv, row);
    rotary_kernel(rot);
    attend(p, w, s, row);
    linear(s.proj, s.attn, w.o, w.o_bias, t, hq * d, h);
    add_into(p.hidden, s.proj, t * h);
    rms_norm(s.normed, p.hidden, w.post_norm, t, h, h, p.eps);
    linear(s.gate_up, s.normed, w.gate_up, w.gate_up_bias, t, h, 2 * inter);
    silu_mul_kernel(act);
    linear(s.proj, s.act, w.down, w.down_bias, t, inter, h);
    add_into(p.hidden, s.proj, t * h);
  }
}

}  // namespace fastdecode::cpu
