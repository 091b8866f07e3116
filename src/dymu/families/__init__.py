"""VLM wirings: how a vision-language model's encoder, projector and LLM are joined under DyMU."""
