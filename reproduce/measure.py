"""``python -m reproduce measure MODEL``: params and GFLOPs under the paper, fvcore and torch conventions.

``measure_named`` is the same measurement as a function (for notebooks and DVC stages); it returns
the JSON object the CLI prints; ``measure_row`` measures one user row spec ({label, model,
flop_family, ...}) the same way. Requests are validated before any model is built.

MODEL is a suite name, ``timm:<name>`` (any timm model with ``features_only`` for ``--task seg``) or
``PKG.MODULE:FACTORY`` (see ``models.factory``). The paper convention needs a family counting rule:
suite models carry theirs, others take ``--flop-family`` (default ``hrvit``, the HRViT paper's own
mmcv-1.3 rule).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any, Iterable, Sequence

DEFAULT_SIZE = {"cls": (224, 224), "seg": (512, 512)}
DEFAULT_CLASSES = {"cls": 1000, "seg": 19}
DEFAULT_FLOP_FAMILY = "hrvit"  # paper-convention rule of a model that declares none


@dataclass(frozen=True)
class Request:
    """A validated measurement request, defaults filled in."""

    model: str
    task: str
    num_classes: int
    size: tuple[int, int]
    window_sizes: tuple[int, ...] | None
    ablate: tuple[str, ...]
    flop_family: str | None = None  # overrides the model's own family rule

    def model_kwargs(self) -> dict[str, Any]:
        from models.hrvit import option_kwargs

        return option_kwargs(self.model, self.ablate, self.window_sizes)


def check_request(
    model: str,
    task: str = "cls",
    num_classes: int | None = None,
    size: Sequence[int] | None = None,
    window_sizes: Sequence[int] | None = None,
    ablate: Iterable[str] = (),
    flop_family: str | None = None,
) -> Request:
    """Validate a request and fill in its defaults; a ValueError says what is wrong and how to fix it."""
    from models.factory import check_model_name
    from reproduce.flops import get_rule

    check_model_name(model)
    if flop_family is not None:
        get_rule(flop_family)  # raises, listing the known families
    if task not in DEFAULT_SIZE:
        raise ValueError(f"unknown task {task!r}; use 'cls' or 'seg'")
    num_classes = DEFAULT_CLASSES[task] if num_classes is None else num_classes
    if num_classes < 1:
        raise ValueError(f"--num-classes must be a positive integer, got {num_classes}")
    size = tuple(DEFAULT_SIZE[task] if size is None else size)
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"--size takes H W (or one value for a square), both positive; got {list(size)}")
    ablate = tuple(dict.fromkeys(ablate))
    window_sizes = None if window_sizes is None else tuple(window_sizes)
    request = Request(model, task, num_classes, size, window_sizes, ablate, flop_family)
    request.model_kwargs()  # raises on options HRViT does not have
    return request


def _build(request: Request, on_meta: bool):
    """Build the model; on the meta device (no weight init: 5-10x faster) when only shape-based
    conventions are wanted and the model's constructor allows it."""
    import torch

    from models.factory import build_model

    args = (request.model, request.task, request.num_classes)
    if on_meta:
        try:
            with torch.device("meta"):
                return build_model(*args, **request.model_kwargs())
        except (RuntimeError, NotImplementedError):  # a constructor that reads tensor values (e.g. .tolist())
            pass
    return build_model(*args, **request.model_kwargs())


def _reading(model: Any) -> dict[str, Any] | None:
    """The construction choices of a model built from a fitted reading (HRNet-ViT exposes
    ``reading``), so that a measured cell always says which reading produced it."""
    holder = next((m for m in model.modules() if hasattr(m, "reading")), None)
    return None if holder is None else asdict(holder.reading)


def measure_request(request: Request, conventions: Iterable[str] | None = None, depth: int = 2) -> dict[str, Any]:
    """Build the requested model and return its ledger as a JSON-ready dict."""
    import timm
    import torch

    from models.factory import flop_family
    from reproduce.flops import ALL_CONVENTIONS, CONVENTIONS, measure

    conventions = ALL_CONVENTIONS if conventions is None else tuple(conventions)
    own = flop_family(request.model)
    family = request.flop_family or own or DEFAULT_FLOP_FAMILY
    source = "flag" if request.flop_family else "model" if own else "default"
    model = _build(request, on_meta="fvcore" not in conventions)
    ledger = measure(model, request.size, family, conventions, depth)
    result: dict[str, Any] = {
        "model": request.model,
        "task": request.task,
        "num_classes": request.num_classes,
        "size": list(request.size),
        "ablate": list(request.ablate),
        "flop_family": family,
        "flop_family_source": source,  # the model's own rule, --flop-family, or DEFAULT_FLOP_FAMILY
    }
    if request.window_sizes is not None:
        result["window_sizes"] = list(request.window_sizes)
    reading = _reading(model)
    if reading is not None:
        result["reading"] = reading
    result.update(ledger.to_dict())
    result["conventions"] = {name: CONVENTIONS[name] for name in ledger.gflops}
    result["paper_rule_why"] = ledger.rule.why
    result["versions"] = {"torch": torch.__version__, "timm": timm.__version__, "fvcore": version("fvcore")}
    return result


def measure_named(
    name: str,
    task: str = "cls",
    num_classes: int | None = None,
    size: Sequence[int] | None = None,
    window_sizes: Sequence[int] | None = None,
    ablate: Iterable[str] = (),
    conventions: Iterable[str] | None = None,
    depth: int = 2,
    flop_family: str | None = None,
) -> dict[str, Any]:
    """Params and GFLOPs of a model by name (all conventions unless ``conventions`` says otherwise)."""
    request = check_request(name, task, num_classes, size, window_sizes, ablate, flop_family)
    return measure_request(request, conventions, depth)


ROW_KEYS = {"label", "model", "flop_family", "task", "num_classes", "size"}


def measure_row(row: dict[str, Any], conventions: Iterable[str] | None = None, depth: int = 1) -> dict[str, Any]:
    """One extra table row, e.g. ``{"label": "ConvNeXt-T", "model": "timm:convnext_tiny",
    "flop_family": "hrvit"}`` (task defaults to seg): ``measure_named``'s result plus ``label``."""
    unknown = set(row) - ROW_KEYS
    if unknown or "model" not in row or "label" not in row:
        raise ValueError(f"row {row!r}: needs 'label' and 'model'; optional keys: flop_family, task, num_classes, size"
                         + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""))
    result = measure_named(row["model"], row.get("task", "seg"), row.get("num_classes"), row.get("size"),
                           conventions=conventions, depth=depth, flop_family=row.get("flop_family"))
    return {"label": row["label"], **result}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a suite model name (e.g. hrvit_b1, mit_b1, cswin_t, hrnet18_mit), timm:<name> "
                        "(any timm model; features_only for --task seg) or PKG.MODULE:FACTORY")
    parser.add_argument("--task", choices=("cls", "seg"), default="cls", help="classifier or backbone + SegFormer head (default cls)")
    parser.add_argument("--num-classes", type=int, help="default 1000 for cls, 19 for seg")
    parser.add_argument("--size", type=int, nargs="+", metavar="PX", help="input size: H W, or one value for a square "
                        "(default 224 224 for cls, 512 512 for seg)")
    parser.add_argument("--window-sizes", type=int, nargs="+", metavar="W", help="HRViT stripe widths, one per branch, e.g. 1 2 9 9")
    parser.add_argument("--ablate", nargs="+", default=[], metavar="NAME", help="HRViT techniques to remove (Table 5): "
                        "kv_sharing eff_patch_embed mixcfn parallel_conv nonlinearity_bn dense_fusion des all")
    parser.add_argument("--flop-family", choices=("hrvit", "mit", "cswin"), help="paper-convention counting rule "
                        f"(default: the model's own; {DEFAULT_FLOP_FAMILY} for timm:/PKG.MODULE:FACTORY models)")
    parser.add_argument("--depth", type=int, default=2, help="module depth of the per-module breakdown (default 2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _print_tables(result: dict[str, Any]) -> None:
    from tabulate import tabulate

    conventions = list(result["conventions"])
    title = f"{result['model']} {result['task']} {result['num_classes']} classes {result['size'][0]}x{result['size'][1]}"
    if result.get("window_sizes"):
        title += f" windows {'-'.join(map(str, result['window_sizes']))}"
    if result["ablate"]:
        title += f" ablate {' '.join(result['ablate'])}"
    print(f"{title} (paper rule: {result['flop_family']})")
    if "reading" in result:
        print("reading: " + ", ".join(f"{key}={value}" for key, value in result["reading"].items()))
    print(tabulate([[f"{result['params']:,}", *(f"{result['gflops'][c]:.3f}" for c in conventions)]],
                   headers=["params", *(f"GFLOPs {c}" for c in conventions)], disable_numparse=True))
    print()
    rows = [[name, f"{int(row['params']):,}", *(row[c] for c in conventions)] for name, row in result["breakdown"].items()]
    print(tabulate(rows, headers=["module", "params", *conventions], floatfmt=".3f"))
    for name, text in result["conventions"].items():
        print(f"\n{name}: {text}")


def run(args: argparse.Namespace) -> int:
    if args.depth < 1:
        return _usage_error(f"--depth must be >= 1, got {args.depth}")
    try:
        request = check_request(args.model, args.task, args.num_classes, args.size, args.window_sizes, args.ablate,
                                args.flop_family)
    except ValueError as err:
        return _usage_error(str(err))
    try:
        result = measure_request(request, depth=args.depth)
    except ValueError as err:  # an external model that cannot be built as asked
        return _usage_error(str(err))
    except (RuntimeError, AssertionError, TypeError) as err:  # an external model that cannot run on this input
        from models.factory import is_external
        from reproduce.flops import AttentionCoverageError

        if not is_external(request.model):
            raise
        if isinstance(err, AttentionCoverageError):  # its own message says what to register
            return _usage_error(f"{request.model}: {err}")
        cause = " ".join(str(err).split())[:200]  # a shape error can print whole tensors
        return _usage_error(f"{request.model} does not run on a {request.size[0]}x{request.size[1]} input with --task "
                            f"{request.task} ({type(err).__name__}: {cause}); pass a --size (or --task) the model accepts")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_tables(result)
    return 0


def _usage_error(message: str) -> int:
    """Report a bad request the way argparse does (message on stderr, exit status 2)."""
    import sys

    print(f"python -m reproduce measure: error: {message}", file=sys.stderr)
    return 2
