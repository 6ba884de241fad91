"""Semantic fingerprints: what a training stage depends on instead of whole source folders.

A training stage must rerun when what it computes changes, not when a docstring does. The pipeline's
``fingerprint`` stage (``always_changed``, seconds) writes small JSON files that the training stages
list as dependencies:

- ``code.json``: a hash of the syntax tree of the code a training run executes (``CODE_PATHS``),
  docstrings dropped (comments and formatting never reach the tree). Top-level definitions are hashed
  as a sorted pool, and imports between the suite's own packages without their module path, so moving
  a helper from one file to another changes nothing.
- ``measure.json``: the same syntax-tree hash of what the ``measure_*`` stages run (models and FLOP
  ledger) and the library versions.
- ``<kind>/<run>.json``: a functional fingerprint of the model a run trains: parameter and buffer
  names and shapes and module types, plus the outputs of the seeded model on a fixed seeded input, as
  initialised and then with seeded noise on every parameter (train-mode and eval-mode forward, and
  ``predict``). It is computed in float64 on the CPU and rounded to ``DIGITS`` digits of the output
  scale, so thread count or BLAS cannot flip it, while any change to architecture, initialisation or
  forward does.

A file is rewritten only when its content changes. Building ~60 models takes minutes, so the model
fingerprints are memoised under a hash of the model code's syntax tree (and library versions): after a
cosmetic edit the stage builds nothing and does not even import torch.

Limits: a change that leaves the seeded forward identical (e.g. only the backward pass, or a branch the
fixed input never takes) or a library upgrade that only affects training is not seen; force a rerun
with ``dvc repro -f -s STAGE``.
"""
from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from reproduce.params import RUN_KINDS, init_file, runs_of

# The code a training run executes besides the model (which the model fingerprints cover).
CODE_PATHS = ("reproduce/train", "reproduce/data", "reproduce/cli.py", "reproduce/pipeline.py", "reproduce/recipes.py",
              "reproduce/params.py", "reproduce/errors.py")
MODEL_CODE_PATHS = ("models", "baselines", "reproduce/fingerprint.py")  # memo key of the model fingerprints
# What a measure stage runs: the models and the FLOP ledger (a refactor that keeps outputs but swaps a
# counted op for an uncounted one changes the ledger, so here the syntax tree is the fingerprint).
MEASURE_PATHS = ("models", "baselines", "reproduce/measure.py", "reproduce/flops.py", "reproduce/pipeline.py",
                 "reproduce/tables/spec.py")
PROJECT_PACKAGES = ("models", "baselines", "reproduce")
LIBRARIES = ("torch", "timm", "segmentation-models-pytorch")
DIGITS = 6  # decimal places of output / scale: float64 noise is ~1e-13 of the scale
INPUT_SHAPE = (2, 3, 64, 64)  # batch 2 so that train-mode BatchNorm sees batch statistics
NUM_CLASSES = 7
DROP_PATH = 0.1  # non-zero so that the train-mode forward exercises stochastic depth
PERTURBATION = 0.02  # std of the seeded noise added to every parameter (see model_fingerprint)
MEMO_KEYS = 4  # model-code versions remembered (an edit and its revert cost nothing)


# ----------------------------------------------------------------------------------------- code

def _drop_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _unqualify_project_imports(tree: ast.AST) -> ast.AST:
    """``from reproduce.train.engine import f`` -> ``from  import f``: where a helper lives does not matter."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PROJECT_PACKAGES):
            node.module, node.level = None, 0
    return tree


def source_units(source: str) -> list[str]:
    """The top-level statements of one file as normalised AST dumps (no docstrings, comments, layout)."""
    tree = _unqualify_project_imports(_drop_docstrings(ast.parse(source)))
    return [ast.dump(stmt, annotate_fields=False, include_attributes=False) for stmt in tree.body]


def python_files(root: Path, paths: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for rel in paths:
        path = root / rel
        if not path.exists():
            raise FileNotFoundError(f"{path}: fingerprinted code path is missing")
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def code_digest(root: Path, paths: Iterable[str]) -> str:
    """One hash of the code under ``paths``: the sorted pool of their top-level statements."""
    units = sorted(unit for file in python_files(root, paths) for unit in source_units(file.read_text()))
    return hashlib.sha256("\n".join(units).encode()).hexdigest()


# ----------------------------------------------------------------------------------------- models

@dataclass(frozen=True)
class ModelConfig:
    """What distinguishes two trained models' code paths: family/size, task, ablations, windows."""

    model: str
    task: str
    ablate: tuple[str, ...] = ()
    window_sizes: tuple[int, ...] | None = None

    @property
    def key(self) -> str:
        windows = "-".join(map(str, self.window_sizes)) if self.window_sizes else "default"
        return f"{self.model}/{self.task}/{'+'.join(self.ablate) or 'full'}/{windows}"


def run_configs(params: dict[str, Any]) -> dict[tuple[str, str], ModelConfig]:
    """(kind, run) -> the model configuration that run trains, for every run in params.yaml."""
    configs = {}
    for run, entry in (params.get("pretrain") or {}).items():
        configs["pretrain", run] = ModelConfig(entry["model"], "cls", tuple(sorted(entry.get("ablate") or ())))
    for kind in RUN_KINDS[1:]:
        for run, entry in runs_of(params, kind).items():
            init = entry if init_file(entry) else params["pretrain"][entry["init"]]  # from_file entries name their model
            windows = entry.get("window-sizes")
            configs[kind, run] = ModelConfig(init["model"], "seg", tuple(sorted(init.get("ablate") or ())),
                                             tuple(windows) if windows else None)
    return configs


def _summary(out: Any, seed: int) -> list[float]:
    """Scale-relative projections of one output tensor, rounded: six numbers that move with any change."""
    import torch

    flat = out.detach().flatten().double()
    scale = float(flat.abs().max()) or 1.0
    probes = torch.randn(flat.numel(), 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    values = [*(flat / scale @ probes / flat.numel() ** 0.5).tolist(), float(flat.mean()) / scale, float(flat.std()) / scale]
    return [float(f"{scale:.{DIGITS}g}"), *(round(v, DIGITS) + 0.0 for v in values)]  # + 0.0: no "-0.0"


def model_fingerprint(config: ModelConfig) -> dict[str, Any]:
    """Structure and seeded outputs of one model configuration (float64, CPU): the initialised model's
    eval-mode output (initialisation), then, with every parameter perturbed by seeded noise, the
    train-mode, eval-mode and (segmentation) ``predict`` outputs. The perturbation matters: HRViT's
    attention sub-layers start as exactly 0 (zero-initialised BN), so at initialisation the forward
    would not see the attention code at all."""
    import torch

    # the models and torch load here, not at start-up: after a cosmetic edit the stage builds no model
    from models.factory import build_model
    from reproduce.train.common import model_kwargs  # the kwargs training builds with

    settings = {"ablate": list(config.ablate), "window_sizes": list(config.window_sizes) if config.window_sizes else None,
                "drop_path_rate": DROP_PATH}
    torch.manual_seed(0)
    model = build_model(config.model, config.task, num_classes=NUM_CLASSES, **model_kwargs(config.model, settings))
    tensors = [f"{name} {tuple(t.shape)} {t.dtype}" for name, t in [*model.named_parameters(), *model.named_buffers()]]
    modules = [f"{name} {type(m).__module__}.{type(m).__qualname__}" for name, m in model.named_modules()]
    structure = hashlib.sha256("\n".join(tensors + modules).encode()).hexdigest()
    model = model.double()
    x = torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outputs = {}
    with torch.no_grad():
        outputs["init"] = _summary(model.eval()(x), 1)
        noise = torch.Generator().manual_seed(5)
        for _, param in sorted(model.named_parameters()):
            param.add_(torch.randn(param.shape, generator=noise, dtype=param.dtype), alpha=PERTURBATION)
        torch.manual_seed(1)
        outputs["train"] = _summary(model.train()(x), 2)
        outputs["eval"] = _summary(model.eval()(x), 3)
        if config.task == "seg":
            outputs["predict"] = _summary(model.predict(x), 4)
    return {"config": {**asdict(config), "key": config.key}, "params": sum(p.numel() for p in model.parameters()),
            "structure": structure, "outputs": outputs}


def library_versions() -> list[str]:
    versions = []
    for lib in LIBRARIES:
        try:
            versions.append(f"{lib}=={metadata.version(lib)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{lib} missing")
    return versions


def model_code_key(root: Path) -> str:
    """The memo key: model code syntax, this module's settings and the libraries the models use."""
    return hashlib.sha256((code_digest(root, MODEL_CODE_PATHS) + " ".join(library_versions())).encode()).hexdigest()


# ----------------------------------------------------------------------------------------- files

def write_if_changed(path: Path, data: dict[str, Any]) -> bool:
    """Write ``data`` as JSON unless the file already holds exactly that (its md5 and mtime stay put)."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def _load_memo(path: Path) -> list[dict[str, Any]]:
    try:
        memo = json.loads(path.read_text())
        return memo if isinstance(memo, list) else []
    except (OSError, ValueError):
        return []


def write_fingerprints(params: dict[str, Any], root: Path, out: Path) -> dict[str, int]:
    """Write ``out/code.json``, ``out/measure.json`` and ``out/<kind>/<run>.json`` for every run;
    returns counts for the log."""
    changed = int(write_if_changed(out / "code.json", {"paths": list(CODE_PATHS), "digest": code_digest(root, CODE_PATHS)}))
    changed += write_if_changed(out / "measure.json", {"paths": list(MEASURE_PATHS), "digest": code_digest(root, MEASURE_PATHS),
                                                       "libraries": library_versions()})
    configs = run_configs(params)
    key = model_code_key(root)
    memo_path = out / "memo.json"
    memo = _load_memo(memo_path)
    entry = next((m for m in memo if m.get("key") == key), {"key": key, "models": {}})
    missing = sorted((c for c in set(configs.values()) if c.key not in entry["models"]), key=lambda c: c.key)
    if missing:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the result does not depend on it, and tiny models on a busy machine run fastest so
        try:
            for config in missing:
                entry["models"][config.key] = model_fingerprint(config)
        finally:
            torch.set_num_threads(threads)
    built = len(missing)
    memo = [entry, *(m for m in memo if m.get("key") != key)][:MEMO_KEYS]
    write_if_changed(memo_path, memo)  # type: ignore[arg-type]
    wanted = set()
    for (kind, run), config in configs.items():
        path = out / kind / f"{run}.json"
        wanted.add(path)
        changed += write_if_changed(path, entry["models"][config.key])
    for stale in out.glob("*/*.json"):  # runs removed from params.yaml
        if stale not in wanted:
            stale.unlink()
    return {"runs": len(configs), "configs": len(set(configs.values())), "built": built, "changed": changed}

