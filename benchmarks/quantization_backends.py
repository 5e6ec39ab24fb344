"""Quantized frozen Linears under a LoRA branch: bitsandbytes, torchao and optimum-quanto compared.

One SmolLM2-135M decoder block's Linears (q, k, v, o: 576 wide; gate, up, down: 576 x 1536) as
a stack, each frozen base held in int8 or 4 bits by one library, a LoRA branch (r=8) beside it.
Per setting, in a process of its own:
- time: forward + backward of ``--tokens`` tokens through the stack (the median of ``--repeats``),
  the gradient reaching A, B and the input as in training;
- memory: the resident bytes the frozen weights of ``--layers`` such blocks take (SmolLM2 has
  30): RSS after they are built minus RSS before, each block quantized as soon as it is made;
- error: the largest |quantized - fp32| output of the stack, relative to the largest output.

    pip install torchao==0.18.0 optimum-quanto==0.2.7 --no-deps   # the two not in lorakit
    OMP_NUM_THREADS=1 python benchmarks/quantization_backends.py   # table + results JSON
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, markdown_table, rss_bytes  # noqa: E402

SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
SETTINGS = [
    "fp32", "bf16",
    "bitsandbytes int8", "bitsandbytes nf4",
    "torchao int8", "torchao nf4",
    "quanto int8", "quanto int4",
]  # fmt: skip


def quantized(linear: nn.Linear, setting: str) -> nn.Module:
    """`linear` (fp32, frozen) held as `setting` says, by that library's own layer or tensor."""
    library, _, kind = setting.partition(" ")
    if setting == "fp32":
        return linear
    if setting == "bf16":
        return linear.to(torch.bfloat16)
    if library == "bitsandbytes":
        import bitsandbytes as bnb

        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(*_in_out(linear), bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(linear.weight.data, False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(
                *_in_out(linear), bias=False, compute_dtype=torch.float32, quant_type="nf4"
            )
            layer.weight = bnb.nn.Params4bit(linear.weight.data, False, quant_type="nf4")
        return layer.to("cpu")  # bitsandbytes quantizes on the move to a device
    if library == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_, to_nf4

        if kind == "int8":
            quantize_(linear, Int8WeightOnlyConfig())
        else:
            # SmolLM2's widths need scaler blocks of 64 (torchao's default 256 divides none)
            nf4 = to_nf4(linear.weight.data, block_size=64, scaler_block_size=64)
            linear.weight = nn.Parameter(nf4, requires_grad=False)
        return linear
    from optimum import quanto

    holder = nn.Sequential(linear)  # quanto replaces a model's children, not the model
    quanto.quantize(holder, weights=quanto.qint8 if kind == "int8" else quanto.qint4)
    quanto.freeze(holder)
    return holder[0]


def _in_out(linear: nn.Linear) -> tuple[int, int]:
    return linear.in_features, linear.out_features


class LoraBeside(nn.Module):
    """base(x) + B·A·x with A and B trainable in fp32 (the LoRA layer's arithmetic)."""

    def __init__(self, base: nn.Module, fan_in: int, fan_out: int, r: int = 8) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(r, fan_in) / fan_in**0.5)
        self.lora_B = nn.Parameter(torch.randn(fan_out, r) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(_like(self.base, x))
        return result.float() + (x @ self.lora_A.T) @ self.lora_B.T * 2.0


def _like(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x in bf16 for a bf16 Linear; every quantized layer takes fp32 inputs."""
    weight = getattr(module, "weight", None)
    bf16 = isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16
    return x.to(torch.bfloat16) if bf16 else x


def block(setting: str, seed: int) -> list[nn.Module]:
    """The block's Linears (the same weights for every setting), held as `setting` says."""
    torch.manual_seed(seed)
    bases = [nn.Linear(i, o, bias=False).requires_grad_(False) for i, o in SHAPES]
    lora = [LoraBeside(nn.Identity(), i, o) for i, o in SHAPES]
    for layer, base in zip(lora, bases, strict=True):
        layer.base = quantized(base, setting)
    return lora


def resident_bytes() -> int:
    """RSS once freed memory is handed back (glibc keeps freed heap pages otherwise)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def run_stack(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Each Linear of the block applied to the block's input (its own width), outputs summed."""
    out = 0.0
    for layer, (fan_in, _) in zip(layers, SHAPES, strict=True):
        out = out + layer(x[..., :fan_in]).sum()
    return out


def measure_one(setting: str, args: argparse.Namespace) -> dict:
    block(setting, seed=args.layers)  # the library loaded and warm: its code is not counted
    before = resident_bytes()
    blocks = [block(setting, seed) for seed in range(args.layers)]
    weights_bytes = resident_bytes() - before
    layers = blocks[0]
    x = torch.randn(args.tokens, 1536, generator=torch.Generator().manual_seed(1))

    def step() -> None:
        x_ = x.clone().requires_grad_(True)
        run_stack(layers, x_).backward()

    step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with torch.no_grad():
        reference = block("fp32", 0)
        outs = [layer.base(_like(layer.base, x[:8, :fan_in])).float()
                for layer, (fan_in, _) in zip(layers, SHAPES, strict=True)]  # fmt: skip
        refs = [
            layer.base(x[:8, :fan_in]) for layer, (fan_in, _) in zip(reference, SHAPES, strict=True)
        ]
        error = max(
            float((o - r).abs().max() / r.abs().max()) for o, r in zip(outs, refs, strict=True)
        )
    return {"setting": setting, "step_s": statistics.median(times),
            "weights_mb": weights_bytes / 2**20, "relative_error": error}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30, help="blocks whose memory is measured")
    parser.add_argument("--tokens", type=int, default=256, help="rows of one forward + backward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "quantization_backends.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args)))
        return
    env = machine()
    rows = []
    for setting in SETTINGS:
        command = [sys.executable, __file__, "--one", setting, "--layers", str(args.layers),
                   "--tokens", str(args.tokens), "--repeats", str(args.repeats)]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    fp32 = rows[0]
    for row in rows:
        row["step_vs_fp32"] = row["step_s"] / fp32["step_s"]
        row["memory_vs_fp32"] = row["weights_mb"] / fp32["weights_mb"]
    columns = {"setting": "", "step_s": ".4f", "step_vs_fp32": ".2f", "weights_mb": ",.0f",
               "memory_vs_fp32": ".2f", "relative_error": ".4f"}  # fmt: skip
    print(markdown_table(rows, columns))
    print(f"\n{args.layers} blocks' weights; step: {args.tokens} tokens through one block")
    versions = {}
    for name in ("bitsandbytes", "torchao", "optimum.quanto"):
        module = __import__(name, fromlist=["__version__"])
        versions[name] = getattr(module, "__version__", "?")
    result = {"layers": args.layers, "tokens": args.tokens, "rows": rows,
              "versions": versions, "machine": env}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
