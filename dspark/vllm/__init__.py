"""Serving DSpark drafts in vLLM 0.23.0: the patch tooling (`patching`), its diff engine (`unified_diff`), the
checkpoint export (`export`) and the `dspark vllm` command (`command`).

Nothing here imports vLLM: patching works on the installed files, and export writes plain safetensors + JSON.
"""
