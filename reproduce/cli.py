"""One command line for the suite: ``python -m reproduce <subcommand>`` (also ``hrvit-repro``).

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``.
Only the chosen module is imported, so ``--help`` and light subcommands stay fast.

Bad input is reported as one ``error:`` line (plus, where it helps, the expected layout) with exit
status 2 and no traceback: commands raise :class:`UsageError` for it. A run that stops on purpose
(a signal, a non-finite loss) raises :class:`RunStopped` with its message and exit status. Both live in
``reproduce.errors`` (so that low layers can raise them) and are importable from here too.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from reproduce.errors import RunStopped, UsageError
from reproduce.params import is_main_process

__all__ = ["SUBCOMMANDS", "RunStopped", "UsageError", "main"]

# name -> (module, one-line help). The module is imported only when its subcommand runs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "measure": ("reproduce.measure", "params and GFLOPs of a model under the paper, fvcore and torch conventions"),
    "bench": ("reproduce.bench", "CPU/GPU forward latency and peak memory of HRViT against MiT"),
    "pretrain": ("reproduce.train.pretrain", "ImageNet(-layout) classification pretraining"),
    "finetune": ("reproduce.train.finetune", "semantic-segmentation fine-tuning (Cityscapes/ADE20K layouts)"),
    "evaluate": ("reproduce.train.evaluate", "evaluate a checkpoint on a dataset split"),
    "doctor": ("reproduce.doctor", "GPU self-check: smoke training under torchrun/nccl, bf16/fp16, SyncBN, benchmark"),
    "tables": ("reproduce.tables", "regenerate the paper's tables, Figure 5 and the claims ledger"),
    "plan": ("reproduce.plan", "estimated GPU-hours, wall time and disk of the paper profile's training stages"),
    "export": ("reproduce.export", "a model as ONNX with free batch, height and width, checked against PyTorch"),
}


def _top_level_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m reproduce",
        description="hrvit-repro: reproduce the HRViT paper's tables from code.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="subcommands:\n" + "\n".join(f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items())
        + "\n\nRun 'python -m reproduce <subcommand> --help' for its options.",
    )
    parser.add_argument("subcommand", choices=sorted(SUBCOMMANDS), metavar="subcommand")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_level_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] not in SUBCOMMANDS:
        top.error(f"unknown subcommand {argv[0]!r}; choose one of: {', '.join(SUBCOMMANDS)}")
    name, rest = argv[0], argv[1:]
    module_name, text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"python -m reproduce {name}", description=text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except UsageError as err:
        if is_main_process():
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        if is_main_process():
            print(f"{parser.prog}: {err}", file=sys.stderr)
        return err.status
    except KeyboardInterrupt:  # a Ctrl-C outside the training loop (which saves and raises RunStopped)
        if is_main_process():
            print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
