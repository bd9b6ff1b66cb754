"""A zoomable frame viewer: the original and its heatmap overlays side by side on axes that zoom and pan together.

Plotly (already the dashboard's chart library) does this natively: image traces on subplots whose axes `match`, so a
box-zoom or pan on one panel moves every panel to the same region, and a double click resets them all. No custom
component is needed. Images travel as PNG data URLs at full resolution (the 700x460 frame, not a thumbnail), so
zooming in shows the frame's own pixels (nuclei at 100X and above).
"""
from __future__ import annotations

import base64
import io
import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from PIL import Image

CONTENT_WIDTH_PX = 1100  # a wide Streamlit page's content width at a common 1400-px window: panels share it


def _data_url(img: Image.Image, lossless: bool = True) -> str:
    """PNG for the original (what the pathologist zooms into is never a compression artefact); JPEG q90 for the
    overlays (derived pictures: about 5x smaller to send and faster to encode)."""
    b = io.BytesIO()
    img.convert("RGB").save(b, "PNG" if lossless else "JPEG", **({} if lossless else {"quality": 90}))
    return f"data:image/{'png' if lossless else 'jpeg'};base64," + base64.b64encode(b.getvalue()).decode()


def heatmap_colorscale(steps: int = 11) -> list[list]:
    """The overlay's own colormap (pytorch-grad-cam's, read from models.gradcam.colour_scale) as a Plotly colorscale,
    so the colour bar beside the panels is the very mapping drawn on them."""
    from models.gradcam import colour_scale

    ramp = np.asarray(colour_scale(256, 1))[0]
    idx = np.linspace(0, 255, steps).round().astype(int)
    return [[float(i / 255), f"rgb({r},{g},{b})"] for i, (r, g, b) in zip(idx, ramp[idx])]


def frame_viewer(original: Image.Image, overlays: list[tuple[str, Image.Image]] | None = None, *, columns: int = 2,
                 um_per_px: float | None = None, scale_title: str = "relative contribution (each map scaled to its "
                 "own maximum)", title: str | None = None) -> go.Figure:
    """One figure: the original first, then each (caption, overlay), on axes that zoom and pan together; a colour
    bar for the overlays when there are any. `um_per_px` labels the axes in micrometres (the magnification's nominal
    scale) so a reader can size what they zoom into."""
    panels = [("original", original)] + list(overlays or [])
    cols = min(columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[c for c, _ in panels], horizontal_spacing=0.02,
                        vertical_spacing=0.06 if rows > 1 else 0.0)
    w, h = original.size
    for i, (_, img) in enumerate(panels):
        r, c = divmod(i, cols)
        if img.size != (w, h):  # a stored overlay may have another size: shown on the original's pixel grid
            img = img.resize((w, h), Image.BILINEAR)
        fig.add_trace(go.Image(source=_data_url(img, lossless=i == 0), x0=0, dx=1, y0=0, dy=1, hoverinfo="skip"), row=r + 1, col=c + 1)
    if overlays:
        # an invisible one-point heatmap carries the colour bar (image traces have none)
        fig.add_trace(go.Heatmap(z=[[0.0, 1.0]], x=[0, 1], y=[0, 0], opacity=0, colorscale=heatmap_colorscale(),
                                 zmin=0, zmax=1, hoverinfo="skip", showscale=True,
                                 colorbar={"title": {"text": scale_title, "side": "right"}, "tickvals": [0, 0.5, 1],
                                           "ticktext": ["low", "", "high"], "len": 0.9, "thickness": 14}),
                      row=1, col=1)
    unit = f"µm (nominal {um_per_px} µm/px)" if um_per_px else "px"
    for i in range(len(panels)):
        r, c = divmod(i, cols)
        # every panel's axes follow the first panel's: zoom and pan move them all to the same region
        fig.update_xaxes(matches="x", range=[0, w], showgrid=False, zeroline=False, row=r + 1, col=c + 1)
        fig.update_yaxes(matches="y", range=[h, 0], showgrid=False, zeroline=False, row=r + 1, col=c + 1,
                         showticklabels=c == 0)  # labels on the first column only: they would overprint the images
    for i in range(len(panels), rows * cols):  # an empty slot in the last row: no axes drawn
        r, c = divmod(i, cols)
        fig.update_xaxes(visible=False, row=r + 1, col=c + 1)
        fig.update_yaxes(visible=False, row=r + 1, col=c + 1)
    if um_per_px:
        vals = np.linspace(0, w, 5).round()
        fig.update_xaxes(tickvals=vals, ticktext=[f"{v * um_per_px:.0f}" for v in vals])
        vals = np.linspace(0, h, 4).round()
        fig.update_yaxes(tickvals=vals, ticktext=[f"{v * um_per_px:.0f}" for v in vals])
    fig.update_xaxes(title_text=unit, row=rows, col=1)
    panel_w = min(CONTENT_WIDTH_PX / cols, 760)  # one panel alone is not blown up to the page's width
    panel_h = panel_w * h / w  # square pixels: the height that fits panels of that width
    fig.update_layout(height=int(rows * panel_h + 90 + (30 if title else 0)), margin={"l": 10, "r": 10, "t": 60 if title else 30, "b": 40},
                      dragmode="zoom", title=title, showlegend=False)
    return fig


VIEWER_CAPTION = ("Zoom: drag a box on any panel; pan: drag with the pan tool (top right); double-click to reset. All "
                  "panels follow each other.")
