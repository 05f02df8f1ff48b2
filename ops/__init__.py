"""Running the service: project paths, TorchServe processes, archives, rollouts, HTTP clients and load generation."""
