"""WIN on every layout the fold follows, with the library's defaults (Recipe(steps=N), nothing else
set): Hugging Face models with their default configs (KV cache on, dropout, tied embeddings,
ModelOutput returns), timm, and hand-written attention and convolutions in the layouts people
write (a packed qkv split, a 3-way view permuted, raw nn.Parameter positions, GroupNorm, no norm).
For each: win.win runs and returns a finite model of the student's class with its ties kept;
win.widen doubles exactly the free widths; the start from an equal-width teacher reproduces it;
win.narrow undoes win.widen."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from families import (
    FAMILIES,
    MORE_FAMILIES,
    ComputedSplitAttention,
    NanoAttention,
    OwnGPT,
    nano_gpt,
    tokens,
)
from torch import nn

import surgery
from surgery import win
from surgery.analysis.widths import width_groups
from surgery.win.start import recipe_start

STEPS = 20
# the families, and more members of the same classes (einsum attention with raw-parameter
# projections and layer scales, class and register tokens, multi-query attention, a written-out
# RMSNorm, MLP-Mixer, channel concatenation with grouped / depthwise convs and squeeze-excitation,
# torch.nn.TransformerEncoder)
ALL = {**FAMILIES, **MORE_FAMILIES}


def _out(model: nn.Module, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(*x)
    return out.logits if hasattr(out, "logits") else out


def _ties(model: nn.Module) -> list[tuple[str, ...]]:
    """Names sharing one parameter tensor."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return sorted(tuple(v) for v in names.values() if len(v) > 1)


def _same_storage(model: nn.Module, tie: tuple[str, ...]) -> bool:
    return len({model.get_parameter(n).data_ptr() for n in tie}) == 1


@pytest.fixture(params=list(ALL))
def family(request, one_thread):
    torch.manual_seed(0)
    fam = ALL[request.param]
    return request.param, fam.build(), fam.inputs(), fam.batches()


@pytest.mark.parametrize("imitating", [False, True], ids=["defaults", "imitation"])
def test_win_runs_with_the_defaults_and_keeps_ties(family, imitating):
    """The defaults (the measured start, then KD), and the same with WIN's imitation stage on
    (imitation_share=0.1: pairs inserted, imitated, folded)."""
    name, student, x, batches = family
    teacher = win.widen(student, 2.0, x)
    recipe = win.Recipe(steps=STEPS, imitation_share=0.1) if imitating else win.Recipe(steps=STEPS)
    result = win.win(student, teacher, batches, x, recipe)
    assert type(result.thin) is type(student)
    assert torch.isfinite(_out(result.thin, x)).all(), name
    assert _out(result.thin, x).shape == _out(student, x).shape
    if imitating:
        assert {s for chunk in result.stages for s in chunk}, name
        assert any(k.startswith("imitate") for k in result.log.stages), name
    for tie in _ties(student):  # tied embedding and head: one tensor in the paired and thin model
        assert tie in _ties(result.thin) and _same_storage(result.thin, tie), (name, tie)
        assert tie in _ties(result.paired) and _same_storage(result.paired, tie), (name, tie)
    # every candidate start's quality is reported, the student's own among them
    assert any(k.startswith("own initialisation") for k in result.log.start)
    steps = sum(len(v) for v in result.log.stages.values())
    assert steps == STEPS  # the budget, exactly


def test_widen_doubles_exactly_the_free_widths(family):
    name, student, x, _ = family
    table = width_groups(student, x)
    wide = win.widen(student, 2.0, x)
    assert type(wide) is type(student)
    assert _out(wide, x).shape == _out(student, x).shape  # classes / vocabulary stay
    s_shapes = {k: v.shape for k, v in student.state_dict().items()}
    w_shapes = {k: v.shape for k, v in wide.state_dict().items()}
    assert s_shapes.keys() == w_shapes.keys()
    doubled = 0
    for tensor, dims in table.spaces.dims.items():
        if tensor not in s_shapes:
            continue
        for d, space in enumerate(dims):
            free = any(
                table.spaces.space(leaf).frozen is None and table.spaces.width(leaf) > 1
                for leaf in table.spaces.leaves(space)
            )
            ratio = w_shapes[tensor][d] / s_shapes[tensor][d]
            assert ratio == (2 if free else 1), (name, tensor, d, ratio)
            doubled += free
    assert doubled, name
    assert _ties(wide) == _ties(student)
    if hasattr(student, "config"):  # every width field once: 2x, not 4x through an alias
        for field in ("hidden_size", "intermediate_size", "num_attention_heads"):
            if isinstance(getattr(student.config, field, None), int):
                assert getattr(wide.config, field) == 2 * getattr(student.config, field), field


def test_start_from_an_equal_width_teacher_reproduces_it(family):
    name, student, x, batches = family
    torch.manual_seed(1)
    fresh = ALL[name].build()  # another initialisation, the same widths
    recipe = win.Recipe(steps=STEPS).for_model(fresh, x)
    log = recipe_start(fresh, student, batches, x, recipe)
    assert (_out(fresh, x) - _out(student, x)).abs().max() <= 1e-6, name
    for select in ("first", "uniform", "energy"):  # every selection takes all of equal widths
        assert log.start[f"{select}, after 0 steps"] <= 1e-9, (name, select)


def test_narrow_undoes_widen(family):
    name, student, x, _ = family
    thin = win.narrow(win.widen(student, 2.0, x), 0.5, x)
    assert type(thin) is type(student)
    assert {k: v.shape for k, v in thin.state_dict().items()} == {
        k: v.shape for k, v in student.state_dict().items()
    }
    assert torch.isfinite(_out(thin, x)).all()


def test_narrow_a_hugging_face_model_saves_and_loads_its_config(tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    fam = FAMILIES["hf-llama"]
    model, x = fam.build(64, 8, 4), fam.inputs()
    thin = win.narrow(model, 0.5, x)
    assert (thin.config.hidden_size, thin.config.num_attention_heads) == (32, 4)
    assert (thin.config.num_key_value_heads, thin.config.intermediate_size) == (2, 64)
    thin.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_out(loaded, x), _out(thin, x))
    by_field = win.narrow(model, {"hidden_size": 48, "intermediate_size": 96}, x)
    assert by_field.config.hidden_size == 48 and by_field.model.norm.weight.shape == (48,)
    assert torch.isfinite(_out(by_field, x)).all()
    with pytest.raises(surgery.PlanError, match="num_attention_heads"):  # 6 over 4 kv heads
        win.narrow(model, {"num_attention_heads": 6}, x)


def test_a_diverging_stage_is_rolled_back_and_the_result_is_finite(one_thread):
    torch.manual_seed(0)
    fam = FAMILIES["nano-gpt"]
    student, x, batches = nano_gpt(), fam.inputs(), fam.batches()
    teacher = win.widen(student, 2.0, x)
    recipe = win.Recipe(steps=STEPS, finetune_lr=1e4)  # an absurd learning rate
    result = win.win(student, teacher, batches, x, recipe)
    assert any("fine-tune: diverged" in e and "rolled back" in e for e in result.log.events)
    assert "0.1x its learning rate" in str(result.log)
    assert torch.isfinite(_out(result.thin, x)).all()
    assert all(torch.isfinite(p).all() for p in result.thin.parameters())


def test_probes_read_tensors_not_model_outputs(one_thread):
    """BertForSequenceClassification's `bert` and `bert.encoder` return ModelOutputs: a site there
    reads h where it is a tensor (a layer's input or a module that returns one)."""
    fam = FAMILIES["hf-bert-cls"]
    student, x = fam.build(), fam.inputs()
    teacher = win.widen(student, 2.0, x)
    stages = win.plan_stages(student, teacher, x)
    sites = [s for chunk in stages for s in chunk]
    paired = surgery.insert_pairs(
        student, x, wide=win.teacher_widths(teacher, x, sites), probes=sites, sites=[]
    )
    seen = {}
    for site in paired.plan.sites:
        module = paired.get_submodule(site.probe.module)
        hook = (
            module.register_forward_hook(lambda m, a, o, s=site.name: seen.setdefault(s, o))
            if site.probe.where == "output"
            else module.register_forward_pre_hook(
                lambda m, a, s=site.name: seen.setdefault(s, a[0])
            )
        )
        with torch.no_grad():
            paired.eval()(*x)
        hook.remove()
    assert seen.keys() == set(sites) and all(isinstance(v, torch.Tensor) for v in seen.values())
    objective = win.Imitation(paired, teacher, x, sites=sites)
    assert torch.isfinite(objective(*x))


@pytest.mark.parametrize(
    "split", [None, "split", "list", "tensor_split", "tensor_split_at", "slice", "narrow"]
)
def test_teacher_with_wider_heads_starts_a_student_of_the_same_head_count(split, one_thread):
    """nanoGPT-style: a 2x teacher that keeps the head count (heads twice as wide). The student
    takes every head and the same dims within each; q and k the same dims (they are dotted).
    The packed projection split by a literal width, or by sizes computed from the shape."""
    torch.manual_seed(0)
    attention = NanoAttention if split is None else partial(ComputedSplitAttention, how=split)
    student, teacher = (OwnGPT(w, 4, attention).double() for w in (32, 64))
    with torch.no_grad():  # every weight entry names its own (row, column): 1000 * row + column
        for p in teacher.parameters():
            if p.dim() == 2:
                p.copy_(1000 * torch.arange(p.shape[0])[:, None] + torch.arange(p.shape[1]))
    win.sample_from_teacher(student, teacher, (tokens(),), select="random")
    for block in student.h:
        rows = (block.attn.c_attn.weight[:, 0] // 1000).long()  # teacher rows of q, k, v
        q, k, v = rows[:32], rows[32:64] - 64, rows[64:] - 128
        for part in (q, k, v):
            heads, within = part.view(4, 8) // 16, part.view(4, 8) % 16
            assert torch.equal(heads, torch.arange(4)[:, None].expand(4, 8))  # every head
            assert (within == within[:1]).all()  # the same dims in every head
        assert torch.equal(q % 16, k % 16)  # q and k share their dims within heads
        columns = (block.attn.c_proj.weight[0] % 1000).round().long()
        assert torch.equal(columns, v)  # the output projection reads the value dims taken


@pytest.mark.parametrize(
    "split", ["split", "list", "tensor_split", "tensor_split_at", "slice", "narrow"]
)
def test_sizes_computed_from_shapes_fold_exactly_and_widen(split, one_thread):
    """The same analysis serves the fold and the resize: random pairs fold exactly into a packed
    projection split by computed sizes, and widen doubles it into a model that runs."""
    torch.manual_seed(0)
    model = OwnGPT(32, 4, partial(ComputedSplitAttention, how=split)).eval()
    x = (tokens(),)
    paired = surgery.insert_pairs(model, x, init="random").eval()
    thin = surgery.fold(paired)
    with torch.no_grad():
        before, after, original = paired(*x), thin(*x), model(*x)
    assert (before - after).abs().max() <= 1e-5 * before.abs().max()
    assert (before - original).abs().max() > 1e-3 * original.abs().max()  # the pairs did change it
    wide = win.widen(model, 2.0, x)
    assert wide.h[0].attn.c_attn.weight.shape == (192, 64)
    assert torch.isfinite(_out(wide, x)).all()
