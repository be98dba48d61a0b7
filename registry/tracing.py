"""Read and rewrite named layers during a forward pass, in the spirit of baukit's TraceDict and nnsight.

Editors reach into models only through `trace`, so hooks are registered and, above all, removed in one
place: a hook left behind by a failed edit would silently change every later forward pass.

    with trace(G, ["synthesis.b64.conv1"], stop=True) as traces:
        G.synthesis(ws)                       # runs only up to b64.conv1
    features = traces["synthesis.b64.conv1"].output
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

# Whatever a module takes or returns: a tensor, or tuples, lists and dicts of them.
Value = Any
Editor = Callable[[str, Value], Value]


class StopForward(Exception):
    """Raised inside the model once every traced module has run; `trace` swallows its own."""


@dataclass
class LayerTrace:
    """One module's recorded inputs (first positional argument) and outputs, one entry per call.

    Both are what actually flowed: the input after `edit_input`, the output after `edit_output`.
    """

    name: str
    inputs: list[Value] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    calls: int = 0

    @property
    def input(self) -> Value:
        return self._last(self.inputs, "input")

    @property
    def output(self) -> Value:
        return self._last(self.outputs, "output")

    def _last(self, values: list[Value], what: str) -> Value:
        if not values:
            reason = "did not run" if self.calls == 0 else f"ran but its {what} was not retained"
            raise LookupError(f"{self.name} {reason} inside this trace")
        return values[-1]


def _detached(value: Value) -> Value:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple | list):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


def _lookup(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        known = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"; close matches: {close}" if close else f"; {len(known)} modules, e.g. {known[:5]}"
        raise KeyError(f"no module named {name!r} in {type(model).__name__}{hint}") from None


@contextmanager
def trace(
    model: nn.Module,
    names: str | Sequence[str],
    *,
    retain_input: bool = False,
    retain_output: bool = True,
    edit_input: Editor | None = None,
    edit_output: Editor | None = None,
    stop: bool = False,
    detach: bool = True,
) -> Iterator[dict[str, LayerTrace]]:
    """Hook the named submodules for the duration of the block; yields {name: LayerTrace}.

    edit_input(name, x) / edit_output(name, y) return the value that replaces the module's first
    positional argument / its output. stop=True ends the forward pass (without an error) once every
    named module has run, for callers that need features, not the model's output. detach=True keeps
    records out of the autograd graph; editors that optimise through a recorded value pass False.
    Records share storage with the model's tensors, so a later in-place op in the model shows in them.
    """
    names = [names] if isinstance(names, str) else list(dict.fromkeys(names))
    modules = {name: _lookup(model, name) for name in names}
    traces = {name: LayerTrace(name) for name in names}
    signal = StopForward()

    def pre_hook(name: str, args: tuple[Value, ...]) -> tuple[Value, ...] | None:
        if edit_input is None or not args:
            return None
        return (edit_input(name, args[0]), *args[1:])

    def post_hook(name: str, args: tuple[Value, ...], output: Value) -> Value:
        record = traces[name]
        record.calls += 1
        if edit_output is not None:
            output = edit_output(name, output)
        if retain_input:
            x = args[0] if args else None
            record.inputs.append(_detached(x) if detach else x)
        if retain_output:
            record.outputs.append(_detached(output) if detach else output)
        if stop and all(t.calls for t in traces.values()):
            raise signal
        return output

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(lambda _m, a, n=name: pre_hook(n, a)))
            handles.append(module.register_forward_hook(lambda _m, a, o, n=name: post_hook(n, a, o)))
        yield traces
    except StopForward as exc:
        if exc is not signal:
            raise
    finally:
        for handle in handles:
            handle.remove()
