"""User-facing errors: caught at the CLI edge and printed as one line with exit code 2.

Bugs are not wrapped in these: they keep their tracebacks. `Preempted` is no error of the user's:
the CLI turns it into exit code 75.
"""


class UserError(Exception):
    """A mistake in what the user gave us (config, data, workdir, checkpoint)."""


class ConfigError(UserError):
    """A config key is unknown, mistyped or inconsistent with the machine."""


class DataError(UserError):
    """A corpus, data file or record is missing, empty or malformed."""


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not match the config."""


class Diverged(UserError):
    """A step's loss or gradient norm was not finite under config.train.on_nonfinite='stop'."""


class Preempted(Exception):
    """Training stopped on SIGTERM after checkpointing `step`; not a UserError: the CLI exits 75
    (EX_TEMPFAIL) so that launchers requeue the run, which then resumes."""

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}")
        self.step = step
