"""Worker of tests/test_parallel_render.py: ``hallo3 render`` (the real CLI entry point) on a torchrun
rank where one rank fails on purpose.

    python -m torch.distributed.run --nproc-per-node 2 tests/parallel_render_worker.py FAIL_RANK FAIL_CALL -- render ...

On rank ``FAIL_RANK`` the ``FAIL_CALL``-th denoiser call (1-based) raises a RuntimeError; everything
else is the unchanged command.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    fail_rank, fail_call = int(sys.argv[1]), int(sys.argv[2])
    argv = sys.argv[sys.argv.index("--") + 1:]
    from hallo3_cli import cli
    from hallo3_cli.pipeline_hallo3 import Hallo3Pipeline

    if int(os.environ["RANK"]) == fail_rank:
        original = Hallo3Pipeline.guided_velocity
        calls = {"n": 0}

        def failing(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == fail_call:
                raise RuntimeError(f"injected failure on rank {fail_rank}")
            return original(self, *args, **kwargs)

        Hallo3Pipeline.guided_velocity = failing
    cli.main(argv)


if __name__ == "__main__":
    main()
