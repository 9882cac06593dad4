"""A chat-completions request body -> the prompt ids, image and sampling parameters of a ``Job``.

Every mistake is an ``ApiError`` (400) naming the field. Conversations: optional system messages,
then user and assistant turns alternating, ending with a user turn; exactly one image, in a user
turn (the models see one image per conversation). System text goes before the first user text. A
single user turn is prompted exactly like ``moevlm caption --prompt``; longer conversations use
the tokenizer's conversation layout (the model's chat template, or moevlm's own for scratch models).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moevlm.data.records import IMAGE_PLACEHOLDER
from moevlm.serve.errors import ApiError

KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
         "n", "stream", "stream_options", "moevlm", "user"}
MAX_STOPS = 4


@dataclass
class ChatRequest:
    model: str
    turns: list[tuple[str, str]]  # (user, assistant), the last answer empty
    image_url: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    routing: bool = False


def _number(body: dict, key: str, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{key} must be {what} from {low:g} to {high:g}, not {value!r}", key)
    return value


def _content(message: dict, index: int) -> tuple[str, list[str]]:
    """The text and the image URLs of one message."""
    content = message.get("content")
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or a list of parts", "messages")
    texts, images = [], []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) and isinstance(
                part["image_url"].get("url"), str):
            images.append(part["image_url"]["url"])
        else:
            raise ApiError(400, f"{where}[{number}]: expected a text part or an image_url part with a url",
                           "messages")
    return "\n".join(texts), images


def _conversation(messages) -> tuple[list[tuple[str, str]], str]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    system, turns, images = [], [], []
    expect = "user"
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        text, urls = _content(message, index) if isinstance(message, dict) else ("", [])
        if role in ("system", "developer") and not turns:
            system.append(text)
        elif role == expect == "user":
            turns.append([text, ""])
            expect = "assistant"
        elif role == expect == "assistant":
            turns[-1][1] = text
            expect = "user"
        else:
            raise ApiError(400, f"messages[{index}]: expected a {expect} message, not {role!r} (system messages "
                                "first, then user and assistant turns alternating, ending with a user turn)",
                           "messages")
        if urls and role != "user":
            raise ApiError(400, f"messages[{index}]: images go in user messages", "messages")
        images += urls
    if expect != "assistant":
        raise ApiError(400, "the last message must be a user message", "messages")
    if len(images) != 1:
        raise ApiError(400, f"{len(images)} images in the request: this model takes exactly 1 image per "
                            "conversation", "messages")
    if system:
        turns[0][0] = "\n".join(system + [turns[0][0]])
    for user, _ in turns:
        if IMAGE_PLACEHOLDER in user:
            raise ApiError(400, f"message text may not contain {IMAGE_PLACEHOLDER}: send the image as an "
                                "image_url part", "messages")
    return [tuple(turn) for turn in turns], images[0]


def parse_request(body, served_name: str) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise ApiError(400, f"unsupported parameter: {unknown[0]}", unknown[0], "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model is required: a string", "model")
    if model != served_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server has {served_name!r}", "model",
                       "model_not_found")
    turns, image_url = _conversation(body.get("messages"))
    if _number(body, "n", 1, 1, integer=True) not in (None, 1):
        raise ApiError(400, "n must be 1", "n")
    max_tokens = _number(body, "max_completion_tokens", 1, 2**31, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 2**31, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    extras = body.get("moevlm") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict) or not isinstance(extras, dict):
        raise ApiError(400, "stream must be true or false; stream_options and moevlm objects")
    unknown = sorted(set(options) - {"include_usage"}) or sorted(set(extras) - {"routing"})
    if unknown:
        raise ApiError(400, f"unsupported parameter: {unknown[0]}", unknown[0], "unsupported_parameter")
    temperature = _number(body, "temperature", 0, 2)
    return ChatRequest(model=model, turns=turns, image_url=image_url, max_tokens=max_tokens,
                       temperature=1.0 if temperature is None else float(temperature),
                       top_p=_number(body, "top_p", 0, 1), seed=_number(body, "seed", -2**63, 2**63 - 1, True),
                       stop=stop, stream=stream, include_usage=bool(options.get("include_usage")),
                       routing=bool(extras.get("routing")))


def prompt_ids(tokenizer, turns: list[tuple[str, str]], max_text_len: int) -> list[int]:
    """What generation starts from. One turn: ``tokenizer.prompt_ids`` (as ``moevlm caption``); more:
    the conversation as training lays it out, up to the first token of the last answer."""
    if len(turns) == 1:
        return tokenizer.prompt_ids(turns[0][0])
    try:
        ids, labels = tokenizer.encode_conversation(turns, max_text_len)
    except ValueError as err:
        raise ApiError(400, f"messages: {err}", "messages") from None
    # labels[t] is the token at t + 1 when that token is a target: the last answer's tokens are
    # the last run of target positions.
    targets = [t + 1 for t, label in enumerate(labels) if label != -100]
    start, is_target = targets[-1], set(targets)
    while start - 1 in is_target:
        start -= 1
    return ids[:start]
