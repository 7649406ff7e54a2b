"""Several trainer runs one after another in one launch of processes (for the tests): each process imports
torch, diffusers and the trainers once, instead of once per run, which is most of a tiny run's time.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/runs_in_one_launch.py RUNS.json

RUNS.json: a list of [script, [argument, ...]]. Each run is the trainer's own main() on its own command
line; accelerate's end_training (which destroys the process group) keeps the group for the next run. An
entry [script, [...], "kill-after-checkpoint"] has its main process killed (SIGKILL, as a crash or an
out-of-memory kill would) right after its first checkpoint is written, which ends the launch: put it last.
"""

import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch.distributed as dist  # noqa: E402
from accelerate import Accelerator  # noqa: E402

import rundir  # noqa: E402

Accelerator.end_training = lambda self: None  # the process group stays up for the next run


def main():
    save_checkpoint = rundir.save_checkpoint
    for script, argv, *kill in json.loads(Path(sys.argv[1]).read_text()):
        if kill:

            def save_then_die(*args, **kwargs):
                save_checkpoint(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)

            rundir.save_checkpoint = save_then_die
        start = time.perf_counter()
        module = importlib.import_module(script.removesuffix(".py"))
        module.main(module.cli(argv))
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"finished: {script} {' '.join(argv)} ({time.perf_counter() - start:.1f} s)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
