"""`LoraConfig`: PEFT's field names and defaults, validated on creation.

The JSON form is PEFT's `adapter_config.json`, so a config written here loads in
`peft.LoraConfig.from_pretrained` and one written by PEFT loads here. The same fields, validated
here and nowhere else, are the `[lora]` section of a lorakit config (`lorakit.config` derives the
section from this class), so reading a config needs this module but no torch: it imports none.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import LoraConfigError, LoraError
from .patterns import MatchBudget, check_pattern, matches_end

ALL_LINEAR = "all-linear"

# PEFT's task models always train and save their output head whole, whatever modules_to_save
# says (PeftModelForSequenceClassification and its siblings add these names); lorakit follows
# the same rule, so that both engines train the same weights and their files load in each other
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

# PEFT LoRA options that change the tensors or the forward pass and that lorakit does not have
UNSUPPORTED = (
    "lora_bias", "trainable_token_indices", "layer_replication", "target_parameters",
    "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config", "velora_config",
    "monteclora_config", "kasa_config",
)  # fmt: skip

# PiSSA with a randomized SVD of N subspace iterations
PISSA_NITER = re.compile(r"pissa_niter_(\d+)")

# PEFT initialisations that leave the base weights as they are: their files load as plain LoRA
PLAIN_INITS = ("eva", "orthogonal", "mica")

# The largest lora_alpha (either sign) lorakit takes. The LoRA papers use 1 to 512; a scale of
# 2**16 already carries an update of size 1 past float16's range (65504), so a larger alpha is
# never useful, and 1e308 (which PEFT would take) turns every output into NaN or infinity.
MAX_ALPHA = 2.0**16


@dataclass
class LoraConfig:
    """How to add LoRA to a model.

    r: rank of the update B·A (LoRA paper, section 4.1).
    lora_alpha: the update is scaled by lora_alpha / r (section 4.1), so that changing r does
        not change the learning rate one needs; with `use_rslora`, by lora_alpha / sqrt(r)
        (Kalajdzievski 2023, "rank-stabilized LoRA"). Any number in [-MAX_ALPHA, MAX_ALPHA]
        (2**16): 0 switches the update off, a negative value flips its sign.
    lora_dropout: dropout on the input of the LoRA branch only (with use_dora, in training,
        also of the base product that the magnitude rescales, as in PEFT).
    use_dora: weight-decomposed LoRA (Liu et al. 2024, "DoRA"): a trained magnitude per output
        (`lora_magnitude_vector`) rescales the direction W0 + scaling·B·A, whose norm is held
        constant in the backward pass; on Linear, GPT-2's Conv1D and Embedding (`dora.py`).
    target_modules: which modules get LoRA: a list of names (a module matches when its full name
        equals an entry or ends with "." + entry), a regex string (full match), or "all-linear".
        None is allowed here, as in PEFT, but lorakit has no per-model default: injecting fails
        with a list of the names that can be targeted.
    exclude_modules: same forms; never targeted.
    modules_to_save: modules trained in full and saved with the adapter (e.g. a new head); a
        module matches when its full name ends with an entry (PEFT's rule, no dot needed).
        With task_type "SEQ_CLS" or "TOKEN_CLS" the head ("classifier" or "score") is always
        one of them, and with "QUESTION_ANS" "qa_outputs", as in PEFT (`TASK_HEADS`).
    bias: "none", "all" (every bias trainable) or "lora_only" (biases of LoRA layers).
    rank_pattern, alpha_pattern: per-module r and lora_alpha, e.g. {"lm_head": 16}: a key is a
        regex that must match the end of the module's full name after a dot (PEFT's rule; the
        first matching key wins); other modules take r and lora_alpha.
    init_lora_weights: True = Kaiming-uniform A and zero B, so training starts at the base
        model (section 4.1); "gaussian" = normal A with std 1/r; False = random B too (tests);
        "pissa", "pissa_niter_N" (randomized SVD, N iterations) and "olora" start A and B from
        W0's SVD or QR and leave the rest in the base weight (`initialisation.py`), so the
        model still computes as before; such an adapter is saved converted to plain LoRA.
    fan_in_fan_out: the base stores weight as (in, out), as GPT-2's Conv1D does.
    layers_to_transform, layers_pattern: only the layers with these indices (an int or a list)
        get LoRA, with a list target_modules: the index is the number after `layers_pattern`
        (e.g. "layers" in "model.layers.3.mlp"), or the first number in the name (PEFT's rule).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        self._check_values()
        self._check_names()
        self._check_patterns()
        self._check_layers()
        if self.target_modules is not None and len(self.target_modules) == 0:
            raise LoraConfigError(
                "target_modules",
                "target_modules is empty: name the modules to adapt, e.g. ['query', 'value'], "
                "or 'all-linear' (`lorakit inspect MODEL` lists the names)",
            )

    def _check_values(self) -> None:
        if not _is_rank(self.r):
            raise LoraConfigError("r", f"r must be a positive integer (e.g. r=8), got {self.r!r}")
        if not _is_alpha(self.lora_alpha):
            raise LoraConfigError(
                "lora_alpha",
                f"lora_alpha must be a finite number of magnitude at most {MAX_ALPHA:.0f} "
                f"(e.g. 16), got {self.lora_alpha!r}",
            )
        if not (isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1):
            raise LoraConfigError(
                "lora_dropout",
                f"lora_dropout must be in [0, 1) (e.g. 0.1), got {self.lora_dropout!r}",
            )
        if self.bias not in ("none", "all", "lora_only"):
            raise LoraConfigError(
                "bias", f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}"
            )
        if not _is_init(self.init_lora_weights):
            raise LoraConfigError(
                "init_lora_weights",
                "init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_N' "
                f"(N iterations, e.g. pissa_niter_4) or 'olora', got {self.init_lora_weights!r}",
            )
        for key in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
            if not isinstance(getattr(self, key), bool):
                raise LoraConfigError(
                    key, f"{key} must be True or False, got {getattr(self, key)!r}"
                )

    def _check_names(self) -> None:
        for key, value, regex in (
            ("target_modules", self.target_modules, True),
            ("exclude_modules", self.exclude_modules, True),
            ("modules_to_save", self.modules_to_save, False),  # PEFT reads a string by letters
        ):
            names = isinstance(value, list) and all(isinstance(n, str) for n in value)
            if not (value is None or names or (regex and isinstance(value, str))):
                raise LoraConfigError(
                    key,
                    f"{key} must be a list of module names, e.g. ['classifier']"
                    + (" (or a regex string)" if regex else "")
                    + f", got {value!r}",
                )
        for key in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, key), str):
                check_pattern(getattr(self, key), key)
        targets = self.target_modules if isinstance(self.target_modules, list) else []
        both = [m for m in self.saved if m in targets]
        if both:
            raise LoraConfigError(
                "modules_to_save",
                f"modules_to_save: {both[0]!r} is in target_modules too; a module gets LoRA or "
                "is trained and saved whole, not both: remove it from one of the two",
            )

    def _check_patterns(self) -> None:
        for key, values, ok, example in (
            ("rank_pattern", self.rank_pattern, _is_rank, '{"lm_head": 16}'),
            ("alpha_pattern", self.alpha_pattern, _is_alpha, '{"lm_head": 32}'),
        ):
            if not isinstance(values, dict):
                raise LoraConfigError(
                    key, f"{key} must be a dict of module pattern -> value, e.g. {example}"
                )
            for pattern, value in values.items():
                check_pattern(pattern, key)
                if not ok(value):
                    raise LoraConfigError(
                        key, f"{key}: {pattern!r} -> {value!r} is not valid; e.g. {example}"
                    )

    def _check_layers(self) -> None:
        layers, pattern = self.layers_to_transform, self.layers_pattern
        if not (layers is None or _is_index(layers) or (
            isinstance(layers, list) and all(_is_index(i) for i in layers)
        )):  # fmt: skip
            raise LoraConfigError(
                "layers_to_transform",
                f"layers_to_transform must be a layer index or a list of them, got {layers!r}",
            )
        if not (pattern is None or isinstance(pattern, str) or (
            isinstance(pattern, list) and all(isinstance(p, str) for p in pattern)
        )):  # fmt: skip
            raise LoraConfigError(
                "layers_pattern",
                f"layers_pattern must be a name such as 'layers' or a list, got {pattern!r}",
            )
        for entry in [pattern] if isinstance(pattern, str) else pattern or []:
            check_pattern(entry, "layers_pattern")
        if isinstance(self.target_modules, str) and (layers is not None or pattern is not None):
            raise LoraConfigError(
                "target_modules",
                "layers_to_transform and layers_pattern need target_modules as a list of names, "
                f"not the string {self.target_modules!r}",
            )
        if pattern and layers is None:
            raise LoraConfigError(
                "layers_pattern",
                "layers_pattern is set without layers_to_transform; set both or neither",
            )

    def for_module(self, module_name: str, budget: MatchBudget | None = None) -> LoraConfig:
        """This config with the r and lora_alpha that rank_pattern / alpha_pattern give
        `module_name` (a full name such as "transformer.h.0.attn.c_attn"); the patterns match
        within `budget` (`lorakit.lora.patterns`)."""
        budget = budget or MatchBudget()
        rank_key = _pattern_key(self.rank_pattern, module_name, "rank_pattern", budget)
        alpha_key = _pattern_key(self.alpha_pattern, module_name, "alpha_pattern", budget)
        r = self.rank_pattern.get(rank_key, self.r)
        alpha = self.alpha_pattern.get(alpha_key, self.lora_alpha)
        if (r, alpha) == (self.r, self.lora_alpha):
            return self
        return dataclasses.replace(self, r=r, lora_alpha=alpha)

    def with_task_head(self) -> LoraConfig:
        """This config with the output head of its task_type added to modules_to_save."""
        heads = [h for h in TASK_HEADS.get(self.task_type or "", ()) if h not in self.saved]
        if not heads:
            return self
        return dataclasses.replace(self, modules_to_save=[*self.saved, *heads])

    @property
    def saved(self) -> list[str]:
        """modules_to_save as a list (empty for None)."""
        return list(self.modules_to_save or [])

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        """PEFT's adapter_config.json fields."""
        data = dataclasses.asdict(self)  # copies: PEFT extends modules_to_save in place
        extra = data.pop("extra")
        data.update(peft_type="LORA", revision=None)
        return {**extra, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Reads PEFT's adapter_config.json; fields lorakit does not use are kept in `extra`."""
        if data.get("peft_type", "LORA") != "LORA":
            raise LoraError(f"only LoRA adapters are supported, this one is {data['peft_type']!r}")
        for key in UNSUPPORTED:
            if data.get(key):  # else lorakit would drop the tensors or the changes they bring
                raise LoraError(
                    f"this adapter uses PEFT's {key}={data[key]!r}, which lorakit's engine does "
                    "not support; load it with PEFT (lora.engine=peft)"
                )
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        for key in ("rank_pattern", "alpha_pattern"):  # PEFT may write null
            if known.get(key) is None:
                known.pop(key, None)
        init = known.get("init_lora_weights")
        if init in PLAIN_INITS:  # how training began; the file's tensors are all that matter now
            known["init_lora_weights"] = True
        elif isinstance(init, str) and not _is_init(init):
            raise LoraError(
                f"this adapter was made with PEFT's init_lora_weights={init!r}, which lorakit's "
                "engine does not support (CorDA, LoftQ and LoRA-GA also change the base "
                "weights); load it with PEFT (lora.engine=peft)"
            )
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)


def _pattern_key(patterns: dict, module_name: str, setting: str, budget: MatchBudget) -> str | None:
    """The first key of `patterns` that matches the end of `module_name` after a dot, as in
    PEFT's `get_pattern_key`."""
    return next((key for key in patterns if matches_end(key, module_name, setting, budget)), None)


def _is_init(value) -> bool:
    return value in (True, False, "gaussian", "pissa", "olora") or (
        isinstance(value, str) and PISSA_NITER.fullmatch(value) is not None
    )


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_alpha(value) -> bool:
    # NaN and the infinities fail the comparison; so does an int too large for a float
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and abs(value) <= MAX_ALPHA
