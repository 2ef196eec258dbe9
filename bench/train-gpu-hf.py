"""Baseline for bench/train-gpu.sh: Hugging Face transformers' Qwen2MoeForCausalLM with the benchmark's config
(Qwen1.5-MoE-A2.7B widths, fewer layers), bf16 weights, random init, forward + backward of the causal-LM loss on
4 x 512 random tokens, on the same GPU in the same run. Merges its figures with the engine's JSON.

Usage: python3 train-gpu-hf.py --layers 4 --engine-json engine.json [--engine-bf16-grads-json e.json] --out train-gpu.json
"""
import argparse
import json
import time

from a2p7b_shape import a2p7b_kwargs  # beside this script

parser = argparse.ArgumentParser()
parser.add_argument("--layers", type=int, default=4)
parser.add_argument("--iters", type=int, default=4)
parser.add_argument("--warmup", type=int, default=3)
parser.add_argument("--engine-json", default=None)
parser.add_argument("--engine-bf16-grads-json", default=None)  # the engine with bf16 routed-expert gradients
parser.add_argument("--out", required=True)
parser.add_argument("--checkpointing", action="store_true")
args = parser.parse_args()

result = {"baseline": None}
for key, path in (("engine", args.engine_json), ("engine_bf16_expert_grads", args.engine_bf16_grads_json)):
    if path:
        try:
            with open(path) as f:
                result[key] = json.load(f)
        except (OSError, ValueError) as e:
            result[key] = {"error": str(e)}

try:
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    props = torch.cuda.get_device_properties(0)
    result["gpu"] = props.name
    cfg = Qwen2MoeConfig(**a2p7b_kwargs(args.layers, output_router_logits=False, use_cache=False))
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2MoeForCausalLM(cfg).to(torch.bfloat16)
    model.train()
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    B, T = 4, 512
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):  # as the engine's benchmark: three untimed passes
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    ms = times[len(times) // 2]
    tok_s = B * T / (ms / 1000)
    active = result.get("engine", {}).get("active_params")
    result["baseline"] = {
        "impl": f"transformers Qwen2MoeForCausalLM bf16 (torch {torch.__version__})",
        "gradient_checkpointing": args.checkpointing,
        "layers": args.layers,
        "fwd_bwd_ms": ms,
        "fwd_bwd_ms_all": times,
        "tokens_per_s": tok_s,
        "mfu": 6 * active * tok_s / 989e12 if active else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
    }
    print(f"baseline HF: {args.layers} layers, {B}x{T}: fwd+bwd {ms:.1f} ms ({tok_s:.0f} tok/s)"
          + (f", MFU {100 * result['baseline']['mfu']:.1f}%" if active else ""))
except Exception as e:  # the engine's figures are still written
    result["baseline"] = {"error": f"{type(e).__name__}: {e}"}
    print(f"baseline HF failed: {type(e).__name__}: {e}")

eng = result.get("engine", {})
base = result["baseline"]
if isinstance(eng, dict) and eng.get("tokens_per_s") and isinstance(base, dict) and base.get("tokens_per_s"):
    result["speedup_vs_baseline"] = eng["tokens_per_s"] / base["tokens_per_s"]
eng16 = result.get("engine_bf16_expert_grads", {})
if isinstance(eng16, dict) and eng16.get("tokens_per_s") and isinstance(base, dict) and base.get("tokens_per_s"):
    result["speedup_vs_baseline_bf16_expert_grads"] = eng16["tokens_per_s"] / base["tokens_per_s"]
result["anchor"] = "HF Qwen1.5-MoE-A2.7B 24 layers with gradient checkpointing: 6,835 tok/s (project anchor)"
with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
print(f"wrote {args.out}")
