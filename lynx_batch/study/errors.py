"""The study's own error: a mistake in the study file or folder, named with its key and the fix."""
from ..errors import QueueError


class StudyError(QueueError):
    """The study cannot run as given; the message names the key (or option) and the fix."""
