"""Lists pixeldance's command lines: `python -m pixeldance --help`.

Each entry point runs as `python -m MODULE --flags` (`MODULE --help` for its flags); the
`pixeldance` console script is `python -m pixeldance.main`. The description of each is the first
paragraph of its module's docstring, read from the source file without importing it: the listing
cannot go stale and costs no JAX import. tests/test_packaging.py checks that every module under
pixeldance/ with a `__main__` block is listed here and imports.
"""
import ast
import os
import sys
import textwrap

# (heading, modules), in the order a user meets them.
ENTRY_POINTS = (
    ("Train, sample, evaluate", (
        "pixeldance.main",
        "pixeldance.sample",
        "pixeldance.evaluate",
    )),
    ("Data", (
        "pixeldance.data.tfds_build",
    )),
    ("Convert pretrained weights", (
        "pixeldance.convert.wan",
        "pixeldance.convert.wan_vae",
        "pixeldance.convert.wan_dit",
        "pixeldance.convert.text_encoder",
        "pixeldance.convert.clip",
        "pixeldance.convert.i3d",
        "pixeldance.convert.inception",
        "pixeldance.convert.c3d",
    )),
    ("Tools", (
        "pixeldance.tools.plan",
        "pixeldance.tools.sweep",
        "pixeldance.tools.metrics",
        "pixeldance.tools.paper_tables",
        "pixeldance.tools.ablation_table",
        "pixeldance.tools.export_dit",
    )),
)

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_WIDTH = 100


def source_path(module: str) -> str:
    """pixeldance.a.b -> <package dir>/a/b.py (no import)."""
    return os.path.join(_PACKAGE_DIR, *module.split(".")[1:]) + ".py"


def summary(module: str) -> str:
    """The first paragraph of the module's docstring, on one line; '' without a docstring."""
    with open(source_path(module), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read()), clean=True) or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def listing() -> str:
    names = [m for _, modules in ENTRY_POINTS for m in modules]
    col = max(len(m) for m in names) + 4
    lines = ["usage: python -m MODULE [--flags]   (python -m MODULE --help for its flags)", "",
             "pixeldance's command lines; the `pixeldance` console script runs pixeldance.main."]
    for heading, modules in ENTRY_POINTS:
        lines += ["", heading + ":"]
        for module in modules:
            text = textwrap.wrap(summary(module), _WIDTH - col) or [""]
            lines.append(f"  {module:<{col - 2}}{text[0]}")
            lines += [" " * col + t for t in text[1:]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv and argv[0] not in ("-h", "--help", "help"):
        print(f"error: python -m pixeldance takes no arguments (got {argv[0]!r}); run an entry point "
              "as python -m MODULE, listed by python -m pixeldance --help", file=sys.stderr)
        return 2
    print(listing())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
