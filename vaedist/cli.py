"""The ``vaedist`` command line: parses flags, builds configs, calls one function per command.

Exit codes: 0 ok, 1 failed, 2 bad usage. Errors vaedist expects (bad config, missing data, unreachable
servers) print one line, ``error: ...``, never a traceback.

Values are checked where the config is built (:mod:`vaedist.config`); the choice lists here are that
module's vocabularies. Everything heavier than click and the configs is imported inside the command that
needs it, so that ``vaedist --help`` answers at once.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from typing import Any

import click

from vaedist import __version__, console
from vaedist.cli_common import echo, given
from vaedist.cli_evaluate import evaluate
from vaedist.config import (
    ACTIVATIONS,
    ARCHS,
    DATASET_NAMES,
    IMAGE_FORMATS,
    LIKELIHOODS,
    PRECISIONS,
    SECTIONS,
    VARIANTS,
    DataConfig,
    GenerateConfig,
    ModelConfig,
    ResourcesConfig,
    TrainConfig,
    default_help,
)
from vaedist.dataset_flags import (
    DATASET_HELP,
    DATASET_OPTIONS,
    JOB_DATASET_HELP,
    dataset_options,
    dataset_override,
    dataset_string,
)
from vaedist.errors import VaedistError


class Group(click.Group):
    """Turns vaedist's own errors, and click's usage errors in a command's flags, into one line and an
    exit code (click's default is three: usage, a hint, the error)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except VaedistError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vaedist")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Also show Ray's and MLflow's INFO logs (always in Ray's log files) [default: $VAEDIST_VERBOSE].",
)
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Train and tune VAEs on Ray, track them in MLflow, generate labelled synthetic images to Parquet.

    \b
    Quick start (local Ray, MLflow in ./mlflow.db):
      vaedist data fetch mnist
      vaedist train --dataset mnist --variant cvae --arch conv --epochs 2 --workers 2
      vaedist ui
    """
    # Before any command imports Ray or MLflow: both read their logging settings at import.
    ctx.with_resource(console.configured(verbose))


# ------------------------------------------------------------------------------------------- data


@main.group(help=f"Download, verify and describe the datasets ({', '.join(DATASET_NAMES)}).")
def data() -> None:
    pass


@data.command("fetch")
@click.argument("name")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Cache folder [default: $VAEDIST_DATA_DIR or ~/.cache/vaedist/data].")
def data_fetch(name: str, data_dir: str | None) -> None:
    """Download NAME's official files (trying mirrors in turn) and verify their md5."""
    from vaedist.data import fetch

    folder = fetch(name, root=data_dir)
    echo(f"{name}: verified in {folder}")


@data.command("info")
@click.argument("name", metavar="NAME|PATH")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Cache folder [default: $VAEDIST_DATA_DIR or ~/.cache/vaedist/data].")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@dataset_options
def data_info(name: str, data_dir: str | None, as_json: bool, **options: Any) -> None:
    """Where NAME's files are, whether they verify, and per split: count, image shape, rows per class.

    NAME may be a path to an image folder or Parquet table: it is listed, decoded once into the cache and
    described the way training will see it.
    """
    from vaedist.data import dataset_info
    from vaedist.data.sources import absolute, is_path

    name = dataset_string(name, options) or name
    info = dataset_info(absolute(name) if is_path(name) else name, root=data_dir)
    if as_json:
        echo(json.dumps(info, indent=2, default=str))
        return
    echo(f"{info['name']}: {info['folder']}")
    for fname, status in info["files"].items():
        echo(f"  {status:8s} {fname}")
    if not info["ready"]:
        echo(f"  not ready: run 'vaedist data fetch {name}' (or point VAEDIST_DATA_DIR at the official files)")
    names = info["class_names"]
    for split, s in info["splits"].items():
        h, w, c = s["image_shape"]
        echo(f"  {split:5s} {s['count']:6d} images {h}x{w}x{c}")
        echo("        per class: " + ", ".join(f"{n}={k}" for n, k in zip(names, s["class_counts"], strict=True)))
    if info["splits"]:
        train = info["splits"]["train"]["count"] + info["splits"]["val"]["count"]
        echo(f"  {train:,} training images (train + val), {len(names)} classes; test split: {info['test_split']}; "
             f"fingerprint {info['fingerprint']}")  # fmt: skip
    if info["skipped"]:
        echo(f"  skipped {len(info['skipped'])} unreadable image(s), e.g. {info['skipped'][0]}")


# ------------------------------------------------------------------------------------------ train


def _sections(flags: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flags named after config fields -> overrides by section, e.g. {"latent_dim": 8, "workers": None}
    -> {"model": {"latent_dim": 8}}. Field names are unique across the sections of a training config."""
    section_of = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in given(**flags).items():
        nested.setdefault(section_of[key], {})[key] = value
    return nested


def _field_options(cls: type, fields_: tuple[tuple, ...]):
    """One option per config field: ``(field, help[, choices])`` -> ``--field-name``, typed as its default
    (or one of the choices), its help ending in the dataclass's default."""

    def add(fn):
        for field, text, *choices in reversed(fields_):
            kind = click.Choice(choices[0]) if choices else type(next(f.default for f in fields(cls) if f.name == field))
            fn = click.option(f"--{field.replace('_', '-')}", type=kind, help=f"{text} {default_help(cls, field)}.")(fn)
        return fn

    return add


@main.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="A train job spec (jobs/train-*.yaml) to start from; flags override it.")
@click.option("--dataset", metavar="NAME|PATH", help=f"{DATASET_HELP} {default_help(DataConfig, 'dataset')}.")
@dataset_options
@click.option("--memory-budget", help="Train splits decoded larger than this (512MB, 2GiB) stream through Ray Data instead of loading whole [default: half the object store].")
@_field_options(ModelConfig, (
    ("variant", "ae = autoencoder + latent noise, vae, cvae = label-conditioned", VARIANTS),
    ("arch", "Encoder/decoder family; resnet = residual blocks at every resolution", ARCHS),
    ("latent_dim", "Size of z (of the top latent in a hierarchical model)"),
    ("width", "Dense: hidden units per layer"),
    ("base_channels", "Conv, resnet: channels of the first block"),
    ("depth", "Dense: hidden layers; conv, resnet: stride-2 halvings"),
    ("blocks_per_level", "Resnet: residual blocks at each resolution"),
    ("activation", "Nonlinearity of encoder and decoder", ACTIVATIONS),
    ("stochastic_layers", "vae, cvae: latent layers; > 1 makes a hierarchical VAE with top-down inference, at most depth + 1"),
    ("latent_channels", "Hierarchical VAE: channels of each latent map below the top latent"),
))
@click.option("--likelihood", type=click.Choice(LIKELIHOODS), help="p(x|z); mol = discretized mixture of logistics [default: the dataset's].")
@click.option("--mixtures", type=int, help=f"mol: logistic components per pixel {default_help(ModelConfig, 'mixtures')}.")
@_field_options(TrainConfig, (
    ("epochs", "Epochs"),
    ("batch_size", "Global batch size, split across workers"),
    ("lr", "Adam learning rate"),
    ("beta", "KL weight; 1 is the true ELBO"),
    ("kl_warmup_epochs", "Ramp the KL weight linearly from 0 over this many epochs"),
    ("free_bits", "Nats per latent dim (per layer in a hierarchical VAE) below which KL is not penalised"),
    ("precision", "Mixed precision: auto = bf16 autocast on GPUs that have it, fp32 on CPU; bf16; fp32", PRECISIONS),
    ("seed", "Seed for init, shuffling and binarization"),
))
@click.option("--workers", type=int, help=f"Ray Train workers (DDP ranks) {default_help(ResourcesConfig, 'workers')}.")
@click.option("--gpus-per-worker", type=float, help="GPUs per worker; 0 trains on CPUs [default: 1 where the cluster has a GPU for every worker, else 0].")
@click.option("--cpus-per-worker", type=float, help="CPUs per worker [default: the node's CPUs / workers].")
@click.option("--address", help="Ray cluster address [default: $RAY_ADDRESS, else local Ray in-process].")
@click.option("--name", help="Run name; the same name resumes from its last checkpoint [default: derived from the config].")
@click.option("--storage-path", help="Checkpoint storage (folder, s3://...) [default: $VAEDIST_STORAGE_PATH or ./vaedist-runs].")
@click.option("--dry-run", is_flag=True, help="Validate and print the resolved config, train nothing.")
def train(config_path: str | None, name: str | None, storage_path: str | None, dry_run: bool, **flags: Any) -> None:
    """Train one model with Ray Train DDP and record it in MLflow (params, metrics, pictures, model).

    The model is registered as vaedist-<dataset>; the alias 'champion' moves to it if it beats the
    current champion on validation -ELBO.
    """
    from vaedist.jobs import load_spec, spec_from_dict, train_summary

    if any(flags.get(key) is not None for key in DATASET_OPTIONS) and flags.get("dataset") is None and config_path:
        flags["dataset"] = load_spec(config_path).sections.get("data", {}).get("dataset")  # the spec's, shaped
    flags["dataset"] = dataset_string(flags.get("dataset"), flags)
    overrides = _sections(flags)
    if config_path:
        spec = load_spec(config_path, overrides=overrides)
    else:
        spec = spec_from_dict({"kind": "train", **overrides}, default_name="train")
    cfg = spec.experiment
    # A spec's own name stands for the spec as written; flags that change the model or training make
    # another config, named from it (else it would be refused as a changed config under the spec's name).
    # Where it runs (resources) is not part of a run's identity.
    changed = any(section != "resources" for section in overrides)
    name = name or (spec.name if config_path and not changed else None)
    if dry_run:
        from vaedist.config import check_dataset
        from vaedist.train import default_run_name

        check_dataset(cfg)  # training checks it itself, before Ray starts
        echo(f"name: {name or default_run_name(cfg)}")
        for key, value in cfg.flatten().items():
            echo(f"  {key} = {value}")
        return
    from vaedist.train import run_training

    result = run_training(cfg, name=name, storage=storage_path, echo=echo)
    train_summary(result, echo)


# -------------------------------------------------------------------------------------------- run


@main.command()
@click.argument("job")
@click.option("--preset", help="A preset of the spec, e.g. 'smoke' for a one-minute run.")
@click.option("--dataset", metavar="NAME|PATH", help=JOB_DATASET_HELP)
@click.option("--dry-run", is_flag=True, help="Validate the spec and print it, run nothing.")
def run(job: str, preset: str | None, dataset: str | None, dry_run: bool) -> None:
    """Run a job spec here: JOB is jobs/NAME.yaml or just NAME (e.g. demo, tune-mnist)."""
    from vaedist.jobs import JOB_KINDS, load_spec, run_spec

    spec = load_spec(job, preset=preset, overrides=dataset_override(dataset))
    if dry_run:
        import yaml

        echo(yaml.safe_dump({"kind": spec.kind, "name": spec.name, **spec.sections}, sort_keys=False).rstrip())
        return
    result = run_spec(spec, echo=echo)
    summary = JOB_KINDS[spec.kind].summary
    if summary is not None:
        summary(result, echo)


# --------------------------------------------------------------------------------- submit, jobs


def _err(message: str) -> None:
    click.echo(message, err=True)


def _out(text: str) -> None:
    click.echo(text, nl=False)


_ADDRESS_HELP = (
    "The head's dashboard URL, e.g. http://HEAD:8265 [default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS]."
)


@main.command()
@click.argument("job")
@click.option("--address", help=_ADDRESS_HELP + " Without one, the job runs here on local Ray.")
@click.option("--preset", help="A preset of the spec, e.g. 'smoke' for a one-minute run.")
@click.option("--dataset", metavar="NAME|PATH", help=JOB_DATASET_HELP + " The cluster must see the path (shared storage, s3://).")
@click.option("--no-wait", is_flag=True, help="Print the submission id and how to follow it, then return.")
@click.option(
    "--resubmit",
    is_flag=True,
    help="Run it again even if this spec and preset already ran (id gets -r2, -r3, ...).",
)
@click.pass_context
def submit(
    ctx: click.Context,
    job: str,
    address: str | None,
    preset: str | None,
    dataset: str | None,
    no_wait: bool,
    resubmit: bool,
) -> None:
    """Send 'python -m vaedist run jobs/JOB.yaml' to a Ray cluster through the Jobs API.

    The project folder goes as working_dir; MLFLOW_TRACKING_URI (and VAEDIST_DATA_DIR, where set) go in
    env_vars. The submission id comes from the job name, the preset and a hash of the spec file, so
    repeating a submit attaches to the job that is running, or reports the one that finished; --resubmit
    runs it again. Streams the logs and exits with the job's outcome (0 SUCCEEDED, 1 FAILED or STOPPED).

    \b
    The token of a token-auth cluster is read the way Ray reads it: $RAY_AUTH_TOKEN,
    the file $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (`ray get-auth-token` on the head prints it).
    """
    from vaedist.errors import UsageError
    from vaedist.jobs import load_spec
    from vaedist.jobs_api import jobs_address
    from vaedist.submit import submit_spec

    if jobs_address(address) is None:
        if no_wait:
            raise UsageError("--no-wait needs a Ray cluster: pass --address or set RAY_ADDRESS")
        load_spec(job, preset=preset, overrides=dataset_override(dataset))  # a bad spec fails here, before Ray starts
        _err(f"no --address and no RAY_ADDRESS: running {job} here, on local Ray in this process")
        ctx.invoke(run, job=job, preset=preset, dataset=dataset, dry_run=False)
        return
    ctx.exit(
        submit_spec(
            job, address, preset=preset, wait=not no_wait, resubmit=resubmit, echo=echo, warn=_err, out=_out,
            dataset=(dataset_override(dataset) or {}).get("data", {}).get("dataset"),
        )  # fmt: skip
    )


@main.group("jobs")
def jobs_group() -> None:
    """List, inspect, follow and stop the jobs of a Ray cluster (the Ray Jobs API)."""


_address_option = click.option("--address", help=_ADDRESS_HELP)


@jobs_group.command("list")
@_address_option
def jobs_list_cmd(address: str | None) -> None:
    """Every job submitted to the cluster, oldest first."""
    from vaedist.submit import jobs_list

    jobs_list(address, echo=echo)


@jobs_group.command("status")
@click.argument("job_id")
@_address_option
def jobs_status_cmd(job_id: str, address: str | None) -> None:
    """Status, message, entrypoint and vaedist metadata of one job."""
    from vaedist.submit import jobs_status

    jobs_status(address, job_id, echo=echo)


@jobs_group.command("logs")
@click.argument("job_id")
@_address_option
@click.option("--follow", "-f", is_flag=True, help="Stream until the job ends, then exit with its outcome.")
@click.pass_context
def jobs_logs_cmd(ctx: click.Context, job_id: str, address: str | None, follow: bool) -> None:
    """The job's driver output (stdout and stderr)."""
    from vaedist.submit import jobs_logs

    ctx.exit(jobs_logs(address, job_id, follow_logs=follow, echo=echo, out=_out))


@jobs_group.command("stop")
@click.argument("job_id")
@_address_option
def jobs_stop_cmd(job_id: str, address: str | None) -> None:
    """Ask the job to stop (SIGTERM, then SIGKILL) and wait up to 30 s for it to end."""
    from vaedist.submit import jobs_stop

    jobs_stop(address, job_id, echo=echo)


# ------------------------------------------------------------------------------------- generate


@main.command()
@click.option("--model", "model_uri", required=True, help="models:/vaedist-mnist@champion, runs:/<run_id>/model, or a path to model.pt.")
@click.option("--out", required=True, help="Output folder or s3://bucket/prefix, one per generation run in the Hugging Face Hub layout (data/train-NNNNN-of-NNNNN.parquet shards, a README.md dataset card, _manifest.json); the same command finishes an unfinished one and repairs damaged shards of a finished one.")
@click.option("--labels", help="Class indices, e.g. 0,3,7, or 'all' [default: all]. An unconditional model takes none (its rows get label -1).")
@click.option("--per-label", type=int, help="Rows per label (give this or --total).")
@click.option("--total", type=int, help="Rows in all, split across the labels by --class-balance.")
@click.option("--class-balance", type=click.Choice(["uniform", "as-train"]), help=f"With --total: equal rows per label, or the real train split's class frequencies {default_help(GenerateConfig, 'class_balance')}.")
@click.option("--shard-rows", type=int, help=f"Rows per part file {default_help(GenerateConfig, 'shard_rows')}.")
@click.option("--image-format", type=click.Choice(IMAGE_FORMATS), help=f"png = the Hugging Face Image struct (PNG bytes; datasets, pandas, polars, duckdb read it), raw = uint8 HxWxC fixed-shape tensor (faster; pyarrow, Ray Data) {default_help(GenerateConfig, 'image_format')}.")
@click.option("--temperature", type=float, help=f"z ~ N(0, T^2 I) {default_help(GenerateConfig, 'temperature')}.")
@click.option("--seed", type=int, help=f"Seed of every sample's z (with its sample_id) {default_help(GenerateConfig, 'seed')}.")
@click.option("--batch-size", type=int, help=f"Images per decoder call {default_help(GenerateConfig, 'batch_size')}.")
@click.option("--workers", type=int, help=f"Decoder actors (each loads the model once) {default_help(ResourcesConfig, 'workers')}.")
@click.option("--gpus-per-worker", type=float, help="GPUs per actor; 0 decodes on CPUs [default: 1 where the cluster has a GPU for every actor, else 0].")
@click.option("--cpus-per-worker", type=float, help="CPUs per actor: on CPUs it renders one shard per CPU at a time, one torch thread each [default: the cluster's CPUs / workers].")
@click.option("--address", help="Ray cluster address [default: $RAY_ADDRESS, else local Ray in-process].")
@click.option("--overwrite", is_flag=True, help="Replace a complete or unfinished run of another plan in --out.")
@click.option("--dry-run", is_flag=True, help="Resolve the model, print the plan and what would be written; write nothing.")
def generate(model_uri: str, out: str, labels: str | None, dry_run: bool, **flags: Any) -> None:
    """Generate label-conditioned images from a model into Parquet shards, on Ray Data.

    \b
    A rerun of the same command finishes an interrupted run (only missing shards are written); the
    same sample_id always gets the same image. The run is recorded in MLflow (vaedist/<dataset>).
    Example:
      vaedist generate --model models:/vaedist-mnist@champion --out out/mnist-60k --per-label 6000
    """
    from vaedist.errors import UsageError
    from vaedist.generate import parse_labels, run_generate

    # GenerateConfig refuses this too, but in its own words (per_label, total): here it names the flags.
    if (flags["per_label"] is None) == (flags["total"] is None):
        raise UsageError("give exactly one of --per-label N (rows per label) or --total N (rows in all)")
    res_keys = ("workers", "gpus_per_worker", "cpus_per_worker", "address")
    gen = given(**{k: v for k, v in flags.items() if k not in res_keys})
    cfg = GenerateConfig(model=model_uri, out=out, labels=parse_labels(labels), **gen)
    resources = ResourcesConfig(**given(**{k: flags[k] for k in res_keys}))
    run_generate(cfg, resources, echo=echo, dry_run=dry_run)


# ------------------------------------------------------------------------------------- evaluate

main.add_command(evaluate)  # the evaluate group's commands live in vaedist/cli_evaluate.py


# --------------------------------------------------------------------------------------------- ui


@main.command()
@click.option("--port", default=5000, show_default=True, help="Port to serve on (127.0.0.1 only).")
@click.option("--backend-store-uri", help="MLflow store [default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db].")
def ui(port: int, backend_store_uri: str | None) -> None:
    """Open the MLflow UI on this machine's store, bound to 127.0.0.1 (tunnel to reach it remotely)."""
    import os
    import subprocess

    from vaedist.tracking import shown_uri, tracking_uri

    store = backend_store_uri or tracking_uri()
    if store.startswith(("http://", "https://")):
        echo(f"MLflow is already served at {shown_uri(store)}: open it in a browser")
        return
    # MLflow 3.17's UI opens every experiment in its global mode, GenAI by default (a "Traces 0" overview);
    # this link switches it to model training once (the browser remembers), so experiments open on their runs.
    echo(f"MLflow UI for {shown_uri(store)} at http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning"
         "  (Ctrl-C to stop)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port)]
    raise SystemExit(subprocess.call(cmd, env=os.environ.copy()))


if __name__ == "__main__":
    main()
