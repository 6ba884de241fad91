"""Step hooks that simulate faults in a training process a test starts (``engine.STEP_HOOK_ENV``).

A test sets ``REPRODUCE_STEP_HOOK=tests.fault_hooks:<hook>`` and the hook's own variable in the
child's environment (see :func:`hook_env`); the production code knows only the generic hook.
"""
from __future__ import annotations

import os
import signal

from reproduce.train.engine import STEP_HOOK_ENV

KILL_AFTER_STEPS = "FAULT_KILL_AFTER_STEPS"  # N: SIGKILL after N optimizer steps
FAIL_AT = "FAULT_FAIL_AT"  # RANK:STEP: raise on RANK after optimizer step STEP


def hook_env(hook: str, value: str) -> dict[str, str]:
    """The environment entries that arm ``hook`` (kill_after_steps or fail_at) with ``value``."""
    variable = {"kill_after_steps": KILL_AFTER_STEPS, "fail_at": FAIL_AT}[hook]
    return {STEP_HOOK_ENV: f"tests.fault_hooks:{hook}", variable: value}


def kill_after_steps(step: int, rank: int) -> None:
    """A crash that saves nothing: SIGKILL once the run has taken ``$FAULT_KILL_AFTER_STEPS`` steps."""
    if step >= int(os.environ[KILL_AFTER_STEPS]):
        os.kill(os.getpid(), signal.SIGKILL)


def fail_at(step: int, rank: int) -> None:
    """An exception on one rank only, after the given step (the other ranks must not hang)."""
    failing_rank, failing_step = map(int, os.environ[FAIL_AT].split(":"))
    if (rank, step) == (failing_rank, failing_step):
        raise RuntimeError(f"simulated failure on rank {rank} at step {step}")
