"""Checkpoints in process: the safetensors writer, streaming fold == in-memory fold (hypothesis),
save/load, the safety rules for pickles and stored factories, shards, memory, the block map."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import max_rel_error, randomise_batchnorm
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from small_models import tiny_hf_config
from torch import nn

import surgery
from surgery.demo import small_resnet
from surgery.errors import CheckpointError, PlanError, SurgeryError
from surgery.files.checkpoint import PLAN_KEY, SOURCE_KEY, load, open_checkpoint, parse_size, save
from surgery.files.outputs import atomic_output
from surgery.files.sources import Source, SourceError, source_of
from surgery.files.stream import fold_checkpoint
from surgery.files.tensorfile import Spec, TensorFile, Writer
from surgery.picture import draw_blocks
from surgery.runtime.fold import components


def test_writer_is_byte_for_byte_the_safetensors_library(tmp_path):
    tensors = {
        "b": torch.randn(3, 4),
        "a": torch.randn(5).half(),
        "scalar": torch.tensor(3),
        "empty": torch.empty(0, 3),
        "z": torch.randn(2).bfloat16(),
        "mask": torch.tensor([True, False]),
        "d": torch.randn(2, dtype=torch.float64),
        "u": torch.arange(3, dtype=torch.uint8),
    }
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    with atomic_output(tmp_path / "ours.safetensors") as temp, open(temp, "wb") as f:
        writer = Writer(f.fileno(), [Spec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"format": "pt"})  # fmt: skip
        for name in reversed(tensors):  # any order: the layout is fixed up front
            writer.write(name, tensors[name])
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "reference.safetensors").read_bytes()
    file = TensorFile(tmp_path / "ours.safetensors")
    assert all(torch.equal(file.read(k), v) for k, v in tensors.items())
    file.close()


# ---------------------------------------------------------------- streaming == in memory


@st.composite
def paired_states(draw):
    """(state_dict, plan) of a random paired MLP (Linear, BatchNorm1d, ReLU), in a random dtype."""
    widths = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers.append(nn.Linear(a, b, bias=draw(st.booleans())))
        if draw(st.booleans()):
            layers.append(nn.BatchNorm1d(b))
        layers.append(nn.ReLU())
    layers.append(nn.Linear(widths[-1], 3))
    model = randomise_batchnorm(nn.Sequential(*layers)).eval()
    try:
        paired = surgery.insert_pairs(
            model,
            (torch.randn(4, widths[0]),),
            init="random",
            bias=draw(st.booleans()),
            wide=draw(st.sampled_from([1.0, 1.5, 3.0])),
        )
    except PlanError:
        assume(False)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in paired.state_dict().items()}
    return state, paired.plan


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(paired_states())
def test_streaming_fold_is_the_in_memory_fold_byte_for_byte(case):
    state, plan = case
    with tempfile.TemporaryDirectory() as folder:
        paired, thin, again, expected = (
            Path(folder, n) for n in ("paired.st", "thin.st", "again.st", "expected.st")
        )
        paired = paired.with_suffix(".safetensors")
        save_file(state, paired, metadata={PLAN_KEY: plan.to_json()})
        summary = fold_checkpoint(paired, thin.with_suffix(".safetensors"))
        fold_checkpoint(paired, again.with_suffix(".safetensors"))
        save_file(surgery.fold_state_dict(state, plan), expected, metadata={"format": "pt"})
        out = thin.with_suffix(".safetensors").read_bytes()
        assert out == expected.read_bytes() == again.with_suffix(".safetensors").read_bytes()
        assert summary.pairs_folded == len(plan.sites)
        assert summary.tensors_written == len(state) - len(plan.pair_keys())


def test_components_join_a_batchnorm_fold_with_its_producer():
    model = torchvision.models.resnet18(num_classes=10).eval()
    paired = surgery.insert_pairs(
        model, (torch.randn(1, 3, 32, 32),), sites=["conv1", "bn1", "layer1"]
    )
    groups = components(paired.plan)
    stem = next(g for g in groups if "conv1.weight" in g.names)
    assert set(stem.names) == {"conv1.weight"} | {
        f"bn1.{p}" for p in ("weight", "bias", "running_mean", "running_var")
    }
    assert [site.name for site, _ in stem.steps] == [
        "conv1",
        "bn1",
    ]  # plan order within a component
    assert sum(len(g.steps) for g in groups) == sum(len(s.route.targets) for s in paired.plan.sites)


# ---------------------------------------------------------------- save / load


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    return model, surgery.insert_pairs(model, (torch.randn(2, 8),), init="random").eval()


def test_save_load_rebuilds_the_paired_model(tmp_path):
    model = small_resnet()
    randomise_batchnorm(model).eval()
    x = torch.randn(2, 3, 32, 32)
    paired = surgery.insert_pairs(model, (x,), init="random").eval()
    path = save(paired, tmp_path / "paired.safetensors", source="surgery.demo:small_resnet")
    assert save(paired, tmp_path / "again.safetensors", source="surgery.demo:small_resnet")
    assert path.read_bytes() == (tmp_path / "again.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="surgery.demo:small_resnet.*--trust-source"):
        load(path)  # a factory named by a file is a call the file asks for
    rebuilt = load(path, trust_source=True)
    assert rebuilt.plan == paired.plan
    with torch.no_grad():
        assert torch.equal(rebuilt(x), paired(x))
    into = load(path, into=small_resnet())  # your own instance instead of the source
    assert into.plan == paired.plan


def test_a_stored_factory_cannot_run_arbitrary_code(mlp, tmp_path):
    _, paired = mlp
    path = tmp_path / "evil.safetensors"
    state = {k: v.contiguous() for k, v in paired.state_dict().items()}
    evil = json.dumps({"factory": "os:system", "kwargs": {"command": f"touch {tmp_path}/pwned"}})
    save_file(state, path, metadata={PLAN_KEY: paired.plan.to_json(), SOURCE_KEY: evil})
    with pytest.raises(CheckpointError, match="os:system.*neither an nn.Module class"):
        load(path)
    assert not (tmp_path / "pwned").exists()


def test_whole_pickled_module_needs_trust_and_then_folds(mlp, tmp_path):
    model, paired = mlp
    torch.save(paired, tmp_path / "paired.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(tmp_path / "paired.pt")
    fold_checkpoint(tmp_path / "paired.pt", tmp_path / "thin.safetensors", trust_pickle=True)
    thin = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    thin.load_state_dict(load_file(tmp_path / "thin.safetensors"), strict=True)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert max_rel_error(paired(x), thin(x)) <= 1e-5


def test_a_layer_that_does_not_fit_its_rule_is_refused_with_no_output(mlp, tmp_path):
    _, paired = mlp
    plan = json.loads(paired.plan.to_json())
    consumer = next(s for s in plan["sites"] if s["route"]["kind"] == "consumer")
    consumer["route"]["targets"][0]["params"]["weight"] = "0.weight"  # [16, 8]: reads 8, not 16
    path = tmp_path / "paired.safetensors"
    state = {k: v.contiguous() for k, v in paired.state_dict().items()}
    save_file(state, path, metadata={PLAN_KEY: json.dumps(plan)})
    with pytest.raises(SurgeryError, match=r"input_weight does not fit 0.weight \[16, 8\]"):
        fold_checkpoint(path, tmp_path / "thin.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paired.safetensors"]


def test_shards_must_agree_with_their_index(mlp, tmp_path):
    _, paired = mlp
    folder = tmp_path / "paired"
    save(paired, folder, max_shard_size=600)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    assert len(set(index["weight_map"].values())) > 1
    fold_checkpoint(folder, tmp_path / "thin.safetensors")
    name = next(iter(index["weight_map"]))
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="list different tensors"):
        open_checkpoint(folder)
    index["weight_map"][name] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a file name beside it"):
        open_checkpoint(index_path)


def test_output_directories_are_never_merged_into(mlp, tmp_path):
    _, paired = mlp
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="not empty"):
        save(paired, tmp_path / "busy")
    with pytest.raises(CheckpointError, match="outputs are safetensors"):
        save(paired, tmp_path / "paired.pt")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["busy", "mine.txt"]


def test_parse_size():
    assert parse_size("500MB") == 500 * 10**6 and parse_size("2GiB") == 2 * 2**30
    assert parse_size(123) == 123 and parse_size("1.5kB") == 1500
    with pytest.raises(CheckpointError, match="not a number of bytes"):
        parse_size("lots")


def test_streaming_fold_holds_one_component_not_the_model(tmp_path):
    """A 250 MB paired checkpoint folds in a small fraction of its size of extra memory."""
    torch.manual_seed(0)
    wide = [nn.Linear(1024, 1024) for _ in range(60)]
    model = nn.Sequential(*wide, nn.Linear(1024, 64), nn.Linear(64, 64), nn.Linear(64, 8)).eval()
    paired = surgery.insert_pairs(model, (torch.randn(2, 1024),), sites=["60", "61"])
    path = save(paired, tmp_path / "paired.safetensors")
    del model, paired
    code = (  # VmHWM: the peak of this process's own memory (ru_maxrss counts the forked parent)
        "import sys\n"
        "from surgery.files.stream import fold_checkpoint\n"
        "def status(key):\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key))\n"
        "before = status('VmRSS')\n"
        "fold_checkpoint(sys.argv[1], sys.argv[2])\n"
        "print((status('VmHWM') - before) * 1024)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "thin.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    grown, size = int(result.stdout), path.stat().st_size
    assert grown < size / 4, (
        f"the fold grew the peak RSS by {grown / 2**20:.0f} MiB ({size / 2**20:.0f} MiB file)"
    )


# ---------------------------------------------------------------- model sources


def test_sources_parse_build_and_round_trip(tmp_path):
    source = source_of("torchvision.models:resnet18", {"num_classes": 3})
    assert source.build().fc.out_features == 3
    assert Source.from_json(source.to_json()) == source
    pytest.importorskip("transformers")
    tiny_hf_config(
        "bert", num_hidden_layers=1, num_attention_heads=2, vocab_size=100
    ).save_pretrained(tmp_path)
    for spec in (tmp_path, tmp_path / "config.json"):
        assert type(source_of(str(spec)).build()).__name__ == "BertModel"
    for spec, message in [
        ("no_such_module:f", "cannot import 'no_such_module'"),
        ("torchvision.models:nope", "has no attribute 'nope'"),
        ("missing.safetensors", "missing.safetensors does not exist"),
        ("resnet", "is not an import path"),
    ]:
        with pytest.raises(SourceError, match=message):
            source_of(spec)


# ---------------------------------------------------------------- the block map


def test_block_map_svg_and_png(tmp_path):
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    table = surgery.find_blocks(model, (x,))
    plan = surgery.plan_pairs(model, (x,), sites=["bn1", "layer2"])
    svg = ET.parse(draw_blocks(table, plan, tmp_path / "blocks.svg")).getroot()
    texts = [t.text for t in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert "layer2  1x128x4x4" in texts and "pair 128 -> 256" in texts
    assert any(
        t.startswith("producer through BatchNorm [checked: rel err")
        and "absorbed by bn1.weight" in t
        for t in texts
    )
    assert any(t.startswith("refused (probe only): no consumer absorbs W") for t in texts)
    png = draw_blocks(table, None, tmp_path / "blocks.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    with pytest.raises(SurgeryError, match=".svg or .png"):
        draw_blocks(table, None, tmp_path / "blocks.pdf")
