"""Analyses: what interpretability methods compute from a version without changing it (a linear
relational embedding, a function vector, a board-state probe, a circuit), kept with the version.

An analysis is a result, like a version's weights: its tensors are content-addressed blobs that `verify`
checks and `gc` keeps, and its row records the parameters, the metrics and the sha256 of the data it was
computed on. The tensors are written first, then one transaction adds the rows, so a failed or
interrupted analysis stores nothing. A version purged by `gc --purge` takes its analyses with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from modelzoo.registry.errors import BadInput, NotFound
from modelzoo.registry.records import AnalysisInfo
from modelzoo.registry.refs import ref_of, resolve
from modelzoo.registry.schema import Analysis, AnalysisTensor, Blob, Version
from modelzoo.registry.store import Registry, Staged


@dataclass(frozen=True)
class NewAnalysis:
    """An analysis to store: `params` is every setting it used (defaults included), `input_hash` the
    sha256 of its input data (`data_hash`)."""

    kind: str
    params: dict[str, Any]
    metrics: dict[str, Any]
    input_hash: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    duration_s: float = 0.0


def data_hash(data: Any) -> str:
    """The sha256 of JSON-ready input data, independent of key order."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def parse_analysis_id(text: str | int) -> int:
    try:
        number = int(text)
    except ValueError:
        raise BadInput(f"analysis id {text!r} is not a number; `zoo analyses REF` lists them") from None
    if not 0 < number < 2**63:
        raise BadInput(f"analysis id {text!r} is out of range; `zoo analyses REF` lists them")
    return number


def store_analysis(registry: Registry, ref: str, new: NewAnalysis) -> AnalysisInfo:
    """Store `new` as an analysis of `ref`: its tensors as blobs, then its rows in one transaction."""
    if not new.kind:
        raise BadInput("an analysis needs a kind")
    with registry.db.read() as session:
        version_id = resolve(session, ref).id
    staged: Staged = registry.stage_tensors(new.tensors.items(), allow_nonfinite=True)

    def insert(session: Session) -> int:
        registry.claim_blobs(session, staged.values())
        row = Analysis(version_id=version_id, kind=new.kind, params=new.params, metrics=new.metrics,
                       input_hash=new.input_hash, package_version=package_version("modelzoo"),
                       duration_s=new.duration_s)
        session.add(row)
        session.flush()
        if staged:
            session.execute(AnalysisTensor.__table__.insert(), [
                dict(analysis_id=row.id, name=name, blob_sha256=blob.sha256) for (_, name), blob in staged.items()])
        return row.id

    def restage() -> None:
        nonlocal staged
        registry.discard(staged)
        staged = registry.stage_tensors(new.tensors.items(), allow_nonfinite=True)

    try:
        analysis_id = registry.write_retrying(insert, restage)
    except BaseException:
        registry.discard(staged)
        raise
    return get_analysis(registry, analysis_id)


def _info(session: Session, row: Analysis) -> AnalysisInfo:
    version = session.get(Version, row.version_id)
    assert version is not None  # a foreign key
    names = session.scalars(select(AnalysisTensor.name).where(AnalysisTensor.analysis_id == row.id)
                            .order_by(AnalysisTensor.name)).all()
    return AnalysisInfo(id=row.id, kind=row.kind, ref=ref_of(version), created_at=row.created_at,
                        params=row.params, metrics=row.metrics, input_hash=row.input_hash,
                        package_version=row.package_version, duration_s=row.duration_s, tensors=list(names))


def get_analysis(registry: Registry, analysis_id: int) -> AnalysisInfo:
    with registry.db.read() as session:
        row = session.get(Analysis, analysis_id)
        if row is None:
            raise NotFound(f"no analysis {analysis_id}; `zoo analyses REF` lists a version's analyses")
        return _info(session, row)


def analysis_of(registry: Registry, analysis_id: int, kind: str, what: str, ref: str) -> AnalysisInfo:
    """A stored analysis that an edit bakes into a child of `ref`: it must be of `kind` (described to the
    user as `what`) and computed on `ref` itself."""
    analysis = get_analysis(registry, analysis_id)
    if analysis.kind != kind:
        raise BadInput(f"analysis {analysis.id} is a {analysis.kind} analysis, not {what}")
    if analysis.ref != ref:
        raise BadInput(f"analysis {analysis.id} was computed on {analysis.ref}, not {ref}")
    return analysis


def list_analyses(registry: Registry, ref: str, kind: str | None = None) -> list[AnalysisInfo]:
    """The analyses of one version, oldest first."""
    with registry.db.read() as session:
        query = select(Analysis).where(Analysis.version_id == resolve(session, ref).id)
        if kind is not None:
            query = query.where(Analysis.kind == kind)
        return [_info(session, row) for row in session.scalars(query.order_by(Analysis.id))]


def analysis_tensors(registry: Registry, analysis_id: int) -> dict[str, torch.Tensor]:
    """The analysis's tensors, each checked against its hash (copies, detached from the mapped files)."""
    get_analysis(registry, analysis_id)
    with registry.db.read() as session:
        rows = session.execute(select(AnalysisTensor.name, Blob.sha256)
                               .join(Blob, Blob.sha256 == AnalysisTensor.blob_sha256)
                               .where(AnalysisTensor.analysis_id == analysis_id)).all()
    return {name: registry.blobs.get_tensor(sha).clone() for name, sha in rows}


def analyses_using(registry: Registry, sha256: str) -> list[str]:
    """`analysis N of name@V` for each analysis holding the blob, for `verify`'s report."""
    with registry.db.read() as session:
        rows = session.execute(select(Analysis.id, Analysis.kind, Version)
                               .join(Version, Version.id == Analysis.version_id)
                               .join(AnalysisTensor, AnalysisTensor.analysis_id == Analysis.id)
                               .where(AnalysisTensor.blob_sha256 == sha256).distinct().order_by(Analysis.id)).all()
        return [f"analysis {number} ({kind}) of {ref_of(version)}" for number, kind, version in rows]

