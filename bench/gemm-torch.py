"""PyTorch (cuBLAS) baselines for bench/gemm-gpu.cu: the same shapes, timed with CUDA events on the same card.

Dense: torch.matmul in bf16 (bf16 output, cuBLAS' usual path) and, where this torch has it, bf16 in / fp32 out
(torch.mm(..., out_dtype=torch.float32)), which is what moe-pilot's kernels produce. Routed experts: a per-expert
loop of matmuls (what a plain PyTorch MoE does) and torch._grouped_mm where available. Backward: dA = dOut @ W
and dW = dOut^T @ A in bf16 (loop and torch._grouped_mm), and dW added into an fp32 buffer (torch_grouped_mm_f32acc).

Usage: python3 bench/gemm-torch.py OUT.json
"""
import json
import sys

import torch

H, V, E, EI, SI, T, R = 2048, 151936, 60, 1408, 5632, 2048, 8192


def time_ms(f):
    f()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    f()
    b.record()
    b.synchronize()
    one = a.elapsed_time(b)
    iters = max(3, min(200, int(40.0 / max(one, 1e-3))))
    a.record()
    for _ in range(iters):
        f()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def group_sizes(rows, groups, skewed):
    if not skewed:
        return [rows // groups + (1 if g < rows % groups else 0) for g in range(groups)]
    total = 0.0
    for g in range(groups):
        total += 1.0 / (g + 1)
    s = [int((rows * (1.0 / (g + 1)) / total) // 1) for g in range(groups)]
    s[0] += rows - sum(s)
    return s


def main():
    out_path = sys.argv[1]
    dev = torch.device("cuda")
    results = []

    def record(impl, op, name, dist, M, N, K, G, ms):
        flops = 2.0 * M * N * K
        tf = flops / (ms * 1e-3) / 1e12
        print(f"torch {impl:<16} {op:<20} {name:<16} {dist:<7} M={M:<6} N={N:<6} K={K:<5} {ms:8.3f} ms {tf:7.1f} TFLOP/s")
        results.append(dict(impl=impl, op=op, name=name, dist=dist, M=M, N=N, K=K, G=G, ms=round(ms, 4), tflops=round(tf, 2)))

    has_out_dtype = True
    try:
        torch.mm(torch.ones(16, 16, device=dev, dtype=torch.bfloat16), torch.ones(16, 16, device=dev, dtype=torch.bfloat16),
                 out_dtype=torch.float32)
    except Exception:  # older torch: no bf16 -> fp32 mm
        has_out_dtype = False

    dense = [("attn_qkv", T, 3 * H, H), ("attn_o", T, H, H), ("shared_gate_up", T, 2 * SI, H), ("shared_down", T, H, SI),
             ("lm_head", T, V, H), ("square4096", 4096, 4096, 4096), ("square8192", 8192, 8192, 8192),
             ("decode_lm_head", 64, V, H), ("decode_qkv", 64, 3 * H, H),
             ("decode1024_q", 1024, H, H), ("decode1024_o", 1024, H, H), ("decode1024_shared_gate", 1024, SI, H),
             ("decode1024_shared_down", 1024, H, SI), ("decode1024_lm_head", 1024, V, H)]
    for name, M, N, K in dense:
        A = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        W = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        record("cublas_bf16out", "forward", name, "", M, N, K, 1, time_ms(lambda: torch.matmul(A, W.t())))
        if has_out_dtype:
            record("cublas_fp32out", "forward", name, "", M, N, K, 1,
                   time_ms(lambda: torch.mm(A, W.t(), out_dtype=torch.float32)))
        if 2048 <= M <= 4096:
            dO = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
            record("cublas_bf16out", "backward_dA", name, "", M, N, K, 1, time_ms(lambda: torch.matmul(dO, W)))
            record("cublas_bf16out", "backward_dW", name, "", M, N, K, 1, time_ms(lambda: torch.matmul(dO.t(), A)))
        del A, W
        torch.cuda.empty_cache()

    for skewed in (False, True):
        dist = "skewed" if skewed else "uniform"
        sizes = group_sizes(R, E, skewed)
        offs = [0]
        for s in sizes:
            offs.append(offs[-1] + s)
        for name, N, K in (("expert_gate_up", 2 * EI, H), ("expert_down", H, EI)):
            A = torch.randn(R, K, device=dev, dtype=torch.bfloat16)
            W = torch.randn(E, N, K, device=dev, dtype=torch.bfloat16)
            out = torch.empty(R, N, device=dev, dtype=torch.bfloat16)

            def loop():
                for g in range(E):
                    if sizes[g]:
                        torch.matmul(A[offs[g]:offs[g + 1]], W[g].t(), out=out[offs[g]:offs[g + 1]])

            record("torch_loop", "grouped_forward", name, dist, R, N, K, E, time_ms(loop))
            if hasattr(torch, "_grouped_mm"):
                try:
                    o32 = torch.tensor(offs[1:], device=dev, dtype=torch.int32)
                    Wt = W.transpose(-2, -1)
                    torch._grouped_mm(A, Wt, offs=o32)
                    record("torch_grouped_mm", "grouped_forward", name, dist, R, N, K, E,
                           time_ms(lambda: torch._grouped_mm(A, Wt, offs=o32)))
                except Exception as e:  # not on this card / build
                    print(f"torch._grouped_mm unavailable: {e}")
            dO = torch.randn(R, N, device=dev, dtype=torch.bfloat16)
            dA = torch.empty(R, K, device=dev, dtype=torch.bfloat16)
            dW = torch.empty(E, N, K, device=dev, dtype=torch.bfloat16)

            def loop_dA():
                for g in range(E):
                    if sizes[g]:
                        torch.matmul(dO[offs[g]:offs[g + 1]], W[g], out=dA[offs[g]:offs[g + 1]])

            def loop_dW():
                for g in range(E):
                    if sizes[g]:
                        torch.matmul(dO[offs[g]:offs[g + 1]].t(), A[offs[g]:offs[g + 1]], out=dW[g])

            record("torch_loop", "grouped_backward_dA", name, dist, R, N, K, E, time_ms(loop_dA))
            record("torch_loop", "grouped_backward_dW", name, dist, R, N, K, E, time_ms(loop_dW))
            if hasattr(torch, "_grouped_mm"):
                # What autograd runs for _grouped_mm's backward: dA = dO @ W_g (2d x 3d), dW_g = dO_g^T @ A_g (2d x 2d,
                # offsets along the reduced rows), bf16 out; and dW added into an fp32 gradient, the engine's contract.
                try:
                    o32 = torch.tensor(offs[1:], device=dev, dtype=torch.int32)
                    dOt = dO.t()
                    dW32 = torch.zeros(E, N, K, device=dev, dtype=torch.float32)
                    torch._grouped_mm(dO, W, offs=o32)
                    torch._grouped_mm(dOt, A, offs=o32)
                    record("torch_grouped_mm", "grouped_backward_dA", name, dist, R, N, K, E,
                           time_ms(lambda: torch._grouped_mm(dO, W, offs=o32)))
                    record("torch_grouped_mm", "grouped_backward_dW", name, dist, R, N, K, E,
                           time_ms(lambda: torch._grouped_mm(dOt, A, offs=o32)))
                    record("torch_grouped_mm_f32acc", "grouped_backward_dW", name, dist, R, N, K, E,
                           time_ms(lambda: dW32.add_(torch._grouped_mm(dOt, A, offs=o32))))
                    del dW32
                except Exception as e:  # not on this card / build
                    print(f"torch._grouped_mm backward unavailable: {e}")
            del A, W, out, dO, dA, dW
            torch.cuda.empty_cache()

    with open(out_path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, results=results), f, indent=1)


if __name__ == "__main__":
    main()
