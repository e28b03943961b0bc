"""The training loop: online target features, packed anchor blocks, AdamW + warmup/cosine, exact resume.

Runs on one CPU for tests and on many GPUs through `accelerate launch --multi_gpu --num_processes N -m dspark.cli
train ...` (DDP; FSDP with `--use_fsdp`, see the README). Determinism: the data order of each epoch and the anchors
of each micro-batch are functions of (seed, epoch, global micro-batch index), whatever the number of processes (see
`sharding`), so a resumed run replays exactly what an uninterrupted run would have seen, and N processes train on the
global batches one process would.
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
from accelerate.utils import broadcast
from torch import nn

from .. import pair
from ..anchors import sample_anchors
from ..modeling_dspark import DSparkDraftModel
from ..provenance import run_provenance
from .config import TrainConfig
from .curves import plot_learning_curve
from .loss_totals import LossTotals
from .objective import BlockLoss, DraftObjective, LossWeights, observe_target
from .sharding import MicroBatchPlan, round_robin_share

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


def split_records(records: list[dict], config: TrainConfig, processes: int = 1) -> tuple[list[dict], list[dict]]:
    train = [r for r in records if not is_heldout(r["id"], config.heldout_fraction)]
    heldout = [r for r in records if is_heldout(r["id"], config.heldout_fraction)]
    global_batch = config.batch_size * processes * config.gradient_accumulation_steps
    if len(train) < global_batch:
        raise ValueError(
            f"dspark train: only {len(train)} usable training sequences (of {len(records)} after the held-out split "
            f"and length checks), fewer than one batch of {global_batch} (batch_size {config.batch_size} x "
            f"{processes} processes x {config.gradient_accumulation_steps} accumulation steps). Generate more data "
            "with `dspark data respond`, or lower --batch-size or --gradient-accumulation-steps."
        )
    return train, heldout


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
    # A checkpoint's own embedding and lm_head are copies of the target's, which the objective treats as fixed (as
    # DeepSpec does). Frozen parameters beside trainable ones in one FSDP unit need `fsdp_use_orig_params: true`.
    for own in (draft.embed_tokens, draft.lm_head):
        if own is not None:
            own.requires_grad_(False)
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
    """Owns one training run. `run()` trains to the end (or to `stop_after_steps`) and returns the final metrics.

    Under `accelerate launch` every process builds the same Trainer; the processes share each global batch (see
    `sharding`), sum their statistics before logging, and only the main process writes files.
    """

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
        processes = self.accelerator.num_processes
        self.train_records, self.heldout_records = split_records(prepare_records(records, config), config, processes)
        self.plan = MicroBatchPlan(
            sequences=len(self.train_records),
            batch_size=config.batch_size,
            processes=processes,
            accumulation=config.gradient_accumulation_steps,
            seed=config.seed,
        )
        torch.manual_seed(config.seed)  # the fresh draft's initial weights are part of the run's definition
        self.draft = build_draft(config, self.target)
        self.draft.check_target(self.target, allow_stateful=True)
        self.draft.train()
        self.num_slots = self.draft.config.num_draft_tokens
        weights = LossWeights(config.ce_weight, config.tv_weight, config.confidence_weight, config.decay_gamma)
        objective = DraftObjective(self.draft, weights, config.attention)
        self.total_steps = config.max_steps or max(
            1, int(config.epochs * len(self.train_records) / self.plan.global_batch)
        )
        self.planned_steps = self.total_steps
        self.objective, self.optimizer = self._prepare(objective)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, learning_rate_lambda(config, lambda: self.total_steps)
        )
        # The schedule counts optimizer steps; accelerate's scheduler wrapper would step it once per process.
        self.scheduler = scheduler
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.step = 0
        self._resume()

    def _prepare(self, objective: DraftObjective) -> tuple[nn.Module, torch.optim.Optimizer]:
        """(wrapped objective, wrapped AdamW over its trainable parameters) for this launch (one process, DDP, FSDP)."""

        def adamw(module: nn.Module) -> torch.optim.Optimizer:
            trainable = [p for p in module.parameters() if p.requires_grad]
            return torch.optim.AdamW(trainable, lr=self.config.learning_rate, weight_decay=self.config.weight_decay)

        if self.accelerator.is_fsdp2:  # accelerate moves an FSDP2 optimizer onto the sharded parameters itself
            return self.accelerator.prepare(objective, adamw(objective))
        # FSDP1 flattens (or, with use_orig_params, re-views) the parameters while wrapping: the optimizer must see
        # the wrapped module's parameters, so it is built after the model is prepared.
        wrapped = self.accelerator.prepare(objective)
        return wrapped, self.accelerator.prepare(adamw(wrapped))

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
        saved_global_batch = state.get("global_batch", saved.batch_size * saved.gradient_accumulation_steps)
        if saved_global_batch != self.plan.global_batch:
            changed.append(
                f"global batch ({saved_global_batch} sequences then, {self.plan.global_batch} now: keep "
                "batch_size x processes x gradient_accumulation_steps)"
            )
        if changed:
            raise ValueError(
                f"dspark train: {self.output_dir} holds a run with different {', '.join(changed)}; resume with the "
                "same settings, or choose a new --output-dir."
            )
        self.accelerator.load_state(str(folder / "accelerate"))
        # Checkpoints lie on optimizer-step boundaries; the saved micro-step count may come from another accumulation
        # setting (a run resumed on a different number of processes), so accumulation restarts from zero.
        self.accelerator.step = 0
        self.step = state["step"]
        self._forget_metrics_after(self.step)
        self.accelerator.print(f"dspark train: resumed from {folder} at step {self.step}")

    def _forget_metrics_after(self, step: int) -> None:
        """Drop the lines a stopped run logged after its last checkpoint: this run logs those steps again."""
        path = self.output_dir / METRICS_FILE
        if not (self.accelerator.is_main_process and path.is_file()):
            return
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line torn by the kill
        if len(kept) != len(lines):
            partial = path.with_name(path.name + ".partial")
            partial.write_text("".join(line + "\n" for line in kept))
            os.replace(partial, path)

    def save_checkpoint(self) -> Path:
        """Atomic: everything is written to a temporary folder that is renamed into place only when complete."""
        final = checkpoint_path(self.output_dir, self.step)
        partial = final.with_name(final.name + ".partial")
        draft_state = self.draft_state_dict()
        if self.accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial / "accelerate"))
        # every process writes its own random-state file: all must be done before the folder moves
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.unwrapped_draft().save_pretrained(partial / "draft", state_dict=draft_state)
            state = {
                "step": self.step,
                "micro_batches": self.step * self.plan.micro_batches_per_step,
                "global_batch": self.plan.global_batch,
                "processes": self.plan.processes,
                "config": self.config.to_dict(),
            }
            (partial / "trainer_state.json").write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            for old in checkpoint_steps(self.output_dir)[: -self.config.keep_checkpoints]:
                shutil.rmtree(checkpoint_path(self.output_dir, old), ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def unwrapped_draft(self) -> DSparkDraftModel:
        return self.accelerator.unwrap_model(self.objective).draft

    def draft_state_dict(self) -> dict[str, torch.Tensor]:
        """The draft's full weights (a collective: under FSDP every process holds only a shard and must take part)."""
        prefix = "draft."
        full = self.accelerator.get_state_dict(self.objective)
        return {name[len(prefix) :]: value for name, value in full.items() if name.startswith(prefix)}

    # -- batches ----------------------------------------------------------------------------------------------------

    def micro_batch_records(self, index: int) -> list[dict]:
        """The records of global micro-batch `index` (epochs wrap around with a fresh order)."""
        return [self.train_records[i] for i in self.plan.sequence_positions(index)]

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
        """Held-out teacher-forced acceptance: expected tokens per round and per-slot acceptance, fixed anchors.

        The held-out batches are shared round-robin between processes and their statistics summed, so the result is
        the one a single process would compute.
        """
        records = self.heldout_records[: self.config.eval_sequences]
        if not records:
            return {}
        self.objective.eval()
        size = self.config.batch_size
        starts = range(0, len(records), size)
        totals = LossTotals(self.num_slots, self.device)
        for number in round_robin_share(len(starts), self.accelerator.process_index, self.accelerator.num_processes):
            start = starts[0 if number is None else number]
            batch = records[start : start + size]
            result = self.loss_on(batch, anchor_seed=start)
            if number is not None:
                totals.add(result, tokens=sum(len(r["input_ids"]) for r in batch))
        self.objective.train()
        means = totals.summed_across_processes(self.accelerator).means()
        return {"split": "heldout", "step": self.step, "sequences": len(records), **means}

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

    def train_step(self) -> LossTotals:
        """One optimizer step over this process's share of the global batch; returns this process's loss totals."""
        totals = LossTotals(self.num_slots, self.device)
        for index in self.plan.indices_for(self.step, self.accelerator.process_index):
            records = self.micro_batch_records(index)
            with self.accelerator.accumulate(self.objective):
                result = self.loss_on(records, anchor_seed=self.plan.anchor_seed(index))
                self.accelerator.backward(result.total)
                if self.accelerator.sync_gradients and self.config.grad_clip > 0:
                    self.accelerator.clip_grad_norm_(self.objective.parameters(), self.config.grad_clip)
                self.optimizer.step()
                if self.accelerator.sync_gradients:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            totals.add(result, tokens=sum(len(r["input_ids"]) for r in records))
        self.step += 1
        return totals

    def run(self) -> dict:
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
            provenance = run_provenance(self.device)
            provenance["processes"] = self.plan.processes
            provenance["distributed_type"] = str(self.accelerator.distributed_type)
            (self.output_dir / "provenance.json").write_text(json.dumps(provenance, indent=2))
        progress = self._progress()
        # a deliberate early stop (to test or to split a run); the time budget may move total_steps either way
        stop_after = self.step + self.config.stop_after_steps if self.config.stop_after_steps else None
        window_tokens, window_start = 0, time.perf_counter()
        run_started, self._budget_step = time.perf_counter(), self.step
        last_eval: dict = {}
        while self.step < (self.total_steps if stop_after is None else min(self.total_steps, stop_after)):
            try:
                totals = self.train_step()
            except torch.OutOfMemoryError as error:
                raise RuntimeError(
                    "dspark train: out of GPU memory. Lower --batch-size (and raise --gradient-accumulation-steps to "
                    "keep the effective batch), lower --num-anchors or --max-length, or use more GPUs."
                ) from error
            window_tokens += totals.tokens
            self._fit_time_budget(run_started)
            if progress is not None:
                progress.total = self.total_steps
                progress.update(1)
            if self.step % self.config.log_every == 0 or self.step == self.total_steps:
                step_means = totals.summed_across_processes(self.accelerator).means()
                elapsed = time.perf_counter() - window_start
                tokens = int(self.accelerator.reduce(torch.tensor(window_tokens, device=self.device), "sum"))
                record = {
                    "split": "train",
                    "step": self.step,
                    **{name: value for name, value in step_means.items() if name != "tokens"},
                    "learning_rate": self.scheduler.get_last_lr()[0],
                    "tokens": tokens,  # all processes, since the last record
                    "tokens_per_second": tokens / max(elapsed, 1e-9),
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
        The main process's clock decides for all: processes that disagreed on the run's length would wait forever
        for each other at its end.
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
        heldout_batches = math.ceil(heldout_batches / self.plan.processes)
        evaluations = 1 + (self.planned_steps // self.config.eval_every if self.config.eval_every else 0)
        remaining = budget - (time.perf_counter() - run_started) - evaluations * heldout_batches * seconds_per_step
        fits = min(self.planned_steps, self.step + max(0, int(remaining / seconds_per_step)))
        fits = int(broadcast(torch.tensor([fits], device=self.device), from_process=0)[0])
        if fits != self.total_steps:
            self.accelerator.print(
                f"dspark train: {seconds_per_step * 1000:.0f} ms/step; the {self.config.time_budget_minutes:g}-minute "
                f"budget fits {fits} of {self.planned_steps} steps; the schedule now ends at step {fits}"
            )
            self.total_steps = fits

    def save_final(self) -> Path:
        final = self.output_dir / FINAL_DIR
        draft_state = self.draft_state_dict()
        if self.accelerator.is_main_process:
            partial = final.with_name(FINAL_DIR + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            self.unwrapped_draft().save_pretrained(partial, state_dict=draft_state)
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
