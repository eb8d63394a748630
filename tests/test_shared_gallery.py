"""The shared gallery across processes: PostgreSQL and an S3-protocol server (moto), both real and on loopback.

Two `imagine serve` replicas behind nginx show one gallery and honour each
other's signed links; a replica killed between its upload and its commit
leaves nothing once the sweep has run; a database or bucket that is down
answers 503 and stores nothing; the embedded gallery migrates over once,
however often the migration runs.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from imagine.cli import main
from imagine.http.app import create_app
from imagine.settings import GallerySettings, Settings, SettingsError, load_settings
from imagine.storage.gallery import GalleryStore, storage_folder
from imagine.storage.postgres_database import SchemaTooNew
from imagine.storage.records import ImageMetadata, ImageRecord, ListQuery, new_id
from imagine.storage.shared_gallery import SharedGallery
from tests.conftest import KEYS, auth, make_token
from tests.postgres import PostgresCluster, postgres  # noqa: F401 - the test run's PostgreSQL, a fixture
from tests.processes import LOOPBACK, free_port, program
from tests.s3 import CREDENTIALS, S3Server, s3  # noqa: F401 - the test run's S3 server, a fixture
from tests.test_deploy import Replica, behind_nginx

GALLERY = "/imagine/gallery"
URL_SECRET = "a URL-signing secret every replica shares"
PNG = b"\x89PNG\r\n\x1a\n not really, but bytes all the same"


@dataclass(frozen=True)
class Shared:
    """One shared gallery's database and bucket."""

    database: str
    bucket: str
    server: S3Server

    def gallery(self, **changes: object) -> GallerySettings:
        values = {
            "database": self.database,
            "objects": f"s3://{self.bucket}/images",
            "s3_endpoint_url": self.server.endpoint,
            "s3_path_style": True,
            **changes,
        }
        return GallerySettings(**values)

    def objects(self) -> list[str]:
        return self.server.keys(self.bucket)

    async def rows(self) -> int:
        connection = await asyncpg.connect(self.database)
        try:
            return await connection.fetchval("SELECT count(*) FROM gallery_images")
        finally:
            await connection.close()


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("IMAGINE_URL_SECRET", URL_SECRET)


@pytest.fixture
def shared(postgres: PostgresCluster, s3: S3Server, credentials: None) -> Shared:  # noqa: F811
    return Shared(postgres.new_database(), s3.new_bucket(), s3)


def metadata(number: int, **changes: object) -> ImageMetadata:
    values = {
        "prompt": f"prompt {number} {'fox' if number % 10 == 0 else 'cat'}",
        "negative_prompt": "",
        "model": "sdxl" if number % 2 else "sdxl-turbo",
        "seed": number,
        "width": 64,
        "height": 64,
        "steps": 1,
        "guidance": 0.0,
        "scheduler": "euler",
        "loras": (),
        "generation_time": 0.1,
        "vram_used": 0.0,
        **changes,
    }
    return ImageMetadata(**values)


# ---- the store ---------------------------------------------------------------


async def test_listing_thousands_uses_indexes_not_table_scans(shared: Shared) -> None:
    store = SharedGallery(shared.gallery())
    await store.open()
    try:
        now = time.time()
        models = ("sdxl", "sdxl-turbo", "sd15-lora", "sdxl-lightning", "leonardo")
        # 20 callers, 5 models, one prompt in ten with a fox: each filter keeps a small share, as in a real gallery.
        records = [
            ImageRecord(
                new_id(),
                f"user{number % 20}",
                now + number,
                metadata(number, model=models[number // 20 % 5], prompt=f"{'a Fox' if number // 100 % 10 == 0 else 'a cat'} {number}"),
            )
            for number in range(6000)
        ]
        # Rows alone: planning needs no objects.
        await store.index.insert(records)
        connection = await asyncpg.connect(shared.database)
        try:
            await connection.execute("VACUUM ANALYZE gallery_images")
        finally:
            await connection.close()
        queries = [
            ListQuery(owner="user0", limit=50, offset=100),
            ListQuery(owner="user0", limit=50, model="sdxl"),
            ListQuery(owner="user0", limit=20, text="FOX"),
            ListQuery(owner=None, limit=200, offset=5900),
            ListQuery(owner=None, limit=50, model="sdxl-turbo"),
            ListQuery(owner=None, limit=50, text="fox 12"),
        ]

        def matches(query: ListQuery) -> list[ImageRecord]:
            kept = [
                record for record in records
                if query.owner in (None, record.owner)
                and query.model in (None, record.metadata.model)
                and (query.text or "").lower() in record.metadata.prompt.lower()
            ]
            return kept[::-1]

        for query in queries:
            page, total = await store.list(query)
            expected = matches(query)
            assert total == len(expected), query
            assert [record.id for record in page] == [record.id for record in expected[query.offset:query.offset + query.limit]]
            statement, count, parameters = store.index.list_statements(query)
            for sql, values in ((statement, [*parameters, query.limit, query.offset]), (count, parameters)):
                if sql == count and not parameters:
                    continue  # how many images there are in all: every row is the answer
                plan = await store.index.explain(sql, *values)
                assert not any("Seq Scan" in line for line in plan), (query, sql, plan)
    finally:
        await store.close()


async def test_a_database_of_the_first_schema_is_migrated_and_its_rows_still_found(shared: Shared) -> None:
    from imagine.storage import postgres_index
    from imagine.storage.postgres_database import VersionedDatabase
    from imagine.storage.records import COLUMNS, record_values

    first = VersionedDatabase(
        shared.database, what="a gallery of the first schema", schema_table="gallery_schema", lock=postgres_index.SCHEMA_LOCK,
        migrations={1: postgres_index._MIGRATIONS[1]}, pool_size=1, unavailable=lambda error: AssertionError(error),
    )  # fmt: skip
    await first.open()
    await first.close()
    record = ImageRecord(new_id(), "alice", time.time(), metadata(0, prompt="A Fox in the Snow"))
    connection = await asyncpg.connect(shared.database)
    try:
        placeholders = ", ".join(f"${n}" for n in range(1, len(COLUMNS) + 1))
        await connection.execute(f"INSERT INTO gallery_images ({', '.join(COLUMNS)}) VALUES ({placeholders})", *record_values(record))
    finally:
        await connection.close()
    index = postgres_index.PostgresIndex(shared.database)  # the index alone: no object to sweep the row for
    await index.open()
    try:
        page, total = await index.list(ListQuery(owner="alice", limit=10, text="fox IN"))
        assert total == 1 and [found.id for found in page] == [record.id]
    finally:
        await index.close()


async def test_a_database_of_a_newer_schema_is_refused_with_a_message(shared: Shared) -> None:
    store = SharedGallery(shared.gallery())
    await store.open()
    await store.close()
    connection = await asyncpg.connect(shared.database)
    try:
        await connection.execute("UPDATE gallery_schema SET version = 99")
    finally:
        await connection.close()
    newer = SharedGallery(shared.gallery())
    with pytest.raises(SchemaTooNew, match="schema 99.*newer version"):
        await newer.open()
    await newer.close()


def test_settings_of_a_shared_gallery_are_checked() -> None:
    settings = load_settings(
        None,
        {
            "IMAGINE_GALLERY_DATABASE": "postgresql://db.internal/imagine",
            "IMAGINE_GALLERY_OBJECTS": "s3://images/gallery",
            "IMAGINE_GALLERY_S3_ENDPOINT_URL": "https://minio.internal:9000",
            "IMAGINE_GALLERY_S3_PATH_STYLE": "true",
            "IMAGINE_GALLERY_REDIRECT": "yes",
        },
    )
    assert settings.gallery.shared and settings.gallery.redirect and settings.gallery.s3_path_style
    for wrong in (
        {"database": "postgresql://db/imagine"},  # no bucket
        {"objects": "s3://bucket"},  # no database
        {"database": "mysql://db/imagine", "objects": "s3://bucket"},
        {"database": "postgresql://db/imagine", "objects": "https://bucket"},
        {"redirect": True},  # nothing to redirect to
        {"database": "postgresql://db/imagine", "objects": "s3://b", "s3_endpoint_url": "minio:9000"},
    ):
        with pytest.raises(SettingsError):
            GallerySettings(**wrong)


def test_a_shared_gallery_needs_a_url_secret_every_replica_shares(base_settings, shared: Shared, monkeypatch) -> None:
    monkeypatch.delenv("IMAGINE_URL_SECRET")
    settings = base_settings.replace(gallery=vars(shared.gallery()))
    with pytest.raises(SettingsError, match="url_secret_file or IMAGINE_URL_SECRET"):
        create_app(settings, keys=KEYS)
    secret_file = base_settings.server.state_dir + "-url-secret"
    Path(secret_file).write_text(URL_SECRET)
    create_app(settings.replace(gallery={"url_secret_file": secret_file}), keys=KEYS)


# ---- failures ----------------------------------------------------------------


def _shared_settings(base_settings: Settings, gallery: GallerySettings) -> Settings:
    return base_settings.replace(gallery=vars(gallery))


async def _generate(client, **body):
    body = {"prompt": "a fox", "steps": 1, "response_format": "json", **body}
    return await client.post("/imagine/generate", json=body, headers=auth())


async def test_with_the_database_stopped_the_gallery_answers_503_and_nothing_is_stored(
    make_client, base_settings, shared: Shared, postgres: PostgresCluster  # noqa: F811
) -> None:
    client = await make_client(_shared_settings(base_settings, shared.gallery()))
    assert (await _generate(client)).status == 200
    postgres.stop()
    try:
        refused = await _generate(client, prompt="never stored")
        assert refused.status == 503
        assert (await refused.json())["error"]["code"] == "SERVICE_UNAVAILABLE"
        assert int(refused.headers["Retry-After"]) > 0
        listing = await client.get(GALLERY, headers=auth())
        assert listing.status == 503 and "Retry-After" in listing.headers
        # Without the gallery a generation still answers.
        assert (await _generate(client, store=False)).status == 200
        health = await (await client.get("/imagine/health", headers=auth())).json()
        assert health["gallery"] == {"backend": "shared", "ok": False}
        assert health["status"] == "degraded"
    finally:
        postgres.start()
    page = await (await client.get(GALLERY, headers=auth())).json()
    assert [image["prompt"] for image in page["images"]] == ["a fox"]
    assert len(shared.objects()) == 1  # the refused image's object was removed again
    health = await (await client.get("/imagine/health", headers=auth())).json()
    assert health["gallery"] == {"backend": "shared", "ok": True}


async def test_with_the_bucket_unreachable_a_stored_generation_fails_and_leaves_no_row(
    make_client, base_settings, shared: Shared
) -> None:
    nowhere = f"http://{LOOPBACK}:{free_port()}"
    client = await make_client(_shared_settings(base_settings, shared.gallery(s3_endpoint_url=nowhere)))
    refused = await _generate(client)
    assert refused.status == 503 and "Retry-After" in refused.headers
    assert (await _generate(client, store=False)).status == 200
    assert (await (await client.get(GALLERY, headers=auth())).json())["total_count"] == 0
    assert await shared.rows() == 0


# ---- crashes -----------------------------------------------------------------

# A replica's add up to its object's upload, then the replica dies (SIGKILL) before the row's commit.
KILLED_BETWEEN_UPLOAD_AND_COMMIT = """
import asyncio, json, os, signal, sys
from imagine.settings import GallerySettings
from imagine.storage.shared_gallery import SharedGallery

async def upload_then_die():
    store = SharedGallery(GallerySettings(**json.loads(sys.argv[1])))
    await store.open()
    await store.objects.put(sys.argv[2], b"an image whose row never came")
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(upload_then_die())
"""


async def test_a_replica_killed_between_upload_and_commit_leaves_nothing_once_swept(shared: Shared) -> None:
    # Long enough that the first sweep below comes within it even on a loaded machine.
    grace_s = 4.0
    gallery = shared.gallery(orphan_grace_s=grace_s)
    store = SharedGallery(gallery)
    await store.open()
    try:
        (kept,) = await store.add("alice", [(PNG, metadata(1))])
        lost = new_id()
        environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        killed = await asyncio.create_subprocess_exec(
            sys.executable, "-c", KILLED_BETWEEN_UPLOAD_AND_COMMIT, json.dumps(vars(gallery)), lost, env=environment
        )
        assert await killed.wait() == -9
        assert sorted(shared.objects()) == sorted([f"images/{kept}.png", f"images/{lost}.png"])
        # Younger than the grace: it may be an add on its way to its commit, and is kept.
        assert (await store.sweep()).orphan_files == 0
        assert len(shared.objects()) == 2
        await asyncio.sleep(grace_s + 0.2)
        report = await store.sweep()
        assert (report.orphan_files, report.dangling_rows) == (1, 0)
        assert shared.objects() == [f"images/{kept}.png"]
        records, total = await store.list(ListQuery(owner=None, limit=10))
        assert total == 1 and [record.id for record in records] == [kept]
        assert await store.read_png(kept) == PNG
    finally:
        await store.close()


# ---- moving over -------------------------------------------------------------


def test_migrating_twice_copies_each_image_once(base_settings, shared: Shared, monkeypatch, capsys) -> None:
    state = base_settings.server.state_dir
    embedded = GalleryStore(storage_folder(base_settings))

    async def fill() -> list[str]:
        await embedded.open()
        try:
            ids = await embedded.add("alice", [(PNG + b"1", metadata(1)), (PNG + b"2", metadata(2))])
            return ids + await embedded.add("bob", [(PNG + b"3", metadata(3, loras=(("pixel-art", 0.8),)))])
        finally:
            await embedded.close()

    ids = asyncio.run(fill())
    monkeypatch.setenv("IMAGINE_SERVER_STATE_DIR", state)
    monkeypatch.setenv("IMAGINE_GALLERY_S3_ENDPOINT_URL", shared.server.endpoint)
    monkeypatch.setenv("IMAGINE_GALLERY_S3_PATH_STYLE", "true")
    command = ["gallery", "migrate", "--to", shared.database, "--objects", f"s3://{shared.bucket}/images"]
    assert main(command) == 0
    assert "Copied 3 image(s)" in capsys.readouterr().out
    assert main(command) == 0
    assert "Copied 0 image(s) into the shared gallery; 3 were there already" in capsys.readouterr().out
    assert asyncio.run(shared.rows()) == 3 and len(shared.objects()) == 3

    async def compare() -> None:
        await embedded.open()
        target = SharedGallery(shared.gallery())
        await target.open()
        try:
            before, _ = await embedded.list(ListQuery(owner=None, limit=10))
            after, _ = await target.list(ListQuery(owner=None, limit=10))
            assert after == before and {record.id for record in after} == set(ids)
            for record in after:
                assert await target.read_png(record.id) == await embedded.read_png(record.id)
        finally:
            await target.close()
            await embedded.close()

    asyncio.run(compare())


# ---- serving -----------------------------------------------------------------


async def test_with_redirect_the_png_comes_straight_from_the_bucket(make_client, base_settings, shared: Shared) -> None:
    client = await make_client(_shared_settings(base_settings, shared.gallery(redirect=True)))
    result = await (await _generate(client)).json()
    image_id = result["ids"][0]
    redirect = await client.get(f"{GALLERY}/{image_id}.png", headers=auth(), allow_redirects=False)
    assert redirect.status == 307
    assert redirect.headers["Cache-Control"] == "no-store"
    location = redirect.headers["Location"]
    assert location.startswith(shared.server.endpoint) and "Signature=" in location
    async with aiohttp.ClientSession() as session, session.get(location) as direct:
        assert direct.status == 200 and direct.content_type == "image/png"
        assert await direct.read() == base64.b64decode(result["images"][0].split(",", 1)[1])
    # Another caller's image is still 404, never a link.
    assert (await client.get(f"{GALLERY}/{image_id}.png", headers=auth("bob"), allow_redirects=False)).status == 404


async def test_without_redirect_the_replica_streams_the_object(make_client, base_settings, shared: Shared) -> None:
    client = await make_client(_shared_settings(base_settings, shared.gallery()))
    result = await (await _generate(client, width=128, height=128)).json()
    response = await client.get(f"{GALLERY}/{result['ids'][0]}.png", headers=auth())
    assert response.status == 200 and response.content_type == "image/png"
    png = await response.read()
    assert int(response.headers["Content-Length"]) == len(png) and png.startswith(b"\x89PNG")
    head = await client.head(f"{GALLERY}/{result['ids'][0]}.png", headers=auth())
    assert head.status == 200 and int(head.headers["Content-Length"]) == len(png)


# ---- two replicas ------------------------------------------------------------

REPLICA_CONFIG = """\
[ratelimit]
global_burst = 100000
ip_burst = 100000
subject_burst = 100000

[gallery]
database = "{database}"
objects = "s3://{bucket}/images"
s3_endpoint_url = "{endpoint}"
s3_path_style = true
url_secret_file = "{secret_file}"

[models.sdxl-turbo]
min_size = 64
default_size = 64
"""


@dataclass
class Cluster:
    nginx_port: int
    replicas: list[Replica]

    def request(self, method: str, path: str, *, port: int | None = None, headers=None, body=None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(LOOPBACK, port or self.nginx_port, timeout=120)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, demo_folder, postgres, s3) -> Iterator[Cluster]:  # noqa: F811
    program("nginx", "/usr/sbin/nginx")
    folder = tmp_path_factory.mktemp("shared-gallery")
    (folder / "url-secret").write_text(URL_SECRET)
    config = folder / "imagine.toml"
    config.write_text(
        REPLICA_CONFIG.format(
            database=postgres.new_database(), bucket=s3.new_bucket(), endpoint=s3.endpoint, secret_file=folder / "url-secret"
        )
    )
    with pytest.MonkeyPatch.context() as patch:
        # The replicas inherit the environment: the standard AWS variables carry their credentials.
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        replicas = [Replica(folder / f"replica-{number}", config, demo_folder) for number in range(2)]
    try:
        for replica in replicas:
            replica.wait_ready()
        with behind_nginx(folder, replicas) as nginx_port:
            yield Cluster(nginx_port, replicas)
    finally:
        for replica in replicas:
            replica.stop()


TOKEN = {"Authorization": f"Bearer {make_token('carol')}", "Content-Type": "application/json"}


def test_two_replicas_behind_nginx_show_one_gallery(cluster: Cluster) -> None:
    first, second = (replica.port for replica in cluster.replicas)
    body = {"prompt": "a lighthouse", "model": "sdxl-turbo", "response_format": "json"}
    ids = []
    for port in (first, second, first):
        status, answer = cluster.request("POST", "/imagine/generate", port=port, headers=TOKEN, body=json.dumps(body))
        assert status == 200, answer
        ids += json.loads(answer)["ids"]
    listings = []
    for port in (None, None, None, None, first, second):  # four through nginx (both replicas), one from each
        status, answer = cluster.request("GET", f"{GALLERY}?limit=10", port=port, headers=TOKEN)
        assert status == 200
        listings.append(json.loads(answer))
    assert all(listing == listings[0] for listing in listings)
    assert [image["id"] for image in listings[0]["images"]] == ids[::-1]
    # Deleted through one replica: gone on the other, PNG and all.
    assert cluster.request("DELETE", f"{GALLERY}/{ids[0]}", port=second, headers=TOKEN)[0] == 204
    assert cluster.request("GET", f"{GALLERY}/{ids[0]}.png", port=first, headers=TOKEN)[0] == 404


def test_a_link_signed_by_one_replica_opens_on_the_other(cluster: Cluster) -> None:
    first, second = (replica.port for replica in cluster.replicas)
    body = {"prompt": "a fox", "model": "sdxl-turbo", "size": "64x64", "response_format": "url"}
    status, answer = cluster.request("POST", "/imagine/v1/images/generations", port=first, headers=TOKEN, body=json.dumps(body))
    assert status == 200, answer
    url = json.loads(answer)["data"][0]["url"]
    path = url.split(f":{first}", 1)[1]
    status, png = cluster.request("GET", path, port=second)  # no token: the link is the permission
    assert status == 200 and png.startswith(b"\x89PNG")
    tampered = path.replace("signature=", "signature=x")
    assert cluster.request("GET", tampered, port=second)[0] == 403
