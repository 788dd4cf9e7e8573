"""Cold start per backend: seconds from `docker run` to the first 200 chat answer seen from the host.

Usage: .venv/bin/python bench/cold_start.py [--runs 3] [--image BACKEND=IMG ...]
Defaults to the images `make e2e` builds (e2e-chatglmcpp:test, e2e-llamacpp:test, e2e-xinference:test).
Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder import backends  # noqa: E402
from builder.demo import model as demo  # noqa: E402
from builder.runtime.smoke import chat  # noqa: E402

DOCKER = "/usr/bin/docker"
KEY = "bench-key"


def cold_start(backend: str, image: str, served: str, host_port: int, timeout: float = 600) -> float:
    name = f"bench-cold-{backend}"
    subprocess.run([DOCKER, "rm", "-f", name], capture_output=True)
    start = time.monotonic()
    subprocess.run(
        [
            DOCKER,
            "run",
            "-d",
            "--name",
            name,
            "-p",
            f"127.0.0.1:{host_port}:{backends.get(backend).port}",
            "-e",
            f"{backends.get(backend).api_key_var}={KEY}",
            image,
        ],
        check=True,
        capture_output=True,
    )
    try:
        while time.monotonic() - start < timeout:
            try:
                chat(
                    f"http://127.0.0.1:{host_port}",
                    served,
                    [{"role": "user", "content": demo.CHANGED_PROMPT}],
                    api_key=KEY,
                    max_tokens=16,
                    temperature=0,
                    timeout=30,
                )
                return time.monotonic() - start
            except Exception:  # refused, reset, or 4xx/5xx while the model is still launching
                time.sleep(0.1)
        raise TimeoutError(f"{backend}: no answer within {timeout}s")
    finally:
        subprocess.run([DOCKER, "rm", "-f", name], capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--served-model-name", default="base")
    parser.add_argument("--image", action="append", default=[], help="backend=image")
    args = parser.parse_args()
    images = {b.name: f"e2e-{b.name}:test" for b in backends.REGISTRY.values() if not b.gpu}  # what make e2e built
    images.update(dict(item.split("=", 1) for item in args.image))
    print(f"{'backend':<12} {'runs':>4} {'median s':>9} {'min s':>7} {'max s':>7}")
    for i, (backend, image) in enumerate(images.items()):
        times = [cold_start(backend, image, args.served_model_name, 18500 + i) for _ in range(args.runs)]
        print(f"{backend:<12} {len(times):>4} {statistics.median(times):>9.2f} {min(times):>7.2f} {max(times):>7.2f}")


if __name__ == "__main__":
    main()
