"""``pipepart export``: a pipeline checkpoint as one whole-model file (or a transformers folder)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from partition.errors import CheckpointError
from pipeline.cli.flags import add_command

__all__ = ["register"]

_EPILOG = """The checkpoint's every rank's part is read and the whole model's state_dict written as one
safetensors file — loadable by model.load_state_dict(safetensors.torch.load_file(OUT)) and by
`pipepart run --checkpoint OUT` under any split. With --model hf:NAME and an OUT that is not a
.safetensors file, OUT becomes a folder transformers' from_pretrained reads.

examples:
  pipepart export ckpt model.safetensors            # the newest complete checkpoint in ckpt/
  pipepart export ckpt/step-00000100 model.safetensors
  pipepart export ckpt gpt2-finetuned --model hf:gpt2 --size tiny
"""


def register(sub: Any) -> None:
    """Add ``export`` to the sub-command parsers ``sub``."""
    export = add_command(
        sub,
        "export",
        _cmd_export,
        help="assemble a pipeline checkpoint into one whole-model safetensors file",
        epilog=_EPILOG,
        json_help="print one JSON object",
    )
    export.add_argument("checkpoint", help="a step-N checkpoint directory, or the folder of them")
    export.add_argument("out", help="a .safetensors file, or (with --model hf:...) a folder")
    export.add_argument(
        "--model", default=None, help="hf:NAME: write a from_pretrained folder for this model"
    )
    export.add_argument("--size", default="", help="size of the --model (as for pipepart run)")


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.checkpoint.save_load import export_checkpoint

    out = Path(args.out)
    pretrained = out.suffix != ".safetensors"
    if pretrained and args.model is None:
        raise CheckpointError(
            f"{out} is not a .safetensors file: name one, or give --model hf:NAME to write a "
            "from_pretrained folder"
        )
    written = _pretrained(args, out) if pretrained else export_checkpoint(args.checkpoint, out)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "out": str(written)}))
    else:
        print(f"wrote {written}")
    return 0


def _pretrained(args: argparse.Namespace, out: Path) -> Path:
    """A ``save_pretrained`` folder of ``args.model`` holding the checkpoint's weights."""
    import tempfile

    import torch
    from safetensors.torch import load_file

    from partition.models.registry import resolve
    from pipeline.checkpoint.save_load import export_checkpoint

    spec = resolve(args.model, size=args.size)
    with torch.device("meta"):
        model = spec.build().model
    if not hasattr(model, "save_pretrained"):
        raise CheckpointError(
            f"{args.model} is not a transformers model (no save_pretrained); export to a "
            ".safetensors file instead"
        )
    with tempfile.TemporaryDirectory(prefix="pipepart-export-") as tmp:
        state = load_file(str(export_checkpoint(args.checkpoint, Path(tmp) / "model.safetensors")))
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
            raise CheckpointError(
                f"the checkpoint is not a {args.model} (size {args.size or 'default'}): missing "
                f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
        save: Any = model.save_pretrained
        save(str(out))
    return out
