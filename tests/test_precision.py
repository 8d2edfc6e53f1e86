"""Mixed precision: the --precision rule (bf16 on GPUs that have it, float32 on CPU unless asked), and a
training step under CPU bf16 autocast whose networks run in bf16 while the ELBO's sums stay float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vaedist import loop
from vaedist.config import ConfigError, ModelConfig, TrainConfig
from vaedist.models import build_model, to_model_input

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: small models run faster on one


@pytest.mark.parametrize("native", [True, False])
def test_precision_picks_bf16_only_where_the_device_has_it(monkeypatch, native):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    assert loop.autocast_dtype("auto", CPU) is None  # CPU: float32 unless asked
    assert loop.autocast_dtype("fp32", CPU) is None and loop.autocast_dtype("fp32", CUDA) is None
    assert loop.autocast_dtype("bf16", CPU) is torch.bfloat16
    assert loop.autocast_dtype("auto", CUDA) is (torch.bfloat16 if native else None)
    if native:
        assert loop.autocast_dtype("bf16", CUDA) is torch.bfloat16
    else:
        with pytest.raises(ValueError, match="no native bf16"):
            loop.autocast_dtype("bf16", CUDA)
    with pytest.raises(ValueError, match="not one of auto, bf16, fp32"):
        loop.autocast_dtype("fp16", CPU)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns_that_it_is_slower(monkeypatch, recwarn, native):
    from vaedist import hardware

    monkeypatch.setattr(hardware, "native_bf16_matmul", lambda flags=None: native)  # fake the CPU's capability
    assert loop.autocast_dtype("bf16", CPU) is torch.bfloat16  # asked for: honoured either way
    slow = [w for w in recwarn if "without native bf16 matmul" in str(w.message)]
    assert len(slow) == (0 if native else 1)


def test_the_precision_knob_is_validated():
    assert TrainConfig().precision == "auto" and TrainConfig(precision="bf16").precision == "bf16"
    with pytest.raises(ConfigError, match="train.precision: 'fp16' is not one of auto, bf16, fp32"):
        TrainConfig(precision="fp16")


MODELS = [
    ("vae", "conv", "bernoulli", (16, 16, 1), {}),
    ("ae", "dense", "gaussian", (16, 16, 1), {}),
    ("cvae", "resnet", "mol", (16, 16, 3), {"stochastic_layers": 3, "mixtures": 3}),
]


def _model(variant, arch, likelihood, shape, extra):
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, arch=arch, latent_dim=4, width=32, base_channels=4, depth=2,
                      blocks_per_level=1, **extra)  # fmt: skip
    return build_model(cfg, shape, 10, likelihood)


def _data(shape, n: int = 24):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8), torch.randint(
        0, 10, (n,), generator=g
    )


@pytest.mark.parametrize("variant,arch,likelihood,shape,extra", MODELS, ids=lambda v: str(v))
def test_a_bf16_forward_keeps_the_elbo_sums_in_float32(variant, arch, likelihood, shape, extra):
    model = _model(variant, arch, likelihood, shape, extra)
    images, labels = _data(shape, 8)
    x = to_model_input(images)
    if model.likelihood.binarized:
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(1))
    y = labels if model.conditional else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y, generator=torch.Generator().manual_seed(2))
        loss = model.loss_from_forward(x, out)
    assert out["params"].dtype == torch.bfloat16  # the networks did run in bf16
    for term in (loss.loss, loss.neg_elbo, loss.recon, loss.kl, loss.kl_layers):
        assert term.dtype == torch.float32 and torch.isfinite(term).all()
    full = model.loss_from_forward(x, model(x, y, generator=torch.Generator().manual_seed(2)))
    assert torch.allclose(loss.neg_elbo, full.neg_elbo, rtol=0.02)  # bf16 networks, about the same bound


class _Recording(loop.ElboObjective):
    """The objective train_epoch calls, keeping what each step returned."""

    def __init__(self, model):
        super().__init__(model)
        self.outputs = []

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.outputs.append(out)
        return out


@pytest.mark.parametrize("variant,arch,likelihood,shape,extra", MODELS[::2], ids=lambda v: str(v))
def test_train_epoch_runs_steps_under_cpu_bf16_autocast(variant, arch, likelihood, shape, extra):
    core = _model(variant, arch, likelihood, shape, extra)
    objective = _Recording(core)
    before = [p.detach().clone() for p in core.parameters()]
    dtypes = []
    core.decoder.register_forward_hook(lambda _m, _i, out: dtypes.append(out.dtype))
    images, labels = _data(shape)
    sums = loop.train_epoch(
        objective, core, torch.optim.Adam(core.parameters(), lr=1e-3),
        loop.index_batches(images, labels, np.arange(len(images)), 8), 3,
        beta_at=lambda step: 1.0, free_bits=0.0, generator=torch.Generator().manual_seed(0), device=CPU,
        autocast_dtype=loop.autocast_dtype("bf16", CPU),
    )  # fmt: skip
    assert sums.count == 24 and all(np.isfinite([sums.neg_elbo, sums.recon, sums.kl, sums.loss]))
    assert dtypes == [torch.bfloat16] * 3
    assert all(o.loss.dtype == o.neg_elbo.dtype == o.kl.dtype == torch.float32 for o in objective.outputs)
    assert not torch.is_autocast_enabled("cpu")  # the context ended with the step
    assert any(not torch.equal(a, b) for a, b in zip(before, core.parameters(), strict=True))
    assert all(p.dtype == torch.float32 for p in core.parameters())  # master weights stay float32
