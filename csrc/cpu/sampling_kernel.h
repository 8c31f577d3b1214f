// CPU sampling row kernels: raw pointers in, no at::Tensor (the torch adapter is sampling.cpp).
// One call handles one row of logits [V]; callers parallelise over rows.
//
// Every filter is a threshold on the processed value x (penalised, divided by the temperature):
// top-k keeps x >= the k-th largest (ties kept), top-p keeps the tokens whose strictly larger
// tokens hold < top_p of the mass (an upper set by value, so also "x >= t"), min-p keeps
// x >= max + log(min_p). The kept set is therefore {x >= max of the thresholds}, found without
// sorting the vocabulary: a streaming candidate buffer for top-k, a small sort or a mass histogram
// for top-p.
#pragma once

#include <cstdint>
#include <vector>

namespace fastdecode::cpu::sampling {

// One row's parameters, already validated and normalised (see fastdecode/ops/_params.py).
struct RowParams {
  float temperature;         // 0 = greedy
  int32_t top_k;             // 0 = off
  float top_p;               // 1 = off
  float min_p;               // 0 = off
  float repetition_penalty;  // 1 = off
};

// One row's inputs. seen: [num_seen] ids, -1 = padding; penalised once per distinct id.
template <typename T>
struct RowInput {
  const T* logits;  // [V]
  int64_t vocab;    // V
  const int64_t* seen;
  int64_t num_seen;
};

// Per-thread scratch reused across rows so the hot loop never allocates after warm-up.
struct Workspace {
  std::vector<float> row;            // [V] processed row when a stage needs the full vocabulary
  std::vector<float> chunk;          // one chunk of processed values (top-k path)
  std::vector<float> cand_vals;      // top-k candidates, in vocabulary order
  std::vector<int32_t> cand_ids;     //   ... and their ids
  std::vector<float> tmp;            // selection scratch
  std::vector<double> hist;          // top-p mass histogram
  std::vector<uint64_t> seen_bits;   // [ceil(V / 64)] repetition-penalty mask, all zero between rows
};

// HF RepetitionPenaltyLogitsProcessor: out [V] float32.
template <typename T>
void penalize_row(const RowInput<T>& in, float penalty, float* out, Workspace& ws);

// HF processors (penalty -> temperature -> top-k -> top-p -> min-p): out [V] float32, -inf where
// filtered; greedy rows get the penalty only.
template <typename T>
void process_row(const RowInput<T>& in, const RowParams& p, float* out, Workspace& ws);

// As process_row, then the inverse-CDF draw with uniform u in [0, 1): the first kept token in
// vocabulary order whose running weight sum exceeds u * total. Greedy rows return the argmax
// (first index on ties). Returns -1 for NaN rows, rows with nothing finite, and sampled rows
// whose maximum is +inf.
template <typename T>
int64_t sample_row(const RowInput<T>& in, const RowParams& p, float u, Workspace& ws);

}  // namespace fastdecode::cpu::sampling
