"""Run by tests/test_train.py under torchrun: train.py's run, then each rank writes a digest of its weights.

Not a test itself: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py <train flags>
"""
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import train  # noqa: E402
from machinery.run_folders import claim_run_dir  # noqa: E402
from machinery.runtime import setup_device  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg, dcfg, mcfg, wcfg = train.read_flags(sys.argv[1:])
    env = setup_device(cfg.device)
    try:
        claim_run_dir(cfg.out_dir, "", "", False, env)
        metrics, model = train.train(cfg, dcfg, mcfg, wcfg, env)
    finally:
        dist.destroy_process_group()
    digest = hashlib.sha256()
    for v in model.state_dict().values():
        digest.update(v.detach().contiguous().numpy().tobytes())
    with open(os.path.join(cfg.out_dir, f"rank{env.rank}.json"), "w") as f:
        json.dump({"digest": digest.hexdigest(), "metrics": metrics}, f)
