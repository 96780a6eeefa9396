r"""The paper's Tables 1-3 with its numbers, and ours beside them.

  python -m pixeldance.tools.paper_tables [--workdirs=DIR1,DIR2,...] [--results=FILE1.json,...]

Each recorded evaluation of ours is a result of `python -m pixeldance.evaluate` (DIR/eval/
<protocol>.json, every one found in each workdir) or of `python -m pixeldance.tools.metrics`
(--results). It joins the table of its protocol as a row of ours, named after its workdir (or
file) and DiT step: Table 1 takes `msrvtt_zeroshot` (and `_b32`), Tables 2 and 3 take
`ucf101_pixeldance`; results under other protocols (the synthetic world's `shapes_17f`, StyleGAN-V's
`fvd2048_16f`) get a table of their own, without paper numbers, since nothing published was
measured that way. Under each table: the protocol it was computed with.
"""
from __future__ import annotations

import glob
import json
import os

from absl import flags

from pixeldance import cli
from pixeldance.metrics import protocols
from pixeldance.tools.ablation_table import PAPER_TABLE3

FLAGS = flags.FLAGS

# Published numbers (Zeng et al., "Make Pixels Dance", arXiv 2311.10982, Tables 1-2; Table 3 is
# ablation_table.PAPER_TABLE3). None: not reported.
PAPER_TABLE1 = (  # MSR-VTT zero-shot: (method, CLIPSIM, FVD)
    ("CogVideo (En)", 0.2631, 1294), ("MagicVideo", None, 1290), ("LVDM", 0.2381, 742),
    ("Video-LDM", 0.2929, None), ("InternVid", 0.2951, None), ("ModelScope", 0.2939, 550),
    ("Make-A-Video", 0.3049, None), ("Latent-Shift", 0.2773, None), ("VideoFactory", 0.3005, None),
    ("PixelDance (paper)", 0.3125, 381))
PAPER_TABLE2 = (  # UCF-101 zero-shot: (method, IS, FID, FVD)
    ("CogVideo (En)", 25.27, 179.00, 701.59), ("MagicVideo", None, 145.00, 699.00),
    ("LVDM", None, None, 641.80), ("InternVid", 21.04, 60.25, 616.51),
    ("Video-LDM", 33.45, None, 550.61), ("ModelScope", None, None, 410.00),
    ("VideoFactory", None, None, 410.00), ("Make-A-Video", 33.00, None, 367.23),
    ("VidRD", 39.37, None, 363.19), ("Dysen-VDM", 35.57, None, 325.42),
    ("PixelDance (paper)", 42.10, 49.36, 242.82))
TABLES = (  # (title, protocols, metric columns, paper rows)
    ("Table 1: MSR-VTT, zero-shot text-to-video", ("msrvtt_zeroshot", "msrvtt_zeroshot_b32"),
     ("clipsim", "fvd"), PAPER_TABLE1),
    ("Table 2: UCF-101, zero-shot text-to-video", ("ucf101_pixeldance",), ("is", "fid", "fvd"),
     PAPER_TABLE2),
    ("Table 3: ablation on UCF-101", ("ucf101_pixeldance",), ("fid", "fvd"),
     tuple((f"{label} (paper)", fid, fvd) for label, fid, fvd in PAPER_TABLE3.values())),
)
FORMATS = {"clipsim": "{:.4f}", "fvd": "{:.2f}", "fid": "{:.2f}", "is": "{:.2f}"}
HEADERS = {"clipsim": "CLIPSIM ↑", "fvd": "FVD ↓", "fid": "FID ↓", "is": "IS ↑"}


def read_results(workdirs: list[str], files: list[str]) -> list[tuple[str, dict]]:
    """(row name, result) of every recorded evaluation; one-line ValueError for unreadable files."""
    found = []
    for d in workdirs:
        if not os.path.isdir(d):
            raise ValueError(f"workdir not found: {d}")
        for path in sorted(glob.glob(os.path.join(d, "eval", "*.json"))):
            found.append((f"{os.path.basename(os.path.normpath(d))}", path))
    found += [(os.path.splitext(os.path.basename(f))[0], f) for f in files]
    out = []
    for name, path in found:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(result, dict) or "protocol" not in result:
            raise ValueError(f"{path}: not a metrics result (no 'protocol')")
        step = result.get("step")
        if result.get("name", result["protocol"]) != result["protocol"]:
            name += f" [{result.get('mode')}]"  # evaluated in another mode than the protocol's
        out.append((f"ours: {name}" + (f" (step {step})" if step is not None else ""), result))
    return out


def _cell(value, metric) -> str:
    return "–" if value is None else FORMATS[metric].format(value)


def format_table(title: str, columns, rows, notes: list[str]) -> str:
    lines = [f"### {title}", "", "| Method | " + " | ".join(HEADERS[c] for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, values in rows:
        lines.append(f"| {name} | " + " | ".join(_cell(v, c) for v, c in zip(values, columns)) + " |")
    return "\n".join(lines + [""] + notes + [""])


def tables(results: list[tuple[str, dict]]) -> str:
    out, used = [], set()
    for title, names, columns, paper in TABLES:
        ours = [(n, r) for n, r in results if r["protocol"] in names]
        used |= {id(r) for _, r in ours}
        rows = [(row[0], row[1:]) for row in paper]
        rows += [(n, tuple(r.get(c) for c in columns)) for n, r in ours]
        notes = [f"Ours: protocol `{p}` — {protocols.get(p).summary}" for p in names]
        notes.append("Paper rows: the paper's own numbers (its protocol is only partly stated; "
                     "see refs in README \"Evaluation protocols\").")
        out.append(format_table(title, columns, rows, notes))
    rest: dict[str, list] = {}
    for n, r in results:
        if id(r) not in used:
            rest.setdefault(r["protocol"], []).append((n, r))
    for name, ours in sorted(rest.items()):
        columns = [m for m in protocols.METRICS if any(m in r for _, r in ours)]
        rows = [(n, tuple(r.get(c) for c in columns)) for n, r in ours]
        summary = protocols.PROTOCOLS[name].summary if name in protocols.PROTOCOLS else "(unknown protocol)"
        out.append(format_table(f"Protocol {name} (no published numbers)", columns, rows,
                                [f"Protocol `{name}` — {summary}"]))
    return "\n".join(out)


def main(argv):
    del argv
    results = read_results([d for d in FLAGS.workdirs or [] if d], [f for f in FLAGS.results or [] if f])
    print(tables(results))


def run():
    flags.DEFINE_list("workdirs", [], "Workdirs evaluated with python -m pixeldance.evaluate.")
    flags.DEFINE_list("results", [], "JSON results of python -m pixeldance.tools.metrics.")
    cli.run(main)


if __name__ == "__main__":
    run()
