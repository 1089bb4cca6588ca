"""MLflow "model from code" entry point: what ``mlflow.pyfunc.load_model`` executes to build the model."""

from mlflow.models import set_model

from registry.pyfunc import FlipadModel

set_model(FlipadModel())
