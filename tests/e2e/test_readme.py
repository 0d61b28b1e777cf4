"""The Python snippets of README and the ``docs/`` pages run as shown, and every app they build answers a chat request.

Each fenced ``python`` block is executed as a module of its own; a block whose first line is
``# (continues the snippet above)`` runs together with the block before it (on the same page). Then
each app the snippet built (``app``, and ``signed`` in the auth page) gets ``POST`` requests on its
chat paths through Starlette's ``TestClient`` (lifespan included). A snippet that is a client of the
served default (``http://127.0.0.1:8000``) runs against a real server of SmolLM2 on a free port. A
snippet that loads SmolLM2, or is its client, is marked ``smollm2``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from live_server import serve_in_thread
from starlette.testclient import TestClient

from chatstream_asgi import ChatStream
from chatstream_asgi.web.app import PAGE_CSP, create_app

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
CONTINUES = "# (continues the snippet above)"
SERVED = "http://127.0.0.1:8000"  # where README's serve command listens
BODY = json.dumps({"user_input": "Hi", "generation_params": {"max_new_tokens": 8}}).encode()


def snippets(page: Path = README) -> list[tuple[str, str]]:
    """``(where, code)`` of each runnable snippet of ``page``, continuations joined to their start."""
    text = page.read_text()
    found: list[tuple[str, str]] = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, re.MULTILINE | re.DOTALL):
        where = f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 2}"
        code = match[1]
        if code.startswith(CONTINUES):
            assert found, f"{where} continues nothing"
            found[-1] = (found[-1][0], found[-1][1] + "\n" + code)
        else:
            found.append((where, code))
    return found


def _param(where: str, code: str) -> Any:
    loads_smollm2 = re.search(r'^[^#\n]*from_pretrained\("smollm2"\)', code, re.MULTILINE)  # not in a comment
    marks = [pytest.mark.smollm2] if loads_smollm2 or _is_client(code) else []
    return pytest.param(code, id=where, marks=marks)


def _is_client(code: str) -> bool:
    """A snippet that calls the served default and builds no app of its own."""
    builds = re.search(r"^\w+\s*=\s*(ChatStream|create_app|\w+\(.*\bChatStream)", code, re.MULTILINE)
    return SERVED in code and not builds


def _post(client: TestClient, path: str, headers: dict[str, str] | None = None, body: bytes = BODY) -> Any:
    return client.post(path, content=body, headers={"content-type": "application/json", **(headers or {})})


def test_readme_and_the_docs_have_snippets() -> None:
    assert len(snippets()) >= 6
    assert sum(len(snippets(page)) for page in PAGES) >= 15


@pytest.mark.parametrize("code", [_param(where, code) for page in PAGES for where, code in snippets(page)])
def test_snippet_runs_and_its_apps_answer(
    code: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setenv("CHATSTREAM_SESSION_SECRET", "readme-secret")
    module = types.ModuleType("readme_snippet")  # a module of its own, as if saved to a file and imported
    monkeypatch.setitem(sys.modules, module.__name__, module)
    if _is_client(code):  # a client of the served default: a real server of SmolLM2
        from chatstream_asgi.engines.transformers import TransformersEngine

        model = request.getfixturevalue("smollm2_engine")
        engine = TransformersEngine(model.model, model.tokenizer, model.device, compile_mode=None)
        with serve_in_thread(create_app(ChatStream(engine, max_new_tokens=256, session_secret="s"))) as url:
            exec(compile(code.replace(SERVED, url), "docs snippet", "exec"), module.__dict__)
        return
    assert not re.search(r"(localhost|127\.0\.0\.1):\d", code.replace(SERVED, "")), "a client calls " + SERVED
    exec(compile(code, "README.md snippet", "exec"), module.__dict__)
    namespace = module.__dict__
    apps = {name: namespace[name] for name in ("app", "signed") if name in namespace}
    if "pool" in namespace:  # remote engines on hosts that do not exist: it builds, and serves /get_load
        with TestClient(apps["app"]) as client:
            assert client.get("/get_load").status_code == 200
        return
    if "chat_app" in namespace:  # a Ray Serve application: it builds here; tests/e2e/test_ray_serve.py runs one
        assert type(apps["app"]).__name__ == "Application"
        return
    if "TokenBackend" in namespace:  # the auth section: refused without credentials, served with them
        signature = hmac.new(namespace["SECRET"], BODY, hashlib.sha256).hexdigest()
        with TestClient(apps["app"]) as client, TestClient(apps["signed"]) as signed:  # one ChatStream: one lifespan
            assert _post(client, "/chat_stream").status_code == 401
            assert _post(client, "/chat_stream", {"authorization": "Bearer s3cret"}).text
            assert _post(signed, "/chat_stream", {"x-signature": "forged"}).status_code == 401
            reply = _post(signed, "/chat_stream", {"x-signature": signature})
            assert reply.status_code == 200 and reply.text
        return
    if not apps:
        return  # a snippet that builds no app (a loop over an engine): that it ran is what is checked
    assert list(apps) == ["app"], "a snippet that builds an app calls it app"
    paths = re.findall(r'@app\.post\("([^"]+)"\)', code) or ["/chat_stream"]
    if "is_mount=True" in code:
        paths = ["/chat" + path for path in paths]
    with TestClient(apps["app"]) as client:
        for path in paths:
            reply = _post(client, path)
            assert reply.status_code == 200, (path, reply.text)
            assert reply.text, path


def test_the_docs_quote_the_page_csp() -> None:
    assert f"`Content-Security-Policy: {PAGE_CSP}`" in (ROOT / "docs" / "endpoints-and-formats.md").read_text()


def test_readme_stays_short_and_its_links_resolve() -> None:
    """README sells and starts (at most 400 lines); every page it links to exists, except the pages other
    branches add (listed here until they land)."""
    text = README.read_text()
    assert len(text.splitlines()) <= 400
    pending = {"docs/engines-coverage.md", "docs/fairness.md", "docs/quantization.md"}
    links = set(re.findall(r"\]\(([^)#]+\.md)", text))
    assert {"docs/frameworks.md", "docs/auth.md", "docs/endpoints-and-formats.md", "docs/configuration.md"} <= links
    assert sorted(link for link in links - pending if not (ROOT / link).exists()) == []
