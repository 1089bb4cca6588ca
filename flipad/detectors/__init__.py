"""Detector families (FLIPAD, reconstruction loss), the verdict that combines them, calibration and persistence."""
