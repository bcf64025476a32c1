"""elastic_ft: elastic, spot-tolerant LLM fine-tuning on Ray Train + DeepSpeed."""

__version__ = "0.1.0"
