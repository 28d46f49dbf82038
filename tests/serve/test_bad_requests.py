"""Every bad request gets a 4xx with OpenAI's error body and a message naming the problem."""

from __future__ import annotations

import base64

import pytest
from conftest import data_url, image_message, png_claiming

CHAT = "/v1/chat/completions"
IMAGES = "/v1/images/generations"


@pytest.fixture(scope="module")
def image_url(input_png):
    return data_url(input_png.read_bytes())


def chat(image_url, **extra):
    return {"model": "checkpoint", "messages": image_message(image_url), "max_tokens": 4, **extra}


def assert_error(answer, status, *words, param=None):
    code, _, body = answer
    assert code == status, f"expected {status}, got {code}: {body}"
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert "\n" not in error["message"] and len(error["message"]) < 300, error["message"]
    for word in words:
        assert word in error["message"], f"{word!r} not in {error['message']!r}"
    if param is not None:
        assert error["param"] == param, error
    return error


def test_malformed_json(server):
    error = assert_error(server.request("POST", CHAT, body='{"messages": [', headers={"Content-Type": "application/json"}),
                         400, "not valid JSON")
    assert error["code"] == "invalid_json"
    assert_error(server.request("POST", CHAT, body={"model": "checkpoint"}), 400, "messages", param="messages")
    assert_error(server.request("POST", CHAT, body={"messages": "hello"}), 400, "messages")
    assert_error(server.request("POST", IMAGES, body={"prompt": "x", "n": "many"}), 400, "n", param="n")


def test_unknown_model(server, image_url):
    error = assert_error(server.request("POST", CHAT, body=chat(image_url, model="llava-13b")), 404, "llava-13b",
                         "checkpoint", param="model")
    assert error["code"] == "model_not_found"
    assert_error(server.request("POST", IMAGES, body={"model": "dall-e-3", "prompt": "x"}), 404, "dall-e-3")
    assert_error(server.request("GET", "/v1/models/dall-e-3"), 404, "dall-e-3")


def test_a_part_type_it_does_not_take(server, image_url):
    body = chat(image_url)
    body["messages"][0]["content"].append({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}})
    error = assert_error(server.request("POST", CHAT, body=body), 400, "'input_audio'", "text", "image_url",
                         param="messages[0].content[1].type")
    assert error["code"] == "unsupported_content_type"


def test_no_image_or_two_images(server, image_url):
    text_only = {"messages": [{"role": "user", "content": "hello"}]}
    assert_error(server.request("POST", CHAT, body=text_only), 400, "no image")
    two = chat(image_url)
    two["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": image_url}})
    assert_error(server.request("POST", CHAT, body=two), 400, "one image", param="messages[0].content[1].image_url")


def test_remote_image_urls_are_refused(server):
    error = assert_error(server.request("POST", CHAT, body=chat("https://example.com/cat.jpg")), 400, "offline",
                         "data URL", param="messages[0].content[0].image_url.url")
    assert error["code"] == "unsupported_image_url"


@pytest.mark.parametrize("url, words", [
    (data_url(b"this is not an image at all"), ("not an image",)),
    ("data:image/png;base64,@@@not-base64@@@", ("base64",)),
    ("data:image/png,rawbytes", ("base64",)),
    ("file:///etc/passwd", ("data URL",)),
    (data_url(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00"), ("truncated or corrupt",)),
], ids=["not-an-image", "bad-base64", "not-base64", "file-url", "truncated-png"])
def test_undecodable_images(server, url, words):
    error = assert_error(server.request("POST", CHAT, body=chat(url)), 400, *words)
    assert "/tmp" not in error["message"], "the message names a temporary file"


def test_an_image_over_the_clis_pixel_limit_is_refused_from_its_header(server):
    from lavit_mlx.image_processing import MAX_IMAGE_PIXELS

    bomb = data_url(png_claiming(20000, 20000))  # 400 MP in a few hundred bytes
    assert 20000 * 20000 > MAX_IMAGE_PIXELS
    assert_error(server.request("POST", CHAT, body=chat(bomb)), 400, "too large", "20000x20000", "100 MP",
                 param="messages[0].content[0].image_url")
    assert_error(server.request("POST", "/v1/lavit/overlay", body={"image": bomb}), 400, "too large")


def test_a_prompt_longer_than_the_context(server, image_url):
    long_question = " ".join(["why is the sky blue"] * 200)  # ~1000 tokens; the tiny LLM's context is 512
    body = {"messages": image_message(image_url, long_question), "max_tokens": 4}
    error = assert_error(server.request("POST", CHAT, body=body), 400, "context of 512 tokens")
    assert error["code"] == "context_length_exceeded"
    assert_error(server.request("POST", CHAT, body=chat(image_url, max_tokens=600)), 400, "max_tokens 600",
                 "context", param="max_tokens")
    assert_error(server.request("POST", IMAGES, body={"prompt": long_question}), 400, "context", param="prompt")


@pytest.mark.parametrize("size, words", [
    ("30x32", ("width 30 is not a multiple of 8",)),
    ("32x33", ("height 33 is not a multiple of 8",)),
    ("8192x8192", ("outside 8..4096",)),
    ("big", ("WIDTHxHEIGHT", "1152x896")),
])
def test_sizes_that_cannot_work(server, size, words):
    assert_error(server.request("POST", IMAGES, body={"prompt": "a car", "size": size}), 400, *words, param="size")


@pytest.mark.parametrize("field, value, words", [
    ("n", 0, ("n 0: expected 1 to 10",)),
    ("n", 11, ("n 11",)),
    ("steps", 0, ("steps 0: expected 1 to 1000",)),
    ("steps", 5000, ("steps 5000",)),
    ("seed", -1, ("seed -1",)),
    ("scheduler", "pndm", ("'pndm'", "ddim")),
    ("response_format", "url", ("b64_json",)),
    ("guidance", -2, ("guidance -2",)),
])
def test_generation_options_out_of_range(server, field, value, words):
    body = {"prompt": "a car", "size": "32x32", field: value}
    assert_error(server.request("POST", IMAGES, body=body), 400, *words, param=field)


def test_decoding_options_out_of_range(server, image_url):
    assert_error(server.request("POST", CHAT, body=chat(image_url, max_tokens=0)), 400, "max_tokens 0", param="max_tokens")
    assert_error(server.request("POST", CHAT, body=chat(image_url, temperature=3)), 400, "temperature 3",
                 param="temperature")
    assert_error(server.request("POST", CHAT, body=chat(image_url, n=3)), 400, "one answer", param="n")
    assert_error(server.request("POST", CHAT, body=chat(image_url, temperature=0.5, num_beams=3)), 400, "num_beams",
                 param="num_beams")


def test_the_api_key_is_checked_on_every_route_but_health(server, image_url):
    routes = [("GET", "/v1/models", None), ("POST", CHAT, chat(image_url)), ("POST", IMAGES, {"prompt": "x"}),
              ("POST", "/v1/lavit/overlay", {"image": image_url}), ("POST", "/v1/lavit/generate/stream", {"prompt": "x"})]
    for method, path, body in routes:
        assert_error(server.request(method, path, body=body, key=None), 401, "missing API key")
        assert_error(server.request(method, path, body=body, key="wrong-key"), 401, "incorrect API key")
    # a wrong key is refused before the body is even parsed
    assert_error(server.request("POST", CHAT, body="{broken", key="wrong"), 401, "incorrect API key")
    assert_error(server.request("GET", "/v1/models", headers={"Authorization": "Basic abc"}, key=None), 401, "Bearer")
    assert server.request("GET", "/health", key=None)[0] == 200
    assert server.request("GET", "/", key=None)[0] == 200  # the page itself holds no data; it asks for the key


def test_a_body_over_the_limit_is_refused(server):
    huge = "A" * (65 * 2**20)
    code, _, body = server.request("POST", CHAT, body=huge, headers={"Content-Type": "application/json"})
    assert code == 413 and "larger than 64 MiB" in body["error"]["message"]


def test_unknown_routes_and_methods(server):
    assert_error(server.request("GET", "/v1/completions"), 404, "no route")
    assert_error(server.request("GET", CHAT), 405, "/v1/chat/completions does not take GET")


def test_the_server_is_still_well_after_all_that(server, image_url):
    code, _, body = server.request("POST", CHAT, body=chat(image_url))
    assert code == 200 and body["choices"][0]["message"]["content"]
    assert base64.b64decode(image_url.split(",", 1)[1])  # the sample image was fine all along
