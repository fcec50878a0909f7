"""The curvature behind Figure 1's preconditioners, computed once per stage: the Hessian of the
held-out KL in float64 and its eigendecomposition, HesScale, the Adam moments
(docs/method.md#preconditioners, docs/authors-code.md#hessian-mis-application). The kinds are
listed in :mod:`replication.mlp.estimate`."""

from __future__ import annotations

import copy
import time

import torch

import localvol

__all__ = ["KINDS", "HESSIAN_CHUNK", "needed_curvature", "compute_curvature",
           "build_preconditioner"]

HESSIAN_CHUNK = 512  # Hessian-vector products per vmapped call (memory/speed only)

# kind -> legend name (the keys are the values of estimate_figure1.preconditioners.*.kind)
KINDS = {
    "hessian_paper": "Hessian (paper's Vᵀ only)",
    "hessian": "Hessian V diag(p) Vᵀ",
    "diag_hessian": "diag(H)",
    "hesscale": "HesScale",
    "adam_mu": "Adam μ",
    "adam_nu": "Adam ν",
}


def needed_curvature(kinds: set[str]) -> set[str]:
    """Which curvature quantities a set of preconditioner kinds needs: a subset of
    ``hessian_eigh``, ``hessian_diagonal``, ``hesscale``, ``adam_mu``, ``adam_nu``.

    Raises ValueError for a kind not in :data:`KINDS`."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown preconditioner kind(s) {sorted(unknown)}; known: {list(KINDS)}")
    need = set()
    if kinds & {"hessian", "hessian_paper"}:
        need |= {"hessian_eigh", "hessian_diagonal"}
    if "diag_hessian" in kinds:
        need.add("hessian_diagonal")
    for kind in ("hesscale", "adam_mu", "adam_nu"):
        if kind in kinds:
            need.add(kind)
    return need


def _hessian(model: torch.nn.Module, heldout_images: torch.Tensor, need: set[str], out: dict,
             times: dict, method: str) -> None:
    """H = ∇²KL at the anchor (= the Fisher) on a float64 copy of the model; its diagonal and,
    if needed, ``eigh`` (ascending eigenvalues, eigenvectors as columns)."""
    t0 = time.perf_counter()
    model64 = copy.deepcopy(model).double().eval()
    if method == "fisher":
        H = localvol.kl_hessian(model64, heldout_images.double())  # (N, N), symmetric
    elif method == "hvp":
        kl64 = localvol.ExpectedKL(model64, heldout_images.double())
        anchor64 = torch.nn.utils.parameters_to_vector(model64.parameters()).detach()
        H = localvol.hessian(kl64, anchor64, chunk_size=HESSIAN_CHUNK)  # (N, N), symmetric
    else:
        raise ValueError(f"unknown Hessian method {method!r}; known: hvp, fisher")
    times["hessian_s"] = time.perf_counter() - t0
    out["hessian_diagonal"] = H.diagonal().clone()
    if "hessian_eigh" in need:
        t0 = time.perf_counter()
        eigenvalues, eigenvectors = torch.linalg.eigh(H)  # ascending; columns
        times["eigh_s"] = time.perf_counter() - t0
        out["hessian_eigenvalues"] = eigenvalues
        out["hessian_eigenvectors"] = eigenvectors


def compute_curvature(need: set[str], model: torch.nn.Sequential, heldout_images: torch.Tensor,
                      train_images: torch.Tensor, train_labels: torch.Tensor,
                      optimizer_state: dict, hessian_method: str = "hvp"
                      ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Compute the curvature quantities in ``need`` (see :func:`needed_curvature`).

    The Hessian is that of the held-out KL cost at the anchor (= the Fisher), on a float64 copy
    of the model (images (n_heldout, 64)); its diagonal is the diag(H) spectrum. HesScale is of
    the CE loss on the training images (n_train, 64) with their labels (n_train,) int64, as the
    paper's code did. ``hessian_method``: ``"hvp"`` (:func:`localvol.hessian`, N
    Hessian-vector products, as Figure 1 has always used) or ``"fisher"``
    (:func:`localvol.kl_hessian`: the same matrix up to rounding, faster). Adam moments come from the saved ``optimizer_state`` (raw buffers, no
    bias correction, in ``parameters()`` order).

    Returns (vectors, wall_times): vectors maps ``hessian_diagonal``, ``hessian_eigenvalues``
    (N,), ``hessian_eigenvectors`` (N, N, columns), ``hesscale``, ``adam_mu``, ``adam_nu`` (each
    (N,) float64) to tensors, as needed, in that order; wall_times maps step names to seconds.
    """
    out: dict[str, torch.Tensor] = {}
    times: dict[str, float] = {}
    if need & {"hessian_eigh", "hessian_diagonal"}:
        _hessian(model, heldout_images, need, out, times, hessian_method)
    if "hesscale" in need:
        t0 = time.perf_counter()
        out["hesscale"] = torch.as_tensor(
            localvol.hesscale_diagonal(model, train_images, targets=train_labels)).double()
        times["hesscale_s"] = time.perf_counter() - t0
    for kind, order in (("adam_mu", 1), ("adam_nu", 2)):
        if kind in need:
            out[kind] = torch.as_tensor(
                localvol.adam_moment(model, optimizer_state, order=order)).double()
    return out, times


def build_preconditioner(kind: str, eps: float, exponent: float,
                         curvature: dict[str, torch.Tensor]):
    """The preconditioner of one kind (see :mod:`replication.mlp.estimate`), p = 1/(|s|^exponent
    + eps) at unit determinant (eq. 15-18), from :func:`compute_curvature`'s float64 vectors.

    Raises ValueError for an unknown kind (KeyError if its curvature was not computed)."""
    if kind == "hessian":
        return localvol.MatrixPreconditioner.from_eigh(
            curvature["hessian_eigenvalues"], curvature["hessian_eigenvectors"], eps, exponent)
    if kind == "hessian_paper":
        return localvol.PaperMatrixPreconditioner.from_eigh(
            curvature["hessian_eigenvalues"], curvature["hessian_eigenvectors"], eps, exponent)
    if kind == "diag_hessian":
        return localvol.DiagonalPreconditioner(curvature["hessian_diagonal"], eps, exponent)
    if kind in ("hesscale", "adam_nu"):
        return localvol.DiagonalPreconditioner(curvature[kind], eps, exponent)
    if kind == "adam_mu":
        return localvol.DiagonalPreconditioner(curvature[kind].abs(), eps, exponent)
    raise ValueError(f"unknown preconditioner kind {kind!r}; known: {list(KINDS)}")
