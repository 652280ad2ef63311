"""Hostile inputs to the command line and the loaders, each test named by what it would break:
inputs overwritten, code run from a file, plans that fold wrong, tracebacks instead of one line,
files left behind. Run in process (main(argv)) except where a hang or a kill must be observed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MLP_SIZES, safetensors_metadata
from safetensors.torch import load_file, save_file
from surgery.cli.main import main

import surgery
from surgery.errors import CheckpointError, FoldError
from surgery.files.checkpoint import PLAN_KEY, SOURCE_KEY, load, open_checkpoint
from surgery.plan import Plan
from surgery.runtime.fold import fold_state_dict


def _run(capsys, *args: object) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip().splitlines()


def _refused(capsys, folder: Path, message: str, *args: object) -> None:
    """Exit 2 with one `surgery: error:` line naming the problem, and no file added or changed."""
    before = _snapshot(folder)
    code, lines = _run(capsys, *args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("surgery: error: "), lines
    assert message in lines[0], lines[0]
    assert _snapshot(folder) == before


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
        if not p.is_fifo()
    }


@pytest.fixture
def paired(paired_file, tmp_path) -> Path:
    """The shared paired checkpoint, with a source that rebuilds it (small_models:mlp, which
    needs --trust-source)."""
    path = tmp_path / "paired.safetensors"
    source = json.dumps({"factory": "small_models:mlp", "kwargs": {"sizes": MLP_SIZES}})
    save_file(
        load_file(paired_file),
        path,
        metadata={**safetensors_metadata(paired_file), SOURCE_KEY: source},
    )
    return path


def _with_plan(src: Path, dst: Path, change) -> Path:
    """A copy of `src` whose stored plan is edited by `change(plan_dict)`."""
    metadata = safetensors_metadata(src)
    plan = json.loads(metadata[PLAN_KEY])
    change(plan)
    save_file(load_file(src), dst, metadata={**metadata, PLAN_KEY: json.dumps(plan)})
    return dst


# ---------------------------------------------------------------- inputs overwritten


def test_onnx_output_onto_the_input_checkpoint_is_refused(capsys, paired, tmp_path):
    _refused(capsys, tmp_path, "would overwrite the input",
             "fold", paired, "--out", tmp_path / "thin.safetensors", "--onnx", paired)  # fmt: skip


def test_out_onto_the_plan_file_is_refused(capsys, paired, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(load(paired, trust_source=True).plan.to_json())
    _refused(capsys, tmp_path, "would overwrite the input",
             "fold", paired, "--plan", plan, "--out", plan)  # fmt: skip


def test_outputs_reaching_an_input_through_dotdot_or_a_symlink_are_refused(
    capsys, paired, tmp_path
):
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(paired)
    dotdot = tmp_path / "sub" / ".." / "paired.safetensors"
    for out in (dotdot, tmp_path / "link.safetensors"):
        _refused(capsys, tmp_path, "would overwrite", "fold", paired, "--out", out)
    os.link(paired, tmp_path / "hard.safetensors")
    _refused(
        capsys, tmp_path, "would overwrite", "fold", paired, "--out", tmp_path / "hard.safetensors"
    )


def test_onnx_and_out_naming_the_same_file_is_refused(capsys, paired, tmp_path):
    out = tmp_path / "thin.safetensors"
    _refused(capsys, tmp_path, "name the same file", "fold", paired, "--out", out, "--onnx", out)


def test_insert_and_inspect_outputs_onto_their_input_are_refused(capsys, paired, tmp_path):
    _refused(capsys, tmp_path, "would overwrite the input",
             "inspect", paired, "--picture", paired, "--trust-source")  # fmt: skip
    _refused(capsys, tmp_path, "would overwrite the input",
             "insert", paired, "--out", paired, "--trust-source")  # fmt: skip


# ---------------------------------------------------------------- code run from a file


def test_loading_does_not_import_a_module_the_file_names_before_trust(
    paired, tmp_path, monkeypatch
):
    marker = tmp_path / "ran"
    (tmp_path / "evil_factory_module.py").write_text(
        f"open({str(marker)!r}, 'w').write('top-level code ran')\n"
        "import torch\nclass Net(torch.nn.Module):\n    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    evil = tmp_path / "evil.safetensors"
    metadata = {
        **safetensors_metadata(paired),
        SOURCE_KEY: json.dumps({"factory": "evil_factory_module:Net"}),
    }
    save_file(load_file(paired), evil, metadata=metadata)
    with pytest.raises(CheckpointError, match="importing runs that module's code.*--trust-source"):
        load(evil)
    assert not marker.exists() and "evil_factory_module" not in sys.modules


def test_a_zoo_name_shadowed_by_a_file_in_the_working_directory_is_not_imported(
    paired, tmp_path, monkeypatch
):
    marker = tmp_path / "ran"
    (tmp_path / "timm_shadow").mkdir()
    folder = tmp_path / "timm_shadow"
    (folder / "timm").mkdir()
    (folder / "timm" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (folder / "timm" / "models.py").write_text("")
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    saved = {k: v for k, v in sys.modules.items() if k == "timm" or k.startswith("timm.")}
    for name in saved:
        monkeypatch.delitem(sys.modules, name)
    evil = tmp_path / "evil.safetensors"
    metadata = {
        **safetensors_metadata(paired),
        SOURCE_KEY: json.dumps({"factory": "timm.models:resnet18"}),
    }
    save_file(load_file(paired), evil, metadata=metadata)
    with pytest.raises(CheckpointError, match="--trust-source"):
        load(evil)
    assert not marker.exists()


# ---------------------------------------------------------------- plans that fold wrong


def test_a_plan_with_two_sites_of_one_name_is_refused_before_any_write(capsys, paired, tmp_path):
    def twin(plan):
        plan["sites"][1]["name"] = plan["sites"][0]["name"]

    bad = _with_plan(paired, tmp_path / "bad.safetensors", twin)
    _refused(capsys, tmp_path, "appears twice", "fold", bad, "--out", tmp_path / "thin.safetensors")
    plan = json.loads(safetensors_metadata(paired)[PLAN_KEY])
    twin(plan)
    with pytest.raises(ValueError, match="appears twice"):
        Plan.from_json(json.dumps(plan))


def test_a_plan_claiming_a_model_tensor_as_a_pair_bias_is_refused(capsys, paired, tmp_path):
    def claim(plan):
        site = plan["sites"][0]  # d = 16, like the model's own 2.bias
        site["params"]["narrow.bias"] = "2.bias"
        site["params"]["widen.bias"] = f"pairs.{site['key']}.widen.bias"
        site["bias"] = True

    bad = _with_plan(paired, tmp_path / "bad.safetensors", claim)
    _refused(
        capsys, tmp_path, "lists pair tensors", "fold", bad, "--out", tmp_path / "t.safetensors"
    )


def test_an_in_memory_plan_is_validated_by_fold_state_dict(paired):
    model = load(paired, trust_source=True)
    plan = Plan.from_json(model.plan.to_json())
    plan.sites[1].name = plan.sites[0].name
    with pytest.raises(FoldError, match="appears twice"):
        fold_state_dict(model.state_dict(), plan)


# ---------------------------------------------------------------- one line, not a traceback


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_one_line(capsys, paired, tmp_path):
    metadata = {**safetensors_metadata(paired), PLAN_KEY: _nested(100_000)}
    save_file(load_file(paired), tmp_path / "deep.safetensors", metadata=metadata)
    _refused(capsys, tmp_path, "plan is not valid",
             "fold", tmp_path / "deep.safetensors", "--out", tmp_path / "t.safetensors")  # fmt: skip
    plan = tmp_path / "deep-plan.json"
    plan.write_text(_nested(100_000))
    _refused(capsys, tmp_path, "plan is not valid",
             "fold", paired, "--plan", plan, "--out", tmp_path / "t.safetensors")  # fmt: skip
    header = b'{"a":' + _nested(100_000).encode() + b"}"
    (tmp_path / "deep-header.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    _refused(capsys, tmp_path, "header is not valid JSON",
             "fold", tmp_path / "deep-header.safetensors", "--out", tmp_path / "t.safetensors")  # fmt: skip


@pytest.mark.parametrize(
    "weight_map_value, message",
    [
        (["model.safetensors"], "is not a file name"),
        ("..", "is not a file name"),
        ("model\x00.safetensors", "is not a file name"),
    ],
    ids=["a list", "dotdot", "a NUL byte"],
)
def test_a_bad_index_is_one_line(capsys, paired, tmp_path, weight_map_value, message):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(paired.read_bytes())
    names = list(load_file(paired))
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[names[0]] = weight_map_value
    index = {"metadata": safetensors_metadata(paired), "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    deep = {"metadata": {}, "weight_map": json.loads(_nested(50))}
    _refused(capsys, tmp_path, message, "fold", folder, "--out", tmp_path / "t.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(deep))
    _refused(capsys, tmp_path, "not a safetensors index", "fold", folder, "--out", tmp_path / "t")


def test_out_under_a_regular_file_is_one_line(capsys, paired, tmp_path):
    (tmp_path / "afile").write_text("x")
    _refused(capsys, tmp_path, "is a file, not a directory",
             "fold", paired, "--out", tmp_path / "afile" / "thin.safetensors")  # fmt: skip


def test_a_named_pipe_input_is_refused_not_waited_on(paired, tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    plan = tmp_path / "plan.json"
    os.mkfifo(plan)
    for args in (
        [fifo, "--out", tmp_path / "t.safetensors"],
        [paired, "--plan", plan, "--out", tmp_path / "t.safetensors"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "surgery.cli.main", "fold", *map(str, args)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "not a regular file" in lines[0]
    assert not (tmp_path / "t.safetensors").exists()


# ---------------------------------------------------------------- nothing left behind


def test_a_late_failure_removes_the_directories_it_made(capsys, paired, tmp_path):
    def misfit(plan):  # a consumer recipe pointed at a weight whose input dim does not fit
        site = next(s for s in plan["sites"] if s["route"]["kind"] == "consumer")
        site["route"]["targets"][0]["params"]["weight"] = "0.weight"

    bad = _with_plan(paired, tmp_path / "bad.safetensors", misfit)
    _refused(capsys, tmp_path, "does not fit",
             "fold", bad, "--out", tmp_path / "new" / "deeper" / "thin.safetensors")  # fmt: skip
    assert not (tmp_path / "new").exists()


def test_fold_verify_that_fails_writes_nothing(capsys, paired, tmp_path):
    out = tmp_path / "made" / "thin.safetensors"
    onnx = tmp_path / "thin.onnx"
    code = main(["fold", str(paired), "--out", str(out), "--verify", "--onnx", str(onnx),
                 "--rtol", "0", "--atol", "0", "--trust-source"])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 1 and "FAILED" in printed and "not written" in printed
    assert not out.exists() and not onnx.exists() and not (tmp_path / "made").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paired.safetensors"]
    code = main(["fold", str(paired), "--out", str(out), "--verify", "--trust-source"])
    assert code == 0 and "│ OK" in capsys.readouterr().out and out.is_file()


def test_a_killed_write_leaves_a_temporary_the_next_run_removes(capsys, paired, tmp_path):
    out = tmp_path / "thin.safetensors"
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom surgery.files.outputs import atomic_output\n"
         "with atomic_output(sys.argv[1]) as temp:\n"
         "    temp.write_bytes(b'x' * 2**20)\n    print('writing', flush=True)\n    time.sleep(600)\n",
         str(out)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".thin.safetensors.tmp-")]
    assert len(stale) == 1 and stale[0].stat().st_size == 2**20 and not out.exists()
    code, _ = _run(capsys, "fold", paired, "--out", out)
    assert code == 0 and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paired.safetensors", "thin.safetensors"]


def test_a_temporary_of_a_live_writer_is_left_alone(tmp_path):
    from surgery.files.outputs import atomic_output, remove_stale_temporaries

    out = tmp_path / "thin.safetensors"
    with atomic_output(out) as temp:
        temp.write_bytes(b"mine")
        assert remove_stale_temporaries(out) == [] and temp.exists()
    assert out.read_bytes() == b"mine"


def test_open_checkpoint_lists_every_input_it_reads(paired, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(surgery.load(paired, trust_source=True).plan.to_json())
    with open_checkpoint(paired, plan=plan) as checkpoint:
        assert set(map(Path, checkpoint.inputs)) == {paired, plan}


def test_a_shape_whose_element_count_overflows_int64_is_refused(capsys, paired, tmp_path):
    """A zero-sized tensor whose other dims multiply past int64: torch could never hold it, so a
    header claiming one is refused at reading (fold and load alike), not copied into an output."""
    raw = paired.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header["huge"] = {"dtype": "F32", "shape": [2**62, 4, 0], "data_offsets": [0, 0]}
    text = json.dumps(header).encode()
    crafted = tmp_path / "crafted.safetensors"
    crafted.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])
    _refused(
        capsys,
        tmp_path,
        "more elements than int64",
        "fold",
        crafted,
        "--out",
        tmp_path / "t.safetensors",
    )
    with pytest.raises(CheckpointError, match="more elements than int64"):
        load(crafted)


def test_pairs_swapped_in_memory_are_refused_not_folded(one_thread):
    """Two same-width sites whose pairs were swapped after insert_pairs: the paired forward runs
    one pair where the state dict names the other; the fold refuses instead of folding wrong."""
    import torch
    from small_models import mlp

    model = mlp([8, 16, 16, 16, 4]).eval()
    x = torch.randn(3, 8)
    paired = surgery.insert_pairs(model, x, init="random")
    keys = [s.key for s in paired.plan.sites][:2]
    modules = paired.pairs._modules
    modules[keys[0]], modules[keys[1]] = modules[keys[1]], modules[keys[0]]
    with pytest.raises(FoldError, match="is not the one under its key"):
        surgery.fold(paired)


# ---------------------------------------------------------------- outputs that are not files


def test_an_out_that_is_a_device_or_pipe_is_refused_and_left_alone(capsys, paired, tmp_path):
    """--out naming a named pipe, a character device (made here, as /dev/full is one) or a link
    to one: refused before anything is written; the node is untouched."""
    import stat

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    targets = [fifo]
    link = tmp_path / "link.safetensors"
    link.symlink_to(fifo)
    targets.append(link)
    try:
        device = tmp_path / "full"
        os.mknod(device, stat.S_IFCHR | 0o600, os.makedev(1, 7))  # the numbers of /dev/full
        targets.append(device)
    except PermissionError:
        pass  # not root: the pipe and the link stand for it
    for target in targets:
        code, lines = _run(capsys, "fold", paired, "--out", target)
        assert code == 2 and len(lines) == 1 and "not a file" in lines[0], lines
        assert not stat.S_ISREG(os.stat(target).st_mode)  # still the node it was
    assert link.is_symlink()


def test_a_full_disk_leaves_nothing_and_exits_2(capsys, paired, tmp_path, monkeypatch):
    import errno

    from surgery.files import tensorfile

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensorfile, "_write_at", full)
    before = _snapshot(tmp_path)
    for out in (tmp_path / "thin.safetensors", tmp_path / "made" / "thin"):
        code, lines = _run(capsys, "fold", paired, "--out", out)
        assert code == 2 and len(lines) == 1 and "No space left on device" in lines[0], lines
    assert _snapshot(tmp_path) == before  # no temporary, no directory made for it


def test_racing_writers_of_one_directory_end_with_one_result_and_one_refusal(
    capsys, paired, tmp_path, monkeypatch
):
    """Two folds to one directory --out: the second to finish finds the first's result in place;
    it is refused with one line and the first's output stays whole."""
    from surgery.files import outputs

    out = tmp_path / "thin"
    real = outputs._replace
    raced: list[int] = []

    def replace(temp, target, shown):
        if not raced:  # while this run is about to rename, another process completes first
            other = subprocess.run(
                [sys.executable, "-m", "surgery.cli.main", "fold", str(paired), "--out", str(out)],
                capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            raced.append(other.returncode)
        real(temp, target, shown)

    monkeypatch.setattr(outputs, "_replace", replace)
    code, lines = _run(capsys, "fold", paired, "--out", out)
    assert raced == [0]
    assert code == 2 and len(lines) == 1 and "written by another run" in lines[0], lines
    monkeypatch.setattr(outputs, "_replace", real)
    reference = tmp_path / "reference.safetensors"
    assert main(["fold", str(paired), "--out", str(reference)]) == 0
    folded = load_file(out / "model.safetensors")
    assert folded.keys() == load_file(reference).keys()
    assert all((folded[k] == v).all() for k, v in load_file(reference).items())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_distributed_save_onto_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    import errno

    import torch
    from small_models import mlp
    from torch.distributed.checkpoint import filesystem

    paired = surgery.insert_pairs(mlp(MLP_SIZES).eval(), (torch.randn(2, 8),), init="random")
    real = filesystem._write_item

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_item", full)
    with pytest.raises(CheckpointError, match="No space left"):
        surgery.save(paired, tmp_path / "dcp", distributed=True)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(filesystem, "_write_item", real)
    surgery.save(paired, tmp_path / "dcp", distributed=True)  # and it works once there is space
    assert {p.name for p in (tmp_path / "dcp").iterdir()} >= {".metadata", "surgery.json"}


# ---------------------------------------------------------------- plans and indexes as records


def test_a_plan_with_infinity_or_wrong_types_is_one_line(capsys, paired, tmp_path):
    """Every field of a plan is typed and bounded: Infinity in example_shapes (read by --verify),
    a string where a width goes, a negative size: exit 2, one line, nothing written."""
    stored = safetensors_metadata(paired)[PLAN_KEY]
    cases = {
        "infinity": stored.replace('"example_shapes": [[', '"example_shapes": [[Infinity, ', 1),
        "a string width": json.dumps(
            {**json.loads(stored), "sites": [{**json.loads(stored)["sites"][0], "d": "16"}]}
        ),
        "a negative size": json.dumps({**json.loads(stored), "example_shapes": [[-2, 8]]}),
    }
    for what, text in cases.items():
        bad = tmp_path / f"{what}.safetensors"
        save_file(load_file(paired), bad, metadata={**safetensors_metadata(paired), PLAN_KEY: text})
        args = ("fold", bad, "--out", tmp_path / "t.safetensors", "--verify")
        _refused(capsys, tmp_path, "plan is not valid", *args)


def test_a_plan_placing_a_pair_on_a_module_the_model_lacks_is_one_line(capsys, paired, tmp_path):
    def elsewhere(plan):
        plan["sites"][0]["route"]["placements"][0]["module"] = "no.such.module"

    bad = _with_plan(paired, tmp_path / "bad.safetensors", elsewhere)
    args = ("fold", bad, "--out", tmp_path / "t.safetensors", "--verify", "--trust-source")
    _refused(capsys, tmp_path, "no.such.module", *args)
    with pytest.raises(surgery.PlanError, match="no.such.module"):
        load(bad, trust_source=True)


def test_an_index_naming_a_tensor_twice_is_refused_whatever_the_order(capsys, paired, tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(paired.read_bytes())
    names = list(load_file(paired))
    entries = [f'"{n}": "model.safetensors"' for n in names]
    for twice in (f'"{names[0]}": "other.safetensors"', entries[0]):  # last wins, or first
        for order in (entries + [twice], [twice] + entries):
            text = '{"metadata": {}, "weight_map": {' + ", ".join(order) + "}}"
            (folder / "model.safetensors.index.json").write_text(text)
            _refused(capsys, tmp_path, "named twice", "fold", folder, "--out", tmp_path / "t")
