"""`zoo serve`'s JSON API answers exactly what `zoo ... --json` prints for the same arguments, refuses bad
input with the CLI's message and the right status while the registry stays unchanged, and asks for a
token once it is bound beyond this machine."""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from PIL import Image
from starlette.testclient import TestClient

import modelzoo
from modelzoo.serve import ServeSettings, create_app


def cli_json(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> object:
    result = zoo_cli(capsys, home, *args, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def cli_error(capsys: pytest.CaptureFixture[str], home: Path, *args: str) -> str:
    result = zoo_cli(capsys, home, *args)
    assert result.code == 2 and result.err.startswith("error: "), result
    return result.err.removeprefix("error: ").rstrip("\n")


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(side: int = 40_000) -> bytes:
    """A valid PNG header declaring side x side pixels (far over Pillow's limit) in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def small_home(tmp_path_factory: pytest.TempPathFactory, tiny_gan_dir: Path) -> Path:
    """A GAN, an edited child of it with an alias that moved once, and tags."""
    home = tmp_path_factory.mktemp("serve-small") / "zoo"
    zoo = modelzoo.open(home)
    v1 = zoo.import_(tiny_gan_dir, "gan", tags={"team": "vision"})
    weights = zoo.tensors(v1.ref)
    name = next(n for n, t in weights.items() if t.dtype == torch.float32 and t.ndim == 2)
    zoo.set_alias(v1.ref, "prod")
    v2 = zoo.commit(v1.ref, {name: weights[name] * 0.5}, method="scale", params={"factor": 0.5})
    zoo.set_alias(v2.ref, "prod")
    zoo.tag(v2.ref, "stage", "edited")
    return home


@pytest.fixture
def client(small_home: Path) -> TestClient:
    return TestClient(create_app(modelzoo.open(small_home)))


@pytest.mark.parametrize(("route", "args"), [
    ("/api/models", ["list"]),
    ("/api/models?family=gan&tag=team=vision", ["list", "--family", "gan", "--tag", "team=vision"]),
    ("/api/models?method=scale", ["list", "--method", "scale"]),
    ("/api/models?descendant_of=gan@1&since=2000-01-01", ["list", "--descendant-of", "gan@1", "--since", "2000-01-01"]),
    ("/api/models?family=lm", ["list", "--family", "lm"]),
    ("/api/versions/gan@1", ["show", "gan@1"]),
    ("/api/versions/gan@prod", ["show", "gan@prod"]),
    ("/api/versions/gan", ["show", "gan"]),
    ("/api/lineage/gan@1", ["lineage", "gan@1"]),
    ("/api/lineage/gan@2", ["lineage", "gan@2"]),
    ("/api/diff/gan@1/gan@prod", ["diff", "gan@1", "gan@prod"]),
])
def test_api_route_answers_what_the_cli_prints_as_json(client, small_home, capsys, route, args):
    response = client.get(route)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json() == cli_json(capsys, small_home, *args)


def test_sample_grid_holds_the_images_zoo_sample_draws(client, small_home, tmp_path, capsys):
    response = client.get("/api/versions/gan@2/samples?seed=3&n=3")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert zoo_cli(capsys, small_home, "sample", "gan@2", "--seed", "3", "--n", "3", "--out", str(tmp_path / "s"),
                   "--grid", str(tmp_path / "grid.png")).code == 0
    served = np.asarray(Image.open(io.BytesIO(response.content)))
    assert np.array_equal(served, np.asarray(Image.open(tmp_path / "grid.png")))
    parent = client.get("/api/versions/gan@1/samples?seed=3&n=3").content
    assert not np.array_equal(served, np.asarray(Image.open(io.BytesIO(parent))))  # the edit shows
    assert client.get("/api/versions/gan@2/samples?seed=3&n=3").content == response.content


def test_bad_requests_get_their_status_and_the_cli_message_and_change_nothing(client, small_home, capsys):
    before = snapshot(small_home)
    unknown = client.get("/api/versions/nothing@1")
    assert unknown.status_code == 404
    assert unknown.json() == {"error": cli_error(capsys, small_home, "show", "nothing@1")}
    assert client.get("/api/lineage/gan@9").json() == {"error": cli_error(capsys, small_home, "lineage", "gan@9")}
    assert client.get("/api/diff/gan@1/gan@x1").status_code == 404
    bad_date = client.get("/api/models?since=yesterday")
    assert bad_date.status_code == 400
    assert bad_date.json() == {"error": cli_error(capsys, small_home, "list", "--since", "yesterday")}
    for escape in ("/api/versions/..%2F..%2Fregistry.db", "/api/versions/%2E%2E", "/api/lineage/..%2Fblobs",
                   "/thumbnails/..%2F..%2Fregistry.db", "/thumbnails/%2E%2E", "/static/..%2F..%2Fapp.py",
                   "/api/versions/%2E%2E%2Fgan/samples"):
        response = client.get(escape)
        assert response.status_code == 404 and "error" in response.json(), escape
        assert b"CREATE TABLE" not in response.content and b"def create_app" not in response.content
    for query, message in (("seed=-1", "seeds must lie in"), ("n=0", "--n must be at least 1"),
                           ("n=500", "more than the 16"), ("seed=x", "invalid seed")):
        response = client.get(f"/api/versions/gan@1/samples?{query}")
        assert response.status_code == 400 and message in response.json()["error"], query
    assert client.get("/api/search?text=a&top_k=0").status_code == 400
    assert client.get("/api/search").json() == {"error": cli_error(capsys, small_home, "search")}
    assert client.post("/api/models").status_code == 405
    assert snapshot(small_home) == before
    assert client.get("/api/models").status_code == 200  # still serving


def test_uploads_must_be_small_images(client, small_home):
    before = snapshot(small_home)
    not_image = client.post("/api/search", files={"image": ("notes.png", b"this is text, not a PNG", "image/png")})
    assert not_image.status_code == 400
    assert not_image.json()["error"].startswith("cannot read image image upload 'notes.png'")
    bomb = client.post("/api/search", files={"sketch": ("bomb.png", bomb_png(), "image/png")})
    assert bomb.status_code == 400 and "too large to search with" in bomb.json()["error"]
    huge = client.post("/api/search", files={"image": ("big.png", b"\0" * (50 * 2**20), "image/png")})
    assert huge.status_code == 400 and "larger than this server's limit of 10 MB" in huge.json()["error"]
    small_limit = TestClient(create_app(modelzoo.open(small_home), ServeSettings(max_upload_bytes=1000)))
    image = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert len(image) > 1000
    assert small_limit.post("/api/search", files={"image": ("q.png", image, "image/png")}).status_code == 400
    # A real image within the limit gets as far as search, which has no index here: the CLI's message.
    indexed = client.post("/api/search", files={"image": ("q.png", image, "image/png")})
    assert indexed.status_code == 400 and indexed.json()["error"].startswith("nothing is indexed yet")
    assert snapshot(small_home) == before


def test_a_non_local_bind_needs_a_token_on_every_request(small_home, capsys):
    refused = zoo_cli(capsys, small_home, "serve", "--host", "0.0.0.0")
    assert refused.code == 2 and "--token" in refused.err
    gated = TestClient(create_app(modelzoo.open(small_home), ServeSettings(host="0.0.0.0", token="s3cret")))
    for path in ("/api/models", "/", "/v/gan@1", "/static/app.js", "/api/versions/gan@1/samples"):
        assert gated.get(path).status_code == 401, path
        assert gated.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
    assert gated.get("/api/models", headers={"Authorization": "Bearer s3cret"}).json() == cli_json(
        capsys, small_home, "list")
    assert gated.get("/login?token=wrong", follow_redirects=False).status_code == 401
    assert gated.get("/api/models").status_code == 401
    login = gated.get("/login?token=s3cret", follow_redirects=False)
    assert login.status_code == 303 and "httponly" in login.headers["set-cookie"].lower()
    assert gated.get("/api/models").status_code == 200  # the cookie login set now travels with each request


def test_pages_show_versions_lineage_and_models(client):
    page = client.get("/v/gan@2", headers={"Accept": "text/html"})
    assert page.status_code == 200
    html = page.text
    assert '<svg xmlns="http://www.w3.org/2000/svg" class="lineage"' in html
    assert 'href="/v/gan@1"' in html and "marker-end" in html  # the parent, linked and drawn with an arrow
    assert "/api/versions/gan%402/samples?seed=0&amp;n=4" in html and "/api/versions/gan%401/samples" in html
    assert "gan@prod" in html and re.findall(r"<li>[^<]*→ (gan@\d)</li>", html) == ["gan@1", "gan@2"]
    assert "scale" in html and "factor" in html and "1 changed" in html and "stage=edited" in html
    models = client.get("/models?family=gan", headers={"Accept": "text/html"}).text
    assert 'href="/v/gan"' in models and "team=vision" in models
    missing = client.get("/v/nothing", headers={"Accept": "text/html"})
    assert missing.status_code == 404 and "no model named" in missing.text
    assert "<canvas" in client.get("/", headers={"Accept": "text/html"}).text


QUICK_WORLD_SEARCHES = [
    ("text=a+red+circle", ["--text", "a red circle"]),
    ("text=a+blue+square&top_k=2&family=gan", ["--text", "a blue square", "--top-k", "2", "--family", "gan"]),
    ("like=shapes-gan-red-circle@1&top_k=3", ["--like", "shapes-gan-red-circle@1", "--top-k", "3"]),
]


@pytest.mark.slow
def test_every_api_route_equals_the_cli_json_on_the_quick_world(quick_world, tmp_path, capsys):
    client = TestClient(create_app(modelzoo.open(quick_world)))
    before = snapshot(quick_world)
    edited = next(m for m in cli_json(capsys, quick_world, "list") if m["name"] != "shapes-sd"
                  and m["family"] == "diffusion")["name"]
    routes = [
        ("/api/models", ["list"]),
        ("/api/models?tag=world=shapes&family=gan", ["list", "--tag", "world=shapes", "--family", "gan"]),
        (f"/api/versions/{edited}", ["show", edited]),
        ("/api/lineage/shapes-sd@1", ["lineage", "shapes-sd@1"]),
        (f"/api/diff/shapes-sd@1/{edited}", ["diff", "shapes-sd@1", edited]),
    ]
    for route, args in routes:
        assert client.get(route).json() == cli_json(capsys, quick_world, *args), route
    for query, args in QUICK_WORLD_SEARCHES:
        assert client.get(f"/api/search?{query}").json() == cli_json(capsys, quick_world, "search", *args), query
    with ThreadPoolExecutor(4) as pool:  # concurrent clients, each loading the encoder: all answered alike
        answers = list(pool.map(lambda _: client.get("/api/search?text=a+red+circle"), range(4)))
    assert all(a.status_code == 200 and a.json() == answers[0].json() for a in answers)
    from modelzoo.demo.shapes import ShapeSpec, draw

    query = tmp_path / "red.png"
    Image.fromarray(draw(ShapeSpec("circle", "red", 0.5, 0.5, 0.6))).save(query)
    posted = client.post("/api/search", data={"text": "a red circle", "top_k": "3"},
                         files={"image": ("red.png", query.read_bytes(), "image/png")}).json()
    assert posted == cli_json(capsys, quick_world, "search", "--text", "a red circle", "--image", str(query),
                              "--top-k", "3")
    assert posted[0]["ref"] == "shapes-gan-red-circle@1"
    grid = client.get("/api/versions/shapes-sd@1/samples?seed=1&n=2&prompt=a+red+circle")
    assert grid.status_code == 200 and Image.open(io.BytesIO(grid.content)).size[0] > 0
    assert snapshot(quick_world) == before


def test_a_text_search_page_lists_image_generators_and_language_models_apart(
    zoo: modelzoo.Zoo, tmp_path: Path, tiny_gan_dir: Path, gpt2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelzoo.demo.train_clip import CLIP_CONFIG
    from modelzoo.registry.families.clip import build_clip, save_clip

    torch.manual_seed(0)
    zoo.import_(save_clip(build_clip(CLIP_CONFIG.model_cfg), CLIP_CONFIG, tmp_path / "clip"), name="clip")
    zoo.import_(tiny_gan_dir, name="gan")
    zoo.import_(gpt2_dir, name="lm")
    zoo.index(["gan"], encoder="zoo:clip", samples=8, rank=2)
    zoo.index(["lm"], samples=4, prompts=["5 17"], options={"max_new_tokens": 4}, rank=2)
    client = TestClient(create_app(zoo))
    page = client.get("/?text=a+red+circle").text
    lists = re.findall(r'data-list="([^"]+)"(.*?)</div>', page, re.S)
    assert [(title, re.findall(r'data-ref="([^"]+)" data-modality="(\w+)"', body)) for title, body in lists] == [
        ("image generators", [("gan@1", "image")]), ("language models", [("lm@1", "text")])]
    for query, args in [("text=a&modality=text", ["--text", "a", "--modality", "text"]),
                        ("text=a&summary=gaussian", ["--text", "a", "--summary", "gaussian"])]:
        assert client.get(f"/api/search?{query}").json() == cli_json(capsys, zoo.settings.home, "search", *args)
