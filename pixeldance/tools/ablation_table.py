r"""Our version of the paper's Table 3: ablation workdirs side by side, with the paper's numbers.

  python -m pixeldance.tools.ablation_table \
      --rows=full=workdirs/shapes,t2v=workdirs/shapes_t2v,no_text=workdirs/shapes_no_text,no_last=workdirs/shapes_no_last \
      --output=table3.json

(The recorded run, its commands and its rows: benchmarks/results/table3_shapes.json.)

Each row is `NAME=WORKDIR`, a workdir whose `sample` stage wrote `faithfulness.json` (the
synthetic-world evaluator's report: per mode T2V / I2V / FLF2V and split seen / heldout / all,
colour, direction and consistency accuracies in [0, 1], first- and last-frame PSNR in dB). Rows
named after the paper's ablations (`full`, `t2v`, `no_text`, `no_last`) also show the paper's
UCF-101 FID / FVD for that row (`PAPER_TABLE3`, from Table 3 of Zeng et al., "Make Pixels Dance",
arXiv 2311.10982; lower is better there, higher is better in ours). Other names (e.g. `eps`,
`factorised`) are printed without.

Prints a Markdown table (held-out combinations, except consistency and the PSNRs, which use all
128 videos per mode) and, with --output, writes the rows and the full reports as JSON.
"""
from __future__ import annotations

import argparse
import json
import os

from pixeldance import cli
from pixeldance.evaluators import samples

# The paper's ablation on UCF-101 (FID, FVD; lower is better), by our experiment names.
PAPER_TABLE3 = {
    "t2v": ("text-to-video baseline (no image instructions)", 59.35, 450.58),
    "full": ("PixelDance", 49.36, 242.82),
    "no_text": ("without text", 51.26, 375.79),
    "no_last": ("trained without the last frame", 49.45, 339.08),
}
EXPERIMENT_FILES = {"full": "experiments/shapes.py", "t2v": "experiments/shapes_t2v.py",
                    "no_text": "experiments/shapes_no_text.py", "no_last": "experiments/shapes_no_last.py",
                    "eps": "experiments/shapes_eps.py", "flow": "experiments/shapes_flow.py",
                    "velocity": "experiments/shapes_velocity.py", "concat": "experiments/shapes_concat.py",
                    "factorised": "experiments/shapes_factorised.py"}
# (column header, mode, split, metric, format)
COLUMNS = (
    ("T2V colour", "T2V", "heldout", "colour_acc", "{:.3f}"),
    ("T2V direction", "T2V", "heldout", "direction_acc", "{:.3f}"),
    ("I2V colour", "I2V", "heldout", "colour_acc", "{:.3f}"),
    ("I2V direction", "I2V", "heldout", "direction_acc", "{:.3f}"),
    ("FLF2V direction", "FLF2V", "heldout", "direction_acc", "{:.3f}"),
    ("I2V consistent", "I2V", "all", "consistency_acc", "{:.2f}"),
    ("first-frame PSNR", "I2V", "all", "first_psnr", "{:.1f} dB"),
    ("last-frame PSNR", "FLF2V", "all", "last_psnr", "{:.1f} dB"),
)

def parse_rows(spec: str) -> list[tuple[str, str]]:
    """'a=DIR1,b=DIR2' -> [('a', 'DIR1'), ('b', 'DIR2')]; a malformed entry is a one-line error."""
    rows = []
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, workdir = part.partition("=")
        if not sep or not name.strip() or not workdir.strip():
            raise ValueError(f"bad --rows entry {part!r}: want NAME=WORKDIR")
        rows.append((name.strip(), workdir.strip()))
    if not rows:
        raise ValueError("--rows is empty: give NAME=WORKDIR,...")
    return rows


def load_report(workdir: str) -> dict:
    path = os.path.join(workdir, samples.REPORT)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: run the sample stage of that workdir first "
                                f"(--config.mode=sample)")
    try:
        with open(path) as f:
            report = json.load(f)
    except ValueError as e:  # truncated or garbled
        raise ValueError(f"{path} is not a faithfulness report: {cli.first_line(e)}") from None
    if not isinstance(report, dict):
        raise ValueError(f"{path} is not a faithfulness report: not a JSON object")
    return report


def table_rows(rows: list[tuple[str, str]]) -> list[dict]:
    """One dict per row: name, workdir, our metrics by column header, the paper's numbers."""
    out = []
    for name, workdir in rows:
        report = load_report(workdir)
        metrics = {}
        for header, mode, split, key, _ in COLUMNS:
            value = report.get(mode, {}).get(split, {}).get(key)
            metrics[header] = value
        paper = PAPER_TABLE3.get(name)
        out.append(dict(name=name, workdir=workdir, experiment=EXPERIMENT_FILES.get(name), metrics=metrics,
                        paper=None if paper is None else dict(row=paper[0], ucf101_fid=paper[1], ucf101_fvd=paper[2]),
                        report=report))
    return out


def markdown(rows: list[dict]) -> str:
    headers = ["row"] + [c[0] for c in COLUMNS] + ["paper: UCF-101 FID / FVD"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [r["name"] if r["paper"] is None else f"{r['name']} ({r['paper']['row']})"]
        for header, *_, fmt in COLUMNS:
            v = r["metrics"][header]
            cells.append("–" if v is None else fmt.format(v))
        cells.append("" if r["paper"] is None else f"{r['paper']['ucf101_fid']} / {r['paper']['ucf101_fvd']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@cli.one_line_errors
def main(argv=None):
    # argparse, not absl flags: absl's flags are global, and other modules define --output too.
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", required=True, help="NAME=WORKDIR,NAME=WORKDIR,... (each with faithfulness.json)")
    p.add_argument("--output", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    rows = table_rows(parse_rows(args.rows))
    print(markdown(rows))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(dict(columns=[c[:4] for c in COLUMNS], rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
