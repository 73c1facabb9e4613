"""Errors of the natural-language interpreter, each with a stable code for the API and the logs."""

from __future__ import annotations

from gatewayd.errors import PermanentError, TransientError


class UnusableAnswer(PermanentError):
    """A provider answered, but not with a usable command (not JSON, an unexpected shape, an unknown device, bad
    parameters). It counts as that provider's failure and the chain moves on; retrying the same prompt on the
    same model is not worth the deadline."""

    code = "unusable_answer"
    status = 502


class NotUnderstood(PermanentError):
    """No provider answered with a command and the local rules did not match: ``details`` lists what the local
    rules can do."""

    code = "not_understood"
    status = 422


class ConfirmationRequired(PermanentError):
    """The interpreted action is one the device profile marks ``confirm``: it runs only when the request carries
    ``"confirm": true``. ``details`` holds the command as interpreted, so the client can show it and confirm."""

    code = "confirmation_required"
    status = 409


class InterpretUnavailable(TransientError):
    code = "interpret_unavailable"
    status = 503


class QuestionAnswered(PermanentError):
    """The text is a question about state, answered from what the gateway knows, and no command was made. Over
    HTTP the answer is the response itself (200); where a command record is expected (MQTT) it is this refusal,
    whose message is the answer and whose ``details`` hold it in full."""

    code = "question_answered"
    status = 422
