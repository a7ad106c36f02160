"""User-facing failures. Each carries the problem and the fix; the CLI prints one line and exits 2."""


class PocketformerError(Exception):
    """A failure the user can fix. `problem` says what is wrong, `fix` what to do about it."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem} Fix: {self.fix}" if self.fix else self.problem


def first_error(e: Exception) -> str:
    """The first thing an exception says, on one line: a pydantic error as `field: message`, else its first line
    (or its type, when it says nothing)."""
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            err = errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            return f"{loc}: {err['msg']}" if loc else err["msg"]
        except Exception:
            pass
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class AccessError(PocketformerError):
    """A path exists but this user may not open it (or a folder above it)."""


class CheckpointError(PocketformerError):
    """A checkpoint is missing, truncated, unsafe to load, or not what it claims to be."""


class ArchitectureError(PocketformerError):
    """The checkpoint's architecture is not one pocketformer can import."""


class ParityError(PocketformerError):
    """Two implementations of the same model disagree beyond tolerance."""


class RecipeError(PocketformerError):
    """A recipe has an unknown key or an invalid value."""


class OfflineError(PocketformerError):
    """A built-in model or text needs a package (or a downloaded file) that is not installed."""


class DataError(PocketformerError):
    """A dataset cannot be found or read."""


class ExportError(PocketformerError):
    """An export failed or its artifact does not match PyTorch."""

    precision = None  # the precision of the one file that failed, when it is one file (set by the export loop)


class TargetError(PocketformerError):
    """A target profile is unknown or cannot run an artifact."""
