"""Development runs on bench/win_heldout.py's GPT: variants of the recipe on the validation split
with development seeds (never the held-out check's seeds 300/301), to find what could lift the
default's share of the gap without looking at the check itself.

    python bench/win_heldout_dev.py teacher 400,401         # the 2x teachers, cached in --out
    python bench/win_heldout_dev.py 'vanilla@0.01,default,first@0.01' 400,401
    python bench/win_heldout_dev.py 'recipe:{"temperature": 2.0}' 400,401

Variants: "vanilla@LR" and "kd@LR" (the user's loop), "SELECT@LR" (sample_from_teacher with
select=SELECT, then the user's KD loop: "first" is the naive slice; "@LR+": the user's loop with
the library's fine-tuning decay and betas), "default"
(`Recipe(steps=1200)`), "recipe:JSON" (the default with those fields set). Each result is appended
to OUT/results.jsonl; the share of the gap is printed per layout and seed at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import win_heldout as held  # noqa: E402

from surgery import win  # noqa: E402

STEPS = 1200


def _setup(layout: str, seed: int, out: Path) -> tuple[dict, list, torch.nn.Module]:
    """The splits, the training order and the teacher of `seed` (trained once, cached in `out`)."""
    torch.set_num_threads(1)
    data, train = held.splits(seed)
    path = out / f"teacher_{layout}_{seed}.pt"
    if not path.exists():
        torch.save(held.trained_teacher(layout, seed, train, STEPS).state_dict(), path)
    teacher = held.model(layout, wide=True)
    teacher.load_state_dict(torch.load(path))
    return data, train, teacher.eval()


def _variant(name: str, layout: str, seed: int, train: list, teacher: torch.nn.Module):
    torch.manual_seed(seed + 1)
    student = held.model(layout, wide=False)
    x = train[0][0][:2]
    if name == "default" or name.startswith("recipe:"):
        fields = json.loads(name.split(":", 1)[1]) if ":" in name else {}
        return win.win(student, teacher, train, x, win.Recipe(**{"steps": STEPS, **fields})).thin
    how, lr = name.split("@")
    linear = lr.endswith("+")  # the user's loop with the library's decay and betas
    if how not in ("vanilla", "kd"):
        win.sample_from_teacher(student, teacher, x, select=how)
    teaching = None if how == "vanilla" else teacher
    held.fit(student, train, STEPS, float(lr.rstrip("+")), teaching, linear=linear)
    return student


def _task(args: tuple[str, int, str, Path]) -> dict:
    layout, seed, name, out = args
    data, train, teacher = _setup(layout, seed, out)
    started = time.time()
    net = teacher if name == "teacher" else _variant(name, layout, seed, train, teacher)
    result = dict(layout=layout, seed=seed, name=name, val=held.bits(net, data["val"]),
                  test=held.bits(net, data["test"]), seconds=time.time() - started)  # fmt: skip
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", help="comma-separated variants (see above)")
    parser.add_argument("seeds", help="comma-separated development seeds, e.g. 400,401")
    parser.add_argument("--layouts", default="packed,separate")
    parser.add_argument("--out", type=Path, default=Path("heldout_dev"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = [
        (layout, int(seed), name, args.out)
        for name in re.split(r",(?![^{]*})", args.variants)  # not the commas inside JSON
        for layout in args.layouts.split(",")
        for seed in args.seeds.split(",")
    ]
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_task, tasks))
    runs = [json.loads(line) for line in open(args.out / "results.jsonl")]
    by = {(r["layout"], r["seed"], r["name"]): r for r in runs}
    for (layout, seed, name), r in sorted(by.items()):
        ends = by.get((layout, seed, "teacher")), by.get((layout, seed, "vanilla@0.01"))
        if None not in ends:
            share = (ends[1]["val"] - r["val"]) / (ends[1]["val"] - ends[0]["val"])
            print(
                f"{layout:9s} {seed} {name:40s} val {r['val']:.4f}  gap closed {100 * share:5.1f}%"
            )


if __name__ == "__main__":
    main()
