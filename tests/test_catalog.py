"""transfer_learning.catalog: torchvision's models and weights as plain data, so that the
workflow checks names without importing PyTorch. Compared here with the installed
torchvision: an upgrade that changes a model or weights fails until the file is rewritten."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import SCRIPTS
from transfer_learning import catalog
from transfer_learning.errors import UserError

REWRITE = "cd workflow_scripts && python -m transfer_learning.catalog --write"


def test_catalog_matches_the_installed_torchvision():
    import torchvision
    from torchvision import models

    built = catalog.build_catalog()
    stored = catalog.load_catalog()
    assert built["models"] == stored["models"], (
        f"{catalog.CATALOG_FILE.name} is stale for torchvision {torchvision.__version__} "
        f"(written from {stored['torchvision']}); run: {REWRITE}"
    )
    assert catalog.catalog_text(built) == catalog.CATALOG_FILE.read_text(), f"run: {REWRITE}"
    # Spot checks against torchvision's own objects, not only against build_catalog.
    assert catalog.backbones() == sorted(models.list_models(module=models))
    for backbone in ("mobilenet_v2", "resnet50", "efficientnet_b0", "vit_b_16"):
        enum = models.get_model_weights(backbone)
        assert catalog.weights_names(backbone) == list(enum.__members__)
        for name, member in enum.__members__.items():
            entry = catalog.resolve_weights(backbone, name)
            preprocess = member.transforms()
            assert (entry.name, entry.url) == (member.name, member.url)
            assert list(entry.mean) == list(preprocess.mean)
            assert list(entry.std) == list(preprocess.std)
            assert [entry.crop_size] == list(preprocess.crop_size)
            assert [entry.resize_size] == list(preprocess.resize_size)


def test_weights_by_name_and_their_file():
    default = catalog.resolve_weights("mobilenet_v2", "DEFAULT")
    assert default.name == "IMAGENET1K_V2"
    assert default.filename == "mobilenet_v2-7ebf99e0.pth"
    v1 = catalog.resolve_weights("mobilenet_v2", "IMAGENET1K_V1")
    assert catalog.weights_filename(v1) == "mobilenet_v2-b0353104.pth"
    assert catalog.resolve_weights("resnet50", "IMAGENET1K_V2").resize_size == 232
    assert catalog.resolve_weights("vit_h_14", "DEFAULT").crop_size == 518


def test_unknown_names_are_named_with_what_exists():
    with pytest.raises(UserError, match=r"unknown backbone 'mobilenet_v9' \(config key "):
        catalog.check_backbone("mobilenet_v9")
    with pytest.raises(UserError, match="unknown backbone 'nonet'.*mobilenet_v2"):
        catalog.resolve_weights("nonet", "DEFAULT")
    with pytest.raises(
        UserError,
        match=r"unknown weights 'IMAGENET9K' for backbone 'mobilenet_v2'; valid weights: "
        r"IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT \(config keys model.backbone, model.weights\)",
    ):
        catalog.config_weights("mobilenet_v2", "IMAGENET9K")


def test_normalisation_is_the_configs_else_the_weights_own():
    imagenet = (list(catalog.IMAGENET_MEAN), list(catalog.IMAGENET_STD))
    assert catalog.normalisation("mobilenet_v2", "DEFAULT") == imagenet
    assert catalog.normalisation("mobilenet_v2", None) == imagenet
    assert catalog.normalisation("mobilenet_v2", "my/weights.pth") == imagenet
    assert catalog.normalisation("mobilenet_v2", None, [0.5] * 3, [0.2] * 3) == (
        [0.5] * 3,
        [0.2] * 3,
    )
    # One of the two given: the other is the weights' own.
    assert catalog.normalisation("mobilenet_v2", "DEFAULT", mean=[0.5] * 3) == (
        [0.5] * 3,
        imagenet[1],
    )
    assert catalog.normalisation("mobilenet_v2", None, std=[0.3] * 3) == (imagenet[0], [0.3] * 3)


def test_check_command_passes_and_the_module_imports_no_pytorch(capsys):
    assert catalog.main(["--check"]) == 0, capsys.readouterr().out
    code = (
        "import sys; from transfer_learning import catalog; "
        "catalog.normalisation('resnet50', 'DEFAULT'); "
        "sys.exit(bool({'torch', 'torchvision'} & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=SCRIPTS).returncode == 0
