// C entry points (for ctypes) that run the CUDA kernels of csrc/kernels under the CPU emulator
// (emu.h). Arguments are raw pointers to host tensors plus sizes / strides in elements.
#include "../../csrc/kernels/append_kv.cuh"
#include "../../csrc/kernels/contrastive.cuh"
#include "../../csrc/kernels/paged_attention.cuh"
#include "../../csrc/kernels/sampling.cuh"

namespace fk = fastdecode::kernels;

extern "C" {

// strides: key (token, head), value (token, head), cache (block, token, head).
int emu_append_kv(const void* key, const void* value, void* k_cache, void* v_cache,
                  const int64_t* slot_mapping, const int64_t* strides, int64_t num_tokens,
                  int64_t num_slots, int num_kv_heads, int head_dim, int block_size,
                  int elem_bytes) {
  fk::AppendKVParams p{};
  p.key = key;
  p.value = value;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.slot_mapping = slot_mapping;
  p.key_stride_token = strides[0];
  p.key_stride_head = strides[1];
  p.value_stride_token = strides[2];
  p.value_stride_head = strides[3];
  p.cache_stride_block = strides[4];
  p.cache_stride_token = strides[5];
  p.cache_stride_head = strides[6];
  p.num_tokens = num_tokens;
  p.num_slots = num_slots;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.block_size = block_size;
  p.elem_bytes = elem_bytes;
  return fk::append_kv(p, nullptr);
}

int64_t emu_paged_decode_workspace_floats(int64_t num_seqs, int64_t num_qo_heads,
                                          int64_t head_dim, int64_t max_blocks,
                                          int64_t block_size) {
  return fk::paged_decode_workspace_floats(
      num_seqs, num_qo_heads, head_dim, fk::paged_decode_max_partitions(max_blocks, block_size));
}

// strides: query (seq, head), out (seq, head), cache (block, token, head), block_tables row.
// sizes: B, Hq, Hkv, D, P, M, N. dtype: 0 float32, 1 float16, 2 bfloat16.
int emu_paged_decode(void* out, const void* query, const void* k_cache, const void* v_cache,
                     const int32_t* block_tables, const int32_t* seq_lens,
                     const float* alibi_slopes, float* workspace, const int64_t* strides,
                     const int* sizes, float scale, float softcap, int sliding_window,
                     int dtype) {
  fk::PagedDecodeParams p{};
  p.out = out;
  p.query = query;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.block_tables = block_tables;
  p.seq_lens = seq_lens;
  p.alibi_slopes = alibi_slopes;
  p.q_stride_seq = strides[0];
  p.q_stride_head = strides[1];
  p.o_stride_seq = strides[2];
  p.o_stride_head = strides[3];
  p.kv_stride_block = strides[4];
  p.kv_stride_token = strides[5];
  p.kv_stride_head = strides[6];
  p.block_tables_stride = strides[7];
  p.num_seqs = sizes[0];
  p.num_qo_heads = sizes[1];
  p.num_kv_heads = sizes[2];
  p.head_dim = sizes[3];
  p.block_size = sizes[4];
  p.max_blocks_per_seq = sizes[5];
  p.num_blocks = sizes[6];
  p.scale = scale;
  p.softcap = softcap;
  p.sliding_window = sliding_window;
  p.dtype = static_cast<fk::DType>(dtype);
  const int parts = fk::paged_decode_max_partitions(p.max_blocks_per_seq, p.block_size);
  p.partial_out = workspace;
  p.partial_lse =
      workspace + static_cast<int64_t>(p.num_seqs) * p.num_qo_heads * parts * p.head_dim;
  return fk::paged_decode_attention(p, nullptr);
}

int emu_sampling_num_splits(int64_t num_rows, int64_t vocab_size, int num_sms) {
  return fk::sampling_num_splits(num_rows, vocab_size, num_sms);
}

int64_t emu_sampling_float_workspace(int64_t num_rows, int64_t vocab_size, int num_splits) {
  return fk::sampling_float_workspace(num_rows, vocab_size, num_splits);
}

int64_t emu_sampling_int_workspace(int64_t num_rows, int num_splits) {
  return fk::sampling_int_workspace(num_rows, num_splits);
}

// floats / ints: the two workspaces; tickets: [num_rows] zeros.
int emu_sample(const void* logits, float* floats, int32_t* ints, uint32_t* tickets, int64_t* out,
               const float* temperature, const int32_t* top_k, const float* top_p,
               const float* min_p, const float* repetition_penalty, const int64_t* seen_tokens,
               const int64_t* seeds, const int64_t* offsets, int64_t logits_stride,
               int64_t seen_stride, int num_rows, int vocab_size, int num_seen, int num_splits,
               int dtype) {
  fk::SamplingParams p{};
  p.logits = logits;
  p.out = out;
  p.tickets = tickets;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.min_p = min_p;
  p.repetition_penalty = repetition_penalty;
  p.seen_tokens = seen_tokens;
  p.seeds = seeds;
  p.offsets = offsets;
  p.logits_stride = logits_stride;
  p.seen_stride = seen_stride;
  p.scores_stride = fk::sampling_scores_stride(vocab_size);
  p.num_rows = num_rows;
  p.vocab_size = vocab_size;
  p.num_seen = num_seen;
  p.num_splits = num_splits;
  p.dtype = static_cast<fk::DType>(dtype);
  fk::bind_sampling_workspace(p, floats, ints);
  return fk::sample(p, nullptr);
}

// strides: expert, amateur, out rows. dtype: of expert and amateur (one dtype).
int emu_contrastive(const void* expert, const void* amateur, const float* alpha,
                    const float* plausibility, float* out, const int64_t* strides, int num_rows,
                    int vocab_size, int dtype) {
  fk::ContrastiveParams p{};
  p.expert = expert;
  p.amateur = amateur;
  p.alpha = alpha;
  p.plausibility = plausibility;
  p.out = out;
  p.expert_stride = strides[0];
  p.amateur_stride = strides[1];
  p.out_stride = strides[2];
  p.num_rows = num_rows;
  p.vocab_size = vocab_size;
  p.dtype = static_cast<fk::DType>(dtype);
  return fk::contrastive_logits(p, nullptr);
}

// The kernels' softcap tanh and the modelled fast-math tanhf, for the accuracy tests.
float emu_accurate_tanh(float x) { return fk::accurate_tanh(x); }
float emu_fast_math_tanhf(float x) { return emu::fast_math::tanhf(x); }
int emu_models_fast_math() {
#ifdef FASTDECODE_EMU_EXACT_MATH
  return 0;
#else
  return 1;
#endif
}

}  // extern "C"
