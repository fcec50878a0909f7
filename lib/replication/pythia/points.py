"""What the Pythia estimate stages share (params.yaml section ``pythia_estimate``): the cost,
anchor and Adam ν of a checkpoint as a :class:`replication.sweep.Point`
(docs/experiments.md#pythia, docs/authors-code.md#script-slips,
docs/authors-code.md#prior-dominated-interpretation).

Cost: mean KL from the checkpoint over the REAL tokens of the evaluation text (padding
masked; the count is reported, docs/authors-code.md#script-slips), float32, on the GPU when
there is one. Prior: Gaussian N(0, σ²I) with σ = RMS of the step-0 parameters (computed; the
paper's 0.03998 for Pythia-31M). Preconditioners: ``"adam"`` (ν from ``adam_source``) and, where asked,
``"sqgrad"`` (the squared-gradient EMA, to compare with the true ν), each p ∝ 1/(ν^exponent + ε)
(paper eq. 15-18). Every loaded checkpoint is checked against the parameter hash the fetch
stage recorded.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import localvol
from replication.pipeline.devices import resolve_device
from replication.pythia.checkpoints import (check_manifest_hashes, check_steps, flat_parameters,
                                            load_checkpoint, read_manifest, verified_hash)
from replication.pythia.data import eval_texts, load_tokenizer, tokenize_eval, training_like_stream
from replication.pythia.moments import optimizer_state_nu, squared_gradient_nu
from replication.sweep import Point, check_counts

__all__ = ["ADAM_SOURCES", "EstimateSettings", "Setup", "prepare", "adam_label", "CheckpointPoints"]

ADAM_SOURCES = ("optimizer_state", "squared_gradients")
PATHS = ("checkpoints_dir", "estimates_path", "samples_path", "progress_dir", "metrics_path")


@dataclass(frozen=True)
class EstimateSettings:
    """The ``pythia_estimate`` keys (shared by estimate_figure2/4/6) and a stage's paths.

    checkpoints_dir: the fetch stage's folder. estimates_path, samples_path, metrics_path:
    outputs (:func:`replication.sweep.write_sweep`). progress_dir: resumable progress files.
    eval_source: ``"local"`` (held-out pydoc topics) or a JSONL path. n_eval_docs,
    max_eval_tokens: evaluation documents and their truncation (tokens). data_batch_size:
    documents per forward pass. direction_batch_size: directions per cost call. rtol, seed:
    the estimator's. exponent: of the Adam preconditioner. adam_source: one of
    :data:`ADAM_SOURCES`. raw_checkpoint_dir: GPT-NeoX/DeepSpeed ``global_step{N}/`` folders or
    "". sqgrad_*: the squared-gradient EMA (batches, sequences per batch, tokens, β2).
    device: "auto", "cuda" or "cpu" (:func:`replication.pipeline.devices.resolve_device`;
    the resolved device is what the JSON records). progress: print progress. Raises ValueError
    naming the ``pythia_estimate`` key of a bad value.
    """

    checkpoints_dir: str
    estimates_path: str
    samples_path: str
    progress_dir: str
    metrics_path: str
    eval_source: str
    n_eval_docs: int
    max_eval_tokens: int
    data_batch_size: int
    direction_batch_size: int
    rtol: float
    seed: int
    exponent: float
    adam_source: str
    raw_checkpoint_dir: str
    sqgrad_batches: int
    sqgrad_batch_size: int
    sqgrad_seq_len: int
    sqgrad_beta2: float
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.adam_source not in ADAM_SOURCES:
            raise ValueError(f"pythia_estimate.adam_source must be 'optimizer_state' or "
                             f"'squared_gradients', got {self.adam_source!r}")
        check_counts(**{f"pythia_estimate.{name}": getattr(self, name) for name in (
            "n_eval_docs", "max_eval_tokens", "data_batch_size", "direction_batch_size",
            "sqgrad_batches", "sqgrad_batch_size", "sqgrad_seq_len")})
        if not 0 <= self.sqgrad_beta2 < 1:
            raise ValueError(f"pythia_estimate.sqgrad_beta2 must be in [0, 1), got "
                             f"{self.sqgrad_beta2}")

    def config(self) -> dict[str, Any]:
        """The settings that shape the numbers (no paths, no progress flag), for the JSON; the
        device is recorded resolved, by :meth:`Setup.config`."""
        return {k: v for k, v in asdict(self).items()
                if k not in PATHS and k not in ("progress", "device")}


def adam_label(adam_source: str) -> str:
    """Legend label of the Adam ν series."""
    return "Adam ν" if adam_source == "optimizer_state" else "Adam ν (squared-gradient EMA)"


@dataclass
class Setup:
    """A stage's loaded context: the manifest, its steps, the tokenizer, the evaluation tokens
    (:func:`replication.pythia.data.tokenize_eval`), σ (std, parameter units) and its prior,
    the device, and (built on first use) the training-like stream of the squared gradients."""

    settings: EstimateSettings
    manifest: dict
    steps: list[int]
    tokenizer: Any
    eval_tokens: dict
    sigma: float
    prior: localvol.GaussianPrior
    device: torch.device
    _stream: torch.Tensor | None = field(default=None, repr=False)

    @property
    def salt(self) -> tuple:
        """What else the cost depends on (keys the progress files)."""
        s = self.settings
        return (s.eval_source, s.n_eval_docs, s.max_eval_tokens, str(self.device))

    def config(self, **figure: Any) -> dict[str, Any]:
        """The estimates JSON's config: source, steps, n_params, σ, the shared settings, the
        figure's own settings, dtype and device."""
        return {"source": self.manifest["source"], "steps": self.steps,
                "n_params": self.manifest["n_params"], "sigma": self.sigma,
                **self.settings.config(), **figure, "dtype": "float32", "device": str(self.device)}

    def eval_token_counts(self) -> dict[str, Any]:
        """{"shape": [n, T], "n_real_tokens", "n_padding_tokens"} of the evaluation text."""
        ev = self.eval_tokens
        return {"shape": list(ev["input_ids"].shape), "n_real_tokens": ev["n_real_tokens"],
                "n_padding_tokens": ev["n_padding_tokens"]}

    def squared_gradient_nu(self, model) -> torch.Tensor:
        """(N,) float32 squared-gradient EMA ν of ``model`` (:mod:`.moments`)."""
        s = self.settings
        if self._stream is None:
            self._stream = training_like_stream(
                self.tokenizer, self.manifest, eval_source=s.eval_source,
                n_eval_docs=s.n_eval_docs, n_docs=s.sqgrad_batches * s.sqgrad_batch_size)
        return squared_gradient_nu(model, self._stream, seed=s.seed, batches=s.sqgrad_batches,
                                   batch_size=s.sqgrad_batch_size, seq_len=s.sqgrad_seq_len,
                                   beta2=s.sqgrad_beta2)

    def adam_nu(self, model, state, step: int) -> torch.Tensor:
        """(N,) float32 Adam ν of a checkpoint from ``adam_source``, on the device."""
        if self.settings.adam_source == "optimizer_state":
            nu = optimizer_state_nu(model, state, step, self.settings.raw_checkpoint_dir)
        else:
            nu = self.squared_gradient_nu(model)
        return nu.to(self.device)


def prepare(settings: EstimateSettings) -> Setup:
    """Read the manifest (steps, recorded hashes, duplicate steps), tokenise the evaluation
    text, and compute σ = RMS of the step-0 parameters (float64). Raises ValueError as
    :func:`replication.pipeline.devices.resolve_device` (first, naming
    ``pythia_estimate.device``), :func:`.checkpoints.check_steps`,
    :func:`.checkpoints.check_manifest_hashes`, :func:`.checkpoints.verified_hash` and
    :func:`.data.eval_texts`."""
    device = resolve_device(settings.device, "pythia_estimate.device")
    manifest = read_manifest(settings.checkpoints_dir)
    steps = check_steps(manifest["steps"])
    check_manifest_hashes(manifest, steps)
    tokenizer = load_tokenizer(Path(settings.checkpoints_dir) / "tokenizer")
    ev = tokenize_eval(tokenizer, eval_texts(settings.eval_source, settings.n_eval_docs, manifest),
                       settings.max_eval_tokens)
    model0, _ = load_checkpoint(settings.checkpoints_dir, 0)
    verified_hash(model0, 0, manifest)
    sigma = float(flat_parameters(model0).double().pow(2).mean().sqrt())
    return Setup(settings, manifest, steps, tokenizer, ev, sigma, localvol.GaussianPrior(sigma),
                 device)


class CheckpointPoints:
    """The ``load`` of :func:`replication.sweep.run_sweep`: checkpoint id ``"step{N}"`` →
    :class:`Point` (anchor (N,) float32, the KL cost, preconditioners ``"adam"`` and, at the
    steps in ``squared_gradients_at``, ``"sqgrad"``; info: step and anchor RMS). Keeps the ν
    vectors of those steps only (for the comparison; a ν per step of the paper's 34 would hold
    GBs) in ``nus``, and the squared-gradient wall time in ``timings``."""

    def __init__(self, setup: Setup, *, squared_gradients_at: tuple[int, ...] = ()):
        self.setup = setup
        self.squared_gradients_at = squared_gradients_at
        self.nus: dict[int, dict[str, torch.Tensor]] = {}
        self.timings: dict[str, float] = {}

    def __call__(self, checkpoint: str) -> Point:
        setup, step = self.setup, int(checkpoint.removeprefix("step"))
        model, state = load_checkpoint(setup.settings.checkpoints_dir, step)
        verified_hash(model, step, setup.manifest)
        model.to(setup.device)
        anchor = flat_parameters(model)  # (N,) float32, on the GPU when there is one
        cost = localvol.ExpectedKL(model, setup.eval_tokens["input_ids"],
                                   batch_size=setup.settings.data_batch_size,
                                   attention_mask=setup.eval_tokens["attention_mask"])
        nus = {"adam": setup.adam_nu(model, state, step)}
        if step in self.squared_gradients_at:
            t0 = time.perf_counter()
            nus["sqgrad"] = setup.squared_gradient_nu(model).to(setup.device)
            self.timings["squared_gradient_wall_time_s"] = time.perf_counter() - t0
            self.nus[step] = nus

        def preconditioner(name, eps, exponent, dtype):  # apply() casts to the anchor's dtype
            return localvol.DiagonalPreconditioner(nus[name], eps, exponent)

        return Point(anchor, cost, preconditioner,
                     info={"step": step, "anchor_rms": float(anchor.double().pow(2).mean().sqrt())})
