"""PyTorch baseline for bench/attention-gpu.sh: causal SDPA on the flash backend at the benchmark's training shapes
(Qwen1.5-MoE-A2.7B attention: 16 heads, HD 128), bf16, [B, H, T, D]. Prints one JSON object on stdout, with TFLOP/s
counted as bench/attention-gpu.cu counts them (causal forward = 2 matmuls over half the square; backward 2.5x)."""
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

NH, HD = 16, 128


def time_ms(fn, iters):
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def case(B, T):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, NH, T, HD, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(B, NH, T, HD, device="cuda", dtype=torch.bfloat16, generator=g)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        def fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def fwdbwd():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.backward(do)

        ms_f = time_ms(fwd, 20)
        ms_fb = time_ms(fwdbwd, 10)
    fl = 4.0 * B * NH * T * T / 2 * HD
    print(f"torch B={B} T={T}: fwd {ms_f:.3f} ms ({fl / ms_f / 1e9:.1f} TFLOP/s), fwd+bwd {ms_fb:.3f} ms "
          f"({fl * 3.5 / ms_fb / 1e9:.1f} TFLOP/s)", file=sys.stderr)
    return {"B": B, "T": T, "fwd_ms": round(ms_f, 4), "fwd_tflops": round(fl / ms_f / 1e9, 1),
            "fwdbwd_ms": round(ms_fb, 4), "fwdbwd_tflops": round(fl * 3.5 / ms_fb / 1e9, 1)}


if __name__ == "__main__":
    print(json.dumps({"torch": torch.__version__, "backend": "flash (sdpa_kernel FLASH_ATTENTION), causal",
                      "train": [case(4, 512), case(4, 2048)]}))
