"""Print what a user needs to know about LLLite files.

    python tools/lllite_info.py controllllite_v01032064e_sdxl_canny.safetensors [more files ...]

Exit code 2 when any file is not an LLLite file or is damaged (a one-line error per file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.console_logging import take_over_console  # noqa: E402

take_over_console()  # before any third-party import: some libraries log while being imported

from library.errors import UserError  # noqa: E402
from library.sdxl.weights_io import read_weights  # noqa: E402
from networks.control_net_lllite import describe_state_dict  # noqa: E402


def describe_file(path: str) -> str:
    sd, metadata = read_weights(path, "LLLite file")
    info = describe_state_dict(sd)
    size_mb = Path(path).stat().st_size / 1e6
    depth = ", ".join(f"depth {d}: {n}" for d, n in info["modules_per_depth"].items())
    lines = [
        f"{path}",
        f"  modules:        {info['modules']} ({depth}){'  [includes output blocks]' if info['output_blocks'] else ''}",
        f"  cond_emb_dim:   {info['cond_emb_dim']}",
        f"  network_dim:    {info['network_dim']}",
        f"  dtype:          {info['dtype']}",
        f"  parameters:     {info['parameters']:,} ({size_mb:.1f} MB on disk)",
        f"  blocks:         {', '.join(info['blocks'])}",
    ]
    if metadata:
        lines.append("  metadata:")
        for key in sorted(metadata):
            value = metadata[key]
            lines.append(f"    {key}: {value if len(value) <= 200 else value[:200] + '...'}")
    else:
        lines.append("  metadata:       (none)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="LLLite .safetensors/.pt/.ckpt files")
    args = parser.parse_args(argv)
    status = 0
    for path in args.files:
        try:
            print(describe_file(path))
        except UserError as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
