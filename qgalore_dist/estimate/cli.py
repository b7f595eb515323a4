"""``qgalore-estimate``: per-rank memory and bytes per step of Q-GaLore training, by closed form.

    qgalore-estimate --model llama_7b --world 8 --engine fsdp2 --rank 1024
    qgalore-estimate --model path/to/config.json --world 64 --engine zero3 --seq 4096 --json
    python -m qgalore_dist.estimate --model llama_70b --world 64

Like DeepSpeed's ``estimate_zero2_model_states_mem_needs_all_cold``, nothing is allocated: the
shapes come from the config.  Bad arguments print one line naming the argument and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .model import builtin_models
from .report import ENGINES, Estimate, EstimateRequest, MemoryRow, TrafficRow, estimate

__all__ = ["main", "render"]

GiB, MiB = 2**30, 2**20
_COLUMNS = ("weights", "gradients", "optimizer", "projectors", "model_states", "comm_buffers", "temporary", "peak")
_HEADERS = ("weights", "grads", "optim", "proj", "states", "buffers", "temp", "peak")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``qgalore-estimate: error: ...``) and exit status 2."""

    def error(self, message: str) -> None:  # noqa: D401 (argparse's signature)
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="qgalore-estimate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help=f"built-in name ({', '.join(builtin_models())}), an HF config JSON file, or a directory "
                        "with a config.json")
    p.add_argument("--world", type=int, required=True, help="data-parallel ranks (FSDP2: shard ranks)")
    p.add_argument("--engine", default="fsdp2", choices=ENGINES)
    p.add_argument("--rank", type=int, help="GaLore rank (default: the C4 scripts' rank, 1024 from 1B up)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch per rank (activations)")
    p.add_argument("--seq", type=int, help="tokens per sequence: adds activation figures")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--eager-attention", action="store_true", help="activations keep the s^2 attention probabilities")
    p.add_argument("--streamed-refresh", action=argparse.BooleanOptionalAction, default=True,
                   help="refresh steps stream full gradients to their owners (QGaLoreConfig.stream_refresh, "
                        "the default); --no-streamed-refresh: the old path, every rank keeps them")
    p.add_argument("--payload-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="QGaLoreConfig.payload_dtype of the exchanges (bytes per step)")
    p.add_argument("--svd-at-step", action="store_true",
                   help="streamed refresh with the owners' SVDs at step() (the optimizer not told its backward "
                        "passes per step) instead of in backward as each full gradient completes")
    p.add_argument("--int8-partitioned", action=argparse.BooleanOptionalAction, default=None,
                   help="ZeRO-3: INT8 weights partitioned 1/N (the default under zero3, as qgalore_dist.initialize "
                        "does); --no-int8-partitioned: replicated (\"int8_partition\": false)")
    p.add_argument("--overlap-comm", action="store_true",
                   help="QGaLoreConfig.overlap_comm (gradients reduced during backward; steady steps)")
    p.add_argument("--update-proj-gap", type=int, default=200, help="initial refresh gap T")
    p.add_argument("--train-steps", type=int, default=150_000, help="run length of the run-average bytes")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    return p.parse_args(argv)


def _request(args: argparse.Namespace) -> EstimateRequest:
    return EstimateRequest(model=args.model, world=args.world, engine=args.engine, rank=args.rank,
                           micro_batch=args.micro_batch, seq=args.seq,
                           activation_checkpointing=args.activation_checkpointing,
                           fused_attention=not args.eager_attention, streamed_refresh=args.streamed_refresh,
                           svd_at_completion=not args.svd_at_step, payload_dtype=args.payload_dtype,
                           int8_partitioned=args.int8_partitioned, overlap_comm=args.overlap_comm,
                           update_proj_gap=args.update_proj_gap, train_steps=args.train_steps)


def _memory_lines(rows: list[MemoryRow], width: int) -> list[str]:
    out = []
    for row in rows:
        if row.bytes is None:
            out.append(f"  {row.label:<{width}}  n/a: {row.unsupported}")
            continue
        cells = "".join(f"{row.bytes[k] / GiB:>10.2f}" for k in _COLUMNS)
        out.append(f"  {row.label:<{width}}{cells}   (rank {row.rank})")
    return out


def _traffic_lines(rows: list[TrafficRow], width: int) -> list[str]:
    def cell(x: float | None) -> str:
        return f"{'n/a':>12}" if x is None else f"{x / MiB:>12,.1f}"

    return [f"  {r.label:<{width}}" + "".join(cell(x) for x in (r.steady, r.refresh, r.average_fixed,
                                                               r.average_adaptive)) for r in rows]


def render(e: Estimate) -> str:
    """The estimate as text."""
    req, p = e.request, e.params
    width = max(len(r.label) for r in (*e.ours, *e.baselines, *e.traffic)) + 2
    lines = [f"{e.model}: {p['total']:,} parameters, {p['galore'] / p['total']:.1%} in {e.galore_matrices} GaLore "
             f"matrices (rank {req.rank}); {req.world} rank(s), engine {req.engine}; "
             f"streamed_refresh={req.streamed_refresh}"
             + (f", int8_partitioned={req.partitioned}" if req.engine == "zero3" else "")
             + (", overlap_comm=True" if req.overlap_comm else ""), "",
             "Memory per rank, GiB (most loaded rank; model states = weights + gradients + optimizer + projectors; "
             "peak = model states + buffers + temporary; no activations)",
             f"  {'':<{width}}" + "".join(f"{k:>10}" for k in _HEADERS)]
    lines += _memory_lines(e.ours, width) + _memory_lines(e.baselines, width)
    steady, refresh = e.ours
    if steady.bytes is not None:
        worst = refresh if e.worst_step == "refresh" else steady
        lines += ["", f"Worst step: the {e.worst_step} step, peak {worst.bytes['peak'] / GiB:.2f} GiB (steady "
                      f"{steady.bytes['peak'] / GiB:.2f}, refresh {refresh.bytes['peak'] / GiB:.2f}): "
                      f"{e.worst_reason}."]
    if e.activations is not None:
        a = e.activations
        lines += ["", f"Activations per rank (micro-batch {a.micro_batch} x seq {a.seq}, checkpointing "
                      f"{'on' if a.checkpointing else 'off'}, {'fused' if a.fused_attention else 'eager'} attention; "
                      f"Korthikanti et al. 2022 counting): {a.total / GiB:.2f} GiB (one layer "
                      f"{a.per_layer / GiB:.3f}, head {a.head / GiB:.3f}); worst-step peak + activations: "
                      + (f"{(worst.bytes['peak'] + a.total) / GiB:.2f} GiB" if steady.bytes else "n/a")]
    lines += ["", f"Bytes per rank per step, MiB (ring volumes); run average over {req.train_steps:,} steps: refresh "
                  f"every {req.update_proj_gap} ({e.refresh_steps['fixed']} refresh steps) or adaptive gap doubling, "
                  f"best case ({e.refresh_steps['adaptive']})",
              f"  {'':<{width}}{'steady':>12}{'refresh':>12}{'avg fixed':>12}{'avg adapt.':>12}"]
    return "\n".join(lines + _traffic_lines(e.traffic, width))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = estimate(_request(args))
    except ValueError as exc:
        print(f"qgalore-estimate: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2) if args.json else render(result))
    return 0
