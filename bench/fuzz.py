"""Structure-aware fuzzing of every file reader, as a user (or an attacker) reaches them.

Start from valid files of each format (a paired checkpoint as one safetensors file, as Hugging Face
shards with their index, as a torch.distributed.checkpoint directory; a plan JSON given with --plan;
the model source stored in the metadata), mutate fields, lengths, offsets, types and bytes, truncate,
duplicate keys; then drive `surgery fold` (in process, as `main(argv)`), `surgery inspect`,
`surgery.load` and the DCP reader on each input and check, for every one:

- exit 2 with one line on stderr (refused), or an output that loads back and equals the reference
  fold: the mutated input read by an independent reader (the safetensors library, torch's own DCP
  loader) and folded in memory;
- never a traceback (an exception escaping the command, or an exit status other than 0/1/2);
- never an input changed.

    python bench/fuzz.py --per-format 20000 --workers 2      # the bench (prints the counts)
    tests/test_fuzz.py runs a few hundred per format in CI
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import pickle
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMATS = ("safetensors", "index", "dcp", "plan", "source")
OUTCOMES = ("refused", "accepted and correct", "tracebacks", "inputs changed", "wrong outputs")


def fuzz_model() -> nn.Module:
    """The model the valid files hold (a factory `surgery.load` may call untrusted: this module is
    imported by then)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    ).eval()


# ---------------------------------------------------------------- the valid files


@dataclass
class Seed:
    """A valid input of one format: its files (relative path -> bytes) and the command on it."""

    files: dict[str, bytes]
    argv: list[str]  # the fold command, with {dir} for the case's directory


def seeds(root: Path) -> dict[str, Seed]:
    """One valid input per format, built with the library itself."""
    import surgery
    from surgery.files.checkpoint import PLAN_KEY

    torch.manual_seed(0)
    x = torch.randn(2, 8)
    paired = surgery.insert_pairs(fuzz_model(), x, init="random", bias=True)
    source = f"{__name__}:fuzz_model"
    one = root / "one.safetensors"
    surgery.save(paired, one, source=source)
    sharded = root / "sharded"
    surgery.save(paired, sharded, source=source, max_shard_size=2000)
    dcp = root / "dcp"
    surgery.save(paired, dcp, source=source, distributed=True)
    from safetensors import safe_open

    with safe_open(one, "pt") as f:
        plan_text = f.metadata()[PLAN_KEY]

    def files(folder: Path, prefix: str) -> dict[str, bytes]:
        return {f"{prefix}/{p.name}": p.read_bytes() for p in sorted(folder.iterdir())}

    return {
        "safetensors": Seed({"in.safetensors": one.read_bytes()}, ["{dir}/in.safetensors"]),
        "index": Seed(files(sharded, "in"), ["{dir}/in"]),
        "dcp": Seed(files(dcp, "in"), ["{dir}/in"]),
        "plan": Seed(
            {"in.safetensors": one.read_bytes(), "plan.json": plan_text.encode()},
            ["{dir}/in.safetensors", "--plan", "{dir}/plan.json"],
        ),
        "source": Seed({"in.safetensors": one.read_bytes()}, ["{dir}/in.safetensors"]),
    }


# ---------------------------------------------------------------- mutations

INTERESTING = [
    -1, 0, 1, 2, 7, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, -(2**63), 1.5, -0.0,
    "", "x", "F32", "BF16", "../etc", "a/b", "\x00", "pairs.0.widen.weight", None, True, False,
    [], [0], [1, 2], [2**40, 2**40, 0], {}, {"a": 1},
]  # fmt: skip


def _json_paths(value: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _json_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _json_paths(v, (*path, i))
    return out


def _set(root: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    node = root
    for key in path[:-1]:
        node = node[key]
    if delete:
        if isinstance(node, dict):
            node.pop(path[-1], None)
        elif isinstance(node, list) and node:
            node.pop(path[-1])
    else:
        node[path[-1]] = value
    return root


def mutate_json(value: Any, rng: random.Random) -> str:
    """A JSON document mutated by field: a value replaced by an interesting one, a key deleted or
    named twice, a list lengthened or emptied, the text truncated or given Infinity / deep nesting."""
    value = copy.deepcopy(value)
    op = rng.randrange(9)
    paths = _json_paths(value)
    path = rng.choice(paths)
    if op <= 3:
        value = _set(value, path, rng.choice(INTERESTING))
    elif op == 4 and path:
        value = _set(value, path, None, delete=True)
    elif op == 5 and path:
        node = value
        for key in path:
            node = node[key]
        value = _set(value, path, [node, node] if not isinstance(node, list) else node * 2)
    text = json.dumps(value)
    if op == 6 and isinstance(value, dict) and value:  # a key named twice (last or first wins)
        key = rng.choice(list(value))
        twin = json.dumps({key: rng.choice(INTERESTING)})[1:-1]
        text = "{" + twin + ", " + text[1:] if rng.random() < 0.5 else text[:-1] + ", " + twin + "}"
    elif op == 7:
        text = text[: rng.randrange(len(text) + 1)]
    elif op == 8:
        text = rng.choice(
            [text.replace("1", "Infinity", 1), text.replace("0", "NaN", 1), "[" * 5000 + "]" * 5000]
        )
    return text


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Bytes flipped, zeroed, truncated, appended or cut out."""
    data = bytearray(data)
    op = rng.randrange(5)
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(16)))
    at = rng.randrange(len(data))
    if op == 0:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        end = min(len(data), at + rng.randint(1, 64))
        data[at:end] = bytes(end - at)
    elif op == 2:
        del data[at:]
    elif op == 3:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        del data[at : at + rng.randint(1, 64)]
    return bytes(data)


def _safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _safetensors_join(header_text: str, body: bytes) -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(8, "little") + raw + body


def mutate_safetensors(data: bytes, rng: random.Random, *, key: str | None = None) -> bytes:
    """The header mutated as JSON (or only the metadata entry `key`: the plan, the source), or
    the file's bytes."""
    header, body = _safetensors_parts(data)
    if key is not None:
        meta = header["__metadata__"]
        try:
            meta[key] = mutate_json(json.loads(meta[key]), rng)
        except ValueError:
            meta[key] = mutate_bytes(meta[key].encode(), rng).decode("latin-1")
        return _safetensors_join(json.dumps(header), body)
    if rng.random() < 0.7:
        return _safetensors_join(mutate_json(header, rng), body)
    return mutate_bytes(data, rng)


def mutate_dcp_metadata(data: bytes, rng: random.Random) -> bytes:
    """DCP's pickled records with a field changed (sizes, offsets, chunks, dtype, storage), or the
    pickle's bytes."""
    if rng.random() < 0.25:
        return mutate_bytes(data, rng)
    meta = pickle.loads(data)  # our own valid file: trusted here, to craft a hostile one
    records = list(meta.state_dict_metadata.items())
    name, record = rng.choice(records)
    storage = [(k, v) for k, v in meta.storage_data.items() if k.fqn == name]
    op = rng.randrange(8)
    value = rng.choice(INTERESTING)
    chunk = rng.choice(record.chunks) if record.chunks else None
    if op == 0:
        record.size = torch.Size([abs(v) % 2**62 for v in [rng.choice([0, 1, 2**31, 2**62])]])
    elif op == 1 and chunk is not None:
        chunk.offsets = torch.Size([rng.randrange(-1, 40) for _ in chunk.offsets])
    elif op == 2 and chunk is not None:
        chunk.sizes = torch.Size([rng.randrange(0, 40) for _ in chunk.sizes])
    elif op == 3 and chunk is not None:
        record.chunks.append(copy.deepcopy(chunk))
    elif op == 4 and storage:
        info = storage[0][1]
        setattr(info, rng.choice(["offset", "length", "relative_path"]), value)
    elif op == 5:
        record.properties.dtype = rng.choice([torch.int64, torch.float16, None, "F32"])
    elif op == 6:
        meta.storage_data = {k: v for k, v in list(meta.storage_data.items())[1:]}
    else:
        record.size = value
    return pickle.dumps(meta)


def mutate(fmt: str, seed: Seed, rng: random.Random) -> dict[str, bytes]:
    """A mutated copy of a seed's files: one to three mutations stacked (a later one may act on
    what an earlier one made; one that cannot parse it mutates bytes instead)."""
    files = dict(seed.files)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        try:
            files = _mutate_once(fmt, Seed(files, seed.argv), rng)
        except Exception:  # noqa: BLE001 - an earlier mutation broke the structure: bytes then
            name = rng.choice(sorted(files))
            files = {**files, name: mutate_bytes(files[name], rng)}
    return files


def _mutate_once(fmt: str, seed: Seed, rng: random.Random) -> dict[str, bytes]:
    from surgery.files.checkpoint import PLAN_KEY, SOURCE_KEY

    files = dict(seed.files)
    if fmt == "safetensors":
        files["in.safetensors"] = mutate_safetensors(files["in.safetensors"], rng)
    elif fmt == "source":
        files["in.safetensors"] = mutate_safetensors(files["in.safetensors"], rng, key=SOURCE_KEY)
    elif fmt == "plan":
        if rng.random() < 0.8:
            files["plan.json"] = mutate_json(json.loads(files["plan.json"]), rng).encode()
        else:
            files["plan.json"] = mutate_bytes(files["plan.json"], rng)
    elif fmt == "index":
        name = rng.choice(sorted(files))
        if name.endswith(".json"):
            files[name] = mutate_json(json.loads(files[name]), rng).encode()
        elif rng.random() < 0.5:
            files[name] = mutate_safetensors(files[name], rng)
        else:
            files[name] = mutate_bytes(files[name], rng)
    else:
        name = rng.choice(sorted(files))
        if name.endswith(".metadata"):
            files[name] = mutate_dcp_metadata(files[name], rng)
        elif name.endswith("surgery.json"):
            meta = json.loads(files[name])
            key = rng.choice([PLAN_KEY, SOURCE_KEY, "format"])
            if key in meta and key != "format":
                meta[key] = mutate_json(json.loads(meta[key]), rng)
                files[name] = json.dumps(meta).encode()
            else:
                files[name] = mutate_json(meta, rng).encode()
        else:
            files[name] = mutate_bytes(files[name], rng)
    return files


# ---------------------------------------------------------------- the oracle


def reference_fold(fmt: str, folder: Path) -> dict[str, torch.Tensor] | None:
    """The mutated input read by an independent reader and folded in memory (None: that reader
    refuses it too, or the plan does not fold)."""
    from safetensors import safe_open

    from surgery.files.checkpoint import PLAN_KEY
    from surgery.plan import Plan
    from surgery.runtime.fold import fold_state_dict

    try:
        state: dict[str, torch.Tensor] = {}
        if fmt == "dcp":
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            with (
                contextlib.redirect_stderr(io.StringIO()),
                contextlib.redirect_stdout(io.StringIO()),
            ):
                dcp_to_torch_save(folder / "in", folder / "ref.pt")
            state = torch.load(folder / "ref.pt", weights_only=True)
            plan = json.loads((folder / "in" / "surgery.json").read_text())[PLAN_KEY]
        else:
            paths = (
                sorted((folder / "in").glob("*.safetensors"))
                if fmt == "index"
                else [folder / "in.safetensors"]
            )
            if fmt == "index":
                index = json.loads((folder / "in" / "model.safetensors.index.json").read_text())
                plan = index["metadata"][PLAN_KEY]
                if sorted(set(index["weight_map"].values())) != [p.name for p in paths]:
                    return None
            for path in paths:
                with safe_open(path, "pt") as f:
                    state.update({k: f.get_tensor(k) for k in f.keys()})
                    if fmt != "index":
                        plan = f.metadata()[PLAN_KEY]
            if fmt == "plan":
                plan = (folder / "plan.json").read_text()
        if not all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()):
            return None
        return fold_state_dict(state, Plan.from_json(plan))
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - the independent reader refusing is an answer (DCP's
        return None  # CheckpointException is a BaseException)


def _where(error: BaseException | None) -> str:
    """An escaped exception with the innermost frame of this package that raised it."""
    if error is None:
        return "no exception"
    import traceback

    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if "/surgery/" in f.filename or "/cli/" in f.filename or "/rewrites/" in f.filename
    ]
    at = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(error).__name__}: {str(error)[:160]}{at}"


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(("out", "ref", "."))
    }


def _command(argv: list[str]) -> tuple[int | None, str, BaseException | None]:
    """main(argv) in process: (exit status, stderr, the exception that escaped it)."""
    from surgery.cli.main import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 2
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - what the fuzzer is looking for
        return None, err.getvalue(), error
    return code, err.getvalue(), None


def run_case(fmt: str, seed: Seed, files: dict[str, bytes], folder: Path) -> tuple[str, str]:
    """(outcome, detail) of one mutated input (see OUTCOMES)."""
    import surgery
    from surgery.errors import SurgeryError
    from surgery.files.dcpfile import DcpFile

    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    before = _digest(folder)
    argv = [
        "fold",
        *(a.replace("{dir}", str(folder)) for a in seed.argv),
        "--out",
        str(folder / "out.safetensors"),
    ]
    code, err, escaped = _command(argv)
    if escaped is not None or code not in (0, 1, 2):
        return (
            "tracebacks",
            f"fold: {_where(escaped)}" if escaped else f"exit {code}",
        )
    lines = err.strip().splitlines()
    if code == 2 and (len(lines) != 1 or not lines[0].startswith("surgery: error: ")):
        return "tracebacks", f"fold exit 2 with {len(lines)} lines: {err[:300]}"
    target = Path(argv[1])
    for reader in ("load", "inspect", "dcp"):  # the other doors to the same files
        try:
            if reader == "load" and fmt != "dcp":
                surgery.load(target)
            elif reader == "inspect" and fmt in ("safetensors", "source"):
                icode, ierr, iesc = _command(["inspect", str(target), "--no-check"])
                if iesc is not None or icode not in (0, 2):
                    return "tracebacks", f"inspect: {_where(iesc)}"
            elif reader == "dcp" and fmt == "dcp":
                opened = DcpFile(folder / "in")
                for name in opened.entries:
                    opened.read(name)
        except SurgeryError:
            pass
        except Exception as error:  # noqa: BLE001
            return "tracebacks", f"{reader}: {_where(error)}"
    if _digest(folder) != before:
        return "inputs changed", "an input's bytes changed"
    if code == 2:
        return "refused", lines[0]
    if code == 1:
        return "tracebacks", f"fold exit 1: {err[:300]}"
    reference = reference_fold(fmt, folder)
    from safetensors.torch import load_file

    try:
        got = load_file(folder / "out.safetensors")
    except Exception as error:  # noqa: BLE001
        return "wrong outputs", f"the output does not load back: {error}"
    if reference is None:
        return "wrong outputs", "accepted an input the independent reader refuses"
    if got.keys() != reference.keys() or any(
        not torch.equal(got[k], reference[k].to(got[k].dtype)) for k in got
    ):
        return "wrong outputs", "the output differs from the reference fold"
    return "accepted and correct", ""


def fuzz(
    fmt: str, count: int, seed: int = 0, on_case: Callable[[str, str], None] | None = None
) -> Counter:
    """Run `count` mutated inputs of `fmt`; the counts of each outcome (and `examples`: the first
    detail of each bad outcome)."""
    counts: Counter = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "seeds").mkdir()
        valid = seeds(root / "seeds")[fmt]
        rng = random.Random(f"{fmt}-{seed}")
        torch.set_num_threads(1)
        for i in range(count):
            case = root / f"case{i}"
            case.mkdir()
            try:
                outcome, detail = run_case(fmt, valid, mutate(fmt, valid, rng), case)
            finally:
                shutil.rmtree(case, ignore_errors=True)
            counts[outcome] += 1
            if outcome not in ("refused", "accepted and correct"):
                counts[f"example: {outcome}"] = counts.get(f"example: {outcome}") or detail
            if on_case is not None:
                on_case(outcome, detail)
    return counts


def _part(args: tuple[str, int, int]) -> Counter:
    return fuzz(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-format", type=int, default=20000)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    formats = args.formats.split(",")
    jobs = [
        (
            fmt,
            args.per_format // args.workers + (1 if w < args.per_format % args.workers else 0),
            args.seed * 1000 + w,
        )
        for fmt in formats
        for w in range(args.workers)
    ]
    started = time.time()
    totals = {fmt: Counter() for fmt in formats}
    with ProcessPoolExecutor(args.workers) as pool:
        for (fmt, _, _), counts in zip(jobs, pool.map(_part, jobs), strict=True):
            for key, value in counts.items():
                if key.startswith("example"):
                    totals[fmt].setdefault(key, value)
                else:
                    totals[fmt][key] += value
    print(f"fuzzing {', '.join(formats)}: {time.time() - started:.0f} s on {args.workers} workers")
    for fmt in formats:
        c = totals[fmt]
        tried = sum(c[o] for o in OUTCOMES)
        print(
            f"{fmt:12s} inputs tried {tried}, refused with exit 2 {c['refused']}, "
            f"accepted-and-correct {c['accepted and correct']}, tracebacks {c['tracebacks']}, "
            f"inputs changed {c['inputs changed']}, wrong outputs {c['wrong outputs']}"
        )
        for key in sorted(k for k in c if k.startswith("example")):
            print(f"    {key}: {str(c[key])[:300]}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
