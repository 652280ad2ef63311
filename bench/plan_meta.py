"""Planning without weights: find_blocks / plan_pairs of big Hugging Face configs on the meta device,
timed against torch.export alone on the same model, each in a fresh process (peak RSS per row).

    python bench/plan_meta.py            # LLaMA-7B and GPT-2-XL shapes
    python bench/plan_meta.py --quick    # 4-layer versions
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

CONFIGS = {
    "LLaMA-7B": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
        ),
    ),
    "GPT-2-XL": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257),
    ),
}
LAYER_KEYS = ("num_hidden_layers", "n_layer")


def _measure(name: str, what: str, quick: bool, queue: mp.Queue) -> None:
    import torch
    import transformers

    import surgery

    config_cls, model_cls, kwargs = CONFIGS[name]
    if quick:
        kwargs = {k: (4 if k in LAYER_KEYS else v) for k, v in kwargs.items()}
    config = getattr(transformers, config_cls)(use_cache=False, **kwargs)
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(config)
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    if what == "torch.export":
        torch.export.export(model, (ids,), strict=False)
        sites = "-"
    elif what == "find_blocks":
        sites = len(surgery.find_blocks(model, (ids,)).foldable)
    else:
        plan = surgery.plan_pairs(model, (ids,), wide=2.0)
        sites = len(plan.sites)
    seconds = time.perf_counter() - start
    queue.put((params, seconds, sites, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))


def run(quick: bool) -> list[list[str]]:
    ctx = mp.get_context("spawn")
    rows = []
    for name in CONFIGS:
        baseline = None
        for what in ("torch.export", "find_blocks", "plan_pairs"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure, args=(name, what, quick, queue))
            proc.start()
            params, seconds, sites, rss_gb = queue.get()
            proc.join()
            baseline = baseline or seconds
            weights_gb = params * 4 / 2**30
            rows.append(
                [
                    name,
                    f"{params / 1e9:.2f}B ({weights_gb:.1f} GiB fp32)",
                    what,
                    f"{seconds:.2f}",
                    f"{seconds / baseline:.2f}",
                    str(sites),
                    f"{rss_gb:.2f}",
                ]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="4-layer versions of the configs")
    args = parser.parse_args()
    from surgery.report import render_table

    rows = run(args.quick)
    print(
        render_table(
            "Planning on the meta device" + (" (--quick: 4 layers)" if args.quick else ""),
            [
                "model",
                "parameters",
                "step",
                "seconds",
                "x torch.export",
                "foldable sites / pairs",
                "peak RSS GiB",
            ],
            rows,
            caption="each row in a fresh process; peak RSS includes the Python + torch runtime (~0.9 GiB)",
        )
    )


if __name__ == "__main__":
    main()
