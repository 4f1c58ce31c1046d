"""The user's instruction and its one limit, shared by the slash command, the CLI and the refiner.

No model library is imported here: validating an instruction at submit time answers in milliseconds.
"""

from __future__ import annotations

from .errors import InputError

MAX_INSTRUCTION_CHARS = 500


class InstructionTooLong(InputError):
    pass


def check_instruction(instruction: str) -> str:
    """The instruction as the LLM gets it (trimmed), or InstructionTooLong; callers can check at submit time."""
    instruction = instruction.strip()
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise InstructionTooLong(
            f"The instruction is {len(instruction)} characters long; please keep it to "
            f"{MAX_INSTRUCTION_CHARS} characters or fewer."
        )
    return instruction
