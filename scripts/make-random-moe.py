#!/usr/bin/env python3
"""A random Qwen2-MoE checkpoint at the Qwen1.5-MoE-A2.7B widths (or others), written by Hugging Face transformers
as a model folder the engine loads: config.json, bf16 safetensors shards, and a tokenizer copied from --tokenizer.
Made on the GPU machine for runs at real sizes (nothing is downloaded): the weights are transformers' own
initialisation (normal, std = initializer_range), built in bf16 on the GPU.

Usage: python3 scripts/make-random-moe.py --out DIR --tokenizer test/fixtures/tokenizer [--layers 24]
         [--experts 60] [--top-k 4] [--seed 0]
"""
import argparse
import os
import shutil
import sys

import torch
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from a2p7b_shape import a2p7b_kwargs  # noqa: E402  (bench/a2p7b_shape.py: the A2.7B widths)

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json (and tokenizer_config.json)")
p.add_argument("--layers", type=int, default=24)
p.add_argument("--experts", type=int, default=60)
p.add_argument("--top-k", type=int, default=4)
p.add_argument("--hidden", type=int, default=2048)
p.add_argument("--moe-intermediate", type=int, default=1408)
p.add_argument("--shared-intermediate", type=int, default=5632)
p.add_argument("--vocab", type=int, default=151936)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

cfg = Qwen2MoeConfig(**a2p7b_kwargs(
    args.layers, vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.shared_intermediate,
    num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate,
    shared_expert_intermediate_size=args.shared_intermediate, bos_token_id=None, eos_token_id=None,
))
torch.manual_seed(args.seed)
torch.set_default_dtype(torch.bfloat16)
device = "cuda" if torch.cuda.is_available() else "cpu"
with torch.device(device):
    model = Qwen2MoeForCausalLM(cfg)
torch.set_default_dtype(torch.float32)
os.makedirs(args.out, exist_ok=True)
model.save_pretrained(args.out, max_shard_size="4GB", safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    src = os.path.join(args.tokenizer, f)
    if os.path.exists(src):
        shutil.copy(src, os.path.join(args.out, f))
n = sum(t.numel() for t in model.parameters())
print(f"wrote {args.out}: {args.layers} layers, {args.experts} experts top-{args.top_k}, {n / 1e9:.2f}B parameters (bf16)")
