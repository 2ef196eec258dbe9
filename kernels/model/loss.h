// The policy loss of a micro-batch from its per-row logprobs: what forward_backward computes between the forward
// and the backward, shared by both backends (the GPU engine downloads its logprobs and entropies and calls it too).
// Per-row weights come from the aggregation (token-mean, seq-mean-token-mean, seq-mean-token-sum-norm, with the
// global batch's normalisers when given); the per-token loss is SFT's -logprob or GRPO's clipped surrogate with
// clip-higher and an optional k1/k3 KL term.
#pragma once
#include <cstdint>
#include <vector>

#include "moepilot/engine.h"

namespace moepilot {

// Throws InvalidArgument naming the field when the spec does not fit N rows.
void check_loss_spec(const LossSpec& spec, int N);

// The aggregation's weight of each row, loss = sum_i w_i * per_token_i (0 where the mask is 0), and the masked
// token count; throws InvalidArgument when a sequence's last row (target < 0) is not masked. The GPU engine uploads
// w for its on-device loss gradient (gpu::policy_grad).
void loss_row_weights(const LossSpec& spec, const int* seq_off, int B, const int32_t* target, int N,
                      std::vector<double>& w, double& tokens);

// seq_off [B+1] row offsets of the sequences; target [N] (< 0 at each sequence's last row, where the mask must be
// 0); logprob, entropy [N]. Fills r.loss, tokens, kl_sum, clip_low_count, clip_high_count, ratio_sum, entropy_sum
// and logprob_sum, and g [N] with d loss / d logprob (0 where the mask is 0).
void policy_loss(const LossSpec& spec, const int* seq_off, int B, const int32_t* target, const float* logprob,
                 const float* entropy, int N, LossResult& r, std::vector<float>& g);
// The same from the row weights and token count loss_row_weights gave (a caller that has them already).
void policy_loss(const LossSpec& spec, const std::vector<double>& w, double tokens, const float* logprob,
                 const float* entropy, int N, LossResult& r, std::vector<float>& g);

}  // namespace moepilot
