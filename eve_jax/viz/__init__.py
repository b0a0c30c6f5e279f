"""Pictures of what the model does: MIM reconstructions, expert routing,
Grad-CAM maps (paper Figures 6-9). PNGs drawn with Pillow; no plotting
library."""
