"""Seed 004's own Python client samples, run verbatim against the service through an authenticating gateway.

The samples call `http://localhost:8000/...` with no token, as seed 004 had no
authentication. A user who keeps such clients puts a gateway in front that
holds the token for them: here real nginx, reached as the samples' HTTP proxy
(`HTTP_PROXY`), adds `Authorization` and maps seed 004's paths onto the base
path. So not a character of the samples changes. The service and the fake
Ollama run on one event loop in a thread; each sample runs in its own
Python process, as a user's script would.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

from imagine.http.app import create_app
from imagine.settings import Settings, load_settings
from imagine.devtools.demo_models import demo_settings
from tests.conftest import KEYS, make_token
from tests.fake_ollama import FakeOllama
from tests.processes import LOOPBACK, free_port, nginx

# ---- the samples, as seed 004's API document prints them ------------------------------------------

CHAT_SAMPLE = '''\
import requests

# Start a conversation
response = requests.post(
    "http://localhost:8000/chat",
    json={
        "message": "Can you help me write a prompt for a fantasy artwork?",
        "session_id": "art_consultation",
        "temperature": 0.8
    }
)

if response.status_code == 200:
    result = response.json()
    print(f"AI: {result['response']}")
    print(f"Session: {result['session_id']}")
'''

ANALYZE_SAMPLE = '''\
import requests
import base64
from PIL import Image
import io

# Prepare image
image = Image.open("your_image.jpg")
buffer = io.BytesIO()
image.save(buffer, format='PNG')
image_base64 = base64.b64encode(buffer.getvalue()).decode('utf-8')

# Analyze image
response = requests.post(
    "http://localhost:8000/analyze-image",
    json={
        "image_base64": image_base64,
        "question": "What objects do you see in this image?"
    }
)

if response.status_code == 200:
    result = response.json()
    print(f"Analysis: {result['analysis']}")
'''

CLIENT_SAMPLE = '''\
import requests
import base64
import json
from PIL import Image
import io

class IllustriousAIClient:
    def __init__(self, base_url="http://localhost:8000"):
        self.base_url = base_url
    
    def check_status(self):
        """Check server status and model availability."""
        response = requests.get(f"{self.base_url}/status")
        return response.json()
    
    def generate_image(self, prompt, **kwargs):
        """Generate an image with SDXL."""
        data = {"prompt": prompt, **kwargs}
        response = requests.post(
            f"{self.base_url}/generate-image",
            json=data
        )
        
        if response.status_code == 200:
            result = response.json()
            if result['success']:
                return base64.b64decode(result['image_base64'])
        return None
    
    def chat(self, message, session_id="default", **kwargs):
        """Chat with the AI."""
        data = {
            "message": message,
            "session_id": session_id,
            **kwargs
        }
        response = requests.post(f"{self.base_url}/chat", json=data)
        
        if response.status_code == 200:
            return response.json()
        return None
    
    def analyze_image(self, image_path, question=None):
        """Analyze an image."""
        image = Image.open(image_path)
        buffer = io.BytesIO()
        image.save(buffer, format='PNG')
        image_base64 = base64.b64encode(buffer.getvalue()).decode('utf-8')
        
        data = {"image_base64": image_base64}
        if question:
            data["question"] = question
            
        response = requests.post(f"{self.base_url}/analyze-image", json=data)
        
        if response.status_code == 200:
            return response.json()['analysis']
        return None

# Usage example
client = IllustriousAIClient()

# Check if everything is running
status = client.check_status()
print(f"Server status: {status}")

# Generate an image
image_data = client.generate_image(
    "a beautiful sunset over the ocean",
    steps=25,
    guidance=7.5
)

if image_data:
    with open("sunset.png", "wb") as f:
        f.write(image_data)
    print("Image saved as sunset.png")

# Chat with AI
chat_response = client.chat(
    "Create a prompt for a fantasy landscape",
    session_id="my_session"
)

if chat_response:
    print(f"AI: {chat_response['response']}")
'''

# The gateway: every request that comes to it (as a proxy, in absolute form) goes to the base path, with the token.
GATEWAY = """\
server {{
    listen {host}:{port};
    location / {{
        proxy_pass http://{host}:{service_port}/imagine/;
        proxy_set_header Authorization "Bearer {token}";
    }}
}}
"""


def sample_settings(state: Path, demo_folder: Path, ollama_url: str) -> Settings:
    settings = demo_settings(load_settings(None, {"IMAGINE_SERVER_STATE_DIR": str(state)}), demo_folder)
    # seed 004's /generate-image runs sdxl at its default size: small here.
    small = {"min_size": 64, "default_size": 64}
    options = {name: {**table, **small} for name, table in settings.models.options.items()}
    return settings.replace(models={"options": options}, assistant={"ollama_url": ollama_url, "timeout_s": 10.0})


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, demo_folder: Path) -> Iterator[str]:
    """The proxy URL the samples use: nginx, in front of the service (and its fake Ollama) on a loop of their own."""
    loop = asyncio.new_event_loop()
    ollama_runner = web.AppRunner(FakeOllama().app())
    ollama_port, service_port = free_port(), free_port()
    loop.run_until_complete(ollama_runner.setup())
    loop.run_until_complete(web.TCPSite(ollama_runner, LOOPBACK, ollama_port).start())
    settings = sample_settings(tmp_path_factory.mktemp("seed004-state"), demo_folder, f"http://{LOOPBACK}:{ollama_port}")
    runner = web.AppRunner(create_app(settings, keys=KEYS))
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, LOOPBACK, service_port).start())
    thread = threading.Thread(target=loop.run_forever, name="seed004-service", daemon=True)
    thread.start()
    port = free_port()
    site = GATEWAY.format(host=LOOPBACK, port=port, service_port=service_port, token=make_token("seed004", "generate"))
    try:
        with nginx(tmp_path_factory.mktemp("seed004-nginx"), site) as nginx_port:
            yield f"http://{LOOPBACK}:{nginx_port}"
    finally:
        for cleanup in (runner.cleanup(), ollama_runner.cleanup()):
            asyncio.run_coroutine_threadsafe(cleanup, loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


def run_sample(code: str, proxy: str, folder: Path) -> str:
    environment = {
        name: value for name, value in os.environ.items() if name.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }
    # requests takes the proxy from the environment, and would skip it for hosts listed in NO_PROXY.
    environment |= {"HTTP_PROXY": proxy, "http_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=folder, env=environment, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_chat_sample(gateway, tmp_path) -> None:
    printed = run_sample(CHAT_SAMPLE, gateway, tmp_path)
    assert printed == (
        "AI: You said: Can you help me write a prompt for a fantasy artwork? I remember 0 earlier messages.\n"
        "Session: art_consultation\n"
    )


def test_the_image_analysis_sample(gateway, tmp_path) -> None:
    Image.new("RGB", (96, 64), (250, 10, 10)).save(tmp_path / "your_image.jpg", quality=95)
    printed = run_sample(ANALYZE_SAMPLE, gateway, tmp_path)
    assert printed == "Analysis: A 96x64 PNG image, mostly red. You asked: What objects do you see in this image?\n"


def test_the_complete_client_sample(gateway, tmp_path) -> None:
    printed = run_sample(CLIENT_SAMPLE, gateway, tmp_path).splitlines()
    # The service looked at the fake Ollama when it started, long before this script asked.
    assert printed[0].startswith("Server status: {") and "'ollama': True, 'multimodal': True" in printed[0]
    assert printed[1:] == [
        "Image saved as sunset.png",
        "AI: You said: Create a prompt for a fantasy landscape I remember 0 earlier messages.",
    ]
    assert Image.open(tmp_path / "sunset.png").size == (64, 64)
