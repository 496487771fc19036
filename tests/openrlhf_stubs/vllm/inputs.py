"""Import-boundary stand-in for vllm.inputs (see ../README.md)."""


def TokensPrompt(**kwargs) -> dict:  # vLLM's is a TypedDict
    return dict(kwargs)
