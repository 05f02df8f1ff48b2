"""The clinician-facing Gradio demo: backends (TorchServe client or in-process handler) and presentation."""
