"""Save and load time and peak memory of a large prior in both file formats (torch and safetensors).

Run:  python benchmarks/prior_io.py [--backbone resnet50] [--rank 20] [--dir /tmp/prior_io]

A random prior over the backbone (ResNet-50, K = 20: about 2 GB) is written once in each format;
then every measurement runs in a fresh Python process, so its peak resident memory (``ru_maxrss``)
is its own: ``save`` (build the prior, write it), ``load`` (``Prior.load``: memory-mapped, digest
not checked), ``load + verify`` (the default: the digest reads every byte) and ``load + read all``
(memory-mapped, then every tensor summed once, as a fine-tune touches them). Peak memory is
reported beside the file size; the goals are a load under 1 s and a peak under 1.2x the file when
fully read. The page cache is not dropped between runs (that needs root); a second read of the same
file comes from memory, as it does for a user who loads a prior twice.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from sklearn_bayes_transfer import Prior
from sklearn_bayes_transfer.backbones import get_backbone
action, path, backbone, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if action == "save":
    module = get_backbone(backbone)
    prior = Prior.from_module(module, variance=1e-4)
    factor = torch.randn(rank, prior.n_params).mul_(1e-3)  # in place: one copy in memory
    prior = Prior(prior.mean, prior.variance, factor, names=prior.names, shapes=prior.shapes, buffers=prior.buffers,
                  meta=prior.meta)
    start = time.perf_counter()
    prior.save(path)
else:
    prior = Prior.load(path, verify=action == "verify")
    if action == "read":
        # Row by row, in the stored dtype: no second copy of the factor in memory.
        total = sum(float(row.sum()) for t in (prior.mean[None], prior.variance[None], prior.factor) for row in t)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "start_mb": base / 1024}))
"""


def run(action: str, path: Path, backbone: str, rank: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, action, str(path), backbone, str(rank)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--rank", type=int, default=20)
    parser.add_argument("--dir", default="/tmp/prior_io")
    args = parser.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"{args.backbone}, K = {args.rank}, files in {folder}; one fresh process per row")
    print(f"{'format':<12}{'action':<16}{'seconds':>9}{'peak MB':>10}{'file MB':>10}{'added/file':>11}")
    for kind, name in (("torch", "prior.pt"), ("safetensors", "prior.safetensors")):
        path = folder / name
        for action, label in (("save", "save"), ("load", "load"), ("verify", "load + verify"),
                              ("read", "load + read all")):
            result = run(action, path, args.backbone, args.rank)
            size = path.stat().st_size / 2**20
            # ru_maxrss counts the interpreter and torch too: the peak above the start is the file's share.
            extra = result["peak_mb"] - result["start_mb"]
            print(f"{kind:<12}{label:<16}{result['seconds']:>9.2f}{result['peak_mb']:>10.0f}{size:>10.0f}"
                  f"{extra / size:>10.2f}x", flush=True)
        path.unlink()


if __name__ == "__main__":
    main()
