"""Every exception the library raises on purpose. Each message names the file or the setting, says
what went wrong and what to do; none is raised after expensive work that a check could have spared."""


class InputError(ValueError):
    """Bad user input; the message names the file or setting and says what to do."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; nothing of the diverged step was saved."""


class SaveFailed(OSError):
    """Writing a checkpoint or the final weights failed (full disk, quota, I/O error). Its half-written
    temp folder is removed; the message names the checkpoint that is intact and how to resume."""


class CompiledStepMismatch(RuntimeError):
    """torch.compile's step computes other gradients than the eager step (a compiler bug): nothing was trained."""
