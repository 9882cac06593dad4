"""The API's request and response bodies as Pydantic models, for the OpenAPI schema at /openapi.json
(what clients and the fuzzing test read); the request lists the fields of OpenAI's API that
``parse_request`` takes (serve/chat.py's KNOWN). Descriptive only: request bodies are validated by
serve/chat.py's ``parse_request``, which gives OpenAI-shaped errors; these models allow extra fields."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moevlm.serve.chat import KNOWN


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageUrl(Open):
    url: str = Field(description="a base64 data: URL; file: and http(s): only where the server allows them")


class TextPart(Open):
    type: Literal["text"]
    text: str


class ImagePart(Open):
    type: Literal["image_url"]
    image_url: ImageUrl


class Message(Open):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart]


class StreamOptions(Open):
    include_usage: bool | None = None


class MoevlmOptions(Open):
    routing: bool | None = Field(None, description="each generated token's experts per MoE layer")


class ChatCompletionRequest(Open):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    response_format: dict | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None
    moevlm: MoevlmOptions | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(Open):
    role: Literal["assistant"]
    content: str | None


class Choice(Open):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict | None = None


class ChatCompletion(Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def errors(*statuses: int) -> dict:
    """FastAPI ``responses=`` for these error statuses."""
    return {status: {"model": ErrorResponse} for status in statuses}


REQUEST_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}


def add_request_schema(app, served_name: str) -> None:
    """Puts ChatCompletionRequest (and the models it uses) into the app's OpenAPI components, where
    the chat route's ``openapi_extra`` (REQUEST_BODY) points; ``served_name`` is the one model it takes."""
    make = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = make()
            found = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(found.pop("$defs", {}))
            # What this server's parse_request takes, of the fields OpenAI's API has.
            found["properties"] = {key: value for key, value in found["properties"].items() if key in KNOWN}
            found["required"] = [key for key in found.get("required", []) if key in KNOWN]
            found["properties"]["model"]["enum"] = [served_name]
            found["additionalProperties"] = False  # parse_request refuses other top-level fields
            components["ChatCompletionRequest"] = found
        return app.openapi_schema

    app.openapi = openapi
