"""The vLLM 0.23.0 patch set, its tooling and the checkpoint export, checked on CPU against the real vLLM sources.

The vLLM wheel (261 MiB) is downloaded once into `$DSPARK_TEST_CACHE` (default ~/.cache/dspark-tests) and only the
few files the patches touch are read from it. Offline, these tests skip, unless CI is set: then they fail.

vLLM itself cannot be imported here (CUDA-only build), so the patched code is exercised in pieces: the new
`dspark_markov.py` is pure torch and is loaded as a module; torch-only definitions inside the patched vLLM files
(`build_dspark_heads`, `_load_dspark_heads`, `compute_probs_and_sample_next_token`, ...) are lifted out with `ast`
and run against small stand-ins. The GPU side (a real `vllm serve`) is staged by scripts/device/stage_vllm.py.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import markov_reference as markov
import pytest
import torch
from module_files import load_module
from safetensors.torch import load_file
from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper

from dspark.cli import main
from dspark.configuration_dspark import DSparkConfig
from dspark.modeling_dspark import DSparkDraftModel, ProcessorTokenChooser
from dspark.vllm import patching
from dspark.vllm.export import export_for_vllm, ordered_layer_ids, reorder_fc
from dspark.vllm.unified_diff import apply_diff

VERSION = patching.SUPPORTED_VERSION
PATCH_SET = patching.PatchSet.load(VERSION)
QWEN3_DFLASH = "vllm/model_executor/models/qwen3_dflash.py"
PROPOSER = "vllm/v1/spec_decode/llm_base_proposer.py"
MARKOV = "vllm/v1/spec_decode/dspark_markov.py"
SAMPLER_OPS = "vllm/v1/sample/ops/topk_topp_sampler.py"
VERSION_FILES = ("vllm-0.23.0.dist-info/METADATA", "vllm/_version.py")


# ----------------------------------------------------------------------------------------------------------------
# The real vLLM sources
# ----------------------------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    return Path(os.environ.get("DSPARK_TEST_CACHE") or Path.home() / ".cache" / "dspark-tests") / "wheels"


@pytest.fixture(scope="session")
def vllm_wheel() -> zipfile.ZipFile:
    folder = _cache_dir()
    found = sorted(folder.glob(f"vllm-{VERSION}-*.whl"))
    if not found:
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", f"vllm=={VERSION}", "-d", str(folder)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
            failure = None if done.returncode == 0 else done.stderr.strip().splitlines()[-1:]
        except (OSError, subprocess.TimeoutExpired) as error:
            failure = [str(error)]
        found = sorted(folder.glob(f"vllm-{VERSION}-*.whl"))
        if failure or not found:
            message = f"cannot download the vLLM {VERSION} wheel into {folder} (offline?): {failure}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    with zipfile.ZipFile(found[-1]) as archive:
        yield archive


@pytest.fixture(scope="session")
def originals(vllm_wheel) -> dict[str, str | None]:
    """Upstream text of every file the patch set touches (None: absent upstream), plus helpers the tests read."""
    names = set(vllm_wheel.namelist())
    paths = [file.path for file in PATCH_SET.files] + [SAMPLER_OPS, *VERSION_FILES]
    return {path: vllm_wheel.read(path).decode() if path in names else None for path in paths}


@pytest.fixture(scope="session")
def patched(originals) -> dict[str, str]:
    return {file.path: apply_diff(originals[file.path], file.diff) for file in PATCH_SET.files}


@pytest.fixture
def vllm_tree(tmp_path, originals) -> Path:
    """An unpacked slice of the wheel: the files the patches touch plus the version records."""
    root = tmp_path / "site-packages"
    for path, text in originals.items():
        if text is not None:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text)
    return root


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _tree_snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p.read_text()) for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------------
# Lifting torch-only definitions out of the patched vLLM files
# ----------------------------------------------------------------------------------------------------------------


def lift(source: str, names: list[str], namespace: dict) -> dict:
    """Exec the named top-level definitions (or `Class.method`) of `source` in `namespace` and return it."""
    tree = ast.parse(source)
    top = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    for node in tree.body:  # module constants such as DSPARK_HEAD_PREFIXES
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            top[node.targets[0].id] = node
    for name in names:
        owner, _, method = name.partition(".")
        node = top[owner]
        if method:
            node = next(item for item in node.body if isinstance(item, ast.FunctionDef) and item.name == method)
        module = ast.Module(body=[node], type_ignores=[])
        exec(compile(module, f"<lifted {name}>", "exec"), namespace)
    return namespace


@pytest.fixture(scope="session")
def vllm_markov(patched, tmp_path_factory) -> types.ModuleType:
    """The patched vLLM's dspark_markov.py, imported from a file (it needs torch only)."""
    path = tmp_path_factory.mktemp("vllm_markov") / "dspark_markov.py"
    path.write_text(patched[MARKOV])
    return load_module(path, "vllm_dspark_markov_under_test")


# ----------------------------------------------------------------------------------------------------------------
# The patch set against the real sources
# ----------------------------------------------------------------------------------------------------------------


def test_manifest_checksums_are_those_of_the_published_files(originals):
    for file in PATCH_SET.files:
        original = originals[file.path]
        expected = None if original is None else _sha(original)
        assert file.original_sha256 == expected, f"{file.path}: the manifest does not describe the vLLM wheel"


def test_patches_apply_cleanly_compile_and_reverse(originals, patched):
    for file in PATCH_SET.files:
        assert _sha(patched[file.path]) == file.patched_sha256, file.path
        compile(patched[file.path], file.path, "exec")  # syntax of the result
        assert apply_diff(patched[file.path], file.diff, reverse=True) == originals[file.path]


def test_patches_only_add_lines_so_stock_code_stays_as_it_was():
    """Every upstream line survives: the DSpark code is inserted beside it, behind gates, never in its place."""
    for file in PATCH_SET.files:
        removed = [line for line in file.diff.splitlines()[2:] if line.startswith("-")]
        assert removed == [], f"{file.path} removes upstream lines: {removed[:3]}"


def test_patched_files_import_nothing_outside_the_vllm_0_23_tree(vllm_wheel, patched):
    names = set(vllm_wheel.namelist()) | set(patched)
    for path, text in patched.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vllm"):
                module = node.module.replace(".", "/")
                assert f"{module}.py" in names or f"{module}/__init__.py" in names, f"{path}: {node.module}"
    tree = ast.parse(patched[MARKOV])
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "os", "collections", "dataclasses", "torch"}


# ----------------------------------------------------------------------------------------------------------------
# patch / verify / revert
# ----------------------------------------------------------------------------------------------------------------


def _cli(capsys, *args) -> tuple[int, str]:
    code = main(["vllm", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_patch_verify_revert_round_trip(vllm_tree, originals, patched, capsys):
    before = _tree_snapshot(vllm_tree)
    code, out = _cli(capsys, "verify", "--vllm-root", vllm_tree)
    assert code == 1 and "not patched" in out

    code, out = _cli(capsys, "patch", "--vllm-root", vllm_tree)
    assert code == 0, out
    for file in PATCH_SET.files:
        assert (vllm_tree / file.path).read_text() == patched[file.path]
    code, out = _cli(capsys, "verify", "--vllm-root", vllm_tree)
    assert code == 0 and "all files patched" in out

    code, out = _cli(capsys, "patch", "--vllm-root", vllm_tree)  # idempotent
    assert code == 0 and out.count("already patched") == len(PATCH_SET.files)

    code, out = _cli(capsys, "revert", "--vllm-root", vllm_tree)
    assert code == 0, out
    assert _tree_snapshot(vllm_tree) == before  # originals back, added file and backups gone


def test_revert_without_backups_reverse_applies_the_diffs(vllm_tree, capsys):
    before = _tree_snapshot(vllm_tree)
    install = patching.find_vllm(vllm_tree)
    patching.patch(install, PATCH_SET)
    assert install.backup_dir.is_dir()
    for backup in install.backup_dir.rglob("*.py"):
        backup.write_text("# damaged backup\n")
    patching.revert(install, PATCH_SET)
    assert _tree_snapshot(vllm_tree) == before


def test_refuses_another_vllm_version(vllm_tree, capsys):
    for path in VERSION_FILES:
        target = vllm_tree / path
        target.write_text(target.read_text().replace("0.23.0", "0.24.0").replace("(0, 23, 0)", "(0, 24, 0)"))
    before = _tree_snapshot(vllm_tree)
    code, out = _cli(capsys, "patch", "--vllm-root", vllm_tree)
    assert code == 2
    assert "found vLLM 0.24.0" in out and "vLLM 0.23.0 exactly" in out
    assert _tree_snapshot(vllm_tree) == before
    code, out = _cli(capsys, "verify", "--vllm-root", vllm_tree)
    assert code == 1 and "wrong version" in out


def test_refuses_a_tampered_file_and_changes_nothing(vllm_tree, capsys):
    tampered = vllm_tree / PROPOSER
    tampered.write_text(tampered.read_text() + "# local edit\n")
    before = _tree_snapshot(vllm_tree)
    code, out = _cli(capsys, "patch", "--vllm-root", vllm_tree)
    assert code == 2 and "refusing to patch" in out and PROPOSER in out
    assert _tree_snapshot(vllm_tree) == before  # all or nothing: the intact files were not patched either
    code, out = _cli(capsys, "verify", "--vllm-root", vllm_tree)
    assert code == 1 and f"modified  {PROPOSER}" in out
    code, out = _cli(capsys, "revert", "--vllm-root", vllm_tree)
    assert code == 2 and "refusing to revert" in out


def test_a_folder_without_vllm_is_refused(tmp_path, capsys):
    code, out = _cli(capsys, "verify", "--vllm-root", tmp_path)
    assert code == 2 and "has no vllm/ folder" in out


# ----------------------------------------------------------------------------------------------------------------
# The Markov math: reference (tests/markov_reference.py) == HF draft_block == the patched vLLM copy
# ----------------------------------------------------------------------------------------------------------------


def _tiny_draft(head_type: str = "vanilla", seed: int = 0, **overrides) -> DSparkDraftModel:
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=301,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        block_size=6,
        target_layer_ids=[0, 2],
        num_target_layers=4,
        mask_token_id=300,
        markov_rank=8,
        markov_head_type=head_type,
        enable_confidence_head=True,
        has_lm_head=True,
    )
    settings.update(overrides)
    draft = DSparkDraftModel(DSparkConfig(**settings)).eval()
    with torch.no_grad():
        for parameter in draft.parameters():  # W2 starts at zero: randomise everything so the heads matter
            parameter.normal_(0.0, 0.4)
    return draft


def _reference_weights(draft: DSparkDraftModel) -> tuple[markov.MarkovWeights, markov.ConfidenceWeights]:
    state = draft.state_dict()
    return (
        markov.markov_weights_from_state_dict(state),
        markov.confidence_weights_from_state_dict(state, draft.config.confidence_head_with_markov),
    )


class RaceChooser(ProcessorTokenChooser):
    """HF's chooser with the exponential race on given noise instead of torch.multinomial (same distribution)."""

    def __init__(self, sequence, processors, noise):
        super().__init__(sequence, processors, do_sample=True)
        self.noise, self.slot = noise, 0

    def __call__(self, logits):
        processed = self.processors(self.sequence, logits)
        tokens = (torch.softmax(processed, dim=-1) / self.noise[:, self.slot]).argmax(dim=-1)
        self.slot += 1
        self.sequence = torch.cat([self.sequence, tokens[:, None]], dim=-1)
        return processed, tokens


@pytest.mark.parametrize("head_type", ["vanilla", "gated"])
@pytest.mark.parametrize("stop", ["position", "survival"])
def test_reference_equals_hf_draft_block_greedy(head_type, stop):
    draft = _tiny_draft(head_type, confidence_stop=stop, confidence_threshold=0.45)
    hidden, anchors = torch.randn(4, 6, 32), torch.tensor([1, 17, 250, 3])
    with torch.no_grad():
        block = draft.draft_block(hidden, anchors, ProcessorTokenChooser(anchors[:, None], None, False))
        base = draft.block_logits(hidden)
    weights, confidence = _reference_weights(draft)
    reference = markov.sample_markov_block(
        base, anchors, weights, hidden, None, confidence=confidence, confidence_threshold=0.45, confidence_stop=stop
    )
    drafted = block.tokens.shape[1]  # HF stops computing once every row has stopped
    assert torch.equal(block.tokens, reference.tokens[:, :drafted])
    assert torch.equal(block.lengths, reference.lengths)
    torch.testing.assert_close(block.q_logits, reference.logits[:, :drafted], rtol=0, atol=1e-6)
    torch.testing.assert_close(block.confidence, reference.confidence[:, :drafted], rtol=0, atol=1e-6)


@pytest.mark.parametrize("head_type", ["vanilla", "gated"])
def test_reference_equals_hf_draft_block_sampled(head_type):
    draft = _tiny_draft(head_type, seed=1)
    hidden, anchors = torch.randn(3, 6, 32), torch.tensor([5, 9, 42])
    temperature = 0.7
    noise = torch.empty(3, 6, 301).exponential_(generator=torch.Generator().manual_seed(3))
    processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    with torch.no_grad():
        block = draft.draft_block(hidden, anchors, RaceChooser(anchors[:, None], processors, noise))
        base = draft.block_logits(hidden)
    weights, _ = _reference_weights(draft)
    reference = markov.sample_markov_block(base, anchors, weights, hidden, temperature, exponential_noise=noise)
    assert torch.equal(block.tokens, reference.tokens)
    torch.testing.assert_close(torch.softmax(block.q_logits, -1), reference.probs, rtol=0, atol=1e-6)


CASES = [
    dict(head_type="vanilla", top_n=0, truncate=False),
    dict(head_type="gated", top_n=0, truncate=False),
    dict(head_type="vanilla", top_n=16, truncate=False),
    dict(head_type="vanilla", top_n=16, truncate=True),
    dict(head_type="gated", top_n=7, truncate=True),
]


def _vllm_block(vllm_markov, draft, base, anchors, hidden, temperature, noise, case, threshold=0.0, stop="position"):
    state = draft.state_dict()
    gated = case["head_type"] == "gated"
    return vllm_markov.sample_block(
        base,
        anchors,
        state["markov_head.markov_w1.weight"],
        state["markov_head.markov_w2.weight"],
        hidden=hidden,
        gate_weight=state["markov_head.gate_proj.weight"] if gated else None,
        gate_bias=state["markov_head.gate_proj.bias"] if gated else None,
        temperature=temperature,
        top_n=case["top_n"],
        truncate=case["truncate"],
        exponential_noise=noise,
        confidence_weight=state["confidence_head.proj.weight"],
        confidence_bias=state["confidence_head.proj.bias"],
        confidence_with_markov=True,
        confidence_threshold=threshold,
        confidence_stop=stop,
    )


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c['head_type']}-top{c['top_n']}-{'trunc' if c['truncate'] else 'keep'}"
)
def test_vllm_copy_equals_reference_greedy(vllm_markov, case):
    draft = _tiny_draft(case["head_type"], seed=2)
    hidden, anchors = torch.randn(5, 6, 32), torch.tensor([0, 1, 2, 150, 299])
    with torch.no_grad():
        base = draft.block_logits(hidden)
        weights, confidence = _reference_weights(draft)
        reference = markov.sample_markov_block(
            base, anchors, weights, hidden, None, case["top_n"], case["truncate"], confidence=confidence,
            confidence_threshold=0.5, confidence_stop="survival",
        )  # fmt: skip
        ours = _vllm_block(vllm_markov, draft, base, anchors, hidden, None, None, case, 0.5, "survival")
    assert torch.equal(ours.tokens, reference.tokens)
    assert ours.probs is None  # greedy: no q is built, the rejection sampler's greedy path needs none
    assert torch.equal(ours.lengths, reference.lengths)
    torch.testing.assert_close(ours.confidence, reference.confidence, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c['head_type']}-top{c['top_n']}-{'trunc' if c['truncate'] else 'keep'}"
)
def test_vllm_copy_equals_reference_sampled_per_request_temperature(vllm_markov, case):
    draft = _tiny_draft(case["head_type"], seed=4)
    rows = 4
    hidden, anchors = torch.randn(rows, 6, 32), torch.tensor([7, 8, 9, 10])
    temperature = torch.tensor([0.6, 1.3, 0.0, 1.0])  # one greedy request among sampled ones
    noise = torch.empty(rows, 6, 301).exponential_(generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = draft.block_logits(hidden)
        weights, _ = _reference_weights(draft)
        reference = markov.sample_markov_block(
            base, anchors, weights, hidden, temperature, case["top_n"], case["truncate"], exponential_noise=noise
        )
        ours = _vllm_block(vllm_markov, draft, base, anchors, hidden, temperature, noise, case)
    assert torch.equal(ours.tokens, reference.tokens)
    torch.testing.assert_close(ours.probs, reference.probs, rtol=0, atol=1e-6)
    if case["truncate"]:  # q is zero outside the N candidates: the truncation is part of the reported q
        assert int((ours.probs[0, 0] > 0).sum()) == case["top_n"]
    greedy_row = reference.logits[2].argmax(-1)
    assert torch.equal(ours.tokens[2], greedy_row)


def test_top_n_biases_only_the_best_base_logits():
    base = torch.randn(2, 50)
    bias = torch.randn(2, 50)
    corrected = markov.corrected_logits(base, bias, top_n=5)
    best = base.topk(5, dim=-1).indices
    changed = corrected != base
    assert torch.equal(changed.sum(-1), torch.tensor([5, 5]))
    assert torch.equal(changed.gather(-1, best), torch.ones(2, 5, dtype=torch.bool))
    assert torch.equal(markov.corrected_logits(base, bias, top_n=50), base + bias)


def test_sampled_tokens_follow_q():
    """The exponential race draws from q: frequencies over many draws match q (sanity of the shared sampler)."""
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 6)
    weights = markov.MarkovWeights(torch.zeros(6, 2), torch.zeros(6, 2))
    draws = 20000
    block = markov.sample_markov_block(
        logits.expand(draws, 1, 6), torch.zeros(draws, dtype=torch.long), weights, temperature=1.0
    )
    frequency = torch.bincount(block.tokens[:, 0], minlength=6).float() / draws
    torch.testing.assert_close(frequency, block.probs[0, 0], rtol=0, atol=0.015)


# ----------------------------------------------------------------------------------------------------------------
# The temperature expansion for batches of two or more requests (llm_base_proposer.py)
# ----------------------------------------------------------------------------------------------------------------


def _sampler_namespace(originals) -> dict:
    namespace = {"torch": torch, "_SAMPLING_EPS": 1e-5}
    lift(originals[SAMPLER_OPS], ["empty_exponential_noise_like", "sample_with_exponential_noise"], namespace)
    namespace.update({"SamplingMetadata": object, "Tensor": torch.Tensor})
    return namespace


def _metadata(temperature: torch.Tensor) -> types.SimpleNamespace:
    greedy = temperature < 1e-5
    return types.SimpleNamespace(
        temperature=temperature, all_greedy=bool(greedy.all()), all_random=bool((~greedy).all())
    )


def test_temperature_expansion_fixes_two_or_more_requests(originals, patched):
    stock = lift(originals[PROPOSER], ["compute_probs_and_sample_next_token"], _sampler_namespace(originals))
    ours = lift(
        patched[PROPOSER], ["expand_per_request", "compute_probs_and_sample_next_token"], _sampler_namespace(originals)
    )
    requests, slots, vocab = 3, 4, 40
    temperature = torch.tensor([0.5, 0.0, 2.0])
    logits = torch.randn(requests * slots, vocab)
    with pytest.raises(RuntimeError):  # the upstream bug: [B*K, V] divided by [B, 1]
        stock["compute_probs_and_sample_next_token"](logits.clone(), _metadata(temperature))
    tokens, probs = ours["compute_probs_and_sample_next_token"](logits.clone(), _metadata(temperature))
    per_row = temperature.repeat_interleave(slots)
    expected = torch.softmax(logits / torch.where(per_row < 1e-5, 1.0, per_row)[:, None], dim=-1)
    torch.testing.assert_close(probs, expected)
    greedy_rows = slice(slots, 2 * slots)  # request 1 is greedy: its rows take the argmax
    assert torch.equal(tokens[greedy_rows], logits[greedy_rows].argmax(-1))
    assert torch.equal(ours["expand_per_request"](temperature, 12), per_row)
    with pytest.raises(ValueError, match="cannot be split"):
        ours["expand_per_request"](temperature, 10)


def test_temperature_expansion_is_byte_identical_for_one_request(originals, patched):
    stock = lift(originals[PROPOSER], ["compute_probs_and_sample_next_token"], _sampler_namespace(originals))
    ours = lift(
        patched[PROPOSER], ["expand_per_request", "compute_probs_and_sample_next_token"], _sampler_namespace(originals)
    )
    logits = torch.randn(5, 30)
    # DFlash with one request (5 rows, one temperature), and EAGLE-style one row per request.
    for temperature in (torch.tensor([0.8]), torch.tensor([0.8, 1.1, 0.0, 0.3, 2.0])):
        torch.manual_seed(11)
        stock_tokens, stock_probs = stock["compute_probs_and_sample_next_token"](logits.clone(), _metadata(temperature))
        torch.manual_seed(11)
        our_tokens, our_probs = ours["compute_probs_and_sample_next_token"](logits.clone(), _metadata(temperature))
        assert torch.equal(stock_tokens, our_tokens) and torch.equal(stock_probs, our_probs)


# ----------------------------------------------------------------------------------------------------------------
# Export for vLLM, and loading it the way the patched qwen3_dflash.py does
# ----------------------------------------------------------------------------------------------------------------


def _vllm_parameter_names(num_layers: int, dflash_config: dict, has_gate: bool) -> dict[str, bool]:
    """DFlashQwen3ForCausalLM's parameters (name -> required), as its __init__ builds them in 0.23 + the patch."""
    names = {"model.fc.weight": True, "model.hidden_norm.weight": True, "model.norm.weight": True}
    names |= {"model.embed_tokens.weight": False, "lm_head.weight": False}  # shared from the target when absent
    for i in range(num_layers):
        prefix = f"model.layers.{i}."
        for part in ("self_attn.qkv_proj", "self_attn.o_proj", "self_attn.q_norm", "self_attn.k_norm"):
            names[prefix + part + ".weight"] = True
        for part in ("mlp.gate_up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"):
            names[prefix + part + ".weight"] = True
    if dflash_config.get("markov_rank", 0) > 0:
        names |= {"markov_head.markov_w1.weight": True, "markov_head.markov_w2.weight": True}
        if has_gate:
            names |= {"markov_head.gate_proj.weight": True, "markov_head.gate_proj.bias": True}
    if dflash_config.get("enable_confidence_head"):
        names |= {"confidence_head.proj.weight": True, "confidence_head.proj.bias": True}
    return names


def _vllm_loaded_name(name: str, stacked: list, head_prefixes: tuple) -> str:
    """Where the patched DFlashQwen3ForCausalLM.load_weights puts a checkpoint tensor (its rules, read from source)."""
    if name.startswith(head_prefixes):  # the dspark patch routes the heads before anything else
        return name
    if "lm_head" in name:
        return name
    name = "model." + name
    for param_name, weight_name, _ in stacked:  # DFlashQwen3Model.load_weights
        if weight_name in name:
            return name.replace(weight_name, param_name)
    return name


@pytest.fixture(scope="session")
def load_rules(patched):
    tree = ast.parse(patched[QWEN3_DFLASH])
    stacked = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "stacked_params_mapping":
            stacked = ast.literal_eval(node.value)
    markov_source = ast.parse(patched[MARKOV])
    prefixes = next(
        ast.literal_eval(node.value)
        for node in markov_source.body
        if isinstance(node, ast.Assign) and node.targets[0].id == "DSPARK_HEAD_PREFIXES"
    )
    source = patched[QWEN3_DFLASH]
    assert '"model." + name' in source and 'elif "lm_head" not in name' in source  # the prefix rule read above
    return stacked, prefixes


@pytest.mark.parametrize("head_type", ["vanilla", "gated"])
def test_export_names_and_config_load_into_patched_qwen3_dflash(tmp_path, load_rules, head_type):
    stacked, prefixes = load_rules
    draft = _tiny_draft(head_type, target_layer_ids=[2, 0])
    result = export_for_vllm(draft, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tensors = load_file(tmp_path / "out" / "model.safetensors")

    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    dflash = config["dflash_config"]
    assert dflash["target_layer_ids"] == [0, 2]  # increasing depth, as vLLM concatenates them
    assert dflash["mask_token_id"] == 300 and dflash["sample_from_anchor"] is True
    assert dflash["markov_rank"] == 8 and dflash["markov_head_type"] == head_type
    assert dflash["enable_confidence_head"] is True and config["block_size"] == 6
    assert result.num_speculative_tokens == 6  # anchor-first: every slot drafts

    expected = _vllm_parameter_names(config["num_hidden_layers"], dflash, head_type == "gated")
    loaded = {}
    for name, tensor in tensors.items():
        target = _vllm_loaded_name(name, stacked, prefixes)
        assert target in expected, f"{name} -> {target} is no parameter of the patched DFlashQwen3ForCausalLM"
        loaded.setdefault(target, []).append(tensor)
    missing = [name for name, required in expected.items() if required and name not in loaded]
    assert missing == []
    # vLLM sizes fc from target_hidden_size x len(dflash_config.target_layer_ids)
    assert tuple(tensors["fc.weight"].shape) == (32, config["target_hidden_size"] * len(dflash["target_layer_ids"]))
    # vLLM reads aux hidden states at dflash id + 1: index 0 is the embedding output, like HF hidden_states[0]
    assert [i + 1 for i in dflash["target_layer_ids"]] == [1, 3]


def test_exported_heads_load_into_the_patched_modules_and_draft_like_hf(tmp_path, patched, vllm_markov):
    """End to end on CPU: export -> the patch's own head classes and loader -> its sampler == HF draft_block."""
    draft = _tiny_draft("gated", seed=7, confidence_threshold=0.5)
    export_for_vllm(draft, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    namespace = {"torch": torch, "nn": torch.nn, "DSPARK_HEAD_PREFIXES": vllm_markov.DSPARK_HEAD_PREFIXES}
    lift(
        patched[QWEN3_DFLASH],
        ["DSparkMarkovHead", "DSparkConfidenceHead", "build_dspark_heads", "DFlashQwen3ForCausalLM._load_dspark_heads"],
        namespace,
    )
    hf_config = types.SimpleNamespace(**config)
    model = types.SimpleNamespace()
    model.markov_head, model.confidence_head = namespace["build_dspark_heads"](hf_config, False)
    heads = {name: tensor for name, tensor in tensors.items() if name.startswith(vllm_markov.DSPARK_HEAD_PREFIXES)}
    namespace["_load_dspark_heads"](model, heads)
    with pytest.raises(ValueError, match="missing"):
        namespace["_load_dspark_heads"](model, {k: v for k, v in heads.items() if "proj.bias" not in k})

    sampler = vllm_markov.DSparkBlockSampler.for_model(model, config["dflash_config"])
    assert sampler is not None and sampler.stops_early
    hidden, anchors = torch.randn(3, 6, 32), torch.tensor([4, 40, 140])
    with torch.no_grad():
        base = draft.block_logits(hidden)
        ours = sampler.sample(base, anchors, hidden, None)
        hf = draft.draft_block(hidden, anchors, ProcessorTokenChooser(anchors[:, None], None, False))
    assert torch.equal(ours.tokens[:, : hf.tokens.shape[1]], hf.tokens)
    assert torch.equal(ours.lengths, hf.lengths)

    # A stock DFlash config builds no heads, and the proposer then keeps its stock sampling path.
    stock = types.SimpleNamespace(vocab_size=301, hidden_size=32, dflash_config={"mask_token_id": 3})
    assert namespace["build_dspark_heads"](stock, False) == (None, None)
    assert vllm_markov.DSparkBlockSampler.for_model(types.SimpleNamespace(), stock.dflash_config) is None
    with pytest.raises(ValueError, match="reduced"):
        namespace["build_dspark_heads"](hf_config, True)


def test_settings_come_from_the_config_and_environment_overrides_them(vllm_markov):
    read = vllm_markov.DSparkSettings.read
    assert read({"markov_top_n": 64, "confidence_threshold": 0.3}, {}) == vllm_markov.DSparkSettings(64, False, 0.3)
    overridden = read({"markov_top_n": 64}, {"DSPARK_MARKOV_TOP_N": "8", "DSPARK_MARKOV_TOP_N_TRUNCATE": "1"})
    assert (overridden.top_n, overridden.truncate) == (8, True)
    with pytest.raises(ValueError, match="confidence_stop"):
        read({"confidence_stop": "sometimes"}, {})


def test_fc_reordering_for_unsorted_and_repeated_layer_ids():
    ids, width = [3, 1, 3], 4
    weight = torch.randn(5, len(ids) * width)
    features = {layer: torch.randn(2, width) for layer in set(ids)}
    ours = torch.cat([features[i] for i in ids], -1) @ weight.T
    distinct, _ = ordered_layer_ids(ids)
    theirs = torch.cat([features[i] for i in distinct], -1) @ reorder_fc(weight, ids, width).T
    assert distinct == [1, 3]
    torch.testing.assert_close(ours, theirs)


def test_stock_dflash_draft_exports_without_dspark_keys(tmp_path):
    draft = _tiny_draft(markov_rank=0, enable_confidence_head=False, sample_from_anchor=False)
    result = export_for_vllm(draft, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert set(config["dflash_config"]) == {"mask_token_id", "target_layer_ids"}
    assert result.num_speculative_tokens == 5  # DFlash: slots 1.. draft
    assert not any(
        name.startswith(("markov_head", "confidence_head"))
        for name in load_file(tmp_path / "out" / "model.safetensors")
    )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (dict(layer_types=["sliding_attention"], sliding_window=16), "sliding-window"),
        (dict(target_layer_ids=[0, 3]), "last layer"),
        (dict(hidden_act="gelu"), "silu"),
    ],
)
def test_export_refuses_what_vllm_0_23_would_serve_differently(tmp_path, overrides, reason):
    with pytest.raises(ValueError, match=reason):
        export_for_vllm(_tiny_draft(**overrides), tmp_path / "out")


def test_export_command_prints_the_serve_command(tmp_path, capsys):
    draft = _tiny_draft()
    draft.save_pretrained(tmp_path / "draft")
    code, out = _cli(capsys, "export", tmp_path / "draft", tmp_path / "out", "--target", "HuggingFaceTB/SmolLM2-135M")
    assert code == 0, out
    assert '"method": "dflash"' in out and '"num_speculative_tokens": 6' in out and "FLASH_ATTN" in out
    code, out = _cli(capsys, "export", tmp_path / "draft", tmp_path / "out")
    assert code == 2 and "not empty" in out


def test_dspark_export_vllm_writes_what_dspark_vllm_export_writes(tmp_path, capsys):
    draft = _tiny_draft()
    draft.save_pretrained(tmp_path / "draft")
    assert main(["vllm", "export", str(tmp_path / "draft"), str(tmp_path / "a")]) == 0
    assert main(["export", str(tmp_path / "draft"), str(tmp_path / "b"), "--vllm"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_dspark_export_without_a_format_names_the_choices(tmp_path, capsys):
    code = main(["export", str(tmp_path / "draft"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--vllm" in err and "dspark convert" in err
