"""Curvature for the Hessian preconditioners of paper §3.2 (eq. 16-18).

- :func:`hessian`: the exact dense Hessian of a batched cost (eq. 16/17). O(N²) memory and N
  Hessian-vector products: meant for small models such as the 4,810-parameter digits MLP
  (docs/experiments.md#figure-1), where the paper's code used ``jax.hessian``.
- :func:`hessian_diagonal`: its exact diagonal (eq. 18), same compute, O(N · chunk) memory.
- :func:`kl_hessian`: the same matrix for the KL cost of a classifier at its anchor, built from
  the logits' Jacobian as the Fisher (Gauss-Newton) matrix: one Jacobian per data batch and one
  matrix product instead of N Hessian-vector products (faster on the digits MLP).
- :func:`hesscale_diagonal`: the HesScale approximation of that diagonal (Elsayed & Mahmood
  2022, arXiv:2210.11639) for a Sequential MLP, in one forward and one backward-like pass,
  as in the paper's notebook (docs/method.md#preconditioners).

A batched cost maps a (B, N) tensor of flat parameter vectors, in
``parameters_to_vector(model.parameters())`` order, to (B,) costs.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

__all__ = ["hessian", "hessian_diagonal", "kl_hessian", "hesscale_diagonal"]

BatchedCost = Callable[[torch.Tensor], torch.Tensor]

# Modules applied elementwise, without parameters: HesScale's diagonal recursion is defined
# for these (a map that mixes coordinates, e.g. LayerNorm or Softmax, would need more).
_ELEMENTWISE = (
    nn.Identity, nn.GELU, nn.Tanh, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Sigmoid, nn.SiLU,
    nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Mish, nn.Hardtanh, nn.Hardsigmoid,
    nn.Hardswish, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
)


# ---------------------------------------------------------------------------------------------
# Exact Hessian via torch.func (paper eq. 16-18)
# ---------------------------------------------------------------------------------------------

def _check_anchor(cost, anchor: torch.Tensor, chunk_size) -> torch.Tensor:
    if not callable(cost):
        raise ValueError(f"cost must be callable (B, N) -> (B,), got {type(cost).__name__}")
    if not isinstance(anchor, torch.Tensor):
        raise ValueError(f"anchor must be a torch.Tensor, got {type(anchor).__name__}")
    if anchor.ndim != 1 or anchor.numel() == 0:
        raise ValueError(f"anchor must be a non-empty 1-D (N,) tensor, got shape {tuple(anchor.shape)}")
    if not anchor.is_floating_point():
        raise ValueError(f"anchor must be floating point, got {anchor.dtype}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    anchor = anchor.detach()
    with torch.no_grad():
        out = cost(anchor[None])
    if not isinstance(out, torch.Tensor) or out.shape != (1,):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"cost must map a (1, N) tensor to a (1,) tensor, got {shape}")
    return anchor


def _hessian_rows(cost: BatchedCost, anchor: torch.Tensor, chunk_size) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield (rows, H[rows, :]) for consecutive row blocks, by forward-over-reverse HVPs."""
    n = anchor.numel()

    def scalar_cost(theta):  # (N,) -> ()
        return cost(theta[None])[0]

    grad_fn = grad(scalar_cost)

    def hvp(v):  # (N,) -> (N,) = H v
        return jvp(grad_fn, (anchor,), (v,))[1]

    step = n if chunk_size is None else int(chunk_size)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        k = rows.stop - rows.start
        basis = torch.zeros(k, n, dtype=anchor.dtype, device=anchor.device)  # (k, N)
        basis[torch.arange(k), torch.arange(rows.start, rows.stop)] = 1
        yield rows, vmap(hvp)(basis).to(anchor.dtype)  # (k, N): H is symmetric, rows = columns


def hessian(cost: BatchedCost, anchor: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
    """Exact Hessian ∇²C(anchor) of a batched cost, symmetrised: (H + Hᵀ)/2.

    The matrix whose eigen-decomposition gives the paper's Hessian preconditioner
    (eq. 16, 17); for the KL cost at the anchor it is the Fisher/Gauss-Newton matrix.
    Built with ``torch.func`` as N Hessian-vector products (forward-over-reverse:
    ``jvp`` of ``grad``), ``chunk_size`` of them vmapped at a time. Costs N HVPs and N² memory,
    so it is meant for small models (the 4,810-parameter digits MLP: a 4810 × 4810 float64
    matrix is 185 MB); the cost must support forward-mode AD.

    Args:
        cost: callable mapping a (B, N) tensor of flat parameter vectors to (B,) costs (nats
            for the paper's costs); must be differentiable by ``torch.func``.
        anchor: (N,) floating tensor, the point θ0.
        chunk_size: HVPs evaluated per vmapped call (None: all N at once). Peak memory is about
            chunk_size × (memory of one gradient evaluation).

    Returns:
        (N, N) tensor, same dtype and device as ``anchor``, in cost units per parameter unit².

    Raises:
        ValueError: ``cost`` not callable or not returning (1,) for a (1, N) input; ``anchor``
            not a non-empty 1-D floating tensor; ``chunk_size`` not a positive integer.
    """
    anchor = _check_anchor(cost, anchor, chunk_size)
    n = anchor.numel()
    h = torch.empty(n, n, dtype=anchor.dtype, device=anchor.device)  # (N, N)
    for rows, block in _hessian_rows(cost, anchor, chunk_size):
        h[rows] = block
    return 0.5 * (h + h.T)


def hessian_diagonal(cost: BatchedCost, anchor: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
    """Exact diagonal of the Hessian ∇²C(anchor), the spectrum of paper eq. 18.

    Same N Hessian-vector products as :func:`hessian` (exact diagonals cost as much as the
    full Hessian, as the paper notes), but only chunk_size × N entries are held at a time.
    For larger models use :func:`hesscale_diagonal` (or Adam's second moment).

    Args:
        cost: callable mapping (B, N) flat parameter vectors to (B,) costs.
        anchor: (N,) floating tensor, the point θ0.
        chunk_size: HVPs per vmapped call (None: all N at once, N² memory).

    Returns:
        (N,) tensor, same dtype and device as ``anchor``.

    Raises:
        ValueError: as :func:`hessian`.
    """
    anchor = _check_anchor(cost, anchor, chunk_size)
    diag = torch.empty_like(anchor)  # (N,)
    for rows, block in _hessian_rows(cost, anchor, chunk_size):
        diag[rows] = torch.diagonal(block, offset=rows.start)
    return diag


def kl_hessian(model: nn.Module, inputs: torch.Tensor, *, batch_size: int | None = 256) -> torch.Tensor:
    """Exact Hessian, at the anchor, of :class:`localvol.ExpectedKL` (mean over inputs of
    KL(p_anchor ‖ p_θ)) for a classifier whose current parameters are the anchor.

    At θ = θ0 the KL's Hessian is the Fisher information of the categorical output (the
    Gauss-Newton matrix; the logits' own second derivatives are weighted by p − p0 = 0):

        H = (1/n) Σ_x J_xᵀ (diag p_x − p_x p_xᵀ) J_x,   J_x = ∂logits(x)/∂θ  (C × N)

    computed as AᵀA − GᵀG with A = √p_x ⊙ J_x stacked over x and classes, G_x = p_xᵀ J_x, from
    one ``torch.func.jacrev`` per data batch. Equal to :func:`hessian` of the ExpectedKL up to
    rounding (tested), and faster for the digits MLP (about 0.7× its time); O(N²) memory.

    Args:
        model: nn.Module mapping (b, ...) inputs to logits (b, C), C ≥ 2 (or an output with
            ``.logits``), float32/64 parameters of one dtype and device; evaluated in eval mode
            (modes restored). For a preconditioner, pass a float64 copy
            (``copy.deepcopy(model).double()``): the Hessian comes back in the parameters' dtype.
        inputs: (n, ...) tensor, n ≥ 1; floating inputs are cast to the parameters' dtype.
        batch_size: inputs per Jacobian (memory ≈ batch_size × C × N floats); None: all at once.

    Returns:
        (N, N) symmetric tensor in the parameters' dtype and device, nats per parameter unit²,
        in ``parameters_to_vector(model.parameters())`` order.

    Raises:
        ValueError: no parameters, half-precision or mixed-dtype parameters, empty inputs, a
            batch_size < 1, or logits not (b, C ≥ 2).
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    if not params:
        raise ValueError("model has no parameters")
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
        raise ValueError(f"parameters must all be float32 or all float64, got {sorted(map(str, dtypes))}")
    if len(inputs) == 0:
        raise ValueError("inputs is empty")
    if batch_size is None:
        batch_size = len(inputs)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer ≥ 1 or None, got {batch_size!r}")
    first = next(iter(params.values()))
    if inputs.is_floating_point():
        inputs = inputs.to(first.dtype)
    n_params = sum(p.numel() for p in params.values())
    h = torch.zeros(n_params, n_params, dtype=first.dtype, device=first.device)  # (N, N)
    modes = {m: m.training for m in model.modules()}
    model.eval()

    def logits_of(p, x):
        out = functional_call(model, p, (x,))
        return getattr(out, "logits", out)

    try:
        for start in range(0, len(inputs), batch_size):
            x = inputs[start:start + batch_size]
            with torch.no_grad():
                logits = logits_of(params, x)
            if logits.ndim != 2 or logits.shape[1] < 2:
                raise ValueError(f"logits must be (b, C) with C ≥ 2, got {tuple(logits.shape)}")
            prob = torch.softmax(logits, -1)  # (b, C)
            jac = jacrev(logits_of)(params, x)  # name -> (b, C, *shape)
            j = torch.cat([jac[name].reshape(*logits.shape, -1) for name in params], -1)  # (b, C, N)
            a = (prob.sqrt()[..., None] * j).reshape(-1, n_params)  # (b·C, N)
            g = torch.einsum("bc,bcn->bn", prob, j)  # (b, N)
            h.addmm_(a.T, a).addmm_(g.T, g, alpha=-1.0)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    h /= len(inputs)
    return 0.5 * (h + h.T)


# ---------------------------------------------------------------------------------------------
# HesScale (Elsayed & Mahmood 2022)
# ---------------------------------------------------------------------------------------------

def _check_sequential(model) -> list[nn.Module]:
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model must be an nn.Sequential of nn.Linear and elementwise activations, "
                         f"got {type(model).__name__}")
    layers = list(model)
    if not any(isinstance(layer, nn.Linear) for layer in layers):
        raise ValueError("model has no nn.Linear layer")
    seen = set()
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            for p in layer.parameters(recurse=False):
                if id(p) in seen:
                    raise ValueError(f"layer {i} ({layer}) shares a parameter with an earlier layer: "
                                     "shared weights are not supported")
                seen.add(id(p))
        elif not isinstance(layer, _ELEMENTWISE):
            raise ValueError(f"unsupported layer {i}: {layer!r}; HesScale here supports nn.Linear and "
                             f"elementwise activations ({', '.join(c.__name__ for c in _ELEMENTWISE)})")
    return layers


def _activation_derivatives(layer: nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """φ'(z), φ''(z) of an elementwise module, elementwise by torch.func: two tensors like z."""
    def phi(x):  # () -> ()
        return layer(x)

    flat = z.reshape(-1)
    d1 = vmap(grad(phi))(flat)
    d2 = vmap(grad(grad(phi)))(flat)
    return d1.reshape(z.shape), d2.reshape(z.shape)


def hesscale_diagonal(
    model: nn.Sequential,
    inputs: torch.Tensor,
    *,
    targets: torch.Tensor | None = None,
    anchor_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """HesScale approximation of the diagonal of the loss Hessian w.r.t. all parameters.

    Source: HesScale (Elsayed & Mahmood 2022, arXiv:2210.11639), used for the paper's eq. 18
    preconditioner on the digits MLP (docs/method.md#preconditioners). The loss is either
      - the mean cross-entropy over ``inputs`` with integer ``targets``, or
      - the mean KL(softmax(anchor_logits) ‖ softmax(model(inputs))) (nats).
    At the logits z the per-example diagonal is exact, h_z = p − p² (the same for both losses),
    with gradient g_z = p − y (or p − p_anchor). Backward, per example, dropping off-diagonal
    terms of each layer's Hessian (the HesScale approximation):
      Linear W (out, in), input a:  H[W_ij] ≈ mean_n h_z[n,i] a[n,j]²,  H[b_i] ≈ mean_n h_z[n,i],
                                    h_a = h_z (W²),  g_a = g_z W;
      activation a = φ(z):          h_z = φ'(z)² h_a + φ''(z) g_a,  g_z = φ'(z) g_a.
    The last Linear layer's entries are exact (when it is the last module); earlier ones are
    approximations. φ' and φ'' are taken elementwise with ``torch.func``.

    Args:
        model: nn.Sequential of nn.Linear layers and elementwise activation modules (see
            ``_ELEMENTWISE``) returning (B, C) logits; all parameters of one floating dtype.
        inputs: (B, in_features) tensor; cast to the parameters' dtype.
        targets: (B,) integer class labels in [0, C). Give exactly one of targets /
            anchor_logits.
        anchor_logits: (B, C) logits of the anchor model (for the KL cost of paper §3.4).

    Returns:
        (N,) tensor in ``parameters_to_vector(model.parameters())`` order (per Linear layer:
        weight row-major, then bias), dtype and device of the parameters, units nats per
        parameter unit².

    Raises:
        ValueError: both or neither of ``targets`` / ``anchor_logits``; model not an
            nn.Sequential, containing an unsupported or repeated layer, or with mixed parameter
            dtypes; inputs not (B, in_features); targets / anchor_logits of the wrong shape,
            dtype or range.
    """
    if (targets is None) == (anchor_logits is None):
        raise ValueError("give exactly one of targets (cross-entropy) or anchor_logits (KL), "
                         f"got targets={'None' if targets is None else 'tensor'}, "
                         f"anchor_logits={'None' if anchor_logits is None else 'tensor'}")
    layers = _check_sequential(model)
    params = list(model.parameters())
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or not params[0].is_floating_point():
        raise ValueError(f"model parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
    dtype, device = params[0].dtype, params[0].device
    first = next(layer for layer in layers if isinstance(layer, nn.Linear))
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 2 or inputs.shape[1] != first.in_features or len(inputs) == 0:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a (B, {first.in_features}) tensor with B >= 1, got {shape}")

    # Forward pass, keeping each module's input.
    acts = [inputs.detach().to(dtype=dtype, device=device)]  # acts[k]: input of layer k, (B, d_k)
    with torch.no_grad():
        for layer in layers:
            acts.append(layer(acts[-1]))
    logits = acts.pop()  # (B, C)
    n_batch, n_classes = logits.shape
    p = torch.softmax(logits, dim=-1)  # (B, C)
    if targets is not None:
        if targets.shape != (n_batch,) or targets.is_floating_point() or targets.is_complex():
            raise ValueError(f"targets must be a ({n_batch},) integer tensor, got {tuple(targets.shape)} {targets.dtype}")
        if len(targets) and (targets.min() < 0 or targets.max() >= n_classes):
            raise ValueError(f"targets must lie in [0, {n_classes}), got range "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        reference = nn.functional.one_hot(targets.to(device).long(), n_classes).to(dtype)  # (B, C)
    else:
        if anchor_logits.shape != (n_batch, n_classes):
            raise ValueError(f"anchor_logits must have shape ({n_batch}, {n_classes}), got {tuple(anchor_logits.shape)}")
        reference = torch.softmax(anchor_logits.detach().to(dtype=dtype, device=device), dim=-1)  # (B, C)
    g = p - reference  # (B, C) per-example gradient w.r.t. logits
    h = p - p * p  # (B, C) exact per-example diagonal Hessian w.r.t. logits

    blocks: dict[int, torch.Tensor] = {}  # id(parameter) -> diagonal block
    with torch.no_grad():
        for layer, a in zip(reversed(layers), reversed(acts)):
            if isinstance(layer, nn.Linear):
                w = layer.weight  # (out, in)
                blocks[id(w)] = (h.T @ (a * a)) / n_batch  # (out, in)
                if layer.bias is not None:
                    blocks[id(layer.bias)] = h.mean(0)  # (out,)
                h, g = h @ (w * w), g @ w  # (B, in)
            else:
                d1, d2 = _activation_derivatives(layer, a)  # (B, d)
                h, g = d1 * d1 * h + d2 * g, d1 * g
    return torch.cat([blocks[id(p)].reshape(-1) for p in params])  # (N,)
