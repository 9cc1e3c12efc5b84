"""Errors that the CLI turns into one clear line: exit code 2, or 1 for `TrainingError`."""


class LesionKerasError(Exception):
    """Base class of the expected failures (bad input, bad config)."""


class TrainingError(LesionKerasError):
    """The job itself failed (e.g. the loss became NaN): exit code 1."""


class ConfigError(LesionKerasError):
    """A configuration key or value is invalid."""


class DataError(LesionKerasError):
    """Input data is unusable.

    Args:
        message: str. One line naming the file and the problem.
        problems: list of (path, problem) tuples. All problems found, so the
            user can fix every bad file at once. Defaults to a single entry
            built from `message`.
    """

    def __init__(self, message, problems=None):
        super().__init__(message)
        self.problems = list(problems) if problems else []

    def lines(self):
        if not self.problems:
            return [str(self)]
        return [f"{path}: {problem}" for path, problem in self.problems]
