"""Regenerate (or check) every quoted command output in README.md and docs/.

    python -m scripts.tools.doc_outputs            # rewrite the marked blocks in place
    python -m scripts.tools.doc_outputs --check    # exit 1 naming each block whose output changed (CI)

A quoted output is a fenced block right after the marker line ``<!-- doc-output -->``; inside it,
every line starting with ``$ `` is a command and the lines up to the next command are what it
printed. The commands of one block run in order, in one fresh temporary directory (so a later
command sees the files an earlier one wrote, e.g. a checkpoint), with ``scripts`` linked there and
this interpreter's directory first on ``PATH`` (``python``, ``torchrun`` and ``sharded-shampoo`` are
the installed ones). Paths into the temporary directory are printed relative to it. A file a
command writes under ``docs/`` (a chart) lands in the temporary directory's ``docs/`` and is copied
into the repository's, unless ``--check`` (which writes nothing). Quoted outputs must be deterministic: leave timings
out of them (``scripts/train.py --no-timings``); docs/benchmarks.md's measurements are not
quoted outputs (each names the command that produced it).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- doc-output -->"
FENCE = re.compile(r"^(```+)[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
PROMPT = "$ "


@dataclass
class Block:
    """One marked fenced block of a Markdown file: where its body is, and the commands in it."""

    path: Path
    line: int
    start: int           # offsets of the body (between the fences) in the file's text
    end: int
    body: str

    def commands(self) -> list[str]:
        return [ln[len(PROMPT):] for ln in self.body.splitlines() if ln.startswith(PROMPT)]


def find_blocks(path: Path) -> list[Block]:
    """Every fenced block that follows a marker line in ``path``."""
    text = path.read_text()
    blocks = []
    for m in re.finditer(re.escape(MARKER) + r"[ \t]*\n", text):
        fence = FENCE.match(text, m.end())
        if fence is None:
            raise SystemExit(f"{path}:{text[:m.start()].count(chr(10)) + 1}: {MARKER} is not followed by a fenced block")
        blocks.append(Block(path, text[:fence.start(2)].count("\n") + 1, fence.start(2), fence.end(2), fence[2]))
    return blocks


def run_block(block: Block, check: bool) -> str:
    """The block's body with every command's output replaced by what it prints now."""
    commands = block.commands()
    if not commands:
        raise SystemExit(f"{block.path}:{block.line}: a {MARKER} block needs at least one '{PROMPT}command' line")
    out_lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="doc_outputs_") as work:
        os.symlink(ROOT / "scripts", os.path.join(work, "scripts"))
        os.makedirs(os.path.join(work, "docs", "img"))
        # one thread per process whatever the caller's environment: the training transcript's losses depend
        # on the BLAS thread count (its rounding), and CI exports OMP_NUM_THREADS=2
        env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                   PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
        for command in commands:
            proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                                  timeout=600)
            if proc.returncode != 0:
                raise SystemExit(f"{block.path}:{block.line}: `{command}` exited {proc.returncode}:\n"
                                 f"{proc.stdout}{proc.stderr}")
            printed = proc.stdout.replace(work + os.sep, "").replace(work, ".")
            out_lines.append(PROMPT + command)
            out_lines.extend(printed.rstrip("\n").splitlines())
        if not check:
            for made in Path(work, "docs").rglob("*"):
                if made.is_file():
                    shutil.copyfile(made, ROOT / made.relative_to(work))
    return "\n".join(out_lines) + "\n"


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a quoted output changed")
    ap.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md and docs/*.md)")
    args = ap.parse_args(argv)
    stale = []
    for path in [p.resolve() for p in args.files] or markdown_files():
        blocks = find_blocks(path)
        if not blocks:
            continue
        text = path.read_text()
        for block in reversed(blocks):                 # back to front: earlier offsets stay valid
            fresh = run_block(block, args.check)
            if fresh != block.body:
                where = f"{path.relative_to(ROOT)}:{block.line}"
                stale.append(where)
                diff = difflib.unified_diff(block.body.splitlines(), fresh.splitlines(), "quoted", "now", lineterm="")
                print(f"{where}: the quoted output {'differs' if args.check else 'was updated'}\n" + "\n".join(diff))
                text = text[:block.start] + fresh + text[block.end:]
        if not args.check:
            path.write_text(text)
    total = sum(len(find_blocks(p)) for p in markdown_files())
    print(f"{total} quoted outputs, {len(stale)} {'stale' if args.check else 'updated'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
