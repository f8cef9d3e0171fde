"""`python -m tests.paced_node node --id N ...` is `pipeserve node` whose every forward first
sleeps STEP_S, so a request of N steps takes at least N x STEP_S x parts in a process cluster
however fast the engine is: for tests that need a request still running at some moment (a
SIGKILL, a cancel, a Stop click). `ProcessCluster(..., node_module=PACED_NODE)` runs nodes so;
tests/harness.py's `paced` does the same in-process."""

from __future__ import annotations

import sys
import time
from typing import Any

from pipeserve import cli
from pipeserve.node.runner import StageRunner

PACED_NODE = "tests.paced_node"
STEP_S = 0.02

_forward = StageRunner.forward


def _paced(self: StageRunner, *args: Any, **kw: Any) -> Any:
    time.sleep(STEP_S)
    return _forward(self, *args, **kw)


if __name__ == "__main__":
    StageRunner.forward = _paced  # type: ignore[method-assign]
    sys.exit(cli.main())
