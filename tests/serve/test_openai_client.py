"""The official `openai` package against `lavit serve` on the official-tiny model: the
answers are the library's, streaming adds up to the same text, images come back as PNGs
carrying the CLI's metadata, and errors surface as the client's exceptions."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from conftest import data_url, image_message

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def model(official_checkpoint):
    import lavit_mlx

    return lavit_mlx.load(official_checkpoint, vision_heads=2)


@pytest.fixture(scope="module")
def image_url(input_png):
    return data_url(input_png.read_bytes())


def test_models_lists_the_served_model(client, server):
    assert [m.id for m in client.models.list().data] == [server.model]
    assert client.models.retrieve(server.model).owned_by == "lavit-mlx"


def test_a_chat_completion_with_an_image_is_the_librarys_caption(client, server, model, input_png, image_url):
    from lavit_mlx.understanding import caption

    response = client.chat.completions.create(model=server.model, messages=image_message(image_url), max_tokens=6)
    expected = caption(model, [str(input_png)], max_new_tokens=6, min_new_tokens=6)[0]
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason in ("stop", "length")
    from lavit_mlx.image_processing import load_images

    understood = model.tokenize_pixels(load_images([str(input_png)]), understanding=True)
    extra = response.model_extra["lavit"]
    assert extra["task"] == "caption" and extra["image_tokens"] == understood.visual_embeds[0].shape[0]
    # the image's tokens (between [IMG] and [/IMG]) are prompt tokens; no text prompt for a caption
    assert response.usage.prompt_tokens == extra["image_tokens"] + 2
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_a_question_is_answered_with_the_vqa_prompt(client, server, model, input_png, image_url):
    from lavit_mlx.understanding import ask

    response = client.chat.completions.create(model=server.model, messages=image_message(image_url, "What is it?"),
                                              max_tokens=4)
    expected = ask(model, [str(input_png)], "What is it?", max_new_tokens=4, min_new_tokens=2)[0]
    assert response.choices[0].message.content == expected.text
    assert response.model_extra["lavit"]["prompt"] == "Question: What is it? Answer:"
    question_tokens = len(model.text_tokenizer.encode("Question: What is it? Answer:"))
    assert response.usage.prompt_tokens == response.model_extra["lavit"]["image_tokens"] + 2 + question_tokens


@pytest.mark.parametrize("options", [dict(temperature=0.8, seed=5), dict(extra_body={"num_beams": 1})],
                         ids=["sampled", "greedy"])
def test_streaming_sends_chunks_that_add_up_to_the_answer(client, server, image_url, options):
    messages = image_message(image_url)
    whole = client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, **options)
    chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}, **options))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 2, f"the answer came in one piece: {content}"
    assert "".join(content) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens and not chunks[-1].choices


def test_beam_search_streams_its_answer_once_it_is_known(client, server, image_url):
    messages = image_message(image_url)
    whole = client.chat.completions.create(model=server.model, messages=messages, max_tokens=6)
    stream = client.chat.completions.create(model=server.model, messages=messages, max_tokens=6, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole.choices[0].message.content


def test_images_generate_returns_pngs_with_the_clis_metadata(client, server):
    from PIL import Image

    from lavit_mlx.generation import GenerationSettings, png_record

    response = client.images.generate(model=server.model, prompt="a red car", size="32x32", n=2,
                                      response_format="b64_json",
                                      extra_body={"steps": 2, "seed": 11, "max_new_tokens": 24, "scheduler": "euler"})
    assert len(response.data) == 2
    pictures = [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in response.data]
    assert all(p.format == "PNG" and p.size == (32, 32) for p in pictures)
    records = [json.loads(p.text["lavit"]) for p in pictures]
    assert [r["seed"] for r in records] == [11, 12] and [p.text["seed"] for p in pictures] == ["11", "12"]
    assert pictures[0].text["prompt"] == "a red car"
    assert records[0]["steps"] == 2 and records[0]["scheduler"] == "euler" and records[0]["width"] == 32
    expected = png_record(GenerationSettings(prompt="a red car", seed=11, num_images=2, width=32, height=32,
                                             steps=2, scheduler="euler", max_new_tokens=24).resolved(), 0)
    assert set(records[0]) == set(expected), "the PNG's record has other keys than the CLI's"
    assert records[0]["model"].endswith("checkpoint")
    assert response.model_extra["lavit"]["seeds"] == [11, 12]


def test_the_same_seed_makes_the_same_image(client, server):
    options = dict(model=server.model, prompt="a blue boat", size="16x16",
                   extra_body={"steps": 1, "seed": 3, "max_new_tokens": 8, "min_new_tokens": 4})
    first, second = client.images.generate(**options), client.images.generate(**options)
    assert first.data[0].b64_json == second.data[0].b64_json


def test_a_prompt_image_enters_the_generation(client, server, input_png, image_url):
    from PIL import Image

    response = client.images.generate(model=server.model, prompt="<image> in the snow", size="16x16",
                                      extra_body={"steps": 1, "seed": 2, "max_new_tokens": 8, "min_new_tokens": 4,
                                                  "images": [image_url]})
    record = json.loads(Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).text["lavit"])
    import hashlib

    assert record["images"] == [f"sha256:{hashlib.sha256(input_png.read_bytes()).hexdigest()}"]
    assert record["llm_guidance"] == 5.0  # the release's guidance with an image in the prompt


def test_errors_surface_as_the_clients_exceptions(server, client, image_url):
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model=server.model, prompt="a car", size="30x32")
    assert "not a multiple of 8" in bad.value.body["message"] and bad.value.body["param"] == "size"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=image_message(image_url))
    assert "gpt-4o" in missing.value.body["message"] and missing.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as remote:
        client.chat.completions.create(model=server.model, messages=image_message("https://example.com/cat.png"))
    assert "offline" in remote.value.body["message"]


def test_requests_batched_together_get_the_answers_they_get_alone(client, server, model, input_png):
    import threading

    from PIL import Image

    from lavit_mlx.understanding import caption

    picture = Image.open(input_png).convert("RGB")
    variants = [picture, picture.transpose(Image.FLIP_LEFT_RIGHT), picture.rotate(90),
                picture.crop((0, 0, picture.width // 2, picture.height // 2))]
    urls = []
    for variant in variants:
        buffer = io.BytesIO()
        variant.save(buffer, format="PNG")
        urls.append(data_url(buffer.getvalue()))
    before = server.health()
    answers = [None] * len(urls)

    def ask(index):
        answers[index] = client.chat.completions.create(model=server.model, messages=image_message(urls[index]),
                                                        max_tokens=6).choices[0].message.content

    # a generation holds the worker while the four captions queue up behind it
    busy = threading.Thread(target=lambda: client.images.generate(
        model=server.model, prompt="a red car", size="16x16", extra_body={"steps": 2, "max_new_tokens": 40}))
    busy.start()
    deadline = time.monotonic() + 30
    while server.health()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(urls))]
    for thread in threads:
        thread.start()
    for thread in threads + [busy]:
        thread.join(120)
    after = server.health()
    assert after["batched_jobs"] - before["batched_jobs"] >= 2, (before, after)
    alone = [caption(model, [variant], max_new_tokens=6, min_new_tokens=6)[0].text for variant in variants]
    assert answers == alone
