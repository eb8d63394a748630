"""The gallery: stored generations, persistence, isolation, retention and crash recovery.

Every test that stores through the service runs against both stores: the
embedded one (files and SQLite) and the shared one (a real PostgreSQL and an
S3-protocol server, both started by the tests).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import re
import sqlite3
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from PIL import Image

from imagine.http.app_keys import gallery_key
from imagine.settings import Settings
from imagine.storage.gallery import INDEX_FILE, GalleryStore, storage_folder
from imagine.storage.records import ImageMetadata, ListQuery, new_id
from imagine.storage.s3_objects import bucket_and_prefix
from tests.conftest import auth
from tests.postgres import postgres  # noqa: F401 - the test run's PostgreSQL, a fixture
from tests.s3 import CREDENTIALS, s3  # noqa: F401 - the test run's S3 server, a fixture

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


URL_SECRET = "a URL-signing secret every replica shares"
# Long enough that a restart stays inside it, short enough to wait out in a test.
SHARED_ORPHAN_GRACE_S = 2.0


@pytest.fixture(params=["embedded", "shared"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def base_settings(base_settings: Settings, backend: str, request: pytest.FixtureRequest, monkeypatch) -> Settings:
    """The conftest's settings with the gallery on `backend`: shared ones in a database and bucket of their own."""
    if backend == "embedded":
        return base_settings
    cluster, server = request.getfixturevalue("postgres"), request.getfixturevalue("s3")
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("IMAGINE_URL_SECRET", URL_SECRET)
    return base_settings.replace(
        gallery={
            "database": cluster.new_database(),
            "objects": f"s3://{server.new_bucket()}/gallery",
            "s3_endpoint_url": server.endpoint,
            "s3_path_style": True,
            "orphan_grace_s": SHARED_ORPHAN_GRACE_S,
        }
    )


def stored_names(settings: Settings) -> list[str]:
    """The PNGs the store holds, by name, sorted: files in the folder, or objects in the bucket."""
    if not settings.gallery.shared:
        return sorted(path.name for path in (storage_folder(settings) / "images").iterdir())
    from tests.s3 import S3Server

    bucket, prefix = bucket_and_prefix(settings.gallery.objects)
    return sorted(key.removeprefix(prefix) for key in S3Server(settings.gallery.s3_endpoint_url).keys(bucket))


async def set_created_at(settings: Settings, image_id: str, created_at: float) -> None:
    """Change an image's time behind the service's back (the service is stopped)."""
    if not settings.gallery.shared:
        with contextlib.closing(sqlite3.connect(storage_folder(settings) / INDEX_FILE)) as index, index:
            index.execute("UPDATE images SET created_at = ? WHERE id = ?", (created_at, image_id))
        return
    connection = await asyncpg.connect(settings.gallery.database)
    try:
        await connection.execute("UPDATE gallery_images SET created_at = $1 WHERE id = $2", created_at, image_id)
    finally:
        await connection.close()


async def copy_row(settings: Settings, image_id: str, new: str) -> None:
    """A second row like `image_id`'s under the id `new`, with no PNG of its own."""
    if not settings.gallery.shared:
        with contextlib.closing(sqlite3.connect(storage_folder(settings) / INDEX_FILE)) as index, index:
            columns = [row[1] for row in index.execute("PRAGMA table_info(images)")]
            values = list(index.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone())
            values[columns.index("id")] = new
            index.execute(f"INSERT INTO images VALUES ({', '.join('?' * len(values))})", values)
        return
    connection = await asyncpg.connect(settings.gallery.database)
    try:
        columns = [row["attname"] for row in await connection.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'gallery_images'::regclass AND attnum > 0 "
            "AND NOT attisdropped AND attname NOT IN ('seq', 'id')"
        )]
        names = ", ".join(columns)
        await connection.execute(
            f"INSERT INTO gallery_images (id, {names}) SELECT $1, {names} FROM gallery_images WHERE id = $2", new, image_id
        )
    finally:
        await connection.close()


def put_object(settings: Settings, name: str, data: bytes) -> None:
    """An object written straight through the S3 API, as a replica killed before its commit leaves one."""
    from tests.s3 import S3Server

    bucket, prefix = bucket_and_prefix(settings.gallery.objects)
    S3Server(settings.gallery.s3_endpoint_url).client().put_object(Bucket=bucket, Key=prefix + name, Body=data)


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
    assert stored_names(base_settings) == []


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
    middle = await generate(client, prompt="a blue whale off the Côte d'ÉTÉ", model="sdxl-turbo")
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
    # Case folds beyond ASCII alike in both stores.
    for text in ("été", "CÔTE"):
        assert [image["id"] for image in (await listing(client, f"?q={text}"))["images"]] == middle["ids"], text
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


async def test_a_page_whose_store_fails_midway_reads_as_incomplete(client, monkeypatch) -> None:
    for _ in range(3):
        await generate(client, num_images=4)
    store, reads = client.app[gallery_key], []
    real = store.read_png

    async def failing_after_the_first_pngs(image_id):
        reads.append(image_id)
        if len(reads) > 8:  # the store goes away once the answer has started
            raise OSError("the disk went away")
        return await real(image_id)

    monkeypatch.setattr(store, "read_png", failing_after_the_first_pngs)
    response = await client.get(f"{GALLERY}?include_data=true", headers=auth())
    assert response.status == 200
    # Never a complete-looking document that is not one: the client is told the answer was cut short.
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


async def test_a_page_with_data_holds_every_image_in_order(client) -> None:
    # More images than the page reads side by side: the page is written a few at a time.
    for _ in range(3):
        await generate(client, num_images=4)
    plain = await listing(client, "?limit=11&offset=1")
    with_data = await listing(client, "?limit=11&offset=1&include_data=true")
    assert [image["id"] for image in with_data["images"]] == [image["id"] for image in plain["images"]]
    assert (with_data["total_count"], with_data["limit"], with_data["offset"]) == (12, 11, 1)
    for image in with_data["images"]:
        stored = await client.get(f"{GALLERY}/{image['id']}.png", headers=auth())
        assert base64.b64decode(image.pop("image_data")) == await stored.read()
    assert with_data["images"] == plain["images"]


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
    assert stored_names(base_settings) == [f"{bobs}.png"]


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

    def spy(owner, name):
        original = getattr(owner, name)

        async def spied(*args, **kwargs):
            lookups.append(name)
            return await original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spied)

    if isinstance(store, GalleryStore):
        spy(store, "_db")
    else:
        spy(store.index, "_use")
        for name in ("read", "delete", "presigned_url"):
            spy(store.objects, name)
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
    assert stored_names(settings) == sorted(f"{image_id}.png" for image_id in ids[1:])


async def test_retention_per_subject_removes_only_that_callers_oldest(make_client, base_settings) -> None:
    settings = base_settings.replace(gallery={"max_images_per_subject": 2})
    client = await make_client(settings)
    bob = auth("bob")
    bobs = [(await generate(client, headers=bob, prompt=f"bob {number}"))["ids"][0] for number in range(2)]
    alices = [(await generate(client, prompt=f"alice {number}"))["ids"][0] for number in range(4)]
    # Alice's volume pushed out her own oldest two, never Bob's older images.
    assert [image["id"] for image in (await listing(client))["images"]] == alices[:1:-1]
    assert [image["id"] for image in (await listing(client, headers=bob))["images"]] == bobs[::-1]
    assert (await client.get(f"{GALLERY}/{alices[0]}", headers=ADMIN)).status == 404
    assert stored_names(settings) == sorted(f"{image_id}.png" for image_id in bobs + alices[2:])


async def test_a_generation_larger_than_the_limits_keeps_every_image_it_answers(make_client, base_settings) -> None:
    settings = base_settings.replace(gallery={"max_images_per_subject": 2, "max_images": 3})
    client = await make_client(settings)
    older = (await generate(client, prompt="older"))["ids"][0]
    four = (await generate(client, prompt="four at once", num_images=4))["ids"]
    # Every id it answered opens; what was there before makes the room.
    for image_id in four:
        assert (await client.get(f"{GALLERY}/{image_id}.png", headers=auth())).status == 200
    assert (await client.get(f"{GALLERY}/{older}", headers=auth())).status == 404
    # The next generation brings the caller back within its limit.
    latest = (await generate(client, prompt="one more"))["ids"][0]
    assert [image["id"] for image in (await listing(client))["images"]] == [latest, four[-1]]


async def test_a_lowered_per_subject_limit_applies_to_every_caller_at_start(make_client, base_settings) -> None:
    first = await make_client(base_settings)
    ids = {
        sub: [(await generate(first, headers=auth(sub), prompt=f"{sub} {number}"))["ids"][0] for number in range(3)]
        for sub in ("alice", "bob")
    }
    await first.close()

    settings = base_settings.replace(gallery={"max_images_per_subject": 1})
    second = await make_client(settings)
    for sub, theirs in ids.items():
        assert [image["id"] for image in (await listing(second, headers=auth(sub)))["images"]] == theirs[-1:]
    assert stored_names(settings) == sorted(f"{theirs[-1]}.png" for theirs in ids.values())


async def test_retention_that_fails_does_not_fail_the_generation_it_follows(make_client, base_settings, caplog) -> None:
    if base_settings.gallery.shared:
        pytest.skip("a file in retention's way is the embedded store's; the shared one logs a failed retention too")
    settings = base_settings.replace(gallery={"max_images": 1})
    client = await make_client(settings)
    first = (await generate(client, prompt="fox 1"))["ids"][0]
    # The file retention must remove cannot be: a folder where it was (a disk in trouble, say).
    path = storage_folder(settings) / "images" / f"{first}.png"
    path.unlink()
    path.mkdir()
    second = (await generate(client, prompt="fox 2"))["ids"][0]  # stored, and answered
    assert (await client.get(f"{GALLERY}/{second}", headers=auth())).status == 200
    assert [image["id"] for image in (await listing(client))["images"]] == [second]
    assert "gallery retention failed" in caplog.text


async def test_retention_by_age_applies_at_start(make_client, base_settings) -> None:
    first = await make_client(base_settings)
    old = (await generate(first, prompt="old"))["ids"][0]
    recent = (await generate(first, prompt="recent"))["ids"][0]
    await first.close()
    await set_created_at(base_settings, old, time.time() - 3 * 86400)

    settings = base_settings.replace(gallery={"max_age_days": 2.0})
    second = await make_client(settings)
    assert [image["id"] for image in (await listing(second))["images"]] == [recent]
    assert stored_names(settings) == [f"{recent}.png"]


async def test_start_repairs_what_a_crash_left(make_client, base_settings) -> None:
    first = await make_client(base_settings)
    kept = (await generate(first))["ids"][0]
    await first.close()

    orphan, in_flight, dangling = f"{new_id()}.png", f"{new_id()}.png", new_id()
    expected = sorted([f"{kept}.png", in_flight])
    if base_settings.gallery.shared:
        # A replica killed after its PUT, before its COMMIT: an object without a row. Objects' times
        # come from the S3 server, so the orphan is made old by waiting out the grace period.
        put_object(base_settings, orphan, b"\x89PNG orphan")
        await asyncio.sleep(SHARED_ORPHAN_GRACE_S + 0.2)
        # Another replica's image between its PUT and its COMMIT: too young to judge.
        put_object(base_settings, in_flight, b"\x89PNG in flight")
    else:
        images = storage_folder(base_settings) / "images"
        an_hour_ago = time.time() - 3600
        # A crash after the rename, before the commit: a file without a row.
        (images / orphan).write_bytes(b"\x89PNG orphan")
        os.utime(images / orphan, (an_hour_ago, an_hour_ago))
        # A crash in the middle of writing: a temporary file.
        temporary = images / f".{new_id()}.png.1234abcd.tmp"
        temporary.write_bytes(b"\x89PNG half")
        os.utime(temporary, (an_hour_ago, an_hour_ago))
        # Another process's image between its rename and its commit: too young to judge.
        (images / in_flight).write_bytes(b"\x89PNG in flight")
    # A row whose PNG is gone.
    await copy_row(base_settings, kept, dangling)

    second = await make_client(base_settings)
    page = await listing(second, headers=ADMIN)
    assert [image["id"] for image in page["images"]] == [kept]
    assert page["total_count"] == 1
    assert (await second.get(f"{GALLERY}/{dangling}", headers=auth())).status == 404
    assert stored_names(base_settings) == expected
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
    for variable, value in (
        ("IMAGINE_GALLERY_MAX_IMAGES", "-1"),
        ("IMAGINE_GALLERY_MAX_IMAGES_PER_SUBJECT", "-1"),
        ("IMAGINE_GALLERY_MAX_AGE_DAYS", "-2"),
    ):
        with pytest.raises(SettingsError):
            load_settings(None, {variable: value})
