"""Memories of kind ``lora``: a PEFT LoRA adapter for the base, served by vLLM's multi-LoRA.

Runtime glue (checking an adapter against the base) and the prompt-to-LoRA generator
(Drag-and-Drop LLMs, arXiv 2506.16406) that writes such adapters from unlabeled prompts.
"""
