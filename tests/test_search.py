"""Indexing and searching a registry end to end on tiny random models, and the index's exactness."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import snapshot, zoo_cli
from PIL import Image
from scipy.stats import multivariate_normal, norm
from sqlalchemy import select

import modelzoo
from modelzoo.demo.train_clip import CLIP_CONFIG
from modelzoo.registry.families.clip import build_clip, save_clip
from modelzoo.registry.families.gan import save_gan
from modelzoo.registry.families.stylegan import Generator, StyleGanConfig
from modelzoo.registry.schema import Embedding
from modelzoo.search import engine
from modelzoo.search.indexer import SampleSpec, store_embedding
from modelzoo.search.moments import grouped_mixture, mixture_of, moments_of

TINY = StyleGanConfig.tiny()


@pytest.fixture
def world(zoo: modelzoo.Zoo, tmp_path: Path) -> modelzoo.Zoo:
    return _world(zoo, tmp_path)


def _world(zoo: modelzoo.Zoo, tmp_path: Path) -> modelzoo.Zoo:
    """A random CLIP and three random tiny GANs, the GANs indexed with 24 samples each."""
    torch.manual_seed(0)
    zoo.import_(save_clip(build_clip(CLIP_CONFIG.model_cfg), CLIP_CONFIG, tmp_path / "clip"), name="clip")
    for i, name in enumerate(["gan-a", "gan-b", "gan-c"]):
        torch.manual_seed(10 + i)
        G = Generator(TINY)
        zoo.import_(save_gan(G, TINY, tmp_path / name), name=name, tags={"slice": name[-1]})
    done = zoo.index(encoder="zoo:clip", samples=24, rank=4)
    assert [d.ref for d in done] == ["gan-a@1", "gan-b@1", "gan-c@1"] and not any(d.skipped for d in done)
    return zoo


def test_a_model_query_finds_that_model_first_and_scores_are_minus_frechet(world: modelzoo.Zoo) -> None:
    hits = world.search(like=["gan-b"], top_k=3)
    assert [h.ref for h in hits][0] == "gan-b@1"
    assert hits[0].score == pytest.approx(0.0, abs=1e-4)
    assert all(h.score < -1e-6 for h in hits[1:]) and Path(hits[0].thumbnail).is_file()


@pytest.mark.postgres
def test_search_on_a_postgres_registry(home: Path, tmp_path: Path, pg_database: str) -> None:
    zoo = _world(modelzoo.open(home, pg_database), tmp_path)
    assert [h.ref for h in zoo.search(like=["gan-c"], tags={"slice": "c"})] == ["gan-c@1"]
    assert zoo.search(like=["gan-b"], top_k=1)[0].score == pytest.approx(0.0, abs=1e-4)


def test_indexing_is_incremental_and_an_edit_of_an_indexed_version_is_indexed_at_once(world: modelzoo.Zoo) -> None:
    assert all(d.skipped for d in world.index(samples=24, rank=4))
    name = "synthesis.b4.torgb.weight"  # not demodulated: negating it inverts the colours
    weight = world.tensors("gan-a", [name])[name]
    world.registry.commit("gan-a", {name: -weight}, "manual")
    again = world.index(samples=24, rank=4)
    assert [d.ref for d in again if not d.skipped] == ["gan-a@2"]
    assert world.search(like=["gan-a@2"], top_k=1)[0].ref == "gan-a@2"


def test_filters_restrict_results_and_deleted_versions_disappear(world: modelzoo.Zoo) -> None:
    assert [h.ref for h in world.search(like=["gan-a"], tags={"slice": "c"})] == ["gan-c@1"]
    assert world.search(like=["gan-a"], family="lm") == []
    world.delete("gan-b")
    assert "gan-b@1" not in [h.ref for h in world.search(like=["gan-a"])]


def test_a_stale_or_damaged_index_is_rebuilt_from_the_database(world: modelzoo.Zoo) -> None:
    encoder_hash = engine.indexed_encoders(world.registry)[0].encoder_hash
    directory = engine.index_dir(world.registry, encoder_hash, "images")
    expected = [h.ref for h in world.search(like=["gan-a"])]
    (directory / "factors.npy").write_bytes(b"garbage")
    assert [h.ref for h in world.search(like=["gan-a"])] == expected
    (directory / "meta.json").write_text('{"format": 1, "encoder_hash": "other"}')
    assert [h.ref for h in world.search(like=["gan-a"])] == expected


class FixedEncoder:
    """Stands in for CLIP where the query feature itself is the test's input."""

    def __init__(self, feature: np.ndarray):
        self.feature = feature

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.feature] * len(texts))

    encode_images = encode_texts


def test_rerank_over_a_flat_index_equals_brute_force_scoring(zoo: modelzoo.Zoo, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    d, n = 16, 40
    moments = []
    zoo.import_(save_gan(Generator(TINY), TINY, tmp_path / "g"), name="g")
    version_id = zoo.get("g").id
    for i in range(n):
        x = rng.normal(size=(200, d)) * rng.uniform(0.1, 0.5) + rng.normal(size=d)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        m = moments_of(x, rank=3)
        moments.append(m)
        spec = SampleSpec("images", 200, first_seed=i)
        store_embedding(zoo.registry, version_id, _Encoder("fake", "f" * 64), spec, m, "", 0.0)
    q = rng.normal(size=d)
    q /= np.linalg.norm(q)
    blank = np.zeros((4, 4, 3), np.uint8)
    query = engine.SearchQuery(texts=("q",), images=(blank,), sketches=(blank,))
    hits = engine.search(zoo.registry, query, "f" * 64, FixedEncoder(q), top_k=1, candidates=n, tau=3.0)
    stored = [_roundtrip(m) for m in moments]
    reach = np.sqrt(2 * np.log(200))  # where 200 samples reach, in standard deviations

    def similarity(m) -> float:  # type: ignore[no-untyped-def]
        """The moment-generating score of y = q.x ~ N(m, v) truncated at m + reach sqrt(v), tau = 3."""
        v = q @ m.covariance() @ q
        return 3.0 * q @ m.mean + 4.5 * v + norm.logcdf(reach - 3.0 * np.sqrt(v)) - norm.logcdf(reach)

    brute = [  # the text and the sketch by the moment-generating score, the image by its density
        2 * similarity(m) + multivariate_normal(m.mean, m.covariance() + 1e-3 * np.eye(d)).logpdf(q)
        for m in stored
    ]
    best = int(np.argmax(brute))
    assert hits[0].score == pytest.approx(brute[best], rel=1e-5)
    assert hits[0].embedding_id == best + 1  # embedding ids follow insertion order


class _Encoder:
    def __init__(self, id: str, weights_hash: str):
        self.id, self.weights_hash = id, weights_hash


def _roundtrip(m):  # type: ignore[no-untyped-def]
    """The moments as stored: a float16 factor."""
    return type(m)(m.mean, m.factor.astype(np.float16).astype(np.float32), m.diag, m.count)


def test_bad_queries_exit_2_and_change_nothing(world: modelzoo.Zoo, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = world.settings.home
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    world.search(like=["gan-a"])  # the index is current before the snapshot
    before = snapshot(home)
    for args, message in [
        (["--image", str(broken)], "cannot read image"),
        (["--image", str(tmp_path / "missing.png")], "does not exist"),
        (["--text", " "], "empty text"),
        ([], "empty query"),
        (["--like", "nope"], "nope"),
        (["--like", "clip"], "not indexed"),
        (["--text", "a red circle", "--encoder", "open_clip:RN50:/nonexistent.pt"], "cannot load"),
        (["--image", str(tmp_path / "ok.png"), "--top-k", "0"], "top-k"),
    ]:
        result = zoo_cli(capsys, home, "search", *args)
        assert result.code == 2 and message in result.err, (args, result)
    assert snapshot(home) == before


def test_cli_search_json_lists_rank_ref_model_version_score(world: modelzoo.Zoo, capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    result = zoo_cli(capsys, world.settings.home, "search", "--text", "a red circle", "--top-k", "2", "--json")
    assert result.code == 0, result.err
    hits = json.loads(result.out)
    assert [h["rank"] for h in hits] == [1, 2]
    assert {"rank", "ref", "model", "version", "score"} <= set(hits[0]) and hits[0]["score"] >= hits[1]["score"]


def test_diffusion_and_lm_versions_are_sampled_from_prompts_and_searchable(
    zoo: modelzoo.Zoo, tmp_path: Path, sd_dir: Path, gpt2_dir: Path
) -> None:
    torch.manual_seed(0)
    zoo.import_(save_clip(build_clip(CLIP_CONFIG.model_cfg), CLIP_CONFIG, tmp_path / "clip"), name="clip")
    zoo.import_(sd_dir, name="sd")
    zoo.import_(gpt2_dir, name="lm")
    done = zoo.index(["sd"], encoder="zoo:clip", samples=4, prompts=["a red circle", "a blue square"],
                     options={"steps": 2}, rank=2)
    done += zoo.index(["lm"], samples=4, prompts=["5 17"], options={"max_new_tokens": 4}, rank=2)  # no tokenizer: ids
    assert [d.ref for d in done] == ["sd@1", "lm@1"]
    assert done[0].thumbnail.endswith(".png") and done[1].thumbnail.endswith(".txt")
    row = engine.indexed_encoders(zoo.registry)
    assert [(e.encoder_id, e.versions) for e in row] == [("zoo:clip@1", 2)]
    assert [h.ref for h in zoo.search(text=["a red circle"], family="lm")] == ["lm@1"]
    assert [h.ref for h in zoo.search(text=["a red circle"], modality="text")] == ["lm@1"]
    assert [(h.ref, h.modality) for h in zoo.search(like=["lm"])] == [("lm@1", "text")]


def test_text_search_ranks_image_generators_and_never_mixes_in_language_models(
    zoo: modelzoo.Zoo, tmp_path: Path, sd_dir: Path, gpt2_dir: Path, capsys  # type: ignore[no-untyped-def]
) -> None:
    import json

    torch.manual_seed(0)
    zoo.import_(save_clip(build_clip(CLIP_CONFIG.model_cfg), CLIP_CONFIG, tmp_path / "clip"), name="clip")
    zoo.import_(sd_dir, name="sd")
    zoo.import_(save_gan(Generator(TINY), TINY, tmp_path / "g"), name="gan")
    zoo.import_(gpt2_dir, name="lm")
    zoo.index(["sd"], encoder="zoo:clip", samples=4, prompts=["a red circle", "a blue square"],
              options={"steps": 2}, rank=2)
    zoo.index(["gan"], samples=8, rank=2)
    zoo.index(["lm"], samples=4, prompts=["5 17"], options={"max_new_tokens": 4}, rank=2)
    home = zoo.settings.home
    for args, expected in [
        ([], {("sd@1", "image"), ("gan@1", "image")}),
        (["--modality", "text"], {("lm@1", "text")}),
        (["--family", "lm"], {("lm@1", "text")}),
        (["--modality", "image", "--summary", "gaussian"], {("sd@1", "image"), ("gan@1", "image")}),
    ]:
        result = zoo_cli(capsys, home, "search", "--text", "a red circle", "--top-k", "10", "--json", *args)
        assert result.code == 0, result.err
        assert {(h["ref"], h["modality"]) for h in json.loads(result.out)} == expected, args
    result = zoo_cli(capsys, home, "search", "--like", "lm", "--modality", "image")
    assert result.code == 2 and "--modality text" in result.err
    result = zoo_cli(capsys, home, "search", "--text", "a red circle", "--modality", "audio")
    assert result.code == 2 and "unknown modality" in result.err


def test_mixture_ranks_the_specialist_above_a_broad_model_that_one_gaussian_prefers(
    zoo: modelzoo.Zoo, tmp_path: Path
) -> None:
    """A broad model half of whose samples are the specialist's cluster: its single Gaussian has a wide
    variance along the query, which the moment-generating score rewards; its mixture scores about
    log(1/2) below the specialist, as log E[exp(tau q.x)] does."""
    rng = np.random.default_rng(1)
    d = 16
    centres = np.eye(d)[:2]
    cluster = lambda c: c + rng.normal(size=(100, d)) * 0.05  # noqa: E731
    specialist_x = cluster(centres[0])
    broad_x = np.concatenate([specialist_x, cluster(centres[1])])
    zoo.import_(save_gan(Generator(TINY), TINY, tmp_path / "g"), name="g")
    version_id = zoo.get("g").id
    encoder = _Encoder("fake", "f" * 64)
    groups = np.repeat(["a", "b"], 100)
    broad, specialist = grouped_mixture(broad_x, groups, 4), mixture_of([moments_of(specialist_x, 4)], [100])
    for i, mixture in enumerate([broad, specialist]):
        store_embedding(zoo.registry, version_id, encoder, SampleSpec("images", 100, first_seed=i), mixture, "", 0.0)
    query = engine.SearchQuery(texts=("a",))
    found = {
        summary: engine.search(zoo.registry, query, "f" * 64, FixedEncoder(centres[0]), top_k=2, candidates=2,
                               tau=30.0, summary=summary)
        for summary in ("mixture", "gaussian")
    }
    assert [h.embedding_id for h in found["gaussian"]] == [1]  # one version: both rows are embeddings of "g"
    assert [h.embedding_id for h in found["mixture"]] == [2]
    ranking = engine.rank_candidates(
        engine.current_index(zoo.registry, "f" * 64, "images"), [engine.QueryPart("a", centres[0], "text")], 2, 30.0
    )
    assert ranking.total[1] - ranking.total[0] == pytest.approx(np.log(2), abs=0.05)


def test_rebuild_upgrades_one_gaussian_embeddings_to_one_component_per_prompt(
    zoo: modelzoo.Zoo, tmp_path: Path, sd_dir: Path
) -> None:
    torch.manual_seed(0)
    zoo.import_(save_clip(build_clip(CLIP_CONFIG.model_cfg), CLIP_CONFIG, tmp_path / "clip"), name="clip")
    zoo.import_(sd_dir, name="sd")
    prompts = ["a red circle", "a blue square"]
    first = zoo.index(["sd"], encoder="zoo:clip", samples=4, prompts=prompts, options={"steps": 2}, rank=2,
                      components=1)
    assert [d.components for d in first] == [1]
    assert all(d.skipped for d in zoo.index(["sd"], samples=4, prompts=prompts, options={"steps": 2}, rank=2))
    again = zoo.index(rebuild=True)
    assert [(d.ref, d.components, d.skipped) for d in again] == [("sd@1", 2, False)]
    with zoo.registry.db.read() as session:
        rows = session.scalars(select(Embedding)).all()
        assert [(r.id, r.components, r.sample_spec["count"]) for r in rows] == [(again[0].embedding_id, 2, 4)]
    assert [h.ref for h in zoo.search(text=["a red circle"])] == ["sd@1"]


def test_text_candidates_account_for_weight_and_variance_not_only_the_mean(tmp_path: Path) -> None:
    """Version 0's component is nearest the query by its mean but narrow; version 1's is a little further
    and wide, so its text score is higher. With room for one candidate, FAISS must offer version 1."""
    from modelzoo.search.index import Fingerprint, write_index

    d, tau = 8, 20.0
    q = np.eye(d)[0]
    means = np.stack([np.eye(d)[0] * 0.9 + np.eye(d)[1] * 0.1, np.eye(d)[0] * 0.8 + np.eye(d)[1] * 0.2])
    diags = np.stack([np.full(d, 1e-4), np.full(d, 2e-2)]).astype(np.float32)
    index = write_index(tmp_path / "i", "h", "images", Fingerprint(2, 2, 3), np.array([1, 2]), np.array([0, 1, 2]),
                        np.zeros(2), means.astype(np.float32), np.zeros((2, d, 0), np.float32), diags,
                        np.full(2, 128.0))
    exact = engine.rank_candidates(index, [engine.QueryPart("t", q, "text")], 2, tau)
    assert exact.positions[exact.order[0]] == 1
    assert engine.rank_candidates(index, [engine.QueryPart("t", q, "text")], 1, tau).positions.tolist() == [1]
    assert engine.rank_candidates(index, [engine.QueryPart("i", q, "image")], 1, tau).positions.tolist() == [0]
    assert engine.rank_candidates(index, [engine.QueryPart("s", q, "sketch")], 1, tau).positions.tolist() == [1]


def test_faiss_holds_vectors_padded_to_its_simd_width(tmp_path: Path) -> None:
    """FAISS decodes 8-bit codes with SIMD only for widths that are a multiple of 8 or 16 (at d + 2 = 130 a
    query scanned 7 times slower): the index and the query vectors are padded with zeros, which change no
    inner product."""
    from modelzoo.search.index import SIMD_WIDTH, Fingerprint, search_vector, write_index

    d = 8
    q = np.eye(d)[0]
    assert search_vector(q, 4.0).tolist() == [*q, 25.0, 2.0, *[0.0] * (SIMD_WIDTH - d - 2)]
    means = np.eye(d, dtype=np.float32)[:3]
    index = write_index(tmp_path / "i", "h", "images", Fingerprint(3, 3, 6), np.arange(1, 4), np.arange(4),
                        np.zeros(3), means, np.zeros((3, d, 0), np.float32), np.full((3, d), 1e-4, np.float32),
                        np.full(3, 32.0))
    assert index.faiss_index.d == SIMD_WIDTH
    assert index.candidates(search_vector(q, None)[None], 1).tolist() == [0]


def test_the_rerank_budget_counts_components_so_mixtures_rerank_no_more_than_single_gaussians(tmp_path: Path) -> None:
    """Six versions of 4 components: one near the query (version 5 nearest, then 0, 1, ... 4) and three far
    away. The 8 best components belong to all six versions; the budget of 8 components takes the nearest
    versions until their components number 8, and each query vector brings its own budget."""
    from modelzoo.search.index import Fingerprint, search_vector, write_index

    d, versions, k = 16, 6, 4
    rng = np.random.default_rng(0)
    q, other = np.eye(d)[0], np.eye(d)[1]
    means = np.abs(rng.normal(size=(versions, k, d))) * (np.arange(d) >= 2)  # the far components
    for v, offset in enumerate([0.3, 0.5, 0.7, 0.9, 1.1, 0.0]):
        means[v, 0] = q + offset * other
    means = (means / np.linalg.norm(means, axis=-1, keepdims=True)).reshape(-1, d).astype(np.float32)
    n = versions * k
    index = write_index(tmp_path / "i", "h", "images", Fingerprint(versions, versions, 21), np.arange(1, versions + 1),
                        np.arange(0, n + 1, k), np.full(n, np.log(1 / k)), means, np.zeros((n, d, 0), np.float32),
                        np.full((n, d), 1e-4, np.float32), np.full(n, 32.0))
    search = lambda *vectors: np.stack([search_vector(v, None) for v in vectors])  # noqa: E731
    assert index.candidates(search(q), 8).tolist() == [0, 5]
    assert index.candidates(search(q), 5).tolist() == [0, 5]  # the version that crosses the budget is kept
    assert index.candidates(search(q), 4).tolist() == [5]
    assert index.candidates(search(q, other), 4).tolist() == [4, 5]


def test_the_default_pool_grows_with_the_square_root_of_the_index() -> None:
    assert engine.default_pool(10_000) == engine.MIN_CANDIDATES
    assert engine.default_pool(4_500_000) == round(engine.CANDIDATES_PER_ROOT * 2121.3)
    assert engine.default_pool(4 * 4_500_000) == 2 * engine.default_pool(4_500_000)
