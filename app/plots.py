"""Pictures of an adapter for the admin page: how strong it is per layer and how many directions
its memory uses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .admin import LayerSummary


def adapter_figure(summary: Sequence[LayerSummary], title: str = "") -> Figure:
    """Per-layer norms for each adapted module, and the singular-value spectra of the memory."""
    # matplotlib only when an admin looks: importing it costs a second of every start-up
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = sorted({row.module for row in summary})
    fig, (delta, sums, spectra) = plt.subplots(1, 3, figsize=(15, 4))
    for module in modules:
        rows = sorted((r for r in summary if r.module == module), key=lambda r: r.layer)
        layers = [r.layer for r in rows]
        delta.plot(layers, [r.delta_norm for r in rows], "o-", label=module, markersize=3)
        sums.plot(layers, [r.sum_norm for r in rows], "o-", label=module, markersize=3)
    delta.set(title="adapter strength ||ΔW||_F", xlabel="layer")
    sums.set(title="memory size ||S||_F", xlabel="layer", yscale="log")
    for ax in (delta, sums):
        ax.legend()
    ordered = sorted(summary, key=lambda r: (r.module, r.layer))
    image = np.array([r.singular_values for r in ordered])
    shown = spectra.imshow(image, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    spectra.set(title="singular values of S (÷ largest)", xlabel="index", ylabel="module, layer")
    ticks = [i for i, r in enumerate(ordered) if r.layer % 10 == 0]
    spectra.set_yticks(ticks, [f"{ordered[i].module} {ordered[i].layer}" for i in ticks], fontsize=7)
    fig.colorbar(shown, ax=spectra)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
