"""The limits of a step between the runners of one instance, checked once for every stage kind."""

from __future__ import annotations

from exoctl.errors import ExoctlError

# Sequences one runner holds at once (each a KV cache): several times any batch it decodes.
MAX_SEQUENCES = 256


def check_room(
    seqs: list[str], starts: list[int], count: int, context: int, held: int, new: int, runner_id: str
) -> None:
    """Refuse a step of `count` positions that would go past the context, or that would make a
    runner holding `held` sequences hold more than MAX_SEQUENCES with its `new` ones."""
    for seq, start in zip(seqs, starts, strict=True):
        if start < 0 or start + count > context:
            raise ExoctlError(
                f"sequence {seq}: positions [{start}, {start + count}) "
                f"go past the model's context of {context}"
            )
    if held + new > MAX_SEQUENCES:
        raise ExoctlError(
            f"runner {runner_id} holds {held} sequences; {new} more would pass its limit of {MAX_SEQUENCES}",
            hint="wait for running requests to end",
        )


def check_hidden(dtype: str, shape: tuple[int, ...], seqs: int, width: int) -> None:
    """A pipeline stage's input: hidden states [B, T, D] in a float dtype (T > 1 only for one sequence)."""
    if (
        dtype not in ("float32", "bfloat16", "float16")
        or len(shape) != 3
        or shape[0] != seqs
        or shape[1] < 1
        or shape[2] != width
        or (seqs > 1 and shape[1] != 1)
    ):
        raise ExoctlError(
            f"hidden state {dtype} {list(shape)} does not fit {seqs} sequence(s) of width {width}"
        )
