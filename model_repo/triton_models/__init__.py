"""Python-backend models, copied into a generated repository as <model>/1/model.py. They run inside
Triton's python stub with the serving environment's Python (hermes-trtllm[serve] installed)."""
