"""Baseline and roofline for bench/generate-gpu.sh: Hugging Face transformers' Qwen2MoeForCausalLM.generate with
the benchmark's config (Qwen1.5-MoE-A2.7B shape, --layers of them), bf16 weights, random init, prompts of 64 random
tokens (each repeated for its 16 samples: HF shares nothing), 64 new tokens (min = max), top-p 0.9, on the same GPU
in the same run; decode = the 64-token run minus a 1-token run, as the engine's figures. Measures the card's
memory bandwidth (a device-to-device copy) and adds to every configuration, the engine's and HF's, the fraction
of the memory roofline: (bytes the decode steps must move, from the engine's JSON) / bandwidth / decode time.

Usage: python3 generate-gpu-hf.py --layers 24 --groups 1,8,64 --engine-json engine.json --out generate-gpu.json
"""
import argparse
import json
import time

from a2p7b_shape import a2p7b_kwargs  # beside this script

parser = argparse.ArgumentParser()
parser.add_argument("--layers", type=int, default=24)
parser.add_argument("--groups", default="1,8,64")
parser.add_argument("--engine-json", default=None)
parser.add_argument("--out", required=True)
args = parser.parse_args()
G, P, NEW = 16, 64, 64

result = {"baseline": None}
if args.engine_json:
    try:
        with open(args.engine_json) as f:
            result["engine"] = json.load(f)
    except OSError as e:
        result["engine"] = {"error": str(e)}

try:
    import torch

    props = torch.cuda.get_device_properties(0)
    result["gpu"] = props.name
    # Bandwidth: a 4 GiB device-to-device copy reads and writes every byte.
    n = 4 << 30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    best = None
    for _ in range(10):
        t = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    bw = 2 * n / best
    result["bandwidth_gb_s"] = bw / 1e9
    del x, y
    torch.cuda.empty_cache()
    print(f"{props.name}: measured bandwidth {bw / 1e9:.0f} GB/s")
except Exception as e:
    bw = None
    result["bandwidth_error"] = f"{type(e).__name__}: {e}"

# The roofline fraction of the engine's configurations.
eng = result.get("engine", {})
by_seqs = {}
if isinstance(eng, dict):
    for c in eng.get("configs", []):
        by_seqs[c["sequences"]] = c
        if bw and c.get("decode_ms", 0) > 0:
            c["roofline_decode_ms"] = c["decode_bytes"] / bw * 1000
            c["roofline_fraction"] = c["roofline_decode_ms"] / c["decode_ms"]
            routed = ""
            if c.get("decode_bytes_routed"):  # the experts the engine's rows did touch (random weights: fewer)
                c["roofline_fraction_routed"] = c["decode_bytes_routed"] / bw * 1000 / c["decode_ms"]
                routed = f" ({100 * c['roofline_fraction_routed']:.1f}% counting the experts its rows touched)"
            print(f"engine {c['sequences']} sequences: {c['tokens_per_s']:.0f} tok/s, decode {c['decode_tokens_per_s']:.0f} tok/s, "
                  f"{100 * c['roofline_fraction']:.1f}% of the memory roofline{routed}")

try:
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(**a2p7b_kwargs(args.layers, output_router_logits=False, use_cache=True))
    torch.manual_seed(0)
    # Built in bf16 on the device directly: an fp32 build of the 24-layer model (57 GB) and its bf16 copy would not
    # fit one 80 GB card together.
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2MoeForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    configs = []
    for groups in [int(g) for g in args.groups.split(",") if g]:
        B = groups * G
        try:
            prompts = torch.randint(0, cfg.vocab_size, (groups, P), device="cuda")
            ids = prompts.repeat_interleave(G, dim=0)
            mask = torch.ones_like(ids)

            def gen(new):
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=0.9, temperature=1.0,
                                         top_k=0, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
                torch.cuda.synchronize()
                return (time.perf_counter() - t) * 1000, int(out.shape[0] * (out.shape[1] - P))

            gen(4)  # warm-up
            full_ms, tokens = gen(NEW)
            first_ms, first_tokens = gen(1)
            decode_ms = full_ms - first_ms
            c = {
                "sequences": B,
                "full_ms": full_ms,
                "tokens": tokens,
                "tokens_per_s": tokens / (full_ms / 1000),
                "first_token_ms": first_ms,
                "decode_ms": decode_ms,
                "decode_tokens_per_s": (tokens - first_tokens) / (decode_ms / 1000) if decode_ms > 0 else None,
            }
            e = by_seqs.get(B)
            if bw and e and decode_ms > 0:
                c["roofline_fraction"] = e["decode_bytes"] / bw * 1000 / decode_ms
            if e and e.get("tokens_per_s"):
                c["engine_speedup"] = e["tokens_per_s"] / c["tokens_per_s"]
            print(f"HF generate {B} sequences: {c['tokens_per_s']:.0f} tok/s (decode {c['decode_tokens_per_s'] or 0:.0f} tok/s)"
                  + (f", engine {c['engine_speedup']:.1f}x" if "engine_speedup" in c else ""))
        except Exception as ex:
            c = {"sequences": B, "error": f"{type(ex).__name__}: {ex}"}
            print(f"HF generate {B} sequences failed: {c['error']}")
            torch.cuda.empty_cache()
        configs.append(c)
    result["baseline"] = {
        "impl": f"transformers Qwen2MoeForCausalLM.generate bf16 (torch {torch.__version__})",
        "layers": args.layers,
        "configs": configs,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
    }
except Exception as e:  # the engine's figures are still written
    result["baseline"] = {"error": f"{type(e).__name__}: {e}"}
    print(f"baseline HF failed: {type(e).__name__}: {e}")

result["anchor"] = ("H100, HF generate at the full 24-layer Qwen1.5-MoE-A2.7B: 157 tok/s at 16 sequences, 544 at 128 "
                    "(project anchor); goals: >= 70% of the memory roofline at 128 sequences (~9k tok/s at 24 layers), "
                    ">= 40k tok/s at 1024")
with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
print(f"wrote {args.out}")
