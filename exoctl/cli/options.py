"""Options shared by several commands, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

import typer

from exoctl.dtypes import RUNTIME_DTYPES

JsonOption = Annotated[bool, typer.Option("--json", help="Print a JSON document instead of tables/text.")]
ModelOption = Annotated[
    str,
    typer.Option("--model", "-m", help="Catalog id, Hugging Face repo id, or a local model folder."),
]
DtypeOption = Annotated[
    str,
    typer.Option(
        "--dtype",
        help=f"Runtime dtype: auto (float32 without native bf16), {', '.join(RUNTIME_DTYPES)} "
        "(int8/int4: weights quantized at load; never chosen by auto).",
    ),
]
