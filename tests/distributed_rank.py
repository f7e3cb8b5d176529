"""One rank of the two-rank torch.distributed (gloo) test in test_loader.py.

usage: distributed_rank.py ADDRESS INIT_METHOD RANK WORLD_SIZE OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from client import RemoteAugMixLoader


def main() -> None:
    address, init, rank, world, out = sys.argv[1:6]
    dist.init_process_group("gloo", init_method=init, rank=int(rank), world_size=int(world))
    try:
        loader = RemoteAugMixLoader(address, timeout=60)  # rank and world size from dist
        seen, sizes = [], []
        batches = 0
        for batch in loader:
            seen += batch.index.tolist()
            sizes.append(len(batch))
            batches += 1
            dist.all_reduce(torch.ones(1))  # a collective per batch, as DDP's gradient sync
        dist.barrier()
        result = {"rank": loader.rank, "len": len(loader), "batches": batches, "indices": seen,
                  "sizes": sizes}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
