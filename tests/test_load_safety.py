"""What lorakit refuses when it loads an adapter or a run, each with a one-line error: a config
file it cannot read (nested too deep, not UTF-8, an alpha that overflows), tensors that are not
finite or not floating point, a run whose max_length the model cannot take; and writes that fail
(disk full) leaving nothing half-written."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import lorakit.lora as lora
from lorakit import api
from lorakit.cli import main
from lorakit.config import ConfigError, load_config, to_toml
from lorakit.recipes import recipe_path
from lorakit.serve.errors import AdapterLoadError
from lorakit.serve.registry import AdapterRegistry
from lorakit.train import checkpoint as ckpt
from tiny_models import tiny_bert

DISK_FULL = [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
]


def adapter(folder: Path, **kwargs) -> Path:
    options = dict(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    config = lora.LoraConfig(**{**options, **kwargs}, modules_to_save=["classifier"])
    return lora.save_adapter(lora.inject(tiny_bert(num_labels=3), config), folder)


def rewrite_config(folder: Path, edit) -> None:
    path = folder / lora.CONFIG_NAME
    path.write_bytes(edit(path.read_bytes()))


def nested_100k_deep(data: bytes) -> bytes:
    return data.replace(b'"bias":', b'"deep": ' + b"[" * 100_000 + b"]" * 100_000 + b', "bias":')


def not_utf8(data: bytes) -> bytes:
    return data.replace(b'"none"', b'"n\xf6ne"')  # a Latin-1 byte


def huge_alpha(data: bytes) -> bytes:
    return json.dumps({**json.loads(data), "lora_alpha": 1e308}).encode()


CONFIG_ATTACKS = [
    (nested_100k_deep, "nested too deep"),
    (not_utf8, "not UTF-8"),
    (huge_alpha, "lora_alpha must be a finite number of magnitude at most"),
]


def one_line(message: str) -> bool:
    return "\n" not in message.strip() and "Traceback" not in message


# ---------------------------------------------------------------- adapter_config.json
@pytest.mark.parametrize(("attack", "words"), CONFIG_ATTACKS)
def test_an_unreadable_adapter_config_is_one_line_naming_the_file(tmp_path, attack, words):
    folder = adapter(tmp_path / "adapter")
    rewrite_config(folder, attack)
    with pytest.raises(lora.AdapterFileError) as err:
        lora.read_adapter(folder)
    assert words in str(err.value) and str(folder / lora.CONFIG_NAME) in str(err.value)
    assert one_line(str(err.value))


@pytest.mark.parametrize(("attack", "words"), CONFIG_ATTACKS)
def test_the_cli_prints_one_line_for_an_unreadable_adapter_config(tmp_path, attack, words, capsys):
    folder = adapter(tmp_path / "adapter")
    rewrite_config(folder, attack)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert words in err and one_line(err)


@pytest.fixture(scope="module")
def registry(tiny_bert_dir):
    return AdapterRegistry(str(tiny_bert_dir))


@pytest.mark.parametrize(("attack", "words"), CONFIG_ATTACKS)
def test_the_server_answers_422_for_an_unreadable_adapter_config(registry, tmp_path, attack, words):
    folder = adapter_for(registry, tmp_path / "adapter")
    rewrite_config(folder, attack)
    with pytest.raises(AdapterLoadError) as err:
        registry.load("bad", folder)
    assert err.value.status == 422 and words in str(err.value)
    assert "bad" not in registry.names()


def test_alpha_is_bounded_in_configs_too():
    lora.LoraConfig(lora_alpha=lora.MAX_ALPHA, target_modules=["query"])
    lora.LoraConfig(lora_alpha=-lora.MAX_ALPHA, target_modules=["query"])
    for alpha in (lora.MAX_ALPHA * 2, 1e308, float("inf"), float("nan")):
        with pytest.raises(lora.LoraConfigError, match="magnitude at most"):
            lora.LoraConfig(lora_alpha=alpha, target_modules=["query"])
    with pytest.raises(lora.LoraConfigError, match="alpha_pattern"):
        lora.LoraConfig(alpha_pattern={"query": 1e308}, target_modules=["query"])


# ---------------------------------------------------------------- tensors
def rewrite_tensor(folder: Path, change) -> str:
    path = folder / lora.WEIGHTS_NAME
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = change(tensors[key])
    save_file(tensors, str(path), metadata={"format": "pt"})
    return key


def with_value(value: float):
    def change(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor.view(-1)[3] = value
        return tensor

    return change


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (with_value(float("nan")), "not finite (NaN or infinity)"),
        (with_value(float("inf")), "not finite (NaN or infinity)"),
        (lambda t: t.half().float() * torch.inf, "not finite (NaN or infinity)"),
        (lambda t: t.to(torch.int64), "holds int64 numbers"),
        (lambda t: t > 0, "holds bool numbers"),
        (lambda t: t.to(torch.complex64), "holds complex64 numbers"),
    ],
)
def test_tensors_that_are_not_finite_floating_point_are_refused(tmp_path, change, words):
    folder = adapter(tmp_path / "adapter")
    key = rewrite_tensor(folder, change)
    model = tiny_bert(num_labels=3)
    with pytest.raises(lora.AdapterFileError) as err:
        lora.load_adapter(model, folder)
    assert words in str(err.value) and key in str(err.value) and one_line(str(err.value))
    assert not any(isinstance(m, lora.LoraLayer) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_floating_point_tensors_load(tmp_path, dtype):
    folder = adapter(tmp_path / "adapter")
    rewrite_tensor(folder, lambda t: t.to(dtype))
    lora.load_adapter(tiny_bert(num_labels=3), folder)


def test_the_server_refuses_non_finite_tensors_with_422(registry, tmp_path):
    folder = adapter_for(registry, tmp_path / "adapter")
    rewrite_tensor(folder, with_value(float("nan")))
    with pytest.raises(AdapterLoadError, match="not finite") as err:
        registry.load("nan", folder)
    assert err.value.status == 422 and "nan" not in registry.names()


def adapter_for(registry: AdapterRegistry, folder: Path) -> Path:
    """An adapter (2 labels) for the registry's base model."""
    from lorakit.models.transformer import load_sequence_classifier

    model, _, _ = load_sequence_classifier(registry.base, ["no", "yes"])
    config = lora.LoraConfig(
        r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
        init_lora_weights=False,
    )  # fmt: skip
    return lora.save_adapter(lora.inject(model, config), folder)


# ---------------------------------------------------------------- a run's max_length
def finished_run(folder: Path, base: Path, max_length: int) -> Path:
    """A finished sentiment run on `base` whose config.toml says `data.max_length`."""
    from lorakit.models.transformer import load_sequence_classifier

    labels = ["neg", "pos"]
    config = load_config(
        recipe_path("sentiment"), [f"model.name={base}", f"data.max_length={max_length}"]
    )
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(to_toml(config))
    (folder / "summary.json").write_text(json.dumps({"base_model": str(base), "labels": labels}))
    model, _, _ = load_sequence_classifier(str(base), labels)
    lora_config = lora.LoraConfig(
        r=4, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    lora.save_adapter(lora.inject(model, lora_config), folder / "adapter")
    return folder


def test_a_run_whose_max_length_the_model_cannot_take_is_refused_when_loaded(
    tiny_bert_dir, tmp_path, capsys
):
    run = finished_run(tmp_path / "run", tiny_bert_dir, max_length=2048)
    message = "data.max_length: 2048 is more than the 128 tokens"
    with pytest.raises(ConfigError, match=message):
        api.predict(run, ["a film"])
    assert main(["predict", str(run), "a film"]) == 2
    err = capsys.readouterr().err  # after transformers' progress bar
    assert message in err.splitlines()[-1] and "Traceback" not in err


def test_the_server_refuses_a_run_whose_max_length_the_model_cannot_take(
    registry, tiny_bert_dir, tmp_path
):
    run = finished_run(tmp_path / "run", tiny_bert_dir, max_length=2048)
    with pytest.raises(AdapterLoadError, match="data.max_length: 2048 is more than") as err:
        registry.load("long", run)
    assert err.value.status == 422 and "long" not in registry.names()
    good = finished_run(tmp_path / "good", tiny_bert_dir, max_length=128)
    assert registry.load("good", good).max_length == 128
    registry.unload("good")


# ---------------------------------------------------------------- disk full
@pytest.mark.parametrize("error", DISK_FULL, ids=["OSError", "SafetensorError"])
def test_a_checkpoint_write_on_a_full_disk_is_a_checkpoint_error(tmp_path, monkeypatch, error):
    folder = tmp_path / "checkpoints"
    groups = {"model": {"w": torch.ones(3)}}
    ckpt.write_checkpoint(folder, 1, groups, {"epoch": 0})

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)  # half a file, as a full disk leaves it
        raise error

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.write_checkpoint(folder, 2, groups, {"epoch": 0})
    assert "could not write checkpoint step-2" in str(err.value) and one_line(str(err.value))
    assert "No space left on device" in str(err.value) and "step-1 is intact" in str(err.value)
    assert sorted(p.name for p in folder.iterdir()) == ["step-1"]


def fail_writing(monkeypatch, folder: Path, which: str, error: Exception) -> None:
    """Writing the adapter's weights or its config into `folder` fails as on a full disk."""
    if which == "weights":

        def full(tensors, filename, metadata=None):
            Path(filename).write_bytes(b"\0" * 10)  # half a file, as a full disk leaves it
            raise error

        monkeypatch.setattr("lorakit.lora.adapter_files.save_file", full)
        return
    real_write_text = Path.write_text

    def full_text(self, *args, **kwargs):
        if self.parent == folder:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_text)


@pytest.mark.parametrize(
    ("which", "error"),
    [("weights", DISK_FULL[0]), ("weights", DISK_FULL[1]), ("config", DISK_FULL[0])],
    ids=["weights-OSError", "weights-SafetensorError", "config-OSError"],
)
def test_saving_an_adapter_on_a_full_disk_is_one_line_and_leaves_nothing(
    tmp_path, monkeypatch, error, which
):
    folder = tmp_path / "adapter"
    fail_writing(monkeypatch, folder, which, error)
    with pytest.raises(lora.AdapterFileError) as err:
        adapter(folder)
    assert "could not write the adapter" in str(err.value) and one_line(str(err.value))
    assert "No space left on device" in str(err.value)
    assert not folder.exists()  # the folder it made is gone with its half-written files


@pytest.mark.parametrize("which", ["weights", "config"])
def test_a_failed_save_over_an_adapter_keeps_the_old_one_whole(tmp_path, monkeypatch, which):
    folder = adapter(tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    fail_writing(monkeypatch, folder, which, DISK_FULL[0])
    with pytest.raises(lora.AdapterFileError, match="No space left"):
        adapter(folder, r=2)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
