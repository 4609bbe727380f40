"""Make PyPI's torchvision importable beside a CPU-only torch: guard its two unguarded fake-op registrations.

[Note: torchvision beside the CPU torch]
PyPI's Linux torchvision wheels are CUDA builds: their compiled ops (`torchvision/_C.so`) link
against `libtorch_cuda.so` and `libc10_cuda.so`, which the CPU torch does not have, so they do not
load. torchvision is written to survive that (`torchvision.extension._has_ops()` is then False and
every compiled op raises torchvision's own "Couldn't load custom C++ ops"), except for two
registrations in `torchvision/_meta_registrations.py`,
`@torch.library.register_fake("torchvision::nms")` and `("torchvision::qnms")`, which are not
guarded and fail at import with `RuntimeError: operator torchvision::nms does not exist`. That
breaks `import torchvision`, and with it `import timm` and transformers' and diffusers' model
classes. Upstream knows it (pytorch/vision#9085, the guard proposed in #9086).

This script applies that guard to the installed file: each of the two decorators becomes
`register_fake` when the ops loaded and the identity otherwise. Nothing else changes: the model
code (all pure Python) works, and only the compiled detection ops (`nms`, `roi_align`, ...) are
unavailable, with torchvision's own error. It is idempotent, a no-op where the ops load (the guard
is then true), and it checks the result by importing torchvision, timm, diffusers and transformers
in a fresh interpreter. Run it after every (re)install of torchvision:

    pip install -c constraints.txt -c constraints-dev.txt -e ".[dev,hf,zoo]" && python .ci/torchvision_cpu.py
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("torchvision_cpu")

UNGUARDED = "@torch.library.register_fake("
GUARDED = "@(torch.library.register_fake if torchvision.extension._has_ops() else lambda _op: lambda f: f)("
ZOO = ("timm", "diffusers", "transformers")  # importable only if torchvision is


def patch(path: Path) -> int:
    """Guard every unguarded `register_fake` decorator in `path`; return how many were changed."""
    lines = path.read_text().splitlines(keepends=True)
    changed = 0
    for i, line in enumerate(lines):
        if line.startswith(UNGUARDED):
            lines[i] = GUARDED + line[len(UNGUARDED) :]
            changed += 1
    if changed:
        path.write_text("".join(lines))
    return changed


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="torchvision_cpu: %(message)s")
    spec = importlib.util.find_spec("torchvision")  # locates the package without importing it
    if spec is None or spec.origin is None:
        log.info("torchvision is not installed: nothing to do")
        return 0
    target = Path(spec.origin).parent / "_meta_registrations.py"
    if not target.exists():
        log.error("%s not found: an unknown torchvision layout; pin torchvision==0.28.0", target)
        return 1
    log.info("guarded %d fake-op registration(s) in %s", patch(target), target)
    names = ["torchvision", *(n for n in ZOO if importlib.util.find_spec(n) is not None)]
    check = f"import {', '.join(names)}; torchvision.models.resnet50()"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    if out.returncode != 0:
        log.error("still not importable:\n%s", out.stderr[-2000:])
        return 1
    log.info("ok: %s", check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
