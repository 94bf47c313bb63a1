"""Memory per GPU of a fine-tuning run under each Accelerate preset, from the model's config.

    python scripts/estimate_memory.py configs/train/codellama_34b_qlora.yaml --gpus 8 [--nodes 1]
    python scripts/estimate_memory.py --table      # the table in docs/memory.md

Parameter counts are exact: the model is built on the meta device from its config (no weights are
read or allocated). The config comes from the model directory or the local Hugging Face cache,
or, for the models of the shipped train configs, from the config.json fields copied below.

The formula, in bytes (mixed precision with bf16 working copies, Adam; ZeRO paper accounting):

    P  all parameters            T  trainable: P (full) or the LoRA matrices, r·(in+out) per adapted
                                    matrix (counted by wrapping the meta model as mftcoder does)
    Q  parameters of nn.Linear layers other than the head (what bitsandbytes quantises for QLoRA)
    N  processes (GPUs over all nodes)     K  optimizer bytes per trainable parameter: fp32 master
                                              copy + Adam m, v = 12 (8-bit Adam: 4 + 2 = 6; the
                                              offload presets run DeepSpeed's CPU AdamW: 12)
    frozen base F  = 0 (full) | 2·P (LoRA) | q·Q + 2·(P − Q) (QLoRA; q = 0.5 + 1/64 + 4/(64·256)
                     bytes for NF4 with double-quantised block constants, 1 for 8-bit)

    preset              weights               gradients   optimizer states
    ddp                 W = F + 2T            2T          K·T
    deepspeed_zero2     W                     2T/N        K·T/N
    ..._zero2_offload   W                     2T/N        (K·T/N in CPU RAM)
    deepspeed_zero3     W/N + 2·Pl·W/P        2T/N        K·T/N       (Pl: one layer's parameters; a layer
    fsdp2               (same as ZeRO-3)                               is gathered and the next prefetched)
    ..._zero3_offload   2·Pl·W/P              2T/N        (K·T/N and W/N in CPU RAM)

    activations = b·s·( L·a + 10·V )          without activation checkpointing
                = b·s·( L·2h + a + 10·V )     with it (layer inputs kept, one layer recomputed)
    a = 2·(6h + 2·kv + m·i·k)  per token and layer (bf16): norms, q/k/v/o inputs and outputs, MLP
        (m = 4 for gated MLPs, 2 otherwise; i the MLP width; k the experts per token, 1 if dense)
        + 4·heads·s with eager attention (the stored s×s attention probabilities; sdpa and
        flash-attention keep none)
    10·V  the logits: bf16 output, its fp32 copy for the cross-entropy and that copy's gradient
    b micro-batch, s sequence length, L layers, h hidden size, kv = key/value heads × head size, V vocabulary

It is a lower bound: the CUDA context (~0.5-1 GiB), allocator fragmentation, DeepSpeed/FSDP
communication buckets and the optimizer step's temporaries come on top; keep 10-20% headroom.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
PRESETS = ("ddp", "deepspeed_zero2", "deepspeed_zero2_offload", "deepspeed_zero3", "fsdp2", "deepspeed_zero3_offload")

# config.json fields of the models the shipped train configs name, for machines without them.
KNOWN_ARCHITECTURES = {
    "deepseek-ai/deepseek-coder-6.7b-base": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32256, tie_word_embeddings=False,
    ),
    "Qwen/Qwen2.5-Coder-7B": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
    ),
    "codellama/CodeLlama-34b-hf": dict(
        model_type="llama", hidden_size=8192, intermediate_size=22016, num_hidden_layers=48,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
    ),
    "mistralai/Mixtral-8x7B-v0.1": dict(
        model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, num_local_experts=8,
        num_experts_per_tok=2, tie_word_embeddings=False,
    ),
    "bigcode/starcoder2-15b": dict(
        model_type="starcoder2", hidden_size=6144, intermediate_size=24576, num_hidden_layers=40,
        num_attention_heads=48, num_key_value_heads=4, vocab_size=49152, use_bias=True, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0,
    ),
    "mistralai/Mistral-7B-v0.3": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False,
    ),
    "Qwen/Qwen3-8B-Base": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
    ),
    "google/gemma-2-9b": dict(
        model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000, tie_word_embeddings=True,
    ),
}  # fmt: skip


def model_config(reference: str, trust_remote_code: bool = False):
    """From the model directory or the local cache; else the copied fields; else the hub."""
    from transformers import AutoConfig

    from mftcoder.models.resolve import locate_model

    directory, _ = locate_model(reference)
    if directory is None and reference in KNOWN_ARCHITECTURES:
        fields = dict(KNOWN_ARCHITECTURES[reference])
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoConfig.from_pretrained(directory or reference, trust_remote_code=trust_remote_code)


@dataclass(frozen=True)
class Run:
    """What the memory depends on in a train config."""

    mode: str  # full | lora | qlora
    lora_rank: int
    lora_alpha: float
    target_modules: str | list[str]
    quantization_bits: int
    optimizer: str
    batch: int
    seq: int
    checkpointing: bool
    eager_attention: bool

    @classmethod
    def from_train_config(cls, raw: dict) -> Run:
        return cls(
            mode=raw.get("peft_type", "lora") or "full",
            lora_rank=raw.get("lora_rank", 32),
            lora_alpha=raw.get("lora_alpha", 64),
            target_modules=raw.get("target_modules", "all-linear"),
            quantization_bits=raw.get("quantization_bits") or 4,
            optimizer=raw.get("optimizer", "adamw"),
            batch=raw.get("per_device_train_batch_size", 8),
            seq=raw.get("seq_length", 2048),
            checkpointing=raw.get("gradient_checkpointing", False),
            eager_attention=raw.get("attn_implementation") == "eager",
        )


@dataclass(frozen=True)
class ModelSizes:
    params: int  # P
    linear: int  # Q
    trainable: int  # T
    largest_layer: int  # Pl
    layers: int
    hidden: int
    kv: int
    mlp: int  # m·i·k of the formula
    heads: int
    vocab: int


def _lora_parameters(model, run: Run) -> int:
    """The adapter mftcoder's own wrapping would add (the family's targets, MoE experts included)."""
    from peft import LoraConfig, get_peft_model

    from mftcoder.models.families import lora_targets
    from mftcoder.models.loading import expert_rank_patterns

    if run.target_modules == "all-linear":
        targets = lora_targets(model, run.lora_rank, run.lora_alpha)
    else:
        targets = {"target_modules": list(run.target_modules)}
    with expert_rank_patterns():
        peft_model = get_peft_model(model, LoraConfig(r=run.lora_rank, lora_alpha=run.lora_alpha, **targets))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def model_sizes(config, run: Run) -> ModelSizes:
    """Counted on a meta-device model: exact, and nothing is allocated."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        head = model.get_output_embeddings()
        params = sum(p.numel() for p in model.parameters())
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
        layers = model.get_decoder().layers
        largest_layer = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
        # gate_proj (dense), gate_up_proj (fused: phi3, MoE experts)
        gated = any(re.search(r"gate(_up)?_proj(\.weight)?$", name) for name, _ in model.named_parameters())
        trainable = params if run.mode == "full" else _lora_parameters(model, run)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    width = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
    experts_per_token = getattr(text, "num_experts_per_tok", None) or 1
    return ModelSizes(
        params=params,
        linear=linear,
        trainable=trainable,
        largest_layer=largest_layer,
        layers=len(layers),
        hidden=text.hidden_size,
        kv=kv_heads * head_dim,
        mlp=(4 if gated else 2) * width * experts_per_token,
        heads=heads,
        vocab=text.vocab_size,
    )


def activations(m: ModelSizes, run: Run) -> float:
    per_layer = 2 * (6 * m.hidden + 2 * m.kv + m.mlp) + (4 * m.heads * run.seq if run.eager_attention else 0)
    kept = m.layers * 2 * m.hidden + per_layer if run.checkpointing else m.layers * per_layer
    return run.batch * run.seq * (kept + 10 * m.vocab)


def estimate(m: ModelSizes, run: Run, preset: str, processes: int, per_node: int) -> dict[str, float]:
    """Bytes per GPU (weights, gradients, optimizer, activations, total) and CPU RAM per node."""
    trainable = m.trainable
    quantised = NF4_BYTES if run.quantization_bits == 4 else 1.0
    frozen = {"full": 0, "lora": 2 * m.params, "qlora": quantised * m.linear + 2 * (m.params - m.linear)}[run.mode]
    # Under optimizer offload DeepSpeed's CPU AdamW runs (mftcoder refuses an 8-bit optimizer there).
    k = 6 if "8bit" in run.optimizer and not preset.endswith("offload") else 12
    n = processes
    weights, grads, states, cpu = frozen + 2 * trainable, 2 * trainable, k * trainable, 0.0
    if preset != "ddp":
        grads, states = grads / n, states / n
    # ZeRO-3 / FSDP gather a layer (and prefetch the next) in the base's storage format.
    gathered = 2 * m.largest_layer * weights / m.params
    if preset in ("deepspeed_zero3", "fsdp2"):
        weights = weights / n + gathered
    if preset.endswith("offload"):
        cpu, states = states * per_node, 0.0
    if preset == "deepspeed_zero3_offload":
        cpu += weights / n * per_node
        weights = gathered
    acts = activations(m, run)
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer": states,
        "activations": acts,
        "total": weights + grads + states + acts,
        "cpu_per_node": cpu,
    }


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def report(path: Path, gpus: int, nodes: int) -> str:
    raw = yaml.safe_load(path.read_text())
    config = model_config(raw["pretrained_model_path"], raw.get("trust_remote_code", False))
    run = Run.from_train_config(raw)
    sizes = model_sizes(config, run)
    rank = f" rank {run.lora_rank}" if run.mode != "full" else ""
    checkpointing = "on" if run.checkpointing else "off"
    lines = [
        f"{raw['pretrained_model_path']}: {sizes.params / 1e9:.2f}B parameters, {run.mode}{rank}, micro-batch "
        f"{run.batch} x {run.seq} tokens, activation checkpointing {checkpointing}, {gpus * nodes} GPUs ({nodes} node"
        + ("s)" if nodes > 1 else ")"),
        f"{'preset':<26}{'weights':>9}{'grads':>8}{'optim':>8}{'activ':>8}{'GPU GiB':>9}{'CPU GiB/node':>14}",
    ]
    for preset in PRESETS:
        e = estimate(sizes, run, preset, gpus * nodes, gpus)
        lines.append(
            f"{preset:<26}{_gib(e['weights']):>9}{_gib(e['gradients']):>8}{_gib(e['optimizer']):>8}"
            f"{_gib(e['activations']):>8}{_gib(e['total']):>9}{_gib(e['cpu_per_node']):>14}"
        )
    return "\n".join(lines)


def script_preset(config_name: str) -> str:
    """The preset a scripts/<name>.sh launches its config with."""
    for script in sorted((REPO / "scripts").glob("*.sh")):
        text = script.read_text()
        if f"CONFIG=configs/train/{config_name}.yaml" in text:
            return re.search(r"PRESET=configs/accelerate/(\S+)\.yaml", text).group(1)
    raise SystemExit(f"error: no script in scripts/ launches configs/train/{config_name}.yaml")


TABLE_COLUMNS = ("ddp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload")


def memory_table(gpus: int = 8) -> str:
    """One row per shipped model config: its script's preset, and GiB per GPU under each strategy."""
    rows = [
        "| train config | parameters | mode | script's preset | DDP | ZeRO-2 | ZeRO-3 / FSDP2 "
        "| ZeRO-3 offload (CPU/node) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted((REPO / "configs" / "train").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if path.name.startswith("demo"):
            continue  # the CPU demos (a random tiny model, SmolLM2-135M)
        run = Run.from_train_config(raw)
        sizes = model_sizes(model_config(raw["pretrained_model_path"]), run)
        cells = {p: estimate(sizes, run, p, gpus, gpus) for p in TABLE_COLUMNS}
        offload = cells["deepspeed_zero3_offload"]
        rows.append(
            f"| `{path.stem}` | {sizes.params / 1e9:.1f}B | {run.mode} | `{script_preset(path.stem)}` | "
            + " | ".join(_gib(cells[p]["total"]) for p in TABLE_COLUMNS[:3])
            + f" | {_gib(offload['total'])} ({_gib(offload['cpu_per_node'])}) |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    # Raised inside peft/transformers while wrapping the meta model, not by this script.
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path, help="a train config (YAML)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument(
        "--table", action="store_true", help="print the table of docs/memory.md (every shipped config, 8 GPUs)"
    )
    args = parser.parse_args(argv)
    if args.table:
        print(memory_table())
    elif args.config:
        print(report(args.config, args.gpus, args.nodes))
    else:
        parser.error("give a train config, or --table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
