"""The shared gallery's PNGs: one object per image in an S3-compatible bucket, through aiobotocore.

Keys are `<prefix>/<id>.png` and only ever built from ids that passed
`is_valid_id`; the sweep lists and removes nothing else under the prefix, so
a bucket shared with other data is safe. A PUT is atomic in S3: an object is
visible whole or not at all, so no temporary names are needed.

Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_SHARED_CREDENTIALS_FILE, an instance
role), never from the settings file.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from imagine.errors import ApiError
from imagine.settings import GallerySettings
from imagine.storage.interface import StoredPng, gallery_unavailable
from imagine.storage.records import is_valid_id

CHUNK_BYTES = 64 * 1024
# The most keys one DeleteObjects request takes.
DELETE_BATCH = 1000
_MISSING = {"NoSuchKey", "404", "NotFound"}
_UNREACHABLE = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError)


def bucket_and_prefix(url: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> ("bucket", "some/prefix/"); the prefix is empty or ends in "/"."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"not an S3 URL (s3://bucket/prefix): {url}")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


def _unavailable(error: BaseException) -> ApiError:
    return gallery_unavailable(f"its object storage cannot be reached: {type(error).__name__}")


def _missing(error: ClientError) -> bool:
    return str(error.response.get("Error", {}).get("Code")) in _MISSING


class S3Objects:
    def __init__(self, settings: GallerySettings) -> None:
        self.bucket, self.prefix = bucket_and_prefix(settings.objects)
        self._endpoint = settings.s3_endpoint_url or None
        self._region = settings.s3_region or None
        self._config = AioConfig(
            connect_timeout=3,
            read_timeout=10,
            retries={"max_attempts": 2, "mode": "standard"},
            s3={"addressing_style": "path" if settings.s3_path_style else "auto"},
        )
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def open(self) -> None:
        session = get_session()
        self._client = await self._stack.enter_async_context(
            session.create_client("s3", endpoint_url=self._endpoint, region_name=self._region, config=self._config)
        )

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    def key(self, image_id: str) -> str:
        if not is_valid_id(image_id):
            raise ValueError("not a gallery id")
        return f"{self.prefix}{image_id}.png"

    def _id_of(self, key: str) -> str | None:
        name = key[len(self.prefix):]
        image_id = name.removesuffix(".png")
        return image_id if key.startswith(self.prefix) and name.endswith(".png") and is_valid_id(image_id) else None

    @property
    def _s3(self) -> Any:
        # aiobotocore generates its client classes at run time: there is no type to name.
        assert self._client is not None, "object store not open"
        return self._client

    # ---- writing ------------------------------------------------------------

    async def put(self, image_id: str, png: bytes) -> None:
        try:
            await self._s3.put_object(Bucket=self.bucket, Key=self.key(image_id), Body=png, ContentType="image/png")
        except _UNREACHABLE as error:
            raise _unavailable(error) from error

    async def put_all(self, ids: Sequence[str], pngs: Sequence[bytes]) -> None:
        """Every object written (side by side), or an error."""
        results = await asyncio.gather(*(self.put(i, png) for i, png in zip(ids, pngs, strict=True)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def delete(self, ids: Sequence[str]) -> None:
        for start in range(0, len(ids), DELETE_BATCH):
            keys = [{"Key": self.key(image_id)} for image_id in ids[start:start + DELETE_BATCH]]
            try:
                answer = await self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
            except _UNREACHABLE as error:
                raise _unavailable(error) from error
            if answer.get("Errors"):
                raise gallery_unavailable(f"its object storage refused to delete: {answer['Errors'][0].get('Code')}")

    # ---- reading ------------------------------------------------------------

    async def read(self, image_id: str) -> bytes | None:
        async with self.stream(image_id) as png:
            if png is None:
                return None
            return b"".join([chunk async for chunk in png.chunks])

    @contextlib.asynccontextmanager
    async def stream(self, image_id: str) -> AsyncIterator[StoredPng | None]:
        """The object's size and its bytes as they arrive (None if there is none); the connection is released on exit."""
        try:
            answer = await self._s3.get_object(Bucket=self.bucket, Key=self.key(image_id))
        except ClientError as error:
            if not _missing(error):
                raise _unavailable(error) from error
            answer = None
        except _UNREACHABLE as error:
            raise _unavailable(error) from error
        if answer is None:
            yield None
            return
        body = answer["Body"]
        try:
            yield StoredPng(int(answer["ContentLength"]), self._chunks(body))
        finally:
            body.close()

    @staticmethod
    async def _chunks(body: Any) -> AsyncIterator[bytes]:
        try:
            async for chunk in body.iter_chunks(CHUNK_BYTES):
                yield chunk
        except _UNREACHABLE as error:
            raise _unavailable(error) from error

    async def presigned_url(self, image_id: str, ttl_s: int) -> str:
        """A URL that fetches the object without credentials for `ttl_s` seconds (signed locally, no request)."""
        return await self._s3.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": self.key(image_id),
                "ResponseContentType": "image/png",
                "ResponseContentDisposition": f'inline; filename="{image_id}.png"',
            },
            ExpiresIn=ttl_s,
        )

    async def ids_between(self, after: str, upto: str | None) -> dict[str, float]:
        """The ids of objects with `after` < id <= `upto` (None: to the end), each with its last write (unix seconds)."""
        paginator = self._s3.get_paginator("list_objects_v2")
        start = {"StartAfter": self.key(after)} if after else {}
        found: dict[str, float] = {}
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix, **start):
                for item in page.get("Contents", []):
                    image_id = self._id_of(item["Key"])
                    if image_id is None:
                        continue
                    if upto is not None and image_id > upto:
                        return found
                    modified: datetime.datetime = item["LastModified"]
                    found[image_id] = modified.timestamp()
        except _UNREACHABLE as error:
            raise _unavailable(error) from error
        return found

    async def ping(self) -> bool:
        try:
            await self._s3.head_bucket(Bucket=self.bucket)
        except _UNREACHABLE:
            return False
        return True
