"""What base model an adapter was trained on, recorded next to it (adapter_config.json does not say)."""

from __future__ import annotations

BASE_INFO = "base_model_info.json"


def base_model_info(model) -> dict:
    """What training records in BASE_INFO: the base's architecture and, for a QLoRA base, how it was
    quantised (the bitsandbytes settings and the dtype its weights were loaded in before quantising)."""
    config = model.config
    info = {"model_type": config.model_type, "architectures": config.architectures}
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        info["quantization"] = {
            "bitsandbytes": quantization.to_dict(),
            "load_dtype": str(config.dtype).removeprefix("torch."),
        }
    return info
