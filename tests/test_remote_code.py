"""A saved draft loads through AutoModel with trust_remote_code in a process where `dspark` cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from tiny_models import tiny_draft, tiny_qwen3
from transformers import AutoModel
from without_dspark import BLOCK_DSPARK

LOADER = BLOCK_DSPARK + textwrap.dedent(
    """
    import importlib.util, json, sys
    from pathlib import Path

    try:
        importlib.util.find_spec("dspark")
        raise SystemExit("dspark is importable; the test would prove nothing")
    except ImportError:
        pass

    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    work = Path(sys.argv[1])
    target = AutoModelForCausalLM.from_pretrained(work / "target").eval()
    draft = AutoModel.from_pretrained(work / "draft", trust_remote_code=True).eval()
    assert type(draft).__module__.startswith("transformers_modules."), type(draft).__module__
    assert not any(name.startswith("dspark") for name in sys.modules), "dspark leaked into the process"
    inputs = torch.load(work / "inputs.pt")
    draft.bind_target(target)
    with torch.no_grad():
        out = draft(inputs["block"], inputs["context"], position_ids=inputs["positions"])
        generated = target.generate(inputs["prompt"], max_new_tokens=24, do_sample=False, assistant_model=draft)
    torch.save({"hidden": out.draft_hidden_states, "generated": generated}, work / "result.pt")
    print(json.dumps({"class": type(draft).__name__, "module": type(draft).__module__}))
    """
)


def test_saved_draft_loads_as_remote_code_without_the_package(tmp_path):
    target = tiny_qwen3(seed=3)
    draft = tiny_draft(target, markov_rank=8, enable_confidence_head=True, block_size=5)
    draft.save_pretrained(tmp_path / "draft")
    target.save_pretrained(tmp_path / "target")

    saved = json.loads((tmp_path / "draft" / "config.json").read_text())
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_dspark.DSparkConfig",
        "AutoModel": "modeling_dspark.DSparkDraftModel",
    }
    assert {"modeling_dspark.py", "configuration_dspark.py"} <= set(os.listdir(tmp_path / "draft"))
    generation = json.loads((tmp_path / "draft" / "generation_config.json").read_text())
    assert generation["num_assistant_tokens"] == draft.config.num_draft_tokens
    assert generation["num_assistant_tokens_schedule"] == "constant"
    assert generation["assistant_confidence_threshold"] == 0.0

    torch.manual_seed(0)
    prompt = torch.randint(0, target.config.vocab_size, (1, 9))
    features = len(draft.config.target_layer_ids) * target.config.hidden_size
    inputs = {
        "block": torch.randn(1, 5, target.config.hidden_size),
        "context": torch.randn(1, 6, features),
        "positions": torch.arange(11)[None],
        "prompt": prompt,
    }
    torch.save(inputs, tmp_path / "inputs.pt")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    completed = subprocess.run(
        [sys.executable, "-c", LOADER, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(completed.stdout.strip().splitlines()[-1])["class"] == "DSparkDraftModel"

    result = torch.load(tmp_path / "result.pt")
    with torch.no_grad():
        expected_hidden = draft(inputs["block"], inputs["context"], position_ids=inputs["positions"])
        plain = target.generate(prompt, max_new_tokens=24, do_sample=False)
    torch.testing.assert_close(result["hidden"], expected_hidden.draft_hidden_states, rtol=0, atol=0)
    assert torch.equal(result["generated"], plain)


def test_package_registration_loads_without_trust_remote_code(tmp_path):
    target = tiny_qwen3(seed=4)
    draft = tiny_draft(target, markov_rank=4)
    draft.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert type(reloaded) is type(draft)
    for (name, saved), (_, loaded) in zip(draft.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(saved, loaded), name
