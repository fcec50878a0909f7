"""Batched cost functions C: (B, N) parameter vectors -> (B,) costs (paper §3.4;
docs/method.md#cost).

Parameter vectors are flat, in ``parameters_to_vector(model.parameters())`` order. Model
costs evaluate several parameter vectors per forward pass with ``torch.func.functional_call``
under ``torch.func.vmap`` (falling back to one vector at a time for models that vmap cannot
trace), and split large evaluation sets into data batches so memory stays bounded.
Costs are plain differentiable functions, so ``torch.func`` can take their Hessian.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
from torch import nn
from torch.func import functional_call, vmap

__all__ = ["ExpectedKL", "CrossEntropyCost", "QuadraticCost"]


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Run the body with every submodule in eval mode (dropout / drop-path off), then put back
    each submodule's own ``training`` flag (a model may mix train and eval submodules)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


class QuadraticCost:
    """C(θ) = ½ (θ − center)ᵀ A (θ − center): a toy cost with closed-form neighbourhoods.

    The region C < c is the ellipsoid of volume V_N (2c)^(N/2) det(A)^(−1/2).

    Args:
        matrix: (N, N) symmetric positive (semi)definite tensor A. center: (N,) tensor.
    """

    def __init__(self, matrix: torch.Tensor, center: torch.Tensor):
        if matrix.ndim != 2 or matrix.shape != (center.numel(), center.numel()):
            raise ValueError(f"matrix must be ({center.numel()}, {center.numel()}), got {tuple(matrix.shape)}")
        self.matrix, self.center = matrix, center

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        x = theta - self.center  # (B, N)
        return 0.5 * ((x @ self.matrix) * x).sum(-1)


class _ModelCost:
    """Shared machinery: unflatten (B, N) vectors into parameter dicts, vmap, data batches."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor, batch_size: int | None, mask=None,
                 vectorize: bool = True):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        named = list(model.named_parameters())
        if not named:
            raise ValueError("model has no parameters")
        for name, p in named:
            if p.dtype in (torch.float16, torch.bfloat16):
                raise ValueError(
                    f"parameter {name} is {p.dtype}: costs are evaluated in float32 or better, "
                    "never in half precision (docs/authors-code.md#numerical-hazards); call "
                    "model.float() first"
                )
        dtypes = {p.dtype for _, p in named}
        devices = {p.device for _, p in named}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"the model's parameters mix dtypes {sorted(map(str, dtypes))} / devices "
                f"{sorted(map(str, devices))}: a flat parameter vector has one dtype and device; "
                "convert the model first (e.g. model.to(device, torch.float32))"
            )
        if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        if mask is not None and mask.shape != inputs.shape[: mask.ndim]:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match inputs {tuple(inputs.shape)}")
        # The model's train/eval mode is left as found: the cost switches to eval mode (dropout /
        # drop-path off, so it is deterministic) only while it evaluates (see _eval_mode).
        self.model = model
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.n_params = sum(self.sizes)
        device, dtype = named[0][1].device, named[0][1].dtype
        self.device, self.dtype = device, dtype
        if len(inputs) == 0:
            raise ValueError("inputs is empty: the cost needs at least one data item")
        # float inputs follow the parameters' dtype (a float64 model gets float64 images)
        self.inputs = inputs.to(device, dtype) if inputs.is_floating_point() else inputs.to(device)
        self.mask = None if mask is None else mask.to(device)
        self.batch_size = len(inputs) if batch_size is None else int(batch_size)
        self._vmap_ok = bool(vectorize)

    def _anchor_logits(self, sl: slice) -> torch.Tensor:
        """Logits of the model at its own parameters on the data batch ``sl``, in eval mode,
        without gradients; their shape is checked (see :meth:`_check_logits`)."""
        anchor = {n: p.detach() for n, p in self.model.named_parameters()}
        mask = None if self.mask is None else self.mask[sl]
        with torch.no_grad(), _eval_mode(self.model):
            try:
                logits = self._logits(anchor, self.inputs[sl], mask)
            except torch.cuda.OutOfMemoryError:
                raise
            except (RuntimeError, IndexError, TypeError) as err:  # e.g. a bare matmul shape error
                expected, matches = _expected_inputs(self.model, self.inputs)
                raise ValueError(
                    f"the model cannot be evaluated on inputs of shape {tuple(self.inputs.shape)} "
                    f"({self.inputs.dtype})" + ("" if matches else f"; it expects inputs {expected}")
                    + f" ({type(err).__name__}: {err})") from err
        self._check_logits(logits, len(self.inputs[sl]), mask)
        return logits

    @staticmethod
    def _check_logits(logits: torch.Tensor, n_items: int, mask) -> None:
        """Logits must be (items, ..., C) with C ≥ 2 classes, (items, T, C) with a mask (items, T).

        Raises:
            ValueError: no class axis, a first axis other than the data batch's, a shape that
                does not match the attention mask, or a single class.
        """
        shape = tuple(logits.shape)
        if logits.ndim < 2:
            raise ValueError(
                f"the model's output has shape {shape} for a data batch of {n_items} items: logits "
                "must be (items, ..., C) with a class axis C (for a scalar output per item, e.g. "
                "a binary classifier's logit z, return torch.stack([-z / 2, z / 2], -1) or the "
                "two-class logits)"
            )
        if shape[0] != n_items:
            raise ValueError(
                f"the model's output has shape {shape} for a data batch of {n_items} items: logits "
                "must be (items, ..., C), one row per data item"
            )
        if mask is not None and shape[:-1] != tuple(mask.shape):
            raise ValueError(
                f"the model's output has shape {shape} but the attention mask is "
                f"{tuple(mask.shape)}: logits must be (items, T, C) with (items, T) the mask's shape"
            )
        if shape[-1] < 2:
            raise ValueError(
                f"the model's output has {shape[-1]} class (shape {shape}): a single-class output "
                "makes the KL identically 0 (softmax over one class is 1), so every radius would "
                "be infinite; use a model with C ≥ 2 output logits (e.g. two-class logits "
                "[−z/2, z/2] for a binary logit z)"
            )

    def _unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, N) -> {name: (B, *shape)}."""
        chunks = torch.split(theta, self.sizes, dim=-1)
        return {n: c.reshape(theta.shape[:-1] + s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def _logits(self, params: dict, x: torch.Tensor, mask) -> torch.Tensor:
        kwargs = {} if mask is None else {"attention_mask": mask}
        out = functional_call(self.model, params, (x,), kwargs)
        out = out.logits if hasattr(out, "logits") else out
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"model must return a logits tensor or an output with .logits, got {type(out).__name__}")
        return out

    def _item_losses(self, logits, sl: slice):  # (..., C) -> (...)
        raise NotImplementedError

    def _batched_logits(self, theta, x, mask):
        """Logits for each row of theta: (B, n_items, ..., C)."""
        params = self._unflatten(theta)
        if self._vmap_ok:
            try:
                with warnings.catch_warnings():
                    # ops without a batching rule (e.g. CPU flash attention) run per direction
                    # inside vmap; torch warns once per layer and call: keep logs readable
                    warnings.filterwarnings("ignore", message="There is a performance drop")
                    return vmap(self._logits, in_dims=(0, None, None))(params, x, mask)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:  # some models cannot be traced by vmap
                warnings.warn(f"vmap over directions failed ({err!r}); evaluating one direction at a time")
                self._vmap_ok = False
        return torch.stack([self._logits({k: v[b] for k, v in params.items()}, x, mask) for b in range(len(theta))])

    def __call__(self, theta: torch.Tensor) -> torch.Tensor:
        """Costs of a (B, N) batch of flat parameter vectors: (B,) float64 tensor (nats).

        The model runs in eval mode during the call; each submodule's train/eval mode is
        restored afterwards.

        Raises:
            ValueError: theta not a (B, N) tensor, or its dtype / device not the model
                parameters' (the cost does not convert theta).
        """
        if not isinstance(theta, torch.Tensor):
            raise ValueError(f"theta must be a (B, {self.n_params}) torch.Tensor, got {type(theta).__name__}")
        if theta.ndim != 2 or theta.shape[1] != self.n_params:
            raise ValueError(f"theta must have shape (B, {self.n_params}), got {tuple(theta.shape)}")
        if theta.dtype != self.dtype:
            convert = {torch.float32: ".float()", torch.float64: ".double()"}
            raise ValueError(
                f"theta is {theta.dtype} but the model's parameters are {self.dtype}: the cost "
                f"does not convert; pass theta as {self.dtype} (e.g. "
                f"anchor{convert.get(self.dtype, f'.to({self.dtype})')}) or build the cost on a "
                f"{theta.dtype} model (e.g. model{convert.get(theta.dtype, f'.to({theta.dtype})')}, "
                "with the anchor taken from it)"
            )
        if theta.device != self.device:
            raise ValueError(
                f"theta is on {theta.device} but the model's parameters are on {self.device}: "
                f"move theta with theta.to('{self.device}') (or the model to {theta.device} before "
                "building the cost)"
            )
        with _eval_mode(self.model):
            return self._cost(theta)

    def _cost(self, theta: torch.Tensor) -> torch.Tensor:
        total = theta.new_zeros(theta.shape[0], dtype=torch.float64)
        weight = 0.0
        for start in range(0, len(self.inputs), self.batch_size):
            sl = slice(start, start + self.batch_size)
            mask = None if self.mask is None else self.mask[sl]
            logits = self._batched_logits(theta, self.inputs[sl], mask)
            losses = self._item_losses(logits, sl)  # (B, items...)
            if mask is None:
                total = total + losses.flatten(1).double().sum(1)
                weight += losses[0].numel()
            else:
                keep = mask.bool()  # where(), not a product: NaN logits at padding must not leak
                total = total + torch.where(keep, losses, 0.0).flatten(1).double().sum(1)
                weight += float(keep.sum())
        if weight == 0:
            raise ValueError("the evaluation set has no items (all tokens masked?)")
        return total / weight


def _expected_inputs(model: nn.Module, inputs: torch.Tensor) -> tuple[str, bool | None]:
    """The shape the model's first parametrised layer expects of ``inputs``, in words, and
    whether ``inputs`` has it (None: not known)."""
    n, shape = len(inputs), tuple(inputs.shape)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return (f"({n}, ..., {module.in_features}) (its first layer is "
                    f"Linear(in_features={module.in_features}))", len(shape) >= 2 and shape[-1] == module.in_features)
        if isinstance(module, nn.modules.conv._ConvNd):
            k = len(module.kernel_size)
            spatial = "L" if k == 1 else ", ".join(["H", "W", "D"][:k])
            return (f"({n}, {module.in_channels}, {spatial}) (its first layer is "
                    f"{type(module).__name__}(in_channels={module.in_channels}))",
                    len(shape) == k + 2 and shape[1] == module.in_channels)
        if isinstance(module, nn.Embedding):
            return (f"integer token ids in [0, {module.num_embeddings}) (its first layer is "
                    f"Embedding({module.num_embeddings}, {module.embedding_dim}))", None)
    return "the shape and dtype its forward takes, one item per row", None


class ExpectedKL(_ModelCost):
    """Mean over data points of KL(p_anchor(·|x) ‖ p_θ(·|x)), paper §3.4 (nats).

    The anchor is the model's parameters at construction, kept as ``reference_parameters``
    (an (N,) copy): the estimator refuses any other anchor (unless the KL there is ~0,
    :func:`localvol.estimator._check_reference`), e.g. one taken after ``load_state_dict`` on a
    cost built before. Its log-probabilities are computed once. For language models (logits (n, T, V)) the mean is over non-padding positions
    (``attention_mask`` 1), the same global token mean as the paper's code.

    Args:
        model: nn.Module returning logits (n, …, C), C ≥ 2, or an output with ``.logits``;
            float32/64 parameters (half precision raises ValueError), all of one dtype and
            device. The cost evaluates it in eval mode (dropout / drop-path off) and puts each
            submodule's train/eval mode back afterwards.
        inputs: (n, …) tensor of inputs (images, token ids).
        batch_size: data items per forward pass (None: all at once).
        attention_mask: optional (n, T) tensor of 0/1 (1 = real token).
        vectorize: evaluate the B directions of a call in one vmapped forward pass (True), or
            one after another (False: faster for convolutional networks on CPU, where vmap
            turns each convolution into a slower grouped one).

    Calling it with a (B, N) tensor of the parameters' dtype and device returns (B,) float64
    costs, 0 at the anchor up to rounding. Memory per call ≈ B × batch_size × (activations +
    logits).

    Raises:
        ValueError: half-precision or mixed-dtype/device parameters; bad batch_size or mask;
            empty inputs; inputs the model cannot be evaluated on (the error names their shape
            and the shape the first layer expects); logits (computed at the anchor) without a class axis, with one
            class only (the KL would be identically 0), or not matching the data batch or the
            attention mask's (n, T).
    """

    def __init__(self, model, inputs, *, batch_size=None, attention_mask=None, vectorize=True):
        super().__init__(model, inputs, batch_size, attention_mask, vectorize)
        parts = []
        for start in range(0, len(self.inputs), self.batch_size):
            logits = self._anchor_logits(slice(start, start + self.batch_size))  # shape-checked
            parts.append(torch.log_softmax(logits.to(_at_least_float32(logits.dtype)), -1))
        self.anchor_log_probs = torch.cat(parts)  # (n, ..., C)
        # the parameters the KL is measured from, in parameters_to_vector order (a copy: the
        # model may change later, this cost would not)
        self.reference_parameters = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()

    def _item_losses(self, logits, sl):
        """Σ_c p0 (log p0 − log q) per item, q = softmax(logits): (B, items, ...)."""
        log_p0 = self.anchor_log_probs[sl]  # (items, ..., C)
        log_q = torch.log_softmax(logits.to(log_p0.dtype), -1)  # (B, items, ..., C)
        if torch.is_grad_enabled():  # differentiable (e.g. torch.func.hessian): no in-place ops
            return (log_p0.exp() * (log_p0 - log_q)).sum(-1)
        # Without autograd, the same float operations in place on log_q: (log q − log p0)·p0
        # is −(p0 (log p0 − log q)) exactly, as is its sum, so the value is bit-identical and
        # no further (B, items, ..., C) temporaries are made (they dominate an LM's KL).
        return -log_q.sub_(log_p0).mul_(log_p0.exp()).sum(-1)


class CrossEntropyCost(_ModelCost):
    """Mean cross-entropy −log p_θ(y|x) over labelled data (nats): a loss-based cost.

    Args:
        model: as for :class:`ExpectedKL`. inputs: (n, …) tensor. targets: (n,) int64 labels
        (or (n, T) token targets with ``attention_mask``), in [0, C). batch_size: data items
        per pass. vectorize: as for :class:`ExpectedKL`.

    Raises:
        ValueError: as for :class:`ExpectedKL` (the logits are checked on one forward pass of
            the first data batch), and targets whose shape is not the logits' without the
            class axis, or whose values are not integer labels in [0, C).
    """

    def __init__(self, model, inputs, targets, *, batch_size=None, attention_mask=None,
                 vectorize=True):
        super().__init__(model, inputs, batch_size, attention_mask, vectorize)
        if targets.shape != inputs.shape[: targets.ndim] or targets.shape[0] != len(inputs):
            raise ValueError(f"targets shape {tuple(targets.shape)} does not match inputs {tuple(inputs.shape)}")
        self.targets = targets.to(self.inputs.device)
        # one forward pass on the first data batch checks the output's shape (C ≥ 2 classes)
        logits = self._anchor_logits(slice(0, self.batch_size))
        n_classes = logits.shape[-1]
        if tuple(targets.shape[1:]) != tuple(logits.shape[1:-1]):
            raise ValueError(
                f"targets shape {tuple(targets.shape)} does not match the model's logits "
                f"{tuple(logits.shape)} (first data batch): targets must be the logits' shape "
                "without the class axis, (n,) for (n, C) logits or (n, T) for (n, T, C)"
            )
        if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
            raise ValueError(f"targets must be integer class labels, got {targets.dtype}")
        if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= n_classes):
            raise ValueError(
                f"targets must be class labels in [0, {n_classes}) for the model's {n_classes} "
                f"classes, got values in [{int(targets.min())}, {int(targets.max())}]"
            )

    def _item_losses(self, logits, sl):
        log_q = torch.log_softmax(logits.to(_at_least_float32(logits.dtype)), -1)
        y = self.targets[sl].expand(log_q.shape[:-1])
        return -log_q.gather(-1, y.unsqueeze(-1)).squeeze(-1)
