"""Bad input gets a clear error that names the problem and the fix."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_draft, tiny_llama, tiny_qwen3, tiny_qwen35
from transformers import AutoModel, GenerationConfig, LlamaConfig, LlamaForCausalLM

from dspark import DSparkConfig, DSparkDraftModel


def test_vocab_mismatch_is_refused_when_binding():
    draft = tiny_draft(tiny_llama(vocab_size=128))
    with pytest.raises(ValueError, match=r"vocabulary mismatch.*vocab_size=128.*vocab_size=160.*from_target"):
        draft.bind_target(tiny_qwen3(vocab_size=160))


def test_hidden_size_mismatch_is_refused_when_binding():
    draft = tiny_draft(tiny_llama())
    narrow = LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
    )
    with pytest.raises(ValueError, match=r"hidden size mismatch.*64.*32"):
        draft.bind_target(narrow)


def test_layer_ids_out_of_range_for_the_target_are_refused():
    draft = tiny_draft(tiny_llama(num_layers=8), target_layer_ids=[1, 6])
    with pytest.raises(ValueError, match=r"target_layer_ids \[6\] are out of range.*4 layers.*-1 \.\. 3"):
        draft.bind_target(tiny_llama(num_layers=4))


def test_layer_ids_out_of_range_in_the_config_are_refused():
    with pytest.raises(ValueError, match=r"target_layer_ids contains 9 but the target has 4 layers"):
        DSparkConfig(
            vocab_size=100,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            target_layer_ids=[1, 9],
            num_target_layers=4,
        )


def test_mask_token_outside_the_vocab_is_refused():
    with pytest.raises(ValueError, match=r"mask_token_id=100 is outside the target vocabulary \[0, 100\)"):
        DSparkConfig(vocab_size=100, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, mask_token_id=100)


def test_mask_token_outside_the_target_embedding_is_refused():
    target = tiny_llama()
    draft = tiny_draft(target)
    draft.config.mask_token_id = 10_000
    draft.config.vocab_size = 10_001
    target.config.vocab_size = 10_001  # a config that lies about its embedding table
    with pytest.raises(ValueError, match=r"mask_token_id=10000 is outside the target's embedding table \(128 rows\)"):
        draft.bind_target(target)


def test_stateful_hybrid_target_points_to_the_package_loop():
    hybrid = tiny_qwen35()
    draft = DSparkDraftModel(
        DSparkConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            target_layer_ids=[1, 2],
            block_size=4,
        )
    )
    with pytest.raises(ValueError, match=r"recurrent .*state.*dspark\.speculative_generate"):
        draft.bind_target(hybrid)


def test_batch_above_one_is_refused_on_the_assisted_path():
    target = tiny_llama()
    draft = tiny_draft(target)
    prompts = torch.randint(0, 128, (2, 6))
    with pytest.raises(ValueError, match=r"batch_size = 1"):
        target.generate(prompts, max_new_tokens=4, do_sample=False, assistant_model=draft)
    assistant_config = GenerationConfig(do_sample=False)
    assistant_config.is_assistant = True
    with pytest.raises(ValueError, match=r"batch size 1, got 2.*dspark\.speculative_generate"):
        draft.generate(prompts, generation_config=assistant_config)


def test_unbound_draft_asks_to_be_bound():
    target = tiny_llama()
    draft = tiny_draft(target)
    draft.unbind_target()
    with pytest.raises(ValueError, match=r"draft\.bind_target\(target\).*speculation_type='dflash'"):
        target.generate(torch.randint(0, 128, (1, 6)), max_new_tokens=4, do_sample=False, assistant_model=draft)


def test_draft_does_not_generate_on_its_own():
    draft = tiny_draft(tiny_llama())
    with pytest.raises(ValueError, match=r"does not generate on its own.*assistant_model=draft"):
        draft.generate(torch.randint(0, 128, (1, 6)), max_new_tokens=4)


def test_context_features_of_the_wrong_width_are_refused():
    draft = tiny_draft(tiny_llama())
    width = draft.fc.in_features
    with pytest.raises(ValueError, match=rf"target features have width {width + 64}.*expects .* = {width}"):
        draft(torch.randn(1, 4, 64), torch.randn(1, 3, width + 64))


@pytest.fixture(scope="module")
def saved_draft(tmp_path_factory):
    folder = tmp_path_factory.mktemp("draft") / "good"
    tiny_draft(tiny_llama(), markov_rank=4).save_pretrained(folder)
    return folder


def _variant(saved_draft, tmp_path, edit):
    folder = tmp_path / "variant"
    shutil.copytree(saved_draft, folder)
    edit(folder / "model.safetensors")
    return folder


def test_truncated_weights_are_reported_as_corrupt(saved_draft, tmp_path):
    def truncate(path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ValueError, match=r"corrupt or truncated.*Re-download or re-convert"):
        AutoModel.from_pretrained(_variant(saved_draft, tmp_path, truncate), trust_remote_code=True)


def test_missing_weights_file_is_reported(saved_draft, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot load draft weights.*dspark convert"):
        AutoModel.from_pretrained(_variant(saved_draft, tmp_path, os.remove), trust_remote_code=True)


def test_missing_and_stray_tensors_are_refused(saved_draft, tmp_path):
    def drop_fc(path):
        tensors = load_file(path)
        tensors.pop("fc.weight")
        tensors["stray.weight"] = torch.zeros(2)
        save_file(tensors, path, metadata={"format": "pt"})

    with pytest.raises(ValueError, match=r"missing keys: \['fc.weight'\]; unexpected keys: \['stray.weight'\]"):
        AutoModel.from_pretrained(_variant(saved_draft, tmp_path, drop_fc), trust_remote_code=True)


def test_tensor_shapes_that_disagree_with_the_config_are_refused(saved_draft, tmp_path):
    def reshape_fc(path):
        tensors = load_file(path)
        tensors["fc.weight"] = torch.zeros(3, 3)
        save_file(tensors, path, metadata={"format": "pt"})

    with pytest.raises(ValueError, match=r"do not match its config.json"):
        AutoModel.from_pretrained(_variant(saved_draft, tmp_path, reshape_fc), trust_remote_code=True)


def test_generate_compile_without_the_static_path_is_refused_before_loading(capsys):
    from dspark.cli import main

    assert main(["generate", "hello", "--method", "loop", "--compile", "--target", "/nonexistent/target"]) == 2
    assert "--compile needs --method loop_static" in capsys.readouterr().err
