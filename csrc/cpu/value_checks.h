// Host checks of tensor contents for the CPU adapters: every id a CPU kernel follows is in range
// before it runs (a few integer compares per sequence, nothing next to the kernels). The shape /
// dtype / device checks they build on are csrc/common/checks.h. Messages name the argument and
// the offending entry.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "../common/checks.h"

namespace fastdecode::cpu::values {

// slot_mapping [T] int64: every slot < N * P (negative slots are skipped by the kernel).
inline void slots(const at::Tensor& slot_mapping, const checks::CacheDims& c) {
  const int64_t num_slots = c.num_blocks * c.block_size;
  const int64_t* s = slot_mapping.const_data_ptr<int64_t>();
  for (int64_t t = 0; t < slot_mapping.numel(); ++t) {
    FASTDECODE_CHECK(s[t] < num_slots, "append_kv", "slot_mapping[", t, "] = ", s[t],
                     " is outside the cache (", num_slots, " slots)");
  }
}

// 0 <= seq_lens[b] <= M * P; every block a sequence reads in [0, N); cu_seqlens_q from 0 to T,
// non-decreasing, and when causal no sequence with more query tokens than a non-zero seq_lens
// (a non-causal query, e.g. over a shorter encoder sequence, needs no KV position of its own);
// ALiBi slopes and relative bias finite.
inline void paged_attention(const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            const std::optional<at::Tensor>& cu_seqlens_q,
                            const std::optional<at::Tensor>& alibi_slopes,
                            const std::optional<at::Tensor>& relative_bias, bool causal,
                            const checks::PagedDims& d) {
  constexpr const char* op = "paged_attention";
  const int64_t p = d.cache.block_size;
  const int32_t* lens = seq_lens.const_data_ptr<int32_t>();
  const int32_t* table = block_tables.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < d.num_seqs; ++b) {
    FASTDECODE_CHECK(lens[b] >= 0 && lens[b] <= d.max_blocks * p, op, "seq_lens[", b, "] = ",
                     lens[b], " does not fit in ", d.max_blocks, " blocks of ", p);
    for (int64_t i = 0; i < (lens[b] + p - 1) / p; ++i) {
      const int32_t id = table[b * d.max_blocks + i];
      FASTDECODE_CHECK(id >= 0 && id < d.cache.num_blocks, op, "block_tables[", b, ", ", i,
                       "] = ", id, " is outside the cache (", d.cache.num_blocks, " blocks)");
    }
  }
  if (cu_seqlens_q) {
    const int32_t* cu = cu_seqlens_q->const_data_ptr<int32_t>();
    FASTDECODE_CHECK(cu[0] == 0 && cu[d.num_seqs] == d.num_tokens, op, "cu_seqlens_q must run "
                     "from 0 to the number of query tokens ", d.num_tokens, ", got ", cu[0],
                     " .. ", cu[d.num_seqs]);
    for (int64_t b = 0; b < d.num_seqs; ++b) {
      FASTDECODE_CHECK(cu[b] <= cu[b + 1], op, "cu_seqlens_q must be non-decreasing, got ",
                       cu[b], " then ", cu[b + 1], " at seq ", b);
      FASTDECODE_CHECK(!causal || lens[b] == 0 || cu[b + 1] - cu[b] <= lens[b], op,
                       "cu_seqlens_q gives seq ", b, " ", cu[b + 1] - cu[b], " query tokens, "
                       "more than its seq_lens[", b, "] = ", lens[b],
                       " (allowed only with causal=False)");
    }
  }
  if (alibi_slopes) {
    const float* s = alibi_slopes->const_data_ptr<float>();
    for (int64_t h = 0; h < d.num_qo_heads; ++h) {
      FASTDECODE_CHECK(std::isfinite(s[h]), op, "alibi_slopes[", h, "] = ", s[h],
                       " is not finite");
    }
  }
  if (relative_bias) {
    const float* t = relative_bias->const_data_ptr<float>();
    const int64_t width = relative_bias->size(1);
    for (int64_t i = 0; i < relative_bias->numel(); ++i) {
      FASTDECODE_CHECK(std::isfinite(t[i]), op, "relative_bias[", i / width, ", ", i % width,
                       "] = ", t[i], " is not finite");
    }
  }
}

// seen_tokens [B, L] int64: ids < V (negative ids are padding).
inline void seen_ids(const char* op, const at::Tensor& seen, int64_t vocab) {
  FASTDECODE_CHECK(seen.max().item<int64_t>() < vocab, op, "seen_tokens must be ids in [0, ",
                   vocab, ") or -1 (padding)");
}

}  // namespace fastdecode::cpu::values
