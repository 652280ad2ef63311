"""Planning a 7B-parameter model on the meta device allocates no weight memory."""

from __future__ import annotations

import resource

import pytest
import torch
from small_models import tiny_hf_config

import surgery

transformers = pytest.importorskip("transformers")


def test_llama_7b_plan_on_meta_device_allocates_no_weights():
    config = tiny_hf_config(  # LLaMA-7B's shape, on the meta device
        "llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    plan = surgery.plan_pairs(
        model, (ids,), wide=2.0, probes=[f"model.layers.{i}" for i in range(31)]
    )
    grown_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    assert grown_gib < 1.0, (
        f"planning grew the peak RSS by {grown_gib:.1f} GiB (fp32 weights are 25 GiB)"
    )
    assert all(p.device.type == "meta" for p in model.parameters())
    kinds = [s.route.kind for s in plan.sites]
    assert (
        kinds.count("probe only") == 31 and kinds.count("consumer") == 2 * 32 + 1
    )  # 2 norms per layer, lm_head
    assert plan.site("model.layers.7.mlp").route.absorbed_by == [
        "model.layers.7.mlp.down_proj.weight"
    ]
    assert plan.site("model.layers.7.mlp").D == 8192
    assert surgery.Plan.from_json(plan.to_json()) == plan
