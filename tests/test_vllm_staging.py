"""What the GPU staging of vLLM carries: the static reading of the real vLLM 0.23.0 wheel (scripts/device).

`vllm serve` on the GPU machine failed three times on packages this reading had missed (2026-12-02): llguidance
(read through vLLM's LazyLoader in a class annotation), compressed-tensors and humming-kernels (imported by
`get_quantization_config` for any quantised checkpoint, humming behind `if current_platform.is_cuda()`). These
tests hold the reading to what the GPU showed, so the next staging carries them in one go.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from test_vllm_patches import vllm_wheel  # noqa: F401  (a fixture used by name)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "device"))

from vllm_imports import names_read_on_import, serve_imports  # noqa: E402


@pytest.fixture(scope="module")
def report(vllm_wheel):  # noqa: F811
    return serve_imports(vllm_wheel)


def test_a_lazy_loader_read_in_a_class_annotation_is_a_start_up_import(report):
    assert "llguidance" in report.required
    assert report.required["llguidance"][-1] == "LazyLoader llguidance"
    assert "xgrammar" in report.required


def test_a_quantised_checkpoint_imports_every_quantisation_methods_packages(report):
    for package in ("compressed_tensors", "humming"):
        assert report.required[package][0] == "vllm.model_executor.layers.quantization.get_quantization_config()"


def test_packages_behind_availability_checks_stay_lazy(report):
    # FlashInfer is not carried: the smoke turns its sampler off, and FLASH_ATTN never imports it.
    assert "flashinfer" not in report.required
    assert "flashinfer" in report.lazy
    # ROCm's kernels sit behind `if current_platform.is_rocm()`; only CUDA branches count as start-up.
    assert "aiter" not in report.required


def _read(source: str) -> set[str]:
    return names_read_on_import(ast.parse(source))


def test_class_bodies_decorators_and_defaults_run_on_import():
    source = """
@decorate
class Grammar(Base):
    matcher: lib.Matcher
    size: int = default_size

def use(x=fallback) -> result_type:
    return inside_the_body
"""
    read = _read(source)
    assert {"decorate", "Base", "lib", "default_size", "fallback", "result_type"} <= read
    assert "inside_the_body" not in read


def test_postponed_annotations_are_not_read_on_import():
    source = """
from __future__ import annotations

class Grammar:
    matcher: lib.Matcher
    size: int = default_size

def use(x: arg_type) -> result_type:
    pass
"""
    read = _read(source)
    assert "default_size" in read
    assert not {"lib", "arg_type", "result_type"} & read


def test_type_checking_blocks_and_lambdas_are_not_read_on_import():
    source = """
if TYPE_CHECKING:
    only_for_checkers.Thing
else:
    at_runtime
handler = lambda: later
"""
    read = _read(source)
    assert "at_runtime" in read
    assert not {"only_for_checkers", "later"} & read
