"""Peak memory of an estimate, in units of one N-sized float32 buffer (4 N bytes).

Builds a GPT-NeoX of about 300 M parameters with random float32 weights on the CPU, a few short
random token sequences, and runs ``localvol.estimate_log_volume`` with k = 2 directions and the
default batch size (1 direction per pass at this N). Prints a table (not a timed test): for each
phase, the process's peak resident memory (VmHWM, reset between phases through
/proc/self/clear_refs) and the increase over the resident memory before it, in GiB and in
N-sized float32 buffers.

Run (from the repository root, ~2 min and ~8 GiB on 2 cores):

    .venv/bin/python benchmarks/memory.py [--layers 16 --hidden 1024 --seqs 2 --seq-len 32]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import sys
import time

import torch
from torch.nn.utils import parameters_to_vector

import localvol

GIB = 2**30


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: peak since reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)


def measure(name, fn, rows, n):
    gc.collect()
    _reset_peak()
    before = _status("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    rows.append((name, before, peak, seconds))
    print(f"  {name}: {seconds:.1f} s, peak {peak / GIB:.2f} GiB", file=sys.stderr, flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--seqs", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--samples", type=int, default=2)
    args = p.parse_args(argv)
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=50304, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
        max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    rows = []
    start_rss = _status("VmRSS")
    model = measure("build the model (random init)", lambda: transformers.GPTNeoXForCausalLM(cfg).float().eval(), rows, 1)
    n = sum(q.numel() for q in model.parameters())
    buffer = 4 * n
    ids = torch.randint(0, cfg.vocab_size, (args.seqs, args.seq_len), generator=torch.Generator().manual_seed(0))
    anchor = measure("anchor = parameters_to_vector", lambda: parameters_to_vector(model.parameters()).detach(), rows, n)
    cost = measure("ExpectedKL (anchor log-probabilities)", lambda: localvol.ExpectedKL(model, ids, batch_size=args.seqs), rows, n)
    est = measure(
        f"estimate_log_volume, k = {args.samples}, default batch",
        lambda: localvol.estimate_log_volume(cost, anchor, cutoff=1e-2, n_samples=args.samples,
                                             prior=localvol.GaussianPrior(0.02), progress=False),
        rows, n,
    )

    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}, {platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, load avg {os.getloadavg()[0]:.2f}")
    print(f"GPT-NeoX {args.layers} layers × {args.hidden} wide, N = {n:,} parameters "
          f"(one float32 N-buffer = {buffer / GIB:.2f} GiB); {args.seqs}×{args.seq_len} random tokens; "
          f"process RSS before the model {start_rss / GIB:.2f} GiB")
    print(f"estimate: log10 volume {est.log10_volume:.6g}, evaluations per direction "
          f"{est.evaluations.tolist()}, {est.wall_time_s:.1f} s")
    print()
    print("| phase | RSS before | peak | peak − RSS before | in N-buffers | peak − RSS at start, in N-buffers |")
    print("|---|---|---|---|---|---|")
    for name, before, peak, _ in rows:
        print(f"| {name} | {before / GIB:.2f} GiB | {peak / GIB:.2f} GiB | {(peak - before) / GIB:.2f} GiB | "
              f"{(peak - before) / buffer:.2f} | {(peak - start_rss) / buffer:.2f} |")


if __name__ == "__main__":
    main()
