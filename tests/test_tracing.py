import pytest
import torch
from torch import nn

from modelzoo.registry.families.stylegan import StyleGanConfig, build, latents_for_seeds
from modelzoo.registry.tracing import trace


class Boom(nn.Module):
    """Fails if reached, so a test can tell that the forward pass stopped before it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the forward pass should have stopped before this module")


@pytest.fixture
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_records_input_and_output_of_each_named_module(mlp: nn.Sequential) -> None:
    x = torch.randn(3, 4)
    with trace(mlp, ["0", "2"], retain_input=True) as traces:
        y = mlp(x)
    assert torch.equal(traces["0"].input, x)
    assert torch.equal(traces["0"].output, mlp[0](x))
    assert torch.equal(traces["2"].input, torch.relu(mlp[0](x)))
    assert torch.equal(traces["2"].output, y)
    assert not traces["2"].output.requires_grad
    assert traces["0"].calls == 1


def test_edit_output_changes_the_final_output_exactly_as_predicted(mlp: nn.Sequential) -> None:
    x = torch.randn(3, 4)
    with trace(mlp, ["0"], edit_output=lambda name, h: 2 * h) as traces:
        y = mlp(x)
    assert torch.equal(y, mlp[2](torch.relu(2 * mlp[0](x))))
    assert torch.equal(traces["0"].output, 2 * mlp[0](x))


def test_edit_input_replaces_the_first_positional_argument(mlp: nn.Sequential) -> None:
    with trace(mlp, "2", retain_input=True, edit_input=lambda name, h: torch.zeros_like(h)) as traces:
        y = mlp(torch.randn(3, 4))
    assert torch.equal(y, mlp[2].bias.expand(3, 2))
    assert torch.equal(traces["2"].input, torch.zeros(3, 8))


def test_stop_ends_the_forward_pass_after_every_named_module_ran() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), Boom())
    reached_after_forward = False
    with trace(model, ["1", "0"], stop=True) as traces:
        model(torch.randn(2, 4))
        reached_after_forward = True
    assert not reached_after_forward
    assert traces["1"].output.shape == (2, 4)
    assert _no_hooks(model)


def test_detach_false_lets_gradients_flow_through_records_and_edits(mlp: nn.Sequential) -> None:
    delta = torch.zeros(8, requires_grad=True)
    with trace(mlp, ["0", "2"], edit_output=lambda n, h: h + delta if n == "0" else h, detach=False) as tr:
        mlp(torch.randn(3, 4))
    tr["2"].output.sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_every_call_of_a_shared_module_is_recorded() -> None:
    layer = nn.Linear(3, 3)
    model = nn.Sequential(layer, layer)
    x = torch.randn(1, 3)
    with trace(model, ["0"], retain_input=True) as traces:
        model(x)
    assert traces["0"].calls == 2
    assert torch.equal(traces["0"].inputs[1], layer(x).detach())
    assert torch.equal(traces["0"].output, model(x).detach())


def test_hooks_are_removed_after_exit_and_after_an_exception(mlp: nn.Sequential) -> None:
    with trace(mlp, ["0", "1", "2"], edit_output=lambda n, h: h * 0):
        mlp(torch.randn(1, 4))
    assert _no_hooks(mlp)
    with pytest.raises(ValueError, match="user error"), trace(mlp, ["0"], edit_output=lambda n, h: h * 0):
        raise ValueError("user error")
    assert _no_hooks(mlp)
    x = torch.randn(1, 4)
    assert torch.equal(mlp(x), mlp[2](torch.relu(mlp[0](x))))


def test_unknown_module_name_raises_key_error_listing_close_matches(mlp: nn.Sequential) -> None:
    G = build(StyleGanConfig.tiny())
    with pytest.raises(KeyError, match=r"synthesis\.b8\.conv1"), trace(G, ["synthesis.b8.conv2"]):
        pass
    with pytest.raises(KeyError, match="no module named"), trace(mlp, ["0", "decoder"]):
        pass
    assert _no_hooks(mlp) and _no_hooks(G)


def test_a_module_that_did_not_run_says_so(mlp: nn.Sequential) -> None:
    with trace(mlp, ["2"], retain_output=False) as traces:
        pass
    with pytest.raises(LookupError, match="did not run"):
        _ = traces["2"].output


def test_nested_traces_each_stop_only_their_own_pass() -> None:
    G = build(StyleGanConfig.tiny()).eval()
    ws = G.mapping(latents_for_seeds([0], G.z_dim))
    with trace(G, ["synthesis.b32.conv1"]) as outer:
        with trace(G, ["synthesis.b8.conv1"], stop=True) as inner:
            G.synthesis(ws)
        image = G.synthesis(ws)
    assert inner["synthesis.b8.conv1"].output.shape == (1, 64, 8, 8)
    assert outer["synthesis.b32.conv1"].calls == 1
    assert image.shape == (1, 3, 32, 32)
