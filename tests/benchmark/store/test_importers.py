"""Issue 8 / RELIABILITY.md T4-T6: importing other projects' checkpoints, exactly or not at all.

Every layout is written the way its project writes it (nesting, prefixes, heads, momentum copies, DINO's
argparse.Namespace and numpy scalars) around seeded, scrambled torchvision/timm weights, and the imported
encoder must give bit-identical features to the source model.
"""

from __future__ import annotations

import argparse
import copy
import fractions
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import Tensor, nn

from benchmark.backbones import ConvNet, TimmViT, TorchvisionResNet
from benchmark.errors import CheckpointIntegrityError, ConfigError
from benchmark.store.checkpoints import sha256_file
from benchmark.store.importers import (
    LAYOUTS,
    Arch,
    CheckpointFormatError,
    UnsafeCheckpointError,
    _geometry,
    build,
    detectron2_name,
    detectron2_state,
    export_detectron2,
    export_torchvision,
    import_encoder,
    safe_load,
)
from benchmark.store.io import atomic_write_text

REPO = Path(__file__).resolve().parents[3]


def scramble(model: nn.Module, seed: int) -> nn.Module:
    """Move BN/LN affine and running stats, biases and ViT tokens off their constant inits, so that any mis-mapped
    key shows in the features (weights are random already; only these are cheap to move for a second copy)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if t.is_floating_point() and (t.dim() <= 1 or k in ("cls_token", "pos_embed") or k.endswith(".cls_token")):
                t.add_(0.1 * torch.randn(t.shape, generator=g))
                if k.endswith("running_var"):
                    t.abs_().add_(0.5)
    return model.eval()


@pytest.fixture(scope="module")
def r18() -> nn.Module:
    torch.manual_seed(0)
    return scramble(torchvision.models.resnet18(weights=None), 1)


@pytest.fixture(scope="module")
def r18_cifar() -> nn.Module:
    """solo-learn's CIFAR ResNet: 3x3 stride-1 conv1, no max-pool."""
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return scramble(m, 2)


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return scramble(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32), 3)


@pytest.fixture(scope="module")
def x() -> Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))


@torch.no_grad()
def features(model: nn.Module, x: Tensor) -> Tensor:
    """The source model's own pooled features: ResNet before `fc`, ViT's pre-logits CLS token."""
    if hasattr(model, "blocks"):
        out: Tensor = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
        return out
    fc, model.fc = model.fc, nn.Identity()
    try:
        out = model.eval()(x)
    finally:
        model.fc = fc
    return out


def sd_of(model: nn.Module, drop: str = "") -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if not (drop and k.startswith(drop))}


def prefixed(prefix: str, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def other(model: nn.Module, seed: int) -> dict[str, Tensor]:
    """A second copy with different values (a momentum encoder, a student)."""
    return sd_of(scramble(copy.deepcopy(model), seed))


def dino_args() -> argparse.Namespace:
    return argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=65536, momentum_teacher=np.float64(0.996),
                              global_crops_scale=(0.4, 1.0), local_crops_number=np.int64(8), lr=0.0005, seed=0)


# --- writers: each saves a checkpoint the way its project does ---------------------------------------------------

def w_torchvision(d: Path, m: nn.Module) -> Path:
    torch.save(m.state_dict(), d / "resnet18.pth")
    return d / "resnet18.pth"


def w_timm(d: Path, m: nn.Module) -> Path:
    torch.save(m.state_dict(), d / "vit.pth")
    return d / "vit.pth"


def w_mocov2(d: Path, m: nn.Module) -> Path:
    q = copy.deepcopy(m)
    q.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))  # MoCo v2's MLP head in fc
    sd = {**prefixed("module.encoder_q.", sd_of(q)), **prefixed("module.encoder_k.", other(q, 11)),
          "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": sd, "optimizer": {"state": {}, "param_groups": []}},
               d / "checkpoint_0199.pth.tar")
    return d / "checkpoint_0199.pth.tar"


def w_mocov3(d: Path, m: nn.Module) -> Path:
    head = "head." if hasattr(m, "blocks") else "fc."
    base = {k: v for k, v in sd_of(m).items() if not k.startswith(head)}
    base.update({f"{head}0.weight": torch.randn(256, 8), f"{head}1.running_mean": torch.zeros(256)})  # projector MLP
    sd = {**prefixed("module.base_encoder.", base), **prefixed("module.momentum_encoder.", other(m, 12)),
          "module.predictor.0.weight": torch.randn(256, 256)}
    torch.save({"epoch": 100, "arch": "vit_tiny", "state_dict": sd, "optimizer": {}, "scaler": {}}, d / "checkpoint_0099.pth.tar")
    return d / "checkpoint_0099.pth.tar"


def w_dino(d: Path, m: nn.Module) -> Path:
    """DINO main_dino.py: the teacher is not DDP-wrapped for ViTs (`backbone.`), the student is (`module.`)."""
    trunk = {k: v for k, v in sd_of(m).items() if not k.startswith(("head.", "fc."))}  # DINO sets fc/head to Identity
    dino_head = {"head.mlp.0.weight": torch.randn(64, 8), "head.last_layer.weight_g": torch.ones(65536, 1)}
    student = {k: v for k, v in other(m, 13).items() if not k.startswith(("head.", "fc."))}
    teacher_prefix = "backbone." if hasattr(m, "blocks") else "module.backbone."  # ResNets: teacher DDP-wrapped (BN)
    obj = {"student": {**prefixed("module.backbone.", student), **prefixed("module.", dino_head)},
           "teacher": {**prefixed(teacher_prefix, trunk), **(prefixed("module.", dino_head) if "module" in teacher_prefix
                                                               else dino_head)},
           "optimizer": {}, "epoch": np.int64(100), "args": dino_args(), "dino_loss": {"center": torch.zeros(1, 16)}}
    torch.save(obj, d / "checkpoint.pth")
    return d / "checkpoint.pth"


def w_vissl(d: Path, m: nn.Module) -> Path:
    trunk = prefixed("_feature_blocks.", sd_of(m, drop="fc."))
    heads = {"0.clf.0.weight": torch.randn(1000, 512), "0.clf.0.bias": torch.zeros(1000)}
    obj = {"phase_idx": 9, "iteration": 5000, "type": "checkpoint",
           "classy_state_dict": {"train": True, "base_model": {"model": {"trunk": trunk, "heads": heads}, "meta": {}},
                                 "optimizer": {}, "loss": {}}}
    torch.save(obj, d / "model_final_checkpoint_phase9.torch")
    return d / "model_final_checkpoint_phase9.torch"


def lightning(sd: dict[str, Tensor]) -> dict[str, Any]:
    return {"epoch": 9, "global_step": 100, "pytorch-lightning_version": "2.1.0", "state_dict": sd,
            "optimizer_states": [], "lr_schedulers": [], "hyper_parameters": {"method": "byol"}}


def w_sololearn(d: Path, m: nn.Module) -> Path:
    sd = {**prefixed("backbone.", sd_of(m, drop="fc.")), **prefixed("momentum_backbone.", other(m, 14)),
          "projector.0.weight": torch.randn(64, 512), "predictor.0.weight": torch.randn(64, 64),
          "classifier.weight": torch.randn(10, 512), "classifier.bias": torch.zeros(10)}
    torch.save(lightning(sd), d / "byol-cifar.ckpt")
    return d / "byol-cifar.ckpt"


def w_lightly(d: Path, m: nn.Module) -> Path:
    backbone = nn.Sequential(*list(copy.deepcopy(m).children())[:-1])  # lightly's examples: resnet minus fc
    sd = {**prefixed("backbone.", sd_of(backbone)), "projection_head.layers.0.weight": torch.randn(64, 512)}
    torch.save(lightning(sd), d / "lightly.ckpt")
    return d / "lightly.ckpt"


def w_lightning_model(d: Path, m: nn.Module) -> Path:
    torch.save(lightning(prefixed("model.backbone.", sd_of(m, drop="fc."))), d / "model.ckpt")
    return d / "model.ckpt"


def w_mmselfsup(d: Path, m: nn.Module) -> Path:
    sd = {**prefixed("backbone.", sd_of(m, drop="fc.")), "neck.mlp.0.weight": torch.randn(64, 512),
          "head.predictor.mlp.0.weight": torch.randn(64, 64)}
    torch.save({"meta": {"epoch": 200, "iter": 10, "mmselfsup_version": "0.11.0"}, "state_dict": sd, "optimizer": {}},
               d / "epoch_200.pth")
    return d / "epoch_200.pth"


def w_simclr(d: Path, m: nn.Module) -> Path:
    torch.save({"state_dict": m.state_dict()}, d / "resnet50-1x.pth")
    return d / "resnet50-1x.pth"


def w_safetensors(d: Path, m: nn.Module) -> Path:
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "model.safetensors"))
    return d / "model.safetensors"


# (writer, source fixture, layout, arch, ignored-key prefixes)
CASES: dict[str, tuple[Callable[[Path, nn.Module], Path], str, str, str, tuple[str, ...]]] = {
    "torchvision": (w_torchvision, "r18", "torchvision", "resnet18", ("fc.",)),
    "timm": (w_timm, "vit", "timm", "vit_tiny", ("head.",)),
    "mocov2": (w_mocov2, "r18", "mocov1v2", "resnet18", ("fc.",)),
    "mocov3_resnet": (w_mocov3, "r18", "mocov3", "resnet18", ("fc.",)),
    "mocov3_vit": (w_mocov3, "vit", "mocov3", "vit_tiny", ("head.",)),
    "dino_resnet": (w_dino, "r18", "dino", "resnet18", ("head.",)),
    "dino_vit": (w_dino, "vit", "dino", "vit_tiny", ("head.",)),
    "vissl": (w_vissl, "r18", "vissl", "resnet18", ("heads.",)),
    "sololearn_cifar": (w_sololearn, "r18_cifar", "lightning", "resnet18", ()),
    "lightly": (w_lightly, "r18", "lightning", "resnet18", ()),
    "lightning_model_backbone": (w_lightning_model, "r18", "lightning", "resnet18", ()),
    "mmselfsup": (w_mmselfsup, "r18", "mmselfsup", "resnet18", ("neck.", "head.")),
    "simclr_converted": (w_simclr, "r18", "simclr_converted", "resnet18", ("fc.",)),
    "safetensors_resnet": (w_safetensors, "r18", "safetensors", "resnet18", ("fc.",)),
    "safetensors_vit": (w_safetensors, "vit", "safetensors", "vit_tiny", ("head.",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_layout_imports_bit_identical(case: str, tmp_path: Path, request: pytest.FixtureRequest, x: Tensor) -> None:
    write, source, layout, arch, heads = CASES[case]
    model = request.getfixturevalue(source)
    path = write(tmp_path, model)
    module, rep = import_encoder(path)
    assert (rep.layout, rep.arch.split()[0], rep.missing) == (layout, arch, [])
    with torch.no_grad():
        assert torch.equal(module(x), features(model, x))
    assert all(k.startswith(heads) for k in rep.ignored) and (bool(rep.ignored) == bool(heads))
    assert rep.loaded == len({k for k in model.state_dict() if not k.startswith(("fc.", "head."))})
    assert rep.sha256 == sha256_file(path) and str(path) in rep.summary() and layout in rep.summary()
    if layout == "simclr_converted":  # the converted TF weights take raw [0, 1] pixels
        assert (rep.mean, rep.std) == ((0.0,) * 3, (1.0,) * 3)
    else:
        assert rep.mean == (0.485, 0.456, 0.406)
    if case in ("mocov2", "dino_resnet", "sololearn_cifar"):  # naming layout and architecture gives the same encoder
        again, _ = import_encoder(path, arch=arch, layout=layout)
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), module.state_dict().values()))


def test_every_registered_layout_is_exercised() -> None:
    assert {c[2] for c in CASES.values()} | {"sslbench"} == set(LAYOUTS.names())


def test_explicit_vit_arch_reads_patch_and_size_from_the_weights(vit: nn.Module) -> None:
    sd = {k: v for k, v in vit.state_dict().items()}
    assert _geometry("vit_tiny", sd) == Arch("vit_tiny", "vit", in_channels=3, image_size=32, patch=16)
    sd["patch_embed.proj.weight"] = torch.zeros(192, 3, 8, 8)  # DINO ViT-S/8-like: 16 tokens of 8 px -> 32 px
    sd["pos_embed"] = torch.zeros(1, 17, 192)
    assert _geometry("vit_tiny", sd) == Arch("vit_tiny", "vit", in_channels=3, image_size=32, patch=8)
    assert build(_geometry("vit_tiny", sd)).net.patch_embed.proj.kernel_size == (8, 8)  # type: ignore[union-attr]


def test_cifar_stem_is_read_from_the_weights(tmp_path: Path, r18_cifar: nn.Module) -> None:
    _, rep = import_encoder(w_sololearn(tmp_path, r18_cifar))
    assert "3x3 stem" in rep.arch and any("CIFAR stem" in n for n in rep.notes)


def test_dino_teacher_by_default_student_on_request(tmp_path: Path, vit: nn.Module, x: Tensor) -> None:
    path = w_dino(tmp_path, vit)
    teacher, rep = import_encoder(path)
    student, rep_s = import_encoder(path, teacher=False)
    ref_student = scramble(copy.deepcopy(vit), 13)
    with torch.no_grad():
        assert torch.equal(teacher(x), features(vit, x))
        assert torch.equal(student(x), features(ref_student, x)) and not torch.equal(student(x), teacher(x))
    assert "teacher weights" in rep.notes and "student weights" in rep_s.notes


def test_teacher_choice_refused_where_there_is_none(tmp_path: Path, r18: nn.Module) -> None:
    with pytest.raises(ConfigError, match="mocov1v2.*no student"):
        import_encoder(w_mocov2(tmp_path, r18), teacher=False)


# --- our own files ----------------------------------------------------------------------------------------------

def save_encoder(module: nn.Module, path: Path) -> Path:
    """What benchmark.run.runner writes after pretraining: state_dict as safetensors plus a sha256 sidecar."""
    from benchmark.run.runner import _save_encoder

    _save_encoder(module, path)
    return path


@pytest.mark.parametrize("arch", ["resnet18", "convnet", "vit_tiny"])
def test_sslbench_encoder_roundtrip(arch: str, tmp_path: Path, x: Tensor) -> None:
    torch.manual_seed(5)
    module: nn.Module
    if arch == "resnet18":
        module = TorchvisionResNet("resnet18", 3, small_stem=True)
    elif arch == "convnet":
        module = ConvNet(1)
    else:
        module = TimmViT("vit_tiny_patch16_224", 3, 32, small_stem=True)
    scramble(module, 6)
    inp = x[:, :1] if arch == "convnet" else x
    imported, rep = import_encoder(save_encoder(module, tmp_path / "encoder.safetensors"))
    with torch.no_grad():
        assert torch.equal(imported(inp), module(inp))
    assert (rep.layout, rep.arch.split()[0], rep.mean, rep.std) == ("sslbench", arch, None, None)
    assert rep.loaded == len(module.state_dict()) and rep.ignored == []


def test_sslbench_needs_its_sidecar(tmp_path: Path) -> None:
    path = save_encoder(ConvNet(1), tmp_path / "encoder.safetensors")
    path.with_name(path.name + ".sha256").unlink()
    with pytest.raises(CheckpointIntegrityError, match="cannot verify"):
        import_encoder(path)


# --- negatives ----------------------------------------------------------------------------------------------------

def test_resnet50_weights_for_resnet18_name_the_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(CheckpointFormatError, match=r"r50\.pth.*resnet18.*layer1\.0\.conv3\.weight \(256, 64, 1, 1\)"
                       r".*wrong shape.*look like resnet50"):
        import_encoder(tmp_path / "r50.pth", arch="resnet18")


def test_wrong_keys_are_listed_not_skipped(tmp_path: Path, r18: nn.Module) -> None:
    sd = sd_of(r18)
    sd["layer4.1.bn2.gamma"] = sd.pop("layer4.1.bn2.weight")  # a renamed key: one missing, one unexpected
    sd["attnpool.proj.weight"] = torch.zeros(3)  # an unknown extra trunk key is not a head
    torch.save(sd, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointFormatError, match=r"missing from the file \(1\): layer4\.1\.bn2\.weight \(512,\); "
                       r"unexpected \(2\): layer4\.1\.bn2\.gamma \(512,\), attnpool\.proj\.weight \(3,\)"):
        import_encoder(tmp_path / "renamed.pth")


def test_unknown_wrapping_is_refused_with_its_keys(tmp_path: Path, r18: nn.Module) -> None:
    torch.save(prefixed("module.", sd_of(r18)), tmp_path / "dataparallel.pth")  # strict=False would load nothing
    with pytest.raises(CheckpointFormatError, match=r"dataparallel\.pth.*matches no known layout.*module\.conv1\.weight"):
        import_encoder(tmp_path / "dataparallel.pth")


def test_wrong_explicit_layout(tmp_path: Path, r18: nn.Module) -> None:
    path = w_mocov2(tmp_path, r18)
    with pytest.raises(CheckpointFormatError, match="does not fit layout 'dino'"):
        import_encoder(path, layout="dino")
    with pytest.raises(CheckpointFormatError, match="does not fit layout 'mmselfsup'.*no encoder weights"):
        import_encoder(path, layout="mmselfsup")
    with pytest.raises(ConfigError, match="did you mean 'dino'"):
        import_encoder(path, layout="dinno")


def test_ambiguous_layout_asks_for_one(tmp_path: Path, r18: nn.Module, x: Tensor) -> None:
    sd = sd_of(r18)  # someone's merged export: a DINO teacher and a MoCo state dict in one file
    torch.save({"teacher": prefixed("module.backbone.", sd), "state_dict": prefixed("module.encoder_q.", sd)},
               tmp_path / "both.pth")
    with pytest.raises(CheckpointFormatError, match=r"several layouts \(dino, mocov1v2\); pass layout="):
        import_encoder(tmp_path / "both.pth")
    module, rep = import_encoder(tmp_path / "both.pth", layout="mocov1v2")
    with torch.no_grad():
        assert rep.layout == "mocov1v2" and torch.equal(module(x), features(r18, x))


def test_missing_file_is_an_error_never_a_random_init(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError, match=r"nope\.pth does not exist.*randomly initialised"):
        import_encoder(tmp_path / "nope.pth", arch="resnet18")


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError, match="is a directory"):
        safe_load(tmp_path)


class Evil:
    """Unpickling this runs `touch <sentinel>`."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, r18: nn.Module, zipped: bool) -> None:
    sentinel = tmp_path / "pwned"
    torch.save({"state_dict": sd_of(r18), "x": Evil(sentinel)}, tmp_path / "evil.pth", _use_new_zipfile_serialization=zipped)
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pth needs globals.*posix\.system.*--trust-checkpoint"):
        import_encoder(tmp_path / "evil.pth")
    assert not sentinel.exists()


def test_trust_opts_in_to_other_globals(tmp_path: Path, r18: nn.Module) -> None:
    torch.save({**sd_of(r18), "note": fractions.Fraction(1, 3)}, tmp_path / "frac.pth")  # harmless, not allowlisted
    with pytest.raises(UnsafeCheckpointError, match=r"fractions\.Fraction"):
        safe_load(tmp_path / "frac.pth")
    assert safe_load(tmp_path / "frac.pth", trust=True)["note"] == fractions.Fraction(1, 3)


def test_dino_namespace_and_numpy_scalars_load_via_allowlist(tmp_path: Path) -> None:
    torch.save({"args": dino_args(), "epoch": np.int64(3), "best": np.float32(0.5), "flag": np.bool_(True)}, tmp_path / "a.pth")
    obj = safe_load(tmp_path / "a.pth")
    assert obj["args"].momentum_teacher == 0.996 and obj["epoch"] == 3 and obj["best"] == 0.5
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "a.pth")  # i.e. only the allowlist let it in
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "a.pth", weights_only=True)


def test_numpy1_scalar_name_is_allowlisted(tmp_path: Path) -> None:
    """Checkpoints written under numpy 1.x name the scalar constructor numpy.core.multiarray.scalar."""
    scalar = np.float64(2.5).__reduce__()[0]
    old = scalar.__module__
    try:
        scalar.__module__ = "numpy.core.multiarray"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy.core is deprecated in numpy 2
            torch.save({"best_acc": np.float64(2.5)}, tmp_path / "np1.pth")
    finally:
        scalar.__module__ = old
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "np1.pth")
    assert safe_load(tmp_path / "np1.pth")["best_acc"] == 2.5


def test_legacy_torch_format_loads(tmp_path: Path) -> None:
    w, args = torch.randn(3, 4), dino_args()
    torch.save({"w": w, "args": args}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)  # torch < 1.6 files
    obj = safe_load(tmp_path / "old.pth")
    assert torch.equal(obj["w"], w) and obj["args"] == args


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(min(len(data), 1 << 16)),
                      "bitflip": data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:]}[how])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("how", ["truncate", "empty", "garbage"])
def test_corrupt_file_names_the_file(tmp_path: Path, how: str, suffix: str) -> None:
    small = torchvision.models.resnet18(weights=None).layer1  # content is irrelevant: reading fails first
    path = w_torchvision(tmp_path, small) if suffix == ".pth" else w_safetensors(tmp_path, small)
    corrupt(path, how)
    with pytest.raises(CheckpointFormatError, match=rf"{re.escape(path.name)} (is empty|cannot be|is not a valid)"):
        import_encoder(path)


@pytest.mark.parametrize("how", ["bitflip", "truncate"])
def test_sidecar_catches_what_torch_load_misses(tmp_path: Path, how: str) -> None:
    path = w_torchvision(tmp_path, torchvision.models.resnet18(weights=None).layer1)
    atomic_write_text(path.with_name(path.name + ".sha256"), f"{sha256_file(path)}  {path.name}\n")
    corrupt(path, how)
    with pytest.raises(CheckpointIntegrityError, match=rf"{path.name} is corrupt: sha256 .* expected"):
        import_encoder(path)


def test_weights_only_false_lives_only_in_the_trusted_loader() -> None:
    files = [p for d in REPO.iterdir() if d.is_dir() and not d.name.startswith(".") for p in d.rglob("*.py")]
    files += list(REPO.glob("*.py"))
    hits = [(p, i) for p in files if p != Path(__file__).resolve()
            for i, line in enumerate(p.read_text().splitlines(), 1) if "weights_only=False" in line]
    assert [p.name for p, _ in hits] == ["importers.py"], hits
    src = (REPO / "benchmark" / "store" / "importers.py").read_text().splitlines()
    (_, line), = hits
    enclosing = next(s for s in reversed(src[:line]) if s.startswith("def "))
    assert enclosing.startswith("def _load_trusted(")


# --- exports -------------------------------------------------------------------------------------------------------

def test_export_torchvision_loads_into_torchvision(tmp_path: Path) -> None:
    torch.manual_seed(7)
    ours_r50 = scramble(TorchvisionResNet("resnet50", 3, small_stem=False), 8)
    export_torchvision(ours_r50, tmp_path / "r50_tv.pth")
    tv = torchvision.models.resnet50(weights=None)
    keys = tv.load_state_dict(torch.load(tmp_path / "r50_tv.pth", weights_only=True), strict=False)
    assert (sorted(keys.missing_keys), keys.unexpected_keys) == (["fc.bias", "fc.weight"], [])
    assert torch.equal(tv.layer4[2].bn3.running_var, ours_r50.net.layer4[2].bn3.running_var)  # type: ignore[union-attr, index]


def test_export_torchvision_roundtrip(tmp_path: Path, x: Tensor) -> None:
    torch.manual_seed(9)
    ours = scramble(TorchvisionResNet("resnet18", 3, small_stem=True), 10)
    digest = export_torchvision(ours, tmp_path / "r18.pth")
    module, rep = import_encoder(tmp_path / "r18.pth")  # back in, through its sidecar
    assert (rep.layout, rep.sha256, rep.ignored) == ("torchvision", digest, []) and "3x3 stem" in rep.arch
    with torch.no_grad():
        assert torch.equal(module(x), ours(x))


def test_detectron2_names_by_hand() -> None:
    assert detectron2_name("conv1.weight") == "stem.conv1.weight"
    assert detectron2_name("bn1.running_mean") == "stem.conv1.norm.running_mean"
    assert detectron2_name("layer1.0.conv1.weight") == "res2.0.conv1.weight"
    assert detectron2_name("layer1.2.bn3.bias") == "res2.2.conv3.norm.bias"
    assert detectron2_name("layer3.0.downsample.0.weight") == "res4.0.shortcut.weight"
    assert detectron2_name("layer4.0.downsample.1.running_var") == "res5.0.shortcut.norm.running_var"
    assert detectron2_name("layer4.1.bn2.weight") == "res5.1.conv2.norm.weight"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_detectron2_mapping_covers_every_key_once(arch: str) -> None:
    torch.manual_seed(0)
    module = TorchvisionResNet(arch, 3, small_stem=False)
    d2 = detectron2_state(module)
    trunk = [k for k in module.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(d2) == len(trunk) == len({detectron2_name(k.removeprefix("net.")) for k in trunk})
    allowed = re.compile(r"^(stem\.conv1(\.norm)?|res[2-5]\.\d+\.(conv[1-3](\.norm)?|shortcut(\.norm)?))"
                         r"\.(weight|bias|running_mean|running_var)$")
    assert all(allowed.match(k) for k in d2), [k for k in d2 if not allowed.match(k)]
    assert np.array_equal(d2["res5.1.conv2.norm.running_mean"], module.net.layer4[1].bn2.running_mean.numpy())


def test_export_detectron2_pickle(tmp_path: Path) -> None:
    torch.manual_seed(9)
    ours = scramble(TorchvisionResNet("resnet18", 3, small_stem=False), 10)
    export_detectron2(ours, tmp_path / "r18.pkl")
    with open(tmp_path / "r18.pkl", "rb") as f:
        blob = pickle.load(f)
    assert blob["__author__"] == "sslbench" and blob["matching_heuristics"] is True
    assert len(blob["model"]) == 100 and blob["model"]["stem.conv1.weight"].shape == (64, 3, 7, 7)  # R18: 20 conv + 20x4 BN
    bn = ours.net.layer3[0].downsample[1]  # type: ignore[union-attr, index]
    assert np.array_equal(blob["model"]["res4.0.shortcut.norm.running_var"], bn.running_var.numpy())
    with pytest.raises(CheckpointFormatError, match="7x7"):
        export_detectron2(TorchvisionResNet("resnet18", 3, small_stem=True), tmp_path / "cifar.pkl")


def test_a_trusted_file_is_unpickled_once_and_its_globals_are_named(tmp_path: Path, r18: nn.Module,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Issue 18.13: a trusted pickle (which may run code) was unpickled at planning, at import and at evaluation."""
    from benchmark.store import importers

    torch.save({**sd_of(r18), "note": fractions.Fraction(1, 3)}, tmp_path / "frac.pth")
    calls: list[Path] = []
    real = importers._load_trusted
    monkeypatch.setattr(importers, "_load_trusted", lambda p: calls.append(p) or real(p))
    with caplog.at_level("WARNING"):
        for _ in range(3):
            module, _ = import_encoder(tmp_path / "frac.pth", trust=True)
    assert len(calls) == 1 and "it imports fractions.Fraction" in caplog.text
    torch.save({**sd_of(r18), "note": fractions.Fraction(2, 3)}, tmp_path / "frac.pth")  # a changed file is read again
    import_encoder(tmp_path / "frac.pth", trust=True)
    assert len(calls) == 2
