"""The training loop: online target features, packed anchor blocks, AdamW + warmup/cosine, exact resume.

Runs on one CPU for tests and on many GPUs through `accelerate launch -m dspark.cli train ...` (DDP, or FSDP via the
accelerate config). Determinism: the data order of each epoch and the anchors of each micro-batch are functions of
(seed, epoch, micro-batch index), so a resumed run replays exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import pair
from ..anchors import sample_anchors
from ..modeling_dspark import DSparkDraftModel
from ..provenance import run_provenance
from .config import TrainConfig
from .curves import plot_learning_curve
from .objective import BlockLoss, DraftObjective, LossWeights, observe_target

CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def is_heldout(record_id: str, fraction: float) -> bool:
    """Stable split by a hash of the record id: the same record is held out in every run and on every rank."""
    digest = hashlib.sha256(str(record_id).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def prepare_records(records: list[dict], config: TrainConfig) -> list[dict]:
    """Truncate responses to max_length; prompts that leave no room for a response are an error (or dropped)."""
    too_long = [r for r in records if r["prompt_length"] >= config.max_length - 1]
    long_ids = {id(r) for r in too_long}
    if too_long and not config.drop_long_prompts:
        raise ValueError(
            f"dspark train: {len(too_long)} of {len(records)} prompts are at least max_length={config.max_length} "
            f"tokens long (e.g. {too_long[0]['id']!r}, {too_long[0]['prompt_length']} tokens), leaving no room for "
            "a response. Raise --max-length, or pass --drop-long-prompts true to skip them."
        )
    kept = [dict(r, input_ids=list(r["input_ids"][: config.max_length])) for r in records if id(r) not in long_ids]
    usable = [r for r in kept if len(r["input_ids"]) - r["prompt_length"] >= 2]
    return usable


def split_records(records: list[dict], config: TrainConfig) -> tuple[list[dict], list[dict]]:
    train = [r for r in records if not is_heldout(r["id"], config.heldout_fraction)]
    heldout = [r for r in records if is_heldout(r["id"], config.heldout_fraction)]
    if len(train) < config.batch_size:
        raise ValueError(
            f"dspark train: only {len(train)} usable training sequences (of {len(records)} after the held-out split "
            f"and length checks), fewer than one batch of {config.batch_size}. Generate more data with "
            "`dspark data respond`, or lower --batch-size."
        )
    return train, heldout


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


@dataclass
class Batch:
    """input_ids, attention_mask, loss_mask: [B, L] right-padded; loss_mask marks response tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(records: list[dict], pad_token_id: int) -> Batch:
    length = max(len(r["input_ids"]) for r in records)
    input_ids = torch.full((len(records), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(records), length, dtype=torch.long)
    loss_mask = torch.zeros(len(records), length, dtype=torch.bool)
    for row, record in enumerate(records):
        ids = record["input_ids"]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        loss_mask[row, record["prompt_length"] : len(ids)] = True
    return Batch(input_ids, attention_mask, loss_mask)


# ----------------------------------------------------------------------------------------------------------------
# Model set-up
# ----------------------------------------------------------------------------------------------------------------


def load_target(config: TrainConfig, device: torch.device):
    """(target, pad_token_id) for `config.target`: `smollm2` (the offline real model) or a HF path."""
    target, tokenizer = pair.load_target(config.target, device, config.target_dtype)
    pad = tokenizer.pad_token_id if tokenizer is not None else target.generation_config.pad_token_id
    return target, pad


def build_draft(config: TrainConfig, target: nn.Module) -> DSparkDraftModel:
    """A fresh draft sized for the target, or a warm start from a checkpoint of any supported layout (z-lab DFlash,
    DeepSpec, TorchSpec, ours): its weights are copied; heads it lacks (Markov, confidence) start fresh."""
    heads = {
        "markov_rank": config.markov_rank,
        "markov_head_type": config.markov_head_type,
        "enable_confidence_head": config.enable_confidence_head,
        "sample_from_anchor": config.sample_from_anchor,
    }
    if not config.init_from:
        draft = DSparkDraftModel.from_target(
            target,
            num_hidden_layers=config.num_hidden_layers,
            block_size=config.block_size,
            target_layer_ids=config.target_layer_ids or None,
            num_target_features=config.num_target_features,
            **heads,
        )
        return draft.float()
    from ..convert import load_checkpoint

    source = load_checkpoint(config.init_from)
    source.check_target(target, allow_stateful=True)
    settings = {k: v for k, v in source.config.to_dict().items() if k in type(source.config)().to_dict()}
    settings.update(heads, block_size=config.block_size)
    draft = DSparkDraftModel(type(source.config)(**settings))
    missing, unexpected = draft.load_state_dict(source.state_dict(), strict=False)
    fresh_heads = ("markov_head.", "confidence_head.")
    bad_missing = [k for k in missing if not k.startswith(fresh_heads)]
    if bad_missing or unexpected:
        raise ValueError(
            f"dspark train: cannot warm-start from {config.init_from}: missing {bad_missing[:5]}, "
            f"unexpected {unexpected[:5]}. Use a checkpoint of the same draft shape."
        )
    return draft.to(target.device).float().bind_target(target, allow_stateful=True)


def learning_rate_lambda(config: TrainConfig, steps: Callable[[], int]):
    """Warmup then cosine decay over `steps()` optimizer steps (read on every call: a time budget may shorten it)."""

    def factor(step: int) -> float:
        total_steps = steps()
        warmup = max(1, int(config.warmup_fraction * total_steps))
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return config.min_lr_fraction + (1 - config.min_lr_fraction) * cosine

    return factor


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_steps(output_dir: Path) -> list[int]:
    folder = output_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if p.name.split("-")[1].isdigit())


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINT_DIR / f"step-{step:08d}"


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


class Trainer:
    """Owns one training run. `run()` trains to the end (or to `stop_after_steps`) and returns the final metrics."""

    def __init__(
        self,
        config: TrainConfig,
        records: list[dict] | None = None,
        target: nn.Module | None = None,
        pad_token_id: int | None = None,
    ):
        from accelerate import Accelerator

        self.config = config
        cuda = torch.cuda.is_available()
        precision = config.mixed_precision
        if precision == "auto":
            precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
        self.accelerator = Accelerator(
            mixed_precision=precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            cpu=not cuda,
        )
        self.device = self.accelerator.device
        self.output_dir = Path(config.output_dir)
        if target is None:
            target, pad_token_id = load_target(config, self.device)
        self.target = target.eval().requires_grad_(False)
        self.pad_token_id = 0 if pad_token_id is None else pad_token_id
        if records is None:
            from .responses import load_response_dataset

            # several datasets (e.g. greedy and sampled answers) are joined with commas
            records = [r for folder in config.data_dir.split(",") for r in load_response_dataset(folder.strip())]
        self.train_records, self.heldout_records = split_records(prepare_records(records, config), config)
        torch.manual_seed(config.seed)  # the fresh draft's initial weights are part of the run's definition
        self.draft = build_draft(config, self.target)
        self.draft.check_target(self.target, allow_stateful=True)
        self.draft.train()
        weights = LossWeights(config.ce_weight, config.tv_weight, config.confidence_weight, config.decay_gamma)
        objective = DraftObjective(self.draft, weights, config.attention)
        world = self.accelerator.num_processes
        per_step = config.batch_size * config.gradient_accumulation_steps * world
        self.micro_batches_per_epoch = len(self.train_records) // (config.batch_size * world)
        self.total_steps = config.max_steps or max(1, int(config.epochs * len(self.train_records) / per_step))
        self.planned_steps = self.total_steps
        trainable = [p for p in objective.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_lambda(config, lambda: self.total_steps))
        self.objective, self.optimizer = self.accelerator.prepare(objective, optimizer)
        # The schedule counts optimizer steps; accelerate's scheduler wrapper would step it once per process.
        self.scheduler = scheduler
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.step = 0
        self.micro_batch = 0
        self._resume()

    # -- state ------------------------------------------------------------------------------------------------------

    def _resume(self) -> None:
        steps = checkpoint_steps(self.output_dir)
        if not steps:
            return
        folder = checkpoint_path(self.output_dir, steps[-1])
        state = json.loads((folder / "trainer_state.json").read_text())
        saved = TrainConfig(**state["config"])
        changed = [
            name
            for name in ("block_size", "num_hidden_layers", "markov_rank", "seed", "batch_size", "num_anchors")
            if getattr(saved, name) != getattr(self.config, name)
        ]
        if changed:
            raise ValueError(
                f"dspark train: {self.output_dir} holds a run with different {', '.join(changed)}; resume with the "
                "same settings, or choose a new --output-dir."
            )
        self.accelerator.load_state(str(folder / "accelerate"))
        self.step = state["step"]
        self.micro_batch = state["micro_batch"]
        self.accelerator.print(f"dspark train: resumed from {folder} at step {self.step}")

    def save_checkpoint(self) -> Path:
        """Atomic: everything is written to a temporary folder that is renamed into place only when complete."""
        final = checkpoint_path(self.output_dir, self.step)
        partial = final.with_name(final.name + ".partial")
        if self.accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial / "accelerate"))
        if self.accelerator.is_main_process:
            self.unwrapped_draft().save_pretrained(partial / "draft")
            state = {"step": self.step, "micro_batch": self.micro_batch, "config": self.config.to_dict()}
            (partial / "trainer_state.json").write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in checkpoint_steps(self.output_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(checkpoint_path(self.output_dir, old), ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def unwrapped_draft(self) -> DSparkDraftModel:
        return self.accelerator.unwrap_model(self.objective).draft

    # -- batches ----------------------------------------------------------------------------------------------------

    def micro_batch_records(self, index: int) -> list[dict]:
        """The records of global micro-batch `index` for this rank (epochs wrap around with a fresh order)."""
        epoch, within = divmod(index, self.micro_batches_per_epoch)
        order = epoch_order(len(self.train_records), self.config.seed, epoch)
        size, world, rank = self.config.batch_size, self.accelerator.num_processes, self.accelerator.process_index
        start = (within * world + rank) * size
        return [self.train_records[i] for i in order[start : start + size]]

    def loss_on(self, records: list[dict], anchor_seed: int) -> BlockLoss:
        batch = collate(records, self.pad_token_id).to(self.device)
        view = observe_target(self.target, batch.input_ids, batch.attention_mask, self.draft.config.target_layer_ids)
        anchors = sample_anchors(batch.loss_mask, self.config.num_anchors, torch.Generator().manual_seed(anchor_seed))
        with self.accelerator.autocast():
            return self.objective(
                view.features, view.last_hidden, batch.input_ids, batch.loss_mask, anchors.positions, anchors.valid
            )

    # -- evaluation -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out teacher-forced acceptance: expected tokens per round and per-slot acceptance, fixed anchors."""
        records = self.heldout_records[: self.config.eval_sequences]
        if not records:
            return {}
        self.objective.eval()
        totals: dict[str, float] = {"loss": 0.0, "expected_length": 0.0}
        slot_acceptance = slot_match = slot_count = None
        batches = 0
        for start in range(0, len(records), self.config.batch_size):
            result = self.loss_on(records[start : start + self.config.batch_size], anchor_seed=start)
            totals["loss"] += float(result.total.detach())
            totals["expected_length"] += float(result.expected_length)
            weighted = result.slot_acceptance * result.slot_count
            matched = result.slot_greedy_match * result.slot_count
            slot_acceptance = weighted if slot_acceptance is None else slot_acceptance + weighted
            slot_match = matched if slot_match is None else slot_match + matched
            slot_count = result.slot_count if slot_count is None else slot_count + result.slot_count
            batches += 1
        self.objective.train()
        return {
            "split": "heldout",
            "step": self.step,
            "sequences": len(records),
            "loss": totals["loss"] / batches,
            "expected_length": totals["expected_length"] / batches,
            "slot_acceptance": (slot_acceptance / slot_count.clamp(min=1)).tolist(),
            "slot_greedy_match": (slot_match / slot_count.clamp(min=1)).tolist(),
        }

    # -- training ---------------------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def _progress(self):
        if not (self.config.progress and self.accelerator.is_main_process):
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=self.total_steps, initial=self.step, desc="dspark train", dynamic_ncols=True)

    def train_step(self) -> tuple[BlockLoss, int]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; returns the last loss and tokens."""
        tokens = 0
        for _ in range(self.config.gradient_accumulation_steps):
            records = self.micro_batch_records(self.micro_batch)
            seed = self.config.seed * 1_000_003 + self.micro_batch * self.accelerator.num_processes
            with self.accelerator.accumulate(self.objective):
                result = self.loss_on(records, anchor_seed=seed + self.accelerator.process_index)
                self.accelerator.backward(result.total)
                if self.accelerator.sync_gradients and self.config.grad_clip > 0:
                    self.accelerator.clip_grad_norm_(self.objective.parameters(), self.config.grad_clip)
                self.optimizer.step()
                if self.accelerator.sync_gradients:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.micro_batch += 1
            tokens += sum(len(r["input_ids"]) for r in records)
        self.step += 1
        return result, tokens

    def run(self) -> dict:
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
            (self.output_dir / "provenance.json").write_text(json.dumps(run_provenance(self.device), indent=2))
        progress = self._progress()
        # a deliberate early stop (to test or to split a run); the time budget may move total_steps either way
        stop_after = self.step + self.config.stop_after_steps if self.config.stop_after_steps else None
        window_tokens, window_start = 0, time.perf_counter()
        run_started, self._budget_step = time.perf_counter(), self.step
        last_eval: dict = {}
        while self.step < (self.total_steps if stop_after is None else min(self.total_steps, stop_after)):
            try:
                result, tokens = self.train_step()
            except torch.OutOfMemoryError as error:
                raise RuntimeError(
                    "dspark train: out of GPU memory. Lower --batch-size (and raise --gradient-accumulation-steps to "
                    "keep the effective batch), lower --num-anchors or --max-length, or use more GPUs."
                ) from error
            window_tokens += tokens
            self._fit_time_budget(run_started)
            if progress is not None:
                progress.total = self.total_steps
                progress.update(1)
            if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "split": "train",
                    "step": self.step,
                    "loss": float(result.total.detach()),
                    "ce": float(result.ce),
                    "tv": float(result.tv),
                    "confidence": float(result.confidence),
                    "expected_length": float(result.expected_length),
                    "slot_acceptance": result.slot_acceptance.tolist(),
                    "learning_rate": self.scheduler.get_last_lr()[0],
                    "tokens_per_second": window_tokens * self.accelerator.num_processes / max(elapsed, 1e-9),
                }
                self.log(record)
                if progress is not None:
                    progress.set_postfix(
                        loss=f"{record['loss']:.3f}",
                        accept=f"{record['expected_length']:.2f}",
                        tok_s=f"{record['tokens_per_second']:.0f}",
                    )
                window_tokens, window_start = 0, time.perf_counter()
            if self.config.eval_every and self.step % self.config.eval_every == 0:
                last_eval = self.evaluate()
                if last_eval:
                    self.log(last_eval)
            if self.config.checkpoint_every and self.step % self.config.checkpoint_every == 0:
                self.save_checkpoint()
        if progress is not None:
            progress.close()
        if self.step < self.total_steps:
            self.save_checkpoint()  # stopped early on purpose: leave a resumable state
            return {"step": self.step, "stopped_early": True}
        if not last_eval or last_eval.get("step") != self.step:
            last_eval = self.evaluate()
            if last_eval:
                self.log(last_eval)
        self.save_final()
        return last_eval or {"step": self.step}

    def _fit_time_budget(self, run_started: float) -> None:
        """With `time_budget_minutes`, fit the run (and its cosine schedule) to the budget from the measured step time.

        The estimate is refreshed at 10, 30, 100 and 300 steps (early steps are slower: allocator warm-up, kernel
        selection, other jobs starting), never beyond the configured length. Timing starts after the first step.
        """
        budget = self.config.time_budget_minutes * 60
        done = self.step - self._budget_step
        if budget <= 0 or done < 1:
            return
        if done == 1:
            self._budget_clock = (time.perf_counter(), self.step)
            return
        started, first_step = self._budget_clock
        if self.step - first_step not in (10, 30, 100, 300):
            return
        seconds_per_step = (time.perf_counter() - started) / (self.step - first_step)
        # leave room for evaluations (about one step per held-out batch) and the final save
        heldout_batches = math.ceil(min(len(self.heldout_records), self.config.eval_sequences) / self.config.batch_size)
        evaluations = 1 + (self.planned_steps // self.config.eval_every if self.config.eval_every else 0)
        remaining = budget - (time.perf_counter() - run_started) - evaluations * heldout_batches * seconds_per_step
        fits = min(self.planned_steps, self.step + max(0, int(remaining / seconds_per_step)))
        if fits != self.total_steps:
            self.accelerator.print(
                f"dspark train: {seconds_per_step * 1000:.0f} ms/step; the {self.config.time_budget_minutes:g}-minute "
                f"budget fits {fits} of {self.planned_steps} steps; the schedule now ends at step {fits}"
            )
            self.total_steps = fits

    def save_final(self) -> Path:
        final = self.output_dir / FINAL_DIR
        if self.accelerator.is_main_process:
            partial = final.with_name(FINAL_DIR + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            self.unwrapped_draft().save_pretrained(partial)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            plot_learning_curve(self.output_dir / METRICS_FILE, self.output_dir / "learning_curve.png")
        self.accelerator.wait_for_everyone()
        return final


def train(
    config: TrainConfig,
    records: list[dict] | None = None,
    target: nn.Module | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """Train (or resume) the run described by `config`; returns the final held-out metrics."""
    return Trainer(config, records=records, target=target, pad_token_id=pad_token_id).run()
