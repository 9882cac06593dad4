"""A chat-completions request body -> the prompt, images and sampling parameters of a ``Job``.

Every mistake is an ``ApiError`` (400) naming the field in ``param``, with ``code``
"invalid_value", or "unsupported_parameter" for what this server does not do (tools, JSON
output, ...); harmless defaults that clients always send are accepted. Conversations: optional
system messages, then user and assistant turns alternating, ending with a user turn; images (none,
one, or for models that take them several) in user turns. System text goes before the first user
text, as training lays it out. A single user turn with one image is prompted exactly like
``moevlm caption --prompt``; every other conversation uses the tokenizer's conversation layout
(the model's chat template, or moevlm's own for scratch models), text-only ones with no image tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from moevlm.data.records import IMAGE_PLACEHOLDER
from moevlm.serve.errors import ApiError
from moevlm.serve.sampling import SamplingParams

MAX_STOPS = 4
MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
SEED_LIMIT = 2**32  # torch's CPU generator keeps 32 bits of a seed: larger ones would fold silently
# Accepted with their harmless values only (what many clients send by default); any other value
# is refused as unsupported.
HARMLESS = {"store": (False,), "tool_choice": ("none",), "parallel_tool_calls": (True, False)}
KNOWN = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
         "n", "stream", "stream_options", "moevlm", "user", "metadata", "logprobs", "top_logprobs",
         "presence_penalty", "frequency_penalty", "logit_bias", "min_tokens", "ignore_eos", "response_format",
         *HARMLESS}


@dataclass
class ChatRequest:
    model: str
    turns: list[tuple[str, str]]  # (user, assistant), the last answer empty; images not in the text
    image_url: str | None  # the first image; None: a text-only conversation
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    routing: bool = False
    image_urls: list[str] = field(default_factory=list)  # every image, in order
    placed_turns: list[tuple[str, str]] = field(default_factory=list)  # turns with a placeholder per image
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    ignore_eos: bool = False

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.presence_penalty, self.frequency_penalty,
                              self.logit_bias, self.min_tokens, self.ignore_eos, self.logprobs, self.top_logprobs)


def invalid(message: str, param: str | None) -> ApiError:
    return ApiError(400, message, param, "invalid_value")


def unsupported(param: str, why: str = "") -> ApiError:
    return ApiError(400, f"unsupported parameter: {param}{why}", param, "unsupported_parameter")


def _plain(value: float) -> str:
    """A bound as people write it: 4294967295, not 4.29497e+09."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _number(body: dict, key: str, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise invalid(f"{key} must be {what} from {_plain(low)} to {_plain(high)}, not {value!r}", key)
    return value


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise invalid(f"{key} must be true or false, not {value!r}", key)
    return value


def _content(message: dict, index: int) -> tuple[str, list[str], str]:
    """The text, the image URLs and the text with a placeholder where each image was, of one message."""
    content = message.get("content")
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return content, [], content
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of parts", "messages")
    texts, images, placed = [], [], []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            placed.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict) and isinstance(
                part["image_url"].get("url"), str):
            images.append(part["image_url"]["url"])
            placed.append(IMAGE_PLACEHOLDER)
        else:
            raise invalid(f"{where}[{number}]: expected a text part or an image_url part with a url", "messages")
    return "\n".join(texts), images, "\n".join(placed)


def _conversation(messages) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]:
    """(turns, turns with image placeholders, image URLs)."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    system, turns, placed, images = [], [], [], []
    expect = "user"
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        text, urls, with_images = _content(message, index) if isinstance(message, dict) else ("", [], "")
        if IMAGE_PLACEHOLDER in text:
            raise invalid(f"messages[{index}]: message text may not contain {IMAGE_PLACEHOLDER}: send the image "
                          "as an image_url part", "messages")
        if role in ("system", "developer") and not turns:
            system.append(text)
        elif role == expect == "user":
            turns.append([text, ""])
            placed.append([with_images, ""])
            expect = "assistant"
        elif role == expect == "assistant":
            turns[-1][1] = placed[-1][1] = text
            expect = "user"
        else:
            raise invalid(f"messages[{index}]: expected a {expect} message, not {role!r} (system messages "
                          "first, then user and assistant turns alternating, ending with a user turn)", "messages")
        if urls and role != "user":
            raise invalid(f"messages[{index}]: images go in user messages", "messages")
        images += urls
    if expect != "assistant":
        raise invalid("the last message must be a user message", "messages")
    if system:
        turns[0][0] = "\n".join(system + [turns[0][0]])
        placed[0][0] = "\n".join(system + [placed[0][0]])
    return [tuple(turn) for turn in turns], [tuple(turn) for turn in placed], images


def _refuse_unsupported_values(body: dict) -> None:
    for key, harmless in HARMLESS.items():
        if key in body and not any(type(body[key]) is type(h) and body[key] == h for h in harmless):
            raise unsupported(key, f" (only {' or '.join(json.dumps(h) for h in harmless)})")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise unsupported("response_format", ' (only {"type": "text"}: no JSON output)')
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise invalid("metadata must be an object of strings", "metadata")
    if not isinstance(body.get("user", ""), str):
        raise invalid("user must be a string", "user")


def _logit_bias(body: dict) -> dict[int, float]:
    """{token id: bias}; the ids are checked against the vocabulary once the model is known."""
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise invalid(f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids", "logit_bias")
    out = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit() and key.isascii()) or isinstance(value, bool) or \
                not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise invalid(f"logit_bias: {key!r}: {value!r}: expected a token id and a bias from -100 to 100",
                          "logit_bias")
        out[int(key)] = float(value)
    return out


def _sampling(body: dict) -> dict:
    """The sampling parameters' fields of ``ChatRequest``."""
    logprobs = _flag(body, "logprobs")
    top_logprobs = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, integer=True)
    if top_logprobs is not None and not logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    temperature = _number(body, "temperature", 0, 2)
    return {"temperature": 1.0 if temperature is None else float(temperature),
            "top_p": _number(body, "top_p", 0, 1),
            "seed": _number(body, "seed", 0, SEED_LIMIT - 1, integer=True),
            "n": _number(body, "n", 1, MAX_N, integer=True) or 1,
            "logprobs": logprobs, "top_logprobs": top_logprobs or 0,
            "presence_penalty": float(_number(body, "presence_penalty", -2, 2) or 0),
            "frequency_penalty": float(_number(body, "frequency_penalty", -2, 2) or 0),
            "logit_bias": _logit_bias(body),
            "min_tokens": _number(body, "min_tokens", 0, 2**31, integer=True) or 0,
            "ignore_eos": _flag(body, "ignore_eos")}


def parse_request(body, served_name: str) -> ChatRequest:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None)
    body = {key: value for key, value in body.items() if value is not None}  # null: not given, as OpenAI reads it
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise unsupported(unknown[0])
    _refuse_unsupported_values(body)
    model = body.get("model")
    if not isinstance(model, str):
        raise invalid("model is required: a string", "model")
    if model != served_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server has {served_name!r}", "model",
                       "model_not_found")
    turns, placed, images = _conversation(body.get("messages"))
    max_tokens = _number(body, "max_completion_tokens", 1, 2**31, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 2**31, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise invalid(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    stream = _flag(body, "stream")
    options, extras = body.get("stream_options"), body.get("moevlm") or {}
    if options is not None and not stream:
        raise invalid("stream_options is only allowed when stream is true", "stream_options")
    options = options or {}
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    if not isinstance(extras, dict):
        raise invalid("moevlm must be an object", "moevlm")
    unknown = [f"stream_options.{key}" for key in sorted(set(options) - {"include_usage"})] + \
        [f"moevlm.{key}" for key in sorted(set(extras) - {"routing"})]
    if unknown:
        raise unsupported(unknown[0])
    sampling = _sampling(body)
    if extras.get("routing") and sampling["n"] > 1:
        raise unsupported("moevlm.routing", " with n above 1 (a routing trace follows one choice)")
    return ChatRequest(model=model, turns=turns, image_url=images[0] if images else None, max_tokens=max_tokens,
                       stop=stop, stream=stream, include_usage=bool(options.get("include_usage")),
                       routing=bool(extras.get("routing")), image_urls=images, placed_turns=placed, **sampling)


def prompt_ids(tokenizer, turns: list[tuple[str, str]], max_text_len: int, images: int = 1) -> list[int]:
    """What generation starts from. One turn with one image: ``tokenizer.prompt_ids`` (as ``moevlm
    caption``); otherwise the conversation as training lays it out (``images`` of them; with several,
    ``turns`` hold a placeholder for each), up to the first token of the last answer."""
    if len(turns) == 1 and images == 1:
        return tokenizer.prompt_ids(turns[0][0])
    try:
        ids, labels = tokenizer.encode_conversation(turns, max_text_len, image=images)
    except ValueError as err:
        raise invalid(f"messages: {err}", "messages") from None
    # labels[t] is the token at t + 1 when that token is a target. Every answer ends with its <eos>,
    # so the last answer starts after the last target <eos> before its own: an empty user message
    # (no context tokens at all) must not merge the last two answers.
    targets = [t + 1 for t, label in enumerate(labels) if label != -100]
    start, is_target = targets[-1], set(targets)
    while start - 1 in is_target and ids[start - 1] != tokenizer.eos_id:
        start -= 1
    return ids[:start]


def request_prompt(req: ChatRequest, tokenizer, max_text_len: int, max_images: int) -> list[int]:
    """The prompt ids of a request for a model that takes at most ``max_images`` images."""
    count = len(req.image_urls)
    if count > max_images:
        raise invalid(f"{count} images in the conversation: this model takes at most {max_images} "
                      f"image{'s' * (max_images != 1)} per conversation", "messages")
    return prompt_ids(tokenizer, req.placed_turns if count > 1 else req.turns, max_text_len, count)


def check_for_model(req: ChatRequest, vocab_size: int, room: int, max_tokens: int, max_choices: int) -> None:
    """What can only be checked once the model is known: token ids, lengths, choices."""
    if room < 1:
        raise invalid(f"the prompt leaves no room to answer within this model's {max_tokens} text tokens",
                      "messages")
    if req.max_tokens is not None and req.max_tokens > max_tokens:
        raise invalid(f"max_tokens {req.max_tokens} is above this model's limit of {max_tokens}", "max_tokens")
    if req.min_tokens > min(req.max_tokens or room, room):
        raise invalid(f"min_tokens {req.min_tokens} is above the {min(req.max_tokens or room, room)} tokens this "
                      "request may generate", "min_tokens")
    outside = [token for token in req.logit_bias if token >= vocab_size]
    if outside:
        raise invalid(f"logit_bias: token id {outside[0]} is outside this model's vocabulary of {vocab_size}",
                      "logit_bias")
    if req.n > max_choices:
        raise invalid(f"n {req.n} is above the {max_choices} requests this server queues", "n")


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice ``index``'s own seed: seed + index, within the 32 bits a generator takes."""
    return None if seed is None else (seed + index) % SEED_LIMIT
