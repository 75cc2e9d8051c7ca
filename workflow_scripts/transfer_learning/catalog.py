"""torchvision's classification models and their weights, as plain data: no PyTorch.

Snakemake loads the workflow on every start, and so does the Snakemake inside every Slurm
job; importing torchvision there would cost seconds each time. The workflow only needs
names checked, a weights file name and a mean/std, so it reads them from
`torchvision_catalog.json`, written from the installed torchvision by

    python -m transfer_learning.catalog --write     (run in workflow_scripts/)

`tests/test_catalog.py` compares the file with the installed torchvision, so an upgrade
that adds, removes or changes a model or weights fails the tests until it is rewritten.
Everything that needs PyTorch stays in `models`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlparse

from .errors import UserError

CATALOG_FILE = Path(__file__).with_name("torchvision_catalog.json")

# Normalisation of random weights and of a local weights file (the weights carry none).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Weights:
    """One torchvision weights member: what its WeightsEnum knows that the workflow uses."""

    backbone: str
    name: str
    url: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_size: int
    resize_size: int
    min_size: tuple[int, int]

    @property
    def filename(self) -> str:
        """The file torchvision downloads, e.g. mobilenet_v2-7ebf99e0.pth."""
        return url_filename(self.url)


@cache
def load_catalog(path: str | os.PathLike = CATALOG_FILE) -> dict:
    """The catalogue as stored: {"torchvision": version, "models": {backbone: entry}}.

    An entry is {"weights": {name: fields of Weights}, "aliases": {"DEFAULT": name}}, in the
    order of torchvision's WeightsEnum.
    """
    with open(path) as handle:
        return json.load(handle)


def _models() -> dict:
    return load_catalog()["models"]


def backbones() -> list[str]:
    """torchvision's classification models, sorted (`torchvision.models.list_models`)."""
    return sorted(_models())


def check_backbone(name: str) -> None:
    if name not in _models():
        raise UserError(
            f"unknown backbone '{name}' (config key model.backbone); torchvision classification "
            f"models are: {', '.join(backbones())}"
        )


def weights_names(backbone: str) -> list[str]:
    """The backbone's weights names, aliases (DEFAULT) last, as its WeightsEnum lists them."""
    entry = _models()[backbone]
    return [*entry["weights"], *entry["aliases"]]


def resolve_weights(backbone: str, name: str) -> Weights:
    """The weights `name` of `backbone`; DEFAULT resolves to the member it stands for."""
    entry = _models().get(backbone)
    if entry is None:
        raise UserError(f"unknown backbone {backbone!r}; valid backbones: {', '.join(backbones())}")
    real = entry["aliases"].get(name, name)
    if real not in entry["weights"]:
        raise UserError(
            f"unknown weights {name!r} for backbone {backbone!r}; "
            f"valid weights: {', '.join(weights_names(backbone))}"
        )
    fields = entry["weights"][real]
    return Weights(
        backbone=backbone,
        name=real,
        url=fields["url"],
        mean=tuple(fields["mean"]),
        std=tuple(fields["std"]),
        crop_size=fields["crop_size"],
        resize_size=fields["resize_size"],
        min_size=tuple(fields["min_size"]),
    )


def config_weights(backbone: str, name: str) -> Weights:
    """`resolve_weights` for the config's model.backbone and model.weights, naming the keys."""
    try:
        return resolve_weights(backbone, name)
    except UserError as error:
        raise UserError(f"{error} (config keys model.backbone, model.weights)") from None


def url_filename(url: str) -> str:
    """The last part of a url's path, %-decoded: the name the file is served under."""
    return os.path.basename(unquote(urlparse(url).path))


def weights_filename(weights: Weights) -> str:
    """Basename of the weights' download url, e.g. mobilenet_v2-7ebf99e0.pth."""
    return url_filename(weights.url)


def is_weights_path(weights: str | None) -> bool:
    """A local weights file rather than a torchvision weights name."""
    return weights is not None and (weights.endswith((".pth", ".pt")) or os.sep in weights)


def normalisation(backbone: str, weights: str | None, mean=None, std=None):
    """Mean and std the images are normalised with: the config's, else the weights' own."""
    if mean is not None and std is not None:
        return list(mean), list(std)
    if weights is None or is_weights_path(weights):
        return list(mean or IMAGENET_MEAN), list(std or IMAGENET_STD)
    member = config_weights(backbone, weights)
    return list(mean or member.mean), list(std or member.std)


# ---- writing the catalogue from the installed torchvision --------------------------------


def _single(size) -> int:
    """torchvision writes a square size as [224]; the catalogue keeps 224."""
    values = list(size) if isinstance(size, (list, tuple)) else [size]
    if len(values) != 1:
        raise ValueError(f"expected one size, got {size!r}")
    return int(values[0])


def build_catalog() -> dict:
    """The catalogue of the installed torchvision (imports it: seconds)."""
    import torchvision
    from torchvision import models

    # The local part (+cu130, +cpu) names a build, not other models.
    version = torchvision.__version__.split("+")[0]
    catalog: dict = {"torchvision": version, "models": {}}
    for backbone in sorted(models.list_models(module=models)):
        enum = models.get_model_weights(backbone)
        weights, aliases = {}, {}
        for name, member in enum.__members__.items():
            if member.name != name:
                aliases[name] = member.name
                continue
            preprocess = member.transforms()
            weights[name] = {
                "url": member.url,
                "mean": [float(v) for v in preprocess.mean],
                "std": [float(v) for v in preprocess.std],
                "crop_size": _single(preprocess.crop_size),
                "resize_size": _single(preprocess.resize_size),
                "min_size": list(member.meta["min_size"]),
            }
        catalog["models"][backbone] = {"weights": weights, "aliases": aliases}
    return catalog


def catalog_text(catalog: dict) -> str:
    """The catalogue as it is stored: JSON with one line per weights member, so that a
    torchvision upgrade shows as a readable diff."""

    def joined(items: list[str], indent: str) -> str:
        return ",\n".join(f"{indent}{item}" for item in items)

    blocks = []
    for backbone, entry in catalog["models"].items():
        weights = [f"{json.dumps(n)}: {json.dumps(f)}" for n, f in entry["weights"].items()]
        blocks.append(
            f"  {json.dumps(backbone)}: {{\n"
            f'   "weights": {{\n{joined(weights, "    ")}\n   }},\n'
            f'   "aliases": {json.dumps(entry["aliases"])}\n'
            "  }"
        )
    models = ",\n".join(blocks)
    return (
        f'{{\n "torchvision": {json.dumps(catalog["torchvision"])},\n'
        f' "models": {{\n{models}\n }}\n}}\n'
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m transfer_learning.catalog",
        description="Write or check the catalogue of torchvision models and weights.",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help=f"rewrite {CATALOG_FILE.name}")
    group.add_argument(
        "--check", action="store_true", help="exit 1 if it differs from the installed torchvision"
    )
    args = parser.parse_args(argv)
    text = catalog_text(build_catalog())
    if args.write:
        from .io import atomic_path

        with atomic_path(CATALOG_FILE) as tmp:
            tmp.write_text(text)
        print(f"wrote {CATALOG_FILE}")
        return 0
    if CATALOG_FILE.read_text() != text:
        print(f"{CATALOG_FILE} differs from the installed torchvision; rerun with --write")
        return 1
    print(f"{CATALOG_FILE.name} matches the installed torchvision")
    return 0


if __name__ == "__main__":
    sys.exit(main())
