"""One rank of the torch.distributed (gloo) tests in test_loader.py.

usage: distributed_rank.py ADDRESS INIT_METHOD RANK WORLD_SIZE OUT_DIR [STOP_AFTER [RESUME]]

With STOP_AFTER the rank stops after that many batches and writes its loader state; with
RESUME (a JSON file holding the states of every rank of an earlier run, of any world size) it
first resumes from them.
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
    stop_after = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] != "-" else None
    resume = sys.argv[7] if len(sys.argv) > 7 else None
    dist.init_process_group("gloo", init_method=init, rank=int(rank), world_size=int(world))
    try:
        loader = RemoteAugMixLoader(address, timeout=60)  # rank and world size from dist
        if resume is not None:
            loader.load_state_dict(json.loads(Path(resume).read_text()))
        seen, sizes = [], []
        batches = 0
        for batch in loader:
            seen += batch.index.tolist()
            sizes.append(len(batch))
            batches += 1
            dist.all_reduce(torch.ones(1))  # a collective per batch, as DDP's gradient sync
            if batches == stop_after:
                break
        dist.barrier()
        result = {"rank": loader.rank, "len": len(loader), "batches": batches, "indices": seen,
                  "sizes": sizes, "state": loader.state_dict()}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
