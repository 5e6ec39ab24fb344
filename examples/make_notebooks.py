"""Write the example notebooks from the cells below (run: python examples/make_notebooks.py).

The notebooks are stored without outputs; tests/test_notebooks.py executes both with
LORAKIT_NOTEBOOK_SMALL=1 (a few steps on little data) so they never fall behind the code.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

LORA_FROM_SCRATCH = [
    new_markdown_cell("""\
# LoRA from scratch on the classic classifier

LoRA (Hu et al. 2021) leaves a pretrained weight matrix $W_0$ (shape `out × in`) frozen and
learns a low-rank change beside it:

$$W = W_0 + \\frac{\\alpha}{r}\\,B A, \\qquad A: r \\times \\text{in}, \\quad B: \\text{out} \\times r$$

so a layer computes $h = W_0 x + \\frac{\\alpha}{r} B (A x)$. With $r \\ll \\min(\\text{in}, \\text{out})$
it trains $r\\,(\\text{in} + \\text{out})$ numbers instead of $\\text{in} \\cdot \\text{out}$.

* **A** starts random and **B** at zero, so $BA = 0$: the adapted model starts *exactly* as the
  base model, and training moves it away from there.
* **α / r** (`lora_alpha / r`, `scaling`) keeps the size of the update about the same when you
  change r, so the learning rate need not change with it.
* After training, $\\frac{\\alpha}{r} BA$ can be added into $W_0$ (merging): the merged model is as
  fast as the base and gives the same outputs as the adapter.

This notebook does it by hand with lorakit's engine (`lorakit.lora`) on the classic model:
GloVe word vectors, mean pooling, `fc1` (50 → 128), ReLU, `fc2` (128 → 2), on the
rotten-tomatoes review sentiment data that ships with lorakit."""),
    new_code_cell("""\
import copy
import os

import torch

from lorakit.data import load_dataset
from lorakit.lora import LoraConfig, inject, merge_and_unload, trainable_parameters
from lorakit.models.classic import TextClassifier, build_vocabulary, collate, encode_split

# LORAKIT_NOTEBOOK_SMALL=1 (the test suite): little data and a few steps
SMALL = os.environ.get("LORAKIT_NOTEBOOK_SMALL") == "1"
TRAIN_EXAMPLES, STEPS = (400, 10) if SMALL else (None, 400)
torch.manual_seed(0)"""),
    new_markdown_cell("""\
## The base model

lorakit's `classic` recipe pretrains this classifier on news topics and then transfers it to
sentiment with LoRA (`lorakit train classic`). Here the base is simpler: the GloVe embedding
and a freshly initialised `fc1`, both frozen. LoRA adapts the embedding and `fc1`; the new
head `fc2` trains whole (`modules_to_save`)."""),
    new_code_cell("""\
data = load_dataset("rotten-tomatoes")
train_split = data["train"]
if TRAIN_EXAMPLES:
    train_split = train_split.select(range(TRAIN_EXAMPLES))
vocab, vectors = build_vocabulary(train_split["text"], "glove-6b-50d")

base = TextClassifier(len(vocab), vectors.shape[1], num_classes=2)
base.embedding.weight.data.copy_(vectors)
base.eval()
print(f"vocabulary {len(vocab):,} words, embedding {tuple(vectors.shape)}")

def batches(split, size, shuffle):
    encoded = encode_split(split, vocab, max_length=64)
    encoded = encoded.select_columns(["input_ids", "label"])
    return torch.utils.data.DataLoader(encoded, batch_size=size, shuffle=shuffle, collate_fn=collate)

train_batches = batches(train_split, 32, shuffle=True)
validation_batches = batches(data["validation"], 256, shuffle=False)

@torch.no_grad()
def accuracy(model):
    model.eval()
    right = total = 0
    for batch in validation_batches:
        predicted = model(batch["input_ids"], batch["attention_mask"]).logits.argmax(-1)
        right += (predicted == batch["labels"]).sum().item()
        total += len(batch["labels"])
    return right / total"""),
    new_markdown_cell("""\
## Inject LoRA

`inject` wraps each module `target_modules` names in a LoRA layer, in place, and freezes
everything else. The wrapped layer keeps the original as `base_layer` and holds one `lora_A` /
`lora_B` pair per adapter (PEFT's names, so the adapter file loads in PEFT too)."""),
    new_code_cell("""\
batch = next(iter(validation_batches))
before = base(batch["input_ids"], batch["attention_mask"]).logits

config = LoraConfig(r=4, lora_alpha=8, target_modules=["embedding", "fc1"], modules_to_save=["fc2"])
model = inject(copy.deepcopy(base), config)
print(model.fc1)
counts = trainable_parameters(model)
print(f"trainable {counts.trainable:,} of {counts.total:,} parameters ({counts.percent:.2f}%)")"""),
    new_markdown_cell("""\
The shapes: for `fc1` (in = 50, out = 128) A is `r × in` and B is `out × r`, and
`scaling` is α / r. B is all zeros, so the adapted model's outputs are the base's, to the bit."""),
    new_code_cell("""\
fc1 = model.fc1
A, B = fc1.lora_A["default"].weight, fc1.lora_B["default"].weight
print("A", tuple(A.shape), " B", tuple(B.shape), " scaling", fc1.scaling["default"])
print("B is zero:", bool((B == 0).all()))
after = model(batch["input_ids"], batch["attention_mask"]).logits
assert torch.equal(before, after)
print("outputs equal to the base's before training")"""),
    new_markdown_cell("""\
## Train

Only the adapter's parameters (and the head) require gradients; a plain PyTorch loop will do."""),
    new_code_cell("""\
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
print(f"validation accuracy before: {accuracy(model):.3f}")
model.train()
step = 0
while step < STEPS:
    for batch in train_batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if step % 100 == 0 or step == STEPS:
            print(f"step {step}: loss {loss.item():.3f}")
        if step == STEPS:
            break
print(f"validation accuracy after {STEPS} steps: {accuracy(model):.3f}")"""),
    new_markdown_cell("""\
## The update, and merging it

`get_delta_weight` is the layer's $\\frac{\\alpha}{r} BA$ (`out × in`, the shape of $W_0$). Merging
adds it into the base weight and drops the LoRA layers: the merged model gives the same outputs
as base + adapter."""),
    new_code_cell("""\
model.eval()
delta = fc1.get_delta_weight("default")
assert torch.allclose(delta, fc1.scaling["default"] * B @ A)
print("delta", tuple(delta.shape), "rank", torch.linalg.matrix_rank(delta).item())

batch = next(iter(validation_batches))
adapted = model(batch["input_ids"], batch["attention_mask"]).logits
merged = merge_and_unload(copy.deepcopy(model))
print(merged.fc1)
same = merged(batch["input_ids"], batch["attention_mask"]).logits
print("largest difference:", (same - adapted).abs().max().item())
assert torch.allclose(same, adapted, atol=1e-5)"""),
]

INSTRUCTION_TUNING = [
    new_markdown_cell("""\
# Instruction tuning SmolLM2 with the Python API

SmolLM2-135M-Instruct ships with lorakit (a GGUF file, converted once into lorakit's cache).
The `instruct` recipe turns rotten-tomatoes reviews into chat turns ("Is this movie review
positive or negative?") and trains LoRA on every linear layer (`all-linear`: the attention's
q/k/v/o and the MLP's gate/up/down projections), with the loss on the assistant's answer only.

Every `lorakit` command is one call of `lorakit.api`; `overrides` are the CLI's `--set`."""),
    new_code_cell("""\
import json
import os
import tempfile
from pathlib import Path

import lorakit.api as lk

# LORAKIT_NOTEBOOK_SMALL=1 (the test suite): a few steps on little data;
# LORAKIT_NOTEBOOK_MODEL: another model folder (the tests' tiny random Llama)
SMALL = os.environ.get("LORAKIT_NOTEBOOK_SMALL") == "1"
MODEL = os.environ.get("LORAKIT_NOTEBOOK_MODEL", "smollm2")
settings = [f"model.name={MODEL}", "train.max_steps=3", "train.batch_size=8",
            "data.max_train_samples=48", "data.max_eval_samples=16", "train.eval_every=0",
            "train.checkpoint_every=0"] if SMALL else ["train.max_steps=150"]
out = Path(tempfile.mkdtemp()) / "instruct"
settings"""),
    new_markdown_cell("""\
## Train

`lk.train` runs the recipe and returns its `summary.json`: the test perplexity of the base and
the tuned model, the verdict accuracy (does the model's answer name the right sentiment), the
number of trainable parameters and the adapter's size."""),
    new_code_cell("""\
summary = lk.train("instruct", out=out, overrides=settings)
keys = ["trainable_params", "total_params", "adapter_bytes", "base_test_perplexity",
        "test_perplexity", "test_verdict_accuracy", "train_seconds"]
print(json.dumps({k: summary.get(k) for k in keys}, indent=1))"""),
    new_markdown_cell("""\
## Generate

`lk.generate` loads the base model with the run's adapter and answers the prompt as the user's
turn of the chat template, stopping at the end of the assistant's turn."""),
    new_code_cell("""\
prompt = ("Is this movie review positive or negative? Answer with one word.\\n\\n"
          "Review: A warm, funny film with a terrific cast.")
answer = lk.generate(out, prompt, max_new_tokens=8 if SMALL else 20, temperature=0)
print(repr(answer))"""),
    new_markdown_cell("""\
The run directory holds everything: `summary.json`, `metrics.jsonl`, `report.html`, and the
adapter in PEFT's format (`adapter/adapter_config.json`, `adapter/adapter_model.safetensors`)."""),
    new_code_cell("""\
sorted(p.name for p in out.iterdir())"""),
]

NOTEBOOKS = {
    "lora_from_scratch.ipynb": LORA_FROM_SCRATCH,
    "instruction_tuning_smollm2.ipynb": INSTRUCTION_TUNING,
}


def write_notebooks(folder: Path = HERE) -> list[Path]:
    written = []
    for name, cells in NOTEBOOKS.items():
        notebook = new_notebook(cells=cells)
        for number, cell in enumerate(notebook.cells):
            cell.id = f"cell-{number}"  # stable ids: writing again changes nothing
        notebook.metadata["kernelspec"] = {
            "name": "python3", "display_name": "Python 3", "language": "python",
        }  # fmt: skip
        notebook.metadata["language_info"] = {"name": "python"}
        path = folder / name
        nbformat.write(notebook, path)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_notebooks():
        print(path)
