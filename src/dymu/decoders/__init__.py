"""Language-model decoder layers with VTU, one file per family of decoder layers."""
