"""vitlab: build, train and dissect vision transformers, CNNs and MLP-Mixers side by side."""

from .errors import VitlabError
from .models import count_parameters, create_model, list_models

__version__ = "0.1.0"

__all__ = ["VitlabError", "count_parameters", "create_model", "list_models", "__version__"]
