"""Training in 2 processes (DDP over gloo, on CPU) through the real `accelerate launch`.

N processes must make the run that one process makes with the same global batch (batch_size x processes x
accumulation): the same global batches in the same order, each process training on its own share of each, the same
parameters (up to float summation order), logs, checkpoints and the draft written once, held-out numbers over all
held-out sequences, and exact resume after a process dies.

The 2-process runs use 2 accumulation steps; the one-process reference uses 4: both have a global batch of 8.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train_data import byte_tokenizer
from tiny_models import tiny_llama

import dspark
from dspark.modeling_dspark import DSparkDraftModel
from dspark.train.config import TrainConfig
from dspark.train.prompts import topic_prompts
from dspark.train.responses import generate_responses
from dspark.train.sharding import MicroBatchPlan, round_robin_share
from dspark.train.trainer import Trainer, checkpoint_steps

REPOSITORY = Path(dspark.__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("distributed_train_worker.py")
PROCESSES = 2
ACCUMULATION = 2  # per process: the one-process reference accumulates PROCESSES x ACCUMULATION micro-batches
GLOBAL_BATCH = 8
SETTINGS = dict(
    block_size=4,
    markov_rank=8,
    num_anchors=8,
    batch_size=2,
    max_steps=6,  # 27 training sequences make 3 global batches per epoch: the run crosses an epoch boundary
    learning_rate=3e-3,
    log_every=1,
    eval_every=3,
    eval_sequences=5,  # 3 held-out batches: one process evaluates 2, the other 1 (and pads)
    checkpoint_every=2,
    heldout_fraction=0.15,
    progress=False,
)
# one line per step, and the held-out evaluations
EXPECTED_METRICS = [("train", 1), ("train", 2), ("train", 3), ("heldout", 3)]
EXPECTED_METRICS += [("train", 4), ("train", 5), ("train", 6), ("heldout", 6)]
DIE_AFTER_STEPS = 5  # after the checkpoint of step 4 and the metrics line of step 5
LAUNCH_TIMEOUT_SECONDS = 600


@pytest.mark.parametrize(("processes", "accumulation"), [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_every_split_of_a_global_batch_trains_on_the_same_micro_batches(processes, accumulation):
    reference = MicroBatchPlan(sequences=70, batch_size=3, processes=1, accumulation=8, seed=5)
    plan = MicroBatchPlan(sequences=70, batch_size=3, processes=processes, accumulation=accumulation, seed=5)
    assert plan.global_batch == reference.global_batch == 24 and plan.steps_per_epoch == 2
    for step in range(5):  # through three epochs
        shares = [plan.indices_for(step, rank) for rank in range(processes)]
        indices = sorted(index for share in shares for index in share)
        assert indices == reference.indices_for(step, 0)
        positions = [position for index in indices for position in plan.sequence_positions(index)]
        assert positions == [position for index in indices for position in reference.sequence_positions(index)]
        assert len(set(positions)) == 24  # no sequence twice in a global batch
    epoch_one = [p for index in range(16) for p in plan.sequence_positions(index)]
    epoch_two = [p for index in range(16, 32) for p in plan.sequence_positions(index)]
    assert epoch_one != epoch_two and len(set(epoch_one)) == len(set(epoch_two)) == 48  # reshuffled, 22 dropped


def test_every_process_makes_the_same_number_of_evaluation_forwards():
    assert [round_robin_share(3, rank, 2) for rank in range(2)] == [[0, 2], [1, None]]
    assert [round_robin_share(1, rank, 3) for rank in range(3)] == [[0], [None], [None]]
    assert round_robin_share(4, 0, 1) == [0, 1, 2, 3] and round_robin_share(0, 1, 2) == []


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny target saved as a HF folder and a response dataset it answered: what `dspark train` reads."""
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = byte_tokenizer()
    target = tiny_llama(seed=3, vocab_size=len(tokenizer))
    with torch.no_grad():
        target.lm_head.weight.mul_(6.0)  # confident next-token distributions, so the draft has something to learn
    target.generation_config.pad_token_id = tokenizer.pad_token_id
    target.save_pretrained(root / "target")
    prompts = topic_prompts(32)
    generate_responses(
        target, tokenizer, prompts, root / "data", batch_size=32, max_new_tokens=12, temperature=1.0, progress=False
    )
    return root


def config_values(workspace: Path, output_dir: Path, accumulation: int) -> dict:
    return dict(
        SETTINGS,
        data_dir=str(workspace / "data"),
        target=str(workspace / "target"),
        output_dir=str(output_dir),
        gradient_accumulation_steps=accumulation,
    )


def launch(workspace: Path, output_dir: Path, *script: str) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 SCRIPT...` (on a machine without GPUs: CPU processes, gloo)."""
    config = output_dir.with_suffix(".yaml")
    config.write_text(yaml.safe_dump(config_values(workspace, output_dir, ACCUMULATION)))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(PROCESSES)]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    command += [*script, "--config", str(config)]
    # the processes must import this checkout's dspark; one thread each, since the processes share the CPU cores
    python_path = os.pathsep.join(filter(None, [str(REPOSITORY), os.environ.get("PYTHONPATH")]))
    environment = dict(os.environ, PYTHONPATH=python_path, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    # a process group of its own, so that a hung run is ended with every process it started
    launcher = subprocess.Popen(
        command,
        env=environment,
        cwd=workspace,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = launcher.communicate(timeout=LAUNCH_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        stdout, stderr = launcher.communicate()
        pytest.fail(f"accelerate launch did not finish in {LAUNCH_TIMEOUT_SECONDS} s:\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(command, launcher.returncode, stdout, stderr)


def recording_worker(record_dir: Path, die_after_steps: int = 0) -> tuple[str, ...]:
    record_dir.mkdir(parents=True, exist_ok=True)
    return str(WORKER), str(record_dir), str(die_after_steps), "--"


def failure_report(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-6000:]}"


@contextmanager
def one_cpu_thread():
    """In-process runs on one thread: tiny matrices gain nothing from more, and the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_process(workspace) -> Trainer:
    """The reference: one process, accumulating 4 micro-batches of 2 (in this pytest process)."""
    with one_cpu_thread():
        trainer = Trainer(TrainConfig(**config_values(workspace, workspace / "one", PROCESSES * ACCUMULATION)))
        trainer.run()
    return trainer


@pytest.fixture(scope="module")
def two_processes(workspace) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted 2-process run (each process accumulating 2 micro-batches of 2); its output folder."""
    output = workspace / "two"
    result = launch(workspace, output, *recording_worker(workspace / "two-seen"))
    assert result.returncode == 0, failure_report(result)
    return output, result


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def final_parameters(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final" / "model.safetensors")


def seen_micro_batches(record_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (record_dir / f"rank-{rank}.jsonl").read_text().splitlines()]


def test_two_processes_write_metrics_checkpoints_and_the_draft_once(two_processes):
    output, result = two_processes
    lines = metrics(output)
    assert [(line["split"], line["step"]) for line in lines] == EXPECTED_METRICS  # one writer, no duplicates
    assert result.stdout.count('"split": "heldout"') == 1  # the final metrics are printed by the main process only
    assert checkpoint_steps(output) == [4, 6]
    assert not list(output.rglob("*.partial"))
    for step in (4, 6):
        folder = output / "checkpoints" / f"step-{step:08d}"
        state = json.loads((folder / "trainer_state.json").read_text())
        assert (state["step"], state["processes"], state["global_batch"]) == (step, PROCESSES, GLOBAL_BATCH)
        # every process's random state is inside: the folder moved into place only after both had written
        assert {p.name for p in (folder / "accelerate").glob("random_states_*.pkl")} == {
            "random_states_0.pkl",
            "random_states_1.pkl",
        }
        # the saved draft holds the trained weights that the resumable state holds
        wrapped = load_file(folder / "accelerate" / "model.safetensors")
        draft = {name.removeprefix("draft."): value for name, value in wrapped.items()}
        torch.testing.assert_close(load_file(folder / "draft" / "model.safetensors"), draft)
    provenance = json.loads((output / "provenance.json").read_text())
    assert provenance["processes"] == PROCESSES and provenance["distributed_type"] == "DistributedType.MULTI_CPU"
    draft = DSparkDraftModel.from_pretrained(output / "final")
    assert draft.config.block_size == SETTINGS["block_size"]


def test_each_process_trains_on_its_own_share_of_the_global_batches_one_process_sees(
    workspace, two_processes, one_process
):
    output, _ = two_processes
    lengths = {r["id"]: len(r["input_ids"]) for r in one_process.train_records}
    by_step: dict[int, dict[int, set[str]]] = {}
    for rank in range(PROCESSES):
        for line in seen_micro_batches(workspace / "two-seen", rank):
            assert line["index"] % PROCESSES == rank  # process r takes every 2nd micro-batch, starting at r
            assert line["index"] // (PROCESSES * ACCUMULATION) == line["step"]
            # the same sequences one process trains on under this global index
            assert line["ids"] == [r["id"] for r in one_process.micro_batch_records(line["index"])]
            by_step.setdefault(line["step"], {}).setdefault(rank, set()).update(line["ids"])
    assert sorted(by_step) == list(range(SETTINGS["max_steps"]))
    tokens_per_step = []
    for step, shares in sorted(by_step.items()):
        assert not shares[0] & shares[1], f"step {step}: both processes trained on {shares[0] & shares[1]}"
        assert len(shares[0] | shares[1]) == GLOBAL_BATCH
        tokens_per_step.append(sum(lengths[i] for i in shares[0] | shares[1]))
    train_lines = [line for line in metrics(output) if line["split"] == "train"]
    # the logged token counts are those of all processes: the whole global batch of each step (log_every = 1)
    assert [line["tokens"] for line in train_lines] == tokens_per_step
    assert [line["micro_batches"] for line in train_lines] == [PROCESSES * ACCUMULATION] * SETTINGS["max_steps"]
    assert all(line["tokens_per_second"] > 0 for line in train_lines)


def test_two_processes_reach_the_parameters_of_one_process_with_the_same_global_batch(two_processes, one_process):
    output, _ = two_processes
    expected, actual = final_parameters(one_process.output_dir), final_parameters(output)
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=2e-5, rtol=1e-5, msg=name)
    one_lines, two_lines = metrics(one_process.output_dir), metrics(output)
    assert [(line["split"], line["step"]) for line in one_lines] == EXPECTED_METRICS
    for one, two in zip(one_lines, two_lines):
        # a logged step is the mean over the whole global batch, not one process's last micro-batch
        assert one.keys() == two.keys()
        for name in ("loss", "ce", "tv", "confidence", "expected_length", "learning_rate", "tokens"):
            if name in one:
                assert two[name] == pytest.approx(one[name], rel=1e-5, abs=1e-6), (one["split"], one["step"], name)


def test_heldout_evaluation_covers_every_heldout_sequence_across_processes(two_processes, one_process):
    output, _ = two_processes
    one_heldout = [line for line in metrics(one_process.output_dir) if line["split"] == "heldout"]
    two_heldout = [line for line in metrics(output) if line["split"] == "heldout"]
    assert len(one_process.heldout_records) >= SETTINGS["eval_sequences"]
    for one, two in zip(one_heldout, two_heldout, strict=True):
        # 3 batches of 2, 2 and 1 sequences: process 0 runs two, process 1 one and a throw-away one (equal calls)
        assert one["micro_batches"] == two["micro_batches"] == 3
        assert one["tokens"] == two["tokens"] and two["sequences"] == SETTINGS["eval_sequences"]
        for name in ("loss", "expected_length"):
            assert two[name] == pytest.approx(one[name], rel=1e-5), (two["step"], name)
        torch.testing.assert_close(torch.tensor(two["slot_acceptance"]), torch.tensor(one["slot_acceptance"]))


@pytest.fixture(scope="module")
def killed_run(workspace) -> tuple[Path, Path]:
    """A 2-process run whose process 1 dies (SIGKILL) after step 5; (its output folder, a copy taken right after)."""
    output = workspace / "killed"
    result = launch(workspace, output, *recording_worker(workspace / "killed-seen", die_after_steps=DIE_AFTER_STEPS))
    died = result.returncode != 0 and "SIGKILL" in result.stderr
    assert died, "process 1 should have been killed: " + failure_report(result)
    snapshot = workspace / "killed-snapshot"
    shutil.copytree(output, snapshot)
    return output, snapshot


def test_a_two_process_run_killed_mid_way_resumes_to_the_uninterrupted_parameters(workspace, two_processes, killed_run):
    output, snapshot = killed_run
    assert checkpoint_steps(snapshot) == [2, 4] and not (snapshot / "final").exists()
    assert [line["step"] for line in metrics(snapshot) if line["split"] == "train"][-1] == DIE_AFTER_STEPS
    # resume with the documented command itself
    result = launch(workspace, output, "-m", "dspark.cli", "train")
    assert result.returncode == 0, failure_report(result)
    assert "resumed from" in result.stdout + result.stderr
    uninterrupted, resumed = final_parameters(two_processes[0]), final_parameters(output)
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
    # the lines the dead run logged after its last checkpoint are replaced, not repeated
    lines, uninterrupted_lines = metrics(output), metrics(two_processes[0])
    assert [(line["split"], line["step"]) for line in lines] == EXPECTED_METRICS
    for line, uninterrupted_line in zip(lines, uninterrupted_lines):
        for name in ("loss", "expected_length", "slot_acceptance", "tokens"):
            assert line[name] == uninterrupted_line[name], (line["split"], line["step"], name)


def test_a_two_process_checkpoint_resumes_in_one_process_with_the_same_global_batch(workspace, killed_run, one_process):
    _, snapshot = killed_run
    with pytest.raises(ValueError, match="global batch"):
        Trainer(TrainConfig(**config_values(workspace, snapshot, ACCUMULATION)))  # 1 x 2 x 2 = 4 sequences, not 8
    with one_cpu_thread():
        trainer = Trainer(TrainConfig(**config_values(workspace, snapshot, PROCESSES * ACCUMULATION)))
        assert trainer.step == 4
        trainer.run()
    expected, actual = final_parameters(one_process.output_dir), final_parameters(snapshot)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=2e-5, rtol=1e-5, msg=name)
