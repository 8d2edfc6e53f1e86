"""The registered model as MLflow serves it: a ``python_function`` that turns a table of requests into images.

``mlflow.pyfunc.load_model("models:/vaedist-mnist@champion").predict(df)`` and ``mlflow models serve``
(POST ``/invocations``) both land in :class:`GeneratorModel`. One request row is one image:

    label        int    the class (conditional models; ignored, and may be left out, for unconditional ones)
    seed         int    optional: the seed, >= 0 [default: 0]
    sample_id    int    optional: which sample of that seed, >= 0 [default: 0 where the request has seeds,
                        else the row's index]
    temperature  float  optional: T [default: 1.0]

The row's z is :func:`vaedist.sampling.prior_latents` of (seed, sample_id), as in ``vaedist generate``: the
row ``seed = S, sample_id = i`` with row i's label and temperature T is the image ``vaedist generate --seed S
--temperature T`` wrote for ``sample_id = i``. A request with seeds alone gets one image per seed, whatever
rows it came with.

An unconditional model is asked for N images with N rows (``pd.DataFrame({"seed": range(N)})``). The
params ``{"image_format": "png"}`` return PNG bytes (base64 in the server's JSON) instead of uint8 arrays.
The answer is a table with ``label``, ``label_name``, ``seed`` and ``image`` (H x W x C uint8, or PNG).

The sampling itself (:func:`generate_images`, on :mod:`vaedist.sampling`) is plain PyTorch/numpy, tested
without MLflow; this is,
beside ``tracking.py`` (and ``serve_model.py``, the file MLflow logs as the model), the one module that
imports MLflow, because MLflow loads this class itself.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from vaedist.config import IMAGE_FORMATS
from vaedist.sampling import decode, prior_latents


def request_samples(request: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seeds, sample ids, temperatures) of the request's rows, each (N,), with the defaults above."""
    n = len(request)
    seeds = request["seed"].to_numpy(np.int64) if "seed" in request else np.zeros(n, dtype=np.int64)
    if "sample_id" in request:
        ids = request["sample_id"].to_numpy(np.int64)
    else:
        ids = np.zeros(n, dtype=np.int64) if "seed" in request else np.arange(n, dtype=np.int64)
    temps = request["temperature"].to_numpy(np.float64) if "temperature" in request else np.ones(n)
    for name, values in (("seed", seeds), ("sample_id", ids)):
        if len(values) and values.min() < 0:
            raise ValueError(f"{name} {int(values.min())} is negative: seeds and sample ids are >= 0")
    return seeds, ids, temps


def generate_images(model, request: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one image per request row -> (images (N, H, W, C) uint8, labels (N,) int64, seeds (N,) int64).

    Unconditional models give label -1, as in generated Parquet.
    """
    n = len(request)
    seeds, ids, temps = request_samples(request)
    if model.conditional:
        if "label" not in request:
            raise ValueError("this model is conditional: each request row needs a 'label' column")
        labels = np.array(request["label"], dtype=np.int64)  # a writable copy: torch.from_numpy shares it
        bad = labels[(labels < 0) | (labels >= model.num_classes)]
        if len(bad):
            raise ValueError(f"label {int(bad[0])} is out of range: this model knows 0..{model.num_classes - 1}")
    else:
        labels = np.full(n, -1, dtype=np.int64)
    z = prior_latents(seeds, ids, model.latent_dim, temps)  # (N, L): the sampler generate uses
    pixels = decode(model, z, labels if model.conditional else None)
    return pixels, labels, seeds


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """The pyfunc flavor of a vaedist model; its one artifact is the weights-only ``model.pt``."""

    def load_context(self, context) -> None:
        from vaedist.checkpoint import header, load_model
        from vaedist.generate.driver import spec_class_names

        self.model, state = load_model(context.artifacts["checkpoint"])
        self.model.eval()
        self.class_names = header(state).class_names or tuple(spec_class_names(state.get("config", {}).get("data.dataset")))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        image_format = (params or {}).get("image_format", "raw")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format {image_format!r} is not one of {', '.join(IMAGE_FORMATS)}")
        request = pd.DataFrame(model_input)
        pixels, labels, seeds = generate_images(self.model, request)
        names = [self.class_names[i] if 0 <= i < len(self.class_names) else "" for i in labels]
        if image_format == "png":
            from vaedist.generate.png import encode_pngs  # the PNG encoding of generated Parquet

            images = encode_pngs(pixels)
        else:
            images = list(pixels)
        return pd.DataFrame({"label": labels, "label_name": names, "seed": seeds, "image": images})
