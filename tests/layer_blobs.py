"""Shared by the flattening tests: layer tars written as blobs and squashed by the real pipeline."""

from __future__ import annotations

from pathlib import Path

from gateway.convert import squash_layers
from gateway.flatten import Layer


def write_layers(workdir: Path, layers: tuple[bytes, ...]) -> list[Layer]:
    """Write ``layers`` (bottom first) as ``layer1``, ``layer2``... in ``workdir``."""
    blobs = []
    for number, data in enumerate(layers, 1):
        blob = workdir / f"layer{number}"
        blob.write_bytes(data)
        blobs.append(Layer(str(blob), number))
    return blobs


def squash(workdir: Path, blobs: list[Layer], options: list[str] | None, limit: int) -> Path:
    """Squash ``blobs`` into ``workdir/image.squashfs`` (our flattener feeding tar2sqfs)."""
    output = workdir / "image.squashfs"
    squash_layers(blobs, str(output), options, limit)
    return output
