"""torch.compile: a model containing a pcdeq solve compiles around it; fullgraph says why not.

Pinned behaviour (README, "Errors and guarantees"): the core's solve runs eagerly inside a
compiled model (one graph break, with our reason), forward and backward match eager mode, and
``fullgraph=True`` fails with our message instead of a compiler internal.
"""

from __future__ import annotations

import pytest
import torch
import torchdeq
from torch import nn

from torchdeq_pcdeq import PcDEQConv2d, PcDEQLinear
from torchdeq_pcdeq.core import COMPILE_REASON

pytestmark = pytest.mark.slow


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(8, 16)
        self.f = PcDEQLinear(16)
        self.deq = torchdeq.get_deq(core="pcdeq")
        self.head = nn.Linear(16, 3)

    def forward(self, u):
        x = self.f.inject(self.encoder(u))
        z_out, info = self.deq(lambda z: self.f(z, x), torch.zeros_like(x))
        return self.head(z_out[-1]), info["converged"]


def _loss_and_grads(call, model, u, labels):
    model.zero_grad(set_to_none=True)
    logits, converged = call(u)
    loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, converged


@pytest.fixture(autouse=True)
def fresh_compiler_caches():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_model_matches_eager_in_forward_and_backward():
    torch.manual_seed(0)
    model = Classifier()
    u, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    eager_loss, eager_grads, _ = _loss_and_grads(model, model, u, labels)

    compiled = torch.compile(model)
    for _ in range(2):  # the second call reuses the compiled graphs
        loss, grads, converged = _loss_and_grads(compiled, model, u, labels)
        assert bool(converged.all())
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_solve_is_the_only_graph_break_and_carries_our_reason():
    torch.manual_seed(0)
    model = Classifier()
    explanation = torch._dynamo.explain(model)(torch.randn(4, 8))
    assert explanation.graph_break_count == 1
    assert COMPILE_REASON in str(explanation.break_reasons[0].reason)


def test_fullgraph_fails_with_our_message():
    torch.manual_seed(0)
    compiled = torch.compile(Classifier(), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="fullgraph=True cannot hold a DEQ solve") as error:
        compiled(torch.randn(4, 8))
    assert COMPILE_REASON in str(error.value)


def test_a_compiled_conv_layer_alone_matches_eager():
    torch.manual_seed(0)
    f = PcDEQConv2d(4)
    x = f.inject(torch.randn(2, 4, 6, 6))
    z = torch.rand(2, 4, 6, 6)
    torch.testing.assert_close(torch.compile(f)(z, x), f(z, x))


def test_importing_the_package_leaves_the_compiler_unloaded_until_a_core_is_built():
    """torch._dynamo takes seconds to import: the solve's compile marker waits for the first core."""
    import subprocess
    import sys

    script = (
        "import sys, torchdeq, torchdeq_pcdeq\n"
        "from torchdeq_pcdeq.core import PcDEQCore\n"
        "print('torch._dynamo' in sys.modules)\n"
        "torchdeq.get_deq(core='pcdeq'), torchdeq.get_deq(core='pcdeq')\n"
        "marked = PcDEQCore.__dict__['forward']\n"
        "print(getattr(marked, '_torchdynamo_disable', False))\n"
        "from torchdeq_pcdeq.core import _EAGER_FORWARD\n"
        "print(getattr(marked, '_torchdynamo_orig_callable', None) is _EAGER_FORWARD)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    # unloaded on import; once built, the solve is marked once (not a wrapper of a wrapper)
    assert out.stdout.split() == ["False", "True", "True"]
