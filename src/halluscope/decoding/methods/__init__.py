"""The decoding methods, one module each; they are looked up by name through `halluscope.decoding.registry`."""

__all__: list[str] = []
