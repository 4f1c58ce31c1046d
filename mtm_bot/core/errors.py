"""Typed errors. Everything a user can cause is an `InputError` whose message is safe to show them."""


class MTMError(Exception):
    """Base of the project's errors; `str(err)` is a complete, user-facing sentence."""


class InputError(MTMError):
    """The user's input was refused (CLI exit code 2, an ephemeral reply in Discord)."""


class AudioError(InputError):
    """The uploaded file is not usable audio."""


class EmptyAudio(AudioError):
    pass


class NotAudio(AudioError):
    pass


class TruncatedAudio(AudioError):
    pass


class ClipTooShort(AudioError):
    pass


class ClipTooLong(AudioError):
    pass


class FileTooLarge(AudioError):
    pass


class ImageError(InputError):
    """The uploaded picture is not usable."""


class NotAnImage(ImageError):
    pass


class ImageFileTooLarge(ImageError):
    pass


class TooManyPixels(ImageError):
    """Huge dimensions (a decompression bomb): refused from the header, before decoding."""


class TruncatedImage(ImageError):
    pass


class OutputTooLarge(MTMError):
    """No encoding of the result fits the upload limit."""


class ModelUnavailable(MTMError):
    """Weights are missing from the local cache and cannot be fetched."""


class Cancelled(MTMError):
    """The job was cancelled; raised from inside the model loops at the next step."""
