"""Vision (and later audio) encoders shared by the multimodal families, on our layers."""
