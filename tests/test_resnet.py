"""The resnet arch (models/blocks.py): shapes and levels, blocks that start as the identity, train = eval
(no normalisation), the knobs, the label bias, and AE / VAE / CVAE on it through build_model and checkpoints."""

from __future__ import annotations

import pytest
import torch

from vaedist.checkpoint import load_model, save_checkpoint
from vaedist.config import ConfigError, ModelConfig
from vaedist.models import AutoEncoder, build_model, to_model_input
from vaedist.models.blocks import ResBlock, ResNetDecoder, ResNetEncoder

SMALL = {"latent_dim": 4, "base_channels": 4, "depth": 2, "blocks_per_level": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: small models run faster on one


def resnet_model(variant: str, likelihood: str = "logistic", shape=(16, 16, 3), **overrides):
    torch.manual_seed(0)
    return build_model(
        ModelConfig(variant=variant, arch="resnet", **{**SMALL, **overrides}), shape, 10, likelihood
    )


def images(b: int, shape=(16, 16, 3), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return to_model_input(torch.randint(0, 256, (b, *shape), generator=g, dtype=torch.uint8))


def test_encoder_and_decoder_shapes_and_levels():
    enc = ResNetEncoder((16, 12, 3), 10, base_channels=4, depth=2, blocks_per_level=1, cond_dim=0)
    dec = ResNetDecoder((16, 12, 3), 6, 5, base_channels=4, depth=2, blocks_per_level=1)
    assert enc.level_shapes == dec.level_shapes == {1: (4, 8, 6), 2: (8, 4, 3)}  # c_l as the conv arch's
    out, feats = enc.pyramid(torch.rand(7, 3, 16, 12))
    assert out.shape == (7, 10) and {lv: tuple(f.shape[1:]) for lv, f in feats.items()} == enc.level_shapes
    seen: list[tuple[int, tuple]] = []
    params = dec(torch.randn(7, 5), inject=lambda lv, h: seen.append((lv, tuple(h.shape[1:]))) or h)
    assert params.shape == (7, 6, 16, 12) and seen == [(2, (8, 4, 3)), (1, (4, 8, 6))]  # top first
    with pytest.raises(ValueError, match="divisible by 8"):
        ResNetEncoder((28, 28, 1), 4, depth=3)


def test_residual_blocks_start_as_the_identity_and_train_equals_eval():
    block = ResBlock(5, "silu")
    x = torch.randn(2, 5, 6, 6)
    assert torch.equal(block(x), x)  # zero-initialised last conv (Fixup / SkipInit)
    with torch.no_grad():
        block.branch[-1].weight.normal_()
    assert not torch.allclose(block(x), x)

    model = resnet_model("vae")
    x = images(4)
    g = torch.Generator().manual_seed(1)
    train_loss = model.train().loss_from_forward(x, model(x, generator=g)).neg_elbo
    g = torch.Generator().manual_seed(1)
    eval_loss = model.eval().loss_from_forward(x, model(x, generator=g)).neg_elbo
    assert torch.equal(train_loss, eval_loss)  # no batch norm, no dropout: one function in both modes
    assert not any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm | torch.nn.Dropout) for m in model.modules()
    )


def test_knobs_shape_the_network():
    model = resnet_model("vae", blocks_per_level=3, activation="silu", base_channels=6)
    blocks = [m for m in model.encoder.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 3 * (SMALL["depth"] + 1)  # per level: full resolution, H/2, H/4
    assert len([m for m in model.decoder.modules() if isinstance(m, ResBlock)]) == len(blocks)
    assert any(isinstance(m, torch.nn.SiLU) for m in model.modules())
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    assert model.encoder.stem.out_channels == 6 and model.hparams["blocks_per_level"] == 3
    assert model.hparams["activation"] == "silu"
    assert "blocks_per_level" not in build_model(ModelConfig(variant="vae", arch="conv"), (16, 16, 3), 10,
                                                 "logistic").hparams  # fmt: skip
    with pytest.raises(ConfigError, match="model.blocks_per_level"):
        ModelConfig(blocks_per_level=0)
    with pytest.raises(ConfigError, match="model.activation: 'tanh' is not one of relu, silu"):
        ModelConfig(activation="tanh")


def test_the_label_enters_the_encoder_as_a_channel_bias():
    """A label code ``(B, k)`` adds ``W code`` to every pixel of the stem's output: the response of a 1x1
    convolution to ``k`` constant label maps, without building them."""
    model = resnet_model("cvae")
    x, y = images(2), torch.tensor([1, 2])
    code = model.label_code(y)  # (2, 10) one-hot
    maps = code[:, :, None, None].expand(-1, -1, 16, 16)
    one_by_one = torch.nn.functional.conv2d(maps, model.encoder.label.weight[:, :, None, None])
    out, _ = model.encoder.pyramid(x, code)
    with torch.no_grad():
        stem = model.encoder.stem
        h = model.encoder.levels[0](stem(x) + one_by_one)
        for level, down in enumerate(model.encoder.down, start=1):
            h = model.encoder.levels[level](down(h))
    assert torch.allclose(out, model.encoder.head(h), atol=1e-6)
    assert not torch.allclose(model.encode(x, y)[0], model.encode(x, torch.tensor([2, 1]))[0])
    model.loss(x, y).loss.backward()
    assert model.encoder.label.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant,likelihood,shape", [("ae", "bernoulli", (16, 16, 1)), ("vae", "mol", (16, 16, 3)),
                                                      ("cvae", "gaussian", (16, 16, 3))])  # fmt: skip
def test_ae_vae_and_cvae_run_on_resnet_and_round_trip(tmp_path, variant, likelihood, shape):
    model = resnet_model(variant, likelihood, shape, mixtures=2)
    x = images(3, shape)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    y = torch.tensor([0, 5, 9]) if model.conditional else None
    out = model.loss(x, y, beta=0.5)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP-safe: every parameter in the loss
    assert model.sample(3, y).shape == (3, shape[2], *shape[:2]) and model.reconstruct(x, y).shape == x.shape
    if isinstance(model, AutoEncoder):
        with pytest.raises(NotImplementedError):
            model.iw_nll(x, y)
    else:
        assert torch.isfinite(model.iw_nll(x, y, k=2)).all()
    save_checkpoint(tmp_path / "model.pt", model.eval(), None, 1, {}, {})
    clone, _ = load_model(tmp_path / "model.pt")
    z = torch.randn(3, model.latent_dim)
    assert type(clone) is type(model) and torch.equal(clone.generate(z, y), model.generate(z, y))
