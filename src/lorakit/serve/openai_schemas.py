"""The JSON bodies of the OpenAI-compatible API (pydantic), as OpenAI's API reference names them.

Fields a client may send that lorakit does not implement are accepted at their neutral value and
refused otherwise (`n` other than 1, penalties, logprobs ...), so a request never gets less than
it asked for in silence; unknown fields are ignored, as OpenAI's own clients expect of servers.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .schemas import Text

MAX_STOPS = 4  # OpenAI's limit


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: Text = Field(description="the base's name or an adapter's (GET /v1/models lists them)")
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="new tokens at most (default: the server's --max-new-tokens)"
    )
    temperature: float = Field(1.0, ge=0, le=2, description="0 decodes greedily")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, description="makes sampling repeatable")
    stop: Text | list[Text] | None = Field(None, description=f"up to {MAX_STOPS} stop strings")
    n: int = Field(1, description="only 1 is served")
    stream: bool = False
    ignore_eos: bool = Field(
        False, description="vLLM's extension: go on past end-of-text tokens (for benchmarks)"
    )
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    logit_bias: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"give at most {MAX_STOPS} non-empty stop strings")
        return stops

    @model_validator(mode="after")
    def _supported(self):
        unsupported = {
            "n": self.n != 1,
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "logprobs": bool(self.logprobs),
            "logit_bias": bool(self.logit_bias),
        }
        refused = [name for name, used in unsupported.items() if used]
        if refused:
            raise ValueError(
                f"{', '.join(refused)}: not served by lorakit; leave them out (n must be 1)"
            )
        return self

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] = Field(description="the text to continue (one)")
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if len(prompts) != 1:
            raise ValueError("give one prompt per request (a string)")
        return prompts[0]

    @model_validator(mode="after")
    def _no_echo(self):
        if self.echo or self.suffix:
            raise ValueError("echo and suffix: not served by lorakit; leave them out")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lorakit"
    root: str = Field(description="the base model")
    parent: str | None = Field(None, description="the base, for an adapter")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoraRequest(BaseModel):
    """vLLM's body for POST /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="forbid")

    lora_name: Text
    lora_path: Text = Field(description="a run directory or adapter folder under an adapter root")


class UnloadLoraRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: Text


class ErrorDetail(BaseModel):
    message: str = Field(description="what was wrong and how to fix it")
    type: str = Field(description="a short code, e.g. unknown_adapter")
    code: str


class ErrorReply(BaseModel):
    error: ErrorDetail
