"""Import-boundary stand-in for vLLM (GPU-only), for laser-rl's CPU tests. See ../README.md."""

__version__ = "0.0.0+laser-rl-test-stub"


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class _NoEngine:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("vLLM is not installed: this is laser-rl's test stand-in, it cannot generate")

    @classmethod
    def from_engine_args(cls, *args, **kwargs):
        return cls()


AsyncEngineArgs = AsyncLLMEngine = LLM = _NoEngine
