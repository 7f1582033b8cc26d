"""SIM (CVPR 2023) training-only components. Nothing here runs at inference."""
