"""UCE: Unified Concept Editing in diffusion models (Gandikota et al., arXiv 2308.14761), closed form.

Every cross-attention key and value projection W (a `d_out x d` matrix applied to text-encoder token
outputs c) is replaced by the minimiser of

    sum_i |W' c_i - v*_i|^2  +  sum_j |W' c_j - W c_j|^2  +  lam |W' - W|_F^2        (paper, eq. 7)

with erase scale s_e and preserve scale s_p weighting the first two sums:

    W' = (lam W + s_e sum_i v*_i c_i^T + s_p sum_j W c_j c_j^T) (lam I + s_e sum_i c_i c_i^T + s_p sum_j c_j c_j^T)^-1

c_i are the edited concepts' token embeddings, c_j the preserved concepts'. In every mode of the
reference code the target is the *original* W applied to another embedding, v*_i = W g_i (erase: the
guide concept's token; debias: the concept's token plus a mixture of attribute tokens). Writing C (rows
c_i^T), G (rows g_i^T) and P (rows c_j^T), the numerator is W N with N = lam I + s_e G^T C + s_p P^T P
and the inverted matrix A = lam I + s_e C^T C + s_p P^T P depends on the text side alone, so

    W' = W M,   M = N A^-1

for every projection at once: one d x d linear solve (in float64) edits all of them, however many
concepts (the paper erases up to 1,000 artists). Modes:
- erase: c_i of each concept -> v*_i from its guide (default the empty prompt, as the reference).
- moderate: erase towards the empty prompt with only the empty prompt preserved (the reference has no
  separate code path; the erase scale sets the strength).
- debias (`trainscripts/uce_sd_debias.py`): generate images for each prompt, read their attributes,
  and move v* = W (c + sum_a s_a c_a) by the gap between desired and observed ratios, solving again from
  the original W each iteration. The reference adds each iteration's gap to v* in place, so the
  coefficients s_a accumulate (an integral controller); we do the same, with `step_size` scaling it.

Which token embeddings stand for a concept (`tokens`): "last", the text encoder's output at the concept's
last word token (the current reference script), or "last_and_following" (the older script): that token
and every position after it (end-of-text and padding, which a causal encoder lets see the word), paired
position by position with the guide's, while preserved concepts contribute all their positions.
`templates` place every concept in texts such as "a {} circle" (the reference's `--expand_prompts` does
this with five fixed templates that end in the concept); rows then start at the concept's last token
inside the text, so a word followed by others ("a red circle") is edited where it and its context are.

Default "last_and_following", by measurement on the quick shapes-world model (32 samples per prompt),
erasing "blue" towards "" with the shape templates: with the other colours preserved it removed 100% of
blue samples and kept 97-100% of every other colour's agreement; "last" removed none, with or without
preservation; without templates neither choice removed any (that text encoder never saw a bare colour).

Preservation (`preserve_mode`). "penalty" is the paper's: the s_p term only pulls preserved outputs back
towards their old values, so they drift (MACE's tables: plain UCE at 100 artists, FID-30K 77.7). "nullspace"
follows AlphaEdit (arXiv 2410.02355) and SPEED (arXiv 2503.07392): the keys K_p are the text encoder's
outputs at every position of every preserved text (in every template), the change is confined to the
null space of K_p K_p^T (`null_space_projector`, eigenvalues below `nullspace_threshold` x the keys' mean
squared norm) and solved there in closed form (`nullspace_map`), so preserved outputs stay as they were.
Of SPEED's refinements one is taken: the empty prompt's keys always join K_p (`keep_empty`; SPEED's
invariant null text), which keeps classifier-free guidance's unconditional branch. Its influence-based
filter of the prior concepts is not: it frees room by giving up the preservation of prompts the erasure
moves little, and here every preserved prompt is kept exactly. The default threshold 1e-8 keeps only the
directions no preserved key reaches (float error; on a 256-wide text encoder with 31 prompts x 8 positions,
drift 7.5e-12, where 1e-6 let 2 more dimensions in and drifted 1e-3). A text encoder whose outputs fill few
dimensions leaves little room beyond them: the quick shapes-world model's 64-wide keys of 9 texts keep
25-27 null dimensions at 1e-6 and 51-53 at 1e-3, and erasing blue and yellow with red and green preserved needs
1e-3 (seed 1: yellow fell 28% at 1e-6, 84% at 1e-3, red and green kept 100%). A colour lying between two
preserved ones along the encoder's hue line (green between yellow and blue, or beside red and yellow)
fell 7-17% at every setting tried, where the penalty erased it fully: what the preserved keys span
cannot be erased without moving them.

Debias iterates like the reference; two deviations, both measured there: attribute rows are taken at the
end of each attribute's text, aligned with the prompt's last token ("circle", end-of-text, ... of "a
circle" and of "a red circle"), and the step halves when a gap changes sign, since colour flips sharply
with the conditioning and the fixed step oscillated between 0% and 100% for 30 iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from modelzoo.editors.base import EditContext, EditProgress, EditResult, changed_tensors
from modelzoo.editors.diffusion_text import UNET, TextSide, cross_attention_projections, in_template, text_side
from modelzoo.editors.readers import CLIP_READER, AttributeReader, read_drawn, registry_clip_reader
from modelzoo.registry.errors import BadInput
from modelzoo.registry.factors import LowRank
from modelzoo.registry.families.base import LoadedModel

Mode = Literal["erase", "debias", "moderate"]
TokenChoice = Literal["last", "last_and_following"]
PreserveMode = Literal["penalty", "nullspace"]
MODES: tuple[str, ...] = ("erase", "debias", "moderate")
TOKEN_CHOICES: tuple[str, ...] = ("last", "last_and_following")
PRESERVE_MODES: tuple[str, ...] = ("penalty", "nullspace")
PROJECTIONS: tuple[str, ...] = ("to_k", "to_v")
EXPANSIONS: tuple[str, ...] = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")
"""The reference's `--expand_prompts` templates for objects, applied to a concept and its guide alike."""


@dataclass(frozen=True)
class UceRequest:
    """One UCE edit. Defaults are the reference implementation's (lam 0.5, scales 1, guide "", the
    debias loop's 30 iterations, tolerance 0.05, 10 images per prompt at 20 steps and guidance 7.5)."""

    erase: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    """Guide concept per erased concept; none means "" for all, one is used for all."""
    preserve: tuple[str, ...] = ()
    preserve_mode: PreserveMode = "penalty"
    """"penalty": UCE's own preservation term (preserved outputs pulled back towards their old values);
    "nullspace": the change is projected onto the null space of the preserved keys, so they keep their
    outputs (AlphaEdit / SPEED; see `nullspace_map`)."""
    nullspace_threshold: float = 1e-8
    """Null-space mode: eigenvalues of K_p K_p^T below this fraction of the keys' mean squared norm span
    the null space (`null_space_projector`)."""
    keep_empty: bool = True
    """Null-space mode: the empty prompt's keys join the preserved ones (SPEED's invariant null text: the
    unconditional branch of classifier-free guidance stays as it was)."""
    mode: Mode = "erase"
    debias: tuple[str, ...] = ()
    """Prompts whose attribute mix is balanced (mode debias), e.g. "a circle"."""
    attributes: tuple[str, ...] = ()
    """The attributes to balance, e.g. ("red", "blue")."""
    ratios: tuple[float, ...] = ()
    """Desired share of each attribute; none means equal shares."""
    tokens: TokenChoice = "last_and_following"
    lam: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    projections: tuple[str, ...] = PROJECTIONS
    layers: tuple[str, ...] = ()
    """Only projections whose UNet module name contains one of these (e.g. "up_blocks"); all when empty."""
    templates: tuple[str, ...] = ("{}",)
    """Texts the concepts (erased, guide, preserved, attributes) are placed in, "{}" marking the spot,
    e.g. "a {} circle": token rows are then taken from the concept's last token inside each text."""
    template_guides: bool = True
    """Place guides in the templates too (the reference's expand_prompts does); False keeps them bare."""
    expand_prompts: bool = False
    """Add the reference's five object templates ("image of {}", ...) to `templates`."""
    reader: str = CLIP_READER
    """Debias attribute reader. "clip": CLIP zero-shot over the attribute prompts (`clip_reader`) with the
    registry's CLIP model, its one `clip`-family model, recorded as "clip:zoo:NAME@N"; "clip:zoo:REF":
    that CLIP version. Any other name labels a reader the caller hands in as `read`, e.g. `clip_reader`
    over an encoder it loaded (the CLI's `--reader clip:SPEC`) or the shapes world's meters (the demo)."""
    read: AttributeReader | None = field(default=None, compare=False, repr=False, metadata={"provenance": False})
    """The reader itself, a handle rather than a setting; `Zoo.edit` loads it for the names above."""
    max_iterations: int = 30
    tolerance: float = 0.05
    step_size: float = 1.0
    halve_on_overshoot: bool = True
    """Halve the step whenever a gap changes sign; False keeps the reference's fixed step."""
    samples_per_prompt: int = 10
    sample_steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0

    def all_templates(self) -> list[str]:
        """The templates concepts are placed in: `templates`, then the expansions if asked for."""
        return list(dict.fromkeys((*self.templates, *(EXPANSIONS if self.expand_prompts else ()))))

    def validate(self) -> UceRequest:
        return _resolve(self)


@dataclass
class ConceptRows:
    """Token embeddings as rows: C (edited), G (their targets' inputs, same row count) and P (preserved)."""

    C: torch.Tensor
    G: torch.Tensor
    P: torch.Tensor
    counts: dict[str, int] = field(default_factory=dict)


def uce_map(rows: ConceptRows, lam: float, erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """M with W' = W M for every edited projection, preserving by penalty: M = N A^-1 (see the module
    docstring), float64."""
    C, G, P = rows.C.double(), rows.G.double(), rows.P.double()
    eye = torch.eye(C.shape[1], dtype=torch.float64, device=C.device)
    A = lam * eye + erase_scale * C.T @ C + preserve_scale * P.T @ P
    N = lam * eye + erase_scale * G.T @ C + preserve_scale * P.T @ P
    # M A = N with A symmetric: A M^T = N^T, one solve.
    return torch.linalg.solve(A, N.T).T


def null_space_projector(Kp: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U_0 U_0^T (AlphaEdit, arXiv 2410.02355, eq. 5; SPEED, arXiv 2503.07392, sec. 3): U_0 the
    eigenvectors of K_p K_p^T (keys as columns; `Kp` holds them as rows, so Kp^T Kp) whose eigenvalues are
    at most `threshold` x tr(K_p K_p^T) / m, the mean squared norm of the m keys (AlphaEdit thresholds the
    eigenvalues of the mean K_p K_p^T / m absolutely; dividing by the mean norm too makes the threshold
    scale-free). A key's share along U_0 is then small: sum_k |P k|^2 is the sum of
    those eigenvalues, at most n_0 x threshold x the mean |k|^2. float64, d x d."""
    S = Kp.double().T @ Kp.double()
    lam_k, U = torch.linalg.eigh(S)
    U0 = U[:, lam_k <= threshold * torch.trace(S) / max(len(Kp), 1)]
    return U0 @ U0.T


def nullspace_map(rows: ConceptRows, P: torch.Tensor, lam: float, erase_scale: float) -> torch.Tensor:
    """M with W' = W M, preserving by null-space projection: the change is Delta P with P the projector of
    `null_space_projector`, and Delta minimises UCE's erase and ridge terms (paper, eq. 7) in that space,

        min_Delta  s_e sum_i |(W + Delta P) c_i - W g_i|^2 + lam |Delta P|_F^2

    (AlphaEdit's eq. 8 with UCE's objective). Setting the gradient to zero, with R = W (G - C)^T and
    B = s_e P C^T C P + lam I (which commutes with P):

        Delta P = s_e R C P B^-1,   so   M = I + s_e (G - C)^T C P B^-1,

    again the same d x d map for every projection. For a preserved key k, W' k - W k = Delta P k, and
    |P k|^2 is at most the sum of the eigenvalues below the threshold: zero for keys in the span of the
    kept eigenvectors. float64."""
    C, G = rows.C.double(), rows.G.double()
    eye = torch.eye(C.shape[1], dtype=torch.float64, device=C.device)
    B = erase_scale * P @ C.T @ C @ P + lam * eye
    # (M - I)^T = s_e B^-1 P C^T (G - C), B and P symmetric: one solve.
    return eye + erase_scale * torch.linalg.solve(B, P @ C.T @ (G - C)).T


class UceEditor:
    """The `uce` editor plugin."""

    name: ClassVar[str] = "uce"
    families: ClassVar[tuple[str, ...]] = ("diffusion",)
    request_type: ClassVar[type] = UceRequest

    def __init__(self, reader: AttributeReader | None = None):
        """`reader` overrides the request's attribute reader (for callers with their own classifier)."""
        self.reader = reader

    def with_context(self, request: Any, context: EditContext) -> Any:
        """Load the CLIP model a debias request reads attributes with, unless a reader was handed in."""
        if (not isinstance(request, UceRequest) or request.mode != "debias" or self.reader is not None
                or request.read is not None):
            return request
        _resolve(request)  # a bad request is refused before a model is loaded for it
        name, read = registry_clip_reader(context.derived.registry, request.reader, request.all_templates())
        return replace(request, reader=name, read=read)

    def edit(self, model: LoadedModel, request: UceRequest, progress: EditProgress | None = None) -> EditResult:
        side = text_side(model)
        plan = _plan(side, request)
        reader = self.reader or request.read
        if request.mode == "debias" and reader is None:
            raise BadInput(f"the debias reader {request.reader!r} is not loaded: edit through `Zoo.edit`, which "
                           "loads the registry's CLIP model, or hand a reader in as `read`")
        names = cross_attention_projections(side.unet, request.projections, request.layers)
        modules = [side.unet.get_submodule(n) for n in names]
        W0 = [m.weight.detach().clone() for m in modules]
        before = {f"{UNET}/{n}.weight": w for n, w in zip(names, W0, strict=True)}

        applied = [torch.eye(W0[0].shape[1], dtype=torch.float64, device=W0[0].device)]  # the map the weights now hold

        projector = (null_space_projector(plan.preserved_keys(), plan.resolved.nullspace_threshold)
                     if plan.resolved.preserve_mode == "nullspace" else None)
        if projector is not None and not projector.any():
            raise BadInput(f"the preserved prompts' {len(plan.preserved_keys())} token embeddings span all "
                           f"{projector.shape[0]} dimensions, so nothing can change without moving them: preserve "
                           "fewer prompts or raise nullspace_threshold")

        def apply(rows: ConceptRows) -> None:
            M = (uce_map(rows, request.lam, request.erase_scale, request.preserve_scale) if projector is None
                 else nullspace_map(rows, projector, request.lam, request.erase_scale))
            with torch.no_grad():
                for module, w in zip(modules, W0, strict=True):
                    module.weight.copy_((w.double() @ M).to(w.dtype))
            applied[0] = M

        metrics: dict[str, object] = {}
        if request.mode == "debias":
            assert reader is not None
            rows, metrics = _debias(model, plan, reader, apply, progress)
        else:
            rows = plan.rows(np.zeros((0, 0)))
            apply(rows)
            if progress is not None:
                progress(1, 1, {})
        metrics |= _fit_metrics(rows, W0, applied[0])
        if plan.kept:
            keys = plan.preserved_keys()
            metrics |= {"preserved_keys": len(keys), "preserve_drift_max": _largest_drift(keys, W0, applied[0])}
        if projector is not None:
            metrics["null_space_dim"] = round(float(torch.trace(projector)))
        changed = changed_tensors(model, list(before), before)
        metrics |= {"edited_tensors": len(changed), "concept_rows": rows.counts}
        settings = {k: v for k, v in asdict(plan.resolved).items() if k != "read"}
        return EditResult(changed=changed, params={**settings, "edited_modules": names}, metrics=metrics,
                          factors=_low_rank(rows, applied[0], {n: w for n, w in before.items() if n in changed}))


def _low_rank(rows: ConceptRows, M: torch.Tensor, W0: dict[str, torch.Tensor]) -> dict[str, LowRank]:
    """Each changed projection's change W (M - I) as factors (W U) V, where its rank is below half the
    weight's smaller side; wider changes stay dense. N - A = s_e (G - C)^T C, so M - I = (G - C)^T V with
    V = s_e C A^-1: U = (G - C)^T (one column per edited row), and V is read back from M by least squares
    (exact: M - I lies in U's column space), which spares a second solve."""
    U = (rows.G - rows.C).double().T.cpu()
    if not W0 or 2 * U.shape[1] >= min(min(w.shape) for w in W0.values()):
        return {}
    # on the CPU, where the registry keeps the factors
    V = torch.linalg.lstsq(U, M.double().cpu() - torch.eye(U.shape[0], dtype=torch.float64)).solution
    dtype = torch.promote_types(next(iter(W0.values())).dtype, torch.float32)
    A = V.to(dtype).contiguous()
    return {name: LowRank((w.double().cpu() @ U).to(dtype).contiguous(), A) for name, w in W0.items()}


Span = tuple[str, int]
"""A text and the position its token rows start from (the start token is position 0)."""


@dataclass
class _Plan:
    """A validated request with all its texts encoded once (`hidden[index[text]]`, length x d)."""

    resolved: UceRequest
    pairs: list[tuple[Span, Span]]
    """(edited, guide) for erase and moderate; (debias prompt, its own end) for debias."""
    preserve: list[Span]
    attributes: list[tuple[int, list[Span]]]
    """Per pair, in debias mode: its prompt's number and the attribute texts in the pair's template."""
    hidden: torch.Tensor
    index: dict[str, int]
    kept: list[str] = field(default_factory=list)
    """The texts every position of which is a preserved key (null-space mode) or checked for drift."""

    def preserved_keys(self) -> torch.Tensor:
        """K_p as rows: the text encoder's output at every position of every kept text (what the UNet's
        cross-attention reads of them, padding included)."""
        return torch.cat([self.hidden[self.index[t]] for t in self.kept])

    def _aligned(self, spans: Sequence[Span]) -> list[torch.Tensor]:
        """Each span's start token, or ("last_and_following") it and the positions after it, cut to a
        common length so that position k of one pairs with position k of another."""
        n = 1 if self.resolved.tokens == "last" else self.hidden.shape[1] - max(a for _, a in spans)
        return [self.hidden[self.index[t], a : a + n] for t, a in spans]

    def rows(self, scales: np.ndarray) -> ConceptRows:
        """Rows for the solve; in debias mode `scales[p, a]` weights attribute a's tokens in prompt p's target."""
        C: list[torch.Tensor] = []
        G: list[torch.Tensor] = []
        for k, (edited, guide) in enumerate(self.pairs):
            if self.resolved.mode == "debias":
                p, attribute_spans = self.attributes[k]
                own, *mix = self._aligned([edited, *attribute_spans])
                C.append(own)
                G.append(own + sum(float(s) * m for s, m in zip(scales[p], mix, strict=True)))
            else:
                c, g = self._aligned([edited, guide])
                C.append(c)
                G.append(g)
        # The older script preserves every position of a preserved text; the current one its last token.
        P = [self.hidden[self.index[t]] if self.resolved.tokens == "last_and_following" else self._aligned([(t, a)])[0]
             for t, a in self.preserve]
        return ConceptRows(
            C=torch.cat(C), G=torch.cat(G),
            P=torch.cat(P) if P else torch.zeros(0, self.hidden.shape[-1], device=self.hidden.device),
            counts={"edited": sum(len(c) for c in C), "preserved": sum(len(p) for p in P)},
        )


def _check_numbers(r: UceRequest) -> None:
    if r.mode not in MODES:
        raise BadInput(f"unknown UCE mode {r.mode!r}; choose {', '.join(MODES)}")
    if r.tokens not in TOKEN_CHOICES:
        raise BadInput(f"unknown token choice {r.tokens!r}; choose {', '.join(TOKEN_CHOICES)}")
    if r.preserve_mode not in PRESERVE_MODES:
        raise BadInput(f"unknown preserve mode {r.preserve_mode!r}; choose {', '.join(PRESERVE_MODES)}")
    if not 0 <= r.nullspace_threshold < 1:
        raise BadInput(f"nullspace_threshold is a fraction of the keys' mean squared norm in [0, 1), got "
                       f"{r.nullspace_threshold}")
    if r.preserve_mode == "nullspace" and not r.preserve and not r.keep_empty:
        raise BadInput("null-space mode keeps the preserved concepts' outputs: give --preserve, or keep the "
                       "empty prompt (keep_empty)")
    if not (r.lam > 0 and math.isfinite(r.lam)):
        raise BadInput(f"lam must be a positive number (it keeps the solve invertible), got {r.lam}")
    for what, value in (("erase_scale", r.erase_scale), ("preserve_scale", r.preserve_scale)):
        if not (value >= 0 and math.isfinite(value)):
            raise BadInput(f"{what} must be >= 0, got {value}")
    bad = [t for t in (*r.templates, "{}") if t.count("{") != 1 or t.count("}") != 1 or "{}" not in t]
    if bad or not r.templates:
        raise BadInput(f"a template holds one '{{}}' where the concept goes, e.g. 'a {{}} circle'; got {bad or '()'}")
    unknown = sorted(set(r.projections) - set(PROJECTIONS)) or ([] if r.projections else ["(none)"])
    if unknown:
        raise BadInput(f"UCE edits the cross-attention projections {'/'.join(PROJECTIONS)}, not {unknown}")


def _check_debias(r: UceRequest) -> None:
    if r.erase or r.targets:
        raise BadInput("debias mode balances --debias prompts; it takes no --erase or --target")
    if not r.debias:
        raise BadInput("debias mode needs at least one prompt to debias (--debias 'a circle')")
    if len(r.attributes) < 2 or len(set(r.attributes)) != len(r.attributes):
        raise BadInput(f"debiasing needs two or more distinct attributes (--attribute), got {list(r.attributes)}")
    if r.ratios and len(r.ratios) != len(r.attributes):
        raise BadInput(f"{len(r.ratios)} ratios for {len(r.attributes)} attributes; give one per attribute")
    if r.ratios and (min(r.ratios) < 0 or abs(sum(r.ratios) - 1) > 1e-6):
        raise BadInput(f"ratios must be >= 0 and sum to 1, got {list(r.ratios)}")
    for what, value, low in (("max_iterations", r.max_iterations, 1), ("samples_per_prompt", r.samples_per_prompt, 1),
                             ("sample_steps", r.sample_steps, 1)):
        if value < low:
            raise BadInput(f"{what} must be at least {low}, got {value}")
    if not 0 < r.tolerance < 1 or not r.step_size > 0:
        raise BadInput("tolerance must lie in (0, 1) and step_size be positive")


def _resolve(r: UceRequest) -> UceRequest:
    """The request with its implied parts filled in (mode rules, default guides and ratios), checked."""
    _check_numbers(r)
    if r.mode == "debias":
        _check_debias(r)
        ratios = r.ratios or tuple(1 / len(r.attributes) for _ in r.attributes)
        return UceRequest(**{**asdict(r), "ratios": ratios, "preserve": tuple(r.preserve)})
    if r.debias or r.attributes or r.ratios:
        raise BadInput(f"--debias/--attribute/--ratio belong to debias mode, not {r.mode}")
    if not r.erase:
        raise BadInput(f"{r.mode} needs at least one concept to erase (--erase)")
    targets = r.targets
    preserve = r.preserve
    if r.mode == "moderate":
        if any(targets):
            raise BadInput("moderation edits towards the empty prompt; it takes no --target")
        targets, preserve = ("",), ("", *(p for p in preserve if p))
    if len(targets) not in (0, 1, len(r.erase)):
        raise BadInput(f"{len(targets)} targets for {len(r.erase)} erased concepts; give none, one, or one each")
    guides = tuple(targets) * (len(r.erase) if len(targets) == 1 else 1) or ("",) * len(r.erase)
    return UceRequest(**{**asdict(r), "targets": guides, "preserve": tuple(dict.fromkeys(preserve))})


def _plan(side: TextSide, request: UceRequest) -> _Plan:
    """Validate every concept and its templated texts against the tokenizer; encode all texts at once."""
    r = _resolve(request)
    templates = r.all_templates()
    ids: dict[str, tuple[int, ...]] = {}

    def span(template: str, concept: str, what: str, allow_empty: bool = False, at_end: bool = False) -> Span:
        """The concept in the template, starting at the concept's last token (or the text's, `at_end`)."""
        side.token_ids(concept, what, allow_empty)
        text = in_template(template, concept)
        ids[text] = tuple(side.token_ids(text, what, allow_empty))
        # BPE splits words on whitespace first, so the head's tokens are the text's first tokens.
        head = text if at_end else template.split("{}")[0] + concept
        return text, len(side.token_ids(head, what, allow_empty=True))

    pairs: list[tuple[Span, Span]] = []
    for concept, guide in zip(r.erase, r.targets, strict=True):
        if side.token_ids(concept, "erased concept") == side.token_ids(guide, "target concept", allow_empty=True):
            raise BadInput(f"erased concept {concept!r} is its own target; nothing would change")
        guide_templates = templates if r.template_guides else ["{}"] * len(templates)
        pairs += [(span(t, concept, "erased concept"), span(g, guide, "target concept", allow_empty=True))
                  for t, g in zip(templates, guide_templates, strict=True)]
    preserve = [span(t, p, "preserved concept", allow_empty=True) for p in r.preserve for t in templates]
    # A debias prompt lacks the attribute, so its rows start at its last token and pair with the rows
    # that end each attribute's text ("circle", end-of-text, ... of "a circle" and of "a red circle").
    attributes: list[tuple[int, list[Span]]] = []
    for p, prompt in enumerate(r.debias):
        for t in templates:
            own = span("{}", prompt, "debias prompt")
            pairs.append((own, own))
            attributes.append((p, [span(t, a, "attribute", at_end=True) for a in r.attributes]))
    empty = ([span("{}", "", "preserved concept", allow_empty=True)]
             if r.preserve_mode == "nullspace" and r.keep_empty else [])
    kept = list(dict.fromkeys(text for text, _ in [*preserve, *empty]))
    edited = {ids[text]: text for (text, _), _ in pairs}
    clash = [(edited[ids[text]], text) for text in [*(t for t, _ in preserve), *kept] if ids[text] in edited]
    if clash:
        raise BadInput(f"{clash[0][0]!r} is both edited and preserved; drop it from one of the two sets")
    texts = list(ids)
    return _Plan(r, pairs, preserve, attributes, side.encode(texts), {t: i for i, t in enumerate(texts)}, kept)


def _observed(
    model: LoadedModel, r: UceRequest, reader: AttributeReader
) -> tuple[np.ndarray, np.ndarray]:
    """Share of each attribute among the images read as one of them, per debias prompt, and the share
    of images read as any; the same seeds every call, so iterations compare like with like."""
    shares, read = [], []
    for p, prompt in enumerate(r.debias):
        labels = read_drawn(model, prompt, r.samples_per_prompt, r.seed + 1000 * p, reader, r.attributes,
                            num_inference_steps=r.sample_steps, guidance_scale=r.guidance_scale)
        counts = np.array([sum(label == a for label in labels) for a in r.attributes], dtype=np.float64)
        # Shares among the images showing one of the attributes, so the gaps sum to 0 and the targets'
        # attribute mixture keeps its overall size.
        shares.append(counts / counts.sum() if counts.sum() else np.array(r.ratios))
        read.append(counts.sum() / len(labels))
    return np.array(shares), np.array(read)


def _debias(
    model: LoadedModel,
    plan: _Plan,
    reader: AttributeReader,
    apply: Callable[[ConceptRows], None],
    progress: EditProgress | None,
) -> tuple[ConceptRows, dict[str, object]]:
    """The reference loop: measure, stop when every share is within tolerance, else add the gaps to the
    attribute coefficients and solve again from the original weights."""
    r = plan.resolved
    desired = np.array(r.ratios)
    scales = np.zeros((len(r.debias), len(r.attributes)))
    rows = plan.rows(scales)
    history: list[list[list[float]]] = []
    step, previous = r.step_size, None
    for iteration in range(r.max_iterations + 1):
        shares, read = _observed(model, r, reader)
        history.append(shares.round(3).tolist())
        gap = desired[None] - shares
        gap[np.abs(gap).max(1) < r.tolerance] = 0
        # Images showing none of the attributes carry no direction: keep the last one, and never stop there.
        unread = read == 0
        gap[unread] = 0 if previous is None else previous[unread]
        if progress is not None:
            progress(iteration, r.max_iterations, {"max_gap": float(np.abs(desired[None] - shares).max())})
        if (not gap.any() and not unread.any()) or iteration == r.max_iterations:
            break
        # Where the attribute flips sharply with the conditioning a fixed step jumps across the flip
        # for ever (measured on the shapes world); halving at each overshoot turns it into bisection.
        if r.halve_on_overshoot and previous is not None and (np.sign(gap) * np.sign(previous) < 0).any():
            step /= 2
        previous = gap
        scales += step * gap
        rows = plan.rows(scales)
        apply(rows)
    return rows, {
        "iterations": iteration, "observed_ratios": shares.round(4).tolist(), "read_share": read.round(4).tolist(),
        "attribute_scales": scales.round(4).tolist(), "ratio_history": history, "final_step": step,
    }


def _largest_drift(keys: torch.Tensor, W0: Sequence[torch.Tensor], M: torch.Tensor) -> float:
    """max over keys k of |W (M - I) k| / |W k|, the edited projections stacked (via K = sum_l W_l^T W_l)."""
    K = sum(w.double().T @ w.double() for w in W0)
    assert isinstance(K, torch.Tensor)
    X = keys.double()
    D = X @ (M - torch.eye(M.shape[0], dtype=M.dtype, device=M.device)).T
    return float((((D @ K) * D).sum(1) / ((X @ K) * X).sum(1).clamp_min(1e-30)).sqrt().max())


def _fit_metrics(rows: ConceptRows, W0: Sequence[torch.Tensor], M: torch.Tensor) -> dict[str, float]:
    """How well the edited projections, stacked, hit their targets and keep preserved outputs:
    |W (M C^T - G^T)| / |W G^T| and |W (M P^T - P^T)| / |W P^T|, via K = sum_l W_l^T W_l (d x d)."""
    K = sum(w.double().T @ w.double() for w in W0)
    assert isinstance(K, torch.Tensor)

    def relative(X: torch.Tensor, Y: torch.Tensor) -> float:
        if not len(X):
            return 0.0
        R = M @ X.double().T - Y.double().T
        Yt = Y.double().T
        return float(((K * (R @ R.T)).sum() / (K * (Yt @ Yt.T)).sum().clamp_min(1e-30)).sqrt())

    return {"erase_residual": relative(rows.C, rows.G), "preserve_drift": relative(rows.P, rows.P)}
