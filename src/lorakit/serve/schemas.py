"""The JSON bodies of the serving API (pydantic models; FastAPI derives the OpenAPI from them)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _unicode(text: str) -> str:
    """JSON may escape half of a UTF-16 surrogate pair alone ("\\ud83d": a JavaScript string cut
    inside an emoji); that is no Unicode text, and no tokenizer takes it. Every other string
    tokenizes (NUL, noncharacters and the like become [UNK] or nothing)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"character {e.start} is half of a UTF-16 surrogate pair "
            f"(U+{ord(text[e.start]):04X}), which is not text: send valid UTF-8 "
            "(was a string cut inside an emoji?)"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    adapter: Text = Field(description="name of a loaded adapter (GET /v1/adapters lists them)")
    texts: list[Text] = Field(min_length=1, description="texts to classify")


class Prediction(BaseModel):
    label: str
    probability: float = Field(description="probability of `label`, the most likely class")
    probabilities: dict[str, float] = Field(description="every label's probability")


class PredictResponse(BaseModel):
    adapter: str
    results: list[Prediction]


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(description="name to serve the adapter under: letters, digits, '_', '-'")
    path: Text = Field(
        description="an adapter folder, a run directory or a folder `lorakit merge` wrote, under "
        "one of the server's adapter roots: relative to a root, or absolute inside one"
    )
    labels: list[Text] | None = Field(
        None,
        description="class names in label order (default: the run's or the merged model's, "
        "else LABEL_0...)",
    )


class AdapterDescription(BaseModel):
    name: str
    kind: Literal["lora", "merged"] = Field(
        description="lora: an adapter on the shared base; merged: a model `lorakit merge` wrote"
    )
    labels: list[str]
    num_labels: int
    rank: int | None = Field(description="r of the adapter's LoRA layers (null when merged)")
    max_length: int = Field(description="tokens per text; longer texts are truncated")
    warnings: list[str] = Field(default_factory=list)


class AdapterList(BaseModel):
    base: str = Field(description="the base model's name (a folder's name, not its path)")
    adapters: list[AdapterDescription]


class Health(BaseModel):
    status: str
    base: str
    adapters: int


class ErrorBody(BaseModel):
    error: str = Field(description="a short code, e.g. unknown_adapter")
    detail: str = Field(description="what was wrong and how to fix it")
