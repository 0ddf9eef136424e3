"""Import other projects' SSL checkpoints safely and exactly; export ours for torchvision and Detectron2.

Loading follows RELIABILITY.md 3.3/3.4 (T4-T6): a missing path is an error, never a random init; a
`<file>.sha256` sidecar, if present, is checked first; pickles load with `weights_only=True` plus a short
reviewed allowlist, and anything else is refused with the globals it needs unless the caller passes
`trust=True`. Known layouts (MoCo v1/v2/v3, DINO, VISSL, solo-learn/lightly, MMSelfSup, SimCLR-converter,
timm/torchvision, safetensors, our own) are unwrapped to torchvision/timm key names, loaded into our
backbones, and every key is accounted for: nothing missing, and nothing left over except known heads.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmark.errors import ConfigError, SSLBenchError
from benchmark.registry import Registry
from benchmark.store.checkpoints import save_verified, sha256_file, verify
from benchmark.store.io import atomic_save

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Keys a trunk may carry that the encoder does not use: classifiers, projectors, predictors, prototypes.
HEAD_PREFIXES = ("fc.", "head.", "heads.", "projector.", "predictor.", "prototypes.", "neck.", "classifier.")
_SHOW = 5  # mismatched keys listed per category in an error


class CheckpointFormatError(SSLBenchError):
    """A checkpoint is unreadable, of an unknown or ambiguous layout, or does not fit the architecture."""


class UnsafeCheckpointError(SSLBenchError):
    """A pickle needs globals outside the reviewed allowlist; loading it could run arbitrary code."""


# ---------------------------------------------------------------------------------------------- loading

# numpy 2 pickles name the scalar constructor numpy._core.multiarray.scalar, numpy 1.x numpy.core.multiarray.scalar
_SCALAR = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray").scalar
# Reviewed allowlist: what public SSL checkpoints hold besides tensors. DINO/MoCo store `args` as an
# argparse.Namespace; numpy scalars (e.g. a best accuracy or an epoch) need the scalar constructor, np.dtype
# and the concrete dtype classes. numpy arrays (ndarray/_reconstruct) are deliberately not on it.
ALLOWLIST: list[Any] = [
    argparse.Namespace,
    np.dtype,
    (_SCALAR, "numpy.core.multiarray.scalar"),
    (_SCALAR, "numpy._core.multiarray.scalar"),
    *(type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                  np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128)),
]


def safe_load(path: str | Path, trust: bool = False) -> Any:
    """Load a checkpoint without running code from it.

    Args:
        path: a `.safetensors` file or a `torch.save` pickle; a `<path>.sha256` sidecar is verified first.
        trust: allow arbitrary pickled objects (only for files from a source you trust).

    Returns:
        The stored object (for safetensors: a flat dict of CPU tensors).

    Raises:
        CheckpointFormatError: missing, directory, empty, truncated or garbage file.
        CheckpointIntegrityError: the sidecar hash does not match.
        UnsafeCheckpointError: the pickle needs globals outside `ALLOWLIST` and `trust` is False.
    """
    return _load(Path(path), trust)[0]


_LOADED: dict[tuple[str, int, int, bool], tuple[Any, str | None]] = {}  # the last file read, by (path, size, mtime, trust)


def _load(path: Path, trust: bool) -> tuple[Any, str | None]:
    """`safe_load`, plus the sha256 when a sidecar vouched for it (so large files are hashed once). The last file is
    kept in memory: planning, import and evaluation in one process read (and, trusted, unpickle) it once."""
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns, trust)
    except OSError:
        key = None
    if key is not None and key in _LOADED:
        return _LOADED[key]
    loaded = _read(path, trust)
    _LOADED.clear()
    if key is not None:
        _LOADED[key] = loaded
    return loaded


def _read(path: Path, trust: bool) -> tuple[Any, str | None]:
    if not path.exists():
        raise CheckpointFormatError(f"checkpoint {path} does not exist (refusing to evaluate a randomly initialised encoder)")
    if path.is_dir():
        raise CheckpointFormatError(f"checkpoint {path} is a directory; pass the weights file inside it")
    digest = verify(path) if path.with_name(path.name + ".sha256").is_file() else None
    if path.stat().st_size == 0:
        raise CheckpointFormatError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        return _load_safetensors(path), digest
    return (_load_trusted(path) if trust else _load_weights_only(path)), digest


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as e:  # SafetensorError for a bad header, truncated buffers, ...
        raise CheckpointFormatError(f"checkpoint {path} is not a valid safetensors file: {_reason(e)}") from None


def _load_weights_only(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(ALLOWLIST):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path, e)
        if unsafe:
            raise UnsafeCheckpointError(
                f"checkpoint {path} needs globals outside the reviewed allowlist: {', '.join(unsafe)}; loading it could "
                "run code. If you trust the file, pass --trust-checkpoint (trust=True)"
            ) from None
        raise CheckpointFormatError(f"checkpoint {path} cannot be unpickled (corrupt or not a torch file): {_reason(e)}") from None
    except Exception as e:  # RuntimeError (truncated zip), EOFError, KeyError (random bytes), ...
        raise CheckpointFormatError(f"checkpoint {path} cannot be read (corrupt or not a torch file): {_reason(e)}") from None


def _load_trusted(path: Path) -> Any:
    """The only full-pickle load in sslbench: reached solely through `trust=True` (--trust-checkpoint)."""
    try:
        needs = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)))
    except Exception:  # legacy (non-zip) format: its globals cannot be listed without unpickling
        needs = ["(legacy format: not listed)"]
    log.warning("loading %s with full pickle (trusted by the caller): it may run code; it imports %s", path,
                ", ".join(needs) or "nothing beyond tensors")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointFormatError(f"checkpoint {path} cannot be read (corrupt or not a torch file): {_reason(e)}") from None


def _unsafe_globals(path: Path, error: Exception) -> list[str]:
    """Globals the file needs that are not allowlisted; read from the pickle opcodes, nothing is executed."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in ALLOWLIST if not isinstance(g, tuple)}
    allowed |= {name for g in ALLOWLIST if isinstance(g, tuple) for name in g[1:]}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) format: the unpickler's own message names the refused global
        found = re.findall(r"GLOBAL ([\w.]+)", str(error))
    return [g for g in dict.fromkeys(found) if g not in allowed]


def _reason(e: BaseException) -> str:
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [s.strip() for s in text.strip().splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else '(no message)'}"


# ---------------------------------------------------------------------------------------------- layouts

State = dict[str, Tensor]


@dataclass(frozen=True)
class Layout:
    """How one project stores an encoder.

    detect(obj, fmt) -> bool, fmt "pickle" | "safetensors"; extract(obj, teacher) -> the trunk's state dict with
    torchvision/timm key names (head keys such as `fc.`/`head.` may be left in: they are reported as ignored).
    """

    detect: Callable[[Any, str], bool]
    extract: Callable[[Any, bool], State]
    description: str
    mean: tuple[float, ...] | None = IMAGENET_MEAN  # input normalisation the weights expect; None = unknown
    std: tuple[float, ...] | None = IMAGENET_STD
    has_student: bool = False  # offers a teacher/student choice
    needs_sidecar: bool = False  # must come with a verified `<file>.sha256`


LAYOUTS: Registry[Layout] = Registry("checkpoint layout")


def _tensors(obj: Any) -> State | None:
    """`obj` as a non-empty str -> Tensor dict (non-tensor entries dropped), or None."""
    if not isinstance(obj, dict):
        return None
    out = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    return out or None


def _nested(obj: Any, *keys: str) -> State | None:
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return None
        obj = obj[k]
    return _tensors(obj)


def _is_resnet(sd: State | None) -> bool:
    return sd is not None and "conv1.weight" in sd and "layer1.0.conv1.weight" in sd


def _is_vit(sd: State | None) -> bool:
    return sd is not None and "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd


def _with_prefix(sd: State | None, *prefixes: str) -> str | None:
    """The first prefix some key of `sd` starts with."""
    return next((p for p in prefixes if sd and any(k.startswith(p) for k in sd)), None)


def _strip(sd: State, prefix: str, keep: tuple[str, ...] = ()) -> State:
    """Keys under `prefix` without it, plus keys starting with one of `keep` unchanged (left-over heads)."""
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out.update({k: v for k, v in sd.items() if k.startswith(keep) and not k.startswith(prefix)} if keep else {})
    return out


def _need(sd: State | None, what: str) -> State:
    if sd is None:
        raise CheckpointFormatError(f"checkpoint has no {what}")
    return sd


def _register(name: str, layout: Layout) -> None:
    LAYOUTS.register(name)(layout)


def _flat(obj: Any, fmt: str, want: str) -> bool:
    sd = _tensors(obj)
    return fmt == want and (_is_resnet(sd) or _is_vit(sd))


_register("torchvision", Layout(
    lambda o, f: f == "pickle" and _is_resnet(_tensors(o)), lambda o, t: _need(_tensors(o), "tensors"),
    "plain torchvision ResNet state dict (`fc.` ignored)"))
_register("timm", Layout(
    lambda o, f: f == "pickle" and _is_vit(_tensors(o)), lambda o, t: _need(_tensors(o), "tensors"),
    "plain timm ViT state dict (`head.` ignored), e.g. DINO's *_pretrain.pth"))
_register("safetensors", Layout(
    lambda o, f: _flat(o, f, "safetensors"), lambda o, t: _need(_tensors(o), "tensors"),
    "flat .safetensors with torchvision or timm names"))


def _moco_state(obj: Any, *prefixes: str) -> str | None:
    return _with_prefix(_nested(obj, "state_dict"), *prefixes)


def _moco_extract(obj: Any, *prefixes: str) -> State:
    sd = _need(_nested(obj, "state_dict"), "'state_dict'")
    prefix = _with_prefix(sd, *prefixes)
    if prefix is None:
        raise CheckpointFormatError(f"'state_dict' has no keys under {' or '.join(prefixes)}")
    return _strip(sd, prefix)


_register("mocov1v2", Layout(
    lambda o, f: _moco_state(o, "module.encoder_q.", "encoder_q.") is not None,
    lambda o, t: _moco_extract(o, "module.encoder_q.", "encoder_q."),
    "MoCo v1/v2 main_moco.py checkpoint: `state_dict` -> `module.encoder_q.` (encoder_k and the queue ignored)"))
_register("mocov3", Layout(
    lambda o, f: _moco_state(o, "module.base_encoder.", "base_encoder.") is not None,
    lambda o, t: _moco_extract(o, "module.base_encoder.", "base_encoder."),
    "MoCo v3 checkpoint: `state_dict` -> `module.base_encoder.` (`fc.`/`head.` = projector; momentum encoder "
    "and predictor ignored)"))


def _dino_detect(obj: Any, fmt: str) -> bool:
    return _with_prefix(_nested(obj, "teacher"), "backbone.", "module.backbone.") is not None


def _dino_extract(obj: Any, teacher: bool) -> State:
    which = "teacher" if teacher else "student"
    sd = _need(_nested(obj, which), f"'{which}' state dict")
    sd = _strip(sd, "module.") if all(k.startswith("module.") for k in sd) else sd
    return _strip(sd, "backbone.", keep=("head.",))


_register("dino", Layout(
    _dino_detect, _dino_extract,
    "DINO training checkpoint: `teacher`/`student` -> `backbone.` (or `module.backbone.`); the teacher by default, "
    "as DINO evaluates it; the DINO head is ignored", has_student=True))


def _vissl_extract(obj: Any, teacher: bool) -> State:
    model = obj["classy_state_dict"]["base_model"]["model"]
    trunk = _need(_tensors(model.get("trunk")), "VISSL trunk")
    out = _strip(trunk, "_feature_blocks.")
    out.update({f"heads.{k}": v for k, v in (_tensors(model.get("heads")) or {}).items()})
    return out


_register("vissl", Layout(
    lambda o, f: _nested(o, "classy_state_dict", "base_model", "model", "trunk") is not None, _vissl_extract,
    "VISSL checkpoint: `classy_state_dict` -> `base_model` -> `model` -> `trunk` with `_feature_blocks.` (ResNets); "
    "`heads` ignored"))

# lightly builds `nn.Sequential(*resnet.children()[:-1])`: children 0-7 are conv1, bn1, relu, maxpool, layer1-4
_LIGHTLY_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def _lightning_extract(obj: Any, teacher: bool) -> State:
    sd = _need(_nested(obj, "state_dict"), "'state_dict'")
    prefix = _with_prefix(sd, "backbone.", "model.backbone.")
    if prefix is None:
        raise CheckpointFormatError("'state_dict' has no keys under backbone. or model.backbone.")
    out = _strip(sd, prefix)
    if "0.weight" in out and "4.0.conv1.weight" in out:  # lightly's Sequential numbering
        out = {_renumber(k): v for k, v in out.items()}
    return out


def _renumber(key: str) -> str:
    head, _, rest = key.partition(".")
    return f"{_LIGHTLY_CHILDREN[head]}.{rest}" if head in _LIGHTLY_CHILDREN else key


_register("lightning", Layout(
    lambda o, f: isinstance(o, dict) and "pytorch-lightning_version" in o
    and _with_prefix(_nested(o, "state_dict"), "backbone.", "model.backbone.") is not None,
    _lightning_extract,
    "PyTorch Lightning .ckpt (solo-learn, lightly): `state_dict` -> `backbone.` (lightly's Sequential indices 0-7 "
    "renamed); projector/momentum/classifier ignored"))
_register("mmselfsup", Layout(
    lambda o, f: isinstance(o, dict) and "meta" in o and _moco_state(o, "backbone.") is not None,
    lambda o, t: _strip(_need(_nested(o, "state_dict"), "'state_dict'"), "backbone.", keep=("neck.", "head.")),
    "MMSelfSup/MMPretrain checkpoint (`meta` + `state_dict` -> `backbone.`); `neck.`/`head.` ignored"))
_register("simclr_converted", Layout(
    lambda o, f: isinstance(o, dict) and set(o) == {"state_dict"} and _is_resnet(_nested(o, "state_dict")),
    lambda o, t: _need(_nested(o, "state_dict"), "'state_dict'"),
    "tonylins/simclr-converter .pth (`state_dict` with torchvision names); expects unnormalised [0, 1] inputs",
    # the converted TF weights take raw [0, 1] pixels: "the original model do not have normalization" (eval.py)
    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
_register("sslbench", Layout(
    lambda o, f: f == "safetensors" and bool(_tensors(o)) and all(k.startswith(("net.", "body.")) for k in o),
    lambda o, t: _strip(_need(_tensors(o), "tensors"), "net.") if "body.0.weight" not in o else _need(_tensors(o), "tensors"),
    "sslbench encoder.safetensors (`net.` or `body.` keys, sha256 sidecar required); normalisation comes from the "
    "pretraining dataset", mean=None, std=None, needs_sidecar=True))


def detect_layout(obj: Any, fmt: str) -> str:
    """The one layout that matches `obj`; raises if none or several do."""
    hits = [name for name in LAYOUTS.names() if LAYOUTS.get(name).detect(obj, fmt)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise CheckpointFormatError(f"checkpoint matches several layouts ({', '.join(hits)}); pass layout= "
                                    f"(--checkpoint-layout) explicitly")
    raise CheckpointFormatError(f"checkpoint matches no known layout ({', '.join(LAYOUTS.names())}): {_describe(obj)}")


def _describe(obj: Any) -> str:
    if not isinstance(obj, dict):
        return f"top level is a {type(obj).__name__}, not a dict"
    keys = list(obj)
    inner = next((v for v in obj.values() if isinstance(v, dict)), None) if _tensors(obj) is None else obj
    shown = f"; first keys inside: {', '.join(map(str, list(inner)[:_SHOW]))}" if inner else ""
    return f"top-level keys: {', '.join(map(str, keys[:8]))}{' ...' if len(keys) > 8 else ''}{shown}"


# ------------------------------------------------------------------------------------- architectures

_RESNETS = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34", (True, (3, 4, 6, 3)): "resnet50",
            (True, (3, 4, 23, 3)): "resnet101", (True, (3, 8, 36, 3)): "resnet152"}
_VITS = {"vit_tiny": (192, 12), "vit_small": (384, 12), "vit_base": (768, 12), "vit_large": (1024, 24)}
_CONVNETS = {"convnet": (16, 32, 64, 128), "convnet_tiny": (8, 16, 32)}
ARCHS = sorted([*_RESNETS.values(), *_VITS, *_CONVNETS])


@dataclass(frozen=True)
class Arch:
    """What to build: the architecture name plus the geometry read from the weights."""

    name: str
    family: str  # "resnet" | "vit" | "convnet"
    in_channels: int = 3
    small_stem: bool = False  # ResNet: 3x3 stride-1 conv1 and no max-pool (CIFAR variant)
    image_size: int = 224  # ViT: the size its position embedding was trained for
    patch: int = 16
    widths: tuple[int, ...] = ()

    @property
    def prefix(self) -> str:
        """Where the torchvision/timm names sit inside our module."""
        return "" if self.family == "convnet" else "net."

    def describe(self) -> str:
        if self.family == "resnet":
            return f"{self.name} ({'3x3 stem, no max-pool' if self.small_stem else '7x7 stem'}, {self.in_channels} channels)"
        if self.family == "vit":
            return f"{self.name} (patch {self.patch}, {self.image_size} px, {self.in_channels} channels)"
        return f"{self.name} (widths {self.widths}, {self.in_channels} channels)"


def _family(name: str) -> str:
    if name in _RESNETS.values():
        return "resnet"
    if name in _VITS:
        return "vit"
    if name in _CONVNETS:
        return "convnet"
    raise ConfigError(f"unknown import architecture {name!r}; known: {', '.join(ARCHS)}")


def infer_arch(sd: State) -> str:
    """The architecture name implied by tensor shapes; raises when it is not one we build."""
    if _is_resnet(sd):
        b1, b2, b3, b4 = (len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5))
        blocks = (b1, b2, b3, b4)
        bottleneck = "layer1.0.conv3.weight" in sd
        if (bottleneck, blocks) in _RESNETS and sd["layer1.0.conv1.weight"].shape[0] == 64:
            return _RESNETS[(bottleneck, blocks)]
        raise CheckpointFormatError(f"ResNet with {'bottleneck' if bottleneck else 'basic'} blocks {blocks} and width "
                                    f"{sd['layer1.0.conv1.weight'].shape[0]} is not a torchvision ResNet we build")
    if _is_vit(sd):
        dim, depth = sd["patch_embed.proj.weight"].shape[0], len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        for name, spec in _VITS.items():
            if spec == (dim, depth):
                return name
        raise CheckpointFormatError(f"ViT with width {dim} and depth {depth} is none of {', '.join(_VITS)}")
    if "body.0.weight" in sd:
        widths = _convnet_widths(sd)
        for name, w in _CONVNETS.items():
            if w == widths:
                return name
        raise CheckpointFormatError(f"ConvNet with widths {widths} is none of {', '.join(_CONVNETS)}")
    raise CheckpointFormatError(f"cannot tell the architecture from keys {', '.join(list(sd)[:_SHOW])}; pass arch=")


def _convnet_widths(sd: State) -> tuple[int, ...]:
    return tuple(int(sd[f"body.{3 * i}.weight"].shape[0]) for i in range(len(sd)) if f"body.{3 * i}.weight" in sd)


def _geometry(name: str, sd: State) -> Arch:
    """`name` plus in-channels, stem, patch and image size read from the weights where present."""
    family = _family(name)
    if family == "resnet" and "conv1.weight" in sd:
        w = sd["conv1.weight"]
        return Arch(name, family, in_channels=int(w.shape[1]), small_stem=w.shape[-1] == 3)
    if family == "vit" and "patch_embed.proj.weight" in sd and "pos_embed" in sd:
        w, tokens = sd["patch_embed.proj.weight"], sd["pos_embed"].shape[1] - (1 if "cls_token" in sd else 0)
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise CheckpointFormatError(f"pos_embed has {tokens} patch tokens, not a square grid")
        return Arch(name, family, in_channels=int(w.shape[1]), image_size=grid * int(w.shape[-1]), patch=int(w.shape[-1]))
    if family == "convnet" and "body.0.weight" in sd:
        return Arch(name, family, in_channels=int(sd["body.0.weight"].shape[1]), widths=_CONVNETS[name])
    return Arch(name, family, widths=_CONVNETS.get(name, ()))


def build(arch: Arch) -> nn.Module:
    """Our backbone for `arch` (benchmark.backbones), randomly initialised."""
    from benchmark.backbones import ConvNet, TimmViT, TorchvisionResNet

    if arch.family == "resnet":
        return TorchvisionResNet(arch.name, arch.in_channels, arch.small_stem)
    if arch.family == "convnet":
        return ConvNet(arch.in_channels, arch.widths)
    module = TimmViT(f"{arch.name}_patch16_224", arch.in_channels, arch.image_size, small_stem=arch.patch == 4)
    if arch.patch not in (4, 16):  # hack: TimmViT knows only 4 and 16 px patches; DINO ships /8 models
        import timm

        module.net = timm.create_model(f"{arch.name}_patch16_224", pretrained=False, num_classes=0, img_size=arch.image_size,
                                       patch_size=arch.patch, in_chans=arch.in_channels, dynamic_img_size=True)
    return module


# ----------------------------------------------------------------------------------------------- import

@dataclass
class ImportReport:
    """What `import_encoder` did; `summary()` is the paragraph the CLI prints."""

    path: str
    layout: str
    arch: str  # e.g. "resnet50 (7x7 stem, 3 channels)"
    sha256: str
    loaded: int  # tensors copied into the encoder
    missing: list[str]  # encoder keys the file lacks (only BatchNorm `num_batches_tracked`, unused in eval)
    ignored: list[str]  # file keys not loaded: heads, projectors, predictors, classifiers
    mean: tuple[float, ...] | None  # input normalisation to use; None = take the dataset's
    std: tuple[float, ...] | None
    dim: int
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ignored = f" ({', '.join(self.ignored[:3])}{', ...' if len(self.ignored) > 3 else ''})" if self.ignored else ""
        norm = (f"normalise inputs with mean {self.mean} / std {self.std}" if self.mean is not None
                else "normalisation not recorded in the file: the dataset's mean/std are used")
        notes = "".join(f" {n}." for n in self.notes)
        return (f"Imported {self.path} (sha256 {self.sha256[:12]}...) as layout '{self.layout}' into {self.arch}, "
                f"{self.dim}-d features: {self.loaded} tensors loaded, {len(self.missing)} missing, "
                f"{len(self.ignored)} head keys ignored{ignored}; {norm}.{notes}")


def import_encoder(path: str | Path, arch: str | None = None, layout: str | None = None, trust: bool = False,
                   teacher: bool = True) -> tuple[nn.Module, ImportReport]:
    """Load someone's checkpoint into our backbone, accounting for every key.

    Args:
        path: the checkpoint file.
        arch: "resnet18" ... "resnet152", "vit_tiny" ... "vit_large", "convnet", "convnet_tiny"; None infers it
            from tensor shapes. Stem, input channels, patch and image size are always read from the weights.
        layout: a name in `LAYOUTS`; None detects it (and refuses to guess between two).
        trust: allow a full pickle load (see `safe_load`).
        teacher: for layouts with a teacher and a student (DINO), load the teacher.

    Returns:
        (module in eval mode mapping normalised (N, C, H, W) images to (N, module.dim), report).
    """
    path = Path(path)
    obj, digest = _load(path, trust)
    fmt = "safetensors" if path.suffix == ".safetensors" else "pickle"
    name = layout if layout is not None else _detect(obj, fmt, path)
    spec = LAYOUTS.get(name)
    if not teacher and not spec.has_student:
        raise ConfigError(f"layout {name!r} has no student/teacher choice; drop teacher=False (--student)")
    if digest is None:
        digest = verify(path) if spec.needs_sidecar else sha256_file(path)  # verify raises: no sidecar to check
    try:
        sd = spec.extract(obj, teacher)
        if not sd:
            raise CheckpointFormatError("no encoder weights found")
    except (KeyError, TypeError, AttributeError, CheckpointFormatError) as e:
        raise CheckpointFormatError(f"checkpoint {path} does not fit layout {name!r} ({spec.description}): {e}") from None
    bad = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointFormatError(f"checkpoint {path}: {len(bad)} tensor(s) hold inf or NaN ({', '.join(bad[:3])}"
                                    f"{', ...' if len(bad) > 3 else ''}); it cannot be evaluated: export it again from a run that did not diverge")
    target = _geometry(arch if arch is not None else _infer(sd, path, name), sd)
    module = build(target)
    loaded, missing, ignored, notes = _load_checked(module, sd, target, path, name)
    if spec.has_student:
        notes.append(f"{'teacher' if teacher else 'student'} weights")
    module.eval()
    report = ImportReport(str(path), name, target.describe(), digest, loaded, missing, ignored, spec.mean, spec.std,
                          int(getattr(module, "dim")), notes)
    log.info("%s", report.summary())
    return module, report


def _detect(obj: Any, fmt: str, path: Path) -> str:
    try:
        return detect_layout(obj, fmt)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"checkpoint {path}: {e}") from None


def _infer(sd: State, path: Path, layout: str) -> str:
    try:
        return infer_arch(sd)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"checkpoint {path} (layout {layout!r}): {e}") from None


def _is_head(key: str) -> bool:
    return key.startswith(HEAD_PREFIXES)


def _load_checked(module: nn.Module, sd: State, arch: Arch, path: Path, layout: str) -> tuple[int, list[str], list[str], list[str]]:
    """Copy `sd` into `module` after checking every key; returns (loaded, missing, ignored, notes)."""
    want = module.state_dict()
    ours = {arch.prefix + k: v for k, v in sd.items()}
    missing = [k for k in want if k not in ours]
    unexpected = [k for k in ours if k not in want]
    ignored = [k for k in unexpected if _is_head(k[len(arch.prefix):])]
    bad_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    bad_extra = [k for k in unexpected if k not in ignored]
    shape = [k for k in ours if k in want and ours[k].shape != want[k].shape]
    if bad_missing or bad_extra or shape:
        raise CheckpointFormatError(_mismatch(path, layout, arch, sd, want, bad_missing, bad_extra, shape))
    notes = []
    cast = {str(v.dtype).removeprefix("torch.") for k, v in ours.items() if k in want and v.dtype != want[k].dtype}
    if cast:
        notes.append(f"tensors cast from {', '.join(sorted(cast))} to the encoder's dtypes")
    if arch.small_stem:
        notes.append("3x3 conv1 read as the CIFAR stem (stride 1, no max-pool)")
    # strict=True after the checks above: the filtered dict must now fit exactly (BatchNorm fills a missing counter)
    module.load_state_dict({k: v for k, v in ours.items() if k in want}, strict=True)
    strip = len(arch.prefix)
    return len(ours) - len(ignored), [k[strip:] for k in missing], [k[strip:] for k in ignored], notes


def _mismatch(path: Path, layout: str, arch: Arch, sd: State, want: dict[str, Tensor], missing: list[str],
              extra: list[str], shape: list[str]) -> str:
    p = len(arch.prefix)

    def show(keys: list[str], fmt: Callable[[str], str]) -> str:
        more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
        return ", ".join(fmt(k) for k in keys[:_SHOW]) + more

    parts = []
    if missing:
        parts.append(f"missing from the file ({len(missing)}): {show(missing, lambda k: f'{k[p:]} {tuple(want[k].shape)}')}")
    if extra:
        parts.append(f"unexpected ({len(extra)}): {show(extra, lambda k: f'{k[p:]} {tuple(sd[k[p:]].shape)}')}")
    if shape:
        parts.append(f"wrong shape ({len(shape)}): "
                     + show(shape, lambda k: f"{k[p:]} file {tuple(sd[k[p:]].shape)} vs model {tuple(want[k].shape)}"))
    try:
        hint = f"; the weights look like {infer_arch(sd)}"
    except CheckpointFormatError:
        hint = ""
    return (f"checkpoint {path} (layout {layout!r}) does not fit {arch.describe()}: {'; '.join(parts)}{hint}. "
            "Refusing a partial load")


# ---------------------------------------------------------------------------------------------- export

def torchvision_state(module: nn.Module) -> State:
    """A ResNet backbone's weights under torchvision names (our `net.` prefix removed, `fc.` dropped)."""
    sd = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if sd and all(k.startswith("net.") for k in sd):
        sd = _strip(sd, "net.")
    if not _is_resnet(sd):
        raise CheckpointFormatError(f"not a torchvision ResNet (keys {', '.join(list(sd)[:_SHOW])}); only ResNets export")
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def export_torchvision(module: nn.Module, path: str | Path) -> str:
    """Write the trunk as a torchvision state dict `.pth` (atomically, with a sha256 sidecar); returns the hash.

    `torchvision.models.resnet50().load_state_dict(torch.load(path), strict=False)` then misses only `fc.*`.
    """
    return save_verified(torchvision_state(module), Path(path))


_D2_LAYER = re.compile(r"^layer([1-4])\.")


def detectron2_name(key: str) -> str:
    """torchvision ResNet key -> Detectron2 name, as MoCo's detection/convert-pretrain-to-detectron2.py renames.

    layerN -> res{N+1}; bnK -> convK.norm; downsample.0/.1 -> shortcut / shortcut.norm; stem keys get `stem.`.
    """
    m = _D2_LAYER.match(key)
    out = f"res{int(m.group(1)) + 1}.{key[m.end():]}" if m else f"stem.{key}"
    out = re.sub(r"(^|\.)bn([1-3])\.", r"\1conv\2.norm.", out)
    return out.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def detectron2_state(module: nn.Module) -> dict[str, np.ndarray]:
    """{Detectron2 name: float32 array} for a ResNet backbone with the standard 7x7 RGB stem.

    BatchNorm `num_batches_tracked` counters are dropped: Detectron2's FrozenBatchNorm2d has no such buffer.
    """
    sd = torchvision_state(module)
    if tuple(sd["conv1.weight"].shape[1:]) != (3, 7, 7):
        raise CheckpointFormatError(f"Detectron2's ResNet stem is a 7x7 RGB conv; this encoder's conv1 is "
                                    f"{tuple(sd['conv1.weight'].shape)}")
    out = {detectron2_name(k): v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    if len(out) != sum(not k.endswith("num_batches_tracked") for k in sd):
        raise AssertionError("detectron2_name mapped two keys to one name")
    return out


def export_detectron2(module: nn.Module, path: str | Path) -> None:
    """Write the Detectron2 `.pkl` MoCo's converter produces: {"model": {name: array}, "__author__",
    "matching_heuristics": True} (atomically). Load it with `MODEL.WEIGHTS path.pkl` in a R50-C4/FPN config."""
    blob = {"model": detectron2_state(module), "__author__": "sslbench", "matching_heuristics": True}

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            pickle.dump(blob, f)

    atomic_save(path, write)
