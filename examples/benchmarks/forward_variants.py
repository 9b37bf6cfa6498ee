"""The denoiser forward under variants that SPEED.md reports as tried and not kept.

    python examples/benchmarks/forward_variants.py [--threads 2] [--ceiling]  (--ceiling: item 3 only)

1. Paper size (24 x 512, 16 heads, 16x16, K=4096, linear MLP), batch 4 (= 2
   samples with guidance), bf16: autocast entered for each forward, one
   autocast context around all forwards (as both sampling loops run: its
   weight-cast cache then holds), the same with the linear MLP casting its
   weights every forward (as it did until 2026-12-04), and a bf16 copy of
   the weights. Best of 3 each, interleaved. Then torch.profiler's time in ``aten::addmm`` and in the
   attention kernel per forward (one context), against the whole forward, with
   the GFLOP/s each reaches.
2. The linear MLP with quick GELU as written (``fc2(h * sigmoid(1.702 h))``,
   ``h = fc1(x)``: three elementwise passes) against the code's folded form
   (one in-place silu, the scalings on addmm's alpha and beta) in the tiny
   and small forwards (batch 32), fp32 and bf16, best of 5, three
   interleaved rounds.
3. The paper-size bf16 ceiling (``--ceiling``): each matmul shape of the
   batch-4 forward (qkv, proj, fc1, fc2, the output layer) as a bare
   ``torch.mm`` of bf16 tensors, and the attention kernel alone, best of 5,
   with the square-matmul peak of speed.py measured in the same run (and the
   attention written out as two matmuls and a softmax in bf16, with the
   ceiling it would give; faster on some CPUs, but its scores and
   probabilities are rounded to bf16, where the kernel keeps them in fp32). Their
   times summed at those rates, with nothing else (no bias, casts, norms,
   GELU, residuals or softmax), are the fastest this forward could be with
   torch's kernels: the highest % of the peak it could reach. (The fc2
   shape is also timed as two 256-wide halves; it is not counted.) Then
   torch.profiler over 3 forwards of the real model (batch 4, one autocast
   context, the CLI's allocator policy as in speed.py; run first, on a fresh
   heap), self CPU time per forward by op and input shape: where the time
   above that ceiling goes.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import clipvqd.transformer as transformer
from clipvqd.allocator import keep_freed_memory
from clipvqd.transformer import Denoiser, DenoiserConfig, SelfAttention
from speed import count_flops, matmul_peak, ours_module_flops  # this folder's speed benchmark (no diffusers needed)


# the paper size with the linear MLP (DenoiserConfig's defaults are the paper's)
PAPER = DenoiserConfig(mlp="linear")


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def inputs(cfg: DenoiserConfig, batch: int):
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, cfg.num_classes + 1, (batch, cfg.seq_len), generator=g),
            torch.full((batch,), 50), torch.randn(batch, cfg.cond_dim, generator=g))


def paper_bf16() -> None:
    cfg = PAPER
    torch.manual_seed(0)
    model = Denoiser(cfg).eval()
    weights = Denoiser(cfg).eval()
    weights.load_state_dict(model.state_dict())
    weights = weights.to(torch.bfloat16)
    tok, t, cond = inputs(cfg, 4)

    def per_call():
        with torch.autocast("cpu", torch.bfloat16):
            model(tok, t, cond)

    kept = transformer.LinearMLP._weights_t

    def casts_every_forward(self, x):  # the MLP before it kept its weight casts (the code until 2026-12-04):
        return self.fc1.weight.t(), self.fc2.weight.t()  # autocast casts these views again in every addmm

    def mlp_casting(fn):
        transformer.LinearMLP._weights_t = casts_every_forward
        try:
            return fn()
        finally:
            transformer.LinearMLP._weights_t = kept

    rows = {"autocast entered per forward": [], "one autocast context (the loops)": [],
            "the same, the MLP casting its weights every forward": [], "bf16 weights": []}
    with torch.no_grad():
        for _ in range(2):
            rows["autocast entered per forward"].append(best_ms(per_call, 3))
            with torch.autocast("cpu", torch.bfloat16):
                rows["one autocast context (the loops)"].append(best_ms(lambda: model(tok, t, cond), 3))
                rows["the same, the MLP casting its weights every forward"].append(
                    mlp_casting(lambda: best_ms(lambda: model(tok, t, cond), 3)))
            rows["bf16 weights"].append(best_ms(lambda: weights(tok, t, cond.bfloat16()), 3))
        from torch.profiler import ProfilerActivity, profile

        with torch.autocast("cpu", torch.bfloat16):
            model(tok, t, cond)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(2):
                    model(tok, t, cond)
    print("paper size, bf16, batch 4, ms per forward (best of 3, two rounds):")
    for name, values in rows.items():
        print(f"  {name}: {' / '.join(f'{v:.0f}' for v in values)}")
    totals = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    addmm, total = totals.get("aten::addmm", 0.0) / 2e3, sum(totals.values()) / 2e3
    attn = sum(v for k, v in totals.items() if "scaled_dot_product" in k) / 2e3
    # speed.py's FLOP count (the forward's own shapes): all of it, and without attention's QK^T and AV
    forward = lambda: model(tok, t, cond)  # noqa: E731
    total_gflop = count_flops(model, forward, ours_module_flops) / 1e9
    linear_gflop = count_flops(model, forward, lambda m, a, k: None if isinstance(m, SelfAttention)
                               else ours_module_flops(m, a, k)) / 1e9
    attn_gflop = total_gflop - linear_gflop
    print(f"  profiled (one context): aten::addmm {addmm:.0f} ms of {total:.0f} ms of CPU time per forward "
          f"(the linear layers' {linear_gflop:.0f} GFLOP at {linear_gflop / addmm * 1e3:.0f} GFLOP/s); "
          f"attention {attn:.0f} ms ({attn_gflop:.1f} GFLOP, {attn_gflop / attn * 1e3:.0f} GFLOP/s)")


def gelu_folded() -> None:
    folded = transformer.LinearMLP.forward

    def written_out(self, x):
        return self.fc2(transformer.quick_gelu(self.fc1(x)))

    for name, cfg in (("tiny", DenoiserConfig(256, 8, 8, 4, 128, 4, mlp="linear", cond_dim=512)),
                      ("small", DenoiserConfig(1024, 8, 8, 8, 256, 8, mlp="linear", cond_dim=512))):
        torch.manual_seed(0)
        model = Denoiser(cfg).eval()
        tok, t, cond = inputs(cfg, 32)
        for dtype in ("fp32", "bf16"):
            rows = {"written out": [], "folded (the code)": []}
            try:
                with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
                    for _ in range(3):
                        for label, fn in (("written out", written_out), ("folded (the code)", folded)):
                            transformer.LinearMLP.forward = fn
                            rows[label].append(best_ms(lambda: model(tok, t, cond), 5))
            finally:
                transformer.LinearMLP.forward = folded
            print(f"{name} {dtype}, batch 32, ms per forward (best of 5, three rounds): "
                  + "; ".join(f"{k} {' / '.join(f'{v:.0f}' for v in vs)}" for k, vs in rows.items()))


def ceiling() -> None:
    cfg = PAPER
    rows, D, L, H = 4 * cfg.seq_len, cfg.dim, cfg.seq_len, cfg.heads
    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    # (name, in, out, calls per forward): the linear layers as x @ W.t(), W stored (out, in)
    shapes = [("qkv", D, 3 * D, cfg.layers), ("proj", D, D, cfg.layers), ("fc1", D, 4 * D, cfg.layers),
              ("fc2", 4 * D, D, cfg.layers), ("out", D, cfg.num_classes, 1)]
    total_ms, total_gflop = 0.0, 0.0
    print(f"paper size, bf16, batch 4 ({rows} rows), bare kernels, best of 5:")
    for name, d_in, d_out, calls in shapes:
        x = torch.randn(rows, d_in, generator=g).to(bf)
        w = torch.randn(d_out, d_in, generator=g).to(bf)
        ms = best_ms(lambda: torch.mm(x, w.t()), 5)
        gflop = 2 * rows * d_in * d_out / 1e9
        total_ms, total_gflop = total_ms + calls * ms, total_gflop + calls * gflop
        print(f"  {name:4s} ({rows} x {d_in}) @ ({d_in} x {d_out}) x {calls}: {ms:.3f} ms, {gflop / ms * 1e3:.0f} GFLOP/s")
        if name == "fc2":  # the same product as two 256-wide halves (SPEED.md: faster on the Intel machine)
            halves = lambda: torch.cat([torch.mm(x, w[: d_out // 2].t()), torch.mm(x, w[d_out // 2 :].t())], 1)  # noqa: E731
            split_ms = best_ms(halves, 5)
            print(f"       as two ({rows} x {d_in}) @ ({d_in} x {d_out // 2}) and a cat: {split_ms:.3f} ms, "
                  f"{gflop / split_ms * 1e3:.0f} GFLOP/s")
    q, k, v = (torch.randn(4, H, L, D // H, generator=g).to(bf) for _ in range(3))
    ms = best_ms(lambda: F.scaled_dot_product_attention(q, k, v), 5)
    gflop = 4 * 4 * L * L * D / 1e9
    total_ms, total_gflop = total_ms + cfg.layers * ms, total_gflop + cfg.layers * gflop
    print(f"  attention (4, {H}, {L}, {D // H}) x {cfg.layers}: {ms:.3f} ms, {gflop / ms * 1e3:.0f} GFLOP/s")
    # the same attention written out: bf16 scores and probabilities (the flash kernel keeps them in fp32)
    scale = (D // H) ** -0.5
    explicit_ms = best_ms(lambda: torch.matmul(torch.matmul(q * scale, k.transpose(-1, -2)).softmax(-1), v), 5)
    print(f"       written out (q kᵀ, softmax, @ v, all bf16): {explicit_ms:.3f} ms, {gflop / explicit_ms * 1e3:.0f} GFLOP/s")
    peak = matmul_peak(torch.device("cpu"), bf)
    rate = total_gflop / total_ms * 1e3
    print(f"  all of them: {total_gflop:.0f} GFLOP in {total_ms:.0f} ms = {rate:.0f} GFLOP/s; "
          f"bf16 matmul peak (speed.py's) {peak:.0f} GFLOP/s: the ceiling is {100 * rate / peak:.0f} % of it")
    written_ms = total_ms + cfg.layers * (explicit_ms - ms)
    print(f"  with the attention written out: {written_ms:.0f} ms, the ceiling is "
          f"{100 * total_gflop / written_ms * 1e3 / peak:.0f} % of the peak")


def profile_by_shape(rows_shown: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = Denoiser(PAPER).eval()
    tok, t, cond = inputs(PAPER, 4)
    calls = 3
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        for _ in range(calls):  # warm-up: the autocast weight-cast cache, the allocator
            model(tok, t, cond)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                model(tok, t, cond)
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / calls / 1e3
    print(f"paper size, bf16, batch 4, profiled: {total:.0f} ms of self CPU time per forward; the top {rows_shown}:")
    for e in events[:rows_shown]:
        print(f"  {e.self_cpu_time_total / calls / 1e3:7.2f} ms  {e.key}  {e.input_shapes}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ceiling", action="store_true", help="only the paper-size bf16 ceiling and profile (item 3)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.ceiling:
        keep_freed_memory()  # as speed.py and the CLI run
        profile_by_shape()  # first: after the ceiling's large matrices its fresh outputs faulted pages in again
        ceiling()
        return
    paper_bf16()
    gelu_folded()
    ceiling()


if __name__ == "__main__":
    main()
