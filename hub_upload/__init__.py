"""Export a trained run folder as a Hub repository (remote code, model card) and push it."""
