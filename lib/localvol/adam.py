"""Adam/AdamW moment buffers as one flat vector (paper §3.2, last paragraph;
docs/method.md#preconditioners).

The paper's cheapest preconditioner uses Adam's second-moment buffer ν (``exp_avg_sq``) as a
stand-in for diag(H) (eq. 18); the first moment μ (``exp_avg``) was also tried. Both are
read raw, without bias correction, as the paper's code did.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["adam_moment"]

_KEYS = {1: "exp_avg", 2: "exp_avg_sq"}


def _as_named(params, what: str) -> list[tuple[str, torch.Tensor]]:
    """nn.Module or sequence of tensors -> [(name, tensor)]; names are 'params[k]' for lists."""
    if isinstance(params, nn.Module):
        named = list(params.named_parameters())
    elif isinstance(params, torch.Tensor):
        raise ValueError(f"{what} must be an nn.Module or a list of parameters, got a single tensor")
    else:
        named = [(f"{what}[{k}]", p) for k, p in enumerate(params)]
    for name, p in named:
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{name} is a {type(p).__name__}, not a tensor")
    if not named:
        raise ValueError(f"{what} holds no parameters")
    return named


def adam_moment(
    params: nn.Module | Sequence[torch.Tensor],
    optimizer_state_dict: Mapping,
    *,
    order: int = 2,
    optimizer_params: Sequence[torch.Tensor] | None = None,
    allow_never_stepped: bool = False,
) -> torch.Tensor:
    """Adam/AdamW moment buffer of every parameter, flattened into one vector.

    Source: paper §3.2, last paragraph (Adam's second moment estimates diag(H) for eq. 18);
    docs/method.md#preconditioners ("Adam ν" and "Adam μ"). The buffers are returned RAW,
    with no bias correction (no division by 1 − βᵗ), as in the paper's code; ν has units of
    squared gradient (nats² per parameter unit²), μ of gradient.

    The state dict names parameters by integers counting across ``param_groups`` in group
    order. They are matched to ``params`` as follows:
      (a) if every group carries ``param_names`` (PyTorch ≥ 2.6 stores them when the optimizer
          was built from ``model.named_parameters()``) and ``params`` is an nn.Module, by name
          through ``params.named_parameters()`` (extra optimizer entries are ignored);
      (b) otherwise by position: the k-th integer in the concatenated group lists is taken to
          be ``optimizer_params[k]`` (default: the order of ``params``), i.e. pass
          ``optimizer_params`` as the parameters handed to the optimizer, flattened in group
          order, when that differs from ``params``.
    A parameter the optimizer holds but never stepped (no gradient yet, frozen) gets zeros,
    and so does a parameter with ``requires_grad=False`` that the optimizer does not hold.
    A moment that is zero EVERYWHERE is an error unless ``allow_never_stepped``: as a
    preconditioner it would silently turn into the identity (the naive estimator).

    Args:
        params: nn.Module (its ``.parameters()`` order, = ``parameters_to_vector`` order) or a
            list of parameter tensors; fixes the order of the output.
        optimizer_state_dict: ``torch.optim.Adam``/``AdamW`` ``.state_dict()`` (or a loaded one).
        order: 2 -> ``exp_avg_sq`` (second moment ν), 1 -> ``exp_avg`` (first moment μ).
        optimizer_params: parameters in the order the optimizer received them (path (b) only).
        allow_never_stepped: return zeros for an optimizer that never stepped (e.g. the state
            saved at step 0 of a training run, where ν = 0 is the truth) instead of raising.

    Returns:
        (N,) tensor, N = total number of elements of ``params``, on the device of the first
        parameter, in the (promoted) dtype of the buffers.

    Raises:
        ValueError: ``order`` not 1 or 2; state dict without ``state``/``param_groups``, or
            whose groups have no ``betas`` (not Adam/AdamW: e.g. SGD, which keeps no moments
            without momentum); a moment that is zero everywhere (the optimizer never stepped)
            unless ``allow_never_stepped``; a trainable parameter whose name (path a) or identity (path b) the optimizer lacks;
            ``optimizer_params`` count differing from the optimizer's; a buffer whose shape
            differs from its parameter's; a stepped parameter without the requested buffer.
    """
    if isinstance(order, bool) or order not in _KEYS:
        raise ValueError(f"order must be 1 (exp_avg, μ) or 2 (exp_avg_sq, ν), got {order!r}")
    key = _KEYS[order]
    if isinstance(optimizer_state_dict, torch.optim.Optimizer):
        raise ValueError("optimizer_state_dict must be optimizer.state_dict(), not the optimizer itself")
    if not isinstance(optimizer_state_dict, Mapping) or not {"state", "param_groups"} <= set(optimizer_state_dict):
        raise ValueError("optimizer_state_dict must be a mapping with 'state' and 'param_groups' "
                         "(torch.optim.Adam/AdamW .state_dict())")
    state = optimizer_state_dict["state"]
    groups = optimizer_state_dict["param_groups"]
    not_adam = [g for g in groups if "betas" not in g]
    if not_adam:
        raise ValueError(
            f"not an Adam/AdamW state dict: a param group has no 'betas' (its keys: "
            f"{sorted(k for k in not_adam[0] if k != 'params')}); SGD and other optimizers keep "
            "no Adam moments, and reading them as zeros would make the preconditioner the identity")
    ids = [i for g in groups for i in g["params"]]  # state-dict integer ids, group order
    named = _as_named(params, "params")

    # index: parameter name (path a) or id(tensor) (path b) -> state-dict integer id
    by_name = isinstance(params, nn.Module) and all("param_names" in g for g in groups)
    if by_name:
        opt_names = [n for g in groups for n in g["param_names"]]
        index = dict(zip(opt_names, ids))
        lookup = [(name, index.get(name)) for name, _ in named]
    else:
        if optimizer_params is None:
            opt_tensors = [p for _, p in named]
        else:
            opt_tensors = [p for _, p in _as_named(optimizer_params, "optimizer_params")]
        if len(opt_tensors) != len(ids):
            raise ValueError(f"the optimizer holds {len(ids)} parameters but "
                             f"{'params' if optimizer_params is None else 'optimizer_params'} has "
                             f"{len(opt_tensors)}; pass optimizer_params in the optimizer's group order")
        index = {id(p): i for p, i in zip(opt_tensors, ids)}
        lookup = [(name, index.get(id(p))) for name, p in named]

    if state and not any(sid in state for _, sid in lookup if sid is not None):
        raise ValueError(f"the optimizer state has {len(state)} entries but none matches the parameter ids "
                         f"{ids[:5]}...; state keys {list(state)[:5]} (string keys after a JSON round trip?)")
    pieces = []
    for (name, p), (_, sid) in zip(named, lookup):
        if sid is None:
            if p.requires_grad:
                how = "name" if by_name else "identity (not in optimizer_params)"
                raise ValueError(f"parameter {name} is trainable but the optimizer has no entry for it "
                                 f"by {how}")
            pieces.append(None)  # frozen and not in the optimizer: zeros
            continue
        entry = state.get(sid, {})
        if not entry:  # never stepped
            pieces.append(None)
            continue
        if key not in entry:
            raise ValueError(f"optimizer state of parameter {name} has no '{key}' (keys: {sorted(entry)}); "
                             "is this an Adam/AdamW state dict?")
        buf = entry[key]
        if tuple(buf.shape) != tuple(p.shape):
            raise ValueError(f"'{key}' of parameter {name} has shape {tuple(buf.shape)}, "
                             f"the parameter {tuple(p.shape)}")
        pieces.append(buf)

    device = named[0][1].device
    present = [b.dtype for b in pieces if b is not None]
    dtype = named[0][1].dtype if not present else present[0]
    for d in present[1:]:
        dtype = torch.promote_types(dtype, d)
    moment = torch.cat([
        (torch.zeros(p.numel(), dtype=dtype, device=device) if b is None
         else b.detach().reshape(-1).to(dtype=dtype, device=device))
        for (_, p), b in zip(named, pieces)
    ])  # (N,)
    n_zero = int((moment == 0).sum())
    if n_zero == moment.numel() and not allow_never_stepped:
        why = ("the optimizer never stepped (its state holds no per-parameter entries)" if not present
               else "every buffer is zero")
        raise ValueError(
            f"{n_zero} of {moment.numel()} entries of '{key}' are zero: {why}. As a preconditioner "
            "this is the identity (the naive estimate under another label); pass "
            "allow_never_stepped=True only where ν = 0 is meant (step 0 of a training run)")
    return moment
