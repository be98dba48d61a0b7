"""The web app: JSON routes that answer exactly what the CLI's `--json` prints for the same arguments, and
pages built from the same calls. No route writes to the registry; the only POSTs are searches."""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, MultiDict, QueryParams, UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

import modelzoo
from modelzoo.cli.main import parse_pairs
from modelzoo.cli.output import human_bytes
from modelzoo.cli.search import hit_json
from modelzoo.registry.errors import BadInput, Corrupted, NotFound, ZooError
from modelzoo.registry.families.base import get_family
from modelzoo.registry.files import read_limited
from modelzoo.registry.paths import join_inside
from modelzoo.registry.queries import ListFilter, parse_since
from modelzoo.registry.records import to_json
from modelzoo.search.indexer import thumbnail_dir
from modelzoo.serve.lineage_svg import lineage_svg
from modelzoo.serve.samples import SampleGrids
from modelzoo.serve.security import TOKEN_COOKIE, TokenGate, bounded_form, decode_image, token_matches

HERE = Path(__file__).parent
MAX_TOP_K = 1000  # FAISS allocates per candidate: an unbounded top_k is a memory request, not a query
THUMBNAIL = re.compile(r"[0-9]{1,18}-[0-9a-f]{12}-[0-9a-f]{12}\.png")  # how the indexer names image thumbnails
MAX_THUMBNAIL_BYTES = 2**24
INTEGER = re.compile(r"-?[0-9]{1,18}")
STATUS = {BadInput: 400, NotFound: 404, Corrupted: 500}


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_upload_bytes: int = 10 * 2**20


@dataclass
class SearchRequest:
    """A search as the CLI's flags give it; images and sketches already decoded."""

    text: list[str] = field(default_factory=list)
    image: list[np.ndarray] = field(default_factory=list)
    sketch: list[np.ndarray] = field(default_factory=list)
    like: list[str] = field(default_factory=list)
    top_k: int = 10
    family: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    modality: str | None = None
    summary: str = "mixture"

    @classmethod
    def of(cls, fields: QueryParams | FormData) -> SearchRequest:
        """The text fields of a query string or form; a field left empty in a form counts as absent."""
        top_k = integer(fields, "top_k", 10)
        if not 1 <= top_k <= MAX_TOP_K:
            raise BadInput(f"top_k must lie in [1, {MAX_TOP_K}], got {top_k}")
        text = lambda name: value if isinstance(value := fields.get(name), str) and value else None  # noqa: E731
        return cls(_texts(fields, "text"), [], [], _texts(fields, "like"), top_k, text("family"),
                   parse_pairs(_texts(fields, "tag")), text("modality"), text("summary") or "mixture")

    @property
    def empty(self) -> bool:
        return not (self.text or self.image or self.sketch or self.like)


def _texts(fields: MultiDict, name: str) -> list[str]:
    return [v for v in fields.getlist(name) if isinstance(v, str) and v]


def integer(fields: MultiDict, name: str, default: int) -> int:
    raw = fields.get(name)
    if raw is None or raw == "":
        return default
    if not isinstance(raw, str) or not INTEGER.fullmatch(raw):
        raise BadInput(f"invalid {name} {str(raw)[:40]!r}: expected an integer")
    return int(raw)


def list_filter(params: QueryParams) -> ListFilter:
    """`zoo list`'s filters from a query string (family, tag=k=v repeated, method, since, descendant_of)."""
    return ListFilter(params.get("family") or None, parse_pairs(_texts(params, "tag")), params.get("method") or None,
                      parse_since(params.get("since")), params.get("descendant_of") or None)


def json_response(data: Any, status: int = 200) -> Response:
    """`data` serialised as `zoo ... --json` serialises it (records through `to_json`, the rest as str)."""
    return Response(json.dumps(data, default=str), status, media_type="application/json")


def create_app(zoo: modelzoo.Zoo, settings: ServeSettings | None = None) -> Starlette:
    settings = settings or ServeSettings()
    grids = SampleGrids(zoo)
    # One search at a time: each loads the encoder from the registry, and concurrent loads of a family's
    # model in threads leave tensors unassigned.
    searching = threading.Lock()
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["bytes"] = human_bytes
    templates.env.filters["pretty"] = lambda value: json.dumps(value, indent=2, default=str) if value else ""

    def hits(request: SearchRequest, modality: str | None = None) -> list[dict[str, Any]]:
        with searching:
            found = zoo.search(text=request.text, image=request.image, sketch=request.sketch, like=request.like,
                               top_k=request.top_k, family=request.family, tags=request.tags,
                               modality=modality or request.modality, summary=request.summary)
        return [hit_json(h) for h in found]

    def result_lists(request: SearchRequest) -> list[tuple[str, list[dict[str, Any]]]]:
        """(title, hits) per list shown: a text query that names no family or modality is answered among
        image generators and, separately, among language models; their scores are not comparable."""
        both = request.text and not (request.image or request.sketch or request.like or request.family
                                     or request.modality)
        if not both:
            return [("results", hits(request))]
        return [("image generators", hits(request, "image")), ("language models", hits(request, "text"))]

    async def posted_search(request: Request) -> SearchRequest:
        form = await bounded_form(request, settings.max_upload_bytes)
        search = SearchRequest.of(form)
        for name, images in (("image", search.image), ("sketch", search.sketch)):
            for upload in form.getlist(name):
                if not isinstance(upload, UploadFile):
                    raise BadInput(f"{name} must be a file upload")
                data = await upload.read()
                if data or upload.filename:  # a browser sends an empty, nameless part for an unused file input
                    images.append(await run_in_threadpool(decode_image, upload, data, name))
        return search

    # The JSON API: each route answers what the matching `zoo ... --json` prints.
    async def api_models(request: Request) -> Response:
        return json_response(to_json(await run_in_threadpool(zoo.list, list_filter(request.query_params))))

    async def api_version(request: Request) -> Response:
        return json_response(to_json(await run_in_threadpool(zoo.get, request.path_params["ref"])))

    async def api_lineage(request: Request) -> Response:
        return json_response(to_json(await run_in_threadpool(zoo.lineage, request.path_params["ref"])))

    async def api_diff(request: Request) -> Response:
        a, b = request.path_params["a"], request.path_params["b"]
        return json_response(to_json(await run_in_threadpool(zoo.diff, a, b)))

    async def api_search(request: Request) -> Response:
        search = await posted_search(request) if request.method == "POST" else SearchRequest.of(request.query_params)
        return json_response(await run_in_threadpool(hits, search))

    async def api_samples(request: Request) -> Response:
        params = request.query_params
        png = await run_in_threadpool(grids.png, request.path_params["ref"], integer(params, "seed", 0),
                                      integer(params, "n", 4), params.get("prompt") or None)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    # Pages.
    async def search_page(request: Request) -> Response:
        search = await posted_search(request) if request.method == "POST" else SearchRequest.of(request.query_params)
        found = [] if search.empty else await run_in_threadpool(result_lists, search)
        return templates.TemplateResponse(request, "index.html", {
            "search": search, "searched": not search.empty, "lists": [
                (title, [{**hit, "thumbnail_name": _thumbnail_name(hit["thumbnail"])} for hit in hits])
                for title, hits in found
            ],
        })

    async def version_page(request: Request) -> Response:
        ref = request.path_params["ref"]
        params = request.query_params
        grid = {"seed": integer(params, "seed", 0), "n": integer(params, "n", 4), "prompt": params.get("prompt", "")}
        context = await run_in_threadpool(_version_context, zoo, ref)
        return templates.TemplateResponse(request, "version.html", {**context, "grid": grid})

    async def models_page(request: Request) -> Response:
        models = await run_in_threadpool(zoo.list, list_filter(request.query_params))
        return templates.TemplateResponse(request, "models.html", {"models": models, "params": request.query_params})

    async def thumbnail(request: Request) -> Response:
        name = request.path_params["name"]
        if not THUMBNAIL.fullmatch(name):
            raise NotFound(f"no thumbnail {name[:80]!r}")
        path = join_inside(thumbnail_dir(zoo.registry), name, "thumbnail")
        if not path.is_file():
            raise NotFound(f"no thumbnail {name}")
        data = read_limited(path, MAX_THUMBNAIL_BYTES, "thumbnail", follow_symlinks=False)
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def login(request: Request) -> Response:
        offered = request.query_params.get("token", "")
        if settings.token is None:
            return RedirectResponse("/", 303)
        if not token_matches(offered, settings.token):
            return json_response({"error": "wrong token"}, 401)
        response = RedirectResponse("/", 303)
        response.set_cookie(TOKEN_COOKIE, settings.token, httponly=True, samesite="strict")
        return response

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", "")

    async def zoo_error(request: Request, error: Exception) -> Response:
        status = next((code for kind, code in STATUS.items() if isinstance(error, kind)), 400)
        if wants_json(request):
            return json_response({"error": str(error)}, status)
        return templates.TemplateResponse(request, "error.html", {"message": str(error)}, status_code=status)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        if wants_json(request):
            return json_response({"error": error.detail}, error.status_code)
        return templates.TemplateResponse(request, "error.html", {"message": error.detail},
                                          status_code=error.status_code)

    app = Starlette(
        routes=[
            Route("/api/models", api_models),
            Route("/api/versions/{ref}", api_version),
            Route("/api/versions/{ref}/samples", api_samples),
            Route("/api/lineage/{ref}", api_lineage),
            Route("/api/diff/{a}/{b}", api_diff),
            Route("/api/search", api_search, methods=["GET", "POST"]),
            Route("/", search_page, methods=["GET", "POST"]),
            Route("/v/{ref}", version_page),
            Route("/models", models_page),
            Route("/thumbnails/{name}", thumbnail),
            Route("/login", login),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[Middleware(TokenGate, token=settings.token)],
        exception_handlers={ZooError: zoo_error, HTTPException: http_error},
    )
    return app


def _thumbnail_name(stored: str) -> str | None:
    """The name `/thumbnails/` serves a search hit's image under: only the file name of the stored path is
    used, looked up again inside the thumbnail folder, so a path in the database never names a file."""
    name = Path(stored).name
    return name if THUMBNAIL.fullmatch(name) else None


def _version_context(zoo: modelzoo.Zoo, ref: str) -> dict[str, Any]:
    """Everything the version page shows, read in one go: provenance, lineage, aliases, diffs to parents."""
    info = zoo.get(ref)
    lineage = zoo.lineage(info.ref)
    try:
        family = get_family(info.family)
        sampling = {"takes_prompts": family.takes_prompts, "needs_prompt": family.needs_prompt}
    except ZooError:
        sampling = None  # a family whose adapter is not installed here: its page shows no samples
    return {
        "info": info,
        "svg": lineage_svg(lineage, lambda r: [p.ref for p in zoo.get(r).parents]),
        "aliases": {alias: zoo.alias_history(info.model, alias) for alias in info.aliases},
        "diffs": [(parent, zoo.diff(parent.ref, info.ref)) for parent in info.parents],
        "sampling": sampling,
    }
