"""Host traffic of the update rules in steady state: no host-to-device upload, and at most one
device-to-host read per closure pass. Run on the Triton path (the interpreter on CPU), counting, outside
the closures, every tensor the rules build from host values and every host read of a float64 tensor
(the rules reduce on the device in float64; torch's and FlatAdamW's step counters are float32 host
scalars by design, and the closure's own metrics are the training loop's business)."""

import inspect

import pytest
import torch

from gxpo_kernels import GXPO, SFPO, FlatAdamW, backend


class Counter:
    def __init__(self, monkeypatch):
        self.uploads, self.reads, self.active = [], [], False
        tensor = torch.tensor

        def counted_tensor(*args, **kwargs):
            if self.active and _from_package():
                self.uploads.append(_site())
            return tensor(*args, **kwargs)

        monkeypatch.setattr(torch, "tensor", counted_tensor)
        for name in ("item", "tolist", "__float__"):
            original = getattr(torch.Tensor, name)

            def read(t, *a, _original=original, **k):
                if self.active and t.dtype == torch.float64:
                    self.reads.append(_site())
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, read)

    def closure(self, inner):
        def wrapped():
            self.active = False
            try:
                return inner()
            finally:
                self.active = True
        return wrapped


def _from_package():
    return any("gxpo_kernels" in f.filename for f in inspect.stack()[2:6])


def _site():
    frame = next(f for f in inspect.stack()[2:] if "gxpo_kernels" in f.filename)
    return f"{frame.filename.split('gxpo_kernels/')[-1]}:{frame.lineno}"


def _problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))
    x, y = torch.randn(16, 6), torch.randn(16, 3)

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss, {"entropy_mean": 1.0}

    return model, closure


@pytest.mark.parametrize("rule,base,passes", [("gxpo", torch.optim.AdamW, 3), ("gxpo", FlatAdamW, 3),
                                              ("sfpo", torch.optim.AdamW, 4)])
def test_steady_state_uploads_nothing_and_reads_once_per_pass(monkeypatch, rule, base, passes):
    assert backend.use_triton(torch.zeros(1)), "runs the Triton path (TRITON_INTERPRET=1 on CPU)"
    model, closure = _problem()
    counter = _steady_state_counts(monkeypatch, rule, base, model, closure)
    # Parameters, moments and hyperparameters upload nothing; a gradient's pointer table goes up when the
    # allocator hands out new gradient buffers (every pass on CPU; on CUDA the caching allocator tends to
    # return the same blocks, and the upload is asynchronous from pinned memory).
    assert len(counter.uploads) <= 2 * passes, counter.uploads
    assert len(counter.reads) <= 2 * passes, counter.reads


def _steady_state_counts(monkeypatch, rule, base, model, closure) -> Counter:
    """Host traffic of two active steps after a first one (which builds the tables and counts as it likes)."""
    cls = GXPO if rule == "gxpo" else SFPO
    opt = cls(model.parameters(), base=base, lr=1e-3, gate="never", max_grad_norm=1.0)
    counter = Counter(monkeypatch)
    opt.step(counter.closure(closure))
    counter.active = True
    counter.uploads.clear(), counter.reads.clear()
    for _ in range(2):
        opt.step(counter.closure(closure))
    counter.active = False
    assert opt.last_stats["active"] == 1.0
    return counter


@pytest.mark.parametrize("rule,base", [("gxpo", torch.optim.AdamW), ("gxpo", FlatAdamW), ("sfpo", torch.optim.AdamW)])
def test_recurring_gradient_buffers_upload_nothing(monkeypatch, rule, base):
    """When backward hands out the same gradient buffers again (as CUDA's caching allocator does for the same
    sequence of allocations; modelled here by one buffer per parameter and pass), an active step uploads
    nothing at all: every pointer table is found in its group's cache."""
    model, inner = _problem()
    params = list(model.parameters())
    passes = 4 if rule == "sfpo" else 3
    buffers = [[torch.empty_like(p) for p in params] for _ in range(passes)]
    calls = []

    def closure():
        loss, metrics = inner()
        pool = buffers[len(calls) % passes]
        for p, buf in zip(params, pool, strict=True):
            p.grad = buf.copy_(p.grad)
        calls.append(1)
        return loss, metrics

    counter = _steady_state_counts(monkeypatch, rule, base, model, closure)
    assert len(calls) == 3 * passes
    assert counter.uploads == []
    assert len(counter.reads) <= 2 * passes, counter.reads
