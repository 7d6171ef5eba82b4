"""mxlora: LoRA fine-tuning for gpt-oss mixture-of-experts models with MXFP4 experts."""

__version__ = "0.1.0"
