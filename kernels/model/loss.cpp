// See loss.h.
#include "model/loss.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "moepilot/error.h"

namespace moepilot {

void check_loss_spec(const LossSpec& spec, int N) {
  auto check_len = [&](const std::vector<float>& v, const char* name) {
    MP_CHECK_ARG((int)v.size() == N, std::string("loss: ") + name + " must have one entry per token (" +
                                         std::to_string(N) + "), got " + std::to_string(v.size()));
  };
  check_len(spec.mask, "mask");
  if (spec.type == LossType::Grpo) {
    check_len(spec.advantages, "advantages");
    check_len(spec.old_logprobs, "old_logprobs");
    if (spec.beta != 0.f) check_len(spec.ref_logprobs, "ref_logprobs (required when beta != 0)");
    MP_CHECK_ARG(spec.eps_low >= 0 && spec.eps_high >= 0, "loss: eps_low and eps_high must be >= 0");
  }
  MP_CHECK_ARG(spec.temperature > 0, "loss: temperature must be > 0");
}

void loss_row_weights(const LossSpec& spec, const int* seq_off, int B, const int32_t* target, int N,
                      std::vector<double>& w, double& tokens) {
  w.assign(N, 0.0);
  std::vector<int> seq_of(N);
  for (int b = 0; b < B; b++)
    for (int i = seq_off[b]; i < seq_off[b + 1]; i++) seq_of[i] = b;
  for (int i = 0; i < N; i++)
    if (target[i] < 0) MP_CHECK_ARG(spec.mask[i] == 0.f, "loss: mask must be 0 on each sequence's last row");
  std::vector<double> seq_tokens(B, 0.0);
  tokens = 0;
  for (int i = 0; i < N; i++) {
    seq_tokens[seq_of[i]] += spec.mask[i];
    tokens += spec.mask[i];
  }
  const double S = spec.total_seqs > 0 ? spec.total_seqs : B;
  switch (spec.aggregation) {
    case Aggregation::TokenMean: {
      const double D = spec.total_tokens > 0 ? spec.total_tokens : tokens;
      for (int i = 0; i < N; i++) w[i] = D > 0 ? spec.mask[i] / D : 0.0;
      break;
    }
    case Aggregation::SeqMeanTokenMean:
      for (int i = 0; i < N; i++) {
        const double n = seq_tokens[seq_of[i]];
        w[i] = n > 0 ? spec.mask[i] / (n * S) : 0.0;
      }
      break;
    case Aggregation::SeqMeanTokenSumNorm: {
      double Ln = spec.norm_length;
      if (Ln <= 0 && !seq_tokens.empty()) Ln = *std::max_element(seq_tokens.begin(), seq_tokens.end());
      for (int i = 0; i < N; i++) w[i] = Ln > 0 ? spec.mask[i] / (S * Ln) : 0.0;
      break;
    }
  }
}

void policy_loss(const LossSpec& spec, const int* seq_off, int B, const int32_t* target, const float* logprob,
                 const float* entropy, int N, LossResult& r, std::vector<float>& g) {
  // Per-row weights from the aggregation: loss = sum_i w_i * per_token_i.
  std::vector<double> w;
  double tokens = 0;
  loss_row_weights(spec, seq_off, B, target, N, w, tokens);
  policy_loss(spec, w, tokens, logprob, entropy, N, r, g);
}

void policy_loss(const LossSpec& spec, const std::vector<double>& w, double tokens, const float* logprob,
                 const float* entropy, int N, LossResult& r, std::vector<float>& g) {
  r.tokens = tokens;
  g.assign(N, 0.f);
  double loss = 0;
  for (int i = 0; i < N; i++) {
    if (spec.mask[i] == 0.f) continue;
    const double lp = logprob[i];
    double per = 0, dper = 0;
    if (spec.type == LossType::Sft) {
      per = -lp;
      dper = -1;
    } else {
      const double adv = spec.advantages[i];
      const double ratio = std::exp(lp - spec.old_logprobs[i]);
      const double clipped = std::min(std::max(ratio, 1.0 - spec.eps_low), 1.0 + spec.eps_high);
      const double unclipped_obj = ratio * adv, clipped_obj = clipped * adv;
      // -min(r A, clip(r) A): the gradient flows through r unless the clipped term is the smaller one
      // and r lies outside the clip range.
      if (unclipped_obj <= clipped_obj) {
        per = -unclipped_obj;
        dper = -ratio * adv;
      } else {
        per = -clipped_obj;
        dper = (ratio > 1.0 - spec.eps_low && ratio < 1.0 + spec.eps_high) ? -ratio * adv : 0.0;
      }
      if (adv < 0 && ratio < 1.0 - spec.eps_low) r.clip_low_count += spec.mask[i];
      if (adv > 0 && ratio > 1.0 + spec.eps_high) r.clip_high_count += spec.mask[i];
      r.ratio_sum += ratio * spec.mask[i];
      if (!spec.ref_logprobs.empty()) {
        const double d = spec.ref_logprobs[i] - lp;  // log(pi_ref / pi)
        double kl, dkl;
        if (spec.kl == KlEstimator::K3) {
          kl = std::exp(d) - d - 1;
          dkl = -std::exp(d) + 1;
        } else {
          kl = -d;
          dkl = 1;
        }
        r.kl_sum += kl * spec.mask[i];
        per += spec.beta * kl;
        dper += spec.beta * dkl;
      }
    }
    loss += w[i] * per;
    g[i] = (float)(w[i] * dper);
    r.entropy_sum += (double)entropy[i] * spec.mask[i];
    r.logprob_sum += lp * spec.mask[i];
  }
  r.loss = loss;
}

}  // namespace moepilot
