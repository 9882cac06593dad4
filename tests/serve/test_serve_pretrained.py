"""A model on pretrained parts (a transformers LM with MoE layers installed, its DynamicCache, a chat
template tokenizer) served like a scratch one: greedy answers equal `moevlm caption`, alone or batched."""

import base64
from concurrent.futures import ThreadPoolExecutor

import openai
from serve_helpers import live_server, picture, user_message

from moevlm.cli import main
from moevlm.generate import caption_files
from shapes import write_shapes_csv


def test_a_pretrained_lm_with_moe_layers_answers_as_caption_does_alone_and_batched(pretrained_parts, tmp_path):
    data = write_shapes_csv(tmp_path / "shapes.csv")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--preset", "tiny", "--out", str(run), "--no-tracking",
                 "--set", f"model.vision=hf:{pretrained_parts['clip']}",
                 "--set", f"model.lm=hf:{pretrained_parts['llama']}",
                 "--set", "moe.layers=all", "--set", "train.max_steps=1", "--set", "train.batch_size=4",
                 "--set", "decoder.max_text_len=48"]) == 0
    paths = []
    for index in range(4):
        paths.append(tmp_path / f"{index}.png")
        picture(index).save(paths[-1])
    expected = [text for _, text in caption_files(run, paths, prompt="what is it", device="cpu", max_new_tokens=6)]
    with live_server(run) as (url, engine):
        assert len(engine.model.moe_layers) > 0
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

        def ask(path):
            url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
            reply = client.chat.completions.create(model=run.name, messages=user_message(url, "what is it"),
                                                   temperature=0, max_tokens=6,
                                                   extra_body={"moevlm": {"routing": True}})
            return reply.choices[0].message.content, reply.model_extra["moevlm"]["tokens"]

        alone = [ask(path) for path in paths]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(ask, paths))
    assert [text for text, _ in alone] == expected
    assert together == alone
    assert all(len(token["experts"]) == len(engine.model.moe_layers) for _, tokens in alone for token in tokens)
