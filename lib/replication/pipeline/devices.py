"""The compute device of a stage, from its params.yaml ``device`` key (``train_convnext``,
``convnext_estimate``, ``pythia_estimate``): ``"auto"`` (CUDA when available, else the CPU),
``"cuda"`` (required: an error without a GPU) or ``"cpu"``."""

from __future__ import annotations

__all__ = ["DEVICES", "resolve_device"]

DEVICES = ("auto", "cuda", "cpu")


def resolve_device(device: str, key: str):
    """The ``torch.device`` a stage runs on.

    Args:
        device: one of :data:`DEVICES`.
        key: the params.yaml key that set it (e.g. ``"pythia_estimate.device"``), for errors.

    Raises:
        ValueError naming ``key``: ``device`` is not one of :data:`DEVICES`, or is ``"cuda"``
        and PyTorch sees no CUDA device.
    """
    import torch

    if device not in DEVICES:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, DEVICES))}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key} is 'cuda' but PyTorch sees no CUDA device on this machine "
                         f"(torch {torch.__version__}); run on a GPU machine, or set {key}: auto "
                         "(or cpu) in params.yaml")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)
