"""One validated configuration schema for every recipe.

A config is a TOML file (a built-in ``recipes/<name>.toml`` or the user's own) plus ``--set
key.sub=value`` overrides. Everything is checked before any work starts, and every problem is
reported on its own line naming the dotted key and what it accepts. ``to_toml`` writes the fully
resolved config back, so ``lorakit train RUN_DIR/config.toml`` repeats a run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from lorakit.lora.config import LoraConfig
from lorakit.lora.errors import LoraConfigError


class ConfigError(ValueError):
    """A config that cannot run: the message has one line per problem."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """The task's data: a built-in name (``rotten-tomatoes``, ``bbc-news``) or a file/folder."""

    name: str = "rotten-tomatoes"
    path: str | None = Field(
        None, description="a .csv/.jsonl/.parquet file or folder; wins over name"
    )
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = Field(128, gt=0)
    max_train_samples: int | None = Field(None, gt=0)
    max_eval_samples: int | None = Field(
        None,
        gt=0,
        description="causal-LM recipes: validation examples that the evaluations during "
        "training use (a fixed random subset); the test split is always whole",
    )
    forgetting_on: str | None = Field(
        None,
        description="other data (a built-in name or a file), measured on the base and after "
        "training, to see how far training moved the model beyond its own data: a causal LM's "
        "perplexity on its test text; a classifier's encoder (compare = true) read by a linear "
        "probe fitted on the base for that data's labels",
    )

    @property
    def source(self) -> str:
        """What to pass to ``lorakit.data.load_dataset``."""
        return self.path or self.name

    def reading(self, source: str, **changes: Any) -> DataConfig:
        """A copy that reads ``source`` instead: an existing file or folder as ``path``, else a
        built-in ``name``; ``changes``: other fields to set."""
        path = Path(source).expanduser()
        where = {"path": str(path)} if path.exists() else {"name": source, "path": None}
        return self.model_copy(update={**where, **changes})

    @model_validator(mode="after")
    def _some_data(self) -> DataConfig:
        if not (self.path or self.name):
            raise ValueError(
                "give the data: data.path=FILE (a .csv, .jsonl or .parquet file or a folder) "
                "or data.name=a built-in dataset"
            )
        return self


def only_for(*pipelines: str) -> dict[str, Any]:
    """``Field(..., **only_for("classic"))``: a setting only those pipelines read. Other
    pipelines accept it, and ``to_toml`` leaves it out of their configs (and so reports)."""
    return {"json_schema_extra": {"pipelines": list(pipelines)}}


class ModelConfig(_Section):
    name: str = Field(
        "glove-classifier",
        description="a model folder, a hub id, or the classic model; causal LMs also "
        "'tiny-gpt2', 'smollm2' or a .gguf file",
    )
    embeddings: str = Field(
        "glove-6b-50d",
        description="classic model: 'glove-6b-50d' or a GloVe .txt",
        **only_for("classic"),
    )
    pretrained: str | None = Field(
        None, description="an existing base model folder; skips pretraining"
    )
    hidden: int = Field(128, gt=0, description="classic model: fc1's width", **only_for("classic"))
    dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="transformer models: the frozen model's own dropout (not LoRA's) while "
        "training; unset keeps the model's config",
    )
    gguf_file: str | None = Field(
        None,
        description="causal LMs: the .gguf file in the folder model.name to load (converted "
        "once into a Hugging Face folder in lorakit's cache)",
        **only_for("causal_lm"),
    )

    quantize: Literal["none", "int8", "nf4"] = Field(
        "none",
        description="causal LMs: the frozen base's Linears held in 8 bits or 4 (NF4, QLoRA) "
        "by bitsandbytes; LoRA trains in full precision and saves an ordinary adapter",
        **only_for("causal_lm"),
    )

    @field_validator("gguf_file")
    @classmethod
    def _a_gguf_file_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.lower().endswith(".gguf") or Path(value).is_absolute()):
            raise ValueError(
                f"{value!r} is not a .gguf file inside model.name's folder: give a name such as "
                "'model.Q4_1.gguf', or set model.name to the .gguf file's path"
            )
        return value

    @model_validator(mode="after")
    def _one_gguf_file(self) -> ModelConfig:
        if self.gguf_file is not None and self.name.lower().endswith(".gguf"):
            raise ValueError(
                "model.name is a .gguf file and model.gguf_file names another: set model.name "
                "to the folder that holds model.gguf_file, or leave model.gguf_file out"
            )
        return self


class PretrainConfig(_Section):
    """Recipes that first train their own base model (``classic``) read this section."""

    data: str = "bbc-news"
    epochs: int = Field(5, gt=0)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(32, gt=0)
    max_length: int = Field(256, gt=0)
    steps: int = Field(
        0, ge=0, description="optimizer steps (pretrain-tiny-gpt2); 0 = the recipe's default"
    )


class CausalConfig(_Section):
    """Causal-LM recipes (``causal-lm``, ``instruct``, ``summarize``) read this section."""

    mode: Literal["lm", "instruction"] = Field(
        "lm", description="'lm': packed blocks of text; 'instruction': loss on responses only"
    )
    block_size: int = Field(128, ge=2, description="lm mode: tokens per packed block")
    packing: bool = Field(
        True,
        description="lm mode: true = the texts joined by eos and cut into full blocks of "
        "block_size; false = one row per text, padded (padding not counted), cut at "
        "data.max_length",
    )
    prompt_column: str = "prompt"
    response_column: str = "response"
    chat: Literal["auto", "on", "off"] = Field(
        "auto",
        description="instruction mode: render examples with the tokenizer's chat template "
        "('auto': when it has one), loss on the assistant's turns and their end-of-turn token",
    )
    system_prompt: str | None = Field(
        None, description="chat: a system turn before every example; unset: the template's own"
    )
    rouge: bool = Field(
        False,
        description="test: generate a response to every test prompt (greedy) and score ROUGE "
        "against the reference, for the base model and the tuned one",
    )
    max_new_tokens: int = Field(
        128,
        gt=0,
        description="generation at test time (rouge, end-of-turn check): new tokens at most",
    )
    full_lr: float | None = Field(
        None, gt=0, description="compare = true: full fine-tuning's lr; default train.lr / 10"
    )

    select_by: Literal["perplexity", "verdict_accuracy"] = Field(
        "perplexity",
        description="the validation figure that picks the adapter kept; 'verdict_accuracy' "
        "needs verdict data (the built-in rotten-tomatoes verdicts)",
    )


# LoraConfig fields that are not settings: the pipeline knows the model it builds (its task,
# its name), training is no inference, and `extra` keeps unknown fields of PEFT's files
SET_BY_THE_PIPELINE = ("task_type", "base_model_name_or_path", "inference_mode", "extra")
ENGINE_REFUSED = "lora_config"  # the pydantic error type of a value LoraConfig refuses


class _LoraSettings(_Section):
    """``[lora]``: ``engine`` plus every field of the engine's ``LoraConfig``, with its names,
    types and defaults (``lorakit.lora.config`` says what each does). ``LoraConfig`` checks the
    values, so the section accepts exactly what the engine does."""

    engine: Literal["lorakit", "peft"] = Field(
        "lorakit", description="whose LoRA: lorakit's engine or PEFT's (the same adapter files)"
    )

    @field_validator("modules_to_save", mode="before", check_fields=False)
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # --set lora.modules_to_save=wte

    @model_validator(mode="after")
    def _engine_accepts(self) -> _LoraSettings:
        try:
            self.lora_config()
        except LoraConfigError as err:
            context = {"key": err.key, "message": str(err)}
            raise PydanticCustomError(ENGINE_REFUSED, "{message}", context) from None
        return self

    def lora_config(self, **pipeline: Any) -> LoraConfig:
        """The engine's config of these settings; ``pipeline`` adds the fields the pipeline
        knows (``task_type``, ``base_model_name_or_path``)."""
        return LoraConfig(**self.model_dump(exclude={"engine"}), **pipeline)


def _engine_fields() -> dict[str, Any]:
    """``{name: (type, default)}`` of the LoraConfig fields a config sets."""
    types = get_type_hints(LoraConfig)
    return {
        field.name: (types[field.name], _default(field))
        for field in dataclasses.fields(LoraConfig)
        if field.name not in SET_BY_THE_PIPELINE
    }


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is dataclasses.MISSING:
        return field.default
    return Field(default_factory=field.default_factory)


LoraSection = create_model(
    "LoraSection", __base__=_LoraSettings, __doc__=_LoraSettings.__doc__, **_engine_fields()
)


class TrainConfig(_Section):
    trainer: Literal["lorakit", "hf"] = "lorakit"
    epochs: int = Field(3, gt=0)
    max_steps: int = Field(0, ge=0, description="0 = no limit")
    batch_size: int = Field(16, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lora_plus_ratio: float = Field(
        1.0,
        ge=1,
        description="LoRA+: the B matrices train at lr x this ratio (Hayou et al. 2024 use 16); "
        "1 = one lr for all",
    )
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0, description="0 = no clipping")
    grad_accum_steps: int = Field(1, gt=0)
    eval_every: int = Field(0, ge=0, description="steps; 0 = once per epoch")
    early_stopping_patience: int = Field(0, ge=0, description="evaluations; 0 = off")
    bf16: bool | Literal["auto"] = Field(
        False,
        description="bf16 autocast, the frozen base held in bf16 (our loop); 'auto': on when "
        "the CPU or GPU computes bf16 natively",
    )
    fast_dropout: bool = Field(
        True,
        description="dropout masks from a fast generator on the CPU (lorakit.nn.fast_dropout); "
        "false: PyTorch's own dropout",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="trades compute for activation memory: each transformer block keeps only its "
        "input and recomputes the rest in the backward pass (about one more forward a step)",
    )
    log_every: int = Field(50, gt=0)
    log_to: list[Literal["tensorboard", "wandb"]] | Literal["auto"] = Field(
        "auto",
        description="live trackers beside metrics.jsonl (RUN_DIR/tensorboard, wandb): 'auto' = "
        "TensorBoard when installed; [] = none",
    )
    num_workers: int = Field(0, ge=0)
    checkpoint_every: int = Field(
        200, ge=0, description="optimizer steps between checkpoints (RUN_DIR/checkpoints); 0 = off"
    )
    keep_checkpoints: int = Field(2, gt=0, description="the newest checkpoints kept")
    keep_checkpoints_after_run: bool = Field(
        False,
        description="keep RUN_DIR/checkpoints when the run finishes; false: removed then, as "
        "they serve only --resume",
    )

    @field_validator("log_to", mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, value: Any) -> Any:
        return [value] if value in ("tensorboard", "wandb") else value  # --set train.log_to=wandb

    @property
    def use_bf16(self) -> bool:
        """``bf16`` resolved: ``"auto"`` asks the hardware (emulated bf16 is slower than fp32)."""
        if self.bf16 != "auto":
            return bool(self.bf16)
        import torch  # only here: reading a config needs no torch

        if torch.cuda.is_available():
            return torch.cuda.is_bf16_supported()
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()


class Config(_Section):
    recipe: str
    pipeline: str | None = Field(
        None, description="the module lorakit.recipes.<pipeline> that runs it; default: recipe"
    )
    description: str = ""
    task: Literal["classification", "causal-lm"] = "classification"
    seed: int = Field(42, ge=0)
    out: str | None = Field(None, description="run directory; default runs/<recipe>-<timestamp>")
    compare: bool = Field(False, description="also run the recipe's comparison table")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig | None = None
    causal: CausalConfig | None = None
    lora: LoraSection = LoraSection()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _quantize_for_lora_on_causal_lms(self) -> Config:
        if self.model.quantize == "none":
            return self
        if self.task != "causal-lm":
            raise ValueError(
                "model.quantize works on causal-lm recipes only; set model.quantize = 'none'"
            )
        if self.compare:
            raise ValueError(
                "model.quantize cannot run compare = true (full fine-tuning trains the base, "
                "which quantized weights cannot); set compare = false or model.quantize = 'none'"
            )
        return self

    @property
    def run_name(self) -> str:
        """The run's name in its folder and log lines: the recipe, and the data's name when it
        is a file of the user's (``classify-docs``)."""
        name = f"{self.recipe}-{self.data.name}" if self.data.path else self.recipe
        return re.sub(r"[^\w.-]+", "-", name)


# ---------------------------------------------------------------- loading and overrides


# ---------------------------------------------------------------- keys: dotted or short
def _leaf_fields(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every settable config key (``lora.r``) and its type annotation."""
    fields: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        args = get_args(field.annotation) or (field.annotation,)
        sections = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if sections:
            fields.update(_leaf_fields(sections[0], f"{prefix}{name}."))
        else:
            fields[prefix + name] = field.annotation
    return fields


CONFIG_KEYS = _leaf_fields(Config)


CONFIG_KEYS = _leaf_fields(Config)  # every setting by its dotted key, with its type


def short_key_matches(key: str) -> list[str]:
    """The dotted keys whose last part is ``key`` (``r`` -> ``lora.r``); ``pretrain.*`` only when
    nothing else matches, since pretraining is shared by the runs of a sweep."""
    found = [k for k in CONFIG_KEYS if k.rsplit(".", 1)[-1] == key]
    return [k for k in found if not k.startswith("pretrain.")] or found


def resolve_key(key: str, what: str = "grid key") -> str:
    """``r`` -> ``lora.r``; a dotted key is checked; an unknown or ambiguous one is an error."""
    key = key.strip()
    if key in CONFIG_KEYS:
        return key
    if "." not in key:
        found = short_key_matches(key)
        if len(found) == 1:
            return found[0]
        if found:
            raise ConfigError(f"{what} {key!r} is ambiguous: write one of {', '.join(found)}")
    in_section = [k for k in CONFIG_KEYS if k.startswith(key + ".")]
    if in_section:
        raise ConfigError(
            f"{what} {key!r} is a section; name one of its settings: {', '.join(in_section)}"
        )
    close = difflib.get_close_matches(
        key, [*CONFIG_KEYS, *{k.rsplit(".")[-1] for k in CONFIG_KEYS}]
    )
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(
        f"{what} {key!r} is not a config setting; {hint}use a dotted key such as lora.r, "
        "lora.lora_alpha, lora.target_modules, train.lr (or its last part: r, lr)"
    )


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal (``3``, ``1e-3``, ``true``, ``["a","b"]``), ``a,b,c``
    as a list, anything else as a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if "," in text:
        return [parse_value(part.strip()) for part in text.split(",") if part.strip()]
    return text


def _text_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Dotted keys whose value can only be text (a path, a column name, a model name)."""
    keys = set()
    for name, field in model.model_fields.items():
        for sub in _section_types(field.annotation):
            keys |= _text_keys(sub, f"{prefix}{name}.")
        if set(getattr(field.annotation, "__args__", (field.annotation,))) <= {str, type(None)}:
            keys.add(prefix + name)
    return keys


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> list[str]:
    """Set each ``key.sub=value`` (or ``sub=value``, its last part, where that names one
    setting) in ``data`` (in place); return one problem line per bad item.
    A text-only key takes the value as written (``data.label_column=1``, ``data.path=a,b.csv``)
    unless it is a quoted TOML string."""
    text_keys = _text_keys(Config)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
            continue
        if "." not in key and key not in Config.model_fields:  # a short name, as sweeps take
            found = short_key_matches(key)
            if len(found) > 1:
                problems.append(f"--set {key}: is ambiguous; write one of {', '.join(found)}")
                continue
            key = found[0] if found else key  # an unknown one is named by the validation
        *parents, leaf = key.split(".")
        node = data
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append(f"{'.'.join(parents[: i + 1])}: is a value, not a section")
                break
            node = child
        else:
            value = parse_value(raw.strip())
            node[leaf] = raw.strip() if key in text_keys and not isinstance(value, str) else value
    return problems


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        for sub in _section_types(field.annotation):
            keys.extend(_valid_keys(sub, f"{prefix}{name}."))
    return keys


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    args = getattr(annotation, "__args__", (annotation,))
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _clean_location(loc: tuple[Any, ...], unknown_key: bool) -> str:
    """``('lora', 'target_modules', 'list[str]', 0)`` -> ``lora.target_modules[0]``: pydantic
    names union members in the location; keep only real keys and list indexes."""
    valid, key = set(_valid_keys(Config)), ""
    for i, part in enumerate(loc):
        candidate = f"{key}.{part}" if key else str(part)
        if isinstance(part, int):
            key += f"[{part}]"
        elif candidate in valid or not key or (unknown_key and i == len(loc) - 1):
            key = candidate
    return key


def _describe(error: dict[str, Any]) -> tuple[str, str]:
    kind = error["type"]
    loc = _clean_location(error["loc"], unknown_key=kind == "extra_forbidden")
    if kind == "extra_forbidden":
        section = loc.rpartition(".")[0]
        candidates = [k for k in _valid_keys(Config) if k.rpartition(".")[0] == section]
        close = difflib.get_close_matches(loc, candidates, n=3, cutoff=0.5) or candidates
        return loc, f"unknown key; did you mean: {', '.join(close)}"
    if kind == "missing":
        return loc, "missing; it is required"
    if kind == ENGINE_REFUSED:  # "r must be ..." -> ("lora.r", "must be ...")
        key, message = error["ctx"]["key"], error["ctx"]["message"]
        return f"{loc}.{key}", message.removeprefix(f"{key}: ").removeprefix(f"{key} ")
    message = error["msg"].replace("Input should be ", "must be ").replace("Value error, ", "")
    for noise in (", unable to interpret input", ", unable to parse string as a number"):
        message = message.replace(noise, "")
    return loc, re.sub(r"\s*or instance of \w+", " (a [section] table)", message)


def validate(data: Mapping[str, Any]) -> Config:
    """Validate a plain dict; raise ConfigError with one line per problem (per key)."""
    try:
        return Config.model_validate(dict(data))
    except ValidationError as err:
        by_key: dict[str, list[str]] = {}
        got: dict[str, str] = {}
        for error in err.errors():
            loc, message = _describe(error)
            by_key.setdefault(loc, []).append(message)
            if error["type"] not in ("extra_forbidden", "missing", ENGINE_REFUSED):
                value = error.get("input")
                got[loc] = "" if isinstance(value, dict) else f" (got {value!r})"
        lines = [
            f"{loc or 'config'}: {_joined(messages)}{got.get(loc, '')}"
            for loc, messages in by_key.items()
        ]
        raise ConfigError(lines) from None


def _joined(messages: list[str]) -> str:
    """``["must be a list", "must be a string"]`` -> ``"must be a list or a string"``."""
    unique = list(dict.fromkeys(messages))
    musts = [m.removeprefix("must be ") for m in unique if m.startswith("must be ")]
    others = [m for m in unique if not m.startswith("must be ")]
    return "; ".join(others + (["must be " + " or ".join(musts)] if musts else []))


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None


def describe_the_file(data: dict[str, Any], before: Mapping[str, Any]) -> None:
    """With ``data.path`` set, ``data.name`` and ``description`` (in ``data``, in place) speak
    of that file, not of the recipe's built-in data, unless they were set with the path:
    ``before`` is the config as read, ahead of the overrides."""
    section = data.get("data")
    path = section.get("path") if isinstance(section, dict) else None
    if not isinstance(path, str) or not path:
        return
    read = before.get("data") if isinstance(before.get("data"), dict) else {}
    overridden = path != read.get("path")
    if "name" not in section or (overridden and section.get("name") == read.get("name")):
        section["name"] = Path(path).stem or Path(path).name
    if overridden and data.get("description") == before.get("description"):
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        name, recipe = model.get("name", ModelConfig().name), data.get("recipe")
        data["description"] = f"{name} + LoRA on {Path(path).name} (the {recipe} recipe)"


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a TOML config, apply ``--set`` overrides, validate; all problems in one error."""
    data = read_toml(path)
    before = copy.deepcopy(data)
    problems = apply_overrides(data, overrides)
    describe_the_file(data, before)
    try:
        config = validate(data)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)
    return config


# ---------------------------------------------------------------- writing TOML


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table; quoted keys, since patterns hold dots
        items = ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def settings_not_read(config: Config) -> dict[str, set[str]]:
    """``{section: {setting}}`` of the settings ``config``'s pipeline does not read
    (``only_for``), as ``model_dump(exclude=...)`` takes them."""
    pipeline = (config.pipeline or config.recipe).replace("-", "_")
    excluded: dict[str, set[str]] = {}
    for section, field in Config.model_fields.items():
        for sub in _section_types(field.annotation):
            for name, setting in sub.model_fields.items():
                readers = (setting.json_schema_extra or {}).get("pipelines")
                if readers is not None and pipeline not in readers:
                    excluded.setdefault(section, set()).add(name)
    return excluded


def to_toml(config: Config, *, header: str = "") -> str:
    """The config as TOML: top-level values first, then one table per section. ``None`` values
    (TOML has no null) and settings the pipeline does not read are left out, so reading the
    text back gives a config that runs the same."""
    data = config.model_dump(mode="json", exclude=settings_not_read(config))
    lines = [f"# {line}" for line in header.splitlines()]
    sections = []
    for key, value in data.items():
        if isinstance(value, dict):
            sections.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in sections:
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"
