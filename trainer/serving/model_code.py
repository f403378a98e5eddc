"""The code file MLflow stores with every registered model ("models from code"): it only imports the installed
package, so what runs is the installed release, never code read from the tracking store."""
import mlflow

from trainer.serving import FewShotGenerator

mlflow.models.set_model(FewShotGenerator())
