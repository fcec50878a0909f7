"""GPU readiness: one script for the first GPU this project gets (JSON report, ≤ 8 min on an H200).

Plain Python with torch (≥ 2.11), transformers (≥ 5.17) and their dependencies only: no dvc,
papermill or Jupyter. localvol is imported from ``lib/`` of this checkout; where SciPy is
absent (it is no dependency of torch or transformers) a NumPy stand-in for the three SciPy
functions localvol calls is installed first and the report says so (timings are unaffected; the
ray integral's nodes then come from NumPy's Gauss-Legendre instead of SciPy's).

It measures, on ``--device`` (default cuda):
  1. one mean-KL evaluation (``localvol.ExpectedKL``) of a Pythia-31M-shaped GPT-NeoX (random
     weights, 20 × 1,024 random tokens) in float32 with TF32 off, and with a bf16 forward
     (autocast) and the KL in float32 (its value at the anchor: bf16's noise floor);
  2. seconds and cost evaluations per sample of ``estimate_log_volume``, naive and Adam ν
     (ν from a few Adam steps on random tokens), k = 64, cutoff 1e-2, in both precisions;
  3. the largest direction batch (directions per cost call) whose KL evaluation fits;
  4. ConvNeXt V2 Atto (3.4 M parameters): training throughput (images/s, bf16 autocast,
     batch 128, 32 × 32 images) and seconds per sample of a naive estimate on 1,024 images;
  5. the launcher end to end: the naive float32 LM estimate again under ``torchrun
     --nproc-per-node=2`` on the same GPU (two ranks share it; blocks of 16 samples, so both
     ranks compute some), checked equal to the single-process estimate bit for bit.

Run:   python benchmarks/gpu_readiness.py --out gpu_report.json
CPU smoke test (tiny shapes, seconds):  python benchmarks/gpu_readiness.py --device cpu --smoke
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))


def _scipy_stand_in() -> bool:
    """Install a NumPy stand-in for scipy.special where SciPy is missing; True if installed."""
    if importlib.util.find_spec("scipy") is not None:
        return False
    special = types.ModuleType("scipy.special")

    def logsumexp(a, axis=None):
        a = np.asarray(a, dtype=np.float64)
        m = np.max(a, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        out = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
        return out.squeeze() if axis is None else np.squeeze(out, axis=axis)

    special.logsumexp = logsumexp
    special.gammaln = np.vectorize(math.lgamma, otypes=[np.float64])
    special.roots_legendre = lambda n: np.polynomial.legendre.leggauss(int(n))
    scipy = types.ModuleType("scipy")
    scipy.special = special
    sys.modules["scipy"], sys.modules["scipy.special"] = scipy, special
    return True


SCIPY_STAND_IN = _scipy_stand_in()
import localvol as lv  # noqa: E402
from localvol import distributed  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=3):
    fn()  # warm-up (kernels, allocator)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats, out


def language_model(device, smoke, adam_steps=3):
    import transformers

    if smoke:
        cfg = dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64)
        n_seqs, seq_len = 2, 16
    else:  # Pythia-31M's shape
        cfg = dict(vocab_size=50304, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
                   intermediate_size=1024)
        n_seqs, seq_len = 20, 1024
    config = transformers.GPTNeoXConfig(**cfg, max_position_embeddings=2048, rotary_pct=0.25,
                                        use_parallel_residual=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).float().to(device).eval()  # the anchor
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (n_seqs, seq_len), generator=gen).to(device)
    if not adam_steps:
        return model, ids, None
    # Adam ν from a few steps of a copy on other random tokens (the anchor stays the
    # initialisation, identical in every process: CUDA's embedding backward is not deterministic)
    import copy

    trained = copy.deepcopy(model).train()
    opt = torch.optim.Adam(trained.parameters(), lr=1e-4)
    for _ in range(adam_steps):
        batch = torch.randint(0, config.vocab_size, (n_seqs, seq_len), generator=gen).to(device)
        trained(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    nu = lv.adam_moment(trained, opt.state_dict())
    del trained, opt
    return model, ids, nu


def lm_cost(model, ids, bf16):
    cost = lv.ExpectedKL(model, ids, batch_size=ids.shape[0])
    if not bf16:
        return cost

    def bf16_forward(theta):  # bf16 matmuls, the KL itself in float32 (ExpectedKL upcasts)
        with torch.autocast(theta.device.type, dtype=torch.bfloat16):
            return cost(theta)
    return bf16_forward


def estimate_row(cost, anchor, prior, preconditioner, *, k, batch, seed=0, block=lv.estimator.BLOCK_SIZE):
    device = anchor.device
    sync(device)
    t0 = time.perf_counter()
    est = lv.estimate_log_volume(cost, anchor, cutoff=1e-2, n_samples=k, prior=prior,
                                 preconditioner=preconditioner, batch_size=batch, seed=seed,
                                 block_size=block, progress=False)
    sync(device)
    seconds = time.perf_counter() - t0
    return est, {"seconds_per_sample": seconds / k, "evaluations_per_sample": float(np.mean(est.evaluations)),
                 "log10_volume": est.log10_volume, "n_unbounded": est.n_unbounded}


def largest_batch(cost, anchor, limit):
    """Largest B (powers of two up to ``limit``) whose cost call on (B, N) points fits."""
    best, b = 0, 1
    while b <= limit:
        try:
            theta = anchor.expand(b, -1).clone()
            cost(theta)
            sync(anchor.device)
            best = b
            del theta
            b *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            if anchor.device.type == "cuda":
                torch.cuda.empty_cache()
    return best


def convnext(device, smoke, report):
    import transformers

    cfg = dict(num_channels=3, patch_size=1, num_labels=10, image_size=32)
    if smoke:
        cfg.update(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32])
        n_images, batch, steps = 16, 8, 2
    else:  # Atto
        cfg.update(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320])
        n_images, batch, steps = 1024, 128, 30
    torch.manual_seed(0)
    model = transformers.ConvNextV2ForImageClassification(transformers.ConvNextV2Config(**cfg)).to(device)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=images).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, _ = timed(lambda: [step() for _ in range(steps)], device, repeats=1)
    model.eval()
    anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    eval_images = torch.randn(n_images, 3, 32, 32, generator=gen).to(device)
    cost = lv.ExpectedKL(model, eval_images, batch_size=min(n_images, 256),
                         vectorize=device.type == "cuda")
    sigma = float(anchor.double().pow(2).mean().sqrt())
    _, row = estimate_row(cost, anchor, lv.GaussianPrior(sigma), None, k=8 if smoke else 32,
                          batch=8)
    report["convnext_v2_atto"] = {"n_params": anchor.numel(),
                                  "train_images_per_s_bf16_batch128": steps * batch / seconds,
                                  "estimate_naive_1024_images": row}


def ranks_check(args, report, device):
    """The naive float32 LM estimate under torchrun with 2 ranks on this device."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.npz"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(Path(__file__).resolve()), "--rank-worker", str(out), "--device", args.device]
        if args.smoke:
            cmd.append("--smoke")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.ranks_timeout)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            report["two_ranks"] = {"ok": False, "tail": (proc.stdout + proc.stderr)[-3000:]}
            return
        with np.load(out) as z:
            samples = z["samples"]
    single = np.asarray(report["_naive_fp32_samples"])
    report["two_ranks"] = {"ok": True, "wall_s_including_startup": seconds,
                           "identical_to_one_process": bool(np.array_equal(samples, single)),
                           "max_abs_difference_nats": float(np.max(np.abs(samples - single)))}


def rank_worker(out, args):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = distributed.init(timeout_s=600)
    if device.type == "cuda" and args.device.startswith("cuda:"):
        device = torch.device(args.device)  # both ranks on the one GPU asked for
    model, ids, _ = language_model(device, args.smoke, adam_steps=0)
    anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    sigma = float(anchor.double().pow(2).mean().sqrt())
    est = distributed.estimate_log_volume_distributed(
        lv.ExpectedKL(model, ids, batch_size=ids.shape[0]), anchor,
        shard_dir=Path(out).parent / "shards", cutoff=1e-2, n_samples=args.k,
        prior=lv.GaussianPrior(sigma), batch_size=args.batch, seed=0, block_size=args.block,
        progress=False)
    if distributed.rank_and_world()[0] == 0:
        np.savez(out, samples=est.samples)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="gpu_report.json")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU check of the script)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="directions per cost call")
    p.add_argument("--max-batch", type=int, default=256, help="largest batch tried")
    p.add_argument("--block", type=int, default=16,
                   help="samples per block (k / block blocks: both ranks get some)")
    p.add_argument("--ranks-timeout", type=int, default=240)
    p.add_argument("--rank-worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.k, args.batch, args.max_batch = min(args.k, 8), min(args.batch, 4), min(args.max_batch, 8)
        args.block = min(args.block, 2)
    if args.rank_worker:
        return rank_worker(args.rank_worker, args)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = {"torch": torch.__version__, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "scipy_stand_in": SCIPY_STAND_IN, "smoke": args.smoke, "k": args.k,
              "direction_batch": args.batch, "block_size": args.block}
    t_start = time.perf_counter()
    model, ids, nu = language_model(device, args.smoke)
    import transformers
    report["transformers"] = transformers.__version__
    anchor = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    sigma = float(anchor.double().pow(2).mean().sqrt())
    prior = lv.GaussianPrior(sigma)
    adam = lv.DiagonalPreconditioner(nu, eps=1e-5)
    lm = {"n_params": anchor.numel(), "tokens": list(ids.shape)}
    for name, bf16 in (("float32", False), ("bf16_forward_float32_kl", True)):
        cost = lm_cost(model, ids, bf16)
        seconds, value = timed(lambda: cost(anchor[None]), device)
        row = {"kl_evaluation_s": seconds, "kl_at_anchor": float(value[0])}
        for precond_name, precond in (("naive", None), ("adam_nu", adam)):
            est, row[precond_name] = estimate_row(cost, anchor, prior, precond, k=args.k,
                                                  batch=args.batch, block=args.block)
            if not bf16 and precond is None:
                report["_naive_fp32_samples"] = est.samples.tolist()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row["largest_direction_batch"] = largest_batch(cost, anchor, args.max_batch)
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        lm[name] = row
        print(name, json.dumps(row), flush=True)
    report["pythia_31m_shaped"] = lm
    del model, ids, nu
    if device.type == "cuda":
        torch.cuda.empty_cache()
    convnext(device, args.smoke, report)
    print("convnext", json.dumps(report["convnext_v2_atto"]), flush=True)
    ranks_check(args, report, device)
    print("two ranks", json.dumps(report["two_ranks"]), flush=True)
    report.pop("_naive_fp32_samples", None)
    report["wall_s"] = time.perf_counter() - t_start
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
