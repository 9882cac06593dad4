"""Conversations real clients send, for both model families: text-only chats (no image tokens, as
training lays out text-only rows, whether or not the model saw any), system messages, multi-turn,
an empty last user message, and several images where the model takes them (a scratch model: one
clear 400). Greedy answers equal a plain uncached reference, or `moevlm caption` where the prompt is
the same."""

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from serve_helpers import data_url, http, live_server, picture, user_message

from moevlm.checkpoint import load_model
from moevlm.cli import main
from moevlm.data.images import image_preparer, normalize
from moevlm.generate import caption_files
from moevlm.serve.chat import parse_request, prompt_ids, request_prompt
from shapes import write_shapes_csv


def reference(model_dir, prompt: list[int], pictures: list, eos_id: int, max_tokens: int) -> list[int]:
    """Greedy tokens from the whole sequence every step (no cache, no batch): the plain reference."""
    model, _, config = load_model(model_dir)
    prepare = image_preparer(config.model, model_dir)
    images = normalize(torch.stack([prepare(p) for p in pictures])) if pictures else None
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(images, torch.tensor([ids])).logits[0, -1].argmax())
            if token == eos_id:
                break
            out.append(token)
            ids.append(token)
    return out


def text_message(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def two_images(first: int, second: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture(first))}},
                                         {"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": data_url(picture(second))}}]}]


def answer(client, model: str, messages: list[dict], max_tokens: int = 8):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)


# -- a scratch model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scratch(checkpoint):
    with live_server(checkpoint, max_batch=16) as (url, engine):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), engine, url


def test_an_empty_last_user_message_keeps_the_conversation(checkpoint, scratch):
    tokenizer = scratch[1].tokenizer
    history, _ = tokenizer.encode_conversation([("it?", "a bar")], 24)
    assert prompt_ids(tokenizer, [("it?", "a bar"), ("", "")], 24) == history
    assert prompt_ids(tokenizer, [("it?", "a bar"), ("and?", "")], 24) == history + tokenizer.encode("and?") + [
        tokenizer.sep_id]
    client = scratch[0]
    turns = user_message(data_url(picture(1)), "it?") + [{"role": "assistant", "content": "a bar"},
                                                         {"role": "user", "content": ""}]
    first = answer(client, checkpoint.name, turns[:1])
    assert answer(client, checkpoint.name, turns).usage.prompt_tokens == first.usage.prompt_tokens + len("a bar") + 1


def test_a_text_only_chat_gets_no_image_tokens_and_answers_as_the_reference(checkpoint, scratch):
    client, engine, _ = scratch
    tokenizer = engine.tokenizer
    reply = answer(client, checkpoint.name, text_message("what is it"), max_tokens=10)
    prompt = tokenizer.prompt_ids("what is it")
    assert reply.usage.prompt_tokens == len(prompt)  # no image tokens before the text
    expected = reference(checkpoint, prompt, [], tokenizer.eos_id, 10)
    assert reply.choices[0].message.content == tokenizer.decode(expected) and expected


def test_text_only_and_image_requests_batched_together_get_their_answers_alone(checkpoint, scratch):
    client = scratch[0]
    requests = [text_message(["what is it", "hi", "a"][i % 3]) if i % 2 else user_message(data_url(picture(i)))
                for i in range(12)]
    alone = [answer(client, checkpoint.name, messages).choices[0].message.content for messages in requests]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda m: answer(client, checkpoint.name, m).choices[0].message.content, requests))
    assert together == alone


def test_a_system_message_goes_before_the_user_text_as_training_lays_it_out(checkpoint, scratch, tmp_path):
    client = scratch[0]
    path = tmp_path / "3.png"
    picture(3).save(path)
    ((_, expected),) = caption_files(checkpoint, [path], prompt="what is it", device="cpu", max_new_tokens=8)
    messages = [{"role": "system", "content": "what is it"}] + user_message(data_url(picture(3)))
    assert answer(client, checkpoint.name, messages).choices[0].message.content == expected
    req = parse_request({"model": "m", "messages": [{"role": "system", "content": "be short"}] + user_message(
        "x", "it?") + [{"role": "assistant", "content": "a bar"}, {"role": "user", "content": "and?"}]}, "m")
    tokenizer = scratch[1].tokenizer
    history, _ = tokenizer.encode_conversation([("be short\nit?", "a bar")], 40)
    assert request_prompt(req, tokenizer, 40, 1) == history + tokenizer.encode("and?") + [tokenizer.sep_id]


def test_two_images_in_one_user_message_are_refused_by_a_scratch_model(checkpoint, scratch):
    body = json.dumps({"model": checkpoint.name, "messages": two_images(0, 1, "which?"), "max_tokens": 4})
    status, _, reply = http(f"{scratch[2]}/v1/chat/completions", body.encode())
    error = json.loads(reply)["error"]
    assert (status, error["param"], error["code"]) == (400, "messages", "invalid_value")
    assert error["message"] == "2 images in the conversation: this model takes at most 1 image per conversation"


# -- a model on pretrained parts ------------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained_run(pretrained_parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained_chat")
    data = write_shapes_csv(root / "shapes.csv")
    assert main(["train", "--data", str(data), "--preset", "tiny", "--out", str(root / "run"), "--no-tracking",
                 "--set", f"model.vision=hf:{pretrained_parts['clip']}",
                 "--set", f"model.lm=hf:{pretrained_parts['llama']}",
                 "--set", "moe.layers=all", "--set", "train.max_steps=1", "--set", "train.batch_size=4",
                 "--set", "decoder.max_text_len=48"]) == 0
    return root / "run"


def test_a_pretrained_model_answers_text_only_and_two_image_chats_as_the_reference(pretrained_run):
    with live_server(pretrained_run) as (url, engine):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        tokenizer, model = engine.tokenizer, pretrained_run.name
        text_only = answer(client, model, text_message("what is it"), max_tokens=6)
        shown = answer(client, model, two_images(2, 5, "which is red?"), max_tokens=6)
        with ThreadPoolExecutor(3) as pool:  # mixed in one batch: text-only, one image, two images
            mixed = list(pool.map(lambda m: answer(client, model, m, 6).choices[0].message.content,
                                  [text_message("what is it"), user_message(data_url(picture(1)), "it?"),
                                   two_images(2, 5, "which is red?")]))
        nine = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}] * 9}]
        status, _, reply = http(f"{url}/v1/chat/completions",
                                json.dumps({"model": model, "messages": nine}).encode())
    prompt = request_prompt(parse_request({"model": "m", "messages": text_message("what is it")}, "m"),
                            tokenizer, 48, 8)
    ids, labels = tokenizer.encode_conversation([("what is it", "")], 48, image=False)
    assert tokenizer.image_token_id not in ids and prompt == ids[:len(prompt)]
    assert labels[len(prompt) - 1] != -100 and labels[len(prompt) - 2] == -100  # up to the answer's first token
    assert text_only.choices[0].message.content == tokenizer.decode(
        reference(pretrained_run, prompt, [], tokenizer.eos_id, 6))
    placed = [("<image>\nwhich is red?\n<image>", "")]
    prompt = request_prompt(parse_request({"model": "m", "messages": two_images(2, 5, "which is red?")}, "m"),
                            tokenizer, 48, 8)
    assert prompt.count(tokenizer.image_token_id) == 2 * engine.model.num_image_tokens
    assert prompt == tokenizer.encode_conversation(placed, 48, image=2)[0][:len(prompt)]
    assert shown.choices[0].message.content == tokenizer.decode(
        reference(pretrained_run, prompt, [picture(2), picture(5)], tokenizer.eos_id, 6))
    assert mixed[0] == text_only.choices[0].message.content and mixed[2] == shown.choices[0].message.content
    error = json.loads(reply)["error"]
    assert (status, error["param"], error["message"]) == (
        400, "messages", "9 images in the conversation: this model takes at most 8 images per conversation")

