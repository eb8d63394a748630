"""Bad input gets a clear 4xx in the contract's format, before any work is queued."""

from __future__ import annotations

import json

import pytest

from tests.conftest import auth, data_url_png, pixels

URL = "/imagine/generate"


async def post(client, body, **headers):
    return await client.post(URL, json=body, headers={**auth(), **headers})


async def assert_field_error(response, field: str, fragment: str = "") -> dict:
    assert response.status == 400, await response.text()
    body = await response.json()
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert body["detail"].startswith("Invalid request")
    errors = body["error"]["details"]["errors"]
    matching = [error for error in errors if error["loc"][:2] == ["body", field]]
    assert matching, errors
    assert fragment.lower() in matching[0]["msg"].lower()
    return body


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        ({"width": 100}, "width", "multiple of 8"),
        ({"height": 2048}, "height", "between 64 and 1024"),
        ({"width": 32}, "width", "between 64 and 1024"),
        ({"num_inference_steps": 0}, "num_inference_steps", "greater than"),
        ({"num_inference_steps": 101}, "num_inference_steps", "between 1 and 100"),
        ({"steps": 101}, "num_inference_steps", "between 1 and 100"),
        ({"guidance_scale": 20.5}, "guidance_scale", "less than"),
        ({"guidance_scale": -1}, "guidance_scale", "greater than"),
        ({"num_images": 5}, "num_images", "less than"),
        ({"num_images": 0}, "num_images", "greater than"),
        ({"seed": -2}, "seed", "greater than"),
        ({"seed": 4294967296}, "seed", "less than"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000"),
        ({"prompt": "   "}, "prompt", "blank"),
        ({"prompt": ""}, "prompt", "at least 1"),
        ({"negative_prompt": "x" * 2001}, "negative_prompt", "at most 2000"),
        ({"width": "512"}, "width", "integer"),
        ({"guidance_scale": "7.5"}, "guidance_scale", "number"),
        ({"store": "yes"}, "store", "boolean"),
        ({"widht": 512}, "widht", "extra"),
        ({"scheduler": "karras-magic"}, "scheduler", "one of"),
        ({"loras": [{"name": "pixel-art", "weight": 1.0}]}, "loras", "does not take loras"),
        ({"response_format": "gif"}, "response_format", "png"),
        ({"steps": 4, "num_inference_steps": 5}, "steps", "conflicts"),
        ({"img_size": 512, "width": 256}, "width", "conflicts with img_size"),
        ({"num_images": 2}, "num_images", "response_format"),
        # Image i uses seed + i: each must be a seed a request may send, to remake it alone.
        ({"seed": 4294967295, "num_images": 2, "response_format": "json"}, "seed", "at most 4294967294 with 2 images"),
        # A1111 attention weights that overflow make infinite embeddings (a black image); nested brackets multiply.
        ({"prompt": "(cat:" + "9" * 400 + ")"}, "prompt", "attention weight"),
        ({"prompt": "(" * 1000 + "cat"}, "prompt", "attention weight"),
        ({"negative_prompt": "(blur:101)"}, "negative_prompt", "attention weight"),
        # Each part weighted below 1 is a text-encoder pass of its own: hundreds would be minutes of device time.
        ({"prompt": "[a] b " * 17}, "prompt", "at most 16 parts may be weighted below 1 (this prompt has 17)"),
        ({"negative_prompt": "(a:0.5) b " * 17}, "negative_prompt", "at most 16 parts"),
        ({"prompt": "  <lora:pixel-art:0.5> ", "model": "sd15-lora"}, "prompt", "blank once its <lora:...> tags"),
    ],
)
async def test_each_bad_field_is_named(client, change, field, fragment) -> None:
    response = await post(client, {"prompt": "a cat", **change})
    await assert_field_error(response, field, fragment)


async def test_sixteen_parts_weighted_below_one_are_generated(client) -> None:
    body = {"prompt": "[a] b " * 16, "width": 64, "height": 64, "steps": 1, "response_format": "json"}
    response = await post(client, body)
    assert response.status == 200, await response.text()


async def test_a_weight_on_whitespace_alone_is_no_weight(client) -> None:
    """`[ ]` weighs no token: the image is the plain prompt's, with or without another part weighted."""
    small = {"width": 64, "height": 64, "steps": 1, "seed": 3, "response_format": "json"}
    images = []
    for prompt in ("a cat on a mat", "a cat [ ] on a mat", "a (cat:1.3) on a mat", "a (cat:1.3) [ ] on a (  :0.5) mat"):
        response = await post(client, {"prompt": prompt, **small})
        assert response.status == 200, await response.text()
        images.append(pixels(data_url_png((await response.json())["images"][0])))
    assert (images[0] == images[1]).all() and (images[2] == images[3]).all()
    assert not (images[0] == images[2]).all()


async def test_the_last_image_of_a_batch_may_take_the_largest_seed(client) -> None:
    body = {"prompt": "a cat", "seed": 4294967294, "num_images": 2, "response_format": "json", "width": 64, "height": 64, "steps": 1}
    response = await post(client, body)
    assert response.status == 200, await response.text()
    assert (await response.json())["seeds"] == [4294967294, 4294967295]


async def test_missing_prompt(client) -> None:
    await assert_field_error(await post(client, {"width": 64}), "prompt", "required")


async def test_nan_and_infinite_guidance_are_refused(client) -> None:
    for literal in ("NaN", "Infinity"):
        response = await client.post(
            URL,
            data=f'{{"prompt": "a cat", "guidance_scale": {literal}}}',
            headers={**auth(), "Content-Type": "application/json"},
        )
        await assert_field_error(response, "guidance_scale", "finite")


async def test_several_errors_are_reported_together(client) -> None:
    body = await assert_field_error(await post(client, {"prompt": "", "width": 7, "num_images": 9}), "prompt")
    fields = {error["loc"][1] for error in body["error"]["details"]["errors"]}
    assert fields == {"prompt", "width", "num_images"}


async def test_malformed_json_wrong_content_type_and_non_objects(client) -> None:
    bad_json = await client.post(URL, data="{not json", headers={**auth(), "Content-Type": "application/json"})
    assert bad_json.status == 400
    assert (await bad_json.json())["error"]["code"] == "VALIDATION_ERROR"
    form = await client.post(URL, data={"prompt": "a cat"}, headers=auth())
    assert form.status == 400
    assert "application/json" in (await form.json())["detail"]
    array = await client.post(URL, json=["a cat"], headers=auth())
    assert array.status == 400


async def test_unknown_model_lists_the_available_ones(client) -> None:
    response = await post(client, {"prompt": "a cat", "model": "dall-e-9"})
    assert response.status == 404
    body = await response.json()
    assert body["detail"] == "Model 'dall-e-9' not available"
    assert body["error"]["code"] == "MODEL_NOT_AVAILABLE"
    assert {"sdxl", "sdxl-turbo"} <= set(body["error"]["details"]["available_models"])


async def test_body_over_the_size_limit_gets_413_json(make_client, base_settings) -> None:
    client = await make_client(base_settings.replace(server={"max_body_bytes": 4096}))
    response = await client.post(
        URL, data=json.dumps({"prompt": "x" * 8000}), headers={**auth(), "Content-Type": "application/json"}
    )
    assert response.status == 413
    body = await response.json()
    assert body["error"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_unacceptable_accept_header_gets_406(client) -> None:
    response = await post(client, {"prompt": "a cat"}, Accept="text/html")
    assert response.status == 406
    assert (await response.json())["error"]["code"] == "NOT_ACCEPTABLE"


async def test_unknown_routes_and_methods_answer_in_json(client) -> None:
    missing = await client.get("/imagine/nope", headers=auth())
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "NOT_FOUND"
    outside = await client.get("/elsewhere")
    assert outside.status == 404
    assert (await outside.json())["error"]["code"] == "NOT_FOUND"
    wrong_method = await client.get(URL, headers=auth())
    assert wrong_method.status == 405
    assert (await wrong_method.json())["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert "POST" in wrong_method.headers["Allow"]


async def test_cors_preflight_is_answered_without_a_token(client) -> None:
    response = await client.options(
        URL,
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    refused = await client.get("/imagine/health", headers={"Origin": "https://app.example"})
    assert refused.status == 401
    # Browsers can read the error and the headers that explain it.
    assert refused.headers["Access-Control-Allow-Origin"] == "*"
    assert "RateLimit-Remaining" in refused.headers["Access-Control-Expose-Headers"]


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/imagine/usage?foo=1", "foo"),
        ("/imagine/usage?sub=a&sub=b", "sub"),
        ("/imagine/info?model=sdxl&model=sd15-lora", "model"),
        ("/imagine/info?modle=sdxl", "modle"),
        ("/imagine/sdapi/v1/progress?skip_current_image=true&skip_current_image=false", "skip_current_image"),
        ("/imagine/gallery?limt=5", "limt"),
    ],
)
async def test_query_parameters_are_known_and_given_once(client, path, name) -> None:
    response = await client.get(path, headers=auth(scope="generate admin"))
    assert response.status == 400, await response.text()
    body = await response.json()
    # The A1111 routes answer in A1111's shape, with the errors at the top.
    errors = body["errors"] if "/sdapi/" in path else body["error"]["details"]["errors"]
    assert [error["loc"] for error in errors] == [["query", name]]
