"""Against domain shift: WiSE-FT, the built-in domain-shift case and its report."""
