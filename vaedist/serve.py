"""The registered model as MLflow serves it: a ``python_function`` that turns a table of requests into images.

``mlflow.pyfunc.load_model("models:/vaedist-mnist@champion").predict(df)`` and ``mlflow models serve``
(POST ``/invocations``) both land in :class:`GeneratorModel`. One request row is one image:

    label        int    the class (conditional models; ignored, and may be left out, for unconditional ones)
    seed         int    optional: z ~ N(0, T^2 I) drawn from this seed [default: the row's index]
    temperature  float  optional: T [default: 1.0]

An unconditional model is asked for N images with N rows (``pd.DataFrame({"seed": range(N)})``). The
params ``{"image_format": "png"}`` return PNG bytes (base64 in the server's JSON) instead of uint8 arrays.
The answer is a table with ``label``, ``label_name``, ``seed`` and ``image`` (H x W x C uint8, or PNG).

The sampling itself (:func:`generate_images`) is plain PyTorch/numpy, tested without MLflow; this is,
beside ``tracking.py`` (and ``serve_model.py``, the file MLflow logs as the model), the one module that
imports MLflow, because MLflow loads this class itself.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

IMAGE_FORMATS = ("raw", "png")


def request_latents(seeds: np.ndarray, temperatures: np.ndarray, latent_dim: int) -> torch.Tensor:
    """(N, latent_dim) float32: row i is T_i * eps with eps ~ N(0, I) from ``seed_i`` alone, so a request's
    image does not depend on the other rows it came with."""
    z = torch.empty(len(seeds), latent_dim)
    for i, (seed, t) in enumerate(zip(seeds, temperatures, strict=True)):
        z[i] = torch.randn(latent_dim, generator=torch.Generator().manual_seed(int(seed))) * float(t)
    return z


def generate_images(model, request: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one image per request row -> (images (N, H, W, C) uint8, labels (N,) int64, seeds (N,) int64).

    Unconditional models give label -1, as in generated Parquet.
    """
    n = len(request)
    seeds = request["seed"].to_numpy(np.int64) if "seed" in request else np.arange(n, dtype=np.int64)
    temps = request["temperature"].to_numpy(np.float64) if "temperature" in request else np.ones(n)
    if model.conditional:
        if "label" not in request:
            raise ValueError("this model is conditional: each request row needs a 'label' column")
        labels = np.array(request["label"], dtype=np.int64)  # a writable copy: torch.from_numpy shares it
        bad = labels[(labels < 0) | (labels >= model.num_classes)]
        if len(bad):
            raise ValueError(f"label {int(bad[0])} is out of range: this model knows 0..{model.num_classes - 1}")
    else:
        labels = np.full(n, -1, dtype=np.int64)
    from vaedist.generate.writer import decode_images  # the same decoding as generated Parquet

    z = request_latents(seeds, temps, model.latent_dim).numpy()
    pixels = decode_images(model, z, labels if model.conditional else None, batch_size=1024)
    return pixels, labels, seeds


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """The pyfunc flavor of a vaedist model; its one artifact is the weights-only ``model.pt``."""

    def load_context(self, context) -> None:
        from vaedist.checkpoint import load_model
        from vaedist.data import get_spec

        self.model, state = load_model(context.artifacts["checkpoint"])
        self.model.eval()
        dataset = state.get("config", {}).get("data.dataset")
        try:
            self.class_names = tuple(get_spec(dataset).class_names) if dataset else ()
        except Exception:  # a dataset this vaedist does not know: numbers only
            self.class_names = ()

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
