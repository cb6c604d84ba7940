"""The one exception type for data problems a user can cause (bad config, missing files)."""


class DataError(ValueError):
    """A data problem a user can fix; the message names the problem and the fix."""
