"""`python -m builder.runtime.xinference [--health]`: the Xinference image's entrypoint and HEALTHCHECK.

XINFERENCE_ROLE picks the process: local (default: xinference-local, process.py), supervisor or
worker (Xinference's distributed mode, cluster.py). Exit codes: Xinference's own (128+N when killed
by signal N); 1: a setup step failed once Xinference was started, or unhealthy; 2: nothing was started
(bad settings, model folder or auth store).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from builder.runtime.xinference.cluster import run_role
from builder.runtime.xinference.config import BootError, env_value, log, parse_args
from builder.runtime.xinference.process import boot, health


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv, env)
        if (env_value(os.environ if env is None else env, "XINFERENCE_ROLE") or "local").strip().lower() != "local":
            return run_role(cfg, args, env)
        if args.health:
            return health(cfg, args.health_timeout)
        return boot(cfg, env)
    except BootError as e:
        log(f"error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
