"""Config validation: every invalid value is one ConfigError line naming the field and what is allowed."""

import pytest

from vaedist.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    ResourcesConfig,
    TrainConfig,
    experiment_from_dict,
    flatten,
    from_flat,
)


@pytest.mark.parametrize(
    ("make", "field", "hint"),
    [
        (lambda: DataConfig(dataset="imagenet"), "data.dataset", "mnist, fashion-mnist, cifar10"),
        (lambda: DataConfig(val_size=0), "data.val_size", ">= 1"),
        (lambda: ModelConfig(variant="gan"), "model.variant", "ae, vae, cvae"),
        (lambda: ModelConfig(arch="transformer"), "model.arch", "dense, conv"),
        (lambda: ModelConfig(latent_dim=0), "model.latent_dim", ">= 1"),
        (lambda: ModelConfig(latent_dim=2.5), "model.latent_dim", "integer"),
        (lambda: ModelConfig(width=-3), "model.width", ">= 1"),
        (lambda: ModelConfig(likelihood="poisson"), "model.likelihood", "bernoulli, gaussian, logistic"),
        (lambda: ModelConfig(latent_noise=-0.1), "model.latent_noise", ">= 0"),
        (lambda: ModelConfig(conditioning="film"), "model.conditioning", "onehot, embedding"),
        (lambda: TrainConfig(epochs=-1), "train.epochs", ">= 1"),
        (lambda: TrainConfig(epochs=0), "train.epochs", ">= 1"),
        (lambda: TrainConfig(lr=0), "train.lr", "> 0"),
        (lambda: TrainConfig(lr=float("nan")), "train.lr", "> 0"),
        (lambda: TrainConfig(beta=-1), "train.beta", ">= 0"),
        (lambda: TrainConfig(batch_size=True), "train.batch_size", "integer"),
        (lambda: ResourcesConfig(workers=0), "resources.workers", ">= 1"),
        (lambda: ResourcesConfig(gpus_per_worker=-1), "resources.gpus_per_worker", ">= 0"),
    ],
)
def test_invalid_values_name_the_field(make, field, hint):
    with pytest.raises(ConfigError) as err:
        make()
    message = str(err.value)
    assert message.startswith(field + ":")
    assert hint in message
    assert "\n" not in message


def test_conv_depth_must_fit_the_image():
    with pytest.raises(ConfigError, match=r"model.depth: 3 stride-2 blocks need .* divisible by 8, but mnist is 28x28 \(use depth <= 2\)"):
        ExperimentConfig(data=DataConfig(dataset="mnist"), model=ModelConfig(arch="conv", depth=3))
    # 32x32 CIFAR takes depth 3; a dense model takes any depth.
    ExperimentConfig(data=DataConfig(dataset="cifar10"), model=ModelConfig(arch="conv", depth=3, likelihood="logistic"))
    ExperimentConfig(data=DataConfig(dataset="mnist"), model=ModelConfig(arch="dense", depth=5))


def test_bernoulli_refused_for_colour():
    with pytest.raises(ConfigError, match="model.likelihood: 'bernoulli' needs black-and-white"):
        ExperimentConfig(data=DataConfig(dataset="cifar10"), model=ModelConfig(likelihood="bernoulli"))


def test_likelihood_defaults_to_the_dataset():
    assert ExperimentConfig(data=DataConfig(dataset="mnist")).likelihood == "bernoulli"
    assert ExperimentConfig(data=DataConfig(dataset="cifar10")).likelihood == "logistic"
    assert ExperimentConfig(model=ModelConfig(likelihood="gaussian")).likelihood == "gaussian"


def test_unknown_keys_and_sections_are_named():
    with pytest.raises(ConfigError, match=r"model: unknown key 'latent' \(allowed: variant, arch, latent_dim"):
        experiment_from_dict({"model": {"latent": 3}})
    with pytest.raises(ConfigError, match=r"unknown section 'optim'"):
        experiment_from_dict({"optim": {}})
    with pytest.raises(ConfigError, match="train: must be a mapping"):
        experiment_from_dict({"train": [1, 2]})


def test_flatten_round_trip_and_frozen():
    cfg = experiment_from_dict({"model": {"latent_dim": 8, "arch": "dense"}, "train": {"epochs": 3}})
    flat = flatten(cfg)
    assert flat["model.latent_dim"] == 8 and flat["train.epochs"] == 3 and flat["data.dataset"] == "mnist"
    assert from_flat(flat) == cfg
    assert cfg.replace(**{"model.latent_dim": 4}).model.latent_dim == 4
    with pytest.raises(AttributeError):
        cfg.model.latent_dim = 3  # frozen


def test_a_config_for_a_missing_path_is_built_and_the_drivers_check_names_it(tmp_path):
    """Building or rebuilding a config reads no data: a path that does not exist makes a config (workers
    and trials rebuild it from its params); the driver's check_dataset then says what is wrong, in one line."""
    from vaedist.config import check_dataset
    from vaedist.errors import UsageError

    missing = tmp_path / "no-such-folder"
    cfg = experiment_from_dict({"data": {"dataset": str(missing)}, "model": {"arch": "dense"}})
    assert from_flat(cfg.flatten()) == cfg and cfg.likelihood == "logistic"  # a path dataset's default
    assert not missing.exists()
    with pytest.raises(UsageError, match=rf"^dataset {missing} does not exist \(a built-in name"):
        check_dataset(cfg)
    with pytest.raises(ConfigError, match="model.depth: 3 stride-2 blocks need an image side divisible by 8"):
        ExperimentConfig(model=ModelConfig(depth=3))  # a built-in dataset's facts are constants: checked at once
