"""The three kinds of failure the batch tools tell apart."""


class QueueError(RuntimeError):
    """A problem the user has to fix before the batch can run (bad file, unreachable server...)."""


class ServerGone(QueueError):
    """The ComfyUI server cannot be reached (not started, crashed, restarted, network down)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message  # the bare cause, e.g. "[Errno 111] Connection refused"


class JobError(RuntimeError):
    """A problem with one job; the batch goes on."""


class WorkflowRejected(QueueError):
    """The server refuses the workflow for a reason that no job changes (a missing model, a bad
    value in a node the tool does not fill in): every job would fail the same way."""


class PromptRejected(JobError):
    """/prompt answered with an error; ``data`` is its JSON body ({error, node_errors})."""

    def __init__(self, message: str, data: object) -> None:
        super().__init__(message)
        self.data = data
