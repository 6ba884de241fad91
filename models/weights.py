"""Published and suite checkpoints for suite models: reading, format detection, key conversion, loading.

Two entry points share one conversion per family (the ``checkpoint_filter_fn`` beside each model,
timm's convention):

* timm's own mechanism, ``timm.create_model(name, pretrained=True,
  pretrained_cfg_overlay=dict(file=PATH))``, for a classifier or a ``features_only`` backbone;
* ``load_backbone_weights`` / ``load_segmentation_weights`` for the training commands, which also
  return the init record (format, file, sha256, ...) that a run writes to its metrics.

Formats (``detect_format``):

=======================  =====================================================================
``hrvit-repro``          this suite's ``checkpoint.pt`` / ``model.safetensors`` / state dicts
``hrvit-official``       facebookresearch/HRViT ImageNet checkpoints (timm CheckpointSaver)
``hrvit-official-mmseg`` facebookresearch/HRViT mmseg segmentation checkpoints
``mit-nvlabs``           NVlabs/SegFormer ImageNet ``mit_bN.pth``
``segformer-mmseg``      NVlabs/SegFormer fine-tuned ADE20K/Cityscapes checkpoints
``cswin-official``       microsoft/CSWin-Transformer ImageNet checkpoints (EMA weights preferred)
=======================  =====================================================================

No partial loads: a key that does not map, or a backbone key the checkpoint lacks, fails with one
message listing them. Only two kinds of model keys may be absent, each announced in one line: a
classification head (a backbone or segmentation checkpoint has none; a head of another width is
dropped, as timm does) and the segmentation-only stage norms of CSWin, which its ImageNet weights
do not have. Those keep their initial values.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors import safe_open
from timm.models import build_model_with_cfg, clean_state_dict, model_entrypoint, resolve_pretrained_cfg
from torch import nn

__all__ = [
    "FORMATS", "SAFE_GLOBALS", "WeightsError", "load_torch_file", "read_safetensors", "read_checkpoint", "detect_format",
    "convert_checkpoint", "rename_keys",
    "build_with_weights", "load_backbone_weights", "load_segmentation_weights", "sha256",
]

FORMATS = ("hrvit-repro", "hrvit-official", "hrvit-official-mmseg", "mit-nvlabs", "segformer-mmseg", "cswin-official")
SUITE_FORMATS = ("hrvit-repro-checkpoint/1", "hrvit-repro-weights/1")
_WRAPPERS = ("model_state", "state_dict_ema", "model_ema", "state_dict", "model")  # EMA first, as CSWin's eval

_logger = logging.getLogger(__name__)

Converter = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
RenameRules = Iterable[tuple[str, "str | Callable[[re.Match], str]"]]  # (regex, re.sub replacement)


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded into the requested model (the message says why and what to do)."""


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# What ``weights_only`` loading admits beyond tensors and plain containers: timm's CheckpointSaver
# (HRViT, CSWin) pickles the run's argparse.Namespace beside the weights. This suite's own
# checkpoint.pt needs nothing more.
SAFE_GLOBALS = (argparse.Namespace,)

# torch's advice around a load error (to re-run with weights_only=False, to allow-list a global, to
# read its docs): written for the code's developer, and the first is the unsafe path. Only the cause stays.
_TORCH_HINTS = re.compile("|".join((
    r"\x1b\[\d*m",
    r"Weights only load failed\.",
    r"This file can still be loaded, to do so you have two options.*?following error message\.",
    r"In PyTorch 2\.6, we changed the default value.*?trusted source\.",
    r"Please file an issue with the following.*?use case:",
    r"WeightsUnpickler error:",
    r"Please use `torch\.serialization\.add_safe_globals.*?(?:this class/function\.|$)",
    r"Check the documentation of torch\.load.*?(?:torch\.load\.html\.|$)",
    r"This is an internal miniz error\..*?(?:after saving\.|$)",
)))


def _load_error_cause(err: Exception) -> str:
    """The cause of a failed read in a few words, without the reader's hints."""
    if isinstance(err, EOFError):
        return "the file ends early: truncated?"
    text = " ".join(_TORCH_HINTS.sub(" ", str(err)).split()).strip(" .")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _file_kind(path: Path) -> tuple[str, str]:
    """(kind, description) of a file from its first bytes, for an error message."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        return "zip", "a zip archive (torch.save's format)"
    if head[8:10] == b'{"':
        return "safetensors", "a safetensors file"
    if head.startswith(b"\x80"):
        return "pickle", "a pickle"
    text = head.decode("utf-8", "replace")
    return ("text", f"text ({text[:24]!r})") if text.isprintable() else ("binary", "binary data of another format")


def _read_error(path: Path, expected: str, kinds: tuple[str, ...], err: Exception) -> WeightsError:
    """One line: the file, what was expected, the cause, and what the file is when it is something else."""
    kind, description = _file_kind(path)
    other = "" if kind in kinds else f"; the file is {description}"
    return WeightsError(f"{path} is not a readable {expected} ({_load_error_cause(err)}{other})")


def _readable(path: Path, expected: str) -> None:
    if not path.is_file():
        raise WeightsError(f"{path} does not exist (expected {expected})")
    if path.stat().st_size == 0:
        raise WeightsError(f"{path} is empty (expected {expected}): an interrupted download or copy?")


def load_torch_file(path: str | Path) -> Any:
    """A ``torch.save`` file (.pt/.pth/.bin) read with ``weights_only=True``: tensors, plain containers
    and ``SAFE_GLOBALS`` only, so a file that would run code when unpickled is refused, never run.
    Every failure is a one-line WeightsError naming the file and the cause."""
    path = Path(path)
    _readable(path, "a PyTorch checkpoint")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # the error, if any, says more
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors have many types; the message names the file
        blocked = re.search(r"GLOBAL (\S+?)\.? ", str(err)) if isinstance(err, pickle.UnpicklingError) else None
        if blocked:
            raise WeightsError(f"{path} is refused: unpickling it would call {blocked[1]}, and only tensors and "
                               "plain containers are read (a pickled object can run code)") from err
        raise _read_error(path, "PyTorch checkpoint", ("zip", "pickle"), err) from err


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a .safetensors file; a truncated, empty or foreign file is a
    one-line WeightsError naming it."""
    path = Path(path)
    _readable(path, "a safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for a corrupt header or data
        raise _read_error(path, "safetensors file", ("safetensors",), err) from err


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The file as a dict: safetensors -> its tensors plus ``format``/``meta`` from the header;
    torch files -> whatever was saved (a state dict or a dict wrapping one)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(path)
        try:
            meta = json.loads(metadata.get("meta", "{}"))
        except json.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict):
            raise WeightsError(f"{path}: its 'meta' header is not a JSON object (damaged or edited by hand)")
        return {"format": metadata.get("format", "safetensors"), **meta, "model_state": tensors}
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint (a dict of tensors)")
    if checkpoint.get("format") in SUITE_FORMATS and not isinstance(checkpoint.get("model_state"), Mapping):
        raise WeightsError(f"{path} is in this suite's format but lacks model_state (damaged or edited by hand)")
    return checkpoint


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, unwrapped from the usual containers, without DDP/compile prefixes."""
    for key in _WRAPPERS:
        if isinstance(checkpoint.get(key), Mapping):
            return clean_state_dict(dict(checkpoint[key]))
    return clean_state_dict({k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)})


def _has(keys: Iterable[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def detect_format(state: Mapping[str, Any]) -> str:
    """Name the format of a checkpoint (a loaded file, wrapped or not) from its marker or key names."""
    if state.get("format") in SUITE_FORMATS:
        return "hrvit-repro"
    keys = list(state_dict_of(state))
    backbone = [k[len("backbone."):] for k in keys if k.startswith("backbone.")]
    if _has(backbone, "stem.conv1.", "features."):
        return "hrvit-official-mmseg"
    if _has(keys, "stem.conv1.") and _has(keys, "features."):
        return "hrvit-official"
    if _has(keys, "decode_head.linear_c1.", "decode_head.linear_pred.") or (
        _has(backbone, "patch_embed1.") and not _has(keys, "decode_head.linear_c.")
    ):
        return "segformer-mmseg"
    if _has(keys, "patch_embed1.") and _has(keys, "block1."):
        return "mit-nvlabs"  # also this suite's MiT classifier: its keys are NVlabs' own
    if _has(keys, "stage1_conv_embed.", "merge1."):
        return "cswin-official"
    if _has(keys, "backbone.", "stem.0.", "stages.", "conv1.", "patch_embed1."):
        return "hrvit-repro"
    raise WeightsError(
        f"unrecognised checkpoint format (first keys: {', '.join(keys[:4]) or 'none'}); known formats: {', '.join(FORMATS)}"
    )


def backbone_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone part of a segmentation state dict (``backbone.`` and timm's ``model.`` wrapper
    stripped), or the state itself when it has no ``backbone.`` keys."""
    if not _has(state, "backbone."):
        return dict(state)
    out = {}
    for key, value in state.items():
        if key.startswith("backbone."):
            key = key[len("backbone."):]
            out[key[len("model."):] if key.startswith("model.") else key] = value
    return out


def rename_keys(state: Mapping[str, torch.Tensor], rules: RenameRules, fmt: str) -> dict[str, torch.Tensor]:
    """Rename every key by the first matching ``(regex, replacement)`` rule; keys no rule matches
    fail together in one message."""
    rules = [(re.compile(pattern), repl) for pattern, repl in rules]
    out, unmapped = {}, []
    for key, value in state.items():
        for pattern, repl in rules:
            if pattern.fullmatch(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise WeightsError(f"{len(unmapped)} key(s) of the {fmt} checkpoint do not map: {', '.join(unmapped)}")
    return out


def _dropped_notice(dropped: list[str], target: Mapping[str, torch.Tensor], fmt: str) -> str:
    """One short line on the checkpoint's head tensors a model does not take, and why."""
    absent = [k for k in dropped if k not in target]
    resized = [k for k in dropped if k in target]
    parts = [f"{len(absent)} named {', '.join(sorted({k.split('.')[0] + '.*' for k in absent}))}, which the model "
             "lacks (a backbone builds no classifier head)"] if absent else []
    if resized:
        key = resized[0]
        parts.append(f"{len(resized)} of another width (a head for another number of classes, e.g. {key} "
                     f"{tuple(target[key].shape)} in the model)")
    return f"dropped {len(dropped)} head tensors of the {fmt} checkpoint: {'; '.join(parts)}"


def match_model(
    state: dict[str, torch.Tensor], model: nn.Module, optional: tuple[str, ...], fmt: str
) -> dict[str, torch.Tensor]:
    """``state`` checked against ``model``: tensors with no model key or of another shape fail, as do
    model keys ``state`` lacks, except under the ``optional`` prefixes (head, seg-only norms): such
    checkpoint tensors are dropped and such model tensors keep their values, each with a one-line
    notice. Returns a complete state dict for ``model``."""
    target = model.state_dict()
    unexpected, dropped, kept = [], [], []
    for key in list(state):
        if key in target and state[key].shape == target[key].shape:
            continue
        if key.startswith(optional):  # a head the model has not (a backbone) or of another width
            dropped.append(key)
            del state[key]
        else:
            unexpected.append(key if key not in target else f"{key} {tuple(state[key].shape)}->{tuple(target[key].shape)}")
    missing = [k for k in target if k not in state and not k.startswith(optional)]
    if unexpected or missing:
        raise WeightsError(
            f"the {fmt} checkpoint does not fit {type(model).__name__}: "
            f"unmapped or mis-shaped: [{', '.join(unexpected)}]; missing: [{', '.join(missing)}]"
        )
    for key in target:
        if key not in state:
            kept.append(key)
            state[key] = target[key]
    if dropped:
        _logger.warning(_dropped_notice(dropped, target, fmt))
    if kept:
        _logger.warning(f"{len(kept)} model tensor(s) not in the {fmt} checkpoint keep their initial values "
                        f"(under {', '.join(sorted({k.split('.')[0] for k in kept}))})")
    return state


def convert_checkpoint(
    checkpoint: Mapping[str, Any],
    model: nn.Module,
    converters: Mapping[str, Converter],
    optional: tuple[str, ...],
    family: str,
) -> dict[str, torch.Tensor]:
    """The body of every family's ``checkpoint_filter_fn``: detect, take the backbone part of a
    segmentation checkpoint, convert (``converters`` per format; suite checkpoints need none),
    then ``match_model``."""
    fmt = detect_format(checkpoint)
    state = backbone_keys(state_dict_of(checkpoint))
    if fmt != "hrvit-repro":
        if fmt not in converters:
            accepted = ", ".join(["hrvit-repro", *converters])
            raise WeightsError(f"{family} models cannot load a {fmt} checkpoint; accepted formats: {accepted}")
        state = converters[fmt](state)
    return match_model(state, model, optional, fmt)


# --------------------------------------------------------------------------------------------------
# timm's pretrained=True path
# --------------------------------------------------------------------------------------------------


def _source(variant: str, kwargs: Mapping[str, Any]) -> tuple[str, str]:
    """(kind, location) of the weights ``pretrained=True`` would load; fails before any build when
    there is none or the file is missing."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    example = f"timm.create_model({variant!r}, pretrained=True, pretrained_cfg_overlay=dict(file=PATH))"
    if cfg.file:
        if not Path(cfg.file).is_file():
            raise WeightsError(f"{variant}: weights file {cfg.file} does not exist; download the checkpoint and pass its path")
        return "file", cfg.file
    if cfg.hf_hub_id:
        return "hf-hub", cfg.hf_hub_id
    if cfg.url:
        return "url", cfg.url
    raise WeightsError(f"{variant}: no pretrained weights are built in (none are published for download); "
                       f"point at a downloaded checkpoint: {example} (see README, 'Published weights')")


def build_with_weights(model_cls: Callable[..., nn.Module], variant: str, pretrained: bool, filter_fn: Callable,
                       **kwargs: Any) -> nn.Module:
    """timm's ``build_model_with_cfg`` with the family's ``filter_fn``, and one-line errors for a
    missing source or an unreachable download (this suite's machines are often offline).

    A file is read here (``read_checkpoint``) and handed to timm as the cfg's ``state_dict``:
    timm's own reader would take the run name under a suite checkpoint's ``model`` key for weights.
    """
    if not pretrained:
        return build_model_with_cfg(model_cls, variant, False, **kwargs)
    kind, location = _source(variant, kwargs)
    if kind == "file":
        kwargs["pretrained_cfg_overlay"] = dict(kwargs.get("pretrained_cfg_overlay") or {},
                                                state_dict=read_checkpoint(location))
    try:
        model = build_model_with_cfg(model_cls, variant, True, pretrained_filter_fn=filter_fn, **kwargs)
    except (OSError, ConnectionError) as err:
        if kind == "file":
            raise
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(str(location)).name
        raise WeightsError(f"{variant}: cannot download {location} ({type(err).__name__}); download it on a machine "
                           f"with internet and put it at {cache} (timm's cache) or pass "
                           f"pretrained_cfg_overlay=dict(file=PATH)") from err
    for module in model.modules():  # keep the weights once, in the model (a feature wrapper holds two cfgs)
        if isinstance(getattr(module, "pretrained_cfg", None), dict):
            module.pretrained_cfg.pop("state_dict", None)
    return model


# --------------------------------------------------------------------------------------------------
# Loading into the suite's segmentation model (the training commands' entry points)
# --------------------------------------------------------------------------------------------------


def _filter_fn(name: str) -> Callable[[dict, nn.Module], dict]:
    """The ``checkpoint_filter_fn`` of the family that registered ``name`` with timm."""
    return importlib.import_module(model_entrypoint(name).__module__).checkpoint_filter_fn


def _unwrapped(backbone: nn.Module) -> nn.Module:
    """The model a timm feature wrapper holds (its state dict is the filter functions' key space)."""
    return getattr(backbone, "model", backbone)


def load_backbone_weights(model: nn.Module, path: str | Path, name: str,
                          checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load any accepted checkpoint of ``name``'s family into ``model.backbone`` (a segmentation
    model; a segmentation checkpoint's head is ignored). ``checkpoint`` is the file as
    ``read_checkpoint`` returned it, when the caller has read it already (a checkpoint can be GBs).
    Returns the init record: format, file, sha256, the number of tensors loaded and the model
    tensors left at their initial values (kept_init)."""
    path = Path(path)
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    backbone = _unwrapped(model.backbone)
    current = backbone.state_dict()
    state = _filter_fn(name)(checkpoint, backbone)
    kept = [k for k, v in state.items() if v.data_ptr() == current[k].data_ptr()]
    backbone.load_state_dict(state)
    return {"format": detect_format(checkpoint), "file": str(path), "sha256": sha256(path),
            "into": "backbone", "loaded": len(state) - len(kept), "kept_init": kept}


# Decode-head key conversions (the suite's head: linear_c.i, linear_fuse, fuse_bn, classifier).
_HEAD_RULES: dict[str, RenameRules] = {
    "hrvit-official-mmseg": (
        (r"convs\.(\d)\.conv\.(weight|bias)", r"linear_c.\1.\2"),
        (r"fusion_conv\.conv\.weight", "linear_fuse.weight"),
        (r"fusion_conv\.bn\.(.+)", r"fuse_bn.\1"),
        (r"conv_seg\.(weight|bias)", r"classifier.\1"),
    ),
    "segformer-mmseg": (
        (r"linear_c(\d)\.proj\.(weight|bias)", r"linear_c.\1.\2"),  # index shifted below
        (r"linear_fuse\.conv\.weight", "linear_fuse.weight"),
        (r"linear_fuse\.bn\.(.+)", r"fuse_bn.\1"),
        (r"linear_pred\.(weight|bias)", r"classifier.\1"),
    ),
}


def _segformer_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVlabs' head: Linear projections (numbered from 1) and the fuse conv reading the branches in
    reverse order (c4, c3, c2, c1); the suite's head uses 1x1 convs in branch order."""
    out = {}
    for key, value in state.items():
        match = re.fullmatch(r"linear_c\.(\d)\.(weight|bias)", key)
        if match:
            key = f"linear_c.{int(match[1]) - 1}.{match[2]}"
            value = value[..., None, None] if match[2] == "weight" else value
        out[key] = value
    fuse = out["linear_fuse.weight"]
    out["linear_fuse.weight"] = torch.cat(fuse.chunk(4, dim=1)[::-1], dim=1)
    return out


def _head_state(checkpoint: Mapping[str, Any], fmt: str) -> dict[str, torch.Tensor]:
    state = state_dict_of(checkpoint)
    head = {k[len("decode_head."):]: v for k, v in state.items() if k.startswith("decode_head.")}
    if not head:
        raise WeightsError(f"the {fmt} checkpoint has no decode_head; it holds backbone weights only "
                           "(use it to initialise fine-tuning, not to evaluate)")
    if fmt == "hrvit-repro":
        return head
    if fmt not in _HEAD_RULES:
        raise WeightsError(f"a {fmt} checkpoint holds no segmentation model; evaluate a fine-tuned one "
                           f"({', '.join(['hrvit-repro', *_HEAD_RULES])})")
    if fmt == "segformer-mmseg":  # mmseg's base head builds a conv_seg that SegFormer never uses
        head = {k: v for k, v in head.items() if not k.startswith("conv_seg.")}
    head = rename_keys(head, _HEAD_RULES[fmt], fmt)
    return _segformer_head(head) if fmt == "segformer-mmseg" else head


def load_segmentation_weights(model: nn.Module, path: str | Path, name: str) -> dict[str, Any]:
    """Load a fine-tuned segmentation checkpoint (this suite's, official HRViT mmseg or SegFormer
    mmseg) into the whole segmentation model: backbone and decode head, nothing left at init."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    fmt = detect_format(checkpoint)
    head = _head_state(checkpoint, fmt)
    classes = head.get("classifier.weight")
    if classes is not None and classes.shape[0] != model.num_classes:
        raise WeightsError(f"{path} predicts {classes.shape[0]} classes but the model has {model.num_classes}; "
                           f"build it with --num-classes {classes.shape[0]}")
    match_model(head, model.decode_head, (), fmt)  # raises on any unmapped or missing head key
    record = load_backbone_weights(model, path, name, checkpoint=checkpoint)
    model.decode_head.load_state_dict(head)
    record.update(into="segmentation model", loaded=record["loaded"] + len(head))
    return record
