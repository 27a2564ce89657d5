"""Run every benchmark in bench/ (each in its own process) and print one JSON summary.

Usage: `make bench` or `.venv/bin/python bench/run_all.py [--only train,score]`. Each benchmark
prints one JSON object; a failing one is reported with its error and does not stop the others.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("prepare", "generate", "augment", "train", "encode", "score", "serve")


def run_one(name: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / f"{name}.py")], capture_output=True,
                          text=True, cwd=HERE.parent)
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"], "seconds": seconds}
    text = proc.stdout
    try:  # the JSON object is the last thing each benchmark prints
        result = json.loads(text[text.index("{"):])
    except ValueError:
        return {"error": ["no JSON in the output"], "seconds": seconds}
    result["wall_seconds"] = seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(ORDER), help="comma-separated subset")
    names = [n for n in parser.parse_args().only.split(",") if n]
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(ORDER)}")
    summary = {}
    for name in names:
        print(f"running bench/{name}.py ...", file=sys.stderr, flush=True)
        summary[name] = run_one(name)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
