"""Standard Webhooks signatures (`webhook-id`, `webhook-timestamp`, `webhook-signature`), through the `standardwebhooks` package."""

from __future__ import annotations

import base64
import binascii
import datetime
from pathlib import Path

from standardwebhooks.webhooks import Webhook

from imagine.settings import SettingsError, WebhookSettings

# The specification asks for secrets of 24 to 64 random bytes.
MIN_SECRET_BYTES = 24


def load_secret(settings: WebhookSettings) -> str:
    """`webhooks.secret` (IMAGINE_WEBHOOKS_SECRET), else the file `webhooks.secret_file`: "whsec_" + base64."""
    secret = settings.secret.strip()
    if not secret and settings.secret_file:
        try:
            secret = Path(settings.secret_file).expanduser().read_text().strip()
        except OSError as error:
            raise SettingsError(f"cannot read webhooks.secret_file {settings.secret_file}: {error.strerror}") from None
    if not secret:
        raise SettingsError(
            "webhooks.allowed_hosts is set but there is no signing secret: set IMAGINE_WEBHOOKS_SECRET or "
            'webhooks.secret_file to "whsec_" + base64 of 24-64 random bytes'
        )
    return secret


class Signer:
    def __init__(self, secret: str) -> None:
        try:
            key = base64.b64decode(secret.removeprefix("whsec_") + "==", validate=False)
        except (binascii.Error, ValueError):
            raise SettingsError('the webhook secret must be "whsec_" followed by base64') from None
        if len(key) < MIN_SECRET_BYTES:
            raise SettingsError(f"the webhook secret must decode to at least {MIN_SECRET_BYTES} bytes")
        self._webhook = Webhook(key)

    def headers(self, message_id: str, timestamp: int, body: str) -> dict[str, str]:
        """The three headers for one attempt: the id stays the same across retries, the timestamp is the attempt's."""
        moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self._webhook.sign(message_id, moment, body),
        }
