"""steinpix: steinbock's ilastik pixel classification, reproducible without ilastik."""


def __getattr__(name: str) -> str:
    # __version__ is looked up on demand: importlib.metadata costs about 0.1 s, which every
    # command would pay at start-up.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("steinpix")
        except PackageNotFoundError:  # running from a source tree that was not installed
            return "0.0.0"
    raise AttributeError(f"module 'steinpix' has no attribute {name!r}")
