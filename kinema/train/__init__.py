"""Training: data, trainers and export."""
