"""The file MLflow logs as the registered model's code ("models from code"): loading the model runs this
file instead of unpickling an object, so a registered vaedist model carries no pickled code."""

from mlflow.models import set_model

from vaedist.serve import GeneratorModel

set_model(GeneratorModel())
