"""Names a request may use, checked when the flow run is created (they are flow-parameter types).

MLflow refuses registered model names with '/' or ':' (found at registration, after training
and spend, if not checked here), and the ledger keeps experiment names in 255 characters.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

ExperimentName = Annotated[str, Field(
    pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$",
    description="MLflow experiment (and ledger scope): letters, digits, '.', '_' or '-', at most 255 characters.",
)]
ModelName = Annotated[str, Field(
    pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
    description="Registered model name: letters, digits, '.', '_' or '-' (MLflow refuses '/' and ':'), at most 128.",
)]
