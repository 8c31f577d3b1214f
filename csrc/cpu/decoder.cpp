// Torch adapter of the Llama-family layer loop (decoder_step.h): checks every tensor once per
// call (errors name the argument and the layer), fills the params, runs every layer.
#include <ATen/ATen.h>

#include <array>
#include <string>
#include <vector>

#include "../common/checks.h"
#include "decoder_step.h"
#include "layer_kernels.h"
#include "linear_kernel.h"
#include "ops.h"
#include "value_checks.h"

namespace fastdecode::cpu {
namespace {

constexpr const char* kOp = "decoder_layers";

// The entries of `layers` per decoder layer, in order; the *_bias and q/k norms may be None.
enum Slot {
  kInputNorm, kQkv, kQkvBias, kQNorm, kKNorm, kO, kOBias, kPostNorm, kGateUp, kGateUpBias, kDown,
  kDownBias, kSlots
};
constexpr std::array<const char*, kSlots> kSlotNames = {
    "input_norm", "qkv", "qkv_bias", "q_norm", "k_norm", "o", "o_bias", "post_norm", "gate_up",
    "gate_up_bias", "down", "down_bias"};

using Layers = c10::List<std::optional<at::Tensor>>;

// A float32 CPU contiguous tensor of `shape`: the pointer, or nullptr for an allowed None.
const float* weight(const Layers& layers, int64_t layer, Slot slot, at::IntArrayRef shape,
                    const char* meaning, bool optional) {
  const std::optional<at::Tensor> t = layers.get(layer * kSlots + slot);
  const std::string name =
      "layers[" + std::to_string(layer * kSlots + slot) + "] (layer " + std::to_string(layer) +
      " " + kSlotNames[slot] + ")";
  if (!t.has_value()) {
    FASTDECODE_CHECK(optional, kOp, name, " must be a tensor, got None");
    return nullptr;
  }
  FASTDECODE_CHECK(t->device().is_cpu(), kOp, name, " must be a CPU tensor, got ", t->device());
  checks::dtype(kOp, *t, name.c_str(), at::kFloat);
  checks::shape(kOp, *t, name.c_str(), shape, meaning);
  FASTDECODE_CHECK(t->is_contiguous(), kOp, name, " must be contiguous");
  return t->const_data_ptr<float>();
}

std::vector<int64_t> packed_shape(int64_t out_features, int64_t in_features) {
  const int64_t panel = linear_panel_width();
  return {(out_features + panel - 1) / panel, in_features, panel};
}

// The shared-prefix plan's two attention calls checked as the public op checks them (shapes,
// then values), or nullopt without a plan.
std::optional<SharedPrefixParams> shared_prefix_params(
    at::TensorList plan, const at::Tensor& attn, const at::Tensor& query,
    const at::Tensor& k_cache, const at::Tensor& v_cache, bool decode_only, double scale) {
  if (plan.empty()) return std::nullopt;
  FASTDECODE_CHECK(plan.size() == 5, kOp, "shared_prefix must be empty or [tables, lens, "
                   "cu_seqlens, suffix_tables, suffix_lens], got ", plan.size(), " tensors");
  FASTDECODE_CHECK(decode_only, kOp, "shared_prefix applies to decode steps only (no "
                   "cu_seqlens_q)");
  const at::Tensor &tables = plan[0], &lens = plan[1], &cu = plan[2];
  const at::Tensor &suffix_tables = plan[3], &suffix_lens = plan[4];
  const checks::PagedDims shared = checks::paged_attention(
      attn, query, k_cache, v_cache, tables, lens, cu, scale, 0.0, 0, std::nullopt,
      std::nullopt);
  FASTDECODE_CHECK(shared.num_seqs == 1, kOp, "shared_prefix tables must be [1, C], got ",
                   tables.sizes());
  values::paged_attention(tables, lens, cu, std::nullopt, std::nullopt, false, shared);
  const checks::PagedDims own = checks::paged_attention(
      attn, query, k_cache, v_cache, suffix_tables, suffix_lens, std::nullopt, scale, 0.0, 0,
      std::nullopt, std::nullopt);
  values::paged_attention(suffix_tables, suffix_lens, std::nullopt, std::nullopt, std::nullopt,
                          true, own);
  SharedPrefixParams sp{};
  sp.tables = tables.const_data_ptr<int32_t>();
  sp.lens = lens.const_data_ptr<int32_t>();
  sp.cu_seqlens = cu.const_data_ptr<int32_t>();
  sp.suffix_tables = suffix_tables.const_data_ptr<int32_t>();
  sp.suffix_lens = suffix_lens.const_data_ptr<int32_t>();
  sp.num_blocks = shared.max_blocks;
  sp.suffix_max_blocks = own.max_blocks;
  return sp;
}

}  // namespace

void decoder_layers(at::Tensor& hidden, const at::Tensor& positions, const Layers& layers,
                    at::TensorList k_caches, at::TensorList v_caches,
                    at::IntArrayRef sliding_windows, const at::Tensor& block_tables,
                    const at::Tensor& seq_lens, const std::optional<at::Tensor>& cu_seqlens_q,
                    const at::Tensor& slot_mapping, const at::Tensor& inv_freq,
                    double rotary_scaling, int64_t num_heads, double eps, double scale,
                    at::TensorList shared_prefix) {
  FASTDECODE_CHECK(hidden.device().is_cpu(), kOp, "hidden must be a CPU tensor, got ",
                   hidden.device());
  checks::dtype(kOp, hidden, "hidden", at::kFloat);
  FASTDECODE_CHECK(hidden.dim() == 2 && hidden.size(1) >= 1 && hidden.is_contiguous(), kOp,
                   "hidden must be a contiguous [T, H] tensor, got ", hidden.sizes());
  const int64_t num_layers = static_cast<int64_t>(k_caches.size());
  FASTDECODE_CHECK(num_layers >= 1 && v_caches.size() == k_caches.size() &&
                       sliding_windows.size() == k_caches.size() &&
                       static_cast<int64_t>(layers.size()) == num_layers * kSlots,
                   kOp, "k_caches, v_caches and sliding_windows must have one entry per layer "
                   "and layers ", kSlots, " per layer, got ", k_caches.size(), ", ",
                   v_caches.size(), ", ", sliding_windows.size(), " and ", layers.size());
  const checks::CacheDims c = checks::kv_cache(kOp, k_caches[0], v_caches[0]);
  checks::dtype(kOp, k_caches[0], "k_caches[0]", at::kFloat);
  const int64_t t = hidden.size(0), h = hidden.size(1), hkv = c.num_kv_heads, d = c.head_dim;
  FASTDECODE_CHECK(num_heads >= 1 && num_heads % hkv == 0, kOp, "num_heads must be a positive "
                   "multiple of the caches' num_kv_heads ", hkv, ", got ", num_heads);
  FASTDECODE_CHECK(d % 2 == 0 && d <= kMaxRotaryHeadDim, kOp, "the caches' head_dim must be "
                   "even and at most ", kMaxRotaryHeadDim, ", got ", d);
  checks::index(kOp, positions, "positions", at::kLong, {t}, "[T]", hidden);
  checks::index(kOp, inv_freq, "inv_freq", at::kFloat, {d / 2}, "[D / 2]", hidden);
  checks::finite(kOp, rotary_scaling, "rotary_scaling");
  checks::finite(kOp, eps, "eps");
  FASTDECODE_CHECK(eps >= 0, kOp, "eps must be >= 0, got ", eps);
  const std::optional<at::Tensor> last_down = layers.get((num_layers - 1) * kSlots + kDown);
  FASTDECODE_CHECK(last_down.has_value() && last_down->dim() == 3, kOp,
                   "layers: down must be a packed [panels, I, panel] tensor");
  const int64_t hq = num_heads, inter = last_down->size(1), row = (hq + 2 * hkv) * d;

  at::Tensor scratch = at::empty(
      {decoder_step_scratch_size(t, h, inter, hq, hkv, d)}, hidden.options());
  // The q/k/v rows and the attention output as the public attention ops see them, so that
  // their shape and value checks run once here instead of once per layer.
  const at::Tensor qkv = scratch.as_strided({t, hq + 2 * hkv, d}, {row, d, 1}, t * h);
  const at::Tensor query = qkv.narrow(1, 0, hq), key = qkv.narrow(1, hq, hkv);
  const at::Tensor attn = scratch.as_strided({t, hq, d}, {hq * d, d, 1}, t * (h + row));
  checks::append_kv(key, key, k_caches[0], v_caches[0], slot_mapping);
  const checks::PagedDims pd = checks::paged_attention(
      attn, query, k_caches[0], v_caches[0], block_tables, seq_lens, cu_seqlens_q, scale, 0.0,
      0, std::nullopt, std::nullopt);
  values::slots(slot_mapping, c);
  values::paged_attention(block_tables, seq_lens, cu_seqlens_q, std::nullopt, std::nullopt,
                          true, pd);
  const std::optional<SharedPrefixParams> shared = shared_prefix_params(
      shared_prefix, attn, query, k_caches[0], v_caches[0], !cu_seqlens_q.has_value(), scale);

  std::vector<DecoderLayerWeights> weights(num_layers);
  for (int64_t l = 0; l < num_layers; ++l) {
    DecoderLayerWeights& w = weights[l];
    const std::string k_name = "k_caches[" + std::to_string(l) + "]";
    FASTDECODE_CHECK(k_caches[l].sizes() == k_caches[0].sizes() &&
                         v_caches[l].sizes() == k_caches[0].sizes(),
                     kOp, k_name, " and v_caches[", l, "] must have k_caches[0]'s shape ",
                     k_caches[0].sizes(), ", got ", k_caches[l].sizes(), " and ",
                     v_caches[l].sizes());
    checks::kv_cache(kOp, k_caches[l], v_caches[l]);
    checks::dtype(kOp, k_caches[l], k_name.c_str(), at::kFloat);
    checks::same_device(kOp, k_caches[l], k_name.c_str(), hidden);
    checks::in_range(kOp, sliding_windows[l], "sliding_windows[layer] (0 = off)", 0,
                     checks::kInt32Max);
    w.input_norm = weight(layers, l, kInputNorm, {h}, "[H]", false);
    w.qkv = weight(layers, l, kQkv, packed_shape(row, h), "packed [(Hq + 2 Hkv) D] x [H]",
                   false);
    w.qkv_bias = weight(layers, l, kQkvBias, {row}, "[(Hq + 2 Hkv) D]", true);
    w.q_norm = weight(layers, l, kQNorm, {d}, "[D]", true);
    w.k_norm = weight(layers, l, kKNorm, {d}, "[D]", w.q_norm == nullptr);
    FASTDECODE_CHECK((w.q_norm == nullptr) == (w.k_norm == nullptr), kOp, "layer ", l,
                     ": q_norm and k_norm must both be tensors or both None");
    w.o = weight(layers, l, kO, packed_shape(h, hq * d), "packed [H] x [Hq D]", false);
    w.o_bias = weight(layers, l, kOBias, {h}, "[H]", true);
    w.post_norm = weight(layers, l, kPostNorm, {h}, "[H]", false);
    w.gate_up = weight(layers, l, kGateUp, packed_shape(2 * inter, h), "packed [2I] x [H]",
                       false);
    w.gate_up_bias = weight(layers, l, kGateUpBias, {2 * inter}, "[2I]", true);
    w.down = weight(layers, l, kDown, packed_shape(h, inter), "packed [H] x [I]", false);
    w.down_bias = weight(layers, l, kDownBias, {h}, "[H]", true);
    w.k_cache = k_caches[l].data_ptr<float>();
    w.v_cache = v_caches[l].data_ptr<float>();
    w.sliding_window = sliding_windows[l];
  }

  DecoderStepParams p{};
  p.hidden = hidden.data_ptr<float>();
  p.scratch = scratch.data_ptr<float>();
  p.layers = weights.data();
  p.num_layers = num_layers;
  p.positions = positions.const_data_ptr<int64_t>();
  p.block_tables = block_tables.const_data_ptr<int32_t>();
  p.seq_lens = seq_lens.const_data_ptr<int32_t>();
  p.cu_seqlens_q = cu_seqlens_q ? cu_seqlens_q->const_data_ptr<int32_t>() : nullptr;
  p.slot_mapping = slot_mapping.const_data_ptr<int64_t>();
  p.shared_prefix = shared ? &*shared : nullptr;
  p.inv_freq = inv_freq.const_data_ptr<float>();
  p.rotary_scaling = static_cast<float>(rotary_scaling);
  p.num_tokens = t;
  p.num_seqs = pd.num_seqs;
  p.hidden_size = h;
  p.intermediate_size = inter;
  p.num_heads = hq;
  p.num_kv_heads = hkv;
  p.head_dim = d;
  p.num_blocks = c.num_blocks;
  p.block_size = c.block_size;
  p.max_blocks_per_seq = pd.max_blocks;
  p.eps = static_cast<float>(eps);
  p.scale = static_cast<float>(scale);
  decoder_step_kernel(p);
}

}  // namespace fastdecode::cpu
