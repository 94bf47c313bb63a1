"""Peak memory of one loss step (forward, per-token CE, backward) on a large vocabulary.

A tiny Llama with Qwen2.5's 152k vocabulary (hidden 64, 2 layers, untied head) at batch 2 x seq 4096,
half of every row a prompt without targets, in fp32 on the CPU. Two ways to the per-token losses:

    full     logits at every position, `F.cross_entropy` on them upcast to fp32 (what mftcoder did
             before it computed logits at the targets only)
    targets  mftcoder's path: `forward_token_losses` (logits at the targets only, chunked CE)

Each runs in a fresh process; the number is the growth of its peak RSS over the step (the model and
the batch exist before it). Prints a table and one JSON line.

    python benchmarks/loss_memory.py [--vocab 152064] [--seq 4096] [--batch 2] [--target-share 0.5]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--target-share", type=float, default=0.5, help="share of each row that is targets")
    parser.add_argument("--path", choices=("full", "targets"), help=argparse.SUPPRESS)  # one measurement
    return parser.parse_args(argv)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args: argparse.Namespace) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mftcoder.training.evaluation import forward_token_losses

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=args.seq, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    shape = (args.batch, args.seq)
    input_ids = torch.randint(0, args.vocab, shape)
    loss_mask = torch.zeros(shape, dtype=torch.bool)
    loss_mask[:, int(args.seq * (1 - args.target_share)) : -1] = True
    targets = torch.roll(input_ids, -1, dims=1)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones(shape, dtype=torch.long),
        "targets": targets,
        "target_ids": targets[loss_mask],
        "loss_mask": loss_mask,
    }
    before = peak_rss_mib()
    if args.path == "full":
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False).logits
        flat = logits.reshape(-1, logits.shape[-1]).float()
        ce = torch.nn.functional.cross_entropy(flat, targets.reshape(-1), reduction="none").view_as(targets)
        ce = ce * loss_mask
    else:
        ce = forward_token_losses(model, batch)
    ce.sum().backward()
    return {"path": args.path, "step_peak_mib": round(peak_rss_mib() - before, 1), "loss": float(ce.sum())}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.path:
        print(json.dumps(measure(args)))
        return 0
    results = {}
    for path in ("full", "targets"):
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--path", path]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[path] = json.loads(out.strip().splitlines()[-1])
    ratio = results["targets"]["step_peak_mib"] / results["full"]["step_peak_mib"]
    print(f"loss step, vocab {args.vocab}, batch {args.batch} x seq {args.seq}, targets {args.target_share:.0%}:")
    for path, result in results.items():
        print(f"  {path:8s} peak +{result['step_peak_mib']:9.1f} MiB   loss {result['loss']:.2f}")
    print(f"  targets / full: {ratio:.3f}")
    print(json.dumps({"vocab": args.vocab, "batch": args.batch, "seq": args.seq, "results": results, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
