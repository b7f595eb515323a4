"""An HF ``Trainer`` worker for tests/test_hf_trainer.py, started by ``torchrun``.

Trains the tiny LLaMA of ds_worker.py with :class:`qgalore_dist.integrations.hf.QGaLoreTrainer`
(``TrainingArguments(deepspeed=--config)``), recording every rank's micro-batches and losses;
then replays the same micro-batches through ``qgalore_dist.initialize`` on a fresh copy of the
model (``--reference-config``: the same ds_config with the "auto" values spelled out) and
writes, from rank 0, a JSON record with both ranks' results to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ds_worker import SEQ, VOCAB, build_model  # noqa: E402


class CountingTokens(torch.utils.data.Dataset):
    """Random token ids with something to learn: each sequence counts up (mod VOCAB) from a
    random start, so the loss falls below ln(VOCAB) within a few steps."""

    def __init__(self, n: int, seed: int = 123) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (n, 1), generator=gen)
        self.data = (starts + torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def int8_codes(model) -> dict[str, int]:
    import qgalore_dist

    def whole(w):  # ZeRO-3 partitioned INT8 weights are Shard(0) DTensors: gather the rows
        return w.full_tensor() if hasattr(w, "full_tensor") else w

    return {n: int(whole(m.weight).long().sum()) for n, m in model.named_modules()
            if isinstance(m, qgalore_dist.Int8Linear)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--reference-config", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import torch.distributed as dist
    from transformers import TrainingArguments

    import qgalore_dist
    from qgalore_dist.integrations.deepspeed import EngineOptimizer
    from qgalore_dist.integrations.hf import QGaLoreTrainer, configure_cpu_deepspeed

    bf16 = os.environ.get("HFW_BF16", "1") == "1"
    if bf16 and not torch.cuda.is_available():
        # CPU-only test shim: TrainingArguments rejects bf16 unless a GPU supports it or
        # use_cpu=True (training_args.py _validate_args), and use_cpu=True turns DeepSpeed off in
        # accelerate; DeepSpeed's bf16 itself runs on CPU.
        import transformers.training_args

        transformers.training_args.is_torch_bf16_gpu_available = lambda: True
    configure_cpu_deepspeed()

    class RecordingTrainer(QGaLoreTrainer):
        """Records each micro-batch this rank trains on and its loss (this rank's mean)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.batches.append(inputs["input_ids"].detach().clone())
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
            self.local_losses.append(float(loss.detach().float()))
            return out

    training_args = TrainingArguments(
        output_dir=args.output_dir, deepspeed=args.config, bf16=bf16, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        max_grad_norm=args.max_grad_norm, logging_steps=1, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0, dataloader_num_workers=0, accelerator_config={"use_configured_state": True})
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model()
    trainer = RecordingTrainer(model=model, args=training_args, train_dataset=CountingTokens(64))
    trainer.batches, trainer.local_losses = [], []
    codes_before = int8_codes(model)
    trainer.train()
    engine = trainer.model_wrapped
    galore = trainer.qgalore
    record = dict(
        rank=rank, world=world,
        losses=trainer.local_losses,
        log_history=trainer.state.log_history,
        engine_type=type(engine).__name__,
        engine_optimizer=type(engine.optimizer).__name__,
        basic_is_engine_optimizer=isinstance(engine.basic_optimizer, EngineOptimizer),
        engine_qgalore_is_trainer_qgalore=getattr(engine, "qgalore", None) is galore,
        engine_gradient_clipping=engine.gradient_clipping(),
        joint_clip=galore.config.max_grad_norm,
        codes_before=codes_before, codes_after=int8_codes(engine.module),
        svd_count=galore.svd_count, steps_taken=galore.steps_taken,
        replicas_checked=galore.check_replicas(),
        dense_steps=engine.basic_optimizer.dense_steps()["step"],
    )

    # The same micro-batches through qgalore_dist.initialize on a fresh copy of the model.
    ref_engine, _, _, _ = qgalore_dist.initialize(model=build_model(), config=args.reference_config)
    ref_losses = []
    for x in trainer.batches:
        loss = ref_engine(input_ids=x, labels=x).loss
        ref_engine.backward(loss)
        ref_engine.step()
        ref_losses.append(float(loss.detach().float()))
    record.update(ref_losses=ref_losses, ref_codes=int8_codes(ref_engine.module),
                  ref_replicas_checked=ref_engine.qgalore.check_replicas())
    assert all(math.isfinite(x) for x in ref_losses), ref_losses

    records = [None] * world
    dist.all_gather_object(records, record)
    if rank == 0:
        with open(args.out + ".tmp", "w") as f:
            json.dump(records, f)
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    from qgalore_dist.integrations.launch import run_main

    run_main(main)
