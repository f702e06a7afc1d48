"""CPU latency of dense vs pruned models: does pruning save time?

    python benchmarks/bench_prune.py [--repeats N] [--threads T] [--memory-format F] [--malloc M] [--json PATH]

One CPU thread by default: on a small shared machine, more threads than free cores make the
medians mostly noise (a 2-thread run on a 2-core machine under load measured 1.5x where 1 thread
measured 3.1x). The thread count is printed with the results.

For the seed CNN and ResNet-18 (random init, 10 classes, 3x64x64 input) it times, in one run and
interleaved per architecture: the dense model, 20% l1_unstructured (masks folded: a dense model
with zeros), and 20% / 50% channel-pruned (Torch-Pruning, layers physically smaller), at batch
1 and 64, in the memory format the study times in (channels_last; `--memory-format both` also
times NCHW, the format of the figures before it was recorded). Goal from the issue: the 50%
channel-pruned seed CNN at least 2.5x faster than dense at batch 64; a line per format says PASS
or MISS. Wall-clock figures on a shared machine are noisy. It times under the study kernels' malloc
settings (`--malloc study`, the default: it restarts itself with their GLIBC_TUNABLES) or glibc's
defaults (`--malloc default`), and prints which.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys

import torch

from prunestudy import efficiency, kernels, models, prune

ARCHS = ("seed_cnn", "resnet18")
VARIANTS = {  # name -> (method, amount); None = the dense model
    "dense": None,
    "l1_unstructured 20% (masked)": ("l1_unstructured", 0.2),
    "channel 20%": ("channel", 0.2),
    "channel 50%": ("channel", 0.5),
}
BATCH_SIZES = (1, 64)
GOAL = {"arch": "seed_cnn", "variant": "channel 50%", "batch": 64, "speedup": 2.5}


def variants(arch: str) -> dict[str, torch.nn.Module]:
    """The dense model and its pruned variants, masks folded (as they would be deployed)."""
    torch.manual_seed(0)
    dense = models.build_model(arch, 10).eval()
    out = {}
    for name, spec in VARIANTS.items():
        model = copy.deepcopy(dense)
        if spec is not None:
            prune.apply(model, spec[0], spec[1], "all")
        out[name] = efficiency.deployable(model)
    return out


def run(repeats: int, threads: int | None, memory_format: str = efficiency.MEMORY_FORMAT) -> list[dict]:
    rows = []
    for arch in ARCHS:
        nets = variants(arch)
        table = efficiency.latency_table(nets, BATCH_SIZES, repeats, "cpu", threads, warmup=2,
                                         memory_format=memory_format)
        facts = {n: (efficiency.parameters(m)["params_nonzero"], efficiency.flops(m)) for n, m in nets.items()}
        for row in table["rows"]:
            nonzero, f = facts[row["model"]]
            rows.append({"arch": arch, "variant": row["model"], "batch": row["batch"], "params_nonzero": nonzero,
                         "macs": f["macs"], "effective_macs": f["effective_macs"], "median_ms": row["median_ms"],
                         "speedup_vs_dense": row["speedup_vs_dense"], "threads": table["threads"],
                         "repeats": table["repeats"], "memory_format": table["memory_format"]})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<10} {'variant':<30} {'batch':>5} {'nonzero params':>14} {'MMACs':>8} {'eff. MMACs':>10} "
          f"{'median ms':>10} {'vs dense':>8}")
    for r in rows:
        print(f"{r['arch']:<10} {r['variant']:<30} {r['batch']:>5} {r['params_nonzero']:>14,} {r['macs'] / 1e6:>8.1f} "
              f"{r['effective_macs'] / 1e6:>10.1f} {r['median_ms']:>10.2f} {r['speedup_vs_dense']:>7.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10, help="timed runs per model and batch size (median kept)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: steadiest on a shared machine; 0 = torch's default)")
    ap.add_argument("--memory-format", default=efficiency.MEMORY_FORMAT,
                    choices=["channels_last", "contiguous", "both"],
                    help="tensor layout timed (default: the study's, channels_last; contiguous = NCHW)")
    ap.add_argument("--malloc", default="study", choices=["study", "default"],
                    help="malloc settings: the study kernels' (GLIBC_TUNABLES = kernels.MALLOC_TUNABLES; this "
                         "script restarts itself with them) or glibc's defaults")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    wanted = kernels.MALLOC_TUNABLES if args.malloc == "study" else None
    if argv is None and os.environ.get("GLIBC_TUNABLES") != wanted:   # glibc reads them at a process's start
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if wanted:
            env["GLIBC_TUNABLES"] = wanted
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    formats = ["channels_last", "contiguous"] if args.memory_format == "both" else [args.memory_format]
    rows, verdicts = [], {}
    for fmt in formats:
        found = run(args.repeats, args.threads or None, fmt)
        print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
              f"{found[0]['threads']} threads, {fmt}, malloc {efficiency.allocator()}, median of {args.repeats} "
              f"repeats (interleaved, after 2 warm-up runs)")
        print_table(found)
        goal = next(r for r in found if r["arch"] == GOAL["arch"] and r["variant"] == GOAL["variant"]
                    and r["batch"] == GOAL["batch"])
        verdicts[fmt] = "PASS" if goal["speedup_vs_dense"] >= GOAL["speedup"] else "MISS"
        print(f"{verdicts[fmt]} ({fmt}): {GOAL['variant']} {GOAL['arch']} at batch {GOAL['batch']} is "
              f"{goal['speedup_vs_dense']:.2f}x dense (goal >= {GOAL['speedup']}x)\n")
        rows += found
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "goal": GOAL, "verdict": verdicts, "allocator": efficiency.allocator()}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
