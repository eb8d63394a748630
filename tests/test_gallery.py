"""The gallery: stored generations, persistence, isolation, retention and crash recovery."""

from __future__ import annotations

import base64
import io
import os
import re
import sqlite3
import time
from pathlib import Path

import pytest
from PIL import Image

from imagine.storage.gallery import INDEX_FILE, GalleryStore, ImageMetadata, ListQuery, new_id, storage_folder
from imagine.http.app_keys import gallery_key
from tests.conftest import auth

GENERATE = "/imagine/generate"
GALLERY = "/imagine/gallery"
ID = re.compile(r"img_[A-Za-z0-9_-]{22}")
ADMIN = auth("root", "admin")


async def generate(client, headers=None, **body) -> dict:
    body = {"prompt": "a fox", "steps": 1, "response_format": "json", **body}
    response = await client.post(GENERATE, json=body, headers=headers or auth())
    assert response.status == 200, await response.text()
    return await response.json()


async def listing(client, query: str = "", headers=None) -> dict:
    response = await client.get(f"{GALLERY}{query}", headers=headers or auth())
    assert response.status == 200, await response.text()
    return await response.json()


def image_files(settings) -> list[Path]:
    return sorted((storage_folder(settings) / "images").iterdir())


async def test_generate_png_names_its_gallery_id_and_the_image_is_kept(client) -> None:
    response = await client.post(GENERATE, json={"prompt": "a lighthouse", "seed": 9, "steps": 2}, headers=auth())
    assert response.status == 200
    image_id = response.headers["X-Image-Id"]
    assert ID.fullmatch(image_id)
    assert response.headers["Content-Disposition"] == f'inline; filename="{image_id}.png"'
    png = await response.read()
    stored = await client.get(f"{GALLERY}/{image_id}.png", headers=auth())
    assert stored.status == 200
    assert stored.content_type == "image/png"
    assert await stored.read() == png
    metadata = await (await client.get(f"{GALLERY}/{image_id}", headers=auth())).json()
    assert metadata["id"] == image_id
    assert metadata["filename"] == f"{image_id}.png"
    assert metadata["url"] == f"{GALLERY}/{image_id}.png"
    assert metadata["owner"] == "alice"
    assert (metadata["prompt"], metadata["seed"], metadata["model"]) == ("a lighthouse", 9, "sdxl")
    assert metadata["parameters"]["num_inference_steps"] == 2
    assert metadata["created_at"].endswith("Z")


async def test_json_ids_match_the_images_and_their_seeds(client) -> None:
    result = await generate(client, seed=100, num_images=2)
    assert len(result["ids"]) == 2 and len(set(result["ids"])) == 2
    for image_id, data_url, seed in zip(result["ids"], result["images"], result["seeds"], strict=True):
        metadata = await (await client.get(f"{GALLERY}/{image_id}", headers=auth())).json()
        assert metadata["seed"] == seed
        png = await (await client.get(f"{GALLERY}/{image_id}.png", headers=auth())).read()
        assert png == base64.b64decode(data_url.split(",", 1)[1])


async def test_store_false_keeps_nothing(client, base_settings) -> None:
    response = await client.post(GENERATE, json={"prompt": "a fox", "steps": 1, "store": False}, headers=auth())
    assert response.status == 200
    assert "X-Image-Id" not in response.headers
    assert (await generate(client, store=False))["ids"] == []
    assert (await listing(client))["total_count"] == 0
    assert image_files(base_settings) == []


async def test_images_and_metadata_survive_a_restart(make_client, base_settings) -> None:
    first = await make_client(base_settings)
    result = await generate(
        first, prompt="a castle", negative_prompt="fog", seed=77, steps=2, guidance=3.5, width=96, height=64
    )
    image_id = result["ids"][0]
    png = await (await first.get(f"{GALLERY}/{image_id}.png", headers=auth())).read()
    before = await listing(first)
    await first.close()

    second = await make_client(base_settings)
    after = await listing(second)
    assert after == before
    image = after["images"][0]
    assert image["id"] == image_id
    assert image["prompt"] == "a castle" and image["negative_prompt"] == "fog"
    assert (image["seed"], image["width"], image["height"]) == (77, 96, 64)
    assert image["parameters"] == {
        "num_inference_steps": 2,
        "guidance_scale": 3.5,
        "width": 96,
        "height": 64,
        "scheduler": "euler",
        "loras": [],
    }
    assert image["generation_time"] > 0 and image["vram_used"] == 0.0
    assert await (await second.get(f"{GALLERY}/{image_id}.png", headers=auth())).read() == png


async def test_pagination_newest_first_and_filters(client) -> None:
    older = await generate(client, prompt="A Red Fox in snow")
    middle = await generate(client, prompt="a blue whale", model="sdxl-turbo")
    newest = await generate(client, prompt="a sleeping FOX cub")

    page = await listing(client, "?limit=2")
    assert (page["total_count"], page["limit"], page["offset"]) == (3, 2, 0)
    assert [image["id"] for image in page["images"]] == newest["ids"] + middle["ids"]
    rest = await listing(client, "?limit=2&offset=2")
    assert [image["id"] for image in rest["images"]] == older["ids"]
    assert (await listing(client, "?offset=5"))["images"] == []

    turbo = await listing(client, "?model=sdxl-turbo")
    assert [image["id"] for image in turbo["images"]] == middle["ids"] and turbo["total_count"] == 1
    foxes = await listing(client, "?q=fOx")
    assert [image["id"] for image in foxes["images"]] == newest["ids"] + older["ids"]
    assert foxes["total_count"] == 2
    assert (await listing(client, "?q=fox&model=sdxl-turbo"))["total_count"] == 0
    unknown = await listing(client, "?model=dall-e-9")
    assert unknown["images"] == [] and unknown["total_count"] == 0
    # Empty form fields mean "no filter".
    assert (await listing(client, "?model=&q="))["total_count"] == 3


async def test_include_data_adds_plain_base64(client) -> None:
    result = await generate(client)
    plain = await listing(client)
    assert "image_data" not in plain["images"][0]
    with_data = await listing(client, "?include_data=true")
    png = base64.b64decode(with_data["images"][0]["image_data"])
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert png == base64.b64decode(result["images"][0].split(",", 1)[1])


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
        ("include_data=perhaps", "include_data"),
        ("sort=oldest", "sort"),
        ("limit=1&limit=2", "limit"),
    ],
)
async def test_bad_query_parameters_are_named(client, query, name) -> None:
    response = await client.get(f"{GALLERY}?{query}", headers=auth())
    assert response.status == 400
    body = await response.json()
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert [error["loc"] for error in body["error"]["details"]["errors"]] == [["query", name]]


async def test_callers_see_and_delete_only_their_own_images(client) -> None:
    alice, bob = auth("alice"), auth("bob")
    alices = (await generate(client, alice, prompt="alice's fox"))["ids"][0]
    bobs = (await generate(client, bob, prompt="bob's whale"))["ids"][0]

    assert [image["id"] for image in (await listing(client, headers=alice))["images"]] == [alices]
    assert [image["id"] for image in (await listing(client, headers=bob))["images"]] == [bobs]
    for method, path in (("GET", alices), ("GET", f"{alices}.png"), ("DELETE", alices)):
        response = await client.request(method, f"{GALLERY}/{path}", headers=bob)
        assert response.status == 404, (method, path)
        assert (await response.json())["error"]["code"] == "NOT_FOUND"
    # Bob's failed delete left Alice's image alone.
    assert (await client.get(f"{GALLERY}/{alices}.png", headers=alice)).status == 200

    assert (await client.delete(f"{GALLERY}/{alices}", headers=alice)).status == 204
    assert (await client.get(f"{GALLERY}/{alices}", headers=alice)).status == 404
    assert (await client.delete(f"{GALLERY}/{alices}", headers=alice)).status == 404


async def test_admin_sees_and_deletes_everyones_images(client, base_settings) -> None:
    alices = (await generate(client, auth("alice")))["ids"][0]
    bobs = (await generate(client, auth("bob")))["ids"][0]
    everyone = await listing(client, headers=ADMIN)
    assert [(image["id"], image["owner"]) for image in everyone["images"]] == [(bobs, "bob"), (alices, "alice")]
    assert (await client.get(f"{GALLERY}/{alices}.png", headers=ADMIN)).status == 200
    assert (await client.delete(f"{GALLERY}/{alices}", headers=ADMIN)).status == 204
    assert (await listing(client, headers=auth("alice")))["total_count"] == 0
    assert [path.name for path in image_files(base_settings)] == [f"{bobs}.png"]


async def test_gallery_needs_the_generate_or_admin_scope(client) -> None:
    response = await client.get(GALLERY, headers=auth(scope="metrics"))
    assert response.status == 403
    assert (await client.get(GALLERY)).status == 401


@pytest.mark.parametrize(
    "path",
    [
        "..%2F..%2Fetc%2Fpasswd",
        "..%2F..%2Fetc%2Fpasswd.png",
        "img_..%2Fx",
        "img_../x",
        "%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd.png",
        "img_..%2F" + INDEX_FILE,
        "img_AAAAAAAAAAAAAAAAAAAAA",  # one character short
        "img_AAAAAAAAAAAAAAAAAAAAAAA.png",  # one too many
        "IMG_AAAAAAAAAAAAAAAAAAAAAA",
    ],
)
async def test_malformed_and_path_like_ids_are_404_before_any_lookup(client, monkeypatch, path) -> None:
    store = client.app[gallery_key]
    lookups = []
    original = store._db

    async def spy(function, *args):
        lookups.append(function.__name__)
        return await original(function, *args)

    monkeypatch.setattr(store, "_db", spy)
    for method in ("GET", "DELETE"):
        response = await client.request(method, f"{GALLERY}/{path}", headers=ADMIN)
        assert response.status in (404, 405), (method, path, response.status)
        if response.status == 404:
            assert (await response.json())["error"]["code"] == "NOT_FOUND"
    assert lookups == []


async def test_retention_by_count_removes_the_oldest(make_client, base_settings) -> None:
    settings = base_settings.replace(gallery={"max_images": 2})
    client = await make_client(settings)
    ids = [(await generate(client, prompt=f"fox {number}"))["ids"][0] for number in range(3)]
    page = await listing(client)
    assert [image["id"] for image in page["images"]] == ids[:0:-1]
    assert page["total_count"] == 2
    assert (await client.get(f"{GALLERY}/{ids[0]}", headers=auth())).status == 404
    assert [path.name for path in image_files(settings)] == sorted(f"{image_id}.png" for image_id in ids[1:])


async def test_retention_by_age_applies_at_start(make_client, base_settings) -> None:
    first = await make_client(base_settings)
    old = (await generate(first, prompt="old"))["ids"][0]
    recent = (await generate(first, prompt="recent"))["ids"][0]
    await first.close()
    with sqlite3.connect(storage_folder(base_settings) / INDEX_FILE) as index:
        index.execute("UPDATE images SET created_at = ? WHERE id = ?", (time.time() - 3 * 86400, old))

    settings = base_settings.replace(gallery={"max_age_days": 2.0})
    second = await make_client(settings)
    assert [image["id"] for image in (await listing(second))["images"]] == [recent]
    assert [path.name for path in image_files(settings)] == [f"{recent}.png"]


async def test_start_repairs_what_a_crash_left(make_client, base_settings) -> None:
    first = await make_client(base_settings)
    kept = (await generate(first))["ids"][0]
    await first.close()

    folder = storage_folder(base_settings)
    images = folder / "images"
    an_hour_ago = time.time() - 3600
    # A crash after the rename, before the commit: a file without a row.
    orphan = images / f"{new_id()}.png"
    orphan.write_bytes(b"\x89PNG orphan")
    os.utime(orphan, (an_hour_ago, an_hour_ago))
    # A crash in the middle of writing: a temporary file.
    temporary = images / f".{new_id()}.png.1234abcd.tmp"
    temporary.write_bytes(b"\x89PNG half")
    os.utime(temporary, (an_hour_ago, an_hour_ago))
    # Another process's image between its rename and its commit: too young to judge.
    in_flight = images / f"{new_id()}.png"
    in_flight.write_bytes(b"\x89PNG in flight")
    # A row whose file is gone.
    dangling = new_id()
    with sqlite3.connect(folder / INDEX_FILE) as index:
        columns = [row[1] for row in index.execute("PRAGMA table_info(images)")]
        values = list(index.execute("SELECT * FROM images WHERE id = ?", (kept,)).fetchone())
        values[columns.index("id")] = dangling
        index.execute(f"INSERT INTO images VALUES ({', '.join('?' * len(values))})", values)

    second = await make_client(base_settings)
    page = await listing(second, headers=ADMIN)
    assert [image["id"] for image in page["images"]] == [kept]
    assert page["total_count"] == 1
    assert (await second.get(f"{GALLERY}/{dangling}", headers=auth())).status == 404
    assert sorted(path.name for path in images.iterdir()) == sorted([f"{kept}.png", in_flight.name])
    assert (await second.get(f"{GALLERY}/{kept}.png", headers=auth())).status == 200


def _metadata(number: int) -> ImageMetadata:
    return ImageMetadata(
        prompt=f"prompt {number} {'fox' if number % 10 == 0 else 'cat'}",
        negative_prompt="",
        model="sdxl" if number % 2 else "sdxl-turbo",
        seed=number,
        width=64,
        height=64,
        steps=1,
        guidance=0.0,
        scheduler="euler",
        loras=(),
        generation_time=0.1,
        vram_used=0.0,
    )


async def test_listing_thousands_uses_indexes_not_table_scans(tmp_path, monkeypatch) -> None:
    # Durability is not under test here: skip the fsyncs to fill the store quickly.
    monkeypatch.setattr(os, "fsync", lambda descriptor: None)
    store = GalleryStore(tmp_path / "gallery")
    await store.open()
    try:
        for start in range(0, 3000, 500):
            owner = "alice" if start < 2500 else "bob"
            await store.add(owner, [(b"png", _metadata(number)) for number in range(start, start + 500)])
        statements: list[str] = []
        await store._db(lambda: store._sql.set_trace_callback(statements.append))
        queries = [
            ListQuery(owner="alice", limit=50, offset=100),
            ListQuery(owner="alice", limit=50, model="sdxl"),
            ListQuery(owner="alice", limit=20, text="FOX"),
            ListQuery(owner=None, limit=200, offset=2900),
            ListQuery(owner=None, limit=50, model="sdxl-turbo"),
        ]
        results = [await store.list(query) for query in queries]
        await store._db(lambda: store._sql.set_trace_callback(None))

        assert [total for _, total in results] == [2500, 1250, 250, 3000, 1500]
        alice_page = [record.metadata.seed for record in results[0][0]]
        assert alice_page == list(range(2399, 2349, -1))  # newest first
        plans = []
        for statement in (s for s in statements if s.startswith("SELECT")):
            plan = await store._db(lambda s=statement: store._sql.execute(f"EXPLAIN QUERY PLAN {s}").fetchall())
            plans.append((statement, [row[-1] for row in plan]))
        assert len(plans) == 2 * len(queries)
        for statement, steps in plans:
            for step in steps:
                assert step.startswith(("SEARCH images USING", "SCAN images USING")), (statement, steps)
                assert "TEMP B-TREE" not in step, (statement, steps)
    finally:
        await store.close()




def test_storage_and_gallery_settings_from_the_environment(tmp_path) -> None:
    from imagine.settings import SettingsError, load_settings

    state = str(tmp_path / "state")
    defaults = load_settings(None, {"IMAGINE_SERVER_STATE_DIR": state})
    assert storage_folder(defaults) == Path(state) / "gallery"
    assert (defaults.gallery.max_images, defaults.gallery.max_age_days) == (0, 0.0)
    settings = load_settings(
        None,
        {
            "IMAGINE_STORAGE_DIR": str(tmp_path / "images"),
            "IMAGINE_GALLERY_MAX_IMAGES": "1000",
            "IMAGINE_GALLERY_MAX_AGE_DAYS": "30",
        },
    )
    assert storage_folder(settings) == tmp_path / "images"
    assert (settings.gallery.max_images, settings.gallery.max_age_days) == (1000, 30.0)
    for variable, value in (("IMAGINE_GALLERY_MAX_IMAGES", "-1"), ("IMAGINE_GALLERY_MAX_AGE_DAYS", "-2")):
        with pytest.raises(SettingsError):
            load_settings(None, {variable: value})
