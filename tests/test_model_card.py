"""`dspark card`: the model card of a draft, rendered from its checkpoint, its training run and the JSON that the real
`dspark eval` / `dspark bench` write, here on a tiny random target trained for a few steps. Every number in the card
must be a number from those files; without results the card must say so and state none."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from tiny_models import save_chat_target

from dspark.cli import main
from dspark.model_card import render_model_card
from dspark.model_card.results import METHOD_LABELS
from dspark.train.config import TrainConfig
from dspark.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
PROMPT_LENGTH = 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a small shared machine: with several threads, synchronisation (not arithmetic) dominates."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def measured(tmp_path_factory, one_thread) -> SimpleNamespace:
    """A tiny target on disk, a draft trained on its own answers by the real trainer (a few steps), and the real
    `dspark eval` (the draft twice, as `ours` and `twin`) and `dspark bench` outputs for that draft."""
    root = tmp_path_factory.mktemp("card")
    target, _ = save_chat_target(root / "target")
    torch.manual_seed(0)
    prompts = torch.randint(3, 63, (24, PROMPT_LENGTH))
    with torch.no_grad():
        answers = target.generate(prompts, max_new_tokens=16, do_sample=True, temperature=0.7, pad_token_id=1)
    records = [
        {"id": f"seq-{i}", "domain": "chat", "input_ids": row.tolist(), "prompt_length": PROMPT_LENGTH}
        for i, row in enumerate(answers)
    ]
    config = TrainConfig(
        data_dir=str(root / "no-such-data"),
        target=str(root / "target"),
        output_dir=str(root / "run"),
        block_size=4,
        markov_rank=4,
        num_anchors=4,
        batch_size=4,
        max_steps=6,
        eval_every=3,
        log_every=2,
        checkpoint_every=0,
        heldout_fraction=0.2,
        progress=False,
    )
    Trainer(config, records=records, target=target).run()
    draft = root / "run" / "final"
    common = ["--target", str(root / "target"), "--device", "cpu", "--no-progress", "--bootstrap-replicates", "200"]
    evaluation = [
        "eval",
        *common,
        *("--draft", f"ours={draft}", "--draft", f"twin={draft}", "--prompts", "mt_bench", "humaneval"),
        *("--limit", "2", "--max-new-tokens", "8", "--temperature", "0", "1"),
        *("--cache-dir", str(root / "cache"), "--out", str(root / "eval")),
    ]
    assert main(evaluation) == 0
    # prompt lookup needs no draft: its speedup is there even when a draft method fails
    bench = [
        "bench",
        *common,
        *("--draft", str(draft), "--methods", "plain,assisted,loop,lookup", "--batch-sizes", "1", "2"),
        *(
            "--rounds",
            "2",
            "--max-new-tokens",
            "6",
            "--prompts",
            "mt_bench",
            "--limit",
            "1",
            "--out",
            str(root / "bench"),
        ),
    ]
    assert main(bench) == 0
    return SimpleNamespace(
        root=root,
        target=root / "target",
        run=root / "run",
        draft=draft,
        eval_path=root / "eval" / "eval.json",
        bench_path=root / "bench" / "bench.json",
        eval=json.loads((root / "eval" / "eval.json").read_text()),
        bench=json.loads((root / "bench" / "bench.json").read_text()),
    )


def section(card: str, heading: str) -> list[str]:
    """The lines under `heading` up to the next heading of the same or a higher level."""
    lines = card.splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    end = next(
        (i for i in range(start + 1, len(lines)) if re.match(rf"^#{{1,{level}}} ", lines[i])),
        len(lines),
    )
    return lines[start + 1 : end]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def rows_starting(lines: list[str], first_cell: str) -> list[list[str]]:
    return [cells(line) for line in lines if line.startswith("|") and cells(line)[0] == first_cell]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def two(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def test_a_card_without_results_says_no_results_were_measured_and_states_no_numbers(measured):
    card = render_model_card(measured.draft)
    results = "\n".join(section(card, "## Results"))
    assert "No measured results yet" in results
    assert not re.search(r"\d", results), "a card without results must not show any number in its results"
    limitations = "\n".join(section(card, "## Limitations"))
    assert "Acceptance length: no `dspark eval` results were given." in limitations
    assert "End-to-end speed: no `dspark bench` results were given." in limitations
    assert "No training record was given" in card
    assert "dspark vllm patch" in card and "dspark vllm patch" not in render_model_card(
        measured.draft, include_vllm=False
    )
    assert ModelCard(card).data.to_dict()["library_name"] == "transformers"


def test_front_matter_is_hub_metadata_with_base_model_library_pipeline_license_and_tags(measured):
    card = render_model_card(
        measured.draft,
        [measured.eval_path],
        base_model="tiny-org/tiny-target",
        license="mit",
        datasets=["tiny-org/answers"],
        draft_name="ours",
    )
    data = ModelCard(card).data.to_dict()
    assert data["base_model"] == "tiny-org/tiny-target"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["license"] == "mit"
    assert data["datasets"] == ["tiny-org/answers"]
    assert {"speculative-decoding", "dspark", "dflash"} <= set(data["tags"])
    assert front_matter(card) == data  # plain YAML, nothing only the Hub's parser would accept
    assert 'AutoModel.from_pretrained("path/to/this-draft", trust_remote_code=True)' in card
    assert "assistant_model=draft" in card and "speculative_generate(" in card


def test_a_local_target_path_is_named_in_the_text_but_not_written_as_base_model(measured):
    card = render_model_card(measured.draft, [measured.eval_path], draft_name="ours")
    assert "base_model" not in ModelCard(card).data.to_dict()
    assert f"`{measured.target}`" in card


def test_acceptance_tables_show_the_eval_json_numbers(measured):
    card = render_model_card(measured.draft, [measured.eval_path], draft_name="ours")
    for key in ("T0", "T1"):
        data = measured.eval[key]
        lines = section(card, f"#### T={data['temperature']:g}")
        domains = list(data["domains"])
        assert f"Measure: {data['measure']}." in "\n".join(lines)
        for arm, per_domain in data["acceptance"].items():
            label = f"{arm} (this draft)" if arm == "ours" else arm
            acceptance, per_position = rows_starting(lines, label)
            expected = [two(per_domain[d]["acceptance_length"]) for d in [*domains, "all"]]
            count = per_domain["all"].get("rounds", per_domain["all"].get("anchors"))
            assert acceptance[1:] == [*expected, f"{count:,}"]
            assert per_position[1:] == [two(v) for v in per_domain["all"]["per_position_acceptance"]]
        paired = data["paired"]
        for domain in ["all", *domains]:
            entry = paired[domain]
            (row,) = rows_starting(lines, domain)
            low, high = entry["absolute_gain_ci"]
            relative_low, relative_high = entry["relative_gain_ci"]
            assert row[1:8] == [
                str(entry["sequences"]),
                f"{entry['a']:.3f}",
                f"{entry['b']:.3f}",
                f"{entry['absolute_gain']:+.3f}",
                f"{low:+.3f} .. {high:+.3f}",
                f"{entry['relative_gain']:+.1%}",
                f"{relative_low:+.1%} .. {relative_high:+.1%}",
            ]
            # the same draft twice: the interval includes 0, and the card says it in words
            assert entry["includes_zero"] and row[8] == "CI includes 0: no significant difference"
        assert any("are not significantly different" in line for line in lines)


def test_speed_tables_show_the_bench_json_numbers_and_failures(measured):
    card = render_model_card(measured.draft, [measured.bench_path])
    lines = section(card, "#### Local generation")
    summary = measured.bench["local"]["summary"]
    for batch, methods in summary.items():
        for method, entry in methods.items():
            (row,) = [r for r in rows_starting(lines, batch) if r[1] == METHOD_LABELS[method]]
            versus = entry.get("vs_plain") or {}
            assert row[2] == ("-" if entry["tokens_per_second"] is None else f"{entry['tokens_per_second']:.1f}")
            assert row[3] == ("-" if versus.get("speedup") is None else f"{versus['speedup']:.2f}x")
            interval = versus.get("speedup_ci")
            assert row[4] == ("-" if not interval else f"{interval[0]:.2f} .. {interval[1]:.2f}")
            match = entry.get("token_match")
            assert row[5] == (f"{match['identical']}/{match['rows']}" if match else "-")
            failed = f" ({entry['failed_runs']} failed)" if entry["failed_runs"] else ""
            assert row[6] == f"{entry['runs']}{failed}"
            for error in entry["errors"]:
                assert error in "\n".join(section(card, "## Limitations"))
    assert summary["1"]["lookup"]["vs_plain"]["speedup"] > 0, "prompt lookup needs no draft and must have run"
    for batch, skipped in measured.bench["local"]["skipped"].items():
        for method in skipped:
            assert f"- batch {batch}: {method} not run" in card
    assert "Serving: not measured; no servers configured" in card


def test_limitations_say_when_the_draft_slows_decoding_and_when_an_interval_includes_one(measured, tmp_path):
    payload = json.loads(measured.bench_path.read_text())
    summary = payload["local"]["summary"]
    # the real bench output, with the loop's speedups set to the two situations the card must put in words
    for batch, speedup, interval in (("1", 0.8, [0.7, 0.9]), ("2", 1.1, [0.95, 1.3])):
        summary[batch]["loop"].update(failed_runs=0, errors=[], vs_plain={"speedup": speedup, "speedup_ci": interval})
    edited = tmp_path / "bench.json"
    edited.write_text(json.dumps(payload))
    limitations = "\n".join(section(render_model_card(measured.draft, [edited]), "## Limitations"))
    assert (
        "`dspark.speculative_generate` is slower than plain decoding (0.80x, 95% bootstrap CI 0.70-0.90)" in limitations
    )
    assert "this draft slows decoding at batch 1" in limitations
    assert "measured 1.10x, but the 95% bootstrap CI 0.95-1.30 includes 1" in limitations


def test_not_measured_names_what_no_results_file_covers(measured):
    card = render_model_card(measured.draft, [measured.eval_path], draft_name="ours")
    not_measured = "\n".join(section(card, "## Limitations"))
    device = measured.eval["provenance"]["device"]
    assert "End-to-end speed: no `dspark bench` results were given." in not_measured
    assert "Serving throughput (vLLM or another OpenAI-compatible server)." in not_measured
    assert f"Hardware other than {device}." in not_measured
    assert "Prompt domains other than chat, code." in not_measured
    assert "Generations longer than 8 new tokens." in not_measured
    assert "Acceptance at T=1 is a teacher-forced expectation" in not_measured


def test_several_drafts_without_a_name_are_not_attributed_to_the_checkpoint(measured):
    card = render_model_card(measured.draft, [measured.eval_path])  # ours and twin are both this folder
    assert "(this draft)" not in card
    assert "which one is this checkpoint was not stated (`--draft-name`)" in card


def test_the_training_section_comes_from_the_run_record(measured):
    card = render_model_card(measured.draft, training_config=measured.run)
    lines = section(card, "## Training")
    config = json.loads((measured.run / "config.json").read_text())
    provenance = json.loads((measured.run / "provenance.json").read_text())
    metrics = [json.loads(line) for line in (measured.run / "metrics.jsonl").read_text().splitlines()]
    final_heldout = [m for m in metrics if m["split"] == "heldout"][-1]
    assert rows_starting(lines, "steps")[0][1] == f"{max(m['step'] for m in metrics if m['split'] == 'train')} done"
    assert rows_starting(lines, "hardware")[0][1] == provenance["device"]
    assert rows_starting(lines, "anchors (blocks) per sequence")[0][1] == str(config["num_anchors"])
    assert rows_starting(lines, "learning rate")[0][1].startswith(f"{config['learning_rate']}, warmup")
    assert f"{final_heldout['expected_length']:.2f} tokens per round at step {final_heldout['step']}" in card
    assert "size not recorded" in rows_starting(lines, "data")[0][1]


def test_a_training_config_file_is_shown_with_the_trainers_defaults_marked(measured):
    config_path = REPO / "configs" / "train" / "smollm2_dspark.yaml"
    card = render_model_card(measured.draft, training_config=config_path)
    lines = section(card, "## Training")
    settings = yaml.safe_load(config_path.read_text())
    assert rows_starting(lines, "anchors (blocks) per sequence")[0][1] == str(settings["num_anchors"])
    assert rows_starting(lines, "seed")[0][1] == f"{TrainConfig().seed} (*default*)"
    assert "not from a run's record" in "\n".join(section(card, "## Limitations"))


def test_dspark_card_writes_the_card_and_its_plots_beside_it(measured, tmp_path):
    output = tmp_path / "card" / "README.md"
    arguments = [
        "card",
        str(measured.draft),
        *("--results", str(measured.eval_path), str(measured.bench_path)),
        *("--training-config", str(measured.run), "--draft-name", "ours", "--base-model", "tiny-org/tiny-target"),
        *(
            "--repo-id",
            "tiny-org/tiny-draft",
            "--plots-dir",
            str(tmp_path / "card" / "assets"),
            "--output",
            str(output),
        ),
    ]
    assert main(arguments) == 0
    card = output.read_text()
    assert ModelCard(card).data.to_dict()["base_model"] == "tiny-org/tiny-target"
    assert 'AutoModel.from_pretrained("tiny-org/tiny-draft", trust_remote_code=True)' in card
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert any("per_position_T0" in link for link in links) and any("learning_curve" in link for link in links)
    for link in links:
        assert link.startswith("assets/") and (output.parent / link).stat().st_size > 1000


@pytest.mark.parametrize(
    "problem, message",
    [
        ("not_a_draft", "is not a DSpark draft (config.json has model_type='llama'"),
        ("missing_folder", "does not exist"),
        ("unknown_results", "is not recognised"),
        ("unknown_draft_name", "--draft-name 'nobody' is not a draft in"),
    ],
)
def test_dspark_card_explains_bad_input(measured, tmp_path, capsys, problem, message):
    unknown = tmp_path / "other.json"
    unknown.write_text(json.dumps({"hello": "world"}))
    arguments = {
        "not_a_draft": [str(measured.target)],
        "missing_folder": [str(tmp_path / "nowhere")],
        "unknown_results": [str(measured.draft), "--results", str(unknown)],
        "unknown_draft_name": [str(measured.draft), "--results", str(measured.eval_path), "--draft-name", "nobody"],
    }[problem]
    assert main(["card", *arguments, "--output", str(tmp_path / "README.md")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "README.md").exists()


def script_card_arguments(output: Path, plots: Path) -> list[str]:
    """The `dspark card` arguments of scripts/render_default_card.sh, with its output and plots folder replaced."""
    script = (REPO / "scripts" / "render_default_card.sh").read_text().replace("\\\n", " ")
    (command,) = [line for line in script.splitlines() if " -m dspark.cli card " in line]
    words = shlex.split(command)
    arguments = words[words.index("dspark.cli") + 1 :]
    return [{"$output": str(output), "$plots": str(plots)}.get(word, word) for word in arguments]


def test_the_shipped_default_card_is_the_one_the_script_renders_from_the_published_results(tmp_path, monkeypatch):
    shipped = REPO / "dspark" / "default_draft" / "README.md"
    output = tmp_path / "README.md"
    monkeypatch.chdir(REPO)  # the script runs from the repository root, with paths relative to it
    assert main(script_card_arguments(output, tmp_path / "assets")) == 0

    def without_figures(text: str) -> list[str]:  # figure links depend on where the plots were written
        return [line for line in text.splitlines() if not line.startswith("![")]

    assert without_figures(shipped.read_text()) == without_figures(output.read_text()), (
        "dspark/default_draft/README.md is stale: rerun `bash scripts/render_default_card.sh`"
    )
    data = ModelCard(shipped.read_text()).data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "this draft slows decoding at batch 1" in shipped.read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", shipped.read_text()):
        assert (shipped.parent / link).is_file(), f"the shipped card links a missing figure {link}"
