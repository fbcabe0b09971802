"""Kept for earlier imports (`from vitfood.model import load_model`): the models now live in `vitfood.models`.

`load_model`, `save_model` and `hf_files` work for every family; ViT, ViTArch and the key conversions are the
`vit` family's (vitfood.models.vit).
"""

from vitfood.models import (CONFIG_NAME, PREPROCESSOR_NAME, PYTORCH_BIN_NAME, SAFETENSORS_NAME, hf_files,
                            load_hf_weights, load_model, save_model)
from vitfood.models.vit import (ViT, ViTArch, from_hf_classifier_state_dict, from_hf_state_dict, hf_config_for,
                                to_hf_state_dict)

__all__ = ["CONFIG_NAME", "PREPROCESSOR_NAME", "PYTORCH_BIN_NAME", "SAFETENSORS_NAME", "ViT", "ViTArch",
           "from_hf_classifier_state_dict", "from_hf_state_dict", "hf_config_for", "hf_files", "load_hf_weights",
           "load_model", "save_model", "to_hf_state_dict"]
