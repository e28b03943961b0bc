"""Which third-party packages does `vllm serve` import? A static reading of the vLLM wheel's sources.

Starting from the modules a `vllm serve` of a Llama target with a DFlash draft on FLASH_ATTN loads (CLI, API
server, engine core, GPU worker and model runner, Llama, qwen3_dflash, the flash-attention backend, the DFlash
proposer, the rejection sampler, the default loader), follow every vLLM-internal import that runs when a module is
imported (module level, outside `if TYPE_CHECKING`, outside `try/except ImportError`, outside `if` branches), and
collect the third-party packages those modules import:

* required: imported at module level somewhere in that closure; `vllm serve` cannot start without them;
* lazy: imported when a function of that closure runs, directly or through the vLLM modules it imports (a
  superset: not every such function runs for this job);
* guarded: imported only under `try/except` or an `if` (availability checks such as `has_deep_ep()`).

Two ways a package loads on start-up without a module-level `import` statement are read too:

* vLLM's `LazyLoader("x", globals(), "pkg")` defers an import until an attribute of `x` is read; a read in code that
  runs on import (a class body's annotations, a base class, a decorator, a default) imports `pkg` at start-up (seen
  on the GPU: `llguidance.LLMatcher` in a dataclass annotation of the structured-output backend);
* functions that run on start-up and import many vLLM modules at once (STARTUP_FUNCTIONS): for a quantised
  checkpoint `get_quantization_config` imports every quantisation method, and with them compressed-tensors and
  humming-kernels, whichever method the checkpoint uses (seen on the GPU with the NVFP4 target).

Imports behind `if current_platform.is_cuda()` count as module-level (the GPU machine is CUDA); those behind any other
`if current_platform.is_xxx()` are followed no further, so packages of other platforms (XPU, ROCm, TPU) do not show
up. The reading cannot see imports done through `importlib` strings.
"""

from __future__ import annotations

import ast
import sys
import zipfile
from dataclasses import dataclass, field

# The modules `vllm serve TARGET --speculative-config '{"method": "dflash", ...}'` imports for a Llama target.
SERVE_ROOTS = (
    "vllm.entrypoints.cli.main",
    "vllm.entrypoints.cli.serve",
    "vllm.entrypoints.openai.api_server",
    "vllm.v1.engine.async_llm",
    "vllm.v1.engine.core",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.model_executor.models.llama",
    "vllm.model_executor.models.qwen3_dflash",
    "vllm.model_executor.model_loader.default_loader",
    "vllm.v1.attention.backends.flash_attn",
    "vllm.v1.spec_decode.dflash",
    "vllm.v1.sample.rejection_sampler",
    "vllm.v1.structured_output",
)
# Functions that run while `vllm serve` starts and whose function-level imports therefore count as start-up imports.
# get_quantization_config runs for every quantised checkpoint (the NVFP4 target) and imports all methods.
STARTUP_FUNCTIONS = (("vllm.model_executor.layers.quantization", "get_quantization_config"),)
# `if` tests that hold on the GPU machine (vLLM's CUDA platform): their bodies run on import.
ON_CUDA = ("current_platform.is_cuda()", "current_platform.is_cuda_alike()")
_OPTIONAL_ERRORS = ("ImportError", "ModuleNotFoundError", "Exception", "OSError")


@dataclass
class ImportReport:
    """Top-level import names -> the chain of vLLM modules that leads to them (for the report)."""

    modules: int = 0
    required: dict[str, tuple[str, ...]] = field(default_factory=dict)
    lazy: dict[str, str] = field(default_factory=dict)
    guarded: set[str] = field(default_factory=set)


class VllmSources:
    """The vLLM package's Python sources inside a wheel, by dotted module name."""

    def __init__(self, wheel: zipfile.ZipFile):
        self.wheel = wheel
        self.files: dict[str, str] = {}
        for name in wheel.namelist():
            if name.startswith("vllm/") and name.endswith(".py"):
                module = name[:-3].replace("/", ".").removesuffix(".__init__")
                self.files[module] = name
        self._trees: dict[str, ast.Module] = {}

    def tree(self, module: str) -> ast.Module:
        if module not in self._trees:
            self._trees[module] = ast.parse(self.wheel.read(self.files[module]))
        return self._trees[module]

    def absolute(self, module: str, level: int, name: str | None) -> str:
        if level == 0:
            return name or ""
        parts = module.split(".")
        if not self.files[module].endswith("__init__.py"):
            parts = parts[:-1]
        parts = parts[: len(parts) - (level - 1)]
        return ".".join(parts + ([name] if name else []))

    def module_level_imports(self, module: str) -> list[tuple[str, str]]:
        """(imported dotted name, how: 'hard' | 'branch' | 'guarded') for the imports that run on import."""
        found: list[tuple[str, str]] = []

        def visit(body: list[ast.stmt], how: str) -> None:
            for node in body:
                if isinstance(node, ast.If):
                    if "TYPE_CHECKING" in ast.unparse(node.test):
                        visit(node.orelse, how)
                        continue
                    branch = "branch" if how == "hard" else how
                    # The GPU machine is a CUDA platform: what vLLM imports for CUDA alone loads there.
                    visit(node.body, how if ast.unparse(node.test) in ON_CUDA else branch)
                    visit(node.orelse, branch)
                elif isinstance(node, ast.Try):
                    catches = any(
                        handler.type is None or any(error in ast.unparse(handler.type) for error in _OPTIONAL_ERRORS)
                        for handler in node.handlers
                    )
                    visit(node.body, "guarded" if catches else how)
                    for handler in node.handlers:
                        visit(handler.body, "guarded")
                    visit(node.orelse, how)
                    visit(node.finalbody, how)
                elif isinstance(node, ast.With):
                    visit(node.body, how)
                elif isinstance(node, ast.Import):
                    found.extend((alias.name, how) for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    base = self.absolute(module, node.level, node.module)
                    found.append((base, how))
                    found.extend((f"{base}.{alias.name}", how) for alias in node.names)

        visit(self.tree(module).body, "hard")
        return found

    def function_level_imports(self, module: str, function_name: str | None = None) -> set[str]:
        """Dotted names imported inside the module's functions (only `function_name`'s, when given)."""
        names = set()
        for function in ast.walk(self.tree(module)):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if function_name is not None and function.name != function_name:
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    base = self.absolute(module, node.level, node.module)
                    names.add(base)
                    if node.level or function_name is not None:  # `from . import x` may name submodules
                        names.update(f"{base}.{alias.name}" for alias in node.names)
        return names

    def lazy_loaders(self, module: str) -> dict[str, tuple[str, bool]]:
        """Module-level `x = LazyLoader("x", globals(), "pkg")` -> {x: (pkg, whether x is read on import)}."""
        tree = self.tree(module)
        bindings: dict[str, str] = {}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and ast.unparse(node.value.func).endswith("LazyLoader")
                and len(node.value.args) == 3
                and isinstance(node.value.args[2], ast.Constant)
                and isinstance(node.value.args[2].value, str)
            ):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        bindings[target.id] = node.value.args[2].value
        if not bindings:
            return {}
        read = names_read_on_import(tree)
        return {name: (package, name in read) for name, package in bindings.items()}


def names_read_on_import(tree: ast.Module) -> set[str]:
    """Names loaded by the code that runs when the module is imported (function bodies excluded).

    Class bodies run on import, and so do decorators, default values and (without `from __future__ import
    annotations`) annotations of classes and functions.
    """
    postponed = any(
        isinstance(node, ast.ImportFrom)
        and node.module == "__future__"
        and any(a.name == "annotations" for a in node.names)
        for node in tree.body
    )
    read: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for child in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
                if child is not None:
                    visit(child)
            if not postponed:
                arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
                arguments += [a for a in (node.args.vararg, node.args.kwarg) if a is not None]
                for annotation in [a.annotation for a in arguments] + [node.returns]:
                    if annotation is not None:
                        visit(annotation)
            return
        if isinstance(node, ast.Lambda):
            return
        if isinstance(node, ast.AnnAssign) and postponed:
            for child in (node.target, node.value):
                if child is not None:
                    visit(child)
            return
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            read.add(node.id)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for statement in tree.body:
        visit(statement)
    return read


def serve_imports(
    wheel: zipfile.ZipFile,
    roots: tuple[str, ...] = SERVE_ROOTS,
    startup_functions: tuple[tuple[str, str], ...] = STARTUP_FUNCTIONS,
) -> ImportReport:
    sources = VllmSources(wheel)
    report = ImportReport()

    def closure(starts: list[tuple[str, tuple[str, ...]]], seen: dict[str, tuple[str, ...]], required: bool) -> None:
        """Follow module-level vLLM imports from `starts`; record third-party ones as required or lazy."""
        stack = list(starts)
        while stack:
            name, chain = stack.pop()
            parts = name.split(".")
            for depth in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
                module = ".".join(parts[:depth])
                if module not in sources.files or module in seen:
                    continue
                seen[module] = chain
                for name_bound, (package, read_on_import) in sources.lazy_loaders(module).items():
                    top = package.split(".")[0]
                    if top == "vllm" or top in sys.stdlib_module_names:
                        continue
                    if required and read_on_import:
                        report.required.setdefault(top, (*chain, module, f"LazyLoader {name_bound}"))
                    elif top not in report.required:
                        report.lazy.setdefault(top, module)
                for imported, how in sources.module_level_imports(module):
                    top = imported.split(".")[0]
                    if top == "vllm":
                        if how == "hard":
                            stack.append((imported, (*chain, imported)))
                    elif top in sys.stdlib_module_names:
                        continue
                    elif how != "hard":
                        report.guarded.add(top)
                    elif required:
                        report.required.setdefault(top, (*chain, module))
                    elif top not in report.required:
                        report.lazy.setdefault(top, module)

    at_start: dict[str, tuple[str, ...]] = {}
    starts = [(root, (root,)) for root in roots]
    for module, function in startup_functions:
        chain = (f"{module}.{function}()",)
        for imported in sorted(sources.function_level_imports(module, function)):
            top = imported.split(".")[0]
            if top == "vllm":
                starts.append((imported, (*chain, imported)))
            elif top not in sys.stdlib_module_names:
                report.required.setdefault(top, chain)
    closure(starts, at_start, required=True)
    # Functions of those modules import more (vLLM modules, third-party packages) when they run: a superset of
    # what serving touches, since not every function runs.
    reached = dict(at_start)
    frontier = list(at_start)
    while frontier:
        found: list[tuple[str, tuple[str, ...]]] = []
        for module in frontier:
            for imported in sources.function_level_imports(module):
                top = imported.split(".")[0]
                if top == "vllm":
                    found.append((imported, (module, imported)))
                elif top not in sys.stdlib_module_names and top not in report.required:
                    report.lazy.setdefault(top, module)
        before = set(reached)
        closure(found, reached, required=False)
        frontier = [module for module in reached if module not in before]
    report.modules = len(at_start)
    report.guarded -= set(report.required) | set(report.lazy)
    return report


__all__ = ["SERVE_ROOTS", "STARTUP_FUNCTIONS", "ImportReport", "VllmSources", "names_read_on_import", "serve_imports"]
