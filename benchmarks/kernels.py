"""GPU benchmark of the fused Q-GaLore kernels (``qgalore_dist.kernels``) on llama_1b shapes.

What is measured (CUDA only; the script exits with status 2 and a message without a GPU)
    1. The device's copy bandwidth: ``dst.copy_(src)`` of 1 GiB fp32, bytes read + written.
    2. Per kernel and per llama_1b matrix shape (q/k/v/o 2048x2048, gate/up 5461x2048, down
       2048x5461; rank ``--rank``, projector INT4 in groups of 256, INT8 weight in groups of
       256): time of the Triton kernel and of the unfused torch path it replaces, and the
       kernel's achieved bandwidth (the bytes it must move at least, over its time) as a
       fraction of the copy bandwidth:
         - ``project``:      G (fp32) + packed P + scales -> R (fp32);
         - ``project_back``: R + packed P -> scale * back-projection (fp32, m x n);
         - ``int8_update``:  INT8 W + delta (fp32) -> INT8 W + scales/zeros (one pass).
    3. ``optimizer.step()`` of one llama_1b decoder layer's seven GaLore matrices (``--layers``
       of them): QGaLoreAdamW8bit fused (``QGALORE_KERNELS=auto``) vs unfused torch
       (``QGALORE_KERNELS=torch``) vs bitsandbytes ``AdamW8bit`` on full-rank fp32 matrices of
       the same shapes.  Gradients are fixed and re-attached before each step (outside the
       timed region); the projector refresh (SVD, step 0) is in the warm-up, not timed.
    4. The 8-bit low-rank Adam step on the (max(m, n), r) state: the torch codec path
       (``core.adam.lowrank_adam_update``) vs bitsandbytes' fused ``AdamW8bit`` kernel on a
       tensor of the same shape: the measurement issue 8 asks for before writing a kernel.

Timings: CUDA events, median of ``--iters`` after ``--warmup`` (``triton.testing.do_bench``
for single kernels).  Output: ``benchmarks/results/kernels.{json,md}`` with the GPU name,
versions and command; copy the markdown into ``benchmarks/RESULTS.md`` by hand.

Run from the repository root on a CUDA machine:
    python benchmarks/kernels.py                      # all sections, rank 512
    python benchmarks/kernels.py --rank 256 --layers 2 --iters 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks._common import environment, environment_md, write_outputs  # noqa: E402
from qgalore_dist import kernels  # noqa: E402
from qgalore_dist.quant import StreamKey, pack_codes, quantize  # noqa: E402

# llama_1b (configs/models/llama_1b.json): hidden 2048, intermediate 5461.
SHAPES = {"attn (q/k/v/o)": (2048, 2048), "mlp up/gate": (5461, 2048), "mlp down": (2048, 5461)}
LAYER_SHAPES = [(2048, 2048)] * 4 + [(5461, 2048)] * 2 + [(2048, 5461)]
GROUP = 256


def _bench(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(args) -> float:
    """GB/s of a 1 GiB fp32 device-to-device copy (read + write)."""
    src = torch.empty(2**28, device="cuda")
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), args.warmup, args.iters)
    return 2 * src.numel() * 4 / ms / 1e6


def _projector(m: int, n: int, rank: int):
    side = "right" if m >= n else "left"
    proj_shape = (rank, n) if side == "right" else (m, rank)
    p = torch.linalg.qr(torch.randn(max(proj_shape), min(proj_shape), device="cuda"))[0]
    p = p.T.contiguous() if side == "right" else p.contiguous()
    codes, scales, zeros = quantize(p, bits=4, group_size=GROUP)
    return side, proj_shape, (pack_codes(codes, 4), scales, zeros)


def kernel_rows(args, copy_gbs: float) -> list[dict[str, Any]]:
    rows = []
    for label, (m, n) in SHAPES.items():
        side, ps, packed = _projector(m, n, args.rank)
        opts = dict(proj_shape=ps, side=side, bits=4, group_size=GROUP)
        dense_p = lambda: kernels.dequantize_packed(*packed, proj_shape=ps, bits=4, group_size=GROUP)  # noqa: E731
        grad = torch.randn(m, n, device="cuda")
        low = kernels.project_packed(grad, *packed, **opts)
        pbytes = sum(t.numel() * t.element_size() for t in packed)
        w = quantize(torch.randn(m, n, device="cuda") * 0.02, bits=8, group_size=GROUP)
        delta = torch.randn(m, n, device="cuda") * 1e-3
        key = StreamKey(0, 1, 2)
        meta = 2 * 4 * (m * n // GROUP)
        cases = {
            "project": (lambda: kernels.project_packed(grad, *packed, **opts),
                        lambda: kernels.project_torch(grad, dense_p(), side),
                        m * n * 4 + pbytes + low.numel() * 4),
            "project_back": (lambda: kernels.project_back_packed(low, *packed, scale=0.25, **opts),
                             lambda: kernels.project_back_torch(low, dense_p(), side, 0.25),
                             low.numel() * 4 + pbytes + m * n * 4),
            "int8_update": (lambda: kernels.int8_update_(*[t.clone() for t in w], delta, group_size=GROUP,
                                                         step_size=1e-3, decay=1e-5, key=key),
                            lambda: kernels.int8_update_torch(*w, delta, group_size=GROUP, step_size=1e-3,
                                                              decay=1e-5, key=key),
                            m * n * (1 + 4 + 1) + 2 * meta),
        }
        for name, (fused, torch_path, nbytes) in cases.items():
            clone_ms = _bench(lambda: [t.clone() for t in w], args.warmup, args.iters) if name == "int8_update" else 0.0
            t_fused = _bench(fused, args.warmup, args.iters) - clone_ms  # the clone keeps W fixed
            t_torch = _bench(torch_path, args.warmup, args.iters)
            gbs = nbytes / t_fused / 1e6
            rows.append({"shape": f"{label} {m}x{n}", "kernel": name, "fused_ms": t_fused, "torch_ms": t_torch,
                         "min_bytes": nbytes, "GB/s": gbs, "fraction_of_copy": gbs / copy_gbs})
    return rows


def _qgalore_model(layers: int):
    from qgalore_dist.core import Int8Linear

    mods = [Int8Linear.from_linear(torch.nn.Linear(n, m, bias=False, device="cuda"), group_size=GROUP)
            for _ in range(layers) for (m, n) in LAYER_SHAPES]
    return torch.nn.ModuleList(mods)


def optimizer_rows(args) -> list[dict[str, Any]]:
    import bitsandbytes as bnb

    from qgalore_dist import QGaLoreAdamW8bit

    grads = [torch.randn(m, n, device="cuda") * 1e-2 for _ in range(args.layers) for (m, n) in LAYER_SHAPES]
    model = _qgalore_model(args.layers)
    opt = QGaLoreAdamW8bit(model.parameters(), rank=args.rank, update_proj_gap=10**6, lr=1e-3, weight_decay=0.0)

    def q_step():
        for layer, g in zip(model, grads):
            layer.weight_grad, layer.lowrank_grad = g, None  # the full-gradient path: step projects
        opt.step()

    dense = [torch.nn.Parameter(torch.randn(m, n, device="cuda") * 0.02) for _ in range(args.layers)
             for (m, n) in LAYER_SHAPES]
    bnb_opt = bnb.optim.AdamW8bit(dense, lr=1e-3)

    def b_step():
        for p, g in zip(dense, grads):
            p.grad = g
        bnb_opt.step()

    rows = []
    for mode in ("auto", "torch"):
        os.environ["QGALORE_KERNELS"] = mode
        rows.append({"optimizer": f"QGaLoreAdamW8bit ({'fused Triton' if mode == 'auto' else 'unfused torch'})",
                     "step_ms": _bench(q_step, args.warmup, args.iters)})
    os.environ.pop("QGALORE_KERNELS", None)
    rows.append({"optimizer": "bitsandbytes AdamW8bit (full rank)", "step_ms": _bench(b_step, args.warmup, args.iters)})
    return rows


def adam_rows(args) -> list[dict[str, Any]]:
    import bitsandbytes as bnb

    from qgalore_dist.core.adam import lowrank_adam_update
    from qgalore_dist.quant import BlockwiseCodec

    rows = []
    for m in (2048, 5461):
        grad = torch.randn(m, args.rank, device="cuda") * 1e-2
        codec = BlockwiseCodec(bits=8)
        state = [codec.zeros(grad.shape, grad.device, signed=True), codec.zeros(grad.shape, grad.device, signed=False)]

        def ours():
            _, state[0], state[1] = lowrank_adam_update(grad, state[0], state[1], codec, betas=(0.9, 0.999), eps=1e-6)

        p = torch.nn.Parameter(torch.zeros_like(grad))
        p.grad = grad
        b_opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        rows.append({"state": f"{m}x{args.rank}", "torch_codec_ms": _bench(ours, args.warmup, args.iters),
                     "bnb_adamw8bit_ms": _bench(b_opt.step, args.warmup, args.iters)})
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=512)
    parser.add_argument("--layers", type=int, default=1, help="llama_1b decoder layers in the optimizer benchmark")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        return 2
    import triton

    torch.manual_seed(0)
    env = environment()
    env["gpu"] = torch.cuda.get_device_name()
    env["versions"].update(triton=triton.__version__, cuda=torch.version.cuda)
    copy_gbs = copy_bandwidth(args)
    payload = {"environment": env, "args": vars(args), "copy_GBps": copy_gbs, "kernels": kernel_rows(args, copy_gbs),
               "optimizer_step": optimizer_rows(args), "lowrank_adam": adam_rows(args)}
    md = "\n\n".join([
        "## Fused kernels (llama_1b shapes)", environment_md(env) + f"\n- GPU: {env['gpu']}, triton "
        f"{triton.__version__}, CUDA {torch.version.cuda}; copy bandwidth {copy_gbs:.0f} GB/s",
        _table(payload["kernels"]), f"### optimizer.step(), {args.layers} llama_1b layer(s), rank {args.rank}",
        _table(payload["optimizer_step"]), "### 8-bit low-rank Adam: torch codec vs bitsandbytes",
        _table(payload["lowrank_adam"]),
    ])
    json_path, md_path = write_outputs("kernels", payload, md)
    print(md)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
