"""actpass: store activations saved for backward in low precision, as a torch.compile backend."""
